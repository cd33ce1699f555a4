//! Multi-process tests: real `ballot serve` processes, QUIC with mutual TLS
//! on loopback, LMDB files in a temporary directory, the embedded wasm
//! components. Every test starts its own cluster on free ports and stops it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballot::client::{Client, Precondition, Response, Tls};
use ballot::dev::DevCluster;
use ballot::server::{CoreKind, NodeConfig};
use bytes::Bytes;
use hyper::StatusCode;

mod common;

use common::*;

#[test]
fn writes_through_any_replica_read_back_linearizably_through_every_other() {
    let scratch = Scratch::new("linearizable");
    runtime().block_on(async {
        let cluster = start(&scratch.0, 3).await;
        for i in 0..9u32 {
            let writer = client(&cluster, i % 3 + 1);
            let key = format!("k{i}");
            let r = put(&writer, &key, &format!("v{i}")).await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.error_message());
            for reader in 1..=3 {
                expect_value(&client(&cluster, reader), &key, false, &format!("v{i}"), 1).await;
            }
        }
        // An overwrite through one replica is seen at once through the others.
        let r = put(&client(&cluster, 2), "k0", "v0b").await;
        assert_eq!((r.status, r.version), (StatusCode::OK, Some(2)));
        expect_value(&client(&cluster, 1), "k0", false, "v0b", 2).await;
        expect_value(&client(&cluster, 3), "k0", false, "v0b", 2).await;

        // Concurrent clients on every replica, on two hot keys: the whole
        // history must be linearizable.
        let history = concurrent_history(clients(&cluster), 6, 40, 2).await;
        let (total, known) = history.count();
        assert!(
            known * 10 >= total * 9,
            "too many unknown outcomes: {known} of {total}"
        );
        history.check();
    });
}

#[test]
fn a_crashed_replica_is_not_needed_and_learns_what_it_missed() {
    let scratch = Scratch::new("crash");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 3).await;
        let r = put(&client(&cluster, 3), "before", "x").await;
        assert!(r.status.is_success());
        let incarnation = client(&cluster, 3).cluster().await.unwrap().incarnation;
        cluster.kill(3);
        // Writes keep succeeding through the two survivors.
        for i in 0..12u32 {
            let c = client(&cluster, i % 2 + 1);
            let r = put(&c, &format!("missed-{i}"), &format!("m{i}")).await;
            assert_eq!(
                r.status,
                StatusCode::CREATED,
                "write {i} through {}: {}",
                c.endpoint(),
                r.error_message()
            );
        }
        let r = put(&client(&cluster, 1), "before", "y").await;
        assert_eq!((r.status, r.version), (StatusCode::OK, Some(2)));

        cluster.start(3).unwrap();
        cluster.wait_ready(3, READY).await.unwrap();
        let restarted = client(&cluster, 3);
        assert_eq!(
            restarted.cluster().await.unwrap().incarnation,
            incarnation + 1
        );
        for i in 0..12u32 {
            let key = format!("missed-{i}");
            let value = format!("m{i}");
            expect_value(&restarted, &key, false, &value, 1).await;
            // The linearizable read taught the restarted replica the value.
            expect_value(&restarted, &key, true, &value, 1).await;
        }
        expect_value(&restarted, "before", false, "y", 2).await;
        expect_value(&restarted, "before", true, "y", 2).await;
        // And it takes part in writes again.
        let r = put(&restarted, "after", "z").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.error_message());
    });
}

/// 128 clients each writing 1 MiB through one replica at once, then
/// reading every key at once through each replica: no request fails other
/// than by the request timeout, acknowledged writes read back, and the
/// protocol component never traps.
/// Steps are bounded in bytes (16 MiB of requests and messages), not only
/// in events, so the guest (256 MiB of memory) is never handed 128 MiB of
/// values to copy in one step.
#[test]
fn parallel_mebibyte_writes_do_not_trap_the_protocol() {
    const WRITES: usize = 128;
    let scratch = Scratch::new("parallel-mib");
    runtime().block_on(async {
        let cluster = start(&scratch.0, 3).await;
        let c = client(&cluster, 1);
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..WRITES {
            let c = c.clone();
            writes.spawn(async move {
                let mut value = vec![b'v'; (1 << 20) - 64];
                value[..8].copy_from_slice(&(i as u64).to_be_bytes());
                let r = c
                    .put(&format!("mib/{i}"), Bytes::from(value), Precondition::None)
                    .await
                    .unwrap();
                (i, r)
            });
        }
        // On two shared cores a write may outlast the replica's request
        // timeout (503 `timeout`, maybe applied): that is slow, not lost.
        // Anything else failing is.
        let mut failed = Vec::new();
        let mut acknowledged = Vec::new();
        while let Some(done) = writes.join_next().await {
            let (i, r) = done.unwrap();
            if r.status.is_success() {
                acknowledged.push(i);
            } else if r.error_code().as_deref() != Some("timeout") {
                failed.push(format!("{i}: {} {}", r.status, r.error_message()));
            }
        }
        assert!(
            failed.is_empty(),
            "{} writes failed: {failed:?}",
            failed.len()
        );
        for c in clients(&cluster) {
            for cause in ["trap", "deadline", "invalid"] {
                let name = format!("ballot_protocol_restarts_total{{cause=\"{cause}\"}}");
                assert_eq!(metric(&c, &name).await, 0.0, "{}: {name}", c.endpoint());
            }
        }
        assert!(
            acknowledged.len() >= WRITES / 2,
            "only {} acknowledged",
            acknowledged.len()
        );
        // Then every key read at once, linearizably, through each replica:
        // each read loads its key's state (a mebibyte or more) into the
        // protocol, so a step is bounded by the bytes of the states it
        // loads too, not only by those of its requests (tiny here).
        for c in clients(&cluster) {
            let mut reads = tokio::task::JoinSet::new();
            for &i in &acknowledged {
                let c = c.clone();
                reads.spawn(async move { (i, c.get(&format!("mib/{i}"), false).await.unwrap()) });
            }
            while let Some(done) = reads.join_next().await {
                let (i, r) = done.unwrap();
                if r.error_code().as_deref() == Some("timeout") {
                    continue;
                }
                assert_eq!(r.status, StatusCode::OK, "mib/{i}: {}", r.error_message());
                assert_eq!(r.body[..8], (i as u64).to_be_bytes());
            }
        }
        let mut deferred = 0.0;
        for c in clients(&cluster) {
            for cause in ["trap", "deadline", "invalid"] {
                let name = format!("ballot_protocol_restarts_total{{cause=\"{cause}\"}}");
                assert_eq!(
                    metric(&c, &name).await,
                    0.0,
                    "{} after reads: {name}",
                    c.endpoint()
                );
            }
            deferred += metric(&c, "ballot_step_keys_deferred_total").await;
        }
        assert!(deferred > 0.0, "no step reached the bound on key states");
    });
}

/// A replica that is down holds back its peers' changelog truncation, and
/// the changelog now holds (seq, key, version) instead of a copy of every
/// value: 256 writes of 1 MiB to one key while a replica is down leave its
/// peers' LMDB files near the size of a few values, where each entry used
/// to keep its own copy (256 MiB per peer).
#[test]
fn a_replica_that_is_down_does_not_make_its_peers_keep_copies_of_values() {
    const WRITES: usize = 256;
    let scratch = Scratch::new("changelog-bytes");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 3).await;
        cluster.kill(3);
        let c = client(&cluster, 1);
        for i in 0..WRITES {
            let mut value = vec![b'v'; (1 << 20) - 64];
            value[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let r = c
                .put("big", Bytes::from(value), Precondition::None)
                .await
                .unwrap();
            assert!(r.status.is_success(), "write {i}: {}", r.error_message());
        }
        let file = |id: usize| cluster.nodes[id - 1].config.data_dir.join("data.mdb");
        for id in [1, 2] {
            let bytes = std::fs::metadata(file(id)).unwrap().len();
            assert!(
                bytes < 64 << 20,
                "replica {id}'s LMDB file is {} MiB after {WRITES} writes of 1 MiB to one key",
                bytes >> 20
            );
        }
        // Nothing was lost to the missing copies: the replica that was down
        // learns the newest value.
        cluster.start(3).unwrap();
        cluster.wait_ready(3, READY).await.unwrap();
        let got = client(&cluster, 3).get("big", false).await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "{}", got.error_message());
        assert_eq!(got.body[..8], ((WRITES - 1) as u64).to_be_bytes());
        cluster.stop_all();
    });
}

#[test]
fn histories_stay_linearizable_while_a_replica_crashes_and_restarts() {
    let scratch = Scratch::new("crash-under-load");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 3).await;
        let load = tokio::spawn(concurrent_history(clients(&cluster), 6, 60, 3));
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.kill(2);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        cluster.start(2).unwrap();
        cluster.wait_ready(2, READY).await.unwrap();
        let history = load.await.unwrap();
        let (total, known) = history.count();
        eprintln!("{total} operations recorded, {known} with a known outcome");
        assert!(total >= 200, "the load stalled: {total} operations");
        assert!(
            known * 2 >= total,
            "too many unknown outcomes: {known} of {total}"
        );
        history.check();
    });
}

