//! Writes to tags: a write is decided as the OPC UA `write` of the tag node
//! and as the Modbus request it becomes, under the vendor's rules for the
//! tag's device. Only a write both allow (or monitor mode forwards) goes to
//! the PLC, through the device's upstream pool like a Modbus session's.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use opcua::server::node_manager::{ParsedWriteValue, RequestContext};
use opcua::types::{AttributeId, NumericRange, StatusCode, Variant};

use crate::config::{Mode, OpcuaService, TagAccess};
use crate::events::ModbusInfo;
use crate::modbus::access::access_of;
use crate::modbus::generation::Generation;
use crate::modbus::pdu::Request;
use crate::modbus::upstream::UpstreamError;
use crate::policy::{Context, Decision};
use crate::tags::{self, EncodeError, Tag, TagId, TagWrite, TagWriteError};

use super::record::Operation;
use super::tag_space::{from_variant, TagNode, TagSpace};
use super::tags::{TagNodeManager, Verdict};

/// Bit of a function code that marks a Modbus exception response.
const EXCEPTION_BIT: u8 = 0x80;

impl TagNodeManager {
    /// Carries out one write of the Write service on a node of the tag
    /// namespace, records its decision event and returns its status.
    pub(super) async fn write_tag(
        &self,
        generation: &Generation,
        context: &RequestContext,
        space: &TagSpace,
        write: &ParsedWriteValue,
    ) -> StatusCode {
        let Some(kind) = space.node(&write.node_id) else {
            return StatusCode::BadNodeIdUnknown;
        };
        let TagNode::Tag(id) = kind else {
            return StatusCode::BadNotWritable;
        };
        let tag = &space.tags.tags()[id];
        // Only values are numbers a rule can limit; other attributes are
        // decided as writes of a non-numeric value.
        let value = match write.attribute_id {
            AttributeId::Value => write.value.value.clone().unwrap_or(Variant::Empty),
            _ => Variant::Empty,
        };
        let mut verdict = self.decide(generation, context, OpcuaService::Write, tag, Some(&value));
        let status = self
            .carry_out(generation, context, tag, id, write, &value, &mut verdict)
            .await;
        verdict.operation.status = status;
        self.finish(tag, verdict.operation).await;
        status
    }

    #[allow(clippy::too_many_arguments)]
    async fn carry_out(
        &self,
        generation: &Generation,
        context: &RequestContext,
        tag: &Tag,
        id: TagId,
        write: &ParsedWriteValue,
        value: &Variant,
        verdict: &mut Verdict,
    ) -> StatusCode {
        if !verdict.forward {
            return StatusCode::BadUserAccessDenied;
        }
        if write.attribute_id != AttributeId::Value || tag.access != TagAccess::ReadWrite {
            return StatusCode::BadNotWritable;
        }
        if write.index_range != NumericRange::None {
            return StatusCode::BadWriteNotSupported;
        }
        let Some(tag_value) = from_variant(tags::value_type(tag), value) else {
            return StatusCode::BadTypeMismatch;
        };
        let request = match generation.tags.write(id, &tag_value) {
            Some(Ok(request)) => request,
            Some(Err(error)) => return write_error_status(&error),
            None => return StatusCode::BadNodeIdUnknown,
        };
        let operation = &mut verdict.operation;
        operation.modbus = Some(modbus_info(&request));
        if !self.decide_modbus(generation, context, &request, operation) {
            return StatusCode::BadUserAccessDenied;
        }
        if !self.shared.audit.is_writable() {
            operation.allowed = false;
            operation.enforced = true;
            operation.rule = None;
            operation.reason = Some("audit log cannot be written".to_owned());
            return StatusCode::BadUserAccessDenied;
        }

        let response = generation
            .pool(request.device)
            .call(request.unit_id, &request.request)
            .await;
        match response {
            Ok(pdu) if pdu.first().is_some_and(|code| code & EXCEPTION_BIT != 0) => {
                if let Some(info) = operation.modbus.as_mut() {
                    info.exception = pdu.get(1).copied();
                }
                StatusCode::BadCommunicationError
            }
            Ok(_) => StatusCode::Good,
            Err(error) => {
                tracing::debug!(listener = %self.listener, tag = %tag.name, %error, "tag write failed");
                upstream_status(&error)
            }
        }
    }

