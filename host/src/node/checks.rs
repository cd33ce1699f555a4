//! What the host accepts from a protocol instance before any of it reaches
//! LMDB, the wire or a client.
//!
//! A protocol component is code an operator pushed: it decides what is
//! chosen, but it must not be able to stop the replica by handing the host
//! something it cannot store or send. Before, a write under a 600-byte key
//! failed the LMDB transaction and stopped every replica at once, and a key
//! over 65535 bytes was truncated on the wire. Output that fails these
//! checks is treated like a trap (`RuntimeError::Invalid`): that step or
//! release is dropped, the instance restarts, and repeated failures roll
//! the protocol back (design section 10).

use ballot_core::{Actions, Completion, Outcome, Ready};

use super::KEY_MAX;
use crate::transport::FRAME_MAX;

/// Largest value a protocol may commit or answer with. Clients write at
/// most 1 MiB, but the cluster's own records go through consensus too: a
/// stored component is up to 8 MiB, and the configuration record grows
/// with every component pushed. Half a frame, so a message can carry it.
pub const VALUE_LIMIT: usize = FRAME_MAX / 2;
/// Largest key state a protocol may ask to persist: a committed and an
/// accepted value and their bookkeeping.
pub const STATE_MAX: usize = 2 * VALUE_LIMIT + (64 << 10);
/// Largest payload of one peer message: what fits a frame.
pub const PAYLOAD_MAX: usize = FRAME_MAX - (64 << 10);
/// Longest rejection code, and longest rejection or failure message, a
/// client is given: longer ones are cut (see [`clamp_texts`]), never
/// refused, since a sound protocol passes on what policies and peers say.
pub const CODE_MAX: usize = 128;
pub const TEXT_MAX: usize = 4096;

fn key(what: &str, key: &[u8]) -> Result<(), String> {
    if key.is_empty() || key.len() > KEY_MAX {
        return Err(format!(
            "{what} under a {}-byte key (keys are 1 to {KEY_MAX} bytes)",
            key.len()
        ));
    }
    Ok(())
}

fn value(what: &str, value: Option<&Vec<u8>>) -> Result<(), String> {
    match value {
        Some(v) if v.len() > VALUE_LIMIT => Err(format!(
            "{what} with a {}-byte value (at most {VALUE_LIMIT})",
            v.len()
        )),
        _ => Ok(()),
    }
}

/// A step's ready: every write is to a key the step was given (`touched`,
/// sorted), at most once, within the size limits; its early actions pass
/// [`actions`].
pub fn ready(ready: &Ready, touched: &[Vec<u8>]) -> Result<(), String> {
    let mut written: Vec<&[u8]> = Vec::with_capacity(ready.persist.len());
    for w in &ready.persist {
        key("a write", &w.key)?;
        if touched.binary_search(&w.key).is_err() {
            return Err("a write to a key the step was not given".into());
        }
        if w.state.len() > STATE_MAX {
            return Err(format!(
                "a key state of {} bytes (at most {STATE_MAX})",
                w.state.len()
            ));
        }
        if let Some(c) = &w.commit {
            value("a commit", c.value.as_ref())?;
        }
        written.push(&w.key);
    }
    written.sort_unstable();
    if written.windows(2).any(|w| w[0] == w[1]) {
        return Err("two writes to one key in one ready".into());
    }
    actions(&ready.early)
}

/// Messages, timers and client answers.
pub fn actions(actions: &Actions) -> Result<(), String> {
    for o in &actions.send {
        key("a message", &o.key)?;
        if o.payload.len() > PAYLOAD_MAX {
            return Err(format!(
                "a message of {} bytes (at most {PAYLOAD_MAX})",
                o.payload.len()
            ));
        }
    }
    for t in &actions.timers {
        key("a timer", &t.key)?;
    }
    actions.complete.iter().try_for_each(completion)
}

fn completion(c: &Completion) -> Result<(), String> {
    match &c.outcome {
        Outcome::Done(current) => value("an answer", current.value.as_ref()),
        Outcome::Rejected(_, current) => value("a rejection", current.value.as_ref()),
        Outcome::Failed(_) => Ok(()),
    }
}

