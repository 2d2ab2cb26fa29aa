//! Repository leases: which runs use a repository right now, written in the repository itself, so
//! runs that do not share the cluster lock (two clusters, one repository; or a holder cut off
//! from etcd) still see each other.
//!
//! Owns: the files `leases/<token>.json` ([`Record`]), their renewal, and the rules that read them.
//! Invariants:
//! - Every run that writes snapshots, deletes them or reads them (snapshot, prune, restore,
//!   verify) holds a lease: written when it starts, renewed every [`RENEW`], removed at its end.
//! - A run writes its own lease before it reads the others'. The repository reads its own writes
//!   (a local directory; S3), so of a prune and any other run that overlap, at least one sees the
//!   other, whatever the timing.
//! - A snapshot, restore or verify refuses to start beside a live prune. A prune refuses to start
//!   beside a live snapshot (whose blobs no manifest names yet, and whose reused blobs are old), and
//!   keeps every snapshot a live restore or verify reads.
//! - A lease not renewed for [`TTL`] is dead, by the reader's clock. Its holder stops trusting it
//!   after [`HOLD`] without a successful renewal and checks it before every step that deletes or
//!   commits, so clocks of hosts sharing a repository may differ by up to `TTL - HOLD`.
//! - A lease of the reader's own cluster, from a run that no longer holds the cluster lock (the
//!   reader holds it now) and silent for [`ABANDONED`], is a dead run's: a live holder renews
//!   every [`RENEW`], and one that lost the lock stops before its next commit or delete anyway.
//! - Dead leases are removed by whoever finds them. Leases hold no secret.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, ErrorKind, Result};
use crate::lock::Lock;
use crate::repository::{Repository, SnapshotId};
use crate::rfc3339::rfc3339;

/// Where leases live in a repository.
pub const DIR: &str = "leases/";
/// The `format` of a lease file.
pub const FORMAT: &str = "deis-backup-lease/1";
/// How long a lease outlives a holder that stops renewing it.
pub const TTL: Duration = Duration::from_secs(300);
/// How often a holder renews its lease.
pub const RENEW: Duration = Duration::from_secs(15);
/// How long a holder trusts its lease without a successful renewal.
pub const HOLD: Duration = Duration::from_secs(120);
/// How long a lease of the reader's own cluster, whose run lost the cluster lock, may stay silent
/// before it counts as a dead run's.
pub const ABANDONED: Duration = Duration::from_secs(30);

/// What a run does with the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Snapshot,
    Prune,
    Restore,
    Verify,
}

impl Operation {
    /// Whether a run of `self` must not start beside a live run of `other`.
    pub fn refused_beside(self, other: Operation) -> bool {
        use Operation::{Prune, Snapshot};
        match self {
            Prune => matches!(other, Prune | Snapshot),
            _ => other == Prune,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Snapshot => "snapshot",
            Operation::Prune => "prune",
            Operation::Restore => "restore",
            Operation::Verify => "verify",
        }
    }
}

/// One lease file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Record {
    pub format: String,
    /// Unique per run; the file's name.
    pub token: String,
    pub operation: Operation,
    pub host: String,
    pub pid: u32,
    /// The holder's cluster id and cluster-lock token, when it holds a cluster lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_token: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub started: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub renewed: OffsetDateTime,
    /// The snapshots the run reads; a prune keeps them.
    #[serde(default)]
    pub reads: Vec<SnapshotId>,
}

impl Record {
    /// The lease's file in the repository.
    fn file_name(&self) -> String {
        format!("{DIR}{}.json", self.token)
    }

    fn new(operation: Operation, reads: Vec<SnapshotId>, lock: Option<&Lock>) -> Record {
        let now = OffsetDateTime::now_utc();
        Record {
            format: FORMAT.to_owned(),
            token: crate::lock::random_token(),
            operation,
            host: crate::lock::hostname(),
            pid: std::process::id(),
            cluster: lock.map(|l| l.cluster().to_owned()),
            lock_token: lock.map(|l| l.token().to_owned()),
            started: now,
            renewed: now,
            reads,
        }
    }
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a {} by pid {} on {} (lease {}.json, renewed {})",
            self.operation.as_str(),
            self.pid,
            self.host,
            self.token,
            rfc3339(self.renewed)
        )
    }
}

/// Whether `other` is a live run, seen by `me` at `now`.
fn alive(other: &Record, me: &Record, now: OffsetDateTime) -> bool {
    let quiet = now - other.renewed;
    if quiet >= TTL {
        return false;
    }
    let same_cluster = other.cluster.is_some() && other.cluster == me.cluster;
    let lost_lock = me.lock_token.is_some() && other.lock_token != me.lock_token;
    !(same_cluster && lost_lock && quiet >= ABANDONED)
}

