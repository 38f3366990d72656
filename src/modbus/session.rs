//! One client connection on a Modbus/TCP or MODBUS/TCP Security listener,
//! generic over the stream halves so both share this code. The session reads
//! frames, decides each request against the current policy generation,
//! forwards what is allowed through the device's pool and writes every answer
//! back under the client's own transaction id. Several requests of one client
//! may be in flight at once, up to the listener's `max_pending`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, Stream, StreamExt};
use slab::Slab;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant as TokioInstant};
use tokio_util::sync::CancellationToken;

use crate::config::OnAnomalyConfig;
use crate::detect::{self, Failure, Finding, Observed, SessionDetector};
use crate::events::{DecisionKind, Event, EventType, ModbusInfo, Severity};
use crate::identity::certificate::CertificateIdentity;
use crate::metrics::Instruments;
use crate::policy::{Context, Decision, DeviceId, ListenerPlan, Mode, OnDeny, RoleId, VendorId};

use super::access::access_of;
use super::frame::{self, Decoded, FrameError, Header};
use super::generation::{Generation, Shared};
use super::mirror::{self, Route};
use super::pdu::{ExceptionCode, Request};
use super::upstream::{Pool, UpstreamError};

/// Initial size of the read and write buffers of a session, in bytes.
const BUFFER_CAPACITY: usize = 4096;

/// The identity of a session and the signals that stop it.
pub struct SessionParams {
    pub id: u64,
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    pub vendor: VendorId,
    pub vendor_name: Arc<str>,
    pub requests: Arc<AtomicU64>,
    /// Cancelled to close the session at once.
    pub close: CancellationToken,
    /// The reason set by the code that cancelled `close`.
    pub close_reason: Arc<std::sync::OnceLock<&'static str>>,
    /// Cancelled to stop reading requests; the session closes once the
    /// requests already in flight are answered.
    pub drain: CancellationToken,
    /// The client certificate on a MODBUS/TCP Security listener.
    pub certificate: Option<Arc<CertificateIdentity>>,
    /// The certificate's role as an id of the current generation's policy.
    pub role: Option<RoleId>,
}

/// The reason a session ended, as recorded in its close event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseReason {
    ClientClosed,
    FrameError,
    IncompleteFrame,
    FrameTimeout,
    IdleTimeout,
    DenyClose,
    VendorRemoved,
    ListenerRemoved,
    Closed,
    Quarantined,
    Drained,
    WriteFailed,
    ReadFailed,
}

impl CloseReason {
    fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client closed the connection",
            CloseReason::FrameError => "invalid MBAP header",
            CloseReason::IncompleteFrame => "connection ended inside a frame",
            CloseReason::FrameTimeout => "frame not completed in time",
            CloseReason::IdleTimeout => "idle timeout",
            CloseReason::DenyClose => "request denied with on_deny = close",
            CloseReason::VendorRemoved => "vendor no longer matches after reload",
            CloseReason::ListenerRemoved => "listener removed by reload",
            CloseReason::Closed => "closed by the gateway",
            CloseReason::Quarantined => "vendor quarantined",
            CloseReason::Drained => "gateway shutting down",
            CloseReason::WriteFailed => "write to client failed",
            CloseReason::ReadFailed => "read from client failed",
        }
    }
}

/// The part of a forwarded request that the session keeps until the
/// response arrives: the client's header and the decision event to emit. It
/// is kept out of the call's future because the session copies that future
/// into the in-flight set once per request.
struct Awaiting {
    header: Header,
    function: u8,
    event: Box<Event>,
    tally: Tally,
}

/// The outcome of one upstream call, with the key of its `Awaiting` entry.
struct Completed {
    key: usize,
    outcome: Result<Option<Bytes>, UpstreamError>,
}

/// The labels and start time that count one forwarded request.
struct Tally {
    instruments: Arc<Instruments>,
    listener: usize,
    vendor: usize,
    device: DeviceId,
    allowed: bool,
    forwarded_at: Instant,
}

impl Tally {
    fn record(&self, function: u8, outcome: &Result<Option<Bytes>, UpstreamError>) {
        let duration = self.forwarded_at.elapsed();
        self.instruments.record_request(
            self.listener,
            self.vendor,
            self.device,
            function,
            self.allowed,
            Some(duration),
        );
        let upstream = self.instruments.upstream(self.device);
        match outcome {
            Ok(Some(pdu)) if pdu.len() == 2 && pdu[0] & 0x80 != 0 => {
                upstream.count_exception(pdu[1])
            }
            Ok(_) => {}
            Err(UpstreamError::Timeout { .. }) => upstream.count_timeout(),
            Err(UpstreamError::BadResponse { .. } | UpstreamError::WrongUnit { .. }) => {
                upstream.count_bad_response()
            }
            Err(_) => {}
        }
    }
}

