//! The upstream pool against real peers on 127.0.0.1: the simulated PLC,
//! and fake PLCs scripted byte by byte to send what a faulty device sends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice::events::{Emitter, Event, EventType, Severity};
use sluice::modbus::frame::ResponseError;
use sluice::modbus::pdu::Request;
use sluice::modbus::sim::SimPlc;
use sluice::modbus::upstream::{ConnectFailure, Pool, UpstreamError, UpstreamSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Bounds every wait in these tests, so a broken pool fails instead of
/// hanging. No test relies on it elapsing.
const BOUND: Duration = Duration::from_secs(5);

async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(BOUND, future)
        .await
        .expect("operation did not finish within the test bound")
}

fn settings(address: SocketAddr) -> UpstreamSettings {
    UpstreamSettings {
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ..UpstreamSettings::new("press-1", address)
    }
}

fn pool(settings: UpstreamSettings) -> (Pool, mpsc::Receiver<Event>) {
    let (emitter, events) = Emitter::new(Arc::from("edge-01"));
    (Pool::new(settings, emitter), events)
}

async fn start_sim() -> (SimPlc, SocketAddr, JoinHandle<std::io::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let plc = SimPlc::new();
    let server = tokio::spawn(plc.clone().serve(listener));
    (plc, address, server)
}

fn read_holding(address: u16, quantity: u16) -> Request {
    Request::ReadHoldingRegisters { address, quantity }
}

/// Builds the response PDU for FC 3 with `values`.
fn registers_pdu(values: &[u16]) -> Vec<u8> {
    let mut pdu = vec![0x03, (values.len() * 2) as u8];
    for value in values {
        pdu.extend_from_slice(&value.to_be_bytes());
    }
    pdu
}

/// One request frame as a fake PLC receives it.
struct Received {
    transaction_id: u16,
    unit: u8,
    pdu: Vec<u8>,
}

async fn read_request(stream: &mut TcpStream) -> Received {
    let mut header = [0u8; 7];
    stream.read_exact(&mut header).await.unwrap();
    let length = usize::from(u16::from_be_bytes([header[4], header[5]]));
    let mut pdu = vec![0u8; length - 1];
    stream.read_exact(&mut pdu).await.unwrap();
    Received {
        transaction_id: u16::from_be_bytes([header[0], header[1]]),
        unit: header[6],
        pdu,
    }
}

fn response_frame(transaction_id: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(7 + pdu.len());
    frame.extend_from_slice(&transaction_id.to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&(pdu.len() as u16 + 1).to_be_bytes());
    frame.push(unit);
    frame.extend_from_slice(pdu);
    frame
}

fn drain(events: &mut mpsc::Receiver<Event>) -> Vec<Event> {
    let mut drained = Vec::new();
    while let Ok(event) = events.try_recv() {
        drained.push(event);
    }
    drained
}

fn anomalies(events: &[Event]) -> Vec<(&'static str, Severity, String)> {
    events
        .iter()
        .filter_map(|event| event.anomaly.as_ref())
        .map(|anomaly| (anomaly.kind, anomaly.severity, anomaly.detail.clone()))
        .collect()
}

fn actions(events: &[Event]) -> Vec<&'static str> {
    events
        .iter()
        .filter(|event| event.event_type == EventType::System)
        .filter_map(|event| event.action)
        .collect()
}

#[tokio::test]
async fn pool_reads_exact_values_from_sim() {
    let (plc, address, server) = start_sim().await;
    let (pool, mut events) = pool(settings(address));

    let holding = within(pool.call(1, &read_holding(100, 3))).await;
    assert_eq!(holding, Ok(Bytes::from(registers_pdu(&[100, 101, 102]))));

    let input = Request::ReadInputRegisters {
        address: 1005,
        quantity: 2,
    };
    let input = within(pool.call(1, &input)).await;
    assert_eq!(
        input,
        Ok(Bytes::from_static(&[0x04, 4, 0x75, 0x35, 0x75, 0x36]))
    );

    let coils = Request::ReadCoils {
        address: 0,
        quantity: 10,
    };
    let coils = within(pool.call(1, &coils)).await;
    // Coils 0, 3, 6 and 9 are on, least significant bit first.
    assert_eq!(
        coils,
        Ok(Bytes::from_static(&[0x01, 2, 0b0100_1001, 0b0000_0010]))
    );

    let write = Request::WriteSingleRegister {
        address: 7,
        value: 4242,
    };
    let echo = within(pool.call(1, &write)).await;
    assert_eq!(echo, Ok(Bytes::from_static(&[0x06, 0, 7, 0x10, 0x92])));
    assert_eq!(plc.holding(7), 4242);
    assert_eq!(plc.request_count(), 4);

    assert!(pool.is_up());
    let events = drain(&mut events);
    assert_eq!(actions(&events), vec!["device_up"]);
    assert_eq!(events[0].device.as_deref(), Some("press-1"));
    server.abort();
}

