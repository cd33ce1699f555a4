//! The stages of a membership change (design section 11), as a decision:
//! from the record and what the replicas report to the next step.
//!
//! | change | record now | waits for | then publishes |
//! |---|---|---|---|
//! | any, or none queued | epoch e | every replica named (but a leaving one) runs e | (nothing queued: done) |
//! | join of x | x not listed | | x as a learner |
//! | join of x | x a learner, fast on | x caught up at e (asked to catch up) | fast off |
//! | join of x | x a learner, fast off | every voter swept e (asked to sweep) | x a voter, fast on, change done |
//! | leave of y | y a voter, fast on | | fast off |
//! | leave of y | y a voter, fast off | every voter but y swept e (asked to sweep) | y gone, fast on, change done |
//! | leave of y | y a learner (its join given up) | | y gone, fast on, change done |
//! | join of a voter, leave of a non-member | | | change done |
//!
//! [`step`] is that table. [`Driver`] wraps it with what a wait needs over
//! time: the reports gathered for one version of the record, a nudge when a
//! wait starts and every [`NUDGE_MS`] (a replica restarted during a task
//! forgets it), and a deadline of [`STAGE_WAIT_MS`].

use std::collections::BTreeMap;

use ballot_core::ReplicaId;

use crate::members::{Action, Member, MembersRecord, Role};

/// How long one wait may last before the driver gives up (it resumes on
/// the next request or poll).
pub const STAGE_WAIT_MS: u64 = 300_000;
/// How often a wait asks again for the task it waits on.
pub const NUDGE_MS: u64 = 3_000;

/// What a replica reported when asked for its status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The epoch it runs.
    pub epoch: u64,
    /// The newest epoch whose sweep it finished.
    pub swept: u64,
    /// The newest epoch at which it finished catching up.
    pub caught_up: u64,
}

/// What a wait needs each replica it names to report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// It runs this epoch or a later one.
    Runs(u64),
    /// It finished catching up at this epoch or a later one.
    CaughtUp(u64),
    /// It finished sweeping this epoch or a later one.
    Swept(u64),
}

impl Until {
    pub fn holds(self, r: &Report) -> bool {
        match self {
            Until::Runs(e) => r.epoch >= e,
            Until::CaughtUp(e) => r.caught_up >= e,
            Until::Swept(e) => r.swept >= e,
        }
    }

    /// The wait in words: "waited for replicas to {what}".
    pub fn what(self) -> &'static str {
        match self {
            Until::Runs(_) => "run",
            Until::CaughtUp(_) => "catch up",
            Until::Swept(_) => "sweep",
        }
    }

    /// The task that makes it hold, if it takes one.
    fn task(self) -> Option<Task> {
        match self {
            Until::Runs(_) => None,
            Until::CaughtUp(epoch) => Some(Task::CatchUp { epoch }),
            Until::Swept(epoch) => Some(Task::Sweep { epoch }),
        }
    }
}

/// What the driver asks of a replica while it waits. Both read, each key
/// linearizably, every key a classic quorum of voters holds state for
/// ([`listers`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// A learner's catch-up.
    CatchUp { epoch: u64 },
    /// A continuing voter's sweep (design section 11).
    Sweep { epoch: u64 },
}

impl Task {
    /// The epoch it is asked for.
    pub fn epoch(self) -> u64 {
        match self {
            Task::CatchUp { epoch } | Task::Sweep { epoch } => epoch,
        }
    }
}

/// Whose keys replica `me` lists for a [`Task`], in the order it asks, and
/// how many listings it needs: a classic quorum of `voters`, itself first
/// if it is one. The union of a classic quorum's keys holds every key with
/// a chosen value, since a linearizable read's quorum must find each. A
/// sweep lists more than its own keys: a value chosen two voter changes
/// back can be held by just a classic quorum of the voters it was chosen
/// under, and after a join and a leave those holders can be too few to meet
/// every classic quorum of the new voters (voters {a,b,c}, chosen at {a,b};
/// x joins; a leaves: {c,x} holds nothing). A sweep that reads every such
/// key leaves each continuing voter holding it.
pub fn listers(voters: &[ReplicaId], me: ReplicaId) -> (Vec<ReplicaId>, usize) {
    let order = (voters.iter().copied().filter(|&v| v == me))
        .chain(voters.iter().copied().filter(|&v| v != me))
        .collect();
    (order, ballot_core::quorum_classic(voters.len()))
}

