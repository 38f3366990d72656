//! Loading tests: the shipped example files, the shapes of the design
//! examples, and every diagnostic with its exact position and text.

use std::path::Path;

use super::*;
use crate::identity::test_pki::TestCa;

const GATEWAY: &str = r#"[gateway]
name = "edge-01"

[[listener]]
name = "scada"
bind = "127.0.0.1:5020"
routes = { 1 = "press-1", 2 = "oven-2" }

[[device]]
name = "press-1"
address = "127.0.0.1:5021"

[[device]]
name = "oven-2"
address = "127.0.0.1:5022"
unit = 2

[[state]]
name = "press-1-mode"
device = "press-1"
holding_register = 900
values = { 0 = "production", 1 = "maintenance" }
"#;

const ACME: &str = r#"[vendor]
name = "acme"
sources = ["10.50.0.0/16"]

[[allow]]
device = "press-1"
functions = ["read_holding_registers"]
addresses = ["0-999"]
"#;

/// Writes `gateway.toml` and the rule files into a new folder.
fn write(gateway: &str, rules: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.toml"), gateway).unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    for (name, text) in rules {
        std::fs::write(dir.path().join("rules").join(name), text).unwrap();
    }
    dir
}

/// Formats diagnostics with file names relative to `dir`, and `DIR` in
/// place of `dir` inside messages.
fn lines(dir: &Path, diagnostics: &[Diagnostic]) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    diagnostics
        .iter()
        .map(|d| d.to_string().replace(&prefix, ""))
        .collect()
}

fn load_ok(dir: &Path) -> (Config, Vec<String>) {
    match load(&dir.join("gateway.toml")) {
        Ok((config, warnings)) => (config, lines(dir, &warnings)),
        Err(diagnostics) => panic!("unexpected errors:\n{diagnostics}"),
    }
}

fn load_errors(dir: &Path) -> (Vec<String>, Vec<String>) {
    match load(&dir.join("gateway.toml")) {
        Ok(_) => panic!("configuration loaded without errors"),
        Err(diagnostics) => (
            lines(dir, &diagnostics.errors),
            lines(dir, &diagnostics.warnings),
        ),
    }
}

#[test]
fn shipped_example_files_load_cleanly() {
    let dir = write(
        include_str!("../../gateway.toml.example"),
        &[
            ("acme.toml", include_str!("../../rules/acme.toml")),
            ("historian.toml", include_str!("../../rules/historian.toml")),
        ],
    );
    let (config, warnings) = load_ok(dir.path());
    assert_eq!(warnings, Vec::<String>::new());

    assert_eq!(config.gateway.name, "edge-01");
    assert_eq!(config.gateway.rules_dir, dir.path().join("rules"));
    assert_eq!(config.listeners.len(), 1);
    let listener = &config.listeners[0];
    assert_eq!(listener.name, "scada");
    assert_eq!(listener.bind, "127.0.0.1:5020".parse().unwrap());
    assert_eq!(
        listener.target,
        ListenerTarget::Routes(vec![(1, "press-1".into())])
    );
    assert_eq!(config.devices[0].name, "press-1");
    assert_eq!(config.devices[0].address, "127.0.0.1:5021".parse().unwrap());
    assert_eq!(
        config.devices[0].mirror,
        [MirrorBlockConfig {
            kind: StateKind::InputRegister,
            start: 0,
            count: 1000,
            poll: Duration::from_millis(1_000),
            max_age: Duration::from_millis(3_000),
            stale: OnStale::Forward,
        }]
    );
    assert_eq!(config.states[0].kind, StateKind::HoldingRegister);
    assert_eq!(config.states[0].address, 900);
    assert_eq!(config.audit.path, dir.path().join("audit"));
    let vendors: Vec<(&str, &str, usize)> = config
        .vendors
        .iter()
        .map(|v| (v.name.as_str(), v.file_name.as_str(), v.rules.len()))
        .collect();
    assert_eq!(
        vendors,
        [("acme", "acme.toml", 2), ("historian", "historian.toml", 1)]
    );
    assert_eq!(
        config.vendors[0].rules[1].when.state,
        [("press-1-mode".to_owned(), "maintenance".to_owned())]
    );
    assert_eq!(
        config.files,
        [
            dir.path().join("gateway.toml"),
            dir.path().join("rules/acme.toml"),
            dir.path().join("rules/historian.toml"),
        ]
    );
}

#[test]
fn defaults_fill_missing_settings() {
    let dir = write(GATEWAY, &[("acme.toml", ACME)]);
    let (config, warnings) = load_ok(dir.path());
    assert_eq!(warnings, Vec::<String>::new());

    assert_eq!(config.gateway.timezone.iana_name(), Some("Europe/Brussels"));
    let listener = &config.listeners[0];
    assert_eq!(listener.mode, Mode::Enforce);
    assert_eq!(listener.on_deny, OnDeny::Exception);
    assert_eq!(listener.limits, ListenerLimits::default());
    assert_eq!(listener.limits.max_connections, 64);
    assert_eq!(listener.limits.max_connections_per_source, 8);
    assert_eq!(listener.limits.idle_timeout, Duration::from_secs(300));
    assert_eq!(listener.limits.frame_timeout, Duration::from_secs(5));
    assert_eq!(listener.limits.max_pending, 16);

    let device = &config.devices[0];
    assert_eq!(device.unit, 1);
    assert_eq!(device.timeout, Duration::from_millis(1000));
    assert_eq!(device.max_connections, 1);
    assert_eq!(device.max_in_flight, 1);
    assert_eq!(device.connect_timeout, Duration::from_millis(3000));
    assert_eq!(device.backoff_max, Duration::from_millis(30000));

    let state = &config.states[0];
    assert_eq!(state.poll, Duration::from_millis(1000));
    assert_eq!(state.max_age, Duration::from_millis(3000));
    assert_eq!(
        state.values,
        [
            StateValueConfig {
                raw: Range16::new(0, 0),
                name: "production".into()
            },
            StateValueConfig {
                raw: Range16::new(1, 1),
                name: "maintenance".into()
            },
        ]
    );
    assert_eq!(config.audit, AuditConfig::new(dir.path().join("audit")));
}

#[test]
fn explicit_settings_are_read() {
    let gateway = r#"[gateway]
name = "edge-02"
timezone = "America/New_York"
rules = "vendors"

[[listener]]
name = "north"
bind = "[::1]:1502"
mode = "monitor"
on_deny = "close"
device = "rtu"
limits = { max_connections = 4, max_connections_per_source = 2, idle_timeout_ms = 1000, frame_timeout_ms = 200, max_pending = 3 }

[[device]]
name = "rtu"
protocol = "modbus"
address = "10.0.0.5:502"
unit = 0
timeout_ms = 250
max_connections = 2
max_in_flight = 4
connect_timeout_ms = 500
backoff_max_ms = 8000

[[state]]
name = "level"
device = "rtu"
input_register = 7
poll_ms = 200
max_age_ms = 700
values = { "0-9" = "low", "10-19" = "high", "20" = "low" }

[audit]
path = "/var/lib/sluice/audit"
sync = "always"
"#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.toml"), gateway).unwrap();
    std::fs::create_dir(dir.path().join("vendors")).unwrap();
    let rules = "[vendor]\nname = \"x\"\nsources = [\"10.9.0.0/16\"]\nmax_sessions = 3\n";
    std::fs::write(dir.path().join("vendors/x.toml"), rules).unwrap();
    let (config, warnings) = load_ok(dir.path());
    assert_eq!(warnings, Vec::<String>::new());

    assert_eq!(
        config.gateway.timezone.iana_name(),
        Some("America/New_York")
    );
    assert_eq!(config.gateway.rules_dir, dir.path().join("vendors"));
    let listener = &config.listeners[0];
    assert_eq!(listener.bind, "[::1]:1502".parse().unwrap());
    assert_eq!(listener.mode, Mode::Monitor);
    assert_eq!(listener.on_deny, OnDeny::Close);
    assert_eq!(listener.target, ListenerTarget::Device("rtu".into()));
    assert_eq!(
        listener.limits,
        ListenerLimits {
            max_connections: 4,
            max_connections_per_source: 2,
            idle_timeout: Duration::from_millis(1000),
            frame_timeout: Duration::from_millis(200),
            max_pending: 3,
        }
    );
    let device = &config.devices[0];
    assert_eq!(device.unit, 0);
    assert_eq!(device.timeout, Duration::from_millis(250));
    assert_eq!(device.max_connections, 2);
    assert_eq!(device.max_in_flight, 4);
    assert_eq!(device.connect_timeout, Duration::from_millis(500));
    assert_eq!(device.backoff_max, Duration::from_millis(8000));
    let state = &config.states[0];
    assert_eq!(state.kind, StateKind::InputRegister);
    assert_eq!(state.max_age, Duration::from_millis(700));
    let raw: Vec<(u16, u16, &str)> = state
        .values
        .iter()
        .map(|v| (v.raw.first, v.raw.last, v.name.as_str()))
        .collect();
    assert_eq!(raw, [(0, 9, "low"), (10, 19, "high"), (20, 20, "low")]);
    assert_eq!(config.audit.path, Path::new("/var/lib/sluice/audit"));
    assert_eq!(config.audit.sync, AuditSync::Always);
    assert_eq!(config.vendors[0].max_sessions, Some(3));
}

