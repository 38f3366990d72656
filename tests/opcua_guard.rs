//! The OPC UA connection guard against traffic and certificates it did not
//! make: a recorded policy-None session of another OPC UA implementation,
//! and a CA chain built with the openssl command line tool.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use arc_swap::ArcSwap;
use sluice::config::Rate;
use sluice::opcua::framing::{Acknowledge, FrameDetail, FramingLimits, MessageType};
use sluice::opcua::guard::{Guard, OpenRateLimiter};
use sluice::opcua::trust::TrustStore;

const CAPTURE: &str = "../shared/corpus/pcap/opcua_4840.pcap";
const OPCUA_PORT: u16 = 4840;
const BASIC256SHA256: &str = "http://opcfoundation.org/UA/SecurityPolicy#Basic256Sha256";

/// Classic pcap link types this reader understands.
const LINKTYPE_NULL: u32 = 0;
const LINKTYPE_ETHERNET: u32 = 1;

/// The TCP payload of one direction of the capture's single connection,
/// reassembled by sequence number with retransmissions dropped.
#[derive(Default)]
struct Direction {
    segments: BTreeMap<u32, Vec<u8>>,
}

impl Direction {
    /// Returns the segments in sequence order, each as captured, after
    /// checking that they follow each other without gaps.
    fn in_order(&self) -> Vec<&[u8]> {
        let mut next = None;
        let mut segments = Vec::new();
        for (sequence, payload) in &self.segments {
            if let Some(expected) = next {
                assert_eq!(*sequence, expected, "gap in the TCP stream");
            }
            next = Some(sequence.wrapping_add(payload.len() as u32));
            segments.push(payload.as_slice());
        }
        segments
    }
}

fn u32_le(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn u16_be(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(bytes[at..at + 2].try_into().unwrap())
}

/// Reads the client-to-server and server-to-client payloads of the
/// connection to port 4840 from a little-endian classic pcap file.
fn read_capture(path: &Path) -> (Direction, Direction) {
    let file = std::fs::read(path).unwrap();
    assert_eq!(
        u32_le(&file, 0),
        0xA1B2_C3D4,
        "not a little-endian pcap file"
    );
    let link_header = match u32_le(&file, 20) {
        LINKTYPE_NULL => 4,
        LINKTYPE_ETHERNET => 14,
        other => panic!("link type {other} is not supported"),
    };
    let (mut client, mut server) = (Direction::default(), Direction::default());
    let mut offset = 24;
    while offset < file.len() {
        let captured = u32_le(&file, offset + 8) as usize;
        let packet = &file[offset + 16..offset + 16 + captured];
        offset += 16 + captured;
        let ip = &packet[link_header..];
        assert_eq!(ip[0] >> 4, 4, "only IPv4 is supported");
        let ip_header = usize::from(ip[0] & 0x0F) * 4;
        let total = usize::from(u16_be(ip, 2));
        let tcp = &ip[ip_header..total];
        let tcp_header = usize::from(tcp[12] >> 4) * 4;
        let payload = &tcp[tcp_header..];
        if payload.is_empty() {
            continue;
        }
        let sequence = u32::from_be_bytes(tcp[4..8].try_into().unwrap());
        let direction = if u16_be(tcp, 2) == OPCUA_PORT {
            &mut client
        } else {
            &mut server
        };
        direction.segments.insert(sequence, payload.to_vec());
    }
    (client, server)
}

fn guard(trust: TrustStore) -> Guard {
    Guard::new(
        IpAddr::from([127, 0, 0, 1]),
        FramingLimits::default(),
        Arc::new(ArcSwap::from_pointee(trust)),
        Arc::new(OpenRateLimiter::new(Rate::per_second(10), 10, 64)),
    )
}

fn empty_trust() -> TrustStore {
    TrustStore::from_der(&[], &[]).unwrap()
}

/// Splits a stream of whole messages by their size fields.
fn messages(stream: &[u8]) -> Vec<&[u8]> {
    let mut messages = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let size = u32_le(rest, 4) as usize;
        messages.push(&rest[..size]);
        rest = &rest[size..];
    }
    messages
}

#[test]
fn recorded_session_passes_in_order() {
    let (client, server) = read_capture(Path::new(CAPTURE));
    let mut guard = guard(empty_trust());
    let server_stream = server.in_order().concat();
    let ack = Acknowledge::parse_prefix(&server_stream).unwrap();
    assert_eq!(
        ack,
        Acknowledge {
            protocol_version: 0,
            receive_buffer_size: 131_072,
            send_buffer_size: 131_072,
            max_message_size: 1_073_741_824,
            max_chunk_count: 32_768,
        }
    );
    guard.on_acknowledge(&ack);

    let mut frames = Vec::new();
    for segment in client.in_order() {
        frames.extend(guard.on_client_bytes(segment).unwrap());
    }

    let client_stream = client.in_order().concat();
    let expected = messages(&client_stream);
    let passed: Vec<&[u8]> = frames.iter().map(|frame| &frame.bytes[..]).collect();
    assert_eq!(passed, expected);
    let count = |message_type| {
        frames
            .iter()
            .filter(|frame| frame.message_type == message_type)
            .count()
    };
    assert_eq!(count(MessageType::Hello), 1);
    assert_eq!(count(MessageType::OpenSecureChannel), 1);
    assert_eq!(count(MessageType::Message), 91);
    assert_eq!(count(MessageType::CloseSecureChannel), 1);
    assert_eq!(frames.len(), 94);
    assert_eq!(guard.counters().bytes, client_stream.len() as u64);
    let FrameDetail::OpenSecureChannel(open) = &frames[1].detail else {
        panic!("second message is not an OPN: {:?}", frames[1].detail);
    };
    assert_eq!(
        open.security_policy_uri,
        "http://opcfoundation.org/UA/SecurityPolicy#None"
    );
}

