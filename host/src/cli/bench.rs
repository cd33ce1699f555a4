//! `ballot bench`: its arguments, and the run (see [`crate::bench`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::output::fail;
use crate::server::CoreKind;

#[derive(Args, Debug)]
pub(super) struct BenchArgs {
    /// Workloads to run, in order [default: create,put,spread,cas,get,mix;
    /// with --wan: create,put,get].
    #[arg(long, value_enum, value_delimiter = ',')]
    workloads: Vec<crate::bench::Workload>,
    /// Concurrent closed-loop clients, one sweep point each (per region
    /// with --wan) [default: 1,16,64,256; with --wan: 4].
    #[arg(long, value_delimiter = ',')]
    clients: Vec<usize>,
    /// Seconds per point.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Bytes per written value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Keys the put workload contends on.
    #[arg(long, default_value_t = 4)]
    hot_keys: usize,
    /// Keys the spread workload writes to.
    #[arg(long, default_value_t = 64)]
    spread_keys: usize,
    /// Replicas per cluster (and etcd members).
    #[arg(long, default_value_t = 3, conflicts_with = "wan")]
    nodes: u32,
    /// Protocol builds to run Ballot with; both gives the wasm/native ratio.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "wasm,native")]
    core: Vec<CoreKind>,
    /// Also run the same workloads against etcd (needs the etcd binary and
    /// a build with `--features etcd`).
    #[arg(long, value_parser = ["etcd"])]
    compare: Option<String>,
    /// Drive these running Ballot replicas instead of starting clusters.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// The cluster CA (PEM) those endpoints' certificates chain to.
    #[arg(long, env = "BALLOT_CA")]
    ca: Option<PathBuf>,
    /// Where the clusters live while the benchmark runs.
    #[arg(long, default_value = "ballot-bench")]
    dir: PathBuf,
    /// Write every point as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw throughput and p99 against clients as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Instead of the workloads: swap a local wasm cluster's protocol to
    /// protocol-next and back under the mix workload, and report each
    /// swap's duration and p99 during it against the steady p99 before it
    /// (--secs of steady load before each swap; --clients' first value).
    #[arg(long)]
    swap: bool,
    /// Also run a wasm cluster whose replicas reach each other through the
    /// link emulator's relays at zero delay (what the relays cost, against
    /// the direct cluster in the same run).
    #[arg(long, conflicts_with = "wan")]
    relay: bool,
    /// Send every Ballot client's requests to its own replica, which
    /// forwards a key's commands to the key's leader, instead of to the
    /// leader the `Ballot-Leader` header named (as `ballot-client` does).
    #[arg(long)]
    no_routing: bool,
    /// Run every cluster (and etcd, with --compare etcd) across the regions
    /// of this topology file (`examples/wan/3-regions.toml`), through the
    /// link emulator: each region's clients use that region's replica, and
    /// every point is reported per region against its physical floor.
    #[arg(long, conflicts_with_all = ["endpoints", "swap"])]
    wan: Option<PathBuf>,
}

pub(super) fn bench(mut args: BenchArgs) -> ExitCode {
    use crate::bench::Workload;
    let wan = match &args.wan {
        Some(path) => match crate::wan::Topology::load(path) {
            Ok(t) => Some(t),
            Err(e) => return fail(e),
        },
        None => None,
    };
    if args.workloads.is_empty() {
        args.workloads = match wan {
            Some(_) => vec![Workload::Create, Workload::Put, Workload::Get],
            None => vec![
                Workload::Create,
                Workload::Put,
                Workload::Spread,
                Workload::Cas,
                Workload::Get,
                Workload::Mix,
            ],
        };
    }
    if args.clients.is_empty() {
        args.clients = match wan {
            Some(_) => vec![4],
            None => vec![1, 16, 64, 256],
        };
    }
    if args.clients.contains(&0) || args.secs <= 0.0 || args.hot_keys == 0 || args.spread_keys == 0
    {
        return fail(
            "--clients must be positive counts, --secs, --hot-keys and --spread-keys positive",
        );
    }
    let binary = match std::env::current_exe() {
        Ok(b) => b,
        Err(e) => return fail(format!("locating the ballot binary: {e}")),
    };
    let plan = crate::bench::Plan {
        nodes: wan.as_ref().map_or(args.nodes, |t| t.nodes()),
        workloads: args.workloads,
        clients: args.clients,
        secs: args.secs,
        value_bytes: args.value_bytes,
        hot_keys: args.hot_keys,
        spread_keys: args.spread_keys,
        cores: args.core,
        relay: args.relay,
        routing: !args.no_routing,
        wan,
        etcd: args.compare.is_some(),
        endpoints: args.endpoints,
        ca: args.ca,
        dir: args.dir.clone(),
        binary,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("starting tokio: {e}")),
    };
    if args.swap {
        let clients = plan.clients[0];
        let points = match rt.block_on(crate::bench::run_swaps(plan, clients)) {
            Ok(p) => p,
            Err(e) => return fail(e),
        };
        let _ = std::fs::remove_dir_all(&args.dir);
        print!("{}", crate::bench::swap_table(&points));
        if let Some(path) = args.json {
            let text = serde_json::to_string_pretty(&points).expect("the report serializes");
            if let Err(e) = std::fs::write(&path, text + "\n") {
                return fail(format!("writing {}: {e}", path.display()));
            }
        }
        return ExitCode::SUCCESS;
    }
    let report = match rt.block_on(crate::bench::run(plan)) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let _ = std::fs::remove_dir_all(&args.dir);
    print!("{}", crate::bench::wan_table(&report));
    if let Some(path) = args.json {
        let text = serde_json::to_string_pretty(&report).expect("the report serializes");
        if let Err(e) = std::fs::write(&path, text + "\n") {
            return fail(format!("writing {}: {e}", path.display()));
        }
    }
    if let Some(path) = args.plot {
        if let Err(e) = crate::bench::wan_plot(&report, &path) {
            return fail(e);
        }
    }
    ExitCode::SUCCESS
}