#[test]
fn design_example_reports_missing_tls_files() {
    let gateway = r#"[gateway]
name = "edge-01"
timezone = "Europe/Brussels"
rules = "rules"

[[listener]]
name = "scada"
protocol = "modbus"
bind = "127.0.0.1:5020"
mode = "enforce"
on_deny = "exception"
routes = { 1 = "press-1", 2 = "oven-2" }

[[device]]
name = "press-1"
address = "127.0.0.1:5021"
unit = 1
timeout_ms = 1000
max_connections = 1

[[device]]
name = "oven-2"
address = "127.0.0.1:5022"

[[state]]
name = "press-1-mode"
device = "press-1"
holding_register = 900
poll_ms = 500
values = { 0 = "production", 1 = "maintenance" }

[[listener]]
name = "vendors"
protocol = "modbus-tls"
bind = "0.0.0.0:802"
device = "press-1"
tls = { cert = "tls/gateway.crt", key = "tls/gateway.key", client_ca = "tls/vendors-ca.crt", crl = ["tls/vendors.crl"] }

[audit]
path = "/var/lib/sluice/audit"
sync = "batch"

[[collector]]
name = "soc"
transport = "https"
url = "https://collector.example:8443/events"
events = "anomalies"
spool = "/var/lib/sluice/spool/soc"

[metrics]
bind = "127.0.0.1:9502"

[admin]
socket = "/run/sluice/control.sock"
"#;
    let acme = r#"[vendor]
name = "acme"
sources = ["10.50.0.0/16"]
certificate_cn = ["acme-*"]

[[allow]]
device = "press-1"
functions = ["read_holding_registers", "read_input_registers"]
addresses = ["0-999"]

[[allow]]
device = "press-1"
functions = ["write_single_register", "write_multiple_registers"]
addresses = ["100-119"]
values = "0-5000"
when.state = { "press-1-mode" = "maintenance" }
when.schedule = ["Mon-Fri 07:00-17:00"]
"#;
    let dir = write(gateway, &[("acme.toml", acme)]);
    let (errors, warnings) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "gateway.toml:37:16: listener[2].tls.cert: failed to read certificates from tls/gateway.crt: I/O error: No such file or directory (os error 2); give a PEM certificate chain",
            "gateway.toml:37:72: listener[2].tls.client_ca: failed to read certificates from tls/vendors-ca.crt: I/O error: No such file or directory (os error 2); give a PEM CA bundle",
            "gateway.toml:37:101: listener[2].tls.crl[1]: failed to read a CRL from tls/vendors.crl: I/O error: No such file or directory (os error 2); give a PEM CRL",
            "gateway.toml:37:41: listener[2].tls.key: failed to read a private key from tls/gateway.key: I/O error: No such file or directory (os error 2); give a PEM private key",
        ]
    );
    assert_eq!(warnings, Vec::<String>::new());
}

#[test]
fn gateway_problems_are_all_reported_with_positions() {
    let gateway = r#"[gateway]
name = "edge-01"
timezone = "Europe/Brusels"

[[listener]]
name = "scada"
bind = "127.0.0.1:502x"
mode = "enforse"
routes = { 1 = "press-1", 300 = "press-1", 2 = "oven-3" }

[[listener]]
name = "scada"
bind = "127.0.0.1:5021"
device = "press-1"
routes = { 1 = "press-1" }

[[listener]]
name = "ops"
bind = "127.0.0.1:5022"

[[device]]
name = "press-1"
address = "127.0.0.1:5021"
unit = 256

[[device]]
name = "press-1"
address = "plc.local:502"
"#;
    let dir = write(gateway, &[]);
    let (errors, warnings) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "gateway.toml:3:12: gateway.timezone: unknown time zone \"Europe/Brusels\"; use an IANA name such as \"Europe/Brussels\"",
            "gateway.toml:24:8: device[1].unit: 256 outside 0..=255; set a value from 0 to 255",
            "gateway.toml:27:8: device[2].name: duplicate device \"press-1\", first defined at gateway.toml:22:8; device names must be unique",
            "gateway.toml:28:11: device[2].address: invalid socket address \"plc.local:502\"; use IP:PORT, such as \"10.0.0.5:502\"",
            "gateway.toml:7:8: listener[1].bind: invalid socket address \"127.0.0.1:502x\"; use IP:PORT, such as \"127.0.0.1:5020\"",
            "gateway.toml:8:8: listener[1].mode: invalid value \"enforse\"; use one of \"enforce\", \"monitor\"",
            "gateway.toml:9:48: listener[1].routes.\"2\": unknown device \"oven-3\"; known devices: press-1",
            "gateway.toml:9:27: listener[1].routes.\"300\": invalid unit id \"300\"; use a unit id from 0 to 255",
            "gateway.toml:12:8: listener[2].name: duplicate listener \"scada\", first defined at gateway.toml:6:8; listener names must be unique",
            "gateway.toml:15:10: listener[2]: both device and routes are set; keep one of them",
            "gateway.toml:18:8: listener[3]: neither device nor routes is set; add device = \"NAME\" or routes = { 1 = \"NAME\" }",
        ]
    );
    assert_eq!(
        warnings,
        ["gateway.toml:2:8: gateway.rules: no *.toml files in \"rules\", so every request is denied"]
    );
}

#[test]
fn state_problems_are_reported() {
    let gateway = r#"[gateway]
name = "edge-01"

[[device]]
name = "press-1"
address = "127.0.0.1:5021"

[[state]]
name = "door"
device = "press-1"
coil = 3
values = { 0 = "closed", 2 = "open" }

[[state]]
name = "mode"
device = "press-2"
holding_register = 1
input_register = 2
values = { "0-10" = "a", "5-20" = "b" }

[[state]]
name = "level"
device = "press-1"
poll_ms = 1000
max_age_ms = 500
"#;
    let dir = write(gateway, &[]);
    let (errors, warnings) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "gateway.toml:12:26: state[1].values.\"2\": a coil or discrete input reads 0 or 1; use \"0\" or \"1\"",
            "gateway.toml:16:10: state[2].device: unknown device \"press-2\"; known devices: press-1",
            "gateway.toml:18:18: state[2].input_register: a state reads one address; keep only one of holding_register, input_register, coil or discrete_input",
            "gateway.toml:19:26: state[2].values: raw values 5-20 overlap 0-10 at gateway.toml:19:12; map each raw value once",
            "gateway.toml:22:8: state[3]: no address; set one of holding_register, input_register, coil or discrete_input",
            "gateway.toml:22:8: state[3].values: missing; map raw values to names, as { 0 = \"production\", 1 = \"maintenance\" }",
        ]
    );
    assert_eq!(
        warnings,
        [
            "gateway.toml:25:14: state[3].max_age_ms: 500 is shorter than poll_ms 1000, so the state is unknown between polls; set it to at least 2 × poll_ms",
            "gateway.toml:2:8: gateway.rules: no *.toml files in \"rules\", so every request is denied",
        ]
    );
}

#[test]
fn rule_problems_are_all_reported_with_positions() {
    let rules = r#"[vendor]
name = "acme"
sources = ["10.50.0.0/16", "10.60.0.0/33"]

[[allow]]
device = "pres-1"
functions = ["read_holding_register", 3, 200]
addresses = ["20-10", "0-70000", "5"]

[[allow]]
device = "press-1"
functions = ["write_single_register"]
addresses = "100-119"
values = "0-5000"
when.state = { "press-1-mode" = "maintenanc", "oven-mode" = "on" }
when.schedule = ["Mon-Fry 07:00-17:00"]
when.window = ["2026-12-10T12:00/2026-12-10T08:00"]
"#;
    let dir = write(GATEWAY, &[("acme.toml", rules)]);
    let (errors, warnings) = load_errors(dir.path());
    let names = syntax::function_names();
    assert_eq!(
        errors,
        [
            "rules/acme.toml:3:28: vendor.sources[2]: invalid network \"10.60.0.0/33\"; use CIDR notation, such as \"10.50.0.0/16\"".to_owned(),
            "rules/acme.toml:6:10: allow[1].device: unknown device \"pres-1\"; known devices: press-1, oven-2".to_owned(),
            format!("rules/acme.toml:7:14: allow[1].functions[1]: unknown function \"read_holding_register\"; use a code from 1 to 127 or one of: {names}"),
            "rules/acme.toml:7:42: allow[1].functions[3]: function code 200 outside 1..=127; use a code from 1 to 127 or a function name".to_owned(),
            "rules/acme.toml:8:14: allow[1].addresses[1]: inverted range \"20-10\"; write the smaller number first, as \"10-20\"".to_owned(),
            "rules/acme.toml:8:23: allow[1].addresses[2]: 70000 in \"0-70000\" exceeds 65535, the largest Modbus address and register value".to_owned(),
            "rules/acme.toml:15:47: allow[2].when.state: unknown state \"oven-mode\"; known states: press-1-mode".to_owned(),
            "rules/acme.toml:15:33: allow[2].when.state.\"press-1-mode\": state \"press-1-mode\" has no value \"maintenanc\"; its values: maintenance, production".to_owned(),
            "rules/acme.toml:16:18: allow[2].when.schedule[1]: invalid schedule \"Mon-Fry 07:00-17:00\"; write DAYS HH:MM-HH:MM with days Mon..Sun, such as \"Mon-Fri 07:00-17:00\" or \"Sat,Sun 22:00-06:00\"".to_owned(),
            "rules/acme.toml:17:16: allow[2].when.window[1]: empty or inverted window \"2026-12-10T12:00/2026-12-10T08:00\"; the end must come after the start".to_owned(),
        ]
    );
    assert_eq!(warnings, Vec::<String>::new());
}

