//! Browsing a device through sluice's client session: one Browse request
//! and the BrowseNext requests that follow the device's continuation
//! points, with bounds on both. Also the paging of sluice's own Browse
//! results behind continuation points.

use std::collections::VecDeque;
use std::time::Duration;

use opcua::client::Session;
use opcua::nodes::TypeTree;
use opcua::server::node_manager::{AddReferenceResult, BrowseNode};
use opcua::types::{BrowseDescription, BrowseResult, ByteString, ReferenceDescription};

/// Maximum Browse and BrowseNext requests sent to the device for one Browse
/// operation, when the device keeps references behind continuation points.
pub const DEVICE_BROWSE_PAGES_MAX: usize = 64;
/// Maximum references kept from the device for one Browse operation.
pub const DEVICE_REFERENCES_MAX: usize = 10_000;

/// The references of one node on the device.
pub struct DeviceReferences {
    pub references: Vec<ReferenceDescription>,
    /// True when the device had more than the bounds let sluice fetch.
    pub cut: bool,
}

/// Browses one node on the device and follows its continuation points,
/// each request bounded by `timeout`. Returns `None` when the first
/// request fails or its status is bad; a later failure ends the list early.
pub async fn browse_device_node(
    session: &Session,
    description: BrowseDescription,
    timeout: Duration,
) -> Option<DeviceReferences> {
    let request = session.browse(std::slice::from_ref(&description), 0, None);
    let result = first_result(request, timeout).await?;
    if !result.status_code.is_good() {
        return None;
    }
    let mut references = result.references.unwrap_or_default();
    let mut point = result.continuation_point;
    let mut pages = 1;
    while !point.is_null_or_empty()
        && pages < DEVICE_BROWSE_PAGES_MAX
        && references.len() < DEVICE_REFERENCES_MAX
    {
        let request = session.browse_next(false, std::slice::from_ref(&point));
        match first_result(request, timeout).await {
            Some(next) if next.status_code.is_good() => {
                references.extend(next.references.unwrap_or_default());
                point = next.continuation_point;
                pages += 1;
            }
            _ => {
                point = ByteString::null();
                break;
            }
        }
    }
    let cut = !point.is_null_or_empty() || references.len() > DEVICE_REFERENCES_MAX;
    if !point.is_null_or_empty() {
        let release = session.browse_next(true, std::slice::from_ref(&point));
        // A failed release leaves the point to the device's own limits.
        let _ = tokio::time::timeout(timeout, release).await;
    }
    references.truncate(DEVICE_REFERENCES_MAX);
    Some(DeviceReferences { references, cut })
}

/// Awaits a Browse or BrowseNext request, bounded by `timeout`, and returns
/// its one result.
async fn first_result(
    request: impl std::future::Future<Output = Result<Vec<BrowseResult>, opcua::types::Error>>,
    timeout: Duration,
) -> Option<BrowseResult> {
    let results = tokio::time::timeout(timeout, request).await.ok()?.ok()?;
    results.into_iter().next()
}

/// Adds `references` to `node` until it is full and keeps the rest behind
/// a continuation point, the value `pending` makes of them. Each node
/// manager passes its own type, so that a BrowseNext reaches only the
/// manager that paged the result.
pub fn add_paged<T: Send + Sync + 'static>(
    type_tree: &dyn TypeTree,
    node: &mut BrowseNode,
    mut references: VecDeque<ReferenceDescription>,
    pending: impl FnOnce(VecDeque<ReferenceDescription>) -> T,
) {
    while let Some(reference) = references.pop_front() {
        if let AddReferenceResult::Full(reference) = node.add(type_tree, reference) {
            references.push_front(reference);
            node.set_next_continuation_point(Box::new(pending(references)));
            return;
        }
    }
}
