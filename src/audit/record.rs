//! The byte layout of one audit record: how an event becomes a chained line,
//! how a line is split back into its canonical form and hash, and the seal
//! MAC. The writer and the verifier both go through this file, so they cannot
//! disagree on the format.

use std::io::Write;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// A SHA-256 digest or a 32-byte key.
pub type Digest32 = [u8; 32];

/// The `prev_hash` of record 1.
pub const GENESIS_HASH: Digest32 = [0; 32];

/// The member that ends every line: `,"hash":"` 64 hex digits `"}`.
const HASH_PREFIX: &[u8] = b",\"hash\":\"";
const HASH_SUFFIX: &[u8] = b"\"}";
const HASH_MEMBER_LEN: usize = HASH_PREFIX.len() + 64 + HASH_SUFFIX.len();

/// Domain separation for the one-way key evolution.
const EVOLVE_LABEL: &[u8] = b"sluice audit key evolve";

/// Appends one record line for the JSON object `object` to `out`: the object
/// with `seq` and `prev_hash` added at the end forms the canonical form, its
/// SHA-256 becomes `hash`, added as the last member, and a newline ends the
/// line. Returns the record's hash.
pub fn append_record(
    out: &mut Vec<u8>,
    object: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>,
    seq: u64,
    prev_hash: &Digest32,
) -> serde_json::Result<Digest32> {
    let start = out.len();
    object(out)?;
    if out.len() < start + 2 || out[start] != b'{' || out.last() != Some(&b'}') {
        out.truncate(start);
        return Err(serde::ser::Error::custom(
            "event did not serialize to a JSON object",
        ));
    }

    out.pop();
    if out.len() > start + 1 {
        out.push(b',');
    }
    let mut hex_buffer = [0u8; 64];
    write!(out, "\"seq\":{seq},\"prev_hash\":\"").map_err(serde_json::Error::io)?;
    out.extend_from_slice(encode_hex(prev_hash, &mut hex_buffer));
    out.extend_from_slice(b"\"}");
    let hash: Digest32 = Sha256::digest(&out[start..]).into();

    out.pop();
    out.extend_from_slice(HASH_PREFIX);
    out.extend_from_slice(encode_hex(&hash, &mut hex_buffer));
    out.extend_from_slice(HASH_SUFFIX);
    out.push(b'\n');
    Ok(hash)
}

fn encode_hex<'a>(bytes: &Digest32, buffer: &'a mut [u8; 64]) -> &'a [u8] {
    // Cannot fail: the buffer is exactly twice the input length.
    hex::encode_to_slice(bytes, buffer).expect("64-byte buffer for 32 bytes");
    buffer
}

/// A line split into its canonical form and the hash it claims.
pub struct SplitLine {
    /// The line without its `hash` member: the bytes that were hashed.
    pub canonical: Vec<u8>,
    pub claimed_hash: Digest32,
}

/// Splits a line (without its newline) into canonical form and claimed hash.
/// Returns `None` when the line does not end with a well-formed `hash` member.
pub fn split_line(line: &[u8]) -> Option<SplitLine> {
    let member_start = line.len().checked_sub(HASH_MEMBER_LEN)?;
    let member = &line[member_start..];
    if !member.starts_with(HASH_PREFIX) || !member.ends_with(HASH_SUFFIX) {
        return None;
    }
    let hex_digits = &member[HASH_PREFIX.len()..HASH_PREFIX.len() + 64];
    if !hex_digits
        .iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    {
        return None;
    }
    let mut claimed_hash = [0u8; 32];
    hex::decode_to_slice(hex_digits, &mut claimed_hash).ok()?;

    let mut canonical = Vec::with_capacity(member_start + 1);
    canonical.extend_from_slice(&line[..member_start]);
    canonical.push(b'}');
    Some(SplitLine {
        canonical,
        claimed_hash,
    })
}

/// Returns the SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Digest32 {
    Sha256::digest(bytes).into()
}

/// The members of a record that the chain and seal checks read. Deserializing
/// into a struct rejects a record that repeats one of these keys, so a
/// forged duplicate cannot give the record two meanings.
#[derive(Debug, Deserialize)]
pub struct RecordHeader {
    pub seq: u64,
    pub prev_hash: String,
    pub event_type: String,
    #[serde(default)]
    pub detail: Option<serde_json::Value>,
}

/// The `detail` object of a seal record.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SealDetail {
    pub epoch: u64,
    pub mac: String,
}

/// One line checked on its own: its hash and the members the chain reads.
#[derive(Debug, Clone)]
pub struct ParsedRecord {
    pub seq: u64,
    pub prev_hash: Digest32,
    pub hash: Digest32,
    /// `Some` for a seal record.
    pub seal: Option<SealDetail>,
}

/// The reason a line is not a valid record on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("line does not end with a \"hash\" member of 64 lowercase hex digits")]
    NoHashMember,
    #[error("hash mismatch")]
    HashMismatch,
    #[error("invalid record: {0}")]
    Invalid(String),
}

