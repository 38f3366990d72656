//! The guard of one accepted OPC UA TCP connection: framing checks, the
//! per-source OpenSecureChannel rate limit and the client application
//! certificate check, in that order, before bytes reach the OPC UA server.
//! It performs no I/O: the accepting code feeds it bytes and forwards what
//! it returns, or sends the rejection's Error message and closes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;

use super::framing::{
    encode_error, status, Acknowledge, AsymmetricHeader, Frame, FrameCounters, FrameDetail,
    FrameGuard, FramingLimits, Violation, ViolationKind,
};
use super::trust::{CertificateInfo, CertificateRejection, TrustStore};
use crate::config::Rate;
use crate::events::Severity;
use crate::policy::{RateKind, RateLimit, TokenBucket};

/// Event kind of an OpenSecureChannel over the per-source rate limit.
pub const KIND_OPEN_RATE_LIMITED: &str = "opcua_open_rate_limited";
/// Event kind of a renewal whose SenderCertificate differs from the one
/// that opened the channel.
pub const KIND_CERTIFICATE_CHANGED: &str = "opcua_certificate_changed";
/// Reason sent to the client for every certificate rejection. OPC 10000-6
/// (6.7.3) forbids returning security details; events carry them.
const CERTIFICATE_WIRE_REASON: &str = "application certificate rejected";

/// Token buckets of OpenSecureChannel requests, one per source address,
/// shared by all connections of a listener.
#[derive(Debug)]
pub struct OpenRateLimiter {
    rate: Rate,
    burst: u32,
    /// Most sources tracked at once; full buckets are forgotten first.
    max_sources: usize,
    epoch: Instant,
    buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
}

impl OpenRateLimiter {
    pub fn new(rate: Rate, burst: u32, max_sources: usize) -> Self {
        OpenRateLimiter {
            rate,
            burst: burst.max(1),
            max_sources: max_sources.max(1),
            epoch: Instant::now(),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for one OpenSecureChannel from `source`. Returns the
    /// limit when the bucket is empty, or when `max_sources` other sources
    /// still have partly empty buckets: the table never grows without bound.
    pub fn take(&self, source: IpAddr, now: Instant) -> Result<(), RateLimit> {
        let nanos =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        // A poisoned lock only means another connection panicked mid-insert;
        // the map itself stays consistent.
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !buckets.contains_key(&source) && buckets.len() >= self.max_sources {
            buckets.retain(|_, bucket| !bucket.is_full(nanos));
            if buckets.len() >= self.max_sources {
                return Err(self.limit());
            }
        }
        let bucket = buckets
            .entry(source)
            .or_insert_with(|| TokenBucket::new(RateKind::Requests, self.rate, Some(self.burst)));
        if bucket.take(nanos) {
            Ok(())
        } else {
            Err(bucket.limit())
        }
    }

    fn limit(&self) -> RateLimit {
        RateLimit {
            kind: RateKind::Requests,
            rate: self.rate,
            burst: self.burst,
        }
    }
}

/// Cause of a closed connection and the Error message to send first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Stable `anomaly.kind` for events, such as `opcua_not_hello`.
    pub kind: &'static str,
    /// `anomaly.severity`: high for chunk floods and certificate failures,
    /// medium for the rest.
    pub severity: Severity,
    /// The status code of the check that failed, for events.
    pub status: u32,
    /// Human-readable reason with the offending value, for events and logs.
    pub reason: String,
    /// The Error message to send before closing. Its status code may be
    /// more generic than `status` (certificate checks).
    pub error_message: Bytes,
    /// The client certificate, when an OPN carried a parsable one.
    pub certificate: Option<Box<CertificateInfo>>,
}

impl From<Violation> for Rejection {
    fn from(violation: Violation) -> Self {
        let severity = match violation.kind {
            ViolationKind::ChunkFlood => Severity::High,
            _ => Severity::Medium,
        };
        Rejection {
            kind: violation.kind.as_str(),
            severity,
            status: violation.status,
            error_message: violation.error_message(),
            reason: violation.detail,
            certificate: None,
        }
    }
}

impl From<CertificateRejection> for Rejection {
    fn from(rejection: CertificateRejection) -> Self {
        Rejection {
            kind: rejection.reason.kind(),
            severity: Severity::High,
            status: rejection.reason.status(),
            error_message: encode_error(rejection.reason.wire_status(), CERTIFICATE_WIRE_REASON),
            reason: rejection.detail,
            certificate: rejection.certificate.map(Box::new),
        }
    }
}

/// The guard of one connection.
#[derive(Debug)]
pub struct Guard {
    source: IpAddr,
    frames: FrameGuard,
    trust: Arc<ArcSwap<TrustStore>>,
    limiter: Arc<OpenRateLimiter>,
    /// SenderCertificate of the first OPN, which every renewal must repeat
    /// (OPC 10000-6, 6.7.6).
    channel_certificate: Option<Option<Bytes>>,
    certificate: Option<CertificateInfo>,
    failed: Option<Rejection>,
}

impl Guard {
    /// Creates the guard of a connection from `source`. The trust store is
    /// read at each OPN, so a reload applies to renewals of open channels.
    pub fn new(
        source: IpAddr,
        limits: FramingLimits,
        trust: Arc<ArcSwap<TrustStore>>,
        limiter: Arc<OpenRateLimiter>,
    ) -> Self {
        Guard {
            source,
            frames: FrameGuard::new(limits),
            trust,
            limiter,
            channel_certificate: None,
            certificate: None,
            failed: None,
        }
    }

