//! Schedules that once broke the protocol, replayed message by message.
//!
//! Each test drives real `Replica`s through one interleaving found in review
//! (docs/design.md, section 3, "Uniqueness and exposure") and states the
//! property it broke. The network is a pool the test delivers from, drops
//! from or holds back; disks are synchronous (a step's writes are durable
//! before its effects leave); a restart keeps a replica's disk and loses
//! everything else.

use std::collections::BTreeMap;

use ballot_core::register::{self, Command};
use ballot_core::wire::{KeyState as Stored, Msg};
use ballot_core::{
    Batch, Change, Config, Consistency, Current, Env, Inbound, KeyState, Members, Operation,
    Outcome, Rejection, Replica, ReplicaId, Request, Timer,
};

const KEY: &[u8] = b"k";

/// The register policy plus one clock-dependent command, `renew`: it holds
/// while `now < LEASE_END_MS` and is refused afterwards (a lease renewal, as
/// `examples/reservation` has).
#[derive(Clone, Copy, Default)]
struct LeaseEnv;

const LEASE_END_MS: u64 = 1000;
const RENEW: &[u8] = b"renew";

impl Env for LeaseEnv {
    fn apply(
        &mut self,
        _key: &[u8],
        current: &Current,
        command: &[u8],
        now_ms: u64,
    ) -> Result<Change, Rejection> {
        if command == RENEW {
            if now_ms < LEASE_END_MS {
                return Ok(Change::Set(b"renewed".to_vec()));
            }
            return Err(Rejection {
                code: "expired".into(),
                message: "the lease ended".into(),
            });
        }
        register::apply(current, command)
    }
}

struct Node {
    replica: Replica<LeaseEnv>,
    disk: BTreeMap<Vec<u8>, Vec<u8>>,
    timers: Vec<Timer>,
    config: Config,
    members: Members,
}

/// Puts a bug back into every replica of a schedule (or nothing).
type Plant = fn(&mut Replica<LeaseEnv>);

fn healthy(_: &mut Replica<LeaseEnv>) {}

struct Net {
    plant: Plant,
    nodes: BTreeMap<ReplicaId, Node>,
    /// (from, to, payload), oldest first; every message is about KEY.
    pool: Vec<(ReplicaId, ReplicaId, Vec<u8>)>,
    now_ms: u64,
    /// Outcome of each request id, in completion order.
    done: Vec<(u64, Outcome)>,
}

fn kind(payload: &[u8]) -> &'static str {
    match Msg::decode_any(payload)
        .expect("the core sends decodable messages")
        .1
    {
        Msg::Prepare { .. } => "Prepare",
        Msg::Promise { .. } => "Promise",
        Msg::Accept { .. } => "Accept",
        Msg::Accepted { .. } => "Accepted",
        Msg::Nack { .. } => "Nack",
        Msg::Stale { .. } => "Stale",
        Msg::Behind { .. } => "Behind",
        Msg::Learn { .. } => "Learn",
        Msg::Query { .. } => "Query",
        Msg::QueryReply { .. } => "QueryReply",
        Msg::Continue { .. } => "Continue",
        Msg::Forward { .. } => "Forward",
        Msg::Forwarded { .. } => "Forwarded",
    }
}

impl Net {
    /// Replicas `ids`, all voters of `voters` in epoch 1 (others observe).
    fn new(ids: &[ReplicaId], voters: &[ReplicaId], plant: Plant) -> Net {
        let mut nodes = BTreeMap::new();
        for &id in ids {
            let config = Config::new(id, 1, voters.to_vec());
            let mut replica = Replica::new(config.clone(), LeaseEnv).unwrap();
            plant(&mut replica);
            let members = replica.members().clone();
            nodes.insert(
                id,
                Node {
                    replica,
                    disk: BTreeMap::new(),
                    timers: Vec::new(),
                    config,
                    members,
                },
            );
        }
        Net {
            plant,
            nodes,
            pool: Vec::new(),
            now_ms: 0,
            done: Vec::new(),
        }
    }

    /// Voters 1, 2 and 3 and learner 4, in epoch 2 (the fast round on or off).
    fn with_learner(plant: Plant, fast: bool) -> Net {
        let mut net = Net::new(&[1, 2, 3, 4], &[1, 2, 3], plant);
        net.reconfigure(&Members {
            epoch: 2,
            voters: vec![1, 2, 3],
            learners: vec![4],
            fast,
        });
        net
    }

    fn step(&mut self, id: ReplicaId, mut batch: Batch) {
        let node = self.nodes.get_mut(&id).unwrap();
        batch.now_ms = self.now_ms;
        batch.states = vec![KeyState {
            key: KEY.to_vec(),
            state: node.disk.get(KEY).cloned().unwrap_or_default(),
        }];
        let ready = node.replica.step(batch);
        let early = ready.early;
        for w in ready.persist {
            node.disk.insert(w.key, w.state);
        }
        let rest = node.replica.release(ready.id);
        for actions in [early, rest] {
            for s in actions.send {
                self.pool.push((id, s.to, s.payload));
            }
            node.timers.extend(actions.timers);
            for c in actions.complete {
                self.done.push((c.id, c.outcome));
            }
        }
    }

