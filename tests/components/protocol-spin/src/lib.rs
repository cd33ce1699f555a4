//! The default protocol, except that every `step` runs forever. It
//! describes itself and initialises like the real one, and misbehaves only
//! once it is running: what the time limit of a protocol call is for.
#![cfg(target_arch = "wasm32")]

const STATE_FORMAT: u8 = ballot_core::wire::STATE_FORMAT;
wit_bindgen::generate!({
    world: "protocol",
    path: "../../../wit",
});

const TRAP_ON_STEP: bool = false;
const SPIN_ON_STEP: bool = true;
const INVALID_KEY_ON_STEP: bool = false;

include!("../../../../guest/protocol/src/component.rs");
