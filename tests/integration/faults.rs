//! Faults injected end to end, against real components: etcd stopped under a running snapshot, a
//! full disk under the repository and under the restore target's store, the gateway going away
//! mid-mirror, a flaky gateway during restore uploads, and tampered manifests.
//!
//! Invariants: every test works on clusters of its own (`Fresh`: a target cluster with its own
//! etcd, gateway tenant, store directory, database and agent) and never stops or locks the shared
//! source cluster's components; every mount, proxy and stopped process is undone by a guard, on
//! failure too. Each failing run must end in one clear line naming the problem, leave nothing
//! that looks complete, and the next run after the fault is gone must succeed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::gateway::gateway_addr;
use super::gateway::proxy::{Behaviour, Proxy};
use super::snapshot::{
    Fresh, command, init_plain, list_ids, ok, repo_dir, snapshot_id, spawn_deis_backup, stderr,
    walk_files,
};
use super::support::{self, AgentContainer, Target, unique};

/// `deis-backup` run to completion off the async workers (proxies run on them meanwhile).
async fn run(token: &Path, args: &[&str]) -> Output {
    let mut c = command(token, args);
    tokio::task::spawn_blocking(move || c.output().expect("deis-backup runs"))
        .await
        .unwrap()
}

/// Waits for a background `deis-backup` off the async workers.
async fn wait(child: Child) -> Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap()
}

/// The run failed with one error line on stderr (the last; warnings and logs may come before it)
/// that contains every one of `words` (case-insensitive), and nothing panicked.
pub(super) fn one_line_error(out: &Output, words: &[&str]) -> String {
    let msg = stderr(out);
    assert!(!out.status.success(), "it succeeded: {msg}");
    assert!(!msg.contains("panicked"), "a panic: {msg}");
    let errors: Vec<&str> = msg
        .lines()
        .filter(|l| l.starts_with("deis-backup: ") && !l.starts_with("deis-backup: warning:"))
        .collect();
    assert_eq!(errors.len(), 1, "not one error line: {msg}");
    assert_eq!(
        Some(errors[0]),
        msg.trim().lines().last(),
        "the error is not last: {msg}"
    );
    let line = errors[0];
    eprintln!("expected error: {line}");
    let lower = line.to_lowercase();
    for w in words {
        assert!(lower.contains(&w.to_lowercase()), "no {w:?} in: {line}");
    }
    line.to_owned()
}

/// `snapshot` of a fresh cluster (its etcd, its agent) into `repo`.
pub(super) fn snapshot_args<'a>(src: &'a Fresh, repo: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "snapshot",
        "--json",
        "--etcd",
        src.target.etcd_endpoints(),
        "--agent",
        src.agent.spec(),
        "-r",
        repo,
    ];
    args.extend_from_slice(extra);
    args
}

fn prune_args<'a>(src: &'a Fresh, repo: &'a str) -> Vec<&'a str> {
    vec![
        "prune",
        "--keep-last",
        "5",
        "--json",
        "--etcd",
        src.target.etcd_endpoints(),
        "-r",
        repo,
    ]
}

/// `len` bytes nothing compresses.
pub(super) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fastrand::Rng::with_seed(seed).fill(&mut v);
    v
}

/// Writes `files` files of `mib` MiB each (incompressible) and a few small ones into `store`.
pub(super) fn fill_store(store: &Path, files: usize, mib: usize) {
    for i in 0..files {
        std::fs::write(
            store.join(format!("slug-{i}.tar.gz")),
            noise(mib << 20, i as u64),
        )
        .unwrap();
    }
    std::fs::create_dir_all(store.join("logs")).unwrap();
    std::fs::write(store.join("logs/app.log"), "GET /\n".repeat(1000)).unwrap();
}

/// Creates `db_wal` and `registry` in the fresh cluster's own gateway tenant and puts `per_bucket`
/// objects of `size` bytes (incompressible) in each; `db_wal`'s first is a WAL-E stop sentinel
/// (a small JSON) of a base backup whose one segment is the second object.
pub(super) async fn seed_buckets(s3: &aws_sdk_s3::Client, per_bucket: usize, size: usize) {
    const SENTINEL: &str =
        "basebackups_005/base_000000010000000000000001_00000028_backup_stop_sentinel.json";
    for (b, bucket) in ["db_wal", "registry"].into_iter().enumerate() {
        s3.create_bucket().bucket(bucket).send().await.unwrap();
        for i in 0..per_bucket {
            let (key, body) = match bucket {
                "db_wal" if i == 0 => (
                    SENTINEL.to_owned(),
                    serde_json::to_vec(&serde_json::json!({
                        "wal_segment_backup_start": "000000010000000000000001",
                        "wal_segment_backup_stop": "000000010000000000000001",
                    }))
                    .unwrap(),
                ),
                "db_wal" => (
                    format!("wal_005/0000000100000000000000{i:02X}.lzo"),
                    noise(size, (b * 1000 + i) as u64),
                ),
                _ => (
                    format!("docker/registry/v2/blobs/layer {i}/data"),
                    noise(size, (b * 1000 + i) as u64),
                ),
            };
            s3.put_object()
                .bucket(bucket)
                .key(&key)
                .body(body.into())
                .send()
                .await
                .unwrap_or_else(|e| panic!("put {bucket}/{key}: {e:?}"));
        }
    }
}