    fn request(&mut self, node: ReplicaId, id: u64, op: Operation) {
        let batch = Batch {
            requests: vec![Request {
                id,
                key: KEY.to_vec(),
                op,
            }],
            ..Batch::default()
        };
        self.step(node, batch);
    }

    fn command(&mut self, node: ReplicaId, id: u64, command: Vec<u8>) {
        self.request(node, id, Operation::Command(command));
    }

    fn put(&mut self, node: ReplicaId, id: u64, value: &str) {
        self.command(node, id, Command::Put(value.as_bytes().to_vec()).encode());
    }

    fn read(&mut self, node: ReplicaId, id: u64) {
        self.request(node, id, Operation::Read(Consistency::Linearizable));
    }

    fn take(
        &mut self,
        pred: impl Fn(ReplicaId, ReplicaId, &[u8]) -> bool,
    ) -> Vec<(ReplicaId, ReplicaId, Vec<u8>)> {
        let (hit, rest) = std::mem::take(&mut self.pool)
            .into_iter()
            .partition(|(f, t, p)| pred(*f, *t, p));
        self.pool = rest;
        hit
    }

    /// Delivers every `kind` message in flight from `from` to `to`.
    fn deliver(&mut self, from: ReplicaId, to: ReplicaId, what: &str) {
        let hit = self.take(|f, t, p| f == from && t == to && kind(p) == what);
        assert!(!hit.is_empty(), "no {what} in flight from {from} to {to}");
        for (f, t, payload) in hit {
            self.inbound(f, t, payload);
        }
    }

    fn inbound(&mut self, from: ReplicaId, to: ReplicaId, payload: Vec<u8>) {
        let messages = vec![Inbound {
            from,
            key: KEY.to_vec(),
            payload,
        }];
        self.step(
            to,
            Batch {
                messages,
                ..Batch::default()
            },
        );
    }

    /// Steps `node` and lets only the step's early actions out: the replica
    /// crashes before the step's writes are durable (they are lost, with
    /// everything released after them) and restarts at `incarnation`.
    fn crash_during_fsync(&mut self, id: ReplicaId, mut batch: Batch, incarnation: u64) {
        let node = self.nodes.get_mut(&id).unwrap();
        batch.now_ms = self.now_ms;
        batch.states = vec![KeyState {
            key: KEY.to_vec(),
            state: node.disk.get(KEY).cloned().unwrap_or_default(),
        }];
        let ready = node.replica.step(batch);
        for s in ready.early.send {
            self.pool.push((id, s.to, s.payload));
        }
        for c in ready.early.complete {
            self.done.push((c.id, c.outcome));
        }
        self.restart(id, incarnation);
    }

    /// Delivers every `kind` message in flight from `from` to `to`, if any.
    /// Copies of the payloads in flight that `pred` matches.
    fn clone_pool(&self, pred: impl Fn(ReplicaId, ReplicaId, &str) -> bool) -> Vec<Vec<u8>> {
        self.pool
            .iter()
            .filter(|(f, t, p)| pred(*f, *t, kind(p)))
            .map(|(_, _, p)| p.clone())
            .collect()
    }

    fn deliver_any(&mut self, from: ReplicaId, to: ReplicaId, what: &str) {
        let hit = self.take(|f, t, p| f == from && t == to && kind(p) == what);
        for (f, t, payload) in hit {
            self.inbound(f, t, payload);
        }
    }

    /// Loses every message in flight that `pred` matches.
    fn drop_where(&mut self, pred: impl Fn(ReplicaId, ReplicaId, &str) -> bool) {
        self.take(|f, t, p| pred(f, t, kind(p)));
    }

    /// Fires every timer `node` has armed (stale tokens are no-ops), at the
    /// latest of their deadlines.
    fn fire(&mut self, node: ReplicaId) {
        let timers = std::mem::take(&mut self.nodes.get_mut(&node).unwrap().timers);
        assert!(!timers.is_empty(), "replica {node} has no timer armed");
        self.now_ms = self
            .now_ms
            .max(timers.iter().map(|t| t.at_ms).max().unwrap());
        self.step(
            node,
            Batch {
                timers,
                ..Batch::default()
            },
        );
    }

    fn reconfigure(&mut self, members: &Members) {
        for node in self.nodes.values_mut() {
            node.replica.reconfigure(members.clone()).unwrap();
            node.members = members.clone();
        }
    }

    /// Restarts `node` as its host does: a new instance at `incarnation` on
    /// the same disk, in the membership it ran; timers and volatile state gone.
    fn restart(&mut self, id: ReplicaId, incarnation: u64) {
        let node = self.nodes.get_mut(&id).unwrap();
        node.config.incarnation = incarnation;
        node.replica = Replica::new(node.config.clone(), LeaseEnv).unwrap();
        (self.plant)(&mut node.replica);
        node.replica.reconfigure(node.members.clone()).unwrap();
        node.timers.clear();
    }

