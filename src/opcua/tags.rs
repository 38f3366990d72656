//! The node manager of the Modbus tags on an OPC UA listener. Browse,
//! TranslateBrowsePathsToNodeIds, Read, Write and monitored items on tag
//! nodes are decided against the vendor's rules for the tag's Modbus
//! device and recorded. Reads and samples come from the mirror; a write
//! becomes a Modbus request (see `tag_write`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use opcua::nodes::{DefaultTypeTree, TypeTree};
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::{
    impl_translate_browse_paths_using_browse, BrowseNode, BrowsePathItem, ExternalReference,
    ExternalReferenceRequest, MonitoredItemRef, NodeManager, NodeMetadata, ReadNode,
    RequestContext, ServerContext, WriteNode,
};
use opcua::server::{CreateMonitoredItem, MonitoredItemHandle, SubscriptionCache};
use opcua::sync::Mutex;
use opcua::types::{
    AttributeId, BrowseDescriptionResultMask, BrowseDirection, DataValue, DateTime, ExpandedNodeId,
    NodeClass, NodeId, NumericRange, ObjectId, ReferenceDescription, ReferenceTypeId, StatusCode,
    TimestampsToReturn, Variant,
};
use tokio_util::sync::CancellationToken;

use crate::config::{Mode, OpcuaService};
use crate::detect::OpcuaDetector;
use crate::modbus::generation::{Generation, Shared};
use crate::policy::{Decision, NodeIdRef, OpcuaAccess, OpcuaContext, OpcuaNode};
use crate::tags::{Tag, TagId, NAMESPACE_URI};

use super::browse;
use super::front::ChannelPeers;
use super::record::{Operation, Recorder};
use super::tag_space::{block_poll, quality_status, to_variant, TagNode, TagSpace};

/// Interval at which monitored tags are compared with the mirror. Each
/// item is sampled at its block's poll interval or its own, whichever is
/// longer, so this only bounds the delay.
const SAMPLE_TICK: Duration = Duration::from_millis(50);
/// The namespace index before `init` registers the namespace.
const NO_NAMESPACE: u16 = u16::MAX;
/// 100 ns ticks from 1601-01-01, the OPC UA epoch, to 1970-01-01.
const UNIX_EPOCH_TICKS: i128 = 116_444_736_000_000_000;

/// The tags of one listener.
pub struct TagNodeManager {
    pub(super) shared: Arc<Shared>,
    pub(super) listener: Arc<str>,
    pub(super) mode: Mode,
    channels: Arc<ChannelPeers>,
    stop: CancellationToken,
    /// The listener's session detectors, shared with the device nodes.
    detector: Arc<OpcuaDetector>,
    namespace: AtomicU16,
    /// The nodes of the latest generation's tags, rebuilt after a reload.
    space: Mutex<Option<Arc<TagSpace>>>,
    sampler: Arc<TagSampler>,
}

/// The tag references of one Browse operation that did not fit the
/// client's maximum references per node, which BrowseNext returns. The
/// browse decisions were made with the Browse.
struct PendingTagReferences {
    references: VecDeque<ReferenceDescription>,
}

/// The outcome of deciding one operation on a tag.
pub(super) struct Verdict {
    pub forward: bool,
    pub operation: Operation,
}

impl TagNodeManager {
    pub fn new(
        shared: Arc<Shared>,
        listener: Arc<str>,
        mode: Mode,
        channels: Arc<ChannelPeers>,
        stop: CancellationToken,
        detector: Arc<OpcuaDetector>,
    ) -> TagNodeManager {
        TagNodeManager {
            shared,
            listener,
            mode,
            channels,
            stop,
            detector,
            namespace: AtomicU16::new(NO_NAMESPACE),
            space: Mutex::new(None),
            sampler: Arc::new(TagSampler::default()),
        }
    }

    /// Returns the nodes of `generation`'s tags, building them when the
    /// tags changed since the last call.
    pub(super) fn space(&self, generation: &Generation) -> Arc<TagSpace> {
        let mut cached = self.space.lock();
        if let Some(space) = cached.as_ref() {
            if Arc::ptr_eq(&space.tags, &generation.tags) {
                return space.clone();
            }
        }
        let space = Arc::new(TagSpace::build(
            generation.tags.clone(),
            generation.policy.devices(),
            self.namespace.load(Ordering::Relaxed),
        ));
        *cached = Some(space.clone());
        space
    }

