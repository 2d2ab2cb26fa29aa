//! Sparse files in the store archive: finding a file's data regions (`SEEK_DATA`/`SEEK_HOLE` on the
//! handle already open), writing them as an old-GNU sparse entry (type `S`), and checking a sparse
//! map read back. Shared by the archive and the restore.
//!
//! Invariants:
//! - A file is archived sparse only when its holes save real space ([`worth`]: at least
//!   [`MIN_HOLES`] bytes of holes, or holes of at least half a file of 64 KiB or more). Every
//!   other file is archived dense, byte for byte as before sparse files were recognized.
//! - The map is found on the opened handle, never by path, and holds at most [`MAX_REGIONS`]
//!   regions; a file with more is archived dense.
//! - Regions are sorted, do not overlap, start on 512-byte boundaries and (all but the last) have
//!   lengths that are multiples of 512 (what the `tar` crate requires), and end within the real
//!   size. When the file ends in a hole (or has no data at all) the last region is the empty one
//!   at the real size, as GNU tar writes it.
//! - A map read back ([`MapCheck`], by the restore's tar guard) is refused unless it keeps those
//!   bounds: at most [`MAX_REGIONS`] regions, sorted, not overlapping, within the real size, and
//!   holding exactly the bytes the entry stores.
//! - The entry is an old-GNU header (GNU magic, type `S`): `size` is the bytes stored (the
//!   regions' data, one after another), `realsize` the file's size, the first 4 regions in the
//!   header and the rest in extension blocks of 21 that follow it. GNU tar (`tar -x`, `-S`) and
//!   the `tar` crate both read it; pax `GNU.sparse.*` (which the `tar` crate cannot read) is not
//!   used.

use std::io;
use std::os::fd::AsFd;

use rustix::fs::SeekFrom;
use rustix::io::Errno;
use tar::{GnuExtSparseHeader, GnuSparseHeader};

/// Holes of at least this many bytes make a file sparse.
pub const MIN_HOLES: u64 = 1 << 20;
/// Most regions in one sparse map (archived or restored).
pub const MAX_REGIONS: usize = 1_000_000;
/// Regions in the GNU header itself.
const IN_HEADER: usize = 4;
/// Regions in one extension block.
const IN_EXTENSION: usize = 21;

/// Whether `holes` bytes of holes in a file of `size` bytes make it worth archiving sparse.
pub fn worth(size: u64, holes: u64) -> bool {
    holes >= MIN_HOLES || (size >= 64 << 10 && holes >= size / 2)
}

/// Whether a file listed with `size` bytes and `blocks` 512-byte blocks allocated may be sparse
/// (its map is looked at only then).
pub fn maybe(size: u64, blocks: u64) -> bool {
    worth(size, size.saturating_sub(blocks.saturating_mul(512)))
}

/// One data region: `len` bytes at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub len: u64,
}

/// The data regions of the file open on `fd`, `size` bytes long, when archiving it sparse is
/// [`worth`] it; None to archive it dense (no holes worth it, too many regions, or a filesystem
/// without `SEEK_DATA`). The file's offset is back at its start afterwards, for a dense read.
pub fn map(fd: impl AsFd, size: u64) -> io::Result<Option<Vec<Region>>> {
    let fd = fd.as_fd();
    let found = find(fd, size);
    rustix::fs::seek(fd, SeekFrom::Start(0))?;
    found
}

