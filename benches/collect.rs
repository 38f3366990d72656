//! Delivery rate from a collector spool to the embedded collector of
//! `sluice collect`, both in this process on 127.0.0.1 over TLS: events per
//! second from the first append until the collector has fsynced the last
//! one, at the default batch of 500 events.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio_util::sync::CancellationToken;

use sluice::collect::server::{self, Collector as CollectServer, MAX_REMEMBERED_IDS};
use sluice::collect::Collectors;
use sluice::config::{
    CollectorConfig, CollectorEvents, CollectorTarget, CollectorTls, OnFull, Origin,
};
use sluice::events::{DecisionKind, Emitter, Event, EventType};
use sluice::metrics::{ConfiguredNames, Metrics};

/// Events per measured run.
const EVENTS: usize = 20_000;

fn decision() -> Event {
    let mut event = Event::new(EventType::Decision);
    event.listener = Some(Arc::from("scada"));
    event.session_id = Some(42);
    event.vendor = Some(Arc::from("acme"));
    event.src_ip = Some("127.0.0.1".parse().unwrap());
    event.src_port = Some(40_000);
    event.device = Some(Arc::from("press-1"));
    event.decision = Some(DecisionKind::Allow);
    event.rule = Some("acme.toml#1".into());
    event
}

/// Writes a CA and a 127.0.0.1 server certificate; returns (ca, cert, key).
fn certificates(folder: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let paths = (
        folder.join("ca.crt"),
        folder.join("server.crt"),
        folder.join("server.key"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, server_cert.pem()).unwrap();
    std::fs::write(&paths.2, server_key.serialize_pem()).unwrap();
    paths
}

/// Appends `EVENTS` events and waits until the collector's file holds them
/// all; returns the elapsed time.
async fn deliver_once(folder: &Path, run: usize) -> Duration {
    let (ca, cert, key) = certificates(folder);
    let out = folder.join(format!("out-{run}.jsonl"));
    let tls = sluice::collect::tls::server_config(&cert, &key, None).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let collect = CollectServer::open(&out, MAX_REMEMBERED_IDS).unwrap();
    let server_task = tokio::spawn(server::serve(listener, tls, collect, stop.clone()));

    let config = CollectorConfig {
        name: "soc".into(),
        target: CollectorTarget::Https {
            url: format!("https://{address}/events"),
            host: address.ip().to_string(),
            port: address.port(),
            path: "/events".into(),
        },
        events: CollectorEvents::All,
        spool: folder.join(format!("spool-{run}")),
        spool_max_bytes: 256 << 20,
        on_full: OnFull::KeepInAudit,
        tls: CollectorTls {
            ca: Some(ca),
            cert: None,
            key: None,
        },
        batch_max: 500,
        timeout: Duration::from_secs(10),
        origin: Origin::unknown(),
    };
    let collectors = Collectors::open(&[config]).unwrap();
    let instruments = Metrics::new("bench").configure(ConfiguredNames::default());
    let (emitter, mut receiver) = Emitter::new(Arc::from("edge-01"));
    let mut events = Vec::with_capacity(EVENTS);
    for _ in 0..EVENTS {
        emitter.emit(decision()).await.unwrap();
        events.push(receiver.recv().await.unwrap());
    }
    let tasks = collectors.start(&emitter, &instruments, &stop).unwrap();

    let started = Instant::now();
    for event in &events {
        collectors.observe(event);
    }
    let spool = collectors.get(0).unwrap();
    let deadline = started + Duration::from_secs(120);
    while !spool.spool().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    assert!(spool.spool().is_empty(), "delivery did not finish in 120 s");

    stop.cancel();
    tasks.join().await;
    server_task.await.unwrap();
    elapsed
}

fn delivery(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let folder = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("collect");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    let mut run = 0;
    group.bench_function("https_delivery_20000_events", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                run += 1;
                total += runtime.block_on(deliver_once(folder.path(), run));
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, delivery);
criterion_main!(benches);
