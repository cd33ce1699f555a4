//! Durable storage: one LMDB environment per replica, through heed.
//!
//! Four databases, every value led by a format byte (see `docs/design.md`
//! for the bytes):
//! - `meta`: storage format, the replica id the directory belongs to, the
//!   boot counter (the protocol's incarnation);
//! - `state`: key -> the protocol component's opaque per-key state;
//! - `values`: key -> the committed version and value, for scans and
//!   changelog consumers;
//! - `changelog`: local sequence number (u64 BE) -> one commit this replica
//!   learned, in the order it made them durable.
//!
//! [`Storage::commit`] writes many readies in one write transaction and one
//! fsync (LMDB's default durability: `mdb_txn_commit` syncs the data file
//! before it returns).

use std::path::Path;
use std::time::{Duration, Instant};

use ballot_core::Write;
use heed::types::{Bytes, U64};
use heed::{byteorder::BigEndian, Database, Env, EnvOpenOptions};

/// Format of every record this module writes. Readers refuse other values.
pub const STORAGE_FORMAT: u8 = 1;
/// Default LMDB map size: address space reserved, not disk used.
pub const MAP_SIZE_DEFAULT: usize = 64 << 30;

const META_FORMAT: &[u8] = b"format";
const META_REPLICA: &[u8] = b"replica";
const META_INCARNATION: &[u8] = b"incarnation";
const META_IDENTITY: &[u8] = b"identity";
const META_MEMBERS: &[u8] = b"members";
const META_ADMITTED: &[u8] = b"admitted";

/// Bytes of a data directory's identity.
pub const IDENTITY_LEN: usize = 16;
/// A data directory's identity: random bytes drawn when the directory is
/// created. Peers remember it and refuse another one under the same replica
/// id, so a replica that lost its directory cannot vote with a blank memory.
pub type DirIdentity = [u8; IDENTITY_LEN];

/// What a peer's presented identity is to this replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    /// Never seen before: now recorded.
    First,
    /// The one recorded.
    Known,
    /// Another directory than the one recorded for that replica id.
    Changed { known: DirIdentity },
}

crate::message_error!(
    /// A storage failure. After one, the replica stops answering.
    Error
);

impl From<heed::Error> for Error {
    fn from(e: heed::Error) -> Self {
        Error(format!("lmdb: {e}"))
    }
}

/// A committed value as stored in `values` and `changelog`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub version: u64,
    pub value: Option<Vec<u8>>,
}

/// One changelog entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub seq: u64,
    pub key: Vec<u8>,
    pub committed: Committed,
}

/// What one group commit did.
#[derive(Clone, Copy, Debug)]
pub struct CommitStats {
    pub writes: usize,
    pub elapsed: Duration,
}

/// A replica's LMDB environment.
#[derive(Clone)]
pub struct Storage {
    env: Env,
    meta: Database<Bytes, Bytes>,
    state: Database<Bytes, Bytes>,
    values: Database<Bytes, Bytes>,
    changelog: Database<U64<BigEndian>, Bytes>,
    identity: DirIdentity,
}

/// Random bytes from the operating system, through the TLS stack's source.
fn random_bytes<const N: usize>() -> Result<[u8; N], Error> {
    let mut out = [0u8; N];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut out)
        .map_err(|_| Error("the system random source failed".into()))?;
    Ok(out)
}

