//! Tamper-evident audit log.
