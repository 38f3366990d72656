//! Modbus request PDUs as typed values, shared by the north-side codec, the
//! policy adapter and the upstream client. Parsing and encoding live in `frame`.

use bytes::Bytes;

/// A parsed request PDU. Every variant has passed the limits of the Modbus
/// Application Protocol Specification V1.1b3 for its function code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// FC 1.
    ReadCoils { address: u16, quantity: u16 },
    /// FC 2.
    ReadDiscreteInputs { address: u16, quantity: u16 },
    /// FC 3.
    ReadHoldingRegisters { address: u16, quantity: u16 },
    /// FC 4.
    ReadInputRegisters { address: u16, quantity: u16 },
    /// FC 5; `value` is true for 0xFF00 and false for 0x0000.
    WriteSingleCoil { address: u16, value: bool },
    /// FC 6.
    WriteSingleRegister { address: u16, value: u16 },
    /// FC 7 (serial line only, but some TCP devices respond to it).
    ReadExceptionStatus,
    /// FC 8; `data` is everything after the sub-function, as sent.
    Diagnostics { sub_function: u16, data: Bytes },
    /// FC 11.
    GetCommEventCounter,
    /// FC 12.
    GetCommEventLog,
    /// FC 15; `values` contains the packed coil bytes, least significant bit first.
    WriteMultipleCoils {
        address: u16,
        quantity: u16,
        values: Bytes,
    },
    /// FC 16; `values` contains 2 × quantity big-endian bytes.
    WriteMultipleRegisters {
        address: u16,
        quantity: u16,
        values: Bytes,
    },
    /// FC 17.
    ReportServerId,
    /// FC 20; `data` is the sub-request list after the byte count.
    ReadFileRecord { data: Bytes },
    /// FC 21; `data` is the sub-request list after the byte count.
    WriteFileRecord { data: Bytes },
    /// FC 22.
    MaskWriteRegister {
        address: u16,
        and_mask: u16,
        or_mask: u16,
    },
    /// FC 23; `values` contains 2 × write_quantity big-endian bytes.
    ReadWriteMultipleRegisters {
        read_address: u16,
        read_quantity: u16,
        write_address: u16,
        write_quantity: u16,
        values: Bytes,
    },
    /// FC 24.
    ReadFifoQueue { address: u16 },
    /// FC 43; `data` is everything after the MEI type.
    EncapsulatedInterface { mei_type: u8, data: Bytes },
    /// Any other function code below 0x80, kept as sent so that a rule can
    /// name it by number.
    Raw { function: u8, data: Bytes },
}

/// Exception codes of the Modbus application protocol that sluice sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ExceptionCode {
    IllegalFunction = 0x01,
    IllegalDataAddress = 0x02,
    IllegalDataValue = 0x03,
    ServerDeviceFailure = 0x04,
    ServerDeviceBusy = 0x06,
    GatewayPathUnavailable = 0x0A,
    GatewayTargetFailedToRespond = 0x0B,
}

impl ExceptionCode {
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Returns the exception for `code`, or `None` for a code sluice never sends.
    pub fn from_code(code: u8) -> Option<ExceptionCode> {
        match code {
            0x01 => Some(ExceptionCode::IllegalFunction),
            0x02 => Some(ExceptionCode::IllegalDataAddress),
            0x03 => Some(ExceptionCode::IllegalDataValue),
            0x04 => Some(ExceptionCode::ServerDeviceFailure),
            0x06 => Some(ExceptionCode::ServerDeviceBusy),
            0x0A => Some(ExceptionCode::GatewayPathUnavailable),
            0x0B => Some(ExceptionCode::GatewayTargetFailedToRespond),
            _ => None,
        }
    }
}

