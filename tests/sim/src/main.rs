//! `ballot-sim`: run many seeds of the deterministic simulator.
//!
//! ```text
//! cargo run --release -p ballot-sim -- --seeds 2000 --nodes 3,4,5,7
//! cargo run --release -p ballot-sim -- --seeds 2000 --nodes 3,4,5,7 --core wasm
//! cargo run --release -p ballot-sim -- --seeds 2000 --nodes 3,4,5,7 --ops 6 --fsync-crashes
//! cargo run --release -p ballot-sim -- --seeds 500 --nodes 3,5 --core upgrade
//! cargo run --release -p ballot-sim -- --seeds 500 --nodes 3,4,5 --reconfigure
//! cargo run --release -p ballot-sim -- --seeds 500 --nodes 3,5 --core upgrade --activate
//! cargo run --release -p ballot-sim -- --seeds 1000 --nodes 3,5 --leases
//! cargo run --release -p ballot-sim -- --seeds 500 --nodes 3,4,5 --replay --keys 6
//! cargo run --release -p ballot-sim -- --seed-start 1234 --seeds 1 --nodes 4 --history
//! ```

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ballot_sim::{run, CoreFactory, NativeFactory, Planted, SimConfig, SwapFactory, WasmFactory};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CoreArg {
    /// `ballot-core` compiled in.
    Native,
    /// The embedded protocol component, in wasmtime.
    Wasm,
    /// The embedded component and `protocol-next` side by side, each
    /// crash-restart switching a replica to the other (live upgrades).
    Upgrade,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PlantArg {
    /// Epoxy's per-proposer fast ballots (unsafe for n >= 4).
    Epoxy,
    /// Promises and acceptances sent before they are durable.
    EarlyVotes,
    /// A step that voted and learned on a key is kept in memory like a
    /// lone decision, never written.
    LazyVotes,
    /// With --reconfigure: voters change without the classic-only epoch and
    /// the sweep.
    UnsafeMembership,
    /// Learners reuse their classic ballots (review defect A; learners
    /// coordinate only with --reconfigure).
    BallotReuse,
    /// Query ids restart in every incarnation (review defect C).
    QueryIdReuse,
    /// With --core wasm: corrupt records that carry no checksum (formats 1 and 3).
    UncheckedCorruption,
    /// A command whose proposal went out is evaluated again (review defect
    /// B; seen through the deadline commands of the native core).
    Reevaluation,
    /// Peers take the votes of a replica that lost its data directory
    /// (review defect E; without --reconfigure, where directories are lost).
    LostDirectory,
    /// A membership epoch adopted while running is not durable, and a
    /// restart resumes the start-up membership (review defect D; needs
    /// --reconfigure).
    VolatileEpoch,
    /// The host's ready pipeline releases a ready that writes nothing at
    /// once, with every ready before it, durable or not.
    JumpingPipeline,
    /// With --activate: an activation goes ahead once a majority of the
    /// members is ready, whatever the others answered.
    QuorumReadiness,
    /// With --replay: a replica behind a peer's truncated changelog skips
    /// to what the peer still holds instead of replaying its snapshot.
    SkipSnapshot,
    /// With --replay: replicas never replay their peers' changelogs.
    NoReplay,
    /// With --reconfigure: the drivers publish the membership record with a
    /// plain write instead of a compare-and-swap.
    BlindPublish,
    /// With --reconfigure: a sweeping voter reads only the keys it holds
    /// state for itself, not every key a classic quorum of voters holds.
    SweepOwnKeys,
    /// A key's leader that lost its promise to a higher ballot moves above
    /// it and goes straight to phase 2, skipping phase 1.
    LeaderSkipsPrepare,
    /// The commands of a batch go back to the queue while the batch's
    /// proposal may still be chosen, so they can take effect twice.
    BatchRequeueExposed,
    /// With --leases: the reapers time leases on the replicas' wall clocks,
    /// which jump.
    WallClockReaper,
}

/// Runs the protocol under simulated faults and checks every history for
/// linearizability. Exits non-zero, with a replay command, on any violation.
#[derive(Parser, Debug)]
#[command(name = "ballot-sim", version)]
struct Args {
    /// Seeds to run for each cluster size.
    #[arg(long, default_value_t = 200)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    seed_start: u64,
    /// Cluster sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "3,4,5,7")]
    nodes: Vec<usize>,
    /// Which build of the protocol runs.
    #[arg(long, value_enum, default_value_t = CoreArg::Native)]
    core: CoreArg,
    /// Turn off message loss, duplication, delay, partitions and crashes.
    #[arg(long)]
    no_faults: bool,
    /// Run a deliberately broken protocol (to see the checker catch it).
    #[arg(long, value_enum)]
    planted: Option<PlantArg>,
    /// Clients per run (default: twice the cluster size).
    #[arg(long)]
    clients: Option<usize>,
    /// Operations per client (default 12, or 30 with --reconfigure).
    #[arg(long)]
    ops: Option<usize>,
    /// Hot keys the clients share.
    #[arg(long, default_value_t = 2)]
    keys: usize,
    /// Change the membership during each run: two replicas join, two of
    /// the original ones leave (ops per client default to 30).
    #[arg(long)]
    reconfigure: bool,
    /// Activate protocols during each run: the configuration and readiness
    /// records go through consensus, replicas swap their instance live
    /// (with --core upgrade, between the embedded component and
    /// protocol-next).
    #[arg(long)]
    activate: bool,
    /// Replay peers' changelogs (truncated to a few entries, so snapshots
    /// are common), and check that every member converges once the clients
    /// are done and the network heals.
    #[arg(long)]
    replay: bool,
    /// Lock holders take turns at a lock key with leases, and every
    /// replica runs the lease reaper; no two holders may hold the lock at
    /// once.
    #[arg(long)]
    leases: bool,
    /// Check, every 100-300 ms, that a listing through any replica would
    /// find every key a write was acknowledged for (no classic quorum of
    /// the voters that could answer lacks it).
    #[arg(long)]
    listing: bool,
    /// Crash replicas in the middle of their writes ten times as often
    /// (after the write's early effects left, before it is durable).
    #[arg(long)]
    fsync_crashes: bool,
    /// Print each run's history.
    #[arg(long)]
    history: bool,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.nodes.iter().any(|&n| n == 0 || n > 64) || args.keys == 0 || args.jobs == 0 {
        eprintln!("ballot-sim: --nodes must be 1 to 64, --keys and --jobs at least 1");
        return ExitCode::from(2);
    }
    let unsafe_membership = args.planted == Some(PlantArg::UnsafeMembership);
    if unsafe_membership && !args.reconfigure {
        eprintln!("ballot-sim: --planted unsafe-membership needs --reconfigure");
        return ExitCode::from(2);
    }
    let unchecked_corruption = args.planted == Some(PlantArg::UncheckedCorruption);
    let unchecked_identity = args.planted == Some(PlantArg::LostDirectory);
    let volatile_epoch = args.planted == Some(PlantArg::VolatileEpoch);
    let jumping_pipeline = args.planted == Some(PlantArg::JumpingPipeline);
    let quorum_readiness = args.planted == Some(PlantArg::QuorumReadiness);
    let skip_snapshot = args.planted == Some(PlantArg::SkipSnapshot);
    let no_replay = args.planted == Some(PlantArg::NoReplay);
    let blind_publish = args.planted == Some(PlantArg::BlindPublish);
    let sweep_own_keys = args.planted == Some(PlantArg::SweepOwnKeys);
    let wall_clock_reaper = args.planted == Some(PlantArg::WallClockReaper);
    if wall_clock_reaper && !args.leases {
        eprintln!("ballot-sim: --planted wall-clock-reaper needs --leases");
        return ExitCode::from(2);
    }
    if (blind_publish || sweep_own_keys) && !args.reconfigure {
        eprintln!("ballot-sim: --planted blind-publish and sweep-own-keys need --reconfigure");
        return ExitCode::from(2);
    }
    if (skip_snapshot || no_replay) && !args.replay {
        eprintln!("ballot-sim: --planted skip-snapshot and no-replay need --replay");
        return ExitCode::from(2);
    }
    if quorum_readiness && !args.activate {
        eprintln!("ballot-sim: --planted quorum-readiness needs --activate");
        return ExitCode::from(2);
    }
    if volatile_epoch && !args.reconfigure {
        eprintln!("ballot-sim: --planted volatile-epoch needs --reconfigure");
        return ExitCode::from(2);
    }
    // These plant the bug in the simulated host, not in the core.
    let planted_core = if unsafe_membership
        || unchecked_corruption
        || unchecked_identity
        || volatile_epoch
        || jumping_pipeline
        || quorum_readiness
        || skip_snapshot
        || no_replay
        || blind_publish
        || sweep_own_keys
        || wall_clock_reaper
    {
        None
    } else {
        args.planted
    };
    let factory: Box<dyn CoreFactory + Sync> = match args.core {
        CoreArg::Native => Box::new(NativeFactory(planted_core.map(|p| match p {
            PlantArg::Epoxy => Planted::EpoxyFastPath,
            PlantArg::EarlyVotes => Planted::EarlyVotes,
            PlantArg::LazyVotes => Planted::LazyVotes,
            PlantArg::BallotReuse => Planted::BallotReuse,
            PlantArg::QueryIdReuse => Planted::QueryIdReuse,
            PlantArg::Reevaluation => Planted::Reevaluation,
            PlantArg::LeaderSkipsPrepare => Planted::LeaderSkipsPrepare,
            PlantArg::BatchRequeueExposed => Planted::BatchRequeueExposed,
            PlantArg::UnsafeMembership
            | PlantArg::UncheckedCorruption
            | PlantArg::LostDirectory
            | PlantArg::VolatileEpoch
            | PlantArg::JumpingPipeline
            | PlantArg::QuorumReadiness
            | PlantArg::SkipSnapshot
            | PlantArg::NoReplay
            | PlantArg::BlindPublish
            | PlantArg::SweepOwnKeys
            | PlantArg::WallClockReaper => unreachable!("handled before"),
        }))),
        CoreArg::Upgrade => {
            if planted_core.is_some() {
                eprintln!("ballot-sim: --planted needs --core native");
                return ExitCode::from(2);
            }
            match SwapFactory::embedded() {
                Ok(f) => Box::new(f),
                Err(e) => {
                    eprintln!("ballot-sim: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        CoreArg::Wasm => {
            if planted_core.is_some() {
                eprintln!("ballot-sim: --planted needs --core native");
                return ExitCode::from(2);
            }
            match ballot_runtime::Runtime::new() {
                Ok(rt) => Box::new(WasmFactory(rt)),
                Err(e) => {
                    eprintln!("ballot-sim: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let mut passed = 0u64;
    let mut failed = Vec::new();
    for &n in &args.nodes {
        let next = AtomicU64::new(args.seed_start);
        let results = Mutex::new(Vec::new());
        let end = args.seed_start + args.seeds;
        std::thread::scope(|s| {
            for _ in 0..args.jobs {
                s.spawn(|| loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end {
                        break;
                    }
                    let mut cfg = if args.reconfigure {
                        SimConfig::reconfiguring(seed, n)
                    } else {
                        SimConfig::new(seed, n)
                    };
                    cfg.faults = !args.no_faults;
                    cfg.unsafe_membership = unsafe_membership;
                    cfg.unchecked_corruption = unchecked_corruption;
                    cfg.unchecked_identity = unchecked_identity;
                    cfg.volatile_epoch = volatile_epoch;
                    cfg.jumping_pipeline = jumping_pipeline;
                    cfg.activations = args.activate;
                    cfg.planted_quorum_readiness = quorum_readiness;
                    cfg.replay = args.replay;
                    // A corrupted record blocks the replay of its page for
                    // good (design section 12): replay runs corrupt none,
                    // so that every one of them is checked.
                    cfg.corrupt &= !args.replay;
                    cfg.planted_replay_skips_snapshot = skip_snapshot;
                    cfg.planted_no_replay = no_replay;
                    cfg.planted_blind_publish = blind_publish;
                    cfg.planted_sweep_own_keys = sweep_own_keys;
                    cfg.leases = args.leases;
                    cfg.listing = args.listing;
                    cfg.fsync_crashes = args.fsync_crashes;
                    cfg.planted_wall_clock_reaper = wall_clock_reaper;
                    cfg.clients = args.clients.unwrap_or(2 * n);
                    if let Some(ops) = args.ops {
                        cfg.ops_per_client = ops;
                    }
                    cfg.keys = args.keys;
                    let report = run(cfg, factory.as_ref());
                    results.lock().unwrap().push((seed, report));
                });
            }
        });
        let mut results = results.into_inner().unwrap();
        results.sort_by_key(|(seed, _)| *seed);
        let (mut ops, mut steps, mut msgs) = (0, 0, 0);
        let (mut not_done, mut wait_max) = (0, 0);
        let mut faults = ballot_sim::Stats::default();
        for (seed, report) in results {
            ops += report.stats.ops_done + report.stats.ops_failed + report.stats.ops_unknown;
            not_done += report.stats.ops_failed + report.stats.ops_unknown;
            wait_max = wait_max.max(report.stats.wait_max_ms);
            steps += report.stats.steps;
            msgs += report.stats.messages;
            faults.crashes += report.stats.crashes;
            faults.cluster_crashes += report.stats.cluster_crashes;
            faults.partitions += report.stats.partitions;
            faults.clock_jumps += report.stats.clock_jumps;
            faults.corruptions += report.stats.corruptions;
            faults.stage_crashes += report.stats.stage_crashes;
            faults.wipes += report.stats.wipes;
            faults.refused += report.stats.refused;
            faults.refused_admissions += report.stats.refused_admissions;
            faults.removed_down += report.stats.removed_down;
            faults.lagging_restarts += report.stats.lagging_restarts;
            faults.activations += report.stats.activations;
            faults.activations_gone += report.stats.activations_gone;
            faults.activations_refused += report.stats.activations_refused;
            faults.activations_failed += report.stats.activations_failed;
            faults.activations_lost += report.stats.activations_lost;
            faults.activations_noop += report.stats.activations_noop;
            faults.swaps += report.stats.swaps;
            faults.drain_timeouts += report.stats.drain_timeouts;
            faults.snapshots += report.stats.snapshots;
            faults.truncations += report.stats.truncations;
            faults.replay_reads += report.stats.replay_reads;
            faults.continues += report.stats.continues;
            faults.forwards += report.stats.forwards;
            faults.forward_replies += report.stats.forward_replies;
            faults.batched += report.stats.batched;
            faults.convergence_unchecked += report.stats.convergence_unchecked;
            faults.lock_acquired += report.stats.lock_acquired;
            faults.lease_expiries += report.stats.lease_expiries;
            faults.lock_gave_up += report.stats.lock_gave_up;
            if args.history {
                println!("seed {seed} n={n}: {:?}", report.stats);
                for r in &report.history {
                    println!("  {r:?}");
                }
            }
            if report.violations.is_empty() {
                passed += 1;
            } else {
                let core = format!("{:?}", args.core).to_lowercase();
                let mut replay = format!(
                    "cargo run --release -p ballot-sim -- --seed-start {seed} --seeds 1 --nodes {n} --core {core} --keys {}",
                    args.keys
                );
                if let Some(ops) = args.ops {
                    replay.push_str(&format!(" --ops {ops}"));
                }
                if args.reconfigure {
                    replay.push_str(" --reconfigure");
                }
                if args.activate {
                    replay.push_str(" --activate");
                }
                if args.replay {
                    replay.push_str(" --replay");
                }
                if args.leases {
                    replay.push_str(" --leases");
                }
                if args.listing {
                    replay.push_str(" --listing");
                }
                if let Some(c) = args.clients {
                    replay.push_str(&format!(" --clients {c}"));
                }
                if args.no_faults {
                    replay.push_str(" --no-faults");
                }
                if let Some(p) = args.planted.and_then(|p| p.to_possible_value()) {
                    replay.push_str(&format!(" --planted {}", p.get_name()));
                }
                eprintln!("FAILED seed {seed} n={n}:");
                for v in report.violations.iter().take(3) {
                    eprintln!("  {v}");
                }
                eprintln!("  replay: {replay}");
                failed.push((seed, n));
            }
        }
        eprintln!(
            "n={n}: {} seeds, {ops} client ops ({:.1} % failed or lost), longest wait {wait_max} ms, {steps} steps, {msgs} messages",
            args.seeds,
            100.0 * not_done as f64 / ops.max(1) as f64,
        );
        eprintln!(
            "n={n}: faults: {} crashes ({} of the whole cluster, {} at membership stages), {} partitions, {} clock jumps, {} corrupted records, {} lost data directories ({} refused at admission, {} of their messages refused), {} replicas removed while down, {} restarts on an older epoch",
            faults.crashes, faults.cluster_crashes, faults.stage_crashes, faults.partitions, faults.clock_jumps, faults.corruptions, faults.wipes, faults.refused_admissions, faults.refused, faults.removed_down, faults.lagging_restarts
        );
        eprintln!(
            "n={n}: leader mode: {} phase-2-only requests, {} forwarded commands sent, {} answered; {} requests carried batches",
            faults.continues, faults.forwards, faults.forward_replies, faults.batched
        );
        if args.activate {
            eprintln!(
                "n={n}: activations: {} started, {} went ahead, {} refused, {} failed, {} lost with their replica, {} with nothing to do; {} live swaps ({} at the drain deadline)",
                faults.activations, faults.activations_gone, faults.activations_refused, faults.activations_failed, faults.activations_lost, faults.activations_noop, faults.swaps, faults.drain_timeouts
            );
        }
        if args.replay {
            eprintln!(
                "n={n}: replay: {} keys read from peers' changelogs, {} snapshots replayed, {} truncations; convergence not checked in {} runs with a corrupted record",
                faults.replay_reads, faults.snapshots, faults.truncations, faults.convergence_unchecked
            );
        }
        if args.leases {
            eprintln!(
                "n={n}: leases: the lock taken {} times, {} leases expired, {} holders gave up (the lock unreadable, or a lease kept by a corrupted record)",
                faults.lock_acquired, faults.lease_expiries, faults.lock_gave_up
            );
        }
    }
    println!("{passed} passed, {} failed", failed.len());
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
