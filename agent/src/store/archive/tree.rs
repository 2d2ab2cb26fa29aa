//! The store tree as the archive reaches it: directory handles opened one step at a time from the
//! root's, and entries stat'ed, read and opened relative to them.
//!
//! Invariants:
//! - The root is opened once, by its path (the allow-listed store path: a symlink there is the
//!   operator's own and is followed). Nothing else is ever opened, stat'ed or read by a path: every
//!   call names one entry (never `..` or a path with `/`) relative to a directory handle, or `.`
//!   of a handle to read its names.
//! - A directory is opened with `O_DIRECTORY | O_NOFOLLOW` relative to its parent's handle, and a
//!   file with `O_NOFOLLOW` relative to its directory's; entries are stat'ed without following
//!   (`AT_SYMLINK_NOFOLLOW`) and symlink targets read with `readlinkat`. A symlink put in place of
//!   a listed directory or file therefore fails to open and is never followed.
//! - Every directory and file opened is checked with `fstat` against the device and inode it was
//!   listed with (a file must also still be a regular file); anything else in its place is
//!   `Lost::Replaced` and is not read. What is read is thus only ever an inode that was listed
//!   inside the store.
//! - At most `HELD` directory handles stay open besides the root's, the least recently used closed
//!   first. A directory whose handle was closed is reopened from its nearest open ancestor, each
//!   step checked again. A handle still open keeps reaching the directory it was opened on, even
//!   if that directory is moved meanwhile: what is read through it is still only listed inodes.
//! - Extended attributes are read through a handle on the listed inode too: a directory's own
//!   handle, or a file opened (and checked) as for reading.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use super::xattrs::{self, TooBig, Xattrs};

/// Directory handles held open at most besides the root's (well under the common 1024 limit on
/// open files, whatever the tree's depth or width).
pub(super) const HELD: usize = 64;

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Files are opened without blocking (a fifo put in place of a file) and without becoming the
/// controlling terminal (a tty put there).
fn file_flags() -> OFlags {
    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC
}

/// The last component of a relative path.
fn leaf(rel: &[u8]) -> &OsStr {
    OsStr::from_bytes(rel.rsplit(|b| *b == b'/').next().unwrap_or(rel))
}

/// What the archive uses of an entry's `stat`: the fields, with the types, of
/// `std::os::unix::fs::MetadataExt`, so that fingerprints hash the same values as before.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Meta {
    pub(super) mode: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) size: u64,
    pub(super) mtime: i64,
    pub(super) mtime_nsec: i64,
    pub(super) ctime: i64,
    pub(super) ctime_nsec: i64,
    pub(super) dev: u64,
    pub(super) ino: u64,
    pub(super) nlink: u64,
    pub(super) rdev: u64,
    /// 512-byte blocks allocated (not hashed into fingerprints; tells a file that may be sparse).
    pub(super) blocks: u64,
}

impl Meta {
    pub(super) fn file_type(&self) -> FileType {
        FileType::from_raw_mode(self.mode)
    }

    fn same_inode(&self, dev: u64, ino: u64) -> bool {
        (self.dev, self.ino) == (dev, ino)
    }
}

impl From<&Stat> for Meta {
    // `struct stat` field types differ between architectures: some conversions are no-ops here.
    #[allow(clippy::useless_conversion)]
    fn from(st: &Stat) -> Self {
        Self {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime: i64::from(st.st_mtime),
            mtime_nsec: i64::try_from(st.st_mtime_nsec).unwrap_or(0),
            ctime: i64::from(st.st_ctime),
            ctime_nsec: i64::try_from(st.st_ctime_nsec).unwrap_or(0),
            dev: u64::from(st.st_dev),
            ino: u64::from(st.st_ino),
            nlink: u64::from(st.st_nlink),
            rdev: u64::from(st.st_rdev),
            blocks: u64::try_from(st.st_blocks).unwrap_or(0),
        }
    }
}

/// A directory as listed: where it is (its parent and its path) and what it was (device and
/// inode). Holds no handle; `Tree` opens one when needed.
#[derive(Debug)]
pub(super) struct DirRef {
    parent: Option<Arc<DirRef>>,
    /// Its path relative to the root, without a trailing `/`; empty for the root.
    rel: Vec<u8>,
    dev: u64,
    ino: u64,
}

