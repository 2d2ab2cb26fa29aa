//! An encrypted repository on a local directory: what the operator, the snapshot host and a reader
//! of the bucket can each do with it.

use std::os::unix::fs::PermissionsExt as _;

use age::secrecy::ExposeSecret as _;
use age::x25519::Identity;

use super::*;

struct Fixture {
    dir: tempfile::TempDir,
    operator: PathBuf,
    host: PathBuf,
}

impl Fixture {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::generate();
        let operator = dir.path().join("operator.key");
        std::fs::write(&operator, format!("{}\n", id.to_string().expose_secret())).unwrap();
        std::fs::set_permissions(&operator, std::fs::Permissions::from_mode(0o600)).unwrap();
        let host = dir.path().join("host.key");
        let made = Repository::init(
            &Self::location(dir.path(), None, None),
            Init::Encrypted {
                recipients: vec![id.to_public()],
                host_key_file: host.clone(),
            },
        )
        .await
        .unwrap();
        assert!(made.encrypted);
        assert_eq!(made.recipients, vec![id.to_public().to_string()]);
        Self {
            dir,
            operator,
            host,
        }
    }

    fn location(dir: &Path, identity: Option<&Path>, host: Option<&Path>) -> RepositoryOptions {
        RepositoryOptions {
            location: Some(dir.join("repo").display().to_string()),
            fsync: Some(false),
            identity_file: identity.map(Path::to_owned),
            host_key_file: host.map(Path::to_owned),
            ..RepositoryOptions::default()
        }
    }

    async fn as_operator(&self) -> Repository {
        Repository::open(&Self::location(self.dir.path(), Some(&self.operator), None))
            .await
            .unwrap()
    }

    async fn as_host(&self) -> Repository {
        Repository::open(&Self::location(self.dir.path(), None, Some(&self.host)))
            .await
            .unwrap()
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// Every stored file's bytes, for greps.
    fn files(&self) -> Vec<(PathBuf, Vec<u8>)> {
        fn walk(p: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
            for e in std::fs::read_dir(p).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    walk(&e.path(), out);
                } else {
                    out.push((e.path(), std::fs::read(e.path()).unwrap()));
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root(), &mut out);
        out
    }
}

/// A snapshot with a big part, a small part and a bucket listing, taken by the snapshot host.
async fn snapshot(repo: &Repository) -> (Manifest, BlobRef, BlobRef) {
    let big: Vec<u8> = (0..3_000_000u32)
        .flat_map(|i| format!("row {i} secret-row-text\n").into_bytes())
        .take(3 << 20)
        .collect();
    let mut s = repo.start_snapshot(SnapshotId::generate());
    let big = s.add_part_from_reader("database", &big[..]).await.unwrap();
    let small = repo
        .write_blob_from(&b"{\"/deis/database/password\":\"etcd-secret-value\"}"[..])
        .await
        .unwrap()
        .blob;
    s.add_part("etcd", small).unwrap();
    s.add_bucket(
        "registry",
        &[ObjectEntry {
            key: "images/known-store-file-name/layer".into(),
            size: small.size,
            sha256: small.sha256,
            etag: "e".into(),
            meta: crate::s3::ObjectMeta::default(),
            last_modified: None,
        }],
    )
    .await
    .unwrap();
    (s.commit().await.unwrap(), big, small)
}

