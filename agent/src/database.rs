//! The database container's two streams: `pg_dumpall` out as zstd chunks, and SQL in through `psql`.
//!
//! Invariants:
//! - Both run as OS user `postgres` inside the container, via exec (see `container`).
//! - A dump is complete only when `pg_dumpall` exited 0 as exec inspect reports it; otherwise the
//!   stream ends with an error carrying the tail of its stderr, never with a trailer.
//! - The database state (see `DumpDatabaseRequest.unchanged_since` in the proto) is read before
//!   `pg_dumpall` starts, so a change made during the dump moves the next state. A state that
//!   cannot be read is empty and never equals anything: the dump is taken.
//! - Memory stays bounded whatever the size: bounded channels on both sides of the compressor.
//! - A restore runs any SQL as the database superuser, so it is opt-in: refused (FAILED_PRECONDITION)
//!   unless the agent's config says `restore-database = true`, before any data is read.
//! - The restore's SQL is spooled to a private file and checked before psql sees a byte (see
//!   `spool`): whole stream, valid zstd, every line within `max-sql-line`, and the header's
//!   SHA-256 (32 bytes). A refusal there says nothing was run, and nothing was.
//! - psql stops at the first failing statement (`ON_ERROR_STOP`); every error from then on says
//!   the statements before it ran and the database may be partly restored. The only line changed
//!   on the way in is `CREATE ROLE postgres;` (commented out, line numbers kept): every cluster
//!   already has that role, and pg_dumpall emits it.
//! - Errors and replies quote the input line number and the statement's kind, never its text, and
//!   psql's output only with the statement echo, passwords, hashes and row values taken out (see
//!   `redact`).

mod redact;
mod spool;

use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use bytes::Bytes;
use deis_backup_proto::v1::{RestoreDatabaseReply, Trailer, Warning, warning};
use futures::StreamExt as _;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::chunks::{ChannelReader, ChunkSink, ChunkTx, Tail, encoder};
use crate::config::DatabaseRestorePolicy;
use crate::container::{Engine, Piece};
use crate::error::{Error, Result};

const STDERR_TAIL: usize = 4096;

fn millis(start: Instant) -> u64 {
    deis_backup_proto::duration_ms(start.elapsed())
}

fn join_error(e: &tokio::task::JoinError) -> Error {
    Error::Internal {
        what: format!("an agent worker thread failed: {e}"),
    }
}

/// Reads the state as one line: the WAL function's name differs before PostgreSQL 10, so psql
/// picks it (`\gset` works in every psql Deis ships).
const STATE_SQL: &str = "SELECT CASE WHEN current_setting('server_version_num')::int >= 100000 \
THEN 'pg_current_wal_lsn' ELSE 'pg_current_xlog_location' END AS wal_fn \\gset
SELECT 'started=' || extract(epoch FROM pg_postmaster_start_time()) || ' wal=' || :wal_fn() \
|| ' next-xid=' || txid_snapshot_xmax(txid_current_snapshot()) \
|| ' version=' || current_setting('server_version_num');
";

/// Starts `psql` as `postgres` on database `postgres` in `container`, reading SQL from stdin and
/// stopping at the first error, with `extra` options.
async fn psql(engine: &Engine, container: &str, extra: &[&str]) -> Result<crate::container::Exec> {
    let argv: Vec<String> = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"]
        .iter()
        .chain(extra)
        .chain(&["-d", "postgres", "-f", "-"])
        .map(|s| (*s).to_owned())
        .collect();
    engine.exec(container, Some("postgres"), &argv, true).await
}

