//! Metric handles for one configuration: listeners, vendors, devices, states
//! and collectors are addressed by their index in the configuration, and
//! every handle is resolved once so that later updates take no lock.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::histogram::DurationHistogram;
use super::labels::{
    exception_label, exception_slot, function_label, function_slot, CollectorLabels, DeviceLabels,
    ExceptionLabels, ListenerOutcomeLabels, RejectLabels, RejectReason, RequestLabels,
    SessionLabels, StateLabels, TlsOutcome, DECISIONS, EXCEPTION_SLOTS, FUNCTION_SLOTS,
};

/// The names that label values may take, each list in the order of the ids
/// that callers pass (the index in the policy's listeners, vendors, devices,
/// states and collectors).
#[derive(Clone, Debug, Default)]
pub struct ConfiguredNames {
    pub listeners: Vec<Arc<str>>,
    pub vendors: Vec<Arc<str>>,
    pub devices: Vec<Arc<str>>,
    pub states: Vec<Arc<str>>,
    pub collectors: Vec<Arc<str>>,
}

/// The metric families whose label values come from the configuration.
/// Clones share the same series.
#[derive(Clone, Debug, Default)]
pub(crate) struct Families {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<DeviceLabels, DurationHistogram>,
    pub upstream_up: Family<DeviceLabels, Gauge>,
    pub upstream_reconnects: Family<DeviceLabels, Counter>,
    pub upstream_timeouts: Family<DeviceLabels, Counter>,
    pub upstream_exceptions: Family<ExceptionLabels, Counter>,
    pub upstream_bad_responses: Family<DeviceLabels, Counter>,
    pub sessions_open: Family<SessionLabels, Gauge>,
    pub sessions_rejected: Family<RejectLabels, Counter>,
    pub tls_handshakes: Family<ListenerOutcomeLabels, Counter>,
    pub state_value: Family<StateLabels, Gauge>,
    pub state_known: Family<StateLabels, Gauge>,
    pub collector_spool_events: Family<CollectorLabels, Gauge>,
    pub collector_delivered: Family<CollectorLabels, Counter>,
    pub collector_dropped: Family<CollectorLabels, Counter>,
}

/// One counter per function slot and decision, created on first use so that
/// combinations never seen do not show up as zero series.
type RequestRow = [OnceLock<Counter>; FUNCTION_SLOTS * 2];

/// Request counters of one (listener, vendor) pair, one row per device.
type RequestRows = Box<[OnceLock<Box<RequestRow>>]>;

/// Metric handles for one configuration, shared by every task that runs on
/// it. A configuration reload builds a new `Instruments`; series whose names
/// stay the same keep counting across reloads.
#[derive(Debug)]
pub struct Instruments {
    families: Families,
    names: ConfiguredNames,
    /// Indexed by `listener * vendors + vendor`, then by device.
    requests: Box<[OnceLock<RequestRows>]>,
    durations: Box<[DurationHistogram]>,
    /// Indexed by `listener * vendors + vendor`.
    sessions_open: Box<[Gauge]>,
    rejected: Box<[[Counter; RejectReason::ALL.len()]]>,
    tls_handshakes: Box<[[OnceLock<Counter>; TlsOutcome::COUNT]]>,
    upstream: Box<[UpstreamMetrics]>,
    states: Box<[StateGauges]>,
    collectors: Box<[CollectorMetrics]>,
}

#[derive(Debug)]
struct StateGauges {
    value: Gauge,
    known: Gauge,
}

impl Instruments {
    /// Creates the handles for `names`, creating every series whose label
    /// values are all known now: per device, per state, per collector, per
    /// (listener, vendor) pair and per (listener, reject reason) pair.
    pub(crate) fn new(families: Families, names: ConfiguredNames) -> Instruments {
        let pairs = names.listeners.len() * names.vendors.len();
        let requests = (0..pairs).map(|_| OnceLock::new()).collect();
        let durations = names
            .devices
            .iter()
            .map(|device| {
                families
                    .request_duration
                    .get_or_create_owned(&DeviceLabels {
                        device: device.clone(),
                    })
            })
            .collect();
        let sessions_open = names
            .listeners
            .iter()
            .flat_map(|listener| {
                names.vendors.iter().map(|vendor| SessionLabels {
                    listener: listener.clone(),
                    vendor: vendor.clone(),
                })
            })
            .map(|labels| families.sessions_open.get_or_create_owned(&labels))
            .collect();
        let rejected = names
            .listeners
            .iter()
            .map(|listener| {
                RejectReason::ALL.map(|reason| {
                    families
                        .sessions_rejected
                        .get_or_create_owned(&RejectLabels {
                            listener: listener.clone(),
                            reason: reason.as_str(),
                        })
                })
            })
            .collect();
        let tls_handshakes = names
            .listeners
            .iter()
            .map(|_| std::array::from_fn(|_| OnceLock::new()))
            .collect();
        let upstream = names
            .devices
            .iter()
            .map(|device| UpstreamMetrics::new(&families, device))
            .collect();
        let states = names
            .states
            .iter()
            .map(|state| {
                let labels = StateLabels {
                    state: state.clone(),
                };
                StateGauges {
                    value: families.state_value.get_or_create_owned(&labels),
                    known: families.state_known.get_or_create_owned(&labels),
                }
            })
            .collect();
        let collectors = names
            .collectors
            .iter()
            .map(|collector| CollectorMetrics::new(&families, collector))
            .collect();

        Instruments {
            families,
            names,
            requests,
            durations,
            sessions_open,
            rejected,
            tls_handshakes,
            upstream,
            states,
            collectors,
        }
    }

