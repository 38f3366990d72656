//! A collector's on-disk spool: append-only segment files of JSON lines and
//! an acknowledged-offset file. The event writer thread appends; the sender
//! reads the oldest waiting events and acknowledges them once the collector
//! has them. It does no network I/O and does not depend on transports.
//!
//! Offsets are logical byte positions across all segments. A segment file is
//! named by the offset of its first byte, so a restart finds every event that
//! was not acknowledged. Disk use stays below `max_bytes` plus one segment.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::config::OnFull;

/// Name of the file that contains the acknowledged offset, in decimal.
const ACK_FILE: &str = "acknowledged";
const ACK_TEMP_FILE: &str = "acknowledged.tmp";
const SEGMENT_SUFFIX: &str = ".jsonl";
/// Bounds of one segment: small spools get several segments so that
/// acknowledged space comes back, large ones do not get huge files.
const MIN_SEGMENT_BYTES: u64 = 16 * 1024;
const MAX_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Largest batch read at once, in bytes, whatever its event count.
const MAX_BATCH_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct SpoolSettings {
    pub folder: PathBuf,
    /// Bound of the bytes of waiting events.
    pub max_bytes: u64,
    pub on_full: OnFull,
}

/// The outcome of `Spool::append` for an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Spooled,
    /// Spooled after dropping this many of the oldest waiting events.
    SpooledAfterDropping(u64),
    /// Not spooled, because the spool is full and keeps what it has, or
    /// because the event alone is larger than the spool.
    Rejected,
}

impl Appended {
    /// Returns how many events this append lost, its own included.
    pub fn dropped(self) -> u64 {
        match self {
            Appended::Spooled => 0,
            Appended::SpooledAfterDropping(count) => count,
            Appended::Rejected => 1,
        }
    }
}

/// The oldest waiting events, as read for one delivery.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Offset of the first event.
    pub start: u64,
    /// Offset just past the last event.
    pub end: u64,
    /// Each event's JSON text, without the line end.
    pub lines: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    start: u64,
    len: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

struct State {
    folder: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    on_full: OnFull,
    /// Oldest first; never empty once opened.
    segments: VecDeque<Segment>,
    writer: File,
    /// The first byte not yet acknowledged or dropped.
    head: u64,
    /// The length of every waiting event, line end included, oldest first.
    lengths: VecDeque<u32>,
    waiting_bytes: u64,
    /// Appended data not yet synced.
    dirty: bool,
    /// True from the first drop of a full episode until an event fits again.
    full: bool,
    /// `head` as last written to the acknowledged-offset file.
    persisted_head: u64,
}

/// A collector's spool. Shared between the event writer thread (appends)
/// and the sender task (reads and acknowledgements).
pub struct Spool {
    state: Mutex<State>,
    /// Woken on every append, so an idle sender can wait without polling.
    appended: Notify,
    /// Woken when a full episode starts.
    became_full: Notify,
}

impl Spool {
    /// Opens the spool in `settings.folder`, creating it, and finds the events
    /// that were waiting when it was last closed. A torn last line from a
    /// crash is cut off.
    pub fn open(settings: SpoolSettings) -> io::Result<Spool> {
        fs::create_dir_all(&settings.folder)?;
        let segment_bytes = (settings.max_bytes / 8).clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES);
        let acknowledged = read_ack(&settings.folder)?;
        let mut segments = list_segments(&settings.folder)?;
        if segments.is_empty() {
            let start = acknowledged.unwrap_or(0);
            File::create(segment_path(&settings.folder, start))?;
            segments.push_back(Segment { start, len: 0 });
        }
        let head = acknowledged
            .unwrap_or(0)
            .max(segments[0].start)
            .min(segments.back().map_or(0, Segment::end));
        remove_behind(&settings.folder, &mut segments, head)?;

        let mut lengths = VecDeque::new();
        for segment in segments.iter_mut() {
            scan_segment(&settings.folder, segment, head, &mut lengths)?;
        }
        let last = segments
            .back()
            .copied()
            .unwrap_or(Segment { start: 0, len: 0 });
        let writer = OpenOptions::new()
            .append(true)
            .open(segment_path(&settings.folder, last.start))?;
        writer.set_len(last.len)?;
        // A segment that a crash cut short leaves a gap before the next one.
        let head = segments
            .iter()
            .find(|segment| segment.end() > head)
            .map_or(head, |segment| segment.start.max(head));
        let waiting_bytes = lengths.iter().map(|&len| u64::from(len)).sum();

