//! The Ballot policy SDK.
//!
//! A policy is a change function in the CASPaxos sense: given a key's
//! current value and a command, it returns the key's next value or a
//! rejection. Ballot runs it inside consensus, on the replica that proposes
//! the change, so it must be a pure function of its inputs: no clock (the
//! host hands in `now_ms`), no randomness, no I/O.
//!
//! ```
//! use ballot_policy::{Change, Context, Current, Policy, Rejection};
//!
//! /// Keeps the largest number ever written.
//! pub struct Max;
//!
//! impl Policy for Max {
//!     const NAME: &'static str = "max";
//!     const VERSION: &'static str = "0.1.0";
//!
//!     fn apply(_: &Context, current: &Current, command: &[u8]) -> Result<Change, Rejection> {
//!         let parse = |b: &[u8]| std::str::from_utf8(b).ok()?.trim().parse::<i64>().ok();
//!         let new = parse(command).ok_or_else(|| Rejection::invalid("expected an integer"))?;
//!         match current.value.as_deref().and_then(parse) {
//!             Some(old) if old >= new => Ok(Change::Keep),
//!             _ => Ok(Change::Set(new.to_string().into_bytes())),
//!         }
//!     }
//! }
//! ballot_policy::export_policy!(Max);
//!
//! // Natively, with `cargo test`:
//! let mut key = ballot_policy::testing::Key::<Max>::new("high-score");
//! key.apply("7").unwrap();
//! key.apply("3").unwrap();
//! assert_eq!(key.text(), Some("7"));
//! assert_eq!(key.version(), 1);
//! ```
//!
//! `ballot policy build` turns the crate into a component (it needs
//! `crate-type = ["cdylib", "rlib"]`), `ballot component push` stores it in
//! the cluster and `ballot policy bind PREFIX ID` routes a key prefix to it.

extern crate self as ballot_policy;

/// A key's committed value as the policy sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Current {
    /// `None` for a key never written or deleted.
    pub value: Option<Vec<u8>>,
    /// 0 for a key never written; grows by one with every change.
    pub version: u64,
}

/// What a command does to the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Leave the value as it is: the command succeeds without a new version.
    Keep,
    /// Store this value as the next version.
    Set(Vec<u8>),
    /// Delete the value (a tombstone at the next version).
    Remove,
}

/// Why a command was refused. The client sees `409 Conflict` with this
/// code and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// A short machine-readable word, like `conflict` or `invalid-command`.
    pub code: String,
    /// For people.
    pub message: String,
}

impl Rejection {
    /// A rejection with the given code.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Rejection {
        Rejection {
            code: code.into(),
            message: message.into(),
        }
    }

    /// `invalid-command`: the command cannot be understood.
    pub fn invalid(message: impl Into<String>) -> Rejection {
        Rejection::new("invalid-command", message)
    }

    /// `conflict`: the command is understood but the value forbids it.
    pub fn conflict(message: impl Into<String>) -> Rejection {
        Rejection::new("conflict", message)
    }
}

/// What the host says about the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Context<'a> {
    /// The key the command is for.
    pub key: &'a [u8],
    /// The proposing replica's clock (ms since the Unix epoch). Replicas'
    /// clocks differ, and the same command may be evaluated again later on
    /// a retry, so treat it as "about now", never as an id.
    pub now_ms: u64,
}

/// A conflict-resolution policy.
pub trait Policy {
    /// Shown by `ballot component list` and `ballot policy list`.
    const NAME: &'static str;
    /// Semantic version of the policy.
    const VERSION: &'static str;

    /// Applies `command` to `current`. Must be a pure function of its
    /// arguments: any replica may evaluate it, and more than once.
    fn apply(ctx: &Context, current: &Current, command: &[u8]) -> Result<Change, Rejection>;

    /// Run by `ballot component push` inside the sandbox before the
    /// component is stored: return an error to have it refused.
    fn self_check() -> Result<(), String> {
        Ok(())
    }
}

