//! The cluster's component configuration, `\0ballot/config`: which
//! components are stored, which key prefixes are bound to which policy,
//! which protocol runs, and the history of swaps.

use serde::{Deserialize, Serialize};

/// Format of the configuration record.
pub const CONFIG_FORMAT: u32 = 1;

/// Which world a component implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Policy,
    Protocol,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Policy => "policy",
            Kind::Protocol => "protocol",
        })
    }
}

/// A stored component, as the configuration record lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentRecord {
    /// SHA-256 of the bytes, lower-case hex.
    pub id: String,
    pub kind: Kind,
    pub name: String,
    pub version: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state_formats: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wire_formats: Vec<u32>,
    /// It exported a self-check, and it passed.
    #[serde(default)]
    pub self_checked: bool,
    /// When it was pushed (ms since the epoch, the receiving replica's clock).
    pub pushed_ms: u64,
}

/// A key prefix routed to a policy component.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub prefix: String,
    pub component: String,
    pub bound_ms: u64,
}

/// What an operator's swap does to the rollback stack. Persisted in a
/// pending activation as `"activate"` or `"rollback"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Swap {
    /// The current protocol becomes the rollback target.
    Activate,
    /// The current protocol is dropped; the previous one runs again.
    Rollback,
}

/// What one entry of the swap history records, spelled in the record as
/// `activate`, `rollback`, `auto-rollback` or `refused`. A spelling this
/// build does not know (written by a newer one) reads as `Other`, so the
/// record still parses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwapAction {
    Activate,
    Rollback,
    /// A replica fell back after repeated traps right after a swap.
    AutoRollback,
    /// A member could not run the component; nothing changed.
    Refused,
    #[serde(other)]
    Other,
}

impl From<Swap> for SwapAction {
    fn from(swap: Swap) -> SwapAction {
        match swap {
            Swap::Activate => SwapAction::Activate,
            Swap::Rollback => SwapAction::Rollback,
        }
    }
}

/// An activation every voter is checking.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingActivation {
    /// The protocol component to run; `None` is the embedded default.
    pub target: Option<String>,
    /// Names this attempt's readiness keys (ms since the epoch).
    pub nonce: u64,
    pub action: Swap,
}

/// Which protocol the cluster runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolConfig {
    /// The active protocol component; `None` is the embedded default.
    #[serde(default)]
    pub active: Option<String>,
    /// Earlier active protocols, most recent last: what rollback returns to.
    #[serde(default)]
    pub previous: Vec<Option<String>>,
    #[serde(default)]
    pub pending: Option<PendingActivation>,
}

/// One entry of the swap history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapRecord {
    pub at_ms: u64,
    pub action: SwapAction,
    pub from: Option<String>,
    pub to: Option<String>,
    /// The replica that recorded it.
    pub by: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Swap history entries kept.
pub const HISTORY_MAX: usize = 100;

/// The value of the system key `\0ballot/config`: JSON, with a format
/// number.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub format: u32,
    #[serde(default)]
    pub components: Vec<ComponentRecord>,
    #[serde(default)]
    pub bindings: Vec<Binding>,
    #[serde(default)]
    pub protocol: ProtocolConfig,
    #[serde(default)]
    pub history: Vec<SwapRecord>,
}

