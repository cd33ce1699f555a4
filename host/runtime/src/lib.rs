//! Runs protocol and policy components in wasmtime.
//!
//! A [`Runtime`] compiles the components once; [`Runtime::replica`] gives a
//! [`WasmCore`], one store per replica, that implements the same
//! [`ballot_core::Core`] trait as the native build. Execution is made
//! deterministic (NaN canonicalisation, no threads, no relaxed SIMD, no clock
//! or random imports) and bounded (a time limit per call, a memory limit
//! per store).

use ballot_core as core;
use wasmtime::component::Component;
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};

/// The default protocol component, built from `guest/protocol`.
pub const PROTOCOL_WASM: &[u8] = include_bytes!("../../components/protocol.wasm");
/// The next protocol version (`guest/protocol-next`): key-state format 2.
/// Embedded for `ballot bench`'s swap measurement and the tests; a cluster
/// installs it with `ballot component push` and `activate`.
pub const PROTOCOL_NEXT_WASM: &[u8] = include_bytes!("../../components/protocol-next.wasm");
/// The default register policy component, built from `guest/register`.
pub const REGISTER_WASM: &[u8] = include_bytes!("../../components/register.wasm");

/// How often every engine's epoch advances: the grain of the time limits.
pub const TICK_MS: u64 = 10;
/// Time one protocol call may run before it is stopped, not counting the
/// time its policies' calls take (they have limits of their own): wall
/// time, and CPU time of its thread as well, so a call whose thread was
/// not running (a loaded machine, a paused VM) is not stopped for it.
pub const PROTOCOL_CALL_MS: u64 = 2_000;
/// Wall time of its own after which a protocol call is stopped whatever its
/// thread's CPU time says (a thread blocked in a host call uses none).
pub const PROTOCOL_CALL_WALL_MAX_MS: u64 = 20_000;
/// Wall time the policies' calls of one protocol call may take together;
/// past it, the call's further commands fail `policy-failed` without their
/// policy being called, so a slow policy cannot hold a step for long.
pub const POLICY_STEP_MS: u64 = 5_000;
/// Linear memory one guest instance may grow to.
pub const MEMORY_MAX_BYTES: usize = 256 << 20;
/// Wall time one policy call may run: a policy is a small function of one
/// value.
pub const POLICY_CALL_MS: u64 = 200;
/// Linear memory one policy instance may grow to.
pub const POLICY_MEMORY_MAX_BYTES: usize = 64 << 20;
/// Largest value a client or a policy may write.
pub const VALUE_MAX: usize = 1 << 20;
/// Prefix of every key the cluster keeps for itself; clients cannot use it.
pub const SYSTEM_PREFIX: &[u8] = b"\0ballot/";
/// Largest value the cluster writes under its own keys: a stored component
/// (at most 8 MiB) and its bookkeeping.
pub const SYSTEM_VALUE_MAX: usize = (8 << 20) + (64 << 10);
/// Longest rejection code a policy may return (longer is a policy failure).
pub const REJECTION_CODE_MAX: usize = 64;
/// Longest rejection message a policy may return.
pub const REJECTION_TEXT_MAX: usize = 1024;
/// The rejection code of a command whose policy trapped, ran out of time or
/// memory, or returned something the host refuses.
pub const POLICY_FAILED: &str = "policy-failed";

mod protocol_world {
    wasmtime::component::bindgen!({
        world: "protocol",
        path: "../../wit",
    });
}

mod policy_world {
    wasmtime::component::bindgen!({
        world: "policy",
        path: "../../wit",
    });
}

use policy_world::exports::ballot::core::policy_api as pol;
use protocol_world::ballot::core::policy_api as imp;
use protocol_world::exports::ballot::core::membership as wit_members;
use protocol_world::exports::ballot::core::replica as wit;

mod policy;
mod protocol;

pub use policy::{
    describe_policy, sandbox_policy, self_check_policy, Bound, Policies, PolicyHost, PolicyInstance,
};
pub use protocol::WasmCore;

