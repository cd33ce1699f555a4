//! The membership record, `\0ballot/members`: its replicas and roles,
//! the queue of changes and the ones done, and which changes may queue.

use std::net::SocketAddr;

use ballot_core::{Members, ReplicaId};
use serde::{Deserialize, Serialize};

use crate::system::now_ms;

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
pub struct Change {
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

/// The record under [`MEMBERS_KEY`] (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersRecord {
    pub format: u32,
    pub epoch: u64,
    /// Whether the fast round is on (off while voters change).
    pub fast: bool,
    pub replicas: Vec<Member>,
    /// Changes not finished; the first is in progress.
    #[serde(default)]
    pub queue: Vec<Change>,
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
    pub(super) fn check(&self) -> Result<(), String> {
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
    pub(super) fn next(&self, edit: impl FnOnce(&mut MembersRecord)) -> MembersRecord {
        let mut next = self.clone();
        next.epoch += 1;
        edit(&mut next);
        next.replicas.sort_by_key(|m| m.id);
        next
    }

    /// Ends the first queued change.
    pub(super) fn finish(&mut self, aborted: bool) {
        if self.queue.is_empty() {
            return;
        }
        let c = self.queue.remove(0);
        self.done.push(Done {
            action: c.action,
            id: c.id,
            requested_ms: c.requested_ms,
            epoch: self.epoch,
            finished_ms: now_ms(),
            aborted,
        });
        let over = self.done.len().saturating_sub(DONE_KEPT);
        self.done.drain(..over);
    }
}

/// Why a membership change was refused or has not finished.
#[derive(Debug)]
pub enum ChangeError {
    Invalid(String),
    Unavailable(String),
    /// The record changed while a stage waited: start from the top.
    Superseded,
}

impl From<crate::system_record::Unavailable> for ChangeError {
    fn from(e: crate::system_record::Unavailable) -> ChangeError {
        ChangeError::Unavailable(e.0)
    }
}

impl std::fmt::Display for ChangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChangeError::Invalid(m) | ChangeError::Unavailable(m) => f.write_str(m),
            ChangeError::Superseded => f.write_str("the membership record changed meanwhile"),
        }
    }
}

/// Whether `change` may be queued on `record`.
pub(super) fn check(record: &MembersRecord, change: &Change) -> Result<(), ChangeError> {
    let invalid = |m: String| Err(ChangeError::Invalid(m));
    match change.action {
        Action::Add => {
            if change.addr.is_none() {
                return invalid("adding a replica needs its peer address".into());
            }
            if record.role(change.id).is_some() {
                return invalid(format!("replica {} is already a member", change.id));
            }
            if record.replicas.len() >= 64 {
                return invalid("a cluster has at most 64 replicas".into());
            }
        }
        Action::Remove => {
            let joining = record
                .queue
                .iter()
                .any(|c| c.id == change.id && c.action == Action::Add);
            match record.role(change.id) {
                None if !joining => {
                    return invalid(format!("replica {} is not a member", change.id))
                }
                Some(Role::Voter) => {
                    let voters = record.voters().len();
                    let leaving = record
                        .queue
                        .iter()
                        .filter(|c| c.action == Action::Remove)
                        .count();
                    if voters <= leaving + 1 {
                        return invalid(format!(
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
