//! The direct path of a pool that keeps one request in flight per
//! connection. A slot's task parks its plain connection here while it is
//! idle. A caller that finds it parked writes its request and reads the
//! response on it itself, which saves the two task wake-ups of a hand-over
//! through the slot's channel. The caller applies the slot task's rules: the
//! same deadline, transaction ids, response checks, late-response reports and
//! reset after a bad response. Every other request goes through the channel,
//! and the slot's task takes the connection back to serve it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use super::{
    check, io_reason, modbus_info, Admission, CloseReason, DeviceState, End, InFlight, Job,
    PoolInner, Resume, SlotState, Transactions, UpstreamError, Worker, READ_CHUNK,
};
use crate::events::Severity;
use crate::modbus::frame::{self, Header};
use crate::modbus::pdu::Request;

/// Initial size of a parked connection's request buffer, in bytes: one
/// maximal Modbus/TCP frame.
const WRITE_CHUNK: usize = 260;

/// A slot's idle plain connection and the state that moves with it.
pub(super) struct Parked {
    stream: TcpStream,
    read_buf: BytesMut,
    write_buf: BytesMut,
    transactions: Transactions,
    /// The response deadline. It moves only when it fired or a new deadline
    /// is earlier, because re-arming it for every request would take the
    /// timer driver's lock each time. A fire before the current request's
    /// deadline re-arms it.
    timer: Pin<Box<Sleep>>,
    /// A written request whose caller stopped waiting for its response.
    /// Only the slot's task takes a connection that has one, so that a
    /// second request never joins it on the wire.
    abandoned: Option<InFlight>,
}

/// The holder of a slot's plain connection.
pub(super) enum Lending {
    /// The slot's task has the connection, or the slot has none.
    Held,
    /// The connection is idle and waits for a caller or the slot's task.
    Parked(Box<Parked>),
    /// A caller is exchanging one request on the connection.
    Lent,
    /// A caller found the connection closed, or reset it. The slot's task
    /// takes back the transaction ids and connects again.
    Lost(Transactions),
}

fn lock_lending(state: &SlotState) -> MutexGuard<'_, Lending> {
    // A panic cannot leave the enum half-changed: every change is one
    // assignment.
    state
        .lending
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How far a borrowed connection got with its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Nothing written yet, or the response received.
    Clear,
    /// Part of the request may be on the wire.
    Writing,
    /// The request with this transaction id awaits its response.
    Awaiting(u16),
    /// The connection is closed or must be reset.
    Lost,
}

/// A parked connection in a caller's hands. Dropping it gives the
/// connection back to its slot, also when the caller stops waiting.
pub(super) struct Borrowed<'a> {
    pool: &'a PoolInner,
    slot: usize,
    parked: Option<Box<Parked>>,
    unit: u8,
    request: &'a Request,
    deadline: Instant,
    progress: Progress,
    _admission: Admission<'a>,
}

impl PoolInner {
    /// Takes a parked connection of an idle slot for one request, when the
    /// pool keeps one request in flight per connection and has room for it.
    pub(super) fn borrow_parked<'a>(
        &'a self,
        unit: u8,
        request: &'a Request,
    ) -> Option<Borrowed<'a>> {
        let settings = &self.device.settings;
        if settings.max_in_flight != 1 || self.closed.load(Ordering::Acquire) {
            return None;
        }
        // A connection whose task runs on the caller's thread comes first:
        // its socket's readiness then wakes the caller without a hand-over
        // between threads.
        let caller_thread = crate::modbus::session_threads::current().unwrap_or(usize::MAX);
        let slots = || self.slots.iter().enumerate();
        let near =
            slots().filter(|(_, slot)| slot.state.home.load(Ordering::Relaxed) == caller_thread);
        let far =
            slots().filter(|(_, slot)| slot.state.home.load(Ordering::Relaxed) != caller_thread);
        for (index, slot) in near.chain(far) {
            let state = &slot.state;
            if state.load.load(Ordering::Acquire) != 0 {
                continue;
            }
            // A slot whose lock is taken is busy changing hands.
            let Ok(mut lending) = state.lending.try_lock() else {
                continue;
            };
            let parked = match std::mem::replace(&mut *lending, Lending::Lent) {
                Lending::Parked(parked) if parked.abandoned.is_none() => parked,
                other => {
                    *lending = other;
                    continue;
                }
            };
            if self.pending.fetch_add(1, Ordering::AcqRel) >= settings.max_queue {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                *lending = Lending::Parked(parked);
                return None;
            }
            state.load.fetch_add(1, Ordering::AcqRel);
            drop(lending);
            return Some(Borrowed {
                pool: self,
                slot: index,
                parked: Some(parked),
                unit,
                request,
                deadline: Instant::now() + settings.timeout,
                progress: Progress::Clear,
                _admission: Admission {
                    pool: self,
                    slot: index,
                },
            });
        }
        None
    }
}

