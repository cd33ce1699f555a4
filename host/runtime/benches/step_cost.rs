//! What one write costs in the protocol, as the embedded component in
//! wasmtime and compiled in: a lone replica (its own quorum) creates fresh
//! keys, one `step` and one `release` each, so the figures are the guest
//! and the boundary with no network, disk or threads around them.
//!
//! `cargo bench -p ballot-runtime --bench step_cost [-- OPS]` prints the
//! best of three rounds: microseconds per write for each build, their
//! ratio, and the cost of a `step` with nothing in it (the boundary alone).

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

fn per_op(elapsed: Duration, ops: u64) -> f64 {
    elapsed.as_secs_f64() * 1e6 / ops as f64
}

fn main() {
    let ops: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let command = core::register::Command::Create(vec![7u8; 100]).encode();
    let runtime = ballot_runtime::Runtime::new().expect("the embedded components compile");
    let config = || core::Config::new(1, 1, vec![1]);
    let (mut wasm, mut native, mut empty) = (f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..3 {
        let mut core = runtime.replica(config()).expect("instantiates");
        let started = Instant::now();
        for i in 0..ops {
            let ready = core.try_step(create(i, &command)).expect("steps");
            let released = core.try_release(ready.id).expect("releases");
            assert!(answered(&ready, &released), "write {i} was not answered");
        }
        wasm = wasm.min(per_op(started.elapsed(), ops));
        let started = Instant::now();
        for i in 0..ops {
            let batch = core::Batch {
                now_ms: ops + 1,
                seed: i,
                ..Default::default()
            };
            core.try_step(batch).expect("steps");
        }
        empty = empty.min(per_op(started.elapsed(), ops));
        let mut replica =
            core::Replica::new(config(), core::RegisterEnv).expect("a valid configuration");
        let started = Instant::now();
        for i in 0..ops {
            let ready = replica.step(create(i, &command));
            let released = replica.release(ready.id);
            assert!(answered(&ready, &released), "write {i} was not answered");
        }
        native = native.min(per_op(started.elapsed(), ops));
    }
    println!("{ops} creates at a lone replica, best of 3 rounds:");
    println!("  wasm    {wasm:7.2} us per write (step + release)");
    println!("  native  {native:7.2} us per write");
    println!("  wasm / native time {:.2}", wasm / native);
    println!("  an empty wasm step {empty:7.2} us");
}
