//! Turns a compiled policy into a running generation: one upstream pool per
//! device, the mirror store and the tag map, reusing the pools of the previous generation whose settings did
//! not change so that a reload keeps their PLC connections.

use std::sync::Arc;

use crate::events::Emitter;
use crate::metrics::{ConfiguredNames, Metrics};
use crate::mirror::MirrorStore;
use crate::modbus::generation::Generation;
use crate::modbus::upstream::{Pool, UpstreamSettings};
use crate::policy::{DevicePlan, Policy, StateTable};
use crate::tags::TagMap;

/// Bound of the queue of requests waiting for a device connection.
const POOL_QUEUE: usize = 1024;

pub fn upstream_settings(device: &DevicePlan) -> UpstreamSettings {
    UpstreamSettings {
        device: device.name.clone(),
        address: device.address,
        timeout: device.timeout,
        max_connections: device.max_connections,
        max_in_flight: device.max_in_flight,
        connect_timeout: device.connect_timeout,
        backoff_max: device.backoff_max,
        max_queue: POOL_QUEUE,
        tls: device.tls.clone(),
    }
}

/// Builds the generation for `policy`, taking over unchanged pools and the
/// state table from `previous`.
pub fn build_generation(
    policy: Policy,
    previous: Option<&Generation>,
    emitter: &Emitter,
    metrics: &Metrics,
) -> Generation {
    let pools = policy
        .devices()
        .iter()
        .map(|device| {
            reuse_pool(device, previous)
                .unwrap_or_else(|| Pool::new(upstream_settings(device), emitter.clone()))
        })
        .collect();
    // Readings stay valid across a reload that keeps the same states, so
    // state-gated rules do not fail closed for one poll period.
    let states = match previous {
        Some(previous) if previous.policy.states() == policy.states() => previous.states.clone(),
        _ => Arc::new(StateTable::new(policy.states().len())),
    };
    let mirror = Arc::new(MirrorStore::build(
        policy.devices(),
        previous.map(|previous| &*previous.mirror),
        metrics.mirror(),
    ));
    let tags = Arc::new(TagMap::build(policy.tags(), policy.devices()));
    let instruments = metrics.configure(configured_names(&policy));
    metrics.set_tls_expiry(policy.listeners().iter().flat_map(|plan| {
        plan.tls.iter().flat_map(move |tls| {
            tls.expiry.iter().map(move |expiry| {
                (
                    &plan.name,
                    expiry.kind.as_str(),
                    expiry.file.display().to_string(),
                    expiry.unix_seconds,
                )
            })
        })
    }));
    Generation {
        policy,
        pools,
        states,
        mirror,
        tags,
        instruments,
    }
}

fn configured_names(policy: &Policy) -> ConfiguredNames {
    ConfiguredNames {
        listeners: policy
            .listeners()
            .iter()
            .map(|plan| plan.name.clone())
            .collect(),
        vendors: policy
            .vendors()
            .iter()
            .map(|plan| plan.name.clone())
            .collect(),
        devices: policy
            .devices()
            .iter()
            .map(|plan| plan.name.clone())
            .collect(),
        states: policy
            .states()
            .iter()
            .map(|plan| plan.name.clone())
            .collect(),
        collectors: policy
            .audit()
            .collectors
            .iter()
            .map(|collector| Arc::from(collector.name.as_str()))
            .collect(),
    }
}

fn reuse_pool(device: &DevicePlan, previous: Option<&Generation>) -> Option<Pool> {
    let previous = previous?;
    let index = previous
        .policy
        .devices()
        .iter()
        .position(|old| old.name == device.name && same_upstream(old, device))?;
    Some(previous.pools[index].clone())
}

/// Returns true when two plans of a device need the same pool: they differ
/// at most in their mirror blocks, which the pool does not use.
fn same_upstream(old: &DevicePlan, new: &DevicePlan) -> bool {
    let without_mirror = |plan: &DevicePlan| DevicePlan {
        mirror: Arc::from([]),
        ..plan.clone()
    };
    without_mirror(old) == without_mirror(new)
}
