//! Property tests of the policy's matching structures against plain
//! reference implementations: address interval sets, source networks and
//! rate limits.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use sluice::config::{
    AuditConfig, Config, DeviceConfig, GatewayConfig, Origin, Range16, Rate, RateConfig,
    RuleConfig, VendorConfig,
};
use sluice::identity::{SourceIndex, SourceSet};
use sluice::policy::{
    Context, Decision, IntervalSet, ModbusAccess, Policy, StateTable, WrittenValues,
};

/// Compiles one vendor with a request rate limit and one read rule.
fn rate_limited_policy(per_second: u64, burst: u32) -> Policy {
    let mut rule = RuleConfig::new("press-1", &[3]);
    rule.addresses = vec![Range16::new(0, 9)];
    let config = Config {
        gateway: GatewayConfig {
            name: "props".into(),
            timezone: jiff::tz::TimeZone::UTC,
            rules_dir: "rules".into(),
        },
        listeners: Vec::new(),
        devices: vec![DeviceConfig::new(
            "press-1",
            "127.0.0.1:5021".parse().unwrap(),
        )],
        opcua_devices: Vec::new(),
        states: Vec::new(),
        audit: AuditConfig::new("audit".into()),
        metrics: None,
        tags: Vec::new(),
        vendors: vec![VendorConfig {
            name: "acme".into(),
            file_name: "acme.toml".into(),
            sources: vec!["10.0.0.0/8".parse().unwrap()],
            max_sessions: None,
            certificate: Default::default(),
            rate: Some(RateConfig {
                requests_per_second: Some(Rate::per_second(per_second)),
                writes_per_second: None,
                burst: Some(burst),
            }),
            rules: vec![rule],
            opcua_users: Vec::new(),
            opcua_user_certificates: Vec::new(),
            opcua_anonymous: false,
            origin: Origin::unknown(),
        }],
        files: Vec::new(),
    };
    Policy::compile(&config).unwrap().0
}

/// Returns which requests a token bucket allows, counted in nanoseconds of
/// credit: a request costs one interval, and credit grows with time up to
/// `burst` intervals.
fn reference_allowed(interval: u64, burst: u64, gaps: &[u64]) -> Vec<bool> {
    let capacity = interval * burst;
    let mut credit = capacity;
    gaps.iter()
        .map(|gap| {
            credit = (credit + gap).min(capacity);
            let allowed = credit >= interval;
            if allowed {
                credit -= interval;
            }
            allowed
        })
        .collect()
}

/// Ranges over a small value space, so that random ranges overlap, touch and
/// leave gaps often.
fn small_ranges() -> impl Strategy<Value = Vec<Range16>> {
    prop::collection::vec(
        (0u16..300, 0u16..40).prop_map(|(first, length)| Range16::new(first, first + length)),
        0..12,
    )
}

fn covered(ranges: &[Range16], value: u32) -> bool {
    ranges
        .iter()
        .any(|range| u32::from(range.first) <= value && value <= u32::from(range.last))
}

/// Networks inside 10.0.0.0/20, with prefixes from /20 to /32.
fn v4_net() -> impl Strategy<Value = IpNet> {
    (0u32..4096, 20u8..=32).prop_map(|(host, prefix)| {
        let address = Ipv4Addr::from(0x0A00_0000 | host);
        IpNet::V4(Ipv4Net::new(address, prefix).unwrap().trunc())
    })
}

/// Networks inside fd00::/116, with prefixes from /116 to /128.
fn v6_net() -> impl Strategy<Value = IpNet> {
    (0u128..4096, 116u8..=128).prop_map(|(host, prefix)| {
        let address = Ipv6Addr::from((0xfd00u128 << 112) | host);
        IpNet::V6(Ipv6Net::new(address, prefix).unwrap().trunc())
    })
}

fn any_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![v4_net(), v6_net()]
}

fn any_address() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u32..4200).prop_map(|host| IpAddr::V4(Ipv4Addr::from(0x0A00_0000 | host))),
        (0u128..4200).prop_map(|host| IpAddr::V6(Ipv6Addr::from((0xfd00u128 << 112) | host))),
    ]
}

