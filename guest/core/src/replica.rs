//! Per-key Paxos: one replica's acceptor and proposer, as a sans-IO state
//! machine.
//!
//! Each key is a sequence of single-decree Paxos instances, one per version
//! ("slot"). Slot `v + 1` decides the key's whole value at version `v + 1`,
//! computed by the key's policy from the value at `v`. Only the slot after
//! the newest chosen one is open, so an acceptor keeps O(1) state per key.
//!
//! Every slot starts with a shared *fast round* (ballot 0) that any replica
//! may use without a prepare: one round trip when a fast quorum
//! (`q_fast`, with `q_classic + 2 q_fast > n`) accepts. When proposers
//! collide, or a fast quorum does not answer in time, a classic round
//! (ballot >= 1, owned by one replica) recovers with Fast Paxos's rule.
//! `docs/design.md` gives the safety argument.
//!
//! A classic round's winner leads the key: acceptors carry its promise
//! into later slots, so it runs phase 2 only ([`Msg::Continue`]) until
//! another replica prepares a higher ballot, and the other replicas forward
//! their commands for the key to it ([`Msg::Forward`]).
//!
//! Inputs: [`Replica::step`]. Outputs: the returned [`Ready`] (to persist),
//! then [`Replica::release`] (to send, complete and arm) once it is durable.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::types::*;
use crate::wire::{
    Accepted, Ballot, Chosen, KeyState as State, Msg, Proposal, ProposalId, Reply, ReplyOutcome,
};

/// Longest key the protocol accepts.
pub const KEY_MAX: usize = 4096;
/// How long a replica that missed a fast round is passed over by fast
/// rounds. A key's leader that let forwarded commands go unanswered is
/// passed over until it is heard from again.
pub const SUSPECT_MS: u64 = 1000;
/// Backoff between attempts starts at twice the measured round trip (at
/// least this), doubles, and is jittered to [0.5x, 1.5x].
pub const BACKOFF_MIN_MS: u64 = 1;
/// Backoff never exceeds this (before jitter).
pub const BACKOFF_MAX_MS: u64 = 1000;
/// Round-trip estimate before any round finished.
pub const RTT_INITIAL_MS: u64 = 2;
/// How many times a forwarded command is sent before the forwarder gives up.
pub const FORWARD_SENDS: u32 = 3;
/// Forwarded command ids a leader remembers per sender, with their replies.
pub const FORWARD_WINDOW: usize = 1024;
/// Keys this replica remembers leading; the oldest entry goes first.
pub const LEADS_MAX: usize = 1 << 16;
/// Times a linearizable read waits for a leader's pending slot to be
/// learned before it finishes the slot itself with a classic round.
pub const READ_WAITS: u32 = 3;
/// The reason code of a forwarded command's failure when the leader is a
/// newer instance than the one it was sent to (0 to 3 are the
/// [`FailureReason`]s no-quorum, contention, overloaded and invalid).
const REASON_RESTARTED: u8 = 4;
/// Longest rejection or failure text a forwarded reply carries.
pub const REPLY_TEXT_MAX: usize = 1024;
/// Most commands one proposal carries: the first and the queued commands
/// for the key run behind it (see [`Replica::own_proposal`]).
pub const BATCH_MAX: usize = 64;
/// Most bytes the queued commands of one batch add: their commands and the
/// values their answers carry.
pub const BATCH_BYTES_MAX: usize = 1 << 20;

/// A decision that changed nothing else about its key stays in memory for
/// one to two of these before it is written on its own (see
/// [`Replica::step`]). Deadlines are whole multiples, so the decisions held
/// in one window are written by one step, in one transaction.
pub const LAZY_MS: u64 = 10;
/// Most keys whose decisions are held in memory at once.
pub const LAZY_KEYS_MAX: usize = 4096;
/// Most bytes (keys and values) of decisions held in memory at once.
pub const LAZY_BYTES_MAX: usize = 4 << 20;

/// Bits of a query id that count queries within one incarnation; see
/// [`Replica::next_query_id`].
pub const QUERY_SEQ_BITS: u32 = 40;

/// The review defects, put back one at a time so tests can show that the
/// schedules and the simulator catch each of them.
#[derive(Clone, Copy, Debug, Default)]
struct Planted {
    /// A: a learner does not record the ballots it prepares with.
    ballot_reuse: bool,
    /// B: an exposed command is evaluated again in a later attempt.
    reevaluate: bool,
    /// C: query ids count from 1 in every instance.
    query_ids: bool,
    /// A leader that lost its promise moves to a higher ballot and skips
    /// phase 1.
    leader_skips_prepare: bool,
    /// The commands of a batch go back to the queue while the batch's
    /// proposal may still be chosen, so they can take effect twice.
    batch_requeue_exposed: bool,
    /// A key whose step voted and learned is held in memory like a
    /// decision: its vote is announced and never written.
    lazy_votes: bool,
}

/// How a step changed one key's state.
#[derive(Clone, Copy, Default)]
struct Dirty {
    /// It learned a decision: the write carries a commit.
    commit: bool,
    /// Anything else changed (a promise, an acceptance, a prepared
    /// ballot), or a held decision was put back: the state must be written.
    other: bool,
}

/// Log levels of the guest `log` interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// What a replica needs from its host while stepping: the key's policy.
pub trait Env {
    /// Runs the policy bound to `key`.
    fn apply(
        &mut self,
        key: &[u8],
        current: &Current,
        command: &[u8],
        now_ms: u64,
    ) -> Result<Change, Rejection>;
    /// Diagnostics; dropped by default.
    fn log(&mut self, _level: Level, _message: &str) {}
}

/// The two directions of a protocol implementation, native or wasm.
pub trait Core {
    /// Hands in a batch of events; returns what must be made durable.
    fn step(&mut self, batch: Batch) -> Ready;
    /// Returns the effects of ready `id` once the host has persisted it.
    /// Readies are released in the order `step` returned them.
    fn release(&mut self, id: u64) -> Actions;
    /// Moves the replica to a newer membership epoch, between two steps.
    fn reconfigure(&mut self, members: Members) -> Result<(), String>;
}

/// Classic quorum: any two intersect.
pub fn quorum_classic(n: usize) -> usize {
    n / 2 + 1
}

/// Fast quorum: the smallest size with `q_classic + 2 q_fast > 2n`, so a
/// classic quorum and any two fast quorums share an acceptor.
pub fn quorum_fast(n: usize) -> usize {
    (2 * n - quorum_classic(n)) / 2 + 1
}

#[derive(Clone, Debug)]
enum Kind {
    Command(Vec<u8>),
    Read,
}

#[derive(Clone, Debug)]
enum Phase {
    Idle,
    Fast {
        slot: u64,
        ballot: Ballot,
        acks: BTreeSet<ReplicaId>,
        nacks: BTreeSet<ReplicaId>,
    },
    Prepare {
        slot: u64,
        ballot: Ballot,
        promises: BTreeMap<ReplicaId, Option<Accepted>>,
    },
    Accept {
        slot: u64,
        ballot: Ballot,
        proposal: Proposal,
        acks: BTreeSet<ReplicaId>,
        /// Sent as [`Msg::Continue`]: phase 2 on a promise carried from an
        /// earlier slot.
        carried: bool,
    },
    Query {
        id: u64,
        replies: BTreeMap<ReplicaId, (Chosen, Option<Accepted>)>,
    },
    /// Handed to the key's leader, instance `incarnation` of replica `to`.
    Forward {
        id: u64,
        to: ReplicaId,
        incarnation: u64,
        sends: u32,
    },
    Backoff,
    /// A read (or a command's confirming read) waits for a leader's
    /// pending `slot` to be learned.
    Wait {
        slot: u64,
    },
}

impl Phase {
    fn slot(&self) -> Option<u64> {
        match self {
            Phase::Fast { slot, .. } | Phase::Prepare { slot, .. } | Phase::Accept { slot, .. } => {
                Some(*slot)
            }
            _ => None,
        }
    }
}

/// A client operation this replica coordinates.
#[derive(Clone, Debug)]
struct Op {
    request: u64,
    kind: Kind,
    attempts: u32,
    phase: Phase,
    /// Our proposal, and the slot it was computed for.
    own: Option<(u64, Proposal)>,
    /// Slots where an accept carrying our own proposal went out and whose
    /// winner we do not know yet: the command may have taken effect there.
    exposed: BTreeSet<u64>,
    /// The timer token that is current for this op.
    token: u64,
    /// Highest ballot counter seen in refusals for the current slot.
    counter_seen: u64,
    /// Why the last attempt did not finish.
    trouble: FailureReason,
    /// The key had no value at the slot before `own`'s.
    own_prior_absent: bool,
    /// Classic rounds started for this op.
    prepares: u32,
    /// Set when the op's own proposal won a slot: whether in the fast round.
    won: Option<bool>,
    /// A command forwarded by another replica: its id there, answered with
    /// [`Msg::Forwarded`] instead of a completion.
    origin: Option<(ReplicaId, u64)>,
    /// Times a read waited for a pending slot.
    waits: u32,
    /// When the current round's requests went out.
    sent_ms: u64,
    /// This command's own result if `own` wins: the proposal's value is
    /// the batch's last.
    own_value: Option<Vec<u8>>,
    /// Queued commands that ride in `own` behind this one, with what each
    /// answers if `own` wins. They are attached only while `own` may still
    /// win: once it lost, or never went out, they go back to the queue.
    batch: Vec<Member>,
}

/// A command carried in another op's proposal.
#[derive(Clone, Debug)]
struct Member {
    op: Op,
    /// Versions of the batch up to and including this command's: its answer
    /// names version `slot - 1 + offset`.
    offset: u64,
    result: MemberResult,
}

#[derive(Clone, Debug)]
enum MemberResult {
    Changed {
        value: Option<Vec<u8>>,
        prior_absent: bool,
    },
    Kept(Option<Vec<u8>>),
    Rejected(Rejection, Option<Vec<u8>>),
}

/// Forwarded command ids seen from one sender by this instance: ids at or
/// below `floor` are too old to tell and are dropped, the others map to the
/// reply once there is one.
#[derive(Default)]
struct Seen {
    floor: u64,
    ids: BTreeMap<u64, Option<Reply>>,
}

#[derive(Default)]
struct KeyOps {
    active: Option<Op>,
    queue: VecDeque<Op>,
    /// Commands handed to the key's leader and waiting for its answer. They
    /// hold no slot here, so the next op starts at once: a replica keeps
    /// every queued command for a led key on its way to the leader, where
    /// they can share a batch.
    forwarding: Vec<Op>,
}

/// One replica's protocol logic.
pub struct Replica<E: Env> {
    config: Config,
    /// Who votes and who learns, and in which epoch; see [`Replica::reconfigure`].
    members: Members,
    env: E,
    q_classic: usize,
    q_fast: usize,
    /// Source of proposal seqs and timer tokens.
    seq: u64,
    /// Queries sent by this instance; see [`Replica::next_query_id`].
    queries: u64,
    rng: u64,
    now_ms: u64,
    ops: BTreeMap<Vec<u8>, KeyOps>,
    inflight: usize,
    /// Keys this instance leads, with the ballot: a classic quorum
    /// accepted this instance's proposal at it, so while the acceptors'
    /// promise stays there the next slot needs phase 2 only.
    leads: BTreeMap<Vec<u8>, Ballot>,
    /// Commands forwarded to this instance, by sender.
    forwarded_in: BTreeMap<ReplicaId, Seen>,
    /// Smoothed round trip of this replica's rounds, in ms.
    rtt_ms: u64,
    /// The newest instance of each peer its forwarded replies named.
    instances: BTreeMap<ReplicaId, u64>,
    suspect_until: BTreeMap<ReplicaId, u64>,
    ready_next: u64,
    unreleased: VecDeque<(u64, Actions)>,
    /// Scratch for the step in progress.
    states: BTreeMap<Vec<u8>, State>,
    dirty: BTreeMap<Vec<u8>, Dirty>,
    /// Decisions learned in steps that changed nothing else about their
    /// key, not written yet: the key's state as that step left it. The
    /// next step that touches the key puts it back and writes it, with
    /// whatever that step adds (a follower's next vote); a timer writes it
    /// 10 to 20 ms later ([`LAZY_MS`]) if nothing touched the key. A crash loses it,
    /// which is losing a `Learn` message: the acceptances that chose the
    /// value are durable at a quorum.
    lazy: BTreeMap<Vec<u8>, State>,
    lazy_bytes: usize,
    /// Keys this step voted on (or held a read's answer for), each with
    /// how many messages and completions this step had made when it first
    /// did: what is said about the key from then on must wait for this
    /// step's writes to be durable (see `split_actions`).
    voted: BTreeMap<Vec<u8>, (usize, usize)>,
    /// The key of each completion made in this step.
    completion_keys: BTreeMap<u64, Vec<u8>>,
    /// Messages of this step to other replicas, in the order they were
    /// made, each marked if it is a proposer's request (Prepare, Accept,
    /// Continue, Query, Forward).
    outbox: Vec<(Outbound, bool)>,
    /// Ballots this step prepared with, by key: their record is in this
    /// step's writes, so an Accept at one of them waits for this ready.
    prepared: BTreeSet<(Vec<u8>, Ballot)>,
    /// Requests that wait for this ready (Accepts at a ballot of `prepared`).
    held: Vec<Outbound>,
    /// Keys whose active op was forwarded in this step: their next op
    /// starts before the step ends.
    kicked: Vec<Vec<u8>>,
    actions: Actions,
    loopback: VecDeque<(Vec<u8>, Msg)>,
    planted_epoxy: bool,
    planted_early_votes: bool,
    planted: Planted,
    /// Key-state format this replica writes.
    state_format: u8,
}

