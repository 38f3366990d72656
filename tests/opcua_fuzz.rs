//! Fuzz targets for the OPC UA framing guard, run as ordinary tests with
//! bolero's random engine. The guard never panics, and its verdict does not
//! depend on how the stream is split. Every chunk it passes obeys the rules
//! as an independent checker in this file reads them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use bolero::check;
use sluice::opcua::framing::{
    Frame, FrameGuard, FramingLimits, Violation, ViolationKind, HEADER_LEN, HELLO_MIN_LEN,
    MAX_ENDPOINT_URL_LEN, MAX_OPEN_MESSAGES, OPEN_MIN_LEN, SYMMETRIC_MIN_LEN,
};

/// Random inputs per target: enough to reach every rule many times while
/// keeping `cargo test` within seconds.
const ITERATIONS: usize = 20_000;

/// Small limits, so that random streams reach them.
const LIMITS: FramingLimits = FramingLimits {
    max_chunk_size: 256,
    max_chunk_count: 3,
    max_message_size: 600,
};

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

/// Checks the passed chunks against the rules, independently of the guard.
fn assert_rules(input: &[u8], frames: &[Frame]) {
    let passed: Vec<u8> = frames
        .iter()
        .flat_map(|frame| frame.bytes.to_vec())
        .collect();
    assert!(
        input.starts_with(&passed),
        "passed bytes are not the input's prefix"
    );
    let mut open: HashMap<(u32, u32), (u32, u64)> = HashMap::new();
    for (index, frame) in frames.iter().enumerate() {
        let bytes = &frame.bytes[..];
        assert_eq!(u32_at(bytes, 4) as usize, bytes.len());
        let code = &bytes[..3];
        let chunk = bytes[3];
        if index == 0 {
            assert_eq!(code, b"HEL");
            assert_eq!(chunk, b'F');
            assert!(bytes.len() >= HELLO_MIN_LEN);
            assert!(bytes.len() <= HELLO_MIN_LEN + MAX_ENDPOINT_URL_LEN);
            let url_length = u32_at(bytes, 28) as i32;
            assert_eq!(bytes.len(), HELLO_MIN_LEN + url_length.max(0) as usize);
            continue;
        }
        assert!(bytes.len() <= LIMITS.max_chunk_size as usize);
        match code {
            b"OPN" => {
                assert_eq!(chunk, b'F');
                assert!(bytes.len() >= OPEN_MIN_LEN);
            }
            b"CLO" => {
                assert_eq!(chunk, b'F');
                assert!(bytes.len() >= SYMMETRIC_MIN_LEN);
            }
            b"MSG" => {
                assert!(matches!(chunk, b'F' | b'C' | b'A'));
                assert!(bytes.len() >= SYMMETRIC_MIN_LEN);
                let key = (u32_at(bytes, HEADER_LEN), u32_at(bytes, HEADER_LEN + 4));
                if chunk == b'A' {
                    open.remove(&key);
                    continue;
                }
                let entry = open.entry(key).or_default();
                entry.0 += 1;
                entry.1 += bytes.len() as u64;
                assert!(entry.0 <= LIMITS.max_chunk_count, "too many chunks passed");
                assert!(
                    entry.1 <= u64::from(LIMITS.max_message_size),
                    "too many bytes passed"
                );
                if chunk == b'F' {
                    open.remove(&key);
                }
                assert!(open.len() <= MAX_OPEN_MESSAGES);
            }
            other => panic!("passed message type {other:?} after the Hello"),
        }
    }
}

/// Feeds `input` cut at `cuts` (taken modulo the length) and returns all
/// frames, or the violation with the frames passed before it.
fn feed(input: &[u8], cuts: &[u16]) -> (Vec<Frame>, Option<Violation>) {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|cut| usize::from(*cut) % (input.len() + 1))
        .collect();
    points.push(0);
    points.push(input.len());
    points.sort_unstable();
    let mut guard = FrameGuard::new(LIMITS);
    let mut frames = Vec::new();
    for pair in points.windows(2) {
        match guard.push(&input[pair[0]..pair[1]]) {
            Ok(more) => frames.extend(more),
            Err(violation) => return (frames, Some(violation)),
        }
    }
    (frames, None)
}

/// Feeds `input` whole and cut, compares both and returns the number of
/// chunks passed and the violation, if any.
fn check_stream(input: &[u8], cuts: &[u16]) -> (usize, Option<ViolationKind>) {
    let (whole, whole_violation) = feed(input, &[]);
    let (split, split_violation) = feed(input, cuts);
    assert_rules(input, &whole);
    assert_rules(input, &split);
    // Frames withheld by a violation differ with the cuts, the verdict not.
    assert_eq!(whole_violation, split_violation);
    if whole_violation.is_none() {
        assert_eq!(whole, split);
    }
    (whole.len(), whole_violation.map(|violation| violation.kind))
}

