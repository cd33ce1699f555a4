//! The schedule that breaks Epoxy's fast path, message by message.
//!
//! n = 4 or 5 replicas. Replica 1 proposes `a` and replica 2 proposes `b` for
//! the same fresh key, both skipping prepare. `a` reaches replicas 3..=n
//! first; then `b` reaches them too. With per-proposer fast ballots ((1, 1)
//! and (1, 2)), replicas 3..=n accept both, so each proposer holds Epoxy's
//! fast quorum (n - (n/2)/2: 3 of 4, 4 of 5) and two values are chosen for
//! version 1. With Ballot's shared fast round, replicas 3..=n refuse `b`
//! (they already accepted a fast value), replica 2 recovers in a classic
//! round, finds `a`, and writes `b` at version 2.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ballot_core::register::Command;
use ballot_core::{
    Batch, Config, Inbound, KeyState, Operation, Outcome, RegisterEnv, Replica, Request, Timer,
};
use ballot_sim::check::{self, Input, Output};

struct Cluster {
    nodes: Vec<Replica<RegisterEnv>>,
    states: Vec<BTreeMap<Vec<u8>, Vec<u8>>>,
    /// (from, to, key, payload), oldest first.
    pool: VecDeque<(u32, u32, Vec<u8>, Vec<u8>)>,
    timers: Vec<(u32, Timer)>,
    now_ms: u64,
    clock: u64,
    done: BTreeMap<u64, (Outcome, u64)>,
}

impl Cluster {
    fn new(n: u32, planted: bool) -> Cluster {
        let voters: Vec<u32> = (1..=n).collect();
        let nodes = voters
            .iter()
            .map(|&id| {
                let mut r = Replica::new(Config::new(id, 1, voters.clone()), RegisterEnv).unwrap();
                if planted {
                    r.plant_epoxy_fast_path();
                }
                r
            })
            .collect();
        Cluster {
            nodes,
            states: vec![BTreeMap::new(); n as usize],
            pool: VecDeque::new(),
            timers: Vec::new(),
            now_ms: 0,
            clock: 0,
            done: BTreeMap::new(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn step(&mut self, id: u32, mut batch: Batch) {
        let i = id as usize - 1;
        let mut keys = BTreeSet::new();
        keys.extend(batch.requests.iter().map(|r| r.key.clone()));
        keys.extend(batch.messages.iter().map(|m| m.key.clone()));
        keys.extend(batch.timers.iter().map(|t| t.key.clone()));
        batch.states = keys
            .into_iter()
            .map(|key| KeyState {
                state: self.states[i].get(&key).cloned().unwrap_or_default(),
                key,
            })
            .collect();
        batch.now_ms = self.now_ms;
        let ready = self.nodes[i].step(batch);
        // The disk here is synchronous: early effects, then the rest.
        let early = ready.early;
        for w in ready.persist {
            self.states[i].insert(w.key, w.state);
        }
        let rest = self.nodes[i].release(ready.id);
        for actions in [early, rest] {
            for s in actions.send {
                self.pool.push_back((id, s.to, s.key, s.payload));
            }
            self.timers
                .extend(actions.timers.into_iter().map(|t| (id, t)));
            for c in actions.complete {
                let t = self.tick();
                self.done.insert(c.id, (c.outcome, t));
            }
        }
    }

    fn put(&mut self, node: u32, request: u64, value: &str) -> u64 {
        let call = self.tick();
        let op = Operation::Command(Command::Put(value.as_bytes().to_vec()).encode());
        let batch = Batch {
            requests: vec![Request {
                id: request,
                key: b"k".to_vec(),
                op,
            }],
            ..Batch::default()
        };
        self.step(node, batch);
        call
    }

    /// Delivers every message in flight from `from` to `to`.
    fn deliver(&mut self, from: u32, to: u32) {
        let (matching, rest): (VecDeque<_>, VecDeque<_>) = self
            .pool
            .drain(..)
            .partition(|(f, t, _, _)| *f == from && *t == to);
        self.pool = rest;
        assert!(!matching.is_empty(), "no message from {from} to {to}");
        for (f, t, key, payload) in matching {
            self.step(
                t,
                Batch {
                    messages: vec![Inbound {
                        from: f,
                        key,
                        payload,
                    }],
                    ..Batch::default()
                },
            );
        }
    }

    /// Delivers everything in order and fires timers until nothing is left.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            if let Some((f, t, key, payload)) = self.pool.pop_front() {
                self.step(
                    t,
                    Batch {
                        messages: vec![Inbound {
                            from: f,
                            key,
                            payload,
                        }],
                        ..Batch::default()
                    },
                );
            } else if let Some(pos) = (0..self.timers.len()).min_by_key(|&p| self.timers[p].1.at_ms)
            {
                let (node, timer) = self.timers.remove(pos);
                self.now_ms = self.now_ms.max(timer.at_ms);
                self.step(
                    node,
                    Batch {
                        timers: vec![timer],
                        ..Batch::default()
                    },
                );
            } else {
                return;
            }
        }
        panic!("the cluster did not settle");
    }
}

/// Runs the schedule; returns the two puts as the checker sees them.
fn schedule(n: u32, planted: bool) -> Vec<check::Op> {
    let mut c = Cluster::new(n, planted);
    let call_a = c.put(1, 1, "a");
    let call_b = c.put(2, 2, "b");
    for other in 3..=n {
        c.deliver(1, other);
    }
    for other in 3..=n {
        c.deliver(other, 1);
    }
    for other in 3..=n {
        c.deliver(2, other);
    }
    for other in 3..=n {
        c.deliver(other, 2);
    }
    c.settle();
    [(1, call_a, "a"), (2, call_b, "b")]
        .into_iter()
        .map(|(id, call, v)| {
            let (outcome, ret) = c.done.get(&id).cloned().expect("every put completes");
            let output = match outcome {
                Outcome::Done(cur) => Output::Done(cur.value, cur.version),
                other => panic!("unexpected outcome {other:?}"),
            };
            check::Op {
                input: Input::Put(v.as_bytes().to_vec()),
                output,
                call,
                ret: Some(ret),
            }
        })
        .collect()
}

#[test]
fn epoxy_fast_path_chooses_two_values_and_the_checker_says_so() {
    for n in [4, 5] {
        let ops = schedule(n, true);
        assert_eq!(ops[0].output, Output::Done(Some(b"a".to_vec()), 1), "n={n}");
        assert_eq!(ops[1].output, Output::Done(Some(b"b".to_vec()), 1), "n={n}");
        assert!(check::check(&ops).is_err(), "n={n}");
    }
}

#[test]
fn ballot_is_safe_in_the_same_schedule() {
    for n in [4, 5] {
        let ops = schedule(n, false);
        assert_eq!(ops[0].output, Output::Done(Some(b"a".to_vec()), 1), "n={n}");
        assert_eq!(ops[1].output, Output::Done(Some(b"b".to_vec()), 2), "n={n}");
        check::check(&ops).unwrap();
    }
}
