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
    AttributeId, DataValue, MonitoringMode, NodeId, NumericRange, QualifiedName, ReadValueId,
    TimestampsToReturn,
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
    /// The items in monitoring mode Sampling or Reporting.
    enabled: HashSet<MonitoredItemHandle>,
    /// The items in monitoring mode Disabled. An attribute with only these
    /// is not sampled.
    disabled: HashSet<MonitoredItemHandle>,
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
                enabled: HashSet::new(),
                disabled: HashSet::new(),
            });
        entry.interval = entry.interval.min(interval);
        match mode {
            MonitoringMode::Disabled => entry.disabled.insert(handle),
            _ => entry.enabled.insert(handle),
        };
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
        let known = entry.enabled.remove(&handle) | entry.disabled.remove(&handle);
        if !known {
            return;
        }
        match mode {
            MonitoringMode::Disabled => entry.disabled.insert(handle),
            _ => entry.enabled.insert(handle),
        };
    }

    pub fn remove(&self, node: &NodeId, attribute: AttributeId, handle: MonitoredItemHandle) {
        let mut items = self.items.lock();
        if let Some(entry) = items.get_mut(&(node.clone(), attribute)) {
            entry.enabled.remove(&handle);
            entry.disabled.remove(&handle);
            if entry.enabled.is_empty() && entry.disabled.is_empty() {
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
            if entry.enabled.is_empty() {
                continue;
            }
            if entry.next_due <= now {
                entry.next_due = now + entry.interval;
                due.push((node.clone(), *attribute, entry.index_range.clone()));
            }
        }
        due
    }

    /// Samples due items until `stop` is cancelled.
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

#[cfg(test)]
mod tests {
    use super::*;

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
        sampler.add(&read, handle, Duration::ZERO, MonitoringMode::Reporting);
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
        sampler.add(&read, disabled, Duration::ZERO, MonitoringMode::Disabled);
        sampler.add(&read, sampling, Duration::ZERO, MonitoringMode::Sampling);
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
