//! Shared test helpers.
#![allow(dead_code)]

/// Returns false (and says why) when namespace tests cannot run here; under
/// `CI=true` that is a failure, not a skip.
pub(crate) fn can_run() -> bool {
    if netsim::is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true: netns tests need root and cannot be skipped");
    }
    eprintln!("skipped: needs root (network namespaces, nftables)");
    false
}
