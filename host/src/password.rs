//! Password hashes for HTTP basic auth in front of a tunnel: `sha256:<salt>:<hex>`, where
//! `<hex>` is the SHA-256 of `<salt>:<password>`.
//!
//! Plain passwords exist only where the tunnel owner typed them (`-- auth=alice:secret`):
//! the host hashes them as it parses the options, so plugins, logs and the store only ever
//! see hashes. A fast salted hash is enough here: the hashes never leave the host's memory
//! (they are not stored), and every request with credentials is checked against them, which
//! a deliberately slow hash would make a denial-of-service lever.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Length of a generated salt, in hex digits.
const SALT_HEX_LEN: usize = 16;
/// Longest salt accepted in a hash given by a plugin or an operator.
pub const MAX_SALT_LEN: usize = 64;

/// A parsed `sha256:<salt>:<hex>` hash.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash {
    salt: String,
    digest: [u8; 32],
}

fn digest(salt: &str, password: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(salt.as_bytes());
    hasher.update(b":");
    hasher.update(password);
    hasher.finalize().into()
}

impl PasswordHash {
    /// Hashes a password with a fresh random salt.
    pub fn create(password: &str) -> PasswordHash {
        let bytes: [u8; SALT_HEX_LEN / 2] = rand::random();
        let salt = hex::encode(bytes);
        PasswordHash {
            digest: digest(&salt, password.as_bytes()),
            salt,
        }
    }

    /// Parses `sha256:<salt>:<64 hex digits>`; the error says what is wrong.
    pub fn parse(text: &str) -> Result<PasswordHash, String> {
        let rest = text
            .strip_prefix("sha256:")
            .ok_or("a password hash starts with \"sha256:\"")?;
        let (salt, hex_digest) = rest
            .rsplit_once(':')
            .ok_or("a password hash is sha256:<salt>:<hex>")?;
        if salt.is_empty() || salt.len() > MAX_SALT_LEN || salt.contains(':') {
            return Err(format!(
                "the salt must be 1 to {MAX_SALT_LEN} characters without ':'"
            ));
        }
        if !salt.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the salt must be printable ASCII".into());
        }
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hex_digest, &mut digest)
            .map_err(|_| "the digest must be 64 hex digits".to_string())?;
        Ok(PasswordHash {
            salt: salt.to_string(),
            digest,
        })
    }

    /// True if `password` matches (constant time in the digest comparison).
    pub fn verify(&self, password: &[u8]) -> bool {
        digest(&self.salt, password).ct_eq(&self.digest).into()
    }
}

impl fmt::Display for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}:{}", self.salt, hex::encode(self.digest))
    }
}

/// Hashes are not secrets in the way passwords are, but they stay out of debug output.
impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}:…", self.salt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_hashes_verify_and_round_trip() {
        let hash = PasswordHash::create("secret");
        assert!(hash.verify(b"secret"));
        assert!(!hash.verify(b"Secret"));
        let again = PasswordHash::parse(&hash.to_string()).unwrap();
        assert_eq!(again, hash);
        assert!(!format!("{hash:?}").contains(&hex::encode(hash.digest)));
    }

    #[test]
    fn the_documented_shell_recipe_matches() {
        // printf 'pepper:hunter2' | sha256sum
        let hex = hex::encode(Sha256::digest(b"pepper:hunter2"));
        let hash = PasswordHash::parse(&format!("sha256:pepper:{hex}")).unwrap();
        assert!(hash.verify(b"hunter2"));
    }

    #[test]
    fn malformed_hashes_say_why() {
        for bad in [
            "md5:x:00",
            "sha256:",
            "sha256::00",
            "sha256:salt:xyz",
            "sha256:salt:00",
            "sha256:sa lt:0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(PasswordHash::parse(bad).is_err(), "{bad}");
        }
    }
}
