//! The ready pipeline: what a replica's host does between `step` and
//! `release` (design section 5).
//!
//! The host steps the protocol without waiting for the previous ready to
//! become durable, and releases strictly in order. This type keeps the
//! bookkeeping that makes that safe, and nothing else:
//!
//! - **host numbering**: the guest numbers its readies per instance, and a
//!   trap or a swap starts a new instance, so the host numbers them itself;
//!   the writer reports durability in host numbers;
//! - **the early-action rule**: a ready's early actions go once every
//!   earlier ready is durable, without waiting for its own fsync;
//! - **the pending overlay**: the newest state of each key whose last write
//!   is not durable yet, which the next step must see instead of LMDB's;
//! - **watched commits**: commits of the keys the host acts on (the
//!   component configuration, the membership), handed over only once
//!   durable.
//!
//! The daemon (`host/src/node/driver.rs`) and the simulator drive this same
//! type; it does no I/O and calls nothing: it says what to apply and what to
//! release, in order.

use std::collections::{HashMap, VecDeque};

use ballot_core::{Actions, Commit, Ready};

/// One ready stepped and not released yet.
#[derive(Debug)]
struct Entry {
    host: u64,
    /// The instance's own number for it; `None` once that instance is gone
    /// (its writes still become durable, nothing of it is released).
    guest: Option<u64>,
    /// Its early actions, while an earlier ready is not durable.
    early: Option<Actions>,
}

/// What [`Pipeline::stepped`] says about a ready just stepped.
#[derive(Debug)]
pub struct Stepped {
    /// Its host number: what the writer reports durable.
    pub host: u64,
    /// Early actions to apply now (every earlier ready is durable).
    pub early: Option<Actions>,
    /// It writes nothing and nothing is before it: call
    /// [`Pipeline::durable`] with `host` now instead of writing it.
    pub durable_now: bool,
}

/// One thing to do, in order, once readies are durable.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Apply these actions (early actions of a ready not applied before).
    Apply(Actions),
    /// Call the instance's `release` with this guest number and apply what
    /// it returns. If that fails, the instance is gone: call
    /// [`Pipeline::forget_instance`] and drop the steps after this one.
    Release(u64),
}

/// What became durable.
#[derive(Debug, Default)]
pub struct Durable {
    /// Commits of watched keys, in the order they were stepped.
    pub commits: Vec<(Vec<u8>, Commit)>,
    /// What to do, in order.
    pub steps: Vec<Step>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Pipeline {
    last: u64,
    queue: VecDeque<Entry>,
    pending: HashMap<Vec<u8>, (u64, Vec<u8>)>,
    watched: Vec<Vec<u8>>,
    commits: VecDeque<(u64, Vec<u8>, Commit)>,
    #[cfg(feature = "planted-bugs")]
    planted_jump: bool,
}

impl Pipeline {
    /// A pipeline that reports durable commits of `watched` keys.
    pub fn new(watched: Vec<Vec<u8>>) -> Self {
        Pipeline {
            last: 0,
            queue: VecDeque::new(),
            pending: HashMap::new(),
            watched,
            commits: VecDeque::new(),
            #[cfg(feature = "planted-bugs")]
            planted_jump: false,
        }
    }

    /// **Planted bug** (simulator checker tests only): a ready that writes
    /// nothing is released at once even when earlier readies are not
    /// durable, which releases those too, before their fsync.
    #[cfg(feature = "planted-bugs")]
    pub fn plant_empty_ready_jumps_the_queue(&mut self) {
        self.planted_jump = true;
    }

    /// Readies stepped and not released.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The host number of the newest ready not durable yet, if any.
    pub fn newest(&self) -> Option<u64> {
        self.queue.back().map(|e| e.host)
    }

    /// The newest state of `key` not durable yet, if any: the next step
    /// must see it rather than what storage holds.
    pub fn state(&self, key: &[u8]) -> Option<&[u8]> {
        self.pending.get(key).map(|(_, s)| &s[..])
    }

