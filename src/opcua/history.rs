//! HistoryRead of device nodes: raw and modified values, processed values
//! and values at given times. Each node of a request is decided as
//! `history_read` and recorded. Allowed nodes go to the device in one
//! HistoryRead request, and denied ones get `BadUserAccessDenied`.
//!
//! A continuation point the device returns stays with sluice, and the
//! client gets one of the server's own that carries the device's. The
//! device's point is released when the client releases its point, when the
//! client's session ends, or when the next request cannot use it.

use std::sync::Arc;
use std::time::Duration;

use opcua::client::{HistoryReadAction, Session};
use opcua::server::node_manager::{HistoryNode, RequestContext};
use opcua::server::ContinuationPoint;
use opcua::sync::Mutex;
use opcua::types::{
    ByteString, ExtensionObject, HistoryData, HistoryModifiedData, HistoryReadResult,
    HistoryReadValueId, NodeId, NumericRange, QualifiedName, StatusCode, TimestampsToReturn,
};

use crate::config::OpcuaService;

use super::namespaces::Translator;
use super::nodes::DeviceNodeManager;
use super::upstream::Connected;

/// The device's continuation point behind one the client holds.
pub struct DeviceHistoryPoint {
    /// The client's node, which the next request must name again.
    node: NodeId,
    /// `None` once the point was sent on or released.
    device: Mutex<Option<DeviceContinuation>>,
}

/// A continuation point of the device and what releasing it needs.
struct DeviceContinuation {
    session: Arc<Session>,
    details: HistoryReadAction,
    node: NodeId,
    point: ByteString,
    timeout: Duration,
}

impl DeviceHistoryPoint {
    /// Takes the device's point for a request on `node` over `session`.
    /// Returns `None` when it belongs to another node or an older session.
    fn take_for(&self, node: &NodeId, session: &Arc<Session>) -> Option<ByteString> {
        let mut device = self.device.lock();
        let fits = device
            .as_ref()
            .is_some_and(|held| &self.node == node && Arc::ptr_eq(&held.session, session));
        if !fits {
            return None;
        }
        device.take().map(|held| held.point)
    }
}

impl Drop for DeviceHistoryPoint {
    /// Releases the device's point when the client's point is released,
    /// dropped with its session, or replaced without being used.
    fn drop(&mut self) {
        let Some(held) = self.device.get_mut().take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let node = HistoryReadValueId {
                node_id: held.node,
                index_range: NumericRange::None,
                data_encoding: QualifiedName::null(),
                continuation_point: held.point,
            };
            let request = held.session.history_read(
                held.details,
                TimestampsToReturn::Neither,
                true,
                std::slice::from_ref(&node),
            );
            // A failed release leaves the point to the device's own expiry.
            let _ = tokio::time::timeout(held.timeout, request).await;
        });
    }
}

/// An allowed node on its way to the device.
struct Forwarded {
    position: usize,
    operation: usize,
}

impl DeviceNodeManager {
    /// Decides and forwards the nodes of one HistoryRead request. `details`
    /// carries the device's namespace indexes already.
    pub(super) async fn history_read_nodes(
        &self,
        context: &RequestContext,
        details: HistoryReadAction,
        nodes: &mut [&mut HistoryNode],
        timestamps_to_return: TimestampsToReturn,
    ) -> Result<(), StatusCode> {
        let connected = self.upstream.connected();
        let mut forwarded = Vec::new();
        let mut requests = Vec::new();
        let mut operations = Vec::new();
        for (position, node) in nodes.iter_mut().enumerate() {
            let node_id = node.node_id().clone();
            let verdict = self.decide(context, OpcuaService::HistoryRead, &node_id, None);
            let mut operation = verdict.operation;
            let request = match (verdict.forward, &connected) {
                (false, _) => Err(StatusCode::BadUserAccessDenied),
                (true, None) => Err(StatusCode::BadNotConnected),
                (true, Some(connected)) => self.device_history_node(connected, node),
            };
            match request {
                Ok(request) => {
                    forwarded.push(Forwarded {
                        position,
                        operation: operations.len(),
                    });
                    requests.push(request);
                }
                Err(status) => {
                    node.set_status(status);
                    operation.status = status;
                }
            }
            operations.push(operation);
        }

        if let (Some(connected), false) = (&connected, requests.is_empty()) {
            let request = connected.session.history_read(
                details.clone(),
                timestamps_to_return,
                false,
                &requests,
            );
            let results = self.device_results(requests.len(), request).await;
            let translator = self.translator(connected);
            for (index, sent) in forwarded.into_iter().enumerate() {
                let node = &mut *nodes[sent.position];
                let status = match &results {
                    Ok(results) => {
                        let continuation = DeviceContinuation {
                            session: connected.session.clone(),
                            details: details.clone(),
                            node: requests[index].node_id.clone(),
                            point: ByteString::null(),
                            timeout: self.upstream.timeout,
                        };
                        apply_history_result(&translator, node, &results[index], continuation)
                    }
                    Err(status) => {
                        node.set_status(*status);
                        *status
                    }
                };
                operations[sent.operation].status = status;
            }
        }
        for operation in operations {
            self.finish(operation).await;
        }
        Ok(())
    }