impl DirRef {
    /// The directory `rel` listed in this one with `md`.
    pub(super) fn child(self: &Arc<Self>, rel: Vec<u8>, md: &Meta) -> Arc<Self> {
        Arc::new(Self {
            parent: Some(Arc::clone(self)),
            rel,
            dev: md.dev,
            ino: md.ino,
        })
    }

    /// Its path relative to the root, without a trailing `/`; empty for the root.
    pub(super) fn rel(&self) -> &[u8] {
        &self.rel
    }
}

/// Why a listed entry cannot be reached; nothing of it is read.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Lost {
    /// This path (the entry's own, or a directory's above it) no longer exists.
    Vanished(Vec<u8>),
    /// This path (the entry's own, or a directory's above it) now holds something other than the
    /// inode listed there: a symlink, another file or directory. Not followed.
    Replaced(Vec<u8>),
}

/// Called with an entry's path just before it is opened to be read (a directory to list it, a
/// file for its data): lets tests change the tree between listing and reading.
#[cfg(test)]
#[derive(Clone)]
pub(super) struct Pause(pub(super) Arc<PauseFn>);

#[cfg(test)]
type PauseFn = dyn Fn(&[u8]) + Send + Sync;

#[cfg(test)]
impl std::fmt::Debug for Pause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pause")
    }
}

/// Handles on the store tree (see the module invariants).
pub(super) struct Tree {
    root: Arc<DirRef>,
    root_fd: Arc<OwnedFd>,
    /// Open directory handles, the most recently used last.
    held: VecDeque<(Arc<DirRef>, Arc<OwnedFd>)>,
    #[cfg(test)]
    pub(super) pause: Option<Pause>,
}

