//! The protocol component in one store per replica ([`WasmCore`]), and
//! the conversions between its WIT types and `ballot_core`'s.

use std::time::{Duration, Instant};

use ballot_core as core;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store, StoreLimits, UpdateDeadline};

use crate::*;

struct ProtocolHost {
    limits: StoreLimits,
    policies: Policies,
    /// When the call in progress began, and how much of it its policies'
    /// calls took: the protocol's own time is the difference.
    started: Instant,
    /// Its thread's CPU time at the call's first epoch tick, and the wall
    /// time the call had run by then. Taken there rather than at the
    /// call's start: reading a thread's CPU clock is a system call (half a
    /// microsecond or more in a VM, about a tenth of a short call), and
    /// nearly every call ends before a tick.
    cpu_mark: Option<(Duration, Duration)>,
    in_policies: Duration,
}

impl ProtocolHost {
    /// What is left of the call's own time limit, in ticks; `None` once it
    /// is spent. The call is stopped only once its thread has also used
    /// that much CPU since it began: time the thread did not run (a loaded
    /// machine, a paused VM) is not the protocol's. The time before the
    /// first tick (at most one tick) counts as run.
    fn ticks_left(&mut self) -> Option<u64> {
        let now = thread_cpu();
        let elapsed = self.started.elapsed();
        if self.cpu_mark.is_none() {
            self.cpu_mark = now.map(|cpu| (cpu, run_before_mark(elapsed)));
        }
        let ran = ran_since(self.cpu_mark, now, elapsed);
        call_left(elapsed.saturating_sub(self.in_policies), ran)
            .map(|left| ticks(left.as_millis() as u64))
    }
}

/// What counts as run before the CPU mark: the wall time since the call
/// began, but at most one tick. The mark comes at the first epoch check
/// after a tick, so a call that ran before it ran less than a tick; time
/// beyond that is time the thread was not running wasm (descheduled,
/// paused, in a host import), which is not the protocol's.
fn run_before_mark(elapsed: Duration) -> Duration {
    elapsed.min(Duration::from_millis(TICK_MS))
}

/// How long a call's thread has run: from the CPU mark on, plus what
/// counted as run before it; the wall time when there is no CPU clock.
fn ran_since(
    mark: Option<(Duration, Duration)>,
    now: Option<Duration>,
    elapsed: Duration,
) -> Duration {
    match (mark, now) {
        (Some((cpu, before)), Some(now)) => before + now.saturating_sub(cpu),
        _ => elapsed,
    }
}

/// What is left of a protocol call's limit given its own wall time and
/// how long its thread ran: `None` once either says it is spent.
fn call_left(own: Duration, ran: Duration) -> Option<Duration> {
    if own >= Duration::from_millis(PROTOCOL_CALL_WALL_MAX_MS) {
        return None;
    }
    let limit = Duration::from_millis(PROTOCOL_CALL_MS);
    let left = limit.saturating_sub(own).max(limit.saturating_sub(ran));
    (!left.is_zero()).then_some(left)
}

impl protocol_world::ballot::core::log::Host for ProtocolHost {
    fn emit(&mut self, level: protocol_world::ballot::core::log::Level, message: String) {
        log(level as u8, &message)
    }
}

impl imp::Host for ProtocolHost {
    fn describe(&mut self) -> (String, String) {
        ("register".to_string(), register_version().to_string())
    }

    fn apply(
        &mut self,
        key: Vec<u8>,
        current: imp::Current,
        command: Vec<u8>,
        now_ms: u64,
    ) -> Result<imp::Change, imp::Rejection> {
        if self.in_policies >= Duration::from_millis(POLICY_STEP_MS) {
            return Err(imp::Rejection {
                code: POLICY_FAILED.to_string(),
                message: format!(
                    "this step's policy calls used their {POLICY_STEP_MS} ms; the command \
                     was not evaluated"
                ),
            });
        }
        let current = core::Current {
            value: current.value,
            version: current.version,
        };
        let start = Instant::now();
        let result = core::Env::apply(&mut self.policies, &key, &current, &command, now_ms);
        self.in_policies += start.elapsed();
        match result {
            Ok(core::Change::Keep) => Ok(imp::Change::Keep),
            Ok(core::Change::Set(v)) => Ok(imp::Change::Set(v)),
            Ok(core::Change::Remove) => Ok(imp::Change::Remove),
            Err(r) => Err(imp::Rejection {
                code: r.code,
                message: r.message,
            }),
        }
    }
}

/// A replica whose protocol runs in a wasm component.
pub struct WasmCore {
    store: Store<ProtocolHost>,
    bindings: protocol_world::Protocol,
    instance: wasmtime::component::Instance,
}

