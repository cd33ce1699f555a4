//! `ballot kv ...`: reads and writes through the typed client, with its
//! retries.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Subcommand;

use super::output::{self, fail, print_json};
use super::{component, value_arg, Endpoint};

#[derive(Subcommand, Debug)]
pub(super) enum KvCmd {
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
    /// List the keys under PREFIX that have a value, with versions and
    /// values: every key written before the command began (linearizable
    /// values) unless --local.
    List {
        #[arg(default_value = "")]
        prefix: String,
        /// At most this many keys (all by default).
        #[arg(long)]
        limit: Option<usize>,
        /// List this replica's own copy (may be stale or miss keys).
        #[arg(long)]
        local: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Print each commit under PREFIX this replica learns, as it learns
    /// it, one JSON object a line (Ctrl-C stops).
    Watch {
        #[arg(default_value = "")]
        prefix: String,
        /// Start at this changelog position (an event's `seq` + 1 resumes
        /// after it); by default, only what comes next.
        #[arg(long)]
        from: Option<u64>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Set a key's value ('-' reads it from standard input).
    Put {
        key: String,
        value: String,
        /// Attach the key to this lease: it is deleted when the lease ends.
        #[arg(long)]
        lease: Option<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Set a key's value only if it has none (the same value again succeeds).
    Create {
        key: String,
        value: String,
        /// Attach the key to this lease (a lock: `ballot lease grant`, then
        /// `ballot kv create LOCK OWNER --lease ID`).
        #[arg(long)]
        lease: Option<String>,
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

/// Sets `value` in `doc` when it is UTF-8, `value_hex` otherwise.
fn put_value(doc: &mut serde_json::Value, value: &[u8]) {
    match std::str::from_utf8(value) {
        Ok(text) => doc["value"] = text.into(),
        Err(_) => {
            let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
            doc["value_hex"] = hex.into();
        }
    }
}

pub(super) async fn kv(cmd: KvCmd, json: bool) -> ExitCode {
    let failed = output::client_failed;
    let absent = |key: &str| {
        eprintln!("ballot: {key}: the key has no value");
        ExitCode::from(output::ABSENT)
    };
    let written = |w: Result<ballot_client::Written, ballot_client::Error>| match w {
        Ok(w) => {
            let created = if w.created { " (created)" } else { "" };
            println!("version {}{created}", w.version);
            ExitCode::SUCCESS
        }
        Err(e) => failed(e),
    };
    match cmd {
        KvCmd::Watch {
            prefix,
            from,
            endpoint,
        } => {
            let mut path = format!(
                "/v1/watch?prefix={}",
                ballot_client::http::escape_key(&prefix)
            );
            if let Some(from) = from {
                path.push_str(&format!("&from={from}"));
            }
            let mut events = match endpoint.client().events(&path, &[]).await {
                Ok(Ok(events)) => events,
                Ok(Err(r)) => {
                    eprintln!("ballot: {} {}", r.status, r.error_message());
                    return ExitCode::from(output::UNAVAILABLE);
                }
                Err(e) => {
                    eprintln!("ballot: {e}");
                    return ExitCode::from(output::UNAVAILABLE);
                }
            };
            let mut out = std::io::stdout().lock();
            while let Some(event) = events.next().await {
                match event {
                    Ok(e) if e.event == "message" => {
                        if writeln!(out, "{}", e.data)
                            .and_then(|()| out.flush())
                            .is_err()
                        {
                            return ExitCode::SUCCESS;
                        }
                    }
                    Ok(e) => {
                        eprintln!("ballot: the watch ended ({}): {}", e.event, e.data);
                        return ExitCode::from(output::UNAVAILABLE);
                    }
                    Err(e) => {
                        eprintln!("ballot: {e}");
                        return ExitCode::from(output::UNAVAILABLE);
                    }
                }
            }
            eprintln!("ballot: the replica closed the watch");
            ExitCode::from(output::UNAVAILABLE)
        }
        KvCmd::List {
            prefix,
            limit,
            local,
            endpoint,
        } => {
            let store = endpoint.store();
            let mut after: Option<String> = None;
            let mut items = Vec::new();
            let wanted = limit.unwrap_or(usize::MAX);
            while items.len() < wanted {
                let page = match store
                    .list(
                        &prefix,
                        after.as_deref(),
                        (wanted - items.len()).min(1000),
                        local,
                    )
                    .await
                {
                    Ok(page) => page,
                    Err(e) => return failed(e),
                };
                items.extend(page.items);
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            items.truncate(wanted);
            if json {
                let docs: Vec<serde_json::Value> = items
                    .iter()
                    .map(|(key, entry)| {
                        let mut doc = serde_json::json!({ "key": key, "version": entry.version });
                        put_value(&mut doc, &entry.value);
                        doc
                    })
                    .collect();
                print_json(&serde_json::Value::from(docs));
            } else {
                let mut out = std::io::stdout().lock();
                for (key, entry) in &items {
                    let value = String::from_utf8_lossy(&entry.value);
                    let _ = writeln!(out, "{key}\t{}\t{}", entry.version, value.escape_debug());
                }
            }
            ExitCode::SUCCESS
        }
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
                            put_value(&mut doc, &entry.value);
                        }
                        None => doc["value"] = serde_json::Value::Null,
                    }
                    print_json(&doc);
                    if found.is_some() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(output::ABSENT)
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
            lease,
            endpoint,
        } => match (value_arg(value), lease) {
            (Ok(v), None) => written(endpoint.store().put(&key, v).await),
            (Ok(v), Some(id)) => {
                written(endpoint.store().put_with_lease(&key, v, &id, false).await)
            }
            (Err(e), _) => fail(e),
        },
        KvCmd::Create {
            key,
            value,
            lease,
            endpoint,
        } => match (value_arg(value), lease) {
            (Ok(v), None) => written(endpoint.store().create(&key, v).await),
            (Ok(v), Some(id)) => written(endpoint.store().put_with_lease(&key, v, &id, true).await),
            (Err(e), _) => fail(e),
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
            Ok(command) => component::apply(endpoint.client(), key, command).await,
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
