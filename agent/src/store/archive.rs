//! The store archive: a tar stream of one directory tree, zstd-compressed, sent as chunks.
//!
//! Invariants:
//! - Entries are written in a fixed order (depth first, names sorted bytewise), the root first as
//!   `./`, every other path relative to the root, directories with a trailing `/`.
//! - Headers are ustar; a pax extended header carries what ustar cannot: paths or link targets longer
//!   than 100 bytes or not UTF-8 (with `hdrcharset=BINARY`), sizes ≥ 8 GiB, ids ≥ 2^21.
//! - Owners are numeric uid/gid; modes keep setuid/setgid/sticky; mtimes are whole seconds.
//! - Live files: a file's header size is its size when opened, and exactly that many bytes follow.
//!   A file that grows is cut at that size, one that shrinks is padded with zeros; both, and files
//!   that vanish between listing and reading, become trailer warnings. The tar stays valid.
//! - A second path to an already archived inode (nlink > 1) is a hard link entry to the first path.
//! - Sockets are skipped and reported; fifos and device nodes are recorded.

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use deis_backup_proto::v1::{StoreCounts, Trailer, Warning, warning::Kind};
use tar::{EntryType, Header};

use crate::chunks::{ChunkSink, ChunkTx, Counting, encoder};
use crate::error::{Error, Result};

/// Largest value an ustar octal size field holds (11 octal digits).
const USTAR_MAX_SIZE: u64 = 0o777_7777_7777;
/// File contents are read in pieces of this size.
const READ_BUFFER: usize = 1 << 20;
/// Headers and small files are gathered into writes of this size before compression.
const WRITE_BUFFER: usize = 256 << 10;
/// Largest value an ustar uid/gid field holds (7 octal digits).
const USTAR_MAX_ID: u64 = 0o777_7777;

struct Walker<W: Write> {
    tar: tar::Builder<W>,
    counts: StoreCounts,
    warnings: Vec<Warning>,
    /// (dev, inode) of files with several links -> the archived path of the first one.
    links: HashMap<(u64, u64), Vec<u8>>,
    /// Read buffer for file contents.
    buf: Vec<u8>,
}

fn warn(kind: Kind, path: &[u8], message: impl Into<String>) -> Warning {
    Warning {
        kind: kind.into(),
        path: String::from_utf8_lossy(path).into_owned(),
        message: message.into(),
    }
}

fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
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

