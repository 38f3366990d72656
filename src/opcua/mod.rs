//! OPC UA termination: the north OPC UA server of each `opcua` listener (an
//! async-opcua server), the client session to the device it mirrors, the
//! node manager that decides every operation against the policy, and the
//! node manager of the Modbus tags.
//!
//! Connections reach the server through `front`, which accepts TCP on the
//! listener's address and passes the byte stream on to the server on an
//! internal loopback port.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use opcua::server::{ServerBuilder, ServerEndpoint};
use opcua::sync::RwLock;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::UaSecurityPolicy;
use crate::detect::OpcuaDetector;
use crate::modbus::generation::Shared;
use crate::policy::OpcuaListenerPlan;

mod access;
mod auth;
mod browse;
pub mod framing;
mod front;
pub mod guard;
mod history;
mod namespaces;
mod nodes;
pub mod password;
mod paths;
mod record;
mod sampler;
mod tag_space;
mod tag_write;
mod tags;
pub mod trust;
mod upstream;

use trust::TrustStore;
use upstream::{ClientIdentity, Upstream};

/// The trust store of each running OPC UA listener, by listener name.
pub type TrustStores = Mutex<Vec<(Arc<str>, Arc<ArcSwap<TrustStore>>)>>;

/// Path of every endpoint the server offers.
const ENDPOINT_PATH: &str = "/";
/// Maximum wait at start for the device's first session, so that the
/// server starts with the device's namespaces.
const FIRST_CONNECT_WAIT_MAX: Duration = Duration::from_secs(10);
/// Interval of the bounded polls at start.
const START_POLL: Duration = Duration::from_millis(20);

/// Failures to start an OPC UA listener.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener {listener}: {message}")]
    Pki { listener: String, message: String },
    #[error("listener {listener}: cannot start the OPC UA server: {message}")]
    Server { listener: String, message: String },
    #[error("listener {listener}: client certificate trust: {message}")]
    Trust { listener: String, message: String },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Starts the OPC UA listener `plan` on the bound `socket`. Returns once the
/// server runs; it stops when `shutdown` is cancelled.
pub async fn start(
    plan: &OpcuaListenerPlan,
    socket: TcpListener,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) -> Result<(), StartError> {
    let pki = prepare_pki(plan, &shared.current.load().policy.audit().path)?;
    let upstream = match plan.device {
        Some(device) => Some(connect_device(plan, device, &pki, shared, shutdown).await),
        None => None,
    };

    let public = socket.local_addr()?;
    // TODO: a local process can reach this port directly and skip the
    // front's guard. async-opcua serves only a whole TcpListener.
    let internal = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let internal_address = internal.local_addr()?;
    let front = front::Front::new(
        plan.name.clone(),
        shared.clone(),
        internal_address,
        &plan.server,
    )
    .map_err(|message| StartError::Trust {
        listener: plan.name.to_string(),
        message,
    })?;
    let detector = Arc::new(OpcuaDetector::new());
    let tag_manager = {
        let shared = shared.clone();
        let listener = plan.name.clone();
        let mode = plan.mode;
        let stop = shutdown.clone();
        let channels = front.channels.clone();
        let detector = detector.clone();
        move |_context: opcua::server::node_manager::ServerContext| {
            tags::TagNodeManager::new(shared, listener, mode, channels, stop, detector)
        }
    };
    let authenticator = auth::VendorAuthenticator {
        shared: shared.clone(),
        listener: plan.name.clone(),
        detector: detector.clone(),
    };
    let mut builder = ServerBuilder::new()
        .application_name("sluice")
        .application_uri(&plan.server.application_uri)
        .product_uri("urn:sluice")
        .pki_dir(&pki.dir)
        .certificate_path(&pki.certificate)
        .private_key_path(&pki.private_key)
        .create_sample_keypair(false)
        // The front checked the client application certificate against
        // client_ca and crl before the OPN reached the server; async-opcua
        // itself can only trust exact certificate files.
        .trust_client_certs(true)
        .host(public.ip().to_string())
        .port(public.port())
        .discovery_urls(vec![ENDPOINT_PATH.to_owned()])
        .with_authenticator(Arc::new(authenticator))
        .diagnostics_enabled(false);
    if let (Some(device), Some(upstream)) = (plan.device, upstream) {
        let shared = shared.clone();
        let listener = plan.name.clone();
        let mode = plan.mode;
        let stop = shutdown.clone();
        let channels = front.channels.clone();
        let detector = detector.clone();
        builder = builder.with_node_manager(
            move |_context: opcua::server::node_manager::ServerContext| nodes::DeviceNodeManager {
                shared,
                listener,
                mode,
                device,
                upstream,
                namespaces: Arc::new(RwLock::new(namespaces::Namespaces::default())),
                sampler: Arc::new(sampler::Sampler::default()),
                stop,
                channels,
                detector,
            },
        );
    }
    builder = builder.with_node_manager(tag_manager);
    for (id, endpoint) in endpoints(&plan.server.security_policies, plan.server.allow_none) {
        builder = builder.add_endpoint(id, endpoint);
    }
    let (server, handle) = builder.build().map_err(|message| StartError::Server {
        listener: plan.name.to_string(),
        message,
    })?;
    let name = plan.name.clone();
    tokio::spawn(async move {
        if let Err(error) = server.run_with(internal).await {
            tracing::error!(listener = %name, %error, "OPC UA server stopped");
        }
    });
    advertise_public_port(&handle, internal_address.port(), public.port()).await;

    let stopper = handle.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        stopper.cancel();
    });
    shared
        .opcua_trust
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push((plan.name.clone(), front.trust.clone()));
    tokio::spawn(front::serve(Arc::new(front), socket, shutdown.clone()));
    Ok(())
}

