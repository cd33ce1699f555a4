//! `ballot serve`: one replica process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

use ballot_client::views::{self, Link};

use crate::api::{self, App, AppState, ClusterView, ComponentView, ReplicaView};
use crate::membership::{self, Member, MembersRecord, Membership, Role};
use crate::metrics::Metrics;
use crate::node::{self, Protocol, ProtocolFactory, INBOUND_QUEUE};
use crate::registry::{component_view, wasm_factory, Registry};
use crate::runtime::{Policies, Runtime};
use crate::storage::{PeerIdentity, Storage, MAP_SIZE_DEFAULT};
use crate::tls::{ApiTls, Identity, TlsFiles};
use crate::transport::{Hooks, Transport, ADMIT_QUESTION};

/// Newer-epoch reports from peers the membership has not looked at yet;
/// more are dropped (see `Hooks::ahead`).
const AHEAD_REPORTS: usize = 64;

/// Which build of the protocol a replica runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CoreKind {
    /// The embedded protocol and policy components, in wasmtime.
    #[default]
    Wasm,
    /// The same logic compiled into the daemon (for comparisons).
    Native,
}

/// Another replica of the cluster.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Peer {
    pub id: u32,
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Its client URL, if known (shown by `ballot cluster status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
}

/// A route to a peer (`[[peer_routes]]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerRoute {
    pub id: u32,
    /// The address to dial it at.
    pub addr: SocketAddr,
}

/// A replica's configuration, as in `node.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeConfig {
    pub id: u32,
    pub data_dir: PathBuf,
    /// Where replicas reach this one (QUIC, UDP).
    pub peer_addr: SocketAddr,
    /// Where clients reach this one (HTTP, TCP).
    pub http_addr: SocketAddr,
    /// Every other voter of the cluster's first configuration, or, with
    /// `join`, replicas of the running cluster to ask for its membership.
    /// Once the cluster has changed its membership, the record it agreed
    /// on replaces this list.
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// Where to dial some peers instead of the address the membership
    /// record gives them: a relay or a proxy in front of them (`ballot dev
    /// --wan` sets one per peer). Never learned from other replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_routes: Vec<PeerRoute>,
    /// This replica joins a running cluster: it votes in nothing until
    /// `ballot cluster add` has made it a learner, caught it up and
    /// promoted it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join: bool,
    /// Changelog entries kept beyond what every member has replayed (a
    /// replica further behind replays a snapshot instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changelog_keep: Option<u64>,
    pub tls: TlsFiles,
    #[serde(default)]
    pub core: CoreKind,
    /// LMDB map size in MiB (address space, not disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_size_mib: Option<usize>,
    /// Pushing components, binding policies, swapping the protocol and
    /// changing the membership need `Authorization: Bearer <token>`; with no
    /// token (or an empty one) they are refused. Reading and writing keys
    /// never needs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// Serve the client API over HTTPS with these files (`ballot cert
    /// server`), optionally verifying client certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_tls: Option<ApiTls>,
    /// Serve the client API as plain HTTP. Only when asked for: with
    /// neither this nor `api_tls` the replica refuses to start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub api_plaintext: bool,
    /// Client certificate names (`ballot cert client NAME`) that may make
    /// admin changes, as the admin token may (needs `api_tls.client_ca`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin_clients: Vec<String>,
    /// Who may read and write which keys (`[[grants]]`: a client
    /// certificate name or a token's SHA-256, a role, key prefixes). With
    /// none, any client that reaches the port reads and writes every key;
    /// with any, every key request needs a granted credential.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<crate::api::Grant>,
    /// Client connections open at once (default 1024, at most 2^20); one
    /// accepted past it is answered 503 `overloaded` and closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_connections_max: Option<usize>,
    /// Client connections open at once from one address, an IPv6 client
    /// counted by its /64 (default 256, at most 2^20); one accepted past it
    /// is answered 503 `overloaded` and closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_connections_per_address_max: Option<usize>,
    /// Seconds a client connection may read and write nothing, with no
    /// request in flight, before it is closed (default 60; 1 to 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_idle_secs: Option<u64>,
    /// Seconds a request's head (request line and headers) may take to
    /// arrive from its first byte (default 10; 1 to 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_header_secs: Option<u64>,
    /// Seconds a request's body may take to arrive once its head has
    /// (default 60; 1 to 3600); past it the request is answered 408.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_body_secs: Option<u64>,
    /// Milliseconds a fast round waits for a fast quorum before it
    /// recovers in a classic round (default 50; 1 to 60000). Across
    /// regions, set it above the round trip to the nearest fast quorum, or
    /// every fast round times out and pays a classic round on top.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fast_timeout_ms: Option<u32>,
    /// Milliseconds a classic round or a forward to a key's leader waits
    /// before it is retried (default 200; 1 to 60000). Across regions, set
    /// it above two round trips to the farthest replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_timeout_ms: Option<u32>,
}

