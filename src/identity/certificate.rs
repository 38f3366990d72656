//! Vendor identity on MODBUS/TCP Security listeners: the fields of a peer's
//! leaf certificate that rules match on (subject CN, SANs, SHA-256
//! fingerprint, Modbus role), and the per-vendor matchers over them.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::Oid;
use x509_parser::prelude::FromDer;

/// The role extension of the MODBUS/TCP Security specification,
/// 1.3.6.1.4.1.50316.802.1, DER-encoded.
const ROLE_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 50316, 802, 1];
/// DER tag of an ASN.1 UTF8String.
const UTF8_STRING_TAG: u8 = 0x0c;

/// The identity fields of one certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateIdentity {
    /// The first common name of the subject.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_cn: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<IpAddr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub uris: Vec<String>,
    /// Lowercase hex SHA-256 of the DER certificate.
    pub sha256: String,
    /// The Modbus role; absent when the certificate has no role extension.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// End of validity, in seconds since the Unix epoch.
    #[serde(skip)]
    pub not_after: i64,
}

/// A certificate whose identity cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid certificate: {0}")]
    Invalid(String),
    #[error("malformed Modbus role extension: {0}")]
    MalformedRole(&'static str),
}

impl CertificateIdentity {
    /// Reads the identity fields of a DER certificate. A role extension that
    /// is not exactly one DER UTF8String, or that appears twice, is an error:
    /// the certificate must then be rejected, not treated as role-less.
    pub fn from_der(der: &[u8]) -> Result<CertificateIdentity, IdentityError> {
        let (rest, certificate) = X509Certificate::from_der(der)
            .map_err(|error| IdentityError::Invalid(error.to_string()))?;
        if !rest.is_empty() {
            return Err(IdentityError::Invalid(format!(
                "{} bytes after the certificate",
                rest.len()
            )));
        }
        let subject_cn = certificate
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let mut identity = CertificateIdentity {
            subject_cn,
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            uris: Vec::new(),
            sha256: hex::encode(Sha256::digest(der)),
            role: role_of(&certificate)?,
            not_after: certificate.validity().not_after.timestamp(),
        };
        let names = certificate
            .subject_alternative_name()
            .map_err(|error| IdentityError::Invalid(error.to_string()))?;
        for name in names.iter().flat_map(|san| &san.value.general_names) {
            match name {
                GeneralName::DNSName(dns) => identity.dns_names.push(dns.to_ascii_lowercase()),
                GeneralName::URI(uri) => identity.uris.push((*uri).to_owned()),
                GeneralName::IPAddress(bytes) => {
                    if let Some(address) = ip_from_bytes(bytes) {
                        identity.ip_addresses.push(address);
                    }
                }
                _ => {}
            }
        }
        Ok(identity)
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn role_of(certificate: &X509Certificate<'_>) -> Result<Option<String>, IdentityError> {
    let oid = Oid::from(ROLE_OID).expect("the role OID is valid");
    let mut found = certificate
        .iter_extensions()
        .filter(|extension| extension.oid == oid);
    let Some(extension) = found.next() else {
        return Ok(None);
    };
    if found.next().is_some() {
        return Err(IdentityError::MalformedRole("extension appears twice"));
    }
    parse_role(extension.value).map(Some)
}

/// Parses the extension value: one DER UTF8String holding a non-empty role.
fn parse_role(value: &[u8]) -> Result<String, IdentityError> {
    let (&tag, rest) = value
        .split_first()
        .ok_or(IdentityError::MalformedRole("empty value"))?;
    if tag != UTF8_STRING_TAG {
        return Err(IdentityError::MalformedRole("not a UTF8String"));
    }
    let (&first, rest) = rest
        .split_first()
        .ok_or(IdentityError::MalformedRole("missing length"))?;
    let (length, content) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81 if rest.first().is_some_and(|&n| n >= 0x80) => (usize::from(rest[0]), &rest[1..]),
        0x82 if rest.len() >= 2 && rest[0] != 0 => (
            usize::from(u16::from_be_bytes([rest[0], rest[1]])),
            &rest[2..],
        ),
        _ => return Err(IdentityError::MalformedRole("invalid length")),
    };
    if content.len() != length {
        return Err(IdentityError::MalformedRole(
            "length does not match the value",
        ));
    }
    let role = std::str::from_utf8(content)
        .map_err(|_| IdentityError::MalformedRole("not valid UTF-8"))?;
    if role.trim().is_empty() {
        return Err(IdentityError::MalformedRole("empty role"));
    }
    Ok(role.to_owned())
}

/// Returns whether `text` matches `pattern`, where `*` stands for any run of
/// characters, including none. Both are compared ASCII case-insensitively.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let pattern = pattern.as_bytes();
    let text = text.as_bytes();
    let (mut p, mut t) = (0, 0);
    // The position after the last star and the text position it resumes at.
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            p += 1;
            backtrack = Some((p, t));
        } else if p < pattern.len() && pattern[p].eq_ignore_ascii_case(&text[t]) {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = backtrack {
            p = star_p;
            t = star_t + 1;
            backtrack = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&byte| byte == b'*')
}

