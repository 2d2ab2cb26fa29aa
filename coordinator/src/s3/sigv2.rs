//! AWS Signature Version 2 (header form), the only scheme Ceph Hammer radosgw accepts.
//!
//! Owns: the V2 string to sign, the HMAC-SHA1 signature, and [`SigV2Signer`], an aws-sdk-s3
//! interceptor that signs each attempt of an otherwise unsigned request.
//! Invariants:
//! - The resource signed is the path exactly as sent (still percent-encoded) plus the V2
//!   sub-resources of the query, sorted; other query parameters (the SDK's `x-id`, `marker`,
//!   `prefix`, ...) are not signed.
//! - Every `x-amz-*` header on the wire is signed (including the SDK's `x-amz-user-agent`), names
//!   lower-cased, values trimmed, repeated headers joined with `,`.
//! - When `x-amz-date` is present the `Date` line is empty, as the V2 spec says.
//! - Signing runs at `modify_before_transmit`, so every retry attempt gets a fresh `Date`.
//! - The secret key never leaves this module's [`SecretString`] (no Debug, no Display of it).

use std::collections::BTreeMap;
use std::time::SystemTime;

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextMut;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

use crate::secret::{ExposeSecret, SecretString};

/// Query parameters that are part of the V2 canonical resource (the AWS list plus `tagging`/`cors`
/// that later S3 versions added and radosgw honours).
const SUB_RESOURCES: &[&str] = &[
    "acl",
    "cors",
    "delete",
    "lifecycle",
    "location",
    "logging",
    "notification",
    "partNumber",
    "policy",
    "requestPayment",
    "response-cache-control",
    "response-content-disposition",
    "response-content-encoding",
    "response-content-language",
    "response-content-type",
    "response-expires",
    "restore",
    "tagging",
    "torrent",
    "uploadId",
    "uploads",
    "versionId",
    "versioning",
    "versions",
    "website",
];

/// The V2 string to sign for a request: `method`, the path and query as sent (`/bucket/key?x=y`),
/// and the request headers (any case, any order).
pub fn string_to_sign<'a>(
    method: &str,
    path_and_query: &str,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> String {
    let mut content_md5 = "";
    let mut content_type = "";
    let mut date = "";
    let mut amz: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            "content-md5" => content_md5 = value.trim(),
            "content-type" => content_type = value.trim(),
            "date" => date = value.trim(),
            n if n.starts_with("x-amz-") => amz.entry(lower).or_default().push(value.trim()),
            _ => {}
        }
    }
    if amz.contains_key("x-amz-date") {
        date = "";
    }
    let mut out = format!("{method}\n{content_md5}\n{content_type}\n{date}\n");
    for (name, values) in &amz {
        out.push_str(name);
        out.push(':');
        out.push_str(&values.join(","));
        out.push('\n');
    }
    out.push_str(&canonical_resource(path_and_query));
    out
}

