//! Parsers for the small value languages inside rule files: ranges such as
//! `"0-999"`, function names, weekly schedules such as `"Mon-Fri 07:00-17:00"`
//! and dated windows such as `"2026-12-10T08:00/2026-12-10T12:00"`. Each
//! returns the problem as text that names the bad value and the fix.

use jiff::civil::DateTime;

use super::{DatedWindow, Range16, WeeklyWindow};

/// Function codes with the snake_case names of the Modbus Application
/// Protocol Specification V1.1b3, section 6.
const FUNCTIONS: &[(u8, &str)] = &[
    (1, "read_coils"),
    (2, "read_discrete_inputs"),
    (3, "read_holding_registers"),
    (4, "read_input_registers"),
    (5, "write_single_coil"),
    (6, "write_single_register"),
    (7, "read_exception_status"),
    (8, "diagnostics"),
    (11, "get_comm_event_counter"),
    (12, "get_comm_event_log"),
    (15, "write_multiple_coils"),
    (16, "write_multiple_registers"),
    (17, "report_server_id"),
    (20, "read_file_record"),
    (21, "write_file_record"),
    (22, "mask_write_register"),
    (23, "read_write_multiple_registers"),
    (24, "read_fifo_queue"),
    (43, "encapsulated_interface_transport"),
];

/// Another name rules may use for FC 43, after MEI type 0x0E, the one TCP
/// devices commonly serve.
const READ_DEVICE_IDENTIFICATION: &str = "read_device_identification";

/// Largest function code; codes from 0x80 mark exception responses.
pub const MAX_FUNCTION_CODE: u8 = 0x7F;

/// Returns the rule name of a public function code.
pub fn function_name(code: u8) -> Option<&'static str> {
    FUNCTIONS
        .iter()
        .find(|(known, _)| *known == code)
        .map(|(_, name)| *name)
}

/// Returns the code of a function named as rules name it.
pub fn function_code(name: &str) -> Option<u8> {
    if name == READ_DEVICE_IDENTIFICATION {
        return Some(43);
    }
    FUNCTIONS
        .iter()
        .find(|(_, known)| *known == name)
        .map(|(code, _)| *code)
}

/// Returns the function names a rule may use, comma separated, for messages.
pub(super) fn function_names() -> String {
    let names: Vec<&str> = FUNCTIONS.iter().map(|(_, name)| *name).collect();
    names.join(", ")
}

/// Parses a function given by name or by number.
pub(super) fn parse_function_number(number: i64) -> Result<u8, String> {
    match u8::try_from(number) {
        Ok(code) if (1..=MAX_FUNCTION_CODE).contains(&code) => Ok(code),
        _ => Err(format!(
            "function code {number} outside 1..=127; use a code from 1 to 127 or a function name"
        )),
    }
}

pub(super) fn parse_function_name(name: &str) -> Result<u8, String> {
    function_code(name).ok_or_else(|| {
        format!(
            "unknown function \"{name}\"; use a code from 1 to 127 or one of: {}",
            function_names()
        )
    })
}

/// Parses `"FIRST-LAST"` or `"N"` into an inclusive range of 16-bit values.
pub(super) fn parse_range(text: &str) -> Result<Range16, String> {
    let invalid = || {
        format!(
            "invalid range \"{text}\"; write a number or FIRST-LAST, such as \"5\" or \"0-999\""
        )
    };
    let (first, last) = match text.split_once('-') {
        Some((first, last)) => (first.trim(), last.trim()),
        None => (text.trim(), text.trim()),
    };
    let first: u64 = first.parse().map_err(|_| invalid())?;
    let last: u64 = last.parse().map_err(|_| invalid())?;
    for bound in [first, last] {
        if bound > u64::from(u16::MAX) {
            return Err(format!(
                "{bound} in \"{text}\" exceeds 65535, the largest Modbus address and register value"
            ));
        }
    }
    if first > last {
        return Err(format!(
            "inverted range \"{text}\"; write the smaller number first, as \"{last}-{first}\""
        ));
    }
    Ok(Range16 {
        first: first as u16,
        last: last as u16,
    })
}

