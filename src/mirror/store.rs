//! The mirror's memory: per device, per block, per poll piece the latest
//! values read and when. Pollers replace a piece's reading as a whole, so a
//! reader takes no lock and never reads a half-written piece.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use crate::config::{kind_name, MirrorBlockConfig, StateKind};
use crate::metrics::{MirrorBlockAge, MirrorFamilies, MirrorRead, MirrorReadCounters};
use crate::policy::{DeviceId, DevicePlan};

use super::block::{max_read, split, Piece};

/// The values of one piece as read by one poll.
#[derive(Debug)]
struct Reading {
    /// Registers, or 0 and 1 for bits, in address order.
    values: Arc<[u16]>,
    polled_at: Instant,
    polled_time: jiff::Timestamp,
    /// False once a later poll of the piece failed: the values are kept for
    /// snapshots, but the piece is stale.
    current: bool,
}

/// The oldest reading among the pieces a range touches.
#[derive(Debug, Clone, Copy)]
struct Oldest {
    polled_at: Instant,
    polled_time: jiff::Timestamp,
    current: bool,
}

impl Oldest {
    fn merge(self, other: Oldest) -> Oldest {
        let older = if other.polled_at < self.polled_at {
            other
        } else {
            self
        };
        Oldest {
            current: self.current && other.current,
            ..older
        }
    }

    fn is_fresh(&self, now: Instant, max_age: Duration) -> bool {
        self.current && now.saturating_duration_since(self.polled_at) < max_age
    }
}

/// Whether the device responded to its latest mirror poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reachability {
    /// Not polled yet.
    Unknown,
    /// The device responded, with data or with an exception.
    Reachable,
    /// No connection, no response in time, or a response that failed the checks.
    Unreachable,
}

/// Health of a block after its latest complete poll.
const HEALTH_UNKNOWN: u8 = 0;
const HEALTH_FRESH: u8 = 1;
const HEALTH_STALE: u8 = 2;

/// One mirror block: its settings, the pieces it is polled in and their
/// latest readings.
#[derive(Debug)]
pub struct MirrorBlock {
    config: MirrorBlockConfig,
    /// Table and range, such as `holding_register:0-199`, for events and
    /// metrics.
    label: String,
    pieces: Box<[Piece]>,
    readings: Box<[ArcSwapOption<Reading>]>,
    health: AtomicU8,
    age: MirrorBlockAge,
}

impl MirrorBlock {
    fn new(device: &Arc<str>, config: MirrorBlockConfig, families: &MirrorFamilies) -> MirrorBlock {
        let label = format!(
            "{}:{}-{}",
            kind_name(config.kind),
            config.start,
            config.end() - 1
        );
        let pieces: Box<[Piece]> = split(config.kind, config.start, config.count).into();
        let readings = pieces.iter().map(|_| ArcSwapOption::empty()).collect();
        MirrorBlock {
            age: families.block_age(device, &label),
            config,
            label,
            pieces,
            readings,
            health: AtomicU8::new(HEALTH_UNKNOWN),
        }
    }

