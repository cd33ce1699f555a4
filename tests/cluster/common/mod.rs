//! What the multi-process test targets share: scratch directories,
//! clusters of real `ballot serve` processes, small client helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballot::client::{Client, Precondition, Response};
use ballot::dev::DevCluster;
use ballot::server::CoreKind;
use ballot_client::views::Link;
use ballot_sim::check::{self, Input, Output};
use bytes::Bytes;
use hyper::StatusCode;

pub const READY: Duration = Duration::from_secs(90);

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ballot"))
}

/// A fresh directory, removed when the test passes and kept (and named)
/// when it fails.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir =
            std::env::temp_dir().join(format!("ballot-{name}-{}-{nanos}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("cluster files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub async fn start(dir: &Path, n: u32) -> DevCluster {
    let mut cluster = DevCluster::prepare(dir, n, 0, 0, CoreKind::Wasm, binary()).unwrap();
    cluster.start_all().unwrap();
    cluster.wait_all_ready(READY).await.unwrap();
    wait_links_up(&cluster).await;
    cluster
}

/// Like [`start`], with a relay (`ballot::wan`) in front of every peer
/// port: the replicas reach each other only through it, so a test can
/// delay, drop or cut each direction of each link.
pub async fn start_relayed(dir: &Path, n: u32) -> (DevCluster, ballot::wan::Fabric) {
    let mut cluster = DevCluster::prepare(dir, n, 0, 0, CoreKind::Wasm, binary()).unwrap();
    let fabric = ballot::wan::Fabric::start(&cluster.peer_addrs())
        .await
        .unwrap();
    cluster.route_peers(|id| fabric.front(id)).unwrap();
    cluster.start_all().unwrap();
    cluster.wait_all_ready(READY).await.unwrap();
    wait_links_up(&cluster).await;
    (cluster, fabric)
}

/// Waits until every replica's links to every other are up, so a test's
/// first writes reach all of them (a replica started a moment after its
/// peers is otherwise reached only after their next redial).
pub async fn wait_links_up(cluster: &DevCluster) {
    wait_links_up_of(&clients(cluster)).await
}

/// [`wait_links_up`], for the replicas these clients reach.
pub async fn wait_links_up_of(replicas: &[Client]) {
    let deadline = std::time::Instant::now() + READY;
    for c in replicas {
        loop {
            let view = c.cluster().await.unwrap();
            if view
                .replicas
                .iter()
                .all(|r| matches!(r.link, Link::Up | Link::Local))
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}: links not up: {:?}",
                c.endpoint(),
                view.replicas
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until the replica `c` reaches sees its links to `peers` down (a
/// cut made by the link emulator, seen after QUIC's idle timeout).
pub async fn wait_links_down(c: &Client, peers: &[u32]) {
    let deadline = std::time::Instant::now() + READY;
    loop {
        let view = c.cluster().await.unwrap();
        if view
            .replicas
            .iter()
            .filter(|r| peers.contains(&r.id))
            .all(|r| !matches!(r.link, Link::Up))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}: links still up: {:?}",
            c.endpoint(),
            view.replicas
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn client(cluster: &DevCluster, id: u32) -> Client {
    cluster.nodes[id as usize - 1].client()
}

pub fn clients(cluster: &DevCluster) -> Vec<Client> {
    cluster.nodes.iter().map(|n| n.client()).collect()
}

pub async fn put(c: &Client, key: &str, value: &str) -> Response {
    c.put(key, Bytes::from(value.to_string()), Precondition::None)
        .await
        .unwrap()
}

pub async fn expect_value(c: &Client, key: &str, local: bool, value: &str, version: u64) {
    let r = c.get(key, local).await.unwrap();
    assert_eq!(
        (r.status, &r.body[..], r.version),
        (StatusCode::OK, value.as_bytes(), Some(version)),
        "{} get {key} (local: {local}): {}",
        c.endpoint(),
        r.error_message()
    );
}

pub async fn metric(c: &Client, line_prefix: &str) -> f64 {
    let r = c
        .request(hyper::Method::GET, "/metrics", &[], Bytes::new())
        .await
        .unwrap();
    String::from_utf8_lossy(&r.body)
        .lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Records a history of register operations, per key, for the checker.
#[derive(Clone, Default)]
pub struct History {
    /// Requests that did not get a definite answer (an error, a 5xx).
    pub failures: Arc<std::sync::atomic::AtomicU64>,
    origin: Arc<Mutex<Option<Instant>>>,
    ops: Arc<Mutex<HashMap<String, Vec<check::Op>>>>,
}

impl History {
    fn now(&self) -> u64 {
        let mut origin = self.origin.lock().unwrap();
        origin.get_or_insert_with(Instant::now).elapsed().as_nanos() as u64
    }

    /// Runs one operation through `c` and records it.
    pub async fn run(&self, c: &Client, key: &str, input: Input) -> Output {
        let call = self.now();
        let text = |v: &[u8]| Bytes::from(v.to_vec());
        let result = match &input {
            Input::Read => c.get(key, false).await,
            Input::Put(v) => c.put(key, text(v), Precondition::None).await,
            Input::Create(v) => c.put(key, text(v), Precondition::Absent).await,
            Input::Cas(version, v) => c.put(key, text(v), Precondition::Version(*version)).await,
            Input::Delete => c.delete(key, Precondition::None).await,
            Input::DeleteIf(version) => c.delete(key, Precondition::Version(*version)).await,
        };
        let output = match result {
            // The request never reached the replica: it did not happen.
            Err(e) if e.contains("client error (Connect)") => None,
            Err(_) if input == Input::Read => None,
            Err(e) => {
                eprintln!("{key}: {input:?}: {e}");
                Some(Output::Unknown)
            }
            Ok(r) => {
                let out = output_of(&input, &r);
                if out.as_ref().is_none_or(|o| *o == Output::Unknown) {
                    eprintln!("{key}: {input:?}: {} {}", r.status, r.error_message());
                }
                out
            }
        };
        if output.as_ref().is_none_or(|o| *o == Output::Unknown) {
            self.failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let Some(output) = output else {
            // Do not spin through the workload against a dead replica.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Output::Unknown;
        };
        let ret = (output != Output::Unknown).then(|| self.now());
        self.ops
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default()
            .push(check::Op {
                input,
                output: output.clone(),
                call,
                ret,
            });
        output
    }

    pub fn check(&self) {
        let ops = self.ops.lock().unwrap();
        for (key, ops) in ops.iter() {
            if let Err(e) = check::check(ops) {
                panic!("key {key}: {e}");
            }
        }
    }

    pub fn count(&self) -> (usize, usize) {
        let ops = self.ops.lock().unwrap();
        let all: Vec<&check::Op> = ops.values().flatten().collect();
        let known = all.iter().filter(|o| o.output != Output::Unknown).count();
        (all.len(), known)
    }
}

/// Maps an HTTP answer to what the register model would have said; `None`
/// for an operation that certainly had no effect (a failed read, a write
/// refused before it reached any acceptor).
pub fn output_of(input: &Input, r: &Response) -> Option<Output> {
    let version = r.version.unwrap_or(0);
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    Some(match (input, r.status) {
        (Input::Read, StatusCode::OK) => Output::Done(Some(r.body.to_vec()), version),
        (Input::Read | Input::Delete | Input::DeleteIf(_), StatusCode::NOT_FOUND) => {
            Output::Done(None, version)
        }
        (Input::Delete | Input::DeleteIf(_), StatusCode::NO_CONTENT) => Output::Done(None, version),
        (
            Input::Put(v) | Input::Create(v) | Input::Cas(_, v),
            StatusCode::OK | StatusCode::CREATED,
        ) => Output::Done(Some(v.clone()), version),
        (_, StatusCode::PRECONDITION_FAILED) => {
            let current = &body["error"]["current"];
            let value = current["value"].as_str().map(|s| s.as_bytes().to_vec());
            Output::Rejected(
                body["error"]["code"].as_str().unwrap().to_string(),
                value,
                current["version"].as_u64().unwrap(),
            )
        }
        (Input::Read, _) => return None,
        _ if body["error"]["maybe_applied"] == false => return None,
        // 503 and the like: the write may or may not have happened.
        _ => Output::Unknown,
    })
}

/// A small deterministic generator for client workloads.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// `clients` concurrent clients, spread over the replicas, each running
/// `ops` random register operations on `keys` hot keys.
pub async fn concurrent_history(
    replicas: Vec<Client>,
    clients: u64,
    ops: u64,
    keys: u64,
) -> History {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    history_until(replicas, clients, ops, keys, stop).await
}

/// Like [`concurrent_history`], but each client also stops early once
/// `stop` is set.
pub async fn history_until(
    replicas: Vec<Client>,
    clients: u64,
    ops: u64,
    keys: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> History {
    let history = History::default();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = replicas[(c as usize) % replicas.len()].clone();
        let history = history.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Lcg(c * 7919 + 13);
            for i in 0..ops {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let key = format!("hot-{}", rng.next(keys));
                let value = format!("c{c}-{i}").into_bytes();
                let input = match rng.next(10) {
                    0..=2 => Input::Read,
                    3..=4 => Input::Put(value),
                    5 => Input::Create(value),
                    6 => Input::Delete,
                    _ => {
                        // Read-modify-write: cas on the version just read.
                        match history.run(&client, &key, Input::Read).await {
                            Output::Done(_, v) => Input::Cas(v, value),
                            _ => Input::Read,
                        }
                    }
                };
                history.run(&client, &key, input).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    history
}
