// The protocol component's body, shared by the builds that include it
// (`guest/protocol`, `guest/protocol-next`, a test fixture). The including
// crate generates the `protocol` world's bindings and defines
// `STATE_FORMAT`, `TRAP_ON_STEP`, `SPIN_ON_STEP` (a fixture whose steps
// never end, for the calls' time limit) and `INVALID_KEY_ON_STEP` (a
// fixture that writes under a key no host can store, for the host's output
// checks).

use std::cell::RefCell;

use ballot_core as core;


use ballot::core::log::{emit, Level as WitLevel};
use ballot::core::policy_api as policy;
use exports::ballot::core::membership as members;
use exports::ballot::core::replica as wit;

thread_local! {
    static REPLICA: RefCell<Option<core::Replica<HostPolicy>>> = const { RefCell::new(None) };
}

/// Routes policy calls to the host, which runs the key's policy component.
struct HostPolicy;

impl core::Env for HostPolicy {
    fn apply(
        &mut self,
        key: &[u8],
        current: &core::Current,
        command: &[u8],
        now_ms: u64,
    ) -> Result<core::Change, core::Rejection> {
        let current = policy::Current {
            value: current.value.clone(),
            version: current.version,
        };
        match policy::apply(key, &current, command, now_ms) {
            Ok(policy::Change::Keep) => Ok(core::Change::Keep),
            Ok(policy::Change::Set(v)) => Ok(core::Change::Set(v)),
            Ok(policy::Change::Remove) => Ok(core::Change::Remove),
            Err(r) => Err(core::Rejection {
                code: r.code,
                message: r.message,
            }),
        }
    }

    fn log(&mut self, level: core::Level, message: &str) {
        let level = match level {
            core::Level::Trace => WitLevel::Trace,
            core::Level::Debug => WitLevel::Debug,
            core::Level::Info => WitLevel::Info,
            core::Level::Warn => WitLevel::Warn,
            core::Level::Error => WitLevel::Error,
        };
        emit(level, message);
    }
}

struct Component;

impl wit::Guest for Component {
    fn describe() -> wit::Info {
        let info = core::Replica::<HostPolicy>::info_writing(STATE_FORMAT);
        wit::Info {
            name: info.name,
            version: info.version,
            state_formats: info.state_formats,
            wire_formats: info.wire_formats,
        }
    }

    fn init(config: wit::Config) -> Result<(), String> {
        let config = core::Config {
            self_id: config.self_id,
            incarnation: config.incarnation,
            voters: config.voters,
            fast_timeout_ms: config.fast_timeout_ms,
            round_timeout_ms: config.round_timeout_ms,
            attempts_max: config.attempts_max,
            inflight_max: config.inflight_max,
        };
        let mut replica = core::Replica::new(config, HostPolicy)?;
        replica.write_state_format(STATE_FORMAT)?;
        REPLICA.with(|r| *r.borrow_mut() = Some(replica));
        Ok(())
    }

    fn step(batch: wit::Batch) -> wit::Ready {
        if TRAP_ON_STEP {
            panic!("this build traps on every step");
        }
        if SPIN_ON_STEP {
            let mut turns = 0u64;
            loop {
                turns = std::hint::black_box(turns.wrapping_add(1));
            }
        }
        let batch = core::Batch {
            now_ms: batch.now_ms,
            seed: batch.seed,
            states: batch
                .states
                .into_iter()
                .map(|s| core::KeyState {
                    key: s.key,
                    state: s.state,
                })
                .collect(),
            requests: batch
                .requests
                .into_iter()
                .map(|r| core::Request {
                    id: r.id,
                    key: r.key,
                    op: match r.op {
                        wit::Operation::Command(c) => core::Operation::Command(c),
                        wit::Operation::Read(wit::Consistency::Linearizable) => {
                            core::Operation::Read(core::Consistency::Linearizable)
                        }
                        wit::Operation::Read(wit::Consistency::Local) => {
                            core::Operation::Read(core::Consistency::Local)
                        }
                    },
                })
                .collect(),
            messages: batch
                .messages
                .into_iter()
                .map(|m| core::Inbound {
                    from: m.from,
                    key: m.key,
                    payload: m.payload,
                })
                .collect(),
            timers: batch
                .timers
                .into_iter()
                .map(|t| core::Timer {
                    key: t.key,
                    token: t.token,
                    at_ms: t.at_ms,
                })
                .collect(),
        };
        let mut ready = with_replica(|r| r.step(batch));
        if INVALID_KEY_ON_STEP {
            if let Some(w) = ready.persist.first_mut() {
                w.key = vec![b'k'; 600];
            }
        }
        wit::Ready {
            id: ready.id,
            persist: ready
                .persist
                .into_iter()
                .map(|w| wit::Write {
                    key: w.key,
                    state: w.state,
                    commit: w.commit.map(|c| wit::Commit {
                        version: c.version,
                        value: c.value,
                    }),
                })
                .collect(),
            early: actions(ready.early),
        }
    }

