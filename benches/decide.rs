//! Criterion benchmarks of `Policy::decide` on synthetic configurations of
//! 10, 1,000 and 10,000 rules, for allowed and denied requests. Two more
//! cases decide a rule with a state and a schedule condition, alone and with
//! rate limits on the rule and its vendor among 10,000 rules.
//!
//! Every vendor and device pair has 10 read rules of 100 addresses each, so
//! each decision searches 10 candidate rules. More rules means more vendors
//! and devices, which the per-pair tables keep out of the search.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sluice::config::{
    AuditConfig, Config, DeviceConfig, GatewayConfig, ListenerConfig, ListenerLimits,
    ListenerTarget, Mode, OnDeny, Origin, Range16, Rate, RateConfig, RuleConfig, StateConfig,
    StateKind, StateValueConfig, VendorConfig, WeeklyWindow,
};
use sluice::policy::{Context, Decision, ModbusAccess, Policy, StateTable, WrittenValues};

const RULES_PER_PAIR: usize = 10;
const DEVICES: usize = 10;
const READ_HOLDING_REGISTERS: u8 = 3;
const WRITE_SINGLE_REGISTER: u8 = 6;
/// Monday 2026-12-14, 09:00 in Brussels.
const MONDAY_MORNING: &str = "2026-12-14T08:00:00Z";

fn vendor_source(vendor: usize) -> ipnet::IpNet {
    let address = Ipv4Addr::new(10, (vendor / 256) as u8, (vendor % 256) as u8, 0);
    ipnet::IpNet::new(IpAddr::V4(address), 24).unwrap()
}

fn base_config(devices: usize) -> Config {
    Config {
        gateway: GatewayConfig {
            name: "bench".into(),
            timezone: jiff::tz::TimeZone::get("Europe/Brussels").unwrap(),
            rules_dir: "rules".into(),
        },
        listeners: vec![ListenerConfig {
            name: "north".into(),
            bind: "127.0.0.1:5020".parse().unwrap(),
            mode: Mode::Enforce,
            on_deny: OnDeny::Exception,
            target: ListenerTarget::Device("device-0".into()),
            limits: ListenerLimits::default(),
            mirror_only: false,
            tls: None,
            opcua: None,
            origin: Origin::unknown(),
        }],
        devices: (0..devices)
            .map(|i| DeviceConfig::new(&format!("device-{i}"), "127.0.0.1:5021".parse().unwrap()))
            .collect(),
        opcua_devices: Vec::new(),
        states: Vec::new(),
        audit: AuditConfig::new("audit".into()),
        metrics: None,
        tags: Vec::new(),
        vendors: Vec::new(),
        files: Vec::new(),
    }
}

/// Builds a configuration of `rules` rules: 10 per vendor and device pair.
fn config_with_rules(rules: usize) -> Config {
    let pairs = (rules / RULES_PER_PAIR).max(1);
    let devices = pairs.min(DEVICES);
    let vendors = pairs.div_ceil(devices);
    let mut config = base_config(devices);
    for vendor in 0..vendors {
        let mut vendor_rules = Vec::new();
        for device in 0..devices {
            for index in 0..RULES_PER_PAIR {
                let mut rule =
                    RuleConfig::new(&format!("device-{device}"), &[READ_HOLDING_REGISTERS]);
                let first = (index * 100) as u16;
                rule.addresses = vec![Range16::new(first, first + 99)];
                vendor_rules.push(rule);
            }
        }
        config.vendors.push(VendorConfig {
            name: format!("vendor-{vendor}"),
            file_name: format!("vendor-{vendor}.toml"),
            sources: vec![vendor_source(vendor)],
            max_sessions: None,
            certificate: Default::default(),
            rate: None,
            rules: vendor_rules,
            opcua_users: Vec::new(),
            opcua_user_certificates: Vec::new(),
            opcua_anonymous: false,
            origin: Origin::unknown(),
        });
    }
    config
}

/// Returns the press mode state, read from holding register 900 of `device-0`. Its
/// readings stay fresh for a day, so that benchmarks may move the clock.
fn mode_state() -> StateConfig {
    StateConfig {
        name: "mode".into(),
        device: "device-0".into(),
        kind: StateKind::HoldingRegister,
        address: 900,
        poll: Duration::from_millis(500),
        max_age: Duration::from_secs(86_400),
        values: vec![
            StateValueConfig {
                raw: Range16::new(0, 0),
                name: "production".into(),
            },
            StateValueConfig {
                raw: Range16::new(1, 1),
                name: "maintenance".into(),
            },
        ],
        origin: Origin::unknown(),
    }
}

/// Returns a write rule for `device` that needs the mode to be maintenance and a
/// weekday morning.
fn conditional_write(device: usize) -> RuleConfig {
    let mut rule = RuleConfig::new(&format!("device-{device}"), &[WRITE_SINGLE_REGISTER]);
    rule.addresses = vec![Range16::new(100, 119)];
    rule.values = Some(vec![Range16::new(0, 5000)]);
    rule.when.state = vec![("mode".into(), "maintenance".into())];
    rule.when.schedule = Some(vec![WeeklyWindow {
        days: 0b001_1111,
        start: 7 * 60,
        end: 17 * 60,
    }]);
    rule
}

