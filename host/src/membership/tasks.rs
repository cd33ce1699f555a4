//! What a membership record asks of this replica: catch up as a learner,
//! sweep as a continuing voter, replay peers' changelogs (or a snapshot
//! listing when it is behind their truncation), and truncate its own.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballot_core::{Consistency, Operation, Outcome, ReplicaId};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::answers::{Answer, What};
use super::{unavailable, Membership, Phase, Progress, TaskKind, CALL_TIMEOUT, STAGE_WAIT};
use crate::node::{self, ClientRequest, Health};
use crate::system::now_ms;

// Keys per catch-up listing page, and entries per changelog page.
use ballot_control::replay::{self, PAGE};
/// Linearizable reads a catch-up or sweep keeps in flight.
const READS_IN_FLIGHT: usize = 32;
/// How often a replica replays its peers' changelogs.
const REPLAY_INTERVAL: Duration = Duration::from_secs(2);
/// How often a replica truncates its changelog.
const TRUNCATE_INTERVAL: Duration = Duration::from_secs(5);
/// Changelog entries kept by default beyond what every member replayed.
pub const CHANGELOG_KEEP_DEFAULT: u64 = 1_000_000;

impl Membership {
    /// Starts a catch-up or a sweep for `epoch` unless one runs or is done.
    pub(super) fn start_task(self: &Arc<Self>, epoch: u64, catch_up: bool) {
        {
            let mut local = self.local.lock().expect("membership lock");
            let (done, running) = if catch_up {
                (local.caught_up, &mut local.catching_up)
            } else {
                (local.swept, &mut local.sweeping)
            };
            if done >= epoch || running.is_some_and(|e| e >= epoch) {
                return;
            }
            *running = Some(epoch);
        }
        let me = self.clone();
        tokio::spawn(async move {
            let result = if catch_up {
                me.catch_up(epoch).await
            } else {
                me.sweep(epoch).await
            };
            let mut local = me.local.lock().expect("membership lock");
            if catch_up {
                local.catching_up = None;
            } else {
                local.sweeping = None;
            }
            match result {
                Ok(()) if catch_up => local.caught_up = local.caught_up.max(epoch),
                Ok(()) => local.swept = local.swept.max(epoch),
                Err(e) => warn!(epoch, catch_up, "membership task stopped: {e}"),
            }
        });
    }

    fn set_progress(&self, edit: impl FnOnce(&mut Progress)) {
        let mut local = self.local.lock().expect("membership lock");
        if let Some(p) = local.progress.as_mut() {
            edit(p);
            p.updated_ms = now_ms();
        }
    }

    /// The reading phase of a task [`Self::begin`] started: reads `keys`
    /// with progress, then marks the task done. Returns how many there were.
    async fn read_tracked(&self, keys: Vec<Vec<u8>>) -> Result<u64, String> {
        let total = keys.len() as u64;
        self.set_progress(|p| {
            p.keys_total = total;
            p.phase = Phase::Reading;
        });
        self.read_keys(keys, true).await?;
        self.set_progress(|p| p.phase = Phase::Done);
        Ok(total)
    }

    /// Reads `keys` linearizably, [`READS_IN_FLIGHT`] at a time, retrying
    /// each until it succeeds; counts them in the progress if `counted`.
    async fn read_keys(&self, keys: Vec<Vec<u8>>, counted: bool) -> Result<(), String> {
        let mut reads = tokio::task::JoinSet::new();
        let mut keys = keys.into_iter();
        loop {
            while reads.len() < READS_IN_FLIGHT {
                let Some(key) = keys.next() else { break };
                reads.spawn(read_key(self.requests.clone(), self.health.clone(), key));
            }
            let Some(r) = reads.join_next().await else {
                return Ok(());
            };
            let bytes = r.map_err(|e| e.to_string())??;
            if counted {
                self.set_progress(|p| {
                    p.keys_done += 1;
                    p.bytes += bytes;
                });
            }
        }
    }

