//! The OPC UA settings of `gateway.toml` and the rule files: the `opcua`
//! table of a listener, OPC UA devices, the vendor's user tokens and the
//! `services`, `nodes` and `values` keys of a rule. Validation only; the
//! server and client that use these live in `opcua`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha1::Digest;
use toml::Spanned;

use super::diagnostic::Origin;
use super::gateway::Checker;
use super::raw;
use super::Rate;

/// Largest timeout accepted: one day, in milliseconds.
const MAX_MILLISECONDS: i64 = 86_400_000;
/// Default chunk limit: the 64 KiB receive buffer most servers announce.
const DEFAULT_MAX_CHUNK_SIZE: u32 = 0x1_0000;
const DEFAULT_MAX_CHUNK_COUNT: u32 = 64;
/// Default OpenSecureChannel rate per source: ample for a client that opens
/// and renews channels, low enough to stop asymmetric-crypto floods.
const DEFAULT_OPEN_RATE: u64 = 5;
const DEFAULT_OPEN_BURST: u32 = 10;
/// The smallest chunk OPC 10000-6 lets a non-ECC endpoint announce.
const MIN_CHUNK_SIZE: i64 = 8192;
/// Upper bounds of the guard limits: 16 MiB chunks, 4096 chunks and 256 MiB
/// messages, far above what a gateway needs to pass.
const MAX_CHUNK_SIZE: i64 = 0x100_0000;
const MAX_CHUNK_COUNT: i64 = 4096;
const MAX_MESSAGE_SIZE: i64 = 0x1000_0000;
const MAX_OPEN_RATE: f64 = 10_000.0;
const MAX_OPEN_BURST: i64 = 10_000;

/// An OPC UA security policy, as named in the OPC UA specification (Part 7)
/// without its URI prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UaSecurityPolicy {
    None,
    Basic256Sha256,
    Aes128Sha256RsaOaep,
    Aes256Sha256RsaPss,
}

impl UaSecurityPolicy {
    /// Every policy with its configuration name.
    pub const ALL: [(&'static str, UaSecurityPolicy); 4] = [
        ("None", UaSecurityPolicy::None),
        ("Basic256Sha256", UaSecurityPolicy::Basic256Sha256),
        (
            "Aes128_Sha256_RsaOaep",
            UaSecurityPolicy::Aes128Sha256RsaOaep,
        ),
        ("Aes256_Sha256_RsaPss", UaSecurityPolicy::Aes256Sha256RsaPss),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, policy)| *policy == self)
            .map_or("None", |(name, _)| name)
    }
}

/// An OPC UA message security mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UaSecurityMode {
    None,
    Sign,
    SignAndEncrypt,
}

/// The `opcua` table of an OPC UA listener; paths are resolved against the
/// gateway file's folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpcuaListenerConfig {
    pub application_uri: String,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    /// CA certificate that client application certificates must chain to.
    pub client_ca: Option<PathBuf>,
    pub crl: Vec<PathBuf>,
    /// Policies offered with SignAndEncrypt, never `None`.
    pub security_policies: Vec<UaSecurityPolicy>,
    /// Offers an endpoint without security as well.
    pub allow_none: bool,
    /// Limits of the front guard on each client connection.
    pub guard: OpcuaGuardLimits,
}

/// The limits the front guard applies to the client connections of an OPC
/// UA listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpcuaGuardLimits {
    /// Largest chunk a client may send, header included.
    pub max_chunk_size: u32,
    /// Most chunks of one request message.
    pub max_chunk_count: u32,
    /// Most wire bytes of one request message.
    pub max_message_size: u32,
    /// OpenSecureChannel requests per second from one source address.
    pub open_rate: Rate,
    /// OpenSecureChannel requests one source may send at once.
    pub open_burst: u32,
}

impl Default for OpcuaGuardLimits {
    fn default() -> Self {
        OpcuaGuardLimits {
            max_chunk_size: DEFAULT_MAX_CHUNK_SIZE,
            max_chunk_count: DEFAULT_MAX_CHUNK_COUNT,
            max_message_size: DEFAULT_MAX_CHUNK_SIZE * DEFAULT_MAX_CHUNK_COUNT,
            open_rate: Rate::per_second(DEFAULT_OPEN_RATE),
            open_burst: DEFAULT_OPEN_BURST,
        }
    }
}