#[test]
fn every_acknowledged_write_survives_restarting_all_replicas() {
    let scratch = Scratch::new("restart-all");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 3).await;
        let acked: Arc<Mutex<HashMap<String, (String, u64)>>> = Arc::default();
        let mut tasks = Vec::new();
        for w in 0..6u32 {
            let c = client(&cluster, w % 3 + 1);
            let acked = acked.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..25u32 {
                    // Own keys, and one key every writer overwrites.
                    for key in [format!("w{w}-{}", i % 5), "shared".to_string()] {
                        let value = format!("w{w}-i{i}");
                        let r = put(&c, &key, &value).await;
                        assert!(r.status.is_success(), "{}", r.error_message());
                        let version = r.version.unwrap();
                        let mut acked = acked.lock().unwrap();
                        let e = acked.entry(key).or_insert((String::new(), 0));
                        if version > e.1 {
                            *e = (value, version);
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Crash every replica at once, then bring them all back.
        for id in 1..=3 {
            cluster.kill(id);
        }
        cluster.start_all().unwrap();
        cluster.wait_all_ready(READY).await.unwrap();
        // The kill came within the log's applier delay (10 ms) of the last
        // acknowledgements: some replica held records in its log that
        // LMDB did not, and applied them when it opened (design section
        // 7, "Order of durability"). The reads below need them.
        let replayed = (1..=3).filter(|&id| {
            std::fs::read_to_string(cluster.log_path(id))
                .unwrap_or_default()
                .contains("applied the log records lmdb did not hold yet")
        });
        assert!(replayed.count() > 0, "no replica had records to replay");
        let acked = acked.lock().unwrap().clone();
        assert_eq!(acked.len(), 31);
        for (i, (key, (value, version))) in acked.iter().enumerate() {
            let c = client(&cluster, i as u32 % 3 + 1);
            expect_value(&c, key, false, value, *version).await;
        }
    });
}

/// A cluster stopped together (SIGTERM to every replica right after its
/// last writes were acknowledged, as `ballot dev`'s Ctrl-C does) keeps
/// them in every replica's own copy: each writes the decisions it held in
/// memory before it exits (design section 2, "Held decisions"), so after
/// the restart a local read at the replica that answered finds every
/// write, with no consensus read or changelog replay first. A follower
/// may be stopped before the last write's `Learn` reaches it (it leaves
/// with the client's answer): it holds its vote, not the decision, and
/// learns the decision from the changelog replay after the restart.
#[test]
fn a_cluster_stopped_together_keeps_its_last_writes_in_every_copy() {
    let scratch = Scratch::new("stopped-together");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 3).await;
        let keys: Vec<String> = (0..8).map(|i| format!("last-{i}")).collect();
        let c = client(&cluster, 1);
        for key in &keys {
            let r = put(&c, key, "v").await;
            assert!(r.status.is_success(), "{key}: {}", r.error_message());
        }
        cluster.stop_all();
        cluster.start_all().unwrap();
        cluster.wait_all_ready(READY).await.unwrap();
        for key in &keys {
            expect_value(&c, key, true, "v", 1).await;
        }
        for c in &clients(&cluster)[1..] {
            for key in &keys {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let r = c.get(key, true).await.unwrap();
                    if r.version == Some(1) && r.body[..] == b"v"[..] {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{} never had {key} locally: {}",
                        c.endpoint(),
                        r.error_message()
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        cluster.stop_all();
    });
}

#[test]
fn a_storage_failure_stops_the_replica_answering_and_the_others_carry_on() {
    let scratch = Scratch::new("storage-failure");
    runtime().block_on(async {
        let mut cluster =
            DevCluster::prepare(&scratch.0, 3, 0, 0, CoreKind::Wasm, binary()).unwrap();
        // Replica 3 gets an LMDB map of 1 MiB: it fills after a few writes.
        let node = &mut cluster.nodes[2];
        node.config.map_size_mib = Some(1);
        std::fs::write(&node.config_path, toml::to_string(&node.config).unwrap()).unwrap();
        cluster.start_all().unwrap();
        cluster.wait_all_ready(READY).await.unwrap();
        wait_links_up(&cluster).await;
        let three = client(&cluster, 3);
        let value = "v".repeat(100_000);
        let mut acked = Vec::new();
        for i in 0..40 {
            let key = format!("big-{i}");
            let r = put(&client(&cluster, i % 2 + 1), &key, &value).await;
            assert!(r.status.is_success(), "write {i}: {}", r.error_message());
            acked.push(key);
            if !three.healthy().await {
                break;
            }
        }
        // Replica 3 stopped answering, saying why, instead of guessing.
        let r = three
            .request(hyper::Method::GET, "/healthz", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "replica 3 never failed its writes"
        );
        assert!(
            r.error_message().contains("storage write failed"),
            "{}",
            r.error_message()
        );
        let r = three.get("big-0", false).await.unwrap();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.error_code().as_deref(), Some("replica-stopped"));
        // The process is still up, and the other two keep serving everything.
        assert!(cluster.exited().is_none());
        for key in &acked {
            expect_value(&client(&cluster, 1), key, false, &value, 1).await;
        }
        let r = put(&client(&cluster, 2), "after", "ok").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.error_message());
    });
}

/// Replaces replica 3's TLS files in its configuration.
fn set_tls(cluster: &mut DevCluster, id: u32, ca: &Path, cert: &Path, key: &Path) {
    let node = &mut cluster.nodes[id as usize - 1];
    let mut config: NodeConfig = NodeConfig::load(&node.config_path).unwrap();
    config.tls.ca = ca.to_path_buf();
    config.tls.cert = cert.to_path_buf();
    config.tls.key = key.to_path_buf();
    std::fs::write(&node.config_path, toml::to_string(&config).unwrap()).unwrap();
}

async fn wait_for_metric(c: &Client, prefix: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = metric(c, prefix).await;
        if v > 0.0 || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn peers_without_a_valid_certificate_are_refused() {
    use ballot::tls;
    let scratch = Scratch::new("certs");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 3).await;
        let certs = cluster.dir.join("certs");
        let (ca, cert3, key3) = (
            tls::ca_cert_path(&certs),
            tls::node_cert_path(&certs, 3),
            tls::node_key_path(&certs, 3),
        );

        // Replica 3 comes back with a certificate from another CA.
        cluster.stop(3, Duration::from_secs(5));
        let rogue = cluster.dir.join("rogue");
        tls::init_ca(&rogue, "rogue").unwrap();
        tls::issue_node(&rogue, 3).unwrap();
        set_tls(
            &mut cluster,
            3,
            &tls::ca_cert_path(&rogue),
            &tls::node_cert_path(&rogue, 3),
            &tls::node_key_path(&rogue, 3),
        );
        cluster.start(3).unwrap();
        // Alive, but cut off: it cannot load the configuration, so it
        // never becomes ready.
        cluster.wait_alive(3, READY).await.unwrap();
        let one = client(&cluster, 1);
        let refused =
            wait_for_metric(&one, "ballot_peer_refused_total{reason=\"handshake\"}").await;
        assert!(
            refused > 0.0,
            "replica 1 did not refuse the foreign certificate"
        );
        let log = std::fs::read_to_string(cluster.log_path(1)).unwrap();
        assert!(
            log.contains("refused a peer connection"),
            "replica 1 did not log the refusal"
        );
        // The cluster serves without it; the impostor reaches no quorum.
        let r = put(&one, "k", "v").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.error_message());
        let r = put(&client(&cluster, 3), "k2", "v").await;
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            r.error_message()
        );
        // Replica 1's link to it goes down once the old connection times
        // out, and every redial is refused.
        let deadline = Instant::now() + Duration::from_secs(20);
        while one.cluster().await.unwrap().replicas[2].link != ballot_client::views::Link::Down {
            assert!(
                Instant::now() < deadline,
                "the link to the impostor stayed up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // A certificate from the right CA that names another replica.
        cluster.stop(3, Duration::from_secs(5));
        set_tls(
            &mut cluster,
            3,
            &ca,
            &tls::node_cert_path(&certs, 2),
            &tls::node_key_path(&certs, 2),
        );
        cluster.start(3).unwrap();
        cluster.wait_alive(3, READY).await.unwrap();
        let refused = wait_for_metric(&one, "ballot_peer_refused_total{reason=\"identity\"}").await;
        assert!(
            refused > 0.0,
            "replica 1 accepted replica 2's certificate from replica 3"
        );

        // With its own certificate back, replica 3 rejoins.
        cluster.stop(3, Duration::from_secs(5));
        set_tls(&mut cluster, 3, &ca, &cert3, &key3);
        cluster.start(3).unwrap();
        cluster.wait_ready(3, READY).await.unwrap();
        let r = put(&client(&cluster, 3), "k3", "v").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.error_message());
        expect_value(&client(&cluster, 3), "k", false, "v", 1).await;
    });
}

/// Opens a replica link to `addr` as replica `as_id` and sends `frames` raw.
async fn send_raw_frames(
    dir: &Path,
    as_id: u32,
    to: u32,
    addr: std::net::SocketAddr,
    frames: &[u8],
) {
    use ballot::tls::{self, Identity, TlsFiles};
    let certs = dir.join("certs");
    let identity = Identity::load(&TlsFiles {
        ca: tls::ca_cert_path(&certs),
        cert: tls::node_cert_path(&certs, as_id),
        key: tls::node_key_path(&certs, as_id),
    })
    .unwrap();
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(identity.client_config().unwrap())
            .unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let connection = endpoint
        .connect(addr, &tls::node_name(to))
        .unwrap()
        .await
        .unwrap();
    let mut stream = connection.open_uni().await.unwrap();
    stream.write_all(frames).await.unwrap();
    let _ = stream.finish();
    // The replica closes the connection when it reads the bad frame.
    let closed = tokio::time::timeout(Duration::from_secs(10), connection.closed()).await;
    assert!(
        closed.is_ok(),
        "the replica kept a connection that sent a malformed frame"
    );
    endpoint.close(0u32.into(), b"");
}

