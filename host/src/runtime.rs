//! Runs protocol and policy components in wasmtime.
//!
//! A [`Runtime`] compiles the components once; [`Runtime::replica`] gives a
//! [`WasmCore`], one store per replica, that implements the same
//! [`ballot_core::Core`] trait as the native build. Execution is made
//! deterministic (NaN canonicalisation, no threads, no relaxed SIMD, no clock
//! or random imports) and bounded (fuel per call, a memory limit per store).

use ballot_core as core;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};

/// The default protocol component, built from `guest/protocol`.
pub const PROTOCOL_WASM: &[u8] = include_bytes!("../components/protocol.wasm");
/// The default register policy component, built from `guest/register`.
pub const REGISTER_WASM: &[u8] = include_bytes!("../components/register.wasm");

/// Fuel one guest call may burn before it is stopped.
pub const FUEL_PER_CALL: u64 = 2_000_000_000;
/// Linear memory one guest instance may grow to.
pub const MEMORY_MAX_BYTES: usize = 256 << 20;

mod protocol_world {
    wasmtime::component::bindgen!({
        world: "protocol",
        path: "../wit",
    });
}

mod policy_world {
    wasmtime::component::bindgen!({
        world: "policy",
        path: "../wit",
    });
}

use policy_world::exports::ballot::core::policy_api as pol;
use protocol_world::ballot::core::policy_api as imp;
use protocol_world::exports::ballot::core::replica as wit;

crate::message_error!(
    /// An error from the wasm runtime: compiling, instantiating or calling a guest.
    Error
);

fn err(context: &str, e: impl std::fmt::Display) -> Error {
    Error(format!("{context}: {e}"))
}

/// The engine configuration every Ballot guest runs under.
pub fn engine() -> Result<Engine, Error> {
    let mut config = Config::new();
    config
        // Threads are off: wasmtime is built without its `threads` feature.
        .cranelift_nan_canonicalization(true)
        .wasm_relaxed_simd(false)
        .consume_fuel(true);
    Engine::new(&config).map_err(|e| err("configuring wasmtime", e))
}

/// Compiled components, ready to instantiate.
pub struct Runtime {
    engine: Engine,
    protocol: Component,
    policy: Component,
}

impl Runtime {
    /// Compiles the embedded default components.
    pub fn new() -> Result<Runtime, Error> {
        Runtime::with_components(PROTOCOL_WASM, REGISTER_WASM)
    }

    /// Compiles the given protocol and policy components.
    pub fn with_components(protocol: &[u8], policy: &[u8]) -> Result<Runtime, Error> {
        let engine = engine()?;
        let protocol = Component::new(&engine, protocol)
            .map_err(|e| err("compiling the protocol component", e))?;
        let policy = Component::new(&engine, policy)
            .map_err(|e| err("compiling the policy component", e))?;
        Ok(Runtime {
            engine,
            protocol,
            policy,
        })
    }

    /// Instantiates one replica: its own protocol and policy stores.
    pub fn replica(&self, config: core::Config) -> Result<WasmCore, Error> {
        let mut linker = Linker::<PolicyHost>::new(&self.engine);
        policy_world::Policy::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| err("linking the policy component", e))?;
        let mut store = Store::new(&self.engine, PolicyHost { limits: limits() });
        store.limiter(|s| &mut s.limits);
        store.set_fuel(FUEL_PER_CALL).map_err(|e| err("fuel", e))?;
        let policy = policy_world::Policy::instantiate(&mut store, &self.policy, &linker)
            .map_err(|e| err("instantiating the policy component", e))?;

        let mut linker = Linker::<ProtocolHost>::new(&self.engine);
        protocol_world::Protocol::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| err("linking the protocol component", e))?;
        let host = ProtocolHost {
            limits: limits(),
            policy_store: store,
            policy,
        };
        let mut store = Store::new(&self.engine, host);
        store.limiter(|s| &mut s.limits);
        store.set_fuel(FUEL_PER_CALL).map_err(|e| err("fuel", e))?;
        let bindings = protocol_world::Protocol::instantiate(&mut store, &self.protocol, &linker)
            .map_err(|e| err("instantiating the protocol component", e))?;
        let wit_config = wit::Config {
            self_id: config.self_id,
            incarnation: config.incarnation,
            voters: config.voters,
            fast_timeout_ms: config.fast_timeout_ms,
            round_timeout_ms: config.round_timeout_ms,
            attempts_max: config.attempts_max,
            inflight_max: config.inflight_max,
        };
        let mut core = WasmCore { store, bindings };
        core.refuel()?;
        core.bindings
            .ballot_core_replica()
            .call_init(&mut core.store, &wit_config)
            .map_err(|e| err("calling init", e))?
            .map_err(|e| Error(format!("the protocol refused its configuration: {e}")))?;
        Ok(core)
    }
}

