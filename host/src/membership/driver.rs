//! The change queue's driver: the I/O around `ballot_control::stages`
//! (which decides each stage of section 11 of the design): reading and
//! publishing the record by compare-and-swap, asking replicas for their
//! status and their tasks, and the view `GET /v1/cluster/members` returns.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ballot_control::stages::{quorum_left, Driver, Next, Report, Task};
use ballot_core::ReplicaId;
use tracing::{debug, info, warn};

use super::answers::{Answer, What};
use super::record::{check, Action, ChangeError, MemberChange, MembersRecord, Role};
use super::MEMBERS_KEY;
use super::{MembersView, Membership, ReplicaStatus, Status, CALL_TIMEOUT, STAGE_WAIT};
use crate::system::{mono_ms, now_ms};
use crate::system_record::SystemRecord;

impl Membership {
    pub(super) async fn read_record(&self) -> Result<(u64, Option<MembersRecord>), ChangeError> {
        let (version, bytes) = self.members_record().read().await?;
        let record = bytes.map(|v| MembersRecord::decode(&v));
        Ok((
            version,
            record.transpose().map_err(ChangeError::Unavailable)?,
        ))
    }

    /// The membership record, `\0ballot/members`.
    fn members_record(&self) -> SystemRecord<'_> {
        SystemRecord {
            requests: &self.requests,
            key: MEMBERS_KEY,
            what: "the membership",
            timeout: CALL_TIMEOUT,
        }
    }

    /// The record as the cluster has it (epoch 1 before any change).
    async fn current(&self) -> Result<(u64, MembersRecord), ChangeError> {
        let (version, record) = self.read_record().await?;
        match record.or_else(|| self.bootstrap.clone()) {
            Some(r) => Ok((version, r)),
            None => Err(ChangeError::Unavailable(
                "this replica does not know the membership yet".into(),
            )),
        }
    }

    /// Writes `next` if the record is still at `version`; false if someone
    /// changed it first.
    async fn publish(&self, version: u64, next: &MembersRecord) -> Result<bool, ChangeError> {
        let expected = (version != 0).then_some(version);
        if self
            .members_record()
            .write(expected, next.encode())
            .await?
            .is_none()
        {
            return Ok(false);
        }
        info!(
            epoch = next.epoch,
            voters = ?next.members().voters,
            learners = ?next.members().learners,
            fast = next.fast,
            "membership epoch published"
        );
        Ok(true)
    }

    /// Queues a change, starts driving the queue, and returns the change
    /// as queued.
    pub async fn request(
        self: &Arc<Self>,
        change: MemberChange,
    ) -> Result<MemberChange, ChangeError> {
        for _ in 0..16 {
            let (version, mut record) = self.current().await?;
            let queued = record
                .queue
                .iter()
                .find(|c| c.id == change.id && c.action == change.action)
                .cloned();
            if let Some(c) = queued {
                // Asked again: the same change, still under way.
                self.spawn_driver();
                return Ok(c);
            }
            check(&record, &change).map_err(ChangeError::Invalid)?;
            if change.action == Action::Remove {
                if change.id == self.me {
                    return Err(ChangeError::Invalid(format!(
                        "replica {} cannot drive its own removal; ask another replica",
                        self.me
                    )));
                }
                if record.role(change.id) == Some(Role::Voter) {
                    self.check_quorum_left(&record, change.id).await?;
                }
            }
            record
                .enqueue(change.clone(), now_ms())
                .map_err(ChangeError::Invalid)?;
            if self.publish(version, &record).await? {
                self.spawn_driver();
                return Ok(change);
            }
        }
        Err(ChangeError::Unavailable(
            "the membership kept changing under this request; try again".into(),
        ))
    }

    fn spawn_driver(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.drive().await {
                warn!("membership change paused: {e}; it resumes on the next request or poll");
            }
        });
    }

    /// Runs queued changes until the queue is empty: the stages are
    /// `ballot_control::stages`; this does their I/O (read and publish the
    /// record, ask replicas for their status and tasks).
    pub(super) async fn drive(self: Arc<Self>) -> Result<(), ChangeError> {
        let Ok(_driving) = self.driving.try_lock() else {
            return Ok(());
        };
        let mut driver = Driver::new();
        loop {
            let (version, record) = self.current().await?;
            self.driving_version
                .store(version, std::sync::atomic::Ordering::Release);
            let mut errors: BTreeMap<ReplicaId, String> = BTreeMap::new();
            let mut asked = false;
            loop {
                match driver.poll(version, &record, mono_ms(), now_ms()) {
                    Next::Idle => return Ok(()),
                    Next::Publish(next) => {
                        // Published or overtaken: read again either way.
                        self.publish(version, &next).await?;
                        break;
                    }
                    Next::GiveUp { until, replicas } => {
                        return Err(ChangeError::Unavailable(format!(
                            "waited {STAGE_WAIT:?} for replicas to {}: {}",
                            until.what(),
                            waiting(&replicas, &errors)
                        )));
                    }
                    Next::Ask {
                        status,
                        until,
                        task,
                        nudge,
                    } => {
                        if asked {
                            debug!(
                                what = until.what(),
                                "waiting for replicas: {}",
                                waiting(&status, &errors)
                            );
                            if self.superseded() {
                                debug!("the membership record changed during a stage: starting it again");
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        asked = true;
                        if let Some(task) = task {
                            let what = match task {
                                Task::CatchUp { epoch } => What::CatchUp { epoch },
                                Task::Sweep { epoch } => What::Sweep { epoch },
                            };
                            for id in nudge {
                                self.tell(id, what.clone()).await;
                            }
                        }
                        for id in status {
                            let report = match self.status_of(id).await {
                                Ok(s) => {
                                    errors.remove(&id);
                                    Some(Report {
                                        epoch: s.epoch,
                                        swept: s.swept,
                                        caught_up: s.caught_up,
                                    })
                                }
                                Err(e) => {
                                    errors.insert(id, e);
                                    None
                                }
                            };
                            driver.report(id, report);
                        }
                    }
                }
            }
        }
    }

    /// A change queued meanwhile (a removal of the replica joining, say)
    /// is handled from the top, not after the current wait.
    fn superseded(&self) -> bool {
        let stored = self
            .storage
            .committed(MEMBERS_KEY)
            .ok()
            .flatten()
            .map_or(0, |c| c.version);
        stored
            > self
                .driving_version
                .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Refuses to remove `leaving` unless a quorum of the voters left
    /// answers now.
    async fn check_quorum_left(
        &self,
        record: &MembersRecord,
        leaving: ReplicaId,
    ) -> Result<(), ChangeError> {
        let mut answering = BTreeSet::new();
        for v in record.voters() {
            if v != leaving && self.status_of(v).await.is_ok() {
                answering.insert(v);
            }
        }
        quorum_left(record, leaving, |v| answering.contains(&v)).map_err(ChangeError::Invalid)
    }

    /// Starts a task on `id` (itself included).
    async fn tell(self: &Arc<Self>, id: ReplicaId, what: What) {
        if id == self.me {
            self.local_answer(id, what);
        } else if let Err(e) = self.ask(id, what).await {
            debug!(replica = id, "{e}");
        }
    }

    pub(super) async fn status_of(&self, id: ReplicaId) -> Result<Status, String> {
        if id == self.me {
            return Ok(self.status());
        }
        match self.ask(id, What::Status).await? {
            Answer::Status(s) => Ok(s),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// Every replica's status, or why it did not answer.
    pub async fn statuses(&self, ids: &[ReplicaId]) -> Vec<ReplicaStatus> {
        let mut out = Vec::new();
        for &id in ids {
            match self.status_of(id).await {
                Ok(s) => out.push(ReplicaStatus {
                    id,
                    status: Some(s),
                    error: None,
                }),
                Err(e) => out.push(ReplicaStatus {
                    id,
                    status: None,
                    error: Some(e),
                }),
            }
        }
        out
    }

    /// The record and every member's status.
    pub async fn view(&self) -> Result<MembersView, ChangeError> {
        let (version, record) = self.current().await?;
        let ids: Vec<ReplicaId> = record.replicas.iter().map(|m| m.id).collect();
        let status = self.statuses(&ids).await;
        Ok(MembersView {
            version,
            record,
            status,
        })
    }
}

/// The replicas a wait is on, with why each did not answer if it did not.
fn waiting(replicas: &[ReplicaId], errors: &BTreeMap<ReplicaId, String>) -> String {
    replicas
        .iter()
        .map(|id| match errors.get(id) {
            Some(e) => format!("{id} ({e})"),
            None => format!("{id}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
