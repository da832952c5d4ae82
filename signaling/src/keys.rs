//! WireGuard (X25519) keys as node identities, and the small KDF used by
//! sealing and authentication.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A node's identity: its WireGuard public key (X25519), written in base64
/// like `wg` does.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

/// A WireGuard private key. Its `Debug` never prints the key.
#[derive(Clone)]
pub struct PrivateKey([u8; 32]);

/// A key that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid key: expected 32 bytes in base64 (as printed by `wg genkey` / `wg pubkey`)")]
pub struct KeyParseError;

impl PublicKey {
    /// Short printable form (first 8 base64 characters) for logs.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }

    /// Lowercase hex, used in NATS subjects.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&encode32(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode32(s).map(PublicKey)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl PrivateKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PrivateKey(bytes)
    }

    /// The raw key, for a WireGuard implementation in the same process
    /// (the agent's embedded mode).
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// A fresh random key (tests, benchmarks; real nodes use their WireGuard key).
    pub fn generate() -> Self {
        PrivateKey(rand::random())
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    /// X25519 with `peer`; `None` when the result is all zeros (a low-order
    /// point was supplied), which must never be used as a key.
    pub(crate) fn diffie_hellman(&self, peer: &PublicKey) -> Option<[u8; 32]> {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(peer.0));
        shared.was_contributory().then(|| shared.to_bytes())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

impl FromStr for PrivateKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode32(s.trim()).map(PrivateKey)
    }
}

/// Encodes a 32-byte key in the standard base64 `wg` prints.
pub fn encode32(k: &[u8; 32]) -> String {
    B64.encode(k)
}

/// Decodes a 32-byte key from the standard base64 `wg` prints (WireGuard
/// keys, and the Ed25519 CA keys of membership certificates): the one
/// base64 key helper of the project.
pub fn decode32(s: &str) -> Result<[u8; 32], KeyParseError> {
    let v = B64.decode(s.as_bytes()).map_err(|_| KeyParseError)?;
    v.try_into().map_err(|_| KeyParseError)
}

/// HKDF-SHA256 (RFC 5869) producing one 32-byte block: extract with `label`
/// as salt, expand with `info`.
pub(crate) fn kdf(ikm: &[u8; 32], label: &[u8], info: &[&[u8]]) -> [u8; 32] {
    let prk = hmac(label, &[ikm]);
    let mut parts: Vec<&[u8]> = info.to_vec();
    parts.push(&[1u8]);
    hmac(&prk, &parts)
}

/// HMAC-SHA256 over the concatenation of `parts`.
pub(crate) fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Constant-time HMAC-SHA256 check.
pub(crate) fn hmac_verify(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.verify_slice(tag).is_ok()
}

/// Bytes as base64 in JSON.
pub(crate) mod b64 {
    use super::B64;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(v))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        B64.decode(s.as_bytes()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_text_round_trip_and_dh_agrees() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        let pa: PublicKey = a.public_key().to_string().parse().unwrap();
        assert_eq!(pa, a.public_key());
        assert_eq!(a.diffie_hellman(&b.public_key()), b.diffie_hellman(&pa));
        assert!("not a key".parse::<PublicKey>().is_err());
        // The identity point gives an all-zero shared secret: refused.
        assert!(a.diffie_hellman(&PublicKey([0; 32])).is_none());
    }
}
