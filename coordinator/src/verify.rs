//! `verify`: is a snapshot whole? Every part and every listed object's blob must exist with its
//! recorded size; with `--read-data`, every byte is read again and its sha256 compared.
//!
//! What each depth catches: [`Depth::Sizes`] a missing blob, one cut short or grown, and a blob
//! named with two different sizes; it cannot see bytes changed in place (same size).
//! [`Depth::All`] catches those too: a blob's name is the SHA-256 of the bytes it was written
//! with, and every snapshot naming it (an incremental one carries the name over) reports it.
//! [`Depth::Subset`] reads again only the blobs of one slice ([`Subset`]), so that runs on
//! several days together read everything once.
//!
//! The database bucket's WAL-E chain ([`crate::wal_e`]) is worked out again from the listing and
//! the sentinels in the repository: it must match what the manifest recorded, and when the
//! database cannot recover from it by itself that is a warning of its own (`recovers` false), not
//! damage: the snapshot still restores with `--database-sql`.
//!
//! Invariants:
//! - Reads only. Every problem is collected (not just the first) and named by part or bucket/key.
//! - Each distinct blob is checked once, however many objects or snapshots name it; it is
//!   re-hashed when any of its names asks for it.
//! - `restore` runs the same checks (parts re-hashed) before it writes anything; bucket objects
//!   are re-hashed as they are uploaded (`bucket_restore`), before each one is committed.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;

use crate::error::Result;
use crate::repository::{BlobCheck, BlobRef, Manifest, ObjectEntry, Repository, Sha256, WalChain};
use crate::snapshot::BUCKET_DATABASE_LABEL;
use crate::wal_e;

mod subset;
pub use subset::{NotSubset, Subset};

/// How deep to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Sizes of every blob.
    Sizes,
    /// Sizes of every blob; parts (dump, archives, etcd export) re-hashed.
    Parts,
    /// Every blob re-hashed.
    All,
    /// Sizes of every blob; the blobs of this slice re-hashed (parts and objects alike).
    Subset(Subset),
}

impl Depth {
    /// Whether a blob is read again: `part` for a part's blob, else a listed object's.
    fn rehash(self, blob: &Sha256, part: bool) -> bool {
        match self {
            Depth::Sizes => false,
            Depth::Parts => part,
            Depth::All => true,
            Depth::Subset(s) => s.contains(blob),
        }
    }
}

/// What `verify` found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub snapshot: String,
    pub parts: u64,
    pub objects: u64,
    pub blobs_checked: u64,
    /// Of them, the blobs read again and their bytes.
    pub blobs_read: u64,
    pub bytes_read: u64,
    /// The slice read again, with `--read-data-subset`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// The database bucket's WAL-E chain as the snapshot holds it, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal_e: Option<WalChain>,
    /// Whether a database restored from the snapshot's buckets recovers by itself (`None`: no
    /// WAL-E chain to recover from).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovers: Option<bool>,
    /// One line per problem; empty when the snapshot is whole.
    pub problems: Vec<String>,
    /// Not damage, but what the operator must know: why the database cannot recover by itself.
    pub warnings: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks `manifest`'s snapshot in `repo`.
pub async fn verify(repo: &Repository, manifest: &Manifest, depth: Depth) -> Result<Report> {
    let mut report = Report {
        snapshot: manifest.id.to_string(),
        subset: match depth {
            Depth::Subset(s) => Some(s.to_string()),
            _ => None,
        },
        ..Report::default()
    };
    // blob -> (size, what names it, re-hash?)
    let mut blobs: BTreeMap<Sha256, (u64, String, bool)> = BTreeMap::new();
    for (name, part) in &manifest.parts {
        report.parts += 1;
        let all = part.blobs();
        let n = all.len();
        for (i, blob) in all.into_iter().enumerate() {
            let what = if n > 1 {
                format!("part {name} segment {} of {n}", i + 1)
            } else {
                format!("part {name}")
            };
            name_blob(
                &mut blobs,
                &mut report.problems,
                blob.sha256,
                blob.size,
                what,
                depth.rehash(&blob.sha256, true),
            );
        }
    }
    for bucket in manifest.buckets.keys() {
        let listing = match repo.listing(manifest, bucket).await {
            Ok(l) => l,
            Err(e) => {
                report
                    .problems
                    .push(format!("bucket {bucket}: {}", e.message()));
                continue;
            }
        };
        if Some(bucket.as_str()) == database_bucket(manifest) {
            check_chain(repo, manifest, bucket, &listing, &mut report).await;
        }
        for e in listing {
            report.objects += 1;
            name_blob(
                &mut blobs,
                &mut report.problems,
                e.sha256,
                e.size,
                format!("s3://{bucket}/{}", e.key),
                depth.rehash(&e.sha256, false),
            );
        }
    }

    let checks = futures::stream::iter(blobs)
        .map(|(sha, (size, what, rehash))| async move {
            check_blob(repo, sha, size, rehash)
                .await
                .map(|(read, problem)| (rehash, read, problem.map(|p| format!("{what}: {p}"))))
        })
        .buffer_unordered(16);
    let results: Vec<(bool, u64, Option<String>)> = checks.try_collect().await?;
    for (rehashed, read, problem) in results {
        report.blobs_checked += 1;
        report.blobs_read += u64::from(rehashed);
        report.bytes_read += read;
        report.problems.extend(problem);
    }
    report.problems.sort();
    Ok(report)
}

