//! Uploads: a file in one PUT or in parts ([`Client::put_file`], [`Client::put_file_like`]) and a
//! small in-memory object ([`Client::put_bytes`]).
//!
//! Owns: the choice between one PUT and a multipart upload, the multipart upload itself (create,
//! parts, complete or abort), and [`Sha256Check`].
//! Invariants:
//! - An upload reads its file once before sending it (the SDK reads it again to send it): that
//!   one read gives the `Content-MD5` of the object or of each part and the SHA-256 of the whole
//!   file, which a caller's [`Sha256Check`] sees before anything is committed — before the single
//!   PUT is sent, before CompleteMultipartUpload (a refused multipart upload is aborted). Parts
//!   are read in order for that SHA-256 while up to 4 earlier parts are being sent.
//! - Every upload is sent with `Content-MD5`, and the ETag the store returns is compared with the
//!   MD5s sent (a plain MD5, or the multipart `<md5>-<parts>`).
//! - Above the multipart threshold the parts are at least the configured part size and 5 MiB, and
//!   at most 10,000; an object re-uploaded like its original gets the original's part count.
//! - A file is sent by ranges, never held in memory whole; every upload passes the optional
//!   bandwidth cap and is counted.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::Ordering;

use aws_sdk_s3::primitives::{ByteStream, DateTime, DateTimeFormat, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use base64::Engine as _;
use md5::{Digest as _, Md5};
use sha2::Sha256;

use super::Client;
use super::digest::{PartDigest, md5_feeding, part_digests};
use super::etag::{MIN_PART_SIZE, etag_is_md5, original_part_size, unquote};
use super::failure::{Class, Failure};
use super::meta::ObjectMeta;
use crate::error::{Error, Result};

/// Checks the SHA-256 of a file about to be uploaded: called with the digest of the bytes read
/// (in the read that computes their `Content-MD5`) before anything is committed on the gateway.
/// An error stops the upload: a single PUT is not sent, a multipart upload is aborted instead of
/// completed.
pub type Sha256Check<'a> = &'a (dyn Fn(&[u8; 32]) -> Result<()> + Sync);

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

macro_rules! with_meta {
    ($builder:expr, $meta:expr) => {{
        let m: &ObjectMeta = $meta;
        let expires = m
            .expires
            .as_deref()
            .and_then(|e| DateTime::from_str(e, DateTimeFormat::HttpDate).ok());
        #[allow(deprecated)]
        let b = $builder
            .set_content_type(m.content_type.clone())
            .set_cache_control(m.cache_control.clone())
            .set_content_encoding(m.content_encoding.clone())
            .set_content_disposition(m.content_disposition.clone())
            .set_content_language(m.content_language.clone())
            .set_expires(expires)
            .set_metadata(if m.metadata.is_empty() {
                None
            } else {
                Some(
                    m.metadata
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect::<HashMap<_, _>>(),
                )
            });
        b
    }};
}

fn body_of(
    path: &Path,
    offset: u64,
    len: u64,
) -> impl Future<Output = Result<ByteStream, Failure>> {
    let path = path.to_owned();
    async move {
        if len == 0 {
            return Ok(ByteStream::from_static(b""));
        }
        ByteStream::read_from()
            .path(&path)
            .offset(offset)
            .length(Length::Exact(len))
            .buffer_size(256 * 1024)
            .build()
            .await
            .map_err(|e| Failure::new(Class::Local, format!("read {}: {e}", path.display())))
    }
}

impl Client {
    /// Uploads `size` bytes of the file at `path` as `bucket/key` with `meta`; multipart above the
    /// threshold. Returns the ETag, checked against the MD5s sent.
    pub async fn put_file(
        &self,
        bucket: &str,
        key: &str,
        path: &Path,
        size: u64,
        meta: &ObjectMeta,
    ) -> Result<String> {
        self.put_file_checked(bucket, key, path, size, meta, None, &|_| Ok(()))
            .await
    }

    /// Uploads like [`Client::put_file`] an object whose ETag was `original_etag`: one that was a
    /// multipart upload (`<md5>-<parts>`) goes up again in as many parts, of the part size it
    /// most likely had ([`original_part_size`]), so that it gets back the same ETag. `check` sees
    /// the file's SHA-256 before anything is committed (see [`Sha256Check`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn put_file_like(
        &self,
        bucket: &str,
        key: &str,
        path: &Path,
        size: u64,
        meta: &ObjectMeta,
        original_etag: &str,
        check: Sha256Check<'_>,
    ) -> Result<String> {
        let part_size = original_part_size(size, original_etag);
        self.put_file_checked(bucket, key, path, size, meta, part_size, check)
            .await
    }

    /// The one upload path: in parts of `part_size` when given, else multipart above the
    /// threshold and one PUT below it. The file is read once before (and, by the SDK, once while)
    /// it is sent; the first read yields the `Content-MD5`s and the SHA-256 `check` sees.
    #[allow(clippy::too_many_arguments)]
    async fn put_file_checked(
        &self,
        bucket: &str,
        key: &str,
        path: &Path,
        size: u64,
        meta: &ObjectMeta,
        part_size: Option<u64>,
        check: Sha256Check<'_>,
    ) -> Result<String> {
        let part_size = part_size.or_else(|| {
            (size > self.multipart_threshold)
                .then(|| self.part_size.max(size.div_ceil(10_000)).max(MIN_PART_SIZE))
        });
        if let Some(part_size) = part_size {
            return self
                .put_multipart(bucket, key, path, size, meta, part_size, check)
                .await;
        }
        let what = format!("uploading s3://{bucket}/{key}");
        let (md5, sha256) = md5_feeding(path, 0, size, Sha256::new()).await?;
        // Before the PUT: bytes that are not what the caller expects never reach the gateway.
        check(&sha256.finalize().into())?;
        let md5_b64 = base64::engine::general_purpose::STANDARD.encode(md5);
        let etag = self
            .call(&what, |c| {
                let md5_b64 = md5_b64.clone();
                async move {
                    if let Some(bw) = &self.bandwidth {
                        bw.take(usize::try_from(size).unwrap_or(usize::MAX)).await;
                    }
                    let body = body_of(path, 0, size).await?;
                    let b = c
                        .put_object()
                        .bucket(bucket)
                        .key(key)
                        .body(body)
                        .content_length(to_i64(size))
                        .content_md5(md5_b64);
                    let o = with_meta!(b, meta)
                        .send()
                        .await
                        .map_err(|e| Failure::from_sdk(&e))?;
                    self.counters
                        .bytes_uploaded
                        .fetch_add(size, Ordering::Relaxed);
                    Ok(unquote(o.e_tag().unwrap_or_default()))
                }
            })
            .await?;
        let want = hex::encode(md5);
        if etag_is_md5(&etag) && etag.to_ascii_lowercase() != want {
            return Err(Error::integrity(format!(
                "{what}: the gateway stored ETag {etag}, the bytes sent have MD5 {want}"
            )));
        }
        Ok(etag)
    }

    /// A multipart upload; aborted when any part, the `check` or the completion fails.
    #[allow(clippy::too_many_arguments)]
    async fn put_multipart(
        &self,
        bucket: &str,
        key: &str,
        path: &Path,
        size: u64,
        meta: &ObjectMeta,
        part_size: u64,
        check: Sha256Check<'_>,
    ) -> Result<String> {
        let what = format!("uploading s3://{bucket}/{key} in parts");
        let upload_id = self
            .call(&what, |c| async move {
                let b = c.create_multipart_upload().bucket(bucket).key(key);
                let o = with_meta!(b, meta)
                    .send()
                    .await
                    .map_err(|e| Failure::from_sdk(&e))?;
                o.upload_id()
                    .map(str::to_owned)
                    .ok_or_else(|| Failure::new(Class::Fatal, "no UploadId in the answer"))
            })
            .await?;
        let result = self
            .upload_parts(bucket, key, path, size, part_size, &upload_id, &what, check)
            .await;
        if result.is_err() {
            let abort = self
                .call(&what, |c| {
                    let id = upload_id.clone();
                    async move {
                        c.abort_multipart_upload()
                            .bucket(bucket)
                            .key(key)
                            .upload_id(id)
                            .send()
                            .await
                            .map(|_| ())
                            .map_err(|e| Failure::from_sdk(&e))
                    }
                })
                .await;
            if let Err(e) = abort {
                tracing::warn!("aborting the failed multipart upload: {e}");
            }
        }
        result
    }

    /// Uploads the parts (up to 4 at once, while the next ones are read and hashed in order),
    /// runs `check` on the whole file's SHA-256, and only then completes the upload.
    #[allow(clippy::too_many_arguments)]
    async fn upload_parts(
        &self,
        bucket: &str,
        key: &str,
        path: &Path,
        size: u64,
        part_size: u64,
        upload_id: &str,
        what: &str,
        check: Sha256Check<'_>,
    ) -> Result<String> {
        use futures::StreamExt as _;
        let uploads = part_digests(path, size, part_size)
            .map(|digest| async move {
                let digest = digest?;
                if let PartDigest::Part {
                    number,
                    offset,
                    len,
                    md5,
                } = digest
                {
                    self.upload_part(bucket, key, path, upload_id, what, number, offset, len, md5)
                        .await?;
                }
                Ok::<_, Error>(digest)
            })
            .buffered(4);
        futures::pin_mut!(uploads);
        let mut parts: Vec<(i32, [u8; 16])> = Vec::new();
        let mut whole = None;
        while let Some(done) = uploads.next().await {
            match done? {
                PartDigest::Part { number, md5, .. } => parts.push((number, md5)),
                PartDigest::Whole { sha256 } => whole = Some(sha256),
            }
        }
        let sha256 = whole.ok_or_else(|| {
            Error::integrity(format!(
                "{what}: {} was not read to its end",
                path.display()
            ))
        })?;
        // Before the completion: until then the gateway holds no object, and the caller aborts.
        check(&sha256)?;
        let completed: Vec<CompletedPart> = parts
            .iter()
            .map(|(n, md5)| {
                CompletedPart::builder()
                    .part_number(*n)
                    .e_tag(format!("\"{}\"", hex::encode(md5)))
                    .build()
            })
            .collect();
        let etag = self
            .call(what, |c| {
                let completed = completed.clone();
                async move {
                    let o = c
                        .complete_multipart_upload()
                        .bucket(bucket)
                        .key(key)
                        .upload_id(upload_id)
                        .multipart_upload(
                            CompletedMultipartUpload::builder()
                                .set_parts(Some(completed))
                                .build(),
                        )
                        .send()
                        .await
                        .map_err(|e| Failure::from_sdk(&e))?;
                    Ok(unquote(o.e_tag().unwrap_or_default()))
                }
            })
            .await?;
        let mut all = Md5::new();
        for (_, md5) in &parts {
            all.update(md5);
        }
        let want = format!("{}-{}", hex::encode(all.finalize()), parts.len());
        if etag.contains('-') && etag.to_ascii_lowercase() != want {
            return Err(Error::integrity(format!(
                "{what}: the gateway stored ETag {etag}, the parts sent give {want}"
            )));
        }
        Ok(etag)
    }

    /// Uploads part `number` (`len` bytes of `path` from `offset`, whose MD5 is `md5`) and checks
    /// the ETag the gateway gives it.
    #[allow(clippy::too_many_arguments)]
    async fn upload_part(
        &self,
        bucket: &str,
        key: &str,
        path: &Path,
        upload_id: &str,
        what: &str,
        number: i32,
        offset: u64,
        len: u64,
        md5: [u8; 16],
    ) -> Result<()> {
        let md5_b64 = base64::engine::general_purpose::STANDARD.encode(md5);
        let etag = self
            .call(what, |c| {
                let md5_b64 = md5_b64.clone();
                async move {
                    if let Some(bw) = &self.bandwidth {
                        bw.take(usize::try_from(len).unwrap_or(usize::MAX)).await;
                    }
                    let body = body_of(path, offset, len).await?;
                    let o = c
                        .upload_part()
                        .bucket(bucket)
                        .key(key)
                        .upload_id(upload_id)
                        .part_number(number)
                        .content_length(to_i64(len))
                        .content_md5(md5_b64)
                        .body(body)
                        .send()
                        .await
                        .map_err(|e| Failure::from_sdk(&e))?;
                    self.counters
                        .bytes_uploaded
                        .fetch_add(len, Ordering::Relaxed);
                    Ok(unquote(o.e_tag().unwrap_or_default()))
                }
            })
            .await?;
        if etag_is_md5(&etag) && etag.to_ascii_lowercase() != hex::encode(md5) {
            return Err(Error::integrity(format!(
                "{what}: part {number} stored with ETag {etag}, sent MD5 {}",
                hex::encode(md5)
            )));
        }
        Ok(())
    }

    /// Uploads a small in-memory object (manifests, listings of the S3 repository).
    pub async fn put_bytes(&self, bucket: &str, key: &str, data: bytes::Bytes) -> Result<()> {
        let md5_b64 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(&data));
        self.call(&format!("uploading s3://{bucket}/{key}"), |c| {
            let data = data.clone();
            let md5_b64 = md5_b64.clone();
            async move {
                let len = data.len() as u64;
                c.put_object()
                    .bucket(bucket)
                    .key(key)
                    .content_length(to_i64(len))
                    .content_md5(md5_b64)
                    .body(ByteStream::from(data))
                    .send()
                    .await
                    .map_err(|e| Failure::from_sdk(&e))?;
                self.counters
                    .bytes_uploaded
                    .fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use sha2::Digest as _;

    use super::*;
    use crate::s3::digest::tests::random_file;
    use crate::s3::{GatewayOptions, Target};
    use crate::secret::SecretString;

    #[tokio::test]
    async fn a_failed_sha256_check_sends_no_request() {
        // Nothing listens on this endpoint: a request would fail as unreachable, not as the check.
        let target = Target {
            endpoints: vec!["http://127.0.0.1:9".to_owned()],
            access_key: SecretString::from("AK"),
            secret_key: SecretString::from("SK"),
        };
        let gw = Client::new(
            &target,
            &GatewayOptions {
                retries: Some(0),
                ..GatewayOptions::default()
            },
        )
        .unwrap();
        let (f, data) = random_file(1000);
        let want: [u8; 32] = Sha256::digest(&data).into();
        let seen = std::sync::Mutex::new(None);
        let check = |got: &[u8; 32]| {
            *seen.lock().unwrap() = Some(*got);
            Err(Error::integrity("refused by the test"))
        };
        let err = gw
            .put_file_like(
                "b",
                "k",
                f.path(),
                data.len() as u64,
                &ObjectMeta::default(),
                "",
                &check,
            )
            .await
            .unwrap_err();
        assert!(err.message().contains("refused by the test"), "{err}");
        assert_eq!(
            *seen.lock().unwrap(),
            Some(want),
            "the check saw the file's SHA-256"
        );
        assert_eq!(gw.stats().requests, 0, "nothing was sent");
    }
}
