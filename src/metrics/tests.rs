//! Tests of the encoded metrics after scripted calls.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::labels::{exception_label, exception_slot, function_label, function_slot};
use super::*;

fn names() -> ConfiguredNames {
    ConfiguredNames {
        listeners: vec!["scada".into(), "vendors".into()],
        vendors: vec!["acme".into(), "globex".into()],
        devices: vec!["press-1".into(), "oven-2".into()],
        states: vec!["press-1-mode".into()],
        collectors: vec!["soc".into()],
    }
}

fn configured() -> (Arc<Metrics>, Arc<Instruments>) {
    let metrics = Metrics::new("1.2.3");
    let instruments = metrics.configure(names());
    (metrics, instruments)
}

#[track_caller]
fn assert_line(text: &str, line: &str) {
    assert!(
        text.lines().any(|candidate| candidate == line),
        "missing line {line:?} in:\n{text}"
    );
}

#[track_caller]
fn assert_no_line_starting(text: &str, prefix: &str) {
    let found: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with(prefix))
        .collect();
    assert!(found.is_empty(), "unexpected lines {found:?}");
}

/// Returns every value of `label` in the sample lines of `text`.
fn label_values(text: &str, label: &str) -> BTreeSet<String> {
    let key = format!("{label}=\"");
    let mut values = BTreeSet::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        for (start, _) in line.match_indices(&key) {
            let rest = &line[start + key.len()..];
            values.insert(rest[..rest.find('"').expect("closing quote")].to_owned());
        }
    }
    values
}

fn set(values: &[&str]) -> BTreeSet<String> {
    values.iter().map(|value| (*value).to_owned()).collect()
}

#[test]
fn request_counter_counts_each_call() {
    let (metrics, instruments) = configured();
    for _ in 0..3 {
        instruments.record_request(0, 0, 0, 0x03, true, None);
    }
    instruments.record_request(0, 0, 0, 0x06, false, None);

    let text = metrics.encode();
    assert_line(
        &text,
        r#"sluice_requests_total{listener="scada",vendor="acme",device="press-1",function="read_holding_registers",decision="allow"} 3"#,
    );
    assert_line(
        &text,
        r#"sluice_requests_total{listener="scada",vendor="acme",device="press-1",function="write_single_register",decision="deny"} 1"#,
    );
    assert_line(&text, "# TYPE sluice_requests counter");
}

#[test]
fn request_counter_is_absent_until_first_request() {
    let (metrics, _instruments) = configured();
    assert_no_line_starting(&metrics.encode(), "sluice_requests_total{");
}

#[test]
fn unknown_function_code_is_labelled_other() {
    let (metrics, instruments) = configured();
    instruments.record_request(1, 1, 1, 0x41, false, None);
    instruments.record_request(1, 1, 1, 0x00, false, None);
    instruments.record_request(1, 1, 1, 0xFF, false, None);

    assert_line(
        &metrics.encode(),
        r#"sluice_requests_total{listener="vendors",vendor="globex",device="oven-2",function="other",decision="deny"} 3"#,
    );
}

#[test]
fn function_table_matches_codec_names() {
    for code in 0..=u8::MAX {
        let expected = crate::modbus::pdu::function_name_of(code).unwrap_or("other");
        assert_eq!(
            function_label(function_slot(code)),
            expected,
            "code {code:#04x}"
        );
    }
}

#[test]
fn exception_codes_are_labelled_in_hex() {
    assert_eq!(exception_label(exception_slot(0x01)), "01");
    assert_eq!(exception_label(exception_slot(0x0A)), "0A");
    assert_eq!(exception_label(exception_slot(0x0B)), "0B");
    assert_eq!(exception_label(exception_slot(0x00)), "other");
    assert_eq!(exception_label(exception_slot(0x0C)), "other");
    assert_eq!(exception_label(exception_slot(0x8B)), "other");
}

