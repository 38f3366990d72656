//! The verifier behind `sluice audit verify`: walks every segment in order
//! and checks each record's own hash, its `seq`, its link to the record
//! before, and each seal's MAC with the key evolved to that seal's epoch
//! from the verification key. Stops at the first bad record.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::Path;

use super::key::{load_key, EpochKey};
use super::record::{parse_record, seal_mac_matches, Digest32, ParsedRecord, GENESIS_HASH};
use super::segment::{list_segments, Segment};

/// The outcome of `verify`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// The first bad record's `seq` and what is wrong with it.
    pub first_bad: Option<(u64, String)>,
    /// Records checked, seals included.
    pub records: u64,
    /// Seals whose MAC verified.
    pub seals: u64,
    /// The `seq` range of the records checked.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Records after the last seal: not an error, but not yet protected
    /// against an intruder who has the current key.
    pub unsealed: Option<(u64, u64)>,
    /// Findings that are not errors, such as a torn last line.
    pub notes: Vec<String>,
}

impl VerifyReport {
    /// Returns whether no bad record was found.
    pub fn is_good(&self) -> bool {
        self.first_bad.is_none()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.first_seq, self.last_seq) {
            (Some(first), Some(last)) => {
                let seals = if self.seals == 1 { "seal" } else { "seals" };
                writeln!(
                    f,
                    "checked {} records (seq {first}-{last}), {} {seals}",
                    self.records, self.seals
                )?
            }
            _ => writeln!(f, "checked 0 records")?,
        }
        for note in &self.notes {
            writeln!(f, "{note}")?;
        }
        if let Some((first, last)) = self.unsealed {
            if first == last {
                writeln!(f, "record {first} is not sealed yet")?;
            } else {
                writeln!(f, "records {first}-{last} are not sealed yet")?;
            }
        }
        match &self.first_bad {
            Some((seq, problem)) => writeln!(f, "record {seq}: {problem}"),
            None => writeln!(f, "audit log verified"),
        }
    }
}

/// The members read from a record that is not checked.
#[derive(serde::Deserialize)]
struct SeqPeek {
    seq: u64,
    event_type: String,
    #[serde(default)]
    detail: Option<serde_json::Value>,
}

/// The verifier's state between records.
struct Walk {
    from: Option<u64>,
    verification_key: EpochKey,
    /// The key of the last checked seal's epoch, so keys evolve forward
    /// once rather than from epoch 0 for every seal.
    running_key: EpochKey,
    /// `None` until the first record is read.
    last: Option<(u64, Digest32)>,
    expected_epoch: Option<u64>,
    last_seal: Option<(u64, u64)>,
    report: VerifyReport,
}

/// Verifies the log in `audit_dir` against the verification key (the
/// epoch-0 key printed by `init_key`). With `from`, checking starts at that
/// `seq`: earlier records are not checked, and the first checked record's
/// link to the one before it is taken as given.
pub fn verify(audit_dir: &Path, key: &[u8; 32], from: Option<u64>) -> io::Result<VerifyReport> {
    let verification_key = EpochKey {
        epoch: 0,
        key: *key,
    };
    let mut walk = Walk {
        from,
        running_key: verification_key.clone(),
        verification_key,
        last: None,
        expected_epoch: None,
        last_seal: None,
        report: VerifyReport::default(),
    };

    let segments = list_segments(audit_dir)?;
    let start = first_needed_segment(&segments, from)?;
    for (index, segment) in segments.iter().enumerate().skip(start) {
        let newest = index == segments.len() - 1;
        walk.segment(segment, newest)?;
        if walk.report.first_bad.is_some() {
            return Ok(walk.report);
        }
    }

    walk.finish_unsealed();
    walk.check_key_file(audit_dir)?;
    Ok(walk.report)
}

/// Returns the index of the segment holding `from`, skipping older
/// segments without reading them past their first line.
fn first_needed_segment(segments: &[Segment], from: Option<u64>) -> io::Result<usize> {
    let Some(from) = from else {
        return Ok(0);
    };
    let mut start = 0;
    for (index, segment) in segments.iter().enumerate().skip(1) {
        match first_seq(&segment.path)? {
            Some(seq) if seq <= from => start = index,
            Some(_) => break,
            None => {}
        }
    }
    Ok(start)
}

