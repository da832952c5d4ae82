//! Hostile mesh members against the agent core, deterministically: a member
//! holds the mesh token, so signaling delivers whatever it sends. Each test
//! checks one class of attack is refused and counted while the real peer
//! keeps its path.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{opts, World, KA, KB};
use ice_agent::agent::{AgentOptions, PeerKey};
use ice_agent::cert::{Ca, CertBody};
use ice_agent::PathKind;
use ipnet::IpNet;
use signaling::seal::PeerMessage;

const KC: PeerKey = signaling::PublicKey([0xCC; 32]);
const KD: PeerKey = signaling::PublicKey([0xDD; 32]);

fn offer(session: u64, ufrag: &str, pwd: &str, candidates: Vec<String>) -> PeerMessage {
    PeerMessage::Offer {
        session,
        ufrag: ufrag.into(),
        pwd: pwd.into(),
        candidates,
        wg_port: None,
        cert: None,
    }
}

fn pwd() -> String {
    "p".repeat(22)
}

fn net(s: &str) -> IpNet {
    s.parse().expect("net")
}

/// Agent `i`'s path to `key`.
fn path_to(w: &World, i: usize, key: PeerKey) -> PathKind {
    w.agents[i]
        .status(w.now)
        .into_iter()
        .find(|r| r.0 == key)
        .map(|r| r.1.path)
        .unwrap_or(PathKind::Connecting)
}

fn connected(a: AgentOptions, b: AgentOptions) -> World {
    let mut w = World::new(a, b);
    w.online();
    w.run(Duration::from_secs(2));
    assert_eq!(w.path(0).0, PathKind::Direct, "{:?}", w.path(0));
    w
}

fn pair() -> World {
    connected(
        opts(KA, "198.51.100.1/24", true, vec![]),
        opts(KB, "203.0.113.2/24", true, vec![]),
    )
}

#[test]
fn an_overlong_ufrag_is_refused_before_it_reaches_the_ice_agent() {
    let mut w = pair();
    // 200 bytes used to make `is` panic while building a check (its STUN
    // encoder writes at most 128 bytes of USERNAME).
    let long = "u".repeat(200);
    let cand = "candidate:1 1 udp 2130706431 192.0.2.50 40000 typ host".to_owned();
    w.agents[0].handle_message(w.now, KC, offer(9, &long, &pwd(), vec![cand.clone()]));
    for (u, p) in [
        ("abc", pwd()),
        ("ab:c", pwd()),
        ("abcd", "short".to_owned()),
        ("abcd", "p".repeat(300)),
    ] {
        w.agents[0].handle_message(w.now, KD, offer(9, u, &p, vec![cand.clone()]));
    }
    // Session id 0 and port 0 are out of range too.
    w.agents[0].handle_message(w.now, KD, offer(0, "abcd", &pwd(), vec![]));
    w.run(Duration::from_secs(3));
    let d = w.agents[0].drops();
    assert_eq!(d.bad_credentials, 5, "{d:?}");
    assert_eq!(d.bad_field, 1, "{d:?}");
    // Neither became a peer, and no check went to the named address.
    assert_eq!(w.seen[0].added, vec![KB]);
    assert!(!w.seen[0].sent.iter().any(|(to, _)| to.port() == 40000));
    // The real peer never noticed.
    assert_eq!(path_to(&w, 0, KB), PathKind::Direct);
    assert_eq!(path_to(&w, 1, KA), PathKind::Direct);
}

