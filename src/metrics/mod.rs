//! Prometheus metrics: the registry of every `sluice_` metric, the handles
//! that the request path updates without locks, and the HTTP endpoint that
//! serves them in the OpenMetrics text format with health and readiness
//! checks. `docs/metrics.md` lists the metrics.
//!
//! Label values come only from the configuration (listener, vendor, device,
//! state and collector names) and from the fixed tables in `labels`, so a
//! client cannot add series.

mod histogram;
mod http;
mod instruments;
mod labels;
mod mirror;
mod opcua;
#[cfg(test)]
mod tests;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

pub use http::{serve, serve_with_limits, HttpLimits, Readiness};
pub use instruments::{
    CollectorMetrics, ConfiguredNames, Instruments, SessionGuard, UpstreamMetrics,
};
pub use labels::{RejectReason, TlsOutcome, ANOMALY_KINDS};
pub use mirror::{MirrorBlockAge, MirrorFamilies, MirrorRead, MirrorReadCounters};
pub use opcua::OpcuaFamilies;

use instruments::Families;
use labels::{
    anomaly_slot, CollectorLabels, DeviceLabels, ExpiryLabels, KindLabels, OutcomeLabels,
    SessionLabels, StateLabels, VersionLabels, RELOAD_OUTCOMES,
};

/// Content type of `encode`'s output, as OpenMetrics 1.0.0 defines it.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

type FloatGauge = Gauge<f64, AtomicU64>;

/// The registry of all sluice metrics and the metrics that do not depend on
/// the configuration. Shared as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    families: Families,
    anomalies: [Counter; ANOMALY_KINDS.len()],
    audit_records: Counter,
    audit_seals: Counter,
    audit_write_errors: Counter,
    audit_writable: Gauge,
    reloads: [Counter; RELOAD_OUTCOMES.len()],
    last_reload_success: FloatGauge,
    events_queue_depth: Gauge,
    mirror: MirrorFamilies,
    opcua: OpcuaFamilies,
    tls_expiry: Family<ExpiryLabels, Gauge>,
    /// The handles of the latest configuration; the lock serialises
    /// `configure` calls and is never taken on the request path.
    current: Mutex<Option<Arc<Instruments>>>,
}

impl Metrics {
    /// Creates the registry with every metric registered. Series that need
    /// configured names appear after the first `configure`.
    pub fn new(version: &str) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("sluice");
        let families = Families::default();
        register_families(&mut registry, &families);

        let anomaly_family = Family::<KindLabels, Counter>::default();
        let anomalies =
            ANOMALY_KINDS.map(|kind| anomaly_family.get_or_create_owned(&KindLabels { kind }));
        registry.register("anomalies", "Anomalies raised, by kind", anomaly_family);

        let audit_records = Counter::default();
        let audit_seals = Counter::default();
        let audit_write_errors = Counter::default();
        let audit_writable = Gauge::default();
        registry.register(
            "audit_records",
            "Records appended to the audit log",
            audit_records.clone(),
        );
        registry.register(
            "audit_seals",
            "Seal records appended to the audit log",
            audit_seals.clone(),
        );
        registry.register(
            "audit_write_errors",
            "Failed writes to the audit log",
            audit_write_errors.clone(),
        );
        registry.register(
            "audit_writable",
            "1 while the audit log can be written, else 0 (writes are then denied)",
            audit_writable.clone(),
        );

