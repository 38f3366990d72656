//! Helpers for the `sluice audit` commands: reading the verification key
//! from `--key` or `--key-file` and running `verify` into printable output.
//! Argument parsing and exit codes stay in `main.rs`.

use std::io::{self, Read};
use std::path::Path;

/// Reads the verification key from `key_file` (`-` for standard input), or
/// else from `key`. Exactly one of them must be given.
pub fn read_verification_key(key: Option<&str>, key_file: Option<&Path>) -> io::Result<[u8; 32]> {
    let text = match (key, key_file) {
        (Some(_), Some(_)) => {
            return Err(invalid_input("give either --key or --key-file, not both"));
        }
        (None, None) => return Err(invalid_input("missing --key or --key-file")),
        (Some(key), None) => key.to_owned(),
        (None, Some(path)) if path == Path::new("-") => {
            let mut text = String::new();
            io::stdin().read_to_string(&mut text)?;
            text
        }
        (None, Some(path)) => std::fs::read_to_string(path).map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("cannot read key file {}: {error}", path.display()),
            )
        })?,
    };
    parse_verification_key(&text)
}

/// Parses a verification key: 64 hex digits, surrounding whitespace ignored.
pub fn parse_verification_key(text: &str) -> io::Result<[u8; 32]> {
    super::record::parse_digest(text.trim())
        .ok_or_else(|| invalid_input("invalid verification key: expected 64 hex digits"))
}

fn invalid_input(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_argument_accepts_surrounding_whitespace() {
        let hex = "ab".repeat(32);
        let key = read_verification_key(Some(&format!(" {hex}\n")), None).unwrap();
        assert_eq!(key, [0xab; 32]);
    }

    #[test]
    fn key_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, format!("{}\n", "01".repeat(32))).unwrap();
        assert_eq!(read_verification_key(None, Some(&path)).unwrap(), [1; 32]);
    }

    #[test]
    fn short_key_is_invalid_input() {
        let error = read_verification_key(Some("abcd"), None).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            error.to_string(),
            "invalid verification key: expected 64 hex digits"
        );
    }

    #[test]
    fn both_sources_are_rejected() {
        let error = read_verification_key(Some("00"), Some(Path::new("-"))).unwrap_err();
        assert_eq!(
            error.to_string(),
            "give either --key or --key-file, not both"
        );
    }
}
