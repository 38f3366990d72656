//! Collector delivery in process: the spool on its own, HTTPS delivery to
//! the embedded collector of `sluice collect` on 127.0.0.1 with certificates
//! made by rcgen, a collector restart under load, and the exact bytes of a
//! syslog frame.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use sluice::collect::server::{self, Collector as CollectServer, MAX_REMEMBERED_IDS};
use sluice::collect::spool::{Appended, Spool, SpoolSettings};
use sluice::collect::{syslog, Collectors, SpooledEvent, SPOOL_FULL_KIND};
use sluice::config::{
    CollectorConfig, CollectorEvents, CollectorTarget, CollectorTls, OnFull, Origin,
};
use sluice::events::{Emitter, Event, EventType, Severity};
use sluice::metrics::{ConfiguredNames, Metrics};

/// Bound of every wait for delivery.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(30);

/// A JSON line of exactly 100 bytes with its line end, numbered `n`.
fn line(n: usize) -> Vec<u8> {
    let text = format!("{{\"id\":\"event-{n:04}\",\"pad\":\"");
    let mut bytes = text.into_bytes();
    while bytes.len() < 97 {
        bytes.push(b'x');
    }
    bytes.extend_from_slice(b"\"}");
    assert_eq!(bytes.len(), 99);
    bytes
}

fn spool(folder: &Path, max_bytes: u64, on_full: OnFull) -> Spool {
    Spool::open(SpoolSettings {
        folder: folder.to_path_buf(),
        max_bytes,
        on_full,
    })
    .unwrap()
}

fn batch_ids(spool: &Spool, max: usize) -> Vec<String> {
    spool
        .read_batch(max)
        .unwrap()
        .lines
        .iter()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_slice(line).unwrap();
            value["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn ids(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|n| format!("event-{n:04}")).collect()
}

#[test]
fn spool_resends_unacknowledged_events_after_reopen() {
    let folder = tempfile::tempdir().unwrap();
    {
        let spool = spool(folder.path(), 1 << 20, OnFull::KeepInAudit);
        for n in 0..10 {
            assert_eq!(spool.append(&line(n)).unwrap(), Appended::Spooled);
        }
        spool.sync().unwrap();
        let batch = spool.read_batch(4).unwrap();
        assert_eq!(batch.lines.len(), 4);
        assert_eq!(spool.acknowledge(&batch).unwrap(), 4);
        assert_eq!(spool.len(), 6);
        // Read but never acknowledged: these must come back.
        assert_eq!(batch_ids(&spool, 3), ids(4..7));
    }

    let reopened = spool(folder.path(), 1 << 20, OnFull::KeepInAudit);
    assert_eq!(reopened.len(), 6);
    assert_eq!(reopened.waiting_bytes(), 600);
    assert_eq!(batch_ids(&reopened, 100), ids(4..10));
}

#[test]
fn spool_cuts_a_torn_last_line_on_reopen() {
    let folder = tempfile::tempdir().unwrap();
    {
        let spool = spool(folder.path(), 1 << 20, OnFull::KeepInAudit);
        for n in 0..3 {
            spool.append(&line(n)).unwrap();
        }
        spool.sync().unwrap();
    }
    let segment = std::fs::read_dir(folder.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
        .unwrap();
    let mut text = std::fs::read(&segment).unwrap();
    text.extend_from_slice(b"{\"id\":\"torn");
    std::fs::write(&segment, &text).unwrap();

    let reopened = spool(folder.path(), 1 << 20, OnFull::KeepInAudit);
    assert_eq!(reopened.len(), 3);
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), 300);
    reopened.append(&line(3)).unwrap();
    assert_eq!(batch_ids(&reopened, 100), ids(0..4));
}

#[test]
fn spool_across_segments_removes_acknowledged_files() {
    let folder = tempfile::tempdir().unwrap();
    // A 64 KiB spool rolls segments at 16 KiB, every 164 lines of 100 bytes.
    let spool = spool(folder.path(), 64 * 1024, OnFull::KeepInAudit);
    for n in 0..600 {
        assert_eq!(spool.append(&line(n)).unwrap(), Appended::Spooled);
    }
    let segments = |dir: &Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|entry| {
                entry
                    .as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|ext| ext == "jsonl")
            })
            .count()
    };
    assert_eq!(segments(folder.path()), 4);
    let mut delivered = Vec::new();
    while !spool.is_empty() {
        let batch = spool.read_batch(500).unwrap();
        delivered.extend(batch.lines.iter().map(|line| line[7..17].to_vec()));
        spool.acknowledge(&batch).unwrap();
    }
    let expected: Vec<Vec<u8>> = (0..600)
        .map(|n| format!("event-{n:04}").into_bytes())
        .collect();
    assert_eq!(delivered, expected);
    assert_eq!(segments(folder.path()), 1);
}