#[tokio::test]
async fn plc_exception_passes_through_as_response() {
    let (_plc, address, server) = start_sim().await;
    let (pool, _events) = pool(settings(address));

    let past_end = read_holding(65535, 2);
    let response = within(pool.call(1, &past_end)).await;
    assert_eq!(response, Ok(Bytes::from_static(&[0x83, 0x02])));
    server.abort();
}

#[tokio::test]
async fn concurrent_callers_each_get_own_answer() {
    let (plc, address, server) = start_sim().await;
    for (max_connections, max_in_flight) in [(1, 1), (1, 8), (3, 4)] {
        let mut settings = settings(address);
        settings.max_connections = max_connections;
        settings.max_in_flight = max_in_flight;
        let (pool, _events) = pool(settings);

        let callers: Vec<_> = (0..64u16)
            .map(|index| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let address = 1000 + index * 7;
                    (address, pool.call(1, &read_holding(address, 2)).await)
                })
            })
            .collect();
        for caller in callers {
            let (address, response) = within(caller).await.unwrap();
            let expected = registers_pdu(&[address, address + 1]);
            assert_eq!(
                response,
                Ok(Bytes::from(expected)),
                "address {address} with {max_connections} connections, {max_in_flight} in flight"
            );
        }
    }
    assert_eq!(plc.request_count(), 3 * 64);
    server.abort();
}

#[tokio::test]
async fn silent_device_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
    });
    let mut settings = settings(address);
    settings.timeout = Duration::from_millis(200);
    let (pool, _events) = pool(settings);

    let result = within(pool.call(1, &read_holding(0, 1))).await;
    let expected = UpstreamError::Timeout {
        device: Arc::from("press-1"),
        timeout: Duration::from_millis(200),
    };
    assert_eq!(result, Err(expected));
    assert!(pool.is_up());
    silent.abort();
}

#[tokio::test]
async fn closed_port_unreachable_then_backs_off() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let (pool, mut events) = pool(settings(address));

    let first = within(pool.call(1, &read_holding(0, 1))).await;
    let refused = UpstreamError::Unreachable {
        device: Arc::from("press-1"),
        address,
        reason: ConnectFailure::Io {
            kind: std::io::ErrorKind::ConnectionRefused,
        },
    };
    assert_eq!(first, Err(refused));

    // The next attempt waits 100 ms, so an immediate request fails fast.
    let second = within(pool.call(1, &read_holding(0, 1))).await;
    match second {
        Err(UpstreamError::Unreachable {
            reason: ConnectFailure::BackingOff { remaining },
            ..
        }) => assert!(remaining <= Duration::from_millis(100), "{remaining:?}"),
        other => panic!("expected a backoff error, got {other:?}"),
    }
    assert_eq!(second.unwrap_err().exception_code().code(), 0x0A);
    assert!(!pool.is_up());
    assert_eq!(actions(&drain(&mut events)), vec!["device_down"]);
}

#[tokio::test]
async fn wrong_function_in_response_resets_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let (mut first, _) = listener.accept().await.unwrap();
        let request = read_request(&mut first).await;
        assert_eq!(request.pdu, vec![0x03, 0, 10, 0, 1]);
        let wrong = response_frame(request.transaction_id, request.unit, &[0x04, 2, 0, 10]);
        first.write_all(&wrong).await.unwrap();

        // The pool must open a new connection for the next request.
        let (mut second, _) = listener.accept().await.unwrap();
        let request = read_request(&mut second).await;
        let right = response_frame(request.transaction_id, request.unit, &registers_pdu(&[10]));
        second.write_all(&right).await.unwrap();
        let mut rest = Vec::new();
        first.read_to_end(&mut rest).await.unwrap();
        rest
    });
    let (pool, mut events) = pool(settings(address));

    let bad = within(pool.call(1, &read_holding(10, 1))).await;
    let expected = UpstreamError::BadResponse {
        error: ResponseError::Function {
            expected: 0x03,
            actual: 0x04,
        },
    };
    assert_eq!(bad, Err(expected));
    assert_eq!(bad.unwrap_err().exception_code().code(), 0x0B);
    assert_eq!(pool.reconnects(), 0);

    let good = within(pool.call(1, &read_holding(10, 1))).await;
    assert_eq!(good, Ok(Bytes::from(registers_pdu(&[10]))));
    assert_eq!(pool.reconnects(), 1);
    let first_connection_rest = within(fake).await.unwrap();
    assert_eq!(first_connection_rest, Vec::<u8>::new());

    let events = drain(&mut events);
    let recorded = anomalies(&events);
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].0, "bad_response");
    assert_eq!(
        recorded[0].2,
        "connection reset: response does not match its request: \
         response function code 0x04 does not match request function 0x03"
    );
}

