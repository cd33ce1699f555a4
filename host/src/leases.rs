//! Leases in the daemon: granting, keeping alive, revoking and showing a
//! lease, attaching a key to one around its write, and the reaper that
//! expires leases and deletes their keys. Every change goes through
//! consensus on the lease's record (`\0ballot/lease/<id>`); the decisions
//! (the record, when a lease is due, what a sweep deletes) are
//! `ballot_control::lease`, which the simulator drives too.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use ballot_control::lease::Pending;
use ballot_control::lease::{self, digest, Attached, Expiry, Lease, Refusal, Sweep, Sweeps};
use ballot_core::register::Command;
use ballot_core::{Consistency, Operation, Outcome};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::node::{self, ClientRequest};
use crate::storage::Storage;
use crate::system::mono_ms;
use crate::system_record::{failure, SystemRecord, Unavailable};

/// How often the reaper looks at the leases this replica holds.
pub const TICK: Duration = Duration::from_millis(250);
/// Longest one read or write of the reaper or a lease request waits.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one sweep goes on before it leaves the rest for a later try, so
/// a lease with many keys that fail does not stop the reaper.
const SWEEP_BUDGET: Duration = Duration::from_secs(2);
/// Lease records the reaper reads from storage per page.
const PAGE: usize = 1_000;

/// Why a lease request failed.
#[derive(Debug)]
pub enum LeaseError {
    /// No such lease, or it ended.
    Gone(u64),
    /// It has as many keys as it may.
    Full(u64),
    /// A create found the key already holding its value, at this version,
    /// written outside the lease: the key is not attached.
    NotAttached(u64, u64),
    /// The record is not one this version reads.
    Damaged(String),
    Unavailable(String),
}

impl From<Unavailable> for LeaseError {
    fn from(e: Unavailable) -> LeaseError {
        LeaseError::Unavailable(e.0)
    }
}

impl std::fmt::Display for LeaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseError::Gone(id) => write!(f, "lease {id:016x} does not exist or has ended"),
            LeaseError::Full(id) => write!(
                f,
                "lease {id:016x} has {} keys attached, as many as a lease may",
                lease::KEYS_MAX
            ),
            LeaseError::NotAttached(id, version) => write!(
                f,
                "the key already held this value at version {version}, written outside lease \
                 {id:016x}: it is not attached to the lease (give each holder its own value)"
            ),
            LeaseError::Damaged(e) => write!(f, "the lease record cannot be read: {e}"),
            LeaseError::Unavailable(e) => f.write_str(e),
        }
    }
}

/// A lease as a request sees it.
#[derive(Clone, Debug)]
pub struct Shown {
    pub id: u64,
    pub version: u64,
    pub lease: Lease,
}

/// Whether a key takes the register's commands (no policy is bound to it);
/// `None` until the replica has loaded the cluster's policy bindings.
pub type IsRegister = Box<dyn Fn(&[u8]) -> Option<bool> + Send + Sync>;

/// The leases of one replica: its requests go through the replica's core.
pub struct Leases {
    requests: mpsc::Sender<ClientRequest>,
    storage: Storage,
    metrics: Arc<Metrics>,
    is_register: IsRegister,
}

impl Leases {
    pub fn new(
        requests: mpsc::Sender<ClientRequest>,
        storage: Storage,
        metrics: Arc<Metrics>,
        is_register: IsRegister,
    ) -> Leases {
        Leases {
            requests,
            storage,
            metrics,
            is_register,
        }
    }

    fn record<'a>(&'a self, key: &'a [u8]) -> SystemRecord<'a> {
        SystemRecord {
            requests: &self.requests,
            key,
            what: "the lease",
            timeout: CALL_TIMEOUT,
        }
    }