/// One line per embedded component: its world, name, version and formats.
pub fn describe_embedded() -> Result<Vec<String>, Error> {
    let rt = Runtime::new()?;
    let mut core = rt.replica(core::Config::new(1, 1, vec![1]))?;
    let info = core.describe()?;
    let (name, version) = imp::Host::describe(core.store.data_mut());
    Ok(vec![
        format!(
            "protocol  {} {}  state formats {:?}  wire formats {:?}  ({} bytes)",
            info.name,
            info.version,
            info.state_formats,
            info.wire_formats,
            PROTOCOL_WASM.len()
        ),
        format!(
            "policy    {name} {version}  ({} bytes)",
            REGISTER_WASM.len()
        ),
    ])
}

fn limits() -> StoreLimits {
    StoreLimitsBuilder::new()
        .memory_size(MEMORY_MAX_BYTES)
        .instances(4)
        .build()
}

fn log(level: u8, message: &str) {
    let message: String = message.chars().take(4096).collect();
    match level {
        0 => tracing::trace!(target: "guest", "{message}"),
        1 => tracing::debug!(target: "guest", "{message}"),
        2 => tracing::info!(target: "guest", "{message}"),
        3 => tracing::warn!(target: "guest", "{message}"),
        _ => tracing::error!(target: "guest", "{message}"),
    }
}

struct PolicyHost {
    limits: StoreLimits,
}

impl policy_world::ballot::core::log::Host for PolicyHost {
    fn emit(&mut self, level: policy_world::ballot::core::log::Level, message: String) {
        log(level as u8, &message)
    }
}

struct ProtocolHost {
    limits: StoreLimits,
    policy_store: Store<PolicyHost>,
    policy: policy_world::Policy,
}

impl protocol_world::ballot::core::log::Host for ProtocolHost {
    fn emit(&mut self, level: protocol_world::ballot::core::log::Level, message: String) {
        log(level as u8, &message)
    }
}

impl imp::Host for ProtocolHost {
    fn describe(&mut self) -> (String, String) {
        let result = self.policy_store.set_fuel(FUEL_PER_CALL).and_then(|()| {
            self.policy
                .ballot_core_policy_api()
                .call_describe(&mut self.policy_store)
        });
        result.unwrap_or_else(|e| ("unknown".to_string(), format!("trapped: {e}")))
    }

    fn apply(
        &mut self,
        key: Vec<u8>,
        current: imp::Current,
        command: Vec<u8>,
        now_ms: u64,
    ) -> Result<imp::Change, imp::Rejection> {
        let current = pol::Current {
            value: current.value,
            version: current.version,
        };
        let result = self.policy_store.set_fuel(FUEL_PER_CALL).and_then(|()| {
            self.policy.ballot_core_policy_api().call_apply(
                &mut self.policy_store,
                &key,
                &current,
                &command,
                now_ms,
            )
        });
        match result {
            Ok(Ok(pol::Change::Keep)) => Ok(imp::Change::Keep),
            Ok(Ok(pol::Change::Set(v))) => Ok(imp::Change::Set(v)),
            Ok(Ok(pol::Change::Remove)) => Ok(imp::Change::Remove),
            Ok(Err(r)) => Err(imp::Rejection {
                code: r.code,
                message: r.message,
            }),
            // A trapping policy fails this one command; the protocol changes
            // no state for a rejected command.
            Err(e) => Err(imp::Rejection {
                code: "policy-failed".to_string(),
                message: format!("the policy trapped: {e}"),
            }),
        }
    }
}

/// A replica whose protocol runs in a wasm component.
pub struct WasmCore {
    store: Store<ProtocolHost>,
    bindings: protocol_world::Protocol,
}

impl WasmCore {
    fn refuel(&mut self) -> Result<(), Error> {
        self.store
            .set_fuel(FUEL_PER_CALL)
            .map_err(|e| err("fuel", e))
    }

    /// The component's own description.
    pub fn describe(&mut self) -> Result<core::Info, Error> {
        self.refuel()?;
        let i = self
            .bindings
            .ballot_core_replica()
            .call_describe(&mut self.store)
            .map_err(|e| err("describe", e))?;
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
        self.refuel()?;
        let ready = self
            .bindings
            .ballot_core_replica()
            .call_step(&mut self.store, &batch)
            .map_err(|e| err("step", e))?;
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
    pub fn try_release(&mut self, id: u64) -> Result<core::Actions, Error> {
        self.refuel()?;
        let a = self
            .bindings
            .ballot_core_replica()
            .call_release(&mut self.store, id)
            .map_err(|e| err("release", e))?;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_components_describe_themselves() {
        let rt = Runtime::new().unwrap();
        let mut core = rt.replica(core::Config::new(1, 1, vec![1, 2, 3])).unwrap();
        let info = core.describe().unwrap();
        assert_eq!(info, core::Replica::<core::RegisterEnv>::info());
    }

    #[test]
    fn bad_config_is_refused() {
        let rt = Runtime::new().unwrap();
        let e = rt
            .replica(core::Config::new(9, 1, vec![1, 2, 3]))
            .err()
            .unwrap();
        assert!(e.0.contains("not among the voters"), "{e}");
    }
}
