//! Deleting objects: [`Client::delete_objects`].
//!
//! Invariants: DeleteObjects with at most 1000 keys a request (the S3 limit), in quiet mode, with
//! the `Content-MD5` it requires; a key the store failed to delete is an error that names it.

use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use base64::Engine as _;
use md5::{Digest as _, Md5};

use super::Client;
use super::failure::Failure;
use crate::error::{Error, ErrorKind, Result};

impl Client {
    /// Deletes objects, 1000 per request (DeleteObjects, with the `Content-MD5` it requires).
    pub async fn delete_objects(&self, bucket: &str, keys: &[String]) -> Result<()> {
        for chunk in keys.chunks(1000) {
            let ids = chunk
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| Error::config(format!("object key: {e}")))?;
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| Error::config(format!("delete request: {e}")))?;
            let what = format!("deleting {} objects from {bucket}", chunk.len());
            let errors = self
                .call(&what, |c| delete_batch(c, bucket, delete.clone()))
                .await?;
            if !errors.is_empty() {
                return Err(Error::new(
                    ErrorKind::Gateway,
                    format!("{what}: {} failed ({})", errors.len(), errors.join(", ")),
                    "run again; check the keys may delete in this bucket",
                ));
            }
        }
        Ok(())
    }
}

/// One DeleteObjects request; the keys the store could not delete, each with its error code.
async fn delete_batch(
    c: aws_sdk_s3::Client,
    bucket: &str,
    delete: Delete,
) -> std::result::Result<Vec<String>, Failure> {
    let o = c
        .delete_objects()
        .bucket(bucket)
        .delete(delete)
        .customize()
        .mutate_request(add_content_md5)
        .send()
        .await
        .map_err(|e| Failure::from_sdk(&e))?;
    Ok(o.errors()
        .iter()
        .map(|e| {
            format!(
                "{}: {}",
                e.key().unwrap_or_default(),
                e.code().unwrap_or_default()
            )
        })
        .collect())
}

/// Sets the `Content-MD5` DeleteObjects requires (the SDK no longer sends it by itself).
fn add_content_md5(req: &mut aws_smithy_runtime_api::client::orchestrator::HttpRequest) {
    if let Some(body) = req.body().bytes() {
        let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(body));
        req.headers_mut().insert("content-md5", md5);
    }
}
