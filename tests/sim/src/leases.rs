//! Leases and a lock in the simulator ([`SimConfig::leases`]): lease
//! records and a lock key go through the replicas' own cores, with the
//! daemon's decisions (`ballot_control::lease` for the record, when a
//! lease is due and what a sweep deletes; `ballot_control::record` for
//! every read-edit-write), as `host/src/leases.rs` does.
//!
//! Holders take turns at one lock key: each grants itself a lease, attaches
//! the lock to it (`begin_attach`, a create-if-absent of the lock, then
//! `attached`, or `abandon` when the create is refused), keeps the lease
//! alive a few times and then goes silent, like a process that dies. Every
//! replica runs the reaper on its own monotonic clock, whose rate drifts by
//! up to [`DRIFT_PPM`] and which restarts from anywhere after a crash; the
//! replicas' wall clocks, which jump, are not used.
//!
//! The safety property checked: a holder holds the lock from the answer to
//! its create until `ttl` (less twice the drift) after it sent the last
//! write that changed its lease; no two holders ever hold it at once. Every
//! read and write is in the history and checked for linearizability too.

use ballot_control::lease::{self, Attached, Expiry, Lease, Refusal, Sweep, Sweeps};
use ballot_control::record::{Update, Want};
use ballot_core::register::Command;
use ballot_core::{Consistency, Operation, Outcome};

use crate::activation::SysCall;
use crate::{Ev, Sim};

/// Every lease's time to live.
pub const TTL_MS: u64 = 1_000;
/// How often a reaper looks (the daemon's `leases::TICK`).
const TICK_MS: u64 = 250;
/// How far a replica's monotonic clock's rate may drift, in parts per
/// million.
pub const DRIFT_PPM: u64 = 1_000;
/// The lock key.
const LOCK: &[u8] = b"lock";
/// Holders, and the turns each takes.
const HOLDERS: usize = 3;
const TURNS: usize = 2;
/// How long a silent holder waits for the lock before it calls it stuck.
const STUCK_MS: u64 = 60_000;

/// Who sent a lease request.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Who {
    Holder(usize),
    /// A replica's reaper, in this life of the replica.
    Reaper(u64),
}

#[derive(Debug)]
enum Step {
    /// Waiting to begin a turn.
    Idle,
    Granting,
    /// Attaching the lock to the lease, before the create.
    Begin(Update),
    Creating,
    /// After the create: `true` if it won the lock.
    Settle(Update, bool),
    /// Its lease ended before the lock was attached: deleting the lock at
    /// the version it wrote, as the daemon undoes such a write.
    Undo,
    /// Holding, with keepalives left.
    Holding(usize),
    Renewing(Update, usize),
    /// Gone silent: waits for the lock to be free.
    Silent,
    Done,
}

pub(crate) struct Holder {
    node: usize,
    turn: usize,
    lease: u64,
    value: Vec<u8>,
    step: Step,
    /// The send time of the compare-and-swap in flight on the lease.
    cas_sent: u64,
    /// The lock's version it won: its fencing token.
    token: u64,
    /// The turn it holds the lock in, if any: (acquired, holds until).
    held: Option<(u64, u64)>,
    /// Silent: since when it has seen the lock held with this value (or
    /// not read it at all: `None`).
    waiting: Option<(u64, Option<Vec<u8>>)>,
}

impl Holder {
    fn update(&mut self) -> Option<&mut Update> {
        match &mut self.step {
            Step::Begin(u) | Step::Settle(u, _) | Step::Renewing(u, _) => Some(u),
            _ => None,
        }
    }

    /// The edit its read-edit-write makes of the record read.
    fn edit(&self, bytes: Option<&[u8]>) -> Result<Option<Vec<u8>>, Refusal> {
        let mut l = Lease::decode(bytes.ok_or(Refusal::Gone)?).map_err(|_| Refusal::Gone)?;
        let d = lease::Pending::new(&self.value, self.lease);
        let changed = match &self.step {
            Step::Begin(_) => l.begin_attach(LOCK, d).map(|()| true)?,
            Step::Settle(_, true) if l.ended => return Err(Refusal::Gone),
            Step::Settle(_, true) => l.attached(LOCK, d, self.token),
            Step::Settle(_, false) => l.abandon(LOCK, d),
            Step::Renewing(..) => l.keepalive().map(|()| true)?,
            _ => return Err(Refusal::Gone),
        };
        Ok(changed.then(|| l.encode()))
    }
}