/// Returns whether some string matches both glob patterns. A star of one
/// pattern may absorb any part of the other, stars included.
pub fn globs_intersect(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    // reachable[j] after row i: a[i..] and b[j..] can match a common string.
    let mut next = vec![false; b.len() + 1];
    for i in (0..=a.len()).rev() {
        let mut row = vec![false; b.len() + 1];
        for j in (0..=b.len()).rev() {
            row[j] = match (a.get(i), b.get(j)) {
                (None, None) => true,
                (Some(b'*'), _) => next[j] || (j < b.len() && row[j + 1]),
                (_, Some(b'*')) => row[j + 1] || (i < a.len() && next[j]),
                (Some(x), Some(y)) => x.eq_ignore_ascii_case(y) && next[j + 1],
                _ => false,
            };
        }
        next = row;
    }
    next[0]
}

/// One entry of `certificate_san`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SanPattern {
    /// A DNS name glob, such as `*.acme.example`.
    Dns(String),
    Ip(IpAddr),
    /// A URI, compared exactly.
    Uri(String),
}

impl SanPattern {
    /// Parses an entry: an IP address, a URI (it contains `:`), or else a
    /// DNS name glob.
    pub fn parse(text: &str) -> SanPattern {
        if let Ok(address) = text.parse::<IpAddr>() {
            SanPattern::Ip(address)
        } else if text.contains(':') {
            SanPattern::Uri(text.to_owned())
        } else {
            SanPattern::Dns(text.to_ascii_lowercase())
        }
    }

    fn matches(&self, identity: &CertificateIdentity) -> bool {
        match self {
            SanPattern::Dns(pattern) => identity
                .dns_names
                .iter()
                .any(|name| glob_matches(pattern, name)),
            SanPattern::Ip(address) => identity.ip_addresses.contains(address),
            SanPattern::Uri(uri) => identity.uris.iter().any(|candidate| candidate == uri),
        }
    }

    /// Returns whether one certificate SAN entry can match both patterns.
    fn intersects(&self, other: &SanPattern) -> bool {
        match (self, other) {
            (SanPattern::Dns(a), SanPattern::Dns(b)) => globs_intersect(a, b),
            (SanPattern::Ip(a), SanPattern::Ip(b)) => a == b,
            (SanPattern::Uri(a), SanPattern::Uri(b)) => a == b,
            // A certificate can carry a DNS name and an IP address at once.
            _ => true,
        }
    }
}

impl fmt::Display for SanPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SanPattern::Dns(name) => f.write_str(name),
            SanPattern::Ip(address) => write!(f, "{address}"),
            SanPattern::Uri(uri) => f.write_str(uri),
        }
    }
}

/// The certificate matchers of one vendor. Every kind that lists entries
/// must match, and within a kind any one entry is enough: a vendor with
/// `certificate_cn = ["acme-*"]` and `modbus_role = ["Operator"]` takes only
/// certificates with both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateMatchers {
    pub cn: Vec<String>,
    pub san: Vec<SanPattern>,
    /// Lowercase hex fingerprints without colons.
    pub sha256: Vec<String>,
    pub roles: Vec<String>,
}

impl CertificateMatchers {
    pub fn is_empty(&self) -> bool {
        self.cn.is_empty() && self.san.is_empty() && self.sha256.is_empty() && self.roles.is_empty()
    }

    /// Returns whether the certificate satisfies every kind of matcher that
    /// has entries. Empty matchers match nothing.
    pub fn matches(&self, identity: &CertificateIdentity) -> bool {
        if self.is_empty() {
            return false;
        }
        let cn = self.cn.is_empty()
            || identity
                .subject_cn
                .as_deref()
                .is_some_and(|cn| self.cn.iter().any(|pattern| glob_matches(pattern, cn)));
        let san = self.san.is_empty() || self.san.iter().any(|pattern| pattern.matches(identity));
        let sha256 = self.sha256.is_empty() || self.sha256.contains(&identity.sha256);
        let role = self.roles.is_empty()
            || identity
                .role
                .as_ref()
                .is_some_and(|role| self.roles.contains(role));
        cn && san && sha256 && role
    }

    /// Returns the matcher kinds both vendors list, when for each of them an
    /// entry of one and an entry of the other can match one certificate.
    /// Returns `None` when a shared kind rules out a common certificate.
    pub fn shared_kinds(&self, other: &CertificateMatchers) -> Option<Vec<&'static str>> {
        let mut shared = Vec::new();
        if !self.cn.is_empty() && !other.cn.is_empty() {
            let any = self
                .cn
                .iter()
                .any(|a| other.cn.iter().any(|b| globs_intersect(a, b)));
            if !any {
                return None;
            }
            shared.push("certificate_cn");
        }
        if !self.san.is_empty() && !other.san.is_empty() {
            let any = self
                .san
                .iter()
                .any(|a| other.san.iter().any(|b| a.intersects(b)));
            if !any {
                return None;
            }
            shared.push("certificate_san");
        }
        if !self.sha256.is_empty() && !other.sha256.is_empty() {
            if !self.sha256.iter().any(|a| other.sha256.contains(a)) {
                return None;
            }
            shared.push("certificate_sha256");
        }
        if !self.roles.is_empty() && !other.roles.is_empty() {
            if !self.roles.iter().any(|a| other.roles.contains(a)) {
                return None;
            }
            shared.push("modbus_role");
        }
        Some(shared)
    }
}

/// Parses a SHA-256 fingerprint written as 64 hex digits, with or without
/// colons between bytes; returns it lowercase without colons.
pub fn parse_fingerprint(text: &str) -> Option<String> {
    let digits: String = text.chars().filter(|&c| c != ':').collect();
    (digits.len() == 64 && digits.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| digits.to_ascii_lowercase())
}

#[cfg(test)]
mod tests;