/// Key -> (size, ETag) of every object of a bucket, or `None` when the bucket is absent.
async fn listing(s3: &aws_sdk_s3::Client, bucket: &str) -> Option<BTreeMap<String, (i64, String)>> {
    let mut out = BTreeMap::new();
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
        for o in page.contents() {
            out.insert(
                o.key().unwrap().to_owned(),
                (o.size().unwrap_or(-1), o.e_tag().unwrap_or("").to_owned()),
            );
        }
        if page.is_truncated() == Some(true) {
            marker = out.keys().next_back().cloned();
        } else {
            return Some(out);
        }
    }
}

/// A tmpfs mounted on a directory; unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs on {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    /// Gives the file system `size` in all (its files stay).
    fn resize(&self, size: &str) {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .status();
        }
    }
}

/// A process stopped with SIGSTOP; continued (SIGCONT) on drop.
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Stopped {
        let s = std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(s.success(), "kill -STOP {pid}");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// The pid of a target cluster's etcd, from the PID file `tests/cluster/target` keeps.
fn target_etcd_pid(target: &Target) -> i32 {
    let dir = PathBuf::from(support::Cluster::get().var("CLUSTER_DIR"));
    let f = dir.join(format!("run/target-{}-etcd.pid", target.name));
    let pid: i32 = std::fs::read_to_string(&f)
        .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        .trim()
        .parse()
        .unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.ends_with("etcd"), "pid {pid} is {}", exe.display());
    pid
}

