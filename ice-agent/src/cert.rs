//! Membership certificates: an operator CA (Ed25519) binds a node's
//! WireGuard public key to its name, overlay addresses, routed ranges and an
//! expiry, as Nebula binds IPs to keys — so neither another member nor the
//! signaling server can claim a node's address.
//!
//! Text form (one line, safe in TOML, JSON and a signaling message):
//! `wgice-cert-v1.<base64url(body)>.<base64url(signature)>`, where `body`
//! is JSON ([`CertBody`]) and the signature is Ed25519 by the CA over
//! `"wgice-cert-v1\0" || body`. Verification decodes bounded input only
//! (at most [`MAX_CERT_LEN`] bytes), checks the signature against the
//! pinned CA keys before parsing the body, then every field.
//!
//! Ed25519 comes from `ring`, the crypto provider the project already uses
//! for rustls (one crypto stack).

use std::net::IpAddr;

use base64::Engine;
use ipnet::IpNet;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use signaling::PublicKey;

use crate::validate;

const PREFIX: &str = "wgice-cert-v1.";
const SIG_CONTEXT: &[u8] = b"wgice-cert-v1\0";
/// The longest certificate accepted (a full one is about 700 bytes).
pub const MAX_CERT_LEN: usize = 2048;
/// Overlay addresses per certificate.
pub const MAX_ADDRESSES: usize = 16;
/// Routed ranges per certificate.
pub const MAX_ROUTES: usize = 16;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// What a certificate says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertBody {
    /// The node's WireGuard public key (standard base64, as `wg` prints it).
    pub key: String,
    /// The node's name.
    pub name: String,
    /// Single overlay addresses (`/32`, `/128`) the node may receive.
    pub addresses: Vec<IpNet>,
    /// Ranges routed through the node (a site, a Kubernetes pod CIDR).
    #[serde(default)]
    pub routes: Vec<IpNet>,
    /// Valid from (Unix seconds).
    pub not_before: u64,
    /// Valid until (Unix seconds).
    pub not_after: u64,
}

/// A certificate that verified: who, what it may route, until when, and
/// which CA signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// WireGuard public key.
    pub key: PublicKey,
    /// Name (checked by [`validate::member_name`]).
    pub name: String,
    /// Overlay addresses.
    pub addresses: Vec<IpNet>,
    /// Routed ranges.
    pub routes: Vec<IpNet>,
    /// Valid until (Unix seconds).
    pub not_after: u64,
    /// The CA key that signed it.
    pub ca: [u8; 32],
}

