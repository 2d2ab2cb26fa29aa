//! The agent (`deis-backup-agent`) end to end: the real binary (and its container image) on
//! 127.0.0.1 against the local cluster's Docker engine, `deis-database` container, store directory
//! and etcd.
//!
//! Invariants: every agent listens on its own free port with its own token and host id; restores
//! go into fresh temporary directories; SQL restores touch only databases named after the test;
//! nothing here stops or changes the shared cluster's components.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use deis_backup_proto::v1::{
    ArchiveStoreRequest, Chunk, DescribeRequest, DumpDatabaseRequest, RestoreDatabaseHeader,
    RestoreDatabaseRequest, RestoreStoreHeader, RestoreStoreReply, RestoreStoreRequest,
    RunHookRequest, Trailer, agent_client::AgentClient, chunk, restore_database_request,
    restore_store_request,
};
use sha2::{Digest, Sha256};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use super::support::{self, Cluster, Pki, free_port, tree, unique};

/// Adds `authorization: Bearer <token>` (or nothing).
#[derive(Clone)]
pub(super) struct Bearer(pub(super) Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(req)
    }
}

pub(super) type Client = AgentClient<InterceptedService<Channel, Bearer>>;

/// Something serving the agent API on `addr`: the binary or its container. It serves mutual TLS
/// with the shared test PKI unless started with `--insecure-plaintext`.
pub(super) struct Agent {
    pub(super) addr: String,
    pub(super) token: String,
    pub(super) host_id: String,
    tls: bool,
    pub(super) child: Option<Child>,
    container: Option<String>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts the agent binary with these extra flags.
    pub(super) async fn spawn(extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let token = unique("test-token-0123456789");
        let host_id = unique("agent-test-host");
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.path().join("agent.log");
        let cluster = Cluster::get();
        let tls = !extra.contains(&"--insecure-plaintext");
        let tls_args: Vec<String> = if tls {
            let (cert, key) = Pki::shared().agent(&host_id);
            vec![
                "--tls-cert".into(),
                cert.display().to_string(),
                "--tls-key".into(),
                key.display().to_string(),
                "--tls-client-ca".into(),
                Pki::shared().file("ca.pem").display().to_string(),
            ]
        } else {
            vec![]
        };
        let child = Command::new(support::binary("deis-backup-agent"))
            .args(["--listen", &addr, "--host-id", &host_id])
            .args(&tls_args)
            .args(if extra.contains(&"--etcd") {
                vec![]
            } else {
                vec!["--etcd", cluster.etcd_endpoints()]
            })
            .args(if extra.contains(&"--database-container") {
                vec![]
            } else {
                vec!["--database-container", cluster.database_container()]
            })
            .args(extra)
            .env("DEIS_BACKUP_TOKEN", &token)
            .env_remove("DEIS_BACKUP_TOKEN_FILE")
            .env_remove("DOCKER_HOST")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut agent = Agent {
            addr,
            token,
            host_id,
            tls,
            child: Some(child),
            container: None,
            log,
            _dir: dir,
        };
        agent.wait_ready().await;
        agent
    }

    pub(super) fn log_text(&self) -> String {
        let mut s = fs::read_to_string(&self.log).unwrap_or_default();
        if let Some(c) = &self.container {
            let out = Command::new("docker").args(["logs", c]).output().unwrap();
            s.push_str(&String::from_utf8_lossy(&out.stderr));
        }
        s
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = &mut self.child
                && let Some(status) = c.try_wait().unwrap()
            {
                panic!("the agent exited with {status}:\n{}", self.log_text());
            }
            if let Some(c) = &self.container {
                let state = Command::new("docker")
                    .args(["inspect", "-f", "{{.State.Running}}", c])
                    .output()
                    .unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&state.stdout).trim(),
                    "true",
                    "the agent's container stopped:\n{}",
                    self.log_text()
                );
            }
            if tokio::net::TcpStream::connect(&self.addr).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent does not listen on {}:\n{}",
                self.addr,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn client_with(&self, token: Option<&str>) -> Client {
        let channel = if self.tls {
            Channel::from_shared(format!("https://{}", self.addr))
                .unwrap()
                .tls_config(Pki::shared().coordinator_tls(&self.host_id))
                .unwrap()
        } else {
            Channel::from_shared(format!("http://{}", self.addr)).unwrap()
        }
        .connect()
        .await
        .unwrap();
        AgentClient::with_interceptor(channel, Bearer(token.map(String::from)))
            .max_decoding_message_size(16 << 20)
    }

    pub(super) async fn client(&self) -> Client {
        self.client_with(Some(&self.token.clone())).await
    }

    /// SIGTERM, then the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("a spawned agent");
        let pid = child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "the agent ignores SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(c) = self.container.take() {
            let _ = Command::new("docker").args(["rm", "-f", &c]).output();
        }
    }
}

/// The data of a download stream and its trailer, checking the stream's invariants.
async fn collect(mut stream: tonic::Streaming<Chunk>) -> Result<(Vec<u8>, Trailer), Status> {
    let mut data = Vec::new();
    let mut trailer = None;
    let mut segment_start = 0;
    let mut segments = 0u64;
    while let Some(c) = stream.message().await? {
        assert!(trailer.is_none(), "a message after the trailer");
        match c.kind {
            Some(chunk::Kind::Data(d)) => data.extend(d),
            Some(chunk::Kind::SegmentEnd(e)) => {
                // Nothing is offered for reuse here, so every segment comes with its data.
                assert!(!e.reused);
                let piece = &data[segment_start..];
                assert_eq!(e.compressed_bytes, piece.len() as u64);
                assert_eq!(e.sha256, Sha256::digest(piece).to_vec());
                segment_start = data.len();
                segments += 1;
            }
            Some(chunk::Kind::Trailer(t)) => trailer = Some(t),
            None => panic!("an empty chunk"),
        }
    }
    let t = trailer.expect("the stream ended without a trailer");
    assert_eq!(t.compressed_bytes, data.len() as u64);
    if segments == 0 {
        assert_eq!(t.sha256, Sha256::digest(&data).to_vec());
    } else {
        assert_eq!(segment_start, data.len(), "data after the last segment");
        assert_eq!((t.segments, t.reused_segments), (segments, 0));
    }
    Ok((data, t))
}

