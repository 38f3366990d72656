//! Validation of the rule files in the rules folder: one vendor per file and
//! its `[[allow]]` rules, checked against the devices and states of
//! `gateway.toml`, and the vendors checked against each other.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use toml::Spanned;

use super::detect::OnAnomalyConfig;
use super::diagnostic::{Origin, Report, SourceText};
use super::gateway::{known_list, parse_toml, Checker, LoadedGateway};
use super::raw::{self, Scalar, ScalarList};
use super::syntax;
use super::{
    NodeIdPattern, NodePattern, OpcuaRuleConfig, OpcuaService, Range16, Rate, RateConfig,
    RuleConfig, VendorConfig, WhenConfig,
};
use crate::identity::certificate::{parse_fingerprint, CertificateMatchers, SanPattern};

/// Functions that read or write a Modbus table, and so need `addresses`.
const ADDRESSED_FUNCTIONS: [u8; 11] = [1, 2, 3, 4, 5, 6, 15, 16, 22, 23, 24];
/// Functions that write values a rule's `values` can limit.
const VALUE_WRITING_FUNCTIONS: [u8; 6] = [5, 6, 15, 16, 22, 23];
/// Functions that write, which `writes_per_second` limits.
pub(crate) const WRITE_FUNCTIONS: [u8; 7] = [5, 6, 15, 16, 21, 22, 23];
/// Largest rate a limit may set, in requests per second; a Modbus device
/// handles far fewer.
const MAX_RATE: f64 = 100_000.0;
/// Largest burst a limit may set.
const MAX_BURST: i64 = 1_000_000;
/// Diagnostics (FC 8) and encapsulated interface transport (FC 43).
const DIAGNOSTICS: u8 = 8;
const ENCAPSULATED_INTERFACE: u8 = 43;

/// A vendor source network with where it was written, for the overlap check.
struct SourceEntry {
    net: IpNet,
    vendor: usize,
    key: String,
    at: Origin,
}

/// Reads and checks every `*.toml` file of the rules folder, in file name
/// order, and the vendors against each other.
pub(super) fn load(
    gateway: &LoadedGateway,
    files: &mut Vec<PathBuf>,
    report: &mut Report,
    on_anomaly: &mut Vec<(String, OnAnomalyConfig)>,
) -> Vec<VendorConfig> {
    let paths = match rule_files(&gateway.gateway.rules_dir) {
        Ok(paths) => paths,
        Err(error) => {
            report.error(
                &gateway.rules_origin,
                format!(
                    "gateway.rules: failed to read the rules folder \"{}\": {error}; create it or set gateway.rules",
                    gateway.gateway.rules_dir.display()
                ),
            );
            return Vec::new();
        }
    };
    if paths.is_empty() {
        report.warning(
            &gateway.rules_origin,
            format!(
                "gateway.rules: no *.toml files in \"{}\", so every request is denied",
                gateway.gateway.rules_dir.display()
            ),
        );
    }

    let now = jiff::Timestamp::now();
    let mut vendors = Vec::new();
    let mut vendor_names: HashMap<String, Origin> = HashMap::new();
    let mut sources = Vec::new();
    let mut opcua_users: HashMap<String, (String, Origin)> = HashMap::new();
    let mut anonymous: Option<(String, Origin)> = None;
    for path in paths {
        files.push(path.clone());
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) => {
                let at = SourceText::new(&path, String::new()).start();
                report.error(&at, format!("failed to read the rule file: {error}"));
                continue;
            }
        };
        let source = SourceText::new(&path, text);
        let Some(file) = parse_toml::<raw::RuleFile>(&source, report) else {
            continue;
        };
        let mut check = RuleChecker {
            checker: Checker {
                source: &source,
                report,
            },
            gateway,
            now,
        };
        check.checker.unique_name(
            "vendor.name",
            "vendor",
            &file.vendor.name,
            &mut vendor_names,
        );
        let vendor = check.vendor(&path, &file);
        check.unique_opcua_users(&vendor, &file.vendor, &mut opcua_users);
        check.unique_opcua_anonymous(&vendor, &file.vendor, &mut anonymous);
        if let Some(section) = &file.vendor.on_anomaly {
            if let Some(containment) = check.checker.on_anomaly(section) {
                on_anomaly.push((vendor.name.clone(), containment));
            }
        }
        let written = file.vendor.sources.as_deref().unwrap_or_default();
        if vendor.certificate.is_empty() && !vendor.has_opcua_identity() {
            for (index, text) in written.iter().enumerate() {
                let Some(net) = parse_net(text.get_ref().trim()) else {
                    continue;
                };
                sources.push(SourceEntry {
                    net: net.trunc(),
                    vendor: vendors.len(),
                    key: format!("vendor.sources[{}]", index + 1),
                    at: check.checker.at(text),
                });
            }
        }
        vendors.push(vendor);
    }
    report_overlaps(&mut sources, &vendors, report);
    report_certificate_overlaps(&vendors, report);
    vendors
}