/// Loads the trust store of every running OPC UA listener again from the
/// current policy's `client_ca` and `crl`. A listener whose files fail to
/// load keeps its previous store.
pub fn reload_trust(shared: &Shared) {
    let generation = shared.current.load();
    let stores = shared
        .opcua_trust
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for (name, store) in stores.iter() {
        let Some(plan) = generation
            .policy
            .opcua_listeners()
            .iter()
            .find(|plan| &plan.name == name)
        else {
            continue;
        };
        match front::load_trust(&plan.server) {
            Ok(trust) => store.store(Arc::new(trust)),
            Err(error) => {
                tracing::error!(listener = %name, %error, "OPC UA trust store not reloaded; the previous one stays in use");
            }
        }
    }
}

/// Starts the client session to the OPC UA device the listener mirrors and
/// waits, bounded, for it to connect.
async fn connect_device(
    plan: &OpcuaListenerPlan,
    device: crate::policy::OpcuaDeviceId,
    pki: &Pki,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) -> Arc<Upstream> {
    let device = shared.current.load().policy.opcua_devices()[device].clone();
    let upstream = Upstream::new(&device);
    let identity = ClientIdentity {
        application_uri: plan.server.application_uri.clone(),
        pki_dir: pki.dir.join("client"),
        certificate: pki.certificate.clone(),
        private_key: pki.private_key.clone(),
    };
    tokio::spawn(
        upstream
            .clone()
            .run(device.clone(), identity, shutdown.clone()),
    );
    wait_for_device(&upstream, device.timeout.min(FIRST_CONNECT_WAIT_MAX)).await;
    upstream
}

/// Waits, bounded by `limit`, for the first device session.
async fn wait_for_device(upstream: &Upstream, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while upstream.connected().is_none() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(START_POLL).await;
    }
    if upstream.connected().is_none() {
        tracing::warn!(device = %upstream.device, "OPC UA device not connected at start; its namespaces appear once it is");
    }
}

/// Makes the endpoint URLs the server hands out name the public port. The
/// server stores the port of the listener it runs on once, at start, so
/// the public port is stored after that.
async fn advertise_public_port(handle: &opcua::server::ServerHandle, internal: u16, public: u16) {
    let port = &handle.info().port;
    let deadline = tokio::time::Instant::now() + FIRST_CONNECT_WAIT_MAX;
    while port.load(std::sync::atomic::Ordering::Relaxed) != internal
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(START_POLL).await;
    }
    port.store(public, std::sync::atomic::Ordering::Relaxed);
}

