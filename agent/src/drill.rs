//! The restore drill: a snapshot's dump loaded into a throwaway container of the database
//! container's image, and the rows of every table it then holds counted; and the probe of that
//! image's PostgreSQL versions, in the same kind of container.
//!
//! Invariants:
//! - Nothing of the cluster is touched: the container is the agent's own (`deis-backup-drill-*`,
//!   labelled with the host id), from the database container's image, with no network and no
//!   mount; its PostgreSQL is a fresh cluster in the container's /tmp with no TCP listener.
//! - The container is removed when the drill ends, whatever the outcome; containers a killed
//!   agent left behind (same label) are removed before the next drill creates its own. One
//!   throwaway job runs at a time ([`JOBS`]), so a container with the label that is not the
//!   running job's is a leftover.
//! - The SQL goes through the same spool, checks and psql as a database restore (`database`).
//! - The script the container runs is fixed here; nothing of the caller's reaches a command line.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use bytes::Bytes;
use deis_backup_proto::v1::{DrillDatabaseReply, ProbeDatabaseImageReply, TableRows};
use tokio::sync::mpsc;

use crate::chunks::Tail;
use crate::config::DatabaseRestorePolicy;
use crate::container::{Engine, Piece, Throwaway};
use crate::database;
use crate::error::{Error, Result};

/// The label on every drill container; its value is the agent's host id.
pub const LABEL: &str = "com.deis-backup.drill";

/// As root: the socket directory, then a fresh cluster of the image's newest PostgreSQL in /tmp
/// run as `postgres` (daemontools' `setuidgid`, which Deis' image has for WAL-E's `envdir`), with
/// no TCP listener and no durability (the data is thrown away).
const SCRIPT: &str = r#"set -e
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
install -d -o postgres -g postgres -m 2775 /var/run/postgresql
install -d -o postgres -g postgres -m 0700 /tmp/deis-backup-drill
if ! setuidgid postgres "$bin/initdb" -D /tmp/deis-backup-drill -U postgres -A trust -E UTF8 >/tmp/initdb.log 2>&1; then
  cat /tmp/initdb.log >&2
  exit 1
fi
exec setuidgid postgres "$bin/postgres" -D /tmp/deis-backup-drill -c listen_addresses= \
  -c fsync=off -c full_page_writes=off -c synchronous_commit=off
"#;

