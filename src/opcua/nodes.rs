//! The node manager that mirrors a device's address space. Every Browse,
//! TranslateBrowsePathsToNodeIds hop, Read, Write, Call and HistoryRead
//! (in `history`) operation on a device node is decided against the
//! vendor's rules and recorded. An allowed operation goes through sluice's
//! own client session, and a denied one gets `BadUserAccessDenied` while the
//! others in its request still go through.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use opcua::client::HistoryReadAction;
use opcua::nodes::DefaultTypeTree;
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::{
    impl_translate_browse_paths_using_browse, BrowseNode, BrowsePathItem, HistoryNode, MethodCall,
    NodeManager, ReadNode, RequestContext, ServerContext, WriteNode,
};
use opcua::sync::RwLock;
use opcua::types::{
    AttributeId, BrowseDescription, CallMethodRequest, CallMethodResult, DataEncoding,
    MonitoringMode, NodeId, ObjectId, QualifiedName, ReadAtTimeDetails, ReadProcessedDetails,
    ReadRawModifiedDetails, ReadValueId, ReferenceDescription, StatusCode, TimestampsToReturn,
    Variant, WriteValue,
};

use opcua::server::node_manager::MonitoredItemRef;
use opcua::server::CreateMonitoredItem;
use tokio_util::sync::CancellationToken;

use crate::config::{Mode, OpcuaService};
use crate::detect::OpcuaDetector;
use crate::modbus::generation::Shared;
use crate::policy::{Decision, OpcuaDeviceId};

use super::access::{token_vendor_name, Decider};
use super::browse::{self, browse_device_node};
use super::front::ChannelPeers;
use super::namespaces::{node_text, Namespaces, Translator};
use super::record::{Operation, Recorder};
use super::sampler::{Recheck, Sampler, Watcher};
use super::upstream::{Connected, Upstream};

/// The mirror of one device on one listener.
pub struct DeviceNodeManager {
    pub shared: Arc<Shared>,
    pub listener: Arc<str>,
    pub mode: Mode,
    pub device: OpcuaDeviceId,
    pub upstream: Arc<Upstream>,
    pub namespaces: Arc<RwLock<Namespaces>>,
    pub sampler: Arc<Sampler>,
    /// Stops the sampler with the listener.
    pub stop: CancellationToken,
    /// The client address of each secure channel, from the front.
    pub channels: Arc<ChannelPeers>,
    /// The listener's anomaly detectors.
    pub detector: Arc<OpcuaDetector>,
}

/// The outcome of deciding one operation.
pub(super) struct Verdict {
    /// Forward the operation to the device.
    pub(super) forward: bool,
    /// The event fields of the operation; the status is set after forwarding.
    pub(super) operation: Operation,
}

