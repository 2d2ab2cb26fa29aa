//! Smoke tests that prove the local cluster is the real thing: the gateway keys come from etcd over
//! the v2 HTTP API exactly as Deis publishes them, radosgw serves the seeded buckets, the database
//! archives to `db_wal` through WAL-E as Deis' does, and `pg_dumpall` runs inside the
//! `deis-database` container through the Docker API.

use std::collections::BTreeSet;

use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecResults};
use futures::StreamExt;

use super::support::{self, Cluster};

#[tokio::test]
async fn gateway_is_published_in_etcd_as_deis_does() {
    let cluster = Cluster::get();
    let etcd = cluster.etcd();
    let host = etcd.get("/deis/store/gateway/host").await.unwrap();
    let port = etcd.get("/deis/store/gateway/port").await.unwrap();
    assert_eq!(
        format!("http://{}:{}", host.unwrap(), port.unwrap()),
        cluster.gateway_endpoint()
    );
    let hosts = etcd
        .get_node("/deis/store/gateway/hosts", true)
        .await
        .unwrap()
        .expect("gateway hosts listed");
    assert!(!hosts.nodes.is_empty(), "no gateway under hosts/");
    for h in &hosts.nodes {
        assert!(
            h.child("host").is_some() && h.child("port").is_some(),
            "{h:?}"
        );
    }
    let (access, secret) = cluster.gateway_keys().await;
    assert!(access.len() >= 16 && secret.len() >= 32);
    for (key, want) in [
        ("/deis/database/bucketName", "db_wal"),
        ("/deis/registry/bucketName", "registry"),
        ("/deis/database/adminUser", "postgres"),
    ] {
        assert_eq!(etcd.get(key).await.unwrap().as_deref(), Some(want), "{key}");
    }
    assert!(
        etcd.get("/deis/database/adminPass")
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn gateway_serves_the_seeded_buckets() {
    let cluster = Cluster::get();
    let s3 = cluster.s3().await;
    let seed = cluster.gateway_seed();
    let buckets = seed["buckets"].as_object().expect("seed buckets");
    for bucket in buckets.values().map(|b| b.as_str().unwrap()) {
        let want: BTreeSet<String> = seed_keys(&seed, bucket);
        assert!(!want.is_empty(), "seed manifest lists nothing for {bucket}");
        assert_eq!(
            bucket_keys(&s3, bucket).await,
            want,
            "bucket {bucket} differs from its seed manifest"
        );
    }
    // The WAL-E-shaped objects are in a bucket of their own: the database writes db_wal.
    let synthetic = buckets["database"].as_str().unwrap();
    assert_ne!(synthetic, "db_wal");
    let wal: Vec<_> = seed_keys(&seed, synthetic).into_iter().collect();
    assert!(
        wal.iter()
            .any(|k| k.starts_with("basebackups_005/base_") && k.contains("/tar_partitions/part_"))
    );
    assert!(
        wal.iter()
            .any(|k| k.ends_with("_backup_stop_sentinel.json"))
    );
    assert!(wal.iter().any(|k| is_segment(k)));
}

/// The cluster's database is Deis' (WAL-E): `db_wal` holds what it archived through the gateway,
/// a base backup of PostgreSQL 13 and WAL segments, and WAL-E itself lists that base backup.
#[tokio::test]
async fn the_database_archives_to_db_wal_through_wal_e() {
    let cluster = Cluster::get();
    assert_eq!(
        cluster
            .etcd()
            .get("/deis/database/bucketName")
            .await
            .unwrap()
            .as_deref(),
        Some("db_wal")
    );
    let s3 = cluster.s3().await;
    let keys = bucket_keys(&s3, "db_wal").await;
    let base = keys
        .iter()
        .find_map(|k| {
            k.strip_prefix("basebackups_005/")?
                .strip_suffix("_backup_stop_sentinel.json")
        })
        .unwrap_or_else(|| panic!("no base backup in db_wal: {keys:?}"));
    assert!(keys.iter().any(|k| is_segment(k)), "{keys:?}");
    let version = support::object_bytes(
        &s3,
        "db_wal",
        &format!("basebackups_005/{base}/extended_version.txt"),
    )
    .await;
    let version = String::from_utf8_lossy(&version);
    assert!(version.starts_with("PostgreSQL 13."), "{version}");

    let db = cluster.database_container();
    let archiver = support::psql(
        db,
        "postgres",
        "SELECT archived_count > 0, failed_count FROM pg_stat_archiver",
    )
    .unwrap();
    assert_eq!(archiver, "t|0", "pg_stat_archiver: archived any, failed");
    let out = std::process::Command::new("docker")
        .args(["exec", "-u", "postgres", db])
        .args([
            "envdir",
            "/etc/wal-e.d/env",
            "wal-e",
            "--terse",
            "backup-list",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.lines().any(|l| l.split('\t').next() == Some(base)),
        "wal-e backup-list: {listed}"
    );
}

/// `wal_005/<24 hex digits>.lzo`: a WAL segment as WAL-E names it.
fn is_segment(key: &str) -> bool {
    key.strip_prefix("wal_005/")
        .and_then(|n| n.split('.').next())
        .is_some_and(|n| n.len() == 24 && n.chars().all(|c| c.is_ascii_hexdigit()))
}

async fn bucket_keys(s3: &aws_sdk_s3::Client, bucket: &str) -> BTreeSet<String> {
    let mut got = BTreeSet::new();
    let mut pages = s3.list_objects_v2().bucket(bucket).into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.unwrap_or_else(|e| panic!("listing {bucket}: {e:?}"));
        got.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
    }
    got
}

#[tokio::test]
async fn pg_dumpall_runs_in_the_database_container_through_the_docker_api() {
    let cluster = Cluster::get();
    let docker = Docker::connect_with_local_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap();
    let exec = docker
        .create_exec(
            cluster.database_container(),
            CreateExecOptions {
                cmd: Some(vec!["pg_dumpall"]),
                user: Some("postgres"),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut dump = Vec::new();
    let StartExecResults::Attached { mut output, .. } =
        docker.start_exec(&exec.id, None).await.unwrap()
    else {
        panic!("exec did not attach");
    };
    while let Some(msg) = output.next().await {
        if let bollard::container::LogOutput::StdOut { message } = msg.unwrap() {
            dump.extend_from_slice(&message);
        }
    }
    let inspect = docker.inspect_exec(&exec.id).await.unwrap();
    assert_eq!(inspect.exit_code, Some(0), "pg_dumpall failed");
    let dump = String::from_utf8(dump).expect("dump is UTF-8");
    assert!(
        dump.contains("CREATE DATABASE deis"),
        "no deis database in the dump"
    );
    assert!(
        dump.contains("Grüße"),
        "no non-ASCII seeded text in the dump"
    );
    assert!(
        dump.contains("api_app"),
        "no Deis controller table in the dump"
    );
}

fn seed_keys(seed: &serde_json::Value, bucket: &str) -> BTreeSet<String> {
    let objects = seed
        .get("objects")
        .and_then(|o| o.as_array())
        .expect("seed manifest has an objects array");
    objects
        .iter()
        .filter(|o| o["bucket"] == bucket)
        .map(|o| o["key"].as_str().expect("key").to_owned())
        .collect()
}