#[tokio::test]
async fn stale_response_in_segment_discarded() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let first = read_request(&mut stream).await;
        let answer = response_frame(first.transaction_id, first.unit, &registers_pdu(&[1]));
        stream.write_all(&answer).await.unwrap();

        let second = read_request(&mut stream).await;
        let mut segment = response_frame(first.transaction_id, 1, &registers_pdu(&[0xDEAD]));
        segment.extend(response_frame(
            second.transaction_id,
            second.unit,
            &registers_pdu(&[2]),
        ));
        stream.write_all(&segment).await.unwrap();
        (first.transaction_id, second.transaction_id, stream)
    });
    let (pool, mut events) = pool(settings(address));

    let first = within(pool.call(1, &read_holding(1, 1))).await;
    assert_eq!(first, Ok(Bytes::from(registers_pdu(&[1]))));
    let second = within(pool.call(1, &read_holding(2, 1))).await;
    assert_eq!(second, Ok(Bytes::from(registers_pdu(&[2]))));

    let (stale_id, current_id, _stream) = within(fake).await.unwrap();
    assert_ne!(stale_id, current_id);
    let events = drain(&mut events);
    let recorded = anomalies(&events);
    let detail = format!("discarded response to unknown transaction id {stale_id}");
    assert_eq!(recorded, vec![("late_response", Severity::Medium, detail)]);
    let stale = events.iter().find(|event| event.anomaly.is_some()).unwrap();
    let modbus = stale.modbus.as_ref().unwrap();
    assert_eq!(modbus.transaction_id, stale_id);
    assert_eq!(modbus.function, 0x03);
    assert_eq!(stale.device.as_deref(), Some("press-1"));
}

#[tokio::test]
async fn short_exception_frame_is_bad_response() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let request = read_request(&mut stream).await;
        // MBAP length 2 covers the unit id and function code, leaving the
        // exception code outside the frame.
        let mut frame = response_frame(request.transaction_id, request.unit, &[0x83, 0x02]);
        frame[5] = 2;
        stream.write_all(&frame).await.unwrap();
        stream
    });
    let (pool, mut events) = pool(settings(address));

    let result = within(pool.call(1, &read_holding(0, 1))).await;
    let expected = UpstreamError::BadResponse {
        error: ResponseError::ExceptionLength {
            function: 0x03,
            length: 1,
        },
    };
    assert_eq!(result, Err(expected));
    let _stream = within(fake).await.unwrap();
    let recorded = anomalies(&drain(&mut events));
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].0, "bad_response");
}

#[tokio::test]
async fn late_response_never_reaches_next_caller() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let first = read_request(&mut stream).await;
        // The first request stays unanswered until the second arrives,
        // which the pool sends only after the first timed out.
        let second = read_request(&mut stream).await;
        let late = response_frame(first.transaction_id, first.unit, &registers_pdu(&[0xDEAD]));
        stream.write_all(&late).await.unwrap();
        let current = response_frame(second.transaction_id, second.unit, &registers_pdu(&[2]));
        stream.write_all(&current).await.unwrap();
        (first.transaction_id, stream)
    });
    let mut settings = settings(address);
    settings.timeout = Duration::from_millis(200);
    let (pool, mut events) = pool(settings);

    let first = within(pool.call(1, &read_holding(1, 1))).await;
    assert!(
        matches!(first, Err(UpstreamError::Timeout { .. })),
        "{first:?}"
    );
    let second = within(pool.call(1, &read_holding(2, 1))).await;
    assert_eq!(second, Ok(Bytes::from(registers_pdu(&[2]))));

    let (late_id, _stream) = within(fake).await.unwrap();
    let detail = format!("discarded response to timed-out transaction id {late_id}");
    let recorded = anomalies(&drain(&mut events));
    assert_eq!(recorded, vec![("late_response", Severity::Low, detail)]);
}

