//! Changelog replay, truncation and snapshots in the simulator
//! ([`SimConfig::replay`]): each replica numbers its durable commits in a
//! changelog and keeps, durably, a cursor per peer; every 2 s it replays
//! each peer's changelog from its cursor, and every 5 s it truncates its
//! own, with the daemon's decisions (`ballot_control::replay`). The keys a
//! page says are newer at the peer are read linearizably through the
//! replica's own core, retried with backoff as the daemon retries them, and
//! the cursor moves only once every read succeeded. A replica behind a
//! peer's truncation replays its snapshot. The changelog keeps only a few
//! entries beyond what every peer replayed, so snapshots are common.
//!
//! Checked: once the clients are done and the network heals, every member
//! that is up converges, within [`QUIET_MS`], on the newest commit any of
//! them holds for every key: no commit is missed for good.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ballot_control::replay::{self, Page, Replay, PAGE};
use ballot_core::{Consistency, Operation};

use crate::activation::SysCall;
use crate::{Ev, Sim};

/// The daemon's replay and truncation intervals.
const REPLAY_MS: u64 = 2_000;
const TRUNCATE_MS: u64 = 5_000;
/// How long the run goes on after the clients are done, healed, before
/// the replicas must have converged.
pub const QUIET_MS: u64 = 30_000;
/// Attempts of one linearizable read before the pass gives up on a peer,
/// as the daemon's `read_key` (50 ms doubling to 1 s between them).
const READ_ATTEMPTS: u32 = 40;

/// A replica's changelog, its cursors for its peers (both durable) and the
/// replay it runs (volatile).
#[derive(Default)]
pub(crate) struct Log {
    /// Committed version of each key, as the daemon's `values` table.
    pub committed: BTreeMap<Vec<u8>, u64>,
    /// Position -> (key, version), from `first` to `last`.
    entries: BTreeMap<u64, (Vec<u8>, u64)>,
    last: u64,
    /// Peer node index -> the last position of its changelog replayed.
    cursors: BTreeMap<usize, u64>,
    pass: Option<Pass>,
    /// Pages asked so far: numbers each page, so a retry of an earlier
    /// page (or pass) is told apart.
    generations: u64,
}

impl Log {
    /// A commit became durable.
    pub fn append(&mut self, key: &[u8], version: u64) {
        self.committed.insert(key.to_vec(), version);
        self.last += 1;
        self.entries.insert(self.last, (key.to_vec(), version));
    }

    fn first(&self) -> u64 {
        self.entries.keys().next().copied().unwrap_or(self.last + 1)
    }

    fn local(&self, key: &[u8]) -> u64 {
        self.committed.get(key).copied().unwrap_or(0)
    }

    /// A crash loses the replay in flight, nothing else.
    pub fn crashed(&mut self) {
        self.pass = None;
    }

    /// A lost data directory loses everything.
    pub fn wiped(&mut self) {
        let generations = self.generations;
        *self = Log::default();
        self.generations = generations;
    }
}

/// One replay pass over a replica's peers.
struct Pass {
    peers: VecDeque<usize>,
    peer: usize,
    /// Reads in flight: request id -> (key, attempts so far).
    reading: BTreeMap<u64, (Vec<u8>, u32)>,
    /// Reads waiting to be tried again.
    retrying: u32,
    /// Where the cursor goes once they succeed, and whether to ask the
    /// same peer again.
    cursor: u64,
    again: bool,
    /// Tells this page's retries from an earlier page's or pass's.
    generation: u64,
}

impl<'f> Sim<'f> {
    pub(crate) fn plan_replay(&mut self) {
        for i in 0..self.nodes.len() {
            let t = self.replay_rng.range(0, REPLAY_MS);
            self.at(t, Ev::Replay(i));
            let t = self.replay_rng.range(0, TRUNCATE_MS);
            self.at(t, Ev::Truncate(i));
        }
    }

    /// Whether peer `p` answers replica `i`'s question now.
    fn answers(&self, i: usize, p: usize) -> bool {
        self.nodes[p].core.is_some() && !self.cut.contains(&(i, p)) && !self.cut.contains(&(p, i))
    }