/// What went wrong running a guest, by what the caller does about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeError {
    /// The bytes are not a component this host can compile, link and
    /// instantiate (or wasmtime could not be configured): it never ran.
    Compile(String),
    /// A call into the guest trapped, or a host call under it failed: the
    /// instance's memory may be half-written, and it must be replaced.
    Trap { call: &'static str, reason: String },
    /// A call into the guest ran past its time limit (an endless or too
    /// long computation): the same as a trap for the instance.
    Deadline { call: &'static str },
    /// The guest ran and refused what it was given (a configuration, a
    /// membership) or its own self-check failed: the instance is sound.
    Refused(String),
    /// A call returned output the host refuses to act on (a key LMDB or the
    /// wire cannot hold, a write to a key the step was not given, a value
    /// or text over its limit): the same as a trap for the instance.
    Invalid { call: &'static str, reason: String },
}

/// The runtime's error, by its module's name.
pub type Error = RuntimeError;

impl RuntimeError {
    /// A short name for metrics and logs: `compile`, `trap`, `deadline`,
    /// `refused`, `invalid`.
    pub fn kind(&self) -> &'static str {
        match self {
            RuntimeError::Compile(_) => "compile",
            RuntimeError::Trap { .. } => "trap",
            RuntimeError::Deadline { .. } => "deadline",
            RuntimeError::Refused(_) => "refused",
            RuntimeError::Invalid { .. } => "invalid",
        }
    }
}

impl std::fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuntimeError::Compile(m) | RuntimeError::Refused(m) => f.write_str(m),
            RuntimeError::Trap { call, reason } => write!(f, "{call} failed: {reason}"),
            RuntimeError::Deadline { call } => write!(f, "{call} failed: {OUT_OF_TIME}"),
            RuntimeError::Invalid { call, reason } => {
                write!(f, "{call} returned invalid output: {reason}")
            }
        }
    }
}

impl std::error::Error for RuntimeError {}

/// A component that cannot be set up: `context` says which step.
fn err(context: &str, e: impl std::fmt::Display) -> Error {
    RuntimeError::Compile(format!("{context}: {e}"))
}

/// A failed call into a guest, as a trap or its time limit.
fn call_failed(call: &'static str, e: &wasmtime::Error) -> Error {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => RuntimeError::Deadline { call },
        _ => RuntimeError::Trap {
            call,
            reason: trap_reason(e),
        },
    }
}

/// The engine configuration every Ballot guest runs under, and the thread
/// that advances its epoch every [`TICK_MS`] for as long as the engine
/// lives.
///
/// Calls are bounded by time (epoch interruption), not by counted
/// instructions (fuel): the checks cost a load and a compare at loop
/// heads and function entries where fuel's counting cost about a tenth of
/// a protocol step. Where a call stops is therefore not
/// deterministic, and nothing needs it to be: a protocol call's trap
/// replaces that replica's instance, and a policy runs at the replica that
/// proposes (its result is what replicas vote on), so a policy that ran
/// out of time fails that replica's attempt only.
pub fn engine() -> Result<Engine, Error> {
    let mut config = Config::new();
    config
        // Threads are off: wasmtime is built without its `threads` feature.
        .cranelift_nan_canonicalization(true)
        .wasm_relaxed_simd(false)
        .epoch_interruption(true);
    if std::env::var_os("BALLOT_PERFMAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let engine = Engine::new(&config).map_err(|e| err("configuring wasmtime", e))?;
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("ballot-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(TICK_MS));
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        })
        .map_err(|e| err("starting the epoch thread", e))?;
    Ok(engine)
}

/// Epoch ticks that cover `ms` of wall time: one more than the quotient,
/// since the tick in progress may be about to end.
fn ticks(ms: u64) -> u64 {
    ms / TICK_MS + 1
}