/// Builds a configuration whose one rule needs a state value and a
/// schedule.
fn config_with_conditions() -> Config {
    let mut config = base_config(1);
    config.states.push(mode_state());
    config.vendors.push(VendorConfig {
        name: "vendor-0".into(),
        file_name: "vendor-0.toml".into(),
        sources: vec![vendor_source(0)],
        max_sessions: None,
        certificate: Default::default(),
        rate: None,
        rules: vec![conditional_write(0)],
        opcua_users: Vec::new(),
        opcua_user_certificates: Vec::new(),
        opcua_anonymous: false,
        origin: Origin::unknown(),
    });
    config
}

/// The rate every bucket of the rate-limited case allows: the benchmark
/// moves the clock one refill interval per decision, so no bucket runs dry.
const BENCH_RATE: u64 = 100_000;

/// Builds 10,000 rules plus, for one vendor and device, the conditional
/// write rule with a rate limit, and a rate limit on that vendor.
fn config_with_rates(vendor: usize, device: usize) -> Config {
    let mut config = config_with_rules(10_000);
    config.states.push(mode_state());
    let limit = RateConfig {
        requests_per_second: Some(Rate::per_second(BENCH_RATE)),
        writes_per_second: Some(Rate::per_second(BENCH_RATE)),
        burst: Some(10),
    };
    let mut rule = conditional_write(device);
    rule.rate = Some(limit);
    let chosen = &mut config.vendors[vendor];
    chosen.rate = Some(limit);
    chosen.rules.push(rule);
    config
}

fn read(address: u16, count: u16) -> ModbusAccess<'static> {
    ModbusAccess {
        unit: 1,
        function: READ_HOLDING_REGISTERS,
        read: Some((address, count)),
        write: None,
        values: WrittenValues::None,
        quantity: Some(count),
        sub_function: None,
        mei_type: None,
    }
}

fn bench_rule_counts(c: &mut Criterion) {
    let states = StateTable::new(0);
    let mut group = c.benchmark_group("decide");
    for rules in [10usize, 1_000, 10_000] {
        let (policy, _) = Policy::compile(&config_with_rules(rules)).unwrap();
        let vendor = policy.vendors().len() / 2;
        let device = policy.devices().len() / 2;
        let context = Context {
            source: IpAddr::V4(Ipv4Addr::new(10, 0, vendor as u8, 1)),
            role: None,
            now: MONDAY_MORNING.parse().unwrap(),
            instant: Instant::now(),
            states: &states,
        };
        // The last of the 10 candidate rules allows this read.
        let allowed = read(950, 10);
        // Every candidate rule fails on the addresses.
        let denied = read(990, 20);
        assert!(matches!(
            policy.decide(vendor, device, &allowed, &context),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            policy.decide(vendor, device, &denied, &context),
            Decision::Deny { .. }
        ));

        group.bench_with_input(BenchmarkId::new("allow", rules), &allowed, |b, access| {
            b.iter(|| {
                policy.decide(
                    black_box(vendor),
                    black_box(device),
                    black_box(access),
                    &context,
                )
            })
        });
        group.bench_with_input(BenchmarkId::new("deny", rules), &denied, |b, access| {
            b.iter(|| {
                policy.decide(
                    black_box(vendor),
                    black_box(device),
                    black_box(access),
                    &context,
                )
            })
        });
    }
    group.finish();
}

fn bench_conditions(c: &mut Criterion) {
    let (policy, _) = Policy::compile(&config_with_conditions()).unwrap();
    let states = StateTable::new(1);
    let instant = Instant::now();
    states.set(0, Some(1), instant);
    let context = Context {
        source: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        role: None,
        now: MONDAY_MORNING.parse().unwrap(),
        instant,
        states: &states,
    };
    let write = ModbusAccess {
        unit: 1,
        function: WRITE_SINGLE_REGISTER,
        read: None,
        write: Some((105, 1)),
        values: WrittenValues::Register(4000),
        quantity: None,
        sub_function: None,
        mei_type: None,
    };
    assert!(matches!(
        policy.decide(0, 0, &write, &context),
        Decision::Allow { .. }
    ));
    c.bench_function("decide/allow_with_state_and_schedule", |b| {
        b.iter(|| policy.decide(black_box(0), black_box(0), black_box(&write), &context))
    });
}

fn bench_rates(c: &mut Criterion) {
    let (vendor, device) = (50, 5);
    let (policy, _) = Policy::compile(&config_with_rates(vendor, device)).unwrap();
    let states = StateTable::new(1);
    let start = Instant::now();
    states.set(0, Some(1), start);
    let write = ModbusAccess {
        unit: 1,
        function: WRITE_SINGLE_REGISTER,
        read: None,
        write: Some((105, 1)),
        values: WrittenValues::Register(4000),
        quantity: None,
        sub_function: None,
        mei_type: None,
    };
    let step = Duration::from_nanos(1_000_000_000 / BENCH_RATE);
    let now: jiff::Timestamp = MONDAY_MORNING.parse().unwrap();
    let context_at = |instant| Context {
        source: IpAddr::V4(Ipv4Addr::new(10, 0, vendor as u8, 1)),
        role: None,
        now,
        instant,
        states: &states,
    };
    assert!(matches!(
        policy.decide(vendor, device, &write, &context_at(start)),
        Decision::Allow { .. }
    ));

    let mut instant = start;
    c.bench_function("decide/allow_with_rate_state_and_schedule/10000", |b| {
        b.iter(|| {
            instant += step;
            let decision = policy.decide(
                black_box(vendor),
                black_box(device),
                black_box(&write),
                &context_at(instant),
            );
            debug_assert!(matches!(decision, Decision::Allow { .. }));
            decision
        })
    });
}

criterion_group!(benches, bench_rule_counts, bench_conditions, bench_rates);
criterion_main!(benches);