    /// Delivers whatever `allow` lets through and fires timers of `nodes`
    /// until nothing is left or `until` holds; messages `allow` refuses are
    /// lost.
    fn run(
        &mut self,
        nodes: &[ReplicaId],
        allow: impl Fn(ReplicaId, ReplicaId, &str) -> bool,
        until: impl Fn(&Net) -> bool,
    ) {
        for _ in 0..100_000 {
            if until(self) {
                return;
            }
            if !self.pool.is_empty() {
                let (f, t, payload) = self.pool.remove(0);
                if allow(f, t, kind(&payload)) {
                    self.inbound(f, t, payload);
                }
                continue;
            }
            let next = nodes
                .iter()
                .filter_map(|n| {
                    let at = self.nodes[n].timers.iter().map(|t| t.at_ms).min()?;
                    Some((at, *n))
                })
                .min();
            let Some((at, node)) = next else { return };
            let timers = &mut self.nodes.get_mut(&node).unwrap().timers;
            let pos = timers.iter().position(|t| t.at_ms == at).unwrap();
            let timer = timers.remove(pos);
            self.now_ms = self.now_ms.max(at);
            self.step(
                node,
                Batch {
                    timers: vec![timer],
                    ..Batch::default()
                },
            );
        }
        panic!("the schedule did not settle");
    }

    /// The kinds of the messages in flight that `pred` matches, oldest first.
    fn kinds(&self, pred: impl Fn(ReplicaId, ReplicaId) -> bool) -> Vec<&'static str> {
        self.pool
            .iter()
            .filter(|(f, t, _)| pred(*f, *t))
            .map(|(_, _, p)| kind(p))
            .collect()
    }

    fn outcome(&self, id: u64) -> Option<&Outcome> {
        self.done.iter().find(|(i, _)| *i == id).map(|(_, o)| o)
    }

    /// Every value a completion reported at each version: one value a version.
    fn assert_one_value_per_version(&self) {
        let mut seen: BTreeMap<u64, (u64, Option<Vec<u8>>)> = BTreeMap::new();
        for (id, outcome) in &self.done {
            let (Outcome::Done(c) | Outcome::Rejected(_, c)) = outcome else {
                continue;
            };
            if let Some((other, value)) = seen.get(&c.version) {
                assert_eq!(
                    value, &c.value,
                    "two values at version {}: request {other} saw {:?}, request {id} saw {:?}",
                    c.version, value, c.value
                );
            } else {
                seen.insert(c.version, (*id, c.value.clone()));
            }
        }
    }
}

/// A batch of the given messages about KEY, in order.
fn messages(from_payload: Vec<(ReplicaId, Vec<u8>)>) -> Batch {
    Batch {
        messages: from_payload
            .into_iter()
            .map(|(from, payload)| Inbound {
                from,
                key: KEY.to_vec(),
                payload,
            })
            .collect(),
        ..Batch::default()
    }
}

fn done_value(outcome: Option<&Outcome>) -> Option<(Option<Vec<u8>>, u64)> {
    match outcome {
        Some(Outcome::Done(c)) => Some((c.value.clone(), c.version)),
        _ => None,
    }
}

/// Defect A. A learner never promises, so without a ballot of its own on
/// disk it prepared with `(1, L)` again on every attempt; acceptors
/// re-promise an equal ballot and accepted a second value at it. Two values
/// were then chosen for version 1 (q through `(2, 1)`'s recovery, p2 told to
/// the learner's client). A ballot is never reused by its owner.
#[test]
fn a_learner_never_reuses_a_classic_ballot() {
    learner_ballots(healthy);
}

fn learner_ballots(plant: Plant) {
    let mut net = Net::new(&[1, 2, 3, 4], &[1, 2, 3], plant);
    // Leftover fast votes: q at A1 and A2, r at A3.
    net.put(1, 1, "q");
    net.deliver(1, 2, "Accept");
    net.put(3, 2, "r");
    net.drop_where(|_, _, _| true);
    // Replica 4 joins as a learner; the cluster runs classic rounds only.
    net.reconfigure(&Members {
        epoch: 2,
        voters: vec![1, 2, 3],
        learners: vec![4],
        fast: false,
    });
    // A read on 4 finds the pending slot through {A1, A2}, is constrained
    // to q, and its Accept reaches A1 only.
    net.read(4, 10);
    net.deliver(4, 1, "Query");
    net.deliver(4, 2, "Query");
    net.deliver(1, 4, "QueryReply");
    net.deliver(2, 4, "QueryReply");
    net.deliver(4, 1, "Prepare");
    net.deliver(4, 2, "Prepare");
    net.deliver(1, 4, "Promise");
    net.deliver(2, 4, "Promise");
    net.deliver(4, 1, "Accept");
    net.drop_where(|_, _, _| true);
    // It times out and tries again through {A2, A3}: q and r once each,
    // nothing can have been chosen, the read answers.
    net.fire(4); // round timeout: back off
    net.fire(4); // the backoff ends: query again
    net.deliver(4, 2, "Query");
    net.deliver(4, 3, "Query");
    net.deliver(2, 4, "QueryReply");
    net.deliver(3, 4, "QueryReply");
    net.deliver(4, 2, "Prepare");
    net.deliver(4, 3, "Prepare");
    net.deliver(2, 4, "Promise");
    net.deliver(3, 4, "Promise");
    assert!(done_value(net.outcome(10)).is_some(), "the read answers");
    net.drop_where(|_, _, _| true);
    // A write on 4 prepares through {A2, A3} and is chosen there; the
    // learner's Learns are lost.
    net.put(4, 11, "p2");
    net.deliver(4, 2, "Prepare");
    net.deliver(4, 3, "Prepare");
    net.deliver(2, 4, "Promise");
    net.deliver(3, 4, "Promise");
    net.deliver(4, 2, "Accept");
    net.deliver(4, 3, "Accept");
    net.deliver(2, 4, "Accepted");
    net.deliver(3, 4, "Accepted");
    assert_eq!(
        done_value(net.outcome(11)),
        Some((Some(b"p2".to_vec()), 1)),
        "p2 is chosen at version 1"
    );
    net.drop_where(|_, _, _| true);
    // Replica 1 recovers its own write through {A1, A2}.
    net.run(
        &[1],
        |f, t, _| f != 3 && t != 3 && f != 4 && t != 4,
        |n| n.outcome(1).is_some(),
    );
    net.assert_one_value_per_version();
}

