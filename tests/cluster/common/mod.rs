//! What the multi-process test targets share: scratch directories,
//! clusters of real `ballot serve` processes, small client helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use ballot::client::{Client, Precondition, Response};
use ballot::dev::DevCluster;
use ballot::server::CoreKind;
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
    cluster
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
