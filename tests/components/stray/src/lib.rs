//! A policy that reads the wall clock through a WASI import. Ballot offers
//! guests no clock, so `ballot component push` must refuse it.
#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({
    world: "stray",
    path: "wit",
    generate_all,
});

use exports::ballot::core::policy_api as api;

struct Stray;

impl api::Guest for Stray {
    fn describe() -> (String, String) {
        ("stray".into(), "0.1.0".into())
    }

    fn apply(
        _key: Vec<u8>,
        _current: api::Current,
        _command: Vec<u8>,
        _now_ms: u64,
    ) -> Result<api::Change, api::Rejection> {
        let now = wasi::clocks::wall_clock::now();
        Ok(api::Change::Set(now.seconds.to_string().into_bytes()))
    }
}

export!(Stray);
