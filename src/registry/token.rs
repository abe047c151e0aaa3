//! Secrets: app tokens stored as salted SHA-256 hashes, the admin key, constant-time checks.
//!
//! App tokens are high-entropy strings chosen by the app (at least `min_token_length` long), so
//! a salted SHA-256 is the right cost: it keeps the state file useless to a reader while a
//! check stays cheap enough for the request path. Comparisons never short-circuit.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A stored token hash: `sha256:{salt hex}:{digest hex}`.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenHash {
    salt: [u8; 16],
    digest: [u8; 32],
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

fn salted(salt: &[u8], token: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(token.as_bytes());
    h.finalize().into()
}

/// Fill a buffer with OS randomness.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // The OS random source failing is not recoverable; nothing secret can be made without it.
    getrandom::getrandom(&mut buf).expect("OS random number generator is available");
    buf
}

impl TokenHash {
    /// Hash a token with a fresh random salt.
    pub fn new(token: &str) -> Self {
        let salt = random_bytes::<16>();
        Self {
            digest: salted(&salt, token),
            salt,
        }
    }

    /// Whether `token` is the one this hash was made from (constant time).
    pub fn verify(&self, token: &str) -> bool {
        salted(&self.salt, token).ct_eq(&self.digest).into()
    }

    /// The stored form.
    pub fn encode(&self) -> String {
        format!(
            "sha256:{}:{}",
            hex::encode(self.salt),
            hex::encode(self.digest)
        )
    }

    /// Parse the stored form.
    pub fn decode(s: &str) -> Option<Self> {
        let mut parts = s.split(':');
        if parts.next()? != "sha256" {
            return None;
        }
        let salt = hex::decode(parts.next()?).ok()?.try_into().ok()?;
        let digest = hex::decode(parts.next()?).ok()?.try_into().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(Self { salt, digest })
    }
}

/// The admin key, kept as a digest so comparisons are constant time whatever the input length.
#[derive(Clone)]
pub struct AdminKey {
    digest: [u8; 32],
}

impl AdminKey {
    /// Wrap a key.
    pub fn new(key: &str) -> Self {
        Self {
            digest: Sha256::digest(key.as_bytes()).into(),
        }
    }

    /// Whether `candidate` is the admin key (constant time).
    pub fn verify(&self, candidate: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        d.ct_eq(&self.digest).into()
    }
}

/// A new random key, 32 bytes as 64 hex characters.
pub fn generate_key() -> String {
    hex::encode(random_bytes::<32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_round_trip_and_verify() {
        let h = TokenHash::new("Wld2pWduZW1hqgzbxSWDW5mhGzxZzD0I");
        assert!(h.verify("Wld2pWduZW1hqgzbxSWDW5mhGzxZzD0I"));
        assert!(!h.verify("Wld2pWduZW1hqgzbxSWDW5mhGzxZzD0J"));
        assert!(!h.verify(""));
        let enc = h.encode();
        assert!(!enc.contains("Wld2"));
        let back = TokenHash::decode(&enc).expect("decodes");
        assert_eq!(back, h);
        assert!(back.verify("Wld2pWduZW1hqgzbxSWDW5mhGzxZzD0I"));
    }

    #[test]
    fn same_token_different_salt() {
        assert_ne!(
            TokenHash::new("abcdefghijklmnop").encode(),
            TokenHash::new("abcdefghijklmnop").encode()
        );
    }

    #[test]
    fn decode_rejects_garbage() {
        for s in [
            "",
            "sha256",
            "md5:00:00",
            "sha256:zz:00",
            "sha256:00:00",
            "sha256:a:b:c",
        ] {
            assert!(TokenHash::decode(s).is_none(), "{s}");
        }
    }

    #[test]
    fn admin_key() {
        let k = AdminKey::new("0123456789abcdef0123");
        assert!(k.verify("0123456789abcdef0123"));
        assert!(!k.verify("0123456789abcdef012"));
        assert_eq!(generate_key().len(), 64);
    }
}
