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

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ballot_control::pipeline::Pipeline;
use ballot_core::{Actions, Batch, Completion, Members, Operation, Ready, Replica};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::error;

use crate::metrics::Metrics;
use crate::runtime::{Bound, Policies, RuntimeError, WasmCore};
use crate::storage::Storage;
use crate::system::{CONFIG_KEY, MEMBERS_KEY};
use crate::transport::Transport;

mod checks;
mod clock;
mod driver;
mod forwards;
mod leaders;
mod writer;

pub use leaders::Leaders;

use driver::Driver;

/// Longest key: LMDB's key size limit.
pub const KEY_MAX: usize = crate::storage::LMDB_KEY_MAX;
/// Readies stepped but not yet durable before the core stops taking input.
const PIPELINE_MAX: usize = 64;
/// Events handed to the protocol in one step, at most.
const BATCH_MAX: usize = 2048;
/// Bytes of requests and peer messages handed to the protocol in one step,
/// at most (an event larger than this goes alone): the guest copies each
/// of them a few times (its proposal, the state it persists, the messages
/// it sends), and its memory is 256 MiB.
const BATCH_BYTES_MAX: usize = 16 << 20;
/// Bytes of key states handed to the protocol in one step, at most (a
/// state larger than this goes alone): a step of many linearizable reads
/// of large keys, each a few bytes of request, loads every key's state into
/// the guest. The events of keys past the bound wait for the next step.
const STEP_STATE_BYTES_MAX: usize = 32 << 20;
/// Bytes of client requests the protocol holds unanswered before the core
/// takes no more from the queue: each command lives in the guest (256 MiB
/// of memory) with its proposal, the state it persists and the messages
/// that carry it until it is answered. 32 MiB still trapped it in 1 of 4
/// runs of the cluster tests (128 parallel 1 MiB writes).
const INFLIGHT_BYTES_MAX: usize = 8 << 20;
/// Client requests queued for the core thread.
pub const REQUEST_QUEUE: usize = 16 * 1024;
/// Bytes of client requests (keys and commands) queued for the core
/// thread; past it a request is refused with 503 `overloaded`.
pub const REQUEST_QUEUE_BYTES: usize = 256 << 20;
/// Peer message batches queued for the core thread.
pub const INBOUND_QUEUE: usize = 4096;

/// A protocol implementation the node can drive: the wasm component or the
/// same logic compiled natively.
pub trait Protocol: Send {
    /// See `replica.step`. An error means the implementation failed.
    fn step(&mut self, batch: Batch) -> Result<Ready, RuntimeError>;
    /// See `replica.release`.
    fn release(&mut self, id: u64) -> Result<Actions, RuntimeError>;
    /// See `membership.reconfigure`: `Refused` leaves the instance sound.
    fn reconfigure(&mut self, members: Members) -> Result<(), RuntimeError>;
    /// The policies its commands run under.
    fn policies(&mut self) -> &mut Policies;
}

impl Protocol for WasmCore {
    fn step(&mut self, batch: Batch) -> Result<Ready, RuntimeError> {
        self.try_step(batch)
    }
    fn release(&mut self, id: u64) -> Result<Actions, RuntimeError> {
        self.try_release(id)
    }
    fn reconfigure(&mut self, members: Members) -> Result<(), RuntimeError> {
        self.try_reconfigure(members)
    }
    fn policies(&mut self) -> &mut Policies {
        self.policies_mut()
    }
}

impl Protocol for Replica<Policies> {
    fn step(&mut self, batch: Batch) -> Result<Ready, RuntimeError> {
        Ok(Replica::step(self, batch))
    }
    fn release(&mut self, id: u64) -> Result<Actions, RuntimeError> {
        Ok(Replica::release(self, id))
    }
    fn reconfigure(&mut self, members: Members) -> Result<(), RuntimeError> {
        Replica::reconfigure(self, members).map_err(RuntimeError::Refused)
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
    /// The replica is stopping: take no more requests, peer messages or
    /// timers, write the decisions the instance holds in memory, and say
    /// so once every ready is durable (or [`STOP_FLUSH_MAX`] has passed).
    Stop(oneshot::Sender<()>),
}

/// Longest a graceful stop waits for the core's last writes.
pub const STOP_FLUSH_MAX: Duration = Duration::from_secs(3);

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
    /// The instance running `label` trapped (or ran past its time limit) `count`
    /// times in a row and was replaced each time by a fresh one of the same
    /// component; `reason` is the last failure.
    Trapped {
        label: String,
        reason: String,
        count: u32,
    },
}

