//! The replica's engine room: drives the protocol component and makes its
//! decisions durable before they leave.
//!
//! Two threads:
//! - the **core** thread owns the protocol instance. It gathers client
//!   requests, peer messages and due timers into one batch, reads the state
//!   of the keys they touch (the newest not-yet-durable copy if there is one,
//!   LMDB otherwise), calls `step` once, and hands the ready to the writer;
//!   when the writer reports it durable, it calls `release` and sends,
//!   completes and arms what that returns. It does not wait for a ready to
//!   become durable before stepping the next one (pipelining), but releases
//!   strictly in order.
//! - the **writer** thread takes every ready queued since its last commit
//!   and writes them in one LMDB transaction with one fsync (group commit).
//!
//! Nothing a ready releases (a message to a peer, an answer to a client)
//! leaves before that ready's fsync. A storage error or a trapping protocol
//! component stops the replica from answering: it fails every request with
//! the reason rather than guess.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ballot_core::{
    Actions, Batch, Completion, Failure, FailureReason, Inbound, KeyState, Members, Operation,
    Outcome, Ready, Replica, Request, Timer, Trace,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::metrics::{label, labels2, Metrics};
use crate::runtime::{Bound, Policies, WasmCore};
use crate::storage::Storage;
use crate::system::{CONFIG_KEY, MEMBERS_KEY};
use crate::transport::{Message, Transport};

/// Longest key: LMDB's key size limit.
pub const KEY_MAX: usize = 511;
/// Readies stepped but not yet durable before the core stops taking input.
const PIPELINE_MAX: usize = 64;
/// Events handed to the protocol in one step, at most.
const BATCH_MAX: usize = 2048;
/// Client requests queued for the core thread.
pub const REQUEST_QUEUE: usize = 16 * 1024;
/// Peer message batches queued for the core thread.
pub const INBOUND_QUEUE: usize = 4096;

/// A protocol implementation the node can drive: the wasm component or the
/// same logic compiled natively.
pub trait Protocol: Send {
    /// See `replica.step`. An error means the implementation failed.
    fn step(&mut self, batch: Batch) -> Result<Ready, String>;
    /// See `replica.release`.
    fn release(&mut self, id: u64) -> Result<Actions, String>;
    /// See `membership.reconfigure`.
    fn reconfigure(&mut self, members: Members) -> Result<(), String>;
    /// The policies its commands run under.
    fn policies(&mut self) -> &mut Policies;
}

impl Protocol for WasmCore {
    fn step(&mut self, batch: Batch) -> Result<Ready, String> {
        self.try_step(batch).map_err(|e| e.to_string())
    }
    fn release(&mut self, id: u64) -> Result<Actions, String> {
        self.try_release(id).map_err(|e| e.to_string())
    }
    fn reconfigure(&mut self, members: Members) -> Result<(), String> {
        self.try_reconfigure(members).map_err(|e| e.to_string())
    }
    fn policies(&mut self) -> &mut Policies {
        self.policies_mut()
    }
}

impl Protocol for Replica<Policies> {
    fn step(&mut self, batch: Batch) -> Result<Ready, String> {
        Ok(Replica::step(self, batch))
    }
    fn release(&mut self, id: u64) -> Result<Actions, String> {
        Ok(Replica::release(self, id))
    }
    fn reconfigure(&mut self, members: Members) -> Result<(), String> {
        Replica::reconfigure(self, members)
    }
    fn policies(&mut self) -> &mut Policies {
        self.env_mut()
    }
}

/// Builds a protocol instance for an incarnation.
pub type ProtocolFactory = Arc<dyn Fn(u64) -> Result<Box<dyn Protocol>, String> + Send + Sync>;

/// Instructions for the core thread from the rest of the daemon.
pub enum Control {
    /// Route key prefixes to these policies from the next step on.
    Rebind(Vec<Bound>),
    /// Switch to another protocol: stop admitting client requests, let the
    /// commands in flight finish on the running instance (peer messages
    /// keep flowing), then start the new one. `label` names it (a
    /// component id).
    Swap {
        label: String,
        factory: ProtocolFactory,
    },
    /// Run this membership epoch from the next step on (an older or equal
    /// epoch is ignored). Every later instance starts on it too.
    Members(Members),
}

