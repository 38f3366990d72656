//! The client session sluice keeps to one OPC UA device, with the service
//! identity from the configuration. It reconnects with capped exponential
//! backoff and keeps the device's namespace array current, so that the
//! server can translate namespace indexes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use opcua::client::{ClientBuilder, IdentityToken, Password, Session, SessionPollResult};
use opcua::types::{EndpointDescription, MessageSecurityMode, NamespaceMap};
use tokio_util::sync::CancellationToken;

use crate::config::{OpcuaDeviceConfig, UaSecurityMode, UaSecurityPolicy};

/// First pause after a failed connection attempt; it doubles up to the
/// device's `backoff_max`.
const BACKOFF_INITIAL: Duration = Duration::from_millis(250);

/// A connected session and the device's namespace array at that time.
pub struct Connected {
    pub session: Arc<Session>,
    pub namespaces: NamespaceMap,
}

/// The upstream side of one OPC UA device. Requests load the current
/// session; `None` while the device is unreachable.
pub struct Upstream {
    pub device: Arc<str>,
    pub timeout: Duration,
    current: ArcSwapOption<Connected>,
}

/// The application identity sluice presents to a device: the certificate
/// and key of the listener that mirrors it, in its own PKI folder.
pub struct ClientIdentity {
    pub application_uri: String,
    pub pki_dir: PathBuf,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

impl Upstream {
    pub fn new(device: &OpcuaDeviceConfig) -> Arc<Upstream> {
        Arc::new(Upstream {
            device: Arc::from(device.name.as_str()),
            timeout: device.timeout,
            current: ArcSwapOption::empty(),
        })
    }

    /// Returns the current session, if connected.
    pub fn connected(&self) -> Option<Arc<Connected>> {
        self.current.load_full()
    }

    /// Connects and keeps the session until `stop` is cancelled.
    pub async fn run(
        self: Arc<Self>,
        device: OpcuaDeviceConfig,
        identity: ClientIdentity,
        stop: CancellationToken,
    ) {
        let mut backoff = BACKOFF_INITIAL;
        loop {
            let attempt = tokio::select! {
                _ = stop.cancelled() => return,
                attempt = self.connect_once(&device, &identity) => attempt,
            };
            match attempt {
                Ok(()) => backoff = BACKOFF_INITIAL,
                Err(error) => {
                    tracing::warn!(device = %self.device, %error, retry_ms = backoff.as_millis() as u64, "OPC UA device connection failed");
                }
            }
            self.current.store(None);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(device.backoff_max);
        }
    }

    /// Opens one session and serves it until the connection is lost.
    async fn connect_once(
        self: &Arc<Self>,
        device: &OpcuaDeviceConfig,
        identity: &ClientIdentity,
    ) -> Result<(), String> {
        let token = identity_token(device)?;
        let mut client = ClientBuilder::new()
            .application_name("sluice")
            .application_uri(&identity.application_uri)
            .pki_dir(&identity.pki_dir)
            .certificate_path(&identity.certificate)
            .private_key_path(&identity.private_key)
            // NOTE: the device's certificate is trusted on first use; pin it by
            // placing it in the PKI folder's trusted/ directory instead.
            .trust_server_certs(true)
            .session_retry_limit(0)
            .request_timeout(device.timeout)
            .session_timeout(60_000)
            .client()
            .map_err(|errors| errors.join("; "))?;
        let endpoint: EndpointDescription = (
            device.endpoint.as_str(),
            policy_uri(device.security_policy),
            security_mode(device.security_mode),
        )
            .into();
        let (session, event_loop) = tokio::time::timeout(
            device.timeout,
            client.connect_to_matching_endpoint(endpoint, token),
        )
        .await
        .map_err(|_| format!("no answer from {} in time", device.endpoint))?
        .map_err(|error| error.to_string())?;

        // The event loop must keep running while requests are in flight, so
        // the namespace array is read by a task of its own.
        let mut reader: Option<tokio::task::JoinHandle<()>> = None;
        let mut events = std::pin::pin!(event_loop.enter());
        let ended = loop {
            match events.next().await {
                Some(Ok(SessionPollResult::Reconnected(_))) => {
                    if let Some(previous) = reader.take() {
                        previous.abort();
                    }
                    reader = Some(tokio::spawn(self.clone().publish(session.clone())));
                }
                Some(Ok(SessionPollResult::ConnectionLost(status))) => {
                    break Err(format!("connection lost: {status}"));
                }
                Some(Ok(_)) => {}
                Some(Err(status)) => break Err(format!("session ended: {status}")),
                None => break Ok(()),
            }
        };
        if let Some(reader) = reader {
            reader.abort();
        }
        ended
    }

    /// Reads the namespace array of a new session and makes the session
    /// current.
    async fn publish(self: Arc<Self>, session: Arc<Session>) {
        match session.read_namespace_array().await {
            Ok(namespaces) => {
                tracing::info!(device = %self.device, "OPC UA device connected");
                self.current.store(Some(Arc::new(Connected {
                    session,
                    namespaces,
                })));
            }
            Err(error) => {
                tracing::warn!(device = %self.device, %error, "failed to read the namespace array of the OPC UA device");
            }
        }
    }
}

fn identity_token(device: &OpcuaDeviceConfig) -> Result<IdentityToken, String> {
    let (Some(username), Some(path)) = (&device.username, &device.password_file) else {
        return Ok(IdentityToken::Anonymous);
    };
    let password = read_password(path)?;
    Ok(IdentityToken::UserName(
        username.clone(),
        Password::new(password),
    ))
}

/// Reads a password file; a final line ending is not part of the password.
fn read_password(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("failed to read \"{}\": {error}", path.display()))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Ok(text.strip_suffix('\r').unwrap_or(text).to_owned())
}

pub fn policy_uri(policy: UaSecurityPolicy) -> &'static str {
    use opcua::crypto::SecurityPolicy;
    match policy {
        UaSecurityPolicy::None => SecurityPolicy::None.to_uri(),
        UaSecurityPolicy::Basic256Sha256 => SecurityPolicy::Basic256Sha256.to_uri(),
        UaSecurityPolicy::Aes128Sha256RsaOaep => SecurityPolicy::Aes128Sha256RsaOaep.to_uri(),
        UaSecurityPolicy::Aes256Sha256RsaPss => SecurityPolicy::Aes256Sha256RsaPss.to_uri(),
    }
}

fn security_mode(mode: UaSecurityMode) -> MessageSecurityMode {
    match mode {
        UaSecurityMode::None => MessageSecurityMode::None,
        UaSecurityMode::Sign => MessageSecurityMode::Sign,
        UaSecurityMode::SignAndEncrypt => MessageSecurityMode::SignAndEncrypt,
    }
}