/// Cuts a completion's rejection code and messages to what a client is
/// given ([`CODE_MAX`], [`TEXT_MAX`] bytes, at a character boundary).
pub fn clamp_texts(c: &mut Completion) {
    fn cut(s: &mut String, max: usize) {
        if s.len() > max {
            let mut end = max;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
    }
    match &mut c.outcome {
        Outcome::Rejected(r, _) => {
            cut(&mut r.code, CODE_MAX);
            cut(&mut r.message, TEXT_MAX);
        }
        Outcome::Failed(f) => cut(&mut f.message, TEXT_MAX),
        Outcome::Done(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballot_core::{Commit, Current, Outbound, Rejection, Timer, Trace, Write};

    fn write(key: &[u8]) -> Write {
        Write {
            key: key.to_vec(),
            state: vec![1; 16],
            commit: Some(Commit {
                version: 1,
                value: Some(b"v".to_vec()),
            }),
        }
    }

    fn ready_of(persist: Vec<Write>, early: Actions) -> Ready {
        Ready {
            id: 1,
            persist,
            early,
        }
    }

    #[test]
    fn what_a_sound_protocol_returns_passes() {
        let touched = vec![b"a".to_vec(), b"b".to_vec()];
        let early = Actions {
            send: vec![Outbound {
                to: 2,
                key: b"a".to_vec(),
                payload: vec![0; 100],
            }],
            complete: vec![Completion {
                id: 7,
                outcome: Outcome::Rejected(
                    Rejection {
                        code: "exists".into(),
                        message: "the key exists".into(),
                    },
                    Current {
                        value: Some(vec![0; 8 << 20]),
                        version: 3,
                    },
                ),
                trace: Trace::default(),
            }],
            timers: vec![Timer {
                key: b"b".to_vec(),
                token: 1,
                at_ms: 10,
            }],
        };
        ready(&ready_of(vec![write(b"a"), write(b"b")], early), &touched).unwrap();
    }

    #[test]
    fn keys_the_host_cannot_store_or_send_are_refused() {
        let long = vec![b'k'; KEY_MAX + 1];
        let touched = vec![Vec::new(), long.clone()];
        for bad in [&b""[..], &long[..]] {
            let e = ready(&ready_of(vec![write(bad)], Actions::default()), &touched).unwrap_err();
            assert!(e.contains("-byte key"), "{e}");
            let send = Actions {
                send: vec![Outbound {
                    to: 1,
                    key: bad.to_vec(),
                    payload: Vec::new(),
                }],
                ..Actions::default()
            };
            assert!(actions(&send).is_err());
            let timer = Actions {
                timers: vec![Timer {
                    key: bad.to_vec(),
                    token: 1,
                    at_ms: 1,
                }],
                ..Actions::default()
            };
            assert!(actions(&timer).is_err());
        }
    }

    #[test]
    fn a_write_outside_the_step_or_twice_is_refused() {
        let touched = vec![b"a".to_vec()];
        let e = ready(&ready_of(vec![write(b"z")], Actions::default()), &touched).unwrap_err();
        assert!(e.contains("not given"), "{e}");
        let e = ready(
            &ready_of(vec![write(b"a"), write(b"a")], Actions::default()),
            &touched,
        )
        .unwrap_err();
        assert!(e.contains("two writes"), "{e}");
    }

    #[test]
    fn sizes_over_their_limits_are_refused() {
        let touched = vec![b"a".to_vec()];
        let mut big = write(b"a");
        big.state = vec![0; STATE_MAX + 1];
        assert!(ready(&ready_of(vec![big], Actions::default()), &touched).is_err());
        let mut big = write(b"a");
        big.commit = Some(Commit {
            version: 2,
            value: Some(vec![0; VALUE_LIMIT + 1]),
        });
        assert!(ready(&ready_of(vec![big], Actions::default()), &touched).is_err());
        let send = Actions {
            send: vec![Outbound {
                to: 1,
                key: b"a".to_vec(),
                payload: vec![0; PAYLOAD_MAX + 1],
            }],
            ..Actions::default()
        };
        assert!(actions(&send).is_err());
        let answer = |outcome| Actions {
            complete: vec![Completion {
                id: 1,
                outcome,
                trace: Trace::default(),
            }],
            ..Actions::default()
        };
        let done = Outcome::Done(Current {
            value: Some(vec![0; VALUE_LIMIT + 1]),
            version: 1,
        });
        assert!(actions(&answer(done)).is_err());
    }

    /// Overlong texts are cut, not refused: a sound protocol passes on
    /// what a policy or an older peer said.
    #[test]
    fn overlong_texts_are_cut_at_a_character_boundary() {
        let mut c = Completion {
            id: 1,
            outcome: Outcome::Rejected(
                Rejection {
                    code: "c".repeat(CODE_MAX + 10),
                    message: "é".repeat(TEXT_MAX),
                },
                Current::default(),
            ),
            trace: Trace::default(),
        };
        assert!(actions(&Actions {
            complete: vec![c.clone()],
            ..Actions::default()
        })
        .is_ok());
        clamp_texts(&mut c);
        let Outcome::Rejected(r, _) = &c.outcome else {
            unreachable!()
        };
        assert_eq!(r.code.len(), CODE_MAX);
        assert!(r.message.len() <= TEXT_MAX && r.message.len() >= TEXT_MAX - 1);
        assert!(r.message.chars().all(|ch| ch == 'é'));
    }
}