#[test]
fn malformed_requests_and_frames_get_clear_errors_and_the_daemon_stays_up() {
    let scratch = Scratch::new("malformed");
    runtime().block_on(async {
        let cluster = start(&scratch.0, 3).await;
        let c = client(&cluster, 1);
        let call =
            |method: &str, path: &str, headers: Vec<(&'static str, String)>, body: Vec<u8>| {
                let c = c.clone();
                let method = hyper::Method::from_bytes(method.as_bytes()).unwrap();
                let path = path.to_string();
                async move {
                    c.request(method, &path, &headers, Bytes::from(body))
                        .await
                        .unwrap()
                }
            };
        let cases: Vec<(Response, StatusCode, &str)> = vec![
            (
                call("PUT", "/v1/kv/big", vec![], vec![b'x'; (1 << 20) + 1]).await,
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
            ),
            (
                call(
                    "PUT",
                    "/v1/kv/a",
                    vec![("if-match", "three".into())],
                    b"v".to_vec(),
                )
                .await,
                StatusCode::BAD_REQUEST,
                "bad-precondition",
            ),
            (
                call(
                    "PUT",
                    "/v1/kv/a",
                    vec![("if-none-match", "\"1\"".into())],
                    b"v".to_vec(),
                )
                .await,
                StatusCode::BAD_REQUEST,
                "bad-precondition",
            ),
            (
                call(
                    "PUT",
                    "/v1/kv/a",
                    vec![("if-match", "\"1\"".into()), ("if-none-match", "*".into())],
                    b"v".to_vec(),
                )
                .await,
                StatusCode::BAD_REQUEST,
                "bad-precondition",
            ),
            (
                call("GET", "/v1/kv/a?consistency=eventual", vec![], vec![]).await,
                StatusCode::BAD_REQUEST,
                "bad-parameter",
            ),
            (
                call(
                    "GET",
                    &format!("/v1/kv/{}", "k".repeat(512)),
                    vec![],
                    vec![],
                )
                .await,
                StatusCode::BAD_REQUEST,
                "bad-key",
            ),
            (
                call("GET", "/v1/kv/%FF%FE", vec![], vec![]).await,
                StatusCode::BAD_REQUEST,
                "bad-key",
            ),
            (
                call("GET", "/v1/nothing", vec![], vec![]).await,
                StatusCode::NOT_FOUND,
                "not-found",
            ),
            (
                call("GET", "/v1/kv/absent", vec![], vec![]).await,
                StatusCode::NOT_FOUND,
                "not-found",
            ),
        ];
        for (i, (r, status, code)) in cases.iter().enumerate() {
            assert_eq!(
                (r.status, r.error_code().as_deref()),
                (*status, Some(*code)),
                "case {i}: {:?}",
                r.body
            );
        }
        // A peer with a valid certificate that sends garbage is disconnected.
        let addr = cluster.nodes[0].config.peer_addr;
        // A hello of another frame format, a hello of the wrong size, a
        // frame longer than any allowed.
        let mut bad_format = vec![0, 0, 0, 6, 9, 1];
        bad_format.extend_from_slice(&2u32.to_be_bytes());
        send_raw_frames(&cluster.dir, 2, 1, addr, &bad_format).await;
        let mut bad_body = vec![0, 0, 0, 9, 1, 1];
        bad_body.extend_from_slice(&[0, 0, 0, 2, 7, 7, 7]);
        send_raw_frames(&cluster.dir, 2, 1, addr, &bad_body).await;
        send_raw_frames(&cluster.dir, 2, 1, addr, &u32::MAX.to_be_bytes()).await;
        let malformed = metric(&c, "ballot_peer_refused_total{reason=\"malformed\"}").await;
        assert_eq!(malformed, 3.0);
        // A hello without a data-directory identity (a build from before
        // them) cannot stand in for replica 2, whose directory replica 1
        // knows, even with replica 2's certificate.
        let mut legacy = vec![0, 0, 0, 6, 1, 1];
        legacy.extend_from_slice(&2u32.to_be_bytes());
        legacy.extend_from_slice(&[0, 0, 0, 6, 1, 2, 0, 0, 0, 0]);
        send_raw_frames(&cluster.dir, 2, 1, addr, &legacy).await;
        let refused = metric(&c, "ballot_peer_refused_total{reason=\"data-directory\"}").await;
        assert_eq!(refused, 1.0);
        // Still up, still serving, nothing lost.
        assert!(c.healthy().await);
        let r = put(&c, "after", "ok").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.error_message());
        expect_value(&client(&cluster, 2), "after", false, "ok", 1).await;
    });
}

