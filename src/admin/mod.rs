//! The local control socket behind `sluice ctl` and the vendor quarantine it
//! manages, plus the process-level operations the daemon runs at start:
//! switching to an unprivileged account and systemd notifications.

pub mod ctl;
pub mod privileges;
pub mod protocol;
pub mod server;
pub mod systemd;

pub use crate::policy::quarantine::{Quarantine, QuarantineEntry, QUARANTINE_FILE};
pub use server::{bind, serve, AdminContext, AdminSocket, ReloadRequest};