/// Defect A, second form (found in review of the first fix). The ballot a
/// proposer prepares with is recorded in the same step's writes; promises
/// to an earlier incarnation's prepare at that very ballot, arriving in the
/// same batch as a new request, made a quorum at once, and the Accept left
/// before the record was durable. A crash then lost the record and the
/// next incarnation used the ballot again with another value. An Accept at
/// a ballot prepared in the same step now waits for that step's writes.
#[test]
fn an_accept_never_leaves_before_its_ballot_is_recorded() {
    stale_promises(healthy);
}

fn stale_promises(plant: Plant) {
    let mut net = Net::with_learner(plant, false);
    let put = |value: &str| Operation::Command(Command::Put(value.as_bytes().to_vec()).encode());
    let request = |id, value: &str| Request {
        id,
        key: KEY.to_vec(),
        op: put(value),
    };
    // Learner 4 prepares (1, 4); its disk loses the record in a crash.
    net.crash_during_fsync(
        4,
        Batch {
            requests: vec![request(10, "p1")],
            ..Batch::default()
        },
        2,
    );
    net.deliver(4, 1, "Prepare");
    net.deliver(4, 2, "Prepare");
    net.drop_where(|f, t, _| f == 4 && t == 3);
    // The promises reach its next incarnation together with a new request,
    // and it crashes again before that step is durable.
    let promises = net.take(|_, t, p| t == 4 && kind(p) == "Promise");
    assert_eq!(promises.len(), 2);
    let messages = promises
        .into_iter()
        .map(|(from, _, payload)| Inbound {
            from,
            key: KEY.to_vec(),
            payload,
        })
        .collect();
    net.crash_during_fsync(
        4,
        Batch {
            requests: vec![request(11, "p2")],
            messages,
            ..Batch::default()
        },
        3,
    );
    net.deliver_any(4, 1, "Accept");
    net.drop_where(|_, _, _| true);
    // Its third incarnation writes p3 through {A2, A3}; the Learns are lost.
    net.command(4, 12, Command::Put(b"p3".to_vec()).encode());
    net.run(
        &[4],
        |f, t, k| f != 1 && t != 1 && k != "Learn",
        |n| n.outcome(12).is_some(),
    );
    assert_eq!(done_value(net.outcome(12)), Some((Some(b"p3".to_vec()), 1)));
    net.drop_where(|_, _, _| true);
    // Replica 1 reads through {A1, A2}.
    net.read(1, 13);
    net.run(
        &[1, 2],
        |f, t, _| f <= 2 && t <= 2,
        |n| n.outcome(13).is_some(),
    );
    net.assert_one_value_per_version();
}

/// Defect B. A command whose proposal may have been chosen (it was
/// fast-accepted by A1 and A2) was evaluated again by a recovery that could
/// not see it through {A2, A3}; the policy, now past the lease's end, said
/// "expired" and the caller heard it, while a later recovery through
/// {A1, A2} chose the renewal. An exposed proposal is driven to a decision
/// with its original value.
#[test]
fn an_exposed_command_is_never_evaluated_again() {
    exposed_command(healthy);
}

fn exposed_command(plant: Plant) {
    let mut net = Net::with_learner(plant, true);
    // Replica 4 renews before the lease ends: A1 and A2 accept the renewal
    // in the fast round, A3 never hears of it.
    net.now_ms = 500;
    net.command(4, 2, RENEW.to_vec());
    net.deliver(4, 1, "Accept");
    net.deliver(4, 2, "Accept");
    net.drop_where(|_, _, _| true);
    // The fast round times out; after the lease ended, the classic round
    // hears from A2 and A3: the renewal counts once, below the threshold.
    net.fire(4);
    net.now_ms = 1500;
    net.deliver(4, 2, "Prepare");
    net.deliver(4, 3, "Prepare");
    net.deliver(2, 4, "Promise");
    net.deliver(3, 4, "Promise");
    if let Some(outcome) = net.outcome(2) {
        assert!(
            !matches!(outcome, Outcome::Rejected(..)),
            "the caller heard {outcome:?} while its renewal can still be chosen"
        );
    }
    // Replica 4 falls silent; replica 1 reads through {A1, A2}.
    net.drop_where(|_, _, _| true);
    net.read(1, 3);
    net.run(
        &[1, 2],
        |f, t, _| f <= 2 && t <= 2,
        |n| n.outcome(3).is_some(),
    );
    assert_eq!(
        done_value(net.outcome(3)),
        Some((Some(b"renewed".to_vec()), 1)),
        "the renewal is chosen"
    );
    // Replica 4 comes back and learns what happened to its command.
    net.run(&[1, 2, 3, 4], |_, _, _| true, |n| n.outcome(2).is_some());
    assert_eq!(
        done_value(net.outcome(2)),
        Some((Some(b"renewed".to_vec()), 1)),
        "the renewal's caller hears it was applied"
    );
    net.assert_one_value_per_version();
}

