//! Resolution of the browse-path patterns in rules (`nsu=URI;path=/A/B`)
//! on one device. It runs whenever sluice's session to the device is new
//! or the policy snapshot changed. Each path is translated on the device
//! with TranslateBrowsePathsToNodeIds, and the subtree below its node is
//! walked over hierarchical references within a depth and a node count
//! bound. The policy's subtrees then contain those nodes. Until then, and
//! for a path the device does not have, they match nothing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use opcua::types::{
    BrowseDescription, BrowseDirection, BrowsePath, Identifier, NodeId, ObjectId, QualifiedName,
    ReferenceTypeId, RelativePath, RelativePathElement,
};
use tokio_util::sync::CancellationToken;

use crate::events::{Event, EventType};
use crate::modbus::generation::{Generation, Shared};
use crate::policy::{OpcuaDeviceId, Subtree, SubtreeId, SubtreeNode};

use super::browse::browse_device_node;
use super::upstream::{Connected, Upstream};

/// How often the resolver looks for a new device session or policy.
const RESOLVE_POLL: Duration = Duration::from_millis(250);
/// Pause before resolving again after the device failed to respond.
const RETRY_DELAY: Duration = Duration::from_secs(5);
/// Maximum levels below a path's node that the walk visits.
pub const SUBTREE_DEPTH_MAX: usize = 16;
/// Maximum nodes of one subtree, its root included.
pub const SUBTREE_NODES_MAX: usize = 10_000;

/// The nodes found for one path, by device node id.
struct Walk {
    nodes: Vec<NodeId>,
    /// The bound that stopped the walk early, if any.
    capped: Option<&'static str>,
}

/// Resolves the path patterns of `device` until `stop` is cancelled.
pub async fn run(
    upstream: Arc<Upstream>,
    shared: Arc<Shared>,
    device: OpcuaDeviceId,
    stop: CancellationToken,
) {
    let mut resolved: Option<(Arc<Connected>, Arc<Generation>)> = None;
    let mut ticker = tokio::time::interval(RESOLVE_POLL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Some(connected) = upstream.connected() else {
            continue;
        };
        let generation = shared.current.load_full();
        let current = resolved.as_ref().is_some_and(|(session, policy)| {
            Arc::ptr_eq(session, &connected) && Arc::ptr_eq(policy, &generation)
        });
        if current {
            continue;
        }
        let subtrees = generation.policy.opcua_subtrees(device);
        if resolve_all(&upstream, &shared, &connected, &subtrees).await {
            resolved = Some((connected, generation));
        } else {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RETRY_DELAY) => {}
            }
        }
    }
}

/// Resolves every subtree, walking each distinct path once. Returns false
/// when the device failed to respond, so that the caller tries again.
async fn resolve_all(
    upstream: &Upstream,
    shared: &Shared,
    connected: &Connected,
    subtrees: &[Arc<Subtree>],
) -> bool {
    let mut walked: HashMap<(&str, &[String]), HashSet<SubtreeNode>> = HashMap::new();
    for subtree in subtrees {
        let key = (subtree.namespace_uri.as_str(), subtree.path.as_slice());
        if let Some(nodes) = walked.get(&key) {
            subtree.set_nodes(nodes.clone());
            continue;
        }
        let Some(walk) = resolve(upstream, connected, subtree).await else {
            return false;
        };
        if let Some(bound) = walk.capped {
            record_capped(upstream, shared, subtree, walk.nodes.len(), bound).await;
        }
        let nodes = subtree_nodes(connected, &walk.nodes);
        tracing::info!(device = %upstream.device, path = %path_text(subtree), nodes = nodes.len(), "browse path resolved");
        subtree.set_nodes(nodes.clone());
        walked.insert(key, nodes);
    }
    true
}

/// Translates one path on the device and walks the subtree below it.
/// A path the device does not have resolves to no nodes, and `None` means
/// the device did not respond.
async fn resolve(upstream: &Upstream, connected: &Connected, subtree: &Subtree) -> Option<Walk> {
    let empty = Walk {
        nodes: Vec::new(),
        capped: None,
    };
    let Some(namespace) = connected.namespaces.get_index(&subtree.namespace_uri) else {
        tracing::warn!(device = %upstream.device, path = %path_text(subtree), "browse path names a namespace the device does not have");
        return Some(empty);
    };
    let elements = subtree
        .path
        .iter()
        .map(|name| RelativePathElement {
            reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
            is_inverse: false,
            include_subtypes: true,
            target_name: QualifiedName::new(namespace, name.as_str()),
        })
        .collect();
    let path = BrowsePath {
        starting_node: ObjectId::ObjectsFolder.into(),
        relative_path: RelativePath {
            elements: Some(elements),
        },
    };
    let request = connected
        .session
        .translate_browse_paths_to_node_ids(std::slice::from_ref(&path));
    let results = tokio::time::timeout(upstream.timeout, request)
        .await
        .ok()?
        .ok()?;
    let target = results.into_iter().next().and_then(|result| {
        let targets = result.targets.unwrap_or_default();
        let found = targets.into_iter().find(|target| {
            target.remaining_path_index == u32::MAX && target.target_id.server_index == 0
        });
        found.filter(|_| result.status_code.is_good())
    });
    let Some(target) = target else {
        tracing::warn!(device = %upstream.device, path = %path_text(subtree), "browse path not found on the device");
        return Some(empty);
    };
    walk_subtree(upstream, connected, target.target_id.node_id).await
}