#[test]
fn ballot_dev_keeps_serving_when_a_replica_dies_and_stops_on_ctrl_c() {
    use std::io::BufRead;
    let scratch = Scratch::new("dev");
    let dir = scratch.0.join("cluster");
    let mut dev = std::process::Command::new(binary())
        .args([
            "dev",
            "--nodes",
            "3",
            "--http-port",
            "0",
            "--peer-port",
            "0",
            "--dir",
        ])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Nobody reads its reports: a closed stderr (and, below, a closed
    // stdout) must not stop ballot dev.
    drop(dev.stderr.take());
    let stdout = std::io::BufReader::new(dev.stdout.take().unwrap());
    let mut lines = Vec::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        let done = line.starts_with("cluster:");
        lines.push(line);
        if done {
            break;
        }
    }
    assert_eq!(lines.len(), 6, "{lines:?}");
    for (i, line) in lines[..3].iter().enumerate() {
        assert!(
            line.starts_with(&format!("node {}: https://127.0.0.1:", i + 1)),
            "{line}"
        );
    }
    assert!(lines[3].starts_with("CA: "), "{}", lines[3]);
    assert!(lines[4].starts_with("admin token: "), "{}", lines[4]);
    // The pipe closes here (the reader is gone): ballot dev must carry on.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).unwrap()).unwrap();
    let nodes = manifest["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    let urls: Vec<String> = nodes
        .iter()
        .map(|n| n["http"].as_str().unwrap().to_string())
        .collect();
    let pids: Vec<i32> = nodes
        .iter()
        .map(|n| n["pid"].as_i64().unwrap() as i32)
        .collect();
    // The cluster serves HTTPS with certificates from its own CA.
    let tls = Tls::from_files(&dir.join("certs/ca.pem"), None).unwrap();
    let at = |url: &str| Client::with_tls(url, &tls);
    runtime().block_on(async {
        let r = put(&at(&urls[0]), "hello", "world").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.error_message());
        expect_value(&at(&urls[2]), "hello", false, "world", 1).await;
    });
    let state = |id: usize| -> (String, Option<i64>) {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).unwrap()).unwrap();
        let n = &m["nodes"][id - 1];
        (n["state"].as_str().unwrap().to_string(), n["pid"].as_i64())
    };
    let wait_state = |id: usize, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while state(id).0 != want {
            assert!(
                Instant::now() < deadline,
                "replica {id} never {want}: {:?}",
                state(id)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // A replica crashes: ballot dev reports it and the others keep serving.
    unsafe {
        libc::kill(pids[2], libc::SIGKILL);
    }
    wait_state(3, "exited");
    assert!(
        dev.try_wait().unwrap().is_none(),
        "ballot dev stopped with its replica"
    );
    runtime().block_on(async {
        let r = put(&at(&urls[1]), "during", "crash").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.error_message());
    });
    // The user brings it back, then plays with another.
    let dev_cmd = |args: &[&str]| {
        let out = std::process::Command::new(binary())
            .arg("dev")
            .args(args)
            .arg("--dir")
            .arg(&dir)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, said) = dev_cmd(&["start", "3"]);
    assert!(ok && said.contains("replica 3 started"), "{said}");
    assert_eq!(state(3).0, "running");
    let new_pid = state(3).1.unwrap() as i32;
    runtime().block_on(async {
        // It serves again once it has loaded its configuration.
        let three = at(&urls[2]);
        let deadline = Instant::now() + READY;
        loop {
            let r = three.get("during", false).await.unwrap();
            if r.status == StatusCode::OK {
                assert_eq!(&r.body[..], b"crash");
                break;
            }
            assert!(Instant::now() < deadline, "{}", r.error_message());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let (ok, said) = dev_cmd(&["stop", "2"]);
    assert!(ok && said.contains("replica 2 stopped"), "{said}");
    assert_eq!(state(2), ("stopped".to_string(), None));
    let (ok, said) = dev_cmd(&["stop", "2"]);
    assert!(!ok && said.contains("not running"), "{said}");
    let (ok, said) = dev_cmd(&["restart", "9"]);
    assert!(!ok && said.contains("no replica 9"), "{said}");
    let pids = vec![pids[0], pids[1], new_pid];
    // Ctrl-C.
    unsafe {
        libc::kill(dev.id() as i32, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = dev.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "ballot dev did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    for pid in pids {
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "replica process {pid} outlived ballot dev");
    }
    assert!(!dir.join("cluster.json").exists());
}

#[test]
fn ballot_bench_measures_local_clusters_and_writes_json_and_svg() {
    let scratch = Scratch::new("bench");
    let json = scratch.0.join("bench.json");
    let svg = scratch.0.join("bench.svg");
    let output = std::process::Command::new(binary())
        .args([
            "bench",
            "--workloads",
            "create,cas",
            "--clients",
            "1,4",
            "--secs",
            "0.5",
        ])
        .args(["--core", "wasm,native", "--dir"])
        .arg(scratch.0.join("clusters"))
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("ballot-wasm/ballot-native"), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let points = report["points"].as_array().unwrap();
    assert_eq!(points.len(), 2 * 2 * 2);
    for p in points {
        assert!(p["ops"].as_u64().unwrap() > 0, "{p}");
        assert_eq!(p["errors"].as_u64(), Some(0), "{p}");
        assert!(
            p["breakdown"]["guest_us_per_op"].as_f64().unwrap() > 0.0,
            "{p}"
        );
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("create: throughput"));
    // The clusters it started are gone with their directory.
    assert!(!scratch.0.join("clusters").exists());
}

/// `ballot dev --wan` lays the replicas out as the topology file says:
/// each is printed with its region, a write through Oregon's replica takes
/// at least the 40 ms round trip to its nearest quorum (a physical lower
/// bound the relays impose, not a speed), `ballot dev isolate 3` cuts it off
/// (its writes are refused) and `ballot dev heal` brings it back.
#[test]
fn ballot_dev_wan_places_replicas_in_regions_and_cuts_links_on_command() {
    use std::io::BufRead;
    let scratch = Scratch::new("dev-wan");
    let dir = scratch.0.join("cluster");
    let topology =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wan/3-regions.toml");
    let mut dev = std::process::Command::new(binary())
        .arg("dev")
        .arg("--wan")
        .arg(&topology)
        .args(["--http-port", "0", "--peer-port", "0", "--dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(dev.stdout.take().unwrap());
    let mut lines = Vec::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        let done = line.starts_with("cluster:");
        lines.push(line);
        if done {
            break;
        }
    }
    for (i, region) in ["virginia", "ohio", "oregon"].iter().enumerate() {
        assert!(
            lines[i].starts_with(&format!("node {} ({region}): https://127.0.0.1:", i + 1)),
            "{lines:?}"
        );
    }
    let config = std::fs::read_to_string(dir.join("node-3.toml")).unwrap();
    assert!(config.contains("fast_timeout_ms = 111"), "{config}");
    let url = |i: usize| lines[i].split(": ").nth(1).unwrap().to_string();
    let tls = Tls::from_files(&dir.join("certs/ca.pem"), None).unwrap();
    let oregon = Client::with_tls(&url(2), &tls);
    let dev_cmd = |args: &[&str]| {
        let out = std::process::Command::new(binary())
            .arg("dev")
            .args(args)
            .arg("--dir")
            .arg(&dir)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}");
        said
    };
    runtime().block_on(async {
        let all: Vec<Client> = (0..3).map(|i| Client::with_tls(&url(i), &tls)).collect();
        wait_links_up_of(&all).await;
        for i in 0..5 {
            let started = Instant::now();
            let r = put(&oregon, &format!("far-{i}"), "v").await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.error_message());
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(40),
                "a write from Oregon took {took:?}"
            );
        }
        let said = dev_cmd(&["isolate", "3"]);
        assert!(said.contains("replica 3 is cut off"), "{said}");
        let r = oregon
            .put("cut", bytes::Bytes::from_static(b"x"), Precondition::None)
            .await
            .unwrap();
        assert!(
            r.status.is_server_error(),
            "{} {}",
            r.status,
            r.error_message()
        );
        let said = dev_cmd(&["heal"]);
        assert!(said.contains("every link is up"), "{said}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = put(&oregon, "healed", "v").await;
            if r.status.is_success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} {}",
                r.status,
                r.error_message()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    unsafe {
        libc::kill(dev.id() as i32, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while dev.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "ballot dev did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ballot bench --wan` reports every point per region, with each region's
/// physical floor, and no region's create is faster than its floor (the
/// relays' delays are applied: a lower bound, not a speed).
#[test]
fn ballot_bench_wan_reports_each_region_against_its_floor() {
    let scratch = Scratch::new("bench-wan");
    let json = scratch.0.join("wan.json");
    let svg = scratch.0.join("wan.svg");
    let topology =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wan/3-regions.toml");
    let output = std::process::Command::new(binary())
        .arg("bench")
        .arg("--wan")
        .arg(&topology)
        .args(["--workloads", "create,get", "--clients", "1", "--secs", "1"])
        .args(["--core", "wasm", "--dir"])
        .arg(scratch.0.join("clusters"))
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("p50/floor"), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let floors: Vec<(String, f64)> = report["wan"]["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["floor_ms"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        floors,
        vec![
            ("virginia".into(), 10.0),
            ("ohio".into(), 10.0),
            ("oregon".into(), 40.0)
        ]
    );
    let points = report["points"].as_array().unwrap();
    assert_eq!(points.len(), 2 * 3);
    for p in points {
        assert!(p["ops"].as_u64().unwrap() > 0, "{p}");
        let region = p["region"].as_str().unwrap();
        let floor = floors.iter().find(|(r, _)| r == region).unwrap().1;
        if p["workload"] == "create" {
            assert!(
                p["p50_ms"].as_f64().unwrap() >= floor,
                "faster than light: {p}"
            );
        }
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("oregon: p50"));
}

/// A replica whose data directory is lost must not vote with a blank memory
/// (docs/design.md, section 7, "Identity"). Replica 3 misses a write that 1
/// and 2 acknowledge; 1 and 2 crash; 2's directory is lost. Started again on
/// a blank directory, 2 would form a quorum with 3 that has never seen the
/// write: a read through 3 would miss it and a create through 2 would choose
/// another value at the same version. Its peers know 2's directory by its
/// identity and refuse the new one, so nothing is answered until 1 is back,
/// and then the acknowledged value is read.
#[test]
fn a_replica_that_lost_its_data_directory_does_not_vote() {
    let scratch = Scratch::new("amnesia");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 3).await;
        // Every pair has exchanged messages (and so identities).
        let r = put(&client(&cluster, 1), "warm", "up").await;
        assert!(r.status.is_success(), "{}", r.error_message());
        cluster.kill(3);
        let r = put(&client(&cluster, 1), "amnesia2", "acknowledged").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.error_message());
        assert_eq!(r.version, Some(1));
        cluster.kill(1);
        cluster.kill(2);
        let data = cluster.nodes[1].config.data_dir.clone();
        std::fs::remove_dir_all(&data).unwrap();
        cluster.start(2).unwrap();
        cluster.start(3).unwrap();
        // Replica 3 refuses the new directory, and replica 2, which waits
        // for every start-up peer to accept it before it votes, stops and
        // says why. Replica 3 alone answers no client.
        let refused = "ballot_peer_refused_total{reason=\"data-directory\"}";
        let three = client(&cluster, 3);
        let deadline = Instant::now() + READY;
        while three.cluster().await.is_err() {
            assert!(Instant::now() < deadline, "replica 3 does not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(wait_for_metric(&three, refused).await >= 1.0);
        let deadline = Instant::now() + READY;
        while cluster.running(2) {
            cluster.exited();
            assert!(Instant::now() < deadline, "replica 2 runs on");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = std::fs::read_to_string(cluster.log_path(2)).unwrap();
        assert!(
            log.contains("knows replica 2 by another data directory"),
            "replica 2 stopped without saying why: {log}"
        );
        let r = client(&cluster, 3).get("amnesia2", false).await.unwrap();
        assert_ne!(
            r.status,
            StatusCode::NOT_FOUND,
            "a read missed an acknowledged write"
        );
        assert!(!r.status.is_success(), "no quorum may answer: {}", r.status);
        // Every 5xx says whether a retry could apply a write twice.
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["maybe_applied"], false, "{body}");
        // Replica 1 comes back: 1 and 3 are a quorum that holds the write.
        cluster.start(1).unwrap();
        cluster.wait_ready(1, READY).await.unwrap();
        cluster.wait_ready(3, READY).await.unwrap();
        expect_value(&client(&cluster, 3), "amnesia2", false, "acknowledged", 1).await;
    });
}

/// A new data directory votes only once every start-up peer has taken its
/// hello: peers trust the first directory they see for an id, so one that
/// never heard from a replica would take an emptied directory of it for a
/// new one and form a quorum with it that misses acknowledged writes (the
/// simulator found this: `ballot-sim --nodes 3`, seeds 1089 and 1288).
/// Before this rule, replicas 1 and 3 of a new cluster served without ever
/// hearing from 2.
#[test]
fn a_new_directory_waits_for_every_start_up_peer_before_it_votes() {
    let scratch = Scratch::new("admission");
    runtime().block_on(async {
        let mut cluster =
            DevCluster::prepare(&scratch.0, 3, 0, 0, CoreKind::Wasm, binary()).unwrap();
        cluster.start(1).unwrap();
        cluster.start(3).unwrap();
        // A quorum is up, and still neither answers: replica 2 has not
        // accepted their directories. (Three seconds is far more than two
        // replicas on loopback need to elect and serve.)
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            for id in [1, 3] {
                let r = client(&cluster, id)
                    .put("first", Bytes::from("x"), Precondition::None)
                    .await;
                assert!(
                    r.map_or(true, |r| !r.status.is_success()),
                    "replica {id} served before replica 2 accepted its directory"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let log = std::fs::read_to_string(cluster.log_path(1)).unwrap();
        assert!(log.contains("votes once every start-up peer"), "{log}");
        cluster.start(2).unwrap();
        cluster.wait_all_ready(READY).await.unwrap();
        let r = put(&client(&cluster, 1), "first", "x").await;
        assert!(r.status.is_success(), "{}", r.error_message());
        // Admitted for good: replica 1 restarts and serves with 2 down.
        cluster.kill(2);
        cluster.kill(1);
        cluster.start(1).unwrap();
        cluster.wait_ready(1, READY).await.unwrap();
        expect_value(&client(&cluster, 1), "first", false, "x", 1).await;
    });
}

/// `ballot-client` end to end: typed answers for each kind of write, a
/// create that can be sent twice, and failover when the first endpoint's
/// replica is down (its connection is refused, so nothing was applied and
/// the next endpoint gets the request).
#[test]
fn the_typed_client_answers_in_types_and_fails_over() {
    use ballot_client::{Error, Retry};
    let scratch = Scratch::new("typed-client");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 3).await;
        let store = ballot_client::Client::new(cluster.nodes.iter().map(|n| n.http()))
            .with_tls(&cluster.nodes[0].tls())
            .with_retry(Retry {
                attempts: 4,
                backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(100),
            });
        let w = store.put("t/a", "one").await.unwrap();
        assert_eq!((w.version, w.changed, w.created), (1, true, true));
        let e = store.get("t/a").await.unwrap().unwrap();
        assert_eq!((e.value.as_ref(), e.version), (&b"one"[..], 1));
        match store.cas("t/a", 7, "two").await {
            Err(Error::Refused { code, current, .. }) => {
                assert_eq!(code, "version-mismatch");
                let current = current.expect("the refusal names the current state");
                assert_eq!(current.version, 1);
                assert_eq!(current.value.as_deref(), Some(&b"one"[..]));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(store.cas("t/a", 1, "two").await.unwrap().version, 2);
        let first = store.create("t/lock", "owner-a").await.unwrap();
        let again = store.create("t/lock", "owner-a").await.unwrap();
        assert!(first.changed && !again.changed, "{first:?} {again:?}");
        assert!(matches!(
            store.create("t/lock", "owner-b").await,
            Err(Error::Refused { code, .. }) if code == "conflict"
        ));
        assert_eq!(store.delete("t/lock").await.unwrap(), Some(2));
        assert_eq!(store.delete("t/lock").await.unwrap(), None);
        assert_eq!(store.get("t/lock").await.unwrap(), None);

        cluster.kill(1);
        // Let the client's pool see the kept-alive connection to replica 1
        // close. A write sent on it in the instant after the kill cannot
        // be told from one the replica received before dying, so it fails
        // as maybe applied and is not retried (seen once over TLS, where
        // the close arrives as an error a moment later).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let w = store.put("t/b", "after").await.unwrap();
        assert_eq!(w.version, 1);
        assert_ne!(store.endpoint(), cluster.nodes[0].http());
        let e = store.get("t/b").await.unwrap().unwrap();
        assert_eq!(e.value.as_ref(), b"after");
    });
}

/// A replica that forwards a key's command to the key's leader names the
/// leader in `Ballot-Leader`; the typed client sends the key's next
/// requests there, and a replica that leads the key names nobody.
#[test]
fn a_forwarding_replica_names_the_leader_and_the_client_goes_there() {
    let scratch = Scratch::new("leader-hints");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 3).await;
        let raw = clients(&cluster);
        let urls: Vec<String> = cluster.nodes.iter().map(|n| n.http()).collect();
        // Writers at every replica at once make the key contended: one
        // replica wins a classic round and keeps leading it.
        let mut leader = None;
        for _ in 0..20 {
            let mut writers = Vec::new();
            for c in &raw {
                let c = c.clone();
                writers.push(tokio::spawn(async move {
                    for i in 0..10 {
                        put(&c, "hint/k", &format!("v{i}")).await;
                    }
                }));
            }
            for w in writers {
                w.await.unwrap();
            }
            let mut named = Vec::new();
            for c in &raw {
                let r = put(c, "hint/k", "probe").await;
                assert!(r.status.is_success(), "{}", r.error_message());
                named.push(r.leader);
            }
            let hints: Vec<&String> = named.iter().flatten().collect();
            if hints.len() == 2 && hints[0] == hints[1] {
                let at = urls
                    .iter()
                    .position(|u| u == hints[0])
                    .expect("a member's URL");
                assert_eq!(named[at], None, "the leader names nobody: {named:?}");
                leader = Some(at);
                break;
            }
        }
        let leader = leader.expect("a replica came to lead the contended key");
        let other = (leader + 1) % 3;

        // The typed client starts at a replica that does not lead the key.
        let mut order = vec![other, leader, (leader + 2) % 3];
        order.dedup();
        let store = ballot_client::Client::new(order.iter().map(|&i| urls[i].clone()))
            .with_tls(&cluster.nodes[0].tls());
        let count = "ballot_request_duration_seconds_count{op=\"command\"}";
        let before = (
            metric(&raw[other], count).await,
            metric(&raw[leader], count).await,
        );
        for i in 0..5 {
            store.put("hint/k", format!("routed {i}")).await.unwrap();
        }
        let after = (
            metric(&raw[other], count).await,
            metric(&raw[leader], count).await,
        );
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (1.0, 4.0),
            "the first write went to replica {}, the rest to the leader {}",
            other + 1,
            leader + 1
        );
        let e = store.get("hint/k").await.unwrap().unwrap();
        assert_eq!(e.value.as_ref(), b"routed 4");

        // The leader dies: the key's writes go on through the others
        // rather than stay with the routed endpoint (a write that may have
        // applied is reported so, never retried: `put` is not idempotent).
        cluster.kill(leader as u32 + 1);
        // Let the pool see the kept-alive connection close (see
        // `the_typed_client_answers_in_types_and_fails_over`).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut written = Vec::new();
        let last = loop {
            let value = format!("after {}", written.len());
            written.push(value.clone());
            match store.put("hint/k", value.clone()).await {
                Ok(_) => break value,
                Err(ballot_client::Error::Unavailable { .. }) if Instant::now() < deadline => {}
                Err(e) => panic!("writing after the leader died: {e:?}"),
            }
        };
        let e = store.get("hint/k").await.unwrap().unwrap();
        let now = String::from_utf8_lossy(&e.value).into_owned();
        assert!(written.contains(&now), "{now:?} is none of {written:?}");
        // Once the write that succeeded is known, later ones stay.
        store.put("hint/k", "settled").await.unwrap();
        let e = store.get("hint/k").await.unwrap().unwrap();
        assert_eq!(e.value.as_ref(), b"settled", "after {last:?}");
    });
}

/// The CLI's read commands print one JSON document with `--output json`,
/// and its exit codes say what happened; `ballot completions` prints a
/// script for the shell.
#[test]
fn read_commands_print_json_for_scripts() {
    let scratch = Scratch::new("cli-json");
    runtime().block_on(async {
        let cluster = start(&scratch.0, 3).await;
        let endpoint = cluster.nodes[1].http();
        let cli = |args: &[&str]| {
            std::process::Command::new(binary())
                .args(args)
                .args(["--endpoint", &endpoint])
                .env("BALLOT_CA", &cluster.nodes[1].config.tls.ca)
                .output()
                .unwrap()
        };
        let out = cli(&["kv", "put", "j/k", "v1"]);
        assert!(out.status.success(), "{out:?}");
        let json = |out: &std::process::Output| -> serde_json::Value {
            serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
        };
        let out = cli(&["--output", "json", "kv", "get", "j/k"]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            json(&out),
            serde_json::json!({ "key": "j/k", "version": 1, "value": "v1" })
        );
        let out = cli(&["kv", "get", "j/absent", "--output", "json"]);
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(json(&out)["value"], serde_json::Value::Null);
        let out = cli(&["kv", "cas", "j/k", "9", "v2"]);
        assert_eq!(out.status.code(), Some(4), "{out:?}");

        let out = cli(&["cluster", "status", "--output", "json"]);
        assert!(out.status.success(), "{out:?}");
        // One document: every replica's view, and the membership.
        let status = json(&out);
        let replicas = status["replicas"].as_array().unwrap();
        assert_eq!(replicas.len(), 3);
        assert!(
            replicas.iter().all(|r| r["answer"]["healthy"] == true),
            "{status}"
        );
        assert!(status["members"].get("record").is_some(), "{status}");

        for args in [
            &["component", "list", "--output", "json"][..],
            &["policy", "list", "--output", "json"][..],
            &["component", "status", "--output", "json"][..],
        ] {
            let out = cli(args);
            assert!(out.status.success(), "{args:?}: {out:?}");
            json(&out);
        }
    });
    let out = std::process::Command::new(binary())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("complete -F"));
    // A reader that goes away early (`| head -1`) ends the command quietly,
    // as it ends any Unix tool, not with a panic on the broken pipe.
    let mut child = std::process::Command::new(binary())
        .args(["completions", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Asks replica `to` at `addr` one membership question as replica `as_id`
/// (its certificate from the cluster CA, `directory` in its hello) and
/// returns the answer's JSON.
async fn ask_raw(
    dir: &Path,
    as_id: u32,
    directory: [u8; 16],
    to: u32,
    addr: std::net::SocketAddr,
    question: serde_json::Value,
) -> serde_json::Value {
    use ballot::tls::{self, Identity, TlsFiles};
    let certs = dir.join("certs");
    let identity = Identity::load(&TlsFiles {
        ca: tls::ca_cert_path(&certs),
        cert: tls::node_cert_path(&certs, as_id),
        key: tls::node_key_path(&certs, as_id),
    })
    .unwrap();
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(identity.client_config().unwrap())
            .unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let connection = endpoint
        .connect(addr, &tls::node_name(to))
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let frame = |out: &mut Vec<u8>, kind: u8, body: &[u8]| {
        out.extend_from_slice(&(body.len() as u32 + 2).to_be_bytes());
        out.extend_from_slice(&[1, kind]);
        out.extend_from_slice(body);
    };
    let mut hello = as_id.to_be_bytes().to_vec();
    hello.extend_from_slice(&directory);
    let mut out = Vec::new();
    frame(&mut out, 1, &hello);
    frame(&mut out, 4, question.to_string().as_bytes());
    send.write_all(&out).await.unwrap();
    let _ = send.finish();
    let answer = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
        .await
        .expect("an answer in time")
        .expect("an answer frame");
    endpoint.close(0u32.into(), b"");
    assert!(
        answer.len() > 6 && answer[5] == 5,
        "not an answer frame: {answer:?}"
    );
    serde_json::from_slice(&answer[6..]).unwrap()
}

/// A certificate from the cluster CA says who asks, not that it may: a
/// replica that is not a member gets no answer to any membership question
/// but "what is your committed record", and a member's question about an epoch the replica does not know (here
/// u64::MAX, which once marked every later sweep done) is refused.
#[test]
fn membership_questions_are_answered_only_for_members_and_known_epochs() {
    use ballot::tls;
    let scratch = Scratch::new("forged-questions");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 3).await;
        let certs = cluster.dir.join("certs");
        tls::issue_node(&certs, 9).unwrap();
        let addr = cluster.nodes[0].config.peer_addr;
        let dir = cluster.dir.clone();
        let forged_sweep = serde_json::json!({ "format": 1, "ask": "sweep", "epoch": u64::MAX });
        for question in [
            forged_sweep.clone(),
            serde_json::json!({ "format": 1, "ask": "keys", "after": null, "limit": 10 }),
            serde_json::json!({ "format": 1, "ask": "status" }),
        ] {
            let answer = ask_raw(&dir, 9, [9; 16], 1, addr, question.clone()).await;
            assert_eq!(answer["answer"], "error", "{question} -> {answer}");
            assert!(
                answer["message"].as_str().unwrap().contains("not a member"),
                "{answer}"
            );
        }
        // The committed record is answered to anyone certified: a replica
        // removed while it was down learns of its removal this way.
        let answer = ask_raw(
            &dir,
            9,
            [9; 16],
            1,
            addr,
            serde_json::json!({ "format": 1, "ask": "members" }),
        )
        .await;
        assert_eq!(answer["answer"], "members", "{answer}");

        // Replica 2 itself, stopped, impersonated with its certificate and
        // its data directory's identity: a member, but not of that epoch.
        cluster.stop(2, Duration::from_secs(5));
        let data = cluster.nodes[1].config.data_dir.clone();
        let identity = {
            let (storage, _) = ballot::storage::Storage::open(&data, 2, 64 << 20).unwrap();
            storage.identity()
        };
        let answer = ask_raw(&dir, 2, identity, 1, addr, forged_sweep).await;
        assert_eq!(answer["answer"], "error", "{answer}");
        assert!(
            answer["message"].as_str().unwrap().contains("newer than"),
            "{answer}"
        );
        let answer = ask_raw(
            &dir,
            2,
            identity,
            1,
            addr,
            serde_json::json!({ "format": 1, "ask": "status" }),
        )
        .await;
        assert_eq!(answer["answer"], "status", "{answer}");
        assert_ne!(answer["swept"], serde_json::json!(u64::MAX), "{answer}");

        // The cluster is unharmed: replica 2 comes back and serves.
        cluster.start(2).unwrap();
        cluster.wait_ready(2, READY).await.unwrap();
        let r = put(&client(&cluster, 2), "after", "v").await;
        assert!(r.status.is_success(), "{}", r.error_message());
    });
}

