//! Checking a store archive's compressed bytes against the segments its header announces.
//!
//! Invariants: every byte belongs to an announced segment, in order; each segment's size and
//! sha256 are checked as soon as its last byte passes; bytes past the last segment, or an end
//! inside one, are errors. The caller makes sure segments are announced (none is not "no check").

use std::collections::VecDeque;
use std::io::{self, Read};

use sha2::{Digest, Sha256};

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Checks the archive's bytes against the announced segments as they pass through.
pub struct SegmentCheck<R> {
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
    pub fn new(inner: R, segments: Vec<(u64, Vec<u8>)>) -> Self {
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
    pub fn finish(mut self) -> io::Result<()> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(())
    }
}

impl<R: Read> Read for SegmentCheck<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
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
