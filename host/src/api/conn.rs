//! Client connections, bounded: at most `connections_max` open at once, and
//! each closed once it has made no progress (no byte read or written) for
//! `idle`. A client that opens connections and sends nothing, or leaves
//! them open after its last request, holds a slot for `idle` at most; past
//! the cap, a new connection is closed as soon as it is accepted, so the
//! replica never runs out of file descriptors and a client that tries
//! again gets the next free slot.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, Instant, Sleep};

/// Client connections open at once, by default.
pub const CONNECTIONS_MAX: usize = 1024;
/// How long a client connection may make no progress, by default. Longer
/// than a request may take (`REQUEST_TIMEOUT`), so a request waiting for
/// its answer is never cut.
pub const IDLE: Duration = Duration::from_secs(60);

/// The client listener with its bounds; clones share the listener and the
/// slots (the answers given while a replica waits to be admitted, then the
/// API).
#[derive(Clone)]
pub struct Listener {
    listener: Arc<TcpListener>,
    slots: Arc<Semaphore>,
    idle: Duration,
}

impl Listener {
    pub fn new(listener: TcpListener, connections_max: usize, idle: Duration) -> Listener {
        Listener {
            listener: Arc::new(listener),
            slots: Arc::new(Semaphore::new(connections_max.max(1))),
            idle,
        }
    }
}

impl axum::serve::Listener for Listener {
    type Io = Bounded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => match self.slots.clone().try_acquire_owned() {
                    Ok(slot) => return (Bounded::new(stream, slot, self.idle), addr),
                    // Past the cap the connection is closed at once, so it
                    // holds no descriptor; the client tries again.
                    Err(_) => {
                        tracing::debug!(%addr, "closed a client connection: too many open");
                        drop(stream);
                    }
                },
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

/// A client connection holding its slot, failing with `TimedOut` once it
/// has made no progress for `idle`.
pub struct Bounded {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Bounded {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit, idle: Duration) -> Bounded {
        Bounded {
            stream,
            _slot: slot,
            idle,
            deadline: Box::pin(sleep(idle)),
        }
    }

    fn progressed(&mut self) {
        let at = Instant::now() + self.idle;
        self.deadline.as_mut().reset(at);
    }

    /// Whether the connection has been idle too long (registers the waker).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
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
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
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
        let polled = Pin::new(&mut this.stream).poll_write(cx, data);
        this.wrote(cx, polled)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.wrote(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