/// An allowed (or monitored) request on its way to a device.
struct Job {
    call: Call,
    awaiting: Awaiting,
}

/// The upstream part of a job: what its future needs.
struct Call {
    pool: Pool,
    upstream_unit: u8,
    request: Request,
    expects_response: bool,
}

/// The next action of the session after handling one frame. A `Step` lives only until
/// the caller moves the job into the in-flight set, so the large variant is
/// cheaper than a boxed one, which would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Step {
    Continue,
    Forward(Job),
    Close(CloseReason),
}

struct Session {
    params: SessionParams,
    shared: Arc<Shared>,
    generation: Arc<Generation>,
    listener: usize,
    output: BytesMut,
    detector: SessionDetector,
    /// Anomalies raised by the request being handled; kept to reuse its
    /// allocation.
    findings: Vec<Finding>,
    /// The forwarded requests that wait for a response, under the keys that
    /// their calls in the in-flight set carry.
    awaiting: Slab<Awaiting>,
}

/// Serves one admitted connection, given as its read and write halves,
/// until it closes; records its end.
pub async fn run<R, W>(reader: R, writer: W, params: SessionParams, shared: Arc<Shared>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let generation = shared.current.load_full();
    let Some(listener) = find_listener(&generation, &params.listener) else {
        return;
    };
    let _open = generation.instruments.open_session(listener, params.vendor);
    let mut session = Session {
        params,
        shared,
        generation,
        listener,
        output: BytesMut::with_capacity(BUFFER_CAPACITY),
        detector: SessionDetector::new(),
        findings: Vec::new(),
        awaiting: Slab::new(),
    };
    session.record_open().await;

    let reason = session.serve(reader, writer).await;

    tracing::debug!(reason = reason.as_str(), "session closed");
    session.record_close(reason).await;
}

fn find_listener(generation: &Generation, name: &str) -> Option<usize> {
    generation
        .policy
        .listeners()
        .iter()
        .position(|listener| &*listener.name == name)
}

impl Session {
    fn plan(&self) -> &ListenerPlan {
        &self.generation.policy.listeners()[self.listener]
    }

    async fn serve<R, W>(&mut self, mut reader: R, mut writer: W) -> CloseReason
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut input = BytesMut::with_capacity(BUFFER_CAPACITY);
        let mut in_flight = InFlight::new();
        let mut reading = true;
        let mut partial_since: Option<TokioInstant> = None;
        let mut last_activity = TokioInstant::now();
        let mut control = watch_control(self.params.close.clone(), self.params.drain.clone());
        let mut draining = false;
        let timer = sleep_until(last_activity + self.plan().limits.idle_timeout);
        tokio::pin!(timer);

        loop {
            // Handle every complete frame already buffered.
            while reading && !input.is_empty() {
                match frame::decode_request(&mut input) {
                    Ok(Some(decoded)) => {
                        let received = Instant::now();
                        last_activity = TokioInstant::from_std(received);
                        match self.handle(decoded, in_flight.len(), received).await {
                            Step::Continue => {}
                            Step::Forward(job) => {
                                let key = self.awaiting.insert(job.awaiting);
                                in_flight.push(forward(job.call, key));
                            }
                            Step::Close(reason) => return self.finish(&mut writer, reason).await,
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        self.record_frame_error(&error).await;
                        return self.finish(&mut writer, CloseReason::FrameError).await;
                    }
                }
            }
            if !self.output.is_empty() && writer.write_all(&self.output).await.is_err() {
                return CloseReason::WriteFailed;
            }
            self.output.clear();
            if !reading && in_flight.is_empty() {
                let reason = if draining {
                    CloseReason::Drained
                } else {
                    CloseReason::ClientClosed
                };
                return self.finish(&mut writer, reason).await;
            }

            let limits = self.plan().limits;
            partial_since = if input.is_empty() {
                None
            } else {
                Some(partial_since.unwrap_or_else(TokioInstant::now))
            };
            let deadline = match partial_since {
                Some(started) => started + limits.frame_timeout,
                None => last_activity + limits.idle_timeout,
            };
            let timer_armed = reading && (partial_since.is_some() || in_flight.is_empty());
            // The timer is moved earlier for a started frame, and otherwise
            // only when it fires: re-arming it after every request would take
            // the timer driver's lock each time.
            if deadline < timer.deadline() {
                timer.as_mut().reset(deadline);
            }

            tokio::select! {
                biased;
                signal = control.recv() => match signal {
                    Some(Control::Drain) => {
                        reading = false;
                        draining = true;
                    }
                    Some(Control::Close) | None => return CloseReason::Closed,
                },
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    self.complete(done).await;
                    // Collect every other answer that is already there, so
                    // they leave in one write.
                    while let Some(Some(done)) = futures_util::FutureExt::now_or_never(in_flight.next()) {
                        self.complete(done).await;
                    }
                    last_activity = TokioInstant::now();
                }
                read = reader.read_buf(&mut input), if reading => match read {
                    // rustls reports UnexpectedEof when a client closes TCP
                    // without close_notify. Many Modbus clients do that, so it
                    // counts as a close. An unfinished frame is still caught.
                    Ok(0) | Err(_) if is_end_of_stream(&read) => {
                        reading = false;
                        if !input.is_empty() {
                            self.record_protocol_anomaly(
                                "incomplete_frame",
                                format!("connection ended with {} bytes of an unfinished frame", input.len()),
                            ).await;
                            return CloseReason::IncompleteFrame;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return CloseReason::ReadFailed,
                },
                _ = &mut timer, if timer_armed => {
                    if TokioInstant::now() < deadline {
                        timer.as_mut().reset(deadline);
                        continue;
                    }
                    if partial_since.is_some() {
                        self.record_protocol_anomaly(
                            "incomplete_frame",
                            format!("frame not completed within {} ms", limits.frame_timeout.as_millis()),
                        ).await;
                        return CloseReason::FrameTimeout;
                    }
                    return CloseReason::IdleTimeout;
                }
            }
        }
    }

    /// Writes what is buffered, then closes the write side.
    async fn finish<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        reason: CloseReason,
    ) -> CloseReason {
        if !self.output.is_empty() {
            let _ = writer.write_all(&self.output).await;
            self.output.clear();
        }
        let _ = writer.shutdown().await;
        reason
    }

