//! Leases: a record per lease in a system key, changed by compare-and-swap
//! through consensus, and the decisions around it (design section 7,
//! "Leases"). The daemon (`host/src/leases.rs`) and the simulator both
//! drive these.
//!
//! A lease is live until a replica writes it ended: on revoke, or when the
//! replica saw the record unchanged for `ttl_ms` on its own monotonic clock
//! ([`Expiry`]). Every change of the record (a keepalive, an attach) gives
//! it a new version and so starts the wait again; since a replica sees a
//! version only after it was chosen, and it was chosen only after the
//! client sent the write that made it, a lease ends at least `ttl_ms` after
//! the client sent its last keepalive, measured on a replica's clock
//! (clock offsets do not matter; rates drifting apart shorten it by the
//! drift). Once ended, every attached key still at the version it was
//! attached at is deleted, then the record ([`sweep`]).

use std::collections::{BTreeMap, BTreeSet};

use ballot_core::register::Command;

/// Where lease records live: the prefix, then the id in 16 hex digits.
pub const PREFIX: &[u8] = b"\0ballot/lease/";
/// The shortest lease granted.
pub const TTL_MIN_MS: u64 = 1_000;
/// The longest lease granted (a day).
pub const TTL_MAX_MS: u64 = 86_400_000;
/// Keys attached to one lease at most.
pub const KEYS_MAX: usize = 1_000;
/// Attachments (a key at a version, or a write under way) on one lease at
/// most.
pub const ENTRIES_MAX: usize = 2 * KEYS_MAX;
/// How long after a lease ended its record is kept while writes to its
/// keys are still under way (their fate unknown): each sweep meanwhile
/// deletes the keys that took such a write. A write that takes effect
/// later than this stays.
pub const WRITES_WINDOW_MS: u64 = 30_000;
/// The record's format byte.
pub const FORMAT: u8 = 1;

/// The system key of lease `id`.
pub fn key(id: u64) -> Vec<u8> {
    let mut key = PREFIX.to_vec();
    key.extend_from_slice(format!("{id:016x}").as_bytes());
    key
}

/// The id of a lease record's key.
pub fn id_of(key: &[u8]) -> Option<u64> {
    let hex = key.strip_prefix(PREFIX)?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// The SHA-256 of a value, as a lease remembers a write under way.
pub fn digest(value: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(value).into()
}

/// How a key is attached to a lease.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Attached {
    /// Its write took effect at this version: deleted at that version only.
    At(u64),
    /// A write is under way (or its replica stopped before saying how it
    /// ended): deleted only if the key holds the value it carried.
    Writing(Pending),
}

/// One write under way through a lease: the SHA-256 of its value, and a
/// number of its own, so two writes of one value are told apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pending {
    pub digest: [u8; 32],
    pub nonce: u64,
}

impl Pending {
    pub fn new(value: &[u8], nonce: u64) -> Pending {
        Pending {
            digest: digest(value),
            nonce,
        }
    }
}

/// Why an edit of a lease is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The lease does not exist, or has ended.
    Gone,
    /// It has [`KEYS_MAX`] keys attached.
    Full,
}

/// One lease record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub ttl_ms: u64,
    /// Revoked or expired: its keys are being deleted.
    pub ended: bool,
    /// Keepalives so far: each makes a new version.
    pub renewals: u64,
    /// What is attached: a key may be at a version and have writes under
    /// way through this lease at once.
    pub keys: BTreeSet<(Vec<u8>, Attached)>,
}

impl Lease {
    pub fn new(ttl_ms: u64) -> Lease {
        Lease {
            ttl_ms,
            ended: false,
            renewals: 0,
            keys: BTreeSet::new(),
        }
    }

