//! The audit log writer: chains every event into the newest segment, seals
//! the chain with the evolving key, rotates and expires segments, and keeps
//! records in memory while the disk rejects writes so that none is lost.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::key::{load_key, store_key, sync_dir, EpochKey};
use super::record::{append_record, seal_mac, Digest32};
use super::recover::{recover_tail, TailState};
use super::segment::{list_segments, remove_expired, segment_name};
use super::{AuditHealth, AuditSettings};
use crate::events::{Event, EventType, Sink};

/// Unwritten bytes held in memory before the writer stops taking new events
/// and retries the disk instead, which backs up the event queue so emitters
/// wait rather than records being dropped.
const MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;

/// Delay between write attempts while the backlog is full.
const BACKLOG_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// The findings and repairs of `AuditLog::open`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// The `seq` the next record gets.
    pub next_seq: u64,
    /// Whether a sealing key was found. Without one the log is chained but
    /// unsealed, which the daemon reports as a warning.
    pub sealed: bool,
    /// The epoch of the next seal, when sealed.
    pub epoch: Option<u64>,
    /// Bytes of an incomplete last line removed from `torn_segment`.
    pub torn_bytes: u64,
    pub torn_segment: Option<PathBuf>,
    /// Segments removed by retention.
    pub removed_segments: Vec<PathBuf>,
    /// Findings the operator should see, such as seals missing from the log.
    pub warnings: Vec<String>,
}

/// A callback that receives each seal record as it is made.
pub type SealObserver = Box<dyn FnMut(&Event) + Send>;

/// One unwritten line in the pending buffer.
struct PendingLine {
    /// Offset in `pending` just past this line's newline.
    end: usize,
    seal: bool,
}

/// The hash-chained, sealed audit log. It is the event writer's `Sink`.
pub struct AuditLog {
    settings: AuditSettings,
    health: Arc<AuditHealth>,

    segment: File,
    segment_number: u64,
    /// Bytes of the segment that hold complete records.
    segment_len: u64,
    /// Set when a failed write may have left bytes past `segment_len`.
    segment_dirty: bool,
    /// Set when bytes were written since the last successful fsync.
    needs_sync: bool,

    next_seq: u64,
    last_hash: Digest32,

    /// The key of the next seal. It evolves as soon as a seal is made; the
    /// key file follows once that seal is on disk.
    key: Option<EpochKey>,
    stored_epoch: u64,
    records_since_seal: u64,
    last_seal: Instant,

    /// Chained lines not yet written: `pending[written..]`.
    pending: Vec<u8>,
    pending_lines: std::collections::VecDeque<PendingLine>,
    written: usize,

    /// Whether the current episode of write failures was already logged.
    failing: bool,
    seal_observer: Option<SealObserver>,
}

impl AuditLog {
    /// Opens the log in `settings.path`: recovers the chain state from the
    /// newest segment (removing a torn last line), loads the sealing key,
    /// applies retention and opens the newest segment for appending.
    pub fn open(
        settings: AuditSettings,
        health: Arc<AuditHealth>,
    ) -> io::Result<(AuditLog, OpenReport)> {
        std::fs::create_dir_all(&settings.path)?;
        let dir = settings.path.clone();
        let mut key = load_key(&dir)?;
        let tail = recover_tail(&dir, key.is_some())?;
        let mut warnings = Vec::new();
        let mut stored_epoch = key.as_ref().map_or(0, |key| key.epoch);
        if let Some(key) = key.as_mut() {
            if reconcile_key(&dir, key, &tail, &mut warnings)? {
                stored_epoch = key.epoch;
            }
        }

        let (segment_number, segment) = open_newest_segment(&dir, tail.newest_segment)?;
        let segment_len = segment.metadata()?.len();
        let removed_segments = remove_expired(
            &dir,
            settings.retention_days,
            tail.last_record_segment.unwrap_or(segment_number),
            SystemTime::now(),
        )?;

        let report = OpenReport {
            next_seq: tail.last_seq + 1,
            sealed: key.is_some(),
            epoch: key.as_ref().map(|key| key.epoch),
            torn_bytes: tail.torn_bytes,
            torn_segment: tail.torn_segment.clone(),
            removed_segments,
            warnings,
        };
        let log = AuditLog {
            settings,
            health,
            segment,
            segment_number,
            segment_len,
            segment_dirty: false,
            needs_sync: false,
            next_seq: tail.last_seq + 1,
            last_hash: tail.last_hash,
            key,
            stored_epoch,
            records_since_seal: tail.records_since_seal,
            last_seal: Instant::now(),
            pending: Vec::with_capacity(256 * 1024),
            pending_lines: Default::default(),
            written: 0,
            failing: false,
            seal_observer: None,
        };
        Ok((log, report))
    }

