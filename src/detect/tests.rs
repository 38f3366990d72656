//! Thresholds of each detector, exactly at the limit and one past it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::config::{DetectConfig, OnAnomalyConfig};
use crate::policy::{Condition, DenyReason, RateKind, RateLimit, RateScope};

fn read(unit: u8, function: u8, address: u16, quantity: u16) -> Observed {
    Observed {
        unit,
        function,
        sub_function: None,
        undefined: false,
        write: false,
        read: Some(Read { address, quantity }),
    }
}

fn plain(unit: u8, function: u8) -> Observed {
    Observed {
        unit,
        function,
        sub_function: None,
        undefined: false,
        write: false,
        read: None,
    }
}

fn kinds(findings: &[Finding]) -> Vec<&'static str> {
    findings.iter().map(|finding| finding.kind).collect()
}

#[test]
fn function_scan_raises_once_past_limit() {
    let config = DetectConfig::default();
    let mut detector = SessionDetector::new();
    let mut out = Vec::new();
    let now = Instant::now();
    for function in 1..=8 {
        detector.request(now, &plain(1, function), &config, &mut out);
    }
    assert_eq!(kinds(&out), Vec::<&str>::new());
    detector.request(now, &plain(1, 9), &config, &mut out);
    assert_eq!(kinds(&out), vec!["function_scan"]);
    assert_eq!(out[0].detail, "9 distinct function codes within 10000 ms");
    for function in 10..=20 {
        detector.request(now, &plain(1, function), &config, &mut out);
    }
    assert_eq!(kinds(&out), vec!["function_scan"]);
}

#[test]
fn function_scan_resets_after_window() {
    let config = DetectConfig::default();
    let mut detector = SessionDetector::new();
    let mut out = Vec::new();
    let start = Instant::now();
    for function in 1..=8 {
        detector.request(start, &plain(1, function), &config, &mut out);
    }
    let later = start + Duration::from_secs(10);
    detector.request(later, &plain(1, 9), &config, &mut out);
    assert_eq!(kinds(&out), Vec::<&str>::new());
}

#[test]
fn repeated_function_codes_raise_nothing() {
    let config = DetectConfig::default();
    let mut detector = SessionDetector::new();
    let mut out = Vec::new();
    let now = Instant::now();
    for _ in 0..100 {
        detector.request(now, &read(1, 3, 0, 10), &config, &mut out);
    }
    assert_eq!(kinds(&out), Vec::<&str>::new());
}

#[test]
fn unit_scan_raises_past_limit() {
    let config = DetectConfig::default();
    let mut detector = SessionDetector::new();
    let mut out = Vec::new();
    let now = Instant::now();
    for unit in 1..=8 {
        detector.request(now, &plain(unit, 3), &config, &mut out);
    }
    assert_eq!(kinds(&out), Vec::<&str>::new());
    detector.request(now, &plain(9, 3), &config, &mut out);
    assert_eq!(kinds(&out), vec!["unit_scan"]);
}

#[test]
fn address_sweep_raises_past_limit() {
    let config = DetectConfig::default();
    let mut detector = SessionDetector::new();
    let mut out = Vec::new();
    let now = Instant::now();
    for block in 0..20 {
        detector.request(now, &read(1, 3, block * 100, 10), &config, &mut out);
    }
    assert_eq!(kinds(&out), Vec::<&str>::new());
    detector.request(now, &read(1, 3, 2000, 10), &config, &mut out);
    assert_eq!(kinds(&out), vec!["address_sweep"]);
    assert_eq!(
        out[0].detail,
        "reads covered 21 distinct 100-register blocks within 10000 ms"
    );
}

#[test]
fn address_sweep_counts_spanned_blocks() {
    let config = DetectConfig::default();
    let mut detector = SessionDetector::new();
    let mut out = Vec::new();
    let now = Instant::now();
    // Addresses 0 to 1999 cover blocks 0 to 19; the last address is in block 655.
    detector.request(now, &read(1, 1, 0, 2000), &config, &mut out);
    assert_eq!(kinds(&out), Vec::<&str>::new());
    detector.request(now, &read(1, 1, 65_535, 1), &config, &mut out);
    assert_eq!(kinds(&out), vec!["address_sweep"]);
}

