//! Restoring a store archive (tar + zstd) into an allow-listed directory.
//!
//! Invariants:
//! - The archive is extracted into a fresh staging directory inside the target
//!   (`.deis-backup-restore-<pid>-<nanos>`), then checked as a whole (every path safe, zstd frames
//!   and tar stream complete, every segment's size and sha256 as announced) before anything outside
//!   it is touched. A refused
//!   archive leaves the target as it was, and the staging directory is removed.
//! - Refused: absolute paths, `..`, a path whose parent is a symlink (even one inside the archive),
//!   hard links to such paths, device nodes unless `allow_devices`, entry types tar has but a
//!   store cannot hold. Files are created with O_EXCL|O_NOFOLLOW and never written through a link.
//! - Only then are the staged entries renamed into the target (same filesystem, so each move is
//!   atomic); with `overwrite`, the target's previous entries are removed first. A failure in that
//!   phase is reported with the names already moved.
//! - Owners (numeric), modes and mtimes are restored; directory metadata is applied last, deepest
//!   first, so writing children does not disturb it.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use deis_backup_proto::v1::{RestoreStoreReply, Warning, warning::Kind};
use rustix::fs::{AtFlags, CWD, FileType, Gid, Mode, Timespec, Timestamps, Uid};
use sha2::{Digest, Sha256};
use tar::EntryType;

use crate::error::{Error, Result};

/// Prefix of staging directories inside a restore target.
pub const STAGING_PREFIX: &str = ".deis-backup-restore-";

/// Options of one restore.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub overwrite: bool,
    pub allow_devices: bool,
    /// Size and sha256 of each segment of the compressed archive, in order; empty for no check.
    pub segments: Vec<(u64, Vec<u8>)>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Checks the archive's bytes against the announced segments as they pass through.
struct SegmentCheck<R> {
    inner: R,
    want: VecDeque<(u64, Vec<u8>)>,
    count: usize,
    /// Segments already checked.
    done: usize,
    /// Bytes of the current segment so far.
    got: u64,
    hasher: Sha256,
}

impl<R: Read> SegmentCheck<R> {
    fn new(inner: R, segments: Vec<(u64, Vec<u8>)>) -> Self {
        Self {
            inner,
            count: segments.len(),
            want: segments.into(),
            done: 0,
            got: 0,
            hasher: Sha256::new(),
        }
    }

    /// Checks every segment whose bytes are all in.
    fn close_finished(&mut self) -> io::Result<()> {
        while let Some((size, sha)) = self.want.front() {
            if self.got < *size {
                break;
            }
            if self.hasher.finalize_reset()[..] != sha[..] {
                return Err(invalid(format!(
                    "segment {} of {} differs from the sha256 announced in the header",
                    self.done + 1,
                    self.count
                )));
            }
            self.want.pop_front();
            self.done += 1;
            self.got = 0;
        }
        Ok(())
    }

    fn consume(&mut self, mut data: &[u8]) -> io::Result<()> {
        loop {
            self.close_finished()?;
            if data.is_empty() {
                return Ok(());
            }
            let Some((size, _)) = self.want.front() else {
                return Err(invalid(format!(
                    "the archive runs past the {} segments announced in the header",
                    self.count
                )));
            };
            let take = usize::try_from(size - self.got)
                .unwrap_or(usize::MAX)
                .min(data.len());
            self.hasher.update(&data[..take]);
            self.got += take as u64;
            data = &data[take..];
        }
    }

    /// Reads to the end and checks that every announced segment came whole.
    fn finish(mut self) -> io::Result<()> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(())
    }
}

impl<R: Read> Read for SegmentCheck<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.count == 0 {
            return Ok(n);
        }
        if n == 0 {
            self.close_finished()?;
            if !self.want.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the archive ended in segment {} of {}",
                        self.done + 1,
                        self.count
                    ),
                ));
            }
            return Ok(0);
        }
        self.consume(&buf[..n])?;
        Ok(n)
    }
}

