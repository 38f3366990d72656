//! Monitored items on device nodes: sluice samples each monitored node from
//! the device with Read requests and hands changes to async-opcua's
//! subscriptions. Creating an item is the decision (`subscribe`); samples
//! are not recorded one by one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opcua::server::node_manager::ParsedReadValueId;
use opcua::server::{MonitoredItemHandle, SubscriptionCache};
use opcua::sync::{Mutex, RwLock};
use opcua::types::{
    AttributeId, DataValue, NodeId, NumericRange, QualifiedName, ReadValueId, TimestampsToReturn,
};
use tokio_util::sync::CancellationToken;

use super::namespaces::{Namespaces, Translator};
use super::upstream::Upstream;

/// Shortest sampling interval sluice uses against a device, whatever a
/// client requests, so that subscriptions cannot flood the device.
pub const MIN_SAMPLING_INTERVAL: Duration = Duration::from_millis(100);

/// One sampled node attribute and the items that watch it.
struct Sampled {
    index_range: NumericRange,
    interval: Duration,
    next_due: Instant,
    handles: HashSet<MonitoredItemHandle>,
}

/// The monitored node attributes of one listener.
#[derive(Default)]
pub struct Sampler {
    items: Mutex<HashMap<(NodeId, AttributeId), Sampled>>,
}

impl Sampler {
    /// Adds a monitored item sampled every `interval`, at least
    /// `MIN_SAMPLING_INTERVAL`.
    pub fn add(&self, read: &ParsedReadValueId, handle: MonitoredItemHandle, interval: Duration) {
        let interval = interval.max(MIN_SAMPLING_INTERVAL);
        let mut items = self.items.lock();
        let entry = items
            .entry((read.node_id.clone(), read.attribute_id))
            .or_insert_with(|| Sampled {
                index_range: read.index_range.clone(),
                interval,
                next_due: Instant::now() + interval,
                handles: HashSet::new(),
            });
        entry.interval = entry.interval.min(interval);
        entry.handles.insert(handle);
    }

    pub fn remove(&self, node: &NodeId, attribute: AttributeId, handle: MonitoredItemHandle) {
        let mut items = self.items.lock();
        if let Some(entry) = items.get_mut(&(node.clone(), attribute)) {
            entry.handles.remove(&handle);
            if entry.handles.is_empty() {
                items.remove(&(node.clone(), attribute));
            }
        }
    }

    /// Returns the node attributes due for a sample and schedules the next.
    fn due(&self, now: Instant) -> Vec<(NodeId, AttributeId, NumericRange)> {
        let mut items = self.items.lock();
        let mut due = Vec::new();
        for ((node, attribute), entry) in items.iter_mut() {
            if entry.next_due <= now {
                entry.next_due = now + entry.interval;
                due.push((node.clone(), *attribute, entry.index_range.clone()));
            }
        }
        due
    }

    /// Samples due items until `stop` is cancelled.
    // TODO: items in monitoring mode Disabled are still sampled, because
    // `set_monitoring_mode` is not passed on to the sampler.
    pub async fn run(
        self: Arc<Self>,
        upstream: Arc<Upstream>,
        namespaces: Arc<RwLock<Namespaces>>,
        subscriptions: Arc<SubscriptionCache>,
        stop: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(MIN_SAMPLING_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
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
            let changes: Vec<(DataValue, &NodeId, AttributeId)> = values
                .into_iter()
                .zip(&nodes)
                .map(|(mut value, (node, attribute))| {
                    value.value = value.value.map(|v| translator.value_to_local(v));
                    (value, node, *attribute)
                })
                .collect();
            subscriptions.notify_data_change(changes.into_iter());
        }
    }
}
