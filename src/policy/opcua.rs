//! OPC UA decisions: the compiled OPC UA rules of the snapshot and
//! `Policy::decide_opcua`, which shares the `when` conditions and rate
//! limits with the Modbus `decide`. The lookups of vendors by user token are
//! here too, so that the server gets identities from the policy alone.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use crate::config::{
    ListenerLimits, Mode, NodeIdPattern, NodePattern, OpcuaDeviceConfig, OpcuaListenerConfig,
    OpcuaService, ValueRange,
};

use super::rate::RateLimiter;
use super::reason::{Condition, DenyReason};
use super::{
    deny, CompiledWhen, Context, Decision, DeviceId, Policy, RuleRef, StateTable, VendorId,
};

/// Index of a device in `Policy::opcua_devices`.
pub type OpcuaDeviceId = usize;

/// An OPC UA listener: the server settings and the device it mirrors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpcuaListenerPlan {
    pub name: Arc<str>,
    pub bind: SocketAddr,
    pub mode: Mode,
    /// The mirrored device; `None` for a listener that serves only tags.
    pub device: Option<OpcuaDeviceId>,
    pub limits: ListenerLimits,
    pub server: OpcuaListenerConfig,
}

/// The node an OPC UA operation touches, by namespace URI and identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpcuaNode<'a> {
    pub namespace_uri: &'a str,
    pub id: NodeIdRef<'a>,
}

/// The identifier of a node; GUID and opaque identifiers match no pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeIdRef<'a> {
    String(&'a str),
    Numeric(u32),
    Other,
}

/// One operation of an OPC UA service call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpcuaAccess<'a> {
    pub service: OpcuaService,
    pub node: OpcuaNode<'a>,
    /// The value written, when it is a number.
    pub value: Option<f64>,
    /// True when a written value is not a number, such as a string.
    pub non_numeric_value: bool,
}

/// The source and time of an OPC UA operation. The source address is
/// `None` when the front has no peer for the session's secure channel.
#[derive(Debug, Clone, Copy)]
pub struct OpcuaContext<'a> {
    pub source: Option<IpAddr>,
    pub now: jiff::Timestamp,
    pub instant: Instant,
    pub states: &'a StateTable,
}

/// The nodes an OPC UA rule allows access to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpcuaTarget {
    /// The nodes of an OPC UA device that a listener mirrors.
    Device(OpcuaDeviceId),
    /// The tag nodes over a Modbus device.
    Tags(DeviceId),
}

/// A rule for an OPC UA device or for the tags of a Modbus device,
/// compiled for matching.
#[derive(Debug)]
pub(super) struct CompiledOpcuaRule {
    pub rule: RuleRef,
    pub target: OpcuaTarget,
    /// Bit `1 << service` for each allowed service.
    pub services: u8,
    pub nodes: Box<[NodePattern]>,
    /// One subtree per `path=` pattern of `nodes`.
    pub subtrees: Box<[Arc<Subtree>]>,
    pub values: Option<Box<[ValueRange]>>,
    pub when: Option<Box<CompiledWhen>>,
    pub rate: Option<Box<RateLimiter>>,
}

/// A node of a resolved subtree, by namespace URI and identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubtreeNode {
    pub namespace_uri: String,
    pub id: SubtreeId,
}

/// The identifier of a subtree node. Nodes with GUID or opaque identifiers
/// are left out, because no pattern can name them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SubtreeId {
    String(String),
    Numeric(u32),
}

/// The nodes a `path=` pattern names on one device: the node the browse
/// path leads to and the nodes below it. sluice's session to the device
/// fills it. Until then it is empty and the pattern matches nothing.
#[derive(Debug)]
pub struct Subtree {
    pub device: OpcuaDeviceId,
    pub namespace_uri: String,
    /// Browse names from the Objects folder down, in `namespace_uri`.
    pub path: Vec<String>,
    nodes: RwLock<HashSet<SubtreeNode>>,
}

impl Subtree {
    pub fn new(device: OpcuaDeviceId, namespace_uri: &str, path: &[String]) -> Subtree {
        Subtree {
            device,
            namespace_uri: namespace_uri.to_owned(),
            path: path.to_vec(),
            nodes: RwLock::default(),
        }
    }

    /// Replaces the nodes with those of a new resolution.
    pub fn set_nodes(&self, nodes: HashSet<SubtreeNode>) {
        *self
            .nodes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = nodes;
    }

    pub fn contains(&self, node: &OpcuaNode<'_>) -> bool {
        let id = match node.id {
            NodeIdRef::String(text) => SubtreeId::String(text.to_owned()),
            NodeIdRef::Numeric(number) => SubtreeId::Numeric(number),
            NodeIdRef::Other => return false,
        };
        let key = SubtreeNode {
            namespace_uri: node.namespace_uri.to_owned(),
            id,
        };
        self.nodes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(&key)
    }