    /// The peers replica `i` replays: the others of the membership it runs.
    fn peers_of(&self, i: usize) -> Option<Vec<usize>> {
        let node = &self.nodes[i];
        if node.core.is_none() || node.off {
            return None;
        }
        let m = self.members_at(node.epoch);
        if !m.contains(node.id) {
            return None;
        }
        Some(
            m.voters
                .iter()
                .chain(m.learners.iter())
                .map(|&id| id as usize - 1)
                .filter(|&p| p != i)
                .collect(),
        )
    }

    pub(crate) fn replay_tick(&mut self, i: usize) {
        let t = self.now + REPLAY_MS + self.replay_rng.range(0, 50);
        self.at(t, Ev::Replay(i));
        if self.nodes[i].log.pass.is_some() || self.cfg.planted_no_replay {
            return;
        }
        let Some(peers) = self.peers_of(i) else {
            return;
        };
        let log = &mut self.nodes[i].log;
        log.generations += 1;
        log.pass = Some(Pass {
            peers: peers.into(),
            peer: usize::MAX,
            reading: BTreeMap::new(),
            retrying: 0,
            cursor: 0,
            again: false,
            generation: log.generations,
        });
        self.next_peer(i);
    }

    /// Moves replica `i`'s pass to its next peer, or ends it.
    fn next_peer(&mut self, i: usize) {
        let Some(pass) = self.nodes[i].log.pass.as_mut() else {
            return;
        };
        let Some(p) = pass.peers.pop_front() else {
            self.nodes[i].log.pass = None;
            return;
        };
        pass.peer = p;
        self.ask_page(i);
    }

    /// Asks the pass's peer for the page after the cursor and acts on it.
    fn ask_page(&mut self, i: usize) {
        let p = self.nodes[i].log.pass.as_ref().expect("a pass runs").peer;
        if !self.answers(i, p) {
            // The daemon's question fails: on to the next peer.
            return self.next_peer(i);
        }
        // The peer reads its changelog's bounds, then the entries: a
        // truncation may commit in between (a fifth of the time here).
        let (first, last) = (self.nodes[p].log.first(), self.nodes[p].log.last);
        if self.replay_rng.chance(0.2) {
            self.truncate(p);
        }
        let log = &self.nodes[i].log;
        let peer = &self.nodes[p].log;
        let cursor = log.cursors.get(&p).copied().unwrap_or(0);
        let page = Page {
            first,
            last,
            entries: peer
                .entries
                .range(cursor + 1..)
                .take(PAGE as usize)
                .map(|(s, (k, v))| (*s, k.clone(), *v))
                .collect(),
        };
        let (stale, cursor, again) = match replay::page(cursor, &page, |k| log.local(k)) {
            Replay::Snapshot if self.cfg.planted_replay_skips_snapshot => {
                // Planted: jump to what the peer still holds.
                (Vec::new(), page.first - 1, true)
            }
            Replay::Snapshot => {
                self.stats.snapshots += 1;
                let snapshot: Vec<(Vec<u8>, u64)> = peer
                    .committed
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                (replay::stale(&snapshot, |k| log.local(k)), peer.last, true)
            }
            Replay::Learn {
                stale,
                cursor: next,
                done,
            } => {
                if stale.is_empty() && next == cursor && done {
                    return self.next_peer(i);
                }
                (stale, next, !done)
            }
        };
        let log = &mut self.nodes[i].log;
        log.generations += 1;
        let generation = log.generations;
        let pass = log.pass.as_mut().expect("a pass runs");
        pass.cursor = cursor;
        pass.again = again;
        pass.generation = generation;
        if stale.is_empty() {
            return self.page_read(i);
        }
        for key in stale {
            self.replay_read(i, key, 0);
        }
    }

    fn replay_read(&mut self, i: usize, key: Vec<u8>, attempts: u32) {
        self.stats.replay_reads += 1;
        let op = Operation::Read(Consistency::Linearizable);
        let id = self.sys_request(i, key.clone(), op, SysCall::Replay);
        if let Some(pass) = self.nodes[i].log.pass.as_mut() {
            pass.reading.insert(id, (key, attempts + 1));
        }
    }

