//! The sealing key file `audit.key`: one JSON line `{"epoch":N,"key":"hex"}`,
//! mode 0600. Each store replaces the file through a fsynced temporary file
//! and a rename, so after a crash the file contains either the old or the new
//! key, and after a seal the old key is gone from the file system's view.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::record::{evolve_key, parse_digest, Digest32};

/// The key file's name inside the audit folder.
pub const KEY_FILE_NAME: &str = "audit.key";
const KEY_TEMP_NAME: &str = "audit.key.tmp";

/// A sealing key and the epoch it belongs to.
#[derive(Clone, PartialEq, Eq)]
pub struct EpochKey {
    pub epoch: u64,
    pub key: Digest32,
}

impl std::fmt::Debug for EpochKey {
    // The key stays out of logs and panic messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochKey")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl EpochKey {
    /// Advances to the next epoch's key.
    pub fn evolve(&mut self) {
        self.key = evolve_key(&self.key);
        self.epoch += 1;
    }

    /// Returns the key of `epoch`, evolved forward from this one.
    /// Returns `None` when `epoch` is earlier, because keys only go forward.
    pub fn at_epoch(&self, epoch: u64) -> Option<EpochKey> {
        if epoch < self.epoch {
            return None;
        }
        let mut key = self.clone();
        while key.epoch < epoch {
            key.evolve();
        }
        Some(key)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    epoch: u64,
    key: String,
}

/// Returns the path of the key file in `audit_dir`.
pub fn key_path(audit_dir: &Path) -> PathBuf {
    audit_dir.join(KEY_FILE_NAME)
}

/// Creates the sealing key file with a fresh random epoch-0 key and returns
/// the verification key (the epoch-0 key) in hex. Rejects an existing key file
/// unless `force` is set, because replacing the key makes the existing seals
/// unverifiable with the new verification key.
pub fn init_key(audit_dir: &Path, force: bool) -> io::Result<String> {
    fs::create_dir_all(audit_dir)?;
    let path = key_path(audit_dir);
    if !force && fs::symlink_metadata(&path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "sealing key {} already exists; pass --force to replace it",
                path.display()
            ),
        ));
    }

    let mut key = [0u8; 32];
    File::open("/dev/urandom")?.read_exact(&mut key)?;
    store_key(audit_dir, &EpochKey { epoch: 0, key })?;
    Ok(hex::encode(key))
}

/// Reads the key file. Returns `Ok(None)` when there is none.
pub fn load_key(audit_dir: &Path) -> io::Result<Option<EpochKey>> {
    let path = key_path(audit_dir);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let invalid = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("invalid sealing key file {}: {what}", path.display()),
        )
    };
    let file: KeyFile = serde_json::from_str(text.trim()).map_err(|e| invalid(e.to_string()))?;
    let key = parse_digest(&file.key).ok_or_else(|| invalid("key is not 64 hex digits".into()))?;
    Ok(Some(EpochKey {
        epoch: file.epoch,
        key,
    }))
}

/// Replaces the key file with `key`: writes a temporary file with mode 0600,
/// fsyncs it, renames it over the key file and fsyncs the folder.
pub fn store_key(audit_dir: &Path, key: &EpochKey) -> io::Result<()> {
    let temp = audit_dir.join(KEY_TEMP_NAME);
    match fs::remove_file(&temp) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }

    let contents = serde_json::to_string(&KeyFile {
        epoch: key.epoch,
        key: hex::encode(key.key),
    })
    .map_err(io::Error::other)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    drop(file);

    fs::rename(&temp, key_path(audit_dir))?;
    sync_dir(audit_dir)
}

/// Makes renames and new files in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn init_writes_epoch_zero_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let verification = init_key(dir.path(), false).unwrap();
        let stored = load_key(dir.path()).unwrap().unwrap();
        assert_eq!(stored.epoch, 0);
        assert_eq!(hex::encode(stored.key), verification);
        let mode = fs::metadata(key_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn init_rejects_existing_key_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let first = init_key(dir.path(), false).unwrap();
        let error = init_key(dir.path(), false).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(
            hex::encode(load_key(dir.path()).unwrap().unwrap().key),
            first
        );
        let second = init_key(dir.path(), true).unwrap();
        assert_ne!(first, second);
    }

    #[test]
    fn stored_key_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        init_key(dir.path(), false).unwrap();
        let mut key = load_key(dir.path()).unwrap().unwrap();
        key.evolve();
        store_key(dir.path(), &key).unwrap();
        assert_eq!(load_key(dir.path()).unwrap().unwrap(), key);
        assert!(!dir.path().join(KEY_TEMP_NAME).exists());
    }

    #[test]
    fn at_epoch_goes_only_forward() {
        let start = EpochKey {
            epoch: 2,
            key: [9; 32],
        };
        assert!(start.at_epoch(1).is_none());
        let later = start.at_epoch(4).unwrap();
        assert_eq!(later.epoch, 4);
        assert_eq!(later.key, evolve_key(&evolve_key(&[9; 32])));
    }
}
