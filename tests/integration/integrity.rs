//! Integrity of the repository's blobs against the local cluster's radosgw: a blob damaged in the
//! repository (same size, one byte flipped) is refused by the bucket restore before its object is
//! committed on the gateway (single PUT and multipart), found by `verify --read-data` (and not by
//! sizes alone), and never made to look good by a later incremental snapshot.
//!
//! Every bucket is a fresh one, removed when the test ends (passed or failed); what reached the gateway is checked with the
//! test's own client (the SDK with SigV4), never with the code under test.

use std::path::{Path, PathBuf};

use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use deis_backup_coordinator::ErrorKind;
use deis_backup_coordinator::bucket_restore::{Existing, restore_bucket};
use deis_backup_coordinator::gateway::{Gateway, GatewayOptions, Signature};
use deis_backup_coordinator::mirror::{Mirrored, NoProgress, mirror_bucket, mirror_buckets};
use deis_backup_coordinator::repository::format::blob_path;
use deis_backup_coordinator::repository::{
    BlobCheck, BlobRef, Manifest, ObjectEntry, Repository, Sha256, SnapshotId,
};
use deis_backup_coordinator::verify::{Depth, verify};

use super::gateway::{ScratchBucket, local_repo, options};
use super::support::Cluster;

const MIB: usize = 1024 * 1024;

/// `len` pseudo-random bytes, different for every `seed`.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    fastrand::Rng::with_seed(seed).fill(&mut data);
    data
}

/// A client that uploads in 5 MiB parts above 5 MiB, so a 6 MiB object goes up in two.
async fn small_parts_gateway() -> Gateway {
    let opts = GatewayOptions {
        multipart_threshold: Some(5 * MIB as u64),
        part_size: Some(5 * MIB as u64),
        ..options(Signature::Auto)
    };
    Gateway::connect(&opts, Some(&Cluster::get().etcd()))
        .await
        .expect("gateway connects")
}

/// A fresh bucket holding `objects` (single PUTs), plus `parts` uploaded as a multipart upload
/// of those parts when given (its ETag then is `<md5>-<parts>`).
async fn source_bucket(
    tag: &str,
    objects: &[(&str, Vec<u8>)],
    multipart: Option<(&str, Vec<Vec<u8>>)>,
) -> ScratchBucket {
    let s3 = Cluster::get().s3().await;
    let bucket = ScratchBucket::new(tag);
    s3.create_bucket()
        .bucket(bucket.name())
        .send()
        .await
        .unwrap();
    for (key, data) in objects {
        s3.put_object()
            .bucket(&bucket)
            .key(*key)
            .body(data.clone().into())
            .send()
            .await
            .unwrap();
    }
    if let Some((key, parts)) = multipart {
        let id = s3
            .create_multipart_upload()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .unwrap()
            .upload_id()
            .unwrap()
            .to_owned();
        let mut done = Vec::new();
        for (i, data) in parts.into_iter().enumerate() {
            let n = i32::try_from(i + 1).unwrap();
            let p = s3
                .upload_part()
                .bucket(&bucket)
                .key(key)
                .upload_id(&id)
                .part_number(n)
                .body(data.into())
                .send()
                .await
                .unwrap();
            done.push(
                CompletedPart::builder()
                    .part_number(n)
                    .e_tag(p.e_tag().unwrap())
                    .build(),
            );
        }
        s3.complete_multipart_upload()
            .bucket(&bucket)
            .key(key)
            .upload_id(&id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(done))
                    .build(),
            )
            .send()
            .await
            .unwrap();
    }
    bucket
}

