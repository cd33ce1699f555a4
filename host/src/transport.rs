//! Replica links: QUIC (quinn) with mutual TLS.
//!
//! Each replica dials every other member and keeps one connection and one
//! unidirectional stream per peer for what it sends; what it receives
//! arrives on the connections its peers dialed. The set of peers follows
//! the membership ([`Transport::set_peers`]). Replicas also ask each other
//! questions (membership, catch-up listings, progress) on bidirectional
//! streams of the same connections. Frames (see `docs/design.md`):
//!
//! ```text
//! frame    = length:u32be  format:u8 (=1)  kind:u8  body      length counts format..body
//! hello    (kind 1) = from:u32be  directory:16 bytes           first frame of every stream
//! messages (kind 2) = count:u32be { key_len:u16be key  payload_len:u32be payload }*
//! stamped  (kind 3) = epoch:u64be  then a kind-2 body          the sender's membership epoch
//! request  (kind 4) = JSON                                     on a bidirectional stream
//! answer   (kind 5) = JSON                                     the one reply to a request
//! ```
//!
//! A stamped frame from a peer on a newer epoch than this replica's is
//! reported (`Hooks::ahead`), so a replica left behind by a configuration
//! change fetches the new one at once.
//!
//! The queue to each peer is bounded: when a peer is slow or down, new
//! messages are dropped and counted (the protocol retries; it never relies on
//! delivery). A peer whose certificate does not chain to the cluster CA fails
//! the handshake; one whose certificate names another replica than its hello
//! claims, or that sends a malformed frame, is disconnected. Both are logged.
//!
//! The hello also carries the sender's data-directory identity
//! ([`crate::storage::DirIdentity`]). The receiver records the first one it
//! sees for each replica id and refuses every stream that presents another
//! (`Hooks::check_directory`): a replica that lost its directory comes back
//! with a new identity, and its votes and answers must not count until it is
//! removed and added again through the learner stages. A 4-byte hello (a
//! build from before identities) is accepted only from a replica id no
//! identity is recorded for.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballot_core::{Inbound, ReplicaId};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::metrics::{label, Metrics};
use crate::storage::{DirIdentity, IDENTITY_LEN};
use crate::tls::{self, Identity};

/// A question a replica on a new data directory asks each start-up peer
/// before it votes. Any answer means the peer took its hello (the
/// directory it presents); a peer that knows the replica by another
/// directory closes the connection instead (code 3).
pub const ADMIT_QUESTION: &[u8] = br#"{"ask":"admit"}"#;
const ADMIT_ANSWER: &[u8] = br#"{"answer":"admitted"}"#;

/// Format byte of every frame.
pub const FRAME_FORMAT: u8 = 1;
/// Largest frame accepted or sent (format, kind and body).
pub const FRAME_MAX: usize = 16 << 20;
/// A sender packs queued messages into one frame up to about this size.
const FRAME_TARGET: usize = 1 << 20;
/// Batches of messages queued to one peer.
pub const PEER_QUEUE: usize = 4096;

/// Spawns a task that logs inside the caller's span (the replica's).
fn spawn<F>(task: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(tracing::Instrument::instrument(
        task,
        tracing::Span::current(),
    ));
}

const KIND_HELLO: u8 = 1;
const KIND_MESSAGES: u8 = 2;
const KIND_STAMPED: u8 = 3;
const KIND_REQUEST: u8 = 4;
const KIND_ANSWER: u8 = 5;
/// Longest a request waits for its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

const CLOSE_IDENTITY: u32 = 1;
const CLOSE_MALFORMED: u32 = 2;
const CLOSE_DIRECTORY: u32 = 3;

/// One protocol message: key and opaque payload.
pub type Message = (Vec<u8>, Vec<u8>);