    /// Moves to the newest generation, re-checking that this session's
    /// listener and vendor still exist in it.
    fn refresh(&mut self) -> Result<(), CloseReason> {
        let current = self.shared.current.load();
        if Arc::ptr_eq(&current, &self.generation) {
            return Ok(());
        }
        let generation = arc_swap::Guard::into_inner(current);
        let listener = find_listener(&generation, &self.params.listener)
            .ok_or(CloseReason::ListenerRemoved)?;
        let certificate = self.params.certificate.as_deref();
        let vendor = generation
            .policy
            .identify_session(self.params.peer.ip(), certificate)
            .filter(|vendor| generation.policy.vendor_name(*vendor) == &self.params.vendor_name)
            .ok_or(CloseReason::VendorRemoved)?;
        self.params.role = certificate
            .and_then(|identity| identity.role.as_deref())
            .and_then(|role| generation.policy.role_id(role));
        self.generation = generation;
        self.listener = listener;
        self.params.vendor = vendor;
        Ok(())
    }

    /// Handles one decoded frame that arrived at `received`.
    async fn handle(&mut self, decoded: Decoded, pending: usize, received: Instant) -> Step {
        if let Err(reason) = self.refresh() {
            return Step::Close(reason);
        }
        // An operator's quarantine also closes the session from outside;
        // this check covers a request that arrives before that close.
        if self
            .shared
            .quarantine
            .is_quarantined(&self.params.vendor_name)
        {
            return Step::Close(CloseReason::Quarantined);
        }
        self.params.requests.fetch_add(1, Ordering::Relaxed);
        match decoded {
            Decoded::Invalid {
                header,
                function,
                exception,
                error,
            } => {
                self.detector.function(
                    received,
                    function,
                    self.generation.policy.detect(),
                    &mut self.findings,
                );
                self.reject_invalid(header, function, exception, &error)
                    .await;
                if self.raise_findings(None).await {
                    return Step::Close(CloseReason::Quarantined);
                }
                Step::Continue
            }
            Decoded::Request { header, request } => {
                let observed = observe(header.unit, &request);
                self.detector.request(
                    received,
                    &observed,
                    self.generation.policy.detect(),
                    &mut self.findings,
                );
                let step = self
                    .handle_request(header, request, pending, received)
                    .await;
                if self.raise_findings(None).await {
                    return Step::Close(CloseReason::Quarantined);
                }
                step
            }
        }
    }
}

