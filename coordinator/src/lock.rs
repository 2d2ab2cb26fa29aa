//! The cluster-wide lock in etcd that keeps two snapshots (or a snapshot and a prune) from running
//! at once.
//!
//! Invariants:
//! - The lock is one etcd key created with `prevExist=false` and a TTL; a holder that dies loses it
//!   within `TTL` and nobody has to clean up.
//! - A holder refreshes the lock with compare-and-swap on its own value, so it never extends a lock
//!   someone else took after it expired, and it notices when it lost the lock.
//! - The lock counts as lost as soon as a refresh finds it taken, or no refresh has succeeded for
//!   `TTL - MARGIN`: by then another process may hold it (etcd cut off is indistinguishable from
//!   the lock expiring). The holder calls [`Lock::check`] before every step that deletes or
//!   commits (each prune delete batch, a snapshot's manifest) and stops with a clear error.
//! - Release deletes the key only if it still holds this holder's value.
//! - The cluster names itself to repositories by a random id kept at [`CLUSTER_ID_KEY`], made
//!   once by the first holder; repository leases ([`crate::lease`]) carry it and the holder's
//!   token, so a run can tell a lease of its own cluster's dead run from another cluster's.

use std::time::{Duration, Instant};

use deis_backup_etcd::{Client, Conditional};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, ErrorKind, Result};
use crate::rfc3339::rfc3339;

/// The etcd key of the lock.
pub const KEY: &str = "/deis/backup/lock";
/// How long the lock outlives a holder that stops refreshing it.
pub const TTL: Duration = Duration::from_secs(60);
/// How often a holder refreshes the lock.
pub const REFRESH: Duration = Duration::from_secs(15);
/// How long before the TTL runs out a holder without a successful refresh stops trusting its lock.
pub const MARGIN: Duration = Duration::from_secs(15);
/// The etcd key holding the cluster's id (never exported: `/deis/backup` is not configuration).
pub const CLUSTER_ID_KEY: &str = "/deis/backup/cluster-id";

/// Who holds the lock, as stored in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// What the holder is doing (`snapshot`, `prune`).
    pub operation: String,
    /// Host name and process id of the holder.
    pub host: String,
    pub pid: u32,
    /// When the lock was taken (RFC 3339 in etcd).
    #[serde(with = "time::serde::rfc3339")]
    pub since: time::OffsetDateTime,
    /// Random token that makes this holder's value unique.
    pub token: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} by pid {} on {} since {}",
            self.operation,
            self.pid,
            self.host,
            rfc3339(self.since)
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
    token: String,
    cluster: String,
    lost: watch::Receiver<bool>,
    /// When the lock was last known to be ours (taken or refreshed).
    confirmed: watch::Receiver<Instant>,
    refresher: JoinHandle<()>,
}

impl Lock {
    /// Takes the lock for `operation`, or says who holds it.
    pub async fn acquire(etcd: &Client, operation: &str) -> Result<Lock> {
        let holder = Holder {
            operation: operation.to_owned(),
            host: hostname(),
            pid: std::process::id(),
            since: time::OffsetDateTime::now_utc(),
            token: random_token(),
        };
        let value = serde_json::to_string(&holder).expect("holder serialises");
        let cluster = cluster_id(etcd).await?;
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
        let (confirmed_tx, confirmed) = watch::channel(Instant::now());
        let refresher = tokio::spawn(refresh(etcd.clone(), value.clone(), lost_tx, confirmed_tx));
        Ok(Lock {
            etcd: etcd.clone(),
            value,
            token: holder.token,
            cluster,
            lost,
            confirmed,
            refresher,
        })
    }

    /// This holder's unique token (as stored in the lock's value).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The id of the cluster whose lock this is.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// True once a refresh found the lock gone or taken by someone else, or no refresh has
    /// succeeded for `TTL - MARGIN`.
    pub fn is_lost(&self) -> bool {
        self.lost_because().is_some()
    }

    fn lost_because(&self) -> Option<String> {
        verdict(*self.lost.borrow(), self.confirmed.borrow().elapsed())
    }

    /// An error when the lock is lost, naming the step that must not run without it.
    pub fn check(&self, before: &str) -> Result<()> {
        match self.lost_because() {
            None => Ok(()),
            Some(why) => Err(Error::new(
                ErrorKind::Locked,
                format!("the cluster lock was lost ({why}); stopped before {before}"),
                "check that etcd is healthy and reachable from this host, then run it again",
            )),
        }
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

/// Why a lock is lost, if it is: taken over (`taken`), or `quiet` since it was last confirmed
/// leaves less than `MARGIN` of its TTL.
fn verdict(taken: bool, quiet: Duration) -> Option<String> {
    if taken {
        return Some("it expired or another process took it".into());
    }
    (quiet >= TTL.saturating_sub(MARGIN)).then(|| {
        format!(
            "no refresh reached etcd for {} s, so it may have expired (TTL {} s)",
            quiet.as_secs(),
            TTL.as_secs()
        )
    })
}

async fn refresh(
    etcd: Client,
    value: String,
    lost: watch::Sender<bool>,
    confirmed: watch::Sender<Instant>,
) {
    let mut tick = tokio::time::interval(REFRESH);
    tick.tick().await;
    loop {
        tick.tick().await;
        let asked = Instant::now();
        match etcd.swap(KEY, &value, &value, Some(TTL)).await {
            // The new TTL runs from when the request was sent, at the latest.
            Ok(Conditional::Done(_)) => {
                let _ = confirmed.send(asked);
            }
            Ok(Conditional::Failed(_)) => {
                tracing::error!("the cluster lock was lost (expired or taken over)");
                let _ = lost.send(true);
                return;
            }
            // etcd briefly away: the TTL leaves room for the next try; `check` stops the holder
            // once it does not.
            Err(e) => tracing::warn!("could not refresh the cluster lock: {e}"),
        }
    }
}

/// The cluster's id, made by whoever asks first.
async fn cluster_id(etcd: &Client) -> Result<String> {
    if let Some(id) = etcd.get(CLUSTER_ID_KEY).await? {
        return Ok(id);
    }
    let fresh = random_token();
    match etcd.create(CLUSTER_ID_KEY, &fresh, None).await? {
        Conditional::Done(_) => Ok(fresh),
        // Another process made it first: theirs stands.
        Conditional::Failed(_) => etcd.get(CLUSTER_ID_KEY).await?.ok_or_else(|| {
            Error::new(
                ErrorKind::Etcd,
                format!("{CLUSTER_ID_KEY} vanished while it was being created"),
                "run it again",
            )
        }),
    }
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned())
}

pub(crate) fn random_token() -> String {
    use std::hash::{BuildHasher, RandomState};
    let a = RandomState::new().hash_one(std::process::id());
    let b = RandomState::new().hash_one(std::time::SystemTime::now());
    format!("{a:016x}{b:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_without_a_refresh_for_most_of_its_ttl_is_lost() {
        assert_eq!(verdict(false, Duration::ZERO), None);
        assert_eq!(verdict(false, REFRESH * 2), None);
        let silent = verdict(false, TTL.saturating_sub(MARGIN)).expect("lost after TTL - MARGIN");
        assert!(silent.contains("no refresh reached etcd"), "{silent}");
        assert!(verdict(true, Duration::ZERO).is_some());
        // A failed refresh or two still leaves the holder inside its TTL.
        assert!(REFRESH * 2 < TTL.saturating_sub(MARGIN));
    }
}