impl DeviceNodeManager {
    fn decider(&self) -> Decider<'_> {
        Decider {
            shared: &self.shared,
            namespaces: &self.namespaces,
            device: self.device,
        }
    }

    /// Decides one operation and returns whether to forward it. In monitor
    /// mode denied operations are forwarded too, and recorded as such.
    pub(super) fn decide(
        &self,
        context: &RequestContext,
        service: OpcuaService,
        node: &NodeId,
        value: Option<&Variant>,
    ) -> Verdict {
        let token = context.user_token();
        let uri = self.namespaces.read().uri(node.namespace).cloned();
        let mut operation = Operation::new(service, uri.as_deref().map(|uri| node_text(uri, node)));
        operation.vendor = Some(token_vendor_name(&self.shared.current.load().policy, token));
        operation.session = Some(context.session_id());
        operation.peer = self.peer(context);
        let source = operation.peer.map(|peer| peer.ip());
        let (decision, label) = match self.decider().evaluate(source, token, service, node, value) {
            Ok(decided) => decided,
            Err(reason) => {
                operation.reason = Some(reason.to_owned());
                return Verdict {
                    forward: false,
                    operation,
                };
            }
        };
        if service == OpcuaService::Write && !self.shared.audit.is_writable() {
            operation.reason = Some("audit log cannot be written".to_owned());
            return Verdict {
                forward: false,
                operation,
            };
        }
        match decision {
            Decision::Allow { .. } => {
                operation.allowed = true;
                operation.rule = label;
                Verdict {
                    forward: true,
                    operation,
                }
            }
            Decision::Deny { reason } => {
                operation.reason = Some(reason.to_string());
                let forward = self.mode == Mode::Monitor;
                operation.enforced = !forward;
                Verdict { forward, operation }
            }
        }
    }

    /// Awaits a device request for `expected` operations, bounded by the
    /// device timeout, and checks that it returned one result for each.
    pub(super) async fn device_results<T>(
        &self,
        expected: usize,
        request: impl std::future::Future<Output = Result<Vec<T>, opcua::types::Error>>,
    ) -> Result<Vec<T>, StatusCode> {
        match tokio::time::timeout(self.upstream.timeout, request).await {
            Ok(Ok(results)) if results.len() == expected => Ok(results),
            Ok(Ok(_)) => Err(StatusCode::BadUnexpectedError),
            Ok(Err(error)) => Err(error.status()),
            Err(_) => Err(StatusCode::BadTimeout),
        }
    }

    pub(super) fn translator<'a>(&'a self, connected: &'a Connected) -> Translator<'a> {
        Translator {
            namespaces: &self.namespaces,
            device: &connected.namespaces,
        }
    }

    pub(super) async fn finish(&self, operation: Operation) {
        let recorder = Recorder {
            shared: &self.shared,
            listener: &self.listener,
            device: &self.upstream.device,
            detector: &self.detector,
        };
        recorder.finish(operation).await;
    }

    /// Adds the device's objects to sluice's Objects folder, keeping only
    /// those the vendor may browse.
    async fn browse_objects_folder(&self, context: &RequestContext, node: &mut BrowseNode) {
        let Some(connected) = self.upstream.connected() else {
            return;
        };
        let Some(references) = self
            .browse_device(&connected, node, &NodeId::from(ObjectId::ObjectsFolder))
            .await
        else {
            return;
        };
        let translator = self.translator(&connected);
        let mut visible = VecDeque::new();
        for reference in references {
            if reference.node_id.node_id.namespace == 0 {
                continue;
            }
            if let Some(reference) = self.visible_reference(context, &translator, reference) {
                visible.push_back(reference);
            }
        }
        add_paged(context, node, visible);
    }

    /// Sends one Browse operation to the device, following the device's
    /// continuation points within the bounds of `browse`. Returns its
    /// references, or `None` when it failed.
    async fn browse_device(
        &self,
        connected: &Connected,
        node: &BrowseNode,
        device_node: &NodeId,
    ) -> Option<Vec<ReferenceDescription>> {
        let translator = self.translator(connected);
        let reference_type_id = translator.to_device(node.reference_type_id())?;
        let description = BrowseDescription {
            node_id: device_node.clone(),
            browse_direction: node.browse_direction(),
            reference_type_id,
            include_subtypes: node.include_subtypes(),
            node_class_mask: node.node_class_mask().bits(),
            result_mask: node.result_mask().bits(),
        };
        let found =
            browse_device_node(&connected.session, description, self.upstream.timeout).await?;
        if found.cut {
            tracing::warn!(device = %self.upstream.device, node = %device_node, references = found.references.len(), "device browse result cut at the browse limit");
        }
        Some(found.references)
    }

    /// Translates a device reference and returns it when the vendor may
    /// browse its target. Targets in namespace 0 are standard nodes and
    /// always visible.
    fn visible_reference(
        &self,
        context: &RequestContext,
        translator: &Translator<'_>,
        reference: ReferenceDescription,
    ) -> Option<ReferenceDescription> {
        let target = translator.expanded_to_local(&reference.node_id)?;
        if target.node_id.namespace != 0 {
            let verdict = self.peek(context, OpcuaService::Browse, &target.node_id);
            if !verdict {
                return None;
            }
        }
        Some(ReferenceDescription {
            reference_type_id: translator.to_local(&reference.reference_type_id)?,
            is_forward: reference.is_forward,
            node_id: target,
            browse_name: translator.name_to_local(&reference.browse_name),
            display_name: reference.display_name,
            node_class: reference.node_class,
            type_definition: translator
                .expanded_to_local(&reference.type_definition)
                .unwrap_or_default(),
        })
    }

    /// Returns the client address of the request's secure channel.
    fn peer(&self, context: &RequestContext) -> Option<SocketAddr> {
        let channel = context.session().read().secure_channel_id();
        self.channels.peer(channel)
    }

    /// Returns whether the vendor's rules allow `service` on `node`, without
    /// recording an event; used to filter browse results.
    // NOTE: this takes a token from the vendor's rate limit per reference,
    // so a rate-limited vendor gets fewer browse results.
    fn peek(&self, context: &RequestContext, service: OpcuaService, node: &NodeId) -> bool {
        let source = self.peer(context).map(|peer| peer.ip());
        matches!(
            self.decider()
                .evaluate(source, context.user_token(), service, node, None),
            Ok((Decision::Allow { .. }, _))
        )
    }

    async fn browse_owned(&self, context: &RequestContext, node: &mut BrowseNode) {
        let verdict = self.decide(context, OpcuaService::Browse, &node.node_id().clone(), None);
        let mut operation = verdict.operation;
        if !verdict.forward {
            node.set_status(StatusCode::BadUserAccessDenied);
            operation.status = StatusCode::BadUserAccessDenied;
            self.finish(operation).await;
            return;
        }
        let Some(connected) = self.upstream.connected() else {
            node.set_status(StatusCode::BadNotConnected);
            operation.status = StatusCode::BadNotConnected;
            self.finish(operation).await;
            return;
        };
        let device_node = self.translator(&connected).to_device(node.node_id());
        let references = match device_node {
            Some(device_node) => self.browse_device(&connected, node, &device_node).await,
            None => None,
        };
        let Some(references) = references else {
            node.set_status(StatusCode::BadNodeIdUnknown);
            operation.status = StatusCode::BadNodeIdUnknown;
            self.finish(operation).await;
            return;
        };
        let translator = self.translator(&connected);
        let visible = references
            .into_iter()
            .filter_map(|reference| self.visible_reference(context, &translator, reference))
            .collect();
        add_paged(context, node, visible);
        node.set_status(StatusCode::Good);
        operation.status = StatusCode::Good;
        self.finish(operation).await;
    }
}