#[tokio::test]
async fn the_host_writes_and_lists_the_operator_reads_and_the_bucket_reveals_nothing() {
    let f = Fixture::new().await;
    let host = f.as_host().await;
    assert!(host.encrypted() && !host.reads_blobs());
    let (m, big, small) = snapshot(&host).await;

    // The host reads what reuse needs: manifests, listings, blob presence.
    assert_eq!(host.snapshots().await.unwrap(), vec![m.id.clone()]);
    assert_eq!(host.manifest(&m.id).await.unwrap().parts, m.parts);
    assert_eq!(host.listing(&m, "registry").await.unwrap().len(), 1);
    assert!(host.has_blob(&big).await.unwrap());
    assert_eq!(
        host.check_blob(&big, false).await.unwrap().0,
        BlobCheck::Intact
    );
    // ... and no blob's bytes.
    let e = host.blob_file(&big.sha256).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.message().contains("needs an operator's identity"), "{e}");

    // The operator reads every byte back.
    let op = f.as_operator().await;
    assert!(op.reads_blobs());
    let got = std::fs::read(op.blob_file(&big.sha256).await.unwrap().path()).unwrap();
    assert_eq!((Sha256::of(&got), got.len() as u64), (big.sha256, big.size));
    assert_eq!(
        op.read_blob(&small.sha256, 1 << 20, "etcd").await.unwrap(),
        b"{\"/deis/database/password\":\"etcd-secret-value\"}"
    );
    assert_eq!(
        op.check_blob(&big, true).await.unwrap(),
        (BlobCheck::Intact, big.size)
    );

    // A reader of the bucket learns no plaintext, no content hash, no key or name.
    let files = f.files();
    for needle in [
        &b"secret-row-text"[..],
        b"etcd-secret-value",
        b"/deis/database/password",
        b"known-store-file-name",
        big.sha256.to_hex().as_bytes(),
        small.sha256.to_hex().as_bytes(),
    ] {
        for (path, bytes) in &files {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle)
                    && !path
                        .display()
                        .to_string()
                        .contains(std::str::from_utf8(needle).unwrap()),
                "{} reveals {}",
                path.display(),
                String::from_utf8_lossy(needle)
            );
        }
    }
    assert!(
        files
            .iter()
            .all(|(p, _)| !p.starts_with(f.root().join("blobs/sha256"))),
        "no blob under its plain name"
    );

    // A second snapshot of the same bytes stores nothing new (keyed names deduplicate).
    let before = host.blobs().await.unwrap();
    let mut w = host.blob_writer().await.unwrap();
    w.write(&got).await.unwrap();
    assert!(!w.finish().await.unwrap().new);
    assert_eq!(host.blobs().await.unwrap(), before);
}

#[tokio::test]
async fn a_flipped_swapped_or_cut_blob_is_caught_before_use() {
    let f = Fixture::new().await;
    let (m, big, small) = snapshot(&f.as_host().await).await;
    let op = f.as_operator().await;
    let path_of = |sha: &Sha256| {
        let prefix = match &op.keys {
            Some(k) => k.blob_prefix(sha),
            None => unreachable!(),
        };
        let (dir, stem) = prefix.rsplit_once('/').unwrap();
        std::fs::read_dir(f.root().join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with(stem))
            .unwrap()
    };
    let (big_path, small_path) = (path_of(&big.sha256), path_of(&small.sha256));
    let (big_bytes, small_bytes) = (
        std::fs::read(&big_path).unwrap(),
        std::fs::read(&small_path).unwrap(),
    );

    // Flipped: the same size, one byte changed.
    let mut flipped = big_bytes.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x20;
    std::fs::write(&big_path, &flipped).unwrap();
    let (check, _) = op.check_blob(&big, true).await.unwrap();
    assert!(
        matches!(&check, BlobCheck::Unreadable(why) if why.contains("does not open")),
        "{check:?}"
    );
    assert_eq!(
        op.blob_file(&big.sha256).await.unwrap_err().kind(),
        ErrorKind::Integrity
    );

    // Swapped: another blob's sealed bytes, renamed to fit this name's size.
    std::fs::write(&big_path, &big_bytes).unwrap();
    let swapped = big_path.with_extension(small_bytes.len().to_string());
    std::fs::rename(&big_path, &swapped).unwrap();
    std::fs::write(&swapped, &small_bytes).unwrap();
    let (check, _) = op.check_blob(&big, true).await.unwrap();
    assert_eq!(check, BlobCheck::Corrupt(small.sha256));
    let e = op.blob_file(&big.sha256).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Integrity);
    assert!(e.message().contains("swapped or damaged"), "{e}");
    std::fs::remove_file(&swapped).unwrap();

    // Cut: shorter than its name says; presence alone already tells.
    std::fs::write(&big_path, &big_bytes[..big_bytes.len() - 10]).unwrap();
    let (check, _) = op.check_blob(&big, false).await.unwrap();
    assert!(
        matches!(&check, BlobCheck::Unreadable(why) if why.contains(&format!(
            "cut short: {} bytes stored, its name says {}",
            big_bytes.len() - 10,
            big_bytes.len()
        ))),
        "{check:?}"
    );
    assert!(!op.has_blob(&big).await.unwrap());
    // A snapshot stores it again, whole.
    let stored = op.blob_file(&small.sha256).await.unwrap();
    drop(stored);
    std::fs::write(&big_path, &big_bytes).unwrap();
    assert_eq!(
        op.check_blob(&big, true).await.unwrap().0,
        BlobCheck::Intact
    );
    assert_eq!(op.manifest(&m.id).await.unwrap().id, m.id);
}

