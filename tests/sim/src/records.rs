//! The membership record through consensus (with [`SimConfig::reconfigure`]):
//! the membership record `\0ballot/members` is read and written through
//! the replicas' own cores, as the daemon's `membership/driver.rs` does,
//! by two drivers at once, so their compare-and-swaps race: the replica an
//! operator asked (it also queues the plan's changes) and the resumer
//! (`stages::resumer`, while it is up and the queue is not empty). Each runs the daemon's `stages::Driver` on the
//! record it read, publishes by a compare-and-swap at the version it read,
//! and reads again after any write, won or lost, or when its replica has
//! made a newer version durable (the daemon's `superseded`).
//!
//! The cluster's record is then what consensus chose: each version of the
//! key takes effect, in version order, once some replica committed it;
//! epochs go up one at a time, and one epoch names one membership.

use ballot_control::members::{self, Action, MembersRecord};
use ballot_control::record::conditional_write;
use ballot_control::stages::{self, Driver, Next};
use ballot_core::register::Command;
use ballot_core::{Consistency, Operation, Outcome, ReplicaId};

use crate::activation::SysCall;
use crate::{peer_addr, PlannedChange, Sim};

pub(crate) const MEMBERS_KEY: &[u8] = b"\0ballot/members";

/// One replica's membership driver.
pub(crate) struct SimDriver {
    node: usize,
    lives: u64,
    driver: Driver,
    /// The record as it read it last, and its version.
    view: Option<(u64, MembersRecord)>,
    /// A read or write of its own is in flight.
    busy: bool,
    /// The write in flight queues the plan's next change.
    queuing: bool,
}

impl<'f> Sim<'f> {
    /// Every driver takes its next step.
    pub(crate) fn drive_through_consensus(&mut self) {
        for k in 0..2 {
            self.drive_one(k);
        }
    }

    /// The replica driver `k` runs on now: the operator's is any voter that
    /// is up (kept while it stays up), the resumer's the lowest voter up.
    fn driver_node(&mut self, k: usize) -> Option<usize> {
        let voters: Vec<usize> = self
            .record
            .voters()
            .into_iter()
            .map(|id| id as usize - 1)
            .filter(|&i| {
                let n = &self.nodes[i];
                n.core.is_some() && !n.off && !n.removed
            })
            .collect();
        if k == 1 {
            // The daemon's resumer of a queue nobody drives: the lowest
            // voter the head change does not remove, while it is up.
            let resumer = stages::resumer(&self.record)? as usize - 1;
            return voters.contains(&resumer).then_some(resumer);
        }
        if let Some(d) = &self.drivers[k] {
            if voters.contains(&d.node) && self.nodes[d.node].lives == d.lives {
                return Some(d.node);
            }
        }
        if voters.is_empty() {
            return None;
        }
        Some(voters[self.members_rng.range(0, voters.len() as u64 - 1) as usize])
    }

    fn drive_one(&mut self, k: usize) {
        let Some(node) = self.driver_node(k) else {
            return;
        };
        let lives = self.nodes[node].lives;
        let fresh = self.drivers[k]
            .as_ref()
            .is_none_or(|d| d.node != node || d.lives != lives);
        if fresh {
            // A new replica drives from the top, as a daemon's driver task
            // that starts after a restart or on another replica does.
            self.drivers[k] = Some(SimDriver {
                node,
                lives,
                driver: Driver::new(),
                view: None,
                busy: false,
                queuing: false,
            });
        }
        let d = self.drivers[k].as_mut().expect("set above");
        if d.busy {
            return;
        }
        let Some((version, record)) = d.view.clone() else {
            d.busy = true;
            let read = Operation::Read(Consistency::Linearizable);
            self.sys_request(node, MEMBERS_KEY.to_vec(), read, SysCall::Members(k, lives));
            return;
        };
        // A newer record made durable here: start the stage from the top.
        if self.nodes[node]
            .log
            .committed
            .get(MEMBERS_KEY)
            .copied()
            .unwrap_or(0)
            > version
        {
            self.drivers[k].as_mut().expect("set").view = None;
            return;
        }
        let (now, clock) = (self.now, self.clock(node));
        let d = self.drivers[k].as_mut().expect("set");
        let next = d.driver.poll(version, &record, now, clock);
        match next {
            Next::Idle => {
                if k == 0 {
                    self.queue_next_change(k, node, version, record);
                }
            }
            Next::Publish(next) => {
                let next = if self.cfg.unsafe_membership {
                    self.skip_the_classic_epoch(&record, next)
                } else {
                    next
                };
                self.write_record(k, node, version, &next, false);
            }
            Next::Ask {
                status,
                task,
                nudge,
                ..
            } => {
                if let Some(task) = task {
                    for id in nudge {
                        self.start_task(id as usize - 1, task);
                    }
                }
                self.run_tasks();
                for id in status {
                    let n = &self.nodes[id as usize - 1];
                    let report = n.core.is_some().then_some(stages::Report {
                        epoch: n.epoch,
                        swept: n.swept,
                        caught_up: n.caught_up,
                    });
                    let d = self.drivers[k].as_mut().expect("set");
                    d.driver.report(id, report);
                }
            }
            // Paused: it reads the record again and carries on.
            Next::GiveUp { .. } => self.drivers[k].as_mut().expect("set").view = None,
        }
    }