    pub fn config(&self) -> &MirrorBlockConfig {
        &self.config
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Returns the reads that poll this block, in address order.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// Stores the values a poll read for piece `piece`. `values` contains one
    /// entry per address of the piece.
    pub fn store(&self, piece: usize, values: Vec<u16>, polled_at: Instant) {
        debug_assert_eq!(values.len(), usize::from(self.pieces[piece].count));
        self.readings[piece].store(Some(Arc::new(Reading {
            values: values.into(),
            polled_at,
            polled_time: jiff::Timestamp::now(),
            current: true,
        })));
    }

    /// Marks piece `piece` stale after a failed poll; its last values stay
    /// readable through snapshots.
    pub fn mark_failed(&self, piece: usize) {
        let slot = &self.readings[piece];
        if let Some(reading) = slot.load_full().filter(|reading| reading.current) {
            slot.store(Some(Arc::new(Reading {
                values: reading.values.clone(),
                polled_at: reading.polled_at,
                polled_time: reading.polled_time,
                current: false,
            })));
        }
    }

    /// Returns the age of the block's oldest piece, or `None` while some
    /// piece was never read.
    pub fn age(&self, now: Instant) -> Option<Duration> {
        let end = self.config.count;
        let oldest = self.visit(self.config.start, end, |_, _| {})?;
        Some(now.saturating_duration_since(oldest.polled_at))
    }

    /// Records whether the latest complete poll left the block fresh, and
    /// updates the age gauge. Returns true when that changed the block's
    /// health, including the first poll after start.
    pub fn record_poll(&self, fresh: bool, now: Instant) -> bool {
        self.sample_age(now);
        let health = if fresh { HEALTH_FRESH } else { HEALTH_STALE };
        self.health.swap(health, Ordering::Relaxed) != health
    }

    /// Sets the block's age gauge to the age of its oldest piece at `now`.
    /// The gauge stays absent until every piece was read once.
    pub fn sample_age(&self, now: Instant) {
        if let Some(age) = self.age(now) {
            self.age.set(age);
        }
    }

    /// Returns true when `address` and the `count` addresses after it lie in
    /// this block.
    fn contains(&self, kind: StateKind, address: u16, count: u32) -> bool {
        self.config.kind == kind
            && address >= self.config.start
            && u32::from(address) + count <= self.config.end()
    }

    /// Calls `value` with the offset from `address` and the value of every
    /// address in the range, which must lie in the block. Returns the oldest
    /// reading of the pieces touched, or `None` when one was never read.
    fn visit(&self, address: u16, count: u32, mut value: impl FnMut(usize, u16)) -> Option<Oldest> {
        let size = u32::from(max_read(self.config.kind));
        let first = u32::from(address) - u32::from(self.config.start);
        let end = first + count;
        let mut oldest: Option<Oldest> = None;
        let mut at = first;
        while at < end {
            let piece = at / size;
            let guard = self.readings[piece as usize].load();
            let reading = guard.as_ref()?;
            let piece_base = piece * size;
            let piece_end = (piece_base + size).min(end);
            for offset in at..piece_end {
                value(
                    (offset - first) as usize,
                    reading.values[(offset - piece_base) as usize],
                );
            }
            let this = Oldest {
                polled_at: reading.polled_at,
                polled_time: reading.polled_time,
                current: reading.current,
            };
            oldest = Some(oldest.map_or(this, |seen| seen.merge(this)));
            at = piece_end;
        }
        oldest
    }
}

/// The result of looking a read up in a device's mirror.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// The range lies in no single block.
    Outside,
    /// The response PDU is in the first `len` bytes of the output.
    Served { len: usize },
    /// The range lies in this block, whose data is stale or was never read.
    Stale(&'a MirrorBlock),
}

/// Values of a range as the mirror stores them, for readers other than
/// Modbus sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub kind: StateKind,
    pub address: u16,
    /// Registers, or 0 and 1 for bits, one per address from `address`.
    pub values: Vec<u16>,
    /// When the oldest of these values was read from the device.
    pub polled_at: Instant,
    pub polled_time: jiff::Timestamp,
    /// True when every value's latest poll succeeded and is younger than
    /// the block's `max_age_ms`.
    pub fresh: bool,
    pub reachable: Reachability,
}

/// The mirror of one device: its blocks, sorted by table and start.
#[derive(Debug)]
pub struct DeviceMirror {
    name: Arc<str>,
    address: SocketAddr,
    unit: u8,
    blocks: Box<[MirrorBlock]>,
    reachable: AtomicU8,
    reads: MirrorReadCounters,
}

impl DeviceMirror {
    fn new(device: &DevicePlan, families: &MirrorFamilies) -> DeviceMirror {
        DeviceMirror {
            name: device.name.clone(),
            address: device.address,
            unit: device.unit,
            blocks: device
                .mirror
                .iter()
                .map(|config| MirrorBlock::new(&device.name, *config, families))
                .collect(),
            reachable: AtomicU8::new(Reachability::Unknown as u8),
            reads: families.reads(&device.name),
        }
    }

