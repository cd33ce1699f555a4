//! An etcd cluster on loopback, driven through its gRPC API; with `--wan`
//! its members reach each other through the TCP relays of the link
//! emulator, under the same topology as Ballot's replicas.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::{Done, Plan, System, Target, Workload};

/// One client per member (per region, with `--wan`); bench client `c`
/// uses `clients[c % len]`.
#[derive(Clone)]
pub struct Etcd {
    clients: Vec<etcd_client::Client>,
}

pub struct EtcdCluster {
    children: Vec<Child>,
    _fabric: Option<crate::wan::TcpFabric>,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

pub async fn start(plan: &Plan) -> Result<System, String> {
    let binary = std::env::var("ETCD").unwrap_or_else(|_| "etcd".into());
    let dir = plan.dir.join("etcd");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut members = Vec::new();
    for i in 1..=plan.nodes {
        members.push((format!("e{i}"), free_port()?, free_port()?));
    }
    // With a topology, each member advertises its relay's address, so its
    // peers dial through the link between them.
    let fabric = match &plan.wan {
        Some(_) => {
            let real: Vec<(u32, std::net::SocketAddr)> = members
                .iter()
                .enumerate()
                .map(|(i, (_, _, peer))| (i as u32 + 1, ([127, 0, 0, 1], *peer).into()))
                .collect();
            Some(
                crate::wan::TcpFabric::start(&real)
                    .await
                    .map_err(|e| format!("starting etcd's relays: {e}"))?,
            )
        }
        None => None,
    };
    let advertised = |i: usize, peer: u16| match &fabric {
        Some(f) => format!("http://{}", f.front(i as u32 + 1)),
        None => format!("http://127.0.0.1:{peer}"),
    };
    let initial: Vec<String> = members
        .iter()
        .enumerate()
        .map(|(i, (name, _, peer))| format!("{name}={}", advertised(i, *peer)))
        .collect();
    let mut children = Vec::new();
    for (i, (name, client, peer)) in members.iter().enumerate() {
        let log =
            std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
        let mut command = Command::new(&binary);
        // A bench that is killed leaves no etcd behind on the data
        // directory the next run reuses.
        crate::dev::die_with_parent(&mut command);
        let child = command
            .args(["--name", name])
            .arg("--data-dir")
            .arg(dir.join(name))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &advertised(i, *peer)])
            .args(["--initial-cluster", &initial.join(",")])
            .args([
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "ballot-bench",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {binary} (apt-get install etcd-server): {e}"))?;
        children.push(child);
    }
    let mut cluster = EtcdCluster {
        children,
        _fabric: None,
    };
    let endpoints: Vec<String> = members
        .iter()
        .map(|(_, c, _)| format!("http://127.0.0.1:{c}"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut clients = Vec::new();
    for endpoint in &endpoints {
        loop {
            let attempt = async {
                let mut c = etcd_client::Client::connect([endpoint], None)
                    .await
                    .map_err(|e| e.to_string())?;
                c.put("bench/ready", "1", None)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(c)
            };
            match attempt.await {
                Ok(c) => {
                    clients.push(c);
                    break;
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("etcd did not start: {e}"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    let mut leader = None;
    if let (Some(fabric), Some(topology)) = (&fabric, &plan.wan) {
        // Tell the relays which member each id is, then lay the links.
        let list = clients[0]
            .clone()
            .member_list()
            .await
            .map_err(|e| format!("etcd member list: {e}"))?;
        let number = |name: &str| name.strip_prefix('e').and_then(|n| n.parse::<u32>().ok());
        for m in list.members() {
            if let Some(i) = number(m.name()) {
                fabric.name(&format!("{:x}", m.id()), i);
            }
        }
        fabric.apply(topology);
        let status = clients[0]
            .clone()
            .status()
            .await
            .map_err(|e| format!("etcd status: {e}"))?;
        leader = list
            .members()
            .iter()
            .find(|m| m.id() == status.leader())
            .and_then(|m| number(m.name()));
        // Client c talks to the member of region c % regions.
        clients = topology
            .regions
            .iter()
            .map(|r| clients[r.replicas[0] as usize - 1].clone())
            .collect();
    }
    cluster._fabric = fabric;
    let pids = cluster.children.iter().map(|c| c.id()).collect();
    Ok(System {
        name: "etcd".into(),
        target: Target::Etcd(Etcd { clients }),
        pids,
        metrics: Vec::new(),
        _cluster: None,
        _fabric: None,
        leader,
        _etcd: Some(cluster),
    })
}

impl Etcd {
    fn client(&self, c: usize) -> etcd_client::Client {
        self.clients[c % self.clients.len()].clone()
    }

    pub async fn put(&self, key: &str, value: &Bytes) -> Result<(), String> {
        self.client(0)
            .put(key, value.to_vec(), None)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    pub async fn op(
        &self,
        client: usize,
        kind: Workload,
        key: &str,
        value: &Bytes,
    ) -> Result<Done, String> {
        let mut c = self.client(client);
        let err = |e: etcd_client::Error| e.to_string();
        match kind {
            Workload::Create => {
                let txn = Txn::new()
                    .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, value.to_vec(), None)]);
                let r = c.txn(txn).await.map_err(err)?;
                Ok(if r.succeeded() {
                    Done::Ok
                } else {
                    Done::Conflict
                })
            }
            Workload::Put | Workload::Spread | Workload::Mix => c
                .put(key, value.to_vec(), None)
                .await
                .map(|_| Done::Ok)
                .map_err(err),
            Workload::Get => c.get(key, None).await.map(|_| Done::Ok).map_err(err),
            Workload::Cas => {
                let r = c.get(key, None).await.map_err(err)?;
                let rev = r.kvs().first().map(|kv| kv.mod_revision()).unwrap_or(0);
                let txn = Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
                    .and_then([TxnOp::put(key, value.to_vec(), None)]);
                let r = c.txn(txn).await.map_err(err)?;
                Ok(if r.succeeded() {
                    Done::Ok
                } else {
                    Done::Conflict
                })
            }
        }
    }
}
