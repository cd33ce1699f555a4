//! Live protocol swaps in real clusters: a new protocol component pushed,
//! checked by every voter, activated and rolled back while clients keep
//! reading and writing, and a broken one rolled back on its own.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballot::client::Client;
use ballot::dev::DevCluster;
use ballot::runtime::{PROTOCOL_NEXT_WASM, PROTOCOL_WASM};
use ballot::server::{CoreKind, NodeConfig};
use ballot_sim::check::Input;
use bytes::Bytes;
use common::*;
use hyper::{Method, StatusCode};

async fn push(c: &Client, bytes: &[u8]) -> String {
    let v = c
        .json(
            Method::POST,
            "/v1/components",
            Bytes::copy_from_slice(bytes),
        )
        .await
        .unwrap()
        .unwrap_or_else(|r| panic!("push refused: {}", r.error_message()));
    v["component"]["id"].as_str().unwrap().to_string()
}

async fn post(
    c: &Client,
    path: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let body = if body.is_null() {
        Bytes::new()
    } else {
        body.to_string().into()
    };
    match c.json(Method::POST, path, body).await.unwrap() {
        Ok(v) => Ok(v),
        Err(r) => Err(format!("{} {}", r.status, r.error_message())),
    }
}

async fn protocol(c: &Client) -> serde_json::Value {
    c.json(Method::GET, "/v1/protocol", Bytes::new())
        .await
        .unwrap()
        .unwrap()
}

