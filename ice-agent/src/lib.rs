//! wgice `ice-agent`: one sans-IO ICE session per WireGuard peer (on str0m's
//! [`is`] agent), the path policy that decides where WireGuard traffic goes,
//! and the daemon's building blocks.
//!
//! Nothing in the session opens a socket, spawns a task or reads the clock:
//! time comes in as `now`, datagrams come in through
//! [`PeerSession::handle_stun`] and go out through
//! [`PeerSession::poll_transmit`]. The daemon owns the UDP socket, the
//! signaling connection and WireGuard control.
//!
//! - [`PeerSession`], [`PathStatus`]: ICE per peer and the path policy.
//! - [`demux`]: telling STUN, ChannelData and WireGuard apart on the one socket.
//! - [`gather`]: host candidates from the node's interfaces.
//! - [`config`]: the agent's TOML configuration.
//! - [`validate`]: checks on every field another mesh member controls;
//!   [`cert`]: membership certificates (an operator CA binds names and
//!   overlay addresses to WireGuard keys).
//! - [`status`]: what `ice-agent status` shows (table and JSON).
//! - [`agent`]: the sans-IO core over all peers (sessions, TURN, signaling
//!   exchange, routes); [`daemon`]: its tokio driver (set up, main loop,
//!   shut down); [`dataplane`]: where WireGuard packets go; [`wg`]:
//!   WireGuard interface control (UAPI or the `wg` tool); `wgowner`: which
//!   WireGuard peers the agent owns and how it restores them (a sans-IO
//!   core and the `wg-control` thread); [`control`]: the control socket
//!   and [`control::Status`]; `metrics`: `/metrics` and `/healthz`.
//! - [`netcheck`]: `ice-agent netcheck` (UDP, NAT mapping and filtering,
//!   hairpin, port mapping on the gateway, relay latency and TCP/TLS
//!   reachability); [`netcheck::NatFacts`] is the part peers can use.
//! - [`punch`]: the coordinated punch between two sequential symmetric
//!   NATs; [`birthday`]: birthday probing against a random symmetric NAT
//!   (both sans-IO; `sockets` holds the daemon's birthday sockets).
//!
//! See `docs/ice-agent.md` for the design.
#![warn(missing_docs)]

pub mod agent;
pub mod cert;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
/// Telling STUN, ChannelData and WireGuard apart (the relay crate's
/// classifier, shared by relay, agent and netsim).
pub use relay::demux;
pub mod birthday;
pub mod blackhole;
pub mod gather;
mod metrics;
pub mod netcheck;
pub mod netwatch;
mod path;
pub mod portmap;
pub mod punch;
mod session;
mod sockets;
pub mod status;
pub mod turn_stream;
pub mod udp;
pub mod validate;
pub mod wg;
mod wgowner;

pub use path::{classify, Classification, PathKind, WgicePreference};
pub use session::{
    is_controlling, should_switch, BlackholeInfo, BlackholeReport, PathReport, PathStatus,
    PeerSession, RelayView, SessionConfig, SessionError, SessionEvent, SessionStats, Transmit, Via,
};

/// Re-exported `is` types that appear in this crate's API.
pub use is::{Candidate, CandidateKind, IceConnectionState, IceCreds};
