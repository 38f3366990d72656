//! Criterion benchmarks of the Modbus/TCP codec on the hot path: decoding
//! FC 3 and FC 16 request frames, encoding a request towards a PLC, and
//! splitting plus checking a PLC response.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use sluice::modbus::frame::{
    check_response, decode_request, decode_response, encode_request, Decoded, Header,
};
use sluice::modbus::pdu::Request;

const HEADER: Header = Header {
    transaction_id: 0x0102,
    unit: 0x01,
};

/// Builds a frame with protocol id 0 and the MBAP length of `pdu`.
fn frame(pdu: &[u8]) -> Vec<u8> {
    let length = u16::try_from(pdu.len() + 1).expect("PDU fits a frame");
    let mut bytes = Vec::with_capacity(7 + pdu.len());
    bytes.extend_from_slice(&HEADER.transaction_id.to_be_bytes());
    bytes.extend_from_slice(&[0, 0]);
    bytes.extend_from_slice(&length.to_be_bytes());
    bytes.push(HEADER.unit);
    bytes.extend_from_slice(pdu);
    bytes
}

/// FC 3: read 10 holding registers from address 100.
fn fc3_frame() -> Vec<u8> {
    frame(&[0x03, 0x00, 0x64, 0x00, 0x0A])
}

/// FC 16: write the maximum of 123 registers from address 0.
fn fc16_frame() -> Vec<u8> {
    let mut pdu = vec![0x10, 0x00, 0x00, 0x00, 0x7B, 0xF6];
    pdu.resize(pdu.len() + 0xF6, 0x5A);
    frame(&pdu)
}

fn decoded_request(bytes: &[u8]) -> Request {
    let mut buf = BytesMut::from(bytes);
    match decode_request(&mut buf) {
        Ok(Some(Decoded::Request { request, .. })) => request,
        other => panic!("benchmark frame does not decode: {other:?}"),
    }
}

fn bench_decode_request(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_request");
    for (name, bytes) in [("fc3", fc3_frame()), ("fc16_123_registers", fc16_frame())] {
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                || BytesMut::from(&bytes[..]),
                |buf| decode_request(black_box(buf)),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn bench_encode_request(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode_request");
    for (name, bytes) in [("fc3", fc3_frame()), ("fc16_123_registers", fc16_frame())] {
        let request = decoded_request(&bytes);
        let mut out = BytesMut::with_capacity(512);
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                encode_request(HEADER, black_box(&request), &mut out);
                out.len()
            })
        });
    }
    group.finish();
}

fn bench_response(c: &mut Criterion) {
    let request = decoded_request(&fc3_frame());
    let mut pdu = vec![0x03, 0x14];
    pdu.resize(pdu.len() + 0x14, 0x21);
    let bytes = frame(&pdu);

    c.bench_function("decode_response_and_check/fc3", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&bytes[..]),
            |buf| {
                let response = decode_response(black_box(buf))
                    .expect("valid header")
                    .expect("whole frame");
                check_response(&request, &response.pdu)
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(
    benches,
    bench_decode_request,
    bench_encode_request,
    bench_response
);
criterion_main!(benches);