#[test]
fn candidates_at_special_or_own_addresses_get_no_checks() {
    let mut w = pair();
    let bad = [
        "127.0.0.1 51820",
        "0.0.0.0 3478",
        "224.0.0.251 5353",
        "255.255.255.255 9",
        "198.51.100.255 9",
        "169.254.169.254 80",
        "::1 51820",
        ":: 3478",
        "ff02::1 5000",
        "fe80::1 5000",
        "::ffff:127.0.0.1 5000",
        "::ffff:169.254.169.254 80",
        "198.51.100.1 51820",
        "198.51.100.1 51821",
        "198.51.100.1 22",
    ];
    let cands: Vec<String> = bad
        .iter()
        .map(|a| format!("candidate:1 1 udp 2130706431 {a} typ host"))
        .collect();
    let bad_addrs: Vec<SocketAddr> = bad
        .iter()
        .map(|a| {
            let (ip, port) = a.split_once(' ').expect("pair");
            SocketAddr::new(ip.parse().expect("ip"), port.parse().expect("port"))
        })
        .collect();
    w.agents[0].handle_message(w.now, KC, offer(9, "cccc", &pwd(), cands));
    // A TCP candidate, a garbage one and an oversized one.
    for c in [
        "candidate:1 1 tcp 2130706431 192.0.2.9 9 typ host tcptype passive".to_owned(),
        "candidate:not a candidate".to_owned(),
        format!(
            "candidate:1 1 udp 1 192.0.2.9 9 typ host {}",
            "x".repeat(600)
        ),
    ] {
        w.agents[0].handle_message(
            w.now,
            KC,
            PeerMessage::Candidate {
                session: 9,
                candidate: c,
            },
        );
    }
    w.run(Duration::from_secs(5));
    let d = w.agents[0].drops();
    assert_eq!(d.candidate_refused, bad.len() as u64, "{d:?}");
    assert_eq!(d.bad_candidate, 3, "{d:?}");
    let hit: Vec<&SocketAddr> = w.seen[0]
        .sent
        .iter()
        .map(|(to, _)| to)
        .filter(|to| {
            bad_addrs.iter().any(|b| {
                let ip = match b.ip() {
                    std::net::IpAddr::V6(v6) => v6
                        .to_ipv4_mapped()
                        .map(std::net::IpAddr::V4)
                        .unwrap_or(b.ip()),
                    v4 => v4,
                };
                ip == to.ip() && b.port() == to.port()
            })
        })
        .collect();
    assert!(hit.is_empty(), "checks sent to refused candidates: {hit:?}");
    assert_eq!(path_to(&w, 0, KB), PathKind::Direct);
}

#[test]
fn membership_is_bounded_by_max_peers() {
    let mut a = opts(KA, "198.51.100.1/24", true, vec![]);
    a.max_peers = 3;
    let mut w = connected(a, opts(KB, "203.0.113.2/24", true, vec![]));
    for i in 0..50u8 {
        let mut k = signaling::PublicKey([0x10; 32]);
        k.0[0] = i;
        w.agents[0].handle_member(w.now, k, &[format!("10.9.0.{i}/32")]);
        w.agents[0].handle_message(w.now, k, offer(5, "kkkk", &pwd(), vec![]));
    }
    w.run(Duration::from_millis(100));
    // B plus two throwaway keys; the other 48 are refused, each counted at
    // every attempt, and none costs a WireGuard peer.
    assert_eq!(w.seen[0].added.len(), 3);
    assert_eq!(w.agents[0].drops().peer_limit, 96);
    assert_eq!(w.agents[0].status(w.now).len(), 3);
    assert_eq!(path_to(&w, 0, KB), PathKind::Direct);
}

#[test]
fn without_a_ca_a_vanished_nodes_address_is_quarantined() {
    let mut a = opts(KA, "198.51.100.1/24", true, vec![]);
    a.address_quarantine = Duration::from_secs(600);
    let mut w = connected(a, opts(KB, "203.0.113.2/24", true, vec![]));
    // C claims B's address while B holds it: withheld.
    w.agents[0].handle_member(w.now, KC, &["10.8.0.2/32".into(), "10.8.0.3/32".into()]);
    w.run(Duration::from_millis(50));
    let c_gets = |w: &World| {
        w.seen[0]
            .allowed
            .iter()
            .rev()
            .find(|(k, _)| *k == KC)
            .map(|(_, v)| v.clone())
    };
    let rows = w.agents[0].status(w.now);
    let c_row = rows.iter().find(|(k, _, _)| *k == KC).expect("C row");
    assert_eq!(c_row.1.allowed_ips, vec!["10.8.0.3/32"]);
    assert!(
        c_row
            .1
            .membership
            .as_deref()
            .is_some_and(|m| m.contains("10.8.0.2/32")),
        "{:?}",
        c_row.1.membership
    );
    assert_eq!(w.agents[0].drops().address_refused, 1);
    // B says goodbye (it vanished): C still does not get its address …
    let (_, b_session) = w.agents[0].session_ids(&KB).expect("session");
    w.agents[0].handle_message(
        w.now,
        KB,
        PeerMessage::Bye {
            session: b_session.expect("known"),
        },
    );
    w.agents[0].handle_member(w.now, KC, &["10.8.0.2/32".into(), "10.8.0.3/32".into()]);
    w.run(Duration::from_secs(300));
    assert_ne!(
        c_gets(&w),
        Some(vec![net("10.8.0.2/32"), net("10.8.0.3/32")])
    );
    let rows = w.agents[0].status(w.now);
    let c_row = rows.iter().find(|(k, _, _)| *k == KC).expect("C row");
    assert!(
        c_row
            .1
            .membership
            .as_deref()
            .is_some_and(|m| m.contains("quarantined")),
        "{:?}",
        c_row.1.membership
    );
    // … until the quarantine has passed.
    w.run(Duration::from_secs(301));
    assert_eq!(
        c_gets(&w),
        Some(vec![net("10.8.0.2/32"), net("10.8.0.3/32")])
    );
}

