//! Proof of key possession on connect, and mesh admission.
//!
//! # Identity proof
//! For every connection the server makes a fresh X25519 key pair and a random
//! nonce and sends both in its [`Challenge`](crate::wire::ServerFrame::Challenge).
//! The node answers with
//!
//! ```text
//! K     = HKDF(X25519(node private, server ephemeral public), "wgice-signaling auth v1",
//!              node public || server ephemeral public)
//! proof = HMAC-SHA256(K, nonce || channel binding || len(mesh) || mesh || node public)
//! ```
//!
//! The server computes the same `K` from its ephemeral private key and the
//! claimed node key. Only the holder of the node's private key can produce
//! the proof, so nobody can register as (or receive for) a key they don't
//! hold. The channel binding is a TLS exporter value (RFC 5705 / RFC 8446
//! §7.5) of the connection the proof travels on, so a proof obtained by a
//! rogue server cannot be replayed to the real one over another connection.
//!
//! # Mesh admission
//! A [`MeshAuth`] decides who may join which mesh: either a static token per
//! mesh, or tokens derived from one server secret as
//! `base64url(HMAC-SHA256(secret, "wgice-mesh-token v1:" || mesh))`, which an
//! operator issues with `signaling token --mesh NAME` without reconfiguring
//! the server. Meshes are isolated: routing and presence are keyed by mesh.

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::keys::{hmac, hmac_verify, kdf, PrivateKey, PublicKey};

const AUTH_LABEL: &[u8] = b"wgice-signaling auth v1";
const TOKEN_LABEL: &[u8] = b"wgice-mesh-token v1:";
/// TLS exporter label for the channel binding.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-wgice-signaling-auth";

/// The server's half of one connection's handshake.
#[derive(Debug)]
pub struct ServerChallenge {
    ephemeral: PrivateKey,
    /// Ephemeral public key sent to the node.
    pub server_key: PublicKey,
    /// Random nonce sent to the node.
    pub nonce: [u8; 32],
}

/// Why a registration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// The proof does not match the claimed key.
    #[error("proof of key possession failed for {0}")]
    BadProof(PublicKey),
    /// Unknown mesh or wrong token.
    #[error("mesh {0:?}: token refused")]
    BadToken(String),
    /// Mesh name not acceptable.
    #[error("mesh name {0:?} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -")]
    BadMeshName(String),
}

impl ServerChallenge {
    /// A fresh challenge.
    pub fn new() -> Self {
        let ephemeral = PrivateKey::generate();
        ServerChallenge {
            server_key: ephemeral.public_key(),
            ephemeral,
            nonce: rand::random(),
        }
    }

    /// Checks `proof` for `node`, `mesh` on the channel with `binding`.
    pub fn verify(
        &self,
        node: &PublicKey,
        mesh: &str,
        binding: &[u8],
        proof: &[u8],
    ) -> Result<(), AuthError> {
        let shared = self
            .ephemeral
            .diffie_hellman(node)
            .ok_or(AuthError::BadProof(*node))?;
        let k = kdf(&shared, AUTH_LABEL, &[&node.0, &self.server_key.0]);
        let mesh_len = (mesh.len() as u32).to_be_bytes();
        let ok = hmac_verify(
            &k,
            &[&self.nonce, binding, &mesh_len, mesh.as_bytes(), &node.0],
            proof,
        );
        if ok {
            Ok(())
        } else {
            Err(AuthError::BadProof(*node))
        }
    }
}

impl Default for ServerChallenge {
    fn default() -> Self {
        Self::new()
    }
}

/// The node's answer to a challenge. `None` if the server key is unusable.
pub fn prove(
    node: &PrivateKey,
    server_key: &PublicKey,
    nonce: &[u8],
    binding: &[u8],
    mesh: &str,
) -> Option<[u8; 32]> {
    let public = node.public_key();
    let shared = node.diffie_hellman(server_key)?;
    let k = kdf(&shared, AUTH_LABEL, &[&public.0, &server_key.0]);
    let mesh_len = (mesh.len() as u32).to_be_bytes();
    Some(hmac(
        &k,
        &[nonce, binding, &mesh_len, mesh.as_bytes(), &public.0],
    ))
}