/// The core's reports to the registry, in order. Never dropped, and
/// bounded all the same: traps in a row of one component fold into one
/// report with a count, so the queue grows only by swaps, and the registry
/// asks for each swap.
#[derive(Default)]
pub struct Events {
    queue: Mutex<VecDeque<CoreEvent>>,
    ready: tokio::sync::Notify,
}

impl Events {
    pub fn push(&self, event: CoreEvent) {
        let mut queue = self.queue.lock().expect("events lock");
        match (queue.back_mut(), event) {
            (
                Some(CoreEvent::Trapped {
                    label,
                    reason,
                    count,
                }),
                CoreEvent::Trapped {
                    label: l,
                    reason: r,
                    ..
                },
            ) if *label == l => {
                *reason = r;
                *count = count.saturating_add(1);
            }
            (_, event) => queue.push_back(event),
        }
        drop(queue);
        self.ready.notify_one();
    }

    /// The oldest report, once there is one.
    pub async fn next(&self) -> CoreEvent {
        loop {
            if let Some(e) = self.queue.lock().expect("events lock").pop_front() {
                return e;
            }
            self.ready.notified().await;
        }
    }
}

/// Where the rest of the daemon leaves [`Control`]s for the core thread.
///
/// Each kind of instruction says what the core should run, not a step to
/// take, so only the newest of each kind matters: the mailbox holds at most
/// one binding table, one swap and one membership (the newest epoch), and
/// is bounded by construction. A sender never waits, which lets it send
/// while it holds its own locks.
#[derive(Default)]
pub struct Mailbox {
    slots: Mutex<Slots>,
    /// Something was left since the last take.
    full: std::sync::atomic::AtomicBool,
    ready: tokio::sync::Notify,
}

#[derive(Default)]
struct Slots {
    rebind: Option<Vec<Bound>>,
    swap: Option<(String, ProtocolFactory)>,
    members: Option<Members>,
    stop: Option<oneshot::Sender<()>>,
}

impl Mailbox {
    /// Leaves `control`, replacing an unread one of its kind (a membership
    /// only by a newer epoch).
    pub fn send(&self, control: Control) {
        let mut slots = self.slots.lock().expect("mailbox lock");
        match control {
            Control::Rebind(bound) => slots.rebind = Some(bound),
            Control::Swap { label, factory } => slots.swap = Some((label, factory)),
            Control::Stop(done) => slots.stop = Some(done),
            Control::Members(members) => {
                if slots
                    .members
                    .as_ref()
                    .is_none_or(|m| m.epoch < members.epoch)
                {
                    slots.members = Some(members);
                }
            }
        }
        self.full.store(true, Ordering::Release);
        drop(slots);
        self.ready.notify_one();
    }

    /// Wakes the core when something may have been left (it then looks
    /// with [`Mailbox::take`], which is what counts).
    async fn wait(&self) {
        self.ready.notified().await
    }

    /// What was left, membership first; nothing without taking the lock
    /// when nothing was.
    fn take(&self) -> Vec<Control> {
        if !self.full.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        let mut slots = self.slots.lock().expect("mailbox lock");
        let mut out = Vec::new();
        out.extend(slots.members.take().map(Control::Members));
        out.extend(slots.rebind.take().map(Control::Rebind));
        out.extend(
            slots
                .swap
                .take()
                .map(|(label, factory)| Control::Swap { label, factory }),
        );
        out.extend(slots.stop.take().map(Control::Stop));
        out
    }
}

/// Longest a swap waits for the commands in flight.
pub const SWAP_DRAIN_MAX: Duration = Duration::from_secs(5);

/// A committed version of a watched system key (the component
/// configuration, the membership), once durable here.
pub type ConfigCommit = (u64, Option<Vec<u8>>);