fn cert_for(ca: &Ca, key: &PeerKey, name: &str, addr: &str, not_after: u64) -> String {
    ca.sign(&CertBody {
        key: key.to_string(),
        name: name.into(),
        addresses: vec![net(addr)],
        routes: vec![],
        not_before: 1_000,
        not_after,
    })
    .expect("sign")
}

#[test]
fn with_a_ca_only_a_verified_certificate_routes_and_names_a_member() {
    let (ca, _) = Ca::generate().expect("ca");
    let (rogue, _) = Ca::generate().expect("rogue ca");
    let with_ca = |key, host, name, addr| {
        let mut o = opts(key, host, true, vec![]);
        o.cas = vec![ca.public_key()];
        o.unix_time = 10_000;
        o.certificate = Some(cert_for(&ca, &key, name, addr, 20_000));
        o
    };
    let mut w = connected(
        with_ca(KA, "198.51.100.1/24", "alpha", "10.8.0.1/32"),
        with_ca(KB, "203.0.113.2/24", "beta", "10.8.0.2/32"),
    );
    // B's certificate verified on A: its address routes and its name shows.
    let rows = w.agents[0].status(w.now);
    let b = rows.iter().find(|(k, _, _)| *k == KB).expect("B");
    assert_eq!(b.1.name.as_deref(), Some("beta"));
    assert_eq!(b.1.allowed_ips, vec!["10.8.0.2/32"]);
    assert_eq!(w.agents[0].label(&KB), "beta");
    // Signaling's overlay list is no authority: advertising B's address
    // gets C nothing.
    w.agents[0].handle_member(w.now, KC, &["10.8.0.2/32".into()]);
    // D presents a certificate from a CA nobody pinned, for B's address.
    let forged = cert_for(&rogue, &KD, "beta", "10.8.0.2/32", 20_000);
    w.agents[0].handle_message(
        w.now,
        KD,
        PeerMessage::Offer {
            session: 4,
            ufrag: "dddd".into(),
            pwd: pwd(),
            candidates: vec![],
            wg_port: None,
            cert: Some(forged),
        },
    );
    // C presents B's own (valid) certificate: issued to another key.
    w.agents[0].handle_message(
        w.now,
        KC,
        PeerMessage::Offer {
            session: 4,
            ufrag: "cccc".into(),
            pwd: pwd(),
            candidates: vec![],
            wg_port: None,
            cert: Some(cert_for(&ca, &KB, "beta", "10.8.0.2/32", 20_000)),
        },
    );
    w.run(Duration::from_millis(100));
    let rows = w.agents[0].status(w.now);
    for k in [KC, KD] {
        let r = rows.iter().find(|(x, _, _)| *x == k).expect("row");
        assert!(r.1.allowed_ips.is_empty(), "{:?}", r.1);
        assert!(r.1.name.is_none());
        assert!(
            r.1.membership
                .as_deref()
                .is_some_and(|m| m.contains("routes nothing")),
            "{:?}",
            r.1.membership
        );
    }
    assert!(w.agents[0].drops().bad_certificate.ge(&2));
    assert!(!w.seen[0]
        .allowed
        .iter()
        .any(|(k, v)| (*k == KC || *k == KD) && !v.is_empty()));
    // B keeps its path and its address.
    assert_eq!(path_to(&w, 0, KB), PathKind::Direct);
    let rows = w.agents[0].status(w.now);
    let b = rows.iter().find(|(k, _, _)| *k == KB).expect("B");
    assert_eq!(b.1.allowed_ips, vec!["10.8.0.2/32"]);
}

