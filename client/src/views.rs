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
    /// `self`, `up` or `down`: the link from this replica to it.
    pub link: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// `voter` or `learner`, as this replica's membership says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}