impl ClusterConfig {
    /// An empty configuration of the current format.
    pub fn new() -> ClusterConfig {
        ClusterConfig {
            format: CONFIG_FORMAT,
            ..ClusterConfig::default()
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<ClusterConfig, String> {
        let config: ClusterConfig = serde_json::from_slice(bytes)
            .map_err(|e| format!("the component configuration does not parse: {e}"))?;
        if config.format != CONFIG_FORMAT {
            return Err(format!(
                "the component configuration has format {}; this replica reads {CONFIG_FORMAT}",
                config.format
            ));
        }
        Ok(config)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("the configuration serialises")
    }

    /// Adds `entry` to the swap history, which keeps the last
    /// [`HISTORY_MAX`].
    pub fn record(&mut self, entry: SwapRecord) {
        self.history.push(entry);
        let excess = self.history.len().saturating_sub(HISTORY_MAX);
        self.history.drain(..excess);
    }

    /// The component with this id, or the only one whose id starts with it
    /// (at least 8 hex digits).
    pub fn find(&self, id: &str) -> Result<&ComponentRecord, String> {
        if let Some(c) = self.components.iter().find(|c| c.id == id) {
            return Ok(c);
        }
        if id.len() < 8 {
            return Err(format!(
                "no component {id}: give its id, or at least 8 of its first hex digits"
            ));
        }
        let mut matches = self.components.iter().filter(|c| c.id.starts_with(id));
        match (matches.next(), matches.next()) {
            (Some(c), None) => Ok(c),
            (Some(_), Some(_)) => Err(format!("{id} names more than one component")),
            (None, _) => Err(format!(
                "no component {id} in the cluster; push it with `ballot component push`"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_resolve_by_unique_prefix() {
        let record = |id: &str| ComponentRecord {
            id: id.into(),
            kind: Kind::Policy,
            name: "p".into(),
            version: "1".into(),
            size: 1,
            state_formats: vec![],
            wire_formats: vec![],
            self_checked: false,
            pushed_ms: 0,
        };
        let mut config = ClusterConfig::new();
        config.components = vec![record("abcdef0011"), record("abcdef0022")];
        assert_eq!(config.find("abcdef0022").unwrap().id, "abcdef0022");
        assert_eq!(config.find("abcdef002").unwrap().id, "abcdef0022");
        assert!(config
            .find("abcdef00")
            .unwrap_err()
            .contains("more than one"));
        assert!(config.find("abc").unwrap_err().contains("at least 8"));
        assert!(config.find("ffffffff").unwrap_err().contains("push it"));
    }

    #[test]
    fn the_config_record_round_trips_and_checks_its_format() {
        let config = ClusterConfig::new();
        assert_eq!(ClusterConfig::decode(&config.encode()).unwrap(), config);
        let future = br#"{"format":2}"#;
        assert!(ClusterConfig::decode(future)
            .unwrap_err()
            .contains("format 2"));
    }

    /// The swap actions are enums in memory and the same strings in the
    /// record as when they were strings: a record written before reads,
    /// and writes back byte for byte.
    #[test]
    fn swap_actions_keep_their_spelling_in_the_record() {
        let golden = concat!(
            r#"{"format":1,"components":[],"bindings":[],"#,
            r#""protocol":{"active":"c2","previous":[null],"#,
            r#""pending":{"target":null,"nonce":9,"action":"rollback"}},"#,
            r#""history":["#,
            r#"{"at_ms":1,"action":"activate","from":null,"to":"c1","by":1},"#,
            r#"{"at_ms":2,"action":"refused","from":"c1","to":"c2","by":2,"reason":"no"},"#,
            r#"{"at_ms":3,"action":"auto-rollback","from":"c1","to":null,"by":3,"reason":"traps"},"#,
            r#"{"at_ms":4,"action":"rollback","from":null,"to":"c2","by":1}]}"#
        );
        let config = ClusterConfig::decode(golden.as_bytes()).unwrap();
        let actions: Vec<SwapAction> = config.history.iter().map(|h| h.action).collect();
        assert_eq!(
            actions,
            [
                SwapAction::Activate,
                SwapAction::Refused,
                SwapAction::AutoRollback,
                SwapAction::Rollback
            ]
        );
        assert_eq!(
            config.protocol.pending.as_ref().unwrap().action,
            Swap::Rollback
        );
        assert_eq!(String::from_utf8(config.encode()).unwrap(), golden);
        // A spelling from a newer build still parses.
        let newer = golden.replace(r#""action":"refused""#, r#""action":"drained""#);
        let config = ClusterConfig::decode(newer.as_bytes()).unwrap();
        assert_eq!(config.history[1].action, SwapAction::Other);
    }
}
