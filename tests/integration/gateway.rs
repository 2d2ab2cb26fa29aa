//! The gateway client against the local cluster's radosgw: both signatures forced, `auto` with and
//! without a gateway that refuses V4 (a proxy standing in for Ceph Hammer), faults injected by a
//! proxy, wrong keys and an unreachable gateway.
//!
//! Also the helpers the mirror and repository tests share: gateway options from the cluster,
//! fresh bucket names, and the comparison of a listing with the seed manifest.

pub mod proxy;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use deis_backup_coordinator::ErrorKind;
use deis_backup_coordinator::gateway::{
    Gateway, GatewayOptions, ObjectMeta, SecretString, Signature,
};
use deis_backup_coordinator::mirror::{MirrorStats, Mirrored, NoProgress, mirror_bucket};
use deis_backup_coordinator::repository::{ObjectEntry, Repository, RepositoryOptions};

use super::support::Cluster;
use proxy::{Behaviour, Proxy};

/// Options for the cluster's gateway with `signature`; endpoints and keys come from etcd.
pub fn options(signature: Signature) -> GatewayOptions {
    GatewayOptions {
        signature: Some(signature),
        concurrency: Some(16),
        ..GatewayOptions::default()
    }
}

/// A gateway client for the cluster, as the CLI makes it (etcd discovery).
pub async fn connect(signature: Signature) -> Gateway {
    let cluster = Cluster::get();
    Gateway::connect(&options(signature), Some(&cluster.etcd()))
        .await
        .expect("gateway connects")
}

/// The gateway's address, for proxies.
pub fn gateway_addr() -> SocketAddr {
    let ep = Cluster::get().gateway_endpoint();
    ep.trim_start_matches("http://")
        .parse()
        .expect("GATEWAY_ENDPOINT is http://ip:port")
}

/// A bucket name no other test uses (underscore included, as `db_wal` has one).
pub fn fresh_bucket(tag: &str) -> String {
    format!("t_{tag}_{:08x}", fastrand::u32(..))
}

/// A scratch bucket on the cluster's gateway under a fresh name: whatever a test puts there goes
/// when the guard drops, whether the test passed or failed (objects and unfinished multipart
/// uploads first, then the bucket). A bucket that was never created or is already gone is fine.
pub struct ScratchBucket {
    name: String,
}

