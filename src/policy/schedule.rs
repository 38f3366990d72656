//! Time conditions of rules, evaluated on the wall-clock time of the
//! gateway's time zone.
//!
//! Comparing wall-clock times gives the daylight-saving behaviour operators
//! expect. On the spring change the skipped local times never occur, so a
//! window that starts inside the gap opens at the first instant after it.
//! On the autumn change the repeated hour occurs twice, and a window that
//! names it is open during both occurrences.

use jiff::civil::DateTime;

use crate::config::{DatedWindow, WeeklyWindow};

const MINUTES_PER_DAY: u16 = 24 * 60;

/// Returns whether the weekly window contains the local time `local`. A
/// window whose end is at or before its start runs into the next day and
/// belongs to the day it starts on.
pub fn weekly_contains(window: &WeeklyWindow, local: &DateTime) -> bool {
    let day = local.weekday().to_monday_zero_offset() as u8;
    let previous_day = (day + 6) % 7;
    let minute = u16::from(local.hour() as u8) * 60 + u16::from(local.minute() as u8);
    let starts_on = |day: u8| window.days & (1 << day) != 0;

    if window.start < window.end {
        starts_on(day) && window.start <= minute && minute < window.end
    } else {
        let tonight = starts_on(day) && window.start <= minute && minute < MINUTES_PER_DAY;
        let since_yesterday = starts_on(previous_day) && minute < window.end;
        tonight || since_yesterday
    }
}

