//! Validation of a `modbus-tls` listener's `tls` table: reads the server
//! certificate, its key, the client CA bundle and the CRLs, and builds the
//! rustls server configuration from them. Building it here means `check`
//! and a reload prove the files work together, and every reload gets a new
//! session cache and new ticket keys.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls::crypto::aws_lc_rs::Ticketer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{version, ClientConfig, Error as TlsError, RootCertStore, ServerConfig};
use toml::Spanned;
use x509_parser::prelude::FromDer;

use super::gateway::Checker;
use super::raw;
use crate::collect::tls::{read_certificates, read_private_key};

/// Handshake time limit when `tls.handshake_timeout_ms` is not set.
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent handshakes from one source address when
/// `tls.max_handshakes_per_source` is not set.
const DEFAULT_HANDSHAKES_PER_SOURCE: usize = 4;

/// The rustls configuration of one listener. Equal only to itself, so a
/// reload that rebuilds it counts as a change.
#[derive(Clone)]
pub struct TlsServer(pub Arc<ServerConfig>);

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsServer")
    }
}

impl PartialEq for TlsServer {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TlsServer {}

/// The kind of file whose validity ends, as the `kind` metric label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryKind {
    ServerCertificate,
    ClientCa,
    Crl,
}

impl ExpiryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExpiryKind::ServerCertificate => "server_certificate",
            ExpiryKind::ClientCa => "client_ca",
            ExpiryKind::Crl => "crl",
        }
    }
}

/// The end of validity of one certificate or CRL file: `notAfter`, or a
/// CRL's `nextUpdate`, in seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsExpiry {
    pub kind: ExpiryKind,
    pub file: PathBuf,
    pub unix_seconds: i64,
}

/// MODBUS/TCP Security settings of a listener, with files resolved against
/// the gateway file's folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crl: Vec<PathBuf>,
    /// A handshake not finished in this time is abandoned.
    pub handshake_timeout: Duration,
    /// Handshakes from one source address in progress at once.
    pub max_handshakes_per_source: usize,
    pub server: TlsServer,
    pub expiry: Vec<TlsExpiry>,
}

/// The rustls client configuration of a device. Equal only to itself, so a
/// reload that rebuilds it opens new connections with the new files.
#[derive(Clone)]
pub struct TlsClient(pub Arc<ClientConfig>);

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsClient")
    }
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TlsClient {}

/// MODBUS/TCP Security towards a device: the CA that verifies it, the
/// client certificate sluice presents and the name checked in its
/// certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTls {
    pub client: TlsClient,
    pub server_name: ServerName<'static>,
}

/// Files read for one listener, before they are combined.
struct Material {
    chain: Vec<CertificateDer<'static>>,
    roots: RootCertStore,
    crls: Vec<CertificateRevocationListDer<'static>>,
    expiry: Vec<TlsExpiry>,
}