    /// Returns true when this mirror polls what `device` describes, so a
    /// reload may keep its data.
    fn mirrors(&self, device: &DevicePlan) -> bool {
        self.name == device.name
            && self.address == device.address
            && self.unit == device.unit
            && self
                .blocks
                .iter()
                .map(|block| &block.config)
                .eq(device.mirror.iter())
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn blocks(&self) -> &[MirrorBlock] {
        &self.blocks
    }

    pub fn reachable(&self) -> Reachability {
        match self.reachable.load(Ordering::Relaxed) {
            value if value == Reachability::Reachable as u8 => Reachability::Reachable,
            value if value == Reachability::Unreachable as u8 => Reachability::Unreachable,
            _ => Reachability::Unknown,
        }
    }

    pub fn set_reachable(&self, reachable: bool) {
        let value = if reachable {
            Reachability::Reachable
        } else {
            Reachability::Unreachable
        };
        self.reachable.store(value as u8, Ordering::Relaxed);
    }

    /// Counts one read in `sluice_mirror_reads`.
    pub fn count(&self, read: MirrorRead) {
        self.reads.count(read);
    }

    /// Returns the block that holds `count` addresses from `address` of `kind`.
    pub fn find(&self, kind: StateKind, address: u16, count: u32) -> Option<&MirrorBlock> {
        let key = (kind as u8, address);
        let after = self
            .blocks
            .partition_point(|block| (block.config.kind as u8, block.config.start) <= key);
        let block = self.blocks.get(after.checked_sub(1)?)?;
        block.contains(kind, address, count).then_some(block)
    }

    /// Writes into `out` the response PDU a device gives to a read of
    /// `quantity` addresses of `kind` from `address` with function code
    /// `function`, when the range lies in one block that is fresh at `now`.
    /// `quantity` must be one the specification allows for the function,
    /// so the PDU fits `out`.
    pub fn read<'a>(
        &'a self,
        kind: StateKind,
        function: u8,
        address: u16,
        quantity: u16,
        now: Instant,
        out: &mut [u8],
    ) -> Lookup<'a> {
        let Some(block) = self.find(kind, address, u32::from(quantity)) else {
            return Lookup::Outside;
        };
        let count = u32::from(quantity);
        let (byte_count, oldest) = match kind {
            StateKind::HoldingRegister | StateKind::InputRegister => {
                let oldest = block.visit(address, count, |index, value| {
                    out[2 + 2 * index..4 + 2 * index].copy_from_slice(&value.to_be_bytes());
                });
                (2 * usize::from(quantity), oldest)
            }
            StateKind::Coil | StateKind::DiscreteInput => {
                let bytes = usize::from(quantity).div_ceil(8);
                out[2..2 + bytes].fill(0);
                let oldest = block.visit(address, count, |index, value| {
                    if value != 0 {
                        out[2 + index / 8] |= 1 << (index % 8);
                    }
                });
                (bytes, oldest)
            }
        };
        match oldest {
            Some(oldest) if oldest.is_fresh(now, block.config.max_age) => {
                out[0] = function;
                out[1] = byte_count as u8;
                Lookup::Served {
                    len: 2 + byte_count,
                }
            }
            _ => Lookup::Stale(block),
        }
    }

    /// Returns the values of `count` addresses of `kind` from `address`, when
    /// they lie in one block whose pieces were each read at least once.
    pub fn snapshot(
        &self,
        kind: StateKind,
        address: u16,
        count: u16,
        now: Instant,
    ) -> Option<Snapshot> {
        let block = self.find(kind, address, u32::from(count))?;
        let mut values = vec![0; usize::from(count)];
        let oldest = block.visit(address, u32::from(count), |index, value| {
            values[index] = value;
        })?;
        Some(Snapshot {
            kind,
            address,
            values,
            polled_at: oldest.polled_at,
            polled_time: oldest.polled_time,
            fresh: oldest.is_fresh(now, block.config.max_age),
            reachable: self.reachable(),
        })
    }
}

/// The mirrors of every device of one generation that has mirror blocks.
#[derive(Debug, Default)]
pub struct MirrorStore {
    /// Indexed by `DeviceId`; `None` for a device without blocks.
    devices: Box<[Option<Arc<DeviceMirror>>]>,
}

impl MirrorStore {
    /// Builds the mirrors of `devices`. A device whose address, unit and
    /// blocks did not change keeps its mirror from `previous`, so a reload
    /// does not make its blocks stale. Age gauges of blocks that are gone are
    /// removed.
    pub fn build(
        devices: &[DevicePlan],
        previous: Option<&MirrorStore>,
        families: &MirrorFamilies,
    ) -> MirrorStore {
        let reused = |device: &DevicePlan| {
            previous?
                .iter()
                .map(|(_, mirror)| mirror)
                .find(|mirror| mirror.mirrors(device))
                .cloned()
        };
        let store = MirrorStore {
            devices: devices
                .iter()
                .map(|device| {
                    (!device.mirror.is_empty()).then(|| {
                        reused(device)
                            .unwrap_or_else(|| Arc::new(DeviceMirror::new(device, families)))
                    })
                })
                .collect(),
        };
        if let Some(previous) = previous {
            store.remove_gone_gauges(previous);
        }
        store
    }

    fn remove_gone_gauges(&self, previous: &MirrorStore) {
        for (_, old) in previous.iter() {
            for block in old.blocks() {
                let kept = self.iter().any(|(_, new)| {
                    new.name == old.name && new.blocks.iter().any(|b| b.label == block.label)
                });
                if !kept {
                    block.age.remove();
                }
            }
        }
    }

