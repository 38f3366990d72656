//! Explanations of single decisions for `sluice check --explain`: parsing a
//! query such as `vendor=acme device=press-1 function=3 address=0`, deciding
//! it with the code `decide()` runs, and describing which check each rule of
//! the vendor for the device failed. Explaining takes no rate limit tokens.

use std::fmt;
use std::net::IpAddr;
use std::time::Instant;

use jiff::civil::DateTime;
use jiff::{Timestamp, Zoned};

use super::{
    CompiledRule, Context, Decision, DenyReason, DeviceId, ModbusAccess, Policy, StateTable,
    Tokens, VendorId, WrittenValues, DIAGNOSTICS, ENCAPSULATED_INTERFACE, FORCE_LISTEN_ONLY,
};
use crate::config::{function_code, function_name, DatedWindow, WeeklyWindow, MAX_FUNCTION_CODE};
use crate::policy::{Condition, IntervalSet};

/// The MEI type of read device identification, the FC 43 request that the
/// function name `read_device_identification` stands for.
const READ_DEVICE_IDENTIFICATION: u8 = 0x0E;

/// Functions whose requests carry an address.
const ADDRESSED: [u8; 11] = [1, 2, 3, 4, 5, 6, 15, 16, 22, 23, 24];
/// Functions whose requests carry a quantity.
const COUNTED: [u8; 7] = [1, 2, 3, 4, 15, 16, 23];
/// Functions whose requests carry written values.
const VALUED: [u8; 6] = [5, 6, 15, 16, 22, 23];

/// A query key that is missing, unknown or has an invalid value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError {
    /// The key as written, such as `function` or `state.press-1-mode`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl std::error::Error for QueryError {}

fn invalid(key: &str, message: impl Into<String>) -> QueryError {
    QueryError {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// One request to explain, with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainQuery {
    pub vendor: VendorId,
    pub device: DeviceId,
    pub function: u8,
    pub unit: u8,
    /// The 0-based PDU address, for functions that carry one.
    pub address: Option<u16>,
    /// The quantity read, or written by FC 15 and 16.
    pub quantity: Option<u16>,
    /// The write address of FC 23.
    pub write_address: Option<u16>,
    /// Written values. For FC 22, the AND mask and then the OR mask.
    pub values: Vec<u16>,
    pub sub_function: Option<u16>,
    pub mei_type: Option<u8>,
    pub source: IpAddr,
    /// The Modbus role of the client certificate, as `role=` gives it.
    pub role: Option<String>,
    /// The time of the request in the gateway's time zone.
    pub time: Zoned,
    /// States with a known value: state index and value index. Other states
    /// are unknown.
    pub states: Vec<(usize, u16)>,
    /// Written values in wire form: big-endian registers, or packed coils.
    payload: Vec<u8>,
}

/// The keys a query may use, in the order the request line prints them.
const KEYS: [&str; 14] = [
    "vendor",
    "device",
    "function",
    "address",
    "quantity",
    "write_address",
    "value",
    "unit",
    "sub_function",
    "mei_type",
    "source",
    "role",
    "time",
    "state.NAME",
];

/// The `key=value` pairs of a query, in the order written.
struct Pairs<'a> {
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Pairs<'a> {
    fn split(text: &'a str) -> Result<Self, QueryError> {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for word in text.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                return Err(invalid(
                    word,
                    "expected KEY=VALUE, such as function=read_holding_registers",
                ));
            };
            let known = KEYS.contains(&key) || key.starts_with("state.");
            if !known {
                return Err(invalid(
                    key,
                    format!("unknown key; use {}", KEYS.join(", ")),
                ));
            }
            if value.is_empty() {
                return Err(invalid(key, "empty value"));
            }
            if key != "value" && pairs.iter().any(|(seen, _)| *seen == key) {
                return Err(invalid(key, "given twice; give it once"));
            }
            pairs.push((key, value));
        }
        Ok(Pairs { pairs })
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs
            .iter()
            .find(|(seen, _)| *seen == key)
            .map(|(_, value)| *value)
    }

    fn require(&self, key: &str, hint: &str) -> Result<&'a str, QueryError> {
        self.get(key)
            .ok_or_else(|| invalid(key, format!("missing; {hint}")))
    }
}

