//! Mirroring gateway buckets into a snapshot, incrementally.
//!
//! Owns: the decision which objects to download, the download into content-addressed blobs, and
//! the bucket listing (key, size, ETag, headers, `x-amz-meta-*`, SHA-256) handed to the snapshot.
//! Invariants:
//! - An object is carried over from the previous snapshot (its entry: blob, headers), not
//!   downloaded, only when its key, size and ETag equal the previous entry's AND that entry names
//!   a well-formed SHA-256 whose blob is in the repository with that size. The SHA-256 carried over
//!   is the one recorded when the bytes were downloaded, never one computed from the blob now: a
//!   blob damaged in place (same size) keeps being named by the digest of its good bytes, so
//!   `verify --read-data` finds it in every snapshot that names it, and a restore refuses it.
//!   A missing or cut-short blob is downloaded again (and so written whole again).
//! - Identical bytes under other keys or in other snapshots end up in one blob (the repository
//!   stores by SHA-256; a blob present with its size is not rewritten).
//! - What is recorded for a downloaded object is what the GET returned (size, ETag, headers), so an
//!   object replaced between listing and download is recorded consistently.
//! - Downloads run concurrently up to the gateway's limit; bytes stream to staging, never memory;
//!   objects above [`DOWNLOAD_RANGE`] come in concurrent ranges.
//! - A listing is handed to the snapshot only when every object in it is stored.
//! - An object listed but gone (404) before its download was deleted at the source meanwhile
//!   (`wal-e delete retain` does this during a snapshot): it is left out of the listing and
//!   recorded as vanished, never an error here; whether the snapshot still holds what it needs is
//!   the caller's question ([`crate::wal_e`] for the database bucket).

use std::collections::{BTreeMap, HashMap, HashSet};

use futures::{StreamExt as _, TryStreamExt as _};

use crate::error::{Error, ErrorKind, Result};
use crate::repository::{
    BlobRef, BlobWriter, Manifest, ObjectEntry, Repository, Sha256, SnapshotWriter,
};
use crate::s3::{self, ChunkSink, DOWNLOAD_RANGE, ListedObject};

/// Told about each object as it is done; the CLI draws progress from this.
pub trait Progress: Send + Sync {
    /// `bucket` was listed: `objects` objects, `bytes` in all.
    fn listed(&self, _bucket: &str, _objects: u64, _bytes: u64) {}
    /// An object is done: `transferred` is false when it was unchanged (or already there).
    fn object_done(&self, _bucket: &str, _key: &str, _size: u64, _transferred: bool) {}
}

/// Progress that reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// What one bucket's mirror did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MirrorStats {
    /// Objects in the bucket (and in the listing).
    pub objects: u64,
    /// Their total size.
    pub bytes: u64,
    /// Objects downloaded (new or changed since the previous snapshot).
    pub downloaded_objects: u64,
    /// Object bytes downloaded.
    pub downloaded_bytes: u64,
    /// Objects carried over from the previous snapshot without a download.
    pub unchanged_objects: u64,
    /// Downloaded objects whose bytes were not yet in the repository.
    pub new_blobs: u64,
    pub new_blob_bytes: u64,
    /// Objects listed but deleted at the source before their download (not in the listing).
    pub vanished_objects: u64,
}

/// One bucket mirrored: what it did, the listing stored, and the keys that vanished.
#[derive(Debug, Clone, Default)]
pub struct Mirrored {
    pub stats: MirrorStats,
    /// Sorted by key.
    pub entries: Vec<ObjectEntry>,
    /// Listed, then gone before their download; sorted.
    pub vanished: Vec<String>,
}

struct BlobSink(BlobWriter);