/// Returns the endpoints of a listener: SignAndEncrypt for each policy,
/// and one without security when `allow_none` is set.
fn endpoints(policies: &[UaSecurityPolicy], allow_none: bool) -> Vec<(String, ServerEndpoint)> {
    let mut endpoints = Vec::new();
    for policy in policies {
        let endpoint = match policy {
            UaSecurityPolicy::None => continue,
            UaSecurityPolicy::Basic256Sha256 => {
                ServerEndpoint::new_basic256sha256_sign_encrypt(ENDPOINT_PATH, &[])
            }
            UaSecurityPolicy::Aes128Sha256RsaOaep => {
                ServerEndpoint::new_aes128_sha256_rsaoaep_sign_encrypt(ENDPOINT_PATH, &[])
            }
            UaSecurityPolicy::Aes256Sha256RsaPss => {
                ServerEndpoint::new_aes256_sha256_rsapss_sign_encrypt(ENDPOINT_PATH, &[])
            }
        };
        endpoints.push((policy.name().to_owned(), endpoint));
    }
    if allow_none {
        endpoints.push((
            "None".to_owned(),
            ServerEndpoint::new_none(ENDPOINT_PATH, &[]),
        ));
    }
    endpoints
}

/// The PKI folder of one listener and the certificate files in it.
struct Pki {
    dir: PathBuf,
    certificate: PathBuf,
    private_key: PathBuf,
}

/// Creates the listener's PKI folder beside the audit folder and copies the
/// configured certificate (as DER) and private key (PEM) into it, the forms
/// async-opcua 0.19 reads.
fn prepare_pki(plan: &OpcuaListenerPlan, audit_path: &Path) -> Result<Pki, StartError> {
    let error = |message: String| StartError::Pki {
        listener: plan.name.to_string(),
        message,
    };
    let dir = pki_dir(audit_path, &plan.name).map_err(|e| {
        error(format!(
            "failed to resolve the folder of \"{}\": {e}",
            audit_path.display()
        ))
    })?;
    let own = dir.join("own");
    let private = dir.join("private");
    for folder in [&own, &private] {
        std::fs::create_dir_all(folder)
            .map_err(|e| error(format!("failed to create \"{}\": {e}", folder.display())))?;
    }
    let read = |path: &Path| {
        std::fs::read(path)
            .map_err(|e| error(format!("failed to read \"{}\": {e}", path.display())))
    };
    let certificate = read(&plan.server.certificate)?;
    let der = crate::config::certificate_der(&certificate).map_err(|problem| {
        error(format!(
            "certificate \"{}\": {problem}",
            plan.server.certificate.display()
        ))
    })?;
    let key = read(&plan.server.private_key)?;
    if !key.starts_with(b"-----BEGIN") {
        return Err(error(format!(
            "private key \"{}\" is not PEM; convert it with `openssl pkey -in KEY -out KEY.pem`",
            plan.server.private_key.display()
        )));
    }
    let certificate_path = own.join("cert.der");
    let key_path = private.join("private.pem");
    std::fs::write(&certificate_path, der).map_err(|e| {
        error(format!(
            "failed to write \"{}\": {e}",
            certificate_path.display()
        ))
    })?;
    write_private(&key_path, &key)
        .map_err(|e| error(format!("failed to write \"{}\": {e}", key_path.display())))?;
    Ok(Pki {
        dir,
        certificate: certificate_path,
        private_key: key_path,
    })
}

/// Returns the absolute PKI folder of `listener`, beside the audit folder.
/// async-opcua joins relative certificate paths onto its PKI folder, so a
/// relative folder would be taken twice.
fn pki_dir(audit_path: &Path, listener: &str) -> io::Result<PathBuf> {
    let base = match audit_path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    Ok(std::path::absolute(base)?.join("opcua-pki").join(listener))
}

/// Writes a private key readable by the service account only.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pki_dir_of_relative_audit_path_is_absolute() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            pki_dir(Path::new("audit"), "ua").unwrap(),
            cwd.join("opcua-pki/ua")
        );
        assert_eq!(
            pki_dir(Path::new("state/audit"), "ua").unwrap(),
            cwd.join("state/opcua-pki/ua")
        );
    }

    #[test]
    fn pki_dir_of_absolute_audit_path_stays() {
        assert_eq!(
            pki_dir(Path::new("/var/lib/sluice/audit"), "ua").unwrap(),
            Path::new("/var/lib/sluice/opcua-pki/ua")
        );
    }
}
