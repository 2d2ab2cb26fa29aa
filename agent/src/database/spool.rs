//! The SQL of one RestoreDatabase, spooled to a private file and checked before psql sees a byte,
//! then read back into psql.
//!
//! Invariants:
//! - The spool is a new file (`O_CREAT|O_EXCL`, mode 0600) named `.deis-backup-sql-<pid>-<n>` in
//!   the agent's `spool-dir`. Its [`Spooled`] removes it when dropped: after success, after every
//!   error, and when the caller goes away. (Only an agent killed outright leaves one behind; it can
//!   be deleted.)
//! - Spooling hashes the compressed bytes as they are written and decompresses them once to
//!   measure every line against `max-sql-line`. The SQL is accepted only when the caller's stream
//!   ended cleanly, it is valid zstd within the agent's window limit, every line fits, and its
//!   SHA-256 equals the header's; otherwise it is refused before anything was run.
//! - Memory stays bounded whatever the input: lines are measured, never held (a line's first
//!   [`HEAD`] and last [`TAIL`] bytes are kept to name its statement).
//! - Spooling stops while the spool's filesystem still has a reserve free (1% of it, at most
//!   256 MiB, beyond the blocks kept for root); that and a full disk are `NoSpace` naming the
//!   spool directory.
//! - Feeding psql reads the spool back under the same line cap and holds at most one short line
//!   (to comment out `CREATE ROLE postgres;`, line numbers kept); pieces go out as they are
//!   decompressed.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use super::redact::{Statement, Statements, UNKNOWN};
use crate::config::DatabaseRestorePolicy;
use crate::error::{Error, Result};

/// How every spool file's name starts.
pub(super) const PREFIX: &str = ".deis-backup-sql-";
/// Bytes read from the decompressor at a time.
const READ_BYTES: usize = 64 * 1024;
/// First bytes of each line kept to name its statement.
const HEAD: usize = 256;
/// Last bytes of each line kept to see where its statement ends.
const TAIL: usize = 32;
/// Spooled bytes between two free-space checks.
const SPACE_CHECK_BYTES: u64 = 16 << 20;
/// Most free space kept back on the spool's filesystem.
const RESERVE_MAX: u64 = 256 << 20;
/// The line psql must not run (every cluster has the role), and what it becomes.
const SKIP: &[u8] = b"CREATE ROLE postgres;\n";
const SKIPPED: &[u8] = b"-- CREATE ROLE postgres; -- skipped by deis-backup-agent: it exists\n";

/// A spool file; removed when dropped.
struct SpoolFile {
    path: PathBuf,
    file: File,
}

impl SpoolFile {
    fn create(dir: &Path) -> Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut attempts = 0;
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("{PREFIX}{}-{n}", std::process::id()));
            // create_new is O_CREAT|O_EXCL: never an existing file, never through a symlink.
            let opened = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path);
            match opened {
                Ok(file) => return Ok(Self { path, file }),
                // A leftover of an earlier agent that had the same process id.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 1000 => {
                    attempts += 1;
                }
                Err(e) => return Err(fs_error("creating the SQL spool in", dir)(e)),
            }
        }
    }
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the SQL spool");
        }
    }
}

/// The error for a failing filesystem call in the spool directory: `NoSpace` for a full disk.
fn fs_error(op: &'static str, dir: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = dir.to_owned();
    move |source| match Errno::from_io_error(&source) {
        Some(Errno::NOSPC | Errno::DQUOT) => Error::NoSpace { path, source },
        _ => Error::Io { op, path, source },
    }
}

/// Fails when the spool's filesystem has less than its reserve free.
fn check_room(file: &File, dir: &Path) -> Result<()> {
    let st = rustix::fs::fstatvfs(file).map_err(|e| Error::Io {
        op: "checking the free space of",
        path: dir.to_owned(),
        source: e.into(),
    })?;
    let avail = st.f_bavail.saturating_mul(st.f_frsize);
    let reserve = reserve(st.f_blocks.saturating_mul(st.f_frsize));
    if avail < reserve {
        return Err(Error::NoSpace {
            path: dir.to_owned(),
            source: io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "spooling the SQL would leave less than {reserve} bytes free ({avail} left); \
                     free space there or point the agent's spool-dir at a larger filesystem"
                ),
            ),
        });
    }
    Ok(())
}

