//! The upstream side of forwarding: one `Pool` per PLC device, which owns up
//! to `max_connections` TCP connections, assigns its own transaction ids,
//! enforces the response deadline and checks each response against its
//! request. Policy and client sessions live elsewhere, and the pool sends a PLC
//! only the requests it is given, plus the TCP connects that carry them.
//!
//! Each connection is one task that owns its socket. Callers hand it a job
//! and a oneshot through a bounded channel. The task writes every request it
//! may send in one system call, decodes every response that one read brings,
//! and keeps a single timer set to the earliest deadline. With one request in
//! flight per connection, an idle task parks its plain connection so that
//! the next caller exchanges its request on it directly (see `direct`).

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::Instrument;

use super::frame::{self, FrameError, Header, RawResponse, ResponseError};
use super::pdu::{ExceptionCode, Request};
use super::upstream_io::{TlsWriter, UpstreamWriter};
use crate::events::{Emitter, Event, EventType, ModbusInfo, Severity};
use direct::Lending;

mod direct;

/// Delay after the first failed connect attempt. It doubles with each
/// further failure up to `backoff_max`.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// Largest `max_in_flight` the pool accepts. Transaction ids are 16 bits and
/// matching a response scans the outstanding requests, so a connection
/// keeps far fewer than 65536 of them.
pub const MAX_IN_FLIGHT: usize = 256;

/// Free space ensured in the read buffer before each read, in bytes. One
/// maximal Modbus/TCP frame is 260 bytes, so one read can bring many.
const READ_CHUNK: usize = 4096;

/// Number of timed-out transaction ids a connection remembers, so that a
/// late response can be distinguished from an unsolicited one.
const RETIRED_IDS: usize = 64;

/// How to reach one device and how much load it may get.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// Device name from the configuration, used in events, logs and errors.
    pub device: Arc<str>,
    pub address: SocketAddr,
    /// Maximum time from accepting a request to receiving its response.
    pub timeout: Duration,
    /// Maximum number of TCP connections to the device.
    pub max_connections: usize,
    /// Maximum number of requests awaiting a response on one connection.
    pub max_in_flight: usize,
    pub connect_timeout: Duration,
    /// Upper bound of the delay between failed connect attempts.
    pub backoff_max: Duration,
    /// Maximum number of requests the pool holds, queued or in flight.
    pub max_queue: usize,
    /// Set for a device that speaks MODBUS/TCP Security.
    pub tls: Option<crate::config::DeviceTls>,
}

impl UpstreamSettings {
    /// Creates settings with the defaults: 1 s timeout, one connection with
    /// one request in flight, 3 s connect timeout, backoff up to 10 s and a
    /// queue of 256 requests.
    pub fn new(device: impl Into<Arc<str>>, address: SocketAddr) -> UpstreamSettings {
        UpstreamSettings {
            device: device.into(),
            address,
            timeout: Duration::from_millis(1000),
            max_connections: 1,
            max_in_flight: 1,
            connect_timeout: Duration::from_secs(3),
            backoff_max: Duration::from_secs(10),
            max_queue: 256,
            tls: None,
        }
    }
}

/// Cause of a failure to reach the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectFailure {
    #[error("connect failed: {kind}")]
    Io { kind: io::ErrorKind },
    #[error("connect timed out after {timeout:?}")]
    TimedOut { timeout: Duration },
    #[error("backing off after failed connects; next attempt in {remaining:?}")]
    BackingOff { remaining: Duration },
    #[error("TLS handshake failed: {reason}")]
    Tls { reason: String },
}

/// Cause of the end of an open connection before a request got its response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    #[error("device closed the connection")]
    Eof,
    #[error("I/O error: {kind}")]
    Io { kind: io::ErrorKind },
    #[error("invalid response frame: {error}")]
    Framing { error: FrameError },
    #[error("connection reset after a bad response to another request")]
    Reset,
    #[error("upstream pool shut down")]
    Shutdown,
}

/// A request that did not get a valid response. Every variant is the PLC
/// side's failure except `Busy`, which is sluice's own back-pressure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("device {device} at {address} unreachable: {reason}")]
    Unreachable {
        device: Arc<str>,
        address: SocketAddr,
        reason: ConnectFailure,
    },
    #[error("device {device} did not respond within {timeout:?}")]
    Timeout { device: Arc<str>, timeout: Duration },
    #[error("response does not match its request: {error}")]
    BadResponse { error: ResponseError },
    #[error("response came from unit {received} to a request for unit {expected}")]
    WrongUnit { expected: u8, received: u8 },
    #[error("upstream request queue full")]
    Busy,
    #[error("connection to device {device} ended before the response: {reason}")]
    Closed {
        device: Arc<str>,
        reason: CloseReason,
    },
}

impl UpstreamError {
    /// Returns the exception code that the client gets for this failure.
    pub fn exception_code(&self) -> ExceptionCode {
        match self {
            UpstreamError::Unreachable { .. } => ExceptionCode::GatewayPathUnavailable,
            // sluice itself removed the path, and the device never saw the request.
            UpstreamError::Closed {
                reason: CloseReason::Shutdown,
                ..
            } => ExceptionCode::GatewayPathUnavailable,
            UpstreamError::Busy => ExceptionCode::ServerDeviceBusy,
            UpstreamError::Timeout { .. }
            | UpstreamError::BadResponse { .. }
            | UpstreamError::WrongUnit { .. }
            | UpstreamError::Closed { .. } => ExceptionCode::GatewayTargetFailedToRespond,
        }
    }
}

type Reply = oneshot::Sender<Result<Bytes, UpstreamError>>;

/// One request on its way from a caller to a connection task.
struct Job {
    unit: u8,
    request: Request,
    /// False for requests that by specification get no response. Such a
    /// job completes with an empty PDU once it is written.
    expects_response: bool,
    deadline: Instant,
    reply: Reply,
}

