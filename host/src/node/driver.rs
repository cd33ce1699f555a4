//! The core thread's loop: batch, step, hand the ready to the writer,
//! release in order once durable, and swap or recover the protocol
//! instance in between.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballot_control::pipeline::{Pipeline, Step};
use ballot_core::{
    Actions, Batch, Completion, Failure, FailureReason, Inbound, KeyState, Members, Operation,
    Outcome, Ready, Request, Timer, Trace,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use super::checks;
use super::clock::Clock;
use super::forwards::Forwards;

use super::{
    ClientRequest, Control, CoreEvent, Events, Health, Mailbox, Protocol, ProtocolFactory,
    Watchers, BATCH_BYTES_MAX, BATCH_MAX, INFLIGHT_BYTES_MAX, KEY_MAX, PIPELINE_MAX,
    STEP_STATE_BYTES_MAX, STOP_FLUSH_MAX, SWAP_DRAIN_MAX,
};
use crate::metrics::{label, labels2, Metrics};
use crate::runtime::RuntimeError;
use crate::storage::Storage;
use crate::system::MEMBERS_KEY;
use crate::transport::{Message, Received, Transport};

pub(super) struct Client {
    reply: oneshot::Sender<Completion>,
    op: &'static str,
    started: Instant,
    /// What the request brought into the guest (see `inflight_bytes`).
    bytes: usize,
}

pub(super) struct Swapping {
    label: String,
    factory: ProtocolFactory,
    since: Instant,
}

/// A graceful stop in progress (`Control::Stop`).
pub(super) struct Stopping {
    /// Answered once the held decisions are written and durable.
    done: Option<oneshot::Sender<()>>,
    since: Instant,
    /// The held keys still to write; `None` until the flush begins.
    to_flush: Option<Vec<Vec<u8>>>,
}

pub(super) struct Driver {
    pub(super) protocol: Box<dyn Protocol>,
    /// What `protocol` runs, and how to build another instance of it.
    pub(super) label: String,
    pub(super) factory: ProtocolFactory,
    pub(super) swapping: Option<Swapping>,
    pub(super) stopping: Option<Stopping>,
    pub(super) events: Arc<Events>,
    pub(super) storage: Storage,
    pub(super) transport: Arc<Transport>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<Health>,
    pub(super) ready_tx: std::sync::mpsc::SyncSender<Ready>,
    /// Readies stepped and not released: their numbering, early actions,
    /// the states they write and the watched commits among them.
    pub(super) pipeline: Pipeline,
    pub(super) clients: HashMap<u64, Client>,
    /// Bytes of the client requests in `clients`: the guest holds each
    /// command (and copies of it) until it is answered, so no new request
    /// is taken while this is over [`INFLIGHT_BYTES_MAX`].
    pub(super) inflight_bytes: usize,
    pub(super) timers: BinaryHeap<Reverse<(u64, u64, Vec<u8>)>>,
    pub(super) next_request: u64,
    /// What timers fire by and `batch.now-ms` carries (see `clock`).
    pub(super) clock: Clock,
    pub(super) seed: u64,
    pub(super) watchers: Watchers,
    /// The membership adopted since start, applied to every new instance.
    pub(super) members: Option<Members>,
    /// The epoch the running instance has adopted, published once every
    /// ready stepped before the adoption is durable (see `settling`). The
    /// transport stamps frames with it, listings are fenced by it, and the
    /// replica's status reports no newer epoch.
    pub(super) epoch: Arc<AtomicU64>,
    /// An epoch adopted while readies stepped before it were not durable
    /// yet, and the host number of the newest of them. A fast acceptance of
    /// the epoch before may be on its way to LMDB; a sweep's listing reads
    /// LMDB, so the replica must not be seen running the new epoch (the
    /// membership driver starts the sweeps once every voter does) before
    /// that acceptance is there to be listed (design section 11, point 3).
    pub(super) settling: Option<(u64, u64)>,
    /// Commands peers forwarded to the running instance (see `forwards`).
    pub(super) forwards: Forwards,
    pub(super) leaders: Arc<super::Leaders>,
    /// Events for the next step that came from no queue: forwards held
    /// during a swap, handed to the new instance, and the events of keys a
    /// step left out to stay within [`STEP_STATE_BYTES_MAX`]. They go
    /// first, so each key's events keep their order.
    pub(super) carry: Batch,
}

/// Puts `front` before what `list` holds.
fn prepend<T>(list: &mut Vec<T>, mut front: Vec<T>) {
    if !front.is_empty() {
        front.append(list);
        *list = front;
    }
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
    pub(super) async fn run(
        mut self,
        mut requests: mpsc::Receiver<ClientRequest>,
        mut inbound: mpsc::Receiver<Received>,
        mut durable: mpsc::Receiver<Result<u64, String>>,
        control: &Mailbox,
    ) {
        loop {
            // A stop taken in the last turn writes what is held here, once
            // that turn's events are stepped.
            self.try_stop();
            let mut batch = Batch::default();
            let fatal = self.health.fatal().is_some();
            let open = self.pipeline.len() < PIPELINE_MAX && !fatal;
            // While a swap drains, client requests wait in their queue.
            // Peers' forwarded commands are still taken while this
            // replica's own commands are in flight (see `accept`), then
            // held; once its own commands and the forwarded ones it took
            // are answered, peer messages wait too, so the last readies
            // are released and the swap happens.
            // A stopping core takes nothing new: what it holds is written
            // once, and an event taken after that could be held again.
            let stopping = self.stopping.is_some();
            let admit = open
                && !stopping
                && self.swapping.is_none()
                && self.inflight_bytes < INFLIGHT_BYTES_MAX;
            let idle = self.clients.is_empty() && !self.forwards.busy();
            let listen = open && !stopping && !(self.swapping.is_some() && idle);
            // Carried events stay in `carry` until the step takes them, so
            // a swap or a restart in between sees them (`try_swap`,
            // `replace`).
            let handed = open && !self.carry_is_empty();
            let swap_tick = (self.swapping.is_some() || stopping)
                .then(|| tokio::time::Instant::now() + Duration::from_millis(20));
            let deadline = self
                .timers
                .peek()
                .map(|Reverse((at, _, _))| self.clock.deadline(*at));
            tokio::select! {
                biased;
                d = durable.recv() => match d {
                    Some(d) => self.on_durable(d),
                    None => self.health.stop("the writer thread ended".into()),
                },
                _ = control.wait() => {}
                _ = sleep_until(swap_tick), if swap_tick.is_some() => {}
                _ = std::future::ready(()), if handed => {}
                r = requests.recv(), if admit || fatal => match r {
                    Some(r) if fatal => self.refuse(r),
                    Some(r) => { self.admit(r, &mut batch); }
                    None => return,
                },
                m = inbound.recv(), if listen => if let Some(m) = m {
                    self.accept(m.into_messages(), &mut batch)
                },
                _ = sleep_until(deadline), if open && !stopping && deadline.is_some() => {}
            }
            while let Ok(d) = durable.try_recv() {
                self.on_durable(d);
            }
            for c in control.take() {
                match c {
                    Control::Rebind(bound) => self.protocol.policies().rebind(bound),
                    Control::Swap { label, factory } => {
                        debug!(%label, "protocol swap: draining");
                        self.swapping = Some(Swapping {
                            label,
                            factory,
                            since: Instant::now(),
                        });
                    }
                    Control::Members(members) => self.adopt(members),
                    Control::Stop(done) => {
                        debug!("stopping: writing what the instance holds");
                        self.stopping = Some(Stopping {
                            done: Some(done),
                            since: Instant::now(),
                            to_flush: None,
                        });
                    }
                }
            }
            self.try_swap();
            if self.health.fatal().is_some() {
                self.inflight_bytes = 0;
                self.carry = Batch::default();
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
            if self.pipeline.len() >= PIPELINE_MAX {
                continue;
            }
            let mut events = batch.requests.len()
                + batch.messages.len()
                + self.carry.requests.len()
                + self.carry.messages.len();
            let mut bytes: usize = (batch.requests.iter().chain(&self.carry.requests))
                .map(request_bytes)
                .sum::<usize>()
                + (batch.messages.iter().chain(&self.carry.messages))
                    .map(message_bytes)
                    .sum::<usize>();
            while events < BATCH_MAX && bytes < BATCH_BYTES_MAX {
                let mut more = false;
                // A stop taken this turn takes effect at once: what comes
                // after it could be held after the flush.
                let stopping = self.stopping.is_some();
                if !stopping && self.swapping.is_none() && self.inflight_bytes < INFLIGHT_BYTES_MAX
                {
                    if let Ok(r) = requests.try_recv() {
                        bytes += self.admit(r, &mut batch);
                        more = true;
                    }
                }
                if listen && !stopping {
                    if let Ok(m) = inbound.try_recv() {
                        let before = batch.messages.len();
                        self.accept(m.into_messages(), &mut batch);
                        bytes += batch.messages[before..]
                            .iter()
                            .map(message_bytes)
                            .sum::<usize>();
                        more = true;
                    }
                }
                if !more {
                    break;
                }
                events = batch.requests.len() + batch.messages.len();
            }
            let now = self.clock.now_ms();
            while let Some(Reverse((at, _, _))) = self.timers.peek() {
                if *at > now || self.stopping.is_some() {
                    break;
                }
                let Reverse((at_ms, token, key)) = self.timers.pop().expect("peeked");
                batch.timers.push(Timer { key, token, at_ms });
            }
            if batch.requests.is_empty()
                && batch.messages.is_empty()
                && batch.timers.is_empty()
                && self.carry_is_empty()
            {
                continue;
            }
            self.step(batch, now, &[]);
        }
    }

    /// Hands a client request to the next step; returns its bytes.
    fn admit(&mut self, r: ClientRequest, batch: &mut Batch) -> usize {
        let id = self.next_request;
        self.next_request += 1;
        let request = Request {
            id,
            key: r.key,
            op: r.op,
        };
        let bytes = request_bytes(&request);
        self.inflight_bytes += bytes;
        self.clients.insert(
            id,
            Client {
                reply: r.reply,
                op: op_name(&request.op),
                started: Instant::now(),
                bytes,
            },
        );
        batch.requests.push(request);
        bytes
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
        // Forwarded commands are held for the next instance only once this
        // replica's own commands are answered. Holding them earlier makes
        // a cycle when every replica swaps at once: replica 1 waits for its
        // commands forwarded to 3 while holding 3's, and 3 the reverse,
        // until the senders give up on the silent leader (a client error,
        // `maybe_applied`). Each command taken now finishes in a round trip
        // (this replica leads its key), and no new own command starts while
        // a swap drains, so the drain still ends.
        let draining = self.swapping.is_some() && self.clients.is_empty();
        for m in messages {
            if m.key.is_empty() || m.key.len() > KEY_MAX {
                warn!(
                    from = m.from,
                    "dropped a peer message with a {}-byte key",
                    m.key.len()
                );
                continue;
            }
            if let Some(m) = self.forwards.inbound(m, draining) {
                batch.messages.push(m);
            }
        }
        let dropped = self.forwards.take_dropped();
        if dropped > 0 {
            self.metrics.forwards_dropped.inc_by(dropped);
        }
    }

    /// Steps `batch`, with the states of its events' keys and of `extra`.
    fn step(&mut self, mut batch: Batch, now: u64, extra: &[Vec<u8>]) {
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
        // Carried events go first. A request whose client was answered
        // meanwhile (the instance trapped or was swapped, `abandon_clients`)
        // is not run.
        let mut carry = std::mem::take(&mut self.carry);
        carry.requests.retain(|r| self.clients.contains_key(&r.id));
        batch.requests.retain(|r| self.clients.contains_key(&r.id));
        let carried = (
            carry.requests.len(),
            carry.messages.len(),
            carry.timers.len(),
        );
        prepend(&mut batch.requests, carry.requests);
        prepend(&mut batch.messages, carry.messages);
        prepend(&mut batch.timers, carry.timers);
        // Each key's state goes into the guest with the step: in the order
        // the keys first appear, carried events' keys first (so a key whose
        // only event is a carried timer is not passed over for ever), until
        // their bytes pass the bound. The events of the keys left out wait
        // for the next step, which takes them first.
        let mut keys: Vec<&[u8]> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let (r, m, t) = carried;
        let all = (batch.requests[..r].iter().map(|x| &x.key[..]))
            .chain(batch.messages[..m].iter().map(|x| &x.key[..]))
            .chain(batch.timers[..t].iter().map(|x| &x.key[..]))
            .chain(batch.requests[r..].iter().map(|x| &x.key[..]))
            .chain(batch.messages[m..].iter().map(|x| &x.key[..]))
            .chain(batch.timers[t..].iter().map(|x| &x.key[..]))
            .chain(extra.iter().map(|k| &k[..]));
        for key in all {
            if seen.insert(key) {
                keys.push(key);
            }
        }
        let pipeline = &self.pipeline;
        let loaded = self
            .storage
            .states_within(&keys, STEP_STATE_BYTES_MAX, |k| pipeline.state(k));
        let states: Vec<KeyState> = match loaded {
            Ok(found) => found
                .into_iter()
                .map(|(key, state)| KeyState {
                    key: key.to_vec(),
                    state,
                })
                .collect(),
            Err(e) => return self.health.stop(format!("storage read failed: {e}")),
        };
        if states.len() < keys.len() {
            let later: std::collections::HashSet<Vec<u8>> =
                keys[states.len()..].iter().map(|k| k.to_vec()).collect();
            self.metrics.step_deferred.inc_by(later.len() as u64);
            let (now, next) = std::mem::take(&mut batch.requests)
                .into_iter()
                .partition(|r| !later.contains(&r.key));
            batch.requests = now;
            self.carry.requests.extend::<Vec<_>>(next);
            let (now, next) = std::mem::take(&mut batch.messages)
                .into_iter()
                .partition(|m| !later.contains(&m.key));
            batch.messages = now;
            self.carry.messages.extend::<Vec<_>>(next);
            let (now, next) = std::mem::take(&mut batch.timers)
                .into_iter()
                .partition(|t| !later.contains(&t.key));
            batch.timers = now;
            self.carry.timers.extend::<Vec<_>>(next);
        }
        let mut touched: Vec<Vec<u8>> = states.iter().map(|s| s.key.clone()).collect();
        touched.sort_unstable();
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
        if let Err(reason) = checks::ready(&ready, &touched) {
            return self.recover(RuntimeError::Invalid {
                call: "step",
                reason,
            });
        }
        self.observe_guest("step", started);
        let stepped = self.pipeline.stepped(&mut ready);
        if let Some(early) = stepped.early {
            self.dispatch(early);
        }
        if stepped.durable_now {
            return self.on_durable(Ok(stepped.host));
        }
        if self.ready_tx.send(ready).is_err() {
            self.health.stop("the writer thread ended".into());
        }
    }

    fn carry_is_empty(&self) -> bool {
        self.carry.requests.is_empty()
            && self.carry.messages.is_empty()
            && self.carry.timers.is_empty()
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
        let durable = self.pipeline.durable(upto);
        if let Some((epoch, host)) = self.settling {
            if upto >= host {
                self.settling = None;
                self.epoch.store(epoch, Ordering::Release);
            }
        }
        for (key, commit) in durable.commits {
            let to = if key == MEMBERS_KEY {
                &self.watchers.members
            } else {
                &self.watchers.config
            };
            super::publish(to, (commit.version, commit.value));
        }
        for step in durable.steps {
            match step {
                Step::Apply(actions) => self.dispatch(actions),
                Step::Release(guest) => {
                    let started = Instant::now();
                    let released = self.protocol.release(guest).and_then(|actions| {
                        checks::actions(&actions)
                            .map(|()| actions)
                            .map_err(|reason| RuntimeError::Invalid {
                                call: "release",
                                reason,
                            })
                    });
                    match released {
                        Ok(actions) => {
                            self.observe_guest("release", started);
                            self.dispatch(actions);
                        }
                        // The steps after it belong to the instance that
                        // failed: `recover` forgets them.
                        Err(e) => return self.recover(e),
                    }
                }
            }
        }
    }

    /// Fails every waiting client with `message` (they may have applied).
    fn abandon_clients(&mut self, message: &str) -> usize {
        let clients = std::mem::take(&mut self.clients);
        self.inflight_bytes = 0;
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
        self.pipeline.forget_instance();
        // Timer tokens belong to the instance that armed them; carried
        // requests were answered with the instance's end.
        self.timers.clear();
        self.carry.timers.clear();
        self.carry.requests.clear();
        let handed = self.forwards.swapped(incarnation);
        self.carry.messages.extend(handed);
        Ok(incarnation)
    }

    /// Moves the running instance to `members` if it is newer than what it
    /// runs. A trap replaces the instance and the fresh one is asked once
    /// more. An instance that cannot run the epoch stops the replica: the
    /// membership layer has made the epoch durable, the replica resumes it
    /// after a restart and its peers have moved on, so an instance left
    /// voting on an older epoch would be counted where it must not be
    /// (design section 11).
    fn adopt(&mut self, members: Members) {
        let epoch = members.epoch;
        let failure = match self.try_adopt(&members) {
            Ok(()) => return,
            Err(e @ RuntimeError::Refused(_)) => e,
            Err(e) => {
                self.recover(e);
                match self.try_adopt(&members) {
                    Ok(()) => return,
                    Err(e) => e,
                }
            }
        };
        self.health.stop(format!(
            "the protocol cannot run membership epoch {epoch}, which this replica \
             adopted: {failure}"
        ));
    }

    /// [`Driver::adopt`] on the running instance.
    fn try_adopt(&mut self, members: &Members) -> Result<(), RuntimeError> {
        if self
            .members
            .as_ref()
            .is_some_and(|m| m.epoch >= members.epoch)
        {
            return Ok(());
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
                self.members = Some(members.clone());
                match self.pipeline.newest() {
                    Some(host) => self.settling = Some((epoch, host)),
                    None => self.epoch.store(epoch, Ordering::Release),
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// After a trap: the instance's memory may be half-written, so it is
    /// dropped and a fresh one of the same component takes over. Clients
    /// waiting on it get an error (their commands may still apply).
    fn recover(&mut self, failure: RuntimeError) {
        error!(label = %self.label, "protocol component failed, restarting it: {failure}");
        self.metrics
            .protocol_restarts
            .get_or_create(&label("cause", failure.kind()))
            .inc();
        let reason = failure.to_string();
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
        self.events.push(CoreEvent::Trapped {
            label: self.label.clone(),
            reason,
            count: 1,
        });
    }

    /// Writes what the instance holds in memory before it is replaced
    /// (design section 2, "Held decisions"): each held decision has a
    /// timer armed on its key, and a step given those keys' states with no
    /// event writes them. A swap usually comes to every replica at once, so
    /// without this a value could be missing from every changelog. The
    /// writes need not be durable before the swap: they land in order, and
    /// the next instance reads them through the pipeline's overlay. Keys
    /// go 8 to a step (a client key's state holds at most two values of at
    /// most 1 MiB, so a step stays under `STEP_STATE_BYTES_MAX`; the
    /// cluster's own keys, whose values may be 8 MiB, are never held and
    /// are left out), while the pipeline has room and no event is carried;
    /// past that, what is left is lost as in a crash.
    fn flush_held(&mut self) {
        let mut keys = self.held_keys();
        self.flush_keys(&mut keys);
    }

    /// The client keys with a timer armed: among them, every key whose
    /// decision the instance holds in memory.
    fn held_keys(&self) -> Vec<Vec<u8>> {
        let mut keys: Vec<Vec<u8>> = self
            .timers
            .iter()
            .map(|Reverse((_, _, k))| k)
            .filter(|k| k.first() != Some(&0))
            .cloned()
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Steps `keys` with no event, 8 to a step, from the front, while the
    /// pipeline has room, health is fine and nothing is carried; what is
    /// stepped leaves `keys`.
    fn flush_keys(&mut self, keys: &mut Vec<Vec<u8>>) {
        while !keys.is_empty() {
            // A step hands carried events to the instance it steps: those
            // (a drain that timed out) are for the next instance.
            if self.pipeline.len() >= PIPELINE_MAX
                || self.health.fatal().is_some()
                || !self.carry_is_empty()
            {
                return;
            }
            let chunk: Vec<Vec<u8>> = keys.drain(..keys.len().min(8)).collect();
            let now = self.clock.now_ms();
            self.step(Batch::default(), now, &chunk);
        }
    }

    /// Writes the held decisions of a stopping core and answers the stop
    /// once they are durable, or once [`STOP_FLUSH_MAX`] has passed.
    ///
    /// The flush begins once every ready is durable and nothing is
    /// carried: a step's timers (a held decision's among them) reach the
    /// core only when every earlier ready is durable, so before that a
    /// held key may not be known yet. The core takes nothing new while it
    /// stops, and a flush step holds nothing again, so the keys listed
    /// then are all there are; they are stepped over as many turns as the
    /// pipeline's room needs.
    fn try_stop(&mut self) {
        let Some(stop) = &mut self.stopping else {
            return;
        };
        let late = stop.since.elapsed() >= STOP_FLUSH_MAX;
        let mut to_flush = stop.to_flush.take();
        if to_flush.is_none() && self.pipeline.is_empty() && self.carry_is_empty() {
            to_flush = Some(self.held_keys());
        }
        if let (Some(keys), false) = (&mut to_flush, late) {
            self.flush_keys(keys);
        }
        let stop = self.stopping.as_mut().expect("checked above");
        stop.to_flush = to_flush;
        let flushed = stop.to_flush.as_ref().is_some_and(|k| k.is_empty());
        // A stopped replica writes nothing more.
        let fatal = self.health.fatal().is_some();
        if (flushed && self.pipeline.is_empty()) || late || fatal {
            if let Some(done) = stop.done.take() {
                info!(
                    waited_ms = stop.since.elapsed().as_millis() as u64,
                    unwritten = self.pipeline.len(),
                    unflushed = stop.to_flush.as_ref().map_or(0, Vec::len),
                    "core stopped"
                );
                let _ = done.send(());
            }
        }
    }

    /// Finishes a swap once nothing is in flight (or the drain deadline
    /// has passed).
    fn try_swap(&mut self) {
        let Some(swap) = &self.swapping else {
            return;
        };
        let drained = self.clients.is_empty()
            && !self.forwards.busy()
            && self.pipeline.is_empty()
            && self.carry_is_empty();
        let waited = swap.since.elapsed();
        if !drained && waited < SWAP_DRAIN_MAX {
            return;
        }
        self.flush_held();
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
                self.events.push(CoreEvent::Swapped {
                    label: swap.label,
                    incarnation,
                    drained: waited,
                    abandoned,
                });
            }
            Err(e) => {
                // The old instance was not touched: keep running it.
                error!(to = %swap.label, "protocol swap failed, staying on {}: {e}", self.label);
                let kept = self.forwards.kept();
                self.carry.messages.extend(kept);
            }
        }
    }

    fn dispatch(&mut self, actions: Actions) {
        let mut by_peer: HashMap<u32, Vec<Message>> = HashMap::new();
        self.leaders.observe(&actions.send);
        for o in actions.send {
            self.forwards.outbound(&o);
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

    fn complete(&mut self, mut c: Completion) {
        checks::clamp_texts(&mut c);
        let Some(client) = self.clients.remove(&c.id) else {
            debug!(id = c.id, "completion for an unknown request");
            return;
        };
        self.inflight_bytes = self.inflight_bytes.saturating_sub(client.bytes);
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
            // "led": phase 2 only, by the key's leader (a forwarded
            // command reports the leader's trace).
            let path = match (c.trace.fast, c.trace.prepares) {
                (true, _) => "fast",
                (false, 0) => "led",
                (false, _) => "classic",
            };
            m.proposals_chosen.get_or_create(&label("path", path)).inc();
        }
        m.retries.inc_by(c.trace.attempts.saturating_sub(1) as u64);
        m.ballot_bumps.inc_by(c.trace.prepares as u64);
        let _ = client.reply.send(c);
    }
}

/// Bytes a client request brings into a step.
fn request_bytes(r: &Request) -> usize {
    super::op_bytes(&r.key, &r.op)
}

/// Bytes a peer message brings into a step.
fn message_bytes(m: &Inbound) -> usize {
    m.key.len() + m.payload.len()
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
