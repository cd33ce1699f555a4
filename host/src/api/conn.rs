//! Client connections, bounded: at most `connections_max` open at once and
//! `per_address_max` from one address (an IPv6 client by its /64), and
//! each closed once it has made no progress (no byte read or written, no
//! request in flight) for `idle`. A client that opens connections and sends
//! nothing, or leaves them open after its last request, holds a slot for
//! `idle` at most. Past the cap, a new connection is answered 503
//! `overloaded` (`maybe_applied: false`, `Retry-After: 1`) without its
//! request being read, and closed, so the replica never runs out of file
//! descriptors and a client that tries again gets the next free slot.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, Instant, Sleep};
use tokio_rustls::TlsAcceptor;

/// Client connections open at once, by default.
pub const CONNECTIONS_MAX: usize = 1024;
/// The range `connections_max` is held to.
pub const CONNECTIONS_RANGE: (usize, usize) = (1, 1 << 20);
/// Client connections open at once from one address (an IPv6 /64), by
/// default: a quarter of the default cap, so one host cannot take every
/// slot; clients behind one proxy or NAT share it (raise it for them).
pub const PER_ADDRESS_MAX: usize = 256;
/// How long a client connection may make no progress, by default. A
/// request in flight counts as progress, however long its handler runs.
pub const IDLE: Duration = Duration::from_secs(60);
/// The range `idle` is held to.
pub const IDLE_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(86_400));
/// How long a request's head (request line and headers) may take to
/// arrive, from its first byte, by default: a client that trickles a byte
/// at a time keeps a connection from going idle, not from timing out.
pub const HEAD: Duration = Duration::from_secs(10);
/// The range the head timeout is held to.
pub const HEAD_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3_600));

/// What a connection past the cap is told before it is closed.
static OVERLOADED: LazyLock<Vec<u8>> =
    LazyLock::new(|| overloaded("too many client connections are open"));
/// What a connection past its address's share is told before it is closed.
static OVERLOADED_ADDRESS: LazyLock<Vec<u8>> =
    LazyLock::new(|| overloaded("too many client connections from this address"));