    /// Builds the device's request for one allowed node, with the device's
    /// continuation point when the client sent one of sluice's.
    fn device_history_node(
        &self,
        connected: &Connected,
        node: &HistoryNode,
    ) -> Result<HistoryReadValueId, StatusCode> {
        if !node.data_encoding().is_null() {
            return Err(StatusCode::BadDataEncodingUnsupported);
        }
        let device_node = self
            .translator(connected)
            .to_device(node.node_id())
            .ok_or(StatusCode::BadNodeIdUnknown)?;
        let continuation_point = match node.continuation_point() {
            None => ByteString::null(),
            Some(point) => point
                .get::<DeviceHistoryPoint>()
                .and_then(|point| point.take_for(node.node_id(), &connected.session))
                .ok_or(StatusCode::BadContinuationPointInvalid)?,
        };
        Ok(HistoryReadValueId {
            node_id: device_node,
            index_range: node.index_range().clone(),
            data_encoding: QualifiedName::null(),
            continuation_point,
        })
    }
}

/// Copies the device's result for one node to the client's node, with
/// namespace indexes translated, and keeps the device's continuation point
/// behind one of the server's. Returns the node's status.
fn apply_history_result(
    translator: &Translator<'_>,
    node: &mut HistoryNode,
    result: &HistoryReadResult,
    mut continuation: DeviceContinuation,
) -> StatusCode {
    let status = match translate_history_data(translator, node, &result.history_data) {
        Ok(()) => result.status_code,
        Err(status) => status,
    };
    node.set_status(status);
    if !result.continuation_point.is_null_or_empty() {
        continuation.point = result.continuation_point.clone();
        let point = DeviceHistoryPoint {
            node: node.node_id().clone(),
            device: Mutex::new(Some(continuation)),
        };
        // A point the client does not get is dropped here, which releases
        // the device's.
        if status.is_good() || status.is_uncertain() {
            node.set_next_continuation_point(Some(ContinuationPoint::new(Box::new(point))));
        }
    }
    status
}

/// Sets the node's result from the device's history data. Raw, processed
/// and at-time reads return `HistoryData`, and reads of modified values
/// return `HistoryModifiedData`.
fn translate_history_data(
    translator: &Translator<'_>,
    node: &mut HistoryNode,
    data: &ExtensionObject,
) -> Result<(), StatusCode> {
    if data.is_null() {
        return Ok(());
    }
    if let Some(history) = data.inner_as::<HistoryData>() {
        node.set_result(HistoryData {
            data_values: local_values(translator, &history.data_values),
        });
        return Ok(());
    }
    if let Some(history) = data.inner_as::<HistoryModifiedData>() {
        node.set_result(HistoryModifiedData {
            data_values: local_values(translator, &history.data_values),
            modification_infos: history.modification_infos.clone(),
        });
        return Ok(());
    }
    Err(StatusCode::BadHistoryOperationUnsupported)
}

fn local_values(
    translator: &Translator<'_>,
    values: &Option<Vec<opcua::types::DataValue>>,
) -> Option<Vec<opcua::types::DataValue>> {
    values.as_ref().map(|values| {
        values
            .iter()
            .cloned()
            .map(|mut value| {
                value.value = value.value.map(|v| translator.value_to_local(v));
                value
            })
            .collect()
    })
}
