//! Decision events of OPC UA operations: one event per operation of a
//! service call, allowed or denied, with the same common fields as Modbus
//! decisions and an `opcua` object; and the anomalies the session
//! detectors raise on those operations.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use opcua::types::StatusCode;

use crate::config::OpcuaService;
use crate::detect::{Finding, OpcuaDetector, UaOperation};
use crate::events::{DecisionKind, Event, EventType, ModbusInfo, OpcuaInfo};
use crate::modbus::generation::Shared;

/// The facts about one operation that its decision event records.
pub struct Operation {
    pub service: OpcuaService,
    pub node_id: Option<String>,
    pub vendor: Option<Arc<str>>,
    /// The async-opcua session id.
    pub session: Option<u32>,
    /// The client's address, when the front has seen its secure channel.
    pub peer: Option<SocketAddr>,
    pub allowed: bool,
    /// False for a denied operation that monitor mode forwarded.
    pub enforced: bool,
    pub rule: Option<String>,
    pub reason: Option<String>,
    /// The status the client received for this operation.
    pub status: StatusCode,
    /// The Modbus request a write to a tag became.
    pub modbus: Option<ModbusInfo>,
    pub detail: Option<serde_json::Value>,
}

impl Operation {
    pub fn new(service: OpcuaService, node_id: Option<String>) -> Operation {
        Operation {
            service,
            node_id,
            vendor: None,
            session: None,
            peer: None,
            allowed: false,
            enforced: true,
            rule: None,
            reason: None,
            status: StatusCode::Good,
            modbus: None,
            detail: None,
        }
    }
}

/// The listener and device an operation ran on, and the listener's
/// detectors.
pub struct Recorder<'a> {
    pub shared: &'a Shared,
    pub listener: &'a Arc<str>,
    pub device: &'a Arc<str>,
    pub detector: &'a OpcuaDetector,
}

impl Recorder<'_> {
    /// Records the decision event of one operation, then the anomalies it
    /// raises, and counts those against the vendor's containment.
    pub async fn finish(&self, operation: Operation) {
        let mut findings = Vec::new();
        if let Some(session) = operation.session {
            let browsed = (operation.service == OpcuaService::Browse)
                .then_some(operation.node_id.as_deref())
                .flatten();
            let observed = UaOperation {
                session,
                denied: !operation.allowed,
                browsed,
            };
            let config = *self.shared.current.load().policy.detect();
            self.detector
                .operation(Instant::now(), &observed, &config, &mut findings);
        }
        let (vendor, session, peer) = (operation.vendor.clone(), operation.session, operation.peer);
        record(self.shared, self.listener, self.device, operation).await;
        for finding in findings {
            self.raise(finding, vendor.as_ref(), session, peer).await;
        }
    }

    async fn raise(
        &self,
        finding: Finding,
        vendor: Option<&Arc<str>>,
        session: Option<u32>,
        peer: Option<SocketAddr>,
    ) {
        let kind = finding.kind;
        let mut event = Event::anomaly(kind, finding.severity, finding.detail);
        event.listener = Some(self.listener.clone());
        event.session_id = session.map(u64::from);
        event.vendor = vendor.cloned();
        event.src_ip = peer.map(|peer| peer.ip());
        event.src_port = peer.map(|peer| peer.port());
        event.device = Some(self.device.clone());
        let anomaly = event.clone();
        if let Err(error) = self.shared.emitter.emit(event).await {
            tracing::error!(%error, "event not recorded");
        }

        let Some(vendor) = vendor else {
            return;
        };
        let containment = {
            let generation = self.shared.current.load();
            let policy = &generation.policy;
            policy
                .vendor_id(vendor)
                .and_then(|id| policy.on_anomaly(id).cloned())
        };
        if let Some(containment) = containment {
            let now = Instant::now();
            if self.shared.detect.strike(vendor, kind, now, &containment) {
                let mut event = anomaly;
                event.session_id = None;
                crate::modbus::session::contain(self.shared, vendor, &containment, kind, event)
                    .await;
            }
        }
    }
}

/// Records the decision event of one operation.
pub async fn record(shared: &Shared, listener: &Arc<str>, device: &Arc<str>, operation: Operation) {
    shared
        .metrics
        .opcua()
        .count_operation(listener, operation.service.name(), operation.allowed);
    let mut event = Event::new(EventType::Decision);
    event.listener = Some(listener.clone());
    event.session_id = operation.session.map(u64::from);
    event.vendor = operation.vendor;
    event.src_ip = operation.peer.map(|peer| peer.ip());
    event.src_port = operation.peer.map(|peer| peer.port());
    event.device = Some(device.clone());
    event.decision = Some(match operation.allowed {
        true => DecisionKind::Allow,
        false => DecisionKind::Deny,
    });
    if !operation.enforced {
        event.enforced = Some(false);
    }
    event.rule = operation.rule.map(Arc::from);
    event.reason = operation.reason;
    event.modbus = operation.modbus;
    event.detail = operation.detail;
    event.opcua = Some(OpcuaInfo {
        service: operation.service.name(),
        node_id: operation.node_id,
        status: status_name(operation.status),
    });
    if let Err(error) = shared.emitter.emit(event).await {
        tracing::error!(%error, "event not recorded");
    }
}

/// Returns the symbolic name of a status code, such as `BadUserAccessDenied`.
pub fn status_name(status: StatusCode) -> String {
    status.to_string()
}
