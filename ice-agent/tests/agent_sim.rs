//! The agent core (`ice_agent::agent::Agent`) driven deterministically: two
//! agents, a virtual clock, a modelled network (datagrams between host
//! addresses, 1 ms) and a modelled signaling service (sealed messages
//! delivered in 20 ms). No relay here: the relay paths are covered by the
//! session simulation and the netns tests.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{opts, Seen, World, KA, KB};
use ice_agent::agent::{Agent, Endpoint, Output, Route};
use ice_agent::PathKind;
use signaling::seal::PeerMessage;

#[test]
fn two_public_hosts_connect_direct_through_the_proxy_route() {
    let mut w = World::new(
        opts(KA, "198.51.100.1/24", true, vec![]),
        opts(KB, "203.0.113.2/24", true, vec![]),
    );
    w.online();
    w.run(Duration::from_secs(2));
    for i in 0..2 {
        assert_eq!(w.path(i).0, PathKind::Direct, "{:?}", w.path(i));
        let r = w.last_route(i).expect("route");
        assert_eq!(r.endpoint, Endpoint::Proxy);
        let other = SocketAddr::new(w.ips[1 - i], 51821);
        assert_eq!(r.route, Route::Direct(other));
        assert_eq!(w.seen[i].added, vec![w.keys[1 - i]]);
    }
    // Both offered at once (presence on both sides): one session each, no
    // restart loop: exactly one offer per side.
    assert_eq!((w.seen[0].offers, w.seen[1].offers), (1, 1));
    // B advertises the same overlay again: nothing to write; a new one:
    // its allowed IPs are replaced, and the session is left alone.
    let b = w.keys[1];
    w.agents[0].handle_member(w.now, b, &["10.8.0.2/32".into()]);
    w.run(Duration::from_millis(50));
    assert!(w.seen[0].allowed.is_empty());
    w.agents[0].handle_member(w.now, b, &["10.8.0.2/32".into(), "fd00::2".into()]);
    w.run(Duration::from_millis(50));
    let want: Vec<ipnet::IpNet> = vec![
        "10.8.0.2/32".parse().expect("net"),
        "fd00::2/128".parse().expect("net"),
    ];
    assert_eq!(w.seen[0].allowed, vec![(b, want)]);
    assert_eq!(w.path(0).0, PathKind::Direct);
    assert_eq!(w.seen[0].offers, 1);
    // Signaling reconnects re-offer everything: harmless for the session,
    // and repeats never use up the peer's candidate budget.
    for _ in 0..100 {
        w.agents[0].handle_signaling_connected(w.now);
        w.run(Duration::from_millis(30));
    }
    assert_eq!(w.agents[1].remote_candidate_count(&KA), 1);
    assert_eq!(w.path(1).0, PathKind::Direct);
    assert_eq!(w.seen[0].offers, 101);
}

#[test]
fn same_lan_points_wireguard_straight_at_the_peer() {
    let mut w = World::new(
        opts(KA, "10.0.1.10/24", true, vec![]),
        opts(KB, "10.0.1.20/24", true, vec![]),
    );
    w.online();
    w.run(Duration::from_secs(2));
    assert_eq!(w.path(0).0, PathKind::Lan, "{:?}", w.path(0));
    assert!(w.path(0).1.contains("LAN 10.0.1.0/24"), "{:?}", w.path(0));
    let r = w.last_route(0).expect("route");
    assert_eq!(
        r.endpoint,
        Endpoint::Direct("10.0.1.20:51820".parse().expect("addr"))
    );
}

#[test]
fn candidates_before_the_offer_are_kept_until_it_arrives() {
    let mut w = World::new(
        opts(KA, "198.51.100.1/24", true, vec![]),
        opts(KB, "203.0.113.2/24", true, vec![]),
    );
    // Only A learns of B. A gains an address right after its offer, so a
    // trickled candidate follows it; the two reach B in reverse order.
    w.reverse_next_batch = true;
    let b = w.keys[1];
    w.agents[0].handle_member(w.now, b, &[]);
    let two = vec![
        "198.51.100.1/24".parse().expect("net"),
        "198.51.100.7/24".parse().expect("net"),
    ];
    w.agents[0].set_host_addrs(w.now, two);
    w.run(Duration::from_secs(2));
    assert!(!w.reverse_next_batch, "the messages were not reordered");
    assert_eq!(w.path(0).0, PathKind::Direct, "{:?}", w.path(0));
    assert_eq!(w.path(1).0, PathKind::Direct, "{:?}", w.path(1));
    // The early candidate was kept and used, not refused.
    assert_eq!(w.agents[1].drops().signal_rejected, 0);
    assert_eq!(w.agents[1].remote_candidate_count(&KA), 2);
}

