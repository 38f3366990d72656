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

use crate::admin::privileges::{self, PrivilegeError};
use crate::admin::systemd::{self, Notifier};
use crate::admin::{AdminContext, AdminSocket, Quarantine, ReloadRequest};
use crate::audit::{AuditHealth, AuditLog, AuditSettings};
use crate::collect::Collectors;
use crate::config::{AdminConfig, AuditSync, Diagnostics};
use crate::events::{spawn_writer, Emitter, Event, EventType, Observer, SyncMode};
use crate::metrics::{self, Metrics, Readiness as MetricsReadiness};
use crate::modbus::generation::Shared;
use crate::modbus::listener;
use crate::modbus::session_threads::SessionThreads;
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
    /// The account settings forbid running, or the switch to the
    /// unprivileged account failed.
    #[error("{0}")]
    Privileges(#[from] PrivilegeError),
}

/// The receiver of the addresses `run` bound.
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
    let (service, _) = crate::config::load_service(config_path).map_err(RunError::Config)?;

    // Sockets are bound while the process may still be root, so ports below
    // 1024 work. Every file is opened after the switch to the service account.
    let privileges = privileges::plan(&service)?;
    let bound = bind_sockets(&policy, service.admin.as_ref(), readiness).await?;
    privileges.apply()?;

    let metrics = Metrics::new(env!("CARGO_PKG_VERSION"));
    let health = Arc::new(AuditHealth::new());
    let (emitter, receiver) = Emitter::new(policy.gateway_name().clone());
    let mut log = open_audit_log(&policy, &health)?;
    let collectors = Collectors::open(&policy.audit().collectors)?;
    // Seal records are made inside the audit log, not queued, so they reach
    // the collectors through their own observer.
    let seal_collectors = collectors.clone();
    let seal_metrics = metrics.clone();
    log.set_seal_observer(Box::new(move |seal: &Event| {
        seal_metrics.count_audit_record();
        seal_metrics.count_audit_seal();
        seal_collectors.observe(seal);
    }));
    let sync = match policy.audit().sync {
        AuditSync::Batch => SyncMode::Batch,
        AuditSync::Always => SyncMode::Always,
    };
    let observer = count_events(&metrics, collectors.clone());
    let writer = spawn_writer(receiver, Box::new(log), sync, Some(observer))?;

    let result = serve(
        config_path,
        policy,
        emitter,
        metrics,
        health,
        collectors,
        bound,
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

/// Counts what the metrics take from the event stream, audit records and
/// anomalies by kind, then appends the event to the spools of the
/// collectors that receive it. Seal records do not pass here: the audit
/// log makes them itself and reports them through its seal observer.
fn count_events(metrics: &Arc<Metrics>, collectors: Collectors) -> Observer {
    let metrics = metrics.clone();
    Box::new(move |event: &Event| {
        collectors.observe(event);
        metrics.count_audit_record();
        if let Some(anomaly) = &event.anomaly {
            metrics.count_anomaly(anomaly.kind);
        }
    })
}

// The parts that `run` opens before serving are handed over one by one.
#[allow(clippy::too_many_arguments)]
async fn serve(
    config_path: &Path,
    policy: Policy,
    emitter: Emitter,
    metrics: Arc<Metrics>,
    health: Arc<AuditHealth>,
    collectors: Collectors,
    bound: Bound,
    readiness: &mut dyn Readiness,
    stop: CancellationToken,
) -> Result<(), RunError> {
    let quarantine = Arc::new(Quarantine::load(&policy.audit().path)?);
    for entry in quarantine.list() {
        tracing::warn!(vendor = %entry.vendor, "vendor remains quarantined");
    }
    let mut reloader = reload::Reloader::new(config_path.to_path_buf(), &policy);
    let generation = build_generation(policy, None, &emitter, &metrics);
    let shared = Arc::new(Shared {
        current: ArcSwap::from_pointee(generation),
        emitter: emitter.clone(),
        sessions: Default::default(),
        metrics: metrics.clone(),
        audit: health,
        quarantine: quarantine.clone(),
        detect: crate::detect::Hub::new(),
        opcua_trust: Default::default(),
        session_threads: SessionThreads::start(SessionThreads::default_count())?,
    });
    // Collectors stop last, so that events of the drain can still be
    // delivered; whatever is left waits in the spools for the next start.
    let collectors_stop = CancellationToken::new();
    let collector_tasks = collectors.start(
        &emitter,
        &shared.current.load().instruments,
        &collectors_stop,
    )?;

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let probe = Arc::new(MetricsReadiness::default());
    probe.set_policy_loaded(true);
    if let Some(socket) = bound.metrics {
        tokio::spawn(metrics::serve(
            socket,
            metrics.clone(),
            probe.clone(),
            shutdown.clone(),
        ));
    }
    let mut listener_addresses = spawn_listeners(bound.listeners, &shared, &shutdown, &tracker)?;
    listener_addresses.extend(start_opcua_listeners(bound.opcua, &shared, &shutdown).await?);
    probe.set_listeners_bound(true);
    let mut pollers = Pollers::start(&shared);
    let sampler = tokio::spawn(sample_metrics(shared.clone(), probe, shutdown.clone()));
    // Handlers go in before `ready`, so a SIGHUP sent as soon as the gateway
    // reports ready is a reload and not the default action, which is to exit.
    let mut signals = Signals::install()?;
    // The sender stays alive until the end, so the signal loop never gets a
    // closed channel, with or without a control socket.
    let (reload_sender, mut reload_requests) = tokio::sync::mpsc::channel(1);
    let admin = bound.admin.map(|socket| {
        let context = AdminContext {
            shared: shared.clone(),
            quarantine,
            reload: reload_sender.clone(),
            listeners: listener_addresses,
            started: std::time::Instant::now(),
            started_wall: jiff::Timestamp::now(),
        };
        tokio::spawn(crate::admin::serve(
            socket,
            Arc::new(context),
            shutdown.clone(),
        ))
    });
    record_system(&emitter, "start", config_path).await;
    readiness.ready();
    let notifier = notify_systemd_ready(&shutdown);
    tracing::info!(config = %config_path.display(), "gateway ready");

    wait_for_signals(
        &shared,
        &mut signals,
        &mut reloader,
        &mut pollers,
        &mut reload_requests,
        &stop,
    )
    .await;
    drop(reload_sender);

    tracing::info!("draining sessions");
    if let Some(notifier) = &notifier {
        if let Err(error) = notifier.notify("STOPPING=1") {
            tracing::warn!(%error, "systemd stop notification not sent");
        }
    }
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
            session.close_because("drain deadline passed");
        }
        tracker.wait().await;
    }
    pollers.stop().await;
    let _ = sampler.await;
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    for pool in &shared.current.load().pools {
        pool.shutdown();
    }
    let stopping = shared.clone();
    if tokio::task::spawn_blocking(move || stopping.session_threads.stop())
        .await
        .is_err()
    {
        tracing::error!("stopping the session threads failed");
    }
    record_system(&emitter, "stop", config_path).await;
    collectors_stop.cancel();
    collector_tasks.join().await;
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
    // Reconnects already counted, by device name, because pools and their
    // indexes change with reloads.
    let mut reconnects: std::collections::HashMap<Arc<str>, u64> = Default::default();
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
            let upstream = generation.instruments.upstream(device);
            upstream.set_up(pool.is_up());
            let total = pool.reconnects();
            let counted = reconnects.entry(pool.device().clone()).or_insert(0);
            // A pool built anew by a reload starts again from zero.
            if total < *counted {
                *counted = 0;
            }
            for _ in *counted..total {
                upstream.count_reconnect();
            }
            *counted = total;
        }
        let now = std::time::Instant::now();
        for (index, plan) in generation.policy.states().iter().enumerate() {
            let raw = generation.states.fresh(index, now, plan.max_age);
            generation.instruments.set_state(index, raw);
        }
        for (_, mirror) in generation.mirror.iter() {
            for block in mirror.blocks() {
                block.sample_age(now);
            }
        }
    }
}

