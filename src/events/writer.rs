//! The writer thread: drains the event queue in batches, hands each batch to
//! a `Sink` and makes it durable. It runs on its own OS thread so that file
//! I/O and fsync never stall the async runtime.

use std::io;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Event;

/// Largest number of events handed to the sink in one write.
const MAX_BATCH: usize = 1024;

/// Largest number of events taken from the queue for one sync. With at most
/// one sync per `GROUP_COMMIT_INTERVAL` in batch mode, it caps recording at
/// about 1.6 million events per second (16 × 1,024 every 10 ms).
const MAX_GROUP: usize = 16 * MAX_BATCH;

/// When a written batch is forced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// One fsync per batch: events that arrive while a sync runs share the
    /// next one (group commit).
    Batch,
    /// One fsync per event.
    Always,
}

/// The destination of written events, such as the audit log.
pub trait Sink: Send {
    /// Appends `batch` in order.
    fn write_batch(&mut self, batch: &[Event]) -> io::Result<()>;
    /// Forces what was written to stable storage.
    fn sync(&mut self) -> io::Result<()>;
    /// Does timed work, such as an interval seal, while no events arrive.
    fn tick(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Finishes the sink after the last event, for example with a final seal.
    fn close(&mut self) -> io::Result<()> {
        self.sync()
    }
}

/// Called on the writer thread with every event after it is written, for
/// counting; it must not block.
pub type Observer = Box<dyn FnMut(&Event) + Send>;

/// How often the writer calls `Sink::tick` while the queue is empty.
pub const TICK_INTERVAL: Duration = Duration::from_secs(1);

/// The running writer thread. Joining it waits until every queued event is
/// written, which happens once every `Emitter` clone is dropped.
pub struct WriterHandle {
    thread: JoinHandle<()>,
}

impl WriterHandle {
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("event writer thread panicked");
        }
    }
}

/// Maximum time a written batch waits for its fsync in `SyncMode::Batch`.
pub const GROUP_COMMIT_INTERVAL: Duration = Duration::from_millis(10);

/// Starts the writer thread draining `receiver` into `sink`.
pub fn spawn_writer(
    receiver: mpsc::Receiver<Event>,
    sink: Box<dyn Sink>,
    mode: SyncMode,
    observer: Option<Observer>,
) -> io::Result<WriterHandle> {
    // A current-thread runtime lets the thread wait for events and for the
    // group-commit timer without busy polling.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("sluice-events".into())
        .spawn(move || runtime.block_on(drain(receiver, sink, mode, observer)))?;
    Ok(WriterHandle { thread })
}

/// Writes batches until every sender is gone. In batch mode the thread
/// sleeps out the rest of the group-commit interval after a sync instead of
/// listening, so emitters do not wake it for each event. What arrived
/// meanwhile is then written and synced together.
async fn drain(
    mut receiver: mpsc::Receiver<Event>,
    mut sink: Box<dyn Sink>,
    mode: SyncMode,
    mut observer: Option<Observer>,
) {
    let mut batch = Vec::with_capacity(MAX_GROUP);
    let mut failing = false;
    let mut last_sync: Option<Instant> = None;
    loop {
        if mode == SyncMode::Batch {
            if let Some(synced) = last_sync {
                tokio::time::sleep_until((synced + GROUP_COMMIT_INTERVAL).into()).await;
            }
        }
        let received =
            tokio::time::timeout(TICK_INTERVAL, receiver.recv_many(&mut batch, MAX_GROUP)).await;
        match received {
            Err(_) => {
                let result = sink.tick();
                report_write_result(&result, &mut failing, 0);
                continue;
            }
            Ok(0) => break,
            Ok(_) => {}
        }
        while batch.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok(event) => batch.push(event),
                Err(_) => break,
            }
        }
        let result = write_durably(sink.as_mut(), &batch, mode);
        last_sync = Some(Instant::now());
        report_write_result(&result, &mut failing, batch.len());
        if let Some(observe) = observer.as_mut() {
            batch.iter().for_each(observe);
        }
        batch.clear();
    }
    if let Err(error) = sink.close() {
        tracing::error!(%error, "closing the event log failed");
    }
}