impl Tree {
    /// Opens the root directory `path`; returns the tree and the root's metadata.
    pub(super) fn open(path: &Path) -> io::Result<(Self, Meta)> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = rustix::fs::open(path, flags, Mode::empty())?;
        let md = Meta::from(&rustix::fs::fstat(&fd)?);
        let root = Arc::new(DirRef {
            parent: None,
            rel: Vec::new(),
            dev: md.dev,
            ino: md.ino,
        });
        let tree = Self {
            root,
            root_fd: Arc::new(fd),
            held: VecDeque::with_capacity(HELD),
            #[cfg(test)]
            pause: None,
        };
        Ok((tree, md))
    }

    pub(super) fn root(&self) -> &Arc<DirRef> {
        &self.root
    }

    #[cfg(test)]
    fn pause(&self, rel: &[u8]) {
        if let Some(Pause(f)) = &self.pause {
            f(rel);
        }
    }

    /// The held handle on `d`, now the most recently used.
    fn held(&mut self, d: &Arc<DirRef>) -> Option<Arc<OwnedFd>> {
        let i = self.held.iter().rposition(|(h, _)| Arc::ptr_eq(h, d))?;
        let entry = self.held.remove(i)?;
        let fd = Arc::clone(&entry.1);
        self.held.push_back(entry);
        Some(fd)
    }

    /// A handle on `d`, opened step by step from its nearest held ancestor (or the root), each
    /// step without following a symlink and checked against the listed device and inode.
    fn dir(&mut self, d: &Arc<DirRef>) -> io::Result<Result<Arc<OwnedFd>, Lost>> {
        let mut steps = Vec::new();
        let mut at = d;
        let mut fd = loop {
            let Some(parent) = &at.parent else {
                break Arc::clone(&self.root_fd);
            };
            if let Some(fd) = self.held(at) {
                break fd;
            }
            steps.push(at);
            at = parent;
        };
        for step in steps.into_iter().rev() {
            let opened = match rustix::fs::openat(&*fd, leaf(&step.rel), dir_flags(), Mode::empty())
            {
                Ok(opened) => opened,
                Err(Errno::NOENT) => return Ok(Err(Lost::Vanished(step.rel.clone()))),
                // O_NOFOLLOW on a symlink, or no longer a directory.
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    return Ok(Err(Lost::Replaced(step.rel.clone())));
                }
                Err(e) => return Err(e.into()),
            };
            if !Meta::from(&rustix::fs::fstat(&opened)?).same_inode(step.dev, step.ino) {
                return Ok(Err(Lost::Replaced(step.rel.clone())));
            }
            fd = Arc::new(opened);
            if self.held.len() >= HELD {
                self.held.pop_front();
            }
            self.held.push_back((Arc::clone(step), Arc::clone(&fd)));
        }
        Ok(Ok(fd))
    }

    /// The names in directory `d`, sorted bytewise (`.` and `..` left out).
    pub(super) fn list(&mut self, d: &Arc<DirRef>) -> io::Result<Result<Vec<Vec<u8>>, Lost>> {
        #[cfg(test)]
        self.pause(&d.rel);
        let fd = match self.dir(d)? {
            Ok(fd) => fd,
            Err(lost) => return Ok(Err(lost)),
        };
        // A fresh open of `.` through the handle: its own read position, whoever else holds `fd`.
        let entries = match Dir::read_from(&*fd) {
            Ok(entries) => entries,
            Err(Errno::NOENT) => return Ok(Err(Lost::Vanished(d.rel.clone()))),
            Err(e) => return Err(e.into()),
        };
        let mut names = Vec::new();
        for e in entries {
            match e {
                Ok(e) => {
                    let name = e.file_name().to_bytes();
                    if name != b"." && name != b".." {
                        names.push(name.to_vec());
                    }
                }
                Err(Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        names.sort();
        Ok(Ok(names))
    }

    /// The metadata of entry `rel` in directory `d`, not following a symlink.
    pub(super) fn stat(&mut self, d: &Arc<DirRef>, rel: &[u8]) -> io::Result<Result<Meta, Lost>> {
        let fd = match self.dir(d)? {
            Ok(fd) => fd,
            Err(lost) => return Ok(Err(lost)),
        };
        match rustix::fs::statat(&*fd, leaf(rel), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Ok(Meta::from(&st))),
            Err(Errno::NOENT) => Ok(Err(Lost::Vanished(rel.to_vec()))),
            Err(e) => Err(e.into()),
        }
    }

    /// The target of symlink `rel` in directory `d`.
    pub(super) fn read_link(
        &mut self,
        d: &Arc<DirRef>,
        rel: &[u8],
    ) -> io::Result<Result<Vec<u8>, Lost>> {
        let fd = match self.dir(d)? {
            Ok(fd) => fd,
            Err(lost) => return Ok(Err(lost)),
        };
        match rustix::fs::readlinkat(&*fd, leaf(rel), Vec::new()) {
            Ok(target) => Ok(Ok(target.into_bytes())),
            Err(Errno::NOENT) => Ok(Err(Lost::Vanished(rel.to_vec()))),
            // No longer a symlink.
            Err(Errno::INVAL) => Ok(Err(Lost::Replaced(rel.to_vec()))),
            Err(e) => Err(e.into()),
        }
    }

    /// The kept extended attributes of directory `d` (read through its handle), or of the regular
    /// file `rel` in it, provided it is still the inode `listed`; None when it cannot be reached
    /// (the read that follows reports why).
    pub(super) fn xattrs(
        &mut self,
        d: &Arc<DirRef>,
        file: Option<(&[u8], &Meta)>,
    ) -> io::Result<Option<Result<Xattrs, TooBig>>> {
        let Ok(fd) = self.dir(d)? else {
            return Ok(None);
        };
        let Some((rel, listed)) = file else {
            return xattrs::read(&*fd).map(Some);
        };
        let file = match rustix::fs::openat(&*fd, leaf(rel), file_flags(), Mode::empty()) {
            Ok(file) => file,
            Err(Errno::NOENT | Errno::LOOP | Errno::NXIO) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let md = Meta::from(&rustix::fs::fstat(&file)?);
        if md.file_type() != FileType::RegularFile || !md.same_inode(listed.dev, listed.ino) {
            return Ok(None);
        }
        xattrs::read(&file).map(Some)
    }

    /// Opens the regular file `rel` in directory `d` for reading, provided it is still the inode
    /// `listed`; returns it with its metadata as opened.
    pub(super) fn open_file(
        &mut self,
        d: &Arc<DirRef>,
        rel: &[u8],
        listed: &Meta,
    ) -> io::Result<Result<(File, Meta), Lost>> {
        #[cfg(test)]
        self.pause(rel);
        let fd = match self.dir(d)? {
            Ok(fd) => fd,
            Err(lost) => return Ok(Err(lost)),
        };
        let file = match rustix::fs::openat(&*fd, leaf(rel), file_flags(), Mode::empty()) {
            Ok(file) => file,
            Err(Errno::NOENT) => return Ok(Err(Lost::Vanished(rel.to_vec()))),
            // A symlink (O_NOFOLLOW) or a socket in its place; anything else that opens (a
            // directory, a fifo, a device) fails the check below.
            Err(Errno::LOOP | Errno::NXIO) => {
                return Ok(Err(Lost::Replaced(rel.to_vec())));
            }
            Err(e) => return Err(e.into()),
        };
        let md = Meta::from(&rustix::fs::fstat(&file)?);
        if md.file_type() != FileType::RegularFile || !md.same_inode(listed.dev, listed.ino) {
            return Ok(Err(Lost::Replaced(rel.to_vec())));
        }
        Ok(Ok((File::from(file), md)))
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn meta_holds_what_std_metadata_reports() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        fs::write(p.join("f"), b"data").unwrap();
        fs::hard_link(p.join("f"), p.join("h")).unwrap();
        fs::create_dir(p.join("d")).unwrap();
        std::os::unix::fs::symlink("f", p.join("l")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p.join("fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o640),
            0,
        )
        .unwrap();
        let (mut tree, root_md) = Tree::open(p).unwrap();
        let root = Arc::clone(tree.root());
        let std_meta = |md: &fs::Metadata| Meta {
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            size: md.len(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec(),
            ctime: md.ctime(),
            ctime_nsec: md.ctime_nsec(),
            dev: md.dev(),
            ino: md.ino(),
            nlink: md.nlink(),
            rdev: md.rdev(),
            blocks: md.blocks(),
        };
        assert_eq!(root_md, std_meta(&fs::metadata(p).unwrap()));
        for name in ["d", "f", "fifo", "h", "l"] {
            let ours = tree.stat(&root, name.as_bytes()).unwrap().unwrap();
            let std = std_meta(&fs::symlink_metadata(p.join(name)).unwrap());
            assert_eq!(ours, std, "{name}");
        }
        let (mut devs, _) = Tree::open(Path::new("/dev")).unwrap();
        let devs_root = Arc::clone(devs.root());
        let null = devs.stat(&devs_root, b"null").unwrap().unwrap();
        assert_eq!(null, std_meta(&fs::metadata("/dev/null").unwrap()));
        assert_ne!(null.rdev, 0, "a device number to compare");
    }

    #[test]
    fn at_most_held_directory_handles_stay_open() {
        let dir = tempfile::tempdir().unwrap();
        let (mut tree, _) = Tree::open(dir.path()).unwrap();
        let root = Arc::clone(tree.root());
        let mut dirs = Vec::new();
        for i in 0..HELD * 2 {
            let rel = format!("d{i:03}").into_bytes();
            fs::create_dir(dir.path().join(OsStr::from_bytes(&rel))).unwrap();
            let md = tree.stat(&root, &rel).unwrap().unwrap();
            let d = root.child(rel, &md);
            assert_eq!(tree.list(&d).unwrap(), Ok(Vec::new()));
            dirs.push(d);
        }
        assert_eq!(tree.held.len(), HELD);
        // The first directory's handle was closed: it is reopened, and checked again.
        assert_eq!(tree.list(&dirs[0]).unwrap(), Ok(Vec::new()));
        fs::rename(dir.path().join("d001"), dir.path().join("moved")).unwrap();
        fs::create_dir(dir.path().join("d001")).unwrap();
        assert_eq!(
            tree.list(&dirs[1]).unwrap(),
            Err(Lost::Replaced(b"d001".to_vec()))
        );
    }
}