#[test]
fn full_spool_keep_in_audit_rejects_new_events() {
    let folder = tempfile::tempdir().unwrap();
    let spool = spool(folder.path(), 1000, OnFull::KeepInAudit);
    let results: Vec<Appended> = (0..15).map(|n| spool.append(&line(n)).unwrap()).collect();
    assert_eq!(results[..10], [Appended::Spooled; 10]);
    assert_eq!(results[10..], [Appended::Rejected; 5]);
    let dropped: u64 = results.iter().map(|r| r.dropped()).sum();
    assert_eq!(dropped, 5);
    assert_eq!(spool.len(), 10);
    assert_eq!(batch_ids(&spool, 100), ids(0..10));
}

#[test]
fn full_spool_drop_oldest_keeps_newest_events() {
    let folder = tempfile::tempdir().unwrap();
    let spool = spool(folder.path(), 1000, OnFull::DropOldest);
    let results: Vec<Appended> = (0..15).map(|n| spool.append(&line(n)).unwrap()).collect();
    assert_eq!(results[..10], [Appended::Spooled; 10]);
    assert_eq!(results[10..], [Appended::SpooledAfterDropping(1); 5]);
    let dropped: u64 = results.iter().map(|r| r.dropped()).sum();
    assert_eq!(dropped, 5);
    assert_eq!(spool.len(), 10);
    assert_eq!(batch_ids(&spool, 100), ids(5..15));
}

#[test]
fn acknowledging_dropped_events_counts_only_the_rest() {
    let folder = tempfile::tempdir().unwrap();
    let spool = spool(folder.path(), 1000, OnFull::DropOldest);
    for n in 0..10 {
        spool.append(&line(n)).unwrap();
    }
    let in_flight = spool.read_batch(4).unwrap();
    // While the batch is out, three new events push out events 0 to 2.
    for n in 10..13 {
        spool.append(&line(n)).unwrap();
    }
    assert_eq!(spool.acknowledge(&in_flight).unwrap(), 1);
    assert_eq!(batch_ids(&spool, 100), ids(4..13));
}

/// A CA and a server certificate for 127.0.0.1, as PEM files in `folder`.
struct Certificates {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn certificates(folder: &Path) -> Certificates {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sluice test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let server_params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