/// A replica's reaper: what it knows, and its one job in flight.
#[derive(Default)]
pub(crate) struct Reaper {
    lives: u64,
    /// Its monotonic clock's offset and rate (ppm above or below 1).
    offset: u64,
    rate_ppm: i64,
    expiry: Expiry,
    /// When it sweeps each ended lease.
    sweeps: Sweeps,
    job: Option<Job>,
}

#[derive(Debug)]
enum Job {
    /// A due lease, read linearizably.
    Check(u64),
    /// Ending it, read at this version.
    End(u64, u64, Lease),
    /// Sweeping its keys: (id, version, lease, next key index, whether it
    /// is the last sweep, whether the key's read is in flight, whether a
    /// key failed: then the record stays for the next try).
    Sweep(u64, u64, Lease, usize, bool, bool, bool),
}

/// How long a holder may count on its lease after sending a change of it.
fn guaranteed_ms() -> u64 {
    TTL_MS - TTL_MS * 2 * DRIFT_PPM / 1_000_000
}

impl<'f> Sim<'f> {
    pub(crate) fn plan_leases(&mut self) {
        for _ in 0..HOLDERS {
            self.holders.push(Holder {
                node: 0,
                turn: 0,
                lease: 0,
                value: Vec::new(),
                step: Step::Idle,
                cas_sent: 0,
                token: 0,
                held: None,
                waiting: None,
            });
        }
        for h in 0..HOLDERS {
            let t = self.lease_rng.range(0, 1_500);
            self.at(t, Ev::Hold(h));
        }
        self.reapers = (0..self.nodes.len()).map(|_| Reaper::default()).collect();
        for i in 0..self.nodes.len() {
            let t = self.lease_rng.range(0, TICK_MS);
            self.at(t, Ev::Reap(i));
        }
    }

    pub(crate) fn leases_done(&self) -> bool {
        !self.cfg.leases || self.holders.iter().all(|h| matches!(h.step, Step::Done))
    }

