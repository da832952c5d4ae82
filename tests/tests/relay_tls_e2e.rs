//! TURN over TLS on 443 for real (issue 12, "UDP blocked"): a node behind
//! netsim's `udp-blocked` preset (only TCP 443 leaves) and a node behind a
//! port-restricted NAT, `wireguard-go` on both, the real `relay` with TLS on
//! 443 (a self-signed certificate the agents pin) and `signaling` on 443.
//! The blocked node's agent gets no answer over UDP, none over TCP 3478,
//! and allocates over TLS 443; pings cross the overlay through it; status
//! says so; a relay restart is survived.

use std::time::{Duration, Instant};

use netsim::nat::NatPreset;
use wgice_tests::mesh::{s, Bins, MeshLab};

fn setup() -> Bins {
    wgice_tests::require_root();
    wgice_tests::bins()
}

/// Pings `j` from `i` every 100 ms until one answer or `within`; returns
/// how long the first answer took.
fn first_ping(m: &MeshLab, i: usize, j: usize, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let (ok, _) = m
        .lab
        .exec(
            &m.nodes[i].name,
            &[
                s("ping"),
                s("-c"),
                s(1),
                s("-i"),
                s("0.1"),
                s("-w"),
                s(within.as_secs()),
                s(m.nodes[j].overlay),
            ],
        )
        .expect("exec ping");
    ok.then(|| t0.elapsed())
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn udp_blocked_node_pings_over_turn_tls_443_and_survives_a_relay_restart() {
    let bins = setup();
    let mut m = MeshLab::new_with_relay_tls(&bins);
    let (a, b) = m.pair(NatPreset::UdpBlocked, NatPreset::PortRestricted);
    let t0 = Instant::now();
    m.start_agent(a);
    m.start_agent(b);
    let first = first_ping(&m, a, b, Duration::from_secs(30));
    first.unwrap_or_else(|| panic!("no ping over TLS 443\n{}", m.logs()));
    println!(
        "udp-blocked ↔ port-restricted: agents started → first ping answered over TLS 443 in {:.2} s",
        t0.elapsed().as_secs_f64(),
    );
    if std::env::var_os("WGICE_E2E_LOGS").is_some() {
        println!("{}", m.logs());
    }
    let (row, _) = m
        .wait_path(a, b, "relay", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let reason = row["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("relayed over TLS 443 — UDP to the relay blocked"),
        "reason {reason:?}"
    );
    let st = m.status(a).expect("status");
    assert_eq!(
        st["relays"][0]["transport"], "TLS 443 — UDP to the relay blocked",
        "{st:#}"
    );
    assert!(st["relays"][0]["problem"].is_null(), "{st:#}");
    let table = m.status_table(a);
    assert!(
        table.contains("over TLS 443 — UDP to the relay blocked"),
        "{table}"
    );
    println!("{table}");
    // The port-restricted side reaches the relay over UDP and says nothing
    // about streams.
    let sb = m.status(b).expect("status");
    assert!(sb["relays"][0]["transport"].is_null(), "{sb:#}");
    assert!(m.ping(a, b, 5), "pings over TLS 443\n{}", m.logs());
    assert!(
        m.ping_sized(a, b, 3, 1372),
        "full-size pings over TLS 443\n{}",
        m.logs()
    );
    assert!(m.ping(b, a, 3), "pings the other way\n{}", m.logs());

    // The relay restarts: the TLS connection breaks and the allocation is
    // gone. The agent reconnects over TLS (with backoff) and allocates again.
    let before = st["relays"][0]["relayed"].clone();
    m.lab.restart_process("relay").unwrap();
    let t1 = Instant::now();
    let back = first_ping(&m, a, b, Duration::from_secs(45))
        .unwrap_or_else(|| panic!("no ping after the relay restart\n{}", m.logs()));
    let back = t1.elapsed().max(back);
    println!("relay restart → pings over TLS 443 again after {back:.2?}");
    let after = m.status(a).expect("status");
    assert_ne!(before, after["relays"][0]["relayed"], "a new allocation");
    assert_eq!(
        after["relays"][0]["transport"], "TLS 443 — UDP to the relay blocked",
        "{after:#}"
    );
    assert!(back <= Duration::from_secs(30), "took {back:?}");
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn embedded_node_behind_udp_blocked_pings_over_turn_tls_443() {
    let bins = setup();
    let mut m = MeshLab::new_with_relay_tls(&bins);
    m.add_router("ra", NatPreset::UdpBlocked);
    m.add_router("rb", NatPreset::PortRestricted);
    let a = m.add_embedded_node("a", "ra");
    let b = m.add_node("b", "rb");
    let t0 = Instant::now();
    m.start_agent(a);
    m.start_agent(b);
    first_ping(&m, a, b, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no ping over TLS 443 (embedded)\n{}", m.logs()));
    println!(
        "embedded, udp-blocked ↔ port-restricted: first ping over TLS 443 in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let (row, _) = m
        .wait_path(a, b, "relay", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let reason = row["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("TLS 443"), "reason {reason:?}");
    assert!(
        m.ping(a, b, 5),
        "pings (embedded) over TLS 443\n{}",
        m.logs()
    );
    assert!(
        m.ping_sized(a, b, 3, 1372),
        "full-size pings (embedded) over TLS 443\n{}",
        m.logs()
    );
    assert!(m.ping(b, a, 3), "pings the other way\n{}", m.logs());
}