    pub(super) fn peer(&self, context: &RequestContext) -> Option<SocketAddr> {
        let channel = context.session().read().secure_channel_id();
        self.channels.peer(channel)
    }

    /// Decides `service` on `tag` with the vendor's rules for the tag's
    /// device. Returns the reason as an error when no decision can be made.
    fn evaluate(
        &self,
        generation: &Generation,
        context: &RequestContext,
        service: OpcuaService,
        tag: &Tag,
        value: Option<f64>,
        non_numeric: bool,
    ) -> Result<(Decision, Option<String>), &'static str> {
        let policy = &generation.policy;
        let source = self.peer(context).map(|peer| peer.ip());
        let vendor =
            super::access::admitted_vendor(&self.shared, policy, context.user_token(), source)?;

        let access = OpcuaAccess {
            service,
            node: OpcuaNode {
                namespace_uri: NAMESPACE_URI,
                id: NodeIdRef::String(&tag.name),
            },
            value,
            non_numeric_value: non_numeric,
        };
        let opcua_context = OpcuaContext {
            source,
            now: jiff::Timestamp::now(),
            instant: Instant::now(),
            states: &generation.states,
        };
        let decision = policy.decide_tag(vendor, tag.device, &access, &opcua_context);
        let label = match &decision {
            Decision::Allow { rule } => Some(policy.rule_label(*rule).to_owned()),
            Decision::Deny { .. } => None,
        };
        Ok((decision, label))
    }

    /// Decides one operation and returns whether to carry it out. In
    /// monitor mode denied operations are carried out too, and recorded as
    /// such.
    pub(super) fn decide(
        &self,
        generation: &Generation,
        context: &RequestContext,
        service: OpcuaService,
        tag: &Tag,
        value: Option<&Variant>,
    ) -> Verdict {
        let mut operation = Operation::new(service, Some(tag.node_id()));
        operation.vendor = Some(super::access::token_vendor_name(
            &generation.policy,
            context.user_token(),
        ));
        operation.session = Some(context.session_id());
        operation.peer = self.peer(context);
        let (number, non_numeric) = match value.map(super::access::numeric) {
            Some(Some(number)) => (Some(number), false),
            Some(None) => (None, true),
            None => (None, false),
        };
        let decided = self.evaluate(generation, context, service, tag, number, non_numeric);
        match decided {
            Err(reason) => {
                operation.reason = Some(reason.to_owned());
                Verdict {
                    forward: false,
                    operation,
                }
            }
            Ok((Decision::Allow { .. }, label)) => {
                operation.allowed = true;
                operation.rule = label;
                Verdict {
                    forward: true,
                    operation,
                }
            }
            Ok((Decision::Deny { reason }, _)) => {
                operation.reason = Some(reason.to_string());
                let forward = self.mode == Mode::Monitor;
                operation.enforced = !forward;
                Verdict { forward, operation }
            }
        }
    }

    /// Returns whether the vendor may browse `tag`, without recording an
    /// event; used to filter browse results.
    // NOTE: as on device nodes, this takes a token from the vendor's rate
    // limit per tag, so a rate-limited vendor gets fewer tags in its results.
    fn may_browse(&self, generation: &Generation, context: &RequestContext, tag: &Tag) -> bool {
        matches!(
            self.evaluate(generation, context, OpcuaService::Browse, tag, None, false),
            Ok((Decision::Allow { .. }, _))
        )
    }

    pub(super) async fn finish(&self, tag: &Tag, operation: Operation) {
        let recorder = Recorder {
            shared: &self.shared,
            listener: &self.listener,
            device: &tag.device_name,
            detector: &self.detector,
        };
        recorder.finish(operation).await;
    }

    /// Adds the `Tags` folder to a browse of the Objects folder.
    fn browse_objects_folder(
        &self,
        context: &RequestContext,
        space: &TagSpace,
        node: &mut BrowseNode,
    ) {
        let folder = space.folder();
        let Some(target) = space.space.find_node(&folder) else {
            return;
        };
        let type_tree = context.get_type_tree_for_user();
        let metadata = node_metadata(space, type_tree.get(), target.as_node().node_id());
        let reference = ExternalReference::new(
            metadata.node_id.clone(),
            ReferenceTypeId::Organizes.into(),
            opcua::nodes::ReferenceDirection::Forward,
        );
        if node.browse_direction() != BrowseDirection::Inverse {
            node.add(type_tree.get(), reference.into_reference(metadata));
        }
    }

    /// Browses a node of the tag namespace. A tag itself is decided as
    /// `browse`; tags the vendor may not browse are left out of the results.
    async fn browse_owned(
        &self,
        generation: &Generation,
        context: &RequestContext,
        space: &TagSpace,
        node: &mut BrowseNode,
        kind: TagNode,
    ) {
        if let TagNode::Tag(id) = kind {
            let tag = &space.tags.tags()[id];
            let mut verdict = self.decide(generation, context, OpcuaService::Browse, tag, None);
            let status = match verdict.forward {
                true => StatusCode::Good,
                false => StatusCode::BadUserAccessDenied,
            };
            verdict.operation.status = status;
            self.finish(tag, verdict.operation).await;
            if !verdict.forward {
                node.set_status(status);
                return;
            }
        }
        let type_tree = context.get_type_tree_for_user();
        let type_tree = type_tree.get();
        let filter = match node.reference_type_id().is_null() {
            true => None,
            false => Some((node.reference_type_id().clone(), node.include_subtypes())),
        };
        let references: Vec<_> = space
            .space
            .find_references(node.node_id(), filter, type_tree, node.browse_direction())
            .map(|reference| {
                (
                    reference.target_node.clone(),
                    reference.reference_type.clone(),
                    reference.direction,
                )
            })
            .collect();
        let mut visible = VecDeque::new();
        for (target, reference_type, direction) in references {
            let hidden = match space.node(&target) {
                Some(TagNode::Tag(id)) => {
                    !self.may_browse(generation, context, &space.tags.tags()[id])
                }
                _ => false,
            };
            if hidden {
                continue;
            }
            let external = ExternalReference::new(target.clone().into(), reference_type, direction);
            match space.space.find_node(&target) {
                Some(_) => {
                    let metadata = node_metadata(space, type_tree, &target);
                    visible.push_back(external.into_reference(metadata));
                }
                None => node.push_external_reference(external),
            }
        }
        browse::add_paged(type_tree, node, visible, |references| {
            PendingTagReferences { references }
        });
        node.set_status(StatusCode::Good);
    }

    /// Returns the value of tag `id` from the mirror, with the status of its
    /// quality and the timestamps that `timestamps` requests.
    pub(super) fn tag_value(
        generation: &Generation,
        id: TagId,
        timestamps: TimestampsToReturn,
    ) -> DataValue {
        let Some(reading) = generation.tags.read(id, &generation.mirror, Instant::now()) else {
            return DataValue::new_now_status(Variant::Empty, StatusCode::BadNodeIdUnknown);
        };
        let status = quality_status(reading.quality);
        // OPC UA clients ignore the value of a Bad status, and servers send
        // null there. That also makes a lost PLC a value change, which
        // monitored items without a data change filter report.
        let value = match status.is_bad() {
            true => None,
            false => reading.value,
        };
        let mut value = DataValue {
            value: Some(value.map_or(Variant::Empty, to_variant)),
            status: Some(status),
            source_timestamp: reading.source_time.map(date_time),
            server_timestamp: Some(DateTime::now()),
            ..DataValue::default()
        };
        if matches!(
            timestamps,
            TimestampsToReturn::Server | TimestampsToReturn::Neither
        ) {
            value.source_timestamp = None;
        }
        if matches!(
            timestamps,
            TimestampsToReturn::Source | TimestampsToReturn::Neither
        ) {
            value.server_timestamp = None;
        }
        value
    }

    /// Reads one attribute of a node of the tag namespace for a vendor that
    /// may read it.
    fn read_attribute(
        generation: &Generation,
        context: &RequestContext,
        space: &TagSpace,
        read: &opcua::server::node_manager::ParsedReadValueId,
        kind: TagNode,
        max_age: f64,
        timestamps: TimestampsToReturn,
    ) -> DataValue {
        let (TagNode::Tag(id), AttributeId::Value) = (kind, read.attribute_id) else {
            return space.space.read(context, read, max_age, timestamps);
        };
        if !opcua::server::address_space::is_supported_data_encoding(&read.data_encoding) {
            return DataValue::new_now_status(Variant::Empty, StatusCode::BadDataEncodingInvalid);
        }
        if read.index_range != NumericRange::None {
            return DataValue::new_now_status(Variant::Empty, StatusCode::BadIndexRangeNoData);
        }
        Self::tag_value(generation, id, timestamps)
    }
}

