//! A reader between the zstd decoder and `tar::Archive` that follows the tar stream's 512-byte
//! framing itself, so that an archive's claims are checked before the `tar` crate parses or
//! allocates anything for them.
//!
//! Invariants:
//! - Only ustar and GNU headers pass (old v7 headers are refused): for those `tar` reads extension
//!   headers exactly as this reader does, so both see the same entries.
//! - A pax record holding a newline inside it is refused: `tar` splits records at newlines, so it
//!   would read other records (a `path`, say) out of that one's value than the archive wrote.
//! - A GNU sparse entry (type `S`, GNU magic only) is framed as `tar` frames it: its header, then
//!   extension blocks while the previous block's `isextended` is 1, then its stored bytes. Its map
//!   is checked as it passes (`sparse::MapCheck`): at most `sparse::MAX_REGIONS` regions, sorted,
//!   not overlapping, within the real size, adding up to the stored bytes; anything else is
//!   refused before `tar` hands the entry out.
//! - An extension entry (GNU long name `L`, long link `K`, pax `x` or `g`) whose header claims more
//!   than [`MAX_EXTENSION`] bytes is refused from its header alone, before one byte of its data
//!   reaches `tar`. Its data (at most that much) is held here to follow a pax `size` the way `tar`
//!   does and to refuse a path or link target longer than [`PATH_MAX`].
//! - At most `max_bytes` tar bytes pass in all; the next one is refused, naming the cap and the
//!   config key `max-restore-bytes`.
//! - After the first all-zero block (where `tar` stops) bytes pass unparsed, still counted.
//! - Every refusal is an `io::Error` carrying a [`Refusal`], so callers can tell it from a broken
//!   stream.

use std::fmt;
use std::io::{self, Read};

use crate::store::archive::sparse::{self, MapCheck};

/// Bytes in a tar block (and header).
const BLOCK: usize = 512;
/// Most bytes of one extension entry (pax header, GNU long name or long link).
pub const MAX_EXTENSION: u64 = 64 * 1024;
/// Longest path or link target accepted, in bytes (Linux's `PATH_MAX`).
pub const PATH_MAX: usize = 4096;

/// Why the guard stopped the stream.
#[derive(Debug)]
pub struct Refusal {
    pub reason: String,
    /// The archive may be sound but goes past one of the agent's limits.
    pub limit: bool,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Refusal {}

fn refused(reason: String) -> Refusal {
    Refusal {
        reason,
        limit: false,
    }
}

/// Where in the tar stream the next byte falls.
enum State {
    /// Collecting a header block.
    Header,
    /// Passing the data (and padding) of an ordinary entry: bytes left.
    Data(u64),
    /// Holding the data of an extension entry of `kind` and `size` bytes; `left` includes padding.
    Extension { kind: u8, size: u64, left: u64 },
    /// Collecting an extension block of a sparse entry that stores `size` bytes.
    Sparse {
        size: u64,
        check: MapCheck,
        shown: String,
    },
    /// After the end-of-archive block.
    End,
}

/// A pax header seen and not yet used by an entry: its `size` record, if any.
type PendingPax = Option<Option<u64>>;

/// The guard itself; see the module invariants.
pub struct TarGuard<R> {
    inner: R,
    max_bytes: u64,
    total: u64,
    state: State,
    header: Vec<u8>,
    extension: Vec<u8>,
    pax: PendingPax,
}

impl<R: Read> TarGuard<R> {
    pub fn new(inner: R, max_bytes: u64) -> Self {
        Self {
            inner,
            max_bytes,
            total: 0,
            state: State::Header,
            header: Vec::with_capacity(BLOCK),
            extension: Vec::new(),
            pax: None,
        }
    }

