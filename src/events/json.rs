//! The JSON form of an `Event`, written by hand.
//!
//! The event writer thread serializes every event once for the audit log and
//! once more when a collector wants it, so this code runs for every request
//! the gateway decides. Through the `Serialize` derive, serde_json escapes
//! every key at run time and formats the timestamp, the source address and
//! the integers through `core::fmt`. Here the keys are constant bytes and
//! the values are written digit by digit. For a typical decision event that
//! takes about a third of the time of the derive, as measured with
//! `cargo bench --bench audit -- event_json` on a shared 2-core machine.
//!
//! The output is a contract shared by the audit log, collectors and
//! `sluice ctl`: it must stay byte-identical to `serde_json::to_writer`
//! on the derived `Serialize` impl. Keys appear in field order and absent
//! optional keys are left out, as `skip_serializing_if` does. Only the
//! rare `detail` and `tls` members go through serde_json. The unit tests
//! below and the property test in `tests/event_json.rs` compare both forms.

use std::io::Write as _;
use std::net::IpAddr;

use super::{Anomaly, DecisionKind, Event, EventType, ModbusInfo, OpcuaInfo, Severity};

impl Event {
    /// Appends the event as one JSON object to `out`, the same bytes that
    /// `serde_json::to_writer(out, self)` writes.
    ///
    /// # Errors
    ///
    /// Fails only when serde_json fails on the `detail` or `tls` member.
    /// `out` is then truncated back to its length before the call.
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let start = out.len();
        let result = self.write_members(out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn write_members(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        // `id`, `timestamp`, `gateway` and `event_type` are always present,
        // so every later key can carry its leading comma.
        out.extend_from_slice(b"{\"id\":");
        write_str(out, &self.id);
        out.extend_from_slice(b",\"timestamp\":");
        write_timestamp(out, self.timestamp);
        out.extend_from_slice(b",\"gateway\":");
        write_str(out, &self.gateway);
        out.extend_from_slice(b",\"event_type\":");
        write_name(out, event_type_name(self.event_type));

        write_optional_str(out, b",\"listener\":", self.listener.as_deref());
        write_optional_integer(out, b",\"session_id\":", self.session_id);
        write_optional_str(out, b",\"vendor\":", self.vendor.as_deref());
        if let Some(src_ip) = self.src_ip {
            out.extend_from_slice(b",\"src_ip\":");
            write_ip(out, src_ip);
        }
        write_optional_integer(out, b",\"src_port\":", self.src_port);
        write_optional_str(out, b",\"device\":", self.device.as_deref());
        if let Some(modbus) = &self.modbus {
            out.extend_from_slice(b",\"modbus\":");
            write_modbus(out, modbus);
        }
        if let Some(opcua) = &self.opcua {
            out.extend_from_slice(b",\"opcua\":");
            write_opcua(out, opcua);
        }
        if let Some(decision) = self.decision {
            out.extend_from_slice(b",\"decision\":");
            write_name(out, decision_name(decision));
        }
        if let Some(enforced) = self.enforced {
            out.extend_from_slice(b",\"enforced\":");
            out.extend_from_slice(if enforced { b"true" } else { b"false" });
        }
        write_optional_str(out, b",\"served_by\":", self.served_by);
        write_optional_str(out, b",\"rule\":", self.rule.as_deref());
        write_optional_str(out, b",\"reason\":", self.reason.as_deref());
        if let Some(anomaly) = &self.anomaly {
            out.extend_from_slice(b",\"anomaly\":");
            write_anomaly(out, anomaly);
        }
        write_optional_str(out, b",\"action\":", self.action);
        if let Some(detail) = &self.detail {
            out.extend_from_slice(b",\"detail\":");
            serde_json::to_writer(&mut *out, detail)?;
        }
        if let Some(tls) = &self.tls {
            out.extend_from_slice(b",\"tls\":");
            serde_json::to_writer(&mut *out, &**tls)?;
        }
        out.push(b'}');
        Ok(())
    }
}

fn write_modbus(out: &mut Vec<u8>, modbus: &ModbusInfo) {
    out.extend_from_slice(b"{\"unit\":");
    write_integer(out, modbus.unit);
    out.extend_from_slice(b",\"function\":");
    write_integer(out, modbus.function);
    write_optional_str(out, b",\"function_name\":", modbus.function_name);
    write_optional_integer(out, b",\"address\":", modbus.address);
    write_optional_integer(out, b",\"quantity\":", modbus.quantity);
    out.extend_from_slice(b",\"transaction_id\":");
    write_integer(out, modbus.transaction_id);
    write_optional_integer(out, b",\"sub_function\":", modbus.sub_function);
    write_optional_integer(out, b",\"exception\":", modbus.exception);
    out.push(b'}');
}

fn write_opcua(out: &mut Vec<u8>, opcua: &OpcuaInfo) {
    out.extend_from_slice(b"{\"service\":");
    write_str(out, opcua.service);
    write_optional_str(out, b",\"node_id\":", opcua.node_id.as_deref());
    out.extend_from_slice(b",\"status\":");
    write_str(out, &opcua.status);
    out.push(b'}');
}

fn write_anomaly(out: &mut Vec<u8>, anomaly: &Anomaly) {
    out.extend_from_slice(b"{\"kind\":");
    write_str(out, anomaly.kind);
    out.extend_from_slice(b",\"severity\":");
    write_name(out, severity_name(anomaly.severity));
    out.extend_from_slice(b",\"detail\":");
    write_str(out, &anomaly.detail);
    out.push(b'}');
}

/// Returns the name that `#[serde(rename_all = "snake_case")]` gives the
/// variant. The unit tests compare every variant with serde's name.
fn event_type_name(event_type: EventType) -> &'static [u8] {
    match event_type {
        EventType::Decision => b"decision",
        EventType::Anomaly => b"anomaly",
        EventType::Session => b"session",
        EventType::State => b"state",
        EventType::Config => b"config",
        EventType::Admin => b"admin",
        EventType::System => b"system",
        EventType::Seal => b"seal",
    }
}

