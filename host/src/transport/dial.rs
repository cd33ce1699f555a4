//! The sending side: one dialed connection and one stream per peer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ballot_core::ReplicaId;
use quinn::{Endpoint, SendStream, VarInt};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::metrics::{label, Metrics};
use crate::storage::DirIdentity;
use crate::tls::{self};

use super::frame::{encode_messages, frame, hello_body};
use super::{Link, CLOSE_DIRECTORY, FRAME_MAX, FRAME_TARGET, KIND_HELLO, KIND_STAMPED};

#[allow(clippy::too_many_arguments)]
pub(super) async fn dial_loop(
    endpoint: Endpoint,
    self_id: ReplicaId,
    peer: ReplicaId,
    addr: SocketAddr,
    mut queue: mpsc::Receiver<super::Queued>,
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
            dropped += batch.0.len() as u64;
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

pub(super) async fn dial(
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
pub(super) async fn pump(
    queue: &mut mpsc::Receiver<super::Queued>,
    stream: &mut SendStream,
    epoch: &AtomicU64,
) -> Option<String> {
    let mut body = Vec::new();
    let mut out = Vec::new();
    loop {
        // A batch's charge goes back as it is taken: from here its bytes
        // are this frame's, bounded by FRAME_TARGET.
        let (first, _charge) = queue.recv().await?;
        let mut messages = first;
        let mut size: usize = messages.iter().map(|(k, p)| k.len() + p.len() + 6).sum();
        while size < FRAME_TARGET {
            match queue.try_recv() {
                Ok((more, _charge)) => {
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
