//! Local clusters of real replica processes on loopback: `ballot dev`, and
//! the multi-process tests.
//!
//! A cluster directory holds everything: `certs/` (the CA, one certificate
//! per replica, the client API's certificate `api.pem` and a client
//! certificate `client-dev.pem`), `node-N.toml`, `node-N/` (LMDB), `node-N.log`
//! `admin-token` (the replicas' admin token, readable by the owner only)
//! and, while `ballot dev` runs, `cluster.json`. Running `ballot dev` again
//! on the same directory restarts the same replicas on their data.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{Client, Tls};
use crate::server::{CoreKind, NodeConfig, Peer};
use crate::tls::{self, ApiTls, TlsFiles};

/// One replica of a local cluster.
pub struct DevNode {
    pub id: u32,
    pub config_path: PathBuf,
    pub config: NodeConfig,
    child: Option<Child>,
    /// How the process ended, if it ended on its own (not stopped).
    pub exit: Option<String>,
}

impl DevNode {
    /// The replica's client URL.
    pub fn http(&self) -> String {
        self.config.client_url()
    }
    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
    /// A client of this replica, trusting the cluster CA, with the
    /// cluster's admin token.
    pub fn client(&self) -> Client {
        Client::with_tls(&self.http(), &self.tls()).with_token(self.config.admin_token.clone())
    }

    /// What a client of this cluster trusts: its CA.
    pub fn tls(&self) -> Tls {
        Tls::from_files(&self.config.tls.ca, None).unwrap_or_else(|e| panic!("the cluster CA: {e}"))
    }
}

/// The client name of the certificate `ballot dev` issues for local use,
/// listed in every replica's `admin_clients`.
pub const DEV_CLIENT: &str = "dev";

/// Makes the process `command` starts get SIGTERM when the thread that
/// started it exits, so a local cluster (or a bench's etcd) dies with the
/// process that runs it, however that one ends.
pub fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to send
    // SIGTERM to the child when its parent thread exits.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

/// Issues the API's server certificate and the dev client certificate in
/// `certs` (beside the CA) if they are missing.
fn api_certificates(certs: &Path) -> Result<(), String> {
    if !tls::api_cert_path(certs).exists() {
        tls::issue_api_server(certs, &[]).map_err(|e| e.to_string())?;
    }
    if !tls::client_cert_path(certs, DEV_CLIENT).exists() {
        tls::issue_client(certs, DEV_CLIENT).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The client API's TLS files of a dev replica: the shared API
/// certificate, client certificates checked against the cluster CA.
fn api_tls(certs: &Path) -> ApiTls {
    ApiTls {
        cert: tls::api_cert_path(certs),
        key: tls::api_key_path(certs),
        client_ca: Some(tls::ca_cert_path(certs)),
    }
}

/// A local cluster: its directory and its replica processes.
pub struct DevCluster {
    pub dir: PathBuf,
    pub nodes: Vec<DevNode>,
    binary: PathBuf,
}

#[derive(Serialize)]
struct Manifest<'a> {
    nodes: Vec<ManifestNode<'a>>,
}

#[derive(Serialize)]
struct ManifestNode<'a> {
    id: u32,
    http: String,
    peer: String,
    pid: Option<u32>,
    /// `running`, `stopped` (asked to) or `exited` (it died).
    state: &'static str,
    /// How it exited, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    exit: Option<&'a str>,
    log: &'a Path,
}