/// Waits until every replica runs component `id` at `version`.
async fn await_running(cluster: &DevCluster, id: &str, version: &str) {
    for c in clients(cluster) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = protocol(&c).await;
            if v["running"]["label"] == id && v["running"]["view"]["version"] == version {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} never ran {id} {version}: {}",
                c.endpoint(),
                v["running"]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn id_of(bytes: &[u8]) -> String {
    ballot::registry::component_id(bytes)
}

#[test]
fn upgrade_and_rollback_under_load_fail_no_request_and_stay_linearizable() {
    let dir = Scratch::new("upgrade");
    runtime().block_on(async {
        let mut cluster = start(&dir.0, 3).await;
        let c = client(&cluster, 1);
        let next = push(&c, PROTOCOL_NEXT_WASM).await;
        let embedded = id_of(PROTOCOL_WASM);
        await_running(&cluster, &embedded, "0.7.0").await;

        let stop = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn(history_until(
            clients(&cluster),
            6,
            100_000,
            3,
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;

        let v = post(
            &c,
            "/v1/protocol/activate",
            serde_json::json!({ "component": next }),
        )
        .await
        .unwrap();
        assert_eq!(v["active"], next.as_str());
        await_running(&cluster, &next, "0.8.0").await;
        tokio::time::sleep(Duration::from_millis(800)).await;

        let v = post(
            &client(&cluster, 2),
            "/v1/protocol/rollback",
            serde_json::Value::Null,
        )
        .await
        .unwrap();
        assert_eq!(v["active"], embedded.as_str());
        await_running(&cluster, &embedded, "0.7.0").await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        stop.store(true, Ordering::Relaxed);
        let history = load.await.unwrap();
        // The last word on every key, after both swaps.
        for key in 0..3 {
            history
                .run(&client(&cluster, 3), &format!("hot-{key}"), Input::Read)
                .await;
        }
        let (total, known) = history.count();
        let failures = history.failures.load(Ordering::Relaxed);
        assert!(total > 200, "only {total} operations ran across the swaps");
        assert_eq!(
            (failures, known),
            (0, total),
            "{failures} requests failed during the swaps ({known} of {total} known)"
        );
        history.check();
        eprintln!("{total} operations across both swaps, every one answered");

        let status = protocol(&c).await;
        let actions: Vec<&str> = status["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["action"].as_str().unwrap())
            .collect();
        assert_eq!(actions, ["activate", "rollback"]);
        // Each swap started a fresh instance on a new incarnation.
        assert!(status["running"]["incarnation"].as_u64().unwrap() >= 3);
        cluster.stop_all();
    });
}

#[test]
fn a_protocol_that_keeps_trapping_is_rolled_back_automatically() {
    rolled_back_automatically("auto-rollback", "protocol-trap.wasm", "trap", "trapped");
}

/// A protocol component that writes under a key LMDB cannot hold (600
/// bytes) is contained like one that traps: the step is dropped, the
/// instance restarts, the replicas stay up and roll it back. Before, the
/// write reached LMDB, failed the transaction and stopped every replica.
#[test]
fn a_protocol_that_returns_invalid_output_is_contained_and_rolled_back() {
    rolled_back_automatically(
        "invalid-output",
        "protocol-invalid.wasm",
        "invalid",
        "600-byte key",
    );
}

/// Activates the fixture `file` and waits for every replica to be back on
/// the embedded protocol, each staying up; `cause` is the restarts'
/// metric label and `reason` part of the error clients see.
fn rolled_back_automatically(name: &str, file: &str, cause: &str, reason: &str) {
    let dir = Scratch::new(name);
    runtime().block_on(async {
        let mut cluster = start(&dir.0, 3).await;
        let c = client(&cluster, 1);
        assert_eq!(put(&c, "kept", "before").await.status, StatusCode::CREATED);
        let broken = push(
            &c,
            &std::fs::read(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../tests/components")
                    .join(file),
            )
            .unwrap(),
        )
        .await;
        // It passes every check a voter can make before running it.
        post(
            &c,
            "/v1/protocol/activate",
            serde_json::json!({ "component": broken }),
        )
        .await
        .unwrap();

        // Once it runs, every step traps: commands fail with a clear error,
        // the daemons stay up, and within seconds every replica is back on
        // the embedded protocol.
        let embedded = id_of(PROTOCOL_WASM);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut interrupted = 0;
        loop {
            let r = put(&client(&cluster, 2), "during", "x").await;
            if r.status == StatusCode::SERVICE_UNAVAILABLE {
                assert_eq!(
                    r.error_code().as_deref(),
                    Some("interrupted"),
                    "{}",
                    r.error_message()
                );
                assert!(r.error_message().contains("protocol component failed"));
                assert!(r.error_message().contains(reason), "{}", r.error_message());
                interrupted += 1;
            }
            let mut back = 0;
            for c in clients(&cluster) {
                assert!(c.healthy().await, "{} stopped", c.endpoint());
                if protocol(&c).await["running"]["label"] == embedded.as_str() {
                    back += 1;
                }
            }
            if back == 3 {
                break;
            }
            assert!(Instant::now() < deadline, "not rolled back in 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // It ran, and trapped: the replicas restarted it before giving up.
        let mut traps = 0.0;
        for c in clients(&cluster) {
            let name = format!("ballot_protocol_restarts_total{{cause=\"{cause}\"}}");
            traps += metric(&c, &name).await;
        }
        assert!(
            traps >= 3.0,
            "only {traps} traps ({interrupted} commands interrupted)"
        );

        // The rollback is on record, for every replica to follow.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = protocol(&client(&cluster, 3)).await;
            let history = status["history"].as_array().cloned().unwrap_or_default();
            if let Some(last) = history.last().filter(|h| h["action"] == "auto-rollback") {
                assert_eq!(last["from"], broken.as_str());
                assert!(
                    last["reason"].as_str().unwrap().contains("trapped"),
                    "{last}"
                );
                assert_eq!(status["active"], embedded.as_str());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no auto-rollback recorded: {history:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(put(&c, "after", "y").await.status, StatusCode::CREATED);
        expect_value(&client(&cluster, 3), "kept", false, "before", 1).await;
        cluster.stop_all();
    });
}

/// The admin plane fails closed. A `ballot dev` cluster has an admin token
/// (in `admin-token` and the replicas' configurations, readable by the
/// owner only): without it, pushing a component or removing a voter is
/// 401, with it they go through; a replica with no token configured refuses
/// every change, whatever the request carries (403 `admin-disabled`).
/// Reading and writing keys never needs a token.
#[test]
fn admin_changes_need_the_token_and_a_replica_without_one_refuses_them() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Scratch::new("admin");
    runtime().block_on(async {
        let mut cluster = DevCluster::prepare(&dir.0, 3, 0, 0, CoreKind::Wasm, binary()).unwrap();
        let token = std::fs::read_to_string(dir.0.join("admin-token")).unwrap();
        assert_eq!(token.trim().len(), 64, "{token:?}");
        for path in [
            dir.0.join("admin-token"),
            cluster.nodes[0].config_path.clone(),
        ] {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        }
        // Replica 3 is configured without a token (nor a client
        // certificate that may make changes).
        let mut config = NodeConfig::load(&cluster.nodes[2].config_path).unwrap();
        config.admin_token = None;
        config.admin_clients.clear();
        std::fs::write(
            &cluster.nodes[2].config_path,
            toml::to_string(&config).unwrap(),
        )
        .unwrap();
        cluster.start_all().unwrap();
        cluster.wait_all_ready(READY).await.unwrap();
        wait_links_up(&cluster).await;

        // What an admin request got, as (status, error code).
        async fn refused(
            c: &Client,
            method: Method,
            path: &str,
            body: Bytes,
        ) -> (StatusCode, String) {
            let r = c.json(method, path, body).await.unwrap();
            let r = r.expect_err("an admin change without the token went through");
            (r.status, r.error_code().unwrap_or_default())
        }
        let next = || Bytes::from_static(PROTOCOL_NEXT_WASM);
        let unauthorized = (StatusCode::UNAUTHORIZED, "unauthorized".to_string());
        for wrong in [None, Some("not-the-token".to_string())] {
            let c = client(&cluster, 1).with_token(wrong);
            let pushed = refused(&c, Method::POST, "/v1/components", next()).await;
            assert_eq!(pushed, unauthorized);
            let removed = refused(&c, Method::DELETE, "/v1/cluster/members/1", Bytes::new()).await;
            assert_eq!(removed, unauthorized);
            assert!(put(&c, "open", "v").await.status.is_success());
        }
        // Nothing changed: the membership has its three voters, no change queued.
        let members = client(&cluster, 2)
            .json(Method::GET, "/v1/cluster/members", Bytes::new())
            .await
            .unwrap()
            .unwrap();
        let record = &members["record"];
        let len = |v: &serde_json::Value| v.as_array().map(Vec::len);
        assert_eq!(len(&record["replicas"]), Some(3), "{members}");
        assert_eq!(len(&record["queue"]), Some(0), "{members}");
        assert_eq!(record["epoch"], 1, "{members}");

        // The token (what `ballot dev` and its clients use) goes through.
        let id = push(&client(&cluster, 1), PROTOCOL_NEXT_WASM).await;
        assert!(!id.is_empty());

        // Replica 3 has none: refused even with the others' token.
        let c = client(&cluster, 3).with_token(Some(token.trim().to_string()));
        let pushed = refused(&c, Method::POST, "/v1/components", next()).await;
        assert_eq!(
            pushed,
            (StatusCode::FORBIDDEN, "admin-disabled".to_string())
        );
        cluster.stop_all();
    });
}

/// The client API is HTTPS with certificates from the cluster CA. A client
/// certificate from the cluster CA listed in `admin_clients` is an admin
/// credential, as the token is; one from another CA is refused at the
/// handshake; plain HTTP gets no answer; an unauthorised admin request is
/// refused before its body is read.
#[test]
fn the_client_api_is_https_and_client_certificates_authenticate() {
    use ballot::client::Tls;
    let dir = Scratch::new("api-tls");
    runtime().block_on(async {
        let cluster = start(&dir.0, 3).await;
        let certs = dir.0.join("certs");
        let url = cluster.nodes[0].http();
        // Trusting the cluster CA, presenting `name`'s certificate from `dir`.
        let presenting = |dir: &std::path::Path, name: &str| {
            Tls::from_files(
                &ballot::tls::ca_cert_path(&certs),
                Some((
                    &ballot::tls::client_cert_path(dir, name),
                    &ballot::tls::client_key_path(dir, name),
                )),
            )
            .unwrap()
        };
        assert!(url.starts_with("https://"), "{url}");

        // The dev client certificate, no token: admin changes go through.
        let dev = presenting(&certs, "dev");
        let by_cert = Client::with_tls(&url, &dev);
        assert!(!push(&by_cert, PROTOCOL_NEXT_WASM).await.is_empty());

        // Another certificate of the cluster CA, not listed: no admin.
        ballot::tls::issue_client(&certs, "reader").unwrap();
        let reader = presenting(&certs, "reader");
        let c = Client::with_tls(&url, &reader);
        assert!(put(&c, "read/k", "v").await.status.is_success());
        let r = c
            .json(Method::DELETE, "/v1/cluster/members/1", Bytes::new())
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.error_message());
        // Refused before the body is read: a body over the component limit
        // is not what it is told.
        let r = c
            .json(Method::POST, "/v1/components", vec![0u8; 9 << 20].into())
            .await;
        if let Ok(Err(r)) = r {
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.error_message());
        }

        // A client certificate from another CA: the handshake fails.
        let other = dir.0.join("other-ca");
        ballot::tls::init_ca(&other, "other").unwrap();
        ballot::tls::issue_client(&other, "dev").unwrap();
        let foreign = presenting(&other, "dev");
        let e = Client::with_tls(&url, &foreign)
            .get("k", false)
            .await
            .expect_err("a certificate from another CA was accepted");
        assert!(
            e.to_lowercase().contains("certificate") || e.contains("alert"),
            "{e}"
        );
        // A client trusting another CA does not accept the replica.
        let e = Client::with_tls(
            &url,
            &Tls::from_files(&ballot::tls::ca_cert_path(&other), None).unwrap(),
        )
        .get("k", false)
        .await
        .expect_err("the replica's certificate passed for another CA's");
        assert!(
            e.contains("UnknownIssuer") || e.contains("certificate"),
            "{e}"
        );
        // Plain HTTP on the HTTPS port gets no HTTP answer.
        let plain = url.replace("https://", "http://");
        match Client::new(&plain).get("k", false).await {
            Ok(r) => panic!("plain HTTP was answered: {}", r.status),
            Err(e) => assert!(!e.is_empty()),
        }
        // And the replica is still fine.
        assert!(cluster.nodes[0].client().healthy().await);
    });
}

/// Grants give each credential a role and key prefixes. With grants
/// configured, a request without a credential is 401, one whose credential
/// no grant covers for that key or route is 403; a reader reads and never
/// writes, a writer writes under its prefixes only, a client certificate
/// holds the grants of its name, the admin token and `admin_clients`
/// reach every key and the admin plane, and health and metrics stay open
/// for probes. The CLI sends a token given with `--token`.
#[test]
fn grants_hold_each_credential_to_its_role_and_prefixes() {
    use ballot::api::{access::token_sha256, Grant, Role};
    use ballot::client::Tls;
    let dir = Scratch::new("grants");
    runtime().block_on(async {
        let mut cluster = DevCluster::prepare(&dir.0, 3, 0, 0, CoreKind::Wasm, binary()).unwrap();
        let certs = dir.0.join("certs");
        ballot::tls::issue_client(&certs, "svc").unwrap();
        let hash =
            |t: &str| -> String { token_sha256(t).iter().map(|b| format!("{b:02x}")).collect() };
        let grant = |client: Option<&str>, token: Option<&str>, role, prefixes: &[&str]| Grant {
            client: client.map(str::to_string),
            token_sha256: token.map(hash),
            role,
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
        };
        let grants = vec![
            grant(None, Some("reader-token"), Role::Read, &["app/"]),
            grant(
                None,
                Some("writer-token"),
                Role::Write,
                &["app/", "shared/"],
            ),
            grant(Some("svc"), None, Role::Write, &["svc/"]),
        ];
        for node in &mut cluster.nodes {
            let mut config = NodeConfig::load(&node.config_path).unwrap();
            config.grants = grants.clone();
            std::fs::write(&node.config_path, toml::to_string(&config).unwrap()).unwrap();
            node.config = config;
        }
        cluster.start_all().unwrap();
        cluster.wait_all_ready(READY).await.unwrap();
        wait_links_up(&cluster).await;

        let url = cluster.nodes[0].http();
        let ca = ballot::tls::ca_cert_path(&certs);
        let anonymous = Client::with_tls(&url, &Tls::from_files(&ca, None).unwrap());
        let token = |t: &str| anonymous.clone().with_token(Some(t.to_string()));
        let (reader, writer) = (token("reader-token"), token("writer-token"));
        let svc = Client::with_tls(
            &url,
            &Tls::from_files(
                &ca,
                Some((
                    &ballot::tls::client_cert_path(&certs, "svc"),
                    &ballot::tls::client_key_path(&certs, "svc"),
                )),
            )
            .unwrap(),
        );
        let admin = client(&cluster, 1);
        let code = |r: &ballot::client::Response| (r.status, r.error_code());

        // No credential, or one nobody granted: 401, on keys and views.
        for c in [&anonymous, &token("guess")] {
            let r = put(c, "app/a", "x").await;
            assert_eq!(
                code(&r),
                (StatusCode::UNAUTHORIZED, Some("unauthorized".into()))
            );
            let r = c.get("app/a", false).await.unwrap();
            assert_eq!(r.status, StatusCode::UNAUTHORIZED);
            let r = c
                .request(Method::GET, "/v1/cluster", &[], Bytes::new())
                .await
                .unwrap();
            assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        }
        // Probes need nothing.
        for path in ["/healthz", "/readyz", "/metrics"] {
            let r = anonymous
                .request(Method::GET, path, &[], Bytes::new())
                .await
                .unwrap();
            assert_eq!(r.status, StatusCode::OK, "{path}");
        }

        // The writer writes under its prefixes, and nowhere else.
        assert_eq!(put(&writer, "app/a", "1").await.status, StatusCode::CREATED);
        assert_eq!(
            put(&writer, "shared/a", "1").await.status,
            StatusCode::CREATED
        );
        let r = put(&writer, "svc/a", "1").await;
        assert_eq!(code(&r), (StatusCode::FORBIDDEN, Some("forbidden".into())));
        let r = writer.get("svc/a", false).await.unwrap();
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        // A reader reads under its prefix, and writes nothing.
        expect_value(&reader, "app/a", false, "1", 1).await;
        assert_eq!(
            reader.get("shared/a", false).await.unwrap().status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            put(&reader, "app/a", "2").await.status,
            StatusCode::FORBIDDEN
        );
        let r = reader
            .delete("app/a", ballot::client::Precondition::None)
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let r = reader
            .request(Method::GET, "/v1/cluster", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
        // Any grant reads the admin views; none but admin changes them.
        let r = reader
            .request(Method::GET, "/v1/components", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
        let r = writer
            .json(Method::DELETE, "/v1/cluster/members/1", Bytes::new())
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.error_message());
        // The client certificate holds the grants of its name.
        assert_eq!(put(&svc, "svc/a", "1").await.status, StatusCode::CREATED);
        assert_eq!(put(&svc, "app/b", "1").await.status, StatusCode::FORBIDDEN);
        // The admin credentials reach every key.
        assert_eq!(
            put(&admin, "elsewhere", "1").await.status,
            StatusCode::CREATED
        );
        expect_value(&admin, "svc/a", false, "1", 1).await;
        // And a refused write changed nothing.
        expect_value(&admin, "app/a", false, "1", 1).await;
        assert_eq!(
            admin.get("app/b", false).await.unwrap().status,
            StatusCode::NOT_FOUND
        );

        // The CLI sends --token.
        let cli = |args: &[&str]| {
            std::process::Command::new(binary())
                .args(args)
                .args(["--endpoint", &url, "--ca"])
                .arg(&ca)
                .env_remove("BALLOT_ADMIN_TOKEN")
                .env_remove("BALLOT_TOKEN")
                .env("BALLOT_DEV_DIR", dir.0.join("none"))
                .output()
                .unwrap()
        };
        let out = cli(&["kv", "put", "app/cli", "v", "--token", "writer-token"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = cli(&["kv", "put", "app/cli", "v"]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("unauthorized"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.stop_all();
    });
}

#[test]
fn activation_is_refused_when_a_voter_cannot_run_the_component() {
    let dir = Scratch::new("refused");
    runtime().block_on(async {
        let mut cluster = DevCluster::prepare(&dir.0, 3, 0, 0, CoreKind::Wasm, binary()).unwrap();
        // Replica 3 runs the compiled-in protocol: it cannot run components.
        // And every replica wants an admin token for changes.
        for node in &cluster.nodes {
            let mut config = NodeConfig::load(&node.config_path).unwrap();
            if node.id == 3 {
                config.core = CoreKind::Native;
            }
            config.admin_token = Some("s3cret".into());
            std::fs::write(&node.config_path, toml::to_string(&config).unwrap()).unwrap();
        }
        cluster.start_all().unwrap();
        cluster.wait_all_ready(READY).await.unwrap();
        wait_links_up(&cluster).await;

        let anonymous = client(&cluster, 1).with_token(None);
        let r = anonymous
            .json(
                Method::POST,
                "/v1/components",
                Bytes::from_static(PROTOCOL_NEXT_WASM),
            )
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.error_message());
        // Keys need no token.
        assert_eq!(
            put(&anonymous, "open", "v").await.status,
            StatusCode::CREATED
        );

        let c = client(&cluster, 1).with_token(Some("s3cret".into()));
        let next = push(&c, PROTOCOL_NEXT_WASM).await;
        let e = post(
            &c,
            "/v1/protocol/activate",
            serde_json::json!({ "component": next }),
        )
        .await
        .unwrap_err();
        assert!(e.starts_with("400"), "{e}");
        assert!(
            e.contains("replica 3") && e.contains("--core native"),
            "{e}"
        );
        let status = protocol(&client(&cluster, 2)).await;
        assert_eq!(status["active"], id_of(PROTOCOL_WASM).as_str());
        assert_eq!(status["history"][0]["action"], "refused");
        assert!(status["pending"].is_null());

        // A policy is not a protocol, and there is nothing to roll back to.
        let counter = push(
            &c,
            &std::fs::read(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../examples/counter/counter.wasm"),
            )
            .unwrap(),
        )
        .await;
        let e = post(
            &c,
            "/v1/protocol/activate",
            serde_json::json!({ "component": counter }),
        )
        .await
        .unwrap_err();
        assert!(e.contains("not a protocol"), "{e}");
        let e = post(&c, "/v1/protocol/rollback", serde_json::Value::Null)
            .await
            .unwrap_err();
        assert!(e.contains("nothing to roll back to"), "{e}");
        // Writes were never disturbed.
        assert_eq!(put(&c, "k", "v").await.status, StatusCode::CREATED);
        cluster.stop_all();
    });
}

/// `ballot bench --swap` end to end: it swaps a cluster's protocol under
/// load and back, and reports both swaps (speed is reported, not asserted).
#[test]
fn ballot_bench_swap_reports_both_swaps() {
    let dir = Scratch::new("bench-swap");
    let json = dir.0.join("swaps.json");
    let out = std::process::Command::new(binary())
        .args(["bench", "--swap", "--clients", "4", "--secs", "1", "--dir"])
        .arg(dir.0.join("clusters"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("p99 ratio"), "{stdout}");
    let points: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let actions: Vec<&str> = points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["activate", "rollback"]);
    for p in points.as_array().unwrap() {
        assert_eq!(p["errors"], 0, "{p}");
        assert!(p["steady_ops"].as_u64().unwrap() > 0, "{p}");
        assert!(p["during_ops"].as_u64().unwrap() > 0, "{p}");
    }
}

/// The readiness answers an activation collects (one key per replica under
/// `\0ballot/ready/<nonce>/`) are deleted once it is decided, by the
/// activating replica: they were once kept for ever, one set per swap.
#[test]
fn an_activation_deletes_the_readiness_answers_it_collected() {
    let dir = Scratch::new("ready-keys");
    runtime().block_on(async {
        let mut cluster = start(&dir.0, 3).await;
        let c = client(&cluster, 1);
        let next = push(&c, PROTOCOL_NEXT_WASM).await;
        let v = post(
            &c,
            "/v1/protocol/activate",
            serde_json::json!({ "component": next }),
        )
        .await
        .unwrap();
        assert_eq!(v["active"], next.as_str());
        cluster.stop(1, Duration::from_secs(5));
        let data = cluster.nodes[0].config.data_dir.clone();
        let (storage, _) = ballot::storage::Storage::open(&data, 1, 64 << 20).unwrap();
        let prefix = b"\0ballot/ready/";
        let keys: Vec<Vec<u8>> = storage
            .state_keys(None, 100_000)
            .unwrap()
            .into_iter()
            .filter(|k| k.starts_with(prefix))
            .collect();
        assert_eq!(keys.len(), 3, "one answer per replica was written");
        for key in keys {
            let committed = storage.committed(&key).unwrap();
            assert!(
                committed.as_ref().is_some_and(|c| c.value.is_none()),
                "{} still holds {committed:?}",
                String::from_utf8_lossy(&key)
            );
        }
    });
}
