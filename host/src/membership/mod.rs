//! Membership: which replicas vote, which only learn, and changing that on
//! a live cluster (see `docs/design.md`, section 11).
//!
//! The membership is the system key `\0ballot/members`, written through
//! consensus like every other key. A replica adopts a newer record when it
//! commits one, when a linearizable poll finds one, and when a peer's
//! frames carry a newer epoch (it then asks that peer for its committed
//! copy). At start it resumes from its own committed copy; the static
//! configuration only describes epoch 1, before any change.
//!
//! Changes (`ballot cluster add` / `remove`) queue in the record and run
//! one at a time, each through the stages of section 11. Any replica may
//! drive the queue: every stage is published by compare-and-swap on the
//! record, so two drivers never publish the same step twice. The lowest
//! voter resumes a queue nobody drives.
//!
//! Here: the replica's [`Membership`] and how it adopts records (durable
//! before the core runs them). `record` holds the record and which changes
//! may queue, `answers` the questions replicas ask each other, `tasks` what
//! a record asks of this replica (catch-up, sweep, replay, truncation), and
//! `driver` the stages of a change.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballot_core::{Outcome, ReplicaId};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::node::{ClientRequest, ConfigCommit, Control, Health, Mailbox};
use crate::storage::Storage;
use crate::transport::{ServiceCall, Transport};
use answers::{Answer, What};
pub use listing::KeyPage;

mod answers;
mod driver;
mod listing;
mod record;
mod tasks;

pub use crate::system::MEMBERS_KEY;
pub use answers::SERVICE_FORMAT;
pub use record::{
    Action, ChangeError, Done, Member, MemberChange, MembersRecord, Role, MEMBERS_FORMAT,
};
pub use tasks::CHANGELOG_KEEP_DEFAULT;

/// How often a replica checks the record by a linearizable read.
const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Longest a call through the core waits.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one stage of a change waits for the replicas it needs.
/// Questions from peers answered at once (each may read LMDB or run a
/// linearizable read).
const ANSWERS_MAX: usize = 64;
const STAGE_WAIT: Duration = Duration::from_millis(ballot_control::stages::STAGE_WAIT_MS);

/// Which background task a replica reports progress of. On the wire as
/// `catch-up`, `sweep` or `snapshot`; a name from a newer build reads as
/// `Other`, so its status still parses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// A learner reads every key from its peers.
    #[default]
    CatchUp,
    /// A voter re-proposes every key it holds under a new epoch.
    Sweep,
    /// A replica copies its peers' keys after its changelog cursor fell
    /// behind their truncation.
    Snapshot,
    #[serde(other)]
    Other,
}

/// How far a task is: `listing` the keys, `reading` them, or `done`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    #[default]
    Listing,
    Reading,
    Done,
    #[serde(other)]
    Other,
}

impl std::fmt::Display for TaskKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TaskKind::CatchUp => "catch-up",
            TaskKind::Sweep => "sweep",
            TaskKind::Snapshot => "snapshot",
            TaskKind::Other => "other",
        })
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Listing => "listing",
            Phase::Reading => "reading",
            Phase::Done => "done",
            Phase::Other => "other",
        })
    }
}

/// Progress of a catch-up, a sweep or a snapshot on one replica.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub task: TaskKind,
    pub epoch: u64,
    pub phase: Phase,
    pub keys_total: u64,
    pub keys_done: u64,
    /// Value bytes read.
    pub bytes: u64,
    pub started_ms: u64,
    pub updated_ms: u64,
}

/// One replica's membership state, as it reports it to others.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub id: ReplicaId,
    /// The epoch it runs (0: none yet).
    pub epoch: u64,
    /// The newest epoch whose sweep it finished.
    pub swept: u64,
    /// The newest epoch at which it finished catching up.
    pub caught_up: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// How far it has replayed each peer's changelog: (peer, seq).
    #[serde(default)]
    pub cursors: Vec<(ReplicaId, u64)>,
    /// The first and last entries of its own changelog.
    #[serde(default)]
    pub changelog: (u64, u64),
}

/// The membership view `GET /v1/cluster/members` returns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MembersView {
    pub version: u64,
    pub record: MembersRecord,
    /// Each replica's status, or why it did not answer.
    pub status: Vec<ReplicaStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub id: ReplicaId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Default)]