/// A port free now on 127.0.0.1 for TCP (`udp`: false) or UDP, chosen
/// below the range the kernel hands out as the source ports of outgoing
/// connections and of sockets bound to port 0: a port probed there and
/// bound by the replica a moment later could be taken in between by any
/// process's connection ("Address already in use"). Falls back to asking
/// the kernel when that range starts too low to leave room below it.
fn free_port(udp: bool) -> Result<u16, String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u16 = 10_000;
    // Ports handed out in this process, so two clusters started at once
    // never get the same one; processes start at different points.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let probe = |port: u16| {
        if udp {
            UdpSocket::bind(("127.0.0.1", port)).map(|s| s.local_addr())
        } else {
            TcpListener::bind(("127.0.0.1", port)).map(|l| l.local_addr())
        }
        .and_then(|a| a)
        .map(|a| a.port())
    };
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if low < FIRST + 1_000 {
        return probe(0).map_err(|e| format!("finding a free port: {e}"));
    }
    let span = u32::from(low - FIRST);
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + ((start + n) % span) as u16;
        if let Ok(port) = probe(port) {
            return Ok(port);
        }
    }
    Err(format!("no free port between {FIRST} and {low}"))
}

fn free_tcp() -> Result<u16, String> {
    free_port(false)
}

fn free_udp() -> Result<u16, String> {
    free_port(true)
}

/// The file in a cluster directory that holds the replicas' admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// The admin token of the cluster in `dir`: read from `dir/admin-token`,
/// or made (32 random bytes, hex) and written there, readable by its owner
/// only, if the file does not exist yet.
pub fn admin_token(dir: &Path) -> Result<String, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_string()),
        Ok(_) => return Err(format!("{} is empty", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    }
    let bytes = crate::storage::random_bytes::<32>().map_err(|e| e.to_string())?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    writeln!(file, "{token}")
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(token)
}

/// Writes a file that holds a secret (a configuration with the admin
/// token), readable and writable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let fail = |e: std::io::Error| format!("writing {}: {e}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    // An existing file keeps its mode on open: narrow it.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(fail)?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(fail)
}

/// The configuration of a new replica `id` of the cluster in `dir`, with a
/// certificate issued if it has none yet, and no peers.
fn new_node(
    dir: &Path,
    id: u32,
    peer_addr: SocketAddr,
    http_addr: SocketAddr,
    core: CoreKind,
) -> Result<NodeConfig, String> {
    let certs = dir.join("certs");
    if !tls::node_cert_path(&certs, id).exists() {
        tls::issue_node(&certs, id).map_err(|e| e.to_string())?;
    }
    Ok(NodeConfig {
        id,
        data_dir: dir.join(format!("node-{id}")),
        peer_addr,
        http_addr,
        peers: Vec::new(),
        tls: TlsFiles {
            ca: tls::ca_cert_path(&certs),
            cert: tls::node_cert_path(&certs, id),
            key: tls::node_key_path(&certs, id),
        },
        core,
        map_size_mib: Some(4096),
        admin_token: Some(admin_token(dir)?),
        api_tls: Some(api_tls(&certs)),
        api_plaintext: false,
        admin_clients: vec![DEV_CLIENT.to_string()],
        grants: Vec::new(),
        http_connections_max: None,
        http_connections_per_address_max: None,
        http_idle_secs: None,
        http_header_secs: None,
        http_body_secs: None,
        peer_routes: Vec::new(),
        fast_timeout_ms: None,
        round_timeout_ms: None,
        join: false,
        changelog_keep: None,
    })
}

