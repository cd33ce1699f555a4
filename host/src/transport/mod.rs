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

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ballot_core::{Inbound, ReplicaId};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, VarInt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};

use crate::budget::{Budget, Charge};
use crate::metrics::{label, Metrics};
use crate::storage::DirIdentity;
use crate::tls::Identity;

mod accept;
mod dial;
mod frame;

use accept::accept_loop;
use dial::dial_loop;
pub use frame::{decode_messages, encode_messages, FrameError};
use frame::{frame, hello_body, read_frame};

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
/// Bytes of messages queued for one peer; past it new ones are dropped and
/// counted (the protocol resends what matters).
pub const PEER_QUEUE_BYTES: usize = 64 << 20;
/// Bytes of received frames waiting for the core, from all peers; past it
/// a frame is dropped and counted.
pub const INBOUND_BYTES: usize = 256 << 20;

/// The messages of one received frame on their way to the core. They hold
/// their bytes in the inbound budget until the core takes them.
pub struct Received {
    pub messages: Vec<Inbound>,
    _charge: Charge,
}

impl Received {
    pub fn into_messages(self) -> Vec<Inbound> {
        self.messages
    }

    /// Messages as if a peer's frame had brought them, outside any budget.
    #[cfg(test)]
    pub(crate) fn unbudgeted(messages: Vec<Inbound>) -> Received {
        let charge = crate::budget::Budget::new(usize::MAX)
            .charge(0)
            .expect("an empty budget has room");
        Received {
            messages,
            _charge: charge,
        }
    }
}

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

/// Messages queued for a peer, holding their bytes in its budget.
type Queued = (Vec<Message>, Charge);

struct PeerSlot {
    addr: SocketAddr,
    queue: mpsc::Sender<Queued>,
    bytes: Budget,
    link: Arc<Link>,
}

/// The replica's side of every link.
pub struct Transport {
    endpoint: Endpoint,
    self_id: ReplicaId,
    peers: Mutex<HashMap<ReplicaId, PeerSlot>>,
    /// The replicas whose protocol messages are taken in: those `peers`
    /// lists. Messages from any other certified replica are dropped as
    /// they arrive, before they cost a storage read or a guest call.
    members: Arc<RwLock<HashSet<ReplicaId>>>,
    metrics: Arc<Metrics>,
    /// The membership epoch this replica runs; stamps what it sends.
    epoch: Arc<AtomicU64>,
    /// This replica's data-directory identity.
    directory: DirIdentity,
    /// Routes its configuration sets (`peer_routes`): these peers are
    /// dialed at these addresses, whatever address the membership record
    /// gives (a relay or a proxy in front of them).
    routes: HashMap<ReplicaId, SocketAddr>,
}