    /// Feeds bytes from the client, as `on_client_bytes_at` with the clocks
    /// read now.
    pub fn on_client_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Frame>, Rejection> {
        self.on_client_bytes_at(bytes, Instant::now(), SystemTime::now())
    }

    /// Feeds bytes from the client and returns the chunks to forward, in
    /// order. `now` drives the rate limit and `wall` the certificate
    /// validity check. After a rejection every call returns it again.
    pub fn on_client_bytes_at(
        &mut self,
        bytes: &[u8],
        now: Instant,
        wall: SystemTime,
    ) -> Result<Vec<Frame>, Rejection> {
        if let Some(rejection) = &self.failed {
            return Err(rejection.clone());
        }
        let result = self
            .frames
            .push(bytes)
            .map_err(Rejection::from)
            .and_then(|frames| {
                for frame in &frames {
                    if let FrameDetail::OpenSecureChannel(header) = &frame.detail {
                        self.check_open(header, now, wall)?;
                    }
                }
                Ok(frames)
            });
        if let Err(rejection) = &result {
            self.failed = Some(rejection.clone());
        }
        result
    }

    /// Lowers the framing limits to the server's Acknowledge.
    pub fn on_acknowledge(&mut self, ack: &Acknowledge) {
        self.frames.apply_acknowledge(ack);
    }

    pub fn counters(&self) -> &FrameCounters {
        self.frames.counters()
    }

    /// Returns the client application certificate that the last OPN
    /// presented and that passed the trust check; `None` under policy None.
    pub fn certificate(&self) -> Option<&CertificateInfo> {
        self.certificate.as_ref()
    }