/// Parses a decimal or `0x` hexadecimal number up to `max`.
fn number(key: &str, text: &str, max: u64) -> Result<u64, QueryError> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse::<u64>(),
    };
    match parsed {
        Ok(value) if value <= max => Ok(value),
        Ok(value) => Err(invalid(key, format!("{value} exceeds {max}"))),
        Err(_) => Err(invalid(
            key,
            format!("invalid number \"{text}\"; write a number from 0 to {max}"),
        )),
    }
}

fn number16(key: &str, text: &str) -> Result<u16, QueryError> {
    number(key, text, u64::from(u16::MAX)).map(|value| value as u16)
}

fn function_label(code: u8) -> String {
    match function_name(code) {
        Some(name) => format!("{name} ({code})"),
        None => format!("function {code}"),
    }
}

impl ExplainQuery {
    /// Parses a query of `KEY=VALUE` words against `policy`. Without `time`,
    /// the request is explained at the current time.
    pub fn parse(policy: &Policy, text: &str) -> Result<Self, QueryError> {
        ExplainQuery::parse_at(policy, text, Timestamp::now())
    }

    /// Parses a query as `parse` does, with `now` as the default time.
    pub fn parse_at(policy: &Policy, text: &str, now: Timestamp) -> Result<Self, QueryError> {
        let pairs = Pairs::split(text)?;
        let vendor_name = pairs.require("vendor", "name the vendor, as vendor=acme")?;
        let vendor = policy.vendor_id(vendor_name).ok_or_else(|| {
            let known: Vec<&str> = policy.vendors.iter().map(|v| &*v.name).collect();
            invalid(
                "vendor",
                format!(
                    "unknown vendor \"{vendor_name}\"; known vendors: {}",
                    known.join(", ")
                ),
            )
        })?;
        let device_name = pairs.require("device", "name the device, as device=press-1")?;
        let device = policy.device_id(device_name).ok_or_else(|| {
            let known: Vec<&str> = policy.devices.iter().map(|d| &*d.name).collect();
            invalid(
                "device",
                format!(
                    "unknown device \"{device_name}\"; known devices: {}",
                    known.join(", ")
                ),
            )
        })?;
        let function_text = pairs.require(
            "function",
            "name the function, as function=read_holding_registers or function=3",
        )?;
        let function = parse_function(function_text)?;
        check_applies(&pairs, function)?;

        let values = parse_values(&pairs, function)?;
        let (quantity, payload) = quantity_and_payload(&pairs, function, &values)?;
        let address = match ADDRESSED.contains(&function) {
            true => Some(number16(
                "address",
                pairs.require("address", "the function addresses a table, give address=N")?,
            )?),
            false => None,
        };
        let write_address = match (function, pairs.get("write_address")) {
            (23, Some(text)) => Some(number16("write_address", text)?),
            (23, None) => address,
            _ => None,
        };
        let sub_function = match function {
            DIAGNOSTICS => Some(number16(
                "sub_function",
                pairs.require("sub_function", "diagnostics needs one, as sub_function=0")?,
            )?),
            _ => None,
        };
        let mei_type = match (function, pairs.get("mei_type")) {
            (ENCAPSULATED_INTERFACE, Some(text)) => Some(number("mei_type", text, 255)? as u8),
            (ENCAPSULATED_INTERFACE, None) if function_text == "read_device_identification" => {
                Some(READ_DEVICE_IDENTIFICATION)
            }
            (ENCAPSULATED_INTERFACE, None) => {
                return Err(invalid(
                    "mei_type",
                    "missing; encapsulated_interface_transport needs one, as mei_type=14",
                ))
            }
            _ => None,
        };
        let unit = match pairs.get("unit") {
            Some(text) => number("unit", text, 255)? as u8,
            None => policy.devices[device].unit,
        };

        Ok(ExplainQuery {
            vendor,
            device,
            function,
            unit,
            address,
            quantity,
            write_address,
            values,
            sub_function,
            mei_type,
            source: parse_source(policy, vendor, pairs.get("source"))?,
            role: pairs.get("role").map(str::to_owned),
            time: parse_time(policy, pairs.get("time"), now)?,
            states: parse_states(policy, &pairs)?,
            payload,
        })
    }

