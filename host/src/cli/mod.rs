//! The `ballot` command line: the daemon, the client and the tools.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};

use crate::client::{Client, Tls};
use output::{fail, init_logging, print_json, Output};

mod bench;
mod cluster;
mod component;
mod dev;
mod kv;
mod lease;
pub mod output;
mod scaffold;
mod serve;

/// Ballot: a strongly consistent key-value store whose consensus protocol is
/// a WebAssembly component.
///
/// Exit codes of client commands: 0 success, 1 error, 2 usage error,
/// 3 not found (404), 4 precondition failed or refused by the policy
/// (409, 412), 5 unavailable (a 5xx answer, or no replica answered).
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
    Serve(Box<serve::ServeArgs>),
    /// Run a local cluster of real replica processes on loopback until
    /// Ctrl-C; `ballot dev stop|start|restart N` plays with one of them.
    Dev(dev::DevArgs),
    /// Read and write keys.
    #[command(subcommand)]
    Kv(kv::KvCmd),
    /// Grant, keep alive, revoke and show leases (keys that vanish when
    /// their holder stops keeping the lease alive).
    #[command(subcommand)]
    Lease(lease::LeaseCmd),
    /// Inspect the cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Make the cluster's certificates.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Measure throughput and latency of local clusters (and etcd), side by side.
    Bench(bench::BenchArgs),
    /// Store components in the cluster; swap the protocol live.
    #[command(subcommand)]
    Component(ComponentCmd),
    /// Write, build and bind conflict-resolution policies.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Make a bearer token for a `[[grants]]` entry: prints the token (for
    /// the client, BALLOT_TOKEN) and its SHA-256 (for the replicas).
    Token,
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

#[derive(Args, Debug, Clone)]
struct Endpoint {
    /// A replica's client URL.
    #[arg(
        long,
        env = "BALLOT_ENDPOINT",
        default_value = "https://127.0.0.1:8001",
        global = true
    )]
    endpoint: String,
    /// The cluster CA (PEM) that an `https://` replica's certificate must
    /// chain to. Without one, a command to a replica on this machine trusts
    /// the CA of the `ballot dev` cluster in `$BALLOT_DEV_DIR` (default
    /// `ballot-dev`), if there is one.
    #[arg(long, env = "BALLOT_CA", global = true)]
    ca: Option<std::path::PathBuf>,
    /// A client certificate (PEM, `ballot cert client NAME`) to present.
    #[arg(
        long,
        env = "BALLOT_CLIENT_CERT",
        global = true,
        requires = "client_key"
    )]
    client_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long,
        env = "BALLOT_CLIENT_KEY",
        global = true,
        requires = "client_cert"
    )]
    client_key: Option<std::path::PathBuf>,
    /// A bearer token a replica grants a role to (`ballot token`); sent
    /// instead of the admin token when both are given.
    #[arg(long, env = "BALLOT_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// The replicas' admin token. Without one, a command to a replica on
    /// this machine uses the token of the `ballot dev` cluster in
    /// `$BALLOT_DEV_DIR` (default `ballot-dev`), if there is one.
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
        Client::with_tls(&self.endpoint, &self.tls()).with_token(self.token())
    }

    /// The typed client, with its retries, for the key-value commands.
    fn store(&self) -> ballot_client::Client {
        ballot_client::Client::new([&self.endpoint])
            .with_tls(&self.tls())
            .with_token(self.token())
    }

    /// What to trust and present over TLS: the CA and certificate given,
    /// or the local dev cluster's CA for a loopback endpoint. A file that
    /// cannot be read ends the command with the reason.
    fn tls(&self) -> Tls {
        let dev_ca = || {
            let dir = std::env::var_os("BALLOT_DEV_DIR").unwrap_or_else(|| "ballot-dev".into());
            let ca = crate::tls::ca_cert_path(&std::path::Path::new(&dir).join("certs"));
            (is_loopback(&self.endpoint) && ca.exists()).then_some(ca)
        };
        let identity = self.client_cert.as_deref().zip(self.client_key.as_deref());
        let tls = match self.ca.clone().or_else(dev_ca) {
            Some(ca) => Tls::from_files(&ca, identity),
            None if self.endpoint.starts_with("https:") => Err(format!(
                "{} is HTTPS: give the cluster CA with --ca or BALLOT_CA",
                self.endpoint
            )),
            None => Ok(Tls::plain()),
        };
        tls.unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(2)
        })
    }

    /// The token to send: the one given, the admin token given, or the
    /// local dev cluster's admin token for a loopback endpoint (never sent
    /// anywhere else).
    fn token(&self) -> Option<String> {
        if let Some(token) = self.token.clone().or_else(|| self.admin_token.clone()) {
            return Some(token);
        }
        if !is_loopback(&self.endpoint) {
            return None;
        }
        let dir = std::env::var_os("BALLOT_DEV_DIR").unwrap_or_else(|| "ballot-dev".into());
        let path = std::path::Path::new(&dir).join(crate::dev::ADMIN_TOKEN_FILE);
        let token = std::fs::read_to_string(path).ok()?;
        let token = token.trim();
        (!token.is_empty()).then(|| token.to_string())
    }
}

