//! What the API answers about the cluster, shared by the daemon that
//! serializes it and the clients that read it.

use serde::{Deserialize, Serialize};

/// This replica's view of the cluster, as `GET /v1/cluster` returns it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterView {
    pub id: u32,
    pub incarnation: u64,
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `wasm` or `native`.
    pub core: String,
    pub protocol: ComponentView,
    pub policy: ComponentView,
    /// The membership epoch this replica's protocol votes in (1 before
    /// any membership change).
    #[serde(default)]
    pub epoch: u64,
    pub replicas: Vec<ReplicaView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ComponentView {
    pub name: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state_formats: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wire_formats: Vec<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaView {
    pub id: u32,
    pub peer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// The link from the answering replica to this one.
    pub link: Link,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// What the answering replica's membership says it is; `None` when it
    /// has no membership record yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

/// A link from one replica to another, in JSON `self`, `up` or `down`. A
/// state a newer daemon reports that this client does not know reads as
/// `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Link {
    /// The answering replica itself.
    #[serde(rename = "self")]
    Local,
    Up,
    Down,
    #[serde(other)]
    Other,
}

/// A replica's part in the membership, in JSON `voter` or `learner`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Voter,
    Learner,
    #[serde(other)]
    Other,
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::Local => "self",
            Link::Up => "up",
            Link::Down => "down",
            Link::Other => "other",
        })
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Voter => "voter",
            Role::Learner => "learner",
            Role::Other => "other",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The enums keep the JSON the daemon sent when they were strings.
    #[test]
    fn replica_views_keep_their_spelling() {
        let golden = r#"{"id":2,"peer":"127.0.0.1:7002","link":"self","role":"learner"}"#;
        let view: ReplicaView = serde_json::from_str(golden).unwrap();
        assert_eq!((view.link, view.role), (Link::Local, Some(Role::Learner)));
        assert_eq!(serde_json::to_string(&view).unwrap(), golden);
        let newer = r#"{"id":2,"peer":"p","link":"probing","role":"witness"}"#;
        let view: ReplicaView = serde_json::from_str(newer).unwrap();
        assert_eq!((view.link, view.role), (Link::Other, Some(Role::Other)));
    }
}
