//! Fuzz targets for the Modbus/TCP frame codec, run as ordinary tests with
//! bolero's random engine: decoding never panics, consumes exactly one MBAP
//! frame or nothing, and every decoded request encodes back to its bytes.

use std::sync::atomic::{AtomicUsize, Ordering};

use bolero::check;
use bytes::BytesMut;
use sluice::modbus::frame::{
    check_response, decode_request, decode_response, encode_request, Decoded, FrameError,
    MAX_MBAP_LENGTH, MAX_PDU_LEN, MBAP_HEADER_LEN, MIN_MBAP_LENGTH,
};

/// Random inputs per target: enough to reach every function code many
/// times while keeping `cargo test` within seconds.
const ITERATIONS: usize = 20_000;
/// Maximum length of a random byte input: two frames of maximum size.
const MAX_INPUT_LEN: usize = 2 * (MBAP_HEADER_LEN + MAX_PDU_LEN);

/// Returns the frame length the MBAP header of `input` announces, or `None`
/// when the header is incomplete or invalid.
fn announced_frame_len(input: &[u8]) -> Option<usize> {
    if input.len() < MBAP_HEADER_LEN || input[2..4] != [0, 0] {
        return None;
    }
    let length = u16::from_be_bytes([input[4], input[5]]);
    (MIN_MBAP_LENGTH..=MAX_MBAP_LENGTH)
        .contains(&length)
        .then_some(6 + usize::from(length))
}

/// Decodes one request from `input` and checks how much it consumed; a
/// decoded request must encode back to the exact frame bytes. Returns
/// whether `input` started with a valid request.
fn check_one_request(input: &[u8]) -> bool {
    let mut buf = BytesMut::from(input);
    let result = decode_request(&mut buf);
    let consumed = input.len() - buf.len();
    let announced = announced_frame_len(input);

    match result {
        Ok(None) => {
            assert_eq!(consumed, 0);
            assert!(input.len() < announced.unwrap_or(MBAP_HEADER_LEN));
        }
        Err(FrameError::ProtocolId { protocol_id }) => {
            assert_eq!(consumed, 0);
            assert_eq!(protocol_id.to_be_bytes(), input[2..4]);
        }
        Err(FrameError::Length { length }) => {
            assert_eq!(consumed, 0);
            assert_eq!(length.to_be_bytes(), input[4..6]);
        }
        Err(FrameError::ExceptionFunction { function }) => {
            assert_eq!(Some(consumed), announced);
            assert_eq!(function, input[MBAP_HEADER_LEN]);
        }
        Ok(Some(Decoded::Invalid {
            header, function, ..
        })) => {
            assert_eq!(Some(consumed), announced);
            assert_eq!(header.transaction_id.to_be_bytes(), input[0..2]);
            assert_eq!(header.unit, input[6]);
            assert_eq!(function, input[MBAP_HEADER_LEN]);
        }
        Ok(Some(Decoded::Request { header, request })) => {
            assert_eq!(Some(consumed), announced);
            let mut encoded = BytesMut::new();
            encode_request(header, &request, &mut encoded);
            assert_eq!(&encoded[..], &input[..consumed]);
            return true;
        }
    }
    false
}

/// Decodes one response from `input` and checks how much it consumed.
fn check_one_response(input: &[u8]) {
    let mut buf = BytesMut::from(input);
    let result = decode_response(&mut buf);
    let consumed = input.len() - buf.len();
    let announced = announced_frame_len(input);

    match result {
        Ok(None) => {
            assert_eq!(consumed, 0);
            assert!(input.len() < announced.unwrap_or(MBAP_HEADER_LEN));
        }
        Ok(Some(response)) => {
            assert_eq!(Some(consumed), announced);
            assert_eq!(response.header.transaction_id.to_be_bytes(), input[0..2]);
            assert_eq!(response.header.unit, input[6]);
            assert_eq!(&response.pdu[..], &input[MBAP_HEADER_LEN..consumed]);
        }
        Err(error) => {
            assert_eq!(consumed, 0);
            assert!(announced.is_none(), "{error} on a valid header");
        }
    }
}

/// Builds a frame with a valid MBAP header around `function` and `data`
/// (cut to the largest PDU), followed by `trailing` bytes.
fn valid_frame(
    transaction_id: u16,
    unit: u8,
    function: u8,
    data: &[u8],
    trailing: &[u8],
) -> Vec<u8> {
    let data = &data[..data.len().min(MAX_PDU_LEN - 1)];
    let length = u16::try_from(2 + data.len()).unwrap();
    let mut frame = Vec::with_capacity(MBAP_HEADER_LEN + 1 + data.len() + trailing.len());
    frame.extend_from_slice(&transaction_id.to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&length.to_be_bytes());
    frame.push(unit);
    frame.push(function);
    frame.extend_from_slice(data);
    frame.extend_from_slice(trailing);
    frame
}

/// Function codes whose PDUs the generator below builds with consistent
/// quantities and byte counts, so that most of them decode.
const BUILT_FUNCTIONS: [u8; 10] = [0x01, 0x03, 0x05, 0x06, 0x08, 0x0F, 0x10, 0x16, 0x17, 0x2B];