/// Whether an endpoint URL names this machine (`localhost`, 127.0.0.0/8,
/// `::1`), read with the parser the client uses. An authority with user
/// information (`http://127.0.0.1:80@example.com`) is never loopback.
fn is_loopback(endpoint: &str) -> bool {
    let Ok(uri) = endpoint.parse::<hyper::Uri>() else {
        return false;
    };
    let Some(authority) = uri.authority() else {
        return false;
    };
    if authority.as_str().contains('@') {
        return false;
    }
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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
        /// Its client URL (`https://host:port`), shown by `cluster status`
        /// and named to clients as a key's leader (`Ballot-Leader`).
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
    /// Issue the client API's server certificate (`api.pem`), valid for
    /// localhost, 127.0.0.1, ::1 and every --host.
    Server {
        /// A DNS name or IP address clients reach the replicas by (repeat).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Where the certificates live.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
    /// Issue a client certificate (`client-NAME.pem`) for mutual TLS; list
    /// NAME in a replica's `admin_clients` to let it make admin changes.
    Client {
        name: String,
        /// Where the certificates live.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

/// A command whose reader goes away (`ballot kv get k | head -1`) ends
/// quietly, as Unix tools do, instead of with a panic on the broken pipe:
/// printing to a closed stdout panics (Rust ignores SIGPIPE), and this hook
/// turns that one panic into exit status 141, what SIGPIPE would give.
/// SIGPIPE itself stays ignored, so a replica resetting a connection
/// mid-request is still an error the command reports (with its
/// `maybe_applied`), not a silent death. Not for the daemon or `ballot
/// dev`, which must outlive their readers.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = crate::panic_message(info.payload());
        if message.contains("Broken pipe") || message.contains("BrokenPipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// Runs the command line; `ballot`'s `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.output == Output::Json;
    if !matches!(cli.command, Cmd::Serve(_) | Cmd::Dev(_)) {
        quiet_on_closed_stdout();
    }
    match cli.command {
        Cmd::Serve(args) => {
            init_logging(args.log_format);
            match args.config().and_then(crate::server::serve) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Cmd::Dev(args) => dev::dev(args),
        Cmd::Bench(args) => bench::bench(args),
        Cmd::Kv(cmd) => client_runtime(kv::kv(cmd, json)),
        Cmd::Lease(cmd) => client_runtime(lease::lease(cmd, json)),
        Cmd::Cluster(ClusterCmd::Status { endpoint }) if json => client_runtime(
            component::print_each_replica_json(endpoint.client(), "/v1/cluster", true),
        ),
        Cmd::Cluster(ClusterCmd::Status { endpoint }) => client_runtime(cluster::status(endpoint)),
        Cmd::Cluster(ClusterCmd::Add {
            id,
            peer,
            http,
            no_wait,
            endpoint,
        }) => {
            let body = serde_json::json!({ "id": id, "peer": peer, "http": http }).to_string();
            client_runtime(cluster::change(
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
        }) => client_runtime(cluster::change(
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
        Cmd::Cert(CertCmd::Server { hosts, dir }) => {
            match crate::tls::issue_api_server(&dir, &hosts) {
                Ok(()) => {
                    println!("wrote {}", crate::tls::api_cert_path(&dir).display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Cmd::Cert(CertCmd::Client { name, dir }) => match crate::tls::issue_client(&dir, &name) {
            Ok(()) => {
                println!(
                    "wrote {}",
                    crate::tls::client_cert_path(&dir, &name).display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Cmd::Component(ComponentCmd::Push { file, endpoint }) => {
            client_runtime(component::push(endpoint.client(), file))
        }
        Cmd::Component(ComponentCmd::List { endpoint }) if json => client_runtime(
            component::print_api_json(endpoint.client(), "/v1/components"),
        ),
        Cmd::Component(ComponentCmd::List { endpoint }) => {
            client_runtime(component::list_components(endpoint.client()))
        }
        Cmd::Component(ComponentCmd::Activate {
            component,
            endpoint,
        }) => client_runtime(component::swap(endpoint.client(), Some(component))),
        Cmd::Component(ComponentCmd::Rollback { endpoint }) => {
            client_runtime(component::swap(endpoint.client(), None))
        }
        Cmd::Component(ComponentCmd::Status { endpoint }) if json => client_runtime(
            component::print_each_replica_json(endpoint.client(), "/v1/protocol", false),
        ),
        Cmd::Component(ComponentCmd::Status { endpoint }) => {
            client_runtime(component::protocol_status(endpoint.client()))
        }
        Cmd::Policy(PolicyCmd::New { name, dir, sdk }) => scaffold::new(name, dir, sdk),
        Cmd::Policy(PolicyCmd::Build { dir }) => scaffold::build(dir),
        Cmd::Policy(PolicyCmd::Bind {
            prefix,
            component,
            endpoint,
        }) => client_runtime(component::bind(endpoint.client(), prefix, component)),
        Cmd::Policy(PolicyCmd::Unbind { prefix, endpoint }) => {
            client_runtime(component::unbind(endpoint.client(), prefix))
        }
        Cmd::Policy(PolicyCmd::List { endpoint }) if json => {
            client_runtime(component::print_api_json(endpoint.client(), "/v1/policies"))
        }
        Cmd::Policy(PolicyCmd::List { endpoint }) => {
            client_runtime(component::list_policies(endpoint.client()))
        }
        Cmd::Token => match crate::storage::random_bytes::<32>() {
            Ok(bytes) => {
                let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
                let token = hex(&bytes);
                let hash = hex(&crate::api::access::token_sha256(&token));
                if json {
                    print_json(&serde_json::json!({"token": token, "token_sha256": hash}));
                } else {
                    println!("token:        {token}");
                    println!("token_sha256: {hash}");
                    eprintln!(
                        "Give the token to the client (--token or BALLOT_TOKEN), and its \
                         SHA-256 to every replica:\n  [[grants]]\n  token_sha256 = \"{hash}\"\n  \
                         role = \"write\"          # read, write or admin\n  \
                         prefixes = [\"app/\"]     # optional: the keys it covers"
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
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

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_endpoints() {
        for e in [
            "http://127.0.0.1:8001",
            "http://localhost:8001/",
            "https://[::1]:8443/v1",
            "http://LOCALHOST:8001",
        ] {
            assert!(super::is_loopback(e), "{e}");
        }
        for e in [
            "http://10.0.0.1:8001",
            "https://db.example:443",
            "http://[2001:db8::1]:80",
            // User information: the client would connect to the host after @.
            "http://127.0.0.1:80@evil.example",
            "http://[::1]@evil.example",
            "http://localhost:1@evil.example",
            "http://127.0.0.1@evil.example",
            "not a url",
        ] {
            assert!(!super::is_loopback(e), "{e}");
        }
    }
}
