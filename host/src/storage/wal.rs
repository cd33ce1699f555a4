//! The write-ahead log in front of LMDB.
//!
//! A group commit is one record appended to the file `wal` in the data
//! directory and one `fdatasync`: from then on it is durable, and the
//! writer releases what waited for it. LMDB commits flush twice (the data,
//! then the meta page), so committing a group there directly cost two
//! flushes on the critical path; the log costs one.
//!
//! The applier thread moves logged groups into LMDB in order, several in
//! one transaction, each transaction recording the last record it holds
//! (`meta/wal`). Until a group is applied:
//! - `Storage::states_within` finds its states here ([`Wal::lookup`]),
//!   so the core never reads an older state from LMDB;
//! - every other read of `state`, `values` or `changelog` first waits until
//!   what was logged when it began is applied ([`Wal::settle`]), so a
//!   listing, a local read or a changelog reader sees every durable write.
//!
//! Opening the directory applies the records LMDB does not hold yet (those
//! after `meta/wal`) and empties the file. Once everything logged is
//! applied and the file is past [`REWIND_AT`], the next record is written
//! at offset 0 again, under a new random salt: the records after it are
//! older, and reading stops at the first record whose salt is not the
//! first record's, whose sequence number does not follow, whose checksum
//! fails or that is cut short. The salt also keeps a record that a client
//! wrote inside a value, left behind by a rewind, from being taken for
//! one: its writer cannot know the salt.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ballot_core::{Commit, Write};

use super::record::{decode_committed, encode_committed};
use super::Error;

/// Format byte leading every log record.
pub const WAL_FORMAT: u8 = 1;
/// The log's file name in the data directory.
pub(super) const WAL_FILE: &str = "wal";
/// `[format][salt u64][seq u64][len u32][crc32 u32]`.
const HEADER_LEN: usize = 25;
/// The header's bytes the checksum covers, with the payload.
const CHECKED_LEN: usize = 21;
/// Once everything logged is applied, a file longer than this is written
/// from its start again.
pub(super) const REWIND_AT: u64 = 4 << 20;
/// Past this length the writer waits for the applier to catch up and
/// rewinds, so the file stays bounded. Between [`REWIND_AT`] and this the
/// applier is hurried, and the writer rewinds once it has caught up.
pub(super) const FILE_MAX: u64 = 2 * REWIND_AT;
/// Bytes given to the emptied file at open: an `fdatasync` after writing
/// into allocated blocks does not also write the file's new size
/// (measured on this project's machines: about 150 us against 200 us).
pub(super) const PREALLOCATE: u64 = FILE_MAX + (1 << 20);
/// Bytes of writes logged and not yet applied before the writer waits.
const QUEUED_MAX: usize = 64 << 20;
/// How long a record may wait for the applier when nobody waits for it:
/// an LMDB commit is two flushes and a tree walk per key, so the applier
/// gathers records, and the flushes the log's appends queue behind are
/// fewer. Nothing that answers a client waits on it (reads that need LMDB
/// hurry it), so it is long: at 10 ms the applier's transactions cost
/// about a tenth of a busy replica's CPU (design section 13).
const APPLY_DELAY: Duration = Duration::from_millis(100);
/// Queued bytes past which the applier goes without waiting.
const APPLY_BYTES: usize = 4 << 20;

/// One record, appended to `out`:
/// `[1][salt u64 BE][seq u64 BE][len u32 BE][crc32 u32 BE][payload: len
/// bytes]`, the CRC-32 (IEEE) taken over the first 21 bytes and the
/// payload; `salt` is drawn when the file is emptied or rewound. The
/// payload is `[count u32 BE]` and `count` writes, each
/// `[key_len u32 BE][key][state_len u32 BE][state][0]` or, when it learned
/// a commit, `...[state][1]` and the commit as `values` holds it.
pub(super) fn encode_record(out: &mut Vec<u8>, salt: u64, seq: u64, writes: &[Write]) {
    let start = out.len();
    out.push(WAL_FORMAT);
    out.extend_from_slice(&salt.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    let body = out.len();
    out.extend_from_slice(&(writes.len() as u32).to_be_bytes());
    for w in writes {
        for bytes in [&w.key, &w.state] {
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            out.extend_from_slice(bytes);
        }
        match &w.commit {
            None => out.push(0),
            Some(c) => {
                out.push(1);
                encode_committed(out, c.version, c.value.as_deref());
            }
        }
    }
    let len = (out.len() - body) as u32;
    out[start + 17..start + CHECKED_LEN].copy_from_slice(&len.to_be_bytes());
    let crc = checksum(&out[start..start + CHECKED_LEN], &out[body..]);
    out[start + CHECKED_LEN..body].copy_from_slice(&crc.to_be_bytes());
}

fn checksum(header: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header);
    h.update(payload);
    h.finalize()
}

