//! The change queue's driver: each stage of section 11 of the design,
//! published by compare-and-swap on the record, waiting for the replicas it
//! names, and the view `GET /v1/cluster/members` returns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ballot_core::ReplicaId;
use tracing::{debug, info, warn};

use super::answers::{Answer, What};
use super::record::{check, Action, Change, ChangeError, Done, Member, MembersRecord, Role};
use super::MEMBERS_KEY;
use super::{MembersView, Membership, ReplicaStatus, Status, CALL_TIMEOUT, STAGE_WAIT};
use crate::system::now_ms;
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
    pub async fn request(self: &Arc<Self>, change: Change) -> Result<Change, ChangeError> {
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
            check(&record, &change)?;
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
            // Removing a replica whose join is under way abandons the join.
            if change.action == Action::Remove {
                if let Some(i) = record
                    .queue
                    .iter()
                    .position(|c| c.id == change.id && c.action == Action::Add)
                {
                    let join = record.queue.remove(i);
                    record.done.push(Done {
                        action: Action::Add,
                        id: join.id,
                        requested_ms: join.requested_ms,
                        epoch: record.epoch,
                        finished_ms: now_ms(),
                        aborted: true,
                    });
                }
            }
            record.queue.push(change.clone());
            // Queuing does not change the epoch.
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

    /// Runs queued changes until the queue is empty.
    pub(super) async fn drive(self: Arc<Self>) -> Result<(), ChangeError> {
        let Ok(_driving) = self.driving.try_lock() else {
            return Ok(());
        };
        loop {
            let (version, record) = self.current().await?;
            self.driving_version
                .store(version, std::sync::atomic::Ordering::Release);
            match self.advance(&record).await {
                Ok(Some(next)) => {
                    // Published or overtaken: read again either way.
                    self.publish(version, &next).await?;
                }
                Ok(None) => return Ok(()),
                Err(ChangeError::Superseded) => {
                    debug!("the membership record changed during a stage: starting it again");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next record for the change at the head of `record`'s queue,
    /// once what that step waits for holds; `None` when the queue is
    /// empty and everyone runs the record.
    async fn advance(
        self: &Arc<Self>,
        record: &MembersRecord,
    ) -> Result<Option<MembersRecord>, ChangeError> {
        {
            // Nothing starts until everyone named runs the current epoch
            // (section 11, "two changes apart").
            let everyone: Vec<ReplicaId> = record.replicas.iter().map(|m| m.id).collect();
            let Some(change) = record.queue.first().cloned() else {
                self.wait_for(&everyone, "run", |s| s.epoch >= record.epoch)
                    .await?;
                return Ok(None);
            };
            let leaving = (change.action == Action::Remove).then_some(change.id);
            let needed: Vec<ReplicaId> = everyone
                .iter()
                .copied()
                .filter(|&id| Some(id) != leaving)
                .collect();
            self.wait_for(&needed, "run", |s| s.epoch >= record.epoch)
                .await?;
            let next = match (change.action, record.role(change.id)) {
                (Action::Add, None) => record.next(|r| {
                    r.replicas.push(Member {
                        id: change.id,
                        addr: change.addr.expect("checked when queued"),
                        http: change.http.clone(),
                        role: Role::Learner,
                    })
                }),
                (Action::Add, Some(Role::Learner)) if record.fast => {
                    let target = record.epoch;
                    let me = self.clone();
                    let id = change.id;
                    self.wait_for_retrying(
                        &[change.id],
                        "catch up",
                        |s| s.caught_up >= target,
                        || {
                            let me = me.clone();
                            async move { me.tell(id, What::CatchUp { epoch: target }).await }
                        },
                    )
                    .await?;
                    record.next(|r| r.fast = false)
                }
                (Action::Add, Some(Role::Learner)) => {
                    self.sweep_voters(record, None).await?;
                    record.next(|r| {
                        for m in &mut r.replicas {
                            if m.id == change.id {
                                m.role = Role::Voter;
                            }
                        }
                        r.fast = true;
                        r.finish(false);
                    })
                }
                (Action::Add, Some(Role::Voter)) => record.next(|r| r.finish(false)),
                (Action::Remove, None) => record.next(|r| r.finish(false)),
                (Action::Remove, Some(Role::Learner)) => record.next(|r| {
                    r.replicas.retain(|m| m.id != change.id);
                    r.finish(false);
                }),
                (Action::Remove, Some(Role::Voter)) if record.fast => {
                    match self.check_quorum_left(record, change.id).await {
                        Ok(()) => record.next(|r| r.fast = false),
                        Err(e) => {
                            warn!("membership change abandoned: {e}");
                            record.next(|r| r.finish(true))
                        }
                    }
                }
                (Action::Remove, Some(Role::Voter)) => {
                    self.sweep_voters(record, Some(change.id)).await?;
                    record.next(|r| {
                        r.replicas.retain(|m| m.id != change.id);
                        r.fast = true;
                        r.finish(false);
                    })
                }
            };
            Ok(Some(next))
        }
    }

    /// Has every voter but `leaving` sweep the record's epoch.
    async fn sweep_voters(
        self: &Arc<Self>,
        record: &MembersRecord,
        leaving: Option<ReplicaId>,
    ) -> Result<(), ChangeError> {
        let voters: Vec<ReplicaId> = record
            .voters()
            .into_iter()
            .filter(|&v| Some(v) != leaving)
            .collect();
        let epoch = record.epoch;
        let me = self.clone();
        let targets = voters.clone();
        self.wait_for_retrying(
            &voters,
            "sweep",
            |s| s.swept >= epoch,
            || {
                let me = me.clone();
                let targets = targets.clone();
                async move {
                    for v in targets {
                        me.tell(v, What::Sweep { epoch }).await;
                    }
                }
            },
        )
        .await
    }

    /// Refuses to remove `leaving` unless a quorum of the voters left
    /// answers now.
    async fn check_quorum_left(
        &self,
        record: &MembersRecord,
        leaving: ReplicaId,
    ) -> Result<(), ChangeError> {
        let left: Vec<ReplicaId> = record
            .voters()
            .into_iter()
            .filter(|&v| v != leaving)
            .collect();
        let quorum = ballot_core::quorum_classic(left.len());
        let mut up = 0;
        for &v in &left {
            if self.status_of(v).await.is_ok() {
                up += 1;
            }
        }
        if up < quorum {
            return Err(ChangeError::Invalid(format!(
                "removing replica {leaving} would leave {} voters of which only {up} answer; \
                 a quorum of them ({quorum}) must be up",
                left.len()
            )));
        }
        Ok(())
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

    async fn wait_for(
        &self,
        ids: &[ReplicaId],
        what: &str,
        done: impl Fn(&Status) -> bool,
    ) -> Result<(), ChangeError> {
        self.wait_for_retrying(ids, what, done, || async {}).await
    }

    /// Waits until every replica of `ids` reports a status `done` accepts,
    /// calling `nudge` at once and every few seconds meanwhile (a replica
    /// restarted during a task forgets it).
    async fn wait_for_retrying<F: std::future::Future<Output = ()>>(
        &self,
        ids: &[ReplicaId],
        what: &str,
        done: impl Fn(&Status) -> bool,
        nudge: impl Fn() -> F,
    ) -> Result<(), ChangeError> {
        let deadline = Instant::now() + STAGE_WAIT;
        let mut last_nudge: Option<Instant> = None;
        loop {
            let mut waiting = Vec::new();
            for &id in ids {
                match self.status_of(id).await {
                    Ok(s) if done(&s) => {}
                    Ok(_) => waiting.push(format!("{id}")),
                    Err(e) => waiting.push(format!("{id} ({e})")),
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            debug!(what, "waiting for replicas: {}", waiting.join(", "));
            // A change queued meanwhile (a removal of the replica joining,
            // say) is handled from the top, not after this wait.
            let stored = self
                .storage
                .committed(MEMBERS_KEY)
                .ok()
                .flatten()
                .map_or(0, |c| c.version);
            if stored
                > self
                    .driving_version
                    .load(std::sync::atomic::Ordering::Acquire)
            {
                return Err(ChangeError::Superseded);
            }
            if Instant::now() > deadline {
                return Err(ChangeError::Unavailable(format!(
                    "waited {STAGE_WAIT:?} for replicas to {what}: {}",
                    waiting.join(", ")
                )));
            }
            if last_nudge.is_none_or(|at| at.elapsed() > Duration::from_secs(3)) {
                nudge().await;
                last_nudge = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