fn nets_overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

proptest! {
    #[test]
    fn contains_range_matches_reference(ranges in small_ranges(), first in 0u16..360, length in 0u16..60) {
        let set = IntervalSet::new(ranges.iter().copied());
        let last = first + length;
        let expected = (u32::from(first)..=u32::from(last)).all(|value| covered(&ranges, value));
        prop_assert_eq!(set.contains_range(first, last), expected);
    }

    #[test]
    fn first_missing_matches_reference(ranges in small_ranges(), first in 0u32..360, length in 0u32..60) {
        let set = IntervalSet::new(ranges.iter().copied());
        let last = first + length;
        let expected = (first..=last).find(|&value| !covered(&ranges, value));
        prop_assert_eq!(set.first_missing(first, last), expected);
    }

    #[test]
    fn intervals_are_sorted_disjoint_and_apart(ranges in small_ranges()) {
        let set = IntervalSet::new(ranges.iter().copied());
        for pair in set.intervals().windows(2) {
            prop_assert!(u32::from(pair[0].1) + 1 < u32::from(pair[1].0));
        }
        for value in 0u16..400 {
            prop_assert_eq!(set.contains(value), covered(&ranges, u32::from(value)));
        }
    }

    #[test]
    fn source_index_matches_reference(
        nets in prop::collection::vec((any_net(), 0usize..4), 0..8),
        addresses in prop::collection::vec(any_address(), 1..20),
    ) {
        let conflict = nets.iter().enumerate().any(|(i, (a, owner_a))| {
            nets[i + 1..]
                .iter()
                .any(|(b, owner_b)| owner_a != owner_b && nets_overlap(a, b))
        });
        match SourceIndex::new(nets.iter().copied()) {
            Err(overlap) => {
                prop_assert!(conflict);
                prop_assert_ne!(overlap.first.1, overlap.second.1);
                prop_assert!(nets_overlap(&overlap.first.0, &overlap.second.0));
            }
            Ok(index) => {
                prop_assert!(!conflict);
                for address in addresses {
                    let expected = nets
                        .iter()
                        .find(|(net, _)| net.contains(&address))
                        .map(|(_, owner)| *owner);
                    prop_assert_eq!(index.lookup(address), expected);
                }
            }
        }
    }

    #[test]
    fn source_set_matches_reference(
        nets in prop::collection::vec(any_net(), 0..8),
        addresses in prop::collection::vec(any_address(), 1..20),
    ) {
        let set = SourceSet::new(nets.iter().copied());
        for address in addresses {
            let expected = nets.iter().any(|net| net.contains(&address));
            prop_assert_eq!(set.contains(address), expected);
        }
    }

    #[test]
    fn vendor_rate_matches_reference_bucket(
        per_second in prop::sample::select(vec![1u64, 2, 4, 5, 10, 20, 50, 100, 1000]),
        burst in 1u32..20,
        gaps in prop::collection::vec(0u64..50_000_000, 1..200),
    ) {
        let policy = rate_limited_policy(per_second, burst);
        let states = StateTable::new(0);
        let read = ModbusAccess {
            unit: 1,
            function: 3,
            read: Some((0, 1)),
            write: None,
            values: WrittenValues::None,
            quantity: Some(1),
            sub_function: None,
            mei_type: None,
        };
        let interval = 1_000_000_000 / per_second;
        let expected = reference_allowed(interval, u64::from(burst), &gaps);
        let mut instant = Instant::now() + Duration::from_secs(1);
        for (gap, expected) in gaps.iter().zip(expected) {
            instant += Duration::from_nanos(*gap);
            let context = Context {
                source: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                role: None,
                now: jiff::Timestamp::UNIX_EPOCH,
                instant,
                states: &states,
            };
            let allowed = matches!(policy.decide(0, 0, &read, &context), Decision::Allow { .. });
            prop_assert_eq!(allowed, expected);
        }
    }
}
