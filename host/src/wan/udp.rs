//! The UDP relays between Ballot's replicas (QUIC).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use super::{Dice, Link, Links, Topology};

/// The relays of one cluster and the state of every directed link.
pub struct Fabric {
    shared: Arc<Shared>,
    fronts: HashMap<u32, SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    links: Links,
    /// Real peer address -> replica id.
    ids: HashMap<SocketAddr, u32>,
    /// Packets dropped (down or lost) and relayed.
    dropped: AtomicU64,
    relayed: AtomicU64,
    dice: Dice,
}

/// Largest UDP payload relayed.
const DATAGRAM_MAX: usize = 64 * 1024;

impl Shared {
    /// Sends `packet` through `socket` (to `to`, or its connected peer)
    /// as `link` says: dropped, now, or after its delay.
    async fn pass(
        &self,
        link: Link,
        socket: &Arc<UdpSocket>,
        to: Option<SocketAddr>,
        packet: &[u8],
    ) {
        if !link.up || (link.loss > 0.0 && self.dice.draw() < link.loss) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.relayed.fetch_add(1, Ordering::Relaxed);
        let delay = link.delay_now(&self.dice);
        if delay.is_zero() {
            let _ = match to {
                Some(to) => socket.send_to(packet, to).await,
                None => socket.send(packet).await,
            };
        } else {
            let (socket, packet) = (socket.clone(), packet.to_vec());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = match to {
                    Some(to) => socket.send_to(&packet, to).await,
                    None => socket.send(&packet).await,
                };
            });
        }
    }
}

impl Fabric {
    /// Starts a relay on loopback in front of each replica, given as (id,
    /// its real peer address). Every link starts perfect.
    pub async fn start(replicas: &[(u32, SocketAddr)]) -> std::io::Result<Fabric> {
        let shared = Arc::new(Shared {
            links: Links::default(),
            ids: replicas.iter().map(|&(id, addr)| (addr, id)).collect(),
            dropped: AtomicU64::new(0),
            relayed: AtomicU64::new(0),
            dice: Dice::new(),
        });
        let mut fronts = HashMap::new();
        let mut tasks = Vec::new();
        for &(id, real) in replicas {
            let front = Arc::new(UdpSocket::bind((real.ip(), 0)).await?);
            fronts.insert(id, front.local_addr()?);
            tasks.push(tokio::spawn(relay(shared.clone(), id, real, front)));
        }
        Ok(Fabric {
            shared,
            fronts,
            tasks,
        })
    }

    /// The address replica `id`'s peers dial instead of its own.
    pub fn front(&self, id: u32) -> SocketAddr {
        self.fronts[&id]
    }

    /// Sets the link from `from` to `to` (one direction).
    pub fn set(&self, from: u32, to: u32, link: Link) {
        self.shared.links.set(from, to, link);
    }

    /// Switches the link from `from` to `to` up or down, keeping its delay.
    pub fn switch(&self, from: u32, to: u32, up: bool) {
        self.shared.links.switch(from, to, up);
    }

    /// Cuts replica `id` off from every other, both ways.
    pub fn isolate(&self, id: u32) {
        for &other in self.fronts.keys().filter(|&&o| o != id) {
            self.switch(id, other, false);
            self.switch(other, id, false);
        }
    }

    /// Switches every link up again (delays, jitter and loss stay).
    pub fn heal(&self) {
        self.shared.links.heal();
    }

    /// Sets every link between two replicas as `topology` says.
    pub fn apply(&self, topology: &Topology) {
        self.shared.links.apply(topology);
    }

    /// Packets relayed and dropped so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shared.relayed.load(Ordering::Relaxed),
            self.shared.dropped.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The relay in front of replica `to` (at `real`): packets from each
/// sender to `real` through a back socket of that sender's, answers back
/// to the sender from `front`.
async fn relay(shared: Arc<Shared>, to: u32, real: SocketAddr, front: Arc<UdpSocket>) {
    let mut backs: HashMap<SocketAddr, (Arc<UdpSocket>, JoinHandle<()>)> = HashMap::new();
    let mut buf = vec![0u8; DATAGRAM_MAX];
    loop {
        let Ok((n, source)) = front.recv_from(&mut buf).await else {
            continue;
        };
        let from = shared.ids.get(&source).copied();
        if !backs.contains_key(&source) {
            let Ok(back) = UdpSocket::bind((real.ip(), 0)).await else {
                continue;
            };
            if back.connect(real).await.is_err() {
                continue;
            }
            let back = Arc::new(back);
            let answers = tokio::spawn(answer(
                shared.clone(),
                (to, from),
                back.clone(),
                front.clone(),
                source,
            ));
            backs.insert(source, (back, answers));
        }
        let back = &backs[&source].0;
        shared
            .pass(shared.links.get(from, Some(to)), back, None, &buf[..n])
            .await;
    }
}

/// Packets replica `to` sends back to sender `from` (at `source`).
async fn answer(
    shared: Arc<Shared>,
    (to, from): (u32, Option<u32>),
    back: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    source: SocketAddr,
) {
    let mut buf = vec![0u8; DATAGRAM_MAX];
    loop {
        let Ok(n) = back.recv(&mut buf).await else {
            continue;
        };
        shared
            .pass(
                shared.links.get(Some(to), from),
                &front,
                Some(source),
                &buf[..n],
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn recv(s: &UdpSocket, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        tokio::time::timeout(Duration::from_millis(300), s.recv_from(buf))
            .await
            .ok()?
            .ok()
    }

    /// Datagrams cross a relay both ways, a link switched down drops them
    /// (one direction only), and a delay holds them back.
    #[tokio::test]
    async fn a_relay_passes_delays_and_cuts_each_direction() {
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let fabric = Fabric::start(&[(1, a_addr), (2, b_addr)]).await.unwrap();
        let mut buf = [0u8; 16];
        a.send_to(b"ping", fabric.front(2)).await.unwrap();
        let (n, via) = recv(&b, &mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        b.send_to(b"pong", via).await.unwrap();
        let (n, from) = recv(&a, &mut buf).await.unwrap();
        assert_eq!((&buf[..n], from), (&b"pong"[..], fabric.front(2)));

        fabric.switch(1, 2, false);
        a.send_to(b"lost", fabric.front(2)).await.unwrap();
        assert!(recv(&b, &mut buf).await.is_none(), "a link down passed");
        b.send_to(b"back", via).await.unwrap();
        assert!(
            recv(&a, &mut buf).await.is_some(),
            "the other direction is up"
        );

        fabric.set(
            1,
            2,
            Link {
                delay: Duration::from_millis(150),
                ..Link::default()
            },
        );
        let sent = std::time::Instant::now();
        a.send_to(b"slow", fabric.front(2)).await.unwrap();
        recv(&b, &mut buf).await.unwrap();
        assert!(sent.elapsed() >= Duration::from_millis(150));
        assert_eq!(fabric.counts().1, 1);
    }
}
