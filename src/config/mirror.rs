//! Validation of a device's `mirror` blocks and of the `mirror_only` listener
//! setting that depends on them.

use toml::Spanned;

use super::diagnostic::Origin;
use super::gateway::Checker;
use super::raw;
use super::{MirrorBlockConfig, OnStale, StateKind};

/// Poll period of a block without `poll_ms`, in milliseconds.
pub const DEFAULT_POLL_MS: i64 = 1_000;
/// Largest `poll_ms` or `max_age_ms` of a block: one hour, in milliseconds.
/// Data older than that is no mirror of the device any more.
const MAX_BLOCK_MS: i64 = 3_600_000;
/// Number of addresses in each Modbus table.
const TABLE_SIZE: i64 = 0x1_0000;

const KINDS: [(&str, StateKind); 4] = [
    ("holding_register", StateKind::HoldingRegister),
    ("input_register", StateKind::InputRegister),
    ("coil", StateKind::Coil),
    ("discrete_input", StateKind::DiscreteInput),
];

/// A checked block with the position of its `start`, for overlap messages.
struct Checked {
    block: MirrorBlockConfig,
    at: Origin,
}

impl Checker<'_> {
    /// Checks the `mirror` list of device `key`. Returns the valid blocks
    /// sorted by table and start; overlapping blocks of one table are errors.
    pub(super) fn mirror_blocks(
        &mut self,
        key: &str,
        sections: Option<&Vec<Spanned<raw::MirrorSection>>>,
    ) -> Vec<MirrorBlockConfig> {
        let Some(sections) = sections else {
            return Vec::new();
        };
        let mut checked: Vec<Checked> = sections
            .iter()
            .enumerate()
            .filter_map(|(index, section)| {
                let block_key = format!("{key}.mirror[{}]", index + 1);
                self.mirror_block(&block_key, section)
            })
            .collect();
        checked.sort_by_key(|checked| (checked.block.kind as u8, checked.block.start));
        for pair in checked.windows(2) {
            let (first, second) = (&pair[0], &pair[1]);
            if first.block.kind == second.block.kind
                && u32::from(second.block.start) < first.block.end()
            {
                self.report.error(
                    &second.at,
                    format!(
                        "{key}.mirror: {} block {}-{} overlaps block {}-{} at {}; a block of one table may not overlap another",
                        kind_name(second.block.kind),
                        second.block.start,
                        second.block.end() - 1,
                        first.block.start,
                        first.block.end() - 1,
                        first.at
                    ),
                );
            }
        }
        checked.into_iter().map(|checked| checked.block).collect()
    }

    fn mirror_block(&mut self, key: &str, entry: &Spanned<raw::MirrorSection>) -> Option<Checked> {
        let section = entry.get_ref();
        let kind = match &section.kind {
            Some(kind) => self.choice(
                &format!("{key}.kind"),
                Some(kind),
                &KINDS,
                StateKind::HoldingRegister,
            ),
            None => {
                self.error(
                    entry,
                    format!("{key}.kind: missing; set kind = \"holding_register\", \"input_register\", \"coil\" or \"discrete_input\""),
                );
                None
            }
        };
        let Some(start_value) = &section.start else {
            self.error(
                entry,
                format!("{key}.start: missing; set the first 0-based address, as start = 0"),
            );
            return None;
        };
        let start = self.integer(
            &format!("{key}.start"),
            Some(start_value),
            0,
            (0, TABLE_SIZE - 1),
        );
        let count = match (&section.count, start) {
            (None, _) => {
                self.error(
                    entry,
                    format!("{key}.count: missing; set the number of addresses, as count = 100"),
                );
                None
            }
            (Some(count), Some(start)) => self.integer(
                &format!("{key}.count"),
                Some(count),
                1,
                (1, TABLE_SIZE - start),
            ),
            (Some(_), None) => None,
        };
        let poll_ms = self.integer(
            &format!("{key}.poll_ms"),
            section.poll_ms.as_ref(),
            DEFAULT_POLL_MS,
            (1, MAX_BLOCK_MS),
        );
        let poll = poll_ms.unwrap_or(DEFAULT_POLL_MS);
        let max_age_ms = self.integer(
            &format!("{key}.max_age_ms"),
            section.max_age_ms.as_ref(),
            3 * poll,
            (1, MAX_BLOCK_MS),
        );
        if let (Some(value), Some(max_age)) = (&section.max_age_ms, max_age_ms) {
            if max_age <= poll {
                self.warning(
                    value,
                    format!(
                        "{key}.max_age_ms: {max_age} is not longer than poll_ms {poll}, so the block is stale between polls; set it to at least 2 × poll_ms"
                    ),
                );
            }
        }
        let stale = self.choice(
            &format!("{key}.stale"),
            section.stale.as_ref(),
            &[
                ("forward", OnStale::Forward),
                ("exception", OnStale::Exception),
            ],
            OnStale::Forward,
        );

        let block = MirrorBlockConfig {
            kind: kind?,
            start: start? as u16,
            count: count? as u32,
            poll: std::time::Duration::from_millis(poll_ms? as u64),
            max_age: std::time::Duration::from_millis(max_age_ms? as u64),
            stale: stale?,
        };
        Some(Checked {
            block,
            at: self.at(start_value),
        })
    }

    /// Warns about a `mirror_only` listener that reaches a device without
    /// mirror blocks: every request to that device would be denied.
    pub(super) fn mirror_only_targets(
        &mut self,
        listeners: &[raw::ListenerSection],
        devices: &[raw::DeviceSection],
    ) {
        let mirrored = |name: &str| {
            devices.iter().any(|device| {
                device.name.get_ref() == name
                    && device
                        .mirror
                        .as_ref()
                        .is_some_and(|blocks| !blocks.is_empty())
            })
        };
        for (index, listener) in listeners.iter().enumerate() {
            let Some(flag) = listener.mirror_only.as_ref().filter(|flag| *flag.get_ref()) else {
                continue;
            };
            let mut targets: Vec<&str> = Vec::new();
            if let Some(device) = &listener.device {
                targets.push(device.get_ref());
            }
            if let Some(routes) = &listener.routes {
                targets.extend(
                    routes
                        .get_ref()
                        .values()
                        .map(|device| device.get_ref().as_str()),
                );
            }
            targets.sort_unstable();
            targets.dedup();
            for device in targets {
                let known = devices
                    .iter()
                    .any(|section| section.name.get_ref() == device);
                if known && !mirrored(device) {
                    self.warning(
                        flag,
                        format!(
                            "listener[{}].mirror_only: device \"{device}\" has no mirror blocks, so every request to it is denied; add a mirror list to the device",
                            index + 1
                        ),
                    );
                }
            }
        }
    }
}

/// Returns the configuration word of a table.
pub fn kind_name(kind: StateKind) -> &'static str {
    KINDS
        .iter()
        .find(|(_, candidate)| *candidate == kind)
        .map_or("holding_register", |(name, _)| name)
}
