//! The immutable policy snapshot compiled from configuration, and `decide()`.
//! It reads operational state through `StateTable`, which pollers fill.
//!
//! `decide()` looks rules up by vendor, device and function code in tables
//! built at compile time, so its cost does not grow with the total number of
//! rules, only with the rules of one vendor for one device and function.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use jiff::civil::DateTime;

use crate::config::{self, Config, DatedWindow, Diagnostic, Diagnostics, Range16, WeeklyWindow};
use crate::identity::certificate::{CertificateIdentity, CertificateMatchers};
use crate::identity::{SourceIndex, SourceSet};

mod compile;
mod explain;
pub mod interval;
mod opcua;
pub mod quarantine;
mod rate;
mod reason;
pub mod schedule;
pub mod state;
#[cfg(test)]
mod tests;

pub use crate::config::{AuditSync, ListenerLimits, Mode, OnDeny, StateKind};
pub use explain::{ExplainQuery, Explanation, QueryError};
pub use interval::IntervalSet;
pub use opcua::{
    glob_matches, NodeIdRef, OpcuaAccess, OpcuaContext, OpcuaDeviceId, OpcuaListenerPlan,
    OpcuaNode, Subtree, SubtreeId, SubtreeNode,
};
pub use rate::{Bucket as TokenBucket, RateKind, RateLimit, RateScope};
pub use reason::{Condition, DenyReason};
pub use state::{Reading, StateTable};

/// Index of a device in `Policy::devices`.
pub type DeviceId = usize;
/// Index of a vendor in the policy's vendor list.
pub type VendorId = usize;
/// Index of a Modbus role among the roles that rules name.
pub type RoleId = u16;

/// The tables, addresses and values one Modbus request touches. Addresses are the
/// 0-based PDU addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModbusAccess<'a> {
    pub unit: u8,
    pub function: u8,
    /// First address and count read, if the function reads a table.
    pub read: Option<(u16, u16)>,
    /// First address and count written, if the function writes a table.
    pub write: Option<(u16, u16)>,
    pub values: WrittenValues<'a>,
    /// The quantity field, for functions that carry one.
    pub quantity: Option<u16>,
    pub sub_function: Option<u16>,
    pub mei_type: Option<u8>,
}

/// Values a request writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrittenValues<'a> {
    None,
    /// FC 6.
    Register(u16),
    /// FC 5: 0 or 1.
    Coil(bool),
    /// FC 16 and 23: big-endian register values.
    Registers(&'a [u8]),
    /// FC 15: packed coil bits, least significant bit first, and their count.
    Coils {
        packed: &'a [u8],
        count: u16,
    },
    /// FC 22: the result depends on the register's current value.
    Mask {
        and_mask: u16,
        or_mask: u16,
    },
}

/// The source and time of a request being decided.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub source: IpAddr,
    /// The role of the session's client certificate, resolved once per
    /// session; `None` without a certificate role or for a role no rule names.
    pub role: Option<RoleId>,
    /// Wall-clock time, for schedules and dated windows.
    pub now: jiff::Timestamp,
    /// Monotonic time, for the age of state readings.
    pub instant: Instant,
    pub states: &'a StateTable,
}

/// The outcome of identifying a TLS client by its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateMatch {
    Vendor(VendorId),
    /// No vendor's certificate matchers accept the certificate.
    NoVendor,
    /// Two vendors accept it: the first two in file order.
    Ambiguous(VendorId, VendorId),
    /// The vendor that accepts it does not list the source address.
    SourceNotAllowed(VendorId),
}

/// The rule that allowed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleRef {
    pub vendor: u32,
    /// 0-based index of the `[[allow]]` entry in the vendor's file.
    pub index: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow { rule: RuleRef },
    Deny { reason: DenyReason },
}

/// The destination device of a listener's requests, by unit id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routes {
    /// Every unit id goes to this device.
    Device(DeviceId),
    /// The device for each unit id; `None` means no route.
    Units(Box<[Option<DeviceId>; 256]>),
}

