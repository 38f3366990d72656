//! Modbus/TCP framing: the MBAP header, request PDU parsing on the north side,
//! request encoding towards PLCs and response framing and checks.
//!
//! The codec enforces structure and the limits of the Modbus Application
//! Protocol Specification V1.1b3 ("V1.1b3" below) and the Modbus Messaging on
//! TCP/IP Implementation Guide V1.0b. Whether a request is allowed is the
//! policy's decision, not the codec's.

use std::ops::RangeInclusive;

use bytes::{BufMut, Bytes, BytesMut};

use super::pdu::{self, ExceptionCode, Request};

/// MBAP header: transaction id (2), protocol id (2), length (2), unit id (1).
pub const MBAP_HEADER_LEN: usize = 7;
/// Smallest MBAP length: the unit id and a function code.
pub const MIN_MBAP_LENGTH: u16 = 2;
/// Largest MBAP length: the unit id plus the 253-byte maximum PDU
/// (Modbus Messaging on TCP/IP Implementation Guide V1.0b, 4.1).
pub const MAX_MBAP_LENGTH: u16 = 254;
/// Largest PDU, function code included (V1.1b3, 4.1).
pub const MAX_PDU_LEN: usize = 0xFD;
/// Bit that marks an exception response in the function code (V1.1b3, 7).
pub const EXCEPTION_BIT: u8 = 0x80;
/// An exception response PDU: function code and exception code (V1.1b3, 7).
pub const EXCEPTION_PDU_LEN: usize = 2;

/// Number of addresses in each data table: 0x0000..=0xFFFF (V1.1b3, 4.4).
pub const ADDRESS_SPACE: u32 = 0x1_0000;
/// FC 1 and 2: quantity of coils or discrete inputs (V1.1b3, 6.1 and 6.2).
pub const MAX_READ_BITS: u16 = 0x07D0;
/// FC 3 and 4, and the read part of FC 23 (V1.1b3, 6.3, 6.4 and 6.17).
pub const MAX_READ_REGISTERS: u16 = 0x007D;
/// FC 15: quantity of outputs (V1.1b3, 6.11).
pub const MAX_WRITE_COILS: u16 = 0x07B0;
/// FC 16: quantity of registers (V1.1b3, 6.12).
pub const MAX_WRITE_REGISTERS: u16 = 0x007B;
/// FC 23: quantity to write (V1.1b3, 6.17).
pub const MAX_READ_WRITE_REGISTERS: u16 = 0x0079;
/// FC 5: the output value for ON (V1.1b3, 6.5).
pub const COIL_ON: u16 = 0xFF00;
/// FC 5: the output value for OFF (V1.1b3, 6.5).
pub const COIL_OFF: u16 = 0x0000;
/// FC 8: the sub-function whose data is any length and echoed whole (V1.1b3, 6.8.1).
pub const DIAGNOSTICS_RETURN_QUERY_DATA: u16 = 0x0000;
/// FC 8: data bytes after every other sub-function (V1.1b3, 6.8.1).
pub const DIAGNOSTICS_DATA_LEN: usize = 2;
/// FC 20: request byte count (V1.1b3, 6.14).
pub const READ_FILE_BYTE_COUNT: RangeInclusive<u8> = 0x07..=0xF5;
/// FC 21: request byte count (V1.1b3, 6.15).
pub const WRITE_FILE_BYTE_COUNT: RangeInclusive<u8> = 0x09..=0xFB;
/// FC 20 and 21: reference type, file number, record number, record length.
pub const FILE_SUB_REQUEST_LEN: usize = 7;
/// FC 20 and 21: the only reference type defined (V1.1b3, 6.14).
pub const FILE_REFERENCE_TYPE: u8 = 0x06;
/// FC 20 and 21: highest record number in a file (V1.1b3, 6.14).
pub const MAX_FILE_RECORD_NUMBER: u16 = 0x270F;
/// FC 20: upper bound of the response data length, which limits how many
/// registers one request may read (V1.1b3, 6.14).
pub const MAX_READ_FILE_RESPONSE_LEN: usize = 0xF5;
/// FC 24: largest FIFO count in a response (V1.1b3, 6.18).
pub const MAX_FIFO_COUNT: u16 = 0x001F;
/// FC 12: status, event count and message count before the events (V1.1b3, 6.10).
pub const EVENT_LOG_HEADER_LEN: usize = 6;
/// FC 12: largest number of event bytes in a response (V1.1b3, 6.10).
pub const MAX_EVENT_LOG_EVENTS: usize = 64;
/// FC 43: MEI type CANopen General Reference (V1.1b3, 6.20).
pub const MEI_CANOPEN_GENERAL_REFERENCE: u8 = 0x0D;
/// FC 43: MEI type Read Device Identification (V1.1b3, 6.21).
pub const MEI_READ_DEVICE_IDENTIFICATION: u8 = 0x0E;
/// FC 43/14: basic, regular, extended and specific access (V1.1b3, 6.21).
pub const READ_DEVICE_ID_CODES: RangeInclusive<u8> = 0x01..=0x04;
/// FC 43/14: MEI type, read device id code, conformity level, more follows,
/// next object id and number of objects open every response (V1.1b3, 6.21).
pub const DEVICE_ID_RESPONSE_HEADER_LEN: usize = 6;

/// Bytes before the part that the MBAP length counts: transaction id,
/// protocol id and the length itself.
const MBAP_LENGTH_PREFIX: usize = 6;

/// The parts of an MBAP header that survive parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub transaction_id: u16,
    pub unit: u8,
}

/// One complete client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Request {
        header: Header,
        request: Request,
    },
    /// A frame whose PDU breaks the specification: it is answered with
    /// `exception` and never forwarded.
    Invalid {
        header: Header,
        function: u8,
        exception: ExceptionCode,
        error: PduError,
    },
}

/// A framing failure after which the byte stream cannot be trusted: the
/// connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("MBAP protocol id {protocol_id:#06x} is not 0")]
    ProtocolId { protocol_id: u16 },
    #[error("MBAP length {length} outside {MIN_MBAP_LENGTH}..={MAX_MBAP_LENGTH}")]
    Length { length: u16 },
    #[error("function code {function:#04x} has the exception bit set in a request")]
    ExceptionFunction { function: u8 },
}

/// A PDU that contradicts its length or the limits of its function.
///
/// Lengths count the data bytes after the function code. `exception_code`
/// picks the exception code sent to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("function code 0 is not defined")]
    FunctionZero,
    #[error("function {function} needs {expected} data bytes, got {actual}")]
    DataLength {
        function: u8,
        expected: usize,
        actual: usize,
    },
    #[error("function {function} needs at least {min} data bytes, got {actual}")]
    DataTooShort {
        function: u8,
        min: usize,
        actual: usize,
    },
    #[error("quantity {quantity} outside 1..={max} for function {function}")]
    Quantity {
        function: u8,
        quantity: u16,
        max: u16,
    },
    #[error("write quantity {quantity} outside 1..={max} for function {function}")]
    WriteQuantity {
        function: u8,
        quantity: u16,
        max: u16,
    },
    #[error("address {address} plus quantity {quantity} exceeds {ADDRESS_SPACE} for function {function}")]
    AddressRange {
        function: u8,
        address: u16,
        quantity: u16,
    },
    #[error(
        "byte count {byte_count} does not match {expected} for the quantity of function {function}"
    )]
    ByteCount {
        function: u8,
        byte_count: u8,
        expected: usize,
    },
    #[error("byte count {byte_count} but {remaining} bytes follow for function {function}")]
    ByteCountRemainder {
        function: u8,
        byte_count: u8,
        remaining: usize,
    },
    #[error(
        "byte count {byte_count:#04x} outside {min:#04x}..={max:#04x} for function {function}"
    )]
    ByteCountRange {
        function: u8,
        byte_count: u8,
        min: u8,
        max: u8,
    },
    #[error("byte count {byte_count} is not a multiple of the {FILE_SUB_REQUEST_LEN}-byte sub-request for function {function}")]
    FileByteCountMultiple { function: u8, byte_count: u8 },
    #[error("sub-request {index} runs past the byte count for function {function}")]
    FileSubRequestTruncated { function: u8, index: usize },
    #[error("sub-request {index} has reference type {reference_type}, expected {FILE_REFERENCE_TYPE} for function {function}")]
    FileReferenceType {
        function: u8,
        index: usize,
        reference_type: u8,
    },
    #[error("sub-request {index} names file 0, files start at 1 for function {function}")]
    FileNumber { function: u8, index: usize },
    #[error("sub-request {index} record number {record_number:#06x} exceeds maximum {MAX_FILE_RECORD_NUMBER:#06x} for function {function}")]
    FileRecordNumber {
        function: u8,
        index: usize,
        record_number: u16,
    },
    #[error(
        "read file record response would need {length} bytes, maximum {MAX_READ_FILE_RESPONSE_LEN}"
    )]
    FileResponseTooLong { length: usize },
    #[error("coil value {value:#06x} is neither {COIL_OFF:#06x} nor {COIL_ON:#06x}")]
    CoilValue { value: u16 },
    #[error("diagnostics sub-function {sub_function:#06x} needs {DIAGNOSTICS_DATA_LEN} data bytes, got {actual}")]
    DiagnosticsData { sub_function: u16, actual: usize },
    #[error("MEI type {mei_type:#04x} is neither {MEI_CANOPEN_GENERAL_REFERENCE:#04x} nor {MEI_READ_DEVICE_IDENTIFICATION:#04x}")]
    MeiType { mei_type: u8 },
    #[error("read device id code {code} outside 1..=4")]
    ReadDeviceIdCode { code: u8 },
}

impl PduError {
    /// Returns the exception code the client gets for this error.
    ///
    /// Following the state diagrams of V1.1b3 section 6, an address or file
    /// reference outside its table gets 02, an undefined function code 01,
    /// and every other length, count or value error 03. An unknown MEI type
    /// also gets 03 because V1.1b3 defines no exception for it.
    pub fn exception_code(&self) -> ExceptionCode {
        match self {
            PduError::FunctionZero => ExceptionCode::IllegalFunction,
            PduError::AddressRange { .. }
            | PduError::FileReferenceType { .. }
            | PduError::FileNumber { .. }
            | PduError::FileRecordNumber { .. } => ExceptionCode::IllegalDataAddress,
            _ => ExceptionCode::IllegalDataValue,
        }
    }
}

/// A response frame from a PLC, split from the stream but not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    pub header: Header,
    /// The PDU: function code and data.
    pub pdu: Bytes,
}

/// A response that does not answer its request.
///
/// Lengths count the data bytes after the function code, except in
/// `ExceptionLength` and `TooLong`, which count the whole PDU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("response PDU is empty")]
    Empty,
    #[error("response PDU of {length} bytes exceeds maximum {MAX_PDU_LEN}")]
    TooLong { length: usize },
    #[error(
        "response function code {actual:#04x} does not match request function {expected:#04x}"
    )]
    Function { expected: u8, actual: u8 },
    #[error(
        "exception response to function {function} is {length} bytes, expected {EXCEPTION_PDU_LEN}"
    )]
    ExceptionLength { function: u8, length: usize },
    #[error("response to function {function} has {actual} data bytes, expected {expected}")]
    Length {
        function: u8,
        expected: usize,
        actual: usize,
    },
    #[error("response to function {function} has {actual} data bytes, expected at least {min}")]
    TooShort {
        function: u8,
        min: usize,
        actual: usize,
    },
    #[error("response to function {function} has byte count {actual}, expected {expected}")]
    ByteCount {
        function: u8,
        expected: usize,
        actual: usize,
    },
    #[error("response to function {function} has byte count {byte_count} outside {min}..={max}")]
    ByteCountRange {
        function: u8,
        byte_count: usize,
        min: usize,
        max: usize,
    },
    #[error(
        "response to function {function} echoes {field} {actual:#06x}, expected {expected:#06x}"
    )]
    Echo {
        function: u8,
        field: &'static str,
        expected: u16,
        actual: u16,
    },
    #[error("response to function {function} differs from the request data at data byte {offset}")]
    DataEcho { function: u8, offset: usize },
    #[error("FIFO count {count} exceeds maximum {MAX_FIFO_COUNT}")]
    FifoCount { count: u16 },
    #[error("file sub-response {index} has length {actual}, expected {expected} for the record length requested")]
    FileSubResponseLength {
        index: usize,
        expected: usize,
        actual: usize,
    },
    #[error("file sub-response {index} has reference type {reference_type}, expected {FILE_REFERENCE_TYPE}")]
    FileReferenceType { index: usize, reference_type: u8 },
    #[error("device identification more-follows value {value:#04x} is neither 0x00 nor 0xff")]
    MoreFollows { value: u8 },
    #[error("device identification object {index} runs past the end of the response")]
    DeviceIdObjectTruncated { index: usize },
}