    /// A replica that is up, drawn for a holder's request.
    fn lease_node(&mut self) -> Option<usize> {
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].core.is_some() && !self.nodes[i].off)
            .collect();
        if up.is_empty() {
            return None;
        }
        Some(up[self.lease_rng.range(0, up.len() as u64 - 1) as usize])
    }

    fn lease_request(&mut self, node: usize, key: Vec<u8>, op: Operation, who: Who) {
        self.sys_request(node, key, op, SysCall::Lease(who));
    }

    fn holder_later(&mut self, h: usize, ms: u64) {
        let t = self.now + ms;
        self.at(t, Ev::Hold(h));
    }

    /// Sends holder `h`'s request through a replica that is up, or tries
    /// again in a while.
    fn holder_send(&mut self, h: usize, key: Vec<u8>, op: Operation) {
        match self.lease_node() {
            Some(node) => {
                self.holders[h].node = node;
                self.lease_request(node, key, op, Who::Holder(h));
            }
            None => {
                // No replica is up: the step is lost, like a request to a
                // replica that crashed.
                self.holder_answer(h, None);
            }
        }
    }

    /// Holder `h` takes its next step (at its timer).
    pub(crate) fn hold(&mut self, h: usize) {
        let now = self.now;
        let holder = &mut self.holders[h];
        match holder.step {
            Step::Idle => {
                holder.turn += 1;
                holder.lease = (h as u64) << 32 | holder.turn as u64;
                holder.value = format!("holder-{h}-turn-{}", holder.turn).into_bytes();
                holder.step = Step::Granting;
                holder.cas_sent = now;
                let key = lease::key(holder.lease);
                let op = Operation::Command(Command::Create(Lease::new(TTL_MS).encode()).encode());
                self.holder_send(h, key, op);
            }
            Step::Holding(0) => {
                holder.step = Step::Silent;
                self.hold(h);
            }
            Step::Holding(left) => {
                holder.step = Step::Renewing(Update::new(), left - 1);
                self.holder_update(h);
            }
            Step::Silent => {
                let op = Operation::Read(Consistency::Linearizable);
                self.holder_send(h, LOCK.to_vec(), op);
            }
            _ => {}
        }
    }

    /// Carries out the holder's read-edit-write in flight.
    fn holder_update(&mut self, h: usize) {
        let now = self.now;
        let holder = &mut self.holders[h];
        let key = lease::key(holder.lease);
        let Some(u) = holder.update() else { return };
        match u.poll().clone() {
            Want::Read => {
                let op = Operation::Read(Consistency::Linearizable);
                self.holder_send(h, key, op);
            }
            Want::Write { command } => {
                holder.cas_sent = now;
                let op = Operation::Command(command.encode());
                self.holder_send(h, key, op);
            }
            Want::Done { .. } => self.holder_updated(h, true),
            Want::GaveUp => self.holder_updated(h, false),
        }
    }

    /// The holder's read-edit-write ended (`ok`: written, or nothing to
    /// write).
    fn holder_updated(&mut self, h: usize, ok: bool) {
        let holder = &mut self.holders[h];
        match std::mem::replace(&mut holder.step, Step::Silent) {
            Step::Begin(_) if ok => {
                holder.step = Step::Creating;
                let op = Operation::Command(Command::Create(holder.value.clone()).encode());
                self.holder_send(h, LOCK.to_vec(), op);
            }
            Step::Settle(_, true) if ok => {
                holder.step = Step::Holding(self.lease_rng.range(0, 4) as usize);
                self.holder_later(h, TTL_MS / 3);
            }
            Step::Settle(_, true) => {
                // The lease ended before the lock was attached (or the
                // cluster did not answer): undo the create. It lets go of
                // the lock as it sends the undo.
                if let Some((from, until)) = holder.held.take() {
                    let turn = holder.turn;
                    self.holds.push((h, turn, from, until.min(self.now)));
                }
                let holder = &mut self.holders[h];
                holder.step = Step::Undo;
                let command = Command::DeleteIf {
                    expected: holder.token,
                };
                let op = Operation::Command(command.encode());
                self.holder_send(h, LOCK.to_vec(), op);
            }
            Step::Renewing(_, left) if ok => {
                holder.step = Step::Holding(left);
                self.holder_later(h, TTL_MS / 3);
            }
            // The race lost, or the lease: wait for a free lock.
            _ => self.holder_later(h, 200),
        }
    }

    pub(crate) fn holder_answer(&mut self, h: usize, outcome: Option<Outcome>) {
        let now = self.now;
        let holder = &mut self.holders[h];
        match holder.step {
            Step::Granting => {
                if matches!(outcome, Some(Outcome::Done(_))) {
                    holder.step = Step::Begin(Update::new());
                    self.holder_update(h);
                } else {
                    holder.step = Step::Idle;
                    self.holder_later(h, 200);
                }
            }
            Step::Creating => match outcome {
                Some(Outcome::Done(cur)) if cur.value.as_deref() == Some(&holder.value[..]) => {
                    // It holds the lock from now until its lease's last
                    // change was sent plus what the lease guarantees.
                    holder.held = Some((now, holder.cas_sent + guaranteed_ms()));
                    holder.token = cur.version;
                    self.lock_tokens.push((h, holder.turn, cur.version));
                    self.stats.lock_acquired += 1;
                    holder.step = Step::Settle(Update::new(), true);
                    self.holder_update(h);
                }
                Some(Outcome::Rejected(..)) => {
                    holder.step = Step::Settle(Update::new(), false);
                    self.holder_update(h);
                }
                // Unknown: it does not count on the lock; its lease's end
                // deletes the lock if the create took effect.
                _ => {
                    holder.step = Step::Silent;
                    self.holder_later(h, 200);
                }
            },
            Step::Undo => {
                holder.step = Step::Silent;
                self.holder_later(h, 200);
            }
            Step::Begin(_) | Step::Settle(..) | Step::Renewing(..) => {
                let reading = matches!(holder.update().map(|u| u.poll()), Some(Want::Read));
                match outcome {
                    Some(Outcome::Done(cur)) if reading => {
                        match holder.edit(cur.value.as_deref()) {
                            Ok(next) => {
                                let u = holder.update().expect("in an update");
                                u.handle_read(cur.version, cur.value.is_some(), next);
                                self.holder_update(h);
                            }
                            Err(_) => self.holder_updated(h, false),
                        }
                    }
                    Some(Outcome::Done(cur)) if !reading => {
                        // The lease changed: it lives on from this send.
                        let until = holder.cas_sent + guaranteed_ms();
                        if let Some((_, held)) = &mut holder.held {
                            *held = (*held).max(until);
                        }
                        let u = holder.update().expect("in an update");
                        u.handle_written(Some(cur.version));
                        self.holder_update(h);
                    }
                    Some(Outcome::Rejected(..)) if !reading => {
                        let u = holder.update().expect("in an update");
                        u.handle_written(None);
                        self.holder_update(h);
                    }
                    _ => self.holder_updated(h, false),
                }
            }
            Step::Silent => {
                // Its hold is over: record it, and wait for a free lock.
                if let Some((from, until)) = holder.held.take() {
                    self.holds.push((h, holder.turn, from, until));
                }
                let seen = match &outcome {
                    Some(Outcome::Done(cur)) => Some(cur.value.clone()),
                    _ => None,
                };
                let free = matches!(&seen, Some(v) if v.as_deref() != Some(&holder.value[..]) && v.is_some())
                    || matches!(&seen, Some(None));
                if !free {
                    // The same holder's lock for a minute, or no answer for
                    // a minute: a lock that is never freed, or a key the
                    // faults made unavailable (a corrupted record where
                    // too few replicas are up), where it gives up.
                    // A failed read changes nothing; its own value seen
                    // again keeps the wait going.
                    match (&seen, &holder.waiting) {
                        (Some(v), Some((_, Some(w)))) if v.as_ref() == Some(w) => {}
                        (Some(v), _) => holder.waiting = Some((now, v.clone())),
                        (None, None) => holder.waiting = Some((now, None)),
                        (None, Some(_)) => {}
                    }
                    let (since, held_by) = holder.waiting.clone().expect("set above");
                    if now.saturating_sub(since) > STUCK_MS {
                        // A corrupted record of the lock or of a lease
                        // blocks that key on its replica for good (design
                        // section 7): with too few other replicas up, the
                        // lease cannot end.
                        let blocked = self
                            .corrupted_keys
                            .iter()
                            .any(|k| k == LOCK || k.starts_with(lease::PREFIX));
                        match held_by {
                            Some(v) if !blocked => self.violations.push(format!(
                                "liveness: the lock stayed with {} for {STUCK_MS} ms after its holder went silent",
                                String::from_utf8_lossy(&v)
                            )),
                            _ => self.stats.lock_gave_up += 1,
                        }
                        self.holders[h].step = Step::Done;
                        return;
                    }
                    return self.holder_later(h, 200);
                }
                holder.waiting = None;
                if holder.turn >= TURNS {
                    holder.step = Step::Done;
                    return;
                }
                holder.step = Step::Idle;
                let pause = self.lease_rng.range(0, 300);
                self.holder_later(h, pause);
            }
            Step::Idle | Step::Holding(_) | Step::Done => {}
        }
    }

    // ----- reapers ------------------------------------------------------

    /// Replica `i`'s monotonic clock: it restarts from anywhere after a
    /// crash and runs up to [`DRIFT_PPM`] fast or slow.
    fn mono(&mut self, i: usize) -> u64 {
        let lives = self.nodes[i].lives;
        if self.reapers[i].lives != lives || self.reapers[i].offset == 0 {
            let offset = 1 + self.lease_rng.range(0, 1 << 40);
            let rate_ppm = self.lease_rng.range(0, 2 * DRIFT_PPM) as i64 - DRIFT_PPM as i64;
            self.reapers[i] = Reaper {
                lives,
                offset,
                rate_ppm,
                ..Reaper::default()
            };
        }
        let r = &self.reapers[i];
        if self.cfg.planted_wall_clock_reaper {
            return self.clock(i);
        }
        let scaled = self.now as i128 * (1_000_000 + r.rate_ppm as i128) / 1_000_000;
        r.offset + scaled as u64
    }

    /// Replica `i`'s reaper looks at the leases it holds a copy of.
    pub(crate) fn reap(&mut self, i: usize) {
        let t = self.now + TICK_MS;
        if !self.leases_done() {
            self.at(t, Ev::Reap(i));
        }
        if self.nodes[i].core.is_none() || self.nodes[i].off {
            return;
        }
        let now = self.mono(i);
        if self.reapers[i].job.is_some() {
            return;
        }
        let copies: Vec<(Vec<u8>, u64)> = self.nodes[i]
            .log
            .committed
            .range(lease::PREFIX.to_vec()..)
            .take_while(|(k, _)| k.starts_with(lease::PREFIX))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (key, version) in copies {
            let Some(id) = lease::id_of(&key) else {
                continue;
            };
            let Some(Some(bytes)) = self.chosen.get(&(key.clone(), version)).cloned() else {
                continue;
            };
            let Ok(l) = Lease::decode(&bytes) else {
                continue;
            };
            let r = &mut self.reapers[i];
            r.expiry.observe(id, version, now);
            if l.ended {
                if let Some(last) = r.sweeps.due(id, now) {
                    r.job = Some(Job::Sweep(id, version, l, 0, last, false, false));
                    return self.reaper_step(i);
                }
            } else if r.expiry.due(id, version, l.ttl_ms, now) {
                r.job = Some(Job::Check(id));
                return self.reaper_step(i);
            }
        }
    }

    /// Sends the request of replica `i`'s job.
    fn reaper_step(&mut self, i: usize) {
        let who = Who::Reaper(self.nodes[i].lives);
        let (key, op) = match &mut self.reapers[i].job {
            None => return,
            Some(Job::Check(id)) => (lease::key(*id), Operation::Read(Consistency::Linearizable)),
            Some(Job::End(id, version, l)) => {
                let mut ended = l.clone();
                ended.end();
                let command = Command::Cas {
                    expected: *version,
                    value: ended.encode(),
                };
                (lease::key(*id), Operation::Command(command.encode()))
            }
            Some(Job::Sweep(id, version, l, at, last, reading, failed)) => {
                match l.keys.iter().nth(*at) {
                    // A key failed: the record stays, for the next tick.
                    None if *failed => {
                        self.reapers[i].job = None;
                        return;
                    }
                    // The record stays while writes to its keys may still
                    // take effect, until the last sweep.
                    None if l.writing() && !*last => {
                        let id = *id;
                        let r = &mut self.reapers[i];
                        r.job = None;
                        r.sweeps.swept(id);
                        return;
                    }
                    None => {
                        let command = Command::DeleteIf { expected: *version };
                        (lease::key(*id), Operation::Command(command.encode()))
                    }
                    Some((key, attached)) => match lease::sweep(attached) {
                        Sweep::Command(c) => (key.clone(), Operation::Command(c.encode())),
                        Sweep::Read => {
                            *reading = true;
                            (key.clone(), Operation::Read(Consistency::Linearizable))
                        }
                    },
                }
            }
        };
        self.lease_request(i, key, op, who);
    }

    pub(crate) fn reaper_answer(&mut self, i: usize, lives: u64, outcome: Option<Outcome>) {
        if self.nodes[i].lives != lives {
            return;
        }
        let now = self.mono(i);
        let Some(outcome) = outcome else {
            self.reapers[i].job = None;
            return;
        };
        let r = &mut self.reapers[i];
        match r.job.take() {
            None => {}
            Some(Job::Check(id)) => {
                let Outcome::Done(cur) = outcome else { return };
                let Some(Ok(l)) = cur.value.as_deref().map(Lease::decode) else {
                    return;
                };
                r.expiry.observe(id, cur.version, now);
                if l.ended {
                    // Ended by another replica, whose sweep may never come:
                    // this one sweeps once the grace is over.
                    if let Some(last) = r.sweeps.due(id, now) {
                        r.job = Some(Job::Sweep(id, cur.version, l, 0, last, false, false));
                        self.reaper_step(i);
                    }
                } else if r.expiry.due(id, cur.version, l.ttl_ms, now) {
                    r.job = Some(Job::End(id, cur.version, l));
                    self.reaper_step(i);
                }
            }
            Some(Job::End(id, _, mut l)) => {
                if let Outcome::Done(cur) = outcome {
                    l.end();
                    self.stats.lease_expiries += 1;
                    r.sweeps.ending(id, now);
                    self.reapers[i].job =
                        Some(Job::Sweep(id, cur.version, l, 0, false, false, false));
                    self.reaper_step(i);
                }
            }
            Some(Job::Sweep(id, version, l, at, last, reading, failed)) => {
                // A key that fails holds up neither the other keys nor the
                // next tick's try (the record stays until then).
                if matches!(outcome, Outcome::Failed(_)) {
                    if at < l.keys.len() {
                        self.reapers[i].job =
                            Some(Job::Sweep(id, version, l, at + 1, last, false, true));
                        self.reaper_step(i);
                    }
                    return;
                }
                if at == l.keys.len() {
                    r.sweeps.swept(id);
                    return;
                }
                if reading {
                    let Outcome::Done(cur) = outcome else { return };
                    let (key, attached): (Vec<u8>, Attached) = l
                        .keys
                        .iter()
                        .nth(at)
                        .map(|(k, a)| (k.clone(), a.clone()))
                        .expect("in range");
                    let d = cur.value.as_deref().map(lease::digest);
                    if let Some(command) = lease::sweep_read(&attached, cur.version, d) {
                        self.reapers[i].job =
                            Some(Job::Sweep(id, version, l, at, last, false, failed));
                        let who = Who::Reaper(lives);
                        let op = Operation::Command(command.encode());
                        return self.lease_request(i, key, op, who);
                    }
                }
                self.reapers[i].job = Some(Job::Sweep(id, version, l, at + 1, last, false, failed));
                self.reaper_step(i);
            }
        }
    }

    /// At the end of the run: no two holders held the lock at once, and
    /// each acquisition had a higher fencing token than the one before.
    pub(crate) fn check_holds(&mut self) {
        for h in 0..self.holders.len() {
            if let Some((from, until)) = self.holders[h].held.take() {
                let turn = self.holders[h].turn;
                self.holds.push((h, turn, from, until));
            }
        }
        let mut holds: Vec<_> = self
            .holds
            .iter()
            .filter(|(_, _, from, until)| until > from)
            .cloned()
            .collect();
        holds.sort_by_key(|&(_, _, from, _)| from);
        for pair in holds.windows(2) {
            let ((a, ta, _, until), (b, tb, from, _)) = (pair[0], pair[1]);
            if from < until {
                self.violations.push(format!(
                    "lock: holder {b} (turn {tb}) took the lock at {from} ms while holder {a} \
                     (turn {ta}) held it until {until} ms"
                ));
            }
        }
        for pair in self.lock_tokens.windows(2) {
            if pair[1].2 <= pair[0].2 {
                self.violations.push(format!(
                    "lock: fencing token {} after {}",
                    pair[1].2, pair[0].2
                ));
            }
        }
        if !self.leases_done() {
            let steps: Vec<String> = self
                .holders
                .iter()
                .map(|h| format!("{:?} in turn {}", h.step, h.turn))
                .collect();
            self.violations.push(format!(
                "liveness: the lock holders did not finish their turns: {}",
                steps.join(", ")
            ));
        }
    }
}