impl<W: Write> Walker<W> {
    fn header(
        md: &Metadata,
        kind: EntryType,
        size: u64,
        pax: &mut Vec<(&'static str, Vec<u8>)>,
    ) -> Header {
        let mut h = Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(md.mode() & 0o7777);
        let (uid, gid) = (u64::from(md.uid()), u64::from(md.gid()));
        h.set_uid(uid);
        h.set_gid(gid);
        if uid > USTAR_MAX_ID {
            pax.push(("uid", uid.to_string().into_bytes()));
        }
        if gid > USTAR_MAX_ID {
            pax.push(("gid", gid.to_string().into_bytes()));
        }
        h.set_mtime(u64::try_from(md.mtime()).unwrap_or(0));
        h.set_size(size);
        if size > USTAR_MAX_SIZE {
            pax.push(("size", size.to_string().into_bytes()));
        }
        h
    }

    /// Writes `h` named `name` (and linking to `link`), with a pax header first where needed.
    fn append(
        &mut self,
        mut h: Header,
        name: &[u8],
        link: Option<&[u8]>,
        mut pax: Vec<(&'static str, Vec<u8>)>,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        let mut binary = false;
        for (key, value) in [("path", Some(name)), ("linkpath", link)] {
            let Some(value) = value else { continue };
            let utf8 = std::str::from_utf8(value).is_ok();
            if value.len() > 100 || !utf8 {
                binary |= !utf8;
                pax.push((key, value.to_vec()));
            }
        }
        if binary {
            pax.insert(0, ("hdrcharset", b"BINARY".to_vec()));
        }
        if !pax.is_empty() {
            self.tar
                .append_pax_extensions(pax.iter().map(|(k, v)| (*k, v.as_slice())))?;
        }
        let old = h.as_old_mut();
        let n = name.len().min(100);
        old.name[..n].copy_from_slice(&name[..n]);
        if let Some(link) = link {
            let n = link.len().min(100);
            old.linkname[..n].copy_from_slice(&link[..n]);
        }
        h.set_cksum();
        // The header through tar (no data, so no padding), then the data in large reads and
        // writes of our own buffer: tar's own copy goes 8 KiB at a time.
        self.tar.append(&h, io::empty())?;
        let out = self.tar.get_mut();
        let mut len = 0u64;
        loop {
            let n = match data.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            out.write_all(&self.buf[..n])?;
            len += n as u64;
        }
        let pad = (512 - len % 512) % 512;
        out.write_all(&[0u8; 512][..usize::try_from(pad).unwrap_or(0)])
    }

    fn walk(&mut self, root: &Path) -> Result<()> {
        // The root itself may be a symlink to the store (followed); nothing below it is.
        let md = fs::metadata(root).map_err(Error::io("cannot read", root))?;
        if !md.is_dir() {
            return Err(Error::BadRequest {
                what: format!("store path {} is not a directory", root.display()),
            });
        }
        let io_err = |p: &Path| Error::io("archiving", p.to_path_buf());
        self.entry(root, b".", &md).map_err(io_err(root))?;
        // Pre-order depth-first walk; children pushed in reverse so they pop in sorted order.
        let mut stack: Vec<(PathBuf, Vec<u8>)> = Vec::new();
        self.push_children(root, b"", &mut stack)
            .map_err(io_err(root))?;
        while let Some((abs, rel)) = stack.pop() {
            let md = match fs::symlink_metadata(&abs) {
                Ok(md) => md,
                Err(e) if vanished(&e) => {
                    self.warnings.push(warn(
                        Kind::Vanished,
                        &rel,
                        "disappeared before it was read",
                    ));
                    continue;
                }
                Err(e) => return Err(io_err(&abs)(e)),
            };
            self.entry(&abs, &rel, &md).map_err(io_err(&abs))?;
            if md.is_dir() {
                self.push_children(&abs, &rel, &mut stack)
                    .map_err(io_err(&abs))?;
            }
        }
        Ok(())
    }

    fn push_children(
        &mut self,
        dir: &Path,
        rel: &[u8],
        stack: &mut Vec<(PathBuf, Vec<u8>)>,
    ) -> io::Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if vanished(&e) => {
                self.warnings.push(warn(
                    Kind::Vanished,
                    rel,
                    "directory disappeared while listed",
                ));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for e in entries {
            match e {
                Ok(e) => names.push(e.file_name()),
                Err(e) if vanished(&e) => {}
                Err(e) => return Err(e),
            }
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names.into_iter().rev() {
            let mut r = rel.to_vec();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(name.as_bytes());
            stack.push((dir.join(&name), r));
        }
        Ok(())
    }

    fn entry(&mut self, abs: &Path, rel: &[u8], md: &Metadata) -> io::Result<()> {
        let ft = md.file_type();
        let mut pax = Vec::new();
        if ft.is_dir() {
            let mut name = if rel == b"." {
                b".".to_vec()
            } else {
                rel.to_vec()
            };
            name.push(b'/');
            let h = Self::header(md, EntryType::Directory, 0, &mut pax);
            self.counts.dirs += 1;
            return self.append(h, &name, None, pax, &mut io::empty());
        }
        if ft.is_symlink() {
            let target = match fs::read_link(abs) {
                Ok(t) => t,
                Err(e) if vanished(&e) => {
                    self.warnings
                        .push(warn(Kind::Vanished, rel, "disappeared before it was read"));
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            let h = Self::header(md, EntryType::Symlink, 0, &mut pax);
            self.counts.symlinks += 1;
            return self.append(
                h,
                rel,
                Some(target.as_os_str().as_bytes()),
                pax,
                &mut io::empty(),
            );
        }
        if ft.is_socket() {
            self.warnings.push(warn(
                Kind::SocketSkipped,
                rel,
                "a socket cannot be archived; skipped",
            ));
            return Ok(());
        }
        if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
            let kind = if ft.is_fifo() {
                EntryType::Fifo
            } else if ft.is_char_device() {
                EntryType::Char
            } else {
                EntryType::Block
            };
            let mut h = Self::header(md, kind, 0, &mut pax);
            if !ft.is_fifo() {
                h.set_device_major(rustix::fs::major(md.rdev()))?;
                h.set_device_minor(rustix::fs::minor(md.rdev()))?;
            }
            self.counts.special += 1;
            return self.append(h, rel, None, pax, &mut io::empty());
        }
        self.file(abs, rel)
    }

    fn file(&mut self, abs: &Path, rel: &[u8]) -> io::Result<()> {
        let file = match fs::OpenOptions::new()
            .read(true)
            .custom_flags(
                (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK)
                    .bits()
                    .cast_signed(),
            )
            .open(abs)
        {
            Ok(f) => f,
            Err(e) if vanished(&e) => {
                self.warnings
                    .push(warn(Kind::Vanished, rel, "disappeared before it was read"));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        // The opened file's own metadata: the path may have been replaced since it was listed.
        let md = file.metadata()?;
        if !md.is_file() {
            self.warnings.push(warn(
                Kind::Other,
                rel,
                "changed type while archived; skipped",
            ));
            return Ok(());
        }
        let mut pax = Vec::new();
        if md.nlink() > 1 {
            let key = (md.dev(), md.ino());
            if let Some(first) = self.links.get(&key).cloned() {
                let h = Self::header(&md, EntryType::Link, 0, &mut pax);
                self.counts.hardlinks += 1;
                return self.append(h, rel, Some(&first), pax, &mut io::empty());
            }
            self.links.insert(key, rel.to_vec());
        }
        let size = md.len();
        let h = Self::header(&md, EntryType::Regular, size, &mut pax);
        let mut live = Live {
            file,
            left: size,
            padded: 0,
        };
        self.append(h, rel, None, pax, &mut live)?;
        self.counts.files += 1;
        self.counts.file_bytes += size;
        if live.padded > 0 {
            self.warnings.push(warn(
                Kind::FileShrank,
                rel,
                format!(
                    "shrank while read: {} of {size} bytes read, the rest padded with zeros",
                    size - live.padded
                ),
            ));
        } else if let Ok(now) = live.file.metadata()
            && now.len() > size
        {
            self.warnings.push(warn(
                Kind::FileGrew,
                rel,
                format!(
                    "grew from {size} to {} bytes while read; archived the first {size}",
                    now.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Archives the directory `root` as tar + zstd data chunks on `tx` (blocking); returns the trailer.
pub fn archive(root: &Path, level: i32, workers: u32, tx: ChunkTx) -> Result<Trailer> {
    let start = Instant::now();
    let cancelled = |e: io::Error| {
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
    let enc = encoder(ChunkSink::new(tx), level, workers).map_err(cancelled)?;
    let mut w = Walker {
        tar: tar::Builder::new(io::BufWriter::with_capacity(
            WRITE_BUFFER,
            Counting::new(enc),
        )),
        counts: StoreCounts::default(),
        warnings: Vec::new(),
        links: HashMap::new(),
        buf: vec![0; READ_BUFFER],
    };
    w.walk(root).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == io::ErrorKind::BrokenPipe => Error::Cancelled,
        e => e,
    })?;
    let counting = w
        .tar
        .into_inner()
        .and_then(|b| b.into_inner().map_err(io::IntoInnerError::into_error))
        .map_err(cancelled)?;
    let raw = counting.count;
    let (compressed, sha) = counting
        .inner
        .finish()
        .and_then(ChunkSink::finish)
        .map_err(cancelled)?;
    for warning in &w.warnings {
        tracing::info!(path = %warning.path, message = %warning.message, "archive warning");
    }
    Ok(Trailer {
        raw_bytes: raw,
        compressed_bytes: compressed,
        sha256: sha.to_vec(),
        duration_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        warnings: w.warnings,
        store: Some(w.counts),
    })
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use deis_backup_proto::v1::{Chunk, chunk};
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

    /// Archives `dir` (a 8 MiB file `a`, a small `z`), running `change` once the first chunk is
    /// out, i.e. while `a` is being read and before `z` is reached; returns the archive and trailer.
    fn archive_while(dir: &Path, change: impl FnOnce()) -> (Vec<u8>, Trailer) {
        let (tx, mut rx) = mpsc::channel::<Result<Chunk, tonic::Status>>(1);
        let root = dir.to_path_buf();
        let walker = std::thread::spawn(move || archive(&root, 3, 0, tx));
        let mut data = Vec::new();
        let mut change = Some(change);
        while let Some(c) = rx.blocking_recv() {
            if let Some(chunk::Kind::Data(d)) = c.unwrap().kind {
                data.extend(d);
            }
            if let Some(f) = change.take() {
                f();
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

    fn kinds(t: &Trailer) -> Vec<(Kind, String)> {
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
            [(Kind::FileGrew, "a".into()), (Kind::Vanished, "z".into())]
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
        assert_eq!(kinds(&trailer), [(Kind::FileShrank, "a".into())]);
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
        assert_eq!(kinds(&trailer), [(Kind::SocketSkipped, "sock".into())]);
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
}
