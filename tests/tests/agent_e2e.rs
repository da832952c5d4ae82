//! `ice-agent` end to end, for real: netsim namespaces with nftables NATs,
//! the `relay` and `signaling` binaries on a public host, `wireguard-go`
//! interfaces, and one agent per node in external mode. Each case checks
//! the path both agents report (and why), where WireGuard's endpoint points,
//! and that a ping crosses the overlay.

use std::time::Duration;

use netsim::nat::NatPreset;
use wgice_tests::mesh::{pipe, run, s, Bins, MeshLab};

fn setup() -> Bins {
    wgice_tests::require_root();
    wgice_tests::bins()
}

const CONNECT: Duration = Duration::from_secs(15);

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn same_lan_goes_lan_with_the_endpoint_straight_at_the_peer() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    m.add_router("r", NatPreset::PortRestricted);
    let a = m.add_node("a", "r");
    let b = m.add_node("b", "r");
    m.start_agent(a);
    m.start_agent(b);
    let (row, _) = m.wait_path(a, b, "lan", CONNECT).unwrap();
    m.wait_path(b, a, "lan", CONNECT).unwrap();
    let reason = row["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("LAN"), "reason {reason:?}");
    // WireGuard talks to the peer's WireGuard port directly, not via the agent.
    let want = format!("{}:51820", m.nodes[b].lan_ip);
    let peers = m.wg_peers(a);
    let ep = peers
        .iter()
        .find(|p| p.0 == m.nodes[b].public_key)
        .map(|p| p.1.clone());
    assert_eq!(ep.as_deref(), Some(want.as_str()), "peers: {peers:?}");
    assert!(m.ping(a, b, 5), "no ping over the LAN path\n{}", m.logs());
    // SIGTERM: the agent exits by itself and removes the peer it created.
    assert_eq!(
        m.stop_agent(a),
        Some(0),
        "a did not exit cleanly\n{}",
        m.logs()
    );
    let peers = m.wg_peers(a);
    assert!(
        !peers.iter().any(|p| p.0 == m.nodes[b].public_key),
        "agent left its peer behind: {peers:?}"
    );
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn dual_stack_lan_prefers_ipv6() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    m.add_router("r", NatPreset::PortRestricted);
    let a = m.add_node("a", "r");
    let b = m.add_node("b", "r");
    for (i, ip) in [(a, "fd77::a/64"), (b, "fd77::b/64")] {
        m.exec(
            i,
            &[
                s("ip"),
                s("-6"),
                s("addr"),
                s("add"),
                s(ip),
                s("dev"),
                s("eth0"),
                s("nodad"),
            ],
        );
    }
    m.start_agent(a);
    m.start_agent(b);
    let (row, _) = m.wait_path(a, b, "lan", CONNECT).unwrap();
    // The IPv6 pair wins (slightly preferred), and WireGuard goes straight
    // to the peer's IPv6 address.
    let mut remote = row["remote"].as_str().unwrap_or_default().to_owned();
    for _ in 0..100 {
        if remote.starts_with("[fd77::b]") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        remote = m.peer_status(a, b).unwrap()["remote"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
    }
    assert_eq!(remote, "[fd77::b]:51821", "{}", m.logs());
    let ep = m.wg_peer_fields(a, &m.nodes[b].public_key).unwrap()[2].clone();
    assert_eq!(ep, "[fd77::b]:51820");
    assert!(m.ping(a, b, 3), "no ping over IPv6\n{}", m.logs());
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn port_restricted_pair_goes_direct_and_the_agent_restores_on_exit() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    let (a, b) = m.pair(NatPreset::PortRestricted, NatPreset::PortRestricted);
    // On a, B already exists (endpoint, allowed IPs, preshared key set by
    // hand; b has A with the same key), and a has one more peer the agent
    // must never touch.
    let psk_file = m.path("psk");
    let psk = run("wg", &["genpsk"]);
    std::fs::write(&psk_file, &psk).unwrap();
    let other = pipe("wg", &["pubkey"], &run("wg", &["genkey"]));
    let ifa = m.nodes[a].ifname.clone();
    let b_key = m.nodes[b].public_key.clone();
    let old_ep = format!("{}:9", m.nodes[b].lan_ip);
    m.wg(
        a,
        &[
            s("set"),
            ifa.clone(),
            s("peer"),
            b_key.clone(),
            s("endpoint"),
            old_ep.clone(),
            s("allowed-ips"),
            s("10.77.0.2/32"),
            s("preshared-key"),
            s(psk_file.display()),
        ],
    );
    let ifb = m.nodes[b].ifname.clone();
    let a_key = m.nodes[a].public_key.clone();
    m.wg(
        b,
        &[
            s("set"),
            ifb,
            s("peer"),
            a_key,
            s("allowed-ips"),
            s("10.77.0.1/32"),
            s("preshared-key"),
            s(psk_file.display()),
        ],
    );
    let other_ep = format!("{}:10", m.nodes[b].lan_ip);
    m.wg(
        a,
        &[
            s("set"),
            ifa,
            s("peer"),
            other.clone(),
            s("endpoint"),
            other_ep,
            s("allowed-ips"),
            s("10.99.0.0/24"),
        ],
    );
    let other_before = m.wg_peer_fields(a, &other).unwrap();
    m.start_agent(a);
    m.start_agent(b);
    let (row, _) = m.wait_path(a, b, "direct", CONNECT).unwrap();
    m.wait_path(b, a, "direct", CONNECT).unwrap();
    assert!(
        row["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("direct"),
        "{row:#}"
    );
    assert!(row["rtt_ms"].as_f64().is_some(), "{row:#}");
    assert!(
        m.ping(a, b, 5),
        "no ping over the direct path\n{}",
        m.logs()
    );
    // Full-size packets (WireGuard data of 1452 bytes) cross too.
    assert!(
        m.ping_sized(a, b, 3, 1392),
        "no full-size ping\n{}",
        m.logs()
    );
    // Traffic shows up in the status counters (WireGuard's own).
    let row = m.peer_status(a, b).unwrap();
    assert!(row["rx_bytes"].as_u64().unwrap_or(0) > 0, "{row:#}");
    assert!(row["tx_bytes"].as_u64().unwrap_or(0) > 0, "{row:#}");
    // The endpoint is the agent's loopback proxy.
    let peers = m.wg_peers(a);
    assert!(
        peers
            .iter()
            .any(|p| p.0 == m.nodes[b].public_key && p.1.starts_with("127.0.0.1:")),
        "{peers:?}"
    );
    // Metrics name the peer's path.
    let metrics = m.metrics(a);
    let line = format!(
        "wgice_peer_path{{peer=\"{}\",path=\"direct\"}} 1",
        m.nodes[b].public_key
    );
    assert!(metrics.contains(&line), "{metrics}");
    // Signaling goes away: the tunnel keeps working; it comes back: the
    // agents reconnect on their own.
    m.lab.kill_process("signaling").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(m.ping(a, b, 3), "tunnel died with signaling\n{}", m.logs());
    assert_eq!(m.peer_status(a, b).unwrap()["path"], "direct");
    assert_eq!(m.status(a).unwrap()["signaling"], false);
    m.lab.restart_process("signaling").unwrap();
    let mut back = false;
    for _ in 0..200 {
        if m.status(a).is_some_and(|s| s["signaling"] == true) {
            back = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(back, "agent did not reconnect to signaling\n{}", m.logs());
    // The unmanaged peer is as it was.
    assert_eq!(m.wg_peer_fields(a, &other).unwrap()[..4], other_before[..4]);
    // SIGTERM: each agent exits by itself and restores its peer exactly as
    // it was (a: endpoint, allowed IPs, preshared key; b: no endpoint).
    assert_eq!(
        m.stop_agent(a),
        Some(0),
        "a did not exit cleanly\n{}",
        m.logs()
    );
    assert_eq!(
        m.stop_agent(b),
        Some(0),
        "b did not exit cleanly\n{}",
        m.logs()
    );
    let restored = m
        .wg_peer_fields(a, &b_key)
        .expect("B's peer is gone from a");
    assert_eq!(restored[1], psk, "preshared key");
    assert_eq!(restored[2], old_ep, "endpoint");
    assert_eq!(restored[3], "10.77.0.2/32", "allowed IPs");
    assert_eq!(m.wg_peer_fields(a, &other).unwrap()[..4], other_before[..4]);
    let restored = m
        .wg_peer_fields(b, &m.nodes[a].public_key)
        .expect("A's peer is gone from b");
    assert_eq!(restored[1], psk, "preshared key");
    assert_eq!(restored[2], "(none)", "endpoint");
    assert_eq!(restored[3], "10.77.0.1/32", "allowed IPs");
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn explicit_peers_get_the_configured_allowed_ips() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    let (a, b) = m.pair(NatPreset::RestrictedCone, NatPreset::FullCone);
    m.use_explicit_peers(a);
    m.use_explicit_peers(b);
    m.start_agent(a);
    m.start_agent(b);
    m.wait_path(a, b, "direct", CONNECT).unwrap();
    assert!(m.ping(a, b, 3), "no ping\n{}", m.logs());
    let row = m.wg_peer_fields(a, &m.nodes[b].public_key).unwrap();
    let mut ips: Vec<&str> = row[3].split(',').collect();
    ips.sort();
    let want = format!("{}/32", m.nodes[b].overlay);
    assert_eq!(ips, vec![want.as_str(), "10.88.1.0/24"]);
    // The control socket is the owner's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&m.nodes[a].control)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn random_symmetric_to_sequential_symmetric_is_relayed_and_says_why() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    // No technique meets a random port from a symmetric NAT: relayed.
    let (a, b) = m.pair(NatPreset::Symmetric, NatPreset::SymmetricSequential);
    m.start_and_wait(&[a, b], "relay");
    assert!(m.ping(a, b, 5), "no ping over the relay\n{}", m.logs());
    assert!(
        m.ping_sized(a, b, 3, 1392),
        "no full-size ping over the relay\n{}",
        m.logs()
    );
    // Once the first direct window is over, the reason names the cause.
    let mut reason = String::new();
    for _ in 0..200 {
        let row = m.peer_status(a, b).unwrap();
        assert_eq!(row["path"], "relay", "{row:#}");
        reason = row["reason"].as_str().unwrap_or_default().to_owned();
        if reason.contains("no direct pair answered") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        reason.contains("no direct pair answered") && reason.contains("symmetric"),
        "reason {reason:?}\n{}",
        m.logs()
    );
    // Both agents measured their NATs in the background and told each
    // other (sealed `Facts` messages): each status names its own NAT and
    // the peer's, and the port-restricted side's reason cites the peer's
    // netcheck.
    let mut told = None;
    for _ in 0..100 {
        let (sa, rb, ra) = (
            m.status(a).unwrap(),
            m.peer_status(b, a).unwrap(),
            m.peer_status(a, b).unwrap(),
        );
        // b's first direct window may end a little after a's.
        let b_gave_up = rb["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no direct pair answered"));
        if sa["nat"].is_object() && rb["nat"].is_string() && ra["nat"].is_string() && b_gave_up {
            told = Some((sa, rb, ra));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (sa, rb, ra) = told.unwrap_or_else(|| panic!("no NAT facts in status\n{}", m.logs()));
    assert_eq!(sa["nat"]["mapping"], "address-and-port-dependent", "{sa:#}");
    assert_eq!(
        sa["nat"]["filtering"], "address-and-port-dependent",
        "{sa:#}"
    );
    assert!(sa["nat"]["public_ipv4"].is_string(), "{sa:#}");
    let peer_a = rb["nat"].as_str().unwrap();
    assert!(
        peer_a.starts_with("endpoint-dependent (per destination address and port) mapping"),
        "{peer_a}"
    );
    let peer_b = ra["nat"].as_str().unwrap();
    assert!(
        peer_b.starts_with(
            "endpoint-dependent (per destination address and port) mapping, sequential ports (+1"
        ),
        "{peer_b}"
    );
    let reason_b = rb["reason"].as_str().unwrap_or_default();
    assert!(
        reason_b.contains("both NATs map each destination to a new port")
            && reason_b.contains("the peer's symmetric, random ports")
            && reason_b.contains("no technique meets a random port"),
        "{reason_b}\n{}",
        m.logs()
    );
    // The table says the same.
    let table = m.status_table(a);
    println!("{table}");
    assert!(
        table.contains("relay") && table.contains("symmetric"),
        "{table}"
    );
    assert!(table.contains("signaling: connected"), "{table}");
    assert!(table.contains("└ 10.77.0.2/32 · relayed"), "{table}");
    assert!(table.contains("relayed 198.51.100."), "{table}");
    assert!(table.contains("NAT: endpoint-dependent"), "{table}");
    assert!(
        table.contains(
            "peer's NAT: endpoint-dependent (per destination address and port) mapping, sequential"
        ),
        "{table}"
    );
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn sequential_symmetric_to_port_restricted_goes_direct_by_port_prediction() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    let (a, b) = m.pair(NatPreset::SymmetricSequential, NatPreset::PortRestricted);
    m.start_and_wait(&[a, b], "relay");
    let (row, took) = m
        .wait_path(b, a, "direct", Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("not direct: {e}"));
    println!("direct after {took:?}: {row:#}");
    let reason = row["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("via port prediction, delta +1"),
        "{reason}\n{}",
        m.logs()
    );
    m.wait_path(a, b, "direct", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("a not direct: {e}"));
    assert!(
        m.ping(a, b, 3),
        "no ping over the predicted path\n{}",
        m.logs()
    );
    assert_eq!(m.peer_status(a, b).unwrap()["path"], "direct");
    let metrics = m.metrics(b);
    assert!(
        metrics.contains("\nwgice_port_predictions_total 1\n"),
        "{metrics}"
    );
}

/// Two sequential symmetric NATs (real nftables, a new port per
/// destination, +1 each): neither side's mapping can be predicted from the
/// other's checks alone, so the agents swap their NATs' next ports through
/// signaling and send their openers together. Both end direct, the reason
/// names the technique, pings cross the punched pair, and the budget holds
/// (at most 24 openers per attempt each).
#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn two_sequential_symmetric_nats_go_direct_by_punching_together() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    let (a, b) = m.pair(
        NatPreset::SymmetricSequential,
        NatPreset::SymmetricSequential,
    );
    m.start_and_wait(&[a, b], "relay");
    let (row, took) = m
        .wait_path(a, b, "direct", Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("not direct: {e}\n{}", m.logs()));
    println!("direct after {took:?}: {row:#}");
    let reason = row["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("via port prediction on both sides, delta +1 / +1"),
        "{reason}\n{}",
        m.logs()
    );
    m.wait_path(b, a, "direct", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("b not direct: {e}"));
    assert!(
        m.ping(a, b, 3),
        "no ping over the punched pair\n{}",
        m.logs()
    );
    for n in [a, b] {
        let metrics = m.metrics(n);
        let value = |name: &str| -> u64 {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
        };
        let attempts = value("wgice_punch_attempts_total ");
        let openers = value("wgice_punch_openers_total ");
        println!("node {n}: {attempts} attempts, {openers} openers");
        assert!(attempts >= 1, "{metrics}");
        assert!(openers <= 24 * attempts, "{metrics}");
    }
}

/// A random symmetric NAT (a random port per destination) against a
/// port-restricted cone: nothing predicts the random side's port, so it
/// opens 256 sockets towards the other side's mapping and the other side
/// probes random ports of its address until one meets. Both end direct
/// (the random side on the socket that was hit), the reason names the
/// technique, pings cross, and the budget holds (at most 4000 probes per
/// attempt, at 400 a second).
#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn random_symmetric_to_port_restricted_goes_direct_by_birthday_probing() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    let (a, b) = m.pair(NatPreset::Symmetric, NatPreset::PortRestricted);
    birthday_drill(&m, a, b);
}

/// The same with both agents in embedded mode: the socket that was hit
/// carries boringtun's datagrams too.
#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn birthday_probing_carries_the_embedded_data_plane() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    m.add_router("ra", NatPreset::Symmetric);
    m.add_router("rb", NatPreset::PortRestricted);
    let a = m.add_embedded_node("a", "ra");
    let b = m.add_embedded_node("b", "rb");
    birthday_drill(&m, a, b);
}

/// `a` behind a random symmetric NAT, `b` behind an endpoint-independent
/// port-filtering one: both end direct by birthday probing, pings cross,
/// the prober kept its budget.
fn birthday_drill(m: &MeshLab, a: usize, b: usize) {
    m.start_and_wait(&[a, b], "relay");
    let (row, took) = m
        .wait_path(b, a, "direct", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("not direct: {e}\n{}", m.logs()));
    println!("b direct after {took:?}: {row:#}");
    let reason = row["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("via birthday probing after"),
        "{reason}\n{}",
        m.logs()
    );
    let (row, _) = m
        .wait_path(a, b, "direct", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("a not direct: {e}\n{}", m.logs()));
    println!("a: {row:#}");
    assert!(
        row["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("via birthday probing"),
        "{row:#}"
    );
    assert!(
        m.ping(a, b, 3),
        "no ping over the probed pair\n{}",
        m.logs()
    );
    let value = |n: usize, name: &str| -> u64 {
        let metrics = m.metrics(n);
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    let attempts = value(b, "wgice_birthday_attempts_total ");
    let probes = value(b, "wgice_birthday_probes_total ");
    println!("prober: {attempts} attempts, {probes} probes");
    assert!(attempts >= 1 && probes >= 1);
    assert!(probes <= 4000 * attempts);
    assert!(value(a, "wgice_birthday_probes_total ") == 0);
}

/// Port prediction in a mesh that has run a while: after the sequential
/// side's relay allocation, another device behind its NAT opens 100 flows,
/// so its server-reflexive port is 100 mappings old when the peer comes.
/// The peer predicts around the newest mapping it has seen (the sequential
/// side's checks to its relayed address) instead, and goes direct.
#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn port_prediction_follows_a_sequential_nat_that_other_flows_moved_on() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    let (a, b) = m.pair(NatPreset::SymmetricSequential, NatPreset::PortRestricted);
    m.start_agent(a);
    let t0 = std::time::Instant::now();
    while !m.status(a).is_some_and(|s| s["nat"].is_object()) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "a's NAT never measured\n{}",
            m.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let relay = m.relays[0].addr.ip();
    m.lab.add_device("noise", "ra").unwrap();
    let script = format!(
        "import socket\nfor i in range(100):\n    \
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    \
         s.sendto(b'x', ('{relay}', 9))\n    s.close()\n"
    );
    let (ok, out) = m
        .lab
        .exec("noise", &[s("python3"), s("-c"), script])
        .unwrap();
    assert!(ok, "{out}");
    m.start_agent(b);
    let (row, took) = m
        .wait_path(b, a, "direct", Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("not direct: {e}\n{}", m.logs()));
    println!("direct after {took:?}: {row:#}");
    let reason = row["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("via port prediction")
            && reason.contains("the newest port of the peer's NAT seen"),
        "{reason}\n{}",
        m.logs()
    );
    assert!(
        m.ping(a, b, 3),
        "no ping over the predicted path\n{}",
        m.logs()
    );
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn direct_cut_falls_back_to_relay_within_3s_and_comes_back() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    let (a, b) = m.pair(NatPreset::PortRestricted, NatPreset::PortRestricted);
    m.start_and_wait(&[a, b], "direct");
    assert!(m.ping(a, b, 3));
    m.cut_direct("ra", "rb");
    let (_, took_a) = m.wait_path(a, b, "relay", Duration::from_secs(10)).unwrap();
    let (_, took_b) = m.wait_path(b, a, "relay", Duration::from_secs(10)).unwrap();
    println!("failover: a {took_a:?}, b {took_b:?}");
    assert!(took_a <= Duration::from_secs(3), "a took {took_a:?}");
    assert!(took_b <= Duration::from_secs(3), "b took {took_b:?}");
    assert!(m.ping(a, b, 5), "no ping after failover\n{}", m.logs());
    m.restore_direct("ra");
    let (_, back) = m
        .wait_path(a, b, "direct", Duration::from_secs(40))
        .unwrap();
    println!("back to direct after {back:?}");
    assert!(m.ping(a, b, 3), "no ping after coming back\n{}", m.logs());
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn a_restarted_relay_is_noticed_and_relayed_peers_recover() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    let (a, b) = m.pair(NatPreset::Symmetric, NatPreset::Symmetric);
    m.start_agent(a);
    m.start_agent(b);
    m.wait_path(a, b, "relay", CONNECT).unwrap();
    assert!(m.ping(a, b, 3), "no ping over the relay\n{}", m.logs());
    let before = m.status(a).unwrap()["relays"][0]["relayed"].clone();
    // The relay restarts and forgets every allocation.
    m.lab.restart_process("relay").unwrap();
    let t0 = std::time::Instant::now();
    let mut back = None;
    while t0.elapsed() < Duration::from_secs(45) {
        if m.ping(a, b, 1) {
            back = Some(t0.elapsed());
            break;
        }
    }
    let back = back.unwrap_or_else(|| panic!("relayed peers never recovered\n{}", m.logs()));
    println!("relay restart → pings again after {back:?}");
    let after = m.status(a).unwrap()["relays"][0]["relayed"].clone();
    assert_ne!(before, after, "a new allocation was expected");
    assert!(back <= Duration::from_secs(30), "took {back:?}");
}

/// IPv6 relays: an IPv6-only node (its router routes IPv6 behind a stateful
/// firewall, no IPv4 at all) reaches signaling and the relay over IPv6 and
/// gets an IPv4 relayed address there; an IPv4-only node behind a NAT asks
/// for a dual-stack allocation and gets an IPv6 relayed address too. They
/// connect through the relay, across IP versions, and ping both ways.
#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn an_ipv6_only_node_reaches_an_ipv4_only_node_through_the_relay() {
    let bins = setup();
    let mut m = MeshLab::new_dual_stack(&bins);
    m.add_router("ra", NatPreset::Symmetric);
    m.lab.enable_ipv6("ra").unwrap();
    m.add_router("rb", NatPreset::PortRestricted);
    let (a, b) = (m.add_node("a", "ra"), m.add_node("b", "rb"));
    m.use_ipv6_only(a);
    m.start_and_wait(&[a, b], "relay");
    assert!(m.ping(a, b, 5), "no ping a → b\n{}", m.logs());
    assert!(m.ping(b, a, 5), "no ping b → a\n{}", m.logs());
    m.keep_logs();
    let v6 = m.pub_ip6.unwrap();
    let sa = m.status(a).unwrap();
    let ra = &sa["relays"][0];
    assert_eq!(ra["server"], format!("[{v6}]:3478"), "{sa:#}");
    let relayed = |row: &serde_json::Value| -> Vec<std::net::SocketAddr> {
        serde_json::from_value(row["relayed"].clone()).unwrap()
    };
    assert!(relayed(ra).iter().any(|r| r.is_ipv4()), "{sa:#}");
    let sb = m.status(b).unwrap();
    let rb = &sb["relays"][0];
    assert!(
        relayed(rb).iter().any(|r| r.is_ipv6()) && relayed(rb).iter().any(|r| r.is_ipv4()),
        "b asked for both families: {sb:#}"
    );
    let pa = m.peer_status(a, b).unwrap();
    println!("a → b: {} ↔ {}", pa["local"], pa["remote"]);
}

/// coturn ties an allocation to the TURN REST username that made it (a new
/// one under it gets 441), so a username's expiry would end the allocation.
/// The agents mint 30 s usernames here (re-minted every 7.5 s): the side
/// whose allocation carries no traffic re-allocates with the new username
/// at once, the side whose route goes through its allocation shortly before
/// the old username expires, and pings cross the relay throughout and
/// after the first usernames expired.
#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn turn_rest_credentials_on_coturn_roll_over_by_planned_reallocation() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    let (a, b) = m.pair(NatPreset::Symmetric, NatPreset::Symmetric);
    m.use_coturn("lab-rest-secret-0123456789", 30);
    m.start_and_wait(&[a, b], "relay");
    assert!(m.ping(a, b, 3), "no ping over coturn\n{}", m.logs());
    let relayed = |i: usize| m.status(i).unwrap()["relays"][0]["relayed"].clone();
    let before = [relayed(a), relayed(b)];
    // 45 s: past the first usernames' expiry (30 s after start).
    let gaps = m
        .ping_stream(a, b, Duration::from_millis(100), Duration::from_secs(45))
        .finish()
        .expect("ping output");
    println!("pings across the re-allocations: {gaps:?}");
    // Quiet, so each agent's liveness Refresh goes out with the username
    // its allocation is bound to now (an expired one would be refused).
    std::thread::sleep(Duration::from_secs(8));
    m.keep_logs();
    assert!(m.ping(a, b, 3), "no ping at the end\n{}", m.logs());
    let logs = |i: usize| {
        std::fs::read_to_string(m.path(&format!("agent-{}.stderr", m.nodes[i].name)))
            .unwrap_or_default()
    };
    for (i, before) in [(a, &before[0]), (b, &before[1])] {
        let log = logs(i);
        assert!(
            log.contains("re-allocating on the relay with the new credentials"),
            "node {i} never re-allocated\n{}",
            m.logs()
        );
        for bad in ["allocation lost", "credentials rejected", "relay unusable"] {
            assert!(!log.contains(bad), "node {i}: {bad:?}\n{}", m.logs());
        }
        assert_ne!(&relayed(i), before, "node {i}: same allocation");
        assert_eq!(m.peer_status(i, 1 - i).unwrap()["path"], "relay");
    }
    let coturn = std::fs::read_to_string(m.path("coturn.stdout")).unwrap_or_default();
    let allocations = coturn
        .lines()
        .filter(|l| l.contains("ALLOCATE processed, success"))
        .count();
    assert!(
        allocations >= 4,
        "coturn saw {allocations} allocations\n{coturn}"
    );
    assert!(
        gaps.replies * 10 >= gaps.sent * 9 && gaps.max_gap <= Duration::from_secs(2),
        "{gaps:?}\n{}",
        m.logs()
    );
}