impl Routes {
    /// Returns the device that requests for `unit` go to.
    pub fn device_for(&self, unit: u8) -> Option<DeviceId> {
        match self {
            Routes::Device(device) => Some(*device),
            Routes::Units(units) => units[usize::from(unit)],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerPlan {
    pub name: Arc<str>,
    pub bind: SocketAddr,
    pub mode: Mode,
    pub on_deny: OnDeny,
    pub routes: Routes,
    pub limits: ListenerLimits,
    /// Serves reads from mirror blocks only and never forwards to a device.
    pub mirror_only: bool,
    /// Set on a MODBUS/TCP Security listener.
    pub tls: Option<crate::config::ListenerTls>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlan {
    pub name: Arc<str>,
    pub address: SocketAddr,
    /// The unit id sent to the device when a listener forwards by `device`.
    pub unit: u8,
    pub timeout: Duration,
    pub max_connections: usize,
    pub max_in_flight: usize,
    pub connect_timeout: Duration,
    pub backoff_max: Duration,
    /// Blocks polled into memory, sorted by table and first address.
    pub mirror: Arc<[config::MirrorBlockConfig]>,
    /// Set for a device that speaks MODBUS/TCP Security.
    pub tls: Option<crate::config::DeviceTls>,
}

/// An operational state: where it is polled and what its raw values mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatePlan {
    pub name: Arc<str>,
    pub device: DeviceId,
    pub kind: StateKind,
    pub address: u16,
    pub poll: Duration,
    /// A reading older than this is unknown.
    pub max_age: Duration,
    /// Raw value ranges, sorted and disjoint, each with an index into
    /// `value_names`.
    pub values: Box<[(Range16, u16)]>,
    /// The distinct value names, in the order they first appear.
    pub value_names: Box<[Arc<str>]>,
}

impl StatePlan {
    /// Returns the index of the value name that `raw` stands for.
    pub fn value_of(&self, raw: u16) -> Option<u16> {
        let after = self.values.partition_point(|(range, _)| range.first <= raw);
        let (range, value) = self.values.get(after.checked_sub(1)?)?;
        range.contains(raw).then_some(*value)
    }

    pub fn value_name(&self, value: u16) -> Option<&Arc<str>> {
        self.value_names.get(usize::from(value))
    }
}

/// The audit settings; `path` is absolute or relative to the working directory.
pub type AuditPlan = crate::config::AuditConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VendorPlan {
    pub name: Arc<str>,
    /// The rule file's name, such as `acme.toml`.
    pub file_name: Arc<str>,
    pub sources: Vec<IpNet>,
    pub max_sessions: Option<usize>,
    /// Labels of the vendor's rules, `FILE#N` with N from 1.
    rule_labels: Box<[Arc<str>]>,
}

/// A rule compiled for matching.
#[derive(Debug)]
struct CompiledRule {
    rule: RuleRef,
    device: DeviceId,
    /// Function codes, sorted.
    functions: Box<[u8]>,
    addresses: IntervalSet,
    values: Option<IntervalSet>,
    /// Bit 0 set when coil value 0 is allowed, bit 1 for value 1.
    coil_values: u8,
    quantity: Option<Range16>,
    sub_functions: Option<Box<[u16]>>,
    mei_types: Option<Box<[u8]>>,
    when: Option<Box<CompiledWhen>>,
    /// Buckets taken from only when this rule allows a request.
    rate: Option<Box<rate::RateLimiter>>,
}

#[derive(Debug, Clone)]
struct CompiledWhen {
    sources: Option<SourceSet>,
    /// The networks of `sources` as written, for explanations.
    source_nets: Box<[IpNet]>,
    /// Role ids, sorted; an empty list never matches.
    roles: Option<Box<[RoleId]>>,
    /// State index and the value index it must have.
    states: Box<[(usize, u16)]>,
    /// Weekly windows; an empty list never matches.
    schedule: Option<Box<[WeeklyWindow]>>,
    /// Dated windows; an empty list never matches.
    windows: Option<Box<[DatedWindow]>>,
}

/// The rules of one vendor for one device, by function code.
#[derive(Debug, Clone, Default)]
struct FunctionTable {
    /// Function code and the range of `Policy::candidates` holding the
    /// indices of its rules, sorted by function code.
    entries: Box<[(u8, u32, u32)]>,
}

impl FunctionTable {
    fn rules_for(&self, function: u8) -> Option<(u32, u32)> {
        let at = self
            .entries
            .binary_search_by_key(&function, |&(code, _, _)| code)
            .ok()?;
        let (_, start, end) = self.entries[at];
        Some((start, end))
    }
}

/// Functions that write, which `writes_per_second` limits count.
const WRITE_FUNCTIONS: [u8; 7] = [5, 6, 15, 16, 21, 22, 23];

fn is_write(function: u8) -> bool {
    WRITE_FUNCTIONS.contains(&function)
}

/// Modbus function codes with a sub-code that rules can limit.
const DIAGNOSTICS: u8 = 8;
const ENCAPSULATED_INTERFACE: u8 = 43;
/// Diagnostics sub-function 4, force listen only mode: the device stops
/// responding until restarted, so a rule must name it to allow it.
const FORCE_LISTEN_ONLY: u16 = 4;

/// The compiled, immutable policy: plans for every part of the gateway and
/// the rule tables `decide()` reads.
#[derive(Debug)]
pub struct Policy {
    gateway_name: Arc<str>,
    timezone: jiff::tz::TimeZone,
    listeners: Vec<ListenerPlan>,
    devices: Vec<DevicePlan>,
    states: Vec<StatePlan>,
    audit: AuditPlan,
    metrics_bind: Option<std::net::SocketAddr>,
    vendors: Vec<VendorPlan>,
    /// Thresholds of the anomaly detectors.
    detect: crate::config::DetectConfig,
    /// Each vendor's containment on anomalies, by vendor id.
    on_anomaly: Vec<Option<Arc<crate::config::OnAnomalyConfig>>>,
    /// Each vendor's own rate limit, by vendor id.
    vendor_rates: Vec<Option<rate::RateLimiter>>,
    identity: SourceIndex,
    /// Vendors with certificate matchers, identified on TLS listeners.
    certificates: Vec<(VendorId, CertificateMatchers)>,
    /// The roles `when.role` names, sorted; a role's id is its index.
    roles: Vec<Arc<str>>,
    rules: Vec<CompiledRule>,
    /// One table per vendor and device, at `vendor * devices.len() + device`.
    tables: Vec<FunctionTable>,
    /// Rule indices, grouped by vendor, device and function.
    candidates: Vec<u32>,
    files: Vec<PathBuf>,
    /// The `[[tag]]` sections, from which each generation builds its
    /// `TagMap`.
    tags: Arc<[config::TagConfig]>,
    /// Returned for a vendor id that is not in this policy.
    unknown_name: Arc<str>,
    opcua: OpcuaPolicy,
}

/// The OPC UA part of the snapshot: listeners, devices, rules and the user
/// tokens that identify vendors.
#[derive(Debug, Default)]
struct OpcuaPolicy {
    listeners: Vec<OpcuaListenerPlan>,
    devices: Vec<crate::config::OpcuaDeviceConfig>,
    rules: Vec<opcua::CompiledOpcuaRule>,
    identities: opcua::OpcuaIdentities,
}

impl Policy {
    /// Compiles a configuration, returning the policy and its warnings. A
    /// configuration from `config::load` always compiles; one built in code
    /// can fail on names that refer to nothing.
    pub fn compile(config: &Config) -> Result<(Policy, Vec<Diagnostic>), Diagnostics> {
        compile::compile(config)
    }

    /// Loads and compiles `gateway_file` and its rule files.
    pub fn load(gateway_file: &Path) -> Result<(Policy, Vec<Diagnostic>), Diagnostics> {
        let (config, detection, mut warnings) = config::load_with_detection(gateway_file)?;
        match Policy::compile(&config) {
            Ok((mut policy, more)) => {
                warnings.extend(more);
                policy.set_detection(detection);
                Ok((policy, warnings))
            }
            Err(mut diagnostics) => {
                warnings.append(&mut diagnostics.warnings);
                diagnostics.warnings = warnings;
                Err(diagnostics)
            }
        }
    }

    /// Applies the detection settings; containment of a vendor name that is
    /// not in this policy is ignored.
    pub fn set_detection(&mut self, detection: config::Detection) {
        self.detect = detection.detect;
        for (name, containment) in detection.on_anomaly {
            if let Some(vendor) = self.vendor_id(&name) {
                self.on_anomaly[vendor] = Some(Arc::new(containment));
            }
        }
    }

    /// Returns the thresholds of the anomaly detectors.
    pub fn detect(&self) -> &config::DetectConfig {
        &self.detect
    }

    /// Returns the vendor's containment on anomalies, if it sets one.
    pub fn on_anomaly(&self, vendor: VendorId) -> Option<&Arc<config::OnAnomalyConfig>> {
        self.on_anomaly.get(vendor).and_then(Option::as_ref)
    }

    pub fn gateway_name(&self) -> &Arc<str> {
        &self.gateway_name
    }

    pub fn timezone(&self) -> &jiff::tz::TimeZone {
        &self.timezone
    }

    pub fn listeners(&self) -> &[ListenerPlan] {
        &self.listeners
    }

    pub fn devices(&self) -> &[DevicePlan] {
        &self.devices
    }

    pub fn tags(&self) -> &[config::TagConfig] {
        &self.tags
    }

    pub fn states(&self) -> &[StatePlan] {
        &self.states
    }

    pub fn audit(&self) -> &AuditPlan {
        &self.audit
    }

    /// Returns the address of the Prometheus endpoint, when one is configured.
    pub fn metrics_bind(&self) -> Option<std::net::SocketAddr> {
        self.metrics_bind
    }

    pub fn vendors(&self) -> &[VendorPlan] {
        &self.vendors
    }

    /// Returns the vendor's name, or `unknown` for an id of another policy.
    pub fn vendor_name(&self, vendor: VendorId) -> &Arc<str> {
        self.vendors
            .get(vendor)
            .map_or(&self.unknown_name, |plan| &plan.name)
    }

    /// Returns the vendor's session limit, if it has one.
    pub fn vendor_max_sessions(&self, vendor: VendorId) -> Option<usize> {
        self.vendors.get(vendor)?.max_sessions
    }

    /// Returns the id of the vendor named `name`.
    pub fn vendor_id(&self, name: &str) -> Option<VendorId> {
        self.vendors.iter().position(|plan| &*plan.name == name)
    }

    /// Returns the id of the device named `name`.
    pub fn device_id(&self, name: &str) -> Option<DeviceId> {
        self.devices.iter().position(|plan| &*plan.name == name)
    }

    /// Returns the rule's label, `FILE#N` with N counted from 1, such as
    /// `acme.toml#2`; `unknown` for a rule of another policy.
    pub fn rule_label(&self, rule: RuleRef) -> &str {
        self.find_rule_label(rule).map_or("unknown", |label| label)
    }

    /// Returns the label of `rule` as a shared string, which an event can
    /// hold without copying it.
    pub fn shared_rule_label(&self, rule: RuleRef) -> Arc<str> {
        self.find_rule_label(rule)
            .cloned()
            .unwrap_or_else(|| Arc::from("unknown"))
    }

    fn find_rule_label(&self, rule: RuleRef) -> Option<&Arc<str>> {
        self.vendors
            .get(rule.vendor as usize)
            .and_then(|plan| plan.rule_labels.get(rule.index as usize))
    }

    /// Returns true when every rule of `vendor` is limited to a schedule or
    /// dated window and none of them is open at `now`: the vendor could not
    /// be allowed anything, so its connection is worth an anomaly. Returns
    /// false for a vendor without rules. Not on the request path: it looks
    /// at every rule.
    pub fn outside_all_windows(&self, vendor: VendorId, now: jiff::Timestamp) -> bool {
        let local = self.timezone.to_datetime(now);
        let mut rules = self
            .rules
            .iter()
            .filter(|compiled| compiled.rule.vendor as usize == vendor)
            .peekable();
        if rules.peek().is_none() {
            return false;
        }
        rules.all(|compiled| {
            let Some(when) = compiled.when.as_deref() else {
                return false;
            };
            if when.schedule.is_none() && when.windows.is_none() {
                return false;
            }
            let schedule_open = when.schedule.as_ref().is_none_or(|windows| {
                windows
                    .iter()
                    .any(|window| schedule::weekly_contains(window, &local))
            });
            let window_open = when.windows.as_ref().is_none_or(|windows| {
                windows
                    .iter()
                    .any(|window| schedule::dated_contains(window, &local))
            });
            !(schedule_open && window_open)
        })
    }

    /// Returns true when `rule` has a `when.state` condition. Such rules
    /// stop allowing requests while the audit log cannot be written.
    pub fn rule_depends_on_state(&self, rule: RuleRef) -> bool {
        self.rules
            .iter()
            .find(|compiled| compiled.rule == rule)
            .and_then(|compiled| compiled.when.as_ref())
            .is_some_and(|when| !when.states.is_empty())
    }

    /// Returns the vendor a plain listener assigns to a connection from
    /// `source`. Vendors with certificate matchers are never found here.
    pub fn identify(&self, source: IpAddr) -> Option<VendorId> {
        self.identity.lookup(source)
    }

    /// Finds the vendor of a TLS client by its certificate. Only vendors with
    /// certificate matchers take part; the `sources` of the one that matches
    /// must contain `source` when it lists any.
    pub fn identify_certificate(
        &self,
        identity: &CertificateIdentity,
        source: IpAddr,
    ) -> CertificateMatch {
        let mut matching = self
            .certificates
            .iter()
            .filter(|(_, matchers)| matchers.matches(identity))
            .map(|(vendor, _)| *vendor);
        let Some(first) = matching.next() else {
            return CertificateMatch::NoVendor;
        };
        if let Some(second) = matching.next() {
            return CertificateMatch::Ambiguous(first, second);
        }
        let sources = &self.vendors[first].sources;
        let source = source.to_canonical();
        if !sources.is_empty() && !sources.iter().any(|net| net.contains(&source)) {
            return CertificateMatch::SourceNotAllowed(first);
        }
        CertificateMatch::Vendor(first)
    }

    /// Returns the vendor of a session: by its client certificate on a TLS
    /// listener, by its source address otherwise.
    pub fn identify_session(
        &self,
        source: IpAddr,
        certificate: Option<&CertificateIdentity>,
    ) -> Option<VendorId> {
        match certificate {
            Some(identity) => match self.identify_certificate(identity, source) {
                CertificateMatch::Vendor(vendor) => Some(vendor),
                _ => None,
            },
            None => self.identify(source),
        }
    }

    /// Returns true when `vendor` is identified by certificate matchers.
    pub fn has_certificate_matchers(&self, vendor: VendorId) -> bool {
        self.certificates.iter().any(|(id, _)| *id == vendor)
    }

    /// Returns the id of `role` when a rule names it.
    pub fn role_id(&self, role: &str) -> Option<RoleId> {
        self.roles
            .binary_search_by(|known| (**known).cmp(role))
            .ok()
            .map(|id| id as RoleId)
    }

    /// Returns every file read to build this policy, the gateway file first.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Returns the current value name of `state`, or `None` when it is
    /// unknown: not read, too old, or a raw value the state does not map.
    pub fn state_value(&self, table: &StateTable, state: usize, now: Instant) -> Option<&Arc<str>> {
        let plan = self.states.get(state)?;
        let raw = table.fresh(state, now, plan.max_age)?;
        plan.value_name(plan.value_of(raw)?)
    }

    /// Decides one request of `vendor` to `device`. Default deny: the request
    /// is allowed only when one rule covers all of it and all of that rule's
    /// conditions hold. Ids that are not in this policy are denied.
    ///
    /// Takes a token from the vendor's rate limit on every decision, and from
    /// the rate limit of the rule that allows the request.
    pub fn decide(
        &self,
        vendor: VendorId,
        device: DeviceId,
        access: &ModbusAccess<'_>,
        context: &Context<'_>,
    ) -> Decision {
        self.evaluate(vendor, device, access, context, Tokens::Take)
    }

    /// Decides a request for both `decide` and `explain`. With
    /// `Tokens::Peek`, rate limits are checked but no token is taken.
    fn evaluate(
        &self,
        vendor: VendorId,
        device: DeviceId,
        access: &ModbusAccess<'_>,
        context: &Context<'_>,
        tokens: Tokens,
    ) -> Decision {
        if let Some(Some(limiter)) = self.vendor_rates.get(vendor) {
            if let Err((scope, limit)) = tokens.apply(limiter, access.function, context.instant) {
                return deny(DenyReason::RateLimited { scope, limit });
            }
        }
        let table = (vendor < self.vendors.len() && device < self.devices.len())
            .then(|| &self.tables[vendor * self.devices.len() + device]);
        let Some(table) = table.filter(|table| !table.entries.is_empty()) else {
            return deny(DenyReason::NoRuleForDevice);
        };
        let Some((start, end)) = table.rules_for(access.function) else {
            return deny(DenyReason::FunctionNotAllowed {
                function: access.function,
            });
        };

        let mut local_time = None;
        let mut closest: Option<DenyReason> = None;
        for &index in &self.candidates[start as usize..end as usize] {
            let rule = &self.rules[index as usize];
            let checked = self
                .check_rule(rule, access, context, &mut local_time)
                .and_then(|()| check_rule_rate(rule, access, context, tokens));
            match checked {
                Ok(()) => return Decision::Allow { rule: rule.rule },
                Err(reason) => {
                    if closest
                        .as_ref()
                        .is_none_or(|best| reason.specificity() > best.specificity())
                    {
                        closest = Some(reason);
                    }
                }
            }
        }
        deny(closest.unwrap_or(DenyReason::FunctionNotAllowed {
            function: access.function,
        }))
    }

    /// Checks one rule that names the request's function, in the order of
    /// increasing specificity of the failure.
    fn check_rule(
        &self,
        rule: &CompiledRule,
        access: &ModbusAccess<'_>,
        context: &Context<'_>,
        local_time: &mut Option<DateTime>,
    ) -> Result<(), DenyReason> {
        check_sub_codes(rule, access)?;
        check_addresses(rule, access)?;
        check_quantity(rule, access)?;
        check_values(rule, access)?;
        match &rule.when {
            None => Ok(()),
            Some(when) => self.check_when(when, context, local_time),
        }
    }

    fn check_when(
        &self,
        when: &CompiledWhen,
        context: &Context<'_>,
        local_time: &mut Option<DateTime>,
    ) -> Result<(), DenyReason> {
        if let Some(sources) = &when.sources {
            if !sources.contains(context.source) {
                return Err(DenyReason::ConditionFailed {
                    condition: Condition::Source {
                        source: context.source,
                    },
                });
            }
        }

        if let Some(roles) = &when.roles {
            let allowed = context
                .role
                .is_some_and(|role| roles.binary_search(&role).is_ok());
            if !allowed {
                return Err(DenyReason::ConditionFailed {
                    condition: Condition::Role,
                });
            }
        }

        for &(state, required) in when.states.iter() {
            self.check_state(state, required, context)?;
        }

        if when.schedule.is_none() && when.windows.is_none() {
            return Ok(());
        }
        let local = *local_time.get_or_insert_with(|| self.timezone.to_datetime(context.now));
        if let Some(weekly) = &when.schedule {
            if !weekly
                .iter()
                .any(|window| schedule::weekly_contains(window, &local))
            {
                return Err(DenyReason::ConditionFailed {
                    condition: Condition::Schedule,
                });
            }
        }
        if let Some(dated) = &when.windows {
            if !dated
                .iter()
                .any(|window| schedule::dated_contains(window, &local))
            {
                return Err(DenyReason::ConditionFailed {
                    condition: Condition::Window,
                });
            }
        }
        Ok(())
    }

    /// Checks that `state` currently has the value `required`; an unknown
    /// state fails.
    fn check_state(
        &self,
        state: usize,
        required: u16,
        context: &Context<'_>,
    ) -> Result<(), DenyReason> {
        let plan = &self.states[state];
        let current = context
            .states
            .fresh(state, context.instant, plan.max_age)
            .and_then(|raw| plan.value_of(raw));
        match current {
            Some(value) if value == required => Ok(()),
            Some(value) => Err(DenyReason::ConditionFailed {
                condition: Condition::State {
                    state: plan.name.clone(),
                    required: plan.value_names[usize::from(required)].clone(),
                    actual: plan.value_names[usize::from(value)].clone(),
                },
            }),
            None => Err(DenyReason::StateUnknown {
                state: plan.name.clone(),
            }),
        }
    }
}

fn deny(reason: DenyReason) -> Decision {
    Decision::Deny { reason }
}

/// Whether a decision takes rate limit tokens or only looks at them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tokens {
    Take,
    Peek,
}

impl Tokens {
    fn apply(
        self,
        limiter: &rate::RateLimiter,
        function: u8,
        now: Instant,
    ) -> Result<(), rate::Refusal> {
        match self {
            Tokens::Take => limiter.take(is_write(function), now),
            Tokens::Peek => limiter.peek(is_write(function), now),
        }
    }
}

/// Checks the rate limit of a rule that allows the request, as its last
/// check.
fn check_rule_rate(
    rule: &CompiledRule,
    access: &ModbusAccess<'_>,
    context: &Context<'_>,
    tokens: Tokens,
) -> Result<(), DenyReason> {
    let Some(limiter) = &rule.rate else {
        return Ok(());
    };
    tokens
        .apply(limiter, access.function, context.instant)
        .map_err(|(scope, limit)| DenyReason::RateLimited { scope, limit })
}

/// Checks the FC 8 sub-function and the FC 43 MEI type.
fn check_sub_codes(rule: &CompiledRule, access: &ModbusAccess<'_>) -> Result<(), DenyReason> {
    match access.function {
        DIAGNOSTICS => {
            let Some(sub_function) = access.sub_function else {
                return Err(DenyReason::FunctionNotAllowed {
                    function: DIAGNOSTICS,
                });
            };
            let allowed = match &rule.sub_functions {
                None => sub_function != FORCE_LISTEN_ONLY,
                Some(list) => list.binary_search(&sub_function).is_ok(),
            };
            if !allowed {
                return Err(DenyReason::SubFunctionNotAllowed { sub_function });
            }
        }
        ENCAPSULATED_INTERFACE => {
            let Some(mei_type) = access.mei_type else {
                return Err(DenyReason::FunctionNotAllowed {
                    function: ENCAPSULATED_INTERFACE,
                });
            };
            if let Some(list) = &rule.mei_types {
                if list.binary_search(&mei_type).is_err() {
                    return Err(DenyReason::MeiTypeNotAllowed { mei_type });
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Checks that the rule covers every address read and every address
/// written. A count of 0 is checked as 1, so a malformed request still
/// needs its first address allowed.
// The read and write spans are checked one after the other, not through a
// small array of both. The compiler reloaded such an array through a
// store-forwarding stall, which took about half the time of a decision
// (measured with `cargo bench --bench decide`).
fn check_addresses(rule: &CompiledRule, access: &ModbusAccess<'_>) -> Result<(), DenyReason> {
    if let Some((first, count)) = access.read {
        check_span(rule, first, count)?;
    }
    if let Some((first, count)) = access.write {
        check_span(rule, first, count)?;
    }
    Ok(())
}

fn check_span(rule: &CompiledRule, first: u16, count: u16) -> Result<(), DenyReason> {
    let last = u32::from(first) + u32::from(count.max(1)) - 1;
    match rule.addresses.first_missing(u32::from(first), last) {
        Some(address) => Err(DenyReason::AddressNotAllowed { address }),
        None => Ok(()),
    }
}

fn check_quantity(rule: &CompiledRule, access: &ModbusAccess<'_>) -> Result<(), DenyReason> {
    let Some(allowed) = rule.quantity else {
        return Ok(());
    };
    let check = |span: Option<(u16, u16)>| match span {
        Some((_, count)) if !allowed.contains(count) => {
            Err(DenyReason::QuantityNotAllowed { quantity: count })
        }
        _ => Ok(()),
    };
    check(access.read)?;
    check(access.write)
}

/// Checks every written value against the rule's `values`. Malformed value
/// lists, shorter than their count, are denied.
fn check_values(rule: &CompiledRule, access: &ModbusAccess<'_>) -> Result<(), DenyReason> {
    let Some(values) = &rule.values else {
        return Ok(());
    };
    let first = access.write.map_or(0, |(address, _)| address);
    let denied = |offset: usize, value: u16| DenyReason::ValueNotAllowed {
        address: first.wrapping_add(offset as u16),
        value,
    };
    match access.values {
        WrittenValues::None => Ok(()),
        WrittenValues::Register(value) => match values.contains(value) {
            true => Ok(()),
            false => Err(denied(0, value)),
        },
        WrittenValues::Coil(on) => match rule.coil_values & (1 << u8::from(on)) != 0 {
            true => Ok(()),
            false => Err(denied(0, u16::from(on))),
        },
        WrittenValues::Registers(bytes) => {
            let pairs = bytes.chunks_exact(2);
            if !pairs.remainder().is_empty() {
                return Err(denied(bytes.len() / 2, 0));
            }
            for (offset, pair) in pairs.enumerate() {
                let value = u16::from_be_bytes([pair[0], pair[1]]);
                if !values.contains(value) {
                    return Err(denied(offset, value));
                }
            }
            Ok(())
        }
        WrittenValues::Coils { packed, count } => check_coils(rule, packed, count, &denied),
        WrittenValues::Mask { and_mask, or_mask } => {
            // The result is (current & and_mask) | (or_mask & !and_mask): the
            // bits of and_mask come from the register, the rest from or_mask.
            let lowest = or_mask & !and_mask;
            let highest = lowest | and_mask;
            match values.contains_range(lowest, highest) {
                true => Ok(()),
                false => Err(DenyReason::MaskNotAllowed { and_mask, or_mask }),
            }
        }
    }
}

fn check_coils(
    rule: &CompiledRule,
    packed: &[u8],
    count: u16,
    denied: &dyn Fn(usize, u16) -> DenyReason,
) -> Result<(), DenyReason> {
    let count = usize::from(count);
    if packed.len() * 8 < count {
        return Err(denied(packed.len() * 8, 0));
    }
    if rule.coil_values == 0b11 {
        return Ok(());
    }
    for offset in 0..count {
        let on = packed[offset / 8] >> (offset % 8) & 1;
        if rule.coil_values & (1 << on) == 0 {
            return Err(denied(offset, u16::from(on)));
        }
    }
    Ok(())
}
