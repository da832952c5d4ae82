//! Cross-crate end-to-end tests live in `tests/tests/`; this library holds
//! the helpers they share.

use std::path::PathBuf;

pub use netsim::mesh;

pub use netsim::require_root;

pub mod netchange;
pub mod ping_trace;

/// A binary of this workspace built into the same target profile as the
/// running test (`cargo build --workspace --bins` first; `scripts/test`
/// does). A missing binary fails the test.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join(name))
        .expect("target directory");
    assert!(
        path.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --release --workspace --bins)",
        path.display()
    );
    path
}

/// The `relay`, `signaling` and `ice-agent` binaries for a
/// [`mesh::MeshLab`] (see [`workspace_bin`]).
pub fn bins() -> mesh::Bins {
    mesh::Bins {
        relay: workspace_bin("relay"),
        signaling: workspace_bin("signaling"),
        agent: workspace_bin("ice-agent"),
    }
}
