//! The database comes back by itself: clusters whose `deis-database` is Deis' own (WAL-E archiving
//! to the cluster's `db_wal` through the gateway, `tests/cluster/target --database-flavour wal-e`),
//! a snapshot of one, and a restore onto a fresh cluster whose database, started after the
//! restore as `deisctl start platform` starts it, restores itself from the restored `db_wal`.
//!
//! Invariants: every test works on target clusters of its own (etcd, gateway tenant, store,
//! database, agent), torn down on drop; the shared source cluster is only read (its gateway and
//! images). The WAL-E facts asserted are the database's own: its log lines, `backup-list`, rows.

use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::gateway::gateway_addr;
use super::gateway::proxy::Proxy;
use super::snapshot::{Fresh, deis_backup, ok, repo_dir, s3_client, snapshot_id, stderr};
use super::support::{AgentContainer, Target, psql, unique};

/// A cluster whose database runs WAL-E, with an agent; `database: false` leaves the database to
/// be started later ([`Target::start_database`]), as on a cluster being restored.
struct WalCluster {
    target: Target,
    agent: AgentContainer,
    database: String,
}

impl WalCluster {
    /// Its gateway tenant gets the registry's bucket (a Deis registry creates it); `db_wal` is the
    /// database's own to create, as on Deis.
    async fn new(prefix: &str, database: bool) -> WalCluster {
        let mut args = vec!["--database-flavour", "wal-e"];
        if !database {
            args.push("--no-database");
        }
        let target = Target::up_with(&unique(prefix), &args);
        let database = format!("deis-database-{}", target.name);
        let agent = AgentContainer::up(
            &format!("{}-agent", target.name),
            target.etcd_endpoints(),
            &target.store_dir(),
            &database,
        );
        let c = WalCluster {
            target,
            agent,
            database,
        };
        c.s3()
            .await
            .create_bucket()
            .bucket("registry")
            .send()
            .await
            .unwrap();
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend([
            "--etcd",
            self.target.etcd_endpoints(),
            "--agent",
            self.agent.spec(),
        ]);
        deis_backup(&self.agent.token_file, &all)
    }

    /// `deis-backup` on the repository alone (verify, show).
    fn repo_cmd(&self, args: &[&str]) -> Output {
        deis_backup(&self.agent.token_file, args)
    }

    fn sql(&self, db: &str, sql: &str) -> String {
        psql(&self.database, db, sql).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `wal-e` run in the database container with its env dir, as Deis runs it.
    fn wal_e(&self, args: &[&str]) -> String {
        let out = Command::new("docker")
            .args(["exec", "-u", "postgres", &self.database])
            .args(["envdir", "/etc/wal-e.d/env", "wal-e"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "wal-e {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The base backups `wal-e backup-list` names, oldest first.
    fn backups(&self) -> Vec<String> {
        self.wal_e(&["--terse", "backup-list"])
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    }

    fn logs(&self) -> String {
        let out = Command::new("docker")
            .args(["logs", &self.database])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    async fn s3(&self) -> aws_sdk_s3::Client {
        let etcd = self.target.etcd();
        let key = async |k: &str| etcd.get(k).await.unwrap().unwrap();
        s3_client(
            &key("/deis/store/gateway/accessKey").await,
            &key("/deis/store/gateway/secretKey").await,
        )
    }
}

/// What a database holds that a restore must give back: its roles and databases, and the rows
/// of the writer's table (count, and an md5 over them in order).
fn contents(c: &WalCluster) -> (String, String, String) {
    (
        c.sql(
            "postgres",
            "SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles \
             WHERE rolname !~ '^pg_'",
        ),
        c.sql(
            "postgres",
            "SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database",
        ),
        c.sql(
            "walapp",
            "SELECT count(*) || ' ' || md5(coalesce(string_agg(n::text, ',' ORDER BY n), '')) \
             FROM ticks",
        ),
    )
}

/// Commits one row at a time into `walapp.ticks` (n = 1, 2, …) until stopped; `committed` is the
/// highest n whose commit returned.
struct Writer {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(database: &str) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let (s, c, db) = (
            Arc::clone(&stop),
            Arc::clone(&committed),
            database.to_owned(),
        );
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::SeqCst) {
                n += 1;
                psql(
                    &db,
                    "walapp",
                    &format!("INSERT INTO ticks (n, pad) VALUES ({n}, repeat('x', 2000))"),
                )
                .unwrap_or_else(|e| panic!("{e}"));
                c.store(n, Ordering::SeqCst);
            }
        });
        Writer {
            stop,
            committed,
            thread: Some(thread),
        }
    }

    fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        self.committed()
    }
}

