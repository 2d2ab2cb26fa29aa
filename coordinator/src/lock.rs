//! The cluster-wide lock in etcd that keeps two snapshots (or a snapshot and a prune) from running
//! at once.
//!
//! Invariants:
//! - The lock is one etcd key created with `prevExist=false` and a TTL; a holder that dies loses it
//!   within `TTL` and nobody has to clean up.
//! - A holder refreshes the lock with compare-and-swap on its own value, so it never extends a lock
//!   someone else took after it expired, and it notices when it lost the lock.
//! - Release deletes the key only if it still holds this holder's value.

use std::time::Duration;

use deis_backup_etcd::{Client, Conditional};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, ErrorKind, Result};

/// The etcd key of the lock.
pub const KEY: &str = "/deis/backup/lock";
/// How long the lock outlives a holder that stops refreshing it.
pub const TTL: Duration = Duration::from_secs(60);
/// How often a holder refreshes the lock.
pub const REFRESH: Duration = Duration::from_secs(15);

/// Who holds the lock, as stored in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// What the holder is doing (`snapshot`, `prune`).
    pub operation: String,
    /// Host name and process id of the holder.
    pub host: String,
    pub pid: u32,
    /// RFC 3339 time the lock was taken.
    pub since: String,
    /// Random token that makes this holder's value unique.
    pub token: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} by pid {} on {} since {}",
            self.operation, self.pid, self.host, self.since
        )
    }
}

fn held(h: &Holder) -> Error {
    Error::new(
        ErrorKind::Locked,
        format!("another deis-backup holds the cluster lock: {h}"),
        format!(
            "wait for it to finish; if it died, the lock expires within {} s",
            TTL.as_secs()
        ),
    )
}

fn foreign() -> Error {
    Error::new(
        ErrorKind::Locked,
        format!("the cluster lock at {KEY} holds something deis-backup did not write"),
        format!("if no backup runs, remove it with `etcdctl rm {KEY}`"),
    )
}

/// A held lock. Refreshed in the background until `release` (or drop, which stops refreshing and
/// lets it expire).
#[derive(Debug)]
pub struct Lock {
    etcd: Client,
    value: String,
    lost: watch::Receiver<bool>,
    refresher: JoinHandle<()>,
}

impl Lock {
    /// Takes the lock for `operation`, or says who holds it.
    pub async fn acquire(etcd: &Client, operation: &str) -> Result<Lock> {
        let holder = Holder {
            operation: operation.to_owned(),
            host: hostname(),
            pid: std::process::id(),
            since: now_rfc3339(),
            token: random_token(),
        };
        let value = serde_json::to_string(&holder).expect("holder serialises");
        match etcd.create(KEY, &value, Some(TTL)).await? {
            Conditional::Done(_) => {}
            Conditional::Failed(node) => {
                let current = node.and_then(|n| n.value);
                return Err(
                    match current.and_then(|v| serde_json::from_str::<Holder>(&v).ok()) {
                        Some(h) => held(&h),
                        None => foreign(),
                    },
                );
            }
        }
        let (lost_tx, lost) = watch::channel(false);
        let refresher = tokio::spawn(refresh(etcd.clone(), value.clone(), lost_tx));
        Ok(Lock {
            etcd: etcd.clone(),
            value,
            lost,
            refresher,
        })
    }

    /// True once a refresh found the lock gone or taken by someone else.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Stops refreshing and deletes the lock if it is still ours.
    pub async fn release(self) -> Result<()> {
        self.refresher.abort();
        self.etcd.delete(KEY, Some(&self.value)).await?;
        Ok(())
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

async fn refresh(etcd: Client, value: String, lost: watch::Sender<bool>) {
    let mut tick = tokio::time::interval(REFRESH);
    tick.tick().await;
    loop {
        tick.tick().await;
        match etcd.swap(KEY, &value, &value, Some(TTL)).await {
            Ok(Conditional::Done(_)) => {}
            Ok(Conditional::Failed(_)) => {
                tracing::error!("the cluster lock was lost (expired or taken over)");
                let _ = lost.send(true);
                return;
            }
            // etcd briefly away: the TTL leaves room for the next try.
            Err(e) => tracing::warn!("could not refresh the cluster lock: {e}"),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned())
}

fn random_token() -> String {
    use std::hash::{BuildHasher, RandomState};
    let a = RandomState::new().hash_one(std::process::id());
    let b = RandomState::new().hash_one(std::time::SystemTime::now());
    format!("{a:016x}{b:016x}")
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
