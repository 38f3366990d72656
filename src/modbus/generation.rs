//! One generation of the running gateway: a compiled policy and the upstream
//! pools, state table and mirror store that go with its devices. Sessions load the current
//! generation once per request, so a reload swaps it atomically and requests
//! in flight finish on the generation they started with.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::audit::AuditHealth;
use crate::events::Emitter;
use crate::metrics::{Instruments, Metrics};
use crate::mirror::MirrorStore;
use crate::policy::{DeviceId, Policy, StateTable};
use crate::tags::TagMap;

use super::upstream::Pool;

pub struct Generation {
    pub policy: Policy,
    /// One pool per device, indexed by `DeviceId`.
    pub pools: Vec<Pool>,
    pub states: Arc<StateTable>,
    /// Blocks of device tables that pollers keep in memory.
    pub mirror: Arc<MirrorStore>,
    /// Typed tags over the mirror blocks, read from `mirror`.
    pub tags: Arc<TagMap>,
    /// Metric handles labelled with this generation's names, indexed like
    /// the policy's listeners, vendors, devices and states.
    pub instruments: Arc<Instruments>,
}

impl Generation {
    pub fn pool(&self, device: DeviceId) -> &Pool {
        &self.pools[device]
    }

    pub fn device_name(&self, device: DeviceId) -> &Arc<str> {
        &self.policy.devices()[device].name
    }
}

/// The state every listener and session of the process shares.
pub struct Shared {
    pub current: ArcSwap<Generation>,
    pub emitter: Emitter,
    pub sessions: super::registry::Registry,
    pub metrics: Arc<Metrics>,
    /// While the audit log cannot be written, writes and state-gated
    /// requests are denied.
    pub audit: Arc<AuditHealth>,
    /// Vendors cut off by an operator; checked at accept and per request.
    pub quarantine: Arc<crate::policy::quarantine::Quarantine>,
    /// Detector state that spans sessions: device failures, the source
    /// addresses each vendor connected from, and containment counts.
    pub detect: crate::detect::Hub,
    /// The trust stores of the running OPC UA listeners, which a reload
    /// replaces.
    pub opcua_trust: crate::opcua::TrustStores,
    /// The threads that run Modbus/TCP sessions and TLS handshakes.
    pub session_threads: super::session_threads::SessionThreads,
}
