//! The store archive: a tar stream of one directory tree in segments, each segment one zstd frame,
//! sent as chunks (the segment rules are documented on `ArchiveStoreRequest` in the proto).
//!
//! Invariants:
//! - Nothing is read from outside the store. The root (the allow-listed path, which may itself be
//!   a symlink) is opened once by its path; below it the walk goes by directory handles (module
//!   `tree`) and never opens, stats or reads a path: each directory is opened relative to its
//!   parent's handle with `O_DIRECTORY | O_NOFOLLOW`, each entry stat'ed (`AT_SYMLINK_NOFOLLOW`),
//!   its symlink target read (`readlinkat`) or its data opened (`O_NOFOLLOW`) relative to its
//!   directory's handle. Every directory opened to be listed and every file opened to be read is
//!   checked with `fstat` against the device and inode it was listed with.
//! - A symlink or another inode put in place of a listed directory or file (or of a directory
//!   above it) between listing and reading is never followed nor read: the entry becomes an
//!   `OTHER` trailer warning ("replaced between listing and reading; not followed"), a directory
//!   is not descended, a file is left out before its header is written, and the tar stays valid.
//! - Directory handles held open are bounded (`tree::HELD`), whatever the tree's depth or width.
//!   A directory is opened once, to list it (its attributes are read through that handle), before
//!   its own entry is added to the segment.
//! - Entries are listed in a fixed order (depth first, names sorted bytewise), the root first as
//!   `./`, every other path relative to the root, directories with a trailing `/`.
//! - Segments are cut by the listing alone (never by what reading finds): a file of `BIG_FILE`
//!   bytes or more is a segment by itself; otherwise a segment ends at an entry whose path hashes
//!   to a cut point once it holds `MIN_SEGMENT` tar bytes, or at `MAX_SEGMENT`. An unchanged tree
//!   therefore gives the same segments and fingerprints; a change moves only nearby cuts.
//! - A segment's fingerprint is taken from the listing, before any of its files is read, so a
//!   change made while it is read shows up in the next listing. Segments with entries changed in
//!   the last `VOLATILE` have none and are always sent.
//! - A segment the caller holds (its fingerprint is in `reusable`) is neither read nor sent.
//! - Segments carry no end-of-archive blocks; a last segment holds only those, so the segments
//!   concatenated in order are one valid tar + zstd archive.
//! - Headers are ustar; a pax extended header carries what ustar cannot: paths or link targets longer
//!   than 100 bytes or not UTF-8 (with `hdrcharset=BINARY`), sizes ≥ 8 GiB, ids ≥ 2^21, and
//!   extended attributes (module `xattrs`: `user.*`, `security.capability`, POSIX ACLs, as
//!   `SCHILY.xattr.<name>` records, read when the entry is listed through a handle on it; files and
//!   directories only).
//! - A file whose holes save real space (module `sparse`, found with `SEEK_DATA`/`SEEK_HOLE` on
//!   the opened file; looked for only when its allocated blocks leave room for holes) is an
//!   old-GNU sparse entry (type `S`) holding only its data regions. Every other entry's tar bytes
//!   are what they were before attributes and holes were archived.
//! - A fingerprint hashes an entry's attributes only when it has some, and marks a file whose
//!   allocated blocks leave room for holes: every other entry hashes as it did before, so segments
//!   held from then are still reused, and none held from then stands for an entry now archived
//!   with attributes.
//! - Owners are numeric uid/gid; modes keep setuid/setgid/sticky; mtimes are whole seconds.
//! - Live files: a file's header size is its size when opened, and exactly that many bytes follow.
//!   A file that grows is cut at that size, one that shrinks is padded with zeros; both, and files
//!   that vanish or are replaced between listing and reading, become trailer warnings. The tar
//!   stays valid.
//! - A second path to an inode listed before (nlink > 1) is a hard link entry to the first path.
//! - Sockets are skipped and reported; fifos and device nodes are recorded.

pub(super) mod sparse;
mod tree;
pub(super) mod xattrs;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deis_backup_proto::v1::{
    SegmentEnd, StoreCounts, Trailer, Warning, chunk, warning::Kind as WarningKind,
};
use rustix::fs::FileType;
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use self::sparse::Region;
use self::tree::{DirRef, Lost, Meta, Tree};
use self::xattrs::{TooBig, Xattrs};

use crate::chunks::{ChunkSink, ChunkTx, Counting, compression_context};
use crate::error::{Error, Result};

/// Largest value an ustar octal size field holds (11 octal digits).
const USTAR_MAX_SIZE: u64 = 0o777_7777_7777;
/// Largest value an ustar uid/gid field holds (7 octal digits).
const USTAR_MAX_ID: u64 = 0o777_7777;
/// File contents are read in pieces of this size.
const READ_BUFFER: usize = 1 << 20;
/// Headers and small files are gathered into writes of this size before compression.
const WRITE_BUFFER: usize = 256 << 10;
/// A file at least this big is a segment of its own.
const BIG_FILE: u64 = 8 << 20;
/// A segment ends at a cut point only once it holds this many tar bytes.
const MIN_SEGMENT: u64 = 1 << 20;
/// A segment ends once it holds this many tar bytes, cut point or not.
const MAX_SEGMENT: u64 = 16 << 20;
/// One entry path in this many is a cut point.
const CUT_ONE_IN: u64 = 8;
/// Entries changed this recently may change again within one timestamp tick: their segment gets
/// no fingerprint.
const VOLATILE: Duration = Duration::from_secs(5);
/// Names the rules above and the tar layout: fingerprints from other rules never match.
const FORMAT_TAG: &[u8] = b"deis-backup-agent store segment v1\0";

fn warn(kind: WarningKind, path: &[u8], message: impl Into<String>) -> Warning {
    Warning {
        kind: kind.into(),
        path: String::from_utf8_lossy(path).into_owned(),
        message: message.into(),
    }
}

/// The warning for entry `rel`, which cannot be reached as listed.
fn lost(rel: &[u8], why: Lost) -> Warning {
    let shown = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    match why {
        Lost::Vanished(p) if p == rel => {
            warn(WarningKind::Vanished, rel, "disappeared before it was read")
        }
        Lost::Vanished(p) => warn(
            WarningKind::Vanished,
            rel,
            format!(
                "its directory {}/ disappeared before it was read",
                shown(&p)
            ),
        ),
        Lost::Replaced(p) if p == rel => warn(
            WarningKind::Other,
            rel,
            "replaced between listing and reading; not followed",
        ),
        Lost::Replaced(p) => warn(
            WarningKind::Other,
            rel,
            format!(
                "its directory {}/ was replaced between listing and reading; not followed",
                shown(&p)
            ),
        ),
    }
}

/// What a listed entry becomes in the tar.
#[derive(Debug)]
enum Kind {
    Dir,
    File,
    Symlink(Vec<u8>),
    /// A further path to an inode listed before: a hard link to that first path.
    HardLink(Vec<u8>),
    Special(EntryType),
}

/// One listed entry: its metadata as listed, before anything is read.
#[derive(Debug)]
struct Listed {
    /// The directory it was listed in (the root lists itself).
    dir: Arc<DirRef>,
    /// The tar name (`./` for the root, a trailing `/` for directories).
    name: Vec<u8>,
    md: Meta,
    kind: Kind,
    /// Its kept extended attributes, read when listed (directories and files only); None when it
    /// has none.
    xattrs: Option<Box<Xattrs>>,
}

impl Listed {
    /// The tar bytes this entry takes at most (header plus padded data; pax headers left out).
    fn tar_bytes(&self) -> u64 {
        let data = match self.kind {
            Kind::File => self.md.size.div_ceil(512) * 512,
            _ => 0,
        };
        let pax = self.xattrs.as_ref().map_or(0, |x| {
            512 + (xattrs::records_len(&x.pax()) as u64).div_ceil(512) * 512
        });
        512 + data + pax
    }

