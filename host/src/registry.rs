//! Components stored in the cluster.
//!
//! A component's id is the SHA-256 of its bytes. Its bytes live under the
//! system key `\0ballot/component/<id>` and the cluster's component
//! configuration (which components exist, which key prefixes are bound to
//! which policy) under `\0ballot/config`. Both are ordinary keys written
//! through consensus with the register policy, so they are durable in LMDB
//! on a quorum, replicated over QUIC, and a replica that misses one fetches
//! it with a linearizable read. Clients cannot name keys that begin with a
//! NUL byte.
//!
//! Before anything is stored, [`inspect`] checks a component: a component
//! (not a core module), exporting a supported version of the `policy` or
//! `protocol` world, importing nothing the host does not offer, compiling,
//! instantiating inside the sandbox, describing itself, and passing its
//! `self-check` export if it has one.
//!
//! Compiled code is cached per replica in `DATA_DIR/compiled/`, named by
//! component id and the engine's compatibility hash; the daemon only ever
//! deserializes files it wrote there itself.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ballot_core::register::Command;
use ballot_core::{Consistency, Current, Operation, Outcome};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};
use wasmtime::component::Component;
use wasmtime::Engine;

use crate::metrics::Metrics;
use crate::node::{
    self, ClientRequest, ConfigCommit, Control, CoreEvent, Protocol, ProtocolFactory,
};
use crate::runtime::{self, Bound, Error, PolicyInstance, Runtime};
use ballot_client::views::ComponentView;

pub use crate::runtime::CONTRACT;
pub use crate::system::{now_ms, CONFIG_KEY, SYSTEM_PREFIX};
/// Format of the configuration record.
pub const CONFIG_FORMAT: u32 = 1;
/// Largest component accepted.
pub const COMPONENT_MAX: usize = 8 << 20;

/// A component's id: the SHA-256 of its bytes, lower-case hex.
pub fn component_id(bytes: &[u8]) -> String {
    ballot_guest_build::sha256_hex(bytes)
}

/// The key holding a component's bytes.
pub fn component_key(id: &str) -> Vec<u8> {
    let mut key = SYSTEM_PREFIX.to_vec();
    key.extend_from_slice(b"component/");
    key.extend_from_slice(id.as_bytes());
    key
}

/// Which world a component implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Policy,
    Protocol,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Policy => "policy",
            Kind::Protocol => "protocol",
        })
    }
}

/// A stored component, as the configuration record lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentRecord {
    /// SHA-256 of the bytes, lower-case hex.
    pub id: String,
    pub kind: Kind,
    pub name: String,
    pub version: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state_formats: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wire_formats: Vec<u32>,
    /// It exported a self-check, and it passed.
    #[serde(default)]
    pub self_checked: bool,
    /// When it was pushed (ms since the epoch, the receiving replica's clock).
    pub pushed_ms: u64,
}

/// A key prefix routed to a policy component.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub prefix: String,
    pub component: String,
    pub bound_ms: u64,
}

/// An activation every voter is checking.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingActivation {
    /// The protocol component to run; `None` is the embedded default.
    pub target: Option<String>,
    /// Names this attempt's readiness keys (ms since the epoch).
    pub nonce: u64,
    /// `activate`, `rollback` or `auto-rollback`.
    pub action: String,
}

/// Which protocol the cluster runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolConfig {
    /// The active protocol component; `None` is the embedded default.
    #[serde(default)]
    pub active: Option<String>,
    /// Earlier active protocols, most recent last: what rollback returns to.
    #[serde(default)]
    pub previous: Vec<Option<String>>,
    #[serde(default)]
    pub pending: Option<PendingActivation>,
}

/// One entry of the swap history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapRecord {
    pub at_ms: u64,
    /// `activate`, `rollback`, `auto-rollback`, or `refused`.
    pub action: String,
    pub from: Option<String>,
    pub to: Option<String>,
    /// The replica that recorded it.
    pub by: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Swap history entries kept.
const HISTORY_MAX: usize = 100;

/// The value of [`CONFIG_KEY`]: JSON, with a format number.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub format: u32,
    #[serde(default)]
    pub components: Vec<ComponentRecord>,
    #[serde(default)]
    pub bindings: Vec<Binding>,
    #[serde(default)]
    pub protocol: ProtocolConfig,
    #[serde(default)]
    pub history: Vec<SwapRecord>,
}

impl ClusterConfig {
    /// An empty configuration of the current format.
    pub fn new() -> ClusterConfig {
        ClusterConfig {
            format: CONFIG_FORMAT,
            ..ClusterConfig::default()
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<ClusterConfig, String> {
        let config: ClusterConfig = serde_json::from_slice(bytes)
            .map_err(|e| format!("the component configuration does not parse: {e}"))?;
        if config.format != CONFIG_FORMAT {
            return Err(format!(
                "the component configuration has format {}; this replica reads {CONFIG_FORMAT}",
                config.format
            ));
        }
        Ok(config)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("the configuration serialises")
    }

    fn record(&mut self, entry: SwapRecord) {
        self.history.push(entry);
        let excess = self.history.len().saturating_sub(HISTORY_MAX);
        self.history.drain(..excess);
    }

    /// The component with this id, or the only one whose id starts with it
    /// (at least 8 hex digits).
    pub fn find(&self, id: &str) -> Result<&ComponentRecord, String> {
        if let Some(c) = self.components.iter().find(|c| c.id == id) {
            return Ok(c);
        }
        if id.len() < 8 {
            return Err(format!(
                "no component {id}: give its id, or at least 8 of its first hex digits"
            ));
        }
        let mut matches = self.components.iter().filter(|c| c.id.starts_with(id));
        match (matches.next(), matches.next()) {
            (Some(c), None) => Ok(c),
            (Some(_), Some(_)) => Err(format!("{id} names more than one component")),
            (None, _) => Err(format!(
                "no component {id} in the cluster; push it with `ballot component push`"
            )),
        }
    }
}

/// What [`inspect`] learned about a component.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspected {
    pub kind: Kind,
    pub name: String,
    pub version: String,
    pub state_formats: Vec<u32>,
    pub wire_formats: Vec<u32>,
    pub self_checked: bool,
}

/// Splits `ns:pkg/iface@1.2.3` into the name and the version.
fn split_version(name: &str) -> (&str, Option<(u64, u64, u64)>) {
    let Some((base, version)) = name.split_once('@') else {
        return (name, None);
    };
    let mut parts = version.splitn(3, '.').map(|p| {
        // Pre-release or build suffixes make the version unsupported.
        p.parse::<u64>().ok()
    });
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Some(a)), Some(Some(b)), Some(Some(c))) => (base, Some((a, b, c))),
        _ => (base, Some((u64::MAX, 0, 0))),
    }
}