/// The state of the link to one peer, for `/v1/cluster` and metrics.
#[derive(Debug, Default)]
pub struct Link {
    pub up: AtomicBool,
    pub last_error: Mutex<Option<String>>,
    /// The peer closed this replica's connection because it knows this
    /// replica id by another data directory (its reason), since start-up.
    pub refused_directory: Mutex<Option<String>>,
    /// The connection this replica dialed, while it is up.
    connection: Mutex<Option<quinn::Connection>>,
}

/// A question from a peer (`from`), and where its answer goes.
pub struct ServiceCall {
    pub from: ReplicaId,
    pub request: Vec<u8>,
    pub reply: oneshot::Sender<Vec<u8>>,
}

/// Where the transport reports what the membership layer acts on.
pub struct Hooks {
    /// A peer stamped a frame with a newer epoch than ours: (peer, epoch),
    /// reported once per peer and epoch (see [`Hooks::note_ahead`]).
    /// Bounded: a report that finds it full is dropped (the 2 s poll
    /// finds the newer epoch anyway), so a peer that stamps ever newer
    /// epochs cannot grow memory.
    pub ahead: mpsc::Sender<(ReplicaId, u64)>,
    /// The newest epoch reported on `ahead`, per peer.
    pub ahead_seen: Mutex<HashMap<ReplicaId, u64>>,
    /// Requests from peers.
    pub service: mpsc::Sender<ServiceCall>,
    /// This replica's data-directory identity, sent in every hello.
    pub directory: DirIdentity,
    /// Checks (and on first sight records) the data-directory identity a
    /// peer presents (`None`: a hello without one); an error refuses the
    /// stream with that reason.
    pub check_directory:
        Box<dyn Fn(ReplicaId, Option<&DirIdentity>) -> Result<(), String> + Send + Sync>,
}

impl Hooks {
    /// Whether a frame `from` a peer stamped with epoch `theirs` is news
    /// to report, this replica being at `mine`: newer than `mine` and than
    /// anything that peer stamped before. Each peer has its own mark, so a
    /// peer that stamps a huge epoch (a bug, or a hostile member) silences
    /// only itself, never another peer's report of a real newer epoch.
    pub fn note_ahead(&self, from: ReplicaId, theirs: u64, mine: u64) -> bool {
        if theirs <= mine {
            return false;
        }
        let mut seen = self.ahead_seen.lock().expect("ahead lock");
        let mark = seen.entry(from).or_insert(0);
        if theirs > *mark {
            *mark = theirs;
            true
        } else {
            false
        }
    }
}

struct PeerSlot {
    addr: SocketAddr,
    queue: mpsc::Sender<Vec<Message>>,
    link: Arc<Link>,
}

/// The replica's side of every link.
pub struct Transport {
    endpoint: Endpoint,
    self_id: ReplicaId,
    peers: Mutex<HashMap<ReplicaId, PeerSlot>>,
    metrics: Arc<Metrics>,
    /// The membership epoch this replica runs; stamps what it sends.
    epoch: Arc<AtomicU64>,
    /// This replica's data-directory identity.
    directory: DirIdentity,
}

/// A malformed frame or stream.
#[derive(Debug)]
pub struct FrameError(pub String);

