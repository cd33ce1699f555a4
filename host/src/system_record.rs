//! A record kept in one system key and changed only by compare-and-swap
//! through consensus: the cluster's component configuration
//! (`\0ballot/config`) and the membership (`\0ballot/members`). A
//! linearizable read, a write that takes effect only if nobody wrote
//! since, and the bounded read-edit-write loop around the two.

use std::time::Duration;

use ballot_control::record::{conditional_write, Update, Want};
use ballot_core::register::Command;
use ballot_core::{Consistency, Operation, Outcome};
use tokio::sync::mpsc;

use crate::node::{self, ClientRequest};

pub use ballot_control::record::ATTEMPTS;

crate::message_error!(
    /// The cluster could not read or write the record now (no quorum, a
    /// timeout, the replica stopping), or others kept writing it.
    Unavailable
);

/// One system key, read and written through this replica's core.
pub struct SystemRecord<'a> {
    pub requests: &'a mpsc::Sender<ClientRequest>,
    pub key: &'a [u8],
    /// What the record is, for messages ("the configuration").
    pub what: &'a str,
    /// Longest one read or write waits for the core.
    pub timeout: Duration,
}

/// What a failed read or write says, for the caller's error type.
pub fn failure(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Failed(f) => f.message.clone(),
        Outcome::Rejected(r, _) => format!("{}: {}", r.code, r.message),
        Outcome::Done(_) => "unexpected success".into(),
    }
}

impl SystemRecord<'_> {
    /// The record's version and bytes, read linearizably (version 0 and no
    /// bytes: never written).
    pub async fn read(&self) -> Result<(u64, Option<Vec<u8>>), Unavailable> {
        let op = Operation::Read(Consistency::Linearizable);
        let c = node::call(self.requests, self.key.to_vec(), op, self.timeout)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        match c.outcome {
            Outcome::Done(current) => Ok((current.version, current.value)),
            other => Err(Unavailable(failure(&other))),
        }
    }

    /// Writes `value` if the record is still as read: at `version`, or
    /// absent when `version` is `None`. `Ok(None)` if someone wrote first,
    /// else the version written.
    pub async fn write(
        &self,
        version: Option<u64>,
        value: Vec<u8>,
    ) -> Result<Option<u64>, Unavailable> {
        self.carry_out(&conditional_write(version, value)).await
    }

    /// Carries out a conditional write: `Ok(None)` if someone wrote first
    /// (the command was rejected), else the version written.
    async fn carry_out(&self, command: &Command) -> Result<Option<u64>, Unavailable> {
        let op = Operation::Command(command.encode());
        let c = node::call(self.requests, self.key.to_vec(), op, self.timeout)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        match c.outcome {
            Outcome::Done(now) => Ok(Some(now.version)),
            Outcome::Rejected(..) => Ok(None),
            other => Err(Unavailable(failure(&other))),
        }
    }

    /// Reads the record, lets `edit` change it and writes it back; reads and
    /// edits again if someone wrote meanwhile, up to [`ATTEMPTS`] times
    /// (the loop is `ballot_control::record::Update`, which the simulator
    /// drives too). `edit` gets the bytes (`None`: absent) and returns the
    /// new bytes, or `None` to leave the record as it is. Returns the
    /// version the record is at afterwards, and what `edit` returned last.
    pub async fn update<T, E: From<Unavailable>>(
        &self,
        mut edit: impl FnMut(Option<&[u8]>) -> Result<(Option<Vec<u8>>, T), E>,
    ) -> Result<(u64, T), E> {
        let mut update = Update::new();
        let mut out = None;
        loop {
            match update.poll() {
                Want::Read => {
                    let (version, bytes) = self.read().await?;
                    let (next, edited) = edit(bytes.as_deref())?;
                    out = Some(edited);
                    update.handle_read(version, bytes.is_some(), next);
                }
                Want::Write { command } => {
                    let written = self.carry_out(command).await?;
                    update.handle_written(written);
                }
                Want::Done { version } => {
                    return Ok((*version, out.expect("an update reads before it is done")))
                }
                Want::GaveUp => {
                    return Err(E::from(Unavailable(format!(
                        "{} kept changing under this update; try again",
                        self.what
                    ))))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballot_core::{Completion, Current, Rejection, Trace};

    /// A core that holds one register and applies reads, creates and
    /// compare-and-swaps to it; before each of the first `races` writes it
    /// lets another writer append "+" to the value.
    fn fake_core(races: usize) -> mpsc::Sender<ClientRequest> {
        let (tx, mut rx) = mpsc::channel::<ClientRequest>(8);
        tokio::spawn(async move {
            let mut state = Current {
                value: None,
                version: 0,
            };
            let mut races = races;
            while let Some(r) = rx.recv().await {
                let outcome = match r.op {
                    Operation::Read(_) => Outcome::Done(state.clone()),
                    Operation::Command(bytes) => {
                        if races > 0 {
                            races -= 1;
                            let mut v = state.value.clone().unwrap_or_default();
                            v.push(b'+');
                            state = Current {
                                value: Some(v),
                                version: state.version + 1,
                            };
                        }
                        let ok = match Command::decode(&bytes).unwrap() {
                            Command::Create(v) if state.value.is_none() => Some(v),
                            Command::Cas { expected, value } if expected == state.version => {
                                Some(value)
                            }
                            _ => None,
                        };
                        match ok {
                            Some(v) => {
                                state = Current {
                                    value: Some(v),
                                    version: state.version + 1,
                                };
                                Outcome::Done(state.clone())
                            }
                            None => Outcome::Rejected(
                                Rejection {
                                    code: "version-mismatch".into(),
                                    message: "changed".into(),
                                },
                                state.clone(),
                            ),
                        }
                    }
                };
                let _ = r.reply.send(Completion {
                    id: 0,
                    outcome,
                    trace: Trace::default(),
                });
            }
        });
        tx
    }

    fn record(requests: &mpsc::Sender<ClientRequest>) -> SystemRecord<'_> {
        SystemRecord {
            requests,
            key: b"\0ballot/test",
            what: "the test record",
            timeout: Duration::from_secs(5),
        }
    }

    /// Appends "x" to the record.
    fn append(bytes: Option<&[u8]>) -> Result<(Option<Vec<u8>>, usize), Unavailable> {
        let mut v = bytes.unwrap_or_default().to_vec();
        v.push(b'x');
        Ok((Some(v), 1))
    }

    #[tokio::test]
    async fn an_update_edits_again_what_another_writer_changed_first() {
        let core = fake_core(2);
        let (version, _) = record(&core).update(append).await.unwrap();
        // Two racing writes won first; the edit applied on top of both.
        assert_eq!(version, 3);
        let (v, bytes) = record(&core).read().await.unwrap();
        assert_eq!((v, bytes.as_deref()), (3, Some(&b"++x"[..])));
    }

    #[tokio::test]
    async fn an_edit_that_changes_nothing_writes_nothing() {
        let core = fake_core(0);
        let (version, out) = record(&core)
            .update(|_| Ok::<_, Unavailable>((None, "kept")))
            .await
            .unwrap();
        assert_eq!((version, out), (0, "kept"));
        assert_eq!(record(&core).read().await.unwrap(), (0, None));
    }

    #[tokio::test]
    async fn an_update_gives_up_when_others_always_win() {
        let core = fake_core(usize::MAX);
        let e = record(&core).update(append).await.unwrap_err();
        assert_eq!(
            e.0,
            "the test record kept changing under this update; try again"
        );
    }
}
