//! Durable storage: one LMDB environment per replica, through heed.
//!
//! Four databases, every value led by a format byte (see `docs/design.md`
//! for the bytes):
//! - `meta`: storage format, the replica id the directory belongs to, the
//!   boot counter (the protocol's incarnation);
//! - `state`: key -> the protocol component's opaque per-key state;
//! - `values`: key -> the committed version and value, for scans and
//!   changelog consumers;
//! - `changelog`: local sequence number (u64 BE) -> the key and version of
//!   one commit this replica learned, in the order it made them durable
//!   (not the value: replay reads values through consensus).
//!
//! [`Storage::commit`] makes many readies durable as one record of the
//! write-ahead log and one fsync (`wal`); a thread of its own then moves
//! them into LMDB, several groups a transaction. Reads see every durable
//! write: the core's state loads look in the log first, every other read
//! waits until LMDB holds what was logged when it began.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballot_core::Write;
use heed::types::{Bytes, U64};
use heed::{byteorder::BigEndian, Database, Env, EnvOpenOptions};

mod meta;
mod record;
#[cfg(test)]
mod tests;
mod wal;

use record::*;
use wal::Wal;
pub use wal::WAL_FORMAT;

/// Format byte leading the `meta` and `values` records this module writes.
/// Readers refuse other values.
pub const STORAGE_FORMAT: u8 = 1;
/// Format of a changelog entry: `[2][version: u64][key]`. Format 1 held the
/// whole `values` record (with the value) and `[key_len: u32][key]`.
pub const CHANGELOG_FORMAT: u8 = 2;
/// The directory's format, in `meta/format`: 2 since changelog entries
/// hold no values, 3 since writes go through the log (`wal`), which a
/// build that reads format 2 would not replay. A format-1 directory
/// becomes format 3 when opened: its entries are read in either format
/// and leave with truncation; a format-2 directory has nothing to move.
pub const DIRECTORY_FORMAT: u8 = 3;
/// LMDB's largest key (its default build): a write past it, or an empty
/// key, is refused before it is logged, since LMDB would refuse it when
/// the log is applied, and at every open after.
pub const LMDB_KEY_MAX: usize = 511;
/// Default LMDB map size: address space reserved, not disk used.
pub const MAP_SIZE_DEFAULT: usize = 64 << 30;

const META_FORMAT: &[u8] = b"format";
const META_REPLICA: &[u8] = b"replica";
const META_INCARNATION: &[u8] = b"incarnation";
const META_IDENTITY: &[u8] = b"identity";
const META_MEMBERS: &[u8] = b"members";
const META_ADMITTED: &[u8] = b"admitted";
/// The last log record LMDB holds.
const META_WAL: &[u8] = b"wal";

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

/// A storage failure, by what an operator does about it. After one on
/// the write path, the replica stops answering (nothing acknowledged is
/// lost: what was committed stays committed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageError {
    /// LMDB's map is full: give the replica a larger `map_size_mib`.
    Full,
    /// LMDB or the file system under it failed.
    Lmdb(String),
    /// The operating system failed outside LMDB (creating the directory,
    /// the random source).
    Io(String),
    /// A record does not decode: the directory is damaged.
    Corrupt(String),
    /// The directory belongs to another replica, or holds a format this
    /// build does not read.
    Foreign(String),
}

/// The storage error, by its module's name.
pub type Error = StorageError;

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageError::Full => f.write_str(
                "lmdb: the map is full; restart the replica with a larger map_size_mib \
                 (what it committed is intact)",
            ),
            StorageError::Lmdb(m) => write!(f, "lmdb: {m}"),
            StorageError::Io(m) | StorageError::Corrupt(m) | StorageError::Foreign(m) => {
                f.write_str(m)
            }
        }
    }
}

impl std::error::Error for StorageError {}

impl From<heed::Error> for StorageError {
    fn from(e: heed::Error) -> Self {
        match e {
            heed::Error::Mdb(heed::MdbError::MapFull) => StorageError::Full,
            e => StorageError::Lmdb(e.to_string()),
        }
    }
}

