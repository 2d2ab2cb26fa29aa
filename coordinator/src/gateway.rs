//! The store-gateway (Ceph radosgw) as an S3 endpoint set: discovery from etcd, signatures, load
//! control, and the few S3 operations the mirror, the bucket restore and the S3 repository need.
//!
//! Owns: [`GatewayOptions`] (the gateway part of the configuration), [`Gateway`] (one client per
//! gateway host, for both signature versions), the classification of failures into retry / back off /
//! give up, and streaming transfers with size and MD5 checks.
//! Invariants:
//! - Every gateway published under `/deis/store/gateway/hosts/*` is used (requests go round-robin),
//!   each at its own `host:port`, path-style (the bucket `db_wal` is not a DNS name).
//! - `signature = auto` starts with V4 and, on the first authentication failure, switches to V2 once
//!   for the whole process (Hammer only speaks V2); `v2` and `v4` never switch.
//! - Listing is ListObjects **v1** paged with the last key as marker (Hammer has no v2 listing).
//! - Bodies stream: a download goes chunk by chunk into a [`ChunkSink`] (or, for large objects,
//!   concurrent ranged GETs write at offsets of a staging file, pinned to one version with
//!   `If-Match`), an upload reads its file by ranges; no object is held in memory whole.
//! - Every request passes through the adaptive [`load::Limiter`] and the optional bandwidth cap;
//!   transient failures are retried with jittered exponential backoff, up to `retries` times.
//! - A download is checked against its `Content-Length` and, where the ETag is an MD5, its MD5; an
//!   upload is sent with `Content-MD5` and its returned ETag compared.
//! - An upload reads its file once before sending it (the SDK reads it again to send it): that
//!   one read gives the `Content-MD5` of the object or of each part and the SHA-256 of the whole
//!   file, which a caller's [`Sha256Check`] sees before anything is committed — before the single
//!   PUT is sent, before CompleteMultipartUpload (a refused multipart upload is aborted). Parts
//!   are read in order for that SHA-256 while up to 4 earlier parts are being sent.
//! - Keys never appear in logs, errors or `Debug` output ([`Secret`]).

pub mod load;
pub mod sigv2;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTime, DateTimeFormat, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use base64::Engine as _;
use md5::{Digest as _, Md5};
use serde::{Deserialize, Deserializer, Serialize};
use sha2::Sha256;
use tokio::io::AsyncSeekExt as _;

use crate::error::{Error, ErrorKind, Result};
use load::{Bandwidth, Limiter};

/// Objects larger than this are downloaded with concurrent ranged GETs of this size.
pub const DOWNLOAD_RANGE: u64 = 8 * 1024 * 1024;

/// S3 never takes a multipart part below 5 MiB (except the last).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

