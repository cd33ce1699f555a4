//! The built-in **register** policy: create-if-absent, put, compare-and-swap
//! and delete on a versioned value.
//!
//! Commands are encoded as `[format = 1][tag][fields]`:
//!
//! | tag | command  | fields                          |
//! |-----|----------|---------------------------------|
//! | 1   | create   | value bytes (rest of the input) |
//! | 2   | put      | value bytes                     |
//! | 3   | cas      | expected version (u64 LE), value|
//! | 4   | delete   | none                            |
//! | 5   | delete-if| expected version (u64 LE)       |

use alloc::format;
use alloc::string::ToString;
use alloc::vec::Vec;

use crate::types::{Change, Current, Rejection};

/// Format byte leading every register command.
pub const COMMAND_FORMAT: u8 = 1;
/// The register policy's name, as `describe` reports it.
pub const NAME: &str = "register";
/// The register policy's semantic version.
pub const VERSION: &str = "0.1.0";

/// A decoded register command.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// Set the value if the key is absent; the same value again succeeds.
    Create(Vec<u8>),
    /// Overwrite the value.
    Put(Vec<u8>),
    /// Overwrite only if the current version is the expected one.
    Cas { expected: u64, value: Vec<u8> },
    /// Delete (a tombstone at the next version); deleting an absent key is a no-op.
    Delete,
    /// Delete only if the current version is the expected one.
    DeleteIf { expected: u64 },
}

impl Command {
    /// Encodes the command as the policy reads it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.push(COMMAND_FORMAT);
        match self {
            Command::Create(v) => {
                out.push(1);
                out.extend_from_slice(v);
            }
            Command::Put(v) => {
                out.push(2);
                out.extend_from_slice(v);
            }
            Command::Cas { expected, value } => {
                out.push(3);
                out.extend_from_slice(&expected.to_le_bytes());
                out.extend_from_slice(value);
            }
            Command::Delete => out.push(4),
            Command::DeleteIf { expected } => {
                out.push(5);
                out.extend_from_slice(&expected.to_le_bytes());
            }
        }
        out
    }

    /// Decodes a command, or says what is wrong with it.
    pub fn decode(bytes: &[u8]) -> Result<Command, Rejection> {
        let (format, rest) = bytes
            .split_first()
            .ok_or_else(|| invalid("empty command"))?;
        if *format != COMMAND_FORMAT {
            return Err(invalid(&format!("unknown command format {format}")));
        }
        let (tag, body) = rest
            .split_first()
            .ok_or_else(|| invalid("missing command tag"))?;
        let version = |body: &[u8]| -> Result<(u64, Vec<u8>), Rejection> {
            if body.len() < 8 {
                return Err(invalid("truncated version"));
            }
            let mut le = [0u8; 8];
            le.copy_from_slice(&body[..8]);
            Ok((u64::from_le_bytes(le), body[8..].to_vec()))
        };
        match tag {
            1 => Ok(Command::Create(body.to_vec())),
            2 => Ok(Command::Put(body.to_vec())),
            3 => {
                let (expected, value) = version(body)?;
                Ok(Command::Cas { expected, value })
            }
            4 if body.is_empty() => Ok(Command::Delete),
            5 => {
                let (expected, rest) = version(body)?;
                if !rest.is_empty() {
                    return Err(invalid("trailing bytes after delete-if"));
                }
                Ok(Command::DeleteIf { expected })
            }
            _ => Err(invalid(&format!("unknown command tag {tag}"))),
        }
    }
}

fn invalid(message: &str) -> Rejection {
    Rejection {
        code: "invalid-command".to_string(),
        message: message.to_string(),
    }
}

