//! Test support: the local cluster, started once by `tests/cluster/up` or reused when it runs.
//!
//! Invariants: tests never tear the cluster down; they create what they mutate under their own names
//! (buckets, directories, containers) and leave the seeded data as it was. Endpoints come from the
//! `KEY=value` lines `up` prints, secrets from etcd, exactly as the product reads them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The running local cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    env: HashMap<String, String>,
}

impl Cluster {
    /// The cluster every test uses: brought up (or reused) once per test process.
    pub fn get() -> &'static Cluster {
        static CLUSTER: OnceLock<Cluster> = OnceLock::new();
        CLUSTER.get_or_init(|| {
            let up = repo_root().join("tests/cluster/up");
            let out = Command::new(&up)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", up.display()));
            assert!(
                out.status.success(),
                "{} failed:\n{}",
                up.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let env = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .collect();
            Cluster { env }
        })
    }

    /// One of the values `up` printed (CLUSTER_DIR, ETCD_ENDPOINTS, GATEWAY_ENDPOINT, STORE_DIR, ...).
    pub fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("tests/cluster/up printed no {key}"))
    }

    pub fn dir(&self) -> PathBuf {
        PathBuf::from(self.var("CLUSTER_DIR"))
    }

    pub fn etcd_endpoints(&self) -> &str {
        self.var("ETCD_ENDPOINTS")
    }

    pub fn etcd(&self) -> deis_backup_etcd::Client {
        deis_backup_etcd::Client::from_list(self.etcd_endpoints()).expect("etcd endpoints from up")
    }

    pub fn gateway_endpoint(&self) -> &str {
        self.var("GATEWAY_ENDPOINT")
    }

    pub fn store_dir(&self) -> PathBuf {
        PathBuf::from(self.var("STORE_DIR"))
    }

    pub fn database_container(&self) -> &str {
        self.var("DATABASE_CONTAINER")
    }

    /// The seed manifest of the gateway buckets (`$CLUSTER_DIR/seed/gateway-<size>.json`).
    pub fn gateway_seed(&self) -> serde_json::Value {
        let p = self
            .dir()
            .join(format!("seed/gateway-{}.json", self.var("CLUSTER_SIZE")));
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&text).expect("seed manifest is JSON")
    }

    /// Gateway keys as Deis publishes them: `/deis/store/gateway/{accessKey,secretKey}`.
    pub async fn gateway_keys(&self) -> (String, String) {
        let etcd = self.etcd();
        let access = etcd.get("/deis/store/gateway/accessKey").await.unwrap();
        let secret = etcd.get("/deis/store/gateway/secretKey").await.unwrap();
        (
            access.expect("accessKey published"),
            secret.expect("secretKey published"),
        )
    }

    /// An aws-sdk-s3 client for the gateway (SigV4, path style), with the keys from etcd.
    pub async fn s3(&self) -> aws_sdk_s3::Client {
        let (access, secret) = self.gateway_keys().await;
        let creds = aws_sdk_s3::config::Credentials::new(access, secret, None, None, "etcd");
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(self.gateway_endpoint())
            .force_path_style(true)
            .credentials_provider(creds)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }
}

/// The repository's top directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// A workspace binary (`deis-backup`, `deis-backup-agent`), built by the test command before the
/// tests run (`cargo build --workspace --bins`).
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), PathBuf::from);
    let p = target.join("debug").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests (scripts/test does)",
        p.display()
    );
    p
}