impl Membership {
    /// Everything the certificate lets the node receive.
    pub fn allowed_ips(&self) -> Vec<IpNet> {
        let mut v: Vec<IpNet> = self.addresses.iter().chain(&self.routes).copied().collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Why a certificate did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// Not the text form, too long, or not base64.
    #[error("not a wgice certificate: {0}")]
    Malformed(String),
    /// No pinned CA key made this signature.
    #[error("signed by no pinned CA (membership.ca)")]
    UnknownCa,
    /// The certificate is for another WireGuard key.
    #[error("issued to another WireGuard key")]
    WrongKey,
    /// Not valid yet.
    #[error("not valid until {0} (Unix time; check the clocks)")]
    NotYetValid(u64),
    /// Expired.
    #[error("expired at {0} (Unix time; renew it with `ice-agent ca sign`)")]
    Expired(u64),
    /// A field is out of bounds.
    #[error("{0}")]
    BadField(String),
    /// The CA key cannot be made or read (a `ca.key` that is not an
    /// Ed25519 PKCS#8 document, or no system randomness).
    #[error("CA key: {0} (the file `ice-agent ca init` wrote, base64)")]
    CaKey(String),
}

/// Checks `text` against the pinned CA keys for the member `key` at Unix
/// time `now`.
pub fn verify(
    text: &str,
    cas: &[[u8; 32]],
    key: &PublicKey,
    now: u64,
) -> Result<Membership, CertError> {
    if text.len() > MAX_CERT_LEN {
        return Err(CertError::Malformed(format!(
            "{} bytes (at most {MAX_CERT_LEN})",
            text.len()
        )));
    }
    let rest = text
        .strip_prefix(PREFIX)
        .ok_or_else(|| CertError::Malformed("no wgice-cert-v1. prefix".into()))?;
    let (body_b64, sig_b64) = rest
        .split_once('.')
        .ok_or_else(|| CertError::Malformed("no signature part".into()))?;
    let body = b64()
        .decode(body_b64)
        .map_err(|e| CertError::Malformed(format!("body: {e}")))?;
    let sig = b64()
        .decode(sig_b64)
        .map_err(|e| CertError::Malformed(format!("signature: {e}")))?;
    if sig.len() != 64 {
        return Err(CertError::Malformed(format!(
            "signature of {} bytes",
            sig.len()
        )));
    }
    let mut signed = Vec::with_capacity(SIG_CONTEXT.len() + body.len());
    signed.extend_from_slice(SIG_CONTEXT);
    signed.extend_from_slice(&body);
    let ca = cas
        .iter()
        .find(|ca| {
            UnparsedPublicKey::new(&ED25519, ca)
                .verify(&signed, &sig)
                .is_ok()
        })
        .ok_or(CertError::UnknownCa)?;
    // Only a CA's own bytes are parsed from here on.
    let b: CertBody =
        serde_json::from_slice(&body).map_err(|e| CertError::Malformed(format!("body: {e}")))?;
    let cert_key: PublicKey = b
        .key
        .parse()
        .map_err(|_| CertError::BadField("key is not a WireGuard key".into()))?;
    if &cert_key != key {
        return Err(CertError::WrongKey);
    }
    if now < b.not_before {
        return Err(CertError::NotYetValid(b.not_before));
    }
    if now >= b.not_after {
        return Err(CertError::Expired(b.not_after));
    }
    check_body(&b)?;
    Ok(Membership {
        key: cert_key,
        name: b.name,
        addresses: b.addresses,
        routes: b.routes,
        not_after: b.not_after,
        ca: *ca,
    })
}

/// The rules a body must follow (used when signing and when verifying).
pub fn check_body(b: &CertBody) -> Result<(), CertError> {
    let bad = |m: String| Err(CertError::BadField(m));
    if let Err(e) = validate::member_name(&b.name) {
        return bad(e.to_string());
    }
    if b.addresses.len() > MAX_ADDRESSES || b.routes.len() > MAX_ROUTES {
        return bad(format!(
            "at most {MAX_ADDRESSES} addresses and {MAX_ROUTES} routes"
        ));
    }
    for a in &b.addresses {
        if a.prefix_len() != a.max_prefix_len() {
            return bad(format!(
                "address {a} is a range: addresses are single (/32, /128), ranges go in routes"
            ));
        }
    }
    for n in b.addresses.iter().chain(&b.routes) {
        if let Some(rule) = validate::never_a_peer(n.addr()) {
            return bad(format!("{n}: {rule}"));
        }
        if n.prefix_len() == 0 {
            return bad(format!("{n}: a default route is not a member's range"));
        }
    }
    if b.not_after <= b.not_before {
        return bad("not_after is not after not_before".into());
    }
    Ok(())
}

/// An operator CA: an Ed25519 key pair.
#[derive(Debug)]
pub struct Ca {
    pair: Ed25519KeyPair,
}

impl Ca {
    /// A new CA key; returns it and its PKCS#8 document (keep it secret).
    pub fn generate() -> Result<(Ca, Vec<u8>), CertError> {
        let rng = ring::rand::SystemRandom::new();
        let doc =
            Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| CertError::CaKey(e.to_string()))?;
        let ca = Ca::from_pkcs8(doc.as_ref())?;
        Ok((ca, doc.as_ref().to_vec()))
    }

    /// Loads a CA key from its PKCS#8 document.
    pub fn from_pkcs8(doc: &[u8]) -> Result<Ca, CertError> {
        Ed25519KeyPair::from_pkcs8(doc)
            .map(|pair| Ca { pair })
            .map_err(|e| CertError::CaKey(format!("not an Ed25519 PKCS#8 key: {e}")))
    }

    /// The public key peers pin (`membership.ca`).
    pub fn public_key(&self) -> [u8; 32] {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        k
    }