impl Session {
    async fn handle_request(
        &mut self,
        header: Header,
        request: Request,
        pending: usize,
        received: Instant,
    ) -> Step {
        let function = request.function_code();
        let plan = self.plan();
        let mode = plan.mode;
        // MODBUS/TCP Security reports every authorization failure with
        // exception 01, whatever the listener's on_deny setting.
        let secure = plan.tls.is_some();
        let on_deny = if secure {
            OnDeny::Exception
        } else {
            plan.on_deny
        };
        let max_pending = plan.limits.max_pending;

        let Some(device) = plan.routes.device_for(header.unit) else {
            self.detector.denial(
                received,
                None,
                is_write(&request),
                self.generation.policy.detect(),
                &mut self.findings,
            );
            let mut event = self.decision_event(header, &request, None);
            event.decision = Some(DecisionKind::Deny);
            event.reason = Some(format!("no route for unit id {}", header.unit));
            self.answer_exception(
                header,
                function,
                ExceptionCode::GatewayPathUnavailable,
                event,
            )
            .await;
            return Step::Continue;
        };
        if pending >= max_pending {
            let mut event = self.decision_event(header, &request, Some(device));
            event.decision = Some(DecisionKind::Deny);
            event.reason = Some(format!("pending request limit {max_pending} reached"));
            self.answer_exception(header, function, ExceptionCode::ServerDeviceBusy, event)
                .await;
            return Step::Continue;
        }

        let access = access_of(header.unit, &request);
        let context = Context {
            source: self.params.peer.ip(),
            role: self.params.role,
            now: jiff::Timestamp::now(),
            instant: received,
            states: &self.generation.states,
        };
        let decision = self
            .generation
            .policy
            .decide(self.params.vendor, device, &access, &context);
        let audit_failed =
            !self.shared.audit.is_writable() && self.needs_working_audit(&request, &decision);

        if let Decision::Deny { reason } = &decision {
            self.detector.denial(
                context.instant,
                Some(reason),
                is_write(&request),
                self.generation.policy.detect(),
                &mut self.findings,
            );
        } else if audit_failed {
            self.detector.denial(
                context.instant,
                None,
                true,
                self.generation.policy.detect(),
                &mut self.findings,
            );
        }
        // Boxed because a forwarded request's event moves through several
        // calls and the in-flight set: a pointer is cheaper to move than
        // the event.
        let mut event = Box::new(self.decision_event(header, &request, Some(device)));
        let exception = match &decision {
            _ if audit_failed => {
                event.decision = Some(DecisionKind::Deny);
                event.reason = Some(
                    "audit log not writable; writes and state-gated requests are denied".to_owned(),
                );
                Some(ExceptionCode::IllegalFunction)
            }
            Decision::Allow { rule } => {
                event.decision = Some(DecisionKind::Allow);
                event.rule = Some(self.generation.policy.shared_rule_label(*rule));
                None
            }
            Decision::Deny { reason } => {
                event.decision = Some(DecisionKind::Deny);
                event.reason = Some(reason.to_string());
                // A policy code sluice cannot send becomes 01, the
                // conservative answer for a denial.
                let code = match secure {
                    true => ExceptionCode::IllegalFunction,
                    false => ExceptionCode::from_code(reason.exception_code())
                        .unwrap_or(ExceptionCode::IllegalFunction),
                };
                Some(code)
            }
        };

        match (exception, mode) {
            (None, _) => self.pass(header, request, device, event, true).await,
            // Monitor mode never forwards around a broken audit log, because
            // the forwarded request could not be recorded.
            (Some(_), Mode::Monitor) if !audit_failed => {
                event.enforced = Some(false);
                self.pass(header, request, device, event, false).await
            }
            (Some(code), _) => {
                self.generation.instruments.record_request(
                    self.listener,
                    self.params.vendor,
                    device,
                    function,
                    false,
                    None,
                );
                self.enforce_denial(header, function, code, on_deny, *event)
                    .await
            }
        }
    }

    /// Serves a request that may go on from the device's mirror, forwards
    /// it, or denies it, as `mirror::route` decides.
    async fn pass(
        &mut self,
        header: Header,
        request: Request,
        device: DeviceId,
        mut event: Box<Event>,
        allowed: bool,
    ) -> Step {
        // Most devices have no mirror: skip the clock read and the response
        // buffer on that path, where `mirror::route` would forward anyway.
        if !self.plan().mirror_only && self.generation.mirror.device(device).is_none() {
            return Step::Forward(self.job(header, request, device, event, allowed));
        }
        let mut pdu = [0u8; frame::MAX_PDU_LEN];
        let route = mirror::route(
            &self.generation.mirror,
            device,
            &request,
            self.plan().mirror_only,
            Instant::now(),
            &mut pdu,
        );
        let function = request.function_code();
        let (code, reason) = match route {
            Route::Forward => {
                return Step::Forward(self.job(header, request, device, event, allowed))
            }
            Route::Served { len } => {
                frame::encode_response(header, &pdu[..len], &mut self.output);
                event.served_by = Some(mirror::SERVED_BY);
                self.count_unforwarded(device, function, allowed);
                self.emit(*event).await;
                return Step::Continue;
            }
            Route::Refused {
                code,
                deny: false,
                reason,
            } => {
                event.served_by = Some(mirror::SERVED_BY);
                event.detail = Some(serde_json::json!({ "mirror": reason }));
                self.count_unforwarded(device, function, allowed);
                self.answer_exception(header, function, code, *event).await;
                return Step::Continue;
            }
            Route::Refused { code, reason, .. } => (code, reason),
        };

        // A mirror_only listener denies what the mirror cannot serve, also
        // in monitor mode, because nothing may reach the device.
        self.detector.denial(
            Instant::now(),
            None,
            is_write(&request),
            self.generation.policy.detect(),
            &mut self.findings,
        );
        event.decision = Some(DecisionKind::Deny);
        event.enforced = None;
        event.reason = Some(match event.reason.take() {
            Some(rules) => format!("{reason}; rules: {rules}"),
            None => reason,
        });
        self.count_unforwarded(device, function, false);
        let on_deny = self.plan().on_deny;
        self.enforce_denial(header, function, code, on_deny, *event)
            .await
    }

