//! Validation of the `[[tag]]` sections: typed values that sluice decodes
//! from a device's mirror blocks, for front ends such as OPC UA. Decoding
//! itself lives in `tags`.

use std::collections::HashMap;

use toml::Spanned;

use super::diagnostic::Origin;
use super::gateway::Checker;
use super::mirror::kind_name;
use super::raw;
use super::{DeviceConfig, NodeIdPattern, NodePattern, OpcuaRuleConfig, StateKind};

/// The namespace URI of tag nodes on OPC UA listeners.
pub const NAMESPACE_URI: &str = "urn:sluice:tags";

/// Number of addresses in each Modbus table.
const TABLE_SIZE: u32 = 0x1_0000;
/// Maximum length of a string tag in characters: 123 registers, the maximum
/// of one Write Multiple Registers request (FC 16), two characters each.
pub const MAX_STRING_LENGTH: u16 = 246;

/// The value type of a tag, as written in `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagType {
    Bool,
    Int16,
    UInt16,
    Int32,
    UInt32,
    Int64,
    UInt64,
    Float32,
    Float64,
    /// ASCII text of up to `length` characters, two per register.
    String {
        length: u16,
    },
}

impl TagType {
    /// Returns the number of addresses the type covers: one coil or input for
    /// `bool`, registers otherwise.
    pub fn register_count(self) -> u16 {
        match self {
            TagType::Bool | TagType::Int16 | TagType::UInt16 => 1,
            TagType::Int32 | TagType::UInt32 | TagType::Float32 => 2,
            TagType::Int64 | TagType::UInt64 | TagType::Float64 => 4,
            TagType::String { length } => length.div_ceil(2),
        }
    }

    /// Returns the configuration word of the type.
    pub fn name(self) -> &'static str {
        match self {
            TagType::Bool => "bool",
            TagType::Int16 => "int16",
            TagType::UInt16 => "uint16",
            TagType::Int32 => "int32",
            TagType::UInt32 => "uint32",
            TagType::Int64 => "int64",
            TagType::UInt64 => "uint64",
            TagType::Float32 => "float32",
            TagType::Float64 => "float64",
            TagType::String { .. } => "string",
        }
    }

    fn is_numeric(self) -> bool {
        !matches!(self, TagType::Bool | TagType::String { .. })
    }
}

/// The order of bytes and registers of a multi-register value, named by
/// where the bytes `A B C D` of a big-endian 32-bit value end up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOrder {
    /// Big-endian: `AB CD`.
    Abcd,
    /// Registers reversed, bytes big-endian in each: `CD AB`.
    Cdab,
    /// Registers in order, bytes swapped in each: `BA DC`.
    Badc,
    /// Little-endian: `DC BA`.
    Dcba,
}

impl RegisterOrder {
    /// Returns true when the registers come least significant first.
    pub fn swaps_registers(self) -> bool {
        matches!(self, RegisterOrder::Cdab | RegisterOrder::Dcba)
    }

    /// Returns true when each register contains its low byte first.
    pub fn swaps_bytes(self) -> bool {
        matches!(self, RegisterOrder::Badc | RegisterOrder::Dcba)
    }
}

/// Whether a tag may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagAccess {
    Read,
    ReadWrite,
}

/// One checked `[[tag]]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct TagConfig {
    pub name: String,
    pub device: String,
    pub kind: StateKind,
    pub address: u16,
    pub data_type: TagType,
    pub order: RegisterOrder,
    /// The bit, 0 (least significant) to 15, of a `bool` tag on a register.
    pub bit: Option<u8>,
    /// Engineering value = raw × `scale` + `offset`; never 0 or non-finite.
    pub scale: f64,
    pub offset: f64,
    /// Engineering unit, such as `°C`.
    pub unit: Option<String>,
    pub access: TagAccess,
    pub origin: Origin,
}

const KINDS: [(&str, StateKind); 4] = [
    ("holding_register", StateKind::HoldingRegister),
    ("input_register", StateKind::InputRegister),
    ("coil", StateKind::Coil),
    ("discrete_input", StateKind::DiscreteInput),
];