/// A secret (gateway key): never printed, never serialized.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for signing only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Secret {
    /// The secret in `path` (its first line): the file must be mode 600 (or stricter), owned by
    /// this user or root.
    pub fn from_file(path: &std::path::Path, what: &str) -> Result<Self> {
        crate::pki::check_private(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!(
                "cannot read the {what} file {}: {e}",
                path.display()
            ))
        })?;
        let line = text.lines().next().unwrap_or("").trim();
        if line.is_empty() {
            return Err(Error::config(format!(
                "the {what} file {} is empty",
                path.display()
            )));
        }
        Ok(Self(line.to_owned()))
    }

    /// The first of: the file, the value already set (config file), the environment variable.
    pub fn resolve(
        file: Option<&std::path::Path>,
        set: Option<&Secret>,
        env: &str,
        what: &str,
    ) -> Result<Option<Secret>> {
        if let Some(p) = file {
            return Self::from_file(p, what).map(Some);
        }
        if let Some(s) = set {
            return Ok(Some(s.clone()));
        }
        Ok(std::env::var(env)
            .ok()
            .filter(|v| !v.is_empty())
            .map(Secret))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Which AWS signature the gateway client uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Signature {
    /// V4 first; V2 from the first authentication failure on (Hammer).
    #[default]
    Auto,
    /// AWS Signature V2 only (Ceph Hammer radosgw, Deis v1).
    V2,
    /// AWS Signature V4 only (Ceph Jewel and later, AWS).
    V4,
}

/// How to reach and drive the store-gateway. Serves the CLI (`clap`), the config file (`serde`,
/// kebab-case) and the library.
#[derive(Debug, Clone, Deserialize, clap::Args)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct GatewayOptions {
    /// Gateway endpoints (`host:port` or `http://host:port`), comma-separated. Default: every gateway
    /// published in etcd under /deis/store/gateway/hosts.
    #[arg(long = "gateway", value_delimiter = ',', env = "DEIS_BACKUP_GATEWAY")]
    pub endpoints: Vec<String>,
    /// Gateway access key. Default: /deis/store/gateway/accessKey in etcd.
    #[arg(
        long = "gateway-access-key",
        env = "DEIS_BACKUP_GATEWAY_ACCESS_KEY",
        hide_env_values = true
    )]
    pub access_key: Option<Secret>,
    /// File holding the gateway secret key (mode 600). Default: $DEIS_BACKUP_GATEWAY_SECRET_KEY,
    /// else /deis/store/gateway/secretKey in etcd. Never a flag value: argv is public.
    #[arg(
        long = "gateway-secret-key-file",
        env = "DEIS_BACKUP_GATEWAY_SECRET_KEY_FILE"
    )]
    pub secret_key_file: Option<std::path::PathBuf>,
    /// The secret key itself: from the config file's `secret-key`, or the environment.
    #[arg(skip)]
    pub secret_key: Option<Secret>,
    /// AWS signature version: auto tries V4 and falls back to V2 (Ceph Hammer) once.
    #[arg(long = "gateway-signature", value_enum, default_value_t = Signature::Auto)]
    pub signature: Signature,
    /// Region used in V4 signatures (radosgw accepts us-east-1).
    #[arg(long = "gateway-region", default_value = "us-east-1")]
    pub region: String,
    /// Most requests in flight at once (the adaptive limit starts here, halves on overload and
    /// climbs back when the gateway is calm).
    #[arg(long = "gateway-concurrency", default_value_t = 32)]
    pub concurrency: usize,
    /// Retries of a failed request before giving up.
    #[arg(long = "gateway-retries", default_value_t = 8)]
    pub retries: u32,
    /// Bandwidth cap over all transfers, bytes per second (suffixes KiB, MiB, GiB, k, M, G).
    #[arg(long = "bandwidth-limit", value_parser = parse_size)]
    #[serde(deserialize_with = "de_opt_size")]
    pub bandwidth_limit: Option<u64>,
    /// Objects larger than this are uploaded in parts.
    #[arg(long = "multipart-threshold", value_parser = parse_size, default_value = "64MiB")]
    #[serde(deserialize_with = "de_size")]
    pub multipart_threshold: u64,
    /// Size of a multipart part (at least 5 MiB).
    #[arg(long = "part-size", value_parser = parse_size, default_value = "16MiB")]
    #[serde(deserialize_with = "de_size")]
    pub part_size: u64,
    /// Seconds to wait for a TCP connection.
    #[arg(long = "gateway-connect-timeout", default_value_t = 5)]
    pub connect_timeout_secs: u64,
    /// Seconds a request may wait for the next bytes.
    #[arg(long = "gateway-read-timeout", default_value_t = 60)]
    pub read_timeout_secs: u64,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            access_key: None,
            secret_key_file: None,
            secret_key: None,
            signature: Signature::Auto,
            region: "us-east-1".to_owned(),
            concurrency: 32,
            retries: 8,
            bandwidth_limit: None,
            multipart_threshold: 64 * MIB,
            part_size: 16 * MIB,
            connect_timeout_secs: 5,
            read_timeout_secs: 60,
        }
    }
}

