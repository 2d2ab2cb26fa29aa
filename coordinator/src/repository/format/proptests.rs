//! Property tests of the manifest and listing parsers (a short smoke of what `fuzz/` runs at
//! length): a manifest or listing from a bucket someone else can write never panics the reader,
//! and one that is accepted holds what the rest of the code relies on.

use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::repository::Repository;
use crate::testkit::memory::MemoryBackend;

const ID: &str = "20261124T233000.123Z-abcd";

/// Reads `data` as snapshot `ID`'s manifest through `Repository::manifest`.
fn read_manifest(data: &[u8]) -> Result<Manifest> {
    let id: SnapshotId = ID.parse().unwrap();
    let repo = Repository::with_backend(
        // Frozen: a read never writes.
        Arc::new(MemoryBackend::frozen([(
            manifest_path(&id).as_str(),
            Bytes::copy_from_slice(data),
        )])),
        false,
    );
    futures::executor::block_on(repo.manifest(&id))
}

/// A digest whose text is 64 lower-case hex digits that parse back to it.
fn well_formed(sha: &Sha256) -> bool {
    let hex = sha.to_string();
    hex.len() == 64 && hex.parse::<Sha256>() == Ok(*sha)
}

/// What an accepted manifest must hold.
fn check_accepted(m: &Manifest) {
    m.validate().expect("an accepted manifest validates");
    assert_eq!(m.format, FORMAT);
    assert_eq!(m.id.as_str(), ID);
    for (name, part) in &m.parts {
        assert!(name.split('/').all(safe_name), "{name:?}");
        let blobs = part.blobs();
        let mut total = 0u64;
        for b in &blobs {
            assert!(well_formed(&b.sha256), "{b:?}");
            assert!(blob_path(&b.sha256).starts_with(BLOBS_DIR));
            total = total.checked_add(b.size).expect("sizes add up");
        }
        assert_eq!(total, part.size());
    }
    for (bucket, b) in &m.buckets {
        assert_eq!(b.listing, listing_path(&m.id, bucket));
        assert!(!b.listing.contains(".."), "{}", b.listing);
    }
}

/// Strings that are sometimes well formed, often nearly so.
fn digest() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-f]{64}",
        "[0-9a-fA-F]{63,65}",
        Just("../../etc/passwd".to_owned()),
        ".{0,70}",
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{1,12}",
        "[a-z]{1,5}/[a-z.]{0,5}",
        Just("..".to_owned()),
        Just("a/../b".to_owned()),
        Just(String::new()),
        ".{0,12}",
    ]
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..100, Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()]
}

fn part_json() -> impl Strategy<Value = serde_json::Value> {
    (
        proptest::option::of(digest()),
        size(),
        prop::collection::vec((digest(), size()), 0..4),
    )
        .prop_map(|(sha, size, segs)| {
            let mut v = serde_json::json!({ "size": size });
            if let Some(sha) = sha {
                v["sha256"] = sha.into();
            }
            if !segs.is_empty() {
                v["segments"] = segs
                    .into_iter()
                    .map(|(s, n)| serde_json::json!({"sha256": s, "size": n}))
                    .collect();
            }
            v
        })
}

fn manifest_json() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::btree_map(name(), part_json(), 0..4),
        prop::collection::btree_map(name(), (name(), digest()), 0..3),
        any::<bool>(),
    )
        .prop_map(|(parts, buckets, proper_listing)| {
            let buckets: serde_json::Map<String, serde_json::Value> = buckets
                .into_iter()
                .map(|(b, (other, sha))| {
                    let listing = if proper_listing {
                        format!("snapshots/{ID}/buckets/{b}.jsonl")
                    } else {
                        format!("snapshots/{ID}/buckets/{other}.jsonl")
                    };
                    let v = serde_json::json!({
                        "listing": listing, "listing-sha256": sha, "objects": 1, "bytes": 1
                    });
                    (b, v)
                })
                .collect();
            serde_json::to_vec(&serde_json::json!({
                "format": FORMAT, "id": ID, "started": "", "completed": "",
                "parts": parts, "buckets": buckets,
            }))
            .unwrap()
        })
}

fn listing_line() -> impl Strategy<Value = String> {
    (".{0,20}", size(), digest(), proptest::option::of(".{0,8}")).prop_map(
        |(key, size, sha, ct)| {
            let mut v = serde_json::json!({"key": key, "size": size, "etag": "e", "sha256": sha});
            if let Some(ct) = ct {
                v["content-type"] = ct.into();
                v["metadata"] = serde_json::json!({ "m": "v" });
            }
            v.to_string()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn manifest_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(m) = read_manifest(&data) {
            check_accepted(&m);
        }
        let _ = decode_listing(&data, "p");
    }

    #[test]
    fn structured_manifests_are_refused_or_valid(data in manifest_json()) {
        match read_manifest(&data) {
            Ok(m) => check_accepted(&m),
            Err(e) => prop_assert!(e.to_string().contains(ID), "{e}"),
        }
    }

    #[test]
    fn accepted_listings_round_trip(lines in prop::collection::vec(listing_line(), 0..6)) {
        let data = lines.join("\n");
        if let Ok(entries) = decode_listing(data.as_bytes(), "p") {
            for e in &entries {
                prop_assert!(well_formed(&e.sha256));
                prop_assert!(!e.key.is_empty() && e.key.len() <= 1024);
            }
            let mut again = decode_listing(&encode_listing(&entries).unwrap(), "re").unwrap();
            let mut want = entries;
            want.sort_by(|a, b| a.key.cmp(&b.key));
            again.sort_by(|a, b| a.key.cmp(&b.key));
            prop_assert_eq!(again, want);
        }
    }
}
