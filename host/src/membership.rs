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

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballot_core::register::Command;
use ballot_core::{Consistency, Members, Operation, Outcome, ReplicaId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::node::{self, ClientRequest, ConfigCommit, Control, Health};
use crate::storage::Storage;
use crate::system::now_ms;
use crate::transport::{ServiceCall, Transport};

pub use crate::system::MEMBERS_KEY;
/// Format of the membership record.
pub const MEMBERS_FORMAT: u32 = 1;
/// Format of the questions replicas ask each other about membership.
pub const SERVICE_FORMAT: u32 = 1;
/// How often a replica checks the record by a linearizable read.
const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Longest a call through the core waits.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys per catch-up listing page.
const PAGE: u32 = 1024;
/// Linearizable reads a catch-up or sweep keeps in flight.
const READS_IN_FLIGHT: usize = 32;
/// Longest one stage of a change waits for the replicas it needs.
const STAGE_WAIT: Duration = Duration::from_secs(300);
/// How often a replica replays its peers' changelogs.
const REPLAY_INTERVAL: Duration = Duration::from_secs(2);
/// How often a replica truncates its changelog.
const TRUNCATE_INTERVAL: Duration = Duration::from_secs(5);
/// Changelog entries kept by default beyond what every member replayed.
pub const CHANGELOG_KEEP_DEFAULT: u64 = 1_000_000;
/// Finished changes the record remembers.
const DONE_KEPT: usize = 32;

/// What a replica does in a configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Voter,
    Learner,
}

/// One replica of a configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: ReplicaId,
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Its client URL, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    pub role: Role,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Add,
    Remove,
}

/// A requested change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub action: Action,
    pub id: ReplicaId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// When it was asked for (ms since the Unix epoch); names the request.
    pub requested_ms: u64,
}

/// A finished change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub action: Action,
    pub id: ReplicaId,
    pub requested_ms: u64,
    /// The epoch that completed it.
    pub epoch: u64,
    pub finished_ms: u64,
    /// A join abandoned because the replica was removed before it finished.
    #[serde(default)]
    pub aborted: bool,
}

/// The record under [`MEMBERS_KEY`] (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersRecord {
    pub format: u32,
    pub epoch: u64,
    /// Whether the fast round is on (off while voters change).
    pub fast: bool,
    pub replicas: Vec<Member>,
    /// Changes not finished; the first is in progress.
    #[serde(default)]
    pub queue: Vec<Change>,
    #[serde(default)]
    pub done: Vec<Done>,
}

impl MembersRecord {
    /// Epoch 1: the replicas a new cluster is started with, all voters.
    pub fn bootstrap(mut replicas: Vec<Member>) -> MembersRecord {
        replicas.sort_by_key(|m| m.id);
        MembersRecord {
            format: MEMBERS_FORMAT,
            epoch: 1,
            fast: true,
            replicas,
            queue: Vec::new(),
            done: Vec::new(),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<MembersRecord, String> {
        let r: MembersRecord = serde_json::from_slice(bytes)
            .map_err(|e| format!("the membership record is malformed: {e}"))?;
        r.check()?;
        Ok(r)
    }

    /// Checks the format and the shape of the membership it describes.
    fn check(&self) -> Result<(), String> {
        if self.format != MEMBERS_FORMAT {
            return Err(format!(
                "membership record format {} is not supported (this build reads {MEMBERS_FORMAT})",
                self.format
            ));
        }
        self.members().validate()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record serialises")
    }

    /// The protocol's view of it.
    pub fn members(&self) -> Members {
        let ids = |role: Role| -> Vec<ReplicaId> {
            self.replicas
                .iter()
                .filter(|m| m.role == role)
                .map(|m| m.id)
                .collect()
        };
        Members {
            epoch: self.epoch,
            voters: ids(Role::Voter),
            learners: ids(Role::Learner),
            fast: self.fast,
        }
    }

    pub fn voters(&self) -> Vec<ReplicaId> {
        self.members().voters
    }

    pub fn role(&self, id: ReplicaId) -> Option<Role> {
        self.replicas.iter().find(|m| m.id == id).map(|m| m.role)
    }

    /// Every replica but `me`: (id, address).
    pub fn peers(&self, me: ReplicaId) -> Vec<(ReplicaId, SocketAddr)> {
        self.replicas
            .iter()
            .filter(|m| m.id != me)
            .map(|m| (m.id, m.addr))
            .collect()
    }

    /// The next epoch, with `edit` applied.
    fn next(&self, edit: impl FnOnce(&mut MembersRecord)) -> MembersRecord {
        let mut next = self.clone();
        next.epoch += 1;
        edit(&mut next);
        next.replicas.sort_by_key(|m| m.id);
        next
    }

    /// Ends the first queued change.
    fn finish(&mut self, aborted: bool) {
        if self.queue.is_empty() {
            return;
        }
        let c = self.queue.remove(0);
        self.done.push(Done {
            action: c.action,
            id: c.id,
            requested_ms: c.requested_ms,
            epoch: self.epoch,
            finished_ms: now_ms(),
            aborted,
        });
        let over = self.done.len().saturating_sub(DONE_KEPT);
        self.done.drain(..over);
    }
}

/// Progress of a catch-up or a sweep on one replica.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// `catch-up` or `sweep`.
    pub task: String,
    pub epoch: u64,
    /// `listing`, `reading` or `done`.
    pub phase: String,
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

/// A question from one replica to another.
#[derive(Debug, Serialize, Deserialize)]
struct Ask {
    format: u32,
    #[serde(flatten)]
    what: What,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "ask", rename_all = "kebab-case")]
enum What {
    /// Your committed membership record.
    Members,
    /// Your [`Status`].
    Status,
    /// Keys you hold protocol state for, after `after`.
    Keys { after: Option<Vec<u8>>, limit: u32 },
    /// Read every key you hold state for, then report `swept` = epoch.
    Sweep { epoch: u64 },
    /// Read every key a quorum of voters holds, then report `caught_up`.
    CatchUp { epoch: u64 },
    /// Your changelog entries after `after`: (seq, key, version).
    Changes { after: u64, limit: u32 },
    /// Your committed keys after `after`, with versions: the snapshot a
    /// replica behind your changelog's start replays.
    Versions { after: Option<Vec<u8>>, limit: u32 },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "kebab-case")]