    pub fn len(&self) -> usize {
        self.nodes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Creates an empty subtree for each `path=` pattern of a rule on `device`.
pub(super) fn compile_subtrees(
    device: OpcuaDeviceId,
    nodes: &[NodePattern],
) -> Box<[Arc<Subtree>]> {
    nodes
        .iter()
        .filter_map(|pattern| match &pattern.id {
            NodeIdPattern::Path(path) => {
                Some(Arc::new(Subtree::new(device, &pattern.namespace_uri, path)))
            }
            _ => None,
        })
        .collect()
}

/// Users and certificates that identify vendors on OPC UA listeners.
#[derive(Debug, Default)]
pub(super) struct OpcuaIdentities {
    /// Username, argon2id PHC hash and vendor.
    pub users: Vec<(String, String, VendorId)>,
    /// SHA-1 certificate thumbprint and vendor.
    pub certificates: Vec<([u8; 20], VendorId)>,
    /// The vendor of anonymous sessions, from `opcua_anonymous`.
    pub anonymous: Option<VendorId>,
}

pub(super) fn service_bit(service: OpcuaService) -> u8 {
    1 << (service as u8)
}

/// Matches `text` against a glob where `*` is any run of characters and `?`
/// one character. Iterative with one backtrack point, so the cost is at most
/// the product of the two lengths.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

fn node_matches(pattern: &NodePattern, node: &OpcuaNode<'_>) -> bool {
    if pattern.namespace_uri != node.namespace_uri {
        return false;
    }
    match (&pattern.id, node.id) {
        (NodeIdPattern::String(glob), NodeIdRef::String(id)) => glob_matches(glob, id),
        (NodeIdPattern::Numeric(number), NodeIdRef::Numeric(id)) => *number == id,
        // Paths match through the rule's resolved subtrees.
        _ => false,
    }
}

impl Policy {
    pub fn opcua_listeners(&self) -> &[OpcuaListenerPlan] {
        &self.opcua.listeners
    }

    pub fn opcua_devices(&self) -> &[OpcuaDeviceConfig] {
        &self.opcua.devices
    }

    /// Returns the subtree of every `path=` pattern in rules for `device`.
    pub fn opcua_subtrees(&self, device: OpcuaDeviceId) -> Vec<Arc<Subtree>> {
        self.opcua
            .rules
            .iter()
            .filter(|rule| matches!(rule.target, OpcuaTarget::Device(id) if id == device))
            .flat_map(|rule| rule.subtrees.iter().cloned())
            .collect()
    }

    /// Returns the vendor whose `opcua_users` contains `username` and its
    /// argon2id hash. The caller verifies the password.
    pub fn opcua_user(&self, username: &str) -> Option<(VendorId, &str)> {
        self.opcua
            .identities
            .users
            .iter()
            .find(|(name, _, _)| name == username)
            .map(|(_, hash, vendor)| (*vendor, hash.as_str()))
    }

    /// Returns the vendor whose `opcua_user_certificates` contains a certificate
    /// with this SHA-1 thumbprint.
    pub fn opcua_certificate_vendor(&self, thumbprint: &[u8]) -> Option<VendorId> {
        self.opcua
            .identities
            .certificates
            .iter()
            .find(|(known, _)| known.as_slice() == thumbprint)
            .map(|(_, vendor)| *vendor)
    }

    /// Returns the vendor that anonymous OPC UA sessions are, if one sets
    /// `opcua_anonymous`.
    pub fn opcua_anonymous_vendor(&self) -> Option<VendorId> {
        self.opcua.identities.anonymous
    }

    /// Decides one OPC UA operation of `vendor` on `device`. Default deny:
    /// allowed only when one rule names the service and the node, allows the
    /// written value, and all of its conditions hold.
    pub fn decide_opcua(
        &self,
        vendor: VendorId,
        device: OpcuaDeviceId,
        access: &OpcuaAccess<'_>,
        context: &OpcuaContext<'_>,
    ) -> Decision {
        self.decide_target(vendor, OpcuaTarget::Device(device), access, context)
    }

    /// Decides one OPC UA operation of `vendor` on a tag node over the
    /// Modbus `device`, with the vendor's rules that name that device and
    /// `services`. A write is also decided as the Modbus request it becomes,
    /// with `decide`; that is the caller's second step.
    pub fn decide_tag(
        &self,
        vendor: VendorId,
        device: DeviceId,
        access: &OpcuaAccess<'_>,
        context: &OpcuaContext<'_>,
    ) -> Decision {
        self.decide_target(vendor, OpcuaTarget::Tags(device), access, context)
    }

    fn decide_target(
        &self,
        vendor: VendorId,
        target: OpcuaTarget,
        access: &OpcuaAccess<'_>,
        context: &OpcuaContext<'_>,
    ) -> Decision {
        let write = access.service == OpcuaService::Write;
        if let Some(Some(limiter)) = self.vendor_rates.get(vendor) {
            if let Err((scope, limit)) = limiter.take(write, context.instant) {
                return deny(DenyReason::RateLimited { scope, limit });
            }
        }
        let mut rules = self
            .opcua
            .rules
            .iter()
            .filter(|rule| rule.rule.vendor as usize == vendor && rule.target == target)
            .peekable();
        if rules.peek().is_none() {
            return deny(DenyReason::NoRuleForDevice);
        }

        let mut local_time = None;
        let mut closest = DenyReason::ServiceNotAllowed {
            service: access.service.name(),
        };
        for rule in rules {
            let checked = self
                .check_opcua_rule(rule, access, context, &mut local_time)
                .and_then(|()| match &rule.rate {
                    None => Ok(()),
                    Some(limiter) => limiter
                        .take(write, context.instant)
                        .map_err(|(scope, limit)| DenyReason::RateLimited { scope, limit }),
                });
            match checked {
                Ok(()) => return Decision::Allow { rule: rule.rule },
                Err(reason) if reason.specificity() > closest.specificity() => closest = reason,
                Err(_) => {}
            }
        }
        deny(closest)
    }

    fn check_opcua_rule(
        &self,
        rule: &CompiledOpcuaRule,
        access: &OpcuaAccess<'_>,
        context: &OpcuaContext<'_>,
        local_time: &mut Option<jiff::civil::DateTime>,
    ) -> Result<(), DenyReason> {
        if rule.services & service_bit(access.service) == 0 {
            return Err(DenyReason::ServiceNotAllowed {
                service: access.service.name(),
            });
        }
        let named = rule.nodes.iter().any(|p| node_matches(p, &access.node))
            || rule.subtrees.iter().any(|tree| tree.contains(&access.node));
        if !named {
            return Err(DenyReason::NodeNotAllowed);
        }
        if let Some(ranges) = &rule.values {
            let allowed = match access.value {
                Some(value) => ranges.iter().any(|range| range.contains(value)),
                None => !access.non_numeric_value,
            };
            if !allowed {
                return Err(DenyReason::WrittenValueNotAllowed {
                    value: access
                        .value
                        .map_or_else(|| "non-numeric".to_owned(), |v| v.to_string()),
                });
            }
        }
        let Some(when) = &rule.when else {
            return Ok(());
        };
        // A rule limited to source networks cannot match when the source is
        // unknown; without such a limit the address is never read.
        let source = match (context.source, &when.sources) {
            (Some(source), _) => source,
            (None, Some(_)) => {
                return Err(DenyReason::ConditionFailed {
                    condition: Condition::SourceUnknown,
                })
            }
            (None, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let modbus_context = Context {
            source,
            now: context.now,
            instant: context.instant,
            states: context.states,
            role: None,
        };
        self.check_when(when, &modbus_context, local_time)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::config::OpcuaService;
    use crate::policy::{Decision, DenyReason, Policy, RuleRef, StateTable};

    fn line1_path() -> NodePattern {
        NodePattern::parse("nsu=urn:plant:line1;path=/Line1/Press").unwrap()
    }

    fn string_node(id: &str) -> SubtreeNode {
        SubtreeNode {
            namespace_uri: "urn:plant:line1".to_owned(),
            id: SubtreeId::String(id.to_owned()),
        }
    }

    fn node(id: &str) -> OpcuaNode<'_> {
        OpcuaNode {
            namespace_uri: "urn:plant:line1",
            id: NodeIdRef::String(id),
        }
    }

    const TAG_GATEWAY: &str = r#"[gateway]
name = "edge-01"

[[listener]]
name = "ua"
protocol = "opcua"
bind = "127.0.0.1:4840"
device = "line1-ua"
opcua = { application_uri = "urn:sluice:edge-01", certificate = "sluice.crt", private_key = "sluice.key", client_ca = "ca.crt" }

[[device]]
name = "line1-ua"
protocol = "opcua"
endpoint = "opc.tcp://127.0.0.1:4841"

[[device]]
name = "press-1"
address = "127.0.0.1:5021"
mirror = [{ kind = "holding_register", start = 0, count = 10 }]

[[device]]
name = "oven-2"
address = "127.0.0.1:5022"
"#;

    const TAG_RULES: &str = r#"[vendor]
name = "acme"
opcua_users = [{ username = "acme-eng", password_hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA" }]

[[allow]]
device = "press-1"
services = ["read"]
nodes = ["nsu=urn:sluice:tags;s=Press1.*"]
"#;

    fn tag_policy() -> Policy {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gateway.toml"), TAG_GATEWAY).unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        std::fs::write(dir.path().join("rules/acme.toml"), TAG_RULES).unwrap();
        match Policy::load(&dir.path().join("gateway.toml")) {
            Ok((policy, _)) => policy,
            Err(diagnostics) => panic!("policy failed to load:\n{diagnostics}"),
        }
    }

    fn read_tag(name: &str) -> OpcuaAccess<'_> {
        OpcuaAccess {
            service: OpcuaService::Read,
            node: OpcuaNode {
                namespace_uri: "urn:sluice:tags",
                id: NodeIdRef::String(name),
            },
            value: None,
            non_numeric_value: false,
        }
    }

    #[test]
    fn unresolved_subtree_matches_nothing() {
        let subtrees = compile_subtrees(0, &[line1_path()]);
        assert_eq!(subtrees.len(), 1);
        assert_eq!(subtrees[0].path, ["Line1", "Press"]);
        assert!(!subtrees[0].contains(&node("Line1.Press")));
    }

    #[test]
    fn resolved_subtree_matches_its_nodes_only() {
        let subtrees = compile_subtrees(0, &[line1_path()]);
        let tree = &subtrees[0];
        tree.set_nodes(HashSet::from([
            string_node("Line1.Press"),
            string_node("Line1.Press.Temperature"),
        ]));
        assert!(tree.contains(&node("Line1.Press")));
        assert!(tree.contains(&node("Line1.Press.Temperature")));
        assert!(!tree.contains(&node("Line1")));
        assert!(!tree.contains(&node("Line1.Setpoint")));
        let other_namespace = OpcuaNode {
            namespace_uri: "urn:plant:line2",
            id: NodeIdRef::String("Line1.Press"),
        };
        assert!(!tree.contains(&other_namespace));
    }

    #[test]
    fn path_pattern_never_matches_by_identifier() {
        assert!(!node_matches(&line1_path(), &node("Line1/Press")));
    }

    #[test]
    fn id_patterns_compile_no_subtree() {
        let glob = NodePattern::parse("nsu=urn:plant:line1;s=Line1.*").unwrap();
        assert_eq!(compile_subtrees(0, &[glob]).len(), 0);
    }

    #[test]
    fn tag_rule_applies_to_its_modbus_device_only() {
        let policy = tag_policy();
        let states = StateTable::new(0);
        let context = OpcuaContext {
            source: None,
            now: jiff::Timestamp::now(),
            instant: Instant::now(),
            states: &states,
        };
        let press = policy.device_id("press-1").unwrap();
        let oven = policy.device_id("oven-2").unwrap();
        let access = read_tag("Press1.Temperature");
        assert_eq!(
            policy.decide_tag(0, press, &access, &context),
            Decision::Allow {
                rule: RuleRef {
                    vendor: 0,
                    index: 0
                }
            }
        );
        assert_eq!(
            policy.decide_tag(0, oven, &access, &context),
            Decision::Deny {
                reason: DenyReason::NoRuleForDevice
            }
        );
        assert_eq!(
            policy.decide_opcua(0, 0, &access, &context),
            Decision::Deny {
                reason: DenyReason::NoRuleForDevice
            }
        );
        assert_eq!(
            policy.decide_tag(0, press, &read_tag("Oven.Secret"), &context),
            Decision::Deny {
                reason: DenyReason::NodeNotAllowed
            }
        );
    }

    #[test]
    fn glob_star_matches_any_suffix() {
        assert!(glob_matches("Line1.*", "Line1.Press.Temperature"));
        assert!(glob_matches("Line1.*", "Line1."));
        assert!(!glob_matches("Line1.*", "Line2.Setpoint"));
    }

    #[test]
    fn glob_without_wildcards_is_exact() {
        assert!(glob_matches("Line1.Setpoint", "Line1.Setpoint"));
        assert!(!glob_matches("Line1.Setpoint", "Line1.Setpoint2"));
        assert!(!glob_matches("Line1.Setpoint", "Line1.Setpoin"));
    }

    #[test]
    fn glob_question_mark_matches_one_character() {
        assert!(glob_matches("Press?.Temp", "Press1.Temp"));
        assert!(!glob_matches("Press?.Temp", "Press12.Temp"));
    }

    #[test]
    fn glob_star_in_middle_backtracks() {
        assert!(glob_matches("*.Press.*", "Line1.Press.Temperature"));
        assert!(!glob_matches("*.Press.*", "Line1.Oven.Temperature"));
        assert!(glob_matches("a*b*c", "aXbYbZc"));
    }
}