/// Free space kept back on a filesystem of `total` bytes.
fn reserve(total: u64) -> u64 {
    (total / 100).min(RESERVE_MAX)
}

/// What went wrong beside the decompressor, in the reader it reads through.
enum Failure {
    /// The caller's stream failed.
    Input(io::Error),
    /// Writing the spool failed.
    Spool(Error),
}

/// Reads the caller's compressed bytes, hashing them and writing them to the spool.
struct Tee<'a, R> {
    input: R,
    spool: &'a mut File,
    dir: &'a Path,
    /// Write to the spool (off when only the digest is still wanted).
    keep: bool,
    hasher: Sha256,
    count: u64,
    unchecked: u64,
    failed: Option<Failure>,
}

impl<R: Read> Tee<'_, R> {
    /// The failure beside the decompressor, if any: a spool error as it is, a broken stream as a
    /// refusal.
    fn take_failure(&mut self) -> Result<()> {
        match self.failed.take() {
            Some(Failure::Spool(e)) => Err(e),
            Some(Failure::Input(e)) => Err(Error::SqlRefused {
                reason: format!("the caller's stream broke off ({e})"),
            }),
            None => Ok(()),
        }
    }

    fn write_spool(&mut self, data: &[u8]) -> Result<()> {
        self.spool
            .write_all(data)
            .map_err(fs_error("writing the SQL spool in", self.dir))?;
        self.unchecked += data.len() as u64;
        if self.unchecked >= SPACE_CHECK_BYTES {
            self.unchecked = 0;
            check_room(self.spool, self.dir)?;
        }
        Ok(())
    }
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.input.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(e) => {
                self.failed = Some(Failure::Input(e));
                return Err(io::Error::other("the caller's stream failed"));
            }
        };
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if self.keep
            && n > 0
            && let Err(e) = self.write_spool(&buf[..n])
        {
            self.failed = Some(Failure::Spool(e));
            return Err(io::Error::other("the spool failed"));
        }
        Ok(n)
    }
}

/// Input line `line` is longer than the cap.
#[derive(Debug)]
pub(super) struct TooLong {
    pub line: u64,
    pub kind: String,
}

/// Splits decompressed SQL into lines: numbers them, measures them against the cap and follows
/// their statements, keeping only each line's first and last bytes.
pub(super) struct Scanner {
    max_line: u64,
    /// Number of the current line, from 1.
    line: u64,
    /// Bytes of the current line so far, newline excluded.
    len: u64,
    head: Vec<u8>,
    tail: Vec<u8>,
    statements: Statements,
    watch: Watch,
}

/// A line whose statement is wanted (see [`Spooled::statement_at`]).
#[derive(Debug, PartialEq, Eq)]
enum Watch {
    None,
    /// This line, not ended yet.
    Line(u64),
    /// The statement of the line watched, once it has ended.
    Seen(Option<Statement>),
}

impl Scanner {
    pub(super) fn new(max_line: u64) -> Self {
        Self {
            max_line,
            line: 1,
            len: 0,
            head: Vec::with_capacity(HEAD),
            tail: Vec::with_capacity(TAIL * 2),
            statements: Statements::default(),
            watch: Watch::None,
        }
    }

