//! Tag reads from a hand-filled mirror, their quality rules, and the
//! Modbus requests that tag writes become.

use std::time::Duration;

use super::*;
use crate::config::{
    DeviceConfig, MirrorBlockConfig, OnStale, Origin, RegisterOrder, TagAccess, TagConfig,
};
use crate::metrics::MirrorFamilies;

fn block(kind: StateKind, start: u16, count: u32) -> MirrorBlockConfig {
    MirrorBlockConfig {
        kind,
        start,
        count,
        poll: Duration::from_millis(100),
        max_age: Duration::from_millis(1_000),
        stale: OnStale::Forward,
    }
}

fn plan(name: &str, unit: u8, blocks: &[MirrorBlockConfig]) -> DevicePlan {
    DevicePlan::from(&DeviceConfig {
        unit,
        mirror: blocks.to_vec(),
        ..DeviceConfig::new(name, "127.0.0.1:5021".parse().unwrap())
    })
}

fn tag(name: &str, kind: StateKind, address: u16, data_type: TagType) -> TagConfig {
    TagConfig {
        name: name.to_owned(),
        device: "press-1".to_owned(),
        kind,
        address,
        data_type,
        order: RegisterOrder::Abcd,
        bit: None,
        scale: 1.0,
        offset: 0.0,
        unit: None,
        access: TagAccess::ReadWrite,
        origin: Origin::unknown(),
    }
}

/// Builds a device "press-1" at unit 7 with holding registers 100-119 and coils
/// 0-15, its map of tags, and its mirror store.
fn press(tags: &[TagConfig]) -> (TagMap, MirrorStore) {
    let devices = [
        plan("oven-2", 2, &[]),
        plan(
            "press-1",
            7,
            &[
                block(StateKind::HoldingRegister, 100, 20),
                block(StateKind::Coil, 0, 16),
            ],
        ),
    ];
    let store = MirrorStore::build(&devices, None, &MirrorFamilies::default());
    (TagMap::build(tags, &devices), store)
}

/// Stores `values` as the first values of every block of press-1, read at
/// `at`, zeros after them.
fn fill(store: &MirrorStore, at: Instant, registers: &[u16], coils: &[u16]) {
    let mirror = store.find("press-1").unwrap();
    for (block, values) in mirror.blocks().iter().zip([registers, coils]) {
        let mut all = values.to_vec();
        all.resize(block.config().count as usize, 0);
        block.store(0, all, at);
    }
}

#[test]
fn map_lists_tags_in_configuration_order() {
    let (map, _) = press(&[
        tag(
            "Press1.Temperature",
            StateKind::HoldingRegister,
            100,
            TagType::Float32,
        ),
        tag("Press1.Running", StateKind::Coil, 3, TagType::Bool),
    ]);
    let names: Vec<&str> = map.tags().iter().map(|tag| &*tag.name).collect();
    assert_eq!(names, ["Press1.Temperature", "Press1.Running"]);
    assert_eq!(map.find("Press1.Running"), Some(1));
    assert_eq!(map.find("Press1.Pressure"), None);
    let first = map.get(0).unwrap();
    assert_eq!(first.device, 1);
    assert_eq!(&*first.device_name, "press-1");
    assert_eq!(first.unit_id, 7);
    assert_eq!(first.count(), 2);
    assert_eq!(first.node_id(), "nsu=urn:sluice:tags;s=Press1.Temperature");
}

#[test]
fn fresh_mirror_values_read_as_good() {
    let mut scaled = tag(
        "Press1.Pressure",
        StateKind::HoldingRegister,
        102,
        TagType::Int16,
    );
    scaled.scale = 0.5;
    scaled.offset = 1.0;
    let (map, store) = press(&[
        tag(
            "Press1.Temperature",
            StateKind::HoldingRegister,
            100,
            TagType::Float32,
        ),
        scaled,
        tag("Press1.Running", StateKind::Coil, 3, TagType::Bool),
    ]);
    let polled = Instant::now();
    let before = jiff::Timestamp::now();
    // 123.456 as float32 ABCD, then -8 (0xFFF8) for the pressure.
    fill(&store, polled, &[0x42F6, 0xE979, 0xFFF8], &[0, 0, 0, 1]);
    store.find("press-1").unwrap().set_reachable(true);

    let reading = map.read(0, &store, polled).unwrap();
    assert_eq!(reading.value, Some(TagValue::Float32(123.456)));
    assert_eq!(reading.quality, Quality::Good);
    let source_time = reading.source_time.unwrap();
    assert!(before <= source_time);
    assert!(source_time <= jiff::Timestamp::now());

    let reading = map.read(1, &store, polled).unwrap();
    // -8 × 0.5 + 1 = -3.
    assert_eq!(reading.value, Some(TagValue::Float64(-3.0)));
    assert_eq!(reading.quality, Quality::Good);

    let reading = map.read(2, &store, polled).unwrap();
    assert_eq!(reading.value, Some(TagValue::Bool(true)));
    assert_eq!(map.read(3, &store, polled), None);
}

#[test]
fn values_older_than_max_age_are_uncertain() {
    let (map, store) = press(&[tag("T", StateKind::HoldingRegister, 110, TagType::UInt16)]);
    let polled = Instant::now();
    fill(&store, polled, &[0; 10], &[]);
    store.find("press-1").unwrap().set_reachable(true);
    let young = map
        .read(0, &store, polled + Duration::from_millis(999))
        .unwrap();
    assert_eq!(young.quality, Quality::Good);
    let old = map
        .read(0, &store, polled + Duration::from_millis(1_000))
        .unwrap();
    assert_eq!(old.quality, Quality::UncertainLastUsableValue);
    assert_eq!(old.value, Some(TagValue::UInt16(0)));
}

