//! Decision tests: every deny reason with its exception code and text, the
//! choice of the most specific reason, conditions on state, schedule,
//! dated windows and sources, and the plans compiled from configuration.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::config::{
    AuditConfig, Config, DeviceConfig, GatewayConfig, ListenerConfig, Rate, RateConfig, RuleConfig,
    VendorConfig,
};

const GATEWAY: &str = r#"[gateway]
name = "edge-01"

[[listener]]
name = "scada"
bind = "127.0.0.1:5020"
routes = { 1 = "press-1", 2 = "oven-2" }

[[listener]]
name = "direct"
bind = "127.0.0.1:5030"
mode = "monitor"
on_deny = "drop"
device = "oven-2"

[[device]]
name = "press-1"
address = "127.0.0.1:5021"

[[device]]
name = "oven-2"
address = "127.0.0.1:5022"
unit = 2

[[device]]
name = "dryer-3"
address = "127.0.0.1:5023"

[[state]]
name = "press-1-mode"
device = "press-1"
holding_register = 900
poll_ms = 500
values = { 0 = "production", 1 = "maintenance", "2-9" = "maintenance" }
"#;

const ACME: &str = r#"[vendor]
name = "acme"
sources = ["10.50.0.0/16"]
max_sessions = 4

[[allow]]
device = "press-1"
functions = ["read_holding_registers", "read_input_registers"]
addresses = ["0-999"]
quantity = "1-100"

[[allow]]
device = "press-1"
functions = ["write_single_register", "write_multiple_registers", "read_write_multiple_registers", "mask_write_register"]
addresses = ["100-119"]
values = "0-5000"
when.state = { "press-1-mode" = "maintenance" }

[[allow]]
device = "press-1"
functions = ["write_single_coil", "write_multiple_coils"]
addresses = ["0-99"]
values = "0"

[[allow]]
device = "press-1"
functions = ["diagnostics", "read_device_identification"]
mei_types = [14]

[[allow]]
device = "oven-2"
functions = ["read_holding_registers"]
addresses = ["0-99"]
when.schedule = ["Mon-Fri 07:00-17:00"]
when.sources = ["10.50.1.0/24"]

[[allow]]
device = "oven-2"
functions = ["write_single_register"]
addresses = ["10"]
when.window = ["2030-12-10T08:00/2030-12-10T12:00"]

[[allow]]
device = "press-1"
functions = ["read_write_multiple_registers"]
addresses = ["0-9"]

[[allow]]
device = "press-1"
functions = ["write_single_register"]
addresses = ["200-209"]
values = "0-10"
"#;

const HISTORIAN: &str = r#"[vendor]
name = "historian"
sources = ["::1/128", "192.168.7.0/24"]

[[allow]]
device = "press-1"
functions = ["read_input_registers"]
addresses = ["0-999"]

[[allow]]
device = "press-1"
functions = [8]
sub_functions = [4]
"#;

const ACME_ID: VendorId = 0;
const HISTORIAN_ID: VendorId = 1;
const PRESS: DeviceId = 0;
const OVEN: DeviceId = 1;
const DRYER: DeviceId = 2;
const MODE: usize = 0;
/// A Monday, 09:00 in Brussels.
const MONDAY_MORNING: &str = "2026-12-14T08:00:00Z";

fn policy() -> Policy {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.toml"), GATEWAY).unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    std::fs::write(dir.path().join("rules/acme.toml"), ACME).unwrap();
    std::fs::write(dir.path().join("rules/historian.toml"), HISTORIAN).unwrap();
    let (policy, warnings) = match Policy::load(&dir.path().join("gateway.toml")) {
        Ok(loaded) => loaded,
        Err(diagnostics) => panic!("policy failed to load:\n{diagnostics}"),
    };
    assert_eq!(warnings, []);
    policy
}

struct Clock {
    table: StateTable,
    instant: Instant,
}

impl Clock {
    fn new() -> Self {
        Clock {
            table: StateTable::new(1),
            instant: Instant::now(),
        }
    }

    fn with_mode(raw: u16) -> Self {
        let clock = Clock::new();
        clock.table.set(MODE, Some(raw), clock.instant);
        clock
    }

    fn context(&self, source: &str, utc: &str) -> Context<'_> {
        Context {
            source: source.parse::<IpAddr>().unwrap(),
            role: None,
            now: utc.parse().unwrap(),
            instant: self.instant,
            states: &self.table,
        }
    }

    fn acme(&self) -> Context<'_> {
        self.context("10.50.1.7", MONDAY_MORNING)
    }
}

fn access(function: u8) -> ModbusAccess<'static> {
    ModbusAccess {
        unit: 1,
        function,
        read: None,
        write: None,
        values: WrittenValues::None,
        quantity: None,
        sub_function: None,
        mei_type: None,
    }
}

fn read(function: u8, address: u16, count: u16) -> ModbusAccess<'static> {
    ModbusAccess {
        read: Some((address, count)),
        quantity: Some(count),
        ..access(function)
    }
}

fn write_register(address: u16, value: u16) -> ModbusAccess<'static> {
    ModbusAccess {
        write: Some((address, 1)),
        values: WrittenValues::Register(value),
        ..access(6)
    }
}

fn allowed(vendor: u32, index: u32) -> Decision {
    Decision::Allow {
        rule: RuleRef { vendor, index },
    }
}

fn denied(reason: DenyReason) -> Decision {
    Decision::Deny { reason }
}

fn state_mismatch(actual: &str) -> DenyReason {
    DenyReason::ConditionFailed {
        condition: Condition::State {
            state: Arc::from("press-1-mode"),
            required: Arc::from("maintenance"),
            actual: Arc::from(actual),
        },
    }
}

#[test]
fn read_inside_range_is_allowed_by_first_rule() {
    let (policy, clock) = (policy(), Clock::new());
    let decision = policy.decide(ACME_ID, PRESS, &read(3, 0, 100), &clock.acme());
    assert_eq!(decision, allowed(0, 0));
    assert_eq!(
        policy.rule_label(RuleRef {
            vendor: 0,
            index: 0
        }),
        "acme.toml#1"
    );
}

#[test]
fn read_past_range_names_first_address_outside() {
    let (policy, clock) = (policy(), Clock::new());
    let decision = policy.decide(ACME_ID, PRESS, &read(3, 990, 20), &clock.acme());
    assert_eq!(
        decision,
        denied(DenyReason::AddressNotAllowed { address: 1000 })
    );
}

#[test]
fn quantity_outside_range_is_denied() {
    let (policy, clock) = (policy(), Clock::new());
    let decision = policy.decide(ACME_ID, PRESS, &read(4, 0, 101), &clock.acme());
    assert_eq!(
        decision,
        denied(DenyReason::QuantityNotAllowed { quantity: 101 })
    );
}

#[test]
fn function_no_rule_names_is_denied() {
    let (policy, clock) = (policy(), Clock::new());
    let decision = policy.decide(ACME_ID, PRESS, &read(1, 0, 1), &clock.acme());
    assert_eq!(
        decision,
        denied(DenyReason::FunctionNotAllowed { function: 1 })
    );
}