impl Borrowed<'_> {
    /// Writes the request and waits for its response. Returns `None` when
    /// the connection turned out closed before anything was written, so the
    /// caller sends the request through the channel and the slot's task
    /// connects again.
    pub(super) async fn exchange(mut self) -> Option<Result<Bytes, UpstreamError>> {
        let device = &*self.pool.device;
        let parked = self.parked.as_deref_mut()?;
        if let Err(reason) = settle(parked, device).await {
            tracing::debug!(%reason, "parked upstream connection closed");
            self.progress = Progress::Lost;
            return None;
        }

        let transaction_id = parked.transactions.allocate(|_| false);
        let header = Header {
            transaction_id,
            unit: self.unit,
        };
        parked.write_buf.clear();
        frame::encode_request(header, self.request, &mut parked.write_buf);
        self.progress = Progress::Writing;
        let write = parked.stream.write_all(&parked.write_buf);
        match tokio::time::timeout_at(self.deadline, write).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                self.progress = Progress::Lost;
                return Some(Err(device.closed(io_reason(&error))));
            }
            // NOTE: the slot's task keeps a connection whose device stopped
            // taking bytes and finishes the frame later, while this path
            // closes it, because a caller cannot finish the write.
            Err(_) => {
                self.progress = Progress::Lost;
                return Some(Err(device.timeout()));
            }
        }

        self.progress = Progress::Awaiting(transaction_id);
        let awaited = await_response(
            parked,
            device,
            self.unit,
            self.request,
            transaction_id,
            self.deadline,
        )
        .await;
        match awaited {
            Ok(result) => {
                self.progress = Progress::Clear;
                Some(result)
            }
            Err(error) => {
                self.progress = Progress::Lost;
                Some(Err(error))
            }
        }
    }
}

impl Drop for Borrowed<'_> {
    fn drop(&mut self) {
        let Some(mut parked) = self.parked.take() else {
            return;
        };
        let state = &self.pool.slots[self.slot].state;
        let lending = match self.progress {
            Progress::Writing | Progress::Lost => {
                Lending::Lost(std::mem::take(&mut parked.transactions))
            }
            // A pool that shut down closes the connection.
            _ if self.pool.closed.load(Ordering::Acquire) => Lending::Held,
            Progress::Awaiting(transaction_id) => {
                parked.abandoned = Some(self.abandon(transaction_id));
                Lending::Parked(parked)
            }
            Progress::Clear => Lending::Parked(parked),
        };
        *lock_lending(state) = lending;
        state.returned.notify_one();
    }
}

impl Borrowed<'_> {
    /// Builds the in-flight entry of a request whose caller left, so that
    /// the slot's task times it out or discards its response as it would
    /// for a request of its own.
    fn abandon(&self, transaction_id: u16) -> InFlight {
        let (reply, _) = oneshot::channel();
        InFlight {
            transaction_id,
            job: Job {
                unit: self.unit,
                request: self.request.clone(),
                expects_response: true,
                deadline: self.deadline,
                reply,
            },
        }
    }
}