    /// Returns the access the session would build for this request.
    pub fn access(&self) -> ModbusAccess<'_> {
        let mut access = ModbusAccess {
            unit: self.unit,
            function: self.function,
            read: None,
            write: None,
            values: WrittenValues::None,
            quantity: None,
            sub_function: self.sub_function,
            mei_type: self.mei_type,
        };
        let address = self.address.unwrap_or(0);
        let quantity = self.quantity.unwrap_or(1);
        let first_value = self.values.first().copied().unwrap_or(0);
        match self.function {
            1..=4 => {
                access.read = Some((address, quantity));
                access.quantity = Some(quantity);
            }
            5 => {
                access.write = Some((address, 1));
                access.values = WrittenValues::Coil(first_value != 0);
            }
            6 => {
                access.write = Some((address, 1));
                access.values = WrittenValues::Register(first_value);
            }
            15 => {
                access.write = Some((address, quantity));
                access.quantity = Some(quantity);
                access.values = WrittenValues::Coils {
                    packed: &self.payload,
                    count: quantity,
                };
            }
            16 => {
                access.write = Some((address, quantity));
                access.quantity = Some(quantity);
                access.values = WrittenValues::Registers(&self.payload);
            }
            22 => {
                access.write = Some((address, 1));
                access.values = WrittenValues::Mask {
                    and_mask: first_value,
                    or_mask: self.values.get(1).copied().unwrap_or(0),
                };
            }
            23 => {
                access.read = Some((address, quantity));
                let count = self.values.len() as u16;
                access.write = Some((self.write_address.unwrap_or(address), count));
                access.values = WrittenValues::Registers(&self.payload);
            }
            24 => access.read = Some((address, 1)),
            _ => {}
        }
        access
    }

    /// Formats the query with its defaults filled in, in query syntax.
    fn describe(&self, policy: &Policy) -> String {
        let mut words = vec![
            format!("vendor={}", policy.vendor_name(self.vendor)),
            format!("device={}", policy.devices[self.device].name),
            format!(
                "function={}",
                function_name(self.function).map_or(self.function.to_string(), str::to_owned)
            ),
        ];
        let optional = [
            ("address", self.address.map(u32::from)),
            ("quantity", self.quantity.map(u32::from)),
            ("write_address", self.write_address.map(u32::from)),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                words.push(format!("{key}={value}"));
            }
        }
        if !self.values.is_empty() {
            let values: Vec<String> = self.values.iter().map(u16::to_string).collect();
            words.push(format!("value={}", values.join(",")));
        }
        words.push(format!("unit={}", self.unit));
        if let Some(sub_function) = self.sub_function {
            words.push(format!("sub_function={sub_function}"));
        }
        if let Some(mei_type) = self.mei_type {
            words.push(format!("mei_type={mei_type}"));
        }
        words.push(format!("source={}", self.source));
        if let Some(role) = &self.role {
            words.push(format!("role={role}"));
        }
        words.push(format!(
            "time={}",
            self.time.strftime("%Y-%m-%dT%H:%M:%S%:z")
        ));
        for &(state, value) in &self.states {
            let plan = &policy.states[state];
            words.push(format!(
                "state.{}={}",
                plan.name,
                plan.value_names[usize::from(value)]
            ));
        }
        words.join(" ")
    }
}

fn parse_function(text: &str) -> Result<u8, QueryError> {
    if let Some(code) = function_code(text) {
        return Ok(code);
    }
    match text.parse::<u8>() {
        Ok(code) if (1..=MAX_FUNCTION_CODE).contains(&code) => Ok(code),
        Ok(_) => Err(invalid(
            "function",
            format!("function code {text} outside 1..=127"),
        )),
        Err(_) => Err(invalid(
            "function",
            format!("unknown function \"{text}\"; use a code from 1 to 127 or a function name, such as read_holding_registers"),
        )),
    }
}

/// Rejects keys that the function's requests do not carry.
fn check_applies(pairs: &Pairs<'_>, function: u8) -> Result<(), QueryError> {
    let applies: [(&str, bool); 6] = [
        ("address", ADDRESSED.contains(&function)),
        ("quantity", COUNTED.contains(&function)),
        ("write_address", function == 23),
        ("value", VALUED.contains(&function)),
        ("sub_function", function == DIAGNOSTICS),
        ("mei_type", function == ENCAPSULATED_INTERFACE),
    ];
    for (key, applies) in applies {
        if !applies && pairs.get(key).is_some() {
            return Err(invalid(
                key,
                format!(
                    "a {} request has none; remove the key",
                    function_label(function)
                ),
            ));
        }
    }
    Ok(())
}

