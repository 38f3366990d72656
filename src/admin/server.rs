//! The control socket server: binds the Unix socket with mode 0660 and the
//! configured group, reads one JSON request per line and sends one JSON
//! response line for each. Every action that changes the gateway is recorded as an
//! `admin` event naming the local user from the socket's peer credentials.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::codec::{Framed, LinesCodec};
use tokio_util::sync::CancellationToken;

use crate::config::AdminConfig;
use crate::events::{Event, EventType};
use crate::modbus::generation::Shared;

use super::privileges::user_name;
use super::protocol::{
    ActionReport, DeviceStatus, ListenerStatus, QuarantineStatus, Request, Response, SessionStatus,
    StateStatus, StatusReport, MAX_REQUEST_BYTES,
};
use crate::policy::quarantine::Quarantine;

/// Maximum control connections served at once; more get an error response.
const MAX_CLIENTS: usize = 8;
/// A control connection without a request for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Maximum wait for the daemon to finish a reload requested here.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How often quarantines with an end are checked for expiry.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);
/// Mode of the socket file: owner and group may connect.
const SOCKET_MODE: u32 = 0o660;

/// A request to reload the configuration. The reply is true when the new
/// configuration is in place and false when it had errors and was not applied.
#[derive(Debug)]
pub struct ReloadRequest {
    pub reply: oneshot::Sender<bool>,
}

/// The bound control socket; the socket file is removed when it is dropped.
#[derive(Debug)]
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl AdminSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        // After a privilege drop the folder may no longer be writable, so a
        // stale file can remain; the next start replaces it.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the control socket of `config`. A stale socket file left by a
/// crash is replaced; a socket that a running gateway answers on is not.
pub fn bind(config: &AdminConfig) -> io::Result<AdminSocket> {
    let path = &config.socket;
    remove_stale_socket(path)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let listener = UnixListener::bind(path).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("cannot bind the control socket {}: {error}", path.display()),
        )
    })?;
    let socket = AdminSocket {
        listener,
        path: path.clone(),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    if let Some(group) = &config.group {
        let gid = nix::unistd::Group::from_name(group)
            .map_err(io::Error::from)?
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "admin.group: group \"{group}\" not found; create it or remove the key"
                    ),
                )
            })?
            .gid;
        std::os::unix::fs::chown(path, None, Some(gid.as_raw())).map_err(|error| {
            io::Error::new(
                error.kind(),
                format!(
                    "cannot give the control socket {} to group \"{group}\": {error}",
                    path.display()
                ),
            )
        })?;
    }
    Ok(socket)
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    if !metadata.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; remove it or choose another admin.socket",
                path.display()
            ),
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another gateway serves the control socket {}",
                path.display()
            ),
        ));
    }
    std::fs::remove_file(path)
}

/// The gateway state that the control server reads and changes.
pub struct AdminContext {
    pub shared: Arc<Shared>,
    pub quarantine: Arc<Quarantine>,
    pub reload: mpsc::Sender<ReloadRequest>,
    /// Listener names and the addresses they are bound to.
    pub listeners: Vec<(Arc<str>, SocketAddr)>,
    pub started: Instant,
    pub started_wall: jiff::Timestamp,
}

/// Serves control connections until `shutdown` is cancelled, and releases
/// quarantines whose time has ended.
pub async fn serve(socket: AdminSocket, context: Arc<AdminContext>, shutdown: CancellationToken) {
    tracing::info!(socket = %socket.path.display(), "control socket listening");
    let expiry = tokio::spawn(expire_quarantines(context.clone(), shutdown.clone()));
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = socket.listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(reject_busy(stream));
            continue;
        };
        let context = context.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            serve_connection(stream, &context, &shutdown).await;
            drop(slot);
        });
    }
    let _ = expiry.await;
}

async fn reject_busy(stream: UnixStream) {
    let mut framed = Framed::new(stream, LinesCodec::new_with_max_length(MAX_REQUEST_BYTES));
    let busy = Response::failure(format!(
        "control socket busy: {MAX_CLIENTS} connections open; try again"
    ));
    let _ = framed.send(encode(&busy)).await;
}

