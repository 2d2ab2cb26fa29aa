//! Writing the entries of a store archive into a staging tree, every operation relative to a
//! directory handle that was resolved beneath the tree's root.
//!
//! Invariants:
//! - Every create, write, link, chown, chmod and utimes names a single component inside a parent
//!   directory resolved from the root's handle by module `resolve` (`openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, or `openat(O_NOFOLLOW)` component by component
//!   where the kernel lacks it), so no symlink, `..` or magic link (in the archive or put there by
//!   anyone else) leads out of the tree. The last component is never followed either: files are
//!   created `O_EXCL | O_NOFOLLOW`, metadata goes through the file's own handle or `*at` calls
//!   with `AT_SYMLINK_NOFOLLOW`.
//! - A hard link's source is resolved the same way and must be a regular file already in the tree.
//! - Directory metadata is applied last, deepest first, through handles reopened beneath the root
//!   with `O_NOFOLLOW | O_DIRECTORY`; a directory replaced by a later entry is forgotten, with
//!   everything under it. The archive root's own entry is ignored: the store root keeps its owner
//!   and mode.
//! - Owners, setuid/setgid bits and device nodes follow the agent's [`RestorePolicy`]. Without
//!   `owners`, entries belong to the agent, and a setuid (setgid) bit stays only where the recorded
//!   uid (gid) is the agent's own: it never grants the agent's identity to someone else's program.
//! - A sparse entry (GNU type `S`, its map checked by the tar guard) is written with holes: whole
//!   4 KiB blocks of zeros, at aligned offsets, are skipped rather than written, and the file's
//!   length is then set to its real size, so it takes about the space its data takes.
//! - Extended attributes (pax `SCHILY.xattr.<name>` records, kept names only: `user.*`,
//!   `security.capability`, POSIX ACLs) are set through the entry's own handle after its owner and
//!   mode; `security.capability` only where a setuid bit would be kept. Where the filesystem
//!   refuses one (`EOPNOTSUPP`, `EPERM`, …) it is a warning in the reply, not a failure; a full
//!   disk is `NoSpace`. The archive root's own attributes, like its owner and mode, are not set.
//! - A failing filesystem call is an I/O error naming the path (`NoSpace` for ENOSPC/EDQUOT); only
//!   the archive's own faults are `BadArchive`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use std::os::unix::fs::FileExt;

use deis_backup_proto::v1::{RestoreStoreReply, Warning, warning::Kind as WarningKind};
use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid, XattrFlags};
use rustix::io::Errno;
use tar::EntryType;

use super::resolve::{open_beneath, open_path_beneath};
use super::tar_guard::PATH_MAX;
use crate::config::RestorePolicy;
use crate::error::{Error, Result};
use crate::store::archive::xattrs;

/// The error for a failing filesystem call on `path`: `NoSpace` for a full disk or quota.
pub(super) fn fs_error(op: &'static str, path: PathBuf) -> impl FnOnce(io::Error) -> Error {
    move |source| match Errno::from_io_error(&source) {
        Some(Errno::NOSPC | Errno::DQUOT) => Error::NoSpace { path, source },
        _ => Error::Io { op, path, source },
    }
}

fn refuse(reason: String) -> Error {
    Error::BadArchive { reason }
}

/// A checked, archive-relative path: components that are neither empty, `.` nor `..`.
pub(super) fn safe_relative(raw: &[u8]) -> std::result::Result<Vec<&[u8]>, String> {
    let shown = String::from_utf8_lossy(raw);
    if raw.len() > PATH_MAX {
        return Err(format!(
            "entry '{shown:.64}...' has a path of {} bytes; the longest accepted is {PATH_MAX}",
            raw.len()
        ));
    }
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

/// Owner, mode and mtime an entry records.
#[derive(Debug, Clone, Copy)]
pub(super) struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
}

