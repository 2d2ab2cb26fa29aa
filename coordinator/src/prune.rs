//! `prune`: forgets the snapshots a retention policy does not keep, then deletes every blob no
//! remaining snapshot names.
//!
//! Invariants:
//! - The caller holds the cluster lock and a repository lease beside which no snapshot runs (see
//!   `lease`), so no snapshot is being written: an incomplete snapshot (no manifest) is then a
//!   dead run and is removed too. Both are checked before every deletion (each snapshot, each
//!   batch of blobs): once either is lost, prune stops.
//! - A snapshot a live restore or verify reads (their leases say which) is kept, whatever the
//!   policy says.
//! - A policy that keeps nothing is refused (see `retention`).
//! - Snapshots go manifest first; blobs go only after every forgotten snapshot is gone, and only if
//!   no kept snapshot names them.
//! - `--dry-run` computes the same decisions and counts and deletes nothing.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::hold::Hold;
use crate::lease::Record;
use crate::repository::{PartRef, PruneStats, Repository, Sha256, SnapshotId};
use crate::retention::{self, Candidate, Decision, Policy};

/// Options of `prune`. Serve the CLI, the config file (`[prune]`) and the library; an unset
/// `keep-*` keeps nothing by that rule.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args, merge::Merge)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
#[merge(strategy = merge::option::overwrite_none)]
pub struct PruneOptions {
    /// Keep the N newest snapshots [default: 0].
    #[arg(long)]
    pub keep_last: Option<usize>,
    /// Keep the newest snapshot of each of the last N days that have one [default: 0].
    #[arg(long)]
    pub keep_daily: Option<usize>,
    /// Keep the newest snapshot of each of the last N weeks that have one [default: 0].
    #[arg(long)]
    pub keep_weekly: Option<usize>,
    /// Keep the newest snapshot of each of the last N months that have one [default: 0].
    #[arg(long)]
    pub keep_monthly: Option<usize>,
    /// Show what would go, delete nothing.
    #[arg(long)]
    #[serde(skip)]
    #[merge(strategy = merge::bool::overwrite_false)]
    pub dry_run: bool,
}

impl PruneOptions {
    pub fn policy(&self) -> Policy {
        Policy {
            last: self.keep_last.unwrap_or(0),
            daily: self.keep_daily.unwrap_or(0),
            weekly: self.keep_weekly.unwrap_or(0),
            monthly: self.keep_monthly.unwrap_or(0),
        }
    }
}

/// What prune decided and did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub snapshots: Vec<DecisionOut>,
    /// Incomplete snapshot directories removed.
    pub incomplete: Vec<String>,
    pub blobs_deleted: u64,
    pub bytes_deleted: u64,
    pub blobs_kept: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecisionOut {
    pub id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub keep: bool,
    pub reasons: Vec<&'static str>,
}

/// The reason a snapshot in use by another run is kept.
pub const IN_USE: &str = "in-use";

/// Applies `options` to `repo` while `hold` is held; stops before any deletion once it is lost.
/// `others` are the live leases of other runs on the repository.
pub async fn prune(
    repo: &Repository,
    options: &PruneOptions,
    hold: &Hold,
    others: &[Record],
) -> Result<Report> {
    let mut candidates = Vec::new();
    for id in repo.snapshots().await? {
        let m = repo.manifest(&id).await?;
        candidates.push(Candidate {
            id: id.to_string(),
            time: m.started,
        });
    }
    let mut decisions: Vec<Decision> = retention::apply(options.policy(), &candidates)
        .map_err(|e| Error::config(e.to_string()))?;
    let in_use: HashSet<&str> = others
        .iter()
        .flat_map(|o| o.reads.iter().map(SnapshotId::as_str))
        .collect();
    for d in &mut decisions {
        if in_use.contains(d.id.as_str()) {
            d.keep = true;
            d.reasons.push(IN_USE);
        }
    }
    let incomplete = repo.incomplete_snapshots().await?;
    let times: std::collections::HashMap<&str, OffsetDateTime> =
        candidates.iter().map(|c| (c.id.as_str(), c.time)).collect();
    let out: Vec<DecisionOut> = decisions
        .iter()
        .map(|d| DecisionOut {
            id: d.id.clone(),
            time: times[d.id.as_str()],
            keep: d.keep,
            reasons: d.reasons.clone(),
        })
        .collect();

    let stats = if options.dry_run {
        would_delete(repo, &decisions).await?
    } else {
        for d in decisions.iter().filter(|d| !d.keep) {
            hold.check(&format!("forgetting snapshot {}", d.id))?;
            repo.delete_snapshot(&d.id.parse()?).await?;
        }
        for id in &incomplete {
            hold.check(&format!("removing incomplete snapshot {id}"))?;
            repo.delete_snapshot(id).await?;
        }
        repo.prune_blobs(|| hold.check("deleting unreferenced blobs"))
            .await?
    };
    Ok(Report {
        dry_run: options.dry_run,
        snapshots: out,
        incomplete: incomplete.iter().map(ToString::to_string).collect(),
        blobs_deleted: stats.blobs_deleted,
        bytes_deleted: stats.bytes_deleted,
        blobs_kept: stats.blobs_kept,
    })
}

