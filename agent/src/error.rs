//! The agent's one error type. Each variant says what failed and on what; `guidance` says what the
//! operator or the coordinator should do next, and `status` maps it onto a gRPC code.
//!
//! Invariants: messages never carry a secret (token, database password); stderr tails are the
//! process's own output, trimmed to a few KiB.

use std::path::PathBuf;

/// What went wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {what}")]
    Config { what: String },
    #[error("cannot reach the Docker daemon at {socket}: {source}")]
    Docker {
        socket: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("container '{name}' does not exist on this host")]
    NoContainer { name: String },
    #[error("container '{name}' is not running")]
    NotRunning { name: String },
    #[error("Docker failed to {op} in container '{container}': {source}")]
    Exec {
        op: &'static str,
        container: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("{what} in container '{container}' {how}; stderr ends with: {stderr}")]
    CommandFailed {
        what: String,
        container: String,
        how: String,
        stderr: String,
    },
    #[error("path '{path}' is not in this agent's store allow-list ({allowed})")]
    NotAllowed { path: String, allowed: String },
    #[error("no hook named '{name}' in this agent's configuration (known: {known})")]
    NoHook { name: String, known: String },
    #[error("restore target {} is not empty", .path.display())]
    NotEmpty { path: PathBuf },
    #[error("archive refused before anything was written: {reason}")]
    BadArchive { reason: String },
    #[error("{what}")]
    BadRequest { what: String },
    #[error("{what}")]
    Disabled { what: String },
    #[error("SQL refused before anything was run: {reason}")]
    SqlRefused { reason: String },
    #[error("{what}")]
    Limit { what: String },
    #[error("no space left on the filesystem of {}: {source}", .path.display())]
    NoSpace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "restore into {} failed while moving entries into place, and was undone (the target is as it was): {source}",
        .target.display()
    )]
    RestoreUndone {
        target: PathBuf,
        #[source]
        source: Box<Error>,
    },
    #[error(
        "restore into {} failed while moving entries into place: {source}; undoing it failed too ({undo}); {state}",
        .target.display()
    )]
    RestoreIncomplete {
        target: PathBuf,
        /// Each move back that failed, and why.
        undo: String,
        /// Where every moved entry is now, and that the staging directory is kept.
        state: String,
        #[source]
        source: Box<Error>,
    },
    #[error("{op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the caller went away")]
    Cancelled,
    /// A failure inside the agent that no request caused (a worker that panicked, Docker
    /// answering against its API); INVALID_ARGUMENT stays for requests refused before anything
    /// was written.
    #[error("internal agent failure: {what}")]
    Internal { what: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// What to do about it, in one line.
    pub fn guidance(&self) -> &'static str {
        match self {
            Error::Config { .. } => "fix the agent's flags or config file and start it again",
            Error::Docker { .. } => {
                "mount the Docker socket into the agent (-v /var/run/docker.sock:/var/run/docker.sock) or set --docker"
            }
            Error::NoContainer { .. } | Error::NotRunning { .. } => {
                "ask the agent on the host that runs the database (Describe tells), or set --database-container"
            }
            Error::Exec { .. } => "check `docker info` on this host; the engine refused the exec",
            Error::CommandFailed { .. } => {
                "the command's own error is quoted above; fix it in the container and retry"
            }
            Error::NotAllowed { .. } => {
                "use one of the allow-listed paths from Describe, or add the path to the agent's store-paths"
            }
            Error::NoHook { .. } => "define the hook under [hooks.<name>] in the agent's config",
            Error::NotEmpty { .. } => "restore into an empty directory, or ask for overwrite",
            Error::BadArchive { .. } => {
                "the archive is damaged or unsafe; restore from another snapshot"
            }
            Error::BadRequest { .. } => {
                "the coordinator sent a malformed request; upgrade it to match the agent"
            }
            Error::Disabled { .. } => {
                "turn it on in the agent on the database host for the restore, then off again"
            }
            Error::SqlRefused { .. } => {
                "the dump is damaged or not the snapshot's; nothing ran: restore from another snapshot"
            }
            Error::Limit { .. } => {
                "raise the limit named above in the agent's config, or restore a smaller snapshot"
            }
            Error::NoSpace { .. } => {
                "free space (or raise the quota) on that filesystem on this host, then restore again"
            }
            Error::RestoreUndone { .. } => "nothing changed; fix the cause above and restore again",
            Error::RestoreIncomplete { .. } => {
                "move the entries named above back by hand (the staging directory is kept for that), fix the cause, then restore again"
            }
            Error::Io { .. } => "check the path's permissions and free space on this host",
            Error::Cancelled => "nothing to do: the caller cancelled",
            Error::Internal { .. } => {
                "retry; if it happens again, the agent's log on this host has the details"
            }
        }
    }

    /// The gRPC status for this error: message plus guidance.
    pub fn status(&self) -> tonic::Status {
        use tonic::Code;
        let code = match self {
            Error::Config { .. }
            | Error::Docker { .. }
            | Error::Exec { .. }
            | Error::Io { .. }
            | Error::Internal { .. } => Code::Internal,
            Error::NoContainer { .. } | Error::NoHook { .. } => Code::NotFound,
            Error::NotRunning { .. } | Error::NotEmpty { .. } | Error::Disabled { .. } => {
                Code::FailedPrecondition
            }
            Error::CommandFailed { .. }
            | Error::RestoreUndone { .. }
            | Error::RestoreIncomplete { .. } => Code::Aborted,
            Error::Limit { .. } | Error::NoSpace { .. } => Code::ResourceExhausted,
            Error::NotAllowed { .. } => Code::PermissionDenied,
            Error::BadArchive { .. } | Error::BadRequest { .. } | Error::SqlRefused { .. } => {
                Code::InvalidArgument
            }
            Error::Cancelled => Code::Cancelled,
        };
        tonic::Status::new(code, format!("{self}; {}", self.guidance()))
    }

    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.status()
    }
}
