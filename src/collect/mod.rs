//! Event streaming to collectors. Each `[[collector]]` gets a disk spool
//! that the event writer thread appends to after the audit log has the event,
//! and a sender task that delivers the oldest spooled events and
//! acknowledges them only once the collector has them. Network I/O to a
//! collector happens only in that task, never on the request path.
//! `server` is the embedded collector of `sluice collect`.

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{CollectorConfig, CollectorEvents, OnFull};
use crate::events::{Emitter, Event, EventType, Severity};
use crate::metrics::{CollectorMetrics, Instruments};

pub mod server;
pub mod spool;
pub mod syslog;
pub mod tls;
pub mod transport;

pub use spool::{Appended, Batch, Spool, SpoolSettings};
pub use transport::{DeliveryError, SpooledEvent, Transport};

/// The anomaly kind raised once per episode of a full spool.
pub const SPOOL_FULL_KIND: &str = "collector_spool_full";
/// Maximum wait between two delivery attempts to an unreachable collector.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Wait after the second failed attempt in a row; it doubles up to
/// `BACKOFF_MAX`. The first retry after a failure is immediate.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);

/// One configured collector: its settings, spool and metric handles.
pub struct Collector {
    config: CollectorConfig,
    spool: Spool,
    metrics: OnceLock<CollectorMetrics>,
    /// True while appends fail, so that a failing disk is logged once.
    append_failing: std::sync::atomic::AtomicBool,
}

impl Collector {
    /// Opens the collector's spool.
    pub fn open(config: CollectorConfig) -> io::Result<Collector> {
        let settings = SpoolSettings {
            folder: config.spool.clone(),
            max_bytes: config.spool_max_bytes,
            on_full: config.on_full,
        };
        let spool = Spool::open(settings).map_err(|error| {
            io::Error::new(
                error.kind(),
                format!(
                    "cannot open the spool of collector \"{}\" in {}: {error}",
                    config.name,
                    config.spool.display()
                ),
            )
        })?;
        Ok(Collector {
            config,
            spool,
            metrics: OnceLock::new(),
            append_failing: Default::default(),
        })
    }

    pub fn config(&self) -> &CollectorConfig {
        &self.config
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Returns true when this collector receives `event`: anomalies and
    /// seal records always, everything with `events = "all"`.
    pub fn wants(&self, event: &Event) -> bool {
        match self.config.events {
            CollectorEvents::All => true,
            CollectorEvents::Anomalies => {
                matches!(event.event_type, EventType::Anomaly | EventType::Seal)
            }
        }
    }

    /// Appends one event's JSON text to the spool and counts what a full
    /// spool dropped.
    fn append(&self, json: &[u8]) {
        use std::sync::atomic::Ordering;
        match self.spool.append(json) {
            Ok(appended) => {
                if self.append_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(collector = %self.config.name, "spool appends recovered");
                }
                if let Some(metrics) = self.metrics.get() {
                    metrics.count_dropped(appended.dropped());
                    metrics.set_spool_events(self.spool.len() as u64);
                }
            }
            Err(error) => {
                if !self.append_failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        collector = %self.config.name,
                        spool = %self.config.spool.display(),
                        %error,
                        "spool append failed; events stay in the audit log only"
                    );
                }
                if let Some(metrics) = self.metrics.get() {
                    metrics.count_dropped(1);
                }
            }
        }
    }
}

/// Every configured collector.
#[derive(Clone, Default)]
pub struct Collectors {
    collectors: Arc<[Arc<Collector>]>,
}

impl Collectors {
    /// Opens the spool of every collector in `configs`.
    pub fn open(configs: &[CollectorConfig]) -> io::Result<Collectors> {
        let collectors = configs
            .iter()
            .map(|config| Collector::open(config.clone()).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Collectors {
            collectors: collectors.into(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.collectors.is_empty()
    }

    pub fn get(&self, index: usize) -> Option<&Arc<Collector>> {
        self.collectors.get(index)
    }

    /// Appends `event` to the spool of every collector that wants it. Called
    /// on the event writer thread after the event is in the audit log; it
    /// only writes to local files.
    pub fn observe(&self, event: &Event) {
        let mut json: Option<Vec<u8>> = None;
        for collector in self.collectors.iter() {
            if !collector.wants(event) {
                continue;
            }
            if json.is_none() {
                // A decision event of a Modbus read takes about 400 bytes.
                let mut text = Vec::with_capacity(512);
                match event.write_json(&mut text) {
                    Ok(()) => json = Some(text),
                    Err(error) => {
                        tracing::error!(id = %event.id, %error, "event not serialized for collectors");
                        return;
                    }
                }
            }
            if let Some(json) = &json {
                collector.append(json);
            }
        }
    }

    /// Starts a sender task and a full-spool reporter per collector. Metric
    /// handles come from `instruments`, by the collector's index.
    pub fn start(
        &self,
        emitter: &Emitter,
        instruments: &Instruments,
        stop: &CancellationToken,
    ) -> io::Result<CollectorTasks> {
        let mut tasks = Vec::new();
        for (index, collector) in self.collectors.iter().enumerate() {
            let metrics = instruments.collector(index);
            metrics.set_spool_events(collector.spool.len() as u64);
            let _ = collector.metrics.set(metrics);
            let transport = Transport::new(&collector.config).map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("collector \"{}\": {error}", collector.config.name),
                )
            })?;
            tasks.push(tokio::spawn(send(
                collector.clone(),
                transport,
                stop.clone(),
            )));
            tasks.push(tokio::spawn(report_full(
                collector.clone(),
                emitter.clone(),
                stop.clone(),
            )));
        }
        Ok(CollectorTasks { tasks })
    }
}

