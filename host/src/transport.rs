//! Replica links: QUIC (quinn) with mutual TLS.
//!
//! Each replica dials every peer and keeps one connection and one
//! unidirectional stream per peer for what it sends; what it receives
//! arrives on the connections its peers dialed. Frames (see
//! `docs/design.md`):
//!
//! ```text
//! frame    = length:u32be  format:u8 (=1)  kind:u8  body      length counts format..body
//! hello    (kind 1) = from:u32be                               first frame of every stream
//! messages (kind 2) = count:u32be { key_len:u16be key  payload_len:u32be payload }*
//! ```
//!
//! The queue to each peer is bounded: when a peer is slow or down, new
//! messages are dropped and counted (the protocol retries; it never relies on
//! delivery). A peer whose certificate does not chain to the cluster CA fails
//! the handshake; one whose certificate names another replica than its hello
//! claims, or that sends a malformed frame, is disconnected. Both are logged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballot_core::{Inbound, ReplicaId};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::metrics::{label, Metrics};
use crate::tls::{self, Identity};

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

const CLOSE_IDENTITY: u32 = 1;
const CLOSE_MALFORMED: u32 = 2;

/// One protocol message: key and opaque payload.
pub type Message = (Vec<u8>, Vec<u8>);

/// The state of the link to one peer, for `/v1/cluster` and metrics.
#[derive(Debug, Default)]
pub struct Link {
    pub up: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

/// The replica's side of every link.
pub struct Transport {
    endpoint: Endpoint,
    queues: HashMap<ReplicaId, mpsc::Sender<Vec<Message>>>,
    pub links: HashMap<ReplicaId, Arc<Link>>,
    metrics: Arc<Metrics>,
}

/// A malformed frame or stream.
#[derive(Debug)]
pub struct FrameError(pub String);

impl Transport {
    /// Binds `listen` and starts dialing `peers` (id, address). Messages that
    /// arrive are passed, one frame's worth at a time, to `inbound`.
    pub fn start(
        self_id: ReplicaId,
        listen: SocketAddr,
        peers: &[(ReplicaId, SocketAddr)],
        identity: &Identity,
        inbound: mpsc::Sender<Vec<Inbound>>,
        metrics: Arc<Metrics>,
    ) -> Result<Transport, String> {
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(Duration::from_millis(500)))
            .max_idle_timeout(Some(VarInt::from_u32(3_000).into()))
            .max_concurrent_uni_streams(VarInt::from_u32(16));
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

        let known: Arc<Vec<ReplicaId>> = Arc::new(peers.iter().map(|(id, _)| *id).collect());
        spawn(accept_loop(
            endpoint.clone(),
            known,
            inbound,
            metrics.clone(),
        ));

        let mut queues = HashMap::new();
        let mut links = HashMap::new();
        for &(id, addr) in peers {
            if id == self_id {
                continue;
            }
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            let link = Arc::new(Link::default());
            metrics
                .peer_connected
                .get_or_create(&label("peer", id.to_string()))
                .set(0);
            spawn(dial_loop(
                endpoint.clone(),
                self_id,
                id,
                addr,
                rx,
                link.clone(),
                metrics.clone(),
            ));
            queues.insert(id, tx);
            links.insert(id, link);
        }
        Ok(Transport {
            endpoint,
            queues,
            links,
            metrics,
        })
    }