impl Transport {
    /// Binds `listen` and starts dialing `peers` (id, address). Messages that
    /// arrive are passed, one frame's worth at a time, to `inbound`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        self_id: ReplicaId,
        listen: SocketAddr,
        peers: &[(ReplicaId, SocketAddr)],
        identity: &Identity,
        inbound: mpsc::Sender<Vec<Inbound>>,
        metrics: Arc<Metrics>,
        epoch: Arc<AtomicU64>,
        hooks: Hooks,
    ) -> Result<Transport, String> {
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(Duration::from_millis(500)))
            .max_idle_timeout(Some(VarInt::from_u32(3_000).into()))
            .max_concurrent_uni_streams(VarInt::from_u32(16))
            .max_concurrent_bidi_streams(VarInt::from_u32(64));
        let transport = Arc::new(transport);
        let server_tls = identity.server_config().map_err(|e| e.to_string())?;
        let server_crypto = QuicServerConfig::try_from(server_tls).map_err(|e| e.to_string())?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        let client_tls = identity.client_config().map_err(|e| e.to_string())?;
        let client_crypto = QuicClientConfig::try_from(client_tls).map_err(|e| e.to_string())?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);
        let mut endpoint = Endpoint::server(server, listen)
            .map_err(|e| format!("binding the peer address {listen}: {e}"))?;
        endpoint.set_default_client_config(client);
        let directory = hooks.directory;
        spawn(accept_loop(
            endpoint.clone(),
            inbound,
            metrics.clone(),
            epoch.clone(),
            Arc::new(hooks),
        ));
        let transport = Transport {
            endpoint,
            self_id,
            peers: Mutex::new(HashMap::new()),
            metrics,
            epoch,
            directory,
        };
        transport.set_peers(peers);
        Ok(transport)
    }

    /// Dials exactly `peers` from now on: starts links to new ones (or to
    /// a new address), closes links to those no longer listed.
    pub fn set_peers(&self, peers: &[(ReplicaId, SocketAddr)]) {
        let mut slots = self.peers.lock().expect("peers lock");
        let wanted: HashMap<ReplicaId, SocketAddr> = peers
            .iter()
            .filter(|(id, _)| *id != self.self_id)
            .copied()
            .collect();
        slots.retain(|id, slot| {
            let keep = wanted.get(id) == Some(&slot.addr);
            if !keep {
                info!(peer = id, addr = %slot.addr, "link closed: no longer a peer here");
                self.metrics
                    .peer_connected
                    .get_or_create(&label("peer", id.to_string()))
                    .set(0);
            }
            // Dropping the queue's sender ends the dial loop.
            keep
        });
        for (&id, &addr) in &wanted {
            if slots.contains_key(&id) {
                continue;
            }
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            let link = Arc::new(Link::default());
            self.metrics
                .peer_connected
                .get_or_create(&label("peer", id.to_string()))
                .set(0);
            spawn(dial_loop(
                self.endpoint.clone(),
                self.self_id,
                id,
                addr,
                rx,
                link.clone(),
                self.metrics.clone(),
                self.epoch.clone(),
                self.directory,
            ));
            slots.insert(
                id,
                PeerSlot {
                    addr,
                    queue: tx,
                    link,
                },
            );
        }
    }

    /// The membership epoch the running protocol instance votes in (what
    /// this replica stamps on its frames).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The link to every peer: (id, address, link).
    pub fn links(&self) -> Vec<(ReplicaId, SocketAddr, Arc<Link>)> {
        let slots = self.peers.lock().expect("peers lock");
        let mut out: Vec<_> = slots
            .iter()
            .map(|(id, s)| (*id, s.addr, s.link.clone()))
            .collect();
        out.sort_by_key(|(id, _, _)| *id);
        out
    }

    /// The link to `peer`, if it is one.
    pub fn link(&self, peer: ReplicaId) -> Option<Arc<Link>> {
        let slots = self.peers.lock().expect("peers lock");
        slots.get(&peer).map(|s| s.link.clone())
    }

    /// Asks `peer` a question on a new bidirectional stream of the link's
    /// connection and waits for the answer.
    pub async fn request(&self, peer: ReplicaId, request: &[u8]) -> Result<Vec<u8>, String> {
        let connection = self
            .link(peer)
            .and_then(|l| l.connection.lock().expect("link lock").clone())
            .ok_or_else(|| format!("no link to replica {peer}"))?;
        let exchange = async {
            let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
            let mut out = Vec::with_capacity(request.len() + 40);
            frame(
                &mut out,
                KIND_HELLO,
                &hello_body(self.self_id, &self.directory),
            );
            frame(&mut out, KIND_REQUEST, request);
            send.write_all(&out).await.map_err(|e| e.to_string())?;
            let _ = send.finish();
            match read_frame(&mut recv).await.map_err(|e| e.0)? {
                Some((KIND_ANSWER, body)) => Ok(body),
                Some((kind, _)) => Err(format!("expected an answer frame, got kind {kind}")),
                None => Err("the peer closed the stream without answering".into()),
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("replica {peer} did not answer within {REQUEST_TIMEOUT:?}"))?
    }

    /// Queues messages to peer `to`; drops them (counted) if its queue is full.
    pub fn send(&self, to: ReplicaId, messages: Vec<Message>) {
        let queue = {
            let slots = self.peers.lock().expect("peers lock");
            match slots.get(&to) {
                Some(slot) => slot.queue.clone(),
                None => {
                    debug!(
                        peer = to,
                        "the protocol sent to a replica without a link; dropped"
                    );
                    return;
                }
            }
        };
        let count = messages.len() as u64;
        if queue.try_send(messages).is_err() {
            self.metrics
                .peer_dropped
                .get_or_create(&label("peer", to.to_string()))
                .inc_by(count);
        }
    }

    /// Closes every connection.
    pub fn close(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"shutting down");
    }
}

