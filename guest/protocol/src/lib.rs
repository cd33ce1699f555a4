//! The default protocol component: `ballot-core`'s replica behind the
//! `ballot:core/replica` interface of `wit/ballot.wit`: `ballot-paxos
//! 0.7.0`, writing key-state format 3 (and reading formats 1, 2 and 4, so it
//! takes over keys written by earlier versions and by `guest/protocol-next`
//! in a rollback).
//!
//! Only the wasm build has content; natively this crate is empty (the host's
//! native core uses `ballot-core` directly).
#![cfg(target_arch = "wasm32")]

/// The key-state format this build writes.
const STATE_FORMAT: u8 = ballot_core::wire::STATE_FORMAT;
wit_bindgen::generate!({
    world: "protocol",
    path: "../../wit",
});

const TRAP_ON_STEP: bool = false;
const SPIN_ON_STEP: bool = false;
const INVALID_KEY_ON_STEP: bool = false;

include!("component.rs");
