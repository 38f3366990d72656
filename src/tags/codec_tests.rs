//! Exact register images of every type in every order, scaling, the write
//! errors, and a property test that encoding and decoding round-trip.

use proptest::prelude::*;

use super::*;

const ORDERS: [RegisterOrder; 4] = [
    RegisterOrder::Abcd,
    RegisterOrder::Cdab,
    RegisterOrder::Badc,
    RegisterOrder::Dcba,
];

fn encoding(data_type: TagType, order: RegisterOrder) -> Encoding {
    Encoding {
        data_type,
        order,
        bit: None,
        scale: 1.0,
        offset: 0.0,
    }
}

fn scaled(data_type: TagType, scale: f64, offset: f64) -> Encoding {
    Encoding {
        scale,
        offset,
        ..encoding(data_type, RegisterOrder::Abcd)
    }
}

/// Asserts that `value` encodes to `words` in `order` and decodes back.
fn assert_image(data_type: TagType, order: RegisterOrder, value: TagValue, words: &[u16]) {
    let encoding = encoding(data_type, order);
    assert_eq!(encoding.encode(&value).unwrap(), words, "{order:?} encode");
    assert_eq!(encoding.decode(words), value, "{order:?} decode");
}

#[test]
fn float32_in_every_order() {
    // 123.456 is 0x42F6E979 as an IEEE 754 single.
    let images: [(RegisterOrder, [u16; 2]); 4] = [
        (RegisterOrder::Abcd, [0x42F6, 0xE979]),
        (RegisterOrder::Cdab, [0xE979, 0x42F6]),
        (RegisterOrder::Badc, [0xF642, 0x79E9]),
        (RegisterOrder::Dcba, [0x79E9, 0xF642]),
    ];
    for (order, words) in images {
        assert_image(TagType::Float32, order, TagValue::Float32(123.456), &words);
    }
}

#[test]
fn float64_in_every_order() {
    // 123.456 is 0x405EDD2F1A9FBE77 as an IEEE 754 double.
    let images: [(RegisterOrder, [u16; 4]); 4] = [
        (RegisterOrder::Abcd, [0x405E, 0xDD2F, 0x1A9F, 0xBE77]),
        (RegisterOrder::Cdab, [0xBE77, 0x1A9F, 0xDD2F, 0x405E]),
        (RegisterOrder::Badc, [0x5E40, 0x2FDD, 0x9F1A, 0x77BE]),
        (RegisterOrder::Dcba, [0x77BE, 0x9F1A, 0x2FDD, 0x5E40]),
    ];
    for (order, words) in images {
        assert_image(TagType::Float64, order, TagValue::Float64(123.456), &words);
    }
}

#[test]
fn int64_and_uint64_in_every_order() {
    let images: [(RegisterOrder, [u16; 4]); 4] = [
        (RegisterOrder::Abcd, [0x0102, 0x0304, 0x0506, 0x0708]),
        (RegisterOrder::Cdab, [0x0708, 0x0506, 0x0304, 0x0102]),
        (RegisterOrder::Badc, [0x0201, 0x0403, 0x0605, 0x0807]),
        (RegisterOrder::Dcba, [0x0807, 0x0605, 0x0403, 0x0201]),
    ];
    for (order, words) in images {
        let value = 0x0102_0304_0506_0708;
        assert_image(TagType::Int64, order, TagValue::Int64(value), &words);
        assert_image(
            TagType::UInt64,
            order,
            TagValue::UInt64(value as u64),
            &words,
        );
    }
    assert_image(
        TagType::Int64,
        RegisterOrder::Cdab,
        TagValue::Int64(-2),
        &[0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF],
    );
}

#[test]
fn negative_integers_use_twos_complement() {
    assert_image(
        TagType::Int16,
        RegisterOrder::Abcd,
        TagValue::Int16(-2),
        &[0xFFFE],
    );
    assert_image(
        TagType::Int16,
        RegisterOrder::Badc,
        TagValue::Int16(-2),
        &[0xFEFF],
    );
    // -123456 is 0xFFFE1DC0.
    assert_image(
        TagType::Int32,
        RegisterOrder::Abcd,
        TagValue::Int32(-123_456),
        &[0xFFFE, 0x1DC0],
    );
    assert_image(
        TagType::Int32,
        RegisterOrder::Cdab,
        TagValue::Int32(-123_456),
        &[0x1DC0, 0xFFFE],
    );
    assert_image(
        TagType::Int32,
        RegisterOrder::Badc,
        TagValue::Int32(-123_456),
        &[0xFEFF, 0xC01D],
    );
    assert_image(
        TagType::Int32,
        RegisterOrder::Dcba,
        TagValue::Int32(-123_456),
        &[0xC01D, 0xFEFF],
    );
    assert_image(
        TagType::UInt32,
        RegisterOrder::Abcd,
        TagValue::UInt32(0xFFFE_1DC0),
        &[0xFFFE, 0x1DC0],
    );
    assert_image(
        TagType::UInt16,
        RegisterOrder::Abcd,
        TagValue::UInt16(65_535),
        &[0xFFFF],
    );
}