#[test]
fn device_without_rules_is_denied() {
    let (policy, clock) = (policy(), Clock::new());
    let decision = policy.decide(ACME_ID, DRYER, &read(3, 0, 1), &clock.acme());
    assert_eq!(decision, denied(DenyReason::NoRuleForDevice));
}

#[test]
fn ids_outside_policy_are_denied() {
    let (policy, clock) = (policy(), Clock::new());
    let no_rule = denied(DenyReason::NoRuleForDevice);
    assert_eq!(
        policy.decide(7, PRESS, &read(3, 0, 1), &clock.acme()),
        no_rule
    );
    assert_eq!(
        policy.decide(ACME_ID, 7, &read(3, 0, 1), &clock.acme()),
        no_rule
    );
}

#[test]
fn write_in_maintenance_is_allowed() {
    let (policy, clock) = (policy(), Clock::with_mode(1));
    let decision = policy.decide(ACME_ID, PRESS, &write_register(105, 4000), &clock.acme());
    assert_eq!(decision, allowed(0, 1));
}

#[test]
fn state_range_maps_to_its_value_name() {
    let (policy, clock) = (policy(), Clock::with_mode(7));
    let decision = policy.decide(ACME_ID, PRESS, &write_register(105, 4000), &clock.acme());
    assert_eq!(decision, allowed(0, 1));
}

#[test]
fn write_in_production_fails_state_condition() {
    let (policy, clock) = (policy(), Clock::with_mode(0));
    let decision = policy.decide(ACME_ID, PRESS, &write_register(105, 4000), &clock.acme());
    assert_eq!(decision, denied(state_mismatch("production")));
}

#[test]
fn write_with_unknown_state_fails_closed() {
    let policy = policy();
    let never_read = Clock::new();
    let unmapped = Clock::with_mode(10);
    let mut stale = Clock::with_mode(1);
    stale.instant += Duration::from_millis(1501);
    let unknown = denied(DenyReason::StateUnknown {
        state: Arc::from("press-1-mode"),
    });
    for clock in [never_read, unmapped, stale] {
        let decision = policy.decide(ACME_ID, PRESS, &write_register(105, 4000), &clock.acme());
        assert_eq!(decision, unknown);
    }
}

#[test]
fn state_within_max_age_is_used() {
    let policy = policy();
    let mut clock = Clock::with_mode(1);
    clock.instant += Duration::from_millis(1500);
    let decision = policy.decide(ACME_ID, PRESS, &write_register(105, 4000), &clock.acme());
    assert_eq!(decision, allowed(0, 1));
    assert_eq!(
        policy
            .state_value(&clock.table, MODE, clock.instant)
            .map(|v| &**v),
        Some("maintenance")
    );
}

#[test]
fn value_failure_beats_address_failure_of_other_rule() {
    let (policy, clock) = (policy(), Clock::with_mode(1));
    // Rule 2 covers 105 but not 6000; rule 8 does not cover 105.
    let decision = policy.decide(ACME_ID, PRESS, &write_register(105, 6000), &clock.acme());
    assert_eq!(
        decision,
        denied(DenyReason::ValueNotAllowed {
            address: 105,
            value: 6000
        })
    );
    // Rule 2 does not cover 205; rule 8 covers 205 but not 50.
    let decision = policy.decide(ACME_ID, PRESS, &write_register(205, 50), &clock.acme());
    assert_eq!(
        decision,
        denied(DenyReason::ValueNotAllowed {
            address: 205,
            value: 50
        })
    );
    let decision = policy.decide(ACME_ID, PRESS, &write_register(205, 5), &clock.acme());
    assert_eq!(decision, allowed(0, 7));
}

#[test]
fn address_failure_is_reported_when_no_rule_covers_address() {
    let (policy, clock) = (policy(), Clock::with_mode(1));
    let decision = policy.decide(ACME_ID, PRESS, &write_register(150, 1), &clock.acme());
    assert_eq!(
        decision,
        denied(DenyReason::AddressNotAllowed { address: 150 })
    );
}

#[test]
fn multiple_register_write_checks_every_value() {
    let (policy, clock) = (policy(), Clock::with_mode(1));
    let values = [0x00, 0x01, 0x13, 0x88, 0x13, 0x89];
    let request = ModbusAccess {
        write: Some((110, 3)),
        quantity: Some(3),
        values: WrittenValues::Registers(&values),
        ..access(16)
    };
    let decision = policy.decide(ACME_ID, PRESS, &request, &clock.acme());
    assert_eq!(
        decision,
        denied(DenyReason::ValueNotAllowed {
            address: 112,
            value: 5001
        })
    );
    let request = ModbusAccess {
        write: Some((110, 2)),
        values: WrittenValues::Registers(&values[..4]),
        ..request
    };
    assert_eq!(
        policy.decide(ACME_ID, PRESS, &request, &clock.acme()),
        allowed(0, 1)
    );
}

#[test]
fn short_register_values_are_denied() {
    let (policy, clock) = (policy(), Clock::with_mode(1));
    let request = ModbusAccess {
        write: Some((110, 2)),
        values: WrittenValues::Registers(&[0x00, 0x01, 0x00]),
        ..access(16)
    };
    let decision = policy.decide(ACME_ID, PRESS, &request, &clock.acme());
    assert_eq!(
        decision,
        denied(DenyReason::ValueNotAllowed {
            address: 111,
            value: 0
        })
    );
}

#[test]
fn read_write_needs_both_ranges_in_one_rule() {
    let (policy, clock) = (policy(), Clock::with_mode(1));
    let values = [0x00, 0x0A];
    let both_in_rule_2 = ModbusAccess {
        read: Some((100, 5)),
        write: Some((110, 1)),
        values: WrittenValues::Registers(&values),
        ..access(23)
    };
    let decision = policy.decide(ACME_ID, PRESS, &both_in_rule_2, &clock.acme());
    assert_eq!(decision, allowed(0, 1));

    // Rule 7 covers the read and rule 2 the write, but neither covers both.
    let split = ModbusAccess {
        read: Some((0, 5)),
        ..both_in_rule_2
    };
    let decision = policy.decide(ACME_ID, PRESS, &split, &clock.acme());
    assert_eq!(
        decision,
        denied(DenyReason::AddressNotAllowed { address: 0 })
    );
}

#[test]
fn mask_write_needs_every_result_allowed() {
    let (policy, clock) = (policy(), Clock::with_mode(1));
    let mask = |and_mask, or_mask| ModbusAccess {
        write: Some((105, 1)),
        values: WrittenValues::Mask { and_mask, or_mask },
        ..access(22)
    };
    // Results range from 0x1000 to 0x10FF (4096 to 4351).
    let decision = policy.decide(ACME_ID, PRESS, &mask(0x00FF, 0x1000), &clock.acme());
    assert_eq!(decision, allowed(0, 1));
    // Results can reach 0x1FFF (8191).
    let decision = policy.decide(ACME_ID, PRESS, &mask(0x0FFF, 0x1000), &clock.acme());
    assert_eq!(
        decision,
        denied(DenyReason::MaskNotAllowed {
            and_mask: 0x0FFF,
            or_mask: 0x1000
        })
    );
}