/// Parses a byte size: `1048576`, `64MiB`, `10M`, `512k`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 64MiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1_000,
        "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        u => {
            return Err(format!(
                "unknown size unit '{u}' in '{s}' (use KiB, MiB, GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Num(u64),
    Text(String),
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    match SizeValue::deserialize(d)? {
        SizeValue::Num(n) => Ok(n),
        SizeValue::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

/// Where the gateways are and the keys to use, resolved from options and etcd.
#[derive(Debug, Clone)]
pub struct GatewayTarget {
    /// Endpoint URLs (`http://host:port`).
    pub endpoints: Vec<String>,
    pub access_key: Secret,
    pub secret_key: Secret,
}

const GATEWAY_KEY: &str = "/deis/store/gateway";

impl GatewayOptions {
    /// Fills what the options leave open from etcd, as Deis publishes it.
    pub async fn resolve(&self, etcd: Option<&deis_backup_etcd::Client>) -> Result<GatewayTarget> {
        let need_etcd = || {
            etcd.ok_or_else(|| {
                Error::config(
                    "no gateway endpoint or keys given and no etcd to read them from: \
                     pass --etcd, or --gateway with --gateway-access-key and \
                     --gateway-secret-key-file",
                )
            })
        };
        let endpoints = if self.endpoints.is_empty() {
            discover_endpoints(need_etcd()?).await?
        } else {
            self.endpoints
                .iter()
                .map(|e| endpoint_url(e))
                .collect::<Result<Vec<_>>>()?
        };
        let access_key = match &self.access_key {
            Some(k) => k.clone(),
            None => read_key(need_etcd()?, "accessKey").await?,
        };
        let secret_key = match Secret::resolve(
            self.secret_key_file.as_deref(),
            self.secret_key.as_ref(),
            "DEIS_BACKUP_GATEWAY_SECRET_KEY",
            "gateway secret key",
        )? {
            Some(k) => k,
            None => read_key(need_etcd()?, "secretKey").await?,
        };
        Ok(GatewayTarget {
            endpoints,
            access_key,
            secret_key,
        })
    }
}

async fn read_key(etcd: &deis_backup_etcd::Client, name: &str) -> Result<Secret> {
    let key = format!("{GATEWAY_KEY}/{name}");
    etcd.get(&key).await?.map(Secret).ok_or_else(|| {
        Error::config(format!(
            "etcd has no {key}: the store-gateway has not published its keys"
        ))
    })
}

/// Every gateway under `/deis/store/gateway/hosts/*`, else the single `/deis/store/gateway/{host,port}`.
async fn discover_endpoints(etcd: &deis_backup_etcd::Client) -> Result<Vec<String>> {
    let mut out = Vec::new();
    if let Some(hosts) = etcd.get_node(&format!("{GATEWAY_KEY}/hosts"), true).await? {
        for h in hosts.nodes.iter().filter(|n| n.dir) {
            let host = h.child("host").and_then(|n| n.value.clone());
            let port = h.child("port").and_then(|n| n.value.clone());
            if let (Some(host), Some(port)) = (host, port) {
                out.push(endpoint_url(&format!("{host}:{port}"))?);
            }
        }
    }
    if out.is_empty() {
        let host = etcd.get(&format!("{GATEWAY_KEY}/host")).await?;
        let port = etcd.get(&format!("{GATEWAY_KEY}/port")).await?;
        if let (Some(host), Some(port)) = (host, port) {
            out.push(endpoint_url(&format!("{host}:{port}"))?);
        }
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err(Error::new(
            ErrorKind::GatewayUnreachable,
            "etcd lists no store-gateway (/deis/store/gateway/hosts and /deis/store/gateway/host are empty)",
            "start the store-gateway (`deisctl start store-gateway`) or pass --gateway host:port",
        ));
    }
    Ok(out)
}

fn endpoint_url(e: &str) -> Result<String> {
    let e = e.trim().trim_end_matches('/');
    let url = if e.contains("://") {
        e.to_owned()
    } else {
        format!("http://{e}")
    };
    // Keys travel separately (files, environment, etcd); user info in an endpoint would be a
    // secret in a URL that errors and logs print.
    let authority = url.split("://").nth(1).and_then(|r| r.split('/').next());
    if authority.is_some_and(|a| a.contains('@')) {
        return Err(Error::config(
            "a gateway endpoint holds user info (user:password@): give keys with \
             --gateway-access-key and --gateway-secret-key-file instead",
        ));
    }
    let ok = url
        .parse::<http::Uri>()
        .is_ok_and(|u| u.host().is_some() && matches!(u.scheme_str(), Some("http" | "https")));
    if ok {
        Ok(url)
    } else {
        Err(Error::config(format!(
            "'{e}' is not a gateway endpoint: use host:port or http://host:port"
        )))
    }
}

/// The bucket names Deis uses, from etcd (`/deis/{database,registry}/bucketName`, defaults
/// `db_wal` and `registry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeisBuckets {
    pub database: String,
    pub registry: String,
}

impl DeisBuckets {
    pub async fn discover(etcd: &deis_backup_etcd::Client) -> Result<Self> {
        let database = etcd
            .get("/deis/database/bucketName")
            .await?
            .unwrap_or_else(|| "db_wal".to_owned());
        let registry = etcd
            .get("/deis/registry/bucketName")
            .await?
            .unwrap_or_else(|| "registry".to_owned());
        Ok(Self { database, registry })
    }

    pub fn all(&self) -> Vec<String> {
        vec![self.database.clone(), self.registry.clone()]
    }
}

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

/// Where a download's bytes go. `reset` is called before every attempt (a retry starts over).
pub trait ChunkSink: Send {
    fn reset(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
    fn write(&mut self, chunk: &[u8]) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// Counters of what the gateway client did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GatewayStats {
    pub requests: u64,
    pub retries: u64,
    pub overloads: u64,
    pub bytes_downloaded: u64,
    pub bytes_uploaded: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    overloads: AtomicU64,
    bytes_downloaded: AtomicU64,
    bytes_uploaded: AtomicU64,
}

#[derive(Debug)]
struct Endpoint {
    url: String,
    v4: aws_sdk_s3::Client,
    v2: aws_sdk_s3::Client,
}

/// A client for a set of gateways sharing one store.
#[derive(Debug)]
pub struct Gateway {
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    signature: Signature,
    v2_active: AtomicBool,
    limiter: Arc<Limiter>,
    bandwidth: Option<Bandwidth>,
    retries: u32,
    multipart_threshold: u64,
    part_size: u64,
    counters: Counters,
}

/// How a failed attempt is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// 503/SlowDown, timeouts, reset connections: back off, cut concurrency, retry.
    Overload,
    /// Other server-side or transfer errors: retry.
    Transient,
    /// The connection could not be made: retry a few times, then "unreachable".
    Unreachable,
    /// The signature or keys were refused.
    Auth,
    /// The object or bucket does not exist.
    NotFound,
    /// Anything else: give up at once.
    Fatal,
    /// A local I/O failure (the sink): give up at once.
    Local,
}

/// A classified failure of one attempt.
#[derive(Debug)]
pub(crate) struct Failure {
    class: Class,
    code: Option<String>,
    message: String,
}

impl Failure {
    fn new(class: Class, message: impl Into<String>) -> Self {
        Self {
            class,
            code: None,
            message: message.into(),
        }
    }

    fn from_sdk<E>(e: &SdkError<E, aws_smithy_runtime_api::http::Response>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let message = DisplayErrorContext(e).to_string();
        let class = match e {
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => Class::Overload,
            SdkError::DispatchFailure(d) => {
                if d.is_timeout() {
                    Class::Overload
                } else if d.is_io() && is_connect_failure(&message) {
                    Class::Unreachable
                } else if d.is_io() {
                    Class::Overload
                } else {
                    Class::Transient
                }
            }
            SdkError::ServiceError(s) => {
                let status = s.raw().status().as_u16();
                let code = s.err().code().map(str::to_owned);
                let class = classify_status(status, code.as_deref());
                return Self {
                    class,
                    message: format!(
                        "HTTP {status} {}{}",
                        code.as_deref().unwrap_or(""),
                        s.err()
                            .message()
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    ),
                    code,
                };
            }
            _ => Class::Fatal,
        };
        Self {
            class,
            code: None,
            message,
        }
    }

    pub(crate) fn is_not_found(&self) -> bool {
        self.class == Class::NotFound
    }

    fn into_error(self, what: &str, endpoint: &str) -> Error {
        match self.class {
            Class::Auth => Error::new(
                ErrorKind::GatewayAuth,
                format!(
                    "the gateway at {endpoint} refused the credentials for {what} ({})",
                    self.message
                ),
                "check /deis/store/gateway/accessKey and secretKey (a new cluster has new keys), \
                 or force --gateway-signature v2 for Ceph Hammer",
            ),
            Class::Unreachable => Error::new(
                ErrorKind::GatewayUnreachable,
                format!(
                    "cannot reach the gateway at {endpoint} for {what}: {}",
                    self.message
                ),
                "check that the store-gateway runs (`deisctl status store-gateway`) and that \
                 its host:port is reachable from here",
            ),
            Class::NotFound => Error::not_found(format!("{what}: {}", self.message)),
            Class::Local => Error::new(
                ErrorKind::Io,
                format!("{what}: {}", self.message),
                "check the local disk",
            ),
            Class::Overload | Class::Transient | Class::Fatal => Error::new(
                ErrorKind::Gateway,
                format!("the gateway at {endpoint} failed {what}: {}", self.message),
                "run again later; lower --gateway-concurrency if the gateway is overloaded",
            ),
        }
    }
}

fn is_connect_failure(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("connection refused")
        || m.contains("tcp connect error")
        || m.contains("no route to host")
        || m.contains("dns error")
        || m.contains("failed to lookup")
}

fn classify_status(status: u16, code: Option<&str>) -> Class {
    match (status, code) {
        (_, Some("SlowDown")) | (503, _) => Class::Overload,
        (
            400 | 403,
            Some(
                "AccessDenied"
                | "SignatureDoesNotMatch"
                | "InvalidAccessKeyId"
                | "AuthorizationHeaderMalformed"
                | "InvalidRequest"
                | "InvalidArgument"
                | "RequestTimeTooSkewed",
            ),
        )
        | (403, _) => Class::Auth,
        (404, _) => Class::NotFound,
        (408 | 429 | 500..=599, _) | (400, Some("RequestTimeout" | "IncompleteBody")) => {
            Class::Transient
        }
        _ => Class::Fatal,
    }
}

fn unquote(etag: &str) -> String {
    etag.trim().trim_matches('"').to_owned()
}

/// True when an ETag is a plain MD5 (single-part upload, no SSE): 32 hex digits.
pub fn etag_is_md5(etag: &str) -> bool {
    etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit())
}

fn to_u64(n: Option<i64>) -> u64 {
    n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn head_of(o: &aws_sdk_s3::operation::get_object::GetObjectOutput, size: u64) -> ObjectHead {
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

fn fmt_time(t: Option<&DateTime>) -> Option<String> {
    t.and_then(|t| t.fmt(DateTimeFormat::DateTime).ok())
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

/// Part sizes S3 clients commonly use, most common first: boto3 and the AWS CLI (8 MiB), the S3
/// minimum (5 MiB, old boto and WAL-E), s3cmd (15 MiB), and round sizes.
const USUAL_PART_SIZES_MIB: [u64; 12] = [8, 5, 15, 16, 10, 25, 32, 50, 64, 100, 128, 256];

/// The part size an object of `size` bytes with the multipart ETag `etag` (`<md5>-<parts>`) was
/// most likely uploaded with: the first usual size that gives that many parts, else the smallest
/// whole number of MiB that does. `None` for a plain-MD5 (single PUT) or unreadable ETag.
pub fn original_part_size(size: u64, etag: &str) -> Option<u64> {
    let (md5, parts) = etag.rsplit_once('-')?;
    let parts: u64 = parts.parse().ok()?;
    if !etag_is_md5(md5) || parts == 0 || parts > 10_000 || size == 0 {
        return None;
    }
    if parts == 1 {
        return Some(size);
    }
    let gives = |p: u64| p >= MIN_PART_SIZE && size.div_ceil(p) == parts;
    USUAL_PART_SIZES_MIB
        .iter()
        .map(|m| m * MIB)
        .find(|&p| gives(p))
        .or_else(|| Some(size.div_ceil(parts).div_ceil(MIB) * MIB).filter(|&p| gives(p)))
        .or_else(|| Some(size.div_ceil(parts)).filter(|&p| gives(p)))
}

/// Feeds `len` bytes of `path` from `offset` to `fold` (on a blocking thread) and returns its
/// state; the one reader behind every hash of a local file here.
async fn fold_range<S: Send + 'static>(
    path: &Path,
    offset: u64,
    len: u64,
    mut state: S,
    fold: fn(&mut S, &[u8]),
) -> Result<S> {
    use std::io::{Read as _, Seek as _};
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let what = format!("read {}", path.display());
        let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&what, e))?;
        f.seek(std::io::SeekFrom::Start(offset))
            .map_err(|e| Error::io(&what, e))?;
        let mut buf = vec![0u8; 1024 * 1024];
        let mut left = len;
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let n = f.read(&mut buf[..want]).map_err(|e| Error::io(&what, e))?;
            if n == 0 {
                return Err(Error::integrity(format!("{what}: shorter than recorded")));
            }
            fold(&mut state, &buf[..n]);
            left -= n as u64;
        }
        Ok(state)
    })
    .await
    .map_err(|e| Error::repository(format!("hashing task failed: {e}")))?
}