/// The visible references of one Browse operation that did not fit the
/// client's maximum references per node, which BrowseNext returns. The
/// browse decision was made and recorded with the Browse.
struct PendingReferences {
    references: VecDeque<ReferenceDescription>,
}

/// Adds `references` to `node`, the rest behind a continuation point.
fn add_paged(
    context: &RequestContext,
    node: &mut BrowseNode,
    references: VecDeque<ReferenceDescription>,
) {
    let type_tree = context.get_type_tree_for_user();
    browse::add_paged(type_tree.get(), node, references, |references| {
        PendingReferences { references }
    });
}

/// Returns the status of an operation that is not forwarded: denied, or
/// allowed while the device is not connected.
fn refusal_status(forward: bool) -> StatusCode {
    match forward {
        false => StatusCode::BadUserAccessDenied,
        true => StatusCode::BadNotConnected,
    }
}

#[async_trait]
impl NodeManager for DeviceNodeManager {
    fn owns_node(&self, id: &NodeId) -> bool {
        id.namespace != 0 && self.namespaces.read().contains(id.namespace)
    }

    fn name(&self) -> &str {
        "sluice-device"
    }

    fn namespaces_for_user(&self, _context: &RequestContext) -> Vec<NamespaceMetadata> {
        self.namespaces
            .read()
            .all()
            .into_iter()
            .map(|(index, uri)| NamespaceMetadata {
                namespace_uri: uri.to_string(),
                namespace_index: index,
                ..Default::default()
            })
            .collect()
    }

    async fn init(&self, type_tree: &mut DefaultTypeTree, context: ServerContext) {
        let mut namespaces = self.namespaces.write();
        if let Some(connected) = self.upstream.connected() {
            let mut known: Vec<(&String, &u16)> =
                connected.namespaces.known_namespaces().iter().collect();
            known.sort_by_key(|(_, index)| **index);
            for (uri, index) in known {
                if *index != 0 {
                    namespaces.local_index(uri, Some(type_tree));
                }
            }
        }
        namespaces.attach(context.type_tree.clone());
        tokio::spawn(super::paths::run(
            self.upstream.clone(),
            self.shared.clone(),
            self.device,
            self.stop.clone(),
        ));
        let recheck = Recheck {
            shared: self.shared.clone(),
            listener: self.listener.clone(),
            device: self.device,
            mode: self.mode,
        };
        tokio::spawn(self.sampler.clone().run(
            self.upstream.clone(),
            self.namespaces.clone(),
            context.subscriptions.clone(),
            recheck,
            self.stop.clone(),
        ));
    }

