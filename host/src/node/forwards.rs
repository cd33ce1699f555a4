//! Commands peers forward to this replica as a key's leader, followed
//! across a protocol swap.
//!
//! The protocol runs a forwarded command at most once per instance and
//! will not run a copy addressed to an earlier instance (that one may have
//! run it). A swap replaces the instance, so the host drains forwarded
//! commands like its own clients' ones: it waits until the running
//! instance has answered every forward it was given, and holds forwards
//! that arrive meanwhile. After the swap it hands the held ones to the new
//! instance, addressed to it, unless a copy with the same id reached the
//! old one (then the sender's own retries and timeout tell it the outcome
//! is unknown). A copy addressed to the instance just replaced that
//! arrives later (it was on its way during the swap) is handed on the same
//! way. No copy of a command is ever given to two instances.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use ballot_core::wire::Msg;
use ballot_core::{Inbound, Outbound};

/// Forward ids given to the running instance that are remembered, so a
/// held copy of one is never handed to the next instance.
const SEEN_MAX: usize = 16 * 1024;
/// Forwards held during one drain; later ones are dropped (their senders
/// time out).
const HELD_MAX: usize = 4096;
/// How long a drain waits for the answer to one forward. The instance
/// drops some forwards without an answer (a copy below its window of ids,
/// another epoch, an unreadable key); their senders' own timeouts answer.
const OPEN_MAX: Duration = Duration::from_secs(1);

pub(super) struct Forwards {
    /// The running instance.
    incarnation: u64,
    /// The instance it replaced, and the forwards given to that one.
    previous: Option<(u64, HashSet<(u32, u64)>)>,
    /// Given to the running instance and not answered yet, since when.
    open: HashMap<(u32, u64), Instant>,
    /// Given to the running instance, newest last (bounded).
    seen: HashSet<(u32, u64)>,
    seen_order: VecDeque<(u32, u64)>,
    /// Arrived while a swap drained.
    held: Vec<Inbound>,
}

/// The sender's epoch, forward id and addressed instance of a Forward.
fn forward(payload: &[u8]) -> Option<(u64, u64, u64, Vec<u8>)> {
    if Msg::peek_variant(payload) != Some(Msg::FORWARD) {
        return None;
    }
    match Msg::decode_any(payload) {
        Ok((
            epoch,
            Msg::Forward {
                id,
                incarnation,
                command,
            },
        )) => Some((epoch, id, incarnation, command)),
        _ => None,
    }
}

impl Forwards {
    pub(super) fn new(incarnation: u64) -> Forwards {
        Forwards {
            incarnation,
            previous: None,
            open: HashMap::new(),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            held: Vec::new(),
        }
    }

