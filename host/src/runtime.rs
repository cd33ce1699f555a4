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
/// The next protocol version (`guest/protocol-next`): key-state format 2.
/// Embedded for `ballot bench`'s swap measurement and the tests; a cluster
/// installs it with `ballot component push` and `activate`.
pub const PROTOCOL_NEXT_WASM: &[u8] = include_bytes!("../components/protocol-next.wasm");
/// The default register policy component, built from `guest/register`.
pub const REGISTER_WASM: &[u8] = include_bytes!("../components/register.wasm");

/// Fuel one guest call may burn before it is stopped.
pub const FUEL_PER_CALL: u64 = 2_000_000_000;
/// Linear memory one guest instance may grow to.
pub const MEMORY_MAX_BYTES: usize = 256 << 20;
/// Fuel one policy call may burn: a policy is a small function of one value.
pub const POLICY_FUEL_PER_CALL: u64 = 200_000_000;
/// Linear memory one policy instance may grow to.
pub const POLICY_MEMORY_MAX_BYTES: usize = 64 << 20;
/// Largest value a client or a policy may write.
pub const VALUE_MAX: usize = 1 << 20;
/// The rejection code of a command whose policy trapped, ran out of fuel or
/// memory, or returned something the host refuses.
pub const POLICY_FAILED: &str = "policy-failed";

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
use protocol_world::exports::ballot::core::membership as wit_members;
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

    /// A runtime of already compiled components (compiled with `engine`).
    pub fn from_parts(engine: Engine, protocol: Component, policy: Component) -> Runtime {
        Runtime {
            engine,
            protocol,
            policy,
        }
    }

    /// The compiled protocol.
    pub fn protocol_component(&self) -> &Component {
        &self.protocol
    }

    /// The compiled default policy.
    pub fn policy_component(&self) -> &Component {
        &self.policy
    }

    /// The engine every component of this runtime must be compiled with.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The policies of a replica: the embedded register for every key until
    /// prefixes are bound.
    fn policies(&self) -> Result<Policies, Error> {
        let default = PolicyInstance::new(self.policy.clone(), "register", register_version());
        Policies::new(&self.engine, Some(default))
    }

    /// Instantiates one replica: its own protocol and policy stores.
    pub fn replica(&self, config: core::Config) -> Result<WasmCore, Error> {
        let policies = self.policies()?;
        let mut linker = Linker::<ProtocolHost>::new(&self.engine);
        protocol_world::Protocol::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| err("linking the protocol component", e))?;
        let host = ProtocolHost {
            limits: limits(MEMORY_MAX_BYTES),
            policies,
        };
        let mut store = Store::new(&self.engine, host);
        store.limiter(|s| &mut s.limits);
        store.set_fuel(FUEL_PER_CALL).map_err(|e| err("fuel", e))?;
        let instance = linker
            .instantiate(&mut store, &self.protocol)
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
        core.refuel()?;
        core.bindings
            .ballot_core_replica()
            .call_init(&mut core.store, &wit_config)
            .map_err(|e| err("calling init", e))?
            .map_err(|e| Error(format!("the protocol refused its configuration: {e}")))?;
        Ok(core)
    }
}

fn register_version() -> &'static str {
    core::register::VERSION
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

/// A policy store's host side: logging and limits.
pub struct PolicyHost {
    limits: StoreLimits,
}

impl policy_world::ballot::core::log::Host for PolicyHost {
    fn emit(&mut self, level: policy_world::ballot::core::log::Level, message: String) {
        log(level as u8, &message)
    }
}

/// A live policy instance.
struct Live {
    store: Store<PolicyHost>,
    policy: policy_world::Policy,
}

/// One policy component and, once called, its instance. A trap drops the
/// instance (its memory may be half-written); the next call starts afresh.
pub struct PolicyInstance {
    component: Component,
    /// As the registry recorded it.
    pub name: String,
    pub version: String,
    live: Option<Live>,
}

fn policy_failed(message: String) -> core::Rejection {
    core::Rejection {
        code: POLICY_FAILED.to_string(),
        message,
    }
}

impl PolicyInstance {
    pub fn new(component: Component, name: &str, version: &str) -> PolicyInstance {
        PolicyInstance {
            component,
            name: name.to_string(),
            version: version.to_string(),
            live: None,
        }
    }

    fn instantiate(&self, linker: &Linker<PolicyHost>) -> Result<Live, Error> {
        let mut store = policy_store(self.component.engine())?;
        let policy = policy_world::Policy::instantiate(&mut store, &self.component, linker)
            .map_err(|e| err("instantiating the policy", e))?;
        Ok(Live { store, policy })
    }

