//! The README's main job, `netsim demo`, run as a user runs it: the punching
//! scenario, then the whole suite (relay, signaling, wireguard-go and
//! ice-agent on four devices). It must pass every check it prints.

use std::process::Command;

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn netsim_demo_passes_every_check() {
    wgice_tests::require_root();
    let netsim = wgice_tests::workspace_bin("netsim");
    let _ = wgice_tests::bins();
    // The demo writes its scenario report under ./out: keep it out of the tree.
    let dir = std::env::temp_dir().join(format!("wgice-demo-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = Command::new(&netsim)
        .arg("demo")
        .current_dir(&dir)
        .output()
        .expect("run netsim demo");
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "netsim demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "alice ↔ dave: lan",
        "alice ↔ bob: direct",
        "alice ↔ carol: direct",
        "via birthday probing after",
        "fell back to the relay",
        "direct again",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    assert!(!text.contains('✗'), "a check failed:\n{text}");
    // The LAN shortcut (WireGuard straight to the peer's WireGuard port)
    // is not mistaken for a blackhole: dave (10.77.0.4) stays on the LAN
    // path in alice's status.
    let dave = text
        .lines()
        .find(|l| l.contains("└ 10.77.0.4/32"))
        .unwrap_or_else(|| panic!("no row for dave in:\n{text}"));
    assert!(dave.contains("direct (LAN"), "{dave}\n{text}");
}