const TYPES: [(&str, TagType); 10] = [
    ("bool", TagType::Bool),
    ("int16", TagType::Int16),
    ("uint16", TagType::UInt16),
    ("int32", TagType::Int32),
    ("uint32", TagType::UInt32),
    ("int64", TagType::Int64),
    ("uint64", TagType::UInt64),
    ("float32", TagType::Float32),
    ("float64", TagType::Float64),
    ("string", TagType::String { length: 0 }),
];

const ORDERS: [(&str, RegisterOrder); 4] = [
    ("ABCD", RegisterOrder::Abcd),
    ("CDAB", RegisterOrder::Cdab),
    ("BADC", RegisterOrder::Badc),
    ("DCBA", RegisterOrder::Dcba),
];

impl Checker<'_> {
    /// Checks every `[[tag]]` section against the checked `devices`.
    /// `raw_devices` are the devices as written, to tell a device that is
    /// missing from one whose own settings were invalid.
    pub(super) fn tags(
        &mut self,
        sections: &[Spanned<raw::TagSection>],
        raw_devices: &[raw::DeviceSection],
        devices: &[DeviceConfig],
    ) -> Vec<TagConfig> {
        let mut names = HashMap::new();
        let mut tags = Vec::new();
        for (index, entry) in sections.iter().enumerate() {
            let key = format!("tag[{}]", index + 1);
            if let Some(tag) = self.tag(&key, entry, raw_devices, devices, &mut names) {
                tags.push(tag);
            }
        }
        tags
    }

    fn tag(
        &mut self,
        key: &str,
        entry: &Spanned<raw::TagSection>,
        raw_devices: &[raw::DeviceSection],
        devices: &[DeviceConfig],
        names: &mut HashMap<String, Origin>,
    ) -> Option<TagConfig> {
        let section = entry.get_ref();
        let name = self.required(
            key,
            "name",
            entry,
            section.name.as_ref(),
            "name = \"Press1.Temperature\"",
        );
        if let Some(name) = name {
            self.unique_name(&format!("{key}.name"), "tag", name, names);
        }
        let device = self.required(
            key,
            "device",
            entry,
            section.device.as_ref(),
            "device = \"press-1\"",
        );
        let device = device.and_then(|device| self.tag_device(key, device, raw_devices));
        let kind = match section.kind.as_ref() {
            Some(kind) => self.choice(
                &format!("{key}.kind"),
                Some(kind),
                &KINDS,
                StateKind::HoldingRegister,
            ),
            None => self.missing(
                key,
                "kind",
                entry,
                "kind = \"holding_register\", \"input_register\", \"coil\" or \"discrete_input\"",
            ),
        };
        let address = match section.address.as_ref() {
            Some(address) => self.integer(&format!("{key}.address"), Some(address), 0, (0, 65_535)),
            None => self.missing(
                key,
                "address",
                entry,
                "address = 100, the 0-based address of the first register or bit",
            ),
        };
        let data_type = self.tag_type(key, entry, section);
        let data_type =
            data_type.and_then(|data_type| self.type_fits_kind(key, section, data_type, kind));
        let bit = self.register_bit(key, section, data_type, kind);
        let order = self.tag_order(key, section, data_type);
        let (scale, offset) = self.scale_offset(key, section, data_type);
        let access = self.choice(
            &format!("{key}.access"),
            section.access.as_ref(),
            &[
                ("read", TagAccess::Read),
                ("read_write", TagAccess::ReadWrite),
            ],
            TagAccess::Read,
        );
        let access = match (access, kind, &section.access) {
            (
                Some(TagAccess::ReadWrite),
                Some(StateKind::InputRegister | StateKind::DiscreteInput),
                Some(value),
            ) => {
                self.error(
                    value,
                    format!("{key}.access: {} cannot be written; use access = \"read\" or kind = \"{}\"", kind_name(kind?), writable_kind(kind?)),
                );
                None
            }
            (access, ..) => access,
        };

        let (name, device, kind, address, data_type) =
            (name?, device?, kind?, address? as u16, data_type?);
        let end = u32::from(address) + u32::from(data_type.register_count());
        if end > TABLE_SIZE {
            self.error(
                section.address.as_ref()?,
                format!("{key}.address: {} at {address} needs addresses up to {}, past the last address 65535; lower the address", data_type.name(), end - 1),
            );
            return None;
        }
        self.inside_mirror(key, entry, &device, kind, address, data_type, devices)?;
        Some(TagConfig {
            name: name.get_ref().clone(),
            device,
            kind,
            address,
            data_type,
            order: order?,
            bit: bit?,
            scale: scale?,
            offset: offset?,
            unit: section.unit.as_ref().map(|unit| unit.get_ref().clone()),
            access: access?,
            origin: self.at(name),
        })
    }

    fn required<'a, T>(
        &mut self,
        key: &str,
        field: &str,
        entry: &Spanned<raw::TagSection>,
        value: Option<&'a Spanned<T>>,
        example: &str,
    ) -> Option<&'a Spanned<T>> {
        if value.is_none() {
            self.missing::<()>(key, field, entry, example);
        }
        value
    }

    fn missing<T>(
        &mut self,
        key: &str,
        field: &str,
        entry: &Spanned<raw::TagSection>,
        fix: &str,
    ) -> Option<T> {
        self.error(entry, format!("{key}.{field}: missing; set {fix}"));
        None
    }

    /// Returns the device name when it names a Modbus device of the file.
    fn tag_device(
        &mut self,
        key: &str,
        device: &Spanned<String>,
        raw_devices: &[raw::DeviceSection],
    ) -> Option<String> {
        let name = device.get_ref();
        let Some(section) = raw_devices
            .iter()
            .find(|section| section.name.get_ref() == name)
        else {
            let known: Vec<String> = raw_devices
                .iter()
                .map(|d| d.name.get_ref().clone())
                .collect();
            self.error(
                device,
                format!(
                    "{key}.device: unknown device \"{name}\"; use one of {}",
                    super::gateway::known_list(&known)
                ),
            );
            return None;
        };
        let protocol = section
            .protocol
            .as_ref()
            .map_or("modbus", |p| p.get_ref().as_str());
        if protocol != "modbus" {
            self.error(
                device,
                format!(
                    "{key}.device: \"{name}\" is a {protocol} device; a tag reads a Modbus device"
                ),
            );
            return None;
        }
        Some(name.clone())
    }

    fn tag_type(
        &mut self,
        key: &str,
        entry: &Spanned<raw::TagSection>,
        section: &raw::TagSection,
    ) -> Option<TagType> {
        let Some(value) = section.data_type.as_ref() else {
            return self.missing(key, "type", entry, "type = \"float32\", or bool, int16, uint16, int32, uint32, int64, uint64, float64, string");
        };
        let data_type =
            self.choice(&format!("{key}.type"), Some(value), &TYPES, TagType::UInt16)?;
        match (data_type, &section.length) {
            (TagType::String { .. }, Some(length)) => {
                let max = i64::from(MAX_STRING_LENGTH);
                let length = self.integer(&format!("{key}.length"), Some(length), 1, (1, max))?;
                Some(TagType::String {
                    length: length as u16,
                })
            }
            (TagType::String { .. }, None) => self.missing(
                key,
                "length",
                entry,
                "length = 16, the number of characters, two per register",
            ),
            (_, Some(length)) => {
                self.error(
                    length,
                    format!("{key}.length: only a string tag has a length; remove the key"),
                );
                None
            }
            (data_type, None) => Some(data_type),
        }
    }

    /// Checks that `bool` sits on a bit table and every other type on a
    /// register table.
    fn type_fits_kind(
        &mut self,
        key: &str,
        section: &raw::TagSection,
        data_type: TagType,
        kind: Option<StateKind>,
    ) -> Option<TagType> {
        let kind = kind?;
        let bit_table = matches!(kind, StateKind::Coil | StateKind::DiscreteInput);
        let register_bit = data_type == TagType::Bool && section.bit.is_some();
        let fits = register_bit || bit_table == (data_type == TagType::Bool);
        if fits {
            return Some(data_type);
        }
        let fix = if bit_table {
            "a coil or discrete input holds a bool; use type = \"bool\" or a register kind"
        } else {
            "a bool tag reads a coil, a discrete input or one bit of a register; use kind = \"coil\" or \"discrete_input\", or set bit = 0 to 15"
        };
        self.error(
            section.data_type.as_ref()?,
            format!(
                "{key}.type: \"{}\" does not fit kind \"{}\"; {fix}",
                data_type.name(),
                kind_name(kind)
            ),
        );
        None
    }

    /// Checks `bit`, which only a `bool` tag on a register takes. Returns
    /// `Some(None)` for a tag without a bit.
    fn register_bit(
        &mut self,
        key: &str,
        section: &raw::TagSection,
        data_type: Option<TagType>,
        kind: Option<StateKind>,
    ) -> Option<Option<u8>> {
        let Some(value) = &section.bit else {
            return Some(None);
        };
        let register = matches!(
            kind,
            Some(StateKind::HoldingRegister | StateKind::InputRegister)
        );
        if data_type != Some(TagType::Bool) || !register {
            self.error(
                value,
                format!("{key}.bit: only a bool tag on a holding or input register takes a bit; remove the key"),
            );
            return None;
        }
        let bit = self.integer(&format!("{key}.bit"), Some(value), 0, (0, 15))?;
        Some(Some(bit as u8))
    }

    /// Checks `order`, which only a type of more than one byte takes:
    /// `ABCD` or `BADC` for one register and for strings, any order for
    /// two or four registers.
    fn tag_order(
        &mut self,
        key: &str,
        section: &raw::TagSection,
        data_type: Option<TagType>,
    ) -> Option<RegisterOrder> {
        let order = self.choice(
            &format!("{key}.order"),
            section.order.as_ref(),
            &ORDERS,
            RegisterOrder::Abcd,
        )?;
        let (Some(value), Some(data_type)) = (&section.order, data_type) else {
            return Some(order);
        };
        let problem = match data_type {
            TagType::Bool => Some("bool has no byte order; remove the key".to_owned()),
            TagType::Int16 | TagType::UInt16 | TagType::String { .. } if order.swaps_registers() => Some(format!(
                "{} has no register order; use \"ABCD\" (high byte first) or \"BADC\" (low byte first)",
                data_type.name()
            )),
            _ => None,
        };
        match problem {
            Some(problem) => {
                self.error(value, format!("{key}.order: {problem}"));
                None
            }
            None => Some(order),
        }
    }

    fn scale_offset(
        &mut self,
        key: &str,
        section: &raw::TagSection,
        data_type: Option<TagType>,
    ) -> (Option<f64>, Option<f64>) {
        let numeric = data_type.is_none_or(TagType::is_numeric);
        let scale = self.finite(key, "scale", section.scale.as_ref(), 1.0, numeric);
        let offset = self.finite(key, "offset", section.offset.as_ref(), 0.0, numeric);
        if let (Some(0.0), Some(value)) = (scale, &section.scale) {
            self.error(
                value,
                format!("{key}.scale: 0 maps every raw value to the offset; use a non-zero scale"),
            );
            return (None, offset);
        }
        (scale, offset)
    }

    fn finite(
        &mut self,
        key: &str,
        field: &str,
        value: Option<&Spanned<toml::Value>>,
        default: f64,
        numeric: bool,
    ) -> Option<f64> {
        let Some(value) = value else {
            return Some(default);
        };
        if !numeric {
            self.error(
                value,
                format!("{key}.{field}: only a numeric tag is scaled; remove the key"),
            );
            return None;
        }
        let number = match value.get_ref() {
            toml::Value::Integer(number) => Some(*number as f64),
            toml::Value::Float(number) if number.is_finite() => Some(*number),
            _ => None,
        };
        if number.is_none() {
            self.error(value, format!("{key}.{field}: invalid value {}; use a finite number, as {field} = {default:?}", value.get_ref()));
        }
        number
    }

    /// Checks that the tag's addresses lie in one mirror block of its
    /// device, because tag values come from the mirror's polls.
    #[allow(clippy::too_many_arguments)]
    fn inside_mirror(
        &mut self,
        key: &str,
        entry: &Spanned<raw::TagSection>,
        device: &str,
        kind: StateKind,
        address: u16,
        data_type: TagType,
        devices: &[DeviceConfig],
    ) -> Option<()> {
        // A device with invalid settings was already reported.
        let config = devices.iter().find(|config| config.name == device)?;
        let count = u32::from(data_type.register_count());
        let end = u32::from(address) + count;
        let inside = config
            .mirror
            .iter()
            .any(|block| block.kind == kind && block.start <= address && end <= block.end());
        if inside {
            return Some(());
        }
        let at = match &entry.get_ref().address {
            Some(value) => self.at(value),
            None => self.at(entry),
        };
        self.report.error(
            &at,
            format!(
                "{key}: {} {address}-{} lies in no mirror block of device \"{device}\", and tags read their values from the mirror; add {{ kind = \"{}\", start = {address}, count = {count} }} to the device's mirror list, or widen a block to cover it",
                kind_name(kind),
                end - 1,
                kind_name(kind),
            ),
        );
        None
    }
}