/// One exit-code table for every client command: 5 when no replica
/// answers, 2 for a usage error, whichever command family it is.
#[test]
fn every_client_command_exits_5_when_no_replica_answers() {
    // Port 1 on loopback: nothing listens, the connection is refused.
    let endpoint = "http://127.0.0.1:1";
    for args in [
        &["kv", "get", "k"][..],
        &["kv", "put", "k", "v"][..],
        &["kv", "delete", "k"][..],
        &["cluster", "status"][..],
        &["cluster", "remove", "--id", "2"][..],
        &["component", "list"][..],
        &["component", "status"][..],
        &["component", "rollback"][..],
        &["policy", "list"][..],
        &["policy", "unbind", "p/"][..],
    ] {
        let out = std::process::Command::new(binary())
            .args(args)
            .args(["--endpoint", endpoint])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(5), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("ballot: "),
            "{args:?}: {out:?}"
        );
    }
    let out = std::process::Command::new(binary())
        .args(["kv", "get"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// A client that sends a request head one byte at a time keeps its
/// connection from going idle, but not past the head timeout
/// (`http_header_secs`, 2 here, under an idle limit of 5): the replica
/// closes it. Before, every byte reset the idle timer and the connection
/// held its slot for as long as the client kept trickling. The same for a
/// body (`http_body_secs`): while a request is in flight its connection is
/// never idle, so before the body deadline a client sending a byte now and
/// then held a connection and a task for ever. (Plain HTTP on this replica, so the test can
/// write raw bytes.)
#[test]
fn a_client_trickling_a_request_head_or_body_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let scratch = Scratch::new("trickle");
    runtime().block_on(async {
        let mut cluster =
            DevCluster::prepare(&scratch.0, 3, 0, 0, CoreKind::Wasm, binary()).unwrap();
        let path = cluster.nodes[0].config_path.clone();
        let mut config = NodeConfig::load(&path).unwrap();
        config.api_tls = None;
        config.api_plaintext = true;
        config.admin_clients.clear();
        config.http_idle_secs = Some(5);
        config.http_header_secs = Some(2);
        config.http_body_secs = Some(2);
        config.admin_token = Some("t0ken".into());
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        cluster.nodes[0].config = config.clone();
        cluster.start_all().unwrap();
        cluster.wait_all_ready(READY).await.unwrap();

        let mut s = tokio::net::TcpStream::connect(config.http_addr)
            .await
            .unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        let mut closed = None;
        let header = b"x-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
        'trickle: for round in 0.. {
            for &b in header.iter() {
                if started.elapsed() > Duration::from_secs(12) {
                    break 'trickle;
                }
                if s.write_all(&[b]).await.is_err() {
                    closed = Some(started.elapsed());
                    break 'trickle;
                }
                let mut buf = [0u8; 256];
                match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        closed = Some(started.elapsed());
                        break 'trickle;
                    }
                    Ok(Ok(n)) => panic!("answered a head never finished: {:?}", &buf[..n]),
                    Err(_) => {}
                }
            }
            let _ = round;
        }
        let closed = closed.expect("a trickled head kept its connection for 12 s");
        eprintln!("closed after {closed:?}");
        assert!(closed >= Duration::from_secs(2), "{closed:?}");

        // A whole head, then a body a byte at a time: the request is in
        // flight, so the idle limit never fires; the body deadline
        // (`http_body_secs`, 2 here) answers 408 and closes. The same for
        // a value and for an admin request's JSON.
        let heads: [&[u8]; 2] = [
            b"PUT /v1/kv/slow HTTP/1.1\r\nhost: x\r\ncontent-length: 200\r\n\r\n",
            b"POST /v1/policies HTTP/1.1\r\nhost: x\r\nauthorization: Bearer t0ken\r\n\
              content-type: application/json\r\ncontent-length: 200\r\n\r\n",
        ];
        for head in heads {
            let mut s = tokio::net::TcpStream::connect(config.http_addr)
                .await
                .unwrap();
            s.write_all(head).await.unwrap();
            let started = Instant::now();
            let mut answer = Vec::new();
            while started.elapsed() < Duration::from_secs(12) {
                if s.write_all(b" ").await.is_err() {
                    break;
                }
                let mut buf = [0u8; 512];
                match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
                    Err(_) => {}
                }
            }
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                answer.starts_with("HTTP/1.1 408") && answer.contains("body-timeout"),
                "a trickled body was answered {answer:?} after {:?}",
                started.elapsed()
            );
            assert!(started.elapsed() < Duration::from_secs(12));
        }
        let r = tokio::net::TcpStream::connect(config.http_addr).await;
        assert!(r.is_ok());
        // A client that sends its head at once is served.
        let mut s = tokio::net::TcpStream::connect(config.http_addr)
            .await
            .unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        cluster.stop_all();
    });
}