#[test]
fn problems_of_every_file_are_reported_together() {
    let gateway = GATEWAY.replace("bind = \"127.0.0.1:5020\"", "bind = \"localhost\"");
    let broken = "[vendor]\nname = \"beta\"\nsources = [\"10.60.0.0/16\"\n";
    let unknown_key = "[vendor]\nname = \"gamma\"\nsource = [\"10.70.0.0/16\"]\n";
    let dir = write(
        &gateway,
        &[
            ("acme.toml", ACME),
            ("beta.toml", broken),
            ("gamma.toml", unknown_key),
        ],
    );
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "gateway.toml:6:8: listener[1].bind: invalid socket address \"localhost\"; use IP:PORT, such as \"127.0.0.1:5020\"",
            "rules/beta.toml:3:26: unclosed array, expected `]`",
            "rules/gamma.toml:3:1: unknown field `source`, expected one of `name`, `sources`, `max_sessions`, `certificate_cn`, `certificate_san`, `certificate_sha256`, `modbus_role`, `opcua_users`, `opcua_user_certificates`, `opcua_anonymous`, `rate`, `on_anomaly`",
        ]
    );
}

#[test]
fn overlapping_vendor_sources_are_an_error() {
    let beta = "[vendor]\nname = \"beta\"\nsources = [\"10.0.0.0/8\"]\n";
    let acme_again = "[vendor]\nname = \"acme\"\nsources = [\"192.168.0.0/24\"]\n";
    let dir = write(
        GATEWAY,
        &[
            ("acme.toml", ACME),
            ("beta.toml", beta),
            ("zeta.toml", acme_again),
        ],
    );
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "rules/zeta.toml:2:8: vendor.name: duplicate vendor \"acme\", first defined at rules/acme.toml:2:8; vendor names must be unique",
            "rules/acme.toml:3:12: vendor.sources[1]: 10.50.0.0/16 of vendor \"acme\" overlaps 10.0.0.0/8 of vendor \"beta\" at rules/beta.toml:3:12; a connection from the overlap would match both vendors, so narrow one of them",
        ]
    );
}

#[test]
fn disjoint_vendor_sources_load() {
    let beta = "[vendor]\nname = \"beta\"\nsources = [\"10.51.0.0/16\", \"fd00::/8\"]\n";
    let gamma = "[vendor]\nname = \"gamma\"\nsources = [\"10.49.255.255/32\", \"fe80::/10\"]\n";
    let dir = write(
        GATEWAY,
        &[
            ("acme.toml", ACME),
            ("beta.toml", beta),
            ("gamma.toml", gamma),
        ],
    );
    let (config, warnings) = load_ok(dir.path());
    assert_eq!(warnings, Vec::<String>::new());
    assert_eq!(config.vendors.len(), 3);
}

#[test]
fn rules_that_cannot_match_give_warnings() {
    let rules = r#"[vendor]
name = "acme"
sources = ["10.50.1.0/16"]

[[allow]]
device = "press-1"
functions = ["read_holding_registers"]
addresses = ["0-9"]
values = "0-5"

[[allow]]
device = "press-1"
functions = ["read_coils", "diagnostics"]
when.window = ["2001-01-01T08:00/2001-01-01T12:00"]
when.sources = ["192.168.0.0/24"]

[[allow]]
device = "press-1"
functions = [3]
addresses = "0-9"
sub_functions = [4]
mei_types = [14]
"#;
    let dir = write(GATEWAY, &[("acme.toml", rules)]);
    let (config, warnings) = load_ok(dir.path());
    assert_eq!(
        warnings,
        [
            "rules/acme.toml:3:12: vendor.sources[1]: \"10.50.1.0/16\" has host bits set and means 10.50.0.0/16; write 10.50.0.0/16 to make that explicit",
            "rules/acme.toml:9:10: allow[1].values: none of the functions (read_holding_registers) writes values, so the key has no effect; remove it",
            "rules/acme.toml:14:16: allow[2].when.window: every window is in the past, so the rule never matches; remove the rule or correct the dates",
            "rules/acme.toml:15:17: allow[2].when.sources: no network overlaps vendor.sources, so the rule never matches; list a network inside vendor.sources",
            "rules/acme.toml:12:10: allow[2].addresses: missing, so read_coils never match; list the allowed addresses, as [\"0-999\"]",
            "rules/acme.toml:21:18: allow[3].sub_functions: the rule does not allow diagnostics (8), so the key has no effect",
            "rules/acme.toml:22:14: allow[3].mei_types: the rule does not allow encapsulated_interface_transport (43), so the key has no effect",
        ]
    );
    assert_eq!(
        config.vendors[0].sources,
        ["10.50.0.0/16".parse::<IpNet>().unwrap()]
    );
    assert_eq!(config.vendors[0].rules[1].addresses, []);
}

#[test]
fn rule_values_accept_lists_and_integers() {
    let rules = r#"[vendor]
name = "acme"
sources = ["10.50.0.0/16"]

[[allow]]
device = "press-1"
functions = ["write_single_register", 16, "read_device_identification"]
addresses = [100, "110-119"]
values = ["0-10", 20]
quantity = "1-10"
sub_functions = [0, 1]
mei_types = [14]
when.schedule = ["Mon-Fri 07:00-17:00", "Sat 08:00-12:00"]
when.window = ["2030-12-10T08:00/2030-12-10T12:00"]
"#;
    let dir = write(GATEWAY, &[("acme.toml", rules)]);
    let (config, _) = load_ok(dir.path());
    let rule = &config.vendors[0].rules[0];
    assert_eq!(rule.functions, [6, 16, 43]);
    assert_eq!(
        rule.addresses,
        [Range16::new(100, 100), Range16::new(110, 119)]
    );
    assert_eq!(
        rule.values,
        Some(vec![Range16::new(0, 10), Range16::new(20, 20)])
    );
    assert_eq!(rule.quantity, Some(Range16::new(1, 10)));
    assert_eq!(rule.sub_functions, Some(vec![0, 1]));
    assert_eq!(rule.mei_types, Some(vec![14]));
    assert_eq!(rule.when.schedule.as_ref().map(Vec::len), Some(2));
    assert_eq!(rule.when.window.as_ref().map(Vec::len), Some(1));
    assert_eq!(rule.origin.line, 6);
    assert_eq!(rule.origin.column, 10);
}

#[test]
fn missing_gateway_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let error = load(&dir.path().join("gateway.toml")).unwrap_err();
    assert_eq!(
        lines(dir.path(), &error.errors),
        ["gateway.toml:1:1: failed to read the gateway file: No such file or directory (os error 2)"]
    );
}

#[test]
fn missing_rules_folder_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = GATEWAY.replace(
        "name = \"edge-01\"",
        "name = \"edge-01\"\nrules = \"vendor-rules\"",
    );
    std::fs::write(dir.path().join("gateway.toml"), gateway).unwrap();
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        ["gateway.toml:3:9: gateway.rules: failed to read the rules folder \"vendor-rules\": No such file or directory (os error 2); create it or set gateway.rules"]
    );
}

#[test]
fn max_in_flight_above_256_is_rejected() {
    let gateway = GATEWAY.replace(
        "address = \"127.0.0.1:5021\"",
        "address = \"127.0.0.1:5021\"\nmax_in_flight = 257",
    );
    let dir = write(&gateway, &[("acme.toml", ACME)]);
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        ["gateway.toml:12:17: device[1].max_in_flight: 257 outside 1..=256; set a value from 1 to 256"]
    );
}

#[test]
fn opcua_parts_mixed_with_modbus_are_named() {
    let gateway = GATEWAY.replace(
        "[[device]]\nname = \"oven-2\"",
        "[[device]]\nname = \"oven-2\"\nprotocol = \"opcua\"",
    );
    let rules = "[vendor]\nname = \"acme\"\nsources = [\"10.50.0.0/16\"]\nopcua_users = []\n\n[[allow]]\ndevice = \"press-1\"\nfunctions = [3]\naddresses = \"0-9\"\nnodes = [\"x\"]\n";
    let dir = write(&gateway, &[("acme.toml", rules)]);
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "gateway.toml:16:11: device[2].address: a Modbus key on an OPC UA device; remove it",
            "gateway.toml:17:8: device[2].unit: a Modbus key on an OPC UA device; remove it",
            "gateway.toml:14:8: device[2].endpoint: missing; set endpoint = \"opc.tcp://HOST:PORT\"",
            "gateway.toml:5:8: listener[1].routes.\"2\": \"oven-2\" is an OPC UA device; route unit ids to Modbus devices",
            "rules/acme.toml:7:10: allow[1].functions: a Modbus key in a rule with services and nodes, which allows tags; put Modbus access in an [[allow]] of its own",
            "rules/acme.toml:7:10: allow[1].addresses: a Modbus key in a rule with services and nodes, which allows tags; put Modbus access in an [[allow]] of its own",
            "rules/acme.toml:7:10: allow[1].services: missing; list the services the rule allows, as [\"browse\", \"read\"]",
            "rules/acme.toml:10:10: allow[1].nodes[1]: invalid node pattern \"x\"; write nsu=URI;s=GLOB, nsu=URI;i=NUMBER or nsu=URI;path=/NAME/NAME, such as \"nsu=urn:plant:line1;s=Line1.*\"",
        ]
    );
}

/// A gateway with one OPC UA listener mirroring one OPC UA device.
const OPCUA_GATEWAY: &str = r#"[gateway]
name = "edge-01"

[[listener]]
name = "ua"
protocol = "opcua"
bind = "127.0.0.1:4840"
device = "line1-ua"
opcua = { application_uri = "urn:sluice:edge-01", certificate = "pki/sluice-ua.crt", private_key = "pki/sluice-ua.key", security_policies = ["Basic256Sha256", "Aes256_Sha256_RsaPss"], client_ca = "pki/vendors-ca.crt" }

