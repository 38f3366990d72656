//! The accept loop of a plain Modbus/TCP listener: identifies the vendor by
//! source address, applies the connection limits and starts a session.
//! Connections that fail either check are closed at once and recorded.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::events::{Event, EventType, Severity};
use crate::metrics::RejectReason;

use super::generation::Shared;
use super::registry::{AdmitError, AdmitLimits, SessionInfo};
use super::session::{self, SessionParams};

/// Pause after an accept error such as EMFILE, so a full descriptor table
/// does not turn the loop into a busy spin.
pub(crate) const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepts connections on `socket` until `shutdown` is cancelled. Sessions
/// are spawned on `tracker` so that a drain can wait for them.
pub async fn serve(
    name: Arc<str>,
    socket: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                admit(&name, stream, peer, &shared, &shutdown, &tracker).await;
            }
            Err(error) => {
                tracing::warn!(listener = %name, %error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

async fn admit(
    name: &Arc<str>,
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    let generation = shared.current.load();
    let policy = &generation.policy;
    let Some(listener) = policy
        .listeners()
        .iter()
        .position(|plan| &plan.name == name)
    else {
        return;
    };
    let plan = &policy.listeners()[listener];
    let instruments = generation.instruments.clone();

    let Some(vendor) = policy.identify(peer.ip()) else {
        instruments.count_session_rejected(listener, RejectReason::UnknownSource);
        tracing::debug!(listener = %name, %peer, "connection from unknown source closed");
        reject(shared, name, peer, None, "source address matches no vendor").await;
        let mut anomaly = Event::anomaly(
            "unknown_client",
            Severity::High,
            format!("connection from {peer} matches no vendor"),
        );
        anomaly.listener = Some(name.clone());
        anomaly.src_ip = Some(peer.ip());
        anomaly.src_port = Some(peer.port());
        emit(shared, anomaly).await;
        return;
    };
    let vendor_name = policy.vendor_name(vendor).clone();
    if shared.quarantine.is_quarantined(&vendor_name) {
        tracing::debug!(listener = %name, %peer, vendor = %vendor_name, "connection of quarantined vendor rejected");
        reject(shared, name, peer, Some(vendor_name), "vendor quarantined").await;
        return;
    }
    if let Some(finding) = shared.detect.connection(&vendor_name, peer.ip()) {
        let mut anomaly = Event::anomaly(finding.kind, finding.severity, finding.detail);
        anomaly.listener = Some(name.clone());
        anomaly.vendor = Some(vendor_name.clone());
        anomaly.src_ip = Some(peer.ip());
        anomaly.src_port = Some(peer.port());
        emit(shared, anomaly.clone()).await;
        if let Some(containment) = policy.on_anomaly(vendor).cloned() {
            if shared
                .detect
                .strike(&vendor_name, finding.kind, Instant::now(), &containment)
            {
                anomaly.anomaly = None;
                session::contain(shared, &vendor_name, &containment, finding.kind, anomaly).await;
                reject(shared, name, peer, Some(vendor_name), "vendor quarantined").await;
                return;
            }
        }
    }

    if policy.outside_all_windows(vendor, jiff::Timestamp::now()) {
        let mut anomaly = Event::anomaly(
            "outside_windows",
            Severity::Medium,
            format!("vendor {vendor_name} connected while none of its rules' time windows is open"),
        );
        anomaly.listener = Some(name.clone());
        anomaly.vendor = Some(vendor_name.clone());
        anomaly.src_ip = Some(peer.ip());
        anomaly.src_port = Some(peer.port());
        emit(shared, anomaly).await;
    }

    let info = SessionInfo {
        id: shared.sessions.next_id(),
        listener: name.clone(),
        vendor: vendor_name.clone(),
        peer,
        started: jiff::Timestamp::now(),
        requests: Arc::default(),
        close: CancellationToken::new(),
        close_reason: Arc::default(),
    };
    let limits = AdmitLimits {
        per_listener: plan.limits.max_connections,
        per_source: plan.limits.max_connections_per_source,
        per_vendor: policy.vendor_max_sessions(vendor),
    };
    let params = SessionParams {
        id: info.id,
        listener: name.clone(),
        peer,
        vendor,
        vendor_name: vendor_name.clone(),
        requests: info.requests.clone(),
        close: info.close.clone(),
        close_reason: info.close_reason.clone(),
        drain: shutdown.clone(),
    };
    drop(generation);

    if let Err(error) = shared.sessions.admit(info, limits) {
        let reason = match error {
            AdmitError::ListenerFull { .. } => RejectReason::ListenerFull,
            AdmitError::SourceFull { .. } => RejectReason::SourceFull,
            AdmitError::VendorFull { .. } => RejectReason::VendorFull,
        };
        instruments.count_session_rejected(listener, reason);
        tracing::debug!(listener = %name, %peer, %error, "connection rejected");
        reject(shared, name, peer, Some(vendor_name), &error.to_string()).await;
        return;
    }
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%peer, %error, "could not disable Nagle's algorithm");
    }

    let shared = shared.clone();
    let span = tracing::debug_span!(
        "session",
        id = params.id,
        listener = %name,
        %peer,
        vendor = %params.vendor_name,
    );
    tracker.spawn(
        async move {
            let id = params.id;
            session::run(stream, params, shared.clone()).await;
            shared.sessions.remove(id);
        }
        .instrument(span),
    );
}

async fn reject(
    shared: &Shared,
    listener: &Arc<str>,
    peer: SocketAddr,
    vendor: Option<Arc<str>>,
    reason: &str,
) {
    let mut event = Event::new(EventType::Session);
    event.action = Some("reject");
    event.listener = Some(listener.clone());
    event.vendor = vendor;
    event.src_ip = Some(peer.ip());
    event.src_port = Some(peer.port());
    event.reason = Some(reason.to_owned());
    emit(shared, event).await;
}

async fn emit(shared: &Shared, event: Event) {
    if let Err(error) = shared.emitter.emit(event).await {
        tracing::error!(%error, "event not recorded");
    }
}

/// Binds `address`, logging the failure with the listener's name.
pub async fn bind(name: &str, address: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("listener {name}: cannot bind {address}: {error}"),
        )
    })
}
