//! Restoring a store archive (tar + zstd) into an allow-listed directory.
//!
//! Invariants:
//! - The header must announce every segment of the compressed archive (size and a 32-byte
//!   sha256); none at all is refused before anything is created.
//! - The archive is extracted into a fresh staging directory inside the target
//!   (`.deis-backup-restore-<pid>-<nanos>/tree`), then checked as a whole (every path safe, zstd
//!   frames and tar stream complete, every segment's size and sha256 as announced: module
//!   `segments`) before anything outside it is touched. A refused archive leaves the target as it
//!   was, and the staging directory is removed.
//! - Everything inside staging is done relative to directory handles resolved beneath the
//!   staging root without following any symlink (module `staging`, resolution in module `resolve`:
//!   `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or where the kernel or a seccomp profile
//!   refuses it, `openat(O_NOFOLLOW | O_DIRECTORY)` component by component, equally safe since no
//!   symlink is ever followed): nothing an archive holds, nor anything put into the target
//!   meanwhile, leads a create, write, link, chown, chmod or utimes out of it. Refused: absolute
//!   paths, `..`, paths through a symlink or over `PATH_MAX`, hard links to anything but a
//!   regular file archived before, entry types a store cannot hold.
//! - Owners, setuid/setgid bits and device nodes follow the agent's own `RestorePolicy` (its
//!   config), never the caller. The archive root's entry is ignored: the store root keeps its own
//!   owner and mode.
//! - Resources are bounded before the `tar` crate sees the stream (module `tar_guard`): extension
//!   headers over 64 KiB and paths over 4096 bytes are refused from their headers, the tar bytes
//!   of one restore are capped by `max-restore-bytes` and the zstd window by
//!   `max-zstd-window-log`; a GNU sparse entry's map is checked there too (at most a million
//!   regions, sorted, not overlapping, within its size), and a pax record holding a newline
//!   (which `tar` would split) is refused.
//! - Sparse files come back sparse (holes where whole aligned blocks are zeros), and extended
//!   attributes and ACLs (`SCHILY.xattr.*`) are set where the filesystem keeps them; where it
//!   refuses one, a warning in the reply, not a failure (module `staging`).
//! - Only then are the staged entries renamed into the target (module `commit`; same filesystem,
//!   so each move is atomic); with `overwrite`, the target's previous entries are moved aside
//!   first (into the staging directory's `previous/`), and removed with the staging directory only
//!   once every move succeeded. A failing move is undone, every move before it too, back to the
//!   target as it was (`RestoreUndone`); if undoing fails, the error says what is where and the
//!   staging directory is kept (`RestoreIncomplete`).
//! - Staging directories (named `STAGING_PREFIX`...) are not the store's content: the not-empty
//!   check and overwrite leave them out, as Describe does. Stale ones (restores that did not
//!   finish) are removed at agent start and before each restore into a target, never one running
//!   in this process, nor one holding a target's previous entries (module `debris`).
//! - A full disk is an I/O error naming the path (`NoSpace`), never a damaged archive.

mod commit;
mod debris;
mod resolve;
mod segments;
mod staging;
mod tar_guard;

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use deis_backup_proto::v1::RestoreStoreReply;
use rustix::fs::{Mode, OFlags};

use crate::config::RestorePolicy;
use crate::error::{Error, Result};
use commit::commit;
use resolve::open_beneath;
use segments::SegmentCheck;
use staging::{Staging, fs_error};
use tar_guard::TarGuard;

/// Prefix of staging directories inside a restore target.
pub const STAGING_PREFIX: &str = ".deis-backup-restore-";

pub use debris::{STALE_AFTER, is_staging_name};

/// Removes the stale staging directories of restores that did not finish from each of `paths`
/// (the allow-list, at agent start; see module `debris`). Never fails: it logs.
pub fn clean_stale_staging(paths: &[PathBuf]) {
    for p in paths {
        if p.is_dir() {
            debris::clean(p, STALE_AFTER);
        }
    }
}

/// Options of one restore: the caller's wishes, and the agent's policy that bounds them.
#[derive(Debug, Clone)]
pub struct Options {
    pub overwrite: bool,
    /// From the agent's config (`Config::restore_policy`), never from the request.
    pub policy: RestorePolicy,
    /// Size and sha256 of each segment of the compressed archive, in order; at least one.
    pub segments: Vec<(u64, Vec<u8>)>,
}

/// The error for a failure to read the archive: the guard's refusals keep their own words.
#[allow(clippy::needless_pass_by_value)] // used as `map_err(read_error)`
fn read_error(e: io::Error) -> Error {
    if let Some(r) = tar_guard::refusal(&e) {
        let reason = r.reason.clone();
        return if r.limit {
            Error::Limit { what: reason }
        } else {
            Error::BadArchive { reason }
        };
    }
    if e.to_string().contains("requires too much memory") {
        return Error::Limit {
            what: format!(
                "the archive needs a larger zstd window than this agent accepts (max-zstd-window-log in its config): {e}"
            ),
        };
    }
    Error::BadArchive {
        reason: format!("cannot read the archive: {e}"),
    }
}

/// Refuses a header that does not announce every segment with a sha256.
fn check_segments(segments: &[(u64, Vec<u8>)]) -> Result<()> {
    if segments.is_empty() {
        return Err(Error::BadRequest {
            what: "a RestoreStore header must announce the size and sha256 of every segment; it announced none".into(),
        });
    }
    for (i, (_, sha)) in segments.iter().enumerate() {
        if sha.len() != 32 {
            return Err(Error::BadRequest {
                what: format!(
                    "segment {} of {} announces a sha256 of {} bytes, not 32",
                    i + 1,
                    segments.len(),
                    sha.len()
                ),
            });
        }
    }
    Ok(())
}