/// An OPC UA server that sluice connects to as a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpcuaDeviceConfig {
    pub name: String,
    /// The server's endpoint URL, such as `opc.tcp://10.0.0.5:4840`.
    pub endpoint: String,
    pub security_policy: UaSecurityPolicy,
    pub security_mode: UaSecurityMode,
    /// The service identity; anonymous when `None`.
    pub username: Option<String>,
    /// File holding the password of `username`, resolved against the gateway
    /// file's folder and read when the connection is made.
    pub password_file: Option<PathBuf>,
    pub timeout: Duration,
    pub backoff_max: Duration,
    pub origin: Origin,
}

/// A user of a vendor on OPC UA listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpcuaUser {
    pub username: String,
    /// An argon2id hash in PHC form.
    pub password_hash: String,
}

/// An OPC UA service that rules allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpcuaService {
    Browse,
    Read,
    Write,
    Call,
    Subscribe,
    HistoryRead,
}

impl OpcuaService {
    /// Every service with its name in rules and events.
    pub const ALL: [(&'static str, OpcuaService); 6] = [
        ("browse", OpcuaService::Browse),
        ("read", OpcuaService::Read),
        ("write", OpcuaService::Write),
        ("call", OpcuaService::Call),
        ("subscribe", OpcuaService::Subscribe),
        ("history_read", OpcuaService::HistoryRead),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, service)| *service == self)
            .map_or("unknown", |(name, _)| name)
    }
}

/// Maximum browse names in a `path=` pattern. Deeper paths are rejected.
pub const MAX_PATH_SEGMENTS: usize = 32;

/// The identifier part of a node pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeIdPattern {
    /// A string identifier glob: `*` matches any run of characters, `?` one.
    String(String),
    Numeric(u32),
    /// A browse path from the Objects folder, one browse name per element,
    /// each in the pattern's namespace. It names the node it leads to and
    /// every node below that one by hierarchical references.
    Path(Vec<String>),
}

/// A set of nodes a rule names: `nsu=URI;s=GLOB`, `nsu=URI;i=N` or
/// `nsu=URI;path=/NAME/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePattern {
    pub namespace_uri: String,
    pub id: NodeIdPattern,
}

/// A node pattern that failed to parse: the message and, for browse paths,
/// the byte offset in the pattern text where the problem starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternError {
    pub offset: Option<usize>,
    pub message: String,
}

impl NodePattern {
    /// Parses `nsu=URI;s=GLOB`, `nsu=URI;i=N` or `nsu=URI;path=/NAME/...`.
    pub fn parse(text: &str) -> Result<NodePattern, String> {
        NodePattern::parse_at(text).map_err(|error| error.message)
    }

    /// Parses like `parse` and returns where in `text` a problem starts.
    pub fn parse_at(text: &str) -> Result<NodePattern, PatternError> {
        if let Some(at) = text.find(";path=") {
            return parse_path_pattern(text, at);
        }
        NodePattern::parse_id(text).map_err(|message| PatternError {
            offset: None,
            message,
        })
    }

    fn parse_id(text: &str) -> Result<NodePattern, String> {
        let hint = PATTERN_HINT;
        let Some(rest) = text.strip_prefix("nsu=") else {
            return Err(format!("invalid node pattern \"{text}\"; {hint}"));
        };
        let Some((uri, id)) = rest.rsplit_once(';') else {
            return Err(format!("invalid node pattern \"{text}\"; {hint}"));
        };
        if uri.is_empty() {
            return Err(format!("empty namespace URI in \"{text}\"; {hint}"));
        }
        let id = if let Some(glob) = id.strip_prefix("s=") {
            if glob.is_empty() {
                return Err(format!("empty identifier in \"{text}\"; {hint}"));
            }
            NodeIdPattern::String(glob.to_owned())
        } else if let Some(number) = id.strip_prefix("i=") {
            match number.parse::<u32>() {
                Ok(number) => NodeIdPattern::Numeric(number),
                Err(_) => return Err(format!("invalid numeric identifier in \"{text}\"; {hint}")),
            }
        } else {
            return Err(format!("unsupported identifier type in \"{text}\"; {hint}"));
        };
        Ok(NodePattern {
            namespace_uri: uri.to_owned(),
            id,
        })
    }
}

const PATTERN_HINT: &str = "write nsu=URI;s=GLOB, nsu=URI;i=NUMBER or nsu=URI;path=/NAME/NAME, such as \"nsu=urn:plant:line1;s=Line1.*\"";

