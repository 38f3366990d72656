//! Anomaly detectors of one OPC UA listener: failed authentications,
//! bursts of denied operations per session, and browse sweeps (one session
//! browsing many distinct nodes). async-opcua calls the node manager and
//! the authenticator from many tasks, so the state sits behind short
//! mutexes, taken once per operation.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use crate::config::DetectConfig;
use crate::events::Severity;

use super::{lock, Counter, Finding, Window};

/// Sessions whose counters are kept at once. When the map is full, the
/// sessions idle for longer than the detector window are dropped first.
pub const MAX_TRACKED_SESSIONS: usize = 4096;

/// One operation as the session detectors observe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UaOperation<'a> {
    /// The session id async-opcua assigned.
    pub session: u32,
    pub denied: bool,
    /// The node of a Browse operation, as `nsu=URI;s=ID` text.
    pub browsed: Option<&'a str>,
}

/// Distinct browsed nodes of one session within a window. Holds at most
/// one node more than the limit, because the anomaly is raised once per
/// window.
#[derive(Debug, Default)]
struct BrowseSet {
    window: Window,
    nodes: HashSet<String>,
}

#[derive(Debug, Default)]
struct UaSession {
    denials: Counter,
    browsed: BrowseSet,
    last_seen: Option<Instant>,
}

/// The detector state of one OPC UA listener.
#[derive(Debug, Default)]
pub struct OpcuaDetector {
    /// Failed authentications of the listener.
    auth_failures: Mutex<Counter>,
    sessions: Mutex<HashMap<u32, UaSession>>,
}

impl OpcuaDetector {
    pub fn new() -> OpcuaDetector {
        OpcuaDetector::default()
    }

    /// Observes one failed authentication. Raises `opcua_auth_failure` for each,
    /// and `opcua_auth_failure_burst` once per window when the listener's
    /// failures exceed `[detect] auth_failure_burst`.
    // NOTE: async-opcua 0.19 calls the authenticator without the client's
    // address or secure channel, so failures are counted per listener, not
    // per client source.
    pub fn auth_failure(
        &self,
        now: Instant,
        detail: String,
        config: &DetectConfig,
        out: &mut Vec<Finding>,
    ) {
        out.push(Finding::new("opcua_auth_failure", Severity::Medium, detail));
        let count = lock(&self.auth_failures).add(now, &config.auth_failure_burst);
        if let Some(count) = count {
            out.push(Finding::new(
                "opcua_auth_failure_burst",
                Severity::High,
                format!(
                    "{count} failed authentications within {} ms",
                    config.auth_failure_burst.window.as_millis()
                ),
            ));
        }
    }

    /// Observes one decided operation of a session and pushes what it
    /// raises: `denial_burst` as on Modbus sessions, and `browse_sweep`.
    pub fn operation(
        &self,
        now: Instant,
        operation: &UaOperation<'_>,
        config: &DetectConfig,
        out: &mut Vec<Finding>,
    ) {
        let mut sessions = lock(&self.sessions);
        if !sessions.contains_key(&operation.session) && sessions.len() >= MAX_TRACKED_SESSIONS {
            prune(&mut sessions, now, config);
            if sessions.len() >= MAX_TRACKED_SESSIONS {
                return;
            }
        }
        let session = sessions.entry(operation.session).or_default();
        session.last_seen = Some(now);
        if operation.denied {
            if let Some(count) = session.denials.add(now, &config.denial_burst) {
                out.push(Finding::new(
                    "denial_burst",
                    Severity::Medium,
                    format!(
                        "{count} denied operations within {} ms",
                        config.denial_burst.window.as_millis()
                    ),
                ));
            }
        }
        if let Some(node) = operation.browsed {
            if let Some(count) = session.browsed.add(now, node, config) {
                out.push(Finding::new(
                    "browse_sweep",
                    Severity::Medium,
                    format!(
                        "{count} distinct nodes browsed within {} ms",
                        config.browse_sweep.window.as_millis()
                    ),
                ));
            }
        }
    }
}

impl BrowseSet {
    /// Adds a browsed node; returns the distinct count when it first
    /// exceeds the limit within the window.
    fn add(&mut self, now: Instant, node: &str, config: &DetectConfig) -> Option<u32> {
        let threshold = &config.browse_sweep;
        if self.window.roll(now, threshold.window) {
            self.nodes.clear();
        }
        if self.window.raised {
            return None;
        }
        if !self.nodes.contains(node) {
            self.nodes.insert(node.to_owned());
        }
        let count = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
        self.window.exceeds(count, threshold.limit).then_some(count)
    }
}

