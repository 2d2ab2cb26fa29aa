//! How the coordinator writes a time for people and files: RFC 3339.
//!
//! Owns: [`rfc3339`], the text form of every time it shows (list, show, lock holders, leases).
//! Invariant: the same text `time::serde::rfc3339` writes into manifests, leases and the lock, so
//! what a person reads matches what the files hold.

use time::OffsetDateTime;

/// `t` in RFC 3339.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}