/// Defect C. Query ids restarted at the same number in every incarnation,
/// and replies were matched by id alone: a reply to a read of incarnation 1,
/// delayed in the network, completed a read of incarnation 2 and hid a write
/// that finished in between. Every id on the wire is unique across
/// incarnations.
#[test]
fn a_delayed_reply_never_answers_a_later_incarnations_read() {
    delayed_reply(healthy);
}

fn delayed_reply(plant: Plant) {
    let mut net = Net::new(&[1, 2, 3], &[1, 2, 3], plant);
    net.read(1, 1);
    net.deliver(1, 2, "Query");
    // A2's reply (the key is absent) is delayed; replica 1 restarts.
    let delayed = net.take(|f, t, p| f == 2 && t == 1 && kind(p) == "QueryReply");
    net.drop_where(|_, _, _| true);
    net.restart(1, 2);
    // A write through {A2, A3} finishes while replica 1 hears nothing.
    net.put(3, 2, "w");
    net.run(
        &[2, 3],
        |f, t, _| f != 1 && t != 1,
        |n| n.outcome(2).is_some(),
    );
    assert_eq!(done_value(net.outcome(2)), Some((Some(b"w".to_vec()), 1)));
    net.drop_where(|_, _, _| true);
    // The new incarnation reads; the old reply arrives first.
    net.read(1, 3);
    for (f, t, payload) in delayed {
        net.inbound(f, t, payload);
    }
    net.run(&[1, 2, 3], |_, _, _| true, |n| n.outcome(3).is_some());
    assert_eq!(
        done_value(net.outcome(3)),
        Some((Some(b"w".to_vec()), 1)),
        "a read that began after the write finished sees it"
    );
}

/// Leaders. Replica 1 wins version 1 in a classic round and leads the key:
/// its next write is phase 2 only (`Continue`). Replica 2, passed over for
/// silence, prepares a higher ballot and wins version 3 through {2, 3};
/// nobody tells replica 1 or 3. Replica 1 still believes it leads: its
/// `Continue` is refused by 3, whose promise moved, and replica 1 must
/// prepare again, which finds w. A leader that instead moved above the
/// refusal and went straight to phase 2 got 3 to accept v at version 3 too.
#[test]
fn a_leader_that_lost_its_promise_prepares_again() {
    lost_lead(healthy);
}

/// Replicas 1, 2 and 3, where replica 1's put of "a" (request 1) missed
/// replica 3 in the fast round and won version 1 in the classic round
/// (1, 1): replica 1 leads the key. Nothing is left in flight.
fn led_by_1(plant: Plant) -> Net {
    let mut net = Net::new(&[1, 2, 3], &[1, 2, 3], plant);
    net.put(1, 1, "a");
    net.drop_where(|_, t, _| t == 3);
    net.deliver(1, 2, "Accept");
    net.deliver(2, 1, "Accepted");
    net.fire(1);
    net.run(&[1, 2, 3], |_, _, _| true, |n| n.pool.is_empty());
    net
}

fn lost_lead(plant: Plant) {
    let mut net = led_by_1(plant);
    assert_eq!(done_value(net.outcome(1)), Some((Some(b"a".to_vec()), 1)));
    // The leader's next write skips phase 1.
    net.put(1, 2, "b");
    assert!(
        net.pool
            .iter()
            .any(|(f, _, p)| *f == 1 && kind(p) == "Continue"),
        "the leader goes straight to phase 2"
    );
    assert!(!net.pool.iter().any(|(_, _, p)| kind(p) == "Prepare"));
    net.run(&[1, 2, 3], |_, _, _| true, |n| n.outcome(2).is_some());
    assert_eq!(done_value(net.outcome(2)), Some((Some(b"b".to_vec()), 2)));
    net.run(&[], |_, _, _| true, |n| n.pool.is_empty());
    // Replica 2 forwards to the leader, which never hears it: the outcome
    // is unknown, and replica 2 passes over the leader for a while.
    net.put(2, 3, "w");
    for _ in 0..3 {
        net.drop_where(|f, t, what| f == 2 && t == 1 && what == "Forward");
        net.fire(2);
    }
    match net.outcome(3) {
        Some(Outcome::Failed(f)) => assert!(f.maybe_applied),
        other => panic!("a forward nobody answered ended as {other:?}"),
    }
    // Replica 2 prepares and wins version 3 through {2, 3}.
    net.put(2, 4, "w");
    net.drop_where(|_, t, _| t == 1);
    net.deliver(2, 3, "Prepare");
    net.deliver(3, 2, "Promise");
    net.drop_where(|_, t, _| t == 1);
    net.deliver(2, 3, "Accept");
    net.deliver(3, 2, "Accepted");
    assert_eq!(done_value(net.outcome(4)), Some((Some(b"w".to_vec()), 3)));
    net.drop_where(|_, _, _| true);
    // The old leader writes: replica 3 refuses its Continue.
    net.put(1, 5, "v");
    net.drop_where(|_, t, _| t == 2);
    net.deliver(1, 3, "Continue");
    net.deliver(3, 1, "Nack");
    net.run(&[1, 3], |_, t, _| t != 2, |n| n.outcome(5).is_some());
    net.assert_one_value_per_version();
    net.run(&[1, 2, 3], |_, _, _| true, |n| n.outcome(5).is_some());
    assert_eq!(done_value(net.outcome(5)), Some((Some(b"v".to_vec()), 4)));
}

