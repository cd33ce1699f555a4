//! The default protocol, except that the first write of every step is put
//! under a 600-byte key, which LMDB cannot hold. It describes itself and
//! initialises like the real one, so it passes `push` and the activation
//! checks, and misbehaves only once it is running: what the host's checks
//! of protocol output are for.
#![cfg(target_arch = "wasm32")]

const STATE_FORMAT: u8 = ballot_core::wire::STATE_FORMAT;
wit_bindgen::generate!({
    world: "protocol",
    path: "../../../wit",
});

const TRAP_ON_STEP: bool = false;
const SPIN_ON_STEP: bool = false;
const INVALID_KEY_ON_STEP: bool = true;

include!("../../../../guest/protocol/src/component.rs");