    /// Follows the framing through `data`, the next bytes of the stream.
    fn observe(&mut self, mut data: &[u8]) -> Result<(), Refusal> {
        while !data.is_empty() {
            let took = match &mut self.state {
                State::End => data.len(),
                State::Data(left) => {
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = State::Header;
                    }
                    n
                }
                State::Extension { kind, size, left } => {
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                    let keep = usize::try_from(*size)
                        .unwrap_or(usize::MAX)
                        .saturating_sub(self.extension.len())
                        .min(n);
                    self.extension.extend_from_slice(&data[..keep]);
                    *left -= n as u64;
                    if *left == 0 {
                        let kind = *kind;
                        self.extension_done(kind)?;
                        self.state = State::Header;
                    }
                    n
                }
                State::Header => {
                    let n = (BLOCK - self.header.len()).min(data.len());
                    self.header.extend_from_slice(&data[..n]);
                    if self.header.len() == BLOCK {
                        self.state = self.header_done()?;
                        self.header.clear();
                    }
                    n
                }
                State::Sparse { .. } => {
                    let n = (BLOCK - self.header.len()).min(data.len());
                    self.header.extend_from_slice(&data[..n]);
                    if self.header.len() == BLOCK {
                        let state = std::mem::replace(&mut self.state, State::Header);
                        self.state = self.sparse_block_done(state)?;
                        self.header.clear();
                    }
                    n
                }
            };
            data = &data[took..];
        }
        Ok(())
    }

    /// The state after the header block just collected.
    fn header_done(&mut self) -> Result<State, Refusal> {
        let h = &self.header;
        if h.iter().all(|b| *b == 0) {
            return Ok(State::End);
        }
        let (magic, version) = (&h[257..263], &h[263..265]);
        let ustar = magic == b"ustar\0" && version == b"00";
        let gnu = magic == b"ustar " && version == b" \0";
        let shown = String::from_utf8_lossy(until_nul(&h[..100])).into_owned();
        if !ustar && !gnu {
            return Err(refused(format!(
                "entry '{shown}' has an old (pre-POSIX) tar header; only ustar and GNU headers are accepted"
            )));
        }
        let kind = h[156];
        let size = size_field(&h[124..136])
            .ok_or_else(|| refused(format!("entry '{shown}' has an unreadable size field")))?;
        match kind {
            b'S' => {
                if !gnu {
                    return Err(refused(format!(
                        "entry '{shown}' is a GNU sparse file without a GNU header"
                    )));
                }
                let size = self.pax.take().flatten().unwrap_or(size);
                let real = size_field(&h[483..495]).ok_or_else(|| {
                    refused(format!("entry '{shown}' has an unreadable sparse size"))
                })?;
                let mut check = MapCheck::new(real, size);
                let bad = |why: String| refused(format!("entry '{shown}': {why}"));
                for slot in h[386..482].chunks(24) {
                    if let Some(r) = sparse::parse_slot(slot).map_err(bad)? {
                        check.add(r).map_err(bad)?;
                    }
                }
                if h[482] == 1 {
                    return Ok(State::Sparse { size, check, shown });
                }
                check.finish().map_err(bad)?;
                Self::data(size, &shown)
            }
            b'L' | b'K' | b'x' | b'g' => {
                if size > MAX_EXTENSION {
                    return Err(refused(format!(
                        "an extension header (type '{}') claims {size} bytes; the most accepted is {MAX_EXTENSION}",
                        char::from(kind)
                    )));
                }
                if kind == b'x' && self.pax.is_some() {
                    return Err(refused("two pax headers describe one entry".into()));
                }
                if kind == b'g' {
                    // `tar` hands a global header out as an entry, and with it any pending pax.
                    self.pax = None;
                }
                self.extension.clear();
                if size == 0 {
                    self.extension_done(kind)?;
                    return Ok(State::Header);
                }
                Ok(State::Extension {
                    kind,
                    size,
                    left: padded(size).unwrap_or(size),
                })
            }
            _ => {
                let size = self.pax.take().flatten().unwrap_or(size);
                Self::data(size, &shown)
            }
        }
    }