/// The longest round timeout a configuration may give.
const TIMEOUT_MAX_MS: u32 = 60_000;

impl NodeConfig {
    /// Reads a TOML file; relative paths in it are taken from its directory.
    pub fn load(path: &Path) -> Result<NodeConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let mut config: NodeConfig =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut paths = vec![
            &mut config.data_dir,
            &mut config.tls.ca,
            &mut config.tls.cert,
            &mut config.tls.key,
        ];
        if let Some(api) = &mut config.api_tls {
            paths.extend([&mut api.cert, &mut api.key]);
            paths.extend(api.client_ca.as_mut());
        }
        for p in paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    /// Checks what a file cannot express by its shape.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.api_tls, self.api_plaintext) {
            (None, false) => {
                return Err("the client API has no TLS configured: give it [api_tls] \
                            (certificates from `ballot cert server`), or set api_plaintext = true \
                            (--api-plaintext) to serve plain HTTP"
                    .into())
            }
            (Some(_), true) => {
                return Err("api_tls and api_plaintext are both set: choose one".into())
            }
            (Some(t), false) if t.client_ca.is_none() && !self.admin_clients.is_empty() => {
                return Err("admin_clients needs api_tls.client_ca to verify client \
                            certificates against"
                    .into())
            }
            _ => {}
        }
        if self.api_plaintext && !self.admin_clients.is_empty() {
            return Err("admin_clients needs api_tls (client certificates)".into());
        }
        self.access()?;
        let mut ids: Vec<u32> = self.peers.iter().map(|p| p.id).collect();
        if ids.contains(&self.id) {
            return Err(format!("replica {} lists itself among its peers", self.id));
        }
        ids.push(self.id);
        ids.sort_unstable();
        let n = ids.len();
        ids.dedup();
        if ids.len() != n {
            return Err("peer ids must be distinct".into());
        }
        if n > 64 {
            return Err("at most 64 voters".into());
        }
        let mut routed: Vec<u32> = self.peer_routes.iter().map(|r| r.id).collect();
        routed.sort_unstable();
        routed.dedup();
        if routed.len() != self.peer_routes.len() || routed.contains(&self.id) {
            return Err("peer_routes: one route per peer, none to this replica".into());
        }
        for (name, ms) in [
            ("fast_timeout_ms", self.fast_timeout_ms),
            ("round_timeout_ms", self.round_timeout_ms),
        ] {
            if ms.is_some_and(|ms| !(1..=TIMEOUT_MAX_MS).contains(&ms)) {
                return Err(format!("{name} must be 1 to {TIMEOUT_MAX_MS}"));
            }
        }
        Ok(())
    }

    /// Who may do what on the client API: the grants, the admin token and
    /// the admin clients, checked.
    pub fn access(&self) -> Result<crate::api::Access, String> {
        crate::api::Access::new(
            &self.grants,
            self.admin_token.as_deref(),
            &self.admin_clients,
            self.api_tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        )
    }

    /// The URL clients reach this replica by: `https://` unless it serves
    /// plain HTTP.
    pub fn client_url(&self) -> String {
        let scheme = if self.api_tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.http_addr)
    }

    /// The voters of the first configuration (a joining replica is not
    /// one of them).
    fn voters(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.peers.iter().map(|p| p.id).collect();
        if !self.join {
            v.push(self.id);
        }
        v.sort_unstable();
        v
    }

    /// The membership of epoch 1, if this replica belongs to it.
    fn bootstrap(&self) -> Option<MembersRecord> {
        if self.join {
            return None;
        }
        let mut replicas: Vec<Member> = self
            .peers
            .iter()
            .map(|p| Member {
                id: p.id,
                addr: p.addr,
                http: p.http.clone(),
                role: Role::Voter,
            })
            .collect();
        replicas.push(Member {
            id: self.id,
            addr: self.peer_addr,
            http: Some(self.client_url()),
            role: Role::Voter,
        });
        Some(MembersRecord::bootstrap(replicas))
    }
}