/// The protocol's version when it writes key-state `format`: 0.7.x writes
/// format 3 (and reads 4, so it can take over from 0.8.x), 0.8.x writes 4.
/// 0.7 and 0.8 add batches (proposals that advance a key by several
/// versions) to 0.5 and 0.6, which added leaders (carried promises,
/// [`Msg::Continue`], forwarding). Both write wire format 3 and read
/// formats 1 and 2 and key-state formats 1 and 2.
pub fn protocol_version(format: u8) -> &'static str {
    if format == crate::wire::STATE_FORMAT_CHECKED {
        "0.8.0"
    } else {
        "0.7.0"
    }
}

impl<E: Env> Replica<E> {
    /// Starts a replica; volatile state starts empty.
    ///
    /// A replica starts in epoch 1 with `config.voters` as voters. A replica
    /// outside that list (a learner that has just joined) starts as an
    /// observer and takes its real membership from [`Replica::reconfigure`]
    /// before its first step.
    pub fn new(config: Config, env: E) -> Result<Self, String> {
        let members = Members::initial(config.voters.clone());
        members.validate()?;
        if config.attempts_max == 0 || config.inflight_max == 0 {
            return Err("attempts-max and inflight-max must be at least 1".to_string());
        }
        let n = members.voters.len();
        Ok(Replica {
            q_classic: quorum_classic(n),
            q_fast: quorum_fast(n),
            config,
            members,
            env,
            seq: 0,
            queries: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            now_ms: 0,
            ops: BTreeMap::new(),
            inflight: 0,
            leads: BTreeMap::new(),
            forwarded_in: BTreeMap::new(),
            rtt_ms: RTT_INITIAL_MS,
            instances: BTreeMap::new(),
            suspect_until: BTreeMap::new(),
            ready_next: 1,
            unreleased: VecDeque::new(),
            states: BTreeMap::new(),
            dirty: BTreeMap::new(),
            lazy: BTreeMap::new(),
            lazy_bytes: 0,
            voted: BTreeMap::new(),
            completion_keys: BTreeMap::new(),
            outbox: Vec::new(),
            prepared: BTreeSet::new(),
            held: Vec::new(),
            kicked: Vec::new(),
            actions: Actions::default(),
            loopback: VecDeque::new(),
            planted_epoxy: false,
            planted_early_votes: false,
            planted: Planted::default(),
            state_format: crate::wire::STATE_FORMAT,
        })
    }

    /// Moves this replica to a newer membership epoch, between two steps.
    ///
    /// Quorums are counted among the new voters from now on. Every round in
    /// progress loses the votes it gathered: they were given in the old
    /// epoch, and no reply stamped with the old epoch counts any more (nor
    /// does a request reach an acceptor of another epoch). Each such round is
    /// picked up again when its timer fires, in the new epoch. Reapplying the
    /// current membership is a no-op; an older epoch, or the same epoch with
    /// other contents, is refused.
    pub fn reconfigure(&mut self, members: Members) -> Result<(), String> {
        members.validate()?;
        if members.epoch < self.members.epoch
            || (members.epoch == self.members.epoch && members != self.members)
        {
            return Err(format!(
                "membership epoch {} cannot replace epoch {}",
                members.epoch, self.members.epoch
            ));
        }
        if members == self.members {
            return Ok(());
        }
        let n = members.voters.len();
        self.q_classic = quorum_classic(n);
        self.q_fast = quorum_fast(n);
        self.members = members;
        self.suspect_until
            .retain(|r, _| self.members.voters.contains(r));
        // A lead rests on a classic quorum of the old voters.
        self.leads.clear();
        for ops in self.ops.values_mut() {
            if let Some(op) = ops.active.as_mut() {
                match &mut op.phase {
                    Phase::Fast { acks, nacks, .. } => {
                        acks.clear();
                        nacks.clear();
                    }
                    Phase::Prepare { promises, .. } => promises.clear(),
                    Phase::Accept { acks, .. } => acks.clear(),
                    Phase::Query { replies, .. } => replies.clear(),
                    Phase::Idle | Phase::Backoff | Phase::Wait { .. } | Phase::Forward { .. } => {}
                }
            }
        }
        Ok(())
    }

    /// The membership this replica runs.
    pub fn members(&self) -> &Members {
        &self.members
    }

    fn is_voter(&self) -> bool {
        self.members.voters.contains(&self.config.self_id)
    }

    /// Chooses the key-state format this replica writes (it reads them
    /// all): [`crate::wire::STATE_FORMAT`] or
    /// [`crate::wire::STATE_FORMAT_CHECKED`].
    pub fn write_state_format(&mut self, format: u8) -> Result<(), String> {
        if ![crate::wire::STATE_FORMAT, crate::wire::STATE_FORMAT_CHECKED].contains(&format) {
            return Err(format!("no key-state format {format}"));
        }
        self.state_format = format;
        Ok(())
    }

    /// Replaces the safe fast round with the one the background describes as
    /// unsafe: each proposer skips prepare with its own ballot (1, id) and
    /// waits for Epoxy's fast quorum. Exists only so tests can show that the
    /// checker catches it.
    #[cfg(feature = "planted-bugs")]
    pub fn plant_epoxy_fast_path(&mut self) {
        self.planted_epoxy = true;
        let n = self.members.voters.len();
        self.q_fast = n - (self.q_classic - 1) / 2;
    }

    /// Lets every effect of a step leave before its writes are durable:
    /// votes are announced before they are on disk. Exists only so tests
    /// can show that the simulator catches it.
    #[cfg(feature = "planted-bugs")]
    pub fn plant_early_votes(&mut self) {
        self.planted_early_votes = true;
    }

    /// Defect A of the review: a learner prepares without recording its
    /// ballot, so it may use one ballot twice. For the checker's tests only.
    #[cfg(feature = "planted-bugs")]
    pub fn plant_ballot_reuse(&mut self) {
        self.planted.ballot_reuse = true;
    }

    /// Defect B of the review: a command whose proposal went out is
    /// evaluated again by a later attempt. For the checker's tests only.
    #[cfg(feature = "planted-bugs")]
    pub fn plant_reevaluation(&mut self) {
        self.planted.reevaluate = true;
    }

    /// Defect C of the review: query ids restart in every instance. For
    /// the checker's tests only.
    #[cfg(feature = "planted-bugs")]
    pub fn plant_query_id_reuse(&mut self) {
        self.planted.query_ids = true;
    }

    /// A leader that lost its promise to a higher ballot moves above it and
    /// sends its proposal straight to phase 2, skipping phase 1. For the
    /// checker's tests only.
    #[cfg(feature = "planted-bugs")]
    pub fn plant_leader_skips_prepare(&mut self) {
        self.planted.leader_skips_prepare = true;
    }

    /// Dissolves a batch while its proposal may still be chosen (every time
    /// the op is picked up again), so its commands can run twice. For the
    /// checker's tests only.
    #[cfg(feature = "planted-bugs")]
    pub fn plant_batch_requeue_exposed(&mut self) {
        self.planted.batch_requeue_exposed = true;
    }

    /// Holds a step's state in memory like a decision even when the step
    /// voted on the key, so a vote can be announced and lost in a crash.
    /// For the checker's tests only.
    #[cfg(feature = "planted-bugs")]
    pub fn plant_lazy_votes(&mut self) {
        self.planted.lazy_votes = true;
    }

    /// The protocol's name and formats, writing the default key-state
    /// format.
    pub fn info() -> Info {
        Self::info_writing(crate::wire::STATE_FORMAT)
    }

    /// The protocol's name and formats when it writes key-state `format`:
    /// every format it reads, the one it writes last.
    pub fn info_writing(format: u8) -> Info {
        let mut state_formats: Vec<u32> = crate::wire::STATE_FORMATS
            .iter()
            .filter(|f| **f != format)
            .map(|f| *f as u32)
            .collect();
        state_formats.push(format as u32);
        Info {
            name: "ballot-paxos".to_string(),
            version: protocol_version(format).to_string(),
            state_formats,
            wire_formats: crate::wire::WIRE_FORMATS
                .iter()
                .map(|f| *f as u32)
                .collect(),
        }
    }

    /// Gives access to the environment (the policy host).
    pub fn env_mut(&mut self) -> &mut E {
        &mut self.env
    }