    /// Counts a request whose response came without the device.
    fn count_unforwarded(&self, device: DeviceId, function: u8, allowed: bool) {
        self.generation.instruments.record_request(
            self.listener,
            self.params.vendor,
            device,
            function,
            allowed,
            None,
        );
    }

    async fn enforce_denial(
        &mut self,
        header: Header,
        function: u8,
        code: ExceptionCode,
        on_deny: OnDeny,
        event: Event,
    ) -> Step {
        match on_deny {
            OnDeny::Exception => {
                self.answer_exception(header, function, code, event).await;
                Step::Continue
            }
            OnDeny::Drop => {
                self.emit(event).await;
                Step::Continue
            }
            OnDeny::Close => {
                self.emit(event).await;
                Step::Close(CloseReason::DenyClose)
            }
        }
    }

    /// Returns true when `request` may go through only while the audit log
    /// can record it: writes, and requests a state-gated rule allowed.
    fn needs_working_audit(&self, request: &Request, decision: &Decision) -> bool {
        if is_write(request) {
            return true;
        }
        match decision {
            Decision::Allow { rule } => self.generation.policy.rule_depends_on_state(*rule),
            Decision::Deny { .. } => false,
        }
    }

    fn job(
        &self,
        header: Header,
        request: Request,
        device: DeviceId,
        event: Box<Event>,
        allowed: bool,
    ) -> Job {
        let upstream_unit = self.generation.policy.devices()[device].unit;
        let expects_response = expects_response(upstream_unit, &request);
        Job {
            awaiting: Awaiting {
                header,
                function: request.function_code(),
                event,
                tally: Tally {
                    instruments: self.generation.instruments.clone(),
                    listener: self.listener,
                    vendor: self.params.vendor,
                    device,
                    allowed,
                    forwarded_at: Instant::now(),
                },
            },
            call: Call {
                pool: self.generation.pool(device).clone(),
                upstream_unit,
                request,
                expects_response,
            },
        }
    }

    /// Answers a frame whose PDU broke the specification; it never reaches a PLC.
    async fn reject_invalid(
        &mut self,
        header: Header,
        function: u8,
        exception: ExceptionCode,
        error: &frame::PduError,
    ) {
        let mut event = self.base_event(EventType::Decision);
        event.modbus = Some(ModbusInfo {
            unit: header.unit,
            function,
            function_name: super::pdu::function_name_of(function),
            address: None,
            quantity: None,
            transaction_id: header.transaction_id,
            sub_function: None,
            exception: None,
        });
        event.decision = Some(DecisionKind::Deny);
        event.reason = Some(format!("malformed request: {error}"));
        self.answer_exception(header, function, exception, event)
            .await;
        self.record_protocol_anomaly("malformed_request", error.to_string())
            .await;
    }

    async fn answer_exception(
        &mut self,
        header: Header,
        function: u8,
        code: ExceptionCode,
        mut event: Event,
    ) {
        frame::encode_exception(header, function, code, &mut self.output);
        if let Some(modbus) = event.modbus.as_mut() {
            modbus.exception = Some(code.code());
        }
        self.emit(event).await;
    }

    async fn complete(&mut self, done: Completed) {
        let Completed { key, outcome } = done;
        let Awaiting {
            header,
            function,
            mut event,
            tally,
        } = self.awaiting.remove(key);
        tally.record(function, &outcome);
        let failure = match &outcome {
            Ok(Some(pdu)) if pdu.len() == 2 && pdu[0] & 0x80 != 0 => {
                Some(Failure::Exception(pdu[1]))
            }
            Ok(_) => None,
            Err(error) => Some(Failure::Gateway(error.exception_code().code())),
        };
        if let (Some(failure), Some(device)) = (failure, event.device.clone()) {
            self.shared.detect.failure(
                &device,
                Instant::now(),
                failure,
                self.generation.policy.detect(),
                &mut self.findings,
            );
        }
        match outcome {
            Ok(Some(pdu)) => frame::encode_response(header, &pdu, &mut self.output),
            Ok(None) => {}
            Err(error) => {
                let code = error.exception_code();
                frame::encode_exception(header, function, code, &mut self.output);
                if let Some(modbus) = event.modbus.as_mut() {
                    modbus.exception = Some(code.code());
                }
                event.detail = Some(serde_json::json!({ "upstream": error.to_string() }));
            }
        }
        let device = event.device.clone();
        self.emit(*event).await;
        // Device anomalies never count towards a vendor's containment.
        self.raise_findings(device).await;
    }

