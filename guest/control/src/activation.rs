//! Protocol activation and rollback (design section 10) as decisions: how
//! an activation starts on the configuration record, how the readiness
//! answers of the current members decide it, how it ends on the record,
//! when traps right after a swap roll a replica back, and the record's
//! edit for that rollback. The daemon (`host/src/registry/activation.rs`)
//! does the I/O: reading and writing the record and the readiness keys,
//! compiling components, swapping the core.

use std::collections::{BTreeMap, BTreeSet};

use ballot_core::ReplicaId;

pub use crate::config::Swap;
use crate::config::{ClusterConfig, PendingActivation, SwapAction, SwapRecord};

/// How long an activation waits for every member to say whether it can
/// run the component.
pub const READY_WAIT_MS: u64 = 15_000;
/// Traps within this long after a swap count towards a rollback.
pub const TRAP_WINDOW_MS: u64 = 60_000;
/// Traps in that window that make a replica fall back to the previous
/// protocol.
pub const TRAPS_TO_ROLL_BACK: usize = 3;

/// A member's answer to a pending activation: the value of its readiness
/// key, JSON `{"ok": true}` or `{"ok": false, "error": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ready,
    Refused(String),
}

impl Verdict {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Verdict::Ready => serde_json::json!({ "ok": true }),
            Verdict::Refused(e) => serde_json::json!({ "ok": false, "error": e }),
        }
        .to_string()
        .into_bytes()
    }

    /// `None` if the bytes are not JSON (the answer is not in yet, as far
    /// as the activation can tell); anything but `"ok": true` refuses.
    pub fn decode(bytes: &[u8]) -> Option<Verdict> {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        Some(if v["ok"] == true {
            Verdict::Ready
        } else {
            Verdict::Refused(v["error"].as_str().unwrap_or("refused").to_string())
        })
    }
}

/// Marks `config` as checking an activation of `target` (`None`: the
/// embedded protocol) named by `nonce` (ms since the Unix epoch, which also
/// dates it); refused while another one, less than two waits old, is
/// being checked. Beginning the same one again changes nothing.
pub fn begin(
    config: &mut ClusterConfig,
    target: Option<String>,
    swap: Swap,
    nonce: u64,
) -> Result<PendingActivation, String> {
    if let Some(p) = &config.protocol.pending {
        if p.nonce == nonce && p.target == target {
            return Ok(p.clone());
        }
        if nonce.saturating_sub(p.nonce) < 2 * READY_WAIT_MS {
            return Err("another activation is being checked; try again shortly".into());
        }
    }
    let pending = PendingActivation {
        target,
        nonce,
        action: swap,
    };
    config.protocol.pending = Some(pending.clone());
    Ok(pending)
}

/// Whether an activation goes ahead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every member said it can run the component.
    Go,
    /// Some refused or did not answer in time: why, replica by replica.
    Refused(String),
}

/// What an activation does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Poll {
    /// Read these members' readiness answers, [`Readiness::answer`] them,
    /// and poll again after a pause.
    Read(Vec<ReplicaId>),
    Decided(Outcome),
}

/// The readiness answers of one activation: every replica of the current
/// membership, voter or learner, must say it can run the component.
#[derive(Clone, Debug)]
pub struct Readiness {
    members: Vec<ReplicaId>,
    answers: BTreeMap<ReplicaId, Verdict>,
    started_ms: u64,
    #[cfg(feature = "planted-bugs")]
    planted_quorum: bool,
}

impl Readiness {
    /// `members` are asked from `now_ms` (a monotonic clock, in ms).
    pub fn new(members: Vec<ReplicaId>, now_ms: u64) -> Readiness {
        Readiness {
            members,
            answers: BTreeMap::new(),
            started_ms: now_ms,
            #[cfg(feature = "planted-bugs")]
            planted_quorum: false,
        }
    }

    /// **Planted bug** (simulator checker tests only): the activation goes
    /// ahead once a majority of the members said they can run the
    /// component, whatever the others said.
    #[cfg(feature = "planted-bugs")]
    pub fn plant_a_quorum_is_enough(&mut self) {
        self.planted_quorum = true;
    }