struct Local {
    /// The record this replica runs.
    record: Option<MembersRecord>,
    swept: u64,
    caught_up: u64,
    progress: Option<Progress>,
    /// Epoch of the catch-up or sweep running, if one is.
    catching_up: Option<u64>,
    sweeping: Option<u64>,
}

/// A replica's membership task and service.
pub struct Membership {
    me: ReplicaId,
    storage: Storage,
    requests: mpsc::Sender<ClientRequest>,
    control: Arc<Mailbox>,
    transport: Arc<Transport>,
    health: Arc<Health>,
    /// Epoch 1, from the static configuration; `None` for a replica
    /// started to join an existing cluster.
    bootstrap: Option<MembersRecord>,
    local: Mutex<Local>,
    /// Held by the task driving the change queue.
    driving: tokio::sync::Mutex<()>,
    /// The record version the driver's current stage was computed from.
    driving_version: std::sync::atomic::AtomicU64,
    changelog_keep: u64,
    /// A joining replica said that a peer refused its data directory.
    told_refused: std::sync::atomic::AtomicBool,
    /// Whether a classic quorum of voters was reachable, and when that
    /// was last looked at (`reaches_quorum`).
    reach: Mutex<(Option<std::time::Instant>, bool)>,
}

/// What a membership task is built from.
pub struct Setup {
    pub me: ReplicaId,
    pub storage: Storage,
    pub requests: mpsc::Sender<ClientRequest>,
    pub control: Arc<Mailbox>,
    pub transport: Arc<Transport>,
    pub health: Arc<Health>,
    pub bootstrap: Option<MembersRecord>,
    /// Changelog entries kept beyond what every member has replayed.
    pub changelog_keep: u64,
}

fn unavailable(outcome: &Outcome) -> ChangeError {
    ChangeError::Unavailable(crate::system_record::failure(outcome))
}

/// What a replica says when `peer` refuses its data directory.
pub fn lost_directory(me: ReplicaId, peer: ReplicaId, reason: &str) -> String {
    format!(
        "replica {peer} knows replica {me} by another data directory ({reason}). This \
         directory is new and will not vote: if replica {me} lost its data, remove it through \
         a healthy replica (ballot cluster remove --id {me}), then start it on an empty \
         directory with --join and add it again (ballot cluster add)"
    )
}

/// Longest member client URL named to clients.
pub const CLIENT_URL_MAX: usize = 256;

/// Whether `url` may be named to clients as a member's address: `http://`
/// or `https://` (any case) and a host, at most [`CLIENT_URL_MAX`] bytes of
/// visible ASCII, and no credentials (`user@`).
pub fn client_url_ok(url: &str) -> bool {
    let rest = ["http://", "https://"].iter().find_map(|scheme| {
        url.get(..scheme.len())
            .filter(|s| s.eq_ignore_ascii_case(scheme))
            .map(|_| &url[scheme.len()..])
    });
    url.len() <= CLIENT_URL_MAX
        && rest.is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
        && url.bytes().all(|b| b.is_ascii_graphic())
        && !url.contains('@')
}

/// The newest membership record this replica holds durably: its committed
/// copy of the system key, or the record it adopted from a peer (written
/// before the core ran its epoch), whichever has the newer epoch. The daemon
/// starts its protocol on it before the first step.
pub fn durable_record(storage: &Storage) -> Result<Option<MembersRecord>, String> {
    let committed = storage
        .committed(MEMBERS_KEY)
        .map_err(|e| e.to_string())?
        .and_then(|c| c.value)
        .map(|v| MembersRecord::decode(&v))
        .transpose()?;
    let adopted = storage
        .adopted_members()
        .map_err(|e| e.to_string())?
        .map(|v| MembersRecord::decode(&v))
        .transpose()?;
    // The committed copy when both have one epoch.
    Ok(adopted.into_iter().chain(committed).max_by_key(|r| r.epoch))
}

impl Membership {
    pub fn new(setup: Setup) -> Arc<Membership> {
        Arc::new(Membership {
            me: setup.me,
            storage: setup.storage,
            requests: setup.requests,
            control: setup.control,
            transport: setup.transport,
            health: setup.health,
            bootstrap: setup.bootstrap,
            local: Mutex::new(Local::default()),
            driving: tokio::sync::Mutex::new(()),
            driving_version: std::sync::atomic::AtomicU64::new(0),
            changelog_keep: setup.changelog_keep,
            told_refused: Default::default(),
            reach: Mutex::new((None, true)),
        })
    }

