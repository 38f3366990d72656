//! Rate limits of vendors and rules as token buckets on the monotonic clock.
//! Each bucket is one atomic word, so deciding takes no lock and buckets of
//! different vendors and rules never contend.
//!
//! A bucket follows the generic cell rate algorithm: it stores the time at
//! which it would be full again (the theoretical arrival time). A request at
//! `now` conforms when that time is at most `(burst - 1) × interval` ahead of
//! `now`, and taking a token moves it one interval later. This is a token
//! bucket of `burst` tokens refilled one token per interval.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::config::{Rate, RateConfig};

/// Nanoseconds per second, times 1000 because rates are in thousandths.
const NANOS_PER_SECOND_MILLI: u64 = 1_000_000_000_000;

/// The requests a bucket counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKind {
    /// Every request.
    Requests,
    /// Requests of the writing functions 5, 6, 15, 16, 21, 22 and 23.
    Writes,
}

/// The configured limit of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub kind: RateKind,
    pub rate: Rate,
    pub burst: u32,
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            RateKind::Requests => "requests",
            RateKind::Writes => "writes",
        };
        write!(f, "{} {kind} per second, burst {}", self.rate, self.burst)
    }
}

/// Whose limit a rate-limited request hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateScope {
    /// The limit of the vendor, on all of its requests.
    Vendor { name: Arc<str> },
    /// The limit of one rule, as `FILE#N`, on the requests it allows.
    Rule { label: Arc<str> },
}

impl fmt::Display for RateScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateScope::Vendor { name } => write!(f, "vendor {name}"),
            RateScope::Rule { label } => write!(f, "rule {label}"),
        }
    }
}

/// One token bucket. Times are nanoseconds since an epoch the owner picks
/// on the monotonic clock.
#[derive(Debug)]
pub struct Bucket {
    limit: RateLimit,
    /// Time to refill one token, in nanoseconds, rounded up.
    interval: u64,
    /// How far ahead of now the full time may be: `(burst - 1) × interval`.
    tolerance: u64,
    /// The time the bucket is full again, in nanoseconds since the epoch.
    full_at: AtomicU64,
}

impl Bucket {
    pub fn new(kind: RateKind, rate: Rate, burst: Option<u32>) -> Self {
        // One second's worth of tokens, rounded up, unless set.
        let burst = burst
            .unwrap_or_else(|| rate.millis_per_second.div_ceil(1000) as u32)
            .max(1);
        let interval = NANOS_PER_SECOND_MILLI
            .div_ceil(rate.millis_per_second.max(1))
            .max(1);
        Bucket {
            limit: RateLimit { kind, rate, burst },
            interval,
            tolerance: interval.saturating_mul(u64::from(burst - 1)),
            full_at: AtomicU64::new(0),
        }
    }

    /// Returns whether a token is available at `now` without taking it.
    fn available(&self, now: u64) -> bool {
        let full_at = self.full_at.load(Ordering::Relaxed);
        full_at.max(now) - now <= self.tolerance
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Returns whether the bucket contains all `burst` tokens at `now`, so that
    /// forgetting it changes nothing.
    pub fn is_full(&self, now: u64) -> bool {
        self.full_at.load(Ordering::Relaxed) <= now
    }

    /// Takes a token at `now`, or returns false when the bucket is empty.
    pub fn take(&self, now: u64) -> bool {
        let mut full_at = self.full_at.load(Ordering::Relaxed);
        loop {
            let start = full_at.max(now);
            if start - now > self.tolerance {
                return false;
            }
            let next = start.saturating_add(self.interval);
            match self.full_at.compare_exchange_weak(
                full_at,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(current) => full_at = current,
            }
        }
    }

    /// Returns a token taken by `take`.
    fn give_back(&self) {
        let _ = self
            .full_at
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |full_at| {
                Some(full_at.saturating_sub(self.interval))
            });
    }
}

/// The buckets of one vendor or rule.
#[derive(Debug)]
pub(super) struct RateLimiter {
    scope: RateScope,
    requests: Option<Bucket>,
    writes: Option<Bucket>,
    /// The monotonic time that bucket times count from.
    epoch: Instant,
}

/// A request a limiter refused: whose limit and which one.
pub(super) type Refusal = (RateScope, RateLimit);

impl RateLimiter {
    pub(super) fn new(scope: RateScope, config: &RateConfig, epoch: Instant) -> Self {
        let bucket =
            |kind, rate: Option<Rate>| rate.map(|rate| Bucket::new(kind, rate, config.burst));
        RateLimiter {
            scope,
            requests: bucket(RateKind::Requests, config.requests_per_second),
            writes: bucket(RateKind::Writes, config.writes_per_second),
            epoch,
        }
    }

    #[cfg(test)]
    fn scope(&self) -> &RateScope {
        &self.scope
    }

