//! `ballot bench`: closed-loop load against real local clusters, Ballot
//! (wasm and native protocol builds) and optionally etcd, in one run.
//!
//! Every figure is measured in the same run on the same machine, so the
//! ratios between systems mean something even on a noisy host. Nothing here
//! asserts a speed: it measures and reports.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::StatusCode;
use serde::Serialize;

use crate::client::{Client, Precondition};
use crate::dev::DevCluster;
use crate::server::CoreKind;

#[cfg(feature = "etcd")]
mod etcd;
mod report;
mod swap;
mod wan;

pub use report::{plot, table};
pub use swap::{run_swaps, swap_table, SwapPoint};
pub use wan::{wan_plot, wan_table};

/// A workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Create-if-absent on fresh keys (the actor-key reservation pattern).
    Create,
    /// Blind writes to a few hot keys (contended; `--hot-keys`).
    Put,
    /// Blind writes spread over more keys (`--spread-keys`, 64 by default).
    Spread,
    /// Read, then compare-and-swap on the version read, over 64 keys.
    Cas,
    /// Linearizable reads of 64 existing keys.
    Get,
    /// 50 % get, 30 % put, 20 % cas over 64 keys.
    Mix,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Create => "create",
            Workload::Put => "put",
            Workload::Spread => "spread",
            Workload::Cas => "cas",
            Workload::Get => "get",
            Workload::Mix => "mix",
        }
    }
}

/// What `ballot bench` was asked to do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub nodes: u32,
    pub workloads: Vec<Workload>,
    pub clients: Vec<usize>,
    pub secs: f64,
    pub value_bytes: usize,
    pub hot_keys: usize,
    pub spread_keys: usize,
    pub cores: Vec<CoreKind>,
    /// Also run a wasm cluster whose replicas reach each other through the
    /// link emulator's relays (`crate::wan`) at zero delay: the relays' own
    /// cost, against the direct cluster in the same run.
    pub relay: bool,
    /// Ballot's clients send a key's requests to the replica that leads it,
    /// once an answer named it (`Ballot-Leader`), as `ballot-client` does;
    /// never with `wan`, whose clients stay in their region.
    pub routing: bool,
    /// Run every cluster (Ballot's and etcd's) across the regions of this
    /// topology, behind the link emulator; `clients` is then per region,
    /// each region's clients talk to a replica of their region, and every
    /// point is reported per region.
    pub wan: Option<crate::wan::Topology>,
    pub etcd: bool,
    /// Drive these Ballot endpoints instead of starting a cluster.
    pub endpoints: Vec<String>,
    /// The CA their `https://` certificates chain to.
    pub ca: Option<PathBuf>,
    pub dir: PathBuf,
    pub binary: PathBuf,
}

/// One measured point.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub system: String,
    pub workload: Workload,
    /// The region of the clients measured (`--wan`), whose replica they used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Clients (per region, with `--wan`).
    pub clients: usize,
    pub secs: f64,
    /// Operations that succeeded (a 412 on cas or create counts: the store
    /// answered correctly).
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Precondition failures (cas lost a race, create found the key taken).
    pub conflicts: u64,
    /// Failures surfaced to the client (5xx, transport errors).
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// CPU time of every server process per operation, when they are ours.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_op: Option<f64>,
    /// Breakdown from Ballot's metrics, per operation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breakdown: Option<Breakdown>,
}

/// Where time went in Ballot's replicas, per client operation.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Breakdown {
    /// Time inside protocol component calls (step and release), all replicas.
    pub guest_us_per_op: f64,
    /// Write transactions including fsync, all replicas (wall time).
    pub storage_us_per_op: f64,
    /// Group commits per client operation, all replicas.
    pub fsyncs_per_op: f64,
    /// Server CPU not spent in guest calls: HTTP, QUIC, TLS, LMDB, the core loop.
    pub host_cpu_us_per_op: f64,
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub nodes: u32,
    pub value_bytes: usize,
    pub hot_keys: usize,
    pub spread_keys: usize,
    /// With `--wan`: each region's physical floor, and etcd's leader.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wan: Option<wan::WanFacts>,
    pub points: Vec<Point>,
}