/// The next step of the change at the head of a record's queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing is queued and every replica runs the record.
    Idle,
    /// Publish this record in place of the one read.
    Publish(MembersRecord),
    /// Wait until each of `replicas` reports `until` (those are the ones
    /// that do not yet, or did not answer).
    Wait {
        replicas: Vec<ReplicaId>,
        until: Until,
    },
}

/// The next step for `record`, given what the replicas reported since it
/// was read (a replica missing from `reports` did not answer); `now_ms`
/// (ms since the Unix epoch) dates a change that finishes.
pub fn step(record: &MembersRecord, reports: &BTreeMap<ReplicaId, Report>, now_ms: u64) -> Step {
    let change = record.queue.first();
    // Nothing starts until everyone named runs the current epoch ("two
    // changes apart"); a leaving replica is not waited for.
    let leaving = change.filter(|c| c.action == Action::Remove).map(|c| c.id);
    let needed: Vec<ReplicaId> = record
        .replicas
        .iter()
        .map(|m| m.id)
        .filter(|&id| Some(id) != leaving)
        .collect();
    if let Some(wait) = wait(&needed, Until::Runs(record.epoch), reports) {
        return wait;
    }
    let Some(change) = change else {
        return Step::Idle;
    };
    let id = change.id;
    let done = |edit: &dyn Fn(&mut MembersRecord)| {
        Step::Publish(record.next(|r| {
            edit(r);
            r.finish(false, now_ms);
        }))
    };
    match (change.action, record.role(id)) {
        (Action::Add, None) => Step::Publish(record.next(|r| {
            r.replicas.push(Member {
                id,
                addr: change
                    .addr
                    .expect("an add is checked for its address when queued"),
                http: change.http.clone(),
                role: Role::Learner,
            })
        })),
        (Action::Add, Some(Role::Learner)) if record.fast => {
            match wait(&[id], Until::CaughtUp(record.epoch), reports) {
                Some(wait) => wait,
                None => Step::Publish(record.next(|r| r.fast = false)),
            }
        }
        (Action::Add, Some(Role::Learner)) => {
            match wait(&record.voters(), Until::Swept(record.epoch), reports) {
                Some(wait) => wait,
                None => done(&|r| {
                    for m in &mut r.replicas {
                        if m.id == id {
                            m.role = Role::Voter;
                        }
                    }
                    r.fast = true;
                }),
            }
        }
        (Action::Add, Some(Role::Voter)) | (Action::Remove, None) => done(&|_| {}),
        // A learner leaves when its join was given up, maybe at the join's
        // classic epoch: the voters are the same, so the fast round comes
        // back on (section 11, case 1), or the next join would skip its
        // catch-up and the cluster would stay classic-only.
        (Action::Remove, Some(Role::Learner)) => done(&|r| {
            r.replicas.retain(|m| m.id != id);
            r.fast = true;
        }),
        // Every voter but y runs the epoch, so a quorum of them is up.
        (Action::Remove, Some(Role::Voter)) if record.fast => {
            Step::Publish(record.next(|r| r.fast = false))
        }
        (Action::Remove, Some(Role::Voter)) => {
            let staying: Vec<ReplicaId> =
                record.voters().into_iter().filter(|&v| v != id).collect();
            match wait(&staying, Until::Swept(record.epoch), reports) {
                Some(wait) => wait,
                None => done(&|r| {
                    r.replicas.retain(|m| m.id != id);
                    r.fast = true;
                }),
            }
        }
    }
}

/// A wait for those of `ids` that do not report `until` yet; `None` if
/// every one does.
fn wait(ids: &[ReplicaId], until: Until, reports: &BTreeMap<ReplicaId, Report>) -> Option<Step> {
    let replicas: Vec<ReplicaId> = ids
        .iter()
        .copied()
        .filter(|id| !reports.get(id).is_some_and(|r| until.holds(r)))
        .collect();
    (!replicas.is_empty()).then_some(Step::Wait { replicas, until })
}