/// Unfinished multipart uploads in `bucket`: (key, upload id).
async fn pending_uploads(bucket: &str) -> Vec<(String, String)> {
    let s3 = Cluster::get().s3().await;
    let o = s3
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .unwrap();
    o.uploads()
        .iter()
        .map(|u| {
            (
                u.key().unwrap_or_default().to_owned(),
                u.upload_id().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Whether `bucket/key` exists on the gateway (the test's own client).
async fn exists(bucket: &str, key: &str) -> bool {
    let s3 = Cluster::get().s3().await;
    match s3.head_object().bucket(bucket).key(key).send().await {
        Ok(_) => true,
        Err(e)
            if e.as_service_error()
                .is_some_and(aws_sdk_s3::operation::head_object::HeadObjectError::is_not_found) =>
        {
            false
        }
        Err(e) => panic!("HEAD s3://{bucket}/{key}: {e:?}"),
    }
}

/// The file of blob `sha256` in the local repository under `dir`.
fn blob_file(dir: &Path, sha256: &Sha256) -> PathBuf {
    dir.join("repo").join(blob_path(sha256))
}

/// Flips one byte in the middle of a blob: same size, other bytes.
fn flip_byte(dir: &Path, sha256: &Sha256) {
    let path = blob_file(dir, sha256);
    let mut data = std::fs::read(&path).unwrap();
    let at = data.len() / 2;
    data[at] ^= 0x5a;
    std::fs::write(&path, &data).unwrap();
}

fn entry<'a>(entries: &'a [ObjectEntry], key: &str) -> &'a ObjectEntry {
    entries
        .iter()
        .find(|e| e.key == key)
        .unwrap_or_else(|| panic!("{key} in the listing"))
}

#[tokio::test]
async fn integrity_restore_refuses_a_damaged_blob_before_the_put_single_and_multipart() {
    let small = ("small/object", bytes(1000, 1));
    // Above the 5 MiB threshold: restored in two parts though it was one PUT.
    let single = ("big/single-put", bytes(6 * MIB + 3, 2));
    // Uploaded in two parts (ETag `-2`): restored in its original parts.
    let parts = vec![bytes(5 * MIB, 3), bytes(MIB + 7, 4)];
    let source = source_bucket(
        "integrity_src",
        &[small.clone(), single.clone()],
        Some(("big/multipart", parts)),
    )
    .await;
    let gw = small_parts_gateway().await;
    let (dir, repo) = local_repo().await;
    let Mirrored { entries, .. } = mirror_bucket(&gw, &repo, &source, &[], &NoProgress)
        .await
        .unwrap();
    assert_eq!(entries.len(), 3);
    assert!(entry(&entries, "big/multipart").etag.ends_with("-2"));

    // Intact blobs go up (the check passes on both paths).
    let good = ScratchBucket::new("integrity_good");
    let stats = restore_bucket(&gw, &repo, &entries, &good, Existing::Refuse, &NoProgress)
        .await
        .unwrap();
    assert_eq!(stats.uploaded_objects, 3, "{stats:?}");
    let s3 = Cluster::get().s3().await;
    let single_etag = s3
        .head_object()
        .bucket(&good)
        .key("big/single-put")
        .send()
        .await
        .unwrap()
        .e_tag()
        .unwrap()
        .to_owned();
    assert!(
        single_etag.ends_with("-2\""),
        "sent in parts: {single_etag}"
    );

    // Damaged blobs (same size, one byte flipped) never reach the gateway.
    for e in &entries {
        flip_byte(dir.path(), &e.sha256);
    }
    let target = ScratchBucket::new("integrity_bad");
    for key in ["small/object", "big/single-put", "big/multipart"] {
        let e = entry(&entries, key);
        let err = restore_bucket(
            &gw,
            &repo,
            std::slice::from_ref(e),
            &target,
            Existing::Merge,
            &NoProgress,
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity, "{key}: {err}");
        let msg = err.to_string();
        for want in [
            target.name(),
            key,
            &e.sha256.to_string(),
            "damaged",
            "deis-backup verify --read-data",
        ] {
            assert!(msg.contains(want), "{key}: {want:?} missing in: {msg}");
        }
        assert!(!exists(&target, key).await, "{key} was restored");
    }
    assert!(
        pending_uploads(&target).await.is_empty(),
        "refused multipart uploads are aborted"
    );
    let left = s3.list_objects().bucket(&target).send().await.unwrap();
    assert!(left.contents().is_empty(), "{:?}", left.contents());
}

#[tokio::test]
async fn integrity_verify_read_data_finds_a_damaged_blob_that_sizes_miss() {
    let source = source_bucket(
        "integrity_verify",
        &[("a", bytes(4000, 5)), ("b", bytes(3000, 6))],
        None,
    )
    .await;
    let gw = small_parts_gateway().await;
    let (dir, repo) = local_repo().await;
    let mut s = repo.start_snapshot(SnapshotId::generate());
    mirror_buckets(&gw, &mut s, &[source.to_string()], None, &NoProgress)
        .await
        .unwrap();
    let m = s.commit().await.unwrap();
    assert!(verify(&repo, &m, Depth::All).await.unwrap().ok());

    let a = entry(&repo.listing(&m, &source).await.unwrap(), "a").clone();
    flip_byte(dir.path(), &a.sha256);
    let sizes = verify(&repo, &m, Depth::Sizes).await.unwrap();
    assert!(
        sizes.ok(),
        "sizes cannot see a flipped byte: {:?}",
        sizes.problems
    );
    let read = verify(&repo, &m, Depth::All).await.unwrap();
    assert_eq!(read.problems.len(), 1, "{:?}", read.problems);
    let p = &read.problems[0];
    assert!(
        p.contains(&format!("s3://{source}/a"))
            && p.contains(&a.sha256.to_string())
            && p.contains("damaged"),
        "{p}"
    );
}

/// Blob of `e` as a reference.
fn blob(e: &ObjectEntry) -> BlobRef {
    BlobRef {
        sha256: e.sha256,
        size: e.size,
    }
}

#[tokio::test]
async fn integrity_incremental_snapshot_reuses_only_blobs_present_whole() {
    let source = source_bucket(
        "integrity_reuse",
        &[
            ("missing", bytes(2000, 7)),
            ("short", bytes(2100, 8)),
            ("flipped", bytes(2200, 9)),
            ("intact", bytes(2300, 10)),
        ],
        None,
    )
    .await;
    let buckets = [source.to_string()];
    let gw = small_parts_gateway().await;
    let (dir, repo) = local_repo().await;
    let snapshot = async |repo: &Repository, previous: Option<&Manifest>| {
        let mut s = repo.start_snapshot(SnapshotId::generate());
        let stats = mirror_buckets(&gw, &mut s, &buckets, previous, &NoProgress)
            .await
            .unwrap();
        (s.commit().await.unwrap(), stats[source.name()].stats)
    };
    let (m1, _) = snapshot(&repo, None).await;
    let l1 = repo.listing(&m1, &source).await.unwrap();

    // One blob gone, one cut short (a crash before the flush), one damaged in place.
    std::fs::remove_file(blob_file(dir.path(), &entry(&l1, "missing").sha256)).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(blob_file(dir.path(), &entry(&l1, "short").sha256))
        .unwrap()
        .set_len(10)
        .unwrap();
    let flipped = entry(&l1, "flipped").clone();
    flip_byte(dir.path(), &flipped.sha256);

    // The missing and the short one are downloaded again, not reused by size and ETag.
    let (m2, stats) = snapshot(&repo, Some(&m1)).await;
    assert_eq!(stats.downloaded_objects, 2, "{stats:?}");
    assert_eq!(stats.unchanged_objects, 2, "{stats:?}");
    let l2 = repo.listing(&m2, &source).await.unwrap();
    assert_eq!(l2, l1, "same bytes, same listing");
    for key in ["missing", "short"] {
        let b = blob(entry(&l2, key));
        assert_eq!(
            repo.check_blob(&b, true).await.unwrap().0,
            BlobCheck::Intact,
            "{key}"
        );
    }
    // The damaged one keeps its name (the SHA-256 its bytes had) in the new listing, so verify
    // --read-data reports it there too: reuse never makes damage look good.
    let read = verify(&repo, &m2, Depth::All).await.unwrap();
    assert_eq!(read.problems.len(), 1, "{:?}", read.problems);
    assert!(
        read.problems[0].contains(&format!("s3://{source}/flipped")),
        "{:?}",
        read.problems
    );

    // Repair: remove the damaged blob; the next snapshot downloads the object again.
    std::fs::remove_file(blob_file(dir.path(), &flipped.sha256)).unwrap();
    let (m3, stats) = snapshot(&repo, Some(&m2)).await;
    assert_eq!(stats.downloaded_objects, 1, "{stats:?}");
    let read = verify(&repo, &m3, Depth::All).await.unwrap();
    assert!(read.ok(), "{:?}", read.problems);
    assert_eq!(
        repo.check_blob(&blob(&flipped), true).await.unwrap().0,
        BlobCheck::Intact
    );
}

#[tokio::test]
async fn integrity_reuse_needs_the_previous_entrys_sha256() {
    let source = source_bucket("integrity_sha", &[("k", bytes(1500, 11))], None).await;
    let gw = small_parts_gateway().await;
    let (_dir, repo) = local_repo().await;
    let Mirrored { entries: first, .. } = mirror_bucket(&gw, &repo, &source, &[], &NoProgress)
        .await
        .unwrap();
    let good = first[0].clone();

    // The same key, size and ETag: reused only when the blob it names is present with that size.
    // (A malformed digest never gets this far: the listing does not parse.)
    let other = repo
        .write_blob_from(&b"other bytes"[..])
        .await
        .unwrap()
        .blob;
    let cases = [
        ("absent blob", "0".repeat(64).parse().unwrap()),
        ("blob of another size", other.sha256),
    ];
    for (what, sha256) in cases {
        let prev = ObjectEntry {
            sha256,
            ..good.clone()
        };
        let Mirrored { entries, stats, .. } =
            mirror_bucket(&gw, &repo, &source, &[prev], &NoProgress)
                .await
                .unwrap();
        assert_eq!(stats.downloaded_objects, 1, "{what}: {stats:?}");
        assert_eq!(entries, first, "{what}: recorded what was downloaded");
    }
    let Mirrored { entries, stats, .. } = mirror_bucket(&gw, &repo, &source, &first, &NoProgress)
        .await
        .unwrap();
    assert_eq!(
        stats.unchanged_objects, 1,
        "an intact previous entry is reused"
    );
    assert_eq!(entries, first);
}