    /// Creates monitored items; each is decided as `subscribe` on its node
    /// and starts with a value read from the device.
    async fn create_monitored_items(
        &self,
        context: &RequestContext,
        items: &mut [&mut CreateMonitoredItem],
    ) -> Result<(), StatusCode> {
        let connected = self.upstream.connected();
        let mut operations = Vec::new();
        let mut allowed = Vec::new();
        let mut requests = Vec::new();
        for (position, item) in items.iter_mut().enumerate() {
            let read = item.item_to_monitor().clone();
            let verdict = self.decide(context, OpcuaService::Subscribe, &read.node_id, None);
            let mut operation = verdict.operation;
            let device_node = connected
                .as_ref()
                .and_then(|connected| self.translator(connected).to_device(&read.node_id));
            match (verdict.forward, device_node) {
                (true, Some(device_node)) => {
                    allowed.push((position, operations.len()));
                    requests.push(ReadValueId {
                        node_id: device_node,
                        attribute_id: read.attribute_id as u32,
                        index_range: read.index_range.clone(),
                        data_encoding: QualifiedName::null(),
                    });
                }
                (forward, _) => {
                    let status = refusal_status(forward);
                    item.set_status(status);
                    operation.status = status;
                }
            }
            operations.push(operation);
        }

        if let (Some(connected), false) = (&connected, requests.is_empty()) {
            let request = connected
                .session
                .read(&requests, TimestampsToReturn::Both, 0.0);
            let results = self.device_results(requests.len(), request).await;
            let translator = self.translator(connected);
            for (index, (position, operation)) in allowed.into_iter().enumerate() {
                let item = &mut items[position];
                match &results {
                    Ok(values) => {
                        let mut value = values[index].clone();
                        value.value = value.value.map(|v| translator.value_to_local(v));
                        item.set_initial_value(value);
                        item.set_status(StatusCode::Good);
                        let interval = std::time::Duration::from_secs_f64(
                            (item.sampling_interval().max(0.0)) / 1000.0,
                        );
                        let watcher = Watcher {
                            token: context.user_token().clone(),
                            session: context.session_id(),
                            peer: operations[operation].peer,
                        };
                        self.sampler.add(
                            item.item_to_monitor(),
                            item.handle(),
                            interval,
                            watcher,
                            item.monitoring_mode(),
                        );
                        operations[operation].status = StatusCode::Good;
                    }
                    Err(status) => {
                        item.set_status(*status);
                        operations[operation].status = *status;
                    }
                }
            }
        }
        for operation in operations {
            self.finish(operation).await;
        }
        Ok(())
    }

    /// Stops sampling the device for Disabled items and resumes it for the
    /// others. The server itself holds back the reports of Sampling items.
    async fn set_monitoring_mode(
        &self,
        _context: &RequestContext,
        mode: MonitoringMode,
        items: &[&MonitoredItemRef],
    ) {
        for item in items {
            self.sampler
                .set_mode(item.node_id(), item.attribute(), item.handle(), mode);
        }
    }

    async fn delete_monitored_items(&self, _context: &RequestContext, items: &[&MonitoredItemRef]) {
        for item in items {
            self.sampler
                .remove(item.node_id(), item.attribute(), item.handle());
        }
    }

    async fn browse(
        &self,
        context: &RequestContext,
        nodes_to_browse: &mut [BrowseNode],
    ) -> Result<(), StatusCode> {
        let objects = NodeId::from(ObjectId::ObjectsFolder);
        for node in nodes_to_browse.iter_mut() {
            if node.is_completed() {
                continue;
            }
            // A BrowseNext continues from this node manager's point. The
            // Objects folder can instead carry an empty point from the node
            // manager before this one, and then gets the device's objects.
            if let Some(pending) = node.take_continuation_point::<PendingReferences>() {
                add_paged(context, node, pending.references);
                node.set_status(StatusCode::Good);
                continue;
            }
            if node.node_id() == &objects {
                self.browse_objects_folder(context, node).await;
            } else if self.owns_node(node.node_id()) {
                self.browse_owned(context, node).await;
            }
        }
        Ok(())
    }

    /// Translates browse paths by browsing hop by hop, so each hop is a
    /// `browse` decision and hidden nodes never match.
    async fn translate_browse_paths_to_node_ids(
        &self,
        context: &RequestContext,
        nodes: &mut [&mut BrowsePathItem],
    ) -> Result<(), StatusCode> {
        impl_translate_browse_paths_using_browse(self, context, nodes).await
    }

