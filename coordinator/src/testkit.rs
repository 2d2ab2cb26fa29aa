//! The fast test layer's kit: what the coordinator's unit tests run against instead of a cluster.
//!
//! Owns: [`memory::MemoryBackend`] (a repository [`Backend`](crate::repository::Backend) in memory,
//! with the local backend's contract), [`agent::FakeAgent`] (the agent's gRPC service, in process,
//! on 127.0.0.1, serving fixtures and recording what it was sent) and the fixtures both share
//! ([`agent::Host`], [`agent::StoreFixture`]), plus [`cluster`], which puts fake agents together the
//! way `snapshot::Cluster::discover` does, through the coordinator's own discovery and client.
//! Invariants:
//! - Nothing here needs the network beyond 127.0.0.1, Docker, etcd or a gateway: `cargo test` runs
//!   it in seconds. A [`cluster`] has an etcd client pointed at a closed port, so a code path that
//!   reaches etcd fails loudly instead of passing by accident.
//! - The fakes keep the contract's rules (`proto/deis/backup/v1/agent.proto`), the ones the
//!   coordinator relies on: a bearer token on every call, a download stream ending in exactly one
//!   trailer, segment ends carrying the size and sha256 of the data before them, reuse only of
//!   offered fingerprints, restores checked against their digests. Breaking a rule is always an
//!   explicit [`agent::Fault`] a test asks for.
//! - Test-only: compiled under `cfg(test)`, never part of the library.

pub mod agent;
pub mod memory;

use std::sync::Arc;

use crate::agents::{self, AgentOptions};
use crate::repository::Repository;
use crate::snapshot::Cluster;

pub use agent::{FakeAgent, Fault, Host, StoreFixture};
pub use memory::MemoryBackend;

/// A repository over a fresh [`MemoryBackend`] (flushed like a real one, so the backend's log
/// shows the syncs), and the backend itself, for looking inside.
pub fn memory_repo() -> (Repository, Arc<MemoryBackend>) {
    let backend = Arc::new(MemoryBackend::new());
    (Repository::with_backend(backend.clone(), true), backend)
}

/// The bearer token every [`FakeAgent`] expects.
pub const TOKEN: &str = "a-test-token-of-16+-chars";

/// Agent options that reach `agents` over plain HTTP/2 with [`TOKEN`], as a CLI user would give
/// them (`--agent HOST@ADDR --agent-token-file F --insecure-plaintext`). The token file lives in
/// `dir`.
pub fn agent_options(dir: &std::path::Path, agents: &[&FakeAgent]) -> AgentOptions {
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    AgentOptions {
        agents: agents
            .iter()
            .map(|a| format!("{}@{}", a.host_id(), a.address()))
            .collect(),
        token_file: Some(token),
        insecure_plaintext: true,
        ..AgentOptions::default()
    }
}

/// A cluster of `agents`, found and described through the coordinator's own client (no gateway,
/// no buckets; etcd unreachable, see the module invariants).
pub async fn cluster(agents: &[&FakeAgent]) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let options = agent_options(dir.path(), agents);
    let locations = agents::locate(&options, None).await.unwrap();
    let clients = agents::connect(&options, &locations).unwrap();
    Cluster {
        etcd: unreachable_etcd(),
        agents: agents::describe_required(&clients).await.unwrap(),
        unanswered: Vec::new(),
        gateway: None,
        deis_buckets: None,
        buckets: Vec::new(),
    }
}

/// An etcd client for a port nothing listens on.
pub fn unreachable_etcd() -> deis_backup_etcd::Client {
    deis_backup_etcd::Client::new(&["http://127.0.0.1:9"]).unwrap()
}

/// Snapshot progress that reports nothing (the library's [`NoProgress`](crate::mirror::NoProgress)
/// covers buckets only).
impl crate::snapshot::Progress for crate::mirror::NoProgress {}