/// A whole 503 `overloaded` answer saying `message`, for a connection that
/// is closed once it is written.
fn overloaded(message: &str) -> Vec<u8> {
    let body = format!(
        "{{\"error\":{{\"code\":\"overloaded\",\"message\":\"{message}\",\"maybe_applied\":false}}}}"
    );
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Open connections by client address; an entry lives while one of its
/// connections does, so there are at most `connections_max` entries.
#[derive(Default)]
struct PerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in its address's count; given back on drop.
struct AddressSlot {
    table: Arc<PerAddress>,
    address: IpAddr,
}

impl PerAddress {
    /// An IPv6 client is counted by its /64 (one host usually has the
    /// whole prefix); an IPv4 client, mapped or not, by its address.
    fn key(addr: IpAddr) -> IpAddr {
        match addr.to_canonical() {
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            v4 => v4,
        }
    }

    fn take(self: &Arc<Self>, addr: IpAddr, max: usize) -> Option<AddressSlot> {
        let address = PerAddress::key(addr);
        let mut open = self.open.lock().expect("per-address lock");
        let count = open.entry(address).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            table: self.clone(),
            address,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().expect("per-address lock");
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// The client listener with its bounds; clones share the listener and the
/// slots (the answers given while a replica waits to be admitted, then the
/// API).
#[derive(Clone)]
pub struct Listener {
    listener: Arc<TcpListener>,
    slots: Arc<Semaphore>,
    per_address: Arc<PerAddress>,
    per_address_max: usize,
    idle: Duration,
    head: Duration,
    /// HTTPS when set; plain HTTP only when the configuration asks for it.
    tls: Option<TlsAcceptor>,
}

impl Listener {
    pub fn new(
        listener: TcpListener,
        (connections_max, per_address_max): (usize, usize),
        (idle, head): (Duration, Duration),
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Listener {
        let connections_max = connections_max.clamp(CONNECTIONS_RANGE.0, CONNECTIONS_RANGE.1);
        Listener {
            listener: Arc::new(listener),
            slots: Arc::new(Semaphore::new(connections_max)),
            per_address: Arc::default(),
            per_address_max: per_address_max.clamp(CONNECTIONS_RANGE.0, CONNECTIONS_RANGE.1),
            idle: idle.clamp(IDLE_RANGE.0, IDLE_RANGE.1),
            head: head.clamp(HEAD_RANGE.0, HEAD_RANGE.1),
            tls: tls.map(TlsAcceptor::from),
        }
    }
}

impl axum::serve::Listener for Listener {
    type Io = Bounded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    let slot = self.slots.clone().try_acquire_owned().ok();
                    let share = slot
                        .as_ref()
                        .and_then(|_| self.per_address.take(addr.ip(), self.per_address_max));
                    let answer = match (slot, share) {
                        (Some(slot), Some(share)) => {
                            // The handshake runs as the connection is first
                            // read or written, on the connection's own task
                            // and under its idle limit, never here.
                            let stream = match &self.tls {
                                Some(tls) => Stream::Handshaking(tls.accept(stream)),
                                None => Stream::Plain(stream),
                            };
                            return (
                                Bounded::new(stream, (slot, share), self.idle, self.head),
                                addr,
                            );
                        }
                        (None, _) => &OVERLOADED,
                        (Some(_), None) => &OVERLOADED_ADDRESS,
                    };
                    // Past either bound the connection is answered and
                    // closed at once, so it holds no descriptor; the client
                    // tries again. A fresh socket's send buffer is empty, so
                    // the answer fits without waiting. (Over TLS there is no
                    // answer before a handshake: the client sees the close.)
                    if self.tls.is_none() {
                        let _ = stream.try_write(answer);
                    }
                    tracing::debug!(%addr, "refused a client connection: past its bounds");
                }
                // Out of file descriptors and the like: wait, as axum does.
                Err(e) => {
                    tracing::debug!("accepting a client connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// The requests in flight on one connection. While there is one, the
/// connection is not idle: hyper waits on the socket while a handler runs,
/// and a handler may run longer than `idle` (an activation waits for every
/// replica).
#[derive(Clone, Default)]
pub struct Activity {
    in_flight: Arc<AtomicUsize>,
    /// The client certificate the connection presented, verified against
    /// the cluster CA (set when its TLS handshake completes, before any
    /// request is read).
    client: Arc<OnceLock<CertificateDer<'static>>>,
}

/// One request in flight; counted until dropped (answered or cancelled).
pub struct InFlight(Activity);

impl Activity {
    pub fn begin(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    /// Whether the connection presented a client certificate (verified
    /// against the cluster CA) issued to `name` (`ballot cert client NAME`).
    pub fn client_is(&self, name: &str) -> bool {
        self.client
            .get()
            .is_some_and(|cert| crate::tls::names(cert, &crate::tls::client_name(name)))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client connection's bytes: plain, or TLS (handshaking until its first
/// read or write completes it).
pub enum Stream {
    Plain(TcpStream),
    Handshaking(tokio_rustls::Accept<TcpStream>),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Failed,
}

impl Stream {
    /// Drives a handshake in progress; `Ready(Ok)` once the stream carries
    /// data (recording the client certificate's name in `client`).
    fn ready(
        &mut self,
        cx: &mut Context<'_>,
        client: &OnceLock<CertificateDer<'static>>,
    ) -> Poll<io::Result<()>> {
        let Stream::Handshaking(accept) = self else {
            return match self {
                Stream::Failed => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
                _ => Poll::Ready(Ok(())),
            };
        };
        match Pin::new(accept).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(tls)) => {
                if let Some(cert) = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                {
                    let _ = client.set(cert.clone().into_owned());
                }
                *self = Stream::Tls(Box::new(tls));
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                tracing::debug!("client TLS handshake failed: {e}");
                *self = Stream::Failed;
                Poll::Ready(Err(e))
            }
        }
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Listener>>
    for Activity
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Listener>) -> Activity {
        stream.io().activity.clone()
    }
}

/// Middleware: counts each request in flight on its connection.
pub async fn track(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let activity = request
        .extensions()
        .get::<axum::extract::ConnectInfo<Activity>>()
        .map(|info| info.0.begin());
    let response = next.run(request).await;
    drop(activity);
    response
}

/// A client connection holding its slot, failing with `TimedOut` once it
/// has made no progress for `idle`, or once a request's head has taken
/// longer than `head` since its first byte.
pub struct Bounded {
    stream: Stream,
    _slot: (OwnedSemaphorePermit, AddressSlot),
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    activity: Activity,
    head: Duration,
    /// When the first byte of a request not yet handled arrived: set by a
    /// read while no request is in flight, cleared by a request starting
    /// or a response being written.
    head_started: Option<std::time::Instant>,
}

impl Bounded {
    fn new(
        stream: Stream,
        slot: (OwnedSemaphorePermit, AddressSlot),
        idle: Duration,
        head: Duration,
    ) -> Bounded {
        Bounded {
            stream,
            _slot: slot,
            idle,
            deadline: Box::pin(sleep(idle)),
            activity: Activity::default(),
            head,
            head_started: None,
        }
    }

    /// Bytes were read: whether the request head they belong to is late.
    fn head_late(&mut self) -> bool {
        if self.activity.busy() {
            self.head_started = None;
            return false;
        }
        let started = *self
            .head_started
            .get_or_insert_with(std::time::Instant::now);
        started.elapsed() > self.head
    }

    fn progressed(&mut self) {
        let at = Instant::now() + self.idle;
        self.deadline.as_mut().reset(at);
    }

    /// Whether the connection has been idle too long (registers the waker).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.activity.busy() {
            self.progressed();
            return false;
        }
        self.deadline.as_mut().poll(cx).is_ready()
    }

    /// A write's result, counting progress and the idle deadline.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.progressed();
                    // Only answers are written: the head before is done.
                    self.head_started = None;
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(e) => Poll::Ready(e),
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "client connection idle too long")
}

impl AsyncRead for Bounded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match this.stream.ready(cx, &this.activity.client) {
            Poll::Ready(Ok(())) => this.stream.poll_read(cx, buf),
            other => other,
        };
        match polled {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    if this.head_late() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "a request head took too long to arrive",
                        )));
                    }
                    this.progressed();
                }
                Poll::Ready(r)
            }
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Bounded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match this.stream.ready(cx, &this.activity.client) {
            Poll::Ready(Ok(())) => this.stream.poll_write(cx, data),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        };
        this.wrote(cx, polled)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.stream.ready(cx, &this.activity.client) {
            Poll::Ready(Ok(())) => this.stream.poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Handshaking(_) | Stream::Failed => Poll::Ready(Ok(())),
        }
    }
}

