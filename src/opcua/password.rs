//! Password hashes of OPC UA users: argon2id in PHC form, made by `sluice
//! hash-password` and checked when a client activates a session.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Hashes `password` with argon2id and the crate's default cost parameters
/// (argon2 0.5: m = 19456 KiB, t = 2, p = 1) and a random salt.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
}

/// Checks `password` against a PHC hash. The argon2 crate compares the
/// computed and stored outputs in constant time.
pub fn verify_password(password: &str, phc: &str) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    Argon2::default()
        .verify_password(password.as_bytes(), &hash)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_verifies_its_own_password() {
        let hash = hash_password("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
        assert!(verify_password("s3cret", &hash));
    }

    #[test]
    fn hash_rejects_other_password() {
        let hash = hash_password("s3cret").unwrap();
        assert!(!verify_password("s3cret ", &hash));
        assert!(!verify_password("", &hash));
    }

    #[test]
    fn invalid_phc_string_never_verifies() {
        assert!(!verify_password("x", "not-a-hash"));
    }
}
