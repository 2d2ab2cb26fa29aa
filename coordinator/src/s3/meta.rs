//! What the client says about objects, and how the SDK's answers become it.
//!
//! Owns: [`ObjectMeta`] (the headers a restore puts back; stored in the snapshot's bucket
//! listings), [`ListedObject`] (one entry of a listing), [`ObjectHead`] (what a download learned),
//! and the conversions from the SDK's types.
//! Invariants:
//! - ETags are kept without their quotes; times are ISO 8601 (`DateTimeFormat::DateTime`).
//! - `x-amz-meta-*` names are kept lower case, without the prefix.
//! - [`ObjectMeta`] serializes kebab-case and leaves out what is absent, so a listing stays the
//!   same for an object without headers.

use std::collections::BTreeMap;

use aws_sdk_s3::primitives::{DateTime, DateTimeFormat};
use serde::{Deserialize, Serialize};

use super::etag::unquote;

/// The HTTP headers of an object that a restore must put back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ObjectMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_disposition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// `x-amz-meta-*` headers, names without the prefix, lower case.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// One entry of a bucket listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    pub key: String,
    pub size: u64,
    /// The ETag without quotes.
    pub etag: String,
    pub last_modified: Option<String>,
}

/// What a download learned about the object.
#[derive(Debug, Clone)]
pub struct ObjectHead {
    pub size: u64,
    pub etag: String,
    pub last_modified: Option<String>,
    pub meta: ObjectMeta,
}

pub(super) fn to_u64(n: Option<i64>) -> u64 {
    n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0)
}

pub(super) fn head_of(
    o: &aws_sdk_s3::operation::get_object::GetObjectOutput,
    size: u64,
) -> ObjectHead {
    let metadata = o
        .metadata()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    ObjectHead {
        size,
        etag: unquote(o.e_tag().unwrap_or_default()),
        last_modified: fmt_time(o.last_modified()),
        meta: ObjectMeta {
            content_type: o.content_type().map(str::to_owned),
            cache_control: o.cache_control().map(str::to_owned),
            content_encoding: o.content_encoding().map(str::to_owned),
            content_disposition: o.content_disposition().map(str::to_owned),
            content_language: o.content_language().map(str::to_owned),
            expires: o.expires_string().map(str::to_owned),
            metadata,
        },
    }
}

pub(super) fn fmt_time(t: Option<&DateTime>) -> Option<String> {
    t.and_then(|t| t.fmt(DateTimeFormat::DateTime).ok())
}