    async fn history_read_raw_modified(
        &self,
        context: &RequestContext,
        details: &ReadRawModifiedDetails,
        nodes: &mut [&mut HistoryNode],
        timestamps_to_return: TimestampsToReturn,
    ) -> Result<(), StatusCode> {
        let details = HistoryReadAction::ReadRawModifiedDetails(details.clone());
        self.history_read_nodes(context, details, nodes, timestamps_to_return)
            .await
    }

    /// Reads processed values. The aggregates are standard nodes in
    /// namespace 0 or nodes of the device.
    async fn history_read_processed(
        &self,
        context: &RequestContext,
        details: &ReadProcessedDetails,
        nodes: &mut [&mut HistoryNode],
        timestamps_to_return: TimestampsToReturn,
    ) -> Result<(), StatusCode> {
        let mut details = details.clone();
        // Without a device session each node is recorded as not connected.
        if let (Some(connected), Some(aggregates)) =
            (self.upstream.connected(), &mut details.aggregate_type)
        {
            let translator = self.translator(&connected);
            for aggregate in aggregates.iter_mut() {
                *aggregate = translator
                    .to_device(aggregate)
                    .ok_or(StatusCode::BadAggregateNotSupported)?;
            }
        }
        let details = HistoryReadAction::ReadProcessedDetails(details);
        self.history_read_nodes(context, details, nodes, timestamps_to_return)
            .await
    }

    async fn history_read_at_time(
        &self,
        context: &RequestContext,
        details: &ReadAtTimeDetails,
        nodes: &mut [&mut HistoryNode],
        timestamps_to_return: TimestampsToReturn,
    ) -> Result<(), StatusCode> {
        let details = HistoryReadAction::ReadAtTimeDetails(details.clone());
        self.history_read_nodes(context, details, nodes, timestamps_to_return)
            .await
    }

    async fn read(
        &self,
        context: &RequestContext,
        max_age: f64,
        timestamps_to_return: TimestampsToReturn,
        nodes_to_read: &mut [&mut ReadNode],
    ) -> Result<(), StatusCode> {
        let connected = self.upstream.connected();
        let mut forwarded = Vec::new();
        let mut requests = Vec::new();
        let mut operations = Vec::new();
        for (position, node) in nodes_to_read.iter_mut().enumerate() {
            let read = node.node().clone();
            let verdict = self.decide(context, OpcuaService::Read, &read.node_id, None);
            let mut operation = verdict.operation;
            let device_node = connected
                .as_ref()
                .and_then(|connected| self.translator(connected).to_device(&read.node_id));
            let status = match (verdict.forward, &device_node, &read.data_encoding) {
                (false, _, _) => StatusCode::BadUserAccessDenied,
                (true, None, _) => StatusCode::BadNotConnected,
                (true, Some(_), DataEncoding::Binary) => StatusCode::Good,
                (true, Some(_), _) => StatusCode::BadDataEncodingUnsupported,
            };
            if status.is_good() {
                forwarded.push((position, operations.len()));
                requests.push(ReadValueId {
                    node_id: device_node.unwrap_or_default(),
                    attribute_id: read.attribute_id as u32,
                    index_range: read.index_range.clone(),
                    data_encoding: QualifiedName::null(),
                });
            } else {
                node.set_error(status);
                operation.status = status;
            }
            operations.push(operation);
        }

        if let (Some(connected), false) = (&connected, requests.is_empty()) {
            let request = connected
                .session
                .read(&requests, timestamps_to_return, max_age);
            let results = self.device_results(requests.len(), request).await;
            let translator = self.translator(connected);
            match results {
                Ok(values) => {
                    for ((position, operation), mut value) in forwarded.into_iter().zip(values) {
                        value.value = value.value.map(|v| translator.value_to_local(v));
                        operations[operation].status = value.status.unwrap_or(StatusCode::Good);
                        nodes_to_read[position].set_result(value);
                    }
                }
                Err(status) => {
                    for (position, operation) in forwarded {
                        operations[operation].status = status;
                        nodes_to_read[position].set_error(status);
                    }
                }
            }
        }
        for operation in operations {
            self.finish(operation).await;
        }
        Ok(())
    }