impl WasmCore {
    /// Instantiates the protocol component in a store of its own, calling
    /// its policies through `policies`.
    pub(super) fn new(
        engine: &Engine,
        protocol: &Component,
        policies: Policies,
        config: core::Config,
    ) -> Result<WasmCore, Error> {
        let mut linker = Linker::<ProtocolHost>::new(engine);
        protocol_world::Protocol::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| err("linking the protocol component", e))?;
        let host = ProtocolHost {
            limits: limits(MEMORY_MAX_BYTES),
            policies,
            started: Instant::now(),
            cpu_mark: None,
            in_policies: Duration::ZERO,
        };
        let mut store = Store::new(engine, host);
        store.limiter(|s| &mut s.limits);
        // The deadline passes at the call's first tick, then at every tick
        // beyond its limit less what its policies took; the call stops once
        // its own time is spent.
        store.epoch_deadline_callback(|mut store| {
            Ok(match store.data_mut().ticks_left() {
                Some(ticks) => UpdateDeadline::Continue(ticks),
                None => UpdateDeadline::Interrupt,
            })
        });
        store.set_epoch_deadline(1);
        let instance = linker
            .instantiate(&mut store, protocol)
            .map_err(|e| err("instantiating the protocol component", e))?;
        let bindings = protocol_world::Protocol::new(&mut store, &instance)
            .map_err(|e| err("the protocol component's exports", e))?;
        let wit_config = wit::Config {
            self_id: config.self_id,
            incarnation: config.incarnation,
            voters: config.voters,
            fast_timeout_ms: config.fast_timeout_ms,
            round_timeout_ms: config.round_timeout_ms,
            attempts_max: config.attempts_max,
            inflight_max: config.inflight_max,
        };
        let mut core = WasmCore {
            store,
            bindings,
            instance,
        };
        core.arm();
        core.bindings
            .ballot_core_replica()
            .call_init(&mut core.store, &wit_config)
            .map_err(|e| call_failed("init", &e))?
            .map_err(|e| {
                RuntimeError::Refused(format!("the protocol refused its configuration: {e}"))
            })?;
        Ok(core)
    }

    /// The policies this replica's protocol calls.
    pub fn policies_mut(&mut self) -> &mut Policies {
        &mut self.store.data_mut().policies
    }

    /// Starts a call's time limit.
    fn arm(&mut self) {
        let host = self.store.data_mut();
        host.started = Instant::now();
        host.cpu_mark = None;
        host.in_policies = Duration::ZERO;
        self.store.set_epoch_deadline(1);
    }

    /// Runs the component's `self-check` export; false when it has none.
    pub fn self_check(&mut self) -> Result<bool, Error> {
        self.arm();
        self_check_export(&mut self.store, &self.instance)
    }

    /// The component's own description.
    pub fn describe(&mut self) -> Result<core::Info, Error> {
        self.arm();
        let i = self
            .bindings
            .ballot_core_replica()
            .call_describe(&mut self.store)
            .map_err(|e| call_failed("describe", &e))?;
        Ok(core::Info {
            name: i.name,
            version: i.version,
            state_formats: i.state_formats,
            wire_formats: i.wire_formats,
        })
    }

    /// Steps the guest. An error means the guest trapped: this instance is
    /// poisoned and must be dropped.
    pub fn try_step(&mut self, batch: core::Batch) -> Result<core::Ready, Error> {
        let batch = wit::Batch {
            now_ms: batch.now_ms,
            seed: batch.seed,
            states: batch
                .states
                .into_iter()
                .map(|s| wit::KeyState {
                    key: s.key,
                    state: s.state,
                })
                .collect(),
            requests: batch
                .requests
                .into_iter()
                .map(|r| wit::Request {
                    id: r.id,
                    key: r.key,
                    op: match r.op {
                        core::Operation::Command(c) => wit::Operation::Command(c),
                        core::Operation::Read(core::Consistency::Linearizable) => {
                            wit::Operation::Read(wit::Consistency::Linearizable)
                        }
                        core::Operation::Read(core::Consistency::Local) => {
                            wit::Operation::Read(wit::Consistency::Local)
                        }
                    },
                })
                .collect(),
            messages: batch
                .messages
                .into_iter()
                .map(|m| wit::Inbound {
                    from: m.from,
                    key: m.key,
                    payload: m.payload,
                })
                .collect(),
            timers: batch
                .timers
                .into_iter()
                .map(|t| wit::Timer {
                    key: t.key,
                    token: t.token,
                    at_ms: t.at_ms,
                })
                .collect(),
        };
        self.arm();
        let ready = self
            .bindings
            .ballot_core_replica()
            .call_step(&mut self.store, &batch)
            .map_err(|e| call_failed("step", &e))?;
        Ok(core::Ready {
            early: actions(ready.early),
            id: ready.id,
            persist: ready
                .persist
                .into_iter()
                .map(|w| core::Write {
                    key: w.key,
                    state: w.state,
                    commit: w.commit.map(|c| core::Commit {
                        version: c.version,
                        value: c.value,
                    }),
                })
                .collect(),
        })
    }

    /// Releases a persisted ready. An error means the guest trapped.
    /// Moves the instance to a newer membership epoch. `Err` carries the
    /// protocol's refusal or a trap.
    pub fn try_reconfigure(&mut self, members: core::Members) -> Result<(), Error> {
        self.arm();
        let m = wit_members::Members {
            epoch: members.epoch,
            voters: members.voters,
            learners: members.learners,
            fast: members.fast,
        };
        self.bindings
            .ballot_core_membership()
            .call_reconfigure(&mut self.store, &m)
            .map_err(|e| call_failed("reconfigure", &e))?
            .map_err(|e| RuntimeError::Refused(format!("the protocol refused the membership: {e}")))
    }

    pub fn try_release(&mut self, id: u64) -> Result<core::Actions, Error> {
        self.arm();
        let a = self
            .bindings
            .ballot_core_replica()
            .call_release(&mut self.store, id)
            .map_err(|e| call_failed("release", &e))?;
        Ok(actions(a))
    }
}

