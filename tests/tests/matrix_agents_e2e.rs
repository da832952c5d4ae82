//! A representative subset of `netsim matrix --agents` (issue 12, item 7):
//! real relay, signaling, wireguard-go and ice-agent per pair, each pair in
//! its own lab. Every pair must answer pings through the overlay and end on
//! the path theory allows. The full matrix is `netsim matrix --agents`
//! (docs/matrix.md), outside the default run.

use netsim::agent_matrix::{self, Case};

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn representative_pairs_connect_on_the_path_theory_allows() {
    wgice_tests::require_root();
    let bins = wgice_tests::bins();
    let cases: Vec<Case> = [
        // open side: direct
        "none:symmetric",
        // both endpoint-independent, filtering: direct by punching
        "port-restricted:cgnat",
        // random symmetric against port-restricted: direct by birthday probing
        "symmetric:port-restricted",
        // sequential symmetric against cgnat: direct by port prediction
        "symmetric-sequential:cgnat",
        // two sequential symmetric NATs: direct by the coordinated punch
        "symmetric-sequential:symmetric-sequential",
        // UDP blocked: relayed over TCP/TLS
        "udp-blocked:full-cone",
        // the gateway's mapping makes the symmetric side direct
        "upnp-symmetric:symmetric-sequential",
        // one router, no hairpin: the LAN path
        "symmetric:symmetric:lan",
    ]
    .iter()
    .map(|s| Case::parse(s).expect("case"))
    .collect();
    let rows = agent_matrix::run(&bins, &cases, 1, 3, &|c, s| {
        println!("{}: {} {:?}", c.label(), s.path, s.error)
    });
    print!("{}", agent_matrix::table(&rows));
    let bad: Vec<_> = rows.iter().filter(|r| !r.ok).collect();
    assert!(bad.is_empty(), "rows off theory: {bad:#?}");
    for r in &rows {
        let first = r.first_ping_ms.expect("every ok row pinged");
        assert!(
            first < 15_000,
            "{}: first ping after {first} ms",
            r.case.label()
        );
    }
}