impl Meta {
    fn of(h: &tar::Header, shown: &str) -> Result<Self> {
        let num = |r: io::Result<u64>, what: &str| {
            r.ok()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| refuse(format!("entry '{shown}' has an impossible {what}")))
        };
        Ok(Self {
            mode: num(h.mode().map(u64::from), "mode")? & 0o7777,
            uid: num(h.uid(), "uid")?,
            gid: num(h.gid(), "gid")?,
            mtime: h
                .mtime()
                .map_err(|_| refuse(format!("entry '{shown}' has an impossible mtime")))?
                .try_into()
                .unwrap_or(i64::MAX),
        })
    }

    fn times(&self) -> Timestamps {
        let t = Timespec {
            tv_sec: self.mtime,
            tv_nsec: 0,
        };
        Timestamps {
            last_access: t,
            last_modification: t,
        }
    }
}

/// An entry's extended attributes to set: (name, value), kept names only.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Attributes that could not be set are reported one by one up to this many, then counted.
const XATTR_WARNINGS: usize = 20;

/// Bytes a hole must span (and be aligned to) for a sparse file's zeros to be skipped.
const HOLE_BLOCK: usize = 4096;

/// Whether `b` is all zeros.
fn zeros(b: &[u8]) -> bool {
    let (head, rest) = b.split_at(b.len() % 16);
    head.iter().all(|x| *x == 0)
        && rest
            .chunks_exact(16)
            .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or_default()) == 0)
}

/// The kept extended attributes an entry's pax header records (`SCHILY.xattr.<name>`).
fn entry_xattrs(entry: &mut tar::Entry<'_, impl Read>, shown: &str) -> Result<Xattrs> {
    let mut out = Xattrs::new();
    let Some(records) = entry.pax_extensions().map_err(super::read_error)? else {
        return Ok(out);
    };
    let mut acl_text = Vec::new();
    for r in records {
        let r = r.map_err(|_| refuse(format!("entry '{shown}' has a malformed pax header")))?;
        if let Some(name) = r.key_bytes().strip_prefix(xattrs::PAX_PREFIX)
            && xattrs::kept(name)
        {
            out.push((name.to_vec(), r.value_bytes().to_vec()));
        } else if let Some((_, name)) = xattrs::ACL_TEXT.iter().find(|(k, _)| *k == r.key_bytes()) {
            acl_text.push((*name, r.value_bytes()));
        }
    }
    // An ACL given only as text (its value held a newline): its value from the text.
    for (name, text) in acl_text {
        if !out.iter().any(|(n, _)| n == name) {
            let value = xattrs::acl_value(text)
                .ok_or_else(|| refuse(format!("entry '{shown}' has an ACL that cannot be read")))?;
            out.push((name.to_vec(), value));
        }
    }
    Ok(out)
}

/// The staging tree being written.
pub(super) struct Staging {
    root: OwnedFd,
    root_path: PathBuf,
    /// Where entries replaced by later ones go; removed with the staging directory.
    replaced: OwnedFd,
    replaced_count: u64,
    policy: RestorePolicy,
    /// The agent's own uid and gid.
    me: (u32, u32),
    /// Directories to finish (metadata and attributes), by archive-relative path.
    dirs: BTreeMap<Vec<u8>, (Meta, Xattrs)>,
    /// Extended attributes that could not be set (the first `XATTR_WARNINGS` reported each).
    xattrs_unset: u64,
    buf: Vec<u8>,
    pub reply: RestoreStoreReply,
}

impl Staging {
    pub fn new(
        root: OwnedFd,
        root_path: PathBuf,
        replaced: OwnedFd,
        policy: RestorePolicy,
    ) -> Self {
        Self {
            root,
            root_path,
            replaced,
            replaced_count: 0,
            policy,
            me: (
                rustix::process::geteuid().as_raw(),
                rustix::process::getegid().as_raw(),
            ),
            dirs: BTreeMap::new(),
            xattrs_unset: 0,
            buf: vec![0; 256 * 1024],
            reply: RestoreStoreReply::default(),
        }
    }

    fn path(&self, rel: &[u8]) -> PathBuf {
        self.root_path.join(OsStr::from_bytes(rel))
    }

