//! Compiles a validated `Config` into a `Policy`: resolves names to indices,
//! turns ranges into interval sets and builds the per vendor, device and
//! function rule tables that `decide()` searches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::config::{
    Config, Diagnostic, Diagnostics, ListenerTarget, Origin, RuleConfig, StateConfig, VendorConfig,
};
use crate::identity::{SourceIndex, SourceSet};

use super::opcua::{
    service_bit, CompiledOpcuaRule, OpcuaIdentities, OpcuaListenerPlan, OpcuaTarget,
};
use super::rate::{RateLimiter, RateScope};
use super::{
    CompiledRule, CompiledWhen, DevicePlan, FunctionTable, IntervalSet, ListenerPlan, OpcuaPolicy,
    Policy, Routes, RuleRef, StatePlan, VendorPlan,
};

/// Collects problems of names that refer to nothing. `config::load` reports
/// these first, so they only occur in configurations built in code.
#[derive(Default)]
struct Problems {
    errors: Vec<Diagnostic>,
}

impl Problems {
    fn error(&mut self, at: &Origin, message: String) {
        self.errors.push(at.diagnostic(message));
    }
}

struct Names {
    devices: HashMap<String, usize>,
    opcua_devices: HashMap<String, usize>,
    states: HashMap<String, usize>,
    /// Every role a `when.role` names, by role id.
    roles: Vec<Arc<str>>,
}

pub(super) fn compile(config: &Config) -> Result<(Policy, Vec<Diagnostic>), Diagnostics> {
    let mut problems = Problems::default();
    let names = Names {
        devices: index_names(config.devices.iter().map(|d| d.name.as_str())),
        opcua_devices: index_names(config.opcua_devices.iter().map(|d| d.name.as_str())),
        states: index_names(config.states.iter().map(|s| s.name.as_str())),
        roles: role_names(config),
    };

    let devices = config
        .devices
        .iter()
        .map(DevicePlan::from)
        .collect::<Vec<_>>();
    let listeners = config
        .listeners
        .iter()
        .filter(|listener| listener.opcua.is_none())
        .filter_map(|listener| listener_plan(listener, &names, &mut problems))
        .collect();
    let opcua_listeners = config
        .listeners
        .iter()
        .filter_map(|listener| opcua_listener_plan(listener, &names, &mut problems))
        .collect();
    let states = config
        .states
        .iter()
        .filter_map(|state| state_plan(state, &names, &mut problems))
        .collect::<Vec<_>>();

    // Buckets count from here, so every reload starts with full buckets.
    let epoch = Instant::now();
    let vendors: Vec<VendorPlan> = config.vendors.iter().map(vendor_plan).collect();
    let mut rules = Vec::new();
    let mut opcua_rules = Vec::new();
    let mut placements = Vec::new();
    for (vendor, vendor_config) in config.vendors.iter().enumerate() {
        for (index, rule) in vendor_config.rules.iter().enumerate() {
            let rule_ref = RuleRef {
                vendor: vendor as u32,
                index: index as u32,
            };
            let label = &vendors[vendor].rule_labels[index];
            let rate = rule.rate.as_ref().map(|rate| {
                let scope = RateScope::Rule {
                    label: label.clone(),
                };
                Box::new(RateLimiter::new(scope, rate, epoch))
            });
            if rule.opcua.is_some() {
                opcua_rules.extend(compile_opcua_rule(
                    rule,
                    rule_ref,
                    rate,
                    &names,
                    &states,
                    &mut problems,
                ));
                continue;
            }
            let Some(mut compiled) = compile_rule(rule, rule_ref, &names, &states, &mut problems)
            else {
                continue;
            };
            compiled.rate = rate;
            let device = names.devices[&rule.device];
            for &function in &rule.functions {
                placements.push((
                    vendor * devices.len() + device,
                    function,
                    rules.len() as u32,
                ));
            }
            rules.push(compiled);
        }
    }
    let (tables, candidates) = build_tables(placements, config.vendors.len() * devices.len());
    let identity = build_identity(&config.vendors, &mut problems);

    if !problems.errors.is_empty() {
        return Err(Diagnostics {
            errors: problems.errors,
            warnings: Vec::new(),
        });
    }
    let policy = Policy {
        gateway_name: Arc::from(config.gateway.name.as_str()),
        timezone: config.gateway.timezone.clone(),
        listeners,
        devices,
        states,
        audit: config.audit.clone(),
        metrics_bind: config.metrics.as_ref().map(|metrics| metrics.bind),
        vendor_rates: config
            .vendors
            .iter()
            .map(|vendor| {
                vendor.rate.as_ref().map(|rate| {
                    let scope = RateScope::Vendor {
                        name: Arc::from(vendor.name.as_str()),
                    };
                    RateLimiter::new(scope, rate, epoch)
                })
            })
            .collect(),
        detect: crate::config::DetectConfig::default(),
        on_anomaly: vec![None; config.vendors.len()],
        vendors,
        identity,
        certificates: config
            .vendors
            .iter()
            .enumerate()
            .filter(|(_, vendor)| !vendor.certificate.is_empty())
            .map(|(id, vendor)| (id, vendor.certificate.clone()))
            .collect(),
        roles: names.roles.clone(),
        rules,
        tables,
        candidates,
        files: config.files.clone(),
        tags: config.tags.iter().cloned().collect(),
        unknown_name: Arc::from("unknown"),
        opcua: OpcuaPolicy {
            listeners: opcua_listeners,
            devices: config.opcua_devices.clone(),
            rules: opcua_rules,
            identities: opcua_identities(&config.vendors),
        },
    };
    Ok((policy, Vec::new()))
}