    let paths = Certificates {
        ca: folder.join("ca.crt"),
        cert: folder.join("server.crt"),
        key: folder.join("server.key"),
    };
    std::fs::write(&paths.ca, ca_cert.pem()).unwrap();
    std::fs::write(&paths.cert, server_cert.pem()).unwrap();
    std::fs::write(&paths.key, server_key.serialize_pem()).unwrap();
    paths
}

/// A running embedded collector.
struct RunningServer {
    address: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningServer {
    async fn start(bind: SocketAddr, certs: &Certificates, out: &Path) -> RunningServer {
        let tls = sluice::collect::tls::server_config(&certs.cert, &certs.key, None).unwrap();
        let collector = CollectServer::open(out, MAX_REMEMBERED_IDS).unwrap();
        let listener = TcpListener::bind(bind).await.unwrap();
        let address = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server::serve(listener, tls, collector, stop.clone()));
        RunningServer {
            address,
            stop,
            task,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

fn collector_config(
    folder: &Path,
    address: SocketAddr,
    certs: &Certificates,
    events: CollectorEvents,
) -> CollectorConfig {
    CollectorConfig {
        name: "soc".into(),
        target: CollectorTarget::Https {
            url: format!("https://{address}/events"),
            host: address.ip().to_string(),
            port: address.port(),
            path: "/events".into(),
        },
        events,
        spool: folder.join("spool"),
        spool_max_bytes: 16 << 20,
        on_full: OnFull::KeepInAudit,
        tls: CollectorTls {
            ca: Some(certs.ca.clone()),
            cert: None,
            key: None,
        },
        batch_max: 50,
        timeout: Duration::from_secs(5),
        origin: Origin::unknown(),
    }
}

/// Stamps `count` events through an emitter, as the writer would see them.
async fn stamped_events(
    emitter: &Emitter,
    receiver: &mut tokio::sync::mpsc::Receiver<Event>,
    count: usize,
    make: impl Fn(usize) -> Event,
) -> Vec<Event> {
    let mut events = Vec::with_capacity(count);
    for n in 0..count {
        emitter.emit(make(n)).await.unwrap();
        events.push(receiver.recv().await.unwrap());
    }
    events
}

fn stored_ids(out: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    text.lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            value["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Waits until `out` holds `expected` ids, or the deadline passes.
async fn wait_for_ids(out: &Path, expected: usize) -> Vec<String> {
    let deadline = Instant::now() + DELIVERY_DEADLINE;
    loop {
        let ids = stored_ids(out);
        if ids.len() >= expected || Instant::now() > deadline {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_delivers_anomalies_and_seals_only() {
    let folder = tempfile::tempdir().unwrap();
    let certs = certificates(folder.path());
    let out = folder.path().join("events.jsonl");
    let server = RunningServer::start("127.0.0.1:0".parse().unwrap(), &certs, &out).await;

    let config = collector_config(
        folder.path(),
        server.address,
        &certs,
        CollectorEvents::Anomalies,
    );
    let collectors = Collectors::open(&[config]).unwrap();
    let metrics = Metrics::new("test");
    let instruments = metrics.configure(ConfiguredNames {
        collectors: vec![Arc::from("soc")],
        ..Default::default()
    });
    let (emitter, mut receiver) = Emitter::new(Arc::from("edge-01"));
    let stop = CancellationToken::new();
    let tasks = collectors.start(&emitter, &instruments, &stop).unwrap();

    let events = stamped_events(&emitter, &mut receiver, 90, |n| match n % 3 {
        0 => Event::anomaly("unknown_client", Severity::Medium, format!("client {n}")),
        1 => Event::new(EventType::Seal),
        _ => Event::new(EventType::Decision),
    })
    .await;
    for event in &events {
        collectors.observe(event);
    }
    let expected: Vec<String> = events
        .iter()
        .filter(|event| event.event_type != EventType::Decision)
        .map(|event| event.id.clone())
        .collect();
    assert_eq!(expected.len(), 60);

    let stored = wait_for_ids(&out, 60).await;
    assert_eq!(stored, expected);
    // The counter follows the acknowledgement that empties the spool.
    let delivered = r#"sluice_collector_delivered_total{collector="soc"} 60"#;
    let deadline = Instant::now() + DELIVERY_DEADLINE;
    while !metrics.encode().contains(delivered) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let text = metrics.encode();
    assert!(text.contains(delivered), "{text}");
    assert!(
        text.contains(r#"sluice_collector_spool_events{collector="soc"} 0"#),
        "{text}"
    );
    assert_eq!(collectors.get(0).unwrap().spool().len(), 0);

    stop.cancel();
    tasks.join().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_restart_under_load_loses_no_event() {
    let folder = tempfile::tempdir().unwrap();
    let certs = certificates(folder.path());
    let out = folder.path().join("events.jsonl");
    let server = RunningServer::start("127.0.0.1:0".parse().unwrap(), &certs, &out).await;
    let address = server.address;

    let config = collector_config(folder.path(), address, &certs, CollectorEvents::All);
    let collectors = Collectors::open(&[config]).unwrap();
    let metrics = Metrics::new("test");
    let instruments = metrics.configure(ConfiguredNames {
        collectors: vec![Arc::from("soc")],
        ..Default::default()
    });
    let (emitter, mut receiver) = Emitter::new(Arc::from("edge-01"));
    let stop = CancellationToken::new();
    let tasks = collectors.start(&emitter, &instruments, &stop).unwrap();

    let events = stamped_events(&emitter, &mut receiver, 3000, |_| {
        Event::new(EventType::Decision)
    })
    .await;
    let produced: BTreeSet<String> = events.iter().map(|event| event.id.clone()).collect();
    assert_eq!(produced.len(), 3000);

    // Load runs in three parts: while the collector is up, while it is
    // down, and after it is back on the same port.
    let mut chunks = events.chunks(1000);
    for event in chunks.next().unwrap() {
        collectors.observe(event);
        if event.id.ends_with('0') {
            tokio::task::yield_now().await;
        }
    }
    server.stop().await;
    for event in chunks.next().unwrap() {
        collectors.observe(event);
    }
    let server = RunningServer::start(address, &certs, &out).await;
    for event in chunks.next().unwrap() {
        collectors.observe(event);
    }

    let stored = wait_for_ids(&out, 3000).await;
    let stored: BTreeSet<String> = stored.into_iter().collect();
    let missing: Vec<&String> = produced.difference(&stored).collect();
    assert!(
        missing.is_empty(),
        "{} events missing, first {:?}",
        missing.len(),
        missing.first()
    );
    assert_eq!(stored, produced);

    stop.cancel();
    tasks.join().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_raises_one_anomaly_per_episode() {
    let folder = tempfile::tempdir().unwrap();
    let certs = certificates(folder.path());
    // Nothing listens on this port once the listener is dropped, so every
    // delivery fails and the spool fills.
    let address = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = collector_config(folder.path(), address, &certs, CollectorEvents::All);
    config.spool_max_bytes = 64 * 1024;
    let collectors = Collectors::open(&[config]).unwrap();
    let metrics = Metrics::new("test");
    let instruments = metrics.configure(ConfiguredNames {
        collectors: vec![Arc::from("soc")],
        ..Default::default()
    });
    let (emitter, mut receiver) = Emitter::new(Arc::from("edge-01"));
    let stop = CancellationToken::new();
    let tasks = collectors.start(&emitter, &instruments, &stop).unwrap();

    let mut events = Vec::new();
    let mut anomalies = Vec::new();
    for _ in 0..2000 {
        emitter.emit(Event::new(EventType::Decision)).await.unwrap();
        // The anomaly comes through the same queue, between decisions.
        let event = loop {
            let event = receiver.recv().await.unwrap();
            if event.event_type == EventType::Anomaly {
                anomalies.push(event);
            } else {
                break event;
            }
        };
        collectors.observe(&event);
        events.push(event);
    }
    if anomalies.is_empty() {
        let anomaly = tokio::time::timeout(DELIVERY_DEADLINE, receiver.recv())
            .await
            .unwrap()
            .unwrap();
        anomalies.push(anomaly);
    }
    // Still the same episode: no second anomaly.
    assert!(receiver.try_recv().is_err());
    assert_eq!(anomalies.len(), 1);
    let anomaly = &anomalies[0];
    assert_eq!(anomaly.event_type, EventType::Anomaly);
    assert_eq!(anomaly.anomaly.as_ref().unwrap().kind, SPOOL_FULL_KIND);
    assert_eq!(anomaly.anomaly.as_ref().unwrap().severity, Severity::High);
    assert_eq!(
        anomaly.detail.as_ref().unwrap()["on_full"],
        serde_json::json!("keep_in_audit")
    );

    // keep_in_audit keeps the oldest events that fit in 64 KiB.
    let mut total = 0;
    let fitting = events
        .iter()
        .take_while(|event| {
            total += serde_json::to_vec(event).unwrap().len() + 1;
            total <= 64 * 1024
        })
        .count();
    let spool = collectors.get(0).unwrap().spool();
    assert_eq!(spool.len(), fitting);
    let text = metrics.encode();
    let dropped = format!(
        r#"sluice_collector_dropped_total{{collector="soc"}} {}"#,
        2000 - fitting
    );
    assert!(text.contains(&dropped), "{dropped} not in {text}");

    stop.cancel();
    tasks.join().await;
}

#[test]
fn syslog_frame_bytes_for_a_denied_request() {
    let json = br#"{"id":"a-1","timestamp":"2026-12-10T08:30:00.000123Z","gateway":"edge-01","event_type":"decision","decision":"deny","reason":"function 90 not allowed"}"#;
    let event = SpooledEvent {
        json: json.to_vec(),
        value: serde_json::from_slice(json).unwrap(),
    };
    let message = format!(
        "<133>1 2026-12-10T08:30:00.000123Z edge-01 sluice - decision - {}",
        std::str::from_utf8(json).unwrap()
    );
    let expected = format!("{} {message}", message.len());
    assert_eq!(message.len(), 214);
    assert_eq!(String::from_utf8(syslog::frame(&event)).unwrap(), expected);
}

#[test]
fn syslog_severity_follows_the_event() {
    let cases = [
        (r#"{"anomaly":{"severity":"critical"}}"#, 2),
        (r#"{"anomaly":{"severity":"high"}}"#, 3),
        (r#"{"anomaly":{"severity":"medium"}}"#, 4),
        (r#"{"anomaly":{"severity":"low"}}"#, 5),
        (r#"{"decision":"deny"}"#, 5),
        (r#"{"decision":"allow"}"#, 6),
        (r#"{"event_type":"seal"}"#, 6),
    ];
    for (json, expected) in cases {
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(syslog::severity(&value), expected, "{json}");
    }
}

#[test]
fn collect_server_rejects_bodies_that_are_not_event_arrays() {
    assert_eq!(
        server::parse_events(b"{\"id\":\"a\"}"),
        Err("the body is not a JSON array".to_owned())
    );
    assert_eq!(
        server::parse_events(b"[{\"id\":\"a\"},{\"x\":1}]"),
        Err("event 1 has no string \"id\"".to_owned())
    );
    assert!(server::parse_events(b"[{\"id\":")
        .unwrap_err()
        .starts_with("invalid JSON"));
    assert_eq!(server::parse_events(b"[]").unwrap().len(), 0);
}
