//! Ballot's consensus core: per-key Paxos with a safe fast round, and the
//! built-in register policy.
//!
//! This crate does no I/O. It never reads a clock, a socket, a file or a
//! random source: the host hands those in. The same code runs natively (unit
//! tests, the simulator, `--core native`) and inside the default protocol and
//! policy components (`--core wasm`).
//!
//! ```
//! use ballot_core::{register, Config, Core, Batch, KeyState, Request, Operation, Replica, RegisterEnv};
//!
//! // A one-replica cluster decides alone.
//! let mut replica = Replica::new(Config::new(1, 1, vec![1]), RegisterEnv).unwrap();
//! let put = register::Command::Put(b"hello".to_vec()).encode();
//! let ready = replica.step(Batch {
//!     now_ms: 0,
//!     seed: 7,
//!     states: vec![KeyState { key: b"k".to_vec(), state: vec![] }],
//!     requests: vec![Request { id: 1, key: b"k".to_vec(), op: Operation::Command(put) }],
//!     ..Batch::default()
//! });
//! // Persist `ready.persist`, then:
//! let actions = replica.release(ready.id);
//! assert_eq!(actions.complete.len(), 1);
//! ```
#![no_std]

extern crate alloc;

pub mod bytes;
pub mod register;
pub mod replica;
pub mod types;
pub mod wire;

pub use replica::{protocol_version, quorum_classic, quorum_fast, Core, Env, Level, Replica};
pub use types::*;

/// An [`Env`] that runs the built-in register policy for every key.
#[derive(Clone, Copy, Debug, Default)]
pub struct RegisterEnv;

impl Env for RegisterEnv {
    fn apply(
        &mut self,
        _key: &[u8],
        current: &Current,
        command: &[u8],
        _now_ms: u64,
    ) -> Result<Change, Rejection> {
        register::apply(current, command)
    }
}
