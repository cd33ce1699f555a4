//! Ballot's next protocol version, `ballot-paxos 0.8.0`: the same per-key
//! Paxos, writing key-state format 4, which carries a CRC-32C so a corrupt
//! record is refused instead of acted on. It reads formats 1 to 3, so it
//! takes over a replica's existing keys and rewrites each on its next write
//! (migration on read); the embedded 0.7.0 reads format 4, so rolling back
//! is safe too. The wire format is the same, so replicas on either version
//! interoperate while a swap is under way.
//!
//! Built to `host/components/protocol-next.wasm` by `cargo xtask guests`;
//! `ballot component push` + `ballot component activate` install it live.
#![cfg(target_arch = "wasm32")]

const STATE_FORMAT: u8 = ballot_core::wire::STATE_FORMAT_CHECKED;
wit_bindgen::generate!({
    world: "protocol",
    path: "../../wit",
});

const TRAP_ON_STEP: bool = false;
const SPIN_ON_STEP: bool = false;
const INVALID_KEY_ON_STEP: bool = false;

include!("../../protocol/src/component.rs");
