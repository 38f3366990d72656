//! Trust decision on the client application certificate of an OPC UA
//! OpenSecureChannel request: chain to a configured CA, CRL revocation,
//! validity period and the key the security policy needs. Chain, signature
//! and CRL checks are rustls-webpki's; x509-parser only reads the names,
//! key size and validity that events and the policy check need.
//!
//! A `TrustStore` is immutable and built from files; on reload the caller
//! builds a new one and swaps it in whole.

use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, TrustAnchor, UnixTime};
use sha1::{Digest, Sha1};
use thiserror::Error;
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, ExtendedKeyUsageValidator,
    KeyPurposeIdIter, OwnedCertRevocationList, RevocationCheckDepth, RevocationOptionsBuilder,
    UnknownStatusPolicy,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::public_key::PublicKey;

use super::framing::status;

/// Most certificates the SenderCertificate chain may hold, leaf included.
pub const MAX_CHAIN_LEN: usize = 8;

/// Security policies of OPC 10000-7 that the gateway supports, by URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecurityPolicy {
    None,
    Basic128Rsa15,
    Basic256,
    Basic256Sha256,
    Aes128Sha256RsaOaep,
    Aes256Sha256RsaPss,
}

const POLICY_URI_PREFIX: &str = "http://opcfoundation.org/UA/SecurityPolicy#";

impl SecurityPolicy {
    /// Parses a SecurityPolicyUri; `None` for policies the gateway does not
    /// support, the ECC policies among them.
    pub fn from_uri(uri: &str) -> Option<Self> {
        Some(match uri.strip_prefix(POLICY_URI_PREFIX)? {
            "None" => SecurityPolicy::None,
            "Basic128Rsa15" => SecurityPolicy::Basic128Rsa15,
            "Basic256" => SecurityPolicy::Basic256,
            "Basic256Sha256" => SecurityPolicy::Basic256Sha256,
            "Aes128_Sha256_RsaOaep" => SecurityPolicy::Aes128Sha256RsaOaep,
            "Aes256_Sha256_RsaPss" => SecurityPolicy::Aes256Sha256RsaPss,
            _ => return None,
        })
    }

    /// RSA key lengths in bits that the policy's profile allows, or `None`
    /// when it uses no certificate.
    pub fn rsa_key_bits(self) -> Option<RangeInclusive<usize>> {
        match self {
            SecurityPolicy::None => None,
            SecurityPolicy::Basic128Rsa15 | SecurityPolicy::Basic256 => Some(1024..=2048),
            SecurityPolicy::Basic256Sha256
            | SecurityPolicy::Aes128Sha256RsaOaep
            | SecurityPolicy::Aes256Sha256RsaPss => Some(2048..=4096),
        }
    }
}

/// Identity of a client application certificate, as events record it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// SHA-1 of the DER certificate: the OPC UA CertificateDigest.
    pub thumbprint: [u8; 20],
    /// Subject distinguished name, RFC 4514 style.
    pub subject: String,
    /// The first URI of the subjectAltName: the ApplicationUri.
    pub application_uri: Option<String>,
    /// Validity period in seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

impl CertificateInfo {
    /// Returns the thumbprint as lowercase hex.
    pub fn thumbprint_hex(&self) -> String {
        hex::encode(self.thumbprint)
    }
}

/// Cause of a certificate rejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The OPN names a policy the gateway does not support.
    PolicyUnsupported,
    /// A secured policy without a SenderCertificate.
    Missing,
    /// Bytes that are no X.509 certificate.
    Malformed,
    /// No chain to a configured CA.
    Untrusted,
    /// The certificate or one of its issuers is on a CRL.
    Revoked,
    /// No current CRL of an issuer: it is missing or expired.
    RevocationUnknown,
    /// The certificate is outside its validity period.
    TimeInvalid,
    /// An issuer in the chain is outside its validity period.
    IssuerTimeInvalid,
    /// A CA certificate used as the application certificate, or the reverse.
    UseNotAllowed,
    /// Not an RSA key of the size the policy needs, or a signature algorithm
    /// the gateway does not verify (SHA-1 among them).
    PolicyCheckFailed,
}

