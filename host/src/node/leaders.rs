//! Which replica leads a key, as far as this one can tell: the replica it
//! last forwarded the key's commands to.
//!
//! A command for a key another replica leads costs a hop each way between
//! replicas, and a step at each end, on top of the key's own round. The API
//! names the leader in the `Ballot-Leader` header of its answer, and a
//! client that knows the leader's endpoint sends that key's next requests
//! there (see `ballot-client`). The hint is only a hint: a replica that
//! does not lead the key forwards the command as before, so a stale or
//! wrong one costs the hop it would have saved (and a hinted replica that
//! fails costs the client that attempt, as any failed endpoint does).
//!
//! The hints come from what the protocol sends, read by variant only (as
//! [`super::forwards`] does): a Forward to replica R names R; a Prepare,
//! Accept or Continue from this replica for the key means it coordinates
//! the key itself, and the hint goes.

use std::collections::HashMap;
use std::sync::Mutex;

use ballot_core::wire::Msg;
use ballot_core::{Outbound, ReplicaId};

/// Keys remembered, at most; past it the table starts over (a forget
/// costs one forwarded command per key).
const KEYS_MAX: usize = 16 * 1024;

/// Per key, the replica this one forwards its commands to.
#[derive(Default)]
pub struct Leaders {
    keys: Mutex<HashMap<Vec<u8>, ReplicaId>>,
}

impl Leaders {
    /// The replica that leads `key`, if this one forwards its commands.
    pub fn get(&self, key: &[u8]) -> Option<ReplicaId> {
        self.keys.lock().expect("leaders lock").get(key).copied()
    }

    /// Learns from messages the protocol sends.
    pub(super) fn observe(&self, sent: &[Outbound]) {
        let mut keys = None;
        for o in sent {
            let forward = match Msg::peek_variant(&o.payload) {
                Some(Msg::FORWARD) => true,
                Some(Msg::PREPARE | Msg::ACCEPT | Msg::CONTINUE) => false,
                _ => continue,
            };
            let keys = keys.get_or_insert_with(|| self.keys.lock().expect("leaders lock"));
            if !forward {
                keys.remove(&o.key);
            } else if keys.get(&o.key) != Some(&o.to) {
                if keys.len() >= KEYS_MAX {
                    keys.clear();
                }
                keys.insert(o.key.clone(), o.to);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballot_core::wire::{Ballot, Proposal, ProposalId};

    fn out(to: ReplicaId, key: &[u8], msg: Msg) -> Outbound {
        Outbound {
            to,
            key: key.to_vec(),
            payload: msg.encode_at(1),
        }
    }

    fn forward(to: ReplicaId, key: &[u8]) -> Outbound {
        out(
            to,
            key,
            Msg::Forward {
                id: 1,
                incarnation: 1,
                command: vec![],
            },
        )
    }

    fn proposal(to: ReplicaId, key: &[u8]) -> Outbound {
        out(
            to,
            key,
            Msg::Continue {
                slot: 2,
                ballot: Ballot {
                    counter: 1,
                    replica: 1,
                },
                proposal: Proposal {
                    id: ProposalId {
                        replica: 1,
                        incarnation: 1,
                        seq: 1,
                    },
                    value: None,
                    count: 1,
                },
                catch_up: None,
            },
        )
    }

    #[test]
    fn a_forward_names_the_leader_and_coordinating_forgets_it() {
        let leaders = Leaders::default();
        leaders.observe(&[forward(2, b"a"), forward(3, b"b")]);
        assert_eq!(leaders.get(b"a"), Some(2));
        assert_eq!(leaders.get(b"b"), Some(3));
        assert_eq!(leaders.get(b"c"), None);
        // The key moved to replica 3.
        leaders.observe(&[forward(3, b"a")]);
        assert_eq!(leaders.get(b"a"), Some(3));
        // This replica coordinates "a" now.
        leaders.observe(&[proposal(2, b"a"), proposal(3, b"a")]);
        assert_eq!(leaders.get(b"a"), None);
        assert_eq!(leaders.get(b"b"), Some(3));
        // Other messages, and bytes that are no message, say nothing.
        leaders.observe(&[
            out(2, b"b", Msg::Query { id: 4 }),
            Outbound {
                to: 2,
                key: b"b".to_vec(),
                payload: vec![0xff, 0xff],
            },
        ]);
        assert_eq!(leaders.get(b"b"), Some(3));
    }

    #[test]
    fn the_table_is_bounded() {
        let leaders = Leaders::default();
        for i in 0..KEYS_MAX + 10 {
            leaders.observe(&[forward(2, format!("k{i}").as_bytes())]);
        }
        let held = leaders.keys.lock().unwrap().len();
        assert!(held <= KEYS_MAX, "{held} keys held");
        assert_eq!(
            leaders.get(format!("k{}", KEYS_MAX + 9).as_bytes()),
            Some(2)
        );
    }
}
