//! The product end to end: `deis-backup` (the binary) with agents running as their container
//! image, snapshotting the local cluster into a repository and restoring onto a fresh target
//! cluster (own etcd and gateway keys, empty buckets, empty store directory, empty database).
//!
//! Invariants: every test writes into its own repository and target; the source cluster is only
//! read. Tests that take the source cluster's lock run one at a time (a process-wide mutex, and
//! the `cluster-lock` group in `.config/nextest.toml`), since the lock is cluster-wide by design.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{Mutex, MutexGuard};

use super::support::{self, AgentContainer, Cluster, Target, unique};

/// Serialises the tests that take the source cluster's lock (within one test process).
pub(super) async fn cluster_lock() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::const_new(());
    M.lock().await
}

/// `deis-backup` with these arguments, the agents' token and the coordinator's certificate.
pub(super) fn command(token: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(support::binary("deis-backup"));
    c.args(args)
        .env("DEIS_BACKUP_TOKEN_FILE", token)
        .env_remove("DEIS_BACKUP_TOKEN");
    support::coordinator_tls_env(&mut c, token);
    c
}

/// Runs `deis-backup` to completion.
pub(super) fn deis_backup(token: &Path, args: &[&str]) -> Output {
    command(token, args).output().expect("deis-backup runs")
}

/// Starts `deis-backup` in the background, its output captured.
pub(super) fn spawn_deis_backup(token: &Path, args: &[&str]) -> std::process::Child {
    command(token, args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("deis-backup starts")
}

/// Neither bucket exists on the target: nothing was restored into it.
async fn assert_no_buckets(s3: &aws_sdk_s3::Client) {
    for bucket in ["db_wal", "registry"] {
        assert!(
            bucket_contents(s3, bucket).await.is_none(),
            "{bucket} was created"
        );
    }
}

pub(super) fn ok(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

pub(super) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The source side: the shared cluster plus an agent container serving its store and database.
struct Source {
    cluster: &'static Cluster,
    agent: AgentContainer,
}

impl Source {
    fn new() -> Source {
        let cluster = Cluster::get();
        let agent = AgentContainer::up(
            &unique("src"),
            cluster.etcd_endpoints(),
            &cluster.store_dir(),
            cluster.database_container(),
        );
        Source { cluster, agent }
    }

    fn snapshot(&self, repo: &Path, extra: &[&str]) -> Output {
        self.snapshot_command(repo, extra)
            .output()
            .expect("deis-backup runs")
    }

    fn snapshot_command(&self, repo: &Path, extra: &[&str]) -> Command {
        let repo = repo.display().to_string();
        let mut args = vec![
            "snapshot",
            "--json",
            "--etcd",
            self.cluster.etcd_endpoints(),
            "--agent",
            self.agent.spec(),
            "-r",
            &repo,
        ];
        args.extend_from_slice(extra);
        command(&self.agent.token_file, &args)
    }
}

/// A target cluster with its agent.
pub(super) struct Fresh {
    pub(super) target: Target,
    pub(super) agent: AgentContainer,
}

impl Fresh {
    pub(super) fn new() -> Fresh {
        let target = Target::up(&unique("t"));
        let agent = AgentContainer::up(
            &format!("{}-agent", target.name),
            target.etcd_endpoints(),
            &target.store_dir(),
            target.database_container(),
        );
        Fresh { target, agent }
    }

    /// `snapshot --json --no-buckets` of this cluster (a fresh tenant has no buckets).
    pub(super) fn snapshot(&self, repo: &Path, extra: &[&str]) -> Output {
        deis_backup(&self.agent.token_file, &self.snapshot_args(repo, extra))
    }

    fn snapshot_args<'a>(&'a self, repo: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "snapshot",
            "--json",
            "--no-buckets",
            "--etcd",
            self.target.etcd_endpoints(),
            "--agent",
            self.agent.spec(),
            "-r",
            repo.to_str().expect("a UTF-8 repository path"),
        ];
        args.extend_from_slice(extra);
        args
    }

    pub(super) fn restore(&self, repo: &Path, id: &str, extra: &[&str]) -> Output {
        let repo = repo.display().to_string();
        let mut args = vec![
            "restore",
            id,
            "--json",
            "--etcd",
            self.target.etcd_endpoints(),
            "--agent",
            self.agent.spec(),
            "-r",
            &repo,
        ];
        args.extend_from_slice(extra);
        deis_backup(&self.agent.token_file, &args)
    }

    pub(super) async fn s3(&self) -> aws_sdk_s3::Client {
        let etcd = self.target.etcd();
        let access = etcd
            .get("/deis/store/gateway/accessKey")
            .await
            .unwrap()
            .unwrap();
        let secret = etcd
            .get("/deis/store/gateway/secretKey")
            .await
            .unwrap()
            .unwrap();
        s3_client(&access, &secret)
    }
}