/// Lists the distinct roles of every `when.role`, sorted, so that a role's id
/// is its position.
fn role_names(config: &Config) -> Vec<Arc<str>> {
    let mut roles: Vec<&str> = config
        .vendors
        .iter()
        .flat_map(|vendor| &vendor.rules)
        .filter_map(|rule| rule.when.role.as_ref())
        .flatten()
        .map(String::as_str)
        .collect();
    roles.sort_unstable();
    roles.dedup();
    roles.into_iter().map(Arc::from).collect()
}

fn index_names<'a>(names: impl Iterator<Item = &'a str>) -> HashMap<String, usize> {
    let mut index = HashMap::new();
    for (position, name) in names.enumerate() {
        index.entry(name.to_owned()).or_insert(position);
    }
    index
}

impl From<&crate::config::DeviceConfig> for DevicePlan {
    fn from(device: &crate::config::DeviceConfig) -> DevicePlan {
        DevicePlan {
            name: Arc::from(device.name.as_str()),
            address: device.address,
            unit: device.unit,
            timeout: device.timeout,
            max_connections: device.max_connections,
            max_in_flight: device.max_in_flight,
            connect_timeout: device.connect_timeout,
            backoff_max: device.backoff_max,
            mirror: Arc::from(device.mirror.as_slice()),
            tls: device.tls.clone(),
        }
    }
}

fn device_id(name: &str, names: &Names, at: &Origin, problems: &mut Problems) -> Option<usize> {
    let id = names.devices.get(name).copied();
    if id.is_none() {
        problems.error(at, format!("unknown device \"{name}\""));
    }
    id
}

fn listener_plan(
    listener: &crate::config::ListenerConfig,
    names: &Names,
    problems: &mut Problems,
) -> Option<ListenerPlan> {
    let routes = match &listener.target {
        ListenerTarget::Device(device) => {
            Routes::Device(device_id(device, names, &listener.origin, problems)?)
        }
        ListenerTarget::Routes(table) => {
            let mut units = Box::new([None; 256]);
            for (unit, device) in table {
                units[usize::from(*unit)] = device_id(device, names, &listener.origin, problems);
            }
            Routes::Units(units)
        }
        // Only OPC UA listeners go without a device, and they have no plan here.
        ListenerTarget::TagsOnly => {
            problems.error(
                &listener.origin,
                "a Modbus listener needs device or routes".to_owned(),
            );
            return None;
        }
    };
    Some(ListenerPlan {
        name: Arc::from(listener.name.as_str()),
        bind: listener.bind,
        mode: listener.mode,
        on_deny: listener.on_deny,
        routes,
        limits: listener.limits,
        mirror_only: listener.mirror_only,
        tls: listener.tls.clone(),
    })
}

fn state_plan(state: &StateConfig, names: &Names, problems: &mut Problems) -> Option<StatePlan> {
    let device = device_id(&state.device, names, &state.origin, problems)?;
    let mut value_names: Vec<Arc<str>> = Vec::new();
    let mut values = Vec::with_capacity(state.values.len());
    for value in &state.values {
        let index = match value_names.iter().position(|name| **name == *value.name) {
            Some(index) => index,
            None => {
                value_names.push(Arc::from(value.name.as_str()));
                value_names.len() - 1
            }
        };
        values.push((value.raw, index as u16));
    }
    values.sort();
    Some(StatePlan {
        name: Arc::from(state.name.as_str()),
        device,
        kind: state.kind,
        address: state.address,
        poll: state.poll,
        max_age: state.max_age,
        values: values.into_boxed_slice(),
        value_names: value_names.into_boxed_slice(),
    })
}