/// The records at the start of `bytes`, while each is whole, checks out,
/// carries the first record's salt and numbers the one after the record
/// before it.
///
/// Where that ends must be the end of what was written: a record is
/// appended only once the one before it is durable, so a torn write is
/// the last. Damage is refused as corrupt rather than read as the end,
/// since records after it were acknowledged:
/// - a record that checks out but does not decode;
/// - an intact record of the same salt, numbered past both the last one
///   read and `applied` (the last record LMDB holds), anywhere after the
///   end: the records between were lost. The salt keeps records of the
///   file's earlier passes and values that look like records out of it;
///   `applied` keeps a rewound file whose first record was torn (the old
///   pass's records show again, all applied, since a rewind waits for
///   that). Damage to the first record's format byte or salt hides this.
pub(super) fn decode_records(bytes: &[u8], applied: u64) -> Result<Vec<(u64, Vec<Write>)>, Error> {
    let mut out: Vec<(u64, Vec<Write>)> = Vec::new();
    let mut first_salt = None;
    let mut at = 0;
    while let Some(h) = Header::at(bytes, at) {
        if h.format != WAL_FORMAT {
            break;
        }
        let same = *first_salt.get_or_insert(h.salt) == h.salt;
        let follows = out
            .last()
            .is_none_or(|(last, _)| last.checked_add(1) == Some(h.seq));
        let Some(payload) = (same && follows).then(|| h.payload(bytes, at)).flatten() else {
            break;
        };
        let writes = decode_payload(payload).ok_or_else(|| {
            Error::Corrupt(format!("log record {} checks out but is malformed", h.seq))
        })?;
        out.push((h.seq, writes));
        at += HEADER_LEN + h.len;
    }
    let floor = out.last().map_or(applied, |(seq, _)| applied.max(*seq));
    if let Some((found, seq)) = first_salt.and_then(|salt| intact_after(bytes, at, salt, floor)) {
        return Err(Error::Corrupt(format!(
            "the log is damaged at byte {at}: record {seq} at byte {found} is intact after it, \
             so the records before it were lost"
        )));
    }
    Ok(out)
}

/// A record's header, as read.
struct Header {
    format: u8,
    salt: u64,
    seq: u64,
    len: usize,
    crc: u32,
}

impl Header {
    /// The header at byte `at`, if a whole one is there.
    fn at(bytes: &[u8], at: usize) -> Option<Header> {
        let h = bytes.get(at..at.checked_add(HEADER_LEN)?)?;
        Some(Header {
            format: h[0],
            salt: u64::from_be_bytes(h[1..9].try_into().expect("8 bytes")),
            seq: u64::from_be_bytes(h[9..17].try_into().expect("8 bytes")),
            len: u32::from_be_bytes(h[17..21].try_into().expect("4 bytes")) as usize,
            crc: u32::from_be_bytes(h[21..25].try_into().expect("4 bytes")),
        })
    }

    /// The payload of this header's record at byte `at`, if it is whole
    /// and checks out.
    fn payload<'b>(&self, bytes: &'b [u8], at: usize) -> Option<&'b [u8]> {
        let payload = bytes.get(at + HEADER_LEN..)?.get(..self.len)?;
        (checksum(&bytes[at..at + CHECKED_LEN], payload) == self.crc).then_some(payload)
    }
}

/// The first intact record carrying `salt` and numbered past `floor` at
/// or after byte `from`, and where it starts.
fn intact_after(bytes: &[u8], from: usize, salt: u64, floor: u64) -> Option<(usize, u64)> {
    let mut marker = [WAL_FORMAT; 9];
    marker[1..].copy_from_slice(&salt.to_be_bytes());
    let mut at = from;
    loop {
        let found = at
            + bytes
                .get(at..)?
                .windows(marker.len())
                .position(|w| w == marker)?;
        let h = Header::at(bytes, found)?;
        if h.seq > floor && h.payload(bytes, found).is_some() {
            return Some((found, h.seq));
        }
        at = found + 1;
    }
}