async fn agent_dump(client: &mut Client) -> Result<(String, Trailer), Status> {
    let stream = client
        .dump_database(DumpDatabaseRequest {
            zstd_level: 0,
            ..Default::default()
        })
        .await?
        .into_inner();
    let (data, trailer) = collect(stream).await?;
    let text = zstd::decode_all(&data[..]).unwrap();
    assert_eq!(trailer.raw_bytes, text.len() as u64);
    Ok((String::from_utf8(text).unwrap(), trailer))
}

/// The agent's dump equals `docker exec … pg_dumpall`; other tests may change the database between
/// the two dumps, so a difference is retried a few times before it fails.
async fn assert_dump_matches(client: &mut Client, container: &str) {
    let mut last = String::new();
    for _ in 0..3 {
        let (ours, trailer) = agent_dump(client).await.unwrap();
        assert!(
            ours.contains("CREATE DATABASE deis"),
            "the seeded database is missing"
        );
        assert!(trailer.compressed_bytes < trailer.raw_bytes);
        let theirs = support::pg_dumpall(container);
        if support::comparable_dump(&ours) == support::comparable_dump(&theirs) {
            return;
        }
        last = format!(
            "agent: {} lines, docker exec: {} lines",
            ours.lines().count(),
            theirs.lines().count()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("the agent's dump differs from docker exec pg_dumpall ({last})");
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_dump_equals_docker_exec_pg_dumpall() {
    let cluster = Cluster::get();
    let agent = Agent::spawn(&["--no-register"]).await;
    let mut client = agent.client().await;
    assert_dump_matches(&mut client, cluster.database_container()).await;
}

pub(super) async fn restore_store(
    client: &mut Client,
    path: &Path,
    archive: &[u8],
    overwrite: bool,
) -> Result<RestoreStoreReply, Status> {
    let mut msgs = vec![RestoreStoreRequest {
        kind: Some(restore_store_request::Kind::Header(RestoreStoreHeader {
            path: path.display().to_string(),
            overwrite,
            // The whole archive as one segment: any split into segments must match its digests.
            segments: vec![deis_backup_proto::v1::Digest {
                size: archive.len() as u64,
                sha256: Sha256::digest(archive).to_vec(),
            }],
        })),
    }];
    for piece in archive.chunks(100_000) {
        msgs.push(RestoreStoreRequest {
            kind: Some(restore_store_request::Kind::Data(piece.to_vec())),
        });
    }
    client
        .restore_store(futures::stream::iter(msgs))
        .await
        .map(tonic::Response::into_inner)
}

/// Files the cluster's store writer appends to while the tests run.
const LIVE_FILES: &[&str] = &["logs/deis-controller.log", "logs/myapp.log"];

#[tokio::test(flavor = "multi_thread")]
async fn agent_archive_then_restore_gives_the_same_tree_while_logs_grow() {
    let cluster = Cluster::get();
    let store = cluster.store_dir();
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("restored");
    let agent = Agent::spawn(&[
        "--no-register",
        "--store-path",
        store.to_str().unwrap(),
        "--store-path",
        target.to_str().unwrap(),
    ])
    .await;
    let mut client = agent.client().await;
    let stream = client
        .archive_store(ArchiveStoreRequest {
            path: store.display().to_string(),
            zstd_level: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (archive, trailer) = collect(stream).await.unwrap();
    let counts = trailer.store.expect("store counts in the trailer");
    assert!(
        counts.files > 10 && counts.dirs > 5 && counts.symlinks >= 3 && counts.hardlinks >= 1,
        "{counts:?}"
    );
    for w in &trailer.warnings {
        assert!(
            LIVE_FILES.contains(&w.path.as_str()),
            "unexpected warning {w:?}"
        );
    }

    // GNU tar reads it too (pax headers, long names).
    let tar = Command::new("sh")
        .arg("-c")
        .arg("zstd -dc | tar -tf - | wc -l")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tar.stdin.as_ref().unwrap().write_all(&archive).unwrap();
    let listed = tar.wait_with_output().unwrap();
    assert!(listed.status.success());
    let n: u64 = String::from_utf8_lossy(&listed.stdout)
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        n,
        counts.files + counts.dirs + counts.symlinks + counts.hardlinks + counts.special
    );

    let reply = restore_store(&mut client, &target, &archive, false)
        .await
        .unwrap();
    assert_eq!(reply.files, counts.files + counts.special);
    assert_eq!(reply.bytes, counts.file_bytes);

    let source = tree(&store);
    let restored = tree(&target);
    assert_eq!(
        source.keys().collect::<Vec<_>>(),
        restored.keys().collect::<Vec<_>>(),
        "the restored tree has other paths"
    );
    for (path, want) in &source {
        let got = &restored[path];
        if LIVE_FILES.iter().any(|l| Path::new(l) == path) {
            // Appended to since: the restored bytes are a prefix of today's file.
            let now = fs::read(store.join(path)).unwrap();
            let then = fs::read(target.join(path)).unwrap();
            assert!(
                !then.is_empty() && now.starts_with(&then),
                "{}",
                path.display()
            );
            assert_eq!(
                (got.mode, got.uid, got.gid),
                (want.mode, want.uid, want.gid)
            );
            continue;
        }
        assert_eq!(got, want, "{} differs", path.display());
    }

    // Restoring again into the now full target needs overwrite.
    let e = restore_store(&mut client, &target, &archive, false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("not empty"), "{e}");
    restore_store(&mut client, &target, &archive, true)
        .await
        .unwrap();
    assert_eq!(tree(&target).len(), source.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_container_image_dumps_the_database() {
    let cluster = Cluster::get();
    let tag = format!("deis-backup/agent:{}", unique("test"));
    let built = Command::new(support::repo_root().join("agent/image/build"))
        .args([
            "--binary",
            support::binary("deis-backup-agent").to_str().unwrap(),
            "--tag",
            &tag,
        ])
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let name = unique("deis-backup-agent-test");
    let token = unique("test-token-0123456789");
    let addr = format!("127.0.0.1:{}", free_port());
    let (cert, key) = Pki::shared().agent(&name);
    let mount = |from: &Path, to: &str| format!("{}:/etc/deis-backup/pki/{to}:ro", from.display());
    let run = Command::new("docker")
        .args(["run", "-d", "--name", &name, "--net", "host"])
        .args(["-v", "/var/run/docker.sock:/var/run/docker.sock"])
        .args(["-v", &mount(&Pki::shared().file("ca.pem"), "ca.pem")])
        .args(["-v", &mount(&cert, "agent.pem")])
        .args(["-v", &mount(&key, "agent.key")])
        .args(["-e", &format!("DEIS_BACKUP_TOKEN={token}")])
        .arg(&tag)
        .args([
            "--listen",
            &addr,
            "--no-register",
            "--host-id",
            &name,
            "--store-path",
            "/tmp",
        ])
        .args(["--database-container", cluster.database_container()])
        .output()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent {
        addr,
        token,
        host_id: name.clone(),
        tls: true,
        child: None,
        container: Some(name),
        log: dir.path().join("none.log"),
        _dir: dir,
    };
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    agent.wait_ready().await;
    let mut client = agent.client().await;
    let described = client
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.machine_id, agent.host_id);
    assert!(described.database.is_some_and(|d| d.running));
    assert_dump_matches(&mut client, cluster.database_container()).await;
    drop(agent);
    let _ = Command::new("docker").args(["rmi", &tag]).output();
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_refuses_calls_without_the_token_or_outside_its_config() {
    let store = tempfile::tempdir().unwrap();
    let agent = Agent::spawn(&[
        "--no-register",
        "--store-path",
        store.path().to_str().unwrap(),
    ])
    .await;

    let mut nobody = agent.client_with(None).await;
    let e = nobody.describe(DescribeRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("no authorization"), "{e}");
    let e = nobody
        .dump_database(DumpDatabaseRequest {
            zstd_level: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let mut wrong = agent.client_with(Some("not-the-token-at-all")).await;
    let e = wrong.describe(DescribeRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("wrong bearer token"), "{e}");
    assert!(
        !agent.log_text().contains(&agent.token),
        "the token reached the log"
    );

    let mut client = agent.client().await;
    for path in ["/etc", "/", &format!("{}/..", store.path().display())] {
        let e = client
            .archive_store(ArchiveStoreRequest {
                path: path.into(),
                zstd_level: 0,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{path}: {e}");
        assert!(e.message().contains("allow-list"), "{e}");
    }
    let e = restore_store(&mut client, Path::new("/etc"), b"", false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");

    let e = client
        .run_hook(RunHookRequest {
            name: "rm-rf".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("no hook named 'rm-rf'"), "{e}");

    let missing = unique("deis-backup-no-such-database");
    let other = Agent::spawn(&[
        "--no-register",
        "--store-path",
        store.path().to_str().unwrap(),
        "--database-container",
        &missing,
    ])
    .await;
    let e = other
        .client()
        .await
        .dump_database(DumpDatabaseRequest {
            zstd_level: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        e.message()
            .contains(&format!("container '{missing}' does not exist")),
        "{e}"
    );
}

/// A tar + zstd archive of hand-made headers (name bytes written as given, unchecked).
/// One hand-made tar entry: name, type, link target, data.
type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

fn raw_archive(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_456_747_200);
        h.set_uid(0);
        h.set_gid(0);
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
        old.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_restore_refuses_malicious_archives_and_writes_nothing_outside() {
    use tar::EntryType::{Block, Char, Directory, Link, Regular, Symlink};
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("store");
    let outside = work.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let agent = Agent::spawn(&["--no-register", "--store-path", target.to_str().unwrap()]).await;
    let mut client = agent.client().await;
    let abs = outside.join("abs-x");
    let outside_s = outside.to_str().unwrap().as_bytes();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "climbs out",
            raw_archive(&[
                (b"ok", Regular, b"", b"fine"),
                (b"../outside/dotdot-x", Regular, b"", b"pwned"),
            ]),
        ),
        (
            "absolute",
            raw_archive(&[(abs.to_str().unwrap().as_bytes(), Regular, b"", b"pwned")]),
        ),
        (
            "through a symlink",
            raw_archive(&[
                (b"link", Symlink, outside_s, b""),
                (b"link/through-x", Regular, b"", b"pwned"),
            ]),
        ),
        (
            "through a symlink",
            raw_archive(&[
                (b"d", Directory, b"", b""),
                (b"d/up", Symlink, b"../..", b""),
                (b"d/up/outside/deep-x", Regular, b"", b"pwned"),
            ]),
        ),
        (
            "climbs out",
            raw_archive(&[(b"hard", Link, b"../outside/victim", b"")]),
        ),
        ("device node", raw_archive(&[(b"null", Char, b"", b"")])),
        ("device node", raw_archive(&[(b"sda", Block, b"", b"")])),
    ];
    fs::write(outside.join("victim"), b"victim").unwrap();
    for (why, archive) in cases {
        let e = restore_store(&mut client, &target, &archive, false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{why}: {e}");
        assert!(e.message().contains(why), "{why}: {e}");
        let left: Vec<_> = fs::read_dir(&target).unwrap().collect();
        assert!(left.is_empty(), "{why}: the target holds {left:?}");
        let mut outside_now: Vec<_> = fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        outside_now.sort();
        assert_eq!(
            outside_now,
            ["victim"],
            "{why}: something was written outside"
        );
        assert_eq!(fs::read(outside.join("victim")).unwrap(), b"victim");
    }
    // A damaged stream (cut short) is refused as well, with nothing written.
    let good = raw_archive(&[(b"a", Regular, b"", &[7u8; 5000])]);
    let e = restore_store(&mut client, &target, &good[..good.len() - 7], false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
    // And the same archive whole is restored.
    restore_store(&mut client, &target, &good, false)
        .await
        .unwrap();
    assert_eq!(fs::read(target.join("a")).unwrap(), [7u8; 5000]);
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_registers_in_etcd_and_leaves_on_sigterm() {
    let cluster = Cluster::get();
    let store = tempfile::tempdir().unwrap();
    let mut agent = Agent::spawn(&["--store-path", store.path().to_str().unwrap()]).await;
    let etcd = cluster.etcd();
    let key = deis_backup_proto::registration::key(&agent.host_id);
    let deadline = Instant::now() + Duration::from_secs(10);
    let node = loop {
        if let Some(n) = etcd.get_node(&key, false).await.unwrap() {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "{key} never appeared:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let record: deis_backup_proto::registration::Registration =
        serde_json::from_str(node.value.as_deref().unwrap()).unwrap();
    assert_eq!(record.address, agent.addr);
    assert_eq!(record.version, deis_backup_agent::VERSION);
    let ttl = node.ttl.expect("a TTL");
    assert!(ttl > 0 && ttl <= 30, "ttl {ttl}");
    let status = agent.terminate();
    assert!(status.success(), "{status}:\n{}", agent.log_text());
    assert!(
        etcd.get_node(&key, false).await.unwrap().is_none(),
        "{key} is still registered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_describes_its_host_store_and_containers() {
    let cluster = Cluster::get();
    let agent = Agent::spawn(&[
        "--no-register",
        "--store-path",
        cluster.store_dir().to_str().unwrap(),
    ])
    .await;
    let d = agent
        .client()
        .await
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.machine_id, agent.host_id);
    assert_eq!(d.address, agent.addr);
    assert!(
        !d.hostname.is_empty() && d.docker_api_version.starts_with("1."),
        "{d:?}"
    );
    let db = d
        .database
        .clone()
        .expect("the database container is described");
    assert!(db.running && db.name == cluster.database_container());
    assert!(
        d.running_platform_containers
            .iter()
            .any(|c| c == cluster.database_container()),
        "{d:?}"
    );
    assert!(d.hooks.iter().any(|h| h == "wal-e-backup-push"));
    let [p] = &d.store_paths[..] else {
        panic!("{d:?}")
    };
    assert!(!p.shared && !p.fs_type.is_empty(), "{p:?}");
    assert!(
        p.fs_identity
            .starts_with(&format!("local:{}:", agent.host_id)),
        "{p:?}"
    );
}

fn psql(container: &str, sql: &str) -> String {
    support::psql(container, "postgres", sql).unwrap()
}

/// Sends a RestoreDatabase stream: a header announcing `sha256`, then `compressed` in pieces.
pub(super) async fn restore_compressed_sql(
    client: &mut Client,
    sha256: Vec<u8>,
    compressed: &[u8],
) -> Result<deis_backup_proto::v1::RestoreDatabaseReply, Status> {
    let mut msgs = vec![RestoreDatabaseRequest {
        kind: Some(restore_database_request::Kind::Header(
            RestoreDatabaseHeader { sha256 },
        )),
    }];
    for piece in compressed.chunks(1000) {
        msgs.push(RestoreDatabaseRequest {
            kind: Some(restore_database_request::Kind::Data(piece.to_vec())),
        });
    }
    client
        .restore_database(futures::stream::iter(msgs))
        .await
        .map(tonic::Response::into_inner)
}

/// Sends `sql`, zstd-compressed, with its true digest.
pub(super) async fn restore_sql(
    client: &mut Client,
    sql: &str,
) -> Result<deis_backup_proto::v1::RestoreDatabaseReply, Status> {
    let z = zstd::encode_all(sql.as_bytes(), 3).unwrap();
    restore_compressed_sql(client, Sha256::digest(&z).to_vec(), &z).await
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_restores_sql_and_names_the_failing_line() {
    let cluster = Cluster::get();
    let container = cluster.database_container();
    let store = tempfile::tempdir().unwrap();
    let agent = Agent::spawn(&[
        "--no-register",
        "--restore-database",
        "true",
        "--store-path",
        store.path().to_str().unwrap(),
    ])
    .await;
    let mut client = agent.client().await;
    let db = unique("agent_restore").replace('-', "_");
    let sql = format!(
        "CREATE ROLE postgres;\nCREATE DATABASE {db};\n\\connect {db}\nCREATE TABLE t (id int, name text);\n\
         INSERT INTO t SELECT i, 'row ' || i FROM generate_series(1, 5000) AS i;\n"
    );
    let result = restore_sql(&mut client, &sql).await;
    let count = psql(
        container,
        &format!("SELECT count(*) FROM pg_database WHERE datname = '{db}'"),
    );
    if count == "1" {
        let rows = support::psql(container, &db, "SELECT count(*) FROM t");
        psql(container, &format!("DROP DATABASE {db} WITH (FORCE)"));
        assert_eq!(rows, Ok("5000".to_owned()));
    }
    let reply = result.unwrap();
    assert_eq!(reply.raw_bytes, sql.len() as u64);

    let bad = "SELECT 1;\nSELECT 2;\nSELEC broken;\nSELECT 4;\n";
    let e = restore_sql(&mut client, bad).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    assert!(e.message().contains("input line 3"), "{e}");
    assert!(
        !e.message().contains("SELEC broken"),
        "the statement text is quoted: {e}"
    );
    assert!(e.message().contains("syntax error"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_runs_hooks_by_name_from_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    fs::write(
        &config,
        r#"
        [hooks.whoami]
        user = "postgres"
        command = ["id", "-un"]
        [hooks.fails]
        command = ["sh", "-c", "echo it broke >&2; exit 3"]
        "#,
    )
    .unwrap();
    let agent = Agent::spawn(&[
        "--no-register",
        "--store-path",
        dir.path().to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ])
    .await;
    let mut client = agent.client().await;
    let ok = client
        .run_hook(RunHookRequest {
            name: "whoami".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.output_tail, "postgres");
    let e = client
        .run_hook(RunHookRequest {
            name: "fails".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    assert!(
        e.message().contains("status 3") && e.message().contains("it broke"),
        "{e}"
    );
}

/// Joins a unit file's continuation lines and returns `key=value` pairs in order.
fn unit_directives(text: &str) -> Vec<(String, String)> {
    let mut joined = String::new();
    for line in text.lines() {
        if let Some(stripped) = line.strip_suffix('\\') {
            joined.push_str(stripped);
            joined.push(' ');
        } else {
            joined.push_str(line);
            joined.push('\n');
        }
    }
    joined
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn agent_fleet_unit_runs_the_agent_with_flags_it_has() {
    let text =
        fs::read_to_string(support::repo_root().join("systemd/deis-backup-agent.service")).unwrap();
    let d = unit_directives(&text);
    let get = |k: &str| {
        d.iter()
            .filter(|(dk, _)| dk == k)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("EnvironmentFile"), ["/etc/environment"]);
    assert_eq!(get("Global"), ["true"]);
    assert!(
        get("ExecStartPre")
            .iter()
            .any(|c| c.contains("docker rm -f deis-backup-agent"))
    );
    assert!(
        get("ExecStartPre")
            .iter()
            .any(|c| c.contains("docker pull"))
    );
    let [start] = &get("ExecStart")[..] else {
        panic!("one ExecStart")
    };
    let words: Vec<String> = start
        .split_whitespace()
        .map(|w| w.replace("${COREOS_PRIVATE_IPV4}", "10.1.2.3"))
        .collect();
    let image = get("Environment")
        .iter()
        .find_map(|e| e.strip_prefix("IMAGE="))
        .expect("Environment=IMAGE=…");
    let at = words
        .iter()
        .position(|w| w == "${IMAGE}")
        .expect("ExecStart runs ${IMAGE}");
    let docker = words[..at].join(" ");
    for want in [
        "/usr/bin/docker run",
        "--name deis-backup-agent",
        "--net=host",
        "-v /var/run/docker.sock:/var/run/docker.sock",
        "-v /var/lib/deis/store:/var/lib/deis/store",
        "-v /etc/machine-id:/etc/machine-id:ro",
    ] {
        assert!(docker.contains(want), "docker run lacks {want}: {docker}");
    }
    assert!(image.starts_with("deis-backup/agent:v"), "{image}");
    let args =
        std::iter::once("deis-backup-agent".to_owned()).chain(words[at + 1..].iter().cloned());
    let cli = deis_backup_agent::Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{e}"));
    let config = cli.into_config().unwrap();
    assert_eq!(config.listen_addr().unwrap().to_string(), "10.1.2.3:4195");
    assert_eq!(config.store_paths(), [PathBuf::from("/var/lib/deis/store")]);
    assert_eq!(config.etcd(), "http://10.1.2.3:4001");
    assert!(config.token_file.is_some());
    assert!(config.register());
    let tls = config.tls_files().expect("the unit serves TLS");
    assert_eq!(tls.cert, PathBuf::from("/etc/deis-backup/pki/agent.pem"));
    assert_eq!(tls.ca, PathBuf::from("/etc/deis-backup/pki/ca.pem"));
}

/// A container of our own from the database's image, running `sleep` instead of PostgreSQL, so
/// `pg_dumpall` inside it fails; removed on drop.
struct BrokenDatabase(String);

impl BrokenDatabase {
    fn start() -> BrokenDatabase {
        let cluster = Cluster::get();
        let image = Command::new("docker")
            .args([
                "inspect",
                "-f",
                "{{.Config.Image}}",
                cluster.database_container(),
            ])
            .output()
            .unwrap();
        let image = String::from_utf8(image.stdout).unwrap().trim().to_owned();
        let name = unique("deis-backup-test-broken-database");
        let out = Command::new("docker")
            .args([
                "run",
                "-d",
                "--name",
                &name,
                "--network",
                "none",
                "--entrypoint",
                "sleep",
            ])
            .args([&image, "600"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        BrokenDatabase(name)
    }
}

impl Drop for BrokenDatabase {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_dump_of_a_failing_pg_dumpall_is_an_error_with_its_stderr() {
    let broken = BrokenDatabase::start();
    let store = tempfile::tempdir().unwrap();
    let agent = Agent::spawn(&[
        "--no-register",
        "--store-path",
        store.path().to_str().unwrap(),
        "--database-container",
        &broken.0,
    ])
    .await;
    let mut client = agent.client().await;
    let e = agent_dump(&mut client).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    assert!(e.message().contains("pg_dumpall"), "{e}");
    assert!(e.message().contains("exited with status"), "{e}");
    // pg_dumpall's own words (PostgreSQL 13 and 15 phrase the rest differently).
    assert!(e.message().contains("Is the server running"), "{e}");

    // A container that stops is reported as not running.
    let out = Command::new("docker")
        .args(["stop", "-t", "0", &broken.0])
        .output()
        .unwrap();
    assert!(out.status.success());
    let e = agent_dump(&mut client).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("is not running"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_serves_while_etcd_is_away() {
    let store = tempfile::tempdir().unwrap();
    // An etcd endpoint that refuses connections.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let agent = Agent::spawn(&[
        "--etcd",
        &dead,
        "--store-path",
        store.path().to_str().unwrap(),
    ])
    .await;
    let d = agent
        .client()
        .await
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.machine_id, agent.host_id);
    // Its registration fails (the first try comes at start) ...
    let deadline = Instant::now() + Duration::from_secs(30);
    while !agent.log_text().contains("cannot refresh the registration") {
        assert!(
            Instant::now() < deadline,
            "no failed registration logged:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ... and it serves on after it, on a new connection too.
    let d = agent
        .client()
        .await
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.machine_id, agent.host_id);
}

/// Runs openssl in `dir`, failing the test on error.
/// What a TLS client of the agent presents and expects.
struct ClientSide {
    tls: Option<tonic::transport::ClientTlsConfig>,
}

/// Whether a Describe with the right token gets through with these client settings.
async fn served(agent: &Agent, side: ClientSide) -> bool {
    let url = match side.tls {
        Some(_) => format!("https://{}", agent.addr),
        None => format!("http://{}", agent.addr),
    };
    let mut ep = Channel::from_shared(url).unwrap();
    if let Some(t) = side.tls {
        ep = ep.tls_config(t).unwrap();
    }
    let Ok(ch) = ep.connect().await else {
        return false;
    };
    AgentClient::with_interceptor(ch, Bearer(Some(agent.token.clone())))
        .describe(DescribeRequest {})
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_serves_only_the_coordinator_certificate_from_the_cluster_ca() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let store = tempfile::tempdir().unwrap();
    let agent = Agent::spawn(&[
        "--no-register",
        "--store-path",
        store.path().to_str().unwrap(),
    ])
    .await;
    let pki = Pki::shared();
    let read = |p: PathBuf| fs::read(p).unwrap();
    let ca = || Certificate::from_pem(read(pki.file("ca.pem")));
    let name = deis_backup_proto::identity::agent_name(&agent.host_id).unwrap();

    assert!(
        served(
            &agent,
            ClientSide {
                tls: Some(pki.coordinator_tls(&agent.host_id))
            }
        )
        .await
    );
    let cases: Vec<(&str, ClientSide)> = vec![
        (
            "no client certificate",
            ClientSide {
                tls: Some(
                    ClientTlsConfig::new()
                        .ca_certificate(ca())
                        .domain_name(&name),
                ),
            },
        ),
        ("another agent's certificate as the client's", {
            let (cert, key) = pki.agent(&unique("other-host"));
            ClientSide {
                tls: Some(
                    ClientTlsConfig::new()
                        .ca_certificate(ca())
                        .domain_name(&name)
                        .identity(Identity::from_pem(read(cert), read(key))),
                ),
            }
        }),
        ("a coordinator certificate from another CA", {
            let other = Pki::new();
            ClientSide {
                tls: Some(
                    ClientTlsConfig::new()
                        .ca_certificate(ca())
                        .domain_name(&name)
                        .identity(Identity::from_pem(
                            read(other.file("coordinator.pem")),
                            read(other.file("coordinator.key")),
                        )),
                ),
            }
        }),
        ("the agent checked against another CA", {
            let other = Pki::new();
            ClientSide {
                tls: Some(other.coordinator_tls(&agent.host_id)),
            }
        }),
        (
            "the agent expected under another host id",
            ClientSide {
                tls: Some(pki.coordinator_tls("some-other-host")),
            },
        ),
        ("plain HTTP/2", ClientSide { tls: None }),
    ];
    for (what, side) in cases {
        assert!(!served(&agent, side).await, "served with {what}");
    }
}

/// Starts the agent binary with `args` and returns its exit status and stderr (it must exit).
fn agent_exits(args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = Command::new(support::binary("deis-backup-agent"))
        .args(args)
        .env("DEIS_BACKUP_TOKEN", "test-token-0123456789")
        .env_remove("DEIS_BACKUP_TOKEN_FILE")
        .env_remove("DEIS_BACKUP_TLS_CERT")
        .env_remove("DEIS_BACKUP_TLS_KEY")
        .env_remove("DEIS_BACKUP_TLS_CA")
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_refuses_to_start_without_tls_a_certificate_for_another_host_or_a_loose_key() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::shared();
    let addr = format!("127.0.0.1:{}", free_port());
    let base = ["--listen", &addr, "--no-register", "--store-path", "/tmp"];

    // No TLS files and no --insecure-plaintext: no plain-text fallback.
    let mut args = base.to_vec();
    args.extend([
        "--host-id",
        "plain-host",
        "--tls-cert",
        "/nonexistent/agent.pem",
    ]);
    let (status, err) = agent_exits(&args);
    assert!(!status.success());
    assert!(err.contains("/nonexistent/agent.pem"), "{err}");

    // A certificate that names another host id.
    let (cert, key) = pki.agent(&unique("cert-host"));
    let ca = pki.file("ca.pem");
    let (c, k, a) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        ca.to_str().unwrap(),
    );
    let tls = ["--tls-cert", c, "--tls-key", k, "--tls-client-ca", a];
    let mut args = base.to_vec();
    args.extend(["--host-id", "not-the-cert-host"]);
    args.extend(tls);
    let (status, err) = agent_exits(&args);
    assert!(!status.success());
    assert!(err.contains("does not name this host"), "{err}");

    // A key that others can read.
    let loose = tempfile::tempdir().unwrap();
    let loose_key = loose.path().join("agent.key");
    fs::copy(&key, &loose_key).unwrap();
    fs::set_permissions(&loose_key, fs::Permissions::from_mode(0o644)).unwrap();
    let host = cert
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .strip_prefix("agent-")
        .unwrap();
    let mut args = base.to_vec();
    args.extend(["--host-id", host, "--tls-cert", c, "--tls-key"]);
    args.push(loose_key.to_str().unwrap());
    args.extend(["--tls-client-ca", a]);
    let (status, err) = agent_exits(&args);
    assert!(!status.success());
    assert!(err.contains("chmod 600"), "{err}");
}

/// `deis-backup agents --json` against the shared etcd, as the coordinator, with this token.
fn coordinator_agents(token: &Path, extra: &[&str]) -> (bool, serde_json::Value, String) {
    let pki = Pki::shared();
    let out = Command::new(support::binary("deis-backup"))
        .args([
            "agents",
            "--json",
            "--etcd",
            Cluster::get().etcd_endpoints(),
        ])
        .args(extra)
        .env("DEIS_BACKUP_TOKEN_FILE", token)
        .env_remove("DEIS_BACKUP_TOKEN")
        .env("DEIS_BACKUP_TLS_CA", pki.file("ca.pem"))
        .env("DEIS_BACKUP_TLS_CERT", pki.file("coordinator.pem"))
        .env("DEIS_BACKUP_TLS_KEY", pki.file("coordinator.key"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.success(),
        v,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn entry_for<'a>(v: &'a serde_json::Value, host: &str) -> &'a serde_json::Value {
    v["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["host"] == host))
        .unwrap_or_else(|| panic!("{host} not listed: {v}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rogue_agent_registered_in_etcd_is_refused_and_gets_no_secret() {
    use deis_backup_proto::registration::{self, Registration};
    use tokio::io::AsyncReadExt;
    let etcd = Cluster::get().etcd();
    let token_dir = tempfile::tempdir().unwrap();
    let token = unique("rogue-test-token-0123456789");
    let token_file = token_dir.path().join("token");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&token_file)
            .unwrap();
        f.write_all(token.as_bytes()).unwrap();
    }

    // 1. A listener that records every byte sent to it, registered under a victim's host id.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rogue_addr = listener.local_addr().unwrap().to_string();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let sink = received.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    let victim = unique("victim-host");
    let record = |address: &str| {
        serde_json::to_string(&Registration {
            address: address.to_owned(),
            version: "0.1.0".into(),
            host: "rogue".into(),
        })
        .unwrap()
    };
    etcd.set(
        &registration::key(&victim),
        &record(&rogue_addr),
        Some(Duration::from_secs(120)),
    )
    .await
    .unwrap();

    // 2. A real agent of another host (its own valid certificate), registered under a second
    //    victim's id, as a compromised host could.
    let store = tempfile::tempdir().unwrap();
    let other = Agent::spawn(&[
        "--no-register",
        "--store-path",
        store.path().to_str().unwrap(),
    ])
    .await;
    let victim2 = unique("victim-host");
    etcd.set(
        &registration::key(&victim2),
        &record(&other.addr),
        Some(Duration::from_secs(120)),
    )
    .await
    .unwrap();

    let (ok, v, err) = coordinator_agents(&token_file, &[]);
    let _ = etcd.delete(&registration::key(&victim), None).await;
    let _ = etcd.delete(&registration::key(&victim2), None).await;
    assert!(
        !ok,
        "deis-backup agents succeeded with rogue agents: {v} {err}"
    );
    for host in [&victim, &victim2] {
        let e = entry_for(&v, host);
        assert_eq!(e["healthy"], false, "{e}");
        let msg = e["error"].as_str().unwrap();
        assert!(
            msg.contains(host.as_str()),
            "the refusal does not name {host}: {msg}"
        );
    }
    let bytes = received.lock().unwrap().clone();
    assert!(!bytes.is_empty(), "the coordinator never dialled the rogue");
    assert!(
        !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
        "the token reached the rogue listener"
    );
    assert!(
        !bytes.starts_with(b"PRI * HTTP/2.0"),
        "plain HTTP/2 was sent to the rogue"
    );
    assert!(!other.log_text().contains(&token));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_coordinator_refuses_plaintext_unless_both_sides_say_so() {
    let store = tempfile::tempdir().unwrap();
    let plain = Agent::spawn(&[
        "--no-register",
        "--insecure-plaintext",
        "--store-path",
        store.path().to_str().unwrap(),
    ])
    .await;
    assert!(
        plain.log_text().contains("--insecure-plaintext"),
        "{}",
        plain.log_text()
    );
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&token_file)
            .unwrap();
        f.write_all(plain.token.as_bytes()).unwrap();
    }
    let spec = format!("{}@{}", plain.host_id, plain.addr);
    // With TLS (the default), the plain agent is not spoken to.
    let (ok, v, err) = coordinator_agents(&token_file, &["--agent", &spec]);
    assert!(!ok, "{v}");
    assert_eq!(entry_for(&v, &plain.host_id)["healthy"], false, "{v} {err}");
    // With the flag, it is, and the run says so.
    let (ok, v, err) = coordinator_agents(&token_file, &["--agent", &spec, "--insecure-plaintext"]);
    assert!(ok, "{v} {err}");
    assert!(err.contains("insecure-plaintext"), "{err}");
    // A bare address names no host: refused with TLS on.
    let (ok, _, err) = coordinator_agents(&token_file, &["--agent", &plain.addr]);
    assert!(!ok);
    assert!(err.contains("names no host"), "{err}");
}

pub(super) fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_dump_is_bounded_by_a_slow_reader_and_fails_when_the_container_vanishes() {
    let broken = BrokenDatabase::start();
    // An endless, poorly compressible "pg_dumpall" ahead of the real one on PATH.
    let fake = "printf '#!/bin/sh\\nexec od -An -tx1 /dev/urandom\\n' >/usr/local/bin/pg_dumpall && chmod 755 /usr/local/bin/pg_dumpall";
    let out = Command::new("docker")
        .args(["exec", "-u", "0", &broken.0, "sh", "-c", fake])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = tempfile::tempdir().unwrap();
    let agent = Agent::spawn(&[
        "--no-register",
        "--store-path",
        store.path().to_str().unwrap(),
        "--database-container",
        &broken.0,
    ])
    .await;
    let pid = agent.child.as_ref().unwrap().id();
    let mut stream = agent
        .client()
        .await
        .dump_database(DumpDatabaseRequest {
            zstd_level: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = 0usize;
    while got < 2 << 20 {
        match stream.message().await.unwrap().unwrap().kind {
            Some(chunk::Kind::Data(d)) => got += d.len(),
            other => panic!("expected data, got {other:?}"),
        }
    }
    // A reader that stops reading stalls the dump; the agent's memory stays bounded meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peak = peak_rss_kib(pid);
    assert!(
        peak < 64 * 1024,
        "agent peak RSS {peak} KiB with a stalled reader"
    );

    let out = Command::new("docker")
        .args(["rm", "-f", &broken.0])
        .output()
        .unwrap();
    assert!(out.status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let e = loop {
        assert!(
            Instant::now() < deadline,
            "the stream goes on after the container is gone"
        );
        match stream.message().await {
            Ok(Some(Chunk {
                kind: Some(chunk::Kind::Data(_)),
            })) => {}
            Ok(other) => panic!("the dump of a vanished container ended with {other:?}"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), Code::Aborted, "{e}");
    assert!(e.message().contains("pg_dumpall"), "{e}");
}

/// One plain HTTP/1.1 GET: the status code and the body.
async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer}"));
    (code, body.to_owned())
}

/// The TCP ports process `pid` listens on (its sockets in LISTEN state, from /proc).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for fields in text
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
        {
            // local_address is hex ip:port, st 0A is LISTEN, the inode is the tenth field.
            if fields.get(3) == Some(&"0A")
                && inodes.iter().any(|i| fields.get(9) == Some(&i.as_str()))
            {
                let port = fields[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports.sort_unstable();
    ports
}

/// A sample's value in a scrape: the metric by name and all its labels.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    use prometheus_parse::Value;
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v))
        })
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => panic!("{name} is not a single value"),
        })
}

#[tokio::test(flavor = "multi_thread")]
#[expect(
    clippy::float_cmp,
    reason = "counters are whole numbers, written and parsed exactly"
)]
async fn agent_metrics_count_calls_bytes_and_authentication_failures_and_are_off_by_default() {
    let store = tempfile::tempdir().unwrap();
    let store_path = store.path().to_str().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let agent = Agent::spawn(&[
        "--no-register",
        "--store-path",
        store_path,
        "--metrics-listen",
        &metrics,
    ])
    .await;

    let mut wrong = agent.client_with(Some("not-the-token-at-all")).await;
    let e = wrong.describe(DescribeRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut client = agent.client().await;
    client.describe(DescribeRequest {}).await.unwrap();
    let (_, trailer) = agent_dump(&mut client).await.unwrap();

    let (code, body) = http_get(&metrics, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    // Every sample line parsed, every sample's family is typed and documented, the text is
    // complete.
    let lines = body.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(scrape.samples.len(), lines, "{body}");
    for s in &scrape.samples {
        let family = s.metric.strip_suffix("_total").unwrap_or(&s.metric);
        let family = family.strip_suffix("_info").unwrap_or(family);
        assert!(
            body.contains(&format!("# TYPE {family} ")),
            "{family} untyped: {body}"
        );
        assert!(
            scrape.docs.contains_key(family),
            "{family} undocumented: {body}"
        );
        assert!(s.metric.starts_with("deis_backup_agent"), "{}", s.metric);
    }
    assert!(body.ends_with("# EOF\n"), "{body}");

    let value = |name: &str, labels: &[(&str, &str)]| {
        sample(&scrape, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in\n{body}"))
    };
    assert_eq!(
        value("deis_backup_agent_authentication_failures_total", &[]),
        1.0
    );
    let calls = "deis_backup_agent_calls_total";
    assert_eq!(value(calls, &[("call", "Describe"), ("code", "OK")]), 1.0);
    assert_eq!(
        value(calls, &[("call", "DumpDatabase"), ("code", "OK")]),
        1.0
    );
    // The refused call never reached a method: it is an authentication failure only.
    let counted: f64 = scrape
        .samples
        .iter()
        .filter(|s| s.metric == calls)
        .map(|s| match s.value {
            prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) => v,
            _ => 0.0,
        })
        .sum();
    assert_eq!(counted, 2.0, "{body}");
    assert_eq!(
        value(
            "deis_backup_agent_sent_bytes_total",
            &[("call", "DumpDatabase")]
        ),
        trailer.compressed_bytes as f64
    );
    assert_eq!(
        value(
            "deis_backup_agent_sent_bytes_total",
            &[("call", "ArchiveStore")]
        ),
        0.0
    );
    let dump = value("deis_backup_agent_last_dump_duration_seconds", &[]);
    assert!(dump > 0.0 && dump < 600.0, "{dump}");
    assert_eq!(
        value("deis_backup_agent_last_archive_duration_seconds", &[]),
        0.0
    );
    assert_eq!(
        value(
            "deis_backup_agent_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    // No secret, path or identity of the host.
    for secret in [agent.token.as_str(), agent.host_id.as_str(), store_path] {
        assert!(!body.contains(secret), "{secret} in\n{body}");
    }
    assert_eq!(http_get(&metrics, "/").await.0, 404);

    // Off by default: an agent without the option listens on its gRPC port alone.
    let pid = agent.child.as_ref().unwrap().id();
    let metrics_port: u16 = metrics.rsplit(':').next().unwrap().parse().unwrap();
    let grpc_port = |a: &Agent| a.addr.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let mut both = vec![grpc_port(&agent), metrics_port];
    both.sort_unstable();
    assert_eq!(listening_ports(pid), both);
    let plain = Agent::spawn(&["--no-register", "--store-path", store_path]).await;
    let pid = plain.child.as_ref().unwrap().id();
    assert_eq!(listening_ports(pid), [grpc_port(&plain)]);
}