impl Storage {
    /// Opens (or creates) the store in `dir` for replica `replica`, and
    /// durably bumps the boot counter. Returns the store and the new
    /// incarnation. Refuses a directory that belongs to another replica or
    /// holds a format this build does not read.
    pub fn open(dir: &Path, replica: u32, map_size: usize) -> Result<(Storage, u64), Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error(format!("creating {}: {e}", dir.display())))?;
        // SAFETY: heed requires that the environment is opened once per
        // process and that the files are not modified by anything else while
        // open. The daemon opens its data directory once, at start-up.
        let env = unsafe {
            EnvOpenOptions::new()
                .map_size(map_size)
                .max_dbs(8)
                .open(dir)
                .map_err(|e| Error(format!("opening LMDB in {}: {e}", dir.display())))?
        };
        let mut wtxn = env.write_txn()?;
        let meta: Database<Bytes, Bytes> = env.create_database(&mut wtxn, Some("meta"))?;
        let state = env.create_database(&mut wtxn, Some("state"))?;
        let values = env.create_database(&mut wtxn, Some("values"))?;
        let changelog = env.create_database(&mut wtxn, Some("changelog"))?;
        let fresh = meta.get(&wtxn, META_FORMAT)?.is_none();
        match meta.get(&wtxn, META_FORMAT)? {
            None => meta.put(&mut wtxn, META_FORMAT, &[STORAGE_FORMAT])?,
            Some([STORAGE_FORMAT]) => {}
            Some(other) => {
                return Err(Error(format!(
                    "{} holds storage format {other:?}; this build reads format {STORAGE_FORMAT}",
                    dir.display()
                )))
            }
        }
        match meta.get(&wtxn, META_REPLICA)? {
            None => meta.put(&mut wtxn, META_REPLICA, &record_u64(replica as u64))?,
            Some(bytes) => {
                let owner = read_u64(bytes)?;
                if owner != replica as u64 {
                    return Err(Error(format!(
                        "{} belongs to replica {owner}, not {replica}",
                        dir.display()
                    )));
                }
            }
        }
        // A directory from before identities were recorded gets one now.
        let identity = match meta.get(&wtxn, META_IDENTITY)? {
            Some(bytes) => read_identity(bytes)?,
            None => {
                let identity = random_bytes::<IDENTITY_LEN>()?;
                meta.put(&mut wtxn, META_IDENTITY, &record_identity(&identity))?;
                identity
            }
        };
        // A new directory starts its incarnations at a random point below
        // 2^40 rather than at 1: a replica re-admitted on a new directory
        // under its old id then does not repeat the proposal ids of its
        // earlier directory, which may still sit in acceptors' state.
        let incarnation = match meta.get(&wtxn, META_INCARNATION)? {
            None if fresh => 1 + (u64::from_be_bytes(random_bytes::<8>()?) >> 24),
            None => 1,
            Some(bytes) => read_u64(bytes)? + 1,
        };
        meta.put(&mut wtxn, META_INCARNATION, &record_u64(incarnation))?;
        // A new directory votes only once every start-up peer has accepted
        // it (see `set_admitted`); one from before admission was recorded
        // is taken as admitted.
        match meta.get(&wtxn, META_ADMITTED)? {
            Some(bytes) => {
                read_flag(bytes)?;
            }
            None => meta.put(&mut wtxn, META_ADMITTED, &record_flag(!fresh))?,
        }
        wtxn.commit()?;
        let storage = Storage {
            env,
            meta,
            state,
            values,
            changelog,
            identity,
        };
        Ok((storage, incarnation))
    }

    /// The persisted protocol state of each key (empty when never touched).
    pub fn states<'k>(
        &self,
        keys: impl Iterator<Item = &'k [u8]>,
    ) -> Result<Vec<(&'k [u8], Vec<u8>)>, Error> {
        let rtxn = self.env.read_txn()?;
        let mut out = Vec::new();
        for key in keys {
            let state = self.state.get(&rtxn, key)?.map(<[u8]>::to_vec);
            out.push((key, state.unwrap_or_default()));
        }
        Ok(out)
    }

    /// Up to `limit` keys that hold protocol state, in key order, after
    /// `after` (from the first when `None`). One read transaction per page.
    pub fn state_keys(&self, after: Option<&[u8]>, limit: usize) -> Result<Vec<Vec<u8>>, Error> {
        use std::ops::Bound;
        let rtxn = self.env.read_txn()?;
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let range = (lower, Bound::Unbounded);
        let mut out = Vec::new();
        for entry in self.state.range(&rtxn, &range)?.take(limit) {
            let (key, _) = entry?;
            out.push(key.to_vec());
        }
        Ok(out)
    }

    /// Makes every write durable in one transaction and one fsync.
    pub fn commit<'w>(
        &self,
        writes: impl Iterator<Item = &'w Write>,
    ) -> Result<CommitStats, Error> {
        let started = Instant::now();
        let mut wtxn = self.env.write_txn()?;
        let mut seq = match self.changelog.last(&wtxn)? {
            Some((last, _)) => last + 1,
            None => 1,
        };
        let mut count = 0;
        let mut record = Vec::new();
        for w in writes {
            count += 1;
            self.state.put(&mut wtxn, &w.key, &w.state)?;
            if let Some(commit) = &w.commit {
                record.clear();
                encode_committed(&mut record, commit.version, commit.value.as_deref());
                self.values.put(&mut wtxn, &w.key, &record)?;
                record.extend_from_slice(&(w.key.len() as u32).to_be_bytes());
                record.extend_from_slice(&w.key);
                self.changelog.put(&mut wtxn, &seq, &record)?;
                seq += 1;
            }
        }
        wtxn.commit()?;
        Ok(CommitStats {
            writes: count,
            elapsed: started.elapsed(),
        })
    }

    /// The committed value of `key` as this replica last learned it.
    pub fn committed(&self, key: &[u8]) -> Result<Option<Committed>, Error> {
        let rtxn = self.env.read_txn()?;
        match self.values.get(&rtxn, key)? {
            None => Ok(None),
            Some(bytes) => decode_committed(bytes).map(|(c, _)| Some(c)),
        }
    }

    /// Changelog entries from `from` on, at most `limit`.
    pub fn changes(&self, from: u64, limit: usize) -> Result<Vec<Change>, Error> {
        let rtxn = self.env.read_txn()?;
        let mut out = Vec::new();
        for entry in self.changelog.range(&rtxn, &(from..))?.take(limit) {
            let (seq, bytes) = entry?;
            let (committed, rest) = decode_committed(bytes)?;
            let key = match rest {
                [a, b, c, d, key @ ..]
                    if u32::from_be_bytes([*a, *b, *c, *d]) as usize == key.len() =>
                {
                    key
                }
                _ => return Err(Error(format!("changelog entry {seq} is malformed"))),
            };
            out.push(Change {
                seq,
                key: key.to_vec(),
                committed,
            });
        }
        Ok(out)
    }

    /// The first and last changelog sequence numbers held (`first` is
    /// `last + 1` when it is empty; `last` is 0 before the first commit).
    pub fn changelog_bounds(&self) -> Result<(u64, u64), Error> {
        let rtxn = self.env.read_txn()?;
        let last = self.changelog.last(&rtxn)?.map_or(0, |(s, _)| s);
        let first = self.changelog.first(&rtxn)?.map_or(last + 1, |(s, _)| s);
        Ok((first, last))
    }

    /// Drops changelog entries up to `upto`, always keeping the newest one
    /// (it numbers the next commit). Returns how many went.
    pub fn truncate_changelog(&self, upto: u64) -> Result<usize, Error> {
        let mut wtxn = self.env.write_txn()?;
        let Some((last, _)) = self.changelog.last(&wtxn)? else {
            return Ok(0);
        };
        let upto = upto.min(last - 1);
        if upto == 0 {
            return Ok(0);
        }
        let dropped = self.changelog.delete_range(&mut wtxn, &(..=upto))?;
        wtxn.commit()?;
        Ok(dropped)
    }

    /// Up to `limit` committed keys after `after`, with their versions.
    pub fn versions(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, u64)>, Error> {
        use std::ops::Bound;
        let rtxn = self.env.read_txn()?;
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for entry in self
            .values
            .range(&rtxn, &(lower, Bound::Unbounded))?
            .take(limit)
        {
            let (key, bytes) = entry?;
            let (committed, _) = decode_committed(bytes)?;
            out.push((key.to_vec(), committed.version));
        }
        Ok(out)
    }

    /// How far this replica has replayed `peer`'s changelog (0: not yet).
    pub fn cursor(&self, peer: u32) -> Result<u64, Error> {
        let rtxn = self.env.read_txn()?;
        match self.meta.get(&rtxn, &cursor_key(peer))? {
            Some(bytes) => read_u64(bytes),
            None => Ok(0),
        }
    }

    /// Durably records how far this replica has replayed `peer`'s changelog.
    pub fn set_cursor(&self, peer: u32, seq: u64) -> Result<(), Error> {
        let mut wtxn = self.env.write_txn()?;
        self.meta
            .put(&mut wtxn, &cursor_key(peer), &record_u64(seq))?;
        wtxn.commit()?;
        Ok(())
    }

    /// Durably bumps the boot counter and returns it: a protocol instance
    /// started without a process restart (a swap, or recovery from a trap)
    /// must not reuse the proposal ids of the one it replaces.
    pub fn bump_incarnation(&self) -> Result<u64, Error> {
        let mut wtxn = self.env.write_txn()?;
        let incarnation = match self.meta.get(&wtxn, META_INCARNATION)? {
            Some(bytes) => read_u64(bytes)? + 1,
            None => 1,
        };
        self.meta
            .put(&mut wtxn, META_INCARNATION, &record_u64(incarnation))?;
        wtxn.commit()?;
        Ok(incarnation)
    }

    /// This data directory's identity.
    pub fn identity(&self) -> DirIdentity {
        self.identity
    }

    /// Whether this directory may vote: every start-up peer accepted it,
    /// it joined as a learner, or it predates admission. A directory
    /// created empty under an id its peers may know (a lost disk) is not,
    /// until [`Storage::set_admitted`].
    pub fn admitted(&self) -> Result<bool, Error> {
        let rtxn = self.env.read_txn()?;
        match self.meta.get(&rtxn, META_ADMITTED)? {
            Some(bytes) => read_flag(bytes),
            None => Ok(false),
        }
    }

    /// Durably records that this directory may vote.
    pub fn set_admitted(&self) -> Result<(), Error> {
        let mut wtxn = self.env.write_txn()?;
        self.meta
            .put(&mut wtxn, META_ADMITTED, &record_flag(true))?;
        wtxn.commit()?;
        Ok(())
    }

    /// Checks the directory identity `peer` presents against the one
    /// recorded for it, recording it durably when there is none.
    pub fn check_peer_identity(
        &self,
        peer: u32,
        presented: &DirIdentity,
    ) -> Result<PeerIdentity, Error> {
        let verdict = |known: DirIdentity| {
            if &known == presented {
                PeerIdentity::Known
            } else {
                PeerIdentity::Changed { known }
            }
        };
        // Almost always known: a read transaction settles it.
        if let Some(known) = self.known_peer_identity(peer)? {
            return Ok(verdict(known));
        }
        let key = identity_key(peer);
        let mut wtxn = self.env.write_txn()?;
        let verdict = match self.meta.get(&wtxn, &key)? {
            Some(bytes) => verdict(read_identity(bytes)?),
            None => {
                self.meta
                    .put(&mut wtxn, &key, &record_identity(presented))?;
                PeerIdentity::First
            }
        };
        wtxn.commit()?;
        Ok(verdict)
    }

    /// The directory identity recorded for `peer`, if any.
    pub fn known_peer_identity(&self, peer: u32) -> Result<Option<DirIdentity>, Error> {
        let rtxn = self.env.read_txn()?;
        self.meta
            .get(&rtxn, &identity_key(peer))?
            .map(read_identity)
            .transpose()
    }

    /// Forgets the identity recorded for `peer` (it left the cluster; it
    /// may come back on a new directory through the learner stages).
    pub fn forget_peer_identity(&self, peer: u32) -> Result<(), Error> {
        let mut wtxn = self.env.write_txn()?;
        self.meta.delete(&mut wtxn, &identity_key(peer))?;
        wtxn.commit()?;
        Ok(())
    }

    /// Durably records the membership record this replica adopted (its
    /// encoding), before the protocol votes in its epoch.
    pub fn set_adopted_members(&self, record: &[u8]) -> Result<(), Error> {
        let mut out = Vec::with_capacity(record.len() + 1);
        out.push(STORAGE_FORMAT);
        out.extend_from_slice(record);
        let mut wtxn = self.env.write_txn()?;
        self.meta.put(&mut wtxn, META_MEMBERS, &out)?;
        wtxn.commit()?;
        Ok(())
    }

    /// The membership record this replica last adopted, if any.
    pub fn adopted_members(&self) -> Result<Option<Vec<u8>>, Error> {
        let rtxn = self.env.read_txn()?;
        match self.meta.get(&rtxn, META_MEMBERS)? {
            None => Ok(None),
            Some([STORAGE_FORMAT, rest @ ..]) => Ok(Some(rest.to_vec())),
            Some(other) => Err(Error(format!(
                "the adopted membership record has format {:?}; this build reads {STORAGE_FORMAT}",
                other.first()
            ))),
        }
    }

    /// The boot counter as persisted.
    pub fn incarnation(&self) -> Result<u64, Error> {
        let rtxn = self.env.read_txn()?;
        match self.meta.get(&rtxn, META_INCARNATION)? {
            Some(bytes) => read_u64(bytes),
            None => Err(Error("no incarnation recorded".into())),
        }
    }
}

