//! The agent's resource bounds and its opt-in for SQL, end to end against the real binary: the
//! audit's memory bombs (a GNU long-name header, a pax header, an SQL line with no end), the
//! connection limits, and RestoreDatabase being off by default and checking its digest before psql
//! runs.
//!
//! Invariants: each test starts its own agent on a free port and measures that process's peak RSS
//! (`VmHWM`); SQL touches only databases named after the test.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tonic::Code;

use super::agent::{Agent, peak_rss_kib, restore_compressed_sql, restore_sql, restore_store};
use super::support::{self, Cluster, unique};

/// Peak RSS a bomb may drive the agent to.
const BOUND_KIB: u64 = 128 * 1024;

/// A tar header block of `kind` claiming `size` bytes, checksum filled in.
fn header(name: &str, kind: u8, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar ");
    h[263..265].copy_from_slice(b" \0");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// An archive whose first entry is an extension header of `kind` claiming 8 GiB, with 30 KiB of
/// its body: the shape of the audit's 34 KB request.
fn bomb(kind: u8) -> Vec<u8> {
    let mut tar = header("././@LongLink", kind, (8 << 30) - 1).to_vec();
    tar.extend(std::iter::repeat_n(b'a', 30 << 10));
    zstd::encode_all(&tar[..], 19).unwrap()
}

async fn refused_with_bounded_memory(kind: u8, what: &str) {
    let store = tempfile::tempdir().unwrap();
    let target = store.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let agent = Agent::spawn(&["--no-register", "--store-path", target.to_str().unwrap()]).await;
    let pid = agent.child.as_ref().unwrap().id();
    let mut client = agent.client().await;
    let e = restore_store(&mut client, &target, &bomb(kind), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e}");
    // Refused from its header, by the agent's own guard, before tar parses it.
    assert!(e.message().contains("extension header"), "{what}: {e}");
    let peak = peak_rss_kib(pid);
    eprintln!("{what}: agent peak RSS {peak} KiB");
    assert!(peak < BOUND_KIB, "{what}: agent peak RSS {peak} KiB");
    assert_eq!(
        std::fs::read_dir(&target).unwrap().count(),
        0,
        "{what}: the target was written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gnu_long_name_bomb_is_refused_with_bounded_memory() {
    refused_with_bounded_memory(b'L', "GNU long name").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pax_header_bomb_is_refused_with_bounded_memory() {
    refused_with_bounded_memory(b'x', "pax header").await;
}

fn database_exists(db: &str) -> bool {
    let container = Cluster::get().database_container();
    support::psql(
        container,
        "postgres",
        &format!("SELECT count(*) FROM pg_database WHERE datname = '{db}'"),
    )
    .unwrap()
        == "1"
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_database_is_refused_unless_the_agent_config_enables_it() {
    let store = tempfile::tempdir().unwrap();
    let agent = Agent::spawn(&[
        "--no-register",
        "--store-path",
        store.path().to_str().unwrap(),
    ])
    .await;
    let db = unique("agent_disabled").replace('-', "_");
    let e = restore_sql(
        &mut agent.client().await,
        &format!("CREATE DATABASE {db};\n"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e.code(), Code::FailedPrecondition | Code::PermissionDenied),
        "{e}"
    );
    assert!(e.message().contains("restore-database"), "{e}");
    assert!(!database_exists(&db), "psql ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_sql_body_is_refused_before_psql_runs() {
    let store = tempfile::tempdir().unwrap();
    let agent = Agent::spawn(&[
        "--no-register",
        "--restore-database",
        "true",
        "--store-path",
        store.path().to_str().unwrap(),
    ])
    .await;
    let db = unique("agent_tampered").replace('-', "_");
    let announced = zstd::encode_all(b"SELECT 1;\n".as_slice(), 3).unwrap();
    let sent = zstd::encode_all(format!("CREATE DATABASE {db};\n").as_bytes(), 3).unwrap();
    let e = restore_compressed_sql(
        &mut agent.client().await,
        Sha256::digest(&announced).to_vec(),
        &sent,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(!database_exists(&db), "psql ran the tampered SQL");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_sql_line_without_end_is_refused_with_bounded_memory() {
    let store = tempfile::tempdir().unwrap();
    let agent = Agent::spawn(&[
        "--no-register",
        "--restore-database",
        "true",
        "--store-path",
        store.path().to_str().unwrap(),
    ])
    .await;
    let pid = agent.child.as_ref().unwrap().id();
    // 1 GiB of one line, a few dozen KiB compressed: the audit's bomb.
    let mut enc = zstd::Encoder::new(Vec::new(), 19).unwrap();
    let block = vec![b'a'; 1 << 20];
    for _ in 0..1024 {
        std::io::Write::write_all(&mut enc, &block).unwrap();
    }
    let z = enc.finish().unwrap();
    let e = restore_compressed_sql(&mut agent.client().await, Sha256::digest(&z).to_vec(), &z)
        .await
        .unwrap_err();
    assert!(e.message().contains("line 1"), "{e}");
    let peak = peak_rss_kib(pid);
    eprintln!("SQL line bomb: agent peak RSS {peak} KiB");
    assert!(peak < BOUND_KIB, "agent peak RSS {peak} KiB");
}

/// Whether the peer has closed `s` (a read sees end of file or a reset) within `wait`.
fn closed_within(s: &TcpStream, wait: Duration) -> bool {
    use std::io::{ErrorKind, Read};
    s.set_read_timeout(Some(wait)).unwrap();
    match (&*s).read(&mut [0u8; 64]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_limit_and_idle_ones_are_closed() {
    let store = tempfile::tempdir().unwrap();
    let agent = Agent::spawn(&[
        "--no-register",
        "--max-connections",
        "4",
        "--idle-timeout",
        "2",
        "--store-path",
        store.path().to_str().unwrap(),
    ])
    .await;
    // Let the readiness probe's connection go.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let conns: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(&agent.addr).unwrap())
        .collect();
    let start = Instant::now();
    let quick = conns
        .iter()
        .filter(|c| closed_within(c, Duration::from_millis(200)))
        .count();
    assert!(
        quick >= 16,
        "only {quick} of 20 connections over a limit of 4 were closed at once"
    );
    let idle = conns
        .iter()
        .filter(|c| closed_within(c, Duration::from_secs(6)))
        .count();
    assert_eq!(
        idle,
        20,
        "idle connections stay open after {:?}",
        start.elapsed()
    );
    // Their slots are free again: the coordinator is served.
    agent
        .client()
        .await
        .describe(deis_backup_proto::v1::DescribeRequest {})
        .await
        .unwrap();
    let refusals = agent
        .log_text()
        .matches("already serves its max-connections")
        .count();
    assert!(
        (1..=2).contains(&refusals),
        "{refusals} refusal lines logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zstd_level_above_the_agent_cap_is_refused() {
    let store = tempfile::tempdir().unwrap();
    let agent = Agent::spawn(&[
        "--no-register",
        "--store-path",
        store.path().to_str().unwrap(),
    ])
    .await;
    let e = agent
        .client()
        .await
        .archive_store(deis_backup_proto::v1::ArchiveStoreRequest {
            path: store.path().display().to_string(),
            zstd_level: 22,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("1..=19"), "{e}");
}

/// A client allowed to send the largest messages the agent takes.
async fn big_client(agent: &Agent) -> super::agent::Client {
    agent
        .client()
        .await
        .max_encoding_message_size(deis_backup_proto::MAX_MESSAGE_BYTES)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_million_segments_and_a_million_fingerprints_fit_in_one_message() {
    use deis_backup_proto::v1::{
        ArchiveStoreRequest, Digest, RestoreStoreHeader, RestoreStoreRequest, restore_store_request,
    };
    let store = tempfile::tempdir().unwrap();
    let target = store.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(store.path().join("f"), b"x").unwrap();
    let agent = Agent::spawn(&[
        "--no-register",
        "--store-path",
        target.to_str().unwrap(),
        "--store-path",
        store.path().to_str().unwrap(),
    ])
    .await;
    // One million synthetic segment digests: the header is taken, and the data that does not
    // match them is refused as such (not as a message too large).
    let segments: Vec<Digest> = (0u32..1_000_000)
        .map(|i| Digest {
            size: 4096,
            sha256: Sha256::digest(i.to_le_bytes()).to_vec(),
        })
        .collect();
    let msgs = vec![
        RestoreStoreRequest {
            kind: Some(restore_store_request::Kind::Header(RestoreStoreHeader {
                path: target.display().to_string(),
                overwrite: false,
                segments,
            })),
        },
        RestoreStoreRequest {
            kind: Some(restore_store_request::Kind::Data(vec![0u8; 4096])),
        },
    ];
    let e = big_client(&agent)
        .await
        .restore_store(futures::stream::iter(msgs))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("segment"), "{e}");

    // One million reusable fingerprints: the archive is made (none of them matches).
    let reusable: Vec<Vec<u8>> = (0u32..1_000_000)
        .map(|i| Sha256::digest(i.to_be_bytes()).to_vec())
        .collect();
    let mut stream = big_client(&agent)
        .await
        .archive_store(ArchiveStoreRequest {
            path: store.path().display().to_string(),
            zstd_level: 0,
            reusable,
        })
        .await
        .unwrap()
        .into_inner();
    let mut trailer = None;
    while let Some(c) = stream.message().await.unwrap() {
        if let Some(deis_backup_proto::v1::chunk::Kind::Trailer(t)) = c.kind {
            trailer = Some(t);
        }
    }
    let t = trailer.expect("a trailer");
    assert_eq!(t.reused_segments, 0);
}