/// With a second relay the re-allocation is make before break: the peers
/// relayed through coturn move to the lab's own relay the moment coturn's
/// old allocation goes, and come back once the new one is up (coturn is
/// chosen: the other relay's host has 15 ms more each way).
#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn turn_rest_rollover_moves_relayed_peers_to_another_relay_meanwhile() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    let (a, b) = m.pair(NatPreset::Symmetric, NatPreset::Symmetric);
    let k = m.add_coturn("lab-rest-secret-0123456789", 30);
    m.lab
        .set_impairment(
            "pub",
            netsim::impair::Impairment {
                loss: 0.0,
                delay_ms: 15,
            },
        )
        .unwrap();
    m.start_and_wait(&[a, b], "relay");
    let t0 = std::time::Instant::now();
    while m.relay_in_use(a, b) != Some(k) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "a never chose coturn: {:?}\n{}",
            m.relay_in_use(a, b),
            m.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let gaps = m
        .ping_stream(a, b, Duration::from_millis(100), Duration::from_secs(40))
        .finish()
        .expect("ping output");
    println!("pings across the re-allocation with a second relay: {gaps:?}");
    m.keep_logs();
    let log = std::fs::read_to_string(m.path("agent-a.stderr")).unwrap_or_default();
    assert!(
        log.contains("re-allocating on the relay with the new credentials")
            && !log.contains("peers=0"),
        "a never re-allocated with its peer relayed through coturn\n{}",
        m.logs()
    );
    assert!(
        gaps.replies * 10 >= gaps.sent * 9 && gaps.max_gap <= Duration::from_millis(800),
        "{gaps:?}\n{}",
        m.logs()
    );
}

