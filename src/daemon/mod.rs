//! The running gateway: loads the policy, starts the event writer, binds the
//! listeners, starts the state pollers, and handles SIGHUP (reload) and
//! SIGTERM or SIGINT (drain, then exit).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{AuditHealth, AuditLog, AuditSettings};
use crate::config::{AuditSync, Diagnostics};
use crate::events::{spawn_writer, Emitter, Event, EventType, Observer, SyncMode};
use crate::metrics::{self, Metrics, Readiness as MetricsReadiness};
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

    let metrics = Metrics::new(env!("CARGO_PKG_VERSION"));
    let health = Arc::new(AuditHealth::new());
    let (emitter, receiver) = Emitter::new(policy.gateway_name().clone());
    let log = open_audit_log(&policy, &health)?;
    let sync = match policy.audit().sync {
        AuditSync::Batch => SyncMode::Batch,
        AuditSync::Always => SyncMode::Always,
    };
    let writer = spawn_writer(receiver, Box::new(log), sync, Some(count_events(&metrics)))?;

    let result = serve(
        config_path,
        policy,
        emitter,
        metrics,
        health,
        readiness,
        stop,
    )
    .await;
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(io::Error::other)?;
    result
}

fn open_audit_log(policy: &Policy, health: &Arc<AuditHealth>) -> io::Result<AuditLog> {
    let plan = policy.audit();
    let settings = AuditSettings {
        path: plan.path.clone(),
        gateway: policy.gateway_name().clone(),
        seal_every: plan.seal_every,
        seal_interval: plan.seal_interval,
        segment_bytes: plan.segment_bytes,
        retention_days: plan.retention_days,
    };
    let (log, report) = AuditLog::open(settings, health.clone()).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!(
                "cannot open the audit log in {}: {error}",
                plan.path.display()
            ),
        )
    })?;
    if !report.sealed {
        tracing::warn!(
            path = %plan.path.display(),
            "audit log has no sealing key: records are chained but not sealed; run `sluice audit init`"
        );
    }
    if report.torn_bytes > 0 {
        tracing::warn!(
            bytes = report.torn_bytes,
            segment = ?report.torn_segment,
            "removed an incomplete last audit record left by a crash"
        );
    }
    for warning in &report.warnings {
        tracing::warn!("{warning}");
    }
    for removed in &report.removed_segments {
        tracing::info!(segment = %removed.display(), "removed audit segment past retention");
    }
    Ok(log)
}

/// Counts what the metrics take from the event stream: anomalies by kind,
/// device reconnects and audit records.
fn count_events(metrics: &Arc<Metrics>) -> Observer {
    let metrics = metrics.clone();
    Box::new(move |event: &Event| {
        metrics.count_audit_record();
        if event.event_type == EventType::Seal {
            metrics.count_audit_seal();
        }
        if let Some(anomaly) = &event.anomaly {
            metrics.count_anomaly(anomaly.kind);
        }
    })
}

async fn serve(
    config_path: &Path,
    policy: Policy,
    emitter: Emitter,
    metrics: Arc<Metrics>,
    health: Arc<AuditHealth>,
    readiness: &mut dyn Readiness,
    stop: CancellationToken,
) -> Result<(), RunError> {
    let metrics_bind = policy.metrics_bind();
    let generation = build_generation(policy, None, &emitter, &metrics);
    let shared = Arc::new(Shared {
        current: ArcSwap::from_pointee(generation),
        emitter: emitter.clone(),
        sessions: Default::default(),
        metrics: metrics.clone(),
        audit: health,
    });

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let probe = Arc::new(MetricsReadiness::default());
    probe.set_policy_loaded(true);
    if let Some(bind) = metrics_bind {
        let socket = listener::bind("metrics", bind).await?;
        tracing::info!(address = %socket.local_addr()?, "metrics endpoint listening");
        readiness.listening("metrics", socket.local_addr()?);
        tokio::spawn(metrics::serve(
            socket,
            metrics.clone(),
            probe.clone(),
            shutdown.clone(),
        ));
    }
    bind_listeners(&shared, &shutdown, &tracker, readiness).await?;
    probe.set_listeners_bound(true);
    let mut pollers = Pollers::start(&shared);
    let sampler = tokio::spawn(sample_metrics(shared.clone(), probe, shutdown.clone()));
    // Handlers go in before `ready`, so a SIGHUP sent as soon as the gateway
    // reports ready is a reload and not the default action, which is to exit.
    let mut signals = Signals::install()?;
    record_system(&emitter, "start", config_path).await;
    readiness.ready();
    tracing::info!(config = %config_path.display(), "gateway ready");

    let mut reloader = reload::Reloader::new(config_path.to_path_buf(), &shared);
    wait_for_signals(&shared, &mut signals, &mut reloader, &mut pollers, &stop).await;

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
    let _ = sampler.await;
    for pool in &shared.current.load().pools {
        pool.shutdown();
    }
    record_system(&emitter, "stop", config_path).await;
    Ok(())
}

/// How often gauges that have no event of their own are refreshed.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Copies values that are cheaper to sample than to count on the request
/// path into the metrics: audit health, queue depth, device reachability and
/// state readings.
async fn sample_metrics(
    shared: Arc<Shared>,
    probe: Arc<MetricsReadiness>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(SAMPLE_INTERVAL);
    let mut write_errors = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let writable = shared.audit.is_writable();
        shared.metrics.set_audit_writable(writable);
        probe.set_audit_writable(writable);
        let errors = shared.audit.write_errors();
        for _ in write_errors..errors {
            shared.metrics.count_audit_write_error();
        }
        write_errors = errors;
        shared
            .metrics
            .set_events_queue_depth(shared.emitter.queue_depth());

        let generation = shared.current.load();
        for (device, pool) in generation.pools.iter().enumerate() {
            generation.instruments.upstream(device).set_up(pool.is_up());
        }
        let now = std::time::Instant::now();
        for (index, plan) in generation.policy.states().iter().enumerate() {
            let raw = generation.states.fresh(index, now, plan.max_age);
            generation.instruments.set_state(index, raw);
        }
    }
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

struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    fn install() -> io::Result<Signals> {
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}

async fn wait_for_signals(
    shared: &Arc<Shared>,
    signals: &mut Signals,
    reloader: &mut reload::Reloader,
    pollers: &mut Pollers,
    stop: &CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = signals.terminate.recv() => return,
            _ = signals.interrupt.recv() => return,
            _ = signals.hangup.recv() => {
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
