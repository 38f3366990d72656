//! The systemd notification protocol (sd_notify(3)): `READY=1` once the
//! gateway serves, `STOPPING=1` when it drains, and `WATCHDOG=1` keep-alives
//! from a task on the async runtime, so a stuck runtime stops them and
//! systemd restarts the service. Outside systemd every call does nothing.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A datagram socket connected to systemd's `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    address: SocketAddr,
}

impl Notifier {
    /// Returns a notifier for the socket in `NOTIFY_SOCKET`, or `None` when
    /// the variable is unset, as outside systemd.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(None),
            Some(name) => Notifier::new(&name.to_string_lossy()).map(Some),
        }
    }

    /// Returns a notifier for `name`: a path, or an abstract socket name
    /// when it starts with `@`.
    pub fn new(name: &str) -> io::Result<Notifier> {
        let address = match name.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes())?,
            None if name.starts_with('/') => SocketAddr::from_pathname(name)?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("NOTIFY_SOCKET \"{name}\" is neither an absolute path nor an abstract name starting with @"),
                ))
            }
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            address,
        })
    }

    /// Sends one notification, such as `READY=1`. The socket is a local
    /// datagram socket, so the send does not wait for the receiver.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.address)
            .map(|_| ())
    }
}

/// Returns the keep-alive interval systemd requests: half of
/// `WATCHDOG_USEC`, when `WATCHDOG_PID` is unset or names this process.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.parse::<u32>().ok()? != own_pid {
            return None;
        }
    }
    let usec: u64 = usec?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Sends `WATCHDOG=1` every `interval` until `shutdown` is cancelled.
pub async fn keep_alive(notifier: Arc<Notifier>, interval: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Err(error) = notifier.notify("WATCHDOG=1") {
            tracing::warn!(%error, "systemd watchdog keep-alive not sent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_sends_state_to_path_socket() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::new(path.to_str().unwrap()).unwrap();
        notifier.notify("READY=1").unwrap();
        let mut buffer = [0u8; 64];
        let length = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"READY=1");
    }

    #[test]
    fn notify_sends_state_to_abstract_socket() {
        let name = format!("sluice-notify-test-{}", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&address).unwrap();
        let notifier = Notifier::new(&format!("@{name}")).unwrap();
        notifier.notify("WATCHDOG=1").unwrap();
        let mut buffer = [0u8; 64];
        let length = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"WATCHDOG=1");
    }

    #[test]
    fn relative_notify_socket_is_rejected() {
        let error = Notifier::new("notify.sock").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn watchdog_interval_is_half_of_usec() {
        assert_eq!(
            watchdog_interval_from(Some("20000000"), None, 42),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            watchdog_interval_from(Some("20000000"), Some("42"), 42),
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn watchdog_for_another_process_is_ignored() {
        assert_eq!(
            watchdog_interval_from(Some("20000000"), Some("41"), 42),
            None
        );
        assert_eq!(watchdog_interval_from(None, None, 42), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 42), None);
    }
}