/// Collects every `value`, repeated or comma separated, and checks their
/// count and range for the function.
fn parse_values(pairs: &Pairs<'_>, function: u8) -> Result<Vec<u16>, QueryError> {
    let mut values = Vec::new();
    for (key, text) in &pairs.pairs {
        if *key != "value" {
            continue;
        }
        for item in text.split(',') {
            values.push(number16("value", item.trim())?);
        }
    }
    if !VALUED.contains(&function) {
        return Ok(values);
    }
    let label = function_label(function);
    let expected = match function {
        5 | 6 => Some(1),
        22 => Some(2),
        _ => None,
    };
    if values.is_empty() {
        let hint = match function {
            22 => "give the AND and OR masks, as value=0x00ff,0x1200",
            _ => "give the written value, as value=10",
        };
        return Err(invalid(
            "value",
            format!("missing; {label} writes values, {hint}"),
        ));
    }
    if let Some(expected) = expected {
        if values.len() != expected {
            return Err(invalid(
                "value",
                format!("{label} writes {expected} value(s), got {}", values.len()),
            ));
        }
    }
    if matches!(function, 5 | 15) {
        if let Some(bad) = values.iter().find(|&&value| value > 1) {
            return Err(invalid(
                "value",
                format!("coil value {bad} is neither 0 (off) nor 1 (on)"),
            ));
        }
    }
    Ok(values)
}

/// Returns the quantity and the written values in wire form.
fn quantity_and_payload(
    pairs: &Pairs<'_>,
    function: u8,
    values: &[u16],
) -> Result<(Option<u16>, Vec<u8>), QueryError> {
    let given = match pairs.get("quantity") {
        Some(text) => Some(number16("quantity", text)?),
        None => None,
    };
    if given == Some(0) {
        return Err(invalid(
            "quantity",
            "0 is not a valid quantity; use 1 or more",
        ));
    }
    let count = values.len() as u16;
    match function {
        15 | 16 => {
            if given.is_some_and(|quantity| quantity != count) {
                return Err(invalid(
                    "quantity",
                    format!(
                        "{} differs from the {count} values given",
                        given.unwrap_or(0)
                    ),
                ));
            }
            let payload = match function {
                15 => pack_coils(values),
                _ => registers(values),
            };
            Ok((Some(count), payload))
        }
        23 => Ok((Some(given.unwrap_or(1)), registers(values))),
        _ if COUNTED.contains(&function) => Ok((Some(given.unwrap_or(1)), Vec::new())),
        _ => Ok((None, Vec::new())),
    }
}

fn registers(values: &[u16]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|value| value.to_be_bytes())
        .collect()
}

/// Packs coil values least significant bit first, as FC 15 sends them.
fn pack_coils(values: &[u16]) -> Vec<u8> {
    let mut packed = vec![0u8; values.len().div_ceil(8)];
    for (index, value) in values.iter().enumerate() {
        if *value != 0 {
            packed[index / 8] |= 1 << (index % 8);
        }
    }
    packed
}

/// Returns the given source, or the first address of the vendor's first
/// source network.
fn parse_source(
    policy: &Policy,
    vendor: VendorId,
    text: Option<&str>,
) -> Result<IpAddr, QueryError> {
    match text {
        Some(text) => text.parse::<IpAddr>().map_err(|_| {
            invalid(
                "source",
                format!("invalid IP address \"{text}\"; write one such as 10.50.1.7 or ::1"),
            )
        }),
        None => match policy.vendors[vendor].sources.first() {
            Some(net) => Ok(net.network()),
            // A vendor identified by certificate alone may connect from
            // anywhere, so any address stands for it.
            None if policy.has_certificate_matchers(vendor) => Ok(IpAddr::from([0, 0, 0, 0])),
            None => Err(invalid(
                "source",
                format!(
                    "missing, and vendor {} has no sources to take one from; give source=IP",
                    policy.vendor_name(vendor)
                ),
            )),
        },
    }
}

/// Parses an instant with an offset or `Z`, or a local time of the gateway's
/// time zone. A local time in a daylight-saving gap moves forward by the
/// gap; one that occurs twice is the earlier of the two.
fn parse_time(policy: &Policy, text: Option<&str>, now: Timestamp) -> Result<Zoned, QueryError> {
    let timezone = policy.timezone.clone();
    let Some(text) = text else {
        return Ok(now.to_zoned(timezone));
    };
    if let Ok(instant) = text.parse::<Timestamp>() {
        return Ok(instant.to_zoned(timezone));
    }
    text.parse::<DateTime>()
        .ok()
        .and_then(|local| local.to_zoned(timezone).ok())
        .ok_or_else(|| {
            invalid(
                "time",
                format!("invalid time \"{text}\"; write a local time such as 2026-12-10T09:30, or add an offset such as 2026-12-10T08:30Z"),
            )
        })
}