impl ScratchBucket {
    /// A fresh name (see [`fresh_bucket`]); the bucket itself is created by the test or the code
    /// under test.
    pub fn new(tag: &str) -> ScratchBucket {
        ScratchBucket {
            name: fresh_bucket(tag),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::ops::Deref for ScratchBucket {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

/// For the SDK's `.bucket(&scratch)`.
impl From<&ScratchBucket> for String {
    fn from(b: &ScratchBucket) -> String {
        b.name.clone()
    }
}

impl std::fmt::Display for ScratchBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for ScratchBucket {
    fn drop(&mut self) {
        // Drop cannot await and may run on the test's runtime: remove it on a thread of its own
        // with its own runtime, and wait for it. Never panic here (a panic while unwinding aborts).
        let name = self.name.clone();
        let removed = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(remove_bucket(&name))
        })
        .join();
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("scratch bucket {} left behind: {e}", self.name),
            Err(_) => eprintln!("scratch bucket {} left behind: removal panicked", self.name),
        }
    }
}

/// Removes `bucket` with the test's own client (the SDK): every object, every unfinished
/// multipart upload, then the bucket. An absent bucket is not an error.
async fn remove_bucket(bucket: &str) -> Result<(), String> {
    let s3 = Cluster::get().s3().await;
    let absent = |e: &dyn std::fmt::Debug| format!("{e:?}").contains("NoSuchBucket");
    loop {
        let listed = match s3.list_objects_v2().bucket(bucket).send().await {
            Ok(l) => l,
            Err(e) if absent(&e) => return Ok(()),
            Err(e) => return Err(format!("listing: {e:?}")),
        };
        if listed.contents().is_empty() {
            break;
        }
        for o in listed.contents() {
            s3.delete_object()
                .bucket(bucket)
                .key(o.key().unwrap_or_default())
                .send()
                .await
                .map_err(|e| format!("deleting {:?}: {e:?}", o.key()))?;
        }
    }
    let uploads = s3
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .map_err(|e| format!("listing uploads: {e:?}"))?;
    for u in uploads.uploads() {
        s3.abort_multipart_upload()
            .bucket(bucket)
            .key(u.key().unwrap_or_default())
            .upload_id(u.upload_id().unwrap_or_default())
            .send()
            .await
            .map_err(|e| format!("aborting an upload: {e:?}"))?;
    }
    match s3.delete_bucket().bucket(bucket).send().await {
        Ok(_) => Ok(()),
        Err(e) if absent(&e) => Ok(()),
        Err(e) => Err(format!("deleting the bucket: {e:?}")),
    }
}

/// A new local repository in a temporary directory.
pub async fn local_repo() -> (tempfile::TempDir, Repository) {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::open_or_init(&RepositoryOptions {
        location: Some(dir.path().join("repo").display().to_string()),
        fsync: Some(false),
        ..RepositoryOptions::default()
    })
    .await
    .unwrap();
    (dir, repo)
}

/// The seeded buckets' names, from the seed manifest: `registry`, and the WAL-E-shaped objects'
/// bucket (`db_wal_synthetic` beside the source's WAL-E database, which writes `db_wal` itself).
pub async fn seeded_buckets() -> Vec<String> {
    let manifest = Cluster::get().gateway_seed();
    let mut buckets: Vec<String> = manifest["buckets"]
        .as_object()
        .expect("seed buckets")
        .values()
        .map(|b| b.as_str().expect("a bucket name").to_owned())
        .collect();
    buckets.sort();
    buckets
}

/// One seeded object as the seed manifest records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seeded {
    pub size: u64,
    pub etag: String,
    pub sha256: String,
    pub meta: ObjectMeta,
}

/// The seed manifest of `bucket`: key -> what was seeded.
pub fn seed(bucket: &str) -> BTreeMap<String, Seeded> {
    let manifest = Cluster::get().gateway_seed();
    let s = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    manifest["objects"]
        .as_array()
        .expect("seed objects")
        .iter()
        .filter(|o| o["bucket"] == bucket)
        .map(|o| {
            let metadata = o["metadata"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            (
                o["key"].as_str().unwrap().to_owned(),
                Seeded {
                    size: o["size"].as_u64().unwrap(),
                    etag: o["etag"].as_str().unwrap().to_owned(),
                    sha256: o["sha256"].as_str().unwrap().to_owned(),
                    meta: ObjectMeta {
                        content_type: s(&o["content_type"]),
                        cache_control: s(&o["cache_control"]),
                        content_encoding: s(&o["content_encoding"]),
                        metadata,
                        ..ObjectMeta::default()
                    },
                },
            )
        })
        .collect()
}

/// Asserts a mirrored listing is exactly the seed: keys, sizes, ETags, SHA-256, headers, metadata.
pub fn assert_listing_matches_seed(bucket: &str, entries: &[ObjectEntry]) {
    let want = seed(bucket);
    assert!(!want.is_empty(), "the seed has no objects in {bucket}");
    let got: BTreeMap<String, Seeded> = entries
        .iter()
        .map(|e| {
            (
                e.key.clone(),
                Seeded {
                    size: e.size,
                    etag: e.etag.clone(),
                    sha256: e.sha256.to_string(),
                    meta: ObjectMeta {
                        content_type: e.meta.content_type.clone(),
                        cache_control: e.meta.cache_control.clone(),
                        content_encoding: e.meta.content_encoding.clone(),
                        metadata: e.meta.metadata.clone(),
                        ..ObjectMeta::default()
                    },
                },
            )
        })
        .collect();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "keys of {bucket}"
    );
    for (k, w) in &want {
        assert_eq!(&got[k], w, "{bucket}/{k}");
    }
}

