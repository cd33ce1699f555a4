//! What one write costs in the protocol, as the embedded component in
//! wasmtime and compiled in: a lone replica (its own quorum) creates fresh
//! keys, one `step` and one `release` each, so the figures are the guest
//! and the boundary with no network, disk or threads around them.
//!
//! It then does the same at three replicas in one thread: each create
//! goes in at replica 1, and every message goes straight to its replica's
//! next step, released at once (the protocol's whole work for a write,
//! every replica's share summed, with no network, disk or threads).
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

/// A replica in either build.
enum Member {
    Wasm(ballot_runtime::WasmCore),
    Native(core::Replica<core::RegisterEnv>),
}

impl Member {
    fn step(&mut self, batch: core::Batch) -> core::Ready {
        match self {
            Member::Wasm(c) => c.try_step(batch).expect("steps"),
            Member::Native(r) => r.step(batch),
        }
    }

    fn release(&mut self, id: u64) -> core::Actions {
        match self {
            Member::Wasm(c) => c.try_release(id).expect("releases"),
            Member::Native(r) => r.release(id),
        }
    }
}

/// Runs `ops` creates through three replicas, each message delivered at
/// once; returns the time per write.
fn three(members: &mut [Member; 3], ops: u64, command: &[u8]) -> f64 {
    use std::collections::{HashMap, VecDeque};
    let mut states: [HashMap<Vec<u8>, Vec<u8>>; 3] = Default::default();
    let started = Instant::now();
    for i in 0..ops {
        let mut batch = create(i, command);
        let key = batch.states[0].key.clone();
        let mut inbox: VecDeque<(usize, core::Inbound)> = VecDeque::new();
        let mut done = false;
        let mut at = 0;
        loop {
            batch.now_ms = 1 + i;
            let ready = members[at].step(batch);
            for w in &ready.persist {
                states[at].insert(w.key.clone(), w.state.clone());
            }
            let released = members[at].release(ready.id);
            for actions in [ready.early, released] {
                done |= !actions.complete.is_empty() && at == 0;
                for out in actions.send {
                    let to = out.to as usize - 1;
                    let message = core::Inbound {
                        from: at as u32 + 1,
                        key: out.key,
                        payload: out.payload,
                    };
                    inbox.push_back((to, message));
                }
            }
            let Some((to, message)) = inbox.pop_front() else {
                break;
            };
            at = to;
            let state = states[at].get(&key).cloned().unwrap_or_default();
            batch = core::Batch {
                now_ms: 1 + i,
                seed: i,
                states: vec![core::KeyState {
                    key: key.clone(),
                    state,
                }],
                messages: vec![message],
                ..Default::default()
            };
        }
        assert!(done, "write {i} was not answered");
    }
    per_op(started.elapsed(), ops)
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
    let voters = || core::Config::new(1, 1, vec![1, 2, 3]);
    let (mut wasm3, mut native3) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let at = |id| core::Config {
            self_id: id,
            ..voters()
        };
        let mut cluster =
            [1, 2, 3].map(|id| Member::Wasm(runtime.replica(at(id)).expect("instantiates")));
        wasm3 = wasm3.min(three(&mut cluster, ops / 4, &command));
        let mut cluster = [1, 2, 3].map(|id| {
            Member::Native(
                core::Replica::new(at(id), core::RegisterEnv).expect("a valid configuration"),
            )
        });
        native3 = native3.min(three(&mut cluster, ops / 4, &command));
    }
    let caches = if cold { "cold" } else { "warm" };
    println!("{ops} creates at a lone replica, {caches} caches, best of 3 rounds:");
    println!("  wasm    {wasm:7.2} us per write (step + release)");
    println!("  native  {native:7.2} us per write");
    println!("  wasm / native time {:.2}", wasm / native);
    println!("  an empty wasm step {empty:7.2} us");
    println!(
        "{} creates at three replicas, warm caches, best of 3 rounds:",
        ops / 4
    );
    println!("  wasm    {wasm3:7.2} us per write, every replica's steps summed");
    println!("  native  {native3:7.2} us per write");
    println!("  wasm / native time {:.2}", wasm3 / native3);
}