    /// Reads, edits and writes back lease `id`; `edit` refuses with a
    /// [`Refusal`], or returns whether it changed the lease.
    async fn edit(
        &self,
        id: u64,
        mut edit: impl FnMut(&mut Lease) -> Result<bool, Refusal>,
    ) -> Result<Shown, LeaseError> {
        let key = lease::key(id);
        let (version, lease) = self
            .record(&key)
            .update(|bytes| {
                let bytes = bytes.ok_or(LeaseError::Gone(id))?;
                let mut lease = Lease::decode(bytes).map_err(LeaseError::Damaged)?;
                let changed = edit(&mut lease).map_err(|r| match r {
                    Refusal::Gone => LeaseError::Gone(id),
                    Refusal::Full => LeaseError::Full(id),
                })?;
                Ok::<_, LeaseError>((changed.then(|| lease.encode()), lease))
            })
            .await?;
        Ok(Shown { id, version, lease })
    }

    /// A new lease of `ttl_ms` (already checked against the bounds).
    pub async fn grant(&self, ttl_ms: u64) -> Result<Shown, LeaseError> {
        let lease = Lease::new(ttl_ms);
        // Ids are random; one already taken (never, in practice) draws again.
        for _ in 0..4 {
            let id = u64::from_le_bytes(
                crate::storage::random_bytes::<8>()
                    .map_err(|e| LeaseError::Unavailable(e.to_string()))?,
            );
            let key = lease::key(id);
            if let Some(version) = self.record(&key).write(None, lease.encode()).await? {
                return Ok(Shown { id, version, lease });
            }
        }
        Err(LeaseError::Unavailable(
            "no free lease id in 4 draws".into(),
        ))
    }

    /// Lease `id` as it is now, read linearizably; ended leases too.
    pub async fn show(&self, id: u64) -> Result<Shown, LeaseError> {
        let key = lease::key(id);
        let (version, bytes) = self.record(&key).read().await?;
        let bytes = bytes.ok_or(LeaseError::Gone(id))?;
        let lease = Lease::decode(&bytes).map_err(LeaseError::Damaged)?;
        Ok(Shown { id, version, lease })
    }

    /// Keeps lease `id` alive for another `ttl_ms` from now.
    pub async fn keepalive(&self, id: u64) -> Result<Shown, LeaseError> {
        self.edit(id, |lease| lease.keepalive().map(|()| true))
            .await
    }

    /// Ends lease `id` and deletes its keys; the number deleted. A lease
    /// that ended already is swept again (what is left of it).
    pub async fn revoke(&self, id: u64) -> Result<usize, LeaseError> {
        let shown = self.edit(id, |lease| Ok(lease.end())).await?;
        Ok(self.sweep(id, shown.version, &shown.lease, false).await?)
    }

    /// Before writing `value` to `key` with lease `id`: the write under
    /// way, to hand to [`Leases::attached`] or [`Leases::abandon`].
    pub async fn begin_attach(
        &self,
        id: u64,
        key: &[u8],
        value: &[u8],
    ) -> Result<Pending, LeaseError> {
        let nonce = u64::from_le_bytes(
            crate::storage::random_bytes::<8>()
                .map_err(|e| LeaseError::Unavailable(e.to_string()))?,
        );
        let write = Pending::new(value, nonce);
        self.edit(id, |lease| lease.begin_attach(key, write).map(|()| true))
            .await?;
        Ok(write)
    }

    /// The write begun with [`Leases::begin_attach`] took effect: the key
    /// is at `version`, which the write made (`changed`) or found (a create
    /// of the value the key held). If the lease ended meanwhile, a write
    /// that changed the key is undone (deleted at that version) and the
    /// lease is [`LeaseError::Gone`]; a version the write found is attached
    /// only if it is this lease's ([`Lease::kept`]), else
    /// [`LeaseError::NotAttached`].
    pub async fn attached(
        &self,
        id: u64,
        key: &[u8],
        write: Pending,
        version: u64,
        changed: bool,
    ) -> Result<(), LeaseError> {
        let mut ours = true;
        let edited = self
            .edit(id, |lease| {
                if lease.ended {
                    return Err(Refusal::Gone);
                }
                if changed {
                    return Ok(lease.attached(key, write, version));
                }
                ours = lease.kept(key, write, version);
                Ok(true)
            })
            .await;
        match edited {
            Err(LeaseError::Gone(_)) if changed => {
                let undo = Command::DeleteIf { expected: version };
                self.carry_out(key, undo).await?;
                Err(LeaseError::Gone(id))
            }
            Ok(_) if !ours => Err(LeaseError::NotAttached(id, version)),
            other => other.map(|_| ()),
        }
    }