    fn owner(&self, m: &Meta) -> Option<(Uid, Gid)> {
        self.policy
            .owners
            .then(|| (Uid::from_raw(m.uid), Gid::from_raw(m.gid)))
    }

    fn mode(&self, m: &Meta) -> Mode {
        let mut mode = m.mode;
        if !self.policy.setid || (!self.policy.owners && m.uid != self.me.0) {
            mode &= !0o4000;
        }
        if !self.policy.setid || (!self.policy.owners && m.gid != self.me.1) {
            mode &= !0o2000;
        }
        Mode::from_raw_mode(mode)
    }

    /// Owner (per policy), then mode (chown clears setid bits), then mtime, through `fd`.
    fn apply(&self, fd: &OwnedFd, m: &Meta) -> rustix::io::Result<()> {
        if let Some((u, g)) = self.owner(m) {
            rustix::fs::fchown(fd, Some(u), Some(g))?;
        }
        rustix::fs::fchmod(fd, self.mode(m))?;
        rustix::fs::futimens(fd, &m.times())
    }

    /// Sets the extended attributes `x` of the entry `rel` (shown as `shown`, recorded with `m`)
    /// through its handle `fd`, after its owner and mode (a chown drops file capabilities). Where
    /// the filesystem or the kernel refuses one, a warning; only a full disk fails the restore.
    /// `security.capability` is set only where a setuid bit would be kept: it grants privileges
    /// as that bit does.
    fn set_xattrs(
        &mut self,
        fd: &OwnedFd,
        x: &Xattrs,
        m: &Meta,
        rel: &[u8],
        shown: &str,
    ) -> Result<()> {
        for (name, value) in x {
            let shown_name = String::from_utf8_lossy(name);
            let why = if name == b"security.capability"
                && !(self.policy.setid && (self.policy.owners || m.uid == self.me.0))
            {
                "file capabilities are restored only where a setuid bit would be (restore-setid, restore-owners in the agent's config)".to_string()
            } else {
                match rustix::fs::fsetxattr(fd, name.as_slice(), value, XattrFlags::empty()) {
                    Ok(()) => continue,
                    Err(e @ (Errno::NOSPC | Errno::DQUOT)) => {
                        return Err(fs_error("setting extended attributes of", self.path(rel))(
                            e.into(),
                        ));
                    }
                    Err(e) => e.to_string(),
                }
            };
            if self.xattrs_unset < XATTR_WARNINGS as u64 {
                self.reply.warnings.push(Warning {
                    kind: WarningKind::Other.into(),
                    path: shown.to_owned(),
                    message: format!("extended attribute {shown_name} not restored: {why}"),
                });
            }
            self.xattrs_unset += 1;
        }
        Ok(())
    }