    /// The client URL of member `id`, if the record names one.
    pub fn http_of(&self, id: ReplicaId) -> Option<String> {
        let local = self.local.lock().expect("membership lock");
        let record = local.record.as_ref()?;
        record.replicas.iter().find(|m| m.id == id)?.http.clone()
    }

    /// The record this replica runs, if it runs one yet.
    pub fn record(&self) -> Option<MembersRecord> {
        self.local.lock().expect("membership lock").record.clone()
    }

    /// Whether this replica reaches a classic quorum of its voters
    /// (itself, when it votes, and the peers whose links are up), looked
    /// at again at most every 200 ms. A replica that does not can answer
    /// at once that a request would find no quorum, instead of letting it
    /// retry until it gives up.
    pub fn reaches_quorum(&self) -> bool {
        let mut reach = self.reach.lock().expect("reach lock");
        if reach
            .0
            .is_some_and(|at| at.elapsed() < Duration::from_millis(200))
        {
            return reach.1;
        }
        let up: std::collections::HashSet<ReplicaId> = self
            .transport
            .links()
            .into_iter()
            .filter(|(_, _, link)| link.up.load(std::sync::atomic::Ordering::Relaxed))
            .map(|(id, _, _)| id)
            .collect();
        let reaches = {
            let local = self.local.lock().expect("membership lock");
            match local.record.as_ref().or(self.bootstrap.as_ref()) {
                None => true,
                Some(record) => {
                    let voters = record.voters();
                    let reached = voters
                        .iter()
                        .filter(|&&v| v == self.me || up.contains(&v))
                        .count();
                    2 * reached > voters.len()
                }
            }
        };
        *reach = (Some(std::time::Instant::now()), reaches);
        reaches
    }

    /// This replica's status.
    pub fn status(&self) -> Status {
        let (mut status, peers) = {
            let local = self.local.lock().expect("membership lock");
            let peers = local.record.as_ref().map(|r| r.peers(self.me));
            // The epoch the core runs, with everything it stepped before
            // durable (`node::Driver::settling`), not merely the record
            // this replica made durable: the driver's stages wait on it.
            let status = Status {
                id: self.me,
                epoch: local
                    .record
                    .as_ref()
                    .map_or(0, |r| r.epoch.min(self.transport.epoch())),
                swept: local.swept,
                caught_up: local.caught_up,
                progress: local.progress.clone(),
                ..Status::default()
            };
            (status, peers.unwrap_or_default())
        };
        // LMDB reads outside the lock.
        status.cursors = peers
            .into_iter()
            .filter_map(|(p, _)| Some((p, self.storage.cursor(p).ok()?)))
            .collect();
        status.changelog = self.storage.changelog_bounds().unwrap_or((0, 0));
        status
    }

    /// Adopts `record` if it is newer than what this replica runs: makes
    /// it durable, tells the core, redials the peers, and starts what the
    /// record asks of this replica.
    ///
    /// The record reaches LMDB before the core hears of it, so the epoch a
    /// replica votes in is the one it resumes after a restart, whether the
    /// record came as a local commit or from a peer's copy.
    fn adopt(self: &Arc<Self>, record: MembersRecord) {
        {
            let mut local = self.local.lock().expect("membership lock");
            if local
                .record
                .as_ref()
                .is_some_and(|r| r.epoch >= record.epoch)
            {
                return;
            }
            let was_member = local
                .record
                .as_ref()
                .is_some_and(|r| r.role(self.me).is_some());
            if record.role(self.me).is_none() && !was_member {
                // Joining, not listed yet: keep asking the peers it was
                // started with.
                return;
            }
            if let Err(e) = self.admit_joiner(&record) {
                drop(local);
                self.transport.set_peers(&[]);
                self.health.stop(e);
                return;
            }
            if let Err(e) = self.storage.set_adopted_members(&record.encode()) {
                drop(local);
                self.health
                    .stop(format!("recording membership epoch {}: {e}", record.epoch));
                return;
            }
            // Replicas that left may come back on a new data directory.
            if let Some(old) = &local.record {
                for gone in old.replicas.iter().filter(|m| record.role(m.id).is_none()) {
                    if let Err(e) = self.storage.forget_peer_identity(gone.id) {
                        warn!(
                            peer = gone.id,
                            "forgetting a removed replica's directory: {e}"
                        );
                    }
                }
            }
            local.record = Some(record.clone());
            if record.role(self.me).is_none() {
                drop(local);
                self.removed(&record);
                return;
            }
        }
        self.transport.set_peers(&record.peers(self.me));
        self.control.send(Control::Members(record.members()));
    }