/// Parses `nsu=URI;path=/NAME/NAME`, where `;path=` starts at `at`. A `/`
/// or `\` inside a browse name is written `\/` or `\\`.
fn parse_path_pattern(text: &str, at: usize) -> Result<NodePattern, PatternError> {
    let error = |offset: usize, message: String| PatternError {
        offset: Some(offset),
        message,
    };
    let hint = "write nsu=URI;path=/NAME/NAME with browse names from the Objects folder down, such as \"nsu=urn:plant:line1;path=/Line1/Press1\"";
    let Some(uri) = text[..at].strip_prefix("nsu=") else {
        return Err(error(0, format!("invalid node pattern \"{text}\"; {hint}")));
    };
    if uri.is_empty() {
        return Err(error(
            4,
            format!("empty namespace URI in \"{text}\"; {hint}"),
        ));
    }
    let start = at + ";path=".len();
    let path = &text[start..];
    if !path.starts_with('/') {
        return Err(error(
            start,
            format!("browse path \"{path}\" does not start with \"/\"; {hint}"),
        ));
    }
    let segments = split_browse_names(path, start + 1, hint)?;
    if segments.len() > MAX_PATH_SEGMENTS {
        return Err(error(
            start,
            format!(
                "browse path \"{path}\" has {} browse names, more than the maximum {MAX_PATH_SEGMENTS}",
                segments.len()
            ),
        ));
    }
    Ok(NodePattern {
        namespace_uri: uri.to_owned(),
        id: NodeIdPattern::Path(segments),
    })
}

/// An inclusive range of numeric values a write may set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueRange {
    pub low: f64,
    pub high: f64,
}

// Ranges come from TOML text and are never NaN, so equality is total.
impl Eq for ValueRange {}

impl ValueRange {
    /// Parses `LOW-HIGH` or a single number; either bound may be negative
    /// or have a fraction, as `-10.5-20`.
    pub fn parse(text: &str) -> Result<ValueRange, String> {
        let text = text.trim();
        let hint = "write a number or LOW-HIGH, such as \"0-100\"";
        // The separator is the first '-' after the first character, so a
        // leading minus sign belongs to the low bound.
        let split = text
            .char_indices()
            .skip(1)
            .find(|&(at, c)| c == '-' && !text[..at].ends_with(['e', 'E']))
            .map(|(at, _)| at);
        let (low, high) = match split {
            Some(at) => (&text[..at], &text[at + 1..]),
            None => (text, text),
        };
        let parse = |part: &str| part.trim().parse::<f64>().ok().filter(|n| n.is_finite());
        match (parse(low), parse(high)) {
            (Some(low), Some(high)) if low <= high => Ok(ValueRange { low, high }),
            (Some(_), Some(_)) => Err(format!("range \"{text}\" ends before it starts; {hint}")),
            _ => Err(format!("invalid value range \"{text}\"; {hint}")),
        }
    }

    pub fn contains(&self, value: f64) -> bool {
        self.low <= value && value <= self.high
    }
}

/// The OPC UA part of an `[[allow]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpcuaRuleConfig {
    pub services: Vec<OpcuaService>,
    pub nodes: Vec<NodePattern>,
    /// Allowed numeric values of writes; `None` leaves them unrestricted.
    pub values: Option<Vec<ValueRange>>,
}

/// Computes the SHA-1 thumbprint of the first certificate in a PEM or DER
/// file, the form OPC UA uses to name certificates.
pub fn certificate_thumbprint(bytes: &[u8]) -> Result<[u8; 20], String> {
    Ok(sha1::Sha1::digest(certificate_der(bytes)?).into())
}

/// Returns the DER form of the first certificate in a PEM or DER file.
pub fn certificate_der(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let der = match std::str::from_utf8(bytes) {
        Ok(text) if text.contains("-----BEGIN CERTIFICATE-----") => pem_body(text)?,
        _ => bytes.to_vec(),
    };
    // A DER certificate is an ASN.1 SEQUENCE, tag 0x30.
    if der.first() != Some(&0x30) {
        return Err("not a PEM or DER certificate".to_owned());
    }
    Ok(der)
}

fn pem_body(text: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let start = text
        .find("-----BEGIN CERTIFICATE-----")
        .map(|at| at + "-----BEGIN CERTIFICATE-----".len());
    let end = text.find("-----END CERTIFICATE-----");
    let (Some(start), Some(end)) = (start, end) else {
        return Err("PEM certificate without an END line".to_owned());
    };
    let body: String = text
        .get(start..end)
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|error| format!("invalid PEM certificate: {error}"))
}