impl Checker<'_> {
    /// Checks the keys of a rule for the tags of a Modbus device: the OPC
    /// UA keys, with every node pattern in the tag namespace. Modbus keys
    /// are rejected, because `values` cannot mean both raw registers and
    /// engineering values.
    pub(super) fn tag_rule_keys(
        &mut self,
        key: &str,
        allow: &raw::AllowSection,
    ) -> Option<OpcuaRuleConfig> {
        let mut ok = true;
        for field in super::opcua::modbus_keys(allow) {
            self.error(
                &allow.device,
                format!("{key}.{field}: a Modbus key in a rule with services and nodes, which allows tags; put Modbus access in an [[allow]] of its own"),
            );
            ok = false;
        }
        for (number, text, pattern) in parsed_nodes(allow) {
            if let Some(problem) = tag_pattern_problem(&pattern) {
                self.error(
                    text,
                    format!(
                        "{key}.nodes[{number}]: {problem}; a rule for Modbus device \"{}\" allows its tags, as \"nsu={NAMESPACE_URI};s=Press1.*\"",
                        allow.device.get_ref()
                    ),
                );
                ok = false;
            }
        }
        let rule = self.opcua_keys(key, allow);
        rule.filter(|_| ok)
    }
}

/// Yields each `nodes` entry of `allow` that parses, with its 1-based
/// number in the list, its text as written and the parsed pattern. The
/// entries that do not parse are reported where every rule's nodes are
/// checked.
pub(super) fn parsed_nodes(
    allow: &raw::AllowSection,
) -> impl Iterator<Item = (usize, &Spanned<String>, NodePattern)> + '_ {
    allow
        .nodes
        .iter()
        .flat_map(|nodes| nodes.get_ref())
        .enumerate()
        .filter_map(|(index, text)| {
            let pattern = NodePattern::parse(text.get_ref()).ok()?;
            Some((index + 1, text, pattern))
        })
}

/// Returns why `pattern` cannot name a tag node, or `None` when it can.
fn tag_pattern_problem(pattern: &NodePattern) -> Option<String> {
    if pattern.namespace_uri != NAMESPACE_URI {
        return Some(format!(
            "namespace \"{}\" is not the tag namespace {NAMESPACE_URI}",
            pattern.namespace_uri
        ));
    }
    match pattern.id {
        NodeIdPattern::String(_) => None,
        NodeIdPattern::Numeric(number) => Some(format!(
            "numeric id i={number} names no tag, because tag node ids are their names"
        )),
        NodeIdPattern::Path(_) => Some(
            "a browse path names no tag; name tags with s=NAME globs, such as s=Press1.*"
                .to_owned(),
        ),
    }
}

fn writable_kind(kind: StateKind) -> &'static str {
    match kind {
        StateKind::InputRegister | StateKind::HoldingRegister => "holding_register",
        StateKind::DiscreteInput | StateKind::Coil => "coil",
    }
}
