//! The read-edit-write of a record kept in one system key (the component
//! configuration, the membership), as a state machine: read the record
//! linearizably, let the caller edit it, write it back only if nobody wrote
//! since (a create if it was absent, a compare-and-swap at the version read
//! otherwise), and start again from the read when someone did, a bounded
//! number of times. The daemon (`host/src/system_record.rs`) and the
//! simulator carry out its reads and writes through consensus; both drive
//! this same loop, so the simulator's racing writers race the shipped one.
//!
//! Call order: [`Update::poll`]; on [`Want::Read`] read and call
//! [`Update::handle_read`]; on [`Want::Write`] write and call
//! [`Update::handle_written`]; until [`Want::Done`] or [`Want::GaveUp`].

use ballot_core::register::Command;

/// Reads of one update before it gives up because other writers keep
/// winning.
pub const ATTEMPTS: usize = 16;

/// What the update needs next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Want {
    /// Read the record linearizably.
    Read,
    /// Carry out `command` on the record's key: it writes only if the
    /// record is still as read.
    Write { command: Command },
    /// The record is at `version`, with the edit in it (or left as read,
    /// when the edit changed nothing).
    Done { version: u64 },
    /// Others wrote between every read and write.
    GaveUp,
}

/// The write of a record read at `expected` (`None`: absent): a create,
/// or a compare-and-swap at that version; it takes effect only if nobody
/// wrote since.
pub fn conditional_write(expected: Option<u64>, value: Vec<u8>) -> Command {
    match expected {
        None => Command::Create(value),
        Some(expected) => Command::Cas { expected, value },
    }
}

/// One read-edit-write of a system record.
#[derive(Clone, Debug)]
pub struct Update {
    reads: usize,
    want: Want,
}

impl Default for Update {
    fn default() -> Update {
        Update::new()
    }
}

impl Update {
    pub fn new() -> Update {
        Update {
            reads: 0,
            want: Want::Read,
        }
    }

    pub fn poll(&self) -> &Want {
        &self.want
    }

    /// The record as read: at `version` (0 if never written), `present`
    /// unless absent; `next` is what the caller's edit made of it, `None`
    /// when the edit leaves it as it is.
    pub fn handle_read(&mut self, version: u64, present: bool, next: Option<Vec<u8>>) {
        assert_eq!(self.want, Want::Read, "a read answers a read");
        self.reads += 1;
        self.want = match next {
            None => Want::Done { version },
            Some(value) => Want::Write {
                command: conditional_write(present.then_some(version), value),
            },
        };
    }

    /// The write's answer: the version written, or `None` if someone wrote
    /// since the read (the command was rejected).
    pub fn handle_written(&mut self, written: Option<u64>) {
        assert!(
            matches!(self.want, Want::Write { .. }),
            "a write answers a write"
        );
        self.want = match written {
            Some(version) => Want::Done { version },
            None if self.reads >= ATTEMPTS => Want::GaveUp,
            None => Want::Read,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absent_record_is_created_and_a_present_one_swapped_at_its_version() {
        let mut u = Update::new();
        assert_eq!(u.poll(), &Want::Read);
        u.handle_read(0, false, Some(b"a".to_vec()));
        assert_eq!(
            u.poll(),
            &Want::Write {
                command: Command::Create(b"a".to_vec())
            }
        );
        u.handle_written(Some(1));
        assert_eq!(u.poll(), &Want::Done { version: 1 });

        let mut u = Update::new();
        u.handle_read(7, true, Some(b"b".to_vec()));
        assert_eq!(
            u.poll(),
            &Want::Write {
                command: Command::Cas {
                    expected: 7,
                    value: b"b".to_vec()
                }
            }
        );
    }

    #[test]
    fn an_edit_that_changes_nothing_writes_nothing() {
        let mut u = Update::new();
        u.handle_read(4, true, None);
        assert_eq!(u.poll(), &Want::Done { version: 4 });
    }

    #[test]
    fn a_lost_race_reads_again_and_too_many_give_up() {
        let mut u = Update::new();
        for attempt in 1..=ATTEMPTS {
            assert_eq!(u.poll(), &Want::Read, "attempt {attempt}");
            u.handle_read(attempt as u64, true, Some(vec![1]));
            u.handle_written(None);
        }
        assert_eq!(u.poll(), &Want::GaveUp);
    }

    #[test]
    #[should_panic(expected = "a write answers a write")]
    fn answers_out_of_order_are_a_bug() {
        Update::new().handle_written(Some(1));
    }
}
