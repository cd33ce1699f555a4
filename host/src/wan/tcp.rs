//! The TCP relays between etcd's members, so `ballot bench --wan` runs
//! etcd under the same links as Ballot.
//!
//! A TCP relay cannot tell a sender by its source address: etcd dials its
//! peers from ephemeral ports. It reads the sender from the first HTTP
//! request of each connection instead: etcd's peer requests (raft streams
//! and pipelines) carry `X-Server-From: <member id in hex>`, and
//! [`TcpFabric::name`] maps such ids to replica numbers (etcd's member
//! list gives them once the cluster runs). A connection whose sender is
//! not known (yet) crosses unimpaired.
//!
//! Each direction of a connection is a queue: a chunk read at `t` is
//! written at `t + delay + jitter`, never before the chunk ahead of it, so
//! the byte stream stays in order. A link that is down holds its chunks
//! until it is up again (a stall, as TCP sees a cut path). Loss is not
//! modelled: the kernels at both ends retransmit what a path drops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Dice, Link, Links, Topology};

/// Bytes read at once, and the most of a connection's first bytes read
/// looking for its sender.
const CHUNK: usize = 64 * 1024;
const HEAD_MAX: usize = 8 * 1024;
/// Chunks in flight per direction before reading stops.
const QUEUE: usize = 1024;

/// The relays of one cluster of TCP servers.
pub struct TcpFabric {
    shared: Arc<Shared>,
    fronts: HashMap<u32, SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    links: Links,
    /// The relayed connections' tasks, ended with the fabric.
    connections: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Sender tag (etcd member id, hex) -> replica number.
    names: Mutex<HashMap<String, u32>>,
    dice: Dice,
}

impl Shared {
    fn sender(&self, tag: &Option<String>) -> Option<u32> {
        let tag = tag.as_ref()?;
        self.names.lock().expect("names lock").get(tag).copied()
    }
}

impl TcpFabric {
    /// Starts a relay on loopback in front of each server, given as (id,
    /// its real address). Every link starts perfect.
    pub async fn start(servers: &[(u32, SocketAddr)]) -> std::io::Result<TcpFabric> {
        let shared = Arc::new(Shared {
            links: Links::default(),
            connections: Mutex::new(Vec::new()),
            names: Mutex::new(HashMap::new()),
            dice: Dice::new(),
        });
        let mut fronts = HashMap::new();
        let mut tasks = Vec::new();
        for &(id, real) in servers {
            let front = TcpListener::bind((real.ip(), 0)).await?;
            fronts.insert(id, front.local_addr()?);
            tasks.push(tokio::spawn(accept(shared.clone(), id, real, front)));
        }
        Ok(TcpFabric {
            shared,
            fronts,
            tasks,
        })
    }

    /// The address server `id`'s peers dial instead of its own.
    pub fn front(&self, id: u32) -> SocketAddr {
        self.fronts[&id]
    }

    /// Connections whose first request says `X-Server-From: tag` come from
    /// server `id`.
    pub fn name(&self, tag: &str, id: u32) {
        self.shared
            .names
            .lock()
            .expect("names lock")
            .insert(tag.to_ascii_lowercase(), id);
    }

    /// Sets the link from `from` to `to` (one direction).
    pub fn set(&self, from: u32, to: u32, link: Link) {
        self.shared.links.set(from, to, link);
    }

    /// Switches the link from `from` to `to` up or down, keeping its delay
    /// (down holds what it carries until it is up again).
    pub fn switch(&self, from: u32, to: u32, up: bool) {
        self.shared.links.switch(from, to, up);
    }

    /// Sets every link between two servers as `topology` says.
    pub fn apply(&self, topology: &Topology) {
        self.shared.links.apply(topology);
    }
}

impl Drop for TcpFabric {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for connection in self
            .shared
            .connections
            .lock()
            .expect("connections lock")
            .iter()
        {
            connection.abort();
        }
    }
}