/// The entries of the directory `dir` (at `path`); staging directories left out when `skip_staging`
/// (in a target; a staged tree is listed whole).
fn existing(dir: &OwnedFd, path: &Path, skip_staging: bool) -> Result<Vec<OsString>> {
    let err = |e: rustix::io::Errno| fs_error("listing", path.into())(e.into());
    let mut out = Vec::new();
    for e in rustix::fs::Dir::read_from(dir).map_err(err)? {
        let e = e.map_err(err)?;
        let name = OsStr::from_bytes(e.file_name().to_bytes());
        if name != "." && name != ".." && !(skip_staging && is_staging_name(name)) {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

/// Restores the tar + zstd `archive` into `target` (blocking; see the module invariants).
pub fn restore(target: &Path, archive: impl Read, opts: &Options) -> Result<RestoreStoreReply> {
    check_segments(&opts.segments)?;
    if !target.is_dir() {
        fs::create_dir(target).map_err(fs_error("creating the restore target", target.into()))?;
    }
    // Debris of restores that did not finish goes first (never one running in this process).
    debris::clean(target, STALE_AFTER);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let name = format!("{STAGING_PREFIX}{}-{nanos}", std::process::id());
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let target_fd = rustix::fs::open(target, flags, Mode::empty())
        .map_err(|e| fs_error("opening", target.into())(e.into()))?;
    if !opts.overwrite && !existing(&target_fd, target, true)?.is_empty() {
        return Err(Error::NotEmpty {
            path: target.to_path_buf(),
        });
    }
    let staging_path = target.join(&name);
    let mut live = debris::Live::register(&name);
    rustix::fs::mkdirat(&target_fd, name.as_str(), Mode::from_raw_mode(0o700))
        .map_err(|e| fs_error("creating the staging directory", staging_path.clone())(e.into()))?;
    let result = Dirs::open(&target_fd, &name, target).and_then(|dirs| {
        match dirs.staging.try_clone() {
            Ok(fd) => live.keep_alive(fd, &staging_path),
            Err(e) => tracing::warn!(path = %staging_path.display(), error = %e, "cannot keep the staging directory fresh"),
        }
        let reply = stage(&dirs, archive, opts)?;
        commit(&dirs, reply, opts.overwrite)
    });
    drop(live);
    if let Err(e @ Error::RestoreIncomplete { .. }) = &result {
        // Entries are out of place, some maybe only in there: kept for the operator.
        tracing::error!(path = %staging_path.display(), error = %e, "restore commit not undone; staging directory kept");
    } else if let Err(e) = fs::remove_dir_all(&staging_path) {
        tracing::warn!(path = %staging_path.display(), error = %e, "cannot remove the staging directory");
    }
    result
}

/// The handles of one restore: the target, the staging directory, and inside it the tree being
/// written, the place entries replaced within the tree go, and the place the target's previous
/// entries go under overwrite (`previous/`, which the stale clean-up never removes).
struct Dirs<'a> {
    target: &'a OwnedFd,
    target_path: &'a Path,
    staging_name: &'a str,
    staging: OwnedFd,
    tree: OwnedFd,
    replaced: OwnedFd,
    previous: OwnedFd,
}

impl<'a> Dirs<'a> {
    fn staging_path(&self) -> PathBuf {
        self.target_path.join(self.staging_name)
    }

    fn tree_path(&self) -> PathBuf {
        self.staging_path().join("tree")
    }

    fn previous_path(&self) -> PathBuf {
        self.staging_path().join(debris::PREVIOUS)
    }

    fn open(target: &'a OwnedFd, staging_name: &'a str, target_path: &'a Path) -> Result<Self> {
        let path = target_path.join(staging_name);
        let staging = open_beneath(target, staging_name.as_bytes())
            .map_err(|e| fs_error("opening", path.clone())(e.into()))?;
        let sub = |name: &str| {
            rustix::fs::mkdirat(&staging, name, Mode::from_raw_mode(0o700))
                .and_then(|()| open_beneath(&staging, name.as_bytes()))
                .map_err(|e| fs_error("creating", path.join(name))(e.into()))
        };
        let (tree, replaced, previous) = (sub("tree")?, sub("replaced")?, sub(debris::PREVIOUS)?);
        Ok(Self {
            target,
            target_path,
            staging_name,
            staging,
            tree,
            replaced,
            previous,
        })
    }
}

fn stage(dirs: &Dirs<'_>, archive: impl Read, opts: &Options) -> Result<RestoreStoreReply> {
    let tree_path = dirs.tree_path();
    let tree = dirs
        .tree
        .try_clone()
        .map_err(fs_error("opening", tree_path.clone()))?;
    let replaced = dirs
        .replaced
        .try_clone()
        .map_err(fs_error("opening", tree_path.clone()))?;
    let mut staging = Staging::new(tree, tree_path, replaced, opts.policy);
    let mut checked = SegmentCheck::new(archive, opts.segments.clone());
    {
        // The segments are zstd frames one after another: the decoder reads through all of them.
        let mut dec = zstd::Decoder::new(&mut checked).map_err(read_error)?;
        dec.window_log_max(opts.policy.max_window_log)
            .map_err(read_error)?;
        let mut tar = tar::Archive::new(TarGuard::new(dec, opts.policy.max_bytes));
        for entry in tar.entries().map_err(read_error)? {
            staging.entry(entry.map_err(read_error)?)?;
        }
        // The tar ended; read the zstd stream to its end so its checksum is verified.
        let mut rest = tar.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(read_error)?;
    }
    checked.finish().map_err(read_error)?;
    staging.finish_dirs()?;
    Ok(staging.reply)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::PathBuf;

    use sha2::{Digest, Sha256};
    use tar::{EntryType, Header};

    use super::*;
    use resolve::Resolver;

    fn policy() -> RestorePolicy {
        RestorePolicy {
            owners: true,
            setid: true,
            devices: false,
            max_bytes: 1 << 30,
            max_window_log: 27,
        }
    }

    fn options(z: &[u8], policy: RestorePolicy) -> Options {
        Options {
            overwrite: false,
            policy,
            segments: vec![(z.len() as u64, Sha256::digest(z).to_vec())],
        }
    }

    fn run_with(target: &Path, tar: &[u8], policy: RestorePolicy) -> Result<RestoreStoreReply> {
        let z = zstd::encode_all(tar, 3).unwrap();
        restore(target, &z[..], &options(&z, policy))
    }

    fn run(target: &Path, tar: &[u8]) -> Result<RestoreStoreReply> {
        run_with(target, tar, policy())
    }

    /// A tar archive built entry by entry, headers as given (no checks of our own).
    struct Ar(tar::Builder<Vec<u8>>);

    fn header(kind: EntryType, mode: u32, uid: u64, gid: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(1_500_000_000);
        h.set_size(0);
        h
    }

    impl Ar {
        fn new() -> Self {
            Self(tar::Builder::new(Vec::new()))
        }
        fn add(mut self, mut h: Header, path: &str, data: &[u8]) -> Self {
            h.set_size(data.len() as u64);
            self.0.append_data(&mut h, path, data).unwrap();
            self
        }
        fn root(mut self, mode: u32, uid: u64) -> Self {
            let mut h = header(EntryType::Directory, mode, uid, uid);
            h.as_old_mut().name[..2].copy_from_slice(b"./");
            h.set_cksum();
            self.0.append(&h, io::empty()).unwrap();
            self
        }
        fn dir(self, path: &str, mode: u32, uid: u64) -> Self {
            self.add(header(EntryType::Directory, mode, uid, uid), path, b"")
        }
        fn file(self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> Self {
            self.add(header(EntryType::Regular, mode, uid, gid), path, data)
        }
        fn link(mut self, kind: EntryType, path: &str, to: &str) -> Self {
            let mut h = header(kind, 0o777, 4242, 4242);
            self.0.append_link(&mut h, path, to).unwrap();
            self
        }
        fn symlink(self, path: &str, to: &str) -> Self {
            self.link(EntryType::Symlink, path, to)
        }
        fn hard_link(self, path: &str, to: &str) -> Self {
            self.link(EntryType::Link, path, to)
        }
        fn node(self, kind: EntryType, path: &str, mode: u32, dev: (u32, u32)) -> Self {
            let mut h = header(kind, mode, 4242, 4242);
            h.set_device_major(dev.0).unwrap();
            h.set_device_minor(dev.1).unwrap();
            self.add(h, path, b"")
        }
        fn finish(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    /// What must not change about a file outside the store.
    fn snapshot(p: &Path) -> (u32, u32, u32, u64, Vec<u8>) {
        let md = fs::symlink_metadata(p).unwrap();
        let content = if md.is_file() {
            fs::read(p).unwrap()
        } else {
            Vec::new()
        };
        (md.mode(), md.uid(), md.gid(), md.nlink(), content)
    }

    /// A root-owned 0600 file outside the store, in a directory of its own.
    fn outside(tmp: &Path) -> (PathBuf, PathBuf) {
        let dir = tmp.join("outside");
        fs::create_dir(&dir).unwrap();
        let file = dir.join("victim");
        fs::write(&file, b"secret").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        (dir, file)
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn refused(r: Result<RestoreStoreReply>) -> String {
        match r {
            Err(Error::BadArchive { reason }) => reason,
            other => panic!("expected a refused archive, got {other:?}"),
        }
    }

    /// Runs `test` with resolver `r` forced on this thread, and checks that `r` did the work.
    fn under(r: Resolver, test: fn()) {
        if r == Resolver::Openat2 && resolve::detect() != Resolver::Openat2 {
            eprintln!("skipped: openat2 is unavailable here");
            return;
        }
        let ((), (openat2, per_component)) = resolve::with_resolver(r, test);
        match r {
            Resolver::Openat2 => assert!(openat2 > 0 && per_component == 0),
            Resolver::PerComponent => assert!(per_component > 0 && openat2 == 0),
        }
    }

    /// The tests named, once under each resolver (`openat2::<name>`, `per_component::<name>`).
    macro_rules! both_resolvers {
        ($($name:ident),* $(,)?) => {
            mod openat2 {
                $(#[test]
                fn $name() {
                    super::under(super::Resolver::Openat2, super::$name);
                })*
            }
            mod per_component {
                $(#[test]
                fn $name() {
                    super::under(super::Resolver::PerComponent, super::$name);
                })*
            }
        };
    }

    both_resolvers!(
        an_ordinary_archive_is_restored,
        finding1_dir_then_symlink_does_not_chmod_outside,
        finding1_parent_replaced_by_symlink_does_not_chown_outside,
        finding1_hard_link_to_an_outside_file_is_impossible,
        finding2_archive_root_metadata_leaves_the_store_root_alone,
        finding3_device_nodes_follow_allow_devices,
        overwrite_moves_old_entries_aside_and_reports_them,
    );

    /// A staging directory `name` in `target`, holding a file, with its mtime `age` ago.
    fn debris(target: &Path, name: &str, age: std::time::Duration) -> PathBuf {
        let p = target.join(name);
        fs::create_dir_all(p.join("tree")).unwrap();
        fs::write(p.join("tree/half-written"), b"x").unwrap();
        let f = fs::File::open(&p).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
        p
    }

    #[test]
    fn a_target_holding_only_staging_directories_counts_as_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("store");
        let hours = std::time::Duration::from_secs(2 * 3600);
        let stale = debris(&t, ".deis-backup-restore-1-1", hours);
        let fresh = debris(&t, ".deis-backup-restore-1-2", std::time::Duration::ZERO);
        let tar = Ar::new().file("a", 0o644, 0, 0, b"new").finish();
        run(&t, &tar).unwrap();
        // The stale one was cleaned up by the restore; the fresh one (maybe another agent's
        // restore in progress, on a shared filesystem) is left alone, and was not in the way.
        assert!(!stale.exists());
        assert!(fresh.join("tree/half-written").exists());
        assert_eq!(entries(&t), [".deis-backup-restore-1-2", "a"]);
        // Overwrite does not move it aside either.
        let z = zstd::encode_all(&Ar::new().file("b", 0o644, 0, 0, b"b").finish()[..], 3).unwrap();
        let o = Options {
            overwrite: true,
            ..options(&z, policy())
        };
        let reply = restore(&t, &z[..], &o).unwrap();
        assert_eq!(entries(&t), [".deis-backup-restore-1-2", "b"]);
        let replaced: Vec<_> = reply.warnings.iter().map(|w| w.path.as_str()).collect();
        assert_eq!(replaced, ["a"]);
    }

    #[test]
    fn start_up_clean_up_removes_stale_staging_in_every_store_path() {
        let tmp = tempfile::tempdir().unwrap();
        let hours = std::time::Duration::from_secs(2 * 3600);
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let stale_a = debris(&a, ".deis-backup-restore-7-1", hours);
        let stale_b = debris(&b, ".deis-backup-restore-7-2", hours);
        let fresh = debris(&b, ".deis-backup-restore-7-3", std::time::Duration::ZERO);
        clean_stale_staging(&[a.clone(), b.clone(), tmp.path().join("missing")]);
        assert!(!stale_a.exists() && !stale_b.exists());
        assert!(fresh.exists());
    }

    #[test]
    fn unsafe_paths_are_refused() {
        use staging::safe_relative;
        assert!(safe_relative(b"/etc/x").is_err());
        assert!(safe_relative(b"a/../../x").is_err());
        assert!(safe_relative(b"..").is_err());
        assert_eq!(safe_relative(b"./a//b/").unwrap(), [b"a".as_slice(), b"b"]);
        assert!(safe_relative(b"./").unwrap().is_empty());
    }

    fn an_ordinary_archive_is_restored() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("store");
        let tar = Ar::new()
            .dir("d", 0o750, 0)
            .file("d/a", 0o640, 0, 0, b"hello")
            .hard_link("d/b", "d/a")
            .symlink("l", "d/a")
            .node(EntryType::Fifo, "f", 0o640, (0, 0))
            .finish();
        let reply = run(&target, &tar).unwrap();
        assert_eq!(
            (reply.files, reply.dirs, reply.links, reply.bytes),
            (2, 1, 2, 5)
        );
        assert_eq!(entries(&target), ["d", "f", "l"]);
        assert_eq!(fs::read(target.join("l")).unwrap(), b"hello");
        let a = fs::metadata(target.join("d/a")).unwrap();
        assert_eq!(
            (a.mode() & 0o7777, a.nlink(), a.mtime()),
            (0o640, 2, 1_500_000_000)
        );
        let d = fs::metadata(target.join("d")).unwrap();
        assert_eq!((d.mode() & 0o7777, d.mtime()), (0o750, 1_500_000_000));
        let f = fs::symlink_metadata(target.join("f")).unwrap();
        assert!(f.file_type().is_fifo());
        assert_eq!((f.mode() & 0o7777, f.uid()), (0o640, 4242));
    }

    fn finding1_dir_then_symlink_does_not_chmod_outside() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, victim) = outside(tmp.path());
        let before = snapshot(&victim);
        let target = tmp.path().join("store");
        let tar = Ar::new()
            .dir("x", 0o7777, 4242)
            .symlink("x", victim.to_str().unwrap())
            .finish();
        run(&target, &tar).unwrap();
        assert!(fs::symlink_metadata(target.join("x")).unwrap().is_symlink());
        assert_eq!(snapshot(&victim), before);
    }

    fn finding1_parent_replaced_by_symlink_does_not_chown_outside() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, victim) = outside(tmp.path());
        let (before, dir_before) = (snapshot(&victim), snapshot(&dir));
        let target = tmp.path().join("store");
        let tar = Ar::new()
            .dir("p", 0o7777, 4242)
            .dir("p/victim", 0o7777, 4242)
            .symlink("p", dir.to_str().unwrap())
            .finish();
        run(&target, &tar).unwrap();
        assert_eq!(snapshot(&victim), before);
        assert_eq!(snapshot(&dir), dir_before);
        // Writing through a symlink the archive made is refused outright.
        let target = tmp.path().join("store2");
        let tar = Ar::new()
            .symlink("s", dir.to_str().unwrap())
            .file("s/victim", 0o6777, 4242, 4242, b"owned")
            .finish();
        let reason = refused(run(&target, &tar));
        assert!(reason.contains("through a symlink"), "{reason}");
        assert_eq!(snapshot(&victim), before);
        assert!(entries(&target).is_empty());
    }

    fn finding1_hard_link_to_an_outside_file_is_impossible() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, victim) = outside(tmp.path());
        let before = snapshot(&victim);
        let abs = victim.to_str().unwrap();
        let archives = [
            Ar::new().hard_link("h", abs),
            Ar::new().hard_link("h", "../outside/victim"),
            Ar::new()
                .symlink("s", dir.to_str().unwrap())
                .hard_link("h", "s/victim"),
            Ar::new().symlink("s", abs).hard_link("h", "s"),
        ];
        let target = tmp.path().join("store");
        for (i, ar) in archives.into_iter().enumerate() {
            let reason = refused(run(&target, &ar.finish()));
            assert!(entries(&target).is_empty(), "archive {i}: {reason}");
            assert_eq!(snapshot(&victim), before, "archive {i}: {reason}");
            assert_eq!(before.3, 1);
        }
    }

    fn finding2_archive_root_metadata_leaves_the_store_root_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("store");
        fs::create_dir(&target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::chown(&target, Some(1234), Some(1234)).unwrap();
        let tar = Ar::new()
            .root(0o777, 65534)
            .file("a", 0o644, 0, 0, b"x")
            .finish();
        run(&target, &tar).unwrap();
        let md = fs::metadata(&target).unwrap();
        assert_eq!(
            (md.mode() & 0o7777, md.uid(), md.gid()),
            (0o750, 1234, 1234)
        );
        assert_eq!(entries(&target), ["a"]);
    }

    fn setid_archive() -> Vec<u8> {
        Ar::new()
            .dir("d", 0o2770, 4242)
            .file("d/bin", 0o6755, 4242, 4343, b"#!")
            .symlink("l", "d/bin")
            .finish()
    }

    fn mode_owner(p: &Path) -> (u32, u32, u32) {
        let md = fs::symlink_metadata(p).unwrap();
        (md.mode() & 0o7777, md.uid(), md.gid())
    }

    #[test]
    fn finding3_default_policy_restores_owners_modes_and_setid() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("store");
        run(&t, &setid_archive()).unwrap();
        assert_eq!(mode_owner(&t.join("d")), (0o2770, 4242, 4242));
        assert_eq!(mode_owner(&t.join("d/bin")), (0o6755, 4242, 4343));
        assert_eq!(mode_owner(&t.join("l")).1, 4242);
    }

    #[test]
    fn finding3_without_owners_entries_belong_to_the_agent() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("store");
        let p = RestorePolicy {
            owners: false,
            ..policy()
        };
        run_with(&t, &setid_archive(), p).unwrap();
        let me = (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
        for name in ["d", "d/bin", "l"] {
            let (_, uid, gid) = mode_owner(&t.join(name));
            assert_eq!((uid, gid), me, "{name}");
        }
        // The setid bits would now make the agent's identity someone else's program: cleared.
        assert_eq!(mode_owner(&t.join("d/bin")).0, 0o755);
        assert_eq!(mode_owner(&t.join("d")).0, 0o770);
        // Recorded as the agent's own, they stay.
        let t = tmp.path().join("store2");
        let tar = Ar::new()
            .file("bin", 0o6755, me.0.into(), me.1.into(), b"#!")
            .finish();
        run_with(&t, &tar, p).unwrap();
        assert_eq!(mode_owner(&t.join("bin")).0, 0o6755);
    }

    #[test]
    fn finding3_without_setid_the_bits_are_cleared() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("store");
        let p = RestorePolicy {
            setid: false,
            ..policy()
        };
        run_with(&t, &setid_archive(), p).unwrap();
        assert_eq!(mode_owner(&t.join("d")), (0o770, 4242, 4242));
        assert_eq!(mode_owner(&t.join("d/bin")), (0o755, 4242, 4343));
    }

    #[test]
    fn finding3_device_nodes_are_refused_by_default() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("store");
        let tar = Ar::new()
            .node(EntryType::Char, "null", 0o666, (1, 3))
            .finish();
        assert!(refused(run(&t, &tar)).contains("allow-devices"));
        assert!(entries(&t).is_empty());
    }

    fn finding3_device_nodes_follow_allow_devices() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("store");
        let tar = Ar::new()
            .node(EntryType::Char, "null", 0o4666, (1, 3))
            .finish();
        let p = RestorePolicy {
            devices: true,
            setid: false,
            ..policy()
        };
        match run_with(&t, &tar, p) {
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc_eperm()) => {
                eprintln!("skipped: this container may not create device nodes ({source})");
            }
            r => {
                r.unwrap();
                let md = fs::symlink_metadata(t.join("null")).unwrap();
                assert!(md.file_type().is_char_device());
                assert_eq!(md.rdev(), rustix::fs::makedev(1, 3));
                assert_eq!((md.mode() & 0o7777, md.uid()), (0o666, 4242));
            }
        }
    }

    fn libc_eperm() -> i32 {
        rustix::io::Errno::PERM.raw_os_error()
    }

    #[test]
    fn finding4_no_segments_is_refused_before_anything_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("store");
        let z = zstd::encode_all(&Ar::new().file("a", 0o644, 0, 0, b"x").finish()[..], 3).unwrap();
        let o = Options {
            segments: Vec::new(),
            ..options(&z, policy())
        };
        let e = restore(&t, &z[..], &o).unwrap_err();
        assert!(matches!(e, Error::BadRequest { .. }), "{e}");
        assert_eq!(e.status().code(), tonic::Code::InvalidArgument);
        assert!(!t.exists());
    }

    #[test]
    fn finding4_every_digest_is_32_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("store");
        let z = zstd::encode_all(&Ar::new().file("a", 0o644, 0, 0, b"x").finish()[..], 3).unwrap();
        let mut o = options(&z, policy());
        o.segments[0].1.pop();
        let e = restore(&t, &z[..], &o).unwrap_err();
        assert!(e.to_string().contains("31 bytes, not 32"), "{e}");
        assert_eq!(e.status().code(), tonic::Code::InvalidArgument);
        assert!(!t.exists());
        // A digest of the right length but the wrong value is refused too, and nothing stays.
        o.segments[0].1 = vec![0; 32];
        let reason = refused(restore(&t, &z[..], &o));
        assert!(reason.contains("sha256"), "{reason}");
        assert!(entries(&t).is_empty());
    }

    /// A tar stream with one extension header of `kind` claiming `size` bytes, then 1 MiB of
    /// data (which compresses to almost nothing).
    fn bomb(kind: EntryType, size: u64) -> Vec<u8> {
        let mut h = Header::new_gnu();
        h.set_path("././@LongLink").unwrap();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_cksum();
        let mut raw = h.as_bytes().to_vec();
        raw.extend(std::iter::repeat_n(b'a', 1 << 20));
        raw
    }

    #[test]
    fn finding5_gnu_long_name_bomb_is_refused_by_the_guard() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("store");
        let reason = refused(run(&t, &bomb(EntryType::GNULongName, 6 << 30)));
        assert!(
            reason.contains("extension header (type 'L') claims"),
            "{reason}"
        );
        assert!(entries(&t).is_empty());
    }

    #[test]
    fn finding5_pax_bomb_is_refused_by_the_guard() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("store");
        let reason = refused(run(&t, &bomb(EntryType::XHeader, 6 << 30)));
        assert!(
            reason.contains("extension header (type 'x') claims"),
            "{reason}"
        );
        assert!(entries(&t).is_empty());
    }

    #[test]
    fn finding5_paths_over_path_max_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("store");
        let long = "a/".repeat(2100) + "f";
        let tar = Ar::new().file(&long, 0o644, 0, 0, b"x").finish();
        let reason = refused(run(&t, &tar));
        assert!(reason.contains("the longest accepted is 4096"), "{reason}");
        // The same through a pax `path` record.
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("path", long.as_bytes())])
            .unwrap();
        let mut h = header(EntryType::Regular, 0o644, 0, 0);
        b.append_data(&mut h, "short", io::empty()).unwrap();
        let reason = refused(run(&t, &b.into_inner().unwrap()));
        assert!(reason.contains("the longest accepted is 4096"), "{reason}");
        assert!(entries(&t).is_empty());
    }

    #[test]
    fn finding5_tar_bytes_are_capped_by_max_restore_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("store");
        let tar = Ar::new()
            .file("big", 0o644, 0, 0, &vec![0; 64 << 10])
            .finish();
        let p = RestorePolicy {
            max_bytes: 10_000,
            ..policy()
        };
        let e = run_with(&t, &tar, p).unwrap_err();
        assert!(matches!(e, Error::Limit { .. }), "{e}");
        assert!(
            e.to_string().contains("10000 bytes") && e.to_string().contains("max-restore-bytes")
        );
        assert!(entries(&t).is_empty());
    }

    #[test]
    fn finding5_zstd_window_is_capped_by_policy() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("store");
        let tar = Ar::new().file("a", 0o644, 0, 0, &[7; 4096]).finish();
        let mut enc = zstd::Encoder::new(Vec::new(), 19).unwrap();
        enc.window_log(20).unwrap();
        io::Write::write_all(&mut enc, &tar).unwrap();
        let z = enc.finish().unwrap();
        let o = options(
            &z,
            RestorePolicy {
                max_window_log: 10,
                ..policy()
            },
        );
        let e = restore(&t, &z[..], &o).unwrap_err();
        assert!(matches!(e, Error::Limit { .. }), "{e}");
        assert!(e.to_string().contains("max-zstd-window-log"), "{e}");
        assert!(entries(&t).is_empty());
    }

    /// A 1 MiB tmpfs, unmounted on drop.
    struct Tmpfs(PathBuf);

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    #[test]
    fn finding6_full_disk_is_an_io_error_naming_the_target() {
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("small");
        fs::create_dir(&mnt).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&mnt)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: mounting a tmpfs is not permitted here");
            return;
        }
        let _mount = Tmpfs(mnt.clone());
        let t = mnt.join("store");
        let tar = Ar::new()
            .file("big", 0o644, 0, 0, &vec![1; 2 << 20])
            .finish();
        let e = run(&t, &tar).unwrap_err();
        assert!(matches!(e, Error::NoSpace { .. }), "{e}");
        let text = e.status().message().to_owned();
        assert!(text.contains(t.to_str().unwrap()), "{text}");
        assert!(text.contains("free space"), "{text}");
        assert!(!text.contains("damaged"), "{text}");
        assert_eq!(e.status().code(), tonic::Code::ResourceExhausted);
        assert!(entries(&t).is_empty());
    }

    /// Everything about a tree that a commit could change: per entry (sorted), its path, inode,
    /// mode, owner, and content or link target.
    fn tree(root: &Path) -> Vec<(String, u64, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut todo = vec![PathBuf::new()];
        while let Some(rel) = todo.pop() {
            for e in fs::read_dir(root.join(&rel)).unwrap() {
                let rel = rel.join(e.unwrap().file_name());
                let p = root.join(&rel);
                let md = fs::symlink_metadata(&p).unwrap();
                let data = if md.is_symlink() {
                    fs::read_link(&p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes()
                } else if md.is_file() {
                    fs::read(&p).unwrap()
                } else {
                    todo.push(rel.clone());
                    Vec::new()
                };
                out.push((
                    rel.display().to_string(),
                    md.ino(),
                    md.mode(),
                    md.uid(),
                    data,
                ));
            }
        }
        out.sort();
        out
    }

    /// A target with four entries, and an archive of three (one of the same name) to restore
    /// over it: 4 moves aside and 3 into place.
    fn overwrite_case(tmp: &Path) -> (PathBuf, Vec<u8>) {
        let t = tmp.join("store");
        fs::create_dir_all(t.join("old/deep")).unwrap();
        fs::write(t.join("old/deep/f"), b"deep").unwrap();
        fs::write(t.join("a"), b"old a").unwrap();
        std::os::unix::fs::symlink("old/deep/f", t.join("l")).unwrap();
        fs::write(t.join("z"), b"old z").unwrap();
        let tar = Ar::new()
            .file("a", 0o644, 0, 0, b"new a")
            .file("b", 0o600, 0, 0, b"new b")
            .dir("d", 0o755, 0)
            .file("d/x", 0o644, 0, 0, b"x")
            .finish();
        (t, tar)
    }

    fn overwrite(t: &Path, tar: &[u8]) -> Result<RestoreStoreReply> {
        let z = zstd::encode_all(tar, 3).unwrap();
        let o = Options {
            overwrite: true,
            ..options(&z, policy())
        };
        restore(t, &z[..], &o)
    }

    #[test]
    fn finding7_a_commit_failing_at_any_move_is_undone_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let (t, tar) = overwrite_case(tmp.path());
        let before = tree(&t);
        for n in 1..=7 {
            commit::fail_moves(&[n]);
            let e = overwrite(&t, &tar).unwrap_err();
            assert_eq!(tree(&t), before, "failure at move {n}: {e}");
            let text = e.status().message().to_owned();
            assert!(text.contains("Input/output error"), "{text}");
            if n == 1 {
                // Nothing had moved: the plain error.
                assert!(matches!(e, Error::Io { .. }), "{e}");
            } else {
                assert!(matches!(e, Error::RestoreUndone { .. }), "move {n}: {e}");
                assert!(
                    text.contains("was undone (the target is as it was)"),
                    "{text}"
                );
                assert!(text.contains("nothing changed"), "{text}");
                assert_eq!(e.status().code(), tonic::Code::Aborted);
            }
        }
        // Without a failure, the same restore goes through.
        commit::fail_moves(&[]);
        overwrite(&t, &tar).unwrap();
        assert_eq!(entries(&t), ["a", "b", "d"]);
        assert_eq!(fs::read(t.join("a")).unwrap(), b"new a");
    }

    #[test]
    fn finding7_a_failed_undo_says_what_is_where_and_keeps_the_staging_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let (t, tar) = overwrite_case(tmp.path());
        // Moves 1-4 set the old entries aside, 5 places the new 'a', 6 (placing 'b') fails; the
        // undo's first move (7: the new 'a' back) fails, so the old 'a' cannot go back either.
        commit::fail_moves(&[6, 7]);
        let e = overwrite(&t, &tar).unwrap_err();
        commit::fail_moves(&[]);
        let Error::RestoreIncomplete { undo, state, .. } = &e else {
            panic!("expected RestoreIncomplete, got {e}");
        };
        let staging: Vec<_> = entries(&t)
            .into_iter()
            .filter(|n| n.starts_with(STAGING_PREFIX))
            .collect();
        assert_eq!(staging.len(), 1, "the staging directory is kept");
        let staging = t.join(&staging[0]);
        let old_a = staging.join("previous/old-0");
        assert!(
            undo.contains(&format!("{} back to", t.join("a").display())),
            "{undo}"
        );
        assert!(
            undo.contains(&format!("{} back to", old_a.display())),
            "{undo}"
        );
        assert!(undo.contains("File exists"), "{undo}");
        assert!(state.contains(&format!("not back in place: [a (as {})]", old_a.display())));
        assert!(
            state.contains("new entries left in the target: [a]"),
            "{state}"
        );
        assert!(state.contains("is kept"), "{state}");
        assert!(
            e.status()
                .message()
                .contains("move the entries named above back")
        );
        // And it is so: the new 'a' in the target, the old one where the message says, the rest
        // back in place, nothing lost.
        assert_eq!(fs::read(t.join("a")).unwrap(), b"new a");
        assert_eq!(fs::read(&old_a).unwrap(), b"old a");
        assert_eq!(fs::read(t.join("z")).unwrap(), b"old z");
        assert_eq!(fs::read(t.join("l")).unwrap(), b"deep");
        assert!(!t.join("b").exists());
        // The stale clean-up, however old, leaves a staging directory holding previous entries.
        assert!(debris::clean(&t, std::time::Duration::ZERO).is_empty());
        assert!(old_a.exists());
    }

    fn overwrite_moves_old_entries_aside_and_reports_them() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("store");
        fs::create_dir_all(t.join("old/deep")).unwrap();
        fs::write(t.join("a"), b"old").unwrap();
        let tar = Ar::new().file("a", 0o644, 0, 0, b"new").finish();
        assert!(matches!(run(&t, &tar), Err(Error::NotEmpty { .. })));
        let z = zstd::encode_all(&tar[..], 3).unwrap();
        let o = Options {
            overwrite: true,
            ..options(&z, policy())
        };
        let reply = restore(&t, &z[..], &o).unwrap();
        assert_eq!(entries(&t), ["a"]);
        assert_eq!(fs::read(t.join("a")).unwrap(), b"new");
        let mut replaced: Vec<_> = reply.warnings.iter().map(|w| w.path.as_str()).collect();
        replaced.sort_unstable();
        assert_eq!(replaced, ["a", "old"]);
    }

    /// Restores the archive `z` (segments `sums`) into `target` with the default policy, or `policy`.
    fn restore_archived(
        target: &Path,
        (z, sums): &(Vec<u8>, Vec<(u64, Vec<u8>)>),
        policy: RestorePolicy,
    ) -> Result<RestoreStoreReply> {
        let opts = Options {
            overwrite: false,
            policy,
            segments: sums.clone(),
        };
        restore(target, &z[..], &opts)
    }

    #[test]
    fn a_sparse_file_round_trips_with_its_holes() {
        use crate::store::archive::tests::{SPARSE_SIZE, same_content, sparse_file};
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        fs::create_dir(&store).unwrap();
        sparse_file(&store.join("s"));
        fs::write(store.join("plain"), vec![0u8; 64 << 10]).unwrap();
        let archived = crate::store::archive::tests::archived(&store);
        assert!(archived.0.len() < 64 << 10, "{} bytes", archived.0.len());
        let target = tmp.path().join("restored");
        let reply = restore_archived(&target, &archived, policy()).unwrap();
        assert_eq!(reply.warnings, []);
        assert_eq!(reply.bytes, SPARSE_SIZE + 4 + (64 << 10));
        let got = fs::metadata(target.join("s")).unwrap();
        assert_eq!(got.len(), SPARSE_SIZE + 4);
        assert!(got.blocks() < 1024, "{} blocks allocated", got.blocks());
        assert!(same_content(
            &mut fs::File::open(target.join("s")).unwrap(),
            &mut fs::File::open(store.join("s")).unwrap()
        ));
        // An ordinary file full of zeros is written as it was, allocated.
        let plain = fs::metadata(target.join("plain")).unwrap();
        assert_eq!(plain.blocks(), 128);
    }

    #[test]
    fn a_sparse_archive_from_gnu_tar_is_restored_sparse() {
        use crate::store::archive::tests::{SPARSE_SIZE, same_content, sparse_file};
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        fs::create_dir(&store).unwrap();
        sparse_file(&store.join("s"));
        let out = std::process::Command::new("tar")
            .args(["--format=gnu", "-cSf", "-", "-C"])
            .arg(&store)
            .arg(".")
            .output()
            .unwrap();
        assert!(out.status.success());
        let target = tmp.path().join("restored");
        let reply = run(&target, &out.stdout).unwrap();
        assert_eq!(reply.bytes, SPARSE_SIZE + 4);
        let got = fs::metadata(target.join("s")).unwrap();
        assert!(got.blocks() < 1024, "{} blocks allocated", got.blocks());
        assert!(same_content(
            &mut fs::File::open(target.join("s")).unwrap(),
            &mut fs::File::open(store.join("s")).unwrap()
        ));
    }

    fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
        let mut buf = [0u8; 256];
        rustix::fs::getxattr(p, name, &mut buf[..])
            .ok()
            .map(|n| buf[..n].to_vec())
    }

    /// A store with `f` (`user.color=blue`, an ACL for uid 1234 when `setfacl` is there) and `d`
    /// (`user.color=green`, a default ACL, a `trusted.*` attribute); None without user xattrs.
    fn store_with_xattrs(tmp: &Path) -> Option<(PathBuf, bool)> {
        use crate::store::archive::tests::{set_user_xattr, setfacl};
        let store = tmp.join("store");
        fs::create_dir_all(store.join("d")).unwrap();
        fs::write(store.join("f"), b"data").unwrap();
        fs::write(store.join("plain"), b"none").unwrap();
        if !set_user_xattr(&store.join("f"), b"blue") {
            return None;
        }
        set_user_xattr(&store.join("d"), b"green");
        rustix::fs::setxattr(
            store.join("d"),
            "trusted.not-kept",
            b"x",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        let acls = setfacl(&["-m", "u:1234:r"], &store.join("f"))
            && setfacl(&["-d", "-m", "u:1234:rx"], &store.join("d"));
        Some((store, acls))
    }

    #[test]
    fn extended_attributes_and_acls_round_trip() {
        use crate::store::archive::tests::getfacl;
        let tmp = tempfile::tempdir().unwrap();
        let Some((store, acls)) = store_with_xattrs(tmp.path()) else {
            return;
        };
        let archived = crate::store::archive::tests::archived(&store);
        let target = tmp.path().join("restored");
        let reply = restore_archived(&target, &archived, policy()).unwrap();
        assert_eq!(reply.warnings, []);
        assert_eq!(fs::read(target.join("f")).unwrap(), b"data");
        assert_eq!(xattr(&target.join("f"), "user.color").unwrap(), b"blue");
        assert_eq!(xattr(&target.join("d"), "user.color").unwrap(), b"green");
        assert_eq!(xattr(&target.join("d"), "trusted.not-kept"), None);
        assert_eq!(xattr(&target.join("plain"), "user.color"), None);
        if acls {
            assert_eq!(getfacl(&target.join("f")), getfacl(&store.join("f")));
            assert_eq!(getfacl(&target.join("d")), getfacl(&store.join("d")));
            assert!(getfacl(&target.join("d")).contains("default:user:1234:r-x"));
        }
    }

    /// Unmounts a test mount when dropped.
    struct Mounted(PathBuf);

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }

    #[test]
    fn attributes_a_filesystem_refuses_are_warnings() {
        let tmp = tempfile::tempdir().unwrap();
        let Some((store, _)) = store_with_xattrs(tmp.path()) else {
            return;
        };
        let archived = crate::store::archive::tests::archived(&store);
        // ramfs keeps no extended attributes (EOPNOTSUPP); mounting it needs root.
        let target = tmp.path().join("ramfs");
        fs::create_dir(&target).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "ramfs", "none"])
            .arg(&target)
            .output()
            .unwrap();
        if !mounted.status.success() {
            eprintln!(
                "cannot mount ramfs ({}); skipped",
                String::from_utf8_lossy(&mounted.stderr)
            );
            return;
        }
        let _mounted = Mounted(target.clone());
        let reply = restore_archived(&target, &archived, policy()).unwrap();
        assert_eq!(fs::read(target.join("f")).unwrap(), b"data");
        let shown: Vec<(String, String)> = reply
            .warnings
            .iter()
            .map(|w| (w.path.clone(), w.message.clone()))
            .collect();
        assert!(
            shown.contains(&(
                "f".into(),
                "extended attribute user.color not restored: Operation not supported (os error 95)"
                    .into()
            )),
            "{shown:?}"
        );
        assert!(shown.iter().any(|(p, _)| p == "d"), "{shown:?}");
    }

    #[test]
    fn file_capabilities_are_restored_only_where_setid_bits_would_be() {
        let tmp = tempfile::tempdir().unwrap();
        let mut h = header(EntryType::Regular, 0o755, 0, 0);
        h.set_size(2);
        // The value `setcap cap_net_raw+ep` writes.
        let cap =
            b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
        let mut pax = Vec::new();
        let rec = [&b" SCHILY.xattr.security.capability="[..], cap, b"\n"].concat();
        let len = rec.len() + 2;
        pax.extend_from_slice(format!("{len}").as_bytes());
        pax.extend_from_slice(&rec);
        assert_eq!(pax.len(), len);
        let mut ph = header(EntryType::XHeader, 0o644, 0, 0);
        ph.set_size(pax.len() as u64);
        let tar = Ar::new()
            .add(ph, "pax", &pax)
            .add(h, "ping", b"#!")
            .finish();
        let reply = run(&tmp.path().join("with"), &tar).unwrap();
        assert_eq!(reply.warnings, []);
        assert_eq!(
            xattr(&tmp.path().join("with/ping"), "security.capability").unwrap(),
            cap
        );
        let strict = RestorePolicy {
            setid: false,
            ..policy()
        };
        let reply = run_with(&tmp.path().join("without"), &tar, strict).unwrap();
        assert_eq!(
            xattr(&tmp.path().join("without/ping"), "security.capability"),
            None
        );
        assert_eq!(reply.warnings.len(), 1);
        assert!(
            reply.warnings[0].message.contains("restore-setid"),
            "{:?}",
            reply.warnings
        );
    }

    #[test]
    fn a_sparse_file_with_many_regions_round_trips() {
        use crate::store::archive::tests::same_content;
        use std::os::unix::fs::FileExt;
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        fs::create_dir(&store).unwrap();
        // 40 islands of data 2 MiB apart: 4 regions in the header, 36 in two extension blocks.
        let f = fs::File::create(store.join("s")).unwrap();
        for i in 0..40u64 {
            f.write_all_at(format!("island {i}").as_bytes(), i * (2 << 20) + 1000)
                .unwrap();
        }
        f.set_len(90 << 20).unwrap();
        f.sync_all().unwrap();
        let archived = crate::store::archive::tests::archived(&store);
        let target = tmp.path().join("restored");
        restore_archived(&target, &archived, policy()).unwrap();
        let got = fs::metadata(target.join("s")).unwrap();
        assert_eq!(got.len(), 90 << 20);
        assert!(
            got.blocks() < 40 * 8 * 4,
            "{} blocks allocated",
            got.blocks()
        );
        assert!(same_content(
            &mut fs::File::open(target.join("s")).unwrap(),
            &mut fs::File::open(store.join("s")).unwrap()
        ));
    }

    /// The GNU sparse header of `stored` bytes for a file of `real` bytes with `regions`
    /// (offset, length) in its header (4 at most), `extended` when blocks follow.
    fn sparse_header(real: u64, stored: u64, regions: &[(u64, u64)], extended: bool) -> Header {
        let mut h = header(EntryType::GNUSparse, 0o644, 0, 0);
        h.set_path("s").unwrap();
        h.set_size(stored);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.set_real_size(real);
        for (slot, (off, len)) in gnu.sparse.iter_mut().zip(regions) {
            slot.set_offset(*off);
            slot.set_length(*len);
        }
        gnu.set_is_extended(extended);
        h.set_cksum();
        h
    }

    #[test]
    fn sparse_maps_out_of_order_past_the_size_or_too_long_are_refused_by_the_guard() {
        let tmp = tempfile::tempdir().unwrap();
        for (real, stored, regions, why) in [
            (
                1 << 20,
                1024,
                &[(4096, 512), (0, 512)][..],
                "out of order or overlapping",
            ),
            (
                1 << 20,
                1024,
                &[(0, 1024), (512, 0)],
                "out of order or overlapping",
            ),
            (4096, 1024, &[(0, 512), (4000, 512)], "past its size"),
            (
                1 << 20,
                1024,
                &[(0, 512)],
                "holds 512 bytes but the entry stores 1024",
            ),
        ] {
            let mut raw = sparse_header(real, stored, regions, false)
                .as_bytes()
                .to_vec();
            raw.extend(vec![b'x'; usize::try_from(stored).unwrap()]);
            raw.extend([0u8; 1024]);
            let e = refused(run(&tmp.path().join("t"), &raw));
            assert!(e.contains(why), "{e}");
        }
        // More regions than the cap: extension blocks of 21 empty regions each, one after another.
        let mut raw = sparse_header(1 << 40, 0, &[(0, 0); 4], true)
            .as_bytes()
            .to_vec();
        let mut ext = tar::GnuExtSparseHeader::new();
        for slot in &mut ext.sparse {
            slot.set_offset(0);
            slot.set_length(0);
        }
        ext.set_is_extended(true);
        for _ in 0..=crate::store::archive::sparse::MAX_REGIONS / 21 {
            raw.extend_from_slice(ext.as_bytes());
        }
        let e = refused(run(&tmp.path().join("t"), &raw));
        assert!(e.contains("more than 1000000 regions"), "{e}");
    }

    #[test]
    fn a_pax_record_holding_a_newline_is_refused_by_the_guard() {
        let tmp = tempfile::tempdir().unwrap();
        // `tar` would read a `path` record out of the attribute's value.
        let rec = b" SCHILY.xattr.user.x=a\n12 path=zz\n";
        let pax = [format!("{}", rec.len() + 2).as_bytes(), rec].concat();
        let tar = Ar::new()
            .add(header(EntryType::XHeader, 0o644, 0, 0), "pax", &pax)
            .file("f", 0o644, 0, 0, b"data")
            .finish();
        let e = refused(run(&tmp.path().join("t"), &tar));
        assert!(e.contains("holds a newline"), "{e}");
    }

    #[test]
    fn an_acl_whose_value_holds_a_newline_byte_round_trips_by_its_text() {
        use crate::store::archive::tests::{getfacl, setfacl};
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        fs::create_dir(&store).unwrap();
        fs::write(store.join("f"), b"data").unwrap();
        // uid 10 is byte 0x0a in the ACL's value.
        if !setfacl(&["-m", "u:10:rw"], &store.join("f")) {
            return;
        }
        let (_, tar, trailer) = crate::store::archive::tests::archive_all(&store);
        assert_eq!(trailer.warnings, []);
        assert!(!tar.windows(24).any(|w| w == b"xattr.system.posix_acl_a"));
        let archived = crate::store::archive::tests::archived(&store);
        let target = tmp.path().join("restored");
        let reply = restore_archived(&target, &archived, policy()).unwrap();
        assert_eq!(reply.warnings, []);
        assert!(getfacl(&target.join("f")).contains("user:10:rw-"));
        assert_eq!(getfacl(&target.join("f")), getfacl(&store.join("f")));
    }

    #[test]
    fn an_attribute_holding_a_newline_is_left_out_with_a_warning() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        fs::create_dir(&store).unwrap();
        fs::write(store.join("f"), b"data").unwrap();
        if !crate::store::archive::tests::set_user_xattr(&store.join("f"), b"two\nlines") {
            return;
        }
        let (_, tar, trailer) = crate::store::archive::tests::archive_all(&store);
        assert!(!tar.windows(9).any(|w| w == b"two\nlines"));
        let w: Vec<_> = trailer
            .warnings
            .iter()
            .map(|w| (&w.path[..], &w.message[..]))
            .collect();
        assert_eq!(
            w,
            [(
                "f",
                "extended attribute user.color holds a newline, which the restore cannot read; \
                 not archived"
            )]
        );
        let archived = crate::store::archive::tests::archived(&store);
        restore_archived(&tmp.path().join("restored"), &archived, policy()).unwrap();
        assert_eq!(fs::read(tmp.path().join("restored/f")).unwrap(), b"data");
    }
}