    /// Records the anomalies the detectors raised and counts them against
    /// the vendor's containment. Returns true when the vendor was
    /// quarantined, so this session must close.
    async fn raise_findings(&mut self, device: Option<Arc<str>>) -> bool {
        if self.findings.is_empty() {
            return false;
        }
        let mut findings = std::mem::take(&mut self.findings);
        let containment = self
            .generation
            .policy
            .on_anomaly(self.params.vendor)
            .cloned();
        let mut quarantined = false;
        for finding in findings.drain(..) {
            let kind = finding.kind;
            let mut event = self.anomaly_event(finding);
            event.device = device.clone();
            self.emit(event).await;
            if let Some(containment) = containment.as_deref() {
                if !quarantined
                    && self.shared.detect.strike(
                        &self.params.vendor_name,
                        kind,
                        Instant::now(),
                        containment,
                    )
                {
                    let mut event = self.base_event(EventType::Anomaly);
                    event.session_id = None;
                    contain(
                        &self.shared,
                        &self.params.vendor_name,
                        containment,
                        kind,
                        event,
                    )
                    .await;
                    quarantined = true;
                }
            }
        }
        self.findings = findings;
        quarantined
    }

    fn anomaly_event(&self, finding: Finding) -> Event {
        let mut event = Event::anomaly(finding.kind, finding.severity, finding.detail);
        event.listener = Some(self.params.listener.clone());
        event.session_id = Some(self.params.id);
        event.vendor = Some(self.params.vendor_name.clone());
        event.src_ip = Some(self.params.peer.ip());
        event.src_port = Some(self.params.peer.port());
        event
    }

    fn base_event(&self, event_type: EventType) -> Event {
        let mut event = Event::new(event_type);
        event.listener = Some(self.params.listener.clone());
        event.session_id = Some(self.params.id);
        event.vendor = Some(self.params.vendor_name.clone());
        event.src_ip = Some(self.params.peer.ip());
        event.src_port = Some(self.params.peer.port());
        event
    }

    fn decision_event(&self, header: Header, request: &Request, device: Option<DeviceId>) -> Event {
        let mut event = self.base_event(EventType::Decision);
        event.device = device.map(|device| self.generation.device_name(device).clone());
        event.modbus = Some(modbus_info(header, request));
        event
    }

    async fn emit(&self, event: Event) {
        if let Err(error) = self.shared.emitter.emit(event).await {
            tracing::error!(%error, "event not recorded");
        }
    }

    async fn record_open(&self) {
        let mut event = self.base_event(EventType::Session);
        event.action = Some("open");
        event.tls = self.params.certificate.clone();
        self.emit(event).await;
    }

    async fn record_close(&self, reason: CloseReason) {
        let mut event = self.base_event(EventType::Session);
        event.action = Some("close");
        let text = match (reason, self.params.close_reason.get()) {
            (CloseReason::Closed, Some(given)) => given,
            _ => reason.as_str(),
        };
        event.reason = Some(text.to_owned());
        event.detail = Some(serde_json::json!({
            "requests": self.params.requests.load(Ordering::Relaxed),
        }));
        self.emit(event).await;
    }

    async fn record_frame_error(&self, error: &FrameError) {
        let kind = match error {
            FrameError::ProtocolId { .. } => "bad_protocol_id",
            FrameError::Length { .. } => "bad_length",
            FrameError::ExceptionFunction { .. } => "exception_function_in_request",
        };
        tracing::debug!(%error, "closing session on framing error");
        self.record_protocol_anomaly(kind, error.to_string()).await;
    }

    async fn record_protocol_anomaly(&self, kind: &'static str, detail: String) {
        let mut event = Event::anomaly(kind, Severity::Medium, detail);
        event.listener = Some(self.params.listener.clone());
        event.session_id = Some(self.params.id);
        event.vendor = Some(self.params.vendor_name.clone());
        event.src_ip = Some(self.params.peer.ip());
        event.src_port = Some(self.params.peer.port());
        self.emit(event).await;
    }
}

/// Quarantines `vendor` after it raised `containment.count` anomalies of
/// its kinds, closes all of its sessions and records `vendor_quarantined`.
/// `event` carries the listener and source fields of the anomaly event.
pub(crate) async fn contain(
    shared: &Shared,
    vendor: &Arc<str>,
    containment: &OnAnomalyConfig,
    kind: &str,
    mut event: Event,
) {
    let until = containment.quarantine.map(|length| Instant::now() + length);
    if let Err(error) = shared.quarantine.quarantine(vendor, until) {
        tracing::error!(%error, %vendor, "quarantine not stored");
    }
    for session in shared.sessions.list() {
        if session.vendor == *vendor {
            session.close_because("vendor quarantined");
        }
    }
    let length = match containment.quarantine {
        Some(length) => format!("for {} ms", length.as_millis()),
        None => "until released".to_owned(),
    };
    event.anomaly = Event::anomaly(
        "vendor_quarantined",
        Severity::Critical,
        format!(
            "vendor {vendor} quarantined {length} after {} anomalies within {} ms; last: {kind}",
            containment.count,
            containment.window.as_millis()
        ),
    )
    .anomaly;
    event.vendor = Some(vendor.clone());
    if let Err(error) = shared.emitter.emit(event).await {
        tracing::error!(%error, "event not recorded");
    }
}