/// Visits `root` and the nodes below it over forward hierarchical
/// references, breadth first, within `SUBTREE_DEPTH_MAX` levels and
/// `SUBTREE_NODES_MAX` nodes.
async fn walk_subtree(upstream: &Upstream, connected: &Connected, root: NodeId) -> Option<Walk> {
    let mut seen = HashSet::from([root.clone()]);
    let mut nodes = vec![root.clone()];
    let mut level = VecDeque::from([root]);
    let mut capped = None;
    for depth in 0..=SUBTREE_DEPTH_MAX {
        let mut next = VecDeque::new();
        while let Some(parent) = level.pop_front() {
            let found = browse_device_node(
                &connected.session,
                hierarchical_children(parent),
                upstream.timeout,
            )
            .await?;
            if found.cut {
                capped = Some("references of one node");
            }
            for reference in found.references {
                let child = reference.node_id;
                if child.server_index != 0 || !child.namespace_uri.is_null() {
                    continue;
                }
                if seen.contains(&child.node_id) {
                    continue;
                }
                // The walk looks one level past the bound only to tell
                // whether the bound cut the subtree.
                if depth == SUBTREE_DEPTH_MAX {
                    return Some(Walk {
                        nodes,
                        capped: Some("depth"),
                    });
                }
                if nodes.len() >= SUBTREE_NODES_MAX {
                    return Some(Walk {
                        nodes,
                        capped: Some("node count"),
                    });
                }
                seen.insert(child.node_id.clone());
                nodes.push(child.node_id.clone());
                next.push_back(child.node_id);
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    Some(Walk { nodes, capped })
}

fn hierarchical_children(node: NodeId) -> BrowseDescription {
    BrowseDescription {
        node_id: node,
        browse_direction: BrowseDirection::Forward,
        reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
        include_subtypes: true,
        node_class_mask: 0,
        result_mask: 0,
    }
}

/// Returns the walked nodes by namespace URI, the form rules use.
fn subtree_nodes(connected: &Connected, nodes: &[NodeId]) -> HashSet<SubtreeNode> {
    let uris: HashMap<u16, &String> = connected
        .namespaces
        .known_namespaces()
        .iter()
        .map(|(uri, index)| (*index, uri))
        .collect();
    nodes
        .iter()
        .filter_map(|node| {
            let uri = uris.get(&node.namespace)?;
            let id = match &node.identifier {
                Identifier::String(text) => SubtreeId::String(text.as_ref().to_owned()),
                Identifier::Numeric(number) => SubtreeId::Numeric(*number),
                _ => return None,
            };
            Some(SubtreeNode {
                namespace_uri: (*uri).clone(),
                id,
            })
        })
        .collect()
}

/// Writes a subtree's pattern as rules do.
fn path_text(subtree: &Subtree) -> String {
    let names: Vec<String> = subtree
        .path
        .iter()
        .map(|name| name.replace('\\', "\\\\").replace('/', "\\/"))
        .collect();
    format!("nsu={};path=/{}", subtree.namespace_uri, names.join("/"))
}

/// Logs and records that a bound cut a subtree, so that the rule allows
/// fewer nodes than the device has below the path.
async fn record_capped(
    upstream: &Upstream,
    shared: &Shared,
    subtree: &Subtree,
    nodes: usize,
    bound: &'static str,
) {
    let path = path_text(subtree);
    tracing::warn!(device = %upstream.device, %path, nodes, bound, "browse path subtree cut at a bound");
    let mut event = Event::new(EventType::System);
    event.action = Some("opcua_subtree_capped");
    event.device = Some(upstream.device.clone());
    event.detail = Some(serde_json::json!({
        "path": path,
        "nodes": nodes,
        "bound": bound,
        "depth_max": SUBTREE_DEPTH_MAX,
        "nodes_max": SUBTREE_NODES_MAX,
    }));
    if let Err(error) = shared.emitter.emit(event).await {
        tracing::error!(%error, "event not recorded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_text_escapes_separators() {
        let subtree = Subtree::new(0, "urn:plant:line1", &["A/B".to_owned(), r"C\D".to_owned()]);
        assert_eq!(path_text(&subtree), r"nsu=urn:plant:line1;path=/A\/B/C\\D");
    }
}