    fn hash_into(&self, h: &mut Sha256) {
        let md = &self.md;
        h.update((self.name.len() as u64).to_le_bytes());
        h.update(&self.name);
        let (tag, extra): (u8, &[u8]) = match &self.kind {
            Kind::Dir => (b'd', b""),
            Kind::File => (b'f', b""),
            Kind::Symlink(t) => (b'l', t),
            Kind::HardLink(t) => (b'h', t),
            Kind::Special(_) => (b's', b""),
        };
        h.update([tag]);
        h.update((extra.len() as u64).to_le_bytes());
        h.update(extra);
        for v in [
            u64::from(md.mode),
            u64::from(md.uid),
            u64::from(md.gid),
            md.size,
            md.mtime.cast_unsigned(),
            md.mtime_nsec.cast_unsigned(),
            md.ctime.cast_unsigned(),
            md.ctime_nsec.cast_unsigned(),
            md.dev,
            md.ino,
            md.nlink,
            md.rdev,
        ] {
            h.update(v.to_le_bytes());
        }
        // Only entries with attributes, or files that may be sparse, hash more than they did
        // before those were archived: every other fingerprint stays what it was.
        if let Some(x) = &self.xattrs {
            h.update(b"xattrs");
            h.update((x.0.len() as u64).to_le_bytes());
            for (name, value) in &x.0 {
                h.update((name.len() as u64).to_le_bytes());
                h.update(name);
                h.update((value.len() as u64).to_le_bytes());
                h.update(value);
            }
        }
        if matches!(self.kind, Kind::File) && sparse::maybe(md.size, md.blocks) {
            h.update(b"sparse");
        }
    }

    /// Whether the entry changed so recently (or, by its clock, in the future) that it may change
    /// again without its timestamps moving.
    fn volatile(&self, now: SystemTime, window: Duration) -> bool {
        let recent = |secs: i64, nanos: i64| {
            let t = UNIX_EPOCH
                + Duration::from_secs(secs.max(0).cast_unsigned())
                + Duration::from_nanos(nanos.max(0).cast_unsigned());
            now.duration_since(t).map_or(true, |age| age < window)
        };
        recent(self.md.ctime, self.md.ctime_nsec) || recent(self.md.mtime, self.md.mtime_nsec)
    }
}

/// Whether `name` is a cut point (FNV-1a of the path).
fn cut_point(name: &[u8]) -> bool {
    let h = name.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    h % CUT_ONE_IN == 0
}

/// Reads exactly `left` bytes: the file's own, then zeros if it ended early.
struct Live {
    file: File,
    left: u64,
    padded: u64,
}

impl Read for Live {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = if self.padded == 0 {
            self.file.read(&mut buf[..want])?
        } else {
            0
        };
        if n > 0 {
            self.left -= n as u64;
            return Ok(n);
        }
        buf[..want].fill(0);
        self.left -= want as u64;
        self.padded += want as u64;
        Ok(want)
    }
}

/// Reads the data regions of a sparse file one after another, exactly their lengths added up: the
/// file's own bytes, zeros where it ended early.
struct SparseLive {
    file: File,
    regions: Vec<Region>,
    /// The region being read and the bytes of it done.
    at: usize,
    done: u64,
    padded: u64,
}

impl Read for SparseLive {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(r) = self.regions.get(self.at) else {
                return Ok(0);
            };
            if self.done == r.len {
                self.at += 1;
                self.done = 0;
                continue;
            }
            let want = usize::try_from(r.len - self.done)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            if want == 0 {
                return Ok(0);
            }
            let n = if self.padded == 0 {
                self.file.read_at(&mut buf[..want], r.offset + self.done)?
            } else {
                0
            };
            let n = if n == 0 {
                buf[..want].fill(0);
                self.padded += want as u64;
                want
            } else {
                n
            };
            self.done += n as u64;
            return Ok(n);
        }
    }
}