    /// The state for `size` bytes of data of the entry `shown`.
    fn data(size: u64, shown: &str) -> Result<State, Refusal> {
        padded(size)
            .map(State::Data)
            .ok_or_else(|| refused(format!("entry '{shown}' has an impossible size")))
    }

    /// The state after an extension block of a sparse entry (`state`, whose map so far is checked)
    /// was collected.
    fn sparse_block_done(&self, state: State) -> Result<State, Refusal> {
        let State::Sparse {
            size,
            mut check,
            shown,
        } = state
        else {
            unreachable!("called in the sparse state only")
        };
        let bad = |why: String| refused(format!("entry '{shown}': {why}"));
        for slot in self.header[..21 * 24].chunks(24) {
            if let Some(r) = sparse::parse_slot(slot).map_err(bad)? {
                check.add(r).map_err(bad)?;
            }
        }
        if self.header[504] == 1 {
            return Ok(State::Sparse { size, check, shown });
        }
        check.finish().map_err(bad)?;
        Self::data(size, &shown)
    }

    /// Checks the extension entry just held and remembers a pax header for the next entry.
    fn extension_done(&mut self, kind: u8) -> Result<(), Refusal> {
        let data = std::mem::take(&mut self.extension);
        match kind {
            b'L' | b'K' => {
                let path = data.strip_suffix(b"\0").unwrap_or(&data);
                check_path_len(path)?;
            }
            b'x' => {
                if pax_newline(&data) {
                    return Err(refused(
                        "a pax record holds a newline, which this restore cannot read".into(),
                    ));
                }
                for record in tar::PaxExtensions::new(&data).flatten() {
                    if matches!(record.key(), Ok("path" | "linkpath")) {
                        check_path_len(record.value_bytes())?;
                    }
                }
                self.pax = Some(pax_size(&data));
            }
            _ => {}
        }
        Ok(())
    }
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.total += n as u64;
        if self.total > self.max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                Refusal {
                    reason: format!(
                        "the archive unpacks to more than {} bytes, the most this agent restores at once (max-restore-bytes in its config)",
                        self.max_bytes
                    ),
                    limit: true,
                },
            ));
        }
        self.observe(&buf[..n])
            .map_err(|r| io::Error::new(io::ErrorKind::InvalidData, r))?;
        Ok(n)
    }
}

/// `size` rounded up to whole blocks.
fn padded(size: u64) -> Option<u64> {
    Some(size.checked_add(BLOCK as u64 - 1)? & !(BLOCK as u64 - 1))
}

fn until_nul(b: &[u8]) -> &[u8] {
    b.iter().position(|c| *c == 0).map_or(b, |i| &b[..i])
}

fn check_path_len(path: &[u8]) -> Result<(), Refusal> {
    if path.len() > PATH_MAX {
        return Err(refused(format!(
            "a path of {} bytes ('{}...'); the longest accepted is {PATH_MAX}",
            path.len(),
            String::from_utf8_lossy(&path[..64])
        )));
    }
    Ok(())
}

/// A tar numeric field as `tar` reads it: base-256 when the high bit of the first byte is set
/// (the last eight bytes count), else octal text up to the first NUL, spaces trimmed.
pub fn size_field(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let skip = field.len().checked_sub(8)?;
        let mut n = if skip == 0 {
            u64::from(field[0] ^ 0x80)
        } else {
            0
        };
        for b in &field[skip.max(1)..] {
            n = (n << 8) | u64::from(*b);
        }
        return Some(n);
    }
    let text = std::str::from_utf8(until_nul(field)).ok()?;
    u64::from_str_radix(text.trim(), 8).ok()
}