/// Returns the browse metadata of a node of the tag namespace.
fn node_metadata(space: &TagSpace, type_tree: &dyn TypeTree, node: &NodeId) -> NodeMetadata {
    let target = space.space.find_node(node);
    let type_definition = space
        .space
        .find_references(
            node,
            Some((ReferenceTypeId::HasTypeDefinition, false)),
            type_tree,
            BrowseDirection::Forward,
        )
        .next()
        .map(|reference| ExpandedNodeId::new(reference.target_node.clone()))
        .unwrap_or_default();
    NodeMetadata {
        node_id: ExpandedNodeId::new(node.clone()),
        type_definition,
        browse_name: target
            .map(|t| t.as_node().browse_name().clone())
            .unwrap_or_default(),
        display_name: target
            .map(|t| t.as_node().display_name().clone())
            .unwrap_or_default(),
        node_class: target.map_or(NodeClass::Unspecified, |t| t.node_class()),
    }
}

/// Converts a wall-clock time to an OPC UA DateTime.
fn date_time(time: jiff::Timestamp) -> DateTime {
    let ticks = time.as_nanosecond() / 100 + UNIX_EPOCH_TICKS;
    DateTime::from(i64::try_from(ticks).unwrap_or(i64::MAX))
}

#[async_trait]
impl NodeManager for TagNodeManager {
    fn owns_node(&self, id: &NodeId) -> bool {
        id.namespace == self.namespace.load(Ordering::Relaxed)
    }

