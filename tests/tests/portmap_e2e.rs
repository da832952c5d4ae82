//! Port mapping end to end: node `a` sits behind a symmetric NAT whose
//! router runs a UPnP-IGD / NAT-PMP / PCP gateway (miniupnpd); its agent
//! asks the gateway to map its ICE port, offers the mapped address as a
//! candidate, and a port-restricted peer reaches it **directly** — the same
//! pair is relayed with `[ice] port_mapping = false`. On SIGTERM the agent
//! deletes the mapping at the gateway.

use std::time::{Duration, Instant};

use netsim::nat::{NatPreset, RouterConfig};
use wgice_tests::mesh::{s, Bins, MeshLab};

fn setup() -> Bins {
    wgice_tests::require_root();
    wgice_tests::bins()
}

/// The agents' ICE port in a mesh lab.
const AGENT_PORT: u16 = 51821;

/// `a` behind a symmetric NAT with a port-mapping gateway (UPnP-IGD only,
/// or with NAT-PMP and PCP too), `b` behind a port-restricted one; `a`'s
/// port mapping on or off.
fn lab(bins: &Bins, port_mapping: bool, upnp_only: bool) -> (MeshLab, usize, usize) {
    let mut m = MeshLab::new(bins);
    let mut gw = RouterConfig::new(NatPreset::Symmetric);
    gw.upnp = true;
    gw.upnp_only = upnp_only;
    m.lab.add_router("ra", gw).expect("gateway router");
    m.add_router("rb", NatPreset::PortRestricted);
    let a = m.add_node("a", "ra");
    let b = m.add_node("b", "rb");
    if !port_mapping {
        let config = &m.nodes[a].config;
        let text = std::fs::read_to_string(config).expect("config");
        std::fs::write(config, text + "\n[ice]\nport_mapping = false\n").expect("config");
    }
    (m, a, b)
}

/// miniupnpd's DNAT rules on router `ra` (its nftables chain).
fn gateway_rules(m: &MeshLab) -> String {
    let (ok, out) = m
        .lab
        .exec(
            "ra",
            &[
                s("nft"),
                s("list"),
                s("chain"),
                s("inet"),
                s("filter"),
                s("prerouting_miniupnpd"),
            ],
        )
        .expect("nft");
    assert!(ok, "{out}");
    out
}

/// The lab router's copy of the gateway's UDP mappings (`NatBox::upnp`).
fn upnp_map(m: &MeshLab) -> String {
    let (_, out) = m
        .lab
        .exec(
            "ra",
            &[
                s("nft"),
                s("list"),
                s("map"),
                s("ip"),
                s("wgnat"),
                s("upnp"),
            ],
        )
        .expect("nft");
    out
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn a_port_mapped_node_behind_a_symmetric_nat_goes_direct_and_deletes_the_mapping_on_exit() {
    direct_with_mapping(false);
}

/// The same with a gateway that speaks only UPnP-IGD: the agent finds it
/// by SSDP, maps with `AddPortMapping` and deletes with `DeletePortMapping`.
#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn a_upnp_igd_only_gateway_maps_the_port_too() {
    direct_with_mapping(true);
}

fn direct_with_mapping(upnp_only: bool) {
    let bins = setup();
    let (m, a, b) = lab(&bins, true, upnp_only);
    let a_lan = m.nodes[a].lan_ip;
    let ra_wan = m.lab.ip("ra").expect("ra");
    let t0 = Instant::now();
    m.start_agent(a);
    // The gateway has the mapping (and the lab's router applies it to
    // outbound flows too: its watcher lags miniupnpd by up to ~20 ms, a
    // real gateway does not) before b's candidates reach a.
    while !upnp_map(&m).contains(&a_lan.to_string()) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no mapping at the gateway: {}\n{}",
            upnp_map(&m),
            m.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("mapped at the gateway {:?} after a started", t0.elapsed());
    let t0 = Instant::now();
    m.start_agent(b);
    let (row, took) = m
        .wait_path(a, b, "direct", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));
    m.wait_path(b, a, "direct", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));
    println!("direct after {took:?} (b started {:?} ago)", t0.elapsed());
    println!("a → b: {row:#}");
    // a's status names the mapping; b talks to exactly that address.
    let status = m.status(a).expect("status");
    let pm = status["port_mapping"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    println!("port mapping: {pm}");
    let by = if upnp_only {
        pm.contains("UPnP-IGD")
    } else {
        pm.contains("PCP") || pm.contains("NAT-PMP")
    };
    assert!(
        pm.contains(&format!("{ra_wan}:")) && by,
        "{pm:?}\n{}",
        m.logs()
    );
    let mapped = pm.split_whitespace().next().unwrap_or_default().to_owned();
    let remote = m.peer_status(b, a).expect("b's row")["remote"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(remote, mapped, "b reaches a on its port-mapped address");
    let table = m.status_table(a);
    assert!(table.contains("port mapping: "), "{table}");
    assert!(
        m.ping(a, b, 5),
        "no ping over the direct path\n{}",
        m.logs()
    );
    // The gateway forwards the port while the agent runs ...
    let want = format!("{a_lan}:{AGENT_PORT}");
    assert!(gateway_rules(&m).contains(&want), "{}", gateway_rules(&m));
    // ... and forgets it when the agent exits.
    assert_eq!(
        m.stop_agent(a),
        Some(0),
        "a did not exit cleanly\n{}",
        m.logs()
    );
    let t1 = Instant::now();
    while gateway_rules(&m).contains(&want) {
        assert!(
            t1.elapsed() < Duration::from_secs(3),
            "mapping left behind:\n{}\n{}",
            gateway_rules(&m),
            m.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("mapping deleted {:?} after the agent exited", t1.elapsed());
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn without_the_port_mapping_the_same_pair_goes_direct_only_by_birthday_probing() {
    let bins = setup();
    let (m, a, b) = lab(&bins, false, false);
    m.start_agent(a);
    m.start_agent(b);
    m.wait_path(a, b, "relay", Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));
    assert!(m.ping(a, b, 3), "no ping over the relay\n{}", m.logs());
    // No mapping: a's NAT picks a random port per destination, so only
    // birthday probing (b's side is endpoint-independent) gets direct.
    let (row, took) = m
        .wait_path(a, b, "direct", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));
    println!("direct after {took:?}: {}", row["reason"]);
    assert!(
        row["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("via birthday probing"),
        "{row:#}"
    );
    assert!(m.status(a).expect("status")["port_mapping"].is_null());
    assert!(m.status_table(a).contains("port mapping: off"));
    assert!(
        !gateway_rules(&m).contains(&m.nodes[a].lan_ip.to_string()),
        "{}",
        gateway_rules(&m)
    );
}