/// Returns the exception response PDU for `function`.
pub fn exception_pdu(function: u8, code: ExceptionCode) -> [u8; EXCEPTION_PDU_LEN] {
    [function | EXCEPTION_BIT, code.code()]
}

/// Splits one client frame off `buf`; `Ok(None)` means more bytes are needed.
///
/// A header error returns before the body arrives and consumes nothing. Every
/// other result consumes exactly one frame, so decoding resumes at the next
/// frame boundary that the MBAP length gives.
pub fn decode_request(buf: &mut BytesMut) -> Result<Option<Decoded>, FrameError> {
    let Some((header, pdu)) = split_frame(buf)? else {
        return Ok(None);
    };

    // The MBAP length is at least 2, so the PDU contains a function code.
    let function = pdu[0];
    if function & EXCEPTION_BIT != 0 {
        return Err(FrameError::ExceptionFunction { function });
    }

    let decoded = match parse_request(function, pdu.slice(1..)) {
        Ok(request) => Decoded::Request { header, request },
        Err(error) => Decoded::Invalid {
            header,
            function,
            exception: error.exception_code(),
            error,
        },
    };
    Ok(Some(decoded))
}

/// Splits one PLC response frame off `buf`; `Ok(None)` means more bytes are needed.
///
/// Only the MBAP header is checked here; `check_response` checks the PDU.
pub fn decode_response(buf: &mut BytesMut) -> Result<Option<RawResponse>, FrameError> {
    let frame = split_frame(buf)?;
    Ok(frame.map(|(header, pdu)| RawResponse { header, pdu }))
}

/// Checks the MBAP header at the start of `buf` and, once the whole frame
/// is there, splits it off without copying.
fn split_frame(buf: &mut BytesMut) -> Result<Option<(Header, Bytes)>, FrameError> {
    if buf.len() < MBAP_HEADER_LEN {
        return Ok(None);
    }

    let protocol_id = be_u16(buf, 2);
    if protocol_id != 0 {
        return Err(FrameError::ProtocolId { protocol_id });
    }

    // Checked before waiting for the body, so that a huge announced length
    // cannot make the caller buffer a flood.
    let length = be_u16(buf, 4);
    if !(MIN_MBAP_LENGTH..=MAX_MBAP_LENGTH).contains(&length) {
        return Err(FrameError::Length { length });
    }

    let frame_len = MBAP_LENGTH_PREFIX + usize::from(length);
    if buf.len() < frame_len {
        return Ok(None);
    }

    let header = Header {
        transaction_id: be_u16(buf, 0),
        unit: buf[6],
    };
    let frame = buf.split_to(frame_len).freeze();
    Ok(Some((header, frame.slice(MBAP_HEADER_LEN..))))
}

/// Reads a big-endian u16 at `at`; callers check the length first.
fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// Parses the data after the function code into a typed request.
fn parse_request(function: u8, data: Bytes) -> Result<Request, PduError> {
    match function {
        0 => Err(PduError::FunctionZero),
        pdu::READ_COILS => {
            let (address, quantity) = parse_read(function, &data, MAX_READ_BITS)?;
            Ok(Request::ReadCoils { address, quantity })
        }
        pdu::READ_DISCRETE_INPUTS => {
            let (address, quantity) = parse_read(function, &data, MAX_READ_BITS)?;
            Ok(Request::ReadDiscreteInputs { address, quantity })
        }
        pdu::READ_HOLDING_REGISTERS => {
            let (address, quantity) = parse_read(function, &data, MAX_READ_REGISTERS)?;
            Ok(Request::ReadHoldingRegisters { address, quantity })
        }
        pdu::READ_INPUT_REGISTERS => {
            let (address, quantity) = parse_read(function, &data, MAX_READ_REGISTERS)?;
            Ok(Request::ReadInputRegisters { address, quantity })
        }
        pdu::WRITE_SINGLE_COIL => parse_write_single_coil(&data),
        pdu::WRITE_SINGLE_REGISTER => {
            expect_data_len(function, &data, 4)?;
            Ok(Request::WriteSingleRegister {
                address: be_u16(&data, 0),
                value: be_u16(&data, 2),
            })
        }
        pdu::READ_EXCEPTION_STATUS => {
            expect_data_len(function, &data, 0).map(|()| Request::ReadExceptionStatus)
        }
        pdu::DIAGNOSTICS => parse_diagnostics(data),
        pdu::GET_COMM_EVENT_COUNTER => {
            expect_data_len(function, &data, 0).map(|()| Request::GetCommEventCounter)
        }
        pdu::GET_COMM_EVENT_LOG => {
            expect_data_len(function, &data, 0).map(|()| Request::GetCommEventLog)
        }
        pdu::WRITE_MULTIPLE_COILS => {
            let (address, quantity, values) = parse_write_multiple(function, data)?;
            Ok(Request::WriteMultipleCoils {
                address,
                quantity,
                values,
            })
        }
        pdu::WRITE_MULTIPLE_REGISTERS => {
            let (address, quantity, values) = parse_write_multiple(function, data)?;
            Ok(Request::WriteMultipleRegisters {
                address,
                quantity,
                values,
            })
        }
        pdu::REPORT_SERVER_ID => {
            expect_data_len(function, &data, 0).map(|()| Request::ReportServerId)
        }
        pdu::READ_FILE_RECORD => parse_read_file_record(data),
        pdu::WRITE_FILE_RECORD => parse_write_file_record(data),
        pdu::MASK_WRITE_REGISTER => {
            expect_data_len(function, &data, 6)?;
            Ok(Request::MaskWriteRegister {
                address: be_u16(&data, 0),
                and_mask: be_u16(&data, 2),
                or_mask: be_u16(&data, 4),
            })
        }
        pdu::READ_WRITE_MULTIPLE_REGISTERS => parse_read_write_multiple(data),
        pdu::READ_FIFO_QUEUE => {
            expect_data_len(function, &data, 2)?;
            Ok(Request::ReadFifoQueue {
                address: be_u16(&data, 0),
            })
        }
        pdu::ENCAPSULATED_INTERFACE_TRANSPORT => parse_encapsulated_interface(data),
        _ => Ok(Request::Raw { function, data }),
    }
}

fn expect_data_len(function: u8, data: &[u8], expected: usize) -> Result<(), PduError> {
    if data.len() == expected {
        Ok(())
    } else {
        Err(PduError::DataLength {
            function,
            expected,
            actual: data.len(),
        })
    }
}

fn expect_data_at_least(function: u8, data: &[u8], min: usize) -> Result<(), PduError> {
    if data.len() >= min {
        Ok(())
    } else {
        Err(PduError::DataTooShort {
            function,
            min,
            actual: data.len(),
        })
    }
}

fn check_quantity(function: u8, quantity: u16, max: u16) -> Result<(), PduError> {
    if (1..=max).contains(&quantity) {
        Ok(())
    } else {
        Err(PduError::Quantity {
            function,
            quantity,
            max,
        })
    }
}

/// Rejects a range that runs past the last address, 0xFFFF.
fn check_address_range(function: u8, address: u16, quantity: u16) -> Result<(), PduError> {
    if u32::from(address) + u32::from(quantity) <= ADDRESS_SPACE {
        Ok(())
    } else {
        Err(PduError::AddressRange {
            function,
            address,
            quantity,
        })
    }
}

/// Checks the byte count against the count the quantity implies, then
/// against the bytes that follow it in the frame.
fn check_byte_count(
    function: u8,
    byte_count: u8,
    expected: usize,
    remaining: usize,
) -> Result<(), PduError> {
    if usize::from(byte_count) != expected {
        return Err(PduError::ByteCount {
            function,
            byte_count,
            expected,
        });
    }
    if usize::from(byte_count) != remaining {
        return Err(PduError::ByteCountRemainder {
            function,
            byte_count,
            remaining,
        });
    }
    Ok(())
}

/// Bytes that carry `quantity` coils, eight to a byte.
fn coil_bytes(quantity: u16) -> usize {
    usize::from(quantity).div_ceil(8)
}

/// Parses FC 1 to 4: starting address and quantity.
fn parse_read(function: u8, data: &[u8], max: u16) -> Result<(u16, u16), PduError> {
    expect_data_len(function, data, 4)?;
    let address = be_u16(data, 0);
    let quantity = be_u16(data, 2);

    // Value errors (03) come before address errors (02), as in V1.1b3.
    check_quantity(function, quantity, max)?;
    check_address_range(function, address, quantity)?;
    Ok((address, quantity))
}

fn parse_write_single_coil(data: &[u8]) -> Result<Request, PduError> {
    expect_data_len(pdu::WRITE_SINGLE_COIL, data, 4)?;
    let address = be_u16(data, 0);
    let value = match be_u16(data, 2) {
        COIL_ON => true,
        COIL_OFF => false,
        value => return Err(PduError::CoilValue { value }),
    };
    Ok(Request::WriteSingleCoil { address, value })
}

fn parse_diagnostics(data: Bytes) -> Result<Request, PduError> {
    expect_data_at_least(pdu::DIAGNOSTICS, &data, 2)?;
    let sub_function = be_u16(&data, 0);
    let rest = data.slice(2..);

    // NOTE: the length rule also applies to reserved sub-functions, which
    // V1.1b3 does not describe. Their data values are left to the device.
    if sub_function != DIAGNOSTICS_RETURN_QUERY_DATA && rest.len() != DIAGNOSTICS_DATA_LEN {
        return Err(PduError::DiagnosticsData {
            sub_function,
            actual: rest.len(),
        });
    }
    Ok(Request::Diagnostics {
        sub_function,
        data: rest,
    })
}

/// Parses FC 15 and 16: address, quantity, byte count and values.
fn parse_write_multiple(function: u8, data: Bytes) -> Result<(u16, u16, Bytes), PduError> {
    const FIXED_LEN: usize = 5;
    expect_data_at_least(function, &data, FIXED_LEN)?;
    let address = be_u16(&data, 0);
    let quantity = be_u16(&data, 2);
    let byte_count = data[4];

    let (max, expected) = if function == pdu::WRITE_MULTIPLE_COILS {
        (MAX_WRITE_COILS, coil_bytes(quantity))
    } else {
        (MAX_WRITE_REGISTERS, 2 * usize::from(quantity))
    };
    check_quantity(function, quantity, max)?;
    check_byte_count(function, byte_count, expected, data.len() - FIXED_LEN)?;
    check_address_range(function, address, quantity)?;
    Ok((address, quantity, data.slice(FIXED_LEN..)))
}

fn parse_read_write_multiple(data: Bytes) -> Result<Request, PduError> {
    const FUNCTION: u8 = pdu::READ_WRITE_MULTIPLE_REGISTERS;
    const FIXED_LEN: usize = 9;
    expect_data_at_least(FUNCTION, &data, FIXED_LEN)?;
    let read_address = be_u16(&data, 0);
    let read_quantity = be_u16(&data, 2);
    let write_address = be_u16(&data, 4);
    let write_quantity = be_u16(&data, 6);
    let byte_count = data[8];

    check_quantity(FUNCTION, read_quantity, MAX_READ_REGISTERS)?;
    if !(1..=MAX_READ_WRITE_REGISTERS).contains(&write_quantity) {
        return Err(PduError::WriteQuantity {
            function: FUNCTION,
            quantity: write_quantity,
            max: MAX_READ_WRITE_REGISTERS,
        });
    }
    let expected = 2 * usize::from(write_quantity);
    check_byte_count(FUNCTION, byte_count, expected, data.len() - FIXED_LEN)?;
    check_address_range(FUNCTION, read_address, read_quantity)?;
    check_address_range(FUNCTION, write_address, write_quantity)?;

    Ok(Request::ReadWriteMultipleRegisters {
        read_address,
        read_quantity,
        write_address,
        write_quantity,
        values: data.slice(FIXED_LEN..),
    })
}