fn decode_payload(mut p: &[u8]) -> Option<Vec<Write>> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (p.len() >= n).then(|| p.split_at(n))?;
        *p = rest;
        Some(head)
    }
    fn bytes(p: &mut &[u8]) -> Option<Vec<u8>> {
        let len = u32::from_be_bytes(take(p, 4)?.try_into().ok()?) as usize;
        Some(take(p, len)?.to_vec())
    }
    let count = u32::from_be_bytes(take(&mut p, 4)?.try_into().ok()?) as usize;
    // Every write takes at least 9 bytes: a count past that is damage.
    let mut writes = Vec::with_capacity(count.min(p.len() / 9));
    for _ in 0..count {
        let key = bytes(&mut p)?;
        let state = bytes(&mut p)?;
        let commit = match take(&mut p, 1)? {
            [0] => None,
            [1] => {
                let (c, rest) = decode_committed(p).ok()?;
                p = rest;
                Some(Commit {
                    version: c.version,
                    value: c.value,
                })
            }
            _ => return None,
        };
        writes.push(Write { key, state, commit });
    }
    p.is_empty().then_some(writes)
}

/// Allocates the emptied log's first [`PREALLOCATE`] bytes (zeros, which
/// end the log when read). Where the file system cannot, appends extend
/// the file instead: slower, as safe.
pub(super) fn preallocate(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid descriptor, owned by `file` for the whole call.
    let err = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, PREALLOCATE as libc::off_t) };
    if err != 0 {
        tracing::debug!(errno = err, "the log's file could not be preallocated");
    }
}

/// The append end of the log: held by whoever appends.
pub(crate) struct Tail {
    file: File,
    offset: u64,
    /// Carried by every record written since the file was last emptied
    /// or rewound.
    salt: u64,
    buf: Vec<u8>,
}

/// What the writer, the applier and the readers share.
pub(super) struct Shared {
    /// The last record made durable.
    pub(super) logged: u64,
    /// The last record LMDB holds.
    pub(super) applied: u64,
    /// Logged and not applied, in order: record `applied + 1` first.
    queue: VecDeque<Queued>,
    /// Each key written by a queued record: that record and the write's
    /// place in it (the last write of the key).
    latest: HashMap<Vec<u8>, (u64, usize)>,
    queued_bytes: usize,
    /// Readers and writers waiting for the applier: it goes at once.
    waiting: usize,
    /// The file wants rewinding: the applier goes at once.
    hurry: bool,
    /// Why the applier stopped: nothing more is logged after it.
    pub(super) failed: Option<Error>,
    closing: bool,
}

/// Told each applier transaction's duration and record count.
pub(super) type ApplyObserver = Box<dyn Fn(Duration, usize) + Send + Sync>;

/// A record logged and not applied yet.
struct Queued {
    logged_at: Instant,
    /// Its writes' bytes, counted in `Shared::queued_bytes`.
    bytes: usize,
    writes: Arc<Vec<Write>>,
}

/// The log, shared by the writer, the applier thread and the readers.
pub(super) struct Wal {
    tail: Mutex<Tail>,
    shared: Mutex<Shared>,
    changed: Condvar,
    observer: std::sync::OnceLock<ApplyObserver>,
}

fn bytes_of(writes: &[Write]) -> usize {
    writes
        .iter()
        .map(|w| {
            w.key.len()
                + w.state.len()
                + w.commit
                    .as_ref()
                    .map_or(0, |c| c.value.as_ref().map_or(0, Vec::len))
        })
        .sum()
}

impl Wal {
    /// An empty log in `file` whose next record is `applied + 1`, its
    /// records salted with `salt`.
    pub(super) fn new(file: File, applied: u64, salt: u64) -> Wal {
        Wal {
            tail: Mutex::new(Tail {
                file,
                offset: 0,
                salt,
                buf: Vec::new(),
            }),
            shared: Mutex::new(Shared {
                logged: applied,
                applied,
                queue: VecDeque::new(),
                latest: HashMap::new(),
                queued_bytes: 0,
                waiting: 0,
                hurry: false,
                failed: None,
                closing: false,
            }),
            changed: Condvar::new(),
            observer: std::sync::OnceLock::new(),
        }
    }

    /// Has `observer` told of every applier transaction from now on (the
    /// first one set stays).
    pub(super) fn observe(&self, observer: ApplyObserver) {
        let _ = self.observer.set(observer);
    }

    /// Records and bytes of writes logged and not applied yet.
    pub(super) fn backlog(&self) -> (u64, usize) {
        let shared = self.shared();
        (shared.logged - shared.applied, shared.queued_bytes)
    }

