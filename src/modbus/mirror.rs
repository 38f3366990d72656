//! Mirror routing for a session once the rules allowed a request: a read
//! inside a fresh block is served from memory, and other requests are
//! forwarded or rejected. A `mirror_only` listener forwards nothing, so there every
//! request the mirror cannot serve is denied.

use std::time::Instant;

use crate::config::{kind_name, OnStale, StateKind};
use crate::metrics::MirrorRead;
use crate::mirror::{Lookup, MirrorBlock, MirrorStore};
use crate::policy::DeviceId;

use super::pdu::{ExceptionCode, Request};

/// The `served_by` value of a decision event whose response came from the mirror.
pub const SERVED_BY: &str = "mirror";

/// The session's next action for an allowed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Forward to the device as without a mirror.
    Forward,
    /// Respond with the response PDU in the first `len` bytes of the buffer.
    Served { len: usize },
    /// Respond with exception `code`. `deny` is true when the request is
    /// recorded as denied (on a `mirror_only` listener) rather than as an
    /// allowed request that the mirror could not serve.
    Refused {
        code: ExceptionCode,
        deny: bool,
        reason: String,
    },
}

/// Returns the table, first address and quantity of a read that a mirror
/// may serve: FC 1 to 4. FC 23 also writes, so it always goes to the device.
fn mirrored_read(request: &Request) -> Option<(StateKind, u16, u16)> {
    match *request {
        Request::ReadCoils { address, quantity } => Some((StateKind::Coil, address, quantity)),
        Request::ReadDiscreteInputs { address, quantity } => {
            Some((StateKind::DiscreteInput, address, quantity))
        }
        Request::ReadHoldingRegisters { address, quantity } => {
            Some((StateKind::HoldingRegister, address, quantity))
        }
        Request::ReadInputRegisters { address, quantity } => {
            Some((StateKind::InputRegister, address, quantity))
        }
        _ => None,
    }
}

/// Decides how an allowed `request` to `device` is handled, writing a
/// served response PDU into `out`, and counts reads in the mirror metrics.
pub fn route(
    store: &MirrorStore,
    device: DeviceId,
    request: &Request,
    mirror_only: bool,
    now: Instant,
    out: &mut [u8],
) -> Route {
    let Some((kind, address, quantity)) = mirrored_read(request) else {
        return if mirror_only {
            Route::Refused {
                code: ExceptionCode::IllegalFunction,
                deny: true,
                reason: format!(
                    "mirror_only listener: function {} ({}) is never forwarded to a device",
                    request.function_code(),
                    request.function_name().unwrap_or("undefined")
                ),
            }
        } else {
            Route::Forward
        };
    };
    let Some(mirror) = store.device(device) else {
        return if mirror_only {
            outside(kind, address, quantity)
        } else {
            Route::Forward
        };
    };
    match mirror.read(kind, request.function_code(), address, quantity, now, out) {
        Lookup::Served { len } => {
            mirror.count(MirrorRead::Hit);
            Route::Served { len }
        }
        Lookup::Outside => {
            mirror.count(MirrorRead::Outside);
            if mirror_only {
                outside(kind, address, quantity)
            } else {
                Route::Forward
            }
        }
        Lookup::Stale(block) => {
            mirror.count(MirrorRead::Stale);
            let reason = stale_reason(block, now);
            match (mirror_only, block.config().stale) {
                (false, OnStale::Forward) => Route::Forward,
                (false, OnStale::Exception) => Route::Refused {
                    code: ExceptionCode::GatewayTargetFailedToRespond,
                    deny: false,
                    reason,
                },
                (true, _) => Route::Refused {
                    code: ExceptionCode::GatewayTargetFailedToRespond,
                    deny: true,
                    reason: format!("mirror_only listener: {reason}"),
                },
            }
        }
    }
}

/// Denies a read that no block contains: with nothing forwarded, there is no
/// path to the data, so the response is 0x0A (gateway path unavailable).
fn outside(kind: StateKind, address: u16, quantity: u16) -> Route {
    let last = u32::from(address) + u32::from(quantity.max(1)) - 1;
    Route::Refused {
        code: ExceptionCode::GatewayPathUnavailable,
        deny: true,
        reason: format!(
            "mirror_only listener: {} {address}-{last} lies in no single mirror block",
            kind_name(kind)
        ),
    }
}

/// Returns why a block's data cannot be served.
fn stale_reason(block: &MirrorBlock, now: Instant) -> String {
    let label = block.label();
    let max_age = block.config().max_age;
    match block.age(now) {
        None => format!("mirror block {label} has not been read yet"),
        Some(age) if age < max_age => format!("mirror block {label}: the latest poll failed"),
        Some(age) => format!(
            "mirror block {label} is {} ms old, older than max_age_ms {}",
            age.as_millis(),
            max_age.as_millis()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn only_the_four_read_functions_are_mirrored() {
        let read = Request::ReadInputRegisters {
            address: 5,
            quantity: 2,
        };
        assert_eq!(mirrored_read(&read), Some((StateKind::InputRegister, 5, 2)));
        let read_write = Request::ReadWriteMultipleRegisters {
            read_address: 0,
            read_quantity: 1,
            write_address: 10,
            write_quantity: 1,
            values: Bytes::from_static(&[0, 1]),
        };
        assert_eq!(mirrored_read(&read_write), None);
    }

    #[test]
    fn mirror_only_refuses_writes_with_illegal_function() {
        let store = MirrorStore::default();
        let write = Request::WriteSingleRegister {
            address: 1,
            value: 2,
        };
        let mut out = [0u8; 8];
        let route = route(&store, 0, &write, true, Instant::now(), &mut out);
        assert_eq!(
            route,
            Route::Refused {
                code: ExceptionCode::IllegalFunction,
                deny: true,
                reason: "mirror_only listener: function 6 (write_single_register) is never forwarded to a device".to_owned(),
            }
        );
    }

    #[test]
    fn device_without_mirror_forwards_reads() {
        let store = MirrorStore::default();
        let read = Request::ReadCoils {
            address: 0,
            quantity: 8,
        };
        let mut out = [0u8; 8];
        assert_eq!(
            route(&store, 0, &read, false, Instant::now(), &mut out),
            Route::Forward
        );
        assert_eq!(
            route(&store, 0, &read, true, Instant::now(), &mut out),
            Route::Refused {
                code: ExceptionCode::GatewayPathUnavailable,
                deny: true,
                reason: "mirror_only listener: coil 0-7 lies in no single mirror block".to_owned(),
            }
        );
    }
}