[[device]]
name = "line1-ua"
protocol = "opcua"
endpoint = "opc.tcp://127.0.0.1:4841"
timeout_ms = 1500

[[state]]
name = "line1-mode"
device = "line1-ua"
holding_register = 900
values = { 0 = "production", 1 = "maintenance" }
"#;

/// An argon2id hash of "secret", made with `sluice hash-password`.
const SECRET_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$aPTLRhxnnzv2bDxochbdsA$kBSPHWM0erQm2z0y69nORTzBce+jd2N6gmFV9eEOyK8";

#[test]
fn opcua_listener_device_and_rules_load() {
    let rules = format!(
        r#"[vendor]
name = "acme"
opcua_users = [{{ username = "acme-eng", password_hash = "{SECRET_HASH}" }}]

[[allow]]
device = "line1-ua"
services = ["browse", "read"]
nodes = ["nsu=urn:plant:line1;s=Line1.*", "nsu=urn:plant:line1;i=7"]

[[allow]]
device = "line1-ua"
services = ["write"]
nodes = ["nsu=urn:plant:line1;s=Line1.Setpoint"]
values = "0-100"
when.state = {{ "line1-mode" = "maintenance" }}
"#
    );
    let dir = write(OPCUA_GATEWAY, &[("acme.toml", &rules)]);
    let (config, warnings) = load(&dir.path().join("gateway.toml")).unwrap();
    assert_eq!(lines(dir.path(), &warnings), Vec::<String>::new());

    let listener = &config.listeners[0];
    let server = listener.opcua.as_ref().unwrap();
    assert_eq!(server.application_uri, "urn:sluice:edge-01");
    assert_eq!(server.certificate, dir.path().join("pki/sluice-ua.crt"));
    assert_eq!(
        server.security_policies,
        [
            UaSecurityPolicy::Basic256Sha256,
            UaSecurityPolicy::Aes256Sha256RsaPss
        ]
    );
    assert!(!server.allow_none);
    assert_eq!(
        server.client_ca,
        Some(dir.path().join("pki/vendors-ca.crt"))
    );
    assert_eq!(server.guard, crate::config::OpcuaGuardLimits::default());
    assert_eq!(listener.target, ListenerTarget::Device("line1-ua".into()));

    assert_eq!(config.devices.len(), 0);
    let device = &config.opcua_devices[0];
    assert_eq!(device.endpoint, "opc.tcp://127.0.0.1:4841");
    assert_eq!(device.security_policy, UaSecurityPolicy::None);
    assert_eq!(device.security_mode, UaSecurityMode::None);
    assert_eq!(device.timeout, std::time::Duration::from_millis(1500));

    let vendor = &config.vendors[0];
    assert_eq!(vendor.opcua_users[0].username, "acme-eng");
    let read = vendor.rules[0].opcua.as_ref().unwrap();
    assert_eq!(read.services, [OpcuaService::Browse, OpcuaService::Read]);
    assert_eq!(read.nodes[1].id, NodeIdPattern::Numeric(7));
    let write = vendor.rules[1].opcua.as_ref().unwrap();
    assert_eq!(
        write.values,
        Some(vec![ValueRange {
            low: 0.0,
            high: 100.0
        }])
    );
    assert_eq!(
        vendor.rules[1].when.state,
        [("line1-mode".to_owned(), "maintenance".to_owned())]
    );
}

#[test]
fn invalid_opcua_keys_are_reported_with_positions() {
    let gateway = OPCUA_GATEWAY
        .replace("\"Aes256_Sha256_RsaPss\"", "\"None\"")
        .replace(
            "timeout_ms = 1500",
            "security_policy = \"Basic256Sha256\"\nsecurity_mode = \"None\"",
        );
    let rules = r#"[vendor]
name = "acme"
opcua_users = [{ username = "acme-eng", password_hash = "plain" }]

[[allow]]
device = "line1-ua"
services = ["read", "delete"]
nodes = ["ns=2;s=Line1"]
functions = [3]
"#;
    let dir = write(&gateway, &[("acme.toml", rules)]);
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "gateway.toml:16:17: device[1].security_mode: security policy and mode disagree; use policy \"None\" with mode \"None\", and any other policy with \"Sign\" or \"SignAndEncrypt\"",
            "gateway.toml:9:160: listener[1].opcua.security_policies[2]: \"None\" is not a security policy for SignAndEncrypt; set allow_none = true to offer an endpoint without security",
            "rules/acme.toml:3:57: vendor.opcua_users[1].password_hash: invalid PHC string (password hash string missing field); create the hash with `sluice hash-password`",
            "rules/acme.toml:6:10: allow[1].functions: a Modbus key in a rule for an OPC UA device; use services and nodes",
            "rules/acme.toml:7:21: allow[1].services[2]: invalid value \"delete\"; use one of \"browse\", \"read\", \"write\", \"call\", \"subscribe\", \"history_read\"",
            "rules/acme.toml:8:10: allow[1].nodes[1]: invalid node pattern \"ns=2;s=Line1\"; write nsu=URI;s=GLOB, nsu=URI;i=NUMBER or nsu=URI;path=/NAME/NAME, such as \"nsu=urn:plant:line1;s=Line1.*\"",
        ]
    );
}

#[test]
fn opcua_listener_with_security_policies_needs_client_ca() {
    let gateway = OPCUA_GATEWAY.replace(", client_ca = \"pki/vendors-ca.crt\"", "");
    let dir = write(&gateway, &[]);
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        ["gateway.toml:9:9: listener[1].opcua.client_ca: missing; a listener that offers security_policies checks client application certificates against it, so set it to the CA bundle of your clients, or set security_policies = [] and allow_none = true to offer only the endpoint without security"]
    );
}

#[test]
fn opcua_guard_limits_are_read_and_checked() {
    let gateway = OPCUA_GATEWAY.replace(
        "client_ca = \"pki/vendors-ca.crt\" }",
        "client_ca = \"pki/vendors-ca.crt\", max_chunk_size = 8192, max_chunk_count = 8, max_message_size = 65536, open_rate = 0.5, open_burst = 3 }",
    );
    let dir = write(&gateway, &[]);
    let (config, _) = load(&dir.path().join("gateway.toml")).unwrap();
    assert_eq!(
        config.listeners[0].opcua.as_ref().unwrap().guard,
        crate::config::OpcuaGuardLimits {
            max_chunk_size: 8192,
            max_chunk_count: 8,
            max_message_size: 65536,
            open_rate: crate::config::Rate {
                millis_per_second: 500
            },
            open_burst: 3,
        }
    );

    let gateway = OPCUA_GATEWAY.replace(
        "client_ca = \"pki/vendors-ca.crt\" }",
        "client_ca = \"pki/vendors-ca.crt\", max_chunk_size = 1024, open_rate = 0.0 }",
    );
    let dir = write(&gateway, &[]);
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "gateway.toml:9:236: listener[1].opcua.max_chunk_size: 1024 outside 8192..=16777216; set a value from 8192 to 16777216",
            "gateway.toml:9:254: listener[1].opcua.open_rate: 0 outside 0.001..=10000; set OpenSecureChannel requests per second, such as 5 or 0.5",
        ]
    );
}

#[test]
fn partly_unmatchable_and_empty_conditions_give_warnings() {
    let rules = r#"[vendor]
name = "acme"
sources = ["10.50.0.0/16"]

[[allow]]
device = "press-1"
functions = ["read_holding_registers"]
addresses = "0-9"
when.window = ["2001-01-01T08:00/2001-01-01T12:00", "2030-01-01T08:00/2030-01-01T12:00"]
when.sources = ["10.50.1.0/24", "192.168.0.0/24"]

[[allow]]
device = "press-1"
functions = ["read_input_registers"]
addresses = "0-9"
when.schedule = []
when.window = []
when.sources = []

[[allow]]
device = "press-1"
functions = ["read_coils"]
addresses = "0-9"
rate = { writes_per_second = 5 }

[[allow]]
device = "press-1"
functions = ["write_single_coil"]
addresses = "0-9"
rate = { burst = 5 }
"#;
    let dir = write(GATEWAY, &[("acme.toml", rules)]);
    let (config, warnings) = load_ok(dir.path());
    assert_eq!(
        warnings,
        [
            "rules/acme.toml:9:16: allow[1].when.window[1]: \"2001-01-01T08:00/2001-01-01T12:00\" is entirely in the past, so it never matches; remove it or correct the dates",
            "rules/acme.toml:10:33: allow[1].when.sources: 192.168.0.0/24 is outside every vendor source, so it never matches; list a network inside vendor.sources",
            "rules/acme.toml:13:10: allow[2].when.schedule: empty, so the rule never matches; list at least one weekly window or remove the key",
            "rules/acme.toml:13:10: allow[2].when.window: empty, so the rule never matches; list at least one dated window or remove the key",
            "rules/acme.toml:13:10: allow[2].when.sources: empty, so the rule never matches; list at least one network or remove the key",
            "rules/acme.toml:24:8: allow[3].rate.writes_per_second: none of the functions (read_coils) writes, so the limit has no effect; remove it",
            "rules/acme.toml:30:8: allow[4].rate: neither requests_per_second nor writes_per_second is set, so it limits nothing; set one or remove the key",
        ]
    );
    assert_eq!(config.vendors[0].rules[1].when.schedule, Some(Vec::new()));
    assert_eq!(config.vendors[0].rules[1].when.window, Some(Vec::new()));
    assert_eq!(config.vendors[0].rules[1].when.sources, Some(Vec::new()));
    assert_eq!(config.vendors[0].rules[3].rate, None);
}