/// The operations of one system.
#[derive(Clone)]
enum Target {
    /// A client per replica; client `c` starts at replica `c % n`, and with
    /// routes goes to the key's leader once it is known.
    Ballot(Vec<Client>, Option<Arc<ballot_client::Routes>>),
    #[cfg(feature = "etcd")]
    Etcd(etcd::Etcd),
}

/// What one operation did.
enum Done {
    Ok,
    Conflict,
}

impl Target {
    async fn op(
        &self,
        workload: Workload,
        client: usize,
        i: u64,
        run: u64,
        plan: &Plan,
        value: &Bytes,
    ) -> Result<Done, String> {
        let hot = plan.hot_keys as u64;
        // A per-client generator: which key, and for the mix which operation.
        let r = (client as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ i.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let r = r ^ (r >> 29);
        let (kind, key) = match workload {
            Workload::Create => (Workload::Create, format!("bench/create/{run}/{client}/{i}")),
            Workload::Put => (Workload::Put, format!("bench/hot/{}", r % hot)),
            Workload::Spread => (
                Workload::Put,
                format!("bench/spread/{}", r % plan.spread_keys as u64),
            ),
            Workload::Cas => (Workload::Cas, format!("bench/k/{}", r % 64)),
            Workload::Get => (Workload::Get, format!("bench/k/{}", r % 64)),
            Workload::Mix => {
                let kind = match r % 10 {
                    0..=4 => Workload::Get,
                    5..=7 => Workload::Put,
                    _ => Workload::Cas,
                };
                (kind, format!("bench/k/{}", (r >> 8) % 64))
            }
        };
        match self {
            Target::Ballot(replicas, routes) => {
                let own = client % replicas.len();
                let Some(routes) = routes else {
                    return Ok(ballot_op(&replicas[own], kind, &key, value).await?.0);
                };
                let path = crate::client::escape_key(&key);
                let at = routes.get(&path).filter(|&at| at < replicas.len());
                match ballot_op(&replicas[at.unwrap_or(own)], kind, &key, value).await {
                    Ok((done, leader)) => {
                        routes.learn(&path, leader.as_deref(), replicas);
                        Ok(done)
                    }
                    Err(e) => {
                        if at.is_some() {
                            routes.forget(&path);
                        }
                        Err(e)
                    }
                }
            }
            #[cfg(feature = "etcd")]
            Target::Etcd(e) => e.op(client, kind, &key, value).await,
        }
    }

    async fn preload(&self, value: &Bytes) -> Result<(), String> {
        for k in 0..64 {
            let key = format!("bench/k/{k}");
            match self {
                Target::Ballot(replicas, _) => {
                    let r = replicas[0]
                        .put(&key, value.clone(), Precondition::None)
                        .await?;
                    if !r.status.is_success() {
                        return Err(format!("preloading {key}: {}", r.error_message()));
                    }
                }
                #[cfg(feature = "etcd")]
                Target::Etcd(e) => e.put(&key, value).await?,
            }
        }
        Ok(())
    }
}

/// One operation through replica `c`: what it did, and the leader its
/// last answer named (`Ballot-Leader`).
async fn ballot_op(
    c: &Client,
    kind: Workload,
    key: &str,
    value: &Bytes,
) -> Result<(Done, Option<String>), String> {
    let check = |r: crate::client::Response| match r.status {
        s if s.is_success() => Ok((Done::Ok, r.leader)),
        StatusCode::PRECONDITION_FAILED => Ok((Done::Conflict, r.leader)),
        s => Err(format!("{s} {}", r.error_message())),
    };
    match kind {
        Workload::Create => check(c.put(key, value.clone(), Precondition::Absent).await?),
        Workload::Put | Workload::Spread | Workload::Mix => {
            check(c.put(key, value.clone(), Precondition::None).await?)
        }
        Workload::Get => check(c.get(key, false).await?),
        Workload::Cas => {
            let r = c.get(key, false).await?;
            let version = match r.status {
                StatusCode::OK | StatusCode::NOT_FOUND => r.version.unwrap_or(0),
                s => return Err(format!("{s} {}", r.error_message())),
            };
            check(
                c.put(key, value.clone(), Precondition::Version(version))
                    .await?,
            )
        }
    }
}

/// A system under test and the processes it runs in.
struct System {
    name: String,
    target: Target,
    pids: Vec<u32>,
    /// Ballot's metrics endpoints, for the breakdown.
    metrics: Vec<Client>,
    _cluster: Option<DevCluster>,
    /// The relays between a relayed cluster's replicas.
    _fabric: Option<crate::wan::Fabric>,
    /// etcd's leader when the load started (its region, with `--wan`).
    leader: Option<u32>,
    #[cfg(feature = "etcd")]
    _etcd: Option<etcd::EtcdCluster>,
}

fn cpu_seconds(pids: &[u32]) -> Option<f64> {
    // utime + stime, fields 14 and 15 of /proc/PID/stat, in clock ticks.
    let tick = 100.0; // sysconf(_SC_CLK_TCK) on Linux.
    let mut total = 0.0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = after.split(' ').collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        total += (utime + stime) / tick;
    }
    Some(total)
}

