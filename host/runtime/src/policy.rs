//! Policy components: one sandboxed instance per policy, bound to key
//! prefixes, called by the protocol for each command.

use ballot_core as core;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store, StoreLimits};

use crate::*;

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
        live.store.set_epoch_deadline(ticks(POLICY_CALL_MS));
        let result = live.policy.ballot_core_policy_api().call_apply(
            &mut live.store,
            key,
            &current,
            command,
            now_ms,
        );
        let change = match result {
            Ok(Ok(change)) => change,
            Ok(Err(r)) => {
                self.live = Some(live);
                if r.code.len() > REJECTION_CODE_MAX || r.message.len() > REJECTION_TEXT_MAX {
                    return Err(policy_failed(format!(
                        "policy {name} returned a rejection of {} + {} bytes; codes are \
                         at most {REJECTION_CODE_MAX} bytes and messages {REJECTION_TEXT_MAX}",
                        r.code.len(),
                        r.message.len()
                    )));
                }
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
        // The cluster's own records (stored components among them) may be
        // larger than what clients write.
        let max = if key.starts_with(SYSTEM_PREFIX) {
            SYSTEM_VALUE_MAX
        } else {
            VALUE_MAX
        };
        match change {
            pol::Change::Keep => Ok(core::Change::Keep),
            pol::Change::Set(v) if v.len() > max => Err(policy_failed(format!(
                "policy {name} returned a value of {} bytes; values are at most {max}",
                v.len()
            ))),
            pol::Change::Set(v) => Ok(core::Change::Set(v)),
            pol::Change::Remove => Ok(core::Change::Remove),
        }
    }
}

/// A store for one policy instance, with the sandbox's memory limit and a
/// call's time limit.
fn policy_store(engine: &Engine) -> Result<Store<PolicyHost>, Error> {
    let mut store = Store::new(
        engine,
        PolicyHost {
            limits: limits(POLICY_MEMORY_MAX_BYTES),
        },
    );
    store.limiter(|s| &mut s.limits);
    store.epoch_deadline_trap();
    store.set_epoch_deadline(ticks(POLICY_CALL_MS));
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
    store.set_epoch_deadline(ticks(POLICY_CALL_MS));
    policy
        .ballot_core_policy_api()
        .call_describe(&mut *store)
        .map_err(|e| call_failed("describe", &e))
}

/// Runs a policy instance's `self-check` export (if it has one) under a
/// policy call's time limit of its own.
pub fn self_check_policy(
    store: &mut Store<PolicyHost>,
    instance: &wasmtime::component::Instance,
) -> Result<bool, Error> {
    store.set_epoch_deadline(ticks(POLICY_CALL_MS));
    self_check_export(store, instance)
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
