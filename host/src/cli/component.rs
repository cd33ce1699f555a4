//! `ballot component ...`, `ballot policy bind|unbind|list` and `ballot kv
//! apply`: the client side of stored components and policy bindings.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;

use crate::client::{escape_key, Client};

use crate::cli::output::{fail, print_json, report, table, unreachable};

/// `--output json` of a read command that is one API call: its answer.
pub async fn print_api_json(client: Client, path: &str) -> ExitCode {
    match client.json(Method::GET, path, Bytes::new()).await {
        Ok(Ok(v)) => {
            print_json(&v);
            ExitCode::SUCCESS
        }
        Ok(Err(r)) => report(&r),
        Err(e) => unreachable(e),
    }
}

/// `--output json` of a per-replica read: `{"asked", "replicas": [{"id",
/// "http", "link", "role", "answer" | "error"}]}` (and `"members"`, the
/// membership view, with `members`), asking every replica that `client`'s
/// replica lists.
pub async fn print_each_replica_json(client: Client, path: &str, members: bool) -> ExitCode {
    let view = match client.cluster().await {
        Ok(v) => v,
        Err(e) => return unreachable(e),
    };
    let mut replicas = Vec::new();
    for r in view.replicas {
        let mut entry =
            serde_json::json!({ "id": r.id, "http": r.http, "link": r.link, "role": r.role });
        let answer = match &r.http {
            Some(url) => match client.at(url).json(Method::GET, path, Bytes::new()).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(resp)) => Err(format!("{} {}", resp.status, resp.error_message())),
                Err(e) => Err(e),
            },
            None => Err("no HTTP address known".to_string()),
        };
        match answer {
            Ok(v) => entry["answer"] = v,
            Err(e) => entry["error"] = e.into(),
        }
        replicas.push(entry);
    }
    let mut doc = serde_json::json!({ "asked": view.id, "replicas": replicas });
    if members {
        match client
            .json(Method::GET, "/v1/cluster/members", Bytes::new())
            .await
        {
            Ok(Ok(v)) => doc["members"] = v,
            Ok(Err(r)) => return report(&r),
            Err(e) => return unreachable(e),
        }
    }
    print_json(&doc);
    ExitCode::SUCCESS
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// `ballot kv apply KEY COMMAND`.
pub async fn apply(client: Client, key: String, command: Bytes) -> ExitCode {
    match client.apply(&key, command).await {
        Ok(r) if r.status.is_success() => {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            let mut out = std::io::stdout().lock();
            match (&body["value"], body["value_hex"].as_str()) {
                (serde_json::Value::String(text), _) => {
                    let _ = out.write_all(text.as_bytes());
                    if out.is_terminal() && !text.ends_with('\n') {
                        let _ = out.write_all(b"\n");
                    }
                }
                (_, Some(hex)) => {
                    let _ = writeln!(out, "{hex}");
                }
                _ => {}
            }
            let changed = if body["changed"] == true {
                "changed"
            } else {
                "unchanged"
            };
            eprintln!("version {} ({changed})", r.version.unwrap_or(0));
            ExitCode::SUCCESS
        }
        Ok(r) => report(&r),
        Err(e) => unreachable(e),
    }
}

/// `ballot component push FILE`.
pub async fn push(client: Client, file: PathBuf) -> ExitCode {
    let bytes = match std::fs::read(&file) {
        Ok(b) => b,
        Err(e) => return fail(format!("{}: {e}", file.display())),
    };
    match client
        .json(Method::POST, "/v1/components", bytes.into())
        .await
    {
        Ok(Ok(v)) => {
            let c = &v["component"];
            let what = if v["created"] == true {
                "stored"
            } else {
                "already stored"
            };
            println!(
                "{what}: {} {} {} ({} bytes{})",
                c["kind"].as_str().unwrap_or("?"),
                c["name"].as_str().unwrap_or("?"),
                c["version"].as_str().unwrap_or("?"),
                c["size"],
                if c["self_checked"] == true {
                    ", self-check passed"
                } else {
                    ""
                }
            );
            println!("id {}", c["id"].as_str().unwrap_or("?"));
            ExitCode::SUCCESS
        }
        Ok(Err(r)) => report(&r),
        Err(e) => unreachable(e),
    }
}