/// The transport's check of a peer's data directory against the one this
/// replica recorded for it (docs/design.md, section 7, "Identity").
fn directory_check(
    storage: Storage,
) -> Box<dyn Fn(u32, Option<&crate::storage::DirIdentity>) -> Result<(), String> + Send + Sync> {
    Box::new(move |peer, presented| {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let Some(presented) = presented else {
            // A build from before identities: it cannot prove it is the
            // directory this replica knows, so it is let in only while
            // none is recorded.
            return match storage.known_peer_identity(peer) {
                Ok(None) => Ok(()),
                Ok(Some(known)) => Err(format!(
                    "replica {peer} sends no data-directory identity but this replica knows \
                     it as {}: only a build that presents it may take its place",
                    hex(&known)
                )),
                Err(e) => Err(format!("checking replica {peer}'s data directory: {e}")),
            };
        };
        match storage.check_peer_identity(peer, presented) {
            Ok(PeerIdentity::Known) => Ok(()),
            Ok(PeerIdentity::First) => {
                info!(peer, directory = %hex(presented), "recorded a peer's data directory");
                Ok(())
            }
            Ok(PeerIdentity::Changed { known }) => Err(format!(
                "replica {peer} presents data directory {} but this replica knows it as {}: \
                 it lost its state and may not vote or answer. Remove it (ballot cluster \
                 remove --id {peer}), then start it on an empty directory with --join and \
                 add it back (ballot cluster add)",
                hex(presented),
                hex(&known)
            )),
            Err(e) => Err(format!("checking replica {peer}'s data directory: {e}")),
        }
    })
}

/// The client listener, shared by the answers given while this replica
/// waits to be admitted and by the API after.
type Shared = api::conn::Listener;