    /// Takes a ready the instance just made. Its id becomes the host
    /// number and its early actions are taken out: they come back either
    /// now, in the answer, or later from [`Pipeline::durable`]. The caller
    /// then hands `ready.persist` to the writer, unless `durable_now`.
    pub fn stepped(&mut self, ready: &mut Ready) -> Stepped {
        self.last += 1;
        let host = self.last;
        let guest = std::mem::replace(&mut ready.id, host);
        for w in &ready.persist {
            self.pending.insert(w.key.clone(), (host, w.state.clone()));
            if let Some(c) = &w.commit {
                if self.watched.contains(&w.key) {
                    self.commits.push_back((host, w.key.clone(), c.clone()));
                }
            }
        }
        let early = std::mem::take(&mut ready.early);
        let first = self.queue.is_empty();
        let (early, held) = if first {
            (Some(early), None)
        } else {
            (None, Some(early))
        };
        self.queue.push_back(Entry {
            host,
            guest: Some(guest),
            early: held,
        });
        #[cfg(feature = "planted-bugs")]
        if self.planted_jump && ready.persist.is_empty() {
            return Stepped {
                host,
                early,
                durable_now: true,
            };
        }
        Stepped {
            host,
            early,
            durable_now: first && ready.persist.is_empty(),
        }
    }

    /// Every ready up to host number `upto` is durable.
    pub fn durable(&mut self, upto: u64) -> Durable {
        let mut out = Durable::default();
        self.pending.retain(|_, (host, _)| *host > upto);
        while self.commits.front().is_some_and(|(h, _, _)| *h <= upto) {
            let (_, key, commit) = self.commits.pop_front().expect("checked above");
            out.commits.push((key, commit));
        }
        while self.queue.front().is_some_and(|e| e.host <= upto) {
            let e = self.queue.pop_front().expect("checked above");
            // A ready made durable in the same group commit as the one
            // before it has not had its early actions applied yet.
            if let Some(early) = e.early {
                out.steps.push(Step::Apply(early));
            }
            if let Some(guest) = e.guest {
                out.steps.push(Step::Release(guest));
            }
        }
        // The next ready's early actions may go once everything before it
        // is durable.
        if let Some(early) = self.queue.front_mut().and_then(|e| e.early.take()) {
            out.steps.push(Step::Apply(early));
        }
        out
    }