#[test]
fn a_restarted_peer_is_reconnected_and_a_goodbye_cleans_up() {
    let mut w = World::new(
        opts(KA, "198.51.100.1/24", true, vec![]),
        opts(KB, "203.0.113.2/24", true, vec![]),
    );
    w.online();
    w.run(Duration::from_secs(2));
    assert_eq!(w.path(0).0, PathKind::Direct);
    let (a_before, b_before) = w.agents[0].session_ids(&KB).expect("session");
    assert_eq!(b_before, w.agents[1].session_ids(&KA).map(|s| s.0));
    // B restarts: new process (a later epoch), new ICE credentials, new
    // session id.
    let mut restarted = opts(KB, "203.0.113.2/24", true, vec![]);
    restarted.session_epoch += 60_000;
    w.agents[1] = Agent::new(restarted, w.now);
    w.seen[1] = Seen::default();
    let a = w.keys[0];
    w.agents[1].handle_member(w.now, a, &[]);
    w.run(Duration::from_secs(3));
    assert_eq!(w.path(0).0, PathKind::Direct, "{:?}", w.path(0));
    assert_eq!(w.path(1).0, PathKind::Direct, "{:?}", w.path(1));
    // A rebuilt its session for B's new one.
    let (a_after, b_seen) = w.agents[0].session_ids(&KB).expect("session");
    let b_now = w.agents[1].session_ids(&KA).expect("session").0;
    assert_ne!(a_after, a_before);
    assert_eq!(b_seen, Some(b_now));
    assert!(b_now > b_before.expect("known"));
    // A late message of B's old session changes nothing.
    w.agents[0].handle_message(
        w.now,
        KB,
        PeerMessage::Bye {
            session: b_before.expect("known"),
        },
    );
    w.run(Duration::from_millis(100));
    assert_eq!(w.agents[0].session_ids(&KB), Some((a_after, Some(b_now))));
    // B says goodbye: A drops the session and, for an auto peer, the peer.
    w.agents[1].shutdown(w.now);
    w.run(Duration::from_millis(100));
    assert_eq!(w.seen[0].removed, vec![w.keys[1]]);
    assert!(w.agents[0].status(w.now).is_empty());
}

#[test]
fn a_vanished_peer_is_dropped_and_others_are_untouched() {
    let mut w = World::new(
        opts(KA, "198.51.100.1/24", true, vec![]),
        opts(KB, "203.0.113.2/24", true, vec![]),
    );
    w.online();
    w.run(Duration::from_secs(2));
    // A third member A knows of but never hears from.
    let kc = signaling::PublicKey([0xCC; 32]);
    w.agents[0].handle_member(w.now, kc, &[]);
    w.run(Duration::from_millis(100));
    assert_eq!(w.agents[0].status(w.now).len(), 2);
    // C goes offline and never answered: dropped after 60 s, B untouched.
    w.agents[0].handle_offline(w.now, kc);
    w.run(Duration::from_secs(65));
    assert_eq!(w.seen[0].removed, vec![kc]);
    assert_eq!(w.path(0).0, PathKind::Direct);
    // B's signaling goes away, but its tunnel still answers: B stays.
    let b = w.keys[1];
    w.agents[0].handle_offline(w.now, b);
    w.run(Duration::from_secs(70));
    assert_eq!(w.path(0).0, PathKind::Direct, "B is alive; keep it");
    assert_eq!(w.seen[0].removed, vec![kc]);
    // Now B is offline *and* silent: dropped after 60 s.
    w.cut = true;
    w.run(Duration::from_secs(65));
    assert_eq!(w.seen[0].removed, vec![kc, b]);
    // A late candidate from B does not bring it back.
    w.agents[0].handle_message(
        w.now,
        b,
        PeerMessage::Candidate {
            session: 1,
            candidate: "candidate:1 1 udp 1 203.0.113.2 9 typ host".into(),
        },
    );
    assert!(w.agents[0].status(w.now).is_empty());
}