impl DevCluster {
    /// Creates (or reopens) a cluster of `n` replicas in `dir`, run by
    /// `binary` (`ballot` itself). Ports: `peer_port + i` and `http_port + i`
    /// for replica `i + 1`, or free ones when the base is 0. An existing
    /// directory keeps its certificates, configurations and data.
    pub fn prepare(
        dir: &Path,
        n: u32,
        peer_port: u16,
        http_port: u16,
        core: CoreKind,
        binary: PathBuf,
    ) -> Result<DevCluster, String> {
        if n == 0 || n > 64 {
            return Err("a cluster has 1 to 64 replicas".into());
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let certs = dir.join("certs");
        if !tls::ca_cert_path(&certs).exists() {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "dev".into());
            tls::init_ca(&certs, &name).map_err(|e| e.to_string())?;
        }
        api_certificates(&certs)?;
        let mut configs = Vec::new();
        for id in 1..=n {
            let path = dir.join(format!("node-{id}.toml"));
            if path.exists() {
                let mut c = NodeConfig::load(&path)?;
                c.core = core;
                // Timeouts are fitted to a topology afresh by each run that
                // has one (`fit_timeouts`); others run on the defaults.
                c.fast_timeout_ms = None;
                c.round_timeout_ms = None;
                // And routes through relays, by `route_peers`.
                c.peer_routes.clear();
                // A cluster made before replicas required a token gets one.
                if c.admin_token.is_none() {
                    c.admin_token = Some(admin_token(&dir)?);
                }
                // And one from before the API served HTTPS, TLS.
                if c.api_tls.is_none() && !c.api_plaintext {
                    c.api_tls = Some(api_tls(&certs));
                    c.admin_clients = vec![DEV_CLIENT.to_string()];
                }
                configs.push((path, c));
                continue;
            }
            let port = |base: u16, free: fn() -> Result<u16, String>| -> Result<u16, String> {
                if base == 0 {
                    free()
                } else {
                    base.checked_add(id as u16 - 1)
                        .ok_or_else(|| "port out of range".to_string())
                }
            };
            let peer_addr: SocketAddr = ([127, 0, 0, 1], port(peer_port, free_udp)?).into();
            let http_addr: SocketAddr = ([127, 0, 0, 1], port(http_port, free_tcp)?).into();
            let config = new_node(&dir, id, peer_addr, http_addr, core)?;
            configs.push((path, config));
        }
        let all: Vec<Peer> = configs
            .iter()
            .map(|(_, c)| Peer {
                id: c.id,
                addr: c.peer_addr,
                http: Some(c.client_url()),
            })
            .collect();
        let mut nodes = Vec::new();
        for (path, mut config) in configs {
            // A replica that joined later keeps the peers it joined through.
            if !config.join {
                config.peers = all.iter().filter(|p| p.id != config.id).cloned().collect();
            }
            let text = toml::to_string_pretty(&config).map_err(|e| e.to_string())?;
            write_private(&path, &text)?;
            nodes.push(DevNode {
                id: config.id,
                config_path: path,
                config,
                child: None,
                exit: None,
            });
        }
        Ok(DevCluster { dir, nodes, binary })
    }

    /// Every replica's id and real peer address (what a link emulator
    /// stands in front of).
    pub fn peer_addrs(&self) -> Vec<(u32, SocketAddr)> {
        self.nodes
            .iter()
            .map(|n| (n.id, n.config.peer_addr))
            .collect()
    }

    /// Has every replica dial each peer at `front(peer id)` instead of the
    /// peer's own address (`peer_routes`): the link emulator's relays
    /// (`crate::wan`). Call it before the replicas start; `prepare` removes
    /// the routes.
    pub fn route_peers(&mut self, front: impl Fn(u32) -> SocketAddr) -> Result<(), String> {
        self.edit_configs(|config| {
            config.peer_routes = config
                .peers
                .iter()
                .map(|p| crate::server::PeerRoute {
                    id: p.id,
                    addr: front(p.id),
                })
                .collect();
        })
    }

    /// Changes every replica's configuration file (before they start).
    pub fn edit_configs(&mut self, mut edit: impl FnMut(&mut NodeConfig)) -> Result<(), String> {
        for node in &mut self.nodes {
            edit(&mut node.config);
            let text = toml::to_string_pretty(&node.config).map_err(|e| e.to_string())?;
            write_private(&node.config_path, &text)?;
        }
        Ok(())
    }

    /// Sets every replica's round timeouts to fit a geo topology
    /// ([`crate::wan::Topology::timeouts`]); `prepare` puts the defaults
    /// back.
    pub fn fit_timeouts(&mut self, topology: &crate::wan::Topology) -> Result<(), String> {
        let (fast, round) = topology.timeouts();
        self.edit_configs(|config| {
            config.fast_timeout_ms = Some(fast);
            config.round_timeout_ms = Some(round);
        })
    }

