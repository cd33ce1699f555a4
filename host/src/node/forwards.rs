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
//!
//! Forwarded commands are bounded in bytes, as a replica's own clients'
//! are: the instance holds each one (its proposal, the state it persists,
//! the messages carrying it) until it answers, and every peer may forward
//! up to its own in-flight bound at once. A forward that would take the
//! unanswered ones past [`OPEN_BYTES_MAX`], or the held ones past
//! [`HELD_BYTES_MAX`], is dropped and counted; its sender's own timeout
//! answers for it, as for a lost message.

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
/// Bytes of forwarded commands (keys and commands) the running instance
/// holds unanswered, at most: with the replica's own 8 MiB
/// (`INFLIGHT_BYTES_MAX`), 16 MiB of commands in a guest of 256 MiB.
pub(super) const OPEN_BYTES_MAX: usize = 8 << 20;
/// Bytes of forwards held during one drain, at most. They all go into the
/// new instance's first step, which stays within the step bound
/// (`BATCH_BYTES_MAX`, 16 MiB).
pub(super) const HELD_BYTES_MAX: usize = 8 << 20;

pub(super) struct Forwards {
    /// The running instance.
    incarnation: u64,
    /// The instance it replaced, and the forwards given to that one.
    previous: Option<(u64, HashSet<(u32, u64)>)>,
    /// Given to the running instance and not answered yet: since when,
    /// and its bytes.
    open: HashMap<(u32, u64), (Instant, usize)>,
    /// The bytes of `open`.
    open_bytes: usize,
    /// Given to the running instance, newest last (bounded).
    seen: HashSet<(u32, u64)>,
    seen_order: VecDeque<(u32, u64)>,
    /// Arrived while a swap drained, and their bytes.
    held: Vec<Inbound>,
    held_bytes: usize,
    /// Forwards dropped over the byte bounds, since last taken.
    dropped: u64,
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
            open_bytes: 0,
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            held: Vec::new(),
            held_bytes: 0,
            dropped: 0,
        }
    }

    /// A peer message on its way to the instance: returns it, or `None`
    /// when it is a forward held for the next instance (`draining`) or
    /// dropped over a bound.
    pub(super) fn inbound(&mut self, mut m: Inbound, draining: bool) -> Option<Inbound> {
        let Some((epoch, id, addressed, command)) = forward(&m.payload) else {
            return Some(m);
        };
        let bytes = m.key.len() + m.payload.len();
        if draining {
            if self.held.len() < HELD_MAX && self.held_bytes + bytes <= HELD_BYTES_MAX {
                self.held_bytes += bytes;
                self.held.push(m);
            } else {
                self.dropped += 1;
            }
            return None;
        }
        let at = (m.from, id);
        // A copy of a forward the instance holds costs it nothing more.
        if !self.open.contains_key(&at) {
            self.forget_stale();
            if self.open_bytes + bytes > OPEN_BYTES_MAX {
                self.dropped += 1;
                return None;
            }
            self.open.insert(at, (Instant::now(), bytes));
            self.open_bytes += bytes;
        }
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
            if let Some((_, bytes)) = self.open.remove(&(o.to, id)) {
                self.open_bytes -= bytes;
            }
        }
    }

    /// Forgets forwards given more than [`OPEN_MAX`] ago: the instance
    /// dropped them, or answers them late; either way their senders have
    /// timed out.
    fn forget_stale(&mut self) {
        let bytes = &mut self.open_bytes;
        self.open.retain(|_, (since, b)| {
            let keep = since.elapsed() < OPEN_MAX;
            if !keep {
                *bytes -= *b;
            }
            keep
        });
    }

    /// Forwards dropped over the byte bounds since the last call.
    pub(super) fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Whether the running instance owes an answer to a forward it was
    /// given less than [`OPEN_MAX`] ago (older ones are forgotten).
    pub(super) fn busy(&mut self) -> bool {
        self.forget_stale();
        !self.open.is_empty()
    }

    /// The instance was replaced by instance `incarnation`: the held
    /// forwards no copy of which reached the old one, addressed to the new.
    pub(super) fn swapped(&mut self, incarnation: u64) -> Vec<Inbound> {
        let held = std::mem::take(&mut self.held);
        self.held_bytes = 0;
        let seen = std::mem::take(&mut self.seen);
        self.seen_order.clear();
        self.open.clear();
        self.open_bytes = 0;
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
        self.held_bytes = 0;
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

    fn big(from: u32, id: u64) -> Inbound {
        Inbound {
            from,
            key: b"k".to_vec(),
            payload: Msg::Forward {
                id,
                incarnation: 5,
                command: vec![7; 1 << 20],
            }
            .encode_at(4),
        }
    }

    fn answer(to: u32, id: u64) -> Outbound {
        Outbound {
            to,
            key: b"k".to_vec(),
            payload: Msg::Forwarded {
                id,
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
        }
    }

    /// Unanswered forwards and held ones are bounded in bytes: past the
    /// bound a new one is dropped and counted, a copy of one the instance
    /// holds still passes, and an answer makes room.
    #[test]
    fn forwards_are_bounded_in_bytes() {
        let mut f = Forwards::new(5);
        let fits = OPEN_BYTES_MAX / big(2, 0).payload.len();
        assert!(fits >= 4);
        for id in 0..fits as u64 {
            assert!(f.inbound(big(2 + (id % 3) as u32, id), false).is_some());
        }
        assert!(f.inbound(big(2, 1000), false).is_none(), "over the bound");
        assert_eq!(f.take_dropped(), 1);
        assert!(f.inbound(big(2, 0), false).is_some(), "a copy passes");
        f.outbound(&answer(2, 0));
        assert!(
            f.inbound(big(2, 1000), false).is_some(),
            "room after an answer"
        );
        assert_eq!(f.take_dropped(), 0);

        let mut f = Forwards::new(5);
        let held = (0..fits as u64 + 3)
            .filter(|&id| f.inbound(big(2, id), true).is_none())
            .count();
        assert_eq!(held, fits + 3, "every forward is taken off while draining");
        assert_eq!(f.take_dropped(), 3);
        let handed = f.swapped(6);
        assert_eq!(handed.len(), fits);
        let bytes: usize = handed.iter().map(|m| m.key.len() + m.payload.len()).sum();
        assert!(bytes <= HELD_BYTES_MAX.min(OPEN_BYTES_MAX));
    }

    #[test]
    fn a_swap_waits_for_answers_and_readdresses_only_unseen_forwards() {
        let mut f = Forwards::new(5);
        assert!(f.inbound(fwd(2, 10, 5), false).is_some());
        assert!(f.busy());
        f.outbound(&answer(2, 10));
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
