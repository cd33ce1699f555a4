//! The Ballot host: runs the consensus components in wasmtime and does all
//! the I/O they may not.
//!
//! This crate's library part is what the daemon, the CLI and the simulator
//! share. It does not decide anything about consensus: the protocol
//! component does (see `ballot-core` and `wit/ballot.wit`).

pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod dev;
pub mod metrics;
pub mod node;
pub mod runtime;
pub mod server;
pub mod storage;
pub mod tls;
pub mod transport;
