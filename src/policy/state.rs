//! The table of operational state readings that pollers write and `decide()`
//! reads. Each state has one atomic slot, so neither side takes a lock; which
//! reading is fresh enough and what it means is the policy's business.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Flag set in a slot that contains a reading. A slot of 0 contains none.
const KNOWN: u64 = 1 << 63;
/// Milliseconds since the table's epoch, stored in the bits between the raw
/// value and the flag: 47 bits last about 4,000 years.
const TIME_SHIFT: u32 = 16;
const TIME_MASK: u64 = (1 << 47) - 1;

/// One raw reading and when it was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub raw: u16,
    pub at: Instant,
}

/// The latest raw reading of every configured state, indexed like
/// `Policy::states()`. A table belongs to one policy snapshot: after a
/// reload that changes the states, build a new table.
#[derive(Debug)]
pub struct StateTable {
    epoch: Instant,
    slots: Box<[AtomicU64]>,
}

impl Default for StateTable {
    fn default() -> Self {
        StateTable::new(0)
    }
}

impl StateTable {
    /// Returns a table of `n_states` states, all unknown.
    pub fn new(n_states: usize) -> Self {
        StateTable {
            epoch: Instant::now(),
            slots: (0..n_states).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Records a poll result taken at `now`. `None` means the read failed:
    /// the state becomes unknown at once, so rules that depend on it stop
    /// matching. A `state` outside the table is ignored.
    pub fn set(&self, state: usize, raw: Option<u16>, now: Instant) {
        let Some(slot) = self.slots.get(state) else {
            return;
        };
        let word = match raw {
            None => 0,
            Some(raw) => KNOWN | (self.millis(now) << TIME_SHIFT) | u64::from(raw),
        };
        slot.store(word, Ordering::Relaxed);
    }

    /// Returns whole milliseconds from the epoch to `now`, 0 before it.
    fn millis(&self, now: Instant) -> u64 {
        let millis = now.saturating_duration_since(self.epoch).as_millis();
        (millis as u64) & TIME_MASK
    }

    /// Returns the slot of `state` split into raw value and milliseconds.
    fn load(&self, state: usize) -> Option<(u16, u64)> {
        let word = self.slots.get(state)?.load(Ordering::Relaxed);
        (word & KNOWN != 0).then_some((word as u16, (word >> TIME_SHIFT) & TIME_MASK))
    }

    /// Returns the latest successful reading of `state`, to the millisecond.
    pub fn reading(&self, state: usize) -> Option<Reading> {
        let (raw, millis) = self.load(state)?;
        Some(Reading {
            raw,
            at: self.epoch + Duration::from_millis(millis),
        })
    }

    /// Returns the raw value of `state` when it was read no more than
    /// `max_age` before `now`, both taken to the millisecond.
    pub fn fresh(&self, state: usize, now: Instant, max_age: Duration) -> Option<u16> {
        let (raw, read_at) = self.load(state)?;
        let age = u128::from(self.millis(now).saturating_sub(read_at));
        (age <= max_age.as_millis()).then_some(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_table_knows_nothing() {
        let table = StateTable::new(2);
        assert_eq!(table.len(), 2);
        assert_eq!(table.reading(0), None);
        assert_eq!(table.fresh(1, Instant::now(), Duration::MAX), None);
    }

    #[test]
    fn fresh_returns_value_until_max_age() {
        let table = StateTable::new(1);
        let read_at = Instant::now();
        table.set(0, Some(1), read_at);
        let max_age = Duration::from_millis(1500);
        assert_eq!(table.fresh(0, read_at, max_age), Some(1));
        assert_eq!(table.fresh(0, read_at + max_age, max_age), Some(1));
        assert_eq!(
            table.fresh(0, read_at + max_age + Duration::from_millis(1), max_age),
            None
        );
    }

    #[test]
    fn failed_read_makes_state_unknown() {
        let table = StateTable::new(1);
        let now = Instant::now();
        table.set(0, Some(7), now);
        table.set(0, None, now);
        assert_eq!(table.reading(0), None);
    }

    #[test]
    fn out_of_range_state_is_ignored_and_unknown() {
        let table = StateTable::new(1);
        table.set(5, Some(1), Instant::now());
        assert_eq!(table.reading(5), None);
    }

    #[test]
    fn reading_keeps_raw_value_and_millisecond_time() {
        let table = StateTable::new(1);
        let at = Instant::now() + Duration::from_millis(2500);
        table.set(0, Some(0xBEEF), at);
        let reading = table.reading(0).unwrap();
        assert_eq!(reading.raw, 0xBEEF);
        assert!(at.saturating_duration_since(reading.at) < Duration::from_millis(1));
    }
}