/// A checked, archive-relative path: components that are neither empty, `.` nor `..`.
fn safe_relative(raw: &[u8]) -> std::result::Result<Vec<&[u8]>, String> {
    let shown = String::from_utf8_lossy(raw);
    if raw.first() == Some(&b'/') {
        return Err(format!("entry '{shown}' has an absolute path"));
    }
    let mut parts = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(format!("entry '{shown}' climbs out with '..'")),
            c => parts.push(c),
        }
    }
    Ok(parts)
}

struct Dir {
    path: PathBuf,
    depth: usize,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
}

struct Stager {
    staging: PathBuf,
    allow_devices: bool,
    dirs: Vec<Dir>,
    root: Option<Dir>,
    reply: RestoreStoreReply,
}

fn refuse(reason: String) -> Error {
    Error::BadArchive { reason }
}

#[allow(clippy::needless_pass_by_value)] // used as `map_err(rerr)`
fn rerr(e: io::Error) -> Error {
    refuse(format!("cannot read the archive: {e}"))
}

impl Stager {
    /// The staging path for `parts`, making sure every parent is a real directory (never a link).
    fn place(&self, parts: &[&[u8]], shown: &str) -> Result<PathBuf> {
        let mut p = self.staging.clone();
        for (i, c) in parts.iter().enumerate() {
            p.push(std::ffi::OsStr::from_bytes(c));
            if i + 1 == parts.len() {
                break;
            }
            match fs::symlink_metadata(&p) {
                Ok(md) if md.file_type().is_symlink() => {
                    return Err(refuse(format!("entry '{shown}' goes through a symlink")));
                }
                Ok(md) if md.is_dir() => {}
                Ok(_) => {
                    return Err(refuse(format!(
                        "entry '{shown}' goes through a non-directory"
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&p)
                        .map_err(Error::io("creating", &p))?;
                }
                Err(e) => return Err(Error::io("checking", &p)(e)),
            }
        }
        Ok(p)
    }

    // One match over the tar entry types: clearer in one place than spread over helpers.
    #[allow(clippy::too_many_lines)]
    fn entry(&mut self, mut entry: tar::Entry<'_, impl Read>) -> Result<()> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let parts = safe_relative(&raw).map_err(refuse)?;
        let h = entry.header().clone();
        let kind = h.entry_type();
        let mode = h.mode().map_err(rerr)? & 0o7777;
        let uid = u32::try_from(h.uid().map_err(rerr)?)
            .map_err(|_| refuse(format!("entry '{shown}' has an impossible uid")))?;
        let gid = u32::try_from(h.gid().map_err(rerr)?)
            .map_err(|_| refuse(format!("entry '{shown}' has an impossible gid")))?;
        let mtime = i64::try_from(h.mtime().map_err(rerr)?).unwrap_or(i64::MAX);
        if parts.is_empty() {
            if kind != EntryType::Directory {
                return Err(refuse(format!(
                    "entry '{shown}' names the root but is not a directory"
                )));
            }
            self.root = Some(Dir {
                path: self.staging.clone(),
                depth: 0,
                mode,
                uid,
                gid,
                mtime,
            });
            return Ok(());
        }
        let dest = self.place(&parts, &shown)?;
        // A duplicate entry replaces the earlier one, as tar does; a directory is kept.
        if let Ok(md) = fs::symlink_metadata(&dest)
            && !(md.is_dir() && kind == EntryType::Directory)
        {
            let r = if md.is_dir() {
                fs::remove_dir_all(&dest)
            } else {
                fs::remove_file(&dest)
            };
            r.map_err(Error::io("replacing", &dest))?;
        }
        let io = |op| Error::io(op, dest.clone());
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits().cast_signed())
                    .open(&dest)
                    .map_err(io("creating"))?;
                let n = io::copy(&mut entry, &mut f).map_err(rerr)?;
                rustix::fs::fchown(&f, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                    .map_err(|e| io("setting the owner of")(e.into()))?;
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io("setting the mode of"))?;
                f.set_modified(system_time(mtime))
                    .map_err(io("setting the mtime of"))?;
                self.reply.files += 1;
                self.reply.bytes += n;
            }
            EntryType::Directory => {
                if !dest.is_dir() {
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&dest)
                        .map_err(io("creating"))?;
                }
                self.dirs.push(Dir {
                    path: dest,
                    depth: parts.len(),
                    mode,
                    uid,
                    gid,
                    mtime,
                });
                self.reply.dirs += 1;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refuse(format!("symlink '{shown}' has no target")))?
                    .into_owned();
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &dest)
                    .map_err(io("creating"))?;
                set_meta(&dest, None, uid, gid, mtime).map_err(io("setting metadata of"))?;
                self.reply.links += 1;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refuse(format!("hard link '{shown}' has no target")))?
                    .into_owned();
                let tparts = safe_relative(&target).map_err(refuse)?;
                if tparts.is_empty() {
                    return Err(refuse(format!("hard link '{shown}' points at the root")));
                }
                let src = self.place(&tparts, &shown)?;
                match fs::symlink_metadata(&src) {
                    Ok(md) if md.is_file() => {}
                    _ => {
                        return Err(refuse(format!(
                            "hard link '{shown}' points at '{}', which is not a file archived before it",
                            String::from_utf8_lossy(&target)
                        )));
                    }
                }
                fs::hard_link(&src, &dest).map_err(io("linking"))?;
                self.reply.links += 1;
            }
            EntryType::Fifo | EntryType::Char | EntryType::Block => {
                let (ft, dev) = match kind {
                    EntryType::Fifo => (FileType::Fifo, 0),
                    _ if !self.allow_devices => {
                        return Err(refuse(format!(
                            "entry '{shown}' is a device node; restore with allow_devices to create it"
                        )));
                    }
                    _ => {
                        let major = h.device_major().map_err(rerr)?.unwrap_or(0);
                        let minor = h.device_minor().map_err(rerr)?.unwrap_or(0);
                        let ft = if kind == EntryType::Char {
                            FileType::CharacterDevice
                        } else {
                            FileType::BlockDevice
                        };
                        (ft, rustix::fs::makedev(major, minor))
                    }
                };
                rustix::fs::mknodat(CWD, &dest, ft, Mode::from_raw_mode(0o600), dev)
                    .map_err(|e| io("creating")(e.into()))?;
                set_meta(&dest, Some(mode), uid, gid, mtime).map_err(io("setting metadata of"))?;
                self.reply.files += 1;
            }
            EntryType::XGlobalHeader => {}
            other => {
                return Err(refuse(format!(
                    "entry '{shown}' has a type a store cannot hold ({other:?})"
                )));
            }
        }
        Ok(())
    }
}

