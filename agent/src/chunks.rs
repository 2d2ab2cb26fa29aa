//! The byte plumbing shared by the streaming calls: a `Write` that turns compressed bytes into
//! bounded gRPC `Chunk`s, a counting writer, and a `Read` over a channel of incoming pieces.
//!
//! Invariants:
//! - Memory is bounded: a sink holds at most one chunk (`CHUNK_BYTES`) and blocks on a bounded channel
//!   when the caller reads slowly, which stalls the producer (backpressure end to end).
//! - The SHA-256 and byte count a sink reports cover exactly the bytes it handed to the caller as
//!   data chunks since the previous report (one segment), or since it was made.
//! - A sink whose receiver is gone fails with `BrokenPipe`, which stops the producer.
//! - These types block: they run on blocking threads, never on the async runtime's workers.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use deis_backup_proto::v1::{Chunk, chunk};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::Status;

/// Size of one data chunk sent to the caller.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks queued towards the caller before the producer blocks.
pub const QUEUE_CHUNKS: usize = 4;

/// The sending half of a download stream.
pub type ChunkTx = mpsc::Sender<Result<Chunk, Status>>;

/// Receives compressed bytes and forwards them as data chunks.
pub struct ChunkSink {
    tx: ChunkTx,
    buf: Vec<u8>,
    hasher: Sha256,
    /// Bytes sent since the last `end_segment`.
    sent: u64,
    /// Bytes sent in all.
    total: u64,
}

impl ChunkSink {
    pub fn new(tx: ChunkTx) -> Self {
        Self {
            tx,
            buf: Vec::with_capacity(CHUNK_BYTES),
            hasher: Sha256::new(),
            sent: 0,
            total: 0,
        }
    }

    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES));
        self.hasher.update(&data);
        self.sent += data.len() as u64;
        self.total += data.len() as u64;
        self.tx
            .blocking_send(Ok(Chunk {
                kind: Some(chunk::Kind::Data(data)),
            }))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the caller went away"))
    }

    /// Sends what is buffered; returns the byte count and SHA-256 of everything sent.
    pub fn finish(mut self) -> io::Result<(u64, [u8; 32])> {
        self.end_segment()
    }

    /// Sends what is buffered; returns the byte count and SHA-256 of what was sent since the
    /// previous call (or since the start), and starts counting afresh.
    pub fn end_segment(&mut self) -> io::Result<(u64, [u8; 32])> {
        self.send_buf()?;
        let n = std::mem::take(&mut self.sent);
        Ok((n, self.hasher.finalize_reset().into()))
    }

    /// Sends what is buffered, then `kind` as a message of its own.
    pub fn send(&mut self, kind: chunk::Kind) -> io::Result<()> {
        self.send_buf()?;
        self.tx
            .blocking_send(Ok(Chunk { kind: Some(kind) }))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the caller went away"))
    }

    /// Bytes sent as data chunks in all.
    pub fn total(&self) -> u64 {
        self.total
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK_BYTES - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK_BYTES {
            self.send_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Counts the bytes written through it.
pub struct Counting<W> {
    pub inner: W,
    pub count: u64,
}

impl<W> Counting<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, count: 0 }
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// zstd's unit of work per worker thread in multithreaded mode. Its default at level 3 is 8 MiB,
/// and zstd keeps several jobs' input and output buffers per worker; 1 MiB keeps the agent's peak
/// memory well under 64 MiB with a few workers, at a negligible cost in ratio.
const ZSTD_JOB_BYTES: u32 = 1 << 20;

/// The agent's zstd settings: `level`, a content checksum, and with `workers` > 0 that many
/// compression threads besides the caller's, in jobs of [`ZSTD_JOB_BYTES`].
fn zstd_parameters(level: i32, workers: u32) -> Vec<zstd::zstd_safe::CParameter> {
    use zstd::zstd_safe::CParameter;
    let mut p = vec![
        CParameter::CompressionLevel(level),
        CParameter::ChecksumFlag(true),
    ];
    if workers > 0 {
        p.extend([
            CParameter::NbWorkers(workers),
            CParameter::JobSize(ZSTD_JOB_BYTES),
        ]);
    }
    p
}

/// A zstd compression context with the agent's settings ([`zstd_parameters`]). One context writes
/// many frames in turn ([`zstd::Encoder::with_context`]), keeping its threads and buffers between
/// them.
pub fn compression_context(level: i32, workers: u32) -> io::Result<zstd::zstd_safe::CCtx<'static>> {
    let mut cctx = zstd::zstd_safe::CCtx::try_create()
        .ok_or_else(|| io::Error::other("zstd could not allocate a compression context"))?;
    for p in zstd_parameters(level, workers) {
        cctx.set_parameter(p)
            .map_err(|code| io::Error::other(zstd::zstd_safe::get_error_name(code)))?;
    }
    Ok(cctx)
}