/// Runs `admission` while the client port answers every request 503
/// `not-admitted`.
async fn answering_not_admitted(
    listener: &Shared,
    admission: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(), String> {
    let (admitted_tx, admitted_rx) = tokio::sync::oneshot::channel::<()>();
    let waiting = axum::Router::new().fallback(|| async {
        api::ApiError::unavailable(
            "not-admitted",
            "this replica's data directory is new: it serves once every start-up peer has \
             accepted it",
        )
    });
    let listener = listener.clone();
    let meanwhile = tokio::spawn(async move {
        axum::serve(listener, waiting)
            .with_graceful_shutdown(async {
                let _ = admitted_rx.await;
            })
            .await
    });
    let admitted = admission.await;
    let _ = admitted_tx.send(());
    let _ = meanwhile.await;
    admitted
}

/// Waits until every start-up peer has taken this new data directory's
/// hello, before the protocol casts a single vote. Peers record the first
/// directory they see for a replica id; a directory created empty under an
/// id they know (a lost disk, an `rm -rf`) is refused by any peer that heard
/// from the old one, and since the old one voted only once every peer had
/// heard from it, at least one did. A peer that is down is waited for:
/// without its answer an empty directory cannot tell a new cluster from a
/// lost disk.
async fn admit(me: u32, transport: &Transport, peers: &[u32]) -> Result<(), String> {
    let mut waiting: std::collections::BTreeSet<u32> = peers.iter().copied().collect();
    let mut told: Option<std::time::Instant> = None;
    while !waiting.is_empty() {
        for peer in waiting.clone() {
            let refused = transport
                .link(peer)
                .and_then(|l| l.refused_directory.lock().expect("link lock").clone());
            if let Some(reason) = refused {
                return Err(membership::lost_directory(me, peer, &reason));
            }
            if transport.request(peer, ADMIT_QUESTION).await.is_ok() {
                waiting.remove(&peer);
            }
        }
        if waiting.is_empty() {
            break;
        }
        if told.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            told = Some(std::time::Instant::now());
            info!(
                ?waiting,
                "this data directory is new: it votes once every start-up peer has accepted it"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Runs a replica until SIGINT or SIGTERM.
pub fn serve(config: NodeConfig) -> Result<(), String> {
    config.validate()?;
    // Every line a replica logs, from any thread, names it.
    let replica = tracing::info_span!("replica", id = config.id);
    let _replica = replica.enter();
    let map_size = config
        .map_size_mib
        .map(|m| m << 20)
        .unwrap_or(MAP_SIZE_DEFAULT);
    let (storage, incarnation) =
        Storage::open(&config.data_dir, config.id, map_size).map_err(|e| e.to_string())?;
    let identity = Identity::load(&config.tls).map_err(|e| e.to_string())?;
    let mut core_config = ballot_core::Config::new(config.id, incarnation, config.voters());
    core_config.inflight_max = 16 * 1024;
    if let Some(ms) = config.fast_timeout_ms {
        core_config.fast_timeout_ms = ms;
    }
    if let Some(ms) = config.round_timeout_ms {
        core_config.round_timeout_ms = ms;
    }
    let metrics = Arc::new(Metrics::new());
    storage.on_apply({
        let metrics = metrics.clone();
        move |elapsed, records| {
            metrics.log_apply_seconds.observe(elapsed.as_secs_f64());
            metrics.log_apply_records.observe(records as f64);
        }
    });
    let failures = metrics.policy_failures.clone();
    let (initial, protocol_view, engine, runtime) = match config.core {
        CoreKind::Wasm => {
            let runtime = Arc::new(Runtime::new().map_err(|e| e.to_string())?);
            let info = runtime
                .replica(core_config.clone())
                .and_then(|mut core| core.describe())
                .map_err(|e| e.to_string())?;
            let factory = wasm_factory(runtime.clone(), core_config.clone(), failures);
            let initial = node::Initial {
                label: crate::registry::component_id(crate::runtime::PROTOCOL_WASM),
                factory,
                incarnation,
                members: None,
            };
            let engine = runtime.engine().clone();
            (initial, component_view(info), engine, Some(runtime))
        }
        CoreKind::Native => {
            // The protocol and the register compiled in; bound policies
            // still run as components.
            let engine = crate::runtime::engine().map_err(|e| e.to_string())?;
            let base = core_config.clone();
            let factory_engine = engine.clone();
            let factory: ProtocolFactory = Arc::new(move |incarnation| {
                let mut config = base.clone();
                config.incarnation = incarnation;
                let mut policies =
                    Policies::new(&factory_engine, None).map_err(|e| e.to_string())?;
                policies.count_failures(failures.clone());
                let core = ballot_core::Replica::new(config, policies)?;
                Ok(Box::new(core) as Box<dyn Protocol>)
            });
            let info = ballot_core::Replica::<Policies>::info();
            let initial = node::Initial {
                label: "native".to_string(),
                factory,
                incarnation,
                members: None,
            };
            (initial, component_view(info), engine, None)
        }
    };
    // The core starts on the epoch this replica adopted last. A removed
    // replica's record does not list it, so it votes in nothing and stops
    // answering once the membership task reads the same record.
    let mut initial = initial;
    initial.members = membership::durable_record(&storage)?.map(|r| r.members());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ballot-io")
        .build()
        .map_err(|e| format!("starting tokio: {e}"))?;
    let in_replica = replica.clone();
    rt.block_on(tracing::Instrument::instrument(
        async move {
            let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
            let peers: Vec<(u32, SocketAddr)> =
                config.peers.iter().map(|p| (p.id, p.addr)).collect();
            let routes: Vec<(u32, SocketAddr)> =
                config.peer_routes.iter().map(|r| (r.id, r.addr)).collect();
            // Every instance starts on the durable epoch (`initial.members`,
            // stamped below by node::start) and later instances on the
            // adopted one, before their first step.
            let epoch = Arc::new(AtomicU64::new(1));
            let (ahead_tx, ahead_rx) = mpsc::channel(AHEAD_REPORTS);
            let (service_tx, service_rx) = mpsc::channel(256);
            let transport = Arc::new(Transport::start(
                config.id,
                config.peer_addr,
                &peers,
                &routes,
                &identity,
                inbound_tx,
                metrics.clone(),
                epoch.clone(),
                Hooks {
                    ahead: ahead_tx,
                    ahead_seen: Default::default(),
                    service: service_tx,
                    directory: storage.identity(),
                    check_directory: directory_check(storage.clone()),
                },
            )?);
            // The client port is taken at once, so nothing else takes it
            // while this replica waits to be admitted.
            let api_tls = match &config.api_tls {
                Some(files) => Some(Arc::new(files.server_config().map_err(|e| e.to_string())?)),
                None => {
                    if !config.http_addr.ip().is_loopback() {
                        warn!(
                            http = %config.http_addr,
                            "the client API serves plain HTTP beyond loopback (api_plaintext): \
                             values and the admin token cross the network in clear text"
                        );
                    }
                    None
                }
            };
            let listener = Shared::new(
                tokio::net::TcpListener::bind(config.http_addr)
                    .await
                    .map_err(|e| format!("binding the client address {}: {e}", config.http_addr))?,
                (
                    config
                        .http_connections_max
                        .unwrap_or(api::conn::CONNECTIONS_MAX),
                    config
                        .http_connections_per_address_max
                        .unwrap_or(api::conn::PER_ADDRESS_MAX),
                ),
                (
                    config
                        .http_idle_secs
                        .map_or(api::conn::IDLE, |s| Duration::from_secs(s.min(86_400))),
                    config
                        .http_header_secs
                        .map_or(api::conn::HEAD, |s| Duration::from_secs(s.min(3_600))),
                ),
                api_tls,
            );
            // A joining directory is admitted by the first record it
            // adopts: one that lists it as a learner (membership::adopt).
            if !config.join && !storage.admitted().map_err(|e| e.to_string())? {
                let peers: Vec<u32> = config.peers.iter().map(|p| p.id).collect();
                answering_not_admitted(&listener, admit(config.id, &transport, &peers)).await?;
                storage.set_admitted().map_err(|e| e.to_string())?;
                info!("every start-up peer accepted this data directory; it votes from now on");
            }
            let (watchers, commits_rx, members_rx) = node::Watchers::new();
            let events = Arc::new(node::Events::default());
            let running = crate::registry::Running {
                label: initial.label.clone(),
                view: protocol_view.clone(),
                incarnation,
                since_ms: crate::system::now_ms(),
            };
            let core = node::start(
                initial,
                storage.clone(),
                inbound_rx,
                transport.clone(),
                metrics.clone(),
                watchers,
                events.clone(),
                epoch,
            )?;
            let watch_storage = storage.clone();
            let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let membership = Membership::new(membership::Setup {
                me: config.id,
                storage,
                requests: core.requests.clone(),
                control: core.control.clone(),
                transport: transport.clone(),
                health: core.health.clone(),
                bootstrap: config.bootstrap(),
                changelog_keep: config
                    .changelog_keep
                    .unwrap_or(membership::CHANGELOG_KEEP_DEFAULT),
            });
            tokio::spawn(membership.clone().run(members_rx, ahead_rx, service_rx));
            let members: crate::registry::Members = {
                let membership = membership.clone();
                let start_up = core_config.voters.clone();
                Box::new(move || {
                    membership.record().map_or_else(
                        || start_up.clone(),
                        |r| r.replicas.iter().map(|m| m.id).collect(),
                    )
                })
            };
            let registry = Arc::new(Registry::new(crate::registry::Setup {
                engine,
                data_dir: config.data_dir.clone(),
                requests: core.requests.clone(),
                control: core.control.clone(),
                runtime,
                core_config,
                running,
                metrics: metrics.clone(),
                members,
            }));
            tokio::spawn(registry.clone().run(commits_rx, events));
            let leases = Arc::new(crate::leases::Leases::new(
                core.requests.clone(),
                watch_storage.clone(),
                metrics.clone(),
                {
                    let registry = registry.clone();
                    Box::new(move |key| {
                        registry
                            .started()
                            .then(|| registry.binding_for(key).is_none())
                    })
                },
            ));
            let view = {
                let config = config.clone();
                let transport = transport.clone();
                let health = core.health.clone();
                let registry = registry.clone();
                let membership = membership.clone();
                let core_kind = match config.core {
                    CoreKind::Wasm => "wasm",
                    CoreKind::Native => "native",
                };
                move || {
                    let running = registry.running();
                    cluster_view(
                        &config,
                        membership.record(),
                        running.incarnation,
                        core_kind,
                        &running.view,
                        &transport,
                        health.fatal(),
                    )
                }
            };
            let app = App::new(AppState {
                requests: core.requests.clone(),
                request_bytes: core.request_bytes.clone(),
                health: core.health.clone(),
                metrics,
                cluster: Arc::new(view),
                registry,
                membership,
                // An empty token is no token: the admin plane stays closed.
                access: Arc::new(config.access()?),
                body_deadline: config
                    .http_body_secs
                    .map_or(api::BODY_DEADLINE, Duration::from_secs),
                storage: watch_storage,
                watchers: Arc::new(tokio::sync::Semaphore::new(api::watch::WATCHERS_MAX)),
                heartbeat: config
                    .http_idle_secs
                    .map_or(api::conn::IDLE, Duration::from_secs)
                    .clamp(api::conn::IDLE_RANGE.0, api::conn::IDLE_RANGE.1)
                    .div_f64(2.0)
                    .min(Duration::from_secs(5)),
                closing: closing.clone(),
                leases: leases.clone(),
                leaders: core.leaders.clone(),
            });
            tokio::spawn(leases.run(closing.clone()));
            if !app.access.has_admin() {
                warn!("no admin credential configured: every change to components, policies, the protocol and the membership is refused");
            }
            info!(
                id = config.id,
                incarnation,
                peer = %config.peer_addr,
                http = %config.http_addr,
                "replica serving"
            );
            let app = api::router(app)
                .layer(axum::middleware::from_fn(api::conn::track))
                .into_make_service_with_connect_info::<api::conn::Activity>();
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    shutdown().await;
                    closing.store(true, std::sync::atomic::Ordering::Relaxed);
                })
                .await
                .map_err(|e| format!("serving HTTP: {e}"))?;
            info!("shutting down");
            // The decisions the protocol holds in memory are written
            // before the peers are told goodbye (design section 2, "Held
            // decisions").
            core.stop().await;
            transport.close();
            Ok(())
        },
        in_replica,
    ))
}

fn cluster_view(
    config: &NodeConfig,
    record: Option<MembersRecord>,
    incarnation: u64,
    core: &str,
    protocol: &ComponentView,
    transport: &Transport,
    fatal: Option<String>,
) -> ClusterView {
    let role = |id: u32| {
        record.as_ref().and_then(|r| r.role(id)).map(|r| match r {
            Role::Voter => views::Role::Voter,
            Role::Learner => views::Role::Learner,
        })
    };
    let mut replicas = vec![ReplicaView {
        id: config.id,
        peer: config.peer_addr.to_string(),
        http: Some(config.client_url()),
        link: Link::Local,
        last_error: None,
        role: role(config.id),
    }];
    let others: Vec<(u32, SocketAddr, Option<String>)> = match &record {
        Some(r) => r
            .replicas
            .iter()
            .filter(|m| m.id != config.id)
            .map(|m| (m.id, m.addr, m.http.clone()))
            .collect(),
        None => config
            .peers
            .iter()
            .map(|p| (p.id, p.addr, p.http.clone()))
            .collect(),
    };
    for (id, addr, http) in others {
        let link = transport.link(id);
        let up = link.as_ref().is_some_and(|l| l.up.load(Ordering::Relaxed));
        let last_error = if up {
            None
        } else {
            link.and_then(|l| l.last_error.lock().expect("link lock").clone())
        };
        replicas.push(ReplicaView {
            id,
            peer: addr.to_string(),
            http,
            link: if up { Link::Up } else { Link::Down },
            last_error,
            role: role(id),
        });
    }
    replicas.sort_by_key(|r| r.id);
    ClusterView {
        id: config.id,
        incarnation,
        healthy: fatal.is_none(),
        error: fatal,
        core: core.into(),
        protocol: protocol.clone(),
        policy: ComponentView {
            name: ballot_core::register::NAME.into(),
            version: ballot_core::register::VERSION.into(),
            state_formats: Vec::new(),
            wire_formats: Vec::new(),
        },
        // The epoch the protocol votes in, not the record the membership
        // task read last: the two differ for a moment after each change.
        epoch: transport.epoch(),
        replicas,
    }
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> NodeConfig {
        let text = format!(
            "id = 1\ndata_dir = \"d\"\npeer_addr = \"127.0.0.1:7001\"\n\
             http_addr = \"127.0.0.1:8001\"\n{extra}\n\
             [tls]\nca = \"ca.pem\"\ncert = \"n.pem\"\nkey = \"k.pem\"\n"
        );
        toml::from_str(&text).unwrap()
    }

    /// The client API is HTTPS unless plain HTTP is asked for by name.
    #[test]
    fn a_replica_without_api_tls_or_api_plaintext_does_not_start() {
        let e = config("").validate().unwrap_err();
        assert!(e.contains("api_plaintext = true"), "{e}");
        config("api_plaintext = true").validate().unwrap();
        let tls = "[api_tls]\ncert = \"a.pem\"\nkey = \"a-key.pem\"";
        let both = config(&format!("api_plaintext = true\n{tls}"));
        assert!(both.validate().unwrap_err().contains("both"));
        config(tls).validate().unwrap();
        let listed = config(&format!("admin_clients = [\"ops\"]\n{tls}"));
        assert!(listed.validate().unwrap_err().contains("client_ca"));
        let verified = config(&format!(
            "admin_clients = [\"ops\"]\n{tls}\nclient_ca = \"ca.pem\""
        ));
        verified.validate().unwrap();
    }

    /// Routes and timeouts out of their bounds are refused at start.
    #[test]
    fn routes_and_timeouts_are_checked() {
        let route = |id: u32| format!("[[peer_routes]]\nid = {id}\naddr = \"127.0.0.1:9{id}00\"\n");
        let with = |extra: String| {
            config(&format!(
                "api_plaintext = true\nfast_timeout_ms = 100\n{extra}"
            ))
        };
        with(route(2) + &route(3)).validate().unwrap();
        for bad in [route(2) + &route(2), route(1)] {
            let e = with(bad).validate().unwrap_err();
            assert!(e.contains("peer_routes"), "{e}");
        }
        let e = config("api_plaintext = true\nround_timeout_ms = 0")
            .validate()
            .unwrap_err();
        assert!(e.contains("round_timeout_ms must be 1 to 60000"), "{e}");
    }
}
