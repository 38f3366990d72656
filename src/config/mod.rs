//! Reading `gateway.toml` and the rule files it names into validated types.
//! Every problem of every file is collected and reported at once with its
//! file, line and column. The compiled snapshot and `decide()` live in
//! `policy`, which builds on these types.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

mod collector;
mod detect;
mod diagnostic;
mod gateway;
mod mirror;
mod opcua;
mod raw;
mod rules;
mod service;
mod syntax;
mod tag;
#[cfg(test)]
mod tests;
mod tls;

pub use detect::{
    DetectConfig, Detection, OnAnomalyConfig, Threshold, CONTAINABLE_KINDS, DEFAULT_WINDOW,
};
pub use diagnostic::{Diagnostic, Diagnostics, Origin};
pub use mirror::kind_name;
pub use opcua::{
    certificate_der, certificate_thumbprint, NodeIdPattern, NodePattern, OpcuaDeviceConfig,
    OpcuaGuardLimits, OpcuaListenerConfig, OpcuaRuleConfig, OpcuaService, OpcuaUser,
    UaSecurityMode, UaSecurityPolicy, ValueRange,
};
pub use service::{load_service, AdminConfig, ServiceConfig, MAX_SOCKET_PATH};
pub use syntax::{function_code, function_name, MAX_FUNCTION_CODE};
pub use tag::{
    RegisterOrder, TagAccess, TagConfig, TagType, MAX_STRING_LENGTH,
    NAMESPACE_URI as TAG_NAMESPACE_URI,
};
pub use tls::{DeviceTls, ExpiryKind, ListenerTls, TlsClient, TlsExpiry, TlsServer};

/// A validated configuration: `gateway.toml` plus every rule file. Names
/// still refer to each other by text; `policy` resolves them to indices.
#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub listeners: Vec<ListenerConfig>,
    pub devices: Vec<DeviceConfig>,
    /// Devices with `protocol = "opcua"`.
    pub opcua_devices: Vec<OpcuaDeviceConfig>,
    pub states: Vec<StateConfig>,
    pub audit: AuditConfig,
    pub metrics: Option<MetricsConfig>,
    /// The `[[tag]]` sections, in file order.
    pub tags: Vec<TagConfig>,
    /// Vendors in rule file name order.
    pub vendors: Vec<VendorConfig>,
    /// Every file read, the gateway file first.
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub name: String,
    pub timezone: jiff::tz::TimeZone,
    /// The rules folder, resolved against the gateway file's folder.
    pub rules_dir: PathBuf,
}

/// Whether a listener enforces decisions or only records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    /// Decides and records as `Enforce` does, but forwards denied requests too.
    Monitor,
}

/// The action a listener takes on a denied request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDeny {
    /// Sends a Modbus exception response with the code of the deny reason.
    Exception,
    /// Sends no response.
    Drop,
    /// Closes the client connection.
    Close,
}

/// Resource bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    /// A connection without a request for this long is closed.
    pub idle_timeout: Duration,
    /// A frame whose first byte arrived must be complete within this time.
    pub frame_timeout: Duration,
    /// Requests of one session waiting for a response.
    pub max_pending: usize,
}

impl Default for ListenerLimits {
    /// Returns limits for a plant network: a few dozen clients, and PLCs that
    /// each take a handful of requests at a time.
    fn default() -> Self {
        ListenerLimits {
            max_connections: 64,
            max_connections_per_source: 8,
            idle_timeout: Duration::from_millis(300_000),
            frame_timeout: Duration::from_millis(5_000),
            max_pending: 16,
        }
    }
}

/// The destination of a listener's requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerTarget {
    /// One device, for any unit id.
    Device(String),
    /// A device per unit id; unit ids without an entry have no route.
    Routes(Vec<(u8, String)>),
    /// No device: an OPC UA listener that serves only the Modbus tags.
    TagsOnly,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub mode: Mode,
    pub on_deny: OnDeny,
    pub target: ListenerTarget,
    pub limits: ListenerLimits,
    /// Never forwards to a device: reads inside a fresh mirror block are
    /// served from memory and every other request is denied.
    pub mirror_only: bool,
    /// Set on a `modbus-tls` listener, which identifies vendors by their
    /// client certificate.
    pub tls: Option<ListenerTls>,
    /// The server settings of an `opcua` listener; `None` for Modbus.
    pub opcua: Option<OpcuaListenerConfig>,
    pub origin: Origin,
}

