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
//!
//! Here: the [`Registry`] a replica runs and its loop over configuration
//! commits. `config` holds the configuration record's types, `inspect` the
//! checks and the compiled cache, `store` what clients change (push, bind,
//! unbind) and how stored components are fetched, `activation` protocol
//! swaps, readiness and rollback.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ballot_core::register::Command;
use ballot_core::{Consistency, Current, Operation, Outcome};
use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};
use wasmtime::component::Component;
use wasmtime::Engine;

use crate::metrics::Metrics;
use crate::node::{self, ClientRequest, ConfigCommit, Control, Mailbox};
use crate::runtime;
use crate::system_record;
use ballot_client::views::ComponentView;

mod activation;
mod config;
mod inspect;
mod store;

pub use crate::runtime::CONTRACT;
pub use crate::system::{now_ms, CONFIG_KEY, SYSTEM_PREFIX};
pub use ballot_control::activation::Swap;
pub use config::*;
pub use inspect::*;

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
    pub control: Arc<Mailbox>,
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

/// Protocol bookkeeping of one replica.
#[derive(Default)]
struct ProtocolState {
    /// What this replica does about each configuration it applies: its
    /// readiness answers, what it swaps to, what it fell back from.
    follower: ballot_control::activation::Follower,
    /// Traps since the last swap.
    traps: ballot_control::activation::TrapWatch,
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
    control: Arc<Mailbox>,
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
    RegistryError::Unavailable(system_record::failure(outcome))
}

impl From<system_record::Unavailable> for RegistryError {
    fn from(e: system_record::Unavailable) -> RegistryError {
        RegistryError::Unavailable(e.0)
    }
}

impl Registry {
    pub fn new(setup: Setup) -> Registry {
        let embedded_id = component_id(runtime::PROTOCOL_WASM);
        let mut state = ProtocolState::default();
        state
            .views
            .insert(setup.running.label.clone(), setup.running.view.clone());
        state.follower = ballot_control::activation::Follower::new(&setup.running.label);
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
        .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
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
        .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        Ok(c.outcome)
    }

    /// Keeps the policy bindings in step with the configuration: on every
    /// commit this replica makes durable, and by a linearizable read every
    /// [`POLL_INTERVAL`].
    pub async fn run(
        self: Arc<Self>,
        mut commits: watch::Receiver<ConfigCommit>,
        events: Arc<node::Events>,
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
                c = commits.changed() => match c {
                    Ok(()) => {
                        let (version, value) = commits.borrow_and_update().clone();
                        self.consider(version, value).await;
                        self.clone().prewarm();
                    }
                    Err(_) => return,
                },
                e = events.next() => self.on_core_event(e).await,
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
                    self.control.send(Control::Rebind(bound));
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