fn compile_rule(
    rule: &RuleConfig,
    rule_ref: RuleRef,
    names: &Names,
    states: &[StatePlan],
    problems: &mut Problems,
) -> Option<CompiledRule> {
    let device = device_id(&rule.device, names, &rule.origin, problems)?;
    let values = rule
        .values
        .as_ref()
        .map(|ranges| IntervalSet::new(ranges.iter().copied()));
    let coil_values = values.as_ref().map_or(0b11, |set| {
        u8::from(set.contains(0)) | u8::from(set.contains(1)) << 1
    });
    let mut sub_functions = rule.sub_functions.clone();
    let mut mei_types = rule.mei_types.clone();
    if let Some(list) = &mut sub_functions {
        list.sort_unstable();
    }
    if let Some(list) = &mut mei_types {
        list.sort_unstable();
    }
    let mut functions = rule.functions.clone();
    functions.sort_unstable();
    functions.dedup();
    Some(CompiledRule {
        rule: rule_ref,
        device,
        functions: functions.into_boxed_slice(),
        addresses: IntervalSet::new(rule.addresses.iter().copied()),
        values,
        coil_values,
        quantity: rule.quantity,
        sub_functions: sub_functions.map(Vec::into_boxed_slice),
        mei_types: mei_types.map(Vec::into_boxed_slice),
        when: compile_when(rule, names, states, problems)?,
        rate: None,
    })
}

/// Compiles the rule's conditions; `Some(None)` when it has none.
fn compile_when(
    rule: &RuleConfig,
    names: &Names,
    states: &[StatePlan],
    problems: &mut Problems,
) -> Option<Option<Box<CompiledWhen>>> {
    let when = &rule.when;
    let mut conditions = Vec::new();
    for (state_name, value_name) in &when.state {
        let state = names.states.get(state_name).copied();
        let plan = state.and_then(|state| states.get(state).map(|plan| (state, plan)));
        let Some((state, plan)) = plan else {
            problems.error(&rule.origin, format!("unknown state \"{state_name}\""));
            return None;
        };
        let Some(value) = plan
            .value_names
            .iter()
            .position(|name| **name == **value_name)
        else {
            problems.error(
                &rule.origin,
                format!("state \"{state_name}\" has no value \"{value_name}\""),
            );
            return None;
        };
        conditions.push((state, value as u16));
    }

    let roles = when.role.as_ref().map(|roles| {
        let mut ids: Vec<super::RoleId> = roles
            .iter()
            .filter_map(|role| names.roles.iter().position(|known| **known == **role))
            .map(|id| id as super::RoleId)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_boxed_slice()
    });
    let empty = when.sources.is_none()
        && roles.is_none()
        && conditions.is_empty()
        && when.schedule.is_none()
        && when.window.is_none();
    if empty {
        return Some(None);
    }
    Some(Some(Box::new(CompiledWhen {
        sources: when
            .sources
            .as_ref()
            .map(|nets| SourceSet::new(nets.iter().copied())),
        source_nets: when.sources.clone().unwrap_or_default().into_boxed_slice(),
        roles,
        states: conditions.into_boxed_slice(),
        schedule: when.schedule.clone().map(Vec::into_boxed_slice),
        windows: when.window.clone().map(Vec::into_boxed_slice),
    })))
}

/// Groups rule indices by table slot and function code, keeping rules in
/// file order within a group.
fn build_tables(
    mut placements: Vec<(usize, u8, u32)>,
    slot_count: usize,
) -> (Vec<FunctionTable>, Vec<u32>) {
    placements.sort_unstable();
    let mut tables = vec![FunctionTable::default(); slot_count];
    let mut candidates = Vec::with_capacity(placements.len());
    let mut entries: Vec<(u8, u32, u32)> = Vec::new();
    let mut current_slot = None;
    for (slot, function, rule) in placements {
        if current_slot != Some(slot) {
            if let Some(previous) = current_slot {
                tables[previous].entries = std::mem::take(&mut entries).into_boxed_slice();
            }
            current_slot = Some(slot);
        }
        let position = candidates.len() as u32;
        match entries.last_mut() {
            Some(entry) if entry.0 == function => entry.2 = position + 1,
            _ => entries.push((function, position, position + 1)),
        }
        candidates.push(rule);
    }
    if let Some(previous) = current_slot {
        tables[previous].entries = entries.into_boxed_slice();
    }
    (tables, candidates)
}