#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub name: String,
    pub address: SocketAddr,
    pub unit: u8,
    pub timeout: Duration,
    pub max_connections: usize,
    pub max_in_flight: usize,
    pub connect_timeout: Duration,
    pub backoff_max: Duration,
    /// Blocks polled into memory, sorted by table and first address; blocks
    /// of one table never overlap.
    pub mirror: Vec<MirrorBlockConfig>,
    /// Set for a device that speaks MODBUS/TCP Security.
    pub tls: Option<DeviceTls>,
    pub origin: Origin,
}

impl DeviceConfig {
    /// Returns a device with the documented defaults.
    pub fn new(name: &str, address: SocketAddr) -> Self {
        DeviceConfig {
            name: name.to_owned(),
            address,
            unit: 1,
            timeout: Duration::from_millis(1_000),
            max_connections: 1,
            max_in_flight: 1,
            connect_timeout: Duration::from_millis(3_000),
            backoff_max: Duration::from_millis(30_000),
            mirror: Vec::new(),
            tls: None,
            origin: Origin::unknown(),
        }
    }
}

/// The Modbus table an operational state is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    HoldingRegister,
    InputRegister,
    Coil,
    DiscreteInput,
}

/// The handling of a read of a mirror block while the block's data is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStale {
    /// The read goes to the device as if there were no mirror.
    Forward,
    /// The read gets exception 0x0B (gateway target device failed to respond).
    Exception,
}

/// One `mirror` block of a device: a range of one table that sluice polls
/// and serves reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorBlockConfig {
    pub kind: StateKind,
    pub start: u16,
    /// Addresses in the block, 1 to 65536 - `start`.
    pub count: u32,
    pub poll: Duration,
    /// Data older than this is stale.
    pub max_age: Duration,
    pub stale: OnStale,
}

impl MirrorBlockConfig {
    /// Returns the address after the block's last one.
    pub fn end(&self) -> u32 {
        u32::from(self.start) + self.count
    }
}

/// A raw value range and the state value name it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateValueConfig {
    pub raw: Range16,
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub name: String,
    pub device: String,
    pub kind: StateKind,
    pub address: u16,
    pub poll: Duration,
    /// A reading older than this is unknown.
    pub max_age: Duration,
    /// Non-overlapping raw ranges, sorted by first value.
    pub values: Vec<StateValueConfig>,
    pub origin: Origin,
}

/// The flush policy of the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditSync {
    /// Records are flushed in batches, each on disk within a short delay.
    Batch,
    /// Every record is synced before its request goes on.
    Always,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The audit folder, resolved against the gateway file's folder.
    pub path: PathBuf,
    pub sync: AuditSync,
    /// Records between two seals.
    pub seal_every: u64,
    /// Maximum time between two seals while records arrive.
    pub seal_interval: Duration,
    /// Size at which a segment is closed and a new one started, in bytes.
    pub segment_bytes: u64,
    /// Age past which whole old segments are removed; 0 keeps everything.
    pub retention_days: u32,
    /// The `[[collector]]` sections. Collectors receive copies of the audit
    /// stream, so their settings travel with the audit settings.
    pub collectors: Vec<CollectorConfig>,
}

impl AuditConfig {
    /// Returns the settings for `path` with every other key at its default.
    pub fn new(path: PathBuf) -> AuditConfig {
        AuditConfig {
            path,
            sync: AuditSync::Batch,
            seal_every: 1000,
            seal_interval: Duration::from_secs(60),
            segment_bytes: 64 * 1024 * 1024,
            retention_days: 365,
            collectors: Vec::new(),
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub bind: SocketAddr,
}

/// The destination of a collector's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CollectorTarget {
    /// JSON array batches sent by HTTPS POST to `url`.
    Https {
        url: String,
        /// Host name or IP address, without IPv6 brackets.
        host: String,
        port: u16,
        path: String,
    },
    /// RFC 5425 syslog over TLS.
    SyslogTls { host: String, port: u16 },
}

/// The set of events a collector receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectorEvents {
    /// Anomalies and audit seal records.
    Anomalies,
    All,
}