fn denial(detector: &mut SessionDetector, reason: &DenyReason, write: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    detector.denial(
        Instant::now(),
        Some(reason),
        write,
        &DetectConfig::default(),
        &mut out,
    );
    out
}

#[test]
fn denial_burst_raises_past_limit() {
    let mut detector = SessionDetector::new();
    let reason = DenyReason::FunctionNotAllowed { function: 6 };
    for _ in 0..20 {
        assert_eq!(
            kinds(&denial(&mut detector, &reason, false)),
            Vec::<&str>::new()
        );
    }
    assert_eq!(
        kinds(&denial(&mut detector, &reason, false)),
        vec!["denial_burst"]
    );
    assert_eq!(
        kinds(&denial(&mut detector, &reason, false)),
        Vec::<&str>::new()
    );
}

#[test]
fn rate_limited_raises_once_per_window() {
    let mut detector = SessionDetector::new();
    let reason = DenyReason::RateLimited {
        scope: RateScope::Vendor {
            name: Arc::from("acme"),
        },
        limit: RateLimit {
            kind: RateKind::Requests,
            rate: crate::config::Rate::per_second(1),
            burst: 1,
        },
    };
    let config = DetectConfig::default();
    let start = Instant::now();
    let mut out = Vec::new();
    detector.denial(start, Some(&reason), false, &config, &mut out);
    detector.denial(start, Some(&reason), false, &config, &mut out);
    assert_eq!(kinds(&out), vec!["rate_limited"]);
    detector.denial(
        start + config.repeat_window,
        Some(&reason),
        false,
        &config,
        &mut out,
    );
    assert_eq!(kinds(&out), vec!["rate_limited", "rate_limited"]);
}

#[test]
fn gated_write_denied_needs_state_or_time() {
    let mut detector = SessionDetector::new();
    let state = DenyReason::StateUnknown {
        state: Arc::from("press-1-mode"),
    };
    let schedule = DenyReason::ConditionFailed {
        condition: Condition::Schedule,
    };
    let source = DenyReason::ConditionFailed {
        condition: Condition::Source {
            source: IpAddr::from([127, 0, 0, 1]),
        },
    };
    assert_eq!(
        kinds(&denial(&mut detector, &state, true)),
        vec!["gated_write_denied"]
    );
    assert_eq!(
        kinds(&denial(&mut detector, &schedule, true)),
        vec!["gated_write_denied"]
    );
    assert_eq!(
        kinds(&denial(&mut detector, &schedule, false)),
        Vec::<&str>::new()
    );
    assert_eq!(
        kinds(&denial(&mut detector, &source, true)),
        Vec::<&str>::new()
    );
}

#[test]
fn dangerous_requests_are_named() {
    let mut listen_only = plain(1, 8);
    listen_only.sub_function = Some(4);
    let mut restart = plain(1, 8);
    restart.sub_function = Some(1);
    let mut echo = plain(1, 8);
    echo.sub_function = Some(0);
    let mut undefined = plain(1, 90);
    undefined.undefined = true;
    let mut broadcast = plain(0, 6);
    broadcast.write = true;
    let broadcast_read = plain(0, 3);

    let detail = |request: &Observed| dangerous(request).map(|finding| finding.detail);
    assert_eq!(
        detail(&listen_only).as_deref(),
        Some("diagnostics sub-function 4: force listen only mode")
    );
    assert_eq!(
        detail(&restart).as_deref(),
        Some("diagnostics sub-function 1: restart communications")
    );
    assert_eq!(detail(&echo), None);
    assert_eq!(
        detail(&undefined).as_deref(),
        Some("function code 90 that the specification does not define")
    );
    assert_eq!(
        detail(&broadcast).as_deref(),
        Some("broadcast write (function code 6) to unit 0")
    );
    assert_eq!(detail(&broadcast_read), None);
}