async fn accept(shared: Arc<Shared>, to: u32, real: SocketAddr, front: TcpListener) {
    loop {
        let Ok((inbound, _)) = front.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                let Ok(outbound) = TcpStream::connect(real).await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                connection(shared, to, inbound, outbound).await;
            }
        });
        let mut connections = shared.connections.lock().expect("connections lock");
        connections.retain(|c| !c.is_finished());
        connections.push(task.abort_handle());
    }
}

/// One relayed connection: the dialer's bytes to the server and the
/// server's back, each through the link of its direction.
async fn connection(shared: Arc<Shared>, to: u32, inbound: TcpStream, outbound: TcpStream) {
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let (tag_tx, tag_rx) = tokio::sync::watch::channel(None::<String>);
    let forward = {
        let shared = shared.clone();
        async move {
            let (tx, rx) = mpsc::channel(QUEUE);
            let writer = tokio::spawn(deliver(shared.clone(), rx, out_write));
            let mut tag = None;
            let mut head: Vec<u8> = Vec::new();
            pump(&shared, in_read, tx, |chunk| {
                if tag.is_none() && head.len() < HEAD_MAX {
                    head.extend_from_slice(&chunk[..chunk.len().min(HEAD_MAX - head.len())]);
                    tag = sender_tag(&head);
                    if tag.is_some() {
                        let _ = tag_tx.send(tag.clone());
                    }
                }
                (shared.sender(&tag), Some(to))
            })
            .await;
            // What is queued still crosses, then the close.
            let _ = writer.await;
        }
    };
    let backward = {
        let shared = shared.clone();
        async move {
            let (tx, rx) = mpsc::channel(QUEUE);
            let writer = tokio::spawn(deliver(shared.clone(), rx, in_write));
            pump(&shared, out_read, tx, |_| {
                let tag = tag_rx.borrow().clone();
                (Some(to), shared.sender(&tag))
            })
            .await;
            let _ = writer.await;
        }
    };
    tokio::join!(forward, backward);
}

/// (from, to) of a chunk: the link it crosses, where both ends are known.
type Ends = (Option<u32>, Option<u32>);

/// Reads `from` and queues each chunk with the time it is due, by the
/// link between the ends `ends_of` names for it.
async fn pump(
    shared: &Shared,
    mut from: OwnedReadHalf,
    queue: mpsc::Sender<(Instant, Ends, Vec<u8>)>,
    mut ends_of: impl FnMut(&[u8]) -> Ends,
) {
    let mut buf = vec![0u8; CHUNK];
    let mut last = Instant::now();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let ends = ends_of(&buf[..n]);
        let link = shared.links.get(ends.0, ends.1);
        // Never before the chunk ahead of it: a byte stream keeps its order.
        let due = (Instant::now() + link.delay_now(&shared.dice)).max(last);
        last = due;
        if queue.send((due, ends, buf[..n].to_vec())).await.is_err() {
            return;
        }
    }
}