/// Where the core reports durable commits of the system keys it watches.
/// Each holds the newest commit only (a watcher acts on the newest record,
/// so one that falls behind skips versions rather than queueing them);
/// `(0, None)` until the first.
pub struct Watchers {
    /// `\0ballot/config`.
    pub config: watch::Sender<ConfigCommit>,
    /// `\0ballot/members`.
    pub members: watch::Sender<ConfigCommit>,
}

impl Watchers {
    /// The watchers, and the receiving ends of config and members.
    pub fn new() -> (
        Self,
        watch::Receiver<ConfigCommit>,
        watch::Receiver<ConfigCommit>,
    ) {
        let (config, config_rx) = watch::channel((0, None));
        let (members, members_rx) = watch::channel((0, None));
        (Watchers { config, members }, config_rx, members_rx)
    }
}

/// Hands `commit` to a watcher unless it holds a newer one.
pub(super) fn publish(to: &watch::Sender<ConfigCommit>, commit: ConfigCommit) {
    to.send_if_modified(|held| {
        let newer = commit.0 > held.0;
        if newer {
            *held = commit;
        }
        newer
    });
}

/// Why [`call`] has no completion to give.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The core thread is gone: the replica is shutting down.
    Stopped,
    /// The core's request queue stayed full for the whole time given: the
    /// replica is overloaded, and the operation was not taken.
    Overloaded(Duration),
    /// The core thread dropped the request without completing it.
    Dropped,
    /// No completion within the time given.
    Timeout(Duration),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Stopped => f.write_str("the replica is shutting down"),
            CallError::Overloaded(t) => {
                write!(
                    f,
                    "the replica is overloaded: its queue stayed full for {t:?}"
                )
            }
            CallError::Dropped => f.write_str("the replica dropped the request"),
            CallError::Timeout(t) => write!(f, "no answer within {t:?}"),
        }
    }
}

impl std::error::Error for CallError {}

/// Runs one operation through the core and waits for its completion;
/// `timeout` bounds the whole call, the wait for room in the core's queue
/// included.
pub async fn call(
    requests: &mpsc::Sender<ClientRequest>,
    key: Vec<u8>,
    op: Operation,
    timeout: Duration,
) -> Result<Completion, CallError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let (reply, done) = oneshot::channel();
    match tokio::time::timeout_at(
        deadline,
        requests.send(ClientRequest {
            key,
            op,
            reply,
            charge: None,
        }),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err(CallError::Stopped),
        Err(_) => return Err(CallError::Overloaded(timeout)),
    }
    match tokio::time::timeout_at(deadline, done).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(_)) => Err(CallError::Dropped),
        Err(_) => Err(CallError::Timeout(timeout)),
    }
}

/// A client's operation on its way to the core thread.
pub use crate::budget::{Budget, Charge};

/// Bytes a client operation carries: its key and command.
pub fn op_bytes(key: &[u8], op: &Operation) -> usize {
    key.len()
        + match op {
            Operation::Command(c) => c.len(),
            Operation::Read(_) => 0,
        }
}

pub struct ClientRequest {
    pub key: Vec<u8>,
    pub op: Operation,
    /// The completion goes here.
    pub reply: oneshot::Sender<Completion>,
    /// Its bytes in the queue's budget, given back when the core takes it.
    pub charge: Option<Charge>,
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
    /// The byte budget of `requests` ([`REQUEST_QUEUE_BYTES`]).
    pub request_bytes: Budget,
    pub health: Arc<Health>,
    pub control: Arc<Mailbox>,
    /// Which replica leads a key, as far as this one can tell.
    pub leaders: Arc<Leaders>,
}

