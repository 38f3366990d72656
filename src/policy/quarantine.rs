//! The set of quarantined vendors: sessions check it on every request without
//! a lock, `sluice ctl quarantine` and `release` change it, and a JSON file in
//! the audit folder keeps it across reloads and restarts.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

/// Name of the file, in the audit folder, that stores the quarantine.
pub const QUARANTINE_FILE: &str = "quarantine.json";

/// One quarantined vendor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineEntry {
    pub vendor: Arc<str>,
    pub since: jiff::Timestamp,
    /// End of the quarantine on the monotonic clock; `None` lasts until
    /// released.
    pub until: Option<Instant>,
    /// The same end on the wall clock, as stored in the file and shown.
    pub until_wall: Option<jiff::Timestamp>,
}

impl QuarantineEntry {
    fn is_active(&self, now: Instant) -> bool {
        self.until.is_none_or(|until| now < until)
    }
}

/// The file form of the quarantine.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuarantineFile {
    vendors: Vec<StoredEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredEntry {
    vendor: String,
    since: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    until: Option<String>,
}

/// Quarantined vendors. Reads are a lock-free load of a small vector;
/// changes are serialized by a mutex and written to the file before they
/// return.
#[derive(Debug, Default)]
pub struct Quarantine {
    entries: ArcSwap<Vec<QuarantineEntry>>,
    /// File the set is stored in; `None` keeps it in memory only.
    file: Option<PathBuf>,
    update: Mutex<()>,
}

impl Quarantine {
    /// Returns an empty quarantine that is never stored.
    pub fn in_memory() -> Quarantine {
        Quarantine::default()
    }

