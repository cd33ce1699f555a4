//! `ballot bench --swap`: protocol swaps under load.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use super::report::render;
use super::{percentile, start_ballot, Plan, Target, Workload};
use crate::client::Client;
use crate::server::CoreKind;

/// What `ballot bench --swap` measured: one protocol swap under load.
#[derive(Clone, Debug, Serialize)]
pub struct SwapPoint {
    /// `activate` (embedded 0.7.0 to protocol-next 0.8.0) or `rollback`.
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
    let system = start_ballot(&plan, CoreKind::Wasm, false).await?;
    #[allow(irrefutable_let_patterns)] // refutable with the etcd feature
    let Target::Ballot(replicas, _) = system.target.clone() else {
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