/// One message of a generated stream: mostly valid, sometimes not.
#[derive(Debug, Clone, bolero::TypeGenerator)]
struct Piece {
    selector: u8,
    chunk: u8,
    token: u8,
    size: u16,
    corrupt: Option<(u8, u8)>,
}

fn message(code: &[u8; 3], chunk: u8, body: &[u8]) -> Vec<u8> {
    let mut bytes = code.to_vec();
    bytes.push(chunk);
    bytes.extend_from_slice(&((HEADER_LEN + body.len()) as u32).to_le_bytes());
    bytes.extend_from_slice(body);
    bytes
}

fn hello(url_length: usize) -> Vec<u8> {
    let mut body = Vec::new();
    for field in [0u32, 8192, 8192, 0, 0] {
        body.extend_from_slice(&field.to_le_bytes());
    }
    body.extend_from_slice(&(url_length as i32).to_le_bytes());
    body.resize(body.len() + url_length, b'u');
    message(b"HEL", b'F', &body)
}

/// Builds one piece. Invalid pieces are rare, so that sessions run long
/// enough to reach the chunk limits.
fn build(piece: &Piece) -> Vec<u8> {
    let chunk = match piece.chunk % 16 {
        0 => b'X',
        1 | 2 => b'A',
        3..=8 => b'C',
        _ => b'F',
    };
    let size = usize::from(piece.size) % 200;
    let mut bytes = match piece.selector % 32 {
        0 => hello(size),
        1 => message(b"ACK", b'F', &[0; 20]),
        2..=4 => {
            let mut body = 0u32.to_le_bytes().to_vec();
            body.extend_from_slice(&4i32.to_le_bytes());
            body.extend_from_slice(b"None");
            body.extend_from_slice(&(-1i32).to_le_bytes());
            body.extend_from_slice(&(-1i32).to_le_bytes());
            body.resize(body.len() + size.max(8), 0);
            message(b"OPN", b'F', &body)
        }
        5 | 6 => message(b"CLO", b'F', &symmetric_body(piece.token, size)),
        _ => message(b"MSG", chunk, &symmetric_body(piece.token, size)),
    };
    if let Some((at, value)) = piece.corrupt.filter(|(at, _)| at % 16 == 0) {
        let at = usize::from(at / 16) % bytes.len();
        bytes[at] = value;
    }
    bytes
}

fn symmetric_body(token: u8, size: usize) -> Vec<u8> {
    let mut body = 7u32.to_le_bytes().to_vec();
    body.extend_from_slice(&u32::from(token % 3).to_le_bytes());
    body.resize(body.len() + size.max(8), 0x5A);
    body
}

#[test]
fn guard_on_arbitrary_bytes() {
    check!()
        .with_type::<(Vec<u8>, Vec<u16>)>()
        .with_iterations(ITERATIONS)
        .for_each(|(input, cuts)| {
            let with_hello = [hello(usize::from(cuts.len() as u8)), input.clone()].concat();
            let _ = check_stream(input, cuts);
            let _ = check_stream(&with_hello, cuts);
        });
}

#[test]
fn guard_on_generated_sessions() {
    let long_sessions = AtomicUsize::new(0);
    let floods = AtomicUsize::new(0);
    check!()
        .with_type::<(u8, Vec<Piece>, Vec<u16>)>()
        .with_iterations(ITERATIONS)
        .for_each(|(url_length, pieces, cuts)| {
            let mut input = hello(usize::from(*url_length));
            for piece in pieces {
                input.extend(build(piece));
            }
            let (passed, violation) = check_stream(&input, cuts);
            if passed >= 6 {
                long_sessions.fetch_add(1, Ordering::Relaxed);
            }
            if violation == Some(ViolationKind::ChunkFlood) {
                floods.fetch_add(1, Ordering::Relaxed);
            }
        });
    // The generator must reach deep into sessions and past the limits.
    let long_sessions = long_sessions.load(Ordering::Relaxed);
    let floods = floods.load(Ordering::Relaxed);
    assert!(
        long_sessions > ITERATIONS / 100,
        "{long_sessions} sessions passed 6 chunks"
    );
    assert!(
        floods > ITERATIONS / 100,
        "{floods} sessions hit a chunk limit"
    );
}