/// Parses an integer given where a range is accepted.
pub(super) fn range_of_number(number: i64) -> Result<Range16, String> {
    match u16::try_from(number) {
        Ok(value) => Ok(Range16 {
            first: value,
            last: value,
        }),
        Err(_) => Err(format!(
            "{number} outside 0..=65535, the range of Modbus addresses and register values"
        )),
    }
}

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

fn parse_day(text: &str) -> Option<u8> {
    DAY_NAMES
        .iter()
        .position(|name| name.eq_ignore_ascii_case(text.trim()))
        .map(|index| index as u8)
}

/// Parses `"Mon-Fri,Sun"`: a comma list of days and day ranges. A range may
/// wrap past Sunday, as in `"Sat-Mon"`.
fn parse_days(text: &str) -> Option<u8> {
    let mut days = 0u8;
    for item in text.split(',') {
        match item.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (parse_day(first)?, parse_day(last)?);
                let mut day = first;
                loop {
                    days |= 1 << day;
                    if day == last {
                        break;
                    }
                    day = (day + 1) % 7;
                }
            }
            None => days |= 1 << parse_day(item)?,
        }
    }
    Some(days)
}

/// Parses `"HH:MM"` into minutes since midnight; `"24:00"` is accepted as an
/// end of day.
fn parse_time_of_day(text: &str) -> Option<u16> {
    let (hours, minutes) = text.split_once(':')?;
    if hours.len() != 2 || minutes.len() != 2 {
        return None;
    }
    let hours: u16 = hours.parse().ok()?;
    let minutes: u16 = minutes.parse().ok()?;
    match (hours, minutes) {
        (24, 0) => Some(24 * 60),
        (0..=23, 0..=59) => Some(hours * 60 + minutes),
        _ => None,
    }
}

/// Parses a weekly window such as `"Mon-Fri 07:00-17:00"`. An end before the
/// start makes the window cross midnight into the next day.
pub(super) fn parse_weekly(text: &str) -> Result<WeeklyWindow, String> {
    let invalid = || {
        format!(
            "invalid schedule \"{text}\"; write DAYS HH:MM-HH:MM with days Mon..Sun, \
             such as \"Mon-Fri 07:00-17:00\" or \"Sat,Sun 22:00-06:00\""
        )
    };
    let (days, times) = text.trim().split_once(' ').ok_or_else(invalid)?;
    let days = parse_days(days).ok_or_else(invalid)?;
    let (start, end) = times.trim().split_once('-').ok_or_else(invalid)?;
    let start = parse_time_of_day(start.trim()).ok_or_else(invalid)?;
    let end = parse_time_of_day(end.trim()).ok_or_else(invalid)?;
    if start == 24 * 60 {
        return Err(invalid());
    }
    if start == end {
        return Err(format!(
            "empty schedule \"{text}\": start and end are equal; use 00:00-24:00 for a whole day"
        ));
    }
    Ok(WeeklyWindow { days, start, end })
}