pub(super) fn s3_client(access: &str, secret: &str) -> aws_sdk_s3::Client {
    let creds = aws_sdk_s3::config::Credentials::new(access, secret, None, None, "etcd");
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(Cluster::get().gateway_endpoint())
        .force_path_style(true)
        .credentials_provider(creds)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// Every object of a bucket: key -> (sha256, content type, metadata), or `None` if the bucket is
/// absent.
async fn bucket_contents(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
) -> Option<BTreeMap<String, (String, Option<String>, BTreeMap<String, String>)>> {
    use sha2::Digest as _;
    let mut keys = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let page = match s3
            .list_objects()
            .bucket(bucket)
            .set_marker(marker.clone())
            .send()
            .await
        {
            Ok(p) => p,
            Err(e) if format!("{e:?}").contains("NoSuchBucket") => return None,
            Err(e) => panic!("listing {bucket}: {e:?}"),
        };
        keys.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
        if page.is_truncated() == Some(true) {
            marker = keys.last().cloned();
        } else {
            break;
        }
    }
    let mut out = BTreeMap::new();
    for k in keys {
        let o = s3.get_object().bucket(bucket).key(&k).send().await.unwrap();
        let ct = o.content_type().map(str::to_owned);
        let meta: BTreeMap<String, String> = o
            .metadata()
            .map(|m| m.iter().map(|(a, b)| (a.clone(), b.clone())).collect())
            .unwrap_or_default();
        let body = o.body.collect().await.unwrap().into_bytes();
        out.insert(k, (hex::encode(sha2::Sha256::digest(&body)), ct, meta));
    }
    Some(out)
}

/// The comparable lines of a `pg_dumpall`, minus the superuser's password line (a restored dump
/// sets the source's) and blank lines. The source's PostgreSQL 13 and a plain target's 15 write the
/// same dump but for the locale provider 15 names in `CREATE DATABASE`.
fn comparable_dump(container: &str) -> Vec<String> {
    support::comparable_dump(&support::pg_dumpall(container))
        .into_iter()
        .filter(|l| !(l.starts_with("ALTER ROLE postgres WITH") || l.trim().is_empty()))
        .map(|l| l.replace(" LOCALE_PROVIDER = libc", ""))
        .collect()
}

/// The databases the cluster's seed fills (`DATABASE_SEEDED_DBS` in tests/cluster/database.sh).
const SEEDED_DATABASES: [&str; 3] = ["deis", "registry_meta", "wal_test"];