/// The path as sent plus the sorted V2 sub-resources of the query (values decoded).
fn canonical_resource(path_and_query: &str) -> String {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let mut subs: Vec<(String, Option<String>)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|pair| {
            let (k, v) = match pair.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (pair, None),
            };
            let k = decode(k);
            SUB_RESOURCES
                .contains(&k.as_str())
                .then(|| (k, v.map(decode)))
        })
        .collect();
    subs.sort();
    let mut out = if path.is_empty() {
        "/".to_owned()
    } else {
        path.to_owned()
    };
    for (i, (k, v)) in subs.iter().enumerate() {
        out.push(if i == 0 { '?' } else { '&' });
        out.push_str(k);
        if let Some(v) = v {
            out.push('=');
            out.push_str(v);
        }
    }
    out
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// base64(HMAC-SHA1(secret, string_to_sign)).
pub fn signature(secret: &str, string_to_sign: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(string_to_sign.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Signs every transmitted attempt with V2: sets `Date` and `Authorization: AWS <key>:<sig>`.
#[derive(Debug)]
pub struct SigV2Signer {
    access_key: SecretString,
    secret_key: SecretString,
}

impl SigV2Signer {
    pub fn new(access_key: SecretString, secret_key: SecretString) -> Self {
        Self {
            access_key,
            secret_key,
        }
    }
}

impl Intercept for SigV2Signer {
    fn name(&self) -> &'static str {
        "SigV2Signer"
    }

    fn modify_before_transmit(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request_mut();
        let headers = request.headers_mut();
        headers.remove("authorization");
        headers.insert("date", httpdate::fmt_http_date(SystemTime::now()));
        let uri: http::Uri = request.uri().parse()?;
        let path_and_query = uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        let sts = string_to_sign(request.method(), path_and_query, request.headers().iter());
        let auth = format!(
            "AWS {}:{}",
            self.access_key.expose_secret(),
            signature(self.secret_key.expose_secret(), &sts)
        );
        request.headers_mut().insert("authorization", auth);
        Ok(())
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    //! Vectors from the AWS S3 developer guide, "Signing and Authenticating REST Requests"
    //! (Signature Version 2), with its example keys.
    use super::*;

    const SECRET: &str = "uV3F3YluFJax1cknvbcGwgjvx4QpvB+leU8dUj2o";

    fn sign(method: &str, path: &str, headers: &[(&str, &str)]) -> (String, String) {
        let sts = string_to_sign(method, path, headers.iter().copied());
        let sig = signature(SECRET, &sts);
        (sts, sig)
    }

    #[test]
    fn object_get() {
        let (sts, sig) = sign(
            "GET",
            "/johnsmith/photos/puppy.jpg",
            &[("Date", "Tue, 27 Mar 2007 19:36:42 +0000")],
        );
        assert_eq!(
            sts,
            "GET\n\n\nTue, 27 Mar 2007 19:36:42 +0000\n/johnsmith/photos/puppy.jpg"
        );
        assert_eq!(sig, "xXjDGYUmKxnwqr5KXNPGldn5LbA=");
    }

    #[test]
    fn object_put_with_content_type() {
        let (_, sig) = sign(
            "PUT",
            "/johnsmith/photos/puppy.jpg",
            &[
                ("Content-Type", "image/jpeg"),
                ("Content-Length", "94328"),
                ("Date", "Tue, 27 Mar 2007 21:15:45 +0000"),
            ],
        );
        assert_eq!(sig, "hcicpDDvL9SsO6AkvxqmIWkmOuQ=");
    }

    #[test]
    fn list_ignores_non_subresource_query() {
        let (sts, sig) = sign(
            "GET",
            "/johnsmith/?prefix=photos&max-keys=50&marker=puppy",
            &[
                ("User-Agent", "Mozilla/5.0"),
                ("Date", "Tue, 27 Mar 2007 19:42:41 +0000"),
            ],
        );
        assert!(sts.ends_with("\n/johnsmith/"), "{sts}");
        assert_eq!(sig, "jsRt/rhG+Vtp88HrYL706QhE4w4=");
    }

    #[test]
    fn acl_is_a_subresource() {
        let (sts, sig) = sign(
            "GET",
            "/johnsmith/?acl",
            &[("Date", "Tue, 27 Mar 2007 19:44:46 +0000")],
        );
        assert!(sts.ends_with("/johnsmith/?acl"), "{sts}");
        assert_eq!(sig, "thdUi9VAkzhkniLj96JIrOPGi0g=");
    }

    #[test]
    fn x_amz_date_empties_the_date_line() {
        let (sts, sig) = sign(
            "DELETE",
            "/johnsmith/photos/puppy.jpg",
            &[
                ("User-Agent", "dotnet"),
                ("Date", "Tue, 27 Mar 2007 21:20:27 +0000"),
                ("x-amz-date", "Tue, 27 Mar 2007 21:20:26 +0000"),
            ],
        );
        assert_eq!(
            sts,
            "DELETE\n\n\n\nx-amz-date:Tue, 27 Mar 2007 21:20:26 +0000\n/johnsmith/photos/puppy.jpg"
        );
        assert_eq!(sig, "k3nL7gH3+PadhTEVn5Ip83xlYzk=");
    }

    #[test]
    fn amz_headers_sorted_lowercased_and_joined() {
        let (sts, sig) = sign(
            "PUT",
            "/static.johnsmith.net/db-backup.dat.gz",
            &[
                ("User-Agent", "curl/7.15.5"),
                ("Date", "Tue, 27 Mar 2007 21:06:08 +0000"),
                ("x-amz-acl", "public-read"),
                ("content-type", "application/x-download"),
                ("Content-MD5", "4gJE4saaMU4BqNR0kLY+lw=="),
                ("X-Amz-Meta-ReviewedBy", "joe@johnsmith.net"),
                ("X-Amz-Meta-ReviewedBy", "jane@johnsmith.net"),
                ("X-Amz-Meta-FileChecksum", "0x02661779"),
                ("X-Amz-Meta-ChecksumAlgorithm", "crc32"),
                ("Content-Disposition", "attachment; filename=database.dat"),
                ("Content-Encoding", "gzip"),
                ("Content-Length", "5913339"),
            ],
        );
        assert_eq!(
            sts,
            "PUT\n4gJE4saaMU4BqNR0kLY+lw==\napplication/x-download\nTue, 27 Mar 2007 21:06:08 +0000\n\
             x-amz-acl:public-read\nx-amz-meta-checksumalgorithm:crc32\n\
             x-amz-meta-filechecksum:0x02661779\n\
             x-amz-meta-reviewedby:joe@johnsmith.net,jane@johnsmith.net\n\
             /static.johnsmith.net/db-backup.dat.gz"
        );
        assert_eq!(sig, "C0FlOtU8Ylb9KDTpZqYkZPX91iI=");
    }

    #[test]
    fn list_all_my_buckets() {
        let (_, sig) = sign("GET", "/", &[("Date", "Wed, 28 Mar 2007 01:29:59 +0000")]);
        assert_eq!(sig, "Db+gepJSUbZKwpx1FR0DLtEYoZA=");
    }

    #[test]
    fn unicode_path_is_signed_as_sent() {
        let (sts, sig) = sign(
            "GET",
            "/dictionary/fran%C3%A7ais/pr%c3%a9f%c3%a8re",
            &[("Date", "Wed, 28 Mar 2007 01:49:49 +0000")],
        );
        assert!(
            sts.ends_with("/dictionary/fran%C3%A7ais/pr%c3%a9f%c3%a8re"),
            "{sts}"
        );
        assert_eq!(sig, "dxhSBHoI6eVSPcXJqEghlUzZMnY=");
    }

    #[test]
    fn sdk_query_params_are_dropped_and_subresources_sorted() {
        let r = canonical_resource("/db_wal/a%20b?x-id=UploadPart&uploadId=2~abc&partNumber=3");
        assert_eq!(r, "/db_wal/a%20b?partNumber=3&uploadId=2~abc");
        assert_eq!(canonical_resource("/db_wal?delete"), "/db_wal?delete");
        assert_eq!(canonical_resource(""), "/");
    }
}
