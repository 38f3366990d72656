//! Anomaly detectors over the traffic of sessions, devices and vendors, and
//! the containment that quarantines a vendor raising too many of them.
//!
//! Per-session state is a small plain struct each session owns, so the
//! request path takes no lock. Device and vendor state sit in a `Hub`
//! behind short mutexes, taken only when a device responds with an
//! exception or fails, when a vendor connects, or when an anomaly counts
//! towards containment.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::{DetectConfig, OnAnomalyConfig, Threshold};
use crate::events::Severity;
use crate::policy::{Condition, DenyReason};

mod opcua;
#[cfg(test)]
mod tests;

pub use opcua::{OpcuaDetector, UaOperation, MAX_TRACKED_SESSIONS};

/// Source addresses remembered per vendor. When the set is full, the oldest
/// address is dropped.
pub const MAX_SOURCES_PER_VENDOR: usize = 64;
/// Registers per block that the address sweep detector counts.
pub const SWEEP_BLOCK: u32 = 100;
/// Words of a bit set over the 656 blocks of the 65536 addresses.
const BLOCK_WORDS: usize = 11;

/// Diagnostics (FC 8) sub-functions that take a device off the bus or
/// restart its communications.
const RESTART_COMMUNICATIONS: u16 = 1;
const FORCE_LISTEN_ONLY: u16 = 4;
const DIAGNOSTICS: u8 = 8;
/// Gateway exceptions 0x0A and 0x0B.
const PATH_UNAVAILABLE: u8 = 0x0A;
const TARGET_FAILED: u8 = 0x0B;

/// One anomaly a detector raised, to be recorded as an anomaly event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: &'static str,
    pub severity: Severity,
    pub detail: String,
}

impl Finding {
    fn new(kind: &'static str, severity: Severity, detail: String) -> Finding {
        Finding {
            kind,
            severity,
            detail,
        }
    }
}

/// A window that starts with the first event after the previous one
/// ended, so a burst is always measured from its own start.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    started: Option<Instant>,
    /// True once the window raised its anomaly: one per window.
    raised: bool,
}

impl Window {
    /// Returns true when `now` starts a new window.
    fn roll(&mut self, now: Instant, length: Duration) -> bool {
        let expired = self
            .started
            .is_none_or(|started| now.saturating_duration_since(started) >= length);
        if expired {
            self.started = Some(now);
            self.raised = false;
        }
        expired
    }

    /// Returns true the first time `count` exceeds the limit in this window.
    fn exceeds(&mut self, count: u32, limit: u32) -> bool {
        if self.raised || count <= limit {
            return false;
        }
        self.raised = true;
        true
    }
}

/// Distinct small values seen within a window, as a bit set.
#[derive(Debug, Clone, Copy)]
struct Distinct<const WORDS: usize> {
    window: Window,
    bits: [u64; WORDS],
    count: u32,
}

impl<const WORDS: usize> Default for Distinct<WORDS> {
    fn default() -> Self {
        Distinct {
            window: Window::default(),
            bits: [0; WORDS],
            count: 0,
        }
    }
}

impl<const WORDS: usize> Distinct<WORDS> {
    /// Starts a new window when the current one has ended.
    fn roll(&mut self, now: Instant, threshold: &Threshold) {
        if self.window.roll(now, threshold.window) {
            self.bits = [0; WORDS];
            self.count = 0;
        }
    }

    /// Adds `value`; returns the distinct count when it first exceeds the
    /// limit within the window.
    fn add(&mut self, value: usize, threshold: &Threshold) -> Option<u32> {
        let (word, bit) = (value / 64, 1u64 << (value % 64));
        if self.bits[word] & bit == 0 {
            self.bits[word] |= bit;
            self.count += 1;
        }
        self.window
            .exceeds(self.count, threshold.limit)
            .then_some(self.count)
    }
}

/// Events counted within a window.
#[derive(Debug, Clone, Copy, Default)]
struct Counter {
    window: Window,
    count: u32,
}

impl Counter {
    /// Counts one event; returns the count when it first exceeds the limit
    /// within the window.
    fn add(&mut self, now: Instant, threshold: &Threshold) -> Option<u32> {
        if self.window.roll(now, threshold.window) {
            self.count = 0;
        }
        self.count += 1;
        self.window
            .exceeds(self.count, threshold.limit)
            .then_some(self.count)
    }
}