/// Writes each queued chunk when it is due, holding it while its link is
/// down.
async fn deliver(
    shared: Arc<Shared>,
    mut queue: mpsc::Receiver<(Instant, Ends, Vec<u8>)>,
    mut to: OwnedWriteHalf,
) {
    while let Some((due, (from, at), chunk)) = queue.recv().await {
        tokio::time::sleep_until(due).await;
        while !shared.links.get(from, at).up {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&chunk).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

/// The value of an `X-Server-From` header in the bytes a connection began
/// with, once its line is complete.
fn sender_tag(head: &[u8]) -> Option<String> {
    // Only whole lines: up to the end of the headers, or else the last
    // line break so far (a body may follow them, cut mid-character).
    let end = match head.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => end,
        None => head.windows(2).rposition(|w| w == b"\r\n")?,
    };
    let headers = std::str::from_utf8(&head[..end]).ok()?;
    for line in headers.split("\r\n").skip(1) {
        let (name, value) = line.split_once(':')?;
        if name.trim().eq_ignore_ascii_case("x-server-from") {
            let value = value.trim();
            if !value.is_empty()
                && value.len() <= 16
                && value.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Some(value.to_ascii_lowercase());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sender_is_read_from_the_first_request_s_headers() {
        let head = b"GET /raft/stream/msgappv2/8e9e05c52164694d HTTP/1.1\r\nHost: x\r\nX-Server-From: 91BC3C398FB3C146\r\nX-Etcd-Cluster-ID: 1\r\n\r\n";
        assert_eq!(sender_tag(head).as_deref(), Some("91bc3c398fb3c146"));
        // Not yet complete, or not a peer request: no sender.
        assert_eq!(sender_tag(b"GET / HTTP/1.1\r\nX-Server-Fr"), None);
        assert_eq!(sender_tag(b"GET / HTTP/1.1\r\nX-Server-From: 91b"), None);
        assert_eq!(
            sender_tag(b"GET / HTTP/1.1\r\nX-Server-From: 91b\r\n").as_deref(),
            Some("91b")
        );
        assert_eq!(
            sender_tag(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"),
            None
        );
        assert_eq!(sender_tag(b"\x16\x03\x01\x02\x00garbage"), None);
    }

    /// A link switched down holds what it carries, and delivers it once up.
    #[tokio::test]
    async fn a_tcp_link_that_is_down_holds_its_bytes() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fabric = TcpFabric::start(&[(2, server.local_addr().unwrap())])
            .await
            .unwrap();
        fabric.name("a1", 1);
        fabric.switch(1, 2, false);
        let mut client = TcpStream::connect(fabric.front(2)).await.unwrap();
        client
            .write_all(b"POST /raft HTTP/1.1\r\nX-Server-From: a1\r\n\r\nheld")
            .await
            .unwrap();
        let (mut conn, _) = server.accept().await.unwrap();
        let mut buf = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(300), conn.read(&mut buf)).await;
        assert!(early.is_err(), "a link that is down passed {early:?}");
        fabric.switch(1, 2, true);
        let mut got = Vec::new();
        while !got.ends_with(b"held") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the held bytes");
            got.extend_from_slice(&buf[..n]);
        }
    }

    /// Bytes cross both ways, in order, each direction after its own delay,
    /// once the sender is named.
    #[tokio::test]
    async fn a_tcp_relay_delays_each_direction_and_keeps_the_order() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let fabric = TcpFabric::start(&[(2, addr)]).await.unwrap();
        fabric.name("abc", 1);
        let ms = |m| Link {
            delay: Duration::from_millis(m),
            ..Link::default()
        };
        fabric.set(1, 2, ms(300));
        fabric.set(2, 1, ms(60));
        let started = Instant::now();
        let mut client = TcpStream::connect(fabric.front(2)).await.unwrap();
        let request = b"POST /raft HTTP/1.1\r\nX-Server-From: abc\r\n\r\n";
        client.write_all(request).await.unwrap();
        for i in 0..50u8 {
            client.write_all(&[i]).await.unwrap();
        }
        let (mut conn, _) = server.accept().await.unwrap();
        let mut got = vec![0u8; request.len() + 50];
        conn.read_exact(&mut got).await.unwrap();
        let there = started.elapsed();
        assert!(there >= Duration::from_millis(300), "{there:?}");
        assert_eq!(&got[request.len()..], &(0..50).collect::<Vec<u8>>()[..]);
        let back = Instant::now();
        conn.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        let mut answer = [0u8; 19];
        client.read_exact(&mut answer).await.unwrap();
        let took = back.elapsed();
        assert!(took >= Duration::from_millis(60), "{took:?}");
        // Not the other direction's delay.
        assert!(
            took < Duration::from_millis(300),
            "the answer took {took:?}"
        );
        // Bytes queued behind a delay still cross when their sender closes.
        conn.write_all(b"last words").await.unwrap();
        drop(conn);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"last words");
    }
}