/// Reads until the response with `transaction_id` arrives or `deadline`
/// passes. The inner result is the caller's result on a connection that
/// stays usable. The outer error is the caller's error when the connection
/// is lost.
async fn await_response(
    parked: &mut Parked,
    device: &DeviceState,
    unit: u8,
    request: &Request,
    transaction_id: u16,
    deadline: Instant,
) -> Result<Result<Bytes, UpstreamError>, UpstreamError> {
    loop {
        while let Some(response) = decode_or_reset(&mut parked.read_buf, device).await? {
            if response.header.transaction_id != transaction_id {
                device
                    .report_unmatched(&parked.transactions, &response)
                    .await;
                continue;
            }
            let received_unit = response.header.unit;
            return match check(unit, request, response) {
                Ok(pdu) => Ok(Ok(pdu)),
                Err(error) => {
                    let detail = format!("connection reset: {error}");
                    let modbus = modbus_info(request, transaction_id, received_unit);
                    device
                        .emit_anomaly("bad_response", Severity::Medium, detail, Some(modbus))
                        .await;
                    Err(error)
                }
            };
        }

        parked.read_buf.reserve(READ_CHUNK);
        let Parked {
            stream,
            read_buf,
            timer,
            ..
        } = &mut *parked;
        if timer.is_elapsed() || deadline < timer.deadline() {
            timer.as_mut().reset(deadline);
        }
        tokio::select! {
            biased;
            read = stream.read_buf(read_buf) => match read {
                Ok(0) => return Err(device.closed(CloseReason::Eof)),
                Ok(_) => {}
                Err(error) => return Err(device.closed(io_reason(&error))),
            },
            () = timer.as_mut() => {
                if Instant::now() < deadline {
                    timer.as_mut().reset(deadline);
                    continue;
                }
                tracing::debug!(transaction_id, "request timed out; transaction id retired");
                parked.transactions.retire(transaction_id);
                return Ok(Err(device.timeout()));
            }
        }
    }
}

/// Decodes the next complete response in `read_buf`. An invalid frame is
/// recorded as an anomaly and returned as the error that resets the
/// connection.
async fn decode_or_reset(
    read_buf: &mut BytesMut,
    device: &DeviceState,
) -> Result<Option<frame::RawResponse>, UpstreamError> {
    match frame::decode_response(read_buf) {
        Ok(found) => Ok(found),
        Err(error) => {
            let detail = format!("connection reset after invalid response frame: {error}");
            device
                .emit_anomaly("bad_response", Severity::Medium, detail, None)
                .await;
            Err(device.closed(CloseReason::Framing { error }))
        }
    }
}

/// Handles what arrived while the connection was parked: responses that no
/// request awaits are recorded and discarded, and an end of stream, an
/// error or an invalid frame means the connection is gone.
async fn settle(parked: &mut Parked, device: &DeviceState) -> Result<(), CloseReason> {
    // The readiness that the runtime recorded costs no system call. A read
    // that came up short cleared it, so it is set only by new data or by the
    // end of the stream.
    let ready = parked
        .stream
        .poll_read_ready(&mut Context::from_waker(Waker::noop()));
    let ended = match ready {
        Poll::Pending => None,
        Poll::Ready(Err(error)) => Some(io_reason(&error)),
        Poll::Ready(Ok(())) => read_available(parked),
    };
    loop {
        match decode_or_reset(&mut parked.read_buf, device).await {
            Ok(Some(response)) => {
                device
                    .report_unmatched(&parked.transactions, &response)
                    .await
            }
            Ok(None) => break,
            Err(UpstreamError::Closed { reason, .. }) => return Err(reason),
            Err(_) => return Err(CloseReason::Reset),
        }
    }
    ended.map_or(Ok(()), Err)
}