/// Returns whether the dated window contains the local time `local`; the
/// end is exclusive.
pub fn dated_contains(window: &DatedWindow, local: &DateTime) -> bool {
    window.start <= *local && *local < window.end
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::tz::TimeZone;
    use jiff::Timestamp;

    fn brussels(utc: &str) -> DateTime {
        let timezone = TimeZone::get("Europe/Brussels").unwrap();
        timezone.to_datetime(utc.parse::<Timestamp>().unwrap())
    }

    fn weekly(days: u8, start: (u16, u16), end: (u16, u16)) -> WeeklyWindow {
        WeeklyWindow {
            days,
            start: start.0 * 60 + start.1,
            end: end.0 * 60 + end.1,
        }
    }

    const MONDAY_TO_FRIDAY: u8 = 0b001_1111;
    const FRIDAY: u8 = 1 << 4;
    const SUNDAY: u8 = 1 << 6;

    #[test]
    fn weekday_window_follows_offset_change_in_spring() {
        let window = weekly(MONDAY_TO_FRIDAY, (7, 0), (17, 0));
        // Friday 2026-03-27 is in CET (UTC+1).
        assert!(!weekly_contains(&window, &brussels("2026-03-27T05:59:59Z")));
        assert!(weekly_contains(&window, &brussels("2026-03-27T06:00:00Z")));
        assert!(weekly_contains(&window, &brussels("2026-03-27T15:59:59Z")));
        assert!(!weekly_contains(&window, &brussels("2026-03-27T16:00:00Z")));
        // Monday 2026-03-30 is in CEST (UTC+2).
        assert!(!weekly_contains(&window, &brussels("2026-03-30T04:59:59Z")));
        assert!(weekly_contains(&window, &brussels("2026-03-30T05:00:00Z")));
        assert!(!weekly_contains(&window, &brussels("2026-03-30T15:00:00Z")));
        // Sunday 2026-03-29 is not a weekday.
        assert!(!weekly_contains(&window, &brussels("2026-03-29T10:00:00Z")));
    }

    #[test]
    fn window_starting_in_spring_gap_opens_after_gap() {
        // On 2026-03-29 Brussels skips from 02:00 CET to 03:00 CEST, which is
        // 01:00 UTC, so 02:30 local never occurs.
        let window = weekly(SUNDAY, (2, 30), (4, 0));
        assert!(!weekly_contains(&window, &brussels("2026-03-29T00:59:59Z")));
        assert!(weekly_contains(&window, &brussels("2026-03-29T01:00:00Z")));
        assert!(weekly_contains(&window, &brussels("2026-03-29T01:59:59Z")));
        assert!(!weekly_contains(&window, &brussels("2026-03-29T02:00:00Z")));
    }

    #[test]
    fn window_ending_in_spring_gap_closes_at_gap() {
        let window = weekly(SUNDAY, (1, 0), (2, 30));
        assert!(weekly_contains(&window, &brussels("2026-03-29T00:00:00Z")));
        assert!(weekly_contains(&window, &brussels("2026-03-29T00:59:59Z")));
        assert!(!weekly_contains(&window, &brussels("2026-03-29T01:00:00Z")));
    }

    #[test]
    fn window_in_repeated_autumn_hour_is_open_twice() {
        // On 2026-10-25 Brussels goes back from 03:00 CEST to 02:00 CET at
        // 01:00 UTC, so 02:00-03:00 local occurs twice.
        let window = weekly(SUNDAY, (2, 0), (2, 30));
        assert!(!weekly_contains(&window, &brussels("2026-10-24T23:59:59Z")));
        assert!(weekly_contains(&window, &brussels("2026-10-25T00:00:00Z")));
        assert!(!weekly_contains(&window, &brussels("2026-10-25T00:30:00Z")));
        assert!(weekly_contains(&window, &brussels("2026-10-25T01:00:00Z")));
        assert!(weekly_contains(&window, &brussels("2026-10-25T01:29:59Z")));
        assert!(!weekly_contains(&window, &brussels("2026-10-25T01:30:00Z")));
    }

    #[test]
    fn day_window_after_autumn_change_uses_winter_offset() {
        let window = weekly(SUNDAY, (7, 0), (17, 0));
        assert!(!weekly_contains(&window, &brussels("2026-10-25T05:59:59Z")));
        assert!(weekly_contains(&window, &brussels("2026-10-25T06:00:00Z")));
        assert!(!weekly_contains(&window, &brussels("2026-10-25T16:00:00Z")));
    }

    #[test]
    fn night_window_belongs_to_the_day_it_starts() {
        // Friday 22:00 to Saturday 06:00; 2026-12-11 is a Friday, UTC+1.
        let window = weekly(FRIDAY, (22, 0), (6, 0));
        assert!(!weekly_contains(&window, &brussels("2026-12-11T20:59:59Z")));
        assert!(weekly_contains(&window, &brussels("2026-12-11T21:00:00Z")));
        assert!(weekly_contains(&window, &brussels("2026-12-11T23:30:00Z")));
        assert!(weekly_contains(&window, &brussels("2026-12-12T04:59:59Z")));
        assert!(!weekly_contains(&window, &brussels("2026-12-12T05:00:00Z")));
        // Saturday night is not in the window, nor is Friday early morning.
        assert!(!weekly_contains(&window, &brussels("2026-12-12T21:30:00Z")));
        assert!(!weekly_contains(&window, &brussels("2026-12-11T02:00:00Z")));
    }

    #[test]
    fn sunday_night_window_continues_into_monday() {
        let window = weekly(SUNDAY, (22, 0), (2, 0));
        // Monday 2026-12-14 00:30 local.
        assert!(weekly_contains(&window, &brussels("2026-12-13T23:30:00Z")));
        assert!(!weekly_contains(&window, &brussels("2026-12-14T01:00:00Z")));
    }

    #[test]
    fn whole_day_window_ends_at_midnight() {
        let window = weekly(FRIDAY, (0, 0), (24, 0));
        assert!(weekly_contains(&window, &brussels("2026-12-10T23:00:00Z")));
        assert!(weekly_contains(&window, &brussels("2026-12-11T22:59:59Z")));
        assert!(!weekly_contains(&window, &brussels("2026-12-11T23:00:00Z")));
    }

    #[test]
    fn dated_window_is_local_and_end_exclusive() {
        let window = DatedWindow {
            start: jiff::civil::date(2026, 12, 10).at(8, 0, 0, 0),
            end: jiff::civil::date(2026, 12, 10).at(12, 0, 0, 0),
        };
        assert!(!dated_contains(&window, &brussels("2026-12-10T06:59:59Z")));
        assert!(dated_contains(&window, &brussels("2026-12-10T07:00:00Z")));
        assert!(dated_contains(&window, &brussels("2026-12-10T10:59:59Z")));
        assert!(!dated_contains(&window, &brussels("2026-12-10T11:00:00Z")));
    }

    #[test]
    fn dated_window_starting_in_spring_gap_opens_after_gap() {
        let window = DatedWindow {
            start: jiff::civil::date(2026, 3, 29).at(2, 30, 0, 0),
            end: jiff::civil::date(2026, 3, 29).at(5, 0, 0, 0),
        };
        assert!(!dated_contains(&window, &brussels("2026-03-29T00:59:59Z")));
        assert!(dated_contains(&window, &brussels("2026-03-29T01:00:00Z")));
        assert!(!dated_contains(&window, &brussels("2026-03-29T03:00:00Z")));
    }
}
