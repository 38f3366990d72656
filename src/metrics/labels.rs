//! The fixed label values of sluice's metrics and the label sets of each
//! metric family. Values that do not come from the configuration come from
//! the tables here, so no client input can add a label value.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;

/// The label for any value outside a fixed table.
pub const OTHER: &str = "other";

/// The public function codes of the Modbus Application Protocol
/// Specification V1.1b3 (section 5.1), with the names that rules and events
/// use. Any other code is labelled `other`.
const FUNCTIONS: [(u8, &str); 19] = [
    (0x01, "read_coils"),
    (0x02, "read_discrete_inputs"),
    (0x03, "read_holding_registers"),
    (0x04, "read_input_registers"),
    (0x05, "write_single_coil"),
    (0x06, "write_single_register"),
    (0x07, "read_exception_status"),
    (0x08, "diagnostics"),
    (0x0B, "get_comm_event_counter"),
    (0x0C, "get_comm_event_log"),
    (0x0F, "write_multiple_coils"),
    (0x10, "write_multiple_registers"),
    (0x11, "report_server_id"),
    (0x14, "read_file_record"),
    (0x15, "write_file_record"),
    (0x16, "mask_write_register"),
    (0x17, "read_write_multiple_registers"),
    (0x18, "read_fifo_queue"),
    (0x2B, "encapsulated_interface_transport"),
];

/// Number of function label values: every named function plus `other`.
pub const FUNCTION_SLOTS: usize = FUNCTIONS.len() + 1;

/// Slot of each function code in `FUNCTIONS`, or `FUNCTIONS.len()` (the
/// `other` slot) for a code the table does not name.
const FUNCTION_SLOT_OF_CODE: [u8; 256] = function_slot_table();

const fn function_slot_table() -> [u8; 256] {
    let mut table = [FUNCTIONS.len() as u8; 256];
    let mut slot = 0;
    while slot < FUNCTIONS.len() {
        table[FUNCTIONS[slot].0 as usize] = slot as u8;
        slot += 1;
    }
    table
}

/// Returns the slot of a function code: an index below `FUNCTION_SLOTS`.
pub fn function_slot(code: u8) -> usize {
    usize::from(FUNCTION_SLOT_OF_CODE[usize::from(code)])
}

/// Returns the label value of a function slot from `function_slot`.
pub fn function_label(slot: usize) -> &'static str {
    FUNCTIONS.get(slot).map_or(OTHER, |(_, name)| *name)
}

/// Label values of the Modbus exception codes 0x01 to 0x0B, as two
/// uppercase hex digits. Any other code is labelled `other`.
const EXCEPTION_CODES: [&str; 11] = [
    "01", "02", "03", "04", "05", "06", "07", "08", "09", "0A", "0B",
];

/// Number of exception code label values, `other` included.
pub const EXCEPTION_SLOTS: usize = EXCEPTION_CODES.len() + 1;

/// Returns the slot of an exception code: an index below `EXCEPTION_SLOTS`.
pub fn exception_slot(code: u8) -> usize {
    match code {
        0x01..=0x0B => usize::from(code - 1),
        _ => EXCEPTION_CODES.len(),
    }
}

/// Returns the label value of an exception slot from `exception_slot`.
pub fn exception_label(slot: usize) -> &'static str {
    EXCEPTION_CODES.get(slot).copied().unwrap_or(OTHER)
}

/// The anomaly kinds that sluice raises, as listed in `docs/events.md`,
/// followed by `other` for a kind added elsewhere but not yet listed here.
pub const ANOMALY_KINDS: [&str; 34] = [
    "unknown_client",
    "bad_protocol_id",
    "bad_length",
    "exception_function_in_request",
    "incomplete_frame",
    "malformed_request",
    "late_response",
    "unexpected_response",
    "bad_response",
    "function_scan",
    "unit_scan",
    "address_sweep",
    "denial_burst",
    "rate_limited",
    "dangerous_function",
    "gated_write_denied",
    "new_source",
    "browse_sweep",
    "opcua_auth_failure",
    "opcua_auth_failure_burst",
    "device_unreachable",
    "device_timeout",
    "exception_storm",
    "vendor_quarantined",
    "outside_windows",
    "state_unknown",
    "collector_spool_full",
    "tls_handshake_failed",
    "unknown_certificate",
    "certificate_revoked",
    "crl_expired",
    "malformed_certificate",
    "ambiguous_certificate",
    OTHER,
];

/// Returns the index of `kind` in `ANOMALY_KINDS`, or the index of `other`.
pub fn anomaly_slot(kind: &str) -> usize {
    ANOMALY_KINDS
        .iter()
        .position(|known| *known == kind)
        .unwrap_or(ANOMALY_KINDS.len() - 1)
}

/// Label values of the `decision` label, indexed by `allowed as usize`.
pub const DECISIONS: [&str; 2] = ["deny", "allow"];

/// Label values of the `outcome` label of configuration reloads, indexed by
/// `success as usize`.
pub const RELOAD_OUTCOMES: [&str; 2] = ["failure", "success"];

/// Reason a listener closed a connection before a session started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// The source address (or certificate) matches no vendor.
    UnknownSource,
    /// The listener has reached its connection limit.
    ListenerFull,
    /// The source address has reached its connection limit.
    SourceFull,
    /// The vendor has reached its session limit.
    VendorFull,
}

impl RejectReason {
    /// Every reason, in the order of their slots.
    pub const ALL: [RejectReason; 4] = [
        RejectReason::UnknownSource,
        RejectReason::ListenerFull,
        RejectReason::SourceFull,
        RejectReason::VendorFull,
    ];

    /// Returns the `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::UnknownSource => "unknown_source",
            RejectReason::ListenerFull => "listener_full",
            RejectReason::SourceFull => "source_full",
            RejectReason::VendorFull => "vendor_full",
        }
    }
}

/// Result of a TLS handshake on a listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsOutcome {
    /// The handshake completed and the peer certificate was accepted.
    Success,
    /// The handshake failed or the peer certificate was rejected.
    Failure,
}

impl TlsOutcome {
    /// Number of outcomes.
    pub const COUNT: usize = 2;

    /// Returns the `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsOutcome::Success => "success",
            TlsOutcome::Failure => "failure",
        }
    }

    pub(crate) fn slot(self) -> usize {
        match self {
            TlsOutcome::Success => 0,
            TlsOutcome::Failure => 1,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub listener: Arc<str>,
    pub vendor: Arc<str>,
    pub device: Arc<str>,
    pub function: &'static str,
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DeviceLabels {
    pub device: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ExceptionLabels {
    pub device: Arc<str>,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SessionLabels {
    pub listener: Arc<str>,
    pub vendor: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RejectLabels {
    pub listener: Arc<str>,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ListenerOutcomeLabels {
    pub listener: Arc<str>,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabels {
    pub state: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CollectorLabels {
    pub collector: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct VersionLabels {
    pub version: String,
}

/// Labels of the TLS expiry gauge: the listener, what expires (`kind`) and
/// the file it was read from, all from the configuration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExpiryLabels {
    pub listener: Arc<str>,
    pub kind: &'static str,
    pub file: String,
}
