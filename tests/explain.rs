//! `sluice check --explain` run as a user runs it: the built binary on the
//! shipped example files, with exact output lines and exit statuses.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn example_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml.example")
}

fn check(config: &Path, query: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--config"])
        .arg(config)
        .args(["--explain", query])
        .env("SLUICE_LOG", "error")
        .output()
        .expect("the sluice binary runs")
}

fn stdout_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn write_in_maintenance_is_allowed_by_second_rule() {
    let output = check(
        &example_config(),
        "vendor=acme device=press-1 function=write_single_register address=105 value=10 state.press-1-mode=maintenance time=2026-12-10T09:30",
    );
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        stdout_lines(&output),
        [
            "allow acme.toml#2",
            "  request: vendor=acme device=press-1 function=write_single_register address=105 value=10 unit=1 source=127.0.0.0 time=2026-12-10T09:30:00+01:00 state.press-1-mode=maintenance",
            "  acme.toml#1: function write_single_register (6) is not in the rule's functions: read_holding_registers (3), read_input_registers (4)",
            "  acme.toml#2: allows",
        ]
    );
}

#[test]
fn write_in_production_names_failed_state_check() {
    let output = check(
        &example_config(),
        "vendor=acme device=press-1 function=6 address=105 value=10 state.press-1-mode=production time=2026-12-10T08:30Z",
    );
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        stdout_lines(&output),
        [
            "deny (exception 01): state press-1-mode is production, rule requires maintenance",
            "  request: vendor=acme device=press-1 function=write_single_register address=105 value=10 unit=1 source=127.0.0.0 time=2026-12-10T09:30:00+01:00 state.press-1-mode=production",
            "  acme.toml#1: function write_single_register (6) is not in the rule's functions: read_holding_registers (3), read_input_registers (4)",
            "  acme.toml#2: when.state press-1-mode is production, rule needs maintenance",
        ]
    );
}

#[test]
fn read_past_range_names_address_per_rule() {
    let output = check(
        &example_config(),
        "vendor=historian device=press-1 function=read_input_registers address=995 quantity=10 source=::1 time=2026-12-10T09:30",
    );
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        stdout_lines(&output),
        [
            "deny (exception 02): address 1000 outside allowed ranges",
            "  request: vendor=historian device=press-1 function=read_input_registers address=995 quantity=10 unit=1 source=::1 time=2026-12-10T09:30:00+01:00",
            "  historian.toml#1: address 1000 is outside the rule's addresses 0-999",
        ]
    );
}

#[test]
fn invalid_query_names_key_and_exits_64() {
    let cases = [
        (
            "vendor=acme device=press-1 function=3 address=0 colour=red",
            "error: --explain: colour: unknown key; use vendor, device, function, address, quantity, write_address, value, unit, sub_function, mei_type, source, role, time, state.NAME",
        ),
        (
            "vendor=acme device=press-2 function=3 address=0",
            "error: --explain: device: unknown device \"press-2\"; known devices: press-1",
        ),
        (
            "vendor=acme device=press-1 function=write_coil address=0",
            "error: --explain: function: unknown function \"write_coil\"; use a code from 1 to 127 or a function name, such as read_holding_registers",
        ),
        (
            "vendor=acme device=press-1 function=3 address=-1",
            "error: --explain: address: invalid number \"-1\"; write a number from 0 to 65535",
        ),
    ];
    for (query, message) in cases {
        let output = check(&example_config(), query);
        assert_eq!(output.status.code(), Some(64), "query {query}");
        assert_eq!(stdout_lines(&output), Vec::<String>::new(), "query {query}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim_end(), message, "query {query}");
    }
}

#[test]
fn invalid_configuration_keeps_check_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = std::fs::read_to_string(example_config())
        .unwrap()
        .replace("holding_register = 900", "holding_register = 70000");
    std::fs::write(dir.path().join("gateway.toml"), gateway).unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    let output = check(
        &dir.path().join("gateway.toml"),
        "vendor=acme device=press-1 function=3 address=0",
    );
    assert_eq!(output.status.code(), Some(1));
    let lines = stdout_lines(&output);
    assert_eq!(lines.len(), 2);
    assert!(lines[0].ends_with(
        "gateway.toml:31:20: state[1].holding_register: 70000 outside 0..=65535; set a value from 0 to 65535"
    ));
}
