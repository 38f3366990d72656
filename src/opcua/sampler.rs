//! Monitored items on device nodes: sluice samples each monitored node from
//! the device with Read requests and hands changes to async-opcua's
//! subscriptions. Creating an item is the decision (`subscribe`); samples
//! are not recorded one by one. When a reload swaps the policy, every item
//! is decided again, and an item whose `subscribe` right is gone gets one
//! `BadUserAccessDenied` notification and no more samples.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use opcua::server::authenticator::UserToken;
use opcua::server::node_manager::ParsedReadValueId;
use opcua::server::{MonitoredItemHandle, SubscriptionCache};
use opcua::sync::{Mutex, RwLock};
use opcua::types::{
    AttributeId, DataValue, DateTime, MonitoringMode, NodeId, NumericRange, QualifiedName,
    ReadValueId, StatusCode, TimestampsToReturn,
};
use tokio_util::sync::CancellationToken;

use crate::config::{Mode, OpcuaService};
use crate::modbus::generation::{Generation, Shared};
use crate::policy::{Decision, DenyReason, OpcuaDeviceId};

use super::access::{token_vendor_name, Decider};
use super::namespaces::{node_text, Namespaces, Translator};
use super::record::{record, Operation};
use super::upstream::Upstream;

/// Shortest sampling interval sluice uses against a device, whatever a
/// client requests, so that subscriptions cannot flood the device.
pub const MIN_SAMPLING_INTERVAL: Duration = Duration::from_millis(100);

/// The session that created a monitored item, to decide the item again.
#[derive(Debug, Clone)]
pub struct Watcher {
    pub token: UserToken,
    pub session: u32,
    pub peer: Option<SocketAddr>,
}

/// One sampled node attribute and the items that watch it.
struct Sampled {
    index_range: NumericRange,
    interval: Duration,
    next_due: Instant,
    handles: HashMap<MonitoredItemHandle, Watcher>,
    /// The items among `handles` in monitoring mode Disabled. An attribute
    /// with only these is not sampled.
    disabled: HashSet<MonitoredItemHandle>,
}

impl Sampled {
    fn is_sampled(&self) -> bool {
        self.handles.len() > self.disabled.len()
    }
}

/// A monitored item whose `subscribe` right a reload removed.
struct Revoked {
    node: NodeId,
    attribute: AttributeId,
    handle: MonitoredItemHandle,
    watcher: Watcher,
    reason: String,
}

/// The listener state the sampler decides its items with after a reload.
pub struct Recheck {
    pub shared: Arc<Shared>,
    pub listener: Arc<str>,
    pub device: OpcuaDeviceId,
    pub mode: Mode,
}

/// The monitored node attributes of one listener.
#[derive(Default)]
pub struct Sampler {
    items: Mutex<HashMap<(NodeId, AttributeId), Sampled>>,
}

impl Sampler {
    /// Adds a monitored item sampled every `interval`, at least
    /// `MIN_SAMPLING_INTERVAL`, unless its monitoring mode is Disabled.
    pub fn add(
        &self,
        read: &ParsedReadValueId,
        handle: MonitoredItemHandle,
        interval: Duration,
        watcher: Watcher,
        mode: MonitoringMode,
    ) {
        let interval = interval.max(MIN_SAMPLING_INTERVAL);
        let mut items = self.items.lock();
        let entry = items
            .entry((read.node_id.clone(), read.attribute_id))
            .or_insert_with(|| Sampled {
                index_range: read.index_range.clone(),
                interval,
                next_due: Instant::now() + interval,
                handles: HashMap::new(),
                disabled: HashSet::new(),
            });
        entry.interval = entry.interval.min(interval);
        entry.handles.insert(handle, watcher);
        if mode == MonitoringMode::Disabled {
            entry.disabled.insert(handle);
        }
    }