/// Idle connections cannot starve a replica: with its descriptors limited
/// to 256, replica 1 gets up to 2000 connections (as many as its accept
/// queue takes, more than 256) that send nothing and stay open.
/// Each holds a slot for at most `http_idle_secs` (1 here), connections
/// past `http_connections_max` (64 here) are closed as they are accepted,
/// so descriptors never run out, and a well-behaved client that tries again
/// is served within seconds while the 2000 are still open on its side. A
/// request that waits longer than the idle limit keeps its connection.
#[test]
fn idle_connections_do_not_stop_a_well_behaved_client() {
    let scratch = Scratch::new("idle-connections");
    runtime().block_on(async {
        let mut cluster =
            DevCluster::prepare(&scratch.0, 3, 0, 0, CoreKind::Wasm, binary()).unwrap();
        let path = cluster.nodes[0].config_path.clone();
        let mut config = NodeConfig::load(&path).unwrap();
        config.http_connections_max = Some(64);
        config.http_idle_secs = Some(1);
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        cluster.start_all().unwrap();
        cluster.wait_all_ready(READY).await.unwrap();
        wait_links_up(&cluster).await;
        let pid = cluster.nodes[0].pid().unwrap() as libc::pid_t;
        let limit = libc::rlimit {
            rlim_cur: 256,
            rlim_max: 256,
        };
        // SAFETY: prlimit reads `limit` and writes nothing (null old limit).
        let set = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
        assert_eq!(set, 0, "prlimit: {}", std::io::Error::last_os_error());

        let addr = cluster.nodes[0].config.http_addr;
        // A connect that does not complete in a second means the accept
        // queue is full (that is the point), or that this shared machine is
        // busy: three in a row end the flood.
        let mut idle = Vec::new();
        let mut failed = 0;
        while idle.len() < 2000 && failed < 3 {
            let connect = tokio::net::TcpStream::connect(addr);
            match tokio::time::timeout(Duration::from_secs(1), connect).await {
                Ok(Ok(s)) => {
                    idle.push(s);
                    failed = 0;
                }
                _ => failed += 1,
            }
        }
        assert!(idle.len() > 256, "only {} connections opened", idle.len());

        let c = client(&cluster, 1).with_token(None);
        let deadline = Instant::now() + Duration::from_secs(20);
        let served = loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(2),
                c.put("served", Bytes::from_static(b"yes"), Precondition::None),
            )
            .await;
            match attempt {
                Ok(Ok(r)) if r.status.is_success() => break true,
                _ if Instant::now() > deadline => break false,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        assert!(
            served,
            "replica 1 served nobody with {} idle connections open",
            idle.len()
        );
        drop(idle);
        expect_value(&client(&cluster, 2), "served", false, "yes", 1).await;

        // A request in flight keeps its connection past the idle limit:
        // without a quorum, a write waits seconds for its answer (503), not
        // for the connection to be cut after 1 s.
        cluster.kill(2);
        cluster.kill(3);
        let started = Instant::now();
        let r = c
            .put("alone", Bytes::from_static(b"v"), Precondition::None)
            .await
            .expect("the connection was cut while the request waited");
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            r.error_message()
        );
        assert!(
            started.elapsed() > Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        cluster.stop_all();
    });
}