#[tokio::test]
async fn wrong_missing_or_loose_keys_give_one_clear_line_and_no_init_twice() {
    let f = Fixture::new().await;
    let at = |id: Option<&Path>, host: Option<&Path>| Fixture::location(f.dir.path(), id, host);

    let e = Repository::open(&at(None, None)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(
        e.message().contains("is encrypted and no key was given"),
        "{e}"
    );

    let stranger = f.dir.path().join("stranger.key");
    seal::write_identity(&stranger, &Identity::generate(), "a stranger").unwrap();
    let e = Repository::open(&at(Some(&stranger), None))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.message().contains("no key given opens"), "{e}");

    std::fs::set_permissions(&f.operator, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = Repository::open(&at(Some(&f.operator), None))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");

    let e = Repository::init(&at(None, None), Init::Plain)
        .await
        .unwrap_err();
    assert!(e.message().contains("already"), "{e}");

    // Never initialized: asks for init, and writes nothing there.
    let elsewhere = RepositoryOptions {
        location: Some(f.dir.path().join("none").display().to_string()),
        ..RepositoryOptions::default()
    };
    let e = Repository::open(&elsewhere).await.unwrap_err();
    assert!(
        e.to_string().contains("deis-backup init") || e.message().contains("not a directory"),
        "{e}"
    );
    assert!(!f.dir.path().join("none").exists());
}

#[tokio::test]
async fn prune_deletes_only_what_no_snapshot_names() {
    let f = Fixture::new().await;
    let host = f.as_host().await;
    let (m1, ..) = snapshot(&host).await;
    let orphan = host
        .write_blob_from(&b"named by no snapshot"[..])
        .await
        .unwrap()
        .blob;
    let stats = host.prune_blobs(|| Ok(())).await.unwrap();
    assert_eq!((stats.blobs_deleted, stats.blobs_kept), (1, 2));
    assert!(!host.has_blob(&orphan).await.unwrap());
    host.delete_snapshot(&m1.id).await.unwrap();
    let stats = host.prune_blobs(|| Ok(())).await.unwrap();
    assert_eq!((stats.blobs_deleted, stats.blobs_kept), (2, 0));
    assert!(host.blobs().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_staged_download_is_stored_sealed_and_reads_back() {
    let f = Fixture::new().await;
    let host = f.as_host().await;
    let data: Vec<u8> = (0..2_500_000u32).map(|i| (i % 253) as u8).collect();
    let temp = host.staging_file().await.unwrap();
    std::fs::write(&temp, &data).unwrap();
    let blob = BlobRef {
        sha256: Sha256::of(&data),
        size: data.len() as u64,
    };
    assert!(host.store_staged(temp, blob).await.unwrap().new);
    assert!(host.has_blob(&blob).await.unwrap());
    let op = f.as_operator().await;
    let got = std::fs::read(op.blob_file(&blob.sha256).await.unwrap().path()).unwrap();
    assert_eq!(got, data);
    assert!(
        f.files()
            .iter()
            .all(|(_, bytes)| !bytes.windows(64).any(|w| w == &data[..64])),
        "stored in the clear"
    );
}