/// Every socket the gateway serves on, bound before the switch to the
/// service account.
struct Bound {
    metrics: Option<tokio::net::TcpListener>,
    listeners: Vec<(Arc<str>, tokio::net::TcpListener)>,
    /// OPC UA listeners, by index in `Policy::opcua_listeners`.
    opcua: Vec<(usize, tokio::net::TcpListener)>,
    admin: Option<AdminSocket>,
}

async fn bind_sockets(
    policy: &Policy,
    admin: Option<&AdminConfig>,
    readiness: &mut dyn Readiness,
) -> Result<Bound, RunError> {
    let mut metrics = None;
    if let Some(bind) = policy.metrics_bind() {
        let socket = listener::bind("metrics", bind).await?;
        tracing::info!(address = %socket.local_addr()?, "metrics endpoint listening");
        readiness.listening("metrics", socket.local_addr()?);
        metrics = Some(socket);
    }
    let mut listeners = Vec::new();
    for plan in policy.listeners() {
        let socket = listener::bind(&plan.name, plan.bind).await?;
        let address = socket.local_addr()?;
        tracing::info!(listener = %plan.name, %address, "listening");
        readiness.listening(&plan.name, address);
        listeners.push((plan.name.clone(), socket));
    }
    let mut opcua = Vec::new();
    for (index, plan) in policy.opcua_listeners().iter().enumerate() {
        let socket = listener::bind(&plan.name, plan.bind).await?;
        let address = socket.local_addr()?;
        tracing::info!(listener = %plan.name, %address, "listening");
        readiness.listening(&plan.name, address);
        opcua.push((index, socket));
    }
    let admin = admin.map(crate::admin::bind).transpose()?;
    Ok(Bound {
        metrics,
        listeners,
        opcua,
        admin,
    })
}

