//! The decision on one OPC UA operation of a session against the current
//! policy, shared by the node manager (each service call) and the sampler
//! (monitored items checked again after a reload). It also resolves the
//! user token async-opcua keeps for a session to the vendor it names.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use opcua::server::authenticator::UserToken;
use opcua::sync::RwLock;
use opcua::types::{NodeId, Variant};

use crate::config::OpcuaService;
use crate::modbus::generation::Shared;
use crate::policy::{Decision, OpcuaAccess, OpcuaContext, OpcuaDeviceId, Policy, VendorId};

use super::namespaces::{policy_node, Namespaces};

/// Returns the vendor a session's user token names in `policy`. Anonymous
/// sessions are the vendor with `opcua_anonymous`, looked up again each
/// time, so a reload that removes the key denies open anonymous sessions.
pub fn token_vendor(policy: &Policy, token: &UserToken) -> Option<VendorId> {
    match token.is_anonymous() {
        true => policy.opcua_anonymous_vendor(),
        false => policy.vendor_id(&token.0),
    }
}

/// Returns the vendor name to record for a session: the vendor its token
/// names, or the token itself when the current policy has no such vendor.
pub fn token_vendor_name(policy: &Policy, token: &UserToken) -> Arc<str> {
    match token_vendor(policy, token) {
        Some(vendor) => policy.vendor_name(vendor).clone(),
        None => Arc::from(token.0.as_str()),
    }
}

/// Returns the vendor of a session's `token` that may act now from
/// `source`, or why it may not: unknown to the current policy, quarantined
/// (which also ends what open sessions may do), or outside its `sources`.
/// The user token names the vendor without the client's address, so the
/// vendor's `sources` apply to each operation.
pub fn admitted_vendor(
    shared: &Shared,
    policy: &Policy,
    token: &UserToken,
    source: Option<IpAddr>,
) -> Result<VendorId, &'static str> {
    let vendor = token_vendor(policy, token).ok_or("vendor not in the current policy")?;
    if shared.quarantine.is_quarantined(policy.vendor_name(vendor)) {
        return Err("vendor quarantined");
    }
    let sources = &policy.vendors()[vendor].sources;
    if !sources.is_empty()
        && !source.is_some_and(|address| sources.iter().any(|net| net.contains(&address)))
    {
        return Err("source address outside the vendor's sources");
    }
    Ok(vendor)
}

/// The listener state one decision reads: the policy, quarantine and
/// the device's namespaces.
pub struct Decider<'a> {
    pub shared: &'a Shared,
    pub namespaces: &'a RwLock<Namespaces>,
    pub device: OpcuaDeviceId,
}

impl Decider<'_> {
    /// Decides `service` on `node` for the session of `token` and returns
    /// the decision with the label of the allowing rule. Returns the reason
    /// as an error when no decision can be made.
    pub fn evaluate(
        &self,
        source: Option<IpAddr>,
        token: &UserToken,
        service: OpcuaService,
        node: &NodeId,
        value: Option<&Variant>,
    ) -> Result<(Decision, Option<String>), &'static str> {
        let generation = self.shared.current.load();
        let policy = &generation.policy;
        let vendor = admitted_vendor(self.shared, policy, token, source)?;

        let uri = self
            .namespaces
            .read()
            .uri(node.namespace)
            .cloned()
            .ok_or("node outside the device's namespaces")?;
        let (number, non_numeric) = match value.map(numeric) {
            Some(Some(number)) => (Some(number), false),
            Some(None) => (None, true),
            None => (None, false),
        };

        let access = OpcuaAccess {
            service,
            node: policy_node(&uri, node),
            value: number,
            non_numeric_value: non_numeric,
        };
        let context = OpcuaContext {
            source,
            now: jiff::Timestamp::now(),
            instant: Instant::now(),
            states: &generation.states,
        };
        let decision = policy.decide_opcua(vendor, self.device, &access, &context);
        let label = match &decision {
            Decision::Allow { rule } => Some(policy.rule_label(*rule).to_owned()),
            Decision::Deny { .. } => None,
        };
        Ok((decision, label))
    }
}

/// Returns a written value as a number, for rules with `values`.
pub(super) fn numeric(value: &Variant) -> Option<f64> {
    match value {
        Variant::Boolean(v) => Some(f64::from(u8::from(*v))),
        Variant::SByte(v) => Some(f64::from(*v)),
        Variant::Byte(v) => Some(f64::from(*v)),
        Variant::Int16(v) => Some(f64::from(*v)),
        Variant::UInt16(v) => Some(f64::from(*v)),
        Variant::Int32(v) => Some(f64::from(*v)),
        Variant::UInt32(v) => Some(f64::from(*v)),
        Variant::Int64(v) => Some(*v as f64),
        Variant::UInt64(v) => Some(*v as f64),
        Variant::Float(v) => Some(f64::from(*v)).filter(|n| n.is_finite()),
        Variant::Double(v) => Some(*v).filter(|n| n.is_finite()),
        _ => None,
    }
}
