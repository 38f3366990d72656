//! A lock-free histogram of request durations with fixed buckets sized for
//! PLC round trips. prometheus-client's own histogram takes a mutex on every
//! observation, which the request path avoids.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Upper bounds of the buckets in nanoseconds, from 0.5 ms (a PLC on the same
/// switch) to 5 s (beyond any sensible device timeout).
const BOUNDS_NANOS: [u64; 13] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];

const NANOS_PER_SECOND: f64 = 1e9;

/// A histogram of durations. Clones share the same buckets.
#[derive(Clone, Debug, Default)]
pub(crate) struct DurationHistogram {
    inner: Arc<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    /// Observations per bucket, not cumulative; the last one is `+Inf`.
    counts: [AtomicU64; BOUNDS_NANOS.len() + 1],
    /// Sum of all observations in nanoseconds. It wraps after about 584 years
    /// of summed durations.
    sum_nanos: AtomicU64,
}

impl DurationHistogram {
    /// Adds one observation.
    pub fn observe(&self, duration: Duration) {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_NANOS.partition_point(|bound| *bound < nanos);
        self.inner.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.inner.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = Vec::with_capacity(self.inner.counts.len());
        for (index, count) in self.inner.counts.iter().enumerate() {
            let bound = BOUNDS_NANOS
                .get(index)
                .map_or(f64::INFINITY, |nanos| *nanos as f64 / NANOS_PER_SECOND);
            buckets.push((bound, count.load(Ordering::Relaxed)));
        }

        // The count is derived from the buckets read above, so `_count`
        // always equals the `+Inf` bucket even while observations race.
        let count = buckets.iter().map(|(_, count)| count).sum();
        let sum = self.inner.sum_nanos.load(Ordering::Relaxed) as f64 / NANOS_PER_SECOND;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(histogram: &DurationHistogram) -> Vec<u64> {
        histogram
            .inner
            .counts
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect()
    }

    #[test]
    fn bucket_bound_is_inclusive() {
        let histogram = DurationHistogram::default();
        histogram.observe(Duration::from_micros(500));
        histogram.observe(Duration::from_nanos(500_001));
        let counts = counts(&histogram);
        assert_eq!(counts[0], 1);
        assert_eq!(counts[1], 1);
    }

    #[test]
    fn duration_beyond_last_bound_lands_in_infinity_bucket() {
        let histogram = DurationHistogram::default();
        histogram.observe(Duration::from_secs(6));
        histogram.observe(Duration::MAX);
        assert_eq!(counts(&histogram)[BOUNDS_NANOS.len()], 2);
    }

    #[test]
    fn zero_duration_lands_in_first_bucket() {
        let histogram = DurationHistogram::default();
        histogram.observe(Duration::ZERO);
        assert_eq!(counts(&histogram)[0], 1);
    }
}
