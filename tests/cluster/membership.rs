//! Live membership changes in real clusters: replicas added (learner,
//! catch-up, promotion) and removed while clients keep writing, with the
//! `ballot cluster add` and `remove` commands a user would run.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballot::client::{Client, Precondition};
use ballot::dev::DevCluster;
use ballot::membership::{MembersView, Phase, Status, TaskKind};
use ballot::server::CoreKind;
use bytes::Bytes;
use common::*;
use hyper::{Method, StatusCode};

async fn members(c: &Client) -> MembersView {
    let v = c
        .json(Method::GET, "/v1/cluster/members", Bytes::new())
        .await
        .unwrap()
        .unwrap_or_else(|r| panic!("{}: {}", c.endpoint(), r.error_message()));
    serde_json::from_value(v).unwrap()
}

/// Replica `id`'s status in a membership view.
fn status_in(view: &MembersView, id: u32) -> Status {
    view.status
        .iter()
        .find(|s| s.id == id)
        .and_then(|s| s.status.clone())
        .unwrap_or_else(|| panic!("no status from replica {id}"))
}

/// Runs `ballot cluster ARGS --endpoint URL` and returns its output,
/// panicking unless it succeeds.
/// `ballot cluster ARGS --endpoint ENDPOINT`, with the admin token of the
/// cluster in `dir` (the CLI reads it from `BALLOT_DEV_DIR`).
fn cluster_cmd(dir: &std::path::Path, endpoint: &str, args: &[&str]) -> std::process::Child {
    Command::new(binary())
        .env("BALLOT_DEV_DIR", dir)
        .env_remove("BALLOT_ADMIN_TOKEN")
        .arg("cluster")
        .args(args)
        .arg("--endpoint")
        .arg(endpoint)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn finished(mut child: std::process::Child, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} did not finish in 180 s: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed: {text}");
    text
}

async fn wait_finished(child: std::process::Child, what: &'static str) -> String {
    tokio::task::spawn_blocking(move || finished(child, what))
        .await
        .unwrap()
}

const PRELOADED: usize = 300;

