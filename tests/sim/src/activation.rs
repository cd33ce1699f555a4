//! Protocol activations in the simulator ([`SimConfig::activations`]):
//! the configuration record and the readiness answers are system keys
//! written through the replicas' own cores, by the daemon's decisions
//! (`ballot_control::activation` and `ballot_control::record`), and every
//! replica swaps its protocol instance live, as the daemon's core thread
//! does: new requests wait while it drains, and once the drain deadline
//! passes what is in flight is abandoned and the new instance takes over
//! while the old instance's writes still reach the disk.
//!
//! Operators start a few activations at random moments through random
//! replicas, so activations race each other and the replicas' own writes
//! on the record. Every operation on a system key is recorded in the
//! history and checked for linearizability like the clients' keys.
//!
//! The safety property checked: an activation never leaves a member of the
//! cluster that cannot run the active protocol (each replica may be unable
//! to run [`NEXT`], drawn per run; spares that join later can run both).

use std::collections::BTreeSet;

use ballot_control::activation::{
    self, Follower, Outcome as Decision, Poll, Readiness, Swap, Verdict,
};
use ballot_control::config::ClusterConfig;
use ballot_control::record::{Update, Want};
use ballot_core::register::Command;
use ballot_core::{Config, Consistency, FailureReason, Operation, Outcome, ReplicaId};

use crate::{Ev, NodeInput, Sim};

/// The protocol every replica starts on (the embedded one).
pub const EMBEDDED: &str = "embedded";
/// The other protocol an activation can move the cluster to.
pub const NEXT: &str = "next";

/// The daemon's configuration poll (`registry::POLL_INTERVAL`).
const POLL_MS: u64 = 2_000;
/// How long a swap waits for what is in flight (`node::SWAP_DRAIN_MAX`).
const DRAIN_MAX_MS: u64 = 5_000;
/// The pause between two rounds of readiness reads, as the daemon's.
const READ_PAUSE_MS: u64 = 100;

const CONFIG_KEY: &[u8] = b"\0ballot/config";

fn ready_key(nonce: u64, replica: ReplicaId) -> Vec<u8> {
    format!("\0ballot/ready/{nonce}/{replica}").into_bytes()
}

/// Why a replica sent a request of its own.
#[derive(Clone, Debug)]
pub(crate) enum SysCall {
    /// Its configuration poll.
    Poll,
    /// Writing its readiness answer.
    Answer,
    /// Deleting its answer to this activation.
    Forget(u64),
    /// A step of this operator's activation.
    Operator(usize),
    /// Reading this replica's readiness answer, for an operator.
    Readiness(usize, ReplicaId),
    /// A read of the changelog replay (`crate::replay`).
    Replay,
    /// A read or write of this membership driver (`crate::records`),
    /// sent in this life of the replica.
    Members(usize, u64),
    /// A lease holder's or reaper's request (`crate::leases`).
    Lease(crate::leases::Who),
}

/// A replica's side of the control plane.
pub(crate) struct Following {
    /// The protocol its instance runs.
    pub running: &'static str,
    pub follower: Follower,
    /// The configuration version it applied.
    pub applied: u64,
    /// A swap draining: to this protocol, until this moment at the latest.
    pub swapping: Option<(&'static str, u64)>,
    /// A poll of its own is in flight.
    pub polling: bool,
    /// It cannot run [`NEXT`] (drawn once per run).
    pub cannot_run_next: bool,
}

impl Following {
    pub fn new(cannot_run_next: bool) -> Following {
        Following {
            running: EMBEDDED,
            follower: Follower::new(EMBEDDED),
            applied: 0,
            swapping: None,
            polling: false,
            cannot_run_next,
        }
    }

    fn can_run(&self, label: &str) -> bool {
        label != NEXT || !self.cannot_run_next
    }
}

fn label_of(target: &Option<String>) -> &'static str {
    match target.as_deref() {
        Some(NEXT) => NEXT,
        _ => EMBEDDED,
    }
}

#[derive(Debug)]
enum Phase {
    /// Reading the record (an update that edits nothing).
    Look(Update),
    Begin(Update),
    /// The members' readiness answers, and the reads of them in flight.
    Wait {
        readiness: Readiness,
        reading: BTreeSet<ReplicaId>,
    },
    Conclude(Update, Decision),
    /// Deleting the answers, this many left.
    Clean(usize),
    Over,
}

