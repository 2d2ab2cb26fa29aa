//! Staging directories that restores leave behind when they do not finish (a killed agent, a lost
//! host): telling them apart, keeping the live ones, removing the stale ones.
//!
//! Invariants:
//! - An entry of a store directory whose name starts with [`STAGING_PREFIX`] is a staging
//!   directory: it never makes the store count as non-empty (Describe, a restore's not-empty
//!   check), and an overwrite never moves it aside.
//! - A restore registers its staging directory in this process's live set before creating it and
//!   leaves the set when it ends; meanwhile a keep-alive thread sets the directory's mtime to now
//!   every [`TOUCH_EVERY`], through its handle. A staging directory in the live set is never
//!   removed, whatever its age.
//! - [`clean`] removes only what is all of: directly inside the given store directory, named with
//!   the prefix, a directory itself (`lstat`: a symlink or file of that name is left alone), not in
//!   the live set, with an mtime older than the threshold ([`STALE_AFTER`] at agent start and
//!   before each restore), and with nothing in its `previous/` (where a commit under overwrite
//!   moves the target's old entries: a restore stopped in its commit, or whose rollback failed,
//!   leaves the previous store there, which only an operator may drop; it is logged as kept).
//! - Removal is `std::fs::remove_dir_all` on that path, which (since Rust 1.58.1, CVE-2022-21658)
//!   `lstat`s it, then opens each directory with `O_NOFOLLOW | O_DIRECTORY` and unlinks relative to
//!   that handle: a symlink inside, or put in place of the directory meanwhile, is removed and
//!   never followed, so nothing outside the staging directory is touched.
//! - Every removal is logged with its path and age, and every failure to remove as a warning;
//!   clean-up never fails a restore or the agent's start.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use rustix::fs::{Timespec, Timestamps};

use super::STAGING_PREFIX;

/// Age (by mtime) past which a staging directory not in the live set is debris.
pub const STALE_AFTER: Duration = Duration::from_secs(60 * 60);
/// How often a restore in progress touches its staging directory (in tests: often).
pub const TOUCH_EVERY: Duration = if cfg!(test) {
    Duration::from_millis(50)
} else {
    Duration::from_secs(60)
};
/// Inside a staging directory: where a commit under overwrite moves the target's old entries.
pub const PREVIOUS: &str = "previous";

/// Whether `name` is a staging directory's name.
pub fn is_staging_name(name: &OsStr) -> bool {
    name.as_bytes().starts_with(STAGING_PREFIX.as_bytes())
}

/// Names of the staging directories of the restores running in this process.
static LIVE: Mutex<BTreeSet<OsString>> = Mutex::new(BTreeSet::new());

fn is_live(name: &OsStr) -> bool {
    LIVE.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .contains(name)
}

/// A restore's staging directory, in the live set (and touched, once `keep_alive` is called)
/// until dropped.
pub(super) struct Live {
    name: OsString,
    keepalive: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

impl Live {
    /// Registers `name` (before the directory is made).
    pub fn register(name: &str) -> Self {
        let name = OsString::from(name);
        LIVE.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.clone());
        Self {
            name,
            keepalive: None,
        }
    }

    /// Sets the mtime of the directory `fd` to now every [`TOUCH_EVERY`] until dropped.
    pub fn keep_alive(&mut self, fd: OwnedFd, path: &Path) {
        let (tx, rx) = mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("restore-keepalive".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(TOUCH_EVERY) {
                    let _ = touch(&fd, SystemTime::now());
                }
            });
        match spawned {
            Ok(handle) => self.keepalive = Some((tx, handle)),
            Err(e) => tracing::warn!(
                path = %path.display(), error = %e,
                "cannot start the thread that keeps the staging directory fresh; a restore over \
                 an hour may see it removed by another agent's clean-up"
            ),
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some((tx, handle)) = self.keepalive.take() {
            drop(tx);
            let _ = handle.join();
        }
        LIVE.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.name);
    }
}

/// Sets the access and modification times of `fd` to `t`.
pub(super) fn touch(fd: &OwnedFd, t: SystemTime) -> rustix::io::Result<()> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let ts = Timespec {
        tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: d.subsec_nanos().into(),
    };
    rustix::fs::futimens(
        fd,
        &Timestamps {
            last_access: ts,
            last_modification: ts,
        },
    )
}

/// Whether the directory `dir` holds at least one entry (a missing or unreadable one: no).
fn holds_anything(dir: &Path) -> bool {
    match fs::symlink_metadata(dir) {
        Ok(md) if md.is_dir() => fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()),
        _ => false,
    }
}

