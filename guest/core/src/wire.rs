//! The protocol's persisted key state and its peer messages, and their bytes.
//!
//! Both are encoded as one format byte followed by the postcard encoding
//! (varint integers, length-prefixed byte strings, enum variants as a varint
//! index) of the structures below. `docs/design.md` lists the fields in order;
//! the golden fixtures in this module's tests pin the bytes.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::types::ReplicaId;

/// Version of the persisted key-state encoding written by default.
pub const STATE_FORMAT: u8 = 1;
/// Key-state format 2: format 1's body followed by a CRC-32C (little
/// endian) of every byte before it, so a corrupt record is refused rather
/// than acted on.
pub const STATE_FORMAT_CHECKED: u8 = 2;
/// Every key-state format this code reads.
pub const STATE_FORMATS: [u8; 2] = [STATE_FORMAT, STATE_FORMAT_CHECKED];
/// Version of the peer message encoding.
pub const WIRE_FORMAT: u8 = 1;
/// Wire format 2: format 1's message behind the sender's membership epoch
/// (a varint). Written by protocol 0.3 and later; format 1 reads as epoch 1.
pub const WIRE_FORMAT_EPOCH: u8 = 2;
/// Every wire format this build reads, the one it writes last.
pub const WIRE_FORMATS: [u8; 2] = [WIRE_FORMAT, WIRE_FORMAT_EPOCH];
/// How many recent (version, proposal) pairs a key remembers, so a proposer
/// that fell behind can still tell whether its own proposal won.
pub const WINNERS_MAX: usize = 16;

/// A ballot: ordered by counter, then replica. Counter 0 is the shared fast
/// round of a slot, open to every proposer; classic rounds have counter >= 1
/// and belong to one replica.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
pub struct Ballot {
    pub counter: u64,
    pub replica: ReplicaId,
}

impl Ballot {
    /// The fast round; also "nothing promised yet".
    pub const FAST: Ballot = Ballot {
        counter: 0,
        replica: 0,
    };

    pub fn is_fast(&self) -> bool {
        *self == Ballot::FAST
    }
}

/// Identifies one proposal: unique across replicas and restarts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProposalId {
    pub replica: ReplicaId,
    pub incarnation: u64,
    pub seq: u64,
}

/// A candidate for one slot: the key's whole next value (`None` = tombstone).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Proposal {
    pub id: ProposalId,
    pub value: Option<Vec<u8>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub ballot: Ballot,
    pub proposal: Proposal,
}

/// A chosen value: the key's state at `version`, with the ids of the
/// proposals chosen at the most recent versions (newest last).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Chosen {
    pub version: u64,
    pub value: Option<Vec<u8>>,
    pub winners: Vec<(u64, ProposalId)>,
}

impl Chosen {
    /// The id chosen at `version`, if this record still remembers it.
    pub fn winner(&self, version: u64) -> Option<ProposalId> {
        self.winners
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, id)| *id)
    }

    /// The state after `proposal` is chosen at `self.version + 1`.
    pub fn next(&self, proposal: &Proposal) -> Chosen {
        let version = self.version + 1;
        let mut winners = self.winners.clone();
        winners.push((version, proposal.id));
        if winners.len() > WINNERS_MAX {
            winners.remove(0);
        }
        Chosen {
            version,
            value: proposal.value.clone(),
            winners,
        }
    }
}

/// Everything an acceptor persists for one key. Slot `chosen.version + 1` is
/// the only open one; `promised` and `accepted` refer to it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyState {
    pub chosen: Chosen,
    pub promised: Ballot,
    pub accepted: Option<Accepted>,
}

impl KeyState {
    /// The open slot.
    pub fn slot(&self) -> u64 {
        self.chosen.version + 1
    }

    /// Adopts a chosen state newer than ours; returns whether it was newer.
    ///
    /// A classic promise carries over into the new open slot: the acceptor
    /// keeps refusing every ballot below it, the fast round included. That
    /// is what lets the replica owning the ballot lead the key, running
    /// phase 2 only in later slots ([`Msg::Continue`]); a key whose slots
    /// were all decided in the fast round keeps `promised` at the fast
    /// round and stays leaderless.
    pub fn learn(&mut self, chosen: &Chosen) -> bool {
        if chosen.version <= self.chosen.version {
            return false;
        }
        *self = KeyState {
            chosen: chosen.clone(),
            promised: self.promised,
            accepted: None,
        };
        true
    }
}