/// Mirrors every seeded bucket into a fresh local repository and checks each against the seed.
async fn mirror_seeded_and_check(gw: &Gateway) -> Vec<MirrorStats> {
    let (_dir, repo) = local_repo().await;
    let mut out = Vec::new();
    for bucket in seeded_buckets().await {
        let Mirrored { entries, stats, .. } = mirror_bucket(gw, &repo, &bucket, &[], &NoProgress)
            .await
            .unwrap();
        assert_listing_matches_seed(&bucket, &entries);
        for e in &entries {
            assert!(
                repo.has_blob(&e.blob()).await.unwrap(),
                "{bucket}/{} stored",
                e.key
            );
        }
        out.push(stats);
    }
    out
}

#[tokio::test]
async fn gateway_mirror_with_v2_forced_matches_seed() {
    let gw = connect(Signature::V2).await;
    assert_eq!(gw.signature_in_use(), Signature::V2);
    let stats = mirror_seeded_and_check(&gw).await;
    assert!(stats.iter().all(|s| s.downloaded_objects == s.objects));
    assert_eq!(
        gw.signature_in_use(),
        Signature::V2,
        "forced V2 never switches"
    );
}

#[tokio::test]
async fn gateway_mirror_with_v4_forced_matches_seed() {
    let gw = connect(Signature::V4).await;
    assert_eq!(gw.signature_in_use(), Signature::V4);
    mirror_seeded_and_check(&gw).await;
    assert_eq!(gw.signature_in_use(), Signature::V4);
}

#[tokio::test]
async fn gateway_auto_keeps_v4_when_the_gateway_takes_it() {
    // A proxy that only forwards, and counts how each request reaching the gateway is signed.
    let seen = Proxy::start(gateway_addr(), Behaviour::default()).await;
    let opts = GatewayOptions {
        endpoints: vec![seen.endpoint()],
        ..options(Signature::Auto)
    };
    let gw = Gateway::connect(&opts, Some(&Cluster::get().etcd()))
        .await
        .expect("auto connects");
    assert_eq!(gw.signature_in_use(), Signature::V4);
    let stats = mirror_seeded_and_check(&gw).await;
    assert!(stats.iter().all(|s| s.downloaded_objects == s.objects));
    assert_eq!(gw.signature_in_use(), Signature::V4, "auto switched");

    // Every request, from the first probe to the last download, went out signed with V4.
    let c = &seen.counts;
    let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    let objects: u64 = stats.iter().map(|s| s.objects).sum();
    assert!(
        load(&c.requests) > objects,
        "{} requests for {objects} objects",
        load(&c.requests)
    );
    assert_eq!(
        (load(&c.signed_v4), load(&c.signed_v2), load(&c.unsigned)),
        (load(&c.requests), 0, 0),
        "requests signed V4, V2, not at all"
    );
}

#[tokio::test]
async fn gateway_auto_falls_back_to_v2_when_v4_is_refused() {
    let hammer = Proxy::start(
        gateway_addr(),
        Behaviour {
            reject_v4: true,
            ..Behaviour::default()
        },
    )
    .await;
    let opts = GatewayOptions {
        endpoints: vec![hammer.endpoint()],
        ..options(Signature::Auto)
    };
    let gw = Gateway::connect(&opts, Some(&Cluster::get().etcd()))
        .await
        .expect("auto connects to a V2-only gateway");
    assert_eq!(gw.signature_in_use(), Signature::V2);
    let rejected = hammer
        .counts
        .rejected_v4
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(rejected, 1, "V4 is tried once, then V2 is kept");
    mirror_seeded_and_check(&gw).await;
    assert_eq!(
        hammer
            .counts
            .rejected_v4
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "no V4 request after the fallback"
    );
    let c = &hammer.counts;
    let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        (load(&c.signed_v4), load(&c.signed_v2), load(&c.unsigned)),
        (1, load(&c.requests) - 1, 0),
        "requests signed V4, V2, not at all"
    );
    // Forced V4 against the same gateway fails with one clear authentication error.
    let opts = GatewayOptions {
        endpoints: vec![hammer.endpoint()],
        ..options(Signature::V4)
    };
    let err = Gateway::connect(&opts, Some(&Cluster::get().etcd()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::GatewayAuth, "{err}");
}

