//! Operational state pollers: one task per `[[state]]` reads its register or
//! bit through the device's pool every `poll_ms`, writes the reading into the
//! generation's state table and records every change of the named value.
//! The mirror pollers in `mirror` run beside them, one task per block.

mod mirror;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::events::{Emitter, Event, EventType, Severity};
use crate::modbus::generation::{Generation, Shared};
use crate::modbus::pdu::Request;
use crate::policy::{StateKind, StatePlan};

/// The running pollers of one generation.
pub struct Pollers {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Pollers {
    /// Starts one poller per state and one per mirror block of the current
    /// generation.
    pub fn start(shared: &Arc<Shared>) -> Pollers {
        let generation = shared.current.load_full();
        let cancel = CancellationToken::new();
        let mut tasks: Vec<JoinHandle<()>> = (0..generation.policy.states().len())
            .map(|index| {
                tokio::spawn(poll(
                    index,
                    generation.clone(),
                    shared.emitter.clone(),
                    cancel.clone(),
                ))
            })
            .collect();
        tasks.extend(mirror::start(shared, &generation, &cancel));
        Pollers { cancel, tasks }
    }

    /// Replaces the pollers with those of the current generation.
    pub async fn restart(&mut self, shared: &Arc<Shared>) {
        self.stop().await;
        *self = Pollers::start(shared);
    }

    pub async fn stop(&mut self) {
        self.cancel.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

/// Builds the request that reads `quantity` addresses of `kind` from
/// `address`; the mirror pollers use it too.
pub(crate) fn read_request(kind: StateKind, address: u16, quantity: u16) -> Request {
    match kind {
        StateKind::HoldingRegister => Request::ReadHoldingRegisters { address, quantity },
        StateKind::InputRegister => Request::ReadInputRegisters { address, quantity },
        StateKind::Coil => Request::ReadCoils { address, quantity },
        StateKind::DiscreteInput => Request::ReadDiscreteInputs { address, quantity },
    }
}

/// Extracts the raw value from a checked response PDU: the register, or 0 or
/// 1 for a bit. An exception response yields `None`.
fn raw_value(kind: StateKind, pdu: &Bytes) -> Option<u16> {
    match kind {
        StateKind::HoldingRegister | StateKind::InputRegister => match pdu.as_ref() {
            [_, 2, high, low] => Some(u16::from_be_bytes([*high, *low])),
            _ => None,
        },
        StateKind::Coil | StateKind::DiscreteInput => match pdu.as_ref() {
            [_, 1, bits] => Some(u16::from(bits & 1)),
            _ => None,
        },
    }
}

async fn poll(
    index: usize,
    generation: Arc<Generation>,
    emitter: Emitter,
    cancel: CancellationToken,
) {
    let plan = &generation.policy.states()[index];
    let device = &generation.policy.devices()[plan.device];
    let pool = generation.pool(plan.device);
    let request = read_request(plan.kind, plan.address, 1);
    let mut last: Option<Arc<str>> = generation
        .policy
        .state_value(&generation.states, index, Instant::now())
        .cloned();
    let mut ticker = tokio::time::interval(plan.poll);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let raw = match pool.call(device.unit, &request).await {
            Ok(pdu) => raw_value(plan.kind, &pdu),
            Err(error) => {
                tracing::debug!(state = %plan.name, %error, "state read failed");
                None
            }
        };
        if let Some(raw) = raw {
            generation.states.set(index, Some(raw), Instant::now());
        }
        let current = generation
            .policy
            .state_value(&generation.states, index, Instant::now())
            .cloned();
        if current != last {
            record_change(
                &emitter,
                plan,
                &device.name,
                last.as_deref(),
                current.as_deref(),
                raw,
            )
            .await;
            last = current;
        }
    }
}

async fn record_change(
    emitter: &Emitter,
    plan: &StatePlan,
    device: &Arc<str>,
    old: Option<&str>,
    new: Option<&str>,
    raw: Option<u16>,
) {
    let became_unknown = new.is_none();
    let (old, new) = (old.unwrap_or("unknown"), new.unwrap_or("unknown"));
    tracing::info!(state = %plan.name, old, new, "operational state changed");
    if became_unknown {
        // Rules gated on this state stop matching, and an operator must
        // know: the PLC is down or reports a value the state does not map.
        let mut anomaly = Event::anomaly(
            "state_unknown",
            Severity::Medium,
            format!(
                "state {} is unknown: no reading within {} ms, or a value its map does not name",
                plan.name,
                plan.max_age.as_millis()
            ),
        );
        anomaly.device = Some(device.clone());
        if let Err(error) = emitter.emit(anomaly).await {
            tracing::error!(%error, "event not recorded");
        }
    }
    let mut event = Event::new(EventType::State);
    event.action = Some("change");
    event.device = Some(device.clone());
    event.detail = Some(serde_json::json!({
        "state": &*plan.name,
        "old": old,
        "new": new,
        "raw": raw,
    }));
    if let Err(error) = emitter.emit(event).await {
        tracing::error!(%error, "event not recorded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_response_yields_raw_value() {
        let pdu = Bytes::from_static(&[0x03, 0x02, 0x01, 0x02]);
        assert_eq!(raw_value(StateKind::HoldingRegister, &pdu), Some(0x0102));
    }

    #[test]
    fn coil_response_yields_lowest_bit() {
        let pdu = Bytes::from_static(&[0x01, 0x01, 0x03]);
        assert_eq!(raw_value(StateKind::Coil, &pdu), Some(1));
        let pdu = Bytes::from_static(&[0x02, 0x01, 0x02]);
        assert_eq!(raw_value(StateKind::DiscreteInput, &pdu), Some(0));
    }

    #[test]
    fn exception_response_yields_nothing() {
        let pdu = Bytes::from_static(&[0x83, 0x02]);
        assert_eq!(raw_value(StateKind::HoldingRegister, &pdu), None);
    }
}