/// A request that was written and awaits its response.
struct InFlight {
    transaction_id: u16,
    job: Job,
}

const STATUS_UNKNOWN: u8 = 0;
const STATUS_UP: u8 = 1;
const STATUS_DOWN: u8 = 2;

/// State of one device that callers and connection tasks share.
struct DeviceState {
    settings: UpstreamSettings,
    emitter: Emitter,
    status: AtomicU8,
    /// Number of connection tasks holding an open connection.
    connected: AtomicUsize,
    /// Connections opened by a slot that had been connected before.
    reconnects: AtomicU64,
}

/// State of one connection slot that callers and its task share.
struct SlotState {
    /// Requests given to this slot that have not completed yet.
    load: AtomicUsize,
    /// Consecutive failed connect attempts.
    failures: AtomicU32,
    /// End of the current backoff, in nanoseconds after `epoch`, or 0 when
    /// the next attempt may start at once.
    backoff_until: AtomicU64,
    epoch: Instant,
    /// The slot's plain connection while its task lends it to callers.
    lending: Mutex<Lending>,
    /// Woken when a caller gives the connection back.
    returned: Notify,
    /// The session thread whose runtime runs the slot's task and so
    /// watches its socket, or `usize::MAX` for another thread.
    home: AtomicUsize,
}

impl SlotState {
    fn new(epoch: Instant) -> SlotState {
        SlotState {
            load: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            backoff_until: AtomicU64::new(0),
            epoch,
            lending: Mutex::new(Lending::Held),
            returned: Notify::new(),
            home: AtomicUsize::new(usize::MAX),
        }
    }

    fn backoff_remaining(&self, now: Instant) -> Option<Duration> {
        let until = self.backoff_until.load(Ordering::Acquire);
        if until == 0 {
            return None;
        }
        let until = self.epoch + Duration::from_nanos(until);
        let remaining = until.saturating_duration_since(now);
        (!remaining.is_zero()).then_some(remaining)
    }

    fn record_success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.backoff_until.store(0, Ordering::Release);
    }

    fn record_failure(&self, now: Instant, backoff_max: Duration) -> Duration {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let delay = backoff_delay(failures, backoff_max);
        let until = (now + delay).saturating_duration_since(self.epoch);
        let nanos = u64::try_from(until.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.backoff_until.store(nanos, Ordering::Release);
        delay
    }
}

/// Returns the wait after `failures` consecutive failed connects: 100 ms
/// after the first, doubling up to `max`.
fn backoff_delay(failures: u32, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    INITIAL_BACKOFF.saturating_mul(1 << doublings).min(max)
}

/// The receiving ends a slot's task takes when it starts.
struct SlotReceivers {
    jobs: mpsc::Receiver<Job>,
    shutdown: mpsc::Receiver<()>,
}

struct Slot {
    state: Arc<SlotState>,
    sender: mpsc::Sender<Job>,
    /// Tells the slot's task to stop. A channel per slot, because polling an
    /// mpsc receiver takes no lock, where a shared watch or cancellation
    /// token would lock a mutex on every turn of the task's loop.
    stop: mpsc::Sender<()>,
    /// Taken when the slot's task is spawned, on the slot's first request.
    receivers: Mutex<Option<SlotReceivers>>,
    started: AtomicBool,
}

struct PoolInner {
    device: Arc<DeviceState>,
    slots: Box<[Slot]>,
    /// Requests admitted that have not completed yet, over all slots.
    pending: AtomicUsize,
    closed: AtomicBool,
}

/// The connections to one device, shared by every session that routes to
/// it. Cloning is cheap and clones share the connections.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl Pool {
    /// Creates a pool without opening any connection: the first request
    /// spawns its slot's task, which then connects.
    pub fn new(settings: UpstreamSettings, emitter: Emitter) -> Pool {
        let mut settings = settings;
        // Configuration validates these, and the clamps keep the pool sound
        // when a caller builds settings by hand.
        settings.max_connections = settings.max_connections.max(1);
        settings.max_in_flight = settings.max_in_flight.clamp(1, MAX_IN_FLIGHT);
        settings.max_queue = settings.max_queue.max(1);

        let epoch = Instant::now();
        let slots = (0..settings.max_connections)
            .map(|_| {
                let (sender, jobs) = mpsc::channel(settings.max_queue);
                let (stop, shutdown) = mpsc::channel(1);
                let receivers = SlotReceivers { jobs, shutdown };
                Slot {
                    state: Arc::new(SlotState::new(epoch)),
                    sender,
                    stop,
                    receivers: Mutex::new(Some(receivers)),
                    started: AtomicBool::new(false),
                }
            })
            .collect();
        let device = DeviceState {
            settings,
            emitter,
            status: AtomicU8::new(STATUS_UNKNOWN),
            connected: AtomicUsize::new(0),
            reconnects: AtomicU64::new(0),
        };
        let inner = PoolInner {
            device: Arc::new(device),
            slots,
            pending: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        };
        Pool {
            inner: Arc::new(inner),
        }
    }

    /// Sends `request` to `unit` and returns the response PDU (function code
    /// and data) after `check_response` has accepted it. An exception
    /// response from the PLC is a valid response and is returned as such.
    pub async fn call(&self, unit: u8, request: &Request) -> Result<Bytes, UpstreamError> {
        if let Some(borrowed) = self.inner.borrow_parked(unit, request) {
            if let Some(result) = borrowed.exchange().await {
                return result;
            }
        }
        let (reply, response) = oneshot::channel();
        let _admission = self.inner.submit(unit, request, true, reply)?;
        response
            .await
            .unwrap_or_else(|_| Err(self.inner.shutdown_error()))
    }

    /// Sends a request that by specification gets no response, such as FC 8
    /// sub-function 4 or a write to unit 0 behind a serial gateway. Returns
    /// once the request is handed to the socket.
    pub async fn send_without_response(
        &self,
        unit: u8,
        request: &Request,
    ) -> Result<(), UpstreamError> {
        let (reply, written) = oneshot::channel();
        let _admission = self.inner.submit(unit, request, false, reply)?;
        match written.await {
            Ok(result) => result.map(|_| ()),
            Err(_) => Err(self.inner.shutdown_error()),
        }
    }

    /// Returns whether the last connect attempt succeeded. A pool that has
    /// not connected yet is not up.
    /// Returns the name of the device this pool connects to.
    pub fn device(&self) -> &Arc<str> {
        &self.inner.device.settings.device
    }

    /// Returns how many connections were opened to replace an earlier one.
    pub fn reconnects(&self) -> u64 {
        self.inner.device.reconnects.load(Ordering::Relaxed)
    }

    pub fn is_up(&self) -> bool {
        self.inner.device.status.load(Ordering::Acquire) == STATUS_UP
    }

    /// Closes every connection. Outstanding and later requests fail with
    /// `Closed` and reason `Shutdown`.
    ///
    /// NOTE: a request that a caller is exchanging on a parked connection
    /// still gets its response or its timeout, and the connection closes
    /// when the caller gives it back.
    pub fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::Release);
        for slot in self.inner.slots.iter() {
            let _ = slot.stop.try_send(());
        }
        // Dropping the receivers of slots that never started closes their
        // channels, so no request can wait in one forever.
        for slot in self.inner.slots.iter() {
            let _ = lock_receivers(slot).take();
        }
    }
}