#[test]
fn bad_input_is_counted_and_dropped() {
    let mut w = World::new(
        opts(KA, "198.51.100.1/24", false, vec![KB]),
        opts(KB, "203.0.113.2/24", true, vec![]),
    );
    w.online();
    w.run(Duration::from_secs(2));
    assert_eq!(w.path(0).0, PathKind::Direct);
    let now = w.now;
    let stranger: SocketAddr = "192.0.2.66:4000".parse().expect("addr");
    let a = &mut w.agents[0];
    // Garbage, a STUN-looking header with no session, WireGuard from nowhere.
    for len in 0..200 {
        let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
        assert!(a.handle_datagram(now, stranger, None, &junk).is_none());
    }
    let mut stun = vec![0u8; 20];
    stun[1] = 1;
    stun[4..8].copy_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
    assert!(a.handle_datagram(now, stranger, None, &stun).is_none());
    let mut wg = vec![0u8; 64];
    wg[0] = 4;
    assert!(a.handle_datagram(now, stranger, None, &wg).is_none());
    // A message from a key that is not in A's peer list.
    a.handle_message(
        now,
        signaling::PublicKey([0xDD; 32]),
        PeerMessage::Bye { session: 1 },
    );
    let d = a.drops();
    assert!(d.malformed > 100, "{d:?}");
    assert!(d.stun_unmatched >= 1, "{d:?}");
    assert!(d.wg_unknown_source >= 1, "{d:?}");
    assert_eq!(d.signal_rejected, 1, "{d:?}");
    // The real peer is unaffected.
    w.run(Duration::from_secs(2));
    assert_eq!(w.path(0).0, PathKind::Direct);
    // WireGuard data from the peer's address is handed up for that peer.
    let from = SocketAddr::new(w.ips[1], 51821);
    let got = w.agents[0].handle_datagram(w.now, from, Some(w.ips[0]), &wg);
    assert_eq!(got.map(|(k, p)| (k, p.len())), Some((w.keys[1], 64)));
}

#[test]
fn a_lost_offer_is_sent_again() {
    let mut w = World::new(
        opts(KA, "198.51.100.1/24", true, vec![]),
        opts(KB, "203.0.113.2/24", true, vec![]),
    );
    // Only A sees B online, and its offer is lost on the way.
    w.lose_signals = 1;
    let b = w.keys[1];
    w.agents[0].handle_member(w.now, b, &[]);
    w.run(Duration::from_secs(4));
    assert_eq!(w.path(1).0, PathKind::Connecting, "B never heard of A yet");
    w.run(Duration::from_secs(3));
    assert_eq!(w.path(0).0, PathKind::Direct, "{:?}", w.path(0));
    assert_eq!(w.path(1).0, PathKind::Direct, "{:?}", w.path(1));
    assert_eq!(w.seen[0].offers, 2);
}

#[test]
fn early_candidates_survive_when_presence_creates_the_peer() {
    let mut w = World::new(
        opts(KA, "198.51.100.1/24", true, vec![]),
        opts(KB, "203.0.113.2/24", true, vec![]),
    );
    let (a, b) = (w.keys[0], w.keys[1]);
    w.agents[0].handle_member(w.now, b, &[]);
    let a_id = w.agents[0].session_ids(&b).expect("session").0;
    // A candidate of A's reaches B before B knows A at all...
    w.agents[1].handle_message(
        w.now,
        a,
        PeerMessage::Candidate {
            session: a_id,
            candidate: "candidate:9 1 udp 2130706431 198.51.100.9 51821 typ host".into(),
        },
    );
    // ...then presence makes A a peer, then A's offer arrives.
    w.agents[1].handle_member(w.now, a, &[]);
    w.run(Duration::from_secs(2));
    assert_eq!(w.path(1).0, PathKind::Direct, "{:?}", w.path(1));
    assert_eq!(w.agents[1].remote_candidate_count(&a), 2);
    assert_eq!(w.agents[1].drops().signal_rejected, 0);
}

