//! The default protocol, except that every `step` traps. It describes
//! itself and initialises like the real one, so it passes `push` and the
//! activation checks, and fails only once it is running: what the host's
//! trap containment and automatic rollback are for.
#![cfg(target_arch = "wasm32")]

const STATE_FORMAT: u8 = ballot_core::wire::STATE_FORMAT;
wit_bindgen::generate!({
    world: "protocol",
    path: "../../../wit",
});

const TRAP_ON_STEP: bool = true;
const SPIN_ON_STEP: bool = false;
const INVALID_KEY_ON_STEP: bool = false;

include!("../../../../guest/protocol/src/component.rs");