        let state = State {
            folder: settings.folder,
            max_bytes: settings.max_bytes,
            segment_bytes,
            on_full: settings.on_full,
            segments,
            writer,
            head,
            lengths,
            waiting_bytes,
            dirty: false,
            full: false,
            persisted_head: acknowledged.unwrap_or(u64::MAX),
        };
        Ok(Spool {
            state: Mutex::new(state),
            appended: Notify::new(),
            became_full: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held leaves offsets that are still
        // consistent on disk, so the state is used as it is.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends one event's JSON text, which must not contain a line end. Does
    /// not sync; `sync` does.
    pub fn append(&self, line: &[u8]) -> io::Result<Appended> {
        let size = line.len() as u64 + 1;
        let mut state = self.lock();
        let mut dropped = 0;
        if state.waiting_bytes + size > state.max_bytes {
            let fits_alone = size <= state.max_bytes;
            if state.on_full == OnFull::KeepInAudit || !fits_alone {
                self.start_full_episode(&mut state);
                return Ok(Appended::Rejected);
            }
            while state.waiting_bytes + size > state.max_bytes {
                state.pop_front();
                dropped += 1;
            }
            self.start_full_episode(&mut state);
            state.remove_acknowledged()?;
        } else {
            state.full = false;
        }

        state.roll_if_needed()?;
        let mut record = Vec::with_capacity(line.len() + 1);
        record.extend_from_slice(line);
        record.push(b'\n');
        state.writer.write_all(&record)?;
        if let Some(last) = state.segments.back_mut() {
            last.len += size;
        }
        state.lengths.push_back(size as u32);
        state.waiting_bytes += size;
        state.dirty = true;
        drop(state);
        self.appended.notify_one();
        Ok(match dropped {
            0 => Appended::Spooled,
            count => Appended::SpooledAfterDropping(count),
        })
    }

    fn start_full_episode(&self, state: &mut State) {
        if !state.full {
            state.full = true;
            self.became_full.notify_one();
        }
    }

    /// Forces appended events to stable storage. The file handle is cloned
    /// so that the fsync runs without holding the lock appends need.
    pub fn sync(&self) -> io::Result<()> {
        let file = {
            let mut state = self.lock();
            if !state.dirty {
                return Ok(());
            }
            state.dirty = false;
            state.writer.try_clone()?
        };
        file.sync_data()
    }

    /// Reads up to `max_events` of the oldest waiting events. A batch never
    /// spans two segments.
    pub fn read_batch(&self, max_events: usize) -> io::Result<Batch> {
        let state = self.lock();
        let Some(segment) = state.segment_at(state.head) else {
            return Ok(Batch {
                start: state.head,
                end: state.head,
                lines: Vec::new(),
            });
        };
        let mut bytes = 0u64;
        let mut count = 0;
        for &len in state.lengths.iter().take(max_events) {
            let len = u64::from(len);
            let fits_segment = state.head + bytes + len <= segment.end();
            let fits_batch = count == 0 || bytes + len <= MAX_BATCH_BYTES;
            if !fits_segment || !fits_batch {
                break;
            }
            bytes += len;
            count += 1;
        }

        let mut file = File::open(segment_path(&state.folder, segment.start))?;
        file.seek(SeekFrom::Start(state.head - segment.start))?;
        let mut data = vec![0; bytes as usize];
        file.read_exact(&mut data)?;
        let lines = data
            .split(|&byte| byte == b'\n')
            .take(count)
            .map(<[u8]>::to_vec)
            .collect();
        Ok(Batch {
            start: state.head,
            end: state.head + bytes,
            lines,
        })
    }

    /// Marks the events of `batch` as delivered, persists the new offset and
    /// removes segments that hold nothing waiting. Returns how many events
    /// left the spool through this call; events that a full spool already
    /// dropped are not counted again.
    pub fn acknowledge(&self, batch: &Batch) -> io::Result<u64> {
        let mut state = self.lock();
        let mut count = 0;
        while state.head < batch.end && !state.lengths.is_empty() {
            state.pop_front();
            count += 1;
        }
        state.remove_acknowledged()?;
        state.persist_head()?;
        Ok(count)
    }

    /// Writes the offset of the oldest waiting event, so that events a full
    /// spool dropped stay dropped after a restart.
    pub fn persist(&self) -> io::Result<()> {
        self.lock().persist_head()
    }

    /// Returns the number of waiting events.
    pub fn len(&self) -> usize {
        self.lock().lengths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the bytes of waiting events, line ends included.
    pub fn waiting_bytes(&self) -> u64 {
        self.lock().waiting_bytes
    }

    /// Waits until an event was appended since the last call returned.
    pub async fn appended(&self) {
        self.appended.notified().await
    }

    /// Waits until a full episode starts.
    pub async fn became_full(&self) {
        self.became_full.notified().await
    }
}

impl State {
    fn segment_at(&self, offset: u64) -> Option<Segment> {
        self.segments
            .iter()
            .find(|segment| segment.start <= offset && offset < segment.end())
            .copied()
    }

    /// Removes the oldest waiting event from the count and moves `head` past
    /// it, to the next segment when it was the last of its segment.
    fn pop_front(&mut self) {
        let Some(len) = self.lengths.pop_front() else {
            return;
        };
        self.waiting_bytes -= u64::from(len);
        self.head += u64::from(len);
        let next_start = self
            .segments
            .iter()
            .find(|segment| segment.end() > self.head)
            .map(|segment| segment.start);
        if let Some(start) = next_start {
            self.head = self.head.max(start);
        }
    }

    /// Deletes segments before the one holding `head`; the newest segment is
    /// always kept because the writer appends to it.
    fn remove_acknowledged(&mut self) -> io::Result<()> {
        remove_behind(&self.folder, &mut self.segments, self.head)
    }

    fn roll_if_needed(&mut self) -> io::Result<()> {
        let Some(last) = self.segments.back().copied() else {
            return Ok(());
        };
        if last.len < self.segment_bytes {
            return Ok(());
        }
        self.writer.sync_data()?;
        let start = last.end();
        self.writer = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&self.folder, start))?;
        self.segments.push_back(Segment { start, len: 0 });
        sync_folder(&self.folder)
    }

    /// Writes `head` to the acknowledged-offset file through a synced
    /// temporary file and a rename, so a crash leaves the old or the new
    /// offset, never a torn one.
    fn persist_head(&mut self) -> io::Result<()> {
        if self.persisted_head == self.head {
            return Ok(());
        }
        let temporary = self.folder.join(ACK_TEMP_FILE);
        let mut file = File::create(&temporary)?;
        file.write_all(format!("{}\n", self.head).as_bytes())?;
        file.sync_data()?;
        fs::rename(&temporary, self.folder.join(ACK_FILE))?;
        sync_folder(&self.folder)?;
        self.persisted_head = self.head;
        Ok(())
    }
}

fn segment_path(folder: &Path, start: u64) -> PathBuf {
    folder.join(format!("{start:020}{SEGMENT_SUFFIX}"))
}

fn sync_folder(folder: &Path) -> io::Result<()> {
    File::open(folder)?.sync_all()
}

fn read_ack(folder: &Path) -> io::Result<Option<u64>> {
    match fs::read_to_string(folder.join(ACK_FILE)) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "invalid acknowledged offset \"{}\" in {}",
                    text.trim(),
                    folder.join(ACK_FILE).display()
                ),
            )
        }),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// Lists the segment files, oldest first, with their sizes.
