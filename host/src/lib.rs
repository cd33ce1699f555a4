//! The Ballot host: runs the consensus components in wasmtime and does all
//! the I/O they may not.
//!
//! This crate's library part is what the daemon, the CLI and the simulator
//! share. It does not decide anything about consensus: the protocol
//! component does (see `ballot-core` and `wit/ballot.wit`).

/// Declares an error type that is a message: `Display` prints it, and it
/// is a `std::error::Error`.
#[macro_export]
#[doc(hidden)]
macro_rules! message_error {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name(pub String);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::error::Error for $name {}
    };
}

pub mod api;
pub mod bench;
pub mod budget;
pub mod cli;
/// The raw HTTP client of the API, from `ballot-client`.
pub use ballot_client::http as client;
pub mod dev;
pub mod leases;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod registry;
/// The components' runtime in wasmtime, from `ballot-runtime`.
pub use ballot_runtime as runtime;
pub mod server;
pub mod storage;
pub mod system;
pub mod system_record;
pub mod tls;
pub mod transport;
pub mod wan;

/// What a caught panic said, when it said it as text.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}