/// Parses a dated window `"START/END"` of local date-times such as
/// `"2026-12-10T08:00/2026-12-10T12:00"`.
pub(super) fn parse_dated(text: &str) -> Result<DatedWindow, String> {
    let invalid = || {
        format!(
            "invalid window \"{text}\"; write START/END as local date-times, \
             such as \"2026-12-10T08:00/2026-12-10T12:00\""
        )
    };
    let (start, end) = text.split_once('/').ok_or_else(invalid)?;
    let start: DateTime = start.trim().parse().map_err(|_| invalid())?;
    let end: DateTime = end.trim().parse().map_err(|_| invalid())?;
    if start >= end {
        return Err(format!(
            "empty or inverted window \"{text}\"; the end must come after the start"
        ));
    }
    Ok(DatedWindow { start, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_parses_single_and_pair() {
        assert_eq!(parse_range("5"), Ok(Range16 { first: 5, last: 5 }));
        assert_eq!(
            parse_range("0-999"),
            Ok(Range16 {
                first: 0,
                last: 999
            })
        );
        assert_eq!(
            parse_range("0-65535"),
            Ok(Range16 {
                first: 0,
                last: 65535
            })
        );
    }

    #[test]
    fn range_rejects_inverted_large_and_garbage() {
        assert_eq!(
            parse_range("20-10"),
            Err("inverted range \"20-10\"; write the smaller number first, as \"10-20\"".into())
        );
        assert_eq!(
            parse_range("0-70000"),
            Err(
                "70000 in \"0-70000\" exceeds 65535, the largest Modbus address and register value"
                    .into()
            )
        );
        assert_eq!(
            parse_range("ten"),
            Err(
                "invalid range \"ten\"; write a number or FIRST-LAST, such as \"5\" or \"0-999\""
                    .into()
            )
        );
        assert!(parse_range("").is_err());
        assert!(parse_range("-5").is_err());
    }

    #[test]
    fn function_names_round_trip() {
        for (code, name) in FUNCTIONS {
            assert_eq!(function_code(name), Some(*code));
            assert_eq!(function_name(*code), Some(*name));
        }
        assert_eq!(function_name(99), None);
        assert_eq!(function_code("read_device_identification"), Some(43));
        assert_eq!(
            parse_function_number(0),
            Err(
                "function code 0 outside 1..=127; use a code from 1 to 127 or a function name"
                    .into()
            )
        );
        assert_eq!(
            parse_function_number(128),
            Err(
                "function code 128 outside 1..=127; use a code from 1 to 127 or a function name"
                    .into()
            )
        );
        assert_eq!(parse_function_number(100), Ok(100));
    }

    #[test]
    fn weekly_parses_day_lists_and_wrapping_ranges() {
        assert_eq!(
            parse_weekly("Mon-Fri 07:00-17:00"),
            Ok(WeeklyWindow {
                days: 0b001_1111,
                start: 420,
                end: 1020
            })
        );
        assert_eq!(
            parse_weekly("Mon,Wed 08:00-24:00"),
            Ok(WeeklyWindow {
                days: 0b000_0101,
                start: 480,
                end: 1440
            })
        );
        assert_eq!(
            parse_weekly("Sat-Mon 22:00-06:00"),
            Ok(WeeklyWindow {
                days: 0b110_0001,
                start: 1320,
                end: 360
            })
        );
    }

    #[test]
    fn weekly_rejects_bad_days_times_and_empty() {
        assert!(parse_weekly("Mo-Fr 07:00-17:00").is_err());
        assert!(parse_weekly("Mon-Fri 7:00-17:00").is_err());
        assert!(parse_weekly("Mon-Fri 07:00-25:00").is_err());
        assert!(parse_weekly("Mon-Fri").is_err());
        assert!(parse_weekly("Mon 24:00-01:00").is_err());
        assert_eq!(
            parse_weekly("Mon 08:00-08:00"),
            Err("empty schedule \"Mon 08:00-08:00\": start and end are equal; use 00:00-24:00 for a whole day".into())
        );
    }

    #[test]
    fn dated_window_parses_and_rejects_inverted() {
        let window = parse_dated("2026-12-10T08:00/2026-12-10T12:00").unwrap();
        assert_eq!(window.start, jiff::civil::date(2026, 12, 10).at(8, 0, 0, 0));
        assert_eq!(window.end, jiff::civil::date(2026, 12, 10).at(12, 0, 0, 0));
        assert_eq!(
            parse_dated("2026-12-10T12:00/2026-12-10T08:00"),
            Err("empty or inverted window \"2026-12-10T12:00/2026-12-10T08:00\"; the end must come after the start".into())
        );
        assert!(parse_dated("2026-12-10 08:00").is_err());
        assert!(parse_dated("tomorrow/later").is_err());
    }
}