/// SHA-256 of the first `len` bytes of `path` and, with `md5`, their MD5, in one read.
async fn digest_file(path: &Path, len: u64, md5: bool) -> Result<(Option<[u8; 16]>, [u8; 32])> {
    let (m, h) = fold_range(
        path,
        0,
        len,
        (md5.then(Md5::new), Sha256::new()),
        |(m, h), b| {
            if let Some(m) = m {
                m.update(b);
            }
            h.update(b);
        },
    )
    .await?;
    Ok((m.map(|m| m.finalize().into()), h.finalize().into()))
}

/// MD5 of `len` bytes of `path` from `offset`, the same bytes fed on into `sha256` (the running
/// hash of the bytes before them), in one read.
async fn md5_feeding(
    path: &Path,
    offset: u64,
    len: u64,
    sha256: Sha256,
) -> Result<([u8; 16], Sha256)> {
    let (m, h) = fold_range(path, offset, len, (Md5::new(), sha256), |(m, h), b| {
        m.update(b);
        h.update(b);
    })
    .await?;
    Ok((m.finalize().into(), h))
}

/// Checks the SHA-256 of a file about to be uploaded: called with the digest of the bytes read
/// (in the read that computes their `Content-MD5`) before anything is committed on the gateway.
/// An error stops the upload: a single PUT is not sent, a multipart upload is aborted instead of
/// completed.
pub type Sha256Check<'a> = &'a (dyn Fn(&[u8; 32]) -> Result<()> + Sync);

