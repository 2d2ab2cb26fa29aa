//! Run history: what every `snapshot`, `prune` and `restore` did, kept where any host can read
//! it, for `runs`, `status` and monitoring.
//!
//! Owns: the run entry ([`Run`]), its objects in the repository (`runs/<start>-<id>.json`, one per
//! run, `docs/FORMAT.md` § Runs) and its etcd keys ([`LAST_RUN_KEY`], [`LAST_SUCCESS_KEY`]).
//! Invariants:
//! - A run writes its entry twice: `started` once it holds the repository (a run killed later
//!   leaves that), then its outcome. An entry still `started` whose lease is gone (renewed no
//!   more for the lease TTL) is a run that never finished ([`Run::state`]).
//! - Recording never changes a run's outcome: a failure to write is a warning.
//! - Entries hold no secret: the error line is the run's own one-line error, which never carries
//!   one (`crate::error`).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{Error, ErrorKind, Result};
use crate::lease;
use crate::repository::{Repository, SnapshotId};

/// Where the runs live in a repository.
pub const DIR: &str = "runs/";
/// The format of an entry.
pub const FORMAT: &str = "deis-backup-run/1";
/// The last run's entry, in etcd.
pub const LAST_RUN_KEY: &str = "/deis/backup/runs/last";
/// The last complete snapshot run's entry, in etcd.
pub const LAST_SUCCESS_KEY: &str = "/deis/backup/runs/last-success";

/// What the run was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Command {
    Snapshot,
    Prune,
    Restore,
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Written when the run starts; replaced by the others when it ends.
    Started,
    Complete,
    /// It ran and failed.
    Failed,
    /// Refused before it wrote anything: another run held the lock or lease, or the preflight
    /// said no.
    Refused,
}

/// One run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Run {
    pub format: String,
    /// Unique per run.
    pub id: String,
    pub command: Command,
    pub host: String,
    pub pid: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub started: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub ended: Option<OffsetDateTime>,
    pub outcome: Outcome,
    /// The snapshot it wrote (snapshot) or read (restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotId>,
    /// The part (or bucket) that failed, when the error names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_part: Option<String>,
    /// The run's one-line error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes and objects the run moved (downloaded or uploaded), and objects it reused.
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub objects: u64,
    #[serde(default)]
    pub reused_objects: u64,
    /// The repository lease the run held (`leases/<token>.json`), by which a `started` entry is
    /// told alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

/// What was moved, for the entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    pub bytes: u64,
    pub objects: u64,
    pub reused_objects: u64,
}

impl Command {
    /// Its name, as the entry spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Snapshot => "snapshot",
            Command::Prune => "prune",
            Command::Restore => "restore",
        }
    }
}

/// A run's state as `runs` and `status` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Running,
    /// Started, and its lease lapsed without an outcome: killed, or its host died.
    NeverFinished,
    Complete,
    Failed,
    Refused,
}

impl State {
    /// Its name, as `runs --json` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::NeverFinished => "never-finished",
            State::Complete => "complete",
            State::Failed => "failed",
            State::Refused => "refused",
        }
    }
}

impl Run {
    /// A run of `command` starting now on this host.
    pub fn start(command: Command) -> Self {
        Self {
            format: FORMAT.to_owned(),
            id: crate::lock::random_token(),
            command,
            host: crate::lock::hostname(),
            pid: std::process::id(),
            started: OffsetDateTime::now_utc(),
            ended: None,
            outcome: Outcome::Started,
            snapshot: None,
            failed_part: None,
            error: None,
            bytes: 0,
            objects: 0,
            reused_objects: 0,
            lease: None,
        }
    }

    /// The entry's name in the repository: sortable by start time.
    pub fn file_name(&self) -> String {
        let fmt = time::macros::format_description!(
            "[year][month][day]T[hour][minute][second].[subsecond digits:3]Z"
        );
        let stamp = self
            .started
            .to_offset(time::UtcOffset::UTC)
            .format(&fmt)
            .unwrap_or_default();
        format!("{DIR}{stamp}-{}.json", self.id)
    }

    /// Ends the run with `result`: complete, or failed or refused with the error's line and the
    /// part it names.
    pub fn end(&mut self, result: std::result::Result<Moved, &Error>) {
        self.ended = Some(OffsetDateTime::now_utc());
        match result {
            Ok(moved) => {
                self.outcome = Outcome::Complete;
                self.bytes = moved.bytes;
                self.objects = moved.objects;
                self.reused_objects = moved.reused_objects;
            }
            Err(e) => {
                self.outcome = match e.kind() {
                    ErrorKind::Locked | ErrorKind::Preflight => Outcome::Refused,
                    _ => Outcome::Failed,
                };
                self.failed_part = failed_part(e.message());
                self.error = Some(e.message().to_owned());
            }
        }
    }

    /// Its state at `now`, given whether its lease is still renewed (`lease_live`).
    pub fn state(&self, lease_live: bool) -> State {
        match self.outcome {
            Outcome::Started if lease_live => State::Running,
            Outcome::Started => State::NeverFinished,
            Outcome::Complete => State::Complete,
            Outcome::Failed => State::Failed,
            Outcome::Refused => State::Refused,
        }
    }
}