    /// Returns the mirror of `device`, if it has blocks.
    pub fn device(&self, device: DeviceId) -> Option<&Arc<DeviceMirror>> {
        self.devices.get(device)?.as_ref()
    }

    /// Returns the mirror of the device named `name`, if it has blocks.
    pub fn find(&self, name: &str) -> Option<&Arc<DeviceMirror>> {
        self.iter()
            .map(|(_, mirror)| mirror)
            .find(|mirror| &*mirror.name == name)
    }

    /// Lists the device ids and mirrors of every device with blocks.
    pub fn iter(&self) -> impl Iterator<Item = (DeviceId, &Arc<DeviceMirror>)> {
        self.devices
            .iter()
            .enumerate()
            .filter_map(|(id, mirror)| Some((id, mirror.as_ref()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DeviceConfig, OnStale};
    use crate::modbus::frame::MAX_PDU_LEN;

    const READ_COILS: u8 = 0x01;
    const READ_HOLDING_REGISTERS: u8 = 0x03;

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

    fn device(blocks: &[MirrorBlockConfig]) -> DeviceMirror {
        let config = DeviceConfig::new("press-1", "127.0.0.1:5021".parse().unwrap());
        let plan = DevicePlan {
            name: Arc::from("press-1"),
            address: config.address,
            unit: config.unit,
            timeout: config.timeout,
            max_connections: config.max_connections,
            max_in_flight: config.max_in_flight,
            connect_timeout: config.connect_timeout,
            backoff_max: config.backoff_max,
            mirror: Arc::from(blocks),
            tls: None,
        };
        DeviceMirror::new(&plan, &MirrorFamilies::default())
    }

    /// Stores `value(address)` for every address of every piece of every
    /// block, read at `at`.
    fn fill(mirror: &DeviceMirror, at: Instant, value: impl Fn(u32) -> u16) {
        for block in mirror.blocks() {
            for (index, piece) in block.pieces().iter().enumerate() {
                let first = u32::from(piece.start);
                let values = (first..first + u32::from(piece.count))
                    .map(&value)
                    .collect();
                block.store(index, values, at);
            }
        }
    }

    fn served(lookup: Lookup<'_>) -> usize {
        match lookup {
            Lookup::Served { len } => len,
            other => panic!("expected a served read, got {other:?}"),
        }
    }

    #[test]
    fn find_needs_the_whole_range_in_one_block() {
        let mirror = device(&[
            block(StateKind::HoldingRegister, 0, 100),
            block(StateKind::HoldingRegister, 100, 100),
            block(StateKind::Coil, 0, 16),
        ]);
        let found = |kind, address, count| {
            mirror
                .find(kind, address, count)
                .map(|block| block.label().to_owned())
        };
        assert_eq!(
            found(StateKind::HoldingRegister, 0, 100).as_deref(),
            Some("holding_register:0-99")
        );
        assert_eq!(
            found(StateKind::HoldingRegister, 150, 50).as_deref(),
            Some("holding_register:100-199")
        );
        assert_eq!(found(StateKind::HoldingRegister, 95, 10), None);
        assert_eq!(found(StateKind::HoldingRegister, 199, 2), None);
        assert_eq!(found(StateKind::InputRegister, 0, 1), None);
        assert_eq!(found(StateKind::Coil, 15, 1).as_deref(), Some("coil:0-15"));
        assert_eq!(found(StateKind::Coil, 15, 2), None);
    }

    #[test]
    fn register_read_encodes_like_a_device() {
        let mirror = device(&[block(StateKind::HoldingRegister, 10, 20)]);
        let now = Instant::now();
        fill(&mirror, now, |address| 0x0100 + address as u16);
        let mut out = [0u8; MAX_PDU_LEN];
        let len = served(mirror.read(
            StateKind::HoldingRegister,
            READ_HOLDING_REGISTERS,
            12,
            3,
            now,
            &mut out,
        ));
        assert_eq!(
            &out[..len],
            &[0x03, 0x06, 0x01, 0x0C, 0x01, 0x0D, 0x01, 0x0E]
        );
    }

    #[test]
    fn read_across_two_pieces_joins_them() {
        let mirror = device(&[block(StateKind::InputRegister, 0, 250)]);
        let now = Instant::now();
        fill(&mirror, now, |address| address as u16);
        let mut out = [0u8; MAX_PDU_LEN];
        let len = served(mirror.read(StateKind::InputRegister, 0x04, 123, 4, now, &mut out));
        assert_eq!(&out[..len], &[0x04, 0x08, 0, 123, 0, 124, 0, 125, 0, 126]);
    }

    #[test]
    fn bit_read_packs_least_significant_bit_first() {
        let mirror = device(&[block(StateKind::Coil, 0, 32)]);
        let now = Instant::now();
        // Coils 3, 5, 8 and 12 are on.
        fill(&mirror, now, |address| {
            u16::from([3, 5, 8, 12].contains(&address))
        });
        let mut out = [0xFFu8; MAX_PDU_LEN];
        let len = served(mirror.read(StateKind::Coil, READ_COILS, 3, 10, now, &mut out));
        // Bits from address 3: 3 is bit 0, 5 is bit 2, 8 is bit 5, 12 is
        // bit 9 (second byte, bit 1); unused high bits are zero.
        assert_eq!(&out[..len], &[0x01, 0x02, 0b0010_0101, 0b0000_0010]);
    }

    #[test]
    fn data_older_than_max_age_is_stale() {
        let mirror = device(&[block(StateKind::HoldingRegister, 0, 10)]);
        let polled = Instant::now();
        fill(&mirror, polled, |_| 7);
        let mut out = [0u8; MAX_PDU_LEN];
        let young = polled + Duration::from_millis(999);
        assert_eq!(
            served(mirror.read(StateKind::HoldingRegister, 3, 0, 1, young, &mut out)),
            4
        );
        let old = polled + Duration::from_millis(1_000);
        assert!(matches!(
            mirror.read(StateKind::HoldingRegister, 3, 0, 1, old, &mut out),
            Lookup::Stale(block) if block.label() == "holding_register:0-9"
        ));
    }

    #[test]
    fn never_polled_block_is_stale() {
        let mirror = device(&[block(StateKind::HoldingRegister, 0, 10)]);
        let mut out = [0u8; MAX_PDU_LEN];
        assert!(matches!(
            mirror.read(
                StateKind::HoldingRegister,
                3,
                0,
                1,
                Instant::now(),
                &mut out
            ),
            Lookup::Stale(_)
        ));
        assert_eq!(
            mirror.snapshot(StateKind::HoldingRegister, 0, 1, Instant::now()),
            None
        );
    }

    #[test]
    fn failed_piece_is_stale_but_keeps_its_values() {
        let mirror = device(&[block(StateKind::HoldingRegister, 0, 200)]);
        let polled = Instant::now();
        fill(&mirror, polled, |address| address as u16 * 2);
        mirror.blocks()[0].mark_failed(1);
        let mut out = [0u8; MAX_PDU_LEN];
        assert_eq!(
            served(mirror.read(StateKind::HoldingRegister, 3, 0, 125, polled, &mut out)),
            252
        );
        assert!(matches!(
            mirror.read(StateKind::HoldingRegister, 3, 120, 10, polled, &mut out),
            Lookup::Stale(_)
        ));
        let snapshot = mirror
            .snapshot(StateKind::HoldingRegister, 124, 2, polled)
            .unwrap();
        assert_eq!(snapshot.values, vec![248, 250]);
        assert!(!snapshot.fresh);
    }

    #[test]
    fn snapshot_reports_oldest_poll_and_reachability() {
        let mirror = device(&[block(StateKind::DiscreteInput, 0, 4_000)]);
        let first = Instant::now();
        fill(&mirror, first, |address| u16::from(address % 2 == 1));
        let later = first + Duration::from_millis(300);
        mirror.blocks()[0].store(1, vec![1; 2_000], later);
        mirror.set_reachable(true);

        let snapshot = mirror
            .snapshot(StateKind::DiscreteInput, 1_998, 4, later)
            .unwrap();
        assert_eq!(snapshot.values, vec![0, 1, 1, 1]);
        assert_eq!(snapshot.polled_at, first);
        assert!(snapshot.fresh);
        assert_eq!(snapshot.reachable, Reachability::Reachable);
        assert_eq!(
            mirror.blocks()[0].age(later),
            Some(Duration::from_millis(300))
        );
    }

    #[test]
    fn record_poll_reports_health_changes() {
        let mirror = device(&[block(StateKind::Coil, 0, 8)]);
        let block = &mirror.blocks()[0];
        let now = Instant::now();
        assert!(block.record_poll(true, now));
        assert!(!block.record_poll(true, now));
        assert!(block.record_poll(false, now));
        assert!(!block.record_poll(false, now));
    }
}