impl RejectReason {
    /// Returns the OPC UA status code of the failed check.
    pub fn status(self) -> u32 {
        match self {
            RejectReason::PolicyUnsupported => status::BAD_SECURITY_POLICY_REJECTED,
            RejectReason::Missing | RejectReason::Malformed => status::BAD_CERTIFICATE_INVALID,
            RejectReason::Untrusted => status::BAD_CERTIFICATE_UNTRUSTED,
            RejectReason::Revoked => status::BAD_CERTIFICATE_REVOKED,
            RejectReason::RevocationUnknown => status::BAD_CERTIFICATE_REVOCATION_UNKNOWN,
            RejectReason::TimeInvalid => status::BAD_CERTIFICATE_TIME_INVALID,
            RejectReason::IssuerTimeInvalid => status::BAD_CERTIFICATE_ISSUER_TIME_INVALID,
            RejectReason::UseNotAllowed => status::BAD_CERTIFICATE_USE_NOT_ALLOWED,
            RejectReason::PolicyCheckFailed => status::BAD_CERTIFICATE_POLICY_CHECK_FAILED,
        }
    }

    /// Returns the status code for the Error message to the client. OPC
    /// 10000-6 (6.7.6, version 1.05) reports an untrusted certificate as
    /// Bad_SecurityChecksFailed. The other checks report their own code.
    pub fn wire_status(self) -> u32 {
        match self {
            RejectReason::Untrusted => status::BAD_SECURITY_CHECKS_FAILED,
            other => other.status(),
        }
    }

    /// Returns the `anomaly.kind` of events about this rejection.
    pub fn kind(self) -> &'static str {
        match self {
            RejectReason::PolicyUnsupported => "opcua_security_policy_rejected",
            RejectReason::Missing | RejectReason::Malformed => "opcua_certificate_invalid",
            RejectReason::Untrusted => "opcua_certificate_untrusted",
            RejectReason::Revoked => "opcua_certificate_revoked",
            RejectReason::RevocationUnknown => "opcua_certificate_revocation_unknown",
            RejectReason::TimeInvalid | RejectReason::IssuerTimeInvalid => {
                "opcua_certificate_time_invalid"
            }
            RejectReason::UseNotAllowed => "opcua_certificate_use_not_allowed",
            RejectReason::PolicyCheckFailed => "opcua_certificate_policy_check_failed",
        }
    }
}

/// A rejected client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{detail}")]
pub struct CertificateRejection {
    pub reason: RejectReason,
    /// Description of the failure with the value, for events and logs and
    /// never for the client.
    pub detail: String,
    /// Present when the certificate could be parsed.
    pub certificate: Option<CertificateInfo>,
}

/// A CA or CRL file that could not be loaded.
#[derive(Debug, Error)]
pub enum TrustError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {object} and is not DER")]
    Empty { path: PathBuf, object: &'static str },
    #[error("{path} holds an invalid {object}: {detail}")]
    Invalid {
        path: PathBuf,
        object: &'static str,
        detail: String,
    },
}

/// The CA bundle and CRLs one OPC UA listener trusts.
pub struct TrustStore {
    anchors: Vec<TrustAnchor<'static>>,
    crls: Vec<CertRevocationList<'static>>,
}

impl fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustStore")
            .field("anchors", &self.anchors.len())
            .field("crls", &self.crls.len())
            .finish()
    }
}

/// Accepts every extended key usage, and none. OPC UA application
/// certificates often lack clientAuth, and OPC 10000-6 does not require it.
struct AnyExtendedKeyUsage;

impl ExtendedKeyUsageValidator for AnyExtendedKeyUsage {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        // Still reject a malformed extension.
        for purpose in iter {
            purpose?;
        }
        Ok(())
    }
}