    /// Loads the quarantine stored in `audit_folder`; a missing file is an
    /// empty quarantine. Entries whose end has passed are dropped.
    pub fn load(audit_folder: &Path) -> io::Result<Quarantine> {
        let path = audit_folder.join(QUARANTINE_FILE);
        let stored = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<QuarantineFile>(&bytes).map_err(|error| {
                invalid_data(format!(
                    "{}: invalid quarantine file: {error}",
                    path.display()
                ))
            })?,
            Err(error) if error.kind() == io::ErrorKind::NotFound => QuarantineFile::default(),
            Err(error) => return Err(error),
        };
        let now = Instant::now();
        let wall = jiff::Timestamp::now();
        let mut entries = Vec::new();
        for entry in stored.vendors {
            let since = parse_timestamp(&path, &entry.since)?;
            let until_wall = entry
                .until
                .as_deref()
                .map(|until| parse_timestamp(&path, until))
                .transpose()?;
            let until = match until_wall {
                None => None,
                Some(end) if end <= wall => continue,
                Some(end) => Some(now + wall_duration(wall, end)),
            };
            entries.push(QuarantineEntry {
                vendor: Arc::from(entry.vendor),
                since,
                until,
                until_wall,
            });
        }
        Ok(Quarantine {
            entries: ArcSwap::from_pointee(entries),
            file: Some(path),
            update: Mutex::new(()),
        })
    }

    /// Returns the file the quarantine is stored in, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Returns true while `vendor` is quarantined. Lock-free, and free of
    /// clock reads while no vendor is quarantined.
    pub fn is_quarantined(&self, vendor: &str) -> bool {
        let entries = self.entries.load();
        if entries.is_empty() {
            return false;
        }
        let now = Instant::now();
        entries
            .iter()
            .any(|entry| &*entry.vendor == vendor && entry.is_active(now))
    }

    /// Lists the quarantined vendors whose quarantine has not ended.
    pub fn list(&self) -> Vec<QuarantineEntry> {
        let now = Instant::now();
        let entries = self.entries.load();
        entries
            .iter()
            .filter(|entry| entry.is_active(now))
            .cloned()
            .collect()
    }

    /// Quarantines `vendor` until `until`, or until released when `None`. A
    /// vendor already quarantined gets the new end. The set in memory
    /// changes even when storing it fails, so the vendor stays blocked.
    pub fn quarantine(&self, vendor: &str, until: Option<Instant>) -> io::Result<()> {
        let now = Instant::now();
        let wall = jiff::Timestamp::now();
        let until_wall = until.map(|until| {
            let ahead = until.saturating_duration_since(now);
            wall.checked_add(ahead).unwrap_or(jiff::Timestamp::MAX)
        });
        self.change(|entries| {
            let since = entries
                .iter()
                .find(|entry| &*entry.vendor == vendor)
                .map_or(wall, |entry| entry.since);
            entries.retain(|entry| &*entry.vendor != vendor);
            entries.push(QuarantineEntry {
                vendor: Arc::from(vendor),
                since,
                until,
                until_wall,
            });
            true
        })
        .map(|_| ())
    }

    /// Ends the quarantine of `vendor`; returns false when it was not
    /// quarantined.
    pub fn release(&self, vendor: &str) -> io::Result<bool> {
        let now = Instant::now();
        self.change(|entries| {
            let active = entries
                .iter()
                .any(|entry| &*entry.vendor == vendor && entry.is_active(now));
            entries.retain(|entry| &*entry.vendor != vendor);
            active
        })
    }

    /// Removes every entry whose end is at or before `now` and returns the
    /// vendors released that way.
    pub fn expire(&self, now: Instant) -> io::Result<Vec<Arc<str>>> {
        if self.entries.load().iter().all(|entry| entry.is_active(now)) {
            return Ok(Vec::new());
        }
        let mut expired = Vec::new();
        self.change(|entries| {
            entries.retain(|entry| {
                let active = entry.is_active(now);
                if !active {
                    expired.push(entry.vendor.clone());
                }
                active
            });
            !expired.is_empty()
        })?;
        Ok(expired)
    }

    /// Applies `edit` to a copy of the set, publishes it, and stores it when
    /// `edit` returns true. Returns what `edit` returned.
    fn change(&self, edit: impl FnOnce(&mut Vec<QuarantineEntry>) -> bool) -> io::Result<bool> {
        let _guard = self.lock();
        let mut entries = Vec::clone(&self.entries.load());
        let changed = edit(&mut entries);
        if !changed {
            return Ok(false);
        }
        entries.sort_by(|a, b| a.vendor.cmp(&b.vendor));
        self.entries.store(Arc::new(entries));
        if let Some(path) = &self.file {
            store(path, &self.entries.load())?;
        }
        Ok(true)
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // The guarded data is the unit value, so a poisoned lock is harmless.
        self.update
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Writes the set to a temporary file, syncs it and renames it over `path`,
/// so a crash leaves either the old or the new set.
fn store(path: &Path, entries: &[QuarantineEntry]) -> io::Result<()> {
    let file = QuarantineFile {
        vendors: entries
            .iter()
            .map(|entry| StoredEntry {
                vendor: entry.vendor.to_string(),
                since: entry.since.to_string(),
                until: entry.until_wall.map(|until| until.to_string()),
            })
            .collect(),
    };
    let mut json = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
    json.push(b'\n');
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let temporary = path.with_extension("json.tmp");
    let mut out = std::fs::File::create(&temporary)?;
    out.write_all(&json)?;
    out.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

fn parse_timestamp(path: &Path, text: &str) -> io::Result<jiff::Timestamp> {
    text.parse().map_err(|error| {
        invalid_data(format!(
            "{}: invalid time \"{text}\" in quarantine file: {error}",
            path.display()
        ))
    })
}

/// Returns the time from `now` to the later wall-clock time `end`.
fn wall_duration(now: jiff::Timestamp, end: jiff::Timestamp) -> Duration {
    let nanos = end.as_nanosecond() - now.as_nanosecond();
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

fn invalid_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_quarantine_blocks_nobody() {
        let quarantine = Quarantine::in_memory();
        assert!(!quarantine.is_quarantined("acme"));
        assert_eq!(quarantine.list(), Vec::new());
    }

    #[test]
    fn quarantine_blocks_only_that_vendor_until_released() {
        let quarantine = Quarantine::in_memory();
        quarantine.quarantine("acme", None).unwrap();
        assert!(quarantine.is_quarantined("acme"));
        assert!(!quarantine.is_quarantined("historian"));
        assert!(quarantine.release("acme").unwrap());
        assert!(!quarantine.is_quarantined("acme"));
        assert!(!quarantine.release("acme").unwrap());
    }

    #[test]
    fn quarantine_with_end_expires() {
        let quarantine = Quarantine::in_memory();
        let start = Instant::now();
        let end = start + Duration::from_secs(60);
        quarantine.quarantine("acme", Some(end)).unwrap();
        assert!(quarantine.is_quarantined("acme"));
        assert_eq!(quarantine.expire(start).unwrap(), Vec::<Arc<str>>::new());
        assert_eq!(
            quarantine.expire(end).unwrap(),
            vec![Arc::<str>::from("acme")]
        );
        assert!(!quarantine.is_quarantined("acme"));
    }

    #[test]
    fn quarantine_survives_reload_from_file() {
        let folder = tempfile::tempdir().unwrap();
        let quarantine = Quarantine::load(folder.path()).unwrap();
        quarantine.quarantine("acme", None).unwrap();
        quarantine
            .quarantine(
                "historian",
                Some(Instant::now() + Duration::from_secs(3600)),
            )
            .unwrap();

        let loaded = Quarantine::load(folder.path()).unwrap();
        assert!(loaded.is_quarantined("acme"));
        assert!(loaded.is_quarantined("historian"));
        let names: Vec<String> = loaded.list().iter().map(|e| e.vendor.to_string()).collect();
        assert_eq!(names, vec!["acme", "historian"]);
        assert_eq!(loaded.list()[0].until_wall, None);
        assert_eq!(loaded.list()[1].until_wall, quarantine.list()[1].until_wall);
        assert_eq!(loaded.list()[0].since, quarantine.list()[0].since);
    }

    #[test]
    fn release_is_stored() {
        let folder = tempfile::tempdir().unwrap();
        let quarantine = Quarantine::load(folder.path()).unwrap();
        quarantine.quarantine("acme", None).unwrap();
        quarantine.release("acme").unwrap();
        let text = std::fs::read_to_string(folder.path().join(QUARANTINE_FILE)).unwrap();
        assert_eq!(text, "{\n  \"vendors\": []\n}\n");
        assert!(!Quarantine::load(folder.path())
            .unwrap()
            .is_quarantined("acme"));
    }

    #[test]
    fn ended_entries_are_dropped_on_load() {
        let folder = tempfile::tempdir().unwrap();
        std::fs::write(
            folder.path().join(QUARANTINE_FILE),
            r#"{"vendors":[{"vendor":"acme","since":"2020-01-01T00:00:00Z","until":"2020-01-02T00:00:00Z"}]}"#,
        )
        .unwrap();
        let loaded = Quarantine::load(folder.path()).unwrap();
        assert!(!loaded.is_quarantined("acme"));
    }

    #[test]
    fn invalid_file_is_an_error() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join(QUARANTINE_FILE);
        std::fs::write(&path, "{\"vendors\": 3}").unwrap();
        let error = Quarantine::load(folder.path()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(
            error
                .to_string()
                .starts_with(&format!("{}: invalid quarantine file: ", path.display())),
            "{error}"
        );
    }
}