    /// Calls `observer` with every seal record made, so that seals can also
    /// go to collectors as an off-box copy that proves a truncated tail.
    pub fn set_seal_observer(&mut self, observer: SealObserver) {
        self.seal_observer = Some(observer);
    }

    /// Returns the `seq` the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Returns the folder the log is written to.
    pub fn path(&self) -> &Path {
        &self.settings.path
    }

    /// Seals when the seal interval has passed since the last seal and
    /// records are unsealed, and retries writes held back by a failure. The
    /// writer calls it while idle so that a quiet log is still sealed.
    pub fn tick(&mut self) -> io::Result<()> {
        if self.seal_interval_due() {
            self.append_seal()?;
        }
        if self.has_unsynced_state() {
            return self.sync();
        }
        Ok(())
    }

    /// Seals every unsealed record now and makes it durable, for shutdown.
    pub fn seal_now(&mut self) -> io::Result<()> {
        if self.key.is_some() && self.records_since_seal > 0 {
            self.append_seal()?;
        }
        self.sync()
    }

    fn seal_interval_due(&self) -> bool {
        self.key.is_some()
            && self.records_since_seal > 0
            && self.last_seal.elapsed() >= self.settings.seal_interval
    }

    fn has_unsynced_state(&self) -> bool {
        self.written < self.pending.len()
            || self.needs_sync
            || self.segment_dirty
            || self
                .key
                .as_ref()
                .is_some_and(|key| key.epoch != self.stored_epoch)
    }

    /// Chains `event` as the next record into the pending buffer.
    fn append_event(&mut self, event: &Event, seal: bool) -> io::Result<()> {
        let hash = append_record(
            &mut self.pending,
            |out| event.write_json(out),
            self.next_seq,
            &self.last_hash,
        )
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
        self.pending_lines.push_back(PendingLine {
            end: self.pending.len(),
            seal,
        });
        self.next_seq += 1;
        self.last_hash = hash;
        Ok(())
    }

    /// Appends a seal record over the chain so far with the current epoch's
    /// key, then evolves the key in memory. The key file is replaced in
    /// `sync`, after the seal is on disk, so a crash cannot leave a stored
    /// key that is ahead of the seals in the log.
    fn append_seal(&mut self) -> io::Result<()> {
        let Some(key) = self.key.as_mut() else {
            return Ok(());
        };
        let seq = self.next_seq;
        let mac = seal_mac(&key.key, key.epoch, seq, &self.last_hash);
        let mut event = Event::new(EventType::Seal);
        event.id = format!("seal-{seq}");
        event.timestamp = jiff::Timestamp::now();
        event.gateway = self.settings.gateway.clone();
        event.action = Some("seal");
        event.detail = Some(serde_json::json!({
            "epoch": key.epoch,
            "mac": hex::encode(mac),
        }));
        key.evolve();

        self.append_event(&event, true)?;
        self.records_since_seal = 0;
        self.last_seal = Instant::now();
        if let Some(observer) = self.seal_observer.as_mut() {
            observer(&event);
        }
        Ok(())
    }