/// The policy of a full spool for a new event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFull {
    /// Drops the oldest unsent events to make room.
    DropOldest,
    /// Leaves the new event out of the spool; it stays in the audit log only.
    KeepInAudit,
}

/// TLS files of a collector, resolved against the gateway file's folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CollectorTls {
    /// CA bundle that verifies the collector; the system bundle when unset.
    pub ca: Option<PathBuf>,
    /// Client certificate chain, presented when set together with `key`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorConfig {
    pub name: String,
    pub target: CollectorTarget,
    pub events: CollectorEvents,
    /// The spool folder, resolved against the gateway file's folder.
    pub spool: PathBuf,
    pub spool_max_bytes: u64,
    pub on_full: OnFull,
    pub tls: CollectorTls,
    /// Largest number of events in one delivery.
    pub batch_max: usize,
    /// Maximum time a connection or one delivery may take.
    pub timeout: Duration,
    pub origin: Origin,
}

#[derive(Debug, Clone)]
pub struct VendorConfig {
    pub name: String,
    /// File name of the rule file, such as `acme.toml`, used in rule labels.
    pub file_name: String,
    /// Networks this vendor connects from, with host bits cleared.
    pub sources: Vec<IpNet>,
    pub max_sessions: Option<usize>,
    /// The certificate matchers. A vendor with any is identified only on
    /// TLS listeners, never by source address alone.
    pub certificate: crate::identity::certificate::CertificateMatchers,
    /// Limits on every request of this vendor, decided or denied.
    pub rate: Option<RateConfig>,
    pub rules: Vec<RuleConfig>,
    /// Users identified by username and password on OPC UA listeners.
    pub opcua_users: Vec<OpcuaUser>,
    /// SHA-1 thumbprints of X.509 user certificates on OPC UA listeners.
    pub opcua_user_certificates: Vec<[u8; 20]>,
    /// Anonymous OPC UA sessions are this vendor. At most one vendor of a
    /// policy sets it.
    pub opcua_anonymous: bool,
    pub origin: Origin,
}

impl VendorConfig {
    /// Returns true when the vendor is identified on OPC UA listeners by a
    /// user token.
    pub fn has_opcua_identity(&self) -> bool {
        !self.opcua_users.is_empty()
            || !self.opcua_user_certificates.is_empty()
            || self.opcua_anonymous
    }
}

/// A request rate in thousandths of a request per second, so that limits
/// below one request per second can be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate {
    pub millis_per_second: u64,
}

impl Rate {
    /// Returns a rate of `n` requests per second.
    pub fn per_second(n: u64) -> Self {
        Rate {
            millis_per_second: n * 1000,
        }
    }
}

impl std::fmt::Display for Rate {
    /// Writes the rate in requests per second, with up to three decimals.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let whole = self.millis_per_second / 1000;
        let fraction = self.millis_per_second % 1000;
        if fraction == 0 {
            return write!(f, "{whole}");
        }
        let digits = format!("{fraction:03}");
        write!(f, "{whole}.{}", digits.trim_end_matches('0'))
    }
}

/// Token bucket limits of a vendor or a rule. Each present rate is its own
/// bucket; writes count against both buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateConfig {
    pub requests_per_second: Option<Rate>,
    /// Limit on requests of the writing functions 5, 6, 15, 16, 21, 22, 23.
    pub writes_per_second: Option<Rate>,
    /// Requests a full bucket allows at once; `None` means one second's
    /// worth of each bucket's rate, at least 1.
    pub burst: Option<u32>,
}

/// An inclusive range of 16-bit values: addresses, register values,
/// quantities or raw state values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range16 {
    pub first: u16,
    pub last: u16,
}

impl Range16 {
    pub fn new(first: u16, last: u16) -> Self {
        Range16 { first, last }
    }

    pub fn contains(&self, value: u16) -> bool {
        self.first <= value && value <= self.last
    }

