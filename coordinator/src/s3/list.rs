//! Listing the objects of a bucket: [`Client::list_objects`].
//!
//! Invariants:
//! - ListObjects **v1** (Ceph Hammer has no v2 listing), 1000 keys a page, paged with the
//!   `NextMarker` the store gives or else the last key of the page; the result is in key order.
//! - A page said to be truncated that gives no new marker is an error, never an endless loop.

use super::Client;
use super::etag::unquote;
use super::failure::Failure;
use super::meta::{ListedObject, fmt_time, to_u64};
use crate::error::{Error, ErrorKind, Result};

impl Client {
    /// Every object of `bucket` (under `prefix`), in key order: ListObjects v1, paged by marker.
    pub async fn list_objects(
        &self,
        bucket: &str,
        prefix: Option<&str>,
    ) -> Result<Vec<ListedObject>> {
        let mut out: Vec<ListedObject> = Vec::new();
        let mut marker: Option<String> = None;
        let what = format!("listing bucket {bucket}");
        loop {
            let (page, truncated, next) = self
                .call(&what, |c| list_page(c, bucket, prefix, marker.clone()))
                .await?;
            let last = page.last().map(|o| o.key.clone());
            out.extend(page);
            if !truncated {
                break;
            }
            marker = match next.or(last) {
                Some(m) if Some(&m) != marker.as_ref() => Some(m),
                _ => {
                    return Err(Error::new(
                        ErrorKind::Gateway,
                        format!(
                            "{what}: the gateway said the listing is truncated but gave no new marker"
                        ),
                        "run again; if it persists the gateway's bucket index may need a check",
                    ));
                }
            };
        }
        Ok(out)
    }
}

/// One ListObjects page from `marker`: its objects, whether more follow, and the next marker
/// the gateway gave, if any.
async fn list_page(
    c: aws_sdk_s3::Client,
    bucket: &str,
    prefix: Option<&str>,
    marker: Option<String>,
) -> std::result::Result<(Vec<ListedObject>, bool, Option<String>), Failure> {
    let o = c
        .list_objects()
        .bucket(bucket)
        .set_prefix(prefix.map(str::to_owned))
        .set_marker(marker)
        .max_keys(1000)
        .send()
        .await
        .map_err(|e| Failure::from_sdk(&e))?;
    let page = o
        .contents()
        .iter()
        .filter_map(|obj| {
            Some(ListedObject {
                key: obj.key()?.to_owned(),
                size: to_u64(obj.size()),
                etag: unquote(obj.e_tag().unwrap_or_default()),
                last_modified: fmt_time(obj.last_modified()),
            })
        })
        .collect();
    Ok((
        page,
        o.is_truncated().unwrap_or(false),
        o.next_marker().map(str::to_owned),
    ))
}