/// Drops the sessions idle for at least the longest detector window.
fn prune(sessions: &mut HashMap<u32, UaSession>, now: Instant, config: &DetectConfig) {
    let idle = config.denial_burst.window.max(config.browse_sweep.window);
    sessions.retain(|_, session| {
        session
            .last_seen
            .is_some_and(|seen| now.saturating_duration_since(seen) < idle)
    });
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn kinds(findings: &[Finding]) -> Vec<&'static str> {
        findings.iter().map(|finding| finding.kind).collect()
    }

    fn denied(session: u32) -> UaOperation<'static> {
        UaOperation {
            session,
            denied: true,
            browsed: None,
        }
    }

    fn browse(session: u32, node: &str) -> UaOperation<'_> {
        UaOperation {
            session,
            denied: false,
            browsed: Some(node),
        }
    }

    #[test]
    fn auth_failures_raise_burst_past_limit() {
        let config = DetectConfig::default();
        let detector = OpcuaDetector::new();
        let mut out = Vec::new();
        let now = Instant::now();
        for attempt in 1..=5 {
            detector.auth_failure(now, format!("attempt {attempt}"), &config, &mut out);
        }
        assert_eq!(kinds(&out), vec!["opcua_auth_failure"; 5]);
        assert_eq!(out[4].detail, "attempt 5");
        assert_eq!(out[4].severity, Severity::Medium);
        out.clear();
        detector.auth_failure(now, "attempt 6".to_owned(), &config, &mut out);
        assert_eq!(
            kinds(&out),
            vec!["opcua_auth_failure", "opcua_auth_failure_burst"]
        );
        assert_eq!(out[1].detail, "6 failed authentications within 10000 ms");
        assert_eq!(out[1].severity, Severity::High);
        out.clear();
        detector.auth_failure(now, "attempt 7".to_owned(), &config, &mut out);
        assert_eq!(kinds(&out), vec!["opcua_auth_failure"]);
    }

    #[test]
    fn auth_failure_burst_resets_after_window() {
        let config = DetectConfig::default();
        let detector = OpcuaDetector::new();
        let mut out = Vec::new();
        let start = Instant::now();
        for _ in 0..5 {
            detector.auth_failure(start, String::new(), &config, &mut out);
        }
        let later = start + Duration::from_secs(10);
        detector.auth_failure(later, String::new(), &config, &mut out);
        assert_eq!(kinds(&out), vec!["opcua_auth_failure"; 6]);
    }

    #[test]
    fn denial_burst_counts_each_session_apart() {
        let config = DetectConfig::default();
        let detector = OpcuaDetector::new();
        let mut out = Vec::new();
        let now = Instant::now();
        for _ in 0..20 {
            detector.operation(now, &denied(1), &config, &mut out);
            detector.operation(now, &denied(2), &config, &mut out);
        }
        assert_eq!(kinds(&out), Vec::<&str>::new());
        detector.operation(now, &denied(1), &config, &mut out);
        assert_eq!(kinds(&out), vec!["denial_burst"]);
        assert_eq!(out[0].detail, "21 denied operations within 10000 ms");
        for _ in 0..10 {
            detector.operation(now, &denied(1), &config, &mut out);
        }
        assert_eq!(kinds(&out), vec!["denial_burst"]);
    }

    #[test]
    fn allowed_operations_raise_no_denial_burst() {
        let config = DetectConfig::default();
        let detector = OpcuaDetector::new();
        let mut out = Vec::new();
        let allowed = UaOperation {
            session: 1,
            denied: false,
            browsed: None,
        };
        for _ in 0..100 {
            detector.operation(Instant::now(), &allowed, &config, &mut out);
        }
        assert_eq!(kinds(&out), Vec::<&str>::new());
    }

    #[test]
    fn browse_sweep_raises_once_past_distinct_limit() {
        let mut config = DetectConfig::default();
        config.browse_sweep.limit = 3;
        let detector = OpcuaDetector::new();
        let mut out = Vec::new();
        let now = Instant::now();
        for node in ["n1", "n2", "n3", "n1", "n2", "n3"] {
            detector.operation(now, &browse(7, node), &config, &mut out);
        }
        assert_eq!(kinds(&out), Vec::<&str>::new());
        detector.operation(now, &browse(7, "n4"), &config, &mut out);
        assert_eq!(kinds(&out), vec!["browse_sweep"]);
        assert_eq!(out[0].detail, "4 distinct nodes browsed within 10000 ms");
        detector.operation(now, &browse(7, "n5"), &config, &mut out);
        assert_eq!(kinds(&out), vec!["browse_sweep"]);
    }

    #[test]
    fn browse_sweep_starts_again_in_next_window() {
        let mut config = DetectConfig::default();
        config.browse_sweep.limit = 2;
        let detector = OpcuaDetector::new();
        let mut out = Vec::new();
        let start = Instant::now();
        detector.operation(start, &browse(1, "a"), &config, &mut out);
        detector.operation(start, &browse(1, "b"), &config, &mut out);
        let later = start + config.browse_sweep.window;
        detector.operation(later, &browse(1, "c"), &config, &mut out);
        detector.operation(later, &browse(1, "d"), &config, &mut out);
        assert_eq!(kinds(&out), Vec::<&str>::new());
        detector.operation(later, &browse(1, "e"), &config, &mut out);
        assert_eq!(kinds(&out), vec!["browse_sweep"]);
    }

    #[test]
    fn full_session_map_drops_idle_sessions_first() {
        let config = DetectConfig::default();
        let detector = OpcuaDetector::new();
        let mut out = Vec::new();
        let start = Instant::now();
        for session in 0..MAX_TRACKED_SESSIONS as u32 {
            detector.operation(start, &denied(session), &config, &mut out);
        }
        let later = start + config.denial_burst.window;
        let newcomer = MAX_TRACKED_SESSIONS as u32;
        detector.operation(later, &denied(newcomer), &config, &mut out);
        assert_eq!(lock(&detector.sessions).len(), 1);
        assert!(lock(&detector.sessions).contains_key(&newcomer));
    }

    #[test]
    fn full_map_ignores_new_session() {
        let config = DetectConfig::default();
        let detector = OpcuaDetector::new();
        let mut out = Vec::new();
        let now = Instant::now();
        for session in 0..MAX_TRACKED_SESSIONS as u32 {
            detector.operation(now, &denied(session), &config, &mut out);
        }
        let newcomer = MAX_TRACKED_SESSIONS as u32;
        detector.operation(now, &denied(newcomer), &config, &mut out);
        assert_eq!(lock(&detector.sessions).len(), MAX_TRACKED_SESSIONS);
        assert!(!lock(&detector.sessions).contains_key(&newcomer));
    }
}