#[tokio::test]
async fn out_of_order_responses_reach_callers() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let a = read_request(&mut stream).await;
        let b = read_request(&mut stream).await;
        for request in [&b, &a] {
            let register = u16::from_be_bytes([request.pdu[1], request.pdu[2]]);
            let pdu = registers_pdu(&[register + 1000]);
            let frame = response_frame(request.transaction_id, request.unit, &pdu);
            stream.write_all(&frame).await.unwrap();
        }
        stream
    });
    let mut settings = settings(address);
    settings.max_in_flight = 2;
    let (pool, _events) = pool(settings);

    let (five, six) = (read_holding(5, 1), read_holding(6, 1));
    let (a, b) = within(async { tokio::join!(pool.call(1, &five), pool.call(1, &six)) }).await;
    assert_eq!(a, Ok(Bytes::from(registers_pdu(&[1005]))));
    assert_eq!(b, Ok(Bytes::from(registers_pdu(&[1006]))));
    let _stream = within(fake).await.unwrap();
}

#[tokio::test]
async fn response_from_other_unit_is_rejected() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let request = read_request(&mut stream).await;
        let frame = response_frame(request.transaction_id, 9, &registers_pdu(&[0]));
        stream.write_all(&frame).await.unwrap();
        stream
    });
    let (pool, _events) = pool(settings(address));

    let result = within(pool.call(3, &read_holding(0, 1))).await;
    let expected = UpstreamError::WrongUnit {
        expected: 3,
        received: 9,
    };
    assert_eq!(result, Err(expected));
    let _stream = within(fake).await.unwrap();
}

#[tokio::test]
async fn dead_device_never_delays_other_pool() {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_address = silent.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let (mut stream, _) = silent.accept().await.unwrap();
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
    });
    let mut dead_settings = settings(silent_address);
    dead_settings.device = Arc::from("dead");
    dead_settings.timeout = Duration::from_secs(60);
    let (dead, _dead_events) = pool(dead_settings);
    let waiting = {
        let dead = dead.clone();
        tokio::spawn(async move { dead.call(1, &read_holding(0, 1)).await })
    };

    let (_plc, address, server) = start_sim().await;
    let (alive, _events) = pool(settings(address));
    for register in [0u16, 50, 99] {
        let response = within(alive.call(1, &read_holding(register, 1))).await;
        assert_eq!(response, Ok(Bytes::from(registers_pdu(&[register]))));
    }
    assert!(!waiting.is_finished());

    dead.shutdown();
    let closed = within(waiting).await.unwrap();
    assert_eq!(closed.unwrap_err().exception_code().code(), 0x0A);
    holder.abort();
    server.abort();
}

#[tokio::test]
async fn no_response_requests_written_not_awaited() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.jsonl");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let plc = SimPlc::new().with_log(&log).unwrap();
    let server = tokio::spawn(plc.clone().serve(listener));
    let (pool, mut events) = pool(settings(address));

    let listen_only = Request::Diagnostics {
        sub_function: 0x0004,
        data: Bytes::from_static(&[0, 0]),
    };
    within(pool.send_without_response(1, &listen_only))
        .await
        .unwrap();
    let broadcast = Request::WriteSingleRegister {
        address: 20,
        value: 77,
    };
    within(pool.send_without_response(0, &broadcast))
        .await
        .unwrap();

    // The simulated PLC handles one connection's requests in order, so this
    // response proves that both earlier requests arrived.
    let read = within(pool.call(1, &read_holding(20, 1))).await;
    assert_eq!(read, Ok(Bytes::from(registers_pdu(&[77]))));
    assert_eq!(plc.request_count(), 3);

    let lines = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = lines.lines().collect();
    assert_eq!(
        lines,
        vec![
            r#"{"function":8,"unit":1}"#,
            r#"{"address":20,"function":6,"quantity":1,"unit":0}"#,
            r#"{"address":20,"function":3,"quantity":1,"unit":1}"#,
        ]
    );
    assert!(anomalies(&drain(&mut events)).is_empty());
    server.abort();
}