    /// Writes the pending lines to the segment, rotating when the next line
    /// would pass `segment_bytes`. A line is never split across segments.
    fn flush_pending(&mut self) -> io::Result<()> {
        if self.segment_dirty {
            // Drops the partial bytes of a failed write so the retry appends
            // right after the last complete record.
            self.segment.set_len(self.segment_len)?;
            self.segment_dirty = false;
        }
        while !self.pending_lines.is_empty() {
            let count = self.lines_fitting_segment();
            if count == 0 {
                self.rotate()?;
                continue;
            }
            self.write_lines(count)?;
        }
        self.pending.clear();
        self.written = 0;
        Ok(())
    }

    /// Returns how many pending lines fit in the current segment; at least
    /// one when the segment is empty, so an oversized line still goes out.
    fn lines_fitting_segment(&self) -> usize {
        let room = self.settings.segment_bytes.saturating_sub(self.segment_len);
        let fitting = self
            .pending_lines
            .iter()
            .take_while(|line| (line.end - self.written) as u64 <= room)
            .count();
        if fitting == 0 && self.segment_len == 0 {
            1
        } else {
            fitting
        }
    }

    fn write_lines(&mut self, count: usize) -> io::Result<()> {
        let end = self.pending_lines[count - 1].end;
        if let Err(error) = self.segment.write_all(&self.pending[self.written..end]) {
            // Removes a partial line at once; if that fails too, the retry
            // removes it before writing.
            self.segment_dirty = self.segment.set_len(self.segment_len).is_err();
            return Err(error);
        }
        self.needs_sync = true;
        self.segment_len += (end - self.written) as u64;
        self.written = end;

        let mut seals = 0;
        for line in self.pending_lines.drain(..count) {
            seals += u64::from(line.seal);
        }
        self.health.add_written(count as u64 - seals, seals);
        Ok(())
    }

    /// Closes the current segment durably and starts the next one.
    fn rotate(&mut self) -> io::Result<()> {
        self.segment.sync_data()?;
        self.needs_sync = false;
        let number = self.segment_number + 1;
        let path = self.settings.path.join(segment_name(number));
        let segment = OpenOptions::new().create(true).append(true).open(&path)?;
        sync_dir(&self.settings.path)?;
        self.segment = segment;
        self.segment_number = number;
        self.segment_len = 0;
        self.segment_dirty = false;

        match remove_expired(
            &self.settings.path,
            self.settings.retention_days,
            number,
            SystemTime::now(),
        ) {
            Ok(removed) => {
                for path in removed {
                    tracing::info!(segment = %path.display(), "removed audit segment past retention");
                }
            }
            Err(error) => tracing::warn!(%error, "audit retention failed"),
        }
        Ok(())
    }

    /// Writes, fsyncs and stores an evolved key: everything needed for
    /// the records accepted so far to survive a crash.
    fn make_durable(&mut self) -> io::Result<()> {
        self.flush_pending()?;
        if self.needs_sync {
            self.segment.sync_data()?;
            self.needs_sync = false;
        }
        if let Some(key) = &self.key {
            if key.epoch != self.stored_epoch {
                store_key(&self.settings.path, key)?;
                self.stored_epoch = key.epoch;
            }
        }
        Ok(())
    }

    /// Records the outcome of a write attempt in the health state and the
    /// log, once per episode of failures.
    fn note_result(&mut self, result: &io::Result<()>) {
        match result {
            Ok(()) => {
                if self.written == self.pending.len() && !self.needs_sync {
                    self.health.set_writable(true);
                    if self.failing {
                        self.failing = false;
                        tracing::info!(next_seq = self.next_seq, "audit log writes recovered");
                    }
                }
            }
            Err(error) => {
                self.health.add_write_error();
                self.health.set_writable(false);
                if !self.failing {
                    self.failing = true;
                    tracing::error!(
                        %error,
                        held_bytes = self.pending.len() - self.written,
                        "audit log write failed; holding records in memory and retrying"
                    );
                }
            }
        }
    }