/// The database state (server start, WAL position, next transaction id) of `container`.
pub async fn state(engine: &Engine, container: &str) -> Result<String> {
    let mut exec = psql(engine, container, &["-A", "-t"]).await?;
    let mut input = std::mem::replace(&mut exec.input, Box::pin(tokio::io::sink()));
    let feeder = tokio::spawn(async move {
        input.write_all(STATE_SQL.as_bytes()).await?;
        input.shutdown().await
    });
    let mut out = Tail::new(STDERR_TAIL);
    let mut stderr = Tail::new(STDERR_TAIL);
    exec.drain(|piece| match piece {
        Piece::Stdout(m) => out.push(&m),
        Piece::Stderr(m) => stderr.push(&m),
    })
    .await;
    feeder.abort();
    let code = engine.exit_code(&exec.id, &exec.container).await?;
    let line = out.text();
    if code != 0 || !line.starts_with("started=") || line.lines().count() != 1 {
        return Err(Error::CommandFailed {
            what: "psql (reading the database state)".into(),
            container: container.to_owned(),
            how: format!("exited with status {code}"),
            stderr: stderr.text(),
        });
    }
    Ok(line)
}

/// Streams `pg_dumpall` of `container` as zstd data chunks on `tx`; returns the trailer to send.
/// When the database is still in state `unchanged_since`, sends nothing and says so. The exec's
/// stdout goes to a compressor thread while its stderr is kept; the order of the joins after it is
/// the point: the compressor's end, then a lost stream, then the exit code.
pub async fn dump(
    engine: &Engine,
    container: &str,
    level: i32,
    unchanged_since: &str,
    tx: ChunkTx,
) -> Result<Trailer> {
    let start = Instant::now();
    let mut warnings = Vec::new();
    let state = state_or_warning(engine, container, &mut warnings).await;
    if !state.is_empty() && state == unchanged_since {
        tracing::info!(%state, "database unchanged since the caller's dump");
        return Ok(Trailer {
            duration_ms: millis(start),
            state,
            unchanged: true,
            ..Trailer::default()
        });
    }
    let mut exec = engine
        .exec(
            container,
            Some("postgres"),
            &["pg_dumpall".to_owned()],
            false,
        )
        .await?;
    let (raw_tx, raw_rx) = mpsc::channel::<Bytes>(16);
    let compressor = tokio::task::spawn_blocking(move || -> io::Result<(u64, u64, [u8; 32])> {
        let mut reader = ChannelReader::new(raw_rx);
        let mut enc = encoder(ChunkSink::new(tx), level, 1)?;
        io::copy(&mut reader, &mut enc)?;
        let (compressed, sha) = enc.finish()?.finish()?;
        Ok((reader.count(), compressed, sha))
    });
    let mut stderr = Tail::new(STDERR_TAIL);
    let lost = forward_stdout(&mut exec, raw_tx, &mut stderr).await;
    let (raw, compressed, sha) = match compressor.await.map_err(|e| join_error(&e))? {
        Ok(v) => v,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(Error::Cancelled),
        Err(e) => {
            return Err(Error::Internal {
                what: format!("compressing the dump failed: {e}"),
            });
        }
    };
    let failed = |how: String| Error::CommandFailed {
        what: "pg_dumpall".into(),
        container: container.to_owned(),
        how,
        stderr: stderr.text(),
    };
    if let Some(e) = lost {
        return Err(failed(format!("lost its output stream ({e})")));
    }
    match engine.exit_code(&exec.id, &exec.container).await {
        Ok(0) => {}
        Ok(code) => return Err(failed(format!("exited with status {code}"))),
        Err(Error::NoContainer { .. } | Error::NotRunning { .. }) => {
            return Err(failed("vanished before it finished".into()));
        }
        Err(e) => return Err(e),
    }
    Ok(Trailer {
        raw_bytes: raw,
        compressed_bytes: compressed,
        sha256: sha.to_vec(),
        duration_ms: millis(start),
        warnings,
        state,
        ..Trailer::default()
    })
}

/// The database state, or an empty one (a full dump) with a warning saying why it could not be
/// read.
async fn state_or_warning(engine: &Engine, container: &str, warnings: &mut Vec<Warning>) -> String {
    match state(engine, container).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the database state; dumping in full");
            warnings.push(Warning {
                kind: warning::Kind::Other.into(),
                path: String::new(),
                message: format!(
                    "the database state could not be read ({e}); the next snapshot dumps in full too"
                ),
            });
            String::new()
        }
    }
}