    /// Decides the Modbus request of a tag write with the vendor's Modbus
    /// rules for the device and records the outcome in `operation`.
    /// Returns whether to send it: allowed, or denied in monitor mode.
    fn decide_modbus(
        &self,
        generation: &Generation,
        context: &RequestContext,
        request: &TagWrite,
        operation: &mut Operation,
    ) -> bool {
        let policy = &generation.policy;
        let Some(vendor) = super::access::token_vendor(policy, context.user_token()) else {
            return false;
        };
        // An unknown client address is 0.0.0.0, which a rule's `when.sources`
        // matches only when it lists 0.0.0.0/0.
        let source = operation
            .peer
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |peer| peer.ip());
        let modbus_context = Context {
            source,
            role: None,
            now: jiff::Timestamp::now(),
            instant: Instant::now(),
            states: &generation.states,
        };
        let access = access_of(request.unit_id, &request.request);
        match policy.decide(vendor, request.device, &access, &modbus_context) {
            Decision::Allow { rule } => {
                operation.detail = Some(serde_json::json!({
                    "modbus_rule": policy.rule_label(rule),
                }));
                true
            }
            Decision::Deny { reason } => {
                operation.allowed = false;
                operation.rule = None;
                operation.reason = Some(format!("Modbus write denied: {reason}"));
                let forward = self.mode == Mode::Monitor;
                operation.enforced = !forward;
                forward
            }
        }
    }
}

/// Returns the `modbus` event fields of the request a tag write becomes.
fn modbus_info(write: &TagWrite) -> ModbusInfo {
    let (address, quantity) = match &write.request {
        Request::WriteSingleCoil { address, .. }
        | Request::WriteSingleRegister { address, .. }
        | Request::MaskWriteRegister { address, .. } => (Some(*address), None),
        Request::WriteMultipleCoils {
            address, quantity, ..
        }
        | Request::WriteMultipleRegisters {
            address, quantity, ..
        } => (Some(*address), Some(*quantity)),
        _ => (None, None),
    };
    ModbusInfo {
        unit: write.unit_id,
        function: write.request.function_code(),
        function_name: write.request.function_name(),
        address,
        quantity,
        transaction_id: 0,
        sub_function: None,
        exception: None,
    }
}

/// Returns the status of a value that cannot be written to its tag.
pub fn write_error_status(error: &TagWriteError) -> StatusCode {
    match error {
        TagWriteError::ReadOnly(_) => StatusCode::BadNotWritable,
        TagWriteError::Value { source, .. } => match **source {
            EncodeError::WrongType { .. } => StatusCode::BadTypeMismatch,
            EncodeError::NotFinite { .. }
            | EncodeError::OutOfRange { .. }
            | EncodeError::TooLong { .. }
            | EncodeError::InvalidCharacter { .. } => StatusCode::BadOutOfRange,
        },
    }
}

/// Returns the status of a tag write whose request got no valid response.
pub fn upstream_status(error: &UpstreamError) -> StatusCode {
    match error {
        UpstreamError::Timeout { .. } => StatusCode::BadTimeout,
        UpstreamError::Busy => StatusCode::BadResourceUnavailable,
        UpstreamError::Unreachable { .. }
        | UpstreamError::BadResponse { .. }
        | UpstreamError::WrongUnit { .. }
        | UpstreamError::Closed { .. } => StatusCode::BadCommunicationError,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn encode_errors_map_to_status_codes() {
        let value = |source: EncodeError| TagWriteError::Value {
            tag: Arc::from("T"),
            source: Box::new(source),
        };
        let wrong_type = value(EncodeError::WrongType {
            expected: "int16",
            actual: "string",
        });
        let out_of_range = value(EncodeError::OutOfRange {
            value: "70000".into(),
            raw: "70000".into(),
            data_type: "int16",
            min: "-32768".into(),
            max: "32767".into(),
        });
        let too_long = value(EncodeError::TooLong { length: 9, max: 8 });
        assert_eq!(write_error_status(&wrong_type), StatusCode::BadTypeMismatch);
        assert_eq!(write_error_status(&out_of_range), StatusCode::BadOutOfRange);
        assert_eq!(write_error_status(&too_long), StatusCode::BadOutOfRange);
        assert_eq!(
            write_error_status(&TagWriteError::ReadOnly(Arc::from("T"))),
            StatusCode::BadNotWritable
        );
    }

    #[test]
    fn upstream_failures_map_to_status_codes() {
        let timeout = UpstreamError::Timeout {
            device: Arc::from("press-1"),
            timeout: Duration::from_millis(500),
        };
        assert_eq!(upstream_status(&timeout), StatusCode::BadTimeout);
        assert_eq!(
            upstream_status(&UpstreamError::Busy),
            StatusCode::BadResourceUnavailable
        );
        let closed = UpstreamError::Closed {
            device: Arc::from("press-1"),
            reason: crate::modbus::upstream::CloseReason::Eof,
        };
        assert_eq!(upstream_status(&closed), StatusCode::BadCommunicationError);
    }

    #[test]
    fn modbus_info_names_the_register_write() {
        let write = TagWrite {
            device: 0,
            unit_id: 7,
            request: Request::WriteMultipleRegisters {
                address: 100,
                quantity: 2,
                values: bytes::Bytes::from_static(&[0x41, 0x20, 0, 0]),
            },
        };
        let info = modbus_info(&write);
        assert_eq!(info.unit, 7);
        assert_eq!(info.function, 16);
        assert_eq!(info.function_name, Some("write_multiple_registers"));
        assert_eq!(info.address, Some(100));
        assert_eq!(info.quantity, Some(2));
    }
}
