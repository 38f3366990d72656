//! The embedded collector behind `sluice collect`: an HTTPS server that
//! accepts `POST /events` with a JSON array of events, appends each new event
//! as one JSON line to a file and fsyncs before answering 200, so a 200
//! means the events are on disk. Events whose `id` it has already stored in
//! this run are dropped.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The path events are posted to.
pub const EVENTS_PATH: &str = "/events";
/// Largest request body accepted: 64 MiB, far above a batch of the largest
/// `batch_max` of ordinary events.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Ids remembered for de-duplication; the oldest are forgotten first.
pub const MAX_REMEMBERED_IDS: usize = 1_000_000;
/// Longest TLS handshake of one client.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The output file and the ids stored in this run.
struct Store {
    file: File,
    seen: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

/// The result of storing one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub accepted: usize,
    pub duplicates: usize,
}

impl Store {
    fn remember(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        self.seen.insert(id.to_owned());
        self.order.push_back(id.to_owned());
        true
    }

    /// Appends the events not seen before and syncs the file.
    fn store(&mut self, events: &[serde_json::Value]) -> io::Result<Stored> {
        let mut buffer = Vec::new();
        let mut stored = Stored {
            accepted: 0,
            duplicates: 0,
        };
        for event in events {
            let id = event.get("id").and_then(|id| id.as_str()).unwrap_or("");
            if !self.remember(id) {
                stored.duplicates += 1;
                continue;
            }
            serde_json::to_writer(&mut buffer, event)?;
            buffer.push(b'\n');
            stored.accepted += 1;
        }
        if !buffer.is_empty() {
            self.file.write_all(&buffer)?;
            self.file.sync_data()?;
        }
        Ok(stored)
    }
}

/// The state one `sluice collect` process shares between connections.
#[derive(Clone)]
pub struct Collector {
    store: Arc<Mutex<Store>>,
}

impl Collector {
    /// Opens `out` for appending, creating it.
    pub fn open(out: &Path, remembered_ids: usize) -> io::Result<Collector> {
        let file = OpenOptions::new().create(true).append(true).open(out)?;
        let store = Store {
            file,
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity: remembered_ids.max(1),
        };
        Ok(Collector {
            store: Arc::new(Mutex::new(store)),
        })
    }

    async fn store(&self, events: Vec<serde_json::Value>) -> io::Result<Stored> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = store
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            store.store(&events)
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// Accepts connections on `listener` until `stop` is cancelled, then waits
/// for the open connections to finish their request.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    collector: Collector,
    stop: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let collector = collector.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |request| {
                let collector = collector.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(request, &collector).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(error) = served {
                        tracing::debug!(%peer, %error, "connection ended with an error");
                    }
                }
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn handle(request: Request<Incoming>, collector: &Collector) -> Response<Full<Bytes>> {
    if request.uri().path() != EVENTS_PATH {
        return reply(StatusCode::NOT_FOUND, "not found; post events to /events");
    }
    if request.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "use POST");
    }
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            tracing::debug!(%error, "request body not read");
            return reply(StatusCode::PAYLOAD_TOO_LARGE, "body too large or cut short");
        }
    };
    let events = match parse_events(&body) {
        Ok(events) => events,
        Err(problem) => return reply(StatusCode::BAD_REQUEST, &problem),
    };
    match collector.store(events).await {
        Ok(stored) => {
            tracing::debug!(
                accepted = stored.accepted,
                duplicates = stored.duplicates,
                "events stored"
            );
            let text = format!(
                "{{\"accepted\":{},\"duplicates\":{}}}",
                stored.accepted, stored.duplicates
            );
            reply(StatusCode::OK, &text)
        }
        Err(error) => {
            tracing::error!(%error, "writing events failed");
            reply(StatusCode::INTERNAL_SERVER_ERROR, "events not stored")
        }
    }
}

/// Parses a body that must be a JSON array of objects, each with a string
/// `id`.
pub fn parse_events(body: &[u8]) -> Result<Vec<serde_json::Value>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|error| format!("invalid JSON: {error}"))?;
    let serde_json::Value::Array(events) = value else {
        return Err("the body is not a JSON array".to_owned());
    };
    for (index, event) in events.iter().enumerate() {
        if !event.get("id").is_some_and(serde_json::Value::is_string) {
            return Err(format!("event {index} has no string \"id\""));
        }
    }
    Ok(events)
}

fn reply(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *response.status_mut() = status;
    response
}

/// The settings of `sluice collect`.
#[derive(Debug, Clone)]
pub struct CollectSettings {
    pub bind: std::net::SocketAddr,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: Option<std::path::PathBuf>,
    pub out: std::path::PathBuf,
}

/// Runs `sluice collect`: binds, prints `listening ADDRESS` on standard
/// output, and serves until SIGTERM or SIGINT.
pub async fn run(settings: CollectSettings) -> io::Result<()> {
    let tls =
        super::tls::server_config(&settings.cert, &settings.key, settings.client_ca.as_deref())?;
    let collector = Collector::open(&settings.out, MAX_REMEMBERED_IDS).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("cannot open {}: {error}", settings.out.display()),
        )
    })?;
    let listener = TcpListener::bind(settings.bind).await.map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("cannot bind {}: {error}", settings.bind),
        )
    })?;
    let address = listener.local_addr()?;
    println!("listening {address}");
    tracing::info!(%address, out = %settings.out.display(), "collector listening");

    let stop = CancellationToken::new();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let signalled = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        signalled.cancel();
    });
    serve(listener, tls, collector, stop).await;
    tracing::info!("collector stopped");
    Ok(())
}
