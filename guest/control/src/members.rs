//! The membership record, `\0ballot/members`: its replicas and roles,
//! the queue of changes and the ones done, and which changes may queue.

use std::net::SocketAddr;

use ballot_core::{Members, ReplicaId};
use serde::{Deserialize, Serialize};

/// Format of the membership record.
pub const MEMBERS_FORMAT: u32 = 1;
/// Finished changes the record remembers.
const DONE_KEPT: usize = 32;

/// What a replica does in a configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Voter,
    Learner,
}

/// One replica of a configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: ReplicaId,
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Its client URL, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    pub role: Role,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Add,
    Remove,
}

/// A requested change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberChange {
    pub action: Action,
    pub id: ReplicaId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// When it was asked for (ms since the Unix epoch); names the request.
    pub requested_ms: u64,
}

/// A finished change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub action: Action,
    pub id: ReplicaId,
    pub requested_ms: u64,
    /// The epoch that completed it.
    pub epoch: u64,
    pub finished_ms: u64,
    /// A join abandoned because the replica was removed before it finished.
    #[serde(default)]
    pub aborted: bool,
}

/// The record under the system key `\0ballot/members` (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersRecord {
    pub format: u32,
    pub epoch: u64,
    /// Whether the fast round is on (off while voters change).
    pub fast: bool,
    pub replicas: Vec<Member>,
    /// Changes not finished; the first is in progress.
    #[serde(default)]
    pub queue: Vec<MemberChange>,
    #[serde(default)]
    pub done: Vec<Done>,
}