/// Sends the exec's stdout on `raw` (until the compressor stops taking it) and keeps its stderr's
/// tail; returns the error that cut the output short, if one did. `raw` is closed on return.
async fn forward_stdout(
    exec: &mut crate::container::Exec,
    raw: mpsc::Sender<Bytes>,
    stderr: &mut Tail,
) -> Option<bollard::errors::Error> {
    let mut pieces = std::pin::pin!(exec.pieces());
    while let Some(piece) = pieces.next().await {
        match piece {
            Ok(Piece::Stdout(m)) => {
                if raw.send(m).await.is_err() {
                    return None;
                }
            }
            Ok(Piece::Stderr(m)) => stderr.push(&m),
            Err(e) => return Some(e),
        }
    }
    None
}

/// The input line number in a psql error (`psql:<stdin>:42: ERROR: ...`).
fn psql_error_line(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|l| {
        let rest = l.strip_prefix("psql:<stdin>:")?;
        let (n, msg) = rest.split_once(':')?;
        msg.trim_start()
            .starts_with("ERROR")
            .then(|| n.parse().ok())
            .flatten()
    })
}

/// Refuses RestoreDatabase unless the agent's configuration turned it on.
pub fn check_enabled(policy: &DatabaseRestorePolicy) -> Result<()> {
    if policy.enabled {
        return Ok(());
    }
    Err(Error::Disabled {
        what: "RestoreDatabase is off on this agent: it runs the caller's SQL as the database \
               superuser; set `restore-database = true` in the agent's config file (or start it \
               with `--restore-database true`) for the restore"
            .into(),
    })
}

/// The header's SHA-256 of the compressed SQL, which must be 32 bytes.
pub fn check_digest(sha256: &[u8]) -> Result<[u8; 32]> {
    sha256.try_into().map_err(|_| Error::BadRequest {
        what: format!(
            "the RestoreDatabase header's sha256 must be 32 bytes, not {}",
            sha256.len()
        ),
    })
}

/// Bytes of psql's output kept, and whether more came (so the first kept line may be cut).
struct Output {
    tail: Tail,
    total: usize,
}

