//! The store side of the agent: which directories it may touch (the allow-list), what filesystem
//! each one is on, and the archive and restore of one such directory (`archive`, `restore`).
//!
//! Invariants:
//! - A requested path is used only when it equals an allow-listed path (after removing trailing
//!   slashes); no prefix or sub-path matching, so `..` tricks have nothing to match.
//! - The filesystem identity follows the rule documented on `StorePath.fs_identity` in the proto:
//!   CephFS (kernel client or ceph-fuse) is named by the Ceph cluster fsid and the directory's
//!   CephFS inode number, so every host and both clients agree; other shared (network)
//!   filesystems by type, statfs `f_fsid` and the path inside them; anything else is host-local
//!   and includes the machine id.
//! - A store counts as empty (Describe) when it holds nothing but restore staging directories
//!   (named `restore::STAGING_PREFIX`...): a killed restore's debris never makes it look used.

pub mod archive;
pub mod restore;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use deis_backup_proto::v1::StorePath;

use crate::error::{Error, Result};

/// Filesystem types that several hosts mount as one filesystem.
const SHARED_TYPES: &[&str] = &[
    "ceph",
    "fuse.ceph-fuse",
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "glusterfs",
    "fuse.glusterfs",
];

/// The allow-listed path equal to `requested`.
pub fn resolve(allowed: &[PathBuf], requested: &str) -> Result<PathBuf> {
    let norm = |s: &str| {
        let t = s.trim_end_matches('/');
        if t.is_empty() {
            "/".to_owned()
        } else {
            t.to_owned()
        }
    };
    let want = norm(requested);
    allowed
        .iter()
        .find(|p| norm(&p.to_string_lossy()) == want)
        .cloned()
        .ok_or_else(|| Error::NotAllowed {
            path: requested.to_owned(),
            allowed: allowed
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    root: String,
    point: String,
    fs_type: String,
    source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
            && let Ok(v) = u8::try_from(
                b[i + 1..i + 4]
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0')),
            )
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let mut post = post.split(' ');
            Some(Mount {
                root: unescape(pre.get(3)?),
                point: unescape(pre.get(4)?),
                fs_type: post.next()?.to_owned(),
                source: unescape(post.next().unwrap_or("")),
            })
        })
        .collect()
}

/// The mount holding `path` (the last, longest mount point that is a prefix of it).
fn mount_of<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.point))
        .max_by_key(|m| Path::new(&m.point).components().count())
}