    /// Signs a body after checking it.
    pub fn sign(&self, body: &CertBody) -> Result<String, CertError> {
        check_body(body)?;
        let json = serde_json::to_vec(body).map_err(|e| CertError::BadField(e.to_string()))?;
        let mut signed = SIG_CONTEXT.to_vec();
        signed.extend_from_slice(&json);
        let sig = self.pair.sign(&signed);
        let text = format!("{PREFIX}{}.{}", b64().encode(&json), b64().encode(sig));
        if text.len() > MAX_CERT_LEN {
            return Err(CertError::BadField(format!(
                "the certificate would be {} bytes (at most {MAX_CERT_LEN})",
                text.len()
            )));
        }
        Ok(text)
    }
}

/// Whether `a` and `b` overlap.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Whether `ip` lies in any of `nets`.
pub fn covers(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(key: &PublicKey) -> CertBody {
        CertBody {
            key: key.to_string(),
            name: "db-1".into(),
            addresses: vec!["10.8.0.5/32".parse().expect("net")],
            routes: vec!["10.244.3.0/24".parse().expect("net")],
            not_before: 1000,
            not_after: 2000,
        }
    }

    #[test]
    fn a_signed_certificate_verifies_and_every_tampering_fails() {
        let (ca, doc) = Ca::generate().expect("ca");
        let ca2 = Ca::from_pkcs8(&doc).expect("reload");
        assert_eq!(ca.public_key(), ca2.public_key());
        let key = PublicKey([7u8; 32]);
        let text = ca.sign(&body(&key)).expect("sign");
        let m = verify(&text, &[ca.public_key()], &key, 1500).expect("verifies");
        assert_eq!(m.name, "db-1");
        assert_eq!(m.allowed_ips().len(), 2);

        let (other, _) = Ca::generate().expect("ca");
        assert_eq!(
            verify(&text, &[other.public_key()], &key, 1500),
            Err(CertError::UnknownCa)
        );
        // Several pinned keys (rotation): any one will do.
        assert!(verify(&text, &[other.public_key(), ca.public_key()], &key, 1500).is_ok());
        assert_eq!(
            verify(&text, &[ca.public_key()], &PublicKey([8u8; 32]), 1500),
            Err(CertError::WrongKey)
        );
        assert_eq!(
            verify(&text, &[ca.public_key()], &key, 999),
            Err(CertError::NotYetValid(1000))
        );
        assert_eq!(
            verify(&text, &[ca.public_key()], &key, 2000),
            Err(CertError::Expired(2000))
        );
        // A forged body with the real signature.
        let mut forged = body(&key);
        forged.addresses = vec!["10.8.0.1/32".parse().expect("net")];
        let json = serde_json::to_vec(&forged).expect("json");
        let sig = text.rsplit_once('.').expect("sig").1;
        let f = format!("{PREFIX}{}.{sig}", b64().encode(json));
        assert_eq!(
            verify(&f, &[ca.public_key()], &key, 1500),
            Err(CertError::UnknownCa)
        );
        // Every single-byte change of the text fails without panicking.
        for i in 0..text.len() {
            let mut b = text.clone().into_bytes();
            b[i] ^= 0x01;
            if let Ok(s) = String::from_utf8(b) {
                assert!(
                    verify(&s, &[ca.public_key()], &key, 1500).is_err(),
                    "byte {i}"
                );
            }
        }
        assert!(verify(&"x".repeat(5000), &[ca.public_key()], &key, 1500).is_err());
    }

    #[test]
    fn bodies_are_checked_before_signing() {
        let (ca, _) = Ca::generate().expect("ca");
        let key = PublicKey([7u8; 32]);
        let mut b = body(&key);
        b.addresses = vec!["10.8.0.0/24".parse().expect("net")];
        assert!(ca.sign(&b).is_err(), "a range as an address");
        let mut b = body(&key);
        b.routes = vec!["0.0.0.0/0".parse().expect("net")];
        assert!(ca.sign(&b).is_err(), "default route");
        let mut b = body(&key);
        b.name = "bad name".into();
        assert!(ca.sign(&b).is_err());
        let mut b = body(&key);
        b.addresses = vec!["127.0.0.1/32".parse().expect("net")];
        assert!(ca.sign(&b).is_err());
    }
}