    /// The instance that made the readies in flight is gone (a trap, a
    /// swap): their writes still become durable in order, but nothing of
    /// them is released or applied, as if the replica had crashed right
    /// after the fsync.
    pub fn forget_instance(&mut self) {
        for e in &mut self.queue {
            e.guest = None;
            e.early = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballot_core::{Outbound, Write};

    fn actions(tag: u8) -> Actions {
        Actions {
            send: vec![Outbound {
                to: 2,
                key: vec![tag],
                payload: vec![],
            }],
            ..Actions::default()
        }
    }

    fn ready(guest: u64, writes: &[(&[u8], &[u8], Option<u64>)], early: u8) -> Ready {
        Ready {
            id: guest,
            persist: writes
                .iter()
                .map(|(k, s, v)| Write {
                    key: k.to_vec(),
                    state: s.to_vec(),
                    commit: v.map(|version| Commit {
                        version,
                        value: Some(vec![early]),
                    }),
                })
                .collect(),
            early: actions(early),
        }
    }

    #[test]
    fn numbers_readies_itself_and_hands_the_first_early_actions_over_at_once() {
        let mut p = Pipeline::new(vec![]);
        let mut r = ready(41, &[(b"k", b"s1", None)], 1);
        let s = p.stepped(&mut r);
        assert_eq!((s.host, r.id), (1, 1));
        assert_eq!(s.early, Some(actions(1)));
        assert!(!s.durable_now);
        assert_eq!(r.early, Actions::default());
        let mut r = ready(42, &[(b"k", b"s2", None)], 2);
        let s = p.stepped(&mut r);
        assert_eq!(s.host, 2);
        assert_eq!(s.early, None, "an earlier ready is not durable yet");
        assert_eq!(p.len(), 2);
        let d = p.durable(1);
        assert_eq!(d.steps, vec![Step::Release(41), Step::Apply(actions(2))]);
        let d = p.durable(2);
        assert_eq!(d.steps, vec![Step::Release(42)]);
        assert!(p.is_empty());
    }

    #[test]
    fn a_group_commit_applies_held_early_actions_before_their_release() {
        let mut p = Pipeline::new(vec![]);
        for (g, e) in [(7, 1), (8, 2), (9, 3)] {
            p.stepped(&mut ready(g, &[(b"k", b"s", None)], e));
        }
        let d = p.durable(3);
        assert_eq!(
            d.steps,
            vec![
                Step::Release(7),
                Step::Apply(actions(2)),
                Step::Release(8),
                Step::Apply(actions(3)),
                Step::Release(9),
            ]
        );
    }

    #[test]
    fn the_overlay_holds_the_newest_state_until_its_ready_is_durable() {
        let mut p = Pipeline::new(vec![]);
        p.stepped(&mut ready(
            1,
            &[(b"a", b"a1", None), (b"b", b"b1", None)],
            1,
        ));
        p.stepped(&mut ready(2, &[(b"a", b"a2", None)], 2));
        assert_eq!(p.state(b"a"), Some(&b"a2"[..]));
        assert_eq!(p.state(b"b"), Some(&b"b1"[..]));
        assert_eq!(p.state(b"c"), None);
        p.durable(1);
        assert_eq!(
            p.state(b"a"),
            Some(&b"a2"[..]),
            "its newest write is not durable"
        );
        assert_eq!(p.state(b"b"), None, "storage holds it now");
        p.durable(2);
        assert_eq!(p.state(b"a"), None);
    }

    #[test]
    fn an_empty_ready_is_durable_at_once_only_with_nothing_before_it() {
        let mut p = Pipeline::new(vec![]);
        let s = p.stepped(&mut ready(1, &[], 1));
        assert!(s.durable_now);
        assert_eq!(p.durable(s.host).steps, vec![Step::Release(1)]);
        p.stepped(&mut ready(2, &[(b"k", b"s", None)], 2));
        let s = p.stepped(&mut ready(3, &[], 3));
        assert!(!s.durable_now, "it would release ready 2 before its fsync");
    }

    #[test]
    fn watched_commits_come_out_once_durable_and_in_order() {
        let mut p = Pipeline::new(vec![b"w".to_vec()]);
        p.stepped(&mut ready(
            1,
            &[(b"w", b"s", Some(5)), (b"x", b"s", Some(1))],
            1,
        ));
        p.stepped(&mut ready(2, &[(b"w", b"s", None)], 2));
        p.stepped(&mut ready(3, &[(b"w", b"s", Some(6))], 3));
        let versions = |d: Durable| d.commits.iter().map(|(_, c)| c.version).collect::<Vec<_>>();
        assert_eq!(
            versions(p.durable(2)),
            vec![5],
            "unwatched keys are not reported"
        );
        assert_eq!(versions(p.durable(3)), vec![6]);
    }

    #[test]
    fn a_forgotten_instance_releases_nothing_but_its_writes_still_count() {
        let mut p = Pipeline::new(vec![b"w".to_vec()]);
        p.stepped(&mut ready(1, &[(b"w", b"s", Some(1))], 1));
        p.stepped(&mut ready(2, &[(b"w", b"s2", None)], 2));
        p.forget_instance();
        let s = p.stepped(&mut ready(1, &[(b"k", b"s", None)], 3));
        assert_eq!(s.host, 3, "host numbers go on across instances");
        assert_eq!(s.early, None);
        assert_eq!(p.state(b"w"), Some(&b"s2"[..]));
        let d = p.durable(2);
        assert_eq!(
            d.steps,
            vec![Step::Apply(actions(3))],
            "only the new instance's"
        );
        assert_eq!(d.commits.len(), 1, "the commit is durable all the same");
        let d = p.durable(3);
        assert_eq!(d.steps, vec![Step::Release(1)]);
    }
}