    /// Takes the next piece of SQL; calls `piece` with each part of it that lies within one line,
    /// and whether it ends that line. Refuses a line longer than the cap before passing on any
    /// byte beyond the cap.
    pub(super) fn push(
        &mut self,
        data: &[u8],
        mut piece: impl FnMut(&[u8], bool),
    ) -> Result<(), TooLong> {
        let mut rest = data;
        while !rest.is_empty() {
            let (seg, ends) = match rest.iter().position(|b| *b == b'\n') {
                Some(p) => (&rest[..=p], true),
                None => (rest, false),
            };
            rest = &rest[seg.len()..];
            let content = if ends { &seg[..seg.len() - 1] } else { seg };
            self.len += content.len() as u64;
            self.remember(content);
            if self.len > self.max_line {
                return Err(self.too_long());
            }
            piece(seg, ends);
            if ends {
                self.end_line();
            }
        }
        Ok(())
    }

    /// Ends the input: a last line without a newline counts as a line.
    pub(super) fn finish(&mut self) {
        if self.len > 0 {
            self.end_line();
        }
    }

    /// Lines ended so far.
    pub(super) fn lines(&self) -> u64 {
        self.line - 1
    }

    fn remember(&mut self, content: &[u8]) {
        let room = HEAD.saturating_sub(self.head.len());
        self.head
            .extend_from_slice(&content[..room.min(content.len())]);
        self.tail
            .extend_from_slice(&content[content.len().saturating_sub(TAIL)..]);
        if self.tail.len() > TAIL {
            self.tail.drain(..self.tail.len() - TAIL);
        }
    }

    fn whole(&self) -> bool {
        self.len <= HEAD as u64
    }

    fn end_line(&mut self) {
        self.statements
            .line(self.line, &self.head, self.whole(), &self.tail);
        if self.watch == Watch::Line(self.line) {
            self.watch = Watch::Seen(self.statements.current().cloned());
        }
        self.line += 1;
        self.len = 0;
        self.head.clear();
        self.tail.clear();
    }

    fn too_long(&self) -> TooLong {
        let mut s = self.statements.clone();
        s.line(self.line, &self.head, false, &self.tail);
        TooLong {
            line: self.line,
            kind: s.current().map_or(UNKNOWN, |s| s.kind.as_str()).to_owned(),
        }
    }
}

/// Why decompressed SQL could not be measured.
#[derive(Debug)]
pub(super) enum LinesError {
    TooLong(TooLong),
    Read(io::Error),
}

fn read_some(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Reads decompressed SQL to its end, measuring every line against `max_line`; returns its byte
/// and line counts. Stops at the first line over the cap, having read at most the cap and one
/// read's worth beyond the line's start.
pub(super) fn check_lines(mut decoded: impl Read, max_line: u64) -> Result<(u64, u64), LinesError> {
    let mut scanner = Scanner::new(max_line);
    let mut buf = vec![0u8; READ_BYTES];
    let mut raw = 0u64;
    loop {
        let n = read_some(&mut decoded, &mut buf).map_err(LinesError::Read)?;
        if n == 0 {
            break;
        }
        raw += n as u64;
        scanner
            .push(&buf[..n], |_, _| {})
            .map_err(LinesError::TooLong)?;
    }
    scanner.finish();
    Ok((raw, scanner.lines()))
}

fn decoder<R: Read>(
    input: R,
    window_log: u32,
) -> io::Result<zstd::Decoder<'static, io::BufReader<R>>> {
    let mut dec = zstd::Decoder::new(input)?;
    dec.window_log_max(window_log)?;
    Ok(dec)
}

/// The SQL of one restore, spooled and checked.
pub(super) struct Spooled {
    spool: SpoolFile,
    /// Compressed bytes.
    pub compressed: u64,
    /// Decompressed bytes.
    pub raw: u64,
    /// Lines.
    pub lines: u64,
}

/// Spools the compressed SQL read from `input` into a new file in the policy's spool directory
/// and checks it (see the module doc) against `expected`, the header's SHA-256.
pub(super) fn spool(
    input: impl Read,
    policy: &DatabaseRestorePolicy,
    window_log: u32,
    expected: &[u8; 32],
) -> Result<Spooled> {
    let dir = policy.spool_dir.as_path();
    let mut spool = SpoolFile::create(dir)?;
    check_room(&spool.file, dir)?;
    let (compressed, raw, lines) = spool_into(
        input,
        &mut spool.file,
        dir,
        policy.max_line,
        window_log,
        expected,
    )?;
    Ok(Spooled {
        spool,
        compressed,
        raw,
        lines,
    })
}

