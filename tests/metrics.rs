//! The metrics endpoint over real TCP on loopback: status lines, content
//! types and metric lines of `/metrics`, `/healthz` and `/readyz`, and the
//! bounds on malformed, oversized and idle requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice::metrics::{
    serve_with_limits, ConfiguredNames, HttpLimits, Metrics, Readiness, OPENMETRICS_CONTENT_TYPE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Bound on every wait for the server in these tests.
const WAIT: Duration = Duration::from_secs(10);

struct Endpoint {
    address: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
}

async fn start(limits: HttpLimits) -> Endpoint {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("local address");
    let metrics = Metrics::new("0.1.0");
    let readiness = Arc::new(Readiness::default());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve_with_limits(
        listener,
        metrics.clone(),
        readiness.clone(),
        limits,
        shutdown.clone(),
    ));
    Endpoint {
        address,
        metrics,
        readiness,
        shutdown,
        server,
    }
}

struct Reply {
    status_line: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Sends `request` as raw bytes and reads until the server closes the
/// connection.
async fn exchange(address: SocketAddr, request: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("server closed the connection in time")
        .expect("read reply");
    parse(&String::from_utf8(raw).expect("UTF-8 reply"))
}

fn parse(raw: &str) -> Reply {
    let (head, body) = raw.split_once("\r\n\r\n").expect("end of head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line").to_owned();
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("header colon");
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    Reply {
        status_line,
        headers,
        body: body.to_owned(),
    }
}

async fn get(address: SocketAddr, path: &str) -> Reply {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    exchange(address, request.as_bytes()).await
}

#[track_caller]
fn assert_line(text: &str, line: &str) {
    assert!(
        text.lines().any(|candidate| candidate == line),
        "missing line {line:?} in:\n{text}"
    );
}

#[tokio::test]
async fn metrics_endpoint_serves_openmetrics() {
    let endpoint = start(HttpLimits::default()).await;
    let instruments = endpoint.metrics.configure(ConfiguredNames {
        listeners: vec!["scada".into()],
        vendors: vec!["acme".into()],
        devices: vec!["press-1".into()],
        states: vec![],
        collectors: vec![],
    });
    for _ in 0..3 {
        instruments.record_request(0, 0, 0, 0x03, true, None);
    }
    instruments.record_request(0, 0, 0, 0x10, false, None);

    let reply = get(endpoint.address, "/metrics").await;
    assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
    assert_eq!(reply.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
    assert_line(
        &reply.body,
        r#"sluice_requests_total{listener="scada",vendor="acme",device="press-1",function="read_holding_registers",decision="allow"} 3"#,
    );
    assert_line(
        &reply.body,
        r#"sluice_requests_total{listener="scada",vendor="acme",device="press-1",function="write_multiple_registers",decision="deny"} 1"#,
    );
    assert_line(&reply.body, r#"sluice_build_info{version="0.1.0"} 1"#);
    assert!(reply.body.ends_with("# EOF\n"), "body:\n{}", reply.body);
}

#[tokio::test]
async fn metrics_endpoint_answers_head_without_body() {
    let endpoint = start(HttpLimits::default()).await;
    let reply = exchange(
        endpoint.address,
        b"HEAD /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
    assert_eq!(reply.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
    assert_eq!(reply.body, "");
}

#[tokio::test]
async fn healthz_answers_ok() {
    let endpoint = start(HttpLimits::default()).await;
    let reply = get(endpoint.address, "/healthz").await;
    assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(reply.body, "ok");
}

#[tokio::test]
async fn readyz_names_each_missing_condition() {
    let endpoint = start(HttpLimits::default()).await;
    let reply = get(endpoint.address, "/readyz").await;
    assert_eq!(reply.status_line, "HTTP/1.1 503 Service Unavailable");
    assert_eq!(
        reply.body,
        "listeners not bound\npolicy not loaded\naudit log not writable\n"
    );

    endpoint.readiness.set_listeners_bound(true);
    endpoint.readiness.set_policy_loaded(true);
    let reply = get(endpoint.address, "/readyz").await;
    assert_eq!(reply.status_line, "HTTP/1.1 503 Service Unavailable");
    assert_eq!(reply.body, "audit log not writable\n");

    endpoint.readiness.set_audit_writable(true);
    let reply = get(endpoint.address, "/readyz").await;
    assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
    assert_eq!(reply.body, "ok");

    endpoint.readiness.set_audit_writable(false);
    let reply = get(endpoint.address, "/readyz").await;
    assert_eq!(reply.status_line, "HTTP/1.1 503 Service Unavailable");
    assert_eq!(reply.body, "audit log not writable\n");
}

#[tokio::test]
async fn unknown_path_gets_404() {
    let endpoint = start(HttpLimits::default()).await;
    let reply = get(endpoint.address, "/metrics/../admin").await;
    assert_eq!(reply.status_line, "HTTP/1.1 404 Not Found");
}

#[tokio::test]
async fn post_gets_405_with_allow_header() {
    let endpoint = start(HttpLimits::default()).await;
    let reply = exchange(
        endpoint.address,
        b"POST /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status_line, "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(reply.header("allow"), Some("GET, HEAD"));
}

#[tokio::test]
async fn malformed_request_gets_400_and_server_stays_up() {
    let endpoint = start(HttpLimits::default()).await;
    let reply = exchange(
        endpoint.address,
        b"GET /metrics HTTP/1.1\r\nBad Header\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status_line, "HTTP/1.1 400 Bad Request");

    let reply = exchange(endpoint.address, b"\x00\x01\x02 nonsense\r\n\r\n").await;
    assert_eq!(reply.status_line, "HTTP/1.1 400 Bad Request");

    let reply = get(endpoint.address, "/healthz").await;
    assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn oversized_head_gets_431_and_server_stays_up() {
    let endpoint = start(HttpLimits::default()).await;
    let filler = "a".repeat(HttpLimits::default().max_header_bytes);
    let request = format!("GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Filler: {filler}\r\n\r\n");
    let reply = exchange(endpoint.address, request.as_bytes()).await;
    assert_eq!(
        reply.status_line,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );

    let reply = get(endpoint.address, "/healthz").await;
    assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn idle_connection_is_closed_after_header_timeout() {
    let limits = HttpLimits {
        header_read_timeout: Duration::from_millis(200),
        ..HttpLimits::default()
    };
    let endpoint = start(limits).await;
    let mut stream = TcpStream::connect(endpoint.address).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\n")
        .await
        .expect("write");

    // The server closes without a reply; a reset instead of a clean close
    // is also acceptable, so only the bytes received are checked.
    let mut raw = Vec::new();
    let _closed = tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("server closed the idle connection in time");
    assert_eq!(String::from_utf8_lossy(&raw), "");

    let reply = get(endpoint.address, "/healthz").await;
    assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn connection_over_cap_waits_for_a_free_slot() {
    let limits = HttpLimits {
        max_connections: 1,
        ..HttpLimits::default()
    };
    let endpoint = start(limits).await;

    // The first connection holds the only slot with a keep-alive request.
    let mut first = TcpStream::connect(endpoint.address).await.expect("connect");
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut buffer = [0u8; 512];
    let read = tokio::time::timeout(WAIT, first.read(&mut buffer))
        .await
        .expect("first reply in time")
        .expect("read");
    assert!(
        String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 200 OK"),
        "first reply {:?}",
        String::from_utf8_lossy(&buffer[..read])
    );

    // The second connection is served once the first one closes.
    let second = tokio::spawn(get(endpoint.address, "/healthz"));
    drop(first);
    let reply = tokio::time::timeout(WAIT, second)
        .await
        .expect("second reply in time")
        .expect("second task");
    assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn keep_alive_connection_serves_several_requests() {
    let endpoint = start(HttpLimits::default()).await;
    let mut stream = TcpStream::connect(endpoint.address).await.expect("connect");
    stream
        .write_all(
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\nGET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("replies in time")
        .expect("read");
    let replies = String::from_utf8(raw).expect("UTF-8");
    assert_eq!(replies.matches("HTTP/1.1 200 OK").count(), 2, "{replies}");
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let endpoint = start(HttpLimits::default()).await;
    let reply = get(endpoint.address, "/healthz").await;
    assert_eq!(reply.status_line, "HTTP/1.1 200 OK");

    endpoint.shutdown.cancel();
    let result = tokio::time::timeout(WAIT, endpoint.server)
        .await
        .expect("server stopped in time")
        .expect("server task");
    assert!(result.is_ok(), "serve returned {result:?}");
    assert!(TcpStream::connect(endpoint.address).await.is_err());
}
