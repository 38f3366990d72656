//! Mirror pollers: one task per mirror block reads the block's pieces
//! through the device's pool every `poll_ms` and stores them in the
//! generation's mirror store. A failed read marks its piece stale and feeds
//! the device failure detectors, and every change of a block between fresh
//! and stale is recorded as a `state` event.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::config::StateKind;
use crate::detect::Failure;
use crate::events::{Event, EventType};
use crate::mirror::{DeviceMirror, MirrorBlock};
use crate::modbus::frame::EXCEPTION_BIT;
use crate::modbus::generation::{Generation, Shared};
use crate::modbus::pdu::Request;
use crate::policy::DeviceId;

use super::read_request;

/// Starts one poller per block of every device mirror of `generation`.
pub(super) fn start(
    shared: &Arc<Shared>,
    generation: &Arc<Generation>,
    cancel: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    let blocks: Vec<(DeviceId, usize)> = generation
        .mirror
        .iter()
        .flat_map(|(device, mirror)| (0..mirror.blocks().len()).map(move |block| (device, block)))
        .collect();
    blocks
        .into_iter()
        .map(|(device, block)| {
            tokio::spawn(poll_block(
                shared.clone(),
                generation.clone(),
                device,
                block,
                cancel.clone(),
            ))
        })
        .collect()
}

/// The reason one poll of a block did not read every piece.
struct PollFailure {
    failure: Failure,
    reason: String,
}

async fn poll_block(
    shared: Arc<Shared>,
    generation: Arc<Generation>,
    device: DeviceId,
    index: usize,
    cancel: CancellationToken,
) {
    let Some(mirror) = generation.mirror.device(device) else {
        return;
    };
    let block = &mirror.blocks()[index];
    let kind = block.config().kind;
    let requests: Vec<Request> = block
        .pieces()
        .iter()
        .map(|piece| read_request(kind, piece.start, piece.count))
        .collect();
    let mut ticker = tokio::time::interval(block.config().poll);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);

    loop {
        let failure = tokio::select! {
            _ = cancel.cancelled() => return,
            failure = async {
                ticker.tick().await;
                poll_once(&generation, device, mirror, block, &requests).await
            } => failure,
        };
        if block.record_poll(failure.is_none(), Instant::now()) {
            record_health(&shared, mirror, block, failure.as_ref()).await;
        }
        if let Some(failure) = failure {
            raise_findings(&shared, &generation, mirror, failure.failure).await;
        }
    }
}

/// Reads every piece of `block` once. After a failure without a device
/// response the remaining pieces are not requested in this round, so a device
/// that is down gets one request per block and period.
async fn poll_once(
    generation: &Generation,
    device: DeviceId,
    mirror: &DeviceMirror,
    block: &MirrorBlock,
    requests: &[Request],
) -> Option<PollFailure> {
    let pool = generation.pool(device);
    let unit = generation.policy.devices()[device].unit;
    let kind = block.config().kind;
    let mut failure: Option<PollFailure> = None;
    for (piece, request) in requests.iter().enumerate() {
        if matches!(
            failure,
            Some(PollFailure {
                failure: Failure::Gateway(_),
                ..
            })
        ) {
            block.mark_failed(piece);
            continue;
        }
        let count = block.pieces()[piece].count;
        match pool.call(unit, request).await {
            Ok(pdu) => {
                mirror.set_reachable(true);
                match values(kind, count, &pdu) {
                    Some(values) => block.store(piece, values, Instant::now()),
                    None => {
                        block.mark_failed(piece);
                        let code = pdu.get(1).copied().unwrap_or(0);
                        failure = Some(PollFailure {
                            failure: Failure::Exception(code),
                            reason: format!("device answered with exception {code:#04x}"),
                        });
                    }
                }
            }
            Err(error) => {
                tracing::debug!(device = %mirror.name(), block = block.label(), %error, "mirror poll failed");
                mirror.set_reachable(false);
                block.mark_failed(piece);
                failure = Some(PollFailure {
                    failure: Failure::Gateway(error.exception_code().code()),
                    reason: error.to_string(),
                });
            }
        }
    }
    failure
}

/// Extracts one value per address from a checked read response: registers,
/// or 0 and 1 for bits. An exception response yields `None`.
fn values(kind: StateKind, count: u16, pdu: &Bytes) -> Option<Vec<u16>> {
    let (&function, data) = pdu.split_first()?;
    if function & EXCEPTION_BIT != 0 {
        return None;
    }
    let data = data.get(1..)?;
    let count = usize::from(count);
    match kind {
        StateKind::HoldingRegister | StateKind::InputRegister => {
            let registers: Vec<u16> = data
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
                .collect();
            (registers.len() == count).then_some(registers)
        }
        StateKind::Coil | StateKind::DiscreteInput => {
            if data.len() != count.div_ceil(8) {
                return None;
            }
            Some(
                (0..count)
                    .map(|bit| u16::from((data[bit / 8] >> (bit % 8)) & 1))
                    .collect(),
            )
        }
    }
}

/// Records that `block` became fresh or stale.
async fn record_health(
    shared: &Shared,
    mirror: &DeviceMirror,
    block: &MirrorBlock,
    failure: Option<&PollFailure>,
) {
    let mut event = Event::new(EventType::State);
    event.device = Some(mirror.name().clone());
    match failure {
        None => {
            tracing::info!(device = %mirror.name(), block = block.label(), "mirror block fresh");
            event.action = Some("mirror_fresh");
            event.detail = Some(serde_json::json!({ "block": block.label() }));
        }
        Some(failure) => {
            tracing::info!(device = %mirror.name(), block = block.label(), reason = %failure.reason, "mirror block stale");
            event.action = Some("mirror_stale");
            event.detail = Some(serde_json::json!({
                "block": block.label(),
                "reason": failure.reason,
            }));
        }
    }
    emit(shared, event).await;
}

/// Feeds a failed poll to the device detectors, which raise
/// `device_unreachable`, `device_timeout` or `exception_storm` at most once
/// per window, as for forwarded requests.
async fn raise_findings(
    shared: &Shared,
    generation: &Generation,
    mirror: &DeviceMirror,
    failure: Failure,
) {
    let mut findings = Vec::new();
    shared.detect.failure(
        mirror.name(),
        Instant::now(),
        failure,
        generation.policy.detect(),
        &mut findings,
    );
    for finding in findings {
        let mut event = Event::anomaly(finding.kind, finding.severity, finding.detail);
        event.device = Some(mirror.name().clone());
        emit(shared, event).await;
    }
}

async fn emit(shared: &Shared, event: Event) {
    if let Err(error) = shared.emitter.emit(event).await {
        tracing::error!(%error, "event not recorded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_response_yields_each_register() {
        let pdu = Bytes::from_static(&[0x03, 0x04, 0x01, 0x02, 0xFF, 0xFE]);
        assert_eq!(
            values(StateKind::HoldingRegister, 2, &pdu),
            Some(vec![0x0102, 0xFFFE])
        );
    }

    #[test]
    fn bit_response_yields_each_bit() {
        let pdu = Bytes::from_static(&[0x02, 0x02, 0b1000_0101, 0b0000_0001]);
        assert_eq!(
            values(StateKind::DiscreteInput, 9, &pdu),
            Some(vec![1, 0, 1, 0, 0, 0, 0, 1, 1])
        );
    }

    #[test]
    fn exception_response_yields_nothing() {
        let pdu = Bytes::from_static(&[0x84, 0x02]);
        assert_eq!(values(StateKind::InputRegister, 1, &pdu), None);
    }
}