/// Builds the view of a request that the detectors use.
fn observe(unit: u8, request: &Request) -> Observed {
    let read = match *request {
        Request::ReadCoils { address, quantity }
        | Request::ReadDiscreteInputs { address, quantity }
        | Request::ReadHoldingRegisters { address, quantity }
        | Request::ReadInputRegisters { address, quantity } => {
            Some(detect::Read { address, quantity })
        }
        Request::ReadWriteMultipleRegisters {
            read_address,
            read_quantity,
            ..
        } => Some(detect::Read {
            address: read_address,
            quantity: read_quantity,
        }),
        _ => None,
    };
    Observed {
        unit,
        function: request.function_code(),
        sub_function: match request {
            Request::Diagnostics { sub_function, .. } => Some(*sub_function),
            _ => None,
        },
        undefined: matches!(request, Request::Raw { .. }),
        write: is_write(request),
        read,
    }
}

/// Returns true for a read that found the end of the client's stream.
fn is_end_of_stream(read: &std::io::Result<usize>) -> bool {
    match read {
        Ok(count) => *count == 0,
        Err(error) => error.kind() == std::io::ErrorKind::UnexpectedEof,
    }
}

/// The upstream calls of one session that wait for a response. The first
/// call is kept in a slot allocated once per session. Only further calls go
/// into a `FuturesUnordered`, which allocates every entry. Most clients wait
/// for each response before they send the next request, so their requests
/// never allocate a future.
struct InFlight<F> {
    first: Pin<Box<Option<F>>>,
    rest: FuturesUnordered<F>,
}

impl<F: Future> InFlight<F> {
    fn new() -> InFlight<F> {
        InFlight {
            first: Box::pin(None),
            rest: FuturesUnordered::new(),
        }
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, call: F) {
        if self.first.is_some() {
            self.rest.push(call);
        } else {
            self.first.set(Some(call));
        }
    }
}