    /// The operator's driver queues the plan's next change on the record
    /// it read, as `Membership::request` does.
    fn queue_next_change(
        &mut self,
        k: usize,
        node: usize,
        version: u64,
        mut record: MembersRecord,
    ) {
        let Some(&change) = self.plan.front() else {
            return;
        };
        let (action, x) = match change {
            PlannedChange::Add(x) => (Action::Add, x),
            PlannedChange::Remove(y) => (Action::Remove, y),
        };
        let id = x as ReplicaId + 1;
        // A change whose write answered 'maybe applied' may be in already.
        let listed = record.replicas.iter().any(|m| m.id == id);
        let queued = record
            .queue
            .iter()
            .any(|c| c.id == id && c.action == action);
        if queued || listed == (action == Action::Add) {
            self.plan.pop_front();
            return;
        }
        if action == Action::Remove
            && (stages::quorum_left(&record, id, |v| self.nodes[v as usize - 1].core.is_some())
                .is_err()
                || node == x)
        {
            // Refused as `ballot cluster remove` refuses (a quorum must be
            // left; a replica does not drive its own removal).
            if node == x {
                self.drivers[k] = None;
            }
            return;
        }
        let queued = members::MemberChange {
            action,
            id,
            addr: (action == Action::Add).then(|| peer_addr(id)),
            http: None,
            requested_ms: self.now,
        };
        if let Err(e) = record.enqueue(queued, self.now) {
            self.violations
                .push(format!("the plan's change {change:?} was refused: {e}"));
            self.plan.pop_front();
            return;
        }
        self.write_record(k, node, version, &record, true);
    }

    /// Publishes `next` if the record is still at `version` (0: never
    /// written, so a create).
    fn write_record(
        &mut self,
        k: usize,
        node: usize,
        version: u64,
        next: &MembersRecord,
        queuing: bool,
    ) {
        let value = next.encode();
        let command = if self.cfg.planted_blind_publish {
            Command::Put(value)
        } else {
            conditional_write((version != 0).then_some(version), value)
        };
        let d = self.drivers[k].as_mut().expect("a driver writes");
        d.busy = true;
        d.queuing = queuing;
        let lives = d.lives;
        let op = Operation::Command(command.encode());
        self.sys_request(node, MEMBERS_KEY.to_vec(), op, SysCall::Members(k, lives));
    }

    /// Driver `k`'s read or write, sent through replica `node` in its life
    /// `lives`, answered (`None`: the replica crashed). An answer to a
    /// driver that has moved to another replica since is its no longer.
    pub(crate) fn members_answer(
        &mut self,
        k: usize,
        node: usize,
        lives: u64,
        outcome: Option<Outcome>,
    ) {
        let bootstrap = self.bootstrap.clone();
        let Some(d) = self.drivers[k]
            .as_mut()
            .filter(|d| d.node == node && d.lives == lives)
        else {
            return;
        };
        d.busy = false;
        let was_read = d.view.is_none();
        let queuing = std::mem::take(&mut d.queuing);
        d.view = None;
        match outcome {
            Some(Outcome::Done(current)) if was_read => {
                let record = match current.value.as_deref().map(MembersRecord::decode) {
                    None => bootstrap,
                    Some(Ok(r)) => r,
                    Some(Err(e)) => {
                        self.violations
                            .push(format!("an undecodable membership record: {e}"));
                        return;
                    }
                };
                d.view = Some((current.version, record));
            }
            // Published (or queued): read again either way.
            Some(Outcome::Done(_)) if queuing => {
                self.plan.pop_front();
            }
            _ => {}
        }
    }

    /// A replica committed `version` of the membership record: versions
    /// take effect in order, each once.
    pub(crate) fn record_chosen(&mut self, version: u64, value: Option<Vec<u8>>) {
        if version > self.record_version {
            self.chosen_records.entry(version).or_insert(value);
        }
    }

    /// Makes every chosen version that is next in line the cluster's record.
    pub(crate) fn apply_chosen_records(&mut self) {
        while let Some(value) = self.chosen_records.remove(&(self.record_version + 1)) {
            self.record_version += 1;
            let Some(next) = value.as_deref().map(MembersRecord::decode) else {
                continue;
            };
            let next = match next {
                Ok(r) => r,
                Err(e) => {
                    self.violations
                        .push(format!("an undecodable membership record chosen: {e}"));
                    continue;
                }
            };
            // Epochs go up one at a time, and one epoch names one
            // membership, whichever version names it.
            let known = self.memberships.get(next.epoch as usize - 1).cloned();
            let broken = if next.epoch < self.record.epoch {
                Some(format!(
                    "the membership went back from epoch {} to {}",
                    self.record.epoch, next.epoch
                ))
            } else if next.epoch > self.record.epoch + 1 {
                Some(format!(
                    "the membership skipped from epoch {} to {}",
                    self.record.epoch, next.epoch
                ))
            } else {
                known.filter(|m| *m != next.members()).map(|m| {
                    format!(
                        "two memberships at epoch {}: {m:?} and {:?}",
                        next.epoch,
                        next.members()
                    )
                })
            };
            if let Some(why) = broken {
                self.violations
                    .push(format!("{why} (record version {})", self.record_version));
                continue;
            }
            self.adopt_record(next);
            self.stats.epoch = self.latest().epoch;
            self.stage_crash();
        }
    }
}