/// Builds the source index of vendors identified by source address.
fn build_identity(vendors: &[VendorConfig], problems: &mut Problems) -> SourceIndex {
    let entries = vendors
        .iter()
        .enumerate()
        .filter(|(_, vendor)| vendor.certificate.is_empty() && !vendor.has_opcua_identity())
        .flat_map(|(id, vendor)| vendor.sources.iter().map(move |net| (*net, id)));
    match SourceIndex::new(entries) {
        Ok(index) => index,
        Err(overlap) => {
            let vendor = &vendors[overlap.second.1];
            problems.error(
                &vendor.origin,
                format!(
                    "vendor \"{}\": source {} overlaps {} of vendor \"{}\"",
                    vendor.name, overlap.second.0, overlap.first.0, vendors[overlap.first.1].name
                ),
            );
            SourceIndex::default()
        }
    }
}

fn vendor_plan(vendor: &VendorConfig) -> VendorPlan {
    VendorPlan {
        name: Arc::from(vendor.name.as_str()),
        file_name: Arc::from(vendor.file_name.as_str()),
        sources: vendor.sources.clone(),
        max_sessions: vendor.max_sessions,
        rule_labels: (1..=vendor.rules.len())
            .map(|n| Arc::from(format!("{}#{n}", vendor.file_name)))
            .collect(),
    }
}

fn opcua_listener_plan(
    listener: &crate::config::ListenerConfig,
    names: &Names,
    problems: &mut Problems,
) -> Option<OpcuaListenerPlan> {
    let server = listener.opcua.clone()?;
    let device = match &listener.target {
        ListenerTarget::TagsOnly => None,
        ListenerTarget::Device(device) => {
            let Some(&device) = names.opcua_devices.get(device) else {
                problems.error(
                    &listener.origin,
                    format!("unknown OPC UA device \"{device}\""),
                );
                return None;
            };
            Some(device)
        }
        ListenerTarget::Routes(_) => {
            problems.error(
                &listener.origin,
                "an opcua listener takes one device or none".to_owned(),
            );
            return None;
        }
    };
    Some(OpcuaListenerPlan {
        name: Arc::from(listener.name.as_str()),
        bind: listener.bind,
        mode: listener.mode,
        device,
        limits: listener.limits,
        server,
    })
}

fn compile_opcua_rule(
    rule: &RuleConfig,
    rule_ref: RuleRef,
    rate: Option<Box<RateLimiter>>,
    names: &Names,
    states: &[StatePlan],
    problems: &mut Problems,
) -> Option<CompiledOpcuaRule> {
    let opcua = rule.opcua.as_ref()?;
    // A rule for a Modbus device allows the tags over that device.
    let target = match (
        names.opcua_devices.get(&rule.device),
        names.devices.get(&rule.device),
    ) {
        (Some(&device), _) => OpcuaTarget::Device(device),
        (None, Some(&device)) => OpcuaTarget::Tags(device),
        (None, None) => {
            problems.error(&rule.origin, format!("unknown device \"{}\"", rule.device));
            return None;
        }
    };
    Some(CompiledOpcuaRule {
        rule: rule_ref,
        services: opcua
            .services
            .iter()
            .fold(0, |bits, service| bits | service_bit(*service)),
        nodes: opcua.nodes.clone().into_boxed_slice(),
        // Tag rules take no browse paths: validation refuses them.
        subtrees: match target {
            OpcuaTarget::Device(device) => super::opcua::compile_subtrees(device, &opcua.nodes),
            OpcuaTarget::Tags(_) => Box::default(),
        },
        target,
        values: opcua.values.clone().map(Vec::into_boxed_slice),
        when: compile_when(rule, names, states, problems)?,
        rate,
    })
}

fn opcua_identities(vendors: &[VendorConfig]) -> OpcuaIdentities {
    let mut identities = OpcuaIdentities::default();
    for (id, vendor) in vendors.iter().enumerate() {
        for user in &vendor.opcua_users {
            identities
                .users
                .push((user.username.clone(), user.password_hash.clone(), id));
        }
        for thumbprint in &vendor.opcua_user_certificates {
            identities.certificates.push((*thumbprint, id));
        }
        if vendor.opcua_anonymous {
            identities.anonymous = Some(id);
        }
    }
    identities
}