impl Checker<'_> {
    /// Checks the `tls` table of a `modbus-tls` listener and builds its
    /// server configuration. Every problem is reported at the key it
    /// concerns.
    pub(super) fn listener_tls(
        &mut self,
        key: &str,
        section: &Spanned<raw::ListenerTlsSection>,
        base: &Path,
    ) -> Option<ListenerTls> {
        let tls = section.get_ref();
        let key = format!("{key}.tls");
        let cert = self.required_file(&key, "cert", tls.cert.as_ref(), section, base);
        let private_key = self.required_file(&key, "key", tls.key.as_ref(), section, base);
        let client_ca =
            self.required_file(&key, "client_ca", tls.client_ca.as_ref(), section, base);
        let crl: Vec<(PathBuf, &Spanned<String>)> = tls
            .crl
            .iter()
            .flatten()
            .map(|path| (base.join(path.get_ref()), path))
            .collect();
        let timeout = self.integer(
            &format!("{key}.handshake_timeout_ms"),
            tls.handshake_timeout_ms.as_ref(),
            DEFAULT_HANDSHAKE_TIMEOUT.as_millis() as i64,
            (1, 300_000),
        );
        let per_source = self.integer(
            &format!("{key}.max_handshakes_per_source"),
            tls.max_handshakes_per_source.as_ref(),
            DEFAULT_HANDSHAKES_PER_SOURCE as i64,
            (1, 1_000_000),
        );

        let material = self.read_material(&key, cert.as_ref(), client_ca.as_ref(), &crl);
        let key_der = private_key.and_then(|(path, at)| match read_private_key(&path) {
            Ok(der) => Some((der, path, at)),
            Err(error) => {
                self.error(at, format!("{key}.key: {error}; give a PEM private key"));
                None
            }
        });
        let (material, (private_key_der, key_path, key_file), cert, client_ca) =
            (material?, key_der?, cert?, client_ca?);
        let mut builder = WebPkiClientVerifier::builder(Arc::new(material.roots));
        if !material.crls.is_empty() {
            builder = builder
                .with_crls(material.crls)
                .enforce_revocation_expiration();
        }
        let verifier = match builder.build() {
            Ok(verifier) => verifier,
            Err(error) => {
                self.error(tls.client_ca.as_ref()?, format!("{key}.client_ca: {error}"));
                return None;
            }
        };
        let config =
            ServerConfig::builder_with_protocol_versions(&[&version::TLS13, &version::TLS12])
                .with_client_cert_verifier(verifier)
                .with_single_cert(material.chain, private_key_der);
        let mut config = match config {
            Ok(config) => config,
            Err(error) => {
                let problem = match error {
                    TlsError::InconsistentKeys(_) => {
                        "the private key does not match the certificate".to_owned()
                    }
                    other => other.to_string(),
                };
                self.error(
                    key_file,
                    format!(
                        "{key}.key: {problem}; give the private key of {}",
                        cert.0.display()
                    ),
                );
                return None;
            }
        };
        // A ticketer per build gives every reload new ticket keys, so tickets
        // issued before a CRL changed cannot skip the revocation check.
        config.ticketer = match Ticketer::new() {
            Ok(ticketer) => ticketer,
            Err(error) => {
                self.error(
                    section,
                    format!("{key}: cannot create ticket keys: {error}"),
                );
                return None;
            }
        };
        Some(ListenerTls {
            cert: cert.0,
            key: key_path,
            client_ca: client_ca.0,
            crl: crl.into_iter().map(|(path, _)| path).collect(),
            handshake_timeout: Duration::from_millis(timeout? as u64),
            max_handshakes_per_source: per_source? as usize,
            server: TlsServer(Arc::new(config)),
            expiry: material.expiry,
        })
    }

    fn required_file<'s>(
        &mut self,
        key: &str,
        field: &str,
        value: Option<&'s Spanned<String>>,
        section: &Spanned<raw::ListenerTlsSection>,
        base: &Path,
    ) -> Option<(PathBuf, &'s Spanned<String>)> {
        let Some(value) = value else {
            self.error(
                section,
                format!("{key}.{field}: missing; give the path of a PEM file"),
            );
            return None;
        };
        Some((base.join(value.get_ref()), value))
    }

    fn read_material(
        &mut self,
        key: &str,
        cert: Option<&(PathBuf, &Spanned<String>)>,
        client_ca: Option<&(PathBuf, &Spanned<String>)>,
        crl: &[(PathBuf, &Spanned<String>)],
    ) -> Option<Material> {
        let now = jiff::Timestamp::now().as_second();
        let mut expiry = Vec::new();
        let mut ok = true;

        let chain = cert.and_then(|cert| self.server_chain(key, cert, now, &mut expiry));
        ok &= chain.is_some();

        let mut roots = RootCertStore::empty();
        let client_ca = client_ca?;
        match read_certificates(&client_ca.0) {
            Ok(certificates) => {
                // The bundle is one series: the CA that expires first.
                if let Some(end) = certificates.iter().filter_map(not_after).min() {
                    expiry.push(TlsExpiry {
                        kind: ExpiryKind::ClientCa,
                        file: client_ca.0.clone(),
                        unix_seconds: end,
                    });
                }
                for certificate in certificates {
                    if let Err(error) = roots.add(certificate) {
                        self.error(
                            client_ca.1,
                            format!("{key}.client_ca: invalid CA certificate: {error}"),
                        );
                        ok = false;
                    }
                }
            }
            Err(error) => {
                self.error(
                    client_ca.1,
                    format!("{key}.client_ca: {error}; give a PEM CA bundle"),
                );
                ok = false;
            }
        }

        let mut crls = Vec::new();
        for (index, (path, at)) in crl.iter().enumerate() {
            let entry_key = format!("{key}.crl[{}]", index + 1);
            let read = CertificateRevocationListDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>());
            let lists = match read {
                Ok(lists) if !lists.is_empty() => lists,
                Ok(_) => {
                    self.error(
                        *at,
                        format!(
                            "{entry_key}: no CRL found in {}; give a PEM CRL",
                            path.display()
                        ),
                    );
                    ok = false;
                    continue;
                }
                Err(error) => {
                    self.error(
                        *at,
                        format!(
                            "{entry_key}: failed to read a CRL from {}: {error}; give a PEM CRL",
                            path.display()
                        ),
                    );
                    ok = false;
                    continue;
                }
            };
            for list in lists {
                match next_update(&list) {
                    Ok(Some(end)) => {
                        if end < now {
                            self.warning(
                                *at,
                                format!(
                                    "{entry_key}: the CRL expired at {}, so every handshake is rejected until it is replaced",
                                    format_time(end)
                                ),
                            );
                        }
                        expiry.push(TlsExpiry {
                            kind: ExpiryKind::Crl,
                            file: path.clone(),
                            unix_seconds: end,
                        });
                    }
                    Ok(None) => {}
                    Err(problem) => {
                        self.error(*at, format!("{entry_key}: invalid CRL: {problem}"));
                        ok = false;
                    }
                }
                crls.push(list);
            }
        }
        ok.then_some(Material {
            chain: chain?,
            roots,
            crls,
            expiry,
        })
    }
}