    pub fn answer(&mut self, replica: ReplicaId, verdict: Verdict) {
        if self.members.contains(&replica) {
            self.answers.insert(replica, verdict);
        }
    }

    /// Decided once every member answered, or when the wait is over.
    pub fn poll(&self, now_ms: u64) -> Poll {
        #[cfg(feature = "planted-bugs")]
        if self.planted_quorum {
            let ready = self
                .answers
                .values()
                .filter(|v| **v == Verdict::Ready)
                .count();
            if ready > self.members.len() / 2 {
                return Poll::Decided(Outcome::Go);
            }
        }
        let waiting: Vec<ReplicaId> = self
            .members
            .iter()
            .copied()
            .filter(|m| !self.answers.contains_key(m))
            .collect();
        let over = now_ms.saturating_sub(self.started_ms) >= READY_WAIT_MS;
        if !waiting.is_empty() && !over {
            return Poll::Read(waiting);
        }
        let mut refusals: Vec<String> = self
            .answers
            .iter()
            .filter_map(|(r, v)| match v {
                Verdict::Refused(e) => Some(format!("replica {r}: {e}")),
                Verdict::Ready => None,
            })
            .collect();
        refusals.extend(waiting.iter().map(|r| {
            format!(
                "replica {r} did not say within {}s whether it can run it",
                READY_WAIT_MS / 1000
            )
        }));
        Poll::Decided(if refusals.is_empty() {
            Outcome::Go
        } else {
            Outcome::Refused(refusals.join("; "))
        })
    }
}

/// Ends activation `nonce` on `config` as `outcome` says, recorded by
/// replica `by` at `now_ms`: refused, it is only recorded; gone ahead,
/// `target` runs and the rollback stack moves as `swap` says. An error if
/// another activation replaced this one meanwhile.
pub fn conclude(
    config: &mut ClusterConfig,
    nonce: u64,
    target: &Option<String>,
    swap: Swap,
    outcome: &Outcome,
    by: ReplicaId,
    now_ms: u64,
) -> Result<(), String> {
    if config.protocol.pending.as_ref().map(|p| p.nonce) != Some(nonce) {
        return Err("another activation replaced this one".into());
    }
    config.protocol.pending = None;
    let from = config.protocol.active.clone();
    let (action, reason) = match outcome {
        Outcome::Refused(why) => (SwapAction::Refused, Some(why.clone())),
        Outcome::Go => {
            match swap {
                Swap::Rollback => {
                    config.protocol.previous.pop();
                }
                Swap::Activate => config.protocol.previous.push(from.clone()),
            }
            config.protocol.active = target.clone();
            (swap.into(), None)
        }
    };
    config.record(SwapRecord {
        at_ms: now_ms,
        action,
        from,
        to: target.clone(),
        by,
        reason,
    });
    Ok(())
}

/// Rolls `config` back from `failing` (a component id, or `embedded` for
/// the embedded protocol) to the protocol before it, recorded by replica
/// `by`; false, and nothing changed, if `failing` is no longer active.
pub fn roll_back(
    config: &mut ClusterConfig,
    failing: &str,
    embedded: &str,
    why: &str,
    by: ReplicaId,
    now_ms: u64,
) -> bool {
    let current = config.protocol.active.clone();
    if current.as_deref().unwrap_or(embedded) != failing {
        return false;
    }
    let to = config.protocol.previous.pop().unwrap_or(None);
    config.protocol.active = to.clone();
    config.protocol.pending = None;
    config.record(SwapRecord {
        at_ms: now_ms,
        action: SwapAction::AutoRollback,
        from: current,
        to,
        by,
        reason: Some(why.to_string()),
    });
    true
}

/// What one replica does about the configuration it applied (design
/// section 10): answer a pending activation once, delete its answers to
/// activations that are over, and swap to the active protocol unless it
/// fell back from that one. The daemon (`host/src/registry/activation.rs`)
/// and the simulator both drive it on every configuration they apply.
#[derive(Clone, Debug, Default)]
pub struct Follower {
    /// The component the core was last told to run.
    desired: Option<String>,
    /// Activations answered, by nonce, whose answers are not deleted yet.
    reported: BTreeSet<u64>,
    /// Components this replica fell back from: never swapped to again,
    /// unless an operator activates one again.
    quarantined: BTreeSet<String>,
}

