//! wgice `ice-agent`: per-node ICE beside WireGuard.
//!
//! - [`demux`]: telling STUN, ChannelData and WireGuard apart on the one socket.
//! - [`gather`]: host candidates from the node's interfaces.
//! - [`config`]: the agent's TOML configuration.

pub mod config;
pub mod demux;
pub mod gather;