impl Output {
    fn new() -> Self {
        Self {
            tail: Tail::new(STDERR_TAIL),
            total: 0,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.tail.push(data);
        self.total = self.total.saturating_add(data.len());
    }

    /// The text as it may be quoted (see `redact`).
    fn quoted(&self, secret: bool) -> String {
        redact::psql_output(&self.tail.text(), self.total > STDERR_TAIL, secret)
    }
}

/// Restores the zstd-compressed SQL arriving on `data` into the database of `container`: spools
/// and checks it against `expected_sha` (see `spool`), then feeds it to `psql`. `window_log` is
/// the largest zstd window accepted.
#[expect(
    clippy::too_many_lines,
    reason = "spool, check, then feed psql while draining its output: the steps share the exec \
              and its error handling, and read best in order"
)]
pub async fn restore(
    engine: &Engine,
    container: &str,
    policy: &DatabaseRestorePolicy,
    window_log: u32,
    expected_sha: [u8; 32],
    data: mpsc::Receiver<Bytes>,
    broken: Arc<AtomicBool>,
) -> Result<RestoreDatabaseReply> {
    let start = Instant::now();
    let spooled = {
        let policy = policy.clone();
        tokio::task::spawn_blocking(move || {
            let input = ChannelReader::with_broken_flag(data, broken);
            spool::spool(input, &policy, window_log, &expected_sha)
        })
        .await
        .map_err(|e| join_error(&e))??
    };
    tracing::info!(
        compressed = spooled.compressed,
        raw = spooled.raw,
        lines = spooled.lines,
        "SQL spooled and checked; psql starts"
    );
    let mut exec = psql(engine, container, &[]).await?;
    let (sql_tx, mut sql_rx) = mpsc::channel::<Bytes>(8);
    let max_line = policy.max_line;
    let inflater = tokio::task::spawn_blocking(move || {
        let mut spooled = spooled;
        let fed = spooled.feed(max_line, window_log, |piece| {
            sql_tx.blocking_send(piece).is_ok()
        });
        (spooled, fed)
    });
    let mut input = std::mem::replace(&mut exec.input, Box::pin(tokio::io::sink()));
    let mut feeder = tokio::spawn(async move {
        while let Some(piece) = sql_rx.recv().await {
            input.write_all(&piece).await?;
        }
        input.shutdown().await
    });
    let mut output = Output::new();
    let mut stderr = Output::new();
    exec.drain(|piece| match piece {
        Piece::Stderr(m) => {
            stderr.push(&m);
            output.push(&m);
        }
        Piece::Stdout(m) => output.push(&m),
    })
    .await;
    // psql has ended. Its input was delivered only if the feeder wrote all of it and closed it: a
    // psql that stopped reading early (`\q`) can exit 0 with SQL still queued.
    let delivered = matches!(
        tokio::time::timeout(Duration::from_secs(5), &mut feeder).await,
        Ok(Ok(Ok(())))
    );
    feeder.abort();
    let (spooled, fed) = inflater.await.map_err(|e| join_error(&e))?;
    let code = match engine.exit_code(&exec.id, &exec.container).await {
        Ok(c) => c,
        Err(Error::NoContainer { .. } | Error::NotRunning { .. }) => -1,
        Err(e) => return Err(e),
    };
    let partly = "psql had run the statements before it, so the database may be partly restored";
    let stopped = |how: String, stderr: &Output| Error::CommandFailed {
        what: "psql".into(),
        container: container.to_owned(),
        how,
        stderr: stderr.quoted(true),
    };
    match fed {
        Ok(raw) if code == 0 && delivered => Ok(RestoreDatabaseReply {
            raw_bytes: raw,
            duration_ms: millis(start),
            output_tail: output.quoted(false),
        }),
        Ok(_) | Err(spool::FeedError::Closed) => {
            Err(psql_failed(spooled, window_log, container, code, &stderr).await)
        }
        Err(spool::FeedError::TooLong(t)) => Err(stopped(
            format!(
                "was stopped at input line {} ({} statement): the line grew past the agent's \
                 max-sql-line ({max_line} bytes) on the way in; {partly}",
                t.line, t.kind
            ),
            &stderr,
        )),
        Err(spool::FeedError::Read { line, source }) => Err(stopped(
            format!(
                "was stopped at input line {line}: reading back the SQL spool in {} failed \
                 ({source}); {partly}",
                policy.spool_dir.display()
            ),
            &stderr,
        )),
    }
}

/// The error for a psql that exited with `code` (or stopped reading), after the statement its
/// message names has been looked up in the spool.
async fn psql_failed(
    mut spooled: spool::Spooled,
    window_log: u32,
    container: &str,
    code: i64,
    stderr: &Output,
) -> Error {
    let statement = match psql_error_line(&stderr.tail.text()) {
        Some(n) => tokio::task::spawn_blocking(move || spooled.statement_at(n, window_log))
            .await
            .ok()
            .flatten(),
        None => None,
    };
    psql_error(container, code, stderr, statement.as_ref())
}

