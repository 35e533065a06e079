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

/// Where a running server finds its master keys again (the config and the secrets file), so a
/// value sealed by `tollgate master-key rotate` in another process opens without a restart.
pub type KeySource = Arc<dyn Fn() -> anyhow::Result<Vec<[u8; 32]>> + Send + Sync>;

/// How soon after one reload of the key ring an unknown key id may trigger another: a value
/// sealed under a key this process cannot find costs one file read per interval, not per use.
const RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The master keys this process can use: the newest seals, all of them open. Clones share one
/// ring; [`KeyRing::with_source`] lets it pick up keys added after the start.
#[derive(Clone)]
pub struct KeyRing {
    ring: Arc<std::sync::RwLock<Arc<Ring>>>,
    source: Option<(KeySource, Arc<std::sync::Mutex<Option<std::time::Instant>>>)>,
}

struct Ring {
    current: String,
    ciphers: HashMap<String, Aes256Gcm>,
}

impl Ring {
    fn new(keys: &[[u8; 32]]) -> Result<Self, CryptoError> {
        let first = keys.first().ok_or(CryptoError::BadMasterKey)?;
        let ciphers = keys
            .iter()
            .map(|k| (key_id(k), Aes256Gcm::new(&Key::<Aes256Gcm>::from(*k))))
            .collect();
        Ok(Self {
            current: key_id(first),
            ciphers,
        })
    }
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ring = self.ring();
        f.debug_struct("KeyRing")
            .field("current", &ring.current)
            .field("keys", &ring.ciphers.len())
            .finish()
    }
}

impl KeyRing {
    /// `keys[0]` is the newest (sealing) key.
    pub fn new(keys: &[[u8; 32]]) -> Result<Self, CryptoError> {
        Ok(Self {
            ring: Arc::new(std::sync::RwLock::new(Arc::new(Ring::new(keys)?))),
            source: None,
        })
    }

    /// The same ring, which re-reads `source` when asked to open a value sealed under a key id it
    /// does not know (at most once per [`RELOAD_EVERY`]); the reloaded newest key then seals.
    pub fn with_source(mut self, source: KeySource) -> Self {
        self.source = Some((source, Arc::default()));
        self
    }

    fn ring(&self) -> Arc<Ring> {
        self.ring
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the keys after `id` was not found. True when the ring now knows `id`.
    fn reload_for(&self, id: &str) -> bool {
        let Some((source, last)) = &self.source else {
            return false;
        };
        {
            let mut last = last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < RELOAD_EVERY) {
                return false;
            }
            *last = Some(std::time::Instant::now());
        }
        let ring = match source()
            .map_err(|e| e.to_string())
            .and_then(|keys| Ring::new(&keys).map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(error) => {
                tracing::warn!(%error, "reloading the master keys failed");
                return false;
            }
        };
        let known = ring.ciphers.contains_key(id);
        if known {
            tracing::info!(current = %ring.current, keys = ring.ciphers.len(), "reloaded the master keys");
            *self
                .ring
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(ring);
        }
        known
    }

    pub fn current_id(&self) -> String {
        self.ring().current.clone()
    }

    pub fn seal(&self, plaintext: &[u8], aad: &str) -> String {
        let ring = self.ring();
        let cipher = &ring.ciphers[&ring.current];
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
        format!("{}:{}:{}", ring.current, B64.encode(nonce), B64.encode(ct))
    }

    pub fn open(&self, sealed: &str, aad: &str) -> Result<Vec<u8>, CryptoError> {
        let mut parts = sealed.splitn(3, ':');
        let (Some(id), Some(nonce), Some(ct)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(CryptoError::Malformed);
        };
        let mut ring = self.ring();
        if !ring.ciphers.contains_key(id) {
            if !self.reload_for(id) {
                return Err(CryptoError::UnknownKey(id.to_owned()));
            }
            ring = self.ring();
        }
        let cipher = ring
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
            Some(rotated.current_id().as_str())
        );
        let only_new = KeyRing::new(&[key(2)]).expect("ring");
        assert!(matches!(
            only_new.open(&sealed, "a"),
            Err(CryptoError::UnknownKey(_))
        ));
    }

    #[test]
    fn an_unknown_key_id_reloads_the_ring_from_its_source() {
        let keys = Arc::new(std::sync::Mutex::new(vec![key(1)]));
        let source: KeySource = {
            let keys = keys.clone();
            Arc::new(move || Ok(keys.lock().expect("lock").clone()))
        };
        let running = KeyRing::new(&[key(1)]).expect("ring").with_source(source);
        // Another process rotates: key 2 is newest and seals.
        let rotated = KeyRing::new(&[key(2), key(1)]).expect("ring");
        let sealed = rotated.seal(b"sk-new", "row");
        *keys.lock().expect("lock") = vec![key(2), key(1)];
        assert_eq!(running.open(&sealed, "row").expect("reloaded"), b"sk-new");
        assert_eq!(running.current_id(), rotated.current_id());
        // A clone shares the reloaded ring.
        assert_eq!(
            running.clone().open(&sealed, "row").expect("open"),
            b"sk-new"
        );
        // A key nobody has stays unknown, and does not reload again at once.
        let stranger = KeyRing::new(&[key(3)]).expect("ring").seal(b"x", "row");
        assert!(matches!(
            running.open(&stranger, "row"),
            Err(CryptoError::UnknownKey(_))
        ));
        // Without a source nothing reloads.
        assert!(matches!(
            KeyRing::new(&[key(1)]).expect("ring").open(&sealed, "row"),
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