/// A committed value as stored in `values` and `changelog`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub version: u64,
    pub value: Option<Vec<u8>>,
}

/// One changelog entry: `key` reached `version` (its value is in `values`,
/// or newer there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangelogEntry {
    pub seq: u64,
    pub key: Vec<u8>,
    pub version: u64,
}

/// What one group commit did.
#[derive(Clone, Copy, Debug)]
pub struct CommitStats {
    pub writes: usize,
    pub elapsed: Duration,
    /// Of `elapsed`, the time spent waiting for the log's applier (the
    /// file's bound, or the bytes not yet applied).
    pub waited: Duration,
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
    wal: Arc<Wal>,
    _applier: Arc<wal::Closer>,
}

/// The databases a log record goes to.
#[derive(Clone, Copy)]
struct Tables {
    meta: Database<Bytes, Bytes>,
    state: Database<Bytes, Bytes>,
    values: Database<Bytes, Bytes>,
    changelog: Database<U64<BigEndian>, Bytes>,
}

impl Tables {
    /// Puts the log records numbered from `first` in `wtxn`, in order,
    /// and records the last of them as applied.
    fn put_records<'w>(
        &self,
        wtxn: &mut heed::RwTxn,
        first: u64,
        records: impl Iterator<Item = &'w [Write]>,
    ) -> Result<(), Error> {
        let mut seq = match self.changelog.last(wtxn)? {
            Some((last, _)) => last + 1,
            None => 1,
        };
        let mut last = first;
        let mut record = Vec::new();
        for (n, writes) in records.enumerate() {
            last = first + n as u64;
            for w in writes {
                self.state.put(wtxn, &w.key, &w.state)?;
                if let Some(commit) = &w.commit {
                    record.clear();
                    encode_committed(&mut record, commit.version, commit.value.as_deref());
                    self.values.put(wtxn, &w.key, &record)?;
                    record.clear();
                    encode_change(&mut record, commit.version, &w.key);
                    self.changelog.put(wtxn, &seq, &record)?;
                    seq += 1;
                }
            }
        }
        self.meta.put(wtxn, META_WAL, &record_u64(last))?;
        Ok(())
    }
}

/// Opens the log in `dir` and puts in `wtxn` the records LMDB does not
/// hold yet. Returns the file and the last record LMDB then holds.
fn replay(
    dir: &Path,
    tables: &Tables,
    wtxn: &mut heed::RwTxn,
) -> Result<(std::fs::File, u64), Error> {
    use std::io::Read;
    let path = dir.join(wal::WAL_FILE);
    let io = |e: std::io::Error| StorageError::Io(format!("reading {}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    // The file's name must outlast a power loss as surely as what it will
    // hold: the directory is flushed once the file is there.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io)?;
    let applied = match tables.meta.get(wtxn, META_WAL)? {
        Some(bytes) => read_u64(bytes)?,
        None => 0,
    };
    let records = wal::decode_records(&bytes, applied)?;
    let todo: Vec<_> = records.iter().filter(|(seq, _)| *seq > applied).collect();
    let (Some((first, _)), Some((last, _))) = (todo.first(), todo.last()) else {
        return Ok((file, applied));
    };
    if *first != applied + 1 {
        return Err(StorageError::Corrupt(format!(
            "{} starts at record {first} but LMDB holds records up to {applied} only",
            path.display()
        )));
    }
    tables.put_records(wtxn, *first, todo.iter().map(|(_, w)| w.as_slice()))?;
    tracing::info!(
        records = todo.len(),
        last,
        "applied the log records lmdb did not hold yet"
    );
    Ok((file, *last))
}

/// Random bytes from the operating system, through the TLS stack's source.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], Error> {
    let mut out = [0u8; N];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut out)
        .map_err(|_| StorageError::Io("the system random source failed".into()))?;
    Ok(out)
}