#[test]
fn coil_writes_check_each_bit() {
    let (policy, clock) = (policy(), Clock::new());
    let single = |on| ModbusAccess {
        write: Some((5, 1)),
        values: WrittenValues::Coil(on),
        ..access(5)
    };
    assert_eq!(
        policy.decide(ACME_ID, PRESS, &single(false), &clock.acme()),
        allowed(0, 2)
    );
    assert_eq!(
        policy.decide(ACME_ID, PRESS, &single(true), &clock.acme()),
        denied(DenyReason::ValueNotAllowed {
            address: 5,
            value: 1
        })
    );

    let multiple = |packed: &'static [u8]| ModbusAccess {
        write: Some((20, 10)),
        quantity: Some(10),
        values: WrittenValues::Coils { packed, count: 10 },
        ..access(15)
    };
    assert_eq!(
        policy.decide(ACME_ID, PRESS, &multiple(&[0x00, 0x00]), &clock.acme()),
        allowed(0, 2)
    );
    // Bit 9 is coil 29; bits past the count are ignored.
    assert_eq!(
        policy.decide(ACME_ID, PRESS, &multiple(&[0x00, 0x02]), &clock.acme()),
        denied(DenyReason::ValueNotAllowed {
            address: 29,
            value: 1
        })
    );
    assert_eq!(
        policy.decide(ACME_ID, PRESS, &multiple(&[0x00, 0xFC]), &clock.acme()),
        allowed(0, 2)
    );
}

#[test]
fn diagnostics_allow_all_but_listen_only_by_default() {
    let (policy, clock) = (policy(), Clock::new());
    let diagnostics = |sub_function| ModbusAccess {
        sub_function: Some(sub_function),
        ..access(8)
    };
    assert_eq!(
        policy.decide(ACME_ID, PRESS, &diagnostics(0), &clock.acme()),
        allowed(0, 3)
    );
    assert_eq!(
        policy.decide(ACME_ID, PRESS, &diagnostics(4), &clock.acme()),
        denied(DenyReason::SubFunctionNotAllowed { sub_function: 4 })
    );
    let historian = clock.context("::1", MONDAY_MORNING);
    assert_eq!(
        policy.decide(HISTORIAN_ID, PRESS, &diagnostics(4), &historian),
        allowed(1, 1)
    );
    assert_eq!(
        policy.decide(HISTORIAN_ID, PRESS, &diagnostics(1), &historian),
        denied(DenyReason::SubFunctionNotAllowed { sub_function: 1 })
    );
}

#[test]
fn mei_types_limit_encapsulated_interface() {
    let (policy, clock) = (policy(), Clock::new());
    let request = |mei_type| ModbusAccess {
        mei_type: Some(mei_type),
        ..access(43)
    };
    assert_eq!(
        policy.decide(ACME_ID, PRESS, &request(14), &clock.acme()),
        allowed(0, 3)
    );
    assert_eq!(
        policy.decide(ACME_ID, PRESS, &request(13), &clock.acme()),
        denied(DenyReason::MeiTypeNotAllowed { mei_type: 13 })
    );
}

#[test]
fn schedule_and_sources_conditions_apply() {
    let (policy, clock) = (policy(), Clock::new());
    let request = read(3, 0, 10);
    let monday = clock.context("10.50.1.7", MONDAY_MORNING);
    assert_eq!(
        policy.decide(ACME_ID, OVEN, &request, &monday),
        allowed(0, 4)
    );

    let saturday = clock.context("10.50.1.7", "2026-12-12T08:00:00Z");
    assert_eq!(
        policy.decide(ACME_ID, OVEN, &request, &saturday),
        denied(DenyReason::ConditionFailed {
            condition: Condition::Schedule
        })
    );
    let evening = clock.context("10.50.1.7", "2026-12-14T16:00:00Z");
    assert_eq!(
        policy.decide(ACME_ID, OVEN, &request, &evening),
        denied(DenyReason::ConditionFailed {
            condition: Condition::Schedule
        })
    );
    let other_subnet = clock.context("10.50.2.7", MONDAY_MORNING);
    assert_eq!(
        policy.decide(ACME_ID, OVEN, &request, &other_subnet),
        denied(DenyReason::ConditionFailed {
            condition: Condition::Source {
                source: "10.50.2.7".parse().unwrap()
            }
        })
    );
}

#[test]
fn schedule_follows_daylight_saving_time() {
    let (policy, clock) = (policy(), Clock::new());
    let request = read(3, 0, 10);
    // Monday 2026-03-30 is in CEST, UTC+2: 07:00 local is 05:00 UTC.
    let before = clock.context("10.50.1.7", "2026-03-30T04:59:59Z");
    let at_start = clock.context("10.50.1.7", "2026-03-30T05:00:00Z");
    assert!(matches!(
        policy.decide(ACME_ID, OVEN, &request, &before),
        Decision::Deny { .. }
    ));
    assert_eq!(
        policy.decide(ACME_ID, OVEN, &request, &at_start),
        allowed(0, 4)
    );
    // Monday 2026-10-26 is in CET, UTC+1: 17:00 local is 16:00 UTC.
    let last = clock.context("10.50.1.7", "2026-10-26T15:59:59Z");
    let at_end = clock.context("10.50.1.7", "2026-10-26T16:00:00Z");
    assert_eq!(policy.decide(ACME_ID, OVEN, &request, &last), allowed(0, 4));
    assert!(matches!(
        policy.decide(ACME_ID, OVEN, &request, &at_end),
        Decision::Deny { .. }
    ));
}

#[test]
fn dated_window_condition_applies() {
    let (policy, clock) = (policy(), Clock::new());
    let request = write_register(10, 1);
    let inside = clock.context("10.50.1.7", "2030-12-10T07:00:00Z");
    assert_eq!(
        policy.decide(ACME_ID, OVEN, &request, &inside),
        allowed(0, 5)
    );
    let after = clock.context("10.50.1.7", "2030-12-10T11:00:00Z");
    assert_eq!(
        policy.decide(ACME_ID, OVEN, &request, &after),
        denied(DenyReason::ConditionFailed {
            condition: Condition::Window
        })
    );
}