/// Whether a component built against `v` runs on this host: the same
/// 0.minor line (the component model's semver rule for 0.x), and for an
/// import no newer patch than the host's (it may use functions the host
/// does not have).
fn supported(v: Option<(u64, u64, u64)>, import: bool) -> bool {
    let (major, minor, patch) = CONTRACT;
    match v {
        Some((a, b, c)) => a == major && b == minor && (!import || c <= patch),
        None => false,
    }
}

fn contract() -> String {
    let (a, b, c) = CONTRACT;
    format!("ballot:core@{a}.{b}.{c}")
}

/// Checks a component before it is stored. Blocking: it compiles and runs
/// guest code (the self-check) under the sandbox's fuel and memory bounds.
pub fn inspect(engine: &Engine, bytes: &[u8]) -> Result<(Inspected, Component), Error> {
    let fail = |m: String| Error(m);
    if bytes.len() > COMPONENT_MAX {
        return Err(fail(format!(
            "the file is {} bytes; components are at most {COMPONENT_MAX}",
            bytes.len()
        )));
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(fail(
            "not a WebAssembly file (it does not start with \\0asm)".into(),
        ));
    }
    match &bytes[4..8] {
        [0x0d, 0x00, 0x01, 0x00] => {}
        [0x01, 0x00, 0x00, 0x00] => {
            return Err(fail(
                "a core wasm module, not a component: `ballot policy build` (or \
                 wit-component) turns a module built with wit-bindgen into one"
                    .into(),
            ))
        }
        other => {
            return Err(fail(format!(
                "an unknown WebAssembly version or layer {other:02x?}"
            )))
        }
    }
    let component = Component::new(engine, bytes)
        .map_err(|e| fail(format!("the component does not compile: {e:#}")))?;
    let ty = component.component_type();

    let mut kind = None;
    let mut exports = Vec::new();
    for (name, _) in ty.exports(engine) {
        exports.push(name.to_string());
        let (base, version) = split_version(name);
        let this = match base {
            "ballot:core/policy-api" => Kind::Policy,
            "ballot:core/replica" => Kind::Protocol,
            _ => continue,
        };
        if !supported(version, false) {
            return Err(fail(format!(
                "it exports {name}, which this host does not run: it implements {}",
                contract()
            )));
        }
        if kind.is_some_and(|k| k != this) {
            return Err(fail(
                "it exports both the policy and the protocol interfaces; a component is one or the other"
                    .into(),
            ));
        }
        kind = Some(this);
    }
    let Some(kind) = kind else {
        return Err(fail(format!(
            "it implements neither the `policy` nor the `protocol` world of {} (it exports {})",
            contract(),
            if exports.is_empty() {
                "nothing".to_string()
            } else {
                exports.join(", ")
            }
        )));
    };
    for (name, _) in ty.imports(engine) {
        let (base, version) = split_version(name);
        let offered = match base {
            "ballot:core/log" => true,
            "ballot:core/policy-api" => kind == Kind::Protocol,
            _ => false,
        };
        if !offered {
            return Err(fail(format!(
                "it imports {name}, which the host does not offer to a {kind}: guests get \
                 no clock, randomness, files or network (only ballot:core/log{})",
                if kind == Kind::Protocol {
                    " and ballot:core/policy-api"
                } else {
                    ""
                }
            )));
        }
        if !supported(version, true) {
            return Err(fail(format!(
                "it imports {name}, newer than this host's {}",
                contract()
            )));
        }
    }

    let inspected = match kind {
        Kind::Policy => run_policy(engine, &component)?,
        Kind::Protocol => run_protocol(engine, &component)?,
    };
    Ok((inspected, component))
}

fn run_policy(engine: &Engine, component: &Component) -> Result<Inspected, Error> {
    let (mut store, instance) = runtime::sandbox_policy(engine, component)?;
    let (name, version) = runtime::describe_policy(&mut store, &instance)
        .map_err(|e| Error(format!("its describe failed: {e}")))?;
    let self_checked = runtime::self_check_export(&mut store, &instance)?;
    Ok(Inspected {
        kind: Kind::Policy,
        name,
        version,
        state_formats: Vec::new(),
        wire_formats: Vec::new(),
        self_checked,
    })
}

fn run_protocol(engine: &Engine, component: &Component) -> Result<Inspected, Error> {
    let register = Component::new(engine, runtime::REGISTER_WASM)
        .map_err(|e| Error(format!("compiling the register policy: {e:#}")))?;
    let rt = runtime::Runtime::from_parts(engine.clone(), component.clone(), register);
    let mut core = rt.replica(ballot_core::Config::new(1, 1, vec![1]))?;
    let info = core.describe()?;
    let self_checked = core.self_check()?;
    Ok(Inspected {
        kind: Kind::Protocol,
        name: info.name,
        version: info.version,
        state_formats: info.state_formats,
        wire_formats: info.wire_formats,
        self_checked,
    })
}

/// Compiled components on disk, for this engine only.
#[derive(Clone)]
pub struct Cache {
    dir: PathBuf,
    engine_tag: u64,
}

impl Cache {
    pub fn new(data_dir: &Path, engine: &Engine) -> Cache {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Cache {
            dir: data_dir.join("compiled"),
            engine_tag: h.finish(),
        }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir
            .join(format!("{id}-{:016x}.cwasm", self.engine_tag))
    }

    /// The compiled component, from the cache or by compiling `bytes` (and
    /// caching the result). `bytes` must already match `id`.
    pub fn load(&self, engine: &Engine, id: &str, bytes: &[u8]) -> Result<Component, Error> {
        let path = self.path(id);
        if path.exists() {
            // SAFETY: only this daemon writes into `compiled/`, with
            // `Component::serialize` of this engine configuration (the file
            // name carries the engine's compatibility hash, and wasmtime
            // checks it again).
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "recompiling: {e:#}");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let component = Component::new(engine, bytes)
            .map_err(|e| Error(format!("compiling component {id}: {e:#}")))?;
        if let Ok(serialized) = component.serialize() {
            let tmp = path.with_extension("tmp");
            let written = std::fs::create_dir_all(&self.dir)
                .and_then(|()| std::fs::write(&tmp, serialized))
                .and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                tracing::warn!(path = %path.display(), "not caching compiled code: {e}");
            }
        }
        Ok(component)
    }
}