fn system_time(mtime: i64) -> SystemTime {
    match u64::try_from(mtime) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

/// Sets owner, mode (unless `None`, for symlinks) and mtime of `path` without following a link.
fn set_meta(path: &Path, mode: Option<u32>, uid: u32, gid: u32, mtime: i64) -> io::Result<()> {
    rustix::fs::chownat(
        CWD,
        path,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    if let Some(mode) = mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        CWD,
        path,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// The target's entries other than our staging directory.
fn existing(target: &Path, staging: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in fs::read_dir(target).map_err(Error::io("listing", target))? {
        let p = e.map_err(Error::io("listing", target))?.path();
        if p != staging {
            out.push(p);
        }
    }
    Ok(out)
}

/// Restores the tar + zstd `archive` into `target` (blocking; see the module invariants).
pub fn restore(
    target: &Path,
    archive: crate::chunks::ChannelReader,
    opts: &Options,
) -> Result<RestoreStoreReply> {
    if !target.is_dir() {
        fs::create_dir(target).map_err(Error::io("creating the restore target", target))?;
    }
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let staging = target.join(format!("{STAGING_PREFIX}{}-{nanos}", std::process::id()));
    if !opts.overwrite && !existing(target, &staging)?.is_empty() {
        return Err(Error::NotEmpty {
            path: target.to_path_buf(),
        });
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(Error::io("creating the staging directory", &staging))?;
    let result = stage(&staging, archive, opts)
        .and_then(|stager| commit(target, &staging, stager, opts.overwrite));
    if staging.exists()
        && let Err(e) = fs::remove_dir_all(&staging)
    {
        tracing::warn!(path = %staging.display(), error = %e, "cannot remove the staging directory");
    }
    let (reply, root) = result?;
    // The root's metadata goes last: removing the staging directory changed the target's mtime.
    if let Some(root) = root {
        set_meta(target, Some(root.mode), root.uid, root.gid, root.mtime)
            .map_err(Error::io("setting metadata of", target))?;
    }
    Ok(reply)
}

fn stage(staging: &Path, archive: crate::chunks::ChannelReader, opts: &Options) -> Result<Stager> {
    let mut stager = Stager {
        staging: staging.to_path_buf(),
        allow_devices: opts.allow_devices,
        dirs: Vec::new(),
        root: None,
        reply: RestoreStoreReply::default(),
    };
    let mut checked = SegmentCheck::new(archive, opts.segments.clone());
    {
        // The segments are zstd frames one after another: the decoder reads through all of them.
        let dec = zstd::Decoder::new(&mut checked).map_err(rerr)?;
        let mut tar = tar::Archive::new(dec);
        for entry in tar.entries().map_err(rerr)? {
            stager.entry(entry.map_err(rerr)?)?;
        }
        // The tar ended; read the zstd stream to its end so its checksum is verified.
        let mut dec = tar.into_inner();
        io::copy(&mut dec, &mut io::sink()).map_err(rerr)?;
    }
    checked.finish().map_err(rerr)?;
    stager.dirs.sort_by_key(|d| std::cmp::Reverse(d.depth));
    for d in &stager.dirs {
        set_meta(&d.path, Some(d.mode), d.uid, d.gid, d.mtime)
            .map_err(Error::io("setting metadata of", &d.path))?;
    }
    Ok(stager)
}

fn commit(
    target: &Path,
    staging: &Path,
    stager: Stager,
    overwrite: bool,
) -> Result<(RestoreStoreReply, Option<Dir>)> {
    let mut reply = stager.reply;
    let old = existing(target, staging)?;
    if !old.is_empty() && !overwrite {
        return Err(Error::NotEmpty {
            path: target.to_path_buf(),
        });
    }
    let mut moved = Vec::new();
    let partial = |moved: &[String], e: Error| Error::BadRequest {
        what: format!(
            "restore into {} stopped after the archive was checked: {e}; already in place: [{}]",
            target.display(),
            moved.join(", ")
        ),
    };
    for p in old {
        let md = fs::symlink_metadata(&p).map_err(Error::io("replacing", &p))?;
        let r = if md.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.map_err(|e| partial(&moved, Error::io("removing", &p)(e)))?;
        reply.warnings.push(Warning {
            kind: Kind::Other.into(),
            path: p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            message: "replaced (overwrite)".into(),
        });
    }
    let mut names: Vec<_> = fs::read_dir(staging)
        .map_err(Error::io("listing", staging))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .map_err(Error::io("listing", staging))?;
    names.sort();
    for name in names {
        let from = staging.join(&name);
        let to = target.join(&name);
        fs::rename(&from, &to)
            .map_err(|e| partial(&moved, Error::io("moving into place", &to)(e)))?;
        moved.push(name.to_string_lossy().into_owned());
    }
    Ok((reply, stager.root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_paths_are_refused() {
        assert!(safe_relative(b"/etc/x").is_err());
        assert!(safe_relative(b"a/../../x").is_err());
        assert!(safe_relative(b"..").is_err());
        assert_eq!(safe_relative(b"./a//b/").unwrap(), [b"a".as_slice(), b"b"]);
        assert!(safe_relative(b"./").unwrap().is_empty());
    }
}