impl TrustStore {
    /// Loads CA certificates and CRLs, each file PEM (any number of blocks)
    /// or a single DER object.
    pub fn load(
        ca_files: &[impl AsRef<Path>],
        crl_files: &[impl AsRef<Path>],
    ) -> Result<Self, TrustError> {
        let invalid = |path: &Path, object, detail| TrustError::Invalid {
            path: path.to_path_buf(),
            object,
            detail,
        };
        let mut anchors = Vec::new();
        for path in ca_files.iter().map(AsRef::as_ref) {
            for der in read_objects::<CertificateDer<'static>>(path, "certificate")? {
                anchors.push(anchor(&der).map_err(|detail| invalid(path, "certificate", detail))?);
            }
        }
        let mut crls = Vec::new();
        for path in crl_files.iter().map(AsRef::as_ref) {
            for der in read_objects::<CertificateRevocationListDer<'static>>(path, "CRL")? {
                crls.push(revocation_list(&der).map_err(|detail| invalid(path, "CRL", detail))?);
            }
        }
        Ok(TrustStore { anchors, crls })
    }

    /// Builds a store from DER objects already in memory.
    pub fn from_der(
        cas: &[CertificateDer<'_>],
        crls: &[CertificateRevocationListDer<'_>],
    ) -> Result<Self, String> {
        let anchors = cas.iter().map(anchor).collect::<Result<_, _>>()?;
        let crls = crls.iter().map(revocation_list).collect::<Result<_, _>>()?;
        Ok(TrustStore { anchors, crls })
    }

    /// Decides on the SenderCertificate of an OPN at wall-clock time `now`.
    /// Policy None needs no certificate and returns `Ok(None)`.
    pub fn verify(
        &self,
        security_policy_uri: &str,
        sender_certificate: Option<&[u8]>,
        now: SystemTime,
    ) -> Result<Option<CertificateInfo>, CertificateRejection> {
        let reject =
            |reason, detail: String, certificate: Option<&CertificateInfo>| CertificateRejection {
                reason,
                detail,
                certificate: certificate.cloned(),
            };
        let Some(policy) = SecurityPolicy::from_uri(security_policy_uri) else {
            return Err(reject(
                RejectReason::PolicyUnsupported,
                format!("security policy {security_policy_uri} is not supported"),
                None,
            ));
        };
        let Some(key_bits) = policy.rsa_key_bits() else {
            return Ok(None);
        };
        let chain = sender_certificate
            .filter(|chain| !chain.is_empty())
            .ok_or_else(|| {
                reject(
                    RejectReason::Missing,
                    format!("{security_policy_uri} request without SenderCertificate"),
                    None,
                )
            })?;
        let (leaf, intermediates) =
            split_chain(chain).map_err(|detail| reject(RejectReason::Malformed, detail, None))?;
        let (info, leaf_time_valid) = inspect(leaf, &key_bits, now)
            .map_err(|(reason, detail, info)| reject(reason, detail, info.as_ref()))?;
        self.verify_chain(leaf, &intermediates, now)
            .map_err(|error| {
                let reason = match classify(&error) {
                    RejectReason::TimeInvalid if leaf_time_valid => RejectReason::IssuerTimeInvalid,
                    reason => reason,
                };
                reject(
                    reason,
                    format!("certificate chain check failed: {error}"),
                    Some(&info),
                )
            })?;
        Ok(Some(info))
    }

    fn verify_chain(
        &self,
        leaf: &[u8],
        intermediates: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<(), webpki::Error> {
        let leaf = CertificateDer::from(leaf);
        let end_entity = EndEntityCert::try_from(&leaf)?;
        let since_epoch = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let crls: Vec<&CertRevocationList<'_>> = self.crls.iter().collect();
        // Without CRLs nothing is checked for revocation. With CRLs, every
        // issuer in the chain needs a current one, as OPC 10000-4 (6.1.3)
        // reports a missing list as Bad_CertificateRevocationUnknown.
        let revocation = RevocationOptionsBuilder::new(&crls).ok().map(|builder| {
            builder
                .with_depth(RevocationCheckDepth::Chain)
                .with_status_policy(UnknownStatusPolicy::Deny)
                .with_expiration_policy(ExpirationPolicy::Enforce)
                .build()
        });
        end_entity.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.anchors,
            intermediates,
            UnixTime::since_unix_epoch(since_epoch),
            AnyExtendedKeyUsage,
            revocation,
            None,
        )?;
        Ok(())
    }
}

/// Reads every PEM object of type `T` from `path`, or the whole file as one
/// DER object when it holds no PEM block.
fn read_objects<T>(path: &Path, object: &'static str) -> Result<Vec<T>, TrustError>
where
    T: PemObject + From<Vec<u8>>,
{
    let contents = std::fs::read(path).map_err(|source| TrustError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !contents.starts_with(b"-----") && !contents.is_empty() && contents[0] == 0x30 {
        return Ok(vec![T::from(contents)]);
    }
    let objects: Result<Vec<T>, _> = T::pem_slice_iter(&contents).collect();
    let objects = objects.map_err(|error| TrustError::Invalid {
        path: path.to_path_buf(),
        object,
        detail: error.to_string(),
    })?;
    if objects.is_empty() {
        return Err(TrustError::Empty {
            path: path.to_path_buf(),
            object,
        });
    }
    Ok(objects)
}

fn anchor(der: &CertificateDer<'_>) -> Result<TrustAnchor<'static>, String> {
    webpki::anchor_from_trusted_cert(der)
        .map(|anchor| anchor.to_owned())
        .map_err(|error| error.to_string())
}

fn revocation_list(
    der: &CertificateRevocationListDer<'_>,
) -> Result<CertRevocationList<'static>, String> {
    OwnedCertRevocationList::from_der(der)
        .map(CertRevocationList::from)
        .map_err(|error| error.to_string())
}

/// Splits a SenderCertificate into the leaf DER and the chain after it.
fn split_chain(chain: &[u8]) -> Result<(&[u8], Vec<CertificateDer<'_>>), String> {
    let mut rest = chain;
    let mut certificates = Vec::new();
    while !rest.is_empty() {
        if certificates.len() == MAX_CHAIN_LEN {
            return Err(format!(
                "SenderCertificate chain holds more than {MAX_CHAIN_LEN} certificates"
            ));
        }
        let (tail, _) = x509_parser::parse_x509_certificate(rest).map_err(|error| {
            format!(
                "SenderCertificate {} is not a DER certificate: {error}",
                certificates.len()
            )
        })?;
        certificates.push(&rest[..rest.len() - tail.len()]);
        rest = tail;
    }
    let leaf = certificates[0];
    let intermediates = certificates[1..]
        .iter()
        .map(|der| CertificateDer::from(*der))
        .collect();
    Ok((leaf, intermediates))
}

type Inspected = (CertificateInfo, bool);
type InspectError = (RejectReason, String, Option<CertificateInfo>);

/// Reads what events need from the leaf and checks its key against the
/// policy. Returns whether the leaf itself is within its validity period,
/// which separates a leaf's time error from an issuer's.
fn inspect(
    leaf: &[u8],
    key_bits: &RangeInclusive<usize>,
    now: SystemTime,
) -> Result<Inspected, InspectError> {
    let (_, certificate) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|error| (RejectReason::Malformed, error.to_string(), None))?;
    let info = certificate_info(leaf, &certificate);
    let key = certificate.public_key().parsed();
    let bits = match key {
        Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
        _ => {
            let algorithm = certificate.public_key().algorithm.algorithm.to_id_string();
            return Err((
                RejectReason::PolicyCheckFailed,
                format!("certificate key algorithm {algorithm} is not RSA"),
                Some(info),
            ));
        }
    };
    if !key_bits.contains(&bits) {
        return Err((
            RejectReason::PolicyCheckFailed,
            format!(
                "RSA key of {bits} bits is outside {}-{} bits",
                key_bits.start(),
                key_bits.end()
            ),
            Some(info),
        ));
    }
    let seconds = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        });
    let time_valid = (info.not_before..=info.not_after).contains(&seconds);
    Ok((info, time_valid))
}