    /// The write begun with [`Leases::begin_attach`] did not take effect.
    pub async fn abandon(&self, id: u64, key: &[u8], write: Pending) {
        if let Err(e) = self.edit(id, |lease| Ok(lease.abandon(key, write))).await {
            // The entry stays; the sweep deletes the key only if it holds
            // this value.
            debug!(lease = format!("{id:016x}"), "abandoning an attach: {e}");
        }
    }

    /// Carries out `command` on `key`; whether it changed the key.
    async fn carry_out(&self, key: &[u8], command: Command) -> Result<bool, Unavailable> {
        let op = Operation::Command(command.encode());
        let c = node::call(&self.requests, key.to_vec(), op, CALL_TIMEOUT)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        match c.outcome {
            Outcome::Done(_) => Ok(c.trace.changed),
            Outcome::Rejected(..) => Ok(false),
            other => Err(Unavailable(failure(&other))),
        }
    }

    /// Deletes the keys of ended lease `id` (at `version`, as `lease`),
    /// then its record, unless writes to its keys are still under way and
    /// this is not the `last` sweep (the record is kept for them until
    /// [`lease::WRITES_WINDOW_MS`] after it ended); the number of keys
    /// deleted.
    async fn sweep(
        &self,
        id: u64,
        version: u64,
        lease: &Lease,
        last: bool,
    ) -> Result<usize, Unavailable> {
        let mut deleted = 0;
        let mut failed = None;
        let deadline = std::time::Instant::now() + SWEEP_BUDGET;
        for (key, attached) in &lease.keys {
            if std::time::Instant::now() > deadline {
                failed = Some(Unavailable("the sweep ran out of time".into()));
                break;
            }
            // A key bound to a policy since takes that policy's commands,
            // not the register's: it is left alone.
            match (self.is_register)(key) {
                Some(true) => {}
                Some(false) => continue,
                None => {
                    failed = Some(Unavailable("the policy bindings are not loaded yet".into()));
                    continue;
                }
            }
            match self.sweep_key(key, attached).await {
                Ok(true) => deleted += 1,
                Ok(false) => {}
                // The other keys go on; the record stays for the next try.
                Err(e) => failed = Some(e),
            }
        }
        self.metrics.lease_keys_deleted.inc_by(deleted as u64);
        if let Some(e) = failed {
            return Err(e);
        }
        if lease.writing() && !last {
            return Ok(deleted);
        }
        let key = lease::key(id);
        self.carry_out(&key, Command::DeleteIf { expected: version })
            .await?;
        Ok(deleted)
    }

    /// Deletes one attached key if it is still as the lease left it;
    /// whether it did.
    async fn sweep_key(&self, key: &[u8], attached: &Attached) -> Result<bool, Unavailable> {
        let command = match lease::sweep(attached) {
            Sweep::Command(c) => Some(c),
            Sweep::Read => {
                let op = Operation::Read(Consistency::Linearizable);
                let c = node::call(&self.requests, key.to_vec(), op, CALL_TIMEOUT)
                    .await
                    .map_err(|e| Unavailable(e.to_string()))?;
                let Outcome::Done(current) = c.outcome else {
                    return Err(Unavailable(failure(&c.outcome)));
                };
                let d = current.value.as_deref().map(digest);
                lease::sweep_read(attached, current.version, d)
            }
        };
        match command {
            Some(command) => self.carry_out(key, command).await,
            None => Ok(false),
        }
    }

    /// The reaper: every [`TICK`], each lease this replica holds a copy of
    /// is expired once due, and each ended one swept, until `closing`.
    pub async fn run(self: Arc<Self>, closing: Arc<AtomicBool>) {
        let mut expiry = Expiry::new();
        let mut sweeps = Sweeps::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !closing.load(Ordering::Relaxed) {
            tick.tick().await;
            if let Err(e) = self.reap(&mut expiry, &mut sweeps).await {
                debug!("lease reaper: {e}");
            }
        }
    }