/// A read through a replica that does not lead a key written all the time
/// (its leader always has the next slot in flight) answers once the slot
/// it found pending is learned, with the value as of then. Before, it asked
/// a quorum again when each wait ended, found the next slot pending every
/// time, and after three waits took the key from its leader with a
/// prepare (in fault-free simulator runs with 16 clients on 4 keys, the
/// longest operations took 312 to 627 ms where a slot takes a few).
#[test]
fn a_read_behind_a_busy_leader_answers_once_the_pending_slot_is_learned() {
    let mut net = led_by_1(healthy);
    // The leader's next write reaches 2 and 3; their votes are on the way.
    net.put(1, 2, "b");
    net.deliver(1, 2, "Continue");
    net.deliver(1, 3, "Continue");
    // Replica 2 reads: its quorum (itself and 3) holds version 1 and the
    // leader's pending slot 2, so it waits for the leader.
    let read_through_2_and_3 = |net: &mut Net| {
        net.read(2, 3);
        net.drop_where(|f, t, what| f == 2 && t == 1 && what == "Query");
        net.deliver(2, 3, "Query");
        net.deliver(3, 2, "QueryReply");
        assert!(net.outcome(3).is_none());
    };
    read_through_2_and_3(&mut net);
    // Slot 2 is chosen; the leader starts slot 3 at once and tells 2.
    net.deliver(2, 1, "Accepted");
    assert_eq!(done_value(net.outcome(2)), Some((Some(b"b".to_vec()), 2)));
    net.put(1, 4, "c");
    net.deliver(1, 2, "Continue");
    // The answer waits until what the read learned is durable: replica 2
    // crashing before its write of version 2 lands answers nothing.
    let mut again = net.clone_pool(|f, t, what| f == 1 && t == 2 && what == "Learn");
    let learn = again.remove(0);
    net.crash_during_fsync(2, messages(vec![(1, learn)]), 2);
    assert!(
        net.outcome(3).is_none(),
        "answered before the learn was durable"
    );
    // Replica 2 comes back: a new read there waits for the leader the same way.
    net.drop_where(|_, t, what| t == 2 && what != "Learn");
    read_through_2_and_3(&mut net);
    net.deliver(1, 2, "Learn");
    assert_eq!(
        done_value(net.outcome(3)),
        Some((Some(b"b".to_vec()), 2)),
        "the read did not answer when the slot it waited for was learned"
    );
    assert!(
        !net.pool
            .iter()
            .any(|(f, _, p)| *f == 2 && matches!(kind(p), "Prepare" | "Query")),
        "the read asked again"
    );
    net.run(&[1, 2, 3], |_, _, _| true, |n| n.outcome(4).is_some());
    assert_eq!(done_value(net.outcome(4)), Some((Some(b"c".to_vec()), 3)));
    net.assert_one_value_per_version();
}

/// A leader that stopped for good: replica 2's forward goes unanswered
/// and fails (its outcome unknown). A command that comes long after, when
/// a second's suspicion would have run out, is not forwarded to the silent
/// leader again (each would fail the same way) but takes the key with a
/// prepare; once the leader is heard from, it may lead again.
#[test]
fn a_silent_leader_is_passed_over_until_it_is_heard_from() {
    let mut net = led_by_1(healthy);
    net.put(2, 2, "w");
    for _ in 0..3 {
        net.drop_where(|f, t, what| f == 2 && t == 1 && what == "Forward");
        net.fire(2);
    }
    assert!(matches!(net.outcome(2), Some(Outcome::Failed(f)) if f.maybe_applied));
    net.drop_where(|_, _, _| true);
    net.now_ms += 60_000;
    net.put(2, 3, "x");
    assert!(
        !net.pool
            .iter()
            .any(|(f, _, p)| *f == 2 && kind(p) == "Forward"),
        "a command a minute later went to the silent leader again"
    );
    net.run(&[2, 3], |_, t, _| t != 1, |n| n.outcome(3).is_some());
    assert!(
        matches!(done_value(net.outcome(3)), Some((Some(v), _)) if v == b"x"),
        "{:?}",
        net.outcome(3)
    );
}