    /// Prepares replica `id` to join this running cluster (`join = true`,
    /// its peers the replicas there are now), on free ports, without
    /// starting it. `ballot cluster add` then admits it.
    pub fn add_joiner(&mut self, id: u32) -> Result<&DevNode, String> {
        if self.nodes.iter().any(|n| n.id == id) {
            return Err(format!("replica {id} exists already"));
        }
        let core = self
            .nodes
            .first()
            .map(|n| n.config.core)
            .unwrap_or_default();
        let peer_addr = ([127, 0, 0, 1], free_udp()?).into();
        let http_addr = ([127, 0, 0, 1], free_tcp()?).into();
        let mut config = new_node(&self.dir, id, peer_addr, http_addr, core)?;
        config.join = true;
        config.peers = self
            .nodes
            .iter()
            .map(|n| Peer {
                id: n.id,
                addr: n.config.peer_addr,
                http: Some(n.http()),
            })
            .collect();
        let path = self.dir.join(format!("node-{id}.toml"));
        let text = toml::to_string_pretty(&config).map_err(|e| e.to_string())?;
        write_private(&path, &text)?;
        self.nodes.push(DevNode {
            id,
            config_path: path,
            config,
            child: None,
            exit: None,
        });
        Ok(self.nodes.last().expect("just pushed"))
    }

    /// Whether the cluster has a replica `id`.
    pub fn contains(&self, id: u32) -> bool {
        self.nodes.iter().any(|n| n.id == id)
    }

    /// Whether replica `id`'s process runs (as far as this one knows).
    pub fn running(&self, id: u32) -> bool {
        self.nodes.iter().any(|n| n.id == id && n.child.is_some())
    }

    fn node(&mut self, id: u32) -> &mut DevNode {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no replica {id}"))
    }