/// What the core thread reports about its protocol instance.
#[derive(Clone, Debug)]
pub enum CoreEvent {
    /// A new instance runs `label`.
    Swapped {
        label: String,
        incarnation: u64,
        /// How long the commands in flight took to finish.
        drained: Duration,
        /// Commands that had not finished by the deadline and were failed.
        abandoned: usize,
    },
    /// The instance running `label` trapped and was replaced by a fresh
    /// one of the same component.
    Trapped { label: String, reason: String },
}

/// Longest a swap waits for the commands in flight.
pub const SWAP_DRAIN_MAX: Duration = Duration::from_secs(5);

/// A committed version of a watched system key (the component
/// configuration, the membership), once durable here.
pub type ConfigCommit = (u64, Option<Vec<u8>>);

/// Where the core reports durable commits of the system keys it watches.
pub struct Watchers {
    /// `\0ballot/config`.
    pub config: mpsc::UnboundedSender<ConfigCommit>,
    /// `\0ballot/members`.
    pub members: mpsc::UnboundedSender<ConfigCommit>,
}

/// Why [`call`] has no completion to give.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The core thread is gone: the replica is shutting down.
    Stopped,
    /// The core thread dropped the request without completing it.
    Dropped,
    /// No completion within the time given.
    Timeout(Duration),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Stopped => f.write_str("the replica is shutting down"),
            CallError::Dropped => f.write_str("the replica dropped the request"),
            CallError::Timeout(t) => write!(f, "no answer within {t:?}"),
        }
    }
}

impl std::error::Error for CallError {}

/// Runs one operation through the core and waits for its completion.
pub async fn call(
    requests: &mpsc::Sender<ClientRequest>,
    key: Vec<u8>,
    op: Operation,
    timeout: Duration,
) -> Result<Completion, CallError> {
    let (reply, done) = oneshot::channel();
    requests
        .send(ClientRequest { key, op, reply })
        .await
        .map_err(|_| CallError::Stopped)?;
    match tokio::time::timeout(timeout, done).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(_)) => Err(CallError::Dropped),
        Err(_) => Err(CallError::Timeout(timeout)),
    }
}

/// A client's operation on its way to the core thread.
pub struct ClientRequest {
    pub key: Vec<u8>,
    pub op: Operation,
    /// The completion goes here.
    pub reply: oneshot::Sender<Completion>,
}

/// Why a replica stopped answering, once it has.
#[derive(Default)]
pub struct Health {
    fatal: Mutex<Option<String>>,
}

impl Health {
    /// `None` while healthy.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().expect("health lock").clone()
    }
    pub fn stop(&self, reason: String) {
        let mut fatal = self.fatal.lock().expect("health lock");
        if fatal.is_none() {
            error!("replica stopped answering: {reason}");
            *fatal = Some(reason);
        }
    }
}

/// Handles to a running core.
pub struct Core {
    pub requests: mpsc::Sender<ClientRequest>,
    pub health: Arc<Health>,
    pub control: mpsc::UnboundedSender<Control>,
}

/// The protocol a core starts with.
pub struct Initial {
    pub label: String,
    pub factory: ProtocolFactory,
    pub incarnation: u64,
    /// The membership this replica holds durably, applied before the first
    /// step: a replica never votes in an older epoch than it adopted.
    pub members: Option<Members>,
}