#[test]
fn rate_limits_are_read_for_vendor_and_rule() {
    let rules = r#"[vendor]
name = "acme"
sources = ["10.50.0.0/16"]
rate = { requests_per_second = 50, writes_per_second = 20, burst = 10 }

[[allow]]
device = "press-1"
functions = ["write_single_register"]
addresses = "0-9"
rate = { writes_per_second = 0.5 }
"#;
    let dir = write(GATEWAY, &[("acme.toml", rules)]);
    let (config, warnings) = load_ok(dir.path());
    assert_eq!(warnings, Vec::<String>::new());
    assert_eq!(
        config.vendors[0].rate,
        Some(RateConfig {
            requests_per_second: Some(Rate::per_second(50)),
            writes_per_second: Some(Rate::per_second(20)),
            burst: Some(10),
        })
    );
    let half = Rate {
        millis_per_second: 500,
    };
    assert_eq!(
        config.vendors[0].rules[0].rate,
        Some(RateConfig {
            requests_per_second: None,
            writes_per_second: Some(half),
            burst: None,
        })
    );
    assert_eq!(half.to_string(), "0.5");
    assert_eq!(Rate::per_second(50).to_string(), "50");
}

#[test]
fn invalid_rate_limits_are_errors() {
    let rules = r#"[vendor]
name = "acme"
sources = ["10.50.0.0/16"]
rate = { requests_per_second = 0, writes_per_second = 200000, burst = 0 }

[[allow]]
device = "press-1"
functions = ["write_single_register"]
addresses = "0-9"
rate = { requests_per_second = -1 }
"#;
    let unknown_key =
        "[vendor]\nname = \"beta\"\nsources = [\"10.60.0.0/16\"]\nrate = { per_minute = 5 }\n";
    let dir = write(GATEWAY, &[("acme.toml", rules), ("beta.toml", unknown_key)]);
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "rules/acme.toml:4:32: vendor.rate.requests_per_second: 0 outside 0.001..=100000; set a rate in requests per second, such as 50 or 0.5",
            "rules/acme.toml:4:55: vendor.rate.writes_per_second: 200000 outside 0.001..=100000; set a rate in requests per second, such as 50 or 0.5",
            "rules/acme.toml:4:71: vendor.rate.burst: 0 outside 1..=1000000; set a value from 1 to 1000000",
            "rules/acme.toml:10:32: allow[1].rate.requests_per_second: -1 outside 0.001..=100000; set a rate in requests per second, such as 50 or 0.5",
            "rules/beta.toml:4:10: unknown field `per_minute`, expected one of `requests_per_second`, `writes_per_second`, `burst`",
        ]
    );
}

#[test]
fn empty_and_inverted_ranges_are_errors() {
    let rules = r#"[vendor]
name = "acme"
sources = ["10.50.0.0/16"]

[[allow]]
device = "press-1"
functions = ["write_single_register"]
addresses = []
values = ""
quantity = "5-1"
"#;
    let dir = write(GATEWAY, &[("acme.toml", rules)]);
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "rules/acme.toml:8:13: allow[1].addresses: empty list, so the rule never matches; list at least one range or remove the key",
            "rules/acme.toml:9:10: allow[1].values: invalid range \"\"; write a number or FIRST-LAST, such as \"5\" or \"0-999\"",
            "rules/acme.toml:10:12: allow[1].quantity: inverted range \"5-1\"; write the smaller number first, as \"1-5\"",
        ]
    );
}

#[test]
fn collector_sections_report_every_problem() {
    let gateway = format!(
        r#"{GATEWAY}
[[collector]]
name = "soc"
transport = "https"
url = "http://collector.example/events"

[[collector]]
name = "siem"
transport = "syslog-tls"
url = "https://siem.example/"
events = "some"
on_full = "block"
tls = {{ cert = "client.crt" }}

[[collector]]
name = "soc"
transport = "kafka"
spool_max_bytes = 10
"#
    );
    let dir = write(&gateway, &[("acme.toml", ACME)]);
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "gateway.toml:27:7: collector[1].url: the scheme is not https in \"http://collector.example/events\"; write it as \"https://HOST:PORT/PATH\"",
            "gateway.toml:32:7: collector[2].url: not used by a syslog-tls collector; set address instead",
            "gateway.toml:30:8: collector[2].address: missing; a syslog-tls collector needs address = \"HOST:PORT\", as \"siem.example:6514\"",
            "gateway.toml:33:10: collector[2].events: invalid value \"some\"; use one of \"anomalies\", \"all\"",
            "gateway.toml:34:11: collector[2].on_full: invalid value \"block\"; use one of \"drop_oldest\", \"keep_in_audit\"",
            "gateway.toml:35:7: collector[2].tls: cert and key go together; set both for a client certificate, or neither",
            "gateway.toml:38:8: collector[3].name: duplicate collector \"soc\", first defined at gateway.toml:25:8; collector names must be unique",
            "gateway.toml:38:8: collector[3].spool: folder spool/soc is already the spool of collector \"soc\"; give each collector its own spool",
            "gateway.toml:39:13: collector[3].transport: invalid value \"kafka\"; use one of \"https\", \"syslog-tls\"",
            "gateway.toml:40:19: collector[3].spool_max_bytes: 10 outside 65536..=1099511627776; set a value from 65536 to 1099511627776",
        ]
    );
}

#[test]
fn collector_settings_resolve_against_the_gateway_folder() {
    let gateway = format!(
        r#"{GATEWAY}
[[collector]]
name = "siem"
transport = "syslog-tls"
address = "127.0.0.1:6514"
events = "all"
on_full = "drop_oldest"
tls = {{ ca = "tls/ca.crt" }}
batch_max = 20
timeout_ms = 2500
"#
    );
    let dir = write(&gateway, &[("acme.toml", ACME)]);
    let (config, warnings) = load(&dir.path().join("gateway.toml")).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let collectors = &config.audit.collectors;
    assert_eq!(collectors.len(), 1);
    let collector = &collectors[0];
    assert_eq!(collector.name, "siem");
    assert_eq!(
        collector.target,
        CollectorTarget::SyslogTls {
            host: "127.0.0.1".into(),
            port: 6514
        }
    );
    assert_eq!(collector.events, CollectorEvents::All);
    assert_eq!(collector.on_full, OnFull::DropOldest);
    assert_eq!(collector.spool, dir.path().join("spool/siem"));
    assert_eq!(collector.spool_max_bytes, 256 * 1024 * 1024);
    assert_eq!(collector.tls.ca, Some(dir.path().join("tls/ca.crt")));
    assert_eq!(collector.tls.cert, None);
    assert_eq!(collector.batch_max, 20);
    assert_eq!(collector.timeout, std::time::Duration::from_millis(2500));
}

#[test]
fn detection_settings_default_when_absent() {
    let dir = write(GATEWAY, &[("acme.toml", ACME)]);
    let (_, detection, warnings) = load_with_detection(&dir.path().join("gateway.toml")).unwrap();
    assert_eq!(detection, Detection::default());
    assert_eq!(detection.detect.function_scan.limit, 8);
    assert_eq!(detection.detect.address_sweep.limit, 20);
    assert_eq!(detection.detect.denial_burst.window, DEFAULT_WINDOW);
    assert!(warnings.is_empty());
}

#[test]
fn detection_settings_are_read() {
    let gateway =
        format!("{GATEWAY}\n[detect]\nwindow_ms = 5000\nfunction_scan = 3\nexception_storm = 7\nauth_failure_burst = 2\nbrowse_sweep = 50\n");
    let rules = format!(
        "{ACME}\n[vendor.on_anomaly]\nkinds = [\"function_scan\", \"denial_burst\"]\ncount = 3\nwindow_ms = 60000\nquarantine_ms = 600000\n"
    );
    let dir = write(&gateway, &[("acme.toml", &rules)]);
    let (_, detection, _) = load_with_detection(&dir.path().join("gateway.toml")).unwrap();
    let window = Duration::from_millis(5000);
    assert_eq!(
        detection.detect.function_scan,
        Threshold { limit: 3, window }
    );
    assert_eq!(
        detection.detect.exception_storm,
        Threshold { limit: 7, window }
    );
    assert_eq!(detection.detect.unit_scan, Threshold { limit: 8, window });
    assert_eq!(
        detection.detect.auth_failure_burst,
        Threshold { limit: 2, window }
    );
    assert_eq!(
        detection.detect.browse_sweep,
        Threshold { limit: 50, window }
    );
    assert_eq!(detection.detect.repeat_window, window);
    assert_eq!(
        detection.on_anomaly,
        vec![(
            "acme".to_owned(),
            OnAnomalyConfig {
                kinds: vec!["function_scan", "denial_burst"],
                count: 3,
                window: Duration::from_secs(60),
                quarantine: Some(Duration::from_secs(600)),
            }
        )]
    );
}

#[test]
fn invalid_detection_settings_are_errors() {
    let gateway = format!("{GATEWAY}\n[detect]\nfunction_scan = 0\n");
    let rules = format!("{ACME}\n[vendor.on_anomaly]\nkinds = [\"device_timeout\"]\n");
    let dir = write(&gateway, &[("acme.toml", &rules)]);
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "gateway.toml:25:17: detect.function_scan: 0 outside 1..=1000000; set a value from 1 to 1000000".to_owned(),
            format!("rules/acme.toml:11:10: vendor.on_anomaly.kinds: unknown kind \"device_timeout\"; use one of {}", CONTAINABLE_KINDS.join(", ")),
        ]
    );
}

