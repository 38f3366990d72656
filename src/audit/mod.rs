//! The tamper-evident audit log: hash-chained JSON-lines segments, sealed
//! with an HMAC under a key that evolves one way after each seal, and the
//! verifier that checks them. `docs/audit.md` defines the record format.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub mod cli;
mod key;
mod log;
mod record;
mod recover;
mod segment;
mod verify;

pub use key::{init_key, KEY_FILE_NAME};
pub use log::{AuditLog, OpenReport, SealObserver};
pub use record::{evolve_key, seal_message};
pub use segment::segment_name;
pub use verify::{verify, VerifyReport};

/// Records between seals, unless the interval passes first.
pub const DEFAULT_SEAL_EVERY: u64 = 1000;
/// Maximum time a record stays unsealed while the writer runs.
pub const DEFAULT_SEAL_INTERVAL: Duration = Duration::from_secs(60);
/// Size at which the writer starts the next segment.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Age after which whole segments are removed.
pub const DEFAULT_RETENTION_DAYS: u32 = 365;

/// Settings of the audit log writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// The audit folder: segments and the sealing key file.
    pub path: PathBuf,
    /// The gateway name written into seal records.
    pub gateway: Arc<str>,
    /// Records between seals.
    pub seal_every: u64,
    /// Maximum time between a record and its seal.
    pub seal_interval: Duration,
    /// Size in bytes at which the next segment starts. A record is never
    /// split, so a segment ends before the record that would pass the size.
    pub segment_bytes: u64,
    /// Days after its last write that a segment is removed; 0 keeps all.
    pub retention_days: u32,
}

impl AuditSettings {
    /// Returns settings with the default sealing, rotation and retention.
    pub fn new(path: PathBuf, gateway: Arc<str>) -> AuditSettings {
        AuditSettings {
            path,
            gateway,
            seal_every: DEFAULT_SEAL_EVERY,
            seal_interval: DEFAULT_SEAL_INTERVAL,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            retention_days: DEFAULT_RETENTION_DAYS,
        }
    }
}

/// The writer's state for the request path. Reading it takes one atomic
/// load, so it can be checked on every request.
#[derive(Debug)]
pub struct AuditHealth {
    writable: AtomicBool,
    records: AtomicU64,
    seals: AtomicU64,
    write_errors: AtomicU64,
}

impl Default for AuditHealth {
    fn default() -> Self {
        AuditHealth::new()
    }
}

impl AuditHealth {
    /// Starts writable with zero counters.
    pub fn new() -> AuditHealth {
        AuditHealth {
            writable: AtomicBool::new(true),
            records: AtomicU64::new(0),
            seals: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
        }
    }

    /// Returns false from a failed write until every held record is written
    /// and synced again. Writes must be denied while it is false.
    pub fn is_writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    /// Event records written to the segment files, seals not included.
    pub fn records_written(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    pub fn seals_written(&self) -> u64 {
        self.seals.load(Ordering::Relaxed)
    }

    /// Failed write or sync attempts, retries included.
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }

    fn set_writable(&self, writable: bool) {
        self.writable.store(writable, Ordering::Release);
    }

    fn add_written(&self, records: u64, seals: u64) {
        self.records.fetch_add(records, Ordering::Relaxed);
        self.seals.fetch_add(seals, Ordering::Relaxed);
    }

    fn add_write_error(&self) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
    }
}