#[allow(clippy::too_many_arguments)]
async fn dial_loop(
    endpoint: Endpoint,
    self_id: ReplicaId,
    peer: ReplicaId,
    addr: SocketAddr,
    mut queue: mpsc::Receiver<Vec<Message>>,
    link: Arc<Link>,
    metrics: Arc<Metrics>,
    epoch: Arc<AtomicU64>,
    directory: DirIdentity,
) {
    let peer_label = label("peer", peer.to_string());
    let mut backoff = Duration::from_millis(50);
    let mut logged_down = false;
    loop {
        match dial(&endpoint, self_id, &directory, peer, addr).await {
            Ok((connection, mut stream)) => {
                info!(peer, %addr, "link up");
                logged_down = false;
                let up_at = std::time::Instant::now();
                link.up.store(true, Ordering::Relaxed);
                *link.connection.lock().expect("link lock") = Some(connection.clone());
                metrics.peer_connected.get_or_create(&peer_label).set(1);
                let reason = tokio::select! {
                    r = pump(&mut queue, &mut stream, &epoch) => r,
                    e = connection.closed() => Some(e.to_string()),
                };
                link.up.store(false, Ordering::Relaxed);
                *link.connection.lock().expect("link lock") = None;
                metrics.peer_connected.get_or_create(&peer_label).set(0);
                let Some(reason) = reason else {
                    // The replica is shutting down.
                    connection.close(VarInt::from_u32(0), b"shutting down");
                    return;
                };
                if let Some(quinn::ConnectionError::ApplicationClosed(close)) =
                    connection.close_reason()
                {
                    if close.error_code == VarInt::from_u32(CLOSE_DIRECTORY) {
                        *link.refused_directory.lock().expect("link lock") =
                            Some(String::from_utf8_lossy(&close.reason).into_owned());
                    }
                }
                warn!(peer, %addr, "link down: {reason}");
                // A link the peer closes at once (it refuses this replica)
                // keeps backing off; one that carried traffic redials soon.
                if up_at.elapsed() > Duration::from_secs(1) {
                    backoff = Duration::from_millis(50);
                }
                *link.last_error.lock().expect("link lock") = Some(reason);
            }
            Err(e) => {
                if !logged_down {
                    warn!(peer, %addr, "cannot reach peer: {e}; retrying with backoff");
                    logged_down = true;
                } else {
                    debug!(peer, %addr, "cannot reach peer: {e}");
                }
                *link.last_error.lock().expect("link lock") = Some(e);
            }
        }
        // While the link is down, what is queued is stale: drop it.
        let mut dropped = 0;
        while let Ok(batch) = queue.try_recv() {
            dropped += batch.len() as u64;
        }
        if dropped > 0 {
            metrics
                .peer_dropped
                .get_or_create(&peer_label)
                .inc_by(dropped);
        }
        if queue.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn dial(
    endpoint: &Endpoint,
    self_id: ReplicaId,
    directory: &DirIdentity,
    peer: ReplicaId,
    addr: SocketAddr,
) -> Result<(quinn::Connection, SendStream), String> {
    let connecting = endpoint
        .connect(addr, &tls::node_name(peer))
        .map_err(|e| e.to_string())?;
    let connection = tokio::time::timeout(Duration::from_secs(3), connecting)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let mut stream = connection.open_uni().await.map_err(|e| e.to_string())?;
    let mut hello = Vec::with_capacity(32);
    frame(&mut hello, KIND_HELLO, &hello_body(self_id, directory));
    stream.write_all(&hello).await.map_err(|e| e.to_string())?;
    Ok((connection, stream))
}

/// Sends queued messages until the stream fails (`Some(reason)`) or the
/// queue closes (`None`).
async fn pump(
    queue: &mut mpsc::Receiver<Vec<Message>>,
    stream: &mut SendStream,
    epoch: &AtomicU64,
) -> Option<String> {
    let mut body = Vec::new();
    let mut out = Vec::new();
    loop {
        let first = queue.recv().await?;
        let mut messages = first;
        let mut size: usize = messages.iter().map(|(k, p)| k.len() + p.len() + 6).sum();
        while size < FRAME_TARGET {
            match queue.try_recv() {
                Ok(more) => {
                    size += more
                        .iter()
                        .map(|(k, p)| k.len() + p.len() + 6)
                        .sum::<usize>();
                    messages.extend(more);
                }
                Err(_) => break,
            }
        }
        body.clear();
        body.extend_from_slice(&epoch.load(Ordering::Acquire).to_be_bytes());
        encode_messages(&mut body, &messages);
        out.clear();
        frame(&mut out, KIND_STAMPED, &body);
        if out.len() > FRAME_MAX + 4 {
            warn!(
                "dropped {} messages that do not fit one frame",
                messages.len()
            );
            continue;
        }
        if let Err(e) = stream.write_all(&out).await {
            return Some(e.to_string());
        }
    }
}

/// A hello's body: the sender's id and data-directory identity.
fn hello_body(from: ReplicaId, directory: &DirIdentity) -> Vec<u8> {
    let mut body = Vec::with_capacity(4 + IDENTITY_LEN);
    body.extend_from_slice(&from.to_be_bytes());
    body.extend_from_slice(directory);
    body
}

/// Parses a hello's body: 4 bytes (no identity) or 4 + 16.
fn parse_hello(body: &[u8]) -> Option<(ReplicaId, Option<DirIdentity>)> {
    let from = u32::from_be_bytes(body.get(..4)?.try_into().ok()?);
    match body.len() {
        4 => Some((from, None)),
        n if n == 4 + IDENTITY_LEN => Some((from, Some(body[4..].try_into().ok()?))),
        _ => None,
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.extend_from_slice(&((body.len() + 2) as u32).to_be_bytes());
    out.push(FRAME_FORMAT);
    out.push(kind);
    out.extend_from_slice(body);
}

/// Encodes the body of a messages frame.
pub fn encode_messages(out: &mut Vec<u8>, messages: &[Message]) {
    out.extend_from_slice(&(messages.len() as u32).to_be_bytes());
    for (key, payload) in messages {
        out.extend_from_slice(&(key.len() as u16).to_be_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
    }
}

/// Decodes the body of a messages frame.
pub fn decode_messages(mut body: &[u8]) -> Result<Vec<Message>, FrameError> {
    let bad = |what: &str| FrameError(format!("malformed messages frame: {what}"));
    let take = |n: usize, body: &mut &[u8]| -> Result<Vec<u8>, FrameError> {
        if body.len() < n {
            return Err(bad("truncated"));
        }
        let (head, rest) = body.split_at(n);
        *body = rest;
        Ok(head.to_vec())
    };
    let count = u32::from_be_bytes(take(4, &mut body)?.try_into().expect("4 bytes")) as usize;
    // Each message takes at least 6 bytes: refuse counts the body cannot hold.
    if count > body.len() / 6 {
        return Err(bad("count exceeds the frame"));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let key_len = u16::from_be_bytes(take(2, &mut body)?.try_into().expect("2 bytes")) as usize;
        let key = take(key_len, &mut body)?;
        let len = u32::from_be_bytes(take(4, &mut body)?.try_into().expect("4 bytes")) as usize;
        let payload = take(len, &mut body)?;
        out.push((key, payload));
    }
    if !body.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(out)
}

/// Reads one frame: (kind, body).
async fn read_frame(stream: &mut RecvStream) -> Result<Option<(u8, Vec<u8>)>, FrameError> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(FrameError(format!("reading: {e}"))),
    }
    let len = u32::from_be_bytes(len) as usize;
    if !(2..=FRAME_MAX).contains(&len) {
        return Err(FrameError(format!("frame length {len} out of bounds")));
    }
    let mut buf = vec![0u8; len];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(|e| FrameError(format!("reading: {e}")))?;
    if buf[0] != FRAME_FORMAT {
        return Err(FrameError(format!(
            "frame format {} is not supported (this build speaks {FRAME_FORMAT})",
            buf[0]
        )));
    }
    let kind = buf[1];
    buf.drain(..2);
    Ok(Some((kind, buf)))
}

async fn accept_loop(
    endpoint: Endpoint,
    inbound: mpsc::Sender<Vec<Inbound>>,
    metrics: Arc<Metrics>,
    epoch: Arc<AtomicU64>,
    hooks: Arc<Hooks>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let inbound = inbound.clone();
        let metrics = metrics.clone();
        let epoch = epoch.clone();
        let hooks = hooks.clone();
        spawn(async move {
            let remote = incoming.remote_address();
            let connection = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    warn!(%remote, "refused a peer connection: {e}");
                    metrics
                        .peer_refused
                        .get_or_create(&label("reason", "handshake"))
                        .inc();
                    return;
                }
            };
            let cert = connection
                .peer_identity()
                .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
                .and_then(|chain| chain.first().cloned());
            let Some(cert) = cert else {
                warn!(%remote, "refused a peer connection: no client certificate");
                connection.close(VarInt::from_u32(CLOSE_IDENTITY), b"no certificate");
                return;
            };
            loop {
                tokio::select! {
                    uni = connection.accept_uni() => {
                        let Ok(stream) = uni else { return };
                        let (connection, cert, inbound, metrics, epoch, hooks) = (
                            connection.clone(), cert.clone(), inbound.clone(), metrics.clone(),
                            epoch.clone(), hooks.clone(),
                        );
                        spawn(async move {
                            let r = receive(stream, &cert, &inbound, &metrics, &epoch, &hooks).await;
                            if let Err((code, e)) = r {
                                refuse(&connection, remote, &metrics, code, e);
                            }
                        });
                    }
                    bi = connection.accept_bi() => {
                        let Ok((send, recv)) = bi else { return };
                        let (connection, cert, hooks, metrics) =
                            (connection.clone(), cert.clone(), hooks.clone(), metrics.clone());
                        spawn(async move {
                            if let Err((code, e)) = answer(send, recv, &cert, &hooks).await {
                                refuse(&connection, remote, &metrics, code, e);
                            }
                        });
                    }
                }
            }
        });
    }
}

