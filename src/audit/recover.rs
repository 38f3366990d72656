//! Finding the end of the chain when the log opens: removes a torn last
//! line left by a crash, then reads records backwards from the newest
//! segment for the last record (its `seq` and hash) and the last seal.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use super::record::{parse_record, Digest32, GENESIS_HASH};
use super::segment::list_segments;

/// The last seal record found in the log.
#[derive(Debug, Clone)]
pub struct LastSeal {
    pub seq: u64,
    pub epoch: u64,
    pub mac: String,
    pub prev_hash: Digest32,
}

/// The chain state that writing continues from.
#[derive(Debug)]
pub struct TailState {
    /// The highest segment number present.
    pub newest_segment: Option<u64>,
    /// The segment that contains the last record.
    pub last_record_segment: Option<u64>,
    /// 0 when the log contains no record.
    pub last_seq: u64,
    pub last_hash: Digest32,
    pub torn_bytes: u64,
    pub torn_segment: Option<PathBuf>,
    pub last_seal: Option<LastSeal>,
    /// Records after the last seal, or after the log's start without one.
    pub records_since_seal: u64,
}

/// Truncates a torn last line away and finds the chain's last record. With
/// `find_seal`, keeps reading backwards until the last seal. Fails when the
/// last complete record is damaged, because continuing the chain from it
/// would hide the damage.
pub fn recover_tail(dir: &Path, find_seal: bool) -> io::Result<TailState> {
    let segments = list_segments(dir)?;
    let mut state = TailState {
        newest_segment: segments.last().map(|segment| segment.number),
        last_record_segment: None,
        last_seq: 0,
        last_hash: GENESIS_HASH,
        torn_bytes: 0,
        torn_segment: None,
        last_seal: None,
        records_since_seal: 0,
    };

    for (index, segment) in segments.iter().enumerate().rev() {
        let mut data = fs::read(&segment.path)?;
        if index == segments.len() - 1 {
            truncate_torn_line(&segment.path, &mut data, &mut state)?;
        }
        let done = scan_backwards(&segment.path, segment.number, &data, find_seal, &mut state)?;
        if done {
            break;
        }
    }
    Ok(state)
}

fn truncate_torn_line(path: &Path, data: &mut Vec<u8>, state: &mut TailState) -> io::Result<()> {
    let complete = data
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |position| position + 1);
    if complete == data.len() {
        return Ok(());
    }
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(complete as u64)?;
    file.sync_all()?;
    state.torn_bytes = (data.len() - complete) as u64;
    state.torn_segment = Some(path.to_path_buf());
    data.truncate(complete);
    Ok(())
}

/// Reads the lines of one segment from the end. Returns true when nothing
/// older needs reading.
fn scan_backwards(
    path: &Path,
    number: u64,
    data: &[u8],
    find_seal: bool,
    state: &mut TailState,
) -> io::Result<bool> {
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    if body.is_empty() {
        return Ok(false);
    }
    for line in body.rsplit(|&b| b == b'\n') {
        let record = match parse_record(line) {
            Ok(record) => record,
            Err(error) if state.last_record_segment.is_none() => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the last record of {} is damaged ({error}); \
                         run `sluice audit verify` and move the damaged segment away",
                        path.display()
                    ),
                ));
            }
            // An older damaged line ends the search for the last seal; the
            // verifier reports it.
            Err(_) => return Ok(true),
        };

        if state.last_record_segment.is_none() {
            state.last_record_segment = Some(number);
            state.last_seq = record.seq;
            state.last_hash = record.hash;
            if !find_seal {
                return Ok(true);
            }
        }
        match record.seal {
            Some(seal) => {
                state.last_seal = Some(LastSeal {
                    seq: record.seq,
                    epoch: seal.epoch,
                    mac: seal.mac,
                    prev_hash: record.prev_hash,
                });
                return Ok(true);
            }
            None => state.records_since_seal += 1,
        }
    }
    Ok(false)
}
