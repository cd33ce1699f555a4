//! What one write costs in the protocol, as the embedded component in
//! wasmtime and compiled in: a lone replica (its own quorum) creates fresh
//! keys, one `step` and one `release` each, so the figures are the guest
//! and the boundary with no network, disk or threads around them.
//!
//! `cargo bench -p ballot-runtime --bench step_cost [-- OPS] [--cold]`
//! prints the best of three rounds: microseconds per write for each build,
//! their ratio, and the cost of a `step` with nothing in it (the boundary
//! alone). `--cold` runs each call on cold caches, as a replica's calls
//! are when other processes run between them (one client's writes): it
//! writes to 16 MiB of memory before each call and does not time that.

use std::time::{Duration, Instant};

use ballot_core as core;

fn create(i: u64, command: &[u8]) -> core::Batch {
    let key = format!("bench/create/{i:08}").into_bytes();
    core::Batch {
        now_ms: 1 + i,
        seed: i,
        states: vec![core::KeyState {
            key: key.clone(),
            state: Vec::new(),
        }],
        requests: vec![core::Request {
            id: i + 1,
            key,
            op: core::Operation::Command(command.to_vec()),
        }],
        ..Default::default()
    }
}

fn answered(ready: &core::Ready, released: &core::Actions) -> bool {
    ready.early.complete.len() + released.complete.len() == 1
}

/// Evicts the caches (and the TLB) when `cold`; returns how long it took.
fn evict(cold: bool, buf: &mut [u8]) -> Duration {
    if !cold {
        return Duration::ZERO;
    }
    let started = Instant::now();
    for i in (0..buf.len()).step_by(64) {
        buf[i] = buf[i].wrapping_add(1);
    }
    std::hint::black_box(&buf);
    started.elapsed()
}

fn per_op(elapsed: Duration, ops: u64) -> f64 {
    elapsed.as_secs_f64() * 1e6 / ops as f64
}

fn main() {
    let ops: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let cold = std::env::args().any(|a| a == "--cold");
    let mut buf = vec![0u8; if cold { 16 << 20 } else { 0 }];
    let command = core::register::Command::Create(vec![7u8; 100]).encode();
    let runtime = ballot_runtime::Runtime::new().expect("the embedded components compile");
    let config = || core::Config::new(1, 1, vec![1]);
    let (mut wasm, mut native, mut empty) = (f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..3 {
        let mut core = runtime.replica(config()).expect("instantiates");
        let (started, mut evicting) = (Instant::now(), Duration::ZERO);
        for i in 0..ops {
            evicting += evict(cold, &mut buf);
            let ready = core.try_step(create(i, &command)).expect("steps");
            evicting += evict(cold, &mut buf);
            let released = core.try_release(ready.id).expect("releases");
            assert!(answered(&ready, &released), "write {i} was not answered");
        }
        wasm = wasm.min(per_op(started.elapsed() - evicting, ops));
        let (started, mut evicting) = (Instant::now(), Duration::ZERO);
        for i in 0..ops {
            let batch = core::Batch {
                now_ms: ops + 1,
                seed: i,
                ..Default::default()
            };
            evicting += evict(cold, &mut buf);
            core.try_step(batch).expect("steps");
        }
        empty = empty.min(per_op(started.elapsed() - evicting, ops));
        let mut replica =
            core::Replica::new(config(), core::RegisterEnv).expect("a valid configuration");
        let (started, mut evicting) = (Instant::now(), Duration::ZERO);
        for i in 0..ops {
            evicting += evict(cold, &mut buf);
            let ready = replica.step(create(i, &command));
            evicting += evict(cold, &mut buf);
            let released = replica.release(ready.id);
            assert!(answered(&ready, &released), "write {i} was not answered");
        }
        native = native.min(per_op(started.elapsed() - evicting, ops));
    }
    let caches = if cold { "cold" } else { "warm" };
    println!("{ops} creates at a lone replica, {caches} caches, best of 3 rounds:");
    println!("  wasm    {wasm:7.2} us per write (step + release)");
    println!("  native  {native:7.2} us per write");
    println!("  wasm / native time {:.2}", wasm / native);
    println!("  an empty wasm step {empty:7.2} us");
}