    /// Retries the disk until the backlog is below its bound. Blocking here
    /// is the back-pressure: the event queue fills and emitters wait.
    fn drain_full_backlog(&mut self) {
        while self.pending.len() - self.written > MAX_PENDING_BYTES {
            let result = self.flush_pending();
            self.note_result(&result);
            if result.is_err() {
                std::thread::sleep(BACKLOG_RETRY_DELAY);
            }
        }
    }
}

impl Sink for AuditLog {
    fn write_batch(&mut self, batch: &[Event]) -> io::Result<()> {
        self.drain_full_backlog();
        for event in batch {
            if let Err(error) = self.append_event(event, false) {
                // Cannot happen for `Event`, whose fields always serialize.
                tracing::error!(%error, id = %event.id, "audit record not serializable");
                continue;
            }
            self.records_since_seal += 1;
            if self.key.is_some() && self.records_since_seal >= self.settings.seal_every {
                self.append_seal()?;
            }
        }
        if self.seal_interval_due() {
            self.append_seal()?;
        }

        let result = self.flush_pending();
        if result.is_err() {
            self.note_result(&result);
        }
        result
    }

    fn tick(&mut self) -> io::Result<()> {
        AuditLog::tick(self)
    }

    fn close(&mut self) -> io::Result<()> {
        self.seal_now()
    }

    fn sync(&mut self) -> io::Result<()> {
        let result = self.make_durable();
        self.note_result(&result);
        result
    }
}

/// Brings the key in line with the seals found in the log. When the last
/// seal was made with the stored key, the process stopped between writing
/// the seal and replacing the key file, so the key evolves now. Returns
/// whether the key file was replaced.
fn reconcile_key(
    dir: &Path,
    key: &mut EpochKey,
    tail: &TailState,
    warnings: &mut Vec<String>,
) -> io::Result<bool> {
    let Some(last_seal) = &tail.last_seal else {
        if key.epoch > 0 {
            warnings.push(format!(
                "the sealing key is at epoch {} but the log holds no seal; \
                 sealed records were removed",
                key.epoch
            ));
        }
        return Ok(false);
    };

    if last_seal.epoch == key.epoch {
        let expected = seal_mac(&key.key, key.epoch, last_seal.seq, &last_seal.prev_hash);
        if hex::encode(expected) == last_seal.mac {
            key.evolve();
            store_key(dir, key)?;
            return Ok(true);
        }
    }
    if last_seal.epoch >= key.epoch {
        warnings.push(format!(
            "the last seal (record {}, epoch {}) was not made with the sealing key \
             at epoch {}; seals from here on do not continue the earlier ones",
            last_seal.seq, last_seal.epoch, key.epoch
        ));
    } else if last_seal.epoch + 1 < key.epoch {
        warnings.push(format!(
            "the sealing key is at epoch {} but the last seal in the log has epoch {}; \
             sealed records after record {} were removed",
            key.epoch, last_seal.epoch, last_seal.seq
        ));
    }
    Ok(false)
}

