//! Plain Rust mirrors of the WIT types in `wit/ballot.wit`.
//!
//! The native core uses these directly; the component wrapper and the host
//! runtime convert to and from the generated bindings, field for field.

use alloc::string::String;
use alloc::vec::Vec;

/// A replica's id. Unique within a cluster.
pub type ReplicaId = u32;

/// A key's committed value (`policy-api.current`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Current {
    /// `None` for a key never written or deleted.
    pub value: Option<Vec<u8>>,
    /// 0 for a key never written; each change adds one.
    pub version: u64,
}

/// What a command does to a value (`policy-api.change`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Keep,
    Set(Vec<u8>),
    Remove,
}

/// Why a policy refused a command (`policy-api.rejection`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rejection {
    pub code: String,
    pub message: String,
}

/// Fixed configuration of one replica (`replica.config`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub self_id: ReplicaId,
    pub incarnation: u64,
    pub voters: Vec<ReplicaId>,
    pub fast_timeout_ms: u32,
    pub round_timeout_ms: u32,
    pub attempts_max: u32,
    pub inflight_max: u32,
}

impl Config {
    /// A configuration with the default timeouts and bounds.
    pub fn new(self_id: ReplicaId, incarnation: u64, voters: Vec<ReplicaId>) -> Self {
        Config {
            self_id,
            incarnation,
            voters,
            fast_timeout_ms: 50,
            round_timeout_ms: 200,
            attempts_max: 10,
            inflight_max: 4096,
        }
    }
}

/// The cluster's membership as one replica knows it (`membership.members`).
///
/// Configurations are ordered by `epoch`. Quorums are counted among
/// `voters`; `learners` receive every decision but never vote. With `fast`
/// off, proposers use classic rounds only and acceptors refuse fast accepts:
/// the cluster passes through such an epoch around every change of voters
/// (see `docs/design.md`, section 11).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Members {
    pub epoch: u64,
    pub voters: Vec<ReplicaId>,
    pub learners: Vec<ReplicaId>,
    pub fast: bool,
}

impl Members {
    /// The membership a replica starts with before it has heard of any
    /// change: epoch 1, the configured voters, the fast round on.
    pub fn initial(voters: Vec<ReplicaId>) -> Members {
        Members {
            epoch: 1,
            voters,
            learners: Vec::new(),
            fast: true,
        }
    }

    /// Checks the shape: 1 to 64 voters, no duplicates, learners apart.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.voters.len();
        if n == 0 || n > 64 {
            return Err(alloc::format!("need 1 to 64 voters, got {n}"));
        }
        if self.epoch == 0 {
            return Err("epochs start at 1".into());
        }
        let mut all: Vec<ReplicaId> = self.voters.iter().chain(&self.learners).copied().collect();
        all.sort_unstable();
        let len = all.len();
        all.dedup();
        if all.len() != len {
            return Err("a replica is listed twice among voters and learners".into());
        }
        Ok(())
    }

    /// Whether `id` is a voter or a learner.
    pub fn contains(&self, id: ReplicaId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }
}

/// A key's persisted protocol state; empty `state` means never touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyState {
    pub key: Vec<u8>,
    pub state: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Consistency {
    Linearizable,
    Local,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// A command for the key's policy.
    Command(Vec<u8>),
    Read(Consistency),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub key: Vec<u8>,
    pub op: Operation,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inbound {
    pub from: ReplicaId,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timer {
    pub key: Vec<u8>,
    pub token: u64,
    pub at_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub now_ms: u64,
    pub seed: u64,
    pub states: Vec<KeyState>,
    pub requests: Vec<Request>,
    pub messages: Vec<Inbound>,
    pub timers: Vec<Timer>,
}

/// A newly learned committed value (`replica.commit`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    pub version: u64,
    pub value: Option<Vec<u8>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub key: Vec<u8>,
    pub state: Vec<u8>,
    pub commit: Option<Commit>,
}

/// State changes to make durable before `release(id)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    pub id: u64,
    pub persist: Vec<Write>,
    /// Effects that do not depend on `persist`: they may be applied once
    /// every earlier ready is durable, without waiting for this one.
    pub early: Actions,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outbound {
    pub to: ReplicaId,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    NoQuorum,
    Contention,
    Overloaded,
    Invalid,
    /// Made by the host, never by the protocol: the replica's protocol
    /// instance was replaced (a trap, or a swap that could not wait) before
    /// the command finished.
    Interrupted,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Failure {
    pub reason: FailureReason,
    pub maybe_applied: bool,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Done(Current),
    Rejected(Rejection, Current),
    Failed(Failure),
}

/// How an operation went (`replica.trace`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Trace {
    /// The command wrote a new version.
    pub changed: bool,
    /// The key had no value before the version this command wrote.
    pub prior_absent: bool,
    /// The new version was chosen in the fast round.
    pub fast: bool,
    /// Attempts made (1 when the first one finished).
    pub attempts: u32,
    /// Classic rounds (prepares) this replica started for it.
    pub prepares: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub id: u64,
    pub outcome: Outcome,
    pub trace: Trace,
}

/// What a ready releases once it is durable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Actions {
    pub send: Vec<Outbound>,
    pub complete: Vec<Completion>,
    pub timers: Vec<Timer>,
}

/// What a protocol implementation is (`replica.info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    pub version: String,
    pub state_formats: Vec<u32>,
    pub wire_formats: Vec<u32>,
}