/// Writes a gateway with one `modbus-tls` listener whose `tls` table is
/// `tls`, the PEM files of `files` and the rule files `rules`.
fn write_tls(tls: &str, files: &[(&str, &str)], rules: &[(&str, &str)]) -> tempfile::TempDir {
    let gateway = format!(
        r#"[gateway]
name = "edge-01"

[[listener]]
name = "vendors"
protocol = "modbus-tls"
bind = "127.0.0.1:8020"
device = "press-1"
tls = {tls}

[[device]]
name = "press-1"
address = "127.0.0.1:5021"
"#
    );
    let dir = write(&gateway, rules);
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// Writes a `modbus-tls` gateway whose certificate, key and CA files are
/// valid, with the rule files `rules`.
fn write_tls_gateway(rules: &[(&str, &str)]) -> tempfile::TempDir {
    let ca = TestCa::new("vendors CA");
    let server = ca.leaf("gateway", &["localhost"], None, 1);
    write_tls(
        r#"{ cert = "gateway.crt", key = "gateway.key", client_ca = "ca.crt" }"#,
        &[
            ("gateway.crt", &server.pem),
            ("gateway.key", &server.key_pem),
            ("ca.crt", &ca.pem),
        ],
        rules,
    )
}

/// Writes a `modbus-tls` gateway with valid files and a CRL whose next
/// update is `next_update_in` from now.
fn write_tls_with_crl(next_update_in: time::Duration) -> tempfile::TempDir {
    let ca = TestCa::new("vendors CA");
    let server = ca.leaf("gateway", &["localhost"], None, 1);
    let crl = ca.crl(&[], next_update_in);
    write_tls(
        TLS_FILES,
        &[
            ("gateway.crt", &server.pem),
            ("gateway.key", &server.key_pem),
            ("ca.crt", &ca.pem),
            ("ca.crl", &crl),
        ],
        &[("acme.toml", CERTIFICATE_VENDOR)],
    )
}

const TLS_FILES: &str =
    r#"{ cert = "gateway.crt", key = "gateway.key", client_ca = "ca.crt", crl = ["ca.crl"] }"#;

const CERTIFICATE_VENDOR: &str = r#"[vendor]
name = "acme"
certificate_cn = ["acme-*"]
"#;

#[test]
fn tls_listener_loads_files_and_expiry() {
    let dir = write_tls_with_crl(time::Duration::days(1));
    let (config, warnings) = load(&dir.path().join("gateway.toml")).unwrap();
    assert_eq!(warnings, []);
    let tls = config.listeners[0].tls.as_ref().unwrap();
    assert_eq!(tls.cert, dir.path().join("gateway.crt"));
    assert_eq!(tls.crl, [dir.path().join("ca.crl")]);
    assert_eq!(tls.handshake_timeout, Duration::from_secs(10));
    assert_eq!(tls.max_handshakes_per_source, 4);
    let kinds: Vec<&str> = tls.expiry.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["server_certificate", "client_ca", "crl"]);
    assert_eq!(config.vendors[0].certificate.cn, vec!["acme-*".to_owned()]);
}

#[test]
fn tls_key_of_another_certificate_is_reported() {
    let ca = TestCa::new("vendors CA");
    let server = ca.leaf("gateway", &["localhost"], None, 1);
    let other = ca.leaf("other", &["localhost"], None, 2);
    let dir = write_tls(
        r#"{ cert = "gateway.crt", key = "other.key", client_ca = "ca.crt" }"#,
        &[
            ("gateway.crt", &server.pem),
            ("other.key", &other.key_pem),
            ("ca.crt", &ca.pem),
        ],
        &[("acme.toml", CERTIFICATE_VENDOR)],
    );
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        ["gateway.toml:9:37: listener[1].tls.key: the private key does not match the certificate; give the private key of gateway.crt"]
    );
}

#[test]
fn tls_file_that_is_not_pem_is_reported() {
    let ca = TestCa::new("vendors CA");
    let server = ca.leaf("gateway", &["localhost"], None, 1);
    let dir = write_tls(
        r#"{ cert = "gateway.crt", key = "gateway.key", client_ca = "ca.crt" }"#,
        &[
            ("gateway.crt", &server.pem),
            ("gateway.key", &server.key_pem),
            ("ca.crt", "not a certificate\n"),
        ],
        &[("acme.toml", CERTIFICATE_VENDOR)],
    );
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        ["gateway.toml:9:64: listener[1].tls.client_ca: no certificate found in ca.crt; give a PEM CA bundle"]
    );
}

#[test]
fn expired_server_certificate_is_an_error() {
    let ca = TestCa::new("vendors CA");
    let server = ca.expired_leaf("gateway");
    let dir = write_tls(
        r#"{ cert = "gateway.crt", key = "gateway.key", client_ca = "ca.crt" }"#,
        &[
            ("gateway.crt", &server.pem),
            ("gateway.key", &server.key_pem),
            ("ca.crt", &ca.pem),
        ],
        &[("acme.toml", CERTIFICATE_VENDOR)],
    );
    let (errors, _) = load_errors(dir.path());
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]
            .starts_with("gateway.toml:9:16: listener[1].tls.cert: the certificate expired at "),
        "{errors:?}"
    );
}

#[test]
fn tls_table_needs_modbus_tls_and_the_reverse() {
    let gateway = r#"[gateway]
name = "edge-01"

[[listener]]
name = "plain"
bind = "127.0.0.1:5020"
device = "press-1"
tls = { cert = "gateway.crt" }

[[listener]]
name = "secure"
protocol = "modbus-tls"
bind = "127.0.0.1:8020"
device = "press-1"

[[device]]
name = "press-1"
address = "127.0.0.1:5021"
"#;
    let dir = write(gateway, &[("acme.toml", ACME)]);
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "gateway.toml:8:7: listener[1].tls: only a \"modbus-tls\" listener takes TLS settings; set protocol = \"modbus-tls\" or remove the key",
            "gateway.toml:11:8: listener[2].tls: missing; a \"modbus-tls\" listener needs tls = { cert, key, client_ca }",
        ]
    );
}

#[test]
fn vendors_that_can_match_one_certificate_are_reported() {
    let beta = r#"[vendor]
name = "beta"
certificate_cn = ["acme-*"]
modbus_role = ["Operator"]
"#;
    let gamma = r#"[vendor]
name = "gamma"
certificate_cn = ["gamma-*"]
certificate_sha256 = ["AB:CD"]
"#;
    let dir = write_tls_gateway(&[
        ("acme.toml", CERTIFICATE_VENDOR),
        ("beta.toml", beta),
        ("gamma.toml", gamma),
    ]);
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "rules/gamma.toml:4:23: vendor.certificate_sha256[1]: invalid fingerprint \"AB:CD\"; write the 64 hex digits of the SHA-256 of the DER certificate, colons allowed",
            "rules/beta.toml:2:8: vendor: \"beta\" and vendor \"acme\" at rules/acme.toml:2:8 can match the same certificate (certificate_cn overlap); make the patterns disjoint",
        ]
    );
}

#[test]
fn vendors_with_different_matcher_kinds_get_a_warning() {
    let beta = r#"[vendor]
name = "beta"
modbus_role = ["Operator"]
"#;
    let dir = write_tls_gateway(&[("acme.toml", CERTIFICATE_VENDOR), ("beta.toml", beta)]);
    let (_, warnings) = load(&dir.path().join("gateway.toml")).unwrap();
    assert_eq!(
        lines(dir.path(), &warnings),
        ["rules/beta.toml:2:8: vendor: \"beta\" and vendor \"acme\" at rules/acme.toml:2:8 use different certificate matchers, so a certificate that satisfies both is rejected as ambiguous; add a matcher kind both share, such as certificate_cn"]
    );
}

#[test]
fn listeners_may_share_port_zero() {
    let gateway = r#"[gateway]
name = "edge-01"

[[listener]]
name = "first"
bind = "127.0.0.1:0"
device = "press-1"

[[listener]]
name = "second"
bind = "127.0.0.1:0"
device = "press-1"

[[device]]
name = "press-1"
address = "127.0.0.1:5021"
"#;
    let dir = write(gateway, &[("acme.toml", ACME)]);
    let (config, _) = load(&dir.path().join("gateway.toml")).unwrap();
    assert_eq!(config.listeners.len(), 2);
}

#[test]
fn device_tls_needs_ca_cert_and_key() {
    let gateway = r#"[gateway]
name = "edge-01"

[[listener]]
name = "scada"
bind = "127.0.0.1:5020"
device = "press-1"

[[device]]
name = "press-1"
address = "127.0.0.1:802"
tls = { ca = "plant-ca.crt", server_name = "not a name" }
"#;
    let dir = write(gateway, &[("acme.toml", ACME)]);
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "gateway.toml:12:7: device[1].tls.cert: missing; MODBUS/TCP Security needs ca, cert and key",
            "gateway.toml:12:7: device[1].tls.key: missing; MODBUS/TCP Security needs ca, cert and key",
            "gateway.toml:12:44: device[1].tls.server_name: invalid name \"not a name\"; give the DNS name or IP address in the device's certificate",
        ]
    );
}

#[test]
fn device_tls_loads_with_address_as_server_name() {
    let ca = TestCa::new("plant CA");
    let client = ca.leaf("sluice", &[], None, 3);
    let gateway = r#"[gateway]
name = "edge-01"

[[listener]]
name = "scada"
bind = "127.0.0.1:5020"
device = "press-1"

[[device]]
name = "press-1"
address = "127.0.0.1:802"
tls = { ca = "plant-ca.crt", cert = "sluice.crt", key = "sluice.key" }
"#;
    let dir = write(gateway, &[("acme.toml", ACME)]);
    std::fs::write(dir.path().join("plant-ca.crt"), &ca.pem).unwrap();
    std::fs::write(dir.path().join("sluice.crt"), &client.pem).unwrap();
    std::fs::write(dir.path().join("sluice.key"), &client.key_pem).unwrap();
    let (config, _) = load(&dir.path().join("gateway.toml")).unwrap();
    let tls = config.devices[0].tls.as_ref().unwrap();
    assert_eq!(
        tls.server_name,
        tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap()
    );
}