/// The local user behind a control connection.
#[derive(Debug, Clone)]
struct Actor {
    uid: u32,
    user: Option<String>,
    pid: Option<i32>,
}

impl Actor {
    fn detail(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut detail = serde_json::Map::new();
        detail.insert("uid".into(), self.uid.into());
        if let Some(user) = &self.user {
            detail.insert("user".into(), user.clone().into());
        }
        if let Some(pid) = self.pid {
            detail.insert("pid".into(), pid.into());
        }
        detail
    }
}

async fn serve_connection(
    stream: UnixStream,
    context: &AdminContext,
    shutdown: &CancellationToken,
) {
    let credentials = match stream.peer_cred() {
        Ok(credentials) => credentials,
        Err(error) => {
            tracing::warn!(%error, "control connection without peer credentials closed");
            return;
        }
    };
    let uid = credentials.uid();
    let user = tokio::task::spawn_blocking(move || user_name(uid))
        .await
        .ok()
        .flatten();
    let actor = Actor {
        uid,
        user,
        pid: credentials.pid(),
    };

    let mut framed = Framed::new(stream, LinesCodec::new_with_max_length(MAX_REQUEST_BYTES));
    loop {
        let line = tokio::select! {
            _ = shutdown.cancelled() => return,
            line = tokio::time::timeout(IDLE_TIMEOUT, framed.next()) => line,
        };
        let response = match line {
            Err(_) | Ok(None) => return,
            Ok(Some(Err(error))) => {
                let response = Response::failure(format!("invalid request line: {error}"));
                let _ = framed.send(encode(&response)).await;
                return;
            }
            Ok(Some(Ok(line))) => match serde_json::from_str::<Request>(&line) {
                Ok(request) => handle(request, context, &actor).await,
                Err(error) => Response::failure(format!("invalid request: {error}")),
            },
        };
        if framed.send(encode(&response)).await.is_err() {
            return;
        }
    }
}