/// [`spool`] into an open file `out` in `dir`.
fn spool_into(
    input: impl Read,
    out: &mut File,
    dir: &Path,
    max_line: u64,
    window_log: u32,
    expected: &[u8; 32],
) -> Result<(u64, u64, u64)> {
    let refuse = |reason: String| Error::SqlRefused { reason };
    let mut tee = Tee {
        input,
        spool: out,
        dir,
        keep: true,
        hasher: Sha256::new(),
        count: 0,
        unchecked: 0,
        failed: None,
    };
    let checked = match decoder(&mut tee, window_log) {
        Ok(dec) => check_lines(dec, max_line),
        Err(e) => Err(LinesError::Read(e)),
    };
    tee.take_failure()?;
    let (raw, lines) = match checked {
        Ok(counts) => counts,
        Err(LinesError::TooLong(t)) => {
            return Err(Error::Limit {
                what: format!(
                    "SQL line {} ({} statement) is longer than the agent's max-sql-line \
                     ({} bytes); refused before anything was run",
                    t.line, t.kind, max_line
                ),
            });
        }
        Err(LinesError::Read(e)) => {
            // A tampered body usually fails to decompress: hash the rest to say which it is.
            tee.keep = false;
            let drained = io::copy(&mut tee, &mut io::sink());
            tee.take_failure()?;
            drained.map_err(|e| refuse(format!("the caller's stream failed ({e})")))?;
            let digest: [u8; 32] = tee.hasher.finalize().into();
            return Err(refuse(if digest == *expected {
                format!(
                    "it is not valid zstd, or needs a larger window than the agent's \
                     max-zstd-window-log ({window_log}) allows: {e}"
                )
            } else {
                "its sha256 differs from the header's (and it does not decompress)".to_owned()
            }));
        }
    };
    // Nothing follows the last frame in a sound body; whatever does still counts in the digest.
    let drained = io::copy(&mut tee, &mut io::sink());
    tee.take_failure()?;
    drained.map_err(|e| refuse(format!("the caller's stream failed ({e})")))?;
    let digest: [u8; 32] = tee.hasher.finalize().into();
    if digest != *expected {
        return Err(refuse("its sha256 differs from the header's".to_owned()));
    }
    Ok((tee.count, raw, lines))
}

/// Why feeding psql stopped.
#[derive(Debug)]
pub(super) enum FeedError {
    TooLong(TooLong),
    /// Reading back or decompressing the SQL failed at input line `line`.
    Read {
        line: u64,
        source: io::Error,
    },
    /// psql stopped reading.
    Closed,
}

/// Sends decompressed SQL on with `send` (false when the receiver is gone), line by line under
/// the cap, with `CREATE ROLE postgres;` commented out; returns the bytes read.
pub(super) fn feed(
    mut decoded: impl Read,
    max_line: u64,
    mut send: impl FnMut(Bytes) -> bool,
) -> Result<u64, FeedError> {
    let mut scanner = Scanner::new(max_line);
    let mut buf = vec![0u8; READ_BYTES];
    // The start of the current line while it may still be the line to skip.
    let mut hold: Vec<u8> = Vec::with_capacity(SKIP.len());
    let mut line_len = 0usize;
    let mut raw = 0u64;
    loop {
        let n = read_some(&mut decoded, &mut buf).map_err(|source| FeedError::Read {
            line: scanner.line,
            source,
        })?;
        if n == 0 {
            break;
        }
        raw += n as u64;
        let mut out = Vec::with_capacity(n + SKIPPED.len());
        scanner
            .push(&buf[..n], |seg, ends| {
                line_len += seg.len();
                if line_len <= SKIP.len() {
                    hold.extend_from_slice(seg);
                } else {
                    out.append(&mut hold);
                    out.extend_from_slice(seg);
                }
                if ends {
                    if hold == SKIP {
                        out.extend_from_slice(SKIPPED);
                        hold.clear();
                    } else {
                        out.append(&mut hold);
                    }
                    line_len = 0;
                }
            })
            .map_err(FeedError::TooLong)?;
        if !out.is_empty() && !send(Bytes::from(out)) {
            return Err(FeedError::Closed);
        }
    }
    if !hold.is_empty() && !send(Bytes::from(hold)) {
        return Err(FeedError::Closed);
    }
    Ok(raw)
}

