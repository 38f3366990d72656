//! Criterion benchmarks of the metric updates on the request path: counting
//! a request through `Instruments` (with and without a duration), an
//! upstream counter, and, for comparison, the locked
//! `Family::get_or_create` lookup that `Instruments` avoids. The
//! configuration has 4 listeners, 20 vendors and 50 devices.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sluice::metrics::{ConfiguredNames, Metrics};

fn names(prefix: &str, count: usize) -> Vec<Arc<str>> {
    (0..count)
        .map(|index| format!("{prefix}-{index}").into())
        .collect()
}

fn record_request(criterion: &mut Criterion) {
    let metrics = Metrics::new("bench");
    let instruments = metrics.configure(ConfiguredNames {
        listeners: names("listener", 4),
        vendors: names("vendor", 20),
        devices: names("device", 50),
        states: names("state", 10),
        collectors: names("collector", 1),
    });
    // Resolve the handles once, as the first request of a session does.
    instruments.record_request(1, 7, 30, 0x03, true, None);
    let upstream = instruments.upstream(30);

    criterion.bench_function("record_request", |bench| {
        bench.iter(|| {
            instruments.record_request(
                black_box(1),
                black_box(7),
                black_box(30),
                black_box(0x03),
                black_box(true),
                None,
            )
        })
    });
    criterion.bench_function("record_request_with_duration", |bench| {
        bench.iter(|| {
            instruments.record_request(
                black_box(1),
                black_box(7),
                black_box(30),
                black_box(0x03),
                black_box(true),
                Some(black_box(Duration::from_micros(1800))),
            )
        })
    });
    criterion.bench_function("upstream_count_timeout", |bench| {
        bench.iter(|| black_box(&upstream).count_timeout())
    });
}

fn family_lookup(criterion: &mut Criterion) {
    let family = Family::<Vec<(&'static str, Arc<str>)>, Counter>::default();
    let labels: Vec<(&'static str, Arc<str>)> = vec![
        ("listener", "listener-1".into()),
        ("vendor", "vendor-7".into()),
        ("device", "device-30".into()),
        ("function", "read_holding_registers".into()),
        ("decision", "allow".into()),
    ];
    family.get_or_create(&labels).inc();

    criterion.bench_function("family_get_or_create_for_comparison", |bench| {
        bench.iter(|| {
            family.get_or_create(black_box(&labels)).inc();
        })
    });
}

criterion_group!(benches, record_request, family_lookup);
criterion_main!(benches);