    fn name(&self) -> &str {
        "sluice-tags"
    }

    fn namespaces_for_user(&self, _context: &RequestContext) -> Vec<NamespaceMetadata> {
        vec![NamespaceMetadata {
            namespace_uri: NAMESPACE_URI.to_owned(),
            namespace_index: self.namespace.load(Ordering::Relaxed),
            ..Default::default()
        }]
    }

    async fn init(&self, type_tree: &mut DefaultTypeTree, context: ServerContext) {
        let index = type_tree.namespaces_mut().add_namespace(NAMESPACE_URI);
        self.namespace.store(index, Ordering::Relaxed);
        tokio::spawn(self.sampler.clone().run(
            self.shared.clone(),
            context.subscriptions.clone(),
            self.stop.clone(),
        ));
    }

    async fn resolve_external_references(
        &self,
        context: &RequestContext,
        items: &mut [&mut ExternalReferenceRequest],
    ) {
        let generation = self.shared.current.load();
        let space = self.space(&generation);
        let type_tree = context.get_type_tree_for_user();
        for item in items.iter_mut() {
            if space.space.find_node(item.node_id()).is_some() {
                let mut metadata = node_metadata(&space, type_tree.get(), item.node_id());
                if !item
                    .result_mask()
                    .contains(BrowseDescriptionResultMask::RESULT_MASK_TYPE_DEFINITION)
                {
                    metadata.type_definition = ExpandedNodeId::null();
                }
                item.set(metadata);
            }
        }
    }