/// CPU time the calling thread has used; `None` where the system cannot
/// say (callers then count wall time).
#[cfg(unix)]
fn thread_cpu() -> Option<std::time::Duration> {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `t` is.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    (rc == 0).then(|| std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
}

#[cfg(not(unix))]
fn thread_cpu() -> Option<std::time::Duration> {
    None
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
        WasmCore::new(&self.engine, &self.protocol, self.policies()?, config)
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

const OUT_OF_TIME: &str = "it ran past its time limit (an endless or too long computation)";

/// Says what a guest call's error was, in words a client can act on.
pub fn trap_reason(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => OUT_OF_TIME.to_string(),
        Some(trap) => format!("it trapped: {trap}"),
        None => format!("{e:#}"),
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
pub fn self_check_export<T>(
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
        return Err(RuntimeError::Compile(
            "its self-check export has no `run` function".into(),
        ));
    };
    let run = instance
        .get_typed_func::<(), (Result<(), String>,)>(&mut *store, run)
        .map_err(|e| RuntimeError::Compile(format!("its self-check has the wrong type: {e:#}")))?;
    match run.call(&mut *store, ()) {
        Ok((Ok(()),)) => Ok(true),
        Ok((Err(why),)) => Err(RuntimeError::Refused(format!(
            "its self-check failed: {why}"
        ))),
        Err(e) => Err(call_failed("its self-check", &e)),
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
        assert!(
            matches!(&e, RuntimeError::Refused(m) if m.contains("listed twice")),
            "{e:?}"
        );
        // An older epoch is refused through the membership export.
        let mut core = rt.replica(core::Config::new(1, 1, vec![1, 2, 3])).unwrap();
        let mut m = core::Members::initial(vec![1, 2, 3]);
        m.epoch = 3;
        core.try_reconfigure(m.clone()).unwrap();
        m.epoch = 2;
        let e = core.try_reconfigure(m).unwrap_err();
        assert!(
            matches!(&e, RuntimeError::Refused(m) if m.contains("cannot replace epoch 3")),
            "{e:?}"
        );
    }

    #[test]
    fn a_trapping_step_is_a_trap_and_not_a_refusal() {
        let trapping = fixture("protocol-trap");
        let rt = Runtime::with_components(&trapping, REGISTER_WASM).unwrap();
        let mut core = rt.replica(core::Config::new(1, 1, vec![1, 2, 3])).unwrap();
        let e = core.try_step(core::Batch::default()).unwrap_err();
        assert!(
            matches!(e, RuntimeError::Trap { call: "step", .. }),
            "{e:?}"
        );
        assert_eq!(e.kind(), "trap");
        assert!(e.to_string().starts_with("step failed: it trapped"), "{e}");
    }

    /// A protocol step that never ends is stopped once it has run its
    /// limit, and not before, and within the wall-time cap.
    #[test]
    fn a_protocol_step_that_never_ends_is_stopped_at_its_limit() {
        let spinning = fixture("protocol-spin");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = Runtime::with_components(&spinning, REGISTER_WASM).unwrap();
            let mut core = rt.replica(core::Config::new(1, 1, vec![1, 2, 3])).unwrap();
            let cpu = thread_cpu();
            let started = std::time::Instant::now();
            let e = core.try_step(core::Batch::default()).unwrap_err();
            let ran = thread_cpu().zip(cpu).map(|(after, before)| after - before);
            let _ = tx.send((e, started.elapsed(), ran));
        });
        let cap = std::time::Duration::from_millis(PROTOCOL_CALL_WALL_MAX_MS + 5_000);
        let (e, took, ran) = rx.recv_timeout(cap).expect("the step was never stopped");
        assert!(
            matches!(e, RuntimeError::Deadline { call: "step" }),
            "{e:?}"
        );
        let limit = std::time::Duration::from_millis(PROTOCOL_CALL_MS);
        assert!(took >= limit, "stopped after {took:?}");
        // Stopped only once the thread ran the limit (less the tick that
        // counts as run before the CPU mark).
        if let Some(ran) = ran {
            let tick = std::time::Duration::from_millis(TICK_MS);
            assert!(ran >= limit - tick, "stopped after {ran:?} of CPU");
        }
    }

    /// A misbehaving component from `tests/components`.
    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("../../tests/components/{name}.wasm")),
        )
        .unwrap()
    }

    /// A step whose policies' calls together run past the protocol's own
    /// limit is not stopped for it: each policy call has its own limit, and
    /// the step fails only the commands whose policy ran out of time. Past
    /// the step's policy budget, the remaining commands fail at once.
    #[test]
    fn a_step_is_timed_without_its_policies_whose_time_has_its_own_bound() {
        let rt = Runtime::with_components(PROTOCOL_WASM, &fixture("hostile")).unwrap();
        // A replica alone: it evaluates each command as it takes it.
        let mut core = rt.replica(core::Config::new(1, 1, vec![1])).unwrap();
        let n = POLICY_STEP_MS / POLICY_CALL_MS + 3;
        let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("k{i}").into_bytes()).collect();
        let batch = core::Batch {
            now_ms: 1,
            seed: 1,
            states: keys
                .iter()
                .map(|k| core::KeyState {
                    key: k.clone(),
                    state: Vec::new(),
                })
                .collect(),
            requests: (1..)
                .zip(&keys)
                .map(|(id, k)| core::Request {
                    id,
                    key: k.clone(),
                    op: core::Operation::Command(b"loop".to_vec()),
                })
                .collect(),
            ..Default::default()
        };
        let ready = core.try_step(batch).unwrap();
        let why = |needle: &str| -> Vec<u64> {
            ready
                .early
                .complete
                .iter()
                .filter(|c| {
                    matches!(&c.outcome, core::Outcome::Rejected(r, _)
                        if r.code == POLICY_FAILED && r.message.contains(needle))
                })
                .map(|c| c.id)
                .collect()
        };
        let timed_out = why("ran past its time limit");
        let unevaluated = why("policy calls used their");
        assert!(
            timed_out.len() as u64 > PROTOCOL_CALL_MS / POLICY_CALL_MS,
            "{timed_out:?}"
        );
        assert!(!unevaluated.is_empty(), "{:?}", ready.early);
        assert_eq!(timed_out.len() + unevaluated.len(), n as usize);
        // The instance is sound.
        assert!(core.describe().is_ok());
    }

    #[test]
    fn bytes_that_are_not_a_component_do_not_compile() {
        let e = Runtime::with_components(b"\0asm nonsense", REGISTER_WASM)
            .err()
            .unwrap();
        assert_eq!(e.kind(), "compile", "{e:?}");
    }
}
