//! Encrypted repositories end to end, on a fresh cluster of their own (its etcd, its gateway
//! tenant with buckets, its store, its database, its agent): snapshots taken with the snapshot
//! host's key only, incremental ones reusing what they can; the operator's identity to read,
//! verify and restore; no plaintext in the repository (local and S3); wrong and missing keys; the
//! documented hand restore with Debian's `age`, `zstd`, `tar` and `python3`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use super::faults::{fill_store, one_line_error, seed_buckets, snapshot_args};
use super::snapshot::{Fresh, deis_backup, ok, snapshot_id, stderr};
use super::support::{self, unique};

/// Plaintexts the repository must not hold: a seeded row's text, an etcd secret, a bucket key,
/// a store file name.
const ROW_TEXT: &str = "seeded-row-plaintext-7f3a";
const ETCD_SECRET: &str = "etcd-secret-plaintext-91c2";
const BUCKET_KEY: &str = "docker/registry/v2/blobs/layer 1/data";
const STORE_FILE: &str = "slug-1.tar.gz";

/// An operator's identity and recipients file, made with Debian's `age-keygen`.
struct Operator {
    dir: tempfile::TempDir,
}

impl Operator {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("operator.key");
        let out = Command::new("age-keygen")
            .arg("-o")
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "age-keygen: {}", stderr(&out));
        let out = Command::new("age-keygen")
            .arg("-y")
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "age-keygen -y: {}", stderr(&out));
        std::fs::write(dir.path().join("recipients.txt"), &out.stdout).unwrap();
        Self { dir }
    }

    fn identity(&self) -> PathBuf {
        self.dir.path().join("operator.key")
    }

    fn recipients(&self) -> PathBuf {
        self.dir.path().join("recipients.txt")
    }

    fn host_key(&self) -> PathBuf {
        self.dir.path().join("host.key")
    }
}

/// A fresh source cluster with buckets, store files, a database row and an etcd secret.
async fn source() -> Fresh {
    let src = Fresh::new();
    seed_buckets(&src.s3().await, 3, 64 << 10).await;
    fill_store(&src.target.store_dir(), 2, 1);
    support::psql(
        src.target.database_container(),
        "postgres",
        &format!("CREATE TABLE secrets (t text); INSERT INTO secrets VALUES ('{ROW_TEXT}');"),
    )
    .unwrap();
    support::psql(
        src.target.database_container(),
        "postgres",
        "CREATE DATABASE deis",
    )
    .unwrap();
    support::psql(
        src.target.database_container(),
        "deis",
        "CREATE TABLE api_app (id int PRIMARY KEY); INSERT INTO api_app VALUES (1), (2);",
    )
    .unwrap();
    src.target
        .etcd()
        .set("/deis/router/sslKey", ETCD_SECRET, None)
        .await
        .unwrap();
    // Entries changed in the last seconds are not fingerprinted; let the new tree settle.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    src
}

fn init(op: &Operator, location: &str, extra: &[&str]) -> Output {
    let mut c = Command::new(support::binary("deis-backup"));
    c.args(["init", "-r", location, "--recipients-file"])
        .arg(op.recipients())
        .arg("--host-key-file")
        .arg(op.host_key())
        .args(extra);
    c.output().unwrap()
}

fn with_host<'a>(op: &'a Operator, args: &[&'a str]) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    v.extend([
        "--host-key-file".into(),
        op.host_key().display().to_string(),
    ]);
    v
}

fn with_operator<'a>(op: &'a Operator, args: &[&'a str]) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    v.extend([
        "--identity-file".into(),
        op.identity().display().to_string(),
    ]);
    v
}

fn run(src: &Fresh, args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    deis_backup(&src.agent.token_file, &args)
}

/// Every file under `dir` (name and bytes).
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push((
                    e.path().display().to_string(),
                    std::fs::read(e.path()).unwrap(),
                ));
            }
        }
    }
    out
}

