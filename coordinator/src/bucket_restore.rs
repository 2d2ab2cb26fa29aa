//! Putting a snapshot's bucket back on a gateway.
//!
//! Owns: the policy for a bucket that already holds objects ([`Existing`]), bucket creation, and
//! the upload of each listed object with its original headers and `x-amz-meta-*`.
//! Invariants:
//! - A missing bucket is created (names like `db_wal` included); a non-empty one is refused unless
//!   the caller chose [`Existing::Merge`] or [`Existing::Overwrite`].
//! - Every object's blob is hashed with SHA-256 in the read that computes the upload's
//!   `Content-MD5`, and compared with the listing's `sha256` before anything is committed: before
//!   the single PUT is sent, before CompleteMultipartUpload (the upload is aborted otherwise). A
//!   damaged blob (same size, other bytes) is an integrity error naming bucket, key and blob, and
//!   its object is absent from the gateway afterwards. Objects restored before it stay.
//! - Every upload is also checked after the fact: the gateway's ETag against the MD5 of the bytes
//!   sent and, where both are plain MD5s, against the snapshot's ETag.
//! - An object that was a multipart upload goes up in as many parts again, of the part size it
//!   most likely had, so it gets its ETag back and a later merge finds it in place; others go up in
//!   parts of at least 5 MiB above the multipart threshold, in one PUT below it.
//! - With `Overwrite` the bucket ends up holding exactly the snapshot's keys.
//! - WAL-E's stop sentinels go up last, one at a time, in the order the source modified them:
//!   `wal-e backup-fetch LATEST` (Deis' boot) picks the sentinel the gateway says was modified
//!   last, and a restore uploading them concurrently would make that any base backup, not the
//!   snapshot's newest. Each sentinel also appears only once everything before it is in place.

use std::collections::{HashMap, HashSet};

use futures::{StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::mirror::Progress;
use crate::repository::{ObjectEntry, Repository};
use crate::s3::{self, ListedObject, etag_is_md5};
use crate::wal_e;

/// What to do with a bucket that already holds objects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Existing {
    /// Stop with an error (the default: a restore never mixes data by accident).
    #[default]
    Refuse,
    /// Upload the snapshot's objects, keep other keys.
    Merge,
    /// Upload the snapshot's objects and delete keys the snapshot does not have.
    Overwrite,
}

/// What a bucket restore did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Objects in the snapshot's listing.
    pub objects: u64,
    pub bytes: u64,
    pub uploaded_objects: u64,
    pub uploaded_bytes: u64,
    /// Objects already present with the same size and ETag (merge/overwrite).
    pub skipped_objects: u64,
    /// Keys deleted because the snapshot does not have them (overwrite).
    pub deleted_objects: u64,
    /// Whether the bucket had to be created.
    pub created_bucket: bool,
}

/// Restores `entries` (a snapshot's listing) into `bucket` on `gateway`: the bucket's present
/// objects first (refused unless merging or overwriting), then each object not already there with
/// its size and ETag, then, when overwriting, the keys the snapshot does not have.
pub async fn restore_bucket(
    gateway: &s3::Client,
    repo: &Repository,
    entries: &[ObjectEntry],
    bucket: &str,
    existing: Existing,
    progress: &dyn Progress,
) -> Result<RestoreStats> {
    let ctx = format!("restoring bucket {bucket}");
    let mut stats = RestoreStats {
        objects: entries.len() as u64,
        bytes: entries.iter().map(|e| e.size).sum(),
        ..RestoreStats::default()
    };
    let (current, created) = present_objects(gateway, bucket, &ctx).await?;
    stats.created_bucket = created;
    if !current.is_empty() && existing == Existing::Refuse {
        return Err(Error::new(
            ErrorKind::BucketNotEmpty,
            format!("{ctx}: the bucket already holds {} objects", current.len()),
            "restore into an empty bucket, or choose to merge into it or overwrite it",
        ));
    }
    let there: HashMap<&str, (u64, &str)> = current
        .iter()
        .map(|o| (o.key.as_str(), (o.size, o.etag.as_str())))
        .collect();
    progress.listed(bucket, stats.objects, stats.bytes);

    let (mut sentinels, rest): (Vec<&ObjectEntry>, Vec<&ObjectEntry>) = entries
        .iter()
        .partition(|e| wal_e::is_stop_sentinel(&e.key));
    sentinels.sort_by(|a, b| (wal_e::modified(a), &a.key).cmp(&(wal_e::modified(b), &b.key)));
    // Per object: the bytes uploaded, or `None` when it was already there.
    let put = |e: &'_ ObjectEntry| {
        let (there, ctx) = (&there, &ctx);
        let e = e.clone();
        async move {
            let upload = there.get(e.key.as_str()) != Some(&(e.size, e.etag.as_str()));
            if upload {
                restore_object(gateway, repo, bucket, ctx, &e).await?;
            }
            progress.object_done(bucket, &e.key, e.size, upload);
            Ok::<_, Error>(upload.then_some(e.size))
        }
    };
    let mut done: Vec<Option<u64>> = futures::stream::iter(rest)
        .map(&put)
        .buffer_unordered(gateway.max_concurrency())
        .try_collect()
        .await?;
    for e in sentinels {
        done.push(put(e).await?);
        // Distinct modification times, in order, at the gateway's millisecond resolution.
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for d in done {
        match d {
            Some(size) => {
                stats.uploaded_objects += 1;
                stats.uploaded_bytes += size;
            }
            None => stats.skipped_objects += 1,
        }
    }

    if existing == Existing::Overwrite {
        let keep: HashSet<&str> = entries.iter().map(|e| e.key.as_str()).collect();
        let extra: Vec<String> = current
            .iter()
            .filter(|o| !keep.contains(o.key.as_str()))
            .map(|o| o.key.clone())
            .collect();
        gateway
            .delete_objects(bucket, &extra)
            .await
            .map_err(|e| e.context(&ctx))?;
        stats.deleted_objects = extra.len() as u64;
    }
    Ok(stats)
}
/// The objects `bucket` holds now, and whether it had to be created (then it holds none).
async fn present_objects(
    gateway: &s3::Client,
    bucket: &str,
    ctx: &str,
) -> Result<(Vec<ListedObject>, bool)> {
    if gateway.bucket_exists(bucket).await? {
        let current = gateway
            .list_objects(bucket, None)
            .await
            .map_err(|e| e.context(ctx))?;
        Ok((current, false))
    } else {
        gateway
            .create_bucket(bucket)
            .await
            .map_err(|e| e.context(ctx))?;
        Ok((Vec::new(), true))
    }
}