    /// One look at every lease this replica holds.
    async fn reap(&self, expiry: &mut Expiry, sweeps: &mut Sweeps) -> Result<(), String> {
        let mut present = BTreeSet::new();
        let mut live = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let keys = self
                .storage
                .state_keys_in(lease::PREFIX, after.as_deref(), PAGE)
                .map_err(|e| e.to_string())?;
            let last = keys.len() < PAGE;
            for key in &keys {
                let Some(id) = lease::id_of(key) else {
                    continue;
                };
                // The listing waited for LMDB to hold what was logged
                // when it began: no need to wait again for each key.
                let committed = self.storage.committed_applied(key);
                let Some(committed) = committed.map_err(|e| e.to_string())? else {
                    continue;
                };
                let Some(bytes) = committed.value else {
                    continue;
                };
                let lease = match Lease::decode(&bytes) {
                    Ok(lease) => lease,
                    Err(e) => {
                        warn!(lease = format!("{id:016x}"), "lease record skipped: {e}");
                        continue;
                    }
                };
                present.insert(id);
                let now = mono_ms();
                expiry.observe(id, committed.version, now);
                let done = if lease.ended {
                    self.ended(id, committed.version, &lease, sweeps).await
                } else {
                    live += 1;
                    if expiry.due(id, committed.version, lease.ttl_ms, now) {
                        self.expire(id, expiry, sweeps).await
                    } else {
                        Ok(())
                    }
                };
                // One lease that cannot be expired or swept now does not
                // hold up the others.
                if let Err(e) = done {
                    debug!(lease = format!("{id:016x}"), "lease reaper: {e}");
                }
            }
            if last {
                break;
            }
            after = keys.last().cloned();
        }
        expiry.retain(&present);
        sweeps.retain(&present);
        self.metrics.leases_live.set(live);
        Ok(())
    }

    /// Ended lease `id` (at `version`): swept when [`Sweeps::due`] says.
    async fn ended(
        &self,
        id: u64,
        version: u64,
        lease: &Lease,
        sweeps: &mut Sweeps,
    ) -> Result<(), String> {
        let Some(last) = sweeps.due(id, mono_ms()) else {
            return Ok(());
        };
        self.sweep(id, version, lease, last)
            .await
            .map_err(|e| e.0)?;
        sweeps.swept(id);
        Ok(())
    }

    /// Lease `id` looked due by this replica's copy: read it, and end it if
    /// it has not changed for its whole time to live.
    async fn expire(
        &self,
        id: u64,
        expiry: &mut Expiry,
        sweeps: &mut Sweeps,
    ) -> Result<(), String> {
        let key = lease::key(id);
        let record = self.record(&key);
        let (version, bytes) = record.read().await.map_err(|e| e.0)?;
        let Some(bytes) = bytes else {
            return Ok(());
        };
        let mut lease = Lease::decode(&bytes)?;
        let now = mono_ms();
        expiry.observe(id, version, now);
        if lease.ended {
            // Ended by another replica: this one's copy is behind.
            return self.ended(id, version, &lease, sweeps).await;
        }
        if !expiry.due(id, version, lease.ttl_ms, now) {
            return Ok(());
        }
        lease.end();
        let Some(version) = record
            .write(Some(version), lease.encode())
            .await
            .map_err(|e| e.0)?
        else {
            // Kept alive (or ended by another replica) since the read.
            return Ok(());
        };
        self.metrics.lease_expiries.inc();
        debug!(lease = format!("{id:016x}"), "lease expired");
        sweeps.ending(id, mono_ms());
        self.sweep(id, version, &lease, false)
            .await
            .map_err(|e| e.0)?;
        sweeps.swept(id);
        Ok(())
    }
}

/// A lease id as clients write it: 16 hex digits.
pub fn parse_id(text: &str) -> Option<u64> {
    (text.len() == 16 && text.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(text, 16).ok())
        .flatten()
}

/// The version a key was attached at; `None` while its write is under way
/// (or its replica stopped before saying how it ended).
pub fn attached_version(attached: &Attached) -> Option<u64> {
    match attached {
        Attached::At(v) => Some(*v),
        Attached::Writing(_) => None,
    }
}
