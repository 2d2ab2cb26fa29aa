//! Bucket operations of the [`Client`]: the buckets the keys own; whether one exists or is empty;
//! creating and deleting one.
//!
//! Invariants: a bucket that does not exist (or that the keys may not see) is `false`, not an
//! error; creating a bucket that exists and is ours succeeds; only an empty bucket is deleted (the
//! store refuses others).

use super::Client;
use super::failure::Failure;
use crate::error::Result;

impl Client {
    /// The buckets the keys own.
    pub async fn list_buckets(&self) -> Result<Vec<String>> {
        self.call("listing buckets", |c| async move {
            let out = c
                .list_buckets()
                .send()
                .await
                .map_err(|e| Failure::from_sdk(&e))?;
            Ok(out
                .buckets()
                .iter()
                .filter_map(|b| b.name().map(str::to_owned))
                .collect())
        })
        .await
    }

    /// Whether `bucket` exists (and the keys may see it).
    pub async fn bucket_exists(&self, bucket: &str) -> Result<bool> {
        let what = format!("checking bucket {bucket}");
        match self
            .run(&what, |c| async move {
                c.head_bucket()
                    .bucket(bucket)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| Failure::from_sdk(&e))
            })
            .await
        {
            Ok(()) => Ok(true),
            Err((f, _)) if f.is_not_found() => Ok(false),
            Err((f, ep)) => Err(f.into_error(&what, &ep)),
        }
    }

    /// Creates `bucket`; one that exists and is ours is fine.
    pub async fn create_bucket(&self, bucket: &str) -> Result<()> {
        let what = format!("creating bucket {bucket}");
        match self
            .run(&what, |c| async move {
                c.create_bucket()
                    .bucket(bucket)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| Failure::from_sdk(&e))
            })
            .await
        {
            Ok(()) => Ok(()),
            Err((f, _)) if f.code.as_deref() == Some("BucketAlreadyOwnedByYou") => Ok(()),
            Err((f, ep)) => Err(f.into_error(&what, &ep)),
        }
    }

    /// Deletes an empty bucket.
    pub async fn delete_bucket(&self, bucket: &str) -> Result<()> {
        self.call(&format!("deleting bucket {bucket}"), |c| async move {
            c.delete_bucket()
                .bucket(bucket)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| Failure::from_sdk(&e))
        })
        .await
    }

    /// True when `bucket` holds no object.
    pub async fn bucket_is_empty(&self, bucket: &str) -> Result<bool> {
        self.call(&format!("listing bucket {bucket}"), |c| async move {
            let o = c
                .list_objects()
                .bucket(bucket)
                .max_keys(1)
                .send()
                .await
                .map_err(|e| Failure::from_sdk(&e))?;
            Ok(o.contents().is_empty())
        })
        .await
    }
}