/// Uploads one object from its blob: refused before anything is committed when the blob is not
/// what the listing names (size on disk, then the SHA-256 of the bytes read for the upload), and
/// an error when the gateway's MD5 ETag differs from the one recorded.
async fn restore_object(
    gateway: &s3::Client,
    repo: &Repository,
    bucket: &str,
    ctx: &str,
    e: &ObjectEntry,
) -> Result<()> {
    let file = repo
        .blob_file(&e.sha256)
        .await
        .map_err(|err| err.context(ctx))?;
    let on_disk = tokio::fs::metadata(file.path())
        .await
        .map_err(|err| Error::io(format!("stat {}", file.path().display()), err))?
        .len();
    if on_disk != e.size {
        let why = format!("it holds {on_disk} bytes, the listing says {}", e.size);
        return Err(damaged(ctx, bucket, e, &why));
    }
    // Runs on the bytes read for the upload's Content-MD5, before anything is committed: a
    // damaged blob is never sent (or its multipart upload is aborted).
    let check = |got: &[u8; 32]| {
        if got == e.sha256.as_bytes() {
            Ok(())
        } else {
            let why = format!("its bytes hash to {}", hex::encode(got));
            Err(damaged(ctx, bucket, e, &why))
        }
    };
    let etag = gateway
        .put_file_like(
            bucket,
            &e.key,
            file.path(),
            e.size,
            &e.meta,
            &e.etag,
            &check,
        )
        .await
        .map_err(|err| err.context(ctx))?;
    if etag_is_md5(&etag) && etag_is_md5(&e.etag) && !etag.eq_ignore_ascii_case(&e.etag) {
        return Err(Error::integrity(format!(
            "{ctx}: {} was restored with ETag {etag}, the snapshot recorded {} (the stored blob \
             differs from what was mirrored)",
            e.key, e.etag
        )));
    }
    Ok(())
}

/// The error for an object whose stored blob is not what its name says (`why`): nothing of the
/// object was committed on the gateway.
fn damaged(ctx: &str, bucket: &str, e: &ObjectEntry, why: &str) -> Error {
    Error::new(
        ErrorKind::Integrity,
        format!(
            "{ctx}: s3://{bucket}/{}: the stored blob {} is damaged ({why}); the object was not \
             restored",
            e.key, e.sha256
        ),
        "run `deis-backup verify --read-data` to find every damaged blob and the snapshots that \
         name them, then restore from a snapshot that verifies",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_blob_is_named_with_what_to_do() {
        let e = ObjectEntry {
            key: "wal_005/0001.lzo".into(),
            size: 3,
            etag: "x".into(),
            sha256: "ab".repeat(32).parse().unwrap(),
            last_modified: None,
            meta: crate::s3::ObjectMeta::default(),
        };
        let err = damaged(
            "restoring bucket db_wal",
            "db_wal",
            &e,
            "its bytes hash to 00",
        );
        assert_eq!(err.kind(), ErrorKind::Integrity);
        let s = err.to_string();
        for want in [
            "s3://db_wal/wal_005/0001.lzo",
            &"ab".repeat(32),
            "damaged",
            "not restored",
            "deis-backup verify --read-data",
        ] {
            assert!(s.contains(want), "{want} in {s}");
        }
    }
}