#[test]
fn failed_poll_of_a_reachable_device_is_uncertain() {
    let (map, store) = press(&[tag("T", StateKind::HoldingRegister, 100, TagType::UInt16)]);
    let polled = Instant::now();
    fill(&store, polled, &[42], &[]);
    let mirror = store.find("press-1").unwrap();
    mirror.set_reachable(true);
    mirror.blocks()[0].mark_failed(0);
    let reading = map.read(0, &store, polled).unwrap();
    assert_eq!(reading.quality, Quality::UncertainLastUsableValue);
    assert_eq!(reading.value, Some(TagValue::UInt16(42)));
}

#[test]
fn unreachable_device_is_bad_with_last_value() {
    let (map, store) = press(&[tag("T", StateKind::HoldingRegister, 100, TagType::UInt16)]);
    let polled = Instant::now();
    fill(&store, polled, &[42], &[]);
    store.find("press-1").unwrap().set_reachable(false);
    let reading = map.read(0, &store, polled).unwrap();
    assert_eq!(reading.quality, Quality::BadCommunicationError);
    assert_eq!(reading.value, Some(TagValue::UInt16(42)));
    assert!(reading.source_time.is_some());
}

#[test]
fn never_polled_tag_is_bad_without_value() {
    let (map, store) = press(&[tag("T", StateKind::HoldingRegister, 100, TagType::UInt16)]);
    let reading = map.read(0, &store, Instant::now()).unwrap();
    assert_eq!(
        reading,
        TagReading {
            value: None,
            quality: Quality::BadCommunicationError,
            source_time: None,
        }
    );
}

#[test]
fn register_write_function_codes() {
    let (map, _) = press(&[
        tag("One", StateKind::HoldingRegister, 105, TagType::Int16),
        tag("Two", StateKind::HoldingRegister, 100, TagType::Float32),
    ]);
    let write = map.write(0, &TagValue::Int16(-2)).unwrap().unwrap();
    assert_eq!(
        write,
        TagWrite {
            device: 1,
            unit_id: 7,
            request: Request::WriteSingleRegister {
                address: 105,
                value: 0xFFFE
            },
        }
    );
    assert_eq!(write.request.function_code(), 6);
    let write = map.write(1, &TagValue::Float32(123.456)).unwrap().unwrap();
    assert_eq!(
        write.request,
        Request::WriteMultipleRegisters {
            address: 100,
            quantity: 2,
            values: Bytes::from_static(&[0x42, 0xF6, 0xE9, 0x79]),
        }
    );
    assert_eq!(write.request.function_code(), 16);
}

#[test]
fn coil_writes_use_fc5_and_fc15() {
    let (map, _) = press(&[tag("Run", StateKind::Coil, 4, TagType::Bool)]);
    let write = map.write(0, &TagValue::Bool(true)).unwrap().unwrap();
    assert_eq!(
        write.request,
        Request::WriteSingleCoil {
            address: 4,
            value: true
        }
    );
    assert_eq!(
        write_request(StateKind::Coil, 8, &[1, 0, 1, 1, 0, 0, 0, 0, 1]),
        Request::WriteMultipleCoils {
            address: 8,
            quantity: 9,
            values: Bytes::from_static(&[0b0000_1101, 0b0000_0001]),
        }
    );
}

#[test]
fn register_bit_write_uses_fc22() {
    let mut alarm = tag("Alarm", StateKind::HoldingRegister, 103, TagType::Bool);
    alarm.bit = Some(4);
    let (map, store) = press(&[alarm]);
    let write = map.write(0, &TagValue::Bool(true)).unwrap().unwrap();
    assert_eq!(
        write.request,
        Request::MaskWriteRegister {
            address: 103,
            and_mask: 0xFFEF,
            or_mask: 0x0010
        }
    );
    assert_eq!(write.request.function_code(), 22);
    let clear = map.write(0, &TagValue::Bool(false)).unwrap().unwrap();
    assert_eq!(
        clear.request,
        Request::MaskWriteRegister {
            address: 103,
            and_mask: 0xFFEF,
            or_mask: 0
        }
    );

    let polled = Instant::now();
    fill(&store, polled, &[0, 0, 0, 0x0010], &[]);
    let reading = map.read(0, &store, polled).unwrap();
    assert_eq!(reading.value, Some(TagValue::Bool(true)));
}

#[test]
fn write_rejects_read_only_and_range() {
    let mut read_only = tag("Fixed", StateKind::HoldingRegister, 100, TagType::UInt16);
    read_only.access = TagAccess::Read;
    let (map, _) = press(&[
        read_only,
        tag("Small", StateKind::HoldingRegister, 101, TagType::Int16),
    ]);
    let error = map.write(0, &TagValue::UInt16(1)).unwrap().unwrap_err();
    assert_eq!(error.to_string(), "tag \"Fixed\" is read-only");
    let error = map.write(1, &TagValue::Int32(40_000)).unwrap().unwrap_err();
    assert_eq!(
        error.to_string(),
        "tag \"Small\": value 40000 gives raw value 40000, outside the int16 range -32768..=32767"
    );
    assert_eq!(map.write(2, &TagValue::UInt16(1)), None);
}
