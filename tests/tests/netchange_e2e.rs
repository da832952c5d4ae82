//! Network changes for real (issue 12, item 5): a node roams to another
//! router, or its NAT forgets every mapping, while pings cross the
//! overlay; the agent hears of a roam from the kernel (rtnetlink) and of a
//! rebinding from its relay. Bounds asserted here are twice the issue's
//! (relayed again within 1 s, back on the final path within 3 s), for a
//! shared CI box; `examples/netchange_bench.rs` measures against the real
//! ones.

use wgice_tests::netchange::{run, Drill};

/// The value of an unlabelled metric.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn drill(d: Drill, first_ping_bound: f64, path_bound: f64) {
    wgice_tests::require_root();
    let bins = wgice_tests::bins();
    let o = run(&bins, d);
    let changes = metric(&o.metrics, "wgice_network_changes_total");
    let restarts = metric(&o.metrics, "wgice_ice_restarts_total");
    println!("metrics: network changes {changes:?}, ICE restarts {restarts:?}");
    if matches!(d, Drill::Roam | Drill::RoamRelayed) {
        // The kernel told the agent, and the relay saw it at a new address.
        assert!(changes.is_some_and(|c| c >= 1.0), "{}", o.metrics);
        assert!(restarts.is_some_and(|r| r >= 1.0), "{}", o.metrics);
    } else {
        // A NAT elsewhere forgot its mappings: the node saw no event, but
        // the series are there.
        assert!(changes.is_some() && restarts.is_some(), "{}", o.metrics);
    }
    assert!(
        o.metrics.contains("wgice_relay_active{relay=\"") && o.metrics.contains("} 1"),
        "{}",
        o.metrics
    );
    println!(
        "{}: first ping after {:?} s, longest gap {:.2} s, back on {} after {:?} s; row {}",
        d.name(),
        o.first_ping_s,
        o.longest_gap_s,
        d.path(),
        o.path_again_s,
        o.row
    );
    let first = o.first_ping_s.expect("no ping answered after the change");
    assert!(
        first <= first_ping_bound,
        "{}: first ping after {first:.2} s",
        d.name()
    );
    let back = o
        .path_again_s
        .unwrap_or_else(|| panic!("{}: never back on {}: {}", d.name(), d.path(), o.row));
    assert!(
        back <= path_bound,
        "{}: back on {} after {back:.2} s",
        d.name(),
        d.path()
    );
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn roaming_node_is_reachable_at_once_and_direct_again_soon() {
    drill(Drill::Roam, 2.0, 6.0);
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn roaming_relayed_node_gets_a_new_allocation_at_once() {
    drill(Drill::RoamRelayed, 2.0, 6.0);
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn nat_rebinding_on_a_direct_path_recovers() {
    drill(Drill::Rebind, 2.0, 6.0);
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn nat_rebinding_on_a_relayed_path_recovers() {
    drill(Drill::RebindRelayed, 2.0, 6.0);
}
