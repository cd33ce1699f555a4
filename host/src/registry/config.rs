//! The cluster's component configuration, `\0ballot/config`: which
//! components are stored, which key prefixes are bound to which policy,
//! which protocol runs, and the history of swaps. The record itself lives
//! in the pure crate `ballot-control`; here, what needs the host: component
//! ids and keys, and prefix checks.

use super::{RegistryError, SYSTEM_PREFIX};
pub use ballot_control::config::*;

/// Largest component accepted.
pub const COMPONENT_MAX: usize = 8 << 20;

/// A component's id: the SHA-256 of its bytes, lower-case hex.
pub fn component_id(bytes: &[u8]) -> String {
    ballot_guest_build::sha256_hex(bytes)
}

/// The key holding a component's bytes.
pub fn component_key(id: &str) -> Vec<u8> {
    let mut key = SYSTEM_PREFIX.to_vec();
    key.extend_from_slice(b"component/");
    key.extend_from_slice(id.as_bytes());
    key
}

/// Prefixes are 1 to 511 bytes and cannot reach into the cluster's keys.
pub(super) fn check_prefix(prefix: &str) -> Result<(), RegistryError> {
    if prefix.is_empty() || prefix.len() > crate::node::KEY_MAX {
        return Err(RegistryError::Invalid(format!(
            "a prefix is 1 to {} bytes",
            crate::node::KEY_MAX
        )));
    }
    if prefix.as_bytes()[0] == 0 {
        return Err(RegistryError::Invalid(
            "keys beginning with a NUL byte belong to the cluster".into(),
        ));
    }
    Ok(())
}
