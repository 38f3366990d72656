//! Converts a parsed request into the `ModbusAccess` the policy decides on:
//! which addresses it reads and writes, which values it writes, and the
//! sub-codes of diagnostics and encapsulated interface requests.

use super::pdu::Request;
use crate::policy::{ModbusAccess, WrittenValues};

/// Returns what `request`, sent to `unit`, touches.
///
/// File record requests (FC 20 and 21) address files, not the tables rules
/// name, so they carry no addresses: a rule allows them by function alone.
/// Read/write multiple registers (FC 23) has two quantities, so `quantity`
/// is left out and both counts are in `read` and `write`.
pub fn access_of(unit: u8, request: &Request) -> ModbusAccess<'_> {
    let mut access = ModbusAccess {
        unit,
        function: request.function_code(),
        read: None,
        write: None,
        values: WrittenValues::None,
        quantity: None,
        sub_function: None,
        mei_type: None,
    };
    match request {
        Request::ReadCoils { address, quantity }
        | Request::ReadDiscreteInputs { address, quantity }
        | Request::ReadHoldingRegisters { address, quantity }
        | Request::ReadInputRegisters { address, quantity } => {
            access.read = Some((*address, *quantity));
            access.quantity = Some(*quantity);
        }
        Request::WriteSingleCoil { address, value } => {
            access.write = Some((*address, 1));
            access.values = WrittenValues::Coil(*value);
        }
        Request::WriteSingleRegister { address, value } => {
            access.write = Some((*address, 1));
            access.values = WrittenValues::Register(*value);
        }
        Request::WriteMultipleCoils {
            address,
            quantity,
            values,
        } => {
            access.write = Some((*address, *quantity));
            access.quantity = Some(*quantity);
            access.values = WrittenValues::Coils {
                packed: values,
                count: *quantity,
            };
        }
        Request::WriteMultipleRegisters {
            address,
            quantity,
            values,
        } => {
            access.write = Some((*address, *quantity));
            access.quantity = Some(*quantity);
            access.values = WrittenValues::Registers(values);
        }
        Request::MaskWriteRegister {
            address,
            and_mask,
            or_mask,
        } => {
            access.write = Some((*address, 1));
            access.values = WrittenValues::Mask {
                and_mask: *and_mask,
                or_mask: *or_mask,
            };
        }
        Request::ReadWriteMultipleRegisters {
            read_address,
            read_quantity,
            write_address,
            write_quantity,
            values,
        } => {
            access.read = Some((*read_address, *read_quantity));
            access.write = Some((*write_address, *write_quantity));
            access.values = WrittenValues::Registers(values);
        }
        Request::ReadFifoQueue { address } => access.read = Some((*address, 1)),
        Request::Diagnostics { sub_function, .. } => access.sub_function = Some(*sub_function),
        Request::EncapsulatedInterface { mei_type, .. } => access.mei_type = Some(*mei_type),
        Request::ReadExceptionStatus
        | Request::GetCommEventCounter
        | Request::GetCommEventLog
        | Request::ReportServerId
        | Request::ReadFileRecord { .. }
        | Request::WriteFileRecord { .. }
        | Request::Raw { .. } => {}
    }
    access
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn plain(function: u8) -> ModbusAccess<'static> {
        ModbusAccess {
            unit: 1,
            function,
            read: None,
            write: None,
            values: WrittenValues::None,
            quantity: None,
            sub_function: None,
            mei_type: None,
        }
    }

    #[test]
    fn reads_carry_address_and_quantity() {
        let request = Request::ReadHoldingRegisters {
            address: 100,
            quantity: 10,
        };
        let expected = ModbusAccess {
            read: Some((100, 10)),
            quantity: Some(10),
            ..plain(3)
        };
        assert_eq!(access_of(1, &request), expected);
        let coils = Request::ReadCoils {
            address: 0,
            quantity: 2000,
        };
        assert_eq!(access_of(1, &coils).function, 1);
        assert_eq!(access_of(1, &coils).read, Some((0, 2000)));
    }

    #[test]
    fn single_writes_carry_their_value() {
        let coil = Request::WriteSingleCoil {
            address: 7,
            value: true,
        };
        let expected = ModbusAccess {
            write: Some((7, 1)),
            values: WrittenValues::Coil(true),
            ..plain(5)
        };
        assert_eq!(access_of(1, &coil), expected);
        let register = Request::WriteSingleRegister {
            address: 105,
            value: 4000,
        };
        let expected = ModbusAccess {
            write: Some((105, 1)),
            values: WrittenValues::Register(4000),
            ..plain(6)
        };
        assert_eq!(access_of(1, &register), expected);
    }

    #[test]
    fn multiple_writes_borrow_their_values() {
        let coils = Request::WriteMultipleCoils {
            address: 20,
            quantity: 10,
            values: Bytes::from_static(&[0xCD, 0x01]),
        };
        let expected = ModbusAccess {
            write: Some((20, 10)),
            quantity: Some(10),
            values: WrittenValues::Coils {
                packed: &[0xCD, 0x01],
                count: 10,
            },
            ..plain(15)
        };
        assert_eq!(access_of(1, &coils), expected);
        let registers = Request::WriteMultipleRegisters {
            address: 100,
            quantity: 2,
            values: Bytes::from_static(&[0x00, 0x0A, 0x01, 0x02]),
        };
        let expected = ModbusAccess {
            write: Some((100, 2)),
            quantity: Some(2),
            values: WrittenValues::Registers(&[0x00, 0x0A, 0x01, 0x02]),
            ..plain(16)
        };
        assert_eq!(access_of(1, &registers), expected);
    }

    #[test]
    fn read_write_registers_carry_both_ranges() {
        let request = Request::ReadWriteMultipleRegisters {
            read_address: 0,
            read_quantity: 5,
            write_address: 100,
            write_quantity: 1,
            values: Bytes::from_static(&[0x12, 0x34]),
        };
        let expected = ModbusAccess {
            read: Some((0, 5)),
            write: Some((100, 1)),
            values: WrittenValues::Registers(&[0x12, 0x34]),
            ..plain(23)
        };
        assert_eq!(
            access_of(3, &request),
            ModbusAccess {
                unit: 3,
                ..expected
            }
        );
    }

    #[test]
    fn mask_write_and_fifo_touch_one_register() {
        let mask = Request::MaskWriteRegister {
            address: 4,
            and_mask: 0xF2,
            or_mask: 0x25,
        };
        let expected = ModbusAccess {
            write: Some((4, 1)),
            values: WrittenValues::Mask {
                and_mask: 0xF2,
                or_mask: 0x25,
            },
            ..plain(22)
        };
        assert_eq!(access_of(1, &mask), expected);
        let fifo = Request::ReadFifoQueue { address: 0x04DE };
        let expected = ModbusAccess {
            read: Some((0x04DE, 1)),
            ..plain(24)
        };
        assert_eq!(access_of(1, &fifo), expected);
    }

    #[test]
    fn sub_codes_are_carried() {
        let diagnostics = Request::Diagnostics {
            sub_function: 4,
            data: Bytes::from_static(&[0, 0]),
        };
        let expected = ModbusAccess {
            sub_function: Some(4),
            ..plain(8)
        };
        assert_eq!(access_of(1, &diagnostics), expected);
        let identification = Request::EncapsulatedInterface {
            mei_type: 0x0E,
            data: Bytes::from_static(&[1, 0]),
        };
        let expected = ModbusAccess {
            mei_type: Some(0x0E),
            ..plain(43)
        };
        assert_eq!(access_of(1, &identification), expected);
    }

    #[test]
    fn function_only_requests_touch_no_address() {
        let requests = [
            (Request::ReadExceptionStatus, 7),
            (Request::GetCommEventCounter, 11),
            (Request::GetCommEventLog, 12),
            (Request::ReportServerId, 17),
            (
                Request::ReadFileRecord {
                    data: Bytes::from_static(&[6, 0, 4, 0, 1, 0, 2]),
                },
                20,
            ),
            (
                Request::WriteFileRecord {
                    data: Bytes::from_static(&[6, 0, 4, 0, 7, 0, 1, 0x06, 0xAF]),
                },
                21,
            ),
            (
                Request::Raw {
                    function: 100,
                    data: Bytes::new(),
                },
                100,
            ),
        ];
        for (request, function) in &requests {
            assert_eq!(access_of(1, request), plain(*function), "{request:?}");
        }
    }
}