/// One operator's activation, carried out through one replica as the
/// daemon's `Registry::activate` does.
#[derive(Debug)]
pub(crate) struct Operator {
    node: usize,
    /// The replica's crash count when it was asked.
    lives: u64,
    target: Option<String>,
    nonce: u64,
    asked: Vec<ReplicaId>,
    /// The record as last read, decoded.
    read: Option<ClusterConfig>,
    phase: Phase,
    /// An operation of its own is in flight.
    busy: bool,
}

impl Operator {
    pub fn over(&self) -> bool {
        matches!(self.phase, Phase::Over)
    }
}

fn decode(value: Option<&[u8]>) -> Result<ClusterConfig, String> {
    value.map_or_else(|| Ok(ClusterConfig::new()), ClusterConfig::decode)
}

impl<'f> Sim<'f> {
    /// Plans the run's activations and the replicas' polls.
    pub(crate) fn plan_activations(&mut self) {
        let activations = self.swap_rng.range(1, 3);
        for _ in 0..activations {
            let t = self.swap_rng.range(0, 3_000);
            let k = self.operators.len();
            self.operators.push(None);
            self.at(t, Ev::Activate(k));
        }
        for i in 0..self.nodes.len() {
            let t = self.swap_rng.range(0, POLL_MS);
            self.at(t, Ev::Follow(i));
        }
    }

    pub(crate) fn activations_done(&self) -> bool {
        !self.cfg.activations
            || self
                .operators
                .iter()
                .all(|o| o.as_ref().is_some_and(Operator::over))
    }

    /// Sends a request of replica `i`'s own host, recorded in the history.
    pub(crate) fn sys_request(
        &mut self,
        i: usize,
        key: Vec<u8>,
        op: Operation,
        why: SysCall,
    ) -> u64 {
        let (id, h) = self.request(i, usize::MAX, key, op);
        self.nodes[i].sys.insert(id, (h, why));
        id
    }

    /// A request of replica `i`'s host finished (`None`: it crashed first).
    pub(crate) fn sys_done(
        &mut self,
        i: usize,
        id: u64,
        h: usize,
        why: SysCall,
        outcome: Option<Outcome>,
    ) {
        let ret = self.tick();
        let record = &mut self.history[h];
        if outcome.is_some() {
            record.ret = Some(ret);
        }
        record.outcome = outcome.clone();
        if let SysCall::Members(k, lives) = why {
            return self.members_answer(k, i, lives, outcome);
        }
        match why {
            SysCall::Lease(crate::leases::Who::Holder(h)) => return self.holder_answer(h, outcome),
            SysCall::Lease(crate::leases::Who::Reaper(lives)) => {
                return self.reaper_answer(i, lives, outcome)
            }
            _ => {}
        }
        let Some(outcome) = outcome else {
            // The replica crashed: an operator's request through it failed.
            if let SysCall::Operator(k) | SysCall::Readiness(k, _) = why {
                if let Some(op) = self.operators[k].as_mut().filter(|o| !o.over()) {
                    // Lost while cleaning up, it was counted already.
                    if !matches!(op.phase, Phase::Clean(_)) {
                        self.stats.activations_lost += 1;
                    }
                    op.phase = Phase::Over;
                }
            }
            return;
        };
        match why {
            SysCall::Poll => {
                self.nodes[i].following.polling = false;
                if let Outcome::Done(current) = outcome {
                    self.consider(i, current.version, current.value);
                }
            }
            SysCall::Answer => {}
            SysCall::Members(..) | SysCall::Lease(_) => unreachable!("answered above"),
            SysCall::Replay => {
                let ok = matches!(outcome, Outcome::Done(_));
                self.replay_read_done(i, id, ok);
            }
            SysCall::Forget(nonce) => {
                if matches!(outcome, Outcome::Done(_)) {
                    self.nodes[i].following.follower.forgot(nonce);
                }
            }
            SysCall::Operator(k) => self.operator_answer(k, outcome),
            SysCall::Readiness(k, replica) => {
                let Some(op) = self.operators[k].as_mut() else {
                    return;
                };
                let Phase::Wait {
                    readiness, reading, ..
                } = &mut op.phase
                else {
                    return;
                };
                reading.remove(&replica);
                if let Outcome::Done(current) = outcome {
                    if let Some(v) = current.value.as_deref().and_then(Verdict::decode) {
                        readiness.answer(replica, v);
                    }
                }
                if reading.is_empty() {
                    let t = self.now + READ_PAUSE_MS;
                    self.at(t, Ev::Operate(k));
                }
            }
        }
    }

    // ----- each replica follows the configuration -----------------------

