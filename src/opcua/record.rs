//! Decision events of OPC UA operations: one event per operation of a
//! service call, allowed or denied, with the same common fields as Modbus
//! decisions and an `opcua` object.

use std::net::SocketAddr;
use std::sync::Arc;

use opcua::types::StatusCode;

use crate::config::OpcuaService;
use crate::events::{DecisionKind, Event, EventType, ModbusInfo, OpcuaInfo};
use crate::modbus::generation::Shared;

/// The facts about one operation that its decision event records.
pub struct Operation {
    pub service: OpcuaService,
    pub node_id: Option<String>,
    pub vendor: Option<Arc<str>>,
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

/// Records the decision event of one operation.
pub async fn record(shared: &Shared, listener: &Arc<str>, device: &Arc<str>, operation: Operation) {
    let mut event = Event::new(EventType::Decision);
    event.listener = Some(listener.clone());
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
    event.rule = operation.rule;
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
