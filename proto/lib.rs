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

/// Largest gRPC message either side accepts. Sized for the largest lists a message carries: a
/// store archive of one million segments (RestoreStoreHeader's digests, about 44 bytes each) or
/// one million reusable fingerprints (ArchiveStoreRequest, about 35 bytes each), with room to
/// spare. Data chunks are far smaller.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Default port an agent serves on.
pub const DEFAULT_AGENT_PORT: u16 = 4195;