/// Why a registry operation did not happen.
#[derive(Debug)]
pub enum RegistryError {
    /// The request itself is wrong (a broken component, a bad prefix).
    Invalid(String),
    /// It names a component that is not stored.
    NotFound(String),
    /// The cluster could not do it now (no quorum, timeouts, contention).
    Unavailable(String),
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::Invalid(m)
            | RegistryError::NotFound(m)
            | RegistryError::Unavailable(m) => f.write_str(m),
        }
    }
}

/// The configuration this replica runs, and whether it could apply the
/// newest it has seen.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    /// Version of [`CONFIG_KEY`] applied; 0 before any configuration.
    pub version: u64,
    pub config: ClusterConfig,
    /// Why a newer version is not applied yet (a component it could not
    /// fetch or compile); it is tried again.
    pub error: Option<String>,
}

/// How long the registry's own operations wait for the cluster.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a replica confirms it runs the newest configuration, in case
/// it missed the commit while it was down or cut off.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What a replica's protocol instance runs.
#[derive(Clone, Debug, Serialize)]
pub struct Running {
    /// The component id (`native` for the compiled-in build).
    pub label: String,
    pub view: ComponentView,
    pub incarnation: u64,
    pub since_ms: u64,
}

/// What the registry is built from.
pub struct Setup {
    pub engine: Engine,
    pub data_dir: PathBuf,
    pub requests: mpsc::Sender<ClientRequest>,
    pub control: mpsc::UnboundedSender<Control>,
    /// The embedded components, compiled; `None` on a native replica,
    /// which cannot run protocol components.
    pub runtime: Option<Arc<runtime::Runtime>>,
    /// This replica's protocol configuration (incarnation aside).
    pub core_config: ballot_core::Config,
    pub running: Running,
    pub metrics: Arc<Metrics>,
    /// The replicas that run the protocol now: voters and learners of the
    /// membership this replica has adopted. An activation waits for each.
    pub members: Members,
}

/// Says who is in the cluster now (the membership's answer, as a closure so
/// the registry does not depend on the membership module).
pub type Members = Box<dyn Fn() -> Vec<u32> + Send + Sync>;

/// Traps within this long after a swap count towards a rollback.
const TRAP_WINDOW: Duration = Duration::from_secs(60);
/// Traps in that window that make a replica fall back to the previous
/// protocol.
const TRAPS_TO_ROLL_BACK: usize = 3;
/// How long an activation waits for every voter to say it can run the
/// component.
const READY_WAIT: Duration = Duration::from_secs(15);

/// Protocol bookkeeping of one replica.
#[derive(Default)]
struct ProtocolState {
    /// The component the core was last told to run.
    desired: Option<String>,
    /// Readiness checks done, by nonce.
    reported: HashSet<u64>,
    /// Components this replica fell back from: never swapped to again.
    quarantined: HashSet<String>,
    /// Traps since the last swap.
    traps: Vec<Instant>,
    swapped_at: Option<Instant>,
    /// Views of the components this replica may run, by label.
    views: HashMap<String, ComponentView>,
    /// Protocol components being compiled ahead of an activation.
    prewarming: HashSet<String>,
}

/// A replica's view of the stored components, and the task that keeps its
/// policy bindings and protocol in step with the configuration record.
pub struct Registry {
    engine: Engine,
    cache: Cache,
    requests: mpsc::Sender<ClientRequest>,
    control: mpsc::UnboundedSender<Control>,
    applied: RwLock<Applied>,
    changed: Notify,
    compiled: Mutex<HashMap<String, Component>>,
    runtime: Option<Arc<runtime::Runtime>>,
    core_config: ballot_core::Config,
    embedded_id: String,
    running: RwLock<Running>,
    protocol: Mutex<ProtocolState>,
    metrics: Arc<Metrics>,
    members: Members,
    /// Set once the configuration has been read and applied at startup.
    started: std::sync::atomic::AtomicBool,
}

fn unavailable(outcome: &Outcome) -> RegistryError {
    match outcome {
        Outcome::Failed(f) => RegistryError::Unavailable(f.message.clone()),
        Outcome::Rejected(r, _) => RegistryError::Unavailable(format!("{}: {}", r.code, r.message)),
        Outcome::Done(_) => RegistryError::Unavailable("unexpected success".into()),
    }
}

fn ready_key(nonce: u64, replica: u32) -> Vec<u8> {
    let mut key = SYSTEM_PREFIX.to_vec();
    key.extend_from_slice(format!("ready/{nonce}/{replica}").as_bytes());
    key
}

/// Whether replicas running `from` and `to` side by side (as they do while
/// a swap is under way) understand each other, and whether `to` reads the
/// key states `from` wrote. Both lists end with the format written.
pub fn compatible(from: &ComponentView, to: &ComponentView) -> Result<(), String> {
    let writes = |f: &[u32]| f.last().copied();
    let (Some(from_wire), Some(to_wire), Some(from_state)) = (
        writes(&from.wire_formats),
        writes(&to.wire_formats),
        writes(&from.state_formats),
    ) else {
        return Err("a protocol must declare the state and wire formats it reads".into());
    };
    if !to.wire_formats.contains(&from_wire) {
        return Err(format!(
            "{} {} cannot read wire format {from_wire}, which {} {} sends while the swap is under way",
            to.name, to.version, from.name, from.version
        ));
    }
    if !from.wire_formats.contains(&to_wire) {
        return Err(format!(
            "{} {} cannot read wire format {to_wire}, which {} {} would send while the swap is under way; \
             first activate a version that reads it",
            from.name, from.version, to.name, to.version
        ));
    }
    if !to.state_formats.contains(&from_state) {
        return Err(format!(
            "{} {} cannot read key-state format {from_state}, which {} {} wrote",
            to.name, to.version, from.name, from.version
        ));
    }
    Ok(())
}