fn find(fd: std::os::fd::BorrowedFd<'_>, size: u64) -> io::Result<Option<Vec<Region>>> {
    let mut regions: Vec<Region> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let start = match rustix::fs::seek(fd, SeekFrom::Data(pos)) {
            Ok(start) => start,
            // No data from `pos` on.
            Err(Errno::NXIO) => break,
            Err(Errno::INVAL | Errno::OPNOTSUPP) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match rustix::fs::seek(fd, SeekFrom::Hole(start)) {
            Ok(end) => end.min(size),
            Err(Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        // 512-byte boundaries (filesystem blocks are, except at the end of the file).
        let (start, end) = (
            start / 512 * 512,
            end.div_ceil(512).saturating_mul(512).min(size),
        );
        match regions.last_mut() {
            Some(last) if last.offset + last.len >= start => {
                last.len = end.max(last.offset + last.len) - last.offset;
            }
            _ => regions.push(Region {
                offset: start,
                len: end - start,
            }),
        }
        if regions.len() > MAX_REGIONS {
            return Ok(None);
        }
        pos = end.max(pos + 1);
    }
    let data: u64 = regions.iter().map(|r| r.len).sum();
    if !worth(size, size - data.min(size)) {
        return Ok(None);
    }
    if regions.last().is_none_or(|r| r.offset + r.len < size) {
        regions.push(Region {
            offset: size,
            len: 0,
        });
    }
    Ok(Some(regions))
}

/// Checks a sparse map read from an archive, region by region as it arrives: at most
/// [`MAX_REGIONS`] regions, sorted, not overlapping, within the real size, their lengths adding up
/// to the bytes the entry stores.
#[derive(Debug)]
pub struct MapCheck {
    real_size: u64,
    stored: u64,
    count: usize,
    /// The end of the last region.
    at: u64,
    data: u64,
}

impl MapCheck {
    pub fn new(real_size: u64, stored: u64) -> Self {
        Self {
            real_size,
            stored,
            count: 0,
            at: 0,
            data: 0,
        }
    }

    pub fn add(&mut self, r: Region) -> Result<(), String> {
        self.count += 1;
        if self.count > MAX_REGIONS {
            return Err(format!(
                "its sparse map has more than {MAX_REGIONS} regions"
            ));
        }
        let real_size = self.real_size;
        let end = r
            .offset
            .checked_add(r.len)
            .filter(|end| *end <= real_size)
            .ok_or_else(|| {
                format!(
                    "its sparse map has a region ({} bytes at {}) past its size of {real_size} bytes",
                    r.len, r.offset
                )
            })?;
        if r.offset < self.at {
            return Err(format!(
                "its sparse map has regions out of order or overlapping (at {})",
                r.offset
            ));
        }
        self.at = end;
        self.data += r.len;
        Ok(())
    }

    pub fn finish(&self) -> Result<(), String> {
        if self.data != self.stored {
            return Err(format!(
                "its sparse map holds {} bytes but the entry stores {}",
                self.data, self.stored
            ));
        }
        Ok(())
    }
}

/// [`MapCheck`] of a whole map.
#[cfg(test)]
pub fn check(regions: &[Region], real_size: u64, stored: u64) -> Result<(), String> {
    let mut c = MapCheck::new(real_size, stored);
    for r in regions {
        c.add(*r)?;
    }
    c.finish()
}

/// Bytes stored for `regions`: their lengths added up.
pub fn stored(regions: &[Region]) -> u64 {
    regions.iter().map(|r| r.len).sum()
}

fn slot(s: &mut GnuSparseHeader, r: &Region) {
    s.set_offset(r.offset);
    s.set_length(r.len);
}

/// Fills the sparse fields of the GNU header `h` (real size `size`) with the first regions and
/// returns the extension blocks that must follow it.
pub fn fill_header(h: &mut tar::Header, size: u64, regions: &[Region]) -> Vec<u8> {
    let (first, rest) = regions.split_at(regions.len().min(IN_HEADER));
    let gnu = h.as_gnu_mut().expect("a GNU header");
    gnu.set_real_size(size);
    for (s, r) in gnu.sparse.iter_mut().zip(first) {
        slot(s, r);
    }
    gnu.set_is_extended(!rest.is_empty());
    let mut out = Vec::with_capacity(rest.len().div_ceil(IN_EXTENSION) * 512);
    let mut chunks = rest.chunks(IN_EXTENSION).peekable();
    while let Some(chunk) = chunks.next() {
        let mut ext = GnuExtSparseHeader::new();
        for (s, r) in ext.sparse.iter_mut().zip(chunk) {
            slot(s, r);
        }
        ext.set_is_extended(chunks.peek().is_some());
        out.extend_from_slice(ext.as_bytes());
    }
    out
}

/// Reads one 24-byte sparse slot (12 bytes offset, 12 bytes length; octal or base-256); None for
/// a slot the `tar` crate skips (the first byte of either field NUL).
pub fn parse_slot(slot: &[u8]) -> Result<Option<Region>, String> {
    if slot[0] == 0 || slot[12] == 0 {
        return Ok(None);
    }
    // As the `tar` crate reads them: base-256 (its last 8 bytes) or octal text up to a NUL.
    let num = |f: &[u8]| -> Result<u64, String> {
        if f[0] & 0x80 != 0 {
            return Ok(f[4..].iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)));
        }
        let text = f.split(|b| *b == 0).next().unwrap_or(f);
        std::str::from_utf8(text)
            .ok()
            .and_then(|t| u64::from_str_radix(t.trim(), 8).ok())
            .ok_or_else(|| "its sparse map has a number that is not octal".to_string())
    };
    Ok(Some(Region {
        offset: num(&slot[..12])?,
        len: num(&slot[12..24])?,
    }))
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::{Seek, Write};

    use super::*;

    #[test]
    fn only_holes_that_save_space_make_a_file_sparse() {
        assert!(!worth(100, 0));
        assert!(
            !worth(8 << 10, 4 << 10),
            "half of a small file saves little"
        );
        assert!(worth(128 << 10, 64 << 10));
        assert!(worth(100 << 20, 1 << 20));
        assert!(!maybe(10 << 20, (10 << 20) / 512));
        assert!(maybe(512 << 20, 8));
    }

    #[test]
    fn a_file_with_a_tail_maps_to_its_tail_and_a_dense_file_to_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let mut f = fs::File::create(&p).unwrap();
        f.seek(io::SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
        f.sync_all().unwrap();
        let size = (8 << 20) + 4;
        let regions = map(&f, size).unwrap().unwrap();
        assert_eq!(
            regions.last().unwrap().offset + regions.last().unwrap().len,
            size
        );
        assert!(stored(&regions) < 64 << 10, "{regions:?}");
        check(&regions, size, stored(&regions)).unwrap();

        let q = dir.path().join("d");
        fs::write(&q, vec![7u8; 4 << 20]).unwrap();
        let mut f = fs::File::open(&q).unwrap();
        assert_eq!(map(&f, 4 << 20).unwrap(), None);
        assert_eq!(f.stream_position().unwrap(), 0, "a dense read starts at 0");
    }

    #[test]
    fn maps_out_of_order_overlapping_or_past_the_size_are_refused() {
        let r = |offset, len| Region { offset, len };
        check(&[r(0, 512), r(4096, 4), r(10_000, 0)], 10_000, 516).unwrap();
        assert!(check(&[r(4096, 512), r(0, 512)], 10_000, 1024).is_err());
        assert!(check(&[r(0, 1024), r(512, 512)], 10_000, 1536).is_err());
        assert!(check(&[r(0, 512), r(9_999, 2)], 10_000, 514).is_err());
        assert!(check(&[r(u64::MAX, 2)], 10_000, 2).is_err());
        assert!(check(&[r(0, 512)], 10_000, 511).is_err());
    }

    #[test]
    fn header_slots_round_trip() {
        let regions: Vec<Region> = (0..30)
            .map(|i| Region {
                offset: i * 1_000_000 + (9 << 30),
                len: 512,
            })
            .collect();
        let mut h = tar::Header::new_gnu();
        let ext = fill_header(&mut h, 40 << 30, &regions);
        assert_eq!(ext.len(), 2 * 512, "4 in the header, 21 + 5 in two blocks");
        let mut back = Vec::new();
        for s in &h.as_gnu().unwrap().sparse {
            back.extend(
                parse_slot(
                    &s.offset
                        .iter()
                        .chain(&s.numbytes)
                        .copied()
                        .collect::<Vec<_>>(),
                )
                .unwrap(),
            );
        }
        for block in ext.chunks(512) {
            for s in block[..21 * 24].chunks(24) {
                back.extend(parse_slot(s).unwrap());
            }
        }
        assert_eq!(back, regions);
        assert_eq!(h.as_gnu().unwrap().real_size().unwrap(), 40 << 30);
    }
}
