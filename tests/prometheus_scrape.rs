//! A real Prometheus server (Debian package `prometheus`, 2.42 on Debian 12)
//! scrapes the metrics endpoint on loopback: the target must be healthy with
//! no scrape error, `sluice_build_info` must come back exactly, and every
//! PromQL expression of `docs/grafana/sluice.json` must evaluate. Grafana is
//! not available here, so this is how the dashboard's queries are checked.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice::metrics::{serve, ConfiguredNames, Metrics, Readiness, RejectReason, TlsOutcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// Bound on the wait for Prometheus to start and report a healthy target.
const TARGET_UP_WAIT: Duration = Duration::from_secs(30);

const POLL_INTERVAL: Duration = Duration::from_millis(200);

const DASHBOARD: &str = "docs/grafana/sluice.json";

/// A Prometheus child process, killed and reaped on drop.
struct Prometheus {
    child: Child,
    address: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    fn start(directory: &Path, target: SocketAddr) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} is missing: install the Debian package `prometheus` \
             (apt-get install prometheus) to run this test"
        );

        let config = directory.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: sluice\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("write prometheus.yml");

        let address = free_loopback_address();
        let log = directory.join("prometheus.log");
        let log_file = fs::File::create(&log).expect("create prometheus.log");
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                directory.join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log handle"))
            .stderr(log_file)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            address,
            log,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a GET to Prometheus's HTTP API and returns the JSON body, or
    /// `None` while Prometheus does not accept connections yet.
    async fn api(&self, path_and_query: &str) -> Option<Value> {
        let mut stream = TcpStream::connect(self.address).await.ok()?;
        // HTTP/1.0 keeps the reply free of chunked encoding: the body simply
        // runs until the server closes the connection.
        let request = format!(
            "GET {path_and_query} HTTP/1.0\r\nHost: {}\r\n\r\n",
            self.address
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        let raw = String::from_utf8(raw).expect("UTF-8 reply from prometheus");
        let (_, body) = raw.split_once("\r\n\r\n")?;
        Some(serde_json::from_str(body).expect("JSON body from prometheus"))
    }

    async fn query(&self, expression: &str) -> Value {
        let path = format!("/api/v1/query?query={}", percent_encode(expression));
        tokio::time::timeout(Duration::from_secs(10), self.api(&path))
            .await
            .expect("query answered in time")
            .unwrap_or_else(|| panic!("no answer to query {expression:?}"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_loopback_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address")
}

fn percent_encode(text: &str) -> String {
    let mut encoded = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Returns the one active target once it is up with no error, or panics
/// with the last state seen after `TARGET_UP_WAIT`.
async fn wait_for_healthy_target(prometheus: &Prometheus) -> Value {
    let deadline = Instant::now() + TARGET_UP_WAIT;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if let Some(targets) = prometheus.api("/api/v1/targets").await {
            let active = &targets["data"]["activeTargets"];
            if let Some([target]) = active.as_array().map(Vec::as_slice) {
                if target["health"] == "up" && target["lastError"] == "" {
                    return target.clone();
                }
            }
            last = targets;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    panic!(
        "target not healthy within {TARGET_UP_WAIT:?}; last targets: {last}\nprometheus log:\n{}",
        prometheus.log()
    );
}

/// Returns every `expr` of the dashboard's panels with Grafana's variables
/// replaced by values Prometheus accepts.
fn dashboard_expressions() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DASHBOARD);
    let dashboard: Value =
        serde_json::from_str(&fs::read_to_string(&path).expect("read dashboard"))
            .expect("dashboard JSON");
    let variables: Vec<String> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating list")
        .iter()
        .filter(|variable| variable["type"] == "query")
        .map(|variable| variable["name"].as_str().expect("variable name").to_owned())
        .collect();

    let mut expressions = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let mut expression = target["expr"].as_str().expect("target expr").to_owned();
            expression = expression
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("$__range", "1h");
            for variable in &variables {
                expression = expression.replace(&format!("${variable}"), ".*");
            }
            assert!(
                !expression.contains('$'),
                "unreplaced variable in {expression:?}"
            );
            expressions.push(expression);
        }
    }
    expressions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_endpoint_and_dashboard_queries_evaluate() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = listener.local_addr().expect("local address");
    let metrics = Metrics::new("0.1.0");
    let instruments = metrics.configure(ConfiguredNames {
        listeners: vec!["scada".into()],
        vendors: vec!["acme".into()],
        devices: vec!["press-1".into()],
        states: vec!["press-1-mode".into()],
        collectors: vec!["soc".into()],
    });
    instruments.record_request(0, 0, 0, 0x03, true, Some(Duration::from_millis(3)));
    instruments.record_request(0, 0, 0, 0x06, false, None);
    instruments.count_session_rejected(0, RejectReason::UnknownSource);
    instruments.upstream(0).set_up(true);
    instruments.upstream(0).count_exception(0x02);
    instruments.set_state(0, Some(1));
    let _session = instruments.open_session(0, 0);
    metrics.count_anomaly("unknown_client");
    metrics.set_audit_writable(true);
    metrics.count_reload(true);
    instruments.count_tls_handshake(0, TlsOutcome::Failure);
    let scada: Arc<str> = Arc::from("scada");
    metrics.set_tls_expiry([(&scada, "crl", "tls/vendors.crl".to_owned(), 1_790_000_000)]);

    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        listener,
        metrics.clone(),
        Arc::new(Readiness::default()),
        shutdown.clone(),
    ));

    let directory = tempfile::tempdir().expect("temporary directory");
    let prometheus = Prometheus::start(directory.path(), target);
    let healthy = wait_for_healthy_target(&prometheus).await;
    assert_eq!(healthy["labels"]["job"], "sluice");
    assert_eq!(healthy["scrapeUrl"], format!("http://{target}/metrics"));

    let build_info = prometheus.query("sluice_build_info").await;
    assert_eq!(build_info["status"], "success", "{build_info}");
    let result = build_info["data"]["result"]
        .as_array()
        .expect("result vector");
    assert_eq!(result.len(), 1, "{build_info}");
    assert_eq!(
        result[0]["metric"],
        serde_json::json!({
            "__name__": "sluice_build_info",
            "instance": target.to_string(),
            "job": "sluice",
            "version": "0.1.0",
        })
    );
    assert_eq!(result[0]["value"][1], "1");

    let requests = prometheus
        .query(r#"sluice_requests_total{decision="allow",function="read_holding_registers"}"#)
        .await;
    let result = requests["data"]["result"]
        .as_array()
        .expect("result vector");
    assert_eq!(result.len(), 1, "{requests}");
    assert_eq!(result[0]["value"][1], "1");

    let expiry = prometheus
        .query(r#"sluice_tls_expiry_timestamp_seconds{kind="crl"}"#)
        .await;
    let result = expiry["data"]["result"].as_array().expect("result vector");
    assert_eq!(result.len(), 1, "{expiry}");
    assert_eq!(result[0]["metric"]["file"], "tls/vendors.crl");
    assert_eq!(result[0]["value"][1], "1790000000");

    let expressions = dashboard_expressions();
    assert!(
        expressions.len() >= 10,
        "only {} expressions",
        expressions.len()
    );
    for expression in expressions {
        let answer = prometheus.query(&expression).await;
        assert_eq!(
            answer["status"], "success",
            "query {expression:?}: {answer}"
        );
        assert!(
            answer.get("warnings").is_none(),
            "query {expression:?} warned: {answer}"
        );
    }

    drop(prometheus);
    shutdown.cancel();
    server.await.expect("server task").expect("serve");
}
