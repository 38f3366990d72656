//! The event record shared by the audit log, collectors and `sluice ctl`, the
//! `Emitter` handle that every part uses to record one, and the sinks that
//! store them. Emitting never drops a record: a full queue makes the emitter
//! wait, which slows the session that caused it instead of losing evidence.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::mpsc;

mod json;
mod writer;

pub use writer::{spawn_writer, Observer, Sink, SyncMode, WriterHandle};

/// Capacity of the queue between emitters and the writer thread, in events.
pub const QUEUE_CAPACITY: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Decision,
    Anomaly,
    Session,
    State,
    Config,
    Admin,
    System,
    Seal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl EventType {
    /// Every event type, in declaration order.
    pub const ALL: [EventType; 8] = [
        EventType::Decision,
        EventType::Anomaly,
        EventType::Session,
        EventType::State,
        EventType::Config,
        EventType::Admin,
        EventType::System,
        EventType::Seal,
    ];
}

impl DecisionKind {
    /// Both decisions.
    pub const ALL: [DecisionKind; 2] = [DecisionKind::Allow, DecisionKind::Deny];
}

impl Severity {
    /// Every severity, lowest first.
    pub const ALL: [Severity; 4] = [
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ];
}

/// The Modbus part of an event. Addresses are 0-based PDU addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModbusInfo {
    pub unit: u8,
    pub function: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function_name: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<u16>,
    pub transaction_id: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_function: Option<u16>,
    /// The exception code sent to the client, when one was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exception: Option<u8>,
}

/// The OPC UA part of an event: one operation of a service call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpcuaInfo {
    /// The service as rules name it: `browse`, `read`, `write`, ...
    pub service: &'static str,
    /// The node, as `nsu=URI;s=ID` or `nsu=URI;i=N`; absent when its
    /// namespace is not one of the device's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The OPC UA status code name the client received for the operation.
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Anomaly {
    pub kind: &'static str,
    pub severity: Severity,
    pub detail: String,
}

/// One event. Keys that do not apply are left out of the JSON form.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub id: String,
    #[serde(serialize_with = "serialize_timestamp")]
    pub timestamp: jiff::Timestamp,
    pub gateway: Arc<str>,
    pub event_type: EventType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vendor: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modbus: Option<ModbusInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opcua: Option<OpcuaInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionKind>,
    /// Present and false only for a denial that monitor mode forwarded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enforced: Option<bool>,
    /// `mirror` when the gateway served a read from its mirror of the
    /// device instead of forwarding it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_by: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<Anomaly>,
    /// A short machine-readable action for session, system and state
    /// events, such as `open`, `close` or `start`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
    /// The client certificate of a session on a MODBUS/TCP Security
    /// listener, on its `open` event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Arc<crate::identity::certificate::CertificateIdentity>>,
}

fn serialize_timestamp<S: serde::Serializer>(
    timestamp: &jiff::Timestamp,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&timestamp.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"))
}

impl Event {
    /// Creates an event of `event_type` with every optional key absent; the
    /// emitter fills `id`, `timestamp` and `gateway`.
    pub fn new(event_type: EventType) -> Event {
        Event {
            id: String::new(),
            timestamp: jiff::Timestamp::UNIX_EPOCH,
            gateway: Arc::from(""),
            event_type,
            listener: None,
            session_id: None,
            vendor: None,
            src_ip: None,
            src_port: None,
            device: None,
            modbus: None,
            opcua: None,
            decision: None,
            enforced: None,
            served_by: None,
            rule: None,
            reason: None,
            anomaly: None,
            action: None,
            detail: None,
            tls: None,
        }
    }

    /// Creates an anomaly event.
    pub fn anomaly(kind: &'static str, severity: Severity, detail: impl Into<String>) -> Event {
        let mut event = Event::new(EventType::Anomaly);
        event.anomaly = Some(Anomaly {
            kind,
            severity,
            detail: detail.into(),
        });
        event
    }
}

struct EmitterInner {
    gateway: Arc<str>,
    /// Distinguishes this process's ids from those of earlier runs.
    id_prefix: String,
    next_id: AtomicU64,
    queue: mpsc::Sender<Event>,
}

/// A cloneable handle that stamps events and queues them for the writer.
#[derive(Clone)]
pub struct Emitter {
    inner: Arc<EmitterInner>,
}