/// What one in-order read of a file yields for its multipart upload (see [`part_digests`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartDigest {
    /// Part `number` (from 1): `len` bytes from `offset`, with their MD5.
    Part {
        number: i32,
        offset: u64,
        len: u64,
        md5: [u8; 16],
    },
    /// After the last part: the SHA-256 of the whole file.
    Whole { sha256: [u8; 32] },
}

/// Reads `size` bytes of `path` once, part by part in order: each part's MD5 as soon as it is
/// read (so its upload can start), then the whole file's SHA-256. The parts are read one after
/// the other (a SHA-256 runs in order); a consumer that polls ahead uploads earlier parts while
/// later ones are read. `part_size` must not be 0.
fn part_digests(
    path: &Path,
    size: u64,
    part_size: u64,
) -> impl futures::Stream<Item = Result<PartDigest>> + Send + '_ {
    let count = size.div_ceil(part_size);
    futures::stream::try_unfold((0u64, Some(Sha256::new())), move |(i, sha256)| async move {
        let Some(sha256) = sha256 else {
            return Ok(None);
        };
        if i == count {
            let whole = PartDigest::Whole {
                sha256: sha256.finalize().into(),
            };
            return Ok(Some((whole, (i, None))));
        }
        let offset = i * part_size;
        let len = part_size.min(size - offset);
        let number = i32::try_from(i + 1).map_err(|_| Error::config("too many parts"))?;
        let (md5, sha256) = md5_feeding(path, offset, len, sha256).await?;
        let part = PartDigest::Part {
            number,
            offset,
            len,
            md5,
        };
        Ok(Some((part, (i + 1, Some(sha256)))))
    })
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

impl Gateway {
    /// Resolves the gateways (options, then etcd), builds the clients and checks that the first
    /// answering gateway accepts the keys, settling the signature when it is `auto`.
    pub async fn connect(
        options: &GatewayOptions,
        etcd: Option<&deis_backup_etcd::Client>,
    ) -> Result<Self> {
        let target = options.resolve(etcd).await?;
        let mut gw = Self::new(&target, options)?;
        gw.probe().await?;
        Ok(gw)
    }

