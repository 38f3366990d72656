//! The running gateway: loads the policy, starts the event writer, binds the
//! listeners, starts the state pollers, and handles SIGHUP (reload) and
//! SIGTERM or SIGINT (drain, then exit).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Diagnostics;
use crate::events::{spawn_writer, Emitter, Event, EventType, JsonLinesFile, SyncMode};
use crate::modbus::generation::Shared;
use crate::modbus::listener;
use crate::policy::Policy;
use crate::state::Pollers;

mod build;
mod reload;

pub use build::build_generation;

/// How long a drain waits for requests in flight before closing sessions.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration")]
    Config(Diagnostics),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Where `run` reports the addresses it bound.
pub trait Readiness: Send {
    fn listening(&mut self, name: &str, address: SocketAddr);
    fn ready(&mut self);
}

/// Prints `listening NAME ADDRESS` per listener and `ready` to standard
/// output, so scripts and tests can find ports chosen by the system.
pub struct PrintReadiness;

impl Readiness for PrintReadiness {
    fn listening(&mut self, name: &str, address: SocketAddr) {
        println!("listening {name} {address}");
    }

    fn ready(&mut self) {
        println!("ready");
    }
}

/// Runs the gateway described by `config_path` until `stop` is cancelled or
/// a termination signal arrives.
pub async fn run(
    config_path: &Path,
    readiness: &mut dyn Readiness,
    stop: CancellationToken,
) -> Result<(), RunError> {
    let (policy, warnings) = Policy::load(config_path).map_err(RunError::Config)?;
    for warning in &warnings {
        tracing::warn!("{warning}");
    }

    let audit = policy.audit().clone();
    let (emitter, receiver) = Emitter::new(policy.gateway_name().clone());
    let sink = JsonLinesFile::open(&audit.path).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("cannot open event log in {}: {error}", audit.path.display()),
        )
    })?;
    let sync = match audit.sync {
        crate::policy::AuditSync::Batch => SyncMode::Batch,
        crate::policy::AuditSync::Always => SyncMode::Always,
    };
    let writer = spawn_writer(receiver, Box::new(sink), sync)?;

    let result = serve(config_path, policy, emitter, readiness, stop).await;
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(io::Error::other)?;
    result
}

async fn serve(
    config_path: &Path,
    policy: Policy,
    emitter: Emitter,
    readiness: &mut dyn Readiness,
    stop: CancellationToken,
) -> Result<(), RunError> {
    let generation = build_generation(policy, None, &emitter);
    let shared = Arc::new(Shared {
        current: ArcSwap::from_pointee(generation),
        emitter: emitter.clone(),
        sessions: Default::default(),
    });

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    bind_listeners(&shared, &shutdown, &tracker, readiness).await?;
    let mut pollers = Pollers::start(&shared);
    record_system(&emitter, "start", config_path).await;
    readiness.ready();
    tracing::info!(config = %config_path.display(), "gateway ready");

    let mut reloader = reload::Reloader::new(config_path.to_path_buf(), &shared);
    wait_for_signals(&shared, &mut reloader, &mut pollers, &stop).await?;

    tracing::info!("draining sessions");
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(DRAIN_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            deadline_s = DRAIN_DEADLINE.as_secs(),
            "drain deadline passed, closing remaining sessions"
        );
        for session in shared.sessions.list() {
            session.close.cancel();
        }
        tracker.wait().await;
    }
    pollers.stop().await;
    for pool in &shared.current.load().pools {
        pool.shutdown();
    }
    record_system(&emitter, "stop", config_path).await;
    Ok(())
}

async fn bind_listeners(
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
    readiness: &mut dyn Readiness,
) -> Result<(), RunError> {
    let generation = shared.current.load_full();
    let mut sockets = Vec::new();
    for plan in generation.policy.listeners() {
        let socket = listener::bind(&plan.name, plan.bind).await?;
        let address = socket.local_addr()?;
        tracing::info!(listener = %plan.name, %address, "listening");
        readiness.listening(&plan.name, address);
        sockets.push((plan.name.clone(), socket));
    }
    for (name, socket) in sockets {
        tokio::spawn(listener::serve(
            name,
            socket,
            shared.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    Ok(())
}

async fn wait_for_signals(
    shared: &Arc<Shared>,
    reloader: &mut reload::Reloader,
    pollers: &mut Pollers,
    stop: &CancellationToken,
) -> io::Result<()> {
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
            _ = hangup.recv() => {
                if reloader.reload(shared).await {
                    pollers.restart(shared).await;
                }
            }
        }
    }
}

async fn record_system(emitter: &Emitter, action: &'static str, config_path: &Path) {
    let mut event = Event::new(EventType::System);
    event.action = Some(action);
    event.detail = Some(serde_json::json!({
        "config": config_path.display().to_string(),
        "version": env!("CARGO_PKG_VERSION"),
    }));
    if let Err(error) = emitter.emit(event).await {
        tracing::error!(%error, "event not recorded");
    }
}

/// Resolves the configuration path the way every subcommand does.
pub fn config_path(path: Option<PathBuf>) -> PathBuf {
    path.unwrap_or_else(|| PathBuf::from("/etc/sluice/gateway.toml"))
}