#[test]
fn an_expired_certificate_stops_routing_at_its_expiry() {
    let (ca, _) = Ca::generate().expect("ca");
    let mk = |key, host, name, addr, until| {
        let mut o = opts(key, host, true, vec![]);
        o.cas = vec![ca.public_key()];
        o.unix_time = 10_000;
        o.certificate = Some(cert_for(&ca, &key, name, addr, until));
        o
    };
    let mut w = connected(
        mk(KA, "198.51.100.1/24", "alpha", "10.8.0.1/32", 90_000),
        mk(KB, "203.0.113.2/24", "beta", "10.8.0.2/32", 10_030),
    );
    assert_eq!(
        w.agents[0]
            .status(w.now)
            .iter()
            .find(|r| r.0 == KB)
            .expect("B")
            .1
            .allowed_ips,
        vec!["10.8.0.2/32"]
    );
    w.run(Duration::from_secs(30));
    let rows = w.agents[0].status(w.now);
    let b = rows.iter().find(|r| r.0 == KB).expect("B");
    assert!(b.1.allowed_ips.is_empty(), "{:?}", b.1);
    assert!(
        b.1.membership
            .as_deref()
            .is_some_and(|m| m.contains("expired")),
        "{:?}",
        b.1.membership
    );
    assert_eq!(w.seen[0].allowed.last(), Some(&(KB, vec![])));
}

#[test]
fn a_replayed_binding_request_from_a_spoofed_source_moves_no_ownership() {
    let mut w = pair();
    // C is a member whose (signalled) address is X.
    let x: SocketAddr = "192.0.2.77:40000".parse().expect("addr");
    w.agents[0].handle_message(
        w.now,
        KC,
        offer(
            9,
            "cccc",
            &pwd(),
            vec![format!(
                "candidate:1 1 udp 2130706431 {} {} typ host",
                x.ip(),
                x.port()
            )],
        ),
    );
    w.run(Duration::from_millis(100));
    // An attacker replays one of B's authenticated check requests to A
    // with X as the source address.
    let request = w.seen[1]
        .sent
        .iter()
        .rev()
        .find(|(to, d)| to.ip() == w.ips[0] && d.len() > 20 && d[0] == 0 && d[1] == 1)
        .map(|(_, d)| d.clone())
        .expect("B sent a binding request to A");
    let _ = w.agents[0].handle_datagram(w.now, x, Some(w.ips[0]), &request);
    // WireGuard packets from X are still C's, not B's.
    let mut wg = vec![0u8; 64];
    wg[0] = 4;
    let got = w.agents[0].handle_datagram(w.now, x, Some(w.ips[0]), &wg);
    assert_eq!(got.map(|(k, _)| k), Some(KC));
}

#[test]
fn nat_facts_travel_to_peers_and_hostile_ones_are_refused() {
    use ice_agent::netcheck::{Filtering, Mapping, NatFacts, PortAllocation};
    let mut w = pair();
    let (_, b_session) = w.agents[0].session_ids(&KB).expect("session");
    let b_session = b_session.expect("known");
    // B's netcheck finishes: A hears of it (a sealed `Facts` message) and
    // shows it, without B's public address.
    let facts = NatFacts {
        udp: true,
        public_ipv4: Some("203.0.113.2:40000".parse().expect("addr")),
        mapping: Some(Mapping::AddressAndPortDependent),
        port_allocation: Some(PortAllocation::Sequential {
            delta: 1,
            others_per_min: None,
        }),
        filtering: Some(Filtering::AddressAndPortDependent),
        ..NatFacts::default()
    };
    w.agents[1].set_nat_facts(w.now, facts);
    w.run(Duration::from_millis(200));
    let shown = |w: &World| {
        w.agents[0]
            .status(w.now)
            .into_iter()
            .find(|r| r.0 == KB)
            .and_then(|r| r.1.nat)
    };
    let want = "endpoint-dependent (per destination address and port) mapping, \
                sequential ports (+1), address-and-port-dependent filtering";
    assert_eq!(shown(&w).as_deref(), Some(want));
    // Hostile facts from B: refused, counted, nothing else changes.
    let before = w.agents[0].drops().bad_field;
    for nat in [
        "x".repeat(600),
        r#"{"mapping":"wormhole"}"#.to_owned(),
        r#"{"port_allocation":{"kind":"sequential","delta":70000}}"#.to_owned(),
        "not json".to_owned(),
    ] {
        w.agents[0].handle_message(
            w.now,
            KB,
            PeerMessage::Facts {
                session: b_session,
                nat,
            },
        );
    }
    assert_eq!(w.agents[0].drops().bad_field, before + 4);
    assert_eq!(shown(&w).as_deref(), Some(want));
    // A message type from a newer agent is ignored, not refused.
    w.agents[0].handle_message(w.now, KB, PeerMessage::Unknown);
    assert_eq!(w.agents[0].drops().bad_field, before + 4);
    w.run(Duration::from_secs(2));
    assert_eq!(path_to(&w, 0, KB), PathKind::Direct);
}