    pub(super) fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Shared>) -> MutexGuard<'a, Shared> {
        self.changed.wait(guard).unwrap_or_else(|p| p.into_inner())
    }

    /// Waits while `blocked` holds, counted among those the applier
    /// hurries for; returns how long (zero when it did not wait).
    ///
    /// Listings, watchers and peers' questions read storage on the I/O
    /// runtime's workers. A wait there (one LMDB transaction, longer
    /// under a backlog) would hold the worker and every task queued on
    /// it, client requests and peer traffic included: on a multi-thread
    /// runtime the wait tells tokio first, which hands the worker's other
    /// tasks to another thread (`block_in_place`).
    fn wait_for_applier<'a>(
        &'a self,
        mut shared: MutexGuard<'a, Shared>,
        blocked: impl Fn(&Shared) -> bool,
    ) -> (MutexGuard<'a, Shared>, Duration) {
        if !blocked(&shared) {
            return (shared, Duration::ZERO);
        }
        let started = Instant::now();
        shared.waiting += 1;
        self.changed.notify_all();
        let wait = |mut shared: MutexGuard<'a, Shared>| {
            while blocked(&shared) {
                shared = self.wait(shared);
            }
            shared
        };
        // (A current-thread runtime that entered a multi-thread runtime's
        // handle would make `block_in_place` panic; nothing here does.)
        let on_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        shared = if on_worker {
            // The handoff may start a thread: not under the log's lock,
            // which the writer takes after every fsync.
            drop(shared);
            tokio::task::block_in_place(|| wait(self.shared()))
        } else {
            wait(shared)
        };
        shared.waiting -= 1;
        (shared, started.elapsed())
    }

    /// Holds the append end: every append waits for the guard (tests).
    #[cfg(test)]
    pub(crate) fn hold(&self) -> MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `writes` durable as one record, then hands them to the
    /// applier. Returns once the record is on disk, with how long it
    /// waited for the applier first.
    pub(super) fn append(&self, writes: Vec<Write>) -> Result<Duration, Error> {
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = bytes_of(&writes);
        // A record's length is a u32: a larger group (far past what the
        // core's bounds let through) stops the replica, losing nothing
        // acknowledged.
        if bytes + 32 * writes.len() + 4 > u32::MAX as usize {
            return Err(Error::Io(format!(
                "a group of {bytes} bytes is past the log's record size"
            )));
        }
        let (seq, waited) = {
            // Bounded memory, and a bounded file: both wait for the applier.
            let offset = tail.offset;
            let (mut shared, waited) = self.wait_for_applier(self.shared(), |shared| {
                shared.failed.is_none()
                    && ((shared.queued_bytes > 0 && shared.queued_bytes + bytes > QUEUED_MAX)
                        || (offset >= FILE_MAX && shared.applied < shared.logged))
            });
            if let Some(e) = &shared.failed {
                return Err(e.clone());
            }
            if tail.offset >= REWIND_AT {
                if shared.applied == shared.logged {
                    let salt = u64::from_be_bytes(super::random_bytes::<8>()?);
                    tail.offset = 0;
                    tail.salt = salt;
                } else {
                    shared.hurry = true;
                    self.changed.notify_all();
                }
            }
            (shared.logged + 1, waited)
        };
        let Tail {
            file,
            offset,
            salt,
            buf,
        } = &mut *tail;
        buf.clear();
        encode_record(buf, *salt, seq, &writes);
        file.write_all_at(buf, *offset)
            .and_then(|()| file.sync_data())
            .map_err(|e| {
                let e = Error::Io(format!("writing the log: {e}"));
                self.fail(e.clone());
                e
            })?;
        *offset += buf.len() as u64;
        let mut shared = self.shared();
        for (i, w) in writes.iter().enumerate() {
            shared.latest.insert(w.key.clone(), (seq, i));
        }
        // The applier needs waking only if it had nothing queued or
        // should go now: behind a queued record it sleeps until that
        // record's delay is up, which a later record does not move. (A
        // wake-up per append was one thread switch per group commit.)
        let wake = shared.queue.is_empty() || shared.queued_bytes + bytes >= APPLY_BYTES;
        shared.queue.push_back(Queued {
            logged_at: Instant::now(),
            bytes,
            writes: Arc::new(writes),
        });
        shared.queued_bytes += bytes;
        shared.logged = seq;
        drop(shared);
        if wake {
            self.changed.notify_all();
        }
        Ok(waited)
    }

    /// The state of `key` in the newest record not applied yet that
    /// writes it.
    pub(super) fn lookup<'s>(shared: &'s Shared, key: &[u8]) -> Option<&'s [u8]> {
        let &(seq, i) = shared.latest.get(key)?;
        let queued = shared.queue.get((seq - shared.applied - 1) as usize)?;
        Some(&queued.writes[i].state)
    }

    /// Waits until LMDB holds every record logged when this was called.
    /// Once the applier failed, the reads it would serve fail with its
    /// error: LMDB lacks what it could not apply.
    pub(super) fn settle(&self) -> Result<(), Error> {
        let shared = self.shared();
        let target = shared.logged;
        let (shared, _) = self.wait_for_applier(shared, |shared| {
            shared.applied < target && shared.failed.is_none()
        });
        match &shared.failed {
            Some(e) if shared.applied < target => Err(e.clone()),
            _ => Ok(()),
        }
    }

    /// Why the applier stopped, if it did.
    pub(super) fn failure(&self) -> Option<Error> {
        self.shared().failed.clone()
    }

    fn fail(&self, e: Error) {
        self.shared().failed.get_or_insert(e);
        self.changed.notify_all();
    }

    /// The applier's next batch: every queued record (the first record's
    /// number with them), or `None` once closing with nothing queued. It
    /// waits until the oldest record is [`APPLY_DELAY`] old, unless
    /// someone waits for it, the file wants rewinding, enough is queued or
    /// the log closes.
    fn next_batch(&self) -> Option<(u64, Vec<Arc<Vec<Write>>>)> {
        let mut shared = self.shared();
        loop {
            let Some(&Queued { logged_at, .. }) = shared.queue.front() else {
                if shared.closing {
                    return None;
                }
                shared = self.wait(shared);
                continue;
            };
            let due = logged_at + APPLY_DELAY;
            let now = Instant::now();
            if shared.closing
                || shared.waiting > 0
                || shared.hurry
                || shared.queued_bytes >= APPLY_BYTES
                || now >= due
            {
                break;
            }
            shared = self
                .changed
                .wait_timeout(shared, due - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        shared.hurry = false;
        let batch = shared.queue.iter().map(|q| q.writes.clone()).collect();
        Some((shared.applied + 1, batch))
    }

    /// Records `count` more records as applied.
    fn applied(&self, count: usize) {
        let mut shared = self.shared();
        let applied = shared.applied + count as u64;
        for queued in shared.queue.drain(..count).collect::<Vec<_>>() {
            shared.queued_bytes -= queued.bytes;
            for w in queued.writes.iter() {
                if shared
                    .latest
                    .get(&w.key)
                    .is_some_and(|&(seq, _)| seq <= applied)
                {
                    shared.latest.remove(&w.key);
                }
            }
        }
        shared.applied = applied;
        drop(shared);
        self.changed.notify_all();
    }

    fn close(&self) {
        self.shared().closing = true;
        self.changed.notify_all();
    }
}

/// Applies logged records to LMDB in order until the log closes (then
/// everything queued is applied first) or a transaction fails or panics:
/// then the log records why, appends and reads that need LMDB fail with
/// it, and nothing is applied any more (the records stay in the file for
/// the next open).
/// `apply(first, groups)` writes the records numbered from `first` in
/// one transaction.
pub(super) fn applier(wal: Arc<Wal>, apply: impl Fn(u64, &[Arc<Vec<Write>>]) -> Result<(), Error>) {
    let run = std::panic::AssertUnwindSafe(|| {
        while let Some((first, groups)) = wal.next_batch() {
            let started = Instant::now();
            apply(first, &groups)?;
            if let Some(observe) = wal.observer.get() {
                observe(started.elapsed(), groups.len());
            }
            wal.applied(groups.len());
        }
        Ok(())
    });
    let failed = match std::panic::catch_unwind(run) {
        Ok(result) => result.err(),
        Err(panic) => Some(Error::Io(format!(
            "the log's applier panicked: {}",
            crate::panic_message(&*panic)
        ))),
    };
    if let Some(e) = failed {
        tracing::error!(error = %e, "applying the log to lmdb failed");
        wal.fail(e);
    }
}

/// Ends the applier thread when the last handle on the storage goes:
/// what was logged is applied first.
pub(super) struct Closer {
    pub(super) wal: Arc<Wal>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.wal.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
