//! Envelope encryption of stored secrets (provider keys, TOTP secrets) under a master key ring.
//!
//! A sealed value is `<key id>:<base64 nonce>:<base64 ciphertext+tag>`; AES-256-GCM with a random
//! 96-bit nonce per record and the record's id as associated data, so a ciphertext copied onto
//! another row does not decrypt. The key id (first 8 hex digits of SHA-256 of the key) says which
//! master key sealed it, so old keys keep decrypting until `tollgate master-key rotate` re-seals.

use std::collections::HashMap;
use std::sync::Arc;

use aes_gcm::aead::{Aead, Generate, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("master key must be base64 of exactly 32 bytes")]
    BadMasterKey,
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed under unknown master key {0}")]
    UnknownKey(String),
    #[error("decryption failed (wrong key or tampered value)")]
    Decrypt,
}

pub fn parse_master_key(b64: &str) -> Result<[u8; 32], CryptoError> {
    let bytes = B64
        .decode(b64.trim())
        .map_err(|_| CryptoError::BadMasterKey)?;
    bytes.try_into().map_err(|_| CryptoError::BadMasterKey)
}

/// A fresh random master key, base64.
pub fn generate_master_key() -> String {
    B64.encode(Key::<Aes256Gcm>::generate())
}

pub fn key_id(key: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(key)[..4])
}

/// The master keys this process can use: the newest seals, all of them open.
#[derive(Clone)]
pub struct KeyRing {
    current: String,
    ciphers: Arc<HashMap<String, Aes256Gcm>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("current", &self.current)
            .field("keys", &self.ciphers.len())
            .finish()
    }
}

impl KeyRing {
    /// `keys[0]` is the newest (sealing) key.
    pub fn new(keys: &[[u8; 32]]) -> Result<Self, CryptoError> {
        let first = keys.first().ok_or(CryptoError::BadMasterKey)?;
        let ciphers = keys
            .iter()
            .map(|k| (key_id(k), Aes256Gcm::new(&Key::<Aes256Gcm>::from(*k))))
            .collect();
        Ok(Self {
            current: key_id(first),
            ciphers: Arc::new(ciphers),
        })
    }

    pub fn current_id(&self) -> &str {
        &self.current
    }

    pub fn seal(&self, plaintext: &[u8], aad: &str) -> String {
        let cipher = &self.ciphers[&self.current];
        let nonce = Nonce::generate();
        let ct = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: aad.as_bytes(),
                },
            )
            .unwrap_or_default(); // AES-GCM encryption cannot fail for inputs under 64 GiB
        format!("{}:{}:{}", self.current, B64.encode(nonce), B64.encode(ct))
    }

    pub fn open(&self, sealed: &str, aad: &str) -> Result<Vec<u8>, CryptoError> {
        let mut parts = sealed.splitn(3, ':');
        let (Some(id), Some(nonce), Some(ct)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(CryptoError::Malformed);
        };
        let cipher = self
            .ciphers
            .get(id)
            .ok_or_else(|| CryptoError::UnknownKey(id.to_owned()))?;
        let nonce = B64.decode(nonce).map_err(|_| CryptoError::Malformed)?;
        let nonce = Nonce::try_from(nonce.as_slice()).map_err(|_| CryptoError::Malformed)?;
        let ct = B64.decode(ct).map_err(|_| CryptoError::Malformed)?;
        cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: &ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Decrypt)
    }

    pub fn open_string(&self, sealed: &str, aad: &str) -> Result<String, CryptoError> {
        String::from_utf8(self.open(sealed, aad)?).map_err(|_| CryptoError::Decrypt)
    }

    /// The id a sealed value names.
    pub fn sealed_key_id(sealed: &str) -> Option<&str> {
        sealed.split(':').next()
    }
}

/// `sk-ab…wxyz`: enough to recognise a secret, never enough to use it.
pub fn mask(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() <= 10 {
        let tail: String = chars[chars.len().saturating_sub(2)..].iter().collect();
        return format!("…{tail}");
    }
    let head: String = chars[..5].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

/// Hex SHA-256, how gateway keys are looked up (they are high-entropy: no argon2 here).
pub fn sha256_hex(s: &str) -> String {
    // Into a stack buffer: `hex::encode` collects the digits one `char` at a time (~1,500
    // instructions per call, by callgrind), and this runs on every proxied request.
    let mut buf = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(s.as_bytes()), &mut buf)
        .expect("a SHA-256 digest is 64 hex digits");
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> [u8; 32] {
        [b; 32]
    }

    #[test]
    fn seal_open_roundtrip_and_aad_binding() {
        let ring = KeyRing::new(&[key(1)]).expect("ring");
        let sealed = ring.seal(b"sk-secret", "row-1");
        assert!(!sealed.contains("sk-secret"));
        assert_eq!(ring.open(&sealed, "row-1").expect("open"), b"sk-secret");
        assert!(matches!(
            ring.open(&sealed, "row-2"),
            Err(CryptoError::Decrypt)
        ));
        // Two seals of one value differ (random nonce).
        assert_ne!(sealed, ring.seal(b"sk-secret", "row-1"));
    }

    #[test]
    fn old_keys_open_new_key_seals() {
        let old = KeyRing::new(&[key(1)]).expect("ring");
        let sealed = old.seal(b"x", "a");
        let rotated = KeyRing::new(&[key(2), key(1)]).expect("ring");
        assert_eq!(rotated.open(&sealed, "a").expect("open"), b"x");
        assert_eq!(
            KeyRing::sealed_key_id(&rotated.seal(b"x", "a")),
            Some(rotated.current_id())
        );
        let only_new = KeyRing::new(&[key(2)]).expect("ring");
        assert!(matches!(
            only_new.open(&sealed, "a"),
            Err(CryptoError::UnknownKey(_))
        ));
    }

    #[test]
    fn masks() {
        assert_eq!(mask("sk-abcdefghijklmnopqrstuvwxyz"), "sk-ab…wxyz");
        assert!(!mask("short").contains("sho"));
    }

    #[test]
    fn master_key_parsing() {
        assert!(parse_master_key(&generate_master_key()).is_ok());
        assert!(parse_master_key("c2hvcnQ=").is_err());
    }
}