/// Opens the newest segment for appending, creating segment 1 in an empty
/// folder.
fn open_newest_segment(dir: &Path, newest: Option<u64>) -> io::Result<(u64, File)> {
    let number = match newest {
        Some(number) => number,
        None => list_segments(dir)?
            .last()
            .map_or(1, |segment| segment.number),
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(segment_name(number)))?;
    if newest.is_none() {
        sync_dir(dir)?;
    }
    Ok((number, file))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::audit::init_key;
    use crate::audit::record::parse_record;

    fn is_valid_line(line: &[u8]) -> bool {
        parse_record(line).is_ok()
    }

    fn settings(dir: &Path) -> AuditSettings {
        let mut settings = AuditSettings::new(dir.to_path_buf(), Arc::from("edge-01"));
        settings.seal_every = 3;
        settings.seal_interval = Duration::from_secs(3600);
        settings
    }

    fn event(n: u64) -> Event {
        let mut event = Event::new(EventType::System);
        event.id = format!("e-{n}");
        event
    }

    fn lines(dir: &Path) -> Vec<String> {
        let mut all = Vec::new();
        for segment in list_segments(dir).unwrap() {
            let text = std::fs::read_to_string(segment.path).unwrap();
            all.extend(text.lines().map(str::to_owned));
        }
        all
    }

    #[test]
    fn seal_follows_every_seal_every_records() {
        let dir = tempfile::tempdir().unwrap();
        init_key(dir.path(), false).unwrap();
        let health = Arc::new(AuditHealth::new());
        let (mut log, report) = AuditLog::open(settings(dir.path()), health.clone()).unwrap();
        assert!(report.sealed);
        assert_eq!(report.next_seq, 1);
        let batch: Vec<Event> = (0..7).map(event).collect();
        log.write_batch(&batch).unwrap();
        log.sync().unwrap();

        let lines = lines(dir.path());
        assert_eq!(lines.len(), 9);
        assert!(lines.iter().all(|line| is_valid_line(line.as_bytes())));
        assert!(lines[3].contains(r#""event_type":"seal""#));
        assert!(lines[7].contains(r#""event_type":"seal""#));
        assert_eq!(health.records_written(), 7);
        assert_eq!(health.seals_written(), 2);
        assert_eq!(load_key(dir.path()).unwrap().unwrap().epoch, 2);
    }

    #[test]
    fn key_file_evolves_only_after_sync() {
        let dir = tempfile::tempdir().unwrap();
        init_key(dir.path(), false).unwrap();
        let (mut log, _) =
            AuditLog::open(settings(dir.path()), Arc::new(AuditHealth::new())).unwrap();
        log.write_batch(&[event(1), event(2), event(3)]).unwrap();
        assert_eq!(load_key(dir.path()).unwrap().unwrap().epoch, 0);
        log.sync().unwrap();
        assert_eq!(load_key(dir.path()).unwrap().unwrap().epoch, 1);
    }

    #[test]
    fn reopen_after_unstored_key_evolves_it() {
        let dir = tempfile::tempdir().unwrap();
        init_key(dir.path(), false).unwrap();
        {
            let (mut log, _) =
                AuditLog::open(settings(dir.path()), Arc::new(AuditHealth::new())).unwrap();
            log.write_batch(&[event(1), event(2), event(3)]).unwrap();
            // Dropped without sync: the seal is in the file, the key is not
            // evolved on disk, as after a crash between the two steps.
        }
        let (_, report) =
            AuditLog::open(settings(dir.path()), Arc::new(AuditHealth::new())).unwrap();
        assert_eq!(report.epoch, Some(1));
        assert_eq!(report.warnings, Vec::<String>::new());
        assert_eq!(load_key(dir.path()).unwrap().unwrap().epoch, 1);
    }

    #[test]
    fn unsealed_log_reports_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, report) =
            AuditLog::open(settings(dir.path()), Arc::new(AuditHealth::new())).unwrap();
        assert!(!report.sealed);
        assert_eq!(report.epoch, None);
        log.write_batch(&[event(1), event(2), event(3), event(4)])
            .unwrap();
        log.seal_now().unwrap();
        assert_eq!(lines(dir.path()).len(), 4);
    }

    #[test]
    fn seal_observer_sees_each_seal() {
        let dir = tempfile::tempdir().unwrap();
        init_key(dir.path(), false).unwrap();
        let (mut log, _) =
            AuditLog::open(settings(dir.path()), Arc::new(AuditHealth::new())).unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = seen.clone();
        log.set_seal_observer(Box::new(move |event| {
            sink.lock().unwrap().push(event.id.clone());
        }));
        log.write_batch(&[event(1), event(2), event(3), event(4)])
            .unwrap();
        log.seal_now().unwrap();
        assert_eq!(*seen.lock().unwrap(), vec!["seal-4", "seal-6"]);
    }
}
