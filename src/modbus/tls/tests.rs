//! Handshakes between a rustls client and `accept` on loopback, with
//! certificates and CRLs made by rcgen and the server configuration loaded
//! from a gateway file as `check` and a reload load it.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::client::Resumption;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, HandshakeKind, RootCertStore};
use tokio_rustls::TlsConnector;

use super::*;
use crate::identity::test_pki::{utf8_string, Leaf, TestCa};

/// A CA, the gateway's certificate and a folder with the files a
/// `modbus-tls` listener names.
struct Pki {
    folder: tempfile::TempDir,
    ca: TestCa,
}

impl Pki {
    fn new() -> Pki {
        let folder = tempfile::tempdir().unwrap();
        let ca = TestCa::new("vendors CA");
        let server = ca.leaf("gateway", &["localhost", "127.0.0.1"], None, 1);
        let write =
            |name: &str, text: &str| std::fs::write(folder.path().join(name), text).unwrap();
        write("ca.crt", &ca.pem);
        write("gateway.crt", &server.pem);
        write("gateway.key", &server.key_pem);
        write("vendors.crl", &ca.crl(&[], time::Duration::days(1)));
        Pki { folder, ca }
    }

    fn write_crl(&self, revoked: &[u64], next_update_in: time::Duration) {
        let crl = self.ca.crl(revoked, next_update_in);
        std::fs::write(self.folder.path().join("vendors.crl"), crl).unwrap();
    }

    /// Loads the listener's TLS settings through the configuration loader.
    fn load(&self) -> crate::config::ListenerTls {
        let gateway = r#"[gateway]
name = "edge"
timezone = "UTC"

[[listener]]
name = "vendors"
protocol = "modbus-tls"
bind = "127.0.0.1:0"
device = "press-1"
tls = { cert = "gateway.crt", key = "gateway.key", client_ca = "ca.crt", crl = ["vendors.crl"], handshake_timeout_ms = 500 }

[[device]]
name = "press-1"
address = "127.0.0.1:5021"
"#;
        let rules = r#"[vendor]
name = "acme"
certificate_cn = ["acme-*"]
"#;
        let dir = self.folder.path();
        std::fs::write(dir.join("gateway.toml"), gateway).unwrap();
        std::fs::create_dir_all(dir.join("rules")).unwrap();
        std::fs::write(dir.join("rules/acme.toml"), rules).unwrap();
        let (config, _) = crate::config::load(&dir.join("gateway.toml")).unwrap();
        config.listeners[0].tls.clone().unwrap()
    }
}

fn client_config(ca: &TestCa, leaf: Option<&Leaf>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der.clone())).unwrap();
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let mut config = match leaf {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(leaf.der.clone())],
                PrivateKeyDer::try_from(leaf.key_der.clone()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.resumption = Resumption::in_memory_sessions(8);
    Arc::new(config)
}

/// Connects a client with `config` to a server running `accept` once, and
/// returns the server's result and the client's handshake kind.
async fn handshake_once(
    tls: &crate::config::ListenerTls,
    config: &Arc<ClientConfig>,
) -> (
    Result<Arc<CertificateIdentity>, Rejection>,
    Option<HandshakeKind>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = async {
        let (stream, _) = listener.accept().await.unwrap();
        match accept(tls, stream).await {
            Ok((mut stream, identity)) => {
                // One byte each way proves the session carries data, and
                // lets a TLS 1.3 client receive its tickets.
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await.unwrap();
                stream.write_all(&byte).await.unwrap();
                stream.flush().await.unwrap();
                Ok(identity)
            }
            Err(rejection) => Err(rejection),
        }
    };
    let client = async {
        let stream = TcpStream::connect(address).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut stream = TlsConnector::from(config.clone())
            .connect(name, stream)
            .await
            .ok()?;
        stream.write_all(&[7]).await.ok()?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.ok()?;
        stream.get_ref().1.handshake_kind()
    };
    tokio::join!(server, client)
}

fn reason(result: Result<Arc<CertificateIdentity>, Rejection>) -> (String, &'static str) {
    let rejection = result.unwrap_err();
    (rejection.reason, rejection.kind)
}

#[tokio::test]
async fn accepts_client_and_reads_its_role() {
    let pki = Pki::new();
    let tls = pki.load();
    let leaf = pki
        .ca
        .leaf("acme-1", &[], Some(utf8_string("Operator")), 20);
    let (result, kind) = handshake_once(&tls, &client_config(&pki.ca, Some(&leaf))).await;
    let identity = result.unwrap();
    assert_eq!(identity.subject_cn.as_deref(), Some("acme-1"));
    assert_eq!(identity.role.as_deref(), Some("Operator"));
    assert_eq!(kind, Some(HandshakeKind::Full));
}