    fn apply(
        &mut self,
        linker: &Linker<PolicyHost>,
        key: &[u8],
        current: &core::Current,
        command: &[u8],
        now_ms: u64,
    ) -> Result<core::Change, core::Rejection> {
        let name = &self.name;
        let mut live = match self.live.take() {
            Some(live) => live,
            None => self
                .instantiate(linker)
                .map_err(|e| policy_failed(format!("policy {name}: {e}")))?,
        };
        let current = pol::Current {
            value: current.value.clone(),
            version: current.version,
        };
        let result = live.store.set_fuel(POLICY_FUEL_PER_CALL).and_then(|()| {
            live.policy.ballot_core_policy_api().call_apply(
                &mut live.store,
                key,
                &current,
                command,
                now_ms,
            )
        });
        let change = match result {
            Ok(Ok(change)) => change,
            Ok(Err(r)) => {
                self.live = Some(live);
                return Err(core::Rejection {
                    code: r.code,
                    message: r.message,
                });
            }
            // The instance is dropped with its store; this command fails
            // and changes nothing.
            Err(e) => {
                let why = trap_reason(&e);
                tracing::warn!(policy = %name, "policy failed: {why}");
                return Err(policy_failed(format!("policy {name} failed: {why}")));
            }
        };
        self.live = Some(live);
        match change {
            pol::Change::Keep => Ok(core::Change::Keep),
            pol::Change::Set(v) if v.len() > VALUE_MAX => Err(policy_failed(format!(
                "policy {name} returned a value of {} bytes; values are at most {VALUE_MAX}",
                v.len()
            ))),
            pol::Change::Set(v) => Ok(core::Change::Set(v)),
            pol::Change::Remove => Ok(core::Change::Remove),
        }
    }
}

/// A store for one policy instance, with the sandbox's memory limit and a
/// call's fuel.
fn policy_store(engine: &Engine) -> Result<Store<PolicyHost>, Error> {
    let mut store = Store::new(
        engine,
        PolicyHost {
            limits: limits(POLICY_MEMORY_MAX_BYTES),
        },
    );
    store.limiter(|s| &mut s.limits);
    store
        .set_fuel(POLICY_FUEL_PER_CALL)
        .map_err(|e| err("fuel", e))?;
    Ok(store)
}

/// Instantiates a policy alone, under the sandbox's limits, for inspection.
pub fn sandbox_policy(
    engine: &Engine,
    component: &Component,
) -> Result<(Store<PolicyHost>, wasmtime::component::Instance), Error> {
    let policies = Policies::new(engine, None)?;
    let mut store = policy_store(engine)?;
    let instance = policies
        .linker
        .instantiate(&mut store, component)
        .map_err(|e| err("instantiating the policy", e))?;
    Ok((store, instance))
}

/// Calls a policy instance's `describe`.
pub fn describe_policy(
    store: &mut Store<PolicyHost>,
    instance: &wasmtime::component::Instance,
) -> Result<(String, String), Error> {
    let policy = policy_world::Policy::new(&mut *store, instance)
        .map_err(|e| err("the policy's exports", e))?;
    store
        .set_fuel(POLICY_FUEL_PER_CALL)
        .map_err(|e| err("fuel", e))?;
    policy
        .ballot_core_policy_api()
        .call_describe(&mut *store)
        .map_err(|e| Error(trap_reason(&e)))
}

/// Says what a guest call's error was, in words a client can act on.
pub fn trap_reason(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::OutOfFuel) => {
            "it ran out of fuel (an endless or too long computation)".to_string()
        }
        Some(trap) => format!("it trapped: {trap}"),
        None => format!("{e:#}"),
    }
}

/// A key prefix routed to a policy component.
pub struct Bound {
    pub prefix: Vec<u8>,
    /// The component's id (sha256).
    pub id: String,
    pub instance: PolicyInstance,
}

/// Routes each command to the policy of its key: the longest bound prefix,
/// else the default register (the embedded component, or the native build
/// when `default` is `None`). Keys of the cluster's own records (a leading
/// NUL byte) always use the register.
pub struct Policies {
    linker: Linker<PolicyHost>,
    default: Option<PolicyInstance>,
    bound: Vec<Bound>,
    failures: Option<prometheus_client::metrics::counter::Counter>,
}

impl Policies {
    pub fn new(engine: &Engine, default: Option<PolicyInstance>) -> Result<Policies, Error> {
        let mut linker = Linker::<PolicyHost>::new(engine);
        policy_world::Policy::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| err("linking the policy component", e))?;
        Ok(Policies {
            linker,
            default,
            bound: Vec::new(),
            failures: None,
        })
    }

    /// Replaces the bindings. Instances of components that stay bound are
    /// kept.
    pub fn rebind(&mut self, bound: Vec<Bound>) {
        let mut old = std::mem::take(&mut self.bound);
        self.bound = bound
            .into_iter()
            .map(|mut b| {
                if let Some(i) = old.iter().position(|o| o.id == b.id) {
                    if let Some(live) = old[i].instance.live.take() {
                        b.instance.live = Some(live);
                    }
                }
                b
            })
            .collect();
        // Longest prefix first: the first match is the most specific.
        self.bound
            .sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()));
        old.clear();
    }

    /// Takes the bindings out (to hand them to another protocol instance).
    pub fn take_bound(&mut self) -> Vec<Bound> {
        std::mem::take(&mut self.bound)
    }

    /// Counts failed policy calls in `counter`.
    pub fn count_failures(&mut self, counter: prometheus_client::metrics::counter::Counter) {
        self.failures = Some(counter);
    }
}

