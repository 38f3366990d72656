//! The MODBUS/TCP Security handshake of a listener: mutual TLS with a time
//! limit and a cap on handshakes per source address, the peer certificate's
//! identity, and the reason and anomaly kind of every rejected handshake.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::rustls::{CertificateError, Error as TlsError, PeerIncompatible};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::ListenerTls;
use crate::events::Severity;
use crate::identity::certificate::CertificateIdentity;

/// The reason for rejecting a handshake or its certificate, with the anomaly
/// kind and severity that record it beside the session `reject` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: String,
    pub kind: &'static str,
    pub severity: Severity,
}

impl Rejection {
    fn new(reason: impl Into<String>, kind: &'static str, severity: Severity) -> Rejection {
        Rejection {
            reason: reason.into(),
            kind,
            severity,
        }
    }
}

/// Handshakes in progress per source address.
#[derive(Debug, Default)]
pub struct HandshakeSlots {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One handshake in progress; its slot is freed on drop.
pub struct HandshakeSlot {
    slots: Arc<HandshakeSlots>,
    source: IpAddr,
}

impl HandshakeSlots {
    /// Takes a slot for `source`, or returns `None` when it already has
    /// `limit` handshakes in progress.
    pub fn take(self: &Arc<Self>, source: IpAddr, limit: usize) -> Option<HandshakeSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(source).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(HandshakeSlot {
            slots: self.clone(),
            source,
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut counts = self.slots.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

/// Runs the server handshake on `stream` within the listener's time limit
/// and reads the identity of the client's leaf certificate. A resumed
/// session presents the certificate of the full handshake it resumes.
pub async fn accept(
    tls: &ListenerTls,
    stream: TcpStream,
) -> Result<(TlsStream<TcpStream>, Arc<CertificateIdentity>), Rejection> {
    let acceptor = TlsAcceptor::from(tls.server.0.clone());
    let handshake = async {
        let offered = offered_version(&stream).await;
        (acceptor.accept(stream).await, offered)
    };
    let stream = match tokio::time::timeout(tls.handshake_timeout, handshake).await {
        Ok((Ok(stream), _)) => stream,
        Ok((Err(error), offered)) => return Err(classify(&error, offered)),
        Err(_) => return Err(timed_out(tls.handshake_timeout)),
    };
    let (_, connection) = stream.get_ref();
    let leaf = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or_else(|| {
            Rejection::new(
                "no client certificate",
                "tls_handshake_failed",
                Severity::Medium,
            )
        })?;
    let identity = CertificateIdentity::from_der(leaf).map_err(|error| {
        Rejection::new(error.to_string(), "malformed_certificate", Severity::High)
    })?;
    Ok((stream, Arc::new(identity)))
}

/// TLS 1.2 as `client_version` writes it (RFC 5246, section 7.4.1.2);
/// TLS 1.3 clients write it too.
const TLS_1_2: u16 = 0x0303;
/// Bytes up to the end of `client_version`: 5 of the record header, 4 of
/// the handshake header, 2 of the version.
const CLIENT_VERSION_END: usize = 11;
const HANDSHAKE_RECORD: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;

/// Reads, without consuming, the `client_version` of the ClientHello, so a
/// rejection can tell an old client from other incompatibilities. Returns
/// `None` when the first bytes are not a ClientHello or arrive split.
async fn offered_version(stream: &TcpStream) -> Option<u16> {
    let mut head = [0u8; CLIENT_VERSION_END];
    let read = stream.peek(&mut head).await.ok()?;
    let is_hello =
        read == CLIENT_VERSION_END && head[0] == HANDSHAKE_RECORD && head[5] == CLIENT_HELLO;
    is_hello.then(|| u16::from_be_bytes([head[9], head[10]]))
}

fn timed_out(limit: Duration) -> Rejection {
    Rejection::new(
        format!("handshake timeout after {} ms", limit.as_millis()),
        "tls_handshake_failed",
        Severity::Medium,
    )
}

/// Maps a failed handshake to its reason and anomaly kind. rustls reports
/// its own errors inside the `io::Error`; anything else is the connection
/// failing underneath. `offered` is the ClientHello's `client_version`.
pub fn classify(error: &io::Error, offered: Option<u16>) -> Rejection {
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>())
    else {
        return Rejection::new(
            format!("connection failed during handshake: {error}"),
            "tls_handshake_failed",
            Severity::Low,
        );
    };
    classify_tls(tls, offered)
}

fn classify_tls(error: &TlsError, offered: Option<u16>) -> Rejection {
    let failed = |reason: &str| Rejection::new(reason, "tls_handshake_failed", Severity::Medium);
    match error {
        // A TLS 1.1 hello fails whichever check rustls makes first (often
        // the missing signature_algorithms extension), so the version the
        // client offered decides the reason.
        TlsError::PeerIncompatible(_) if offered.is_some_and(|version| version < TLS_1_2) => {
            failed("protocol version too old")
        }
        TlsError::NoCertificatesPresented => failed("no client certificate"),
        TlsError::PeerIncompatible(
            PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::SupportedVersionsExtensionRequired,
        ) => failed("protocol version too old"),
        TlsError::PeerIncompatible(PeerIncompatible::NoCipherSuitesInCommon) => {
            failed("no cipher suite in common")
        }
        TlsError::InvalidCertificate(certificate) => classify_certificate(certificate),
        other => failed(&format!("handshake failed: {other}")),
    }
}

fn classify_certificate(error: &CertificateError) -> Rejection {
    match error {
        CertificateError::UnknownIssuer => {
            Rejection::new("unknown CA", "unknown_certificate", Severity::High)
        }
        CertificateError::BadSignature => Rejection::new(
            "invalid certificate signature",
            "unknown_certificate",
            Severity::High,
        ),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => Rejection::new(
            "certificate expired",
            "tls_handshake_failed",
            Severity::Medium,
        ),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            Rejection::new(
                "certificate not yet valid",
                "tls_handshake_failed",
                Severity::Medium,
            )
        }
        CertificateError::Revoked => {
            Rejection::new("certificate revoked", "certificate_revoked", Severity::High)
        }
        CertificateError::ExpiredRevocationList
        | CertificateError::ExpiredRevocationListContext { .. } => {
            Rejection::new("CRL expired", "crl_expired", Severity::Critical)
        }
        CertificateError::UnknownRevocationStatus => Rejection::new(
            "certificate revocation status unknown: no CRL of its issuer",
            "tls_handshake_failed",
            Severity::Medium,
        ),
        other => Rejection::new(
            format!("invalid certificate: {other}"),
            "tls_handshake_failed",
            Severity::Medium,
        ),
    }
}

#[cfg(test)]
mod tests;