    /// Returns the names these handles were created for.
    pub fn names(&self) -> &ConfiguredNames {
        &self.names
    }

    /// Counts one decided request and, for a forwarded request, observes the
    /// time until the device's response arrived. A function code outside the
    /// specification's public codes is labelled `other`. Ids outside the
    /// configuration are ignored.
    pub fn record_request(
        &self,
        listener: usize,
        vendor: usize,
        device: usize,
        function: u8,
        allowed: bool,
        duration: Option<Duration>,
    ) {
        if let Some(counter) = self.request_counter(listener, vendor, device, function, allowed) {
            counter.inc();
        }
        if let (Some(duration), Some(histogram)) = (duration, self.durations.get(device)) {
            histogram.observe(duration);
        }
    }

    fn request_counter(
        &self,
        listener: usize,
        vendor: usize,
        device: usize,
        function: u8,
        allowed: bool,
    ) -> Option<&Counter> {
        if listener >= self.names.listeners.len()
            || vendor >= self.names.vendors.len()
            || device >= self.names.devices.len()
        {
            return None;
        }

        let rows = self.requests[listener * self.names.vendors.len() + vendor].get_or_init(|| {
            (0..self.names.devices.len())
                .map(|_| OnceLock::new())
                .collect()
        });
        let row = rows[device].get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())));
        let function_slot = function_slot(function);
        let slot = function_slot * 2 + usize::from(allowed);
        let counter = row[slot].get_or_init(|| {
            self.families.requests.get_or_create_owned(&RequestLabels {
                listener: self.names.listeners[listener].clone(),
                vendor: self.names.vendors[vendor].clone(),
                device: self.names.devices[device].clone(),
                function: function_label(function_slot),
                decision: DECISIONS[usize::from(allowed)],
            })
        });
        Some(counter)
    }

    /// Counts an open session of `vendor` on `listener` until the returned
    /// guard is dropped. Ids outside the configuration give a guard that
    /// counts nothing.
    pub fn open_session(&self, listener: usize, vendor: usize) -> SessionGuard {
        let gauge = if listener < self.names.listeners.len() && vendor < self.names.vendors.len() {
            self.sessions_open
                .get(listener * self.names.vendors.len() + vendor)
        } else {
            None
        };
        if let Some(gauge) = gauge {
            gauge.inc();
        }
        SessionGuard {
            gauge: gauge.cloned(),
        }
    }

    /// Counts a connection that `listener` closed before a session started.
    pub fn count_session_rejected(&self, listener: usize, reason: RejectReason) {
        if let Some(counters) = self.rejected.get(listener) {
            let slot = RejectReason::ALL
                .iter()
                .position(|known| *known == reason)
                .unwrap_or_default();
            counters[slot].inc();
        }
    }

    /// Counts a TLS handshake on `listener`.
    pub fn count_tls_handshake(&self, listener: usize, outcome: TlsOutcome) {
        let Some(counters) = self.tls_handshakes.get(listener) else {
            return;
        };
        let counter = counters[outcome.slot()].get_or_init(|| {
            self.families
                .tls_handshakes
                .get_or_create_owned(&ListenerOutcomeLabels {
                    listener: self.names.listeners[listener].clone(),
                    outcome: outcome.as_str(),
                })
        });
        counter.inc();
    }

    /// Returns the handles of one device's upstream pool. An id outside the
    /// configuration gives handles that are in no registry.
    pub fn upstream(&self, device: usize) -> UpstreamMetrics {
        self.upstream
            .get(device)
            .cloned()
            .unwrap_or_else(UpstreamMetrics::detached)
    }

    /// Records the raw value of an operational state, or `None` when it
    /// cannot be read. While unknown, `sluice_state_value` keeps the last
    /// value read and `sluice_state_known` is 0.
    pub fn set_state(&self, state: usize, raw: Option<u16>) {
        let Some(gauges) = self.states.get(state) else {
            return;
        };
        match raw {
            Some(raw) => {
                gauges.value.set(i64::from(raw));
                gauges.known.set(1);
            }
            None => {
                gauges.known.set(0);
            }
        }
    }

    /// Returns the handles of one collector. An id outside the
    /// configuration gives handles that are in no registry.
    pub fn collector(&self, collector: usize) -> CollectorMetrics {
        self.collectors
            .get(collector)
            .cloned()
            .unwrap_or_else(CollectorMetrics::detached)
    }
}