#[test]
fn exception_codes_and_texts_per_reason() {
    let cases: Vec<(DenyReason, u8, &str)> = vec![
        (DenyReason::NoRuleForDevice, 1, "no rule for this device"),
        (
            DenyReason::FunctionNotAllowed { function: 6 },
            1,
            "function 6 (write_single_register) not allowed",
        ),
        (
            DenyReason::FunctionNotAllowed { function: 100 },
            1,
            "function 100 not allowed",
        ),
        (
            DenyReason::SubFunctionNotAllowed { sub_function: 4 },
            1,
            "diagnostics sub-function 4 not allowed",
        ),
        (
            DenyReason::MeiTypeNotAllowed { mei_type: 13 },
            1,
            "MEI type 13 not allowed",
        ),
        (
            DenyReason::AddressNotAllowed { address: 1000 },
            2,
            "address 1000 outside allowed ranges",
        ),
        (
            DenyReason::QuantityNotAllowed { quantity: 101 },
            3,
            "quantity 101 outside allowed range",
        ),
        (
            DenyReason::ValueNotAllowed {
                address: 105,
                value: 6000,
            },
            3,
            "value 6000 at address 105 outside allowed values",
        ),
        (
            DenyReason::MaskNotAllowed {
                and_mask: 0x0FFF,
                or_mask: 0x1000,
            },
            3,
            "mask write with AND 0x0fff OR 0x1000 can leave a value outside allowed values",
        ),
        (
            state_mismatch("production"),
            1,
            "state press-1-mode is production, rule requires maintenance",
        ),
        (
            DenyReason::StateUnknown {
                state: Arc::from("press-1-mode"),
            },
            1,
            "state press-1-mode unknown",
        ),
        (
            DenyReason::ConditionFailed {
                condition: Condition::Schedule,
            },
            1,
            "outside the rule's schedule",
        ),
        (
            DenyReason::ConditionFailed {
                condition: Condition::Window,
            },
            1,
            "outside the rule's dated windows",
        ),
        (
            DenyReason::ConditionFailed {
                condition: Condition::Source {
                    source: "10.0.0.1".parse().unwrap(),
                },
            },
            1,
            "source 10.0.0.1 outside the rule's sources",
        ),
    ];
    for (reason, code, text) in cases {
        assert_eq!(reason.exception_code(), code, "{reason:?}");
        assert_eq!(reason.to_string(), text);
    }
}

#[test]
fn identify_finds_vendor_by_source() {
    let policy = policy();
    let identify = |source: &str| policy.identify(source.parse().unwrap());
    assert_eq!(identify("10.50.3.3"), Some(ACME_ID));
    assert_eq!(identify("::1"), Some(HISTORIAN_ID));
    assert_eq!(identify("192.168.7.9"), Some(HISTORIAN_ID));
    assert_eq!(identify("::ffff:10.50.0.1"), Some(ACME_ID));
    assert_eq!(identify("8.8.8.8"), None);
}

#[test]
fn plans_carry_compiled_configuration() {
    let policy = policy();
    assert_eq!(&**policy.gateway_name(), "edge-01");
    assert_eq!(policy.timezone().iana_name(), Some("Europe/Brussels"));

    let scada = &policy.listeners()[0];
    assert_eq!(scada.routes.device_for(1), Some(PRESS));
    assert_eq!(scada.routes.device_for(2), Some(OVEN));
    assert_eq!(scada.routes.device_for(3), None);
    let direct = &policy.listeners()[1];
    assert_eq!(direct.routes, Routes::Device(OVEN));
    assert_eq!(direct.routes.device_for(200), Some(OVEN));
    assert_eq!((direct.mode, direct.on_deny), (Mode::Monitor, OnDeny::Drop));

    assert_eq!(policy.devices()[OVEN].unit, 2);
    let mode = &policy.states()[MODE];
    assert_eq!(mode.device, PRESS);
    assert_eq!(mode.max_age, Duration::from_millis(1500));
    let names: Vec<&str> = mode.value_names.iter().map(|name| &**name).collect();
    assert_eq!(names, ["production", "maintenance"]);
    assert_eq!(mode.value_of(0), Some(0));
    assert_eq!(mode.value_of(5), Some(1));
    assert_eq!(mode.value_of(10), None);

    assert_eq!(&**policy.vendor_name(HISTORIAN_ID), "historian");
    assert_eq!(&**policy.vendor_name(9), "unknown");
    assert_eq!(policy.vendor_max_sessions(ACME_ID), Some(4));
    assert_eq!(policy.vendor_max_sessions(HISTORIAN_ID), None);
    assert_eq!(
        policy.rule_label(RuleRef {
            vendor: 1,
            index: 1
        }),
        "historian.toml#2"
    );
    assert_eq!(
        policy.rule_label(RuleRef {
            vendor: 1,
            index: 2
        }),
        "unknown"
    );
    assert_eq!(policy.files().len(), 3);
    assert_eq!(policy.audit().sync, AuditSync::Batch);
}

#[test]
fn load_returns_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.toml"), "[gateway]\nname = 5\n").unwrap();
    let error = Policy::load(&dir.path().join("gateway.toml")).unwrap_err();
    assert_eq!(error.errors.len(), 1);
    assert_eq!((error.errors[0].line, error.errors[0].column), (2, 8));
    assert_eq!(
        error.errors[0].message,
        "invalid type: integer `5`, expected a string"
    );
}

fn built_config(vendors: Vec<VendorConfig>) -> Config {
    let device = DeviceConfig::new("press-1", "127.0.0.1:5021".parse().unwrap());
    Config {
        gateway: GatewayConfig {
            name: "built".into(),
            timezone: jiff::tz::TimeZone::UTC,
            rules_dir: "rules".into(),
        },
        listeners: vec![ListenerConfig {
            name: "north".into(),
            bind: "127.0.0.1:5020".parse().unwrap(),
            mode: Mode::Enforce,
            on_deny: OnDeny::Exception,
            target: config::ListenerTarget::Device("press-1".into()),
            limits: ListenerLimits::default(),
            mirror_only: false,
            tls: None,
            opcua: None,
            origin: Default::default(),
        }],
        devices: vec![device],
        opcua_devices: Vec::new(),
        states: Vec::new(),
        audit: AuditConfig::new("audit".into()),
        metrics: None,
        tags: Vec::new(),
        vendors,
        files: Vec::new(),
    }
}

fn built_vendor(name: &str, source: &str, rules: Vec<RuleConfig>) -> VendorConfig {
    VendorConfig {
        name: name.into(),
        file_name: format!("{name}.toml"),
        sources: vec![source.parse().unwrap()],
        max_sessions: None,
        certificate: Default::default(),
        rate: None,
        rules,
        opcua_users: Vec::new(),
        opcua_user_certificates: Vec::new(),
        opcua_anonymous: false,
        origin: Default::default(),
    }
}

#[test]
fn compile_accepts_configuration_built_in_code() {
    let mut rule = RuleConfig::new("press-1", &[3]);
    rule.addresses = vec![Range16::new(0, 9)];
    let config = built_config(vec![built_vendor("acme", "10.0.0.0/8", vec![rule])]);
    let (policy, warnings) = Policy::compile(&config).unwrap();
    assert_eq!(warnings, []);
    let clock = Clock::new();
    let context = clock.context("10.1.1.1", MONDAY_MORNING);
    assert_eq!(
        policy.decide(0, 0, &read(3, 0, 10), &context),
        allowed(0, 0)
    );
    assert_eq!(
        policy.decide(0, 0, &read(3, 0, 11), &context),
        denied(DenyReason::AddressNotAllowed { address: 10 })
    );
}

