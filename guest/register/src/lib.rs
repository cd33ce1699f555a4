//! The default policy component: the built-in **register** policy of
//! `ballot-core` behind the `ballot:core/policy-api` interface.
#![cfg(target_arch = "wasm32")]

use ballot_core::{register, Change, Current};

wit_bindgen::generate!({
    world: "policy",
    path: "../../wit",
});

use exports::ballot::core::policy_api as wit;

struct Component;

impl wit::Guest for Component {
    fn describe() -> (String, String) {
        (register::NAME.to_string(), register::VERSION.to_string())
    }

    fn apply(
        _key: Vec<u8>,
        current: wit::Current,
        command: Vec<u8>,
        _now_ms: u64,
    ) -> Result<wit::Change, wit::Rejection> {
        let current = Current {
            value: current.value,
            version: current.version,
        };
        match register::apply(&current, &command) {
            Ok(Change::Keep) => Ok(wit::Change::Keep),
            Ok(Change::Set(v)) => Ok(wit::Change::Set(v)),
            Ok(Change::Remove) => Ok(wit::Change::Remove),
            Err(r) => Err(wit::Rejection {
                code: r.code,
                message: r.message,
            }),
        }
    }
}

export!(Component);