impl Registry {
    pub fn new(setup: Setup) -> Registry {
        let embedded_id = component_id(runtime::PROTOCOL_WASM);
        let mut state = ProtocolState::default();
        state
            .views
            .insert(setup.running.label.clone(), setup.running.view.clone());
        state.desired = Some(setup.running.label.clone());
        set_protocol_info(&setup.metrics, None, &setup.running);
        Registry {
            cache: Cache::new(&setup.data_dir, &setup.engine),
            engine: setup.engine,
            requests: setup.requests,
            control: setup.control,
            applied: RwLock::new(Applied::default()),
            changed: Notify::new(),
            compiled: Mutex::new(HashMap::new()),
            runtime: setup.runtime,
            core_config: setup.core_config,
            embedded_id,
            running: RwLock::new(setup.running),
            protocol: Mutex::new(state),
            metrics: setup.metrics,
            members: setup.members,
            started: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether the replica has loaded the cluster's component
    /// configuration since it started (it serves no client until then).
    pub fn started(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::Acquire)
    }

    /// What this replica's protocol instance runs.
    pub fn running(&self) -> Running {
        self.running.read().expect("registry lock").clone()
    }

    /// The id of the embedded default protocol.
    pub fn embedded_id(&self) -> &str {
        &self.embedded_id
    }

    /// What this replica runs now.
    pub fn applied(&self) -> Applied {
        self.applied.read().expect("registry lock").clone()
    }

    /// The binding governing `key` on this replica, if any.
    pub fn binding_for(&self, key: &[u8]) -> Option<(Binding, ComponentRecord)> {
        let applied = self.applied.read().expect("registry lock");
        let config = &applied.config;
        let b = config
            .bindings
            .iter()
            .filter(|b| key.first() != Some(&0) && key.starts_with(b.prefix.as_bytes()))
            .max_by_key(|b| b.prefix.len())?;
        let record = config.components.iter().find(|c| c.id == b.component)?;
        Some((b.clone(), record.clone()))
    }

    async fn read(&self, key: Vec<u8>, consistency: Consistency) -> Result<Current, RegistryError> {
        let c = node::call(
            &self.requests,
            key,
            Operation::Read(consistency),
            CALL_TIMEOUT,
        )
        .await
        .map_err(RegistryError::Unavailable)?;
        match c.outcome {
            Outcome::Done(current) => Ok(current),
            other => Err(unavailable(&other)),
        }
    }

    async fn command(&self, key: Vec<u8>, command: Command) -> Result<Outcome, RegistryError> {
        let c = node::call(
            &self.requests,
            key,
            Operation::Command(command.encode()),
            CALL_TIMEOUT,
        )
        .await
        .map_err(RegistryError::Unavailable)?;
        Ok(c.outcome)
    }

    /// Keeps the policy bindings in step with the configuration: on every
    /// commit this replica makes durable, and by a linearizable read every
    /// [`POLL_INTERVAL`].
    pub async fn run(
        self: Arc<Self>,
        mut commits: mpsc::UnboundedReceiver<ConfigCommit>,
        mut events: mpsc::UnboundedReceiver<CoreEvent>,
    ) {
        // Clients are served only once the cluster's bindings are known: a
        // command routed by a stale or empty table would run the wrong
        // policy (a PUT could overwrite a counter). So the first read is
        // linearizable, and is retried until it succeeds.
        loop {
            match self
                .read(CONFIG_KEY.to_vec(), Consistency::Linearizable)
                .await
            {
                Ok(current) => {
                    self.consider(current.version, current.value).await;
                    if self.applied().error.is_none() {
                        break;
                    }
                }
                Err(e) => debug!("loading the component configuration: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.started
            .store(true, std::sync::atomic::Ordering::Release);
        info!(
            version = self.applied().version,
            "component configuration loaded"
        );
        self.clone().prewarm();
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        loop {
            tokio::select! {
                c = commits.recv() => match c {
                    Some((version, value)) => {
                        self.consider(version, value).await;
                        self.clone().prewarm();
                    }
                    None => return,
                },
                Some(e) = events.recv() => self.on_core_event(e).await,
                _ = poll.tick() => {
                    match self.read(CONFIG_KEY.to_vec(), Consistency::Linearizable).await {
                        Ok(current) => {
                            self.consider(current.version, current.value).await;
                            self.clone().prewarm();
                        }
                        Err(e) => debug!("configuration poll: {e}"),
                    }
                }
            }
        }
    }

    /// Compiles, in the background, every stored protocol component this
    /// replica has not compiled yet, so an activation finds it ready.
    fn prewarm(self: Arc<Self>) {
        if self.runtime.is_none() {
            return;
        }
        let config = self.applied().config;
        let ids: Vec<String> = {
            let compiled = self.compiled.lock().expect("registry lock");
            let mut state = self.protocol.lock().expect("registry lock");
            config
                .components
                .iter()
                .filter(|c| c.kind == Kind::Protocol && !compiled.contains_key(&c.id))
                .filter(|c| state.prewarming.insert(c.id.clone()))
                .map(|c| c.id.clone())
                .collect()
        };
        if ids.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for id in ids {
                if let Err(e) = self.component(&id).await {
                    debug!(component = %id, "not precompiled: {e}");
                }
                self.protocol
                    .lock()
                    .expect("registry lock")
                    .prewarming
                    .remove(&id);
            }
        });
    }

    async fn consider(&self, version: u64, value: Option<Vec<u8>>) {
        {
            let applied = self.applied.read().expect("registry lock");
            if version < applied.version || (version == applied.version && applied.error.is_none())
            {
                return;
            }
        }
        let result = match value.as_deref().map(ClusterConfig::decode) {
            None => Ok(ClusterConfig::new()),
            Some(r) => r,
        };
        let prepared = match result {
            Ok(config) => self.prepare(&config).await.map(|bound| (config, bound)),
            Err(e) => Err(e),
        };
        let config = {
            let mut applied = self.applied.write().expect("registry lock");
            if version < applied.version {
                return;
            }
            match prepared {
                Ok((config, bound)) => {
                    let bindings = config.bindings.len();
                    let _ = self.control.send(Control::Rebind(bound));
                    *applied = Applied {
                        version,
                        config: config.clone(),
                        error: None,
                    };
                    info!(version, bindings, "component configuration applied");
                    Some(config)
                }
                Err(e) => {
                    warn!(version, "component configuration not applied yet: {e}");
                    applied.error = Some(format!("version {version}: {e}"));
                    None
                }
            }
        };
        if let Some(config) = config {
            self.follow_protocol(&config).await;
        }
        self.changed.notify_waiters();
    }

    /// Answers a pending activation's readiness check, and swaps to the
    /// active protocol if this replica does not run it yet.
    async fn follow_protocol(&self, config: &ClusterConfig) {
        self.forget_readiness(config.protocol.pending.as_ref().map(|p| p.nonce))
            .await;
        if let Some(p) = &config.protocol.pending {
            let fresh = {
                let mut state = self.protocol.lock().expect("registry lock");
                let fresh = state.reported.insert(p.nonce);
                if fresh {
                    // An operator activating a component again is trying
                    // it again: it is no longer quarantined here.
                    let target = p.target.clone().unwrap_or_else(|| self.embedded_id.clone());
                    state.quarantined.remove(&target);
                }
                fresh
            };
            if fresh {
                let verdict = match self.prepare_protocol(p.target.as_deref()).await {
                    Ok((label, view, _)) => {
                        let running = self.running();
                        match compatible(&running.view, &view) {
                            Ok(()) => {
                                self.protocol
                                    .lock()
                                    .expect("registry lock")
                                    .views
                                    .insert(label, view);
                                serde_json::json!({ "ok": true })
                            }
                            Err(e) => serde_json::json!({ "ok": false, "error": e }),
                        }
                    }
                    Err(e) => serde_json::json!({ "ok": false, "error": e }),
                };
                let key = ready_key(p.nonce, self.core_config.self_id);
                let value = verdict.to_string().into_bytes();
                if let Err(e) = self.command(key, Command::Put(value)).await {
                    warn!("reporting readiness for activation {}: {e}", p.nonce);
                }
            }
        }
        let target = config
            .protocol
            .active
            .clone()
            .unwrap_or_else(|| self.embedded_id.clone());
        let desired = {
            let state = self.protocol.lock().expect("registry lock");
            if state.quarantined.contains(&target) {
                return;
            }
            state.desired.clone()
        };
        if self.runtime.is_none() || desired.as_deref() == Some(&target) {
            return;
        }
        match self
            .prepare_protocol(config.protocol.active.as_deref())
            .await
        {
            Ok((label, view, factory)) => {
                let mut state = self.protocol.lock().expect("registry lock");
                state.views.insert(label.clone(), view);
                state.desired = Some(label.clone());
                let _ = self.control.send(Control::Swap { label, factory });
            }
            Err(e) => warn!(component = %target, "cannot run the active protocol: {e}"),
        }
    }

    /// Fetches, compiles and instantiates a protocol component (`None`:
    /// the embedded one) for this replica; its id, description and factory.
    async fn prepare_protocol(
        &self,
        target: Option<&str>,
    ) -> Result<(String, ComponentView, ProtocolFactory), String> {
        let runtime = self.runtime.as_ref().ok_or_else(|| {
            format!(
                "replica {} runs the compiled-in protocol (--core native) and cannot run components",
                self.core_config.self_id
            )
        })?;
        let (label, component) = match target {
            None => (
                self.embedded_id.clone(),
                runtime.protocol_component().clone(),
            ),
            Some(id) => (
                id.to_string(),
                self.component(id).await.map_err(|e| e.to_string())?,
            ),
        };
        let rt = Arc::new(runtime::Runtime::from_parts(
            self.engine.clone(),
            component,
            runtime.policy_component().clone(),
        ));
        let config = self.core_config.clone();
        let probe = rt.clone();
        let info = tokio::task::spawn_blocking(move || {
            probe.replica(config).and_then(|mut core| core.describe())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| {
            format!(
                "it does not start on replica {}: {e}",
                self.core_config.self_id
            )
        })?;
        let factory = wasm_factory(
            rt,
            self.core_config.clone(),
            self.metrics.policy_failures.clone(),
        );
        Ok((label, component_view(info), factory))
    }

    async fn on_core_event(&self, event: CoreEvent) {
        match event {
            CoreEvent::Swapped {
                label, incarnation, ..
            } => {
                let view = {
                    let mut state = self.protocol.lock().expect("registry lock");
                    state.traps.clear();
                    state.swapped_at = Some(Instant::now());
                    state.views.get(&label).cloned()
                };
                let mut running = self.running.write().expect("registry lock");
                let before = running.clone();
                *running = Running {
                    view: view.unwrap_or_else(|| before.view.clone()),
                    label,
                    incarnation,
                    since_ms: now_ms(),
                };
                set_protocol_info(&self.metrics, Some(&before), &running);
                drop(running);
                self.changed.notify_waiters();
            }
            CoreEvent::Trapped { label, reason } => {
                let fall_back = {
                    let mut state = self.protocol.lock().expect("registry lock");
                    let now = Instant::now();
                    state.traps.retain(|t| now.duration_since(*t) < TRAP_WINDOW);
                    state.traps.push(now);
                    let recent = state
                        .swapped_at
                        .is_some_and(|at| now.duration_since(at) < TRAP_WINDOW);
                    recent && state.traps.len() >= TRAPS_TO_ROLL_BACK
                };
                let config = self.applied().config;
                let active = config
                    .protocol
                    .active
                    .clone()
                    .unwrap_or_else(|| self.embedded_id.clone());
                if !fall_back || active != label {
                    return;
                }
                let Some(previous) = config.protocol.previous.last().cloned() else {
                    return;
                };
                warn!(component = %label, "the protocol keeps failing right after its activation; rolling back: {reason}");
                self.protocol
                    .lock()
                    .expect("registry lock")
                    .quarantined
                    .insert(label.clone());
                // Locally first: the failing protocol cannot be trusted to
                // carry the rollback through consensus.
                match self.prepare_protocol(previous.as_deref()).await {
                    Ok((to, view, factory)) => {
                        let mut state = self.protocol.lock().expect("registry lock");
                        state.views.insert(to.clone(), view);
                        state.desired = Some(to.clone());
                        let _ = self.control.send(Control::Swap { label: to, factory });
                    }
                    Err(e) => {
                        warn!("cannot fall back to the previous protocol: {e}");
                        return;
                    }
                }
                // Then for everyone.
                let why = format!(
                    "trapped {TRAPS_TO_ROLL_BACK} times within {}s of its activation: {reason}",
                    TRAP_WINDOW.as_secs()
                );
                for _ in 0..10 {
                    let result = self
                        .update(|config| {
                            let current = config.protocol.active.clone();
                            let failing =
                                current.clone().unwrap_or_else(|| self.embedded_id.clone());
                            if failing != label {
                                return Ok(false);
                            }
                            let to = config.protocol.previous.pop().unwrap_or(None);
                            config.protocol.active = to.clone();
                            config.protocol.pending = None;
                            config.record(SwapRecord {
                                at_ms: now_ms(),
                                action: "auto-rollback".into(),
                                from: current,
                                to,
                                by: self.core_config.self_id,
                                reason: Some(why.clone()),
                            });
                            Ok(true)
                        })
                        .await;
                    match result {
                        Ok(_) => return,
                        Err(e) => {
                            debug!("recording the automatic rollback: {e}");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
        }
    }

    /// Swaps the cluster to `target` (`None`: the embedded protocol) once
    /// every voter has said it can run it. `action` is `activate` (the
    /// current protocol becomes the rollback target) or `rollback` (it is
    /// dropped from the rollback stack). Returns the configuration version
    /// and the target's id.
    pub async fn activate(
        &self,
        target: Option<&str>,
        action: &str,
    ) -> Result<(u64, String), RegistryError> {
        let (version, config) = self.config().await?;
        let is_embedded = |id: &str| id.len() >= 8 && self.embedded_id.starts_with(id);
        let target = match target {
            None => None,
            Some(id) if is_embedded(id) => None,
            Some(id) => {
                let record = config.find(id).map_err(RegistryError::NotFound)?;
                if record.kind != Kind::Protocol {
                    return Err(RegistryError::Invalid(format!(
                        "component {} ({} {}) is a {}, not a protocol",
                        &record.id[..12],
                        record.name,
                        record.version,
                        record.kind
                    )));
                }
                (record.id != self.embedded_id).then(|| record.id.clone())
            }
        };
        let label = target.clone().unwrap_or_else(|| self.embedded_id.clone());
        if config.protocol.active == target {
            return Ok((version, label));
        }
        if let Some(p) = &config.protocol.pending {
            if now_ms().saturating_sub(p.nonce) < 2 * READY_WAIT.as_millis() as u64 {
                return Err(RegistryError::Unavailable(
                    "another activation is being checked; try again shortly".into(),
                ));
            }
        }
        let nonce = now_ms();
        let pending = PendingActivation {
            target: target.clone(),
            nonce,
            action: action.to_string(),
        };
        self.update(|config| {
            config.protocol.pending = Some(pending.clone());
            Ok(true)
        })
        .await?;

        // Every replica of the current membership, voter or learner, checks
        // it can run the component and says so (not the replicas listed at
        // start-up: some may have left, others joined since).
        let mut waiting: Vec<u32> = (self.members)();
        let mut refusals = Vec::new();
        let deadline = Instant::now() + READY_WAIT;
        while !waiting.is_empty() && Instant::now() < deadline {
            let mut still = Vec::new();
            for replica in waiting {
                let answer = self
                    .read(ready_key(nonce, replica), Consistency::Linearizable)
                    .await
                    .ok()
                    .and_then(|c| c.value)
                    .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v).ok());
                match answer {
                    None => still.push(replica),
                    Some(v) if v["ok"] == true => {}
                    Some(v) => refusals.push(format!(
                        "replica {replica}: {}",
                        v["error"].as_str().unwrap_or("refused")
                    )),
                }
            }
            waiting = still;
            if !waiting.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for replica in waiting {
            refusals.push(format!(
                "replica {replica} did not say within {}s whether it can run it",
                READY_WAIT.as_secs()
            ));
        }
        let refused = !refusals.is_empty();
        let reason = refusals.join("; ");
        let by = self.core_config.self_id;
        let asked = (self.members)();
        let (version, _) = self
            .update(|config| {
                if config.protocol.pending.as_ref().map(|p| p.nonce) != Some(nonce) {
                    return Err(RegistryError::Unavailable(
                        "another activation replaced this one".into(),
                    ));
                }
                config.protocol.pending = None;
                let from = config.protocol.active.clone();
                if refused {
                    config.record(SwapRecord {
                        at_ms: now_ms(),
                        action: "refused".into(),
                        from,
                        to: target.clone(),
                        by,
                        reason: Some(reason.clone()),
                    });
                    return Ok(true);
                }
                if action == "rollback" {
                    config.protocol.previous.pop();
                } else {
                    config.protocol.previous.push(from.clone());
                }
                config.protocol.active = target.clone();
                config.record(SwapRecord {
                    at_ms: now_ms(),
                    action: action.to_string(),
                    from,
                    to: target.clone(),
                    by,
                    reason: None,
                });
                Ok(true)
            })
            .await?;
        // The answers served their purpose: none is read again.
        for replica in asked {
            if let Err(e) = self
                .command(ready_key(nonce, replica), Command::Delete)
                .await
            {
                debug!("deleting readiness {nonce}/{replica}: {e}");
            }
        }
        if refused {
            return Err(RegistryError::Invalid(format!(
                "activation refused: {reason}"
            )));
        }
        Ok((version, label))
    }

    /// Deletes this replica's readiness answers to activations that are
    /// over (every one but `pending`): the activating replica deletes them
    /// too, but an answer can land after it gave up waiting. A delete that
    /// fails is tried again with the next configuration applied.
    async fn forget_readiness(&self, pending: Option<u64>) {
        let over: Vec<u64> = {
            let state = self.protocol.lock().expect("registry lock");
            state
                .reported
                .iter()
                .copied()
                .filter(|&n| Some(n) != pending)
                .collect()
        };
        for nonce in over {
            let key = ready_key(nonce, self.core_config.self_id);
            match self.command(key, Command::Delete).await {
                Ok(Outcome::Done(_)) => {
                    self.protocol
                        .lock()
                        .expect("registry lock")
                        .reported
                        .remove(&nonce);
                }
                Ok(other) => debug!("deleting readiness {nonce}: {other:?}"),
                Err(e) => debug!("deleting readiness {nonce}: {e}"),
            }
        }
    }

    /// Returns the cluster to the protocol it ran before the current one.
    pub async fn rollback(&self) -> Result<(u64, String), RegistryError> {
        let (_, config) = self.config().await?;
        let Some(previous) = config.protocol.previous.last().cloned() else {
            return Err(RegistryError::Invalid(
                "nothing to roll back to: the cluster runs the protocol it started with".into(),
            ));
        };
        self.activate(previous.as_deref(), "rollback").await
    }

    /// Waits until this replica's protocol instance runs `label`.
    pub async fn wait_running(&self, label: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if self.running().label == label {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.running().label == label;
            }
        }
    }

    /// Compiles every bound policy of `config`.
    async fn prepare(&self, config: &ClusterConfig) -> Result<Vec<Bound>, String> {
        let mut bound = Vec::new();
        for b in &config.bindings {
            let record = config
                .components
                .iter()
                .find(|c| c.id == b.component)
                .ok_or_else(|| format!("binding {:?} names an unlisted component", b.prefix))?;
            let component = self
                .component(&record.id)
                .await
                .map_err(|e| e.to_string())?;
            bound.push(Bound {
                prefix: b.prefix.as_bytes().to_vec(),
                id: record.id.clone(),
                instance: PolicyInstance::new(component, &record.name, &record.version),
            });
        }
        Ok(bound)
    }

    /// A stored component, compiled: from memory, the disk cache, or the
    /// cluster (this replica's copy, else a linearizable read, which also
    /// repairs the local copy).
    async fn component(&self, id: &str) -> Result<Component, RegistryError> {
        if let Some(c) = self.compiled.lock().expect("registry lock").get(id) {
            return Ok(c.clone());
        }
        let key = component_key(id);
        let mut bytes = self.read(key.clone(), Consistency::Local).await?.value;
        if bytes.is_none() {
            bytes = self.read(key, Consistency::Linearizable).await?.value;
        }
        let bytes = bytes.ok_or_else(|| {
            RegistryError::NotFound(format!("component {id} is not stored in the cluster"))
        })?;
        if component_id(&bytes) != id {
            return Err(RegistryError::Invalid(format!(
                "the stored bytes of component {id} do not hash to its id"
            )));
        }
        let engine = self.engine.clone();
        let cache = self.cache.clone();
        let owned_id = id.to_string();
        let component = tokio::task::spawn_blocking(move || cache.load(&engine, &owned_id, &bytes))
            .await
            .map_err(|e| RegistryError::Unavailable(format!("compiling: {e}")))?
            .map_err(|e| RegistryError::Invalid(e.0))?;
        self.compiled
            .lock()
            .expect("registry lock")
            .insert(id.to_string(), component.clone());
        Ok(component)
    }

    /// Reads the configuration (linearizable), changes it with `edit` and
    /// writes it back if no one else changed it meanwhile; retries if
    /// someone did. Returns the version written.
    async fn update(
        &self,
        edit: impl Fn(&mut ClusterConfig) -> Result<bool, RegistryError>,
    ) -> Result<(u64, ClusterConfig), RegistryError> {
        for _ in 0..16 {
            let current = self
                .read(CONFIG_KEY.to_vec(), Consistency::Linearizable)
                .await?;
            let mut config = match &current.value {
                Some(v) => ClusterConfig::decode(v).map_err(RegistryError::Unavailable)?,
                None => ClusterConfig::new(),
            };
            if !edit(&mut config)? {
                return Ok((current.version, config));
            }
            let value = config.encode();
            let command = match current.value {
                None => Command::Create(value),
                Some(_) => Command::Cas {
                    expected: current.version,
                    value,
                },
            };
            match self.command(CONFIG_KEY.to_vec(), command).await? {
                Outcome::Done(now) => return Ok((now.version, config)),
                // Someone else changed it first: read and edit again.
                Outcome::Rejected(..) => continue,
                other => return Err(unavailable(&other)),
            }
        }
        Err(RegistryError::Unavailable(
            "the configuration kept changing under this update; try again".into(),
        ))
    }

    /// Validates a component, stores its bytes and lists it. Pushing the
    /// same bytes again changes nothing. Returns the record and whether it
    /// is new.
    pub async fn push(&self, bytes: Vec<u8>) -> Result<(ComponentRecord, bool), RegistryError> {
        let engine = self.engine.clone();
        let checked = bytes.clone();
        let (inspected, component) =
            tokio::task::spawn_blocking(move || inspect(&engine, &checked))
                .await
                .map_err(|e| RegistryError::Unavailable(format!("inspecting: {e}")))?
                .map_err(|e| RegistryError::Invalid(e.0))?;
        let id = component_id(&bytes);
        let record = ComponentRecord {
            id: id.clone(),
            kind: inspected.kind,
            name: inspected.name,
            version: inspected.version,
            size: bytes.len() as u64,
            state_formats: inspected.state_formats,
            wire_formats: inspected.wire_formats,
            self_checked: inspected.self_checked,
            pushed_ms: now_ms(),
        };
        self.compiled
            .lock()
            .expect("registry lock")
            .insert(id.clone(), component);
        // The bytes first: a listed component is always fetchable.
        match self
            .command(component_key(&id), Command::Create(bytes))
            .await?
        {
            Outcome::Done(_) => {}
            other => return Err(unavailable(&other)),
        }
        // Set by the edit that lists it; an edit that finds it listed
        // already (pushed before, or by a racing push) leaves it false.
        let created = std::sync::atomic::AtomicBool::new(false);
        let (_, config) = self
            .update(|config| {
                let listed = config.components.iter().any(|c| c.id == record.id);
                created.store(!listed, std::sync::atomic::Ordering::Relaxed);
                if !listed {
                    config.components.push(record.clone());
                }
                Ok(!listed)
            })
            .await?;
        let stored = config
            .components
            .into_iter()
            .find(|c| c.id == id)
            .unwrap_or(record);
        Ok((stored, created.into_inner()))
    }

    /// Routes keys starting with `prefix` to the policy `component` (an id
    /// or a unique id prefix). Returns the configuration version that
    /// carries the binding.
    pub async fn bind(
        &self,
        prefix: &str,
        component: &str,
    ) -> Result<(u64, Binding, ComponentRecord), RegistryError> {
        check_prefix(prefix)?;
        let found = std::sync::Mutex::new(None);
        let (version, _) = self
            .update(|config| {
                let record = config.find(component).map_err(RegistryError::NotFound)?;
                if record.kind != Kind::Policy {
                    return Err(RegistryError::Invalid(format!(
                        "component {} ({} {}) is a {}, not a policy; only policies can be bound",
                        &record.id[..12],
                        record.name,
                        record.version,
                        record.kind
                    )));
                }
                let record = record.clone();
                let binding = Binding {
                    prefix: prefix.to_string(),
                    component: record.id.clone(),
                    bound_ms: now_ms(),
                };
                *found.lock().expect("local lock") = Some((binding.clone(), record.clone()));
                let existing = config.bindings.iter_mut().find(|b| b.prefix == prefix);
                match existing {
                    Some(b) if b.component == record.id => return Ok(false),
                    Some(b) => *b = binding,
                    None => config.bindings.push(binding),
                }
                config.bindings.sort_by(|a, b| a.prefix.cmp(&b.prefix));
                Ok(true)
            })
            .await?;
        // Make sure this replica can run it before saying it is bound.
        let (binding, record) = found
            .into_inner()
            .expect("local lock")
            .expect("set by a successful edit");
        self.component(&record.id).await?;
        Ok((version, binding, record))
    }

    /// Removes the binding of `prefix`; its keys go back to the register.
    pub async fn unbind(&self, prefix: &str) -> Result<u64, RegistryError> {
        let (version, _) = self
            .update(|config| {
                let before = config.bindings.len();
                config.bindings.retain(|b| b.prefix != prefix);
                if config.bindings.len() == before {
                    return Err(RegistryError::NotFound(format!(
                        "no binding for prefix {prefix:?}"
                    )));
                }
                Ok(true)
            })
            .await?;
        Ok(version)
    }

    /// The cluster's configuration, read linearizably.
    pub async fn config(&self) -> Result<(u64, ClusterConfig), RegistryError> {
        self.update(|_| Ok(false)).await
    }

    /// Waits until this replica runs configuration `version` or newer.
    pub async fn wait_applied(&self, version: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if self.applied().version >= version {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.applied().version >= version;
            }
        }
    }
}

fn set_protocol_info(metrics: &Metrics, before: Option<&Running>, now: &Running) {
    let labels = |r: &Running| {
        vec![
            ("name", r.view.name.clone()),
            ("version", r.view.version.clone()),
            ("component", r.label.clone()),
        ]
    };
    if let Some(before) = before {
        metrics.protocol_info.get_or_create(&labels(before)).set(0);
    }
    metrics.protocol_info.get_or_create(&labels(now)).set(1);
}

/// Prefixes are 1 to 511 bytes and cannot reach into the cluster's keys.
fn check_prefix(prefix: &str) -> Result<(), RegistryError> {
    if prefix.is_empty() || prefix.len() > crate::node::KEY_MAX {
        return Err(RegistryError::Invalid(format!(
            "a prefix is 1 to {} bytes",
            crate::node::KEY_MAX
        )));
    }
    if prefix.as_bytes()[0] == 0 {
        return Err(RegistryError::Invalid(
            "keys beginning with a NUL byte belong to the cluster".into(),
        ));
    }
    Ok(())
}

/// Builds instances of `runtime`'s protocol for this replica.
pub fn wasm_factory(
    runtime: Arc<Runtime>,
    base: ballot_core::Config,
    failures: prometheus_client::metrics::counter::Counter,
) -> ProtocolFactory {
    Arc::new(move |incarnation| {
        let mut config = base.clone();
        config.incarnation = incarnation;
        let mut core = runtime.replica(config).map_err(|e| e.to_string())?;
        core.policies_mut().count_failures(failures.clone());
        Ok(Box::new(core) as Box<dyn Protocol>)
    })
}

/// What the API shows of a component's own description.
pub fn component_view(info: ballot_core::Info) -> ComponentView {
    ComponentView {
        name: info.name,
        version: info.version,
        state_formats: info.state_formats,
        wire_formats: info.wire_formats,
    }
}

/// One line per embedded component: its world, name, version and formats.
pub fn describe_embedded() -> Result<Vec<Embedded>, Error> {
    let engine = runtime::engine()?;
    let mut out = Vec::new();
    for (bytes, file) in [
        (runtime::PROTOCOL_WASM, "protocol.wasm"),
        (runtime::REGISTER_WASM, "register.wasm"),
    ] {
        let (i, _) = inspect(&engine, bytes)?;
        let protocol = i.kind == Kind::Protocol;
        out.push(Embedded {
            kind: i.kind.to_string(),
            name: i.name,
            version: i.version,
            file,
            bytes: bytes.len(),
            id: component_id(bytes),
            state_formats: if protocol {
                i.state_formats
            } else {
                Vec::new()
            },
            wire_formats: if protocol { i.wire_formats } else { Vec::new() },
        });
    }
    Ok(out)
}

/// One embedded default component, as `ballot components` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Embedded {
    pub kind: String,
    pub name: String,
    pub version: String,
    pub file: &'static str,
    pub bytes: usize,
    pub id: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub state_formats: Vec<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub wire_formats: Vec<u32>,
}

impl Embedded {
    /// One line for people.
    pub fn line(&self) -> String {
        let formats = if self.state_formats.is_empty() {
            String::new()
        } else {
            format!(
                "  state formats {:?}  wire formats {:?}",
                self.state_formats, self.wire_formats
            )
        };
        format!(
            "{:<9} {} {}{formats}  ({}, {} bytes, {})",
            self.kind,
            self.name,
            self.version,
            self.file,
            self.bytes,
            &self.id[..12]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_follow_the_component_model_semver_rules() {
        assert!(supported(split_version("ballot:core/log@0.2.0").1, true));
        assert!(supported(split_version("ballot:core/log@0.2.1").1, true));
        assert!(!supported(split_version("ballot:core/log@0.2.9").1, true));
        assert!(supported(
            split_version("ballot:core/policy-api@0.2.9").1,
            false
        ));
        assert!(!supported(
            split_version("ballot:core/policy-api@0.3.0").1,
            false
        ));
        assert!(!supported(
            split_version("ballot:core/policy-api@1.2.1").1,
            false
        ));
        assert!(!supported(split_version("ballot:core/policy-api").1, false));
        assert!(!supported(
            split_version("ballot:core/policy-api@0.2.1-rc1").1,
            false
        ));
    }

    #[test]
    fn ids_resolve_by_unique_prefix() {
        let record = |id: &str| ComponentRecord {
            id: id.into(),
            kind: Kind::Policy,
            name: "p".into(),
            version: "1".into(),
            size: 1,
            state_formats: vec![],
            wire_formats: vec![],
            self_checked: false,
            pushed_ms: 0,
        };
        let mut config = ClusterConfig::new();
        config.components = vec![record("abcdef0011"), record("abcdef0022")];
        assert_eq!(config.find("abcdef0022").unwrap().id, "abcdef0022");
        assert_eq!(config.find("abcdef002").unwrap().id, "abcdef0022");
        assert!(config
            .find("abcdef00")
            .unwrap_err()
            .contains("more than one"));
        assert!(config.find("abc").unwrap_err().contains("at least 8"));
        assert!(config.find("ffffffff").unwrap_err().contains("push it"));
    }

    #[test]
    fn the_config_record_round_trips_and_checks_its_format() {
        let config = ClusterConfig::new();
        assert_eq!(ClusterConfig::decode(&config.encode()).unwrap(), config);
        let future = br#"{"format":2}"#;
        assert!(ClusterConfig::decode(future)
            .unwrap_err()
            .contains("format 2"));
    }

    #[test]
    fn embedded_components_pass_inspection() {
        let engine = runtime::engine().unwrap();
        let (p, _) = inspect(&engine, runtime::PROTOCOL_WASM).unwrap();
        assert_eq!(p.kind, Kind::Protocol);
        let (r, _) = inspect(&engine, runtime::REGISTER_WASM).unwrap();
        assert_eq!((r.kind, r.name.as_str()), (Kind::Policy, "register"));
    }

    #[test]
    fn broken_files_are_refused_with_the_reason() {
        let engine = runtime::engine().unwrap();
        let refuse = |bytes: &[u8]| inspect(&engine, bytes).err().unwrap().0;
        assert!(refuse(b"hello world").contains("not a WebAssembly file"));
        assert!(refuse(b"\0asm\x01\0\0\0").contains("core wasm module"));
        let half = &runtime::REGISTER_WASM[..runtime::REGISTER_WASM.len() / 2];
        assert!(refuse(half).contains("does not compile"));
    }

    #[test]
    fn the_compiled_cache_round_trips() {
        let dir = std::env::temp_dir().join(format!("ballot-cache-{}", std::process::id()));
        let engine = runtime::engine().unwrap();
        let cache = Cache::new(&dir, &engine);
        let id = "register";
        cache.load(&engine, id, runtime::REGISTER_WASM).unwrap();
        assert!(cache.path(id).exists());
        // From the cache this time: garbage bytes are never compiled.
        cache.load(&engine, id, b"not used").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