    /// Moves an item between Disabled and the sampled modes. Sampling and
    /// Reporting are the same here, because the server decides which
    /// samples it reports.
    pub fn set_mode(
        &self,
        node: &NodeId,
        attribute: AttributeId,
        handle: MonitoredItemHandle,
        mode: MonitoringMode,
    ) {
        let mut items = self.items.lock();
        let Some(entry) = items.get_mut(&(node.clone(), attribute)) else {
            return;
        };
        if !entry.handles.contains_key(&handle) {
            return;
        }
        match mode {
            MonitoringMode::Disabled => entry.disabled.insert(handle),
            _ => entry.disabled.remove(&handle),
        };
    }

    pub fn remove(&self, node: &NodeId, attribute: AttributeId, handle: MonitoredItemHandle) {
        let mut items = self.items.lock();
        if let Some(entry) = items.get_mut(&(node.clone(), attribute)) {
            entry.handles.remove(&handle);
            entry.disabled.remove(&handle);
            if entry.handles.is_empty() {
                items.remove(&(node.clone(), attribute));
            }
        }
    }

    /// Returns the node attributes due for a sample and schedules the next.
    /// Attributes whose items are all Disabled are skipped.
    fn due(&self, now: Instant) -> Vec<(NodeId, AttributeId, NumericRange)> {
        let mut items = self.items.lock();
        let mut due = Vec::new();
        for ((node, attribute), entry) in items.iter_mut() {
            if !entry.is_sampled() {
                continue;
            }
            if entry.next_due <= now {
                entry.next_due = now + entry.interval;
                due.push((node.clone(), *attribute, entry.index_range.clone()));
            }
        }
        due
    }

