//! TLS settings of collector connections: the client side that sluice uses
//! towards a collector, and the server side of `sluice collect`. Both use
//! rustls with its default aws-lc-rs provider and read PEM files.

use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::CollectorTls;

/// The CA bundle of Debian's `ca-certificates`, used when `tls.ca` is unset.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Reads every certificate of a PEM file.
pub fn read_certificates(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|error| pem_error(path, "certificates", error))?;
    if certificates.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no certificate found in {}", path.display()),
        ));
    }
    Ok(certificates)
}

/// Reads the first private key of a PEM file.
pub fn read_private_key(path: &Path) -> io::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|error| pem_error(path, "a private key", error))
}

fn pem_error(path: &Path, what: &str, error: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("failed to read {what} from {}: {error}", path.display()),
    )
}

fn tls_error(error: tokio_rustls::rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, error.to_string())
}

/// Reads a CA bundle into a root store.
pub fn read_roots(path: &Path) -> io::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates(path)? {
        roots.add(certificate).map_err(|error| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("invalid CA certificate in {}: {error}", path.display()),
            )
        })?;
    }
    Ok(roots)
}

/// Builds the client configuration of one collector: its CA bundle and, when
/// configured, its client certificate.
pub fn client_config(tls: &CollectorTls) -> io::Result<Arc<ClientConfig>> {
    let ca = tls.ca.as_deref().unwrap_or(Path::new(SYSTEM_CA_BUNDLE));
    let builder = ClientConfig::builder().with_root_certificates(read_roots(ca)?);
    let config = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(read_certificates(cert)?, read_private_key(key)?)
            .map_err(tls_error)?,
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Builds the server configuration of `sluice collect`. With `client_ca`
/// set, clients must present a certificate that it signed.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> io::Result<Arc<ServerConfig>> {
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder(Arc::new(read_roots(ca)?))
                .build()
                .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error.to_string()))?;
            ServerConfig::builder().with_client_cert_verifier(verifier)
        }
        None => ServerConfig::builder().with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(read_certificates(cert)?, read_private_key(key)?)
        .map_err(tls_error)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
