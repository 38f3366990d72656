//! Splitting a mirror block into the reads that poll it.

use crate::config::StateKind;
use crate::modbus::frame::{MAX_READ_BITS, MAX_READ_REGISTERS};

/// One read of a block's poll: a first address and a quantity that one
/// Modbus request may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub start: u16,
    pub count: u16,
}

/// Returns the largest quantity one read of `kind` may request.
pub fn max_read(kind: StateKind) -> u16 {
    match kind {
        StateKind::HoldingRegister | StateKind::InputRegister => MAX_READ_REGISTERS,
        StateKind::Coil | StateKind::DiscreteInput => MAX_READ_BITS,
    }
}

/// Splits `count` addresses from `start` into reads of at most the
/// specification's maximum quantity for `kind`, in address order. Every
/// piece but the last has that maximum size, so the piece of an address is
/// its offset divided by the maximum.
pub fn split(kind: StateKind, start: u16, count: u32) -> Vec<Piece> {
    let size = u32::from(max_read(kind));
    let end = u32::from(start) + count;
    (u32::from(start)..end)
        .step_by(size as usize)
        .map(|first| Piece {
            start: first as u16,
            count: (end - first).min(size) as u16,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_block_splits_at_125() {
        let pieces = split(StateKind::HoldingRegister, 0, 300);
        assert_eq!(
            pieces,
            vec![
                Piece {
                    start: 0,
                    count: 125
                },
                Piece {
                    start: 125,
                    count: 125
                },
                Piece {
                    start: 250,
                    count: 50
                },
            ]
        );
    }

    #[test]
    fn bit_block_splits_at_2000() {
        let pieces = split(StateKind::Coil, 100, 4001);
        assert_eq!(
            pieces,
            vec![
                Piece {
                    start: 100,
                    count: 2000
                },
                Piece {
                    start: 2100,
                    count: 2000
                },
                Piece {
                    start: 4100,
                    count: 1
                },
            ]
        );
    }

    #[test]
    fn small_block_is_one_read() {
        let pieces = split(StateKind::InputRegister, 7, 125);
        assert_eq!(
            pieces,
            vec![Piece {
                start: 7,
                count: 125
            }]
        );
    }

    #[test]
    fn block_to_end_of_table_splits_without_overflow() {
        let pieces = split(StateKind::InputRegister, 65_400, 136);
        assert_eq!(
            pieces,
            vec![
                Piece {
                    start: 65_400,
                    count: 125
                },
                Piece {
                    start: 65_525,
                    count: 11
                },
            ]
        );
        let whole = split(StateKind::DiscreteInput, 0, 65_536);
        assert_eq!(whole.len(), 33);
        assert_eq!(
            whole[32],
            Piece {
                start: 64_000,
                count: 1_536
            }
        );
    }
}