/// The read part of a request, for the address sweep detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    pub address: u16,
    pub quantity: u16,
}

/// A request as the session detectors observe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub unit: u8,
    pub function: u8,
    /// FC 8 sub-function.
    pub sub_function: Option<u16>,
    /// The specification defines no request of this function code.
    pub undefined: bool,
    pub write: bool,
    pub read: Option<Read>,
}

/// The detectors of one session. Owned by the session, so no lock.
#[derive(Debug, Clone, Default)]
pub struct SessionDetector {
    functions: Distinct<4>,
    units: Distinct<4>,
    blocks: Distinct<BLOCK_WORDS>,
    denials: Counter,
    rate_limited: Window,
}

impl SessionDetector {
    pub fn new() -> SessionDetector {
        SessionDetector::default()
    }

    /// Observes one request, decided or not, and pushes what it raises to `out`.
    pub fn request(
        &mut self,
        now: Instant,
        request: &Observed,
        config: &DetectConfig,
        out: &mut Vec<Finding>,
    ) {
        self.function(now, request.function, config, out);
        self.units.roll(now, &config.unit_scan);
        if let Some(count) = self.units.add(usize::from(request.unit), &config.unit_scan) {
            out.push(Finding::new(
                "unit_scan",
                Severity::Medium,
                format!(
                    "{count} distinct unit ids within {} ms",
                    config.unit_scan.window.as_millis()
                ),
            ));
        }
        if let Some(read) = request.read.filter(|read| read.quantity > 0) {
            self.blocks.roll(now, &config.address_sweep);
            let first = u32::from(read.address) / SWEEP_BLOCK;
            let last =
                (u32::from(read.address) + u32::from(read.quantity) - 1).min(65_535) / SWEEP_BLOCK;
            for block in first..=last {
                if let Some(count) = self.blocks.add(block as usize, &config.address_sweep) {
                    out.push(Finding::new(
                        "address_sweep",
                        Severity::Medium,
                        format!(
                            "reads covered {count} distinct {SWEEP_BLOCK}-register blocks within {} ms",
                            config.address_sweep.window.as_millis()
                        ),
                    ));
                }
            }
        }
        if let Some(finding) = dangerous(request) {
            out.push(finding);
        }
    }

    /// Observes the function code of a request, including one that failed
    /// to parse, because a scanner's probes often fail.
    pub fn function(
        &mut self,
        now: Instant,
        function: u8,
        config: &DetectConfig,
        out: &mut Vec<Finding>,
    ) {
        self.functions.roll(now, &config.function_scan);
        if let Some(count) = self
            .functions
            .add(usize::from(function), &config.function_scan)
        {
            out.push(Finding::new(
                "function_scan",
                Severity::High,
                format!(
                    "{count} distinct function codes within {} ms",
                    config.function_scan.window.as_millis()
                ),
            ));
        }
    }

    /// Observes one denied request.
    pub fn denial(
        &mut self,
        now: Instant,
        reason: Option<&DenyReason>,
        write: bool,
        config: &DetectConfig,
        out: &mut Vec<Finding>,
    ) {
        if let Some(count) = self.denials.add(now, &config.denial_burst) {
            out.push(Finding::new(
                "denial_burst",
                Severity::Medium,
                format!(
                    "{count} denied requests within {} ms",
                    config.denial_burst.window.as_millis()
                ),
            ));
        }
        match reason {
            Some(DenyReason::RateLimited { .. }) => {
                self.rate_limited.roll(now, config.repeat_window);
                if self.rate_limited.exceeds(1, 0) {
                    out.push(Finding::new(
                        "rate_limited",
                        Severity::Low,
                        format!("request denied by a rate limit: {}", reason_text(reason)),
                    ));
                }
            }
            Some(
                DenyReason::StateUnknown { .. }
                | DenyReason::ConditionFailed {
                    condition: Condition::State { .. } | Condition::Schedule | Condition::Window,
                },
            ) if write => {
                out.push(Finding::new(
                    "gated_write_denied",
                    Severity::Medium,
                    format!("write denied: {}", reason_text(reason)),
                ));
            }
            _ => {}
        }
    }
}

fn reason_text(reason: Option<&DenyReason>) -> String {
    reason.map(ToString::to_string).unwrap_or_default()
}

