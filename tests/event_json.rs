//! Property test of the hand-written event JSON writer: for arbitrary events,
//! `Event::write_json` writes the same bytes as serde_json on the derived
//! `Serialize` impl, which is the form the audit log and collectors promise.

use std::net::IpAddr;
use std::sync::Arc;

use proptest::prelude::*;
use sluice::events::{Anomaly, DecisionKind, Event, EventType, ModbusInfo, OpcuaInfo, Severity};
use sluice::identity::certificate::CertificateIdentity;

/// Characters that JSON escaping treats specially, or that must pass through
/// unchanged although they look special: DEL, non-ASCII, the line and
/// paragraph separators, and a character outside the Basic Multilingual Plane.
const SPECIAL_CHARS: &[char] = &[
    '"', '\\', '/', '\u{7f}', '\u{80}', 'é', '\u{2028}', '\u{2029}', '\u{feff}', '😀',
];

/// Strings mixing control characters, special characters and arbitrary
/// Unicode, because `any::<String>()` leaves out control characters.
fn text() -> impl Strategy<Value = String> {
    let character = prop_oneof![
        3 => proptest::char::range('\0', '\u{7f}'),
        1 => proptest::sample::select(SPECIAL_CHARS),
        1 => any::<char>(),
    ];
    proptest::collection::vec(character, 0..24).prop_map(String::from_iter)
}

/// Generates strings for the `&'static str` members, which are constants in
/// the gateway, by leaking them. The leak is bounded by the case count.
fn static_text() -> impl Strategy<Value = &'static str> {
    text().prop_map(|text| &*Box::leak(text.into_boxed_str()))
}

fn shared_text() -> impl Strategy<Value = Arc<str>> {
    text().prop_map(Arc::from)
}

/// Timestamps over jiff's whole range, and more often near the present,
/// with nanosecond fractions.
fn timestamp() -> impl Strategy<Value = jiff::Timestamp> {
    let min = jiff::Timestamp::MIN.as_nanosecond();
    let max = jiff::Timestamp::MAX.as_nanosecond();
    let recent = 0i128..4_102_444_800_000_000_000;
    prop_oneof![min..=max, recent]
        .prop_map(|nanoseconds| jiff::Timestamp::from_nanosecond(nanoseconds).unwrap())
}

fn event_type() -> impl Strategy<Value = EventType> {
    proptest::sample::select(EventType::ALL.to_vec())
}

fn severity() -> impl Strategy<Value = Severity> {
    proptest::sample::select(Severity::ALL.to_vec())
}

fn decision() -> impl Strategy<Value = DecisionKind> {
    proptest::sample::select(DecisionKind::ALL.to_vec())
}

fn modbus() -> impl Strategy<Value = ModbusInfo> {
    (
        any::<u8>(),
        any::<u8>(),
        proptest::option::of(static_text()),
        any::<Option<u16>>(),
        any::<Option<u16>>(),
        any::<u16>(),
        any::<Option<u16>>(),
        any::<Option<u8>>(),
    )
        .prop_map(
            |(
                unit,
                function,
                function_name,
                address,
                quantity,
                transaction_id,
                sub_function,
                exception,
            )| {
                ModbusInfo {
                    unit,
                    function,
                    function_name,
                    address,
                    quantity,
                    transaction_id,
                    sub_function,
                    exception,
                }
            },
        )
}

fn opcua() -> impl Strategy<Value = OpcuaInfo> {
    (static_text(), proptest::option::of(text()), text()).prop_map(|(service, node_id, status)| {
        OpcuaInfo {
            service,
            node_id,
            status,
        }
    })
}

fn anomaly() -> impl Strategy<Value = Anomaly> {
    (static_text(), severity(), text()).prop_map(|(kind, severity, detail)| Anomaly {
        kind,
        severity,
        detail,
    })
}

/// JSON values up to three levels deep, with every scalar kind.
fn detail() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        text().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(text(), inner, 0..4)
                .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
        ]
    })
}

fn certificate() -> impl Strategy<Value = CertificateIdentity> {
    (
        proptest::option::of(text()),
        proptest::collection::vec(text(), 0..3),
        proptest::collection::vec(any::<IpAddr>(), 0..3),
        proptest::collection::vec(text(), 0..3),
        text(),
        proptest::option::of(text()),
        any::<i64>(),
    )
        .prop_map(
            |(subject_cn, dns_names, ip_addresses, uris, sha256, role, not_after)| {
                CertificateIdentity {
                    subject_cn,
                    dns_names,
                    ip_addresses,
                    uris,
                    sha256,
                    role,
                    not_after,
                }
            },
        )
}

/// Events with every member arbitrary: each optional key present about half
/// of the time.
fn event() -> impl Strategy<Value = Event> {
    let header = (text(), timestamp(), shared_text(), event_type());
    let source = (
        proptest::option::of(shared_text()),
        any::<Option<u64>>(),
        proptest::option::of(shared_text()),
        proptest::option::of(any::<IpAddr>()),
        any::<Option<u16>>(),
        proptest::option::of(shared_text()),
    );
    let request = (
        proptest::option::of(modbus()),
        proptest::option::of(opcua()),
        proptest::option::of(decision()),
        any::<Option<bool>>(),
        proptest::option::of(static_text()),
        proptest::option::of(shared_text()),
        proptest::option::of(text()),
    );
    let extra = (
        proptest::option::of(anomaly()),
        proptest::option::of(static_text()),
        proptest::option::of(detail()),
        proptest::option::of(certificate().prop_map(Arc::new)),
    );
    (header, source, request, extra).prop_map(
        |(
            (id, timestamp, gateway, event_type),
            (listener, session_id, vendor, src_ip, src_port, device),
            (modbus, opcua, decision, enforced, served_by, rule, reason),
            (anomaly, action, detail, tls),
        )| {
            let mut event = Event::new(event_type);
            event.id = id;
            event.timestamp = timestamp;
            event.gateway = gateway;
            event.listener = listener;
            event.session_id = session_id;
            event.vendor = vendor;
            event.src_ip = src_ip;
            event.src_port = src_port;
            event.device = device;
            event.modbus = modbus;
            event.opcua = opcua;
            event.decision = decision;
            event.enforced = enforced;
            event.served_by = served_by;
            event.rule = rule;
            event.reason = reason;
            event.anomaly = anomaly;
            event.action = action;
            event.detail = detail;
            event.tls = tls;
            event
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn write_json_matches_serde_json(event in event()) {
        let mut fast = Vec::new();
        event.write_json(&mut fast).unwrap();
        let derived = serde_json::to_vec(&event).unwrap();
        prop_assert_eq!(String::from_utf8(fast).unwrap(), String::from_utf8(derived).unwrap());
    }
}
