//! The anomaly detection settings: the `[detect]` thresholds of
//! `gateway.toml` and the `[vendor.on_anomaly]` containment of a rule file,
//! checked into plain values. Every key is optional and has a default.

use std::time::Duration;

use toml::Spanned;

use super::gateway::Checker;
use super::raw;

/// Anomaly kinds that `[vendor.on_anomaly] kinds` may name: the kinds the
/// detectors raise for a vendor's own traffic.
pub const CONTAINABLE_KINDS: [&str; 9] = [
    "function_scan",
    "unit_scan",
    "address_sweep",
    "denial_burst",
    "rate_limited",
    "dangerous_function",
    "gated_write_denied",
    "new_source",
    "browse_sweep",
];

/// Largest window or quarantine accepted: one week, in milliseconds.
const MAX_WINDOW_MS: i64 = 7 * 86_400_000;
/// Largest threshold accepted.
const MAX_THRESHOLD: i64 = 1_000_000;

/// How many events of one kind within `window` raise an anomaly: more than
/// `limit` do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold {
    pub limit: u32,
    pub window: Duration,
}

/// The thresholds of the anomaly detectors, from `[detect]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetectConfig {
    /// Distinct function codes of one session.
    pub function_scan: Threshold,
    /// Distinct unit ids of one session.
    pub unit_scan: Threshold,
    /// Distinct 100-register blocks read by one session.
    pub address_sweep: Threshold,
    /// Denied requests of one session, Modbus or OPC UA.
    pub denial_burst: Threshold,
    /// Failed OPC UA authentications of one listener.
    pub auth_failure_burst: Threshold,
    /// Distinct nodes browsed by one OPC UA session.
    pub browse_sweep: Threshold,
    /// Exception responses of one device.
    pub exception_storm: Threshold,
    /// At most one `rate_limited` per session, and one `device_unreachable`
    /// or `device_timeout` per device, within this window.
    pub repeat_window: Duration,
}

/// The default window of every detector.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

impl Default for DetectConfig {
    fn default() -> Self {
        let threshold = |limit| Threshold {
            limit,
            window: DEFAULT_WINDOW,
        };
        DetectConfig {
            function_scan: threshold(8),
            unit_scan: threshold(8),
            address_sweep: threshold(20),
            denial_burst: threshold(20),
            auth_failure_burst: threshold(5),
            browse_sweep: threshold(200),
            exception_storm: threshold(20),
            repeat_window: DEFAULT_WINDOW,
        }
    }
}

/// The containment of a vendor that raises anomalies, from `[vendor.on_anomaly]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnAnomalyConfig {
    /// Kinds that count, from `CONTAINABLE_KINDS`.
    pub kinds: Vec<&'static str>,
    /// Anomalies of those kinds within `window` that quarantine the vendor.
    pub count: u32,
    pub window: Duration,
    /// Length of the quarantine. `None` lasts until released.
    pub quarantine: Option<Duration>,
}

/// The detection settings of a whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detection {
    pub detect: DetectConfig,
    /// Vendor name and its containment, for vendors that set one.
    pub on_anomaly: Vec<(String, OnAnomalyConfig)>,
}

impl Checker<'_> {
    /// Checks the `[detect]` section. Missing keys take their defaults.
    pub(super) fn detect(&mut self, section: Option<&raw::DetectSection>) -> DetectConfig {
        let defaults = DetectConfig::default();
        let Some(section) = section else {
            return defaults;
        };
        let window = self.window(
            "detect.window_ms",
            section.window_ms.as_ref(),
            DEFAULT_WINDOW,
        );
        let mut threshold = |key: &str, value: Option<&Spanned<i64>>, default: Threshold| {
            let limit = self
                .integer(key, value, i64::from(default.limit), (1, MAX_THRESHOLD))
                .map_or(default.limit, |n| n as u32);
            Threshold { limit, window }
        };
        DetectConfig {
            function_scan: threshold(
                "detect.function_scan",
                section.function_scan.as_ref(),
                defaults.function_scan,
            ),
            unit_scan: threshold(
                "detect.unit_scan",
                section.unit_scan.as_ref(),
                defaults.unit_scan,
            ),
            address_sweep: threshold(
                "detect.address_sweep",
                section.address_sweep.as_ref(),
                defaults.address_sweep,
            ),
            denial_burst: threshold(
                "detect.denial_burst",
                section.denial_burst.as_ref(),
                defaults.denial_burst,
            ),
            auth_failure_burst: threshold(
                "detect.auth_failure_burst",
                section.auth_failure_burst.as_ref(),
                defaults.auth_failure_burst,
            ),
            browse_sweep: threshold(
                "detect.browse_sweep",
                section.browse_sweep.as_ref(),
                defaults.browse_sweep,
            ),
            exception_storm: threshold(
                "detect.exception_storm",
                section.exception_storm.as_ref(),
                defaults.exception_storm,
            ),
            repeat_window: window,
        }
    }

    /// Checks a `[vendor.on_anomaly]` table, returning `None` when a value is invalid.
    pub(super) fn on_anomaly(
        &mut self,
        section: &raw::OnAnomalySection,
    ) -> Option<OnAnomalyConfig> {
        let mut valid = true;
        let mut kinds = Vec::new();
        for kind in &section.kinds {
            match CONTAINABLE_KINDS
                .iter()
                .find(|known| **known == kind.get_ref())
            {
                Some(known) if !kinds.contains(known) => kinds.push(*known),
                Some(_) => {}
                None => {
                    valid = false;
                    self.error(
                        kind,
                        format!(
                            "vendor.on_anomaly.kinds: unknown kind \"{}\"; use one of {}",
                            kind.get_ref(),
                            CONTAINABLE_KINDS.join(", ")
                        ),
                    );
                }
            }
        }
        let count = self
            .integer(
                "vendor.on_anomaly.count",
                section.count.as_ref(),
                1,
                (1, MAX_THRESHOLD),
            )
            .map(|n| n as u32);
        let window = self.window(
            "vendor.on_anomaly.window_ms",
            section.window_ms.as_ref(),
            Duration::from_secs(60),
        );
        let quarantine = section.quarantine_ms.as_ref().map(|value| {
            self.window(
                "vendor.on_anomaly.quarantine_ms",
                Some(value),
                DEFAULT_WINDOW,
            )
        });
        Some(OnAnomalyConfig {
            kinds,
            count: count.filter(|_| valid)?,
            window,
            quarantine,
        })
    }

    fn window(&mut self, key: &str, value: Option<&Spanned<i64>>, default: Duration) -> Duration {
        let default_ms = default.as_millis() as i64;
        let number = self.integer(key, value, default_ms, (1, MAX_WINDOW_MS));
        Duration::from_millis(number.unwrap_or(default_ms) as u64)
    }
}
