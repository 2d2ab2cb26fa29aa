//! The S3 repository backend against the local cluster's radosgw (SigV4), in a fresh bucket:
//! snapshots with parts and listings, the manifest as the mark of completeness, incremental
//! mirrors, blob reads and pruning.

use deis_backup_coordinator::gateway::{SecretString, Signature};
use deis_backup_coordinator::mirror::{NoProgress, mirror_buckets};
use deis_backup_coordinator::repository::{Repository, RepositoryOptions, SnapshotId};
use tokio::io::AsyncReadExt;

use super::gateway::{ScratchBucket, assert_listing_matches_seed, connect};
use super::support::Cluster;

#[tokio::test]
async fn repository_in_an_s3_bucket_round_trips_snapshots() {
    let cluster = Cluster::get();
    let (access, secret) = cluster.gateway_keys().await;
    let bucket = ScratchBucket::new("repo");
    let staging = tempfile::tempdir().unwrap();
    let opts = RepositoryOptions {
        location: Some(format!("s3://{bucket}/backups/deis")),
        endpoint: Some(cluster.gateway_endpoint().to_owned()),
        access_key: Some(SecretString::from(access)),
        secret_key: Some(SecretString::from(secret)),
        staging_dir: Some(staging.path().to_owned()),
        ..RepositoryOptions::default()
    };
    let err = Repository::open(&opts).await.unwrap_err();
    assert!(err.to_string().contains(bucket.name()), "{err}");
    let repo = Repository::open_or_init(&opts).await.unwrap();
    let gw = connect(Signature::Auto).await;
    let buckets = vec!["registry".to_owned()];

    let mut s1 = repo.start_snapshot(SnapshotId::generate());
    let part = s1
        .add_part_from_reader("etcd/deis.json", &b"{\"deis\":{}}"[..])
        .await
        .unwrap();
    mirror_buckets(&gw, &mut s1, &buckets, None, &NoProgress)
        .await
        .unwrap();
    assert!(
        repo.snapshots().await.unwrap().is_empty(),
        "no manifest, no snapshot"
    );
    assert_eq!(repo.incomplete_snapshots().await.unwrap().len(), 1);
    let m1 = s1.commit().await.unwrap();
    assert_eq!(repo.snapshots().await.unwrap(), vec![m1.id.clone()]);
    assert_eq!(repo.manifest(&m1.id).await.unwrap(), m1);
    let listing = repo.listing(&m1, "registry").await.unwrap();
    assert_listing_matches_seed("registry", &listing);

    let mut back = Vec::new();
    repo.open_blob(&part.sha256)
        .await
        .unwrap()
        .read_to_end(&mut back)
        .await
        .unwrap();
    assert_eq!(back, b"{\"deis\":{}}");

    // Incremental on the S3 backend too.
    let mut s2 = repo.start_snapshot(SnapshotId::generate());
    let stats = mirror_buckets(&gw, &mut s2, &buckets, Some(&m1), &NoProgress)
        .await
        .unwrap();
    assert_eq!(stats["registry"].stats.downloaded_bytes, 0);
    let m2 = s2.commit().await.unwrap();

    // Deleting the first snapshot keeps every blob the second needs.
    repo.delete_snapshot(&m1.id).await.unwrap();
    let pruned = repo.prune_blobs(|| Ok(())).await.unwrap();
    assert_eq!(
        pruned.blobs_deleted, 1,
        "only the part blob goes: {pruned:?}"
    );
    for e in repo.listing(&m2, "registry").await.unwrap() {
        assert!(repo.has_blob(&e.blob()).await.unwrap(), "{}", e.key);
    }

    // Clean up: the snapshot, its blobs, the marker, the bucket.
    repo.delete_snapshot(&m2.id).await.unwrap();
    repo.prune_blobs(|| Ok(())).await.unwrap();
    let rest: Vec<String> = gw
        .list_objects(&bucket, None)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(rest, vec!["backups/deis/deis-backup.json".to_owned()]);
    gw.delete_objects(&bucket, &rest).await.unwrap();
    gw.delete_bucket(&bucket).await.unwrap();
}