impl Checker<'_> {
    /// Checks a device's `tls` table and builds its client configuration;
    /// returns `None` when the table is invalid, after reporting why.
    pub(super) fn device_tls(
        &mut self,
        key: &str,
        section: &Spanned<raw::DeviceTlsSection>,
        base: &Path,
        address: Option<std::net::SocketAddr>,
    ) -> Option<DeviceTls> {
        let tls = section.get_ref();
        let key = format!("{key}.tls");
        let mut files = Vec::new();
        for (field, value) in [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)] {
            match value {
                Some(path) => files.push(base.join(path.get_ref())),
                None => self.error(
                    section,
                    format!("{key}.{field}: missing; MODBUS/TCP Security needs ca, cert and key"),
                ),
            }
        }
        let server_name = match &tls.server_name {
            Some(name) => match ServerName::try_from(name.get_ref().clone()) {
                Ok(parsed) => Some(parsed),
                Err(_) => {
                    self.error(
                        name,
                        format!(
                            "{key}.server_name: invalid name \"{}\"; give the DNS name or IP address in the device's certificate",
                            name.get_ref()
                        ),
                    );
                    None
                }
            },
            None => address.map(|address| ServerName::IpAddress(address.ip().into())),
        };
        let [ca, cert, private_key] = <[PathBuf; 3]>::try_from(files).ok()?;
        let paths = crate::config::CollectorTls {
            ca: Some(ca),
            cert: Some(cert),
            key: Some(private_key),
        };
        let client = match crate::collect::tls::client_config(&paths) {
            Ok(client) => client,
            Err(error) => {
                self.error(section, format!("{key}: {error}"));
                return None;
            }
        };
        Some(DeviceTls {
            client: TlsClient(client),
            server_name: server_name?,
        })
    }

    /// Reads the server's certificate chain and checks that its leaf has
    /// not expired.
    fn server_chain(
        &mut self,
        key: &str,
        cert: &(PathBuf, &Spanned<String>),
        now: i64,
        expiry: &mut Vec<TlsExpiry>,
    ) -> Option<Vec<CertificateDer<'static>>> {
        let chain = match read_certificates(&cert.0) {
            Ok(chain) => chain,
            Err(error) => {
                self.error(
                    cert.1,
                    format!("{key}.cert: {error}; give a PEM certificate chain"),
                );
                return None;
            }
        };
        match not_after(&chain[0]) {
            Some(end) if end < now => {
                self.error(
                    cert.1,
                    format!(
                        "{key}.cert: the certificate expired at {}; renew it",
                        format_time(end)
                    ),
                );
                None
            }
            Some(end) => {
                expiry.push(TlsExpiry {
                    kind: ExpiryKind::ServerCertificate,
                    file: cert.0.clone(),
                    unix_seconds: end,
                });
                Some(chain)
            }
            None => {
                self.error(
                    cert.1,
                    format!("{key}.cert: the first certificate cannot be parsed"),
                );
                None
            }
        }
    }
}

fn not_after(certificate: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(certificate).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

fn next_update(list: &CertificateRevocationListDer<'_>) -> Result<Option<i64>, String> {
    let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(list)
        .map_err(|error| error.to_string())?;
    Ok(parsed.next_update().map(|time| time.timestamp()))
}

fn format_time(unix_seconds: i64) -> String {
    jiff::Timestamp::from_second(unix_seconds)
        .map(|time| time.to_string())
        .unwrap_or_else(|_| unix_seconds.to_string())
}