impl<F: Future> Stream for InFlight<F> {
    type Item = F::Output;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<F::Output>> {
        if let Some(call) = self.first.as_mut().as_pin_mut() {
            if let Poll::Ready(done) = call.poll(cx) {
                self.first.set(None);
                return Poll::Ready(Some(done));
            }
        }
        match self.rest.poll_next_unpin(cx) {
            Poll::Ready(Some(done)) => Poll::Ready(Some(done)),
            // An empty set ends the stream only when the slot is empty too.
            Poll::Ready(None) if self.first.is_none() => Poll::Ready(None),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

/// A request from outside the session to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    /// Stop reading requests, answer those in flight, then close.
    Drain,
    /// Close at once.
    Close,
}

/// Relays the session's cancellation tokens into a channel of its own. The
/// drain token is shared by every session and checking a token locks its
/// mutex, so the session loop polls this lock-free channel instead, and only
/// this task waits on the tokens.
fn watch_control(close: CancellationToken, drain: CancellationToken) -> mpsc::Receiver<Control> {
    let (sender, receiver) = mpsc::channel(2);
    tokio::spawn(async move {
        tokio::select! {
            _ = sender.closed() => return,
            _ = close.cancelled() => {
                let _ = sender.send(Control::Close).await;
                return;
            }
            _ = drain.cancelled() => {
                let _ = sender.send(Control::Drain).await;
            }
        }
        tokio::select! {
            _ = sender.closed() => {}
            _ = close.cancelled() => {
                let _ = sender.send(Control::Close).await;
            }
        }
    });
    receiver
}

/// Sends one call to its device and waits for the response.
async fn forward(call: Call, key: usize) -> Completed {
    let Call {
        pool,
        upstream_unit,
        request,
        expects_response,
    } = call;
    let outcome = if expects_response {
        pool.call(upstream_unit, &request).await.map(Some)
    } else {
        pool.send_without_response(upstream_unit, &request)
            .await
            .map(|()| None)
    };
    Completed { key, outcome }
}

/// Returns true when the specification has the device respond to `request`: force listen
/// only (FC 8, sub-function 4) and broadcast writes to unit 0 get no response.
fn expects_response(upstream_unit: u8, request: &Request) -> bool {
    match request {
        Request::Diagnostics {
            sub_function: 4, ..
        } => false,
        _ if upstream_unit == 0 => !is_write(request),
        _ => true,
    }
}

fn is_write(request: &Request) -> bool {
    matches!(
        request,
        Request::WriteSingleCoil { .. }
            | Request::WriteSingleRegister { .. }
            | Request::WriteMultipleCoils { .. }
            | Request::WriteMultipleRegisters { .. }
            | Request::WriteFileRecord { .. }
            | Request::MaskWriteRegister { .. }
            | Request::ReadWriteMultipleRegisters { .. }
    )
}

fn modbus_info(header: Header, request: &Request) -> ModbusInfo {
    let (address, quantity) = address_and_quantity(request);
    ModbusInfo {
        unit: header.unit,
        function: request.function_code(),
        function_name: request.function_name(),
        address,
        quantity,
        transaction_id: header.transaction_id,
        sub_function: match request {
            Request::Diagnostics { sub_function, .. } => Some(*sub_function),
            Request::EncapsulatedInterface { mei_type, .. } => Some(u16::from(*mei_type)),
            _ => None,
        },
        exception: None,
    }
}

/// Returns the first address and the count a request touches; FC 23 reports its
/// write part, which is what a rule on writes is about.
fn address_and_quantity(request: &Request) -> (Option<u16>, Option<u16>) {
    match *request {
        Request::ReadCoils { address, quantity }
        | Request::ReadDiscreteInputs { address, quantity }
        | Request::ReadHoldingRegisters { address, quantity }
        | Request::ReadInputRegisters { address, quantity }
        | Request::WriteMultipleCoils {
            address, quantity, ..
        }
        | Request::WriteMultipleRegisters {
            address, quantity, ..
        } => (Some(address), Some(quantity)),
        Request::WriteSingleCoil { address, .. }
        | Request::WriteSingleRegister { address, .. }
        | Request::MaskWriteRegister { address, .. }
        | Request::ReadFifoQueue { address } => (Some(address), Some(1)),
        Request::ReadWriteMultipleRegisters {
            write_address,
            write_quantity,
            ..
        } => (Some(write_address), Some(write_quantity)),
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn force_listen_only_expects_no_response() {
        let request = Request::Diagnostics {
            sub_function: 4,
            data: Bytes::from_static(&[0, 0]),
        };
        assert!(!expects_response(1, &request));
    }

    #[test]
    fn broadcast_write_expects_no_response() {
        let request = Request::WriteSingleRegister {
            address: 1,
            value: 2,
        };
        assert!(!expects_response(0, &request));
        assert!(expects_response(1, &request));
    }

    #[test]
    fn broadcast_read_expects_response() {
        let request = Request::ReadHoldingRegisters {
            address: 0,
            quantity: 1,
        };
        assert!(expects_response(0, &request));
    }

    async fn answer(receiver: tokio::sync::oneshot::Receiver<u32>) -> u32 {
        receiver.await.unwrap()
    }

    #[tokio::test]
    async fn in_flight_yields_calls_as_completed() {
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<u32>();
        let (second_tx, second_rx) = tokio::sync::oneshot::channel::<u32>();
        let (third_tx, third_rx) = tokio::sync::oneshot::channel::<u32>();
        let mut in_flight = InFlight::new();
        assert!(in_flight.is_empty());
        for receiver in [first_rx, second_rx, third_rx] {
            in_flight.push(answer(receiver));
        }
        assert_eq!(in_flight.len(), 3);
        // No call has completed, so the stream is pending, not ended.
        assert!(futures_util::FutureExt::now_or_never(in_flight.next()).is_none());

        second_tx.send(2).unwrap();
        assert_eq!(in_flight.next().await, Some(2));
        assert_eq!(in_flight.len(), 2);
        first_tx.send(1).unwrap();
        assert_eq!(in_flight.next().await, Some(1));
        // The slot is free again and takes the next call.
        let (fourth_tx, fourth_rx) = tokio::sync::oneshot::channel::<u32>();
        in_flight.push(answer(fourth_rx));
        assert!(in_flight.first.is_some());
        assert_eq!(in_flight.len(), 2);
        fourth_tx.send(4).unwrap();
        third_tx.send(3).unwrap();
        let mut rest = vec![
            in_flight.next().await.unwrap(),
            in_flight.next().await.unwrap(),
        ];
        rest.sort_unstable();
        assert_eq!(rest, [3, 4]);
        assert!(in_flight.is_empty());
        assert_eq!(in_flight.next().await, None);
    }

    #[test]
    fn read_write_registers_reports_write_part() {
        let request = Request::ReadWriteMultipleRegisters {
            read_address: 10,
            read_quantity: 2,
            write_address: 100,
            write_quantity: 1,
            values: Bytes::from_static(&[0, 7]),
        };
        assert_eq!(address_and_quantity(&request), (Some(100), Some(1)));
    }
}