/// Pax records: keys and values.
type Pax = Vec<(Cow<'static, [u8]>, Vec<u8>)>;

fn key(k: &'static str) -> Cow<'static, [u8]> {
    Cow::Borrowed(k.as_bytes())
}

/// A pax extended header's data: `"<len> <key>=<value>\n"` records.
fn pax_records(records: &[(Cow<'static, [u8]>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        // " key=value\n" plus the decimal length, which counts its own digits.
        let rest = key.len() + value.len() + 3;
        let mut len = rest + 1;
        while rest + len.to_string().len() != len {
            len = rest + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} ").as_bytes());
        out.extend_from_slice(key);
        out.push(b'=');
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

/// A header for an entry listed with `md`: ustar, or old GNU for a sparse file (`gnu`).
fn header(md: &Meta, kind: EntryType, size: u64, gnu: bool, pax: &mut Pax) -> Header {
    let mut h = if gnu {
        Header::new_gnu()
    } else {
        Header::new_ustar()
    };
    h.set_entry_type(kind);
    h.set_mode(md.mode & 0o7777);
    let (uid, gid) = (u64::from(md.uid), u64::from(md.gid));
    h.set_uid(uid);
    h.set_gid(gid);
    if uid > USTAR_MAX_ID {
        pax.push((key("uid"), uid.to_string().into_bytes()));
    }
    if gid > USTAR_MAX_ID {
        pax.push((key("gid"), gid.to_string().into_bytes()));
    }
    h.set_mtime(u64::try_from(md.mtime).unwrap_or(0));
    h.set_size(size);
    if size > USTAR_MAX_SIZE {
        pax.push((key("size"), size.to_string().into_bytes()));
    }
    h
}

/// Writes `bytes` and the zeros that pad it to a 512-byte block.
fn write_padded(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    out.write_all(bytes)?;
    let pad = (512 - bytes.len() % 512) % 512;
    out.write_all(&[0u8; 512][..pad])
}

/// Writes `h` named `name` (and linking to `link`), with a pax header first where needed, then the
/// blocks `ext` (a sparse header's extensions), then the entry's data in large reads and writes of
/// `buf`.
#[allow(clippy::too_many_arguments)]
fn append(
    out: &mut impl Write,
    buf: &mut [u8],
    mut h: Header,
    ext: &[u8],
    name: &[u8],
    link: Option<&[u8]>,
    mut pax: Pax,
    data: &mut dyn Read,
) -> io::Result<()> {
    let mut binary = false;
    for (k, value) in [("path", Some(name)), ("linkpath", link)] {
        let Some(value) = value else { continue };
        let utf8 = std::str::from_utf8(value).is_ok();
        if value.len() > 100 || !utf8 {
            binary |= !utf8;
            pax.push((key(k), value.to_vec()));
        }
    }
    if binary {
        pax.insert(0, (key("hdrcharset"), b"BINARY".to_vec()));
    }
    if !pax.is_empty() {
        let records = pax_records(&pax);
        let mut ph = Header::new_ustar();
        ph.set_entry_type(EntryType::XHeader);
        let pax_name = b"././@PaxHeader";
        ph.as_old_mut().name[..pax_name.len()].copy_from_slice(pax_name);
        ph.set_mode(0o644);
        ph.set_uid(0);
        ph.set_gid(0);
        ph.set_mtime(0);
        ph.set_size(records.len() as u64);
        ph.set_cksum();
        out.write_all(ph.as_bytes())?;
        write_padded(out, &records)?;
    }
    let old = h.as_old_mut();
    let n = name.len().min(100);
    old.name[..n].copy_from_slice(&name[..n]);
    if let Some(link) = link {
        let n = link.len().min(100);
        old.linkname[..n].copy_from_slice(&link[..n]);
    }
    h.set_cksum();
    out.write_all(h.as_bytes())?;
    out.write_all(ext)?;
    let mut len = 0u64;
    loop {
        let n = match data.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        len += n as u64;
    }
    let pad = (512 - len % 512) % 512;
    out.write_all(&[0u8; 512][..usize::try_from(pad).unwrap_or(0)])
}

/// Adds the pax records of `e`'s extended attributes (none for an entry without).
fn push_xattrs(pax: &mut Pax, e: &Listed) {
    if let Some(x) = &e.xattrs {
        pax.extend(x.pax().into_iter().map(|(k, v)| (Cow::Owned(k), v)));
    }
}

/// Turns listed segments into segment frames (or reuse notices) on the caller's stream.
struct Segments {
    /// The store tree: every file is opened through it.
    tree: Tree,
    sink: Option<ChunkSink>,
    /// One compression context for every segment: its worker threads and buffers are set up once.
    cctx: Option<zstd::zstd_safe::CCtx<'static>>,
    reusable: HashSet<Vec<u8>>,
    counts: StoreCounts,
    warnings: Vec<Warning>,
    /// Tar bytes of the segments sent.
    raw: u64,
    sent_or_reused: u64,
    reused: u64,
    /// First paths of multi-link inodes that vanished before they were read -> the path that holds
    /// the inode's data instead (once one of its other links was archived as a file).
    lost_links: HashMap<Vec<u8>, Option<Vec<u8>>>,
    buf: Vec<u8>,
}

impl Segments {
    fn sink(&mut self) -> &mut ChunkSink {
        self.sink
            .as_mut()
            .expect("the sink is back between segments")
    }

    fn count_listed(&mut self, e: &Listed) {
        let c = &mut self.counts;
        match e.kind {
            Kind::Dir => c.dirs += 1,
            Kind::File => {
                c.files += 1;
                c.file_bytes += e.md.size;
            }
            Kind::Symlink(_) => c.symlinks += 1,
            Kind::HardLink(_) => c.hardlinks += 1,
            Kind::Special(_) => c.special += 1,
        }
    }

    /// Sends one segment: `entries`, then (for the last segment) the end-of-archive blocks.
    fn emit(
        &mut self,
        entries: &[Listed],
        fingerprint: Option<[u8; 32]>,
        end: bool,
    ) -> io::Result<()> {
        self.sent_or_reused += 1;
        let fp = fingerprint.map(|f| f.to_vec()).unwrap_or_default();
        if !fp.is_empty() && self.reusable.contains(&fp) {
            for e in entries {
                self.count_listed(e);
            }
            self.reused += 1;
            return self.sink().send(chunk::Kind::SegmentEnd(SegmentEnd {
                fingerprint: fp,
                reused: true,
                ..SegmentEnd::default()
            }));
        }
        let sink = self.sink.take().expect("the sink is back between segments");
        let mut cctx = self
            .cctx
            .take()
            .expect("the context is back between segments");
        let enc = zstd::Encoder::with_context(sink, &mut cctx);
        let mut w = BufWriter::with_capacity(WRITE_BUFFER, Counting::new(enc));
        for e in entries {
            self.entry(&mut w, e)?;
        }
        if end {
            w.write_all(&[0u8; 1024])?;
        }
        let Counting {
            inner: enc,
            count: raw_bytes,
        } = w.into_inner().map_err(io::IntoInnerError::into_error)?;
        self.raw += raw_bytes;
        let mut sink = enc.finish()?;
        self.cctx = Some(cctx);
        let (compressed, sha) = sink.end_segment()?;
        sink.send(chunk::Kind::SegmentEnd(SegmentEnd {
            fingerprint: fp,
            reused: false,
            compressed_bytes: compressed,
            sha256: sha.to_vec(),
            raw_bytes,
        }))?;
        self.sink = Some(sink);
        Ok(())
    }

    fn entry(&mut self, out: &mut impl Write, e: &Listed) -> io::Result<()> {
        let mut pax = Vec::new();
        let md = &e.md;
        match &e.kind {
            Kind::Dir => {
                let h = header(md, EntryType::Directory, 0, false, &mut pax);
                push_xattrs(&mut pax, e);
                self.counts.dirs += 1;
                append(
                    out,
                    &mut self.buf,
                    h,
                    &[],
                    &e.name,
                    None,
                    pax,
                    &mut io::empty(),
                )
            }
            Kind::Symlink(target) => {
                let h = header(md, EntryType::Symlink, 0, false, &mut pax);
                self.counts.symlinks += 1;
                append(
                    out,
                    &mut self.buf,
                    h,
                    &[],
                    &e.name,
                    Some(target),
                    pax,
                    &mut io::empty(),
                )
            }
            Kind::Special(kind) => {
                let mut h = header(md, *kind, 0, false, &mut pax);
                if *kind != EntryType::Fifo {
                    h.set_device_major(rustix::fs::major(md.rdev))?;
                    h.set_device_minor(rustix::fs::minor(md.rdev))?;
                }
                self.counts.special += 1;
                append(
                    out,
                    &mut self.buf,
                    h,
                    &[],
                    &e.name,
                    None,
                    pax,
                    &mut io::empty(),
                )
            }
            Kind::HardLink(first) => match self.lost_links.get(first).cloned() {
                // The first path vanished: this path carries the data, later links point here.
                Some(None) => {
                    if self.file(out, e)? {
                        self.lost_links.insert(first.clone(), Some(e.name.clone()));
                    }
                    Ok(())
                }
                // A link to the path that holds the data: the first one, or the one standing in.
                found => {
                    let target = found.flatten().unwrap_or_else(|| first.clone());
                    let h = header(md, EntryType::Link, 0, false, &mut pax);
                    self.counts.hardlinks += 1;
                    append(
                        out,
                        &mut self.buf,
                        h,
                        &[],
                        &e.name,
                        Some(&target),
                        pax,
                        &mut io::empty(),
                    )
                }
            },
            Kind::File => {
                if !self.file(out, e)? && md.nlink > 1 {
                    self.lost_links.insert(e.name.clone(), None);
                }
                Ok(())
            }
        }
    }

    /// Archives a regular file as it is when opened; false when it is gone or no longer the
    /// inode listed.
    fn file(&mut self, out: &mut impl Write, e: &Listed) -> io::Result<bool> {
        let rel = &e.name;
        // The opened file's own metadata: its size may have changed since it was listed.
        let (file, md) = match self.tree.open_file(&e.dir, rel, &e.md)? {
            Ok(opened) => opened,
            Err(l) => {
                self.warnings.push(lost(rel, l));
                return Ok(false);
            }
        };
        let mut pax = Vec::new();
        let size = md.size;
        // Holes are looked for only where the blocks allocated leave room for them.
        let regions = if sparse::maybe(size, md.blocks) {
            sparse::map(&file, size)?
        } else {
            None
        };
        let (file, stored, padded) = if let Some(regions) = regions {
            let stored = sparse::stored(&regions);
            let mut h = header(&md, EntryType::GNUSparse, stored, true, &mut pax);
            let ext = sparse::fill_header(&mut h, size, &regions);
            push_xattrs(&mut pax, e);
            let mut live = SparseLive {
                file,
                regions,
                at: 0,
                done: 0,
                padded: 0,
            };
            append(out, &mut self.buf, h, &ext, rel, None, pax, &mut live)?;
            (live.file, stored, live.padded)
        } else {
            let h = header(&md, EntryType::Regular, size, false, &mut pax);
            push_xattrs(&mut pax, e);
            let mut live = Live {
                file,
                left: size,
                padded: 0,
            };
            append(out, &mut self.buf, h, &[], rel, None, pax, &mut live)?;
            (live.file, size, live.padded)
        };
        self.counts.files += 1;
        self.counts.file_bytes += size;
        if padded > 0 {
            self.warnings.push(warn(
                WarningKind::FileShrank,
                rel,
                format!(
                    "shrank while read: {} of {stored} bytes read, the rest padded with zeros",
                    stored - padded
                ),
            ));
        } else if let Ok(now) = file.metadata()
            && now.len() > size
        {
            self.warnings.push(warn(
                WarningKind::FileGrew,
                rel,
                format!(
                    "grew from {size} to {} bytes while read; archived the first {size}",
                    now.len()
                ),
            ));
        }
        Ok(true)
    }
}

/// The fingerprint of a segment holding `entries` (as listed).
fn fingerprint(entries: &[Listed]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(FORMAT_TAG);
    for e in entries {
        e.hash_into(&mut h);
    }
    <[u8; 32]>::from(h.finalize())
}

/// Lists the tree depth first and cuts it into segments (see the module invariants).
struct Lister<'a> {
    out: &'a mut Segments,
    /// (dev, inode) of files with several links -> the tar name of the first one listed.
    links: HashMap<(u64, u64), Vec<u8>>,
    segment: Vec<Listed>,
    segment_bytes: u64,
    volatile: Duration,
}

/// Entries in one segment at most (bounds the listing held in memory).
const MAX_ENTRIES: usize = 8192;

impl Lister<'_> {
    fn flush(&mut self) -> io::Result<()> {
        if self.segment.is_empty() {
            return Ok(());
        }
        let now = SystemTime::now();
        let fingerprint = (!self.segment.iter().any(|e| e.volatile(now, self.volatile)))
            .then(|| fingerprint(&self.segment));
        let entries = std::mem::take(&mut self.segment);
        self.segment_bytes = 0;
        self.out.emit(&entries, fingerprint, false)
    }

    fn add(&mut self, e: Listed) -> io::Result<()> {
        let big = matches!(e.kind, Kind::File) && e.md.size >= BIG_FILE;
        if big {
            self.flush()?;
        }
        let cut = cut_point(&e.name);
        self.segment_bytes += e.tar_bytes();
        self.segment.push(e);
        if big
            || self.segment_bytes >= MAX_SEGMENT
            || self.segment.len() >= MAX_ENTRIES
            || (cut && self.segment_bytes >= MIN_SEGMENT)
        {
            self.flush()?;
        }
        Ok(())
    }

    /// What `rel` in `dir` (listed with `md`) becomes, or None (with a warning) when it cannot be
    /// archived.
    fn classify(&mut self, dir: &Arc<DirRef>, rel: &[u8], md: &Meta) -> io::Result<Option<Kind>> {
        Ok(Some(match md.file_type() {
            FileType::Directory => Kind::Dir,
            FileType::Symlink => match self.out.tree.read_link(dir, rel)? {
                Ok(target) => Kind::Symlink(target),
                Err(l) => {
                    self.out.warnings.push(lost(rel, l));
                    return Ok(None);
                }
            },
            FileType::Socket => {
                self.out.warnings.push(warn(
                    WarningKind::SocketSkipped,
                    rel,
                    "a socket cannot be archived; skipped",
                ));
                return Ok(None);
            }
            FileType::Fifo => Kind::Special(EntryType::Fifo),
            FileType::CharacterDevice => Kind::Special(EntryType::Char),
            FileType::BlockDevice => Kind::Special(EntryType::Block),
            _ if md.nlink > 1 => {
                if let Some(first) = self.links.get(&(md.dev, md.ino)) {
                    Kind::HardLink(first.clone())
                } else {
                    self.links.insert((md.dev, md.ino), rel.to_vec());
                    Kind::File
                }
            }
            _ => Kind::File,
        }))
    }

    /// Lists the tree below the root (listed with `md`); `root` is its path, for errors only.
    fn walk(&mut self, root: &Path, md: Meta) -> Result<()> {
        let io_err = |rel: &[u8]| Error::io("archiving", root.join(OsStr::from_bytes(rel)));
        let top = Arc::clone(self.out.tree.root());
        let xattrs = self.xattrs(&top, None, b"").map_err(io_err(b""))?;
        self.add(Listed {
            dir: Arc::clone(&top),
            name: b"./".to_vec(),
            md,
            kind: Kind::Dir,
            xattrs,
        })
        .map_err(io_err(b""))?;
        // Pre-order depth-first walk; children pushed in reverse so they pop in sorted order.
        let mut stack: Vec<(Arc<DirRef>, Vec<u8>)> = Vec::new();
        self.push_children(&top, &mut stack).map_err(io_err(b""))?;
        while let Some((dir, rel)) = stack.pop() {
            let md = match self.out.tree.stat(&dir, &rel).map_err(io_err(&rel))? {
                Ok(md) => md,
                Err(l) => {
                    self.out.warnings.push(lost(&rel, l));
                    continue;
                }
            };
            let Some(kind) = self.classify(&dir, &rel, &md).map_err(io_err(&rel))? else {
                continue;
            };
            let sub = matches!(kind, Kind::Dir).then(|| dir.child(rel.clone(), &md));
            // A directory is opened once, to list it; its attributes are read through that handle.
            if let Some(sub) = &sub {
                self.push_children(sub, &mut stack).map_err(io_err(&rel))?;
            }
            let mut name = rel.clone();
            let xattrs = match (&kind, &sub) {
                (Kind::Dir, Some(sub)) => {
                    name.push(b'/');
                    self.xattrs(sub, None, &rel)
                }
                (Kind::File, _) => self.xattrs(&dir, Some((&rel, &md)), &rel),
                _ => Ok(None),
            }
            .map_err(io_err(&rel))?;
            self.add(Listed {
                dir: Arc::clone(&dir),
                name,
                md,
                kind,
                xattrs,
            })
            .map_err(io_err(&rel))?;
        }
        self.flush().map_err(io_err(b""))
    }

    /// The kept extended attributes of directory `d`, or of file `file` in it (as listed): None
    /// when there are none, or more than are kept (with a warning), or it cannot be reached (the
    /// read that follows reports why).
    fn xattrs(
        &mut self,
        d: &Arc<DirRef>,
        file: Option<(&[u8], &Meta)>,
        rel: &[u8],
    ) -> io::Result<Option<Box<Xattrs>>> {
        Ok(match self.out.tree.xattrs(d, file)? {
            Some(Ok(x)) if !x.0.is_empty() => {
                for name in x.unwritable() {
                    self.out.warnings.push(warn(
                        WarningKind::Other,
                        rel,
                        format!(
                            "extended attribute {} holds a newline, which the restore cannot \
                             read; not archived",
                            String::from_utf8_lossy(name)
                        ),
                    ));
                }
                Some(Box::new(x))
            }
            Some(Err(TooBig(n))) => {
                self.out.warnings.push(warn(
                    WarningKind::Other,
                    rel,
                    format!(
                        "extended attributes take {n} bytes, over the {} kept for one entry; none \
                         archived",
                        xattrs::MAX_BYTES
                    ),
                ));
                None
            }
            _ => None,
        })
    }

    /// Pushes the entries of `dir` (opened as the inode listed, never through a symlink).
    fn push_children(
        &mut self,
        dir: &Arc<DirRef>,
        stack: &mut Vec<(Arc<DirRef>, Vec<u8>)>,
    ) -> io::Result<()> {
        let rel = dir.rel();
        let names = match self.out.tree.list(dir)? {
            Ok(names) => names,
            Err(Lost::Vanished(p)) if p == rel => {
                self.out.warnings.push(warn(
                    WarningKind::Vanished,
                    rel,
                    "directory disappeared while listed",
                ));
                return Ok(());
            }
            Err(l) => {
                self.out.warnings.push(lost(rel, l));
                return Ok(());
            }
        };
        for name in names.into_iter().rev() {
            let mut r = rel.to_vec();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(&name);
            stack.push((Arc::clone(dir), r));
        }
        Ok(())
    }
}

/// How to archive.
#[derive(Debug, Clone)]
pub struct Options {
    pub level: i32,
    /// zstd worker threads besides the caller's.
    pub workers: u32,
    /// Fingerprints of segments the caller holds.
    pub reusable: HashSet<Vec<u8>>,
    /// Entries changed this recently make their segment volatile (no fingerprint).
    pub volatile: Duration,
    /// Tests change the tree here, between listing an entry and reading it.
    #[cfg(test)]
    pause: Option<tree::Pause>,
}

impl Options {
    pub fn new(level: i32, workers: u32, reusable: HashSet<Vec<u8>>) -> Self {
        Self {
            level,
            workers,
            reusable,
            volatile: VOLATILE,
            #[cfg(test)]
            pause: None,
        }
    }
}

/// Archives the directory `root` as tar + zstd segments on `tx` (blocking), leaving out the
/// segments the caller holds; returns the trailer.
pub fn archive(root: &Path, opts: Options, tx: ChunkTx) -> Result<Trailer> {
    let start = Instant::now();
    let failed = |e: io::Error| {
        if e.kind() == io::ErrorKind::BrokenPipe {
            Error::Cancelled
        } else {
            Error::Io {
                op: "compressing the archive of",
                path: root.to_path_buf(),
                source: e,
            }
        }
    };
    // The root itself may be a symlink to the store (followed); nothing below it is.
    let (tree, root_md) = Tree::open(root).map_err(|e| {
        if e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) {
            Error::Config {
                what: format!("store path {} is not a directory", root.display()),
            }
        } else {
            Error::io("cannot read", root)(e)
        }
    })?;
    let mut out = Segments {
        tree,
        sink: Some(ChunkSink::new(tx)),
        cctx: Some(compression_context(opts.level, opts.workers).map_err(failed)?),
        reusable: opts.reusable,
        counts: StoreCounts::default(),
        warnings: Vec::new(),
        raw: 0,
        sent_or_reused: 0,
        reused: 0,
        lost_links: HashMap::new(),
        buf: vec![0; READ_BUFFER],
    };
    #[cfg(test)]
    {
        out.tree.pause = opts.pause;
    }
    let mut lister = Lister {
        out: &mut out,
        links: HashMap::new(),
        segment: Vec::new(),
        segment_bytes: 0,
        volatile: opts.volatile,
    };
    lister.walk(root, root_md).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == io::ErrorKind::BrokenPipe => Error::Cancelled,
        e => e,
    })?;
    let end = <[u8; 32]>::from(
        Sha256::new()
            .chain_update(FORMAT_TAG)
            .chain_update(b"end")
            .finalize(),
    );
    out.emit(&[], Some(end), true).map_err(failed)?;
    let sent = out.sink().total();
    for warning in &out.warnings {
        tracing::info!(path = %warning.path, message = %warning.message, "archive warning");
    }
    Ok(Trailer {
        raw_bytes: out.raw,
        compressed_bytes: sent,
        sha256: Vec::new(),
        duration_ms: deis_backup_proto::duration_ms(start.elapsed()),
        warnings: out.warnings,
        store: Some(out.counts),
        segments: out.sent_or_reused,
        reused_segments: out.reused,
        ..Trailer::default()
    })
}

