//! The TOML shapes of `gateway.toml` and the rule files, as written. Values
//! that need checks beyond their TOML type stay strings or integers with their
//! spans here, so that validation can report every problem with its position.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

pub(super) type SpannedMap = Spanned<BTreeMap<Spanned<String>, Spanned<String>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GatewayFile {
    pub gateway: GatewaySection,
    #[serde(default)]
    pub listener: Vec<ListenerSection>,
    #[serde(default)]
    pub device: Vec<DeviceSection>,
    #[serde(default)]
    pub state: Vec<StateSection>,
    pub audit: Option<AuditSection>,
    pub metrics: Option<MetricsSection>,
    pub admin: Option<AdminSection>,
    #[serde(default)]
    pub collector: Vec<CollectorSection>,
    pub detect: Option<DetectSection>,
    #[serde(default)]
    pub tag: Vec<Spanned<TagSection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GatewaySection {
    pub name: Spanned<String>,
    pub timezone: Option<Spanned<String>>,
    pub rules: Option<Spanned<String>>,
    pub user: Option<Spanned<String>>,
    pub group: Option<Spanned<String>>,
    pub allow_root: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListenerSection {
    pub name: Spanned<String>,
    pub protocol: Option<Spanned<String>>,
    pub bind: Option<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
    pub on_deny: Option<Spanned<String>>,
    pub device: Option<Spanned<String>>,
    pub routes: Option<SpannedMap>,
    pub limits: Option<LimitsSection>,
    pub tls: Option<Spanned<ListenerTlsSection>>,
    pub opcua: Option<Spanned<OpcuaListenerSection>>,
    pub mirror_only: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OpcuaListenerSection {
    pub application_uri: Option<Spanned<String>>,
    pub certificate: Option<Spanned<String>>,
    pub private_key: Option<Spanned<String>>,
    pub client_ca: Option<Spanned<String>>,
    pub crl: Option<Vec<Spanned<String>>>,
    pub security_policies: Option<Spanned<Vec<Spanned<String>>>>,
    pub allow_none: Option<Spanned<bool>>,
    pub max_chunk_size: Option<Spanned<i64>>,
    pub max_chunk_count: Option<Spanned<i64>>,
    pub max_message_size: Option<Spanned<i64>>,
    pub open_rate: Option<Spanned<f64>>,
    pub open_burst: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListenerTlsSection {
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub client_ca: Option<Spanned<String>>,
    pub crl: Option<Vec<Spanned<String>>>,
    pub handshake_timeout_ms: Option<Spanned<i64>>,
    pub max_handshakes_per_source: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitsSection {
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_source: Option<Spanned<i64>>,
    pub idle_timeout_ms: Option<Spanned<i64>>,
    pub frame_timeout_ms: Option<Spanned<i64>>,
    pub max_pending: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeviceSection {
    pub name: Spanned<String>,
    pub protocol: Option<Spanned<String>>,
    pub address: Option<Spanned<String>>,
    pub unit: Option<Spanned<i64>>,
    pub timeout_ms: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_in_flight: Option<Spanned<i64>>,
    pub connect_timeout_ms: Option<Spanned<i64>>,
    pub backoff_max_ms: Option<Spanned<i64>>,
    pub mirror: Option<Vec<Spanned<MirrorSection>>>,
    pub tls: Option<Spanned<DeviceTlsSection>>,
    pub endpoint: Option<Spanned<String>>,
    pub security_policy: Option<Spanned<String>>,
    pub security_mode: Option<Spanned<String>>,
    pub username: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
}

/// One block of a device's `mirror` list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MirrorSection {
    pub kind: Option<Spanned<String>>,
    pub start: Option<Spanned<i64>>,
    pub count: Option<Spanned<i64>>,
    pub poll_ms: Option<Spanned<i64>>,
    pub max_age_ms: Option<Spanned<i64>>,
    pub stale: Option<Spanned<String>>,
}

/// One `[[tag]]` section: a typed value over a device's mirror block.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TagSection {
    pub name: Option<Spanned<String>>,
    pub device: Option<Spanned<String>>,
    pub kind: Option<Spanned<String>>,
    pub address: Option<Spanned<i64>>,
    #[serde(rename = "type")]
    pub data_type: Option<Spanned<String>>,
    pub length: Option<Spanned<i64>>,
    pub bit: Option<Spanned<i64>>,
    pub order: Option<Spanned<String>>,
    /// Integers and floats alike, so that `scale = 10` is accepted.
    pub scale: Option<Spanned<toml::Value>>,
    pub offset: Option<Spanned<toml::Value>>,
    pub unit: Option<Spanned<String>>,
    pub access: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeviceTlsSection {
    pub ca: Option<Spanned<String>>,
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub server_name: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StateSection {
    pub name: Spanned<String>,
    pub device: Option<Spanned<String>>,
    pub holding_register: Option<Spanned<i64>>,
    pub input_register: Option<Spanned<i64>>,
    pub coil: Option<Spanned<i64>>,
    pub discrete_input: Option<Spanned<i64>>,
    pub poll_ms: Option<Spanned<i64>>,
    pub max_age_ms: Option<Spanned<i64>>,
    pub values: Option<SpannedMap>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditSection {
    pub path: Option<Spanned<String>>,
    pub sync: Option<Spanned<String>>,
    pub seal_every: Option<Spanned<i64>>,
    pub seal_interval_ms: Option<Spanned<i64>>,
    pub segment_bytes: Option<Spanned<i64>>,
    pub retention_days: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AdminSection {
    pub socket: Spanned<String>,
    pub group: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MetricsSection {
    pub bind: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CollectorSection {
    pub name: Spanned<String>,
    pub transport: Option<Spanned<String>>,
    pub url: Option<Spanned<String>>,
    pub address: Option<Spanned<String>>,
    pub events: Option<Spanned<String>>,
    pub spool: Option<Spanned<String>>,
    pub spool_max_bytes: Option<Spanned<i64>>,
    pub on_full: Option<Spanned<String>>,
    pub tls: Option<Spanned<CollectorTlsSection>>,
    pub batch_max: Option<Spanned<i64>>,
    pub timeout_ms: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CollectorTlsSection {
    pub ca: Option<Spanned<String>>,
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleFile {
    pub vendor: VendorSection,
    #[serde(default)]
    pub allow: Vec<AllowSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VendorSection {
    pub name: Spanned<String>,
    pub sources: Option<Vec<Spanned<String>>>,
    pub max_sessions: Option<Spanned<i64>>,
    pub certificate_cn: Option<Vec<Spanned<String>>>,
    pub certificate_san: Option<Vec<Spanned<String>>>,
    pub certificate_sha256: Option<Vec<Spanned<String>>>,
    pub modbus_role: Option<Vec<Spanned<String>>>,
    pub opcua_users: Option<Vec<Spanned<OpcuaUserSection>>>,
    pub opcua_user_certificates: Option<Vec<Spanned<String>>>,
    pub opcua_anonymous: Option<Spanned<bool>>,
    pub rate: Option<Spanned<RateSection>>,
    pub on_anomaly: Option<OnAnomalySection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DetectSection {
    pub window_ms: Option<Spanned<i64>>,
    pub function_scan: Option<Spanned<i64>>,
    pub unit_scan: Option<Spanned<i64>>,
    pub address_sweep: Option<Spanned<i64>>,
    pub denial_burst: Option<Spanned<i64>>,
    pub exception_storm: Option<Spanned<i64>>,
    pub auth_failure_burst: Option<Spanned<i64>>,
    pub browse_sweep: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OnAnomalySection {
    #[serde(default)]
    pub kinds: Vec<Spanned<String>>,
    pub count: Option<Spanned<i64>>,
    pub window_ms: Option<Spanned<i64>>,
    pub quarantine_ms: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RateSection {
    pub requests_per_second: Option<Spanned<f64>>,
    pub writes_per_second: Option<Spanned<f64>>,
    pub burst: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AllowSection {
    pub device: Spanned<String>,
    pub functions: Option<Spanned<Vec<Spanned<Scalar>>>>,
    pub addresses: Option<Spanned<ScalarList>>,
    pub values: Option<Spanned<ScalarList>>,
    pub sub_functions: Option<Vec<Spanned<i64>>>,
    pub mei_types: Option<Vec<Spanned<i64>>>,
    pub quantity: Option<Spanned<Scalar>>,
    pub when: Option<WhenSection>,
    pub rate: Option<Spanned<RateSection>>,
    pub services: Option<Spanned<Vec<Spanned<String>>>>,
    pub nodes: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OpcuaUserSection {
    pub username: Spanned<String>,
    pub password_hash: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WhenSection {
    pub state: Option<SpannedMap>,
    pub schedule: Option<Vec<Spanned<String>>>,
    pub window: Option<Vec<Spanned<String>>>,
    pub sources: Option<Vec<Spanned<String>>>,
    pub role: Option<Vec<Spanned<String>>>,
}

/// A value written either as a string or as an integer, such as a function
/// (`"read_coils"` or `3`) or an address (`"0-999"` or `5`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Scalar {
    Text(String),
    Integer(i64),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Text(text) => write!(f, "\"{text}\""),
            Scalar::Integer(number) => write!(f, "{number}"),
        }
    }
}

struct ScalarVisitor;

impl Visitor<'_> for ScalarVisitor {
    type Value = Scalar;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or an integer")
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Scalar, E> {
        Ok(Scalar::Integer(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Scalar, E> {
        i64::try_from(value)
            .map(Scalar::Integer)
            .map_err(|_| E::custom(format!("integer {value} is too large")))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Scalar, E> {
        Ok(Scalar::Text(value.to_owned()))
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// One scalar or a list of them, as `values = "0-5000"` or
/// `values = ["0-10", "20"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ScalarList {
    One(Scalar),
    Many(Vec<Spanned<Scalar>>),
}

struct ScalarListVisitor;

impl<'de> Visitor<'de> for ScalarListVisitor {
    type Value = ScalarList;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, an integer or a list of them")
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<ScalarList, E> {
        ScalarVisitor.visit_i64(value).map(ScalarList::One)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<ScalarList, E> {
        ScalarVisitor.visit_u64(value).map(ScalarList::One)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<ScalarList, E> {
        ScalarVisitor.visit_str(value).map(ScalarList::One)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ScalarList, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Scalar>>()? {
            items.push(item);
        }
        Ok(ScalarList::Many(items))
    }
}

impl<'de> Deserialize<'de> for ScalarList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarListVisitor)
    }
}