/// Checks the byte count of FC 20 or 21 against its range and the bytes
/// that follow, and returns the sub-request list.
fn file_record_list(
    function: u8,
    data: &Bytes,
    range: RangeInclusive<u8>,
) -> Result<Bytes, PduError> {
    expect_data_at_least(function, data, 1)?;
    let byte_count = data[0];
    if !range.contains(&byte_count) {
        return Err(PduError::ByteCountRange {
            function,
            byte_count,
            min: *range.start(),
            max: *range.end(),
        });
    }
    let remaining = data.len() - 1;
    if usize::from(byte_count) != remaining {
        return Err(PduError::ByteCountRemainder {
            function,
            byte_count,
            remaining,
        });
    }
    Ok(data.slice(1..))
}

/// Checks reference type, file number and record number of one file
/// sub-request; `sub_request` holds at least its 7 fixed bytes.
fn check_file_reference(function: u8, index: usize, sub_request: &[u8]) -> Result<(), PduError> {
    let reference_type = sub_request[0];
    if reference_type != FILE_REFERENCE_TYPE {
        return Err(PduError::FileReferenceType {
            function,
            index,
            reference_type,
        });
    }
    if be_u16(sub_request, 1) == 0 {
        return Err(PduError::FileNumber { function, index });
    }
    let record_number = be_u16(sub_request, 3);
    if record_number > MAX_FILE_RECORD_NUMBER {
        return Err(PduError::FileRecordNumber {
            function,
            index,
            record_number,
        });
    }
    Ok(())
}

fn parse_read_file_record(data: Bytes) -> Result<Request, PduError> {
    const FUNCTION: u8 = pdu::READ_FILE_RECORD;
    let list = file_record_list(FUNCTION, &data, READ_FILE_BYTE_COUNT)?;
    if list.len() % FILE_SUB_REQUEST_LEN != 0 {
        return Err(PduError::FileByteCountMultiple {
            function: FUNCTION,
            byte_count: data[0],
        });
    }

    // Each sub-response carries its length byte, the reference type and
    // the records, and together they must fit the response data length.
    let mut response_len = 0;
    for (index, sub_request) in list.chunks_exact(FILE_SUB_REQUEST_LEN).enumerate() {
        check_file_reference(FUNCTION, index, sub_request)?;
        response_len += 2 + 2 * usize::from(be_u16(sub_request, 5));
    }
    if response_len > MAX_READ_FILE_RESPONSE_LEN {
        return Err(PduError::FileResponseTooLong {
            length: response_len,
        });
    }
    Ok(Request::ReadFileRecord { data: list })
}

fn parse_write_file_record(data: Bytes) -> Result<Request, PduError> {
    const FUNCTION: u8 = pdu::WRITE_FILE_RECORD;
    let list = file_record_list(FUNCTION, &data, WRITE_FILE_BYTE_COUNT)?;

    // Sub-requests have variable length: 7 fixed bytes, then the record
    // length in registers. They must end exactly at the byte count.
    let mut offset = 0;
    let mut index = 0;
    while offset < list.len() {
        let Some(fixed) = list.get(offset..offset + FILE_SUB_REQUEST_LEN) else {
            return Err(PduError::FileSubRequestTruncated {
                function: FUNCTION,
                index,
            });
        };
        check_file_reference(FUNCTION, index, fixed)?;
        offset += FILE_SUB_REQUEST_LEN + 2 * usize::from(be_u16(fixed, 5));
        if offset > list.len() {
            return Err(PduError::FileSubRequestTruncated {
                function: FUNCTION,
                index,
            });
        }
        index += 1;
    }
    Ok(Request::WriteFileRecord { data: list })
}

/// Parses FC 43. MEI type 13 carries data this codec does not interpret;
/// MEI type 14 carries a read device id code and an object id.
fn parse_encapsulated_interface(data: Bytes) -> Result<Request, PduError> {
    const FUNCTION: u8 = pdu::ENCAPSULATED_INTERFACE_TRANSPORT;
    expect_data_at_least(FUNCTION, &data, 1)?;
    let mei_type = data[0];
    match mei_type {
        MEI_CANOPEN_GENERAL_REFERENCE => {}
        MEI_READ_DEVICE_IDENTIFICATION => {
            expect_data_len(FUNCTION, &data, 3)?;
            let code = data[1];
            if !READ_DEVICE_ID_CODES.contains(&code) {
                return Err(PduError::ReadDeviceIdCode { code });
            }
        }
        _ => return Err(PduError::MeiType { mei_type }),
    }
    Ok(Request::EncapsulatedInterface {
        mei_type,
        data: data.slice(1..),
    })
}

/// Appends the MBAP header and PDU for `request` to `out`.
///
/// Requests from `decode_request` always fit a frame. A request built by
/// hand must respect the same limits: its PDU may be at most 253 bytes, and
/// a byte count field is written from the length of `values` or `data`.
pub fn encode_request(header: Header, request: &Request, out: &mut BytesMut) {
    let start = begin_frame(header, out);
    out.put_u8(request.function_code());
    encode_request_data(request, out);
    finish_frame(start, out);
}

fn encode_request_data(request: &Request, out: &mut BytesMut) {
    match request {
        Request::ReadCoils { address, quantity }
        | Request::ReadDiscreteInputs { address, quantity }
        | Request::ReadHoldingRegisters { address, quantity }
        | Request::ReadInputRegisters { address, quantity } => {
            out.put_u16(*address);
            out.put_u16(*quantity);
        }
        Request::WriteSingleCoil { address, value } => {
            out.put_u16(*address);
            out.put_u16(if *value { COIL_ON } else { COIL_OFF });
        }
        Request::WriteSingleRegister { address, value } => {
            out.put_u16(*address);
            out.put_u16(*value);
        }
        Request::ReadExceptionStatus
        | Request::GetCommEventCounter
        | Request::GetCommEventLog
        | Request::ReportServerId => {}
        Request::Diagnostics { sub_function, data } => {
            out.put_u16(*sub_function);
            out.put_slice(data);
        }
        Request::WriteMultipleCoils {
            address,
            quantity,
            values,
        }
        | Request::WriteMultipleRegisters {
            address,
            quantity,
            values,
        } => {
            out.put_u16(*address);
            out.put_u16(*quantity);
            put_counted(values, out);
        }
        Request::ReadFileRecord { data } | Request::WriteFileRecord { data } => {
            put_counted(data, out);
        }
        Request::MaskWriteRegister {
            address,
            and_mask,
            or_mask,
        } => {
            out.put_u16(*address);
            out.put_u16(*and_mask);
            out.put_u16(*or_mask);
        }
        Request::ReadWriteMultipleRegisters {
            read_address,
            read_quantity,
            write_address,
            write_quantity,
            values,
        } => {
            out.put_u16(*read_address);
            out.put_u16(*read_quantity);
            out.put_u16(*write_address);
            out.put_u16(*write_quantity);
            put_counted(values, out);
        }
        Request::ReadFifoQueue { address } => out.put_u16(*address),
        Request::EncapsulatedInterface { mei_type, data } => {
            out.put_u8(*mei_type);
            out.put_slice(data);
        }
        Request::Raw { data, .. } => out.put_slice(data),
    }
}

