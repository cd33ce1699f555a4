//! `ballot lease ...`: grant, keep alive, revoke and show leases through
//! the typed client.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use super::output::{self, print_json};
use super::Endpoint;

#[derive(Subcommand, Debug)]
pub(super) enum LeaseCmd {
    /// Grant a lease of TTL_MS milliseconds (1000 to 86400000); prints its id.
    Grant {
        ttl_ms: u64,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Keep a lease alive for another TTL from now; with --every, again and
    /// again until Ctrl-C or until the lease has ended.
    Keepalive {
        id: String,
        /// Keep it alive every this many milliseconds (a third of its TTL is
        /// a good choice).
        #[arg(long)]
        every: Option<u64>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// End a lease now and delete its keys.
    Revoke {
        id: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Show a lease: its TTL and its keys (exit 3 if it does not exist).
    Show {
        id: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

pub(super) async fn lease(cmd: LeaseCmd, json: bool) -> ExitCode {
    let failed = output::client_failed;
    match cmd {
        LeaseCmd::Grant { ttl_ms, endpoint } => match endpoint.store().grant_lease(ttl_ms).await {
            Ok(l) if json => {
                print_json(&serde_json::json!({ "id": l.id, "ttl_ms": l.ttl_ms }));
                ExitCode::SUCCESS
            }
            Ok(l) => {
                println!("{}", l.id);
                ExitCode::SUCCESS
            }
            Err(e) => failed(e),
        },
        LeaseCmd::Keepalive {
            id,
            every,
            endpoint,
        } => {
            let store = endpoint.store();
            loop {
                if let Err(e) = store.keepalive(&id).await {
                    return failed(e);
                }
                let Some(every) = every else {
                    return ExitCode::SUCCESS;
                };
                tokio::time::sleep(Duration::from_millis(every.max(1))).await;
            }
        }
        LeaseCmd::Revoke { id, endpoint } => match endpoint.store().revoke(&id).await {
            Ok(deleted) if json => {
                print_json(&serde_json::json!({ "id": id, "deleted": deleted }));
                ExitCode::SUCCESS
            }
            Ok(deleted) => {
                println!("revoked; {deleted} keys deleted");
                ExitCode::SUCCESS
            }
            Err(e) => failed(e),
        },
        LeaseCmd::Show { id, endpoint } => match endpoint.store().show_lease(&id).await {
            Ok(Some(s)) if json => {
                let keys: Vec<serde_json::Value> = s
                    .keys
                    .iter()
                    .map(|(k, v)| serde_json::json!({ "key": k, "version": v }))
                    .collect();
                print_json(&serde_json::json!({
                    "id": s.lease.id, "ttl_ms": s.lease.ttl_ms, "ended": s.ended, "keys": keys,
                }));
                ExitCode::SUCCESS
            }
            Ok(Some(s)) => {
                let state = if s.ended { " (ended)" } else { "" };
                println!("{} ttl {} ms{state}", s.lease.id, s.lease.ttl_ms);
                for (key, version) in &s.keys {
                    match version {
                        Some(v) => println!("{key}\t{v}"),
                        None => println!("{key}\t(write under way)"),
                    }
                }
                ExitCode::SUCCESS
            }
            Ok(None) => {
                eprintln!("ballot: lease {id}: no such lease (or it has ended)");
                ExitCode::from(output::ABSENT)
            }
            Err(e) => failed(e),
        },
    }
}