fn actions(a: wit::Actions) -> core::Actions {
    core::Actions {
        send: a
            .send
            .into_iter()
            .map(|o| core::Outbound {
                to: o.to,
                key: o.key,
                payload: o.payload,
            })
            .collect(),
        complete: a
            .complete
            .into_iter()
            .map(|c| core::Completion {
                id: c.id,
                outcome: outcome(c.outcome),
                trace: core::Trace {
                    changed: c.trace.changed,
                    prior_absent: c.trace.prior_absent,
                    fast: c.trace.fast,
                    attempts: c.trace.attempts,
                    prepares: c.trace.prepares,
                },
            })
            .collect(),
        timers: a
            .timers
            .into_iter()
            .map(|t| core::Timer {
                key: t.key,
                token: t.token,
                at_ms: t.at_ms,
            })
            .collect(),
    }
}

fn current(c: imp::Current) -> core::Current {
    core::Current {
        value: c.value,
        version: c.version,
    }
}

fn outcome(o: wit::Outcome) -> core::Outcome {
    match o {
        wit::Outcome::Done(c) => core::Outcome::Done(current(c)),
        wit::Outcome::Rejected((r, c)) => core::Outcome::Rejected(
            core::Rejection {
                code: r.code,
                message: r.message,
            },
            current(c),
        ),
        wit::Outcome::Failed(f) => core::Outcome::Failed(core::Failure {
            reason: match f.reason {
                wit::FailureReason::NoQuorum => core::FailureReason::NoQuorum,
                wit::FailureReason::Contention => core::FailureReason::Contention,
                wit::FailureReason::Overloaded => core::FailureReason::Overloaded,
                wit::FailureReason::Invalid => core::FailureReason::Invalid,
            },
            maybe_applied: f.maybe_applied,
            message: f.message,
        }),
    }
}

impl core::Core for WasmCore {
    fn step(&mut self, batch: core::Batch) -> core::Ready {
        self.try_step(batch)
            .unwrap_or_else(|e| panic!("protocol component failed: {e}"))
    }

    fn release(&mut self, id: u64) -> core::Actions {
        self.try_release(id)
            .unwrap_or_else(|e| panic!("protocol component failed: {e}"))
    }

    fn reconfigure(&mut self, members: core::Members) -> Result<(), String> {
        self.try_reconfigure(members).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_call_is_stopped_once_its_wall_time_and_its_threads_run_are_spent() {
        // Its own wall time is spent but its thread ran little: it goes on.
        assert_eq!(call_left(2_500 * MS, 600 * MS), Some(1_400 * MS));
        // Both spent: stopped.
        assert_eq!(call_left(2_500 * MS, 2_000 * MS), None);
        // Past the wall-time cap, whatever the CPU clock says.
        assert_eq!(call_left(20_000 * MS, 0 * MS), None);
        assert_eq!(call_left(10 * MS, 10 * MS), Some(1_990 * MS));
    }

    /// A call whose thread did not run before its first tick (a paused
    /// process, a starved thread) is not stopped for that time.
    #[test]
    fn a_pause_before_the_first_tick_is_not_counted_as_run() {
        let elapsed = 3_000 * MS;
        let mark = Some((7 * MS, run_before_mark(elapsed)));
        let ran = ran_since(mark, Some(7 * MS), elapsed);
        assert_eq!(ran, Duration::from_millis(TICK_MS));
        assert!(call_left(elapsed, ran).is_some());
    }

    #[test]
    fn the_run_counts_the_time_before_the_cpu_mark_as_run() {
        let mark = Some((5_000 * MS, 10 * MS));
        assert_eq!(ran_since(mark, Some(5_500 * MS), 3_000 * MS), 510 * MS);
        // No CPU clock: the wall time.
        assert_eq!(ran_since(None, None, 3_000 * MS), 3_000 * MS);
        assert_eq!(ran_since(mark, None, 3_000 * MS), 3_000 * MS);
    }
}