    async fn browse(
        &self,
        context: &RequestContext,
        nodes_to_browse: &mut [BrowseNode],
    ) -> Result<(), StatusCode> {
        let generation = self.shared.current.load();
        let space = self.space(&generation);
        let objects = NodeId::from(ObjectId::ObjectsFolder);
        for node in nodes_to_browse.iter_mut() {
            if node.is_completed() {
                continue;
            }
            if let Some(pending) = node.take_continuation_point::<PendingTagReferences>() {
                let type_tree = context.get_type_tree_for_user();
                browse::add_paged(type_tree.get(), node, pending.references, |references| {
                    PendingTagReferences { references }
                });
                node.set_status(StatusCode::Good);
                continue;
            }
            if node.node_id() == &objects {
                self.browse_objects_folder(context, &space, node);
            } else if let Some(kind) = space.node(node.node_id()) {
                self.browse_owned(&generation, context, &space, node, kind)
                    .await;
            }
        }
        Ok(())
    }

    /// Translates browse paths by browsing hop by hop, so hidden tags never
    /// match.
    async fn translate_browse_paths_to_node_ids(
        &self,
        context: &RequestContext,
        nodes: &mut [&mut BrowsePathItem],
    ) -> Result<(), StatusCode> {
        impl_translate_browse_paths_using_browse(self, context, nodes).await
    }

    /// Reads attributes of tag nodes. Each read of a tag or its property is
    /// decided as `read` on the tag, and a tag's value comes from the mirror.
    async fn read(
        &self,
        context: &RequestContext,
        max_age: f64,
        timestamps_to_return: TimestampsToReturn,
        nodes_to_read: &mut [&mut ReadNode],
    ) -> Result<(), StatusCode> {
        let generation = self.shared.current.load();
        let space = self.space(&generation);
        for node in nodes_to_read.iter_mut() {
            let read = node.node().clone();
            let Some(kind) = space.node(&read.node_id) else {
                node.set_error(StatusCode::BadNodeIdUnknown);
                continue;
            };
            let tag = match kind {
                TagNode::Folder => None,
                TagNode::Tag(id) | TagNode::Property(id) => Some(&space.tags.tags()[id]),
            };
            let mut verdict =
                tag.map(|tag| self.decide(&generation, context, OpcuaService::Read, tag, None));
            if verdict.as_ref().is_some_and(|verdict| !verdict.forward) {
                node.set_error(StatusCode::BadUserAccessDenied);
            } else {
                let value = Self::read_attribute(
                    &generation,
                    context,
                    &space,
                    &read,
                    kind,
                    max_age,
                    timestamps_to_return,
                );
                if let Some(verdict) = verdict.as_mut() {
                    verdict.operation.status = value.status.unwrap_or(StatusCode::Good);
                }
                node.set_result(value);
            }
            if let (Some(tag), Some(mut verdict)) = (tag, verdict) {
                if !verdict.forward {
                    verdict.operation.status = StatusCode::BadUserAccessDenied;
                }
                self.finish(tag, verdict.operation).await;
            }
        }
        Ok(())
    }

    async fn write(
        &self,
        context: &RequestContext,
        nodes_to_write: &mut [&mut WriteNode],
    ) -> Result<(), StatusCode> {
        let generation = self.shared.current.load();
        let space = self.space(&generation);
        for node in nodes_to_write.iter_mut() {
            let status = self
                .write_tag(&generation, context, &space, node.value())
                .await;
            node.set_status(status);
        }
        Ok(())
    }

    /// Creates monitored items; each on a tag is decided as `subscribe` and
    /// starts with the tag's current value.
    async fn create_monitored_items(
        &self,
        context: &RequestContext,
        items: &mut [&mut CreateMonitoredItem],
    ) -> Result<(), StatusCode> {
        let generation = self.shared.current.load();
        let space = self.space(&generation);
        for item in items.iter_mut() {
            let read = item.item_to_monitor().clone();
            let Some(kind) = space.node(&read.node_id) else {
                continue;
            };
            let tag_id = match kind {
                TagNode::Folder => None,
                TagNode::Tag(id) | TagNode::Property(id) => Some(id),
            };
            let tag = tag_id.map(|id| &space.tags.tags()[id]);
            let verdict = tag
                .map(|tag| self.decide(&generation, context, OpcuaService::Subscribe, tag, None));
            let allowed = verdict.as_ref().is_none_or(|verdict| verdict.forward);
            let status = match allowed {
                true => {
                    let value = Self::read_attribute(
                        &generation,
                        context,
                        &space,
                        &read,
                        kind,
                        0.0,
                        item.timestamps_to_return(),
                    );
                    item.set_initial_value(value);
                    StatusCode::Good
                }
                false => StatusCode::BadUserAccessDenied,
            };
            item.set_status(status);
            if let (true, TagNode::Tag(id), AttributeId::Value) = (allowed, kind, read.attribute_id)
            {
                let tag = &space.tags.tags()[id];
                let requested = Duration::from_secs_f64(item.sampling_interval().max(0.0) / 1000.0);
                let poll = block_poll(tag, generation.policy.devices()).unwrap_or(requested);
                self.sampler.add(
                    &read.node_id,
                    tag.name.clone(),
                    item.handle(),
                    requested.max(poll),
                );
            }
            if let (Some(tag), Some(mut verdict)) = (tag, verdict) {
                verdict.operation.status = status;
                self.finish(tag, verdict.operation).await;
            }
        }
        Ok(())
    }

