//! The gRPC contract between the deis-backup coordinator and its agents, generated from
//! `proto/deis/backup/v1/agent.proto`, plus the few conventions both sides share: how a call is
//! authenticated, what the TLS certificates name, where an agent registers itself in etcd, and how
//! a config file is read and put under the command line.
//!
//! Invariants: this crate holds the contract and those shared conventions only, and performs no I/O
//! beyond reading the config file it is handed. Anything that talks to Docker, the store, etcd or the
//! gateway lives in the agent or the coordinator.

pub mod v1 {
    #![allow(clippy::pedantic, clippy::all, missing_docs)]
    tonic::include_proto!("deis.backup.v1");
}

pub mod config;
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

/// Default etcd endpoint of both binaries (Deis v1 clients use port 4001 on every host).
pub const DEFAULT_ETCD: &str = "http://127.0.0.1:4001";

/// Environment variable holding the bearer token, for both binaries (a token file is preferred).
pub const TOKEN_ENV: &str = "DEIS_BACKUP_TOKEN";

/// Fewest characters a bearer token may have: short enough to type, long enough not to guess.
pub const MIN_TOKEN_CHARS: usize = 16;

/// The bearer token in `text` (a token file's content or the environment variable's value):
/// trimmed, at least [`MIN_TOKEN_CHARS`] characters, and only what an HTTP header can carry. Both
/// sides apply the same rule, so a token one accepts the other does too. The error names the rule,
/// never the token.
pub fn check_token(text: &str) -> Result<&str, String> {
    let t = text.trim();
    if t.chars().count() < MIN_TOKEN_CHARS {
        return Err(format!(
            "the bearer token must have at least {MIN_TOKEN_CHARS} characters"
        ));
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the bearer token must be printable ASCII without spaces".into());
    }
    Ok(t)
}

/// A duration as the contract's `duration_ms` fields carry it: whole milliseconds, saturating.
pub fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_sides_take_the_same_tokens() {
        assert_eq!(
            super::check_token("  0123456789abcdef\n"),
            Ok("0123456789abcdef")
        );
        assert!(super::check_token("0123456789abcde").is_err());
        assert!(super::check_token("").is_err());
        let e = super::check_token("0123456789abcdef é").unwrap_err();
        assert!(!e.contains("0123"), "{e}");
    }
}
