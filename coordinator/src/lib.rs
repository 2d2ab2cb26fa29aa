//! deis-backup's coordinator library: everything the `deis-backup` CLI does, as functions.
//!
//! Owns the flow from the cluster into a repository and back: [`gateway`] finds the store-gateway
//! (Ceph radosgw) through etcd and [`s3`] talks to it (and to an S3 repository), [`repository`]
//! stores snapshots (blobs, bucket listings, parts and a manifest written last), [`mirror`] copies
//! buckets into a snapshot incrementally and [`bucket_restore`] puts them back.
//! Invariants: one error type ([`Error`]) with a guidance line; secrets never reach logs, errors or
//! stored listings and manifests.

pub mod agents;
pub mod bucket_restore;
pub mod drill;
pub mod dump_rows;
pub mod error;
pub mod gateway;
pub mod history;
pub mod hold;
pub mod lease;
pub mod lock;
pub mod metrics;
pub mod mirror;
pub mod pki;
pub mod platform_keys;
pub mod prune;
pub mod repository;
pub mod restore;
pub mod retention;
pub mod rfc3339;
pub mod s3;
pub mod secret;
pub mod snapshot;
pub mod status;
#[cfg(test)]
pub(crate) mod testkit;
pub mod verify;
pub mod wal_e;

pub use error::{Error, ErrorKind, Result};
