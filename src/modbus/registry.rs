//! The table of open sessions: connection limits per listener and per source
//! address, and a handle to close any session from outside. Only accept and
//! close touch its lock; the request path does not.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio_util::sync::CancellationToken;

use crate::identity::certificate::CertificateIdentity;

/// A session as listed by the registry.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: u64,
    pub listener: Arc<str>,
    pub vendor: Arc<str>,
    pub peer: SocketAddr,
    pub started: jiff::Timestamp,
    pub requests: Arc<AtomicU64>,
    pub close: CancellationToken,
    /// The reason recorded in the close event when the session is closed from outside.
    pub close_reason: Arc<OnceLock<&'static str>>,
    /// The client certificate of a session on a MODBUS/TCP Security listener.
    pub certificate: Option<Arc<CertificateIdentity>>,
}

impl SessionInfo {
    /// Closes the session at once; its close event records `reason`.
    pub fn close_because(&self, reason: &'static str) {
        let _ = self.close_reason.set(reason);
        self.close.cancel();
    }
}

/// The reason a connection may not open a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    #[error("listener {listener} already has {limit} connections")]
    ListenerFull { listener: Arc<str>, limit: usize },
    #[error("source {source_ip} already has {limit} connections to listener {listener}")]
    SourceFull {
        listener: Arc<str>,
        source_ip: IpAddr,
        limit: usize,
    },
    #[error("vendor {vendor} already has {limit} sessions")]
    VendorFull { vendor: Arc<str>, limit: usize },
}

/// Limits checked when a session is admitted.
#[derive(Debug, Clone, Copy)]
pub struct AdmitLimits {
    pub per_listener: usize,
    pub per_source: usize,
    pub per_vendor: Option<usize>,
}

#[derive(Default)]
struct Table {
    sessions: HashMap<u64, SessionInfo>,
}

#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    table: Mutex<Table>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves the map consistent, because
        // every update is a single insert or remove.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Allocates a session id; ids start at 1 and are never reused.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers `info` if every limit allows one more session.
    pub fn admit(&self, info: SessionInfo, limits: AdmitLimits) -> Result<(), AdmitError> {
        let mut table = self.lock();
        let mut on_listener = 0;
        let mut from_source = 0;
        let mut of_vendor = 0;
        for other in table.sessions.values() {
            if other.listener == info.listener {
                on_listener += 1;
                if other.peer.ip() == info.peer.ip() {
                    from_source += 1;
                }
            }
            if other.vendor == info.vendor {
                of_vendor += 1;
            }
        }
        if on_listener >= limits.per_listener {
            return Err(AdmitError::ListenerFull {
                listener: info.listener.clone(),
                limit: limits.per_listener,
            });
        }
        if from_source >= limits.per_source {
            return Err(AdmitError::SourceFull {
                listener: info.listener.clone(),
                source_ip: info.peer.ip(),
                limit: limits.per_source,
            });
        }
        if let Some(limit) = limits.per_vendor {
            if of_vendor >= limit {
                return Err(AdmitError::VendorFull {
                    vendor: info.vendor.clone(),
                    limit,
                });
            }
        }
        table.sessions.insert(info.id, info);
        Ok(())
    }

    pub fn remove(&self, id: u64) {
        self.lock().sessions.remove(&id);
    }

    /// Lists open sessions ordered by id.
    pub fn list(&self) -> Vec<SessionInfo> {
        let mut sessions: Vec<SessionInfo> = self.lock().sessions.values().cloned().collect();
        sessions.sort_by_key(|session| session.id);
        sessions
    }

    /// Asks session `id` to close; returns false when no such session is open.
    pub fn close(&self, id: u64) -> bool {
        match self.lock().sessions.get(&id) {
            Some(session) => {
                session.close.cancel();
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(registry: &Registry, listener: &str, vendor: &str, peer: &str) -> SessionInfo {
        SessionInfo {
            id: registry.next_id(),
            listener: Arc::from(listener),
            vendor: Arc::from(vendor),
            peer: peer.parse().unwrap(),
            started: jiff::Timestamp::UNIX_EPOCH,
            requests: Arc::default(),
            close: CancellationToken::new(),
            close_reason: Arc::default(),
            certificate: None,
        }
    }

    const LIMITS: AdmitLimits = AdmitLimits {
        per_listener: 3,
        per_source: 2,
        per_vendor: None,
    };

    #[test]
    fn admit_rejects_third_connection_from_one_source() {
        let registry = Registry::default();
        let first = info(&registry, "scada", "acme", "10.0.0.1:1000");
        let second = info(&registry, "scada", "acme", "10.0.0.1:1001");
        let third = info(&registry, "scada", "acme", "10.0.0.1:1002");
        assert_eq!(registry.admit(first, LIMITS), Ok(()));
        assert_eq!(registry.admit(second, LIMITS), Ok(()));
        assert_eq!(
            registry.admit(third, LIMITS),
            Err(AdmitError::SourceFull {
                listener: Arc::from("scada"),
                source_ip: "10.0.0.1".parse().unwrap(),
                limit: 2
            })
        );
    }

    #[test]
    fn admit_rejects_connection_beyond_listener_limit() {
        let registry = Registry::default();
        for port in 0..3 {
            let peer = format!("10.0.0.{}:1000", port + 1);
            let session = info(&registry, "scada", "acme", &peer);
            assert_eq!(registry.admit(session, LIMITS), Ok(()));
        }
        let fourth = info(&registry, "scada", "acme", "10.0.0.9:1000");
        assert_eq!(
            registry.admit(fourth, LIMITS),
            Err(AdmitError::ListenerFull {
                listener: Arc::from("scada"),
                limit: 3
            })
        );
    }

    #[test]
    fn admit_enforces_vendor_session_limit() {
        let registry = Registry::default();
        let limits = AdmitLimits {
            per_vendor: Some(1),
            ..LIMITS
        };
        let first = info(&registry, "scada", "acme", "10.0.0.1:1000");
        let second = info(&registry, "other", "acme", "10.0.0.2:1000");
        assert_eq!(registry.admit(first, limits), Ok(()));
        assert_eq!(
            registry.admit(second, limits),
            Err(AdmitError::VendorFull {
                vendor: Arc::from("acme"),
                limit: 1
            })
        );
    }

    #[test]
    fn close_cancels_the_session_token() {
        let registry = Registry::default();
        let session = info(&registry, "scada", "acme", "10.0.0.1:1000");
        let token = session.close.clone();
        let id = session.id;
        registry.admit(session, LIMITS).unwrap();
        assert!(registry.close(id));
        assert!(token.is_cancelled());
        registry.remove(id);
        assert!(!registry.close(id));
        assert!(registry.is_empty());
    }
}