    fn n(&self) -> usize {
        self.members.voters.len()
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// A query id no earlier instance of this replica used: the low
    /// [`QUERY_SEQ_BITS`] bits count this instance's queries, the bits above
    /// hold its incarnation (which the host makes durable and raises before
    /// every new instance). Replies are matched by id, so a reply to an
    /// earlier incarnation's query, still in the network, can never answer
    /// this one's. Ids repeat only after 2^24 incarnations, or after 2^40
    /// queries of one instance; neither happens within any reply's lifetime.
    fn next_query_id(&mut self) -> u64 {
        if self.planted.query_ids {
            return self.next_seq();
        }
        self.queries += 1;
        let counter = self.queries & ((1 << QUERY_SEQ_BITS) - 1);
        let incarnation = self.config.incarnation & ((1 << (64 - QUERY_SEQ_BITS)) - 1);
        (incarnation << QUERY_SEQ_BITS) | counter
    }

    fn random(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    // ----- state access -------------------------------------------------

    fn state(&mut self, key: &[u8]) -> &mut State {
        match self.states.get_mut(key) {
            Some(s) => s,
            None => panic!("host contract: no state supplied for a key the batch touches"),
        }
    }

    /// The ops of `key`, an empty entry made if there is none.
    fn key_ops(&mut self, key: &[u8]) -> &mut KeyOps {
        if !self.ops.contains_key(key) {
            self.ops.insert(key.to_vec(), KeyOps::default());
        }
        self.ops.get_mut(key).expect("inserted above")
    }

    fn mark_dirty(&mut self, key: &[u8], committed: bool) {
        // Looked up first: the entry API would copy the key every time.
        let entry = match self.dirty.get_mut(key) {
            Some(entry) => entry,
            None => self.dirty.entry(key.to_vec()).or_default(),
        };
        entry.commit |= committed;
        entry.other |= !committed;
    }

    /// Records a change of this replica's promise or acceptance on `key`.
    fn mark_voted(&mut self, key: &[u8]) {
        self.mark_dirty(key, false);
        self.hold_from_here(key);
    }

    /// What this step says about `key` from here on waits for its writes.
    fn hold_from_here(&mut self, key: &[u8]) {
        if !self.voted.contains_key(key) {
            let mark = (self.outbox.len(), self.actions.complete.len());
            self.voted.insert(key.to_vec(), mark);
        }
    }

    fn complete(&mut self, key: &[u8], completion: Completion) {
        self.completion_keys.insert(completion.id, key.to_vec());
        self.actions.complete.push(completion);
    }

    fn learn(&mut self, key: &[u8], chosen: &Chosen) -> bool {
        let learned = self.state(key).learn(chosen);
        if learned {
            self.mark_dirty(key, true);
        }
        learned
    }

    fn current(&mut self, key: &[u8]) -> Current {
        let chosen = &self.state(key).chosen;
        Current {
            value: chosen.value.clone(),
            version: chosen.version,
        }
    }

    // ----- sending ------------------------------------------------------

    fn send(&mut self, to: ReplicaId, key: &[u8], msg: Msg) {
        if to == self.config.self_id {
            self.loopback.push_back((key.to_vec(), msg));
        } else {
            // A proposer's requests carry no vote of this replica's: their
            // content is fixed by votes already durable (see split_actions).
            let request = matches!(
                msg,
                Msg::Prepare { .. }
                    | Msg::Accept { .. }
                    | Msg::Continue { .. }
                    | Msg::Query { .. }
                    | Msg::Forward { .. }
            );
            // ... except an Accept at a ballot prepared in this very step
            // (promises to an earlier incarnation's prepare at the same
            // ballot can complete it at once): the ballot's record is in
            // this step's writes, and the Accept must not outlive a crash
            // that loses it.
            let hold = match &msg {
                Msg::Accept { ballot, .. } | Msg::Continue { ballot, .. }
                    if !self.planted.ballot_reuse =>
                {
                    self.prepared.contains(&(key.to_vec(), *ballot))
                }
                _ => false,
            };
            let out = Outbound {
                to,
                key: key.to_vec(),
                payload: msg.encode_at(self.members.epoch),
            };
            if hold {
                self.held.push(out);
            } else {
                self.outbox.push((out, request));
            }
        }
    }

    /// Sends a round's request to every voter (this replica included if it
    /// votes: the loopback handles it in the same step).
    fn broadcast(&mut self, key: &[u8], msg: &Msg) {
        for to in self.members.voters.clone() {
            self.send(to, key, msg.clone());
        }
    }

    fn arm(&mut self, key: &[u8], op: &mut Op, delay_ms: u64) {
        op.token = self.next_seq();
        self.actions.timers.push(Timer {
            key: key.to_vec(),
            token: op.token,
            at_ms: self.now_ms + delay_ms,
        });
    }

    // ----- the step -----------------------------------------------------

    /// Processes one batch. See [`Core::step`].
    pub fn step(&mut self, batch: Batch) -> Ready {
        self.now_ms = self.now_ms.max(batch.now_ms);
        self.rng ^= batch.seed;
        self.states.clear();
        self.dirty.clear();
        self.voted.clear();
        self.completion_keys.clear();
        self.prepared.clear();
        for ks in batch.states {
            match State::decode(&ks.state) {
                Ok(mut s) => {
                    if let Some(held) = self.lazy.remove(&ks.key) {
                        self.lazy_bytes -= lazy_size(&ks.key, &held);
                        // The stored state is the one before the step that
                        // learned it: learning again gives what that step
                        // left (the planted bug takes the held state whole,
                        // votes included).
                        if self.planted.lazy_votes {
                            s = held;
                        } else {
                            s.learn(&held.chosen);
                        }
                        let d = self.dirty.entry(ks.key.clone()).or_default();
                        d.commit = true;
                        d.other = true;
                    }
                    self.states.insert(ks.key, s);
                }
                Err(e) => {
                    // Stored bytes this protocol cannot read: refuse to act on
                    // the key rather than guess (the host reports the error).
                    self.env
                        .log(Level::Error, &format!("undecodable state for a key: {e}"));
                }
            }
        }
        for request in batch.requests {
            self.on_request(request);
            self.drain_loopback();
        }
        for m in batch.messages {
            if !self.states.contains_key(&m.key) {
                continue;
            }
            if m.from != self.config.self_id && !self.members.contains(m.from) {
                self.env.log(
                    Level::Debug,
                    &format!("message from replica {}, not a member", m.from),
                );
                continue;
            }
            match Msg::decode_any(&m.payload) {
                Ok((epoch, msg)) => {
                    // Votes count only between replicas of one epoch: a
                    // request or reply of another epoch is dropped (its
                    // sender or this replica is about to move on). Decided
                    // facts hold in every epoch.
                    if epoch != self.members.epoch && !msg.is_fact() {
                        self.env.log(
                            Level::Debug,
                            &format!(
                                "dropped a message of epoch {epoch} from {} (at epoch {})",
                                m.from, self.members.epoch
                            ),
                        );
                        continue;
                    }
                    self.suspect_until.remove(&m.from);
                    self.on_message(m.from, &m.key, msg);
                    self.resolve(&m.key);
                }
                Err(e) => self.env.log(
                    Level::Warn,
                    &format!("dropped a message from {}: {e}", m.from),
                ),
            }
            self.drain_loopback();
        }
        for t in batch.timers {
            if self.states.contains_key(&t.key) {
                self.on_timer(&t.key, t.token);
                self.drain_loopback();
            }
        }
        let id = self.ready_next;
        self.ready_next += 1;
        let dirty = core::mem::take(&mut self.dirty);
        let mut persist = Vec::with_capacity(dirty.len());
        for (key, d) in dirty {
            if self.may_hold(&key, d) {
                let st = self.states.remove(&key).expect("a dirty key has a state");
                self.lazy_bytes += lazy_size(&key, &st);
                self.lazy.insert(key.clone(), st);
                let token = self.next_seq();
                self.actions.timers.push(Timer {
                    key,
                    token,
                    at_ms: (self.now_ms / LAZY_MS + 2) * LAZY_MS,
                });
                continue;
            }
            let st = &self.states[&key];
            let commit = d.commit.then(|| Commit {
                version: st.chosen.version,
                value: st.chosen.value.clone(),
            });
            persist.push(Write {
                state: st.encode_as(self.state_format),
                key,
                commit,
            });
        }
        self.states.clear();
        let (early, actions) = self.split_actions();
        self.unreleased.push_back((id, actions));
        Ready { id, persist, early }
    }

    /// Whether this step's change to `key` may stay in memory instead of
    /// being written (see `lazy`): it learned a decision and changed
    /// nothing else, it said nothing about the key that waits for this
    /// ready (no vote, no read that answers from what it learned), the key
    /// is not one of the cluster's own (the host acts on their commits as
    /// they become durable), and the bounds leave room.
    fn may_hold(&self, key: &[u8], d: Dirty) -> bool {
        if !d.commit || key.first() == Some(&0) {
            return false;
        }
        if !self.planted.lazy_votes && (d.other || self.voted.contains_key(key)) {
            return false;
        }
        let size = lazy_size(key, &self.states[key]);
        self.lazy.len() < LAZY_KEYS_MAX && self.lazy_bytes + size <= LAZY_BYTES_MAX
    }

    /// Splits this step's effects into those that may leave once every
    /// earlier ready is durable and those that wait for this ready's writes.
    ///
    /// Early: a proposer's Prepare, Accept and Query (their ballots and
    /// values follow from promises and acceptances made in earlier steps,
    /// which are durable before anything early leaves; a proposal id is
    /// unique across restarts), timers, and every other message and
    /// completion about a key that this step made before it first changed
    /// a promise or acceptance of this replica on that key (learned facts,
    /// answers decided by votes that are durable): no such effect reads a
    /// promise or acceptance changed in this step, and the only other
    /// change to the key's state it can read is a learn, which records a
    /// value already chosen. From the first vote on, what is said about the
    /// key (Promise, Accepted, Nack, a Learn or an answer that may count
    /// this step's vote) waits for this ready. Messages keep the order they
    /// were made in, so a leader's Learn of one slot reaches a follower
    /// before its Continue of the next.
    fn split_actions(&mut self) -> (Actions, Actions) {
        let all = core::mem::take(&mut self.actions);
        debug_assert!(all.send.is_empty(), "messages go through the outbox");
        let mut voted = core::mem::take(&mut self.voted);
        if self.planted_early_votes {
            voted.clear();
        }
        let keys = core::mem::take(&mut self.completion_keys);
        let mut early = Actions {
            timers: all.timers,
            ..Actions::default()
        };
        let mut after = Actions {
            send: core::mem::take(&mut self.held),
            ..Actions::default()
        };
        for (i, (o, request)) in core::mem::take(&mut self.outbox).into_iter().enumerate() {
            let waits = !request && voted.get(&o.key).is_some_and(|&(from, _)| i >= from);
            if waits {
                after.send.push(o);
            } else {
                early.send.push(o);
            }
        }
        for (i, c) in all.complete.into_iter().enumerate() {
            let waits = keys
                .get(&c.id)
                .is_none_or(|k| voted.get(k).is_some_and(|&(_, from)| i >= from));
            if waits {
                after.complete.push(c);
            } else {
                early.complete.push(c);
            }
        }
        (early, after)
    }

    /// Returns the effects of a persisted ready. See [`Core::release`].
    pub fn release(&mut self, id: u64) -> Actions {
        match self.unreleased.front() {
            Some((first, _)) if *first == id => self
                .unreleased
                .pop_front()
                .map(|(_, a)| a)
                .unwrap_or_default(),
            Some((first, _)) => panic!("host contract: released ready {id} before ready {first}"),
            None => panic!("host contract: released unknown ready {id}"),
        }
    }

    fn drain_loopback(&mut self) {
        // Messages to ourselves are handled at once; their state changes join
        // this step's ready, so they are durable before anything depending on
        // them is released.
        loop {
            if let Some((key, msg)) = self.loopback.pop_front() {
                let me = self.config.self_id;
                self.on_message(me, &key, msg);
                self.resolve(&key);
            } else if let Some(key) = self.kicked.pop() {
                if self.ops.get(&key).is_some_and(|ops| ops.active.is_none()) {
                    self.start_next(&key);
                }
            } else {
                break;
            }
        }
    }

    // ----- requests -----------------------------------------------------

    fn on_request(&mut self, request: Request) {
        let fail = |reason, message: &str| {
            Outcome::Failed(Failure {
                reason,
                maybe_applied: false,
                message: message.to_string(),
            })
        };
        if request.key.is_empty() || request.key.len() > KEY_MAX {
            let outcome = fail(FailureReason::Invalid, "key must be 1 to 4096 bytes");
            self.complete(
                &request.key,
                Completion {
                    id: request.id,
                    outcome,
                    trace: Trace::default(),
                },
            );
            return;
        }
        if !self.states.contains_key(&request.key) {
            let outcome = fail(
                FailureReason::Invalid,
                "the key's stored state is unreadable",
            );
            self.complete(
                &request.key,
                Completion {
                    id: request.id,
                    outcome,
                    trace: Trace::default(),
                },
            );
            return;
        }
        let kind = match request.op {
            Operation::Read(Consistency::Local) => {
                let outcome = Outcome::Done(self.current(&request.key));
                self.complete(
                    &request.key,
                    Completion {
                        id: request.id,
                        outcome,
                        trace: Trace::default(),
                    },
                );
                return;
            }
            Operation::Read(Consistency::Linearizable) => Kind::Read,
            Operation::Command(c) => Kind::Command(c),
        };
        if self.inflight >= self.config.inflight_max as usize {
            let outcome = fail(
                FailureReason::Overloaded,
                "too many operations in flight on this replica",
            );
            self.complete(
                &request.key,
                Completion {
                    id: request.id,
                    outcome,
                    trace: Trace::default(),
                },
            );
            return;
        }
        self.inflight += 1;
        self.enqueue(&request.key, Op::new(request.id, kind, None));
    }

    fn enqueue(&mut self, key: &[u8], op: Op) {
        let ops = self.key_ops(key);
        ops.queue.push_back(op);
        if ops.active.is_none() {
            self.start_next(key);
        }
    }

    /// A command another replica forwarded to this instance, as the key's
    /// leader. It runs at most once per instance: a copy addressed to an
    /// earlier instance is not run (that instance may have run it: the
    /// answer says the outcome is unknown), and a duplicate gets the reply
    /// again once there is one.
    fn on_forward(
        &mut self,
        from: ReplicaId,
        key: &[u8],
        id: u64,
        incarnation: u64,
        command: Vec<u8>,
    ) {
        if incarnation != self.config.incarnation {
            if incarnation < self.config.incarnation {
                let reply = Reply {
                    outcome: ReplyOutcome::Failed {
                        reason: REASON_RESTARTED,
                        maybe_applied: true,
                        message: "the leader restarted with the command in flight".to_string(),
                    },
                    changed: false,
                    prior_absent: false,
                    fast: false,
                    attempts: 0,
                    prepares: 0,
                };
                self.send_reply(from, key, id, reply);
            }
            return;
        }
        let seen = self.forwarded_in.entry(from).or_default();
        if id <= seen.floor {
            return;
        }
        if let Some(reply) = seen.ids.get(&id) {
            if let Some(reply) = reply.clone() {
                self.send_reply(from, key, id, reply);
            }
            return;
        }
        seen.ids.insert(id, None);
        if seen.ids.len() > FORWARD_WINDOW {
            if let Some((oldest, _)) = seen.ids.pop_first() {
                seen.floor = oldest;
            }
        }
        let op = Op::new(0, Kind::Command(command), Some((from, id)));
        if key.is_empty() || key.len() > KEY_MAX {
            let failure = Failure {
                reason: FailureReason::Invalid,
                maybe_applied: false,
                message: "key must be 1 to 4096 bytes".to_string(),
            };
            return self.answer(key, op, Outcome::Failed(failure), Trace::default());
        }
        if self.inflight >= self.config.inflight_max as usize {
            let failure = Failure {
                reason: FailureReason::Overloaded,
                maybe_applied: false,
                message: "too many operations in flight on the key's leader".to_string(),
            };
            return self.answer(key, op, Outcome::Failed(failure), Trace::default());
        }
        self.inflight += 1;
        self.enqueue(key, op);
    }

    /// Completes `op`: to the host, or to the replica that forwarded it.
    fn answer(&mut self, key: &[u8], op: Op, outcome: Outcome, trace: Trace) {
        let Some((to, id)) = op.origin else {
            return self.complete(
                key,
                Completion {
                    id: op.request,
                    outcome,
                    trace,
                },
            );
        };
        let reply = reply_of(&outcome, &trace);
        if let Some(slot) = self
            .forwarded_in
            .get_mut(&to)
            .and_then(|seen| seen.ids.get_mut(&id))
        {
            *slot = Some(reply.clone());
        }
        self.send_reply(to, key, id, reply);
    }

    /// Answers forwarded command `id`, naming this instance.
    fn send_reply(&mut self, to: ReplicaId, key: &[u8], id: u64, reply: Reply) {
        let incarnation = self.config.incarnation;
        let msg = Msg::Forwarded {
            id,
            incarnation,
            reply,
        };
        self.send(to, key, msg);
    }

    fn start_next(&mut self, key: &[u8]) {
        let Some(ops) = self.ops.get_mut(key) else {
            return;
        };
        debug_assert!(ops.active.is_none());
        match ops.queue.pop_front() {
            Some(op) => self.advance(key, op),
            None => self.forget_if_idle(key),
        }
    }

    fn forget_if_idle(&mut self, key: &[u8]) {
        if self.ops.get(key).is_some_and(|ops| {
            ops.active.is_none() && ops.queue.is_empty() && ops.forwarding.is_empty()
        }) {
            self.ops.remove(key);
        }
    }

    /// Takes the forwarded op of `key` that `pick` chooses.
    fn take_forwarding(&mut self, key: &[u8], pick: impl Fn(&Op) -> bool) -> Option<Op> {
        let ops = self.ops.get_mut(key)?;
        let i = ops.forwarding.iter().position(pick)?;
        Some(ops.forwarding.swap_remove(i))
    }

    fn put_forwarding(&mut self, key: &[u8], op: Op) {
        self.ops
            .entry(key.to_vec())
            .or_default()
            .forwarding
            .push(op);
    }

    /// Completes a forwarded op; the key's active op is not affected.
    fn finish_forwarded(&mut self, key: &[u8], op: Op, outcome: Outcome, trace: Trace) {
        self.answer(key, op, outcome, trace);
        self.inflight -= 1;
        self.forget_if_idle(key);
    }

    fn put_active(&mut self, key: &[u8], op: Op) {
        let ops = self.key_ops(key);
        debug_assert!(ops.active.is_none());
        ops.active = Some(op);
    }

    fn take_active(&mut self, key: &[u8]) -> Option<Op> {
        self.ops.get_mut(key).and_then(|ops| ops.active.take())
    }

    fn finish(&mut self, key: &[u8], op: Op, outcome: Outcome) {
        // A read that learned its answer in this step answers once that
        // commit is durable here: whoever acts on the answer (a replay
        // moving its cursor) must not see it lost to a crash.
        if matches!(op.kind, Kind::Read) && self.dirty.get(key).is_some_and(|d| d.commit) {
            self.hold_from_here(key);
        }
        let trace = Trace {
            changed: op.won.is_some(),
            prior_absent: op.won.is_some() && op.own_prior_absent,
            fast: op.won == Some(true),
            attempts: op.attempts,
            prepares: op.prepares,
        };
        self.finish_with(key, op, outcome, trace)
    }

    fn finish_with(&mut self, key: &[u8], mut op: Op, outcome: Outcome, trace: Trace) {
        // Commands still riding in this op's proposal share its fate: if it
        // is out and may still be chosen, so may they; otherwise they wait
        // their turn again. (When it won, `settle` answered them already.)
        if op.own_out() {
            let message = match &outcome {
                Outcome::Failed(failure) => failure.message.clone(),
                _ => "outcome unknown: the batch this command rode in was not settled".to_string(),
            };
            for m in core::mem::take(&mut op.batch) {
                let failure = Failure {
                    reason: op.trouble,
                    maybe_applied: true,
                    message: message.clone(),
                };
                self.answer(key, m.op, Outcome::Failed(failure), Trace::default());
                self.inflight -= 1;
            }
        } else {
            self.requeue_batch(key, &mut op);
        }
        self.answer(key, op, outcome, trace);
        self.inflight -= 1;
        self.start_next(key);
    }

    fn fail(&mut self, key: &[u8], op: Op, reason: FailureReason, message: String) {
        let maybe_applied = !op.exposed.is_empty();
        self.finish(
            key,
            op,
            Outcome::Failed(Failure {
                reason,
                maybe_applied,
                message,
            }),
        );
    }

    fn evaluate(&mut self, key: &[u8], command: &[u8]) -> Result<Change, Rejection> {
        let current = self.current(key);
        let now = self.now_ms;
        self.env.apply(key, &current, command, now)
    }

    /// The op's own proposal if an accept carrying it went out for `slot`.
    fn exposed_at(&self, op: &Op, slot: u64) -> Option<Proposal> {
        if self.planted.reevaluate {
            return None;
        }
        match &op.own {
            Some((s, p)) if *s == slot && op.exposed.contains(&slot) => Some(p.clone()),
            _ => None,
        }
    }

    /// Our proposal for `slot` from `change`, reusing the earlier one when it
    /// was computed for the same slot (its id may already be accepted).
    ///
    /// A new proposal is a batch: after `op`'s command, the commands queued
    /// behind it for the key run in order through the policy, each on the
    /// value the ones before it left (up to [`BATCH_MAX`] commands and
    /// [`BATCH_BYTES_MAX`] bytes, stopping at a read). The proposal carries
    /// the last value and the number of commands that changed it; each of
    /// those takes the next version, so every command answers exactly what
    /// it would have run alone, one after the other, at the instant the
    /// slot is chosen.
    fn own_proposal(&mut self, key: &[u8], op: &mut Op, slot: u64, change: Change) -> Proposal {
        if let Some((s, p)) = &op.own {
            if *s == slot {
                return p.clone();
            }
        }
        self.requeue_batch(key, op);
        let mut value = match change {
            Change::Set(v) => Some(v),
            Change::Remove => None,
            Change::Keep => unreachable!("keep is never proposed"),
        };
        op.own_prior_absent = self.state(key).chosen.value.is_none();
        op.own_value = value.clone();
        let base = slot - 1;
        let mut count: u32 = 1;
        let mut bytes = 0;
        let now = self.now_ms;
        while op.batch.len() + 1 < BATCH_MAX {
            let Some(ops) = self.ops.get_mut(key) else {
                break;
            };
            let len = match ops.queue.front().map(|o| &o.kind) {
                Some(Kind::Command(c)) if bytes + c.len() <= BATCH_BYTES_MAX => c.len(),
                _ => break,
            };
            let member = ops.queue.pop_front().expect("a queued command");
            let Kind::Command(command) = &member.kind else {
                unreachable!("checked above")
            };
            bytes += len;
            let current = Current {
                value: value.clone(),
                version: base + count as u64,
            };
            let result = match self.env.apply(key, &current, command, now) {
                Ok(Change::Keep) => MemberResult::Kept(current.value),
                Err(rejection) => MemberResult::Rejected(rejection, current.value),
                Ok(change) => MemberResult::Changed {
                    value: match change {
                        Change::Set(v) => Some(v),
                        _ => None,
                    },
                    prior_absent: value.is_none(),
                },
            };
            bytes += match &result {
                MemberResult::Changed { value, .. }
                | MemberResult::Kept(value)
                | MemberResult::Rejected(_, value) => value.as_ref().map_or(0, Vec::len),
            };
            if bytes > BATCH_BYTES_MAX {
                // Its answer would carry too much (each answer holds its own
                // copy of a value): it waits for the next slot, unevaluated,
                // and the batch ends here.
                self.ops
                    .get_mut(key)
                    .expect("the key's ops")
                    .queue
                    .push_front(member);
                break;
            }
            if let MemberResult::Changed { value: next, .. } = &result {
                count += 1;
                value = next.clone();
            }
            op.batch.push(Member {
                op: member,
                offset: count as u64,
                result,
            });
        }
        let id = ProposalId {
            replica: self.config.self_id,
            incarnation: self.config.incarnation,
            seq: self.next_seq(),
        };
        let p = Proposal { id, value, count };
        op.own = Some((slot, p.clone()));
        p
    }

    /// Puts the commands riding in `op`'s proposal back at the head of the
    /// key's queue, in their order, and forgets the proposal: it did not win
    /// and never will, so they run again on the key's next value.
    fn requeue_batch(&mut self, key: &[u8], op: &mut Op) {
        if op.batch.is_empty() {
            return;
        }
        debug_assert!(!op.own_out());
        op.own = None;
        let batch = core::mem::take(&mut op.batch);
        self.push_front(key, batch);
    }

    /// Puts `members`' commands at the head of the key's queue, in order.
    fn push_front(&mut self, key: &[u8], members: Vec<Member>) {
        if members.is_empty() {
            return;
        }
        let ops = self.key_ops(key);
        for m in members.into_iter().rev() {
            ops.queue.push_front(m.op);
        }
    }

    /// Answers a command that rode in a proposal chosen at `slot`.
    fn answer_member(&mut self, key: &[u8], m: Member, slot: u64, head: &Op) {
        let version = slot - 1 + m.offset;
        let (outcome, changed, prior_absent) = match m.result {
            MemberResult::Changed {
                value,
                prior_absent,
            } => (
                Outcome::Done(Current { value, version }),
                true,
                prior_absent,
            ),
            MemberResult::Kept(value) => (Outcome::Done(Current { value, version }), false, false),
            MemberResult::Rejected(rejection, value) => (
                Outcome::Rejected(rejection, Current { value, version }),
                false,
                false,
            ),
        };
        let trace = Trace {
            changed,
            prior_absent,
            fast: head.won == Some(true),
            attempts: head.attempts,
            prepares: head.prepares,
        };
        self.answer(key, m.op, outcome, trace);
        self.inflight -= 1;
    }

    /// Starts a new attempt from the replica's local view of the key.
    fn advance(&mut self, key: &[u8], op: Op) {
        let Some(mut op) = self.settle(key, op) else {
            return;
        };
        op.attempts += 1;
        if op.attempts > self.config.attempts_max {
            let reason = op.trouble;
            let message = match reason {
                FailureReason::Contention => {
                    "gave up: other proposals kept winning the key".to_string()
                }
                _ => "gave up: no quorum of replicas answered".to_string(),
            };
            return self.fail(key, op, reason, message);
        }
        let st = self.state(key);
        let slot = st.slot();
        let touched = st.accepted.is_some() || !st.promised.is_fast();
        if let Kind::Command(command) = &op.kind {
            // A command that never went out anywhere goes to the key's
            // leader, if another replica leads it and looks alive.
            if op.origin.is_none() && op.exposed.is_empty() {
                if let Some((to, incarnation)) = self.forward_target(key) {
                    let command = command.clone();
                    return self.begin_forward(key, op, to, incarnation, command);
                }
            }
            if let Some(ballot) = self.lead(key) {
                return self.lead_next(key, op, slot, ballot);
            }
        }
        match op.kind.clone() {
            Kind::Read => self.begin_query(key, op),
            Kind::Command(_) if touched => self.begin_prepare(key, op, slot),
            // An exposed proposal goes out again as it is (see `conclude`).
            Kind::Command(command) => match self.exposed_at(&op, slot) {
                Some(proposal) => self.begin_fast_or_classic(key, op, slot, proposal),
                None => match self.evaluate(key, &command) {
                    Ok(Change::Keep) | Err(_) => self.begin_query(key, op),
                    Ok(change) => {
                        let proposal = self.own_proposal(key, &mut op, slot, change);
                        self.begin_fast_or_classic(key, op, slot, proposal)
                    }
                },
            },
        }
    }

    /// The ballot this instance leads `key` with, if acceptors still carry
    /// it: its own record of the promise has not moved past it.
    fn lead(&mut self, key: &[u8]) -> Option<Ballot> {
        let ballot = *self.leads.get(key)?;
        if self.state(key).promised == ballot {
            Some(ballot)
        } else {
            self.leads.remove(key);
            None
        }
    }

    fn set_lead(&mut self, key: &[u8], ballot: Ballot) {
        if self.leads.len() >= LEADS_MAX && !self.leads.contains_key(key) {
            self.leads.pop_first();
        }
        self.leads.insert(key.to_vec(), ballot);
    }

    /// Proposes the next slot as the key's leader: phase 2 only. An
    /// exposed proposal goes out again as it is; a command that changes
    /// nothing, or is refused, is confirmed by a quorum read first.
    fn lead_next(&mut self, key: &[u8], mut op: Op, slot: u64, ballot: Ballot) {
        let Kind::Command(command) = op.kind.clone() else {
            return self.begin_query(key, op);
        };
        if let Some(proposal) = self.exposed_at(&op, slot) {
            return self.begin_accept(key, op, slot, ballot, proposal, true);
        }
        match self.evaluate(key, &command) {
            Ok(Change::Keep) | Err(_) => self.begin_query(key, op),
            Ok(change) => {
                let proposal = self.own_proposal(key, &mut op, slot, change);
                self.begin_accept(key, op, slot, ballot, proposal, true)
            }
        }
    }

    /// The replica that leads `key`, as this replica's acceptor sees it
    /// (the owner of the classic ballot it promised), and that replica's
    /// instance (the newest of its proposals this replica holds, or that
    /// its forwarded replies named), if it is
    /// another member not passed over for silence.
    fn forward_target(&mut self, key: &[u8]) -> Option<(ReplicaId, u64)> {
        let me = self.config.self_id;
        let now = self.now_ms;
        let st = self.state(key);
        if st.promised.is_fast() || st.promised.replica == me {
            return None;
        }
        let leader = st.promised.replica;
        let seen = st
            .chosen
            .winners
            .iter()
            .map(|(_, id)| *id)
            .chain(st.accepted.as_ref().map(|a| a.proposal.id))
            .filter(|id| id.replica == leader)
            .map(|id| id.incarnation)
            .max();
        let incarnation = seen.max(self.instances.get(&leader).copied())?;
        let alive = self
            .suspect_until
            .get(&leader)
            .is_none_or(|until| *until <= now);
        (self.members.contains(leader) && alive).then_some((leader, incarnation))
    }

    fn begin_forward(
        &mut self,
        key: &[u8],
        mut op: Op,
        to: ReplicaId,
        incarnation: u64,
        command: Vec<u8>,
    ) {
        let id = self.next_query_id();
        op.phase = Phase::Forward {
            id,
            to,
            incarnation,
            sends: 1,
        };
        op.sent_ms = self.now_ms;
        self.arm(key, &mut op, self.config.round_timeout_ms as u64);
        self.put_forwarding(key, op);
        self.kicked.push(key.to_vec());
        self.send(
            to,
            key,
            Msg::Forward {
                id,
                incarnation,
                command,
            },
        );
    }

    fn fast_allowed(&self) -> bool {
        if !self.members.fast {
            return false;
        }
        let now = self.now_ms;
        let live = self
            .members
            .voters
            .iter()
            .filter(|v| self.suspect_until.get(v).is_none_or(|until| *until <= now))
            .count();
        live >= self.q_fast
    }

    fn begin_fast_or_classic(&mut self, key: &[u8], op: Op, slot: u64, proposal: Proposal) {
        if let Some(ballot) = self.lead(key) {
            return self.begin_accept(key, op, slot, ballot, proposal, true);
        }
        // A promise carried from an earlier slot refuses the fast round
        // (this replica's own acceptor would, to begin with).
        if !self.fast_allowed() || !self.state(key).promised.is_fast() {
            return self.begin_prepare(key, op, slot);
        }
        self.begin_fast(key, op, slot, proposal)
    }

    fn begin_fast(&mut self, key: &[u8], mut op: Op, slot: u64, proposal: Proposal) {
        let ballot = if self.planted_epoxy {
            Ballot {
                counter: 1,
                replica: self.config.self_id,
            }
        } else {
            Ballot::FAST
        };
        op.exposed.insert(slot);
        let phase = Phase::Fast {
            slot,
            ballot,
            acks: BTreeSet::new(),
            nacks: BTreeSet::new(),
        };
        let msg = Msg::Accept {
            slot,
            ballot,
            proposal,
            catch_up: None,
        };
        self.launch(key, op, phase, self.config.fast_timeout_ms, msg);
    }

    /// Enters `phase`, arms its timeout and sends `msg` to every voter.
    fn launch(&mut self, key: &[u8], mut op: Op, phase: Phase, timeout_ms: u32, msg: Msg) {
        op.phase = phase;
        op.sent_ms = self.now_ms;
        self.arm(key, &mut op, timeout_ms as u64);
        self.put_active(key, op);
        self.broadcast(key, &msg);
    }

    fn begin_prepare(&mut self, key: &[u8], mut op: Op, slot: u64) {
        op.prepares += 1;
        let promised = self.state(key).promised.counter;
        let Some(counter) = promised.max(op.counter_seen).checked_add(1) else {
            // Only a peer claiming a promise at the last counter gets here.
            let message = "no ballot is left above the highest one promised".to_string();
            return self.fail(key, op, FailureReason::Contention, message);
        };
        let ballot = Ballot {
            counter,
            replica: self.config.self_id,
        };
        self.prepared.insert((key.to_vec(), ballot));
        // A ballot carries at most one value, so its owner never uses it
        // twice for a slot: not in a retry, a later op or a later
        // incarnation. A voter's own acceptor promises the ballot (the
        // loopback below), which raises `promised` past it. A learner's
        // acceptor takes part in no round, so the ballot is recorded in its
        // `promised` here. Either record is durable before an Accept at the
        // ballot can leave: an Accept in a later step is early, and early
        // effects wait for every earlier ready; one in this step (stale
        // promises can complete the prepare at once) is held for this ready
        // (`prepared`, see `send`). Refusing more is always safe for an
        // acceptor, so this record does no harm once the learner votes.
        if !self.is_voter() && !self.planted.ballot_reuse {
            let st = self.state(key);
            if st.promised < ballot {
                st.promised = ballot;
                self.mark_dirty(key, false);
            }
        }
        let phase = Phase::Prepare {
            slot,
            ballot,
            promises: BTreeMap::new(),
        };
        let msg = Msg::Prepare {
            slot,
            ballot,
            catch_up: None,
        };
        self.launch(key, op, phase, self.config.round_timeout_ms, msg);
    }

    fn begin_accept(
        &mut self,
        key: &[u8],
        mut op: Op,
        slot: u64,
        ballot: Ballot,
        proposal: Proposal,
        carried: bool,
    ) {
        if op.own.as_ref().is_some_and(|(_, p)| p.id == proposal.id) {
            op.exposed.insert(slot);
        }
        let phase = Phase::Accept {
            slot,
            ballot,
            proposal: proposal.clone(),
            acks: BTreeSet::new(),
            carried,
        };
        let msg = if carried {
            Msg::Continue {
                slot,
                ballot,
                proposal,
                catch_up: None,
            }
        } else {
            Msg::Accept {
                slot,
                ballot,
                proposal,
                catch_up: None,
            }
        };
        self.launch(key, op, phase, self.config.round_timeout_ms, msg);
    }

    fn begin_query(&mut self, key: &[u8], op: Op) {
        let id = self.next_query_id();
        let phase = Phase::Query {
            id,
            replies: BTreeMap::new(),
        };
        self.launch(
            key,
            op,
            phase,
            self.config.round_timeout_ms,
            Msg::Query { id },
        );
    }

    /// Waits before the next attempt: twice the round trip, doubling with
    /// each attempt, jittered to [0.5x, 1.5x], so duelling proposers part
    /// within a few round trips instead of tens of milliseconds.
    fn backoff(&mut self, key: &[u8], mut op: Op, trouble: FailureReason) {
        op.trouble = trouble;
        op.phase = Phase::Backoff;
        let first = (2 * self.rtt_ms).max(BACKOFF_MIN_MS);
        let base = first
            .saturating_mul(1 << op.attempts.min(10))
            .min(BACKOFF_MAX_MS);
        let delay = base / 2 + self.random() % (base + 1);
        self.arm(key, &mut op, delay);
        self.put_active(key, op);
    }

    /// A round of this replica finished after `sent_ms`: update the
    /// smoothed round trip (7/8 old, 1/8 new).
    fn sample_rtt(&mut self, sent_ms: u64) {
        let sample = self.now_ms.saturating_sub(sent_ms).min(BACKOFF_MAX_MS);
        self.rtt_ms = (7 * self.rtt_ms + sample).div_ceil(8);
    }

    // ----- timers -------------------------------------------------------

    fn on_timer(&mut self, key: &[u8], token: u64) {
        if let Some(op) = self.take_forwarding(key, |op| op.token == token) {
            return self.on_forward_timer(key, op);
        }
        let Some(op) = self.take_active(key) else {
            return;
        };
        if op.token != token {
            return self.put_active(key, op);
        }
        match &op.phase {
            Phase::Fast {
                slot, acks, nacks, ..
            } => {
                // The fast quorum did not answer: pass over the silent
                // replicas for a while and recover with a classic round.
                let until = self.now_ms + SUSPECT_MS;
                for v in self.members.voters.clone() {
                    if !acks.contains(&v) && !nacks.contains(&v) && v != self.config.self_id {
                        // A longer suspicion (a silent leader's) stays.
                        let s = self.suspect_until.entry(v).or_insert(until);
                        *s = (*s).max(until);
                    }
                }
                let slot = *slot;
                self.begin_prepare(key, op, slot)
            }
            Phase::Backoff => self.advance(key, op),
            Phase::Wait { .. } => self.begin_query(key, op),
            Phase::Accept { .. } => {
                self.leads.remove(key);
                self.backoff(key, op, FailureReason::NoQuorum)
            }
            _ => self.backoff(key, op, FailureReason::NoQuorum),
        }
    }

    /// A forwarded command's leader has not answered for a round timeout:
    /// send another copy, or give up.
    fn on_forward_timer(&mut self, key: &[u8], mut op: Op) {
        let Phase::Forward {
            id,
            to,
            incarnation,
            sends,
        } = op.phase
        else {
            unreachable!("only forwarded ops wait in `forwarding`")
        };
        let Kind::Command(command) = op.kind.clone() else {
            unreachable!("only commands are forwarded")
        };
        if sends < FORWARD_SENDS {
            op.phase = Phase::Forward {
                id,
                to,
                incarnation,
                sends: sends + 1,
            };
            self.arm(key, &mut op, self.config.round_timeout_ms as u64);
            self.put_forwarding(key, op);
            let msg = Msg::Forward {
                id,
                incarnation,
                command,
            };
            return self.send(to, key, msg);
        }
        // The leader may have run it: the outcome cannot be told. Pass
        // over the leader until it is heard from again, so later commands
        // take the key however sparse they are (a leader that stopped for
        // good would otherwise be forwarded every command that comes more
        // than a suspicion apart, and fail each one).
        self.suspect_until.insert(to, u64::MAX);
        let failure = Failure {
            reason: FailureReason::NoQuorum,
            maybe_applied: true,
            message: format!("the key's leader, replica {to}, did not answer"),
        };
        let trace = Trace {
            attempts: op.attempts,
            ..Trace::default()
        };
        self.finish_forwarded(key, op, Outcome::Failed(failure), trace)
    }

    // ----- messages -----------------------------------------------------

    fn on_message(&mut self, from: ReplicaId, key: &[u8], msg: Msg) {
        // A learner takes part in no round as an acceptor.
        let acceptor_msg = matches!(
            msg,
            Msg::Prepare { .. } | Msg::Accept { .. } | Msg::Continue { .. } | Msg::Query { .. }
        );
        if acceptor_msg && !self.is_voter() {
            return;
        }
        match msg {
            Msg::Prepare {
                slot,
                ballot,
                catch_up,
            } => self.acceptor_prepare(from, key, slot, ballot, catch_up),
            Msg::Accept {
                slot,
                ballot,
                proposal,
                catch_up,
            } => self.acceptor_phase2(from, key, slot, ballot, proposal, catch_up, false),
            Msg::Query { id } => {
                let st = self.state(key);
                let reply = Msg::QueryReply {
                    id,
                    chosen: st.chosen.clone(),
                    accepted: st.accepted.clone(),
                };
                self.send(from, key, reply);
            }
            Msg::Learn { chosen } | Msg::Stale { chosen } => {
                self.learn(key, &chosen);
                self.resolve(key);
            }
            Msg::Promise {
                slot,
                ballot,
                accepted,
            } => self.on_promise(from, key, slot, ballot, accepted),
            Msg::Accepted { slot, ballot, id } => self.on_accepted(from, key, slot, ballot, id),
            Msg::Nack {
                slot,
                ballot,
                promised,
                accepted: _,
            } => self.on_nack(from, key, slot, ballot, promised),
            Msg::Behind { slot } => self.on_behind(from, key, slot),
            Msg::QueryReply {
                id,
                chosen,
                accepted,
            } => self.on_query_reply(from, key, id, chosen, accepted),
            Msg::Continue {
                slot,
                ballot,
                proposal,
                catch_up,
            } => self.acceptor_phase2(from, key, slot, ballot, proposal, catch_up, true),
            Msg::Forward {
                id,
                incarnation,
                command,
            } => self.on_forward(from, key, id, incarnation, command),
            Msg::Forwarded {
                id,
                incarnation,
                reply,
            } => self.on_forwarded(from, key, id, incarnation, reply),
        }
    }

    /// The leader's answer to a command this replica forwarded.
    fn on_forwarded(
        &mut self,
        from: ReplicaId,
        key: &[u8],
        id: u64,
        incarnation: u64,
        reply: Reply,
    ) {
        let known = self.instances.entry(from).or_insert(incarnation);
        *known = (*known).max(incarnation);
        let mine =
            |op: &Op| matches!(op.phase, Phase::Forward { id: i, to, .. } if i == id && to == from);
        if let Some(op) = self.take_forwarding(key, mine) {
            let (outcome, trace) = outcome_of(reply);
            self.finish_forwarded(key, op, outcome, trace)
        }
    }

    /// Common checks of an acceptor message for `slot`: learn what the
    /// proposer brought, then refuse a slot that is decided or ahead of us.
    fn acceptor_slot_ok(
        &mut self,
        from: ReplicaId,
        key: &[u8],
        slot: u64,
        catch_up: Option<Chosen>,
    ) -> bool {
        if let Some(c) = catch_up {
            self.learn(key, &c);
        }
        let st = self.state(key);
        let open = st.slot();
        if open > slot {
            let chosen = st.chosen.clone();
            self.send(from, key, Msg::Stale { chosen });
            return false;
        }
        if open < slot {
            self.send(from, key, Msg::Behind { slot });
            return false;
        }
        true
    }

    fn acceptor_prepare(
        &mut self,
        from: ReplicaId,
        key: &[u8],
        slot: u64,
        ballot: Ballot,
        catch_up: Option<Chosen>,
    ) {
        if !self.acceptor_slot_ok(from, key, slot, catch_up) {
            return;
        }
        let st = self.state(key);
        if ballot < st.promised || ballot.is_fast() {
            let promised = st.promised;
            return self.send(
                from,
                key,
                Msg::Nack {
                    slot,
                    ballot,
                    promised,
                    accepted: None,
                },
            );
        }
        let changed = st.promised != ballot;
        st.promised = ballot;
        let accepted = st.accepted.clone();
        if changed {
            self.mark_voted(key);
        }
        self.send(
            from,
            key,
            Msg::Promise {
                slot,
                ballot,
                accepted,
            },
        );
    }

    /// An `Accept` (`carried` false) or a `Continue` (`carried` true):
    /// accept and answer `Accepted`, or refuse with a `Nack`.
    ///
    /// A `Continue` is phase 2 in a later slot of the leader of `ballot`,
    /// without phase 1. It is safe only on the promise the leader's prepare
    /// obtained, carried here unchanged: an acceptor whose promise is
    /// exactly `ballot` refused every lower ballot in this slot, the fast
    /// round included. Any other promise (lower: it did not carry this one;
    /// higher: it promised another leader) refuses.
    #[allow(clippy::too_many_arguments)]
    fn acceptor_phase2(
        &mut self,
        from: ReplicaId,
        key: &[u8],
        slot: u64,
        ballot: Ballot,
        proposal: Proposal,
        catch_up: Option<Chosen>,
        carried: bool,
    ) {
        if !self.acceptor_slot_ok(from, key, slot, catch_up) {
            return;
        }
        let fast_on = self.members.fast;
        let st = self.state(key);
        let ok = if carried {
            !ballot.is_fast()
                && st.promised == ballot
                && st
                    .accepted
                    .as_ref()
                    .is_none_or(|a| a.ballot == ballot && a.proposal.id == proposal.id)
        } else if ballot.is_fast() {
            // The fast round: first value wins, and only before any classic
            // round has started at this acceptor, and never in an epoch that
            // has the fast round off.
            fast_on
                && st.promised.is_fast()
                && st
                    .accepted
                    .as_ref()
                    .is_none_or(|a| a.ballot.is_fast() && a.proposal.id == proposal.id)
        } else {
            ballot >= st.promised
        };
        if !ok {
            let promised = st.promised;
            let accepted = if carried { None } else { st.accepted.clone() };
            return self.send(
                from,
                key,
                Msg::Nack {
                    slot,
                    ballot,
                    promised,
                    accepted,
                },
            );
        }
        let id = proposal.id;
        let new = Some(Accepted { ballot, proposal });
        let changed = st.promised != ballot || st.accepted != new;
        st.promised = ballot;
        st.accepted = new;
        if changed {
            self.mark_voted(key);
        }
        self.send(from, key, Msg::Accepted { slot, ballot, id });
    }

    fn on_accepted(
        &mut self,
        from: ReplicaId,
        key: &[u8],
        slot: u64,
        ballot: Ballot,
        id: ProposalId,
    ) {
        let Some(mut op) = self.take_active(key) else {
            return;
        };
        let own_id = op.own.as_ref().map(|(_, p)| p.id);
        let decided = match &mut op.phase {
            Phase::Fast {
                slot: s,
                ballot: b,
                acks,
                ..
            } if *s == slot && *b == ballot && own_id == Some(id) => {
                acks.insert(from);
                (acks.len() >= self.q_fast)
                    .then(|| op.own.as_ref().map(|(_, p)| p.clone()))
                    .flatten()
            }
            Phase::Accept {
                slot: s,
                ballot: b,
                proposal,
                acks,
                ..
            } if *s == slot && *b == ballot && proposal.id == id => {
                acks.insert(from);
                (acks.len() >= self.q_classic).then(|| proposal.clone())
            }
            _ => None,
        };
        let sent_ms = op.sent_ms;
        self.put_active(key, op);
        if let Some(proposal) = decided {
            self.sample_rtt(sent_ms);
            // A classic quorum accepted at `ballot` and carries its
            // promise into the next slot: this instance leads the key.
            if !ballot.is_fast() && ballot.replica == self.config.self_id {
                self.set_lead(key, ballot);
            }
            self.decided(key, slot, &proposal);
        }
    }

    /// `proposal` is chosen at `slot`: learn it, tell everyone, settle the op.
    fn decided(&mut self, key: &[u8], slot: u64, proposal: &Proposal) {
        let st = self.state(key);
        if st.chosen.version + 1 == slot {
            let next = st.chosen.next(proposal);
            self.learn(key, &next);
        }
        let st = self.state(key);
        if st.chosen.version >= slot {
            let learn = Msg::Learn {
                chosen: st.chosen.clone(),
            };
            let members = self.members.voters.iter().chain(&self.members.learners);
            for to in members.copied().collect::<Vec<_>>() {
                if to != self.config.self_id {
                    self.send(to, key, learn.clone());
                }
            }
        }
        self.resolve(key);
    }

    /// Checks the slots where `op` exposed its own proposal against what is
    /// chosen: finishes the op if it won one (or cannot tell), and returns it
    /// otherwise, with the slots it lost forgotten. Every path that picks an
    /// op up again goes through here, so a command is never evaluated twice.
    fn settle(&mut self, key: &[u8], mut op: Op) -> Option<Op> {
        let chosen = self.state(key).chosen.clone();
        let own_id = op.own.as_ref().map(|(_, p)| p.id);
        let mut won = None;
        let mut unknown = false;
        for slot in op.exposed.clone() {
            if slot > chosen.version {
                continue;
            }
            match chosen.winner(slot) {
                Some(w) if Some(w) == own_id => won = Some(slot),
                Some(_) => {
                    op.exposed.remove(&slot);
                }
                None => unknown = true,
            }
        }
        if let Some(slot) = won {
            op.won = Some(matches!(op.phase, Phase::Fast { .. }));
            for m in core::mem::take(&mut op.batch) {
                self.answer_member(key, m, slot, &op);
            }
            let value = op.own_value.clone();
            self.finish(
                key,
                op,
                Outcome::Done(Current {
                    value,
                    version: slot,
                }),
            );
            return None;
        }
        if unknown {
            let message =
                "outcome unknown: the key moved on too far to tell whether this command won";
            self.fail(key, op, FailureReason::Contention, message.to_string());
            return None;
        }
        // A batch whose proposal lost its slot, or never went out, dissolves.
        if !op.own_out() {
            self.requeue_batch(key, &mut op);
        } else if self.planted.batch_requeue_exposed {
            let batch = core::mem::take(&mut op.batch);
            self.push_front(key, batch);
        }
        Some(op)
    }

    /// Settles the active op if the slot it works on has been decided.
    fn resolve(&mut self, key: &[u8]) {
        let Some(op) = self.take_active(key) else {
            return;
        };
        let Some(mut op) = self.settle(key, op) else {
            return;
        };
        let chosen = &self.state(key).chosen;
        // A read waiting for a leader's pending slot answers as soon as the
        // slot is learned, with the value as of now, instead of asking a
        // quorum again when its wait ends: on a key written all the time,
        // every new quorum found the next slot pending, the read waited
        // again and in the end took the key from its leader with a prepare
        // (section 3, "Linearizable reads", says why the answer is
        // linearizable).
        if let (Kind::Read, Phase::Wait { slot }) = (&op.kind, &op.phase) {
            if *slot > chosen.version {
                return self.put_active(key, op);
            }
            let current = Current {
                value: chosen.value.clone(),
                version: chosen.version,
            };
            return self.finish(key, op, Outcome::Done(current));
        }
        match op.phase.slot() {
            Some(slot) if slot <= chosen.version => match op.kind {
                // A read that had to finish a pending slot returns the value
                // as of now: it was chosen during the read.
                Kind::Read => {
                    let current = Current {
                        value: chosen.value.clone(),
                        version: chosen.version,
                    };
                    self.finish(key, op, Outcome::Done(current))
                }
                // Our slot went to another proposal: try again on the new value.
                Kind::Command(_) => {
                    op.trouble = FailureReason::Contention;
                    self.advance(key, op)
                }
            },
            _ => self.put_active(key, op),
        }
    }

    fn on_nack(
        &mut self,
        _from: ReplicaId,
        key: &[u8],
        slot: u64,
        ballot: Ballot,
        promised: Ballot,
    ) {
        let Some(mut op) = self.take_active(key) else {
            return;
        };
        op.counter_seen = op.counter_seen.max(promised.counter);
        match &mut op.phase {
            Phase::Fast {
                slot: s,
                ballot: b,
                nacks,
                ..
            } if *s == slot && *b == ballot => {
                nacks.insert(_from);
                // A fast quorum is out of reach: recover in a classic round.
                if nacks.len() > self.n() - self.q_fast {
                    return self.begin_prepare(key, op, slot);
                }
                self.put_active(key, op)
            }
            Phase::Accept {
                slot: s,
                ballot: b,
                proposal,
                ..
            } if *s == slot && *b == ballot => {
                self.leads.remove(key);
                if self.planted.leader_skips_prepare && promised > *b {
                    // The planted defect: phase 2 at a higher ballot with
                    // no prepare behind it.
                    let ballot = Ballot {
                        counter: promised.counter + 1,
                        replica: self.config.self_id,
                    };
                    let proposal = proposal.clone();
                    self.set_lead(key, ballot);
                    return self.begin_accept(key, op, slot, ballot, proposal, false);
                }
                self.backoff(key, op, FailureReason::Contention)
            }
            Phase::Prepare {
                slot: s, ballot: b, ..
            } if *s == slot && *b == ballot => self.backoff(key, op, FailureReason::Contention),
            _ => self.put_active(key, op),
        }
    }

    fn on_behind(&mut self, from: ReplicaId, key: &[u8], slot: u64) {
        let chosen = self.state(key).chosen.clone();
        if chosen.version + 1 != slot {
            return;
        }
        let Some(op) = self.take_active(key) else {
            return;
        };
        let resend = match &op.phase {
            Phase::Fast {
                slot: s, ballot, ..
            } if *s == slot => op.own.as_ref().map(|(_, p)| Msg::Accept {
                slot,
                ballot: *ballot,
                proposal: p.clone(),
                catch_up: Some(chosen.clone()),
            }),
            Phase::Prepare {
                slot: s, ballot, ..
            } if *s == slot => Some(Msg::Prepare {
                slot,
                ballot: *ballot,
                catch_up: Some(chosen.clone()),
            }),
            Phase::Accept {
                slot: s,
                ballot,
                proposal,
                carried: false,
                ..
            } if *s == slot => Some(Msg::Accept {
                slot,
                ballot: *ballot,
                proposal: proposal.clone(),
                catch_up: Some(chosen.clone()),
            }),
            Phase::Accept {
                slot: s,
                ballot,
                proposal,
                carried: true,
                ..
            } if *s == slot => Some(Msg::Continue {
                slot,
                ballot: *ballot,
                proposal: proposal.clone(),
                catch_up: Some(chosen.clone()),
            }),
            _ => None,
        };
        self.put_active(key, op);
        if let Some(m) = resend {
            self.send(from, key, m);
        }
    }

    fn on_promise(
        &mut self,
        from: ReplicaId,
        key: &[u8],
        slot: u64,
        ballot: Ballot,
        accepted: Option<Accepted>,
    ) {
        let Some(mut op) = self.take_active(key) else {
            return;
        };
        let quorum = match &mut op.phase {
            Phase::Prepare {
                slot: s,
                ballot: b,
                promises,
            } if *s == slot && *b == ballot => {
                promises.insert(from, accepted);
                promises.len() >= self.q_classic
            }
            _ => false,
        };
        if !quorum {
            return self.put_active(key, op);
        }
        let Phase::Prepare { promises, .. } = core::mem::replace(&mut op.phase, Phase::Idle) else {
            unreachable!()
        };
        match self.constrained(&promises) {
            Some(proposal) => self.begin_accept(key, op, slot, ballot, proposal, false),
            None => self.free_choice(key, op, slot, ballot),
        }
    }

    /// Fast Paxos's rule: the value a classic round at a higher ballot must
    /// propose, given promises from a classic quorum, or `None` if free.
    fn constrained(&self, promises: &BTreeMap<ReplicaId, Option<Accepted>>) -> Option<Proposal> {
        let highest = promises.values().flatten().map(|a| a.ballot).max()?;
        if !highest.is_fast() {
            // One classic ballot carries one value.
            return promises
                .values()
                .flatten()
                .find(|a| a.ballot == highest)
                .map(|a| a.proposal.clone());
        }
        // Fast round: a value chosen there was accepted by q_fast acceptors,
        // of which at most n - |promises| are outside this quorum.
        let threshold = self.q_fast + promises.len() - self.n();
        let mut counts: BTreeMap<ProposalId, (usize, &Proposal)> = BTreeMap::new();
        for a in promises.values().flatten() {
            counts.entry(a.proposal.id).or_insert((0, &a.proposal)).0 += 1;
        }
        counts
            .into_values()
            .find(|(count, _)| *count >= threshold)
            .map(|(_, p)| p.clone())
    }

    /// Nothing can have been chosen at `slot` below `ballot`, and we hold a
    /// quorum's promise: the value at `slot - 1` is current.
    fn free_choice(&mut self, key: &[u8], op: Op, slot: u64, ballot: Ballot) {
        if self.state(key).slot() != slot {
            // Learned a decision meanwhile.
            self.put_active(key, op);
            return self.resolve(key);
        }
        self.conclude(key, op, slot, Some(ballot))
    }

    /// The value at `slot - 1` is confirmed current by a quorum: answer a
    /// read, or finish or propose a command. `ballot` is the classic ballot
    /// whose promises confirmed it, if any; without one the proposal opens
    /// with the fast round.
    fn conclude(&mut self, key: &[u8], mut op: Op, slot: u64, ballot: Option<Ballot>) {
        let current = self.current(key);
        let Kind::Command(command) = op.kind.clone() else {
            return self.finish(key, op, Outcome::Done(current));
        };
        // Our proposal already went out for this slot and may be chosen
        // there (a quorum that cannot see it does not prove it lost): it is
        // proposed again as it is. Evaluating the command again could answer
        // otherwise (a clock-dependent policy, a rebound prefix) while the
        // first evaluation still wins.
        if let Some(proposal) = self.exposed_at(&op, slot) {
            return match ballot {
                Some(ballot) => self.begin_accept(key, op, slot, ballot, proposal, false),
                None => self.begin_fast_or_classic(key, op, slot, proposal),
            };
        }
        match self.evaluate(key, &command) {
            Ok(Change::Keep) => self.finish(key, op, Outcome::Done(current)),
            Err(rejection) => self.finish(key, op, Outcome::Rejected(rejection, current)),
            Ok(change) => {
                let proposal = self.own_proposal(key, &mut op, slot, change);
                match ballot {
                    Some(ballot) => self.begin_accept(key, op, slot, ballot, proposal, false),
                    None => self.begin_fast_or_classic(key, op, slot, proposal),
                }
            }
        }
    }

    fn on_query_reply(
        &mut self,
        from: ReplicaId,
        key: &[u8],
        id: u64,
        chosen: Chosen,
        accepted: Option<Accepted>,
    ) {
        let Some(mut op) = self.take_active(key) else {
            return;
        };
        let quorum = match &mut op.phase {
            Phase::Query { id: q, replies } if *q == id => {
                replies.insert(from, (chosen, accepted));
                replies.len() >= self.q_classic
            }
            _ => false,
        };
        if !quorum {
            return self.put_active(key, op);
        }
        let Phase::Query { replies, .. } = core::mem::replace(&mut op.phase, Phase::Idle) else {
            unreachable!()
        };
        self.sample_rtt(op.sent_ms);
        let newest = replies
            .values()
            .map(|(c, _)| c)
            .max_by_key(|c| c.version)
            .cloned()
            .unwrap_or_default();
        // This replica may know a newer decision than every answer (a
        // leader whose Learns are still on their way): that is the newest.
        // No quorum can have voted in the slot after it, since this
        // quorum's members had not even learned it when they answered.
        let own = self.state(key).chosen.clone();
        let newest = if own.version > newest.version {
            own
        } else {
            newest
        };
        // Repair: replicas that answered with an older value learn the newest.
        for (replica, (c, _)) in &replies {
            if c.version < newest.version && *replica != self.config.self_id {
                self.send(
                    *replica,
                    key,
                    Msg::Learn {
                        chosen: newest.clone(),
                    },
                );
            }
        }
        self.learn(key, &newest);
        let Some(op) = self.settle(key, op) else {
            return;
        };
        let pending: Vec<Ballot> = replies
            .values()
            .filter(|(c, _)| c.version == newest.version)
            .filter_map(|(_, a)| a.as_ref().map(|a| a.ballot))
            .collect();
        let local = self.state(key).chosen.version;
        if !pending.is_empty() && local == newest.version {
            // Slot newest+1 may hold a chosen value nobody has learned. A
            // leader's round in flight is about to be learned: wait for it
            // a few round trips rather than pre-empt the leader. Otherwise
            // (or after waiting) finish the slot in a classic round.
            let now = self.now_ms;
            let leader_busy = pending.iter().all(|b| {
                !b.is_fast()
                    && b.replica != self.config.self_id
                    && self.suspect_until.get(&b.replica).is_none_or(|u| *u <= now)
            });
            let mut op = op;
            if leader_busy && op.waits < READ_WAITS {
                op.waits += 1;
                op.phase = Phase::Wait {
                    slot: newest.version + 1,
                };
                let delay = ((2 * self.rtt_ms).max(BACKOFF_MIN_MS) << (op.waits - 1))
                    .min(self.config.round_timeout_ms as u64);
                self.arm(key, &mut op, delay);
                return self.put_active(key, op);
            }
            return self.begin_prepare(key, op, newest.version + 1);
        }
        if local != newest.version {
            // We learned something newer meanwhile; start over from it.
            return self.advance(key, op);
        }
        self.conclude(key, op, newest.version + 1, None)
    }
}

impl Op {
    /// Whether this op's own proposal went out for its slot and may still
    /// be chosen there (what its batch, if any, rides on).
    fn own_out(&self) -> bool {
        self.own
            .as_ref()
            .is_some_and(|(slot, _)| self.exposed.contains(slot))
    }

    fn new(request: u64, kind: Kind, origin: Option<(ReplicaId, u64)>) -> Op {
        Op {
            request,
            kind,
            attempts: 0,
            phase: Phase::Idle,
            own: None,
            exposed: BTreeSet::new(),
            token: 0,
            counter_seen: 0,
            trouble: FailureReason::NoQuorum,
            own_prior_absent: false,
            prepares: 0,
            won: None,
            origin,
            waits: 0,
            sent_ms: 0,
            own_value: None,
            batch: Vec::new(),
        }
    }
}

/// What a held decision counts against [`LAZY_BYTES_MAX`]: its key, its
/// value and its winners, plus a map entry's bookkeeping.
fn lazy_size(key: &[u8], st: &State) -> usize {
    64 + key.len() + st.chosen.value.as_ref().map_or(0, |v| v.len()) + 40 * st.chosen.winners.len()
}

/// `text` cut to at most [`REPLY_TEXT_MAX`] bytes, on a character boundary.
fn bounded(text: &str) -> String {
    let mut end = text.len().min(REPLY_TEXT_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// A forwarded command's outcome on the wire.
fn reply_of(outcome: &Outcome, trace: &Trace) -> Reply {
    let outcome = match outcome {
        Outcome::Done(c) => ReplyOutcome::Done {
            value: c.value.clone(),
            version: c.version,
        },
        Outcome::Rejected(r, c) => ReplyOutcome::Rejected {
            code: bounded(&r.code),
            message: bounded(&r.message),
            value: c.value.clone(),
            version: c.version,
        },
        Outcome::Failed(f) => ReplyOutcome::Failed {
            reason: match f.reason {
                FailureReason::NoQuorum | FailureReason::Interrupted => 0,
                FailureReason::Contention => 1,
                FailureReason::Overloaded => 2,
                FailureReason::Invalid => 3,
            },
            maybe_applied: f.maybe_applied,
            message: bounded(&f.message),
        },
    };
    Reply {
        outcome,
        changed: trace.changed,
        prior_absent: trace.prior_absent,
        fast: trace.fast,
        attempts: trace.attempts,
        prepares: trace.prepares,
    }
}

/// The outcome and trace a forwarded reply reports.
fn outcome_of(reply: Reply) -> (Outcome, Trace) {
    let outcome = match reply.outcome {
        ReplyOutcome::Done { value, version } => Outcome::Done(Current { value, version }),
        ReplyOutcome::Rejected {
            code,
            message,
            value,
            version,
        } => Outcome::Rejected(Rejection { code, message }, Current { value, version }),
        ReplyOutcome::Failed {
            reason,
            maybe_applied,
            message,
        } => Outcome::Failed(Failure {
            reason: match reason {
                1 => FailureReason::Contention,
                2 => FailureReason::Overloaded,
                3 => FailureReason::Invalid,
                _ => FailureReason::NoQuorum,
            },
            maybe_applied,
            message: format!("at the key's leader: {message}"),
        }),
    };
    let trace = Trace {
        changed: reply.changed,
        prior_absent: reply.prior_absent,
        fast: reply.fast,
        attempts: reply.attempts,
        prepares: reply.prepares,
    };
    (outcome, trace)
}

impl<E: Env> Core for Replica<E> {
    fn step(&mut self, batch: Batch) -> Ready {
        Replica::step(self, batch)
    }

    fn release(&mut self, id: u64) -> Actions {
        Replica::release(self, id)
    }

    fn reconfigure(&mut self, members: Members) -> Result<(), String> {
        Replica::reconfigure(self, members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::register::Command;
    use crate::RegisterEnv;

    /// Runs one command on a one-replica cluster whose key state is `state`;
    /// returns the completion and the new state.
    fn run(state: Vec<u8>, command: Command) -> (Completion, Vec<u8>) {
        let mut r = Replica::new(Config::new(1, 1, alloc::vec![1]), RegisterEnv).unwrap();
        let ready = r.step(Batch {
            states: alloc::vec![KeyState {
                key: b"k".to_vec(),
                state: state.clone()
            }],
            requests: alloc::vec![Request {
                id: 9,
                key: b"k".to_vec(),
                op: Operation::Command(command.encode()),
            }],
            ..Batch::default()
        });
        let state = ready
            .persist
            .last()
            .map(|w| w.state.clone())
            .unwrap_or(state);
        let mut done = ready.early.complete;
        done.extend(r.release(ready.id).complete);
        assert_eq!(done.len(), 1);
        (done.remove(0), state)
    }

    #[test]
    fn requests_leave_early_and_votes_wait_for_their_writes() {
        let config = |id| Config::new(id, 1, alloc::vec![1, 2, 3]);
        let key = b"k".to_vec();
        let mut proposer = Replica::new(config(1), RegisterEnv).unwrap();
        let ready = proposer.step(Batch {
            states: alloc::vec![KeyState {
                key: key.clone(),
                state: Vec::new()
            }],
            requests: alloc::vec![Request {
                id: 1,
                key: key.clone(),
                op: Operation::Command(Command::Put(b"v".to_vec()).encode()),
            }],
            ..Batch::default()
        });
        // The proposer voted for its own value in this step (a write), yet
        // its Accepts to the others need not wait for that write.
        assert_eq!(ready.persist.len(), 1);
        let to: Vec<ReplicaId> = ready.early.send.iter().map(|o| o.to).collect();
        assert_eq!(to, [2, 3]);
        let accept = ready.early.send[0].clone();
        assert!(proposer.release(ready.id).send.is_empty());

        // The acceptor's Accepted reports its vote: it waits for the write.
        let mut acceptor = Replica::new(config(2), RegisterEnv).unwrap();
        let ready = acceptor.step(Batch {
            states: alloc::vec![KeyState {
                key: key.clone(),
                state: Vec::new()
            }],
            messages: alloc::vec![Inbound {
                from: 1,
                key: key.clone(),
                payload: accept.payload
            }],
            ..Batch::default()
        });
        assert_eq!(ready.persist.len(), 1);
        assert!(ready.early.send.is_empty());
        let after = acceptor.release(ready.id).send;
        assert_eq!(after.len(), 1);
        assert!(matches!(
            crate::wire::Msg::decode_any(&after[0].payload),
            Ok((1, crate::wire::Msg::Accepted { .. }))
        ));
    }

    /// Three replicas with every request handed to replica 1 in its first
    /// step, run until quiet; returns the completions by request id and
    /// replica 1's key state.
    fn run_three(requests: Vec<Request>) -> (Vec<Completion>, State) {
        let key = requests[0].key.clone();
        let mut requests = requests;
        let mut replicas: Vec<Replica<RegisterEnv>> = (1..=3)
            .map(|id| Replica::new(Config::new(id, 1, alloc::vec![1, 2, 3]), RegisterEnv).unwrap())
            .collect();
        let mut states: Vec<Vec<u8>> = alloc::vec![Vec::new(); 3];
        let mut inbox: Vec<Vec<Inbound>> = alloc::vec![Vec::new(); 3];
        let mut done = Vec::new();
        let mut timers: Vec<Vec<Timer>> = alloc::vec![Vec::new(); 3];
        // Fifty rounds of messages, then one where every timer fires (the
        // ops are over by then: what is left is held decisions' writes).
        for round in 0..51 {
            for i in 0..3 {
                let messages = core::mem::take(&mut inbox[i]);
                let requests = if i == 0 {
                    core::mem::take(&mut requests)
                } else {
                    Vec::new()
                };
                let due = if round == 50 {
                    core::mem::take(&mut timers[i])
                } else {
                    Vec::new()
                };
                if messages.is_empty() && requests.is_empty() && due.is_empty() {
                    continue;
                }
                let r = &mut replicas[i];
                let ready = r.step(Batch {
                    states: alloc::vec![KeyState {
                        key: key.clone(),
                        state: states[i].clone()
                    }],
                    requests,
                    messages,
                    timers: due,
                    now_ms: 1_000_000,
                    ..Batch::default()
                });
                if let Some(w) = ready.persist.last() {
                    states[i] = w.state.clone();
                }
                let mut actions = ready.early;
                let later = r.release(ready.id);
                actions.send.extend(later.send);
                actions.complete.extend(later.complete);
                timers[i].extend(actions.timers);
                done.extend(actions.complete);
                for o in actions.send {
                    inbox[o.to as usize - 1].push(Inbound {
                        from: i as ReplicaId + 1,
                        key: o.key,
                        payload: o.payload,
                    });
                }
            }
        }
        done.sort_by_key(|c| c.id);
        (done, State::decode(&states[0]).unwrap())
    }

    fn command(id: u64, c: Command) -> Request {
        Request {
            id,
            key: b"k".to_vec(),
            op: Operation::Command(c.encode()),
        }
    }

    /// Commands queued behind a proposal ride in it: one slot decides them
    /// all, and each answers what it would have alone, in order, with its
    /// own version (ETags stay exact); a read ends the batch.
    #[test]
    fn queued_commands_ride_in_one_slot_with_their_own_versions() {
        // Replica 1 gets every request at once: the first goes out alone,
        // the others queue behind it for the key.
        let (done, state) = run_three(alloc::vec![
            command(1, Command::Create(b"a".to_vec())),
            command(2, Command::Put(b"b".to_vec())),
            command(
                3,
                Command::Cas {
                    expected: 1,
                    value: b"x".to_vec()
                }
            ),
            command(
                4,
                Command::Cas {
                    expected: 2,
                    value: b"c".to_vec()
                }
            ),
            command(5, Command::Create(b"y".to_vec())),
            command(6, Command::Delete),
            Request {
                id: 7,
                key: b"k".to_vec(),
                op: Operation::Read(Consistency::Linearizable),
            },
            command(8, Command::Put(b"z".to_vec())),
        ]);
        let outcome = |c: &Completion| match &c.outcome {
            Outcome::Done(cur) => (true, cur.value.clone(), cur.version),
            Outcome::Rejected(_, cur) => (false, cur.value.clone(), cur.version),
            Outcome::Failed(f) => panic!("{f:?}"),
        };
        let got: Vec<_> = done.iter().map(|c| (c.id, outcome(c))).collect();
        let v = |b: &[u8]| Some(b.to_vec());
        assert_eq!(
            got,
            [
                // Slot 1: the create alone (nothing was queued behind it yet).
                (1, (true, v(b"a"), 1)),
                // Slot 2 carries commands 2 to 6: versions 2, 3 and 4 for the
                // three that changed the value, the refused ones see the
                // value before them.
                (2, (true, v(b"b"), 2)),
                (3, (false, v(b"b"), 2)),
                (4, (true, v(b"c"), 3)),
                (5, (false, v(b"c"), 3)),
                (6, (true, None, 4)),
                // The read waited for the batch; the put after it takes the
                // next slot (5).
                (7, (true, None, 4)),
                (8, (true, v(b"z"), 5)),
            ]
        );
        assert!(done[1].trace.changed && !done[2].trace.changed);
        assert_eq!(state.chosen.version, 5);
        let slots: Vec<u64> = state.chosen.winners.iter().map(|(s, _)| *s).collect();
        assert_eq!(slots, [1, 2, 5]);
    }

    /// A batch holds at most `BATCH_BYTES_MAX` of commands and answers'
    /// values: every answer carries its own copy of a value, so refused
    /// commands on a large value would otherwise pile copies up.
    #[test]
    fn a_batch_stops_at_its_byte_budget() {
        let big = alloc::vec![7u8; 400 << 10];
        let mut requests = alloc::vec![
            command(1, Command::Create(big.clone())),
            command(2, Command::Put(big.clone())),
        ];
        // Four refused compare-and-swaps: each answer carries the 400 KiB value.
        for id in 3..7 {
            requests.push(command(
                id,
                Command::Cas {
                    expected: 9,
                    value: b"x".to_vec(),
                },
            ));
        }
        requests.push(command(7, Command::Put(b"small".to_vec())));
        let (done, state) = run_three(requests);
        assert_eq!(done.len(), 7);
        assert!(matches!(&done[1].outcome, Outcome::Done(cur) if cur.version == 2));
        for c in &done[2..6] {
            assert!(matches!(&c.outcome, Outcome::Rejected(_, cur) if cur.version == 2));
        }
        assert!(matches!(&done[6].outcome, Outcome::Done(cur) if cur.version == 3));
        // Slot 1: the create. Slot 2: the put and two refusals (2 x 400 KiB
        // of answers); the third refusal would pass 1 MiB, so the batch ends
        // there. The last two refusals are confirmed by reads, and the small
        // put takes slot 3. Without the budget it would have ridden in slot 2.
        let slots: Vec<u64> = state.chosen.winners.iter().map(|(s, _)| *s).collect();
        assert_eq!(slots, [1, 2, 3]);
    }

    fn members(epoch: u64, voters: &[ReplicaId], learners: &[ReplicaId], fast: bool) -> Members {
        Members {
            epoch,
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            fast,
        }
    }

    /// One message to a fresh key; returns what the replica persisted and
    /// every message it sends about it.
    fn deliver(
        r: &mut Replica<RegisterEnv>,
        from: ReplicaId,
        payload: Vec<u8>,
    ) -> (usize, Vec<Msg>) {
        let ready = r.step(Batch {
            states: alloc::vec![KeyState {
                key: b"k".to_vec(),
                state: Vec::new()
            }],
            messages: alloc::vec![Inbound {
                from,
                key: b"k".to_vec(),
                payload
            }],
            ..Batch::default()
        });
        let mut sent = ready.early.send;
        sent.extend(r.release(ready.id).send);
        let msgs = sent
            .iter()
            .map(|o| Msg::decode_any(&o.payload).unwrap().1)
            .collect();
        (ready.persist.len(), msgs)
    }

    fn fast_accept() -> Msg {
        Msg::Accept {
            slot: 1,
            ballot: Ballot::FAST,
            proposal: Proposal {
                id: ProposalId {
                    replica: 1,
                    incarnation: 1,
                    seq: 1,
                },
                value: Some(b"v".to_vec()),
                count: 1,
            },
            catch_up: None,
        }
    }

    /// Voter sets that differ by one replica (n and n + 1, the larger one
    /// holding the smaller): a classic quorum of either meets every classic
    /// and every fast quorum of the other (docs/design.md, section 11).
    #[test]
    fn neighbouring_voter_sets_intersect() {
        for n in 1..64 {
            let (c, f, c1, f1) = (
                quorum_classic(n),
                quorum_fast(n),
                quorum_classic(n + 1),
                quorum_fast(n + 1),
            );
            // A quorum of n + 1 has at least its size - 1 members among n.
            assert!(c + c1 - 1 > n, "n={n}: classic/classic");
            assert!(c + f1 - 1 > n, "n={n}: classic/fast");
            assert!(f + c1 - 1 > n, "n={n}: fast/classic");
        }
    }

    #[test]
    fn epochs_fence_votes_but_not_facts() {
        let mut r = Replica::new(Config::new(2, 1, alloc::vec![1, 2, 3]), RegisterEnv).unwrap();
        r.reconfigure(members(2, &[1, 2, 3], &[], true)).unwrap();
        // A vote request of another epoch is dropped without an answer.
        assert_eq!(
            deliver(&mut r, 1, fast_accept().encode_at(1)),
            (0, alloc::vec![])
        );
        assert_eq!(
            deliver(&mut r, 1, fast_accept().encode_at(1)),
            (0, alloc::vec![])
        );
        // The same request in this epoch is accepted.
        let (written, sent) = deliver(&mut r, 1, fast_accept().encode_at(2));
        assert_eq!(written, 1);
        assert!(matches!(sent[..], [Msg::Accepted { .. }]));
        // A decided fact counts from any epoch.
        let learn = Msg::Learn {
            chosen: Chosen {
                version: 1,
                value: Some(b"v".to_vec()),
                winners: alloc::vec![],
            },
        };
        // (Learning it changes nothing else, so it stays in memory until
        // the next step that touches the key writes it.)
        assert_eq!(deliver(&mut r, 3, learn.encode_at(1)).0, 0);
        assert_eq!(deliver(&mut r, 3, learn.encode_at(1)).0, 1);
        // Older epochs, or the same epoch with other contents, are refused.
        assert!(r.reconfigure(members(1, &[1, 2, 3], &[], true)).is_err());
        assert!(r.reconfigure(members(2, &[1, 2], &[], true)).is_err());
        assert!(r.reconfigure(members(2, &[1, 2, 3], &[], true)).is_ok());
        assert!(r.reconfigure(members(3, &[1, 2], &[2], true)).is_err());
    }

    #[test]
    fn learners_never_vote_and_classic_epochs_refuse_fast_accepts() {
        let mut learner =
            Replica::new(Config::new(4, 1, alloc::vec![1, 2, 3]), RegisterEnv).unwrap();
        learner
            .reconfigure(members(2, &[1, 2, 3], &[4], true))
            .unwrap();
        assert_eq!(
            deliver(&mut learner, 1, fast_accept().encode_at(2)),
            (0, alloc::vec![])
        );
        let query = Msg::Query { id: 1 };
        assert_eq!(
            deliver(&mut learner, 1, query.encode_at(2)),
            (0, alloc::vec![])
        );

        let mut voter = Replica::new(Config::new(2, 1, alloc::vec![1, 2, 3]), RegisterEnv).unwrap();
        voter
            .reconfigure(members(2, &[1, 2, 3], &[], false))
            .unwrap();
        let (written, sent) = deliver(&mut voter, 1, fast_accept().encode_at(2));
        assert_eq!(written, 0);
        assert!(matches!(sent[..], [Msg::Nack { .. }]));
    }

    #[test]
    fn trace_tells_created_changed_and_kept_apart() {
        let (c, s1) = run(Vec::new(), Command::Create(b"a".to_vec()));
        assert!(matches!(
            c.outcome,
            Outcome::Done(Current { version: 1, .. })
        ));
        assert_eq!(
            (
                c.trace.changed,
                c.trace.prior_absent,
                c.trace.fast,
                c.trace.attempts
            ),
            (true, true, true, 1)
        );
        // The same create again keeps the value: no new version.
        let (c, _) = run(s1.clone(), Command::Create(b"a".to_vec()));
        assert!(matches!(
            c.outcome,
            Outcome::Done(Current { version: 1, .. })
        ));
        assert!(!c.trace.changed && !c.trace.prior_absent);
        // A put over an existing value changes it but creates nothing.
        let (c, s2) = run(s1, Command::Put(b"b".to_vec()));
        assert!(c.trace.changed && !c.trace.prior_absent);
        // After a delete the key is absent again.
        let (c, s3) = run(s2, Command::Delete);
        assert!(c.trace.changed);
        let (c, _) = run(s3, Command::Put(b"c".to_vec()));
        assert!(matches!(
            c.outcome,
            Outcome::Done(Current { version: 4, .. })
        ));
        assert!(c.trace.changed && c.trace.prior_absent);
    }

    #[test]
    fn quorum_sizes() {
        let table: Vec<(usize, usize, usize)> = (1..=9)
            .map(|n| (n, quorum_classic(n), quorum_fast(n)))
            .collect();
        assert_eq!(
            table,
            [
                (1, 1, 1),
                (2, 2, 2),
                (3, 2, 3),
                (4, 3, 3),
                (5, 3, 4),
                (6, 4, 5),
                (7, 4, 6),
                (8, 5, 6),
                (9, 5, 7)
            ]
        );
        for n in 1..=64 {
            let (qc, qf) = (quorum_classic(n), quorum_fast(n));
            assert!(
                qc + 2 * qf > 2 * n,
                "n={n}: a classic and two fast quorums must intersect"
            );
            assert!(2 * qc > n);
            assert!(qf * 4 >= 3 * n, "n={n}: fast quorum must be at least 3n/4");
        }
    }
}
