//! The keys the cluster keeps for itself, and the wall clock the control
//! plane stamps its records with. Everything above imports these from here,
//! so no module needs another one's internals to name a system key.

use std::time::{SystemTime, UNIX_EPOCH};

pub use crate::runtime::SYSTEM_PREFIX;
/// The component configuration record (section 9 of the design).
pub const CONFIG_KEY: &[u8] = b"\0ballot/config";
/// The membership record (section 11 of the design).
pub const MEMBERS_KEY: &[u8] = b"\0ballot/members";

/// Whether `key` is one of the cluster's own.
pub fn is_system(key: &[u8]) -> bool {
    key.starts_with(SYSTEM_PREFIX)
}

/// Milliseconds since the Unix epoch, by this replica's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds on a monotonic clock (since this process first asked):
/// for waits and windows, which a step of the wall clock must not move.
pub fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_records_are_system_keys() {
        assert!(is_system(CONFIG_KEY) && is_system(MEMBERS_KEY));
        assert!(!is_system(b"ballot/config"));
    }
}