#[tokio::test]
async fn sequential_calls_share_one_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut transaction_ids = Vec::new();
        for value in 1..=3u16 {
            let request = read_request(&mut stream).await;
            transaction_ids.push(request.transaction_id);
            let answer = response_frame(
                request.transaction_id,
                request.unit,
                &registers_pdu(&[value]),
            );
            stream.write_all(&answer).await.unwrap();
        }
        (transaction_ids, listener, stream)
    });
    let (pool, mut events) = pool(settings(address));

    for value in 1..=3u16 {
        let result = within(pool.call(1, &read_holding(value, 1))).await;
        assert_eq!(result, Ok(Bytes::from(registers_pdu(&[value]))));
    }

    let (transaction_ids, _listener, _stream) = within(fake).await.unwrap();
    assert_eq!(transaction_ids, vec![1, 2, 3]);
    assert_eq!(pool.reconnects(), 0);
    assert_eq!(actions(&drain(&mut events)), vec!["device_up"]);
}

#[tokio::test]
async fn connection_closed_while_idle_is_replaced() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let signal = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let signal_address = signal.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let (mut first, _) = listener.accept().await.unwrap();
        let request = read_request(&mut first).await;
        let answer = response_frame(request.transaction_id, request.unit, &registers_pdu(&[1]));
        first.write_all(&answer).await.unwrap();
        // The pool learns of the close from the same readiness events that
        // carry the signal byte, as it learns of a PLC that went away before
        // a client's next request arrives.
        drop(first);
        let (mut signal, _) = signal.accept().await.unwrap();
        signal.write_all(&[1]).await.unwrap();

        let (mut second, _) = listener.accept().await.unwrap();
        let request = read_request(&mut second).await;
        let answer = response_frame(request.transaction_id, request.unit, &registers_pdu(&[2]));
        second.write_all(&answer).await.unwrap();
        (signal, second)
    });
    let (pool, _events) = pool(settings(address));

    let first = within(pool.call(1, &read_holding(1, 1))).await;
    assert_eq!(first, Ok(Bytes::from(registers_pdu(&[1]))));
    let mut signal = within(TcpStream::connect(signal_address)).await.unwrap();
    let mut byte = [0u8; 1];
    within(signal.read_exact(&mut byte)).await.unwrap();

    let second = within(pool.call(1, &read_holding(2, 1))).await;
    assert_eq!(second, Ok(Bytes::from(registers_pdu(&[2]))));
    assert_eq!(pool.reconnects(), 1);
    let _streams = within(fake).await.unwrap();
}

#[tokio::test]
async fn abandoned_request_delays_next_until_answered() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (seen, first_seen) = tokio::sync::oneshot::channel();
    let (go, answer_first) = tokio::sync::oneshot::channel::<()>();
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let warm_up = read_request(&mut stream).await;
        let answer = response_frame(warm_up.transaction_id, warm_up.unit, &registers_pdu(&[0]));
        stream.write_all(&answer).await.unwrap();

        let first = read_request(&mut stream).await;
        seen.send(()).unwrap();
        answer_first.await.unwrap();
        // With one request in flight per connection, the next request
        // waits for this response however long the caller waited.
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte)).await;
        assert!(
            early.is_err(),
            "second request sent before the first was answered"
        );
        let answer = response_frame(first.transaction_id, first.unit, &registers_pdu(&[1]));
        stream.write_all(&answer).await.unwrap();

        let second = read_request(&mut stream).await;
        let answer = response_frame(second.transaction_id, second.unit, &registers_pdu(&[2]));
        stream.write_all(&answer).await.unwrap();
        (first.transaction_id, second.transaction_id, stream)
    });
    let (pool, mut events) = pool(settings(address));

    let warm_up = within(pool.call(1, &read_holding(0, 1))).await;
    assert_eq!(warm_up, Ok(Bytes::from(registers_pdu(&[0]))));
    let caller = pool.clone();
    let first = tokio::spawn(async move { caller.call(1, &read_holding(1, 1)).await });
    within(first_seen).await.unwrap();
    first.abort();
    assert!(within(first).await.unwrap_err().is_cancelled());

    let caller = pool.clone();
    let second = tokio::spawn(async move { caller.call(1, &read_holding(2, 1)).await });
    go.send(()).unwrap();
    let second = within(second).await.unwrap();
    assert_eq!(second, Ok(Bytes::from(registers_pdu(&[2]))));

    let (first_id, second_id, _stream) = within(fake).await.unwrap();
    assert_ne!(first_id, second_id);
    assert!(anomalies(&drain(&mut events)).is_empty());
}