/// Starts the writer and core threads.
#[allow(clippy::too_many_arguments)]
pub fn start(
    initial: Initial,
    storage: Storage,
    inbound: mpsc::Receiver<Vec<Inbound>>,
    transport: Arc<Transport>,
    metrics: Arc<Metrics>,
    watchers: Watchers,
    events: mpsc::UnboundedSender<CoreEvent>,
    epoch: Arc<AtomicU64>,
) -> Result<Core, String> {
    let mut protocol = (initial.factory)(initial.incarnation)?;
    if let Some(members) = &initial.members {
        protocol
            .reconfigure(members.clone())
            .map_err(|e| format!("resuming membership epoch {}: {e}", members.epoch))?;
        epoch.store(members.epoch, Ordering::Release);
    }
    let (requests_tx, requests_rx) = mpsc::channel(REQUEST_QUEUE);
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let health = Arc::new(Health::default());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Ready>();
    let (durable_tx, durable_rx) = mpsc::unbounded_channel();
    {
        let storage = storage.clone();
        let metrics = metrics.clone();
        let health = health.clone();
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("ballot-writer".into())
            .spawn(move || {
                let _replica = span.enter();
                writer(health, storage, ready_rx, durable_tx, metrics)
            })
            .expect("spawning the writer thread");
    }
    let driver = Driver {
        protocol,
        label: initial.label,
        factory: initial.factory,
        swapping: None,
        events,
        host_seq: 0,
        storage,
        transport,
        metrics,
        health: health.clone(),
        ready_tx,
        pending: HashMap::new(),
        unreleased: VecDeque::new(),
        clients: HashMap::new(),
        timers: BinaryHeap::new(),
        next_request: 1,
        clock_ms: 0,
        seed: seed(),
        config_pending: Vec::new(),
        watchers,
        members: initial.members,
        epoch,
    };
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("ballot-core".into())
        .spawn(move || {
            let _replica = span.enter();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("core runtime");
            rt.block_on(driver.run(requests_rx, inbound, durable_rx, control_rx));
        })
        .expect("spawning the core thread");
    Ok(Core {
        requests: requests_tx,
        health,
        control: control_tx,
    })
}

fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (std::process::id() as u64).rotate_left(32)
}

/// The writer thread: group commits in ready order.
fn writer(
    health: Arc<Health>,
    storage: Storage,
    readies: std::sync::mpsc::Receiver<Ready>,
    durable: mpsc::UnboundedSender<Result<u64, String>>,
    metrics: Arc<Metrics>,
) {
    while let Ok(first) = readies.recv() {
        let mut group = vec![first];
        while let Ok(more) = readies.try_recv() {
            group.push(more);
        }
        let last = group.last().map(|r| r.id).expect("non-empty group");
        let writes = group.iter().map(|r| r.persist.len()).sum::<usize>();
        let _commit =
            tracing::debug_span!("group_commit", readies = group.len(), writes, last).entered();
        if writes > 0 {
            match storage.commit(group.iter().flat_map(|r| r.persist.iter())) {
                Ok(stats) => {
                    metrics.fsync_seconds.observe(stats.elapsed.as_secs_f64());
                    metrics.group_commit_writes.observe(stats.writes as f64);
                    metrics.group_commit_readies.observe(group.len() as f64);
                }
                Err(e) => {
                    // Record the reason first: the core may notice the
                    // writer is gone before it reads this message.
                    let reason = format!("storage write failed: {e}");
                    health.stop(reason.clone());
                    let _ = durable.send(Err(reason));
                    return;
                }
            }
        }
        if durable.send(Ok(last)).is_err() {
            return;
        }
    }
}

struct Client {
    reply: oneshot::Sender<Completion>,
    op: &'static str,
    started: Instant,
}

/// A ready stepped and not yet released. `guest` is `None` once the
/// instance that made it is gone (a trap or an abandoned drain): its writes
/// still become durable in order, but nothing of it is released, as if the
/// replica had crashed right after the fsync.
struct Unreleased {
    host: u64,
    guest: Option<u64>,
    early: Option<Actions>,
}

struct Swapping {
    label: String,
    factory: ProtocolFactory,
    since: Instant,
}

struct Driver {
    protocol: Box<dyn Protocol>,
    /// What `protocol` runs, and how to build another instance of it.
    label: String,
    factory: ProtocolFactory,
    swapping: Option<Swapping>,
    events: mpsc::UnboundedSender<CoreEvent>,
    /// The host's own numbering of readies (the guest's restarts with each
    /// instance).
    host_seq: u64,
    storage: Storage,
    transport: Arc<Transport>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    ready_tx: std::sync::mpsc::Sender<Ready>,
    /// Newest state of keys whose last write is not durable yet, with the
    /// (host-numbered) ready that wrote it.
    pending: HashMap<Vec<u8>, (u64, Vec<u8>)>,
    /// Readies stepped and not released, in order, with their early
    /// actions until those are applied.
    unreleased: VecDeque<Unreleased>,
    clients: HashMap<u64, Client>,
    timers: BinaryHeap<Reverse<(u64, u64, Vec<u8>)>>,
    next_request: u64,
    clock_ms: u64,
    seed: u64,
    /// Commits of watched system keys not durable yet, by ready: (ready,
    /// is the membership key, commit).
    config_pending: Vec<(u64, bool, ConfigCommit)>,
    watchers: Watchers,
    /// The membership adopted since start, applied to every new instance.
    members: Option<Members>,
    /// The epoch the running instance has adopted (the transport stamps
    /// frames with it).
    epoch: Arc<AtomicU64>,
}