    /// The log file of replica `id`.
    pub fn log_path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("node-{id}.log"))
    }

    /// Starts replica `id` (`ballot serve --config node-N.toml`), logging to
    /// `node-N.log`. The process is killed if this one dies.
    pub fn start(&mut self, id: u32) -> Result<(), String> {
        let log_path = self.log_path(id);
        let binary = self.binary.clone();
        let node = self.node(id);
        if node.child.is_some() {
            return Err(format!("replica {id} is already running"));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let mut command = Command::new(&binary);
        command
            .arg("serve")
            .arg("--config")
            .arg(&node.config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        // The replica's configuration file says it all: variables meant for
        // another cluster (a production admin token, say) must not override it.
        for var in [
            "BALLOT_CONFIG",
            "BALLOT_ID",
            "BALLOT_DATA_DIR",
            "BALLOT_PEER_ADDR",
            "BALLOT_HTTP_ADDR",
            "BALLOT_PEERS",
            "BALLOT_TLS_CA",
            "BALLOT_TLS_CERT",
            "BALLOT_TLS_KEY",
            "BALLOT_CORE",
            "BALLOT_ADMIN_TOKEN",
        ] {
            command.env_remove(var);
        }
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        node.child = Some(child);
        node.exit = None;
        Ok(())
    }

    /// Starts every replica that is not running.
    pub fn start_all(&mut self) -> Result<(), String> {
        let ids: Vec<u32> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_none())
            .map(|n| n.id)
            .collect();
        for id in ids {
            self.start(id)?;
        }
        Ok(())
    }

    /// Kills replica `id` with SIGKILL (a crash).
    pub fn kill(&mut self, id: u32) {
        if let Some(mut child) = self.node(id).child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops replica `id` with SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, id: u32, grace: Duration) {
        let Some(mut child) = self.node(id).child.take() else {
            return;
        };
        // SAFETY: sending a signal to a child we own and have not reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops every replica.
    pub fn stop_all(&mut self) {
        let ids: Vec<u32> = self.nodes.iter().map(|n| n.id).collect();
        for id in &ids {
            if let Some(child) = &self.node(*id).child {
                // SAFETY: as in `stop`.
                unsafe {
                    libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
                }
            }
        }
        for id in ids {
            self.stop(id, Duration::from_secs(5));
        }
    }

    /// The id of a replica whose process has exited, with its status.
    pub fn exited(&mut self) -> Option<(u32, String)> {
        for node in &mut self.nodes {
            if let Some(child) = &mut node.child {
                if let Ok(Some(status)) = child.try_wait() {
                    node.child = None;
                    node.exit = Some(status.to_string());
                    return Some((node.id, status.to_string()));
                }
            }
        }
        None
    }

    /// Waits until replica `id` serves clients (`/readyz`).
    pub async fn wait_ready(&mut self, id: u32, timeout: Duration) -> Result<(), String> {
        self.wait_for(id, timeout, true).await
    }

    /// Waits until replica `id`'s process answers `/healthz`, serving or
    /// not (for a replica that cannot reach a quorum).
    pub async fn wait_alive(&mut self, id: u32, timeout: Duration) -> Result<(), String> {
        self.wait_for(id, timeout, false).await
    }

    async fn wait_for(&mut self, id: u32, timeout: Duration, ready: bool) -> Result<(), String> {
        let client = self.node(id).client();
        let deadline = Instant::now() + timeout;
        loop {
            let ok = if ready {
                client.ready().await
            } else {
                client.healthy().await
            };
            if ok {
                return Ok(());
            }
            if let Some((exited, status)) = self.exited() {
                return Err(format!(
                    "replica {exited} exited ({status}); see {}",
                    self.log_path(exited).display()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "replica {id} did not become ready in {timeout:?}; see {}",
                    self.log_path(id).display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for every replica.
    pub async fn wait_all_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let ids: Vec<u32> = self.nodes.iter().map(|n| n.id).collect();
        for id in ids {
            self.wait_ready(id, timeout).await?;
        }
        Ok(())
    }

    /// Writes `cluster.json`: every replica's id, URLs, pid and log.
    pub fn write_manifest(&self) -> Result<PathBuf, String> {
        let logs: Vec<PathBuf> = self.nodes.iter().map(|n| self.log_path(n.id)).collect();
        let manifest = Manifest {
            nodes: self
                .nodes
                .iter()
                .zip(&logs)
                .map(|(n, log)| ManifestNode {
                    id: n.id,
                    http: n.http(),
                    peer: n.config.peer_addr.to_string(),
                    pid: n.pid(),
                    state: match (&n.child, &n.exit) {
                        (Some(_), _) => "running",
                        (None, Some(_)) => "exited",
                        (None, None) => "stopped",
                    },
                    exit: n.exit.as_deref(),
                    log,
                })
                .collect(),
        };
        let path = self.dir.join("cluster.json");
        let text = serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())?;
        // Written aside and renamed over the old one: a script reading it
        // while a replica's state changes never sees half a file.
        let partial = self.dir.join("cluster.json.partial");
        std::fs::write(&partial, text + "\n")
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(path)
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ports come from below the kernel's range for outgoing connections,
    /// are free, and are never handed out twice in one process.
    #[test]
    fn free_ports_stay_below_the_ephemeral_range_and_do_not_repeat() {
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(32_768);
        let mut seen = std::collections::BTreeSet::new();
        for udp in [false, true, false, true] {
            let port = free_port(udp).unwrap();
            if low >= 11_000 {
                assert!(
                    (10_000..low).contains(&port),
                    "{port} (range starts at {low})"
                );
            }
            assert!(seen.insert(port), "{port} twice");
            if udp {
                UdpSocket::bind(("127.0.0.1", port)).unwrap();
            } else {
                TcpListener::bind(("127.0.0.1", port)).unwrap();
            }
        }
    }
}
