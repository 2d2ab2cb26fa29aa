//! `deis-backup drill`: the dump loaded into a throwaway container of the database's image by the
//! real agent on the real Docker engine, the counts compared with the dump's, the registry's
//! ancestry and the db_wal chain checked; and a registry that lost a layer fails the drill by name.
//!
//! Invariants: works on a fresh target cluster of its own (`Fresh`); no drill container is left
//! on the engine afterwards.

use std::process::Command;

use serde_json::Value;

use super::snapshot::{Fresh, deis_backup, ok, repo_dir, snapshot_id, stderr};
use super::support::psql;

/// Names of the drill containers on the engine (running or not).
fn drill_containers() -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            "label=com.deis-backup.drill",
            "--format",
            "{{.Names}}",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_loads_the_dump_in_a_throwaway_container_and_fails_on_a_missing_layer() {
    let src = Fresh::new();
    let db = src.target.database_container().to_owned();
    let sql = |d: &str, q: &str| psql(&db, d, q).unwrap_or_else(|e| panic!("{e}"));
    sql("postgres", "CREATE DATABASE deis");
    sql(
        "deis",
        "CREATE TABLE api_app (id serial PRIMARY KEY, name text); \
         CREATE TABLE api_release (id serial PRIMARY KEY, app int, v int); \
         CREATE TABLE api_key (id serial PRIMARY KEY, k text); \
         CREATE TABLE api_domain (id serial PRIMARY KEY, d text); \
         CREATE TABLE auth_user (id serial PRIMARY KEY, u text); \
         INSERT INTO api_app (name) SELECT 'app' || g FROM generate_series(1, 3) g; \
         INSERT INTO api_release (app, v) SELECT g % 3, g FROM generate_series(1, 11) g; \
         INSERT INTO api_key (k) VALUES ('ssh-ed25519 AAAA… a@b'), (E'multi\\nline'); \
         INSERT INTO auth_user (u) VALUES ('admin');",
    );

    // A registry with two images (one the other's parent) and a db_wal with a whole chain.
    let s3 = src.s3().await;
    s3.create_bucket().bucket("registry").send().await.unwrap();
    s3.create_bucket().bucket("db_wal").send().await.unwrap();
    let objects: Vec<(&str, String, Vec<u8>)> = vec![
        (
            "registry",
            "images/aaa/ancestry".into(),
            br#"["aaa"]"#.to_vec(),
        ),
        ("registry", "images/aaa/layer".into(), vec![1; 2048]),
        (
            "registry",
            "images/bbb/ancestry".into(),
            br#"["bbb","aaa"]"#.to_vec(),
        ),
        ("registry", "images/bbb/layer".into(), vec![2; 2048]),
        (
            "db_wal",
            "basebackups_005/base_000000010000000000000002_00000028_backup_stop_sentinel.json"
                .into(),
            br#"{"wal_segment_backup_stop": "000000010000000000000002"}"#.to_vec(),
        ),
        (
            "db_wal",
            "wal_005/000000010000000000000002.lzo".into(),
            vec![3; 512],
        ),
    ];
    for (bucket, key, body) in objects {
        s3.put_object()
            .bucket(bucket)
            .key(&key)
            .body(body.into())
            .send()
            .await
            .unwrap();
    }
    let (_d, repo) = repo_dir("e2e-drill");
    let r = repo.display().to_string();
    let take = || {
        ok(
            &deis_backup(
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
            ),
            "snapshot",
        )
    };
    let drill = |id: &str| {
        deis_backup(
            &src.agent.token_file,
            &[
                "drill",
                id,
                "--json",
                "--etcd",
                src.target.etcd_endpoints(),
                "--agent",
                src.agent.spec(),
                "-r",
                &r,
            ],
        )
    };

    let snap = take();
    // The snapshot records the Deis figures its dump holds.
    assert_eq!(
        snap["manifest"]["part-info"]["database/pg_dumpall.sql.zst"]["figures"],
        serde_json::json!({"apps": 3, "releases": 11, "keys": 2, "domains": 0, "users": 1}),
        "{snap}"
    );
    let id = snapshot_id(&snap);
    let report = ok(&drill(&id), "drill");
    for (name, n) in [
        ("apps", 3),
        ("releases", 11),
        ("keys", 2),
        ("domains", 0),
        ("users", 1),
    ] {
        let detail = format!("{n}, as in the dump and as recorded at snapshot time");
        assert_eq!(check(&report, name)["outcome"], "ok", "{report}");
        assert_eq!(check(&report, name)["detail"], detail, "{report}");
    }
    for name in ["database", "tables", "registry", "db_wal"] {
        assert_eq!(check(&report, name)["outcome"], "ok", "{name}: {report}");
    }
    assert!(
        check(&report, "database")["detail"]
            .as_str()
            .unwrap()
            .contains("PostgreSQL 15."),
        "{report}"
    );
    assert_eq!(
        drill_containers(),
        Vec::<String>::new(),
        "a drill container was left"
    );
    // The live database was not touched.
    assert_eq!(sql("deis", "SELECT count(*) FROM api_app"), "3");

    // The registry loses a layer that an image's ancestry needs: the drill fails and names it.
    s3.delete_object()
        .bucket("registry")
        .key("images/aaa/layer")
        .send()
        .await
        .unwrap();
    let id = snapshot_id(&take());
    let out = drill(&id);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let registry = check(&report, "registry");
    assert_eq!(registry["outcome"], "failed", "{report}");
    let detail = registry["detail"].as_str().unwrap();
    assert!(
        detail.contains("2 of 2 images") && detail.contains("no layer of aaa"),
        "{detail}"
    );
    assert_eq!(check(&report, "tables")["outcome"], "ok", "{report}");
    assert_eq!(
        drill_containers(),
        Vec::<String>::new(),
        "a drill container was left"
    );
}