impl ChunkSink for BlobSink {
    async fn reset(&mut self) -> std::io::Result<()> {
        self.0
            .reset()
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.0
            .write(chunk)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// Mirrors `bucket` into `repo`'s blobs and returns its listing (sorted by key). `previous` is the
/// bucket's listing in the previous snapshot (empty for a first run): its entries are carried
/// over for objects unchanged since and whose blobs are present, the rest is downloaded.
pub async fn mirror_bucket(
    gateway: &s3::Client,
    repo: &Repository,
    bucket: &str,
    previous: &[ObjectEntry],
    progress: &dyn Progress,
) -> Result<Mirrored> {
    let listed = gateway
        .list_objects(bucket, None)
        .await
        .map_err(|e| e.context(format!("mirroring bucket {bucket}")))?;
    let mut stats = MirrorStats {
        objects: listed.len() as u64,
        bytes: listed.iter().map(|o| o.size).sum(),
        ..MirrorStats::default()
    };
    progress.listed(bucket, stats.objects, stats.bytes);

    let (mut entries, todo) = carry_over(repo, bucket, listed, previous, progress).await?;
    stats.unchanged_objects = entries.len() as u64;

    let fetched: Vec<std::result::Result<Fetched, String>> = futures::stream::iter(todo)
        .map(|o| async move {
            let key = o.key.clone();
            match fetch_object(gateway, repo, bucket, o, progress).await {
                Ok(f) => Ok(Ok(f)),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(Err(key)),
                Err(e) => Err(e),
            }
        })
        .buffer_unordered(gateway.max_concurrency())
        .try_collect()
        .await?;
    let mut vanished = Vec::new();
    for f in fetched {
        let f = match f {
            Ok(f) => f,
            Err(key) => {
                vanished.push(key);
                continue;
            }
        };
        stats.downloaded_objects += 1;
        stats.downloaded_bytes += f.entry.size;
        if f.new_blob {
            stats.new_blobs += 1;
            stats.new_blob_bytes += f.entry.size;
        }
        entries.push(f.entry);
    }
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    vanished.sort();
    if !vanished.is_empty() {
        tracing::warn!(
            bucket,
            objects = vanished.len(),
            "objects deleted at the source between the listing and their download; left out"
        );
    }
    // Sizes may have changed between listing and download, objects gone: report what was
    // recorded.
    stats.objects = entries.len() as u64;
    stats.bytes = entries.iter().map(|e| e.size).sum();
    stats.vanished_objects = vanished.len() as u64;
    Ok(Mirrored {
        stats,
        entries,
        vanished,
    })
}

/// Splits `listed` into the entries carried over from `previous` (unchanged since, blob present
/// with its size) and the objects to download.
async fn carry_over(
    repo: &Repository,
    bucket: &str,
    listed: Vec<ListedObject>,
    previous: &[ObjectEntry],
    progress: &dyn Progress,
) -> Result<(Vec<ObjectEntry>, Vec<ListedObject>)> {
    let before: HashMap<&str, &ObjectEntry> =
        previous.iter().map(|e| (e.key.as_str(), e)).collect();
    let mut todo: Vec<ListedObject> = Vec::new();
    let mut unchanged: Vec<(ListedObject, &ObjectEntry)> = Vec::new();
    for o in listed {
        match before.get(o.key.as_str()) {
            Some(prev) if unchanged_since(prev, &o) => unchanged.push((o, *prev)),
            _ => todo.push(o),
        }
    }
    let present = present_blobs(repo, unchanged.iter().map(|(_, prev)| *prev)).await?;
    let mut entries = Vec::with_capacity(unchanged.len() + todo.len());
    let mut refetch = 0u64;
    for (o, prev) in unchanged {
        if present.contains(&(prev.sha256, prev.size)) {
            let mut e = prev.clone();
            e.last_modified.clone_from(&o.last_modified);
            progress.object_done(bucket, &o.key, o.size, false);
            entries.push(e);
        } else {
            refetch += 1;
            todo.push(o);
        }
    }
    if refetch > 0 {
        tracing::warn!(
            bucket,
            objects = refetch,
            "unchanged objects downloaded again: their blobs are missing from the repository or \
             not of their recorded size"
        );
    }
    Ok((entries, todo))
}

/// One downloaded object: its listing entry, and whether its blob was new to the repository.
struct Fetched {
    entry: ObjectEntry,
    new_blob: bool,
}

/// Downloads one object into a blob: a large one by concurrent ranged GETs into a staging file
/// (then one read for MD5 + SHA-256), a small one through a blob writer.
async fn fetch_object(
    gateway: &s3::Client,
    repo: &Repository,
    bucket: &str,
    o: ListedObject,
    progress: &dyn Progress,
) -> Result<Fetched> {
    let ctx = |e: Error| e.context(format!("mirroring bucket {bucket}"));
    let (head, stored) = if o.size > DOWNLOAD_RANGE {
        let temp = repo.staging_file().await?;
        let (head, sha256) = gateway
            .get_object_ranged(bucket, &o.key, &temp)
            .await
            .map_err(ctx)?;
        let blob = BlobRef {
            sha256: sha256.into(),
            size: head.size,
        };
        (head, repo.store_staged(temp, blob).await?)
    } else {
        let mut sink = BlobSink(repo.blob_writer().await?);
        let head = gateway
            .get_object(bucket, &o.key, &mut sink)
            .await
            .map_err(ctx)?;
        (head, sink.0.finish().await?)
    };
    if stored.blob.size != head.size {
        return Err(Error::integrity(format!(
            "s3://{bucket}/{}: stored {} bytes, the gateway sent {}",
            o.key, stored.blob.size, head.size
        )));
    }
    progress.object_done(bucket, &o.key, head.size, true);
    Ok(Fetched {
        entry: ObjectEntry {
            key: o.key,
            size: head.size,
            etag: head.etag,
            sha256: stored.blob.sha256,
            // The listing's time has milliseconds, the GET's header only seconds: keep the
            // listing's, as carried-over entries do.
            last_modified: o.last_modified.or(head.last_modified),
            meta: head.meta,
        },
        new_blob: stored.new,
    })
}

/// Whether `prev` (the previous snapshot's entry for the key) still describes `o`: same size,
/// same non-empty ETag. Whether that blob is present is
/// [`present_blobs`]' question.
fn unchanged_since(prev: &ObjectEntry, o: &ListedObject) -> bool {
    prev.size == o.size && !o.etag.is_empty() && prev.etag == o.etag
}

/// Which of the blobs `entries` name are in `repo` with the size recorded for them; each distinct
/// (blob, size) is asked once, concurrently.
async fn present_blobs<'a>(
    repo: &Repository,
    entries: impl Iterator<Item = &'a ObjectEntry>,
) -> Result<HashSet<(Sha256, u64)>> {
    let wanted: HashSet<(Sha256, u64)> = entries.map(|e| (e.sha256, e.size)).collect();
    futures::stream::iter(wanted)
        .map(|(sha, size)| async move {
            let there = repo.has_blob(&BlobRef { sha256: sha, size }).await?;
            Ok::<_, Error>(there.then_some((sha, size)))
        })
        .buffer_unordered(PRESENCE_CHECKS)
        .try_filter_map(|found| async move { Ok(found) })
        .try_collect()
        .await
}

/// Blob presence checks in flight at once (a `stat` locally, a HEAD on an S3 repository).
const PRESENCE_CHECKS: usize = 32;

/// The listing of `bucket` in `previous`, to mirror against; empty (everything is downloaded)
/// when there is none or it cannot be used (missing, damaged: it fails its manifest's SHA-256).
pub async fn previous_listing(
    repo: &Repository,
    previous: Option<&Manifest>,
    bucket: &str,
) -> Vec<ObjectEntry> {
    match previous {
        Some(m) if m.buckets.contains_key(bucket) => match repo.listing(m, bucket).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(
                    "previous listing of {bucket} unusable, downloading everything: {e}"
                );
                Vec::new()
            }
        },
        _ => Vec::new(),
    }
}