#[test]
fn expired_crl_is_a_warning() {
    let dir = write_tls_with_crl(-time::Duration::minutes(10));
    let (_, warnings) = load(&dir.path().join("gateway.toml")).unwrap();
    let warnings = lines(dir.path(), &warnings);
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0].starts_with("gateway.toml:9:81: listener[1].tls.crl[1]: the CRL expired at "),
        "{warnings:?}"
    );
    assert!(
        warnings[0].ends_with(", so every handshake is rejected until it is replaced"),
        "{warnings:?}"
    );
}

#[test]
fn mirror_blocks_are_read_with_defaults() {
    let gateway = r#"[gateway]
name = "edge-01"

[[listener]]
name = "historians"
bind = "127.0.0.1:5030"
device = "press-1"
mirror_only = true

[[device]]
name = "press-1"
address = "127.0.0.1:5021"
mirror = [
  { kind = "input_register", start = 300, count = 1000, poll_ms = 500, max_age_ms = 2000, stale = "exception" },
  { kind = "holding_register", start = 0, count = 200 },
  { kind = "coil", start = 0, count = 65536 },
]
"#;
    let dir = write(gateway, &[("acme.toml", ACME)]);
    let (config, warnings) = load_ok(dir.path());
    assert_eq!(warnings, Vec::<String>::new());
    assert!(config.listeners[0].mirror_only);
    assert_eq!(
        config.devices[0].mirror,
        [
            MirrorBlockConfig {
                kind: StateKind::HoldingRegister,
                start: 0,
                count: 200,
                poll: Duration::from_millis(1_000),
                max_age: Duration::from_millis(3_000),
                stale: OnStale::Forward,
            },
            MirrorBlockConfig {
                kind: StateKind::InputRegister,
                start: 300,
                count: 1000,
                poll: Duration::from_millis(500),
                max_age: Duration::from_millis(2_000),
                stale: OnStale::Exception,
            },
            MirrorBlockConfig {
                kind: StateKind::Coil,
                start: 0,
                count: 65_536,
                poll: Duration::from_millis(1_000),
                max_age: Duration::from_millis(3_000),
                stale: OnStale::Forward,
            },
        ]
    );
}

#[test]
fn mirror_problems_are_reported_with_positions() {
    let gateway = r#"[gateway]
name = "edge-01"

[[listener]]
name = "historians"
bind = "127.0.0.1:5030"
routes = { 1 = "press-1", 2 = "oven-2" }
mirror_only = true

[[device]]
name = "press-1"
address = "127.0.0.1:5021"
mirror = [
  { kind = "holding_register", start = 0, count = 200 },
  { kind = "holding_register", start = 150, count = 10 },
  { kind = "input_register", start = 150, count = 10 },
  { kind = "register", start = 0, count = 1 },
  { kind = "coil", start = 65535, count = 2 },
  { kind = "coil", count = 2 },
  { kind = "discrete_input", start = 0, count = 8, stale = "drop", poll_ms = 500, max_age_ms = 500 },
]

[[device]]
name = "oven-2"
address = "127.0.0.1:5022"
"#;
    let dir = write(gateway, &[("acme.toml", ACME)]);
    let (errors, warnings) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "gateway.toml:17:12: device[1].mirror[4].kind: invalid value \"register\"; use one of \"holding_register\", \"input_register\", \"coil\", \"discrete_input\"",
            "gateway.toml:18:43: device[1].mirror[5].count: 2 outside 1..=1; set a value from 1 to 1",
            "gateway.toml:19:3: device[1].mirror[6].start: missing; set the first 0-based address, as start = 0",
            "gateway.toml:20:60: device[1].mirror[7].stale: invalid value \"drop\"; use one of \"forward\", \"exception\"",
            "gateway.toml:15:40: device[1].mirror: holding_register block 150-159 overlaps block 0-199 at gateway.toml:14:40; a block of one table may not overlap another",
        ]
    );
    assert_eq!(
        warnings,
        [
            "gateway.toml:20:96: device[1].mirror[7].max_age_ms: 500 is not longer than poll_ms 500, so the block is stale between polls; set it to at least 2 × poll_ms",
            "gateway.toml:8:15: listener[1].mirror_only: device \"oven-2\" has no mirror blocks, so every request to it is denied; add a mirror list to the device",
        ]
    );
}

#[test]
fn opcua_username_of_two_vendors_is_an_error() {
    let user =
        format!("opcua_users = [{{ username = \"shared\", password_hash = \"{SECRET_HASH}\" }}]\n");
    let acme = format!("[vendor]\nname = \"acme\"\n{user}");
    let beta = format!("[vendor]\nname = \"beta\"\n{user}");
    let dir = write(OPCUA_GATEWAY, &[("acme.toml", &acme), ("beta.toml", &beta)]);
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        ["rules/beta.toml:3:29: vendor.opcua_users[1].username: \"shared\" is already a user of vendor \"acme\" at rules/acme.toml:3:29; give every OPC UA user to one vendor"]
    );
}

#[test]
fn opcua_anonymous_of_two_vendors_is_an_error() {
    let acme = "[vendor]\nname = \"acme\"\nopcua_anonymous = true\n";
    let beta = "[vendor]\nname = \"beta\"\nopcua_anonymous = true\n";
    let gamma =
        "[vendor]\nname = \"gamma\"\nopcua_anonymous = false\nsources = [\"10.9.0.0/16\"]\n";
    let dir = write(
        OPCUA_GATEWAY,
        &[
            ("acme.toml", acme),
            ("beta.toml", beta),
            ("gamma.toml", gamma),
        ],
    );
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        ["rules/beta.toml:3:19: vendor.opcua_anonymous: vendor \"acme\" at rules/acme.toml:3:19 already allows anonymous OPC UA sessions; set it for one vendor only"]
    );
}

#[test]
fn opcua_anonymous_vendor_keeps_sources_as_restriction() {
    let acme = "[vendor]\nname = \"acme\"\nopcua_anonymous = true\nsources = [\"127.0.0.0/8\"]\n";
    let gateway = OPCUA_GATEWAY.split("[[state]]").next().unwrap();
    let dir = write(gateway, &[("acme.toml", acme)]);
    let policy = crate::policy::Policy::load(&dir.path().join("gateway.toml"))
        .unwrap()
        .0;
    assert_eq!(policy.opcua_anonymous_vendor(), Some(0));
    assert_eq!(policy.identify("127.0.0.1".parse().unwrap()), None);
}

const TAG_GATEWAY: &str = r#"[gateway]
name = "edge-01"

[[device]]
name = "press-1"
address = "127.0.0.1:5021"
mirror = [
  { kind = "holding_register", start = 100, count = 20 },
  { kind = "coil", start = 0, count = 16 },
]
"#;

#[test]
fn tags_are_read_with_their_types_and_defaults() {
    let gateway = format!(
        "{TAG_GATEWAY}{}",
        r#"
[[tag]]
device = "press-1"
name = "Press1.Temperature"
kind = "holding_register"
address = 100
type = "float32"
order = "CDAB"
scale = 10
offset = -0.5
unit = "°C"
access = "read_write"

[[tag]]
device = "press-1"
name = "Press1.Recipe"
kind = "holding_register"
address = 110
type = "string"
length = 9

[[tag]]
device = "press-1"
name = "Press1.Running"
kind = "coil"
address = 15
type = "bool"

[[tag]]
device = "press-1"
name = "Press1.Alarm"
kind = "holding_register"
address = 119
type = "bool"
bit = 15
access = "read_write"
"#
    );
    let dir = write(&gateway, &[("acme.toml", ACME)]);
    let (config, warnings) = load_ok(dir.path());
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(config.tags.len(), 4);
    let temperature = &config.tags[0];
    assert_eq!(temperature.name, "Press1.Temperature");
    assert_eq!(temperature.device, "press-1");
    assert_eq!(temperature.kind, StateKind::HoldingRegister);
    assert_eq!(temperature.address, 100);
    assert_eq!(temperature.data_type, TagType::Float32);
    assert_eq!(temperature.order, RegisterOrder::Cdab);
    assert_eq!(temperature.scale, 10.0);
    assert_eq!(temperature.offset, -0.5);
    assert_eq!(temperature.unit.as_deref(), Some("°C"));
    assert_eq!(temperature.access, TagAccess::ReadWrite);
    assert!(
        temperature
            .origin
            .to_string()
            .ends_with("/gateway.toml:14:8"),
        "{}",
        temperature.origin
    );
    let recipe = &config.tags[1];
    assert_eq!(recipe.data_type, TagType::String { length: 9 });
    assert_eq!(recipe.data_type.register_count(), 5);
    assert_eq!(recipe.order, RegisterOrder::Abcd);
    assert_eq!(recipe.scale, 1.0);
    assert_eq!(recipe.offset, 0.0);
    assert_eq!(recipe.access, TagAccess::Read);
    assert_eq!(config.tags[2].data_type, TagType::Bool);
    assert_eq!(config.tags[2].bit, None);
    assert_eq!(config.tags[3].data_type, TagType::Bool);
    assert_eq!(config.tags[3].bit, Some(15));
    assert_eq!(config.tags[3].access, TagAccess::ReadWrite);
}