/// `identity/` and the peer id, big-endian.
fn identity_key(peer: u32) -> Vec<u8> {
    let mut key = b"identity/".to_vec();
    key.extend_from_slice(&peer.to_be_bytes());
    key
}

/// `[format][16 bytes]`.
fn record_identity(identity: &DirIdentity) -> Vec<u8> {
    let mut out = Vec::with_capacity(IDENTITY_LEN + 1);
    out.push(STORAGE_FORMAT);
    out.extend_from_slice(identity);
    out
}

fn record_flag(flag: bool) -> [u8; 2] {
    [STORAGE_FORMAT, flag as u8]
}

fn read_flag(bytes: &[u8]) -> Result<bool, Error> {
    match bytes {
        [STORAGE_FORMAT, 0] => Ok(false),
        [STORAGE_FORMAT, 1] => Ok(true),
        _ => Err(Error("a flag record is malformed".into())),
    }
}

fn read_identity(bytes: &[u8]) -> Result<DirIdentity, Error> {
    match bytes {
        [STORAGE_FORMAT, rest @ ..] if rest.len() == IDENTITY_LEN => {
            Ok(rest.try_into().expect("checked length"))
        }
        _ => Err(Error("an identity record is malformed".into())),
    }
}

/// `cursor/` and the peer id, big-endian.
fn cursor_key(peer: u32) -> Vec<u8> {
    let mut key = b"cursor/".to_vec();
    key.extend_from_slice(&peer.to_be_bytes());
    key
}