/// `ballot component list`.
pub async fn list_components(client: Client) -> ExitCode {
    match client
        .json(Method::GET, "/v1/components", Bytes::new())
        .await
    {
        Ok(Ok(v)) => {
            let mut rows = vec![vec![
                "ID".to_string(),
                "KIND".into(),
                "NAME".into(),
                "VERSION".into(),
                "BYTES".into(),
                "BOUND TO".into(),
            ]];
            for c in v["components"].as_array().into_iter().flatten() {
                let bound: Vec<String> = c["bound"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.as_str())
                    .map(|p| format!("{p:?}"))
                    .collect();
                rows.push(vec![
                    short(c["id"].as_str().unwrap_or("?")).to_string(),
                    c["kind"].as_str().unwrap_or("?").into(),
                    c["name"].as_str().unwrap_or("?").into(),
                    c["version"].as_str().unwrap_or("?").into(),
                    c["size"].to_string(),
                    if bound.is_empty() {
                        "-".into()
                    } else {
                        bound.join(", ")
                    },
                ]);
            }
            table(rows);
            ExitCode::SUCCESS
        }
        Ok(Err(r)) => report(&r),
        Err(e) => unreachable(e),
    }
}

/// Polls `path` on every replica the endpoint knows until `done` holds
/// for each (or 20 s pass); prints how many got there.
async fn await_all(
    client: &Client,
    path: &str,
    done: impl Fn(&serde_json::Value) -> bool,
    what: &str,
) -> bool {
    let urls: Vec<String> = match client.cluster().await {
        Ok(view) => view.replicas.into_iter().filter_map(|r| r.http).collect(),
        Err(_) => vec![client.endpoint().to_string()],
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut there = 0;
        for url in &urls {
            let answer = client.at(url).json(Method::GET, path, Bytes::new()).await;
            if matches!(answer, Ok(Ok(ref v)) if done(v)) {
                there += 1;
            }
        }
        if there == urls.len() || Instant::now() > deadline {
            println!("{what} runs on {there} of {} replicas", urls.len());
            return there == urls.len();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every replica runs configuration `version` or newer.
async fn await_everywhere(client: &Client, version: u64) -> bool {
    let done = |v: &serde_json::Value| v["applied_version"].as_u64().unwrap_or(0) >= version;
    let what = format!("configuration version {version}");
    await_all(client, "/v1/policies", done, &what).await
}

/// `ballot policy bind PREFIX ID`.
pub async fn bind(client: Client, prefix: String, component: String) -> ExitCode {
    let body = serde_json::json!({ "prefix": prefix, "component": component });
    match client
        .json(Method::POST, "/v1/policies", body.to_string().into())
        .await
    {
        Ok(Ok(v)) => {
            println!(
                "bound {prefix:?} to {} {} ({})",
                v["name"].as_str().unwrap_or("?"),
                v["version"].as_str().unwrap_or("?"),
                short(v["binding"]["component"].as_str().unwrap_or("?"))
            );
            let version = v["config_version"].as_u64().unwrap_or(0);
            if await_everywhere(&client, version).await {
                ExitCode::SUCCESS
            } else {
                eprintln!("ballot: the others will apply it when they can reach a quorum");
                ExitCode::from(crate::cli::output::UNAVAILABLE)
            }
        }
        Ok(Err(r)) => report(&r),
        Err(e) => unreachable(e),
    }
}

/// `ballot policy unbind PREFIX`.
pub async fn unbind(client: Client, prefix: String) -> ExitCode {
    let path = format!(
        "/v1/policies?prefix={}",
        escape_key(&prefix).replace('/', "%2F")
    );
    match client.json(Method::DELETE, &path, Bytes::new()).await {
        Ok(Ok(v)) => {
            println!("unbound {prefix:?}: its keys use the register policy again");
            let version = v["config_version"].as_u64().unwrap_or(0);
            if await_everywhere(&client, version).await {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(crate::cli::output::UNAVAILABLE)
            }
        }
        Ok(Err(r)) => report(&r),
        Err(e) => unreachable(e),
    }
}

/// `ballot policy list`.
pub async fn list_policies(client: Client) -> ExitCode {
    match client.json(Method::GET, "/v1/policies", Bytes::new()).await {
        Ok(Ok(v)) => {
            let mut rows = vec![vec![
                "PREFIX".to_string(),
                "POLICY".into(),
                "VERSION".into(),
                "COMPONENT".into(),
            ]];
            for b in v["bindings"].as_array().into_iter().flatten() {
                rows.push(vec![
                    format!("{:?}", b["prefix"].as_str().unwrap_or("")),
                    b["name"].as_str().unwrap_or("?").into(),
                    b["version"].as_str().unwrap_or("?").into(),
                    short(b["component"].as_str().unwrap_or("?")).into(),
                ]);
            }
            rows.push(vec![
                "(other keys)".into(),
                "register".into(),
                ballot_core::register::VERSION.into(),
                "embedded".into(),
            ]);
            table(rows);
            println!(
                "replica {} runs configuration version {}",
                v["replica"], v["applied_version"]
            );
            if let Some(e) = v["error"].as_str() {
                println!("not applied yet: {e}");
            }
            ExitCode::SUCCESS
        }
        Ok(Err(r)) => report(&r),
        Err(e) => unreachable(e),
    }
}

/// Waits until every replica runs protocol `label`.
async fn await_protocol(client: &Client, label: &str) -> bool {
    let done = |v: &serde_json::Value| v["running"]["label"] == label;
    await_all(client, "/v1/protocol", done, short(label)).await
}

/// `ballot component activate ID` and `ballot component rollback`.
pub async fn swap(client: Client, component: Option<String>) -> ExitCode {
    let (path, body) = match &component {
        Some(id) => (
            "/v1/protocol/activate",
            serde_json::json!({ "component": id }).to_string(),
        ),
        None => ("/v1/protocol/rollback", String::new()),
    };
    match client.json(Method::POST, path, body.into()).await {
        Ok(Ok(v)) => {
            let label = v["active"].as_str().unwrap_or("?").to_string();
            println!(
                "active protocol: {} (configuration version {})",
                short(&label),
                v["config_version"]
            );
            if await_protocol(&client, &label).await {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(crate::cli::output::UNAVAILABLE)
            }
        }
        Ok(Err(r)) => report(&r),
        Err(e) => unreachable(e),
    }
}

fn ago(at_ms: u64) -> String {
    let secs = crate::system::now_ms().saturating_sub(at_ms) / 1000;
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

fn describe(v: &serde_json::Value, id: Option<&str>) -> String {
    let Some(id) = id else {
        return "-".into();
    };
    let embedded = v["embedded"].as_str() == Some(id);
    let record = v["components"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["id"] == id);
    match (record, embedded) {
        (Some(c), _) => format!(
            "{} {} ({})",
            c["name"].as_str().unwrap_or("?"),
            c["version"].as_str().unwrap_or("?"),
            short(id)
        ),
        (None, true) => format!("embedded ({})", short(id)),
        (None, false) => short(id).to_string(),
    }
}

/// `ballot component status`: each replica's protocol, and the history.
pub async fn protocol_status(client: Client) -> ExitCode {
    let urls: Vec<(u32, Option<String>)> = match client.cluster().await {
        Ok(view) => view.replicas.into_iter().map(|r| (r.id, r.http)).collect(),
        Err(e) => return unreachable(e),
    };
    let mut rows = vec![vec![
        "REPLICA".to_string(),
        "PROTOCOL".into(),
        "COMPONENT".into(),
        "STATE FORMATS".into(),
        "INCARNATION".into(),
    ]];
    let mut cluster: Option<serde_json::Value> = None;
    for (id, url) in urls {
        let answer = match &url {
            Some(url) => client
                .at(url)
                .json(Method::GET, "/v1/protocol", Bytes::new())
                .await
                .ok()
                .and_then(Result::ok),
            None => None,
        };
        match answer {
            Some(v) => {
                let r = &v["running"];
                rows.push(vec![
                    id.to_string(),
                    format!(
                        "{} {}",
                        r["view"]["name"].as_str().unwrap_or("?"),
                        r["view"]["version"].as_str().unwrap_or("?")
                    ),
                    short(r["label"].as_str().unwrap_or("?")).to_string(),
                    r["view"]["state_formats"].to_string(),
                    r["incarnation"].to_string(),
                ]);
                if cluster.is_none() && v.get("active").is_some() {
                    cluster = Some(v);
                }
            }
            None => rows.push(vec![
                id.to_string(),
                "unreachable".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]),
        }
    }
    table(rows);
    let Some(v) = cluster else {
        return fail("no replica could read the cluster's configuration");
    };
    println!();
    println!("active:      {}", describe(&v, v["active"].as_str()));
    let previous = v["previous"]
        .as_array()
        .and_then(|p| p.last())
        .map(|p| p.as_str().or(v["embedded"].as_str()));
    println!(
        "rollback to: {}",
        previous.map_or("-".to_string(), |p| describe(&v, p))
    );
    let history = v["history"].as_array().cloned().unwrap_or_default();
    if !history.is_empty() {
        println!();
        let mut rows = vec![vec![
            "WHEN".to_string(),
            "ACTION".into(),
            "FROM".into(),
            "TO".into(),
            "BY".into(),
            "REASON".into(),
        ]];
        let embedded = v["embedded"].as_str();
        for h in history.iter().rev().take(20) {
            rows.push(vec![
                ago(h["at_ms"].as_u64().unwrap_or(0)),
                h["action"].as_str().unwrap_or("?").into(),
                describe(&v, h["from"].as_str().or(embedded)),
                describe(&v, h["to"].as_str().or(embedded)),
                h["by"].to_string(),
                h["reason"].as_str().unwrap_or("").into(),
            ]);
        }
        table(rows);
    }
    ExitCode::SUCCESS
}
