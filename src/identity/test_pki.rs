//! Certificates made with rcgen for unit tests: a CA, leaves signed by it
//! with chosen names and Modbus roles, and CRLs.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CustomExtension, DnType,
    IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};

/// The role extension OID as rcgen takes it.
pub const ROLE_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 50316, 802, 1];

/// DER of a UTF8String holding `role`, for roles shorter than 128 bytes.
pub fn utf8_string(role: &str) -> Vec<u8> {
    let mut der = vec![0x0c, role.len() as u8];
    der.extend_from_slice(role.as_bytes());
    der
}

pub struct TestCa {
    pub params: CertificateParams,
    pub key: KeyPair,
    pub pem: String,
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let certificate = params.self_signed(&key).unwrap();
        TestCa {
            pem: certificate.pem(),
            der: certificate.der().to_vec(),
            params,
            key,
        }
    }

    /// Signs a leaf with common name `cn`, subject alternative names `sans`
    /// and, when given, the raw value of a role extension.
    pub fn leaf(&self, cn: &str, sans: &[&str], role_value: Option<Vec<u8>>, serial: u64) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans.iter().map(|name| san_of(name)).collect();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        ];
        if let Some(value) = role_value {
            params
                .custom_extensions
                .push(CustomExtension::from_oid_content(ROLE_OID, value));
        }
        self.sign(params)
    }

    /// Signs a leaf with common name `cn` that expired a day ago.
    pub fn expired_leaf(&self, cn: &str) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(3);
        params.not_after = now - time::Duration::days(1);
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let certificate = params.signed_by(&key, &issuer).unwrap();
        Leaf {
            pem: certificate.pem(),
            der: certificate.der().to_vec(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }

    /// Returns a CRL in PEM that revokes `serials`, valid from one hour ago
    /// until `next_update_in` from now, which may be negative.
    pub fn crl(&self, serials: &[u64], next_update_in: time::Duration) -> String {
        let now = time::OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::hours(1),
            next_update: now + next_update_in,
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|&serial| RevokedCertParams {
                    serial_number: SerialNumber::from(serial),
                    revocation_time: now - time::Duration::minutes(30),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let issuer = Issuer::from_params(&self.params, &self.key);
        params.signed_by(&issuer).unwrap().pem().unwrap()
    }
}

/// Returns an IP address, a URI (it contains `:`) or a DNS name entry.
fn san_of(name: &str) -> SanType {
    if let Ok(address) = name.parse() {
        SanType::IpAddress(address)
    } else if name.contains(':') {
        SanType::URI(name.try_into().unwrap())
    } else {
        SanType::DnsName(name.try_into().unwrap())
    }
}

pub struct Leaf {
    pub pem: String,
    pub der: Vec<u8>,
    pub key_pem: String,
    pub key_der: Vec<u8>,
}