#[derive(Clone, Copy, Default)]
struct Counters {
    guest: f64,
    storage: f64,
    fsyncs: f64,
}

async fn counters(metrics: &[Client]) -> Option<Counters> {
    let mut c = Counters::default();
    for m in metrics {
        let r = m
            .request(hyper::Method::GET, "/metrics", &[], Bytes::new())
            .await
            .ok()?;
        for line in String::from_utf8_lossy(&r.body).lines() {
            let value = || {
                line.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            if line.starts_with("ballot_guest_call_seconds_sum") {
                c.guest += value();
            } else if line.starts_with("ballot_fsync_seconds_sum") {
                c.storage += value();
            } else if line.starts_with("ballot_fsync_seconds_count") {
                c.fsyncs += value();
            }
        }
    }
    Some(c)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Runs one point: `clients` closed-loop clients per group for `plan.secs`.
/// Client `c` is in group `c % groups` (its region, with `--wan`; one
/// group otherwise) and uses that group's replica. One point per group.
async fn measure(
    system: &System,
    plan: &Arc<Plan>,
    workload: Workload,
    clients: usize,
    run: u64,
) -> Vec<Point> {
    let regions: Vec<Option<String>> = match &plan.wan {
        Some(t) => t.regions.iter().map(|r| Some(r.name.clone())).collect(),
        None => vec![None],
    };
    let groups = regions.len();
    let value = Bytes::from(vec![b'v'; plan.value_bytes]);
    let cpu_before = cpu_seconds(&system.pids);
    let counters_before = counters(&system.metrics).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(plan.secs);
    let mut tasks = Vec::new();
    for client in 0..clients * groups {
        let target = system.target.clone();
        let plan = plan.clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies_us: Vec<u32> = Vec::new();
            let (mut conflicts, mut errors, mut first_error) = (0u64, 0u64, None);
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let result = target.op(workload, client, i, run, &plan, &value).await;
                let us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
                match result {
                    Ok(Done::Ok) => latencies_us.push(us),
                    Ok(Done::Conflict) => {
                        latencies_us.push(us);
                        conflicts += 1;
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
                i += 1;
            }
            (latencies_us, conflicts, errors, first_error)
        }));
    }
    let mut latencies = vec![Vec::new(); groups];
    let mut conflicts = vec![0u64; groups];
    let mut errors = vec![0u64; groups];
    let mut first_error: Vec<Option<String>> = vec![None; groups];
    for (client, t) in tasks.into_iter().enumerate() {
        let g = client % groups;
        if let Ok((l, c, e, f)) = t.await {
            latencies[g].extend(l);
            conflicts[g] += c;
            errors[g] += e;
            if first_error[g].is_none() {
                first_error[g] = f;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let all_ops: u64 = latencies.iter().map(|l| l.len() as u64).sum();
    let server_cpu = match (cpu_before, cpu_seconds(&system.pids)) {
        (Some(a), Some(b)) if all_ops > 0 => Some((b - a) * 1e6 / all_ops as f64),
        _ => None,
    };
    let breakdown = match (counters_before, counters(&system.metrics).await) {
        (Some(a), Some(b)) if all_ops > 0 && !system.metrics.is_empty() => {
            let per = |x: f64| x * 1e6 / all_ops as f64;
            let guest = per(b.guest - a.guest);
            Some(Breakdown {
                guest_us_per_op: guest,
                storage_us_per_op: per(b.storage - a.storage),
                fsyncs_per_op: (b.fsyncs - a.fsyncs) / all_ops as f64,
                host_cpu_us_per_op: server_cpu.map(|c| (c - guest).max(0.0)).unwrap_or(0.0),
            })
        }
        _ => None,
    };
    let mut points = Vec::with_capacity(groups);
    for (g, region) in regions.into_iter().enumerate() {
        let mut latencies = std::mem::take(&mut latencies[g]);
        latencies.sort_unstable();
        let ops = latencies.len() as u64;
        points.push(Point {
            system: system.name.clone(),
            workload,
            region,
            clients,
            secs,
            ops,
            ops_per_sec: ops as f64 / secs,
            p50_ms: percentile(&latencies, 0.50),
            p99_ms: percentile(&latencies, 0.99),
            max_ms: latencies.last().map(|&u| u as f64 / 1000.0).unwrap_or(0.0),
            conflicts: conflicts[g],
            errors: errors[g],
            first_error: first_error[g].take(),
            // Server-wide figures, the same for every region's point.
            server_cpu_us_per_op: server_cpu,
            breakdown: breakdown.clone(),
        });
    }
    points
}

async fn start_ballot(plan: &Plan, core: CoreKind, relay: bool) -> Result<System, String> {
    let name = match (core, relay) {
        (CoreKind::Wasm, false) => "ballot-wasm",
        (CoreKind::Native, false) => "ballot-native",
        (CoreKind::Wasm, true) => "ballot-wasm-relayed",
        (CoreKind::Native, true) => "ballot-native-relayed",
    };
    let dir = plan.dir.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let mut cluster = DevCluster::prepare(&dir, plan.nodes, 0, 0, core, plan.binary.clone())?;
    let fabric = if relay || plan.wan.is_some() {
        // Every replica reaches its peers through a relay in front of each
        // peer port: with the topology's links, or perfect ones.
        let fabric = crate::wan::Fabric::start(&cluster.peer_addrs())
            .await
            .map_err(|e| format!("starting the relays: {e}"))?;
        if let Some(topology) = &plan.wan {
            fabric.apply(topology);
            cluster.fit_timeouts(topology)?;
        }
        cluster.route_peers(|id| fabric.front(id))?;
        Some(fabric)
    } else {
        None
    };
    cluster.start_all()?;
    cluster.wait_all_ready(Duration::from_secs(90)).await?;
    let clients: Vec<Client> = cluster.nodes.iter().map(|n| n.client()).collect();
    // With a topology, client c uses the first replica of region c % regions.
    let target = match &plan.wan {
        Some(t) => t
            .regions
            .iter()
            .map(|r| clients[r.replicas[0] as usize - 1].clone())
            .collect(),
        None => clients.clone(),
    };
    let routes = (plan.routing && plan.wan.is_none()).then(Arc::default);
    let pids = cluster.nodes.iter().filter_map(|n| n.pid()).collect();
    Ok(System {
        name: name.into(),
        target: Target::Ballot(target, routes),
        pids,
        metrics: clients,
        _cluster: Some(cluster),
        _fabric: fabric,
        leader: None,
        #[cfg(feature = "etcd")]
        _etcd: None,
    })
}

/// Runs the plan; prints progress to stderr.
pub async fn run(plan: Plan) -> Result<Report, String> {
    let plan = Arc::new(plan);
    let mut systems = Vec::new();
    if plan.endpoints.is_empty() {
        for core in &plan.cores {
            eprintln!(
                "starting a {}-replica Ballot cluster ({core:?})",
                plan.nodes
            );
            systems.push(start_ballot(&plan, *core, false).await?);
        }
        if plan.relay && plan.wan.is_none() {
            eprintln!(
                "starting a {}-replica Ballot cluster (Wasm) behind zero-delay relays",
                plan.nodes
            );
            systems.push(start_ballot(&plan, CoreKind::Wasm, true).await?);
        }
    } else {
        let tls = match &plan.ca {
            Some(ca) => crate::client::Tls::from_files(ca, None)?,
            None => crate::client::Tls::plain(),
        };
        let clients: Vec<Client> = plan
            .endpoints
            .iter()
            .map(|e| Client::with_tls(e, &tls))
            .collect();
        systems.push(System {
            name: "ballot".into(),
            target: Target::Ballot(clients.clone(), plan.routing.then(Arc::default)),
            pids: Vec::new(),
            metrics: clients,
            _cluster: None,
            _fabric: None,
            leader: None,
            #[cfg(feature = "etcd")]
            _etcd: None,
        });
    }
    if plan.etcd {
        #[cfg(feature = "etcd")]
        {
            eprintln!("starting a {}-member etcd cluster", plan.nodes);
            systems.push(etcd::start(&plan).await?);
        }
        #[cfg(not(feature = "etcd"))]
        return Err(
            "this ballot was built without etcd support: rebuild with `--features etcd` \
                    (needs protoc: apt-get install protobuf-compiler)"
                .into(),
        );
    }
    let mut points = Vec::new();
    let value = Bytes::from(vec![b'v'; plan.value_bytes]);
    for system in &systems {
        system.target.preload(&value).await?;
        // Warm up connections, caches and the allocator.
        let warm = Plan {
            secs: plan.secs.min(1.0),
            ..(*plan).clone()
        };
        let warm_clients = if plan.wan.is_some() { 4 } else { 16 };
        let _ = measure(system, &Arc::new(warm), Workload::Mix, warm_clients, 0).await;
    }
    let mut run = 1;
    for &workload in &plan.workloads {
        for &clients in &plan.clients {
            // Systems alternate within each point, so drift on a shared
            // machine hits them alike.
            for system in &systems {
                for p in measure(system, &plan, workload, clients, run).await {
                    eprintln!(
                        "{:<14} {:<6} {:<10} {:>4} clients: {:>9.0} ops/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
                        p.system,
                        workload.name(),
                        p.region.as_deref().unwrap_or(""),
                        clients,
                        p.ops_per_sec,
                        p.p50_ms,
                        p.p99_ms,
                        p.errors
                    );
                    if let Some(e) = &p.first_error {
                        eprintln!("  the first error: {e}");
                    }
                    points.push(p);
                }
                run += 1;
            }
        }
    }
    Ok(Report {
        nodes: plan.nodes,
        value_bytes: plan.value_bytes,
        hot_keys: plan.hot_keys,
        spread_keys: plan.spread_keys,
        wan: plan
            .wan
            .as_ref()
            .map(|t| wan::facts(t, systems.iter().find_map(|s| s.leader))),
        points,
    })
}