    /// A replay read of replica `i` finished.
    pub(crate) fn replay_read_done(&mut self, i: usize, id: u64, ok: bool) {
        let Some(pass) = self.nodes[i].log.pass.as_mut() else {
            return;
        };
        let Some((key, attempts)) = pass.reading.remove(&id) else {
            return;
        };
        if !ok {
            if attempts >= READ_ATTEMPTS {
                // The daemon's pass fails for this peer: the cursor stays.
                pass.reading.clear();
                pass.retrying = 0;
                return self.next_peer(i);
            }
            // Retried with backoff, as the daemon's `read_key`.
            pass.retrying += 1;
            let generation = pass.generation;
            let t = self.now + (50u64 << (attempts - 1).min(5)).min(1_000);
            self.at(t, Ev::ReplayRetry(i, generation, key, attempts));
            return;
        }
        if pass.reading.is_empty() && pass.retrying == 0 {
            self.page_read(i);
        }
    }

    pub(crate) fn replay_retry(&mut self, i: usize, generation: u64, key: Vec<u8>, attempts: u32) {
        let Some(pass) = self.nodes[i].log.pass.as_mut() else {
            return;
        };
        if pass.generation != generation || pass.retrying == 0 {
            return;
        }
        pass.retrying -= 1;
        self.replay_read(i, key, attempts);
    }

    /// Every read of the page succeeded: the cursor moves, durably.
    fn page_read(&mut self, i: usize) {
        let pass = self.nodes[i].log.pass.as_ref().expect("a pass runs");
        let (p, cursor, again) = (pass.peer, pass.cursor, pass.again);
        self.nodes[i].log.cursors.insert(p, cursor);
        if again {
            self.ask_page(i);
        } else {
            self.next_peer(i);
        }
    }

    /// The daemon's truncation: drop what every peer replayed, and in any
    /// case all but the newest few entries.
    pub(crate) fn truncate_tick(&mut self, i: usize) {
        let t = self.now + TRUNCATE_MS + self.replay_rng.range(0, 50);
        self.at(t, Ev::Truncate(i));
        self.truncate(i);
    }

    fn truncate(&mut self, i: usize) {
        let Some(peers) = self.peers_of(i) else {
            return;
        };
        let cursors: Vec<u64> = peers
            .iter()
            .map(|&p| {
                if self.answers(i, p) {
                    self.nodes[p].log.cursors.get(&i).copied().unwrap_or(0)
                } else {
                    0
                }
            })
            .collect();
        let log = &mut self.nodes[i].log;
        if let Some(upto) =
            replay::truncation(log.first(), log.last, &cursors, self.cfg.changelog_keep)
        {
            let kept = log.entries.split_off(&(upto + 1));
            log.entries = kept;
            self.stats.truncations += 1;
        }
    }

    /// At the end of a quiet run: every member that is up holds, for every
    /// key, the newest commit any of them holds.
    pub(crate) fn check_converged(&mut self) {
        // A record corrupted anywhere can block a replay pass for good: the
        // daemon retries an unreadable key 40 times per pass and moves the
        // cursor past none of the page (design section 12). Convergence is
        // promised only without corruption.
        if self.stats.corruptions > 0 {
            self.stats.convergence_unchecked += 1;
            return;
        }
        let up = self.up_members();
        let keys: BTreeSet<Vec<u8>> = up
            .iter()
            .flat_map(|&i| self.nodes[i].log.committed.keys().cloned())
            .collect();
        for key in keys {
            let newest = up
                .iter()
                .map(|&i| self.nodes[i].log.local(&key))
                .max()
                .unwrap_or(0);
            for &i in &up {
                let have = self.nodes[i].log.local(&key);
                if have < newest {
                    self.violations.push(format!(
                        "replay: replica {} still holds {} at version {have} after {} s of \
                         quiet, another member holds version {newest}",
                        self.nodes[i].id,
                        String::from_utf8_lossy(&key),
                        QUIET_MS / 1000
                    ));
                }
            }
        }
    }
}
