//! A 3-member etcd cluster on loopback, driven through its gRPC API.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::{Done, Plan, System, Target, Workload};

/// Clients spread over the members.
#[derive(Clone)]
pub struct Etcd {
    clients: Vec<etcd_client::Client>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

pub struct EtcdCluster {
    children: Vec<Child>,
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
    let initial: Vec<String> = members
        .iter()
        .map(|(name, _, peer)| format!("{name}=http://127.0.0.1:{peer}"))
        .collect();
    let mut cluster = EtcdCluster {
        children: Vec::new(),
    };
    for (name, client, peer) in &members {
        let log =
            std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
        let child = Command::new(&binary)
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
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
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
        cluster.children.push(child);
    }
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
    let pids = cluster.children.iter().map(|c| c.id()).collect();
    Ok(System {
        name: "etcd".into(),
        target: Target::Etcd(Etcd {
            clients,
            next: Default::default(),
        }),
        pids,
        metrics: Vec::new(),
        _cluster: None,
        _fabric: None,
        _etcd: Some(cluster),
    })
}

impl Etcd {
    fn client(&self) -> etcd_client::Client {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.clients[i % self.clients.len()].clone()
    }

    pub async fn put(&self, key: &str, value: &Bytes) -> Result<(), String> {
        self.client()
            .put(key, value.to_vec(), None)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    pub async fn op(&self, kind: Workload, key: &str, value: &Bytes) -> Result<Done, String> {
        let mut c = self.client();
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