impl Stream {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            _ => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, data),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, data),
            _ => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener as _;
    use tokio::io::AsyncReadExt;

    #[test]
    fn the_overloaded_answers_are_well_formed() {
        for answer in [&OVERLOADED[..], &OVERLOADED_ADDRESS[..]] {
            let text = std::str::from_utf8(answer).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(length, body.len());
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["error"]["code"], "overloaded");
            assert_eq!(v["error"]["maybe_applied"], false);
        }
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_and_mapped_ipv4_by_its_address() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::7".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(PerAddress::key(a), PerAddress::key(b));
        assert_ne!(PerAddress::key(a), PerAddress::key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            PerAddress::key(mapped),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    /// Connects from `from` (any 127/8 address reaches loopback) and says
    /// whether the replica answered 503 and closed; a connection it keeps
    /// sends nothing, so a short wait for bytes times out.
    async fn refused(to: SocketAddr, from: [u8; 4]) -> (bool, tokio::net::TcpStream) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((from, 0))).unwrap();
        let mut stream = socket.connect(to).await.unwrap();
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_millis(300), stream.read_to_end(&mut answer)).await;
        let refused = matches!(read, Ok(Ok(_)))
            && answer.starts_with(b"HTTP/1.1 503")
            && answer.ends_with(b"from this address\",\"maybe_applied\":false}}");
        (refused, stream)
    }

    /// One address gets `per_address_max` connections and no more; another
    /// address still gets in, and a connection closed frees its place.
    #[tokio::test]
    async fn one_address_cannot_take_every_connection() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = Listener::new(tcp, (8, 2), (IDLE, HEAD), None);
        let (accepted, mut taken) = tokio::sync::mpsc::unbounded_channel();
        let acceptor = tokio::spawn(async move {
            loop {
                let (io, from) = listener.accept().await;
                if accepted.send((io, from)).is_err() {
                    return;
                }
            }
        });
        let (no, first) = refused(addr, [127, 0, 0, 1]).await;
        assert!(!no, "the first connection was refused");
        let (no, _second) = refused(addr, [127, 0, 0, 1]).await;
        assert!(!no, "the second connection was refused");
        let (yes, _) = refused(addr, [127, 0, 0, 1]).await;
        assert!(yes, "a third connection from one address was kept");
        let (no, _other) = refused(addr, [127, 0, 0, 2]).await;
        assert!(!no, "another address was refused");
        // The replica's side of the first connection goes (as when it is
        // closed or idle too long), and its address may connect again.
        drop(first);
        let (io, from) = taken.recv().await.unwrap();
        assert_eq!(from.ip(), IpAddr::from([127, 0, 0, 1]));
        drop(io);
        let (no, _again) = refused(addr, [127, 0, 0, 1]).await;
        assert!(!no, "a freed place was not given again");
        acceptor.abort();
    }
}
