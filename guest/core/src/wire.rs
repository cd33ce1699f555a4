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

/// Key-state format 1: the body below with proposals that advance the key
/// by one version each (no `count`). Read, no longer written.
pub const STATE_FORMAT_V1: u8 = 1;
/// Key-state format 2: format 1 followed by a CRC-32C. Read, no longer
/// written.
pub const STATE_FORMAT_V2: u8 = 2;
/// Version of the persisted key-state encoding written by default: the
/// body below, proposals with their `count` (batches).
pub const STATE_FORMAT: u8 = 3;
/// Key-state format 4: format 3's body followed by a CRC-32C (little
/// endian) of every byte before it, so a corrupt record is refused rather
/// than acted on.
pub const STATE_FORMAT_CHECKED: u8 = 4;
/// Every key-state format this code reads.
pub const STATE_FORMATS: [u8; 4] = [
    STATE_FORMAT_V1,
    STATE_FORMAT_V2,
    STATE_FORMAT,
    STATE_FORMAT_CHECKED,
];
/// Version of the peer message encoding of protocols before 0.3.
pub const WIRE_FORMAT: u8 = 1;
/// Wire format 2: format 1's message behind the sender's membership epoch
/// (a varint). Written by protocols 0.3 to 0.6; format 1 reads as epoch 1.
pub const WIRE_FORMAT_EPOCH: u8 = 2;
/// Wire format 3: format 2 with proposals that carry their `count`
/// (batches). Written by protocol 0.7 and later.
pub const WIRE_FORMAT_BATCH: u8 = 3;
/// Every wire format this build reads, the one it writes last.
pub const WIRE_FORMATS: [u8; 3] = [WIRE_FORMAT, WIRE_FORMAT_EPOCH, WIRE_FORMAT_BATCH];
/// Largest `count` a proposal may carry: more versions than one slot may
/// advance a key by are refused as malformed.
pub const COUNT_MAX: u32 = 1 << 16;
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

/// A candidate for one slot: the key's whole next value (`None` = tombstone)
/// after `count` commands, run in order by the proposer (a batch). Chosen at
/// slot `v + 1`, it moves the key from version `v` to `v + count`; each
/// command that changed the value took one of those versions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Proposal {
    pub id: ProposalId,
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    /// 1 to [`COUNT_MAX`].
    pub count: u32,
}

impl Proposal {
    fn size_hint(&self) -> usize {
        24 + self.value.as_ref().map_or(0, Vec::len)
    }

    fn valid(&self) -> bool {
        (1..=COUNT_MAX).contains(&self.count)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub ballot: Ballot,
    pub proposal: Proposal,
}

impl Accepted {
    fn size_hint(&self) -> usize {
        8 + self.proposal.size_hint()
    }
}

/// A chosen value: the key's state at `version`, with the ids of the
/// proposals chosen in the most recent slots, by slot (newest last). A
/// slot is the version before it plus one, so slots skip the versions a
/// batch took after its first.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Chosen {
    pub version: u64,
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    pub winners: Vec<(u64, ProposalId)>,
}

impl Chosen {
    fn size_hint(&self) -> usize {
        16 + self.value.as_ref().map_or(0, Vec::len) + 12 * self.winners.len()
    }