/// A held lease, renewed in the background until [`Lease::release`] (or drop, which stops
/// renewing and lets it lapse).
#[derive(Debug)]
pub struct Lease {
    repo: Repository,
    name: String,
    confirmed: watch::Receiver<Instant>,
    renewer: JoinHandle<()>,
}

impl Lease {
    /// Writes this run's lease, then reads the other live ones (removing dead ones it finds);
    /// refused beside a run it must not overlap. `lock` is the cluster lock the run holds, if any.
    pub async fn take(
        repo: &Repository,
        operation: Operation,
        reads: Vec<SnapshotId>,
        lock: Option<&Lock>,
    ) -> Result<(Lease, Vec<Record>)> {
        let me = Record::new(operation, reads, lock);
        let lease = Lease::write_first(repo, &me).await?;
        let (lease, others) = look(repo, &me, Some(lease)).await?;
        Ok((lease.expect("look returns the lease it was given"), others))
    }

    /// [`Lease::take`] for a run that only reads: a repository it cannot write (read-only
    /// credentials or mount) still gives it the other leases, with a warning that its own is
    /// missing.
    pub async fn take_to_read(
        repo: &Repository,
        operation: Operation,
        reads: Vec<SnapshotId>,
        lock: Option<&Lock>,
    ) -> Result<(Option<Lease>, Vec<Record>)> {
        let me = Record::new(operation, reads, lock);
        let lease = match Lease::write_first(repo, &me).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(
                    "{}; a prune from elsewhere will not know this run reads the snapshot",
                    e.message()
                );
                None
            }
        };
        look(repo, &me, lease).await
    }

    async fn write_first(repo: &Repository, me: &Record) -> Result<Lease> {
        let name = me.file_name();
        let asked = Instant::now();
        write(repo, &name, me).await.map_err(|e| {
            e.context(format!(
                "writing this run's lease in the repository ({name})"
            ))
        })?;
        let (confirmed_tx, confirmed) = watch::channel(asked);
        let renewer = tokio::spawn(renew(repo.clone(), name.clone(), me.clone(), confirmed_tx));
        Ok(Lease {
            repo: repo.clone(),
            name,
            confirmed,
            renewer,
        })
    }

    /// The lease's file in the repository (`leases/<token>.json`).
    pub fn file(&self) -> &str {
        &self.name
    }

    /// An error once the lease may have lapsed, naming the step that must not run without it.
    pub fn check(&self, before: &str) -> Result<()> {
        let quiet = self.confirmed.borrow().elapsed();
        if quiet < HOLD {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Locked,
            format!(
                "the repository lease was lost (no renewal reached the repository for {} s); \
                 stopped before {before}",
                quiet.as_secs()
            ),
            "check that the repository is reachable from this host, then run it again",
        ))
    }

    /// Stops renewing and removes the lease.
    pub async fn release(self) -> Result<()> {
        self.renewer.abort();
        self.repo
            .backend()
            .delete(std::slice::from_ref(&self.name))
            .await
    }

    async fn release_quietly(self) {
        let name = self.name.clone();
        if let Err(e) = self.release().await {
            tracing::warn!("could not remove the lease {name}: {}", e.message());
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// Whether the lease in `file` exists and was renewed less than [`TTL`] before `now`: the run
/// that holds it is alive.
pub async fn renewed_within(repo: &Repository, file: &str, now: OffsetDateTime) -> Result<bool> {
    match repo.backend().get_bytes(file).await {
        Ok(data) => {
            Ok(serde_json::from_slice::<Record>(&data).is_ok_and(|r| now - r.renewed < TTL))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The other live leases, seen by `me` (whose `lease`, if written, is released when its run is
/// refused or the look fails).
async fn look(
    repo: &Repository,
    me: &Record,
    lease: Option<Lease>,
) -> Result<(Option<Lease>, Vec<Record>)> {
    let refused = match others(repo, me).await {
        Ok(others) => match refusal(me.operation, &others) {
            None => return Ok((lease, others)),
            Some(e) => e,
        },
        Err(e) => e,
    };
    if let Some(l) = lease {
        l.release_quietly().await;
    }
    Err(refused)
}

/// The error for a run of `operation` that must not start beside one of `others`.
fn refusal(operation: Operation, others: &[Record]) -> Option<Error> {
    let other = others
        .iter()
        .find(|o| operation.refused_beside(o.operation))?;
    Some(Error::new(
        ErrorKind::Locked,
        format!(
            "{} refused: {other} is using this repository",
            operation.as_str()
        ),
        format!(
            "wait for it to finish; if it died, its lease lapses {} s after its last renewal",
            TTL.as_secs()
        ),
    ))
}

async fn write(repo: &Repository, name: &str, record: &Record) -> Result<()> {
    let data = serde_json::to_vec_pretty(record).expect("a lease serializes");
    repo.backend().replace_bytes(name, Bytes::from(data)).await
}

/// The live leases other than `me`'s; dead ones are removed (a failure to is a warning).
async fn others(repo: &Repository, me: &Record) -> Result<Vec<Record>> {
    let now = OffsetDateTime::now_utc();
    let mut live = Vec::new();
    let mut dead = Vec::new();
    let mine = me.file_name();
    for (name, _) in repo.backend().list(DIR).await? {
        if name == mine
            || std::path::Path::new(&name)
                .extension()
                .is_none_or(|e| e != "json")
        {
            continue;
        }
        let data = match repo.backend().get_bytes(&name).await {
            Ok(d) => d,
            // Released between the listing and the read.
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        match serde_json::from_slice::<Record>(&data) {
            Ok(r) if r.format == FORMAT && alive(&r, me, now) => live.push(r),
            Ok(r) if r.format == FORMAT => dead.push(name),
            // Unreadable or of another version: it may be a live run's, so nothing goes on
            // until someone looks.
            _ => {
                return Err(Error::new(
                    ErrorKind::Repository,
                    format!("{name} in the repository is not a lease this version reads"),
                    "if no deis-backup of another version uses this repository, remove that file",
                ));
            }
        }
    }
    if !dead.is_empty() {
        tracing::info!("removing {} dead run(s)' leases", dead.len());
        if let Err(e) = repo.backend().delete(&dead).await {
            tracing::warn!("could not remove dead leases: {}", e.message());
        }
    }
    Ok(live)
}

async fn renew(repo: Repository, name: String, mut me: Record, confirmed: watch::Sender<Instant>) {
    let mut tick = tokio::time::interval(RENEW);
    tick.tick().await;
    loop {
        tick.tick().await;
        let asked = Instant::now();
        me.renewed = OffsetDateTime::now_utc();
        match write(&repo, &name, &me).await {
            Ok(()) => {
                let _ = confirmed.send(asked);
            }
            // Briefly away: `HOLD` leaves room for the next try; `check` stops the holder once it
            // does not.
            Err(e) => tracing::warn!("could not renew the repository lease: {}", e.message()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static NOW: std::sync::LazyLock<OffsetDateTime> =
        std::sync::LazyLock::new(OffsetDateTime::now_utc);

    fn record(op: Operation, cluster: Option<&str>, lock: Option<&str>, ago: u64) -> Record {
        let t = *NOW - Duration::from_secs(ago);
        Record {
            format: FORMAT.into(),
            token: format!("t{ago}"),
            operation: op,
            host: "h".into(),
            pid: 1,
            cluster: cluster.map(Into::into),
            lock_token: lock.map(Into::into),
            started: t,
            renewed: t,
            reads: Vec::new(),
        }
    }

    #[test]
    fn leases_live_until_their_ttl_and_a_dead_run_of_this_cluster_sooner() {
        let now = *NOW;
        let me = record(Operation::Prune, Some("c1"), Some("mine"), 0);
        // Another cluster's run: only the TTL ends it (its lock is not ours to judge).
        let other = record(Operation::Snapshot, Some("c2"), Some("x"), 200);
        assert!(alive(&other, &me, now));
        let other = record(Operation::Snapshot, Some("c2"), Some("x"), TTL.as_secs());
        assert!(!alive(&other, &me, now));
        // A verify holds no cluster lock: the TTL too.
        let verify = record(Operation::Verify, None, None, 200);
        assert!(alive(&verify, &me, now));
        // Our cluster, another lock token: a dead run's once silent for ABANDONED...
        let dead = record(
            Operation::Snapshot,
            Some("c1"),
            Some("x"),
            ABANDONED.as_secs(),
        );
        assert!(!alive(&dead, &me, now));
        // ...but a run that lost the lock and still renews (etcd cut off) stays live.
        let cut_off = record(Operation::Snapshot, Some("c1"), Some("x"), 5);
        assert!(alive(&cut_off, &me, now));
        // Without the cluster lock, a reader cannot judge its cluster's runs.
        let reader = record(Operation::Verify, Some("c1"), None, 0);
        assert!(alive(&dead, &reader, now));
        // A holder that renews on time is safe from others with clocks up to TTL - HOLD apart.
        assert!(HOLD + RENEW < TTL && ABANDONED >= RENEW * 2);
    }

    async fn repo(dir: &std::path::Path) -> Repository {
        Repository::open_or_init(&crate::repository::RepositoryOptions {
            location: Some(dir.join("repo").display().to_string()),
            fsync: Some(false),
            ..Default::default()
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn each_run_sees_the_leases_taken_before_its_own_and_dead_ones_go() {
        let tmp = tempfile::tempdir().unwrap();
        let r = repo(tmp.path()).await;
        let id: SnapshotId = "20260101T000000Z-0001".parse().unwrap();
        let (verify, others) = Lease::take(&r, Operation::Verify, vec![id.clone()], None)
            .await
            .unwrap();
        assert!(others.is_empty());
        let (prune, others) = Lease::take(&r, Operation::Prune, Vec::new(), None)
            .await
            .unwrap();
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].operation, Operation::Verify);
        assert_eq!(others[0].reads, [id]);
        // Beside the prune, a snapshot and a verify are refused, and leave no lease.
        for op in [Operation::Snapshot, Operation::Verify] {
            let e = Lease::take(&r, op, Vec::new(), None).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Locked);
            assert!(
                e.message()
                    .starts_with(&format!("{} refused: a prune by pid", op.as_str())),
                "{}",
                e.message()
            );
        }
        assert_eq!(r.backend().list(DIR).await.unwrap().len(), 2);
        prune.release().await.unwrap();
        // Beside a snapshot, a prune is refused; a verify is not.
        let (snap, _) = Lease::take(&r, Operation::Snapshot, Vec::new(), None)
            .await
            .unwrap();
        let e = Lease::take(&r, Operation::Prune, Vec::new(), None)
            .await
            .unwrap_err();
        assert!(
            e.message().starts_with("prune refused: a snapshot by pid"),
            "{}",
            e.message()
        );
        snap.release().await.unwrap();
        verify.check("x").unwrap();
        verify.release().await.unwrap();
        assert!(r.backend().list(DIR).await.unwrap().is_empty());

        // A lease whose holder died long ago is removed by the next run that looks.
        let old = record(Operation::Snapshot, None, None, TTL.as_secs() + 1);
        write(&r, &old.file_name(), &old).await.unwrap();
        let (l, others) = Lease::take(&r, Operation::Prune, Vec::new(), None)
            .await
            .unwrap();
        assert!(others.is_empty());
        assert_eq!(r.backend().list(DIR).await.unwrap().len(), 1);
        l.release().await.unwrap();

        // A lease file this version cannot read stops the run, and says which file.
        r.backend()
            .replace_bytes("leases/x.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let e = Lease::take(&r, Operation::Prune, Vec::new(), None)
            .await
            .unwrap_err();
        assert!(e.message().contains("leases/x.json"), "{}", e.message());
        assert!(
            r.backend()
                .list(DIR)
                .await
                .unwrap()
                .iter()
                .all(|(n, _)| n == "leases/x.json"),
            "the refused run's own lease stayed"
        );
    }

    #[tokio::test]
    async fn a_run_that_cannot_write_its_lease_still_sees_the_others() {
        use crate::testkit::memory::Mode;
        let (r, backend) = crate::testkit::memory_repo();
        let (snap, _) = Lease::take(&r, Operation::Snapshot, Vec::new(), None)
            .await
            .unwrap();
        backend.set_mode(Mode::ReadOnly);
        let e = Lease::take(&r, Operation::Verify, Vec::new(), None)
            .await
            .unwrap_err();
        assert!(
            e.message()
                .starts_with("writing this run's lease in the repository (leases/"),
            "{e}"
        );
        let (mine, others) = Lease::take_to_read(&r, Operation::Verify, Vec::new(), None)
            .await
            .unwrap();
        assert!(mine.is_none());
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].operation, Operation::Snapshot);
        // Reading without a lease does not let a prune past a live snapshot.
        let e = Lease::take_to_read(&r, Operation::Prune, Vec::new(), None)
            .await
            .unwrap_err();
        assert!(e.message().starts_with("prune refused: a snapshot"), "{e}");
        // A lease that cannot be removed is a warning of the run's hold, not its failure.
        let hold = crate::hold::Hold::new(None, Some(snap));
        hold.check("the manifest").unwrap();
        let warnings = hold.release().await;
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].starts_with("could not remove this run's repository lease"),
            "{warnings:?}"
        );
        backend.set_mode(Mode::ReadWrite);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_renewed_until_it_is_released() {
        let (r, backend) = crate::testkit::memory_repo();
        let (lease, _) = Lease::take(&r, Operation::Verify, Vec::new(), None)
            .await
            .unwrap();
        let name = lease.name.clone();
        let writes = || {
            backend
                .log()
                .iter()
                .filter(|l| **l == format!("replace {name}"))
                .count()
        };
        assert_eq!(writes(), 1);
        tokio::time::sleep(RENEW * 3 + Duration::from_secs(1)).await;
        assert_eq!(writes(), 4, "written, then renewed every RENEW");
        let record: Record = serde_json::from_slice(&backend.get(&name).unwrap()).unwrap();
        assert!(record.renewed > record.started);
        lease.release().await.unwrap();
        assert!(backend.get(&name).is_none());
        tokio::time::sleep(RENEW * 3).await;
        assert_eq!(writes(), 4, "no renewal after the release");
        assert!(backend.get(&name).is_none());
    }
}