#[cfg(test)]
pub(super) mod tests {
    use std::fs;
    use std::io::Read;
    use std::path::PathBuf;
    use std::sync::Mutex;

    use deis_backup_proto::v1::Chunk;
    use tokio::sync::mpsc;

    use super::*;

    /// Incompressible bytes (xorshift), so compressed output flows while a file is read.
    fn noise(n: usize, mut x: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    const BIG: usize = 8 << 20;

    /// Archives `dir` (a 8 MiB file `a`, a small `z`), running `change` once a full chunk of `a` is
    /// out, i.e. while `a` is being read and before `z` is reached; returns the archive and trailer.
    fn archive_while(dir: &Path, change: impl FnOnce()) -> (Vec<u8>, Trailer) {
        let (tx, mut rx) = mpsc::channel::<Result<Chunk, tonic::Status>>(1);
        let root = dir.to_path_buf();
        let walker =
            std::thread::spawn(move || archive(&root, Options::new(3, 0, HashSet::new()), tx));
        let mut data = Vec::new();
        let mut change = Some(change);
        while let Some(c) = rx.blocking_recv() {
            if let Some(chunk::Kind::Data(d)) = c.unwrap().kind {
                // A full chunk of incompressible bytes: `a` is being read.
                let reading_a = d.len() == crate::chunks::CHUNK_BYTES;
                data.extend(d);
                if reading_a && let Some(f) = change.take() {
                    f();
                }
            }
        }
        (data, walker.join().unwrap().unwrap())
    }

    fn entries(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut tar = tar::Archive::new(zstd::Decoder::new(archive).unwrap());
        tar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
                let mut body = Vec::new();
                e.read_to_end(&mut body).unwrap();
                (name, body)
            })
            .collect()
    }

    fn kinds(t: &Trailer) -> Vec<(WarningKind, String)> {
        t.warnings
            .iter()
            .map(|w| (w.kind(), w.path.clone()))
            .collect()
    }

    #[test]
    fn a_growing_file_is_cut_and_a_vanished_one_reported() {
        let dir = tempfile::tempdir().unwrap();
        let a = noise(BIG, 1);
        fs::write(dir.path().join("a"), &a).unwrap();
        fs::write(dir.path().join("z"), b"soon gone").unwrap();
        let (archive, trailer) = archive_while(dir.path(), || {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(dir.path().join("a"))
                .unwrap();
            f.write_all(&noise(1 << 20, 2)).unwrap();
            fs::remove_file(dir.path().join("z")).unwrap();
        });
        assert_eq!(
            kinds(&trailer),
            [
                (WarningKind::FileGrew, "a".into()),
                (WarningKind::Vanished, "z".into())
            ]
        );
        let e = entries(&archive);
        assert_eq!(
            e.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["./", "a"]
        );
        assert_eq!(e[1].1, a, "the archive holds the size the header announced");
        assert_eq!(trailer.store.unwrap().file_bytes, BIG as u64);
    }

    #[test]
    fn a_shrinking_file_is_padded_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), noise(BIG, 3)).unwrap();
        fs::write(dir.path().join("z"), b"stays").unwrap();
        let (archive, trailer) = archive_while(dir.path(), || {
            fs::OpenOptions::new()
                .write(true)
                .open(dir.path().join("a"))
                .unwrap()
                .set_len(0)
                .unwrap();
        });
        assert_eq!(kinds(&trailer), [(WarningKind::FileShrank, "a".into())]);
        let e = entries(&archive);
        assert_eq!(e.len(), 3, "the archive stays a valid tar with every entry");
        assert_eq!(e[1].1.len(), BIG);
        assert!(e[1].1.ends_with(&[0u8; 4096]), "padded with zeros");
        assert_eq!(e[2], ("z".to_owned(), b"stays".to_vec()));
    }

    #[test]
    fn long_and_non_utf8_names_sockets_and_fifos() {
        let dir = tempfile::tempdir().unwrap();
        let long = "d".repeat(120);
        fs::create_dir(dir.path().join(&long)).unwrap();
        fs::write(dir.path().join(&long).join("f"), b"x").unwrap();
        let odd = std::ffi::OsStr::from_bytes(b"caf\xe9");
        fs::write(dir.path().join(odd), b"latin-1").unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o640),
            0,
        )
        .unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).unwrap();
        let (archive, trailer) = archive_while(dir.path(), || {});
        assert_eq!(
            kinds(&trailer),
            [(WarningKind::SocketSkipped, "sock".into())]
        );
        let names: Vec<Vec<u8>> = {
            let mut tar = tar::Archive::new(zstd::Decoder::new(&archive[..]).unwrap());
            tar.entries()
                .unwrap()
                .map(|e| e.unwrap().path_bytes().into_owned())
                .collect()
        };
        assert!(
            names.contains(&format!("{long}/f").into_bytes()),
            "{names:?}"
        );
        assert!(names.contains(&b"caf\xe9".to_vec()), "{names:?}");
        assert!(names.contains(&b"fifo".to_vec()), "{names:?}");
        let counts = trailer.store.unwrap();
        assert_eq!((counts.files, counts.dirs, counts.special), (2, 2, 1));
    }

    /// One segment as the caller saw it: (fingerprint, reused, data).
    type Sent = (Vec<u8>, bool, Vec<u8>);

    /// The segments of one archive run.
    fn segments(dir: &Path, reusable: &HashSet<Vec<u8>>) -> (Vec<Sent>, Trailer) {
        let (tx, mut rx) = mpsc::channel::<Result<Chunk, tonic::Status>>(4);
        let root = dir.to_path_buf();
        let opts = Options {
            volatile: Duration::ZERO,
            ..Options::new(3, 0, reusable.clone())
        };
        let walker = std::thread::spawn(move || archive(&root, opts, tx));
        let mut out = Vec::new();
        let mut data = Vec::new();
        while let Some(c) = rx.blocking_recv() {
            match c.unwrap().kind {
                Some(chunk::Kind::Data(d)) => data.extend(d),
                Some(chunk::Kind::SegmentEnd(end)) => {
                    let piece = std::mem::take(&mut data);
                    if end.reused {
                        assert!(piece.is_empty(), "no data for a reused segment");
                    } else {
                        assert_eq!(end.compressed_bytes, piece.len() as u64);
                        assert_eq!(end.sha256, Sha256::digest(&piece).to_vec());
                    }
                    out.push((end.fingerprint, end.reused, piece));
                }
                _ => {}
            }
        }
        (out, walker.join().unwrap().unwrap())
    }

    #[test]
    fn an_unchanged_tree_is_reused_and_a_change_resends_only_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        // Two big files (a segment each) and many small ones around them.
        for i in 0..300 {
            fs::write(
                dir.path().join(format!("small-{i:03}")),
                noise(8 << 10, i + 10),
            )
            .unwrap();
        }
        fs::write(
            dir.path().join("big-a"),
            noise(usize::try_from(BIG_FILE).unwrap(), 4),
        )
        .unwrap();
        fs::write(
            dir.path().join("big-b"),
            noise(usize::try_from(BIG_FILE).unwrap(), 5),
        )
        .unwrap();
        let (first, t1) = segments(dir.path(), &HashSet::new());
        assert!(first.len() >= 4, "several segments: {}", first.len());
        assert_eq!(t1.reused_segments, 0);
        assert_eq!(t1.segments, first.len() as u64);
        assert!(
            first
                .iter()
                .all(|(fp, reused, _)| fp.len() == 32 && !reused)
        );
        // The segments concatenated are one archive with every entry.
        let whole: Vec<u8> = first.iter().flat_map(|(_, _, d)| d.clone()).collect();
        assert_eq!(entries(&whole).len(), 303);

        let held: HashSet<Vec<u8>> = first.iter().map(|(fp, _, _)| fp.clone()).collect();
        let (second, t2) = segments(dir.path(), &held);
        assert_eq!(
            t2.reused_segments, t2.segments,
            "nothing changed: every segment reused"
        );
        assert_eq!(t2.compressed_bytes, 0);
        assert_eq!(
            t2.store.unwrap(),
            t1.store.unwrap(),
            "counts cover reused segments"
        );
        assert_eq!(
            second.iter().map(|(fp, _, _)| fp).collect::<Vec<_>>(),
            first.iter().map(|(fp, _, _)| fp).collect::<Vec<_>>()
        );

        // One small file changes: its segment is sent again, and at most the next one (its size
        // moved the next cut); the big files' segments are reused.
        fs::write(dir.path().join("small-150"), b"changed").unwrap();
        let (third, t3) = segments(dir.path(), &held);
        let sent = t3.segments - t3.reused_segments;
        assert!(
            (1..=2).contains(&sent),
            "{sent} of {} segments sent",
            t3.segments
        );
        assert!(
            t3.compressed_bytes < 2 * MAX_SEGMENT,
            "{}",
            t3.compressed_bytes
        );
        // Reused segments from the first run plus the new one still make the whole archive.
        let mut whole = Vec::new();
        for (i, (fp, reused, data)) in third.iter().enumerate() {
            if *reused {
                let (_, _, d) = first.iter().find(|(f, _, _)| f == fp).unwrap();
                whole.extend(d);
            } else {
                assert_ne!(Some(fp), first.get(i).map(|(f, _, _)| f));
                whole.extend(data);
            }
        }
        let e = entries(&whole);
        assert_eq!(e.len(), 303);
        assert!(e.contains(&("small-150".to_owned(), b"changed".to_vec())));
    }

    #[test]
    fn recently_changed_entries_give_no_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("fresh"), b"now").unwrap();
        let (tx, mut rx) = mpsc::channel::<Result<Chunk, tonic::Status>>(4);
        let root = dir.path().to_path_buf();
        let walker =
            std::thread::spawn(move || archive(&root, Options::new(3, 0, HashSet::new()), tx));
        let mut ends = Vec::new();
        while let Some(c) = rx.blocking_recv() {
            if let Some(chunk::Kind::SegmentEnd(end)) = c.unwrap().kind {
                ends.push(end);
            }
        }
        walker.join().unwrap().unwrap();
        assert_eq!(ends.len(), 2, "the tree, then the end-of-archive segment");
        assert!(
            ends[0].fingerprint.is_empty(),
            "a file written just now may still change"
        );
        assert_eq!(ends[1].fingerprint.len(), 32);
    }

    /// Stands for `/etc/shadow`: content outside the store that no archive may hold.
    const SECRET: &[u8] = b"root:$6$outside-the-store$not-for-the-archive:19000:0:99999:7:::";

    /// A store directory and, beside it, `outside/` holding `f` and `secret` (both `SECRET`).
    fn store_beside_a_secret() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let (store, outside) = (tmp.path().join("store"), tmp.path().join("outside"));
        fs::create_dir(&store).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("f"), SECRET).unwrap();
        fs::write(outside.join("secret"), SECRET).unwrap();
        (tmp, store, outside)
    }

    /// Archives `dir`, running `change` once just before the entry `at` (a path relative to the
    /// root) is opened to be read: a directory to list it, a file for its data. Returns the
    /// compressed archive, its tar bytes and the trailer.
    fn archive_paused(
        dir: &Path,
        at: &str,
        change: impl FnOnce() + Send + 'static,
    ) -> (Vec<u8>, Vec<u8>, Trailer) {
        let change = Mutex::new(Some(change));
        let at = at.as_bytes().to_vec();
        let opts = Options {
            pause: Some(tree::Pause(Arc::new(move |rel: &[u8]| {
                if rel == at
                    && let Some(change) = change.lock().unwrap().take()
                {
                    change();
                }
            }))),
            ..Options::new(3, 0, HashSet::new())
        };
        let (tx, mut rx) = mpsc::channel::<Result<Chunk, tonic::Status>>(4);
        let root = dir.to_path_buf();
        let walker = std::thread::spawn(move || archive(&root, opts, tx));
        let mut data = Vec::new();
        while let Some(c) = rx.blocking_recv() {
            if let Some(chunk::Kind::Data(d)) = c.unwrap().kind {
                data.extend(d);
            }
        }
        let trailer = walker.join().unwrap().unwrap();
        let mut tar = Vec::new();
        zstd::Decoder::new(&data[..])
            .unwrap()
            .read_to_end(&mut tar)
            .unwrap();
        (data, tar, trailer)
    }

    fn holds(tar: &[u8], needle: &[u8]) -> bool {
        tar.windows(needle.len()).any(|w| w == needle)
    }

    fn names(archive: &[u8]) -> Vec<String> {
        entries(archive).into_iter().map(|(n, _)| n).collect()
    }

    fn messages(t: &Trailer) -> Vec<(WarningKind, String, String)> {
        t.warnings
            .iter()
            .map(|w| (w.kind(), w.path.clone(), w.message.clone()))
            .collect()
    }

    /// The audit: `d` listed as a directory, then swapped for a symlink to a directory outside the
    /// store before the archiver read it.
    #[test]
    fn a_directory_swapped_for_a_symlink_during_archive_is_not_followed() {
        let (tmp, store, outside) = store_beside_a_secret();
        fs::create_dir(store.join("d")).unwrap();
        fs::write(store.join("d/f"), b"inside").unwrap();
        fs::write(store.join("z"), b"after").unwrap();
        let (s, moved) = (store.clone(), tmp.path().join("moved"));
        let (archive, tar, trailer) = archive_paused(&store, "d", move || {
            fs::rename(s.join("d"), moved).unwrap();
            std::os::unix::fs::symlink(&outside, s.join("d")).unwrap();
        });
        assert!(!holds(&tar, SECRET), "the archive holds outside content");
        assert_eq!(
            messages(&trailer),
            [(
                WarningKind::Other,
                "d".into(),
                "replaced between listing and reading; not followed".into()
            )]
        );
        assert_eq!(names(&archive), ["./", "d/", "z"], "the walk goes on");
    }

    #[test]
    fn a_directory_replaced_by_another_between_listing_and_reading_is_not_listed() {
        let (tmp, store, _) = store_beside_a_secret();
        fs::create_dir(store.join("d")).unwrap();
        fs::write(store.join("d/f"), b"inside").unwrap();
        let (s, moved) = (store.clone(), tmp.path().join("moved"));
        let (archive, _, trailer) = archive_paused(&store, "d", move || {
            fs::rename(s.join("d"), moved).unwrap();
            fs::create_dir(s.join("d")).unwrap();
            fs::write(s.join("d/g"), b"not listed").unwrap();
        });
        assert_eq!(kinds(&trailer), [(WarningKind::Other, "d".into())]);
        assert_eq!(names(&archive), ["./", "d/"]);
    }

    /// `d` swapped for a symlink once its entries were listed, before `d/f` is read: through a
    /// handle still held the listed `d` is read (wherever it was moved); a handle reopened finds
    /// the symlink and stops there. Neither reads outside content.
    #[test]
    fn a_directory_swapped_for_a_symlink_before_its_files_are_read_is_not_followed() {
        for reopened in [false, true] {
            let (tmp, store, outside) = store_beside_a_secret();
            fs::create_dir(store.join("d")).unwrap();
            fs::write(store.join("d/f"), b"inside").unwrap();
            if reopened {
                // Listed after `d`: their handles push `d`'s out before `d/f` is read.
                for i in 0..=tree::HELD {
                    fs::create_dir(store.join(format!("e{i:03}"))).unwrap();
                }
            }
            let (s, moved) = (store.clone(), tmp.path().join("moved"));
            let (archive, tar, trailer) = archive_paused(&store, "d/f", move || {
                fs::rename(s.join("d"), moved).unwrap();
                std::os::unix::fs::symlink(&outside, s.join("d")).unwrap();
            });
            assert!(!holds(&tar, SECRET), "reopened: {reopened}");
            let e = entries(&archive);
            if reopened {
                assert_eq!(
                    messages(&trailer),
                    [(
                        WarningKind::Other,
                        "d/f".into(),
                        "its directory d/ was replaced between listing and reading; not followed"
                            .into()
                    )]
                );
                assert!(!e.iter().any(|(n, _)| n == "d/f"));
            } else {
                assert_eq!(kinds(&trailer), []);
                assert!(e.contains(&("d/f".to_owned(), b"inside".to_vec())));
            }
        }
    }

    #[test]
    fn a_file_swapped_for_a_symlink_during_archive_is_not_followed() {
        let (tmp, store, outside) = store_beside_a_secret();
        fs::write(store.join("f"), b"inside").unwrap();
        fs::write(store.join("z"), b"after").unwrap();
        let (s, moved) = (store.clone(), tmp.path().join("moved"));
        let (archive, tar, trailer) = archive_paused(&store, "f", move || {
            fs::rename(s.join("f"), moved).unwrap();
            std::os::unix::fs::symlink(outside.join("secret"), s.join("f")).unwrap();
        });
        assert!(!holds(&tar, SECRET), "the archive holds outside content");
        assert_eq!(
            messages(&trailer),
            [(
                WarningKind::Other,
                "f".into(),
                "replaced between listing and reading; not followed".into()
            )]
        );
        assert_eq!(
            entries(&archive),
            [
                ("./".to_owned(), Vec::new()),
                ("z".to_owned(), b"after".to_vec())
            ],
            "the tar stays valid"
        );
    }

    #[test]
    fn a_file_replaced_by_another_file_during_archive_is_not_read() {
        let (_tmp, store, _) = store_beside_a_secret();
        fs::write(store.join("f"), b"inside").unwrap();
        let s = store.clone();
        let (archive, tar, trailer) = archive_paused(&store, "f", move || {
            fs::write(s.join("new"), b"another inode").unwrap();
            fs::rename(s.join("new"), s.join("f")).unwrap();
        });
        assert_eq!(kinds(&trailer), [(WarningKind::Other, "f".into())]);
        assert!(!holds(&tar, b"another inode"));
        assert_eq!(names(&archive), ["./"]);
    }

    #[test]
    fn pax_records_count_their_own_length() {
        let r = pax_records(&[(key("path"), b"x".repeat(95))]);
        assert_eq!(r.len(), 105);
        assert!(r.starts_with(b"105 path="));
        let r = pax_records(&[(key("size"), b"12".to_vec())]);
        assert_eq!(r, b"11 size=12\n");
    }

    /// Entries as an ordinary tree lists them: files without extended attributes, not sparse.
    fn ordinary_entries(dir: &Arc<DirRef>) -> Vec<Listed> {
        let md = |mode: u32, size: u64, ino: u64, nlink: u64, rdev: u64| Meta {
            mode,
            uid: 1000,
            gid: 100,
            size,
            mtime: 1_700_000_000,
            mtime_nsec: 123_456_789,
            ctime: 1_700_000_100,
            ctime_nsec: 987_654_321,
            dev: 0x803,
            ino,
            nlink,
            rdev,
            // Every block allocated: not sparse.
            blocks: size.div_ceil(512),
        };
        let listed = |name: &str, md: Meta, kind: Kind| Listed {
            dir: Arc::clone(dir),
            name: name.as_bytes().to_vec(),
            md,
            kind,
            xattrs: None,
        };
        vec![
            listed("./", md(0o40_755, 4096, 2, 3, 0), Kind::Dir),
            listed("a", md(0o100_644, 5, 10, 2, 0), Kind::File),
            listed(
                "b",
                md(0o100_644, 5, 10, 2, 0),
                Kind::HardLink(b"a".to_vec()),
            ),
            listed("d/", md(0o42_775, 4096, 11, 2, 0), Kind::Dir),
            listed(
                "d/l",
                md(0o120_777, 1, 12, 1, 0),
                Kind::Symlink(b"../a".to_vec()),
            ),
            listed(
                "d/p",
                md(0o10640, 0, 13, 1, 0),
                Kind::Special(EntryType::Fifo),
            ),
            listed(
                "d/z",
                md(0o20600, 0, 14, 1, 0x0103),
                Kind::Special(EntryType::Char),
            ),
            listed("big", md(0o100_600, 9 << 30, 15, 1, 0), Kind::File),
        ]
    }

    /// The fingerprint of an ordinary tree is the one the archive computed before extended
    /// attributes and sparse files were archived: segments held from then are still reused.
    #[test]
    fn fingerprints_of_ordinary_entries_are_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let (tree, _) = Tree::open(dir.path()).unwrap();
        let entries = ordinary_entries(tree.root());
        let hex = fingerprint(&entries)
            .iter()
            .fold(String::new(), |s, b| s + &format!("{b:02x}"));
        assert_eq!(
            hex,
            "7752bb8c35c67791f1bb6130f22bc5fe6f1fa53fe2346bfff3a8fc5c298956ba"
        );
    }

    #[test]
    fn attributes_or_holes_change_a_fingerprint_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let (tree, _) = Tree::open(dir.path()).unwrap();
        let plain = fingerprint(&ordinary_entries(tree.root()));
        let mut e = ordinary_entries(tree.root());
        e[1].xattrs = Some(Box::new(Xattrs(vec![(
            b"user.color".to_vec(),
            b"blue".to_vec(),
        )])));
        let with_xattr = fingerprint(&e);
        assert_ne!(with_xattr, plain);
        e[1].xattrs.as_mut().unwrap().0[0].1 = b"red".to_vec();
        assert_ne!(fingerprint(&e), with_xattr, "the values count");
        let mut e = ordinary_entries(tree.root());
        e[7].md.blocks = 8;
        assert_ne!(fingerprint(&e), plain, "a file that may be sparse");
    }

    /// Archives `dir` whole; returns the compressed archive, its tar bytes and the trailer.
    pub(in crate::store) fn archive_all(dir: &Path) -> (Vec<u8>, Vec<u8>, Trailer) {
        archive_paused(dir, "\0never", || {})
    }

    /// Runs a command, panicking with its output when it fails.
    fn run(cmd: &mut std::process::Command) {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Whether `a` and `b` hold the same bytes (read a MiB at a time).
    pub(in crate::store) fn same_content(one: &mut impl Read, other: &mut impl Read) -> bool {
        let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        loop {
            let got = read_full(one, &mut x);
            if got != read_full(other, &mut y) || x[..got] != y[..got] {
                return false;
            }
            if got == 0 {
                return true;
            }
        }
    }

    fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            match r.read(&mut buf[n..]).unwrap() {
                0 => break,
                k => n += k,
            }
        }
        n
    }

    pub(in crate::store) const SPARSE_SIZE: u64 = 512 << 20;

    /// A 512 MiB file of holes with a 4-byte tail (`SPARSE_SIZE + 4` bytes).
    pub(in crate::store) fn sparse_file(p: &Path) {
        let f = fs::File::create(p).unwrap();
        f.write_all_at(b"tail", SPARSE_SIZE).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.sync_all().unwrap();
    }

    #[test]
    fn a_sparse_file_is_archived_sparse_and_gnu_tar_extracts_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        fs::create_dir(&store).unwrap();
        sparse_file(&store.join("s"));
        fs::write(store.join("plain"), b"dense").unwrap();
        // 40 islands 2 MiB apart: regions in two extension blocks after the header.
        let m = fs::File::create(store.join("m")).unwrap();
        for i in 0..40u64 {
            m.write_all_at(format!("island {i}").as_bytes(), i * (2 << 20) + 1000)
                .unwrap();
        }
        m.set_len(90 << 20).unwrap();
        m.sync_all().unwrap();
        let (archive, tar, trailer) = archive_all(&store);
        assert_eq!(kinds(&trailer), []);
        assert!(tar.len() < 256 << 10, "{} tar bytes", tar.len());
        assert_eq!(
            trailer.store.unwrap().file_bytes,
            SPARSE_SIZE + 4 + 5 + (90 << 20)
        );
        // The `tar` crate (the restore's reader) sees the whole content.
        let mut t = tar::Archive::new(zstd::Decoder::new(&archive[..]).unwrap());
        let mut found = false;
        for e in t.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path_bytes().as_ref() == b"s" {
                assert_eq!(e.header().entry_type(), EntryType::GNUSparse);
                assert_eq!(e.size(), SPARSE_SIZE + 4);
                let mut orig = fs::File::open(store.join("s")).unwrap();
                assert!(same_content(&mut e, &mut orig));
                found = true;
            }
        }
        assert!(found);
        // GNU tar restores it, sparse.
        let out = dir.path().join("gnu");
        fs::create_dir(&out).unwrap();
        fs::write(dir.path().join("a.tar"), &tar).unwrap();
        run(std::process::Command::new("tar")
            .arg("-xSf")
            .arg(dir.path().join("a.tar"))
            .arg("-C")
            .arg(&out));
        let (mut a, mut b) = (
            fs::File::open(out.join("s")).unwrap(),
            fs::File::open(store.join("s")).unwrap(),
        );
        assert!(same_content(&mut a, &mut b));
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&fs::metadata(out.join("s")).unwrap()) < 1024
        );
        assert_eq!(fs::read(out.join("plain")).unwrap(), b"dense");
        let (mut a, mut b) = (
            fs::File::open(out.join("m")).unwrap(),
            fs::File::open(store.join("m")).unwrap(),
        );
        assert!(
            same_content(&mut a, &mut b),
            "the regions of the extension blocks"
        );
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&fs::metadata(out.join("m")).unwrap()) < 1024
        );
    }

    /// Sets `user.color` on `p`; false where the filesystem keeps no user attributes.
    pub(in crate::store) fn set_user_xattr(p: &Path, value: &[u8]) -> bool {
        match rustix::fs::setxattr(p, "user.color", value, rustix::fs::XattrFlags::empty()) {
            Ok(()) => true,
            Err(rustix::io::Errno::OPNOTSUPP) => {
                eprintln!(
                    "{}: no user xattrs on this filesystem; skipped",
                    p.display()
                );
                false
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// Runs `setfacl args… p`; false (skipped) when `setfacl` (Debian's `acl`) is not installed.
    pub(in crate::store) fn setfacl(args: &[&str], p: &Path) -> bool {
        let Ok(out) = std::process::Command::new("setfacl")
            .args(args)
            .arg(p)
            .output()
        else {
            eprintln!("setfacl not installed (apt-get install acl); ACLs skipped");
            return false;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        true
    }

    pub(in crate::store) fn getfacl(p: &Path) -> String {
        let out = std::process::Command::new("getfacl")
            .args(["-n", "--omit-header"])
            .arg(p)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn attributes_and_acls_are_archived_as_gnu_tar_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        fs::create_dir_all(store.join("d")).unwrap();
        fs::write(store.join("f"), b"data").unwrap();
        fs::write(store.join("plain"), b"none").unwrap();
        if !set_user_xattr(&store.join("f"), b"blue") {
            return;
        }
        let acls = setfacl(&["-m", "u:1234:r"], &store.join("f"))
            && setfacl(&["-d", "-m", "u:1234:rx"], &store.join("d"));
        rustix::fs::setxattr(
            store.join("d"),
            "trusted.not-kept",
            b"x",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        let (_, tar, trailer) = archive_all(&store);
        assert_eq!(kinds(&trailer), []);
        assert!(holds(&tar, b" SCHILY.xattr.user.color=blue\n"));
        assert!(!holds(&tar, b"trusted."));
        if acls {
            assert!(holds(&tar, b" SCHILY.xattr.system.posix_acl_access="));
            assert!(holds(&tar, b" SCHILY.xattr.system.posix_acl_default="));
            assert!(holds(
                &tar,
                b" SCHILY.acl.access=user::rw-,user:1234:r--,group::r--,mask::r--,other::r--\n"
            ));
        }
        let out = dir.path().join("gnu");
        fs::create_dir(&out).unwrap();
        fs::write(dir.path().join("a.tar"), &tar).unwrap();
        run(std::process::Command::new("tar")
            .args(["--xattrs", "--acls", "-xf"])
            .arg(dir.path().join("a.tar"))
            .arg("-C")
            .arg(&out));
        let mut got = [0u8; 16];
        let n = rustix::fs::getxattr(out.join("f"), "user.color", &mut got[..]).unwrap();
        assert_eq!(&got[..n], b"blue");
        assert_eq!(fs::read(out.join("f")).unwrap(), b"data");
        if acls {
            assert!(getfacl(&out.join("f")).contains("user:1234:r--"));
            assert!(getfacl(&out.join("d")).contains("default:user:1234:r-x"));
        }
    }

    /// The archive of `dir` (every segment sent): its bytes and each segment's (size, sha256), as
    /// a restore is given them.
    pub(in crate::store) fn archived(dir: &Path) -> (Vec<u8>, Vec<(u64, Vec<u8>)>) {
        let (sent, _) = segments(dir, &HashSet::new());
        let whole = sent.iter().flat_map(|(_, _, d)| d.clone()).collect();
        let sums = sent
            .iter()
            .map(|(_, _, d)| (d.len() as u64, Sha256::digest(d).to_vec()))
            .collect();
        (whole, sums)
    }
}