/// The register change function.
pub fn apply(current: &Current, command: &[u8]) -> Result<Change, Rejection> {
    let command = Command::decode(command)?;
    let mismatch = |expected: u64| Rejection {
        code: "version-mismatch".to_string(),
        message: format!(
            "expected version {expected}, current is {}",
            current.version
        ),
    };
    match command {
        Command::Create(value) => match &current.value {
            None => Ok(Change::Set(value)),
            Some(existing) if *existing == value => Ok(Change::Keep),
            Some(_) => Err(Rejection {
                code: "conflict".to_string(),
                message: format!(
                    "key exists at version {} with another value",
                    current.version
                ),
            }),
        },
        Command::Put(value) => Ok(Change::Set(value)),
        Command::Cas { expected, value } if expected == current.version => Ok(Change::Set(value)),
        Command::Cas { expected, .. } => Err(mismatch(expected)),
        Command::Delete if current.value.is_none() => Ok(Change::Keep),
        Command::Delete => Ok(Change::Remove),
        Command::DeleteIf { expected } if expected != current.version => Err(mismatch(expected)),
        Command::DeleteIf { .. } if current.value.is_none() => Ok(Change::Keep),
        Command::DeleteIf { .. } => Ok(Change::Remove),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn cur(value: Option<&[u8]>, version: u64) -> Current {
        Current {
            value: value.map(|v| v.to_vec()),
            version,
        }
    }

    #[test]
    fn commands_round_trip() {
        for c in [
            Command::Create(b"a".to_vec()),
            Command::Put(vec![]),
            Command::Cas {
                expected: 7,
                value: b"x".to_vec(),
            },
            Command::Delete,
            Command::DeleteIf { expected: u64::MAX },
        ] {
            assert_eq!(Command::decode(&c.encode()).unwrap(), c);
        }
    }

    #[test]
    fn golden_command_bytes() {
        assert_eq!(Command::Create(b"v".to_vec()).encode(), [1, 1, b'v']);
        assert_eq!(
            Command::Cas {
                expected: 2,
                value: b"v".to_vec()
            }
            .encode(),
            [1, 3, 2, 0, 0, 0, 0, 0, 0, 0, b'v']
        );
        assert_eq!(Command::Delete.encode(), [1, 4]);
    }

    #[test]
    fn malformed_commands_are_rejected() {
        for bad in [
            &[][..],
            &[2, 1],
            &[1],
            &[1, 9],
            &[1, 3, 1, 2],
            &[1, 4, 0],
            &[1, 5, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        ] {
            assert_eq!(
                apply(&cur(None, 0), bad).unwrap_err().code,
                "invalid-command",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn create_is_idempotent_and_conflicts_on_another_value() {
        let create = Command::Create(b"a".to_vec()).encode();
        assert_eq!(
            apply(&cur(None, 0), &create),
            Ok(Change::Set(b"a".to_vec()))
        );
        assert_eq!(
            apply(&cur(None, 4), &create),
            Ok(Change::Set(b"a".to_vec()))
        );
        assert_eq!(apply(&cur(Some(b"a"), 1), &create), Ok(Change::Keep));
        assert_eq!(
            apply(&cur(Some(b"b"), 1), &create).unwrap_err().code,
            "conflict"
        );
    }

    #[test]
    fn cas_and_delete_check_versions() {
        let cas = Command::Cas {
            expected: 3,
            value: b"n".to_vec(),
        }
        .encode();
        assert_eq!(
            apply(&cur(Some(b"o"), 3), &cas),
            Ok(Change::Set(b"n".to_vec()))
        );
        assert_eq!(
            apply(&cur(Some(b"o"), 2), &cas).unwrap_err().code,
            "version-mismatch"
        );
        assert_eq!(
            apply(&cur(Some(b"o"), 2), &Command::Delete.encode()),
            Ok(Change::Remove)
        );
        assert_eq!(
            apply(&cur(None, 2), &Command::Delete.encode()),
            Ok(Change::Keep)
        );
        let del_if = Command::DeleteIf { expected: 2 }.encode();
        assert_eq!(apply(&cur(Some(b"o"), 2), &del_if), Ok(Change::Remove));
        assert_eq!(
            apply(&cur(Some(b"o"), 1), &del_if).unwrap_err().code,
            "version-mismatch"
        );
    }
}
