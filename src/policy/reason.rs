//! Deny reasons of `decide()`, the Modbus exception code each reason maps
//! to, and the short text events carry. Reasons hold numbers and shared
//! names only, so building one on the request path does not allocate.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use super::rate::{RateLimit, RateScope};
use crate::config::function_name;

/// Modbus exception codes a deny reason maps to.
const ILLEGAL_FUNCTION: u8 = 0x01;
const ILLEGAL_DATA_ADDRESS: u8 = 0x02;
const ILLEGAL_DATA_VALUE: u8 = 0x03;
const SERVER_DEVICE_BUSY: u8 = 0x06;

/// A `when` condition of a rule that did not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// The source address is outside the rule's `when.sources`.
    Source { source: IpAddr },
    /// The state has a known value other than the one the rule requires.
    State {
        state: Arc<str>,
        required: Arc<str>,
        actual: Arc<str>,
    },
    /// The time is outside every weekly window of `when.schedule`.
    Schedule,
    /// The time is outside every dated window of `when.window`.
    Window,
    /// The session's certificate role is missing or not in `when.role`.
    Role,
    /// The rule names source networks, but the listener cannot see the
    /// client's address (OPC UA).
    SourceUnknown,
}

/// The reason a request was denied. When several rules were candidates, the reason
/// comes from the rule that failed at the latest check: a rule's rate limit
/// after its conditions, conditions after values, values and quantity after
/// addresses, addresses after the function. Among rules that failed at the
/// same check, the first in file order gives the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// The vendor has no rule for the device.
    NoRuleForDevice,
    /// No rule of the vendor for the device names the function.
    FunctionNotAllowed { function: u8 },
    /// Rules name diagnostics (FC 8) but not this sub-function.
    SubFunctionNotAllowed { sub_function: u16 },
    /// Rules name FC 43 but not this MEI type.
    MeiTypeNotAllowed { mei_type: u8 },
    /// No rule naming the function covers every address touched. `address`
    /// is the first one outside the closest rule's ranges; it can be 65536
    /// when a request runs past the last address.
    AddressNotAllowed { address: u32 },
    /// The number of items read or written is outside the rule's `quantity`.
    QuantityNotAllowed { quantity: u16 },
    /// A written value is outside the rule's `values`.
    ValueNotAllowed { address: u16, value: u16 },
    /// A mask write (FC 22) could leave a value outside the rule's `values`.
    MaskNotAllowed { and_mask: u16, or_mask: u16 },
    /// A rule would allow the request, but one of its conditions failed.
    ConditionFailed { condition: Condition },
    /// A rule depends on a state whose value is unknown: never read, read
    /// too long ago, failed to read, or a raw value the state does not map.
    StateUnknown { state: Arc<str> },
    /// A rate limit was reached: the vendor's, checked on every request, or
    /// that of the rule that would allow the request.
    RateLimited { scope: RateScope, limit: RateLimit },
    /// No OPC UA rule of the vendor for the device names the service.
    ServiceNotAllowed { service: &'static str },
    /// OPC UA rules name the service but none names the node.
    NodeNotAllowed,
    /// An OPC UA write of a value outside the rule's `values`.
    WrittenValueNotAllowed { value: String },
}

impl DenyReason {
    /// Returns the Modbus exception code a plain listener responds with.
    pub fn exception_code(&self) -> u8 {
        match self {
            DenyReason::NoRuleForDevice
            | DenyReason::FunctionNotAllowed { .. }
            | DenyReason::SubFunctionNotAllowed { .. }
            | DenyReason::MeiTypeNotAllowed { .. }
            | DenyReason::ConditionFailed { .. }
            | DenyReason::StateUnknown { .. }
            | DenyReason::ServiceNotAllowed { .. } => ILLEGAL_FUNCTION,
            DenyReason::AddressNotAllowed { .. } | DenyReason::NodeNotAllowed => {
                ILLEGAL_DATA_ADDRESS
            }
            DenyReason::WrittenValueNotAllowed { .. }
            | DenyReason::QuantityNotAllowed { .. }
            | DenyReason::ValueNotAllowed { .. }
            | DenyReason::MaskNotAllowed { .. } => ILLEGAL_DATA_VALUE,
            DenyReason::RateLimited { .. } => SERVER_DEVICE_BUSY,
        }
    }

    /// Returns the rank of the check that failed; a higher rank is a more
    /// specific reason.
    pub(super) fn specificity(&self) -> u8 {
        match self {
            DenyReason::NoRuleForDevice => 0,
            DenyReason::FunctionNotAllowed { .. }
            | DenyReason::SubFunctionNotAllowed { .. }
            | DenyReason::MeiTypeNotAllowed { .. }
            | DenyReason::ServiceNotAllowed { .. } => 1,
            DenyReason::AddressNotAllowed { .. } | DenyReason::NodeNotAllowed => 2,
            DenyReason::WrittenValueNotAllowed { .. }
            | DenyReason::QuantityNotAllowed { .. }
            | DenyReason::ValueNotAllowed { .. }
            | DenyReason::MaskNotAllowed { .. } => 3,
            DenyReason::ConditionFailed { .. } | DenyReason::StateUnknown { .. } => 4,
            DenyReason::RateLimited { .. } => 5,
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::NoRuleForDevice => f.write_str("no rule for this device"),
            DenyReason::FunctionNotAllowed { function } => match function_name(*function) {
                Some(name) => write!(f, "function {function} ({name}) not allowed"),
                None => write!(f, "function {function} not allowed"),
            },
            DenyReason::SubFunctionNotAllowed { sub_function } => {
                write!(f, "diagnostics sub-function {sub_function} not allowed")
            }
            DenyReason::MeiTypeNotAllowed { mei_type } => {
                write!(f, "MEI type {mei_type} not allowed")
            }
            DenyReason::AddressNotAllowed { address } => {
                write!(f, "address {address} outside allowed ranges")
            }
            DenyReason::QuantityNotAllowed { quantity } => {
                write!(f, "quantity {quantity} outside allowed range")
            }
            DenyReason::ValueNotAllowed { address, value } => {
                write!(f, "value {value} at address {address} outside allowed values")
            }
            DenyReason::MaskNotAllowed { and_mask, or_mask } => write!(
                f,
                "mask write with AND {and_mask:#06x} OR {or_mask:#06x} can leave a value outside allowed values"
            ),
            DenyReason::ConditionFailed { condition } => match condition {
                Condition::Source { source } => {
                    write!(f, "source {source} outside the rule's sources")
                }
                Condition::State {
                    state,
                    required,
                    actual,
                } => write!(f, "state {state} is {actual}, rule requires {required}"),
                Condition::Schedule => f.write_str("outside the rule's schedule"),
                Condition::Window => f.write_str("outside the rule's dated windows"),
                Condition::Role => f.write_str("certificate role not in the rule's roles"),
                Condition::SourceUnknown => {
                    f.write_str("rule names sources, but the client's address is unknown")
                }
            },
            DenyReason::StateUnknown { state } => write!(f, "state {state} unknown"),
            DenyReason::RateLimited { scope, limit } => {
                write!(f, "rate limit of {scope} reached: {limit}")
            }
            DenyReason::ServiceNotAllowed { service } => {
                write!(f, "service {service} not allowed")
            }
            DenyReason::NodeNotAllowed => f.write_str("node outside allowed nodes"),
            DenyReason::WrittenValueNotAllowed { value } => {
                write!(f, "value {value} outside allowed values")
            }
        }
    }
}