    async fn delete_monitored_items(&self, _context: &RequestContext, items: &[&MonitoredItemRef]) {
        for item in items {
            self.sampler.remove(item.node_id(), item.handle());
        }
    }
}

/// One monitored tag and the items that watch it.
struct Sampled {
    name: Arc<str>,
    interval: Duration,
    next_due: Instant,
    handles: HashSet<MonitoredItemHandle>,
}

/// The monitored tags of one listener, compared with the mirror at each
/// one's interval and handed to async-opcua's subscriptions, which report
/// the changes.
#[derive(Default)]
struct TagSampler {
    items: Mutex<HashMap<NodeId, Sampled>>,
}

impl TagSampler {
    fn add(&self, node: &NodeId, name: Arc<str>, handle: MonitoredItemHandle, interval: Duration) {
        let mut items = self.items.lock();
        let entry = items.entry(node.clone()).or_insert_with(|| Sampled {
            name,
            interval,
            next_due: Instant::now() + interval,
            handles: HashSet::new(),
        });
        entry.interval = entry.interval.min(interval);
        entry.handles.insert(handle);
    }

    fn remove(&self, node: &NodeId, handle: MonitoredItemHandle) {
        let mut items = self.items.lock();
        if let Some(entry) = items.get_mut(node) {
            entry.handles.remove(&handle);
            if entry.handles.is_empty() {
                items.remove(node);
            }
        }
    }

    /// Returns the tags due for a sample and schedules the next.
    fn due(&self, now: Instant) -> Vec<(NodeId, Arc<str>)> {
        let mut items = self.items.lock();
        let mut due = Vec::new();
        for (node, entry) in items.iter_mut() {
            if entry.next_due <= now {
                entry.next_due = now + entry.interval;
                due.push((node.clone(), entry.name.clone()));
            }
        }
        due
    }

    /// Samples due tags from the mirror until `stop` is cancelled.
    async fn run(
        self: Arc<Self>,
        shared: Arc<Shared>,
        subscriptions: Arc<SubscriptionCache>,
        stop: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(SAMPLE_TICK);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let due = self.due(Instant::now());
            if due.is_empty() {
                continue;
            }
            let generation = shared.current.load();
            let changes: Vec<(DataValue, NodeId)> = due
                .into_iter()
                .map(|(node, name)| {
                    let value = match generation.tags.find(&name) {
                        Some(id) => {
                            TagNodeManager::tag_value(&generation, id, TimestampsToReturn::Both)
                        }
                        // A reload removed the tag.
                        None => {
                            DataValue::new_now_status(Variant::Empty, StatusCode::BadNodeIdUnknown)
                        }
                    };
                    (value, node)
                })
                .collect();
            subscriptions.notify_data_change(
                changes
                    .iter()
                    .map(|(value, node)| (value.clone(), node, AttributeId::Value)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_time_counts_ticks_from_1601() {
        let unix_epoch = jiff::Timestamp::UNIX_EPOCH;
        assert_eq!(date_time(unix_epoch).ticks(), 116_444_736_000_000_000);
        let later = jiff::Timestamp::from_second(1).unwrap();
        assert_eq!(date_time(later).ticks(), 116_444_736_010_000_000);
    }
}