#[test]
fn compile_rejects_dangling_names_and_overlaps() {
    let rule = RuleConfig::new("press-9", &[3]);
    let config = built_config(vec![
        built_vendor("acme", "10.0.0.0/8", vec![rule]),
        built_vendor("beta", "10.1.0.0/16", Vec::new()),
    ]);
    let error = Policy::compile(&config).unwrap_err();
    let messages: Vec<&str> = error.errors.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "unknown device \"press-9\"",
            "vendor \"beta\": source 10.1.0.0/16 overlaps 10.0.0.0/8 of vendor \"acme\"",
        ]
    );
}

fn rate(requests: Option<u64>, writes: Option<u64>, burst: Option<u32>) -> Option<RateConfig> {
    Some(RateConfig {
        requests_per_second: requests.map(Rate::per_second),
        writes_per_second: writes.map(Rate::per_second),
        burst,
    })
}

fn rate_limited(scope: RateScope, kind: RateKind, per_second: u64, burst: u32) -> Decision {
    denied(DenyReason::RateLimited {
        scope,
        limit: RateLimit {
            kind,
            rate: Rate::per_second(per_second),
            burst,
        },
    })
}

fn vendor_scope(name: &str) -> RateScope {
    RateScope::Vendor {
        name: Arc::from(name),
    }
}

fn rule_scope(label: &str) -> RateScope {
    RateScope::Rule {
        label: Arc::from(label),
    }
}

/// Returns a context at `instant`, which tests move forward instead of sleeping.
fn context_at(states: &StateTable, instant: Instant) -> Context<'_> {
    Context {
        source: "10.1.1.1".parse().unwrap(),
        role: None,
        now: MONDAY_MORNING.parse().unwrap(),
        instant,
        states,
    }
}

#[test]
fn vendor_rate_allows_burst_then_busy_until_refill() {
    let mut rule = RuleConfig::new("press-1", &[3]);
    rule.addresses = vec![Range16::new(0, 9)];
    let mut vendor = built_vendor("acme", "10.0.0.0/8", vec![rule]);
    vendor.rate = rate(Some(50), None, Some(10));
    let (policy, _) = Policy::compile(&built_config(vec![vendor])).unwrap();
    let states = StateTable::new(0);
    let start = Instant::now();
    let now = context_at(&states, start);

    for _ in 0..10 {
        assert_eq!(policy.decide(0, 0, &read(3, 0, 1), &now), allowed(0, 0));
    }
    let busy = policy.decide(0, 0, &read(3, 0, 1), &now);
    let expected = rate_limited(vendor_scope("acme"), RateKind::Requests, 50, 10);
    assert_eq!(busy, expected);
    let Decision::Deny { reason } = busy else {
        panic!("expected a denial");
    };
    assert_eq!(reason.exception_code(), 0x06);
    assert_eq!(
        reason.to_string(),
        "rate limit of vendor acme reached: 50 requests per second, burst 10"
    );

    // 50 per second refills one token every 20 ms.
    let early = context_at(&states, start + Duration::from_nanos(19_999_999));
    assert_eq!(policy.decide(0, 0, &read(3, 0, 1), &early), expected);
    let refilled = context_at(&states, start + Duration::from_millis(20));
    assert_eq!(
        policy.decide(0, 0, &read(3, 0, 1), &refilled),
        allowed(0, 0)
    );
    assert_eq!(policy.decide(0, 0, &read(3, 0, 1), &refilled), expected);
}

#[test]
fn vendor_rate_counts_denied_requests_and_writes() {
    let mut reads = RuleConfig::new("press-1", &[3]);
    reads.addresses = vec![Range16::new(0, 9)];
    let mut writes = RuleConfig::new("press-1", &[6]);
    writes.addresses = vec![Range16::new(0, 9)];
    let mut vendor = built_vendor("acme", "10.0.0.0/8", vec![reads, writes]);
    vendor.rate = rate(Some(100), Some(20), Some(3));
    let (policy, _) = Policy::compile(&built_config(vec![vendor])).unwrap();
    let states = StateTable::new(0);
    let start = Instant::now();
    let now = context_at(&states, start);

    // A denied read takes a request token too.
    assert_eq!(
        policy.decide(0, 0, &read(3, 50, 1), &now),
        denied(DenyReason::AddressNotAllowed { address: 50 })
    );
    assert_eq!(
        policy.decide(0, 0, &write_register(1, 7), &now),
        allowed(0, 1)
    );
    assert_eq!(
        policy.decide(0, 0, &write_register(2, 7), &now),
        allowed(0, 1)
    );
    assert_eq!(
        policy.decide(0, 0, &write_register(3, 7), &now),
        rate_limited(vendor_scope("acme"), RateKind::Requests, 100, 3)
    );

    // After 50 ms the request bucket (100 per second) is full again, with 3
    // tokens, and the write bucket (20 per second) has 2: one left and one
    // refilled.
    let later = context_at(&states, start + Duration::from_millis(50));
    assert_eq!(
        policy.decide(0, 0, &write_register(3, 7), &later),
        allowed(0, 1)
    );
    assert_eq!(
        policy.decide(0, 0, &write_register(4, 7), &later),
        allowed(0, 1)
    );
    assert_eq!(
        policy.decide(0, 0, &write_register(5, 7), &later),
        rate_limited(vendor_scope("acme"), RateKind::Writes, 20, 3)
    );
    // The refused write gave its request token back.
    assert_eq!(policy.decide(0, 0, &read(3, 0, 1), &later), allowed(0, 0));
    assert_eq!(
        policy.decide(0, 0, &read(3, 0, 1), &later),
        rate_limited(vendor_scope("acme"), RateKind::Requests, 100, 3)
    );
}

#[test]
fn rule_rate_counts_allowed_requests_only() {
    let mut limited = RuleConfig::new("press-1", &[6]);
    limited.addresses = vec![Range16::new(0, 9)];
    limited.values = Some(vec![Range16::new(0, 100)]);
    limited.rate = rate(None, Some(2), Some(2));
    let mut reads = RuleConfig::new("press-1", &[3]);
    reads.addresses = vec![Range16::new(0, 9)];
    let vendor = built_vendor("acme", "10.0.0.0/8", vec![limited, reads]);
    let (policy, _) = Policy::compile(&built_config(vec![vendor])).unwrap();
    let states = StateTable::new(0);
    let start = Instant::now();
    let now = context_at(&states, start);

    // A write the rule denies for its value takes no token.
    assert_eq!(
        policy.decide(0, 0, &write_register(1, 500), &now),
        denied(DenyReason::ValueNotAllowed {
            address: 1,
            value: 500
        })
    );
    for _ in 0..20 {
        assert_eq!(policy.decide(0, 0, &read(3, 0, 1), &now), allowed(0, 1));
    }
    assert_eq!(
        policy.decide(0, 0, &write_register(1, 5), &now),
        allowed(0, 0)
    );
    assert_eq!(
        policy.decide(0, 0, &write_register(1, 5), &now),
        allowed(0, 0)
    );
    let busy = rate_limited(rule_scope("acme.toml#1"), RateKind::Writes, 2, 2);
    assert_eq!(policy.decide(0, 0, &write_register(1, 5), &now), busy);
    let Decision::Deny { reason } = busy else {
        panic!("expected a denial");
    };
    assert_eq!(
        reason.to_string(),
        "rate limit of rule acme.toml#1 reached: 2 writes per second, burst 2"
    );
    let refilled = context_at(&states, start + Duration::from_millis(500));
    assert_eq!(
        policy.decide(0, 0, &write_register(1, 5), &refilled),
        allowed(0, 0)
    );
}

