//! `ballot serve`: the daemon's arguments, read into a [`NodeConfig`].

use std::path::PathBuf;

use clap::Args;

use super::output::LogFormat;
use crate::server::{CoreKind, NodeConfig, Peer};
use crate::tls::TlsFiles;

#[derive(Args, Debug)]
pub(super) struct ServeArgs {
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
    /// The client API's certificate (PEM, `ballot cert server`): serve
    /// HTTPS.
    #[arg(long, env = "BALLOT_API_CERT", requires = "api_key")]
    api_cert: Option<PathBuf>,
    /// The client API's private key (PEM).
    #[arg(long, env = "BALLOT_API_KEY", requires = "api_cert")]
    api_key: Option<PathBuf>,
    /// Verify client certificates against this CA (PEM); a client may
    /// still go without one.
    #[arg(long, env = "BALLOT_API_CLIENT_CA", requires = "api_cert")]
    api_client_ca: Option<PathBuf>,
    /// Serve the client API as plain HTTP (no TLS): only on a trusted
    /// network. Without it a replica needs the API certificate.
    #[arg(long, env = "BALLOT_API_PLAINTEXT", conflicts_with = "api_cert")]
    api_plaintext: bool,
    /// Client certificate names whose holders may make admin changes
    /// (repeat, or comma-separate in the environment).
    #[arg(
        long = "admin-client",
        env = "BALLOT_ADMIN_CLIENTS",
        value_delimiter = ','
    )]
    admin_clients: Vec<String>,
    /// Run the protocol as the embedded wasm component or compiled in.
    #[arg(long, env = "BALLOT_CORE", value_enum)]
    core: Option<CoreKind>,
    /// Log format.
    #[arg(long, env = "BALLOT_LOG_FORMAT", value_enum, default_value = "human")]
    pub(super) log_format: LogFormat,
    /// The bearer token that pushing components, binding policies,
    /// swapping the protocol and changing the membership need; without
    /// one they are refused.
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
    pub(super) fn config(self) -> Result<NodeConfig, String> {
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
        let api_plaintext = self.api_plaintext
            || (self.api_cert.is_none() && base.as_ref().is_some_and(|b| b.api_plaintext));
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
            api_tls: match (self.api_cert, self.api_key) {
                (Some(cert), Some(key)) => Some(crate::tls::ApiTls {
                    cert,
                    key,
                    client_ca: self.api_client_ca,
                }),
                _ if self.api_plaintext => None,
                _ => base.as_ref().and_then(|b| b.api_tls.clone()),
            },
            api_plaintext,
            admin_clients: if self.admin_clients.is_empty() {
                base.as_ref()
                    .map(|b| b.admin_clients.clone())
                    .unwrap_or_default()
            } else {
                self.admin_clients
            },
            grants: base.as_ref().map(|b| b.grants.clone()).unwrap_or_default(),
            http_connections_max: base.as_ref().and_then(|b| b.http_connections_max),
            http_connections_per_address_max: base
                .as_ref()
                .and_then(|b| b.http_connections_per_address_max),
            http_idle_secs: base.as_ref().and_then(|b| b.http_idle_secs),
            http_header_secs: base.as_ref().and_then(|b| b.http_header_secs),
            http_body_secs: base.as_ref().and_then(|b| b.http_body_secs),
            peer_routes: base
                .as_ref()
                .map(|b| b.peer_routes.clone())
                .unwrap_or_default(),
            fast_timeout_ms: base.as_ref().and_then(|b| b.fast_timeout_ms),
            round_timeout_ms: base.as_ref().and_then(|b| b.round_timeout_ms),
        })
    }
}