    async fn write(
        &self,
        context: &RequestContext,
        nodes_to_write: &mut [&mut WriteNode],
    ) -> Result<(), StatusCode> {
        let connected = self.upstream.connected();
        let mut forwarded = Vec::new();
        let mut requests = Vec::new();
        let mut operations = Vec::new();
        for (position, node) in nodes_to_write.iter_mut().enumerate() {
            let write = node.value().clone();
            // Only values are numbers a rule can limit; other attributes
            // are decided as writes of a non-numeric value.
            let value = match write.attribute_id {
                AttributeId::Value => write.value.value.clone().unwrap_or(Variant::Empty),
                _ => Variant::Empty,
            };
            let verdict = self.decide(context, OpcuaService::Write, &write.node_id, Some(&value));
            let mut operation = verdict.operation;
            let device_node = connected
                .as_ref()
                .and_then(|connected| self.translator(connected).to_device(&write.node_id));
            match (verdict.forward, device_node) {
                (true, Some(device_node)) => {
                    forwarded.push((position, operations.len()));
                    requests.push(WriteValue {
                        node_id: device_node,
                        attribute_id: write.attribute_id as u32,
                        index_range: write.index_range.clone(),
                        value: write.value.clone(),
                    });
                }
                (forward, _) => {
                    let status = refusal_status(forward);
                    node.set_status(status);
                    operation.status = status;
                }
            }
            operations.push(operation);
        }

        if let (Some(connected), false) = (&connected, requests.is_empty()) {
            let request = connected.session.write(&requests);
            let results = self.device_results(requests.len(), request).await;
            for (index, (position, operation)) in forwarded.into_iter().enumerate() {
                let status = match &results {
                    Ok(statuses) => statuses[index],
                    Err(status) => *status,
                };
                operations[operation].status = status;
                nodes_to_write[position].set_status(status);
            }
        }
        for operation in operations {
            self.finish(operation).await;
        }
        Ok(())
    }

    /// Calls methods; each call is decided as `call` on the method node.
    async fn call(
        &self,
        context: &RequestContext,
        methods_to_call: &mut [&mut MethodCall],
    ) -> Result<(), StatusCode> {
        let connected = self.upstream.connected();
        let mut forwarded = Vec::new();
        let mut requests = Vec::new();
        let mut operations = Vec::new();
        for (position, method) in methods_to_call.iter_mut().enumerate() {
            let verdict = self.decide(context, OpcuaService::Call, method.method_id(), None);
            let mut operation = verdict.operation;
            let translated = connected.as_ref().and_then(|connected| {
                let translator = self.translator(connected);
                Some(CallMethodRequest {
                    object_id: translator.to_device(method.object_id())?,
                    method_id: translator.to_device(method.method_id())?,
                    input_arguments: Some(method.arguments().to_vec()),
                })
            });
            match (verdict.forward, translated) {
                (true, Some(request)) => {
                    forwarded.push((position, operations.len()));
                    requests.push(request);
                }
                (forward, _) => {
                    let status = refusal_status(forward);
                    method.set_status(status);
                    operation.status = status;
                }
            }
            operations.push(operation);
        }

        if let (Some(connected), false) = (&connected, requests.is_empty()) {
            let request = connected.session.call(requests.clone());
            let results = self.device_results(requests.len(), request).await;
            let translator = self.translator(connected);
            for (index, (position, operation)) in forwarded.into_iter().enumerate() {
                let status = match &results {
                    Ok(results) => {
                        apply_call_result(&translator, methods_to_call[position], &results[index])
                    }
                    Err(status) => {
                        methods_to_call[position].set_status(*status);
                        *status
                    }
                };
                operations[operation].status = status;
            }
        }
        for operation in operations {
            self.finish(operation).await;
        }
        Ok(())
    }
}

/// Copies a device's method result to the client's call; returns its status.
fn apply_call_result(
    translator: &Translator<'_>,
    method: &mut MethodCall,
    result: &CallMethodResult,
) -> StatusCode {
    let argument_results = result.input_argument_results.clone().unwrap_or_default();
    if result.status_code == StatusCode::BadInvalidArgument
        && argument_results.len() == method.arguments().len()
    {
        method.set_argument_error(argument_results);
        return StatusCode::BadInvalidArgument;
    }
    let outputs = result
        .output_arguments
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|value| translator.value_to_local(value))
        .collect();
    method.set_outputs(outputs);
    method.set_status(result.status_code);
    result.status_code
}
