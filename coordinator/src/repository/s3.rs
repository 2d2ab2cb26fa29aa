//! A repository in an S3 bucket (AWS or any S3-compatible store), signed with SigV4.
//!
//! Owns: the mapping of repository names to keys `<prefix>/<name>` in one bucket, and a local
//! staging directory for blobs on their way in or out.
//! Invariants:
//! - A PUT is atomic on S3: an object is there whole or not at all, so the manifest's PUT, issued
//!   last, is what makes a snapshot complete.
//! - Transfers go through [`crate::s3::Client`], so they get the same retries, load control and
//!   MD5 checks as the store-gateway's; the repository's keys never appear in errors or logs.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncWriteExt as _;

use super::{Backend, LocalFile, RepositoryOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::s3::{ChunkSink, Client, GatewayOptions, ObjectMeta, Signature, Target};

/// A repository under `s3://bucket/prefix`.
#[derive(Debug)]
pub struct S3Backend {
    gateway: Client,
    bucket: String,
    prefix: String,
    endpoint: String,
    staging: PathBuf,
}

/// Splits `s3://bucket/some/prefix` into `("bucket", "some/prefix/")`.
pub fn parse_location(location: &str) -> Result<(String, String)> {
    let rest = location
        .strip_prefix("s3://")
        .ok_or_else(|| Error::config(format!("'{location}' is not an s3:// location")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::config(format!("'{location}' names no bucket")));
    }
    let prefix = prefix.trim_matches('/');
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    Ok((bucket.to_owned(), prefix))
}

impl S3Backend {
    /// Connects (SigV4) and checks the bucket; with `create`, makes a missing bucket.
    pub async fn connect(options: &RepositoryOptions, create: bool) -> Result<Self> {
        let (bucket, prefix) = parse_location(options.location())?;
        let endpoint = options
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", options.region()));
        let secret_key = crate::secret::resolve(
            options.secret_key_file.as_deref(),
            options.secret_key.as_ref(),
            "AWS_SECRET_ACCESS_KEY",
            "repository secret key",
        )?;
        let (Some(access_key), Some(secret_key)) = (&options.access_key, &secret_key) else {
            return Err(Error::config(
                "an s3:// repository needs keys: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                 (or --repository-access-key and --repository-secret-key-file)",
            ));
        };
        let target = Target {
            endpoints: vec![endpoint.clone()],
            access_key: access_key.clone(),
            secret_key: secret_key.clone(),
        };
        let gw_options = GatewayOptions {
            signature: Some(Signature::V4),
            region: Some(options.region().to_owned()),
            ..GatewayOptions::default()
        };
        let gateway = Client::new(&target, &gw_options)?;
        if !gateway.bucket_exists(&bucket).await? {
            if create {
                gateway.create_bucket(&bucket).await?;
            } else {
                return Err(Error::new(
                    ErrorKind::Repository,
                    format!("bucket {bucket} does not exist at {endpoint}"),
                    "check --repository and --repository-endpoint",
                ));
            }
        }
        let staging = options
            .staging_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        tokio::fs::create_dir_all(&staging)
            .await
            .map_err(|e| Error::io(format!("create {}", staging.display()), e))?;
        Ok(Self {
            gateway,
            bucket,
            prefix,
            endpoint,
            staging,
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

/// Download sink writing a staging file.
struct FileSink(tokio::fs::File);

impl ChunkSink for FileSink {
    async fn reset(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncSeekExt as _;
        self.0.set_len(0).await?;
        self.0.seek(std::io::SeekFrom::Start(0)).await.map(|_| ())
    }

    async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.0.write_all(chunk).await
    }
}

#[async_trait]
impl Backend for S3Backend {
    fn location(&self) -> String {
        format!("s3://{}/{} at {}", self.bucket, self.prefix, self.endpoint)
    }

    fn staging_dir(&self) -> &Path {
        &self.staging
    }

    async fn size(&self, name: &str) -> Result<Option<u64>> {
        Ok(self
            .gateway
            .head_object(&self.bucket, &self.key(name))
            .await?
            .map(|(size, _)| size))
    }

    async fn put_file(&self, name: &str, file: &Path, size: u64) -> Result<bool> {
        self.gateway
            .put_file(
                &self.bucket,
                &self.key(name),
                file,
                size,
                &ObjectMeta::default(),
            )
            .await?;
        if let Err(e) = tokio::fs::remove_file(file).await {
            tracing::debug!("removing staged {}: {e}", file.display());
        }
        // S3 has no create-if-absent: the caller's size check decided that it was missing.
        Ok(true)
    }

    async fn sync(&self) -> Result<()> {
        // A PUT is durable once the store has answered it.
        Ok(())
    }

    async fn put_bytes(&self, name: &str, data: Bytes) -> Result<bool> {
        self.gateway
            .put_bytes(&self.bucket, &self.key(name), data)
            .await?;
        Ok(true)
    }

    async fn replace_bytes(&self, name: &str, data: Bytes) -> Result<()> {
        // A PUT replaces an object whole.
        self.gateway
            .put_bytes(&self.bucket, &self.key(name), data)
            .await
    }

    async fn get_bytes(&self, name: &str) -> Result<Bytes> {
        let file = self.local_file(name).await?;
        let data = tokio::fs::read(file.path())
            .await
            .map_err(|e| Error::io(format!("read {}", file.path().display()), e))?;
        Ok(Bytes::from(data))
    }

    async fn local_file(&self, name: &str) -> Result<LocalFile> {
        let (file, temp) = tempfile::Builder::new()
            .prefix(".get-")
            .tempfile_in(&self.staging)
            .map_err(|e| Error::io(format!("stage {name}"), e))?
            .into_parts();
        let mut sink = FileSink(tokio::fs::File::from_std(file));
        self.gateway
            .get_object(&self.bucket, &self.key(name), &mut sink)
            .await?;
        sink.0
            .flush()
            .await
            .map_err(|e| Error::io(format!("write {}", temp.display()), e))?;
        Ok(LocalFile::staged(temp))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let full = self.key(prefix);
        Ok(self
            .gateway
            .list_objects(&self.bucket, Some(&full))
            .await?
            .into_iter()
            .filter_map(|o| {
                o.key
                    .strip_prefix(&self.prefix)
                    .map(|n| (n.to_owned(), o.size))
            })
            .collect())
    }

    async fn delete(&self, names: &[String]) -> Result<()> {
        let keys: Vec<String> = names.iter().map(|n| self.key(n)).collect();
        self.gateway.delete_objects(&self.bucket, &keys).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        assert_eq!(
            parse_location("s3://bk/deis/backups/").unwrap(),
            ("bk".to_owned(), "deis/backups/".to_owned())
        );
        assert_eq!(
            parse_location("s3://bk").unwrap(),
            ("bk".to_owned(), String::new())
        );
        assert!(parse_location("s3:///x").is_err());
        assert!(parse_location("/var/x").is_err());
    }
}