/// Releases a request's place in the queue when its caller stops waiting,
/// whether it got a response or was cancelled.
struct Admission<'a> {
    pool: &'a PoolInner,
    slot: usize,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.pool.slots[self.slot]
            .state
            .load
            .fetch_sub(1, Ordering::AcqRel);
        self.pool.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PoolInner {
    fn submit(
        &self,
        unit: u8,
        request: &Request,
        expects_response: bool,
        reply: Reply,
    ) -> Result<Admission<'_>, UpstreamError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.shutdown_error());
        }
        let now = Instant::now();
        let slot = self.choose_slot(now)?;
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.device.settings.max_queue {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(UpstreamError::Busy);
        }
        self.slots[slot].state.load.fetch_add(1, Ordering::AcqRel);
        let admission = Admission { pool: self, slot };

        self.start_slot(slot);
        let job = Job {
            unit,
            request: request.clone(),
            expects_response,
            deadline: now + self.device.settings.timeout,
            reply,
        };
        match self.slots[slot].sender.try_send(job) {
            Ok(()) => Ok(admission),
            Err(mpsc::error::TrySendError::Full(_)) => Err(UpstreamError::Busy),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.shutdown_error()),
        }
    }

    /// Picks a slot that is not backing off: the least loaded one whose task
    /// runs on the caller's session thread and still has room for a request
    /// in flight, or else the least loaded of all. The lowest index wins a
    /// tie, so that light traffic uses a single connection.
    fn choose_slot(&self, now: Instant) -> Result<usize, UpstreamError> {
        let caller_thread = super::session_threads::current().unwrap_or(usize::MAX);
        let max_in_flight = self.device.settings.max_in_flight;
        let mut best: Option<(usize, usize)> = None;
        let mut near: Option<(usize, usize)> = None;
        let mut shortest_backoff = Duration::MAX;
        for (index, slot) in self.slots.iter().enumerate() {
            if let Some(remaining) = slot.state.backoff_remaining(now) {
                shortest_backoff = shortest_backoff.min(remaining);
                continue;
            }
            let load = slot.state.load.load(Ordering::Acquire);
            if best.is_none_or(|(_, best_load)| load < best_load) {
                best = Some((index, load));
            }
            let at_home = slot.state.home.load(Ordering::Relaxed) == caller_thread;
            if at_home && load < max_in_flight && near.is_none_or(|(_, near_load)| load < near_load)
            {
                near = Some((index, load));
            }
        }
        match near.or(best) {
            Some((index, _)) => Ok(index),
            None => Err(self.device.unreachable(ConnectFailure::BackingOff {
                remaining: shortest_backoff,
            })),
        }
    }

    fn start_slot(&self, index: usize) {
        let slot = &self.slots[index];
        if slot.started.load(Ordering::Acquire) {
            return;
        }
        let Some(receivers) = lock_receivers(slot).take() else {
            return;
        };
        slot.started.store(true, Ordering::Release);
        let home = super::session_threads::current().unwrap_or(usize::MAX);
        slot.state.home.store(home, Ordering::Relaxed);

        let settings = &self.device.settings;
        let span = tracing::info_span!("upstream", device = %settings.device, slot = index);
        let worker = Worker {
            device: self.device.clone(),
            slot: slot.state.clone(),
            jobs: receivers.jobs,
            shutdown: receivers.shutdown,
            waiting: VecDeque::new(),
            transactions: Transactions::new(),
            connected_before: false,
        };
        tokio::spawn(worker.run().instrument(span));
    }

    fn shutdown_error(&self) -> UpstreamError {
        UpstreamError::Closed {
            device: self.device.settings.device.clone(),
            reason: CloseReason::Shutdown,
        }
    }
}