    /// Queues messages to peer `to`; drops them (counted) if its queue is full.
    pub fn send(&self, to: ReplicaId, messages: Vec<Message>) {
        let Some(queue) = self.queues.get(&to) else {
            warn!(
                peer = to,
                "the protocol sent to an unknown replica; dropped"
            );
            return;
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

async fn dial_loop(
    endpoint: Endpoint,
    self_id: ReplicaId,
    peer: ReplicaId,
    addr: SocketAddr,
    mut queue: mpsc::Receiver<Vec<Message>>,
    link: Arc<Link>,
    metrics: Arc<Metrics>,
) {
    let peer_label = label("peer", peer.to_string());
    let mut backoff = Duration::from_millis(50);
    let mut logged_down = false;
    loop {
        match dial(&endpoint, self_id, peer, addr).await {
            Ok((connection, mut stream)) => {
                info!(peer, %addr, "link up");
                logged_down = false;
                backoff = Duration::from_millis(50);
                link.up.store(true, Ordering::Relaxed);
                metrics.peer_connected.get_or_create(&peer_label).set(1);
                let reason = tokio::select! {
                    r = pump(&mut queue, &mut stream) => r,
                    e = connection.closed() => Some(e.to_string()),
                };
                link.up.store(false, Ordering::Relaxed);
                metrics.peer_connected.get_or_create(&peer_label).set(0);
                let Some(reason) = reason else {
                    // The replica is shutting down.
                    connection.close(VarInt::from_u32(0), b"shutting down");
                    return;
                };
                warn!(peer, %addr, "link down: {reason}");
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
    let mut hello = Vec::with_capacity(10);
    frame(&mut hello, KIND_HELLO, &self_id.to_be_bytes());
    stream.write_all(&hello).await.map_err(|e| e.to_string())?;
    Ok((connection, stream))
}

/// Sends queued messages until the stream fails (`Some(reason)`) or the
/// queue closes (`None`).
async fn pump(queue: &mut mpsc::Receiver<Vec<Message>>, stream: &mut SendStream) -> Option<String> {
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
        encode_messages(&mut body, &messages);
        out.clear();
        frame(&mut out, KIND_MESSAGES, &body);
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
    known: Arc<Vec<ReplicaId>>,
    inbound: mpsc::Sender<Vec<Inbound>>,
    metrics: Arc<Metrics>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let known = known.clone();
        let inbound = inbound.clone();
        let metrics = metrics.clone();
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
            while let Ok(stream) = connection.accept_uni().await {
                let connection = connection.clone();
                let (known, inbound, metrics, cert) = (
                    known.clone(),
                    inbound.clone(),
                    metrics.clone(),
                    cert.clone(),
                );
                spawn(async move {
                    if let Err((code, e)) = receive(stream, &cert, &known, &inbound, &metrics).await
                    {
                        warn!(%remote, "closed a peer connection: {}", e.0);
                        let reason = if code == CLOSE_IDENTITY {
                            "identity"
                        } else {
                            "malformed"
                        };
                        metrics
                            .peer_refused
                            .get_or_create(&label("reason", reason))
                            .inc();
                        connection.close(VarInt::from_u32(code), e.0.as_bytes());
                    }
                });
            }
        });
    }
}

async fn receive(
    mut stream: RecvStream,
    cert: &CertificateDer<'static>,
    known: &[ReplicaId],
    inbound: &mpsc::Sender<Vec<Inbound>>,
    metrics: &Metrics,
) -> Result<(), (u32, FrameError)> {
    let malformed = |e: FrameError| (CLOSE_MALFORMED, e);
    let from = match read_frame(&mut stream).await.map_err(malformed)? {
        Some((KIND_HELLO, body)) if body.len() == 4 => {
            u32::from_be_bytes(body.try_into().expect("4 bytes"))
        }
        Some(_) => return Err(malformed(FrameError("expected a hello frame first".into()))),
        None => return Ok(()),
    };
    if !known.contains(&from) {
        return Err((
            CLOSE_IDENTITY,
            FrameError(format!("replica {from} is not a peer")),
        ));
    }
    tls::certifies(cert, from).map_err(|e| {
        (
            CLOSE_IDENTITY,
            FrameError(format!("the certificate does not name replica {from}: {e}")),
        )
    })?;
    loop {
        match read_frame(&mut stream).await.map_err(malformed)? {
            None => return Ok(()),
            Some((KIND_MESSAGES, body)) => {
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
            Some((kind, _)) => {
                return Err(malformed(FrameError(format!("unknown frame kind {kind}"))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