/// What a replica does about one configuration, in this order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Follow {
    /// Delete this replica's readiness answers to these activations (they
    /// are over), and call [`Follower::forgot`] for each one deleted.
    pub forget: Vec<u64>,
    /// Check whether this replica can run this pending activation's
    /// target, and write the [`Verdict`] to its readiness key.
    pub answer: Option<PendingActivation>,
    /// Swap the core to this protocol (a component id, or the embedded
    /// protocol's): once it is prepared, call [`Follower::swapping`].
    pub swap: Option<String>,
}

impl Follower {
    /// A replica that runs `running` (a component id).
    pub fn new(running: &str) -> Follower {
        Follower {
            desired: Some(running.to_string()),
            ..Follower::default()
        }
    }

    /// What to do about `config`, just applied; `embedded` is the id of the
    /// embedded protocol, which `None` in the record names.
    pub fn follow(&mut self, config: &ClusterConfig, embedded: &str) -> Follow {
        let pending = config.protocol.pending.as_ref();
        let forget = self
            .reported
            .iter()
            .copied()
            .filter(|&n| Some(n) != pending.map(|p| p.nonce))
            .collect();
        let answer = pending.filter(|p| self.reported.insert(p.nonce)).cloned();
        if let Some(p) = &answer {
            // An operator activating a component again is trying it
            // again: it is no longer quarantined here.
            self.quarantined
                .remove(p.target.as_deref().unwrap_or(embedded));
        }
        let target = config.protocol.active.as_deref().unwrap_or(embedded);
        let swap = (!self.quarantined.contains(target) && self.desired.as_deref() != Some(target))
            .then(|| target.to_string());
        Follow {
            forget,
            answer,
            swap,
        }
    }

    /// This replica's answer to activation `nonce` is deleted.
    pub fn forgot(&mut self, nonce: u64) {
        self.reported.remove(&nonce);
    }

    /// The core was told to run `label`.
    pub fn swapping(&mut self, label: &str) {
        self.desired = Some(label.to_string());
    }

    /// This replica fell back from `label`: it does not swap to it again.
    pub fn quarantine(&mut self, label: &str) {
        self.quarantined.insert(label.to_string());
    }

    /// The component the core was last told to run.
    pub fn desired(&self) -> Option<&str> {
        self.desired.as_deref()
    }
}

/// The traps of this replica's protocol instance since its last swap: a
/// protocol that traps [`TRAPS_TO_ROLL_BACK`] times within
/// [`TRAP_WINDOW_MS`] of its activation is rolled back. Times are a
/// monotonic clock in ms.
#[derive(Clone, Debug, Default)]
pub struct TrapWatch {
    swapped_at_ms: Option<u64>,
    traps: Vec<u64>,
}

impl TrapWatch {
    pub fn swapped(&mut self, now_ms: u64) {
        self.traps.clear();
        self.swapped_at_ms = Some(now_ms);
    }