enum Answer {
    Members {
        record: Option<MembersRecord>,
    },
    Status(Status),
    Keys {
        keys: Vec<Vec<u8>>,
        last: bool,
    },
    Started,
    Changes {
        first: u64,
        last: u64,
        entries: Vec<(u64, Vec<u8>, u64)>,
    },
    Versions {
        /// The last changelog entry when this page was read.
        seq: u64,
        entries: Vec<(Vec<u8>, u64)>,
        last: bool,
    },
    Error {
        message: String,
    },
}

/// Why a membership change was refused or has not finished.
#[derive(Debug)]
pub enum ChangeError {
    Invalid(String),
    Unavailable(String),
    /// The record changed while a stage waited: start from the top.
    Superseded,
}

impl std::fmt::Display for ChangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChangeError::Invalid(m) | ChangeError::Unavailable(m) => f.write_str(m),
            ChangeError::Superseded => f.write_str("the membership record changed meanwhile"),
        }
    }
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
    control: mpsc::UnboundedSender<Control>,
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
}

/// What a membership task is built from.
pub struct Setup {
    pub me: ReplicaId,
    pub storage: Storage,
    pub requests: mpsc::Sender<ClientRequest>,
    pub control: mpsc::UnboundedSender<Control>,
    pub transport: Arc<Transport>,
    pub health: Arc<Health>,
    pub bootstrap: Option<MembersRecord>,
    /// Changelog entries kept beyond what every member has replayed.
    pub changelog_keep: u64,
}

