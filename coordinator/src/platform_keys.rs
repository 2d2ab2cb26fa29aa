//! The platform's configuration in etcd (`/deis`), exported into a snapshot and written back on
//! request.
//!
//! Invariants:
//! - Ephemeral and cluster-specific keys are never exported and never written back, even if an
//!   export file lists them: the gateway and its keys (`/deis/store/*`), per-host registrations
//!   (`/deis/*/hosts/*`), `/deis/services/*`, `/deis/database/initId`, `/deis/registry/masterLock`,
//!   `/deis/platform/domain`, deis-backup's own keys (`/deis/backup/*`), `/coreos.com/*`, and any key
//!   that carries a TTL (etcd drops those by itself; they describe a running process).
//! - A key that is not safe to address (an empty, `.` or `..` segment, `?`, `#` or `%`; see
//!   `deis_backup_etcd::key_path`) is neither exported nor written back: a crafted export cannot
//!   reach an excluded key through `..`.
//! - Values are data, never logged: they include secrets such as the database password.

use deis_backup_etcd::Client;
use serde::{Deserialize, Serialize};

/// The tree deis-backup exports.
pub const ROOT: &str = "/deis";

/// Format version of `Export`.
pub const FORMAT: u32 = 1;

/// One exported key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub value: String,
}

/// The exported platform keys, as stored in a snapshot part (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    pub format: u32,
    pub root: String,
    /// Sorted by key.
    pub keys: Vec<Entry>,
    /// Keys seen but left out, for the operator (names only).
    #[serde(default)]
    pub excluded: Vec<String>,
}

/// What an import did (or would do, on a dry run).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub written: Vec<String>,
    pub refused: Vec<String>,
}

/// True for keys that must never be restored onto another cluster.
pub fn is_excluded(key: &str) -> bool {
    if deis_backup_etcd::key_path(key).is_err() {
        return true;
    }
    let segs: Vec<&str> = key.trim_start_matches('/').split('/').collect();
    let kept = match segs.as_slice() {
        ["deis", "store" | "services" | "backup", ..]
        | ["deis", "database", "initId"]
        | ["deis", "registry", "masterLock"]
        | ["deis", "platform", "domain"]
        | ["deis", _, "hosts", ..] => false,
        ["deis", ..] => true,
        // Outside /deis (e.g. /coreos.com) is not the platform's configuration.
        _ => false,
    };
    !kept
}

/// Reads the `/deis` tree, leaving out excluded and TTL'd keys.
pub async fn export(etcd: &Client) -> Result<Export, deis_backup_etcd::Error> {
    let mut keys = Vec::new();
    let mut excluded = Vec::new();
    if let Some(tree) = etcd.get_node(ROOT, true).await? {
        for leaf in tree.leaves() {
            if is_excluded(&leaf.key) || leaf.ttl.is_some() {
                excluded.push(leaf.key.clone());
            } else if let Some(v) = &leaf.value {
                keys.push(Entry {
                    key: leaf.key.clone(),
                    value: v.clone(),
                });
            }
        }
    }
    Ok(Export {
        format: FORMAT,
        root: ROOT.to_owned(),
        keys,
        excluded,
    })
}

/// Writes the exported keys back, skipping excluded ones. With `dry_run`, writes nothing.
pub async fn import(
    etcd: &Client,
    export: &Export,
    dry_run: bool,
) -> Result<ImportReport, deis_backup_etcd::Error> {
    let mut report = ImportReport::default();
    for e in &export.keys {
        if is_excluded(&e.key) {
            report.refused.push(e.key.clone());
            continue;
        }
        if !dry_run {
            etcd.set(&e.key, &e.value, None).await?;
        }
        report.written.push(e.key.clone());
    }
    Ok(report)
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_with_dot_segments_are_refused_on_import_before_any_request() {
        // Nothing listens there: any request would fail the import.
        let nowhere = Client::from_list("http://127.0.0.1:9").unwrap();
        let export = Export {
            format: FORMAT,
            root: ROOT.into(),
            keys: [
                "/deis/x/../store/gateway/accessKey",
                "/deis/../coreos.com/updateengine/rebootlock/semaphore",
                "/deis/./database/initId",
                "/deis/router/%2e%2e",
                "/deis//router",
            ]
            .map(|k| Entry {
                key: k.into(),
                value: "v".into(),
            })
            .to_vec(),
            excluded: vec![],
        };
        let r = import(&nowhere, &export, false).await.unwrap();
        assert!(r.written.is_empty(), "{r:?}");
        assert_eq!(r.refused.len(), 5);
    }

    #[test]
    fn ephemeral_and_cluster_specific_keys_are_excluded() {
        for k in [
            "/deis/store/gateway/accessKey",
            "/deis/store/gateway/hosts/10.0.0.1/host",
            "/deis/router/hosts/10.0.0.1",
            "/deis/database/hosts/x",
            "/deis/services/app/web.1",
            "/deis/database/initId",
            "/deis/registry/masterLock",
            "/deis/platform/domain",
            "/deis/backup/agents/abc",
            "/deis/backup/lock",
            "/coreos.com/updateengine/rebootlock/semaphore",
            "/other/key",
        ] {
            assert!(is_excluded(k), "{k} must be excluded");
        }
        for k in [
            "/deis/database/adminUser",
            "/deis/database/bucketName",
            "/deis/registry/bucketName",
            "/deis/router/bodySize",
            "/deis/controller/registrationMode",
            "/deis/builder/users/admin/abc",
            "/deis/domains/example.com",
        ] {
            assert!(!is_excluded(k), "{k} must be kept");
        }
    }
}