/// Appends a one-byte byte count and `bytes`. A decoded request never contains
/// more than 255 bytes here, and a longer slice saturates the count.
fn put_counted(bytes: &[u8], out: &mut BytesMut) {
    out.put_u8(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    out.put_slice(bytes);
}

/// Appends an exception response for `function` to `out`.
pub fn encode_exception(header: Header, function: u8, code: ExceptionCode, out: &mut BytesMut) {
    encode_response(header, &exception_pdu(function, code), out);
}

/// Appends a response frame carrying `pdu` (already checked) to `out`.
pub fn encode_response(header: Header, pdu: &[u8], out: &mut BytesMut) {
    let start = begin_frame(header, out);
    out.put_slice(pdu);
    finish_frame(start, out);
}

/// Appends an MBAP header whose length `finish_frame` fills in, and returns
/// where the frame starts in `out`.
fn begin_frame(header: Header, out: &mut BytesMut) -> usize {
    out.reserve(MBAP_HEADER_LEN + MAX_PDU_LEN);
    let start = out.len();
    out.put_u16(header.transaction_id);
    out.put_u16(0);
    out.put_u16(0);
    out.put_u8(header.unit);
    start
}

fn finish_frame(start: usize, out: &mut BytesMut) {
    let counted = out.len() - start - MBAP_LENGTH_PREFIX;
    let length = u16::try_from(counted).unwrap_or(u16::MAX);
    out[start + 4..start + MBAP_LENGTH_PREFIX].copy_from_slice(&length.to_be_bytes());
}

/// Checks that `pdu` is a well-formed answer (normal or exception) to `request`.
///
/// An exception response is exactly the function code with the exception
/// bit and one exception code, whatever that code is. A normal response
/// must carry the request's function code and the structure V1.1b3 gives it.
pub fn check_response(request: &Request, pdu: &[u8]) -> Result<(), ResponseError> {
    let Some((&function, data)) = pdu.split_first() else {
        return Err(ResponseError::Empty);
    };
    if pdu.len() > MAX_PDU_LEN {
        return Err(ResponseError::TooLong { length: pdu.len() });
    }

    let expected = request.function_code();
    if function == expected | EXCEPTION_BIT && function != expected {
        if pdu.len() != EXCEPTION_PDU_LEN {
            return Err(ResponseError::ExceptionLength {
                function: expected,
                length: pdu.len(),
            });
        }
        return Ok(());
    }
    if function != expected {
        return Err(ResponseError::Function {
            expected,
            actual: function,
        });
    }
    check_response_data(request, expected, data)
}

/// Checks the data of a normal response after its function code.
fn check_response_data(request: &Request, function: u8, data: &[u8]) -> Result<(), ResponseError> {
    match request {
        Request::ReadCoils { quantity, .. } | Request::ReadDiscreteInputs { quantity, .. } => {
            check_counted(function, data, coil_bytes(*quantity))
        }
        Request::ReadHoldingRegisters { quantity, .. }
        | Request::ReadInputRegisters { quantity, .. } => {
            check_counted(function, data, 2 * usize::from(*quantity))
        }
        Request::ReadWriteMultipleRegisters { read_quantity, .. } => {
            check_counted(function, data, 2 * usize::from(*read_quantity))
        }
        Request::WriteSingleCoil { address, value } => {
            let value = if *value { COIL_ON } else { COIL_OFF };
            check_echo(function, data, &[("address", *address), ("value", value)])
        }
        Request::WriteSingleRegister { address, value } => {
            check_echo(function, data, &[("address", *address), ("value", *value)])
        }
        Request::WriteMultipleCoils {
            address, quantity, ..
        }
        | Request::WriteMultipleRegisters {
            address, quantity, ..
        } => check_echo(
            function,
            data,
            &[("address", *address), ("quantity", *quantity)],
        ),
        Request::MaskWriteRegister {
            address,
            and_mask,
            or_mask,
        } => check_echo(
            function,
            data,
            &[
                ("address", *address),
                ("and_mask", *and_mask),
                ("or_mask", *or_mask),
            ],
        ),
        Request::ReadExceptionStatus => expect_response_len(function, data, 1),
        Request::GetCommEventCounter => expect_response_len(function, data, 4),
        Request::Diagnostics {
            sub_function,
            data: query,
        } => check_diagnostics_response(*sub_function, query, data),
        Request::GetCommEventLog => check_event_log_response(data),
        Request::ReportServerId => {
            expect_response_at_least(function, data, 1)?;
            expect_response_len(function, data, 1 + usize::from(data[0]))
        }
        Request::ReadFileRecord { data: sub_requests } => {
            check_read_file_response(sub_requests, data)
        }
        Request::WriteFileRecord { data: sub_requests } => {
            expect_response_len(function, data, 1 + sub_requests.len())?;
            let byte_count = u8::try_from(sub_requests.len()).unwrap_or(u8::MAX);
            check_same_bytes(function, 0, &[byte_count], &data[..1])?;
            check_same_bytes(function, 1, sub_requests, &data[1..])
        }
        Request::ReadFifoQueue { .. } => check_fifo_response(data),
        Request::EncapsulatedInterface {
            mei_type,
            data: query,
        } => check_encapsulated_response(*mei_type, query, data),
        // Any function code with at most 253 bytes of PDU, checked above.
        Request::Raw { .. } => Ok(()),
    }
}

fn expect_response_len(function: u8, data: &[u8], expected: usize) -> Result<(), ResponseError> {
    if data.len() == expected {
        Ok(())
    } else {
        Err(ResponseError::Length {
            function,
            expected,
            actual: data.len(),
        })
    }
}

fn expect_response_at_least(function: u8, data: &[u8], min: usize) -> Result<(), ResponseError> {
    if data.len() >= min {
        Ok(())
    } else {
        Err(ResponseError::TooShort {
            function,
            min,
            actual: data.len(),
        })
    }
}

/// Checks a one-byte byte count against `expected` and the bytes that follow.
fn check_counted(function: u8, data: &[u8], expected: usize) -> Result<(), ResponseError> {
    expect_response_at_least(function, data, 1)?;
    let byte_count = usize::from(data[0]);
    if byte_count != expected {
        return Err(ResponseError::ByteCount {
            function,
            expected,
            actual: byte_count,
        });
    }
    expect_response_len(function, data, 1 + byte_count)
}

/// Checks that `data` is exactly the named u16 fields of the request.
fn check_echo(
    function: u8,
    data: &[u8],
    fields: &[(&'static str, u16)],
) -> Result<(), ResponseError> {
    expect_response_len(function, data, 2 * fields.len())?;
    for (index, (field, expected)) in fields.iter().enumerate() {
        let actual = be_u16(data, 2 * index);
        if actual != *expected {
            return Err(ResponseError::Echo {
                function,
                field,
                expected: *expected,
                actual,
            });
        }
    }
    Ok(())
}

/// Compares an echoed part of equal length; `offset` is where `actual`
/// starts in the response data.
fn check_same_bytes(
    function: u8,
    offset: usize,
    expected: &[u8],
    actual: &[u8],
) -> Result<(), ResponseError> {
    match expected.iter().zip(actual).position(|(e, a)| e != a) {
        Some(position) => Err(ResponseError::DataEcho {
            function,
            offset: offset + position,
        }),
        None => Ok(()),
    }
}

/// Sub-function 0 echoes the whole query. The others echo the sub-function
/// and carry two data bytes, whose value depends on the sub-function.
fn check_diagnostics_response(
    sub_function: u16,
    query: &[u8],
    data: &[u8],
) -> Result<(), ResponseError> {
    const FUNCTION: u8 = pdu::DIAGNOSTICS;
    if sub_function == DIAGNOSTICS_RETURN_QUERY_DATA {
        expect_response_len(FUNCTION, data, 2 + query.len())?;
        check_same_bytes(FUNCTION, 0, &sub_function.to_be_bytes(), &data[..2])?;
        return check_same_bytes(FUNCTION, 2, query, &data[2..]);
    }
    expect_response_len(FUNCTION, data, 2 + DIAGNOSTICS_DATA_LEN)?;
    let actual = be_u16(data, 0);
    if actual != sub_function {
        return Err(ResponseError::Echo {
            function: FUNCTION,
            field: "sub_function",
            expected: sub_function,
            actual,
        });
    }
    Ok(())
}

/// FC 12: byte count, status, event count, message count, then 0 to 64 events.
fn check_event_log_response(data: &[u8]) -> Result<(), ResponseError> {
    const FUNCTION: u8 = pdu::GET_COMM_EVENT_LOG;
    expect_response_at_least(FUNCTION, data, 1)?;
    let byte_count = usize::from(data[0]);
    let max = EVENT_LOG_HEADER_LEN + MAX_EVENT_LOG_EVENTS;
    if !(EVENT_LOG_HEADER_LEN..=max).contains(&byte_count) {
        return Err(ResponseError::ByteCountRange {
            function: FUNCTION,
            byte_count,
            min: EVENT_LOG_HEADER_LEN,
            max,
        });
    }
    expect_response_len(FUNCTION, data, 1 + byte_count)
}

/// FC 20: every sub-response must carry the records its sub-request asked for.
///
/// NOTE: V1.1b3 gives the response data length as 0x07..=0xF5, but a single
/// one-register record yields 4 bytes, so only the upper bound and the
/// structure are checked.
fn check_read_file_response(sub_requests: &[u8], data: &[u8]) -> Result<(), ResponseError> {
    const FUNCTION: u8 = pdu::READ_FILE_RECORD;
    expect_response_at_least(FUNCTION, data, 1)?;
    let byte_count = usize::from(data[0]);
    if byte_count > MAX_READ_FILE_RESPONSE_LEN {
        return Err(ResponseError::ByteCountRange {
            function: FUNCTION,
            byte_count,
            min: 0,
            max: MAX_READ_FILE_RESPONSE_LEN,
        });
    }
    expect_response_len(FUNCTION, data, 1 + byte_count)?;

    let mut offset = 1;
    for (index, sub_request) in sub_requests.chunks_exact(FILE_SUB_REQUEST_LEN).enumerate() {
        // The length byte counts the reference type and the record data.
        let expected = 1 + 2 * usize::from(be_u16(sub_request, 5));
        let Some(&[length, reference_type]) = data.get(offset..offset + 2) else {
            return Err(ResponseError::Length {
                function: FUNCTION,
                expected: offset + 2,
                actual: data.len(),
            });
        };
        if usize::from(length) != expected {
            return Err(ResponseError::FileSubResponseLength {
                index,
                expected,
                actual: usize::from(length),
            });
        }
        if reference_type != FILE_REFERENCE_TYPE {
            return Err(ResponseError::FileReferenceType {
                index,
                reference_type,
            });
        }
        offset += 1 + expected;
    }
    expect_response_len(FUNCTION, data, offset)
}

/// FC 24: byte count (u16), FIFO count (u16), then the FIFO registers.
fn check_fifo_response(data: &[u8]) -> Result<(), ResponseError> {
    const FUNCTION: u8 = pdu::READ_FIFO_QUEUE;
    expect_response_at_least(FUNCTION, data, 4)?;
    let byte_count = usize::from(be_u16(data, 0));
    let count = be_u16(data, 2);
    if count > MAX_FIFO_COUNT {
        return Err(ResponseError::FifoCount { count });
    }

    // The byte count covers the FIFO count field and the registers.
    let expected = 2 + 2 * usize::from(count);
    if byte_count != expected {
        return Err(ResponseError::ByteCount {
            function: FUNCTION,
            expected,
            actual: byte_count,
        });
    }
    expect_response_len(FUNCTION, data, 2 + byte_count)
}

/// FC 43: the MEI type is echoed. For MEI type 14 the read device id code is
/// echoed too, and the object list must end exactly at the end of the PDU.
fn check_encapsulated_response(
    mei_type: u8,
    query: &[u8],
    data: &[u8],
) -> Result<(), ResponseError> {
    const FUNCTION: u8 = pdu::ENCAPSULATED_INTERFACE_TRANSPORT;
    expect_response_at_least(FUNCTION, data, 1)?;
    if data[0] != mei_type {
        return Err(ResponseError::Echo {
            function: FUNCTION,
            field: "mei_type",
            expected: u16::from(mei_type),
            actual: u16::from(data[0]),
        });
    }
    if mei_type != MEI_READ_DEVICE_IDENTIFICATION {
        return Ok(());
    }

    expect_response_at_least(FUNCTION, data, DEVICE_ID_RESPONSE_HEADER_LEN)?;
    if let Some(&code) = query.first() {
        if data[1] != code {
            return Err(ResponseError::Echo {
                function: FUNCTION,
                field: "read_device_id_code",
                expected: u16::from(code),
                actual: u16::from(data[1]),
            });
        }
    }
    let more_follows = data[3];
    if more_follows != 0x00 && more_follows != 0xFF {
        return Err(ResponseError::MoreFollows {
            value: more_follows,
        });
    }

    // Each object: id (1), length (1), value.
    let mut offset = DEVICE_ID_RESPONSE_HEADER_LEN;
    for index in 0..usize::from(data[5]) {
        let Some(&[_, length]) = data.get(offset..offset + 2) else {
            return Err(ResponseError::DeviceIdObjectTruncated { index });
        };
        offset += 2 + usize::from(length);
        if offset > data.len() {
            return Err(ResponseError::DeviceIdObjectTruncated { index });
        }
    }
    expect_response_len(FUNCTION, data, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: Header = Header {
        transaction_id: 0x0102,
        unit: 0x11,
    };

    type Parsed = Result<Request, (ExceptionCode, PduError)>;

    /// Builds a frame with protocol id 0 and the MBAP length of `pdu`.
    fn frame(header: Header, pdu: &[u8]) -> Vec<u8> {
        let length = u16::try_from(pdu.len() + 1).unwrap();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&header.transaction_id.to_be_bytes());
        bytes.extend_from_slice(&[0, 0]);
        bytes.extend_from_slice(&length.to_be_bytes());
        bytes.push(header.unit);
        bytes.extend_from_slice(pdu);
        bytes
    }

    /// Builds a 7-byte MBAP header with any protocol id and length.
    fn raw_header(protocol_id: u16, length: u16) -> Vec<u8> {
        let mut bytes = vec![0x01, 0x02];
        bytes.extend_from_slice(&protocol_id.to_be_bytes());
        bytes.extend_from_slice(&length.to_be_bytes());
        bytes.push(0x11);
        bytes
    }

    /// Decodes one frame carrying `pdu` and checks that it was consumed whole.
    fn parse(pdu: &[u8]) -> Parsed {
        let mut buf = BytesMut::from(&frame(HEADER, pdu)[..]);
        let decoded = decode_request(&mut buf).unwrap().unwrap();
        assert_eq!(buf.len(), 0);
        match decoded {
            Decoded::Request { header, request } => {
                assert_eq!(header, HEADER);
                Ok(request)
            }
            Decoded::Invalid {
                header,
                function,
                exception,
                error,
            } => {
                assert_eq!(header, HEADER);
                assert_eq!(function, pdu[0]);
                Err((exception, error))
            }
        }
    }

    fn value_error(error: PduError) -> Parsed {
        Err((ExceptionCode::IllegalDataValue, error))
    }

    fn address_error(error: PduError) -> Parsed {
        Err((ExceptionCode::IllegalDataAddress, error))
    }

    fn pdu_of(function: u8, fields: &[u16], tail: &[u8]) -> Vec<u8> {
        let mut pdu = vec![function];
        for field in fields {
            pdu.extend_from_slice(&field.to_be_bytes());
        }
        pdu.extend_from_slice(tail);
        pdu
    }

    /// FC 15 or 16 with a byte count and `values_len` bytes of values.
    fn write_multiple_pdu(
        function: u8,
        address: u16,
        quantity: u16,
        byte_count: u8,
        values_len: usize,
    ) -> Vec<u8> {
        let mut tail = vec![byte_count];
        tail.resize(1 + values_len, 0xA5);
        pdu_of(function, &[address, quantity], &tail)
    }

    fn read_write_pdu(
        read_quantity: u16,
        write_quantity: u16,
        byte_count: u8,
        values_len: usize,
    ) -> Vec<u8> {
        let mut tail = vec![byte_count];
        tail.resize(1 + values_len, 0x5A);
        pdu_of(
            0x17,
            &[0x0010, read_quantity, 0x0020, write_quantity],
            &tail,
        )
    }

    fn read_request(function: u8, address: u16, quantity: u16) -> Request {
        match function {
            1 => Request::ReadCoils { address, quantity },
            2 => Request::ReadDiscreteInputs { address, quantity },
            3 => Request::ReadHoldingRegisters { address, quantity },
            4 => Request::ReadInputRegisters { address, quantity },
            _ => unreachable!("not a read function: {function}"),
        }
    }

    fn bytes_of(len: usize, fill: u8) -> Bytes {
        Bytes::from(vec![fill; len])
    }

    // Framing.

    #[test]
    fn waits_for_the_seven_header_bytes() {
        let whole = frame(HEADER, &[0x03, 0, 0, 0, 1]);
        for len in 0..MBAP_HEADER_LEN {
            let mut buf = BytesMut::from(&whole[..len]);
            assert_eq!(decode_request(&mut buf), Ok(None));
            assert_eq!(buf.len(), len);
        }
    }

    #[test]
    fn decodes_a_frame_split_at_every_byte() {
        let samples = [
            (
                pdu_of(0x03, &[0x006B, 0x0003], &[]),
                Request::ReadHoldingRegisters {
                    address: 0x006B,
                    quantity: 3,
                },
            ),
            (
                pdu_of(0x10, &[0x0001, 0x0002], &[4, 0x00, 0x0A, 0x01, 0x02]),
                Request::WriteMultipleRegisters {
                    address: 1,
                    quantity: 2,
                    values: Bytes::from_static(&[0x00, 0x0A, 0x01, 0x02]),
                },
            ),
            (vec![0x07], Request::ReadExceptionStatus),
            (
                vec![0x2B, 0x0E, 0x01, 0x00],
                Request::EncapsulatedInterface {
                    mei_type: 0x0E,
                    data: Bytes::from_static(&[0x01, 0x00]),
                },
            ),
        ];
        for (pdu, request) in samples {
            let whole = frame(HEADER, &pdu);
            for split in 0..whole.len() {
                let mut buf = BytesMut::from(&whole[..split]);
                assert_eq!(decode_request(&mut buf), Ok(None), "split at {split}");
                assert_eq!(buf.len(), split, "split at {split}");

                buf.extend_from_slice(&whole[split..]);
                let expected = Decoded::Request {
                    header: HEADER,
                    request: request.clone(),
                };
                assert_eq!(
                    decode_request(&mut buf),
                    Ok(Some(expected)),
                    "split at {split}"
                );
                assert_eq!(buf.len(), 0, "split at {split}");
            }
        }
    }

    #[test]
    fn decodes_several_frames_from_one_buffer() {
        let second = Header {
            transaction_id: 0x0103,
            unit: 0x12,
        };
        let mut bytes = frame(HEADER, &[0x03, 0, 0, 0, 1]);
        bytes.extend(frame(second, &[0x06, 0, 5, 0x12, 0x34]));
        bytes.extend_from_slice(&[0x01, 0x04]);
        let mut buf = BytesMut::from(&bytes[..]);

        let first = Decoded::Request {
            header: HEADER,
            request: Request::ReadHoldingRegisters {
                address: 0,
                quantity: 1,
            },
        };
        assert_eq!(decode_request(&mut buf), Ok(Some(first)));
        let write = Decoded::Request {
            header: second,
            request: Request::WriteSingleRegister {
                address: 5,
                value: 0x1234,
            },
        };
        assert_eq!(decode_request(&mut buf), Ok(Some(write)));
        assert_eq!(decode_request(&mut buf), Ok(None));
        assert_eq!(&buf[..], &[0x01, 0x04]);
    }

    #[test]
    fn resumes_after_fc16_with_three_trailing_bytes() {
        // The MBAP length covers 3 bytes more than the byte count announces.
        let mut bytes = frame(
            HEADER,
            &[
                0x10, 0x00, 0x00, 0x00, 0x02, 0x04, 1, 2, 3, 4, 0x03, 0x00, 0x00,
            ],
        );
        let second = Header {
            transaction_id: 0x0103,
            unit: 0x11,
        };
        bytes.extend(frame(second, &[0x03, 0x00, 0x00, 0x00, 0x01]));
        let mut buf = BytesMut::from(&bytes[..]);

        let invalid = Decoded::Invalid {
            header: HEADER,
            function: 0x10,
            exception: ExceptionCode::IllegalDataValue,
            error: PduError::ByteCountRemainder {
                function: 0x10,
                byte_count: 4,
                remaining: 7,
            },
        };
        assert_eq!(decode_request(&mut buf), Ok(Some(invalid)));
        let read = Decoded::Request {
            header: second,
            request: Request::ReadHoldingRegisters {
                address: 0,
                quantity: 1,
            },
        };
        assert_eq!(decode_request(&mut buf), Ok(Some(read)));
        assert_eq!(buf.len(), 0);
    }

    #[test]
    fn rejects_nonzero_protocol_id() {
        for protocol_id in [0x0001, 0x0100, 0xFFFF] {
            let mut buf = BytesMut::from(&raw_header(protocol_id, 6)[..]);
            assert_eq!(
                decode_request(&mut buf),
                Err(FrameError::ProtocolId { protocol_id })
            );
            assert_eq!(buf.len(), MBAP_HEADER_LEN);
        }
    }

    #[test]
    fn rejects_bad_length_before_body() {
        for length in [0, 1, 255, 0xFFFF] {
            let mut buf = BytesMut::from(&raw_header(0, length)[..]);
            assert_eq!(decode_request(&mut buf), Err(FrameError::Length { length }));
            assert_eq!(buf.len(), MBAP_HEADER_LEN);
        }
    }

    #[test]
    fn rejects_length_0xffff_with_a_flood_following() {
        let mut bytes = raw_header(0, 0xFFFF);
        bytes.extend(std::iter::repeat_n(0x03, 4096));
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            decode_request(&mut buf),
            Err(FrameError::Length { length: 0xFFFF })
        );
    }

    #[test]
    fn accepts_mbap_length_2_and_254() {
        assert_eq!(parse(&[0x07]), Ok(Request::ReadExceptionStatus));

        let mut pdu = vec![0x41];
        pdu.resize(MAX_PDU_LEN, 0x33);
        assert_eq!(frame(HEADER, &pdu)[4..6], [0x00, 0xFE]);
        assert_eq!(
            parse(&pdu),
            Ok(Request::Raw {
                function: 0x41,
                data: bytes_of(252, 0x33),
            })
        );
    }

    #[test]
    fn rejects_exception_function_codes() {
        for function in [0x80, 0x83, 0xFF] {
            let mut buf = BytesMut::from(&frame(HEADER, &[function, 0, 0, 0, 1])[..]);
            assert_eq!(
                decode_request(&mut buf),
                Err(FrameError::ExceptionFunction { function })
            );
            assert_eq!(buf.len(), 0);
        }
    }

    #[test]
    fn answers_function_zero_with_illegal_function() {
        assert_eq!(
            parse(&[0x00, 0x01]),
            Err((ExceptionCode::IllegalFunction, PduError::FunctionZero))
        );
    }

    #[test]
    fn keeps_unknown_functions_as_raw() {
        assert_eq!(
            parse(&[0x41, 0x01, 0x02]),
            Ok(Request::Raw {
                function: 0x41,
                data: Bytes::from_static(&[0x01, 0x02]),
            })
        );
        assert_eq!(
            parse(&[0x09]),
            Ok(Request::Raw {
                function: 0x09,
                data: Bytes::new(),
            })
        );
        assert_eq!(
            parse(&[0x7F, 0x00]),
            Ok(Request::Raw {
                function: 0x7F,
                data: Bytes::from_static(&[0x00]),
            })
        );
    }

    // Quantities and byte counts.

    #[test]
    fn read_quantity_boundaries() {
        let limits = [
            (0x01, MAX_READ_BITS),
            (0x02, MAX_READ_BITS),
            (0x03, MAX_READ_REGISTERS),
            (0x04, MAX_READ_REGISTERS),
        ];
        for (function, max) in limits {
            for quantity in [1, max] {
                assert_eq!(
                    parse(&pdu_of(function, &[0, quantity], &[])),
                    Ok(read_request(function, 0, quantity))
                );
            }
            for quantity in [0, max + 1] {
                assert_eq!(
                    parse(&pdu_of(function, &[0, quantity], &[])),
                    value_error(PduError::Quantity {
                        function,
                        quantity,
                        max
                    })
                );
            }
        }
    }

    #[test]
    fn rejects_known_bad_read_quantities() {
        for quantity in [0, 128, 0x9C85] {
            assert_eq!(
                parse(&pdu_of(0x03, &[0, quantity], &[])),
                value_error(PduError::Quantity {
                    function: 3,
                    quantity,
                    max: 125
                })
            );
        }
        assert_eq!(
            parse(&pdu_of(0x01, &[0, 2001], &[])),
            value_error(PduError::Quantity {
                function: 1,
                quantity: 2001,
                max: 2000
            })
        );
    }

    #[test]
    fn write_coils_quantity_boundaries() {
        assert_eq!(
            parse(&write_multiple_pdu(0x0F, 0, 1, 1, 1)),
            Ok(Request::WriteMultipleCoils {
                address: 0,
                quantity: 1,
                values: bytes_of(1, 0xA5),
            })
        );
        assert_eq!(
            parse(&write_multiple_pdu(0x0F, 0, 1968, 246, 246)),
            Ok(Request::WriteMultipleCoils {
                address: 0,
                quantity: 1968,
                values: bytes_of(246, 0xA5),
            })
        );
        for (quantity, byte_count) in [(0, 0), (1969, 247)] {
            assert_eq!(
                parse(&write_multiple_pdu(
                    0x0F,
                    0,
                    quantity,
                    byte_count,
                    byte_count.into()
                )),
                value_error(PduError::Quantity {
                    function: 0x0F,
                    quantity,
                    max: 1968
                })
            );
        }
    }

    #[test]
    fn write_registers_quantity_boundaries() {
        assert_eq!(
            parse(&write_multiple_pdu(0x10, 0, 1, 2, 2)),
            Ok(Request::WriteMultipleRegisters {
                address: 0,
                quantity: 1,
                values: bytes_of(2, 0xA5),
            })
        );
        assert_eq!(
            parse(&write_multiple_pdu(0x10, 0, 123, 246, 246)),
            Ok(Request::WriteMultipleRegisters {
                address: 0,
                quantity: 123,
                values: bytes_of(246, 0xA5),
            })
        );
        // 124 registers do not fit a PDU, so the quantity is sent alone.
        for quantity in [0, 124] {
            assert_eq!(
                parse(&write_multiple_pdu(0x10, 0, quantity, 0, 0)),
                value_error(PduError::Quantity {
                    function: 0x10,
                    quantity,
                    max: 123
                })
            );
        }
    }

    #[test]
    fn read_write_quantity_boundaries() {
        let expected = |read_quantity, write_quantity, values_len| {
            Ok(Request::ReadWriteMultipleRegisters {
                read_address: 0x0010,
                read_quantity,
                write_address: 0x0020,
                write_quantity,
                values: bytes_of(values_len, 0x5A),
            })
        };
        assert_eq!(parse(&read_write_pdu(1, 1, 2, 2)), expected(1, 1, 2));
        assert_eq!(parse(&read_write_pdu(125, 1, 2, 2)), expected(125, 1, 2));
        assert_eq!(
            parse(&read_write_pdu(1, 121, 242, 242)),
            expected(1, 121, 242)
        );

        for read_quantity in [0, 126] {
            assert_eq!(
                parse(&read_write_pdu(read_quantity, 1, 2, 2)),
                value_error(PduError::Quantity {
                    function: 0x17,
                    quantity: read_quantity,
                    max: 125
                })
            );
        }
        for write_quantity in [0, 122] {
            assert_eq!(
                parse(&read_write_pdu(1, write_quantity, 0, 0)),
                value_error(PduError::WriteQuantity {
                    function: 0x17,
                    quantity: write_quantity,
                    max: 121
                })
            );
        }
    }

    #[test]
    fn rejects_byte_count_off_by_one_either_way() {
        // FC 15 with 10 coils needs 2 bytes, FC 16 and FC 23 with 2
        // registers need 4.
        let cases = [(0x0F, 10, 2usize), (0x10, 2, 4usize)];
        for (function, quantity, expected) in cases {
            let pdu = |byte_count: usize, values_len| {
                write_multiple_pdu(function, 0, quantity, byte_count as u8, values_len)
            };
            for byte_count in [expected - 1, expected + 1] {
                assert_eq!(
                    parse(&pdu(byte_count, byte_count)),
                    value_error(PduError::ByteCount {
                        function,
                        byte_count: byte_count as u8,
                        expected
                    })
                );
            }
            for remaining in [expected - 1, expected + 1] {
                assert_eq!(
                    parse(&pdu(expected, remaining)),
                    value_error(PduError::ByteCountRemainder {
                        function,
                        byte_count: expected as u8,
                        remaining
                    })
                );
            }
        }

        for byte_count in [3, 5] {
            assert_eq!(
                parse(&read_write_pdu(1, 2, byte_count, byte_count.into())),
                value_error(PduError::ByteCount {
                    function: 0x17,
                    byte_count,
                    expected: 4
                })
            );
        }
        for remaining in [3, 5] {
            assert_eq!(
                parse(&read_write_pdu(1, 2, 4, remaining)),
                value_error(PduError::ByteCountRemainder {
                    function: 0x17,
                    byte_count: 4,
                    remaining
                })
            );
        }
    }

    #[test]
    fn rejects_fc16_quantity_2_with_byte_count_3() {
        assert_eq!(
            parse(&write_multiple_pdu(0x10, 0, 2, 3, 3)),
            value_error(PduError::ByteCount {
                function: 0x10,
                byte_count: 3,
                expected: 4
            })
        );
    }

    #[test]
    fn rejects_fc23_write_quantity_122() {
        assert_eq!(
            parse(&read_write_pdu(1, 122, 244, 0)),
            value_error(PduError::WriteQuantity {
                function: 0x17,
                quantity: 122,
                max: 121
            })
        );
    }

    #[test]
    fn address_range_ends_at_0xffff() {
        assert_eq!(
            parse(&pdu_of(0x03, &[0xFFFF, 1], &[])),
            Ok(Request::ReadHoldingRegisters {
                address: 0xFFFF,
                quantity: 1
            })
        );
        assert_eq!(
            parse(&pdu_of(0x03, &[0xFFFF, 2], &[])),
            address_error(PduError::AddressRange {
                function: 3,
                address: 0xFFFF,
                quantity: 2
            })
        );
        assert_eq!(
            parse(&pdu_of(0x01, &[0xF830, 2000], &[])),
            Ok(Request::ReadCoils {
                address: 0xF830,
                quantity: 2000
            })
        );
        assert_eq!(
            parse(&pdu_of(0x01, &[0xF831, 2000], &[])),
            address_error(PduError::AddressRange {
                function: 1,
                address: 0xF831,
                quantity: 2000
            })
        );
        assert_eq!(
            parse(&write_multiple_pdu(0x10, 0xFFFF, 2, 4, 4)),
            address_error(PduError::AddressRange {
                function: 0x10,
                address: 0xFFFF,
                quantity: 2
            })
        );
        assert_eq!(
            parse(&pdu_of(0x17, &[0, 1, 0xFFFE, 3], &[6, 0, 0, 0, 0, 0, 0])),
            address_error(PduError::AddressRange {
                function: 0x17,
                address: 0xFFFE,
                quantity: 3
            })
        );
    }

    // Fixed-size functions.

    #[test]
    fn write_single_coil_accepts_only_on_and_off() {
        assert_eq!(
            parse(&pdu_of(0x05, &[0x00AC, 0xFF00], &[])),
            Ok(Request::WriteSingleCoil {
                address: 0x00AC,
                value: true
            })
        );
        assert_eq!(
            parse(&pdu_of(0x05, &[0x00AC, 0x0000], &[])),
            Ok(Request::WriteSingleCoil {
                address: 0x00AC,
                value: false
            })
        );
        for value in [0x0001, 0x00FF, 0xFF01, 0xFFFF] {
            assert_eq!(
                parse(&pdu_of(0x05, &[0x00AC, value], &[])),
                value_error(PduError::CoilValue { value })
            );
        }
    }

    #[test]
    fn fixed_size_functions_parse_their_fields() {
        assert_eq!(
            parse(&pdu_of(0x06, &[0x0001, 0x0003], &[])),
            Ok(Request::WriteSingleRegister {
                address: 1,
                value: 3
            })
        );
        assert_eq!(parse(&[0x0B]), Ok(Request::GetCommEventCounter));
        assert_eq!(parse(&[0x0C]), Ok(Request::GetCommEventLog));
        assert_eq!(parse(&[0x11]), Ok(Request::ReportServerId));
        assert_eq!(
            parse(&pdu_of(0x16, &[0x0004, 0x00F2, 0x0025], &[])),
            Ok(Request::MaskWriteRegister {
                address: 4,
                and_mask: 0x00F2,
                or_mask: 0x0025
            })
        );
        assert_eq!(
            parse(&pdu_of(0x18, &[0x04DE], &[])),
            Ok(Request::ReadFifoQueue { address: 0x04DE })
        );
    }

    #[test]
    fn fixed_sizes_reject_short_or_trailing_data() {
        let cases: [(&[u8], u8, usize, usize); 14] = [
            (&[0x01, 0, 0, 0], 0x01, 4, 3),
            (&[0x03, 0, 0, 0, 1, 0], 0x03, 4, 5),
            (&[0x04, 0, 0, 0, 1, 0], 0x04, 4, 5),
            (&[0x05, 0, 0, 0xFF, 0, 0], 0x05, 4, 5),
            (&[0x06, 0, 1, 0], 0x06, 4, 3),
            (&[0x06, 0, 1, 0, 3, 0], 0x06, 4, 5),
            (&[0x07, 0], 0x07, 0, 1),
            (&[0x0B, 0], 0x0B, 0, 1),
            (&[0x0C, 0, 0], 0x0C, 0, 2),
            (&[0x11, 0], 0x11, 0, 1),
            (&[0x16, 0, 4, 0, 0xF2, 0], 0x16, 6, 5),
            (&[0x16, 0, 4, 0, 0xF2, 0, 0x25, 0], 0x16, 6, 7),
            (&[0x18, 0x04], 0x18, 2, 1),
            (&[0x18, 0x04, 0xDE, 0], 0x18, 2, 3),
        ];
        for (pdu, function, expected, actual) in cases {
            assert_eq!(
                parse(pdu),
                value_error(PduError::DataLength {
                    function,
                    expected,
                    actual
                }),
                "PDU {pdu:02x?}"
            );
        }
    }

    #[test]
    fn variable_functions_reject_missing_fixed_fields() {
        let cases: [(&[u8], u8, usize, usize); 5] = [
            (&[0x08, 0x00], 0x08, 2, 1),
            (&[0x0F, 0, 0, 0, 1], 0x0F, 5, 4),
            (&[0x10, 0, 0, 0, 1], 0x10, 5, 4),
            (&[0x17, 0, 0, 0, 1, 0, 0, 0, 1], 0x17, 9, 8),
            (&[0x2B], 0x2B, 1, 0),
        ];
        for (pdu, function, min, actual) in cases {
            assert_eq!(
                parse(pdu),
                value_error(PduError::DataTooShort {
                    function,
                    min,
                    actual
                }),
                "PDU {pdu:02x?}"
            );
        }
    }

    // Diagnostics, file records and encapsulated interface.

    #[test]
    fn return_query_data_takes_any_length() {
        assert_eq!(
            parse(&[0x08, 0x00, 0x00]),
            Ok(Request::Diagnostics {
                sub_function: 0,
                data: Bytes::new()
            })
        );
        assert_eq!(
            parse(&[0x08, 0x00, 0x00, 0xA5, 0x37, 0x01]),
            Ok(Request::Diagnostics {
                sub_function: 0,
                data: Bytes::from_static(&[0xA5, 0x37, 0x01])
            })
        );
    }

    #[test]
    fn other_sub_functions_take_two_bytes() {
        assert_eq!(
            parse(&[0x08, 0x00, 0x0A, 0x00, 0x00]),
            Ok(Request::Diagnostics {
                sub_function: 0x0A,
                data: Bytes::from_static(&[0x00, 0x00])
            })
        );
        for data_len in [0, 1, 3] {
            let mut pdu = vec![0x08, 0x00, 0x0A];
            pdu.resize(3 + data_len, 0);
            assert_eq!(
                parse(&pdu),
                value_error(PduError::DiagnosticsData {
                    sub_function: 0x0A,
                    actual: data_len
                })
            );
        }
    }

    /// Builds one FC 20 sub-request: reference type, file, record, length.
    fn read_file_sub_request(file: u16, record: u16, length: u16) -> Vec<u8> {
        let mut bytes = vec![FILE_REFERENCE_TYPE];
        for field in [file, record, length] {
            bytes.extend_from_slice(&field.to_be_bytes());
        }
        bytes
    }

    fn counted_pdu(function: u8, byte_count: u8, list: &[u8]) -> Vec<u8> {
        let mut pdu = vec![function, byte_count];
        pdu.extend_from_slice(list);
        pdu
    }

    #[test]
    fn read_file_byte_count_boundaries() {
        let one = read_file_sub_request(4, 1, 2);
        assert_eq!(
            parse(&counted_pdu(0x14, 7, &one)),
            Ok(Request::ReadFileRecord {
                data: Bytes::from(one.clone())
            })
        );

        let many = read_file_sub_request(4, 0x270F, 1).repeat(35);
        assert_eq!(many.len(), 0xF5);
        assert_eq!(
            parse(&counted_pdu(0x14, 0xF5, &many)),
            Ok(Request::ReadFileRecord {
                data: Bytes::from(many)
            })
        );
    }

    #[test]
    fn read_file_record_rejects_bad_byte_counts() {
        let one = read_file_sub_request(4, 1, 2);
        for byte_count in [6, 0xF6] {
            assert_eq!(
                parse(&counted_pdu(0x14, byte_count, &one)),
                value_error(PduError::ByteCountRange {
                    function: 0x14,
                    byte_count,
                    min: 0x07,
                    max: 0xF5
                })
            );
        }
        let mut long = one.clone();
        long.push(0);
        assert_eq!(
            parse(&counted_pdu(0x14, 7, &long)),
            value_error(PduError::ByteCountRemainder {
                function: 0x14,
                byte_count: 7,
                remaining: 8
            })
        );
        assert_eq!(
            parse(&counted_pdu(0x14, 8, &long)),
            value_error(PduError::FileByteCountMultiple {
                function: 0x14,
                byte_count: 8
            })
        );
    }

    #[test]
    fn read_file_record_checks_each_reference() {
        let mut wrong_type = read_file_sub_request(4, 1, 2);
        wrong_type[0] = 0x07;
        assert_eq!(
            parse(&counted_pdu(0x14, 7, &wrong_type)),
            address_error(PduError::FileReferenceType {
                function: 0x14,
                index: 0,
                reference_type: 7
            })
        );

        let mut list = read_file_sub_request(4, 1, 2);
        list.extend(read_file_sub_request(0, 1, 2));
        assert_eq!(
            parse(&counted_pdu(0x14, 14, &list)),
            address_error(PduError::FileNumber {
                function: 0x14,
                index: 1
            })
        );

        assert_eq!(
            parse(&counted_pdu(0x14, 7, &read_file_sub_request(4, 0x2710, 2))),
            address_error(PduError::FileRecordNumber {
                function: 0x14,
                index: 0,
                record_number: 0x2710
            })
        );
    }

    #[test]
    fn read_file_record_limits_the_response_length() {
        // One sub-response takes 2 bytes plus 2 per register.
        let fits = read_file_sub_request(4, 1, 121);
        assert_eq!(
            parse(&counted_pdu(0x14, 7, &fits)),
            Ok(Request::ReadFileRecord {
                data: Bytes::from(fits)
            })
        );
        assert_eq!(
            parse(&counted_pdu(0x14, 7, &read_file_sub_request(4, 1, 122))),
            value_error(PduError::FileResponseTooLong { length: 246 })
        );
    }

    /// Builds one FC 21 sub-request carrying `records` registers of 0x1234.
    fn write_file_sub_request(file: u16, record: u16, records: u16) -> Vec<u8> {
        let mut bytes = read_file_sub_request(file, record, records);
        for _ in 0..records {
            bytes.extend_from_slice(&[0x12, 0x34]);
        }
        bytes
    }

    #[test]
    fn write_file_byte_count_boundaries() {
        let one = write_file_sub_request(4, 7, 1);
        assert_eq!(
            parse(&counted_pdu(0x15, 9, &one)),
            Ok(Request::WriteFileRecord {
                data: Bytes::from(one)
            })
        );

        let largest = write_file_sub_request(4, 7, 122);
        assert_eq!(largest.len(), 0xFB);
        assert_eq!(
            parse(&counted_pdu(0x15, 0xFB, &largest)),
            Ok(Request::WriteFileRecord {
                data: Bytes::from(largest)
            })
        );
    }

    #[test]
    fn write_file_record_rejects_bad_byte_counts() {
        let one = write_file_sub_request(4, 7, 1);
        for byte_count in [8, 0xFC] {
            assert_eq!(
                parse(&counted_pdu(0x15, byte_count, &one)),
                value_error(PduError::ByteCountRange {
                    function: 0x15,
                    byte_count,
                    min: 0x09,
                    max: 0xFB
                })
            );
        }
        assert_eq!(
            parse(&counted_pdu(0x15, 10, &one)),
            value_error(PduError::ByteCountRemainder {
                function: 0x15,
                byte_count: 10,
                remaining: 9
            })
        );
    }

    #[test]
    fn write_file_rejects_truncated_sub_requests() {
        // The record length is 2 registers but only 1 follows.
        let mut short_data = read_file_sub_request(4, 7, 2);
        short_data.extend_from_slice(&[0x12, 0x34]);
        assert_eq!(
            parse(&counted_pdu(0x15, 9, &short_data)),
            value_error(PduError::FileSubRequestTruncated {
                function: 0x15,
                index: 0
            })
        );

        let mut short_fixed = write_file_sub_request(4, 7, 1);
        short_fixed.extend_from_slice(&[FILE_REFERENCE_TYPE, 0x00, 0x04]);
        assert_eq!(
            parse(&counted_pdu(0x15, 12, &short_fixed)),
            value_error(PduError::FileSubRequestTruncated {
                function: 0x15,
                index: 1
            })
        );
    }

    #[test]
    fn write_file_record_checks_each_reference() {
        assert_eq!(
            parse(&counted_pdu(0x15, 9, &write_file_sub_request(4, 0x2710, 1))),
            address_error(PduError::FileRecordNumber {
                function: 0x15,
                index: 0,
                record_number: 0x2710
            })
        );
    }

    #[test]
    fn read_device_identification_checks_its_code() {
        for code in [1, 4] {
            assert_eq!(
                parse(&[0x2B, 0x0E, code, 0x00]),
                Ok(Request::EncapsulatedInterface {
                    mei_type: 0x0E,
                    data: Bytes::from(vec![code, 0x00])
                })
            );
        }
        for code in [0, 5] {
            assert_eq!(
                parse(&[0x2B, 0x0E, code, 0x00]),
                value_error(PduError::ReadDeviceIdCode { code })
            );
        }
        for pdu in [&[0x2B, 0x0E, 0x01][..], &[0x2B, 0x0E, 0x01, 0x00, 0x00]] {
            assert_eq!(
                parse(pdu),
                value_error(PduError::DataLength {
                    function: 0x2B,
                    expected: 3,
                    actual: pdu.len() - 1
                })
            );
        }
    }

    #[test]
    fn mei_type_canopen_or_device_id_only() {
        assert_eq!(
            parse(&[0x2B, 0x0D, 0x01, 0x02, 0x03]),
            Ok(Request::EncapsulatedInterface {
                mei_type: 0x0D,
                data: Bytes::from_static(&[0x01, 0x02, 0x03])
            })
        );
        for mei_type in [0x00, 0x0F, 0xFF] {
            assert_eq!(
                parse(&[0x2B, mei_type, 0x01, 0x00]),
                value_error(PduError::MeiType { mei_type })
            );
        }
    }

    // Encoding.

    #[test]
    fn encode_request_reproduces_decoded_frames() {
        let pdus = [
            pdu_of(0x01, &[0x0013, 0x0013], &[]),
            pdu_of(0x02, &[0x00C4, 0x0016], &[]),
            pdu_of(0x03, &[0x006B, 0x0003], &[]),
            pdu_of(0x04, &[0x0008, 0x0001], &[]),
            pdu_of(0x05, &[0x00AC, 0xFF00], &[]),
            pdu_of(0x05, &[0x00AC, 0x0000], &[]),
            pdu_of(0x06, &[0x0001, 0x0003], &[]),
            vec![0x07],
            vec![0x08, 0x00, 0x00, 0xA5, 0x37],
            vec![0x08, 0x00, 0x04, 0x00, 0x00],
            vec![0x0B],
            vec![0x0C],
            pdu_of(0x0F, &[0x0013, 0x000A], &[0x02, 0xCD, 0x01]),
            pdu_of(0x10, &[0x0001, 0x0002], &[0x04, 0x00, 0x0A, 0x01, 0x02]),
            vec![0x11],
            counted_pdu(0x14, 7, &read_file_sub_request(4, 1, 2)),
            counted_pdu(0x15, 9, &write_file_sub_request(4, 7, 1)),
            pdu_of(0x16, &[0x0004, 0x00F2, 0x0025], &[]),
            pdu_of(
                0x17,
                &[0x0003, 0x0006, 0x000E, 0x0003],
                &[6, 0, 0xFF, 0, 0xFF, 0, 0xFF],
            ),
            pdu_of(0x18, &[0x04DE], &[]),
            vec![0x2B, 0x0E, 0x01, 0x00],
            vec![0x2B, 0x0D, 0x01, 0x02],
            vec![0x41, 0x01, 0x02, 0x03],
        ];
        for pdu in pdus {
            let request = parse(&pdu).unwrap();
            let mut out = BytesMut::new();
            encode_request(HEADER, &request, &mut out);
            assert_eq!(&out[..], &frame(HEADER, &pdu)[..], "PDU {pdu:02x?}");
        }
    }

    #[test]
    fn encode_request_appends_after_existing_bytes() {
        let mut out = BytesMut::from(&[0xEE][..]);
        let request = Request::WriteSingleCoil {
            address: 0x00AC,
            value: true,
        };
        encode_request(HEADER, &request, &mut out);
        assert_eq!(
            &out[..],
            &[0xEE, 0x01, 0x02, 0x00, 0x00, 0x00, 0x06, 0x11, 0x05, 0x00, 0xAC, 0xFF, 0x00]
        );
    }

    #[test]
    fn encode_exception_sets_the_exception_bit() {
        let mut out = BytesMut::new();
        encode_exception(HEADER, 0x03, ExceptionCode::IllegalDataAddress, &mut out);
        assert_eq!(
            &out[..],
            &[0x01, 0x02, 0x00, 0x00, 0x00, 0x03, 0x11, 0x83, 0x02]
        );
        assert_eq!(
            exception_pdu(0x10, ExceptionCode::GatewayTargetFailedToRespond),
            [0x90, 0x0B]
        );
    }

    #[test]
    fn encode_response_frames_the_pdu() {
        let mut out = BytesMut::new();
        encode_response(HEADER, &[0x03, 0x02, 0x12, 0x34], &mut out);
        assert_eq!(
            &out[..],
            &[0x01, 0x02, 0x00, 0x00, 0x00, 0x05, 0x11, 0x03, 0x02, 0x12, 0x34]
        );
    }

    // Responses.

    #[test]
    fn decode_response_splits_header_and_pdu() {
        let mut bytes = frame(HEADER, &[0x03, 0x02, 0x12, 0x34]);
        bytes.extend(frame(HEADER, &[0x83]));
        let mut buf = BytesMut::from(&bytes[..]);

        assert_eq!(
            decode_response(&mut buf),
            Ok(Some(RawResponse {
                header: HEADER,
                pdu: Bytes::from_static(&[0x03, 0x02, 0x12, 0x34]),
            }))
        );
        // The body is not checked here, not even a one-byte exception.
        assert_eq!(
            decode_response(&mut buf),
            Ok(Some(RawResponse {
                header: HEADER,
                pdu: Bytes::from_static(&[0x83]),
            }))
        );
        assert_eq!(decode_response(&mut buf), Ok(None));
    }

    #[test]
    fn decode_response_waits_for_the_whole_frame() {
        let whole = frame(HEADER, &[0x06, 0x00, 0x01, 0x00, 0x03]);
        for split in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..split]);
            assert_eq!(decode_response(&mut buf), Ok(None), "split at {split}");
            buf.extend_from_slice(&whole[split..]);
            assert_eq!(
                decode_response(&mut buf),
                Ok(Some(RawResponse {
                    header: HEADER,
                    pdu: Bytes::from_static(&[0x06, 0x00, 0x01, 0x00, 0x03]),
                })),
                "split at {split}"
            );
        }
    }

    #[test]
    fn decode_response_rejects_bad_headers() {
        let mut buf = BytesMut::from(&raw_header(0x0001, 3)[..]);
        assert_eq!(
            decode_response(&mut buf),
            Err(FrameError::ProtocolId { protocol_id: 1 })
        );
        for length in [1, 255] {
            let mut buf = BytesMut::from(&raw_header(0, length)[..]);
            assert_eq!(
                decode_response(&mut buf),
                Err(FrameError::Length { length })
            );
        }
    }

    fn read_holding(quantity: u16) -> Request {
        Request::ReadHoldingRegisters {
            address: 0,
            quantity,
        }
    }

    #[test]
    fn check_response_rejects_another_function() {
        assert_eq!(
            check_response(&read_holding(1), &[0x04, 0x02, 0x00, 0x01]),
            Err(ResponseError::Function {
                expected: 0x03,
                actual: 0x04
            })
        );
        assert_eq!(
            check_response(&read_holding(1), &[0x84, 0x02]),
            Err(ResponseError::Function {
                expected: 0x03,
                actual: 0x84
            })
        );
    }

    #[test]
    fn exception_response_is_two_bytes() {
        assert_eq!(check_response(&read_holding(1), &[0x83, 0x02]), Ok(()));

        // An MBAP length one short leaves only the function code.
        let mut buf = BytesMut::from(&frame(HEADER, &[0x83])[..]);
        let response = decode_response(&mut buf).unwrap().unwrap();
        assert_eq!(
            check_response(&read_holding(1), &response.pdu),
            Err(ResponseError::ExceptionLength {
                function: 0x03,
                length: 1
            })
        );
        assert_eq!(
            check_response(&read_holding(1), &[0x83, 0x02, 0x00]),
            Err(ResponseError::ExceptionLength {
                function: 0x03,
                length: 3
            })
        );
    }

    #[test]
    fn check_response_rejects_bad_sizes() {
        assert_eq!(
            check_response(&read_holding(1), &[]),
            Err(ResponseError::Empty)
        );
        let raw = Request::Raw {
            function: 0x41,
            data: Bytes::new(),
        };
        let mut pdu = vec![0x41];
        pdu.resize(MAX_PDU_LEN, 0);
        assert_eq!(check_response(&raw, &pdu), Ok(()));
        pdu.push(0);
        assert_eq!(
            check_response(&raw, &pdu),
            Err(ResponseError::TooLong { length: 254 })
        );
    }

    #[test]
    fn check_response_accepts_good_responses() {
        let request = |pdu: &[u8]| parse(pdu).unwrap();
        let cases: Vec<(Request, Vec<u8>)> = vec![
            (
                request(&pdu_of(0x01, &[0, 10], &[])),
                vec![0x01, 2, 0xCD, 0x01],
            ),
            (request(&pdu_of(0x02, &[0, 8], &[])), vec![0x02, 1, 0xAC]),
            (
                request(&pdu_of(0x03, &[0, 2], &[])),
                vec![0x03, 4, 0, 1, 0, 2],
            ),
            (request(&pdu_of(0x04, &[0, 1], &[])), vec![0x04, 2, 0, 9]),
            (
                request(&pdu_of(0x05, &[0xAC, 0xFF00], &[])),
                vec![0x05, 0, 0xAC, 0xFF, 0],
            ),
            (request(&pdu_of(0x06, &[1, 3], &[])), vec![0x06, 0, 1, 0, 3]),
            (Request::ReadExceptionStatus, vec![0x07, 0x6D]),
            (
                request(&[0x08, 0, 0, 0xA5, 0x37]),
                vec![0x08, 0, 0, 0xA5, 0x37],
            ),
            (
                request(&[0x08, 0, 0x0B, 0, 0]),
                vec![0x08, 0, 0x0B, 0x01, 0x08],
            ),
            (
                Request::GetCommEventCounter,
                vec![0x0B, 0xFF, 0xFF, 0x01, 0x08],
            ),
            (
                Request::GetCommEventLog,
                vec![0x0C, 8, 0, 0, 1, 8, 1, 0x21, 0x20, 0x00],
            ),
            (
                request(&write_multiple_pdu(0x0F, 0x13, 10, 2, 2)),
                vec![0x0F, 0, 0x13, 0, 10],
            ),
            (
                request(&write_multiple_pdu(0x10, 1, 2, 4, 4)),
                vec![0x10, 0, 1, 0, 2],
            ),
            (Request::ReportServerId, vec![0x11, 3, 0x2A, 0x01, 0xFF]),
            (
                request(&counted_pdu(0x14, 7, &read_file_sub_request(4, 1, 2))),
                vec![0x14, 6, 5, 6, 0x0D, 0xFE, 0x00, 0x20],
            ),
            (
                request(&counted_pdu(0x15, 9, &write_file_sub_request(4, 7, 1))),
                counted_pdu(0x15, 9, &write_file_sub_request(4, 7, 1)),
            ),
            (
                request(&pdu_of(0x16, &[4, 0xF2, 0x25], &[])),
                pdu_of(0x16, &[4, 0xF2, 0x25], &[]),
            ),
            (
                request(&read_write_pdu(2, 1, 2, 2)),
                vec![0x17, 4, 0, 0xFE, 0x0A, 0xCD],
            ),
            (
                Request::ReadFifoQueue { address: 0x04DE },
                vec![0x18, 0, 6, 0, 2, 0x01, 0xB8, 0x12, 0x84],
            ),
            (
                request(&[0x2B, 0x0E, 0x01, 0x00]),
                vec![
                    0x2B, 0x0E, 0x01, 0x01, 0x00, 0x00, 2, 0x00, 3, b'a', b'b', b'c', 0x01, 0,
                ],
            ),
            (request(&[0x2B, 0x0D, 0x01]), vec![0x2B, 0x0D, 0x07, 0x08]),
            (request(&[0x41, 0x01]), vec![0x41]),
        ];
        for (request, pdu) in cases {
            assert_eq!(check_response(&request, &pdu), Ok(()), "{request:?}");
        }
    }

    #[test]
    fn check_response_checks_byte_counts() {
        let coils = parse(&pdu_of(0x01, &[0, 10], &[])).unwrap();
        assert_eq!(
            check_response(&coils, &[0x01, 3, 0xCD, 0x01, 0x00]),
            Err(ResponseError::ByteCount {
                function: 0x01,
                expected: 2,
                actual: 3
            })
        );
        assert_eq!(
            check_response(&coils, &[0x01, 2, 0xCD]),
            Err(ResponseError::Length {
                function: 0x01,
                expected: 3,
                actual: 2
            })
        );
        assert_eq!(
            check_response(&read_holding(2), &[0x03, 2, 0, 1]),
            Err(ResponseError::ByteCount {
                function: 0x03,
                expected: 4,
                actual: 2
            })
        );
        assert_eq!(
            check_response(&read_holding(2), &[0x03, 4, 0, 1, 0]),
            Err(ResponseError::Length {
                function: 0x03,
                expected: 5,
                actual: 4
            })
        );
        assert_eq!(
            check_response(&read_holding(2), &[0x03]),
            Err(ResponseError::TooShort {
                function: 0x03,
                min: 1,
                actual: 0
            })
        );
        let read_write = parse(&read_write_pdu(2, 1, 2, 2)).unwrap();
        assert_eq!(
            check_response(&read_write, &[0x17, 2, 0, 1]),
            Err(ResponseError::ByteCount {
                function: 0x17,
                expected: 4,
                actual: 2
            })
        );
    }

    #[test]
    fn check_response_checks_echoes() {
        let coil = Request::WriteSingleCoil {
            address: 0xAC,
            value: true,
        };
        assert_eq!(
            check_response(&coil, &[0x05, 0, 0xAC, 0, 0]),
            Err(ResponseError::Echo {
                function: 0x05,
                field: "value",
                expected: 0xFF00,
                actual: 0
            })
        );
        assert_eq!(
            check_response(&coil, &[0x05, 0, 0xAC, 0xFF, 0, 0]),
            Err(ResponseError::Length {
                function: 0x05,
                expected: 4,
                actual: 5
            })
        );
        let register = Request::WriteSingleRegister {
            address: 1,
            value: 3,
        };
        assert_eq!(
            check_response(&register, &[0x06, 0, 2, 0, 3]),
            Err(ResponseError::Echo {
                function: 0x06,
                field: "address",
                expected: 1,
                actual: 2
            })
        );
        let registers = parse(&write_multiple_pdu(0x10, 1, 2, 4, 4)).unwrap();
        assert_eq!(
            check_response(&registers, &[0x10, 0, 1, 0, 3]),
            Err(ResponseError::Echo {
                function: 0x10,
                field: "quantity",
                expected: 2,
                actual: 3
            })
        );
        let mask = Request::MaskWriteRegister {
            address: 4,
            and_mask: 0xF2,
            or_mask: 0x25,
        };
        assert_eq!(
            check_response(&mask, &[0x16, 0, 4, 0, 0xF2, 0, 0x26]),
            Err(ResponseError::Echo {
                function: 0x16,
                field: "or_mask",
                expected: 0x25,
                actual: 0x26
            })
        );
    }

    #[test]
    fn check_response_checks_diagnostics() {
        let query = parse(&[0x08, 0, 0, 0xA5, 0x37]).unwrap();
        assert_eq!(
            check_response(&query, &[0x08, 0, 0, 0xA5, 0x38]),
            Err(ResponseError::DataEcho {
                function: 0x08,
                offset: 3
            })
        );
        assert_eq!(
            check_response(&query, &[0x08, 0, 0, 0xA5]),
            Err(ResponseError::Length {
                function: 0x08,
                expected: 4,
                actual: 3
            })
        );
        let counter = parse(&[0x08, 0, 0x0B, 0, 0]).unwrap();
        assert_eq!(
            check_response(&counter, &[0x08, 0, 0x0C, 0, 0]),
            Err(ResponseError::Echo {
                function: 0x08,
                field: "sub_function",
                expected: 0x0B,
                actual: 0x0C
            })
        );
        assert_eq!(
            check_response(&counter, &[0x08, 0, 0x0B, 0]),
            Err(ResponseError::Length {
                function: 0x08,
                expected: 4,
                actual: 3
            })
        );
    }

    #[test]
    fn check_response_checks_fixed_lengths() {
        assert_eq!(
            check_response(&Request::ReadExceptionStatus, &[0x07, 0x6D, 0]),
            Err(ResponseError::Length {
                function: 0x07,
                expected: 1,
                actual: 2
            })
        );
        assert_eq!(
            check_response(&Request::GetCommEventCounter, &[0x0B, 0, 0, 1]),
            Err(ResponseError::Length {
                function: 0x0B,
                expected: 4,
                actual: 3
            })
        );
        assert_eq!(
            check_response(&Request::GetCommEventLog, &[0x0C, 5, 0, 0, 1, 8, 1]),
            Err(ResponseError::ByteCountRange {
                function: 0x0C,
                byte_count: 5,
                min: 6,
                max: 70
            })
        );
        assert_eq!(
            check_response(&Request::ReportServerId, &[0x11, 3, 0x2A, 0xFF]),
            Err(ResponseError::Length {
                function: 0x11,
                expected: 4,
                actual: 3
            })
        );
    }

    #[test]
    fn check_response_checks_file_records() {
        let read = parse(&counted_pdu(0x14, 7, &read_file_sub_request(4, 1, 2))).unwrap();
        assert_eq!(
            check_response(&read, &[0x14, 4, 3, 6, 0x0D, 0xFE]),
            Err(ResponseError::FileSubResponseLength {
                index: 0,
                expected: 5,
                actual: 3
            })
        );
        assert_eq!(
            check_response(&read, &[0x14, 6, 5, 7, 0x0D, 0xFE, 0x00, 0x20]),
            Err(ResponseError::FileReferenceType {
                index: 0,
                reference_type: 7
            })
        );
        assert_eq!(
            check_response(&read, &[0x14, 8, 5, 6, 0x0D, 0xFE, 0x00, 0x20, 5, 6]),
            Err(ResponseError::Length {
                function: 0x14,
                expected: 7,
                actual: 9
            })
        );

        let sub_request = write_file_sub_request(4, 7, 1);
        let write = parse(&counted_pdu(0x15, 9, &sub_request)).unwrap();
        let mut echo = counted_pdu(0x15, 9, &sub_request);
        echo[9] = 0x00;
        assert_eq!(
            check_response(&write, &echo),
            Err(ResponseError::DataEcho {
                function: 0x15,
                offset: 8
            })
        );
    }

    #[test]
    fn check_response_checks_fifo_counts() {
        let fifo = Request::ReadFifoQueue { address: 0x04DE };
        let mut full = vec![0x18, 0, 64, 0, 32];
        full.resize(5 + 64, 0);
        assert_eq!(
            check_response(&fifo, &full),
            Err(ResponseError::FifoCount { count: 32 })
        );
        assert_eq!(
            check_response(&fifo, &[0x18, 0, 5, 0, 2, 0x01, 0xB8, 0x12, 0x84]),
            Err(ResponseError::ByteCount {
                function: 0x18,
                expected: 6,
                actual: 5
            })
        );
        assert_eq!(
            check_response(&fifo, &[0x18, 0, 6, 0, 2, 0x01, 0xB8, 0x12]),
            Err(ResponseError::Length {
                function: 0x18,
                expected: 8,
                actual: 7
            })
        );
    }

    #[test]
    fn check_response_checks_device_identification() {
        let request = parse(&[0x2B, 0x0E, 0x01, 0x00]).unwrap();
        assert_eq!(
            check_response(&request, &[0x2B, 0x0D, 0x01, 0x01, 0x00, 0x00, 0]),
            Err(ResponseError::Echo {
                function: 0x2B,
                field: "mei_type",
                expected: 0x0E,
                actual: 0x0D
            })
        );
        assert_eq!(
            check_response(&request, &[0x2B, 0x0E, 0x02, 0x01, 0x00, 0x00, 0]),
            Err(ResponseError::Echo {
                function: 0x2B,
                field: "read_device_id_code",
                expected: 1,
                actual: 2
            })
        );
        assert_eq!(
            check_response(&request, &[0x2B, 0x0E, 0x01, 0x01, 0x01, 0x00, 0]),
            Err(ResponseError::MoreFollows { value: 0x01 })
        );
        assert_eq!(
            check_response(
                &request,
                &[0x2B, 0x0E, 0x01, 0x01, 0x00, 0x00, 1, 0x00, 3, b'a']
            ),
            Err(ResponseError::DeviceIdObjectTruncated { index: 0 })
        );
        assert_eq!(
            check_response(&request, &[0x2B, 0x0E, 0x01, 0x01, 0x00, 0x00, 0, 0x00]),
            Err(ResponseError::Length {
                function: 0x2B,
                expected: 6,
                actual: 7
            })
        );
        assert_eq!(
            check_response(&request, &[0x2B, 0x0E, 0x01, 0x01, 0x00]),
            Err(ResponseError::TooShort {
                function: 0x2B,
                min: 6,
                actual: 4
            })
        );
    }

    // Messages.

    #[test]
    fn errors_name_the_value_and_the_limit() {
        assert_eq!(
            PduError::Quantity {
                function: 1,
                quantity: 2001,
                max: 2000
            }
            .to_string(),
            "quantity 2001 outside 1..=2000 for function 1"
        );
        assert_eq!(
            FrameError::Length { length: 300 }.to_string(),
            "MBAP length 300 outside 2..=254"
        );
        assert_eq!(
            PduError::ByteCount {
                function: 16,
                byte_count: 3,
                expected: 4
            }
            .to_string(),
            "byte count 3 does not match 4 for the quantity of function 16"
        );
        assert_eq!(
            ResponseError::ExceptionLength {
                function: 3,
                length: 1
            }
            .to_string(),
            "exception response to function 3 is 1 bytes, expected 2"
        );
    }
}
