//! Resolving a relative path beneath a directory handle without following any symlink, with or
//! without `openat2`.
//!
//! Invariants:
//! - Paths are relative, and every component is neither empty, `.` nor `..` (refused with `EINVAL`
//!   and `EXDEV`, whichever resolver runs); the empty path names the handle's own directory.
//! - Two resolvers, the same answers for such paths:
//!   - `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`;
//!   - on kernels without it (before 5.6, `ENOSYS`) or where a seccomp profile refuses it (Docker
//!     before 20.10 answers `EPERM`): one `openat(O_NOFOLLOW | O_DIRECTORY | O_CLOEXEC)` per
//!     directory component, each relative to the handle the previous one gave, then the last
//!     component opened relative to the last handle with `O_NOFOLLOW`. A symlink anywhere gives
//!     `ELOOP` (a non-directory `ENOTDIR`) and is refused, and with `..` refused nothing climbs out:
//!     for paths without symlinks this is exactly what `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`
//!     allows. (Neither resolver stops at mount points; the restore does not need it to.)
//! - Which one runs is detected once per process, by a probe at first use, and cached; the
//!   fallback is logged once. Tests force either one on their own thread (`with_resolver`).

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::OnceLock;

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// The `openat2` resolve flags.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// How paths beneath a handle are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolver {
    /// One `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`.
    Openat2,
    /// `openat(O_NOFOLLOW)` component by component.
    PerComponent,
}

static DETECTED: OnceLock<Resolver> = OnceLock::new();

/// Whether this kernel (and seccomp profile) lets us call `openat2`.
pub(crate) fn detect() -> Resolver {
    *DETECTED.get_or_init(|| {
        let probe = rustix::fs::openat2(
            rustix::fs::CWD,
            "/",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::empty(),
        );
        match probe {
            Err(e @ (Errno::NOSYS | Errno::PERM)) => {
                tracing::warn!(
                    error = %e,
                    "openat2 is unavailable (kernel before 5.6, or a seccomp profile refusing it): \
                     store restores resolve paths one component at a time with O_NOFOLLOW"
                );
                Resolver::PerComponent
            }
            _ => Resolver::Openat2,
        }
    })
}