#[test]
fn later_rule_allows_past_rule_limit() {
    let mut limited = RuleConfig::new("press-1", &[3]);
    limited.addresses = vec![Range16::new(0, 9)];
    limited.rate = rate(Some(1), None, Some(1));
    let mut open = RuleConfig::new("press-1", &[3]);
    open.addresses = vec![Range16::new(0, 99)];
    let vendor = built_vendor("acme", "10.0.0.0/8", vec![limited, open]);
    let (policy, _) = Policy::compile(&built_config(vec![vendor])).unwrap();
    let states = StateTable::new(0);
    let now = context_at(&states, Instant::now());
    assert_eq!(policy.decide(0, 0, &read(3, 0, 1), &now), allowed(0, 0));
    assert_eq!(policy.decide(0, 0, &read(3, 0, 1), &now), allowed(0, 1));
}

#[test]
fn empty_schedule_or_window_never_matches() {
    let mut weekly = RuleConfig::new("press-1", &[3]);
    weekly.addresses = vec![Range16::new(0, 9)];
    weekly.when.schedule = Some(Vec::new());
    let mut dated = RuleConfig::new("press-1", &[4]);
    dated.addresses = vec![Range16::new(0, 9)];
    dated.when.window = Some(Vec::new());
    let vendor = built_vendor("acme", "10.0.0.0/8", vec![weekly, dated]);
    let (policy, _) = Policy::compile(&built_config(vec![vendor])).unwrap();
    let clock = Clock::new();
    let context = clock.context("10.1.1.1", MONDAY_MORNING);
    assert_eq!(
        policy.decide(0, 0, &read(3, 0, 1), &context),
        denied(DenyReason::ConditionFailed {
            condition: Condition::Schedule
        })
    );
    assert_eq!(
        policy.decide(0, 0, &read(4, 0, 1), &context),
        denied(DenyReason::ConditionFailed {
            condition: Condition::Window
        })
    );
}

/// Parses a query at a fixed default time, Monday 09:00 in Brussels.
fn query(policy: &Policy, text: &str) -> ExplainQuery {
    match ExplainQuery::parse_at(policy, text, MONDAY_MORNING.parse().unwrap()) {
        Ok(query) => query,
        Err(error) => panic!("query {text:?} failed: {error}"),
    }
}

#[test]
fn explain_and_decide_agree() {
    let policy = policy();
    let cases = [
        ("vendor=acme device=press-1 function=3 address=0 quantity=100", "allow acme.toml#1"),
        ("vendor=acme device=press-1 function=read_holding_registers address=990 quantity=20", "deny (exception 02): address 1000 outside allowed ranges"),
        ("vendor=acme device=press-1 function=read_input_registers address=0 quantity=101", "deny (exception 03): quantity 101 outside allowed range"),
        ("vendor=acme device=press-1 function=read_coils address=0", "deny (exception 01): function 1 (read_coils) not allowed"),
        ("vendor=acme device=dryer-3 function=3 address=0", "deny (exception 01): no rule for this device"),
        ("vendor=acme device=press-1 function=write_single_register address=105 value=4000 state.press-1-mode=maintenance", "allow acme.toml#2"),
        ("vendor=acme device=press-1 function=write_single_register address=105 value=4000 state.press-1-mode=production", "deny (exception 01): state press-1-mode is production, rule requires maintenance"),
        ("vendor=acme device=press-1 function=write_single_register address=105 value=4000", "deny (exception 01): state press-1-mode unknown"),
        ("vendor=acme device=press-1 function=write_single_register address=105 value=6000 state.press-1-mode=maintenance", "deny (exception 03): value 6000 at address 105 outside allowed values"),
        ("vendor=acme device=press-1 function=write_single_register address=205 value=10", "allow acme.toml#8"),
        ("vendor=acme device=press-1 function=write_multiple_registers address=100 value=1,2 value=3 state.press-1-mode=maintenance", "allow acme.toml#2"),
        ("vendor=acme device=press-1 function=write_multiple_registers address=100 value=1,9000 state.press-1-mode=maintenance", "deny (exception 03): value 9000 at address 101 outside allowed values"),
        ("vendor=acme device=press-1 function=write_multiple_coils address=0 value=0,0,0", "allow acme.toml#3"),
        ("vendor=acme device=press-1 function=write_multiple_coils address=0 value=0,1", "deny (exception 03): value 1 at address 1 outside allowed values"),
        ("vendor=acme device=press-1 function=mask_write_register address=100 value=0xff00,0x0012 state.press-1-mode=maintenance", "deny (exception 03): mask write with AND 0xff00 OR 0x0012 can leave a value outside allowed values"),
        ("vendor=acme device=press-1 function=read_write_multiple_registers address=0 quantity=2 write_address=5 value=1", "allow acme.toml#7"),
        ("vendor=acme device=press-1 function=diagnostics sub_function=0", "allow acme.toml#4"),
        ("vendor=acme device=press-1 function=diagnostics sub_function=4", "deny (exception 01): diagnostics sub-function 4 not allowed"),
        ("vendor=acme device=press-1 function=read_device_identification", "allow acme.toml#4"),
        ("vendor=acme device=press-1 function=43 mei_type=13", "deny (exception 01): MEI type 13 not allowed"),
        ("vendor=acme device=oven-2 function=3 address=0 source=10.50.1.7", "allow acme.toml#5"),
        ("vendor=acme device=oven-2 function=3 address=0 source=10.50.2.7", "deny (exception 01): source 10.50.2.7 outside the rule's sources"),
        ("vendor=acme device=oven-2 function=3 address=0 source=10.50.1.7 time=2026-12-13T09:00", "deny (exception 01): outside the rule's schedule"),
        ("vendor=acme device=oven-2 function=6 address=10 value=1 time=2030-12-10T08:00", "allow acme.toml#6"),
        ("vendor=acme device=oven-2 function=6 address=10 value=1 time=2030-12-10T06:59Z", "deny (exception 01): outside the rule's dated windows"),
        ("vendor=historian device=press-1 function=diagnostics sub_function=4", "allow historian.toml#2"),
    ];
    for (text, first_line) in cases {
        let query = query(&policy, text);
        let explanation = policy.explain(&query);
        assert_eq!(explanation.lines[0], first_line, "query {text}");

        let instant = Instant::now();
        let table = policy.query_states(&query, instant);
        let context = Context {
            source: query.source,
            role: None,
            now: query.time.timestamp(),
            instant,
            states: &table,
        };
        let decision = policy.decide(query.vendor, query.device, &query.access(), &context);
        assert_eq!(decision, explanation.decision, "query {text}");
    }
}