/// The part an error names: its message starts `part <name>: ` or `mirroring bucket <name>`.
fn failed_part(message: &str) -> Option<String> {
    if let Some(rest) = message.strip_prefix("part ") {
        return rest.split_once(':').map(|(p, _)| p.to_owned());
    }
    let rest = message.strip_prefix("mirroring bucket ")?;
    let name = rest.split([':', ' ']).next()?;
    Some(format!("bucket {name}"))
}

/// Writes (or rewrites) `run`'s entry in `repo`.
pub async fn write(repo: &Repository, run: &Run) -> Result<()> {
    let data = serde_json::to_vec_pretty(run).expect("a run serialises");
    repo.replace_meta(&run.file_name(), data).await
}

/// Publishes `run` as the cluster's last run in etcd, and as its last success when it is a
/// complete snapshot.
pub async fn publish(etcd: &deis_backup_etcd::Client, run: &Run) -> Result<()> {
    let text = serde_json::to_string(run).expect("a run serialises");
    let put = async |key: &str| {
        etcd.set(key, &text, None)
            .await
            .map(drop)
            .map_err(|e| Error::new(ErrorKind::Etcd, format!("writing {key}: {e}"), ""))
    };
    put(LAST_RUN_KEY).await?;
    if run.command == Command::Snapshot && run.outcome == Outcome::Complete {
        put(LAST_SUCCESS_KEY).await?;
    }
    Ok(())
}

/// The runs recorded in `repo`, oldest first, each with its state. An entry that does not parse
/// is skipped with a warning (it is only history).
pub async fn runs(repo: &Repository) -> Result<Vec<(Run, State)>> {
    let now = OffsetDateTime::now_utc();
    let mut out = Vec::new();
    for (name, _) in repo.backend().list(DIR).await? {
        let data = match repo.get_meta(&name).await {
            Ok(d) => d,
            Err(e) if e.kind() == ErrorKind::Integrity => {
                tracing::warn!("{name} does not open: {}", e.message());
                continue;
            }
            Err(e) => return Err(e),
        };
        let run: Run = match serde_json::from_slice(&data) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("{name} is not a run entry: {e}");
                continue;
            }
        };
        let live = match (&run.outcome, &run.lease) {
            (Outcome::Started, Some(lease)) => lease::renewed_within(repo, lease, now).await?,
            (Outcome::Started, None) => now - run.started < lease::TTL,
            _ => false,
        };
        let state = run.state(live);
        out.push((run, state));
    }
    out.sort_by_key(|(run, _)| run.started);
    Ok(out)
}

/// A run entry from etcd (`key`), if there is one.
pub async fn from_etcd(etcd: &deis_backup_etcd::Client, key: &str) -> Result<Option<Run>> {
    let Some(text) = etcd
        .get(key)
        .await
        .map_err(|e| Error::new(ErrorKind::Etcd, format!("reading {key}: {e}"), ""))?
    else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::repository(format!("{key} is not a run entry: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_gives_the_outcome_the_line_and_the_part() {
        let mut run = Run::start(Command::Snapshot);
        let e = Error::new(ErrorKind::Agent, "x", "y").context("part store/shared/a.tar.zst");
        run.end(Err(&e));
        assert_eq!(run.outcome, Outcome::Failed);
        assert_eq!(run.failed_part.as_deref(), Some("store/shared/a.tar.zst"));
        assert_eq!(run.error.as_deref(), Some(e.message()));
        let mut run = Run::start(Command::Snapshot);
        run.end(Err(&Error::new(ErrorKind::Locked, "held", "wait")));
        assert_eq!((run.outcome, run.failed_part), (Outcome::Refused, None));
        assert_eq!(
            failed_part("mirroring bucket db_wal: listing failed"),
            Some("bucket db_wal".into())
        );
        let mut run = Run::start(Command::Prune);
        run.end(Ok(Moved {
            bytes: 5,
            objects: 2,
            reused_objects: 1,
        }));
        assert_eq!(
            (run.outcome, run.bytes, run.objects),
            (Outcome::Complete, 5, 2)
        );
        assert!(run.ended.is_some());
    }

    #[test]
    fn names_are_those_of_the_json() {
        for c in [Command::Snapshot, Command::Prune, Command::Restore] {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
        for s in [
            State::Running,
            State::NeverFinished,
            State::Complete,
            State::Failed,
            State::Refused,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[tokio::test]
    async fn entries_are_rewritten_in_place_and_a_lapsed_start_never_finished() {
        let (repo, _backend) = crate::testkit::memory_repo();
        let mut done = Run::start(Command::Snapshot);
        write(&repo, &done).await.unwrap();
        done.end(Ok(Moved::default()));
        write(&repo, &done).await.unwrap();
        // Started with a lease that is not there (killed, its lease removed or lapsed).
        let mut killed = Run::start(Command::Restore);
        killed.started -= time::Duration::minutes(10);
        killed.lease = Some("leases/gone.json".into());
        write(&repo, &killed).await.unwrap();
        // Started just now, without a lease yet: running.
        let fresh = Run::start(Command::Prune);
        write(&repo, &fresh).await.unwrap();

        let got = runs(&repo).await.unwrap();
        let states: Vec<(Command, State)> = got.iter().map(|(r, s)| (r.command, *s)).collect();
        assert_eq!(
            states,
            [
                (Command::Restore, State::NeverFinished),
                (Command::Snapshot, State::Complete),
                (Command::Prune, State::Running),
            ]
        );
        assert_eq!(repo.backend().list(DIR).await.unwrap().len(), 3);
    }
}
