//! Cross-crate end-to-end tests live in `tests/tests/`; this library holds
//! the helpers they share.

use std::path::PathBuf;

pub use netsim::mesh;

/// True when tests that need root (network namespaces, nftables) can run.
/// Under `CI=true` not being able to run them is a failure, not a skip.
pub fn can_run_netns() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").map(|v| v != "true").unwrap_or(true),
        "CI=true: netns tests need root and cannot be skipped"
    );
    eprintln!("skipped: needs root (network namespaces, nftables)");
    false
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A binary of this workspace built into the same target profile as the
/// running test (`cargo build --workspace --bins` first; `scripts/test` does).
/// Under `CI=true` a missing binary fails the test; otherwise `None` skips it.
pub fn workspace_bin(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let path = exe.parent()?.parent()?.join(name);
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("CI").map(|v| v != "true").unwrap_or(true),
        "CI=true: {} is missing; build the workspace binaries first (cargo build --workspace --bins)",
        path.display()
    );
    eprintln!(
        "skipped: {} not built (cargo build --workspace --bins)",
        path.display()
    );
    None
}

/// The `relay`, `signaling` and `ice-agent` binaries for a
/// [`mesh::MeshLab`]; like [`workspace_bin`], a failure under `CI=true`.
pub fn bins() -> Option<mesh::Bins> {
    Some(mesh::Bins {
        relay: workspace_bin("relay")?,
        signaling: workspace_bin("signaling")?,
        agent: workspace_bin("ice-agent")?,
    })
}