/// The same on a direct pair: no peer routes through either allocation,
/// so each agent re-allocates as soon as coturn refuses the new username
/// (the first re-mint, 5 s in with 20 s usernames), and the direct path
/// never notices.
#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn turn_rest_rollover_on_coturn_is_immediate_when_no_peer_is_relayed() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    let (a, b) = m.pair(NatPreset::PortRestricted, NatPreset::PortRestricted);
    m.use_coturn("lab-rest-secret-0123456789", 20);
    m.start_and_wait(&[a, b], "direct");
    let relayed = |i: usize| m.status(i).unwrap()["relays"][0]["relayed"].clone();
    let before = [relayed(a), relayed(b)];
    let gaps = m
        .ping_stream(a, b, Duration::from_millis(100), Duration::from_secs(12))
        .finish()
        .expect("ping output");
    m.keep_logs();
    for (i, before) in [(a, &before[0]), (b, &before[1])] {
        let log = std::fs::read_to_string(m.path(&format!("agent-{}.stderr", m.nodes[i].name)))
            .unwrap_or_default();
        assert!(
            log.contains("re-allocating on the relay with the new credentials")
                && log.contains("peers=0"),
            "node {i} did not re-allocate at once\n{}",
            m.logs()
        );
        assert_ne!(&relayed(i), before, "node {i}: same allocation");
        assert_eq!(m.peer_status(i, 1 - i).unwrap()["path"], "direct");
    }
    assert!(
        gaps.replies + 1 >= gaps.sent && gaps.max_gap <= Duration::from_millis(500),
        "the direct path noticed: {gaps:?}\n{}",
        m.logs()
    );
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn a_recreated_interface_gets_its_peers_back() {
    let bins = setup();
    let mut m = MeshLab::new(&bins);
    let (a, b) = m.pair(NatPreset::PortRestricted, NatPreset::PortRestricted);
    m.start_and_wait(&[a, b], "direct");
    assert!(m.ping(a, b, 3));
    // wireguard-go on a restarts: the interface comes back empty and is
    // configured again (key, port, address), as wg-quick would.
    m.restart_wireguard(a);
    assert!(m.wg_peers(a).is_empty());
    let t0 = std::time::Instant::now();
    let mut back = None;
    while t0.elapsed() < Duration::from_secs(20) {
        if m.wg_peers(a).iter().any(|p| p.0 == m.nodes[b].public_key) && m.ping(a, b, 1) {
            back = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let back = back.unwrap_or_else(|| panic!("peer not re-added\n{}", m.logs()));
    println!("interface re-created → peer back and pinging after {back:?}");
    assert_eq!(m.stop_agent(a), Some(0));
    assert!(
        m.wg_peers(a).is_empty(),
        "the re-added peer was created by the agent"
    );
}
