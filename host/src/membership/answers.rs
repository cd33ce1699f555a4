//! Questions between replicas (status, sweep and catch-up orders, key
//! listings, changelog pages, the committed record) and how this replica
//! answers them: only for current members, and only for epochs it knows.

use std::sync::Arc;

use ballot_core::ReplicaId;
use serde::{Deserialize, Serialize};
use tracing::debug;

use super::record::MembersRecord;
use super::{durable_record, Membership, Status};

/// Format of the questions replicas ask each other about membership.
pub const SERVICE_FORMAT: u32 = 1;

/// A question from one replica to another.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Ask {
    pub(super) format: u32,
    #[serde(flatten)]
    pub(super) what: What,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "ask", rename_all = "kebab-case")]
pub(super) enum What {
    /// Your committed membership record.
    Members,
    /// Your [`Status`].
    Status,
    /// Keys you hold protocol state for, after `after`; with `prefix`,
    /// only those under it; with `epoch`, only if your protocol runs that
    /// epoch (a listing counts a quorum of one epoch, as a read does).
    Keys {
        after: Option<Vec<u8>>,
        limit: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix: Option<Vec<u8>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<u64>,
    },
    /// Read every key a classic quorum of voters holds (yours among
    /// them), then report `swept` = epoch.
    Sweep { epoch: u64 },
    /// Read every key a quorum of voters holds, then report `caught_up`.
    CatchUp { epoch: u64 },
    /// Your changelog entries after `after`: (seq, key, version).
    Changes { after: u64, limit: u32 },
    /// Your committed keys after `after`, with versions: the snapshot a
    /// replica behind your changelog's start replays.
    Versions { after: Option<Vec<u8>>, limit: u32 },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "kebab-case")]
pub(super) enum Answer {
    Members {
        record: Option<MembersRecord>,
    },
    Status(Status),
    Keys {
        keys: Vec<Vec<u8>>,
        last: bool,
        /// The prefix and epoch the answer was given for, echoed: an
        /// earlier build ignores them in the question, and its answer
        /// (every key, unfenced) must not pass for one that applied them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix: Option<Vec<u8>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<u64>,
    },
    Started,
    Changes {
        first: u64,
        last: u64,
        entries: Vec<(u64, Vec<u8>, u64)>,
    },
    Versions {
        /// The last changelog entry when this page was read.
        seq: u64,
        entries: Vec<(Vec<u8>, u64)>,
        last: bool,
    },
    Error {
        message: String,
    },
}

impl Membership {
    pub(super) async fn ask(&self, peer: ReplicaId, what: What) -> Result<Answer, String> {
        if peer == self.me {
            return Err("asked itself".into());
        }
        let ask = Ask {
            format: SERVICE_FORMAT,
            what,
        };
        let bytes = serde_json::to_vec(&ask).expect("serialises");
        let answer = self.transport.request(peer, &bytes).await?;
        match serde_json::from_slice(&answer) {
            Ok(Answer::Error { message }) => Err(format!("replica {peer}: {message}")),
            Ok(a) => Ok(a),
            Err(e) => Err(format!("replica {peer} answered malformed JSON: {e}")),
        }
    }

    /// Answers a peer's question.
    pub(super) async fn answer(self: &Arc<Self>, from: ReplicaId, request: &[u8]) -> Answer {
        let ask: Ask = match serde_json::from_slice(request) {
            Ok(a) => a,
            Err(e) => {
                return Answer::Error {
                    message: format!("malformed request: {e}"),
                }
            }
        };
        if ask.format != SERVICE_FORMAT {
            return Answer::Error {
                message: format!(
                    "request format {} is not supported (this build speaks {SERVICE_FORMAT})",
                    ask.format
                ),
            };
        }
        // Only members are answered, and only about epochs this replica
        // knows: a certificate from the cluster CA says who is asking, not
        // that it may ask (a replica removed, or one never added, could
        // otherwise start sweeps, list keys or, with an epoch from the
        // future, mark a sweep done that never ran). The committed record
        // is answered to anyone certified: it is no secret, and a replica
        // removed while it was down learns its removal only this way.
        if matches!(ask.what, What::Members) {
            return self.local_answer(from, ask.what);
        }
        let Some(record) = self.record().or_else(|| self.bootstrap.clone()) else {
            return Answer::Error {
                message: "this replica has no membership record yet".into(),
            };
        };
        if record.role(from).is_none() {
            return Answer::Error {
                message: format!("replica {from} is not a member at epoch {}", record.epoch),
            };
        }
        if let What::Sweep { epoch } | What::CatchUp { epoch } = &ask.what {
            if *epoch > record.epoch {
                return Answer::Error {
                    message: format!(
                        "epoch {epoch} is newer than this replica's membership (epoch {})",
                        record.epoch
                    ),
                };
            }
        }
        self.local_answer(from, ask.what)
    }

    pub(super) fn local_answer(self: &Arc<Self>, from: ReplicaId, what: What) -> Answer {
        match what {
            What::Members => Answer::Members {
                record: self.committed_record(),
            },
            What::Status => Answer::Status(self.status()),
            What::Keys {
                after,
                limit,
                prefix,
                epoch,
            } => {
                let limit = page_limit(limit);
                let running = self.transport.epoch();
                if epoch.is_some_and(|e| e != running) {
                    return Answer::Error {
                        message: format!(
                            "this replica runs epoch {running}, not {}",
                            epoch.unwrap_or_default()
                        ),
                    };
                }
                let keys = match &prefix {
                    Some(p) => self.storage.state_keys_in(p, after.as_deref(), limit),
                    None => self.storage.state_keys(after.as_deref(), limit),
                };
                match keys {
                    Ok(keys) => Answer::Keys {
                        last: keys.len() < limit,
                        keys,
                        prefix,
                        epoch,
                    },
                    Err(e) => Answer::Error {
                        message: e.to_string(),
                    },
                }
            }
            What::Sweep { epoch } => {
                debug!(from, epoch, "asked to sweep");
                self.start_task(epoch, false);
                Answer::Started
            }
            What::CatchUp { epoch } => {
                debug!(from, epoch, "asked to catch up");
                self.start_task(epoch, true);
                Answer::Started
            }
            What::Changes { after, limit } => {
                let limit = page_limit(limit);
                let page = self.storage.changes_page(after + 1, limit);
                match page {
                    Ok((first, last, changes)) => Answer::Changes {
                        first,
                        last,
                        entries: changes
                            .into_iter()
                            .map(|c| (c.seq, c.key, c.version))
                            .collect(),
                    },
                    Err(e) => Answer::Error {
                        message: e.to_string(),
                    },
                }
            }
            What::Versions { after, limit } => {
                let limit = page_limit(limit);
                let page = self.storage.changelog_bounds().and_then(|(_, seq)| {
                    Ok((seq, self.storage.versions(after.as_deref(), limit)?))
                });
                match page {
                    Ok((seq, entries)) => Answer::Versions {
                        seq,
                        last: entries.len() < limit,
                        entries,
                    },
                    Err(e) => Answer::Error {
                        message: e.to_string(),
                    },
                }
            }
        }
    }

    /// This replica's durable copy of the record (or epoch 1 if none).
    fn committed_record(&self) -> Option<MembersRecord> {
        match durable_record(&self.storage) {
            Ok(Some(r)) => Some(r),
            _ => self.bootstrap.clone(),
        }
    }
}

/// A page size a peer asked for, within bounds.
fn page_limit(asked: u32) -> usize {
    asked.clamp(1, 16 * 1024) as usize
}