impl MembersRecord {
    /// Epoch 1: the replicas a new cluster is started with, all voters.
    pub fn bootstrap(mut replicas: Vec<Member>) -> MembersRecord {
        replicas.sort_by_key(|m| m.id);
        MembersRecord {
            format: MEMBERS_FORMAT,
            epoch: 1,
            fast: true,
            replicas,
            queue: Vec::new(),
            done: Vec::new(),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<MembersRecord, String> {
        let r: MembersRecord = serde_json::from_slice(bytes)
            .map_err(|e| format!("the membership record is malformed: {e}"))?;
        r.check()?;
        Ok(r)
    }

    /// Checks the format and the shape of the membership it describes.
    pub fn check(&self) -> Result<(), String> {
        if self.format != MEMBERS_FORMAT {
            return Err(format!(
                "membership record format {} is not supported (this build reads {MEMBERS_FORMAT})",
                self.format
            ));
        }
        self.members().validate()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record serialises")
    }

    /// The protocol's view of it.
    pub fn members(&self) -> Members {
        let ids = |role: Role| -> Vec<ReplicaId> {
            self.replicas
                .iter()
                .filter(|m| m.role == role)
                .map(|m| m.id)
                .collect()
        };
        Members {
            epoch: self.epoch,
            voters: ids(Role::Voter),
            learners: ids(Role::Learner),
            fast: self.fast,
        }
    }

    pub fn voters(&self) -> Vec<ReplicaId> {
        self.members().voters
    }

    pub fn role(&self, id: ReplicaId) -> Option<Role> {
        self.replicas.iter().find(|m| m.id == id).map(|m| m.role)
    }

    /// Every replica but `me`: (id, address).
    pub fn peers(&self, me: ReplicaId) -> Vec<(ReplicaId, SocketAddr)> {
        self.replicas
            .iter()
            .filter(|m| m.id != me)
            .map(|m| (m.id, m.addr))
            .collect()
    }

    /// The next epoch, with `edit` applied.
    pub fn next(&self, edit: impl FnOnce(&mut MembersRecord)) -> MembersRecord {
        let mut next = self.clone();
        next.epoch += 1;
        edit(&mut next);
        next.replicas.sort_by_key(|m| m.id);
        next
    }

    /// Ends the first queued change, at `now_ms` (ms since the Unix
    /// epoch).
    pub fn finish(&mut self, aborted: bool, now_ms: u64) {
        if self.queue.is_empty() {
            return;
        }
        let c = self.queue.remove(0);
        self.done.push(Done {
            action: c.action,
            id: c.id,
            requested_ms: c.requested_ms,
            epoch: self.epoch,
            finished_ms: now_ms,
            aborted,
        });
        let over = self.done.len().saturating_sub(DONE_KEPT);
        self.done.drain(..over);
    }
}

impl MembersRecord {
    /// Queues `change` (checked by [`check`]) at `now_ms`. Removing a
    /// replica whose join is under way abandons the join. Queuing does not
    /// change the epoch.
    pub fn enqueue(&mut self, change: MemberChange, now_ms: u64) -> Result<(), String> {
        check(self, &change)?;
        if change.action == Action::Remove {
            if let Some(i) = self
                .queue
                .iter()
                .position(|c| c.id == change.id && c.action == Action::Add)
            {
                let join = self.queue.remove(i);
                self.done.push(Done {
                    action: Action::Add,
                    id: join.id,
                    requested_ms: join.requested_ms,
                    epoch: self.epoch,
                    finished_ms: now_ms,
                    aborted: true,
                });
            }
        }
        self.queue.push(change);
        Ok(())
    }
}

/// Whether `change` may be queued on `record`: why not if it may not.
pub fn check(record: &MembersRecord, change: &MemberChange) -> Result<(), String> {
    match change.action {
        Action::Add => {
            if change.addr.is_none() {
                return Err("adding a replica needs its peer address".into());
            }
            if record.role(change.id).is_some() {
                return Err(format!("replica {} is already a member", change.id));
            }
            if record.replicas.len() >= 64 {
                return Err("a cluster has at most 64 replicas".into());
            }
        }
        Action::Remove => {
            let joining = record
                .queue
                .iter()
                .any(|c| c.id == change.id && c.action == Action::Add);
            match record.role(change.id) {
                None if !joining => return Err(format!("replica {} is not a member", change.id)),
                Some(Role::Voter) => {
                    let voters = record.voters().len();
                    let leaving = record
                        .queue
                        .iter()
                        .filter(|c| c.action == Action::Remove)
                        .count();
                    if voters <= leaving + 1 {
                        return Err(format!(
                            "removing replica {} would leave no voter",
                            change.id
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u32, role: Role) -> Member {
        Member {
            id,
            addr: ([127, 0, 0, 1], 7000 + id as u16).into(),
            http: None,
            role,
        }
    }

    #[test]
    fn the_record_round_trips_and_checks_its_format() {
        let r = MembersRecord::bootstrap(vec![member(2, Role::Voter), member(1, Role::Voter)]);
        assert_eq!(r.voters(), vec![1, 2]);
        assert_eq!(MembersRecord::decode(&r.encode()).unwrap(), r);
        let mut other = r.clone();
        other.format = 2;
        assert!(MembersRecord::decode(&other.encode())
            .unwrap_err()
            .contains("format 2"));
        assert!(MembersRecord::decode(b"{").is_err());
        let mut empty = r.clone();
        empty.replicas.clear();
        assert!(MembersRecord::decode(&empty.encode()).is_err());
    }

    #[test]
    fn changes_are_checked_before_they_queue() {
        let r = MembersRecord::bootstrap(vec![member(1, Role::Voter), member(2, Role::Voter)]);
        let change = |action, id, addr: Option<SocketAddr>| MemberChange {
            action,
            id,
            addr,
            http: None,
            requested_ms: 1,
        };
        let addr = Some(([127, 0, 0, 1], 9000).into());
        assert!(check(&r, &change(Action::Add, 3, addr)).is_ok());
        assert!(check(&r, &change(Action::Add, 3, None)).is_err());
        assert!(check(&r, &change(Action::Add, 2, addr)).is_err());
        assert!(check(&r, &change(Action::Remove, 3, None)).is_err());
        assert!(check(&r, &change(Action::Remove, 2, None)).is_ok());
        let mut one_leaving = r.clone();
        one_leaving.queue.push(change(Action::Remove, 2, None));
        let e = check(&one_leaving, &change(Action::Remove, 1, None)).unwrap_err();
        assert!(e.contains("no voter"), "{e}");
        let mut queued = r.clone();
        assert!(queued.enqueue(change(Action::Add, 2, addr), 1).is_err());
        assert!(queued.queue.is_empty());
    }

    #[test]
    fn the_next_epoch_keeps_replicas_in_order_and_finishing_moves_the_change() {
        let mut r = MembersRecord::bootstrap(vec![member(1, Role::Voter)]);
        r.queue.push(MemberChange {
            action: Action::Add,
            id: 3,
            addr: Some(([127, 0, 0, 1], 9000).into()),
            http: None,
            requested_ms: 5,
        });
        let next = r.next(|n| {
            n.replicas.insert(0, member(3, Role::Learner));
            n.finish(false, 77);
        });
        assert_eq!(next.epoch, 2);
        assert_eq!(
            next.replicas.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(next.members().learners, vec![3]);
        assert!(next.queue.is_empty());
        assert_eq!(
            (
                next.done[0].id,
                next.done[0].epoch,
                next.done[0].finished_ms
            ),
            (3, 2, 77)
        );
    }
}