/// The snapshot's database bucket: the one its chain was recorded for, else the one it labels.
fn database_bucket(m: &Manifest) -> Option<&str> {
    m.wal_e
        .as_ref()
        .map(|c| c.bucket.as_str())
        .or_else(|| m.labels.get(BUCKET_DATABASE_LABEL).map(String::as_str))
}

/// Works the chain out again from `listing` and compares it with the recorded one.
async fn check_chain(
    repo: &Repository,
    manifest: &Manifest,
    bucket: &str,
    listing: &[ObjectEntry],
    report: &mut Report,
) {
    if !repo.reads_blobs() {
        // The snapshot host's key opens no sentinel: the recorded chain stands, said so.
        report.warnings.push(format!(
            "s3://{bucket}: the WAL-E chain is the one recorded at snapshot time; checking it again \
             reads its sentinels, which needs an operator's identity (--identity-file)"
        ));
        if let Some(c) = &manifest.wal_e {
            report.recovers = Some(c.recovers_by_itself());
            report.warnings.extend(c.problem());
        }
        report.wal_e.clone_from(&manifest.wal_e);
        return;
    }
    let found = match wal_e::chain_in(repo, bucket, listing).await {
        Ok(c) => c,
        Err(e) => {
            report.problems.push(format!(
                "s3://{bucket}: its WAL-E chain cannot be checked: {}",
                e.message()
            ));
            return;
        }
    };
    if let Some(recorded) = &manifest.wal_e
        && found.as_ref() != Some(recorded)
    {
        report.problems.push(format!(
            "s3://{bucket}: the listing no longer holds the WAL-E chain the manifest records \
             (base backup {})",
            recorded.latest.as_ref().map_or("none", |l| l.name.as_str())
        ));
    }
    if let Some(c) = &found {
        report.recovers = Some(c.recovers_by_itself());
        report.warnings.extend(c.problem());
    }
    report.wal_e = found;
}

/// Records that `what` names blob `sha` of `size` bytes: the first name is the one problems are
/// reported under; a later name with another size is a problem of its own (one of the two
/// records is wrong, and the blob's check can only hold it to one size).
fn name_blob(
    blobs: &mut BTreeMap<Sha256, (u64, String, bool)>,
    problems: &mut Vec<String>,
    sha: Sha256,
    size: u64,
    what: String,
    rehash: bool,
) {
    match blobs.entry(sha) {
        Entry::Vacant(v) => {
            v.insert((size, what, rehash));
        }
        Entry::Occupied(mut o) => {
            let sha = *o.key();
            let (first_size, first, again) = o.get_mut();
            *again |= rehash;
            if *first_size != size {
                problems.push(format!(
                    "{what}: blob {sha} is recorded as {size} bytes here and as {first_size} \
                     bytes by {first}"
                ));
            }
        }
    }
}