/// Exports a [`Policy`] as the component's `policy-api` and `self-check`.
/// Expands to nothing outside wasm, so the crate also builds natively.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::bindings::exports::ballot::core::{policy_api as api, self_check};

            struct Exported;

            impl api::Guest for Exported {
                fn describe() -> (::std::string::String, ::std::string::String) {
                    $crate::__private::describe::<$policy>()
                }

                fn apply(
                    key: ::std::vec::Vec<u8>,
                    current: api::Current,
                    command: ::std::vec::Vec<u8>,
                    now_ms: u64,
                ) -> ::std::result::Result<api::Change, api::Rejection> {
                    $crate::__private::apply::<$policy>(key, current, command, now_ms)
                }
            }

            impl self_check::Guest for Exported {
                fn run() -> ::std::result::Result<(), ::std::string::String> {
                    <$policy as $crate::Policy>::self_check()
                }
            }

    $crate::bindings::__export_checked_policy!(Exported with_types_in $crate::bindings);
        };
    };
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "checked-policy",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "__export_checked_policy",
        default_bindings_module: "ballot_policy::bindings",
        runtime_path: "ballot_policy::__private::rt",
    });
}

#[doc(hidden)]
pub mod __private {
    #[cfg(target_arch = "wasm32")]
    pub use wit_bindgen::rt;

    #[cfg(target_arch = "wasm32")]
    use crate::bindings::exports::ballot::core::policy_api as api;
    #[cfg(target_arch = "wasm32")]
    use crate::{Change, Context, Current, Policy};

    #[cfg(target_arch = "wasm32")]
    pub fn describe<P: Policy>() -> (String, String) {
        (P::NAME.to_string(), P::VERSION.to_string())
    }

    #[cfg(target_arch = "wasm32")]
    pub fn apply<P: Policy>(
        key: Vec<u8>,
        current: api::Current,
        command: Vec<u8>,
        now_ms: u64,
    ) -> Result<api::Change, api::Rejection> {
        let ctx = Context { key: &key, now_ms };
        let current = Current {
            value: current.value,
            version: current.version,
        };
        match P::apply(&ctx, &current, &command) {
            Ok(Change::Keep) => Ok(api::Change::Keep),
            Ok(Change::Set(v)) => Ok(api::Change::Set(v)),
            Ok(Change::Remove) => Ok(api::Change::Remove),
            Err(r) => Err(api::Rejection {
                code: r.code,
                message: r.message,
            }),
        }
    }
}

pub mod testing {
    //! Runs a policy natively, one key at a time, the way the cluster
    //! applies committed changes.

    use std::marker::PhantomData;

    use crate::{Change, Context, Current, Policy, Rejection};

    /// One key under a policy: apply commands, look at the value.
    pub struct Key<P> {
        key: Vec<u8>,
        current: Current,
        /// The clock handed to the next command.
        pub now_ms: u64,
        policy: PhantomData<P>,
    }

    impl<P: Policy> Key<P> {
        /// A key never written, at time 0.
        pub fn new(key: impl AsRef<[u8]>) -> Key<P> {
            Key {
                key: key.as_ref().to_vec(),
                current: Current::default(),
                now_ms: 0,
                policy: PhantomData,
            }
        }

        /// Applies a command; a `Set` or `Remove` becomes the next version.
        pub fn apply(&mut self, command: impl AsRef<[u8]>) -> Result<Change, Rejection> {
            let ctx = Context {
                key: &self.key,
                now_ms: self.now_ms,
            };
            let change = P::apply(&ctx, &self.current, command.as_ref())?;
            match &change {
                Change::Keep => {}
                Change::Set(v) => {
                    self.current = Current {
                        value: Some(v.clone()),
                        version: self.current.version + 1,
                    }
                }
                Change::Remove => {
                    self.current = Current {
                        value: None,
                        version: self.current.version + 1,
                    }
                }
            }
            Ok(change)
        }

        /// The current value and version.
        pub fn current(&self) -> &Current {
            &self.current
        }

        /// The current value's bytes.
        pub fn value(&self) -> Option<&[u8]> {
            self.current.value.as_deref()
        }

        /// The current value as UTF-8 text, if it is.
        pub fn text(&self) -> Option<&str> {
            self.value().and_then(|v| std::str::from_utf8(v).ok())
        }

        /// The current version.
        pub fn version(&self) -> u64 {
            self.current.version
        }
    }
}
