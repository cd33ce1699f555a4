//! The `ballot` command line: the daemon, the client and the tools.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};

use crate::client::Client;
use crate::console::{fail, init_logging, print_json, LogFormat, Output};
use crate::server::{CoreKind, NodeConfig, Peer};
use crate::tls::TlsFiles;
use crate::{component_cmd, dev_cmd};

/// Ballot: a strongly consistent key-value store whose consensus protocol is
/// a WebAssembly component.
///
/// Exit codes of client commands: 0 success, 1 error, 3 not found,
/// 4 precondition failed or refused by the policy, 5 cluster unavailable.
#[derive(Parser, Debug)]
#[command(name = "ballot", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// How read commands print: text for people, json for scripts.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one replica.
    Serve(Box<ServeArgs>),
    /// Run a local cluster of real replica processes on loopback until
    /// Ctrl-C; `ballot dev stop|start|restart N` plays with one of them.
    Dev(dev_cmd::DevArgs),
    /// Read and write keys.
    #[command(subcommand)]
    Kv(KvCmd),
    /// Inspect the cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Make the cluster's certificates.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Measure throughput and latency of local clusters (and etcd), side by side.
    Bench(BenchArgs),
    /// Store components in the cluster; swap the protocol live.
    #[command(subcommand)]
    Component(ComponentCmd),
    /// Write, build and bind conflict-resolution policies.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Describe the embedded default components: names, versions, formats.
    Components,
    /// Print a shell completion script (`ballot completions bash >
    /// /etc/bash_completion.d/ballot`).
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand, Debug)]
enum ComponentCmd {
    /// Validate a component and store it in the cluster (content-addressed).
    Push {
        /// The component (.wasm).
        file: PathBuf,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// List the stored components and what they are bound to.
    List {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Swap the cluster's protocol to a stored protocol component, live
    /// ('embedded' for the built-in one).
    Activate {
        /// The component's id (or at least 8 of its first hex digits).
        component: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Swap back to the protocol that ran before the current one.
    Rollback {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Show each replica's protocol and the swap history.
    Status {
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Create a policy crate that builds and passes its tests as it is.
    New {
        /// The policy's directory, like `cargo new`; its last component
        /// names the policy (lower-case, - and _ allowed).
        name: String,
        /// Create it here instead, and take NAME as the policy's name only.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The SDK crate (`guest/sdk` of a Ballot checkout); defaults to
        /// $BALLOT_SDK, then the checkout this binary was built from.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Build a policy crate into a component, and check it as push would.
    Build {
        /// The crate's directory.
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Route keys starting with PREFIX to a stored policy component.
    Bind {
        prefix: String,
        /// The component's id (or at least 8 of its first hex digits).
        component: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Send PREFIX's keys back to the built-in register policy.
    Unbind {
        prefix: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Show the bindings a replica runs.
    List {
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Workloads to run, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "create,put,cas,get,mix"
    )]
    workloads: Vec<crate::bench::Workload>,
    /// Concurrent closed-loop clients, one sweep point each.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    clients: Vec<usize>,
    /// Seconds per point.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Bytes per written value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Keys the put workload contends on.
    #[arg(long, default_value_t = 4)]
    hot_keys: usize,
    /// Replicas per cluster (and etcd members).
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// Protocol builds to run Ballot with; both gives the wasm/native ratio.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "wasm,native")]
    core: Vec<CoreKind>,
    /// Also run the same workloads against etcd (needs the etcd binary and
    /// a build with `--features etcd`).
    #[arg(long, value_parser = ["etcd"])]
    compare: Option<String>,
    /// Drive these running Ballot replicas instead of starting clusters.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Where the clusters live while the benchmark runs.
    #[arg(long, default_value = "ballot-bench")]
    dir: PathBuf,
    /// Write every point as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw throughput and p99 against clients as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Instead of the workloads: swap a local wasm cluster's protocol to
    /// protocol-next and back under the mix workload, and report each
    /// swap's duration and p99 during it against the steady p99 before it
    /// (--secs of steady load before each swap; --clients' first value).
    #[arg(long)]
    swap: bool,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Configuration file (TOML); the options below override it.
    #[arg(long, env = "BALLOT_CONFIG")]
    config: Option<PathBuf>,
    /// This replica's id.
    #[arg(long, env = "BALLOT_ID")]
    id: Option<u32>,
    /// Where this replica keeps its LMDB files.
    #[arg(long, env = "BALLOT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// QUIC address for other replicas (UDP).
    #[arg(long, env = "BALLOT_PEER_ADDR")]
    peer_addr: Option<std::net::SocketAddr>,
    /// HTTP address for clients.
    #[arg(long, env = "BALLOT_HTTP_ADDR")]
    http_addr: Option<std::net::SocketAddr>,
    /// Another replica, as ID=HOST:PORT (repeat, or comma-separate in the
    /// environment). Replaces the file's list.
    #[arg(long = "peer", env = "BALLOT_PEERS", value_delimiter = ',', value_parser = parse_peer)]
    peers: Vec<Peer>,
    /// Cluster CA certificate (PEM).
    #[arg(long, env = "BALLOT_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This replica's certificate (PEM).
    #[arg(long, env = "BALLOT_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// This replica's private key (PEM).
    #[arg(long, env = "BALLOT_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Run the protocol as the embedded wasm component or compiled in.
    #[arg(long, env = "BALLOT_CORE", value_enum)]
    core: Option<CoreKind>,
    /// Log format.
    #[arg(long, env = "BALLOT_LOG_FORMAT", value_enum, default_value = "human")]
    log_format: LogFormat,
    /// Require this bearer token to push components, bind policies and
    /// swap the protocol.
    #[arg(long, env = "BALLOT_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Join a running cluster (`--peer` lists some of its replicas) rather
    /// than start a new one; `ballot cluster add` then admits this replica.
    #[arg(long)]
    join: bool,
}

fn parse_peer(s: &str) -> Result<Peer, String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ID=HOST:PORT"))?;
    Ok(Peer {
        id: id.trim().parse().map_err(|e| format!("{id:?}: {e}"))?,
        addr: addr.trim().parse().map_err(|e| format!("{addr:?}: {e}"))?,
        http: None,
    })
}

impl ServeArgs {
    fn config(self) -> Result<NodeConfig, String> {
        let base = match &self.config {
            Some(path) => Some(NodeConfig::load(path)?),
            None => None,
        };
        let missing = |what: &str| format!("missing {what}: give it in --config or as --{what}");
        let tls = TlsFiles {
            ca: self
                .tls_ca
                .or(base.as_ref().map(|b| b.tls.ca.clone()))
                .ok_or_else(|| missing("tls-ca"))?,
            cert: self
                .tls_cert
                .or(base.as_ref().map(|b| b.tls.cert.clone()))
                .ok_or_else(|| missing("tls-cert"))?,
            key: self
                .tls_key
                .or(base.as_ref().map(|b| b.tls.key.clone()))
                .ok_or_else(|| missing("tls-key"))?,
        };
        Ok(NodeConfig {
            id: self
                .id
                .or(base.as_ref().map(|b| b.id))
                .ok_or_else(|| missing("id"))?,
            data_dir: self
                .data_dir
                .or(base.as_ref().map(|b| b.data_dir.clone()))
                .ok_or_else(|| missing("data-dir"))?,
            peer_addr: self
                .peer_addr
                .or(base.as_ref().map(|b| b.peer_addr))
                .ok_or_else(|| missing("peer-addr"))?,
            http_addr: self
                .http_addr
                .or(base.as_ref().map(|b| b.http_addr))
                .ok_or_else(|| missing("http-addr"))?,
            peers: if self.peers.is_empty() {
                base.as_ref().map(|b| b.peers.clone()).unwrap_or_default()
            } else {
                self.peers
            },
            tls,
            core: self
                .core
                .or(base.as_ref().map(|b| b.core))
                .unwrap_or_default(),
            map_size_mib: base.as_ref().and_then(|b| b.map_size_mib),
            join: self.join || base.as_ref().is_some_and(|b| b.join),
            changelog_keep: base.as_ref().and_then(|b| b.changelog_keep),
            admin_token: self
                .admin_token
                .or(base.as_ref().and_then(|b| b.admin_token.clone())),
        })
    }
}

#[derive(Args, Debug, Clone)]
struct Endpoint {
    /// A replica's HTTP endpoint.
    #[arg(
        long,
        env = "BALLOT_ENDPOINT",
        default_value = "http://127.0.0.1:8001",
        global = true
    )]
    endpoint: String,
    /// The replicas' admin token, if they require one.
    #[arg(
        long,
        env = "BALLOT_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    admin_token: Option<String>,
}

impl Endpoint {
    fn client(&self) -> Client {
        Client::new(&self.endpoint).with_token(self.admin_token.clone())
    }

    /// The typed client, with its retries, for the key-value commands.
    fn store(&self) -> ballot_client::Client {
        ballot_client::Client::new([&self.endpoint]).with_token(self.admin_token.clone())
    }
}

#[derive(Subcommand, Debug)]
enum KvCmd {
    /// Print a key's value (linearizable unless --local).
    Get {
        key: String,
        /// Read this replica's committed copy (may be stale).
        #[arg(long)]
        local: bool,
        /// Also print the version to stderr.
        #[arg(long, short)]
        verbose: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Set a key's value ('-' reads it from standard input).
    Put {
        key: String,
        value: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Set a key's value only if it has none (the same value again succeeds).
    Create {
        key: String,
        value: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Set a key's value only if its version is VERSION.
    Cas {
        key: String,
        version: u64,
        value: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Run COMMAND through the key's policy ('-' reads it from standard input).
    Apply {
        key: String,
        #[arg(allow_hyphen_values = true)]
        command: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Delete a key.
    Delete {
        key: String,
        /// Only if its version is this.
        #[arg(long)]
        if_version: Option<u64>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Show every replica, its link, health, components and membership,
    /// with the progress of a join under way.
    Status {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Add a replica: it joins as a learner, catches up, then becomes a
    /// voter. Start it first (`join = true` in its node.toml).
    Add {
        /// Its replica id.
        #[arg(long)]
        id: u32,
        /// Its QUIC address (host:port).
        #[arg(long)]
        peer: std::net::SocketAddr,
        /// Its client URL, shown by `cluster status`.
        #[arg(long)]
        http: Option<String>,
        /// Return once the change is queued instead of following it.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Remove a replica (ask another one): it stops voting, then leaves.
    /// Refused if the voters left could not form a quorum.
    Remove {
        #[arg(long)]
        id: u32,
        /// Return once the change is queued instead of following it.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

#[derive(Subcommand, Debug)]
enum CertCmd {
    /// Create the cluster's certificate authority.
    Init {
        /// Where the certificates live.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// A name for the cluster, recorded in the CA.
        #[arg(long, default_value = "ballot")]
        cluster: String,
    },
    /// Issue replica ID a certificate signed by the cluster CA.
    Node {
        id: u32,
        /// Where the certificates live.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

/// Runs the command line; `ballot`'s `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.output == Output::Json;
    match cli.command {
        Cmd::Serve(args) => {
            init_logging(args.log_format);
            match args.config().and_then(crate::server::serve) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Cmd::Dev(args) => dev_cmd::dev(args),
        Cmd::Bench(args) => bench(args),
        Cmd::Kv(cmd) => client_runtime(kv(cmd, json)),
        Cmd::Cluster(ClusterCmd::Status { endpoint }) if json => client_runtime(
            component_cmd::print_each_replica_json(endpoint.client(), "/v1/cluster", true),
        ),
        Cmd::Cluster(ClusterCmd::Status { endpoint }) => client_runtime(status(endpoint)),
        Cmd::Cluster(ClusterCmd::Add {
            id,
            peer,
            http,
            no_wait,
            endpoint,
        }) => {
            let body = serde_json::json!({ "id": id, "peer": peer, "http": http }).to_string();
            client_runtime(crate::members_cmd::change(
                endpoint.client(),
                hyper::Method::POST,
                "/v1/cluster/members".into(),
                body,
                !no_wait,
            ))
        }
        Cmd::Cluster(ClusterCmd::Remove {
            id,
            no_wait,
            endpoint,
        }) => client_runtime(crate::members_cmd::change(
            endpoint.client(),
            hyper::Method::DELETE,
            format!("/v1/cluster/members/{id}"),
            String::new(),
            !no_wait,
        )),
        Cmd::Cert(CertCmd::Init { dir, cluster }) => match crate::tls::init_ca(&dir, &cluster) {
            Ok(()) => {
                println!("wrote {}", crate::tls::ca_cert_path(&dir).display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Cmd::Cert(CertCmd::Node { id, dir }) => match crate::tls::issue_node(&dir, id) {
            Ok(()) => {
                println!("wrote {}", crate::tls::node_cert_path(&dir, id).display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Cmd::Component(ComponentCmd::Push { file, endpoint }) => {
            client_runtime(component_cmd::push(endpoint.client(), file))
        }
        Cmd::Component(ComponentCmd::List { endpoint }) if json => client_runtime(
            component_cmd::print_api_json(endpoint.client(), "/v1/components"),
        ),
        Cmd::Component(ComponentCmd::List { endpoint }) => {
            client_runtime(component_cmd::list_components(endpoint.client()))
        }
        Cmd::Component(ComponentCmd::Activate {
            component,
            endpoint,
        }) => client_runtime(component_cmd::swap(endpoint.client(), Some(component))),
        Cmd::Component(ComponentCmd::Rollback { endpoint }) => {
            client_runtime(component_cmd::swap(endpoint.client(), None))
        }
        Cmd::Component(ComponentCmd::Status { endpoint }) if json => client_runtime(
            component_cmd::print_each_replica_json(endpoint.client(), "/v1/protocol", false),
        ),
        Cmd::Component(ComponentCmd::Status { endpoint }) => {
            client_runtime(component_cmd::protocol_status(endpoint.client()))
        }
        Cmd::Policy(PolicyCmd::New { name, dir, sdk }) => component_cmd::new(name, dir, sdk),
        Cmd::Policy(PolicyCmd::Build { dir }) => component_cmd::build(dir),
        Cmd::Policy(PolicyCmd::Bind {
            prefix,
            component,
            endpoint,
        }) => client_runtime(component_cmd::bind(endpoint.client(), prefix, component)),
        Cmd::Policy(PolicyCmd::Unbind { prefix, endpoint }) => {
            client_runtime(component_cmd::unbind(endpoint.client(), prefix))
        }
        Cmd::Policy(PolicyCmd::List { endpoint }) if json => client_runtime(
            component_cmd::print_api_json(endpoint.client(), "/v1/policies"),
        ),
        Cmd::Policy(PolicyCmd::List { endpoint }) => {
            client_runtime(component_cmd::list_policies(endpoint.client()))
        }
        Cmd::Components => match crate::registry::describe_embedded() {
            Ok(components) if json => {
                print_json(&serde_json::to_value(components).expect("serializes"));
                ExitCode::SUCCESS
            }
            Ok(components) => {
                for c in components {
                    println!("{}", c.line());
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "ballot", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
    }
}

fn client_runtime(f: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => fail(format!("starting tokio: {e}")),
    }
}

fn value_arg(value: String) -> Result<Bytes, String> {
    if value == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| format!("reading standard input: {e}"))?;
        Ok(buf.into())
    } else {
        Ok(value.into_bytes().into())
    }
}

async fn kv(cmd: KvCmd, json: bool) -> ExitCode {
    use ballot_client::Error;
    // 3: no value; 4: refused (precondition or policy); 5: unavailable.
    let failed = |e: Error| {
        eprintln!("ballot: {e}");
        match e {
            Error::Refused { .. } => ExitCode::from(4),
            Error::Unavailable { .. } => ExitCode::from(5),
            Error::Invalid { .. } => ExitCode::FAILURE,
        }
    };
    let absent = |key: &str| {
        eprintln!("ballot: {key}: the key has no value");
        ExitCode::from(3)
    };
    let written = |w: Result<ballot_client::Written, Error>| match w {
        Ok(w) => {
            let created = if w.created { " (created)" } else { "" };
            println!("version {}{created}", w.version);
            ExitCode::SUCCESS
        }
        Err(e) => failed(e),
    };
    match cmd {
        KvCmd::Get {
            key,
            local,
            verbose,
            endpoint,
        } => {
            let store = endpoint.store();
            let read = if local {
                store.get_local(&key).await
            } else {
                store.get(&key).await
            };
            match read {
                Ok(found) if json => {
                    let mut doc = serde_json::json!({ "key": key });
                    match &found {
                        Some(entry) => {
                            doc["version"] = entry.version.into();
                            match std::str::from_utf8(&entry.value) {
                                Ok(text) => doc["value"] = text.into(),
                                Err(_) => {
                                    let hex: String =
                                        entry.value.iter().map(|b| format!("{b:02x}")).collect();
                                    doc["value_hex"] = hex.into();
                                }
                            }
                        }
                        None => doc["value"] = serde_json::Value::Null,
                    }
                    print_json(&doc);
                    if found.is_some() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(3)
                    }
                }
                Ok(Some(entry)) => {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&entry.value);
                    if out.is_terminal() && !entry.value.ends_with(b"\n") {
                        let _ = out.write_all(b"\n");
                    }
                    if verbose {
                        eprintln!("version {}", entry.version);
                    }
                    ExitCode::SUCCESS
                }
                Ok(None) => absent(&key),
                Err(e) => failed(e),
            }
        }
        KvCmd::Put {
            key,
            value,
            endpoint,
        } => match value_arg(value) {
            Ok(v) => written(endpoint.store().put(&key, v).await),
            Err(e) => fail(e),
        },
        KvCmd::Create {
            key,
            value,
            endpoint,
        } => match value_arg(value) {
            Ok(v) => written(endpoint.store().create(&key, v).await),
            Err(e) => fail(e),
        },
        KvCmd::Cas {
            key,
            version,
            value,
            endpoint,
        } => match value_arg(value) {
            Ok(v) => written(endpoint.store().cas(&key, version, v).await),
            Err(e) => fail(e),
        },
        KvCmd::Apply {
            key,
            command,
            endpoint,
        } => match value_arg(command) {
            Ok(command) => component_cmd::apply(endpoint.client(), key, command).await,
            Err(e) => fail(e),
        },
        KvCmd::Delete {
            key,
            if_version,
            endpoint,
        } => {
            let store = endpoint.store();
            let deleted = match if_version {
                Some(v) => store.delete_if(&key, v).await,
                None => store.delete(&key).await,
            };
            match deleted {
                Ok(Some(version)) => {
                    println!("deleted at version {version}");
                    ExitCode::SUCCESS
                }
                Ok(None) => absent(&key),
                Err(e) => failed(e),
            }
        }
    }
}

async fn status(endpoint: Endpoint) -> ExitCode {
    let client = endpoint.client();
    let view = match client.cluster().await {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    let mut rows = vec![[
        "ID".to_string(),
        "ROLE".into(),
        "EPOCH".into(),
        "PEER".into(),
        "HTTP".into(),
        format!("LINK FROM {}", view.id),
        "HEALTH".into(),
        "INCARNATION".into(),
        "PROTOCOL".into(),
        "POLICY".into(),
    ]];
    for r in &view.replicas {
        let remote = match &r.http {
            Some(url) if r.id == view.id => Some(Ok(view.clone())),
            Some(url) => Some(Client::new(url).cluster().await),
            None => None,
        };
        let (health, epoch, incarnation, protocol, policy) = match remote {
            Some(Ok(v)) => (
                if v.healthy {
                    "ok".to_string()
                } else {
                    format!("stopped: {}", v.error.unwrap_or_default())
                },
                v.epoch.to_string(),
                v.incarnation.to_string(),
                format!("{} {} ({})", v.protocol.name, v.protocol.version, v.core),
                format!("{} {}", v.policy.name, v.policy.version),
            ),
            Some(Err(_)) => (
                "unreachable".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ),
            None => (
                "unknown".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ),
        };
        let mut link = r.link.clone();
        if let Some(e) = &r.last_error {
            link = format!("{link} ({e})");
        }
        rows.push([
            r.id.to_string(),
            r.role.clone().unwrap_or_else(|| "-".into()),
            epoch,
            r.peer.clone(),
            r.http.clone().unwrap_or_else(|| "-".into()),
            link,
            health,
            incarnation,
            protocol,
            policy,
        ]);
    }
    component_cmd::table(rows.into_iter().map(Vec::from).collect());
    crate::members_cmd::print_members(&client).await;
    ExitCode::SUCCESS
}

fn bench(args: BenchArgs) -> ExitCode {
    if args.clients.is_empty()
        || args.clients.contains(&0)
        || args.secs <= 0.0
        || args.hot_keys == 0
    {
        return fail("--clients must be positive counts, --secs and --hot-keys positive");
    }
    let binary = match std::env::current_exe() {
        Ok(b) => b,
        Err(e) => return fail(format!("locating the ballot binary: {e}")),
    };
    let plan = crate::bench::Plan {
        nodes: args.nodes,
        workloads: args.workloads,
        clients: args.clients,
        secs: args.secs,
        value_bytes: args.value_bytes,
        hot_keys: args.hot_keys,
        cores: args.core,
        etcd: args.compare.is_some(),
        endpoints: args.endpoints,
        dir: args.dir.clone(),
        binary,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("starting tokio: {e}")),
    };
    if args.swap {
        let clients = plan.clients[0];
        let points = match rt.block_on(crate::bench::run_swaps(plan, clients)) {
            Ok(p) => p,
            Err(e) => return fail(e),
        };
        let _ = std::fs::remove_dir_all(&args.dir);
        print!("{}", crate::bench::swap_table(&points));
        if let Some(path) = args.json {
            let text = serde_json::to_string_pretty(&points).expect("the report serializes");
            if let Err(e) = std::fs::write(&path, text + "\n") {
                return fail(format!("writing {}: {e}", path.display()));
            }
        }
        return ExitCode::SUCCESS;
    }
    let report = match rt.block_on(crate::bench::run(plan)) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let _ = std::fs::remove_dir_all(&args.dir);
    print!("{}", crate::bench::table(&report));
    if let Some(path) = args.json {
        let text = serde_json::to_string_pretty(&report).expect("the report serializes");
        if let Err(e) = std::fs::write(&path, text + "\n") {
            return fail(format!("writing {}: {e}", path.display()));
        }
    }
    if let Some(path) = args.plot {
        if let Err(e) = crate::bench::plot(&report, &path) {
            return fail(e);
        }
    }
    ExitCode::SUCCESS
}