/// Checks one blob; returns the bytes read and a problem, if any.
async fn check_blob(
    repo: &Repository,
    sha: Sha256,
    size: u64,
    rehash: bool,
) -> Result<(u64, Option<String>)> {
    let blob = BlobRef { sha256: sha, size };
    let (check, read) = repo.check_blob(&blob, rehash).await?;
    let problem = match check {
        BlobCheck::Intact => None,
        BlobCheck::Missing => Some(format!("blob {sha} is missing")),
        BlobCheck::WrongSize(s) => {
            Some(format!("blob {sha} holds {s} bytes, {size} were recorded"))
        }
        BlobCheck::Corrupt(got) => Some(format!(
            "blob {sha} now hashes to {got}: its bytes are damaged"
        )),
        BlobCheck::Unreadable(why) => Some(why),
    };
    Ok((read, problem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::format::blob_path;
    use crate::repository::{BlobRef, ObjectEntry, RepositoryOptions, SnapshotId};

    fn entry(key: &str, blob: &BlobRef) -> ObjectEntry {
        ObjectEntry {
            key: key.into(),
            size: blob.size,
            etag: "x".into(),
            sha256: blob.sha256,
            last_modified: None,
            meta: crate::s3::ObjectMeta::default(),
        }
    }

    #[tokio::test]
    async fn verify_sizes_miss_bytes_changed_in_place_read_data_finds_them() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_init(&RepositoryOptions {
            location: Some(tmp.path().join("repo").display().to_string()),
            fsync: Some(false),
            ..RepositoryOptions::default()
        })
        .await
        .unwrap();
        let blob_a = repo.write_blob_from(&b"object a"[..]).await.unwrap().blob;
        let blob_b = repo.write_blob_from(&b"object b"[..]).await.unwrap().blob;
        let part = repo.write_blob_from(&b"a part"[..]).await.unwrap().blob;
        let mut snapshot = repo.start_snapshot(SnapshotId::generate());
        snapshot
            .add_bucket("registry", &[entry("a", &blob_a), entry("b", &blob_b)])
            .await
            .unwrap();
        snapshot.add_part("etcd/export.json", part).unwrap();
        let m = snapshot.commit().await.unwrap();
        for depth in [Depth::Sizes, Depth::Parts, Depth::All] {
            let report = verify(&repo, &m, depth).await.unwrap();
            assert!(report.ok(), "{depth:?}: {:?}", report.problems);
            assert_eq!(
                (report.objects, report.parts, report.blobs_checked),
                (2, 1, 3)
            );
        }

        let path = tmp.path().join("repo").join(blob_path(&blob_a.sha256));
        std::fs::write(&path, b"object A").unwrap();
        for depth in [Depth::Sizes, Depth::Parts] {
            assert!(verify(&repo, &m, depth).await.unwrap().ok(), "{depth:?}");
        }
        let report = verify(&repo, &m, Depth::All).await.unwrap();
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(
            report.problems[0].starts_with("s3://registry/a: blob ")
                && report.problems[0].contains("damaged"),
            "{:?}",
            report.problems
        );

        // Cut short: sizes see it.
        std::fs::write(&path, b"obj").unwrap();
        let report = verify(&repo, &m, Depth::Sizes).await.unwrap();
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(
            report.problems[0].contains("holds 3 bytes"),
            "{:?}",
            report.problems
        );
    }

    #[test]
    fn verify_reports_a_blob_named_with_two_sizes_and_rehashes_if_any_name_asks() {
        let mut blobs = BTreeMap::new();
        let mut problems = Vec::new();
        let sha: Sha256 = "ab".repeat(32).parse().unwrap();
        name_blob(&mut blobs, &mut problems, sha, 5, "s3://b/k".into(), false);
        name_blob(&mut blobs, &mut problems, sha, 5, "part p".into(), true);
        assert!(problems.is_empty());
        assert_eq!(blobs[&sha], (5, "s3://b/k".to_owned(), true));
        name_blob(&mut blobs, &mut problems, sha, 6, "s3://b/j".into(), false);
        assert_eq!(
            problems,
            [format!(
                "s3://b/j: blob {sha} is recorded as 6 bytes here and as 5 bytes by s3://b/k"
            )]
        );
    }

    #[tokio::test]
    async fn verify_names_each_segment_and_listing_and_reads_what_its_depth_says() {
        let (repo, backend) = crate::testkit::memory_repo();
        let seg = |b: BlobRef| crate::repository::SegmentRef {
            sha256: b.sha256,
            size: b.size,
            fingerprint: None,
        };
        let mut blobs = Vec::new();
        for data in [&b"segment 1"[..], b"segment 2", b"segment 3"] {
            blobs.push(repo.write_blob_from(data).await.unwrap().blob);
        }
        let object = repo.write_blob_from(&b"object"[..]).await.unwrap().blob;
        let mut s = repo.start_snapshot(SnapshotId::generate());
        let part = crate::repository::PartRef::Segmented(blobs.iter().copied().map(seg).collect());
        s.add_part("store/x", part).unwrap();
        s.add_bucket("registry", &[entry("k", &object)])
            .await
            .unwrap();
        s.add_bucket("builder", &[entry("k", &object)])
            .await
            .unwrap();
        let m = s.commit().await.unwrap();

        let parts = verify(&repo, &m, Depth::Parts).await.unwrap();
        assert!(parts.ok(), "{:?}", parts.problems);
        assert_eq!(
            (parts.blobs_checked, parts.bytes_read),
            (4, 27),
            "parts re-read, the object not"
        );
        assert_eq!(verify(&repo, &m, Depth::All).await.unwrap().bytes_read, 33);
        assert_eq!(verify(&repo, &m, Depth::Sizes).await.unwrap().bytes_read, 0);

        backend.remove(&blob_path(&blobs[1].sha256));
        backend.set(&blob_path(&blobs[2].sha256), &b"segment 4"[..]);
        backend.set(&m.buckets["builder"].listing, &b"{}\n"[..]);
        let sizes = verify(&repo, &m, Depth::Sizes).await.unwrap();
        assert_eq!(sizes.problems.len(), 2, "{:?}", sizes.problems);
        assert!(
            sizes.problems[0].starts_with("bucket builder: snapshot "),
            "{:?}",
            sizes.problems
        );
        assert_eq!(
            sizes.problems[1],
            format!(
                "part store/x segment 2 of 3: blob {} is missing",
                blobs[1].sha256
            )
        );
        let parts = verify(&repo, &m, Depth::Parts).await.unwrap();
        assert_eq!(parts.problems.len(), 3, "{:?}", parts.problems);
        assert!(
            parts.problems[2].starts_with("part store/x segment 3 of 3: blob ")
                && parts.problems[2].ends_with("its bytes are damaged"),
            "{:?}",
            parts.problems
        );
    }

    #[tokio::test]
    async fn subsets_one_to_m_read_every_blob_once_and_the_damaged_one_in_its_slice() {
        let (repo, backend) = crate::testkit::memory_repo();
        let mut entries = Vec::new();
        for i in 0..60u32 {
            let blob = repo
                .write_blob_from(format!("object {i}").as_bytes())
                .await
                .unwrap()
                .blob;
            entries.push(entry(&format!("k{i}"), &blob));
        }
        let dump = repo.write_blob_from(&b"the dump"[..]).await.unwrap().blob;
        let mut s = repo.start_snapshot(SnapshotId::generate());
        s.add_part("database", crate::repository::PartRef::Blob(dump))
            .unwrap();
        s.add_bucket("registry", &entries).await.unwrap();
        let m = s.commit().await.unwrap();
        let all = verify(&repo, &m, Depth::All).await.unwrap();
        assert_eq!((all.blobs_checked, all.blobs_read), (61, 61));

        let slices: Vec<Subset> = (1..=3).map(|k| format!("{k}/3").parse().unwrap()).collect();
        let mut read = (0, 0);
        for s in &slices {
            let r = verify(&repo, &m, Depth::Subset(*s)).await.unwrap();
            assert!(r.ok(), "{:?}", r.problems);
            assert_eq!(r.blobs_checked, 61, "every size is checked");
            assert!(
                r.blobs_read > 0 && r.blobs_read < 61,
                "{s}: {}",
                r.blobs_read
            );
            assert_eq!(r.subset.as_deref(), Some(s.to_string().as_str()));
            read = (read.0 + r.blobs_read, read.1 + r.bytes_read);
        }
        assert_eq!(
            read,
            (all.blobs_read, all.bytes_read),
            "once each, together"
        );

        // Damaged in place (same size): found by the slice holding it, and by no other.
        let damaged = &entries[17];
        backend.set(&blob_path(&damaged.sha256), &b"object XX"[..]);
        for s in &slices {
            let r = verify(&repo, &m, Depth::Subset(*s)).await.unwrap();
            if s.contains(&damaged.sha256) {
                assert_eq!(r.problems.len(), 1, "{s}: {:?}", r.problems);
                assert!(
                    r.problems[0].starts_with("s3://registry/k17: blob ")
                        && r.problems[0].ends_with("its bytes are damaged"),
                    "{:?}",
                    r.problems
                );
            } else {
                assert!(r.ok(), "{s}: {:?}", r.problems);
            }
        }
    }
}