/// Parses a line (without its newline) and checks its own hash.
pub fn parse_record(line: &[u8]) -> Result<ParsedRecord, RecordError> {
    let split = split_line(line).ok_or(RecordError::NoHashMember)?;
    if sha256(&split.canonical) != split.claimed_hash {
        return Err(RecordError::HashMismatch);
    }
    let header: RecordHeader = serde_json::from_slice(&split.canonical)
        .map_err(|error| RecordError::Invalid(error.to_string()))?;
    let prev_hash = parse_digest(&header.prev_hash)
        .ok_or_else(|| RecordError::Invalid("prev_hash is not 64 hex digits".into()))?;
    let seal = if header.event_type == "seal" {
        let detail = header
            .detail
            .and_then(|detail| serde_json::from_value::<SealDetail>(detail).ok())
            .ok_or_else(|| {
                RecordError::Invalid("seal record without detail.epoch and detail.mac".into())
            })?;
        Some(detail)
    } else {
        None
    };
    Ok(ParsedRecord {
        seq: header.seq,
        prev_hash,
        hash: split.claimed_hash,
        seal,
    })
}

/// Returns the key of the epoch after the one `key` belongs to:
/// SHA-256("sluice audit key evolve" || key).
pub fn evolve_key(key: &Digest32) -> Digest32 {
    let mut hasher = Sha256::new();
    hasher.update(EVOLVE_LABEL);
    hasher.update(key);
    hasher.finalize().into()
}

/// Returns the message a seal's MAC covers. It binds the epoch, the seal's own
/// position and the hash of the record before it, which covers the whole
/// chain up to that record.
pub fn seal_message(epoch: u64, seq: u64, prev_hash_hex: &str) -> String {
    format!("sluice-audit-seal|epoch={epoch}|seq={seq}|prev_hash={prev_hash_hex}")
}

/// Returns HMAC-SHA-256 of the seal message under `key`.
pub fn seal_mac(key: &Digest32, epoch: u64, seq: u64, prev_hash: &Digest32) -> Digest32 {
    let message = seal_message(epoch, seq, &hex::encode(prev_hash));
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(message.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Checks a seal's MAC in constant time.
pub fn seal_mac_matches(
    key: &Digest32,
    epoch: u64,
    seq: u64,
    prev_hash_hex: &str,
    mac_hex: &str,
) -> bool {
    let Ok(claimed) = hex::decode(mac_hex) else {
        return false;
    };
    let message = seal_message(epoch, seq, prev_hash_hex);
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(message.as_bytes());
    mac.verify_slice(&claimed).is_ok()
}

/// Parses 64 lowercase or uppercase hex digits into 32 bytes.
pub fn parse_digest(text: &str) -> Option<Digest32> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(text, &mut bytes).ok()?;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(text: &'static str) -> impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()> {
        move |out: &mut Vec<u8>| {
            out.extend_from_slice(text.as_bytes());
            Ok(())
        }
    }

    #[test]
    fn record_line_appends_seq_prev_hash_and_hash_last() {
        let mut out = Vec::new();
        let hash = append_record(&mut out, object(r#"{"id":"a"}"#), 7, &GENESIS_HASH).unwrap();
        let canonical = format!(r#"{{"id":"a","seq":7,"prev_hash":"{}"}}"#, "0".repeat(64));
        assert_eq!(hash, sha256(canonical.as_bytes()));
        let expected = format!(
            r#"{{"id":"a","seq":7,"prev_hash":"{}","hash":"{}"}}"#,
            "0".repeat(64),
            hex::encode(hash)
        );
        assert_eq!(String::from_utf8(out).unwrap(), expected + "\n");
    }

    #[test]
    fn split_line_returns_the_hashed_bytes() {
        let mut out = Vec::new();
        let hash = append_record(&mut out, object(r#"{"id":"a"}"#), 1, &GENESIS_HASH).unwrap();
        let split = split_line(&out[..out.len() - 1]).unwrap();
        assert_eq!(split.claimed_hash, hash);
        assert_eq!(sha256(&split.canonical), hash);
    }

    #[test]
    fn empty_object_gets_no_leading_comma() {
        let mut out = Vec::new();
        append_record(&mut out, object("{}"), 1, &GENESIS_HASH).unwrap();
        assert!(out.starts_with(b"{\"seq\":1,"));
    }

    #[test]
    fn non_object_is_rejected_and_leaves_no_bytes() {
        let mut out = b"x".to_vec();
        assert!(append_record(&mut out, object("[1]"), 1, &GENESIS_HASH).is_err());
        assert_eq!(out, b"x");
    }

    #[test]
    fn split_line_rejects_uppercase_hash() {
        let line = format!(r#"{{"seq":1,"hash":"{}"}}"#, "A".repeat(64));
        assert!(split_line(line.as_bytes()).is_none());
    }

    #[test]
    fn seal_mac_binds_the_epoch() {
        let key = [7u8; 32];
        let prev = [1u8; 32];
        let mac = hex::encode(seal_mac(&key, 3, 10, &prev));
        let prev_hex = hex::encode(prev);
        assert!(seal_mac_matches(&key, 3, 10, &prev_hex, &mac));
        assert!(!seal_mac_matches(&key, 2, 10, &prev_hex, &mac));
        assert!(!seal_mac_matches(&key, 3, 11, &prev_hex, &mac));
    }

    #[test]
    fn header_rejects_a_duplicated_seq() {
        let text = r#"{"seq":1,"event_type":"x","seq":2,"prev_hash":""}"#;
        assert!(serde_json::from_str::<RecordHeader>(text).is_err());
    }
}