/// Splits the browse names of a path that starts with `/`. `offset` is the
/// position of the first name in the pattern text, for errors.
fn split_browse_names(path: &str, offset: usize, hint: &str) -> Result<Vec<String>, PatternError> {
    let error = |offset: usize, message: String| PatternError {
        offset: Some(offset),
        message,
    };
    let elements = &path[1..];
    let mut segments = Vec::new();
    let mut name = String::new();
    let mut name_start = offset;
    let mut chars = elements.char_indices();
    while let Some((at, c)) = chars.next() {
        let position = offset + at;
        match c {
            '\\' => match chars.next() {
                Some((_, escaped @ ('/' | '\\'))) => name.push(escaped),
                _ => {
                    return Err(error(
                        position,
                        format!(
                        "invalid escape in browse path \"{path}\"; only \\/ and \\\\ are escapes"
                    ),
                    ))
                }
            },
            '/' => {
                if name.is_empty() {
                    return Err(error(
                        name_start,
                        format!("empty browse name in browse path \"{path}\"; {hint}"),
                    ));
                }
                segments.push(std::mem::take(&mut name));
                name_start = position + 1;
            }
            c => name.push(c),
        }
    }
    if name.is_empty() {
        return Err(error(
            name_start,
            format!("browse path \"{path}\" ends without a browse name; remove the final \"/\""),
        ));
    }
    segments.push(name);
    Ok(segments)
}

