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

use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ballot_control::pipeline::Pipeline;
use ballot_core::{Actions, Batch, Completion, Inbound, Members, Operation, Ready, Replica};
use tokio::sync::{mpsc, oneshot};
use tracing::error;

use crate::metrics::Metrics;
use crate::runtime::{Bound, Policies, WasmCore};
use crate::storage::Storage;
use crate::system::{CONFIG_KEY, MEMBERS_KEY};
use crate::transport::Transport;

mod driver;
mod writer;

use driver::Driver;

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
                writer::writer(health, storage, ready_rx, durable_tx, metrics)
            })
            .expect("spawning the writer thread");
    }
    let driver = Driver {
        protocol,
        label: initial.label,
        factory: initial.factory,
        swapping: None,
        events,
        storage,
        transport,
        metrics,
        health: health.clone(),
        ready_tx,
        pipeline: Pipeline::new(vec![CONFIG_KEY.to_vec(), MEMBERS_KEY.to_vec()]),
        clients: HashMap::new(),
        timers: BinaryHeap::new(),
        next_request: 1,
        clock_ms: 0,
        seed: seed(),
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