/// Closes a connection that broke the rules, and counts it.
fn refuse(
    connection: &quinn::Connection,
    remote: SocketAddr,
    metrics: &Metrics,
    code: u32,
    e: FrameError,
) {
    warn!(%remote, "closed a peer connection: {}", e.0);
    let reason = match code {
        CLOSE_IDENTITY => "identity",
        CLOSE_DIRECTORY => "data-directory",
        _ => "malformed",
    };
    metrics
        .peer_refused
        .get_or_create(&label("reason", reason))
        .inc();
    connection.close(VarInt::from_u32(code), e.0.as_bytes());
}

/// Reads a stream's hello, checks the certificate names its sender and
/// that it presents the data directory this replica knows it by.
async fn hello(
    stream: &mut RecvStream,
    cert: &CertificateDer<'static>,
    hooks: &Hooks,
) -> Result<Option<ReplicaId>, (u32, FrameError)> {
    let malformed = |e: FrameError| (CLOSE_MALFORMED, e);
    let (from, directory) = match read_frame(stream).await.map_err(malformed)? {
        Some((KIND_HELLO, body)) => parse_hello(&body)
            .ok_or_else(|| malformed(FrameError("a hello frame is malformed".into())))?,
        Some(_) => return Err(malformed(FrameError("expected a hello frame first".into()))),
        None => return Ok(None),
    };
    // Any replica the cluster CA certified may connect (a replica joining
    // is not in anyone's list yet); what it may do is the protocol's and
    // the membership's business.
    tls::certifies(cert, from).map_err(|e| {
        (
            CLOSE_IDENTITY,
            FrameError(format!("the certificate does not name replica {from}: {e}")),
        )
    })?;
    (hooks.check_directory)(from, directory.as_ref())
        .map_err(|e| (CLOSE_DIRECTORY, FrameError(e)))?;
    Ok(Some(from))
}

