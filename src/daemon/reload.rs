//! Reload on SIGHUP: compile the files again, swap the generation when they
//! are valid, keep the running one when they are not, and record either
//! outcome with the files that changed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::events::{Event, EventType};
use crate::modbus::generation::Shared;
use crate::policy::Policy;

use super::build_generation;

/// Contents of every file the running policy was compiled from.
type FileContents = BTreeMap<PathBuf, Vec<u8>>;

pub struct Reloader {
    path: PathBuf,
    files: FileContents,
}

fn read_files(paths: &[PathBuf]) -> FileContents {
    paths
        .iter()
        .map(|path| (path.clone(), std::fs::read(path).unwrap_or_default()))
        .collect()
}

/// Lists files added, removed or changed between two readings.
fn changed_files(before: &FileContents, after: &FileContents) -> Vec<String> {
    let mut changed: Vec<String> = Vec::new();
    for (path, contents) in after {
        if before.get(path) != Some(contents) {
            changed.push(path.display().to_string());
        }
    }
    for path in before.keys() {
        if !after.contains_key(path) {
            changed.push(path.display().to_string());
        }
    }
    changed.sort();
    changed
}

impl Reloader {
    /// Creates the reloader for the policy just loaded from `path`. It
    /// must run before the gateway reports ready, so that a file changed
    /// after that counts as changed at the next reload.
    pub fn new(path: PathBuf, policy: &Policy) -> Reloader {
        let files = read_files(policy.files());
        Reloader { path, files }
    }

    /// Reloads; returns true when a new generation is in place.
    pub async fn reload(&mut self, shared: &Arc<Shared>) -> bool {
        tracing::info!(config = %self.path.display(), "reloading configuration");
        match Policy::load(&self.path) {
            Ok((policy, warnings)) => {
                for warning in &warnings {
                    tracing::warn!("{warning}");
                }
                let files = read_files(policy.files());
                let changed = changed_files(&self.files, &files);
                let previous = shared.current.load_full();
                warn_about_restart_only_changes(&previous.policy, &policy);
                let generation =
                    build_generation(policy, Some(&previous), &shared.emitter, &shared.metrics);
                shared.metrics.count_reload(true);
                shared.current.store(Arc::new(generation));
                crate::opcua::reload_trust(shared);
                self.files = files;
                let closed = close_orphaned_sessions(shared);
                tracing::info!(
                    changed = changed.len(),
                    closed_sessions = closed.len(),
                    "configuration reloaded"
                );
                let mut event = Event::new(EventType::Config);
                event.action = Some("reload");
                event.detail = Some(serde_json::json!({
                    "changed_files": changed,
                    "closed_sessions": closed,
                }));
                emit(shared, event).await;
                true
            }
            Err(diagnostics) => {
                shared.metrics.count_reload(false);
                for error in &diagnostics.errors {
                    tracing::error!("{error}");
                }
                let mut event = Event::new(EventType::Config);
                event.action = Some("reload_failed");
                let count = diagnostics.errors.len();
                let noun = if count == 1 { "error" } else { "errors" };
                event.reason = Some(format!("{count} {noun}; running configuration kept"));
                let errors: Vec<String> =
                    diagnostics.errors.iter().map(ToString::to_string).collect();
                event.detail = Some(serde_json::json!({ "errors": errors }));
                emit(shared, event).await;
                false
            }
        }
    }
}

/// Closes every session whose listener is gone, or whose source address or
/// client certificate maps to another vendor under the new policy. Returns
/// the ids of the closed sessions.
fn close_orphaned_sessions(shared: &Shared) -> Vec<u64> {
    let generation = shared.current.load();
    let policy = &generation.policy;
    let mut closed = Vec::new();
    for session in shared.sessions.list() {
        let listener_exists = policy
            .listeners()
            .iter()
            .any(|plan| plan.name == session.listener);
        let same_vendor = policy
            .identify_session(session.peer.ip(), session.certificate.as_deref())
            .is_some_and(|vendor| policy.vendor_name(vendor) == &session.vendor);
        if !listener_exists || !same_vendor {
            tracing::info!(session = session.id, vendor = %session.vendor, "closing session after reload");
            session.close_because(if listener_exists {
                "vendor no longer matches after reload"
            } else {
                "listener removed by reload"
            });
            closed.push(session.id);
        }
    }
    closed
}

/// Listener sockets are bound once at start, so added, removed or rebound
/// listeners take effect only after a restart.
fn warn_about_restart_only_changes(old: &Policy, new: &Policy) {
    let old_binds: Vec<_> = old
        .listeners()
        .iter()
        .map(|l| (l.name.clone(), l.bind))
        .collect();
    let new_binds: Vec<_> = new
        .listeners()
        .iter()
        .map(|l| (l.name.clone(), l.bind))
        .collect();
    if old_binds != new_binds {
        // TODO: bind new listeners and close removed ones on reload instead of waiting for a restart.
        tracing::warn!(
            "listener names or bind addresses changed; they take effect after a restart"
        );
    }
}

async fn emit(shared: &Shared, event: Event) {
    if let Err(error) = shared.emitter.emit(event).await {
        tracing::error!(%error, "event not recorded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_files_lists_added_removed_and_edited() {
        let before: FileContents = [
            (PathBuf::from("gateway.toml"), b"a".to_vec()),
            (PathBuf::from("rules/acme.toml"), b"b".to_vec()),
            (PathBuf::from("rules/old.toml"), b"c".to_vec()),
        ]
        .into_iter()
        .collect();
        let after: FileContents = [
            (PathBuf::from("gateway.toml"), b"a".to_vec()),
            (PathBuf::from("rules/acme.toml"), b"B".to_vec()),
            (PathBuf::from("rules/new.toml"), b"d".to_vec()),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            changed_files(&before, &after),
            vec!["rules/acme.toml", "rules/new.toml", "rules/old.toml"]
        );
    }
}