#[test]
fn explain_lists_failed_check_per_rule() {
    let policy = policy();
    let text = "vendor=acme device=press-1 function=write_single_register address=105 value=10 state.press-1-mode=production time=2026-12-10T09:30";
    let explanation = policy.explain(&query(&policy, text));
    assert_eq!(
        explanation.lines,
        [
            "deny (exception 01): state press-1-mode is production, rule requires maintenance",
            "  request: vendor=acme device=press-1 function=write_single_register address=105 value=10 unit=1 source=10.50.0.0 time=2026-12-10T09:30:00+01:00 state.press-1-mode=production",
            "  acme.toml#1: function write_single_register (6) is not in the rule's functions: read_holding_registers (3), read_input_registers (4)",
            "  acme.toml#2: when.state press-1-mode is production, rule needs maintenance",
            "  acme.toml#3: function write_single_register (6) is not in the rule's functions: write_single_coil (5), write_multiple_coils (15)",
            "  acme.toml#4: function write_single_register (6) is not in the rule's functions: diagnostics (8), encapsulated_interface_transport (43)",
            "  acme.toml#7: function write_single_register (6) is not in the rule's functions: read_write_multiple_registers (23)",
            "  acme.toml#8: address 105 is outside the rule's addresses 200-209",
        ]
    );
}

#[test]
fn explain_describes_time_source_and_values() {
    let policy = policy();
    // Each case lists its lines after the request line; "" pads shorter lists.
    let cases = [
        (
            "vendor=acme device=oven-2 function=3 address=0 source=10.60.0.1 time=2026-12-12T09:30",
            [
                "deny (exception 01): source 10.60.0.1 outside the rule's sources",
                "  note: source 10.60.0.1 is outside the sources of vendor acme, so a plain listener would not identify the client as acme",
                "  acme.toml#5: when.sources 10.60.0.1 is outside 10.50.1.0/24",
                "  acme.toml#6: function read_holding_registers (3) is not in the rule's functions: write_single_register (6)",
            ],
        ),
        (
            "vendor=acme device=oven-2 function=3 address=0 source=10.50.1.2 time=2026-12-12T09:30",
            [
                "deny (exception 01): outside the rule's schedule",
                "  acme.toml#5: when.schedule Sat 09:30 is outside Mon-Fri 07:00-17:00",
                "  acme.toml#6: function read_holding_registers (3) is not in the rule's functions: write_single_register (6)",
                "",
            ],
        ),
        (
            "vendor=acme device=oven-2 function=6 address=10 value=3 time=2030-12-10T12:00",
            [
                "deny (exception 01): outside the rule's dated windows",
                "  acme.toml#5: function write_single_register (6) is not in the rule's functions: read_holding_registers (3)",
                "  acme.toml#6: when.window 2030-12-10T12:00 is outside 2030-12-10T08:00/2030-12-10T12:00",
                "",
            ],
        ),
    ];
    for (text, expected) in &cases {
        let lines = policy.explain(&query(&policy, text)).lines;
        let details: Vec<&str> = lines
            .iter()
            .map(String::as_str)
            .filter(|line| !line.starts_with("  request: "))
            .collect();
        let expected: Vec<&str> = expected.iter().copied().filter(|l| !l.is_empty()).collect();
        assert_eq!(details, expected, "query {text}");
    }
}

#[test]
fn explain_names_value_and_unknown_state() {
    let policy = policy();
    let text = "vendor=acme device=press-1 function=write_single_register address=205 value=60";
    let lines = policy.explain(&query(&policy, text)).lines;
    assert_eq!(
        lines[0],
        "deny (exception 03): value 60 at address 205 outside allowed values"
    );
    assert_eq!(
        lines[3],
        "  acme.toml#2: address 205 is outside the rule's addresses 100-119"
    );
    assert_eq!(
        lines[7],
        "  acme.toml#8: value 60 at address 205 is outside the rule's values 0-10"
    );

    let text = "vendor=acme device=press-1 function=write_single_register address=105 value=60";
    let lines = policy.explain(&query(&policy, text)).lines;
    assert_eq!(
        lines[3],
        "  acme.toml#2: when.state press-1-mode is unknown, rule needs maintenance"
    );
}

#[test]
fn explain_reports_allowing_rule_and_sub_functions() {
    let policy = policy();
    let text = "vendor=historian device=press-1 function=diagnostics sub_function=4 source=::1";
    let lines = policy.explain(&query(&policy, text)).lines;
    assert_eq!(
        lines,
        [
            "allow historian.toml#2",
            "  request: vendor=historian device=press-1 function=diagnostics unit=1 sub_function=4 source=::1 time=2026-12-14T09:00:00+01:00",
            "  historian.toml#1: function diagnostics (8) is not in the rule's functions: read_input_registers (4)",
            "  historian.toml#2: allows",
        ]
    );
    let text = "vendor=acme device=press-1 function=diagnostics sub_function=4";
    let lines = policy.explain(&query(&policy, text)).lines;
    assert_eq!(
        lines[5],
        "  acme.toml#4: sub_function 4 (force listen only) must be named in the rule's sub_functions"
    );
}