/// Returns the finding for a request that can stop or disturb a device,
/// whether it is allowed or denied.
pub fn dangerous(request: &Observed) -> Option<Finding> {
    let detail = match (request.function, request.sub_function) {
        (DIAGNOSTICS, Some(FORCE_LISTEN_ONLY)) => {
            "diagnostics sub-function 4: force listen only mode".to_owned()
        }
        (DIAGNOSTICS, Some(RESTART_COMMUNICATIONS)) => {
            "diagnostics sub-function 1: restart communications".to_owned()
        }
        (function, _) if request.undefined => {
            format!("function code {function} that the specification does not define")
        }
        (function, _) if request.write && request.unit == 0 => {
            format!("broadcast write (function code {function}) to unit 0")
        }
        _ => return None,
    };
    Some(Finding::new("dangerous_function", Severity::High, detail))
}

/// A forwarded request that got no normal response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The device responded with this exception code.
    Exception(u8),
    /// The gateway responded for the device with 0x0A or 0x0B.
    Gateway(u8),
}

#[derive(Debug, Default)]
struct DeviceState {
    unreachable: Window,
    timeout: Window,
    exceptions: Counter,
}

#[derive(Debug, Default)]
struct VendorState {
    sources: VecDeque<IpAddr>,
    strikes: VecDeque<Instant>,
}

/// Device and vendor state shared by every session.
#[derive(Debug, Default)]
pub struct Hub {
    devices: Mutex<HashMap<Arc<str>, DeviceState>>,
    vendors: Mutex<HashMap<Arc<str>, VendorState>>,
}

/// Recovers the guard of a poisoned mutex: every update leaves the state
/// consistent, so a panic elsewhere does not invalidate it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    /// Observes a failed request to `device` and pushes what it raises.
    pub fn failure(
        &self,
        device: &Arc<str>,
        now: Instant,
        failure: Failure,
        config: &DetectConfig,
        out: &mut Vec<Finding>,
    ) {
        let mut devices = lock(&self.devices);
        let state = devices.entry(device.clone()).or_default();
        let code = match failure {
            Failure::Exception(code) => {
                if let Some(count) = state.exceptions.add(now, &config.exception_storm) {
                    out.push(Finding::new(
                        "exception_storm",
                        Severity::Medium,
                        format!(
                            "device {device} sent {count} exception responses within {} ms",
                            config.exception_storm.window.as_millis()
                        ),
                    ));
                }
                code
            }
            Failure::Gateway(code) => code,
        };
        let (window, kind, severity, what) = match code {
            PATH_UNAVAILABLE => (
                &mut state.unreachable,
                "device_unreachable",
                Severity::High,
                "gateway path unavailable (0x0A)",
            ),
            TARGET_FAILED => (
                &mut state.timeout,
                "device_timeout",
                Severity::Medium,
                "target device failed to respond (0x0B)",
            ),
            _ => return,
        };
        window.roll(now, config.repeat_window);
        if window.exceeds(1, 0) {
            out.push(Finding::new(
                kind,
                severity,
                format!("device {device}: {what}"),
            ));
        }
    }

    /// Observes a connection of `vendor` from `source`. The first
    /// connection of a vendor sets its baseline; a later source not seen
    /// before raises `new_source`.
    pub fn connection(&self, vendor: &Arc<str>, source: IpAddr) -> Option<Finding> {
        let mut vendors = lock(&self.vendors);
        let state = vendors.entry(vendor.clone()).or_default();
        if state.sources.contains(&source) {
            return None;
        }
        let baseline = state.sources.is_empty();
        if state.sources.len() == MAX_SOURCES_PER_VENDOR {
            state.sources.pop_front();
        }
        state.sources.push_back(source);
        (!baseline).then(|| {
            Finding::new(
                "new_source",
                Severity::Medium,
                format!("vendor {vendor} connected from {source}, not seen before"),
            )
        })
    }

    /// Counts an anomaly of `kind` against the vendor's containment and
    /// returns true when the vendor must be quarantined now.
    pub fn strike(
        &self,
        vendor: &Arc<str>,
        kind: &str,
        now: Instant,
        containment: &OnAnomalyConfig,
    ) -> bool {
        if !containment.kinds.contains(&kind) {
            return false;
        }
        let mut vendors = lock(&self.vendors);
        let strikes = &mut vendors.entry(vendor.clone()).or_default().strikes;
        while strikes
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= containment.window)
        {
            strikes.pop_front();
        }
        strikes.push_back(now);
        if strikes.len() >= containment.count as usize {
            strikes.clear();
            return true;
        }
        false
    }
}