/// The `size` record of a pax header, found the way `tar` finds it: the first `size` record, and
/// none at all when a record before it is malformed.
fn pax_size(data: &[u8]) -> Option<u64> {
    for record in tar::PaxExtensions::new(data) {
        let record = record.ok()?;
        if record.key() != Ok("size") {
            continue;
        }
        return record.value().ok()?.parse().ok();
    }
    None
}

/// Whether a pax record in `data` (read by its length, as the format says) holds a newline before
/// its end: `tar` splits records at newlines and would read that one differently.
fn pax_newline(data: &[u8]) -> bool {
    let mut rest = data;
    while !rest.is_empty() {
        let Some(len) = rest
            .iter()
            .position(|b| *b == b' ')
            .and_then(|i| std::str::from_utf8(&rest[..i]).ok())
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n > 0 && *n <= rest.len())
        else {
            // Malformed: `tar` refuses or skips it as it would without the guard.
            return false;
        };
        if rest[..len - 1].contains(&b'\n') {
            return true;
        }
        rest = &rest[len..];
    }
    false
}

/// The guard's refusal inside `e`, if that is what `e` is.
pub fn refusal(e: &io::Error) -> Option<&Refusal> {
    e.get_ref()?.downcast_ref::<Refusal>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_path("x").unwrap();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_cksum();
        h
    }

    /// Reads `stream` through a guard; returns the error and how many bytes the guard took.
    fn read_through(stream: &[u8]) -> (io::Result<u64>, usize) {
        let mut src = stream;
        let mut guard = TarGuard::new(&mut src, u64::MAX);
        let r = io::copy(&mut guard, &mut io::sink());
        (r, stream.len() - src.len())
    }

    #[test]
    fn size_field_reads_like_tar() {
        for size in [0, 1, 511, 512, 0o77_777_777_777, 1 << 36, u64::MAX >> 1] {
            let h = header(tar::EntryType::Regular, size);
            let field = &h.as_bytes()[124..136];
            assert_eq!(size_field(field), Some(h.entry_size().unwrap()), "{size}");
        }
        assert_eq!(size_field(b" 0000017 \0\0\0"), Some(0o17));
        assert_eq!(size_field(b"12x\0\0\0\0\0\0\0\0\0"), None);
    }

    #[test]
    fn long_name_over_64k_is_refused_from_its_header() {
        let mut stream = header(tar::EntryType::GNULongName, 6 << 30)
            .as_bytes()
            .to_vec();
        stream.extend(std::iter::repeat_n(b'a', 1 << 20));
        let (r, took) = read_through(&stream);
        let e = r.unwrap_err();
        let why = refusal(&e).expect("the guard refuses");
        assert!(why.reason.contains("65536"), "{why}");
        assert!(
            took <= 8192 + BLOCK,
            "the guard read on after the header: {took}"
        );
    }

    #[test]
    fn pax_size_overrides_the_header_size_as_in_tar() {
        let mut b = tar::Builder::new(Vec::new());
        let mut pax = header(tar::EntryType::XHeader, 12);
        pax.set_size(12);
        pax.set_cksum();
        b.append(&pax, &b"12 size=600\n"[..]).unwrap();
        // The header says 0 bytes; pax says 600, so what follows is data, not a header.
        let mut f = header(tar::EntryType::Regular, 0);
        f.set_cksum();
        let mut raw = b.into_inner().unwrap();
        raw.extend_from_slice(f.as_bytes());
        raw.extend(std::iter::repeat_n(0xffu8, 1024));
        raw.extend([0u8; 1024]);
        let (r, _) = read_through(&raw);
        r.expect("the 0xff bytes are read as data");
    }

    #[test]
    fn bytes_past_the_cap_are_refused() {
        let data = vec![0u8; 4096];
        let mut guard = TarGuard::new(&data[..], 1000);
        let e = io::copy(&mut guard, &mut io::sink()).unwrap_err();
        let why = refusal(&e).unwrap();
        assert!(
            why.limit && why.reason.contains("max-restore-bytes"),
            "{why}"
        );
    }
}
