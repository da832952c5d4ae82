//! Shared test helpers.
#![allow(dead_code)]

/// Namespace tests are `#[ignore]`d by default (a plain `cargo test` lists
/// them as ignored); run on purpose (`--include-ignored`, as `scripts/test`
/// does), they fail rather than pass when they cannot run.
pub(crate) fn require_root() {
    assert!(
        netsim::is_root(),
        "needs root (network namespaces, nftables): run as root, or leave it ignored"
    );
}