    /// The id chosen at `slot`, if this record still remembers it.
    pub fn winner(&self, slot: u64) -> Option<ProposalId> {
        self.winners
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, id)| *id)
    }

    /// The state after `proposal` is chosen at slot `self.version + 1`.
    pub fn next(&self, proposal: &Proposal) -> Chosen {
        let slot = self.version + 1;
        let version = self.version.saturating_add(proposal.count as u64);
        // Past WINNERS_MAX the oldest goes; one allocation.
        let skip = usize::from(self.winners.len() >= WINNERS_MAX);
        let mut winners = Vec::with_capacity(self.winners.len() + 1 - skip);
        winners.extend_from_slice(&self.winners[skip..]);
        winners.push((slot, proposal.id));
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
        #[serde(with = "serde_bytes")]
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
        #[serde(with = "serde_bytes")]
        value: Option<Vec<u8>>,
        version: u64,
    },
    Rejected {
        code: String,
        message: String,
        #[serde(with = "serde_bytes")]
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

/// Postcard output straight into the buffer that already holds the format
/// byte (`to_allocvec` would take a second buffer and a copy).
struct Out(Vec<u8>);

impl postcard::ser_flavors::Flavor for Out {
    type Output = Vec<u8>;

    #[inline(always)]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    #[inline(always)]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// `capacity` is a guess at the encoded size, to spare regrowing.
fn encode<T: Serialize>(format: u8, value: &T, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    out.push(format);
    // Serializing into a Vec cannot fail for these types.
    postcard::serialize_with_flavor(value, Out(out)).expect("postcard encoding into a Vec")
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

    /// Encodes in `format`, [`STATE_FORMAT`] or [`STATE_FORMAT_CHECKED`]
    /// (the formats before batches are read only).
    pub fn encode_as(&self, format: u8) -> Vec<u8> {
        if format == STATE_FORMAT_CHECKED {
            let mut out = encode(format, self, self.size_hint() + 4);
            let crc = crc32c(&out);
            out.extend_from_slice(&crc.to_le_bytes());
            out
        } else {
            debug_assert_eq!(format, STATE_FORMAT);
            encode(STATE_FORMAT, self, self.size_hint())
        }
    }

    /// About the encoded size: the values, the winners, and room for the
    /// numbers.
    fn size_hint(&self) -> usize {
        32 + self.chosen.size_hint() + self.accepted.as_ref().map_or(0, Accepted::size_hint)
    }

    /// Decodes persisted state in any format of [`STATE_FORMATS`]; empty
    /// bytes are a key never touched.
    pub fn decode(bytes: &[u8]) -> Result<KeyState, DecodeError> {
        let checked = |bytes: &[u8]| -> Result<usize, DecodeError> {
            if bytes.len() < 5 {
                return Err(DecodeError::Malformed);
            }
            let (data, crc) = bytes.split_at(bytes.len() - 4);
            let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
            if crc32c(data) != crc {
                return Err(DecodeError::Checksum);
            }
            Ok(data.len())
        };
        let state = match bytes.first() {
            None => return Ok(KeyState::default()),
            Some(&STATE_FORMAT_V1) => decode::<legacy::KeyState>(STATE_FORMAT_V1, bytes)?.into(),
            Some(&STATE_FORMAT_V2) => {
                let len = checked(bytes)?;
                decode::<legacy::KeyState>(STATE_FORMAT_V2, &bytes[..len])?.into()
            }
            Some(&STATE_FORMAT) => decode::<KeyState>(STATE_FORMAT, bytes)?,
            Some(&STATE_FORMAT_CHECKED) => {
                let len = checked(bytes)?;
                decode::<KeyState>(STATE_FORMAT_CHECKED, &bytes[..len])?
            }
            Some(&other) => return Err(DecodeError::Format(other)),
        };
        match &state.accepted {
            Some(a) if !a.proposal.valid() => Err(DecodeError::Malformed),
            _ => Ok(state),
        }
    }
}

impl Msg {
    /// Encodes in wire format 3, stamped with the sender's `epoch`.
    pub fn encode_at(&self, epoch: u64) -> Vec<u8> {
        encode(WIRE_FORMAT_BATCH, &(epoch, self), self.size_hint())
    }

    /// About the encoded size (see [`KeyState::size_hint`]).
    fn size_hint(&self) -> usize {
        let chosen = |c: &Option<Chosen>| c.as_ref().map_or(0, Chosen::size_hint);
        let accepted = |a: &Option<Accepted>| a.as_ref().map_or(0, Accepted::size_hint);
        32 + match self {
            Msg::Prepare { catch_up, .. } => chosen(catch_up),
            Msg::Promise { accepted: a, .. } | Msg::Nack { accepted: a, .. } => accepted(a),
            Msg::Accept {
                proposal, catch_up, ..
            }
            | Msg::Continue {
                proposal, catch_up, ..
            } => proposal.size_hint() + chosen(catch_up),
            Msg::Stale { chosen: c } | Msg::Learn { chosen: c } => c.size_hint(),
            Msg::QueryReply {
                chosen: c,
                accepted: a,
                ..
            } => c.size_hint() + accepted(a),
            Msg::Forward { command, .. } => command.len(),
            Msg::Forwarded { reply, .. } => match &reply.outcome {
                ReplyOutcome::Done { value, .. } => value.as_ref().map_or(0, Vec::len),
                ReplyOutcome::Rejected {
                    code,
                    message,
                    value,
                    ..
                } => code.len() + message.len() + value.as_ref().map_or(0, Vec::len),
                ReplyOutcome::Failed { message, .. } => message.len(),
            },
            Msg::Accepted { .. } | Msg::Behind { .. } | Msg::Query { .. } => 0,
        }
    }

    /// Decodes any wire format of [`WIRE_FORMATS`]: the sender's epoch (1
    /// for format 1) and the message.
    pub fn decode_any(bytes: &[u8]) -> Result<(u64, Msg), DecodeError> {
        let (epoch, msg) = match bytes.first() {
            Some(&WIRE_FORMAT) => (1, decode::<legacy::Msg>(WIRE_FORMAT, bytes)?.into()),
            Some(&WIRE_FORMAT_EPOCH) => {
                let (epoch, msg) = decode::<(u64, legacy::Msg)>(WIRE_FORMAT_EPOCH, bytes)?;
                (epoch, msg.into())
            }
            Some(&WIRE_FORMAT_BATCH) => decode::<(u64, Msg)>(WIRE_FORMAT_BATCH, bytes)?,
            Some(&other) => return Err(DecodeError::Format(other)),
            None => return Err(DecodeError::Empty),
        };
        if msg.valid() {
            Ok((epoch, msg))
        } else {
            Err(DecodeError::Malformed)
        }
    }

    /// Whether every proposal in the message has a count in range.
    fn valid(&self) -> bool {
        match self {
            Msg::Accept { proposal, .. } | Msg::Continue { proposal, .. } => proposal.valid(),
            Msg::Promise {
                accepted: Some(a), ..
            }
            | Msg::Nack {
                accepted: Some(a), ..
            }
            | Msg::QueryReply {
                accepted: Some(a), ..
            } => a.proposal.valid(),
            _ => true,
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
            (&WIRE_FORMAT_EPOCH | &WIRE_FORMAT_BATCH, rest) => {
                let (_, rest) = varint(rest)?;
                varint(rest).map(|(v, _)| v)
            }
            _ => None,
        }
    }

    /// Variant indexes of [`Msg::Forward`] and [`Msg::Forwarded`].
    pub const FORWARD: u64 = 11;
    pub const FORWARDED: u64 = 12;
    /// Variant indexes of the requests a key's coordinator sends:
    /// [`Msg::Prepare`], [`Msg::Accept`] and [`Msg::Continue`].
    pub const PREPARE: u64 = 0;
    pub const ACCEPT: u64 = 2;
    pub const CONTINUE: u64 = 10;

    /// Whether the message states a decided fact (a chosen value) that any
    /// replica may take from any epoch; every other message is part of a
    /// round and counts only between replicas of the same epoch.
    pub fn is_fact(&self) -> bool {
        matches!(self, Msg::Learn { .. } | Msg::Stale { .. })
    }
}

/// The structures of key-state formats 1 and 2 and wire formats 1 and 2,
/// from before batches: a proposal there advances the key by one version.
/// They are read, converted, and never written.
mod legacy {
    use super::{Ballot, Chosen, ProposalId, Reply};
    use alloc::vec::Vec;
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub struct Proposal {
        id: ProposalId,
        #[serde(with = "serde_bytes")]
        value: Option<Vec<u8>>,
    }

    #[derive(Deserialize)]
    pub struct Accepted {
        ballot: Ballot,
        proposal: Proposal,
    }

    #[derive(Deserialize)]
    pub struct KeyState {
        chosen: Chosen,
        promised: Ballot,
        accepted: Option<Accepted>,
    }

    /// [`super::Msg`] variant for variant, in the same order.
    #[derive(Deserialize)]
    pub enum Msg {
        Prepare {
            slot: u64,
            ballot: Ballot,
            catch_up: Option<Chosen>,
        },
        Promise {
            slot: u64,
            ballot: Ballot,
            accepted: Option<Accepted>,
        },
        Accept {
            slot: u64,
            ballot: Ballot,
            proposal: Proposal,
            catch_up: Option<Chosen>,
        },
        Accepted {
            slot: u64,
            ballot: Ballot,
            id: ProposalId,
        },
        Nack {
            slot: u64,
            ballot: Ballot,
            promised: Ballot,
            accepted: Option<Accepted>,
        },
        Stale {
            chosen: Chosen,
        },
        Behind {
            slot: u64,
        },
        Learn {
            chosen: Chosen,
        },
        Query {
            id: u64,
        },
        QueryReply {
            id: u64,
            chosen: Chosen,
            accepted: Option<Accepted>,
        },
        Continue {
            slot: u64,
            ballot: Ballot,
            proposal: Proposal,
            catch_up: Option<Chosen>,
        },
        Forward {
            id: u64,
            incarnation: u64,
            #[serde(with = "serde_bytes")]
            command: Vec<u8>,
        },
        Forwarded {
            id: u64,
            incarnation: u64,
            reply: Reply,
        },
    }

    impl From<Proposal> for super::Proposal {
        fn from(p: Proposal) -> Self {
            super::Proposal {
                id: p.id,
                value: p.value,
                count: 1,
            }
        }
    }

    impl From<Accepted> for super::Accepted {
        fn from(a: Accepted) -> Self {
            super::Accepted {
                ballot: a.ballot,
                proposal: a.proposal.into(),
            }
        }
    }

    impl From<KeyState> for super::KeyState {
        fn from(s: KeyState) -> Self {
            super::KeyState {
                chosen: s.chosen,
                promised: s.promised,
                accepted: s.accepted.map(Into::into),
            }
        }
    }

    impl From<Msg> for super::Msg {
        fn from(m: Msg) -> Self {
            use super::Msg as M;
            match m {
                Msg::Prepare {
                    slot,
                    ballot,
                    catch_up,
                } => M::Prepare {
                    slot,
                    ballot,
                    catch_up,
                },
                Msg::Promise {
                    slot,
                    ballot,
                    accepted,
                } => M::Promise {
                    slot,
                    ballot,
                    accepted: accepted.map(Into::into),
                },
                Msg::Accept {
                    slot,
                    ballot,
                    proposal,
                    catch_up,
                } => M::Accept {
                    slot,
                    ballot,
                    proposal: proposal.into(),
                    catch_up,
                },
                Msg::Accepted { slot, ballot, id } => M::Accepted { slot, ballot, id },
                Msg::Nack {
                    slot,
                    ballot,
                    promised,
                    accepted,
                } => M::Nack {
                    slot,
                    ballot,
                    promised,
                    accepted: accepted.map(Into::into),
                },
                Msg::Stale { chosen } => M::Stale { chosen },
                Msg::Behind { slot } => M::Behind { slot },
                Msg::Learn { chosen } => M::Learn { chosen },
                Msg::Query { id } => M::Query { id },
                Msg::QueryReply {
                    id,
                    chosen,
                    accepted,
                } => M::QueryReply {
                    id,
                    chosen,
                    accepted: accepted.map(Into::into),
                },
                Msg::Continue {
                    slot,
                    ballot,
                    proposal,
                    catch_up,
                } => M::Continue {
                    slot,
                    ballot,
                    proposal: proposal.into(),
                    catch_up,
                },
                Msg::Forward {
                    id,
                    incarnation,
                    command,
                } => M::Forward {
                    id,
                    incarnation,
                    command,
                },
                Msg::Forwarded {
                    id,
                    incarnation,
                    reply,
                } => M::Forwarded {
                    id,
                    incarnation,
                    reply,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn peek_variant_reads_the_index_in_every_format() {
        let forward = Msg::Forward {
            id: 300,
            incarnation: 7,
            command: vec![1, 2],
        };
        assert_eq!(
            Msg::peek_variant(&forward.encode_at(1 << 20)),
            Some(Msg::FORWARD)
        );
        // [format 3][epoch 3][variant 11][id 300 = ac 02][incarnation 7][command len 2, 1, 2]
        assert_eq!(forward.encode_at(3), [3, 3, 11, 0xac, 0x02, 7, 2, 1, 2]);
        // The same message in formats 2 (epoch) and 1 (none).
        let v2 = [2, 3, 11, 0xac, 0x02, 7, 2, 1, 2];
        let v1 = [1, 11, 0xac, 0x02, 7, 2, 1, 2];
        assert_eq!(Msg::peek_variant(&v2), Some(Msg::FORWARD));
        assert_eq!(Msg::peek_variant(&v1), Some(Msg::FORWARD));
        assert_eq!(Msg::decode_any(&v2).unwrap(), (3, forward.clone()));
        assert_eq!(Msg::decode_any(&v1).unwrap(), (1, forward));
        assert_eq!(Msg::peek_variant(&[]), None);
        assert_eq!(Msg::peek_variant(&[9, 1]), None);
        let ballot = Ballot {
            counter: 1,
            replica: 2,
        };
        let proposal = Proposal {
            id: id(2, 1),
            value: None,
            count: 1,
        };
        for (msg, variant) in [
            (
                Msg::Prepare {
                    slot: 1,
                    ballot,
                    catch_up: None,
                },
                Msg::PREPARE,
            ),
            (
                Msg::Accept {
                    slot: 1,
                    ballot,
                    proposal: proposal.clone(),
                    catch_up: None,
                },
                Msg::ACCEPT,
            ),
            (
                Msg::Continue {
                    slot: 1,
                    ballot,
                    proposal,
                    catch_up: None,
                },
                Msg::CONTINUE,
            ),
        ] {
            assert_eq!(Msg::peek_variant(&msg.encode_at(1)), Some(variant));
        }
    }

    fn id(replica: u32, seq: u64) -> ProposalId {
        ProposalId {
            replica,
            incarnation: 1,
            seq,
        }
    }

    fn sample_state(count: u32) -> KeyState {
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
                    count,
                },
            }),
        }
    }

    /// `encode` writes what postcard's own `to_allocvec` writes, behind
    /// the format byte, for every message variant and both state formats.
    #[test]
    fn encoding_into_one_buffer_writes_postcard_bytes() {
        let state = sample_state(2);
        let chosen = state.chosen.clone();
        let accepted = state.accepted.clone();
        let proposal = accepted.clone().unwrap().proposal;
        let ballot = state.promised;
        let reply = |outcome| Reply {
            outcome,
            changed: true,
            prior_absent: false,
            fast: true,
            attempts: 2,
            prepares: 1,
        };
        let messages = vec![
            Msg::Prepare {
                slot: 3,
                ballot,
                catch_up: Some(chosen.clone()),
            },
            Msg::Promise {
                slot: 3,
                ballot,
                accepted: accepted.clone(),
            },
            Msg::Accept {
                slot: 3,
                ballot,
                proposal: proposal.clone(),
                catch_up: None,
            },
            Msg::Accepted {
                slot: 3,
                ballot,
                id: id(1, 9),
            },
            Msg::Nack {
                slot: 3,
                ballot,
                promised: ballot,
                accepted: None,
            },
            Msg::Stale {
                chosen: chosen.clone(),
            },
            Msg::Behind { slot: 300 },
            Msg::Learn {
                chosen: chosen.clone(),
            },
            Msg::Query { id: 1 << 40 },
            Msg::QueryReply {
                id: 4,
                chosen: chosen.clone(),
                accepted,
            },
            Msg::Continue {
                slot: 4,
                ballot,
                proposal,
                catch_up: Some(chosen),
            },
            Msg::Forward {
                id: 5,
                incarnation: 6,
                command: vec![7; 300],
            },
            Msg::Forwarded {
                id: 5,
                incarnation: 6,
                reply: reply(ReplyOutcome::Done {
                    value: Some(vec![1; 200]),
                    version: 9,
                }),
            },
            Msg::Forwarded {
                id: 5,
                incarnation: 6,
                reply: reply(ReplyOutcome::Rejected {
                    code: "c".into(),
                    message: "m".into(),
                    value: None,
                    version: 9,
                }),
            },
            Msg::Forwarded {
                id: 5,
                incarnation: 6,
                reply: reply(ReplyOutcome::Failed {
                    reason: 1,
                    maybe_applied: true,
                    message: "gone".into(),
                }),
            },
        ];
        for m in &messages {
            let mut want = vec![WIRE_FORMAT_BATCH];
            want.extend(postcard::to_allocvec(&(7u64, m)).unwrap());
            assert_eq!(m.encode_at(7), want, "{m:?}");
        }
        let mut want = vec![STATE_FORMAT];
        want.extend(postcard::to_allocvec(&state).unwrap());
        assert_eq!(state.encode(), want);
        let mut want = vec![STATE_FORMAT_CHECKED];
        want.extend(postcard::to_allocvec(&state).unwrap());
        let crc = crc32c(&want);
        want.extend(crc.to_le_bytes());
        assert_eq!(state.encode_as(STATE_FORMAT_CHECKED), want);
    }

    /// `Chosen::next` appends the new winner and, from WINNERS_MAX on,
    /// drops the oldest one only: as the push-then-remove it replaced, for
    /// lists of any length (a foreign record may carry more).
    #[test]
    fn the_next_chosen_keeps_the_newest_winners() {
        let proposal = Proposal {
            id: id(3, 77),
            value: Some(vec![1]),
            count: 2,
        };
        for len in 0..WINNERS_MAX + 4 {
            let chosen = Chosen {
                version: 50,
                value: None,
                winners: (0..len as u64).map(|s| (s + 1, id(1, s))).collect(),
            };
            let mut want = chosen.winners.clone();
            want.push((51, proposal.id));
            if want.len() > WINNERS_MAX {
                want.remove(0);
            }
            let next = chosen.next(&proposal);
            assert_eq!(next.winners, want, "{len} winners before");
            assert_eq!((next.version, next.value), (52, Some(vec![1])));
        }
    }

    /// Key-state format 1, as protocols up to 0.5 wrote it.
    const STATE_V1: [u8; 24] = [
        1, // format
        2, 1, 2, b'a', b'b', // chosen: version 2, Some("ab")
        2, 1, 1, 1, 1, 2, 2, 1, 1, // winners: (1, {1,1,1}), (2, {2,1,1})
        3, 2, // promised (3, 2)
        1, 3, 2, 2, 1, 5, 0, // accepted: Some((3,2), {id (2,1,5), value None})
    ];

    /// Golden bytes: a change here breaks every stored key. Add a format
    /// and keep reading the old ones instead.
    #[test]
    fn golden_key_states_v1_and_v2_read_as_single_commands() {
        assert_eq!(KeyState::decode(&STATE_V1).unwrap(), sample_state(1));
        // Format 2 is format 1's body with a CRC-32C, as 0.6 wrote it.
        let mut v2 = STATE_V1.to_vec();
        v2[0] = 2;
        v2.extend_from_slice(&[0x8a, 0xbc, 0xc8, 0x9e]);
        assert_eq!(KeyState::decode(&v2).unwrap(), sample_state(1));
        let mut bad = v2.clone();
        bad[3] ^= 0x10;
        assert_eq!(KeyState::decode(&bad), Err(DecodeError::Checksum));
        assert_eq!(KeyState::decode(&[]).unwrap(), KeyState::default());
    }

    /// Formats 3 and 4 add the proposal's count after its value; a replica
    /// upgraded to write them reads what earlier versions wrote and rewrites
    /// each key on its next write.
    #[test]
    fn golden_key_states_v3_and_v4_and_migration() {
        let v3 = sample_state(3).encode();
        let mut expected = STATE_V1.to_vec();
        expected[0] = 3;
        expected.push(3); // count
        assert_eq!(v3, expected);
        assert_eq!(KeyState::decode(&v3).unwrap(), sample_state(3));
        let v4 = sample_state(3).encode_as(STATE_FORMAT_CHECKED);
        let mut expected4 = expected.clone();
        expected4[0] = 4;
        expected4.extend_from_slice(&crc32c(&expected4).to_le_bytes());
        assert_eq!(v4, expected4);
        assert_eq!(&v4[v4.len() - 4..], [0x17, 0xc2, 0x1d, 0x4c]);
        assert_eq!(KeyState::decode(&v4).unwrap(), sample_state(3));
        for i in 1..v4.len() {
            let mut bad = v4.clone();
            bad[i] ^= 0x10;
            assert!(
                KeyState::decode(&bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
        // Migration: a format-1 record rewritten in format 3.
        let migrated = KeyState::decode(&STATE_V1).unwrap().encode();
        let mut one = STATE_V1.to_vec();
        one[0] = 3;
        one.push(1);
        assert_eq!(migrated, one);
        assert_eq!(
            KeyState::decode(&[5, 0, 0]).unwrap_err(),
            DecodeError::Format(5)
        );
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    fn accept(count: u32) -> Msg {
        Msg::Accept {
            slot: 3,
            ballot: Ballot::FAST,
            proposal: Proposal {
                id: id(1, 9),
                value: Some(b"v".to_vec()),
                count,
            },
            catch_up: None,
        }
    }

    #[test]
    fn golden_messages() {
        // Format 1 (no epoch, no count) and 2 (epoch 5, no count).
        let v1 = [1, 2, 3, 0, 0, 1, 1, 9, 1, 1, b'v', 0];
        assert_eq!(Msg::decode_any(&v1).unwrap(), (1, accept(1)));
        let v2 = [2, 5, 2, 3, 0, 0, 1, 1, 9, 1, 1, b'v', 0];
        assert_eq!(Msg::decode_any(&v2).unwrap(), (5, accept(1)));
        // Format 3: the count follows the value.
        let v3 = accept(4).encode_at(5);
        assert_eq!(v3, [3, 5, 2, 3, 0, 0, 1, 1, 9, 1, 1, b'v', 4, 0]);
        assert_eq!(Msg::decode_any(&v3).unwrap(), (5, accept(4)));
        let learn = Msg::Learn {
            chosen: Chosen {
                version: 1,
                value: None,
                winners: vec![],
            },
        };
        assert_eq!(learn.encode_at(1), [3, 1, 7, 1, 0, 0]);
        assert_eq!(
            Msg::decode_any(&[1, 7, 1, 0, 0]).unwrap(),
            (1, learn.clone())
        );
        for m in [
            accept(1),
            learn,
            Msg::Query { id: u64::MAX },
            Msg::Behind { slot: 1 },
        ] {
            assert_eq!(Msg::decode_any(&m.encode_at(9)).unwrap(), (9, m));
        }
    }

    #[test]
    fn bad_bytes_are_refused() {
        assert_eq!(Msg::decode_any(&[]), Err(DecodeError::Empty));
        assert_eq!(Msg::decode_any(&[4, 0]), Err(DecodeError::Format(4)));
        assert_eq!(Msg::decode_any(&[1, 200]), Err(DecodeError::Malformed));
        let mut long = Msg::Behind { slot: 1 }.encode_at(1);
        long.push(0);
        assert_eq!(Msg::decode_any(&long), Err(DecodeError::Malformed));
        assert_eq!(KeyState::decode(&[9, 9]), Err(DecodeError::Format(9)));
        // A proposal that would not advance the key, or would jump it too far.
        for count in [0, COUNT_MAX + 1] {
            assert_eq!(
                Msg::decode_any(&accept(count).encode_at(1)),
                Err(DecodeError::Malformed)
            );
            assert_eq!(
                KeyState::decode(&sample_state(count).encode()),
                Err(DecodeError::Malformed)
            );
        }
    }

    #[test]
    fn a_batch_advances_the_version_by_its_count_and_is_found_by_slot() {
        let mut c = Chosen::default();
        c = c.next(&Proposal {
            id: id(1, 1),
            value: Some(b"x".to_vec()),
            count: 3,
        });
        assert_eq!(c.version, 3);
        assert_eq!(c.winner(1), Some(id(1, 1)));
        assert_eq!(c.winner(2), None);
        c = c.next(&Proposal {
            id: id(2, 1),
            value: None,
            count: 1,
        });
        assert_eq!((c.version, c.value.clone()), (4, None));
        assert_eq!(c.winner(4), Some(id(2, 1)));
    }

    #[test]
    fn winners_are_bounded() {
        let mut c = Chosen::default();
        for seq in 0..40 {
            c = c.next(&Proposal {
                id: id(1, seq),
                value: None,
                count: 1,
            });
        }
        assert_eq!(c.version, 40);
        assert_eq!(c.winners.len(), WINNERS_MAX);
        assert_eq!(c.winner(40), Some(id(1, 39)));
        assert_eq!(c.winner(1), None);
    }
}
