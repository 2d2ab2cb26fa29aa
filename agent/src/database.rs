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
//! - A restore stops at the first failing statement (`ON_ERROR_STOP`) and reports psql's message
//!   with the input line it names. The only line changed on the way in is `CREATE ROLE postgres;`
//!   (commented out, line numbers kept): every cluster already has that role, and pg_dumpall emits it.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bollard::container::LogOutput;
use bytes::Bytes;
use deis_backup_proto::v1::{RestoreDatabaseReply, Trailer, Warning, warning};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::chunks::{ChannelReader, ChunkSink, ChunkTx, Tail, encoder};
use crate::container::Engine;
use crate::error::{Error, Result};

const STDERR_TAIL: usize = 4096;

fn millis(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn join_error(e: &tokio::task::JoinError) -> Error {
    Error::BadRequest {
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
    let mut input = exec.input;
    let feeder = tokio::spawn(async move {
        input.write_all(STATE_SQL.as_bytes()).await?;
        input.shutdown().await
    });
    let mut out = Tail::new(STDERR_TAIL);
    let mut stderr = Tail::new(STDERR_TAIL);
    while let Some(item) = exec.output.next().await {
        match item {
            Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                out.push(&message);
            }
            Ok(LogOutput::StdErr { message }) => stderr.push(&message),
            Ok(LogOutput::StdIn { .. }) => {}
            Err(_) => break,
        }
    }
    feeder.abort();
    exec.input = Box::pin(tokio::io::sink());
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
/// When the database is still in state `unchanged_since`, sends nothing and says so.
pub async fn dump(
    engine: &Engine,
    container: &str,
    level: i32,
    unchanged_since: &str,
    tx: ChunkTx,
) -> Result<Trailer> {
    let start = Instant::now();
    let mut warnings = Vec::new();
    let state = match state(engine, container).await {
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
    };
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
    let mut lost = None;
    while let Some(item) = exec.output.next().await {
        match item {
            Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                if raw_tx.send(message).await.is_err() {
                    break;
                }
            }
            Ok(LogOutput::StdErr { message }) => stderr.push(&message),
            Ok(LogOutput::StdIn { .. }) => {}
            Err(e) => {
                lost = Some(e);
                break;
            }
        }
    }
    drop(raw_tx);
    let (raw, compressed, sha) = match compressor.await.map_err(|e| join_error(&e))? {
        Ok(v) => v,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(Error::Cancelled),
        Err(e) => {
            return Err(Error::BadRequest {
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

/// The last lines fed to psql, by line number, to quote the statement an error names.
#[derive(Default)]
struct Lines {
    recent: VecDeque<(u64, String)>,
    next: u64,
}

impl Lines {
    const KEEP: usize = 4096;

    fn push(&mut self, line: &[u8]) {
        self.next += 1;
        let mut text = String::from_utf8_lossy(line).trim_end().to_owned();
        if text.len() > 300 {
            let mut cut = 300;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        self.recent.push_back((self.next, text));
        if self.recent.len() > Self::KEEP {
            self.recent.pop_front();
        }
    }

    /// Lines `n-2..=n`, as "n: text" lines.
    fn around(&self, n: u64) -> Option<String> {
        let got: Vec<String> = self
            .recent
            .iter()
            .filter(|(i, _)| *i + 2 >= n && *i <= n)
            .map(|(i, t)| format!("{i}: {t}"))
            .collect();
        (!got.is_empty()).then(|| got.join(" | "))
    }
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

/// Decompresses the SQL, splits it into lines for error context, and forwards it in pieces.
fn inflate_sql(
    mut reader: ChannelReader,
    out: &mpsc::Sender<Bytes>,
    lines: &Mutex<Lines>,
) -> io::Result<(u64, [u8; 32], u64)> {
    let mut raw = 0u64;
    {
        let mut dec = zstd::Decoder::new(&mut reader)?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut partial: Vec<u8> = Vec::new();
        loop {
            let n = dec.read(&mut buf)?;
            if n == 0 {
                break;
            }
            raw += n as u64;
            let mut piece = Vec::with_capacity(n + partial.len());
            let mut rest = &buf[..n];
            // Whole lines go out; a partial last line waits for its end.
            while let Some(pos) = rest.iter().position(|b| *b == b'\n') {
                partial.extend_from_slice(&rest[..=pos]);
                rest = &rest[pos + 1..];
                let line = std::mem::take(&mut partial);
                if line == b"CREATE ROLE postgres;\n" {
                    piece.extend_from_slice(
                        b"-- CREATE ROLE postgres; -- skipped by deis-backup-agent: it exists\n",
                    );
                } else {
                    piece.extend_from_slice(&line);
                }
                lines.lock().expect("lines lock").push(&line);
            }
            partial.extend_from_slice(rest);
            if !piece.is_empty() && out.blocking_send(Bytes::from(piece)).is_err() {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "psql stopped reading",
                ));
            }
        }
        if !partial.is_empty() {
            lines.lock().expect("lines lock").push(&partial);
            if out.blocking_send(Bytes::from(partial)).is_err() {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "psql stopped reading",
                ));
            }
        }
    }
    let (compressed, sha) = reader.finish()?;
    Ok((compressed, sha, raw))
}

/// Feeds zstd-compressed SQL arriving on `data` to `psql` in `container`.
pub async fn restore(
    engine: &Engine,
    container: &str,
    expected_sha: &[u8],
    data: mpsc::Receiver<Bytes>,
    broken: Arc<AtomicBool>,
) -> Result<RestoreDatabaseReply> {
    let start = Instant::now();
    let mut exec = psql(engine, container, &[]).await?;
    let lines = Arc::new(Mutex::new(Lines::default()));
    let (sql_tx, mut sql_rx) = mpsc::channel::<Bytes>(8);
    let inflater = {
        let lines = lines.clone();
        tokio::task::spawn_blocking(move || {
            inflate_sql(
                ChannelReader::with_broken_flag(data, broken),
                &sql_tx,
                &lines,
            )
        })
    };
    let mut input = exec.input;
    let feeder = tokio::spawn(async move {
        while let Some(piece) = sql_rx.recv().await {
            input.write_all(&piece).await?;
        }
        input.shutdown().await
    });
    let mut output = Tail::new(STDERR_TAIL);
    let mut stderr = Tail::new(STDERR_TAIL);
    while let Some(item) = exec.output.next().await {
        match item {
            Ok(LogOutput::StdErr { message }) => {
                stderr.push(&message);
                output.push(&message);
            }
            Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                output.push(&message);
            }
            Ok(LogOutput::StdIn { .. }) => {}
            Err(_) => break,
        }
    }
    feeder.abort();
    exec.input = Box::pin(tokio::io::sink());
    let sql_result = inflater.await.map_err(|e| join_error(&e))?;
    let code = match engine.exit_code(&exec.id, &exec.container).await {
        Ok(c) => c,
        Err(Error::NoContainer { .. } | Error::NotRunning { .. }) => -1,
        Err(e) => return Err(e),
    };
    let failed = |how: String| {
        let text = stderr.text();
        let context = psql_error_line(&text)
            .and_then(|n| lines.lock().expect("lines lock").around(n))
            .map(|c| format!(" [input {c}]"))
            .unwrap_or_default();
        Error::CommandFailed {
            what: "psql".into(),
            container: container.to_owned(),
            how: format!("{how}{context}"),
            stderr: text,
        }
    };
    if code != 0 {
        return Err(failed(format!("exited with status {code}")));
    }
    let (_, sha, raw) = sql_result.map_err(|e| Error::BadArchive {
        reason: format!(
            "the SQL stream broke off or is not valid zstd ({e}); psql ran the statements before that point"
        ),
    })?;
    if !expected_sha.is_empty() && expected_sha != sha {
        return Err(Error::BadArchive {
            reason:
                "the SQL's sha256 differs from the header's (psql has run it: check the database)"
                    .into(),
        });
    }
    Ok(RestoreDatabaseReply {
        raw_bytes: raw,
        duration_ms: millis(start),
        output_tail: output.text(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psql_errors_name_their_line() {
        let e = "psql:<stdin>:7: NOTICE: x\npsql:<stdin>:12: ERROR:  syntax error at or near \"SELEC\"\n";
        assert_eq!(psql_error_line(e), Some(12));
        assert_eq!(psql_error_line("ERROR: nothing"), None);
        let mut l = Lines::default();
        for i in 1..=12 {
            l.push(format!("line {i}\n").as_bytes());
        }
        assert_eq!(
            l.around(12).unwrap(),
            "10: line 10 | 11: line 11 | 12: line 12"
        );
    }
}
