//! The coordinator library's one error type.
//!
//! Owns: [`Error`], its [`ErrorKind`] and the guidance line every error carries.
//! Invariants:
//! - Every error says what failed, on what, and (in [`Error::guidance`]) what to do next.
//! - No error ever carries a secret: gateway keys never reach a message (callers format messages from
//!   names, endpoints and S3 error codes only).

use std::borrow::Cow;
use std::fmt;

/// What kind of failure an [`Error`] is; callers match on this, not on the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad options or configuration.
    Config,
    /// etcd could not be read.
    Etcd,
    /// No gateway answered.
    GatewayUnreachable,
    /// The gateway refused the keys or the signature.
    GatewayAuth,
    /// The gateway answered with an error (after retries).
    Gateway,
    /// A bucket to restore into already holds objects.
    BucketNotEmpty,
    /// A snapshot, listing or blob does not exist.
    NotFound,
    /// The repository is unusable (bad format, wrong layout, storage error).
    Repository,
    /// Bytes did not match their recorded checksum or size.
    Integrity,
    /// A local file system operation failed.
    Io,
    /// An agent refused the call, or failed its job.
    Agent,
    /// An agent did not answer: its host is down or cut off from this one.
    AgentUnreachable,
    /// Another deis-backup holds the cluster lock.
    Locked,
    /// A restore's preflight check failed; nothing was written.
    Preflight,
}

/// An error of the coordinator library: a kind, a message, a guidance line, and the error that
/// caused it, when there is one (kept for `source()`; its text is already in the message).
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    guidance: Cow<'static, str>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    pub fn new(
        kind: ErrorKind,
        message: impl Into<String>,
        guidance: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            kind,
            message: message.into(),
            guidance: guidance.into(),
            source: None,
        }
    }

    /// Keeps `source` as the cause of this error.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// What failed, without the guidance line.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// What the user should do next.
    pub fn guidance(&self) -> &str {
        &self.guidance
    }

    /// Prefixes the message with where the error happened (`mirroring bucket db_wal: ...`).
    #[must_use]
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    pub(crate) fn io(what: impl fmt::Display, e: std::io::Error) -> Self {
        Self::new(
            ErrorKind::Io,
            format!("{what}: {e}"),
            "check that the path exists, is writable and that the disk is not full",
        )
        .with_source(e)
    }

    pub(crate) fn repository(message: impl Into<String>) -> Self {
        Self::new(
            ErrorKind::Repository,
            message,
            "check the repository location; `verify` tells which snapshots are intact",
        )
    }

    pub(crate) fn integrity(message: impl Into<String>) -> Self {
        Self::new(
            ErrorKind::Integrity,
            message,
            "the data changed or was damaged in transit or at rest: run the command again, then `verify` the repository",
        )
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            ErrorKind::NotFound,
            message,
            "list the snapshots to see what the repository holds",
        )
    }

    pub fn config(message: impl Into<String>) -> Self {
        Self::new(
            ErrorKind::Config,
            message,
            "fix the option or the config file and run again",
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (next: {})", self.message, self.guidance)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<deis_backup_etcd::Error> for Error {
    fn from(e: deis_backup_etcd::Error) -> Self {
        Self::new(
            ErrorKind::Etcd,
            e.to_string(),
            "pass --etcd with a reachable endpoint, or give the gateway endpoint and keys explicitly",
        )
        .with_source(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_carries_guidance_and_context() {
        let e = Error::not_found("no snapshot x").context("restoring");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let s = e.to_string();
        assert!(s.starts_with("restoring: no snapshot x"), "{s}");
        assert!(s.contains("next: list the snapshots"), "{s}");
    }

    #[test]
    fn the_cause_stays_reachable_through_context() {
        use std::error::Error as _;
        let io = std::io::Error::from(std::io::ErrorKind::StorageFull);
        let e = Error::io("write /r/blobs/x", io).context("snapshot");
        assert_eq!(e.kind(), ErrorKind::Io);
        let cause = e.source().expect("the io error is the source");
        let io = cause.downcast_ref::<std::io::Error>().unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::StorageFull);
        assert!(
            e.message().starts_with("snapshot: write /r/blobs/x: "),
            "{e}"
        );
    }
}