#[test]
fn device_failures_raise_once_per_window() {
    let hub = Hub::new();
    let config = DetectConfig::default();
    let device: Arc<str> = Arc::from("press-1");
    let start = Instant::now();
    let mut out = Vec::new();
    hub.failure(&device, start, Failure::Gateway(0x0B), &config, &mut out);
    hub.failure(&device, start, Failure::Gateway(0x0B), &config, &mut out);
    hub.failure(&device, start, Failure::Gateway(0x0A), &config, &mut out);
    assert_eq!(kinds(&out), vec!["device_timeout", "device_unreachable"]);
    hub.failure(
        &device,
        start + config.repeat_window,
        Failure::Gateway(0x0B),
        &config,
        &mut out,
    );
    assert_eq!(
        kinds(&out),
        vec!["device_timeout", "device_unreachable", "device_timeout"]
    );
}

#[test]
fn exception_storm_counts_per_device() {
    let hub = Hub::new();
    let config = DetectConfig::default();
    let press: Arc<str> = Arc::from("press-1");
    let oven: Arc<str> = Arc::from("oven-2");
    let now = Instant::now();
    let mut out = Vec::new();
    for _ in 0..20 {
        hub.failure(&press, now, Failure::Exception(2), &config, &mut out);
        hub.failure(&oven, now, Failure::Exception(2), &config, &mut out);
    }
    assert_eq!(kinds(&out), Vec::<&str>::new());
    hub.failure(&press, now, Failure::Exception(2), &config, &mut out);
    assert_eq!(kinds(&out), vec!["exception_storm"]);
    assert_eq!(
        out[0].detail,
        "device press-1 sent 21 exception responses within 10000 ms"
    );
}

#[test]
fn new_source_skips_first_connection() {
    let hub = Hub::new();
    let vendor: Arc<str> = Arc::from("acme");
    let first = IpAddr::from([127, 0, 0, 1]);
    let second = IpAddr::from([127, 0, 0, 2]);
    assert_eq!(hub.connection(&vendor, first), None);
    assert_eq!(hub.connection(&vendor, first), None);
    let finding = hub.connection(&vendor, second).unwrap();
    assert_eq!(finding.kind, "new_source");
    assert_eq!(
        finding.detail,
        "vendor acme connected from 127.0.0.2, not seen before"
    );
    assert_eq!(hub.connection(&vendor, second), None);
}

#[test]
fn new_source_set_stays_bounded() {
    let hub = Hub::new();
    let vendor: Arc<str> = Arc::from("acme");
    for host in 0..=MAX_SOURCES_PER_VENDOR as u8 {
        hub.connection(&vendor, IpAddr::from([10, 0, 0, host]));
    }
    let vendors = lock(&hub.vendors);
    assert_eq!(vendors["acme"].sources.len(), MAX_SOURCES_PER_VENDOR);
    assert_eq!(vendors["acme"].sources[0], IpAddr::from([10, 0, 0, 1]));
}

#[test]
fn containment_triggers_at_count() {
    let hub = Hub::new();
    let vendor: Arc<str> = Arc::from("acme");
    let containment = OnAnomalyConfig {
        kinds: vec!["function_scan", "denial_burst"],
        count: 3,
        window: Duration::from_secs(60),
        quarantine: None,
    };
    let start = Instant::now();
    assert!(!hub.strike(&vendor, "function_scan", start, &containment));
    assert!(!hub.strike(&vendor, "unit_scan", start, &containment));
    assert!(!hub.strike(&vendor, "denial_burst", start, &containment));
    let later = start + Duration::from_secs(60);
    // The first two strikes have left the window.
    assert!(!hub.strike(&vendor, "denial_burst", later, &containment));
    assert!(!hub.strike(&vendor, "denial_burst", later, &containment));
    assert!(hub.strike(&vendor, "function_scan", later, &containment));
    assert!(!hub.strike(&vendor, "function_scan", later, &containment));
}
