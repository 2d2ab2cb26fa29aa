//! Mirror and bucket restore against the local cluster's radosgw: incremental snapshots, restore
//! into fresh buckets, and the fidelity of odd keys, empty and multipart-sized objects.
//!
//! The seeded buckets (`db_wal`, `registry`) are only read; every bucket written is a fresh one,
//! removed at the end, or by its guard when the test fails. What was restored is checked with an independent client (the SDK with
//! SigV4, straight from the test support), never with the code under test.

use std::collections::BTreeMap;

use deis_backup_coordinator::ErrorKind;
use deis_backup_coordinator::bucket_restore::{Existing, restore_bucket};
use deis_backup_coordinator::gateway::{Gateway, GatewayOptions, ObjectMeta, Signature};
use deis_backup_coordinator::mirror::{Mirrored, NoProgress, mirror_bucket, mirror_buckets};
use deis_backup_coordinator::repository::SnapshotId;
use sha2::{Digest, Sha256};

use super::gateway::{
    ScratchBucket, Seeded, assert_listing_matches_seed, connect, local_repo, options, seed,
    seeded_buckets,
};
use super::support::Cluster;

/// Reads `bucket` with the test's own client and compares it with `want` (bytes and headers).
async fn assert_bucket_holds(bucket: &str, want: &BTreeMap<String, Seeded>) {
    let s3 = Cluster::get().s3().await;
    let mut keys = Vec::new();
    let mut pages = s3.list_objects_v2().bucket(bucket).into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.unwrap();
        keys.extend(page.contents().iter().map(|o| o.key().unwrap().to_owned()));
    }
    keys.sort();
    assert_eq!(
        keys.iter().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "keys of {bucket}"
    );
    for (key, w) in want {
        let o = s3
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        let got_meta = ObjectMeta {
            content_type: o.content_type().map(str::to_owned),
            cache_control: o.cache_control().map(str::to_owned),
            content_encoding: o.content_encoding().map(str::to_owned),
            content_disposition: o.content_disposition().map(str::to_owned),
            content_language: o.content_language().map(str::to_owned),
            expires: None,
            metadata: o
                .metadata()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
        };
        if !w.etag.is_empty() {
            assert_eq!(
                o.e_tag().unwrap_or_default().trim_matches('"'),
                w.etag,
                "{bucket}/{key} ETag"
            );
        }
        let bytes = o.body.collect().await.unwrap().into_bytes();
        assert_eq!(bytes.len() as u64, w.size, "{bucket}/{key} size");
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            w.sha256,
            "{bucket}/{key} bytes"
        );
        let want_meta = ObjectMeta {
            expires: None,
            ..w.meta.clone()
        };
        assert_eq!(got_meta, want_meta, "{bucket}/{key} headers");
    }
}

/// Deletes every object of `bucket`, then the bucket (through the gateway client under test,
/// which exercises DeleteObjects with its Content-MD5). A test that fails before it gets here
/// leaves the removal to its `ScratchBucket` guard.
async fn remove_bucket(gw: &Gateway, bucket: &str) {
    let keys: Vec<String> = gw
        .list_objects(bucket, None)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    gw.delete_objects(bucket, &keys).await.unwrap();
    gw.delete_bucket(bucket).await.unwrap();
}

