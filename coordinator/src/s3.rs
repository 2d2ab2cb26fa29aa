//! A neutral S3 client: the few S3 operations the mirror, the bucket restore and the S3 repository
//! need, over a set of endpoints sharing one store, with signatures, load control, retries and
//! checked transfers. It discovers nothing: [`crate::gateway`] finds the store-gateway (Ceph
//! radosgw) and its keys in etcd and builds a [`Client`] from them; the S3 repository builds one
//! for its bucket. (Its error messages, guidance lines and option help still speak of the
//! store-gateway, its main user.)
//!
//! Owns: [`Client`] (one SDK client per endpoint for each signature version), its construction from
//! a [`Target`] and [`GatewayOptions`], the probe that settles the endpoints and the signature, and
//! its [`Stats`]. One concern per child module: `options` (options, sizes), `failure`
//! (classification), `retry` (the request runner), `load` (concurrency, backoff, bandwidth),
//! `sigv2` (AWS Signature V2), `etag` (ETags, part sizes), `digest` (hashes of local files), `meta`
//! (what is said about objects), then one file per operation family: `bucket`, `list`, `get`,
//! `put`, `delete`.
//! Invariants:
//! - Every endpoint of the [`Target`] is used (requests go round-robin), path-style (a bucket such
//!   as `db_wal` is not a DNS name); the probe drops the unreachable ones as long as one answers.
//!   An endpoint that cannot be reached during operation rests for [`REST`] (requests go to the
//!   others; when all rest, round-robin goes on), so a gateway that dies mid-run costs one failed
//!   attempt per rest, not half of all attempts. Requests and failures are counted per endpoint
//!   ([`EndpointStats`]).
//! - `signature = auto` starts with V4 and, on the first authentication failure, switches to V2
//!   once and for good (Ceph Hammer only speaks V2); `v2` and `v4` never switch.
//! - Every request passes through the adaptive [`load::Limiter`] and the optional bandwidth cap;
//!   transient failures are retried with jittered exponential backoff, up to `retries` times. The
//!   SDK's own retries are off.
//! - Bodies stream both ways; downloads are checked against their length and MD5 ETag, uploads are
//!   sent with `Content-MD5` and their returned ETag compared.
//! - Keys never appear in logs, errors or `Debug` output ([`SecretString`]).

pub mod load;
pub mod sigv2;

mod bucket;
mod delete;
mod digest;
mod etag;
mod failure;
mod get;
mod list;
mod meta;
mod options;
mod put;
mod retry;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;

pub use etag::{MIN_PART_SIZE, etag_is_md5, original_part_size};
use failure::{Class, Failure};
pub use get::{ChunkSink, DOWNLOAD_RANGE};
use load::{Bandwidth, Limiter};
pub use meta::{ListedObject, ObjectHead, ObjectMeta};
pub use options::{GatewayOptions, Signature, parse_size};
pub use put::Sha256Check;

use crate::error::{Error, ErrorKind, Result};
use crate::secret::{ExposeSecret, SecretString};

const MIB: u64 = 1024 * 1024;

/// Where the endpoints are and the keys to use (for the store-gateway: resolved from options and
/// etcd by [`crate::gateway`]).
#[derive(Debug, Clone)]
pub struct Target {
    /// Endpoint URLs (`http://host:port`).
    pub endpoints: Vec<String>,
    pub access_key: SecretString,
    pub secret_key: SecretString,
}

/// How long an endpoint that could not be reached is passed over.
pub const REST: Duration = Duration::from_secs(5);

/// What one endpoint served: attempts sent to it, and those that failed (any retried failure).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EndpointStats {
    pub endpoint: String,
    pub requests: u64,
    pub failures: u64,
}

/// Counters of what the client did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
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
    requests: AtomicU64,
    failures: AtomicU64,
    /// Passed over until this many milliseconds after the client's `epoch` (0: in use).
    resting_until_ms: AtomicU64,
}

/// A client for a set of S3 endpoints sharing one store (the store-gateway's hosts, or one S3
/// service).
#[derive(Debug)]
pub struct Client {
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    epoch: std::time::Instant,
    signature: Signature,
    v2_active: AtomicBool,
    limiter: Arc<Limiter>,
    bandwidth: Option<Bandwidth>,
    retries: u32,
    multipart_threshold: u64,
    part_size: u64,
    counters: Counters,
}

impl Client {
    /// Builds the clients without talking to the gateway.
    pub fn new(target: &Target, options: &GatewayOptions) -> Result<Self> {
        if target.endpoints.is_empty() {
            return Err(Error::config("no gateway endpoint"));
        }
        if options.part_size() < MIN_PART_SIZE {
            return Err(Error::config(format!(
                "part-size {} is below the S3 minimum of 5 MiB",
                options.part_size()
            )));
        }
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(options.connect_timeout_secs().max(1)))
            .read_timeout(Duration::from_secs(options.read_timeout_secs().max(1)))
            .build();
        let base = |url: &str| {
            aws_sdk_s3::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new(options.region().to_owned()))
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
                    target.access_key.expose_secret(),
                    target.secret_key.expose_secret(),
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
                    requests: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    resting_until_ms: AtomicU64::new(0),
                }
            })
            .collect();
        let max = options.concurrency().max(1);
        Ok(Self {
            endpoints,
            next: AtomicUsize::new(0),
            epoch: std::time::Instant::now(),
            signature: options.signature(),
            v2_active: AtomicBool::new(options.signature() == Signature::V2),
            limiter: Limiter::new(max, 1, max),
            bandwidth: options.bandwidth_limit.map(Bandwidth::new),
            retries: options.retries(),
            multipart_threshold: options.multipart_threshold().max(MIN_PART_SIZE),
            part_size: options.part_size(),
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

    /// Requests and failures per endpoint in use, in the order of the endpoints.
    pub fn endpoint_stats(&self) -> Vec<EndpointStats> {
        self.endpoints
            .iter()
            .map(|e| EndpointStats {
                endpoint: e.url.clone(),
                requests: e.requests.load(Ordering::Relaxed),
                failures: e.failures.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// The most requests ever in flight (the configured concurrency).
    pub fn max_concurrency(&self) -> usize {
        self.limiter.max()
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            requests: c.requests.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            overloads: c.overloads.load(Ordering::Relaxed),
            bytes_downloaded: c.bytes_downloaded.load(Ordering::Relaxed),
            bytes_uploaded: c.bytes_uploaded.load(Ordering::Relaxed),
        }
    }

    /// Checks every endpoint with ListBuckets; drops the unreachable ones (with a warning) as long
    /// as one answers; settles `auto` to V4 or V2.
    pub(crate) async fn probe(&mut self) -> Result<()> {
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
}
