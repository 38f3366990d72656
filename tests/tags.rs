//! Tags end to end against the simulated PLC. A gateway configuration with
//! `[[tag]]` sections is loaded and compiled, and the mirror pollers read the
//! PLC. Typed tags are then read from the mirror, and a tag write becomes a
//! Modbus request that the vendor's rules decide and the device's pool sends.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use sluice::audit::AuditHealth;
use sluice::daemon::build_generation;
use sluice::events::Emitter;
use sluice::metrics::Metrics;
use sluice::modbus::access::access_of;
use sluice::modbus::generation::Shared;
use sluice::modbus::pdu::Request;
use sluice::modbus::sim::SimPlc;
use sluice::policy::quarantine::Quarantine;
use sluice::policy::{Context, Decision, Policy};
use sluice::state::Pollers;
use sluice::tags::{Quality, TagReading, TagValue};
use tokio::net::TcpListener;

/// Upper bound on every wait of these tests.
const BOUND: Duration = Duration::from_secs(10);

const RULES: &str = r#"[vendor]
name = "acme"
sources = ["127.0.0.0/8"]

[[allow]]
device = "press-1"
functions = ["write_multiple_registers"]
addresses = "100-101"
"#;

fn gateway(plc: std::net::SocketAddr, audit: &Path) -> String {
    format!(
        r#"[gateway]
name = "edge-01"

[audit]
path = "{audit}"

[[device]]
name = "press-1"
address = "{plc}"
unit = 3
mirror = [
  {{ kind = "holding_register", start = 100, count = 10, poll_ms = 20 }},
  {{ kind = "coil", start = 0, count = 8, poll_ms = 20 }},
]

[[tag]]
device = "press-1"
name = "Press1.Temperature"
kind = "holding_register"
address = 100
type = "float32"
order = "CDAB"
unit = "°C"
access = "read_write"

[[tag]]
device = "press-1"
name = "Press1.Pressure"
kind = "holding_register"
address = 102
type = "int16"
scale = 0.1

[[tag]]
device = "press-1"
name = "Press1.Running"
kind = "coil"
address = 3
type = "bool"
"#,
        audit = audit.display()
    )
}

/// Loads and compiles the gateway for the PLC at `plc`.
fn policy(dir: &Path, plc: std::net::SocketAddr) -> Policy {
    std::fs::write(dir.join("gateway.toml"), gateway(plc, &dir.join("audit"))).unwrap();
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::create_dir_all(dir.join("audit")).unwrap();
    std::fs::write(dir.join("rules/acme.toml"), RULES).unwrap();
    let (config, warnings) = sluice::config::load(&dir.join("gateway.toml")).unwrap();
    let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert!(warnings.is_empty(), "{warnings:?}");
    Policy::compile(&config).unwrap().0
}

/// Reads tag `name` until `done` accepts the reading or the bound passes.
async fn read_until(shared: &Shared, name: &str, done: impl Fn(&TagReading) -> bool) -> TagReading {
    let deadline = Instant::now() + BOUND;
    loop {
        let generation = shared.current.load();
        let id = generation.tags.find(name).unwrap();
        let reading = generation
            .tags
            .read(id, &generation.mirror, Instant::now())
            .unwrap();
        if done(&reading) || Instant::now() > deadline {
            return reading;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn tags_read_and_write_through_the_mirror() {
    let plc = SimPlc::new();
    // 21.5 is 0x41AC0000; CDAB puts the low register first.
    plc.set_holding(100, 0x0000);
    plc.set_holding(101, 0x41AC);
    plc.set_holding(102, 0xFF38); // -200
    plc.set_coil(3, true);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plc_address = listener.local_addr().unwrap();
    let server = tokio::spawn(plc.clone().serve(listener));

    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path(), plc_address);
    let (emitter, _events) = Emitter::new(Arc::from("edge-01"));
    let metrics = Metrics::new("test");
    let generation = build_generation(policy, None, &emitter, &metrics);
    let shared = Shared {
        current: ArcSwap::from_pointee(generation),
        emitter,
        sessions: Default::default(),
        metrics,
        audit: Arc::new(AuditHealth::new()),
        quarantine: Arc::new(Quarantine::load(&dir.path().join("audit")).unwrap()),
        detect: sluice::detect::Hub::new(),
        opcua_trust: Default::default(),
        session_threads: Default::default(),
    };
    let shared = Arc::new(shared);
    let mut pollers = Pollers::start(&shared);

    let good = |reading: &TagReading| reading.quality == Quality::Good;
    let temperature = read_until(&shared, "Press1.Temperature", good).await;
    assert_eq!(temperature.quality, Quality::Good);
    assert_eq!(temperature.value, Some(TagValue::Float32(21.5)));
    assert!(temperature.source_time.is_some());
    let pressure = read_until(&shared, "Press1.Pressure", good).await;
    assert_eq!(pressure.quality, Quality::Good);
    let Some(TagValue::Float64(bar)) = pressure.value else {
        panic!("a scaled int16 reads as float64, got {:?}", pressure.value);
    };
    assert!((bar + 20.0).abs() < 1e-9, "{bar}");
    let running = read_until(&shared, "Press1.Running", good).await;
    assert_eq!(running.value, Some(TagValue::Bool(true)));

    // The write becomes FC 16 to unit 3, decided by acme's rule.
    let generation = shared.current.load_full();
    let id = generation.tags.find("Press1.Temperature").unwrap();
    let write = generation
        .tags
        .write(id, &TagValue::Float32(123.456))
        .unwrap()
        .unwrap();
    assert_eq!(write.unit_id, 3);
    assert_eq!(
        write.request,
        Request::WriteMultipleRegisters {
            address: 100,
            quantity: 2,
            values: bytes::Bytes::from_static(&[0xE9, 0x79, 0x42, 0xF6]),
        }
    );
    let vendor = generation.policy.vendor_id("acme").unwrap();
    let context = Context {
        source: IpAddr::V4(Ipv4Addr::LOCALHOST),
        role: None,
        now: jiff::Timestamp::now(),
        instant: Instant::now(),
        states: &generation.states,
    };
    let access = access_of(write.unit_id, &write.request);
    let decision = generation
        .policy
        .decide(vendor, write.device, &access, &context);
    assert!(matches!(decision, Decision::Allow { .. }), "{decision:?}");
    let response = tokio::time::timeout(
        BOUND,
        generation
            .pool(write.device)
            .call(write.unit_id, &write.request),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.as_ref(), [0x10, 0x00, 0x64, 0x00, 0x02]);
    assert_eq!(plc.holding(100), 0xE979);
    assert_eq!(plc.holding(101), 0x42F6);

    let written = read_until(&shared, "Press1.Temperature", |reading| {
        reading.value == Some(TagValue::Float32(123.456))
    })
    .await;
    assert_eq!(written.value, Some(TagValue::Float32(123.456)));

    pollers.stop().await;
    server.abort();
}
