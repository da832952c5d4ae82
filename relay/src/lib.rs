//! wgice relay: a STUN (RFC 8489, RFC 5780) and TURN (RFC 8656) server, and
//! the sans-IO TURN client the agent embeds.
//!
//! - [`stun`]: the zero-copy message codec; [`demux`]: STUN, ChannelData or
//!   WireGuard, from a datagram's first bytes.
//! - [`server`]: the sans-IO server core (one shard).
//! - [`client`]: the sans-IO TURN client.
//! - [`auth`], [`policy`]: credentials, nonces, rate limits, peer policy.
//! - [`driver`]: the I/O around the core (UDP workers, TCP/TLS, metrics).
//! - [`config`]: CLI and TOML configuration of the `relay` binary.
//! - [`http`] (feature `http`): the `/metrics` and `/healthz` responder the
//!   relay, signaling and the agent share.

pub mod auth;
pub mod client;
#[cfg(feature = "server")]
pub mod config;
pub mod demux;
#[cfg(feature = "server")]
pub mod driver;
#[cfg(feature = "http")]
pub mod http;
pub mod policy;
#[cfg(feature = "server")]
pub mod server;
pub mod stun;