/// Reports two vendors that could both match one certificate: every matcher
/// kind they both list has entries that match a common value, and their
/// sources, when both have any, share an address. With at least one shared
/// kind that is an error. With none (one vendor matches by CN, the other by
/// role) it is a warning, because only a certificate carrying both values
/// matches twice. Such a certificate is rejected at connect time.
fn report_certificate_overlaps(vendors: &[VendorConfig], report: &mut Report) {
    for (index, later) in vendors.iter().enumerate() {
        if later.certificate.is_empty() {
            continue;
        }
        for earlier in vendors[..index].iter() {
            if earlier.certificate.is_empty() {
                continue;
            }
            let Some(kinds) = earlier.certificate.shared_kinds(&later.certificate) else {
                continue;
            };
            let sources_apart = !earlier.sources.is_empty()
                && !later.sources.is_empty()
                && !earlier
                    .sources
                    .iter()
                    .any(|a| later.sources.iter().any(|b| nets_overlap(a, b)));
            if sources_apart {
                continue;
            }
            if kinds.is_empty() {
                report.warning(
                    &later.origin,
                    format!(
                        "vendor: \"{}\" and vendor \"{}\" at {} use different certificate matchers, so a certificate that satisfies both is rejected as ambiguous; add a matcher kind both share, such as certificate_cn",
                        later.name, earlier.name, earlier.origin
                    ),
                );
            } else {
                report.error(
                    &later.origin,
                    format!(
                        "vendor: \"{}\" and vendor \"{}\" at {} can match the same certificate ({} overlap); make the patterns disjoint",
                        later.name,
                        earlier.name,
                        earlier.origin,
                        kinds.join(", ")
                    ),
                );
            }
        }
    }
}

/// Lists the `*.toml` files of `folder`, sorted by file name.
fn rule_files(folder: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(folder)? {
        let path = entry?.path();
        if path.is_file() && path.extension().is_some_and(|ext| ext == "toml") {
            paths.push(path);
        }
    }
    paths.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(paths)
}

/// Returns the first and last address of `net` as 128-bit numbers, with
/// IPv4 and IPv6 kept apart by the flag.
pub(super) fn net_bounds(net: &IpNet) -> (bool, u128, u128) {
    match net {
        IpNet::V4(v4) => (
            false,
            u32::from(v4.network()) as u128,
            u32::from(v4.broadcast()) as u128,
        ),
        IpNet::V6(v6) => (true, u128::from(v6.network()), u128::from(v6.broadcast())),
    }
}

/// Reports source networks of two vendors that overlap: a connection from the
/// overlap would match both vendors. Sorting by start lets one pass find, for
/// every network, an earlier network of another vendor that still covers it.
fn report_overlaps(sources: &mut [SourceEntry], vendors: &[VendorConfig], report: &mut Report) {
    sources.sort_by_key(|entry| {
        let (v6, start, end) = net_bounds(&entry.net);
        (v6, start, end)
    });
    let mut widest: Option<usize> = None;
    for index in 0..sources.len() {
        let (v6, start, end) = net_bounds(&sources[index].net);
        if let Some(previous) = widest {
            let (previous_v6, _, previous_end) = net_bounds(&sources[previous].net);
            let (earlier, later) = (&sources[previous], &sources[index]);
            if previous_v6 == v6 && start <= previous_end {
                if earlier.vendor != later.vendor {
                    report.error(
                        &later.at,
                        format!(
                            "{}: {} of vendor \"{}\" overlaps {} of vendor \"{}\" at {}; a connection from the overlap would match both vendors, so narrow one of them",
                            later.key,
                            later.net,
                            vendors[later.vendor].name,
                            earlier.net,
                            vendors[earlier.vendor].name,
                            earlier.at
                        ),
                    );
                }
                if end <= previous_end {
                    continue;
                }
            }
        }
        widest = Some(index);
    }
}

/// Returns whether two networks share an address.
fn nets_overlap(a: &IpNet, b: &IpNet) -> bool {
    let (a_v6, a_start, a_end) = net_bounds(a);
    let (b_v6, b_start, b_end) = net_bounds(b);
    a_v6 == b_v6 && a_start <= b_end && b_start <= a_end
}

/// Parses a CIDR network, or a single address as a host network.
fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

struct RuleChecker<'a> {
    checker: Checker<'a>,
    gateway: &'a LoadedGateway,
    now: jiff::Timestamp,
}

