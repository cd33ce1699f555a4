//! `ballot bench`: closed-loop load against real local clusters, Ballot
//! (wasm and native protocol builds) and optionally etcd, in one run.
//!
//! Every figure is measured in the same run on the same machine, so the
//! ratios between systems mean something even on a noisy host. Nothing here
//! asserts a speed: it measures and reports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::StatusCode;
use serde::Serialize;

use crate::client::{Client, Precondition};
use crate::dev::DevCluster;
use crate::server::CoreKind;

/// A workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Create-if-absent on fresh keys (the actor-key reservation pattern).
    Create,
    /// Blind writes to a few hot keys (contended).
    Put,
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
    pub cores: Vec<CoreKind>,
    pub etcd: bool,
    /// Drive these Ballot endpoints instead of starting a cluster.
    pub endpoints: Vec<String>,
    pub dir: PathBuf,
    pub binary: PathBuf,
}

/// One measured point.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub system: String,
    pub workload: Workload,
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
    pub points: Vec<Point>,
}

/// The operations of one system.
#[derive(Clone)]
enum Target {
    Ballot(Vec<Client>),
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
            Target::Ballot(replicas) => {
                let c = &replicas[client % replicas.len()];
                ballot_op(c, kind, &key, value).await
            }
            #[cfg(feature = "etcd")]
            Target::Etcd(e) => e.op(kind, &key, value).await,
        }
    }

    async fn preload(&self, value: &Bytes) -> Result<(), String> {
        for k in 0..64 {
            let key = format!("bench/k/{k}");
            match self {
                Target::Ballot(replicas) => {
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

async fn ballot_op(c: &Client, kind: Workload, key: &str, value: &Bytes) -> Result<Done, String> {
    let check = |r: crate::client::Response| match r.status {
        s if s.is_success() => Ok(Done::Ok),
        StatusCode::PRECONDITION_FAILED => Ok(Done::Conflict),
        s => Err(format!("{s} {}", r.error_message())),
    };
    match kind {
        Workload::Create => check(c.put(key, value.clone(), Precondition::Absent).await?),
        Workload::Put | Workload::Mix => {
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

async fn measure(
    system: &System,
    plan: &Arc<Plan>,
    workload: Workload,
    clients: usize,
    run: u64,
) -> Point {
    let value = Bytes::from(vec![b'v'; plan.value_bytes]);
    let cpu_before = cpu_seconds(&system.pids);
    let counters_before = counters(&system.metrics).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(plan.secs);
    let mut tasks = Vec::new();
    for client in 0..clients {
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
    let mut latencies = Vec::new();
    let (mut conflicts, mut errors, mut first_error) = (0, 0, None);
    for t in tasks {
        if let Ok((l, c, e, f)) = t.await {
            latencies.extend(l);
            conflicts += c;
            errors += e;
            if first_error.is_none() {
                first_error = f;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let ops = latencies.len() as u64;
    let server_cpu = match (cpu_before, cpu_seconds(&system.pids)) {
        (Some(a), Some(b)) if ops > 0 => Some((b - a) * 1e6 / ops as f64),
        _ => None,
    };
    let breakdown = match (counters_before, counters(&system.metrics).await) {
        (Some(a), Some(b)) if ops > 0 && !system.metrics.is_empty() => {
            let per = |x: f64| x * 1e6 / ops as f64;
            let guest = per(b.guest - a.guest);
            Some(Breakdown {
                guest_us_per_op: guest,
                storage_us_per_op: per(b.storage - a.storage),
                fsyncs_per_op: (b.fsyncs - a.fsyncs) / ops as f64,
                host_cpu_us_per_op: server_cpu.map(|c| (c - guest).max(0.0)).unwrap_or(0.0),
            })
        }
        _ => None,
    };
    Point {
        system: system.name.clone(),
        workload,
        clients,
        secs,
        ops,
        ops_per_sec: ops as f64 / secs,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().map(|&u| u as f64 / 1000.0).unwrap_or(0.0),
        conflicts,
        errors,
        first_error,
        server_cpu_us_per_op: server_cpu,
        breakdown,
    }
}

async fn start_ballot(plan: &Plan, core: CoreKind) -> Result<System, String> {
    let name = match core {
        CoreKind::Wasm => "ballot-wasm",
        CoreKind::Native => "ballot-native",
    };
    let dir = plan.dir.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let mut cluster = DevCluster::prepare(&dir, plan.nodes, 0, 0, core, plan.binary.clone())?;
    cluster.start_all()?;
    cluster.wait_all_ready(Duration::from_secs(90)).await?;
    let clients: Vec<Client> = cluster.nodes.iter().map(|n| n.client()).collect();
    let pids = cluster.nodes.iter().filter_map(|n| n.pid()).collect();
    Ok(System {
        name: name.into(),
        target: Target::Ballot(clients.clone()),
        pids,
        metrics: clients,
        _cluster: Some(cluster),
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
            systems.push(start_ballot(&plan, *core).await?);
        }
    } else {
        let clients: Vec<Client> = plan.endpoints.iter().map(|e| Client::new(e)).collect();
        systems.push(System {
            name: "ballot".into(),
            target: Target::Ballot(clients.clone()),
            pids: Vec::new(),
            metrics: clients,
            _cluster: None,
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
        let _ = measure(system, &Arc::new(warm), Workload::Mix, 16, 0).await;
    }
    let mut run = 1;
    for &workload in &plan.workloads {
        for &clients in &plan.clients {
            // Systems alternate within each point, so drift on a shared
            // machine hits them alike.
            for system in &systems {
                let p = measure(system, &plan, workload, clients, run).await;
                run += 1;
                eprintln!(
                    "{:<14} {:<6} {:>4} clients: {:>9.0} ops/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
                    p.system, workload.name(), clients, p.ops_per_sec, p.p50_ms, p.p99_ms, p.errors
                );
                points.push(p);
            }
        }
    }
    Ok(Report {
        nodes: plan.nodes,
        value_bytes: plan.value_bytes,
        hot_keys: plan.hot_keys,
        points,
    })
}

/// The results as a text table, then the ratios between systems.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let header = [
        "system",
        "workload",
        "clients",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "conflicts",
        "errors",
        "cpu us/op",
        "guest us/op",
        "host us/op",
        "fsync/op",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    let opt = |v: Option<f64>, digits: usize| {
        v.map(|v| format!("{v:.digits$}"))
            .unwrap_or_else(|| "-".into())
    };
    for p in &report.points {
        let b = p.breakdown.as_ref();
        rows.push(vec![
            p.system.clone(),
            p.workload.name().into(),
            p.clients.to_string(),
            format!("{:.0}", p.ops_per_sec),
            format!("{:.2}", p.p50_ms),
            format!("{:.2}", p.p99_ms),
            format!("{:.1}", p.max_ms),
            p.conflicts.to_string(),
            p.errors.to_string(),
            opt(p.server_cpu_us_per_op, 0),
            opt(b.map(|b| b.guest_us_per_op), 1),
            opt(b.map(|b| b.host_cpu_us_per_op), 0),
            opt(b.map(|b| b.fsyncs_per_op), 2),
        ]);
    }
    out.push_str(&render(&rows));
    // Ratios against the other systems measured in the same run.
    let mut by: BTreeMap<(Workload, usize), Vec<&Point>> = BTreeMap::new();
    for p in &report.points {
        by.entry((p.workload, p.clients)).or_default().push(p);
    }
    let mut ratios: Vec<Vec<String>> = vec![vec![
        "workload".into(),
        "clients".into(),
        "ratio".into(),
        "throughput".into(),
        "p50".into(),
        "p99".into(),
    ]];
    for ((workload, clients), points) in &by {
        let find = |name: &str| points.iter().find(|p| p.system == name);
        let pairs = [
            ("ballot-wasm", "etcd"),
            ("ballot-native", "etcd"),
            ("ballot-wasm", "ballot-native"),
        ];
        for (a, b) in pairs {
            if let (Some(a), Some(b)) = (find(a), find(b)) {
                let div = |x: f64, y: f64| {
                    if y > 0.0 {
                        format!("{:.2}", x / y)
                    } else {
                        "-".into()
                    }
                };
                ratios.push(vec![
                    workload.name().into(),
                    clients.to_string(),
                    format!("{}/{}", a.system, b.system),
                    div(a.ops_per_sec, b.ops_per_sec),
                    div(a.p50_ms, b.p50_ms),
                    div(a.p99_ms, b.p99_ms),
                ]);
            }
        }
    }
    if ratios.len() > 1 {
        out.push('\n');
        out.push_str(&render(&ratios));
    }
    out
}

fn render(rows: &[Vec<String>]) -> String {
    let cols = rows[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i < 2 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Throughput and p99 against clients, one row of two charts per workload.
pub fn plot(report: &Report, path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let workloads: Vec<Workload> = {
        let mut w: Vec<Workload> = report.points.iter().map(|p| p.workload).collect();
        w.sort();
        w.dedup();
        w
    };
    let systems: Vec<String> = {
        let mut s: Vec<String> = Vec::new();
        for p in &report.points {
            if !s.contains(&p.system) {
                s.push(p.system.clone());
            }
        }
        s
    };
    let height = 320 * workloads.len().max(1) as u32;
    let root = SVGBackend::new(path, (1100, height)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| format!("plotting: {e:?}");
    root.fill(&WHITE).map_err(e)?;
    let rows = root.split_evenly((workloads.len().max(1), 2));
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
    ];
    let max_clients = report.points.iter().map(|p| p.clients).max().unwrap_or(1) as f64;
    for (w, workload) in workloads.iter().enumerate() {
        for (m, metric) in ["throughput (ops/s)", "p99 latency (ms)"]
            .iter()
            .enumerate()
        {
            let area = &rows[w * 2 + m];
            let value = |p: &Point| if m == 0 { p.ops_per_sec } else { p.p99_ms };
            let points: Vec<&Point> = report
                .points
                .iter()
                .filter(|p| p.workload == *workload)
                .collect();
            let top = points.iter().map(|p| value(p)).fold(0.0, f64::max) * 1.15 + 1e-9;
            let mut chart = ChartBuilder::on(area)
                .caption(format!("{}: {metric}", workload.name()), ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(32)
                .y_label_area_size(64)
                .build_cartesian_2d((1f64..max_clients.max(2.0)).log_scale(), 0f64..top)
                .map_err(e)?;
            chart
                .configure_mesh()
                .x_desc("clients")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .draw()
                .map_err(e)?;
            for (s, system) in systems.iter().enumerate() {
                let color = palette[s % palette.len()];
                let series: Vec<(f64, f64)> = points
                    .iter()
                    .filter(|p| &p.system == system)
                    .map(|p| (p.clients as f64, value(p)))
                    .collect();
                chart
                    .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
                    .map_err(e)?
                    .label(system.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(
                        series
                            .iter()
                            .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                    )
                    .map_err(e)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(e)?;
        }
    }
    root.present().map_err(e)
}

#[cfg(feature = "etcd")]
mod etcd {
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
            let log = std::fs::File::create(dir.join(format!("{name}.log")))
                .map_err(|e| e.to_string())?;
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
                Workload::Put | Workload::Mix => c
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
}

/// What `ballot bench --swap` measured: one protocol swap under load.
#[derive(Clone, Debug, Serialize)]
pub struct SwapPoint {
    /// `activate` (embedded 0.3.0 to protocol-next 0.4.0) or `rollback`.
    pub action: String,
    pub clients: usize,
    /// From the activation request until every replica runs the target.
    pub swap_ms: f64,
    /// Operations that started in the steady phase before the swap.
    pub steady_ops: u64,
    pub steady_p50_ms: f64,
    pub steady_p99_ms: f64,
    /// Operations in flight at any moment of the swap.
    pub during_ops: u64,
    pub during_p50_ms: f64,
    pub during_p99_ms: f64,
    /// `during_p99_ms / steady_p99_ms`.
    pub p99_ratio: f64,
    /// Failed operations from the start of the steady phase to the end of
    /// the swap.
    pub errors: u64,
    pub first_error: Option<String>,
}

/// One operation of the swap run: when it started and ended (µs from the
/// run's start), and whether it failed.
struct Timed {
    start_us: u64,
    end_us: u64,
    error: Option<String>,
}

/// Waits until every replica reports running `label`.
async fn all_running(replicas: &[Client], label: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for c in replicas {
        loop {
            let v = c
                .json(hyper::Method::GET, "/v1/protocol", Bytes::new())
                .await?
                .map_err(|r| r.error_message())?;
            if v["running"]["label"] == label {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("{} never ran {label}", c.endpoint()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(())
}

fn swap_point(
    action: &str,
    clients: usize,
    ops: &[Timed],
    steady: (u64, u64),
    swap: (u64, u64),
) -> SwapPoint {
    let lat = |f: &dyn Fn(&&Timed) -> bool| {
        let mut l: Vec<u32> = ops
            .iter()
            .filter(|o| o.error.is_none())
            .filter(f)
            .map(|o| (o.end_us - o.start_us).min(u32::MAX as u64) as u32)
            .collect();
        l.sort_unstable();
        l
    };
    let steady_l = lat(&|o| o.start_us >= steady.0 && o.start_us < steady.1);
    let during_l = lat(&|o| o.end_us >= swap.0 && o.start_us <= swap.1);
    let failed: Vec<&Timed> = ops
        .iter()
        .filter(|o| o.error.is_some() && o.end_us >= steady.0 && o.start_us <= swap.1)
        .collect();
    let steady_p99 = percentile(&steady_l, 0.99);
    let during_p99 = percentile(&during_l, 0.99);
    SwapPoint {
        action: action.to_string(),
        clients,
        swap_ms: (swap.1 - swap.0) as f64 / 1000.0,
        steady_ops: steady_l.len() as u64,
        steady_p50_ms: percentile(&steady_l, 0.5),
        steady_p99_ms: steady_p99,
        during_ops: during_l.len() as u64,
        during_p50_ms: percentile(&during_l, 0.5),
        during_p99_ms: during_p99,
        p99_ratio: if steady_p99 > 0.0 {
            during_p99 / steady_p99
        } else {
            0.0
        },
        errors: failed.len() as u64,
        first_error: failed.first().and_then(|o| o.error.clone()),
    }
}

/// `ballot bench --swap`: a local wasm cluster under the mix workload
/// swaps to `protocol-next` and back; each swap's cluster-wide duration
/// and the p99 latency of the operations it overlapped, against the p99 of
/// the steady phase just before it, in the same run.
pub async fn run_swaps(plan: Plan, clients: usize) -> Result<Vec<SwapPoint>, String> {
    eprintln!("starting a {}-replica Ballot cluster (wasm)", plan.nodes);
    let system = start_ballot(&plan, CoreKind::Wasm).await?;
    #[allow(irrefutable_let_patterns)] // refutable with the etcd feature
    let Target::Ballot(replicas) = system.target.clone() else {
        unreachable!("start_ballot starts Ballot");
    };
    let value = Bytes::from(vec![b'v'; plan.value_bytes]);
    system.target.preload(&value).await?;
    let next = replicas[0]
        .json(
            hyper::Method::POST,
            "/v1/components",
            Bytes::from_static(crate::runtime::PROTOCOL_NEXT_WASM),
        )
        .await?
        .map_err(|r| format!("pushing protocol-next: {}", r.error_message()))?;
    let next = next["component"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let embedded = crate::registry::component_id(crate::runtime::PROTOCOL_WASM);

    let plan = Arc::new(plan);
    let origin = Instant::now();
    let us = move || origin.elapsed().as_micros() as u64;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (target, plan, value, stop) = (
            system.target.clone(),
            plan.clone(),
            value.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut ops = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let start_us = us();
                let result = target.op(Workload::Mix, client, i, 0, &plan, &value).await;
                ops.push(Timed {
                    start_us,
                    end_us: us(),
                    error: result.err(),
                });
                i += 1;
            }
            ops
        }));
    }
    let steady = Duration::from_secs_f64(plan.secs);
    let mut windows = Vec::new();
    for (action, path, body, label) in [
        (
            "activate",
            "/v1/protocol/activate",
            serde_json::json!({ "component": next }).to_string(),
            next.clone(),
        ),
        (
            "rollback",
            "/v1/protocol/rollback",
            String::new(),
            embedded.clone(),
        ),
    ] {
        let steady_from = us();
        tokio::time::sleep(steady).await;
        let from = us();
        let r = replicas[0]
            .json(hyper::Method::POST, path, body.into())
            .await?;
        if let Err(r) = r {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(format!("{action}: {}", r.error_message()));
        }
        all_running(&replicas, &label).await?;
        let to = us();
        eprintln!(
            "{action}: every replica runs {} after {:.0} ms",
            &label[..12],
            (to - from) as f64 / 1000.0
        );
        windows.push((action, (steady_from, from), (from, to)));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut ops = Vec::new();
    for t in tasks {
        ops.extend(t.await.map_err(|e| e.to_string())?);
    }
    Ok(windows
        .into_iter()
        .map(|(action, steady, swap)| swap_point(action, clients, &ops, steady, swap))
        .collect())
}

/// The swap measurements as a text table.
pub fn swap_table(points: &[SwapPoint]) -> String {
    let mut rows = vec![[
        "swap",
        "clients",
        "swap ms",
        "steady p50",
        "steady p99",
        "during p50",
        "during p99",
        "p99 ratio",
        "errors",
    ]
    .map(String::from)
    .to_vec()];
    for p in points {
        rows.push(vec![
            p.action.clone(),
            p.clients.to_string(),
            format!("{:.0}", p.swap_ms),
            format!("{:.2}", p.steady_p50_ms),
            format!("{:.2}", p.steady_p99_ms),
            format!("{:.2}", p.during_p50_ms),
            format!("{:.2}", p.during_p99_ms),
            format!("{:.2}", p.p99_ratio),
            p.errors.to_string(),
        ]);
    }
    render(&rows)
}