impl Spooled {
    /// The spooled SQL, decompressed, from its start.
    fn sql(&mut self, window_log: u32) -> io::Result<impl Read + '_> {
        self.spool.file.rewind()?;
        decoder(&self.spool.file, window_log)
    }

    /// [`feed`]s the spooled SQL to `send`.
    pub(super) fn feed(
        &mut self,
        max_line: u64,
        window_log: u32,
        send: impl FnMut(Bytes) -> bool,
    ) -> Result<u64, FeedError> {
        let sql = self
            .sql(window_log)
            .map_err(|source| FeedError::Read { line: 1, source })?;
        feed(sql, max_line, send)
    }

    /// The statement input line `line` belongs to, reading the spool again up to that line.
    pub(super) fn statement_at(&mut self, line: u64, window_log: u32) -> Option<Statement> {
        let mut sql = self.sql(window_log).ok()?;
        let mut scanner = Scanner::new(u64::MAX);
        scanner.watch = Watch::Line(line);
        let mut buf = vec![0u8; READ_BYTES];
        loop {
            if let Watch::Seen(seen) = scanner.watch {
                return seen;
            }
            let n = read_some(&mut sql, &mut buf).ok()?;
            if n == 0 {
                scanner.finish();
                return match scanner.watch {
                    Watch::Seen(seen) => seen,
                    _ => None,
                };
            }
            // Lines past the one watched move the statements on, but its own is kept.
            scanner.push(&buf[..n], |_, _| {}).ok()?;
        }
    }

    /// The spool file's path.
    #[cfg(test)]
    fn path(&self) -> &Path {
        &self.spool.path
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn policy(dir: &Path, max_line: u64) -> DatabaseRestorePolicy {
        DatabaseRestorePolicy {
            enabled: true,
            drill: true,
            max_line,
            spool_dir: dir.to_owned(),
        }
    }

    fn zst(sql: &[u8]) -> (Vec<u8>, [u8; 32]) {
        let z = zstd::encode_all(sql, 3).unwrap();
        let sha = Sha256::digest(&z).into();
        (z, sha)
    }

    fn left_in(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Counts the bytes read through it.
    struct Counted<R> {
        inner: R,
        n: u64,
    }

    impl<R: Read> Read for Counted<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.n += n as u64;
            Ok(n)
        }
    }

    #[test]
    fn a_sound_body_is_spooled_privately_checked_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let sql = b"CREATE ROLE postgres;\nCREATE ROLE deis;\nSELECT 1;\n";
        let (z, sha) = zst(sql);
        let mut s = spool(z.as_slice(), &policy(dir.path(), 64), 27, &sha).unwrap();
        assert_eq!(
            (s.compressed, s.raw, s.lines),
            (z.len() as u64, sql.len() as u64, 3)
        );
        let name = s.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(PREFIX), "{name}");
        let mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read(s.path()).unwrap(), z);
        let mut fed = Vec::new();
        let raw = s
            .feed(64, 27, |b| {
                fed.extend_from_slice(&b);
                true
            })
            .unwrap();
        assert_eq!(raw, sql.len() as u64);
        assert_eq!(
            String::from_utf8(fed).unwrap(),
            "-- CREATE ROLE postgres; -- skipped by deis-backup-agent: it exists\n\
             CREATE ROLE deis;\nSELECT 1;\n"
        );
        assert_eq!(s.statement_at(2, 27).unwrap().kind, "CREATE ROLE");
        assert_eq!(s.statement_at(3, 27).unwrap().start, 3);
        drop(s);
        assert!(left_in(dir.path()).is_empty(), "the spool is removed");
    }

    #[test]
    fn a_tampered_body_is_refused_before_psql_and_the_spool_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (_, announced) = zst(b"SELECT 1;\n");
        let (sent, _) = zst(b"CREATE DATABASE evil;\n");
        let e = spool(sent.as_slice(), &policy(dir.path(), 64), 27, &announced)
            .err()
            .unwrap();
        assert!(matches!(e, Error::SqlRefused { .. }), "{e}");
        assert_eq!(e.status().code(), tonic::Code::InvalidArgument);
        let msg = e.to_string();
        assert!(msg.contains("refused before anything was run"), "{msg}");
        assert!(msg.contains("sha256 differs"), "{msg}");
        assert!(left_in(dir.path()).is_empty(), "{:?}", left_in(dir.path()));

        // Bytes flipped inside the frame: it no longer decompresses, and the digest says why.
        let (mut z, sha) = zst(b"SELECT 1;\nSELECT 2;\n");
        let mid = z.len() / 2;
        z[mid] ^= 0xff;
        let e = spool(z.as_slice(), &policy(dir.path(), 64), 27, &sha)
            .err()
            .unwrap();
        assert!(matches!(e, Error::SqlRefused { .. }), "{e}");
        assert!(left_in(dir.path()).is_empty());

        // Sound zstd followed by extra bytes: refused too.
        let (mut z, _) = zst(b"SELECT 1;\n");
        z.extend_from_slice(b"junk");
        let sha = Sha256::digest(&z).into();
        let e = spool(z.as_slice(), &policy(dir.path(), 64), 27, &sha)
            .err()
            .unwrap();
        assert!(matches!(e, Error::SqlRefused { .. }), "{e}");
    }

    #[test]
    fn a_broken_stream_is_refused_and_the_spool_removed() {
        struct Breaks(bool);
        impl Read for Breaks {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if std::mem::replace(&mut self.0, true) {
                    Err(io::Error::new(io::ErrorKind::UnexpectedEof, "broke off"))
                } else {
                    let (z, _) = zst(b"SELECT 1;\n");
                    let n = z.len() / 2;
                    buf[..n].copy_from_slice(&z[..n]);
                    Ok(n)
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let e = spool(Breaks(false), &policy(dir.path(), 64), 27, &[0; 32])
            .err()
            .unwrap();
        assert!(e.to_string().contains("broke off"), "{e}");
        assert!(left_in(dir.path()).is_empty());
    }

    #[test]
    fn a_line_without_end_is_refused_after_about_the_cap() {
        const CAP: u64 = 1 << 20;
        // 100 MiB of one line, a few KiB compressed.
        let mut enc = zstd::Encoder::new(Vec::new(), 3).unwrap();
        io::copy(&mut io::repeat(b'a').take(100 << 20), &mut enc).unwrap();
        let z = enc.finish().unwrap();
        let sha = Sha256::digest(&z).into();

        // Measured on the decompressed side: reading stops within one read of the cap.
        let mut counted = Counted {
            inner: zstd::Decoder::new(z.as_slice()).unwrap(),
            n: 0,
        };
        match check_lines(&mut counted, CAP) {
            Err(LinesError::TooLong(t)) => assert_eq!(t.line, 1),
            other => panic!("{other:?}"),
        }
        assert!(counted.n <= CAP + READ_BYTES as u64, "read {}", counted.n);

        let mut counted = Counted {
            inner: zstd::Decoder::new(z.as_slice()).unwrap(),
            n: 0,
        };
        let mut sent = 0u64;
        match feed(&mut counted, CAP, |b| {
            sent += b.len() as u64;
            true
        }) {
            Err(FeedError::TooLong(t)) => assert_eq!(t.line, 1),
            other => panic!("{other:?}"),
        }
        assert!(counted.n <= CAP + READ_BYTES as u64, "read {}", counted.n);
        assert!(sent <= CAP, "sent {sent} bytes past the cap");

        // Through the spool: a Limit naming the line and the cap, nothing left behind.
        let dir = tempfile::tempdir().unwrap();
        let e = spool(z.as_slice(), &policy(dir.path(), CAP), 27, &sha)
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(matches!(e, Error::Limit { .. }), "{msg}");
        assert!(
            msg.contains("SQL line 1 ") && msg.contains("(1048576 bytes)"),
            "{msg}"
        );
        assert!(
            msg.contains("max-sql-line") && msg.contains("before anything was run"),
            "{msg}"
        );
        assert!(left_in(dir.path()).is_empty());
    }

    #[test]
    fn the_cap_counts_each_line_and_names_its_statement() {
        let sql = b"SELECT 1;\nCOPY public.t (a) FROM stdin;\nshort\nthis data line is longer than the rest\n\\.\n";
        match check_lines(sql.as_slice(), 12) {
            Err(LinesError::TooLong(t)) => {
                assert_eq!((t.line, t.kind.as_str()), (2, "COPY"));
            }
            other => panic!("{other:?}"),
        }
        match check_lines(sql.as_slice(), 30) {
            Err(LinesError::TooLong(t)) => {
                assert_eq!(
                    (t.line, t.kind.as_str()),
                    (4, "COPY"),
                    "data lines are COPY's"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            check_lines(sql.as_slice(), 38).unwrap(),
            (sql.len() as u64, 5)
        );
        assert!(
            check_lines(sql.as_slice(), 37).is_err(),
            "the cap is inclusive"
        );
        assert_eq!(check_lines(b"a\nno end".as_slice(), 31).unwrap().1, 2);
    }

    #[test]
    fn feeding_keeps_line_numbers_and_only_skips_the_exact_line() {
        let sql = b"CREATE ROLE postgres;\nCREATE ROLE postgres; -- no\nCREATE ROLE postgres;";
        let mut fed = Vec::new();
        // One byte at a time: a held line is whole whatever the pieces.
        let reader = io::BufReader::with_capacity(1, sql.as_slice());
        feed(reader, 64, |b| {
            fed.extend_from_slice(&b);
            true
        })
        .unwrap();
        let fed = String::from_utf8(fed).unwrap();
        assert_eq!(fed.lines().count(), 3);
        assert!(
            fed.starts_with("-- CREATE ROLE postgres; -- skipped"),
            "{fed}"
        );
        assert!(
            fed.contains("\nCREATE ROLE postgres; -- no\nCREATE ROLE postgres;"),
            "{fed}"
        );
        assert!(matches!(
            feed(sql.as_slice(), 64, |_| false),
            Err(FeedError::Closed)
        ));
    }

    #[test]
    fn a_full_disk_is_no_space_naming_the_spool_directory() {
        let Ok(mut full) = OpenOptions::new().write(true).open("/dev/full") else {
            panic!("this test needs /dev/full");
        };
        let (z, sha) = zst(b"SELECT 1;\n");
        let dir = Path::new("/spool/dir");
        let e = spool_into(z.as_slice(), &mut full, dir, 64, 27, &sha)
            .err()
            .unwrap();
        assert!(matches!(e, Error::NoSpace { .. }), "{e}");
        assert!(e.to_string().contains("/spool/dir"), "{e}");
        assert_eq!(e.status().code(), tonic::Code::ResourceExhausted);
        assert_eq!(reserve(10 << 30), (10 << 30) / 100);
        assert_eq!(reserve(1 << 40), RESERVE_MAX);
    }

    #[test]
    fn a_missing_spool_directory_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let (z, sha) = zst(b"SELECT 1;\n");
        let e = spool(z.as_slice(), &policy(&gone, 64), 27, &sha)
            .err()
            .unwrap();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(e.to_string().contains("gone"), "{e}");
    }
}