async fn receive(
    mut stream: RecvStream,
    cert: &CertificateDer<'static>,
    inbound: &mpsc::Sender<Vec<Inbound>>,
    metrics: &Metrics,
    epoch: &AtomicU64,
    hooks: &Hooks,
) -> Result<(), (u32, FrameError)> {
    let malformed = |e: FrameError| (CLOSE_MALFORMED, e);
    let Some(from) = hello(&mut stream, cert, hooks).await? else {
        return Ok(());
    };
    loop {
        let body = match read_frame(&mut stream).await.map_err(malformed)? {
            None => return Ok(()),
            Some((KIND_MESSAGES, body)) => body,
            Some((KIND_STAMPED, mut body)) => {
                if body.len() < 8 {
                    return Err(malformed(FrameError(
                        "stamped frame without an epoch".into(),
                    )));
                }
                let theirs = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
                body.drain(..8);
                if hooks.note_ahead(from, theirs, epoch.load(Ordering::Acquire)) {
                    let _ = hooks.ahead.try_send((from, theirs));
                }
                body
            }
            Some((kind, _)) => {
                return Err(malformed(FrameError(format!("unknown frame kind {kind}"))))
            }
        };
        let messages = decode_messages(&body).map_err(malformed)?;
        let batch: Vec<Inbound> = messages
            .into_iter()
            .map(|(key, payload)| Inbound { from, key, payload })
            .collect();
        let count = batch.len() as u64;
        if inbound.try_send(batch).is_err() {
            metrics.inbound_dropped.inc_by(count);
        }
    }
}

