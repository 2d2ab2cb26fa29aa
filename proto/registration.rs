//! How an agent announces itself in etcd (v2 API) and how the coordinator finds it.
//!
//! Invariants: the record holds no secret; it is refreshed well inside its TTL, so a live agent is
//! always listed and a dead one disappears within `TTL_SECS`.

use serde::{Deserialize, Serialize};

/// etcd directory under which every agent registers, one key per host.
pub const AGENTS_DIR: &str = "/deis/backup/agents";

/// Lifetime of a registration; the agent refreshes it every `REFRESH_SECS`.
pub const TTL_SECS: u64 = 30;
/// How often a running agent refreshes its registration.
pub const REFRESH_SECS: u64 = 10;

/// The value stored at `AGENTS_DIR/<host id>`, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// `host:port` the agent serves gRPC on.
    pub address: String,
    /// Agent version.
    pub version: String,
    /// Host name, for people.
    pub host: String,
}

/// The etcd key of the agent with this host id.
pub fn key(host_id: &str) -> String {
    format!("{AGENTS_DIR}/{host_id}")
}