#[tokio::test]
async fn resumed_session_keeps_full_handshake_identity() {
    let pki = Pki::new();
    let tls = pki.load();
    let leaf = pki
        .ca
        .leaf("acme-1", &[], Some(utf8_string("Operator")), 21);
    let config = client_config(&pki.ca, Some(&leaf));
    let (first, first_kind) = handshake_once(&tls, &config).await;
    let (second, second_kind) = handshake_once(&tls, &config).await;
    assert_eq!(first_kind, Some(HandshakeKind::Full));
    assert_eq!(second_kind, Some(HandshakeKind::Resumed));
    assert_eq!(second.unwrap(), first.unwrap());
}

#[tokio::test]
async fn reloaded_configuration_does_not_resume_old_sessions() {
    let pki = Pki::new();
    let leaf = pki.ca.leaf("acme-1", &[], None, 22);
    let config = client_config(&pki.ca, Some(&leaf));
    let (_, first_kind) = handshake_once(&pki.load(), &config).await;
    // A reload builds the server configuration again, with a new session
    // cache and new ticket keys.
    let (_, second_kind) = handshake_once(&pki.load(), &config).await;
    assert_eq!(first_kind, Some(HandshakeKind::Full));
    assert_eq!(second_kind, Some(HandshakeKind::Full));
}

#[tokio::test]
async fn revoked_certificate_is_rejected_after_reload() {
    let pki = Pki::new();
    let leaf = pki.ca.leaf("acme-1", &[], None, 23);
    let config = client_config(&pki.ca, Some(&leaf));
    let (before, _) = handshake_once(&pki.load(), &config).await;
    assert!(before.is_ok());
    pki.write_crl(&[23], time::Duration::days(1));
    let (after, _) = handshake_once(&pki.load(), &config).await;
    assert_eq!(
        reason(after),
        ("certificate revoked".to_owned(), "certificate_revoked")
    );
}

#[tokio::test]
async fn expired_crl_fails_closed() {
    let pki = Pki::new();
    pki.write_crl(&[], -time::Duration::minutes(5));
    let tls = pki.load();
    let leaf = pki.ca.leaf("acme-1", &[], None, 24);
    let (result, _) = handshake_once(&tls, &client_config(&pki.ca, Some(&leaf))).await;
    assert_eq!(reason(result), ("CRL expired".to_owned(), "crl_expired"));
}

#[tokio::test]
async fn client_without_certificate_is_rejected() {
    let pki = Pki::new();
    let tls = pki.load();
    let (result, _) = handshake_once(&tls, &client_config(&pki.ca, None)).await;
    assert_eq!(
        reason(result),
        ("no client certificate".to_owned(), "tls_handshake_failed")
    );
}

#[tokio::test]
async fn certificate_of_another_ca_is_rejected() {
    let pki = Pki::new();
    let tls = pki.load();
    let other = TestCa::new("other CA");
    let leaf = other.leaf("acme-1", &[], None, 25);
    let (result, _) = handshake_once(&tls, &client_config(&pki.ca, Some(&leaf))).await;
    assert_eq!(
        reason(result),
        ("unknown CA".to_owned(), "unknown_certificate")
    );
}

#[tokio::test]
async fn malformed_role_is_rejected() {
    let pki = Pki::new();
    let tls = pki.load();
    let leaf = pki.ca.leaf("acme-1", &[], Some(vec![0x13, 1, b'X']), 26);
    let (result, _) = handshake_once(&tls, &client_config(&pki.ca, Some(&leaf))).await;
    assert_eq!(
        reason(result),
        (
            "malformed Modbus role extension: not a UTF8String".to_owned(),
            "malformed_certificate"
        )
    );
}

#[tokio::test]
async fn silent_client_times_out() {
    let pki = Pki::new();
    let tls = pki.load();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let _client = TcpStream::connect(address).await.unwrap();
    let (stream, _) = listener.accept().await.unwrap();
    let rejection = accept(&tls, stream).await.map(|_| ()).unwrap_err();
    assert_eq!(rejection.reason, "handshake timeout after 500 ms");
    assert_eq!(rejection.kind, "tls_handshake_failed");
}

#[test]
fn handshake_slots_cap_each_source() {
    let slots = Arc::new(HandshakeSlots::default());
    let source: IpAddr = "127.0.0.1".parse().unwrap();
    let first = slots.take(source, 2).unwrap();
    let _second = slots.take(source, 2).unwrap();
    assert!(slots.take(source, 2).is_none());
    assert!(slots.take("127.0.0.2".parse().unwrap(), 2).is_some());
    drop(first);
    assert!(slots.take(source, 2).is_some());
}