/// The blob counts a real prune would give.
async fn would_delete(repo: &Repository, decisions: &[Decision]) -> Result<PruneStats> {
    let mut keep: HashSet<Sha256> = HashSet::new();
    for d in decisions.iter().filter(|d| d.keep) {
        let m = repo.manifest(&d.id.parse()?).await?;
        keep.extend(m.parts.values().flat_map(PartRef::blobs).map(|b| b.sha256));
        for bucket in m.buckets.keys() {
            keep.extend(
                repo.listing(&m, bucket)
                    .await?
                    .into_iter()
                    .map(|e| e.sha256),
            );
        }
    }
    let stored = repo.blobs().await?;
    Ok(PruneStats::of(&stored, &repo.unreferenced(&stored, &keep)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::Operation;
    use crate::repository::BlobRef;
    use crate::testkit;

    /// Snapshot `id`, naming a blob of its own (`id`'s bytes) and one every snapshot shares.
    async fn snapshot(repo: &Repository, id: &str) -> (SnapshotId, BlobRef) {
        let id: SnapshotId = id.parse().unwrap();
        let mut s = repo.start_snapshot(id.clone());
        let own = repo
            .write_blob_from(id.as_str().as_bytes())
            .await
            .unwrap()
            .blob;
        s.add_part("own", own).unwrap();
        let shared = repo.write_blob_from(&b"shared"[..]).await.unwrap().blob;
        s.add_part("shared", shared).unwrap();
        s.commit().await.unwrap();
        (id, own)
    }

    fn reading(id: &SnapshotId) -> Record {
        let now = OffsetDateTime::now_utc();
        Record {
            format: crate::lease::FORMAT.into(),
            token: "t".into(),
            operation: Operation::Restore,
            host: "h".into(),
            pid: 1,
            cluster: None,
            lock_token: None,
            started: now,
            renewed: now,
            reads: vec![id.clone()],
        }
    }

    #[tokio::test]
    #[expect(
        clippy::too_many_lines,
        reason = "one repository: refused, dry run, then the real prune"
    )]
    async fn prune_forgets_what_the_policy_drops_keeps_what_others_read_and_only_orphans_go() {
        let (repo, backend) = testkit::memory_repo();
        let mut taken = Vec::new();
        for id in ["s1", "s2", "s3", "s4"] {
            taken.push(snapshot(&repo, id).await);
        }
        // A dead run's snapshot, with a blob no manifest names.
        let mut dead = repo.start_snapshot("s5".parse().unwrap());
        dead.add_part_from_reader("p", &b"half"[..]).await.unwrap();
        dead.add_bucket("b", &[]).await.unwrap();
        backend.clear_log();

        let nothing = PruneOptions::default();
        let e = prune(&repo, &nothing, &Hold::default(), &[])
            .await
            .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Config);
        assert!(backend.log().is_empty(), "an empty policy deletes nothing");

        let others = [reading(&taken[1].0)];
        let keep_last = PruneOptions {
            keep_last: Some(1),
            dry_run: true,
            ..PruneOptions::default()
        };
        let dry = prune(&repo, &keep_last, &Hold::default(), &others)
            .await
            .unwrap();
        assert!(
            backend.log().is_empty(),
            "a dry run deletes nothing: {:?}",
            backend.log()
        );
        let decisions: Vec<_> = dry
            .snapshots
            .iter()
            .map(|d| (&d.id[..], d.keep, d.reasons.clone()))
            .collect();
        assert_eq!(
            decisions,
            [
                ("s4", true, vec!["last"]),
                ("s3", false, vec![]),
                ("s2", true, vec![IN_USE]),
                ("s1", false, vec![])
            ]
        );
        assert_eq!(dry.incomplete, ["s5"]);

        let real = PruneOptions {
            dry_run: false,
            ..keep_last
        };
        let done = prune(&repo, &real, &Hold::default(), &others)
            .await
            .unwrap();
        assert_eq!(
            (done.blobs_deleted, done.bytes_deleted, done.blobs_kept),
            (dry.blobs_deleted, dry.bytes_deleted, dry.blobs_kept),
            "the dry run counted what the real one did"
        );
        assert_eq!(
            (done.blobs_deleted, done.blobs_kept),
            (3, 3),
            "s1's, s3's and the dead run's own blobs"
        );
        let ids: Vec<String> = repo
            .snapshots()
            .await
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ids, ["s2", "s4"]);
        assert!(repo.incomplete_snapshots().await.unwrap().is_empty());
        for (i, (_, own)) in taken.iter().enumerate() {
            let there = repo.has_blob(own).await.unwrap();
            assert_eq!(there, i % 2 == 1, "snapshot s{}'s own blob", i + 1);
        }
        assert!(
            repo.has_blob(&BlobRef {
                sha256: Sha256::of(b"shared"),
                size: 6
            })
            .await
            .unwrap()
        );
        // Manifests go before the rest of their snapshot, and snapshots before blobs.
        let log = backend.log();
        let first = |what: &str| log.iter().position(|l| l.starts_with(what)).unwrap();
        assert!(log[0].ends_with("/manifest.json"), "{log:?}");
        assert!(
            first("delete blobs/") > first("delete snapshots/s5/"),
            "{log:?}"
        );
    }
}