#[test]
fn three_grow_to_five_and_shrink_to_three_under_load() {
    let scratch = Scratch::new("members");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 3).await;
        let c3 = client(&cluster, 3);
        // Data the new replicas must fetch: they were not there when it
        // was written.
        for i in 0..PRELOADED {
            let r = c3
                .put(
                    &format!("pre-{i}"),
                    Bytes::from(format!("v{i}")),
                    Precondition::None,
                )
                .await
                .unwrap();
            assert!(r.status.is_success(), "{}", r.error_message());
        }

        // Clients keep writing through replica 3, which stays throughout.
        let stop = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn(history_until(
            vec![c3.clone()],
            4,
            u64::MAX,
            6,
            stop.clone(),
        ));

        for id in [4, 5] {
            cluster.add_joiner(id).unwrap();
            cluster.start(id).unwrap();
            cluster.wait_alive(id, READY).await.unwrap();
        }
        let peers: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| n.config.peer_addr.to_string())
            .collect();
        let https: Vec<String> = cluster.nodes.iter().map(|n| n.http()).collect();
        let peer = |id: u32| peers[id as usize - 1].clone();
        let http = |id: u32| https[id as usize - 1].clone();
        // Two additions at once, asked of two different replicas.
        let add4 = cluster_cmd(
            &cluster.dir,
            &http(1),
            &["add", "--id", "4", "--peer", &peer(4), "--http", &http(4)],
        );
        let add5 = cluster_cmd(
            &cluster.dir,
            &http(2),
            &["add", "--id", "5", "--peer", &peer(5), "--http", &http(5)],
        );
        let out4 = wait_finished(add4, "cluster add 4").await;
        let out5 = wait_finished(add5, "cluster add 5").await;
        assert!(out4.contains("done at membership epoch"), "{out4}");
        assert!(out5.contains("done at membership epoch"), "{out5}");

        let view = members(&c3).await;
        assert_eq!(view.record.members().voters, vec![1, 2, 3, 4, 5]);
        assert!(view.record.members().learners.is_empty());
        assert!(view.record.fast);
        // Each newcomer caught up: it holds every preloaded value in its
        // own store (a local read does not ask anyone).
        for id in [4, 5] {
            let c = client(&cluster, id);
            cluster.wait_ready(id, READY).await.unwrap();
            for i in 0..PRELOADED {
                expect_value(&c, &format!("pre-{i}"), true, &format!("v{i}"), 1).await;
            }
            let st = status_in(&view, id);
            // It caught up as a learner (its progress has shown later
            // tasks since: a sweep when the next replica joined).
            assert!(st.caught_up >= 2, "{st:?}");
        }

        // Shrink by removing two of the original replicas, asked of one
        // that stays.
        for id in ["1", "2"] {
            let out = wait_finished(
                cluster_cmd(&cluster.dir, &http(3), &["remove", "--id", id]),
                "cluster remove",
            )
            .await;
            assert!(out.contains("done at membership epoch"), "{out}");
        }
        let view = members(&c3).await;
        assert_eq!(view.record.members().voters, vec![3, 4, 5]);
        for id in [1, 2] {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let v = client(&cluster, id).cluster().await.unwrap();
                if !v.healthy {
                    assert!(v.error.unwrap().contains("removed"));
                    break;
                }
                assert!(Instant::now() < deadline, "replica {id} still serves");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        stop.store(true, Ordering::Relaxed);
        let history = load.await.unwrap();
        let (ops, known) = history.count();
        eprintln!("load during the changes: {known} of {ops} operations answered");
        assert!(known > 100, "too little load ran: {known} of {ops}");
        assert_eq!(
            history.failures.load(Ordering::Relaxed),
            0,
            "client requests failed during the changes ({known} of {ops} answered)"
        );
        history.check();

        // Nothing was lost: with the original replicas gone and replica 3
        // stopped too, the two newcomers (a quorum of the three voters)
        // still hold every value.
        cluster.stop(1, Duration::from_secs(5));
        cluster.stop(2, Duration::from_secs(5));
        cluster.kill(3);
        let c4 = client(&cluster, 4);
        for i in (0..PRELOADED).step_by(7) {
            expect_value(&c4, &format!("pre-{i}"), false, &format!("v{i}"), 1).await;
        }

        // Removing another voter now would leave {3, 5} with 3 down.
        let r = c4
            .request(Method::DELETE, "/v1/cluster/members/5", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.error_message());
        assert!(
            r.error_message().contains("quorum"),
            "{}",
            r.error_message()
        );

        let out = Command::new(binary())
            .args(["cluster", "status", "--endpoint", &http(4)])
            .env("BALLOT_DEV_DIR", &cluster.dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("membership epoch"), "{text}");
        cluster.stop_all();
    });
}