/// A zstd encoder of one stream with the agent's settings ([`zstd_parameters`]).
pub fn encoder<W: Write>(
    inner: W,
    level: i32,
    workers: u32,
) -> io::Result<zstd::Encoder<'static, W>> {
    let mut enc = zstd::Encoder::new(inner, level)?;
    for p in zstd_parameters(level, workers) {
        enc.set_parameter(p)?;
    }
    Ok(enc)
}

/// A `Read` over pieces arriving on a channel; also hashes and counts them. When the sender set
/// `broken` before closing the channel, the end is an error, not an end of file: a caller's stream
/// that failed half-way never looks complete.
pub struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
    hasher: Sha256,
    count: u64,
    broken: Arc<AtomicBool>,
}

impl ChannelReader {
    pub fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        Self::with_broken_flag(rx, Arc::default())
    }

    pub fn with_broken_flag(rx: mpsc::Receiver<Bytes>, broken: Arc<AtomicBool>) -> Self {
        Self {
            rx,
            cur: Bytes::new(),
            hasher: Sha256::new(),
            count: 0,
            broken,
        }
    }

    /// Bytes received so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Reads to the end of the channel, then returns the count and SHA-256 of everything received.
    pub fn finish(mut self) -> io::Result<(u64, [u8; 32])> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((self.count, self.hasher.finalize().into()))
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    self.hasher.update(&b);
                    self.count += b.len() as u64;
                    self.cur = b;
                }
                None if self.broken.load(Ordering::SeqCst) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the caller's stream broke off",
                    ));
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// The last `cap` bytes of a byte stream (stderr, output), as lossy UTF-8.
#[derive(Debug, Default)]
pub struct Tail {
    buf: Vec<u8>,
    cap: usize,
}

impl Tail {
    pub fn new(cap: usize) -> Self {
        Self {
            buf: Vec::new(),
            cap,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        if self.buf.len() > self.cap {
            let cut = self.buf.len() - self.cap;
            self.buf.drain(..cut);
        }
    }

    pub fn text(&self) -> String {
        let t = String::from_utf8_lossy(&self.buf).trim().to_owned();
        if t.is_empty() { "(nothing)".into() } else { t }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_chunks_hash_and_backpressure() {
        let (tx, mut rx) = mpsc::channel(1);
        let writer = std::thread::spawn(move || {
            let mut s = ChunkSink::new(tx);
            s.write_all(&vec![7u8; CHUNK_BYTES * 3 + 5]).unwrap();
            s.finish().unwrap()
        });
        let mut got = Vec::new();
        while let Some(c) = rx.blocking_recv() {
            match c.unwrap().kind {
                Some(chunk::Kind::Data(d)) => {
                    assert!(d.len() <= CHUNK_BYTES);
                    got.extend(d);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let (n, sha) = writer.join().unwrap();
        assert_eq!(n, got.len() as u64);
        assert_eq!(got.len(), CHUNK_BYTES * 3 + 5);
        assert_eq!(sha, <[u8; 32]>::from(Sha256::digest(&got)));
    }

    #[test]
    fn sink_fails_when_caller_is_gone() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut s = ChunkSink::new(tx);
        let e = s.write_all(&vec![0u8; CHUNK_BYTES]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn tail_keeps_the_end() {
        let mut t = Tail::new(4);
        t.push(b"abcdef");
        t.push(b"gh");
        assert_eq!(t.text(), "efgh");
    }
}