/// Reads without waiting until the socket has nothing more. Returns why the
/// connection ended, if it did.
fn read_available(parked: &mut Parked) -> Option<CloseReason> {
    loop {
        parked.read_buf.reserve(READ_CHUNK);
        match parked.stream.try_read_buf(&mut parked.read_buf) {
            Ok(0) => return Some(CloseReason::Eof),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return None,
            Err(error) => return Some(io_reason(&error)),
        }
    }
}

impl Worker {
    /// Serves a plain connection until it is lost or the pool stops. With
    /// one request in flight per connection, the connection is parked for
    /// callers whenever it is idle, and taken back when a request arrives
    /// through the channel.
    pub(super) async fn hold_plain(&mut self, stream: TcpStream) -> End {
        let lendable = self.device.settings.max_in_flight == 1;
        let mut parked = Box::new(Parked {
            stream,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: BytesMut::with_capacity(WRITE_CHUNK),
            transactions: Transactions::default(),
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
            abandoned: None,
        });
        loop {
            let resume = Resume {
                read_buf: std::mem::take(&mut parked.read_buf),
                in_flight: parked.abandoned.take(),
            };
            let (reader, writer) = parked.stream.split();
            match self.serve(reader, writer, resume, lendable).await {
                End::Idle(read_buf) => parked.read_buf = read_buf,
                end => return end,
            }
            parked.transactions = std::mem::take(&mut self.transactions);
            *lock_lending(&self.slot) = Lending::Parked(parked);
            parked = match self.reclaim().await {
                Ok(parked) => parked,
                Err(end) => return end,
            };
        }
    }

    /// Waits for a request while the connection is parked, then takes the
    /// connection back, waiting while a caller uses it.
    async fn reclaim(&mut self) -> Result<Box<Parked>, End> {
        if self.waiting.is_empty() && !self.wait_for_job().await {
            self.unpark();
            return Err(End::Stopped);
        }
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(timer);
        loop {
            let taken = {
                let mut lending = lock_lending(&self.slot);
                match &*lending {
                    Lending::Lent => None,
                    _ => Some(std::mem::replace(&mut *lending, Lending::Held)),
                }
            };
            match taken {
                Some(Lending::Parked(parked)) => return self.take_back(parked).await,
                Some(Lending::Lost(transactions)) => {
                    self.transactions = transactions;
                    return Err(End::Lost);
                }
                // Only a caller that found the pool shut down leaves it so.
                Some(Lending::Held) => return Err(End::Lost),
                Some(Lending::Lent) | None => {}
            }

            let deadline = self.waiting.front().map(|job| job.deadline);
            if let Some(deadline) = deadline {
                timer.as_mut().reset(deadline);
            }
            let room = self.has_room(0);
            tokio::select! {
                _ = self.slot.returned.notified() => {}
                job = self.jobs.recv(), if room => match job {
                    Some(job) => self.waiting.push_back(job),
                    None => return Err(End::Stopped),
                },
                _ = &mut timer, if deadline.is_some() => self.expire_waiting(Instant::now()),
                _ = self.shutdown.recv() => return Err(End::Stopped),
            }
        }
    }

    /// Resumes a connection that was parked: first handles what arrived
    /// meanwhile, unless an abandoned request awaits its response, which
    /// `serve` then matches.
    async fn take_back(&mut self, mut parked: Box<Parked>) -> Result<Box<Parked>, End> {
        let settled = match parked.abandoned {
            Some(_) => Ok(()),
            None => settle(&mut parked, &self.device).await,
        };
        self.transactions = std::mem::take(&mut parked.transactions);
        match settled {
            Ok(()) => Ok(parked),
            Err(reason) => {
                tracing::debug!(%reason, "parked upstream connection closed");
                Err(End::Lost)
            }
        }
    }

    /// Closes a parked connection when the task stops.
    fn unpark(&mut self) {
        let mut lending = lock_lending(&self.slot);
        if let Lending::Parked(parked) = &mut *lending {
            self.transactions = std::mem::take(&mut parked.transactions);
            *lending = Lending::Held;
        }
    }
}