/// Removes the stale staging directories directly inside `store` (see the module invariants) and
/// returns each one removed with its age.
pub fn clean(store: &Path, older_than: Duration) -> Vec<(PathBuf, Duration)> {
    let mut removed = Vec::new();
    let list = match fs::read_dir(store) {
        Ok(list) => list,
        Err(e) => {
            tracing::warn!(path = %store.display(), error = %e, "cannot list the store for stale restore staging directories");
            return removed;
        }
    };
    let now = SystemTime::now();
    for entry in list.flatten() {
        let name = entry.file_name();
        if !is_staging_name(&name) || is_live(&name) {
            continue;
        }
        let path = store.join(&name);
        let Ok(md) = fs::symlink_metadata(&path) else {
            continue;
        };
        let age = md
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        if !md.is_dir() || age < older_than {
            continue;
        }
        let previous = path.join(PREVIOUS);
        if holds_anything(&previous) {
            tracing::warn!(
                path = %path.display(), age_secs = age.as_secs(),
                "a stale restore staging directory holds the store's previous entries in {} (a restore \
                 stopped while committing, or whose rollback failed): kept; move them back or remove \
                 it by hand",
                previous.display()
            );
            continue;
        }
        match fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), age_secs = age.as_secs(), "removed a stale restore staging directory");
                removed.push((path, age));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), age_secs = age.as_secs(), error = %e, "cannot remove a stale restore staging directory");
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn stage(store: &Path, name: &str, age: Duration) -> PathBuf {
        let p = store.join(name);
        fs::create_dir_all(p.join("tree/d")).unwrap();
        fs::write(p.join("tree/d/f"), b"x").unwrap();
        set_age(&p, age);
        p
    }

    fn set_age(p: &Path, age: Duration) {
        let fd = rustix::fs::open(
            p,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        touch(&fd, SystemTime::now() - age).unwrap();
    }

    #[test]
    fn stale_staging_is_removed_and_fresh_live_or_holding_previous_entries_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        fs::create_dir(&store).unwrap();
        let hour = Duration::from_secs(3600);
        let two_hours = 2 * hour;
        // Outside the store: must survive a symlink to it inside stale debris.
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim"), b"secret").unwrap();

        let stale = stage(&store, ".deis-backup-restore-1-1", two_hours);
        symlink(&outside, stale.join("tree/link")).unwrap();
        symlink(outside.join("victim"), stale.join("tree/d/file-link")).unwrap();
        set_age(&stale, two_hours);
        let fresh = stage(&store, ".deis-backup-restore-1-2", Duration::from_secs(60));
        let holding = stage(&store, ".deis-backup-restore-1-3", two_hours);
        fs::create_dir_all(holding.join("previous/old-0")).unwrap();
        set_age(&holding, two_hours);
        let live_name = ".deis-backup-restore-1-4";
        let live = Live::register(live_name);
        let running = stage(&store, live_name, two_hours);
        symlink(&outside, store.join(".deis-backup-restore-link")).unwrap();
        fs::write(store.join("data"), b"keep").unwrap();

        let removed = clean(&store, hour);
        assert_eq!(removed.len(), 1, "{removed:?}");
        assert_eq!(removed[0].0, stale);
        assert!(removed[0].1 >= hour);
        assert!(!stale.exists());
        assert!(fresh.join("tree/d/f").exists());
        assert!(holding.join("previous/old-0").exists());
        assert!(running.join("tree/d/f").exists());
        assert!(
            fs::symlink_metadata(store.join(".deis-backup-restore-link"))
                .unwrap()
                .is_symlink()
        );
        assert_eq!(fs::read(outside.join("victim")).unwrap(), b"secret");
        assert_eq!(fs::read(store.join("data")).unwrap(), b"keep");

        // Out of the live set, the same directory is debris.
        drop(live);
        let removed = clean(&store, hour);
        assert_eq!(removed.len(), 1, "{removed:?}");
        assert_eq!(removed[0].0, running);
    }

    #[test]
    fn keep_alive_keeps_the_directory_fresh_and_stops_promptly() {
        let tmp = tempfile::tempdir().unwrap();
        let name = ".deis-backup-restore-9-9";
        let p = stage(tmp.path(), name, Duration::from_secs(7200));
        let fd = rustix::fs::open(
            &p,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let mut live = Live::register(name);
        live.keep_alive(fd, &p);
        assert!(is_live(OsStr::new(name)));
        std::thread::sleep(TOUCH_EVERY * 4);
        let age = SystemTime::now()
            .duration_since(fs::metadata(&p).unwrap().modified().unwrap())
            .unwrap_or_default();
        assert!(age < Duration::from_secs(60), "{age:?}");
        let t = std::time::Instant::now();
        drop(live);
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(!is_live(OsStr::new(name)));
    }
}