/// Whether removing `leaving` leaves a quorum of the remaining voters
/// that `answers`; why not if it does not. Checked when a removal is
/// queued (the first stage then waits for all of them to run the epoch).
pub fn quorum_left(
    record: &MembersRecord,
    leaving: ReplicaId,
    answers: impl Fn(ReplicaId) -> bool,
) -> Result<(), String> {
    let left: Vec<ReplicaId> = record
        .voters()
        .into_iter()
        .filter(|&v| v != leaving)
        .collect();
    let quorum = ballot_core::quorum_classic(left.len());
    let up = left.iter().filter(|&&v| answers(v)).count();
    if up < quorum {
        return Err(format!(
            "removing replica {leaving} would leave {} voters of which only {up} answer; \
             a quorum of them ({quorum}) must be up",
            left.len()
        ));
    }
    Ok(())
}

/// The replica that resumes a queue nobody drives (after the driving
/// replica crashed, say): the lowest voter the change at the head does not
/// remove. The one leaving may be down for good, and may not drive its own
/// removal.
pub fn resumer(record: &MembersRecord) -> Option<ReplicaId> {
    let head = record.queue.first()?;
    let leaving = (head.action == Action::Remove).then_some(head.id);
    record.voters().into_iter().find(|&v| Some(v) != leaving)
}

/// What the driver's owner does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// The queue is empty and every replica runs the record: stop.
    Idle,
    /// Publish `record` by compare-and-swap on the version read, then read
    /// the record again (whether the write won or someone else's did).
    Publish(MembersRecord),
    /// Ask `status` for their status and [`Driver::report`] the answers;
    /// first ask `task` of `nudge`, if any; then poll again (after a pause
    /// if this wait was asked before).
    Ask {
        status: Vec<ReplicaId>,
        until: Until,
        task: Option<Task>,
        nudge: Vec<ReplicaId>,
    },
    /// The wait for `until` from `replicas` lasted [`STAGE_WAIT_MS`].
    GiveUp {
        until: Until,
        replicas: Vec<ReplicaId>,
    },
}

/// A wait under way: which one, since when, and when it last nudged.
#[derive(Clone, Copy, Debug)]
struct Waiting {
    until: Until,
    since_ms: u64,
    nudged_ms: Option<u64>,
}

/// The driver of a record's queue: feed it what replicas report, poll it
/// for what to do. One per replica that drives; it holds no I/O.
#[derive(Debug, Default)]
pub struct Driver {
    /// The version of the record the reports are about.
    version: u64,
    reports: BTreeMap<ReplicaId, Report>,
    waiting: Option<Waiting>,
}

impl Driver {
    pub fn new() -> Driver {
        Driver::default()
    }

    /// What `id` answered when asked for its status (`None`: it did not).
    /// A replica that does not answer keeps the last report it gave about
    /// this version: what it reported (the epoch it runs, a sweep or
    /// catch-up done) stays true of its durable state, and a wait does not
    /// start again because one status call failed.
    pub fn report(&mut self, id: ReplicaId, report: Option<Report>) {
        if let Some(r) = report {
            self.reports.insert(id, r);
        }
    }