fn lock_receivers(slot: &Slot) -> std::sync::MutexGuard<'_, Option<SlotReceivers>> {
    // The guarded value is a plain Option, which a panic cannot leave
    // half-changed.
    slot.receivers
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl DeviceState {
    fn unreachable(&self, reason: ConnectFailure) -> UpstreamError {
        UpstreamError::Unreachable {
            device: self.settings.device.clone(),
            address: self.settings.address,
            reason,
        }
    }

    fn timeout(&self) -> UpstreamError {
        UpstreamError::Timeout {
            device: self.settings.device.clone(),
            timeout: self.settings.timeout,
        }
    }

    fn closed(&self, reason: CloseReason) -> UpstreamError {
        UpstreamError::Closed {
            device: self.settings.device.clone(),
            reason,
        }
    }

    async fn connection_opened(&self) {
        self.connected.fetch_add(1, Ordering::AcqRel);
        if self.status.swap(STATUS_UP, Ordering::AcqRel) == STATUS_UP {
            return;
        }
        let settings = &self.settings;
        tracing::info!(device = %settings.device, address = %settings.address, "device up");
        let detail = serde_json::json!({ "address": settings.address.to_string() });
        self.emit_system("device_up", detail).await;
    }

    fn connection_closed(&self) {
        self.connected.fetch_sub(1, Ordering::AcqRel);
    }

    /// Marks the device down after a failed connect, unless another slot
    /// still has an open connection.
    async fn connect_failed(&self, failure: &ConnectFailure) {
        if self.connected.load(Ordering::Acquire) > 0 {
            return;
        }
        if self.status.swap(STATUS_DOWN, Ordering::AcqRel) == STATUS_DOWN {
            return;
        }
        let settings = &self.settings;
        tracing::info!(
            device = %settings.device,
            address = %settings.address,
            error = %failure,
            "device down"
        );
        let detail = serde_json::json!({
            "address": settings.address.to_string(),
            "error": failure.to_string(),
        });
        self.emit_system("device_down", detail).await;
    }

    async fn emit_system(&self, action: &'static str, detail: serde_json::Value) {
        let mut event = Event::new(EventType::System);
        event.action = Some(action);
        event.detail = Some(detail);
        self.emit(event).await;
    }

    async fn emit_anomaly(
        &self,
        kind: &'static str,
        severity: Severity,
        detail: String,
        modbus: Option<ModbusInfo>,
    ) {
        let mut event = Event::anomaly(kind, severity, detail);
        event.modbus = modbus;
        self.emit(event).await;
    }

    /// Records a response that no outstanding request is waiting for.
    async fn report_unmatched(&self, transactions: &Transactions, response: &RawResponse) {
        let transaction_id = response.header.transaction_id;
        let (severity, detail) = if transactions.is_retired(transaction_id) {
            let detail = format!("discarded response to timed-out transaction id {transaction_id}");
            (Severity::Low, detail)
        } else {
            let detail = format!("discarded response to unknown transaction id {transaction_id}");
            (Severity::Medium, detail)
        };
        tracing::debug!(transaction_id, "unmatched response discarded");
        let function = response.pdu.first().copied().unwrap_or(0);
        let modbus = ModbusInfo {
            unit: response.header.unit,
            function,
            function_name: super::pdu::function_name_of(function & 0x7F),
            address: None,
            quantity: None,
            transaction_id,
            sub_function: None,
            exception: None,
        };
        self.emit_anomaly("late_response", severity, detail, Some(modbus))
            .await;
    }

    /// Records `event` for this device. The future is boxed because it
    /// contains a whole event. Inline, it would enlarge the future of every
    /// request that can reach a rare emission, and the session copies each
    /// request's future when it queues it.
    fn emit(&self, mut event: Event) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        event.device = Some(self.settings.device.clone());
        Box::pin(async move {
            if let Err(error) = self.emitter.emit(event).await {
                tracing::warn!(%error, "upstream event not recorded");
            }
        })
    }
}

/// Outcome of serving one connection.
enum End {
    /// The connection is gone, and waiting requests go to the next one.
    Lost,
    /// The pool shut down or was dropped, so the task stops.
    Stopped,
    /// Nothing is queued or outstanding, so the connection may be parked.
    /// Carries the empty read buffer to keep its allocation.
    Idle(BytesMut),
}

/// One open connection and the requests written to it.
struct Link<W> {
    writer: W,
    in_flight: VecDeque<InFlight>,
    /// Replies of requests without a response, sent once the write is tried.
    written: Vec<Reply>,
    write_buf: BytesMut,
    read_buf: BytesMut,
}

impl<W: UpstreamWriter> Link<W> {
    fn new(writer: W, max_in_flight: usize, resume: Resume) -> Link<W> {
        let mut in_flight = VecDeque::with_capacity(max_in_flight);
        in_flight.extend(resume.in_flight);
        Link {
            writer,
            in_flight,
            written: Vec::new(),
            write_buf: BytesMut::with_capacity(READ_CHUNK),
            read_buf: resume.read_buf,
        }
    }

    fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
            && self.write_buf.is_empty()
            && self.read_buf.is_empty()
            && !self.writer.has_unsent()
    }
}

/// The state a connection carries into `serve`: bytes already read, and a
/// request that a caller wrote but stopped waiting for.
struct Resume {
    read_buf: BytesMut,
    in_flight: Option<InFlight>,
}

impl Resume {
    fn new() -> Resume {
        Resume {
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            in_flight: None,
        }
    }
}

/// The task behind one connection slot. It has at most one connection at
/// a time and reconnects when requests arrive after it was lost.
struct Worker {
    device: Arc<DeviceState>,
    slot: Arc<SlotState>,
    jobs: mpsc::Receiver<Job>,
    shutdown: mpsc::Receiver<()>,
    /// Received requests that are not yet written, oldest first.
    waiting: VecDeque<Job>,
    transactions: Transactions,
    /// Whether this slot has had a connection, so the next one counts as a
    /// reconnect.
    connected_before: bool,
}