/// Replica 3 is cut off from its peers while clients run on all three
/// replicas: relays in front of every peer port drop each packet to and
/// from it (real QUIC between real processes; the links, not the
/// processes, fail). The other two keep serving; a write through the
/// isolated one fails within the request timeout instead of hanging, and
/// nothing it answers is stale (the whole history, reads through replica 3
/// included, is checked for linearizability); once the links heal it
/// serves what was written without it, linearizably and then from its own
/// copy.
#[test]
fn an_isolated_replica_serves_nothing_stale_and_catches_up() {
    let scratch = Scratch::new("isolated");
    runtime().block_on(async {
        let (mut cluster, fabric) = start_relayed(&scratch.0, 3).await;

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = tokio::spawn(history_until(
            clients(&cluster),
            6,
            1_000_000,
            4,
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        fabric.isolate(3);
        let isolated = Instant::now();

        let (c1, c3) = (client(&cluster, 1), client(&cluster, 3));
        let started = Instant::now();
        let r = c3
            .put("probe", Bytes::from_static(b"x"), Precondition::None)
            .await;
        let waited = started.elapsed();
        eprintln!(
            "a write through the isolated replica: {:?} after {waited:?}",
            r.as_ref().map(|r| (r.status, r.error_code()))
        );
        assert!(
            matches!(&r, Ok(r) if r.status.is_server_error()),
            "a write through the isolated replica: {:?}",
            r.map(|r| r.status)
        );
        assert!(waited < Duration::from_secs(12), "{waited:?}");
        // Once its links are down (QUIC's idle timeout, 3 s), the isolated
        // replica knows it reaches no quorum and says so at once, before
        // the request reaches the protocol.
        tokio::time::sleep(Duration::from_secs(4).saturating_sub(isolated.elapsed())).await;
        let started = Instant::now();
        let r = c3
            .put("probe-2", Bytes::from_static(b"x"), Precondition::None)
            .await
            .unwrap();
        let waited = started.elapsed();
        eprintln!("then: {} {:?} after {waited:?}", r.status, r.error_code());
        assert_eq!(r.error_code().as_deref(), Some("no-quorum"));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["maybe_applied"], false, "{body}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        let r = put(&c1, "during", "1").await;
        assert!(r.status.is_success(), "{}", r.error_message());

        tokio::time::sleep(Duration::from_secs(6).saturating_sub(isolated.elapsed())).await;
        fabric.heal();
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let history = load.await.unwrap();
        history.check();
        let (ops, known) = history.count();
        eprintln!(
            "{ops} operations, {known} with a known outcome; relays {:?}",
            fabric.counts()
        );
        assert!(known > 50, "only {known} of {ops} operations finished");
        assert!(fabric.counts().1 > 0, "the relays dropped nothing");

        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = c3.get("during", false).await.unwrap();
            if r.status == StatusCode::OK {
                assert_eq!(&r.body[..], b"1");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} {}",
                r.status,
                r.error_message()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = c3.get("during", true).await.unwrap();
            if r.status == StatusCode::OK {
                assert_eq!(&r.body[..], b"1");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica 3's own copy never caught up: {}",
                r.status
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        cluster.stop_all();
    });
}

/// A one-way partition (replica 1 hears nothing from replica 2, while 2
/// hears 1), then a flapping link (2 and 3 cut off from each other and
/// joined again every 150 ms), under clients on every replica: every
/// history stays linearizable, and the cluster keeps finishing operations.
#[test]
fn one_way_and_flapping_links_keep_histories_linearizable() {
    let scratch = Scratch::new("flapping");
    runtime().block_on(async {
        let (mut cluster, fabric) = start_relayed(&scratch.0, 3).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = tokio::spawn(history_until(
            clients(&cluster),
            6,
            1_000_000,
            4,
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        fabric.switch(2, 1, false);
        tokio::time::sleep(Duration::from_secs(3)).await;
        fabric.heal();
        let flapping = Instant::now();
        let mut up = true;
        while flapping.elapsed() < Duration::from_secs(3) {
            up = !up;
            fabric.switch(2, 3, up);
            fabric.switch(3, 2, up);
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        fabric.heal();
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let history = load.await.unwrap();
        history.check();
        let (ops, known) = history.count();
        eprintln!(
            "{ops} operations, {known} with a known outcome; relays {:?}",
            fabric.counts()
        );
        assert!(known > 50, "only {known} of {ops} operations finished");
        assert!(fabric.counts().1 > 0, "the relays dropped nothing");
        let r = put(&client(&cluster, 2), "after", "1").await;
        assert!(r.status.is_success(), "{}", r.error_message());
        cluster.stop_all();
    });
}

/// Listing a prefix: 500 keys under two prefixes written through all three
/// replicas (half of them written twice, some deleted), then each prefix
/// listed through each replica a page of 37 at a time. Every key with a
/// value comes exactly once, in order, with its newest value and version;
/// nothing from the other prefix, no deleted key. The listing begins right
/// after the last write is acknowledged, with no settling: a key that only
/// a quorum holds is still found. `consistency=local` lists a replica's own
/// copy; the CLI follows the pages.
#[test]
fn a_prefix_lists_every_key_once_with_its_newest_value_through_every_replica() {
    let scratch = Scratch::new("listing");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 3).await;
        let http = clients(&cluster);
        let mut expected: [std::collections::BTreeMap<String, (String, u64)>; 2] =
            Default::default();
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..500usize {
            let c = http[i % 3].clone();
            writes.spawn(async move {
                let side = i % 2;
                let key = format!("{}/{i:04}", ["app", "apq"][side]);
                let mut version = 0;
                let rounds = if i % 4 < 2 { 2 } else { 1 };
                for round in 0..rounds {
                    let r = put(&c, &key, &format!("v{round}-{i}")).await;
                    assert!(r.status.is_success(), "{key}: {}", r.error_message());
                    version = r.version.unwrap();
                }
                let deleted = i % 25 == 0;
                if deleted {
                    let r = c.delete(&key, Precondition::None).await.unwrap();
                    assert!(r.status.is_success(), "{key}: {}", r.error_message());
                }
                (side, key, format!("v{}-{i}", rounds - 1), version, deleted)
            });
        }
        while let Some(done) = writes.join_next().await {
            let (side, key, value, version, deleted) = done.unwrap();
            if !deleted {
                expected[side].insert(key, (value, version));
            }
        }
        assert_eq!(expected[0].len() + expected[1].len(), 480);
        for (n, node) in cluster.nodes.iter().enumerate() {
            let store = ballot_client::Client::new([node.http()]).with_tls(&node.tls());
            for (side, prefix) in ["app/", "apq/"].into_iter().enumerate() {
                let mut listed = Vec::new();
                let mut after: Option<String> = None;
                let mut pages = 0;
                loop {
                    let page = store
                        .list(prefix, after.as_deref(), 37, false)
                        .await
                        .unwrap();
                    assert!(page.items.len() <= 37);
                    pages += 1;
                    listed.extend(page.items);
                    match page.next {
                        Some(next) => after = Some(next),
                        None => break,
                    }
                }
                assert!(pages >= 240 / 37, "{pages} pages");
                let got: Vec<(String, (String, u64))> = listed
                    .into_iter()
                    .map(|(k, e)| (k, (String::from_utf8(e.value.to_vec()).unwrap(), e.version)))
                    .collect();
                let want: Vec<(String, (String, u64))> =
                    expected[side].clone().into_iter().collect();
                assert_eq!(got, want, "{prefix} through replica {}", n + 1);
            }
        }
        // A replica's own copy, once it has every commit.
        let store =
            ballot_client::Client::new([cluster.nodes[2].http()]).with_tls(&cluster.nodes[2].tls());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let page = store.list("app/", None, 1000, true).await.unwrap();
            let got: Vec<String> = page.items.into_iter().map(|(k, _)| k).collect();
            let want: Vec<String> = expected[0].keys().cloned().collect();
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica 3's copy lists {} keys",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The empty prefix lists every key.
        let all = store.list("", None, 1000, false).await.unwrap();
        assert_eq!(all.items.len(), 480, "next {:?}", all.next);
        // The CLI follows the pages.
        let out = std::process::Command::new(binary())
            .args(["kv", "list", "apq/", "--output", "json", "--endpoint"])
            .arg(cluster.nodes[1].http())
            .arg("--ca")
            .arg(&cluster.nodes[1].config.tls.ca)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let docs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(docs.len(), expected[1].len());
        assert_eq!(docs[0]["key"], expected[1].keys().next().unwrap().as_str());
        let r = http[0]
            .request(
                hyper::Method::GET,
                "/v1/kv?prefix=%00ballot",
                &[],
                Bytes::new(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST);

        // Keys written while replica 3 was down, listed through replica 3
        // as soon as it is back: its own copy lacks them, the quorum's
        // listing does not.
        cluster.kill(3);
        for i in 0..20 {
            let r = put(&http[0], &format!("late/{i:02}"), "x").await;
            assert!(r.status.is_success(), "{}", r.error_message());
        }
        cluster.start(3).unwrap();
        cluster.wait_ready(3, READY).await.unwrap();
        let store =
            ballot_client::Client::new([cluster.nodes[2].http()]).with_tls(&cluster.nodes[2].tls());
        let local = store.list("late/", None, 1000, true).await.unwrap();
        eprintln!("replica 3's own copy lists {} late keys", local.items.len());
        let page = store.list("late/", None, 1000, false).await.unwrap();
        assert_eq!(page.items.len(), 20, "{:?}", page.items);
        assert_eq!(page.next, None);
        cluster.stop_all();
    });
}

/// Watching a prefix through replica 1: writes through all three replicas
/// arrive as events, each key's versions in order, nothing from outside the
/// prefix, positions (`seq`) rising; a watcher that goes away and comes
/// back with `from` gets what was written meanwhile and nothing it saw; a
/// position never held is 410, one past the changelog 400. Of two watchers
/// while 24 MiB of values are written, the one that stops reading is
/// closed by the idle limit (10 s here, heartbeats every 5 s) and the one
/// that reads is kept.
#[test]
fn a_watcher_sees_every_commit_in_order_and_resumes_without_gaps() {
    let scratch = Scratch::new("watch");
    runtime().block_on(async {
        let mut cluster =
            DevCluster::prepare(&scratch.0, 3, 0, 0, CoreKind::Wasm, binary()).unwrap();
        let path = cluster.nodes[0].config_path.clone();
        let mut config = NodeConfig::load(&path).unwrap();
        config.http_idle_secs = Some(10);
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        cluster.nodes[0].config = config;
        cluster.start_all().unwrap();
        cluster.wait_all_ready(READY).await.unwrap();
        wait_links_up(&cluster).await;
        let http = clients(&cluster);
        let c1 = client(&cluster, 1);
        let parse = |data: &str| -> serde_json::Value { serde_json::from_str(data).unwrap() };

        let mut events = c1
            .events("/v1/watch?prefix=w/", &[])
            .await
            .unwrap()
            .unwrap();
        let keys = ["w/a", "w/b", "w/c"];
        for v in 1..=8u64 {
            for (i, key) in keys.iter().enumerate() {
                let r = put(&http[i], key, &v.to_string()).await;
                assert!(r.status.is_success(), "{}", r.error_message());
            }
            put(&http[0], "x/other", "1").await;
        }
        let mut last: HashMap<String, u64> = HashMap::new();
        let mut seq = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while keys.iter().any(|k| last.get(*k).copied().unwrap_or(0) < 8) {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = tokio::time::timeout(left, events.next())
                .await
                .unwrap_or_else(|_| panic!("events stopped at {last:?}"))
                .unwrap()
                .unwrap();
            assert_eq!(e.event, "message");
            let d = parse(&e.data);
            let key = d["key"].as_str().unwrap().to_string();
            let version = d["version"].as_u64().unwrap();
            assert!(key.starts_with("w/"), "{d}");
            assert!(
                version > last.get(&key).copied().unwrap_or(0),
                "{d} after {last:?}"
            );
            assert_eq!(d["value"], version.to_string(), "{d}");
            let s = d["seq"].as_u64().unwrap();
            assert!(s > seq, "{d} after seq {seq}");
            assert_eq!(e.id.as_deref(), Some(s.to_string().as_str()));
            seq = s;
            last.insert(key, version);
        }
        drop(events);

        // Written while nobody watches, then resumed from the next position.
        for v in 9..=12u64 {
            let r = put(&http[1], "w/a", &v.to_string()).await;
            assert!(r.status.is_success(), "{}", r.error_message());
        }
        let mut events = c1
            .events(&format!("/v1/watch?prefix=w/&from={}", seq + 1), &[])
            .await
            .unwrap()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while last["w/a"] < 12 {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = tokio::time::timeout(left, events.next())
                .await
                .unwrap_or_else(|_| panic!("resumed events stopped at {last:?}"))
                .unwrap()
                .unwrap();
            let d = parse(&e.data);
            let key = d["key"].as_str().unwrap().to_string();
            let version = d["version"].as_u64().unwrap();
            assert!(d["seq"].as_u64().unwrap() > seq, "{d}: seen before");
            assert!(version > last[&key], "{d}: seen before ({last:?})");
            last.insert(key, version);
        }
        drop(events);

        // A position never held, and one past the end.
        let gone = c1.events("/v1/watch?prefix=w/&from=0", &[]).await.unwrap();
        let r = gone.err().expect("position 0 was served");
        assert_eq!(r.status, StatusCode::GONE, "{}", r.error_message());
        let past = c1
            .events("/v1/watch?prefix=w/&from=99999999", &[])
            .await
            .unwrap();
        let r = past.err().expect("a position past the end was served");
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.error_message());

        // Two watchers while 24 MiB of values are written: one reads
        // nothing, the other reads everything.
        let watching = |c: &Client| {
            let c = c.clone();
            async move { metric(&c, "ballot_watchers ").await }
        };
        let stalled = c1
            .events("/v1/watch?prefix=big/", &[])
            .await
            .unwrap()
            .unwrap();
        let mut reading = c1
            .events("/v1/watch?prefix=big/", &[])
            .await
            .unwrap()
            .unwrap();
        let reader = tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(Ok(_)) = reading.next().await {
                n += 1;
            }
            n
        });
        assert_eq!(watching(&c1).await, 2.0);
        let value = "v".repeat(256 << 10);
        for i in 0..96 {
            let r = put(&http[0], &format!("big/{i}"), &value).await;
            assert!(r.status.is_success(), "{}", r.error_message());
        }
        let deadline = Instant::now() + Duration::from_secs(40);
        while watching(&c1).await > 1.0 {
            assert!(
                Instant::now() < deadline,
                "a watcher that reads nothing was kept"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            metric(&c1, "ballot_watchers_ended_total{reason=\"client\"}").await >= 1.0,
            "the closed watcher was not counted"
        );
        // The reading watcher is still there, heartbeats later.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(watching(&c1).await, 1.0, "the reading watcher was closed");
        assert!(!reader.is_finished());
        reader.abort();
        drop(stalled);
        cluster.stop_all();
    });
}

/// Polls `key` through `store` until it has no value, at most `within`
/// after `from`; how long after `from` it was gone.
async fn gone_within(
    store: &ballot_client::Client,
    key: &str,
    from: Instant,
    within: Duration,
) -> Duration {
    loop {
        if store.get(key).await.unwrap().is_none() {
            return from.elapsed();
        }
        assert!(
            from.elapsed() < within,
            "{key} still has a value {:?} after its lease's last change",
            from.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Leases through three real replicas.
/// - A lease of 1 s with 3 keys attached through different replicas and
///   never kept alive: no key is gone before 1 s after the request that
///   last changed the lease was sent (checked on reads answered before
///   then), and all 3 are gone within 1 s + 4 s (the reaper looks every
///   250 ms; the rest is this shared machine).
/// - Revoking deletes the keys at once; the lease is gone.
/// - A lock: two clients race to create one key, each with its own lease:
///   exactly one wins, and its version is its fencing token. The winner
///   keeps its lease alive through `kill -9` of the replica that granted
///   it, and holds the lock all along; then it stops, the lock is freed,
///   the other client takes it with a higher token, and a write fenced
///   with the stale token is refused with 412.
#[test]
fn leases_expire_revoke_and_fence_their_keys() {
    let scratch = Scratch::new("leases");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 3).await;
        let tls = cluster.nodes[0].tls();
        let urls: Vec<String> = cluster.nodes.iter().map(|n| n.http()).collect();
        let at = |i: usize| ballot_client::Client::new([urls[i].clone()]).with_tls(&tls);
        let all = ballot_client::Client::new(urls.clone()).with_tls(&tls);

        // Expiry.
        let lease = at(0).grant_lease(1_000).await.unwrap();
        assert_eq!(lease.ttl_ms, 1_000);
        let mut last_change = Instant::now();
        for (i, key) in ["svc/a", "svc/b", "svc/c"].into_iter().enumerate() {
            last_change = Instant::now();
            let w = at(i)
                .put_with_lease(key, format!("node-{i}"), &lease.id, false)
                .await
                .unwrap();
            assert!(w.created);
        }
        let state = all.show_lease(&lease.id).await.unwrap().unwrap();
        assert!(!state.ended);
        let keys: Vec<&str> = state.keys.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["svc/a", "svc/b", "svc/c"]);
        assert!(state.keys.iter().all(|(_, v)| *v == Some(1)), "{state:?}");
        // Early reads, judged only when answered within the lease.
        for _ in 0..5 {
            let read = all.get("svc/a").await.unwrap();
            if last_change.elapsed() < Duration::from_millis(1_000) {
                assert!(read.is_some(), "svc/a gone before its lease could end");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for key in ["svc/a", "svc/b", "svc/c"] {
            let after = gone_within(&all, key, last_change, Duration::from_secs(5)).await;
            assert!(after >= Duration::from_millis(1_000), "{key} gone after {after:?}");
        }
        assert!(all.keepalive(&lease.id).await.is_err(), "an ended lease kept alive");
        let expired: f64 = {
            let mut sum = 0.0;
            for c in clients(&cluster) {
                sum += metric(&c, "ballot_lease_expiries_total").await;
            }
            sum
        };
        assert!(expired >= 1.0, "no replica counted an expiry");

        // Revoke.
        let lease = all.grant_lease(60_000).await.unwrap();
        all.put_with_lease("tmp/x", "1", &lease.id, false).await.unwrap();
        all.put_with_lease("tmp/y", "2", &lease.id, false).await.unwrap();
        // A key written again without the lease leaves it.
        all.put_with_lease("tmp/z", "3", &lease.id, false).await.unwrap();
        all.put("tmp/z", "kept").await.unwrap();
        assert_eq!(all.revoke(&lease.id).await.unwrap(), 2);
        assert!(all.get("tmp/x").await.unwrap().is_none());
        assert!(all.get("tmp/y").await.unwrap().is_none());
        assert_eq!(all.get("tmp/z").await.unwrap().unwrap().value, "kept");
        assert!(all.show_lease(&lease.id).await.unwrap().is_none());
        // Attaching to a lease that is gone is refused and writes nothing.
        let refused = all.put_with_lease("tmp/w", "4", &lease.id, false).await;
        assert!(
            matches!(&refused, Err(ballot_client::Error::Invalid { status: 404, code, .. }) if code == "lease-not-found"),
            "{refused:?}"
        );
        assert!(all.get("tmp/w").await.unwrap().is_none());

        // A create that finds the key holding its value, written through
        // another lease, does not attach it: that lease's end alone deletes it.
        let first = all.grant_lease(60_000).await.unwrap();
        let second = all.grant_lease(60_000).await.unwrap();
        let w = all
            .put_with_lease("tmp/same", "v", &first.id, true)
            .await
            .unwrap();
        let again = all.put_with_lease("tmp/same", "v", &second.id, true).await;
        assert!(
            matches!(&again, Err(ballot_client::Error::Refused { code, .. }) if code == "not-attached"),
            "{again:?}"
        );
        // A retry through the first lease is its own version.
        let retry = all
            .put_with_lease("tmp/same", "v", &first.id, true)
            .await
            .unwrap();
        assert_eq!((retry.version, retry.changed), (w.version, false));
        assert_eq!(all.revoke(&second.id).await.unwrap(), 0);
        assert_eq!(all.get("tmp/same").await.unwrap().unwrap().value, "v");
        assert_eq!(all.revoke(&first.id).await.unwrap(), 1);
        assert!(all.get("tmp/same").await.unwrap().is_none());

        // The CLI: grant, attach, show, revoke.
        let ca = cluster.nodes[2].config.tls.ca.clone();
        let cli = |args: &[&str]| {
            let out = std::process::Command::new(binary())
                .args(args)
                .args(["--endpoint", &urls[2], "--ca"])
                .arg(&ca)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let id = cli(&["lease", "grant", "60000"]).trim().to_string();
        cli(&["kv", "create", "cli/lock", "me", "--lease", &id]);
        let shown: serde_json::Value =
            serde_json::from_str(&cli(&["lease", "show", &id, "--output", "json"])).unwrap();
        assert_eq!(shown["keys"][0]["key"], "cli/lock", "{shown}");
        cli(&["lease", "keepalive", &id]);
        assert_eq!(cli(&["lease", "revoke", &id]).trim(), "revoked; 1 keys deleted");
        assert!(all.get("cli/lock").await.unwrap().is_none());

        // A lock, held through the loss of the replica that granted it.
        let a = at(0).grant_lease(1_000).await.unwrap();
        let b = at(1).grant_lease(30_000).await.unwrap();
        let (c0, c1) = (at(0), at(1));
        let (ra, rb) = tokio::join!(
            c0.put_with_lease("lock", "a", &a.id, true),
            c1.put_with_lease("lock", "b", &b.id, true),
        );
        let (winner, token) = match (&ra, &rb) {
            (Ok(w), Err(ballot_client::Error::Refused { .. })) => ("a", w.version),
            (Err(ballot_client::Error::Refused { .. }), Ok(w)) => ("b", w.version),
            other => panic!("not exactly one lock holder: {other:?}"),
        };
        if winner == "b" {
            // Make "a" the holder that outlives replica 1: release, retake.
            all.revoke(&b.id).await.unwrap();
        }
        let b = all.grant_lease(30_000).await.unwrap();
        let token = if winner == "a" {
            token
        } else {
            at(0).put_with_lease("lock", "a", &a.id, true).await.unwrap().version
        };
        cluster.kill(1);
        let survivors = ballot_client::Client::new([urls[1].clone(), urls[2].clone()])
            .with_tls(&tls);
        let kept_until = Instant::now() + Duration::from_secs(3);
        let mut last_keepalive = Instant::now();
        while Instant::now() < kept_until {
            last_keepalive = Instant::now();
            survivors.keepalive(&a.id).await.unwrap();
            let held = survivors.get("lock").await.unwrap().unwrap();
            assert_eq!((held.value.as_ref(), held.version), (&b"a"[..], token));
            let taken = survivors.put_with_lease("lock", "b", &b.id, true).await;
            assert!(matches!(taken, Err(ballot_client::Error::Refused { .. })), "{taken:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let after = gone_within(&survivors, "lock", last_keepalive, Duration::from_secs(5)).await;
        assert!(after >= Duration::from_millis(1_000), "lock freed after {after:?}");
        let w = survivors.put_with_lease("lock", "b", &b.id, true).await.unwrap();
        assert!(w.version > token, "token {} after {token}", w.version);
        // The old holder, fenced with its stale token, is refused.
        let stale = survivors.cas("lock", token, "a again").await;
        assert!(
            matches!(&stale, Err(ballot_client::Error::Refused { code, .. }) if code == "version-mismatch"),
            "{stale:?}"
        );
        let r = client(&cluster, 2)
            .put("lock", Bytes::from_static(b"a"), Precondition::Version(token))
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
        assert_eq!(survivors.get("lock").await.unwrap().unwrap().value, "b");
        cluster.stop_all();
    });
}

/// The next event of a watch, parsed; at most 30 s away.
async fn next_event(events: &mut ballot::client::EventStream) -> serde_json::Value {
    let e = tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .expect("no event in 30 s")
        .unwrap()
        .unwrap();
    assert_eq!(e.event, "message", "{}", e.data);
    serde_json::from_str(&e.data).unwrap()
}

/// A watcher on a replica that misses versions: replica 3 is cut off from
/// its peers (the relays drop its packets) while a key it had at version 1
/// is written to version 4; once the links heal, its changelog replay
/// learns version 4 straight away, and the watcher's next event for the key
/// is version 4 with `jumped: true` (and its value), never 2 or 3.
#[test]
fn a_watcher_is_told_when_its_replica_jumped_versions() {
    let scratch = Scratch::new("jumped");
    runtime().block_on(async {
        let (mut cluster, fabric) = start_relayed(&scratch.0, 3).await;
        let http = clients(&cluster);
        let mut events = client(&cluster, 3)
            .events("/v1/watch?prefix=j/", &[])
            .await
            .unwrap()
            .unwrap();
        let r = put(&http[0], "j/k", "1").await;
        assert!(r.status.is_success(), "{}", r.error_message());
        let first = next_event(&mut events).await;
        assert_eq!(
            (first["version"].as_u64(), first["jumped"].as_bool()),
            (Some(1), Some(false)),
            "{first}"
        );
        fabric.isolate(3);
        for v in 2..=4 {
            let r = put(&http[0], "j/k", &v.to_string()).await;
            assert!(r.status.is_success(), "{}", r.error_message());
        }
        fabric.heal();
        let jumped = next_event(&mut events).await;
        assert_eq!(jumped["key"], "j/k", "{jumped}");
        assert_eq!(jumped["version"].as_u64(), Some(4), "{jumped}");
        assert_eq!(jumped["value"], "4", "{jumped}");
        assert_eq!(jumped["jumped"], true, "{jumped}");
        assert!(jumped["seq"].as_u64() > first["seq"].as_u64(), "{jumped}");
        cluster.stop_all();
    });
}