/// Builds a request PDU for one of `BUILT_FUNCTIONS` from random fields.
fn built_pdu(selector: u8, address: u16, quantity: u16, value: u16, values: &[u8]) -> Vec<u8> {
    let function = BUILT_FUNCTIONS[usize::from(selector) % BUILT_FUNCTIONS.len()];
    let mut pdu = vec![function];
    let put = |field: u16, pdu: &mut Vec<u8>| pdu.extend_from_slice(&field.to_be_bytes());
    match function {
        0x01 | 0x03 => {
            put(address, &mut pdu);
            put(quantity % 2001, &mut pdu);
        }
        0x05 => {
            put(address, &mut pdu);
            put(if value % 2 == 0 { 0x0000 } else { 0xFF00 }, &mut pdu);
        }
        0x06 => {
            put(address, &mut pdu);
            put(value, &mut pdu);
        }
        0x08 => {
            put(value % 3, &mut pdu);
            pdu.extend_from_slice(&values[..values.len().min(2)]);
        }
        0x0F | 0x10 | 0x17 => {
            let registers = function != 0x0F;
            let quantity = if registers {
                quantity % 124
            } else {
                quantity % 1969
            };
            let byte_count = if registers {
                2 * usize::from(quantity)
            } else {
                usize::from(quantity).div_ceil(8)
            };
            if function == 0x17 {
                put(value, &mut pdu);
                put(quantity % 126, &mut pdu);
            }
            put(address, &mut pdu);
            put(quantity, &mut pdu);
            pdu.push(u8::try_from(byte_count).unwrap_or(u8::MAX));
            pdu.resize(pdu.len() + byte_count, 0xA5);
        }
        0x16 => {
            put(address, &mut pdu);
            put(quantity, &mut pdu);
            put(value, &mut pdu);
        }
        _ => {
            pdu.extend_from_slice(&[0x0E, u8::try_from(value % 6).unwrap(), 0x00]);
        }
    }
    pdu.truncate(MAX_PDU_LEN);
    pdu
}

#[test]
fn decode_request_on_arbitrary_bytes() {
    check!()
        .with_iterations(ITERATIONS)
        .with_max_len(MAX_INPUT_LEN)
        .for_each(|input: &[u8]| {
            check_one_request(input);
        });
}

#[test]
fn decode_request_on_frames_with_valid_headers() {
    check!()
        .with_type::<(u16, u8, u8, Vec<u8>, Vec<u8>)>()
        .with_iterations(ITERATIONS)
        .for_each(|(transaction_id, unit, function, data, trailing)| {
            let input = valid_frame(*transaction_id, *unit, *function, data, trailing);
            check_one_request(&input);
        });
}

#[test]
fn decode_request_round_trips_built_requests() {
    let decoded = AtomicUsize::new(0);
    check!()
        .with_type::<(u16, u8, u8, u16, u16, u16, Vec<u8>)>()
        .with_iterations(ITERATIONS)
        .for_each(
            |(transaction_id, unit, selector, address, quantity, value, values)| {
                let pdu = built_pdu(*selector, *address, *quantity, *value, values);
                let input = valid_frame(*transaction_id, *unit, pdu[0], &pdu[1..], &[]);
                if check_one_request(&input) {
                    decoded.fetch_add(1, Ordering::Relaxed);
                }
            },
        );

    // About 85% of the built PDUs are valid; the rest break a quantity
    // limit on purpose. Far fewer would mean the generator lost its aim.
    let decoded = decoded.load(Ordering::Relaxed);
    assert!(decoded > ITERATIONS / 2, "only {decoded} requests decoded");
}

#[test]
fn decode_request_ignores_how_a_frame_is_split() {
    check!()
        .with_type::<(u8, u8, Vec<u8>, u16)>()
        .with_iterations(ITERATIONS)
        .for_each(|(unit, function, data, split)| {
            let input = valid_frame(0x0102, *unit, *function, data, &[]);
            let split = usize::from(*split) % input.len();

            let mut whole = BytesMut::from(&input[..]);
            let expected = decode_request(&mut whole);

            let mut parts = BytesMut::from(&input[..split]);
            assert_eq!(decode_request(&mut parts), Ok(None));
            parts.extend_from_slice(&input[split..]);
            assert_eq!(decode_request(&mut parts), expected);
            assert_eq!(parts.len(), whole.len());
        });
}

#[test]
fn decode_response_on_arbitrary_bytes() {
    check!()
        .with_iterations(ITERATIONS)
        .with_max_len(MAX_INPUT_LEN)
        .for_each(|input: &[u8]| check_one_response(input));
}

#[test]
fn decode_response_on_frames_with_valid_headers() {
    check!()
        .with_type::<(u16, u8, u8, Vec<u8>, Vec<u8>)>()
        .with_iterations(ITERATIONS)
        .for_each(|(transaction_id, unit, function, data, trailing)| {
            let input = valid_frame(*transaction_id, *unit, *function, data, trailing);
            check_one_response(&input);
        });
}

#[test]
fn check_response_on_arbitrary_pdus() {
    check!()
        .with_type::<(u8, u16, u16, u16, Vec<u8>, bool, Vec<u8>)>()
        .with_iterations(ITERATIONS)
        .for_each(
            |(selector, address, quantity, value, values, exception, data)| {
                let pdu = built_pdu(*selector, *address, *quantity, *value, values);
                let mut buf = BytesMut::from(&valid_frame(1, 1, pdu[0], &pdu[1..], &[])[..]);
                let Ok(Some(Decoded::Request { request, .. })) = decode_request(&mut buf) else {
                    return;
                };

                // The response carries the request's function code, so that
                // the checks past the function code run. Only the absence of a
                // panic is checked here; the unit tests pin the verdicts.
                let mut response = vec![request.function_code()];
                if *exception {
                    response[0] |= 0x80;
                }
                response.extend_from_slice(data);
                let _ = check_response(&request, &response);
            },
        );
}