/// `[format][version u64 BE][present u8][value]`.
fn encode_committed(out: &mut Vec<u8>, version: u64, value: Option<&[u8]>) {
    out.push(STORAGE_FORMAT);
    out.extend_from_slice(&version.to_be_bytes());
    match value {
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
        None => out.push(0),
    }
}

fn decode_committed(bytes: &[u8]) -> Result<(Committed, &[u8]), Error> {
    let bad = || Error("a committed-value record is malformed".to_string());
    let [STORAGE_FORMAT, rest @ ..] = bytes else {
        return Err(Error(format!(
            "a committed-value record has format {:?}; this build reads {STORAGE_FORMAT}",
            bytes.first()
        )));
    };
    if rest.len() < 9 {
        return Err(bad());
    }
    let version = u64::from_be_bytes(rest[..8].try_into().map_err(|_| bad())?);
    match rest[8] {
        0 => Ok((
            Committed {
                version,
                value: None,
            },
            &rest[9..],
        )),
        1 if rest.len() >= 13 => {
            let len = u32::from_be_bytes(rest[9..13].try_into().map_err(|_| bad())?) as usize;
            let body = &rest[13..];
            if body.len() < len {
                return Err(bad());
            }
            let value = Some(body[..len].to_vec());
            Ok((Committed { version, value }, &body[len..]))
        }
        _ => Err(bad()),
    }
}