/// Starts serving the bound listeners; returns their names and addresses.
fn spawn_listeners(
    sockets: Vec<(Arc<str>, tokio::net::TcpListener)>,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> io::Result<Vec<(Arc<str>, SocketAddr)>> {
    let mut addresses = Vec::new();
    for (name, socket) in sockets {
        addresses.push((name.clone(), socket.local_addr()?));
        tokio::spawn(listener::serve(
            name,
            socket,
            shared.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    Ok(addresses)
}

/// Starts the OPC UA servers on their bound sockets; returns their names and
/// addresses. Listener and device settings of OPC UA listeners apply at
/// start; a reload changes their rules and users only.
async fn start_opcua_listeners(
    sockets: Vec<(usize, tokio::net::TcpListener)>,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) -> io::Result<Vec<(Arc<str>, SocketAddr)>> {
    let mut addresses = Vec::new();
    for (index, socket) in sockets {
        let plan = shared.current.load().policy.opcua_listeners()[index].clone();
        addresses.push((plan.name.clone(), socket.local_addr()?));
        crate::opcua::start(&plan, socket, shared, shutdown)
            .await
            .map_err(io::Error::other)?;
    }
    Ok(addresses)
}

/// Tells systemd the gateway is ready and starts the watchdog keep-alives
/// its unit requests. Returns `None` outside systemd.
fn notify_systemd_ready(shutdown: &CancellationToken) -> Option<Arc<Notifier>> {
    let notifier = match Notifier::from_env() {
        Ok(Some(notifier)) => Arc::new(notifier),
        Ok(None) => return None,
        Err(error) => {
            tracing::warn!(%error, "cannot use NOTIFY_SOCKET");
            return None;
        }
    };
    if let Err(error) = notifier.notify("READY=1") {
        tracing::warn!(%error, "systemd readiness notification not sent");
    }
    if let Some(interval) = systemd::watchdog_interval() {
        tracing::info!(
            interval_ms = interval.as_millis() as u64,
            "sending systemd watchdog keep-alives"
        );
        tokio::spawn(systemd::keep_alive(
            notifier.clone(),
            interval,
            shutdown.clone(),
        ));
    }
    Some(notifier)
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
    reload_requests: &mut tokio::sync::mpsc::Receiver<ReloadRequest>,
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
            Some(request) = reload_requests.recv() => {
                let applied = reloader.reload(shared).await;
                if applied {
                    pollers.restart(shared).await;
                }
                // The control client may have gone away; the reload still took effect.
                let _ = request.reply.send(applied);
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