/// How long the throwaway database may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Every ordinary table outside the system schemas, named as pg_dump names it, with its rows.
/// `query_to_xml` counts a table whose name is only known at run time (PostgreSQL 8.3+).
const COUNT_SQL: &str = "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
(xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %I.%I', n.nspname, \
c.relname), false, true, '')))[1]::text \
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
AND n.nspname !~ '^pg_' ORDER BY 1";

/// Field separator of psql's unaligned output (a name cannot hold it).
const SEP: &str = "\u{1f}";

/// Held by the throwaway job that runs (a drill or a probe), from before its container is
/// created until it is removed.
static JOBS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The throwaway container of a job, from `database_container`'s image, after removing what
/// earlier jobs left behind.
async fn throwaway(
    engine: &Engine,
    host_id: &str,
    database_container: &str,
    entrypoint: &str,
) -> Result<Throwaway> {
    let image = engine.image_of(database_container).await?;
    let left = engine.remove_labelled(LABEL, host_id).await?;
    if !left.is_empty() {
        tracing::warn!(containers = ?left, "removed drill containers an earlier job left behind");
    }
    Ok(Throwaway {
        name: format!("deis-backup-drill-{:016x}", fastrand::u64(..)),
        image,
        entrypoint: vec!["/bin/sh".into(), "-c".into(), entrypoint.into()],
        user: "0".into(),
        label: (LABEL.into(), host_id.into()),
    })
}

/// The PostgreSQL versions `database_container`'s image holds: `ls /usr/lib/postgresql` in a
/// throwaway container of it.
pub async fn probe(
    engine: &Engine,
    host_id: &str,
    database_container: &str,
) -> Result<ProbeDatabaseImageReply> {
    let image = engine
        .container(database_container)
        .await?
        .ok_or_else(|| Error::NoContainer {
            name: database_container.to_owned(),
        })?
        .image;
    let _job = JOBS.lock().await;
    let t = throwaway(engine, host_id, database_container, "exec sleep 600").await?;
    let listed = async {
        engine.run_throwaway(&t).await?;
        let argv = ["ls", "-1", "/usr/lib/postgresql"].map(String::from);
        let mut exec = engine.exec(&t.name, None, &argv, false).await?;
        let mut out = Tail::new(1 << 16);
        exec.drain(|piece| {
            if let Piece::Stdout(m) = piece {
                out.push(&m);
            }
        })
        .await;
        // A missing directory is an image without PostgreSQL: no versions, not an error.
        engine.exit_code(&exec.id, &exec.container).await?;
        Ok::<_, Error>(out.text())
    }
    .await;
    let removed = engine.remove(&t.name).await;
    let listed = listed?;
    removed?;
    let mut postgres_versions: Vec<String> = listed
        .lines()
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .map(str::to_owned)
        .collect();
    postgres_versions.sort();
    Ok(ProbeDatabaseImageReply {
        image,
        postgres_versions,
    })
}

/// Runs a drill of the SQL arriving on `data` (checked against `expected_sha`) in a throwaway
/// container of `database_container`'s image.
#[allow(clippy::too_many_arguments)]
pub async fn drill(
    engine: &Engine,
    host_id: &str,
    database_container: &str,
    policy: &DatabaseRestorePolicy,
    window_log: u32,
    expected_sha: [u8; 32],
    data: mpsc::Receiver<Bytes>,
    broken: Arc<AtomicBool>,
) -> Result<DrillDatabaseReply> {
    let start = Instant::now();
    let _job = JOBS.lock().await;
    let t = throwaway(engine, host_id, database_container, SCRIPT).await?;
    tracing::info!(container = %t.name, "drill: throwaway database starts");
    let outcome = async {
        engine.run_throwaway(&t).await?;
        wait_ready(engine, &t.name).await?;
        let loaded = database::restore(
            engine,
            &t.name,
            policy,
            window_log,
            expected_sha,
            data,
            broken,
        )
        .await?;
        let version = query(engine, &t.name, "postgres", "SHOW server_version_num").await?;
        let mut tables = Vec::new();
        let databases = query(
            engine,
            &t.name,
            "postgres",
            "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1",
        )
        .await?;
        for db in databases.lines().filter(|l| !l.is_empty()) {
            for line in query(engine, &t.name, db, COUNT_SQL).await?.lines() {
                if let Some((table, rows)) = line.split_once(SEP) {
                    tables.push(TableRows {
                        database: db.to_owned(),
                        table: table.to_owned(),
                        rows: rows.trim().parse().unwrap_or(0),
                    });
                }
            }
        }
        Ok::<_, Error>(DrillDatabaseReply {
            server_version_num: version.trim().parse().unwrap_or(0),
            raw_bytes: loaded.raw_bytes,
            duration_ms: 0,
            tables,
        })
    }
    .await;
    let removed = engine.remove(&t.name).await;
    let mut reply = outcome?;
    removed?;
    reply.duration_ms = deis_backup_proto::duration_ms(start.elapsed());
    tracing::info!(
        tables = reply.tables.len(),
        ms = reply.duration_ms,
        "drill: loaded, counted, container removed"
    );
    Ok(reply)
}

/// Waits until the throwaway database accepts connections on its socket.
async fn wait_ready(engine: &Engine, container: &str) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match query(engine, container, "postgres", "SELECT 1").await {
            Ok(_) => return Ok(()),
            Err(e @ (Error::NoContainer { .. } | Error::NotRunning { .. })) => {
                return Err(Error::CommandFailed {
                    what: "the drill's database".into(),
                    container: container.to_owned(),
                    how: "stopped before it accepted connections".into(),
                    stderr: e.to_string(),
                });
            }
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// `sql` run by psql as `postgres` on database `db` in `container`: its unaligned, tuples-only
/// output.
async fn query(engine: &Engine, container: &str, db: &str, sql: &str) -> Result<String> {
    let argv: Vec<String> = [
        "psql", "-X", "-q", "-A", "-t", "-F", SEP, "-d", db, "-c", sql,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut exec = engine
        .exec(container, Some("postgres"), &argv, false)
        .await?;
    let mut out = Tail::new(1 << 24);
    let mut err = Tail::new(4096);
    exec.drain(|piece| match piece {
        Piece::Stdout(m) => out.push(&m),
        Piece::Stderr(m) => err.push(&m),
    })
    .await;
    let code = engine.exit_code(&exec.id, &exec.container).await?;
    if code != 0 {
        return Err(Error::CommandFailed {
            what: "psql (the drill's counts)".into(),
            container: container.to_owned(),
            how: format!("exited with status {code}"),
            stderr: err.text(),
        });
    }
    Ok(out.text())
}
