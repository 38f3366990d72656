//! Namespace index translation between sluice's server and one device.
//! Namespace 0 is the OPC UA standard namespace on both sides and keeps its
//! index. Every other device namespace gets an index of sluice's own, found
//! by its URI, so clients never see the device's indexes.

use std::collections::HashMap;
use std::sync::Arc;

use opcua::nodes::DefaultTypeTree;
use opcua::sync::RwLock;
use opcua::types::{
    ExpandedNodeId, Identifier, NamespaceMap, NodeId, QualifiedName, UAString, Variant,
};

use crate::policy::{NodeIdRef, OpcuaNode};

/// The device namespaces known to sluice's server, by local index.
#[derive(Default)]
pub struct Namespaces {
    /// Local index to namespace URI, for the namespaces of the device.
    by_index: HashMap<u16, Arc<str>>,
    /// The server's type tree, which owns the namespace array clients read.
    type_tree: Option<Arc<RwLock<DefaultTypeTree>>>,
}

impl Namespaces {
    pub fn attach(&mut self, type_tree: Arc<RwLock<DefaultTypeTree>>) {
        self.type_tree = Some(type_tree);
    }

    /// Returns every device namespace with its local index.
    pub fn all(&self) -> Vec<(u16, Arc<str>)> {
        let mut all: Vec<_> = self
            .by_index
            .iter()
            .map(|(index, uri)| (*index, uri.clone()))
            .collect();
        all.sort();
        all
    }

    pub fn contains(&self, index: u16) -> bool {
        self.by_index.contains_key(&index)
    }

    pub fn uri(&self, index: u16) -> Option<&Arc<str>> {
        self.by_index.get(&index)
    }

    /// Returns the local index of `uri`, adding the namespace to the server
    /// when it is new.
    pub fn local_index(&mut self, uri: &str, type_tree: Option<&mut DefaultTypeTree>) -> u16 {
        if let Some((index, _)) = self.by_index.iter().find(|(_, known)| &***known == uri) {
            return *index;
        }
        let index = match (type_tree, &self.type_tree) {
            (Some(tree), _) => tree.namespaces_mut().add_namespace(uri),
            (None, Some(shared)) => shared.write().namespaces_mut().add_namespace(uri),
            // Before the server starts there is no type tree; `init` adds the
            // namespaces then.
            (None, None) => return u16::MAX,
        };
        self.by_index.insert(index, Arc::from(uri));
        index
    }
}

/// Translates node ids of one request between local and device indexes.
pub struct Translator<'a> {
    pub namespaces: &'a RwLock<Namespaces>,
    pub device: &'a NamespaceMap,
}

impl Translator<'_> {
    /// Returns the device's node id for a local one, or `None` when the
    /// device does not have that namespace now.
    pub fn to_device(&self, local: &NodeId) -> Option<NodeId> {
        if local.namespace == 0 {
            return Some(local.clone());
        }
        let uri = self.namespaces.read().uri(local.namespace)?.clone();
        let index = self.device.get_index(&uri)?;
        Some(NodeId {
            namespace: index,
            identifier: local.identifier.clone(),
        })
    }

    fn local_namespace(&self, device_index: u16) -> Option<u16> {
        if device_index == 0 {
            return Some(0);
        }
        let uri = self
            .device
            .known_namespaces()
            .iter()
            .find(|(_, index)| **index == device_index)
            .map(|(uri, _)| uri.clone())?;
        Some(self.namespaces.write().local_index(&uri, None))
    }

    /// Returns the local node id for one of the device, or `None` when the
    /// device index is not in its namespace array.
    pub fn to_local(&self, device: &NodeId) -> Option<NodeId> {
        Some(NodeId {
            namespace: self.local_namespace(device.namespace)?,
            identifier: device.identifier.clone(),
        })
    }

    pub fn expanded_to_local(&self, device: &ExpandedNodeId) -> Option<ExpandedNodeId> {
        if device.server_index != 0 || !device.namespace_uri.is_null() {
            return Some(device.clone());
        }
        Some(ExpandedNodeId {
            node_id: self.to_local(&device.node_id)?,
            namespace_uri: UAString::null(),
            server_index: 0,
        })
    }

    pub fn name_to_local(&self, name: &QualifiedName) -> QualifiedName {
        QualifiedName {
            namespace_index: self.local_namespace(name.namespace_index).unwrap_or(0),
            name: name.name.clone(),
        }
    }

    /// Translates the namespace indexes a value carries. Values of other
    /// types, arrays included, pass unchanged.
    pub fn value_to_local(&self, value: Variant) -> Variant {
        match value {
            Variant::NodeId(id) => match self.to_local(&id) {
                Some(local) => Variant::NodeId(Box::new(local)),
                None => Variant::NodeId(id),
            },
            Variant::ExpandedNodeId(id) => match self.expanded_to_local(&id) {
                Some(local) => Variant::ExpandedNodeId(Box::new(local)),
                None => Variant::ExpandedNodeId(id),
            },
            Variant::QualifiedName(name) => {
                Variant::QualifiedName(Box::new(self.name_to_local(&name)))
            }
            other => other,
        }
    }
}

/// Returns the node a policy decision is about, or `None` for a namespace
/// the server does not map.
pub fn policy_node<'a>(uri: &'a str, id: &'a NodeId) -> OpcuaNode<'a> {
    let id = match &id.identifier {
        Identifier::String(text) => NodeIdRef::String(text.as_ref()),
        Identifier::Numeric(number) => NodeIdRef::Numeric(*number),
        _ => NodeIdRef::Other,
    };
    OpcuaNode {
        namespace_uri: uri,
        id,
    }
}

/// Writes a node id in the `nsu=URI;s=...` form used in rules and events.
pub fn node_text(uri: &str, id: &NodeId) -> String {
    match &id.identifier {
        Identifier::String(text) => format!("nsu={uri};s={}", text.as_ref()),
        Identifier::Numeric(number) => format!("nsu={uri};i={number}"),
        Identifier::Guid(guid) => format!("nsu={uri};g={guid}"),
        Identifier::ByteString(bytes) => format!("nsu={uri};b={}", bytes.as_base64()),
    }
}