impl Core {
    /// Stops the core for a graceful exit: it takes nothing more and
    /// writes what it held in memory (`Control::Stop`). Returns once that
    /// is durable, or after [`STOP_FLUSH_MAX`] and a little more if the
    /// core does not answer (a stopped or stuck core).
    pub async fn stop(&self) {
        let (done, stopped) = oneshot::channel();
        self.control.send(Control::Stop(done));
        let _ = tokio::time::timeout(STOP_FLUSH_MAX + Duration::from_secs(1), stopped).await;
    }
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
    inbound: mpsc::Receiver<crate::transport::Received>,
    transport: Arc<Transport>,
    metrics: Arc<Metrics>,
    watchers: Watchers,
    events: Arc<Events>,
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
    let control = Arc::new(Mailbox::default());
    let health = Arc::new(Health::default());
    let leaders = Arc::new(Leaders::default());
    // Neither fills: the core stops stepping with PIPELINE_MAX readies
    // unreleased, and each durability report covers at least one of them.
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Ready>(PIPELINE_MAX);
    let (durable_tx, durable_rx) = mpsc::channel(PIPELINE_MAX);
    {
        let storage = storage.clone();
        let metrics = metrics.clone();
        let health = health.clone();
        let span = tracing::Span::current();
        spawn_guarded("ballot-writer", health.clone(), move || {
            let _replica = span.enter();
            writer::writer(health, storage, ready_rx, durable_tx, metrics)
        });
    }
    let driver = Driver {
        protocol,
        label: initial.label,
        factory: initial.factory,
        swapping: None,
        stopping: None,
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
        clock: clock::Clock::start(),
        inflight_bytes: 0,
        seed: seed(),
        watchers,
        members: initial.members,
        epoch,
        settling: None,
        forwards: forwards::Forwards::new(initial.incarnation),
        leaders: leaders.clone(),
        carry: Batch::default(),
    };
    let span = tracing::Span::current();
    let mailbox = control.clone();
    spawn_guarded("ballot-core", health.clone(), move || {
        let _replica = span.enter();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("core runtime");
        rt.block_on(driver.run(requests_rx, inbound, durable_rx, &mailbox));
    });
    Ok(Core {
        requests: requests_tx,
        request_bytes: Budget::new(REQUEST_QUEUE_BYTES),
        health,
        control,
        leaders,
    })
}

/// Runs `body` on a thread named `name`. A panic there stops the replica
/// with the reason: `/healthz` and `/readyz` answer 503 `replica-stopped`
/// and clients are told why, instead of a live-looking process whose every
/// request times out as "overloaded".
fn spawn_guarded(name: &'static str, health: Arc<Health>, body: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
                let what = crate::panic_message(&*panic);
                health.stop(format!("the {name} thread panicked: {what}"));
            }
        })
        .unwrap_or_else(|e| panic!("spawning the {name} thread: {e}"));
}

fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (std::process::id() as u64).rotate_left(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic on a replica's own thread is reported as the replica
    /// stopping, with the panic's message; before, `/healthz` stayed 200.
    #[test]
    fn a_thread_that_panics_stops_the_replica_with_the_reason() {
        let health = Arc::new(Health::default());
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        spawn_guarded("ballot-test", health.clone(), move || {
            let _done = done_tx;
            let empty: Vec<u8> = Vec::new();
            let _ = empty[usize::from(empty.is_empty())];
        });
        // The sender drops while unwinding, before `stop` runs: wait for it.
        let _ = done_rx.recv();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while health.fatal().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let reason = health.fatal().expect("the panic stops the replica");
        assert!(reason.contains("ballot-test"), "{reason}");
        assert!(reason.contains("index out of bounds"), "{reason}");
    }

    /// A control-plane call (a system record's read, a catch-up read) on a
    /// replica whose queue is full gives up within its timeout and says
    /// why; before, it waited for room without bound.
    #[tokio::test]
    async fn a_call_on_a_full_queue_is_overloaded_within_its_timeout() {
        let (tx, mut rx) = mpsc::channel::<ClientRequest>(1);
        let (reply, _done) = oneshot::channel();
        tx.send(ClientRequest {
            key: b"k".to_vec(),
            op: Operation::Read(ballot_core::Consistency::Local),
            reply,
            charge: None,
        })
        .await
        .unwrap();
        let t = Duration::from_millis(50);
        let op = Operation::Read(ballot_core::Consistency::Local);
        let called = tokio::time::timeout(Duration::from_secs(5), call(&tx, b"k".to_vec(), op, t));
        assert_eq!(
            called.await.expect("the call is bounded").err(),
            Some(CallError::Overloaded(t))
        );
        // A queue whose core is gone is Stopped, not overloaded.
        rx.close();
        let op = Operation::Read(ballot_core::Consistency::Local);
        assert_eq!(
            call(&tx, b"k".to_vec(), op, t).await.err(),
            Some(CallError::Stopped)
        );
    }

    fn members(epoch: u64) -> Members {
        Members {
            epoch,
            ..Members::initial(vec![1, 2, 3])
        }
    }

    fn epochs(controls: &[Control]) -> Vec<u64> {
        controls
            .iter()
            .filter_map(|c| match c {
                Control::Members(m) => Some(m.epoch),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_mailbox_keeps_the_newest_of_each_kind_and_membership_comes_first() {
        let mailbox = Mailbox::default();
        assert!(mailbox.take().is_empty());
        mailbox.send(Control::Rebind(Vec::new()));
        mailbox.send(Control::Members(members(3)));
        mailbox.send(Control::Members(members(2)));
        mailbox.send(Control::Rebind(Vec::new()));
        let taken = mailbox.take();
        assert_eq!(taken.len(), 2, "one of each kind left");
        assert_eq!(
            epochs(&taken),
            vec![3],
            "an older epoch does not replace a newer"
        );
        assert!(matches!(taken[1], Control::Rebind(_)));
        assert!(mailbox.take().is_empty(), "taken once");
        mailbox.send(Control::Members(members(2)));
        assert_eq!(
            epochs(&mailbox.take()),
            vec![2],
            "the core drops what it runs past"
        );
    }

    #[test]
    fn traps_in_a_row_fold_into_one_report_and_a_swap_is_never_dropped() {
        let events = Events::default();
        let trap = |label: &str, reason: &str| CoreEvent::Trapped {
            label: label.into(),
            reason: reason.into(),
            count: 1,
        };
        for i in 0..10_000 {
            events.push(trap("b", &format!("trap {i}")));
        }
        events.push(CoreEvent::Swapped {
            label: "a".into(),
            incarnation: 7,
            drained: Duration::ZERO,
            abandoned: 0,
        });
        events.push(trap("a", "again"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let got = rt.block_on(async {
            [
                events.next().await,
                events.next().await,
                events.next().await,
            ]
        });
        assert!(
            matches!(&got[0], CoreEvent::Trapped { label, reason, count: 10_000 }
                if label == "b" && reason == "trap 9999"),
            "{:?}",
            got[0]
        );
        assert!(
            matches!(&got[1], CoreEvent::Swapped { label, incarnation: 7, .. } if label == "a")
        );
        assert!(matches!(&got[2], CoreEvent::Trapped { count: 1, .. }));
        assert!(events.queue.lock().unwrap().is_empty());
    }

    /// One replica of voters {1, 2, 3} on real LMDB and a transport with no
    /// peers, running the native core; peer messages go in through
    /// `inbound`.
    struct NativeCore {
        dir: std::path::PathBuf,
        storage: Storage,
        metrics: Arc<Metrics>,
        epoch: Arc<AtomicU64>,
        transport: Arc<Transport>,
        core: Core,
        inbound: mpsc::Sender<crate::transport::Received>,
        events: Arc<Events>,
        factory: ProtocolFactory,
    }

    impl NativeCore {
        fn start(name: &str) -> NativeCore {
            let dir = std::env::temp_dir().join(format!("ballot-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let (storage, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
            let pki = crate::transport::tests::Pki::new(name);
            let (inbound, inbound_rx) = mpsc::channel(16);
            let metrics = Arc::new(Metrics::new());
            let epoch = Arc::new(AtomicU64::new(1));
            let transport = pki.alone(1, inbound.clone(), metrics.clone(), epoch.clone());
            let engine = crate::runtime::engine().unwrap();
            let factory: ProtocolFactory = Arc::new(move |incarnation| {
                let config = ballot_core::Config::new(1, incarnation, vec![1, 2, 3]);
                let policies = Policies::new(&engine, None).map_err(|e| e.to_string())?;
                Ok(Box::new(Replica::new(config, policies)?) as Box<dyn Protocol>)
            });
            let initial = Initial {
                label: "native".into(),
                factory: factory.clone(),
                incarnation: 1,
                members: Some(members(1)),
            };
            let (watchers, _config, _members) = Watchers::new();
            let events = Arc::new(Events::default());
            let core = start(
                initial,
                storage.clone(),
                inbound_rx,
                transport.clone(),
                metrics.clone(),
                watchers,
                events.clone(),
                epoch.clone(),
            )
            .unwrap();
            NativeCore {
                dir,
                storage,
                metrics,
                epoch,
                transport,
                core,
                inbound,
                events,
                factory,
            }
        }
    }

    /// Waits (up to 10 s) until the core has stepped once.
    async fn stepped(metrics: &Metrics, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !metrics
            .render()
            .lines()
            .any(|l| l.contains("guest_call_seconds_count") && l.contains("step"))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{what} was not stepped"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Puts `v` at `key` and waits until the core has stepped it: with the
    /// writer held at the log's append, its own fast acceptance waits. The
    /// answer comes on the receiver returned (keep it).
    async fn put_behind_the_writer(
        core: &Core,
        metrics: &Metrics,
        key: &[u8],
    ) -> oneshot::Receiver<Completion> {
        let (reply, answer) = oneshot::channel();
        let put = ballot_core::register::Command::Put(b"v".to_vec()).encode();
        core.requests
            .send(ClientRequest {
                key: key.to_vec(),
                op: Operation::Command(put),
                reply,
                charge: None,
            })
            .await
            .unwrap();
        stepped(metrics, "the put").await;
        answer
    }

    /// A replica is seen running a new epoch (the transport's stamp, the
    /// listing fence, and through them the status the membership driver
    /// waits on before the sweeps) only once every ready its core stepped
    /// before adopting it is durable. A fast acceptance of the epoch
    /// before, still on its way to the disk, would otherwise be missing
    /// from every sweep's listing. Real LMDB and log, the writer thread
    /// held at the log's append, the native core.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_epoch_is_published_once_what_was_stepped_before_it_is_durable() {
        let NativeCore {
            dir,
            storage,
            metrics,
            epoch,
            transport,
            core,
            ..
        } = NativeCore::start("settling");
        let held = storage.hold_writes();
        let _answer = put_behind_the_writer(&core, &metrics, b"k").await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let classic = Members {
            fast: false,
            ..members(2)
        };
        core.control.send(Control::Members(classic));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            epoch.load(Ordering::Acquire),
            1,
            "epoch 2 was published while a fast acceptance stepped in epoch 1 was not durable"
        );
        // A newer epoch adopted meanwhile waits for the same write, and is
        // what gets published once it lands.
        core.control.send(Control::Members(Members {
            fast: false,
            ..members(3)
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(epoch.load(Ordering::Acquire), 1, "epoch 3 jumped the write");
        drop(held);
        while epoch.load(Ordering::Acquire) != 3 {
            assert!(
                std::time::Instant::now() < deadline + Duration::from_secs(10),
                "epoch 3 was never published"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            storage.state_keys(None, 10).unwrap(),
            vec![b"k".to_vec()],
            "once the epoch is published, a listing finds the key"
        );
        transport.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What LMDB holds as `k`'s committed version and value.
    fn committed_k(storage: &Storage) -> Option<(u64, Option<Vec<u8>>)> {
        storage
            .committed(b"k")
            .unwrap()
            .map(|c| (c.version, c.value))
    }

    /// Peer 2's `Learn` of `k` = `v` at version 1, into the core.
    async fn send_learn(inbound: &mpsc::Sender<crate::transport::Received>) {
        let learn = ballot_core::wire::Msg::Learn {
            chosen: ballot_core::wire::Chosen {
                version: 1,
                value: Some(b"v".to_vec()),
                winners: vec![],
            },
        };
        inbound
            .send(crate::transport::Received::unbudgeted(vec![
                ballot_core::Inbound {
                    from: 2,
                    key: b"k".to_vec(),
                    payload: learn.encode_at(1),
                },
            ]))
            .await
            .unwrap();
    }

    /// Has the core learn `k` = `v` at version 1 from peer 2's `Learn`, and
    /// checks that it holds the decision in memory: stepped, not written
    /// (its timer fires 10 to 20 ms on).
    async fn hold_a_decision(
        inbound: &mpsc::Sender<crate::transport::Received>,
        metrics: &Metrics,
        storage: &Storage,
    ) {
        send_learn(inbound).await;
        stepped(metrics, "the Learn").await;
        assert_eq!(storage.committed(b"k").unwrap(), None, "held, not written");
    }

    /// A swap writes the decisions the instance holds in memory before it
    /// replaces it (design section 2, "Held decisions"). A swap usually
    /// comes to every replica at once, so without this a value learned just
    /// before it could be missing from every replica's changelog and
    /// `values`, and watchers would never see it. Real LMDB, the native
    /// core; the decision comes as a peer's `Learn`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_swap_writes_the_decisions_the_instance_held() {
        let NativeCore {
            dir,
            storage,
            metrics,
            transport,
            core,
            inbound,
            events,
            factory,
            ..
        } = NativeCore::start("held");
        hold_a_decision(&inbound, &metrics, &storage).await;
        core.control.send(Control::Swap {
            label: "native again".into(),
            factory,
        });
        let swapped = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("the swap happened");
        assert!(matches!(swapped, CoreEvent::Swapped { .. }), "{swapped:?}");
        // The flush's write lands in order after the swap, well before the
        // held decision's own timer would have fired in the old instance.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while storage.committed(b"k").unwrap().is_none() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(
            committed_k(&storage),
            Some((1, Some(b"v".to_vec()))),
            "the swap wrote the held decision"
        );
        transport.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A graceful stop writes the decisions the instance holds in memory
    /// before it answers (design section 2, "Held decisions"): replicas of
    /// a cluster stopped together would otherwise all drop a value learned
    /// in the last 20 ms, and it would be in no changelog. Real LMDB, the
    /// native core; the decision comes as a peer's `Learn`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_graceful_stop_writes_the_decisions_the_instance_held() {
        let NativeCore {
            dir,
            storage,
            metrics,
            transport,
            core,
            inbound,
            ..
        } = NativeCore::start("stop");
        hold_a_decision(&inbound, &metrics, &storage).await;
        core.stop().await;
        assert_eq!(
            committed_k(&storage),
            Some((1, Some(b"v".to_vec()))),
            "the stop wrote the held decision before it returned"
        );
        transport.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Steps the core has taken so far.
    fn steps(metrics: &Metrics) -> f64 {
        metrics
            .render()
            .lines()
            .find(|l| l.contains("guest_call_seconds_count") && l.contains("step"))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// A stop that comes while a ready is on its way to disk also writes
    /// what a step after it held: that step's timers, the held decision's
    /// among them, reach the core only once the ready before is durable,
    /// so the flush waits for every ready first. Real LMDB, the writer held
    /// at the log's append, the native core.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_writes_what_was_held_behind_a_ready_not_yet_durable() {
        let NativeCore {
            dir,
            storage,
            metrics,
            transport,
            core,
            inbound,
            ..
        } = NativeCore::start("stop-behind");
        let held = storage.hold_writes();
        let _answer = put_behind_the_writer(&core, &metrics, b"p").await;
        send_learn(&inbound).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while steps(&metrics) < 2.0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the Learn was not stepped"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let stopped = tokio::spawn(async move { core.stop().await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);
        stopped.await.unwrap();
        assert_eq!(
            committed_k(&storage),
            Some((1, Some(b"v".to_vec()))),
            "the stop wrote the decision held behind the put's ready"
        );
        transport.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_watcher_holds_the_newest_commit_only() {
        let (watchers, mut config, _members) = Watchers::new();
        publish(&watchers.config, (4, Some(b"v4".to_vec())));
        publish(&watchers.config, (5, Some(b"v5".to_vec())));
        publish(&watchers.config, (3, Some(b"v3".to_vec())));
        assert!(config.has_changed().unwrap());
        assert_eq!(*config.borrow_and_update(), (5, Some(b"v5".to_vec())));
        publish(&watchers.config, (5, None));
        assert!(!config.has_changed().unwrap(), "not newer: not seen");
    }
}