#[test]
fn a_replica_behind_the_truncated_changelog_replays_a_snapshot() {
    let scratch = Scratch::new("snapshot");
    runtime().block_on(async {
        let mut cluster =
            DevCluster::prepare(&scratch.0, 3, 0, 0, CoreKind::Wasm, binary()).unwrap();
        // Keep only 20 changelog entries beyond what every member has.
        for node in &mut cluster.nodes {
            node.config.changelog_keep = Some(20);
            let text = toml::to_string_pretty(&node.config).unwrap();
            std::fs::write(&node.config_path, text).unwrap();
        }
        cluster.start_all().unwrap();
        cluster.wait_all_ready(READY).await.unwrap();
        wait_links_up(&cluster).await;
        let c1 = client(&cluster, 1);
        for i in 0..50 {
            put(&c1, &format!("k{i}"), "old").await;
        }
        cluster.stop(3, Duration::from_secs(5));
        // Replica 3 misses these: new keys, and new versions of old ones.
        for i in 0..200 {
            let r = put(&c1, &format!("k{}", i % 120), &format!("new{i}")).await;
            assert!(r.status.is_success(), "{}", r.error_message());
        }
        // Both remaining replicas drop what replica 3 has not replayed.
        let deadline = Instant::now() + Duration::from_secs(60);
        for id in [1, 2] {
            loop {
                let view = members(&client(&cluster, id)).await;
                let st = status_in(&view, id);
                let (first, last) = st.changelog;
                if last > 200 && first > last - 40 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "replica {id} never truncated: {:?}",
                    st.changelog
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        cluster.start(3).unwrap();
        cluster.wait_ready(3, READY).await.unwrap();
        // Replica 3's own copy converges on every newest value without
        // anyone reading those keys through it.
        let c3 = client(&cluster, 3);
        let mut expected = std::collections::BTreeMap::new();
        for i in 0..200 {
            expected.insert(format!("k{}", i % 120), format!("new{i}"));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for (key, value) in &expected {
            loop {
                let r = c3.get(key, true).await.unwrap();
                if r.status == StatusCode::OK && r.body == value.as_bytes() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "replica 3 never caught up on {key}: {:?}",
                    String::from_utf8_lossy(&r.body)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let view = members(&c3).await;
        let st = status_in(&view, 3);
        // It got there by snapshot: both peers had dropped what it missed.
        let p = st.progress.expect("a snapshot replay ran");
        assert_eq!((p.task, p.phase), (TaskKind::Snapshot, Phase::Done));
        for peer in [1, 2] {
            let cursor = st.cursors.iter().find(|(p, _)| *p == peer).unwrap().1;
            assert!(cursor > 200, "{:?}", st.cursors);
        }
        cluster.stop_all();
    });
}

#[test]
fn removing_a_replica_during_its_join_abandons_the_join_cleanly() {
    let scratch = Scratch::new("abandon");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 3).await;
        // Replica 4 is prepared but never started: its join stalls at the
        // learner stage, waiting for it.
        cluster.add_joiner(4).unwrap();
        let peer4 = cluster.nodes[3].config.peer_addr.to_string();
        let (http1, http2) = (cluster.nodes[0].http(), cluster.nodes[1].http());
        let add = cluster_cmd(
            &cluster.dir,
            &http1,
            &["add", "--id", "4", "--peer", &peer4],
        );
        let c1 = client(&cluster, 1);
        let deadline = Instant::now() + Duration::from_secs(60);
        while members(&c1).await.record.role(4).is_none() {
            assert!(
                Instant::now() < deadline,
                "replica 4 never became a learner"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let out = wait_finished(
            cluster_cmd(&cluster.dir, &http2, &["remove", "--id", "4"]),
            "remove",
        )
        .await;
        assert!(out.contains("done at membership epoch"), "{out}");
        // The waiting `cluster add` reports the join abandoned.
        let out = tokio::task::spawn_blocking(move || add.wait_with_output().unwrap())
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(text.contains("abandoned"), "{text}");
        let view = members(&c1).await;
        assert_eq!(view.record.members().voters, vec![1, 2, 3]);
        assert!(view.record.members().learners.is_empty());
        assert!(view.record.queue.is_empty());
        assert!(view.record.done.iter().any(|d| d.id == 4 && d.aborted));
        // The cluster carries on, fast round included.
        assert!(view.record.fast);
        put(&client(&cluster, 3), "after", "ok").await;
        expect_value(&c1, "after", false, "ok", 1).await;
        cluster.stop_all();
    });
}

/// Starts replica 4 with `--join` and adds it through replica 2 (`ballot
/// cluster add`), until it votes; returns replica 2's endpoint.
async fn add_replica_4(cluster: &mut DevCluster) -> String {
    cluster.add_joiner(4).unwrap();
    cluster.start(4).unwrap();
    cluster.wait_alive(4, READY).await.unwrap();
    let peer4 = cluster.nodes[3].config.peer_addr.to_string();
    let (http2, http4) = (cluster.nodes[1].http(), cluster.nodes[3].http());
    let out = wait_finished(
        cluster_cmd(
            &cluster.dir,
            &http2,
            &["add", "--id", "4", "--peer", &peer4, "--http", &http4],
        ),
        "cluster add 4",
    )
    .await;
    assert!(out.contains("done at membership epoch"), "{out}");
    http2
}

/// An activation asks the replicas of the current membership, not the ones
/// a replica was started with: after 4 joins and 1 leaves, activating a
/// protocol through replica 2 (started with voters 1, 2, 3) once waited
/// for replica 1, was refused after 15 s, and never asked replica 4.
#[test]
fn activation_after_a_membership_change_asks_the_current_members() {
    use ballot::runtime::PROTOCOL_NEXT_WASM;
    let scratch = Scratch::new("activate-after-change");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 3).await;
        let http2 = add_replica_4(&mut cluster).await;
        let out = wait_finished(
            cluster_cmd(&cluster.dir, &http2, &["remove", "--id", "1"]),
            "remove 1",
        )
        .await;
        assert!(out.contains("done at membership epoch"), "{out}");

        let c2 = client(&cluster, 2);
        let pushed = c2
            .json(
                Method::POST,
                "/v1/components",
                Bytes::from_static(PROTOCOL_NEXT_WASM),
            )
            .await
            .unwrap()
            .unwrap_or_else(|r| panic!("push refused: {}", r.error_message()));
        let next = pushed["component"]["id"].as_str().unwrap().to_string();
        let body = serde_json::json!({ "component": next }).to_string();
        let activated = c2
            .json(Method::POST, "/v1/protocol/activate", body.into())
            .await
            .unwrap()
            .unwrap_or_else(|r| panic!("activation refused: {}", r.error_message()));
        assert_eq!(activated["active"], next.as_str(), "{activated}");
        // Replica 4, which joined after every other one started, runs it.
        let c4 = client(&cluster, 4);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = c4
                .json(Method::GET, "/v1/protocol", Bytes::new())
                .await
                .unwrap()
                .unwrap();
            if v["running"]["label"] == next.as_str() {
                break;
            }
            assert!(Instant::now() < deadline, "replica 4 runs {}", v["running"]);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

/// A voter that joined with `--join`, lost its data directory and was
/// started again the same way (its configuration still says `join`) does
/// not vote with an empty memory, and says why: its peers refuse the new
/// directory, and a record that lists it as a voter already (from a peer
/// that never recorded the old directory) is not adopted. Before, the
/// directory adopted the record a peer served and voted.
#[test]
fn a_promoted_joiner_that_lost_its_directory_does_not_vote_again() {
    let scratch = Scratch::new("joiner-lost-directory");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 3).await;
        add_replica_4(&mut cluster).await;
        cluster.kill(4);
        std::fs::remove_dir_all(&cluster.nodes[3].config.data_dir).unwrap();
        cluster.start(4).unwrap();
        let deadline = Instant::now() + READY;
        loop {
            let log = std::fs::read_to_string(cluster.log_path(4)).unwrap_or_default();
            let restarted = log.split("replica serving").nth(2).unwrap_or_default();
            assert!(
                !restarted.contains("voters=[1, 2, 3, 4]"),
                "the new directory adopted a record listing it as a voter: {log}"
            );
            if restarted.contains("knows replica 4 by another data directory")
                || restarted.contains("lists replica 4 as a voter already")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica 4 did not refuse its new directory: {log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // It answers no client, and the others go on serving.
        let r = client(&cluster, 4).get("k", false).await.unwrap();
        assert!(!r.status.is_success(), "{}", r.status);
        let r = put(&client(&cluster, 1), "after", "x").await;
        assert!(r.status.is_success(), "{}", r.error_message());
    });
}

/// A replica removed while it was down and then restarted on its old data
/// directory (by an operator, or a supervisor that restarts whatever
/// stops) resumes the membership it had, in which it still votes. Its
/// former peers run a later epoch and fence what it sends, so it cannot
/// form a quorum with anyone; it fetches the committed record, learns that
/// it was removed, says so and stops answering, and no acknowledged write
/// is lost.
#[test]
fn a_replica_removed_while_down_comes_back_learns_it_and_stops() {
    let scratch = Scratch::new("removed-while-down");
    runtime().block_on(async {
        let mut cluster = start(&scratch.0, 4).await;
        let c1 = client(&cluster, 1);
        let r = put(&c1, "before", "one").await;
        assert!(r.status.is_success(), "{}", r.error_message());
        cluster.kill(4);
        let http1 = cluster.nodes[0].http();
        let out = wait_finished(
            cluster_cmd(&cluster.dir, &http1, &["remove", "--id", "4"]),
            "remove 4",
        )
        .await;
        assert!(out.contains("done at membership epoch"), "{out}");
        let r = put(&client(&cluster, 2), "during", "two").await;
        assert!(r.status.is_success(), "{}", r.error_message());

        cluster.start(4).unwrap();
        let deadline = Instant::now() + READY;
        loop {
            let log = std::fs::read_to_string(cluster.log_path(4)).unwrap_or_default();
            let restarted = log.split("replica serving").nth(2).unwrap_or_default();
            if restarted.contains("this replica was removed from the cluster at membership epoch") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica 4 still runs on the membership it had: {log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = client(&cluster, 4).get("before", false).await.unwrap();
        assert!(
            !r.status.is_success(),
            "a removed replica answered {}",
            r.status
        );
        // The others serve every acknowledged write, without replica 4.
        let c3 = client(&cluster, 3);
        expect_value(&c3, "before", false, "one", 1).await;
        expect_value(&c3, "during", false, "two", 1).await;
        assert_eq!(members(&c1).await.record.members().voters, vec![1, 2, 3]);
        let r = put(&c3, "after", "three").await;
        assert!(r.status.is_success(), "{}", r.error_message());
        cluster.stop_all();
    });
}

/// Splits around a membership change, through real processes and the link
/// emulator, with clients on replicas 1, 2, 3 and 4 throughout:
///
/// 1. Five replicas split 3/2: {1, 2, 3} and {4, 5} lose every link
///    between them (both ways), then replica 5's removal is asked for. The
///    majority side keeps serving; the minority side refuses writes and
///    answers nothing stale; the change waits, since a leave needs every
///    continuing voter (4 among them) to run its classic-only epoch and
///    sweep (docs/design.md, section 11). Healed, it finishes and 4 runs
///    the new membership.
/// 2. Replica 4 is then cut off from every other under the new
///    membership and must lose every link: the records the change
///    published name each replica at its own address, and a replica's
///    configured peer addresses (here the relays') must still be the ones
///    it dials.
///
/// The whole history, reads through 4 included, is linearizable, and 4
/// serves what was written without it.
#[test]
fn the_minority_side_of_a_split_during_a_membership_change_serves_nothing_stale() {
    let scratch = Scratch::new("split-membership");
    runtime().block_on(async {
        let (mut cluster, fabric) = start_relayed(&scratch.0, 5).await;
        let (c1, c4) = (client(&cluster, 1), client(&cluster, 4));
        let r = put(&c1, "before", "one").await;
        assert!(r.status.is_success(), "{}", r.error_message());
        let loaded: Vec<Client> = (1..=4).map(|id| client(&cluster, id)).collect();

        let stop = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn(history_until(loaded.clone(), 8, u64::MAX, 4, stop.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let split = |up: bool| {
            for a in [1, 2, 3] {
                for b in [4, 5] {
                    fabric.switch(a, b, up);
                    fabric.switch(b, a, up);
                }
            }
        };
        split(false);
        wait_links_down(&c4, &[1, 2, 3]).await;
        let http1 = cluster.nodes[0].http();
        let remove = cluster_cmd(&cluster.dir, &http1, &["remove", "--id", "5"]);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let r = put(&c1, "during", "two").await;
        assert!(r.status.is_success(), "{}", r.error_message());
        let r = c4
            .put("minority", Bytes::from_static(b"x"), Precondition::None)
            .await
            .unwrap();
        assert!(
            r.status.is_server_error(),
            "a write through the minority side: {} {}",
            r.status,
            r.error_message()
        );
        assert_eq!(
            members(&c1).await.record.members().voters,
            vec![1, 2, 3, 4, 5],
            "a leave finished without a continuing voter"
        );
        split(true);
        let healed = Instant::now();
        let out = wait_finished(remove, "remove 5 once the split healed").await;
        assert!(out.contains("done at membership epoch"), "{out}");
        eprintln!("the removal finished {:?} after the heal", healed.elapsed());
        assert_eq!(members(&c1).await.record.members().voters, vec![1, 2, 3, 4]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let view = c4
                .json(Method::GET, "/v1/cluster/members", Bytes::new())
                .await
                .unwrap();
            let learned = match view {
                Ok(v) => serde_json::from_value::<MembersView>(v)
                    .map(|v| v.record.members().voters == vec![1, 2, 3, 4])
                    .unwrap_or(false),
                Err(_) => false,
            };
            if learned {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica 4 never learned the membership decided without it"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        expect_value(&c4, "during", false, "two", 1).await;

        // Under the records the change published, a cut is still a cut.
        wait_links_up_of(&loaded).await;
        fabric.isolate(4);
        wait_links_down(&c4, &[1, 2, 3]).await;
        let r = c4
            .put("minority", Bytes::from_static(b"x"), Precondition::None)
            .await
            .unwrap();
        assert!(
            r.status.is_server_error(),
            "{} {}",
            r.status,
            r.error_message()
        );
        fabric.heal();
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::Relaxed);
        let history = load.await.unwrap();
        history.check();
        let (ops, known) = history.count();
        eprintln!(
            "{ops} operations, {known} with a known outcome; relays {:?}",
            fabric.counts()
        );
        assert!(known > 50, "only {known} of {ops} operations finished");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = put(&c4, "after", "three").await;
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
        let r = client(&cluster, 5).get("before", false).await.unwrap();
        assert!(
            !r.status.is_success(),
            "a removed replica answered {}",
            r.status
        );
        cluster.stop_all();
    });
}