#[test]
fn explain_rejects_invalid_queries_naming_the_key() {
    let policy = policy();
    let cases = [
        ("vendor=acme device=press-1 function=3 address=0 colour=red", "colour: unknown key; use vendor, device, function, address, quantity, write_address, value, unit, sub_function, mei_type, source, role, time, state.NAME"),
        ("vendor=beta device=press-1 function=3", "vendor: unknown vendor \"beta\"; known vendors: acme, historian"),
        ("vendor=acme device=press-9 function=3", "device: unknown device \"press-9\"; known devices: press-1, oven-2, dryer-3"),
        ("vendor=acme device=press-1 function=read_holding_register address=0", "function: unknown function \"read_holding_register\"; use a code from 1 to 127 or a function name, such as read_holding_registers"),
        ("vendor=acme device=press-1 function=200", "function: function code 200 outside 1..=127"),
        ("vendor=acme device=press-1 function=3 address=ten", "address: invalid number \"ten\"; write a number from 0 to 65535"),
        ("vendor=acme device=press-1 function=3 address=70000", "address: 70000 exceeds 65535"),
        ("vendor=acme device=press-1 function=3", "address: missing; the function addresses a table, give address=N"),
        ("vendor=acme device=press-1 function=6 address=1", "value: missing; write_single_register (6) writes values, give the written value, as value=10"),
        ("vendor=acme device=press-1 function=3 address=1 value=4", "value: a read_holding_registers (3) request has none; remove the key"),
        ("vendor=acme device=press-1 function=5 address=1 value=2", "value: coil value 2 is neither 0 (off) nor 1 (on)"),
        ("vendor=acme device=press-1 function=16 address=1 value=1,2 quantity=3", "quantity: 3 differs from the 2 values given"),
        ("vendor=acme device=press-1 function=8", "sub_function: missing; diagnostics needs one, as sub_function=0"),
        ("vendor=acme device=press-1 function=3 address=1 state.oven-mode=on", "state.oven-mode: unknown state \"oven-mode\"; known states: press-1-mode"),
        ("vendor=acme device=press-1 function=3 address=1 state.press-1-mode=repair", "state.press-1-mode: state press-1-mode has no value \"repair\"; its values: production, maintenance"),
        ("vendor=acme device=press-1 function=3 address=1 source=10.50.1", "source: invalid IP address \"10.50.1\"; write one such as 10.50.1.7 or ::1"),
        ("vendor=acme device=press-1 function=3 address=1 time=tomorrow", "time: invalid time \"tomorrow\"; write a local time such as 2026-12-10T09:30, or add an offset such as 2026-12-10T08:30Z"),
        ("vendor=acme device=press-1 function=3 function=4 address=1", "function: given twice; give it once"),
        ("vendor=acme device=press-1 function", "function: expected KEY=VALUE, such as function=read_holding_registers"),
    ];
    for (text, message) in cases {
        let error = ExplainQuery::parse(&policy, text).unwrap_err();
        assert_eq!(error.to_string(), message, "query {text}");
    }
}

#[test]
fn explain_takes_no_rate_tokens() {
    let mut rule = RuleConfig::new("press-1", &[3]);
    rule.addresses = vec![Range16::new(0, 9)];
    rule.rate = rate(Some(1), None, Some(1));
    let mut vendor = built_vendor("acme", "10.0.0.0/8", vec![rule]);
    vendor.rate = rate(Some(1), None, Some(1));
    let (policy, _) = Policy::compile(&built_config(vec![vendor])).unwrap();
    let text = "vendor=acme device=press-1 function=3 address=0";
    for _ in 0..3 {
        assert_eq!(
            policy.explain(&query(&policy, text)).lines[0],
            "allow acme.toml#1"
        );
    }
}

/// Loads a policy whose only vendor reads press-1 with role Operator or
/// Engineer.
fn role_policy() -> Policy {
    let acme = r#"[vendor]
name = "acme"
sources = ["10.50.0.0/16"]

[[allow]]
device = "press-1"
functions = ["read_holding_registers"]
addresses = ["0-99"]
when.role = ["Operator", "Engineer"]
"#;
    press_policy(&[("acme.toml", acme)])
}

/// Loads a gateway with one listener and the device press-1, and `rules`.
fn press_policy(rules: &[(&str, &str)]) -> Policy {
    let dir = tempfile::tempdir().unwrap();
    let gateway = r#"[gateway]
name = "edge-01"

[[listener]]
name = "scada"
bind = "127.0.0.1:5020"
device = "press-1"

[[device]]
name = "press-1"
address = "127.0.0.1:5021"
"#;
    std::fs::write(dir.path().join("gateway.toml"), gateway).unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    for (name, text) in rules {
        std::fs::write(dir.path().join("rules").join(name), text).unwrap();
    }
    Policy::load(&dir.path().join("gateway.toml")).unwrap().0
}

#[test]
fn role_condition_needs_listed_role() {
    let policy = role_policy();
    let clock = Clock::new();
    let operator = policy.role_id("Operator");
    let engineer = policy.role_id("Engineer");
    assert_eq!(engineer, Some(0));
    assert_eq!(operator, Some(1));
    assert_eq!(policy.role_id("Viewer"), None);

    let decide = |role: Option<RoleId>| {
        let context = Context {
            role,
            ..clock.acme()
        };
        policy.decide(ACME_ID, PRESS, &read(3, 0, 10), &context)
    };
    assert_eq!(
        decide(operator),
        Decision::Allow {
            rule: RuleRef {
                vendor: 0,
                index: 0
            }
        }
    );
    assert!(matches!(decide(engineer), Decision::Allow { .. }));
    let denied = decide(None);
    assert_eq!(
        denied,
        deny(DenyReason::ConditionFailed {
            condition: Condition::Role
        })
    );
    let Decision::Deny { reason } = denied else {
        unreachable!()
    };
    assert_eq!(reason.exception_code(), 1);
    assert_eq!(
        reason.to_string(),
        "certificate role not in the rule's roles"
    );
}

#[test]
fn explain_takes_role() {
    let policy = role_policy();
    let explain = |text: &str| policy.explain(&query(&policy, text)).lines;
    let allowed = explain("vendor=acme device=press-1 function=3 address=0 role=Operator");
    assert_eq!(allowed[0], "allow acme.toml#1");
    let denied = explain("vendor=acme device=press-1 function=3 address=0 role=Viewer");
    let details: Vec<&str> = denied
        .iter()
        .map(String::as_str)
        .filter(|line| !line.starts_with("  request: "))
        .collect();
    assert_eq!(
        details,
        [
            "deny (exception 01): certificate role not in the rule's roles",
            "  acme.toml#1: when.role needs a certificate role of Engineer, Operator",
        ]
    );
}

/// Loads a policy whose vendors are identified by certificate: `acme`
/// restricted to 10.50.0.0/16, `beta` from anywhere.
fn certificate_policy() -> Policy {
    let rules = |name: &str, extra: &str| {
        format!(
            "[vendor]\nname = \"{name}\"\ncertificate_cn = [\"{name}-*\"]\n{extra}\n\n\
             [[allow]]\ndevice = \"press-1\"\nfunctions = [\"read_holding_registers\"]\naddresses = [\"0-99\"]\n"
        )
    };
    let acme = rules("acme", "sources = [\"10.50.0.0/16\"]");
    let beta = rules("beta", "");
    press_policy(&[("acme.toml", &acme), ("beta.toml", &beta)])
}

#[test]
fn explain_notes_source_of_certificate_vendor() {
    let policy = certificate_policy();
    let explain = |text: &str| policy.explain(&query(&policy, text)).lines;

    let outside = explain("vendor=acme device=press-1 function=3 address=0 source=192.168.1.1");
    assert_eq!(outside[0], "allow acme.toml#1");
    assert!(outside.contains(
        &"  note: source 192.168.1.1 is outside the sources of vendor acme, so a TLS listener would reject its certificate from there".to_owned()
    ), "{outside:?}");

    let anywhere = explain("vendor=beta device=press-1 function=3 address=0");
    assert_eq!(anywhere[0], "allow beta.toml#1");
    assert!(anywhere[1].contains(" source=0.0.0.0 "), "{anywhere:?}");
    assert!(
        !anywhere.iter().any(|line| line.contains("note:")),
        "{anywhere:?}"
    );
}