    /// The next thing to do about `record`, read at `version`. `now_ms`
    /// is a monotonic clock in ms (the waits' nudges and deadline),
    /// `wall_ms` the time since the Unix epoch (dates a finished change).
    /// A new version starts afresh: reports about an older one are
    /// forgotten.
    pub fn poll(
        &mut self,
        version: u64,
        record: &MembersRecord,
        now_ms: u64,
        wall_ms: u64,
    ) -> Next {
        if version != self.version {
            self.version = version;
            self.reports.clear();
            self.waiting = None;
        }
        match step(record, &self.reports, wall_ms) {
            Step::Idle => {
                self.waiting = None;
                Next::Idle
            }
            Step::Publish(record) => {
                self.waiting = None;
                Next::Publish(record)
            }
            Step::Wait { replicas, until } => {
                let w = match self.waiting {
                    Some(w) if w.until == until => w,
                    _ => Waiting {
                        until,
                        since_ms: now_ms,
                        nudged_ms: None,
                    },
                };
                if now_ms.saturating_sub(w.since_ms) > STAGE_WAIT_MS {
                    self.waiting = None;
                    return Next::GiveUp { until, replicas };
                }
                let task = until.task();
                let due = task.is_some()
                    && w.nudged_ms
                        .is_none_or(|at| now_ms.saturating_sub(at) >= NUDGE_MS);
                self.waiting = Some(Waiting {
                    nudged_ms: if due { Some(now_ms) } else { w.nudged_ms },
                    ..w
                });
                Next::Ask {
                    nudge: if due { replicas.clone() } else { Vec::new() },
                    status: replicas,
                    until,
                    task: if due { task } else { None },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::members::MemberChange;

    fn member(id: ReplicaId, role: Role) -> Member {
        Member {
            id,
            addr: ([127, 0, 0, 1], 7000 + id as u16).into(),
            http: None,
            role,
        }
    }

    fn cluster(voters: &[ReplicaId]) -> MembersRecord {
        MembersRecord::bootstrap(voters.iter().map(|&v| member(v, Role::Voter)).collect())
    }

    fn queued(mut r: MembersRecord, action: Action, id: ReplicaId) -> MembersRecord {
        let addr = (action == Action::Add).then(|| ([127, 0, 0, 1], 7000 + id as u16).into());
        r.enqueue(
            MemberChange {
                action,
                id,
                addr,
                http: None,
                requested_ms: 1,
            },
            1,
        )
        .unwrap();
        r
    }

    /// Every replica of `r` runs its epoch, with `edit` applied to each
    /// report.
    fn all_run(
        r: &MembersRecord,
        edit: impl Fn(ReplicaId, &mut Report),
    ) -> BTreeMap<ReplicaId, Report> {
        r.replicas
            .iter()
            .map(|m| {
                let mut rep = Report {
                    epoch: r.epoch,
                    ..Report::default()
                };
                edit(m.id, &mut rep);
                (m.id, rep)
            })
            .collect()
    }

    fn published(s: Step) -> MembersRecord {
        match s {
            Step::Publish(r) => r,
            other => panic!("expected a publish, got {other:?}"),
        }
    }

    #[test]
    fn nothing_queued_waits_for_everyone_to_run_the_epoch_then_is_idle() {
        let r = cluster(&[1, 2, 3]);
        let mut reports = all_run(&r, |_, _| {});
        reports.remove(&2);
        reports.get_mut(&3).unwrap().epoch = 0;
        assert_eq!(
            step(&r, &reports, 9),
            Step::Wait {
                replicas: vec![2, 3],
                until: Until::Runs(1)
            }
        );
        assert_eq!(step(&r, &all_run(&r, |_, _| {}), 9), Step::Idle);
    }

    #[test]
    fn a_join_goes_learner_caught_up_classic_swept_voter() {
        let r = queued(cluster(&[1, 2, 3]), Action::Add, 4);
        // (1) x becomes a learner, voters unchanged.
        let learning = published(step(&r, &all_run(&r, |_, _| {}), 5));
        assert_eq!((learning.epoch, learning.fast), (2, true));
        assert_eq!(learning.members().learners, vec![4]);
        assert_eq!(learning.voters(), vec![1, 2, 3]);
        // Everyone, the learner too, runs it first.
        let mut reports = all_run(&learning, |_, _| {});
        reports.remove(&4);
        assert_eq!(
            step(&learning, &reports, 5),
            Step::Wait {
                replicas: vec![4],
                until: Until::Runs(2)
            }
        );
        // Then the learner catches up at that epoch.
        let reports = all_run(&learning, |_, _| {});
        assert_eq!(
            step(&learning, &reports, 5),
            Step::Wait {
                replicas: vec![4],
                until: Until::CaughtUp(2)
            }
        );
        let caught = all_run(&learning, |id, rep| {
            if id == 4 {
                rep.caught_up = 2;
            }
        });
        // (2) same voters, fast off.
        let classic = published(step(&learning, &caught, 5));
        assert_eq!((classic.epoch, classic.fast), (3, false));
        assert_eq!(classic.voters(), vec![1, 2, 3]);
        // (3) every voter sweeps that epoch; the learner does not.
        let reports = all_run(&classic, |id, rep| rep.swept = if id == 2 { 3 } else { 2 });
        assert_eq!(
            step(&classic, &reports, 5),
            Step::Wait {
                replicas: vec![1, 3],
                until: Until::Swept(3)
            }
        );
        // (4) x a voter, fast on, the change done.
        let joined = published(step(
            &classic,
            &all_run(&classic, |_, rep| rep.swept = 3),
            7,
        ));
        assert_eq!((joined.epoch, joined.fast), (4, true));
        assert_eq!(joined.voters(), vec![1, 2, 3, 4]);
        assert!(joined.queue.is_empty());
        assert_eq!(
            (
                joined.done[0].id,
                joined.done[0].epoch,
                joined.done[0].finished_ms,
                joined.done[0].aborted
            ),
            (4, 4, 7, false)
        );
        assert_eq!(step(&joined, &all_run(&joined, |_, _| {}), 7), Step::Idle);
    }

    #[test]
    fn a_leave_goes_classic_swept_without_the_leaver_then_gone() {
        let r = queued(cluster(&[1, 2, 3, 4]), Action::Remove, 2);
        // The leaving replica is not waited for.
        let mut reports = all_run(&r, |_, _| {});
        reports.remove(&2);
        // (1) same voters, fast off.
        let classic = published(step(&r, &reports, 5));
        assert_eq!((classic.epoch, classic.fast), (2, false));
        assert_eq!(classic.voters(), vec![1, 2, 3, 4]);
        // Every voter but the leaving one sweeps.
        let mut reports = all_run(&classic, |_, rep| rep.swept = 2);
        reports.remove(&2);
        reports.get_mut(&4).unwrap().swept = 1;
        assert_eq!(
            step(&classic, &reports, 5),
            Step::Wait {
                replicas: vec![4],
                until: Until::Swept(2)
            }
        );
        reports.get_mut(&4).unwrap().swept = 2;
        // (2) y gone, fast on.
        let left = published(step(&classic, &reports, 5));
        assert_eq!((left.epoch, left.fast), (3, true));
        assert_eq!(left.voters(), vec![1, 3, 4]);
        assert!(left.queue.is_empty() && !left.done[0].aborted);
    }

    #[test]
    fn a_leave_waits_for_every_voter_that_stays_and_needs_a_quorum_of_them_to_queue() {
        let r = queued(cluster(&[1, 2, 3]), Action::Remove, 3);
        let mut reports = all_run(&r, |_, _| {});
        reports.remove(&2);
        // 2 stays, so it must run the epoch before the leave starts.
        assert_eq!(
            step(&r, &reports, 5),
            Step::Wait {
                replicas: vec![2],
                until: Until::Runs(1)
            }
        );
        let five = cluster(&[1, 2, 3, 4, 5]);
        assert_eq!(quorum_left(&five, 5, |v| v <= 3), Ok(()));
        assert_eq!(
            quorum_left(&five, 5, |v| v == 1 || v == 2),
            Err(
                "removing replica 5 would leave 4 voters of which only 2 answer; \
                 a quorum of them (3) must be up"
                    .into()
            )
        );
    }

    #[test]
    fn a_join_given_up_at_its_classic_epoch_turns_the_fast_round_back_on() {
        let r = queued(cluster(&[1, 2, 3]), Action::Add, 4);
        let learning = published(step(&r, &all_run(&r, |_, _| {}), 5));
        let caught = all_run(&learning, |_, rep| rep.caught_up = 2);
        let classic = published(step(&learning, &caught, 5));
        assert!(!classic.fast);
        // The operator removes 4 before the voters swept.
        let given_up = queued(classic, Action::Remove, 4);
        assert_eq!(given_up.queue.len(), 1);
        let back = published(step(&given_up, &all_run(&given_up, |_, _| {}), 5));
        assert_eq!(back.voters(), vec![1, 2, 3]);
        assert!(back.fast, "the cluster stayed classic-only");
        // The next join catches up again before its classic epoch.
        let again = queued(back, Action::Add, 5);
        let learning = published(step(&again, &all_run(&again, |_, _| {}), 5));
        assert_eq!(
            step(&learning, &all_run(&learning, |_, _| {}), 5),
            Step::Wait {
                replicas: vec![5],
                until: Until::CaughtUp(learning.epoch)
            }
        );
    }

    #[test]
    fn a_stalled_queue_is_resumed_by_the_lowest_voter_that_stays() {
        assert_eq!(resumer(&cluster(&[1, 2, 3])), None);
        assert_eq!(
            resumer(&queued(cluster(&[1, 2, 3]), Action::Add, 4)),
            Some(1)
        );
        // Replica 1 is being removed (and may be down): 2 resumes.
        let removing = queued(cluster(&[1, 2, 3]), Action::Remove, 1);
        assert_eq!(resumer(&removing), Some(2));
        let classic = published(step(&removing, &all_run(&removing, |_, _| {}), 5));
        assert_eq!(resumer(&classic), Some(2));
    }

    #[test]
    fn removing_a_learner_or_a_non_member_finishes_at_once() {
        let mut r = cluster(&[1, 2, 3]);
        r.replicas.push(member(4, Role::Learner));
        let r = queued(r, Action::Remove, 4);
        let gone = published(step(&r, &all_run(&r, |_, _| {}), 5));
        assert_eq!(gone.replicas.len(), 3);
        assert!(gone.queue.is_empty());
        // Removing a replica whose join was queued drops the join.
        let r = queued(queued(cluster(&[1, 2]), Action::Add, 3), Action::Remove, 3);
        assert_eq!(r.queue.len(), 1);
        assert!(r.done[0].aborted);
        let done = published(step(&r, &all_run(&r, |_, _| {}), 5));
        assert!(done.queue.is_empty() && done.replicas.len() == 2);
    }

    #[test]
    fn the_driver_nudges_when_a_wait_starts_and_every_few_seconds_then_gives_up() {
        let r = queued(cluster(&[1, 2, 3]), Action::Add, 4);
        let mut learning = published(step(&r, &all_run(&r, |_, _| {}), 5));
        learning.queue = r.queue.clone();
        let mut d = Driver::new();
        // First poll of a version: nobody reported, ask everyone.
        assert_eq!(
            d.poll(2, &learning, 0, 0),
            Next::Ask {
                status: vec![1, 2, 3, 4],
                until: Until::Runs(2),
                task: None,
                nudge: vec![]
            }
        );
        for id in 1..=4 {
            d.report(
                id,
                Some(Report {
                    epoch: 2,
                    ..Report::default()
                }),
            );
        }
        let catch_up = Next::Ask {
            status: vec![4],
            until: Until::CaughtUp(2),
            task: Some(Task::CatchUp { epoch: 2 }),
            nudge: vec![4],
        };
        assert_eq!(d.poll(2, &learning, 100, 0), catch_up);
        let quiet = Next::Ask {
            status: vec![4],
            until: Until::CaughtUp(2),
            task: None,
            nudge: vec![],
        };
        assert_eq!(d.poll(2, &learning, 100 + NUDGE_MS - 1, 0), quiet);
        assert_eq!(d.poll(2, &learning, 100 + NUDGE_MS, 0), catch_up);
        assert_eq!(
            d.poll(2, &learning, 101 + STAGE_WAIT_MS, 0),
            Next::GiveUp {
                until: Until::CaughtUp(2),
                replicas: vec![4]
            }
        );
        // A status call that fails keeps the wait where it is.
        d.report(1, None);
        assert!(matches!(
            d.poll(2, &learning, 200 + NUDGE_MS, 0),
            Next::Ask {
                until: Until::CaughtUp(2),
                ..
            }
        ));
        // A new version of the record forgets the reports.
        assert!(matches!(
            d.poll(3, &learning, 0, 0),
            Next::Ask { until: Until::Runs(2), ref status, .. } if status.len() == 4
        ));
        // Reported caught up: fast off is published.
        for id in 1..=4 {
            d.report(
                id,
                Some(Report {
                    epoch: 2,
                    caught_up: 2,
                    swept: 0,
                }),
            );
        }
        match d.poll(3, &learning, 0, 0) {
            Next::Publish(record) => assert!(!record.fast),
            other => panic!("{other:?}"),
        }
    }
}