    /// Counts a trap; true if the protocol should be rolled back.
    pub fn trapped(&mut self, now_ms: u64) -> bool {
        self.traps
            .retain(|&t| now_ms.saturating_sub(t) < TRAP_WINDOW_MS);
        self.traps.push(now_ms);
        let recent = self
            .swapped_at_ms
            .is_some_and(|at| now_ms.saturating_sub(at) < TRAP_WINDOW_MS);
        recent && self.traps.len() >= TRAPS_TO_ROLL_BACK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_running(active: Option<&str>, previous: &[Option<&str>]) -> ClusterConfig {
        let mut c = ClusterConfig::new();
        c.protocol.active = active.map(String::from);
        c.protocol.previous = previous.iter().map(|p| p.map(String::from)).collect();
        c
    }

    #[test]
    fn verdicts_round_trip_and_anything_but_ok_refuses() {
        for v in [Verdict::Ready, Verdict::Refused("no".into())] {
            assert_eq!(Verdict::decode(&v.encode()), Some(v));
        }
        assert_eq!(
            Verdict::decode(br#"{"ok": "yes"}"#),
            Some(Verdict::Refused("refused".into()))
        );
        assert_eq!(Verdict::decode(b"{"), None);
    }

    #[test]
    fn an_activation_waits_for_every_member_then_goes() {
        let mut r = Readiness::new(vec![1, 2, 4], 0);
        assert_eq!(r.poll(0), Poll::Read(vec![1, 2, 4]));
        r.answer(2, Verdict::Ready);
        r.answer(3, Verdict::Refused("not a member".into()));
        assert_eq!(r.poll(10), Poll::Read(vec![1, 4]));
        r.answer(1, Verdict::Ready);
        r.answer(4, Verdict::Ready);
        assert_eq!(r.poll(20), Poll::Decided(Outcome::Go));
    }

    #[test]
    fn a_refusal_or_a_silent_member_refuses_the_activation() {
        let mut r = Readiness::new(vec![1, 2, 3], 0);
        r.answer(1, Verdict::Refused("wire format 9 unknown".into()));
        r.answer(2, Verdict::Ready);
        // It keeps waiting for 3 until the wait is over...
        assert_eq!(r.poll(READY_WAIT_MS - 1), Poll::Read(vec![3]));
        // ...then says why, replica by replica.
        assert_eq!(
            r.poll(READY_WAIT_MS),
            Poll::Decided(Outcome::Refused(
                "replica 1: wire format 9 unknown; \
                 replica 3 did not say within 15s whether it can run it"
                    .into()
            ))
        );
    }

    #[test]
    fn concluding_moves_the_rollback_stack_or_records_the_refusal() {
        let mut c = config_running(None, &[]);
        let p = begin(&mut c, Some("next".into()), Swap::Activate, 100_000).unwrap();
        // A second activation while this one is checked is refused; the
        // same one again is a no-op.
        assert!(begin(&mut c, None, Swap::Activate, 100_001).is_err());
        assert_eq!(
            begin(&mut c, Some("next".into()), Swap::Activate, 100_000),
            Ok(p.clone())
        );
        conclude(
            &mut c,
            p.nonce,
            &p.target,
            Swap::Activate,
            &Outcome::Go,
            2,
            7,
        )
        .unwrap();
        assert_eq!(c.protocol.active.as_deref(), Some("next"));
        assert_eq!(c.protocol.previous, vec![None]);
        assert!(c.protocol.pending.is_none());
        assert_eq!(
            (c.history[0].action, c.history[0].by, c.history[0].at_ms),
            (SwapAction::Activate, 2, 7)
        );
        // Concluding again (or another attempt's nonce) is refused.
        assert!(conclude(
            &mut c,
            p.nonce,
            &p.target,
            Swap::Activate,
            &Outcome::Go,
            2,
            8
        )
        .is_err());
        // A refusal changes nothing but the history.
        let p = begin(&mut c, None, Swap::Rollback, 200_000).unwrap();
        let no = Outcome::Refused("replica 3: no".into());
        conclude(&mut c, p.nonce, &p.target, Swap::Rollback, &no, 1, 9).unwrap();
        assert_eq!(c.protocol.active.as_deref(), Some("next"));
        assert_eq!(c.history[1].action, SwapAction::Refused);
        assert_eq!(c.history[1].reason.as_deref(), Some("replica 3: no"));
        // A rollback goes ahead and pops the stack.
        let p = begin(&mut c, None, Swap::Rollback, 300_000).unwrap();
        conclude(
            &mut c,
            p.nonce,
            &p.target,
            Swap::Rollback,
            &Outcome::Go,
            1,
            10,
        )
        .unwrap();
        assert_eq!(c.protocol.active, None);
        assert!(c.protocol.previous.is_empty());
        // A stale pending activation (two waits old) is taken over.
        let mut c = config_running(None, &[]);
        begin(&mut c, Some("a".into()), Swap::Activate, 0).unwrap();
        assert!(begin(&mut c, Some("b".into()), Swap::Activate, 2 * READY_WAIT_MS).is_ok());
    }

    #[test]
    fn a_replica_answers_once_forgets_what_is_over_and_follows_the_active_protocol() {
        let mut f = Follower::new("embedded");
        let mut c = config_running(None, &[]);
        // Nothing pending, already running the active one: nothing to do.
        assert_eq!(f.follow(&c, "embedded"), Follow::default());
        // A pending activation is answered once, however often it is seen.
        let p = begin(&mut c, Some("next".into()), Swap::Activate, 1_000).unwrap();
        assert_eq!(f.follow(&c, "embedded").answer, Some(p.clone()));
        assert_eq!(f.follow(&c, "embedded"), Follow::default());
        // It goes ahead: the answer is deleted and the core swaps, once.
        conclude(
            &mut c,
            p.nonce,
            &p.target,
            Swap::Activate,
            &Outcome::Go,
            1,
            2,
        )
        .unwrap();
        let follow = f.follow(&c, "embedded");
        assert_eq!(follow.forget, vec![1_000]);
        assert_eq!(follow.swap.as_deref(), Some("next"));
        f.swapping("next");
        f.forgot(1_000);
        assert_eq!(f.follow(&c, "embedded"), Follow::default());
        assert_eq!(f.desired(), Some("next"));
        // An answer whose delete failed is deleted again next time.
        let p = begin(&mut c, None, Swap::Rollback, 100_000).unwrap();
        f.follow(&c, "embedded");
        conclude(
            &mut c,
            p.nonce,
            &p.target,
            Swap::Rollback,
            &Outcome::Go,
            1,
            3,
        )
        .unwrap();
        assert_eq!(f.follow(&c, "embedded").forget, vec![100_000]);
        assert_eq!(f.follow(&c, "embedded").forget, vec![100_000]);
    }

    #[test]
    fn a_replica_does_not_swap_back_to_what_it_fell_back_from_until_it_is_activated_again() {
        let mut f = Follower::new("bad");
        f.quarantine("bad");
        let mut c = config_running(Some("bad"), &[None]);
        assert_eq!(f.follow(&c, "embedded").swap, None);
        // The operator activates it again: it is tried again.
        c.protocol.active = None;
        let p = begin(&mut c, Some("bad".into()), Swap::Activate, 5).unwrap();
        assert!(f.follow(&c, "embedded").answer.is_some());
        conclude(
            &mut c,
            p.nonce,
            &p.target,
            Swap::Activate,
            &Outcome::Go,
            1,
            6,
        )
        .unwrap();
        f.swapping("embedded");
        assert_eq!(f.follow(&c, "embedded").swap.as_deref(), Some("bad"));
    }

    #[test]
    fn traps_soon_after_a_swap_roll_back_to_the_previous_protocol() {
        let mut w = TrapWatch::default();
        // Traps with no swap in this process: never.
        assert!(!w.trapped(0) && !w.trapped(1) && !w.trapped(2));
        w.swapped(1_000);
        assert!(!w.trapped(1_001));
        assert!(!w.trapped(1_002));
        assert!(w.trapped(1_003));
        // Long after the swap, traps are the protocol's, not the swap's.
        w.swapped(0);
        assert!(!w.trapped(TRAP_WINDOW_MS) && !w.trapped(TRAP_WINDOW_MS + 1));
        assert!(!w.trapped(TRAP_WINDOW_MS + 2));

        let mut c = config_running(Some("bad"), &[None, Some("good")]);
        assert!(!roll_back(&mut c, "other", "embedded", "trapped", 3, 5));
        assert!(roll_back(&mut c, "bad", "embedded", "trapped", 3, 5));
        assert_eq!(c.protocol.active.as_deref(), Some("good"));
        assert_eq!(c.protocol.previous, vec![None]);
        assert_eq!(c.history[0].action, SwapAction::AutoRollback);
        // The embedded protocol failing falls back too, by its id.
        let mut c = config_running(None, &[Some("old")]);
        assert!(roll_back(&mut c, "embedded", "embedded", "trapped", 3, 5));
        assert_eq!(c.protocol.active.as_deref(), Some("old"));
    }
}