/// A forwarded command runs once however many copies reach the leader,
/// and each copy after the first gets the same answer.
#[test]
fn a_forwarded_command_runs_once() {
    let mut net = led_by_1(healthy);
    // A counter would show a second run; the register shows it as a new
    // version.
    net.put(3, 2, "b");
    let forward = net.take(|f, t, p| f == 3 && t == 1 && kind(p) == "Forward");
    assert_eq!(forward.len(), 1, "replica 3 forwards to the leader");
    let (_, _, payload) = forward[0].clone();
    net.inbound(3, 1, payload.clone());
    net.run(&[1, 2, 3], |_, _, _| true, |n| n.pool.is_empty());
    assert_eq!(done_value(net.outcome(2)), Some((Some(b"b".to_vec()), 2)));
    // A late copy of the forward: answered again, not run again.
    net.inbound(3, 1, payload);
    let replies = net.take(|_, _, _| true);
    assert_eq!(
        replies.len(),
        1,
        "the copy is answered, and nothing else is sent"
    );
    match Msg::decode_any(&replies[0].2).unwrap().1 {
        Msg::Forwarded { reply, .. } => assert!(matches!(
            reply.outcome,
            ballot_core::wire::ReplyOutcome::Done { version: 2, .. }
        )),
        other => panic!("expected the answer again, got {other:?}"),
    }
    net.read(1, 3);
    net.run(&[1, 2, 3], |_, _, _| true, |n| n.outcome(3).is_some());
    assert_eq!(done_value(net.outcome(3)), Some((Some(b"b".to_vec()), 2)));
}

/// Each defect, put back, breaks its schedule: the schedules can fail.
/// (The panics these print are the schedules catching the planted bugs.)
#[cfg(feature = "planted-bugs")]
mod planted {
    use super::*;

    fn caught(schedule: fn(Plant), plant: Plant) -> bool {
        std::panic::catch_unwind(|| schedule(plant)).is_err()
    }

    #[test]
    fn ballot_reuse_is_caught() {
        assert!(caught(learner_ballots, |r| r.plant_ballot_reuse()));
    }

    #[test]
    fn early_accepts_are_caught() {
        assert!(caught(stale_promises, |r| r.plant_ballot_reuse()));
    }

    #[test]
    fn reevaluation_is_caught() {
        assert!(caught(exposed_command, |r| r.plant_reevaluation()));
    }

    #[test]
    fn query_id_reuse_is_caught() {
        assert!(caught(delayed_reply, |r| r.plant_query_id_reuse()));
    }

    #[test]
    fn a_leader_skipping_phase_1_is_caught() {
        assert!(caught(lost_lead, |r| r.plant_leader_skips_prepare()));
    }

    #[test]
    fn a_vote_held_in_memory_like_a_decision_is_caught() {
        assert!(caught(
            |plant| held_decisions(plant, false),
            |r| r.plant_lazy_votes()
        ));
    }
}

/// A leader with commands queued behind its slot: when the slot is chosen
/// it starts the next one in the same step, and votes in it. What it says
/// about the slot just chosen depends on no vote of that step, so it leaves
/// with the step's early effects: its followers hear the slot learned
/// before the next slot's `Continue` (before, each answered `Behind`, the
/// leader sent the `Continue` again with the value attached, and every
/// slot of a hot key cost two round trips), and the slot's clients hear
/// their outcome without waiting for the leader's vote in the next slot.
#[test]
fn a_leaders_next_slot_reaches_followers_after_the_learn_of_the_one_before() {
    let mut net = led_by_1(healthy);
    net.put(1, 2, "b");
    net.put(1, 3, "c");
    net.put(1, 4, "d");
    net.deliver(1, 2, "Continue");
    net.drop_where(|_, t, _| t == 3);
    // The leader crashes while its vote in slot 3 is being written: only
    // the step's early effects get out.
    let accepted = net.take(|f, t, p| f == 2 && t == 1 && kind(p) == "Accepted");
    net.crash_during_fsync(1, messages(vec![(2, accepted[0].2.clone())]), 2);
    assert_eq!(done_value(net.outcome(2)), Some((Some(b"b".to_vec()), 2)));
    assert_eq!(
        net.kinds(|f, t| f == 1 && t == 2),
        ["Learn", "Continue"],
        "what the leader sent replica 2"
    );
    for (_, _, payload) in net.take(|f, t, _| f == 1 && t == 2) {
        net.inbound(1, 2, payload);
    }
    assert_eq!(
        net.kinds(|f, _| f == 2),
        ["Accepted"],
        "replica 2's answer to the next slot"
    );
    // Slot 3 (c and d) is accepted at replica 2 only; the restarted leader
    // lost its vote and its clients, and a read there finds d.
    net.drop_where(|_, _, _| true);
    net.read(1, 5);
    net.run(&[1, 2, 3], |_, _, _| true, |n| n.outcome(5).is_some());
    assert_eq!(done_value(net.outcome(5)), Some((Some(b"d".to_vec()), 4)));
    net.assert_one_value_per_version();
}