/// The user tables of database `db` in `container`, schema-qualified and quoted, in order.
fn user_tables(container: &str, db: &str) -> Vec<String> {
    let sql = "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables \
               WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1";
    support::psql(container, db, sql)
        .unwrap_or_else(|e| panic!("{container}/{db}: {e}"))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The contents of the seeded databases in `container`, read with `tables` of each (the source's
/// list, so a table missing from a restore is an error, not a row left out): `db/table` ->
/// "<row count> <md5 of every row as text, in order>", and `db/large objects` -> the same over the
/// large objects' bytes. Any failing query fails the test.
fn row_digests(container: &str, tables: &BTreeMap<&str, Vec<String>>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (db, tables) in tables {
        let mut query = |what: String, sql: String| {
            let got = support::psql(container, db, &sql)
                .unwrap_or_else(|e| panic!("{container}/{db}/{what}: {e}"));
            out.insert(format!("{db}/{what}"), got);
        };
        for t in tables {
            query(
                t.clone(),
                format!(
                    "SELECT count(*) || ' ' || coalesce(md5(string_agg(r::text, E'\\n' \
                     ORDER BY r::text)), '-') FROM {t} AS r"
                ),
            );
        }
        query(
            "large objects".into(),
            "SELECT count(*) || ' ' || coalesce(md5(string_agg(oid::text || ':' || \
             md5(lo_get(oid)), ',' ORDER BY oid)), '-') FROM pg_largeobject_metadata"
                .into(),
        );
    }
    out
}

pub(super) fn snapshot_id(v: &Value) -> String {
    v["manifest"]["id"]
        .as_str()
        .expect("snapshot id")
        .to_owned()
}

pub(super) fn list_ids(token: &Path, repo: &Path) -> (Vec<String>, Vec<String>) {
    let r = repo.display().to_string();
    let v = ok(&deis_backup(token, &["list", "--json", "-r", &r]), "list");
    let ids = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|s| {
                s.get("id")
                    .and_then(Value::as_str)
                    .or_else(|| s.as_str())
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    (ids("snapshots"), ids("incomplete"))
}

/// A new plain repository (`deis-backup init --plain`) in a temporary directory.
pub(super) fn repo_dir(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix(name).tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_plain(&repo);
    (dir, repo)
}

/// `deis-backup init --plain -r REPO`.
pub(super) fn init_plain(repo: &Path) {
    let out = Command::new(support::binary("deis-backup"))
        .args(["init", "--plain", "-r"])
        .arg(repo)
        .output()
        .expect("deis-backup runs");
    assert!(out.status.success(), "init: {}", stderr(&out));
}

#[tokio::test]
async fn snapshot_then_restore_onto_a_fresh_cluster_gives_back_every_object_file_and_row() {
    let _g = cluster_lock().await;
    let source = Source::new();
    let (_d, repo) = repo_dir("e2e-restore");
    // db_wal is the live database's WAL-E archive: it may gain segments while this runs.
    let src_s3 = Cluster::get().s3().await;
    let mut listed_before = BTreeMap::new();
    for bucket in ["db_wal", "registry"] {
        listed_before.insert(bucket, bucket_contents(&src_s3, bucket).await.unwrap());
    }

    let snap = ok(&source.snapshot(&repo, &[]), "snapshot");
    // Its chain is the database's own: PostgreSQL 13, restorable.
    let chain = &snap["manifest"]["wal-e"];
    assert_eq!(chain["bucket"], "db_wal", "{chain}");
    assert!(
        chain["postgres-version"]
            .as_str()
            .is_some_and(|v| v.starts_with("PostgreSQL 13.")),
        "{chain}"
    );
    assert!(chain["restorable"].is_object(), "{chain}");
    let id = snapshot_id(&snap);
    let r = repo.display().to_string();
    let verify = |args: &[&str]| -> serde_json::Value {
        let all = [&["verify", &id, "--json", "-r", &r], args].concat();
        ok(&deis_backup(&source.agent.token_file, &all), "verify")
    };
    let whole = verify(&["--read-data"]);
    assert!(whole["blobs_read"].as_u64().unwrap() > 0, "{whole}");
    // Two halves read every blob once between them, and check every size each.
    let halves = [
        verify(&["--read-data-subset", "1/2"]),
        verify(&["--read-data-subset", "2/2"]),
    ];
    for field in ["blobs_read", "bytes_read"] {
        let sum: u64 = halves.iter().map(|h| h[field].as_u64().unwrap()).sum();
        assert_eq!(sum, whole[field].as_u64().unwrap(), "{field}: {halves:?}");
    }
    for h in &halves {
        assert_eq!(h["blobs_checked"], whole["blobs_checked"], "{h}");
        assert!(h["problems"].as_array().unwrap().is_empty(), "{h}");
    }

    let fresh = Fresh::new();
    let target_etcd = fresh.target.etcd();
    let kept_keys = [
        "/deis/platform/domain",
        "/deis/store/gateway/accessKey",
        "/deis/database/initId",
    ];
    let mut before = Vec::new();
    for k in kept_keys {
        before.push(target_etcd.get(k).await.unwrap());
    }
    let restored = ok(
        &fresh.restore(&repo, &id, &["--database-sql", "--etcd-keys"]),
        "restore",
    );
    assert_eq!(
        restored["next"]
            .as_str()
            .map(|s| s.starts_with("deisctl start platform")),
        Some(true)
    );

    // etcd: the platform's keys came back; the new cluster's own (ephemeral, cluster-specific) stayed.
    let source_etcd = Cluster::get().etcd();
    for k in ["/deis/controller/registrationMode", "/deis/router/bodySize"] {
        assert_eq!(
            target_etcd.get(k).await.unwrap(),
            source_etcd.get(k).await.unwrap(),
            "{k} was not restored"
        );
    }
    for (k, was) in kept_keys.iter().zip(before) {
        assert_eq!(
            target_etcd.get(k).await.unwrap(),
            was,
            "{k} was overwritten"
        );
    }

    // Buckets: every object with its bytes, content type and metadata; every object listed before
    // the snapshot, and none the source does not hold.
    let dst_s3 = fresh.s3().await;
    for (bucket, before) in &listed_before {
        let now = bucket_contents(&src_s3, bucket).await.unwrap();
        let got = bucket_contents(&dst_s3, bucket)
            .await
            .expect("bucket restored");
        for (key, want) in before {
            assert_eq!(got.get(key), Some(want), "{bucket}/{key} after restore");
        }
        for (key, was) in &got {
            assert_eq!(
                now.get(key),
                Some(was),
                "{bucket}/{key} restored, not at the source"
            );
        }
    }

    // Store: every file, owner, mode, mtime and link, except the live logs' growing tails.
    let live = ["logs/deis-controller.log", "logs/myapp.log"];
    let src_tree = support::tree(&Cluster::get().store_dir());
    let dst_tree = support::tree(&fresh.target.store_dir());
    assert_eq!(
        src_tree.keys().collect::<Vec<_>>(),
        dst_tree.keys().collect::<Vec<_>>(),
        "the restored store holds other paths"
    );
    for (path, want) in &src_tree {
        let got = &dst_tree[path];
        if live.iter().any(|l| path == Path::new(l)) {
            assert_eq!(
                (got.uid, got.gid, got.mode),
                (want.uid, want.gid, want.mode),
                "{path:?}"
            );
        } else {
            assert_eq!(got, want, "{path:?} differs after restore");
        }
    }

    // Database: every row of every seeded table, counted and digested in the source and in the
    // restored database with the same queries; then the whole dump (roles, schema, comments).
    let source_db = Cluster::get().database_container();
    let tables: BTreeMap<&str, Vec<String>> = SEEDED_DATABASES
        .into_iter()
        .map(|db| (db, user_tables(source_db, db)))
        .collect();
    for (db, restored) in
        SEEDED_DATABASES.map(|db| (db, user_tables(fresh.target.database_container(), db)))
    {
        assert_eq!(restored, tables[db], "the restored {db} holds other tables");
    }
    let want_rows = row_digests(source_db, &tables);
    for (table, min_rows) in [
        ("deis/public.auth_user", 2),
        ("deis/public.api_config", 1),
        ("registry_meta/meta.tags", 12),
        ("wal_test/public.bulk", 20_001),
        ("wal_test/large objects", 3),
    ] {
        let rows: u64 = want_rows
            .get(table)
            .and_then(|d| d.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("the source has no seeded {table}: {want_rows:?}"));
        assert!(rows >= min_rows, "the source's {table} has {rows} rows");
    }
    let got_rows = row_digests(fresh.target.database_container(), &tables);
    assert_eq!(got_rows, want_rows, "the restored rows differ");

    let want = comparable_dump(source_db);
    let got = comparable_dump(fresh.target.database_container());
    assert_eq!(got, want, "the restored database differs");
}

#[tokio::test]
async fn a_second_snapshot_downloads_no_object_it_already_holds() {
    let _g = cluster_lock().await;
    let source = Source::new();
    let (_d, repo) = repo_dir("e2e-reuse");
    let first = ok(&source.snapshot(&repo, &[]), "first snapshot");
    let second = ok(&source.snapshot(&repo, &[]), "second snapshot");
    for bucket in ["db_wal", "registry"] {
        let a = &first["buckets"][bucket];
        let b = &second["buckets"][bucket];
        let n = |v: &Value, f: &str| v[f].as_u64().unwrap();
        assert!(n(a, "downloaded_objects") > 0, "{bucket}: {a}");
        // Every object of the first is reused. Only db_wal may have grown in between (the
        // database archives a segment after writes), and then only by new objects.
        assert_eq!(n(b, "unchanged_objects"), n(a, "objects"), "{bucket}: {b}");
        assert_eq!(
            n(b, "downloaded_objects"),
            n(b, "objects") - n(a, "objects"),
            "{bucket}: {b}"
        );
        if bucket == "registry" {
            assert_eq!(n(b, "downloaded_bytes"), 0, "{bucket}: {b}");
        }
    }
    assert_ne!(snapshot_id(&first), snapshot_id(&second));
    assert_eq!(list_ids(&source.agent.token_file, &repo).0.len(), 2);
}

/// The built-in pre-hook `wal-e-backup-push`, in a test cluster's own database container, made a
/// gate: a snapshot run with that pre-hook takes the cluster lock, calls the hook and waits in it
/// until the test opens the gate. The gate opens on drop too, so a failing test leaves no run
/// waiting. (The hook runs `envdir /etc/wal-e.d/env wal-e ...`; the container has envdir, and gets
/// this `wal-e`.)
struct HookGate {
    container: String,
}

impl HookGate {
    const HOOK: &str = "wal-e-backup-push";
    const DIR: &str = "/tmp/deis-backup-gate";

    fn install(container: &str) -> HookGate {
        let d = Self::DIR;
        let script = format!(
            "set -e; mkdir -p /etc/wal-e.d/env {d}; chmod 777 {d}; rm -f {d}/entered {d}/open; \
             printf '#!/bin/sh\\ntouch {d}/entered\\nuntil [ -e {d}/open ]; do sleep 0.05; done\\n' \
             >/usr/local/bin/wal-e; chmod 755 /usr/local/bin/wal-e"
        );
        let gate = HookGate {
            container: container.to_owned(),
        };
        assert!(gate.sh(&script), "cannot install the gate in {container}");
        gate
    }

    /// Runs `script` as root in the container; whether it exited 0.
    fn sh(&self, script: &str) -> bool {
        Command::new("docker")
            .args(["exec", "-u", "root", &self.container, "sh", "-c", script])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Whether a run waits in the hook (it is called only under the cluster lock).
    fn entered(&self) -> bool {
        self.sh(&format!("test -e {}/entered", Self::DIR))
    }

    fn open(&self) {
        self.sh(&format!("touch {}/open", Self::DIR));
    }
}

impl Drop for HookGate {
    fn drop(&mut self) {
        self.open();
    }
}

/// A snapshot of a test cluster of its own, waiting in its pre-hook: it holds the cluster lock
/// (and its repository's lease) until `finish`, however fast the machine is.
struct HeldSnapshot {
    child: std::process::Child,
    gate: HookGate,
}

impl HeldSnapshot {
    /// Starts the run and returns once it waits in the hook.
    async fn start(src: &Fresh, repo: &Path) -> HeldSnapshot {
        let gate = HookGate::install(src.target.database_container());
        let mut child = spawn_deis_backup(
            &src.agent.token_file,
            &src.snapshot_args(repo, &["--pre-hook", HookGate::HOOK]),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while !gate.entered() {
            if let Some(status) = child.try_wait().unwrap() {
                let out = child.wait_with_output().unwrap();
                panic!("the held snapshot ended ({status}): {}", stderr(&out));
            }
            assert!(
                Instant::now() < deadline,
                "the snapshot never reached its pre-hook"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        HeldSnapshot { child, gate }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets the run go on and waits for its end.
    fn finish(self) -> Output {
        self.gate.open();
        self.child.wait_with_output().unwrap()
    }
}

#[tokio::test]
async fn two_snapshots_at_once_one_is_refused_with_the_holder() {
    let _g = cluster_lock().await;
    // A cluster of its own: its database container gets the gate.
    let src = Fresh::new();
    let (_d, repo_a) = repo_dir("e2e-lock-a");
    let (_e, repo_b) = repo_dir("e2e-lock-b");
    // The first run holds the lock, waiting in its pre-hook, until the second has been refused.
    let first = HeldSnapshot::start(&src, &repo_a).await;
    let holder = first.pid();
    let lost = src.snapshot(&repo_b, &[]);
    let won = first.finish();
    ok(&won, "the first snapshot");
    let etcd = src.target.etcd();
    assert_eq!(lost.status.code(), Some(4), "{}", stderr(&lost));
    let msg = stderr(&lost);
    assert!(
        msg.contains("holds the cluster lock")
            && msg.contains(&format!("snapshot by pid {holder} ")),
        "{msg}"
    );
    assert_eq!(msg.trim().lines().count(), 1, "not one line: {msg}");
    for written in ["snapshots", "runs", "blobs"] {
        assert!(
            !repo_b.join(written).exists(),
            "the refused snapshot wrote {written} into its repository"
        );
    }
    assert!(
        etcd.get("/deis/backup/lock").await.unwrap().is_none(),
        "the lock was not released"
    );
}

#[tokio::test]
async fn restore_is_refused_while_a_platform_container_runs_and_writes_nothing() {
    let _g = cluster_lock().await;
    let source = Source::new();
    let (_d, repo) = repo_dir("e2e-refuse");
    let id = snapshot_id(&ok(&source.snapshot(&repo, &[]), "snapshot"));
    let fresh = Fresh::new();
    // The target's database container runs: the store components only must be up.
    let out = fresh.restore(&repo, &id, &[]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let msg = stderr(&out);
    assert!(
        msg.contains(fresh.target.database_container()) && msg.contains("nothing was written"),
        "{msg}"
    );
    let s3 = fresh.s3().await;
    assert_no_buckets(&s3).await;
    assert_eq!(
        std::fs::read_dir(fresh.target.store_dir()).unwrap().count(),
        0
    );

    // With the database allowed (--database-sql), a non-empty store directory still refuses.
    std::fs::write(fresh.target.store_dir().join("left-over"), b"x").unwrap();
    let out = fresh.restore(&repo, &id, &["--database-sql"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not empty"), "{}", stderr(&out));
    assert_no_buckets(&s3).await;
}

#[tokio::test]
async fn a_corrupted_part_fails_verify_and_restore_before_anything_is_written() {
    let _g = cluster_lock().await;
    let source = Source::new();
    let (_d, repo) = repo_dir("e2e-corrupt");
    let snap = ok(&source.snapshot(&repo, &["--no-buckets"]), "snapshot");
    let id = snapshot_id(&snap);
    // Flip one byte in the database dump's blob.
    let sha = snap["manifest"]["parts"]["database/pg_dumpall.sql.zst"]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let blob = repo.join("blobs/sha256").join(&sha[..2]).join(&sha);
    let mut bytes = std::fs::read(&blob).unwrap_or_else(|e| panic!("{}: {e}", blob.display()));
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&blob, &bytes).unwrap();

    let r = repo.display().to_string();
    let sizes = deis_backup(&source.agent.token_file, &["verify", &id, "-r", &r]);
    assert!(
        sizes.status.success(),
        "sizes are intact: {}",
        stderr(&sizes)
    );
    let deep = deis_backup(
        &source.agent.token_file,
        &["verify", &id, "--read-data", "-r", &r],
    );
    assert_eq!(deep.status.code(), Some(3), "{}", stderr(&deep));
    assert!(String::from_utf8_lossy(&deep.stdout).contains("database/pg_dumpall.sql.zst"));

    let fresh = Fresh::new();
    let out = fresh.restore(&repo, &id, &["--database-sql"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("damaged"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_dir(fresh.target.store_dir()).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn an_agent_killed_mid_snapshot_leaves_no_complete_snapshot() {
    let _g = cluster_lock().await;
    let cluster = Cluster::get();
    // A store big enough that its archive is still streaming when the agent dies.
    let big = tempfile::Builder::new()
        .prefix("e2e-big-store")
        .tempdir()
        .unwrap();
    for i in 0..6 {
        let data: Vec<u8> = (0..48u32 << 20)
            .map(|j| (j.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0] ^ i)
            .collect();
        std::fs::write(big.path().join(format!("blob-{i}")), data).unwrap();
    }
    let agent = AgentContainer::up(
        &unique("victim"),
        cluster.etcd_endpoints(),
        big.path(),
        cluster.database_container(),
    );
    let (_d, repo) = repo_dir("e2e-kill");
    let r = repo.display().to_string();
    let child = spawn_deis_backup(
        &agent.token_file,
        &[
            "snapshot",
            "--no-buckets",
            "--etcd",
            cluster.etcd_endpoints(),
            "--agent",
            agent.spec(),
            "-r",
            &r,
            "--zstd-level",
            "3",
        ],
    );
    // Wait until data flows into the repository's staging area, then kill the agent's container.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let staged = std::fs::read_dir(repo.join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.file_name().to_string_lossy().starts_with(".blob-")
                    && e.metadata().is_ok_and(|m| m.len() > 0)
            });
        if staged {
            break;
        }
        assert!(Instant::now() < deadline, "no data reached the repository");
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = Command::new("docker")
        .args(["kill", &agent.container()])
        .output()
        .unwrap();
    assert!(kill.status.success());
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the snapshot succeeded without its agent"
    );
    assert!(
        stderr(&out).contains("part "),
        "the error names no part: {}",
        stderr(&out)
    );
    let (complete, _) = list_ids(&agent.token_file, &repo);
    assert!(
        complete.is_empty(),
        "a snapshot is listed as complete: {complete:?}"
    );
}

#[tokio::test]
async fn prune_keeps_what_the_policy_says_and_what_is_left_verifies() {
    let _g = cluster_lock().await;
    let source = Source::new();
    let (_d, repo) = repo_dir("e2e-prune");
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(snapshot_id(&ok(
            &source.snapshot(&repo, &["--no-buckets"]),
            "snapshot",
        )));
    }
    let r = repo.display().to_string();
    let blobs = || walk_files(&repo.join("blobs"));
    let before = blobs();
    let dry = ok(
        &deis_backup(
            &source.agent.token_file,
            &[
                "prune",
                "--keep-last",
                "2",
                "--dry-run",
                "--json",
                "--etcd",
                Cluster::get().etcd_endpoints(),
                "-r",
                &r,
            ],
        ),
        "prune --dry-run",
    );
    assert_eq!(blobs(), before, "a dry run deleted blobs");
    let pruned = ok(
        &deis_backup(
            &source.agent.token_file,
            &[
                "prune",
                "--keep-last",
                "2",
                "--json",
                "--etcd",
                Cluster::get().etcd_endpoints(),
                "-r",
                &r,
            ],
        ),
        "prune",
    );
    assert_eq!(dry["blobs_deleted"], pruned["blobs_deleted"]);
    let (left, _) = list_ids(&source.agent.token_file, &repo);
    assert_eq!(left, ids[1..].to_vec(), "prune kept other snapshots");
    assert!(pruned["blobs_deleted"].as_u64().unwrap() >= 1, "{pruned}");
    assert!(blobs().len() < before.len());
    for id in &left {
        ok(
            &deis_backup(
                &source.agent.token_file,
                &["verify", id, "--read-data", "-r", &r],
            ),
            "verify after prune",
        );
    }
}

/// Runs `c` to completion with its stdout on `stdout`, its stderr captured.
fn with_stdout(c: &mut Command, stdout: impl Into<std::process::Stdio>) -> Output {
    c.stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("deis-backup starts")
        .wait_with_output()
        .unwrap()
}

#[tokio::test]
async fn a_reader_gone_from_stdout_ends_the_printing_not_the_snapshot() {
    let _g = cluster_lock().await;
    let source = Source::new();
    let (_d, repo) = repo_dir("e2e-closed-stdout");
    // A pipe whose reader is gone before the command starts: every write to stdout fails with
    // EPIPE, as `deis-backup … | head` gives once head has its lines.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = with_stdout(
        &mut source.snapshot_command(&repo, &["--no-buckets"]),
        writer,
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{}: {err}", out.status);
    assert!(!err.contains("panicked"), "{err}");
    let (complete, incomplete) = list_ids(&source.agent.token_file, &repo);
    assert_eq!((complete.len(), incomplete.len()), (1, 0), "{err}");
    ok(
        &deis_backup(
            &source.agent.token_file,
            &["verify", &complete[0], "-r", repo.to_str().unwrap()],
        ),
        "verify",
    );

    // Any other failure to write stdout is an error, after the command ran.
    let full = with_stdout(
        &mut command(
            &source.agent.token_file,
            &["list", "-r", repo.to_str().unwrap()],
        ),
        std::fs::File::create("/dev/full").unwrap(),
    );
    let err = stderr(&full);
    assert_eq!(full.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("could not be written to stdout") && err.contains("No space left"),
        "{err}"
    );
}

pub(super) fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn the_agent_image_carries_the_coordinator_the_fleet_unit_runs() {
    let source = Source::new();
    let image = Command::new("docker")
        .args([
            "inspect",
            "-f",
            "{{.Config.Image}}",
            &source.agent.container(),
        ])
        .output()
        .unwrap();
    let image = String::from_utf8(image.stdout).unwrap().trim().to_owned();
    assert!(!image.is_empty());
    // The same entrypoint and subcommand as systemd/deis-backup.service.
    let out = Command::new("docker")
        .args([
            "run",
            "--rm",
            "--entrypoint",
            "/usr/bin/deis-backup",
            &image,
            "snapshot",
            "--help",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--pre-hook"));
}

/// A part of a snapshot's manifest as `deis-backup snapshot --json` printed it.
fn part<'a>(snap: &'a Value, name: &str) -> (&'a Value, &'a Value) {
    let m = &snap["manifest"];
    (&m["parts"][name], &m["part-info"][name])
}

#[tokio::test]
async fn unchanged_database_and_store_segments_are_reused_and_changes_taken_again() {
    let _g = cluster_lock().await;
    // A cluster of its own: its database and store change here without disturbing other tests.
    let Fresh { target: src, agent } = Fresh::new();
    let store = src.store_dir();
    for i in 0..3u8 {
        let data: Vec<u8> = (0..9u32 << 20)
            .map(|j| (j.wrapping_mul(2_654_435_761) >> 11).to_le_bytes()[0] ^ i)
            .collect();
        std::fs::write(store.join(format!("slug-{i}.tar.gz")), data).unwrap();
    }
    std::fs::create_dir(store.join("logs")).unwrap();
    for i in 0..400 {
        std::fs::write(
            store.join(format!("logs/app-{i:03}.log")),
            format!("{i} GET /items/{i}\n").repeat(600),
        )
        .unwrap();
    }
    support::psql(
        src.database_container(),
        "postgres",
        "CREATE TABLE items (id int PRIMARY KEY, name text); \
         INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 1000) g;",
    )
    .unwrap();
    support::psql(src.database_container(), "postgres", "CREATE DATABASE deis").unwrap();
    support::psql(
        src.database_container(),
        "deis",
        "CREATE TABLE api_app (id int PRIMARY KEY); INSERT INTO api_app VALUES (1), (2);",
    )
    .unwrap();
    // Entries changed in the last 5 s are not fingerprinted; let the new tree settle.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let (_d, repo) = repo_dir("e2e-incremental");
    let r = repo.display().to_string();
    let snapshot = || {
        ok(
            &deis_backup(
                &agent.token_file,
                &[
                    "snapshot",
                    "--json",
                    "--no-buckets",
                    "--etcd",
                    src.etcd_endpoints(),
                    "--agent",
                    agent.spec(),
                    "-r",
                    &r,
                ],
            ),
            "snapshot",
        )
    };
    let store_part = |snap: &Value| {
        snap["manifest"]["parts"]
            .as_object()
            .unwrap()
            .keys()
            .find(|k| k.starts_with("store/"))
            .unwrap()
            .clone()
    };

    let first = snapshot();
    let id1 = snapshot_id(&first);
    let name = store_part(&first);
    let (db1, db1_info) = part(&first, "database/pg_dumpall.sql.zst");
    let (st1, st1_info) = part(&first, &name);
    assert!(
        db1_info["state"].as_str().unwrap().contains("wal="),
        "{db1_info}"
    );
    assert!(db1_info.get("taken-in").is_none());
    let segs1 = st1["segments"].as_array().unwrap();
    assert!(segs1.len() >= 5, "three big files and the rest: {st1}");
    assert!(
        segs1.iter().all(|s| s["fingerprint"].is_string()),
        "a settled tree is fingerprinted throughout: {st1}"
    );
    assert_eq!(st1_info["segments-reused"], 0);

    // Nothing changed: the dump and every segment are carried over, nothing is read again.
    let second = snapshot();
    let (db2, db2_info) = part(&second, "database/pg_dumpall.sql.zst");
    let (st2, st2_info) = part(&second, &name);
    assert_eq!(db2["sha256"], db1["sha256"]);
    assert_eq!(
        db2_info["taken-in"].as_str(),
        Some(id1.as_str()),
        "{db2_info}"
    );
    assert_eq!(db2_info["state"], db1_info["state"]);
    // The seeded controller's figures, counted when the dump was taken, go with it.
    assert_eq!(
        db1_info["figures"],
        serde_json::json!({"apps": 2}),
        "{db1_info}"
    );
    assert_eq!(db2_info["figures"], db1_info["figures"]);
    assert_eq!(st2["segments"], st1["segments"]);
    assert_eq!(
        st2_info["segments-reused"].as_u64(),
        Some(segs1.len() as u64)
    );

    // A row and a file change: the dump is taken again, and only the changed file's segment (and
    // at most its neighbour) is sent.
    support::psql(
        src.database_container(),
        "postgres",
        "UPDATE items SET name = 'changed after snapshot two' WHERE id = 500;",
    )
    .unwrap();
    std::fs::write(store.join("logs/app-200.log"), "rewritten\n").unwrap();
    let third = snapshot();
    let id3 = snapshot_id(&third);
    let (db3, db3_info) = part(&third, "database/pg_dumpall.sql.zst");
    let (st3, st3_info) = part(&third, &name);
    assert_ne!(db3["sha256"], db1["sha256"]);
    assert!(db3_info.get("taken-in").is_none(), "{db3_info}");
    assert_ne!(db3_info["state"], db1_info["state"]);
    let segs3 = st3["segments"].as_array().unwrap().len() as u64;
    let reused3 = st3_info["segments-reused"].as_u64().unwrap();
    assert!(
        reused3 + 2 >= segs3 && reused3 < segs3,
        "{reused3} of {segs3} reused"
    );
    ok(
        &deis_backup(
            &agent.token_file,
            &["verify", &id3, "--read-data", "-r", &r],
        ),
        "verify",
    );

    // The third snapshot restores to the changed tree and rows: reused and new segments together.
    let fresh = Fresh::new();
    ok(&fresh.restore(&repo, &id3, &["--database-sql"]), "restore");
    assert_eq!(
        support::tree(&fresh.target.store_dir()),
        support::tree(&store),
        "the restored store differs"
    );
    let restored = support::pg_dumpall(fresh.target.database_container());
    assert!(restored.contains("changed after snapshot two"));
    assert_eq!(
        support::comparable_dump(&restored),
        support::comparable_dump(&support::pg_dumpall(src.database_container()))
    );

    // --full takes everything afresh.
    let full = ok(
        &deis_backup(
            &agent.token_file,
            &[
                "snapshot",
                "--json",
                "--no-buckets",
                "--full",
                "--etcd",
                src.etcd_endpoints(),
                "--agent",
                agent.spec(),
                "-r",
                &r,
            ],
        ),
        "full snapshot",
    );
    let (_, full_db) = part(&full, "database/pg_dumpall.sql.zst");
    let (_, full_st) = part(&full, &name);
    assert!(full_db.get("taken-in").is_none());
    assert_eq!(full_st["segments-reused"], 0);
}

/// Starts a snapshot slowed down (bandwidth cap), so that it is still writing blobs a while after
/// it took the cluster lock, and returns once it holds the lock.
async fn slow_snapshot(source: &Source, repo: &Path) -> std::process::Child {
    let r = repo.display().to_string();
    let child = spawn_deis_backup(
        &source.agent.token_file,
        &[
            "snapshot",
            "--json",
            "--etcd",
            source.cluster.etcd_endpoints(),
            "--agent",
            source.agent.spec(),
            "-r",
            &r,
            "--bandwidth-limit",
            "4MiB",
        ],
    );
    let etcd = source.cluster.etcd();
    let deadline = Instant::now() + Duration::from_secs(30);
    while etcd.get("/deis/backup/lock").await.unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the snapshot never took the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
}

fn prune(source: &Source, repo: &Path, keep_last: &str) -> Output {
    let r = repo.display().to_string();
    deis_backup(
        &source.agent.token_file,
        &[
            "prune",
            "--keep-last",
            keep_last,
            "--json",
            "--etcd",
            source.cluster.etcd_endpoints(),
            "-r",
            &r,
        ],
    )
}

#[tokio::test]
async fn fault_a_prune_beside_a_running_snapshot_is_refused_and_deletes_nothing() {
    let _g = cluster_lock().await;
    // A cluster of its own: its database container gets the gate.
    let src = Fresh::new();
    let token = &src.agent.token_file;
    let (_d, repo) = repo_dir("e2e-fault-prune");
    // Two snapshots, so a prune keeping one would delete the first.
    let first = snapshot_id(&ok(&src.snapshot(&repo, &[]), "snapshot"));
    std::fs::write(src.target.store_dir().join("changed"), b"between snapshots").unwrap();
    let second = snapshot_id(&ok(&src.snapshot(&repo, &[]), "snapshot"));
    let running = HeldSnapshot::start(&src, &repo).await;
    let holder = running.pid();
    let before = walk_files(&repo.join("blobs"));
    let r = repo.display().to_string();
    let prune_keeping = |keep_last| {
        deis_backup(
            token,
            &[
                "prune",
                "--keep-last",
                keep_last,
                "--json",
                "--etcd",
                src.target.etcd_endpoints(),
                "-r",
                &r,
            ],
        )
    };
    let refused = prune_keeping("1");
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains(&format!("snapshot by pid {holder} ")),
        "{}",
        stderr(&refused)
    );
    assert_eq!(
        walk_files(&repo.join("blobs")),
        before,
        "the refused prune deleted blobs"
    );
    assert_eq!(
        list_ids(token, &repo).0,
        [first.clone(), second.clone()],
        "the refused prune deleted a snapshot"
    );
    let third = snapshot_id(&ok(&running.finish(), "the running snapshot"));
    assert_eq!(
        list_ids(token, &repo).0,
        [first, second.clone(), third.clone()]
    );
    ok(
        &deis_backup(
            token,
            &["verify", "latest", "--read-data", "--json", "-r", &r],
        ),
        "verify",
    );
    // With the run over, the same prune goes ahead: it was refused for the run, not by itself.
    ok(&prune_keeping("2"), "prune");
    assert_eq!(list_ids(token, &repo).0, [second, third]);
}

#[tokio::test]
async fn fault_a_coordinator_killed_mid_snapshot_leaves_no_complete_snapshot_and_the_next_run_succeeds()
 {
    let _g = cluster_lock().await;
    let source = Source::new();
    let (_d, repo) = repo_dir("e2e-fault-kill");
    let mut running = slow_snapshot(&source, &repo).await;
    // Let it write some blobs, then SIGKILL: no chance to clean up or release the lock.
    let deadline = Instant::now() + Duration::from_secs(60);
    while walk_files(&repo.join("blobs")).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.kill().unwrap();
    running.wait().unwrap();
    let wrote = !walk_files(&repo.join("blobs")).is_empty();
    let listed = repo
        .exists()
        .then(|| list_ids(&source.agent.token_file, &repo));
    // Until the dead run's lock expires, a new run is refused and names the holder.
    let refused = source.snapshot(&repo, &["--no-buckets"]);
    // Wait for the expiry before any assertion, so a failure here cannot leave the cluster
    // locked for the tests after this one.
    let etcd = source.cluster.etcd();
    let deadline = Instant::now() + Duration::from_secs(90);
    while etcd.get("/deis/backup/lock").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the dead run's lock never expired"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        wrote,
        "the killed run wrote no blob: it was not killed mid-snapshot"
    );
    let (ids, incomplete) = listed.expect("the killed run created its repository");
    assert!(
        ids.is_empty(),
        "a killed snapshot is listed as complete: {ids:?}"
    );
    assert!(incomplete.len() <= 1, "{incomplete:?}");
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("expires within"),
        "{}",
        stderr(&refused)
    );

    let id = snapshot_id(&ok(&source.snapshot(&repo, &[]), "the next snapshot"));
    let r = repo.display().to_string();
    ok(
        &deis_backup(
            &source.agent.token_file,
            &["verify", &id, "--read-data", "--json", "-r", &r],
        ),
        "verify",
    );
    // The history: the killed run started and never finished (its lease went at the next start),
    // the next one completed; the refused one never reached the repository.
    let runs = ok(
        &deis_backup(&source.agent.token_file, &["runs", "--json", "-r", &r]),
        "runs",
    );
    let states: Vec<(&str, &str)> = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| {
            (
                run["state"].as_str().unwrap(),
                run["snapshot"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        states,
        [("never-finished", ""), ("complete", id.as_str())],
        "{runs}"
    );
    // The killed run's staging files went at the next start; its snapshot directory goes with
    // the next prune.
    let staged: Vec<_> = std::fs::read_dir(repo.join("tmp")).unwrap().collect();
    assert!(
        staged.is_empty(),
        "debris in the staging directory: {staged:?}"
    );
    // Its repository lease too: its cluster's lock went to the next run, and it fell silent.
    let leases: Vec<_> = std::fs::read_dir(repo.join("leases"))
        .map(Iterator::collect)
        .unwrap_or_default();
    assert!(leases.is_empty(), "a dead run's lease stayed: {leases:?}");
    ok(&prune(&source, &repo, "5"), "prune");
    let (ids, incomplete) = list_ids(&source.agent.token_file, &repo);
    assert_eq!(ids, [id]);
    assert!(incomplete.is_empty(), "{incomplete:?}");
}
