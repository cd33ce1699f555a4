//! Ballot's control plane as pure state machines: no I/O, no clock, no
//! threads. Time comes in as an argument, and what a decision needs from
//! the world (the membership record, what each replica reports) comes in
//! as values; what the world should do comes back as a value. The daemon
//! (`host/src/membership/`) and the simulator (`tests/sim`) drive the same
//! code, so the simulator checks the stages that ship.
//!
//! - [`members`]: the membership record, `\0ballot/members`, and which
//!   changes may queue on it.
//! - [`stages`]: from a record and the replicas' reports to the next step
//!   of the change at the head of its queue (design section 11), and the
//!   [`stages::Driver`] that adds the waits' nudges and deadline.
//! - [`config`]: the component configuration record, `\0ballot/config`.
//! - [`activation`]: how a protocol activation starts, is decided by the
//!   members' readiness answers and ends on that record, and when traps
//!   right after a swap roll a replica back.
//! - [`pipeline`]: the ready pipeline between `step` and `release`: host
//!   numbering, the early-action rule, the pending overlay.
//! - [`lease`]: a lease's record, when a replica expires it, and which
//!   attached keys its end deletes.
//! - [`record`]: the bounded read-edit-write (compare-and-swap) loop of a
//!   record kept in a system key.
//! - [`replay`]: which commits a replica learns from a page of a peer's
//!   changelog or snapshot, and how far it truncates its own.

pub mod activation;
pub mod config;
pub mod lease;
pub mod members;
pub mod pipeline;
pub mod record;
pub mod replay;
pub mod stages;