    /// Returns the items of the enabled monitored items on one node
    /// attribute that the sampler still serves.
    fn served(&self, node: &NodeId, attribute: AttributeId) -> Vec<MonitoredItemHandle> {
        let items = self.items.lock();
        items
            .get(&(node.clone(), attribute))
            .map(|entry| {
                entry
                    .handles
                    .keys()
                    .filter(|handle| !entry.disabled.contains(handle))
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Decides every item again as `subscribe` and removes, in enforce
    /// mode, those the current policy denies. A denial by a rate limit
    /// keeps the item, because a rate limit does not remove the right.
    fn revoke_denied(
        &self,
        recheck: &Recheck,
        namespaces: &RwLock<Namespaces>,
    ) -> (Vec<Revoked>, Vec<Revoked>) {
        let decider = Decider {
            shared: &recheck.shared,
            namespaces,
            device: recheck.device,
        };
        let mut denied = Vec::new();
        let mut items = self.items.lock();
        for ((node, attribute), entry) in items.iter() {
            for (handle, watcher) in &entry.handles {
                let source = watcher.peer.map(|peer| peer.ip());
                let reason = match decider.evaluate(
                    source,
                    &watcher.token,
                    OpcuaService::Subscribe,
                    node,
                    None,
                ) {
                    Ok((Decision::Allow { .. }, _)) => continue,
                    Ok((Decision::Deny { reason }, _)) => {
                        if matches!(reason, DenyReason::RateLimited { .. }) {
                            continue;
                        }
                        reason.to_string()
                    }
                    Err(reason) => reason.to_owned(),
                };
                denied.push(Revoked {
                    node: node.clone(),
                    attribute: *attribute,
                    handle: *handle,
                    watcher: watcher.clone(),
                    reason,
                });
            }
        }
        if recheck.mode == Mode::Monitor {
            return (Vec::new(), denied);
        }
        for revoked in &denied {
            let key = (revoked.node.clone(), revoked.attribute);
            if let Some(entry) = items.get_mut(&key) {
                entry.handles.remove(&revoked.handle);
                entry.disabled.remove(&revoked.handle);
                if entry.handles.is_empty() {
                    items.remove(&key);
                }
            }
        }
        (denied, Vec::new())
    }

    /// Decides every item again after the policy changed: sends each
    /// revoked item one `BadUserAccessDenied` value and records every
    /// denial, forwarded ones in monitor mode included.
    async fn recheck(
        &self,
        recheck: &Recheck,
        namespaces: &RwLock<Namespaces>,
        subscriptions: &SubscriptionCache,
        device: &Arc<str>,
    ) {
        let (revoked, forwarded) = self.revoke_denied(recheck, namespaces);
        if !revoked.is_empty() {
            let mut notifier = subscriptions.data_notifier();
            for item in &revoked {
                if let Some(mut batch) = notifier.notify_for(&item.node, item.attribute) {
                    let mut value = DataValue::null();
                    value.status = Some(StatusCode::BadUserAccessDenied);
                    value.server_timestamp = Some(DateTime::now());
                    batch.data_value_to_item(value, &item.handle);
                }
            }
        }
        let operations = {
            let generation = recheck.shared.current.load();
            let namespaces = namespaces.read();
            let revoked = revoked.into_iter().map(|item| (item, true));
            let forwarded = forwarded.into_iter().map(|item| (item, false));
            revoked
                .chain(forwarded)
                .map(|(item, enforced)| {
                    let uri = namespaces.uri(item.node.namespace);
                    let node_id = uri.map(|uri| node_text(uri, &item.node));
                    let mut operation = Operation::new(OpcuaService::Subscribe, node_id);
                    operation.vendor =
                        Some(token_vendor_name(&generation.policy, &item.watcher.token));
                    operation.session = Some(item.watcher.session);
                    operation.peer = item.watcher.peer;
                    operation.enforced = enforced;
                    operation.reason = Some(item.reason);
                    operation.status = match enforced {
                        true => StatusCode::BadUserAccessDenied,
                        false => StatusCode::Good,
                    };
                    operation
                })
                .collect::<Vec<_>>()
        };
        for operation in operations {
            record(&recheck.shared, &recheck.listener, device, operation).await;
        }
    }

    /// Decides the items again when the generation in place is not the one
    /// last seen. `seen` is weak, so the old generation is dropped as usual,
    /// but its allocation, and so its address, cannot be reused by a newer
    /// one.
    async fn follow_reload(
        &self,
        seen: &mut Weak<Generation>,
        recheck: &Recheck,
        namespaces: &RwLock<Namespaces>,
        subscriptions: &SubscriptionCache,
        device: &Arc<str>,
    ) {
        let current = Arc::downgrade(&recheck.shared.current.load_full());
        if !current.ptr_eq(seen) {
            *seen = current;
            self.recheck(recheck, namespaces, subscriptions, device)
                .await;
        }
    }

    /// Samples due items until `stop` is cancelled.
    pub async fn run(
        self: Arc<Self>,
        upstream: Arc<Upstream>,
        namespaces: Arc<RwLock<Namespaces>>,
        subscriptions: Arc<SubscriptionCache>,
        recheck: Recheck,
        stop: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(MIN_SAMPLING_INTERVAL);
        let mut seen = Arc::downgrade(&recheck.shared.current.load_full());
        let device = upstream.device.clone();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            self.follow_reload(&mut seen, &recheck, &namespaces, &subscriptions, &device)
                .await;
            let due = self.due(Instant::now());
            let Some(connected) = upstream.connected() else {
                continue;
            };
            if due.is_empty() {
                continue;
            }
            let translator = Translator {
                namespaces: &namespaces,
                device: &connected.namespaces,
            };
            let mut nodes = Vec::new();
            let mut requests = Vec::new();
            for (node, attribute, index_range) in due {
                if let Some(device_node) = translator.to_device(&node) {
                    requests.push(ReadValueId {
                        node_id: device_node,
                        attribute_id: attribute as u32,
                        index_range,
                        data_encoding: QualifiedName::null(),
                    });
                    nodes.push((node, attribute));
                }
            }
            let request = connected
                .session
                .read(&requests, TimestampsToReturn::Both, 0.0);
            let values: Vec<DataValue> = match tokio::time::timeout(upstream.timeout, request).await
            {
                Ok(Ok(values)) if values.len() == requests.len() => values,
                _ => continue,
            };
            // A reload during the read must not let a revoked item get
            // this sample.
            self.follow_reload(&mut seen, &recheck, &namespaces, &subscriptions, &device)
                .await;
            let served: Vec<Vec<MonitoredItemHandle>> = nodes
                .iter()
                .map(|(node, attribute)| self.served(node, *attribute))
                .collect();
            let mut notifier = subscriptions.data_notifier();
            for ((mut value, (node, attribute)), handles) in
                values.into_iter().zip(&nodes).zip(served)
            {
                value.value = value.value.map(|v| translator.value_to_local(v));
                let Some(mut batch) = notifier.notify_for(node, *attribute) else {
                    continue;
                };
                // Only enabled items get samples, as async-opcua's own
                // `notify_data_change` does.
                let enabled: Vec<MonitoredItemHandle> = batch
                    .entries()
                    .map(|(handle, _)| *handle)
                    .filter(|handle| handles.contains(handle))
                    .collect();
                for handle in &enabled {
                    batch.data_value_to_item(value.clone(), handle);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watcher() -> Watcher {
        Watcher {
            token: UserToken("acme".to_owned()),
            session: 1,
            peer: None,
        }
    }

    fn temperature() -> ParsedReadValueId {
        ParsedReadValueId {
            node_id: NodeId::new(2, "Line1.Press.Temperature"),
            attribute_id: AttributeId::Value,
            index_range: NumericRange::None,
            data_encoding: opcua::types::DataEncoding::Binary,
        }
    }

    fn due_nodes(sampler: &Sampler, now: Instant) -> Vec<NodeId> {
        sampler
            .due(now)
            .into_iter()
            .map(|(node, _, _)| node)
            .collect()
    }

    #[test]
    fn disabled_item_is_not_sampled() {
        let sampler = Sampler::default();
        let handle = MonitoredItemHandle {
            subscription_id: 1,
            monitored_item_id: 1,
        };
        sampler.add(
            &temperature(),
            handle,
            Duration::ZERO,
            watcher(),
            MonitoringMode::Disabled,
        );
        let later = Instant::now() + Duration::from_secs(1);
        assert_eq!(due_nodes(&sampler, later), Vec::<NodeId>::new());
    }

    #[test]
    fn reporting_again_resumes_sampling() {
        let sampler = Sampler::default();
        let handle = MonitoredItemHandle {
            subscription_id: 1,
            monitored_item_id: 1,
        };
        let read = temperature();
        sampler.add(
            &read,
            handle,
            Duration::ZERO,
            watcher(),
            MonitoringMode::Reporting,
        );
        sampler.set_mode(
            &read.node_id,
            read.attribute_id,
            handle,
            MonitoringMode::Disabled,
        );
        let later = Instant::now() + Duration::from_secs(1);
        assert_eq!(due_nodes(&sampler, later), Vec::<NodeId>::new());

        sampler.set_mode(
            &read.node_id,
            read.attribute_id,
            handle,
            MonitoringMode::Reporting,
        );
        assert_eq!(due_nodes(&sampler, later), vec![read.node_id.clone()]);
    }

    #[test]
    fn one_enabled_item_keeps_shared_node_sampled() {
        let sampler = Sampler::default();
        let read = temperature();
        let disabled = MonitoredItemHandle {
            subscription_id: 1,
            monitored_item_id: 1,
        };
        let sampling = MonitoredItemHandle {
            subscription_id: 1,
            monitored_item_id: 2,
        };
        sampler.add(
            &read,
            disabled,
            Duration::ZERO,
            watcher(),
            MonitoringMode::Disabled,
        );
        sampler.add(
            &read,
            sampling,
            Duration::ZERO,
            watcher(),
            MonitoringMode::Sampling,
        );
        let later = Instant::now() + Duration::from_secs(1);
        assert_eq!(due_nodes(&sampler, later), vec![read.node_id.clone()]);

        sampler.remove(&read.node_id, read.attribute_id, sampling);
        let after = later + Duration::from_secs(1);
        assert_eq!(due_nodes(&sampler, after), Vec::<NodeId>::new());
    }

    #[test]
    fn mode_of_unknown_item_is_ignored() {
        let sampler = Sampler::default();
        let read = temperature();
        let handle = MonitoredItemHandle {
            subscription_id: 1,
            monitored_item_id: 1,
        };
        sampler.set_mode(
            &read.node_id,
            read.attribute_id,
            handle,
            MonitoringMode::Reporting,
        );
        let later = Instant::now() + Duration::from_secs(1);
        assert_eq!(due_nodes(&sampler, later), Vec::<NodeId>::new());
    }
}