    /// `[1][ended: u8][ttl_ms: u64][renewals: u64][count: u32]`, then per
    /// attachment, in order, `[len: u16][key][0][version: u64]` or `[len:
    /// u16][key][1][sha256: 32][nonce: u64]`; integers little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT, u8::from(self.ended)];
        out.extend_from_slice(&self.ttl_ms.to_le_bytes());
        out.extend_from_slice(&self.renewals.to_le_bytes());
        out.extend_from_slice(&(self.keys.len() as u32).to_le_bytes());
        for (key, attached) in &self.keys {
            out.extend_from_slice(&(key.len() as u16).to_le_bytes());
            out.extend_from_slice(key);
            match attached {
                Attached::At(version) => {
                    out.push(0);
                    out.extend_from_slice(&version.to_le_bytes());
                }
                Attached::Writing(p) => {
                    out.push(1);
                    out.extend_from_slice(&p.digest);
                    out.extend_from_slice(&p.nonce.to_le_bytes());
                }
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Lease, String> {
        let mut r = Reader(bytes);
        let format = r.take(1)?[0];
        if format != FORMAT {
            return Err(format!("lease record format {format} is not {FORMAT}"));
        }
        let ended = match r.take(1)?[0] {
            0 => false,
            1 => true,
            other => return Err(format!("lease state {other} is neither 0 nor 1")),
        };
        let ttl_ms = r.u64()?;
        let renewals = r.u64()?;
        let count = u32::from_le_bytes(r.take(4)?.try_into().expect("4 bytes"));
        if count as usize > ENTRIES_MAX {
            return Err(format!(
                "{count} attachments on one lease, more than {ENTRIES_MAX}"
            ));
        }
        let mut keys = BTreeSet::new();
        for _ in 0..count {
            let len = u16::from_le_bytes(r.take(2)?.try_into().expect("2 bytes"));
            let key = r.take(len as usize)?.to_vec();
            let attached = match r.take(1)?[0] {
                0 => Attached::At(r.u64()?),
                1 => Attached::Writing(Pending {
                    digest: r.take(32)?.try_into().expect("32 bytes"),
                    nonce: r.u64()?,
                }),
                other => return Err(format!("attachment tag {other} is neither 0 nor 1")),
            };
            if !keys.insert((key, attached)) {
                return Err("an attachment is listed twice".into());
            }
        }
        if !r.0.is_empty() {
            return Err(format!("{} bytes after the lease record", r.0.len()));
        }
        Ok(Lease {
            ttl_ms,
            ended,
            renewals,
            keys,
        })
    }

    /// A keepalive: the same lease at a new version.
    pub fn keepalive(&mut self) -> Result<(), Refusal> {
        if self.ended {
            return Err(Refusal::Gone);
        }
        self.renewals += 1;
        Ok(())
    }

    /// Before a write to `key` through this lease: the key goes with the
    /// lease whatever becomes of the write.
    pub fn begin_attach(&mut self, key: &[u8], write: Pending) -> Result<(), Refusal> {
        if self.ended {
            return Err(Refusal::Gone);
        }
        let attached = self.keys.iter().any(|(k, _)| k == key);
        let keys: BTreeSet<&[u8]> = self.keys.iter().map(|(k, _)| k.as_slice()).collect();
        if (!attached && keys.len() >= KEYS_MAX) || self.keys.len() >= ENTRIES_MAX {
            return Err(Refusal::Full);
        }
        self.keys.insert((key.to_vec(), Attached::Writing(write)));
        Ok(())
    }

    /// The key's attachments at a version.
    fn versions_of<'a>(&'a self, key: &'a [u8]) -> impl Iterator<Item = u64> + 'a {
        self.keys.iter().filter_map(move |(k, a)| match a {
            Attached::At(v) if k == key => Some(*v),
            _ => None,
        })
    }

    /// Attaches `key` at `version`, unless at a newer one already (an older
    /// version can never be the key's again). Whether the lease changed.
    fn attach_at(&mut self, key: &[u8], version: u64) -> bool {
        let newest = self.versions_of(key).max();
        if newest.is_some_and(|v| v >= version) {
            return false;
        }
        if let Some(older) = newest {
            self.keys.remove(&(key.to_vec(), Attached::At(older)));
        }
        self.keys.insert((key.to_vec(), Attached::At(version)))
    }

    /// The write begun by [`Lease::begin_attach`] changed the key, to
    /// `version`: the key is attached at it. Whether the lease changed.
    pub fn attached(&mut self, key: &[u8], write: Pending, version: u64) -> bool {
        let took = self.keys.remove(&(key.to_vec(), Attached::Writing(write)));
        self.attach_at(key, version) || took
    }

    /// The write begun by [`Lease::begin_attach`] changed nothing: the key
    /// already held its value, at `version`. That version is this lease's
    /// only if the lease has it (a retry of a write it attached); otherwise
    /// it cannot be told whose it is (another lease's, a plain write's, or
    /// another write of this lease whose fate is unknown, which keeps its
    /// own entry), and the key is not attached (`false`): attaching it
    /// could let this lease's end delete what another lease holds.
    pub fn kept(&mut self, key: &[u8], write: Pending, version: u64) -> bool {
        self.keys.remove(&(key.to_vec(), Attached::Writing(write)));
        self.keys.contains(&(key.to_vec(), Attached::At(version)))
    }

    /// The write begun by [`Lease::begin_attach`] did not take effect: what
    /// it attached is taken back (what the key was attached at before stays).
    pub fn abandon(&mut self, key: &[u8], write: Pending) -> bool {
        self.keys.remove(&(key.to_vec(), Attached::Writing(write)))
    }

    /// Whether writes to its keys are still under way (their fate unknown).
    pub fn writing(&self) -> bool {
        self.keys
            .iter()
            .any(|(_, a)| matches!(a, Attached::Writing(_)))
    }

    /// Ends the lease (a revoke or an expiry). `false` if it had ended.
    pub fn end(&mut self) -> bool {
        !std::mem::replace(&mut self.ended, true)
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("the lease record ends early".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

/// When each lease this replica knows of was last seen to change, on its
/// monotonic clock: a lease is due to expire once it has been seen at one
/// version for its whole time to live.
#[derive(Clone, Debug, Default)]
pub struct Expiry {
    seen: BTreeMap<u64, (u64, u64)>,
}

impl Expiry {
    pub fn new() -> Expiry {
        Expiry::default()
    }

    /// Lease `id` is at `version` (by a read of any kind) at `now_ms`. An
    /// older version than one seen already changes nothing.
    pub fn observe(&mut self, id: u64, version: u64, now_ms: u64) {
        let seen = self.seen.entry(id).or_insert((version, now_ms));
        if version > seen.0 {
            *seen = (version, now_ms);
        }
    }

    /// Whether lease `id`, last seen at `version`, has stayed at that
    /// version for `ttl_ms` by `now_ms`.
    pub fn due(&self, id: u64, version: u64, ttl_ms: u64, now_ms: u64) -> bool {
        self.seen
            .get(&id)
            .is_some_and(|&(v, since)| v == version && now_ms.saturating_sub(since) >= ttl_ms)
    }

    /// Forgets the leases not in `live` (deleted, or ended and swept).
    pub fn retain(&mut self, live: &BTreeSet<u64>) {
        self.seen.retain(|id, _| live.contains(id));
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// How long an ended lease waits for the replica that ended it to sweep it
/// before any other replica does.
pub const SWEEP_GRACE_MS: u64 = 5_000;
/// How long a replica waits before it sweeps an ended lease again.
pub const SWEEP_RETRY_MS: u64 = 5_000;

/// When this replica sweeps each ended lease it knows of, on its monotonic
/// clock: the replica that ended a lease at once ([`Sweeps::ending`]); any
/// other once [`SWEEP_GRACE_MS`] has passed since it first saw it ended,
/// again every [`SWEEP_RETRY_MS`] until a sweep succeeds, and for the last
/// time once [`WRITES_WINDOW_MS`] has passed.
#[derive(Clone, Debug, Default)]
pub struct Sweeps {
    ended: BTreeMap<u64, Ended>,
}

#[derive(Clone, Copy, Debug)]
struct Ended {
    /// When this replica first saw the lease ended.
    since: u64,
    /// A sweep of its own succeeded.
    swept: bool,
    /// Not before this.
    retry_at: u64,
}

impl Sweeps {
    pub fn new() -> Sweeps {
        Sweeps::default()
    }

    /// This replica ended lease `id` at `now_ms` and sweeps it at once.
    pub fn ending(&mut self, id: u64, now_ms: u64) {
        let ended = Ended {
            since: now_ms,
            swept: false,
            retry_at: now_ms + SWEEP_RETRY_MS,
        };
        self.ended.insert(id, ended);
    }

    /// Lease `id` is ended, as seen at `now_ms`: `Some(last)` if it is to be
    /// swept now (`last`: the sweep that deletes the record even with
    /// writes still under way), and then not again for [`SWEEP_RETRY_MS`].
    pub fn due(&mut self, id: u64, now_ms: u64) -> Option<bool> {
        let e = self.ended.entry(id).or_insert(Ended {
            since: now_ms,
            swept: false,
            retry_at: 0,
        });
        let waited = now_ms.saturating_sub(e.since);
        let last = waited >= WRITES_WINDOW_MS;
        if now_ms < e.retry_at || !((waited >= SWEEP_GRACE_MS && !e.swept) || last) {
            return None;
        }
        e.retry_at = now_ms + SWEEP_RETRY_MS;
        Some(last)
    }

    /// A sweep of lease `id` by this replica succeeded.
    pub fn swept(&mut self, id: u64) {
        if let Some(e) = self.ended.get_mut(&id) {
            e.swept = true;
        }
    }

    /// Forgets the leases not in `present` (deleted).
    pub fn retain(&mut self, present: &BTreeSet<u64>) {
        self.ended.retain(|id, _| present.contains(id));
    }
}

/// What deleting one attached key of an ended lease takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sweep {
    /// Carry out this command on the key (it deletes only at the version
    /// attached, so a later write to the key keeps it).
    Command(Command),
    /// Read the key linearizably first, then ask [`sweep_read`].
    Read,
}

/// The first step of deleting a key attached as `attached`.
pub fn sweep(attached: &Attached) -> Sweep {
    match attached {
        Attached::At(version) => Sweep::Command(Command::DeleteIf { expected: *version }),
        Attached::Writing(_) => Sweep::Read,
    }
}

/// After reading a key attached while its write was under way: the delete
/// if it holds the value that write carried (`digest` of `value`, computed
/// by the caller), nothing otherwise.
pub fn sweep_read(
    attached: &Attached,
    version: u64,
    value_digest: Option<[u8; 32]>,
) -> Option<Command> {
    match attached {
        Attached::Writing(p) if value_digest == Some(p.digest) => {
            Some(Command::DeleteIf { expected: version })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Lease {
        let mut lease = Lease::new(1_500);
        lease.renewals = 2;
        lease.keys.insert((b"lock".to_vec(), Attached::At(7)));
        lease.keys.insert((
            b"svc/a".to_vec(),
            Attached::Writing(Pending {
                digest: [0xab; 32],
                nonce: 9,
            }),
        ));
        lease
    }

    /// Format 1, byte for byte: a record written by this version must read
    /// the same in every later one.
    #[test]
    fn the_record_format_is_fixed() {
        let mut golden = vec![1, 0];
        golden.extend_from_slice(&1_500u64.to_le_bytes());
        golden.extend_from_slice(&2u64.to_le_bytes());
        golden.extend_from_slice(&2u32.to_le_bytes());
        golden.extend_from_slice(&[4, 0]);
        golden.extend_from_slice(b"lock");
        golden.push(0);
        golden.extend_from_slice(&7u64.to_le_bytes());
        golden.extend_from_slice(&[5, 0]);
        golden.extend_from_slice(b"svc/a");
        golden.push(1);
        golden.extend_from_slice(&[0xab; 32]);
        golden.extend_from_slice(&9u64.to_le_bytes());
        assert_eq!(sample().encode(), golden);
        assert_eq!(Lease::decode(&golden).unwrap(), sample());
    }

    #[test]
    fn damaged_records_are_refused_with_a_reason() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(Lease::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(Lease::decode(&extra).unwrap_err().contains("after"));
        let mut format = bytes.clone();
        format[0] = 2;
        assert!(Lease::decode(&format).unwrap_err().contains("format 2"));
        let mut twice = sample();
        twice.keys.clear();
        let mut bytes = twice.encode();
        bytes[18..22].copy_from_slice(&2u32.to_le_bytes());
        for _ in 0..2 {
            bytes.extend_from_slice(&[1, 0, b'k', 0]);
            bytes.extend_from_slice(&3u64.to_le_bytes());
        }
        assert!(Lease::decode(&bytes).unwrap_err().contains("twice"));
        let mut many = Lease::new(1_000).encode();
        many[18..22].copy_from_slice(&(ENTRIES_MAX as u32 + 1).to_le_bytes());
        assert!(Lease::decode(&many).unwrap_err().contains("more than"));
    }

    #[test]
    fn keys_and_ids_round_trip() {
        assert_eq!(key(0xbeef), b"\0ballot/lease/000000000000beef".to_vec());
        assert_eq!(id_of(&key(u64::MAX)), Some(u64::MAX));
        assert_eq!(id_of(b"\0ballot/lease/12"), None);
        assert_eq!(id_of(b"\0ballot/members"), None);
    }

    fn items(lease: &Lease) -> Vec<(&[u8], Attached)> {
        lease
            .keys
            .iter()
            .map(|(k, a)| (k.as_slice(), a.clone()))
            .collect()
    }

    fn w(d: u8, nonce: u64) -> Pending {
        Pending {
            digest: [d; 32],
            nonce,
        }
    }

    #[test]
    fn an_attach_begins_as_a_write_under_way_and_ends_at_its_version_or_not_at_all() {
        let mut lease = Lease::new(1_000);
        lease.begin_attach(b"k", w(1, 1)).unwrap();
        assert_eq!(items(&lease), [(&b"k"[..], Attached::Writing(w(1, 1)))]);
        assert!(lease.writing());
        // Two writes through the lease, chosen in the other order: the
        // newer version stays, whichever reports last.
        lease.begin_attach(b"k", w(2, 2)).unwrap();
        assert!(lease.attached(b"k", w(2, 2), 5));
        assert!(lease.attached(b"k", w(1, 1), 4));
        assert_eq!(items(&lease), [(&b"k"[..], Attached::At(5))]);
        assert!(!lease.writing());
        // A refused write takes back only its own attachment.
        lease.begin_attach(b"k", w(3, 3)).unwrap();
        assert!(lease.abandon(b"k", w(3, 3)));
        assert!(!lease.abandon(b"k", w(3, 3)));
        assert_eq!(items(&lease), [(&b"k"[..], Attached::At(5))]);
        // A newer write replaces the older version.
        lease.begin_attach(b"k", w(4, 4)).unwrap();
        assert!(lease.attached(b"k", w(4, 4), 9));
        assert_eq!(items(&lease), [(&b"k"[..], Attached::At(9))]);
    }

    #[test]
    fn two_writes_of_one_value_are_two_attachments() {
        let mut lease = Lease::new(1_000);
        lease.begin_attach(b"k", w(1, 1)).unwrap();
        lease.begin_attach(b"k", w(1, 2)).unwrap();
        assert!(lease.attached(b"k", w(1, 1), 5));
        // The other one's replica stopped: its entry stays for the sweep.
        assert_eq!(
            items(&lease),
            [
                (&b"k"[..], Attached::At(5)),
                (&b"k"[..], Attached::Writing(w(1, 2)))
            ]
        );
    }

    #[test]
    fn a_write_that_changed_nothing_is_attached_only_at_the_lease_s_own_version() {
        // A retry of a create this lease made: its version is the lease's.
        let mut lease = Lease::new(1_000);
        lease.begin_attach(b"lock", w(1, 1)).unwrap();
        assert!(lease.attached(b"lock", w(1, 1), 5));
        lease.begin_attach(b"lock", w(1, 2)).unwrap();
        assert!(lease.kept(b"lock", w(1, 2), 5));
        assert_eq!(items(&lease), [(&b"lock"[..], Attached::At(5))]);
        // A create whose first try's fate is unknown: whose version it found
        // cannot be told, and the first try keeps its own entry (the sweep
        // deletes the key if it holds the value).
        let mut lease = Lease::new(1_000);
        lease.begin_attach(b"lock", w(1, 1)).unwrap();
        lease.begin_attach(b"lock", w(1, 2)).unwrap();
        assert!(!lease.kept(b"lock", w(1, 2), 5));
        assert_eq!(items(&lease), [(&b"lock"[..], Attached::Writing(w(1, 1)))]);
        // The same value written by another lease (or without one): not
        // this lease's, so its end must not delete it.
        let mut lease = Lease::new(1_000);
        lease.begin_attach(b"lock", w(1, 1)).unwrap();
        assert!(!lease.kept(b"lock", w(1, 1), 5));
        assert!(lease.keys.is_empty());
    }

    #[test]
    fn an_ended_or_full_lease_refuses_edits() {
        let mut lease = Lease::new(1_000);
        for i in 0..KEYS_MAX {
            lease
                .begin_attach(format!("k{i}").as_bytes(), w(0, i as u64))
                .unwrap();
        }
        assert_eq!(lease.begin_attach(b"one more", w(0, 0)), Err(Refusal::Full));
        // A key it has may be written again, up to the entries' bound.
        lease.begin_attach(b"k1", w(1, 1)).unwrap();
        for i in 0..(ENTRIES_MAX - KEYS_MAX - 1) {
            lease.begin_attach(b"k2", w(2, i as u64)).unwrap();
        }
        assert_eq!(lease.begin_attach(b"k3", w(3, 3)), Err(Refusal::Full));
        assert!(lease.end());
        assert!(!lease.end());
        assert_eq!(lease.keepalive(), Err(Refusal::Gone));
        assert_eq!(lease.begin_attach(b"k1", w(0, 9)), Err(Refusal::Gone));
    }

    #[test]
    fn a_lease_is_due_only_after_its_ttl_at_one_version() {
        let mut e = Expiry::new();
        e.observe(1, 3, 100);
        assert!(!e.due(1, 3, 1_000, 1_099));
        assert!(e.due(1, 3, 1_000, 1_100));
        // A newer version starts the wait again; an older one changes nothing.
        e.observe(1, 4, 900);
        e.observe(1, 3, 950);
        assert!(!e.due(1, 4, 1_000, 1_899));
        assert!(!e.due(1, 3, 1_000, 5_000));
        assert!(e.due(1, 4, 1_000, 1_900));
        // Never seen: not due.
        assert!(!e.due(2, 1, 1_000, u64::MAX));
        e.retain(&BTreeSet::new());
        assert!(e.is_empty());
    }

    #[test]
    fn an_ended_lease_is_swept_after_the_grace_until_a_sweep_succeeds_and_last_at_the_window() {
        let mut s = Sweeps::new();
        assert_eq!(s.due(1, 0), None);
        assert_eq!(s.due(1, SWEEP_GRACE_MS - 1), None);
        assert_eq!(s.due(1, SWEEP_GRACE_MS), Some(false));
        // It failed: again only after the retry pause.
        assert_eq!(s.due(1, SWEEP_GRACE_MS + 1), None);
        assert_eq!(s.due(1, SWEEP_GRACE_MS + SWEEP_RETRY_MS), Some(false));
        s.swept(1);
        assert_eq!(s.due(1, 2 * SWEEP_GRACE_MS + SWEEP_RETRY_MS), None);
        assert_eq!(s.due(1, WRITES_WINDOW_MS), Some(true));
        // The replica that ended a lease swept it; others wait the pause.
        s.ending(2, 100);
        assert_eq!(s.due(2, 100 + SWEEP_RETRY_MS - 1), None);
        s.retain(&BTreeSet::new());
        assert_eq!(s.due(1, WRITES_WINDOW_MS + 1), None);
    }

    #[test]
    fn a_sweep_deletes_only_what_the_lease_wrote() {
        assert_eq!(
            sweep(&Attached::At(7)),
            Sweep::Command(Command::DeleteIf { expected: 7 })
        );
        let writing = Attached::Writing(w(5, 1));
        assert_eq!(sweep(&writing), Sweep::Read);
        assert_eq!(
            sweep_read(&writing, 9, Some([5; 32])),
            Some(Command::DeleteIf { expected: 9 })
        );
        assert_eq!(sweep_read(&writing, 9, Some([6; 32])), None);
        assert_eq!(sweep_read(&writing, 9, None), None);
    }
}
