//! The accept loop of a listener. A plain Modbus/TCP listener identifies the
//! vendor by source address. A MODBUS/TCP Security listener runs the TLS
//! handshake and identifies the vendor by client certificate. Both then apply
//! the connection limits and start a session. Connections that fail a check
//! are closed at once and recorded.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::events::{Event, EventType, Severity};
use crate::identity::certificate::CertificateIdentity;
use crate::metrics::{RejectReason, TlsOutcome};
use crate::policy::{CertificateMatch, Policy, VendorId};

use super::generation::Shared;
use super::registry::{AdmitError, AdmitLimits, SessionInfo};
use super::session::{self, SessionParams};
use super::tls::{self, HandshakeSlot, HandshakeSlots, Rejection};

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
    let handshakes = Arc::new(HandshakeSlots::default());
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, %error, "could not disable Nagle's algorithm");
                }
                let tls = listener_tls(&shared, &name);
                match tls {
                    None => {
                        let connection = Connection::Plain(stream);
                        admit(&name, connection, peer, &shared, &shutdown, &tracker).await;
                    }
                    Some(tls) => {
                        start_handshake(
                            &name,
                            tls,
                            stream,
                            peer,
                            &handshakes,
                            &shared,
                            &shutdown,
                            &tracker,
                        )
                        .await;
                    }
                }
            }
            Err(error) => {
                tracing::warn!(listener = %name, %error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// An accepted connection, after its TLS handshake on a secure listener.
enum Connection {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>, Arc<CertificateIdentity>),
}

/// Returns the TLS settings of the listener `name` in the current generation.
fn listener_tls(shared: &Shared, name: &str) -> Option<Arc<crate::config::ListenerTls>> {
    let generation = shared.current.load();
    let plan = generation
        .policy
        .listeners()
        .iter()
        .find(|plan| &*plan.name == name)?;
    plan.tls.clone().map(Arc::new)
}

/// Takes a handshake slot for a connection to a TLS listener and starts its
/// handshake in a task, so a slow client does not hold up the accept loop.
/// The slot is taken here, in accept order, so the cap per source applies
/// to connections as they arrive. A connection over the cap is rejected at
/// once.
#[allow(clippy::too_many_arguments)]
async fn start_handshake(
    name: &Arc<str>,
    tls: Arc<crate::config::ListenerTls>,
    stream: TcpStream,
    peer: SocketAddr,
    handshakes: &Arc<HandshakeSlots>,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    let limit = tls.max_handshakes_per_source;
    let Some(slot) = handshakes.take(peer.ip(), limit) else {
        let rejection = Rejection {
            reason: format!("handshake limit of {limit} per source reached"),
            kind: "tls_handshake_failed",
            severity: Severity::Medium,
        };
        reject_handshake(shared, name, peer, None, rejection).await;
        return;
    };
    // The handshake runs on a session thread, so that the session it admits
    // runs there as well, on the I/O driver that watches its socket.
    let Some(stream) = detach(stream, name, peer) else {
        return;
    };
    let task = handshake(
        name.clone(),
        tls,
        stream,
        peer,
        slot,
        shared.clone(),
        shutdown.clone(),
        tracker.clone(),
    );
    shared.session_threads.spawn(tracker.track_future(task));
}

/// Runs the TLS handshake of one connection and admits it on success.
/// Every rejection is recorded as a session `reject` event and an anomaly.
#[allow(clippy::too_many_arguments)]
async fn handshake(
    name: Arc<str>,
    tls: Arc<crate::config::ListenerTls>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: HandshakeSlot,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let Some(stream) = attach(stream, &name, peer) else {
        return;
    };
    // A drain does not wait for handshakes: a client still in its
    // handshake has no session to finish.
    let accepted = tokio::select! {
        accepted = tls::accept(&tls, stream) => accepted,
        _ = shutdown.cancelled() => return,
    };
    drop(slot);
    match accepted {
        Ok((stream, identity)) => {
            let connection = Connection::Tls(Box::new(stream), identity);
            admit(&name, connection, peer, &shared, &shutdown, &tracker).await;
        }
        Err(rejection) => {
            tracing::debug!(listener = %name, %peer, reason = %rejection.reason, "TLS handshake rejected");
            reject_handshake(&shared, &name, peer, None, rejection).await;
        }
    }
}

/// Records a rejected handshake or certificate and counts it as a failed
/// handshake.
async fn reject_handshake(
    shared: &Shared,
    name: &Arc<str>,
    peer: SocketAddr,
    identity: Option<&Arc<CertificateIdentity>>,
    rejection: Rejection,
) {
    {
        let generation = shared.current.load();
        if let Some(listener) = generation
            .policy
            .listeners()
            .iter()
            .position(|plan| &plan.name == name)
        {
            generation
                .instruments
                .count_tls_handshake(listener, TlsOutcome::Failure);
        }
    }
    let mut event = reject_event(name, peer, None, &rejection.reason);
    event.tls = identity.cloned();
    emit(shared, event).await;
    let mut anomaly = Event::anomaly(rejection.kind, rejection.severity, rejection.reason);
    anomaly.listener = Some(name.clone());
    anomaly.src_ip = Some(peer.ip());
    anomaly.src_port = Some(peer.port());
    anomaly.tls = identity.cloned();
    emit(shared, anomaly).await;
}

/// Finds the vendor of a TLS client by its certificate, or the rejection
/// to record.
fn identify_certificate(
    policy: &Policy,
    identity: &CertificateIdentity,
    peer: SocketAddr,
) -> Result<VendorId, Rejection> {
    match policy.identify_certificate(identity, peer.ip()) {
        CertificateMatch::Vendor(vendor) => Ok(vendor),
        CertificateMatch::NoVendor => Err(Rejection {
            reason: "no vendor matches certificate".to_owned(),
            kind: "unknown_client",
            severity: Severity::High,
        }),
        CertificateMatch::Ambiguous(first, second) => Err(Rejection {
            reason: format!(
                "certificate matches vendors {} and {}",
                policy.vendor_name(first),
                policy.vendor_name(second)
            ),
            kind: "ambiguous_certificate",
            severity: Severity::High,
        }),
        CertificateMatch::SourceNotAllowed(vendor) => Err(Rejection {
            reason: format!(
                "source address {} outside the sources of vendor {}",
                peer.ip(),
                policy.vendor_name(vendor)
            ),
            kind: "unknown_client",
            severity: Severity::High,
        }),
    }
}

async fn admit(
    name: &Arc<str>,
    connection: Connection,
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

    let certificate = match &connection {
        Connection::Plain(_) => None,
        Connection::Tls(_, identity) => Some(identity.clone()),
    };
    let identified = match &certificate {
        None => policy.identify(peer.ip()),
        Some(identity) => match identify_certificate(policy, identity, peer) {
            Ok(vendor) => Some(vendor),
            Err(rejection) => {
                instruments.count_session_rejected(listener, RejectReason::UnknownSource);
                drop(generation);
                tracing::debug!(listener = %name, %peer, reason = %rejection.reason, "client certificate rejected");
                reject_handshake(shared, name, peer, Some(identity), rejection).await;
                return;
            }
        },
    };
    let Some(vendor) = identified else {
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
    if certificate.is_some() {
        instruments.count_tls_handshake(listener, TlsOutcome::Success);
    }
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
        certificate: certificate.clone(),
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
        role: certificate
            .as_ref()
            .and_then(|identity| identity.role.as_deref())
            .and_then(|role| policy.role_id(role)),
        certificate,
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
    let shared = shared.clone();
    let span = tracing::debug_span!(
        "session",
        id = params.id,
        listener = %name,
        %peer,
        vendor = %params.vendor_name,
    );
    match connection {
        Connection::Plain(stream) => {
            let spawner = shared.clone();
            let Some(stream) = detach(stream, name, peer) else {
                shared.sessions.remove(params.id);
                return;
            };
            let name = name.clone();
            let session = async move {
                let id = params.id;
                if let Some(stream) = attach(stream, &name, peer) {
                    let (reader, writer) = stream.into_split();
                    session::run(reader, writer, params, shared.clone()).await;
                }
                shared.sessions.remove(id);
            };
            let session = tracker.track_future(session.instrument(span));
            spawner.session_threads.spawn(session);
        }
        // The handshake ran on a session thread, and the session stays on it.
        Connection::Tls(stream, _) => {
            tracker.spawn(
                async move {
                    let id = params.id;
                    let (reader, writer) = tokio::io::split(*stream);
                    session::run(reader, writer, params, shared.clone()).await;
                    shared.sessions.remove(id);
                }
                .instrument(span),
            );
        }
    }
}

/// Takes `stream` off the I/O driver of the runtime that accepted it, so
/// that a session thread can register it with its own.
fn detach(stream: TcpStream, listener: &str, peer: SocketAddr) -> Option<std::net::TcpStream> {
    match stream.into_std() {
        Ok(stream) => Some(stream),
        Err(error) => {
            tracing::warn!(listener, %peer, %error, "moving the connection to a session thread failed; connection closed");
            None
        }
    }
}

/// Registers a detached stream with the I/O driver of the calling thread.
fn attach(stream: std::net::TcpStream, listener: &str, peer: SocketAddr) -> Option<TcpStream> {
    match TcpStream::from_std(stream) {
        Ok(stream) => Some(stream),
        Err(error) => {
            tracing::warn!(listener, %peer, %error, "registering the connection on a session thread failed; connection closed");
            None
        }
    }
}

async fn reject(
    shared: &Shared,
    listener: &Arc<str>,
    peer: SocketAddr,
    vendor: Option<Arc<str>>,
    reason: &str,
) {
    emit(shared, reject_event(listener, peer, vendor, reason)).await;
}

fn reject_event(
    listener: &Arc<str>,
    peer: SocketAddr,
    vendor: Option<Arc<str>>,
    reason: &str,
) -> Event {
    let mut event = Event::new(EventType::Session);
    event.action = Some("reject");
    event.listener = Some(listener.clone());
    event.vendor = vendor;
    event.src_ip = Some(peer.ip());
    event.src_port = Some(peer.port());
    event.reason = Some(reason.to_owned());
    event
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