/// The running collector tasks.
pub struct CollectorTasks {
    tasks: Vec<JoinHandle<()>>,
}

impl CollectorTasks {
    /// Waits for every task to end; cancel their token first.
    pub async fn join(self) {
        for task in self.tasks {
            if let Err(error) = task.await {
                tracing::error!(%error, "collector task failed");
            }
        }
    }
}

/// Returns the wait before the next attempt after `failures` failed ones
/// in a row.
pub fn backoff(failures: u32) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => BACKOFF_FIRST
            .saturating_mul(1u32 << (n - 2).min(16))
            .min(BACKOFF_MAX),
    }
}

/// Parses spooled lines; a line that is not a JSON object is skipped,
/// because a collector would reject the whole batch for it.
pub fn parse_batch(batch: &Batch, collector: &str) -> Vec<SpooledEvent> {
    let mut events = Vec::with_capacity(batch.lines.len());
    for line in &batch.lines {
        match serde_json::from_slice::<serde_json::Value>(line) {
            Ok(value) if value.is_object() => events.push(SpooledEvent {
                json: line.clone(),
                value,
            }),
            _ => tracing::warn!(
                collector,
                bytes = line.len(),
                "skipped a spool line that is not a JSON event"
            ),
        }
    }
    events
}

/// Runs `work` on the blocking pool, since spool reads and fsyncs are file
/// I/O.
async fn blocking<T: Send + 'static>(
    collector: &Arc<Collector>,
    work: impl FnOnce(&Collector) -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let collector = collector.clone();
    tokio::task::spawn_blocking(move || work(&collector))
        .await
        .map_err(io::Error::other)?
}

/// Delivers the spool, oldest first, until `stop` is cancelled.
async fn send(collector: Arc<Collector>, mut transport: Transport, stop: CancellationToken) {
    let name = collector.config.name.clone();
    let batch_max = collector.config.batch_max;
    let mut failures: u32 = 0;
    loop {
        if collector.spool.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = collector.spool.appended() => continue,
            }
        }
        let read = blocking(&collector, move |c| {
            c.spool.sync()?;
            c.spool.read_batch(batch_max)
        })
        .await;
        let batch = match read {
            Ok(batch) => batch,
            Err(error) => {
                tracing::error!(collector = %name, %error, "reading the spool failed");
                failures += 1;
                if wait(&stop, backoff(failures).max(BACKOFF_FIRST)).await {
                    break;
                }
                continue;
            }
        };
        let events = parse_batch(&batch, &name);
        let delivered = if events.is_empty() {
            Ok(())
        } else {
            tokio::select! {
                _ = stop.cancelled() => break,
                delivered = transport.deliver(&events) => delivered,
            }
        };
        match delivered {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(collector = %name, attempts = failures + 1, "collector reachable again");
                }
                failures = 0;
                acknowledge(&collector, batch, events.len()).await;
            }
            Err(error) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(collector = %name, %error, waiting = collector.spool.len(), "delivery failed; events wait in the spool");
                } else {
                    tracing::debug!(collector = %name, %error, attempt = failures, "delivery failed again");
                }
                transport.close().await;
                if wait(&stop, backoff(failures)).await {
                    break;
                }
            }
        }
    }
    transport.close().await;
    if let Err(error) = blocking(&collector, |c| {
        c.spool.sync().and_then(|_| c.spool.persist())
    })
    .await
    {
        tracing::error!(collector = %name, %error, "closing the spool failed");
    }
}

async fn acknowledge(collector: &Arc<Collector>, batch: Batch, valid: usize) {
    let skipped = batch.lines.len() - valid;
    let acknowledged = blocking(collector, move |c| c.spool.acknowledge(&batch)).await;
    let Some(metrics) = collector.metrics.get() else {
        return;
    };
    match acknowledged {
        Ok(count) => {
            let skipped = skipped as u64;
            metrics.count_delivered(count.saturating_sub(skipped));
            metrics.count_dropped(skipped.min(count));
            metrics.set_spool_events(collector.spool.len() as u64);
        }
        Err(error) => {
            tracing::error!(collector = %collector.config.name, %error, "recording the acknowledged offset failed; events may be sent again");
        }
    }
}

/// Sleeps for `delay` unless `stop` is cancelled first; returns true when
/// it was.
async fn wait(stop: &CancellationToken, delay: Duration) -> bool {
    if delay.is_zero() {
        return stop.is_cancelled();
    }
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}

/// Raises a `collector_spool_full` anomaly at the start of every full
/// episode.
async fn report_full(collector: Arc<Collector>, emitter: Emitter, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = collector.spool.became_full() => {}
        }
        let config = &collector.config;
        let (on_full, consequence) = match config.on_full {
            OnFull::DropOldest => ("drop_oldest", "the oldest unsent events are dropped"),
            OnFull::KeepInAudit => ("keep_in_audit", "new events stay in the audit log only"),
        };
        tracing::warn!(collector = %config.name, on_full, "collector spool full");
        let mut event = Event::anomaly(
            SPOOL_FULL_KIND,
            Severity::High,
            format!(
                "spool of collector \"{}\" reached {} bytes; {consequence}",
                config.name, config.spool_max_bytes
            ),
        );
        event.detail = Some(serde_json::json!({
            "collector": config.name,
            "on_full": on_full,
            "spool_max_bytes": config.spool_max_bytes,
        }));
        if let Err(error) = emitter.emit(event).await {
            tracing::error!(%error, "event not recorded");
            return;
        }
    }
}