    fn check_open(
        &mut self,
        header: &AsymmetricHeader,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(), Rejection> {
        if let Err(limit) = self.limiter.take(self.source, now) {
            let reason = format!("OpenSecureChannel from {} exceeds {limit}", self.source);
            return Err(Rejection {
                kind: KIND_OPEN_RATE_LIMITED,
                severity: Severity::Medium,
                status: status::BAD_TCP_SERVER_TOO_BUSY,
                error_message: encode_error(
                    status::BAD_TCP_SERVER_TOO_BUSY,
                    "too many OpenSecureChannel requests",
                ),
                reason,
                certificate: None,
            });
        }
        let sender = header.sender_certificate.clone();
        match &self.channel_certificate {
            Some(first) if header.secure_channel_id != 0 && *first != sender => {
                return Err(Rejection {
                    kind: KIND_CERTIFICATE_CHANGED,
                    severity: Severity::High,
                    status: status::BAD_SECURITY_CHECKS_FAILED,
                    error_message: encode_error(
                        status::BAD_SECURITY_CHECKS_FAILED,
                        CERTIFICATE_WIRE_REASON,
                    ),
                    reason: format!(
                        "renewal of channel {} presents another SenderCertificate",
                        header.secure_channel_id
                    ),
                    certificate: None,
                });
            }
            Some(_) => {}
            None => self.channel_certificate = Some(sender.clone()),
        }
        let trust = self.trust.load();
        self.certificate = trust.verify(&header.security_policy_uri, sender.as_deref(), wall)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const POLICY_NONE: &[u8] = b"http://opcfoundation.org/UA/SecurityPolicy#None";
    const BASIC256SHA256: &[u8] = b"http://opcfoundation.org/UA/SecurityPolicy#Basic256Sha256";

    fn source(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    fn framed(code: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut bytes = code.to_vec();
        bytes.extend_from_slice(&(8 + body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    fn hello() -> Vec<u8> {
        let mut body = Vec::new();
        for field in [0u32, 8192, 8192, 0, 0] {
            body.extend_from_slice(&field.to_le_bytes());
        }
        body.extend_from_slice(&(-1i32).to_le_bytes());
        framed(b"HELF", &body)
    }

    fn open(channel: u32, policy: &[u8], certificate: Option<&[u8]>) -> Vec<u8> {
        let mut body = channel.to_le_bytes().to_vec();
        body.extend_from_slice(&(policy.len() as i32).to_le_bytes());
        body.extend_from_slice(policy);
        match certificate {
            Some(certificate) => {
                body.extend_from_slice(&(certificate.len() as i32).to_le_bytes());
                body.extend_from_slice(certificate);
            }
            None => body.extend_from_slice(&(-1i32).to_le_bytes()),
        }
        body.extend_from_slice(&(-1i32).to_le_bytes());
        body.extend_from_slice(&[0; 64]);
        framed(b"OPNF", &body)
    }

    fn guard_with(limiter: Arc<OpenRateLimiter>) -> Guard {
        let trust = TrustStore::from_der(&[], &[]).unwrap();
        Guard::new(
            source(1),
            FramingLimits::default(),
            Arc::new(ArcSwap::from_pointee(trust)),
            limiter,
        )
    }

    fn limiter(per_second: u64, burst: u32, max_sources: usize) -> Arc<OpenRateLimiter> {
        Arc::new(OpenRateLimiter::new(
            Rate::per_second(per_second),
            burst,
            max_sources,
        ))
    }

    #[test]
    fn limiter_allows_burst_per_source() {
        let limiter = limiter(1, 2, 16);
        let now = limiter.epoch + Duration::from_secs(10);
        assert_eq!(limiter.take(source(1), now), Ok(()));
        assert_eq!(limiter.take(source(1), now), Ok(()));
        let rejected = limiter.take(source(1), now).unwrap_err();
        assert_eq!(rejected.to_string(), "1 requests per second, burst 2");
        assert_eq!(limiter.take(source(2), now), Ok(()));
        let refilled = now + Duration::from_secs(1);
        assert_eq!(limiter.take(source(1), refilled), Ok(()));
        assert!(limiter.take(source(1), refilled).is_err());
    }

    #[test]
    fn limiter_forgets_full_buckets_at_capacity() {
        let limiter = limiter(1, 1, 2);
        let now = limiter.epoch;
        assert_eq!(limiter.take(source(1), now), Ok(()));
        assert_eq!(limiter.take(source(2), now), Ok(()));
        // Both buckets are partly empty: a third source is rejected.
        assert!(limiter.take(source(3), now).is_err());
        // One second later both are full again and can be forgotten.
        let later = now + Duration::from_secs(1);
        assert_eq!(limiter.take(source(3), later), Ok(()));
        assert_eq!(limiter.buckets.lock().unwrap().len(), 1);
    }

    #[test]
    fn policy_none_session_passes() {
        let mut guard = guard_with(limiter(10, 10, 16));
        let stream = [hello(), open(0, POLICY_NONE, None)].concat();
        let frames = guard.on_client_bytes(&stream).unwrap();
        assert_eq!(frames.len(), 2);
        assert_eq!(guard.certificate(), None);
        assert_eq!(guard.counters().open_secure_channel, 1);
    }

    #[test]
    fn framing_violation_becomes_rejection() {
        let mut guard = guard_with(limiter(10, 10, 16));
        let rejection = guard
            .on_client_bytes(&open(0, POLICY_NONE, None))
            .unwrap_err();
        assert_eq!(rejection.kind, "opcua_not_hello");
        assert_eq!(rejection.severity, Severity::Medium);
        assert_eq!(rejection.status, 0x807E_0000);
        assert_eq!(
            &rejection.error_message[8..12],
            &0x807E_0000u32.to_le_bytes()
        );
        assert_eq!(guard.on_client_bytes(&hello()).unwrap_err(), rejection);
    }

    #[test]
    fn open_over_rate_limit_is_rejected() {
        let shared = limiter(1, 1, 16);
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut first = guard_with(shared.clone());
        let stream = [hello(), open(0, POLICY_NONE, None)].concat();
        assert_eq!(
            first.on_client_bytes_at(&stream, now, wall).unwrap().len(),
            2
        );
        let mut second = guard_with(shared);
        let rejection = second.on_client_bytes_at(&stream, now, wall).unwrap_err();
        assert_eq!(rejection.kind, "opcua_open_rate_limited");
        assert_eq!(rejection.status, 0x807D_0000);
        assert_eq!(
            rejection.reason,
            "OpenSecureChannel from 192.0.2.1 exceeds 1 requests per second, burst 1"
        );
        assert_eq!(
            &rejection.error_message[8..12],
            &0x807D_0000u32.to_le_bytes()
        );
    }

    #[test]
    fn renewal_with_other_certificate_is_rejected() {
        let mut guard = guard_with(limiter(10, 10, 16));
        let stream = [hello(), open(0, POLICY_NONE, Some(b"first"))].concat();
        guard.on_client_bytes(&stream).unwrap();
        let rejection = guard
            .on_client_bytes(&open(5, POLICY_NONE, Some(b"second")))
            .unwrap_err();
        assert_eq!(rejection.kind, "opcua_certificate_changed");
        assert_eq!(rejection.status, 0x8013_0000);
        assert_eq!(
            rejection.reason,
            "renewal of channel 5 presents another SenderCertificate"
        );
    }

    #[test]
    fn certificate_rejection_hides_detail_from_client() {
        let mut guard = guard_with(limiter(10, 10, 16));
        let stream = [hello(), open(0, BASIC256SHA256, Some(b"junk"))].concat();
        let rejection = guard.on_client_bytes(&stream).unwrap_err();
        assert_eq!(rejection.kind, "opcua_certificate_invalid");
        assert_eq!(rejection.severity, Severity::High);
        assert_eq!(rejection.status, 0x8012_0000);
        assert_eq!(rejection.certificate, None);
        let reason = b"application certificate rejected";
        assert_eq!(
            &rejection.error_message[8..12],
            &0x8012_0000u32.to_le_bytes()
        );
        assert_eq!(&rejection.error_message[16..], reason);
        assert_eq!(
            rejection.reason,
            "SenderCertificate 0 is not a DER certificate: Parsing Error: NomError(Eof)"
        );
    }
}