/// A message between replicas about one key (the key travels beside it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Phase 1a of a classic round. `catch_up` carries slot - 1 to an
    /// acceptor that said it is behind.
    Prepare {
        slot: u64,
        ballot: Ballot,
        catch_up: Option<Chosen>,
    },
    /// Phase 1b.
    Promise {
        slot: u64,
        ballot: Ballot,
        accepted: Option<Accepted>,
    },
    /// Phase 2a, fast (`ballot` = FAST) or classic.
    Accept {
        slot: u64,
        ballot: Ballot,
        proposal: Proposal,
        catch_up: Option<Chosen>,
    },
    /// Phase 2b.
    Accepted {
        slot: u64,
        ballot: Ballot,
        id: ProposalId,
    },
    /// The acceptor refused `ballot` at `slot`: it promised `promised`, and
    /// for a refused fast accept, it holds `accepted`.
    Nack {
        slot: u64,
        ballot: Ballot,
        promised: Ballot,
        accepted: Option<Accepted>,
    },
    /// The slot asked about is already decided; here is what is chosen.
    Stale { chosen: Chosen },
    /// The acceptor has not learned slot - 1 yet.
    Behind { slot: u64 },
    /// A decision, broadcast after it is reached and sent again as repair.
    Learn { chosen: Chosen },
    /// A linearizable read asks every acceptor what it holds.
    Query { id: u64 },
    QueryReply {
        id: u64,
        chosen: Chosen,
        accepted: Option<Accepted>,
    },
    /// Phase 2a in a later slot of the ballot's leader, without phase 1:
    /// accepted only by an acceptor whose promise is exactly `ballot`,
    /// carried from the slot where the leader prepared it (see
    /// `docs/design.md`, "Leaders"). Protocols before 0.5 cannot decode it
    /// and drop it, so a leader never counts on their votes.
    Continue {
        slot: u64,
        ballot: Ballot,
        proposal: Proposal,
        catch_up: Option<Chosen>,
    },
    /// A command handed to the key's leader, instance `incarnation` of the
    /// receiver. `id` is unique across the sender's instances (like a
    /// query id); the receiver runs it at most once and answers
    /// [`Msg::Forwarded`].
    Forward {
        id: u64,
        incarnation: u64,
        command: Vec<u8>,
    },
    /// The outcome of forwarded command `id`, from instance `incarnation`
    /// of the leader (so a sender that addressed an earlier one learns
    /// which to address next).
    Forwarded {
        id: u64,
        incarnation: u64,
        reply: Reply,
    },
}

/// The outcome of a forwarded command, as the leader completed it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub outcome: ReplyOutcome,
    pub changed: bool,
    pub prior_absent: bool,
    pub fast: bool,
    pub attempts: u32,
    pub prepares: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum ReplyOutcome {
    Done {
        value: Option<Vec<u8>>,
        version: u64,
    },
    Rejected {
        code: String,
        message: String,
        value: Option<Vec<u8>>,
        version: u64,
    },
    /// `reason`: 0 no-quorum, 1 contention, 2 overloaded, 3 invalid, 4 the
    /// leader is a newer instance than the one addressed (reads as no-quorum).
    Failed {
        reason: u8,
        maybe_applied: bool,
        message: String,
    },
}

/// A decoding failure: wrong format version or malformed bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    Empty,
    Format(u8),
    Malformed,
    /// A format-2 record whose checksum does not match.
    Checksum,
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DecodeError::Empty => write!(f, "empty input"),
            DecodeError::Format(v) => write!(f, "unsupported format version {v}"),
            DecodeError::Malformed => write!(f, "malformed bytes"),
            DecodeError::Checksum => write!(f, "checksum mismatch (a corrupt record)"),
        }
    }
}

fn encode<T: Serialize>(format: u8, value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(format);
    // Serializing into a Vec cannot fail for these types.
    let body = postcard::to_allocvec(value).expect("postcard encoding into a Vec");
    out.extend_from_slice(&body);
    out
}