fn first_seq(path: &Path) -> io::Result<Option<u64>> {
    let mut line = Vec::new();
    BufReader::new(File::open(path)?).read_until(b'\n', &mut line)?;
    let line = line.strip_suffix(b"\n").unwrap_or(&line);
    Ok(parse_record(line).ok().map(|record| record.seq))
}

impl Walk {
    fn segment(&mut self, segment: &Segment, newest: bool) -> io::Result<()> {
        let mut reader = BufReader::new(File::open(&segment.path)?);
        let mut line = Vec::with_capacity(1024);
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                return Ok(());
            }
            if line.last() != Some(&b'\n') {
                self.incomplete_line(segment, line.len(), newest);
                return Ok(());
            }
            line.pop();
            self.line(&line);
            if self.report.first_bad.is_some() {
                return Ok(());
            }
        }
    }

    /// Reports a line without newline: a torn write by a crash when it ends
    /// the newest segment (the writer removes it on open), damage elsewhere.
    fn incomplete_line(&mut self, segment: &Segment, length: usize, newest: bool) {
        if newest {
            self.report.notes.push(format!(
                "{} ends with {length} bytes of an incomplete record, left by a crash; \
                 the gateway removes them when it opens the log",
                segment.path.display()
            ));
        } else {
            let message = format!(
                "incomplete line at the end of {}, which is not the newest segment",
                segment.path.display()
            );
            self.bad(self.expected_seq(), message);
        }
    }

    fn expected_seq(&self) -> u64 {
        match self.last {
            Some((seq, _)) => seq + 1,
            None => self.from.unwrap_or(1),
        }
    }

    fn bad(&mut self, seq: u64, problem: String) {
        if self.report.first_bad.is_none() {
            self.report.first_bad = Some((seq, problem));
        }
    }

    fn line(&mut self, line: &[u8]) {
        if self.before_from(line) {
            return;
        }
        let record = match parse_record(line) {
            Ok(record) => record,
            Err(error) => {
                self.bad(self.expected_seq(), error.to_string());
                return;
            }
        };
        if !self.check_position(&record) {
            return;
        }
        if let Some(seal) = &record.seal {
            if !self.check_seal(&record, seal.epoch, &seal.mac) {
                return;
            }
        }

        let report = &mut self.report;
        report.records += 1;
        report.first_seq.get_or_insert(record.seq);
        report.last_seq = Some(record.seq);
        self.last = Some((record.seq, record.hash));
    }

    /// Returns whether `line` comes before the `from` record, so it is not
    /// checked. Only a seal's epoch is kept from it, for the key file check.
    fn before_from(&mut self, line: &[u8]) -> bool {
        let Some(from) = self.from else {
            return false;
        };
        if self.last.is_some() {
            return false;
        }
        let Ok(peek) = serde_json::from_slice::<SeqPeek>(line) else {
            return false;
        };
        if peek.seq >= from {
            return false;
        }
        let epoch = peek
            .detail
            .as_ref()
            .and_then(|detail| detail["epoch"].as_u64());
        if let (Some(epoch), "seal") = (epoch, peek.event_type.as_str()) {
            self.last_seal = Some((peek.seq, epoch));
        }
        true
    }

    /// Checks `seq` continuity and the link to the previous record.
    fn check_position(&mut self, record: &ParsedRecord) -> bool {
        let Some((last_seq, last_hash)) = self.last else {
            return self.check_first(record);
        };
        let expected = last_seq + 1;
        if record.seq > expected {
            self.bad(
                expected,
                format!(
                    "missing or out of order: seq {} follows seq {last_seq}",
                    record.seq
                ),
            );
            return false;
        }
        if record.seq < expected {
            self.bad(
                record.seq,
                format!("out of order or duplicated: found after seq {last_seq}"),
            );
            return false;
        }
        if record.prev_hash != last_hash {
            self.bad(
                record.seq,
                format!("prev_hash does not match the hash of record {last_seq}"),
            );
            return false;
        }
        true
    }

    /// Checks the first record read. Record 1 links to the all-zero hash,
    /// and a later one means earlier segments were removed.
    fn check_first(&mut self, record: &ParsedRecord) -> bool {
        if record.seq == 1 {
            if record.prev_hash != GENESIS_HASH {
                self.bad(1, "record 1 must have an all-zero prev_hash".into());
                return false;
            }
            self.expected_epoch = Some(0);
            return true;
        }
        if self.from.is_none() {
            self.report.notes.push(format!(
                "the oldest segment starts at seq {}: records 1-{} were removed \
                 (by retention, or otherwise: compare with the collectors' seal records)",
                record.seq,
                record.seq - 1
            ));
        }
        true
    }

    fn check_seal(&mut self, record: &ParsedRecord, epoch: u64, mac: &str) -> bool {
        if let Some(expected) = self.expected_epoch {
            if epoch != expected {
                self.bad(
                    record.seq,
                    format!("seal has epoch {epoch} where epoch {expected} was expected"),
                );
                return false;
            }
        }
        let key = if epoch >= self.running_key.epoch {
            self.running_key.at_epoch(epoch)
        } else {
            self.verification_key.at_epoch(epoch)
        };
        let Some(key) = key else {
            return false;
        };
        let prev_hex = hex::encode(record.prev_hash);
        if !seal_mac_matches(&key.key, epoch, record.seq, &prev_hex, mac) {
            self.bad(
                record.seq,
                format!("seal MAC does not verify with the key of epoch {epoch}"),
            );
            return false;
        }
        self.running_key = key;
        self.expected_epoch = Some(epoch + 1);
        self.last_seal = Some((record.seq, epoch));
        self.report.seals += 1;
        true
    }

    fn finish_unsealed(&mut self) {
        let Some(last_seq) = self.report.last_seq else {
            return;
        };
        let first_unsealed = match self.last_seal {
            Some((seal_seq, _)) => seal_seq + 1,
            None => self.report.first_seq.unwrap_or(1),
        };
        if first_unsealed <= last_seq {
            self.report.unsealed = Some((first_unsealed, last_seq));
        }
    }

    /// Uses the key file as an anchor. Its key must derive from the
    /// verification key, and its epoch is the number of seals made so far,
    /// so a log that ends before the last of them was cut short.
    fn check_key_file(&mut self, audit_dir: &Path) -> io::Result<()> {
        let next_seq = self.last.map_or(1, |(seq, _)| seq + 1);
        let stored = match load_key(audit_dir) {
            Ok(Some(stored)) => stored,
            Ok(None) => {
                if self.last_seal.is_some() {
                    self.report.notes.push(
                        "no sealing key file: a log cut after its last seal cannot be \
                         detected here; compare with the collectors' seal records"
                            .into(),
                    );
                }
                return Ok(());
            }
            Err(error) => {
                self.report
                    .notes
                    .push(format!("sealing key file not used: {error}"));
                return Ok(());
            }
        };

        let derived = self.verification_key.at_epoch(stored.epoch);
        if derived.is_none_or(|derived| derived.key != stored.key) {
            self.bad(
                next_seq,
                format!(
                    "the sealing key file (epoch {}) does not derive from this verification \
                     key: wrong verification key, or the key file was replaced",
                    stored.epoch
                ),
            );
            return Ok(());
        }
        let sealed_epochs = self.last_seal.map_or(0, |(_, epoch)| epoch + 1);
        if sealed_epochs < stored.epoch {
            let missing = if sealed_epochs + 1 == stored.epoch {
                format!("the seal of epoch {sealed_epochs}")
            } else {
                format!("the seals of epochs {sealed_epochs}-{}", stored.epoch - 1)
            };
            self.bad(
                next_seq,
                format!(
                    "missing: the log ends at seq {}, but the sealing key is at epoch {}, \
                     so {missing} and the records before it were removed",
                    next_seq - 1,
                    stored.epoch,
                ),
            );
        }
        Ok(())
    }
}
