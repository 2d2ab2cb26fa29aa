//! Downloads: the size and ETag of an object, an object streamed into a [`ChunkSink`], and a large
//! object in concurrent ranges into a file.
//!
//! Owns: [`ChunkSink`] (where a streamed download's bytes go) and [`DOWNLOAD_RANGE`].
//! Invariants:
//! - Bodies stream: a download goes chunk by chunk into its sink, or range by range at offsets of
//!   a file; no object is held in memory whole.
//! - A download is checked against its `Content-Length` and, where the ETag is a plain MD5, its
//!   MD5; a failed attempt of a streamed download resets the sink and starts over.
//! - The ranges after the first are sent with `If-Match` of the first range's ETag, so an object
//!   replaced mid-download fails instead of mixing versions; each range is retried on its own.
//! - Every chunk received passes the optional bandwidth cap and is counted.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::Ordering;

use md5::{Digest as _, Md5};
use tokio::io::AsyncSeekExt as _;

use super::Client;
use super::digest::digest_file;
use super::etag::{etag_is_md5, unquote};
use super::failure::{Class, Failure};
use super::meta::{ObjectHead, head_of, to_u64};
use crate::error::{Error, ErrorKind, Result};

/// Objects larger than this are downloaded with concurrent ranged GETs of this size.
pub const DOWNLOAD_RANGE: u64 = 8 * 1024 * 1024;

/// Where a download's bytes go. `reset` is called before every attempt (a retry starts over).
pub trait ChunkSink: Send {
    fn reset(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
    fn write(&mut self, chunk: &[u8]) -> impl Future<Output = std::io::Result<()>> + Send;
}

impl Client {
    /// Size and ETag of an object, `None` when it does not exist.
    pub async fn head_object(&self, bucket: &str, key: &str) -> Result<Option<(u64, String)>> {
        let what = format!("reading s3://{bucket}/{key}");
        match self
            .run(&what, |c| async move {
                let o = c
                    .head_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| Failure::from_sdk(&e))?;
                Ok((
                    to_u64(o.content_length()),
                    unquote(o.e_tag().unwrap_or_default()),
                ))
            })
            .await
        {
            Ok(v) => Ok(Some(v)),
            Err((f, _)) if f.is_not_found() => Ok(None),
            Err((f, ep)) => Err(f.into_error(&what, &ep)),
        }
    }

    /// Downloads an object into the file at `path` with concurrent ranged GETs of
    /// [`DOWNLOAD_RANGE`] bytes (for large objects: one slow stream no longer sets the pace). The
    /// first range learns the size, ETag and headers; the others are sent with `If-Match` so an
    /// object replaced mid-download fails instead of mixing versions. Each range is retried on its
    /// own. The whole file is then read once: checked against a plain-MD5 ETag, and its SHA-256
    /// returned (so a caller storing it by hash need not read it again).
    pub async fn get_object_ranged(
        &self,
        bucket: &str,
        key: &str,
        path: &Path,
    ) -> Result<(ObjectHead, [u8; 32])> {
        use futures::{StreamExt as _, TryStreamExt as _};
        let what = format!("downloading s3://{bucket}/{key}");
        let first = self.get_range(bucket, key, path, 0, None, &what).await?;
        let (head, total) = first;
        let ranges: Vec<u64> = (1..total.div_ceil(DOWNLOAD_RANGE))
            .map(|i| i * DOWNLOAD_RANGE)
            .collect();
        let etag = head.etag.clone();
        futures::stream::iter(ranges)
            .map(|offset| self.get_range(bucket, key, path, offset, Some(&etag), &what))
            .buffer_unordered(4)
            .try_for_each(|(_, t)| {
                let what = &what;
                async move {
                    if t == total {
                        Ok(())
                    } else {
                        Err(Error::new(
                            ErrorKind::Gateway,
                            format!("{what}: the object changed size during the download"),
                            "run again",
                        ))
                    }
                }
            })
            .await?;
        let (md5, sha256) = digest_file(path, total, etag_is_md5(&etag)).await?;
        if md5.is_some_and(|md5| hex::encode(md5) != etag.to_ascii_lowercase()) {
            return Err(Error::integrity(format!(
                "{what}: the bytes received do not match the object's MD5 ETag"
            )));
        }
        Ok((
            ObjectHead {
                size: total,
                ..head
            },
            sha256,
        ))
    }

