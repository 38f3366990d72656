//! Validation of `gateway.toml`: the gateway, listeners, devices, states and
//! audit sections. Rule files are checked in `rules`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::diagnostic::{Origin, Report, SourceText};
use super::raw;
use super::service::ServiceConfig;
use super::syntax::parse_range;
use super::tls::ListenerTls;
use super::{
    AuditConfig, AuditSync, DeviceConfig, GatewayConfig, ListenerConfig, ListenerLimits,
    ListenerTarget, MetricsConfig, Mode, OnDeny, OpcuaDeviceConfig, StateConfig, StateKind,
    StateValueConfig,
};

/// The time zone of plants this gateway was first built for; any IANA name
/// can replace it.
const DEFAULT_TIMEZONE: &str = "Europe/Brussels";
/// Largest count setting accepted, far above what a PLC network needs.
const MAX_COUNT: i64 = 1_000_000;
/// Largest timeout or period accepted: one day, in milliseconds.
const MAX_MILLISECONDS: i64 = 86_400_000;

/// The checked gateway file, against which the rule files are checked.
pub(super) struct LoadedGateway {
    pub gateway: GatewayConfig,
    pub listeners: Vec<ListenerConfig>,
    pub devices: Vec<DeviceConfig>,
    pub opcua_devices: Vec<OpcuaDeviceConfig>,
    pub states: Vec<StateConfig>,
    pub audit: AuditConfig,
    pub metrics: Option<MetricsConfig>,
    /// Names of the devices with `protocol = "opcua"`, valid or not.
    pub opcua_device_names: Vec<String>,
    /// The folder of the gateway file, which relative paths start from.
    pub base: std::path::PathBuf,
    pub tags: Vec<super::TagConfig>,
    /// Every device name written, valid or not, so that a device with a bad
    /// setting does not also make every rule naming it fail.
    pub device_names: Vec<String>,
    /// True when a listener is written with protocol `modbus-tls`, valid
    /// or not.
    pub tls_listener_written: bool,
    /// Every state name written, with the value names it defines.
    pub state_values: HashMap<String, Vec<String>>,
    /// The position of `gateway.rules`, or of the gateway name when the key is
    /// missing.
    pub rules_origin: Origin,
    /// Settings of the process itself: service user and control socket.
    pub service: ServiceConfig,
    pub detect: super::detect::DetectConfig,
}

/// Reads and checks the gateway file. Returns `None` when the file cannot be
/// read or parsed, after reporting why.
pub(super) fn load(path: &Path, report: &mut Report) -> Option<LoadedGateway> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => {
            let at = SourceText::new(path, String::new()).start();
            report.error(&at, format!("failed to read the gateway file: {error}"));
            return None;
        }
    };
    let source = SourceText::new(path, text);
    let file: raw::GatewayFile = parse_toml(&source, report)?;
    let base = path.parent().unwrap_or(Path::new(""));
    let mut check = Checker {
        source: &source,
        report,
    };

    let gateway = check.gateway(&file.gateway, base);
    let device_names: Vec<String> = file
        .device
        .iter()
        .map(|d| d.name.get_ref().clone())
        .collect();
    let opcua_device_names: Vec<String> = file
        .device
        .iter()
        .filter(|d| d.protocol.as_ref().is_some_and(|p| p.get_ref() == "opcua"))
        .map(|d| d.name.get_ref().clone())
        .collect();
    let (devices, opcua_devices) = check.devices(&file.device, base);
    let listeners = check.listeners(&file.listener, &device_names, &opcua_device_names, base);
    check.mirror_only_targets(&file.listener, &file.device);
    let (states, state_values) = check.states(&file.state, &device_names);
    let tags = check.tags(&file.tag, &file.device, &devices);
    let mut audit = check.audit(file.audit.as_ref(), base);
    audit.collectors = check.collectors(&file.collector, base);
    let metrics = file
        .metrics
        .as_ref()
        .and_then(|section| check.metrics(section));
    let service = check.service(&file.gateway, file.admin.as_ref(), base);
    let detect = check.detect(file.detect.as_ref());
    let rules_origin = match &file.gateway.rules {
        Some(rules) => check.at(rules),
        None => check.at(&file.gateway.name),
    };

    let tls_listener_written = file.listener.iter().any(|listener| {
        listener
            .protocol
            .as_ref()
            .is_some_and(|protocol| protocol.get_ref() == "modbus-tls")
    });
    Some(LoadedGateway {
        gateway,
        tls_listener_written,
        listeners,
        devices,
        opcua_devices,
        states,
        audit,
        metrics,
        opcua_device_names,
        base: base.to_path_buf(),
        tags,
        device_names,
        state_values,
        rules_origin,
        service,
        detect,
    })
}

