//! OPC UA decisions: the compiled OPC UA rules of the snapshot and
//! `Policy::decide_opcua`, which shares the `when` conditions and rate
//! limits with the Modbus `decide`. The lookups of vendors by user token are
//! here too, so that the server gets identities from the policy alone.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use crate::config::{
    ListenerLimits, Mode, NodeIdPattern, NodePattern, OpcuaDeviceConfig, OpcuaListenerConfig,
    OpcuaService, ValueRange,
};

use super::rate::RateLimiter;
use super::reason::{Condition, DenyReason};
use super::{deny, CompiledWhen, Context, Decision, Policy, RuleRef, StateTable, VendorId};

/// Index of a device in `Policy::opcua_devices`.
pub type OpcuaDeviceId = usize;

/// An OPC UA listener: the server settings and the device it mirrors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpcuaListenerPlan {
    pub name: Arc<str>,
    pub bind: SocketAddr,
    pub mode: Mode,
    pub device: OpcuaDeviceId,
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

/// A rule for an OPC UA device, compiled for matching.
#[derive(Debug)]
pub(super) struct CompiledOpcuaRule {
    pub rule: RuleRef,
    pub device: OpcuaDeviceId,
    /// Bit `1 << service` for each allowed service.
    pub services: u8,
    pub nodes: Box<[NodePattern]>,
    pub values: Option<Box<[ValueRange]>>,
    pub when: Option<Box<CompiledWhen>>,
    pub rate: Option<Box<RateLimiter>>,
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
            .filter(|rule| rule.rule.vendor as usize == vendor && rule.device == device)
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
        if !rule.nodes.iter().any(|p| node_matches(p, &access.node)) {
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
    use super::glob_matches;

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