    /// Returns the configured limits, requests first.
    #[cfg(test)]
    fn limits(&self) -> impl Iterator<Item = RateLimit> + '_ {
        [&self.requests, &self.writes]
            .into_iter()
            .flatten()
            .map(|bucket| bucket.limit)
    }

    fn nanos(&self, now: Instant) -> u64 {
        let nanos = now.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX)
    }

    fn buckets(&self, write: bool) -> (Option<&Bucket>, Option<&Bucket>) {
        (
            self.requests.as_ref(),
            self.writes.as_ref().filter(|_| write),
        )
    }

    fn refusal(&self, bucket: &Bucket) -> Refusal {
        (self.scope.clone(), bucket.limit)
    }

    /// Takes a token from every bucket that counts this request. When one
    /// bucket is empty, no token is taken from any.
    pub(super) fn take(&self, write: bool, now: Instant) -> Result<(), Refusal> {
        let now = self.nanos(now);
        let (requests, writes) = self.buckets(write);
        if let Some(bucket) = requests {
            if !bucket.take(now) {
                return Err(self.refusal(bucket));
            }
        }
        if let Some(bucket) = writes {
            if !bucket.take(now) {
                if let Some(taken) = requests {
                    taken.give_back();
                }
                return Err(self.refusal(bucket));
            }
        }
        Ok(())
    }

    /// Checks what `take` would return, without taking tokens.
    pub(super) fn peek(&self, write: bool, now: Instant) -> Result<(), Refusal> {
        let now = self.nanos(now);
        let (requests, writes) = self.buckets(write);
        for bucket in [requests, writes].into_iter().flatten() {
            if !bucket.available(now) {
                return Err(self.refusal(bucket));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limiter(requests: Option<u64>, writes: Option<u64>, burst: Option<u32>) -> RateLimiter {
        let config = RateConfig {
            requests_per_second: requests.map(Rate::per_second),
            writes_per_second: writes.map(Rate::per_second),
            burst,
        };
        let scope = RateScope::Vendor {
            name: Arc::from("acme"),
        };
        RateLimiter::new(scope, &config, Instant::now())
    }

    fn limit(kind: RateKind, per_second: u64, burst: u32) -> RateLimit {
        RateLimit {
            kind,
            rate: Rate::per_second(per_second),
            burst,
        }
    }

    #[test]
    fn burst_is_allowed_then_refused_until_one_interval() {
        let limiter = limiter(Some(50), None, Some(10));
        let start = limiter.epoch + Duration::from_secs(1);
        for _ in 0..10 {
            assert_eq!(limiter.take(false, start), Ok(()));
        }
        let refused = limiter.take(false, start).unwrap_err();
        assert_eq!(refused.1, limit(RateKind::Requests, 50, 10));
        // 50 per second refills one token every 20 ms.
        let almost = start + Duration::from_nanos(19_999_999);
        assert!(limiter.take(false, almost).is_err());
        let refilled = start + Duration::from_millis(20);
        assert_eq!(limiter.take(false, refilled), Ok(()));
        assert!(limiter.take(false, refilled).is_err());
    }

    #[test]
    fn allowed_count_follows_rate_after_burst() {
        let limiter = limiter(Some(50), None, Some(10));
        let start = limiter.epoch;
        // One request every millisecond for one second.
        let allowed = (0..1000u64)
            .filter(|ms| {
                limiter
                    .take(false, start + Duration::from_millis(*ms))
                    .is_ok()
            })
            .count();
        // The burst, then one every 20 ms from 20 ms to 980 ms.
        assert_eq!(allowed, 10 + 49);
    }

    #[test]
    fn empty_bucket_refills_to_burst_only() {
        let limiter = limiter(Some(10), None, Some(3));
        let later = limiter.epoch + Duration::from_secs(3600);
        let allowed = (0..10)
            .filter(|_| limiter.take(false, later).is_ok())
            .count();
        assert_eq!(allowed, 3);
    }

    #[test]
    fn writes_bucket_counts_only_writes() {
        // Bursts default to one second of each rate: 100 requests, 2 writes.
        let limiter = limiter(Some(100), Some(2), None);
        let now = limiter.epoch;
        assert_eq!(limiter.take(true, now), Ok(()));
        assert_eq!(limiter.take(true, now), Ok(()));
        let refused = limiter.take(true, now).unwrap_err();
        assert_eq!(refused.1, limit(RateKind::Writes, 2, 2));
        // The refused write gave its request token back, so 98 remain.
        let reads = (0..200)
            .filter(|_| limiter.take(false, now).is_ok())
            .count();
        assert_eq!(reads, 98);
    }

    #[test]
    fn peek_reports_without_taking() {
        let limiter = limiter(None, Some(1), Some(1));
        let now = limiter.epoch;
        assert_eq!(limiter.peek(true, now), Ok(()));
        assert_eq!(limiter.peek(true, now), Ok(()));
        assert_eq!(limiter.peek(false, now), Ok(()));
        assert_eq!(limiter.take(true, now), Ok(()));
        assert!(limiter.peek(true, now).is_err());
        assert_eq!(limiter.peek(true, now + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn default_burst_is_one_second_of_rate() {
        let half = RateConfig {
            requests_per_second: Some(Rate {
                millis_per_second: 500,
            }),
            writes_per_second: Some(Rate::per_second(20)),
            burst: None,
        };
        let scope = RateScope::Rule {
            label: Arc::from("acme.toml#2"),
        };
        let limiter = RateLimiter::new(scope, &half, Instant::now());
        let limits: Vec<String> = limiter.limits().map(|l| l.to_string()).collect();
        assert_eq!(
            limits,
            [
                "0.5 requests per second, burst 1",
                "20 writes per second, burst 20"
            ]
        );
        assert_eq!(limiter.scope().to_string(), "rule acme.toml#2");
    }

    #[test]
    fn fractional_rate_refills_after_whole_period() {
        let config = RateConfig {
            requests_per_second: Some(Rate {
                millis_per_second: 250,
            }),
            writes_per_second: None,
            burst: Some(1),
        };
        let scope = RateScope::Vendor {
            name: Arc::from("acme"),
        };
        let limiter = RateLimiter::new(scope, &config, Instant::now());
        let now = limiter.epoch;
        assert_eq!(limiter.take(false, now), Ok(()));
        assert!(limiter
            .take(false, now + Duration::from_millis(3999))
            .is_err());
        assert_eq!(limiter.take(false, now + Duration::from_secs(4)), Ok(()));
    }
}