/// Checks a mesh name: 1-64 characters from `A-Z a-z 0-9 . _ -`.
pub fn valid_mesh_name(mesh: &str) -> bool {
    (1..=64).contains(&mesh.len())
        && mesh
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Who may join which mesh.
#[derive(Clone, Default)]
pub struct MeshAuth {
    /// SHA-256 of each mesh's static token.
    static_tokens: HashMap<String, [u8; 32]>,
    /// Secret from which per-mesh tokens are derived.
    secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for MeshAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshAuth")
            .field("meshes", &self.static_tokens.keys().collect::<Vec<_>>())
            .field("derived_tokens", &self.secret.is_some())
            .finish()
    }
}

impl MeshAuth {
    /// Admits nobody.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a mesh with a static token.
    pub fn with_mesh(mut self, mesh: &str, token: &str) -> Self {
        self.static_tokens
            .insert(mesh.to_string(), Sha256::digest(token.as_bytes()).into());
        self
    }

    /// Also admits any mesh whose token is derived from `secret` (see module doc).
    pub fn with_secret(mut self, secret: &[u8]) -> Self {
        self.secret = Some(secret.to_vec());
        self
    }

    /// The token for `mesh` derived from `secret`.
    pub fn derive_token(secret: &[u8], mesh: &str) -> String {
        B64URL.encode(hmac(secret, &[TOKEN_LABEL, mesh.as_bytes()]))
    }

    /// Decides whether `token` admits to `mesh` (constant-time comparisons).
    pub fn check(&self, mesh: &str, token: &str) -> Result<(), AuthError> {
        if !valid_mesh_name(mesh) {
            return Err(AuthError::BadMeshName(mesh.to_string()));
        }
        if let Some(expected) = self.static_tokens.get(mesh) {
            let got: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            // Both sides hashed: comparing digests leaks nothing useful, but
            // compare in constant time anyway.
            if got
                .iter()
                .zip(expected.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
            {
                return Ok(());
            }
        }
        if let Some(secret) = &self.secret {
            if let Ok(tag) = B64URL.decode(token.as_bytes()) {
                if hmac_verify(secret, &[TOKEN_LABEL, mesh.as_bytes()], &tag) {
                    return Ok(());
                }
            }
        }
        Err(AuthError::BadToken(mesh.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_of_key_passes() {
        let node = PrivateKey::generate();
        let ch = ServerChallenge::new();
        let proof = prove(&node, &ch.server_key, &ch.nonce, b"bind", "m").unwrap();
        ch.verify(&node.public_key(), "m", b"bind", &proof).unwrap();
    }

    #[test]
    fn impersonation_fails() {
        let victim = PrivateKey::generate().public_key();
        let mallory = PrivateKey::generate();
        let ch = ServerChallenge::new();
        // Mallory proves with her own key but claims the victim's.
        let proof = prove(&mallory, &ch.server_key, &ch.nonce, b"bind", "m").unwrap();
        assert_eq!(
            ch.verify(&victim, "m", b"bind", &proof),
            Err(AuthError::BadProof(victim))
        );
        // A proof for another challenge, another channel or mesh is useless.
        let node = PrivateKey::generate();
        let other = ServerChallenge::new();
        let proof = prove(&node, &other.server_key, &other.nonce, b"bind", "m").unwrap();
        assert!(ch.verify(&node.public_key(), "m", b"bind", &proof).is_err());
        let proof = prove(&node, &ch.server_key, &ch.nonce, b"other", "m").unwrap();
        assert!(ch.verify(&node.public_key(), "m", b"bind", &proof).is_err());
        let proof = prove(&node, &ch.server_key, &ch.nonce, b"bind", "n").unwrap();
        assert!(ch.verify(&node.public_key(), "m", b"bind", &proof).is_err());
        // A low-order "public key" is refused, never trusted.
        assert!(ch
            .verify(&PublicKey([0; 32]), "m", b"bind", &[0; 32])
            .is_err());
    }

    #[test]
    fn mesh_tokens() {
        let auth = MeshAuth::new()
            .with_mesh("alpha", "alpha-token")
            .with_secret(b"s3cret");
        auth.check("alpha", "alpha-token").unwrap();
        assert!(auth.check("alpha", "beta-token").is_err());
        assert!(auth.check("beta", "alpha-token").is_err());
        let t = MeshAuth::derive_token(b"s3cret", "beta");
        auth.check("beta", &t).unwrap();
        // A derived token is bound to its mesh.
        assert!(auth.check("gamma", &t).is_err());
        assert!(auth.check("bad name!", &t).is_err());
        assert!(MeshAuth::new().check("alpha", "alpha-token").is_err());
    }
}
