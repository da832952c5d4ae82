//! wgice `netsim`: a lab of Linux network namespaces with real nftables NATs.
//!
//! * [`lab::Lab`] builds the topology: an internet core, routers with a
//!   [`nat::NatPreset`], devices behind them, public hosts; and changes it at
//!   run time (links down/up, roaming, NAT flush, preset change, impairment).
//! * [`probe`] classifies a NAT the RFC 5780 way against the built-in
//!   [`reflector`], so every preset is checked to behave as named.
//! * [`punch`] and [`matrix`] measure simultaneous UDP hole punching for
//!   every pair of presets.
//! * [`scenario`] runs TOML scenario files (processes, fault drills, checks).
//!
//! Everything here needs root (network namespaces, nftables).

pub mod agent_matrix;
pub mod impair;
pub mod lab;
pub mod matrix;
pub mod mesh;
pub mod nat;
pub mod probe;
pub mod punch;
pub mod reflector;
pub mod scenario;
pub mod stun_client;
mod sys;

pub use sys::is_root;

/// Fails unless running as root: for tests that need network namespaces.
/// Such tests are `#[ignore]`d by default (a plain `cargo test` lists them
/// as ignored); run on purpose (`--include-ignored`, as `scripts/test`
/// does) they fail rather than pass when they cannot run. The one "can
/// root tests run" helper of the workspace.
pub fn require_root() {
    assert!(
        is_root(),
        "needs root (network namespaces, nftables): run as root, or leave it ignored"
    );
}

/// Errors of the lab.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// netsim needs root for namespaces and nftables.
    #[error("netsim needs root (network namespaces, nftables); run it as root")]
    NotRoot,
    /// A system command failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Entering or using a namespace failed.
    #[error("namespace {ns}: {reason}")]
    Netns {
        /// The namespace.
        ns: String,
        /// Why.
        reason: String,
    },
    /// A lab or scenario description is wrong.
    #[error("{0}")]
    Config(String),
    /// A probe could not run.
    #[error("probe: {0}")]
    Probe(String),
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
