//! `status`: is the cluster's backup healthy? For monitoring (Nagios and Icinga run it as it is).
//!
//! Owns: the judgement ([`judge`]) of the last run and the last complete snapshot, and its exit
//! codes, which follow the monitoring plugins' convention: 0 OK, 2 CRITICAL, 3 UNKNOWN (the
//! facts could not be read).
//! Invariants:
//! - OK only when the last complete snapshot is younger than the allowed age and the last run
//!   that ended did not fail; anything else is CRITICAL, in one line saying what is wrong and
//!   since when.
//! - The facts come from etcd alone (`history::LAST_RUN_KEY`, `LAST_SUCCESS_KEY`) or from a
//!   repository alone (its runs and its newest manifest); judging reads nothing else.

use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use crate::history::{Run, State};
use crate::rfc3339::rfc3339;

/// Exit code: healthy.
pub const OK: u8 = 0;
/// Exit code: the backup needs someone (old snapshot, failed run, none at all).
pub const CRITICAL: u8 = 2;
/// Exit code: the facts could not be read.
pub const UNKNOWN: u8 = 3;

/// What `status` knows.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// The last run that ended (or never finished), with its state.
    pub last_run: Option<(Run, State)>,
    /// When the newest complete snapshot completed, and its id.
    pub last_success: Option<(OffsetDateTime, String)>,
}

/// The verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub code: u8,
    /// `OK: …` or `CRITICAL: …`, one line.
    pub line: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_run: Option<Run>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_run_state: Option<State>,
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub last_success: Option<OffsetDateTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_snapshot: Option<String>,
}

/// Judges `facts` at `now` with `max_age` allowed since the last complete snapshot.
pub fn judge(facts: Facts, max_age: Duration, now: OffsetDateTime) -> Status {
    let since = facts.last_success.as_ref().map_or_else(
        || "no complete snapshot yet".to_owned(),
        |(t, id)| format!("last complete snapshot {id} at {}", rfc3339(*t)),
    );
    let failed = facts.last_run.as_ref().and_then(|(run, state)| {
        let what = match state {
            State::Failed => "failed",
            State::Refused => "was refused",
            State::NeverFinished => "started and never finished",
            State::Running | State::Complete => return None,
        };
        let command = run.command.as_str();
        let part = run
            .failed_part
            .as_ref()
            .map(|p| format!(" in {p}"))
            .unwrap_or_default();
        let error = run
            .error
            .as_ref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        Some(format!(
            "the last run ({command} on {} at {}) {what}{part}{error}",
            run.host,
            rfc3339(run.started)
        ))
    });
    let age = facts
        .last_success
        .as_ref()
        .map(|(t, _)| Duration::try_from(now - *t).unwrap_or_default());
    let (code, line) = match (failed, age) {
        (Some(f), _) => (CRITICAL, format!("CRITICAL: {f}; {since}")),
        (None, None) => (CRITICAL, format!("CRITICAL: {since}")),
        (None, Some(a)) if a > max_age => (
            CRITICAL,
            format!(
                "CRITICAL: {since}, {} ago, older than the {} allowed",
                humantime::format_duration(whole_minutes(a)),
                humantime::format_duration(max_age)
            ),
        ),
        (None, Some(a)) => (
            OK,
            format!(
                "OK: {since}, {} ago",
                humantime::format_duration(whole_minutes(a))
            ),
        ),
    };
    let (last_run, last_run_state) = facts
        .last_run
        .map_or((None, None), |(r, s)| (Some(r), Some(s)));
    let (last_success, last_snapshot) = facts
        .last_success
        .map_or((None, None), |(t, id)| (Some(t), Some(id)));
    Status {
        code,
        line,
        last_run,
        last_run_state,
        last_success,
        last_snapshot,
    }
}

impl Status {
    /// The verdict when the facts could not be read.
    pub fn unknown(e: &crate::error::Error) -> Self {
        Self {
            code: UNKNOWN,
            line: format!("UNKNOWN: {}", e.message()),
            last_run: None,
            last_run_state: None,
            last_success: None,
            last_snapshot: None,
        }
    }
}

fn whole_minutes(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() / 60 * 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, ErrorKind};
    use crate::history::{Command, Moved};

    const DAY: Duration = Duration::from_secs(86_400);

    fn ended(command: Command, result: std::result::Result<Moved, &Error>) -> (Run, State) {
        let mut run = Run::start(command);
        run.end(result);
        let state = run.state(false);
        (run, state)
    }

    #[test]
    fn fresh_and_successful_is_ok_anything_else_critical_in_one_line() {
        let now = OffsetDateTime::now_utc();
        let hour_ago = (now - time::Duration::hours(1), "s1".to_owned());
        let ok = judge(
            Facts {
                last_run: Some(ended(Command::Snapshot, Ok(Moved::default()))),
                last_success: Some(hour_ago.clone()),
            },
            DAY,
            now,
        );
        assert_eq!(ok.code, OK, "{}", ok.line);
        assert!(
            ok.line.starts_with("OK: last complete snapshot s1 at ")
                && ok.line.ends_with(" 1h ago"),
            "{}",
            ok.line
        );

        let old = judge(
            Facts {
                last_run: Some(ended(Command::Snapshot, Ok(Moved::default()))),
                last_success: Some(hour_ago.clone()),
            },
            Duration::from_secs(600),
            now,
        );
        assert_eq!(old.code, CRITICAL);
        assert!(
            old.line.contains("older than the 10m allowed"),
            "{}",
            old.line
        );

        let e = Error::new(ErrorKind::GatewayUnreachable, "no gateway answered", "x")
            .context("mirroring bucket db_wal");
        let failed = judge(
            Facts {
                last_run: Some(ended(Command::Snapshot, Err(&e))),
                last_success: Some(hour_ago),
            },
            DAY,
            now,
        );
        assert_eq!(failed.code, CRITICAL);
        assert!(
            failed
                .line
                .contains(") failed in bucket db_wal: mirroring bucket db_wal")
                && failed.line.ends_with(&format!(
                    "; last complete snapshot s1 at {}",
                    rfc3339(now - time::Duration::hours(1))
                )),
            "{}",
            failed.line
        );

        let mut killed = Run::start(Command::Snapshot);
        killed.lease = Some("leases/x.json".into());
        let never = judge(
            Facts {
                last_run: Some((killed.clone(), killed.state(false))),
                last_success: None,
            },
            DAY,
            now,
        );
        assert!(
            never
                .line
                .contains("started and never finished; no complete snapshot yet"),
            "{}",
            never.line
        );
        for s in [ok, old, failed, never] {
            assert_eq!(s.line.lines().count(), 1, "{}", s.line);
        }
        let none = judge(Facts::default(), DAY, now);
        assert_eq!(
            (none.code, none.line.as_str()),
            (CRITICAL, "CRITICAL: no complete snapshot yet")
        );
    }
}