impl Transport {
    /// Binds `listen` and starts dialing `peers` (id, address), each at its
    /// route if `routes` has one for it (now and in every later
    /// [`Transport::set_peers`]). Messages that arrive are passed, one
    /// frame's worth at a time, to `inbound`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        self_id: ReplicaId,
        listen: SocketAddr,
        peers: &[(ReplicaId, SocketAddr)],
        routes: &[(ReplicaId, SocketAddr)],
        identity: &Identity,
        inbound: mpsc::Sender<Received>,
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
        let members = Arc::new(RwLock::new(HashSet::new()));
        spawn(accept_loop(
            endpoint.clone(),
            (inbound, Budget::new(INBOUND_BYTES)),
            metrics.clone(),
            epoch.clone(),
            Arc::new(hooks),
            members.clone(),
        ));
        let transport = Transport {
            endpoint,
            self_id,
            peers: Mutex::new(HashMap::new()),
            members,
            metrics,
            epoch,
            directory,
            routes: routes.iter().copied().collect(),
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
            .map(|&(id, addr)| (id, self.routes.get(&id).copied().unwrap_or(addr)))
            .collect();
        *self.members.write().expect("members lock") = wanted.keys().copied().collect();
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
            let (tx, rx) = mpsc::channel::<Queued>(PEER_QUEUE);
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
                    bytes: Budget::new(PEER_QUEUE_BYTES),
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
        let (queue, budget) = {
            let slots = self.peers.lock().expect("peers lock");
            match slots.get(&to) {
                Some(slot) => (slot.queue.clone(), slot.bytes.clone()),
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
        let bytes = messages.iter().map(|(k, p)| k.len() + p.len()).sum();
        let sent = budget
            .charge(bytes)
            .is_some_and(|charge| queue.try_send((messages, charge)).is_ok());
        if !sent {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::storage::IDENTITY_LEN;

    fn hooks() -> Hooks {
        let (ahead, _reports) = mpsc::channel(1);
        let (service, _calls) = mpsc::channel(1);
        Hooks {
            ahead,
            ahead_seen: Default::default(),
            service,
            directory: [0; IDENTITY_LEN],
            check_directory: Box::new(|_, _| Ok(())),
        }
    }

    /// A cluster CA in a fresh directory (removed on drop), issuing node
    /// identities.
    pub(crate) struct Pki(std::path::PathBuf);

    impl Pki {
        pub(crate) fn new(name: &str) -> Pki {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let dir = std::env::temp_dir().join(format!("ballot-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            crate::tls::init_ca(&dir, "test").unwrap();
            Pki(dir)
        }

        fn identity(&self, id: ReplicaId) -> Identity {
            crate::tls::issue_node(&self.0, id).unwrap();
            Identity::load(&crate::tls::TlsFiles {
                ca: crate::tls::ca_cert_path(&self.0),
                cert: crate::tls::node_cert_path(&self.0, id),
                key: crate::tls::node_key_path(&self.0, id),
            })
            .unwrap()
        }

        /// Replica `id` on a loopback port, with no peers, stamping its
        /// frames with `epoch`.
        pub(crate) fn alone(
            &self,
            id: ReplicaId,
            inbound: mpsc::Sender<Received>,
            metrics: Arc<Metrics>,
            epoch: Arc<AtomicU64>,
        ) -> Arc<Transport> {
            let t = Transport::start(
                id,
                "127.0.0.1:0".parse().unwrap(),
                &[],
                &[],
                &self.identity(id),
                inbound,
                metrics,
                epoch,
                hooks(),
            );
            Arc::new(t.unwrap())
        }

        /// Replica `id` on a loopback port, dialing `peers`.
        fn start(
            &self,
            id: ReplicaId,
            peers: &[(ReplicaId, SocketAddr)],
            inbound: mpsc::Sender<Received>,
            metrics: Arc<Metrics>,
        ) -> (Transport, SocketAddr) {
            let t = Transport::start(
                id,
                "127.0.0.1:0".parse().unwrap(),
                peers,
                &[],
                &self.identity(id),
                inbound,
                metrics,
                Arc::new(AtomicU64::new(1)),
                hooks(),
            )
            .unwrap();
            let addr = t.endpoint.local_addr().unwrap();
            (t, addr)
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Real QUIC on loopback, certificates from a real cluster CA: replica
    /// 2 is certified but not a member at replica 1, so its protocol
    /// messages are dropped by 1's transport and never reach its core (no
    /// storage read, no guest call); once 1 lists it, they arrive.
    #[tokio::test]
    async fn a_certified_non_member_s_messages_stop_at_the_transport() {
        let pki = Pki::new("nonmember");
        let (in1, mut out1) = mpsc::channel(16);
        let m1 = Arc::new(Metrics::new());
        let (t1, a1) = pki.start(1, &[], in1, m1.clone());
        let (in2, _out2) = mpsc::channel(16);
        let (t2, a2) = pki.start(2, &[(1, a1)], in2, Arc::new(Metrics::new()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while m1.inbound_nonmember.get() < 3 {
            t2.send(1, vec![(b"k".to_vec(), vec![1, 2, 3])]);
            assert!(tokio::time::Instant::now() < deadline, "nothing arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            out1.try_recv().is_err(),
            "a non-member's message reached the core"
        );
        t1.set_peers(&[(2, a2)]);
        let got = loop {
            t2.send(1, vec![(b"k".to_vec(), vec![4])]);
            match tokio::time::timeout(Duration::from_millis(50), out1.recv()).await {
                Ok(Some(batch)) => break batch,
                _ => assert!(
                    tokio::time::Instant::now() < deadline,
                    "a member was dropped"
                ),
            }
        };
        let got = got.into_messages();
        assert_eq!((got[0].from, &got[0].key[..]), (2, &b"k"[..]));
        t1.close();
        t2.close();
    }

    /// A peer that takes the connection and then reads nothing (stalled,
    /// or hostile): QUIC flow control stops the sender's frames, and what
    /// the protocol keeps sending it waits in the peer's queue up to
    /// [`PEER_QUEUE_BYTES`], then is dropped and counted. Bounded by count
    /// alone (4096 batches), the queue held 4 GiB of 1 MiB messages.
    #[tokio::test]
    async fn a_stalled_peer_holds_at_most_its_queue_budget() {
        let pki = Pki::new("stalled");
        // Replica 1 is a QUIC endpoint with 1's certificate that accepts
        // the link and never reads from it.
        let server = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(pki.identity(1).server_config().unwrap()).unwrap(),
        ));
        let stalled = Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
        let a1 = stalled.local_addr().unwrap();
        let accepting = stalled.clone();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(incoming) = accepting.accept().await {
                if let Ok(connection) = incoming.await {
                    if let Ok(stream) = connection.accept_uni().await {
                        held.push((connection, stream));
                    }
                }
            }
        });
        let (in2, _out2) = mpsc::channel(16);
        let m2 = Arc::new(Metrics::new());
        let (t2, _) = pki.start(2, &[(1, a1)], in2, m2.clone());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !t2.link(1).unwrap().up.load(Ordering::Relaxed) {
            assert!(tokio::time::Instant::now() < deadline, "no link");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let dropped = || {
            m2.peer_dropped
                .get_or_create(&label("peer", "1".to_string()))
                .get()
        };
        let mib = vec![7u8; 1 << 20];
        let sent = 128u64;
        for _ in 0..sent {
            t2.send(1, vec![(b"k".to_vec(), mib.clone())]);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let limit = (PEER_QUEUE_BYTES >> 20) as u64;
        // Queued, plus what the link took before it stalled (the stream
        // window, and the frame being written).
        let kept = sent - dropped();
        assert!(
            kept >= limit - 1 && kept <= limit + 8,
            "{kept} MiB kept for a stalled peer (budget {limit} MiB)"
        );
        assert!(t2.link(1).unwrap().up.load(Ordering::Relaxed));
        t2.close();
        stalled.close(VarInt::from_u32(0), b"");
        holder.abort();
    }

    /// A core that takes nothing from its queue (stalled): frames from
    /// peers wait in it up to [`INBOUND_BYTES`], then are dropped and
    /// counted as they arrive; what waits never passes the budget. Bounded
    /// by count alone (4096 frames of up to 16 MiB), it could hold 64 GiB.
    #[tokio::test]
    async fn a_stalled_core_holds_at_most_its_inbound_budget() {
        let pki = Pki::new("stalled-core");
        let (in1, mut out1) = mpsc::channel(PEER_QUEUE);
        let m1 = Arc::new(Metrics::new());
        let (t1, a1) = pki.start(1, &[], in1, m1.clone());
        let (in2, _out2) = mpsc::channel(16);
        let m2 = Arc::new(Metrics::new());
        let (t2, a2) = pki.start(2, &[(1, a1)], in2, m2.clone());
        t1.set_peers(&[(2, a2)]);
        let mib = vec![7u8; 1 << 20];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while m1.inbound_dropped.get() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nothing was dropped: the inbound queue grew without bound"
            );
            // Paced by the link: a full send queue means the link is the
            // bottleneck, not the receiver.
            let queued = t2.peers.lock().unwrap()[&1].bytes.clone();
            if queued.charge(8 << 20).is_some() {
                t2.send(1, vec![(b"k".to_vec(), mib.clone())]);
            } else {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let mut waiting = 0usize;
        while let Ok(r) = out1.try_recv() {
            waiting += r.messages.iter().map(|m| m.payload.len()).sum::<usize>();
        }
        assert!(
            waiting <= INBOUND_BYTES,
            "{waiting} bytes waited for the core"
        );
        assert!(
            waiting >= INBOUND_BYTES - (16 << 20),
            "frames were dropped with {waiting} bytes waiting"
        );
        t1.close();
        t2.close();
    }

    /// A stamped frame with epoch u64::MAX from one peer once silenced
    /// every later report (one mark for all peers): a replica left behind
    /// then never heard that its other peers had moved on.
    #[test]
    fn a_huge_stamped_epoch_silences_only_its_sender() {
        let hooks = hooks();
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
}