fn op_name(op: &Operation) -> &'static str {
    match op {
        Operation::Command(_) => "command",
        Operation::Read(ballot_core::Consistency::Linearizable) => "read",
        Operation::Read(ballot_core::Consistency::Local) => "read-local",
    }
}

fn failed(reason: FailureReason, message: String) -> Outcome {
    Outcome::Failed(Failure {
        reason,
        maybe_applied: false,
        message,
    })
}

impl Driver {
    fn now_ms(&mut self) -> u64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.clock_ms = self.clock_ms.max(wall);
        self.clock_ms
    }

    async fn run(
        mut self,
        mut requests: mpsc::Receiver<ClientRequest>,
        mut inbound: mpsc::Receiver<Vec<Inbound>>,
        mut durable: mpsc::UnboundedReceiver<Result<u64, String>>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        loop {
            let mut batch = Batch::default();
            let fatal = self.health.fatal().is_some();
            let open = self.unreleased.len() < PIPELINE_MAX && !fatal;
            // While a swap drains, client requests wait in their queue; once
            // this replica's own commands are done, peer messages wait too,
            // so the last readies are released and the swap happens.
            let admit = open && self.swapping.is_none();
            let listen = open && !(self.swapping.is_some() && self.clients.is_empty());
            let swap_tick = self
                .swapping
                .as_ref()
                .map(|_| tokio::time::Instant::now() + Duration::from_millis(20));
            let now = self.now_ms();
            let deadline = self.timers.peek().map(|Reverse((at, _, _))| {
                tokio::time::Instant::now() + Duration::from_millis(at.saturating_sub(now))
            });
            tokio::select! {
                biased;
                d = durable.recv() => match d {
                    Some(d) => self.on_durable(d),
                    None => self.health.stop("the writer thread ended".into()),
                },
                Some(c) = control.recv() => match c {
                    Control::Rebind(bound) => self.protocol.policies().rebind(bound),
                    Control::Swap { label, factory } => {
                        debug!(%label, "protocol swap: draining");
                        self.swapping = Some(Swapping { label, factory, since: Instant::now() });
                    }
                    Control::Members(members) => self.adopt(members),
                },
                _ = sleep_until(swap_tick), if swap_tick.is_some() => {}
                r = requests.recv(), if admit || fatal => match r {
                    Some(r) if fatal => self.refuse(r),
                    Some(r) => self.admit(r, &mut batch),
                    None => return,
                },
                m = inbound.recv(), if listen => if let Some(m) = m {
                    self.accept(m, &mut batch)
                },
                _ = sleep_until(deadline), if open && deadline.is_some() => {}
            }
            while let Ok(d) = durable.try_recv() {
                self.on_durable(d);
            }
            self.try_swap();
            if self.health.fatal().is_some() {
                for c in std::mem::take(&mut self.clients).into_values() {
                    let reason = self.health.fatal().unwrap_or_default();
                    let _ = c.reply.send(Completion {
                        id: 0,
                        outcome: Outcome::Failed(Failure {
                            reason: FailureReason::NoQuorum,
                            maybe_applied: true,
                            message: format!("replica stopped: {reason}"),
                        }),
                        trace: Trace::default(),
                    });
                }
                while let Ok(r) = requests.try_recv() {
                    self.refuse(r);
                }
                while inbound.try_recv().is_ok() {}
                continue;
            }
            if self.unreleased.len() >= PIPELINE_MAX {
                continue;
            }
            let mut events = batch.requests.len() + batch.messages.len();
            while events < BATCH_MAX {
                let mut more = false;
                if self.swapping.is_none() {
                    if let Ok(r) = requests.try_recv() {
                        self.admit(r, &mut batch);
                        more = true;
                    }
                }
                if listen {
                    if let Ok(m) = inbound.try_recv() {
                        self.accept(m, &mut batch);
                        more = true;
                    }
                }
                if !more {
                    break;
                }
                events = batch.requests.len() + batch.messages.len();
            }
            let now = self.now_ms();
            while let Some(Reverse((at, _, _))) = self.timers.peek() {
                if *at > now {
                    break;
                }
                let Reverse((at_ms, token, key)) = self.timers.pop().expect("peeked");
                batch.timers.push(Timer { key, token, at_ms });
            }
            if batch.requests.is_empty() && batch.messages.is_empty() && batch.timers.is_empty() {
                continue;
            }
            self.step(batch, now);
        }
    }

    fn admit(&mut self, r: ClientRequest, batch: &mut Batch) {
        let id = self.next_request;
        self.next_request += 1;
        self.clients.insert(
            id,
            Client {
                reply: r.reply,
                op: op_name(&r.op),
                started: Instant::now(),
            },
        );
        batch.requests.push(Request {
            id,
            key: r.key,
            op: r.op,
        });
    }

    fn refuse(&mut self, r: ClientRequest) {
        let reason = self.health.fatal().unwrap_or_default();
        let _ = r.reply.send(Completion {
            id: 0,
            outcome: failed(
                FailureReason::NoQuorum,
                format!("replica stopped: {reason}"),
            ),
            trace: Trace::default(),
        });
    }

    fn accept(&mut self, messages: Vec<Inbound>, batch: &mut Batch) {
        for m in messages {
            if m.key.is_empty() || m.key.len() > KEY_MAX {
                warn!(
                    from = m.from,
                    "dropped a peer message with a {}-byte key",
                    m.key.len()
                );
                continue;
            }
            batch.messages.push(m);
        }
    }

    fn step(&mut self, mut batch: Batch, now: u64) {
        batch.now_ms = now;
        self.seed = self
            .seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        batch.seed = self.seed;
        // Requests with keys LMDB cannot hold are answered here.
        let mut refused = Vec::new();
        batch.requests.retain(|r| {
            let ok = !r.key.is_empty() && r.key.len() <= KEY_MAX;
            if !ok {
                refused.push(r.id);
            }
            ok
        });
        for id in refused {
            let message = format!("keys must be 1 to {KEY_MAX} bytes");
            self.complete(Completion {
                id,
                outcome: failed(FailureReason::Invalid, message),
                trace: Trace::default(),
            });
        }
        let mut keys: Vec<&[u8]> = Vec::new();
        keys.extend(batch.requests.iter().map(|r| &r.key[..]));
        keys.extend(batch.messages.iter().map(|m| &m.key[..]));
        keys.extend(batch.timers.iter().map(|t| &t.key[..]));
        keys.sort_unstable();
        keys.dedup();
        let mut states = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for key in keys {
            match self.pending.get(key) {
                Some((_, state)) => states.push(KeyState {
                    key: key.to_vec(),
                    state: state.clone(),
                }),
                None => missing.push(key),
            }
        }
        match self.storage.states(missing.into_iter()) {
            Ok(found) => states.extend(found.into_iter().map(|(key, state)| KeyState {
                key: key.to_vec(),
                state,
            })),
            Err(e) => return self.health.stop(format!("storage read failed: {e}")),
        }
        batch.states = states;
        let events = batch.requests.len() + batch.messages.len() + batch.timers.len();
        self.metrics.step_events.observe(events as f64);
        let _step = tracing::debug_span!(
            "step",
            requests = batch.requests.len(),
            messages = batch.messages.len(),
            timers = batch.timers.len()
        )
        .entered();
        let started = Instant::now();
        let mut ready = match self.protocol.step(batch) {
            Ok(r) => r,
            Err(e) => return self.recover(e),
        };
        self.observe_guest("step", started);
        self.host_seq += 1;
        let host = self.host_seq;
        let guest = std::mem::replace(&mut ready.id, host);
        for w in &ready.persist {
            self.pending.insert(w.key.clone(), (host, w.state.clone()));
            let watched = w.key == CONFIG_KEY || w.key == MEMBERS_KEY;
            if let (Some(c), true) = (&w.commit, watched) {
                let is_members = w.key == MEMBERS_KEY;
                self.config_pending
                    .push((host, is_members, (c.version, c.value.clone())));
            }
        }
        let early = std::mem::take(&mut ready.early);
        let early = if self.unreleased.is_empty() {
            // Every earlier ready is durable: the early actions go now.
            self.dispatch(early);
            None
        } else {
            Some(early)
        };
        self.unreleased.push_back(Unreleased {
            host,
            guest: Some(guest),
            early,
        });
        if ready.persist.is_empty() && self.unreleased.len() == 1 {
            // Nothing to make durable and nothing before it: release now.
            return self.on_durable(Ok(host));
        }
        if self.ready_tx.send(ready).is_err() {
            self.health.stop("the writer thread ended".into());
        }
    }

    fn observe_guest(&self, call: &str, started: Instant) {
        self.metrics
            .guest_seconds
            .get_or_create(&label("call", call))
            .observe(started.elapsed().as_secs_f64());
    }

    fn on_durable(&mut self, durable: Result<u64, String>) {
        let upto = match durable {
            Ok(id) => id,
            Err(e) => return self.health.stop(e),
        };
        self.pending.retain(|_, (id, _)| *id > upto);
        if self
            .config_pending
            .first()
            .is_some_and(|(id, _, _)| *id <= upto)
        {
            let (durable, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.config_pending)
                .into_iter()
                .partition(|(id, _, _)| *id <= upto);
            self.config_pending = later;
            for (_, is_members, commit) in durable {
                let to = if is_members {
                    &self.watchers.members
                } else {
                    &self.watchers.config
                };
                let _ = to.send(commit);
            }
        }
        while self.unreleased.front().is_some_and(|u| u.host <= upto) {
            let u = self.unreleased.pop_front().expect("checked above");
            // A ready made durable in the same group commit as the one
            // before it has not had its early actions applied yet.
            if let Some(early) = u.early {
                self.dispatch(early);
            }
            let Some(guest) = u.guest else {
                continue;
            };
            let started = Instant::now();
            let actions = match self.protocol.release(guest) {
                Ok(a) => a,
                Err(e) => return self.recover(e),
            };
            self.observe_guest("release", started);
            self.dispatch(actions);
        }
        // The next ready's early actions may go once everything before it
        // is durable.
        if let Some(u) = self.unreleased.front_mut() {
            if let Some(early) = u.early.take() {
                self.dispatch(early);
            }
        }
    }

    /// Fails every waiting client with `message` (they may have applied).
    fn abandon_clients(&mut self, message: &str) -> usize {
        let clients = std::mem::take(&mut self.clients);
        let n = clients.len();
        for (id, c) in clients {
            self.metrics
                .requests
                .get_or_create(&labels2(("op", c.op), ("outcome", "abandoned")))
                .inc();
            let _ = c.reply.send(Completion {
                id,
                outcome: Outcome::Failed(Failure {
                    reason: FailureReason::Interrupted,
                    maybe_applied: true,
                    message: message.to_string(),
                }),
                trace: Trace::default(),
            });
        }
        n
    }

    /// Replaces the protocol instance with a fresh one from `factory`, on a
    /// new incarnation, keeping the policy bindings. What the old instance
    /// had not released is dropped (its writes still become durable).
    fn replace(&mut self, factory: &ProtocolFactory) -> Result<u64, String> {
        let incarnation = self
            .storage
            .bump_incarnation()
            .map_err(|e| format!("recording a new incarnation: {e}"))?;
        let mut fresh = factory(incarnation)?;
        if let Some(members) = &self.members {
            fresh
                .reconfigure(members.clone())
                .map_err(|e| format!("the new instance refused epoch {}: {e}", members.epoch))?;
        }
        let bound = self.protocol.policies().take_bound();
        fresh.policies().rebind(bound);
        self.protocol = fresh;
        for u in &mut self.unreleased {
            u.guest = None;
            u.early = None;
        }
        // Timer tokens belong to the instance that armed them.
        self.timers.clear();
        Ok(incarnation)
    }

    /// Moves the running instance to `members` if it is newer than what it
    /// runs. A refusal is logged and leaves the instance on its epoch.
    fn adopt(&mut self, members: Members) {
        if self
            .members
            .as_ref()
            .is_some_and(|m| m.epoch >= members.epoch)
        {
            return;
        }
        let epoch = members.epoch;
        let started = Instant::now();
        match self.protocol.reconfigure(members.clone()) {
            Ok(()) => {
                self.observe_guest("reconfigure", started);
                info!(
                    epoch,
                    voters = ?members.voters,
                    learners = ?members.learners,
                    fast = members.fast,
                    "membership epoch adopted"
                );
                self.members = Some(members);
                self.epoch.store(epoch, Ordering::Release);
            }
            Err(e) => error!(epoch, "the protocol refused a membership epoch: {e}"),
        }
    }

    /// After a trap: the instance's memory may be half-written, so it is
    /// dropped and a fresh one of the same component takes over. Clients
    /// waiting on it get an error (their commands may still apply).
    fn recover(&mut self, reason: String) {
        error!(label = %self.label, "protocol component failed, restarting it: {reason}");
        self.metrics
            .protocol_restarts
            .get_or_create(&label("cause", "trap"))
            .inc();
        let message = format!(
            "the protocol component failed ({reason}); it was restarted, and this \
             command may or may not have taken effect"
        );
        self.abandon_clients(&message);
        let factory = self.factory.clone();
        if let Err(e) = self.replace(&factory) {
            return self
                .health
                .stop(format!("restarting the protocol after a trap: {e}"));
        }
        let _ = self.events.send(CoreEvent::Trapped {
            label: self.label.clone(),
            reason,
        });
    }

    /// Finishes a swap once nothing is in flight (or the drain deadline
    /// has passed).
    fn try_swap(&mut self) {
        let Some(swap) = &self.swapping else {
            return;
        };
        let drained = self.clients.is_empty() && self.unreleased.is_empty();
        let waited = swap.since.elapsed();
        if !drained && waited < SWAP_DRAIN_MAX {
            return;
        }
        let swap = self.swapping.take().expect("checked above");
        let abandoned = self.abandon_clients(
            "the protocol was swapped before this command finished; it may or may not have taken effect",
        );
        match self.replace(&swap.factory) {
            Ok(incarnation) => {
                self.metrics
                    .protocol_restarts
                    .get_or_create(&label("cause", "swap"))
                    .inc();
                self.metrics
                    .swap_drain_seconds
                    .observe(waited.as_secs_f64());
                info!(
                    from = %self.label,
                    to = %swap.label,
                    incarnation,
                    drained_ms = waited.as_millis() as u64,
                    abandoned,
                    "protocol swapped"
                );
                self.label = swap.label.clone();
                self.factory = swap.factory;
                let _ = self.events.send(CoreEvent::Swapped {
                    label: swap.label,
                    incarnation,
                    drained: waited,
                    abandoned,
                });
            }
            Err(e) => {
                // The old instance was not touched: keep running it.
                error!(to = %swap.label, "protocol swap failed, staying on {}: {e}", self.label);
            }
        }
    }

    fn dispatch(&mut self, actions: Actions) {
        let mut by_peer: HashMap<u32, Vec<Message>> = HashMap::new();
        for o in actions.send {
            by_peer.entry(o.to).or_default().push((o.key, o.payload));
        }
        for (to, messages) in by_peer {
            self.transport.send(to, messages);
        }
        for t in actions.timers {
            self.timers.push(Reverse((t.at_ms, t.token, t.key)));
        }
        for c in actions.complete {
            self.complete(c);
        }
    }

    fn complete(&mut self, c: Completion) {
        let Some(client) = self.clients.remove(&c.id) else {
            debug!(id = c.id, "completion for an unknown request");
            return;
        };
        let outcome = match &c.outcome {
            Outcome::Done(_) if c.trace.changed => "applied",
            Outcome::Done(_) => "ok",
            Outcome::Rejected(..) => "rejected",
            Outcome::Failed(f) => match f.reason {
                FailureReason::NoQuorum => "no-quorum",
                FailureReason::Contention => "contention",
                FailureReason::Overloaded => "overloaded",
                FailureReason::Invalid => "invalid",
                FailureReason::Interrupted => "interrupted",
            },
        };
        let m = &self.metrics;
        m.requests
            .get_or_create(&labels2(("op", client.op), ("outcome", outcome)))
            .inc();
        m.request_seconds
            .get_or_create(&label("op", client.op))
            .observe(client.started.elapsed().as_secs_f64());
        if c.trace.changed {
            let path = if c.trace.fast { "fast" } else { "classic" };
            m.proposals_chosen.get_or_create(&label("path", path)).inc();
        }
        m.retries.inc_by(c.trace.attempts.saturating_sub(1) as u64);
        m.ballot_bumps.inc_by(c.trace.prepares as u64);
        let _ = client.reply.send(c);
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
