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

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ballot_core::register::Command;
use ballot_core::{Consistency, Current, Operation, Outcome};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};
use wasmtime::component::Component;
use wasmtime::{Engine, Store};

use crate::node::{self, ClientRequest, ConfigCommit, Control};
use crate::runtime::{self, Bound, Error, PolicyInstance};

/// Prefix of every key the cluster keeps for itself.
pub const SYSTEM_PREFIX: &[u8] = b"\0ballot/";
/// The component configuration record.
pub const CONFIG_KEY: &[u8] = b"\0ballot/config";
/// Format of the configuration record.
pub const CONFIG_FORMAT: u32 = 1;
/// Largest component accepted.
pub const COMPONENT_MAX: usize = 8 << 20;
/// The contract version this host implements.
pub const CONTRACT: (u64, u64, u64) = (0, 2, 1);

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

/// The value of [`CONFIG_KEY`]: JSON, with a format number.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub format: u32,
    #[serde(default)]
    pub components: Vec<ComponentRecord>,
    #[serde(default)]
    pub bindings: Vec<Binding>,
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
        Kind::Protocol => run_protocol(bytes)?,
    };
    Ok((inspected, component))
}

/// Calls a `self-check.run` export if there is one.
pub(crate) fn self_check<T>(
    store: &mut Store<T>,
    instance: &wasmtime::component::Instance,
) -> Result<bool, Error> {
    let (major, minor, patch) = CONTRACT;
    let name = format!("ballot:core/self-check@{major}.{minor}.{patch}");
    let Some(iface) = instance.get_export_index(&mut *store, None, &name) else {
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
            runtime::trap_reason(&e)
        ))),
    }
}

fn run_policy(engine: &Engine, component: &Component) -> Result<Inspected, Error> {
    let (mut store, instance) = runtime::sandbox_policy(engine, component)?;
    let (name, version) = runtime::describe_policy(&mut store, &instance)
        .map_err(|e| Error(format!("its describe failed: {e}")))?;
    let self_checked = self_check(&mut store, &instance)?;
    Ok(Inspected {
        kind: Kind::Policy,
        name,
        version,
        state_formats: Vec::new(),
        wire_formats: Vec::new(),
        self_checked,
    })
}

fn run_protocol(bytes: &[u8]) -> Result<Inspected, Error> {
    let rt = runtime::Runtime::with_components(bytes, runtime::REGISTER_WASM)?;
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

/// A replica's view of the stored components, and the task that keeps its
/// policy bindings in step with the configuration record.
pub struct Registry {
    engine: Engine,
    cache: Cache,
    requests: mpsc::Sender<ClientRequest>,
    control: mpsc::UnboundedSender<Control>,
    applied: RwLock<Applied>,
    changed: Notify,
    compiled: Mutex<HashMap<String, Component>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn unavailable(outcome: &Outcome) -> RegistryError {
    match outcome {
        Outcome::Failed(f) => RegistryError::Unavailable(f.message.clone()),
        Outcome::Rejected(r, _) => RegistryError::Unavailable(format!("{}: {}", r.code, r.message)),
        Outcome::Done(_) => RegistryError::Unavailable("unexpected success".into()),
    }
}

impl Registry {
    pub fn new(
        engine: Engine,
        data_dir: &Path,
        requests: mpsc::Sender<ClientRequest>,
        control: mpsc::UnboundedSender<Control>,
    ) -> Registry {
        Registry {
            cache: Cache::new(data_dir, &engine),
            engine,
            requests,
            control,
            applied: RwLock::new(Applied::default()),
            changed: Notify::new(),
            compiled: Mutex::new(HashMap::new()),
        }
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
    pub async fn run(self: Arc<Self>, mut commits: mpsc::UnboundedReceiver<ConfigCommit>) {
        if let Ok(current) = self.read(CONFIG_KEY.to_vec(), Consistency::Local).await {
            self.consider(current.version, current.value).await;
        }
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        loop {
            tokio::select! {
                c = commits.recv() => match c {
                    Some((version, value)) => self.consider(version, value).await,
                    None => return,
                },
                _ = poll.tick() => {
                    match self.read(CONFIG_KEY.to_vec(), Consistency::Linearizable).await {
                        Ok(current) => self.consider(current.version, current.value).await,
                        Err(e) => debug!("configuration poll: {e}"),
                    }
                }
            }
        }
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
                    config,
                    error: None,
                };
                info!(version, bindings, "component configuration applied");
            }
            Err(e) => {
                warn!(version, "component configuration not applied yet: {e}");
                applied.error = Some(format!("version {version}: {e}"));
            }
        }
        drop(applied);
        self.changed.notify_waiters();
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
        let fresh = record.clone();
        let (_, config) = self
            .update(|config| {
                if config.components.iter().any(|c| c.id == fresh.id) {
                    return Ok(false);
                }
                config.components.push(fresh.clone());
                Ok(true)
            })
            .await?;
        let stored = config
            .components
            .iter()
            .find(|c| c.id == id)
            .cloned()
            .unwrap_or(record.clone());
        Ok((stored.clone(), stored.pushed_ms == record.pushed_ms))
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