fn decode<'a, T: Deserialize<'a>>(format: u8, bytes: &'a [u8]) -> Result<T, DecodeError> {
    let (got, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if *got != format {
        return Err(DecodeError::Format(*got));
    }
    match postcard::take_from_bytes::<T>(body) {
        Ok((value, rest)) if rest.is_empty() => Ok(value),
        _ => Err(DecodeError::Malformed),
    }
}

/// CRC-32C (Castagnoli), bitwise: key states are small.
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

impl KeyState {
    /// Encodes in the default format, [`STATE_FORMAT`].
    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(STATE_FORMAT)
    }

    /// Encodes in `format`, one of [`STATE_FORMATS`].
    pub fn encode_as(&self, format: u8) -> Vec<u8> {
        let mut out = encode(format, self);
        if format == STATE_FORMAT_CHECKED {
            let crc = crc32c(&out);
            out.extend_from_slice(&crc.to_le_bytes());
        }
        out
    }

    /// Decodes persisted state in any format of [`STATE_FORMATS`]; empty
    /// bytes are a key never touched.
    pub fn decode(bytes: &[u8]) -> Result<KeyState, DecodeError> {
        match bytes.first() {
            None => Ok(KeyState::default()),
            Some(&STATE_FORMAT) => decode(STATE_FORMAT, bytes),
            Some(&STATE_FORMAT_CHECKED) => {
                if bytes.len() < 5 {
                    return Err(DecodeError::Malformed);
                }
                let (data, crc) = bytes.split_at(bytes.len() - 4);
                let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
                if crc32c(data) != crc {
                    return Err(DecodeError::Checksum);
                }
                decode(STATE_FORMAT_CHECKED, data)
            }
            Some(&other) => Err(DecodeError::Format(other)),
        }
    }
}

impl Msg {
    /// Encodes in wire format 1 (no epoch).
    pub fn encode(&self) -> Vec<u8> {
        encode(WIRE_FORMAT, self)
    }

    /// Encodes in wire format 2, stamped with the sender's `epoch`.
    pub fn encode_at(&self, epoch: u64) -> Vec<u8> {
        encode(WIRE_FORMAT_EPOCH, &(epoch, self))
    }

    /// Decodes wire format 1.
    pub fn decode(bytes: &[u8]) -> Result<Msg, DecodeError> {
        decode(WIRE_FORMAT, bytes)
    }

    /// Decodes either wire format: the sender's epoch (1 for format 1) and
    /// the message.
    pub fn decode_any(bytes: &[u8]) -> Result<(u64, Msg), DecodeError> {
        match bytes.first() {
            Some(&WIRE_FORMAT) => Ok((1, decode(WIRE_FORMAT, bytes)?)),
            Some(&WIRE_FORMAT_EPOCH) => decode(WIRE_FORMAT_EPOCH, bytes),
            Some(&other) => Err(DecodeError::Format(other)),
            None => Err(DecodeError::Empty),
        }
    }