    fn release(id: u64) -> wit::Actions {
        actions(with_replica(|r| r.release(id)))
    }
}

fn actions(actions: core::Actions) -> wit::Actions {
    wit::Actions {
        send: actions
            .send
            .into_iter()
            .map(|o| wit::Outbound {
                to: o.to,
                key: o.key,
                payload: o.payload,
            })
            .collect(),
        complete: actions
            .complete
            .into_iter()
            .map(|c| wit::Completion {
                id: c.id,
                outcome: outcome(c.outcome),
                trace: wit::Trace {
                    changed: c.trace.changed,
                    prior_absent: c.trace.prior_absent,
                    fast: c.trace.fast,
                    attempts: c.trace.attempts,
                    prepares: c.trace.prepares,
                },
            })
            .collect(),
        timers: actions
            .timers
            .into_iter()
            .map(|t| wit::Timer {
                key: t.key,
                token: t.token,
                at_ms: t.at_ms,
            })
            .collect(),
    }
}

impl members::Guest for Component {
    fn reconfigure(m: members::Members) -> Result<(), String> {
        let m = core::Members {
            epoch: m.epoch,
            voters: m.voters,
            learners: m.learners,
            fast: m.fast,
        };
        with_replica(|r| r.reconfigure(m))
    }
}

fn with_replica<T>(f: impl FnOnce(&mut core::Replica<HostPolicy>) -> T) -> T {
    REPLICA.with(|r| {
        f(r.borrow_mut()
            .as_mut()
            .expect("host contract: init before step"))
    })
}

fn current(c: core::Current) -> policy::Current {
    policy::Current {
        value: c.value,
        version: c.version,
    }
}

fn outcome(o: core::Outcome) -> wit::Outcome {
    match o {
        core::Outcome::Done(c) => wit::Outcome::Done(current(c)),
        core::Outcome::Rejected(r, c) => wit::Outcome::Rejected((
            policy::Rejection {
                code: r.code,
                message: r.message,
            },
            current(c),
        )),
        core::Outcome::Failed(f) => wit::Outcome::Failed(wit::Failure {
            reason: match f.reason {
                core::FailureReason::NoQuorum => wit::FailureReason::NoQuorum,
                core::FailureReason::Contention => wit::FailureReason::Contention,
                core::FailureReason::Overloaded => wit::FailureReason::Overloaded,
                core::FailureReason::Invalid => wit::FailureReason::Invalid,
                // The host's own reason; the protocol never reports it.
                core::FailureReason::Interrupted => wit::FailureReason::NoQuorum,
            },
            maybe_applied: f.maybe_applied,
            message: f.message,
        }),
    }
}

export!(Component);

/// The builtin compares a byte at a time: see `ballot_core::bytes`.
///
/// # Safety
/// `memcmp`'s contract: `n` readable bytes at `a` and at `b`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the caller's contract is `compare`'s.
    unsafe { ballot_core::bytes::compare(a, b, n) }
}

/// Equality only; see [`memcmp`].
///
/// # Safety
/// As [`memcmp`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: as above.
    unsafe { ballot_core::bytes::compare(a, b, n) }
}
