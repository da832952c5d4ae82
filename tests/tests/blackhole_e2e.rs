//! Blackhole drills, for real: netsim routers with nftables rules that drop
//! WireGuard data (type 4) or datagrams above a size on the direct path
//! only, while STUN checks (and the relay path) pass. The agents must leave
//! the direct pair for the relay, overlay pings must come back within 6 s
//! (the target is 3 s; `blackhole_bench` measures it), and the status must
//! say why.

use std::time::Duration;

use netsim::impair::Blackhole;
use netsim::nat::NatPreset;
use wgice_tests::mesh::{Bins, BlackholeDrill, MeshLab};

fn setup() -> Bins {
    wgice_tests::require_root();
    wgice_tests::bins()
}

const BOUND: Duration = Duration::from_secs(6);

fn check(d: &BlackholeDrill, m: &MeshLab, kind: &str, reason: &str) {
    println!(
        "{kind}: recovered {:?}, status relay after {:?}, {} drops",
        d.recovered, d.status_relay, d.drops
    );
    assert!(
        d.answered_before > 0,
        "no pings before the blackhole\n{}",
        m.logs()
    );
    assert!(d.drops > 0, "the blackhole dropped nothing");
    let rec = d
        .recovered
        .unwrap_or_else(|| panic!("pings never came back\n{d:#?}\n{}", m.logs()));
    assert!(rec <= BOUND, "recovery took {rec:?}\n{}", m.logs());
    for row in [&d.row_a, &d.row_b] {
        let row = row.as_ref().expect("status row");
        assert_eq!(row["path"], "relay", "{row:#}\n{}", m.logs());
        let r = row["reason"].as_str().unwrap_or_default();
        assert!(r.starts_with(reason), "reason {r:?}");
        assert_eq!(row["blackhole"]["kind"], kind, "{row:#}");
    }
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn data_blackhole_is_left_for_the_relay() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    let (a, b) = m.pair(NatPreset::PortRestricted, NatPreset::PortRestricted);
    m.start_and_wait(&[a, b], "direct");
    let d = m.blackhole_drill(a, b, Blackhole::WireguardData, 56);
    check(
        &d,
        &m,
        "data",
        "direct path answers checks but drops data: relayed",
    );
    // The verdict is counted (one side's, or both sides' own).
    let counted = |i| {
        m.metrics(i)
            .lines()
            .find_map(|l| {
                l.strip_prefix("wgice_blackhole_verdicts_total{kind=\"data\"} ")?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    assert!(counted(a) + counted(b) >= 1, "{}", m.metrics(a));
    // Healed: after the 15 s ban direct carries data again.
    m.heal_blackhole("ra");
    m.wait_path(a, b, "direct", Duration::from_secs(30))
        .unwrap();
    assert!(m.ping(a, b, 3), "no ping back on direct\n{}", m.logs());
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn mtu_blackhole_is_left_for_the_relay_and_the_limit_reported() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    let (a, b) = m.pair(NatPreset::PortRestricted, NatPreset::PortRestricted);
    m.start_and_wait(&[a, b], "direct");
    // 1392 bytes of ICMP payload fill the 1420-byte MTU: 1452-byte datagrams.
    let d = m.blackhole_drill(a, b, Blackhole::Above(1300), 1392);
    check(&d, &m, "mtu", "direct path drops datagrams above ");
    let row = d.row_a.as_ref().expect("row");
    let largest = row["blackhole"]["largest_ok"].as_u64().unwrap_or(0);
    assert!(
        (1200..=1300).contains(&largest),
        "largest size through {largest}: {row:#}"
    );
    assert!(
        row["reason"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("above {largest} bytes")),
        "{row:#}"
    );
    // Full-size packets cross the overlay on the relay.
    assert!(m.ping_sized(a, b, 3, 1392), "{}", m.logs());
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn embedded_data_blackhole_is_left_for_the_relay() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    m.add_router("ra", NatPreset::PortRestricted);
    m.add_router("rb", NatPreset::PortRestricted);
    let a = m.add_embedded_node("a", "ra");
    let b = m.add_embedded_node("b", "rb");
    m.start_and_wait(&[a, b], "direct");
    let d = m.blackhole_drill(a, b, Blackhole::WireguardData, 56);
    check(
        &d,
        &m,
        "data",
        "direct path answers checks but drops data: relayed",
    );
}