impl Storage {
    /// Holds LMDB's write lock until the transaction is dropped: the
    /// log's applier waits for it (tests only).
    #[cfg(test)]
    pub(crate) fn hold_applier(&self) -> heed::RwTxn<'_> {
        self.env.write_txn().expect("write transaction")
    }

    /// Holds the log's append end until the guard is dropped: every
    /// commit of the writer thread waits for it (tests only).
    #[cfg(test)]
    pub(crate) fn hold_writes(&self) -> std::sync::MutexGuard<'_, wal::Tail> {
        self.wal.hold()
    }

    /// Opens (or creates) the store in `dir` for replica `replica`, and
    /// durably bumps the boot counter. Returns the store and the new
    /// incarnation. Refuses a directory that belongs to another replica or
    /// holds a format this build does not read.
    pub fn open(dir: &Path, replica: u32, map_size: usize) -> Result<(Storage, u64), Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StorageError::Io(format!("creating {}: {e}", dir.display())))?;
        // SAFETY: heed requires that the environment is opened once per
        // process and that the files are not modified by anything else while
        // open. The daemon opens its data directory once, at start-up.
        let env = unsafe {
            EnvOpenOptions::new()
                .map_size(map_size)
                .max_dbs(8)
                .open(dir)
                .map_err(|e| StorageError::Lmdb(format!("opening {}: {e}", dir.display())))?
        };
        let mut wtxn = env.write_txn()?;
        let meta: Database<Bytes, Bytes> = env.create_database(&mut wtxn, Some("meta"))?;
        let state = env.create_database(&mut wtxn, Some("state"))?;
        let values = env.create_database(&mut wtxn, Some("values"))?;
        let changelog = env.create_database(&mut wtxn, Some("changelog"))?;
        let fresh = meta.get(&wtxn, META_FORMAT)?.is_none();
        match meta.get(&wtxn, META_FORMAT)? {
            None => meta.put(&mut wtxn, META_FORMAT, &[DIRECTORY_FORMAT])?,
            Some([DIRECTORY_FORMAT]) => {}
            Some([2]) => meta.put(&mut wtxn, META_FORMAT, &[DIRECTORY_FORMAT])?,
            // Entries already written stay as they are (read below in
            // either format) and go with truncation; new ones are format 2.
            // Rewriting them here would make opening a directory with a
            // long changelog one huge transaction.
            Some([1]) => {
                meta.put(&mut wtxn, META_FORMAT, &[DIRECTORY_FORMAT])?;
                tracing::info!(
                    dir = %dir.display(),
                    "storage format 1 moved to {DIRECTORY_FORMAT}: new changelog entries \
                     hold no values"
                );
            }
            Some(other) => {
                return Err(StorageError::Foreign(format!(
                    "{} holds storage format {other:?}; this build reads formats 1 to \
                     {DIRECTORY_FORMAT}",
                    dir.display()
                )))
            }
        }
        match meta.get(&wtxn, META_REPLICA)? {
            None => meta.put(&mut wtxn, META_REPLICA, &record_u64(replica as u64))?,
            Some(bytes) => {
                let owner = read_u64(bytes)?;
                if owner != replica as u64 {
                    return Err(StorageError::Foreign(format!(
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
        let tables = Tables {
            meta,
            state,
            values,
            changelog,
        };
        let (log, applied) = replay(dir, &tables, &mut wtxn)?;
        wtxn.commit()?;
        // What the log held is in LMDB now, durably: the log starts over.
        log.set_len(0)
            .and_then(|()| log.sync_all())
            .map_err(|e| StorageError::Io(format!("emptying the log in {}: {e}", dir.display())))?;
        wal::preallocate(&log);
        let salt = u64::from_be_bytes(random_bytes::<8>()?);
        let wal = Arc::new(Wal::new(log, applied, salt));
        let thread = {
            let (wal, env) = (wal.clone(), env.clone());
            std::thread::Builder::new()
                .name("ballot-applier".into())
                .spawn(move || {
                    wal::applier(wal, |first, groups| {
                        let mut wtxn = env.write_txn()?;
                        let records = groups.iter().map(|g| g.as_slice());
                        tables.put_records(&mut wtxn, first, records)?;
                        wtxn.commit()?;
                        Ok(())
                    })
                })
                .map_err(|e| StorageError::Io(format!("starting the applier: {e}")))?
        };
        let storage = Storage {
            env,
            meta,
            state,
            values,
            changelog,
            identity,
            _applier: Arc::new(wal::Closer {
                wal: wal.clone(),
                thread: Some(thread),
            }),
            wal,
        };
        Ok((storage, incarnation))
    }

    /// The protocol state of `keys` in order (empty when never touched),
    /// `pending` first (a state not durable yet), then the log, then LMDB, until
    /// the next one would take the total past `max`: a prefix of `keys`,
    /// never empty when `keys` is not. One read transaction; a state is
    /// copied only once it fits.
    pub fn states_within<'k, 'p>(
        &self,
        keys: &[&'k [u8]],
        max: usize,
        pending: impl Fn(&[u8]) -> Option<&'p [u8]>,
    ) -> Result<Vec<(&'k [u8], Vec<u8>)>, Error> {
        // The snapshot is taken under the log's lock: a record the log no
        // longer holds was applied before it.
        let logged = self.wal.shared();
        let rtxn = self.env.read_txn()?;
        let mut out = Vec::with_capacity(keys.len());
        let mut total = 0usize;
        for &key in keys {
            let state = match pending(key).or_else(|| Wal::lookup(&logged, key)) {
                Some(s) => s,
                None => self.state.get(&rtxn, key)?.unwrap_or_default(),
            };
            if !out.is_empty() && total + state.len() > max {
                break;
            }
            total += state.len();
            out.push((key, state.to_vec()));
        }
        Ok(out)
    }

    /// Up to `limit` keys that hold protocol state, in key order, after
    /// `after` (from the first when `None`). One read transaction per page.
    pub fn state_keys(&self, after: Option<&[u8]>, limit: usize) -> Result<Vec<Vec<u8>>, Error> {
        use std::ops::Bound;
        self.wal.settle()?;
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

    /// Up to `limit` keys beginning with `prefix` that hold protocol
    /// state, in key order, after `after` (from the prefix's first when
    /// `None`); the cluster's own keys (beginning with a NUL byte) are
    /// skipped unless `prefix` is one of them. One read transaction.
    pub fn state_keys_in(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, Error> {
        use std::ops::Bound;
        self.wal.settle()?;
        let rtxn = self.env.read_txn()?;
        // LMDB refuses an empty key as a bound: the empty prefix is
        // unbounded (no key is empty).
        let lower = match after {
            Some(a) if a >= prefix && !a.is_empty() => Bound::Excluded(a),
            _ if prefix.is_empty() => Bound::Unbounded,
            _ => Bound::Included(prefix),
        };
        let mut out = Vec::new();
        for entry in self.state.range(&rtxn, &(lower, Bound::Unbounded))? {
            let (key, _) = entry?;
            if !key.starts_with(prefix) || out.len() == limit {
                break;
            }
            if key.first() != Some(&0) || prefix.first() == Some(&0) {
                out.push(key.to_vec());
            }
        }
        Ok(out)
    }

    /// Makes every write durable as one log record and one fsync. A key
    /// LMDB would refuse fails the whole group before anything is logged.
    pub fn commit(&self, writes: Vec<Write>) -> Result<CommitStats, Error> {
        if let Some(w) = writes
            .iter()
            .find(|w| w.key.is_empty() || w.key.len() > LMDB_KEY_MAX)
        {
            return Err(StorageError::Lmdb(format!(
                "a write of a {}-byte key was refused: keys are 1 to {LMDB_KEY_MAX} bytes",
                w.key.len()
            )));
        }
        let started = Instant::now();
        let count = writes.len();
        let waited = self.wal.append(writes)?;
        Ok(CommitStats {
            writes: count,
            elapsed: started.elapsed(),
            waited,
        })
    }

    /// Has `observer` told the duration and log records of each of the
    /// applier's LMDB transactions (metrics; the first one set stays).
    pub fn on_apply(&self, observer: impl Fn(Duration, usize) + Send + Sync + 'static) {
        self.wal.observe(Box::new(observer));
    }

    /// Log records, and their bytes of writes, LMDB does not hold yet.
    pub fn log_backlog(&self) -> (u64, usize) {
        self.wal.backlog()
    }

    /// Why the log's applier stopped, if it did: the replica must stop
    /// answering (reads of LMDB fail with it already).
    pub fn failure(&self) -> Option<Error> {
        self.wal.failure()
    }

    /// The committed value of `key` as LMDB holds it now, without waiting
    /// for the log: for a reader that already waited (through a changelog
    /// page, whose entries' values LMDB holds with them) and wants nothing
    /// newer than what it read.
    pub fn committed_applied(&self, key: &[u8]) -> Result<Option<Committed>, Error> {
        let rtxn = self.env.read_txn()?;
        match self.values.get(&rtxn, key)? {
            None => Ok(None),
            Some(bytes) => decode_committed(bytes).map(|(c, _)| Some(c)),
        }
    }

    /// The committed value of `key` as this replica last learned it.
    pub fn committed(&self, key: &[u8]) -> Result<Option<Committed>, Error> {
        self.wal.settle()?;
        self.committed_applied(key)
    }

    /// Changelog entries from `from` on, at most `limit`.
    pub fn changes(&self, from: u64, limit: usize) -> Result<Vec<ChangelogEntry>, Error> {
        self.wal.settle()?;
        let rtxn = self.env.read_txn()?;
        self.changes_in(&rtxn, from, limit)
    }

    /// The changelog's bounds and its entries from `from` on (at most
    /// `limit`), read in one transaction: a truncation cannot commit between
    /// the two, so the entries start where the bounds say they do.
    pub fn changes_page(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<(u64, u64, Vec<ChangelogEntry>), Error> {
        self.wal.settle()?;
        let rtxn = self.env.read_txn()?;
        let (first, last) = self.bounds_in(&rtxn)?;
        Ok((first, last, self.changes_in(&rtxn, from, limit)?))
    }

    fn changes_in(
        &self,
        rtxn: &heed::RoTxn,
        from: u64,
        limit: usize,
    ) -> Result<Vec<ChangelogEntry>, Error> {
        let mut out = Vec::new();
        for entry in self.changelog.range(rtxn, &(from..))?.take(limit) {
            let (seq, bytes) = entry?;
            let (version, key) = decode_change(bytes)
                .or_else(|| decode_change_v1(bytes))
                .ok_or_else(|| {
                    StorageError::Corrupt(format!("changelog entry {seq} is malformed"))
                })?;
            out.push(ChangelogEntry {
                seq,
                key: key.to_vec(),
                version,
            });
        }
        Ok(out)
    }

    /// The first and last changelog sequence numbers held (`first` is
    /// `last + 1` when it is empty; `last` is 0 before the first commit).
    pub fn changelog_bounds(&self) -> Result<(u64, u64), Error> {
        self.wal.settle()?;
        let rtxn = self.env.read_txn()?;
        self.bounds_in(&rtxn)
    }

    fn bounds_in(&self, rtxn: &heed::RoTxn) -> Result<(u64, u64), Error> {
        let last = self.changelog.last(rtxn)?.map_or(0, |(s, _)| s);
        let first = self.changelog.first(rtxn)?.map_or(last + 1, |(s, _)| s);
        Ok((first, last))
    }

    /// Drops changelog entries up to `upto`, always keeping the newest one
    /// (it numbers the next commit). Returns how many went.
    pub fn truncate_changelog(&self, upto: u64) -> Result<usize, Error> {
        self.wal.settle()?;
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
        self.wal.settle()?;
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
}
