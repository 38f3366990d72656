//! The HTTP/1.1 endpoint for Prometheus and health checks: `GET /metrics`,
//! `GET /healthz` and `GET /readyz`. Connections, request heads and idle
//! time are bounded, so a slow or hostile client cannot hold the endpoint.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Metrics, OPENMETRICS_CONTENT_TYPE};

const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// hyper's minimum read buffer size (`http1::Builder::max_buf_size` panics
/// below it).
const MIN_READ_BUFFER_BYTES: usize = 8192;

/// Pause after a failed `accept`, such as when the process is out of file
/// descriptors, so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bounds of the HTTP endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections served at once. Further connections wait in the kernel's
    /// accept queue until one closes.
    pub max_connections: usize,
    /// Largest request head (request line and headers); a larger one gets
    /// 431 and the connection is closed.
    pub max_header_bytes: usize,
    /// Time a connection may take to send a complete request head, idle
    /// keep-alive time included; the connection is closed after it.
    pub header_read_timeout: Duration,
    /// Age after which a connection is closed once the response to its
    /// current request is sent.
    pub max_connection_age: Duration,
    /// Time an open connection gets to finish its request at shutdown or at
    /// `max_connection_age` before it is dropped.
    pub drain_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 16,
            max_header_bytes: 8192,
            header_read_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// What `/readyz` checks. Every flag starts false, so the gateway reports
/// ready only after each part has set its flag.
#[derive(Debug, Default)]
pub struct Readiness {
    listeners_bound: AtomicBool,
    policy_loaded: AtomicBool,
    audit_writable: AtomicBool,
}

impl Readiness {
    /// Sets whether every configured listener is bound.
    pub fn set_listeners_bound(&self, bound: bool) {
        self.listeners_bound.store(bound, Ordering::Relaxed);
    }

    /// Sets whether a policy snapshot is in force.
    pub fn set_policy_loaded(&self, loaded: bool) {
        self.policy_loaded.store(loaded, Ordering::Relaxed);
    }

    /// Sets whether the audit log can be written.
    pub fn set_audit_writable(&self, writable: bool) {
        self.audit_writable.store(writable, Ordering::Relaxed);
    }

    /// Returns why the gateway is not ready, or an empty list when it is.
    pub fn unready_reasons(&self) -> Vec<&'static str> {
        let checks = [
            (&self.listeners_bound, "listeners not bound"),
            (&self.policy_loaded, "policy not loaded"),
            (&self.audit_writable, "audit log not writable"),
        ];
        checks
            .iter()
            .filter(|(flag, _)| !flag.load(Ordering::Relaxed))
            .map(|(_, reason)| *reason)
            .collect()
    }
}

/// Serves the endpoint on `listener` with the default `HttpLimits` until
/// `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    serve_with_limits(
        listener,
        metrics,
        readiness,
        HttpLimits::default(),
        shutdown,
    )
    .await
}

/// Serves the endpoint on `listener` until `shutdown` is cancelled, then
/// lets open connections finish within `limits.drain_timeout`. Errors of
/// single connections and failed accepts are logged, not returned.
pub async fn serve_with_limits(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let address = listener.local_addr()?;
    tracing::info!(%address, "metrics endpoint listening");
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let tracker = TaskTracker::new();

    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let connection = Connection {
                    metrics: metrics.clone(),
                    readiness: readiness.clone(),
                    limits,
                    shutdown: shutdown.clone(),
                };
                tracker.spawn(connection.run(stream, peer, permit));
            }
            Err(error) => {
                tracing::warn!(%address, %error, "metrics endpoint failed to accept a connection");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }

    tracker.close();
    tracker.wait().await;
    tracing::info!(%address, "metrics endpoint stopped");
    Ok(())
}

struct Connection {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    limits: HttpLimits,
    shutdown: CancellationToken,
}

impl Connection {
    async fn run(self, stream: TcpStream, peer: SocketAddr, _permit: OwnedSemaphorePermit) {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .max_header_size(self.limits.max_header_bytes)
            .max_buf_size(self.limits.max_header_bytes.max(MIN_READ_BUFFER_BYTES));

        let metrics = self.metrics.clone();
        let readiness = self.readiness.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let response = respond(&request, &metrics, &readiness);
            async move { Ok::<_, Infallible>(response) }
        });
        let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));

        let finished = tokio::select! {
            result = connection.as_mut() => Some(result),
            _ = self.shutdown.cancelled() => None,
            _ = tokio::time::sleep(self.limits.max_connection_age) => None,
        };
        let result = match finished {
            Some(result) => result,
            None => {
                connection.as_mut().graceful_shutdown();
                match tokio::time::timeout(self.limits.drain_timeout, connection).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::debug!(%peer, "metrics connection dropped after drain timeout");
                        return;
                    }
                }
            }
        };
        if let Err(error) = result {
            tracing::debug!(%peer, %error, "metrics connection closed with an error");
        }
    }
}

/// Builds the response to one request; the body of a request is never read.
fn respond(
    request: &Request<Incoming>,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }

    match request.uri().path() {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok".into()),
        "/readyz" => {
            let reasons = readiness.unready_reasons();
            if reasons.is_empty() {
                text(StatusCode::OK, "ok".into())
            } else {
                let body = reasons.iter().map(|reason| format!("{reason}\n")).collect();
                text(StatusCode::SERVICE_UNAVAILABLE, body)
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_CONTENT_TYPE));
    response
}