impl Checker<'_> {
    /// Checks the `opcua` table of an OPC UA listener.
    pub(super) fn opcua_listener(
        &mut self,
        key: &str,
        section: &Spanned<raw::OpcuaListenerSection>,
        base: &Path,
    ) -> Option<OpcuaListenerConfig> {
        let table = section.get_ref();
        let key = format!("{key}.opcua");
        let mut ok = true;
        let mut required =
            |check: &mut Self, field: &str, value: &Option<Spanned<String>>| match value {
                Some(value) if !value.get_ref().trim().is_empty() => Some(value.get_ref().clone()),
                Some(value) => {
                    check.error(value, format!("{key}.{field}: empty; set it"));
                    ok = false;
                    None
                }
                None => {
                    check.error(section, format!("{key}.{field}: missing; set it"));
                    ok = false;
                    None
                }
            };
        let application_uri = required(self, "application_uri", &table.application_uri);
        let certificate = required(self, "certificate", &table.certificate);
        let private_key = required(self, "private_key", &table.private_key);

        let mut policies = Vec::new();
        match &table.security_policies {
            None => policies.push(UaSecurityPolicy::Basic256Sha256),
            Some(written) => {
                for (index, name) in written.get_ref().iter().enumerate() {
                    let entry_key = format!("{key}.security_policies[{}]", index + 1);
                    match self.ua_policy(&entry_key, name) {
                        Some(UaSecurityPolicy::None) => {
                            self.error(
                                name,
                                format!("{entry_key}: \"None\" is not a security policy for SignAndEncrypt; set allow_none = true to offer an endpoint without security"),
                            );
                            ok = false;
                        }
                        Some(policy) if !policies.contains(&policy) => policies.push(policy),
                        Some(_) => {}
                        None => ok = false,
                    }
                }
            }
        }
        let allow_none = table.allow_none.as_ref().is_some_and(|v| *v.get_ref());
        if policies.is_empty() && !allow_none {
            self.error(
                section,
                format!("{key}.security_policies: empty and allow_none is false, so no client can connect; list at least one policy"),
            );
            ok = false;
        }
        let crl: Vec<PathBuf> = table
            .crl
            .iter()
            .flatten()
            .map(|path| base.join(path.get_ref()))
            .collect();
        if !policies.is_empty() && table.client_ca.is_none() {
            self.error(
                section,
                format!("{key}.client_ca: missing; a listener that offers security_policies checks client application certificates against it, so set it to the CA bundle of your clients, or set security_policies = [] and allow_none = true to offer only the endpoint without security"),
            );
            ok = false;
        }
        let guard = self.opcua_guard_limits(&key, table);
        Some(OpcuaListenerConfig {
            application_uri: application_uri?,
            certificate: base.join(certificate?),
            private_key: base.join(private_key?),
            client_ca: table.client_ca.as_ref().map(|p| base.join(p.get_ref())),
            crl,
            security_policies: policies,
            allow_none,
            guard: guard?,
        })
        .filter(|_| ok)
    }

    /// Checks the guard limits of an `opcua` table; missing keys take the
    /// defaults.
    fn opcua_guard_limits(
        &mut self,
        key: &str,
        table: &raw::OpcuaListenerSection,
    ) -> Option<OpcuaGuardLimits> {
        let defaults = OpcuaGuardLimits::default();
        let limit =
            |check: &mut Self, field: &str, value: &Option<Spanned<i64>>, default: u32, range| {
                check
                    .integer(
                        &format!("{key}.{field}"),
                        value.as_ref(),
                        i64::from(default),
                        range,
                    )
                    .map(|n| n as u32)
            };
        let max_chunk_size = limit(
            self,
            "max_chunk_size",
            &table.max_chunk_size,
            defaults.max_chunk_size,
            (MIN_CHUNK_SIZE, MAX_CHUNK_SIZE),
        );
        let max_chunk_count = limit(
            self,
            "max_chunk_count",
            &table.max_chunk_count,
            defaults.max_chunk_count,
            (1, MAX_CHUNK_COUNT),
        );
        let max_message_size = limit(
            self,
            "max_message_size",
            &table.max_message_size,
            defaults.max_message_size,
            (MIN_CHUNK_SIZE, MAX_MESSAGE_SIZE),
        );
        let open_burst = limit(
            self,
            "open_burst",
            &table.open_burst,
            defaults.open_burst,
            (1, MAX_OPEN_BURST),
        );
        let open_rate = match &table.open_rate {
            None => Some(defaults.open_rate),
            Some(written) => {
                let value = *written.get_ref();
                let millis = (value * 1000.0).round();
                if value.is_finite() && (1.0..=MAX_OPEN_RATE * 1000.0).contains(&millis) {
                    Some(Rate {
                        millis_per_second: millis as u64,
                    })
                } else {
                    self.error(
                        written,
                        format!("{key}.open_rate: {value} outside 0.001..={MAX_OPEN_RATE}; set OpenSecureChannel requests per second, such as 5 or 0.5"),
                    );
                    None
                }
            }
        };
        Some(OpcuaGuardLimits {
            max_chunk_size: max_chunk_size?,
            max_chunk_count: max_chunk_count?,
            max_message_size: max_message_size?,
            open_rate: open_rate?,
            open_burst: open_burst?,
        })
    }

    fn ua_policy(&mut self, key: &str, name: &Spanned<String>) -> Option<UaSecurityPolicy> {
        self.choice(
            key,
            Some(name),
            &UaSecurityPolicy::ALL,
            UaSecurityPolicy::None,
        )
    }

    /// Checks an `[[device]]` with `protocol = "opcua"`.
    pub(super) fn opcua_device(
        &mut self,
        key: &str,
        section: &raw::DeviceSection,
        base: &Path,
    ) -> Option<OpcuaDeviceConfig> {
        let mut ok = true;
        let modbus_keys = [
            ("address", section.address.as_ref().map(|v| self.at(v))),
            ("unit", section.unit.as_ref().map(|v| self.at(v))),
            (
                "max_connections",
                section.max_connections.as_ref().map(|v| self.at(v)),
            ),
            (
                "max_in_flight",
                section.max_in_flight.as_ref().map(|v| self.at(v)),
            ),
            (
                "mirror",
                section
                    .mirror
                    .as_ref()
                    .and_then(|v| v.first())
                    .map(|v| self.at(v)),
            ),
            ("tls", section.tls.as_ref().map(|v| self.at(v))),
        ];
        for (field, at) in modbus_keys {
            if let Some(at) = at {
                self.report.error(
                    &at,
                    format!("{key}.{field}: a Modbus key on an OPC UA device; remove it"),
                );
                ok = false;
            }
        }
        let endpoint = match &section.endpoint {
            Some(endpoint) if endpoint.get_ref().starts_with("opc.tcp://") => {
                Some(endpoint.get_ref().clone())
            }
            Some(endpoint) => {
                self.error(
                    endpoint,
                    format!(
                        "{key}.endpoint: invalid endpoint URL \"{}\"; use opc.tcp://HOST:PORT",
                        endpoint.get_ref()
                    ),
                );
                None
            }
            None => {
                self.error(
                    &section.name,
                    format!("{key}.endpoint: missing; set endpoint = \"opc.tcp://HOST:PORT\""),
                );
                None
            }
        };
        let policy = match &section.security_policy {
            Some(name) => self.ua_policy(&format!("{key}.security_policy"), name),
            None => Some(UaSecurityPolicy::None),
        };
        let default_mode = match policy {
            Some(UaSecurityPolicy::None) | None => UaSecurityMode::None,
            Some(_) => UaSecurityMode::SignAndEncrypt,
        };
        let mode = self.choice(
            &format!("{key}.security_mode"),
            section.security_mode.as_ref(),
            &[
                ("None", UaSecurityMode::None),
                ("Sign", UaSecurityMode::Sign),
                ("SignAndEncrypt", UaSecurityMode::SignAndEncrypt),
            ],
            default_mode,
        );
        if let (Some(policy), Some(mode)) = (policy, mode) {
            if (policy == UaSecurityPolicy::None) != (mode == UaSecurityMode::None) {
                let at = section
                    .security_mode
                    .as_ref()
                    .map_or_else(|| self.at(&section.name), |value| self.at(value));
                self.report.error(
                    &at,
                    format!("{key}.security_mode: security policy and mode disagree; use policy \"None\" with mode \"None\", and any other policy with \"Sign\" or \"SignAndEncrypt\""),
                );
                ok = false;
            }
        }
        if section.password_file.is_some() && section.username.is_none() {
            self.error(
                &section.name,
                format!("{key}.username: missing, but password_file is set; set both or neither"),
            );
            ok = false;
        }
        if section.username.is_some() && section.password_file.is_none() {
            self.error(
                &section.name,
                format!("{key}.password_file: missing, but username is set; set both or neither"),
            );
            ok = false;
        }
        let timeout_ms = self.integer(
            &format!("{key}.timeout_ms"),
            section.timeout_ms.as_ref(),
            2_000,
            (1, MAX_MILLISECONDS),
        );
        let backoff_ms = self.integer(
            &format!("{key}.backoff_max_ms"),
            section.backoff_max_ms.as_ref(),
            30_000,
            (1, MAX_MILLISECONDS),
        );
        let device = OpcuaDeviceConfig {
            name: section.name.get_ref().clone(),
            endpoint: endpoint?,
            security_policy: policy?,
            security_mode: mode?,
            username: section.username.as_ref().map(|u| u.get_ref().clone()),
            password_file: section
                .password_file
                .as_ref()
                .map(|p| base.join(p.get_ref())),
            timeout: Duration::from_millis(timeout_ms? as u64),
            backoff_max: Duration::from_millis(backoff_ms? as u64),
            origin: self.at(&section.name),
        };
        ok.then_some(device)
    }

    /// Checks the vendor's `opcua_users`.
    pub(super) fn opcua_users(
        &mut self,
        written: &[Spanned<raw::OpcuaUserSection>],
    ) -> Vec<OpcuaUser> {
        let mut users = Vec::new();
        for (index, entry) in written.iter().enumerate() {
            let key = format!("vendor.opcua_users[{}]", index + 1);
            let user = entry.get_ref();
            if user.username.get_ref().is_empty() {
                self.error(
                    &user.username,
                    format!("{key}.username: empty; name the user"),
                );
                continue;
            }
            let hash = user.password_hash.get_ref();
            let parsed = argon2::PasswordHash::new(hash);
            match parsed {
                Ok(parsed) if parsed.algorithm.as_str() == "argon2id" => {}
                Ok(parsed) => {
                    self.error(
                        &user.password_hash,
                        format!(
                            "{key}.password_hash: algorithm {} is not argon2id; create the hash with `sluice hash-password`",
                            parsed.algorithm
                        ),
                    );
                    continue;
                }
                Err(error) => {
                    self.error(
                        &user.password_hash,
                        format!("{key}.password_hash: invalid PHC string ({error}); create the hash with `sluice hash-password`"),
                    );
                    continue;
                }
            }
            users.push(OpcuaUser {
                username: user.username.get_ref().clone(),
                password_hash: hash.clone(),
            });
        }
        users
    }

    /// Reads the vendor's `opcua_user_certificates` and returns their SHA-1
    /// thumbprints.
    pub(super) fn opcua_user_certificates(
        &mut self,
        written: &[Spanned<String>],
        base: &Path,
    ) -> Vec<[u8; 20]> {
        let mut thumbprints = Vec::new();
        for (index, path) in written.iter().enumerate() {
            let key = format!("vendor.opcua_user_certificates[{}]", index + 1);
            let full = base.join(path.get_ref());
            let read = std::fs::read(&full)
                .map_err(|error| format!("failed to read \"{}\": {error}", full.display()))
                .and_then(|bytes| certificate_thumbprint(&bytes));
            match read {
                Ok(thumbprint) => thumbprints.push(thumbprint),
                Err(problem) => self.error(path, format!("{key}: {problem}")),
            }
        }
        thumbprints
    }

    /// Checks the OPC UA keys of a rule for an OPC UA device.
    pub(super) fn opcua_rule(
        &mut self,
        key: &str,
        allow: &raw::AllowSection,
    ) -> Option<OpcuaRuleConfig> {
        let mut ok = true;
        for field in modbus_keys(allow) {
            self.error(
                &allow.device,
                format!("{key}.{field}: a Modbus key in a rule for an OPC UA device; use services and nodes"),
            );
            ok = false;
        }
        let rule = self.opcua_keys(key, allow);
        rule.filter(|_| ok)
    }

    /// Checks the `services`, `nodes` and `values` keys of a rule.
    pub(super) fn opcua_keys(
        &mut self,
        key: &str,
        allow: &raw::AllowSection,
    ) -> Option<OpcuaRuleConfig> {
        let services = self.opcua_services(key, allow);
        let nodes = self.opcua_nodes(key, allow);
        let values = match &allow.values {
            None => Some(None),
            Some(written) => self
                .opcua_values(&format!("{key}.values"), written)
                .map(Some),
        };
        Some(OpcuaRuleConfig {
            services: services?,
            nodes: nodes?,
            values: values?,
        })
    }

    fn opcua_services(
        &mut self,
        key: &str,
        allow: &raw::AllowSection,
    ) -> Option<Vec<OpcuaService>> {
        let Some(written) = &allow.services else {
            self.error(
                &allow.device,
                format!("{key}.services: missing; list the services the rule allows, as [\"browse\", \"read\"]"),
            );
            return None;
        };
        if written.get_ref().is_empty() {
            self.error(
                written,
                format!(
                    "{key}.services: empty, so the rule allows nothing; list at least one service"
                ),
            );
            return None;
        }
        let mut services = Vec::new();
        let mut ok = true;
        for (index, name) in written.get_ref().iter().enumerate() {
            let entry_key = format!("{key}.services[{}]", index + 1);
            match self.choice(
                &entry_key,
                Some(name),
                &OpcuaService::ALL,
                OpcuaService::Read,
            ) {
                Some(service) => services.push(service),
                None => ok = false,
            }
        }
        services.sort_unstable();
        services.dedup();
        ok.then_some(services)
    }

    fn opcua_nodes(&mut self, key: &str, allow: &raw::AllowSection) -> Option<Vec<NodePattern>> {
        let Some(written) = &allow.nodes else {
            self.error(
                &allow.device,
                format!("{key}.nodes: missing; list the nodes the rule allows, as [\"nsu=urn:plant:line1;s=Line1.*\"]"),
            );
            return None;
        };
        if written.get_ref().is_empty() {
            self.error(written, format!("{key}.nodes: empty, so the rule allows nothing; list at least one node pattern"));
            return None;
        }
        let mut nodes = Vec::new();
        let mut ok = true;
        for (index, text) in written.get_ref().iter().enumerate() {
            match NodePattern::parse_at(text.get_ref()) {
                Ok(pattern) => nodes.push(pattern),
                Err(problem) => {
                    // A browse path problem is shown at its character, past
                    // the opening quote. Escapes in the TOML string shift it.
                    let at = match problem.offset {
                        Some(offset) => self.source.origin_at(text.span().start + 1 + offset),
                        None => self.at(text),
                    };
                    let message = format!("{key}.nodes[{}]: {}", index + 1, problem.message);
                    self.report.error(&at, message);
                    ok = false;
                }
            }
        }
        ok.then_some(nodes)
    }

    fn opcua_values(
        &mut self,
        key: &str,
        written: &Spanned<raw::ScalarList>,
    ) -> Option<Vec<ValueRange>> {
        let texts: Vec<String> = match written.get_ref() {
            raw::ScalarList::One(value) => vec![scalar_text(value)],
            raw::ScalarList::Many(values) => {
                values.iter().map(|v| scalar_text(v.get_ref())).collect()
            }
        };
        if texts.is_empty() {
            self.error(written, format!("{key}: empty list, so the rule never matches; list at least one range or remove the key"));
            return None;
        }
        let mut ranges = Vec::new();
        for text in texts {
            match ValueRange::parse(&text) {
                Ok(range) => ranges.push(range),
                Err(problem) => {
                    self.error(written, format!("{key}: {problem}"));
                    return None;
                }
            }
        }
        Some(ranges)
    }
}

