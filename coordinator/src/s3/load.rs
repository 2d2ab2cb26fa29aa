//! Load control for talking to a gateway that can be overwhelmed: adaptive concurrency, retry
//! backoff with jitter, and an optional bandwidth cap.
//!
//! Owns: [`Limiter`] (how many requests may be in flight), [`backoff`] (how long to wait before a
//! retry) and [`Bandwidth`] (a token bucket over transferred bytes).
//! Invariants:
//! - The number of requests in flight never exceeds the limiter's current limit, which stays within
//!   `[min, max]`.
//! - The limit is cut multiplicatively (halved) on overload — a 503/SlowDown, a timeout, a reset
//!   connection — at most once per cool-down, and grows by one after a full window of successes
//!   (AIMD), so a calm gateway is driven back up to `max`.
//! - Shrinking never waits: permits in use are retired as they come back (the "debt").

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long after one cut another overload signal is taken as the same event.
const COOL_DOWN: Duration = Duration::from_millis(500);

/// Adaptive concurrency limit (additive increase, multiplicative decrease).
#[derive(Debug)]
pub struct Limiter {
    semaphore: Arc<Semaphore>,
    state: Mutex<State>,
    min: usize,
    max: usize,
}

#[derive(Debug)]
struct State {
    limit: usize,
    /// Permits to retire as they are released (the limit was cut while they were in use).
    debt: usize,
    /// Successes since the last change.
    calm: usize,
    last_cut: Option<Instant>,
    cuts: u64,
}

/// A slot for one request; returned (or retired, after a cut) on drop.
#[derive(Debug)]
pub struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    limiter: Arc<Limiter>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(p) = self.permit.take() else { return };
        let mut st = self.limiter.state.lock().expect("limiter lock");
        if st.debt > 0 {
            st.debt -= 1;
            p.forget();
        }
    }
}

impl Limiter {
    /// A limiter starting at `initial`, kept within `[min, max]` (`min` ≥ 1).
    pub fn new(initial: usize, min: usize, max: usize) -> Arc<Self> {
        let min = min.max(1);
        let max = max.max(min);
        let initial = initial.clamp(min, max);
        Arc::new(Self {
            semaphore: Arc::new(Semaphore::new(initial)),
            state: Mutex::new(State {
                limit: initial,
                debt: 0,
                calm: 0,
                last_cut: None,
                cuts: 0,
            }),
            min,
            max,
        })
    }

    /// Waits for a slot.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        let permit = Arc::clone(&self.semaphore)
            .acquire_owned()
            .await
            .expect("the limiter's semaphore is never closed");
        Permit {
            permit: Some(permit),
            limiter: Arc::clone(self),
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.state.lock().expect("limiter lock").limit
    }

    /// The ceiling of the limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// How many times the limit was cut.
    pub fn cuts(&self) -> u64 {
        self.state.lock().expect("limiter lock").cuts
    }

    /// A request went well: after a window of `limit` successes the limit grows by one.
    pub fn success(&self) {
        let mut st = self.state.lock().expect("limiter lock");
        st.calm += 1;
        if st.calm >= st.limit && st.limit < self.max {
            st.calm = 0;
            st.limit += 1;
            if st.debt > 0 {
                st.debt -= 1;
            } else {
                self.semaphore.add_permits(1);
            }
        }
    }

    /// The gateway is overloaded: halve the limit (once per cool-down).
    pub fn overload(&self) {
        let mut st = self.state.lock().expect("limiter lock");
        st.calm = 0;
        if st.last_cut.is_some_and(|t| t.elapsed() < COOL_DOWN) {
            return;
        }
        let target = (st.limit / 2).max(self.min);
        if target == st.limit {
            return;
        }
        let cut = st.limit - target;
        st.limit = target;
        st.last_cut = Some(Instant::now());
        st.cuts += 1;
        st.debt += cut;
        while st.debt > 0 {
            match self.semaphore.try_acquire() {
                Ok(p) => {
                    p.forget();
                    st.debt -= 1;
                }
                Err(_) => break,
            }
        }
        tracing::debug!(limit = target, "gateway overloaded: concurrency cut");
    }
}

/// The wait before retry number `attempt` (0-based): exponential from `base`, capped at `cap`,
/// with "equal jitter" (half fixed, half random) so retries of many requests spread out.
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(20)).min(cap);
    let half = exp / 2;
    let jitter = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
    half + Duration::from_micros(fastrand::u64(0..=jitter))
}

/// A token bucket over bytes: `take(n)` sleeps as long as needed to keep the average rate at or
/// below `bytes_per_sec`, allowing a burst of one second.
#[derive(Debug)]
pub struct Bandwidth {
    rate: f64,
    state: tokio::sync::Mutex<(f64, Instant)>,
}

impl Bandwidth {
    pub fn new(bytes_per_sec: u64) -> Self {
        #[allow(clippy::cast_precision_loss)]
        let rate = bytes_per_sec.max(1) as f64;
        Self {
            rate,
            state: tokio::sync::Mutex::new((rate, Instant::now())),
        }
    }

    /// Accounts for `bytes` moved, sleeping when the bucket is in deficit.
    pub async fn take(&self, bytes: usize) {
        let wait = {
            let mut st = self.state.lock().await;
            let now = Instant::now();
            let refill = now.duration_since(st.1).as_secs_f64() * self.rate;
            #[allow(clippy::cast_precision_loss)]
            let tokens = (st.0 + refill).min(self.rate) - bytes as f64;
            *st = (tokens, now);
            if tokens < 0.0 {
                Duration::from_secs_f64(-tokens / self.rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overload_halves_and_calm_climbs_back() {
        let l = Limiter::new(8, 1, 8);
        let held: Vec<_> = futures::future::join_all((0..8).map(|_| l.acquire())).await;
        l.overload();
        assert_eq!(l.limit(), 4);
        // A second signal inside the cool-down is the same event.
        l.overload();
        assert_eq!(l.limit(), 4);
        drop(held);
        // Only 4 slots are usable now.
        let four: Vec<_> = futures::future::join_all((0..4).map(|_| l.acquire())).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), l.acquire())
                .await
                .is_err(),
            "a fifth request must wait after the cut"
        );
        drop(four);
        for _ in 0..4 {
            l.success();
        }
        assert_eq!(l.limit(), 5);
        for _ in 0..100 {
            l.success();
        }
        assert_eq!(l.limit(), 8, "calm climbs back to max and no further");
        let all: Vec<_> = futures::future::join_all((0..8).map(|_| l.acquire())).await;
        assert_eq!(all.len(), 8);
    }

    #[test]
    fn limit_never_below_min() {
        let l = Limiter::new(2, 2, 4);
        l.overload();
        assert_eq!(l.limit(), 2);
        assert_eq!(l.cuts(), 0);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        for attempt in 0..10 {
            let d = backoff(attempt, base, cap);
            let exp = (base * (1 << attempt)).min(cap);
            assert!(d >= exp / 2 && d <= exp, "attempt {attempt}: {d:?}");
        }
    }

    #[tokio::test]
    async fn bandwidth_paces_transfers() {
        let bw = Bandwidth::new(1_000_000);
        let t = Instant::now();
        // The first second's worth is a burst; the next 300 kB must wait about 0.3 s.
        bw.take(1_000_000).await;
        bw.take(300_000).await;
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(280), "{e:?}");
        assert!(e < Duration::from_secs(2), "{e:?}");
    }
}