/// Parses TOML text into `T`, reporting a syntax or shape error at its
/// position.
pub(super) fn parse_toml<T: serde::de::DeserializeOwned>(
    source: &SourceText,
    report: &mut Report,
) -> Option<T> {
    match toml::from_str(&source.text) {
        Ok(value) => Some(value),
        Err(error) => {
            let at = match error.span() {
                Some(span) => source.origin(&span),
                None => source.start(),
            };
            let message = error.message().trim().replace('\n', "; ");
            report.error(&at, message);
            None
        }
    }
}

/// Names of things a message lists as the known choices.
pub(super) fn known_list(names: &[String]) -> String {
    let mut distinct: Vec<&str> = Vec::with_capacity(names.len());
    for name in names {
        if !distinct.contains(&name.as_str()) {
            distinct.push(name);
        }
    }
    if distinct.is_empty() {
        "none are defined".to_owned()
    } else {
        distinct.join(", ")
    }
}

pub(super) struct Checker<'a> {
    pub source: &'a SourceText,
    pub report: &'a mut Report,
}

impl Checker<'_> {
    pub fn at<T>(&self, value: &Spanned<T>) -> Origin {
        self.source.origin(&value.span())
    }

    pub fn error<T>(&mut self, value: &Spanned<T>, message: impl Into<String>) {
        let at = self.at(value);
        self.report.error(&at, message);
    }

    pub fn warning<T>(&mut self, value: &Spanned<T>, message: impl Into<String>) {
        let at = self.at(value);
        self.report.warning(&at, message);
    }

    /// Checks an integer setting against `min..=max`, returning the default
    /// when the key is missing and `None` when the value is invalid.
    pub fn integer(
        &mut self,
        key: &str,
        value: Option<&Spanned<i64>>,
        default: i64,
        (min, max): (i64, i64),
    ) -> Option<i64> {
        let Some(value) = value else {
            return Some(default);
        };
        let number = *value.get_ref();
        if (min..=max).contains(&number) {
            Some(number)
        } else {
            self.error(
                value,
                format!("{key}: {number} outside {min}..={max}; set a value from {min} to {max}"),
            );
            None
        }
    }

    fn count(&mut self, key: &str, value: Option<&Spanned<i64>>, default: usize) -> usize {
        let default = default as i64;
        let number = self.integer(key, value, default, (1, MAX_COUNT));
        number.unwrap_or(default) as usize
    }

    pub fn milliseconds(
        &mut self,
        key: &str,
        value: Option<&Spanned<i64>>,
        default: u64,
    ) -> Duration {
        let number = self.integer(key, value, default as i64, (1, MAX_MILLISECONDS));
        Duration::from_millis(number.map_or(default, |n| n as u64))
    }

    /// Reports a name that is empty or used before, and records it.
    pub fn unique_name(
        &mut self,
        key: &str,
        kind: &str,
        name: &Spanned<String>,
        seen: &mut HashMap<String, Origin>,
    ) {
        if name.get_ref().trim().is_empty() {
            self.error(
                name,
                format!("{key}: empty {kind} name; give every {kind} a name"),
            );
            return;
        }
        let at = self.at(name);
        if let Some(first) = seen.get(name.get_ref()) {
            self.report.error(
                &at,
                format!(
                    "{key}: duplicate {kind} \"{}\", first defined at {first}; {kind} names must be unique",
                    name.get_ref()
                ),
            );
        } else {
            seen.insert(name.get_ref().clone(), at);
        }
    }

    fn gateway(&mut self, section: &raw::GatewaySection, base: &Path) -> GatewayConfig {
        if section.name.get_ref().trim().is_empty() {
            self.error(
                &section.name,
                "gateway.name: empty name; name the gateway, as \"edge-01\"",
            );
        }

        let timezone = match &section.timezone {
            None => jiff::tz::TimeZone::get(DEFAULT_TIMEZONE).unwrap_or(jiff::tz::TimeZone::UTC),
            Some(name) => match jiff::tz::TimeZone::get(name.get_ref()) {
                Ok(timezone) => timezone,
                Err(_) => {
                    self.error(
                        name,
                        format!(
                            "gateway.timezone: unknown time zone \"{}\"; use an IANA name such as \"Europe/Brussels\"",
                            name.get_ref()
                        ),
                    );
                    jiff::tz::TimeZone::UTC
                }
            },
        };

        let rules = section
            .rules
            .as_ref()
            .map_or("rules", |r| r.get_ref().as_str());
        GatewayConfig {
            name: section.name.get_ref().clone(),
            timezone,
            rules_dir: base.join(rules),
        }
    }

    fn listeners(
        &mut self,
        sections: &[raw::ListenerSection],
        device_names: &[String],
        opcua_device_names: &[String],
        base: &Path,
    ) -> Vec<ListenerConfig> {
        let mut names = HashMap::new();
        let mut binds: HashMap<SocketAddr, Origin> = HashMap::new();
        let mut listeners = Vec::new();
        for (index, section) in sections.iter().enumerate() {
            let key = format!("listener[{}]", index + 1);
            self.unique_name(
                &format!("{key}.name"),
                "listener",
                &section.name,
                &mut names,
            );
            let (protocol_ok, tls) = self.listener_protocol(&key, section, base);
            let bind = self.listener_bind(&key, section, &mut binds);
            let mode = self.choice(
                &format!("{key}.mode"),
                section.mode.as_ref(),
                &[("enforce", Mode::Enforce), ("monitor", Mode::Monitor)],
                Mode::Enforce,
            );
            let on_deny = self.choice(
                &format!("{key}.on_deny"),
                section.on_deny.as_ref(),
                &[
                    ("exception", OnDeny::Exception),
                    ("drop", OnDeny::Drop),
                    ("close", OnDeny::Close),
                ],
                OnDeny::Exception,
            );
            let target = self.listener_target(&key, section, device_names);
            let target =
                target.filter(|target| self.target_kind(&key, section, target, opcua_device_names));
            let opcua = match &section.opcua {
                Some(table) if protocol_ok => self.opcua_listener(&key, table, base).map(Some),
                _ => Some(None),
            };
            let limits = self.limits(&key, section.limits.as_ref());
            if let (true, Some(bind), Some(mode), Some(on_deny), Some(target), Some(opcua)) =
                (protocol_ok, bind, mode, on_deny, target, opcua)
            {
                listeners.push(ListenerConfig {
                    name: section.name.get_ref().clone(),
                    bind,
                    mode,
                    on_deny,
                    target,
                    limits,
                    mirror_only: section.mirror_only.as_ref().is_some_and(|v| *v.get_ref()),
                    tls,
                    opcua,
                    origin: self.at(&section.name),
                });
            }
        }
        listeners
    }

    /// Checks the protocol and the keys that depend on it; returns whether
    /// they are valid and, for a `modbus-tls` listener, its TLS settings.
    fn listener_protocol(
        &mut self,
        key: &str,
        section: &raw::ListenerSection,
        base: &Path,
    ) -> (bool, Option<ListenerTls>) {
        let mut secure = false;
        let mut is_opcua = false;
        if let Some(protocol) = &section.protocol {
            let name = protocol.get_ref();
            match name.as_str() {
                "modbus" => {}
                "modbus-tls" => secure = true,
                "opcua" => is_opcua = true,
                _ => {
                    self.error(
                        protocol,
                        format!("{key}.protocol: unknown protocol \"{name}\"; use \"modbus\", \"modbus-tls\" or \"opcua\""),
                    );
                    return (false, None);
                }
            }
        }

        let mut ok = true;
        match (&section.opcua, is_opcua) {
            (Some(value), false) => {
                self.error(
                    value,
                    format!("{key}.opcua: only an \"opcua\" listener takes this key; set protocol = \"opcua\" or remove the key"),
                );
                ok = false;
            }
            (None, true) => {
                self.error(
                    &section.name,
                    format!("{key}.opcua: missing; an \"opcua\" listener needs application_uri, certificate and private_key"),
                );
                ok = false;
            }
            _ => {}
        }
        match (&section.tls, secure) {
            (Some(tls), true) => {
                let tls = self.listener_tls(key, tls, base);
                (ok && tls.is_some(), tls)
            }
            (None, true) => {
                self.error(
                    &section.name,
                    format!("{key}.tls: missing; a \"modbus-tls\" listener needs tls = {{ cert, key, client_ca }}"),
                );
                (false, None)
            }
            (Some(tls), false) => {
                self.error(
                    tls,
                    format!("{key}.tls: only a \"modbus-tls\" listener takes TLS settings; set protocol = \"modbus-tls\" or remove the key"),
                );
                (false, None)
            }
            (None, false) => (ok, None),
        }
    }

    /// Checks that a listener reaches devices of its own protocol: an OPC UA
    /// listener mirrors one OPC UA device or none, a Modbus listener only
    /// Modbus devices.
    fn target_kind(
        &mut self,
        key: &str,
        section: &raw::ListenerSection,
        target: &ListenerTarget,
        opcua_device_names: &[String],
    ) -> bool {
        let is_opcua = section.opcua.is_some();
        match target {
            ListenerTarget::Device(device) => {
                let problem = match (is_opcua, opcua_device_names.contains(device)) {
                    (true, false) => {
                        "is not an OPC UA device; name a device with protocol = \"opcua\""
                    }
                    (false, true) => {
                        "is an OPC UA device; a \"modbus\" listener needs a Modbus device"
                    }
                    _ => return true,
                };
                let at = section
                    .device
                    .as_ref()
                    .map_or_else(|| self.at(&section.name), |d| self.at(d));
                self.report
                    .error(&at, format!("{key}.device: \"{device}\" {problem}"));
                false
            }
            ListenerTarget::TagsOnly => true,
            ListenerTarget::Routes(_) if is_opcua => {
                self.error(
                    &section.name,
                    format!("{key}.routes: an \"opcua\" listener mirrors one device; set device instead"),
                );
                false
            }
            ListenerTarget::Routes(table) => {
                let mut ok = true;
                for (unit, device) in table {
                    if opcua_device_names.contains(device) {
                        self.error(
                            &section.name,
                            format!("{key}.routes.\"{unit}\": \"{device}\" is an OPC UA device; route unit ids to Modbus devices"),
                        );
                        ok = false;
                    }
                }
                ok
            }
        }
    }

    fn listener_bind(
        &mut self,
        key: &str,
        section: &raw::ListenerSection,
        binds: &mut HashMap<SocketAddr, Origin>,
    ) -> Option<SocketAddr> {
        let Some(bind) = &section.bind else {
            self.error(
                &section.name,
                format!("{key}.bind: missing; set bind = \"IP:PORT\", such as \"127.0.0.1:5020\""),
            );
            return None;
        };
        let Ok(address) = bind.get_ref().parse::<SocketAddr>() else {
            self.error(
                bind,
                format!(
                    "{key}.bind: invalid socket address \"{}\"; use IP:PORT, such as \"127.0.0.1:5020\"",
                    bind.get_ref()
                ),
            );
            return None;
        };
        let at = self.at(bind);
        // Port 0 lets the system choose a free port, so it never collides.
        if address.port() == 0 {
            return Some(address);
        }
        if let Some(first) = binds.get(&address) {
            self.report.error(
                &at,
                format!("{key}.bind: {address} is already bound by the listener at {first}; use another port"),
            );
            return None;
        }
        binds.insert(address, at);
        Some(address)
    }

    /// Checks a key whose value is one of a few words.
    pub fn choice<T: Copy>(
        &mut self,
        key: &str,
        value: Option<&Spanned<String>>,
        choices: &[(&str, T)],
        default: T,
    ) -> Option<T> {
        let Some(value) = value else {
            return Some(default);
        };
        if let Some((_, choice)) = choices.iter().find(|(word, _)| word == value.get_ref()) {
            return Some(*choice);
        }
        let words: Vec<String> = choices
            .iter()
            .map(|(word, _)| format!("\"{word}\""))
            .collect();
        self.error(
            value,
            format!(
                "{key}: invalid value \"{}\"; use one of {}",
                value.get_ref(),
                words.join(", ")
            ),
        );
        None
    }

    /// Reports a reference to a device that is not defined.
    pub fn device_reference(
        &mut self,
        key: &str,
        device: &Spanned<String>,
        device_names: &[String],
    ) -> bool {
        if device_names.contains(device.get_ref()) {
            return true;
        }
        self.error(
            device,
            format!(
                "{key}: unknown device \"{}\"; known devices: {}",
                device.get_ref(),
                known_list(device_names)
            ),
        );
        false
    }

    fn listener_target(
        &mut self,
        key: &str,
        section: &raw::ListenerSection,
        device_names: &[String],
    ) -> Option<ListenerTarget> {
        match (&section.device, &section.routes) {
            (Some(_), Some(routes)) => {
                self.error(
                    routes,
                    format!("{key}: both device and routes are set; keep one of them"),
                );
                None
            }
            (None, None) if section.opcua.is_some() => Some(ListenerTarget::TagsOnly),
            (None, None) => {
                self.error(
                    &section.name,
                    format!(
                        "{key}: neither device nor routes is set; add device = \"NAME\" or routes = {{ 1 = \"NAME\" }}"
                    ),
                );
                None
            }
            (Some(device), None) => self
                .device_reference(&format!("{key}.device"), device, device_names)
                .then(|| ListenerTarget::Device(device.get_ref().clone())),
            (None, Some(routes)) => self.routes(key, routes, device_names),
        }
    }

    fn routes(
        &mut self,
        key: &str,
        routes: &raw::SpannedMap,
        device_names: &[String],
    ) -> Option<ListenerTarget> {
        if routes.get_ref().is_empty() {
            self.error(
                routes,
                format!("{key}.routes: empty; map at least one unit id to a device, as {{ 1 = \"press-1\" }}"),
            );
            return None;
        }
        let mut table = Vec::new();
        let mut ok = true;
        for (unit, device) in routes.get_ref() {
            let route_key = format!("{key}.routes.\"{}\"", unit.get_ref());
            match unit.get_ref().trim().parse::<u8>() {
                Ok(number) => table.push((number, device.get_ref().clone())),
                Err(_) => {
                    self.error(
                        unit,
                        format!(
                            "{route_key}: invalid unit id \"{}\"; use a unit id from 0 to 255",
                            unit.get_ref()
                        ),
                    );
                    ok = false;
                }
            }
            ok &= self.device_reference(&route_key, device, device_names);
        }
        table.sort();
        ok.then_some(ListenerTarget::Routes(table))
    }

    fn limits(&mut self, key: &str, section: Option<&raw::LimitsSection>) -> ListenerLimits {
        let empty = raw::LimitsSection::default();
        let section = section.unwrap_or(&empty);
        let defaults = ListenerLimits::default();
        let key = format!("{key}.limits");
        ListenerLimits {
            max_connections: self.count(
                &format!("{key}.max_connections"),
                section.max_connections.as_ref(),
                defaults.max_connections,
            ),
            max_connections_per_source: self.count(
                &format!("{key}.max_connections_per_source"),
                section.max_connections_per_source.as_ref(),
                defaults.max_connections_per_source,
            ),
            idle_timeout: self.milliseconds(
                &format!("{key}.idle_timeout_ms"),
                section.idle_timeout_ms.as_ref(),
                defaults.idle_timeout.as_millis() as u64,
            ),
            frame_timeout: self.milliseconds(
                &format!("{key}.frame_timeout_ms"),
                section.frame_timeout_ms.as_ref(),
                defaults.frame_timeout.as_millis() as u64,
            ),
            max_pending: self.count(
                &format!("{key}.max_pending"),
                section.max_pending.as_ref(),
                defaults.max_pending,
            ),
        }
    }

    fn devices(
        &mut self,
        sections: &[raw::DeviceSection],
        base: &Path,
    ) -> (Vec<DeviceConfig>, Vec<OpcuaDeviceConfig>) {
        let mut names = HashMap::new();
        let mut devices = Vec::new();
        let mut opcua_devices = Vec::new();
        for (index, section) in sections.iter().enumerate() {
            let key = format!("device[{}]", index + 1);
            self.unique_name(&format!("{key}.name"), "device", &section.name, &mut names);
            let is_opcua = section
                .protocol
                .as_ref()
                .is_some_and(|p| p.get_ref() == "opcua");
            if is_opcua {
                opcua_devices.extend(self.opcua_device(&key, section, base));
            } else if let Some(device) = self.device(&key, section, base) {
                devices.push(device);
            }
        }
        (devices, opcua_devices)
    }

    fn device(
        &mut self,
        key: &str,
        section: &raw::DeviceSection,
        base: &Path,
    ) -> Option<DeviceConfig> {
        if let Some(protocol) = &section.protocol {
            let name = protocol.get_ref();
            if name != "modbus" {
                self.error(
                    protocol,
                    format!(
                        "{key}.protocol: unknown protocol \"{name}\"; use \"modbus\" or \"opcua\""
                    ),
                );
                return None;
            }
        }
        let opcua_keys = [
            ("endpoint", &section.endpoint),
            ("security_policy", &section.security_policy),
            ("security_mode", &section.security_mode),
            ("username", &section.username),
            ("password_file", &section.password_file),
        ];
        let mut opcua_key_found = false;
        for (field, value) in opcua_keys {
            if let Some(value) = value {
                self.error(
                    value,
                    format!("{key}.{field}: an OPC UA key on a Modbus device; set protocol = \"opcua\" or remove the key"),
                );
                opcua_key_found = true;
            }
        }
        if opcua_key_found {
            return None;
        }

        let address = match &section.address {
            None => {
                self.error(
                    &section.name,
                    format!("{key}.address: missing; set address = \"IP:PORT\", such as \"10.0.0.5:502\""),
                );
                None
            }
            Some(address) => match address.get_ref().parse::<SocketAddr>() {
                Ok(parsed) => Some(parsed),
                Err(_) => {
                    self.error(
                        address,
                        format!(
                            "{key}.address: invalid socket address \"{}\"; use IP:PORT, such as \"10.0.0.5:502\"",
                            address.get_ref()
                        ),
                    );
                    None
                }
            },
        };
        let unit = self.integer(&format!("{key}.unit"), section.unit.as_ref(), 1, (0, 255));
        let tls = section
            .tls
            .as_ref()
            .map(|tls| self.device_tls(key, tls, base, address));

        let defaults = DeviceConfig::new("", SocketAddr::from(([0, 0, 0, 0], 0)));
        let device = DeviceConfig {
            name: section.name.get_ref().clone(),
            address: address.unwrap_or(defaults.address),
            unit: unit.unwrap_or(1) as u8,
            timeout: self.milliseconds(
                &format!("{key}.timeout_ms"),
                section.timeout_ms.as_ref(),
                defaults.timeout.as_millis() as u64,
            ),
            max_connections: self.count(
                &format!("{key}.max_connections"),
                section.max_connections.as_ref(),
                defaults.max_connections,
            ),
            max_in_flight: self
                .integer(
                    &format!("{key}.max_in_flight"),
                    section.max_in_flight.as_ref(),
                    defaults.max_in_flight as i64,
                    (1, crate::modbus::upstream::MAX_IN_FLIGHT as i64),
                )
                .map_or(defaults.max_in_flight, |number| number as usize),
            connect_timeout: self.milliseconds(
                &format!("{key}.connect_timeout_ms"),
                section.connect_timeout_ms.as_ref(),
                defaults.connect_timeout.as_millis() as u64,
            ),
            backoff_max: self.milliseconds(
                &format!("{key}.backoff_max_ms"),
                section.backoff_max_ms.as_ref(),
                defaults.backoff_max.as_millis() as u64,
            ),
            mirror: Vec::new(),
            tls: tls.clone().flatten(),
            origin: self.at(&section.name),
        };
        let mirror = self.mirror_blocks(key, section.mirror.as_ref());
        let device = DeviceConfig { mirror, ..device };
        let tls_ok = tls.is_none_or(|tls| tls.is_some());
        (address.is_some() && unit.is_some() && tls_ok).then_some(device)
    }

    fn states(
        &mut self,
        sections: &[raw::StateSection],
        device_names: &[String],
    ) -> (Vec<StateConfig>, HashMap<String, Vec<String>>) {
        let mut names = HashMap::new();
        let mut states = Vec::new();
        let mut state_values = HashMap::new();
        for (index, section) in sections.iter().enumerate() {
            let key = format!("state[{}]", index + 1);
            self.unique_name(&format!("{key}.name"), "state", &section.name, &mut names);
            let values = section.values.as_ref().map_or_else(Vec::new, |values| {
                values
                    .get_ref()
                    .values()
                    .map(|v| v.get_ref().clone())
                    .collect()
            });
            state_values
                .entry(section.name.get_ref().clone())
                .or_insert(values);
            if let Some(state) = self.state(&key, section, device_names) {
                states.push(state);
            }
        }
        (states, state_values)
    }

    fn state(
        &mut self,
        key: &str,
        section: &raw::StateSection,
        device_names: &[String],
    ) -> Option<StateConfig> {
        let device = match &section.device {
            Some(device) => self
                .device_reference(&format!("{key}.device"), device, device_names)
                .then(|| device.get_ref().clone()),
            None => {
                self.error(
                    &section.name,
                    format!("{key}.device: missing; name the device the state is read from"),
                );
                None
            }
        };
        let source = self.state_source(key, section);
        let poll_ms = self.integer(
            &format!("{key}.poll_ms"),
            section.poll_ms.as_ref(),
            1_000,
            (1, MAX_MILLISECONDS),
        );
        let poll = Duration::from_millis(poll_ms.unwrap_or(1_000) as u64);
        let max_age = self.milliseconds(
            &format!("{key}.max_age_ms"),
            section.max_age_ms.as_ref(),
            3 * poll.as_millis() as u64,
        );
        if let Some(max_age_ms) = &section.max_age_ms {
            if max_age < poll {
                self.warning(
                    max_age_ms,
                    format!(
                        "{key}.max_age_ms: {} is shorter than poll_ms {}, so the state is unknown between polls; set it to at least 2 × poll_ms",
                        max_age.as_millis(),
                        poll.as_millis()
                    ),
                );
            }
        }
        let values = self.state_values(key, section, source.map(|(kind, _)| kind));

        let ((kind, address), device, values) = (source?, device?, values?);
        poll_ms?;
        Some(StateConfig {
            name: section.name.get_ref().clone(),
            device,
            kind,
            address,
            poll,
            max_age,
            values,
            origin: self.at(&section.name),
        })
    }

    fn state_source(&mut self, key: &str, section: &raw::StateSection) -> Option<(StateKind, u16)> {
        let sources = [
            (
                "holding_register",
                StateKind::HoldingRegister,
                &section.holding_register,
            ),
            (
                "input_register",
                StateKind::InputRegister,
                &section.input_register,
            ),
            ("coil", StateKind::Coil, &section.coil),
            (
                "discrete_input",
                StateKind::DiscreteInput,
                &section.discrete_input,
            ),
        ];
        let given: Vec<_> = sources
            .iter()
            .filter_map(|(field, kind, value)| value.as_ref().map(|v| (*field, *kind, v)))
            .collect();
        match given.as_slice() {
            [(field, kind, value)] => {
                let address =
                    self.integer(&format!("{key}.{field}"), Some(value), 0, (0, 65535))?;
                Some((*kind, address as u16))
            }
            [] => {
                self.error(
                    &section.name,
                    format!(
                        "{key}: no address; set one of holding_register, input_register, coil or discrete_input"
                    ),
                );
                None
            }
            [_, (field, _, value), ..] => {
                self.error(
                    value,
                    format!("{key}.{field}: a state reads one address; keep only one of holding_register, input_register, coil or discrete_input"),
                );
                None
            }
        }
    }

    fn state_values(
        &mut self,
        key: &str,
        section: &raw::StateSection,
        kind: Option<StateKind>,
    ) -> Option<Vec<StateValueConfig>> {
        let Some(values) = &section.values else {
            self.error(
                &section.name,
                format!("{key}.values: missing; map raw values to names, as {{ 0 = \"production\", 1 = \"maintenance\" }}"),
            );
            return None;
        };
        if values.get_ref().is_empty() {
            self.error(
                values,
                format!("{key}.values: empty; map at least one raw value to a name"),
            );
            return None;
        }
        let is_bit = matches!(kind, Some(StateKind::Coil | StateKind::DiscreteInput));
        let mut parsed: Vec<(StateValueConfig, Origin)> = Vec::new();
        let mut ok = true;
        for (raw_value, name) in values.get_ref() {
            let value_key = format!("{key}.values.\"{}\"", raw_value.get_ref());
            let range = match parse_range(raw_value.get_ref()) {
                Ok(range) if is_bit && range.last > 1 => {
                    self.error(
                        raw_value,
                        format!("{value_key}: a coil or discrete input reads 0 or 1; use \"0\" or \"1\""),
                    );
                    ok = false;
                    continue;
                }
                Ok(range) => range,
                Err(problem) => {
                    self.error(raw_value, format!("{value_key}: {problem}"));
                    ok = false;
                    continue;
                }
            };
            if name.get_ref().trim().is_empty() {
                self.error(
                    name,
                    format!("{value_key}: empty value name; name the state value"),
                );
                ok = false;
            }
            parsed.push((
                StateValueConfig {
                    raw: range,
                    name: name.get_ref().clone(),
                },
                self.at(raw_value),
            ));
        }

        parsed.sort_by_key(|(value, _)| value.raw);
        for pair in parsed.windows(2) {
            let ((first, first_at), (second, second_at)) = (&pair[0], &pair[1]);
            if first.raw.overlaps(&second.raw) {
                self.report.error(
                    second_at,
                    format!(
                        "{key}.values: raw values {}-{} overlap {}-{} at {first_at}; map each raw value once",
                        second.raw.first, second.raw.last, first.raw.first, first.raw.last
                    ),
                );
                ok = false;
            }
        }
        ok.then(|| parsed.into_iter().map(|(value, _)| value).collect())
    }

    fn audit(&mut self, section: Option<&raw::AuditSection>, base: &Path) -> AuditConfig {
        let path = section
            .and_then(|s| s.path.as_ref())
            .map_or("audit", |p| p.get_ref().as_str());
        let sync = section.and_then(|s| s.sync.as_ref());
        let sync = self.choice(
            "audit.sync",
            sync,
            &[("batch", AuditSync::Batch), ("always", AuditSync::Always)],
            AuditSync::Batch,
        );
        let defaults = AuditConfig::new(base.join(path));
        let seal_every = self.integer(
            "audit.seal_every",
            section.and_then(|s| s.seal_every.as_ref()),
            defaults.seal_every as i64,
            (1, 1_000_000),
        );
        let seal_interval = self.milliseconds(
            "audit.seal_interval_ms",
            section.and_then(|s| s.seal_interval_ms.as_ref()),
            defaults.seal_interval.as_millis() as u64,
        );
        let segment_bytes = self.integer(
            "audit.segment_bytes",
            section.and_then(|s| s.segment_bytes.as_ref()),
            defaults.segment_bytes as i64,
            (64 * 1024, 1 << 40),
        );
        let retention_days = self.integer(
            "audit.retention_days",
            section.and_then(|s| s.retention_days.as_ref()),
            i64::from(defaults.retention_days),
            (0, 36_500),
        );
        AuditConfig {
            sync: sync.unwrap_or(AuditSync::Batch),
            seal_every: seal_every.map_or(defaults.seal_every, |n| n as u64),
            seal_interval,
            segment_bytes: segment_bytes.map_or(defaults.segment_bytes, |n| n as u64),
            retention_days: retention_days.map_or(defaults.retention_days, |n| n as u32),
            ..defaults
        }
    }

    fn metrics(&mut self, section: &raw::MetricsSection) -> Option<MetricsConfig> {
        match section.bind.get_ref().parse::<SocketAddr>() {
            Ok(bind) => Some(MetricsConfig { bind }),
            Err(_) => {
                self.error(
                    &section.bind,
                    format!(
                        "metrics.bind: \"{}\" is not an IP address with a port; write it like \"127.0.0.1:9502\"",
                        section.bind.get_ref()
                    ),
                );
                None
            }
        }
    }
}