    /// Builds the clients without talking to the gateway.
    pub fn new(target: &GatewayTarget, options: &GatewayOptions) -> Result<Self> {
        if target.endpoints.is_empty() {
            return Err(Error::config("no gateway endpoint"));
        }
        if options.part_size < MIN_PART_SIZE {
            return Err(Error::config(format!(
                "part-size {} is below the S3 minimum of 5 MiB",
                options.part_size
            )));
        }
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(options.connect_timeout_secs.max(1)))
            .read_timeout(Duration::from_secs(options.read_timeout_secs.max(1)))
            .build();
        let base = |url: &str| {
            aws_sdk_s3::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new(options.region.clone()))
                .endpoint_url(url)
                .force_path_style(true)
                .retry_config(RetryConfig::disabled())
                .timeout_config(timeouts.clone())
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        };
        let endpoints = target
            .endpoints
            .iter()
            .map(|url| {
                let creds = Credentials::new(
                    target.access_key.expose(),
                    target.secret_key.expose(),
                    None,
                    None,
                    "deis-backup",
                );
                let v4 = base(url).credentials_provider(creds).build();
                let v2 = base(url)
                    .allow_no_auth()
                    .interceptor(sigv2::SigV2Signer::new(
                        target.access_key.clone(),
                        target.secret_key.clone(),
                    ))
                    .build();
                Endpoint {
                    url: url.clone(),
                    v4: aws_sdk_s3::Client::from_conf(v4),
                    v2: aws_sdk_s3::Client::from_conf(v2),
                }
            })
            .collect();
        let max = options.concurrency.max(1);
        Ok(Self {
            endpoints,
            next: AtomicUsize::new(0),
            signature: options.signature,
            v2_active: AtomicBool::new(options.signature == Signature::V2),
            limiter: Limiter::new(max, 1, max),
            bandwidth: options.bandwidth_limit.map(Bandwidth::new),
            retries: options.retries,
            multipart_threshold: options.multipart_threshold.max(MIN_PART_SIZE),
            part_size: options.part_size,
            counters: Counters::default(),
        })
    }

    /// The endpoints in use (no secrets).
    pub fn endpoints(&self) -> Vec<&str> {
        self.endpoints.iter().map(|e| e.url.as_str()).collect()
    }

    /// The signature version in use now: V2 or V4 (never `Auto`).
    pub fn signature_in_use(&self) -> Signature {
        if self.v2_active.load(Ordering::Relaxed) {
            Signature::V2
        } else {
            Signature::V4
        }
    }

    /// The most requests ever in flight (the configured concurrency).
    pub fn max_concurrency(&self) -> usize {
        self.limiter.max()
    }

    pub fn stats(&self) -> GatewayStats {
        let c = &self.counters;
        GatewayStats {
            requests: c.requests.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            overloads: c.overloads.load(Ordering::Relaxed),
            bytes_downloaded: c.bytes_downloaded.load(Ordering::Relaxed),
            bytes_uploaded: c.bytes_uploaded.load(Ordering::Relaxed),
        }
    }

    /// Checks every endpoint with ListBuckets; drops the unreachable ones (with a warning) as long
    /// as one answers; settles `auto` to V4 or V2.
    async fn probe(&mut self) -> Result<()> {
        let mut reachable = vec![false; self.endpoints.len()];
        let mut last = None;
        for (i, ok) in reachable.iter_mut().enumerate() {
            match self.probe_endpoint(i).await {
                Ok(()) => *ok = true,
                Err(e) if e.kind() == ErrorKind::GatewayUnreachable => {
                    tracing::warn!(endpoint = %self.endpoints[i].url, "gateway unreachable; using the others");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        if !reachable.contains(&true) {
            let what = self.endpoints().join(", ");
            let e = last.expect("at least one endpoint");
            return Err(Error::new(
                ErrorKind::GatewayUnreachable,
                format!("no gateway answered ({what}): {}", e.message()),
                e.guidance().to_owned(),
            ));
        }
        let mut keep = reachable.into_iter();
        self.endpoints.retain(|_| keep.next().unwrap_or(false));
        Ok(())
    }

    async fn probe_endpoint(&self, i: usize) -> Result<()> {
        let ep = &self.endpoints[i];
        let try_with = |client: aws_sdk_s3::Client| async move {
            let mut attempt = 0;
            loop {
                let r = client.list_buckets().send().await;
                match r {
                    Ok(_) => return Ok(()),
                    Err(e) => {
                        let f = Failure::from_sdk(&e);
                        let retry = matches!(f.class, Class::Overload | Class::Transient)
                            || (f.class == Class::Unreachable && attempt < 1);
                        if !retry || attempt >= 2 {
                            return Err(f);
                        }
                        tokio::time::sleep(load::backoff(
                            attempt,
                            Duration::from_millis(100),
                            Duration::from_secs(1),
                        ))
                        .await;
                        attempt += 1;
                    }
                }
            }
        };
        let use_v2 = self.v2_active.load(Ordering::Relaxed);
        let first = try_with(if use_v2 { ep.v2.clone() } else { ep.v4.clone() }).await;
        match first {
            Ok(()) => Ok(()),
            Err(f) if f.class == Class::Auth && self.signature == Signature::Auto && !use_v2 => {
                tracing::info!(endpoint = %ep.url, "gateway refused SigV4 ({}); using SigV2", f.message);
                match try_with(ep.v2.clone()).await {
                    Ok(()) => {
                        self.v2_active.store(true, Ordering::Relaxed);
                        Ok(())
                    }
                    Err(f) => Err(f.into_error("listing buckets (SigV2)", &ep.url)),
                }
            }
            Err(f) => Err(f.into_error("listing buckets", &ep.url)),
        }
    }

    /// Round-robin over the gateways, with the signature in use.
    fn pick(&self) -> (&Endpoint, aws_sdk_s3::Client) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        let ep = &self.endpoints[i];
        let c = if self.v2_active.load(Ordering::Relaxed) {
            ep.v2.clone()
        } else {
            ep.v4.clone()
        };
        (ep, c)
    }

    /// Runs `op` under the limiter with retries; the error is the last attempt's, classified.
    async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, (Failure, String)>
    where
        F: FnMut(aws_sdk_s3::Client) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut attempt = 0u32;
        let mut fell_back = false;
        loop {
            let (ep, client) = self.pick();
            let permit = self.limiter.acquire().await;
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let r = op(client).await;
            drop(permit);
            let f = match r {
                Ok(v) => {
                    self.limiter.success();
                    return Ok(v);
                }
                Err(f) => f,
            };
            match f.class {
                Class::Auth
                    if self.signature == Signature::Auto
                        && !fell_back
                        && !self.v2_active.load(Ordering::Relaxed) =>
                {
                    tracing::info!(endpoint = %ep.url, "gateway refused SigV4 ({}); using SigV2 from now on", f.message);
                    self.v2_active.store(true, Ordering::Relaxed);
                    fell_back = true;
                }
                Class::Overload | Class::Transient | Class::Unreachable
                    if attempt < self.retries =>
                {
                    if f.class != Class::Transient {
                        self.limiter.overload();
                        self.counters.overloads.fetch_add(1, Ordering::Relaxed);
                    }
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(endpoint = %ep.url, attempt, "{what}: {}; retrying", f.message);
                    tokio::time::sleep(load::backoff(
                        attempt,
                        Duration::from_millis(100),
                        Duration::from_secs(10),
                    ))
                    .await;
                    attempt += 1;
                }
                _ => return Err((f, ep.url.clone())),
            }
        }
    }

    async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: FnMut(aws_sdk_s3::Client) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        self.run(what, op)
            .await
            .map_err(|(f, ep)| f.into_error(what, &ep))
    }

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
            let m = marker.clone();
            let (page, truncated, next) = self
                .call(&what, |c| {
                    let m = m.clone();
                    async move {
                        let o = c
                            .list_objects()
                            .bucket(bucket)
                            .set_prefix(prefix.map(str::to_owned))
                            .set_marker(m)
                            .max_keys(1000)
                            .send()
                            .await
                            .map_err(|e| Failure::from_sdk(&e))?;
                        let page: Vec<ListedObject> = o
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
                })
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

    /// Uploads like [`Gateway::put_file`] an object whose ETag was `original_etag`: one that was a
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
                .call(&what, |c| {
                    let delete = delete.clone();
                    async move {
                        let o = c
                            .delete_objects()
                            .bucket(bucket)
                            .delete(delete)
                            .customize()
                            .mutate_request(|req| {
                                if let Some(body) = req.body().bytes() {
                                    let md5 = base64::engine::general_purpose::STANDARD
                                        .encode(Md5::digest(body));
                                    req.headers_mut().insert("content-md5", md5);
                                }
                            })
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
                            .collect::<Vec<_>>())
                    }
                })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("10M"), Ok(10_000_000));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let o = GatewayOptions {
            access_key: Some(Secret::new("AKIDSECRETVALUE")),
            secret_key: Some(Secret::new("verysecret")),
            ..GatewayOptions::default()
        };
        let dbg = format!("{o:?}");
        assert!(
            !dbg.contains("AKIDSECRETVALUE") && !dbg.contains("verysecret"),
            "{dbg}"
        );
    }

    #[test]
    fn options_from_toml_style_json() {
        let o: GatewayOptions = serde_json::from_str(
            r#"{"endpoints":["10.0.0.1:8888"],"signature":"v2","part-size":"8MiB","bandwidth-limit":1000}"#,
        )
        .unwrap();
        assert_eq!(o.signature, Signature::V2);
        assert_eq!(o.part_size, 8 << 20);
        assert_eq!(o.bandwidth_limit, Some(1000));
        assert_eq!(o.concurrency, 32);
        assert!(serde_json::from_str::<GatewayOptions>(r#"{"no-such":1}"#).is_err());
    }

    #[test]
    fn endpoints_normalise() {
        assert_eq!(
            endpoint_url("127.0.0.1:8888").unwrap(),
            "http://127.0.0.1:8888"
        );
        assert_eq!(endpoint_url("https://gw:443/").unwrap(), "https://gw:443");
        assert!(endpoint_url("ftp://x").is_err());
        let e = endpoint_url("http://AKID:s3cret@gw:8888").unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn statuses_classify() {
        assert_eq!(classify_status(503, None), Class::Overload);
        assert_eq!(classify_status(400, Some("SlowDown")), Class::Overload);
        assert_eq!(
            classify_status(403, Some("SignatureDoesNotMatch")),
            Class::Auth
        );
        assert_eq!(
            classify_status(400, Some("AuthorizationHeaderMalformed")),
            Class::Auth
        );
        assert_eq!(classify_status(404, Some("NoSuchKey")), Class::NotFound);
        assert_eq!(classify_status(500, None), Class::Transient);
        assert_eq!(classify_status(409, Some("BucketNotEmpty")), Class::Fatal);
    }

    #[test]
    fn original_part_sizes_are_inferred_from_multipart_etags() {
        let md5 = "0123456789abcdef0123456789abcdef";
        let mib = 1024 * 1024;
        // (object size, parts in the ETag, part size expected)
        let cases = [
            // boto3's 8 MiB parts: 12.5 MiB in 2 parts, 40 MiB in 5.
            (12 * mib + mib / 2, 2, 8 * mib),
            (40 * mib, 5, 8 * mib),
            // 5 MiB parts where 8 MiB would give fewer: 12 MiB in 3 parts.
            (12 * mib, 3, 5 * mib),
            // s3cmd's 15 MiB: 40 MiB in 3 parts (8 MiB gives 5, 5 MiB gives 8).
            (40 * mib, 3, 15 * mib),
            // No usual size fits: the smallest whole MiB that gives the count.
            (1000 * mib, 7, 143 * mib),
        ];
        for (size, parts, want) in cases {
            let etag = format!("{md5}-{parts}");
            assert_eq!(original_part_size(size, &etag), Some(want), "{size} {etag}");
        }
        // One part is the whole object.
        assert_eq!(original_part_size(3, &format!("{md5}-1")), Some(3));
        // Single PUTs and nonsense have none.
        assert_eq!(original_part_size(40 * mib, md5), None);
        assert_eq!(original_part_size(40 * mib, &format!("{md5}-x")), None);
        assert_eq!(original_part_size(40 * mib, "abc-2"), None);
        assert_eq!(original_part_size(4 * mib, &format!("{md5}-3")), None);
    }

    /// A file of `len` pseudo-random bytes.
    fn random_file(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let mut data = vec![0u8; len];
        fastrand::Rng::with_seed(7).fill(&mut data);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &data).unwrap();
        (f, data)
    }

    #[tokio::test]
    async fn one_read_gives_the_md5_and_feeds_the_sha256() {
        let (f, data) = random_file(3 * 1024 * 1024 + 5);
        let (md5, sha) = md5_feeding(f.path(), 0, data.len() as u64, Sha256::new())
            .await
            .unwrap();
        assert_eq!(md5, <[u8; 16]>::from(Md5::digest(&data)));
        assert_eq!(sha.finalize(), Sha256::digest(&data));
        // From an offset, continuing a running SHA-256: the halves make the whole.
        let half = data.len() / 2;
        let (_, first) = md5_feeding(f.path(), 0, half as u64, Sha256::new())
            .await
            .unwrap();
        let (md5, both) = md5_feeding(f.path(), half as u64, (data.len() - half) as u64, first)
            .await
            .unwrap();
        assert_eq!(md5, <[u8; 16]>::from(Md5::digest(&data[half..])));
        assert_eq!(both.finalize(), Sha256::digest(&data));
        // A file shorter than recorded is an error, not a short hash.
        let err = md5_feeding(f.path(), 0, data.len() as u64 + 1, Sha256::new())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    }

    #[tokio::test]
    async fn part_digests_are_each_parts_md5_then_the_whole_sha256() {
        let (f, data) = random_file(2 * 1024 * 1024 + 100);
        let part = 1024 * 1024;
        let got: Vec<PartDigest> =
            futures::TryStreamExt::try_collect(part_digests(f.path(), data.len() as u64, part))
                .await
                .unwrap();
        let mut want: Vec<PartDigest> = data
            .chunks(usize::try_from(part).unwrap())
            .enumerate()
            .map(|(i, c)| PartDigest::Part {
                number: i32::try_from(i + 1).unwrap(),
                offset: i as u64 * part,
                len: c.len() as u64,
                md5: Md5::digest(c).into(),
            })
            .collect();
        want.push(PartDigest::Whole {
            sha256: Sha256::digest(&data).into(),
        });
        assert_eq!(got.len(), 4, "3 parts, then the whole");
        assert_eq!(got, want);
        // One part that is the whole file.
        let one: Vec<PartDigest> = futures::TryStreamExt::try_collect(part_digests(
            f.path(),
            data.len() as u64,
            data.len() as u64,
        ))
        .await
        .unwrap();
        assert_eq!(one.len(), 2);
        assert_eq!(one[1], want[3]);
    }

    #[tokio::test]
    async fn a_failed_sha256_check_sends_no_request() {
        // Nothing listens on this endpoint: a request would fail as unreachable, not as the check.
        let target = GatewayTarget {
            endpoints: vec!["http://127.0.0.1:9".to_owned()],
            access_key: Secret::new("AK"),
            secret_key: Secret::new("SK"),
        };
        let gw = Gateway::new(
            &target,
            &GatewayOptions {
                retries: 0,
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

    #[test]
    fn md5_etags_are_recognised() {
        assert!(etag_is_md5("d41d8cd98f00b204e9800998ecf8427e"));
        assert!(!etag_is_md5("d41d8cd98f00b204e9800998ecf8427e-3"));
        assert_eq!(unquote("\"abc\""), "abc");
    }
}
