//! The receiving side: streams peers opened, their hellos, message
//! frames and questions.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ballot_core::{Inbound, ReplicaId};
use quinn::{Endpoint, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::budget::Budget;
use crate::metrics::{label, Metrics};
use crate::tls::{self};

use super::frame::{decode_messages, frame, parse_hello, read_frame, FrameError};
use super::{
    spawn, Hooks, Received, ServiceCall, ADMIT_ANSWER, ADMIT_QUESTION, CLOSE_DIRECTORY,
    CLOSE_IDENTITY, CLOSE_MALFORMED, FRAME_MAX, KIND_ANSWER, KIND_HELLO, KIND_MESSAGES,
    KIND_REQUEST, KIND_STAMPED,
};

pub(super) async fn accept_loop(
    endpoint: Endpoint,
    (inbound, inbound_bytes): (mpsc::Sender<Received>, Budget),
    metrics: Arc<Metrics>,
    epoch: Arc<AtomicU64>,
    hooks: Arc<Hooks>,
    members: Arc<RwLock<HashSet<ReplicaId>>>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let inbound = (inbound.clone(), inbound_bytes.clone());
        let metrics = metrics.clone();
        let epoch = epoch.clone();
        let hooks = hooks.clone();
        let members = members.clone();
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
                        let (connection, cert, inbound, metrics, epoch, hooks, members) = (
                            connection.clone(), cert.clone(), inbound.clone(), metrics.clone(),
                            epoch.clone(), hooks.clone(), members.clone(),
                        );
                        spawn(async move {
                            let r = receive(stream, &cert, &inbound, &metrics, &epoch, &hooks, &members).await;
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
pub(super) fn refuse(
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
pub(super) async fn hello(
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

pub(super) async fn receive(
    mut stream: RecvStream,
    cert: &CertificateDer<'static>,
    (inbound, inbound_bytes): &(mpsc::Sender<Received>, Budget),
    metrics: &Metrics,
    epoch: &AtomicU64,
    hooks: &Hooks,
    members: &RwLock<HashSet<ReplicaId>>,
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
        // A certified replica that is not a member here may connect (a
        // joiner asks questions before it is one), but its protocol
        // messages go no further than this.
        if !members.read().expect("members lock").contains(&from) {
            metrics.inbound_nonmember.inc();
            continue;
        }
        let messages = decode_messages(&body).map_err(malformed)?;
        let batch: Vec<Inbound> = messages
            .into_iter()
            .map(|(key, payload)| Inbound { from, key, payload })
            .collect();
        let count = batch.len() as u64;
        let queued = inbound_bytes.charge(body.len()).is_some_and(|charge| {
            let received = Received {
                messages: batch,
                _charge: charge,
            };
            inbound.try_send(received).is_ok()
        });
        if !queued {
            metrics.inbound_dropped.inc_by(count);
        }
    }
}

/// Serves one request stream: hello, request, then the answer.
pub(super) async fn answer(
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
