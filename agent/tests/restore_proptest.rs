//! Property test of the store restore over crafted tar streams (a short smoke of what `fuzz/`
//! runs at length): never a panic; nothing outside the scratch target is created or changed (a
//! sibling canary file and directory, the levels above, and any absolute or `..` path an entry
//! names); a refused archive leaves the target as it was; no staging directory is left behind.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use deis_backup_agent::config::RestorePolicy;
use deis_backup_agent::error::Error;
use deis_backup_agent::store::restore::{Options, STAGING_PREFIX, restore};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

type Facts = (u32, u64, i64, Vec<u8>);

/// Every path under `root` (symlinks not followed) with mode, size, mtime and content/link.
fn tree(root: &Path, skip: Option<&Path>, out: &mut BTreeMap<PathBuf, Facts>) {
    let Ok(m) = fs::symlink_metadata(root) else {
        return;
    };
    let body = if m.is_file() {
        Sha256::digest(fs::read(root).unwrap()).to_vec()
    } else if m.is_symlink() {
        fs::read_link(root)
            .unwrap()
            .into_os_string()
            .into_encoded_bytes()
    } else {
        Vec::new()
    };
    out.insert(root.into(), (m.mode(), m.size(), m.mtime(), body));
    if m.is_dir() {
        for e in fs::read_dir(root).unwrap().flatten() {
            if Some(e.path().as_path()) != skip {
                tree(&e.path(), skip, out);
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink,
    Hardlink,
    Fifo,
}

/// Entry names: ordinary ones, and every way out of a target an archive might try.
fn name() -> impl Strategy<Value = String> {
    let seg = prop_oneof![
        6 => prop::sample::select(&["a", "b", "c", "d"][..]).prop_map(str::to_owned),
        2 => prop::sample::select(&["..", ".", "", "canary.txt", "canary_dir", "inner.txt", "target"][..])
            .prop_map(str::to_owned),
        1 => "[a-z.]{1,4}",
    ];
    prop_oneof![
        6 => prop::collection::vec(seg, 1..5).prop_map(|s| s.join("/")),
        1 => Just("/tmp/deis-backup-proptest-escape".to_owned()),
        1 => prop::sample::select(&["../../../canary.txt", "../../../canary_dir/inner.txt", "../sibling.txt", "./"][..])
            .prop_map(str::to_owned),
    ]
}

fn entry() -> impl Strategy<Value = (Kind, String, String, u32)> {
    let kind = prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Kind::File),
        2 => Just(Kind::Dir),
        2 => Just(Kind::Symlink),
        1 => Just(Kind::Hardlink),
        1 => Just(Kind::Fifo),
    ];
    (
        kind,
        name(),
        name(),
        prop::sample::select(&[0o644u32, 0o755, 0o4755, 0o000, 0o777][..]),
    )
}

/// A ustar archive written header by header, names unchecked (the `tar` crate's builder would
/// refuse `..`); optionally cut short or with one byte flipped.
fn archive(entries: &[(Kind, String, String, u32)], damage: Option<(usize, u8)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (kind, path, link, mode) in entries {
        let mut h = tar::Header::new_ustar();
        let (ty, data): (tar::EntryType, &[u8]) = match kind {
            Kind::File(d) => (tar::EntryType::Regular, d),
            Kind::Dir => (tar::EntryType::Directory, &[]),
            Kind::Symlink => (tar::EntryType::Symlink, &[]),
            Kind::Hardlink => (tar::EntryType::Link, &[]),
            Kind::Fifo => (tar::EntryType::Fifo, &[]),
        };
        h.set_entry_type(ty);
        h.set_mode(*mode);
        h.set_mtime(1_500_000_000);
        h.set_size(data.len() as u64);
        let old = h.as_old_mut();
        let n = path.len().min(100);
        old.name[..n].copy_from_slice(&path.as_bytes()[..n]);
        let l = link.len().min(100);
        old.linkname[..l].copy_from_slice(&link.as_bytes()[..l]);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0; 1024]);
    if let Some((at, byte)) = damage {
        let at = at % out.len();
        out[at] ^= byte;
    }
    out
}

fn check(tar: &[u8], overwrite: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    fs::write(base.join("canary.txt"), b"canary").unwrap();
    fs::create_dir(base.join("canary_dir")).unwrap();
    fs::write(base.join("canary_dir/inner.txt"), b"inner").unwrap();
    fs::create_dir_all(base.join("root/a")).unwrap();
    fs::write(base.join("root/sibling.txt"), b"s").unwrap();
    let target = base.join("root/a/target");
    fs::create_dir(&target).unwrap();
    if overwrite {
        fs::write(target.join("old"), b"old").unwrap();
        fs::create_dir(target.join("olddir")).unwrap();
    }
    let escape = Path::new("/tmp/deis-backup-proptest-escape");
    let escaped_before = escape.symlink_metadata().is_ok();
    let (mut before, mut target_before) = (BTreeMap::new(), BTreeMap::new());
    tree(base, Some(&target), &mut before);
    tree(&target, None, &mut target_before);
    // The target's own mtime moves with its staging directory: only its content counts.
    target_before.remove(&target);

    let z = zstd::encode_all(tar, 1).unwrap();
    let opts = Options {
        overwrite,
        policy: RestorePolicy {
            owners: false,
            setid: true,
            devices: false,
            max_bytes: 1 << 20,
            max_window_log: 20,
        },
        segments: vec![(z.len() as u64, Sha256::digest(&z).to_vec())],
    };
    let result = restore(&target, &z[..], &opts);

    let mut after = BTreeMap::new();
    tree(base, Some(&target), &mut after);
    assert_eq!(
        before, after,
        "something outside the target changed: {result:?}"
    );
    assert!(
        escaped_before || escape.symlink_metadata().is_err(),
        "{} created",
        escape.display()
    );
    let staging_left = fs::read_dir(&target)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(STAGING_PREFIX));
    assert!(!staging_left, "staging left behind: {result:?}");
    if let Err(e) = result {
        assert!(
            !matches!(
                e,
                Error::RestoreIncomplete { .. } | Error::RestoreUndone { .. }
            ),
            "{e}"
        );
        let mut target_after = BTreeMap::new();
        tree(&target, None, &mut target_after);
        target_after.remove(&target);
        assert_eq!(
            target_before, target_after,
            "a refused archive changed the target: {e}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn crafted_archives_stay_inside_the_target(
        entries in prop::collection::vec(entry(), 0..6),
        damage in proptest::option::weighted(0.2, (any::<usize>(), 1u8..)),
        overwrite in any::<bool>(),
    ) {
        check(&archive(&entries, damage), overwrite);
    }

    #[test]
    fn arbitrary_bytes_are_refused_cleanly(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        check(&data, false);
    }
}