#[tokio::test]
async fn gateway_faults_still_give_an_identical_mirror() {
    let flaky = Proxy::start(
        gateway_addr(),
        Behaviour {
            p_slow_down: 0.2,
            p_reset: 0.15,
            max_faults: 60,
            ..Behaviour::default()
        },
    )
    .await;
    let opts = GatewayOptions {
        endpoints: vec![flaky.endpoint()],
        ..options(Signature::V2)
    };
    let gw = Gateway::connect(&opts, Some(&Cluster::get().etcd()))
        .await
        .unwrap();
    mirror_seeded_and_check(&gw).await;
    let c = &flaky.counts;
    let slow = c.slow_downs.load(std::sync::atomic::Ordering::Relaxed);
    let resets = c.resets.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        slow > 0 && resets > 0,
        "faults injected: {slow} 503s, {resets} resets"
    );
    let stats = gw.stats();
    assert!(stats.retries >= slow, "{stats:?}, {slow} 503s");
    assert!(stats.overloads > 0, "{stats:?}");
}

#[tokio::test]
async fn gateway_wrong_keys_give_one_clear_error() {
    let cluster = Cluster::get();
    for signature in [Signature::V2, Signature::V4, Signature::Auto] {
        let opts = GatewayOptions {
            secret_key: Some(SecretString::from("not-the-secret-key-0123456789")),
            ..options(signature)
        };
        let err = Gateway::connect(&opts, Some(&cluster.etcd()))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::GatewayAuth, "{signature:?}: {err}");
        let text = err.to_string();
        assert!(text.contains("refused the credentials"), "{text}");
        assert!(
            !text.contains("not-the-secret-key"),
            "the secret leaks: {text}"
        );
        let (access, _) = cluster.gateway_keys().await;
        assert!(!text.contains(&access), "the access key leaks: {text}");
    }
}

#[tokio::test]
async fn gateway_unreachable_gives_one_clear_error() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = GatewayOptions {
        endpoints: vec![format!("127.0.0.1:{port}")],
        ..options(Signature::Auto)
    };
    let started = std::time::Instant::now();
    let err = Gateway::connect(&opts, Some(&Cluster::get().etcd()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::GatewayUnreachable, "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "gave up in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn gateway_spreads_requests_over_every_published_gateway() {
    // Two "gateways" (proxies to the same radosgw), as /deis/store/gateway/hosts lists several.
    let a = Proxy::start(gateway_addr(), Behaviour::default()).await;
    let b = Proxy::start(gateway_addr(), Behaviour::default()).await;
    let opts = GatewayOptions {
        endpoints: vec![a.endpoint(), b.endpoint()],
        ..options(Signature::V2)
    };
    let gw = Gateway::connect(&opts, Some(&Cluster::get().etcd()))
        .await
        .unwrap();
    let (_dir, repo) = local_repo().await;
    let Mirrored { entries, .. } = mirror_bucket(&gw, &repo, "registry", &[], &NoProgress)
        .await
        .unwrap();
    assert_listing_matches_seed("registry", &entries);
    let ra = a.counts.requests.load(std::sync::atomic::Ordering::Relaxed);
    let rb = b.counts.requests.load(std::sync::atomic::Ordering::Relaxed);
    assert!(ra >= 10 && rb >= 10, "requests per gateway: {ra} and {rb}");
}

#[tokio::test]
async fn gateway_drops_an_unreachable_gateway_and_uses_the_others() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("http://127.0.0.1:{port}");
    let live = Cluster::get().gateway_endpoint().to_owned();
    let opts = GatewayOptions {
        endpoints: vec![dead, live.clone()],
        ..options(Signature::V2)
    };
    let gw = Gateway::connect(&opts, Some(&Cluster::get().etcd()))
        .await
        .unwrap();
    assert_eq!(gw.endpoints(), vec![live.as_str()]);
    assert!(gw.bucket_exists("registry").await.unwrap());
    assert!(!gw.bucket_exists(&fresh_bucket("absent")).await.unwrap());
}