pub const READ_COILS: u8 = 0x01;
pub const READ_DISCRETE_INPUTS: u8 = 0x02;
pub const READ_HOLDING_REGISTERS: u8 = 0x03;
pub const READ_INPUT_REGISTERS: u8 = 0x04;
pub const WRITE_SINGLE_COIL: u8 = 0x05;
pub const WRITE_SINGLE_REGISTER: u8 = 0x06;
pub const READ_EXCEPTION_STATUS: u8 = 0x07;
pub const DIAGNOSTICS: u8 = 0x08;
pub const GET_COMM_EVENT_COUNTER: u8 = 0x0B;
pub const GET_COMM_EVENT_LOG: u8 = 0x0C;
pub const WRITE_MULTIPLE_COILS: u8 = 0x0F;
pub const WRITE_MULTIPLE_REGISTERS: u8 = 0x10;
pub const REPORT_SERVER_ID: u8 = 0x11;
pub const READ_FILE_RECORD: u8 = 0x14;
pub const WRITE_FILE_RECORD: u8 = 0x15;
pub const MASK_WRITE_REGISTER: u8 = 0x16;
pub const READ_WRITE_MULTIPLE_REGISTERS: u8 = 0x17;
pub const READ_FIFO_QUEUE: u8 = 0x18;
pub const ENCAPSULATED_INTERFACE_TRANSPORT: u8 = 0x2B;

/// The public function codes of the Modbus Application Protocol
/// Specification V1.1b3 (section 5.1) that sluice parses, with the names
/// that rules and events use.
const FUNCTION_NAMES: [(u8, &str); 19] = [
    (READ_COILS, "read_coils"),
    (READ_DISCRETE_INPUTS, "read_discrete_inputs"),
    (READ_HOLDING_REGISTERS, "read_holding_registers"),
    (READ_INPUT_REGISTERS, "read_input_registers"),
    (WRITE_SINGLE_COIL, "write_single_coil"),
    (WRITE_SINGLE_REGISTER, "write_single_register"),
    (READ_EXCEPTION_STATUS, "read_exception_status"),
    (DIAGNOSTICS, "diagnostics"),
    (GET_COMM_EVENT_COUNTER, "get_comm_event_counter"),
    (GET_COMM_EVENT_LOG, "get_comm_event_log"),
    (WRITE_MULTIPLE_COILS, "write_multiple_coils"),
    (WRITE_MULTIPLE_REGISTERS, "write_multiple_registers"),
    (REPORT_SERVER_ID, "report_server_id"),
    (READ_FILE_RECORD, "read_file_record"),
    (WRITE_FILE_RECORD, "write_file_record"),
    (MASK_WRITE_REGISTER, "mask_write_register"),
    (
        READ_WRITE_MULTIPLE_REGISTERS,
        "read_write_multiple_registers",
    ),
    (READ_FIFO_QUEUE, "read_fifo_queue"),
    (
        ENCAPSULATED_INTERFACE_TRANSPORT,
        "encapsulated_interface_transport",
    ),
];

/// Another name that rules may use for FC 43, after its only MEI type
/// that TCP devices commonly serve (0x0E).
const READ_DEVICE_IDENTIFICATION: &str = "read_device_identification";

/// Returns the snake_case name of a function code that sluice parses, or
/// `None` for any other code. FC 43 is named `encapsulated_interface_transport`.
pub fn function_name_of(code: u8) -> Option<&'static str> {
    FUNCTION_NAMES
        .iter()
        .find(|(known, _)| *known == code)
        .map(|(_, name)| *name)
}

/// Returns the function code for a name from `function_name_of`, or for
/// `read_device_identification` (FC 43). Names are matched exactly.
pub fn function_code_of(name: &str) -> Option<u8> {
    if name == READ_DEVICE_IDENTIFICATION {
        return Some(ENCAPSULATED_INTERFACE_TRANSPORT);
    }
    FUNCTION_NAMES
        .iter()
        .find(|(_, known)| *known == name)
        .map(|(code, _)| *code)
}

