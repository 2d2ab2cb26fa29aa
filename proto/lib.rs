//! The gRPC contract between the deis-backup coordinator and its agents, generated from
//! `proto/deis/backup/v1/agent.proto`, plus the few conventions both sides share: how a call is
//! authenticated, what the TLS certificates name, and where an agent registers itself in etcd.
//!
//! Invariants: this crate holds no behaviour beyond the contract. Anything that talks to Docker, the
//! store, etcd or the gateway lives in the agent or the coordinator.

pub mod v1 {
    #![allow(clippy::pedantic, clippy::all, missing_docs)]
    tonic::include_proto!("deis.backup.v1");
}

pub mod identity;
pub mod registration;

/// Metadata key every call carries, as `Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// Default port an agent serves on.
pub const DEFAULT_AGENT_PORT: u16 = 4195;