    pub fn overlaps(&self, other: &Range16) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// A weekly window in the gateway's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeeklyWindow {
    /// Days the window starts on: bit 0 is Monday, bit 6 is Sunday.
    pub days: u8,
    /// Start, in minutes since local midnight.
    pub start: u16,
    /// End, exclusive, in minutes since local midnight (1440 for 24:00).
    /// An end at or before the start continues on the next day.
    pub end: u16,
}

/// A dated window of local times in the gateway's time zone; the end is
/// exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatedWindow {
    pub start: jiff::civil::DateTime,
    pub end: jiff::civil::DateTime,
}

/// Conditions under which a rule applies; all present conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WhenConfig {
    /// State name and the value it must have.
    pub state: Vec<(String, String)>,
    /// Any one of these must contain the current time, when set. An empty
    /// list never matches.
    pub schedule: Option<Vec<WeeklyWindow>>,
    /// Any one of these must contain the current time, when set. An empty
    /// list never matches.
    pub window: Option<Vec<DatedWindow>>,
    /// The client's source address must be in one of these, when set.
    pub sources: Option<Vec<IpNet>>,
    /// The Modbus role of the client certificate must be one of these, when
    /// set. A session without a role never matches.
    pub role: Option<Vec<String>>,
}

/// One `[[allow]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleConfig {
    pub device: String,
    /// Function codes, each 1..=127.
    pub functions: Vec<u8>,
    /// Addresses the rule covers; empty when the key is missing, so that
    /// functions which touch addresses never match.
    pub addresses: Vec<Range16>,
    /// Allowed written values; `None` leaves written values unrestricted.
    pub values: Option<Vec<Range16>>,
    /// Allowed FC 8 sub-functions; `None` allows all except 4 (force listen
    /// only mode), which must be named.
    pub sub_functions: Option<Vec<u16>>,
    /// Allowed FC 43 MEI types; `None` allows all.
    pub mei_types: Option<Vec<u8>>,
    /// Allowed quantity of read or written items per request.
    pub quantity: Option<Range16>,
    pub when: WhenConfig,
    /// Limits on the requests this rule allows.
    pub rate: Option<RateConfig>,
    /// The services and nodes of a rule for an OPC UA device, whose Modbus
    /// fields are then empty.
    pub opcua: Option<OpcuaRuleConfig>,
    pub origin: Origin,
}

impl RuleConfig {
    /// Returns a rule for `device` and `functions` without further limits.
    pub fn new(device: &str, functions: &[u8]) -> Self {
        RuleConfig {
            device: device.to_owned(),
            functions: functions.to_vec(),
            addresses: Vec::new(),
            values: None,
            sub_functions: None,
            mei_types: None,
            quantity: None,
            when: WhenConfig::default(),
            rate: None,
            opcua: None,
            origin: Origin::unknown(),
        }
    }
}

/// Loads `gateway_file` and every rule file in its rules folder.
///
/// On success returns the configuration and its warnings. Otherwise returns
/// every error and warning found in all files. A file with a syntax error
/// gives that one error, and the other files are still checked.
pub fn load(gateway_file: &Path) -> Result<(Config, Vec<Diagnostic>), Diagnostics> {
    load_with_detection(gateway_file).map(|(config, _, warnings)| (config, warnings))
}

/// Loads as `load` does, and also returns the anomaly detection settings.
pub fn load_with_detection(
    gateway_file: &Path,
) -> Result<(Config, Detection, Vec<Diagnostic>), Diagnostics> {
    let mut report = diagnostic::Report::default();
    let mut files = vec![gateway_file.to_path_buf()];

    // Without a readable gateway file there is no rules folder to read.
    let Some(gateway) = gateway::load(gateway_file, &mut report) else {
        return Err(report.into_diagnostics());
    };
    let mut on_anomaly = Vec::new();
    let vendors = rules::load(&gateway, &mut files, &mut report, &mut on_anomaly);
    let detection = Detection {
        detect: gateway.detect,
        on_anomaly,
    };

    let config = Config {
        gateway: gateway.gateway,
        listeners: gateway.listeners,
        devices: gateway.devices,
        opcua_devices: gateway.opcua_devices,
        states: gateway.states,
        audit: gateway.audit,
        metrics: gateway.metrics,
        tags: gateway.tags,
        vendors,
        files,
    };
    report
        .finish(config)
        .map(|(config, warnings)| (config, detection, warnings))
}