fn certificate_info(der: &[u8], certificate: &X509Certificate<'_>) -> CertificateInfo {
    let application_uri = certificate
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::URI(uri) => Some((*uri).to_string()),
                _ => None,
            })
        });
    CertificateInfo {
        thumbprint: Sha1::digest(der).into(),
        subject: certificate.subject().to_string(),
        application_uri,
        not_before: certificate.validity().not_before.timestamp(),
        not_after: certificate.validity().not_after.timestamp(),
    }
}

/// Maps a webpki error to the OPC UA check that failed.
fn classify(error: &webpki::Error) -> RejectReason {
    use webpki::Error as E;
    match error {
        E::CertRevoked => RejectReason::Revoked,
        E::CrlExpired { .. } | E::UnknownRevocationStatus | E::IssuerNotCrlSigner => {
            RejectReason::RevocationUnknown
        }
        E::CertExpired { .. } | E::CertNotValidYet { .. } => RejectReason::TimeInvalid,
        E::CaUsedAsEndEntity | E::EndEntityUsedAsCa => RejectReason::UseNotAllowed,
        E::BadDer
        | E::BadDerTime
        | E::InvalidCertValidity
        | E::InvalidSerialNumber
        | E::MalformedExtensions
        | E::ExtensionValueInvalid
        | E::EmptyEkuExtension
        | E::TrailingData(_)
        | E::UnsupportedCertVersion
        | E::UnsupportedCriticalExtension => RejectReason::Malformed,
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => RejectReason::PolicyCheckFailed,
        _ => RejectReason::Untrusted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        date_time_ymd, BasicConstraints, CertificateParams, CertificateRevocationListParams,
        DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
        RevokedCertParams, SanType, SerialNumber,
    };
    use std::sync::OnceLock;

    const BASIC256SHA256: &str = "http://opcfoundation.org/UA/SecurityPolicy#Basic256Sha256";
    const NONE: &str = "http://opcfoundation.org/UA/SecurityPolicy#None";

    /// Returns 2026-06-01T00:00:00Z, inside every validity period below
    /// unless a test sets another.
    fn june_2026() -> SystemTime {
        at(1_780_272_000)
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    /// Returns one shared RSA key for every leaf, because generating RSA
    /// keys is slow.
    fn rsa_key() -> KeyPair {
        static PEM: OnceLock<String> = OnceLock::new();
        let pem = PEM.get_or_init(|| {
            KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
                .unwrap()
                .serialize_pem()
        });
        KeyPair::from_pem(pem).unwrap()
    }

    struct Authority {
        der: CertificateDer<'static>,
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca_params(name: &str, years: (i32, i32)) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = date_time_ymd(years.0, 1, 1);
        params.not_after = date_time_ymd(years.1, 1, 1);
        params
    }

    fn root(name: &str) -> Authority {
        let params = ca_params(name, (2024, 2034));
        let key = KeyPair::generate().unwrap();
        let certificate = params.self_signed(&key).unwrap();
        Authority {
            der: certificate.der().clone(),
            pem: certificate.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn intermediate(parent: &Authority, years: (i32, i32)) -> Authority {
        let params = ca_params("acme intermediate", years);
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &parent.issuer).unwrap();
        Authority {
            der: certificate.der().clone(),
            pem: certificate.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf_params(serial: u64) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "acme-hmi");
        params.subject_alt_names = vec![
            SanType::URI("urn:acme:hmi".try_into().unwrap()),
            SanType::DnsName("hmi.acme.example".try_into().unwrap()),
        ];
        params.serial_number = Some(SerialNumber::from(serial));
        params.not_before = date_time_ymd(2025, 1, 1);
        params.not_after = date_time_ymd(2028, 1, 1);
        params
    }

    fn leaf(authority: &Authority, params: CertificateParams) -> Vec<u8> {
        params
            .signed_by(&rsa_key(), &authority.issuer)
            .unwrap()
            .der()
            .to_vec()
    }

    fn crl(
        authority: &Authority,
        revoked: &[u64],
        next_update_year: i32,
    ) -> CertificateRevocationListDer<'static> {
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2025, 6, 1),
            next_update: date_time_ymd(next_update_year, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from(*serial),
                    revocation_time: date_time_ymd(2025, 6, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&authority.issuer).unwrap().der().clone()
    }

    fn store(
        authorities: &[&Authority],
        crls: &[CertificateRevocationListDer<'static>],
    ) -> TrustStore {
        let cas: Vec<_> = authorities
            .iter()
            .map(|authority| authority.der.clone())
            .collect();
        TrustStore::from_der(&cas, crls).unwrap()
    }

    fn rejection(store: &TrustStore, chain: &[u8], now: SystemTime) -> CertificateRejection {
        store
            .verify(BASIC256SHA256, Some(chain), now)
            .expect_err("certificate must be rejected")
    }

    fn assert_reason(found: &CertificateRejection, reason: RejectReason, status: u32) {
        assert_eq!(found.reason, reason, "{}", found.detail);
        assert_eq!(found.reason.status(), status);
    }

    #[test]
    fn certificate_of_trusted_ca_is_accepted_with_info() {
        let ca = root("acme CA");
        let der = leaf(&ca, leaf_params(10));
        let info = store(&[&ca], &[])
            .verify(BASIC256SHA256, Some(&der), june_2026())
            .unwrap()
            .unwrap();
        let digest: [u8; 20] = Sha1::digest(&der).into();
        assert_eq!(info.thumbprint, digest);
        assert_eq!(info.thumbprint_hex().len(), 40);
        assert_eq!(info.subject, "CN=acme-hmi");
        assert_eq!(info.application_uri.as_deref(), Some("urn:acme:hmi"));
        // 2025-01-01 and 2028-01-01 at midnight UTC.
        assert_eq!(
            (info.not_before, info.not_after),
            (1_735_689_600, 1_830_297_600)
        );
    }

    #[test]
    fn chain_through_intermediate_is_accepted() {
        let ca = root("acme CA");
        let sub = intermediate(&ca, (2025, 2030));
        let chain = [leaf(&sub, leaf_params(11)), sub.der.to_vec()].concat();
        let verified = store(&[&ca], &[]).verify(BASIC256SHA256, Some(&chain), june_2026());
        assert!(verified.unwrap().is_some());
    }

    #[test]
    fn missing_intermediate_is_untrusted() {
        let ca = root("acme CA");
        let sub = intermediate(&ca, (2025, 2030));
        let found = rejection(
            &store(&[&ca], &[]),
            &leaf(&sub, leaf_params(12)),
            june_2026(),
        );
        assert_reason(&found, RejectReason::Untrusted, 0x801A_0000);
        assert_eq!(found.reason.wire_status(), 0x8013_0000);
        assert_eq!(found.reason.kind(), "opcua_certificate_untrusted");
        assert_eq!(found.certificate.unwrap().subject, "CN=acme-hmi");
    }

    #[test]
    fn certificate_of_other_ca_is_untrusted() {
        let ours = root("acme CA");
        let theirs = root("other CA");
        let found = rejection(
            &store(&[&ours], &[]),
            &leaf(&theirs, leaf_params(13)),
            june_2026(),
        );
        assert_reason(&found, RejectReason::Untrusted, 0x801A_0000);
    }

    #[test]
    fn certificate_outside_validity_is_time_invalid() {
        let ca = root("acme CA");
        let der = leaf(&ca, leaf_params(14));
        let store = store(&[&ca], &[]);
        // 2029-01-01 is after, 2024-06-01 before the 2025-2028 period.
        for now in [at(1_861_920_000), at(1_717_200_000)] {
            let found = rejection(&store, &der, now);
            assert_reason(&found, RejectReason::TimeInvalid, 0x8014_0000);
            assert_eq!(found.reason.wire_status(), 0x8014_0000);
            assert_eq!(found.reason.kind(), "opcua_certificate_time_invalid");
        }
    }

    #[test]
    fn expired_intermediate_is_issuer_time_invalid() {
        let ca = root("acme CA");
        let sub = intermediate(&ca, (2024, 2026));
        let chain = [leaf(&sub, leaf_params(15)), sub.der.to_vec()].concat();
        let found = rejection(&store(&[&ca], &[]), &chain, june_2026());
        assert_reason(&found, RejectReason::IssuerTimeInvalid, 0x8015_0000);
    }

    #[test]
    fn certificate_on_crl_is_revoked() {
        let ca = root("acme CA");
        let der = leaf(&ca, leaf_params(16));
        let revoked = store(&[&ca], &[crl(&ca, &[3, 16], 2027)]);
        let found = rejection(&revoked, &der, june_2026());
        assert_reason(&found, RejectReason::Revoked, 0x801D_0000);
        assert_eq!(found.reason.wire_status(), 0x801D_0000);
        assert_eq!(found.reason.kind(), "opcua_certificate_revoked");
        let other = store(&[&ca], &[crl(&ca, &[3], 2027)]);
        assert!(other
            .verify(BASIC256SHA256, Some(&der), june_2026())
            .is_ok());
    }

    #[test]
    fn expired_crl_makes_revocation_unknown() {
        let ca = root("acme CA");
        let der = leaf(&ca, leaf_params(17));
        // The CRL's next update, 2026-01-01, lies before June 2026.
        let found = rejection(&store(&[&ca], &[crl(&ca, &[], 2026)]), &der, june_2026());
        assert_reason(&found, RejectReason::RevocationUnknown, 0x801B_0000);
    }

    #[test]
    fn issuer_without_crl_makes_revocation_unknown_once_crls_are_configured() {
        let ca = root("acme CA");
        let other = root("other CA");
        let der = leaf(&ca, leaf_params(18));
        let found = rejection(
            &store(&[&ca, &other], &[crl(&other, &[], 2027)]),
            &der,
            june_2026(),
        );
        assert_reason(&found, RejectReason::RevocationUnknown, 0x801B_0000);
    }

    #[test]
    fn malformed_certificates_are_invalid() {
        let ca = root("acme CA");
        let store = store(&[&ca], &[]);
        let der = leaf(&ca, leaf_params(19));
        let trailing = [der.clone(), vec![0x01, 0x02]].concat();
        for bytes in [&b"not a certificate"[..], &der[..der.len() - 1], &trailing] {
            let found = rejection(&store, bytes, june_2026());
            assert_reason(&found, RejectReason::Malformed, 0x8012_0000);
            assert_eq!(found.reason.kind(), "opcua_certificate_invalid");
        }
    }

    #[test]
    fn missing_certificate_is_invalid_for_secured_policy() {
        let ca = root("acme CA");
        let found = store(&[&ca], &[])
            .verify(BASIC256SHA256, None, june_2026())
            .unwrap_err();
        assert_reason(&found, RejectReason::Missing, 0x8012_0000);
    }

    #[test]
    fn non_rsa_key_fails_policy_check() {
        let ca = root("acme CA");
        let ec_key = KeyPair::generate().unwrap();
        let der = leaf_params(20)
            .signed_by(&ec_key, &ca.issuer)
            .unwrap()
            .der()
            .to_vec();
        let found = rejection(&store(&[&ca], &[]), &der, june_2026());
        assert_reason(&found, RejectReason::PolicyCheckFailed, 0x8114_0000);
        assert_eq!(
            found.detail,
            "certificate key algorithm 1.2.840.10045.2.1 is not RSA"
        );
    }

    #[test]
    fn policy_none_needs_no_certificate() {
        let ca = root("acme CA");
        let store = store(&[&ca], &[]);
        assert_eq!(store.verify(NONE, None, june_2026()), Ok(None));
        assert_eq!(store.verify(NONE, Some(b"junk"), june_2026()), Ok(None));
    }

    #[test]
    fn unknown_policy_is_rejected() {
        let ca = root("acme CA");
        let uri = "http://opcfoundation.org/UA/SecurityPolicy#ECC_nistP256";
        let found = store(&[&ca], &[])
            .verify(uri, None, june_2026())
            .unwrap_err();
        assert_reason(&found, RejectReason::PolicyUnsupported, 0x8055_0000);
        assert_eq!(found.reason.kind(), "opcua_security_policy_rejected");
    }

    #[test]
    fn extended_key_usage_is_not_required() {
        let ca = root("acme CA");
        let store = store(&[&ca], &[]);
        let mut server_only = leaf_params(21);
        server_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let mut both = leaf_params(22);
        both.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        for params in [server_only, both] {
            let der = leaf(&ca, params);
            assert!(store
                .verify(BASIC256SHA256, Some(&der), june_2026())
                .is_ok());
        }
    }

    #[test]
    fn chain_length_is_bounded() {
        let ca = root("acme CA");
        let der = leaf(&ca, leaf_params(23));
        let chain = der.repeat(MAX_CHAIN_LEN + 1);
        let found = rejection(&store(&[&ca], &[]), &chain, june_2026());
        assert_reason(&found, RejectReason::Malformed, 0x8012_0000);
        assert_eq!(
            found.detail,
            "SenderCertificate chain holds more than 8 certificates"
        );
    }

    #[test]
    fn store_loads_pem_and_der_files() {
        let ca = root("acme CA");
        let list = crl(&ca, &[24], 2027);
        let dir = tempfile::tempdir().unwrap();
        let pem_ca = dir.path().join("ca.pem");
        let der_crl = dir.path().join("ca.crl");
        std::fs::write(&pem_ca, &ca.pem).unwrap();
        std::fs::write(&der_crl, list.as_ref()).unwrap();
        let store = TrustStore::load(&[&pem_ca], &[&der_crl]).unwrap();
        let found = rejection(&store, &leaf(&ca, leaf_params(24)), june_2026());
        assert_eq!(found.reason, RejectReason::Revoked);
    }

    #[test]
    fn store_reports_empty_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no pem here\n").unwrap();
        let none: [&Path; 0] = [];
        let error = TrustStore::load(&[&empty], &none).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "{} holds no PEM certificate and is not DER",
                empty.display()
            )
        );
        let missing = dir.path().join("missing.pem");
        let error = TrustStore::load(&[&missing], &none).unwrap_err();
        assert!(matches!(error, TrustError::Read { .. }), "{error}");
    }
}