/// None of the known plaintexts in any file's name or bytes.
fn assert_reveals_nothing(files: &[(String, Vec<u8>)]) {
    assert!(files.len() > 5, "{} files", files.len());
    for needle in [ROW_TEXT, ETCD_SECRET, BUCKET_KEY, STORE_FILE, "wal_005/"] {
        for (name, bytes) in files {
            assert!(
                !name.contains(needle)
                    && !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{name} reveals {needle:?}"
            );
        }
    }
}

fn part_info<'a>(snap: &'a Value, prefix: &str) -> &'a Value {
    snap["manifest"]["part-info"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(n, _)| n.starts_with(prefix))
        .unwrap_or_else(|| panic!("no part {prefix}: {snap}"))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_snapshots_taken_with_the_host_key_reuse_and_only_the_operator_reads_them() {
    let src = source().await;
    let op = Operator::new();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo").display().to_string();
    let made = init(&op, &repo, &[]);
    assert!(made.status.success(), "init: {}", stderr(&made));
    assert!(String::from_utf8_lossy(&made.stdout).contains("encrypted"));

    // The snapshot host holds the host key only.
    let first = ok(
        &run(&src, &with_host(&op, &snapshot_args(&src, &repo, &[]))),
        "first snapshot",
    );
    // Counted as the dump streamed by, and the chain read with sentinels from the gateway.
    assert_eq!(
        part_info(&first, "database")["figures"]["apps"],
        2,
        "{first}"
    );
    assert_eq!(
        first["manifest"]["wal-e"]["base-backups"], 1,
        "{}",
        first["manifest"]
    );
    let second = ok(
        &run(&src, &with_host(&op, &snapshot_args(&src, &repo, &[]))),
        "second snapshot",
    );
    for bucket in ["db_wal", "registry"] {
        let b = &second["buckets"][bucket];
        assert_eq!(b["downloaded_objects"], 0, "{bucket}: {b}");
        assert_eq!(b["unchanged_objects"], 3, "{bucket}: {b}");
    }
    // The dump too: the database did not move, and the host compared states, not bytes.
    assert_eq!(
        part_info(&second, "database")["taken-in"],
        first["manifest"]["id"],
        "{second}"
    );
    let store = part_info(&second, "store/");
    assert!(
        store["segments-reused"].as_u64().unwrap_or(0) > 0,
        "no store segment reused: {store}"
    );
    let id = snapshot_id(&second);

    // The host lists and checks sizes, but reads no data: one line, exit 2.
    let listed = run(&src, &with_host(&op, &["list", "-r", &repo]));
    assert!(listed.status.success(), "{}", stderr(&listed));
    ok(
        &run(&src, &with_host(&op, &["verify", &id, "-r", &repo])),
        "verify",
    );
    let refused = run(
        &src,
        &with_host(&op, &["verify", &id, "--read-data", "-r", &repo]),
    );
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    one_line_error(
        &refused,
        &["needs an operator's identity", "--identity-file"],
    );
    // Nor does `show` print an etcd value, in text or JSON.
    for json in [&[][..], &["--json"][..]] {
        let shown = run(
            &src,
            &with_host(&op, &[&["show", &id, "-r", &repo][..], json].concat()),
        );
        assert!(shown.status.success(), "{}", stderr(&shown));
        assert!(!String::from_utf8_lossy(&shown.stdout).contains(ETCD_SECRET));
    }

    // The operator reads everything.
    let verified = ok(
        &run(
            &src,
            &with_operator(&op, &["verify", &id, "--read-data", "--json", "-r", &repo]),
        ),
        "verify --read-data",
    );
    assert!(verified["blobs_read"].as_u64().unwrap() > 0, "{verified}");

    // No plaintext anywhere in the repository.
    assert_reveals_nothing(&files(Path::new(&repo)));

    // Restored by the operator onto another fresh cluster: the row, the objects, the store.
    let dst = Fresh::new();
    let identity = op.identity().display().to_string();
    let restored = dst.restore(
        Path::new(&repo),
        &id,
        &["--database-sql", "--identity-file", &identity],
    );
    ok(&restored, "restore");
    assert_eq!(
        support::psql(
            dst.target.database_container(),
            "postgres",
            "SELECT t FROM secrets"
        ),
        Ok(ROW_TEXT.to_owned())
    );
    assert_eq!(
        std::fs::read(dst.target.store_dir().join(STORE_FILE)).unwrap(),
        std::fs::read(src.target.store_dir().join(STORE_FILE)).unwrap()
    );
    let got = support::object_bytes(&dst.s3().await, "registry", BUCKET_KEY).await;
    assert_eq!(
        got,
        support::object_bytes(&src.s3().await, "registry", BUCKET_KEY).await
    );

    // Pruned with the host key: the first snapshot goes, the second still reads whole.
    let pruned = run(
        &src,
        &with_host(
            &op,
            &[
                "prune",
                "--keep-last",
                "1",
                "--json",
                "--etcd",
                src.target.etcd_endpoints(),
                "-r",
                &repo,
            ],
        ),
    );
    ok(&pruned, "prune");
    ok(
        &run(
            &src,
            &with_operator(&op, &["verify", &id, "--read-data", "-r", &repo]),
        ),
        "verify after prune",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_wrong_or_missing_keys_give_one_line_exit_2_and_write_nothing() {
    let src = source().await;
    let op = Operator::new();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo").display().to_string();
    assert!(init(&op, &repo, &[]).status.success());
    let snap = ok(
        &run(&src, &with_host(&op, &snapshot_args(&src, &repo, &[]))),
        "snapshot",
    );
    let id = snapshot_id(&snap);
    let stranger = Operator::new();

    // Never initialized: asks for init.
    let none = dir.path().join("none").display().to_string();
    let out = run(&src, &with_host(&op, &snapshot_args(&src, &none, &[])));
    one_line_error(&out, &["not a deis-backup repository", "deis-backup init"]);

    // No key; a stranger's key: exit 2, one line, and the target untouched.
    let dst = Fresh::new();
    let restore = |key: Option<&Path>| {
        let key = key.map(|k| k.display().to_string());
        let mut extra = vec!["--database-sql"];
        if let Some(k) = &key {
            extra.extend(["--identity-file", k.as_str()]);
        }
        dst.restore(Path::new(&repo), &id, &extra)
    };
    for (key, words) in [
        (None, &["is encrypted and no key was given"][..]),
        (Some(stranger.identity()), &["no key given opens"][..]),
    ] {
        let out = restore(key.as_deref());
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        one_line_error(&out, words);
        assert!(
            std::fs::read_dir(dst.target.store_dir())
                .unwrap()
                .next()
                .is_none(),
            "the store was written"
        );
        let buckets = dst.s3().await.list_buckets().send().await.unwrap();
        assert!(buckets.buckets().is_empty(), "a bucket was made");
    }
    // A key file others can read is refused.
    let loose = dir.path().join("loose.key");
    std::fs::copy(op.identity(), &loose).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = restore(Some(&loose));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // A host that pins its recipients refuses a repository sealed to others, or not at all.
    let pinned = |repo: &str| {
        let mut args = with_host(&op, &snapshot_args(&src, repo, &[]));
        args.extend([
            "--recipients-file".into(),
            stranger.recipients().display().to_string(),
        ]);
        run(&src, &args)
    };
    one_line_error(&pinned(&repo), &["sealed to other recipients"]);
    let plain = dir.path().join("plain").display().to_string();
    super::snapshot::init_plain(Path::new(&plain));
    one_line_error(&pinned(&plain), &["is not encrypted"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_the_documented_hand_restore_gives_the_dump_and_the_store() {
    let src = source().await;
    let op = Operator::new();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    assert!(init(&op, &repo.display().to_string(), &[]).status.success());
    ok(
        &run(
            &src,
            &with_host(
                &op,
                &snapshot_args(&src, &repo.display().to_string(), &["--no-buckets"]),
            ),
        ),
        "snapshot",
    );

    // The lines of docs/FORMAT.md between its markers, as written.
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/FORMAT.md"))
        .unwrap();
    let begin = doc.find("# deis-backup hand restore: begin").unwrap();
    let end = doc.find("# deis-backup hand restore: end").unwrap();
    let script = &doc[begin..end];
    let work = dir.path().join("work");
    let store = dir.path().join("store");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&store).unwrap();
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(&work)
        .env("R", &repo)
        .env("KEY", op.identity())
        .env("STORE", &store)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the documented steps: {}",
        stderr(&out)
    );

    let dump = std::fs::read_to_string(work.join("dump.sql")).unwrap();
    assert!(dump.contains(ROW_TEXT), "the dump lacks the row");
    assert!(dump.contains("PostgreSQL database cluster dump"));
    let want = support::tree(&src.target.store_dir());
    let got = support::tree(&store);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        std::fs::read(store.join(STORE_FILE)).unwrap(),
        std::fs::read(src.target.store_dir().join(STORE_FILE)).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_an_s3_repository_reveals_nothing_either() {
    let src = source().await;
    let op = Operator::new();
    let cluster = support::Cluster::get();
    let (access, secret) = cluster.gateway_keys().await;
    let bucket = unique("enc-repo").replace('_', "-").to_lowercase();
    let s3 = cluster.s3().await;
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    let keyfile = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(keyfile.path(), format!("{secret}\n")).unwrap();
    std::fs::set_permissions(
        keyfile.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let repo = format!("s3://{bucket}/deis");
    let s3_args = |mut v: Vec<String>| {
        v.extend([
            "--repository-endpoint".into(),
            cluster.gateway_endpoint().to_owned(),
            "--repository-access-key".into(),
            access.clone(),
            "--repository-secret-key-file".into(),
            keyfile.path().display().to_string(),
        ]);
        v
    };
    let made = init(
        &op,
        &repo,
        &[
            "--repository-endpoint",
            cluster.gateway_endpoint(),
            "--repository-access-key",
            &access,
            "--repository-secret-key-file",
            keyfile.path().to_str().unwrap(),
        ],
    );
    assert!(made.status.success(), "init: {}", stderr(&made));
    let snap = ok(
        &run(
            &src,
            &s3_args(with_host(&op, &snapshot_args(&src, &repo, &[]))),
        ),
        "snapshot",
    );
    let id = snapshot_id(&snap);
    ok(
        &run(
            &src,
            &s3_args(with_operator(
                &op,
                &["verify", &id, "--read-data", "-r", &repo],
            )),
        ),
        "verify --read-data",
    );

    // Every object of the bucket, by name and bytes.
    let mut objects = Vec::new();
    let mut pages = s3.list_objects_v2().bucket(&bucket).into_paginator().send();
    while let Some(page) = pages.next().await {
        for o in page.unwrap().contents() {
            let key = o.key().unwrap().to_owned();
            let body = support::object_bytes(&s3, &bucket, &key).await;
            objects.push((key, body));
        }
    }
    assert_reveals_nothing(&objects);

    // A plain repository in a bucket works, and warns on every snapshot.
    let plain = format!("s3://{bucket}/plain");
    let made = Command::new(support::binary("deis-backup"))
        .args(["init", "--plain", "-r", &plain])
        .args(s3_args(Vec::new()))
        .output()
        .unwrap();
    assert!(made.status.success(), "init --plain: {}", stderr(&made));
    for _ in 0..2 {
        let mut args: Vec<String> = snapshot_args(&src, &plain, &[])
            .into_iter()
            .map(str::to_owned)
            .collect();
        args = s3_args(args);
        let out = run(&src, &args);
        ok(&out, "plain snapshot");
        assert!(
            stderr(&out).contains("is not encrypted: whoever reads it reads the cluster's secrets"),
            "{}",
            stderr(&out)
        );
    }
    let mut pages = s3.list_objects_v2().bucket(&bucket).into_paginator().send();
    let mut objects = Vec::new();
    while let Some(page) = pages.next().await {
        objects.extend(
            page.unwrap()
                .contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
    }
    for key in &objects {
        let _ = s3.delete_object().bucket(&bucket).key(key).send().await;
    }
    let _ = s3.delete_bucket().bucket(&bucket).send().await;
}

/// The sealed blob files of the repository at `repo`: path and bytes, largest first.
fn sealed_blobs(repo: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = files(&repo.join("blobs/keyed"))
        .into_iter()
        .map(|(p, b)| (PathBuf::from(p), b))
        .collect();
    out.sort_by_key(|(_, b)| std::cmp::Reverse(b.len()));
    out
}

/// `path` renamed to end in `.<len>`, the sealed size its name must state.
fn renamed_for(path: &Path, len: usize) -> PathBuf {
    let name = path.file_name().unwrap().to_str().unwrap();
    let stem = name.rsplit_once('.').unwrap().0;
    path.with_file_name(format!("{stem}.{len}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_flipped_swapped_and_cut_blobs_are_caught_before_anything_is_written() {
    let src = source().await;
    let op = Operator::new();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let r = repo.display().to_string();
    assert!(init(&op, &r, &[]).status.success());
    let id = snapshot_id(&ok(
        &run(
            &src,
            &with_host(&op, &snapshot_args(&src, &r, &["--no-buckets"])),
        ),
        "snapshot",
    ));
    let dst = Fresh::new();
    let untouched = |what: &str| {
        assert!(
            std::fs::read_dir(dst.target.store_dir())
                .unwrap()
                .next()
                .is_none(),
            "{what}: the store was written"
        );
        assert_eq!(
            support::psql(
                dst.target.database_container(),
                "postgres",
                "SELECT count(*) FROM pg_tables WHERE tablename = 'secrets'"
            ),
            Ok("0".to_owned()),
            "{what}: the database was written"
        );
    };
    let check = |what: &str, verify_args: &[&str], problem: &str| {
        let verify = run(
            &src,
            &with_operator(&op, &[&["verify", &id, "-r", &r][..], verify_args].concat()),
        );
        assert_eq!(verify.status.code(), Some(3), "{what}: {}", stderr(&verify));
        let said = String::from_utf8_lossy(&verify.stdout);
        assert!(said.contains(problem), "{what}: {said}");
        let identity = op.identity().display().to_string();
        let restore = dst.restore(
            &repo,
            &id,
            &["--database-sql", "--identity-file", &identity],
        );
        one_line_error(&restore, &["damaged, nothing was restored"]);
        untouched(what);
    };
    let blobs = sealed_blobs(&repo);
    let (big, big_bytes) = &blobs[0];
    let (other, other_bytes) = &blobs[1];

    // Flipped: one byte in the middle of the biggest blob (a part).
    let mut flipped = big_bytes.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x01;
    std::fs::write(big, &flipped).unwrap();
    check("flipped", &["--read-data"], "does not open");
    std::fs::write(big, big_bytes).unwrap();

    // Swapped: each file holds the other's sealed bytes, named for their sizes.
    let (big_as, other_as) = (
        renamed_for(big, other_bytes.len()),
        renamed_for(other, big_bytes.len()),
    );
    std::fs::remove_file(big).unwrap();
    std::fs::remove_file(other).unwrap();
    std::fs::write(&big_as, other_bytes).unwrap();
    std::fs::write(&other_as, big_bytes).unwrap();
    check("swapped", &["--read-data"], "now hashes to");
    std::fs::remove_file(&big_as).unwrap();
    std::fs::remove_file(&other_as).unwrap();
    std::fs::write(big, big_bytes).unwrap();
    std::fs::write(other, other_bytes).unwrap();

    // Cut: shorter than its name says; sizes alone tell.
    std::fs::write(big, &big_bytes[..big_bytes.len() - 7]).unwrap();
    check("cut", &[], "cut short");
    std::fs::write(big, big_bytes).unwrap();

    // Whole again: it verifies and restores.
    ok(
        &run(
            &src,
            &with_operator(&op, &["verify", &id, "--read-data", "-r", &r]),
        ),
        "verify after repair",
    );
}