/// The rows a restored database holds: n = 1..=k with no gap (a consistent prefix of the
/// writer's commits), and no marker row (-1) written after the snapshot.
fn restored_prefix(c: &WalCluster) -> u64 {
    let got = c.sql(
        "walapp",
        "SELECT count(*) || ' ' || coalesce(min(n), 0) || ' ' || coalesce(max(n), 0) FROM ticks",
    );
    let v: Vec<i64> = got.split(' ').map(|x| x.parse().unwrap()).collect();
    assert!(v[1] >= 1, "no writer row restored: {got}");
    assert_eq!(
        v[1], 1,
        "rows do not start at 1 (or the marker is there): {got}"
    );
    assert_eq!(v[0], v[2], "the restored rows have gaps: {got}");
    u64::try_from(v[2]).unwrap()
}

/// Takes `--pre-hook wal-e-backup-push` snapshot of `c` into `repo`: the JSON outcome.
fn snapshot_with_hook(c: &WalCluster, repo: &str) -> Value {
    ok(
        &c.run(&[
            "snapshot",
            "--json",
            "-r",
            repo,
            "--pre-hook",
            "wal-e-backup-push",
        ]),
        "snapshot --pre-hook wal-e-backup-push",
    )
}

/// Restores snapshot `id` of `repo` onto `dst` (no `--database-sql`), starts its database, and
/// checks that it restored itself from the base backup the snapshot recorded.
fn restore_and_start(dst: &mut WalCluster, repo: &str, id: &str, base_backup: &str) -> Value {
    let restored = ok(
        &dst.run(&["restore", id, "--json", "-r", repo]),
        "restore without --database-sql",
    );
    let next = restored["next"].as_str().unwrap();
    assert!(
        next.contains("deisctl start platform") && next.contains(base_backup),
        "the closing message does not tell the operator what comes: {next}"
    );
    assert!(
        next.contains("--pre-hook wal-e-backup-push"),
        "no advice to push a base backup of the new timeline: {next}"
    );
    let started = std::time::Instant::now();
    dst.target.start_database();
    eprintln!(
        "{}: recovered and accepting writes {:.1} s after its start",
        dst.database,
        started.elapsed().as_secs_f64()
    );
    let logs = dst.logs();
    assert!(
        logs.contains("database: restoring from backup..."),
        "the database did not restore from db_wal:\n{logs}"
    );
    assert!(
        logs.contains(&format!("restored from backup {base_backup}")),
        "the database did not recover from {base_backup}:\n{logs}"
    );
    restored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_e_a_restored_db_wal_brings_the_database_back_by_itself_twice() {
    let src = WalCluster::new("walsrc", true).await;
    let initial = src.backups();
    assert_eq!(initial.len(), 1, "a new database pushes one base backup");
    src.sql(
        "postgres",
        "CREATE ROLE walapp LOGIN PASSWORD 'walapp-seed'",
    );
    src.sql("postgres", "CREATE DATABASE walapp OWNER walapp");
    src.sql(
        "walapp",
        "CREATE TABLE ticks (n bigint PRIMARY KEY, pad text, at timestamptz DEFAULT now())",
    );
    std::fs::write(src.target.store_dir().join("marker"), "store file\n").unwrap();

    // Rows committed continuously, before and through the snapshot.
    let writer = Writer::start(&src.database);
    while writer.committed() < 50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before_snapshot = writer.committed();
    let (_d, repo) = repo_dir("e2e-wal-e");
    let repo = repo.display().to_string();
    let snap = snapshot_with_hook(&src, &repo);
    let writes_during = writer.stop() - before_snapshot;
    src.sql("walapp", "INSERT INTO ticks (n) VALUES (-1)"); // the marker: after the snapshot

    // The newest base backup in the snapshot is the one the hook pushed, and its chain is whole.
    let chain = &snap["manifest"]["wal-e"];
    let latest = chain["latest"]["name"].as_str().expect("a WAL-E chain");
    let backups = src.backups();
    assert_eq!(backups.len(), 2, "{backups:?}");
    assert_eq!(latest, backups[1], "not the hook's base backup: {chain}");
    assert_eq!(chain["restorable"], chain["latest"], "{chain}");
    assert_eq!(chain["latest"]["missing"], 0, "{chain}");
    assert!(
        chain["postgres-version"]
            .as_str()
            .is_some_and(|v| v.starts_with("PostgreSQL 13.")),
        "{chain}"
    );
    let id = snapshot_id(&snap);
    let v = ok(
        &src.repo_cmd(&["verify", &id, "--read-data", "--json", "-r", &repo]),
        "verify",
    );
    assert_eq!(v["recovers"], true, "{v}");

    // A fresh cluster, its database not started: restore the buckets and the store, then start it.
    let mut dst = WalCluster::new("waldst", false).await;
    restore_and_start(&mut dst, &repo, &id, latest);
    let k = restored_prefix(&dst);
    assert!(
        k >= before_snapshot,
        "rows committed before the snapshot are missing: {k} < {before_snapshot}"
    );
    eprintln!(
        "restored rows 1..={k}: {before_snapshot} committed before the snapshot, \
         {writes_during} during it"
    );
    let (roles, databases, _) = contents(&src);
    let restored = contents(&dst);
    assert_eq!((&restored.0, &restored.1), (&roles, &databases));
    assert_eq!(
        std::fs::read_to_string(dst.target.store_dir().join("marker")).unwrap(),
        "store file\n"
    );
    // It takes writes on a new timeline.
    dst.sql(
        "walapp",
        &format!("INSERT INTO ticks (n) VALUES ({})", k + 1),
    );

    // deis/postgres#104: a second snapshot of the restored cluster, with a base backup of its own
    // timeline, restores again.
    let snap2 = snapshot_with_hook(&dst, &repo);
    let latest2 = snap2["manifest"]["wal-e"]["latest"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(latest2, latest, "no base backup of the new timeline");
    assert_eq!(snap2["manifest"]["wal-e"]["latest"]["missing"], 0);
    let mut dst2 = WalCluster::new("waldst2", false).await;
    restore_and_start(&mut dst2, &repo, &snapshot_id(&snap2), &latest2);
    assert_eq!(contents(&dst2), contents(&dst));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_e_objects_deleted_by_retain_during_the_mirror_are_listed_as_vanished() {
    let src = WalCluster::new("walret", true).await;
    src.sql("postgres", "CREATE DATABASE walapp");
    src.sql(
        "walapp",
        "CREATE TABLE ticks (n bigint PRIMARY KEY, pad text)",
    );
    for round in 0..2 {
        src.sql(
            "walapp",
            &format!(
                "INSERT INTO ticks SELECT g, repeat('y', 500) FROM generate_series({}, {}) g",
                round * 10_000 + 1,
                round * 10_000 + 10_000
            ),
        );
        // A checkpoint first: backup-push's own is spread over minutes of a busy server.
        src.sql("postgres", "CHECKPOINT");
        src.wal_e(&["backup-push", "/var/lib/postgresql/9.3/main"]);
    }
    let backups = src.backups();
    assert_eq!(backups.len(), 3, "{backups:?}");

    // The snapshot lists the bucket, then its downloads wait at the proxy while
    // `wal-e delete retain 1` (what the database's backup loop runs) deletes the two older base
    // backups and the WAL before the newest.
    let proxy = Proxy::start_gated(gateway_addr()).await;
    let (_d, repo) = repo_dir("e2e-wal-e-retain");
    let repo = repo.display().to_string();
    let child = {
        let mut args = vec![
            "snapshot",
            "--json",
            "--no-database",
            "--no-store",
            "-r",
            &repo,
        ];
        let ep = proxy.endpoint();
        args.extend([
            "--gateway",
            &ep,
            "--etcd",
            src.target.etcd_endpoints(),
            "--agent",
            src.agent.spec(),
        ]);
        super::snapshot::spawn_deis_backup(&src.agent.token_file, &args)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while proxy.counts.held.load(Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no download reached the proxy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed_before = bucket_keys(&src.s3().await, "db_wal").await;
    src.wal_e(&["delete", "--confirm", "retain", "1"]);
    let after = bucket_keys(&src.s3().await, "db_wal").await;
    let deleted: Vec<&String> = listed_before
        .iter()
        .filter(|k| !after.contains(k))
        .collect();
    assert!(!deleted.is_empty(), "retain deleted nothing");
    proxy.open_gate();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let snap = ok(&out, "snapshot during a retain delete");

    let stats = &snap["buckets"]["db_wal"];
    let vanished: Vec<&str> = snap["manifest"]["buckets"]["db_wal"]["vanished"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(!vanished.is_empty(), "nothing recorded as vanished: {snap}");
    assert_eq!(stats["vanished_objects"], vanished.len(), "{stats}");
    for k in &vanished {
        assert!(
            deleted.iter().any(|d| d == k),
            "{k} vanished but was not deleted"
        );
    }
    assert_eq!(
        snap["manifest"]["wal-e"]["latest"]["name"].as_str(),
        Some(backups[2].as_str())
    );
    assert_eq!(snap["manifest"]["wal-e"]["latest"]["missing"], 0);
    let show = src.repo_cmd(&["show", &snapshot_id(&snap), "-r", &repo]);
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(
        shown.contains(&format!("vanished s3://db_wal/{}", vanished[0])),
        "{shown}"
    );
    let v = ok(
        &src.repo_cmd(&["verify", &snapshot_id(&snap), "--json", "-r", &repo]),
        "verify",
    );
    assert_eq!(v["recovers"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_e_the_dump_restores_with_database_sql_into_a_running_database_of_the_image() {
    let src = WalCluster::new("walsql", true).await;
    src.sql(
        "postgres",
        "CREATE ROLE walapp LOGIN PASSWORD 'walapp-seed'",
    );
    src.sql("postgres", "CREATE DATABASE walapp OWNER walapp");
    src.sql(
        "walapp",
        "CREATE TABLE ticks (n bigint PRIMARY KEY, pad text, at timestamptz DEFAULT now()); \
         INSERT INTO ticks (n, pad) SELECT g, md5(g::text) FROM generate_series(1, 5000) g",
    );
    let (_d, repo) = repo_dir("e2e-wal-e-sql");
    let repo = repo.display().to_string();
    let snap = ok(&src.run(&["snapshot", "--json", "-r", &repo]), "snapshot");
    assert!(
        snap["manifest"]["part-info"]["database/pg_dumpall.sql.zst"]["state"]
            .as_str()
            .is_some_and(|s| s.contains("version=13")),
        "the dump does not record PostgreSQL 13: {snap}"
    );

    // A running database of its own (its own db_wal, which the restore leaves alone).
    let dst = WalCluster::new("walsqldst", true).await;
    ok(
        &dst.run(&[
            "restore",
            &snapshot_id(&snap),
            "--json",
            "--database-sql",
            "--no-buckets",
            "-r",
            &repo,
        ]),
        "restore --database-sql",
    );
    assert_eq!(contents(&dst), contents(&src));

    // The drill of the same snapshot: PostgreSQL 13 in a throwaway container of the wal-e image.
    let report = ok(
        &src.run(&["drill", &snapshot_id(&snap), "--json", "-r", &repo]),
        "drill",
    );
    let checks = report["checks"].as_array().unwrap();
    let line = |name: &str| checks.iter().find(|c| c["check"] == name).unwrap();
    assert!(
        line("database")["detail"]
            .as_str()
            .is_some_and(|d| d.contains("deis-database:wal-e") && d.contains("PostgreSQL 13.")),
        "{report}"
    );
    assert_eq!(line("tables")["outcome"], "ok", "{report}");
    assert!(
        line("tables")["detail"]
            .as_str()
            .is_some_and(|d| d.contains("5000 rows")),
        "{report}"
    );
    assert_eq!(line("db_wal")["outcome"], "ok", "{report}");

    // Its db_wal's base backup is PostgreSQL 13: a cluster whose database image holds only 15
    // (the plain flavour), its database stopped, is refused before anything is written.
    let plain = Fresh::new();
    let stopped = Command::new("docker")
        .args(["stop", plain.target.database_container()])
        .output()
        .unwrap();
    assert!(stopped.status.success());
    let out = deis_backup(
        &plain.agent.token_file,
        &[
            "restore",
            &snapshot_id(&snap),
            "--etcd",
            plain.target.etcd_endpoints(),
            "--agent",
            plain.agent.spec(),
            "-r",
            &repo,
        ],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("is PostgreSQL 13, but the database image deis-database:local")
            && err.contains("holds PostgreSQL 15"),
        "{err}"
    );
    assert!(
        plain
            .s3()
            .await
            .head_bucket()
            .bucket("db_wal")
            .send()
            .await
            .is_err(),
        "a bucket was written"
    );
}

#[tokio::test]
async fn wal_e_a_chain_missing_a_segment_is_warned_at_snapshot_and_named_by_verify() {
    let src = Fresh::new();
    let s3 = src.s3().await;
    s3.create_bucket().bucket("db_wal").send().await.unwrap();
    s3.create_bucket().bucket("registry").send().await.unwrap();
    let sentinel = serde_json::json!({
        "wal_segment_backup_stop": "000000010000000000000004",
        "wal_segment_offset_backup_stop": "00000100",
    });
    let objects = [
        (
            "basebackups_005/base_000000010000000000000002_00000028_backup_stop_sentinel.json"
                .to_owned(),
            serde_json::to_vec(&sentinel).unwrap(),
        ),
        (
            "basebackups_005/base_000000010000000000000002_00000028/tar_partitions/part_00000000.tar.lzo"
                .to_owned(),
            vec![7; 4096],
        ),
        ("wal_005/000000010000000000000002.lzo".to_owned(), vec![1; 1024]),
        ("wal_005/000000010000000000000004.lzo".to_owned(), vec![3; 1024]),
    ];
    for (key, body) in objects {
        s3.put_object()
            .bucket("db_wal")
            .key(&key)
            .body(body.into())
            .send()
            .await
            .unwrap();
    }
    let (_d, repo) = repo_dir("e2e-wal-e-gap");
    let r = repo.display().to_string();
    let out = deis_backup(
        &src.agent.token_file,
        &[
            "snapshot",
            "--json",
            "--etcd",
            src.target.etcd_endpoints(),
            "--agent",
            src.agent.spec(),
            "-r",
            &r,
        ],
    );
    let snap = ok(&out, "snapshot of a db_wal with a gap");
    let err = stderr(&out);
    assert!(
        err.to_lowercase().contains("warn")
            && err.contains("lacks WAL segment 000000010000000000000003"),
        "no loud warning: {err}"
    );
    assert!(snap["manifest"]["wal-e"]["restorable"].is_null(), "{snap}");

    let id = snapshot_id(&snap);
    let out = deis_backup(
        &src.agent.token_file,
        &["verify", &id, "--read-data", "-r", &r],
    );
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("WAL segment 000000010000000000000003") && said.contains("--database-sql"),
        "{said}"
    );
}

/// The keys of a bucket.
async fn bucket_keys(s3: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut marker = None;
    loop {
        let page = s3
            .list_objects()
            .bucket(bucket)
            .set_marker(marker.clone())
            .send()
            .await
            .unwrap();
        keys.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
        if page.is_truncated() == Some(true) {
            marker = keys.last().cloned();
        } else {
            return keys;
        }
    }
}