fn decision_name(decision: DecisionKind) -> &'static [u8] {
    match decision {
        DecisionKind::Allow => b"allow",
        DecisionKind::Deny => b"deny",
    }
}

fn severity_name(severity: Severity) -> &'static [u8] {
    match severity {
        Severity::Low => b"low",
        Severity::Medium => b"medium",
        Severity::High => b"high",
        Severity::Critical => b"critical",
    }
}

/// Writes a variant name, which needs no escaping, as a JSON string.
fn write_name(out: &mut Vec<u8>, name: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(name);
    out.push(b'"');
}

fn write_integer(out: &mut Vec<u8>, value: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// Writes `key`, which starts with the comma before it, and the string
/// `value`, or nothing when `value` is absent.
fn write_optional_str(out: &mut Vec<u8>, key: &[u8], value: Option<&str>) {
    if let Some(value) = value {
        out.extend_from_slice(key);
        write_str(out, value);
    }
}

/// Writes `key`, which starts with the comma before it, and the number
/// `value`, or nothing when `value` is absent.
fn write_optional_integer(out: &mut Vec<u8>, key: &[u8], value: Option<impl itoa::Integer>) {
    if let Some(value) = value {
        out.extend_from_slice(key);
        write_integer(out, value);
    }
}

/// Writes `text` as a JSON string, escaped as serde_json 1.0 escapes it.
/// `"` and `\` get a backslash. Backspace, form feed, line feed, carriage
/// return and tab become `\b`, `\f`, `\n`, `\r` and `\t`. The other control
/// characters below U+0020 become `\u00XX` with lowercase hex. Everything
/// else, DEL and non-ASCII included, is copied unchanged.
fn write_str(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    // Copies each run of bytes that need no escape in one call, because
    // names, ids and reasons rarely contain a byte that does.
    let mut rest = text.as_bytes();
    while let Some(index) = rest.iter().position(|&byte| needs_escape(byte)) {
        out.extend_from_slice(&rest[..index]);
        write_escape(out, rest[index]);
        rest = &rest[index + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

fn needs_escape(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

fn write_escape(out: &mut Vec<u8>, byte: u8) {
    const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

    match byte {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        _ => out.extend_from_slice(&[
            b'\\',
            b'u',
            b'0',
            b'0',
            HEX_DIGITS[usize::from(byte >> 4)],
            HEX_DIGITS[usize::from(byte & 0x0f)],
        ]),
    }
}

/// Writes `timestamp` in UTC the way jiff 0.2 formats it with
/// `strftime("%Y-%m-%dT%H:%M:%S%.6fZ")`. The year is zero-padded to four
/// characters including a minus sign (`0999`, `-001`, `-9999`), and the
/// fraction is truncated, not rounded, to microseconds.
fn write_timestamp(out: &mut Vec<u8>, timestamp: jiff::Timestamp) {
    let civil = jiff::tz::Offset::UTC.to_datetime(timestamp);

    out.push(b'"');
    write_year(out, civil.year());

    // Everything after the year has a fixed width, so it is filled in on
    // the stack and appended in one call.
    let mut rest = *b"-MM-DDTHH:MM:SS.ffffffZ\"";
    put_digits(&mut rest[1..3], u32::from(civil.month().unsigned_abs()));
    put_digits(&mut rest[4..6], u32::from(civil.day().unsigned_abs()));
    put_digits(&mut rest[7..9], u32::from(civil.hour().unsigned_abs()));
    put_digits(&mut rest[10..12], u32::from(civil.minute().unsigned_abs()));
    put_digits(&mut rest[13..15], u32::from(civil.second().unsigned_abs()));
    // The civil fraction is within 0..1_000_000_000 even before the epoch.
    let micros = civil.subsec_nanosecond().unsigned_abs() / 1_000;
    put_digits(&mut rest[16..22], micros);
    out.extend_from_slice(&rest);
}

/// Writes a year of jiff's range, -9999 to 9999.
fn write_year(out: &mut Vec<u8>, year: i16) {
    let mut digits = [0; 4];
    put_digits(&mut digits, u32::from(year.unsigned_abs()));
    if year >= 0 {
        out.extend_from_slice(&digits);
    } else if year > -1000 {
        out.push(b'-');
        out.extend_from_slice(&digits[1..]);
    } else {
        out.push(b'-');
        out.extend_from_slice(&digits);
    }
}

/// Fills `slot` with the low decimal digits of `value`, zero-padded.
fn put_digits(slot: &mut [u8], mut value: u32) {
    for digit in slot.iter_mut().rev() {
        // The remainder is below 10, so the cast keeps it whole.
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Writes an address as a JSON string in its `Display` form, which is what
/// serde writes. IPv4 is written octet by octet, and IPv6 goes through
/// `Display`.
fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    out.push(b'"');
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            write_integer(out, a);
            out.push(b'.');
            write_integer(out, b);
            out.push(b'.');
            write_integer(out, c);
            out.push(b'.');
            write_integer(out, d);
        }
        IpAddr::V6(v6) => {
            // `io::Write` for `Vec<u8>` only appends and returns no error.
            let _ = write!(out, "{v6}");
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::identity::certificate::CertificateIdentity;

    /// Returns the hand-written form of `event` after checking that it equals
    /// serde_json's form byte for byte.
    fn fast_json(event: &Event) -> String {
        let mut fast = Vec::new();
        event.write_json(&mut fast).unwrap();
        let derived = serde_json::to_vec(event).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&fast),
            String::from_utf8_lossy(&derived)
        );
        String::from_utf8(fast).unwrap()
    }

    fn stamped(event_type: EventType) -> Event {
        let mut event = Event::new(event_type);
        event.id = "0000018f2b3c4d5e-00001234-2a".into();
        event.timestamp = "2026-12-10T08:30:00.000123Z".parse().unwrap();
        event.gateway = Arc::from("edge-01");
        event
    }

    fn with_session(mut event: Event) -> Event {
        event.listener = Some(Arc::from("scada"));
        event.session_id = Some(42);
        event.vendor = Some(Arc::from("acme"));
        event.src_ip = Some("192.168.10.7".parse().unwrap());
        event.src_port = Some(40_000);
        event
    }

    fn timestamp_text(timestamp: &str) -> String {
        let mut event = stamped(EventType::System);
        event.timestamp = timestamp.parse().unwrap();
        let json = fast_json(&event);
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value["timestamp"].as_str().unwrap().to_owned()
    }

    #[test]
    fn decision_event_json() {
        let mut event = with_session(stamped(EventType::Decision));
        event.device = Some(Arc::from("press-1"));
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
        event.decision = Some(DecisionKind::Allow);
        event.rule = Some("rules/acme.toml#1".into());
        assert_eq!(
            fast_json(&event),
            concat!(
                r#"{"id":"0000018f2b3c4d5e-00001234-2a","timestamp":"2026-12-10T08:30:00.000123Z","#,
                r#""gateway":"edge-01","event_type":"decision","listener":"scada","session_id":42,"#,
                r#""vendor":"acme","src_ip":"192.168.10.7","src_port":40000,"device":"press-1","#,
                r#""modbus":{"unit":1,"function":3,"function_name":"read_holding_registers","#,
                r#""address":100,"quantity":10,"transaction_id":7},"decision":"allow","#,
                r#""rule":"rules/acme.toml#1"}"#
            )
        );
    }

    #[test]
    fn session_event_json() {
        let mut event = with_session(stamped(EventType::Session));
        event.src_ip = Some("::1".parse().unwrap());
        event.action = Some("close");
        event.reason = Some("client closed".into());
        event.detail = Some(serde_json::json!({ "requests": 12 }));
        assert_eq!(
            fast_json(&event),
            concat!(
                r#"{"id":"0000018f2b3c4d5e-00001234-2a","timestamp":"2026-12-10T08:30:00.000123Z","#,
                r#""gateway":"edge-01","event_type":"session","listener":"scada","session_id":42,"#,
                r#""vendor":"acme","src_ip":"::1","src_port":40000,"reason":"client closed","#,
                r#""action":"close","detail":{"requests":12}}"#
            )
        );
    }

    #[test]
    fn anomaly_event_escapes_detail() {
        let mut event = Event::anomaly(
            "malformed_frame",
            Severity::High,
            "quote \" backslash \\ nul \0 bell \u{7} tab \t newline \n del \u{7f} é \u{2028} 😀",
        );
        event.id = "a-1".into();
        event.gateway = Arc::from("edge-01");
        event.detail = Some(serde_json::json!({ "raw": "\u{1}\"\\", "length": 3 }));
        assert_eq!(
            fast_json(&event),
            concat!(
                r#"{"id":"a-1","timestamp":"1970-01-01T00:00:00.000000Z","gateway":"edge-01","#,
                r#""event_type":"anomaly","anomaly":{"kind":"malformed_frame","severity":"high","#,
                r#""detail":"quote \" backslash \\ nul \u0000 bell \u0007 tab \t newline \n "#,
                "del \u{7f} é \u{2028} 😀\"},",
                r#""detail":{"length":3,"raw":"\u0001\"\\"}}"#
            )
        );
    }

    #[test]
    fn every_optional_key_absent() {
        assert_eq!(
            fast_json(&stamped(EventType::Config)),
            r#"{"id":"0000018f2b3c4d5e-00001234-2a","timestamp":"2026-12-10T08:30:00.000123Z","gateway":"edge-01","event_type":"config"}"#
        );
    }

    #[test]
    fn every_optional_key_present() {
        let mut event = with_session(stamped(EventType::Decision));
        event.device = Some(Arc::from("press-1"));
        event.modbus = Some(ModbusInfo {
            unit: 255,
            function: 8,
            function_name: Some("diagnostics"),
            address: Some(65_535),
            quantity: Some(0),
            transaction_id: 65_535,
            sub_function: Some(4),
            exception: Some(1),
        });

        event.opcua = Some(OpcuaInfo {
            service: "read",
            node_id: Some("nsu=urn:plant;s=Line\"1\"".into()),
            status: "BadUserAccessDenied".into(),
        });

        event.decision = Some(DecisionKind::Deny);
        event.enforced = Some(false);
        event.served_by = Some("mirror");
        event.rule = Some("rules/acme.toml#3".into());
        event.reason = Some("no rule allows function 8".into());

        event.anomaly = Some(Anomaly {
            kind: "rate_limit",
            severity: Severity::Critical,
            detail: "burst".into(),
        });
        event.action = Some("deny");
        event.detail = Some(serde_json::json!([1.5, null, true]));

        event.tls = Some(Arc::new(CertificateIdentity {
            subject_cn: Some("vendor-a".into()),
            dns_names: vec!["a.example".into()],
            ip_addresses: vec!["10.0.0.1".parse().unwrap(), "fe80::1".parse().unwrap()],
            uris: vec!["urn:vendor:a".into()],
            sha256: "ab".repeat(32),
            role: Some("operator".into()),
            not_after: 1_900_000_000,
        }));

        assert_eq!(
            fast_json(&event),
            concat!(
                r#"{"id":"0000018f2b3c4d5e-00001234-2a","timestamp":"2026-12-10T08:30:00.000123Z","#,
                r#""gateway":"edge-01","event_type":"decision","listener":"scada","session_id":42,"#,
                r#""vendor":"acme","src_ip":"192.168.10.7","src_port":40000,"device":"press-1","#,
                r#""modbus":{"unit":255,"function":8,"function_name":"diagnostics","address":65535,"#,
                r#""quantity":0,"transaction_id":65535,"sub_function":4,"exception":1},"#,
                r#""opcua":{"service":"read","node_id":"nsu=urn:plant;s=Line\"1\"","#,
                r#""status":"BadUserAccessDenied"},"decision":"deny","enforced":false,"#,
                r#""served_by":"mirror","rule":"rules/acme.toml#3","#,
                r#""reason":"no rule allows function 8","#,
                r#""anomaly":{"kind":"rate_limit","severity":"critical","detail":"burst"},"#,
                r#""action":"deny","detail":[1.5,null,true],"#,
                r#""tls":{"subject_cn":"vendor-a","dns_names":["a.example"],"#,
                r#""ip_addresses":["10.0.0.1","fe80::1"],"uris":["urn:vendor:a"],"#,
                r#""sha256":"abababababababababababababababababababababababababababababababab","#,
                r#""role":"operator"}}"#
            )
        );
    }

    #[test]
    fn enforced_true_and_minimal_modbus() {
        let mut event = stamped(EventType::Decision);
        event.modbus = Some(ModbusInfo {
            unit: 0,
            function: 0,
            function_name: None,
            address: None,
            quantity: None,
            transaction_id: 0,
            sub_function: None,
            exception: None,
        });
        event.opcua = Some(OpcuaInfo {
            service: "browse",
            node_id: None,
            status: "Good".into(),
        });
        event.enforced = Some(true);
        assert_eq!(
            fast_json(&event),
            concat!(
                r#"{"id":"0000018f2b3c4d5e-00001234-2a","timestamp":"2026-12-10T08:30:00.000123Z","#,
                r#""gateway":"edge-01","event_type":"decision","#,
                r#""modbus":{"unit":0,"function":0,"transaction_id":0},"#,
                r#""opcua":{"service":"browse","status":"Good"},"enforced":true}"#
            )
        );
    }

    #[test]
    fn variant_names_match_serde() {
        for event_type in EventType::ALL {
            fast_json(&stamped(event_type));
        }
        for decision in DecisionKind::ALL {
            let mut event = stamped(EventType::Decision);
            event.decision = Some(decision);
            fast_json(&event);
        }
        for severity in Severity::ALL {
            fast_json(&Event::anomaly("kind", severity, "detail"));
        }
    }

    #[test]
    fn every_ascii_character_escapes_as_serde() {
        for byte in 0..0x80u8 {
            let mut event = stamped(EventType::System);
            event.reason = Some(char::from(byte).to_string());
            fast_json(&event);
        }
    }

    #[test]
    fn timestamp_forms_at_range_edges() {
        let cases = [
            ("2026-12-10T08:30:00Z", "2026-12-10T08:30:00.000000Z"),
            (
                "2026-12-10T08:30:00.999999999Z",
                "2026-12-10T08:30:00.999999Z",
            ),
            ("1970-01-01T00:00:00Z", "1970-01-01T00:00:00.000000Z"),
            (
                "1969-12-31T23:59:59.999999999Z",
                "1969-12-31T23:59:59.999999Z",
            ),
            ("0999-03-04T05:06:07.000001Z", "0999-03-04T05:06:07.000001Z"),
            ("0005-03-04T05:06:07Z", "0005-03-04T05:06:07.000000Z"),
            ("0000-01-01T00:00:00Z", "0000-01-01T00:00:00.000000Z"),
            ("-000001-03-04T05:06:07Z", "-001-03-04T05:06:07.000000Z"),
            ("-000010-03-04T05:06:07Z", "-010-03-04T05:06:07.000000Z"),
            ("-000100-03-04T05:06:07Z", "-100-03-04T05:06:07.000000Z"),
            ("-001000-03-04T05:06:07Z", "-1000-03-04T05:06:07.000000Z"),
        ];
        for (input, expected) in cases {
            assert_eq!(timestamp_text(input), expected, "timestamp {input}");
        }

        let mut event = stamped(EventType::System);
        event.timestamp = jiff::Timestamp::MIN;
        assert!(fast_json(&event).contains(r#""timestamp":"-9999-01-02T01:59:59.000000Z""#));
        event.timestamp = jiff::Timestamp::MAX;
        assert!(fast_json(&event).contains(r#""timestamp":"9999-12-30T22:00:00.999999Z""#));
    }

    #[test]
    fn write_json_appends_to_existing_bytes() {
        let mut out = b"prefix ".to_vec();
        stamped(EventType::Seal).write_json(&mut out).unwrap();
        assert!(out.starts_with(b"prefix {\"id\":"));
        assert!(out.ends_with(b"\"event_type\":\"seal\"}"));
    }
}
