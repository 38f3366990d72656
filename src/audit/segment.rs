//! Segment files of the audit folder: their names (`audit-000001.jsonl`,
//! numbered from 1 in write order), listing them in order, and removing
//! those past retention.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::key::sync_dir;

const SEGMENT_PREFIX: &str = "audit-";
const SEGMENT_SUFFIX: &str = ".jsonl";

/// One segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub number: u64,
    pub path: PathBuf,
}

/// Returns the file name of segment `number`.
pub fn segment_name(number: u64) -> String {
    format!("{SEGMENT_PREFIX}{number:06}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Lists the segments in `dir`, oldest first. Other files are ignored.
pub fn list_segments(dir: &Path) -> io::Result<Vec<Segment>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(number) = name.to_str().and_then(parse_segment_name) else {
            continue;
        };
        segments.push(Segment {
            number,
            path: entry.path(),
        });
    }
    segments.sort_by_key(|segment| segment.number);
    Ok(segments)
}

/// Removes segments, oldest first, whose modification time is more than
/// `retention_days` days before `now`. It stops at the first segment that is
/// still within retention or numbered `keep_from` or later, so the remaining
/// segments stay contiguous and the segment holding the chain's last record
/// is never removed. A `retention_days` of 0 keeps everything. Returns the
/// removed paths.
pub fn remove_expired(
    dir: &Path,
    retention_days: u32,
    keep_from: u64,
    now: SystemTime,
) -> io::Result<Vec<PathBuf>> {
    if retention_days == 0 {
        return Ok(Vec::new());
    }
    let retention = Duration::from_secs(u64::from(retention_days) * 86_400);
    let Some(cutoff) = now.checked_sub(retention) else {
        return Ok(Vec::new());
    };

    let mut removed = Vec::new();
    for segment in list_segments(dir)? {
        if segment.number >= keep_from {
            break;
        }
        let modified = fs::metadata(&segment.path)?.modified()?;
        if modified >= cutoff {
            break;
        }
        fs::remove_file(&segment.path)?;
        removed.push(segment.path);
    }
    if !removed.is_empty() {
        sync_dir(dir)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort_numerically() {
        let dir = tempfile::tempdir().unwrap();
        for number in [10, 2, 1_000_000] {
            fs::write(dir.path().join(segment_name(number)), b"").unwrap();
        }
        fs::write(dir.path().join("audit.key"), b"").unwrap();
        fs::write(dir.path().join("audit-x.jsonl"), b"").unwrap();
        let numbers: Vec<u64> = list_segments(dir.path())
            .unwrap()
            .iter()
            .map(|segment| segment.number)
            .collect();
        assert_eq!(numbers, vec![2, 10, 1_000_000]);
        assert_eq!(segment_name(2), "audit-000002.jsonl");
    }

    #[test]
    fn zero_retention_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(segment_name(1)), b"").unwrap();
        let far_future = SystemTime::now() + Duration::from_secs(1_000 * 86_400);
        let removed = remove_expired(dir.path(), 0, 5, far_future).unwrap();
        assert!(removed.is_empty());
    }
}