/// The Ceph cluster fsid when the mount source names it (`name@<fsid>.<fs>=/path`).
fn ceph_cluster_fsid(source: &str) -> Option<String> {
    let after = source.split_once('@')?.1;
    let fsid = after.split_once('.')?.0;
    (fsid.len() == 36 && fsid.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
        .then(|| fsid.to_owned())
}

/// The CephFS client types (kernel and FUSE).
const CEPHFS_TYPES: &[&str] = &["ceph", "fuse.ceph-fuse"];

/// Bits of a `.snap` directory's inode number that hold its directory's CephFS inode number
/// (ceph-fuse marks snapshot directories above them; the kernel client shows the number as is).
const CEPH_INO_BITS: u64 = (1 << 48) - 1;

/// The identity of a CephFS directory: cluster fsid and CephFS inode number (the proto's rule).
fn cephfs_identity(dir: &Path, mount: &Mount) -> Result<String> {
    let mut buf = [0u8; 128];
    let fsid = rustix::fs::getxattr(dir, "ceph.cluster_fsid", &mut buf[..])
        .ok()
        .map(|n| String::from_utf8_lossy(&buf[..n]).trim().to_owned())
        .filter(|f| !f.is_empty())
        .or_else(|| ceph_cluster_fsid(&mount.source))
        .ok_or_else(|| Error::Config {
            what: format!(
                "{} is on CephFS, but CephFS serves no ceph.cluster_fsid there and the mount \
                 source names no fsid",
                dir.display()
            ),
        })?;
    let ino = match std::fs::metadata(dir.join(".snap")) {
        Ok(md) => md.ino() & CEPH_INO_BITS,
        // snapshots hidden or off: the directory's own number, right unless it is a FUSE root
        Err(_) => std::fs::metadata(dir)
            .map_err(Error::io("cannot stat", dir))?
            .ino(),
    };
    Ok(format!("shared:cephfs:{fsid}:ino:{ino}"))
}

/// Describes one allow-listed path for Describe.
pub fn describe(path: &Path, machine_id: &str) -> Result<StorePath> {
    let canon = path
        .canonicalize()
        .map_err(Error::io("cannot open store path", path))?;
    let md = std::fs::metadata(&canon).map_err(Error::io("cannot stat", &canon))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default();
    let mount = mount_of(&mounts, &canon).cloned();
    let fs_type = mount
        .as_ref()
        .map_or_else(String::new, |m| m.fs_type.clone());
    let shared = SHARED_TYPES.contains(&fs_type.as_str());
    // Read once: the identity of a shared filesystem needs it, the free space uses it if it came.
    let vfs = rustix::fs::statvfs(&canon);
    let fs_identity = if CEPHFS_TYPES.contains(&fs_type.as_str()) {
        let m = mount.as_ref().expect("a CephFS type came from a mount");
        cephfs_identity(&canon, m)?
    } else if shared {
        let vfs = vfs
            .as_ref()
            .map_err(|e| Error::io("cannot statfs", &canon)((*e).into()))?;
        let m = mount.as_ref().expect("a shared type came from a mount");
        let inside = canon.strip_prefix(&m.point).unwrap_or(Path::new(""));
        let inner = Path::new(&m.root).join(inside);
        let id = ceph_cluster_fsid(&m.source).unwrap_or_else(|| format!("{:016x}", vfs.f_fsid));
        format!("shared:{fs_type}:{id}:{}", inner.display())
    } else {
        format!("local:{machine_id}:{}:{}", md.dev(), md.ino())
    };
    // Staging directories of restores (running, or debris of one that did not finish) do not count.
    let mut empty = true;
    for e in std::fs::read_dir(&canon).map_err(Error::io("cannot list", &canon))? {
        let e = e.map_err(Error::io("cannot list", &canon))?;
        if !restore::is_staging_name(&e.file_name()) {
            empty = false;
            break;
        }
    }
    // A filesystem that reports no size at all (CephFS while its cluster has no usage figures)
    // says nothing about its free space: unknown, not zero.
    let free_bytes = vfs
        .ok()
        .filter(|v| v.f_blocks > 0)
        .map(|v| v.f_bavail.saturating_mul(v.f_frsize));
    Ok(StorePath {
        path: path.display().to_string(),
        fs_type,
        fs_identity,
        shared,
        empty,
        free_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_paths_resolve() {
        let allowed = vec![PathBuf::from("/var/lib/deis/store")];
        assert!(resolve(&allowed, "/var/lib/deis/store/").is_ok());
        for bad in [
            "/var/lib/deis",
            "/var/lib/deis/store/../../..",
            "/var/lib/deis/store/logs",
            "/",
        ] {
            assert!(
                matches!(resolve(&allowed, bad), Err(Error::NotAllowed { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn mountinfo_picks_the_innermost_mount() {
        let text = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                    40 22 0:50 /volumes/deis /var/lib/deis/store rw - ceph 10.0.0.1:6789,10.0.0.2:6789:/ rw\n\
                    41 22 0:51 / /mnt/with\\040space rw - ceph admin@6d2ac3f4-1f3e-4b5a-9c2d-0123456789ab.cephfs=/ rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m[2].point, "/mnt/with space");
        let got = mount_of(&m, Path::new("/var/lib/deis/store/logs")).unwrap();
        assert_eq!(
            (got.fs_type.as_str(), got.root.as_str()),
            ("ceph", "/volumes/deis")
        );
        assert_eq!(mount_of(&m, Path::new("/etc")).unwrap().fs_type, "ext4");
        assert_eq!(
            ceph_cluster_fsid(&m[2].source).as_deref(),
            Some("6d2ac3f4-1f3e-4b5a-9c2d-0123456789ab")
        );
        assert_eq!(ceph_cluster_fsid(&m[1].source), None);
    }

    #[test]
    fn local_identity_names_the_machine() {
        let dir = std::env::temp_dir();
        let a = describe(&dir, "machine-a").unwrap();
        let b = describe(&dir, "machine-b").unwrap();
        assert!(!a.shared);
        assert!(a.fs_identity.starts_with("local:machine-a:"));
        assert_ne!(a.fs_identity, b.fs_identity);
    }

    #[test]
    fn staging_debris_does_not_make_a_store_non_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        std::fs::create_dir_all(store.join(".deis-backup-restore-1-2/tree")).unwrap();
        assert!(describe(&store, "m").unwrap().empty);
        std::fs::write(store.join("data"), b"x").unwrap();
        assert!(!describe(&store, "m").unwrap().empty);
    }
}