impl Worker {
    async fn run(mut self) {
        loop {
            if self.waiting.is_empty() && !self.wait_for_job().await {
                break;
            }
            if let Some(remaining) = self.slot.backoff_remaining(Instant::now()) {
                let error = self
                    .device
                    .unreachable(ConnectFailure::BackingOff { remaining });
                self.fail_waiting(&error);
                continue;
            }
            let Some(result) = self.connect().await else {
                break;
            };
            match result {
                Ok(connection) => {
                    if self.connected_before {
                        self.device.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    self.connected_before = true;
                    self.slot.record_success();
                    self.device.connection_opened().await;
                    let end = match connection {
                        Connection::Plain(stream) => self.hold_plain(stream).await,
                        Connection::Tls(mut stream) => {
                            let (reader, writer) = tokio::io::split(&mut *stream);
                            let writer = TlsWriter {
                                inner: writer,
                                unsent: false,
                            };
                            self.serve(reader, writer, Resume::new(), false).await
                        }
                    };
                    self.device.connection_closed();
                    if let End::Stopped = end {
                        break;
                    }
                }
                Err(failure) => {
                    let delay = self
                        .slot
                        .record_failure(Instant::now(), self.device.settings.backoff_max);
                    tracing::debug!(error = %failure, ?delay, "connect failed");
                    self.device.connect_failed(&failure).await;
                    self.fail_waiting(&self.device.unreachable(failure));
                }
            }
        }
        let error = self.device.closed(CloseReason::Shutdown);
        self.fail_waiting(&error);
        self.jobs.close();
        while let Ok(job) = self.jobs.try_recv() {
            let _ = job.reply.send(Err(error.clone()));
        }
    }

    /// Waits for the next request while no connection is needed. Returns
    /// false when the pool shuts down.
    async fn wait_for_job(&mut self) -> bool {
        tokio::select! {
            job = self.jobs.recv() => match job {
                Some(job) => {
                    self.waiting.push_back(job);
                    true
                }
                None => false,
            },
            _ = self.shutdown.recv() => false,
        }
    }

    /// Opens a connection while still accepting requests and expiring their
    /// deadlines. Returns `None` when the pool shuts down meanwhile.
    async fn connect(&mut self) -> Option<Result<Connection, ConnectFailure>> {
        // The connect runs while `self` takes jobs, so it keeps its own handle.
        let device = self.device.clone();
        let open = open_connection(&device.settings);
        tokio::pin!(open);
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(timer);
        loop {
            let deadline = self.waiting.front().map(|job| job.deadline);
            if let Some(deadline) = deadline {
                timer.as_mut().reset(deadline);
            }
            let room = self.has_room(0);
            tokio::select! {
                result = &mut open => return Some(result),
                job = self.jobs.recv(), if room => match job {
                    Some(job) => self.waiting.push_back(job),
                    None => return None,
                },
                _ = &mut timer, if deadline.is_some() => self.expire_waiting(Instant::now()),
                _ = self.shutdown.recv() => return None,
            }
        }
    }

    fn has_room(&self, in_flight: usize) -> bool {
        self.waiting.len() + in_flight < self.device.settings.max_queue
    }

    /// Exchanges requests and responses on one open connection until it is
    /// lost or the pool stops.
    /// With `lendable`, returns `End::Idle` as soon as nothing is queued,
    /// written or received, so that the connection can be parked.
    async fn serve<R, W>(&mut self, mut reader: R, writer: W, resume: Resume, lendable: bool) -> End
    where
        R: AsyncRead + Unpin,
        W: UpstreamWriter,
    {
        // Reads go through `AsyncRead`, which marks the socket drained after a
        // short read. Probing readiness and then calling `try_read` would cost
        // one more system call per response: the read that returns WouldBlock.
        let mut link = Link::new(writer, self.device.settings.max_in_flight, resume);
        if !link.read_buf.is_empty() {
            if let Err(end) = self
                .handle_responses(&mut link.read_buf, &mut link.in_flight)
                .await
            {
                return end;
            }
        }
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(timer);

        loop {
            if let Err(end) = self.send(&mut link) {
                return end;
            }
            if lendable && link.is_idle() && self.waiting.is_empty() {
                return End::Idle(link.read_buf);
            }

            // The timer moves only when it fired or a new deadline is earlier
            // than the one it holds: re-arming it for every request would
            // take the timer driver's lock each time. A timer left on the
            // deadline of a request that already completed fires early, finds
            // nothing due and is re-armed then.
            let deadline = earliest_deadline(&link.in_flight, &self.waiting);
            if let Some(deadline) = deadline {
                if timer.is_elapsed() || deadline < timer.deadline() {
                    timer.as_mut().reset(deadline);
                }
            }
            let room = self.has_room(link.in_flight.len());
            let must_write = !link.write_buf.is_empty() || link.writer.has_unsent();
            link.read_buf.reserve(READ_CHUNK);

            tokio::select! {
                biased;
                _ = self.shutdown.recv() => return self.stop(&mut link),
                read = reader.read_buf(&mut link.read_buf) => {
                    let received = match read {
                        Ok(0) => Err(self.lose(&mut link.in_flight, CloseReason::Eof)),
                        Ok(_) => self.handle_responses(&mut link.read_buf, &mut link.in_flight).await,
                        Err(error) => Err(self.lose(&mut link.in_flight, io_reason(&error))),
                    };
                    if let Err(end) = received {
                        return end;
                    }
                }
                ready = link.writer.ready(), if must_write => {
                    if let Err(error) = ready {
                        return self.lose(&mut link.in_flight, io_reason(&error));
                    }
                }
                job = self.jobs.recv(), if room => match job {
                    Some(job) => self.waiting.push_back(job),
                    None => return self.stop(&mut link),
                },
                _ = &mut timer, if deadline.is_some() => {
                    self.expire(&mut link.in_flight, Instant::now());
                }
            }
        }
    }

    /// Sends what the connection may take now: queued requests, then as
    /// much of the write buffer as the socket accepts without waiting.
    fn send<W: UpstreamWriter>(&mut self, link: &mut Link<W>) -> Result<(), End> {
        self.pull_jobs(link.in_flight.len());
        self.dispatch(&mut link.in_flight, &mut link.written, &mut link.write_buf);
        if let Err(error) = link.writer.write_pending(&mut link.write_buf) {
            return Err(self.lose(&mut link.in_flight, io_reason(&error)));
        }
        for reply in link.written.drain(..) {
            let _ = reply.send(Ok(Bytes::new()));
        }
        Ok(())
    }

    /// Fails the written requests because the pool shut down or was dropped.
    fn stop<W>(&mut self, link: &mut Link<W>) -> End {
        let error = self.device.closed(CloseReason::Shutdown);
        fail_in_flight(&mut link.in_flight, &error);
        End::Stopped
    }

    /// Moves every request already in the channel to `waiting`, as far as
    /// the queue limit allows, without waiting.
    fn pull_jobs(&mut self, in_flight: usize) {
        while self.has_room(in_flight) {
            match self.jobs.try_recv() {
                Ok(job) => self.waiting.push_back(job),
                Err(_) => break,
            }
        }
    }

    /// Encodes waiting requests into `write_buf` in arrival order while the
    /// connection may take more. Requests whose caller left or whose
    /// deadline passed are not sent.
    fn dispatch(
        &mut self,
        in_flight: &mut VecDeque<InFlight>,
        written: &mut Vec<Reply>,
        write_buf: &mut BytesMut,
    ) {
        if self.waiting.is_empty() {
            return;
        }
        let now = Instant::now();
        let max_in_flight = self.device.settings.max_in_flight;
        while let Some(job) = self.waiting.front() {
            if job.expects_response && in_flight.len() >= max_in_flight {
                break;
            }
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            if job.reply.is_closed() {
                continue;
            }
            if job.deadline <= now {
                let _ = job.reply.send(Err(self.device.timeout()));
                continue;
            }
            let transaction_id = self.allocate_transaction_id(in_flight);
            let header = Header {
                transaction_id,
                unit: job.unit,
            };
            frame::encode_request(header, &job.request, write_buf);
            if job.expects_response {
                in_flight.push_back(InFlight {
                    transaction_id,
                    job,
                });
            } else {
                written.push(job.reply);
            }
        }
    }

    /// Returns the next transaction id that no outstanding request uses.
    fn allocate_transaction_id(&mut self, in_flight: &VecDeque<InFlight>) -> u16 {
        self.transactions.allocate(|candidate| {
            in_flight
                .iter()
                .any(|entry| entry.transaction_id == candidate)
        })
    }

    /// Fails every request whose deadline has passed with `Timeout`. The
    /// transaction id of a written one is retired, so that its late
    /// response is discarded.
    ///
    /// NOTE: the connection stays open however many requests time out, so a
    /// half-open connection is noticed only when TCP reports an error.
    fn expire(&mut self, in_flight: &mut VecDeque<InFlight>, now: Instant) {
        let mut index = 0;
        while index < in_flight.len() {
            if in_flight[index].job.deadline > now {
                index += 1;
                continue;
            }
            let Some(entry) = in_flight.remove(index) else {
                break;
            };
            tracing::debug!(
                transaction_id = entry.transaction_id,
                "request timed out; transaction id retired"
            );
            self.transactions.retire(entry.transaction_id);
            let _ = entry.job.reply.send(Err(self.device.timeout()));
        }
        self.expire_waiting(now);
    }

    fn expire_waiting(&mut self, now: Instant) {
        while let Some(job) = self.waiting.front() {
            if job.deadline > now {
                break;
            }
            if let Some(job) = self.waiting.pop_front() {
                let _ = job.reply.send(Err(self.device.timeout()));
            }
        }
    }

    /// Decodes every complete response in `read_buf`. Returns `Err` when the
    /// connection must be reset.
    async fn handle_responses(
        &mut self,
        read_buf: &mut BytesMut,
        in_flight: &mut VecDeque<InFlight>,
    ) -> Result<(), End> {
        loop {
            match frame::decode_response(read_buf) {
                Ok(Some(response)) => self.handle_response(response, in_flight).await?,
                Ok(None) => return Ok(()),
                Err(error) => {
                    let detail = format!("connection reset after invalid response frame: {error}");
                    self.device
                        .emit_anomaly("bad_response", Severity::Medium, detail, None)
                        .await;
                    return Err(self.lose(in_flight, CloseReason::Framing { error }));
                }
            }
        }
    }

    async fn handle_response(
        &mut self,
        response: RawResponse,
        in_flight: &mut VecDeque<InFlight>,
    ) -> Result<(), End> {
        let transaction_id = response.header.transaction_id;
        let position = in_flight
            .iter()
            .position(|entry| entry.transaction_id == transaction_id);
        let Some(entry) = position.and_then(|index| in_flight.remove(index)) else {
            self.device
                .report_unmatched(&self.transactions, &response)
                .await;
            return Ok(());
        };

        let unit = response.header.unit;
        match check(entry.job.unit, &entry.job.request, response) {
            Ok(pdu) => {
                let _ = entry.job.reply.send(Ok(pdu));
                Ok(())
            }
            Err(error) => {
                let detail = format!("connection reset: {error}");
                let modbus = modbus_info(&entry.job.request, transaction_id, unit);
                let _ = entry.job.reply.send(Err(error));
                self.device
                    .emit_anomaly("bad_response", Severity::Medium, detail, Some(modbus))
                    .await;
                Err(self.lose(in_flight, CloseReason::Reset))
            }
        }
    }

    /// Fails every written request with `Closed` and gives up the
    /// connection. Waiting requests stay for the next one.
    fn lose(&mut self, in_flight: &mut VecDeque<InFlight>, reason: CloseReason) -> End {
        tracing::debug!(%reason, outstanding = in_flight.len(), "upstream connection closed");
        let error = self.device.closed(reason);
        fail_in_flight(in_flight, &error);
        End::Lost
    }

    fn fail_waiting(&mut self, error: &UpstreamError) {
        for job in self.waiting.drain(..) {
            let _ = job.reply.send(Err(error.clone()));
        }
    }
}

/// An open connection to a device.
enum Connection {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

async fn open_connection(settings: &UpstreamSettings) -> Result<Connection, ConnectFailure> {
    let connect_timeout = settings.connect_timeout;
    let connect = tokio::time::timeout(connect_timeout, TcpStream::connect(settings.address));
    let stream = match connect.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(ConnectFailure::Io { kind: error.kind() }),
        Err(_) => {
            return Err(ConnectFailure::TimedOut {
                timeout: connect_timeout,
            })
        }
    };
    // Requests are small and latency-bound, so Nagle's algorithm only delays them.
    stream
        .set_nodelay(true)
        .map_err(|error| ConnectFailure::Io { kind: error.kind() })?;
    let Some(tls) = &settings.tls else {
        return Ok(Connection::Plain(stream));
    };
    // The handshake shares the connect timeout: both are reaching the device.
    let connector = TlsConnector::from(tls.client.0.clone());
    let handshake = connector.connect(tls.server_name.clone(), stream);
    match tokio::time::timeout(connect_timeout, handshake).await {
        Ok(Ok(stream)) => Ok(Connection::Tls(Box::new(stream))),
        Ok(Err(error)) => Err(ConnectFailure::Tls {
            reason: error.to_string(),
        }),
        Err(_) => Err(ConnectFailure::TimedOut {
            timeout: connect_timeout,
        }),
    }
}

fn io_reason(error: &io::Error) -> CloseReason {
    CloseReason::Io { kind: error.kind() }
}

fn earliest_deadline(in_flight: &VecDeque<InFlight>, waiting: &VecDeque<Job>) -> Option<Instant> {
    let written = in_flight.iter().map(|entry| entry.job.deadline).min();
    let queued = waiting.front().map(|job| job.deadline);
    match (written, queued) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn fail_in_flight(in_flight: &mut VecDeque<InFlight>, error: &UpstreamError) {
    for entry in in_flight.drain(..) {
        let _ = entry.job.reply.send(Err(error.clone()));
    }
}

fn modbus_info(request: &Request, transaction_id: u16, unit: u8) -> ModbusInfo {
    ModbusInfo {
        unit,
        function: request.function_code(),
        function_name: request.function_name(),
        address: None,
        quantity: None,
        transaction_id,
        sub_function: None,
        exception: None,
    }
}

/// Returns the PDU of `response` to a request for `unit`, or the error when
/// it came from another unit or does not fit `request`.
fn check(unit: u8, request: &Request, response: RawResponse) -> Result<Bytes, UpstreamError> {
    if response.header.unit != unit {
        return Err(UpstreamError::WrongUnit {
            expected: unit,
            received: response.header.unit,
        });
    }
    match frame::check_response(request, &response.pdu) {
        Ok(()) => Ok(response.pdu),
        Err(error) => Err(UpstreamError::BadResponse { error }),
    }
}

/// The transaction ids of one connection slot. The default value is an
/// empty stand-in while the ids travel with a parked connection.
#[derive(Default)]
struct Transactions {
    next: u16,
    /// Recently timed-out transaction ids, oldest first.
    retired: VecDeque<u16>,
}

impl Transactions {
    fn new() -> Transactions {
        Transactions {
            next: 1,
            retired: VecDeque::with_capacity(RETIRED_IDS),
        }
    }

    /// Returns the next transaction id for which `in_use` is false.
    fn allocate(&mut self, in_use: impl Fn(u16) -> bool) -> u16 {
        loop {
            let candidate = self.next;
            self.next = candidate.wrapping_add(1);
            if !in_use(candidate) {
                return candidate;
            }
        }
    }

    /// Remembers a timed-out transaction id, so that its late response is
    /// reported as such.
    fn retire(&mut self, transaction_id: u16) {
        if self.retired.len() == RETIRED_IDS {
            self.retired.pop_front();
        }
        self.retired.push_back(transaction_id);
    }

    fn is_retired(&self, transaction_id: u16) -> bool {
        self.retired.contains(&transaction_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> UpstreamSettings {
        UpstreamSettings::new("press-1", SocketAddr::from(([127, 0, 0, 1], 1)))
    }

    #[test]
    fn backoff_doubles_from_100ms_up_to_max() {
        let max = Duration::from_secs(1);
        let delays: Vec<Duration> = (1..=6)
            .map(|failures| backoff_delay(failures, max))
            .collect();
        let expected = [100, 200, 400, 800, 1000, 1000].map(Duration::from_millis);
        assert_eq!(delays, expected);
        assert_eq!(backoff_delay(u32::MAX, max), max);
    }

    #[test]
    fn slot_backoff_clears_on_success() {
        let epoch = Instant::now();
        let slot = SlotState::new(epoch);
        assert_eq!(slot.backoff_remaining(epoch), None);

        let delay = slot.record_failure(epoch, Duration::from_secs(5));
        assert_eq!(delay, Duration::from_millis(100));
        let remaining = slot.backoff_remaining(epoch + Duration::from_millis(40));
        assert_eq!(remaining, Some(Duration::from_millis(60)));
        assert_eq!(
            slot.backoff_remaining(epoch + Duration::from_millis(100)),
            None
        );

        let delay = slot.record_failure(epoch, Duration::from_secs(5));
        assert_eq!(delay, Duration::from_millis(200));

        slot.record_success();
        assert_eq!(slot.backoff_remaining(epoch), None);
        assert_eq!(slot.failures.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn errors_map_to_gateway_exception_codes() {
        let device: Arc<str> = Arc::from("press-1");
        let address = SocketAddr::from(([127, 0, 0, 1], 502));
        let cases = [
            (
                UpstreamError::Unreachable {
                    device: device.clone(),
                    address,
                    reason: ConnectFailure::Io {
                        kind: io::ErrorKind::ConnectionRefused,
                    },
                },
                ExceptionCode::GatewayPathUnavailable,
            ),
            (
                UpstreamError::Timeout {
                    device: device.clone(),
                    timeout: Duration::from_millis(200),
                },
                ExceptionCode::GatewayTargetFailedToRespond,
            ),
            (
                UpstreamError::WrongUnit {
                    expected: 1,
                    received: 2,
                },
                ExceptionCode::GatewayTargetFailedToRespond,
            ),
            (UpstreamError::Busy, ExceptionCode::ServerDeviceBusy),
            (
                UpstreamError::Closed {
                    device: device.clone(),
                    reason: CloseReason::Eof,
                },
                ExceptionCode::GatewayTargetFailedToRespond,
            ),
            (
                UpstreamError::Closed {
                    device,
                    reason: CloseReason::Shutdown,
                },
                ExceptionCode::GatewayPathUnavailable,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(error.exception_code(), code, "{error}");
        }
    }

    #[test]
    fn error_messages_name_device_and_limit() {
        let error = UpstreamError::Timeout {
            device: Arc::from("press-1"),
            timeout: Duration::from_millis(200),
        };
        assert_eq!(
            error.to_string(),
            "device press-1 did not respond within 200ms"
        );
        let error = UpstreamError::Unreachable {
            device: Arc::from("press-1"),
            address: SocketAddr::from(([127, 0, 0, 1], 502)),
            reason: ConnectFailure::Io {
                kind: io::ErrorKind::ConnectionRefused,
            },
        };
        assert_eq!(
            error.to_string(),
            "device press-1 at 127.0.0.1:502 unreachable: connect failed: connection refused"
        );
    }

    #[test]
    fn new_pool_clamps_zero_limits() {
        let (emitter, _events) = Emitter::new(Arc::from("edge-01"));
        let mut zero = settings();
        zero.max_connections = 0;
        zero.max_in_flight = 0;
        zero.max_queue = 0;
        let pool = Pool::new(zero, emitter);
        let settings = &pool.inner.device.settings;
        assert_eq!(settings.max_connections, 1);
        assert_eq!(settings.max_in_flight, 1);
        assert_eq!(settings.max_queue, 1);
        assert_eq!(pool.inner.slots.len(), 1);
        assert!(!pool.is_up());
    }

    #[tokio::test]
    async fn busy_when_queue_full() {
        let (emitter, _events) = Emitter::new(Arc::from("edge-01"));
        let mut small_queue = settings();
        small_queue.max_queue = 1;
        let pool = Pool::new(small_queue, emitter);
        let request = Request::ReadHoldingRegisters {
            address: 0,
            quantity: 1,
        };
        let (reply, _response) = oneshot::channel();
        let admission = pool.inner.submit(1, &request, true, reply);
        assert!(admission.is_ok());
        let second = pool.call(1, &request).await;
        assert_eq!(second, Err(UpstreamError::Busy));
    }

    #[tokio::test]
    async fn calls_after_shutdown_fail_closed() {
        let (emitter, _events) = Emitter::new(Arc::from("edge-01"));
        let pool = Pool::new(settings(), emitter);
        pool.shutdown();
        let request = Request::ReadCoils {
            address: 0,
            quantity: 1,
        };
        let result = pool.call(1, &request).await;
        let expected = UpstreamError::Closed {
            device: Arc::from("press-1"),
            reason: CloseReason::Shutdown,
        };
        assert_eq!(result, Err(expected));
    }

    /// Returns the slot that a caller on session thread 0 would get, with
    /// slot 1's task on that thread and the given loads.
    fn slot_chosen_on_thread(loads: [usize; 2]) -> usize {
        let (emitter, _events) = Emitter::new(Arc::from("edge-01"));
        let mut two_slots = settings();
        two_slots.max_connections = 2;
        two_slots.max_in_flight = 8;
        let pool = Pool::new(two_slots, emitter);
        for (slot, load) in pool.inner.slots.iter().zip(loads) {
            slot.state.load.store(load, Ordering::Relaxed);
        }
        pool.inner.slots[1].state.home.store(0, Ordering::Relaxed);

        let threads = super::super::session_threads::SessionThreads::start(1).unwrap();
        let (sender, chosen) = std::sync::mpsc::channel();
        threads.spawn(async move {
            sender.send(pool.inner.choose_slot(Instant::now())).unwrap();
        });
        let chosen = chosen.recv().unwrap().unwrap();
        threads.stop();
        chosen
    }

    #[test]
    fn choose_slot_prefers_own_thread() {
        assert_eq!(slot_chosen_on_thread([0, 0]), 1);
        assert_eq!(slot_chosen_on_thread([0, 7]), 1);
    }

    #[test]
    fn choose_slot_leaves_full_own_slot() {
        assert_eq!(slot_chosen_on_thread([3, 8]), 0);
    }

    #[test]
    fn choose_slot_elsewhere_takes_lowest_index() {
        let (emitter, _events) = Emitter::new(Arc::from("edge-01"));
        let mut two_slots = settings();
        two_slots.max_connections = 2;
        let pool = Pool::new(two_slots, emitter);
        pool.inner.slots[1].state.home.store(0, Ordering::Relaxed);
        assert_eq!(pool.inner.choose_slot(Instant::now()), Ok(0));
    }
}