    /// The parent directory of `parts`, beneath the root; missing ones are created when `create`.
    fn parent(&self, parts: &[&[u8]], shown: &str, create: bool) -> Result<OwnedFd> {
        let rel = parts[..parts.len() - 1].join(&b'/');
        match open_beneath(&self.root, &rel) {
            Err(Errno::NOENT) if create => {}
            r => return r.map_err(|e| self.resolve_error(e, &rel, shown)),
        }
        let mut dir =
            open_beneath(&self.root, b"").map_err(|e| self.resolve_error(e, b"", shown))?;
        for (i, c) in parts[..parts.len() - 1].iter().enumerate() {
            let upto = parts[..=i].join(&b'/');
            let name = OsStr::from_bytes(c);
            match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(fs_error("creating", self.path(&upto))(e.into())),
            }
            dir = open_beneath(&dir, c).map_err(|e| self.resolve_error(e, &upto, shown))?;
        }
        Ok(dir)
    }

    fn resolve_error(&self, e: Errno, rel: &[u8], shown: &str) -> Error {
        match e {
            Errno::LOOP | Errno::NOTDIR => refuse(format!(
                "entry '{shown}' goes through {}",
                self.blocker(rel)
            )),
            Errno::XDEV => refuse(format!("entry '{shown}' leads out of the archive")),
            e => fs_error("opening", self.path(rel))(e.into()),
        }
    }

    /// What in `rel` is not a directory: "a symlink 'x/y'" or "a non-directory 'x/y'".
    fn blocker(&self, rel: &[u8]) -> String {
        let Ok(mut dir) = open_beneath(&self.root, b"") else {
            return "something that is not a directory".into();
        };
        let mut upto = Vec::new();
        for c in rel.split(|b| *b == b'/') {
            if !upto.is_empty() {
                upto.push(b'/');
            }
            upto.extend_from_slice(c);
            let shown = String::from_utf8_lossy(&upto);
            match open_beneath(&dir, c) {
                Ok(next) => dir = next,
                Err(_) => {
                    return match rustix::fs::statat(
                        &dir,
                        OsStr::from_bytes(c),
                        AtFlags::SYMLINK_NOFOLLOW,
                    ) {
                        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                            format!("a symlink ('{shown}')")
                        }
                        _ => format!("a non-directory ('{shown}')"),
                    };
                }
            }
        }
        "something that is not a directory".into()
    }

    /// Makes room for an entry at `name` in `parent`: a previous entry there is replaced (as tar
    /// does), except that a directory stays when a directory comes again. Returns whether it stayed.
    fn clear(&mut self, parent: &OwnedFd, name: &[u8], rel: &[u8], dir: bool) -> Result<bool> {
        let name = OsStr::from_bytes(name);
        let st = match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => return Ok(false),
            r => r.map_err(|e| fs_error("checking", self.path(rel))(e.into()))?,
        };
        let was_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
        if was_dir && dir {
            return Ok(true);
        }
        let r = if was_dir {
            self.replaced_count += 1;
            rustix::fs::renameat(
                parent,
                name,
                &self.replaced,
                self.replaced_count.to_string(),
            )
        } else {
            rustix::fs::unlinkat(parent, name, AtFlags::empty())
        };
        r.map_err(|e| fs_error("replacing", self.path(rel))(e.into()))?;
        // Forget the directory and everything under it: its metadata must not land elsewhere.
        let mut under = rel.to_vec();
        under.push(b'/');
        self.dirs.retain(|k, _| k != rel && !k.starts_with(&under));
        Ok(false)
    }

    /// Stages one tar entry.
    pub fn entry(&mut self, mut entry: tar::Entry<'_, impl Read>) -> Result<()> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let parts = safe_relative(&raw).map_err(refuse)?;
        let h = entry.header().clone();
        let kind = h.entry_type();
        let meta = Meta::of(&h, &shown)?;
        let xattrs = entry_xattrs(&mut entry, &shown)?;
        if parts.is_empty() {
            // The archive root: the store root keeps its own owner and mode.
            if kind != EntryType::Directory {
                return Err(refuse(format!(
                    "entry '{shown}' names the root but is not a directory"
                )));
            }
            return Ok(());
        }
        if kind == EntryType::XGlobalHeader {
            return Ok(());
        }
        let link = match kind {
            EntryType::Symlink | EntryType::Link => Some(
                entry
                    .link_name_bytes()
                    .ok_or_else(|| refuse(format!("link '{shown}' has no target")))?
                    .into_owned(),
            ),
            _ => None,
        };
        let parent = self.parent(&parts, &shown, true)?;
        let name = parts[parts.len() - 1];
        let rel = parts.join(&b'/');
        let kept = self.clear(&parent, name, &rel, kind == EntryType::Directory)?;
        let at = Target {
            parent: &parent,
            name: OsStr::from_bytes(name),
            rel: &rel,
            shown: &shown,
        };
        match (kind, link) {
            (EntryType::Regular | EntryType::Continuous, _) => {
                self.file(&at, &mut entry, &meta, None, &xattrs)
            }
            (EntryType::GNUSparse, _) => {
                // `tar` checked the map against the real size, which is the entry's size.
                let size = entry.size();
                self.file(&at, &mut entry, &meta, Some(size), &xattrs)
            }
            (EntryType::Directory, _) => self.dir(&at, kept, meta, xattrs),
            (EntryType::Symlink, Some(to)) => self.symlink(&at, &to, &meta),
            (EntryType::Link, Some(to)) => self.hard_link(&at, &to),
            (EntryType::Fifo | EntryType::Char | EntryType::Block, _) => {
                self.node(&at, &h, kind, &meta)
            }
            (other, _) => Err(refuse(format!(
                "entry '{shown}' has a type a store cannot hold ({other:?})"
            ))),
        }
    }

    /// Writes a regular file; a sparse one (`sparse`: its real size) with holes where its
    /// content has whole zero blocks, the file's length then set to its real size.
    fn file(
        &mut self,
        at: &Target<'_>,
        entry: &mut impl Read,
        m: &Meta,
        sparse: Option<u64>,
        xattrs: &Xattrs,
    ) -> Result<()> {
        let path = self.path(at.rel);
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(at.parent, at.name, flags, Mode::from_raw_mode(0o600))
            .map_err(|e| fs_error("creating", path.clone())(e.into()))?;
        let mut f = File::from(fd);
        let mut n = 0u64;
        loop {
            // A sparse file's pieces are whole buffers (but the last), so holes stay aligned.
            let got = if sparse.is_some() {
                fill(entry, &mut self.buf)?
            } else {
                match entry.read(&mut self.buf) {
                    Ok(got) => got,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(super::read_error(e)),
                }
            };
            if got == 0 {
                break;
            }
            if sparse.is_some() {
                for (i, block) in self.buf[..got].chunks(HOLE_BLOCK).enumerate() {
                    if block.len() < HOLE_BLOCK || !zeros(block) {
                        f.write_all_at(block, n + (i * HOLE_BLOCK) as u64)
                            .map_err(fs_error("writing", path.clone()))?;
                    }
                }
            } else {
                f.write_all(&self.buf[..got])
                    .map_err(fs_error("writing", path.clone()))?;
            }
            n += got as u64;
        }
        if let Some(size) = sparse {
            f.set_len(size.max(n))
                .map_err(fs_error("writing", path.clone()))?;
        }
        let fd = OwnedFd::from(f);
        self.apply(&fd, m)
            .map_err(|e| fs_error("setting metadata of", path)(e.into()))?;
        self.set_xattrs(&fd, xattrs, m, at.rel, at.shown)?;
        self.reply.files += 1;
        self.reply.bytes += n;
        Ok(())
    }

    fn dir(&mut self, at: &Target<'_>, kept: bool, m: Meta, x: Xattrs) -> Result<()> {
        if !kept {
            rustix::fs::mkdirat(at.parent, at.name, Mode::from_raw_mode(0o700))
                .map_err(|e| fs_error("creating", self.path(at.rel))(e.into()))?;
        }
        self.dirs.insert(at.rel.to_vec(), (m, x));
        self.reply.dirs += 1;
        Ok(())
    }

    fn symlink(&mut self, at: &Target<'_>, to: &[u8], m: &Meta) -> Result<()> {
        let path = self.path(at.rel);
        let err = |e: Errno| fs_error("creating", path.clone())(e.into());
        rustix::fs::symlinkat(OsStr::from_bytes(to), at.parent, at.name).map_err(err)?;
        if let Some((u, g)) = self.owner(m) {
            rustix::fs::chownat(
                at.parent,
                at.name,
                Some(u),
                Some(g),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(err)?;
        }
        rustix::fs::utimensat(at.parent, at.name, &m.times(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(err)?;
        self.reply.links += 1;
        Ok(())
    }

    fn hard_link(&mut self, at: &Target<'_>, to: &[u8]) -> Result<()> {
        let shown = at.shown;
        let not_before = || {
            refuse(format!(
                "hard link '{shown}' points at '{}', which is not a file archived before it",
                String::from_utf8_lossy(to)
            ))
        };
        let tparts = safe_relative(to).map_err(refuse)?;
        if tparts.is_empty() {
            return Err(refuse(format!("hard link '{shown}' points at the root")));
        }
        let src_parent = match self.parent(&tparts, shown, false) {
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(not_before());
            }
            r => r?,
        };
        let src = OsStr::from_bytes(tparts[tparts.len() - 1]);
        match rustix::fs::statat(&src_parent, src, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {}
            _ => return Err(not_before()),
        }
        rustix::fs::linkat(&src_parent, src, at.parent, at.name, AtFlags::empty())
            .map_err(|e| fs_error("linking", self.path(at.rel))(e.into()))?;
        self.reply.links += 1;
        Ok(())
    }

    fn node(&mut self, at: &Target<'_>, h: &tar::Header, kind: EntryType, m: &Meta) -> Result<()> {
        let (ft, dev) = match kind {
            EntryType::Fifo => (FileType::Fifo, 0),
            _ if !self.policy.devices => {
                return Err(refuse(format!(
                    "entry '{}' is a device node; this agent does not create them (allow-devices in its config)",
                    at.shown
                )));
            }
            _ => {
                let num = |r: io::Result<Option<u32>>| r.ok().flatten().unwrap_or(0);
                let ft = if kind == EntryType::Char {
                    FileType::CharacterDevice
                } else {
                    FileType::BlockDevice
                };
                let dev = rustix::fs::makedev(num(h.device_major()), num(h.device_minor()));
                (ft, dev)
            }
        };
        let path = self.path(at.rel);
        let err = |e: Errno| fs_error("creating", path.clone())(e.into());
        rustix::fs::mknodat(at.parent, at.name, ft, Mode::from_raw_mode(0o600), dev)
            .map_err(err)?;
        if let Some((u, g)) = self.owner(m) {
            rustix::fs::chownat(
                at.parent,
                at.name,
                Some(u),
                Some(g),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(err)?;
        }
        // Opening a node may block or act on a device, so its mode is set through an O_PATH
        // handle (resolved beneath the tree, never a link) by way of /proc/self/fd.
        let handle = open_path_beneath(at.parent, at.name.as_bytes()).map_err(err)?;
        match rustix::fs::fstat(&handle) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == ft => {}
            _ => {
                return Err(Error::Io {
                    op: "creating",
                    path,
                    source: io::Error::other("the node was replaced while it was being created"),
                });
            }
        }
        let by_fd = format!("/proc/self/fd/{}", handle.as_raw_fd());
        rustix::fs::chmod(by_fd.as_str(), self.mode(m)).map_err(err)?;
        rustix::fs::utimensat(at.parent, at.name, &m.times(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(err)?;
        self.reply.files += 1;
        Ok(())
    }

    /// Applies directory metadata, deepest first, through handles reopened beneath the root.
    pub fn finish_dirs(&mut self) -> Result<()> {
        let mut dirs: Vec<_> = std::mem::take(&mut self.dirs).into_iter().collect();
        dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.split(|b| *b == b'/').count()));
        for (rel, (m, x)) in dirs {
            let path = self.path(&rel);
            let fd = open_beneath(&self.root, &rel)
                .map_err(|e| fs_error("opening", path.clone())(e.into()))?;
            self.apply(&fd, &m)
                .map_err(|e| fs_error("setting metadata of", path)(e.into()))?;
            let shown = String::from_utf8_lossy(&rel).into_owned();
            self.set_xattrs(&fd, &x, &m, &rel, &shown)?;
        }
        if let Some(more) = self.xattrs_unset.checked_sub(XATTR_WARNINGS as u64)
            && more > 0
        {
            self.reply.warnings.push(Warning {
                kind: WarningKind::Other.into(),
                path: String::new(),
                message: format!(
                    "{more} more extended attributes not restored (the first {XATTR_WARNINGS} are reported)"
                ),
            });
        }
        self.xattrs_unset = 0;
        Ok(())
    }
}

/// Reads from `entry` until `buf` is full or the entry ends; returns the bytes read.
fn fill(entry: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match entry.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(got) => n += got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(super::read_error(e)),
        }
    }
    Ok(n)
}

/// Where an entry goes: `name` inside `parent`.
struct Target<'a> {
    parent: &'a OwnedFd,
    name: &'a OsStr,
    rel: &'a [u8],
    shown: &'a str,
}