/// The error for a psql that exited with `code` (0: it stopped reading early): the input line
/// its message names and the kind of `statement` there, and its message quoted without secrets
/// (see `redact`).
fn psql_error(
    container: &str,
    code: i64,
    stderr: &Output,
    statement: Option<&redact::Statement>,
) -> Error {
    let at = match (psql_error_line(&stderr.tail.text()), statement) {
        (Some(n), Some(s)) if s.start == n => {
            format!(" at input line {n} ({} statement)", s.kind)
        }
        (Some(n), Some(s)) => format!(
            " at input line {n} (in the {} statement from line {})",
            s.kind, s.start
        ),
        (Some(n), None) => format!(" at input line {n}"),
        (None, _) => String::new(),
    };
    let how = if code == 0 {
        "stopped reading before the end of the SQL (exit status 0)".to_owned()
    } else {
        format!("exited with status {code}")
    };
    Error::CommandFailed {
        what: "psql".into(),
        container: container.to_owned(),
        how: format!(
            "{how}{at}; it had run the statements before that, so the database may be partly restored"
        ),
        stderr: stderr.quoted(statement.is_none_or(redact::Statement::carries_secrets)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn psql_errors_name_their_line() {
        let e = "psql:<stdin>:7: NOTICE: x\npsql:<stdin>:12: ERROR:  syntax error at or near \"SELEC\"\n";
        assert_eq!(psql_error_line(e), Some(12));
        assert_eq!(psql_error_line("ERROR: nothing"), None);
    }

    #[test]
    fn restore_database_is_off_by_default_and_names_the_key() {
        let policy = Config::default().database_restore_policy();
        assert!(!policy.enabled);
        let e = check_enabled(&policy).unwrap_err();
        let status = e.status();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains("restore-database = true"), "{msg}");
        assert!(msg.contains("--restore-database true"), "{msg}");
        let on = DatabaseRestorePolicy {
            enabled: true,
            ..policy
        };
        check_enabled(&on).unwrap();
    }

    #[test]
    fn the_header_digest_must_be_32_bytes() {
        assert!(check_digest(&[7; 32]).is_ok());
        for bad in [&[][..], &[7; 31][..], &[7; 33][..]] {
            let e = check_digest(bad).unwrap_err();
            assert_eq!(e.status().code(), tonic::Code::InvalidArgument, "{e}");
        }
    }

    #[test]
    fn quoted_psql_output_withholds_passwords_and_hashes() {
        let mut o = Output::new();
        o.push(
            b"psql:<stdin>:3: ERROR:  syntax error at or near \"'md5a3556571e93b0d20722ba62be61e8c2d'\"\n\
              LINE 1: ALTER ROLE deis PASSWORD 'md5a3556571e93b0d20722ba62be61e8c2d' X;\n\
              \x20                        ^\n",
        );
        for secret in [false, true] {
            let q = o.quoted(secret);
            assert!(!q.contains("a3556571"), "{q}");
            assert!(!q.contains("ALTER ROLE deis"), "{q}");
            assert!(q.contains("psql:<stdin>:3: ERROR:"), "{q}");
        }
        // A long output: the first kept line may be a fragment of a hash, so it goes.
        let mut o = Output::new();
        o.push(&vec![b'x'; STDERR_TAIL]);
        o.push(b"0d20722ba62be61e8c2d' more\npsql:<stdin>:9: ERROR:  boom\n");
        assert_eq!(o.quoted(false), "psql:<stdin>:9: ERROR:  boom");
    }

    #[test]
    fn a_failing_role_statement_is_named_without_its_password() {
        const HASH: &str = "md5a3556571e93b0d20722ba62be61e8c2d";
        let dir = tempfile::tempdir().unwrap();
        let sql = format!(
            "CREATE ROLE deis;\nALTER ROLE deis WITH LOGIN\n    PASSWORD '{HASH}' OOPS;\nSELECT 1;\n"
        );
        let z = zstd::encode_all(sql.as_bytes(), 3).unwrap();
        let sha: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&z).into();
        let policy = DatabaseRestorePolicy {
            enabled: true,
            drill: true,
            max_line: 1024,
            spool_dir: dir.path().to_owned(),
        };
        let mut spooled = spool::spool(z.as_slice(), &policy, 27, &sha).unwrap();
        let mut stderr = Output::new();
        stderr.push(
            format!(
                "psql:<stdin>:3: ERROR:  syntax error at or near \"OOPS\"\n\
                 LINE 2:     PASSWORD '{HASH}' OOPS;\n\
                 \x20                                                 ^\n"
            )
            .as_bytes(),
        );
        let statement = spooled.statement_at(3, 27);
        let e = psql_error("deis-database", 3, &stderr, statement.as_ref());
        let msg = e.to_string();
        assert!(
            msg.contains("at input line 3 (in the ALTER ROLE statement from line 2)"),
            "{msg}"
        );
        assert!(msg.contains("may be partly restored"), "{msg}");
        assert!(!msg.contains("a3556571") && !msg.contains("OOPS"), "{msg}");
        assert!(!msg.contains("WITH LOGIN"), "no statement text: {msg}");
        assert_eq!(e.status().code(), tonic::Code::Aborted);
        drop(spooled);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