impl core::Env for Policies {
    fn apply(
        &mut self,
        key: &[u8],
        current: &core::Current,
        command: &[u8],
        now_ms: u64,
    ) -> Result<core::Change, core::Rejection> {
        let bound = if key.first() == Some(&0) {
            None
        } else {
            self.bound.iter_mut().find(|b| key.starts_with(&b.prefix))
        };
        match (bound, &mut self.default) {
            (Some(b), _) => b
                .instance
                .apply(&self.linker, key, current, command, now_ms),
            (None, Some(default)) => default.apply(&self.linker, key, current, command, now_ms),
            (None, None) => core::register::apply(current, command),
        }
    }
}

struct ProtocolHost {
    limits: StoreLimits,
    policies: Policies,
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
        let current = core::Current {
            value: current.value,
            version: current.version,
        };
        match core::Env::apply(&mut self.policies, &key, &current, &command, now_ms) {
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
    /// The policies this replica's protocol calls.
    pub fn policies_mut(&mut self) -> &mut Policies {
        &mut self.store.data_mut().policies
    }

    fn refuel(&mut self) -> Result<(), Error> {
        self.store
            .set_fuel(FUEL_PER_CALL)
            .map_err(|e| err("fuel", e))
    }

    /// Runs the component's `self-check` export; false when it has none.
    pub fn self_check(&mut self) -> Result<bool, Error> {
        self.refuel()?;
        self_check_export(&mut self.store, &self.instance)
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
            .map_err(|e| Error(format!("step failed: {}", trap_reason(&e))))?;
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
        self.refuel()?;
        let m = wit_members::Members {
            epoch: members.epoch,
            voters: members.voters,
            learners: members.learners,
            fast: members.fast,
        };
        self.bindings
            .ballot_core_membership()
            .call_reconfigure(&mut self.store, &m)
            .map_err(|e| err("calling reconfigure", trap_reason(&e)))?
            .map_err(|e| Error(format!("the protocol refused the membership: {e}")))
    }

    pub fn try_release(&mut self, id: u64) -> Result<core::Actions, Error> {
        self.refuel()?;
        let a = self
            .bindings
            .ballot_core_replica()
            .call_release(&mut self.store, id)
            .map_err(|e| Error(format!("release failed: {}", trap_reason(&e))))?;
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
        self.try_reconfigure(members).map_err(|e| e.0)
    }
}

fn limits(memory: usize) -> StoreLimits {
    StoreLimitsBuilder::new()
        .memory_size(memory)
        .instances(4)
        .build()
}

/// The contract version this host implements.
pub const CONTRACT: (u64, u64, u64) = (0, 2, 2);

/// Calls a `self-check.run` export if there is one.
pub(crate) fn self_check_export<T>(
    store: &mut Store<T>,
    instance: &wasmtime::component::Instance,
) -> Result<bool, Error> {
    let (major, minor, patch) = CONTRACT;
    // A component built against an earlier patch of the contract names
    // its export with that version.
    let Some(iface) = (0..=patch).rev().find_map(|p| {
        let name = format!("ballot:core/self-check@{major}.{minor}.{p}");
        instance.get_export_index(&mut *store, None, &name)
    }) else {
        return Ok(false);
    };
    let Some(run) = instance.get_export_index(&mut *store, Some(&iface), "run") else {
        return Err(Error("its self-check export has no `run` function".into()));
    };
    let run = instance
        .get_typed_func::<(), (Result<(), String>,)>(&mut *store, run)
        .map_err(|e| Error(format!("its self-check has the wrong type: {e:#}")))?;
    match run.call(&mut *store, ()) {
        Ok((Ok(()),)) => Ok(true),
        Ok((Err(why),)) => Err(Error(format!("its self-check failed: {why}"))),
        Err(e) => Err(Error(format!(
            "its self-check trapped: {}",
            trap_reason(&e)
        ))),
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
            .replica(core::Config::new(9, 1, vec![1, 2, 2]))
            .err()
            .unwrap();
        assert!(e.0.contains("listed twice"), "{e}");
        // An older epoch is refused through the membership export.
        let mut core = rt.replica(core::Config::new(1, 1, vec![1, 2, 3])).unwrap();
        let mut m = core::Members::initial(vec![1, 2, 3]);
        m.epoch = 3;
        core.try_reconfigure(m.clone()).unwrap();
        m.epoch = 2;
        let e = core.try_reconfigure(m).unwrap_err();
        assert!(e.0.contains("cannot replace epoch 3"), "{e}");
    }
}