fn unavailable(outcome: &Outcome) -> ChangeError {
    match outcome {
        Outcome::Failed(f) => ChangeError::Unavailable(f.message.clone()),
        Outcome::Rejected(r, _) => ChangeError::Unavailable(format!("{}: {}", r.code, r.message)),
        Outcome::Done(_) => ChangeError::Unavailable("unexpected success".into()),
    }
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
        })
    }

    /// The record this replica runs, if it runs one yet.
    pub fn record(&self) -> Option<MembersRecord> {
        self.local.lock().expect("membership lock").record.clone()
    }

    /// This replica's status.
    pub fn status(&self) -> Status {
        let (mut status, peers) = {
            let local = self.local.lock().expect("membership lock");
            let peers = local.record.as_ref().map(|r| r.peers(self.me));
            let status = Status {
                id: self.me,
                epoch: local.record.as_ref().map_or(0, |r| r.epoch),
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
        let _ = self.control.send(Control::Members(record.members()));
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
        mut commits: mpsc::UnboundedReceiver<ConfigCommit>,
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
        let answering = self.clone();
        tokio::spawn(async move {
            while let Some(call) = service.recv().await {
                let me = answering.clone();
                tokio::spawn(async move {
                    let answer = me.answer(call.from, &call.request).await;
                    let _ = call
                        .reply
                        .send(serde_json::to_vec(&answer).expect("serialises"));
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
        while let Some(c) = commits.recv().await {
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
                let resume = !r.queue.is_empty() && r.voters().first() == Some(&self.me);
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

    async fn ask(&self, peer: ReplicaId, what: What) -> Result<Answer, String> {
        if peer == self.me {
            return Err("asked itself".into());
        }
        let ask = Ask {
            format: SERVICE_FORMAT,
            what,
        };
        let bytes = serde_json::to_vec(&ask).expect("serialises");
        let answer = self.transport.request(peer, &bytes).await?;
        match serde_json::from_slice(&answer) {
            Ok(Answer::Error { message }) => Err(format!("replica {peer}: {message}")),
            Ok(a) => Ok(a),
            Err(e) => Err(format!("replica {peer} answered malformed JSON: {e}")),
        }
    }

    /// Answers a peer's question.
    async fn answer(self: &Arc<Self>, from: ReplicaId, request: &[u8]) -> Answer {
        let ask: Ask = match serde_json::from_slice(request) {
            Ok(a) => a,
            Err(e) => {
                return Answer::Error {
                    message: format!("malformed request: {e}"),
                }
            }
        };
        if ask.format != SERVICE_FORMAT {
            return Answer::Error {
                message: format!(
                    "request format {} is not supported (this build speaks {SERVICE_FORMAT})",
                    ask.format
                ),
            };
        }
        // Only members are answered, and only about epochs this replica
        // knows: a certificate from the cluster CA says who is asking, not
        // that it may ask (a replica removed, or one never added, could
        // otherwise start sweeps, list keys or, with an epoch from the
        // future, mark a sweep done that never ran). The committed record
        // is answered to anyone certified: it is no secret, and a replica
        // removed while it was down learns its removal only this way.
        if matches!(ask.what, What::Members) {
            return self.local_answer(from, ask.what);
        }
        let Some(record) = self.record().or_else(|| self.bootstrap.clone()) else {
            return Answer::Error {
                message: "this replica has no membership record yet".into(),
            };
        };
        if record.role(from).is_none() {
            return Answer::Error {
                message: format!("replica {from} is not a member at epoch {}", record.epoch),
            };
        }
        if let What::Sweep { epoch } | What::CatchUp { epoch } = &ask.what {
            if *epoch > record.epoch {
                return Answer::Error {
                    message: format!(
                        "epoch {epoch} is newer than this replica's membership (epoch {})",
                        record.epoch
                    ),
                };
            }
        }
        self.local_answer(from, ask.what)
    }

    fn local_answer(self: &Arc<Self>, from: ReplicaId, what: What) -> Answer {
        match what {
            What::Members => Answer::Members {
                record: self.committed_record(),
            },
            What::Status => Answer::Status(self.status()),
            What::Keys { after, limit } => {
                let limit = page_limit(limit);
                match self.storage.state_keys(after.as_deref(), limit) {
                    Ok(keys) => Answer::Keys {
                        last: keys.len() < limit,
                        keys,
                    },
                    Err(e) => Answer::Error {
                        message: e.to_string(),
                    },
                }
            }
            What::Sweep { epoch } => {
                debug!(from, epoch, "asked to sweep");
                self.start_task(epoch, false);
                Answer::Started
            }
            What::CatchUp { epoch } => {
                debug!(from, epoch, "asked to catch up");
                self.start_task(epoch, true);
                Answer::Started
            }
            What::Changes { after, limit } => {
                let limit = page_limit(limit);
                let page = self.storage.changelog_bounds().and_then(|(first, last)| {
                    let changes = self.storage.changes(after + 1, limit)?;
                    Ok((first, last, changes))
                });
                match page {
                    Ok((first, last, changes)) => Answer::Changes {
                        first,
                        last,
                        entries: changes
                            .into_iter()
                            .map(|c| (c.seq, c.key, c.committed.version))
                            .collect(),
                    },
                    Err(e) => Answer::Error {
                        message: e.to_string(),
                    },
                }
            }
            What::Versions { after, limit } => {
                let limit = page_limit(limit);
                let page = self.storage.changelog_bounds().and_then(|(_, seq)| {
                    Ok((seq, self.storage.versions(after.as_deref(), limit)?))
                });
                match page {
                    Ok((seq, entries)) => Answer::Versions {
                        seq,
                        last: entries.len() < limit,
                        entries,
                    },
                    Err(e) => Answer::Error {
                        message: e.to_string(),
                    },
                }
            }
        }
    }

    /// This replica's durable copy of the record (or epoch 1 if none).
    fn committed_record(&self) -> Option<MembersRecord> {
        match durable_record(&self.storage) {
            Ok(Some(r)) => Some(r),
            _ => self.bootstrap.clone(),
        }
    }

    /// Starts a catch-up or a sweep for `epoch` unless one runs or is done.
    fn start_task(self: &Arc<Self>, epoch: u64, catch_up: bool) {
        {
            let mut local = self.local.lock().expect("membership lock");
            let (done, running) = if catch_up {
                (local.caught_up, &mut local.catching_up)
            } else {
                (local.swept, &mut local.sweeping)
            };
            if done >= epoch || running.is_some_and(|e| e >= epoch) {
                return;
            }
            *running = Some(epoch);
        }
        let me = self.clone();
        tokio::spawn(async move {
            let result = if catch_up {
                me.catch_up(epoch).await
            } else {
                me.sweep(epoch).await
            };
            let mut local = me.local.lock().expect("membership lock");
            if catch_up {
                local.catching_up = None;
            } else {
                local.sweeping = None;
            }
            match result {
                Ok(()) if catch_up => local.caught_up = local.caught_up.max(epoch),
                Ok(()) => local.swept = local.swept.max(epoch),
                Err(e) => warn!(epoch, catch_up, "membership task stopped: {e}"),
            }
        });
    }

    fn set_progress(&self, edit: impl FnOnce(&mut Progress)) {
        let mut local = self.local.lock().expect("membership lock");
        if let Some(p) = local.progress.as_mut() {
            edit(p);
            p.updated_ms = now_ms();
        }
    }

    /// The reading phase of a task [`Self::begin`] started: reads `keys`
    /// with progress, then marks the task done. Returns how many there were.
    async fn read_tracked(&self, keys: Vec<Vec<u8>>) -> Result<u64, String> {
        let total = keys.len() as u64;
        self.set_progress(|p| {
            p.keys_total = total;
            p.phase = "reading".into();
        });
        self.read_keys(keys, true).await?;
        self.set_progress(|p| p.phase = "done".into());
        Ok(total)
    }

    /// Reads `keys` linearizably, [`READS_IN_FLIGHT`] at a time, retrying
    /// each until it succeeds; counts them in the progress if `counted`.
    async fn read_keys(&self, keys: Vec<Vec<u8>>, counted: bool) -> Result<(), String> {
        let mut reads = tokio::task::JoinSet::new();
        let mut keys = keys.into_iter();
        loop {
            while reads.len() < READS_IN_FLIGHT {
                let Some(key) = keys.next() else { break };
                reads.spawn(read_key(self.requests.clone(), self.health.clone(), key));
            }
            let Some(r) = reads.join_next().await else {
                return Ok(());
            };
            let bytes = r.map_err(|e| e.to_string())??;
            if counted {
                self.set_progress(|p| {
                    p.keys_done += 1;
                    p.bytes += bytes;
                });
            }
        }
    }

    fn begin(&self, task: &str, epoch: u64) {
        let now = now_ms();
        self.local.lock().expect("membership lock").progress = Some(Progress {
            task: task.into(),
            epoch,
            phase: "listing".into(),
            started_ms: now,
            updated_ms: now,
            ..Progress::default()
        });
    }

    /// The sweep of section 11: a linearizable read of every key this
    /// replica holds state for, which finishes any open slot where it holds
    /// an acceptance.
    async fn sweep(self: &Arc<Self>, epoch: u64) -> Result<(), String> {
        self.begin("sweep", epoch);
        let keys = self.list(self.me).await?;
        let started = Instant::now();
        let total = self.read_tracked(keys).await?;
        info!(
            epoch,
            keys = total,
            ms = started.elapsed().as_millis() as u64,
            "sweep finished"
        );
        Ok(())
    }

    /// A learner's catch-up: the keys a quorum of voters hold state for
    /// (their union covers every chosen value), each read linearizably, so
    /// every value arrives confirmed by a quorum. Restarts if the voters
    /// change under it.
    async fn catch_up(self: &Arc<Self>, epoch: u64) -> Result<(), String> {
        loop {
            let record = self.record().ok_or("no membership yet")?;
            let voters = record.voters();
            let quorum = ballot_core::quorum_classic(voters.len());
            self.begin("catch-up", epoch);
            let mut keys: BTreeSet<Vec<u8>> = BTreeSet::new();
            let mut ends = Vec::new();
            let mut listed = 0;
            let deadline = Instant::now() + STAGE_WAIT;
            while listed < quorum {
                listed = 0;
                ends.clear();
                for &v in &voters {
                    if listed >= quorum {
                        break;
                    }
                    // Where the voter's changelog ends before the listing:
                    // anything it commits later, replay finds after that.
                    let end = match self.status_of(v).await {
                        Ok(s) => s.changelog.1,
                        Err(e) => {
                            debug!(voter = v, "listing keys: {e}");
                            continue;
                        }
                    };
                    match self.list(v).await {
                        Ok(k) => {
                            keys.extend(k);
                            listed += 1;
                            ends.push((v, end));
                        }
                        Err(e) => debug!(voter = v, "listing keys: {e}"),
                    }
                }
                if listed < quorum {
                    if Instant::now() > deadline {
                        return Err(format!(
                            "fewer than {quorum} voters answered for the key listing"
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            let started = Instant::now();
            let total = self.read_tracked(keys.into_iter().collect()).await?;
            if self.record().map(|r| r.voters()) != Some(voters) {
                info!(
                    epoch,
                    "the voters changed during the catch-up: starting again"
                );
                continue;
            }
            // What those voters had logged by the listing is now here: their
            // changelog replay starts after it, not with a snapshot.
            for (v, end) in ends {
                if v != self.me && self.storage.cursor(v).map_err(|e| e.to_string())? < end {
                    self.storage.set_cursor(v, end).map_err(|e| e.to_string())?;
                }
            }
            info!(
                epoch,
                keys = total,
                ms = started.elapsed().as_millis() as u64,
                "catch-up finished"
            );
            return Ok(());
        }
    }

    /// Every key `voter` holds state for, page by page.
    async fn list(&self, voter: ReplicaId) -> Result<Vec<Vec<u8>>, String> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let what = What::Keys {
                after: after.clone(),
                limit: PAGE,
            };
            let (keys, last) = if voter == self.me {
                let page = self
                    .storage
                    .state_keys(after.as_deref(), PAGE as usize)
                    .map_err(|e| e.to_string())?;
                let last = page.len() < PAGE as usize;
                (page, last)
            } else {
                match self.ask(voter, what).await? {
                    Answer::Keys { keys, last } => (keys, last),
                    other => return Err(format!("unexpected answer {other:?}")),
                }
            };
            after = keys.last().cloned();
            out.extend(keys);
            if last || after.is_none() {
                return Ok(out);
            }
        }
    }

    // ----- changelog replay and truncation -------------------------------

    /// Every [`REPLAY_INTERVAL`], replays each peer's changelog from this
    /// replica's cursor: a key the peer committed at a newer version than
    /// this replica holds is read linearizably (the protocol learns it).
    /// A replica whose cursor is older than the peer's changelog reaches
    /// back replays the peer's snapshot (every key with its version)
    /// instead. This is how a replica that was down catches up.
    async fn replay_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(REPLAY_INTERVAL).await;
            let Some(record) = self.record() else {
                continue;
            };
            if record.role(self.me).is_none() || self.health.fatal().is_some() {
                continue;
            }
            for (peer, _) in record.peers(self.me) {
                if let Err(e) = self.replay_from(peer, record.epoch).await {
                    debug!(peer, "replaying the changelog: {e}");
                }
            }
        }
    }

    fn local_version(&self, key: &[u8]) -> Result<u64, String> {
        Ok(self
            .storage
            .committed(key)
            .map_err(|e| e.to_string())?
            .map_or(0, |c| c.version))
    }

    async fn replay_from(&self, peer: ReplicaId, epoch: u64) -> Result<(), String> {
        let mut cursor = self.storage.cursor(peer).map_err(|e| e.to_string())?;
        loop {
            let what = What::Changes {
                after: cursor,
                limit: PAGE,
            };
            let Answer::Changes {
                first,
                last,
                entries,
            } = self.ask(peer, what).await?
            else {
                return Err("unexpected answer".into());
            };
            if first > cursor + 1 || last < cursor {
                // Truncated past this replica's cursor (or the peer's
                // store is newer than the cursor): replay its snapshot.
                cursor = self.replay_snapshot(peer, epoch).await?;
            } else {
                let Some(&(newest, _, _)) = entries.last() else {
                    return Ok(());
                };
                let mut stale = Vec::new();
                for (_, key, version) in &entries {
                    if self.local_version(key)? < *version && !stale.contains(key) {
                        stale.push(key.clone());
                    }
                }
                self.read_keys(stale, false).await?;
                cursor = newest;
            }
            self.storage
                .set_cursor(peer, cursor)
                .map_err(|e| e.to_string())?;
            if cursor >= last {
                return Ok(());
            }
        }
    }

    /// Replays `peer`'s snapshot; returns the changelog position it was
    /// taken at (later commits are in the changelog after it).
    async fn replay_snapshot(&self, peer: ReplicaId, epoch: u64) -> Result<u64, String> {
        info!(peer, "behind the peer's changelog: replaying its snapshot");
        self.begin("snapshot", epoch);
        let started = Instant::now();
        let mut seq = None;
        let mut after = None;
        let mut stale = Vec::new();
        loop {
            let what = What::Versions {
                after: after.clone(),
                limit: PAGE,
            };
            let Answer::Versions {
                seq: at,
                entries,
                last,
            } = self.ask(peer, what).await?
            else {
                return Err("unexpected answer".into());
            };
            seq.get_or_insert(at);
            after = entries.last().map(|(k, _)| k.clone());
            for (key, version) in entries {
                if self.local_version(&key)? < version {
                    stale.push(key);
                }
            }
            if last || after.is_none() {
                break;
            }
        }
        let total = self.read_tracked(stale).await?;
        info!(
            peer,
            keys = total,
            ms = started.elapsed().as_millis() as u64,
            "snapshot replayed"
        );
        Ok(seq.unwrap_or(0))
    }

    /// Every [`TRUNCATE_INTERVAL`], drops the changelog entries every
    /// other member has replayed, and in any case all but the newest
    /// `keep` (a member down for long then replays a snapshot).
    async fn truncate_loop(self: Arc<Self>, keep: u64) {
        loop {
            tokio::time::sleep(TRUNCATE_INTERVAL).await;
            let Some(record) = self.record() else {
                continue;
            };
            if record.role(self.me).is_none() {
                continue;
            }
            let Ok((first, last)) = self.storage.changelog_bounds() else {
                continue;
            };
            let mut everyone_has = last;
            for (peer, _) in record.peers(self.me) {
                let cursor = match self.status_of(peer).await {
                    Ok(s) => s
                        .cursors
                        .iter()
                        .find(|(p, _)| *p == self.me)
                        .map_or(0, |(_, c)| *c),
                    Err(_) => 0,
                };
                everyone_has = everyone_has.min(cursor);
            }
            let upto = everyone_has.max(last.saturating_sub(keep));
            if upto < first {
                continue;
            }
            let storage = self.storage.clone();
            match tokio::task::spawn_blocking(move || storage.truncate_changelog(upto)).await {
                Ok(Ok(dropped)) if dropped > 0 => {
                    debug!(upto, dropped, everyone_has, "changelog truncated")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!("truncating the changelog: {e}"),
                Err(e) => warn!("truncating the changelog: {e}"),
            }
        }
    }

    // ----- changes ------------------------------------------------------

    async fn read_record(&self) -> Result<(u64, Option<MembersRecord>), ChangeError> {
        let c = node::call(
            &self.requests,
            MEMBERS_KEY.to_vec(),
            Operation::Read(Consistency::Linearizable),
            CALL_TIMEOUT,
        )
        .await
        .map_err(ChangeError::Unavailable)?;
        match c.outcome {
            Outcome::Done(current) => match current.value {
                Some(v) => Ok((
                    current.version,
                    Some(MembersRecord::decode(&v).map_err(ChangeError::Unavailable)?),
                )),
                None => Ok((current.version, None)),
            },
            other => Err(unavailable(&other)),
        }
    }

    /// The record as the cluster has it (epoch 1 before any change).
    async fn current(&self) -> Result<(u64, MembersRecord), ChangeError> {
        let (version, record) = self.read_record().await?;
        match record.or_else(|| self.bootstrap.clone()) {
            Some(r) => Ok((version, r)),
            None => Err(ChangeError::Unavailable(
                "this replica does not know the membership yet".into(),
            )),
        }
    }

    /// Writes `next` if the record is still at `version`; false if someone
    /// changed it first.
    async fn publish(&self, version: u64, next: &MembersRecord) -> Result<bool, ChangeError> {
        let value = next.encode();
        let command = if version == 0 {
            Command::Create(value)
        } else {
            Command::Cas {
                expected: version,
                value,
            }
        };
        let c = node::call(
            &self.requests,
            MEMBERS_KEY.to_vec(),
            Operation::Command(command.encode()),
            CALL_TIMEOUT,
        )
        .await
        .map_err(ChangeError::Unavailable)?;
        match c.outcome {
            Outcome::Done(_) => {
                info!(
                    epoch = next.epoch,
                    voters = ?next.members().voters,
                    learners = ?next.members().learners,
                    fast = next.fast,
                    "membership epoch published"
                );
                Ok(true)
            }
            Outcome::Rejected(..) => Ok(false),
            other => Err(unavailable(&other)),
        }
    }

    /// Queues a change, starts driving the queue, and returns the change
    /// as queued.
    pub async fn request(self: &Arc<Self>, change: Change) -> Result<Change, ChangeError> {
        for _ in 0..16 {
            let (version, mut record) = self.current().await?;
            let queued = record
                .queue
                .iter()
                .find(|c| c.id == change.id && c.action == change.action)
                .cloned();
            if let Some(c) = queued {
                // Asked again: the same change, still under way.
                self.spawn_driver();
                return Ok(c);
            }
            check(&record, &change)?;
            if change.action == Action::Remove {
                if change.id == self.me {
                    return Err(ChangeError::Invalid(format!(
                        "replica {} cannot drive its own removal; ask another replica",
                        self.me
                    )));
                }
                if record.role(change.id) == Some(Role::Voter) {
                    self.check_quorum_left(&record, change.id).await?;
                }
            }
            // Removing a replica whose join is under way abandons the join.
            if change.action == Action::Remove {
                if let Some(i) = record
                    .queue
                    .iter()
                    .position(|c| c.id == change.id && c.action == Action::Add)
                {
                    let join = record.queue.remove(i);
                    record.done.push(Done {
                        action: Action::Add,
                        id: join.id,
                        requested_ms: join.requested_ms,
                        epoch: record.epoch,
                        finished_ms: now_ms(),
                        aborted: true,
                    });
                }
            }
            record.queue.push(change.clone());
            // Queuing does not change the epoch.
            if self.publish(version, &record).await? {
                self.spawn_driver();
                return Ok(change);
            }
        }
        Err(ChangeError::Unavailable(
            "the membership kept changing under this request; try again".into(),
        ))
    }

    fn spawn_driver(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.drive().await {
                warn!("membership change paused: {e}; it resumes on the next request or poll");
            }
        });
    }

    /// Runs queued changes until the queue is empty.
    async fn drive(self: Arc<Self>) -> Result<(), ChangeError> {
        let Ok(_driving) = self.driving.try_lock() else {
            return Ok(());
        };
        loop {
            let (version, record) = self.current().await?;
            self.driving_version
                .store(version, std::sync::atomic::Ordering::Release);
            match self.advance(&record).await {
                Ok(Some(next)) => {
                    // Published or overtaken: read again either way.
                    self.publish(version, &next).await?;
                }
                Ok(None) => return Ok(()),
                Err(ChangeError::Superseded) => {
                    debug!("the membership record changed during a stage: starting it again");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next record for the change at the head of `record`'s queue,
    /// once what that step waits for holds; `None` when the queue is
    /// empty and everyone runs the record.
    async fn advance(
        self: &Arc<Self>,
        record: &MembersRecord,
    ) -> Result<Option<MembersRecord>, ChangeError> {
        {
            // Nothing starts until everyone named runs the current epoch
            // (section 11, "two changes apart").
            let everyone: Vec<ReplicaId> = record.replicas.iter().map(|m| m.id).collect();
            let Some(change) = record.queue.first().cloned() else {
                self.wait_for(&everyone, "run", |s| s.epoch >= record.epoch)
                    .await?;
                return Ok(None);
            };
            let leaving = (change.action == Action::Remove).then_some(change.id);
            let needed: Vec<ReplicaId> = everyone
                .iter()
                .copied()
                .filter(|&id| Some(id) != leaving)
                .collect();
            self.wait_for(&needed, "run", |s| s.epoch >= record.epoch)
                .await?;
            let next = match (change.action, record.role(change.id)) {
                (Action::Add, None) => record.next(|r| {
                    r.replicas.push(Member {
                        id: change.id,
                        addr: change.addr.expect("checked when queued"),
                        http: change.http.clone(),
                        role: Role::Learner,
                    })
                }),
                (Action::Add, Some(Role::Learner)) if record.fast => {
                    let target = record.epoch;
                    let me = self.clone();
                    let id = change.id;
                    self.wait_for_retrying(
                        &[change.id],
                        "catch up",
                        |s| s.caught_up >= target,
                        || {
                            let me = me.clone();
                            async move { me.tell(id, What::CatchUp { epoch: target }).await }
                        },
                    )
                    .await?;
                    record.next(|r| r.fast = false)
                }
                (Action::Add, Some(Role::Learner)) => {
                    self.sweep_voters(record, None).await?;
                    record.next(|r| {
                        for m in &mut r.replicas {
                            if m.id == change.id {
                                m.role = Role::Voter;
                            }
                        }
                        r.fast = true;
                        r.finish(false);
                    })
                }
                (Action::Add, Some(Role::Voter)) => record.next(|r| r.finish(false)),
                (Action::Remove, None) => record.next(|r| r.finish(false)),
                (Action::Remove, Some(Role::Learner)) => record.next(|r| {
                    r.replicas.retain(|m| m.id != change.id);
                    r.finish(false);
                }),
                (Action::Remove, Some(Role::Voter)) if record.fast => {
                    match self.check_quorum_left(record, change.id).await {
                        Ok(()) => record.next(|r| r.fast = false),
                        Err(e) => {
                            warn!("membership change abandoned: {e}");
                            record.next(|r| r.finish(true))
                        }
                    }
                }
                (Action::Remove, Some(Role::Voter)) => {
                    self.sweep_voters(record, Some(change.id)).await?;
                    record.next(|r| {
                        r.replicas.retain(|m| m.id != change.id);
                        r.fast = true;
                        r.finish(false);
                    })
                }
            };
            Ok(Some(next))
        }
    }

    /// Has every voter but `leaving` sweep the record's epoch.
    async fn sweep_voters(
        self: &Arc<Self>,
        record: &MembersRecord,
        leaving: Option<ReplicaId>,
    ) -> Result<(), ChangeError> {
        let voters: Vec<ReplicaId> = record
            .voters()
            .into_iter()
            .filter(|&v| Some(v) != leaving)
            .collect();
        let epoch = record.epoch;
        let me = self.clone();
        let targets = voters.clone();
        self.wait_for_retrying(
            &voters,
            "sweep",
            |s| s.swept >= epoch,
            || {
                let me = me.clone();
                let targets = targets.clone();
                async move {
                    for v in targets {
                        me.tell(v, What::Sweep { epoch }).await;
                    }
                }
            },
        )
        .await
    }

    /// Refuses to remove `leaving` unless a quorum of the voters left
    /// answers now.
    async fn check_quorum_left(
        &self,
        record: &MembersRecord,
        leaving: ReplicaId,
    ) -> Result<(), ChangeError> {
        let left: Vec<ReplicaId> = record
            .voters()
            .into_iter()
            .filter(|&v| v != leaving)
            .collect();
        let quorum = ballot_core::quorum_classic(left.len());
        let mut up = 0;
        for &v in &left {
            if self.status_of(v).await.is_ok() {
                up += 1;
            }
        }
        if up < quorum {
            return Err(ChangeError::Invalid(format!(
                "removing replica {leaving} would leave {} voters of which only {up} answer; \
                 a quorum of them ({quorum}) must be up",
                left.len()
            )));
        }
        Ok(())
    }

    /// Starts a task on `id` (itself included).
    async fn tell(self: &Arc<Self>, id: ReplicaId, what: What) {
        if id == self.me {
            self.local_answer(id, what);
        } else if let Err(e) = self.ask(id, what).await {
            debug!(replica = id, "{e}");
        }
    }

    async fn status_of(&self, id: ReplicaId) -> Result<Status, String> {
        if id == self.me {
            return Ok(self.status());
        }
        match self.ask(id, What::Status).await? {
            Answer::Status(s) => Ok(s),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// Every replica's status, or why it did not answer.
    pub async fn statuses(&self, ids: &[ReplicaId]) -> Vec<ReplicaStatus> {
        let mut out = Vec::new();
        for &id in ids {
            match self.status_of(id).await {
                Ok(s) => out.push(ReplicaStatus {
                    id,
                    status: Some(s),
                    error: None,
                }),
                Err(e) => out.push(ReplicaStatus {
                    id,
                    status: None,
                    error: Some(e),
                }),
            }
        }
        out
    }

    async fn wait_for(
        &self,
        ids: &[ReplicaId],
        what: &str,
        done: impl Fn(&Status) -> bool,
    ) -> Result<(), ChangeError> {
        self.wait_for_retrying(ids, what, done, || async {}).await
    }

    /// Waits until every replica of `ids` reports a status `done` accepts,
    /// calling `nudge` at once and every few seconds meanwhile (a replica
    /// restarted during a task forgets it).
    async fn wait_for_retrying<F: std::future::Future<Output = ()>>(
        &self,
        ids: &[ReplicaId],
        what: &str,
        done: impl Fn(&Status) -> bool,
        nudge: impl Fn() -> F,
    ) -> Result<(), ChangeError> {
        let deadline = Instant::now() + STAGE_WAIT;
        let mut last_nudge: Option<Instant> = None;
        loop {
            let mut waiting = Vec::new();
            for &id in ids {
                match self.status_of(id).await {
                    Ok(s) if done(&s) => {}
                    Ok(_) => waiting.push(format!("{id}")),
                    Err(e) => waiting.push(format!("{id} ({e})")),
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            debug!(what, "waiting for replicas: {}", waiting.join(", "));
            // A change queued meanwhile (a removal of the replica joining,
            // say) is handled from the top, not after this wait.
            let stored = self
                .storage
                .committed(MEMBERS_KEY)
                .ok()
                .flatten()
                .map_or(0, |c| c.version);
            if stored
                > self
                    .driving_version
                    .load(std::sync::atomic::Ordering::Acquire)
            {
                return Err(ChangeError::Superseded);
            }
            if Instant::now() > deadline {
                return Err(ChangeError::Unavailable(format!(
                    "waited {STAGE_WAIT:?} for replicas to {what}: {}",
                    waiting.join(", ")
                )));
            }
            if last_nudge.is_none_or(|at| at.elapsed() > Duration::from_secs(3)) {
                nudge().await;
                last_nudge = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The record and every member's status.
    pub async fn view(&self) -> Result<MembersView, ChangeError> {
        let (version, record) = self.current().await?;
        let ids: Vec<ReplicaId> = record.replicas.iter().map(|m| m.id).collect();
        let status = self.statuses(&ids).await;
        Ok(MembersView {
            version,
            record,
            status,
        })
    }
}

/// A page size a peer asked for, within bounds.
fn page_limit(asked: u32) -> usize {
    asked.clamp(1, 16 * 1024) as usize
}

/// Reads `key` linearizably, retrying until it succeeds; returns its size.
async fn read_key(
    requests: mpsc::Sender<ClientRequest>,
    health: Arc<Health>,
    key: Vec<u8>,
) -> Result<u64, String> {
    let mut delay = Duration::from_millis(50);
    for _ in 0..40 {
        let read = Operation::Read(Consistency::Linearizable);
        match node::call(&requests, key.clone(), read, CALL_TIMEOUT).await {
            Ok(c) => match c.outcome {
                Outcome::Done(current) => return Ok(current.value.map_or(0, |v| v.len() as u64)),
                other => debug!("reading a key: {}", unavailable(&other)),
            },
            Err(e) => debug!("reading a key: {e}"),
        }
        if health.fatal().is_some() {
            break;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
    Err(format!(
        "key {} could not be read",
        String::from_utf8_lossy(&key)
    ))
}

/// Whether `change` may be queued on `record`.
fn check(record: &MembersRecord, change: &Change) -> Result<(), ChangeError> {
    let invalid = |m: String| Err(ChangeError::Invalid(m));
    match change.action {
        Action::Add => {
            if change.addr.is_none() {
                return invalid("adding a replica needs its peer address".into());
            }
            if record.role(change.id).is_some() {
                return invalid(format!("replica {} is already a member", change.id));
            }
            if record.replicas.len() >= 64 {
                return invalid("a cluster has at most 64 replicas".into());
            }
        }
        Action::Remove => {
            let joining = record
                .queue
                .iter()
                .any(|c| c.id == change.id && c.action == Action::Add);
            match record.role(change.id) {
                None if !joining => {
                    return invalid(format!("replica {} is not a member", change.id))
                }
                Some(Role::Voter) => {
                    let voters = record.voters().len();
                    let leaving = record
                        .queue
                        .iter()
                        .filter(|c| c.action == Action::Remove)
                        .count();
                    if voters <= leaving + 1 {
                        return invalid(format!(
                            "removing replica {} would leave no voter",
                            change.id
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
        storage.commit([write].iter()).unwrap();
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

    #[test]
    fn the_record_round_trips_and_checks_its_format() {
        let r = MembersRecord::bootstrap(vec![member(2, Role::Voter), member(1, Role::Voter)]);
        assert_eq!(r.voters(), vec![1, 2]);
        assert_eq!(MembersRecord::decode(&r.encode()).unwrap(), r);
        let mut other = r.clone();
        other.format = 2;
        assert!(MembersRecord::decode(&other.encode())
            .unwrap_err()
            .contains("format 2"));
        assert!(MembersRecord::decode(b"{").is_err());
        let mut empty = r.clone();
        empty.replicas.clear();
        assert!(MembersRecord::decode(&empty.encode()).is_err());
    }

    #[test]
    fn questions_and_answers_round_trip_through_json() {
        let status = Status {
            id: 3,
            epoch: 7,
            swept: 6,
            caught_up: 2,
            progress: Some(Progress {
                task: "sweep".into(),
                epoch: 6,
                phase: "done".into(),
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
        match serde_json::from_slice(&bytes).unwrap() {
            Answer::Status(back) => assert_eq!(back, status),
            other => panic!("{other:?}"),
        }
        let ask = Ask {
            format: SERVICE_FORMAT,
            what: What::Keys {
                after: Some(b"\0k".to_vec()),
                limit: 3,
            },
        };
        let text = serde_json::to_string(&ask).unwrap();
        assert!(text.contains(r#""ask":"keys""#), "{text}");
        let back: Ask = serde_json::from_str(&text).unwrap();
        assert!(matches!(back.what, What::Keys { limit: 3, .. }));
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
    fn changes_are_checked_before_they_queue() {
        let r = MembersRecord::bootstrap(vec![member(1, Role::Voter), member(2, Role::Voter)]);
        let change = |action, id, addr: Option<SocketAddr>| Change {
            action,
            id,
            addr,
            http: None,
            requested_ms: 1,
        };
        let addr = Some(([127, 0, 0, 1], 9000).into());
        assert!(check(&r, &change(Action::Add, 3, addr)).is_ok());
        assert!(check(&r, &change(Action::Add, 3, None)).is_err());
        assert!(check(&r, &change(Action::Add, 2, addr)).is_err());
        assert!(check(&r, &change(Action::Remove, 3, None)).is_err());
        assert!(check(&r, &change(Action::Remove, 2, None)).is_ok());
        let mut one_leaving = r.clone();
        one_leaving.queue.push(change(Action::Remove, 2, None));
        let e = check(&one_leaving, &change(Action::Remove, 1, None)).unwrap_err();
        assert!(e.to_string().contains("no voter"), "{e}");
    }

    #[test]
    fn the_next_epoch_keeps_replicas_in_order_and_finishing_moves_the_change() {
        let mut r = MembersRecord::bootstrap(vec![member(1, Role::Voter)]);
        r.queue.push(Change {
            action: Action::Add,
            id: 3,
            addr: Some(([127, 0, 0, 1], 9000).into()),
            http: None,
            requested_ms: 5,
        });
        let next = r.next(|n| {
            n.replicas.insert(0, member(3, Role::Learner));
            n.finish(false);
        });
        assert_eq!(next.epoch, 2);
        assert_eq!(
            next.replicas.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(next.members().learners, vec![3]);
        assert!(next.queue.is_empty());
        assert_eq!((next.done[0].id, next.done[0].epoch), (3, 2));
    }
}