    /// A directory not admitted yet (it started with `--join`) is admitted
    /// by the first record that lists it as a learner: it then comes in
    /// through the learner stages. One listed as a voter already is a new
    /// directory under a voter's id (the voter lost its disk and was
    /// restarted with `--join`): it must not vote with an empty memory.
    fn admit_joiner(&self, record: &MembersRecord) -> Result<(), String> {
        if self.storage.admitted().map_err(|e| e.to_string())? {
            return Ok(());
        }
        match record.role(self.me) {
            Some(Role::Voter) => Err(format!(
                "this data directory is new, and membership epoch {} lists replica {} as a \
                 voter already: its earlier directory was lost, and this one will not vote. \
                 Remove it through a healthy replica (ballot cluster remove --id {}), then \
                 start it again on an empty directory with --join and add it \
                 (ballot cluster add)",
                record.epoch, self.me, self.me
            )),
            Some(Role::Learner) => self.storage.set_admitted().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// This replica is not in `record` any more: it stops answering.
    fn removed(&self, record: &MembersRecord) {
        self.transport.set_peers(&[]);
        self.health.stop(format!(
            "this replica was removed from the cluster at membership epoch {}",
            record.epoch
        ));
    }

    /// Follows the membership record until the daemon stops.
    pub async fn run(
        self: Arc<Self>,
        mut commits: watch::Receiver<ConfigCommit>,
        mut ahead: mpsc::Receiver<(ReplicaId, u64)>,
        mut service: mpsc::Receiver<ServiceCall>,
    ) {
        match durable_record(&self.storage) {
            Ok(Some(record)) if record.role(self.me).is_none() => {
                self.local.lock().expect("membership lock").record = Some(record.clone());
                self.removed(&record);
            }
            Ok(Some(record)) => {
                info!(
                    epoch = record.epoch,
                    "membership resumed from the local copy"
                );
                self.adopt(record)
            }
            Ok(None) => {}
            Err(e) => warn!("the local membership record is unreadable: {e}"),
        }
        if self.record().is_none() {
            if let Some(b) = self.bootstrap.clone() {
                self.adopt(b);
            } else {
                info!("joining: waiting for a peer to list this replica");
            }
        }
        tokio::spawn(self.clone().replay_loop());
        tokio::spawn(self.clone().truncate_loop(self.changelog_keep));
        // Questions are answered on their own task: answering must never
        // wait behind this replica's own polls and fetches, which ask its
        // peers the same kind of questions.
        // At most ANSWERS_MAX at once; past that, questions wait in their
        // (bounded) queue and the asking streams wait.
        let answering = self.clone();
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(ANSWERS_MAX));
            while let Some(call) = service.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let me = answering.clone();
                tokio::spawn(async move {
                    let answer = me.answer(call.from, &call.request).await;
                    let _ = call
                        .reply
                        .send(serde_json::to_vec(&answer).expect("serialises"));
                    drop(slot);
                });
            }
        });
        let fetching = self.clone();
        tokio::spawn(async move {
            while let Some((peer, epoch)) = ahead.recv().await {
                let mine = fetching.record().map_or(0, |r| r.epoch);
                if epoch > mine {
                    debug!(peer, epoch, mine, "a peer runs a newer epoch: fetching it");
                    fetching.fetch_from(peer).await;
                }
            }
        });
        let polling = self.clone();
        tokio::spawn(async move {
            let mut poll = tokio::time::interval(POLL_INTERVAL);
            loop {
                poll.tick().await;
                polling.clone().poll().await;
            }
        });
        while commits.changed().await.is_ok() {
            let c = commits.borrow_and_update().clone();
            if let (_, Some(value)) = c {
                match MembersRecord::decode(&value) {
                    Ok(record) => self.adopt(record),
                    Err(e) => warn!("a committed membership record is unreadable: {e}"),
                }
            }
        }
    }

    async fn fetch_from(self: &Arc<Self>, peer: ReplicaId) {
        match self.ask(peer, What::Members).await {
            Ok(Answer::Members {
                record: Some(record),
            }) => {
                if record.check().is_ok() {
                    self.adopt(record);
                }
            }
            Ok(_) => {}
            Err(e) => debug!(peer, "fetching the membership: {e}"),
        }
    }

    /// A joining replica that a peer refuses (it knows this id by another
    /// data directory) says so once: it stays out of every quorum until the
    /// peer forgets the old directory, which it does when it applies the
    /// removal.
    fn tell_refusals(&self) {
        for (peer, _, link) in self.transport.links() {
            let reason = link.refused_directory.lock().expect("link lock").clone();
            if let Some(reason) = reason {
                if !self
                    .told_refused
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    warn!(peer, "{}", lost_directory(self.me, peer, &reason));
                }
            }
        }
    }

    /// Asks every peer this replica has a link to for its record.
    async fn fetch_from_linked(self: &Arc<Self>) {
        for (peer, _, _) in self.transport.links() {
            self.fetch_from(peer).await;
        }
    }

    /// The periodic check: a linearizable read of the record while this
    /// replica is a member, its peers' copies while it is not (yet); and
    /// resuming a change queue nobody drives.
    async fn poll(self: Arc<Self>) {
        let record = self.record();
        let member = record.as_ref().is_some_and(|r| r.role(self.me).is_some());
        if !member {
            if self.health.fatal().is_some() {
                return;
            }
            self.fetch_from_linked().await;
            self.tell_refusals();
            return;
        }
        match self.read_record().await {
            Ok((_, Some(r))) => {
                let resume = ballot_control::stages::resumer(&r) == Some(self.me);
                self.adopt(r);
                if resume {
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.drive().await {
                            debug!("resuming membership changes: {e}");
                        }
                    });
                }
            }
            Ok((_, None)) => {}
            Err(e) => {
                // Peers on a newer epoch drop this replica's messages, so
                // its reads fail: ask them for the record directly.
                debug!("membership poll: {e}");
                self.fetch_from_linked().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::answers::Ask;
    use super::*;

    fn member(id: u32, role: Role) -> Member {
        Member {
            id,
            addr: ([127, 0, 0, 1], 7000 + id as u16).into(),
            http: None,
            role,
        }
    }

    /// The epoch a replica resumes is the newest it holds durably, whether
    /// it committed the record itself or adopted a peer's copy.
    #[test]
    fn a_replica_resumes_the_newest_durable_record() {
        let dir = std::env::temp_dir().join(format!("ballot-durable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (storage, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
        assert_eq!(durable_record(&storage).unwrap(), None);
        let mut committed =
            MembersRecord::bootstrap(vec![member(1, Role::Voter), member(2, Role::Voter)]);
        committed.epoch = 3;
        let write = ballot_core::Write {
            key: MEMBERS_KEY.to_vec(),
            state: vec![],
            commit: Some(ballot_core::Commit {
                version: 2,
                value: Some(committed.encode()),
            }),
        };
        storage.commit([write].to_vec()).unwrap();
        assert_eq!(durable_record(&storage).unwrap().unwrap().epoch, 3);
        // A newer record adopted from a peer wins; an older one does not.
        let mut fetched = committed.clone();
        fetched.epoch = 5;
        fetched.replicas.retain(|m| m.id == 1);
        storage.set_adopted_members(&fetched.encode()).unwrap();
        drop(storage);
        let (storage, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
        assert_eq!(durable_record(&storage).unwrap(), Some(fetched.clone()));
        fetched.epoch = 2;
        storage.set_adopted_members(&fetched.encode()).unwrap();
        assert_eq!(durable_record(&storage).unwrap(), Some(committed));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A replica's status reports the epoch its core runs (published once
    /// what the core stepped before it is durable), not the record it made
    /// durable a moment before the core heard of it: the membership driver
    /// starts the sweeps once every voter reports the classic-only epoch.
    #[tokio::test]
    async fn the_status_reports_no_epoch_the_core_does_not_run_yet() {
        let dir = std::env::temp_dir().join(format!("ballot-status-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (storage, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
        storage.set_admitted().unwrap();
        let pki = crate::transport::tests::Pki::new("status");
        let epoch = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let transport = pki.alone(1, mpsc::channel(1).0, metrics, epoch.clone());
        let membership = Membership::new(Setup {
            me: 1,
            storage,
            requests: mpsc::channel(1).0,
            control: Default::default(),
            transport: transport.clone(),
            health: Default::default(),
            bootstrap: None,
            changelog_keep: 16,
        });
        let mut record = MembersRecord::bootstrap(vec![member(1, Role::Voter)]);
        record.epoch = 2;
        record.fast = false;
        membership.adopt(record);
        assert_eq!(
            membership.status().epoch,
            1,
            "the status ran ahead of the core"
        );
        // Nor does it sweep for that epoch, whoever asks: its own listing
        // could miss a fast acceptance still on its way to LMDB.
        let early = tokio::time::timeout(Duration::from_millis(300), membership.sweep(2));
        assert!(early.await.is_err(), "swept before publishing the epoch");
        epoch.store(2, std::sync::atomic::Ordering::Release);
        assert_eq!(membership.status().epoch, 2);
        let sweep = tokio::time::timeout(Duration::from_secs(10), membership.sweep(2));
        assert_eq!(sweep.await.expect("the sweep ends"), Ok(()));
        transport.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn questions_and_answers_round_trip_through_json() {
        let status = Status {
            id: 3,
            epoch: 7,
            swept: 6,
            caught_up: 2,
            progress: Some(Progress {
                task: TaskKind::Sweep,
                epoch: 6,
                phase: Phase::Done,
                keys_total: 10,
                keys_done: 10,
                bytes: 99,
                started_ms: 1,
                updated_ms: 2,
            }),
            cursors: vec![(1, 40), (2, 41)],
            changelog: (5, 60),
        };
        let bytes = serde_json::to_vec(&Answer::Status(status.clone())).unwrap();
        // The task and phase keep the spelling they had as strings.
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains(r#""task":"sweep""#), "{text}");
        assert!(text.contains(r#""phase":"done""#), "{text}");
        let newer = text.replace(r#""task":"sweep""#, r#""task":"compaction""#);
        match serde_json::from_str(&newer).unwrap() {
            Answer::Status(back) => assert_eq!(back.progress.unwrap().task, TaskKind::Other),
            other => panic!("{other:?}"),
        }
        match serde_json::from_slice(&bytes).unwrap() {
            Answer::Status(back) => assert_eq!(back, status),
            other => panic!("{other:?}"),
        }
        let ask = Ask {
            format: SERVICE_FORMAT,
            what: What::Keys {
                after: Some(b"\0k".to_vec()),
                limit: 3,
                prefix: None,
                epoch: None,
            },
        };
        let text = serde_json::to_string(&ask).unwrap();
        // Without a prefix or an epoch, the question is what earlier builds
        // sent, byte for byte.
        assert_eq!(
            text,
            r#"{"format":1,"ask":"keys","after":[0,107],"limit":3}"#
        );
        let back: Ask = serde_json::from_str(&text).unwrap();
        assert!(matches!(back.what, What::Keys { limit: 3, .. }));
        let listing: Ask = serde_json::from_str(
            r#"{"format":1,"ask":"keys","after":null,"limit":37,"prefix":[97,47],"epoch":4}"#,
        )
        .unwrap();
        assert!(matches!(
            listing.what,
            What::Keys { limit: 37, prefix: Some(ref p), epoch: Some(4), .. } if p == b"a/"
        ));
        // An earlier build's answer carries no echo, so a listing does not
        // count it; a plain answer stays the bytes it was.
        let old: Answer =
            serde_json::from_str(r#"{"answer":"keys","keys":[[97]],"last":true}"#).unwrap();
        assert!(matches!(
            old,
            Answer::Keys {
                prefix: None,
                epoch: None,
                ..
            }
        ));
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"answer":"keys","keys":[[97]],"last":true}"#
        );
        let answer = Answer::Changes {
            first: 3,
            last: 4,
            entries: vec![(3, b"a".to_vec(), 1), (4, b"b".to_vec(), 9)],
        };
        let back: Answer = serde_json::from_slice(&serde_json::to_vec(&answer).unwrap()).unwrap();
        assert!(
            matches!(back, Answer::Changes { first: 3, last: 4, ref entries } if entries.len() == 2)
        );
    }

    #[test]
    fn only_plain_http_urls_are_named_to_clients() {
        assert!(client_url_ok("https://10.0.0.2:7001"));
        assert!(client_url_ok("http://replica-2.example:7001/"));
        assert!(client_url_ok("HTTPS://[::1]:8001"));
        for bad in [
            "",
            "replica-2:7001",
            "ftp://h",
            "https://",
            "http:///path",
            "https://user:secret@h:1",
            "https://h:1/a b",
            "https://h:1/\r\nx: y",
            "https://h/é",
        ] {
            assert!(!client_url_ok(bad), "{bad:?}");
        }
        let long = format!("https://h/{}", "a".repeat(CLIENT_URL_MAX));
        assert!(!client_url_ok(&long));
    }
}