    /// The host's configuration poll (a linearizable read every 2 s).
    pub(crate) fn follow_poll(&mut self, i: usize) {
        let node = &self.nodes[i];
        if node.core.is_some() && !node.off && !node.following.polling {
            self.nodes[i].following.polling = true;
            let op = Operation::Read(Consistency::Linearizable);
            self.sys_request(i, CONFIG_KEY.to_vec(), op, SysCall::Poll);
        }
        let t = self.now + POLL_MS + self.swap_rng.range(0, 50);
        self.at(t, Ev::Follow(i));
    }

    /// A configuration replica `i` read or made durable: what the daemon's
    /// `Registry::consider` and `follow_protocol` do with it.
    pub(crate) fn consider(&mut self, i: usize, version: u64, value: Option<Vec<u8>>) {
        if version <= self.nodes[i].following.applied {
            return;
        }
        let config = match decode(value.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                self.violations.push(format!(
                    "replica {} read an undecodable configuration: {e}",
                    i + 1
                ));
                return;
            }
        };
        let node = &mut self.nodes[i];
        node.following.applied = version;
        let follow = node.following.follower.follow(&config, EMBEDDED);
        let id = node.id;
        for nonce in follow.forget {
            let op = Operation::Command(Command::Delete.encode());
            self.sys_request(i, ready_key(nonce, id), op, SysCall::Forget(nonce));
        }
        if let Some(p) = follow.answer {
            let label = label_of(&p.target);
            let verdict = if self.nodes[i].following.can_run(label) {
                Verdict::Ready
            } else {
                Verdict::Refused(format!("replica {id} cannot run {label}"))
            };
            let op = Operation::Command(Command::Put(verdict.encode()).encode());
            self.sys_request(i, ready_key(p.nonce, id), op, SysCall::Answer);
        }
        let Some(target) = follow.swap else {
            return;
        };
        let label = if target == NEXT { NEXT } else { EMBEDDED };
        let member = self.latest().contains(id);
        if !self.nodes[i].following.can_run(label) {
            // The daemon warns and keeps running what it runs; the
            // activation should never have gone ahead.
            if member {
                self.violations.push(format!(
                    "replica {id} is a member and cannot run the active protocol {label} \
                     (configuration version {version})"
                ));
            }
            return;
        }
        // The daemon waits up to 5 s for what is in flight; half the swaps
        // here wait only a few ms, so that the swap with requests and
        // readies in flight (the deadline's path) is common.
        let wait = if self.swap_rng.chance(0.5) {
            DRAIN_MAX_MS
        } else {
            self.swap_rng.range(0, 20)
        };
        let node = &mut self.nodes[i];
        node.following.follower.swapping(label);
        node.following.swapping = Some((label, self.now + wait));
        self.stats.swaps_started += 1;
        // The swap itself happens between events (`Sim::try_swaps`), never
        // in the middle of applying the old instance's actions.
        let t = self.now + wait;
        self.at(t, Ev::SwapDeadline);
    }

    /// Swaps every replica whose swap is drained, or whose drain deadline
    /// passed, as the daemon's core thread does between two wake-ups.
    pub(crate) fn try_swaps(&mut self) {
        for i in 0..self.nodes.len() {
            self.try_swap(i);
        }
    }

    fn try_swap(&mut self, i: usize) {
        let node = &self.nodes[i];
        let Some((label, deadline)) = node.following.swapping else {
            return;
        };
        if node.core.is_none() {
            return;
        }
        let drained = node.admitted.is_empty() && node.pipeline.is_empty();
        if !drained && self.now < deadline {
            return;
        }
        if !drained {
            self.stats.drain_timeouts += 1;
        }
        // What the old instance took and did not answer is abandoned: it
        // may still take effect.
        let abandoned: Vec<u64> = std::mem::take(&mut self.nodes[i].admitted)
            .into_iter()
            .collect();
        self.stats.abandoned += abandoned
            .iter()
            .filter(|id| self.nodes[i].requests.contains_key(id))
            .count() as u64;
        for id in abandoned {
            let outcome = Outcome::Failed(ballot_core::Failure {
                reason: FailureReason::Interrupted,
                maybe_applied: true,
                message: "the protocol was swapped before this command finished".into(),
            });
            self.answer(i, id, outcome);
        }
        let first = self.memberships[0].voters.clone();
        let members = self.members_at(self.nodes[i].epoch);
        let node = &mut self.nodes[i];
        node.incarnation += 1;
        let mut core = self
            .factory
            .make_running(Config::new(node.id, node.incarnation, first), label);
        if let Err(e) = core.reconfigure(members) {
            self.violations.push(format!(
                "replica {} refused its own epoch after a swap: {e}",
                node.id
            ));
        }
        node.core = Some(core);
        // Its readies in flight still reach the disk; nothing of them is
        // released. Timer tokens belong to the instance that armed them.
        node.pipeline.forget_instance();
        node.inbox.retain(|m| !matches!(m, NodeInput::Timer(_)));
        node.following.running = label;
        node.following.swapping = None;
        self.stats.swaps += 1;
        self.schedule_wake(i);
    }

    /// At the end of the run: every member that is up can run the protocol
    /// the newest configuration chosen makes active, whether or not it
    /// has polled that configuration yet.
    pub(crate) fn check_active_protocol(&mut self) {
        let newest = self
            .chosen
            .range((CONFIG_KEY.to_vec(), 0)..=(CONFIG_KEY.to_vec(), u64::MAX))
            .next_back()
            .map(|(_, v)| v.clone());
        let Some(value) = newest else {
            return;
        };
        let active = match decode(value.as_deref()) {
            Ok(c) => label_of(&c.protocol.active),
            Err(e) => {
                self.violations
                    .push(format!("the newest configuration is undecodable: {e}"));
                return;
            }
        };
        let latest = self.latest().clone();
        for node in &self.nodes {
            if !node.off && latest.contains(node.id) && !node.following.can_run(active) {
                self.violations.push(format!(
                    "replica {} is a member and cannot run the active protocol {active} \
                     (at the end of the run)",
                    node.id
                ));
            }
        }
    }

    // ----- operators activate ---------------------------------------------

    /// Operator `k` asks a replica that is up to activate a protocol.
    pub(crate) fn activate(&mut self, k: usize) {
        let up = self.up_members();
        if up.is_empty() {
            let t = self.now + 100;
            self.at(t, Ev::Activate(k));
            return;
        }
        let node = up[self.swap_rng.range(0, up.len() as u64 - 1) as usize];
        // Mostly towards the protocol the cluster does not start on.
        let target = self.swap_rng.chance(0.7).then(|| NEXT.to_string());
        self.operators[k] = Some(Operator {
            node,
            lives: self.nodes[node].lives,
            target,
            nonce: 0,
            asked: Vec::new(),
            read: None,
            phase: Phase::Look(Update::new()),
            busy: false,
        });
        self.stats.activations += 1;
        self.operate(k);
    }

    /// Issues operator `k`'s next operation, if none is in flight.
    pub(crate) fn operate(&mut self, k: usize) {
        let Some(op) = self.operators[k].as_mut() else {
            return;
        };
        if op.busy || op.over() {
            return;
        }
        let i = op.node;
        if self.nodes[i].core.is_none() || self.nodes[i].lives != op.lives {
            // The replica it asked went down: the operator's request failed.
            op.phase = Phase::Over;
            self.stats.activations_lost += 1;
            return;
        }
        let update = match &mut op.phase {
            Phase::Look(u) | Phase::Begin(u) | Phase::Conclude(u, _) => u,
            Phase::Wait { readiness, reading } => {
                match readiness.poll(self.now) {
                    Poll::Decided(d) => {
                        op.phase = Phase::Conclude(Update::new(), d);
                        return self.operate(k);
                    }
                    Poll::Read(waiting) => {
                        if !reading.is_empty() {
                            return;
                        }
                        reading.extend(waiting.iter().copied());
                        let nonce = op.nonce;
                        for r in waiting {
                            let read = Operation::Read(Consistency::Linearizable);
                            self.sys_request(
                                i,
                                ready_key(nonce, r),
                                read,
                                SysCall::Readiness(k, r),
                            );
                        }
                    }
                }
                return;
            }
            Phase::Clean(_) | Phase::Over => return,
        };
        match update.poll().clone() {
            Want::Read => {
                op.busy = true;
                let read = Operation::Read(Consistency::Linearizable);
                self.sys_request(i, CONFIG_KEY.to_vec(), read, SysCall::Operator(k));
            }
            Want::Write { command } => {
                op.busy = true;
                let write = Operation::Command(command.encode());
                self.sys_request(i, CONFIG_KEY.to_vec(), write, SysCall::Operator(k));
            }
            Want::Done { .. } => self.phase_done(k),
            Want::GaveUp => {
                op.phase = Phase::Over;
                self.stats.activations_failed += 1;
            }
        }
    }

    /// The answer to operator `k`'s operation on the record.
    fn operator_answer(&mut self, k: usize, outcome: Outcome) {
        let now_wall = {
            let op = self.operators[k]
                .as_ref()
                .expect("answering a started operator");
            self.clock(op.node)
        };
        let op = self.operators[k]
            .as_mut()
            .expect("answering a started operator");
        op.busy = false;
        if let Phase::Clean(left) = &mut op.phase {
            *left -= 1;
            if *left == 0 {
                op.phase = Phase::Over;
            }
            return;
        }
        let by = self.nodes[op.node].id;
        let (update, edit): (&mut Update, EditFn) = match &mut op.phase {
            Phase::Look(u) => (u, EditFn::Nothing),
            Phase::Begin(u) => (u, EditFn::Begin),
            Phase::Conclude(u, d) => (u, EditFn::Conclude(d.clone())),
            _ => return,
        };
        match (update.poll().clone(), outcome) {
            (Want::Read, Outcome::Done(current)) => {
                let mut config = match decode(current.value.as_deref()) {
                    Ok(c) => c,
                    Err(e) => {
                        op.phase = Phase::Over;
                        self.violations
                            .push(format!("an undecodable configuration: {e}"));
                        return;
                    }
                };
                let next = match &edit {
                    EditFn::Nothing => Ok(false),
                    EditFn::Begin => {
                        activation::begin(&mut config, op.target.clone(), Swap::Activate, op.nonce)
                            .map(|_| true)
                    }
                    EditFn::Conclude(d) => activation::conclude(
                        &mut config,
                        op.nonce,
                        &op.target,
                        Swap::Activate,
                        d,
                        by,
                        now_wall,
                    )
                    .map(|()| true),
                };
                match next {
                    Ok(write) => {
                        let bytes = write.then(|| config.encode());
                        update.handle_read(current.version, current.value.is_some(), bytes);
                        op.read = Some(config);
                    }
                    Err(_) => {
                        // Refused (another is being checked) or replaced.
                        op.phase = Phase::Over;
                        self.stats.activations_refused += 1;
                        return;
                    }
                }
            }
            (Want::Write { .. }, Outcome::Done(current)) => {
                update.handle_written(Some(current.version))
            }
            (Want::Write { .. }, Outcome::Rejected(..)) => update.handle_written(None),
            _ => {
                // Unavailable: the operator's request fails.
                op.phase = Phase::Over;
                self.stats.activations_failed += 1;
                return;
            }
        }
        self.operate(k);
    }

    /// Operator `k`'s update of the record is done: the next phase.
    fn phase_done(&mut self, k: usize) {
        let planted = self.cfg.planted_quorum_readiness;
        let now = self.now;
        let clock = {
            let op = self.operators[k].as_ref().expect("started");
            self.clock(op.node)
        };
        let op = self.operators[k].as_mut().expect("started");
        let i = op.node;
        let epoch = self.nodes[i].epoch;
        match std::mem::replace(&mut op.phase, Phase::Over) {
            Phase::Look(_) => {
                let active = op.read.as_ref().and_then(|c| c.protocol.active.clone());
                if active == op.target {
                    self.stats.activations_noop += 1;
                    return;
                }
                op.nonce = clock;
                op.phase = Phase::Begin(Update::new());
            }
            Phase::Begin(_) => {
                // Every member of the membership this replica runs.
                let m = self.memberships[epoch as usize - 1].clone();
                let asked: Vec<ReplicaId> =
                    m.voters.iter().chain(m.learners.iter()).copied().collect();
                let mut readiness = Readiness::new(asked.clone(), now);
                if planted {
                    readiness.plant_a_quorum_is_enough();
                }
                op.asked = asked;
                op.phase = Phase::Wait {
                    readiness,
                    reading: BTreeSet::new(),
                };
            }
            Phase::Conclude(_, decision) => {
                match decision {
                    Decision::Go => self.stats.activations_gone += 1,
                    Decision::Refused(_) => self.stats.activations_refused += 1,
                }
                let asked = op.asked.clone();
                let nonce = op.nonce;
                op.phase = Phase::Clean(asked.len());
                op.busy = false;
                for r in asked {
                    let delete = Operation::Command(Command::Delete.encode());
                    self.sys_request(i, ready_key(nonce, r), delete, SysCall::Operator(k));
                }
                return;
            }
            other => {
                op.phase = other;
                return;
            }
        }
        self.operate(k);
    }
}

enum EditFn {
    Nothing,
    Begin,
    Conclude(Decision),
}