#[tokio::test]
async fn mirror_second_run_of_unchanged_buckets_downloads_nothing() {
    let (_dir, repo) = local_repo().await;
    let buckets = seeded_buckets().await;

    let gw = connect(Signature::Auto).await;
    let mut first = repo.start_snapshot(SnapshotId::generate());
    let stats1 = mirror_buckets(&gw, &mut first, &buckets, None, &NoProgress)
        .await
        .unwrap();
    let m1 = first.commit().await.unwrap();
    for (bucket, Mirrored { stats: s, .. }) in &stats1 {
        assert_eq!(
            s.downloaded_objects, s.objects,
            "{bucket}: first run fetches all"
        );
        assert_listing_matches_seed(bucket, &repo.listing(&m1, bucket).await.unwrap());
    }
    // Identical bytes under different keys are stored once.
    let unique: std::collections::HashSet<String> = buckets
        .iter()
        .flat_map(|b| seed(b).into_values().map(|s| s.sha256))
        .collect();
    assert_eq!(repo.blobs().await.unwrap().len(), unique.len());

    // A fresh client, so its byte counter starts at zero.
    let gw = connect(Signature::Auto).await;
    let mut second = repo.start_snapshot(SnapshotId::generate());
    let stats2 = mirror_buckets(&gw, &mut second, &buckets, Some(&m1), &NoProgress)
        .await
        .unwrap();
    let m2 = second.commit().await.unwrap();
    for (bucket, Mirrored { stats: s, .. }) in &stats2 {
        assert_eq!(s.downloaded_bytes, 0, "{bucket}: {s:?}");
        assert_eq!(s.downloaded_objects, 0, "{bucket}: {s:?}");
        assert_eq!(s.unchanged_objects, s.objects, "{bucket}: {s:?}");
        assert_eq!(
            repo.listing(&m2, bucket).await.unwrap(),
            repo.listing(&m1, bucket)
                .await
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            "{bucket}: same listing"
        );
    }
    assert_eq!(gw.stats().bytes_downloaded, 0, "{:?}", gw.stats());
    assert_eq!(repo.snapshots().await.unwrap().len(), 2);
}

#[tokio::test]
async fn mirror_then_restore_into_fresh_buckets_is_identical() {
    let (_dir, repo) = local_repo().await;
    let gw = connect(Signature::V2).await;
    for bucket in seeded_buckets().await {
        let Mirrored { entries, .. } = mirror_bucket(&gw, &repo, &bucket, &[], &NoProgress)
            .await
            .unwrap();
        let target = ScratchBucket::new(&bucket);
        let stats = restore_bucket(&gw, &repo, &entries, &target, Existing::Refuse, &NoProgress)
            .await
            .unwrap();
        assert!(stats.created_bucket);
        assert_eq!(stats.uploaded_objects, entries.len() as u64);
        assert_bucket_holds(&target, &seed(&bucket)).await;

        // A second restore into the now non-empty bucket is refused by default...
        let err = restore_bucket(&gw, &repo, &entries, &target, Existing::Refuse, &NoProgress)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BucketNotEmpty, "{err}");
        // ...and a merge finds everything in place.
        let merged = restore_bucket(&gw, &repo, &entries, &target, Existing::Merge, &NoProgress)
            .await
            .unwrap();
        // Multipart objects included: they went up in their original parts and kept their ETags.
        assert_eq!(merged.skipped_objects, entries.len() as u64, "{merged:?}");
        assert_eq!(merged.uploaded_objects, 0, "{merged:?}");
        remove_bucket(&gw, &target).await;
    }
}

/// The objects of the fidelity test: odd keys, headers, an empty and a multipart-sized object.
fn odd_objects() -> Vec<(String, Vec<u8>, ObjectMeta)> {
    let mut meta = ObjectMeta {
        content_type: Some("text/plain; charset=utf-8".into()),
        cache_control: Some("max-age=60, private".into()),
        content_encoding: Some("identity".into()),
        content_disposition: Some("attachment; filename=\"a b.txt\"".into()),
        content_language: Some("de-CH".into()),
        ..ObjectMeta::default()
    };
    meta.metadata.insert("owner".into(), "deis".into());
    meta.metadata
        .insert("checksum".into(), "tarsum+sha256:00".into());
    let plain = ObjectMeta {
        content_type: Some("application/octet-stream".into()),
        ..ObjectMeta::default()
    };
    let mut big = vec![0u8; 12 * 1024 * 1024 + 17];
    let mut rng = fastrand::Rng::with_seed(4);
    rng.fill(&mut big);
    let long_key = format!("long/{}", "k".repeat(1024 - 5));
    vec![
        (
            "with space/and more".into(),
            b"spaces".to_vec(),
            meta.clone(),
        ),
        ("plus+sign+".into(), b"plus".to_vec(), plain.clone()),
        (
            "percent%20literal%".into(),
            b"percent".to_vec(),
            plain.clone(),
        ),
        (
            "ünïcödé/日本語/ключ".into(),
            "unicode".as_bytes().to_vec(),
            meta.clone(),
        ),
        ("a//b".into(), b"double slash".to_vec(), plain.clone()),
        ("/leading-slash".into(), b"leading".to_vec(), plain.clone()),
        (
            "q?acl&uploads=1".into(),
            b"query-like".to_vec(),
            plain.clone(),
        ),
        (
            "tilde~star*(paren)!'".into(),
            b"punct".to_vec(),
            plain.clone(),
        ),
        (long_key, b"long key".to_vec(), plain.clone()),
        ("empty".into(), Vec::new(), plain.clone()),
        ("dup-of-spaces".into(), b"spaces".to_vec(), plain.clone()),
        ("big/object.bin".into(), big, meta),
    ]
}