fn record_u64(v: u64) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[0] = STORAGE_FORMAT;
    out[1..].copy_from_slice(&v.to_be_bytes());
    out
}

fn read_u64(bytes: &[u8]) -> Result<u64, Error> {
    match bytes {
        [STORAGE_FORMAT, rest @ ..] if rest.len() == 8 => {
            Ok(u64::from_be_bytes(rest.try_into().expect("8 bytes")))
        }
        _ => Err(Error(format!("a meta record is malformed: {bytes:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballot_core::Commit;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ballot-storage-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn writes_survive_reopen_and_the_boot_counter_grows() {
        let dir = tmp("reopen");
        let first;
        let identity;
        {
            let (s, inc) = Storage::open(&dir, 3, 1 << 26).unwrap();
            // A new directory starts at a random incarnation below 2^40.
            assert!((1..=1 << 40).contains(&inc), "{inc}");
            first = inc;
            identity = s.identity();
            let writes = [
                Write {
                    key: b"a".to_vec(),
                    state: vec![1, 2],
                    commit: Some(Commit {
                        version: 1,
                        value: Some(b"x".to_vec()),
                    }),
                },
                Write {
                    key: b"b".to_vec(),
                    state: vec![3],
                    commit: None,
                },
                Write {
                    key: b"a".to_vec(),
                    state: vec![4],
                    commit: Some(Commit {
                        version: 2,
                        value: None,
                    }),
                },
            ];
            let stats = s.commit(writes.iter()).unwrap();
            assert_eq!(stats.writes, 3);
        }
        let (s, inc) = Storage::open(&dir, 3, 1 << 26).unwrap();
        assert_eq!(inc, first + 1);
        assert_eq!(
            s.identity(),
            identity,
            "a reopened directory keeps its identity"
        );
        assert_eq!(s.incarnation().unwrap(), first + 1);
        assert_eq!(s.bump_incarnation().unwrap(), first + 2);
        assert_eq!(s.incarnation().unwrap(), first + 2);
        let keys: [&[u8]; 3] = [b"a", b"b", b"c"];
        let states = s.states(keys.into_iter()).unwrap();
        assert_eq!(states[0].1, vec![4]);
        assert_eq!(states[1].1, vec![3]);
        assert!(states[2].1.is_empty());
        assert_eq!(
            s.committed(b"a").unwrap(),
            Some(Committed {
                version: 2,
                value: None
            })
        );
        assert_eq!(s.committed(b"b").unwrap(), None);
        let log = s.changes(1, 10).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(
            (log[0].seq, &log[0].key[..], log[0].committed.version),
            (1, &b"a"[..], 1)
        );
        assert_eq!(log[0].committed.value.as_deref(), Some(&b"x"[..]));
        assert_eq!((log[1].seq, log[1].committed.version), (2, 2));
        drop(s);
        // Another replica's directory is refused.
        let err = Storage::open(&dir, 4, 1 << 26).err().unwrap();
        assert!(err.0.contains("belongs to replica 3"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_changelog_truncates_but_keeps_its_newest_entry_and_cursors_persist() {
        let dir = tmp("truncate");
        let (storage, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
        assert_eq!(storage.changelog_bounds().unwrap(), (1, 0));
        let writes: Vec<Write> = (0..10u64)
            .map(|i| Write {
                key: format!("k{}", i % 4).into_bytes(),
                state: vec![1],
                commit: Some(ballot_core::Commit {
                    version: i + 1,
                    value: Some(vec![i as u8]),
                }),
            })
            .collect();
        storage.commit(writes.iter()).unwrap();
        assert_eq!(storage.changelog_bounds().unwrap(), (1, 10));
        assert_eq!(storage.truncate_changelog(4).unwrap(), 4);
        assert_eq!(storage.changelog_bounds().unwrap(), (5, 10));
        // Never the newest entry: it numbers the next commit.
        assert_eq!(storage.truncate_changelog(u64::MAX).unwrap(), 5);
        assert_eq!(storage.changelog_bounds().unwrap(), (10, 10));
        storage.commit(writes[..1].iter()).unwrap();
        assert_eq!(storage.changelog_bounds().unwrap(), (10, 11));
        let versions = storage.versions(None, 10).unwrap();
        assert_eq!(versions.len(), 4);
        assert_eq!(storage.versions(Some(b"k2"), 10).unwrap().len(), 1);
        assert_eq!(
            storage.state_keys(Some(b"k0"), 2).unwrap(),
            vec![b"k1".to_vec(), b"k2".to_vec()]
        );
        assert_eq!(storage.cursor(2).unwrap(), 0);
        storage.set_cursor(2, 77).unwrap();
        drop(storage);
        let (storage, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
        assert_eq!(storage.cursor(2).unwrap(), 77);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn record_bytes_are_fixed() {
        let mut out = Vec::new();
        encode_committed(&mut out, 2, Some(b"hi"));
        assert_eq!(out, [1, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 2, b'h', b'i']);
        out.clear();
        encode_committed(&mut out, 7, None);
        assert_eq!(out, [1, 0, 0, 0, 0, 0, 0, 0, 7, 0]);
        assert_eq!(record_u64(5), [1, 0, 0, 0, 0, 0, 0, 0, 5]);
        let id: DirIdentity = core::array::from_fn(|i| i as u8);
        let bytes = record_identity(&id);
        assert_eq!(bytes[..3], [1, 0, 1]);
        assert_eq!(bytes.len(), 17);
        assert_eq!(read_identity(&bytes).unwrap(), id);
        assert!(read_identity(&bytes[..16]).is_err());
        assert_eq!(identity_key(7), b"identity/\0\0\0\x07");
        assert_eq!(record_flag(false), [1, 0]);
        assert_eq!(record_flag(true), [1, 1]);
        assert!(read_flag(&[1, 2]).is_err());
    }

    #[test]
    fn a_new_directory_is_not_admitted_until_it_says_so() {
        let dir = tmp("admitted");
        let (s, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
        assert!(!s.admitted().unwrap());
        drop(s);
        // A crash before admission leaves it unadmitted.
        let (s, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
        assert!(!s.admitted().unwrap());
        s.set_admitted().unwrap();
        assert!(s.admitted().unwrap());
        drop(s);
        let (s, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
        assert!(s.admitted().unwrap());
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn peers_identities_are_recorded_once_and_a_new_directory_is_told_apart() {
        let dir = tmp("identities");
        let other = tmp("identities-other");
        let (s, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
        let (a, _) = Storage::open(&other, 2, 1 << 24).unwrap();
        assert_ne!(
            s.identity(),
            a.identity(),
            "directories draw their own identity"
        );
        let first = a.identity();
        assert_eq!(
            s.check_peer_identity(2, &first).unwrap(),
            PeerIdentity::First
        );
        assert_eq!(
            s.check_peer_identity(2, &first).unwrap(),
            PeerIdentity::Known
        );
        assert_eq!(s.known_peer_identity(2).unwrap(), Some(first));
        assert_eq!(s.known_peer_identity(3).unwrap(), None);
        let blank = [9u8; IDENTITY_LEN];
        assert_eq!(
            s.check_peer_identity(2, &blank).unwrap(),
            PeerIdentity::Changed { known: first }
        );
        drop(s);
        let (s, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
        assert_eq!(
            s.check_peer_identity(2, &blank).unwrap(),
            PeerIdentity::Changed { known: first },
            "the record survives a restart"
        );
        // Once replica 2 has left the cluster, a new directory may join as 2.
        s.forget_peer_identity(2).unwrap();
        assert_eq!(
            s.check_peer_identity(2, &blank).unwrap(),
            PeerIdentity::First
        );
        // The adopted membership record round-trips.
        assert_eq!(s.adopted_members().unwrap(), None);
        s.set_adopted_members(b"{}").unwrap();
        assert_eq!(s.adopted_members().unwrap(), Some(b"{}".to_vec()));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&other);
    }
}