fn write_durably(sink: &mut dyn Sink, batch: &[Event], mode: SyncMode) -> io::Result<()> {
    match mode {
        SyncMode::Batch => {
            for chunk in batch.chunks(MAX_BATCH) {
                sink.write_batch(chunk)?;
            }
            sink.sync()
        }
        SyncMode::Always => {
            for event in batch {
                sink.write_batch(std::slice::from_ref(event))?;
                sink.sync()?;
            }
            Ok(())
        }
    }
}

/// Logs a write failure once per episode of failures, and its end.
fn report_write_result(result: &io::Result<()>, failing: &mut bool, count: usize) {
    match result {
        Err(error) if !*failing => {
            *failing = true;
            tracing::error!(%error, events = count, "event log write failed");
        }
        Err(_) => {}
        Ok(()) if *failing => {
            *failing = false;
            tracing::info!("event log writes recovered");
        }
        Ok(()) => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use std::fs::{File, OpenOptions};
    use std::io::Write;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::events::{Emitter, EventType};

    /// Events as JSON lines appended to one file, a sink for testing the writer.
    pub struct JsonLinesFile {
        path: PathBuf,
        file: File,
        buffer: Vec<u8>,
    }

    impl JsonLinesFile {
        /// Opens `folder/events.jsonl` for appending, creating the folder.
        fn open(folder: &Path) -> io::Result<JsonLinesFile> {
            std::fs::create_dir_all(folder)?;
            let path = folder.join("events.jsonl");
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            Ok(JsonLinesFile {
                path,
                file,
                buffer: Vec::with_capacity(64 * 1024),
            })
        }

        pub fn path(&self) -> &Path {
            &self.path
        }
    }

    impl Sink for JsonLinesFile {
        fn write_batch(&mut self, batch: &[Event]) -> io::Result<()> {
            self.buffer.clear();
            for event in batch {
                serde_json::to_writer(&mut self.buffer, event)?;
                self.buffer.push(b'\n');
            }
            self.file.write_all(&self.buffer)
        }

        fn sync(&mut self) -> io::Result<()> {
            self.file.sync_data()
        }
    }

    #[tokio::test]
    async fn writer_appends_every_event_as_a_line() {
        let folder = tempfile::tempdir().unwrap();
        let (emitter, receiver) = Emitter::new(Arc::from("edge-01"));
        let sink = JsonLinesFile::open(folder.path()).unwrap();
        let path = sink.path().to_path_buf();
        let writer = spawn_writer(receiver, Box::new(sink), SyncMode::Batch, None).unwrap();
        for _ in 0..100 {
            emitter.emit(Event::new(EventType::System)).await.unwrap();
        }
        drop(emitter);
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .unwrap();

        let text = std::fs::read_to_string(path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 100);
        let last: serde_json::Value = serde_json::from_str(lines[99]).unwrap();
        assert_eq!(last["event_type"], "system");
        assert_eq!(last["gateway"], "edge-01");
    }

    /// A call the writer made on the sink.
    #[derive(Debug, PartialEq)]
    enum Call {
        Write(usize),
        Sync,
        Close,
    }

    struct RecordingSink(Arc<std::sync::Mutex<Vec<Call>>>);

    impl Sink for RecordingSink {
        fn write_batch(&mut self, batch: &[Event]) -> io::Result<()> {
            self.0.lock().unwrap().push(Call::Write(batch.len()));
            Ok(())
        }

        fn sync(&mut self) -> io::Result<()> {
            self.0.lock().unwrap().push(Call::Sync);
            Ok(())
        }

        fn close(&mut self) -> io::Result<()> {
            self.0.lock().unwrap().push(Call::Close);
            Ok(())
        }
    }

    #[tokio::test]
    async fn queued_events_share_one_sync() {
        let (emitter, receiver) = Emitter::new(Arc::from("edge-01"));
        for _ in 0..3000 {
            emitter.emit(Event::new(EventType::System)).await.unwrap();
        }
        drop(emitter);
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = RecordingSink(calls.clone());
        let writer = spawn_writer(receiver, Box::new(sink), SyncMode::Batch, None).unwrap();
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .unwrap();

        let expected = vec![
            Call::Write(1024),
            Call::Write(1024),
            Call::Write(952),
            Call::Sync,
            Call::Close,
        ];
        assert_eq!(*calls.lock().unwrap(), expected);
    }
}