        let reload_family = Family::<OutcomeLabels, Counter>::default();
        let reloads = RELOAD_OUTCOMES
            .map(|outcome| reload_family.get_or_create_owned(&OutcomeLabels { outcome }));
        registry.register(
            "config_reloads",
            "Configuration reloads, by outcome",
            reload_family,
        );
        let last_reload_success = FloatGauge::default();
        registry.register_with_unit(
            "config_last_reload_success_timestamp",
            "Unix time at which the configuration in force was loaded",
            Unit::Seconds,
            last_reload_success.clone(),
        );

        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: version.to_owned(),
            })
            .set(1);
        registry.register(
            "build_info",
            "Version of the running sluice, value 1",
            build_info,
        );

        let events_queue_depth = Gauge::default();
        registry.register(
            "events_queue_depth",
            "Events waiting for the audit writer and the collectors",
            events_queue_depth.clone(),
        );

        let mirror = MirrorFamilies::default();
        mirror.register(&mut registry);
        let opcua = OpcuaFamilies::default();
        opcua.register(&mut registry);
        let tls_expiry = Family::<ExpiryLabels, Gauge>::default();
        registry.register_with_unit(
            "tls_expiry_timestamp",
            "Unix time at which a listener's server certificate, client CA certificate or CRL (its next update) expires",
            Unit::Seconds,
            tls_expiry.clone(),
        );

        Arc::new(Metrics {
            tls_expiry,
            registry,
            families,
            anomalies,
            audit_records,
            audit_seals,
            audit_write_errors,
            audit_writable,
            reloads,
            last_reload_success,
            events_queue_depth,
            mirror,
            opcua,
            current: Mutex::new(None),
        })
    }

    /// Creates the handles for a loaded configuration, at start and after each
    /// successful reload, and sets the last successful reload time to now.
    /// Gauges of names the new configuration no longer has are removed, so
    /// they stop reporting stale values; counters keep their series.
    pub fn configure(&self, names: ConfiguredNames) -> Arc<Instruments> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let instruments = Arc::new(Instruments::new(self.families.clone(), names));
        if let Some(previous) = current.as_ref() {
            self.remove_stale_gauges(previous.names(), instruments.names());
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64());
        self.last_reload_success.set(now);
        *current = Some(instruments.clone());
        instruments
    }

    /// Returns the mirror's metric families.
    pub fn mirror(&self) -> &MirrorFamilies {
        &self.mirror
    }

    /// Returns the OPC UA metric families.
    pub fn opcua(&self) -> &OpcuaFamilies {
        &self.opcua
    }

    /// Returns the handles from the latest `configure`, if any.
    pub fn instruments(&self) -> Option<Arc<Instruments>> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn remove_stale_gauges(&self, previous: &ConfiguredNames, next: &ConfiguredNames) {
        for device in removed(&previous.devices, &next.devices) {
            self.families.upstream_up.remove(&DeviceLabels { device });
        }
        for state in removed(&previous.states, &next.states) {
            let labels = StateLabels { state };
            self.families.state_value.remove(&labels);
            self.families.state_known.remove(&labels);
        }
        for collector in removed(&previous.collectors, &next.collectors) {
            self.families
                .collector_spool_events
                .remove(&CollectorLabels { collector });
        }
        for listener in &previous.listeners {
            for vendor in &previous.vendors {
                if !next.listeners.contains(listener) || !next.vendors.contains(vendor) {
                    self.families.sessions_open.remove(&SessionLabels {
                        listener: listener.clone(),
                        vendor: vendor.clone(),
                    });
                }
            }
        }
    }

    /// Counts an anomaly. A kind not in `ANOMALY_KINDS` is counted as `other`.
    pub fn count_anomaly(&self, kind: &str) {
        self.anomalies[anomaly_slot(kind)].inc();
    }

    /// Counts a record appended to the audit log.
    pub fn count_audit_record(&self) {
        self.audit_records.inc();
    }

    /// Counts a seal record appended to the audit log.
    pub fn count_audit_seal(&self) {
        self.audit_seals.inc();
    }

    /// Counts a failed write to the audit log.
    pub fn count_audit_write_error(&self) {
        self.audit_write_errors.inc();
    }

    /// Sets whether the audit log can be written.
    pub fn set_audit_writable(&self, writable: bool) {
        self.audit_writable.set(i64::from(writable));
    }

    /// Counts a configuration reload. The time of the last success is set by
    /// `configure`.
    pub fn count_reload(&self, success: bool) {
        self.reloads[usize::from(success)].inc();
    }

    /// Replaces every TLS expiry series with `entries`: listener, what
    /// expires, the file and its end of validity in Unix seconds.
    pub fn set_tls_expiry<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a Arc<str>, &'static str, String, i64)>,
    ) {
        self.tls_expiry.clear();
        for (listener, kind, file, unix_seconds) in entries {
            self.tls_expiry
                .get_or_create(&ExpiryLabels {
                    listener: listener.clone(),
                    kind,
                    file,
                })
                .set(unix_seconds);
        }
    }

    /// Sets the number of events waiting to be written or sent.
    pub fn set_events_queue_depth(&self, events: usize) {
        self.events_queue_depth
            .set(i64::try_from(events).unwrap_or(i64::MAX));
    }

    /// Encodes every metric in the OpenMetrics text format, ending with
    /// `# EOF`.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail, so an error here is a bug in
        // the encoder.
        encode(&mut text, &self.registry).expect("encoding metrics into a String");
        text
    }
}

/// Returns the names in `previous` that `next` does not contain.
fn removed(previous: &[Arc<str>], next: &[Arc<str>]) -> Vec<Arc<str>> {
    previous
        .iter()
        .filter(|name| !next.contains(name))
        .cloned()
        .collect()
}

fn register_families(registry: &mut Registry, families: &Families) {
    registry.register(
        "requests",
        "Requests decided, by listener, vendor, device, function and decision",
        families.requests.clone(),
    );
    registry.register_with_unit(
        "request_duration",
        "Time from forwarding a request until the device's response arrived",
        Unit::Seconds,
        families.request_duration.clone(),
    );

    registry.register(
        "upstream_up",
        "1 while the device's pool has a connection to it, else 0",
        families.upstream_up.clone(),
    );
    registry.register(
        "upstream_reconnects",
        "Connection attempts to the device after a reset or failure",
        families.upstream_reconnects.clone(),
    );
    registry.register(
        "upstream_timeouts",
        "Requests that got no device response within the timeout",
        families.upstream_timeouts.clone(),
    );
    registry.register(
        "upstream_exceptions",
        "Exception responses from the device, by exception code",
        families.upstream_exceptions.clone(),
    );
    registry.register(
        "upstream_bad_responses",
        "Device answers that failed the response checks",
        families.upstream_bad_responses.clone(),
    );

    registry.register(
        "sessions_open",
        "Client sessions open, by listener and vendor",
        families.sessions_open.clone(),
    );
    registry.register(
        "sessions_rejected",
        "Connections closed before a session started, by listener and reason",
        families.sessions_rejected.clone(),
    );
    registry.register(
        "tls_handshakes",
        "TLS handshakes, by listener and outcome",
        families.tls_handshakes.clone(),
    );

    registry.register(
        "state_value",
        "Raw value last read for an operational state",
        families.state_value.clone(),
    );
    registry.register(
        "state_known",
        "1 while the operational state's value is current, else 0",
        families.state_known.clone(),
    );

    registry.register(
        "collector_spool_events",
        "Events waiting in the collector's spool",
        families.collector_spool_events.clone(),
    );
    registry.register(
        "collector_delivered",
        "Events the collector acknowledged",
        families.collector_delivered.clone(),
    );
    registry.register(
        "collector_dropped",
        "Events dropped because the collector's spool was full",
        families.collector_dropped.clone(),
    );
}