/// An open session, counted in `sluice_sessions_open` until dropped.
#[derive(Debug)]
pub struct SessionGuard {
    gauge: Option<Gauge>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Some(gauge) = &self.gauge {
            gauge.dec();
        }
    }
}

/// Handles for one device's upstream pool. Clones share the same series.
#[derive(Clone, Debug)]
pub struct UpstreamMetrics {
    up: Gauge,
    reconnects: Counter,
    timeouts: Counter,
    bad_responses: Counter,
    exceptions: Option<Arc<ExceptionCounters>>,
}

#[derive(Debug)]
struct ExceptionCounters {
    family: Family<ExceptionLabels, Counter>,
    device: Arc<str>,
    counters: [OnceLock<Counter>; EXCEPTION_SLOTS],
}

impl UpstreamMetrics {
    fn new(families: &Families, device: &Arc<str>) -> UpstreamMetrics {
        let labels = DeviceLabels {
            device: device.clone(),
        };
        UpstreamMetrics {
            up: families.upstream_up.get_or_create_owned(&labels),
            reconnects: families.upstream_reconnects.get_or_create_owned(&labels),
            timeouts: families.upstream_timeouts.get_or_create_owned(&labels),
            bad_responses: families.upstream_bad_responses.get_or_create_owned(&labels),
            exceptions: Some(Arc::new(ExceptionCounters {
                family: families.upstream_exceptions.clone(),
                device: device.clone(),
                counters: std::array::from_fn(|_| OnceLock::new()),
            })),
        }
    }

    fn detached() -> UpstreamMetrics {
        UpstreamMetrics {
            up: Gauge::default(),
            reconnects: Counter::default(),
            timeouts: Counter::default(),
            bad_responses: Counter::default(),
            exceptions: None,
        }
    }

    /// Sets whether the pool has a connection to the device.
    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    /// Counts a connection attempt that follows a reset or a failure.
    pub fn count_reconnect(&self) {
        self.reconnects.inc();
    }

    /// Counts a request that got no device response within the timeout.
    pub fn count_timeout(&self) {
        self.timeouts.inc();
    }

    /// Counts a device response that failed the response checks.
    pub fn count_bad_response(&self) {
        self.bad_responses.inc();
    }

    /// Counts an exception response of the device. Codes outside 0x01 to
    /// 0x0B are labelled `other`.
    pub fn count_exception(&self, code: u8) {
        let Some(exceptions) = &self.exceptions else {
            return;
        };
        let slot = exception_slot(code);
        let counter = exceptions.counters[slot].get_or_init(|| {
            exceptions.family.get_or_create_owned(&ExceptionLabels {
                device: exceptions.device.clone(),
                code: exception_label(slot),
            })
        });
        counter.inc();
    }
}

/// Handles for one collector. Clones share the same series.
#[derive(Clone, Debug)]
pub struct CollectorMetrics {
    spool_events: Gauge,
    delivered: Counter,
    dropped: Counter,
}

impl CollectorMetrics {
    fn new(families: &Families, collector: &Arc<str>) -> CollectorMetrics {
        let labels = CollectorLabels {
            collector: collector.clone(),
        };
        CollectorMetrics {
            spool_events: families.collector_spool_events.get_or_create_owned(&labels),
            delivered: families.collector_delivered.get_or_create_owned(&labels),
            dropped: families.collector_dropped.get_or_create_owned(&labels),
        }
    }

    fn detached() -> CollectorMetrics {
        CollectorMetrics {
            spool_events: Gauge::default(),
            delivered: Counter::default(),
            dropped: Counter::default(),
        }
    }

    /// Sets the number of events waiting in the spool.
    pub fn set_spool_events(&self, events: u64) {
        self.spool_events
            .set(i64::try_from(events).unwrap_or(i64::MAX));
    }

    /// Counts events the collector acknowledged.
    pub fn count_delivered(&self, events: u64) {
        self.delivered.inc_by(events);
    }

    /// Counts events the spool dropped because it was full.
    pub fn count_dropped(&self, events: u64) {
        self.dropped.inc_by(events);
    }
}