#[cfg(test)]
thread_local! {
    static FORCED: std::cell::Cell<Option<Resolver>> = const { std::cell::Cell::new(None) };
    /// Resolutions done on this thread, by resolver (`Openat2`, `PerComponent`).
    static USED: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// The resolver in use (on this thread, for tests).
fn resolver() -> Resolver {
    #[cfg(test)]
    if let Some(r) = FORCED.with(std::cell::Cell::get) {
        return r;
    }
    detect()
}

/// Runs `f` with `r` as this thread's resolver, and returns what it returned with how many
/// resolutions each resolver did meanwhile (`Openat2`, `PerComponent`).
#[cfg(test)]
pub(crate) fn with_resolver<T>(r: Resolver, f: impl FnOnce() -> T) -> (T, (u64, u64)) {
    struct Reset(Option<Resolver>);
    impl Drop for Reset {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(FORCED.with(|c| c.replace(Some(r))));
    let before = USED.with(std::cell::Cell::get);
    let out = f();
    let after = USED.with(std::cell::Cell::get);
    (out, (after.0 - before.0, after.1 - before.1))
}

#[cfg(test)]
fn count(r: Resolver) {
    USED.with(|c| {
        let (a, b) = c.get();
        c.set(match r {
            Resolver::Openat2 => (a + 1, b),
            Resolver::PerComponent => (a, b + 1),
        });
    });
}

#[cfg(not(test))]
fn count(_: Resolver) {}

/// Refuses `..` (`EXDEV`, as `RESOLVE_BENEATH` does when it would climb out), `.` and empty
/// components (`EINVAL`).
fn check(component: &[u8]) -> rustix::io::Result<()> {
    match component {
        b".." => Err(Errno::XDEV),
        b"" | b"." => Err(Errno::INVAL),
        _ => Ok(()),
    }
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Opens `rel` beneath `dir` with `flags` (`O_NOFOLLOW | O_CLOEXEC` added); empty `rel`: `dir`.
fn open(dir: &OwnedFd, rel: &[u8], flags: OFlags) -> rustix::io::Result<OwnedFd> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if rel.is_empty() {
        return rustix::fs::openat(dir, ".", flags, Mode::empty());
    }
    let parts: Vec<&[u8]> = rel.split(|b| *b == b'/').collect();
    for c in &parts {
        check(c)?;
    }
    let r = resolver();
    count(r);
    match r {
        Resolver::Openat2 => {
            rustix::fs::openat2(dir, OsStr::from_bytes(rel), flags, Mode::empty(), BENEATH)
        }
        Resolver::PerComponent => {
            let (last, dirs) = parts.split_last().expect("split yields at least one part");
            let mut held: Option<OwnedFd> = None;
            for c in dirs {
                let at = held.as_ref().unwrap_or(dir);
                held = Some(rustix::fs::openat(
                    at,
                    OsStr::from_bytes(c),
                    dir_flags(),
                    Mode::empty(),
                )?);
            }
            let at = held.as_ref().unwrap_or(dir);
            rustix::fs::openat(at, OsStr::from_bytes(last), flags, Mode::empty())
        }
    }
}

/// Opens the directory `rel` (empty: `dir` itself) beneath `dir`, following no symlink.
pub(crate) fn open_beneath(dir: &OwnedFd, rel: &[u8]) -> rustix::io::Result<OwnedFd> {
    open(dir, rel, dir_flags())
}

/// An `O_PATH` handle on `rel` beneath `dir`, following no symlink (a symlink as the last
/// component gives a handle on the link itself: callers check the type).
pub(crate) fn open_path_beneath(dir: &OwnedFd, rel: &[u8]) -> rustix::io::Result<OwnedFd> {
    open(dir, rel, OFlags::PATH)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;

    fn both(f: impl Fn(Resolver)) {
        for r in [Resolver::Openat2, Resolver::PerComponent] {
            if r == Resolver::Openat2 && detect() != Resolver::Openat2 {
                eprintln!("skipped openat2: unavailable here");
                continue;
            }
            let ((), used) = with_resolver(r, || f(r));
            match r {
                Resolver::Openat2 => assert_eq!(used.1, 0, "{r:?}"),
                Resolver::PerComponent => assert_eq!(used.0, 0, "{r:?}"),
            }
        }
    }

    #[test]
    fn both_resolvers_refuse_symlinks_dotdot_and_odd_components() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/f"), b"x").unwrap();
        symlink(tmp.path(), root.join("a/up")).unwrap();
        symlink("b", root.join("a/rel")).unwrap();
        let fd = rustix::fs::open(&root, dir_flags(), Mode::empty()).unwrap();
        // A symlink is refused as ELOOP or ENOTDIR (openat2 may say either), never followed.
        let through_link = |e: Errno| matches!(e, Errno::LOOP | Errno::NOTDIR);
        both(|r| {
            assert!(open_beneath(&fd, b"a/b").is_ok(), "{r:?}");
            assert!(open_beneath(&fd, b"").is_ok(), "{r:?}");
            for rel in [&b"a/up"[..], b"a/rel", b"a/up/root", b"a/rel/x"] {
                let e = open_beneath(&fd, rel).unwrap_err();
                assert!(through_link(e), "{r:?} {}: {e}", rel.escape_ascii());
            }
            assert_eq!(open_beneath(&fd, b"a/f").unwrap_err(), Errno::NOTDIR);
            assert_eq!(open_beneath(&fd, b"a/../..").unwrap_err(), Errno::XDEV);
            assert_eq!(open_beneath(&fd, b"a//b").unwrap_err(), Errno::INVAL);
            assert_eq!(open_beneath(&fd, b"./a").unwrap_err(), Errno::INVAL);
            // An O_PATH handle on a link is the link itself, never its target.
            let h = open_path_beneath(&fd, b"a/up").unwrap();
            let st = rustix::fs::fstat(&h).unwrap();
            assert_eq!(
                rustix::fs::FileType::from_raw_mode(st.st_mode),
                rustix::fs::FileType::Symlink
            );
            let e = open_path_beneath(&fd, b"a/up/x").unwrap_err();
            assert!(through_link(e), "{r:?}: {e}");
        });
    }
}