    /// One range `[offset, offset + DOWNLOAD_RANGE)` of an object written at `offset` of `path`;
    /// returns the object's head and total size (from `Content-Range`).
    async fn get_range(
        &self,
        bucket: &str,
        key: &str,
        path: &Path,
        offset: u64,
        if_match: Option<&str>,
        what: &str,
    ) -> Result<(ObjectHead, u64)> {
        self.call(what, |c| async move {
            let mut file = tokio::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .await
                .map_err(|e| Failure::new(Class::Local, format!("open {}: {e}", path.display())))?;
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|e| Failure::new(Class::Local, format!("seek {}: {e}", path.display())))?;
            let mut o = c
                .get_object()
                .bucket(bucket)
                .key(key)
                .range(format!("bytes={offset}-{}", offset + DOWNLOAD_RANGE - 1))
                .set_if_match(if_match.map(|e| format!("\"{e}\"")))
                .send()
                .await
                .map_err(|e| Failure::from_sdk(&e))?;
            let len = to_u64(o.content_length());
            let total = o
                .content_range()
                .and_then(|r| r.rsplit('/').next())
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(len);
            let mut got = 0u64;
            while let Some(chunk) = o.body.next().await {
                let chunk = chunk.map_err(|e| {
                    Failure::new(
                        Class::Overload,
                        format!("body cut short after {got} bytes: {e}"),
                    )
                })?;
                if let Some(bw) = &self.bandwidth {
                    bw.take(chunk.len()).await;
                }
                got += chunk.len() as u64;
                self.counters
                    .bytes_downloaded
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                    .await
                    .map_err(|e| Failure::new(Class::Local, e.to_string()))?;
            }
            tokio::io::AsyncWriteExt::flush(&mut file)
                .await
                .map_err(|e| Failure::new(Class::Local, e.to_string()))?;
            if got != len || (total > 0 && got != DOWNLOAD_RANGE.min(total - offset.min(total))) {
                return Err(Failure::new(
                    Class::Transient,
                    format!("range at {offset}: got {got} bytes, Content-Length said {len}"),
                ));
            }
            Ok((head_of(&o, total), total))
        })
        .await
    }

    /// Streams an object into `sink`, checking its length and (MD5 ETags) its MD5; a failed attempt
    /// resets the sink and starts over.
    pub async fn get_object<S: ChunkSink>(
        &self,
        bucket: &str,
        key: &str,
        sink: &mut S,
    ) -> Result<ObjectHead> {
        let what = format!("downloading s3://{bucket}/{key}");
        let sink = tokio::sync::Mutex::new(sink);
        self.call(&what, |c| {
            let sink = &sink;
            async move {
                let mut sink = sink.lock().await;
                sink.reset()
                    .await
                    .map_err(|e| Failure::new(Class::Local, e.to_string()))?;
                let mut o = c
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| Failure::from_sdk(&e))?;
                let size = to_u64(o.content_length());
                let etag = unquote(o.e_tag().unwrap_or_default());
                let mut md5 = Md5::new();
                let mut got = 0u64;
                while let Some(chunk) = o.body.next().await {
                    let chunk = chunk.map_err(|e| {
                        Failure::new(
                            Class::Overload,
                            format!("body cut short after {got} bytes: {e}"),
                        )
                    })?;
                    if let Some(bw) = &self.bandwidth {
                        bw.take(chunk.len()).await;
                    }
                    md5.update(&chunk);
                    got += chunk.len() as u64;
                    self.counters
                        .bytes_downloaded
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    sink.write(&chunk)
                        .await
                        .map_err(|e| Failure::new(Class::Local, e.to_string()))?;
                }
                if got != size {
                    return Err(Failure::new(
                        Class::Transient,
                        format!("got {got} bytes, Content-Length said {size}"),
                    ));
                }
                if etag_is_md5(&etag) && hex::encode(md5.finalize()) != etag.to_ascii_lowercase() {
                    return Err(Failure::new(
                        Class::Transient,
                        "the bytes received do not match the object's MD5 ETag",
                    ));
                }
                Ok(head_of(&o, size))
            }
        })
        .await
    }

    /// A small object's bytes (a WAL-E sentinel): more than `max` is an error.
    pub async fn get_small(&self, bucket: &str, key: &str, max: u64) -> Result<Vec<u8>> {
        let mut sink = SmallSink(Vec::new(), max);
        self.get_object(bucket, key, &mut sink).await?;
        Ok(sink.0)
    }
}

/// Collects an object of at most `.1` bytes in memory.
struct SmallSink(Vec<u8>, u64);

impl ChunkSink for SmallSink {
    async fn reset(&mut self) -> std::io::Result<()> {
        self.0.clear();
        Ok(())
    }

    async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        if (self.0.len() + chunk.len()) as u64 > self.1 {
            return Err(std::io::Error::other(format!(
                "more than {} bytes: not the small object expected",
                self.1
            )));
        }
        self.0.extend_from_slice(chunk);
        Ok(())
    }
}