async fn wait_for_lock(etcd: &deis_backup_etcd::Client, present: bool, within: Duration) {
    let deadline = Instant::now() + within;
    while etcd.get("/deis/backup/lock").await.unwrap().is_some() != present {
        assert!(
            Instant::now() < deadline,
            "the lock is still {}",
            if present { "absent" } else { "held" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The snapshot's blobs are intact and it is the only complete one.
async fn assert_only_snapshot(token: &Path, repo: &Path, id: &str) {
    let (ids, _) = list_ids(token, repo);
    assert_eq!(ids, [id], "other complete snapshots");
    let r = repo.display().to_string();
    ok(
        &run(token, &["verify", id, "--read-data", "--json", "-r", &r]).await,
        "verify",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_etcd_stopped_mid_snapshot_stops_it_before_the_manifest_and_no_prune_takes_its_blobs()
{
    let src = Fresh::new();
    let token = src.agent.token_file.clone();
    // 12 x 3 MiB in the cluster's own buckets: at 640 KiB/s the mirror takes ~57 s, longer than
    // the 45 s after which a holder whose refreshes fail stops trusting its lock.
    seed_buckets(&src.s3().await, 6, 3 << 20).await;
    let (_d, repo) = repo_dir("e2e-fault-etcd");
    let r = repo.display().to_string();
    let etcd = src.target.etcd();
    let a = spawn_deis_backup(
        &token,
        &snapshot_args(&src, &r, &["--bandwidth-limit", "640KiB"]),
    );
    wait_for_lock(&etcd, true, Duration::from_secs(30)).await;
    let started = Instant::now();
    // Let the etcd export be taken (it reads etcd once, at the start).
    tokio::time::sleep(Duration::from_secs(2)).await;

    // While the snapshot holds the lock, a prune is refused and deletes nothing.
    let before = walk_files(&repo.join("blobs"));
    let refused = run(&token, &prune_args(&src, &r)).await;
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
    one_line_error(&refused, &["holds the cluster lock", "snapshot by pid"]);
    let after = walk_files(&repo.join("blobs"));
    assert!(
        before.iter().all(|b| after.contains(b)),
        "the refused prune deleted blobs"
    );

    // etcd stops answering before the first lock refresh (15 s after it was taken).
    assert!(started.elapsed() < Duration::from_secs(10));
    let stopped = Stopped::new(target_etcd_pid(&src.target));
    let cut_off = run(&token, &prune_args(&src, &r)).await;
    one_line_error(&cut_off, &["etcd"]);
    let out = wait(a).await;
    let took = started.elapsed();
    drop(stopped);

    assert!(
        took > Duration::from_secs(45),
        "the snapshot ended after {took:?}, before its lock could be lost"
    );
    one_line_error(
        &out,
        &[
            "cluster lock was lost",
            "before writing the manifest",
            "not complete",
        ],
    );
    let (ids, _) = list_ids(&token, &repo);
    assert!(ids.is_empty(), "a complete-looking snapshot: {ids:?}");
    assert!(
        before
            .iter()
            .all(|b| repo.join("blobs").exists() && walk_files(&repo.join("blobs")).contains(b)),
        "blobs went while etcd was cut off"
    );

    // The refreshes that timed out while etcd was stopped were still queued in its sockets: etcd
    // applies them when it runs again, so the lock can live on for a TTL after that. A prune now is
    // refused if so; then the test removes the dead run's lock, standing in for its expiry.
    tokio::time::sleep(Duration::from_secs(2)).await;
    if etcd.get("/deis/backup/lock").await.unwrap().is_some() {
        let blobs = walk_files(&repo.join("blobs"));
        let refused = run(&token, &prune_args(&src, &r)).await;
        assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
        assert_eq!(
            walk_files(&repo.join("blobs")),
            blobs,
            "the refused prune deleted blobs"
        );
        etcd.delete("/deis/backup/lock", None).await.unwrap();
    }
    ok(&run(&token, &prune_args(&src, &r)).await, "prune");
    let (ids, incomplete) = list_ids(&token, &repo);
    assert!(
        ids.is_empty() && incomplete.is_empty(),
        "{ids:?} {incomplete:?}"
    );

    let id = snapshot_id(&ok(
        &run(&token, &snapshot_args(&src, &r, &[])).await,
        "the next snapshot",
    ));
    assert_only_snapshot(&token, &repo, &id).await;
    assert!(etcd.get("/deis/backup/lock").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_disk_full_at_the_repository_names_the_path_and_leaves_no_snapshot() {
    let src = Fresh::new();
    let token = src.agent.token_file.clone();
    fill_store(&src.target.store_dir(), 3, 10);
    let dir = tempfile::Builder::new()
        .prefix("e2e-fault-enospc")
        .tempdir()
        .unwrap();
    let disk = Tmpfs::mount(&dir.path().join("disk"), "20m");
    let repo = dir.path().join("disk/repo");
    init_plain(&repo);
    let r = repo.display().to_string();

    let out = run(&token, &snapshot_args(&src, &r, &["--no-buckets"])).await;
    let line = one_line_error(&out, &["no space left on device"]);
    assert!(line.contains(&r), "the error names no path: {line}");
    let (ids, _) = list_ids(&token, &repo);
    assert!(ids.is_empty(), "a complete-looking snapshot: {ids:?}");
    assert!(
        src.target
            .etcd()
            .get("/deis/backup/lock")
            .await
            .unwrap()
            .is_none()
    );

    disk.resize("200m");
    let id = snapshot_id(&ok(
        &run(&token, &snapshot_args(&src, &r, &["--no-buckets"])).await,
        "the snapshot after the disk grew",
    ));
    assert_only_snapshot(&token, &repo, &id).await;
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_disk_full_at_the_restore_target_leaves_its_store_as_it_was() {
    let src = Fresh::new();
    let token = src.agent.token_file.clone();
    fill_store(&src.target.store_dir(), 3, 10);
    let (_d, repo) = repo_dir("e2e-fault-target-full");
    let r = repo.display().to_string();
    let id = snapshot_id(&ok(
        &run(&token, &snapshot_args(&src, &r, &["--no-buckets"])).await,
        "snapshot",
    ));

    // The target's store directory is a 20 MiB disk, mounted before its agent starts.
    let target = Target::up(&unique("tfull"));
    let disk = Tmpfs::mount(&target.store_dir(), "20m");
    let agent = AgentContainer::up(
        &format!("{}-agent", target.name),
        target.etcd_endpoints(),
        &target.store_dir(),
        target.database_container(),
    );
    let dst = Fresh { target, agent };
    let db_before = support::pg_dumpall(dst.target.database_container());

    // The preflight sees the archive's 30 MiB of files will not fit, and says so up front.
    let out = dst.restore(&repo, &id, &["--database-sql"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    one_line_error(&out, &["nothing was written", "not enough space", "free"]);
    // Forced past it, the disk fills mid-restore: a clear error, and the store as it was.
    let out = dst.restore(&repo, &id, &["--database-sql", "--force"]);
    one_line_error(&out, &["no space left on device"]);
    assert!(
        support::tree(&dst.target.store_dir()).is_empty(),
        "the failed restore left files in the store"
    );
    assert_eq!(
        support::comparable_dump(&support::pg_dumpall(dst.target.database_container())),
        support::comparable_dump(&db_before),
        "the database changed although the restore stopped at the store"
    );

    disk.resize("200m");
    ok(
        &dst.restore(&repo, &id, &["--database-sql"]),
        "the restore after the disk grew",
    );
    assert_eq!(
        support::tree(&dst.target.store_dir()),
        support::tree(&src.target.store_dir()),
        "the restored store differs"
    );
    let Fresh { target, agent } = dst;
    drop(agent);
    drop(disk);
    drop(target);
}

/// A TCP forwarder that can be cut: every open connection dropped and the port closed.
struct Cuttable {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Cuttable {
    async fn start(upstream: SocketAddr) -> Cuttable {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, rx) = watch::channel(false);
        let connections = Arc::new(AtomicU64::new(0));
        let n = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            let mut stop = rx.clone();
            loop {
                let (mut client, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                    _ = stop.wait_for(|c| *c) => return,
                };
                n.fetch_add(1, Ordering::Relaxed);
                let mut stop = rx.clone();
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut up) => {}
                        _ = stop.wait_for(|c| *c) => {
                            // Reset, as a dead host's kernel would.
                            let _ = client.set_zero_linger();
                        }
                    }
                });
            }
        });
        Cuttable {
            addr,
            cut,
            connections,
            task,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn cut(&self) {
        let _ = self.cut.send(true);
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// Waits until the mirror has stored `n` blobs beyond the three parts (etcd, database, store).
async fn wait_for_objects(repo: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while walk_files(&repo.join("blobs")).len() < 3 + n {
        assert!(Instant::now() < deadline, "the mirror stored no object");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_gateway_gone_mid_mirror_fails_clearly_and_a_second_gateway_carries_the_snapshot() {
    let src = Fresh::new();
    let token = src.agent.token_file.clone();
    let s3 = src.s3().await;
    seed_buckets(&s3, 8, 1 << 20).await;
    let (_d, repo) = repo_dir("e2e-fault-gateway");
    let r = repo.display().to_string();

    // One gateway, gone after the first objects.
    let only = Cuttable::start(gateway_addr()).await;
    let ep = only.endpoint();
    let a = spawn_deis_backup(
        &token,
        &snapshot_args(&src, &r, &["--gateway", &ep, "--bandwidth-limit", "2MiB"]),
    );
    wait_for_objects(&repo, 1).await;
    only.cut();
    let out = wait(a).await;
    one_line_error(&out, &["gateway", &only.addr.to_string()]);
    let (ids, _) = list_ids(&token, &repo);
    assert!(ids.is_empty(), "a complete-looking snapshot: {ids:?}");
    assert!(
        src.target
            .etcd()
            .get("/deis/backup/lock")
            .await
            .unwrap()
            .is_none()
    );

    // Two gateways, one of them gone mid-mirror: the other carries the snapshot.
    let dying = Cuttable::start(gateway_addr()).await;
    let healthy = Cuttable::start(gateway_addr()).await;
    let both = format!("{},{}", dying.endpoint(), healthy.endpoint());
    let blobs_before = walk_files(&repo.join("blobs")).len();
    let mut b = spawn_deis_backup(
        &token,
        &snapshot_args(
            &src,
            &r,
            &["--gateway", &both, "--bandwidth-limit", "2MiB", "--full"],
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while walk_files(&repo.join("blobs")).len() < blobs_before + 1 {
        assert!(Instant::now() < deadline, "the mirror stored no object");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dying.cut();
    // The cut came while the snapshot ran: whatever it mirrored from then on came through the
    // remaining gateway (the other one's port is closed). Counting new connections would not
    // show it: the client keeps its connections to the healthy gateway open.
    assert!(
        b.try_wait().unwrap().is_none(),
        "the snapshot had ended before the cut"
    );
    let snap = ok(&wait(b).await, "the snapshot through the remaining gateway");
    assert!(
        healthy.connections.load(Ordering::Relaxed) > 0,
        "the remaining gateway was never used"
    );
    let id = snapshot_id(&snap);
    assert_only_snapshot(&token, &repo, &id).await;
    for bucket in ["db_wal", "registry"] {
        assert_eq!(
            snap["manifest"]["buckets"][bucket]["objects"].as_u64(),
            Some(8),
            "{bucket}: {}",
            snap["manifest"]["buckets"][bucket]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_slow_downs_and_resets_during_restore_uploads_still_give_identical_buckets() {
    let src = Fresh::new();
    let token = src.agent.token_file.clone();
    let src_s3 = src.s3().await;
    seed_buckets(&src_s3, 30, 40 << 10).await;
    let (_d, repo) = repo_dir("e2e-fault-flaky-restore");
    let r = repo.display().to_string();
    let id = snapshot_id(&ok(
        &run(&token, &snapshot_args(&src, &r, &[])).await,
        "snapshot",
    ));

    let dst = Fresh::new();
    let flaky = Proxy::start(
        gateway_addr(),
        Behaviour {
            p_slow_down: 0.2,
            p_reset: 0.15,
            max_faults: 40,
            ..Behaviour::default()
        },
    )
    .await;
    let ep = flaky.endpoint();
    let dst_token = dst.agent.token_file.clone();
    let out = run(
        &dst_token,
        &[
            "restore",
            &id,
            "--json",
            "--etcd",
            dst.target.etcd_endpoints(),
            "--agent",
            dst.agent.spec(),
            "-r",
            &r,
            "--gateway",
            &ep,
            "--database-sql",
        ],
    )
    .await;
    ok(&out, "restore through the flaky gateway");
    let c = &flaky.counts;
    let (slow, resets) = (
        c.slow_downs.load(Ordering::Relaxed),
        c.resets.load(Ordering::Relaxed),
    );
    assert!(
        slow > 0 && resets > 0,
        "faults injected: {slow} 503s, {resets} resets"
    );
    let dst_s3 = dst.s3().await;
    for bucket in ["db_wal", "registry"] {
        let want = listing(&src_s3, bucket).await.unwrap();
        assert_eq!(want.len(), 30);
        assert_eq!(
            listing(&dst_s3, bucket).await.expect("bucket restored"),
            want,
            "{bucket} differs (keys, sizes, ETags)"
        );
    }
}

/// The database dump's part name.
const DB: &str = "database/pg_dumpall.sql.zst";

/// Swaps the bytes of two files.
fn swap_files(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    std::fs::write(a, y).unwrap();
    std::fs::write(b, x).unwrap();
}

/// Stderr is one line (nothing panicked) holding every one of `words` (case-insensitive).
fn assert_one_line(what: &str, msg: &str, words: &[&str]) {
    assert!(!msg.contains("panicked"), "{what}: {msg}");
    let line = msg.trim();
    assert_eq!(line.lines().count(), 1, "{what}: not one line: {msg}");
    for w in words {
        assert!(
            line.to_lowercase().contains(&w.to_lowercase()),
            "{what}: no {w:?} in {line}"
        );
    }
}

/// What each tampering test starts from: a snapshot of a cluster of its own (a small store, its
/// database, no buckets) in a local repository, and a fresh cluster to restore it onto.
struct Tampering {
    src: Fresh,
    dst: Fresh,
    _dir: tempfile::TempDir,
    repo: PathBuf,
    r: String,
    id: String,
    manifest_path: PathBuf,
    original: Vec<u8>,
    manifest: Value,
}

impl Tampering {
    async fn new() -> Tampering {
        let src = Fresh::new();
        fill_store(&src.target.store_dir(), 1, 1);
        let (dir, repo) = repo_dir("e2e-fault-tamper");
        let r = repo.display().to_string();
        let snap = ok(
            &run(
                &src.agent.token_file,
                &snapshot_args(&src, &r, &["--no-buckets"]),
            )
            .await,
            "snapshot",
        );
        let id = snapshot_id(&snap);
        let manifest_path = repo.join("snapshots").join(&id).join("manifest.json");
        let original = std::fs::read(&manifest_path).unwrap();
        let manifest = serde_json::from_slice(&original).unwrap();
        Tampering {
            src,
            dst: Fresh::new(),
            _dir: dir,
            repo,
            r,
            id,
            manifest_path,
            original,
            manifest,
        }
    }

    fn token(&self) -> &Path {
        &self.src.agent.token_file
    }

    /// Rewrites the manifest as `f` changes it.
    fn edit(&self, f: impl FnOnce(&mut Value)) {
        let mut m = self.manifest.clone();
        f(&mut m);
        std::fs::write(&self.manifest_path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    }

    /// Puts the manifest back as the snapshot wrote it.
    fn untamper_manifest(&self) {
        std::fs::write(&self.manifest_path, &self.original).unwrap();
    }

    /// The blob file of `part`.
    fn blob(&self, part: &str) -> PathBuf {
        let sha = self.manifest["parts"][part]["sha256"].as_str().unwrap();
        self.repo.join("blobs/sha256").join(&sha[..2]).join(sha)
    }

    /// The name of the snapshot's etcd part.
    fn etcd_part(&self) -> String {
        self.manifest["parts"]
            .as_object()
            .unwrap()
            .keys()
            .find(|k| k.starts_with("etcd"))
            .expect("an etcd part")
            .clone()
    }

    /// `verify --read-data` fails: with its report naming the damaged part on stdout (exit 3), or
    /// with one error line holding `words`.
    async fn assert_verify_refuses(&self, words: &[&str]) {
        let out = run(
            self.token(),
            &["verify", &self.id, "--read-data", "-r", &self.r],
        )
        .await;
        let msg = stderr(&out);
        assert!(!out.status.success(), "verify succeeded: {msg}");
        if out.status.code() == Some(3) {
            assert!(!msg.contains("panicked"), "{msg}");
            let report = String::from_utf8_lossy(&out.stdout);
            assert!(report.contains(DB) || report.contains("store/"), "{report}");
            assert!(msg.trim().lines().count() <= 1, "{msg}");
        } else {
            assert_one_line("verify", &msg, words);
        }
    }

    /// `show` fails with one error line holding `words`.
    async fn assert_show_refuses(&self, words: &[&str]) {
        let out = run(self.token(), &["show", &self.id, "-r", &self.r]).await;
        assert!(!out.status.success(), "show succeeded: {}", stderr(&out));
        assert_one_line("show", &stderr(&out), words);
    }

    /// `show` prints a well-formed manifest whatever blobs it names: checking blobs is verify's
    /// and restore's job.
    async fn assert_show_prints(&self) {
        let out = run(self.token(), &["show", &self.id, "-r", &self.r]).await;
        ok(&out, "show of a well-formed manifest");
    }

    /// `restore` fails with one error line holding `words`, having written nothing to the target
    /// and left neither cluster locked.
    async fn assert_restore_refuses(&self, words: &[&str]) {
        let out = self.dst.restore(&self.repo, &self.id, &["--database-sql"]);
        let line = one_line_error(&out, words);
        assert!(
            line.contains("nothing was restored") || line.contains("snapshot"),
            "{line}"
        );
        assert!(
            support::tree(&self.dst.target.store_dir()).is_empty(),
            "the refused restore wrote into the store"
        );
        for (which, cluster) in [("target", &self.dst), ("source", &self.src)] {
            assert!(
                cluster
                    .target
                    .etcd()
                    .get("/deis/backup/lock")
                    .await
                    .unwrap()
                    .is_none(),
                "the {which}'s lock is held"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_manifest_naming_a_wrong_digest_is_refused_by_verify_and_restore() {
    let t = Tampering::new().await;
    t.edit(|m| {
        let sha = m["parts"][DB]["sha256"].as_str().unwrap().to_owned();
        let flipped = if sha.ends_with('0') { "1" } else { "0" };
        m["parts"][DB]["sha256"] = format!("{}{flipped}", &sha[..63]).into();
    });
    t.assert_verify_refuses(&[DB]).await;
    t.assert_show_prints().await;
    t.assert_restore_refuses(&[DB]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_manifest_with_a_malformed_digest_is_refused_by_verify_show_and_restore() {
    let t = Tampering::new().await;
    t.edit(|m| m["parts"][DB]["sha256"] = "../../../etc/passwd".into());
    t.assert_verify_refuses(&[DB, "sha-256"]).await;
    t.assert_show_refuses(&[DB, "sha-256"]).await;
    t.assert_restore_refuses(&[DB, "sha-256"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_manifest_naming_a_wrong_size_is_refused_by_verify_and_restore() {
    let t = Tampering::new().await;
    t.edit(|m| {
        let size = m["parts"][DB]["size"].as_u64().unwrap();
        m["parts"][DB]["size"] = (size + 1).into();
    });
    t.assert_verify_refuses(&[DB]).await;
    t.assert_show_prints().await;
    t.assert_restore_refuses(&[DB]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_manifest_with_an_unsafe_part_name_is_refused_by_verify_show_and_restore() {
    let t = Tampering::new().await;
    t.edit(|m| {
        let parts = m["parts"].as_object_mut().unwrap();
        let p = parts.remove(DB).unwrap();
        parts.insert("store/../../../etc/cron.d".into(), p);
    });
    t.assert_verify_refuses(&["not a safe name"]).await;
    t.assert_show_refuses(&["not a safe name"]).await;
    t.assert_restore_refuses(&["not a safe name"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_swapped_blobs_are_refused_by_verify_and_restore() {
    let t = Tampering::new().await;
    swap_files(&t.blob(DB), &t.blob(&t.etcd_part()));
    t.assert_verify_refuses(&[]).await;
    t.assert_show_prints().await;
    t.assert_restore_refuses(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_refused_tampered_restore_leaves_the_target_to_take_the_untampered_snapshot() {
    let t = Tampering::new().await;
    // Both kinds of tampering, refused one after the other on the same target ...
    t.edit(|m| m["parts"][DB]["sha256"] = "../../../etc/passwd".into());
    t.assert_restore_refuses(&[DB]).await;
    t.untamper_manifest();
    let (db, etcd) = (t.blob(DB), t.blob(&t.etcd_part()));
    swap_files(&db, &etcd);
    t.assert_restore_refuses(&[]).await;
    swap_files(&db, &etcd);
    // ... and, undone, the snapshot verifies and restores there.
    ok(
        &run(t.token(), &["verify", &t.id, "--read-data", "-r", &t.r]).await,
        "verify",
    );
    ok(
        &t.dst.restore(&t.repo, &t.id, &["--database-sql"]),
        "restore",
    );
    assert_eq!(
        support::tree(&t.dst.target.store_dir()),
        support::tree(&t.src.target.store_dir()),
        "the restored store differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_coordinator_killed_mid_restore_and_run_again_gives_an_identical_cluster() {
    let src = Fresh::new();
    let token = src.agent.token_file.clone();
    let src_s3 = src.s3().await;
    seed_buckets(&src_s3, 40, 256 << 10).await;
    fill_store(&src.target.store_dir(), 2, 4);
    let (_d, repo) = repo_dir("e2e-fault-kill-restore");
    let r = repo.display().to_string();
    let id = snapshot_id(&ok(
        &run(&token, &snapshot_args(&src, &r, &[])).await,
        "snapshot",
    ));

    // A slowed restore (20 MiB of objects at 2 MiB/s), SIGKILLed once some objects are back.
    let dst = Fresh::new();
    let dst_token = dst.agent.token_file.clone();
    let restore = |extra: &[&'static str]| {
        let mut args = vec![
            "restore".to_owned(),
            id.clone(),
            "--json".into(),
            "--etcd".into(),
            dst.target.etcd_endpoints().to_owned(),
            "--agent".into(),
            dst.agent.spec().to_owned(),
            "-r".into(),
            r.clone(),
            // The target's database container runs: the platform check is waived on purpose.
            "--force".into(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    let slow = restore(&["--bandwidth-limit", "2MiB"]);
    let slow: Vec<&str> = slow.iter().map(String::as_str).collect();
    let mut child = spawn_deis_backup(&dst_token, &slow);
    let dst_s3 = dst.s3().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = listing(&dst_s3, "db_wal").await.map_or(0, |l| l.len());
        if n >= 5 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = listing(&dst_s3, "db_wal").await.map_or(0, |l| l.len());
    assert!(
        (1..40).contains(&partial),
        "the restore was not killed midway ({partial} of 40 objects)"
    );

    // The killed run's lock on the target holds a new run off until it expires.
    let again = restore(&["--overwrite-store"]);
    let again: Vec<&str> = again.iter().map(String::as_str).collect();
    let refused = run(&dst_token, &again).await;
    wait_for_lock(&dst.target.etcd(), false, Duration::from_secs(90)).await;
    one_line_error(&refused, &["holds the cluster lock", "restore by pid"]);

    // The same restore again, merging into what the killed run left, completes it.
    ok(&run(&dst_token, &again).await, "the restore run again");
    for bucket in ["db_wal", "registry"] {
        let want = listing(&src_s3, bucket).await.unwrap();
        assert_eq!(want.len(), 40);
        assert_eq!(
            listing(&dst_s3, bucket).await.expect("bucket restored"),
            want,
            "{bucket} differs (keys, sizes, ETags)"
        );
    }
    assert_eq!(
        support::tree(&dst.target.store_dir()),
        support::tree(&src.target.store_dir()),
        "the restored store differs"
    );
}

/// The operations of the repository's live leases, from the files.
fn leases(repo: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(repo.join("leases")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let v: Value = serde_json::from_slice(&std::fs::read(e.ok()?.path()).ok()?).ok()?;
        Some(v["operation"].as_str()?.to_owned())
    })
    .collect()
}

async fn wait_for_lease(repo: &Path, operation: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !leases(repo).iter().any(|o| o == operation) {
        assert!(Instant::now() < deadline, "no {operation} lease appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_two_clusters_sharing_a_repository_keep_out_of_each_others_way() {
    // Two clusters, two etcds, two cluster locks, one repository: only the leases in the
    // repository keep them apart.
    let a = Fresh::new();
    let b = Fresh::new();
    let (ta, tb) = (a.agent.token_file.clone(), b.agent.token_file.clone());
    seed_buckets(&a.s3().await, 8, 1 << 20).await;
    let (_d, repo) = repo_dir("e2e-fault-two-clusters");
    let r = repo.display().to_string();
    let first = snapshot_id(&ok(
        &run(&tb, &snapshot_args(&b, &r, &["--no-buckets"])).await,
        "b's snapshot",
    ));

    // 16 MiB of a's buckets at 2 MiB/s: a's snapshot runs ~8 s. b's prune (keeping 1, so b's
    // snapshot would go, and every blob of a's no manifest names yet) finds b's lock free.
    let running = spawn_deis_backup(&ta, &snapshot_args(&a, &r, &["--bandwidth-limit", "2MiB"]));
    wait_for_lease(&repo, "snapshot", Duration::from_secs(30)).await;
    let before = walk_files(&repo.join("blobs"));
    let mut keep_one = prune_args(&b, &r);
    keep_one[2] = "1";
    let refused = run(&tb, &keep_one).await;
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
    one_line_error(
        &refused,
        &[
            "prune refused",
            "a snapshot by pid",
            "using this repository",
        ],
    );
    let after = walk_files(&repo.join("blobs"));
    assert!(
        before.iter().all(|f| after.contains(f)),
        "the refused prune deleted blobs"
    );
    let second = snapshot_id(&ok(&wait(running).await, "a's snapshot"));
    assert!(leases(&repo).is_empty(), "leases left: {:?}", leases(&repo));
    let third = snapshot_id(&ok(
        &run(&tb, &snapshot_args(&b, &r, &["--no-buckets"])).await,
        "b's second snapshot",
    ));

    // A slowed restore of a's snapshot onto a third cluster; meanwhile a's prune keeping only
    // the newest snapshot keeps the one being restored too, and forgets the other.
    let c = Fresh::new();
    let restore_args = [
        "restore",
        &second,
        "--json",
        "--etcd",
        c.target.etcd_endpoints(),
        "--agent",
        c.agent.spec(),
        "-r",
        &r,
        // The target's database container runs: the platform check is waived on purpose.
        "--force",
        "--bandwidth-limit",
        "2MiB",
    ];
    let restoring = spawn_deis_backup(&c.agent.token_file, &restore_args);
    wait_for_lease(&repo, "restore", Duration::from_secs(60)).await;
    let mut keep_one = prune_args(&a, &r);
    keep_one[2] = "1";
    let pruned = ok(&run(&ta, &keep_one).await, "a's prune beside the restore");
    let kept: BTreeMap<String, (bool, String)> = pruned["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap().to_owned(),
                (d["keep"].as_bool().unwrap(), d["reasons"].to_string()),
            )
        })
        .collect();
    assert!(!kept[&first].0, "{kept:?}");
    assert_eq!(kept[&second], (true, "[\"in-use\"]".to_owned()), "{kept:?}");
    assert!(kept[&third].0, "{kept:?}");
    ok(&wait(restoring).await, "the restore beside the prune");
    let want = listing(&a.s3().await, "db_wal").await.unwrap();
    assert_eq!(listing(&c.s3().await, "db_wal").await, Some(want));

    // With the restore done, the same prune forgets it; what stays verifies.
    ok(&run(&ta, &keep_one).await, "a's prune after the restore");
    let (ids, incomplete) = list_ids(&ta, &repo);
    assert_eq!(ids, std::slice::from_ref(&third));
    assert!(incomplete.is_empty(), "{incomplete:?}");
    ok(
        &run(&ta, &["verify", &third, "--read-data", "-r", &r]).await,
        "verify",
    );
    assert!(leases(&repo).is_empty(), "leases left: {:?}", leases(&repo));
}

/// `status` and `runs` follow a cluster's runs: nothing yet, a failed snapshot (its gateway
/// unreachable), then a complete one; from etcd and from the repository alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_a_failed_run_and_is_ok_after_a_fresh_complete_snapshot() {
    let src = Fresh::new();
    let token = src.agent.token_file.clone();
    let (dir, repo) = repo_dir("e2e-status");
    let r = repo.display().to_string();
    let etcd = src.target.etcd_endpoints();
    let prom = dir.path().join("deis_backup.prom");
    let metrics_file = prom.display().to_string();
    // A sample of the metrics file, parsed as Prometheus reads it.
    let metric = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        let text = std::fs::read_to_string(&prom).expect("the metrics file");
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{name}: {other:?}"),
            })
    };
    let status = async |extra: &[&str]| {
        let out = run(&token, &[&["status", "--etcd", etcd][..], extra].concat()).await;
        let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(line.lines().count(), 1, "{line} {}", stderr(&out));
        (out.status.code(), line)
    };

    let (code, line) = status(&[]).await;
    assert_eq!(
        (code, line.as_str()),
        (Some(2), "CRITICAL: no complete snapshot yet")
    );

    let failed = run(
        &token,
        &snapshot_args(
            &src,
            &r,
            &[
                "--gateway",
                "http://127.0.0.1:9",
                "--gateway-retries",
                "0",
                "--metrics-file",
                &metrics_file,
            ],
        ),
    )
    .await;
    let error = one_line_error(&failed, &["no gateway answered"]);
    let (code, line) = status(&[]).await;
    assert_eq!(code, Some(2), "{line}");
    assert!(
        line.starts_with("CRITICAL: the last run (snapshot on ")
            && line.contains(") failed: ")
            && line.contains("failed: no gateway answered (http://127.0.0.1:9): ")
            && line.ends_with("; no complete snapshot yet"),
        "{line}\n{error}"
    );

    let failed_run = [("command", "snapshot")];
    assert_eq!(
        metric("deis_backup_last_run_success", &failed_run),
        Some(0.0)
    );
    assert_eq!(
        metric("deis_backup_last_success_timestamp_seconds", &[]),
        None
    );

    let snap = ok(
        &run(
            &token,
            &snapshot_args(&src, &r, &["--no-buckets", "--metrics-file", &metrics_file]),
        )
        .await,
        "snapshot",
    );
    let id = snapshot_id(&snap);
    assert_eq!(
        metric("deis_backup_last_run_success", &failed_run),
        Some(1.0)
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let success = metric("deis_backup_last_success_timestamp_seconds", &[]).unwrap();
    assert!((now - success).abs() < 120.0, "{success} vs {now}");
    let dump = snap["manifest"]["parts"]["database/pg_dumpall.sql.zst"]["size"]
        .as_u64()
        .unwrap();
    #[expect(clippy::cast_precision_loss, reason = "a dump far below 2^52 bytes")]
    let dump = dump as f64;
    assert_eq!(
        metric(
            "deis_backup_snapshot_part_bytes",
            &[("part", "database/pg_dumpall.sql.zst")]
        ),
        Some(dump)
    );
    assert_eq!(metric("deis_backup_repository_snapshots", &[]), Some(1.0));
    let (code, line) = status(&[]).await;
    assert_eq!(code, Some(0), "{line}");
    assert!(
        line.starts_with(&format!("OK: last complete snapshot {id} at ")),
        "{line}"
    );
    let (code, line) = status(&["--max-age", "1ms"]).await;
    assert_eq!(code, Some(2), "{line}");
    assert!(line.contains("older than the 1ms allowed"), "{line}");
    // The repository alone says the same; its history holds the run that reached it.
    let (code, line) = status(&["--from", "repository", "-r", &r]).await;
    assert_eq!(code, Some(0), "{line}");
    let runs = ok(&run(&token, &["runs", "--json", "-r", &r]).await, "runs");
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["command"], "snapshot");
    assert_eq!(runs[0]["state"], "complete");
    assert_eq!(runs[0]["snapshot"], id.as_str());
}