    /// A peer message on its way to the instance: returns it, or `None`
    /// when it is a forward held for the next instance (`draining`).
    pub(super) fn inbound(&mut self, mut m: Inbound, draining: bool) -> Option<Inbound> {
        let Some((epoch, id, addressed, command)) = forward(&m.payload) else {
            return Some(m);
        };
        if draining {
            if self.held.len() < HELD_MAX {
                self.held.push(m);
            }
            return None;
        }
        let at = (m.from, id);
        if let Some((previous, given)) = &self.previous {
            if addressed == *previous && !given.contains(&at) {
                m.payload = Msg::Forward {
                    id,
                    incarnation: self.incarnation,
                    command,
                }
                .encode_at(epoch);
            }
        }
        self.open.entry(at).or_insert_with(Instant::now);
        if self.seen.insert(at) {
            self.seen_order.push_back(at);
            if self.seen_order.len() > SEEN_MAX {
                if let Some(old) = self.seen_order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
        Some(m)
    }

    /// A message the instance sends: an answer closes its forward.
    pub(super) fn outbound(&mut self, o: &Outbound) {
        if Msg::peek_variant(&o.payload) != Some(Msg::FORWARDED) {
            return;
        }
        if let Ok((_, Msg::Forwarded { id, .. })) = Msg::decode_any(&o.payload) {
            self.open.remove(&(o.to, id));
        }
    }

    /// Whether the running instance owes an answer to a forward it was
    /// given less than [`OPEN_MAX`] ago (older ones are forgotten).
    pub(super) fn busy(&mut self) -> bool {
        self.open.retain(|_, since| since.elapsed() < OPEN_MAX);
        !self.open.is_empty()
    }

    /// The instance was replaced by instance `incarnation`: the held
    /// forwards no copy of which reached the old one, addressed to the new.
    pub(super) fn swapped(&mut self, incarnation: u64) -> Vec<Inbound> {
        let held = std::mem::take(&mut self.held);
        let seen = std::mem::take(&mut self.seen);
        self.seen_order.clear();
        self.open.clear();
        self.previous = Some((self.incarnation, seen));
        self.incarnation = incarnation;
        // Each held copy goes through `inbound` as if it arrived now:
        // addressed to the old instance and never given to it, it is
        // readdressed.
        held.into_iter()
            .filter_map(|m| self.inbound(m, false))
            .collect()
    }

    /// The swap did not happen: the held forwards go to the running
    /// instance as they are, counted as given to it (so a later swap waits
    /// for their answers and never hands a copy of one to the next).
    pub(super) fn kept(&mut self) -> Vec<Inbound> {
        std::mem::take(&mut self.held)
            .into_iter()
            .filter_map(|m| self.inbound(m, false))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(from: u32, id: u64, incarnation: u64) -> Inbound {
        Inbound {
            from,
            key: b"k".to_vec(),
            payload: Msg::Forward {
                id,
                incarnation,
                command: vec![1],
            }
            .encode_at(4),
        }
    }

    #[test]
    fn a_swap_waits_for_answers_and_readdresses_only_unseen_forwards() {
        let mut f = Forwards::new(5);
        assert!(f.inbound(fwd(2, 10, 5), false).is_some());
        assert!(f.busy());
        let answer = Outbound {
            to: 2,
            key: b"k".to_vec(),
            payload: Msg::Forwarded {
                id: 10,
                incarnation: 5,
                reply: ballot_core::wire::Reply {
                    outcome: ballot_core::wire::ReplyOutcome::Done {
                        value: None,
                        version: 1,
                    },
                    changed: true,
                    prior_absent: false,
                    fast: false,
                    attempts: 1,
                    prepares: 0,
                },
            }
            .encode_at(4),
        };
        f.outbound(&answer);
        assert!(!f.busy());
        // While draining: a copy of the answered forward and a new one.
        assert!(f.inbound(fwd(2, 10, 5), true).is_none());
        assert!(f.inbound(fwd(3, 11, 5), true).is_none());
        let next = f.swapped(6);
        assert_eq!(next.len(), 2);
        let addressed = |m: &Inbound| match Msg::decode_any(&m.payload).unwrap() {
            (4, Msg::Forward { incarnation, .. }) => incarnation,
            other => panic!("not a forward: {other:?}"),
        };
        // The copy the old instance saw stays addressed to it (the new
        // one answers that the outcome is unknown); the other is handed on.
        assert_eq!((next[0].from, addressed(&next[0])), (2, 5));
        assert_eq!((next[1].from, addressed(&next[1])), (3, 6));
        // A copy addressed to the old instance arriving after the swap.
        let late = f.inbound(fwd(3, 12, 5), false).unwrap();
        assert_eq!(addressed(&late), 6);
        let older = f.inbound(fwd(3, 13, 4), false).unwrap();
        assert_eq!(
            addressed(&older),
            4,
            "only the instance just replaced is followed"
        );
        // A swap that fails keeps the held forwards with the running
        // instance, which then owes their answers.
        let mut f = Forwards::new(5);
        assert!(f.inbound(fwd(2, 20, 5), true).is_none());
        assert!(!f.busy());
        assert_eq!(f.kept().len(), 1);
        assert!(f.busy(), "a forward handed back is waited for");
        assert!(f.inbound(fwd(2, 20, 5), true).is_none());
        let next = f.swapped(6);
        assert_eq!(
            addressed(&next[0]),
            5,
            "a copy of it never reaches the next instance"
        );
        // Other messages pass untouched.
        let learn = Inbound {
            from: 2,
            key: b"k".to_vec(),
            payload: Msg::Query { id: 1 }.encode_at(4),
        };
        assert_eq!(f.inbound(learn.clone(), true), Some(learn));
    }
}