fn parse_states(policy: &Policy, pairs: &Pairs<'_>) -> Result<Vec<(usize, u16)>, QueryError> {
    let mut states = Vec::new();
    for (key, value) in &pairs.pairs {
        let Some(name) = key.strip_prefix("state.") else {
            continue;
        };
        let Some(state) = policy.states.iter().position(|plan| &*plan.name == name) else {
            let known: Vec<&str> = policy.states.iter().map(|plan| &*plan.name).collect();
            return Err(invalid(
                key,
                format!(
                    "unknown state \"{name}\"; known states: {}",
                    list_or_none(&known)
                ),
            ));
        };
        let plan = &policy.states[state];
        let Some(index) = plan.value_names.iter().position(|known| &**known == *value) else {
            let known: Vec<&str> = plan.value_names.iter().map(|name| &**name).collect();
            return Err(invalid(
                key,
                format!(
                    "state {name} has no value \"{value}\"; its values: {}",
                    list_or_none(&known)
                ),
            ));
        };
        states.push((state, index as u16));
    }
    Ok(states)
}

fn list_or_none(names: &[&str]) -> String {
    match names.is_empty() {
        true => "none are defined".to_owned(),
        false => names.join(", "),
    }
}

/// The decision on one query and the lines that explain it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub decision: Decision,
    /// The first line is `allow FILE#N` or `deny (exception NN): REASON`;
    /// detail lines follow, each indented by two spaces.
    pub lines: Vec<String>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in &self.lines {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

impl Policy {
    /// Decides `query` as `decide()` would, without taking rate limit
    /// tokens, and describes the check each rule of the vendor for the
    /// device failed.
    pub fn explain(&self, query: &ExplainQuery) -> Explanation {
        let instant = Instant::now();
        let table = self.query_states(query, instant);
        let context = Context {
            source: query.source,
            role: query.role.as_deref().and_then(|role| self.role_id(role)),
            now: query.time.timestamp(),
            instant,
            states: &table,
        };
        let access = query.access();
        let decision = self.evaluate(query.vendor, query.device, &access, &context, Tokens::Peek);

        let mut lines = vec![match &decision {
            Decision::Allow { rule } => format!("allow {}", self.rule_label(*rule)),
            Decision::Deny { reason } => {
                format!("deny (exception {:02X}): {reason}", reason.exception_code())
            }
        }];
        lines.push(format!("  request: {}", query.describe(self)));
        self.explain_vendor(query, &context, &mut lines);
        self.explain_rules(query, &access, &context, &decision, &mut lines);
        Explanation { decision, lines }
    }

    /// Returns a state table in which the query's states have their values,
    /// read at `instant`, and every other state is unknown.
    pub(super) fn query_states(&self, query: &ExplainQuery, instant: Instant) -> StateTable {
        let table = StateTable::new(self.states.len());
        for &(state, value) in &query.states {
            let raw = self.states[state]
                .values
                .iter()
                .find(|(_, index)| *index == value)
                .map(|(range, _)| range.first);
            table.set(state, raw, instant);
        }
        table
    }

    /// Adds lines on the vendor's own rate limit and on a source that would
    /// not identify the vendor.
    fn explain_vendor(&self, query: &ExplainQuery, context: &Context<'_>, lines: &mut Vec<String>) {
        let vendor = self.vendor_name(query.vendor);
        if let Some(Some(limiter)) = self.vendor_rates.get(query.vendor) {
            if let Err((_, limit)) = Tokens::Peek.apply(limiter, query.function, context.instant) {
                lines.push(format!("  vendor {vendor}: rate limit reached: {limit}"));
            }
        }
        let plan = &self.vendors[query.vendor];
        let outside = !plan.sources.iter().any(|net| net.contains(&query.source));
        if !self.has_certificate_matchers(query.vendor) {
            if outside {
                lines.push(format!(
                    "  note: source {} is outside the sources of vendor {vendor}, so a plain listener would not identify the client as {vendor}",
                    query.source
                ));
            }
        } else if outside && !plan.sources.is_empty() {
            lines.push(format!(
                "  note: source {} is outside the sources of vendor {vendor}, so a TLS listener would reject its certificate from there",
                query.source
            ));
        }
    }

    /// Adds one line per rule of the vendor for the device, in file order.
    fn explain_rules(
        &self,
        query: &ExplainQuery,
        access: &ModbusAccess<'_>,
        context: &Context<'_>,
        decision: &Decision,
        lines: &mut Vec<String>,
    ) {
        let local = query.time.datetime();
        let mut local_time = Some(local);
        let mut listed = false;
        for rule in &self.rules {
            if rule.rule.vendor as usize != query.vendor || rule.device != query.device {
                continue;
            }
            listed = true;
            let label = self.rule_label(rule.rule);
            let detail = if rule.functions.binary_search(&query.function).is_err() {
                let names: Vec<String> =
                    rule.functions.iter().map(|&c| function_label(c)).collect();
                format!(
                    "function {} is not in the rule's functions: {}",
                    function_label(query.function),
                    names.join(", ")
                )
            } else {
                let checked = self
                    .check_rule(rule, access, context, &mut local_time)
                    .and_then(|()| super::check_rule_rate(rule, access, context, Tokens::Peek));
                match checked {
                    Ok(()) if *decision == (Decision::Allow { rule: rule.rule }) => {
                        "allows".to_owned()
                    }
                    Ok(()) => "also allows".to_owned(),
                    Err(reason) => self.describe_failure(rule, &reason, &local),
                }
            };
            lines.push(format!("  {label}: {detail}"));
        }
        if !listed {
            lines.push(format!(
                "  vendor {} has no rule for device {}",
                self.vendor_name(query.vendor),
                self.devices[query.device].name
            ));
        }
    }

    /// Describes the check a rule failed, with what the rule needs.
    fn describe_failure(
        &self,
        rule: &CompiledRule,
        reason: &DenyReason,
        local: &DateTime,
    ) -> String {
        let values = || rule.values.as_ref().map_or("any".to_owned(), format_set);
        match reason {
            DenyReason::SubFunctionNotAllowed { sub_function } => match &rule.sub_functions {
                None if *sub_function == FORCE_LISTEN_ONLY => format!(
                    "sub_function {sub_function} (force listen only) must be named in the rule's sub_functions"
                ),
                _ => format!(
                    "sub_function {sub_function} is not in the rule's sub_functions: {}",
                    join_numbers(rule.sub_functions.as_deref().unwrap_or_default())
                ),
            },
            DenyReason::MeiTypeNotAllowed { mei_type } => format!(
                "mei_type {mei_type} is not in the rule's mei_types: {}",
                join_numbers(rule.mei_types.as_deref().unwrap_or_default())
            ),
            DenyReason::AddressNotAllowed { address } => match rule.addresses.is_empty() {
                true => format!("address {address} is outside the rule's addresses: it has none"),
                false => format!(
                    "address {address} is outside the rule's addresses {}",
                    format_set(&rule.addresses)
                ),
            },
            DenyReason::QuantityNotAllowed { quantity } => {
                let allowed = rule
                    .quantity
                    .map_or("any".to_owned(), |range| format!("{}-{}", range.first, range.last));
                format!("quantity {quantity} is outside the rule's quantity {allowed}")
            }
            DenyReason::ValueNotAllowed { address, value } => format!(
                "value {value} at address {address} is outside the rule's values {}",
                values()
            ),
            DenyReason::MaskNotAllowed { and_mask, or_mask } => format!(
                "mask write with AND {and_mask:#06x} OR {or_mask:#06x} can leave a value outside the rule's values {}",
                values()
            ),
            DenyReason::ConditionFailed { condition } => self.describe_condition(rule, condition, local),
            DenyReason::StateUnknown { state } => {
                let required = self.required_value(rule, state);
                format!("when.state {state} is unknown, rule needs {required}")
            }
            DenyReason::RateLimited { limit, .. } => format!("rate limit reached: {limit}"),
            DenyReason::NoRuleForDevice
            | DenyReason::FunctionNotAllowed { .. }
            | DenyReason::ServiceNotAllowed { .. }
            | DenyReason::NodeNotAllowed
            | DenyReason::WrittenValueNotAllowed { .. } => reason.to_string(),
        }
    }

    fn describe_condition(
        &self,
        rule: &CompiledRule,
        condition: &Condition,
        local: &DateTime,
    ) -> String {
        let when = rule.when.as_deref();
        match condition {
            Condition::Source { source } => {
                let nets: Vec<String> = when
                    .map(|when| when.source_nets.iter().map(|net| net.to_string()).collect())
                    .unwrap_or_default();
                match nets.is_empty() {
                    true => format!("when.sources is empty, so {source} never matches"),
                    false => format!("when.sources {source} is outside {}", nets.join(", ")),
                }
            }
            Condition::State {
                state,
                required,
                actual,
            } => format!("when.state {state} is {actual}, rule needs {required}"),
            Condition::Role => {
                let roles: Vec<&str> = when
                    .and_then(|when| when.roles.as_deref())
                    .unwrap_or_default()
                    .iter()
                    .map(|&id| &*self.roles[usize::from(id)])
                    .collect();
                match roles.is_empty() {
                    true => "when.role is empty, so the rule never matches".to_owned(),
                    false => format!("when.role needs a certificate role of {}", roles.join(", ")),
                }
            }
            Condition::Schedule => {
                let windows: Vec<String> = when
                    .and_then(|when| when.schedule.as_deref())
                    .unwrap_or_default()
                    .iter()
                    .map(format_weekly)
                    .collect();
                match windows.is_empty() {
                    true => "when.schedule is empty, so the rule never matches".to_owned(),
                    false => format!(
                        "when.schedule {} is outside {}",
                        local.strftime("%a %H:%M"),
                        windows.join(", ")
                    ),
                }
            }
            Condition::Window => {
                let windows: Vec<String> = when
                    .and_then(|when| when.windows.as_deref())
                    .unwrap_or_default()
                    .iter()
                    .map(format_dated)
                    .collect();
                match windows.is_empty() {
                    true => "when.window is empty, so the rule never matches".to_owned(),
                    false => format!(
                        "when.window {} is outside {}",
                        local.strftime("%Y-%m-%dT%H:%M"),
                        windows.join(", ")
                    ),
                }
            }
            Condition::SourceUnknown => {
                "when.sources cannot match because the client's address is unknown".to_owned()
            }
        }
    }

    /// Returns the value name a rule requires of the state named `state`.
    fn required_value(&self, rule: &CompiledRule, state: &str) -> String {
        rule.when
            .as_deref()
            .and_then(|when| {
                when.states
                    .iter()
                    .find(|(index, _)| &*self.states[*index].name == state)
                    .map(|(index, value)| {
                        self.states[*index].value_names[usize::from(*value)].to_string()
                    })
            })
            .unwrap_or_default()
    }
}

fn join_numbers<T: ToString>(numbers: &[T]) -> String {
    let texts: Vec<String> = numbers.iter().map(T::to_string).collect();
    match texts.is_empty() {
        true => "none".to_owned(),
        false => texts.join(", "),
    }
}

/// Formats a set as rules write it, such as `0-99, 200`.
fn format_set(set: &IntervalSet) -> String {
    let ranges: Vec<String> = set
        .intervals()
        .iter()
        .map(|&(first, last)| match first == last {
            true => first.to_string(),
            false => format!("{first}-{last}"),
        })
        .collect();
    match ranges.is_empty() {
        true => "none".to_owned(),
        false => ranges.join(", "),
    }
}

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// Formats a weekly window as rules write it, such as `Mon-Fri 07:00-17:00`.
fn format_weekly(window: &WeeklyWindow) -> String {
    let mut runs: Vec<String> = Vec::new();
    let mut day = 0;
    while day < 7 {
        if window.days & (1 << day) == 0 {
            day += 1;
            continue;
        }
        let first = day;
        while day + 1 < 7 && window.days & (1 << (day + 1)) != 0 {
            day += 1;
        }
        runs.push(match first == day {
            true => DAY_NAMES[first].to_owned(),
            false => format!("{}-{}", DAY_NAMES[first], DAY_NAMES[day]),
        });
        day += 1;
    }
    let time = |minutes: u16| format!("{:02}:{:02}", minutes / 60, minutes % 60);
    format!(
        "{} {}-{}",
        runs.join(","),
        time(window.start),
        time(window.end)
    )
}

fn format_dated(window: &DatedWindow) -> String {
    format!(
        "{}/{}",
        window.start.strftime("%Y-%m-%dT%H:%M"),
        window.end.strftime("%Y-%m-%dT%H:%M")
    )
}