/// Mirrors each of `buckets` into `snapshot`, incrementally against `previous` (the last
/// snapshot's manifest, if any), and adds their listings (and vanished keys) to the snapshot.
pub async fn mirror_buckets(
    gateway: &s3::Client,
    snapshot: &mut SnapshotWriter,
    buckets: &[String],
    previous: Option<&Manifest>,
    progress: &dyn Progress,
) -> Result<BTreeMap<String, Mirrored>> {
    let repo = snapshot.repository().clone();
    let mut before = Vec::with_capacity(buckets.len());
    for bucket in buckets {
        before.push(previous_listing(&repo, previous, bucket).await);
    }
    // All buckets at once: the gateway's limiter bounds the requests in flight, and one bucket's
    // last large object no longer delays the next bucket.
    let mirrored = futures::future::try_join_all(
        buckets
            .iter()
            .zip(&before)
            .map(|(bucket, before)| mirror_bucket(gateway, &repo, bucket, before, progress)),
    )
    .await?;
    let mut out = BTreeMap::new();
    for (bucket, m) in buckets.iter().zip(mirrored) {
        snapshot.add_bucket(bucket, &m.entries).await?;
        snapshot.bucket_vanished(bucket, m.vanished.clone());
        tracing::info!(
            bucket,
            objects = m.stats.objects,
            downloaded = m.stats.downloaded_objects,
            unchanged = m.stats.unchanged_objects,
            vanished = m.stats.vanished_objects,
            "bucket mirrored"
        );
        out.insert(bucket.clone(), m);
    }
    Ok(out)
}
