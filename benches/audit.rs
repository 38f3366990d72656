//! Audit log throughput in records per second through the `Sink` interface,
//! sealing every 1000 records. Batch mode writes and fsyncs each batch of
//! 1024, as the event writer does. A second case leaves out the fsync to show
//! the CPU cost alone.
//!
//! `event_json` times the serialization of one typical decision event, as
//! the writer thread does it for every record: through the serde derive and
//! through the hand-written `Event::write_json`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use sluice::audit::{init_key, AuditHealth, AuditLog, AuditSettings};
use sluice::events::{DecisionKind, Event, EventType, ModbusInfo, Sink};

/// The event writer's largest batch.
const BATCH: usize = 1024;

fn decision(n: usize) -> Event {
    let mut event = Event::new(EventType::Decision);
    event.id = format!("0000018f2b3c4d5e-00001234-{n:x}");
    event.timestamp = jiff::Timestamp::now();
    event.gateway = Arc::from("edge-01");
    event.listener = Some(Arc::from("scada"));
    event.session_id = Some(42);
    event.vendor = Some(Arc::from("acme"));
    event.src_ip = Some("127.0.0.1".parse().unwrap());
    event.src_port = Some(40_000);
    event.device = Some(Arc::from("press-1"));
    event.decision = Some(DecisionKind::Allow);
    event.rule = Some("rules/acme.toml#1".into());
    event
}

fn sealed_batches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    init_key(dir.path(), false).unwrap();
    let mut settings = AuditSettings::new(dir.path().to_path_buf(), Arc::from("edge-01"));
    settings.retention_days = 0;
    let (mut log, _) = AuditLog::open(settings, Arc::new(AuditHealth::new())).unwrap();
    let batch: Vec<Event> = (0..BATCH).map(decision).collect();

    let mut group = c.benchmark_group("audit");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("sealed_batch_1024_with_fsync", |b| {
        b.iter(|| {
            log.write_batch(&batch).unwrap();
            log.sync().unwrap();
        })
    });
    // Without fsync: the cost of serializing, hashing, sealing and writing.
    group.bench_function("sealed_batch_1024_without_fsync", |b| {
        b.iter(|| log.write_batch(&batch).unwrap())
    });
    group.finish();
}

/// Returns a decision event as a Modbus session records it: a read of ten
/// holding registers, allowed by a rule.
fn typical_decision() -> Event {
    let mut event = decision(0x2a);
    event.modbus = Some(ModbusInfo {
        unit: 1,
        function: 3,
        function_name: Some("read_holding_registers"),
        address: Some(100),
        quantity: Some(10),
        transaction_id: 7,
        sub_function: None,
        exception: None,
    });
    event
}

fn event_json(c: &mut Criterion) {
    let event = typical_decision();
    let mut out = Vec::with_capacity(1024);

    let mut group = c.benchmark_group("event_json");
    group.throughput(Throughput::Elements(1));
    group.bench_function("serde_derive", |b| {
        b.iter(|| {
            out.clear();
            serde_json::to_writer(&mut out, std::hint::black_box(&event)).unwrap();
        })
    });
    group.bench_function("write_json", |b| {
        b.iter(|| {
            out.clear();
            std::hint::black_box(&event).write_json(&mut out).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, sealed_batches, event_json);
criterion_main!(benches);