fn scalar_text(value: &raw::Scalar) -> String {
    match value {
        raw::Scalar::Text(text) => text.clone(),
        raw::Scalar::Integer(number) => number.to_string(),
    }
}

/// Returns the Modbus-only keys that `allow` sets, which a rule with
/// `services` and `nodes` does not take.
pub(super) fn modbus_keys(allow: &raw::AllowSection) -> Vec<&'static str> {
    [
        ("functions", allow.functions.is_some()),
        ("addresses", allow.addresses.is_some()),
        ("sub_functions", allow.sub_functions.is_some()),
        ("mei_types", allow.mei_types.is_some()),
        ("quantity", allow.quantity.is_some()),
    ]
    .into_iter()
    .filter_map(|(field, present)| present.then_some(field))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_pattern_parses_string_glob() {
        let pattern = NodePattern::parse("nsu=urn:plant:line1;s=Line1.*").unwrap();
        assert_eq!(pattern.namespace_uri, "urn:plant:line1");
        assert_eq!(pattern.id, NodeIdPattern::String("Line1.*".to_owned()));
    }

    #[test]
    fn node_pattern_parses_numeric_id() {
        let pattern = NodePattern::parse("nsu=http://x/;i=1001").unwrap();
        assert_eq!(pattern.namespace_uri, "http://x/");
        assert_eq!(pattern.id, NodeIdPattern::Numeric(1001));
    }

    #[test]
    fn node_pattern_rejects_index_form() {
        let error = NodePattern::parse("ns=2;s=Line1").unwrap_err();
        assert!(
            error.starts_with("invalid node pattern \"ns=2;s=Line1\""),
            "{error}"
        );
    }

    #[test]
    fn node_pattern_parses_browse_path() {
        let pattern = NodePattern::parse("nsu=urn:plant:line1;path=/Line1/Press1").unwrap();
        assert_eq!(pattern.namespace_uri, "urn:plant:line1");
        assert_eq!(
            pattern.id,
            NodeIdPattern::Path(vec!["Line1".to_owned(), "Press1".to_owned()])
        );
    }

    #[test]
    fn browse_path_keeps_escaped_slash_and_semicolon() {
        let pattern = NodePattern::parse(r"nsu=http://x/UA/;path=/A\/B/C;D/E\\F").unwrap();
        assert_eq!(pattern.namespace_uri, "http://x/UA/");
        assert_eq!(
            pattern.id,
            NodeIdPattern::Path(vec!["A/B".to_owned(), "C;D".to_owned(), r"E\F".to_owned()])
        );
    }

    #[test]
    fn browse_path_errors_point_at_problem() {
        let cases = [
            (
                "nsu=u;path=Line1",
                11,
                "browse path \"Line1\" does not start with \"/\"",
            ),
            (
                "nsu=u;path=/Line1//Press",
                18,
                "empty browse name in browse path",
            ),
            (
                "nsu=u;path=/Line1/",
                18,
                "browse path \"/Line1/\" ends without a browse name",
            ),
            (
                "nsu=u;path=/",
                12,
                "browse path \"/\" ends without a browse name",
            ),
            (r"nsu=u;path=/Li\ne", 14, "invalid escape in browse path"),
            ("nsu=;path=/Line1", 4, "empty namespace URI"),
            ("ns=2;path=/Line1", 0, "invalid node pattern"),
        ];
        for (text, offset, message) in cases {
            let error = NodePattern::parse_at(text).unwrap_err();
            assert_eq!(error.offset, Some(offset), "{text}");
            assert!(
                error.message.starts_with(message),
                "{text}: {}",
                error.message
            );
        }
    }

    #[test]
    fn browse_path_rejects_too_many_names() {
        let text = format!("nsu=u;path={}", "/N".repeat(MAX_PATH_SEGMENTS + 1));
        let error = NodePattern::parse_at(&text).unwrap_err();
        assert_eq!(error.offset, Some(11));
        assert_eq!(
            error.message,
            format!(
                "browse path \"{}\" has 33 browse names, more than the maximum 32",
                "/N".repeat(MAX_PATH_SEGMENTS + 1)
            )
        );
    }

    #[test]
    fn value_range_accepts_negative_bounds() {
        assert_eq!(
            ValueRange::parse("-10.5--2").unwrap(),
            ValueRange {
                low: -10.5,
                high: -2.0
            }
        );
        assert_eq!(
            ValueRange::parse("0-100").unwrap(),
            ValueRange {
                low: 0.0,
                high: 100.0
            }
        );
        assert_eq!(
            ValueRange::parse("7").unwrap(),
            ValueRange {
                low: 7.0,
                high: 7.0
            }
        );
    }

    #[test]
    fn value_range_rejects_reversed_bounds() {
        assert_eq!(
            ValueRange::parse("5-1").unwrap_err(),
            "range \"5-1\" ends before it starts; write a number or LOW-HIGH, such as \"0-100\""
        );
    }

    #[test]
    fn thumbprint_of_der_is_sha1() {
        let der = [0x30, 0x03, 0x02, 0x01, 0x01];
        let expected: [u8; 20] = sha1::Sha1::digest(der).into();
        assert_eq!(certificate_thumbprint(&der).unwrap(), expected);
    }
}
