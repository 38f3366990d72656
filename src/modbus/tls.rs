//! The MODBUS/TCP Security handshake of a listener: mutual TLS with a time
//! limit and a cap on handshakes per source address, the peer certificate's
//! identity, and the reason and anomaly kind of every refused handshake.

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

/// Why a handshake or the certificate it presented was refused, as the
/// session `reject` event and the anomaly record it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
    pub kind: &'static str,
    pub severity: Severity,
}

impl Refusal {
    fn new(reason: impl Into<String>, kind: &'static str, severity: Severity) -> Refusal {
        Refusal {
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
) -> Result<(TlsStream<TcpStream>, Arc<CertificateIdentity>), Refusal> {
    let acceptor = TlsAcceptor::from(tls.server.0.clone());
    let stream = match tokio::time::timeout(tls.handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(classify(&error)),
        Err(_) => return Err(timed_out(tls.handshake_timeout)),
    };
    let (_, connection) = stream.get_ref();
    let leaf = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or_else(|| {
            Refusal::new(
                "no client certificate",
                "tls_handshake_failed",
                Severity::Medium,
            )
        })?;
    let identity = CertificateIdentity::from_der(leaf).map_err(|error| {
        Refusal::new(error.to_string(), "malformed_certificate", Severity::High)
    })?;
    Ok((stream, Arc::new(identity)))
}

fn timed_out(limit: Duration) -> Refusal {
    Refusal::new(
        format!("handshake timeout after {} ms", limit.as_millis()),
        "tls_handshake_failed",
        Severity::Medium,
    )
}

/// Maps a failed handshake to its reason and anomaly kind. rustls reports
/// its own errors inside the `io::Error`; anything else is the connection
/// failing underneath.
pub fn classify(error: &io::Error) -> Refusal {
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>())
    else {
        return Refusal::new(
            format!("connection failed during handshake: {error}"),
            "tls_handshake_failed",
            Severity::Low,
        );
    };
    classify_tls(tls)
}

fn classify_tls(error: &TlsError) -> Refusal {
    let failed = |reason: &str| Refusal::new(reason, "tls_handshake_failed", Severity::Medium);
    match error {
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

fn classify_certificate(error: &CertificateError) -> Refusal {
    match error {
        CertificateError::UnknownIssuer => {
            Refusal::new("unknown CA", "unknown_certificate", Severity::High)
        }
        CertificateError::BadSignature => Refusal::new(
            "invalid certificate signature",
            "unknown_certificate",
            Severity::High,
        ),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => Refusal::new(
            "certificate expired",
            "tls_handshake_failed",
            Severity::Medium,
        ),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            Refusal::new(
                "certificate not yet valid",
                "tls_handshake_failed",
                Severity::Medium,
            )
        }
        CertificateError::Revoked => {
            Refusal::new("certificate revoked", "certificate_revoked", Severity::High)
        }
        CertificateError::ExpiredRevocationList
        | CertificateError::ExpiredRevocationListContext { .. } => {
            Refusal::new("CRL expired", "crl_expired", Severity::Critical)
        }
        CertificateError::UnknownRevocationStatus => Refusal::new(
            "certificate revocation status unknown: no CRL of its issuer",
            "tls_handshake_failed",
            Severity::Medium,
        ),
        other => Refusal::new(
            format!("invalid certificate: {other}"),
            "tls_handshake_failed",
            Severity::Medium,
        ),
    }
}

#[cfg(test)]
mod tests;