#[test]
fn a_late_offer_of_an_older_session_is_ignored() {
    let mut w = World::new(
        opts(KA, "198.51.100.1/24", true, vec![]),
        opts(KB, "203.0.113.2/24", true, vec![]),
    );
    w.online();
    w.run(Duration::from_secs(2));
    let before = w.agents[0].session_ids(&KB).expect("session");
    let b_id = before.1.expect("answered");
    w.agents[0].handle_message(
        w.now,
        KB,
        PeerMessage::Offer {
            session: b_id - 1,
            ufrag: "old1".into(),
            pwd: "anOldPasswordOf22chars".into(),
            candidates: vec![],
            wg_port: Some(1),
            cert: None,
        },
    );
    w.run(Duration::from_millis(200));
    assert_eq!(w.agents[0].session_ids(&KB), Some(before));
    assert_eq!(w.agents[0].drops().signal_rejected, 1);
    assert_eq!(w.path(0).0, PathKind::Direct);
}

#[test]
fn a_relay_added_later_is_allocated_at_once() {
    let now = Instant::now();
    let mut a = Agent::new(opts(KA, "198.51.100.1/24", true, vec![]), now);
    while a.poll_output().is_some() {}
    let server: SocketAddr = "192.0.2.10:3478".parse().expect("addr");
    let spec =
        ice_agent::agent::RelaySpec::udp(server, Some(relay::client::ClientConfig::new("u", "p")));
    a.add_relay(now, spec.clone());
    a.add_relay(now, spec);
    assert!(a.poll_timeout().is_some_and(|t| t <= now));
    a.handle_timeout(now);
    let sent: Vec<SocketAddr> = std::iter::from_fn(|| a.poll_output())
        .filter_map(|o| match o {
            Output::Send { to, .. } => Some(to),
            _ => None,
        })
        .collect();
    // One Allocate to it (the second add was the same relay).
    assert_eq!(sent, vec![server]);
    assert_eq!(a.relay_status().len(), 1);
}

#[test]
fn a_member_naming_another_peers_address_does_not_capture_its_packets() {
    let mut w = World::new(
        opts(KA, "198.51.100.1/24", true, vec![]),
        opts(KB, "203.0.113.2/24", true, vec![]),
    );
    w.online();
    w.run(Duration::from_secs(2));
    // C offers B's address as its own candidate.
    let kc = signaling::PublicKey([0xCC; 32]);
    w.agents[0].handle_message(
        w.now,
        kc,
        PeerMessage::Offer {
            session: 7,
            ufrag: "cccc".into(),
            pwd: "cccccccccccccccccccccc".into(),
            candidates: vec!["candidate:1 1 udp 2130706431 203.0.113.2 51821 typ host".into()],
            wg_port: None,
            cert: None,
        },
    );
    // At once: B's next authenticated check would win its address back, so
    // look before one arrives.
    let mut wg = vec![0u8; 64];
    wg[0] = 4;
    let from = SocketAddr::new(w.ips[1], 51821);
    let got = w.agents[0].handle_datagram(w.now, from, Some(w.ips[0]), &wg);
    assert_eq!(got.map(|(k, _)| k), Some(KB));
}

#[test]
fn a_simulation_is_reproducible_from_its_seeds() {
    // The agent's own randomness (ICE credentials, session seeds, STUN
    // transaction ids) comes from `AgentOptions::seed`; the `is` crate's
    // internal tie-breaker and transaction ids from fastrand, seeded here.
    let run = |seed: u8| {
        fastrand::seed(7);
        let mut a = opts(KA, "198.51.100.1/24", true, vec![]);
        a.seed = [seed; 32];
        let mut b = opts(KB, "203.0.113.2/24", true, vec![]);
        b.seed = [seed.wrapping_add(1); 32];
        let mut w = World::new(a, b);
        w.online();
        w.run(Duration::from_secs(2));
        assert_eq!(w.path(0).0, PathKind::Direct);
        (w.seen[0].sent.clone(), w.seen[1].sent.clone())
    };
    let first = run(3);
    assert!(!first.0.is_empty());
    assert_eq!(first, run(3), "same seeds, different bytes on the wire");
    assert_ne!(first, run(9), "different seeds, same bytes");
}