impl RuleChecker<'_> {
    /// Reports an OPC UA username that an earlier vendor already has: a
    /// session must identify exactly one vendor.
    fn unique_opcua_users(
        &mut self,
        vendor: &VendorConfig,
        section: &raw::VendorSection,
        seen: &mut HashMap<String, (String, Origin)>,
    ) {
        for (index, entry) in section.opcua_users.iter().flatten().enumerate() {
            let username = &entry.get_ref().username;
            let at = self.checker.at(username);
            match seen.get(username.get_ref()) {
                Some((owner, first)) => self.checker.report.error(
                    &at,
                    format!(
                        "vendor.opcua_users[{}].username: \"{}\" is already a user of vendor \"{owner}\" at {first}; give every OPC UA user to one vendor",
                        index + 1,
                        username.get_ref()
                    ),
                ),
                None => {
                    seen.insert(username.get_ref().clone(), (vendor.name.clone(), at));
                }
            }
        }
    }

    /// Reports a second vendor with `opcua_anonymous = true`: an anonymous
    /// session must identify exactly one vendor.
    fn unique_opcua_anonymous(
        &mut self,
        vendor: &VendorConfig,
        section: &raw::VendorSection,
        first: &mut Option<(String, Origin)>,
    ) {
        let Some(flag) = section
            .opcua_anonymous
            .as_ref()
            .filter(|flag| *flag.get_ref())
        else {
            return;
        };
        let at = self.checker.at(flag);
        match first {
            Some((owner, origin)) => self.checker.report.error(
                &at,
                format!(
                    "vendor.opcua_anonymous: vendor \"{owner}\" at {origin} already allows anonymous OPC UA sessions; set it for one vendor only"
                ),
            ),
            None => *first = Some((vendor.name.clone(), at)),
        }
    }

    fn vendor(&mut self, path: &Path, file: &raw::RuleFile) -> VendorConfig {
        let section = &file.vendor;
        let sources = match &section.sources {
            Some(sources) => self.networks("vendor.sources", sources),
            None => Vec::new(),
        };
        let max_sessions = section.max_sessions.as_ref().and_then(|value| {
            self.checker
                .integer("vendor.max_sessions", Some(value), 1, (1, 1_000_000))
                .map(|n| n as usize)
        });

        let opcua_users = self
            .checker
            .opcua_users(section.opcua_users.as_deref().unwrap_or_default());
        let opcua_user_certificates = self.checker.opcua_user_certificates(
            section
                .opcua_user_certificates
                .as_deref()
                .unwrap_or_default(),
            &self.gateway.base,
        );
        let opcua_anonymous = section
            .opcua_anonymous
            .as_ref()
            .is_some_and(|flag| *flag.get_ref());
        let opcua_identity =
            !opcua_users.is_empty() || !opcua_user_certificates.is_empty() || opcua_anonymous;

        let certificate = self.certificate_matchers(section);
        if !certificate.is_empty() {
            if !self.gateway.tls_listener_written {
                self.checker.warning(
                    &section.name,
                    "vendor: certificate matchers apply only on modbus-tls listeners and gateway.toml has none, so this vendor never connects",
                );
            }
        } else if sources.is_empty() && !opcua_identity {
            self.checker.warning(
                &section.name,
                "vendor.sources: missing or empty, so this vendor never connects; list its networks, as [\"10.50.0.0/16\"]",
            );
        }

        let rate = self.rate("vendor.rate", section.rate.as_ref());

        let rules: Vec<RuleConfig> = file
            .allow
            .iter()
            .enumerate()
            .filter_map(|(index, allow)| {
                self.rule(&format!("allow[{}]", index + 1), allow, &sources)
            })
            .collect();
        self.warn_unwritable_tags(&rules);

        VendorConfig {
            name: section.name.get_ref().clone(),
            file_name: path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sources,
            max_sessions,
            certificate,
            rate,
            rules,
            opcua_users,
            opcua_user_certificates,
            opcua_anonymous,
            origin: self.checker.at(&section.name),
        }
    }

    /// Reads `certificate_cn`, `certificate_san`, `certificate_sha256` and
    /// `modbus_role`; invalid entries are reported and left out.
    fn certificate_matchers(&mut self, section: &raw::VendorSection) -> CertificateMatchers {
        let mut matchers = CertificateMatchers::default();
        if let Some(written) = &section.certificate_cn {
            matchers.cn = self
                .names("vendor.certificate_cn", written, "pattern")
                .unwrap_or_default();
        }
        if let Some(written) = &section.certificate_san {
            matchers.san = self
                .names("vendor.certificate_san", written, "name")
                .unwrap_or_default()
                .iter()
                .map(|text| SanPattern::parse(text))
                .collect();
        }
        if let Some(written) = &section.certificate_sha256 {
            for (index, text) in written.iter().enumerate() {
                match parse_fingerprint(text.get_ref().trim()) {
                    Some(fingerprint) => matchers.sha256.push(fingerprint),
                    None => self.checker.error(
                        text,
                        format!(
                            "vendor.certificate_sha256[{}]: invalid fingerprint \"{}\"; write the 64 hex digits of the SHA-256 of the DER certificate, colons allowed",
                            index + 1,
                            text.get_ref()
                        ),
                    ),
                }
            }
        }
        if let Some(written) = &section.modbus_role {
            matchers.roles = self
                .names("vendor.modbus_role", written, "role")
                .unwrap_or_default();
        }
        matchers
    }

    /// Checks a list of non-empty names, such as roles or patterns; returns
    /// `None` when one is empty.
    fn names(&mut self, key: &str, written: &[Spanned<String>], item: &str) -> Option<Vec<String>> {
        let mut names = Vec::new();
        let mut ok = true;
        for (index, text) in written.iter().enumerate() {
            if text.get_ref().trim().is_empty() {
                self.checker.error(
                    text,
                    format!(
                        "{key}[{}]: empty {item}; remove the entry or fill it in",
                        index + 1
                    ),
                );
                ok = false;
            } else {
                names.push(text.get_ref().trim().to_owned());
            }
        }
        ok.then_some(names)
    }

    /// Parses a list of networks. Invalid entries are reported and left out.
    fn networks(&mut self, key: &str, written: &[Spanned<String>]) -> Vec<IpNet> {
        let mut nets = Vec::new();
        for (index, text) in written.iter().enumerate() {
            let entry_key = format!("{key}[{}]", index + 1);
            let Some(net) = parse_net(text.get_ref().trim()) else {
                self.checker.error(
                    text,
                    format!(
                        "{entry_key}: invalid network \"{}\"; use CIDR notation, such as \"10.50.0.0/16\"",
                        text.get_ref()
                    ),
                );
                continue;
            };
            if net.trunc() != net {
                self.checker.warning(
                    text,
                    format!(
                        "{entry_key}: \"{}\" has host bits set and means {}; write {} to make that explicit",
                        text.get_ref(),
                        net.trunc(),
                        net.trunc()
                    ),
                );
            }
            nets.push(net.trunc());
        }
        nets
    }

    fn rule(
        &mut self,
        key: &str,
        allow: &raw::AllowSection,
        vendor_sources: &[IpNet],
    ) -> Option<RuleConfig> {
        if self
            .gateway
            .opcua_device_names
            .contains(allow.device.get_ref())
        {
            return self.opcua_rule(key, allow, vendor_sources);
        }
        if allow.services.is_some() || allow.nodes.is_some() {
            return self.tag_rule(key, allow, vendor_sources);
        }
        let device_ok = self.checker.device_reference(
            &format!("{key}.device"),
            &allow.device,
            &self.gateway.device_names,
        );
        let functions = self.functions(key, allow);
        let addresses = match &allow.addresses {
            Some(addresses) => self.ranges(&format!("{key}.addresses"), addresses),
            None => Some(Vec::new()),
        };
        let values = match &allow.values {
            Some(values) => self.ranges(&format!("{key}.values"), values).map(Some),
            None => Some(None),
        };
        let sub_functions = self.small_integers(
            &format!("{key}.sub_functions"),
            allow.sub_functions.as_deref(),
            65535,
        );
        let mei_types =
            self.small_integers(&format!("{key}.mei_types"), allow.mei_types.as_deref(), 255);
        let quantity = match &allow.quantity {
            Some(quantity) => self
                .range(&format!("{key}.quantity"), quantity.get_ref(), quantity)
                .map(Some),
            None => Some(None),
        };
        let when = self.when(key, allow, vendor_sources);
        let rate = self.rate(&format!("{key}.rate"), allow.rate.as_ref());

        let rule = RuleConfig {
            device: allow.device.get_ref().clone(),
            functions: functions?,
            addresses: addresses?,
            values: values?,
            sub_functions: sub_functions?.map(|list| list.into_iter().map(|n| n as u16).collect()),
            mei_types: mei_types?.map(|list| list.into_iter().map(|n| n as u8).collect()),
            quantity: quantity?,
            when: when?,
            rate,
            opcua: None,
            origin: self.checker.at(&allow.device),
        };
        if !device_ok {
            return None;
        }
        self.warn_unmatchable(key, allow, &rule);
        Some(rule)
    }

    /// Checks a rule for an OPC UA device: services, nodes, numeric values
    /// and the same `when` conditions and rate limits as a Modbus rule.
    fn opcua_rule(
        &mut self,
        key: &str,
        allow: &raw::AllowSection,
        vendor_sources: &[IpNet],
    ) -> Option<RuleConfig> {
        let opcua = self.checker.opcua_rule(key, allow);
        self.opcua_rule_config(key, allow, vendor_sources, opcua)
    }

    /// Completes a rule with `services` and `nodes` with its `when` and
    /// `rate`.
    fn opcua_rule_config(
        &mut self,
        key: &str,
        allow: &raw::AllowSection,
        vendor_sources: &[IpNet],
        opcua: Option<OpcuaRuleConfig>,
    ) -> Option<RuleConfig> {
        let when = self.when(key, allow, vendor_sources);
        let rate = self.rate(&format!("{key}.rate"), allow.rate.as_ref());
        Some(RuleConfig {
            device: allow.device.get_ref().clone(),
            functions: Vec::new(),
            addresses: Vec::new(),
            values: None,
            sub_functions: None,
            mei_types: None,
            quantity: None,
            when: when?,
            rate,
            opcua: Some(opcua?),
            origin: self.checker.at(&allow.device),
        })
    }

    /// Checks a rule for the tags of a Modbus device: `services` and
    /// `nodes` in the tag namespace, with the same conditions as any rule.
    fn tag_rule(
        &mut self,
        key: &str,
        allow: &raw::AllowSection,
        vendor_sources: &[IpNet],
    ) -> Option<RuleConfig> {
        let device_ok = self.checker.device_reference(
            &format!("{key}.device"),
            &allow.device,
            &self.gateway.device_names,
        );
        let opcua = self.checker.tag_rule_keys(key, allow);
        if device_ok && opcua.is_some() {
            self.warn_tagless_nodes(key, allow);
        }
        let rule = self.opcua_rule_config(key, allow, vendor_sources, opcua);
        rule.filter(|_| device_ok)
    }

    /// Warns about each tag that a rule lets the vendor write but that no
    /// Modbus rule of the vendor lets through to the device. A tag write is
    /// also decided as the Modbus request it becomes, so every such write is
    /// denied at run time. Conditions such as `when` and `values` are left
    /// out, so a warning means that no write can ever pass.
    fn warn_unwritable_tags(&mut self, rules: &[RuleConfig]) {
        for rule in rules {
            let Some(opcua) = &rule.opcua else {
                continue;
            };
            if !opcua.services.contains(&OpcuaService::Write)
                || !self.gateway.device_names.contains(&rule.device)
            {
                continue;
            }
            for tag in &self.gateway.tags {
                if tag.device != rule.device
                    || tag.access != super::TagAccess::ReadWrite
                    || !opcua.nodes.iter().any(|node| names_tag(node, &tag.name))
                {
                    continue;
                }
                let (function, count) = tag_write_shape(tag);
                let last = tag.address.saturating_add(count - 1);
                let passes = rules.iter().any(|modbus| {
                    modbus.opcua.is_none()
                        && modbus.device == rule.device
                        && modbus.functions.contains(&function)
                        && modbus
                            .addresses
                            .iter()
                            .any(|range| range.first <= tag.address && last <= range.last)
                });
                if passes {
                    continue;
                }
                let name = syntax::function_name(function).unwrap_or("write");
                let addresses = if count == 1 {
                    tag.address.to_string()
                } else {
                    format!("{}-{last}", tag.address)
                };
                self.checker.report.warning(
                    &rule.origin,
                    format!(
                        "tag {} may be written under this rule, but no Modbus rule of the vendor allows {name} on device \"{}\" at {addresses}, so every write is denied; add an [[allow]] with functions = [\"{name}\"] and addresses = [\"{addresses}\"]",
                        tag.name, rule.device
                    ),
                );
            }
        }
    }

    /// Warns about each `nodes` glob of a tag rule that matches none of the
    /// device's tags: a misspelt tag name would otherwise pass `check` and
    /// leave the vendor with no access to the tag.
    fn warn_tagless_nodes(&mut self, key: &str, allow: &raw::AllowSection) {
        let device = allow.device.get_ref();
        let tags: Vec<&str> = self
            .gateway
            .tags
            .iter()
            .filter(|tag| &tag.device == device)
            .map(|tag| tag.name.as_str())
            .collect();
        for (number, text, pattern) in super::tag::parsed_nodes(allow) {
            let NodeIdPattern::String(glob) = &pattern.id else {
                continue;
            };
            if tags
                .iter()
                .any(|name| crate::policy::glob_matches(glob, name))
            {
                continue;
            }
            let hint = match tags.first() {
                Some(name) => format!("name one of its [[tag]] sections, such as s={name}"),
                None => format!("define a [[tag]] with device = \"{device}\" in the gateway file"),
            };
            self.checker.warning(
                text,
                format!(
                    "{key}.nodes[{number}]: s={glob} matches no tag of device \"{device}\", so it allows nothing; {hint}"
                ),
            );
        }
    }

    fn functions(&mut self, key: &str, allow: &raw::AllowSection) -> Option<Vec<u8>> {
        let Some(functions) = &allow.functions else {
            self.checker.error(
                &allow.device,
                format!("{key}.functions: missing; list the functions the rule allows, as [\"read_holding_registers\"]"),
            );
            return None;
        };
        if functions.get_ref().is_empty() {
            self.checker.error(
                functions,
                format!("{key}.functions: empty, so the rule allows nothing; list at least one function"),
            );
            return None;
        }
        let mut codes = Vec::new();
        let mut ok = true;
        for (index, function) in functions.get_ref().iter().enumerate() {
            let parsed = match function.get_ref() {
                Scalar::Text(name) => syntax::parse_function_name(name),
                Scalar::Integer(number) => syntax::parse_function_number(*number),
            };
            match parsed {
                Ok(code) => codes.push(code),
                Err(problem) => {
                    self.checker.error(
                        function,
                        format!("{key}.functions[{}]: {problem}", index + 1),
                    );
                    ok = false;
                }
            }
        }
        codes.sort_unstable();
        codes.dedup();
        ok.then_some(codes)
    }

    fn range<T>(&mut self, key: &str, value: &Scalar, at: &Spanned<T>) -> Option<Range16> {
        let parsed = match value {
            Scalar::Text(text) => syntax::parse_range(text),
            Scalar::Integer(number) => syntax::range_of_number(*number),
        };
        match parsed {
            Ok(range) => Some(range),
            Err(problem) => {
                self.checker.error(at, format!("{key}: {problem}"));
                None
            }
        }
    }

    fn ranges(&mut self, key: &str, written: &Spanned<ScalarList>) -> Option<Vec<Range16>> {
        match written.get_ref() {
            ScalarList::One(value) => self.range(key, value, written).map(|range| vec![range]),
            ScalarList::Many(values) => {
                if values.is_empty() {
                    self.checker.error(
                        written,
                        format!("{key}: empty list, so the rule never matches; list at least one range or remove the key"),
                    );
                    return None;
                }
                let mut ranges = Vec::new();
                let mut ok = true;
                for (index, value) in values.iter().enumerate() {
                    let entry_key = format!("{key}[{}]", index + 1);
                    match self.range(&entry_key, value.get_ref(), value) {
                        Some(range) => ranges.push(range),
                        None => ok = false,
                    }
                }
                ok.then_some(ranges)
            }
        }
    }

    /// Checks a list of integers against `0..=max`; `Some(None)` when the key
    /// is missing.
    fn small_integers(
        &mut self,
        key: &str,
        written: Option<&[Spanned<i64>]>,
        max: i64,
    ) -> Option<Option<Vec<i64>>> {
        let Some(written) = written else {
            return Some(None);
        };
        let mut numbers = Vec::new();
        let mut ok = true;
        for (index, value) in written.iter().enumerate() {
            let entry_key = format!("{key}[{}]", index + 1);
            match self.checker.integer(&entry_key, Some(value), 0, (0, max)) {
                Some(number) => numbers.push(number),
                None => ok = false,
            }
        }
        numbers.sort_unstable();
        numbers.dedup();
        ok.then_some(Some(numbers))
    }

    fn when(
        &mut self,
        key: &str,
        allow: &raw::AllowSection,
        vendor_sources: &[IpNet],
    ) -> Option<WhenConfig> {
        let Some(section) = allow.when.as_ref() else {
            return Some(WhenConfig::default());
        };
        let key = format!("{key}.when");
        let state = self.when_state(&key, section.state.as_ref());
        let schedule = section
            .schedule
            .as_deref()
            .map(|written| self.when_schedule(&key, written, &allow.device));
        let window = section
            .window
            .as_deref()
            .map(|written| self.when_window(&key, written, &allow.device));
        let sources = section.sources.as_ref().map(|written| {
            let nets = self.networks(&format!("{key}.sources"), written);
            if written.is_empty() {
                self.warn_empty(&format!("{key}.sources"), "network", &allow.device);
            }
            self.warn_outside_vendor(&key, written, &nets, vendor_sources);
            nets
        });
        let role = section.role.as_ref().map(|written| {
            if written.is_empty() {
                self.warn_empty(&format!("{key}.role"), "role", &allow.device);
            }
            self.names(&format!("{key}.role"), written, "role")
        });
        Some(WhenConfig {
            role: role.map_or(Some(None), |parsed| parsed.map(Some))?,
            state: state?,
            schedule: schedule.map_or(Some(None), |parsed| parsed.map(Some))?,
            window: window.map_or(Some(None), |parsed| parsed.map(Some))?,
            sources,
        })
    }

    /// Warns about a `when` list written empty: no time or source is in it,
    /// so the rule never matches.
    fn warn_empty(&mut self, key: &str, item: &str, rule_at: &Spanned<String>) {
        self.checker.warning(
            rule_at,
            format!("{key}: empty, so the rule never matches; list at least one {item} or remove the key"),
        );
    }

    fn when_state(
        &mut self,
        key: &str,
        written: Option<&raw::SpannedMap>,
    ) -> Option<Vec<(String, String)>> {
        let Some(written) = written else {
            return Some(Vec::new());
        };
        let mut conditions = Vec::new();
        let mut ok = true;
        for (state, value) in written.get_ref() {
            let entry_key = format!("{key}.state.\"{}\"", state.get_ref());
            let Some(values) = self.gateway.state_values.get(state.get_ref()) else {
                let mut known: Vec<String> = self.gateway.state_values.keys().cloned().collect();
                known.sort();
                self.checker.error(
                    state,
                    format!(
                        "{key}.state: unknown state \"{}\"; known states: {}",
                        state.get_ref(),
                        known_list(&known)
                    ),
                );
                ok = false;
                continue;
            };
            if !values.contains(value.get_ref()) {
                let mut known = values.clone();
                known.sort();
                known.dedup();
                self.checker.error(
                    value,
                    format!(
                        "{entry_key}: state \"{}\" has no value \"{}\"; its values: {}",
                        state.get_ref(),
                        value.get_ref(),
                        known_list(&known)
                    ),
                );
                ok = false;
                continue;
            }
            conditions.push((state.get_ref().clone(), value.get_ref().clone()));
        }
        ok.then_some(conditions)
    }

    fn when_schedule(
        &mut self,
        key: &str,
        written: &[Spanned<String>],
        rule_at: &Spanned<String>,
    ) -> Option<Vec<super::WeeklyWindow>> {
        if written.is_empty() {
            self.warn_empty(&format!("{key}.schedule"), "weekly window", rule_at);
        }
        let mut windows = Vec::new();
        let mut ok = true;
        for (index, text) in written.iter().enumerate() {
            match syntax::parse_weekly(text.get_ref()) {
                Ok(window) => windows.push(window),
                Err(problem) => {
                    self.checker
                        .error(text, format!("{key}.schedule[{}]: {problem}", index + 1));
                    ok = false;
                }
            }
        }
        ok.then_some(windows)
    }

    /// Parses dated windows. A window that has ended is reported; when every
    /// window has ended, one warning reports that the rule never matches.
    fn when_window(
        &mut self,
        key: &str,
        written: &[Spanned<String>],
        rule_at: &Spanned<String>,
    ) -> Option<Vec<super::DatedWindow>> {
        if written.is_empty() {
            self.warn_empty(&format!("{key}.window"), "dated window", rule_at);
        }
        let mut windows = Vec::new();
        let mut past = Vec::new();
        let mut ok = true;
        let timezone = &self.gateway.gateway.timezone;
        for (index, text) in written.iter().enumerate() {
            let entry_key = format!("{key}.window[{}]", index + 1);
            match syntax::parse_dated(text.get_ref()) {
                Ok(window) => {
                    let end = timezone.to_ambiguous_timestamp(window.end).later();
                    if end.is_ok_and(|end| end <= self.now) {
                        past.push((entry_key, text));
                    }
                    windows.push(window);
                }
                Err(problem) => {
                    self.checker.error(text, format!("{entry_key}: {problem}"));
                    ok = false;
                }
            }
        }
        if ok && !past.is_empty() && past.len() == written.len() {
            self.checker.warning(
                past[0].1,
                format!(
                    "{key}.window: every window is in the past, so the rule never matches; remove the rule or correct the dates"
                ),
            );
        } else {
            for (entry_key, text) in past {
                self.checker.warning(
                    text,
                    format!(
                        "{entry_key}: \"{}\" is entirely in the past, so it never matches; remove it or correct the dates",
                        text.get_ref()
                    ),
                );
            }
        }
        ok.then_some(windows)
    }

    /// Warns about rule networks that share no address with the vendor's own
    /// sources: a connection from there is never this vendor's. When no
    /// network overlaps, one warning reports that the rule never matches.
    fn warn_outside_vendor(
        &mut self,
        key: &str,
        written: &[Spanned<String>],
        nets: &[IpNet],
        vendor_sources: &[IpNet],
    ) {
        if vendor_sources.is_empty() || nets.is_empty() {
            return;
        }
        let outside: Vec<(&IpNet, &Spanned<String>)> = nets
            .iter()
            .zip(written)
            .filter(|(net, _)| {
                !vendor_sources
                    .iter()
                    .any(|source| nets_overlap(net, source))
            })
            .collect();
        if outside.len() == nets.len() && nets.len() == written.len() {
            self.checker.warning(
                outside[0].1,
                format!(
                    "{key}.sources: no network overlaps vendor.sources, so the rule never matches; list a network inside vendor.sources"
                ),
            );
            return;
        }
        for (net, text) in outside {
            self.checker.warning(
                text,
                format!(
                    "{key}.sources: {net} is outside every vendor source, so it never matches; list a network inside vendor.sources"
                ),
            );
        }
    }

    /// Checks a `rate` table; `None` when it has an invalid value.
    fn rate(
        &mut self,
        key: &str,
        written: Option<&Spanned<raw::RateSection>>,
    ) -> Option<RateConfig> {
        let written = written?;
        let section = written.get_ref();
        let requests = self.rate_value(
            &format!("{key}.requests_per_second"),
            section.requests_per_second.as_ref(),
        );
        let writes = self.rate_value(
            &format!("{key}.writes_per_second"),
            section.writes_per_second.as_ref(),
        );
        let burst = match &section.burst {
            Some(value) => Some(self.checker.integer(
                &format!("{key}.burst"),
                Some(value),
                1,
                (1, MAX_BURST),
            )? as u32),
            None => None,
        };
        let (requests, writes) = (requests?, writes?);
        if requests.is_none() && writes.is_none() {
            self.checker.warning(
                written,
                format!("{key}: neither requests_per_second nor writes_per_second is set, so it limits nothing; set one or remove the key"),
            );
            return None;
        }
        Some(RateConfig {
            requests_per_second: requests,
            writes_per_second: writes,
            burst,
        })
    }

    /// Checks one rate; `Some(None)` when the key is missing.
    fn rate_value(&mut self, key: &str, written: Option<&Spanned<f64>>) -> Option<Option<Rate>> {
        let Some(written) = written else {
            return Some(None);
        };
        let value = *written.get_ref();
        let millis = (value * 1000.0).round();
        if !(value.is_finite() && (1.0..=MAX_RATE * 1000.0).contains(&millis)) {
            self.checker.error(
                written,
                format!("{key}: {value} outside 0.001..={MAX_RATE}; set a rate in requests per second, such as 50 or 0.5"),
            );
            return None;
        }
        Some(Some(Rate {
            millis_per_second: millis as u64,
        }))
    }

    fn warn_unmatchable(&mut self, key: &str, allow: &raw::AllowSection, rule: &RuleConfig) {
        let names: Vec<String> = rule
            .functions
            .iter()
            .map(|code| syntax::function_name(*code).map_or(code.to_string(), str::to_owned))
            .collect();
        if let Some(values) = &allow.values {
            if !rule
                .functions
                .iter()
                .any(|code| VALUE_WRITING_FUNCTIONS.contains(code))
            {
                self.checker.warning(
                    values,
                    format!(
                        "{key}.values: none of the functions ({}) writes values, so the key has no effect; remove it",
                        names.join(", ")
                    ),
                );
            }
        }
        if allow.addresses.is_none() {
            let addressed: Vec<&String> = rule
                .functions
                .iter()
                .zip(&names)
                .filter(|(code, _)| ADDRESSED_FUNCTIONS.contains(code))
                .map(|(_, name)| name)
                .collect();
            if !addressed.is_empty() {
                let addressed: Vec<&str> = addressed.iter().map(|s| s.as_str()).collect();
                self.checker.warning(
                    &allow.device,
                    format!(
                        "{key}.addresses: missing, so {} never match; list the allowed addresses, as [\"0-999\"]",
                        addressed.join(", ")
                    ),
                );
            }
        }
        let writes_limited = rule
            .rate
            .is_some_and(|rate| rate.writes_per_second.is_some());
        if writes_limited
            && !rule
                .functions
                .iter()
                .any(|code| WRITE_FUNCTIONS.contains(code))
        {
            if let Some(rate) = &allow.rate {
                self.checker.warning(
                    rate,
                    format!(
                        "{key}.rate.writes_per_second: none of the functions ({}) writes, so the limit has no effect; remove it",
                        names.join(", ")
                    ),
                );
            }
        }
        if let Some(first) = allow.sub_functions.as_ref().and_then(|list| list.first()) {
            if !rule.functions.contains(&DIAGNOSTICS) {
                self.checker.warning(
                    first,
                    format!("{key}.sub_functions: the rule does not allow diagnostics (8), so the key has no effect"),
                );
            }
        }
        if let Some(first) = allow.mei_types.as_ref().and_then(|list| list.first()) {
            if !rule.functions.contains(&ENCAPSULATED_INTERFACE) {
                self.checker.warning(
                    first,
                    format!("{key}.mei_types: the rule does not allow encapsulated_interface_transport (43), so the key has no effect"),
                );
            }
        }
    }
}

/// Returns true when `node`, a pattern of a tag rule, names the tag `name`.
fn names_tag(node: &NodePattern, name: &str) -> bool {
    node.namespace_uri == super::tag::NAMESPACE_URI
        && matches!(&node.id, NodeIdPattern::String(glob) if crate::policy::glob_matches(glob, name))
}

/// Returns the function code of a write to `tag` and how many addresses it
/// covers, taken from the request that a tag write builds.
fn tag_write_shape(tag: &super::TagConfig) -> (u8, u16) {
    match tag.bit {
        Some(bit) => {
            let request = crate::tags::write_bit_request(tag.address, bit, false);
            (request.function_code(), 1)
        }
        None => {
            let count = tag.data_type.register_count();
            let words = vec![0; usize::from(count)];
            let request = crate::tags::write_request(tag.kind, tag.address, &words);
            (request.function_code(), count)
        }
    }
}