#[tokio::test]
async fn mirror_fidelity_of_odd_keys_empty_and_multipart_objects() {
    let s3 = Cluster::get().s3().await;
    let source = ScratchBucket::new("odd");
    s3.create_bucket()
        .bucket(source.name())
        .send()
        .await
        .unwrap();
    let objects = odd_objects();
    let mut want = BTreeMap::new();
    for (key, data, meta) in &objects {
        let mut put = s3
            .put_object()
            .bucket(source.name())
            .key(key)
            .body(data.clone().into())
            .set_content_type(meta.content_type.clone())
            .set_cache_control(meta.cache_control.clone())
            .set_content_encoding(meta.content_encoding.clone())
            .set_content_disposition(meta.content_disposition.clone())
            .set_content_language(meta.content_language.clone());
        for (k, v) in &meta.metadata {
            put = put.metadata(k, v);
        }
        put.send()
            .await
            .unwrap_or_else(|e| panic!("seeding {key:?}: {e:?}"));
        want.insert(
            key.clone(),
            Seeded {
                size: data.len() as u64,
                etag: String::new(),
                sha256: hex::encode(Sha256::digest(data)),
                meta: meta.clone(),
            },
        );
    }

    // Mirror with V2 (the hardest signing case for odd keys), restore with parts of 5 MiB.
    let opts = GatewayOptions {
        multipart_threshold: Some(5 * 1024 * 1024),
        part_size: Some(5 * 1024 * 1024),
        ..options(Signature::V2)
    };
    let gw = Gateway::connect(&opts, Some(&Cluster::get().etcd()))
        .await
        .unwrap();
    let (_dir, repo) = local_repo().await;
    let Mirrored { entries, stats, .. } = mirror_bucket(&gw, &repo, &source, &[], &NoProgress)
        .await
        .unwrap();
    assert_eq!(stats.objects, objects.len() as u64);
    assert_eq!(
        stats.new_blobs,
        objects.len() as u64 - 1,
        "dup-of-spaces is stored once"
    );
    for e in &entries {
        let w = &want[&e.key];
        assert_eq!(
            (e.size, e.sha256.to_string()),
            (w.size, w.sha256.clone()),
            "{:?}",
            e.key
        );
        assert_eq!(e.meta, w.meta, "{:?}", e.key);
    }

    let target = ScratchBucket::new("odd_restored");
    restore_bucket(&gw, &repo, &entries, &target, Existing::Refuse, &NoProgress)
        .await
        .unwrap();
    assert_bucket_holds(&target, &want).await;
    let big = gw
        .head_object(&target, "big/object.bin")
        .await
        .unwrap()
        .unwrap();
    assert!(big.1.ends_with("-3"), "uploaded in 3 parts: {}", big.1);

    // Overwrite makes the bucket exactly the snapshot again.
    s3.put_object()
        .bucket(target.name())
        .key("stray")
        .body(b"x".to_vec().into())
        .send()
        .await
        .unwrap();
    let over = restore_bucket(
        &gw,
        &repo,
        &entries,
        &target,
        Existing::Overwrite,
        &NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(over.deleted_objects, 1, "{over:?}");
    assert_bucket_holds(&target, &want).await;

    remove_bucket(&gw, &target).await;
    remove_bucket(&gw, &source).await;
}