impl Request {
    /// Returns the function code this request is sent with.
    pub fn function_code(&self) -> u8 {
        match self {
            Request::ReadCoils { .. } => READ_COILS,
            Request::ReadDiscreteInputs { .. } => READ_DISCRETE_INPUTS,
            Request::ReadHoldingRegisters { .. } => READ_HOLDING_REGISTERS,
            Request::ReadInputRegisters { .. } => READ_INPUT_REGISTERS,
            Request::WriteSingleCoil { .. } => WRITE_SINGLE_COIL,
            Request::WriteSingleRegister { .. } => WRITE_SINGLE_REGISTER,
            Request::ReadExceptionStatus => READ_EXCEPTION_STATUS,
            Request::Diagnostics { .. } => DIAGNOSTICS,
            Request::GetCommEventCounter => GET_COMM_EVENT_COUNTER,
            Request::GetCommEventLog => GET_COMM_EVENT_LOG,
            Request::WriteMultipleCoils { .. } => WRITE_MULTIPLE_COILS,
            Request::WriteMultipleRegisters { .. } => WRITE_MULTIPLE_REGISTERS,
            Request::ReportServerId => REPORT_SERVER_ID,
            Request::ReadFileRecord { .. } => READ_FILE_RECORD,
            Request::WriteFileRecord { .. } => WRITE_FILE_RECORD,
            Request::MaskWriteRegister { .. } => MASK_WRITE_REGISTER,
            Request::ReadWriteMultipleRegisters { .. } => READ_WRITE_MULTIPLE_REGISTERS,
            Request::ReadFifoQueue { .. } => READ_FIFO_QUEUE,
            Request::EncapsulatedInterface { .. } => ENCAPSULATED_INTERFACE_TRANSPORT,
            Request::Raw { function, .. } => *function,
        }
    }

    /// Returns the snake_case name rules use, or `None` for a raw code.
    ///
    /// The names follow the Modbus Application Protocol Specification
    /// V1.1b3, from `read_coils` (FC 1) to `encapsulated_interface_transport`
    /// (FC 43). `function_code_of` also accepts `read_device_identification`
    /// for FC 43, but this method never returns it.
    pub fn function_name(&self) -> Option<&'static str> {
        match self {
            Request::Raw { .. } => None,
            known => function_name_of(known.function_code()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_round_trip_through_codes() {
        for (code, name) in FUNCTION_NAMES {
            assert_eq!(function_name_of(code), Some(name));
            assert_eq!(function_code_of(name), Some(code));
        }
    }

    #[test]
    fn read_device_identification_names_function_43() {
        assert_eq!(function_code_of("read_device_identification"), Some(0x2B));
        assert_eq!(
            function_name_of(0x2B),
            Some("encapsulated_interface_transport")
        );
    }

    #[test]
    fn unknown_names_and_codes_have_no_match() {
        assert_eq!(function_name_of(0x00), None);
        assert_eq!(function_name_of(0x09), None);
        assert_eq!(function_name_of(0x41), None);
        assert_eq!(function_code_of("Read_Coils"), None);
        assert_eq!(function_code_of("write_coil"), None);
        assert_eq!(function_code_of(""), None);
    }

    #[test]
    fn raw_request_has_code_but_no_name() {
        let request = Request::Raw {
            function: 0x41,
            data: Bytes::from_static(&[1, 2]),
        };
        assert_eq!(request.function_code(), 0x41);
        assert_eq!(request.function_name(), None);
    }

    #[test]
    fn typed_requests_report_code_and_name() {
        let cases = [
            (
                Request::ReadHoldingRegisters {
                    address: 0,
                    quantity: 1,
                },
                0x03,
                "read_holding_registers",
            ),
            (
                Request::WriteSingleCoil {
                    address: 7,
                    value: true,
                },
                0x05,
                "write_single_coil",
            ),
            (Request::ReadExceptionStatus, 0x07, "read_exception_status"),
            (Request::GetCommEventLog, 0x0C, "get_comm_event_log"),
            (
                Request::ReadWriteMultipleRegisters {
                    read_address: 0,
                    read_quantity: 1,
                    write_address: 0,
                    write_quantity: 1,
                    values: Bytes::from_static(&[0, 0]),
                },
                0x17,
                "read_write_multiple_registers",
            ),
            (
                Request::EncapsulatedInterface {
                    mei_type: 0x0E,
                    data: Bytes::from_static(&[1, 0]),
                },
                0x2B,
                "encapsulated_interface_transport",
            ),
        ];
        for (request, code, name) in cases {
            assert_eq!(request.function_code(), code);
            assert_eq!(request.function_name(), Some(name));
        }
    }
}