#[test]
fn unexpected_ids_add_no_label_values() {
    let (metrics, instruments) = configured();
    instruments.record_request(0, 0, 0, 0x01, true, Some(Duration::from_millis(2)));
    instruments.record_request(2, 0, 0, 0x01, true, None);
    instruments.record_request(0, 2, 0, 0x01, true, None);
    instruments.record_request(0, 0, 2, 0x01, true, Some(Duration::from_millis(2)));
    instruments.record_request(usize::MAX, usize::MAX, usize::MAX, 0x01, true, None);
    drop(instruments.open_session(2, 0));
    drop(instruments.open_session(0, 9));
    instruments.count_session_rejected(7, RejectReason::VendorFull);
    instruments.count_tls_handshake(7, TlsOutcome::Failure);
    instruments.set_state(3, Some(1));
    instruments.upstream(5).count_exception(0x02);
    instruments.upstream(5).set_up(true);
    instruments.upstream(0).count_exception(0x99);
    instruments.collector(4).count_delivered(10);
    metrics.count_anomaly("attacker-chosen kind");

    let text = metrics.encode();
    assert_eq!(label_values(&text, "listener"), set(&["scada", "vendors"]));
    assert_eq!(label_values(&text, "vendor"), set(&["acme", "globex"]));
    assert_eq!(label_values(&text, "device"), set(&["oven-2", "press-1"]));
    assert_eq!(label_values(&text, "function"), set(&["read_coils"]));
    assert_eq!(label_values(&text, "code"), set(&["other"]));
    assert_eq!(label_values(&text, "state"), set(&["press-1-mode"]));
    assert_eq!(label_values(&text, "collector"), set(&["soc"]));
    assert_eq!(
        label_values(&text, "kind"),
        ANOMALY_KINDS
            .iter()
            .map(|kind| (*kind).to_owned())
            .collect()
    );
    assert_line(
        &text,
        r#"sluice_requests_total{listener="scada",vendor="acme",device="press-1",function="read_coils",decision="allow"} 1"#,
    );
    assert_line(&text, r#"sluice_anomalies_total{kind="other"} 1"#);
}

#[test]
fn duration_histogram_counts_per_device() {
    let (metrics, instruments) = configured();
    instruments.record_request(0, 0, 0, 0x03, true, Some(Duration::from_micros(800)));
    instruments.record_request(0, 0, 0, 0x03, true, Some(Duration::from_millis(20)));
    instruments.record_request(0, 0, 0, 0x03, false, None);

    let text = metrics.encode();
    assert_line(&text, "# TYPE sluice_request_duration_seconds histogram");
    assert_line(&text, "# UNIT sluice_request_duration_seconds seconds");
    assert_line(
        &text,
        r#"sluice_request_duration_seconds_bucket{le="0.0005",device="press-1"} 0"#,
    );
    assert_line(
        &text,
        r#"sluice_request_duration_seconds_bucket{le="0.001",device="press-1"} 1"#,
    );
    assert_line(
        &text,
        r#"sluice_request_duration_seconds_bucket{le="0.025",device="press-1"} 2"#,
    );
    assert_line(
        &text,
        r#"sluice_request_duration_seconds_bucket{le="5.0",device="press-1"} 2"#,
    );
    assert_line(
        &text,
        r#"sluice_request_duration_seconds_bucket{le="+Inf",device="press-1"} 2"#,
    );
    assert_line(
        &text,
        r#"sluice_request_duration_seconds_count{device="press-1"} 2"#,
    );
    assert_line(
        &text,
        r#"sluice_request_duration_seconds_sum{device="press-1"} 0.0208"#,
    );
    assert_line(
        &text,
        r#"sluice_request_duration_seconds_count{device="oven-2"} 0"#,
    );
}

#[test]
fn session_guard_counts_open_sessions() {
    let (metrics, instruments) = configured();
    let first = instruments.open_session(1, 0);
    let second = instruments.open_session(1, 0);
    assert_line(
        &metrics.encode(),
        r#"sluice_sessions_open{listener="vendors",vendor="acme"} 2"#,
    );

    drop(first);
    assert_line(
        &metrics.encode(),
        r#"sluice_sessions_open{listener="vendors",vendor="acme"} 1"#,
    );
    drop(second);
    let text = metrics.encode();
    assert_line(
        &text,
        r#"sluice_sessions_open{listener="vendors",vendor="acme"} 0"#,
    );
    assert_line(
        &text,
        r#"sluice_sessions_open{listener="scada",vendor="globex"} 0"#,
    );
}

#[test]
fn rejected_sessions_count_by_reason() {
    let (metrics, instruments) = configured();
    instruments.count_session_rejected(0, RejectReason::UnknownSource);
    instruments.count_session_rejected(0, RejectReason::UnknownSource);
    instruments.count_session_rejected(1, RejectReason::SourceFull);

    let text = metrics.encode();
    assert_line(
        &text,
        r#"sluice_sessions_rejected_total{listener="scada",reason="unknown_source"} 2"#,
    );
    assert_line(
        &text,
        r#"sluice_sessions_rejected_total{listener="vendors",reason="source_full"} 1"#,
    );
    assert_line(
        &text,
        r#"sluice_sessions_rejected_total{listener="scada",reason="listener_full"} 0"#,
    );
    assert_line(
        &text,
        r#"sluice_sessions_rejected_total{listener="vendors",reason="vendor_full"} 0"#,
    );
}

#[test]
fn tls_handshakes_count_by_outcome() {
    let (metrics, instruments) = configured();
    assert_no_line_starting(&metrics.encode(), "sluice_tls_handshakes_total{");

    instruments.count_tls_handshake(1, TlsOutcome::Success);
    instruments.count_tls_handshake(1, TlsOutcome::Failure);
    instruments.count_tls_handshake(1, TlsOutcome::Failure);
    let text = metrics.encode();
    assert_line(
        &text,
        r#"sluice_tls_handshakes_total{listener="vendors",outcome="success"} 1"#,
    );
    assert_line(
        &text,
        r#"sluice_tls_handshakes_total{listener="vendors",outcome="failure"} 2"#,
    );
}

#[test]
fn tls_expiry_series_are_replaced_on_each_set() {
    let (metrics, _) = configured();
    let vendors: Arc<str> = Arc::from("vendors");
    metrics.set_tls_expiry([
        (
            &vendors,
            "server_certificate",
            "tls/gateway.crt".to_owned(),
            1_800_000_000,
        ),
        (&vendors, "crl", "tls/vendors.crl".to_owned(), 1_790_000_000),
    ]);
    let text = metrics.encode();
    assert_line(
        &text,
        r#"sluice_tls_expiry_timestamp_seconds{listener="vendors",kind="server_certificate",file="tls/gateway.crt"} 1800000000"#,
    );
    assert_line(
        &text,
        r#"sluice_tls_expiry_timestamp_seconds{listener="vendors",kind="crl",file="tls/vendors.crl"} 1790000000"#,
    );

    metrics.set_tls_expiry([(&vendors, "crl", "tls/vendors.crl".to_owned(), 1_795_000_000)]);
    let text = metrics.encode();
    assert_no_line_starting(
        &text,
        r#"sluice_tls_expiry_timestamp_seconds{listener="vendors",kind="server_certificate""#,
    );
    assert_line(
        &text,
        r#"sluice_tls_expiry_timestamp_seconds{listener="vendors",kind="crl",file="tls/vendors.crl"} 1795000000"#,
    );
}

#[test]
fn upstream_metrics_follow_pool_events() {
    let (metrics, instruments) = configured();
    let upstream = instruments.upstream(1);
    upstream.set_up(true);
    upstream.count_reconnect();
    upstream.count_timeout();
    upstream.count_timeout();
    upstream.count_bad_response();
    upstream.count_exception(0x0B);
    upstream.count_exception(0x0B);
    upstream.count_exception(0x02);
    upstream.count_exception(0x2A);

    let text = metrics.encode();
    assert_line(&text, r#"sluice_upstream_up{device="oven-2"} 1"#);
    assert_line(&text, r#"sluice_upstream_up{device="press-1"} 0"#);
    assert_line(
        &text,
        r#"sluice_upstream_reconnects_total{device="oven-2"} 1"#,
    );
    assert_line(
        &text,
        r#"sluice_upstream_timeouts_total{device="oven-2"} 2"#,
    );
    assert_line(
        &text,
        r#"sluice_upstream_timeouts_total{device="press-1"} 0"#,
    );
    assert_line(
        &text,
        r#"sluice_upstream_bad_responses_total{device="oven-2"} 1"#,
    );
    assert_line(
        &text,
        r#"sluice_upstream_exceptions_total{device="oven-2",code="0B"} 2"#,
    );
    assert_line(
        &text,
        r#"sluice_upstream_exceptions_total{device="oven-2",code="02"} 1"#,
    );
    assert_line(
        &text,
        r#"sluice_upstream_exceptions_total{device="oven-2",code="other"} 1"#,
    );

    upstream.set_up(false);
    assert_line(
        &metrics.encode(),
        r#"sluice_upstream_up{device="oven-2"} 0"#,
    );
}

#[test]
fn state_gauges_keep_last_value_when_unknown() {
    let (metrics, instruments) = configured();
    let text = metrics.encode();
    assert_line(&text, r#"sluice_state_known{state="press-1-mode"} 0"#);

    instruments.set_state(0, Some(1));
    let text = metrics.encode();
    assert_line(&text, r#"sluice_state_value{state="press-1-mode"} 1"#);
    assert_line(&text, r#"sluice_state_known{state="press-1-mode"} 1"#);

    instruments.set_state(0, None);
    let text = metrics.encode();
    assert_line(&text, r#"sluice_state_value{state="press-1-mode"} 1"#);
    assert_line(&text, r#"sluice_state_known{state="press-1-mode"} 0"#);
}

#[test]
fn collector_metrics_follow_delivery() {
    let (metrics, instruments) = configured();
    let collector = instruments.collector(0);
    collector.set_spool_events(42);
    collector.count_delivered(7);
    collector.count_dropped(2);

    let text = metrics.encode();
    assert_line(
        &text,
        r#"sluice_collector_spool_events{collector="soc"} 42"#,
    );
    assert_line(
        &text,
        r#"sluice_collector_delivered_total{collector="soc"} 7"#,
    );
    assert_line(
        &text,
        r#"sluice_collector_dropped_total{collector="soc"} 2"#,
    );
}

#[test]
fn global_metrics_follow_calls() {
    let metrics = Metrics::new("1.2.3");
    metrics.count_anomaly("unknown_client");
    metrics.count_anomaly("unknown_client");
    metrics.count_anomaly("bad_response");
    metrics.count_audit_record();
    metrics.count_audit_record();
    metrics.count_audit_seal();
    metrics.count_audit_write_error();
    metrics.set_audit_writable(true);
    metrics.count_reload(true);
    metrics.count_reload(false);
    metrics.count_reload(false);
    metrics.set_events_queue_depth(17);

    let text = metrics.encode();
    assert_line(&text, r#"sluice_anomalies_total{kind="unknown_client"} 2"#);
    assert_line(&text, r#"sluice_anomalies_total{kind="bad_response"} 1"#);
    assert_line(&text, r#"sluice_anomalies_total{kind="late_response"} 0"#);
    assert_line(&text, "sluice_audit_records_total 2");
    assert_line(&text, "sluice_audit_seals_total 1");
    assert_line(&text, "sluice_audit_write_errors_total 1");
    assert_line(&text, "sluice_audit_writable 1");
    assert_line(&text, r#"sluice_config_reloads_total{outcome="success"} 1"#);
    assert_line(&text, r#"sluice_config_reloads_total{outcome="failure"} 2"#);
    assert_line(&text, "sluice_events_queue_depth 17");
    assert_line(&text, r#"sluice_build_info{version="1.2.3"} 1"#);
    assert_line(
        &text,
        "sluice_config_last_reload_success_timestamp_seconds 0.0",
    );
    assert!(
        text.ends_with("# EOF\n"),
        "no EOF marker at the end:\n{text}"
    );
}

#[test]
fn configure_sets_last_reload_time() {
    let (metrics, _instruments) = configured();
    let text = metrics.encode();
    let value: f64 = text
        .lines()
        .find_map(|line| line.strip_prefix("sluice_config_last_reload_success_timestamp_seconds "))
        .expect("timestamp line")
        .parse()
        .expect("timestamp value");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    assert!(
        value > 0.0 && value <= now,
        "timestamp {value} not in (0, {now}]"
    );
}

#[test]
fn every_metric_name_starts_with_sluice() {
    let (metrics, instruments) = configured();
    instruments.record_request(0, 0, 0, 0x03, true, Some(Duration::from_millis(1)));
    instruments.count_tls_handshake(0, TlsOutcome::Success);
    instruments.upstream(0).count_exception(0x01);

    for line in metrics.encode().lines() {
        if line == "# EOF" {
            continue;
        }
        let name = line
            .strip_prefix("# TYPE ")
            .or_else(|| line.strip_prefix("# HELP "))
            .or_else(|| line.strip_prefix("# UNIT "))
            .unwrap_or(line);
        assert!(name.starts_with("sluice_"), "line {line:?}");
    }
}

#[test]
fn reconfigure_keeps_counters_and_drops_stale_gauges() {
    let (metrics, first) = configured();
    first.record_request(0, 0, 0, 0x03, true, None);
    first.upstream(1).set_up(true);
    first.set_state(0, Some(1));
    let old_session = first.open_session(0, 1);

    let second = metrics.configure(ConfiguredNames {
        listeners: vec!["scada".into()],
        vendors: vec!["acme".into()],
        devices: vec!["press-1".into()],
        states: vec![],
        collectors: vec![],
    });
    second.record_request(0, 0, 0, 0x03, true, None);
    first.record_request(0, 0, 0, 0x03, true, None);

    let text = metrics.encode();
    assert_line(
        &text,
        r#"sluice_requests_total{listener="scada",vendor="acme",device="press-1",function="read_holding_registers",decision="allow"} 3"#,
    );
    assert_line(&text, r#"sluice_upstream_up{device="press-1"} 0"#);
    assert_no_line_starting(&text, r#"sluice_upstream_up{device="oven-2"}"#);
    assert_no_line_starting(&text, "sluice_state_value{");
    assert_no_line_starting(&text, "sluice_state_known{");
    assert_no_line_starting(&text, "sluice_collector_spool_events{");
    assert_no_line_starting(
        &text,
        r#"sluice_sessions_open{listener="scada",vendor="globex"}"#,
    );
    assert_no_line_starting(&text, r#"sluice_sessions_open{listener="vendors""#);
    assert_line(
        &text,
        r#"sluice_upstream_timeouts_total{device="oven-2"} 0"#,
    );
    drop(old_session);
}