/// An acceptor that answers a read's `Query` and then votes in the same
/// step: the answer leaves before the vote is durable (it was made before
/// the vote and says nothing of it; before, it waited for the vote and
/// was lost with it). The acceptor crashes before the vote lands; the
/// read answers with what the quorum held, and the write the vote was for
/// is decided after it, once: one value per version.
#[test]
fn a_query_answered_before_a_vote_in_the_same_step_leaves_early() {
    let mut net = led_by_1(healthy);
    net.put(1, 2, "b");
    net.drop_where(|f, t, what| f == 1 && t == 3 && what == "Continue");
    net.read(3, 3);
    net.drop_where(|f, t, what| f == 3 && t == 1 && what == "Query");
    let query = net.take(|f, t, p| f == 3 && t == 2 && kind(p) == "Query");
    let cont = net.take(|f, t, p| f == 1 && t == 2 && kind(p) == "Continue");
    let batch = messages(vec![(3, query[0].2.clone()), (1, cont[0].2.clone())]);
    net.crash_during_fsync(2, batch, 2);
    assert_eq!(
        net.kinds(|f, _| f == 2),
        ["QueryReply"],
        "only the answer made before the vote"
    );
    net.deliver(2, 3, "QueryReply");
    assert_eq!(done_value(net.outcome(3)), Some((Some(b"a".to_vec()), 1)));
    net.run(&[1, 2, 3], |_, _, _| true, |n| n.outcome(2).is_some());
    assert_eq!(done_value(net.outcome(2)), Some((Some(b"b".to_vec()), 2)));
    net.read(3, 4);
    net.run(&[1, 2, 3], |_, _, _| true, |n| n.outcome(4).is_some());
    assert_eq!(done_value(net.outcome(4)), Some((Some(b"b".to_vec()), 2)));
    net.assert_one_value_per_version();
}

/// What replica `id` has written for KEY.
fn stored(net: &Net, id: ReplicaId) -> Stored {
    Stored::decode(net.nodes[&id].disk.get(KEY).map_or(&[][..], |s| &s[..])).unwrap()
}

/// A follower's decision that changes nothing else about the key stays in
/// memory and rides with its next vote: one write where there were two,
/// and the vote no longer waits for a write of its own replica. Before,
/// the `Learn` alone was written, and the follower's next vote waited for
/// that commit (six fsyncs per write over three replicas with one client).
/// A crash loses the held decision, as a lost `Learn` would: the
/// acceptances that chose the value are durable, and a read finds it and
/// writes it before it answers.
#[test]
fn a_followers_decision_rides_with_its_next_vote() {
    held_decisions(healthy, true);
}

fn held_decisions(plant: Plant, check_writes: bool) {
    let mut net = led_by_1(plant);
    net.put(1, 2, "b");
    net.deliver(1, 2, "Continue");
    net.deliver(1, 3, "Continue");
    net.deliver(2, 1, "Accepted");
    assert_eq!(done_value(net.outcome(2)), Some((Some(b"b".to_vec()), 2)));
    // Replica 3 keeps its acceptance of version 2 and hears no more.
    net.drop_where(|f, t, _| f == 3 || t == 3);
    let before = net.nodes[&2].disk.clone();
    net.deliver(1, 2, "Learn");
    if check_writes {
        assert_eq!(net.nodes[&2].disk, before, "a decision alone is held");
    }
    // The leader's next slot: the vote writes the decision with it.
    net.put(1, 3, "c");
    net.drop_where(|_, t, _| t == 3);
    net.deliver(1, 2, "Continue");
    if check_writes {
        let st = stored(&net, 2);
        assert_eq!(st.chosen.version, 2, "the held decision, written");
        assert!(st.accepted.is_some(), "with the vote");
    }
    net.deliver(2, 1, "Accepted");
    assert_eq!(done_value(net.outcome(3)), Some((Some(b"c".to_vec()), 3)));
    // Replica 2 learns version 3, holds it, and crashes.
    net.drop_where(|_, t, _| t == 3);
    net.deliver(1, 2, "Learn");
    net.restart(2, 2);
    // With the leader cut off, a read at 2 goes through {2, 3}: 2's
    // acceptance of version 3 is all that is left of c, and is enough.
    net.drop_where(|_, _, _| true);
    net.read(2, 4);
    net.run(
        &[2, 3],
        |f, t, _| f != 1 && t != 1,
        |n| n.outcome(4).is_some(),
    );
    assert_eq!(done_value(net.outcome(4)), Some((Some(b"c".to_vec()), 3)));
    if check_writes {
        assert_eq!(stored(&net, 2).chosen.version, 3, "the read's learn");
    }
    net.assert_one_value_per_version();
}

/// A held decision that no later step picks up is written when its timer
/// fires.
#[test]
fn a_held_decision_is_written_when_its_timer_fires() {
    let mut net = led_by_1(healthy);
    net.put(1, 2, "b");
    net.deliver(1, 2, "Continue");
    net.drop_where(|_, t, _| t == 3);
    net.deliver(2, 1, "Accepted");
    net.deliver(1, 2, "Learn");
    assert_eq!(stored(&net, 2).chosen.version, 1);
    net.fire(2);
    let st = stored(&net, 2);
    assert_eq!(st.chosen.version, 2);
    assert_eq!(st.chosen.value.as_deref(), Some(&b"b"[..]));
    assert!(st.accepted.is_none());
}