    /// The variant index of an encoded message (the table in
    /// `docs/design.md`), read without decoding the rest: lets a host pick
    /// out the few messages it looks into.
    pub fn peek_variant(bytes: &[u8]) -> Option<u64> {
        fn varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
            let mut value = 0u64;
            for (i, b) in bytes.iter().enumerate().take(10) {
                value |= ((b & 0x7f) as u64) << (7 * i);
                if b & 0x80 == 0 {
                    return Some((value, &bytes[i + 1..]));
                }
            }
            None
        }
        match bytes.split_first()? {
            (&WIRE_FORMAT, rest) => varint(rest).map(|(v, _)| v),
            (&WIRE_FORMAT_EPOCH, rest) => {
                let (_, rest) = varint(rest)?;
                varint(rest).map(|(v, _)| v)
            }
            _ => None,
        }
    }

    /// Variant indexes of [`Msg::Forward`] and [`Msg::Forwarded`].
    pub const FORWARD: u64 = 11;
    pub const FORWARDED: u64 = 12;

    /// Whether the message states a decided fact (a chosen value) that any
    /// replica may take from any epoch; every other message is part of a
    /// round and counts only between replicas of the same epoch.
    pub fn is_fact(&self) -> bool {
        matches!(self, Msg::Learn { .. } | Msg::Stale { .. })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn peek_variant_reads_the_index_in_both_formats() {
        let forward = super::Msg::Forward {
            id: 300,
            incarnation: 7,
            command: alloc::vec![1, 2],
        };
        assert_eq!(
            super::Msg::peek_variant(&forward.encode()),
            Some(super::Msg::FORWARD)
        );
        assert_eq!(
            super::Msg::peek_variant(&forward.encode_at(1 << 20)),
            Some(super::Msg::FORWARD)
        );
        // [format 2][epoch 3][variant 11][id 300 = ac 02][incarnation 7][command len 2, 1, 2]
        assert_eq!(forward.encode_at(3), [2, 3, 11, 0xac, 0x02, 7, 2, 1, 2]);
        assert_eq!(super::Msg::peek_variant(&[]), None);
        assert_eq!(super::Msg::peek_variant(&[9, 1]), None);
    }

    use super::*;
    use alloc::vec;

    fn id(replica: u32, seq: u64) -> ProposalId {
        ProposalId {
            replica,
            incarnation: 1,
            seq,
        }
    }

    fn sample_state() -> KeyState {
        KeyState {
            chosen: Chosen {
                version: 2,
                value: Some(b"ab".to_vec()),
                winners: vec![(1, id(1, 1)), (2, id(2, 1))],
            },
            promised: Ballot {
                counter: 3,
                replica: 2,
            },
            accepted: Some(Accepted {
                ballot: Ballot {
                    counter: 3,
                    replica: 2,
                },
                proposal: Proposal {
                    id: id(2, 5),
                    value: None,
                },
            }),
        }
    }

    /// Golden bytes: a change here breaks every stored key. Bump
    /// `STATE_FORMAT` and keep reading the old one instead.
    #[test]
    fn golden_key_state_v1() {
        let bytes = sample_state().encode();
        assert_eq!(
            bytes,
            [
                1, // format
                2, 1, 2, b'a', b'b', // chosen: version 2, Some("ab")
                2, 1, 1, 1, 1, 2, 2, 1, 1, // winners: (1, {1,1,1}), (2, {2,1,1})
                3, 2, // promised (3, 2)
                1, 3, 2, 2, 1, 5, 0, // accepted: Some((3,2), {id (2,1,5), value None})
            ]
        );
        assert_eq!(KeyState::decode(&bytes).unwrap(), sample_state());
        assert_eq!(KeyState::decode(&[]).unwrap(), KeyState::default());
    }

    /// Format 2 is format 1's body with a CRC-32C; a replica upgraded to
    /// write it reads what the previous version wrote (the v1 golden bytes)
    /// and rewrites it as v2 on the key's next write.
    #[test]
    fn golden_key_state_v2_and_migration_from_v1() {
        let v1 = sample_state().encode();
        let migrated = KeyState::decode(&v1)
            .unwrap()
            .encode_as(STATE_FORMAT_CHECKED);
        let mut expected = v1.clone();
        expected[0] = 2;
        expected.extend_from_slice(&[0x8a, 0xbc, 0xc8, 0x9e]);
        assert_eq!(migrated, expected);
        assert_eq!(KeyState::decode(&migrated).unwrap(), sample_state());
        // And back: a rollback rewrites v2 records as v1.
        assert_eq!(KeyState::decode(&migrated).unwrap().encode(), v1);
        // Corruption is caught.
        for i in 1..migrated.len() {
            let mut bad = migrated.clone();
            bad[i] ^= 0x10;
            assert!(
                KeyState::decode(&bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
        assert_eq!(
            KeyState::decode(&[3, 0, 0]).unwrap_err(),
            DecodeError::Format(3)
        );
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn golden_messages_v1() {
        let accept = Msg::Accept {
            slot: 3,
            ballot: Ballot::FAST,
            proposal: Proposal {
                id: id(1, 9),
                value: Some(b"v".to_vec()),
            },
            catch_up: None,
        };
        assert_eq!(accept.encode(), [1, 2, 3, 0, 0, 1, 1, 9, 1, 1, b'v', 0]);
        let learn = Msg::Learn {
            chosen: Chosen {
                version: 1,
                value: None,
                winners: vec![],
            },
        };
        assert_eq!(learn.encode(), [1, 7, 1, 0, 0]);
        for m in [
            accept,
            learn,
            Msg::Query { id: u64::MAX },
            Msg::Behind { slot: 1 },
        ] {
            assert_eq!(Msg::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn bad_bytes_are_refused() {
        assert_eq!(Msg::decode(&[]), Err(DecodeError::Empty));
        assert_eq!(Msg::decode(&[2, 0]), Err(DecodeError::Format(2)));
        assert_eq!(Msg::decode(&[1, 200]), Err(DecodeError::Malformed));
        let mut long = Msg::Behind { slot: 1 }.encode();
        long.push(0);
        assert_eq!(Msg::decode(&long), Err(DecodeError::Malformed));
        assert_eq!(KeyState::decode(&[9, 9]), Err(DecodeError::Format(9)));
    }

    #[test]
    fn winners_are_bounded() {
        let mut c = Chosen::default();
        for seq in 0..40 {
            c = c.next(&Proposal {
                id: id(1, seq),
                value: None,
            });
        }
        assert_eq!(c.version, 40);
        assert_eq!(c.winners.len(), WINNERS_MAX);
        assert_eq!(c.winner(40), Some(id(1, 39)));
        assert_eq!(c.winner(1), None);
    }
}