    fn begin(&self, task: TaskKind, epoch: u64) {
        let now = now_ms();
        self.local.lock().expect("membership lock").progress = Some(Progress {
            task,
            epoch,
            phase: Phase::Listing,
            started_ms: now,
            updated_ms: now,
            ..Progress::default()
        });
    }

    /// The sweep of section 11: a linearizable read of every key a classic
    /// quorum of voters (this replica first) holds state for. It finishes
    /// any open slot where this replica holds an acceptance, and leaves
    /// this replica holding the newest value of every key chosen before the
    /// listing, also a key it never held: a value chosen two voter changes
    /// back may be held by too few of the next voters otherwise.
    pub(super) async fn sweep(self: &Arc<Self>, epoch: u64) -> Result<(), String> {
        self.begin(TaskKind::Sweep, epoch);
        // Its own keys come from LMDB: they include every fast acceptance
        // of an earlier epoch only once this replica has published the
        // epoch it sweeps for (`node::Driver::settling`). The driver asks
        // for sweeps after every voter reports it; any other asker waits.
        let deadline = Instant::now() + STAGE_WAIT;
        while self.transport.epoch() < epoch {
            if Instant::now() > deadline {
                return Err(format!(
                    "this replica has not published epoch {epoch} to sweep for it"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let record = self.record().ok_or("no membership yet")?;
        let (keys, _) = self.list_quorum(&record.voters()).await?;
        let started = Instant::now();
        let total = self.read_tracked(keys.into_iter().collect()).await?;
        info!(
            epoch,
            keys = total,
            ms = started.elapsed().as_millis() as u64,
            "sweep finished"
        );
        Ok(())
    }

    /// A learner's catch-up: the keys a quorum of voters hold state for
    /// (their union covers every chosen value), each read linearizably, so
    /// every value arrives confirmed by a quorum. Restarts if the voters
    /// change under it.
    async fn catch_up(self: &Arc<Self>, epoch: u64) -> Result<(), String> {
        loop {
            let record = self.record().ok_or("no membership yet")?;
            let voters = record.voters();
            self.begin(TaskKind::CatchUp, epoch);
            let (keys, ends) = self.list_quorum(&voters).await?;
            let started = Instant::now();
            let total = self.read_tracked(keys.into_iter().collect()).await?;
            if self.record().map(|r| r.voters()) != Some(voters) {
                info!(
                    epoch,
                    "the voters changed during the catch-up: starting again"
                );
                continue;
            }
            // What those voters had logged by the listing is now here: their
            // changelog replay starts after it, not with a snapshot.
            for (v, end) in ends {
                if v != self.me && self.storage.cursor(v).map_err(|e| e.to_string())? < end {
                    self.storage.set_cursor(v, end).map_err(|e| e.to_string())?;
                }
            }
            info!(
                epoch,
                keys = total,
                ms = started.elapsed().as_millis() as u64,
                "catch-up finished"
            );
            return Ok(());
        }
    }

    /// The union of the keys a classic quorum of `voters` holds state for
    /// (`ballot_control::stages::listers`), which covers every chosen
    /// value, and where each lister's changelog ended before its listing (anything
    /// it commits later, replay finds after that). Waits while fewer than a
    /// quorum answer, at most [`STAGE_WAIT`].
    async fn list_quorum(
        &self,
        voters: &[ReplicaId],
    ) -> Result<(BTreeSet<Vec<u8>>, Vec<(ReplicaId, u64)>), String> {
        let (order, quorum) = ballot_control::stages::listers(voters, self.me);
        let mut keys = BTreeSet::new();
        let mut ends = Vec::new();
        let deadline = Instant::now() + STAGE_WAIT;
        loop {
            keys.clear();
            ends.clear();
            for &v in &order {
                let end = match self.status_of(v).await {
                    Ok(s) => s.changelog.1,
                    Err(e) => {
                        debug!(voter = v, "listing keys: {e}");
                        continue;
                    }
                };
                match self.list(v).await {
                    Ok(k) => {
                        keys.extend(k);
                        ends.push((v, end));
                        if ends.len() >= quorum {
                            return Ok((keys, ends));
                        }
                    }
                    // A sweeper must read its own keys (where it may hold
                    // an old fast acceptance): no other listing stands in.
                    Err(e) if v == self.me => return Err(format!("listing own keys: {e}")),
                    Err(e) => debug!(voter = v, "listing keys: {e}"),
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "fewer than {quorum} voters answered for the key listing"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every key `voter` holds state for, page by page.
    async fn list(&self, voter: ReplicaId) -> Result<Vec<Vec<u8>>, String> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let what = What::Keys {
                after: after.clone(),
                limit: PAGE,
                prefix: None,
                epoch: None,
            };
            let (keys, last) = if voter == self.me {
                let page = self
                    .storage
                    .state_keys(after.as_deref(), PAGE as usize)
                    .map_err(|e| e.to_string())?;
                let last = page.len() < PAGE as usize;
                (page, last)
            } else {
                match self.ask(voter, what).await? {
                    Answer::Keys { keys, last, .. } => (keys, last),
                    other => return Err(format!("unexpected answer {other:?}")),
                }
            };
            after = keys.last().cloned();
            out.extend(keys);
            if last || after.is_none() {
                return Ok(out);
            }
        }
    }

    // ----- changelog replay and truncation -------------------------------

    /// Every [`REPLAY_INTERVAL`], replays each peer's changelog from this
    /// replica's cursor: a key the peer committed at a newer version than
    /// this replica holds is read linearizably (the protocol learns it).
    /// A replica whose cursor is older than the peer's changelog reaches
    /// back replays the peer's snapshot (every key with its version)
    /// instead. This is how a replica that was down catches up.
    pub(super) async fn replay_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(REPLAY_INTERVAL).await;
            let Some(record) = self.record() else {
                continue;
            };
            if record.role(self.me).is_none() || self.health.fatal().is_some() {
                continue;
            }
            for (peer, _) in record.peers(self.me) {
                if let Err(e) = self.replay_from(peer, record.epoch).await {
                    debug!(peer, "replaying the changelog: {e}");
                }
            }
        }
    }

    /// The version this replica's LMDB holds for `key`, without waiting
    /// for the log: one logged in the last moments and not applied yet
    /// only costs a read through consensus that was not needed.
    fn local_version(&self, key: &[u8]) -> Result<u64, String> {
        Ok(self
            .storage
            .committed_applied(key)
            .map_err(|e| e.to_string())?
            .map_or(0, |c| c.version))
    }

    async fn replay_from(&self, peer: ReplicaId, epoch: u64) -> Result<(), String> {
        let mut cursor = self.storage.cursor(peer).map_err(|e| e.to_string())?;
        loop {
            let what = What::Changes {
                after: cursor,
                limit: PAGE,
            };
            let Answer::Changes {
                first,
                last,
                entries,
            } = self.ask(peer, what).await?
            else {
                return Err("unexpected answer".into());
            };
            let page = replay::Page {
                first,
                last,
                entries,
            };
            let mut failed = None;
            let step = replay::page(cursor, &page, |key| {
                self.local_version(key).unwrap_or_else(|e| {
                    failed = Some(e);
                    u64::MAX
                })
            });
            if let Some(e) = failed {
                return Err(e);
            }
            match step {
                // Truncated past this replica's cursor (or the peer's
                // store is newer than the cursor): replay its snapshot.
                replay::Replay::Snapshot => cursor = self.replay_snapshot(peer, epoch).await?,
                replay::Replay::Learn {
                    stale,
                    cursor: next,
                    done,
                } => {
                    if stale.is_empty() && next == cursor && done {
                        return Ok(());
                    }
                    self.read_keys(stale, false).await?;
                    cursor = next;
                }
            }
            self.storage
                .set_cursor(peer, cursor)
                .map_err(|e| e.to_string())?;
            if cursor >= last {
                return Ok(());
            }
        }
    }

    /// Replays `peer`'s snapshot; returns the changelog position it was
    /// taken at (later commits are in the changelog after it).
    async fn replay_snapshot(&self, peer: ReplicaId, epoch: u64) -> Result<u64, String> {
        info!(peer, "behind the peer's changelog: replaying its snapshot");
        self.begin(TaskKind::Snapshot, epoch);
        let started = Instant::now();
        let mut seq = None;
        let mut after = None;
        let mut stale = Vec::new();
        loop {
            let what = What::Versions {
                after: after.clone(),
                limit: PAGE,
            };
            let Answer::Versions {
                seq: at,
                entries,
                last,
            } = self.ask(peer, what).await?
            else {
                return Err("unexpected answer".into());
            };
            seq.get_or_insert(at);
            after = entries.last().map(|(k, _)| k.clone());
            let mut failed = None;
            stale.extend(replay::stale(&entries, |key| {
                self.local_version(key).unwrap_or_else(|e| {
                    failed = Some(e);
                    u64::MAX
                })
            }));
            if let Some(e) = failed {
                return Err(e);
            }
            if last || after.is_none() {
                break;
            }
        }
        let total = self.read_tracked(stale).await?;
        info!(
            peer,
            keys = total,
            ms = started.elapsed().as_millis() as u64,
            "snapshot replayed"
        );
        Ok(seq.unwrap_or(0))
    }

    /// Every [`TRUNCATE_INTERVAL`], drops the changelog entries every
    /// other member has replayed, and in any case all but the newest
    /// `keep` (a member down for long then replays a snapshot).
    pub(super) async fn truncate_loop(self: Arc<Self>, keep: u64) {
        loop {
            tokio::time::sleep(TRUNCATE_INTERVAL).await;
            let Some(record) = self.record() else {
                continue;
            };
            if record.role(self.me).is_none() {
                continue;
            }
            let Ok((first, last)) = self.storage.changelog_bounds() else {
                continue;
            };
            let mut cursors = Vec::new();
            for (peer, _) in record.peers(self.me) {
                let cursor = match self.status_of(peer).await {
                    Ok(s) => s
                        .cursors
                        .iter()
                        .find(|(p, _)| *p == self.me)
                        .map_or(0, |(_, c)| *c),
                    Err(_) => 0,
                };
                cursors.push(cursor);
            }
            let Some(upto) = replay::truncation(first, last, &cursors, keep) else {
                continue;
            };
            let storage = self.storage.clone();
            match tokio::task::spawn_blocking(move || storage.truncate_changelog(upto)).await {
                Ok(Ok(dropped)) if dropped > 0 => debug!(upto, dropped, "changelog truncated"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!("truncating the changelog: {e}"),
                Err(e) => warn!("truncating the changelog: {e}"),
            }
        }
    }

    // ----- changes ------------------------------------------------------
}

/// Reads `key` linearizably, retrying until it succeeds; returns its size.
async fn read_key(
    requests: mpsc::Sender<ClientRequest>,
    health: Arc<Health>,
    key: Vec<u8>,
) -> Result<u64, String> {
    let mut delay = Duration::from_millis(50);
    for _ in 0..40 {
        let read = Operation::Read(Consistency::Linearizable);
        match node::call(&requests, key.clone(), read, CALL_TIMEOUT).await {
            Ok(c) => match c.outcome {
                Outcome::Done(current) => return Ok(current.value.map_or(0, |v| v.len() as u64)),
                other => debug!("reading a key: {}", unavailable(&other)),
            },
            Err(e) => debug!("reading a key: {e}"),
        }
        if health.fatal().is_some() {
            break;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
    Err(format!(
        "key {} could not be read",
        String::from_utf8_lossy(&key)
    ))
}
