//! Sets of 16-bit values (addresses, register values, quantities) as sorted,
//! merged, inclusive intervals with binary search lookups.

use crate::config::Range16;

/// A set of 16-bit values. Intervals are sorted, disjoint and not adjacent,
/// so a range of values lies inside the set exactly when it lies inside one
/// interval.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntervalSet {
    intervals: Box<[(u16, u16)]>,
}

impl IntervalSet {
    /// Builds the set of every value in any of `ranges`.
    pub fn new(ranges: impl IntoIterator<Item = Range16>) -> Self {
        let mut sorted: Vec<(u16, u16)> = ranges.into_iter().map(|r| (r.first, r.last)).collect();
        sorted.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(sorted.len());
        for (first, last) in sorted {
            match merged.last_mut() {
                Some(previous) if u32::from(first) <= u32::from(previous.1) + 1 => {
                    previous.1 = previous.1.max(last);
                }
                _ => merged.push((first, last)),
            }
        }
        IntervalSet {
            intervals: merged.into_boxed_slice(),
        }
    }

    /// Returns the intervals, sorted and merged.
    pub fn intervals(&self) -> &[(u16, u16)] {
        &self.intervals
    }

    pub fn is_empty(&self) -> bool {
        self.intervals.is_empty()
    }

    /// Returns the interval that contains `value`.
    fn interval_of(&self, value: u16) -> Option<(u16, u16)> {
        let after = self
            .intervals
            .partition_point(|interval| interval.0 <= value);
        let interval = *self.intervals.get(after.checked_sub(1)?)?;
        (value <= interval.1).then_some(interval)
    }

    pub fn contains(&self, value: u16) -> bool {
        self.interval_of(value).is_some()
    }

    /// Returns whether every value from `first` to `last`, inclusive, is in
    /// the set. An empty range (`last < first`) is contained.
    pub fn contains_range(&self, first: u16, last: u16) -> bool {
        if last < first {
            return true;
        }
        self.interval_of(first)
            .is_some_and(|(_, interval_last)| last <= interval_last)
    }

    /// Returns the first value from `first` to `last`, inclusive, that is not
    /// in the set, computed in `u32` so that a range running past 65535 can
    /// be checked and reported too.
    pub fn first_missing(&self, first: u32, last: u32) -> Option<u32> {
        if last < first {
            return None;
        }
        let Ok(start) = u16::try_from(first) else {
            return Some(first);
        };
        let covered_to = match self.interval_of(start) {
            None => return Some(first),
            Some((_, interval_last)) => u32::from(interval_last),
        };
        (covered_to < last).then_some(covered_to + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ranges: &[(u16, u16)]) -> IntervalSet {
        IntervalSet::new(
            ranges
                .iter()
                .map(|&(first, last)| Range16::new(first, last)),
        )
    }

    #[test]
    fn new_merges_overlapping_and_adjacent_intervals() {
        let merged = set(&[(10, 19), (0, 5), (20, 30), (3, 8), (100, 100)]);
        assert_eq!(merged.intervals(), &[(0, 8), (10, 30), (100, 100)]);
        assert_eq!(set(&[(0, 65535), (5, 6)]).intervals(), &[(0, 65535)]);
    }

    #[test]
    fn contains_range_needs_one_interval() {
        let merged = set(&[(0, 9), (20, 29)]);
        assert!(merged.contains_range(0, 9));
        assert!(merged.contains_range(22, 25));
        assert!(!merged.contains_range(5, 22));
        assert!(!merged.contains_range(10, 10));
        assert!(!merged.contains_range(25, 30));
        assert!(merged.contains(29));
        assert!(!merged.contains(30));
    }

    #[test]
    fn first_missing_reports_first_uncovered_address() {
        let merged = set(&[(0, 999)]);
        assert_eq!(merged.first_missing(990, 1009), Some(1000));
        assert_eq!(merged.first_missing(1000, 1000), Some(1000));
        assert_eq!(merged.first_missing(0, 999), None);
        assert_eq!(set(&[(0, 65535)]).first_missing(65530, 65540), Some(65536));
        assert_eq!(IntervalSet::default().first_missing(7, 8), Some(7));
    }
}