#[test]
fn recorded_session_passes_byte_by_byte() {
    let (client, _) = read_capture(Path::new(CAPTURE));
    let stream = client.in_order().concat();
    let mut guard = guard(empty_trust());
    let mut passed = Vec::new();
    for byte in &stream {
        for frame in guard.on_client_bytes(std::slice::from_ref(byte)).unwrap() {
            passed.extend_from_slice(&frame.bytes);
        }
    }
    assert_eq!(passed, stream);
}

/// Runs openssl with `args` in `dir` and panics with its output on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl must be installed");
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Creates a self-signed RSA CA named `name` and a client certificate it
/// signs, with an ApplicationUri and only serverAuth as extended key usage.
/// Returns the paths of the CA PEM and the client DER.
fn openssl_pki(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let ca_key = format!("{name}-ca.key");
    let ca_pem = format!("{name}-ca.pem");
    let client_key = format!("{name}-client.key");
    let client_pem = format!("{name}-client.pem");
    let client_der = format!("{name}-client.der");
    let subject = format!("/CN={name} CA");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &ca_key,
            "-out",
            &ca_pem,
            "-days",
            "30",
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &client_key,
            "-out",
            &client_pem,
            "-days",
            "30",
            "-subj",
            "/CN=historian/O=acme",
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-addext",
            "subjectAltName=URI:urn:acme:historian,DNS:historian",
            "-addext",
            "extendedKeyUsage=serverAuth",
            "-addext",
            "basicConstraints=CA:FALSE",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-in",
            &client_pem,
            "-outform",
            "DER",
            "-out",
            &client_der,
        ],
    );
    (dir.join(ca_pem), dir.join(client_der))
}

fn sha1_fingerprint(dir: &Path, certificate: &Path) -> String {
    let output = Command::new("openssl")
        .args([
            "x509",
            "-inform",
            "DER",
            "-noout",
            "-fingerprint",
            "-sha1",
            "-in",
        ])
        .arg(certificate)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    let (_, colons) = text.trim().split_once('=').unwrap();
    colons.replace(':', "").to_lowercase()
}

fn open_request(certificate: &[u8]) -> Vec<u8> {
    let mut body = 0u32.to_le_bytes().to_vec();
    for field in [BASIC256SHA256.as_bytes(), certificate] {
        body.extend_from_slice(&(field.len() as i32).to_le_bytes());
        body.extend_from_slice(field);
    }
    body.extend_from_slice(&20i32.to_le_bytes());
    body.extend_from_slice(&[0x11; 20]);
    body.extend_from_slice(&[0; 256]);
    let mut message = b"OPNF".to_vec();
    message.extend_from_slice(&(8 + body.len() as u32).to_le_bytes());
    message.extend_from_slice(&body);
    message
}

fn hello_request() -> Vec<u8> {
    let (client, _) = read_capture(Path::new(CAPTURE));
    let stream = client.in_order().concat();
    messages(&stream)[0].to_vec()
}

#[test]
fn openssl_client_certificate_is_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, client) = openssl_pki(dir.path(), "acme");
    let trust = TrustStore::load(&[&ca], &[] as &[&Path]).unwrap();
    let mut guard = guard(trust);
    let certificate = std::fs::read(&client).unwrap();
    let stream = [hello_request(), open_request(&certificate)].concat();

    let frames = guard.on_client_bytes(&stream).unwrap();

    assert_eq!(frames.len(), 2);
    let info = guard.certificate().unwrap();
    assert_eq!(info.application_uri.as_deref(), Some("urn:acme:historian"));
    assert_eq!(info.subject, "CN=historian, O=acme");
    assert_eq!(info.thumbprint_hex(), sha1_fingerprint(dir.path(), &client));
}

#[test]
fn openssl_certificate_of_other_ca_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = openssl_pki(dir.path(), "acme");
    let (_, stranger) = openssl_pki(dir.path(), "other");
    let trust = TrustStore::load(&[&ca], &[] as &[&Path]).unwrap();
    let mut guard = guard(trust);
    let certificate = std::fs::read(&stranger).unwrap();
    let stream = [hello_request(), open_request(&certificate)].concat();

    let rejection = guard.on_client_bytes(&stream).unwrap_err();

    assert_eq!(rejection.kind, "opcua_certificate_untrusted");
    assert_eq!(rejection.status, 0x801A_0000);
    assert_eq!(
        &rejection.error_message[8..12],
        &0x8013_0000u32.to_le_bytes()
    );
    let info = rejection.certificate.unwrap();
    assert_eq!(info.application_uri.as_deref(), Some("urn:acme:historian"));
    assert_eq!(
        rejection.reason,
        "certificate chain check failed: UnknownIssuer"
    );
}