#[test]
fn bool_is_zero_or_one() {
    let encoding = encoding(TagType::Bool, RegisterOrder::Abcd);
    assert_eq!(encoding.encode(&TagValue::Bool(true)).unwrap(), [1]);
    assert_eq!(encoding.encode(&TagValue::Bool(false)).unwrap(), [0]);
    assert_eq!(encoding.decode(&[1]), TagValue::Bool(true));
    assert_eq!(encoding.decode(&[0]), TagValue::Bool(false));
}

#[test]
fn register_bit_reads_one_bit() {
    let encoding = Encoding {
        bit: Some(15),
        ..encoding(TagType::Bool, RegisterOrder::Abcd)
    };
    assert_eq!(encoding.decode(&[0x8000]), TagValue::Bool(true));
    assert_eq!(encoding.decode(&[0x7FFF]), TagValue::Bool(false));
    let low = Encoding {
        bit: Some(0),
        ..encoding
    };
    assert_eq!(low.decode(&[0x0003]), TagValue::Bool(true));
    assert_eq!(low.decode(&[0xFFFE]), TagValue::Bool(false));
}

#[test]
fn strings_pack_two_characters_per_register() {
    let text = TagType::String { length: 5 };
    assert_image(
        text,
        RegisterOrder::Abcd,
        TagValue::String("ABC".into()),
        &[0x4142, 0x4300, 0x0000],
    );
    assert_image(
        text,
        RegisterOrder::Badc,
        TagValue::String("ABC".into()),
        &[0x4241, 0x0043, 0x0000],
    );
    assert_image(
        text,
        RegisterOrder::Abcd,
        TagValue::String("HELLO".into()),
        &[0x4845, 0x4C4C, 0x4F00],
    );
}

#[test]
fn string_decode_stops_at_nul() {
    let encoding = encoding(TagType::String { length: 6 }, RegisterOrder::Abcd);
    assert_eq!(
        encoding.decode(&[0x4F4B, 0x0041, 0x4242]),
        TagValue::String("OK".into())
    );
    assert_eq!(
        encoding.decode(&[0x41FF, 0x4200, 0x0000]),
        TagValue::String("A\u{FFFD}B".into())
    );
}

#[test]
fn string_writes_reject_long_and_invalid_text() {
    let encoding = encoding(TagType::String { length: 3 }, RegisterOrder::Abcd);
    let error = encoding
        .encode(&TagValue::String("ABCD".into()))
        .unwrap_err();
    assert_eq!(error, EncodeError::TooLong { length: 4, max: 3 });
    assert_eq!(
        error.to_string(),
        "string of 4 characters is longer than the tag's 3"
    );
    let error = encoding.encode(&TagValue::String("Aé".into())).unwrap_err();
    assert_eq!(
        error.to_string(),
        "character 'é' is invalid; a string tag holds ASCII characters other than NUL"
    );
}

#[test]
fn scale_and_offset_give_engineering_values() {
    // Raw 215 × 0.1 - 10 = 11.5.
    let encoding = scaled(TagType::Int16, 0.1, -10.0);
    assert_eq!(encoding.value_type(), TagType::Float64);
    let TagValue::Float64(value) = encoding.decode(&[215]) else {
        panic!("a scaled int16 decodes to float64");
    };
    assert!((value - 11.5).abs() < 1e-9, "{value}");
    // Raw -50 (0xFFCE) × 0.1 - 10 = -15.
    let TagValue::Float64(value) = encoding.decode(&[0xFFCE]) else {
        panic!("a scaled int16 decodes to float64");
    };
    assert!((value + 15.0).abs() < 1e-9, "{value}");
    assert_eq!(encoding.encode(&TagValue::Float64(11.5)).unwrap(), [215]);
    assert_eq!(
        encoding.encode(&TagValue::Float64(-15.0)).unwrap(),
        [0xFFCE]
    );
}

#[test]
fn scaled_writes_round_to_nearest() {
    let encoding = scaled(TagType::UInt16, 0.5, 0.0);
    // 10.2 / 0.5 = 20.4 rounds to 20; 10.3 / 0.5 = 20.6 rounds to 21.
    assert_eq!(encoding.encode(&TagValue::Float64(10.2)).unwrap(), [20]);
    assert_eq!(encoding.encode(&TagValue::Float64(10.3)).unwrap(), [21]);
    // Halves round away from zero: 10.25 / 0.5 = 20.5 gives 21.
    assert_eq!(encoding.encode(&TagValue::Float64(10.25)).unwrap(), [21]);
    let exact = scaled(TagType::Int16, 1.0, 0.0);
    assert_eq!(exact.encode(&TagValue::Float64(-2.5)).unwrap(), [0xFFFD]);
}

#[test]
fn scaled_float32_keeps_its_type() {
    let encoding = scaled(TagType::Float32, 2.0, 1.0);
    assert_eq!(encoding.value_type(), TagType::Float32);
    // 21.5 is 0x41AC0000; 21.5 × 2 + 1 = 44.
    assert_eq!(encoding.decode(&[0x41AC, 0x0000]), TagValue::Float32(44.0));
    assert_eq!(
        encoding.encode(&TagValue::Float32(44.0)).unwrap(),
        [0x41AC, 0x0000]
    );
}