fn encode(response: &Response) -> String {
    serde_json::to_string(response)
        .unwrap_or_else(|_| r#"{"ok":false,"error":"cannot encode the response"}"#.to_owned())
}

async fn handle(request: Request, context: &AdminContext, actor: &Actor) -> Response {
    match request {
        Request::Status => Response::success(status(context)),
        Request::Sessions => Response::success(sessions(context)),
        Request::State => Response::success(states(context)),
        Request::Kill { session } => kill(context, actor, session).await,
        Request::Quarantine { vendor, duration_s } => {
            quarantine(context, actor, &vendor, duration_s).await
        }
        Request::Release { vendor } => release(context, actor, &vendor).await,
        Request::Reload => reload(context, actor).await,
    }
}

fn status(context: &AdminContext) -> StatusReport {
    let generation = context.shared.current.load();
    let policy = &generation.policy;
    let devices = policy
        .devices()
        .iter()
        .zip(generation.pools.iter())
        .map(|(device, pool)| DeviceStatus {
            name: device.name.to_string(),
            address: device.address.to_string(),
            up: pool.is_up(),
        })
        .collect();
    StatusReport {
        gateway: policy.gateway_name().to_string(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started: context.started_wall.to_string(),
        uptime_s: context.started.elapsed().as_secs(),
        listeners: context
            .listeners
            .iter()
            .map(|(name, address)| ListenerStatus {
                name: name.to_string(),
                address: address.to_string(),
            })
            .collect(),
        devices,
        sessions: context.shared.sessions.len(),
        audit_writable: context.shared.audit.is_writable(),
        quarantined: context
            .quarantine
            .list()
            .into_iter()
            .map(|entry| QuarantineStatus {
                vendor: entry.vendor.to_string(),
                since: entry.since.to_string(),
                until: entry.until_wall.map(|until| until.to_string()),
            })
            .collect(),
    }
}

fn sessions(context: &AdminContext) -> Vec<SessionStatus> {
    context
        .shared
        .sessions
        .list()
        .into_iter()
        .map(|session| SessionStatus {
            id: session.id,
            listener: session.listener.to_string(),
            vendor: session.vendor.to_string(),
            source: session.peer.to_string(),
            started: session.started.to_string(),
            requests: session.requests.load(std::sync::atomic::Ordering::Relaxed),
        })
        .collect()
}

fn states(context: &AdminContext) -> Vec<StateStatus> {
    let generation = context.shared.current.load();
    let policy = &generation.policy;
    let now = Instant::now();
    policy
        .states()
        .iter()
        .enumerate()
        .map(|(index, plan)| {
            let reading = generation.states.reading(index);
            StateStatus {
                name: plan.name.to_string(),
                device: generation.device_name(plan.device).to_string(),
                value: policy
                    .state_value(&generation.states, index, now)
                    .map(ToString::to_string),
                raw: reading.map(|reading| reading.raw),
                age_ms: reading
                    .map(|reading| now.saturating_duration_since(reading.at).as_millis() as u64),
            }
        })
        .collect()
}

async fn kill(context: &AdminContext, actor: &Actor, id: u64) -> Response {
    let Some(session) = context
        .shared
        .sessions
        .list()
        .into_iter()
        .find(|session| session.id == id)
    else {
        return Response::failure(format!(
            "no open session {id}; list them with `sluice ctl sessions`"
        ));
    };
    session.close_because("closed by an operator");
    tracing::info!(session = id, vendor = %session.vendor, uid = actor.uid, "session closed by control command");

    let mut event = Event::new(EventType::Admin);
    event.action = Some("kill");
    event.session_id = Some(id);
    event.listener = Some(session.listener.clone());
    event.vendor = Some(session.vendor.clone());
    event.src_ip = Some(session.peer.ip());
    event.src_port = Some(session.peer.port());
    event.detail = Some(actor.detail().into());
    record(context, event).await;
    Response::success(ActionReport {
        action: "kill".into(),
        vendor: Some(session.vendor.to_string()),
        session: Some(id),
        until: None,
        closed_sessions: vec![id],
    })
}

async fn quarantine(
    context: &AdminContext,
    actor: &Actor,
    vendor: &str,
    duration_s: Option<u64>,
) -> Response {
    let known = context
        .shared
        .current
        .load()
        .policy
        .vendor_id(vendor)
        .is_some();
    if !known {
        return Response::failure(unknown_vendor(context, vendor));
    }
    let until =
        match duration_s.map(|seconds| Instant::now().checked_add(Duration::from_secs(seconds))) {
            Some(None) => {
                return Response::failure(format!(
                    "quarantine duration {} s is too long",
                    duration_s.unwrap_or_default()
                ))
            }
            Some(Some(until)) => Some(until),
            None => None,
        };
    let stored = {
        let quarantine = context.quarantine.clone();
        let vendor = vendor.to_owned();
        tokio::task::spawn_blocking(move || quarantine.quarantine(&vendor, until))
            .await
            .unwrap_or_else(|error| Err(io::Error::other(error)))
    };
    let closed = close_vendor_sessions(context, vendor);
    let until_wall = context
        .quarantine
        .list()
        .into_iter()
        .find(|entry| &*entry.vendor == vendor)
        .and_then(|entry| entry.until_wall)
        .map(|until| until.to_string());
    tracing::info!(vendor, until = ?until_wall, closed = closed.len(), uid = actor.uid, "vendor quarantined");

    let mut detail = actor.detail();
    if let Some(until) = &until_wall {
        detail.insert("until".into(), until.clone().into());
    }
    detail.insert("closed_sessions".into(), closed.clone().into());
    let mut event = Event::new(EventType::Admin);
    event.action = Some("quarantine");
    event.vendor = Some(Arc::from(vendor));
    event.detail = Some(detail.into());
    record(context, event).await;

    if let Err(error) = stored {
        tracing::error!(%error, vendor, "quarantine not stored; it ends at the next restart");
        return Response::failure(format!(
            "vendor {vendor} is quarantined but the quarantine file could not be written, so it ends at the next restart: {error}"
        ));
    }
    Response::success(ActionReport {
        action: "quarantine".into(),
        vendor: Some(vendor.to_owned()),
        session: None,
        until: until_wall,
        closed_sessions: closed,
    })
}

fn unknown_vendor(context: &AdminContext, vendor: &str) -> String {
    let generation = context.shared.current.load();
    let names: Vec<&str> = generation
        .policy
        .vendors()
        .iter()
        .map(|plan| &*plan.name)
        .collect();
    format!(
        "unknown vendor \"{vendor}\"; configured vendors: {}",
        names.join(", ")
    )
}

/// Closes every open session of `vendor` and returns their ids.
fn close_vendor_sessions(context: &AdminContext, vendor: &str) -> Vec<u64> {
    let mut closed = Vec::new();
    for session in context.shared.sessions.list() {
        if &*session.vendor == vendor {
            session.close_because("vendor quarantined");
            closed.push(session.id);
        }
    }
    closed
}

async fn release(context: &AdminContext, actor: &Actor, vendor: &str) -> Response {
    let released = {
        let quarantine = context.quarantine.clone();
        let vendor = vendor.to_owned();
        tokio::task::spawn_blocking(move || quarantine.release(&vendor))
            .await
            .unwrap_or_else(|error| Err(io::Error::other(error)))
    };
    match released {
        Ok(false) => Response::failure(format!("vendor \"{vendor}\" is not quarantined")),
        Ok(true) => {
            tracing::info!(vendor, uid = actor.uid, "vendor released from quarantine");
            record_release(context, vendor, actor.detail()).await;
            Response::success(ActionReport {
                action: "release".into(),
                vendor: Some(vendor.to_owned()),
                session: None,
                until: None,
                closed_sessions: Vec::new(),
            })
        }
        Err(error) => {
            tracing::error!(%error, vendor, "release not stored");
            record_release(context, vendor, actor.detail()).await;
            Response::failure(format!(
                "vendor {vendor} is released but the quarantine file could not be written, so the quarantine returns at the next restart: {error}"
            ))
        }
    }
}

async fn record_release(
    context: &AdminContext,
    vendor: &str,
    detail: serde_json::Map<String, serde_json::Value>,
) {
    let mut event = Event::new(EventType::Admin);
    event.action = Some("release");
    event.vendor = Some(Arc::from(vendor));
    event.detail = Some(detail.into());
    record(context, event).await;
}

async fn reload(context: &AdminContext, actor: &Actor) -> Response {
    let (reply, applied) = oneshot::channel();
    if context.reload.send(ReloadRequest { reply }).await.is_err() {
        return Response::failure("the gateway is shutting down; reload not started");
    }
    let applied = match tokio::time::timeout(RELOAD_TIMEOUT, applied).await {
        Ok(Ok(applied)) => applied,
        Ok(Err(_)) => return Response::failure("the gateway stopped before the reload finished"),
        Err(_) => {
            return Response::failure(format!(
                "reload did not finish within {} s",
                RELOAD_TIMEOUT.as_secs()
            ))
        }
    };

    let mut detail = actor.detail();
    detail.insert("applied".into(), applied.into());
    let mut event = Event::new(EventType::Admin);
    event.action = Some("reload");
    event.detail = Some(detail.into());
    record(context, event).await;
    if applied {
        Response::success(ActionReport {
            action: "reload".into(),
            vendor: None,
            session: None,
            until: None,
            closed_sessions: Vec::new(),
        })
    } else {
        Response::failure(
            "reload failed: the configuration has errors, so the running configuration was kept; `sluice check` lists them",
        )
    }
}

/// Releases quarantines whose time has ended and records each release.
async fn expire_quarantines(context: Arc<AdminContext>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(EXPIRY_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let quarantine = context.quarantine.clone();
        let expired = tokio::task::spawn_blocking(move || quarantine.expire(Instant::now())).await;
        let expired = match expired {
            Ok(Ok(expired)) => expired,
            Ok(Err(error)) => {
                tracing::error!(%error, "ended quarantine not stored");
                continue;
            }
            Err(_) => continue,
        };
        for vendor in expired {
            tracing::info!(vendor = %vendor, "quarantine ended");
            let mut detail = serde_json::Map::new();
            detail.insert("expired".into(), true.into());
            record_release(&context, &vendor, detail).await;
        }
    }
}

async fn record(context: &AdminContext, event: Event) {
    if let Err(error) = context.shared.emitter.emit(event).await {
        tracing::error!(%error, "admin event not recorded");
    }
}
