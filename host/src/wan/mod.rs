//! A link emulator for real clusters: relays in front of each replica's
//! peer port, so what two replicas send each other crosses a link with a
//! one-way delay, jitter, a loss rate and an up/down switch of its own, per
//! direction, changed while the cluster runs. Replicas are given the
//! relays' addresses as their peers'; certificates name replicas, not
//! addresses, so the relays are invisible to them.
//!
//! - [`Fabric`] relays UDP datagrams: Ballot's QUIC.
//! - [`TcpFabric`] relays TCP byte streams: etcd's peer URLs, so both
//!   systems run under the same links in `ballot bench --wan`.
//! - [`Topology`] is a geo layout read from a file (regions, replicas in
//!   each, round trips between regions), applied to either fabric.
//!
//! Not modelled: bandwidth, queueing, MTU; TCP loss (a TCP relay only
//! delays and stalls: the kernels on both sides already retransmit).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

mod tcp;
mod topology;
mod udp;

pub use tcp::TcpFabric;
pub use topology::{Region, Topology};
pub use udp::Fabric;

/// One direction of a link between two replicas.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// One-way delay.
    pub delay: Duration,
    /// Up to this much more, drawn uniformly per packet.
    pub jitter: Duration,
    /// The share of packets dropped, 0.0 to 1.0 (UDP only).
    pub loss: f64,
    /// Down: every packet is dropped (UDP), or held until the link is up
    /// again (TCP).
    pub up: bool,
}

impl Default for Link {
    fn default() -> Link {
        Link {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            up: true,
        }
    }
}

/// The state of every directed link between two replicas: (from, to) ->
/// link; a pair not listed is a perfect link.
#[derive(Default)]
struct Links(Mutex<HashMap<(u32, u32), Link>>);

impl Links {
    /// The link between two ends, where both are known (a packet from an
    /// unknown sender crosses unimpaired).
    fn get(&self, from: Option<u32>, to: Option<u32>) -> Link {
        match (from, to) {
            (Some(f), Some(t)) => self
                .0
                .lock()
                .expect("links lock")
                .get(&(f, t))
                .copied()
                .unwrap_or_default(),
            _ => Link::default(),
        }
    }

    fn set(&self, from: u32, to: u32, link: Link) {
        self.0.lock().expect("links lock").insert((from, to), link);
    }

    fn switch(&self, from: u32, to: u32, up: bool) {
        self.0
            .lock()
            .expect("links lock")
            .entry((from, to))
            .or_default()
            .up = up;
    }

    /// Every link up again (delays, jitter and loss stay).
    fn heal(&self) {
        for link in self.0.lock().expect("links lock").values_mut() {
            link.up = true;
        }
    }

    fn apply(&self, topology: &Topology) {
        let mut links = self.0.lock().expect("links lock");
        for (from, to, link) in topology.links() {
            links.insert((from, to), link);
        }
    }
}

/// Uniform draws for loss and jitter (xorshift: a link emulator needs no
/// better), seeded from the system's randomness.
struct Dice(AtomicU64);

impl Dice {
    fn new() -> Dice {
        let seed = crate::storage::random_bytes::<8>()
            .map(u64::from_le_bytes)
            .unwrap_or(0x9e37_79b9_7f4a_7c15)
            | 1;
        Dice(AtomicU64::new(seed))
    }

    /// A draw in [0, 1).
    fn draw(&self) -> f64 {
        let mut x = self.0.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Link {
    /// This packet's delay: the link's, plus a draw of its jitter.
    fn delay_now(&self, dice: &Dice) -> Duration {
        if self.jitter.is_zero() {
            self.delay
        } else {
            self.delay + self.jitter.mul_f64(dice.draw())
        }
    }
}