#[test]
fn writes_outside_the_type_range_are_rejected() {
    let int16 = encoding(TagType::Int16, RegisterOrder::Abcd);
    let error = int16.encode(&TagValue::Int32(40_000)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "value 40000 gives raw value 40000, outside the int16 range -32768..=32767"
    );
    let uint16 = scaled(TagType::UInt16, 0.1, 0.0);
    let error = uint16.encode(&TagValue::Float64(-1.0)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "value -1 gives raw value -10, outside the uint16 range 0..=65535"
    );
    let uint64 = encoding(TagType::UInt64, RegisterOrder::Abcd);
    let error = uint64.encode(&TagValue::Float64(1e30)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "value 1000000000000000000000000000000 gives raw value 1000000000000000000000000000000, outside the uint64 range 0..=18446744073709551615"
    );
    assert_eq!(
        uint64.encode(&TagValue::UInt64(u64::MAX)).unwrap(),
        [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF]
    );
    let float32 = encoding(TagType::Float32, RegisterOrder::Abcd);
    assert!(matches!(
        float32.encode(&TagValue::Float64(1e300)),
        Err(EncodeError::OutOfRange {
            data_type: "float32",
            ..
        })
    ));
}

#[test]
fn non_finite_and_mistyped_writes_are_rejected() {
    let float64 = encoding(TagType::Float64, RegisterOrder::Abcd);
    let error = float64.encode(&TagValue::Float64(f64::NAN)).unwrap_err();
    assert_eq!(error.to_string(), "value NaN is not a finite number");
    let error = float64
        .encode(&TagValue::Float64(f64::INFINITY))
        .unwrap_err();
    assert_eq!(error.to_string(), "value inf is not a finite number");
    let error = float64.encode(&TagValue::Bool(true)).unwrap_err();
    assert_eq!(error.to_string(), "a float64 tag cannot take a bool value");
    let bit = encoding(TagType::Bool, RegisterOrder::Abcd);
    let error = bit.encode(&TagValue::Int16(1)).unwrap_err();
    assert_eq!(error.to_string(), "a bool tag cannot take a int16 value");
}

fn integer_types() -> impl Strategy<Value = TagType> {
    prop::sample::select(vec![
        TagType::Int16,
        TagType::UInt16,
        TagType::Int32,
        TagType::UInt32,
        TagType::Int64,
        TagType::UInt64,
    ])
}

proptest! {
    /// Any register image of an unscaled type decodes to a value that
    /// encodes to the same image, in every order.
    #[test]
    fn registers_round_trip(
        data_type in integer_types(),
        order in prop::sample::select(ORDERS.to_vec()),
        words in prop::collection::vec(any::<u16>(), 4),
    ) {
        let encoding = encoding(data_type, order);
        let words = &words[..usize::from(data_type.register_count())];
        let value = encoding.decode(words);
        prop_assert_eq!(encoding.encode(&value).unwrap(), words);
    }

    /// Floats round-trip bit for bit, except NaN, which is not written.
    #[test]
    fn floats_round_trip(
        order in prop::sample::select(ORDERS.to_vec()),
        single in any::<f32>().prop_filter("finite", |v| v.is_finite()),
        double in any::<f64>().prop_filter("finite", |v| v.is_finite()),
    ) {
        let float32 = encoding(TagType::Float32, order);
        let words = float32.encode(&TagValue::Float32(single)).unwrap();
        prop_assert_eq!(float32.decode(&words), TagValue::Float32(single));
        let float64 = encoding(TagType::Float64, order);
        let words = float64.encode(&TagValue::Float64(double)).unwrap();
        prop_assert_eq!(float64.decode(&words), TagValue::Float64(double));
    }

    /// A scaled int32 value read back and written again gives the same raw
    /// registers.
    #[test]
    fn scaled_values_round_trip(
        raw in any::<i32>(),
        scale in prop::sample::select(vec![0.1, 0.5, 2.0, -4.0, 0.001]),
        offset in -1000.0f64..1000.0,
    ) {
        let image = encoding(TagType::Int32, RegisterOrder::Abcd)
            .encode(&TagValue::Int32(raw))
            .unwrap();
        let encoding = scaled(TagType::Int32, scale, offset);
        let value = encoding.decode(&image);
        prop_assert_eq!(encoding.encode(&value).unwrap(), image);
    }

    /// Any ASCII text up to the tag's length round-trips.
    #[test]
    fn ascii_strings_round_trip(text in "[ -~]{0,10}", swapped in any::<bool>()) {
        let order = if swapped { RegisterOrder::Badc } else { RegisterOrder::Abcd };
        let encoding = encoding(TagType::String { length: 10 }, order);
        let words = encoding.encode(&TagValue::String(text.clone())).unwrap();
        prop_assert_eq!(words.len(), 5);
        prop_assert_eq!(encoding.decode(&words), TagValue::String(text));
    }
}