#[test]
fn tag_problems_are_reported_with_positions() {
    let gateway = format!(
        "{TAG_GATEWAY}{}",
        r#"
[[tag]]
device = "press-2"
name = "A"
kind = "holding_register"
address = 100
type = "int16"

[[tag]]
device = "press-1"
name = "A"
kind = "input_register"
address = 5
type = "bool"
access = "read_write"

[[tag]]
device = "press-1"
name = "C"
kind = "holding_register"
address = 118
type = "float64"

[[tag]]
device = "press-1"
name = "D"
kind = "holding_register"
address = 65534
type = "int64"
order = "CDAB"
scale = 0

[[tag]]
device = "press-1"
name = "E"
kind = "holding_register"
address = 100
type = "string"
length = 4
order = "DCBA"

[[tag]]
device = "press-1"
name = "F"
kind = "coil"
address = 1
type = "bool"
order = "BADC"
scale = 2

[[tag]]
device = "press-1"
name = "G"
kind = "holding_register"
address = 100
type = "string"

[[tag]]
device = "press-1"
name = "H"
kind = "holding_register"
address = 100
type = "uint16"
bit = 3

[[tag]]
device = "press-1"
name = "I"
kind = "holding_register"
address = 100
type = "bool"
bit = 16
"#
    );
    let dir = write(&gateway, &[("acme.toml", ACME)]);
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "gateway.toml:13:10: tag[1].device: unknown device \"press-2\"; use one of press-1",
            "gateway.toml:21:8: tag[2].name: duplicate tag \"A\", first defined at gateway.toml:14:8; tag names must be unique",
            "gateway.toml:24:8: tag[2].type: \"bool\" does not fit kind \"input_register\"; a bool tag reads a coil, a discrete input or one bit of a register; use kind = \"coil\" or \"discrete_input\", or set bit = 0 to 15",
            "gateway.toml:25:10: tag[2].access: input_register cannot be written; use access = \"read\" or kind = \"holding_register\"",
            "gateway.toml:31:11: tag[3]: holding_register 118-121 lies in no mirror block of device \"press-1\", and tags read their values from the mirror; add { kind = \"holding_register\", start = 118, count = 4 } to the device's mirror list, or widen a block to cover it",
            "gateway.toml:41:9: tag[4].scale: 0 maps every raw value to the offset; use a non-zero scale",
            "gateway.toml:38:11: tag[4].address: int64 at 65534 needs addresses up to 65537, past the last address 65535; lower the address",
            "gateway.toml:50:9: tag[5].order: string has no register order; use \"ABCD\" (high byte first) or \"BADC\" (low byte first)",
            "gateway.toml:58:9: tag[6].order: bool has no byte order; remove the key",
            "gateway.toml:59:9: tag[6].scale: only a numeric tag is scaled; remove the key",
            "gateway.toml:61:1: tag[7].length: missing; set length = 16, the number of characters, two per register",
            "gateway.toml:74:7: tag[8].bit: only a bool tag on a holding or input register takes a bit; remove the key",
            "gateway.toml:82:7: tag[9].bit: 16 outside 0..=15; set a value from 0 to 15",
        ]
    );
}

/// A gateway with one OPC UA listener without device, which serves only
/// the tags of `press-1`.
const TAGS_GATEWAY: &str = r#"[gateway]
name = "edge-01"

[[listener]]
name = "ua"
protocol = "opcua"
bind = "127.0.0.1:4840"
opcua = { application_uri = "urn:sluice:edge-01", certificate = "pki/sluice-ua.crt", private_key = "pki/sluice-ua.key", client_ca = "pki/vendors-ca.crt" }

[[device]]
name = "press-1"
address = "127.0.0.1:5021"
mirror = [{ kind = "holding_register", start = 0, count = 200 }]

[[tag]]
device = "press-1"
name = "Press1.Setpoint"
kind = "holding_register"
address = 100
type = "float32"
access = "read_write"
"#;

#[test]
fn opcua_listener_without_device_serves_tags() {
    let rules = "[vendor]\nname = \"acme\"\nopcua_users = [{ username = \"acme-eng\", password_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\" }]\n\n[[allow]]\ndevice = \"press-1\"\nservices = [\"read\", \"write\"]\nnodes = [\"nsu=urn:sluice:tags;s=Press1.*\"]\nvalues = \"0-100\"\n\n[[allow]]\ndevice = \"press-1\"\nfunctions = [\"write_multiple_registers\"]\naddresses = [\"100-101\"]\n";
    let dir = write(TAGS_GATEWAY, &[("acme.toml", rules)]);
    let (config, warnings) = load_ok(dir.path());
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(config.listeners[0].target, ListenerTarget::TagsOnly);
    let rule = &config.vendors[0].rules[0];
    assert_eq!(rule.device, "press-1");
    let opcua = rule.opcua.as_ref().unwrap();
    assert_eq!(opcua.services, [OpcuaService::Read, OpcuaService::Write]);
    assert_eq!(opcua.nodes[0].namespace_uri, "urn:sluice:tags");
    assert_eq!(
        opcua.nodes[0].id,
        NodeIdPattern::String("Press1.*".to_owned())
    );
}

#[test]
fn tag_write_without_modbus_rule_warns() {
    let tag_rule = "[vendor]\nname = \"acme\"\nsources = [\"10.50.0.0/16\"]\n\n[[allow]]\ndevice = \"press-1\"\nservices = [\"read\", \"write\"]\nnodes = [\"nsu=urn:sluice:tags;s=Press1.*\"]\n";
    let cases = [
        // No Modbus rule at all.
        ("", true),
        // The right function but only one of the tag's two registers.
        ("\n[[allow]]\ndevice = \"press-1\"\nfunctions = [\"write_multiple_registers\"]\naddresses = [\"100\"]\n", true),
        // Both registers, but FC 6, which a float32 write never uses.
        ("\n[[allow]]\ndevice = \"press-1\"\nfunctions = [\"write_single_register\"]\naddresses = [\"0-999\"]\n", true),
        ("\n[[allow]]\ndevice = \"press-1\"\nfunctions = [16]\naddresses = [\"0-999\"]\n", false),
    ];
    for (modbus_rule, warned) in cases {
        let rules = format!("{tag_rule}{modbus_rule}");
        let dir = write(TAGS_GATEWAY, &[("acme.toml", &rules)]);
        let (_, warnings) = load_ok(dir.path());
        let expected: &[&str] = if warned {
            &["rules/acme.toml:6:10: tag Press1.Setpoint may be written under this rule, but no Modbus rule of the vendor allows write_multiple_registers on device \"press-1\" at 100-101, so every write is denied; add an [[allow]] with functions = [\"write_multiple_registers\"] and addresses = [\"100-101\"]"]
        } else {
            &[]
        };
        assert_eq!(warnings, expected, "Modbus rule: {modbus_rule:?}");
    }
}

#[test]
fn tag_rule_glob_without_tag_warns() {
    let rules = "[vendor]\nname = \"acme\"\nsources = [\"10.50.0.0/16\"]\n\n[[allow]]\ndevice = \"press-1\"\nservices = [\"read\"]\nnodes = [\"nsu=urn:sluice:tags;s=Press1.*\", \"nsu=urn:sluice:tags;s=Press2.*\", \"nsu=urn:sluice:tags;s=Press1.Setpont\"]\n";
    let dir = write(TAGS_GATEWAY, &[("acme.toml", rules)]);
    let (config, warnings) = load_ok(dir.path());
    assert_eq!(config.vendors[0].rules.len(), 1);
    assert_eq!(
        warnings,
        [
            "rules/acme.toml:8:44: allow[1].nodes[2]: s=Press2.* matches no tag of device \"press-1\", so it allows nothing; name one of its [[tag]] sections, such as s=Press1.Setpoint",
            "rules/acme.toml:8:78: allow[1].nodes[3]: s=Press1.Setpont matches no tag of device \"press-1\", so it allows nothing; name one of its [[tag]] sections, such as s=Press1.Setpoint",
        ]
    );
}

#[test]
fn tag_rule_foreign_parts_rejected() {
    let rules = "[vendor]\nname = \"acme\"\nsources = [\"10.50.0.0/16\"]\n\n[[allow]]\ndevice = \"press-1\"\nservices = [\"read\"]\nnodes = [\"nsu=urn:plant:line1;s=Line1.*\", \"nsu=urn:sluice:tags;i=5\", \"nsu=urn:sluice:tags;s=Press1.*\"]\n\n[[allow]]\ndevice = \"press-1\"\nfunctions = [16]\nservices = [\"write\"]\nnodes = [\"nsu=urn:sluice:tags;s=Press1.Setpoint\"]\n\n[[allow]]\ndevice = \"press-1\"\nnodes = [\"nsu=urn:sluice:tags;s=Press1.*\"]\n";
    let dir = write(TAGS_GATEWAY, &[("acme.toml", rules)]);
    let (errors, _) = load_errors(dir.path());
    assert_eq!(
        errors,
        [
            "rules/acme.toml:8:10: allow[1].nodes[1]: namespace \"urn:plant:line1\" is not the tag namespace urn:sluice:tags; a rule for Modbus device \"press-1\" allows its tags, as \"nsu=urn:sluice:tags;s=Press1.*\"",
            "rules/acme.toml:8:43: allow[1].nodes[2]: numeric id i=5 names no tag, because tag node ids are their names; a rule for Modbus device \"press-1\" allows its tags, as \"nsu=urn:sluice:tags;s=Press1.*\"",
            "rules/acme.toml:11:10: allow[2].functions: a Modbus key in a rule with services and nodes, which allows tags; put Modbus access in an [[allow]] of its own",
            "rules/acme.toml:17:10: allow[3].services: missing; list the services the rule allows, as [\"browse\", \"read\"]",
        ]
    );
}