fn list_segments(folder: &Path) -> io::Result<VecDeque<Segment>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(folder)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(start) = name
            .to_str()
            .and_then(|name| name.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|digits| digits.parse::<u64>().ok())
        else {
            continue;
        };
        segments.push(Segment {
            start,
            len: entry.metadata()?.len(),
        });
    }
    segments.sort_by_key(|segment| segment.start);
    Ok(segments.into())
}

fn remove_behind(folder: &Path, segments: &mut VecDeque<Segment>, head: u64) -> io::Result<()> {
    while segments.len() > 1 && segments[0].end() <= head {
        let old = segments.pop_front().expect("more than one segment");
        match fs::remove_file(segment_path(folder, old.start)) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
    }
    Ok(())
}

/// Records the length of every complete line of `segment` at or after
/// `head`, and shortens the segment to its last complete line.
fn scan_segment(
    folder: &Path,
    segment: &mut Segment,
    head: u64,
    lengths: &mut VecDeque<u32>,
) -> io::Result<()> {
    let path = segment_path(folder, segment.start);
    let mut reader = BufReader::new(File::open(&path)?);
    let mut position = segment.start;
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line)? as u64;
        if read == 0 || line.last() != Some(&b'\n') {
            break;
        }
        if position >= head {
            lengths.push_back(read as u32);
        }
        position += read;
    }
    if position < segment.end() {
        tracing::warn!(
            segment = %path.display(),
            bytes = segment.end() - position,
            "removed an incomplete last spool record left by a crash"
        );
        OpenOptions::new()
            .write(true)
            .open(&path)?
            .set_len(position - segment.start)?;
        segment.len = position - segment.start;
    }
    Ok(())
}
