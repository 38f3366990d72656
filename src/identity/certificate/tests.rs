use std::path::Path;
use std::process::Command;

use super::*;
use crate::identity::test_pki::{utf8_string, TestCa};

fn identity_of(der: &[u8]) -> CertificateIdentity {
    CertificateIdentity::from_der(der).unwrap()
}

#[test]
fn identity_reads_cn_sans_fingerprint_and_role() {
    let ca = TestCa::new("vendors CA");
    let leaf = ca.leaf(
        "acme-laptop-1",
        &["laptop1.acme.example", "10.50.0.7", "urn:acme:laptop:1"],
        Some(utf8_string("Operator")),
        7,
    );
    let identity = identity_of(&leaf.der);
    assert_eq!(identity.subject_cn.as_deref(), Some("acme-laptop-1"));
    assert_eq!(identity.dns_names, vec!["laptop1.acme.example"]);
    assert_eq!(
        identity.ip_addresses,
        vec!["10.50.0.7".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(identity.uris, vec!["urn:acme:laptop:1"]);
    assert_eq!(identity.sha256, hex::encode(Sha256::digest(&leaf.der)));
    assert_eq!(identity.role.as_deref(), Some("Operator"));
}

#[test]
fn identity_without_role_extension_has_no_role() {
    let ca = TestCa::new("vendors CA");
    let leaf = ca.leaf("acme-1", &[], None, 8);
    assert_eq!(identity_of(&leaf.der).role, None);
}

#[test]
fn role_that_is_not_utf8_string_is_rejected() {
    let ca = TestCa::new("vendors CA");
    // A PrintableString (tag 0x13) in place of the UTF8String.
    let leaf = ca.leaf("acme-1", &[], Some(vec![0x13, 2, b'O', b'p']), 9);
    assert_eq!(
        CertificateIdentity::from_der(&leaf.der),
        Err(IdentityError::MalformedRole("not a UTF8String"))
    );
}

#[test]
fn role_with_wrong_length_is_rejected() {
    let ca = TestCa::new("vendors CA");
    let leaf = ca.leaf("acme-1", &[], Some(vec![0x0c, 5, b'O', b'p']), 10);
    assert_eq!(
        CertificateIdentity::from_der(&leaf.der),
        Err(IdentityError::MalformedRole(
            "length does not match the value"
        ))
    );
}

#[test]
fn role_holding_two_strings_is_rejected() {
    let mut value = utf8_string("Operator");
    value.extend(utf8_string("Engineer"));
    assert_eq!(
        parse_role(&value),
        Err(IdentityError::MalformedRole(
            "length does not match the value"
        ))
    );
}

#[test]
fn empty_role_is_rejected() {
    assert_eq!(
        parse_role(&[0x0c, 0]),
        Err(IdentityError::MalformedRole("empty role"))
    );
}

#[test]
fn long_role_uses_long_form_length() {
    let role = "R".repeat(200);
    let mut value = vec![0x0c, 0x81, 200];
    value.extend_from_slice(role.as_bytes());
    assert_eq!(parse_role(&value), Ok(role));
}

#[test]
fn glob_matches_stars_anywhere() {
    assert!(glob_matches("acme-*", "acme-laptop-1"));
    assert!(glob_matches("acme-*", "ACME-1"));
    assert!(glob_matches("*.acme.example", "a.b.acme.example"));
    assert!(glob_matches("a*c*e", "abcde"));
    assert!(glob_matches("*", ""));
    assert!(!glob_matches("acme-*", "acme"));
    assert!(!glob_matches("acme", "acme-1"));
    assert!(!glob_matches("*.acme.example", "acme.example"));
}

#[test]
fn globs_intersect_when_a_common_name_exists() {
    assert!(globs_intersect("acme-*", "acme-*"));
    assert!(globs_intersect("acme-*", "*-laptop"));
    assert!(globs_intersect("acme-1", "acme-*"));
    assert!(globs_intersect("*", "beta"));
    assert!(!globs_intersect("acme-*", "beta-*"));
    assert!(!globs_intersect("acme-1", "acme-2"));
    assert!(!globs_intersect("a*b", "c*"));
}

#[test]
fn matchers_require_every_listed_kind() {
    let ca = TestCa::new("vendors CA");
    let leaf = ca.leaf(
        "acme-1",
        &["acme1.example"],
        Some(utf8_string("Operator")),
        11,
    );
    let identity = identity_of(&leaf.der);
    let mut matchers = CertificateMatchers {
        cn: vec!["acme-*".into()],
        ..Default::default()
    };
    assert!(matchers.matches(&identity));
    matchers.roles = vec!["Engineer".into()];
    assert!(!matchers.matches(&identity));
    matchers.roles = vec!["Engineer".into(), "Operator".into()];
    assert!(matchers.matches(&identity));
    matchers.san = vec![SanPattern::parse("*.other.example")];
    assert!(!matchers.matches(&identity));
    matchers.san = vec![SanPattern::parse("*.example")];
    assert!(matchers.matches(&identity));
    matchers.sha256 = vec![identity.sha256.clone()];
    assert!(matchers.matches(&identity));
    assert!(!CertificateMatchers::default().matches(&identity));
}

#[test]
fn san_patterns_parse_by_form() {
    assert_eq!(
        SanPattern::parse("10.1.2.3"),
        SanPattern::Ip("10.1.2.3".parse().unwrap())
    );
    assert_eq!(
        SanPattern::parse("urn:acme:1"),
        SanPattern::Uri("urn:acme:1".into())
    );
    assert_eq!(
        SanPattern::parse("*.ACME.example"),
        SanPattern::Dns("*.acme.example".into())
    );
}

#[test]
fn fingerprint_accepts_colons_and_case() {
    let plain = "ab".repeat(32);
    let colons = vec!["AB"; 32].join(":");
    assert_eq!(parse_fingerprint(&colons), Some(plain.clone()));
    assert_eq!(parse_fingerprint(&plain), Some(plain));
    assert_eq!(parse_fingerprint("abcd"), None);
    assert_eq!(parse_fingerprint(&"zz".repeat(32)), None);
}

#[test]
fn shared_kinds_report_possible_overlap() {
    let cn = |patterns: &[&str]| CertificateMatchers {
        cn: patterns.iter().map(|p| (*p).to_owned()).collect(),
        ..Default::default()
    };
    assert_eq!(
        cn(&["acme-*"]).shared_kinds(&cn(&["acme-*"])),
        Some(vec!["certificate_cn"])
    );
    assert_eq!(cn(&["acme-*"]).shared_kinds(&cn(&["beta-*"])), None);
    let role = CertificateMatchers {
        roles: vec!["Operator".into()],
        ..Default::default()
    };
    assert_eq!(cn(&["acme-*"]).shared_kinds(&role), Some(vec![]));
}

fn openssl(folder: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(folder)
        .output()
        .expect("openssl runs");
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Makes a CA and a leaf with the openssl command line, the way the
/// operations guide does, and returns the leaf's DER.
fn openssl_leaf(folder: &Path, cn: &str, role: &str) -> Vec<u8> {
    openssl(
        folder,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=vendors CA",
        ],
    );
    let role_ext = format!("1.3.6.1.4.1.50316.802.1=ASN1:UTF8String:{role}");
    let subject = format!("/CN={cn}");
    openssl(
        folder,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            &subject,
            "-addext",
            &role_ext,
            "-addext",
            "subjectAltName=DNS:laptop1.acme.example,IP:10.50.0.7,URI:urn:acme:laptop:1",
        ],
    );
    openssl(
        folder,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-copy_extensions",
            "copy",
            "-outform",
            "DER",
            "-out",
            "leaf.der",
        ],
    );
    std::fs::read(folder.join("leaf.der")).unwrap()
}

#[test]
fn openssl_and_rcgen_certificates_give_same_identity() {
    let folder = tempfile::tempdir().unwrap();
    let openssl_der = openssl_leaf(folder.path(), "acme-laptop-1", "Operator");
    let ca = TestCa::new("vendors CA");
    let rcgen_der = ca
        .leaf(
            "acme-laptop-1",
            &["laptop1.acme.example", "10.50.0.7", "urn:acme:laptop:1"],
            Some(utf8_string("Operator")),
            12,
        )
        .der;

    let from_openssl = identity_of(&openssl_der);
    let from_rcgen = identity_of(&rcgen_der);
    assert_eq!(from_openssl.subject_cn, from_rcgen.subject_cn);
    assert_eq!(from_openssl.dns_names, from_rcgen.dns_names);
    assert_eq!(from_openssl.ip_addresses, from_rcgen.ip_addresses);
    assert_eq!(from_openssl.uris, from_rcgen.uris);
    assert_eq!(from_openssl.role.as_deref(), Some("Operator"));
    assert_eq!(from_openssl.role, from_rcgen.role);
    assert_eq!(
        from_openssl.sha256,
        hex::encode(Sha256::digest(&openssl_der))
    );
}
