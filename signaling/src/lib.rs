//! wgice `signaling`: authenticated rendezvous for WireGuard nodes.
//!
//! Nodes register with their WireGuard public key (proving they hold the
//! private key), join a mesh with a token, see which mesh members are online,
//! and exchange ICE offers and candidates sealed end to end with their
//! WireGuard keys; the server routes ciphertext it can neither read nor forge.
//!
//! Sans-IO protocol parts (no sockets, no clock):
//! - [`keys`]: identities (X25519 public keys) and the KDF;
//! - [`seal`]: [`seal::PeerMessage`]s sealed into [`seal::Envelope`]s,
//!   replay-checked by a [`seal::Opener`];
//! - [`auth`]: proof of key possession and mesh tokens;
//! - [`wire`]: client/server frames and framing;
//! - [`router`]: routing, presence, rate limits, cluster view.
//!
//! Drivers: [`server`] (QUIC + TLS over TCP, NATS, metrics) and
//! [`client`] (what the agent embeds).

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod auth;
pub mod client;
#[cfg(feature = "server")]
pub mod config;
pub mod keys;
#[cfg(feature = "server")]
pub mod router;
pub mod seal;
#[cfg(feature = "server")]
pub mod server;
pub mod tls;
pub mod wire;

pub use keys::{PrivateKey, PublicKey};
pub use seal::{Envelope, PeerMessage};