/// Serves one request stream: hello, request, then the answer.
async fn answer(
    mut send: SendStream,
    mut recv: RecvStream,
    cert: &CertificateDer<'static>,
    hooks: &Hooks,
) -> Result<(), (u32, FrameError)> {
    let malformed = |e: FrameError| (CLOSE_MALFORMED, e);
    let Some(from) = hello(&mut recv, cert, hooks).await? else {
        return Ok(());
    };
    let request = match read_frame(&mut recv).await.map_err(malformed)? {
        // Answered here, not by the membership task: a replica waiting to
        // be admitted asks before that task runs, and so may this one.
        Some((KIND_REQUEST, body)) if body == ADMIT_QUESTION => {
            let mut out = Vec::new();
            frame(&mut out, KIND_ANSWER, ADMIT_ANSWER);
            send.write_all(&out)
                .await
                .map_err(|e| malformed(FrameError(e.to_string())))?;
            let _ = send.finish();
            return Ok(());
        }
        Some((KIND_REQUEST, body)) => body,
        Some((kind, _)) => {
            return Err(malformed(FrameError(format!(
                "expected a request frame, got kind {kind}"
            ))))
        }
        None => return Ok(()),
    };
    let (reply, answered) = oneshot::channel();
    let call = ServiceCall {
        from,
        request,
        reply,
    };
    if hooks.service.send(call).await.is_err() {
        return Ok(());
    }
    let Ok(body) = answered.await else {
        return Ok(());
    };
    let mut out = Vec::with_capacity(body.len() + 6);
    frame(&mut out, KIND_ANSWER, &body);
    if out.len() > FRAME_MAX + 4 {
        warn!(
            peer = from,
            "an answer of {} bytes does not fit a frame",
            out.len()
        );
        return Ok(());
    }
    let _ = send.write_all(&out).await;
    let _ = send.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stamped frame with epoch u64::MAX from one peer once silenced
    /// every later report (one mark for all peers): a replica left behind
    /// then never heard that its other peers had moved on.
    #[test]
    fn a_huge_stamped_epoch_silences_only_its_sender() {
        let (ahead, _reports) = mpsc::channel(1);
        let (service, _calls) = mpsc::channel(1);
        let hooks = Hooks {
            ahead,
            ahead_seen: Default::default(),
            service,
            directory: [0; IDENTITY_LEN],
            check_directory: Box::new(|_, _| Ok(())),
        };
        assert!(hooks.note_ahead(2, u64::MAX, 3));
        assert!(
            !hooks.note_ahead(2, 9, 3),
            "its own later frames are not news"
        );
        assert!(hooks.note_ahead(3, 4, 3), "another peer's newer epoch is");
        assert!(!hooks.note_ahead(3, 4, 3), "once");
        assert!(hooks.note_ahead(3, 5, 3));
        assert!(!hooks.note_ahead(1, 3, 3), "not newer than ours");
    }

    #[test]
    fn hellos_carry_the_data_directory() {
        let directory: DirIdentity = core::array::from_fn(|i| 0xa0 + i as u8);
        let body = hello_body(7, &directory);
        assert_eq!(body[..6], [0, 0, 0, 7, 0xa0, 0xa1]);
        assert_eq!(body.len(), 20);
        assert_eq!(parse_hello(&body), Some((7, Some(directory))));
        assert_eq!(parse_hello(&[0, 0, 0, 7]), Some((7, None)));
        assert_eq!(parse_hello(&body[..19]), None);
        assert_eq!(parse_hello(&[0, 0]), None);
    }

    #[test]
    fn messages_round_trip_and_fixed_bytes() {
        let messages = vec![(b"k".to_vec(), vec![1, 2]), (Vec::new(), Vec::new())];
        let mut body = Vec::new();
        encode_messages(&mut body, &messages);
        assert_eq!(
            body,
            [0, 0, 0, 2, 0, 1, b'k', 0, 0, 0, 2, 1, 2, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(decode_messages(&body).unwrap(), messages);
        let mut f = Vec::new();
        frame(&mut f, KIND_HELLO, &7u32.to_be_bytes());
        assert_eq!(f, [0, 0, 0, 6, 1, 1, 0, 0, 0, 7]);
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for body in [
            &[][..],
            &[0, 0, 0, 1][..],
            &[0, 0, 0, 1, 0, 5, b'k'][..],
            &[255, 255, 255, 255, 0, 0][..],
            &[0, 0, 0, 0, 9][..],
        ] {
            assert!(decode_messages(body).is_err(), "{body:?}");
        }
    }
}
