//! The request runner: every request of the [`Client`] goes through [`Client::run`] (or
//! [`Client::call`], which turns the last failure into an [`Error`](crate::Error)).
//!
//! Owns: the choice of endpoint and signature for each attempt, the retry loop, and the switch
//! from SigV4 to SigV2 during operation.
//! Invariants:
//! - Attempts go round-robin over the endpoints that are not resting, with the signature in use
//!   at that moment; an attempt that cannot reach its endpoint sends it to rest for
//!   [`REST`](super::REST). Every attempt is counted on its endpoint, every retried failure too.
//! - Every attempt holds a permit of the adaptive [`Limiter`](super::load::Limiter) while it runs;
//!   a success may let the limit grow, an overload or an unreachable endpoint cuts it.
//! - Overloads, transient failures and unreachable endpoints are retried with jittered exponential
//!   backoff (from 100 ms, capped at 10 s), up to `retries` times; any other failure is the answer
//!   at once.
//! - Under `signature = auto`, the first authentication failure of a SigV4 attempt switches the
//!   client to SigV2 for good; the request is then tried again once, not counted as a retry.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::failure::{Class, Failure};
use super::{Client, Endpoint, Signature, load};
use crate::error::Result;

impl Client {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Round-robin over the gateways not resting (over all of them when all rest), with the
    /// signature in use.
    fn pick(&self) -> (&Endpoint, aws_sdk_s3::Client) {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let now = self.now_ms();
        let i = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| self.endpoints[i].resting_until_ms.load(Ordering::Relaxed) <= now)
            .unwrap_or(start);
        let ep = &self.endpoints[i];
        let c = if self.v2_active.load(Ordering::Relaxed) {
            ep.v2.clone()
        } else {
            ep.v4.clone()
        };
        (ep, c)
    }

    /// Runs `op` under the limiter with retries; the error is the last attempt's, classified.
    pub(super) async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, (Failure, String)>
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
            ep.requests.fetch_add(1, Ordering::Relaxed);
            let r = op(client).await;
            drop(permit);
            let f = match r {
                Ok(v) => {
                    self.limiter.success();
                    return Ok(v);
                }
                Err(f) => f,
            };
            if matches!(
                f.class,
                Class::Overload | Class::Transient | Class::Unreachable
            ) {
                ep.failures.fetch_add(1, Ordering::Relaxed);
            }
            if f.class == Class::Unreachable {
                let until = self
                    .now_ms()
                    .saturating_add(u64::try_from(super::REST.as_millis()).unwrap_or(u64::MAX));
                ep.resting_until_ms.store(until, Ordering::Relaxed);
                tracing::warn!(endpoint = %ep.url, "gateway unreachable; passing it over for {} s", super::REST.as_secs());
            }
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

    pub(super) async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: FnMut(aws_sdk_s3::Client) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        self.run(what, op)
            .await
            .map_err(|(f, ep)| f.into_error(what, &ep))
    }
}