/// The writer has stopped, so the event could not be recorded.
#[derive(Debug, thiserror::Error)]
#[error("event writer stopped; event {id} not recorded")]
pub struct WriterStopped {
    pub id: String,
}

impl Emitter {
    /// Creates an emitter and the receiving end that a writer drains.
    pub fn new(gateway: Arc<str>) -> (Emitter, mpsc::Receiver<Event>) {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let started = jiff::Timestamp::now().as_nanosecond();
        let inner = EmitterInner {
            gateway,
            id_prefix: format!("{:016x}-{:08x}", started, std::process::id()),
            next_id: AtomicU64::new(1),
            queue,
        };
        let emitter = Emitter {
            inner: Arc::new(inner),
        };
        (emitter, receiver)
    }

    /// Returns how many events wait in the queue for the writer.
    pub fn queue_depth(&self) -> usize {
        QUEUE_CAPACITY - self.inner.queue.capacity()
    }

    pub fn gateway(&self) -> &Arc<str> {
        &self.inner.gateway
    }

    fn stamp(&self, event: &mut Event) {
        let sequence = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        event.id = event_id(&self.inner.id_prefix, sequence);
        event.timestamp = jiff::Timestamp::now();
        event.gateway = self.inner.gateway.clone();
    }

    /// Records `event`, waiting while the queue is full.
    pub async fn emit(&self, mut event: Event) -> Result<(), WriterStopped> {
        self.stamp(&mut event);
        self.inner
            .queue
            .send(event)
            .await
            .map_err(|failed| WriterStopped { id: failed.0.id })
    }

    /// Records `event` from code that cannot wait, such as a destructor.
    /// Blocks the calling thread while the queue is full, so it must not be
    /// called on an async worker thread in the request path.
    pub fn emit_blocking(&self, mut event: Event) -> Result<(), WriterStopped> {
        self.stamp(&mut event);
        self.inner
            .queue
            .blocking_send(event)
            .map_err(|failed| WriterStopped { id: failed.0.id })
    }
}

/// Returns `prefix-SEQUENCE` with the sequence in lower-case hex. Every
/// event gets one, so this skips the formatting machinery of `format!`.
fn event_id(prefix: &str, sequence: u64) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0u8; 16];
    let mut start = hex.len();
    let mut rest = sequence;
    loop {
        start -= 1;
        hex[start] = DIGITS[(rest & 0xF) as usize];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    let mut id = String::with_capacity(prefix.len() + 1 + hex.len() - start);
    id.push_str(prefix);
    id.push('-');
    for &digit in &hex[start..] {
        id.push(char::from(digit));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_json_leaves_out_absent_keys() {
        let mut event = Event::new(EventType::Session);
        event.id = "a-1".into();
        event.gateway = Arc::from("edge-01");
        event.timestamp = "2026-12-10T08:30:00.000123Z".parse().unwrap();
        event.action = Some("open");
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(
            json,
            r#"{"id":"a-1","timestamp":"2026-12-10T08:30:00.000123Z","gateway":"edge-01","event_type":"session","action":"open"}"#
        );
    }

    #[test]
    fn timestamp_keeps_six_fraction_digits() {
        let mut event = Event::new(EventType::System);
        event.timestamp = "2026-12-10T08:30:00Z".parse().unwrap();
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["timestamp"], "2026-12-10T08:30:00.000000Z");
    }

    #[test]
    fn event_id_hex_sequence() {
        assert_eq!(event_id("p", 0), "p-0");
        assert_eq!(event_id("p", 1), "p-1");
        assert_eq!(event_id("p", 0xf), "p-f");
        assert_eq!(event_id("p", 0x10), "p-10");
        assert_eq!(event_id("abc-12", 0x1234_abcd), "abc-12-1234abcd");
        assert_eq!(event_id("p", u64::MAX), "p-ffffffffffffffff");
    }

    #[tokio::test]
    async fn emitter_assigns_distinct_ids() {
        let (emitter, mut receiver) = Emitter::new(Arc::from("edge-01"));
        emitter.emit(Event::new(EventType::System)).await.unwrap();
        emitter.emit(Event::new(EventType::System)).await.unwrap();
        let first = receiver.recv().await.unwrap();
        let second = receiver.recv().await.unwrap();
        assert_ne!(first.id, second.id);
        assert_eq!(&*first.gateway, "edge-01");
        assert!(first.id.ends_with("-1"), "id {}", first.id);
        assert!(second.id.ends_with("-2"), "id {}", second.id);
    }
}
