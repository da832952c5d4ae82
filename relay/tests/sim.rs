//! Deterministic tests: the sans-IO server and client driven together on a
//! virtual clock. No sockets; addresses are values. Relayed sockets "bind"
//! instantly through `relay_bound`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay::auth::{rest_password, rest_username};
use relay::client::{Client, ClientConfig, ClientEvent};
use relay::server::{
    ClientSocket, Event, Metrics, Quotas, Server, ServerConfig, Transmit, Transport,
};
use relay::stun::{self, attr, method, Class, Message, MessageBuilder};

const RELAY_IP: &str = "198.51.100.1";
const SERVER: &str = "198.51.100.1:3478";
const UNIX0: u64 = 1_800_000_000;
/// Fixed randomness: the nonce secret and the seeds of servers and clients.
const NONCE_SECRET: [u8; 32] = [7; 32];
const SERVER_SEED: u64 = 1;
const CLIENT_SEED: u64 = 1000;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// A client socket, its state machine, its events and the peer data it received.
type SimClient = (
    ClientSocket,
    Client,
    Vec<ClientEvent>,
    Vec<(SocketAddr, Vec<u8>)>,
);

struct Sim {
    now: Instant,
    server: Server,
    clients: Vec<SimClient>,
    /// Datagrams the server sent to peers: (relayed addr, peer, payload).
    to_peers: Vec<(relay::server::RelayToken, SocketAddr, Vec<u8>)>,
    bound: std::collections::HashMap<u64, SocketAddr>,
    /// Kernel fast path changes the server asked for: (entry, install).
    fast: Vec<(relay::server::FastPath, bool)>,
}

fn config(now: Instant) -> ServerConfig {
    let mut c = ServerConfig::new(
        "wgice.test",
        RELAY_IP.parse().expect("ip"),
        now,
        UNIX0,
        NONCE_SECRET,
    );
    c.credentials
        .users
        .insert("alice".into(), "wonderland".into());
    c.credentials.users.insert("bob".into(), "builder".into());
    c.credentials.rest_secrets.push("s3cret".into());
    c.port_range = (50000, 50099);
    c.relay_ports = (50000, 50099);
    c
}

impl Sim {
    fn new(cfg: impl FnOnce(&mut ServerConfig), quotas: Quotas) -> Sim {
        Sim::shard(Instant::now(), cfg, Arc::new(quotas))
    }

    /// One shard of a multi-shard relay: shards share `quotas` (and the clock base `now`).
    fn shard(now: Instant, cfg: impl FnOnce(&mut ServerConfig), quotas: Arc<Quotas>) -> Sim {
        let mut c = config(now);
        cfg(&mut c);
        Sim {
            now,
            server: Server::new(c, quotas, Arc::new(Metrics::default()), now, SERVER_SEED),
            clients: Vec::new(),
            to_peers: Vec::new(),
            bound: Default::default(),
            fast: Vec::new(),
        }
    }

    fn add_client(&mut self, remote: &str, cc: ClientConfig) -> usize {
        let cs = ClientSocket {
            transport: Transport::Udp,
            local: sa(SERVER),
            remote: sa(remote),
        };
        // Every client its own seed, fixed: runs repeat byte for byte.
        let seed = CLIENT_SEED + self.clients.len() as u64;
        self.clients
            .push((cs, Client::new(cc, seed), vec![], vec![]));
        self.clients.len() - 1
    }

    /// Moves datagrams until nothing is in flight.
    fn settle(&mut self) {
        for _ in 0..100 {
            let mut moved = false;
            for i in 0..self.clients.len() {
                while let Some(d) = self.clients[i].1.poll_transmit() {
                    moved = true;
                    let cs = self.clients[i].0;
                    if let Some(f) = self.server.handle_client(self.now, cs, &d) {
                        self.to_peers.push((f.relay, f.peer, f.payload.to_vec()));
                    }
                }
                while let Some(e) = self.clients[i].1.poll_event() {
                    self.clients[i].2.push(e);
                }
            }
            while let Some(e) = self.server.poll_event() {
                moved = true;
                match e {
                    Event::BindRelay { token, addr } => {
                        self.bound.insert(token.0, addr);
                        self.server.relay_bound(self.now, token, Ok(addr));
                    }
                    Event::ReleaseRelay { token } => {
                        self.bound.remove(&token.0);
                    }
                    Event::ClientAuthenticated { .. } => {}
                    Event::FastPath { entry, install } => self.fast.push((entry, install)),
                }
            }
            while let Some(t) = self.server.poll_transmit() {
                moved = true;
                match t {
                    Transmit::ToClient {
                        client, payload, ..
                    } => {
                        if let Some(c) = self.clients.iter_mut().find(|c| c.0 == client) {
                            if let Some((peer, data)) = c.1.handle_input(self.now, &payload) {
                                c.3.push((peer, data.to_vec()));
                            }
                        }
                    }
                    Transmit::ToPeer {
                        relay,
                        peer,
                        payload,
                    } => self.to_peers.push((relay, peer, payload)),
                }
            }
            if !moved {
                return;
            }
        }
        panic!("simulation did not settle");
    }

    /// Advances the virtual clock in 1 s steps, driving every timeout.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now = (self.now + Duration::from_secs(1)).min(end);
            self.server.handle_timeout(self.now);
            for c in &mut self.clients {
                if c.1.poll_timeout().is_some_and(|t| t <= self.now) {
                    c.1.handle_timeout(self.now);
                }
            }
            self.settle();
        }
    }

    fn events(&mut self, i: usize) -> Vec<ClientEvent> {
        std::mem::take(&mut self.clients[i].2)
    }

    fn allocate(&mut self, i: usize) -> SocketAddr {
        let now = self.now;
        self.clients[i].1.allocate(now);
        self.settle();
        let ev = self.events(i);
        match ev
            .iter()
            .find(|e| matches!(e, ClientEvent::Allocated { .. }))
        {
            Some(ClientEvent::Allocated { relayed, .. }) => relayed[0],
            _ => panic!("no allocation: {ev:?}"),
        }
    }

    /// A peer sends `data` to the relayed address of client `i`.
    fn peer_sends(&mut self, i: usize, peer: SocketAddr, data: &[u8]) {
        let relayed = self.clients[i].1.relayed()[0];
        let token = *self
            .bound
            .iter()
            .find(|(_, a)| **a == relayed)
            .map(|(t, _)| t)
            .expect("relayed socket bound");
        let mut buf = vec![0u8; 4 + data.len() + 3];
        buf[4..4 + data.len()].copy_from_slice(data);
        if let Some(f) = self.server.handle_peer(
            self.now,
            relay::server::RelayToken(token),
            peer,
            &mut buf,
            data.len(),
        ) {
            let c = self
                .clients
                .iter_mut()
                .find(|c| c.0 == f.client)
                .expect("client");
            if let Some((p, d)) = c.1.handle_input(self.now, &buf[..f.len]) {
                c.3.push((p, d.to_vec()));
            }
        }
        self.settle();
    }
}

#[test]
fn allocate_channel_and_relay_both_ways() {
    let mut s = Sim::new(|_| {}, Quotas::default());
    let c = s.add_client("192.0.2.10:40000", ClientConfig::new("alice", "wonderland"));
    let relayed = s.allocate(c);
    assert_eq!(relayed.ip(), RELAY_IP.parse::<IpAddr>().expect("ip"));
    assert!((50000..=50099).contains(&relayed.port()));
    assert_eq!(s.clients[c].1.mapped(), Some(sa("192.0.2.10:40000")));

    let peer = sa("203.0.113.5:51820");
    let now = s.now;
    let ch = s.clients[c]
        .1
        .bind_channel(now, peer)
        .expect("a free channel");
    s.settle();
    assert!(s
        .events(c)
        .contains(&ClientEvent::ChannelBound { peer, channel: ch }));

    // Client → peer via ChannelData.
    let mut out = Vec::new();
    s.clients[c]
        .1
        .encode_to(peer, b"wireguard-handshake", &mut out);
    assert!(stun::channel_data::is_channel_data(&out));
    let cs = s.clients[c].0;
    let f = s.server.handle_client(s.now, cs, &out).expect("forwarded");
    assert_eq!((f.peer, f.payload), (peer, &b"wireguard-handshake"[..]));

    // Peer → client: framed in place as ChannelData.
    s.peer_sends(c, peer, b"response");
    assert_eq!(s.clients[c].3.pop(), Some((peer, b"response".to_vec())));

    // Another peer without permission is dropped.
    s.peer_sends(c, sa("203.0.113.6:1"), b"nope");
    assert!(s.clients[c].3.is_empty());
    assert!(
        s.server
            .metrics()
            .dropped_invalid
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[test]
fn send_and_data_indications_without_channel() {
    let mut s = Sim::new(|_| {}, Quotas::default());
    let c = s.add_client("192.0.2.10:40000", ClientConfig::new("bob", "builder"));
    s.allocate(c);
    let peer = sa("203.0.113.7:9999");
    let now = s.now;
    s.clients[c].1.create_permission(now, peer.ip());
    s.settle();
    assert!(s
        .events(c)
        .contains(&ClientEvent::PermissionCreated(peer.ip())));
    let mut out = Vec::new();
    s.clients[c].1.encode_to(peer, b"via-send", &mut out);
    let cs = s.clients[c].0;
    let f = s.server.handle_client(s.now, cs, &out).expect("forwarded");
    assert_eq!(f.payload, b"via-send");
    s.peer_sends(c, peer, b"via-data");
    assert_eq!(s.clients[c].3.pop(), Some((peer, b"via-data".to_vec())));
}

#[test]
fn refreshes_keep_everything_alive_and_silence_expires_it() {
    let mut s = Sim::new(|_| {}, Quotas::default());
    let c = s.add_client("192.0.2.10:40000", ClientConfig::new("alice", "wonderland"));
    s.allocate(c);
    let peer = sa("203.0.113.5:51820");
    let now = s.now;
    s.clients[c].1.bind_channel(now, peer);
    s.settle();
    // Two hours: allocation (600 s), permission (300 s), channel (600 s) and
    // nonce (600 s) all expire several times over unless refreshed.
    s.advance(Duration::from_secs(7200));
    let ev = s.events(c);
    assert!(
        ev.iter()
            .any(|e| matches!(e, ClientEvent::Refreshed { .. })),
        "{ev:?}"
    );
    assert!(
        !ev.iter()
            .any(|e| matches!(e, ClientEvent::Lost { .. } | ClientEvent::Failed { .. })),
        "{ev:?}"
    );
    assert_eq!(s.server.allocation_count(), 1);
    s.peer_sends(c, peer, b"still here");
    assert_eq!(s.clients[c].3.pop(), Some((peer, b"still here".to_vec())));

    // A client that goes silent loses its allocation after the lifetime.
    let cs = s.clients[c].0;
    s.clients.clear();
    s.advance(Duration::from_secs(601));
    assert_eq!(s.server.allocation_count(), 0);
    assert!(s.bound.is_empty(), "relayed socket released");
    let _ = cs;
}

#[test]
fn lifetime_zero_deletes() {
    let mut s = Sim::new(|_| {}, Quotas::default());
    let c = s.add_client("192.0.2.10:40000", ClientConfig::new("alice", "wonderland"));
    s.allocate(c);
    let now = s.now;
    s.clients[c].1.deallocate(now);
    s.settle();
    assert!(s.events(c).contains(&ClientEvent::Deallocated));
    assert_eq!(s.server.allocation_count(), 0);
    assert!(s.bound.is_empty());
}

#[test]
fn stale_nonce_is_renewed_transparently() {
    let mut s = Sim::new(
        |c| c.nonces = relay::auth::NonceSigner::with_secret([9; 32], 60),
        Quotas::default(),
    );
    let c = s.add_client("192.0.2.10:40000", ClientConfig::new("alice", "wonderland"));
    s.allocate(c);
    // Jump past the nonce lifetime without running timers, then refresh.
    s.now += Duration::from_secs(90);
    s.server.handle_timeout(s.now);
    let now = s.now;
    s.clients[c].1.set_credentials(now, "alice", "wonderland");
    // Capture the server's first answer: it must be 438.
    let req = s.clients[c].1.poll_transmit().expect("refresh");
    let cs = s.clients[c].0;
    assert!(s.server.handle_client(s.now, cs, &req).is_none());
    let Some(Transmit::ToClient { payload, .. }) = s.server.poll_transmit() else {
        panic!("no answer")
    };
    let m = Message::parse(&payload).expect("stun");
    assert_eq!(m.error_code().map(|e| e.0), Some(438));
    s.clients[c].1.handle_input(s.now, &payload);
    s.settle();
    let ev = s.events(c);
    assert!(
        ev.iter()
            .any(|e| matches!(e, ClientEvent::Refreshed { .. })),
        "{ev:?}"
    );
}

#[test]
fn quotas_per_user_and_total() {
    let mut s = Sim::new(|_| {}, Quotas::new(2, 1));
    let a = s.add_client("192.0.2.10:1", ClientConfig::new("alice", "wonderland"));
    let a2 = s.add_client("192.0.2.10:2", ClientConfig::new("alice", "wonderland"));
    let b = s.add_client("192.0.2.11:1", ClientConfig::new("bob", "builder"));
    let rest_user = rest_username(UNIX0 + 3600, "carol");
    let rest_pw = rest_password("s3cret", &rest_user);
    let c = s.add_client("192.0.2.12:1", ClientConfig::new(&rest_user, &rest_pw));
    s.allocate(a);
    let now = s.now;
    s.clients[a2].1.allocate(now);
    s.settle();
    let ev = s.events(a2);
    assert!(
        ev.iter().any(|e| matches!(e, ClientEvent::Failed { code: 486, reason, .. } if reason.contains("max-allocations-per-user"))),
        "{ev:?}"
    );
    s.allocate(b);
    s.clients[c].1.allocate(now);
    s.settle();
    let ev = s.events(c);
    assert!(
        ev.iter().any(|e| matches!(e, ClientEvent::Failed { code: 486, reason, .. } if reason.contains("max-allocations)"))),
        "{ev:?}"
    );
    // Freeing one makes room.
    s.clients[a].1.deallocate(now);
    s.settle();
    s.allocate(c);
}

#[test]
fn default_deny_list_answers_403_with_the_rule() {
    let mut s = Sim::new(|_| {}, Quotas::default());
    let c = s.add_client("192.0.2.10:40000", ClientConfig::new("alice", "wonderland"));
    s.allocate(c);
    for bad in [
        "127.0.0.1",
        "0.0.0.0",
        "::ffff:127.0.0.1",
        "169.254.169.254",
        "10.1.2.3",
    ] {
        let now = s.now;
        s.clients[c]
            .1
            .create_permission(now, bad.parse().expect("ip"));
        s.settle();
        let ev = s.events(c);
        let reason = ev
            .iter()
            .find_map(|e| match e {
                ClientEvent::Failed {
                    code: 403, reason, ..
                } => Some(reason.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{bad}: expected 403, got {ev:?}"));
        assert!(reason.contains("--allow-peer"), "{bad}: {reason}");
    }
    // [::] needs an IPv6 allocation: the family check comes first (443).
    let now = s.now;
    s.clients[c]
        .1
        .create_permission(now, "::".parse().expect("ip"));
    s.settle();
    assert!(s
        .events(c)
        .iter()
        .any(|e| matches!(e, ClientEvent::Failed { code: 443, .. })));
    assert_eq!(
        s.server
            .metrics()
            .denied_peers
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
    // The relay's own address: only its relayed ports (other allocations), never its services.
    let now = s.now;
    s.clients[c].1.bind_channel(now, sa(SERVER));
    s.settle();
    let ev = s.events(c);
    assert!(
        ev.iter().any(|e| matches!(e, ClientEvent::Failed { code: 403, reason, .. } if reason.contains("not one of its live relayed ports"))),
        "{ev:?}"
    );
}

#[test]
fn ipv6_and_dual_stack_allocations() {
    let mut s = Sim::new(
        |c| {
            c.relay_ipv6 = Some("2001:db8::1".parse().expect("ip"));
        },
        Quotas::default(),
    );
    let mut cc = ClientConfig::new("alice", "wonderland");
    cc.dual_stack = true;
    let c = s.add_client("192.0.2.10:40000", cc);
    s.allocate(c);
    let relayed = s.clients[c].1.relayed().to_vec();
    assert_eq!(relayed.len(), 2, "{relayed:?}");
    assert!(relayed[0].is_ipv4() && relayed[1].is_ipv6());
    // [::] is denied for an IPv6 allocation.
    let now = s.now;
    s.clients[c]
        .1
        .create_permission(now, "::".parse().expect("ip"));
    s.settle();
    assert!(s
        .events(c)
        .iter()
        .any(|e| matches!(e, ClientEvent::Failed { code: 403, .. })));
}

#[test]
fn rest_credentials_rotate_under_a_live_allocation() {
    let mut s = Sim::new(|_| {}, Quotas::default());
    let u1 = rest_username(UNIX0 + 300, "dave");
    let c = s.add_client(
        "192.0.2.10:40000",
        ClientConfig::new(&u1, &rest_password("s3cret", &u1)),
    );
    let relayed = s.allocate(c);
    let peer = sa("203.0.113.5:51820");
    let now = s.now;
    s.clients[c].1.bind_channel(now, peer);
    s.settle();
    // Rotate before the first credential expires.
    s.advance(Duration::from_secs(200));
    let u2 = rest_username(UNIX0 + 7200, "dave");
    let now = s.now;
    s.clients[c]
        .1
        .set_credentials(now, &u2, &rest_password("s3cret", &u2));
    s.settle();
    assert!(s
        .events(c)
        .iter()
        .any(|e| matches!(e, ClientEvent::Refreshed { .. })));
    // Well past the first credential's expiry, refreshes keep working.
    s.advance(Duration::from_secs(1800));
    let ev = s.events(c);
    assert!(
        !ev.iter()
            .any(|e| matches!(e, ClientEvent::Lost { .. } | ClientEvent::Failed { .. })),
        "{ev:?}"
    );
    assert_eq!(s.clients[c].1.relayed()[0], relayed, "same allocation");
    s.peer_sends(c, peer, b"after rotation");
    assert_eq!(
        s.clients[c].3.pop(),
        Some((peer, b"after rotation".to_vec()))
    );

    // Another user's REST name cannot take over the allocation.
    let u3 = rest_username(UNIX0 + 7200, "mallory");
    let now = s.now;
    s.clients[c]
        .1
        .set_credentials(now, &u3, &rest_password("s3cret", &u3));
    s.settle();
    assert!(s
        .events(c)
        .iter()
        .any(|e| matches!(e, ClientEvent::Failed { code: 441, .. })));
}

#[test]
fn expired_rest_credentials_and_wrong_passwords_are_refused() {
    let mut s = Sim::new(|_| {}, Quotas::default());
    let old = rest_username(UNIX0 - 1, "erin");
    let a = s.add_client(
        "192.0.2.10:1",
        ClientConfig::new(&old, &rest_password("s3cret", &old)),
    );
    let b = s.add_client("192.0.2.10:2", ClientConfig::new("alice", "wrong"));
    let now = s.now;
    s.clients[a].1.allocate(now);
    s.clients[b].1.allocate(now);
    s.settle();
    for i in [a, b] {
        let ev = s.events(i);
        assert!(
            ev.iter()
                .any(|e| matches!(e, ClientEvent::Failed { code: 401, .. })),
            "{ev:?}"
        );
    }
    assert_eq!(s.server.allocation_count(), 0);
    assert!(
        s.server
            .metrics()
            .auth_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
}

fn raw_request(m: u16, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(&mut out, m, Class::Request, rand::random());
    for (t, v) in attrs {
        b.attr(*t, v);
    }
    out
}

/// Sends a raw request, answers the 401 with alice's credentials, returns the final answer.
fn authed_request(s: &mut Sim, remote: &str, m: u16, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    authed_request_with_tail(s, remote, m, attrs, &[])
}

/// Like [`authed_request`], with `tail` attributes placed after
/// MESSAGE-INTEGRITY-SHA256 (and before FINGERPRINT), where no one vouches for them.
fn authed_request_with_tail(
    s: &mut Sim,
    remote: &str,
    m: u16,
    attrs: &[(u16, Vec<u8>)],
    tail: &[(u16, Vec<u8>)],
) -> Vec<u8> {
    let cs = ClientSocket {
        transport: Transport::Udp,
        local: sa(SERVER),
        remote: sa(remote),
    };
    let _ = s.server.handle_client(s.now, cs, &raw_request(m, attrs));
    let Some(Transmit::ToClient { payload, .. }) = s.server.poll_transmit() else {
        panic!("no challenge")
    };
    let ch = Message::parse(&payload).expect("stun");
    let nonce = ch.str_attr(attr::NONCE).expect("nonce").to_owned();
    let key = stun::long_term_key("alice", "wgice.test", "wonderland");
    let mut out = Vec::new();
    {
        let mut b = MessageBuilder::new(&mut out, m, Class::Request, rand::random());
        for (t, v) in attrs {
            b.attr(*t, v);
        }
        b.attr(attr::USERNAME, b"alice")
            .attr(attr::REALM, b"wgice.test")
            .attr(attr::NONCE, nonce.as_bytes())
            .integrity(stun::Integrity::Sha256, &key);
        for (t, v) in tail {
            b.attr(*t, v);
        }
        b.fingerprint();
    }
    let _ = s.server.handle_client(s.now, cs, &out);
    while let Some(e) = s.server.poll_event() {
        if let Event::BindRelay { token, addr } = e {
            s.bound.insert(token.0, addr);
            s.server.relay_bound(s.now, token, Ok(addr));
        }
    }
    let Some(Transmit::ToClient { payload, .. }) = s.server.poll_transmit() else {
        panic!("no answer")
    };
    let m = Message::parse(&payload).expect("stun");
    if m.class() == Class::Success {
        assert_eq!(
            m.verify_integrity(&key),
            Some(stun::Integrity::Sha256),
            "SHA-256 answered in kind"
        );
    }
    payload
}

fn code(resp: &[u8]) -> Option<u16> {
    Message::parse(resp)
        .ok()
        .and_then(|m| m.error_code().map(|e| e.0))
}

#[test]
fn unsupported_options_get_the_right_codes() {
    let mut s = Sim::new(|_| {}, Quotas::default());
    let udp = (attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0]);
    let tcp = (attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0]);
    assert_eq!(
        code(&authed_request(
            &mut s,
            "192.0.2.1:1",
            method::ALLOCATE,
            &[tcp]
        )),
        Some(442)
    );
    assert_eq!(
        code(&authed_request(
            &mut s,
            "192.0.2.1:2",
            method::ALLOCATE,
            &[udp.clone(), (attr::RESERVATION_TOKEN, vec![0; 8])]
        )),
        Some(508)
    );
    assert_eq!(
        code(&authed_request(
            &mut s,
            "192.0.2.1:3",
            method::ALLOCATE,
            &[udp.clone(), (attr::EVEN_PORT, vec![0x80])]
        )),
        Some(508)
    );
    assert_eq!(
        code(&authed_request(
            &mut s,
            "192.0.2.1:4",
            method::ALLOCATE,
            &[
                udp.clone(),
                (attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0])
            ]
        )),
        Some(440)
    );
    assert_eq!(
        code(&authed_request(
            &mut s,
            "192.0.2.1:5",
            method::ALLOCATE,
            &[]
        )),
        Some(400)
    );
    // EVEN-PORT without reservation is honoured.
    let ok = authed_request(
        &mut s,
        "192.0.2.1:6",
        method::ALLOCATE,
        &[udp, (attr::EVEN_PORT, vec![0])],
    );
    let m = Message::parse(&ok).expect("stun");
    let relayed = m
        .xor_address(attr::XOR_RELAYED_ADDRESS)
        .expect("attr")
        .expect("addr");
    assert_eq!(relayed.port() % 2, 0);
    // Refresh without an allocation: 437.
    assert_eq!(
        code(&authed_request(
            &mut s,
            "192.0.2.1:7",
            method::REFRESH,
            &[(attr::LIFETIME, vec![0, 0, 2, 88])]
        )),
        Some(437)
    );
    // Unknown comprehension-required attribute: 420 before anything else.
    let cs = ClientSocket {
        transport: Transport::Udp,
        local: sa(SERVER),
        remote: sa("192.0.2.1:8"),
    };
    let _ = s.server.handle_client(
        s.now,
        cs,
        &raw_request(method::ALLOCATE, &[(0x7777, vec![1, 2, 3, 4])]),
    );
    let Some(Transmit::ToClient { payload, .. }) = s.server.poll_transmit() else {
        panic!()
    };
    let m = Message::parse(&payload).expect("stun");
    assert_eq!(m.error_code().map(|e| e.0), Some(420));
    assert_eq!(m.get(attr::UNKNOWN_ATTRIBUTES), Some(&[0x77, 0x77][..]));
}

#[test]
fn unauthenticated_flood_keeps_no_state_and_never_amplifies_in_strict_mode() {
    let mut s = Sim::new(|c| c.strict_amplification = true, Quotas::default());
    let small = raw_request(
        method::ALLOCATE,
        &[(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
    );
    let mut answered = 0;
    for i in 0..200_000u32 {
        let cs = ClientSocket {
            transport: Transport::Udp,
            local: sa(SERVER),
            remote: SocketAddr::new(
                IpAddr::from((0xC000_0200u32 + (i % 250_000)).to_be_bytes()),
                (i % 60000) as u16 + 1,
            ),
        };
        let req = if i % 2 == 0 {
            small.clone()
        } else {
            let mut padded = small.clone();
            let mut b = MessageBuilder::new(
                &mut padded,
                method::ALLOCATE,
                Class::Request,
                rand::random(),
            );
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(attr::PADDING, &[0; 120]);
            padded
        };
        assert!(s.server.handle_client(s.now, cs, &req).is_none());
        while let Some(t) = s.server.poll_transmit() {
            let Transmit::ToClient { payload, .. } = t else {
                panic!()
            };
            assert!(
                payload.len() <= req.len(),
                "response {} > request {}",
                payload.len(),
                req.len()
            );
            assert_eq!(code(&payload), Some(401));
            answered += 1;
        }
        assert!(s.server.poll_event().is_none());
    }
    assert_eq!(s.server.allocation_count(), 0);
    // Only the padded half could be answered.
    assert!(answered > 0 && answered <= 100_000, "{answered}");
}

#[test]
fn binding_with_rfc5780_and_amplification_budget() {
    let mut s = Sim::new(
        |c| {
            c.alt = Some(relay::server::AltAddress {
                primary: sa(SERVER),
                other: sa("198.51.100.2:3479"),
            })
        },
        Quotas::default(),
    );
    let cs = ClientSocket {
        transport: Transport::Udp,
        local: sa(SERVER),
        remote: sa("192.0.2.9:5555"),
    };
    // Padded request: room for RESPONSE-ORIGIN and OTHER-ADDRESS.
    let mut req = Vec::new();
    MessageBuilder::new(&mut req, method::BINDING, Class::Request, [1; 12])
        .u32_attr(attr::CHANGE_REQUEST, 6)
        .attr(attr::PADDING, &[0; 100])
        .fingerprint();
    let _ = s.server.handle_client(s.now, cs, &req);
    let Some(Transmit::ToClient { from, payload, .. }) = s.server.poll_transmit() else {
        panic!()
    };
    assert_eq!(from, sa("198.51.100.2:3479"), "changed IP and port");
    let m = Message::parse(&payload).expect("stun");
    assert_eq!(
        m.xor_address(attr::XOR_MAPPED_ADDRESS).and_then(Result::ok),
        Some(sa("192.0.2.9:5555"))
    );
    assert_eq!(
        m.address(attr::OTHER_ADDRESS).and_then(Result::ok),
        Some(sa("198.51.100.2:3479"))
    );
    assert_eq!(
        m.address(attr::RESPONSE_ORIGIN).and_then(Result::ok),
        Some(sa("198.51.100.2:3479"))
    );
    assert_eq!(m.check_fingerprint(), Some(true));
    assert!(payload.len() <= req.len());
}

fn alt_config(c: &mut ServerConfig) {
    c.alt = Some(relay::server::AltAddress {
        primary: sa(SERVER),
        other: sa("198.51.100.2:3479"),
    });
}

/// Sends `req` from `remote` and returns the answer, if any.
fn answer(s: &mut Sim, remote: SocketAddr, req: &[u8]) -> Option<Vec<u8>> {
    let local = if remote.is_ipv4() {
        sa(SERVER)
    } else {
        sa("[2001:db8::1]:3478")
    };
    let cs = ClientSocket {
        transport: Transport::Udp,
        local,
        remote,
    };
    let _ = s.server.handle_client(s.now, cs, req);
    let mut out = None;
    while let Some(t) = s.server.poll_transmit() {
        if let Transmit::ToClient { payload, .. } = t {
            out = Some(payload);
        }
    }
    out
}

fn bare_binding() -> Vec<u8> {
    let mut bare = Vec::new();
    MessageBuilder::new(&mut bare, method::BINDING, Class::Request, rand::random());
    bare
}

#[test]
fn binding_answers_are_paid_from_a_per_source_byte_budget() {
    let mut s = Sim::new(
        |c| {
            alt_config(c);
            // Let the byte budget, not the request rate, be what binds.
            c.unauth_rate = (1e6, 1e6);
        },
        Quotas::default(),
    );
    let (rate, burst) = s.server.config().unauth_bytes;
    let victim = sa("192.0.2.9:5555");
    // A flood of bare Bindings "from" one victim at one instant.
    let mut sizes = Vec::new();
    for _ in 0..10_000 {
        if let Some(a) = answer(&mut s, victim, &bare_binding()) {
            sizes.push(a.len());
        }
    }
    let total: usize = sizes.iter().sum();
    assert!(total <= burst as usize, "{total} > burst {burst}");
    assert!(total + 56 > burst as usize, "the burst is usable: {total}");
    assert_eq!(sizes[0], 56, "full RFC 5780 answer first");
    // Once the budget holds less than a full answer but enough for the
    // mandatory part, the answer shrinks to XOR-MAPPED-ADDRESS alone.
    let left = burst as usize - total;
    let wait_ms = (32usize.saturating_sub(left) * 1000).div_ceil(rate as usize) as u64;
    s.now += Duration::from_millis(wait_ms);
    assert_eq!(
        answer(&mut s, victim, &bare_binding()).map(|a| a.len()),
        Some(32),
        "{left} bytes left, {wait_ms} ms later"
    );
    let m = s.server.metrics();
    assert!(
        m.shrunk_amplification
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    assert!(
        m.dropped_amplification
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    // Sustained: ten seconds of flood get at most ten seconds of budget.
    let mut sustained = 0;
    for _ in 0..100 {
        s.now += Duration::from_millis(100);
        for _ in 0..100 {
            sustained += answer(&mut s, victim, &bare_binding()).map_or(0, |a| a.len());
        }
    }
    assert!(
        sustained <= 10 * rate as usize + 56,
        "{sustained} bytes in 10 s"
    );
    assert!(sustained >= 9 * rate as usize, "{sustained} bytes in 10 s");
    // Another source is not affected.
    assert_eq!(
        answer(&mut s, sa("192.0.2.10:5555"), &bare_binding()).map(|a| a.len()),
        Some(56)
    );
}

#[test]
fn strict_amplification_never_answers_larger_than_the_request() {
    let mut s = Sim::new(
        |c| {
            alt_config(c);
            c.strict_amplification = true;
        },
        Quotas::default(),
    );
    let from = sa("192.0.2.9:5555");
    assert_eq!(answer(&mut s, from, &bare_binding()), None, "20 < 32 bytes");
    for (pad, want) in [(12, 32), (28, 32), (32, 56), (200, 56)] {
        let mut req = Vec::new();
        MessageBuilder::new(&mut req, method::BINDING, Class::Request, rand::random())
            .attr(attr::PADDING, &vec![0; pad]);
        let a = answer(&mut s, from, &req).expect("answered");
        assert_eq!(a.len(), want, "request of {} bytes", req.len());
        assert!(a.len() <= req.len());
    }
}

#[test]
fn amplification_worst_case() {
    // The smallest request for each kind of unauthenticated answer, and the
    // largest answer it can get (fresh sources: no budget has been spent).
    let v6 = Sim::new(
        |c| {
            c.alt = Some(relay::server::AltAddress {
                primary: sa("[2001:db8::1]:3478"),
                other: sa("[2001:db8::2]:3479"),
            });
        },
        Quotas::default(),
    );
    let v4 = Sim::new(alt_config, Quotas::default());
    let same_ip_alt = Sim::new(
        |c| {
            c.alt = Some(relay::server::AltAddress {
                primary: sa(SERVER),
                other: sa("198.51.100.1:3479"),
            })
        },
        Quotas::default(),
    );
    let no_alt = Sim::new(|_| {}, Quotas::default());
    let mut sims = [v6, v4, same_ip_alt, no_alt];
    let change = raw_request(method::BINDING, &[(attr::CHANGE_REQUEST, vec![0, 0, 0, 4])]);
    let mut mi_only = Vec::new();
    MessageBuilder::new(&mut mi_only, method::ALLOCATE, Class::Request, [9; 12])
        .integrity(stun::Integrity::Sha1, b"k");
    let unknown: Vec<(u16, Vec<u8>)> = (0..16).map(|i| (0x7000 + i, vec![])).collect();
    let cases: Vec<(&str, usize, &str, Vec<u8>)> = vec![
        (
            "Binding, IPv6 client, RFC 5780",
            0,
            "[2001:db8:9::1]:1",
            bare_binding(),
        ),
        (
            "Binding, IPv4 client, RFC 5780",
            1,
            "192.0.2.1:1",
            bare_binding(),
        ),
        (
            "Allocate -> 401 (realm wgice.test)",
            3,
            "192.0.2.2:1",
            raw_request(method::ALLOCATE, &[]),
        ),
        (
            "unknown method -> 400",
            3,
            "192.0.2.3:1",
            raw_request(0x0ff, &[]),
        ),
        (
            "CHANGE-REQUEST, no --alt-listen -> 420",
            3,
            "192.0.2.4:1",
            change.clone(),
        ),
        (
            "CHANGE-REQUEST, alt on same IP -> 420",
            2,
            "192.0.2.5:1",
            change,
        ),
        ("M-I without USERNAME -> 400", 3, "192.0.2.6:1", mi_only),
        (
            "16 unknown attributes -> 420",
            3,
            "192.0.2.7:1",
            raw_request(method::BINDING, &unknown),
        ),
    ];
    let mut worst = 0.0f64;
    for (what, i, from, req) in cases {
        let a = answer(&mut sims[i], sa(from), &req).unwrap_or_else(|| panic!("{what}: no answer"));
        let ratio = a.len() as f64 / req.len() as f64;
        println!(
            "{what:40} request {:3} B, answer {:3} B, ×{ratio:.2}",
            req.len(),
            a.len()
        );
        worst = worst.max(ratio);
    }
    println!("worst case ×{worst:.2}");
    assert!(worst <= 5.0, "worst amplification ×{worst:.2}");
}

#[test]
fn relay_to_relay_between_two_allocations_on_one_relay() {
    // Both peers behind symmetric NATs: each talks to the other's relayed address.
    let mut s = Sim::new(|_| {}, Quotas::default());
    let a = s.add_client("192.0.2.10:40000", ClientConfig::new("alice", "wonderland"));
    let b = s.add_client("192.0.2.20:40000", ClientConfig::new("bob", "builder"));
    let ra = s.allocate(a);
    let rb = s.allocate(b);
    let now = s.now;
    s.clients[a].1.bind_channel(now, rb);
    s.clients[b].1.bind_channel(now, ra);
    s.settle();
    assert!(s
        .events(a)
        .iter()
        .any(|e| matches!(e, ClientEvent::ChannelBound { .. })));
    assert!(s
        .events(b)
        .iter()
        .any(|e| matches!(e, ClientEvent::ChannelBound { .. })));
    // A → relay → (A's relayed socket sends to B's relayed address) → B.
    let mut out = Vec::new();
    s.clients[a]
        .1
        .encode_to(rb, b"wg over two allocations", &mut out);
    let cs = s.clients[a].0;
    let f = s.server.handle_client(s.now, cs, &out).expect("forwarded");
    assert_eq!(f.peer, rb);
    let payload = f.payload.to_vec();
    // The kernel would deliver it to B's relayed socket, from A's relayed address.
    s.peer_sends(b, ra, &payload);
    assert_eq!(s.clients[b].3.pop(), Some((ra, payload)));
}

#[test]
fn rest_quota_counts_the_user_not_the_name() {
    let mut s = Sim::new(|_| {}, Quotas::new(0, 1));
    let u1 = rest_username(UNIX0 + 3600, "frank");
    let u2 = rest_username(UNIX0 + 3601, "frank");
    let a = s.add_client(
        "192.0.2.10:1",
        ClientConfig::new(&u1, &rest_password("s3cret", &u1)),
    );
    let b = s.add_client(
        "192.0.2.10:2",
        ClientConfig::new(&u2, &rest_password("s3cret", &u2)),
    );
    s.allocate(a);
    let now = s.now;
    s.clients[b].1.allocate(now);
    s.settle();
    assert!(
        s.events(b)
            .iter()
            .any(|e| matches!(e, ClientEvent::Failed { code: 486, .. })),
        "another expiry is the same user"
    );
    // Rotate a's credentials, then free the allocation: the count follows.
    let u3 = rest_username(UNIX0 + 7200, "frank");
    s.clients[a]
        .1
        .set_credentials(now, &u3, &rest_password("s3cret", &u3));
    s.settle();
    s.clients[a].1.deallocate(now);
    s.settle();
    assert!(s.events(a).contains(&ClientEvent::Deallocated));
    s.allocate(b);
}

#[test]
fn a_refused_new_username_keeps_the_allocation_on_the_old_credentials() {
    // RFC 8656 servers (coturn) answer 441 when the username changes under a
    // live allocation; ours does too for a different user.
    let mut s = Sim::new(|_| {}, Quotas::default());
    let c = s.add_client("192.0.2.10:40000", ClientConfig::new("alice", "wonderland"));
    let relayed = s.allocate(c);
    let now = s.now;
    s.clients[c].1.set_credentials(now, "bob", "builder");
    s.settle();
    let ev = s.events(c);
    assert!(
        ev.iter().any(|e| matches!(e, ClientEvent::Failed { code: 441, reason, .. } if reason.contains("next allocation"))),
        "{ev:?}"
    );
    assert!(
        ev.iter()
            .any(|e| matches!(e, ClientEvent::Refreshed { .. })),
        "re-sent with the old credentials: {ev:?}"
    );
    // An hour later the allocation is still alive and the same.
    s.advance(Duration::from_secs(3600));
    let ev = s.events(c);
    assert!(
        !ev.iter()
            .any(|e| matches!(e, ClientEvent::Lost { .. } | ClientEvent::Failed { .. })),
        "{ev:?}"
    );
    assert_eq!(s.clients[c].1.relayed()[0], relayed);
    // The next allocation uses the new credentials.
    let now = s.now;
    s.clients[c].1.deallocate(now);
    s.settle();
    s.allocate(c);
}

#[test]
fn own_address_peers_must_be_live_relayed_ports() {
    let mut s = Sim::new(|_| {}, Quotas::default());
    let a = s.add_client("192.0.2.10:40000", ClientConfig::new("alice", "wonderland"));
    let ra = s.allocate(a);
    // A port inside the relay range that no allocation holds (some other
    // local socket could sit there): refused.
    let idle = SocketAddr::new(ra.ip(), if ra.port() == 50099 { 50098 } else { 50099 });
    let now = s.now;
    s.clients[a].1.bind_channel(now, idle);
    s.settle();
    let ev = s.events(a);
    assert!(
        ev.iter().any(|e| matches!(e, ClientEvent::Failed { code: 403, reason, .. } if reason.contains("live relayed ports"))),
        "{ev:?}"
    );
}

/// XOR-PEER-ADDRESS value of an IPv4 address (IPv4 uses only the magic
/// cookie, so the bytes do not depend on the transaction ID).
fn xor_peer_v4(addr: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(a) = addr else {
        panic!("IPv4 only")
    };
    let mut v = vec![0, 1];
    v.extend_from_slice(&(a.port() ^ (stun::MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    v.extend_from_slice(&(u32::from(*a.ip()) ^ stun::MAGIC_COOKIE).to_be_bytes());
    v
}

/// Token of the relayed socket the simulation bound at `relayed`.
fn token_at(s: &Sim, relayed: SocketAddr) -> relay::server::RelayToken {
    relay::server::RelayToken(
        *s.bound
            .iter()
            .find(|(_, a)| **a == relayed)
            .map(|(t, _)| t)
            .expect("relayed socket bound"),
    )
}

/// True when a datagram from `peer` on `relayed` reaches the client (as
/// ChannelData or a Data indication).
fn peer_reaches_client(s: &mut Sim, relayed: SocketAddr, peer: SocketAddr) -> bool {
    let token = token_at(s, relayed);
    let mut buf = vec![0u8; 4 + 5 + 3];
    buf[4..9].copy_from_slice(b"hello");
    let framed = s
        .server
        .handle_peer(s.now, token, peer, &mut buf, 5)
        .is_some();
    let mut queued = false;
    while let Some(t) = s.server.poll_transmit() {
        queued |= matches!(t, Transmit::ToClient { .. });
    }
    framed || queued
}

#[test]
fn attributes_after_message_integrity_open_no_permission() {
    // RFC 8489 §14.5: only FINGERPRINT may follow MESSAGE-INTEGRITY(-SHA256);
    // anything else there is not covered by the MAC (an on-path attacker can
    // append it) and must be ignored.
    let mut s = Sim::new(|_| {}, Quotas::default());
    let udp = (attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0]);
    let ok = authed_request(&mut s, "192.0.2.1:1", method::ALLOCATE, &[udp]);
    let relayed = Message::parse(&ok)
        .expect("stun")
        .xor_address(attr::XOR_RELAYED_ADDRESS)
        .expect("attr")
        .expect("addr");
    let vouched = sa("203.0.113.5:7000");
    let smuggled = sa("203.0.113.66:7000");
    let answer = authed_request_with_tail(
        &mut s,
        "192.0.2.1:1",
        method::CREATE_PERMISSION,
        &[(attr::XOR_PEER_ADDRESS, xor_peer_v4(vouched))],
        &[(attr::XOR_PEER_ADDRESS, xor_peer_v4(smuggled))],
    );
    assert_eq!(
        Message::parse(&answer).expect("stun").class(),
        Class::Success
    );
    assert!(peer_reaches_client(&mut s, relayed, vouched));
    assert!(
        !peer_reaches_client(&mut s, relayed, smuggled),
        "a peer after MESSAGE-INTEGRITY got a permission"
    );
    assert_eq!(
        s.server
            .metrics()
            .permissions
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn relay_to_relay_channel_dies_with_the_other_allocation() {
    let mut s = Sim::new(|_| {}, Quotas::default());
    let a = s.add_client("192.0.2.10:40000", ClientConfig::new("alice", "wonderland"));
    let b = s.add_client("192.0.2.20:40000", ClientConfig::new("bob", "builder"));
    s.allocate(a);
    let rb = s.allocate(b);
    let now = s.now;
    s.clients[a].1.bind_channel(now, rb);
    s.settle();
    assert!(s
        .events(a)
        .iter()
        .any(|e| matches!(e, ClientEvent::ChannelBound { .. })));
    let mut out = Vec::new();
    s.clients[a].1.encode_to(rb, b"to b", &mut out);
    let cs = s.clients[a].0;
    assert!(s.server.handle_client(s.now, cs, &out).is_some());
    // B leaves: its port is no longer a relayed port, whoever binds it next.
    let now = s.now;
    s.clients[b].1.deallocate(now);
    s.settle();
    assert!(s.events(b).contains(&ClientEvent::Deallocated));
    let denied = s
        .server
        .metrics()
        .denied_peers
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        s.server.handle_client(s.now, cs, &out).is_none(),
        "ChannelData still reaches the relay's own port after its allocation ended"
    );
    assert_eq!(
        s.server
            .metrics()
            .denied_peers
            .load(std::sync::atomic::Ordering::Relaxed),
        denied + 1,
        "the refusal is counted"
    );
    // Nor does anything from that port reach A any more.
    let ra = s.clients[a].1.relayed()[0];
    assert!(!peer_reaches_client(&mut s, ra, rb));
}

#[test]
fn relayed_ports_are_per_family() {
    // Two shards of one relay: an IPv6 allocation on port P must not make the
    // relay's own IPv4 address reachable on P.
    let now = Instant::now();
    let quotas = Arc::new(Quotas::default());
    let mut v6 = Sim::shard(
        now,
        |c| {
            c.relay_ipv4 = None;
            c.relay_ipv6 = Some("2001:db8::1".parse().expect("ip"));
            c.port_range = (50010, 50010);
        },
        quotas.clone(),
    );
    let mut v4 = Sim::shard(now, |c| c.port_range = (50020, 50020), quotas);
    let x = v6.add_client("192.0.2.10:40000", ClientConfig::new("alice", "wonderland"));
    assert_eq!(v6.allocate(x), sa("[2001:db8::1]:50010"));
    let y = v4.add_client("192.0.2.20:40000", ClientConfig::new("bob", "builder"));
    assert_eq!(v4.allocate(y), sa("198.51.100.1:50020"));
    let now = v4.now;
    v4.clients[y].1.bind_channel(now, sa("198.51.100.1:50010"));
    v4.settle();
    let ev = v4.events(y);
    assert!(
        ev.iter()
            .any(|e| matches!(e, ClientEvent::Failed { code: 403, .. })),
        "own IPv4 address on a port only an IPv6 allocation holds: {ev:?}"
    );
}

#[test]
fn allow_peer_cannot_open_the_relays_own_addresses() {
    // An operator opens the relay's own network on purpose; the relay's own
    // address inside it stays closed except for live relayed ports.
    let mut s = Sim::new(
        |c| {
            c.policy = relay::policy::PeerPolicy::new(
                vec!["198.51.100.0/24".parse().expect("net")],
                vec![RELAY_IP.parse().expect("ip")],
            )
        },
        Quotas::default(),
    );
    let a = s.add_client("192.0.2.10:40000", ClientConfig::new("alice", "wonderland"));
    let b = s.add_client("192.0.2.20:40000", ClientConfig::new("bob", "builder"));
    s.allocate(a);
    let rb = s.allocate(b);
    let now = s.now;
    s.clients[a].1.bind_channel(now, sa(SERVER));
    s.settle();
    let ev = s.events(a);
    assert!(
        ev.iter().any(|e| matches!(e, ClientEvent::Failed { code: 403, reason, .. } if reason.contains("live relayed ports"))),
        "the relay's own service port: {ev:?}"
    );
    // Another address of the opened range, and relay-to-relay, still work.
    let now = s.now;
    s.clients[a].1.bind_channel(now, sa("198.51.100.7:3478"));
    s.clients[a].1.bind_channel(now, rb);
    s.settle();
    let ev = s.events(a);
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, ClientEvent::ChannelBound { .. }))
            .count(),
        2,
        "{ev:?}"
    );
}

/// Unauthenticated Allocates from `remote`, alternating over `shards`, all at
/// one instant; returns how many were answered.
fn unauthenticated_answers(shards: &mut [Sim], remote: &str, n: usize) -> usize {
    let req = raw_request(
        method::ALLOCATE,
        &[(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
    );
    let mut answered = 0;
    for i in 0..n {
        let s = &mut shards[i % 2];
        let cs = ClientSocket {
            transport: Transport::Udp,
            local: sa(SERVER),
            remote: sa(remote),
        };
        let _ = s.server.handle_client(s.now, cs, &req);
        while let Some(t) = s.server.poll_transmit() {
            answered += matches!(t, Transmit::ToClient { .. }) as usize;
        }
    }
    answered
}

#[test]
fn unauthenticated_budget_is_per_source_and_shared_by_shards() {
    let now = Instant::now();
    let quotas = Arc::new(Quotas::default());
    let mut shards = [
        Sim::shard(now, |_| {}, quotas.clone()),
        Sim::shard(now, |_| {}, quotas),
    ];
    let (_, burst) = shards[0].server.config().unauth_rate;
    let burst = burst as usize;
    // One source, spread over both shards: one budget, not one per shard.
    let a = unauthenticated_answers(&mut shards, "192.0.2.1:1000", 4 * burst);
    assert_eq!(a, burst, "one source over two shards");
    // Another source has its own budget.
    assert_eq!(
        unauthenticated_answers(&mut shards, "192.0.2.2:1000", 4 * burst),
        burst
    );
    // IPv6: one /64 is one source, whatever its interface identifiers.
    let mut answered = 0;
    for host in 1..=4 * burst {
        answered += unauthenticated_answers(
            &mut shards[host % 2..],
            &format!("[2001:db8:1:2::{host:x}]:1000"),
            1,
        );
    }
    assert_eq!(answered, burst, "one /64");
    // A different /64 is another source.
    assert_eq!(
        unauthenticated_answers(&mut shards, "[2001:db8:1:3::1]:1000", 1),
        1
    );
    // IPv4-mapped IPv6 is the IPv4 source.
    assert_eq!(
        unauthenticated_answers(&mut shards, "[::ffff:192.0.2.1]:1000", 1),
        0
    );
}

#[test]
fn unpadded_binding_gets_rfc5780_attributes() {
    // Standard RFC 5780 clients (coturn's turnutils_natdiscovery) do not pad
    // their requests; they need OTHER-ADDRESS and RESPONSE-ORIGIN anyway.
    let mut s = Sim::new(
        |c| {
            c.alt = Some(relay::server::AltAddress {
                primary: sa(SERVER),
                other: sa("198.51.100.2:3479"),
            })
        },
        Quotas::default(),
    );
    let cs = ClientSocket {
        transport: Transport::Udp,
        local: sa(SERVER),
        remote: sa("192.0.2.9:5555"),
    };
    let mut bare = Vec::new();
    MessageBuilder::new(&mut bare, method::BINDING, Class::Request, [2; 12]);
    let _ = s.server.handle_client(s.now, cs, &bare);
    let Some(Transmit::ToClient { payload, .. }) = s.server.poll_transmit() else {
        panic!("no answer")
    };
    let m = Message::parse(&payload).expect("stun");
    assert_eq!(
        m.address(attr::OTHER_ADDRESS).and_then(Result::ok),
        Some(sa("198.51.100.2:3479"))
    );
    assert_eq!(
        m.address(attr::RESPONSE_ORIGIN).and_then(Result::ok),
        Some(sa(SERVER))
    );
}

/// Every datagram of one exchange, both directions, with the given seeds:
/// Allocate (401, then authenticated), CreatePermission, a Send indication
/// from the client and a Data indication from the server. Returns the
/// relayed address and the datagrams in order.
fn transcript(server_seed: u64, client_seed: u64) -> (SocketAddr, Vec<Vec<u8>>) {
    let now = Instant::now();
    let quotas = Arc::new(Quotas::default());
    let metrics = Arc::new(Metrics::default());
    let mut server = Server::new(config(now), quotas, metrics, now, server_seed);
    let cs = ClientSocket {
        transport: Transport::Udp,
        local: sa(SERVER),
        remote: sa("192.0.2.10:40000"),
    };
    let mut client = Client::new(ClientConfig::new("alice", "wonderland"), client_seed);
    let peer = sa("203.0.113.5:51820");
    let mut log = Vec::new();
    let mut token = None;
    client.allocate(now);
    client.create_permission(now, peer.ip());
    for _ in 0..20 {
        while let Some(d) = client.poll_transmit() {
            let _ = server.handle_client(now, cs, &d);
            log.push(d);
        }
        while let Some(e) = server.poll_event() {
            if let Event::BindRelay { token: t, addr } = e {
                token = Some(t);
                server.relay_bound(now, t, Ok(addr));
            }
        }
        while let Some(Transmit::ToClient { payload, .. }) = server.poll_transmit() {
            let _ = client.handle_input(now, &payload);
            log.push(payload);
        }
    }
    let mut send = Vec::new();
    client.encode_to(peer, b"to the peer", &mut send);
    assert!(server.handle_client(now, cs, &send).is_some(), "forwarded");
    log.push(send);
    let mut buf = *b"\0\0\0\0from the peer\0\0\0";
    let token = token.expect("a relayed socket");
    assert!(server.handle_peer(now, token, peer, &mut buf, 13).is_none());
    let Some(Transmit::ToClient { payload, .. }) = server.poll_transmit() else {
        panic!("no Data indication")
    };
    log.push(payload);
    (client.relayed()[0], log)
}

#[test]
fn same_seeds_give_byte_identical_runs_and_other_seeds_differ() {
    let (relayed, run) = transcript(1, 2);
    assert!(
        run.len() >= 8,
        "Allocate twice, CreatePermission, answers, Send, Data"
    );
    // Same seeds, same inputs: the same relayed port, the same transaction
    // ids, byte for byte.
    assert_eq!(transcript(1, 2), (relayed, run.clone()));

    // Another server seed: another relayed port and another Data indication
    // transaction id; the client's requests are unchanged.
    let (relayed_b, run_b) = transcript(3, 2);
    assert_ne!(relayed_b.port(), relayed.port());
    assert_eq!(run_b[0], run[0], "client's first Allocate");
    assert_ne!(run_b.last(), run.last(), "server's Data indication");

    // Another client seed: other transaction ids from the client, the same
    // relayed port from the server.
    let (relayed_c, run_c) = transcript(1, 4);
    assert_eq!(relayed_c, relayed);
    assert_ne!(run_c[0], run[0], "client's first Allocate");
    let tid = |m: &[u8]| Message::parse(m).expect("stun").transaction_id();
    assert_ne!(tid(&run_c[0]), tid(&run[0]));
}

#[test]
fn fast_path_entries_follow_channels_permissions_and_the_allocation() {
    // Off by default: no events.
    let mut off = Sim::new(|_| {}, Quotas::default());
    let c = off.add_client("192.0.2.10:40000", ClientConfig::new("alice", "wonderland"));
    off.allocate(c);
    let now = off.now;
    off.clients[c].1.bind_channel(now, sa("203.0.113.5:51820"));
    off.settle();
    assert!(off.fast.is_empty());

    let mut s = Sim::new(
        |c| {
            c.fast_path = true;
            c.bandwidth_limit = Some(1_000_000);
        },
        Quotas::default(),
    );
    let c = s.add_client("192.0.2.10:40000", ClientConfig::new("alice", "wonderland"));
    let relayed = s.allocate(c);
    let peer = sa("203.0.113.5:51820");
    let now = s.now;
    let ch = s.clients[c].1.bind_channel(now, peer).expect("channel");
    s.settle();
    let (e, install) = s.fast.pop().expect("an entry for the new channel");
    assert!(install && s.fast.is_empty());
    assert_eq!(
        (
            e.client,
            e.listen,
            e.channel,
            e.relayed,
            e.peer,
            e.bandwidth
        ),
        (
            sa("192.0.2.10:40000"),
            sa(SERVER),
            ch,
            relayed,
            peer,
            Some(1_000_000)
        )
    );
    // The permission (300 s) ends before the channel (600 s).
    assert_eq!(e.expires, now + Duration::from_secs(300));

    // The client refreshes its permission and channel before they end: the
    // entry moves with them, never a gap.
    s.advance(Duration::from_secs(290));
    let moved: Vec<_> = s.fast.drain(..).collect();
    assert!(!moved.is_empty(), "no refresh reached the fast path");
    assert!(moved
        .iter()
        .all(|(f, i)| *i && f.expires > now + Duration::from_secs(300)));

    // A relay-to-relay channel (the relay's own address) stays in user space.
    let c2 = s.add_client("192.0.2.11:40000", ClientConfig::new("bob", "builder"));
    let relayed2 = s.allocate(c2);
    let now = s.now;
    s.clients[c].1.bind_channel(now, relayed2);
    s.settle();
    assert!(
        s.fast.iter().all(|(f, _)| f.peer != relayed2),
        "{:?}",
        s.fast
    );
    s.fast.clear();

    // Deleting the allocation removes its entry.
    let now = s.now;
    s.clients[c].1.deallocate(now);
    s.settle();
    assert!(
        s.fast.iter().any(|(f, i)| !*i && f.peer == peer),
        "deletion left the entry: {:?}",
        s.fast
    );

    // Silence: the sweep removes entries whose permission ended.
    let c3 = s.add_client("192.0.2.12:40000", ClientConfig::new("bob", "builder"));
    s.allocate(c3);
    let now = s.now;
    s.clients[c3].1.bind_channel(now, peer);
    s.settle();
    s.fast.clear();
    // Stop driving the client's timers: nothing refreshes.
    let end = s.now + Duration::from_secs(301);
    while s.now < end {
        s.now += Duration::from_secs(1);
        s.server.handle_timeout(s.now);
        s.settle();
    }
    assert!(
        s.fast.iter().any(|(f, i)| !*i && f.peer == peer),
        "expiry left the entry: {:?}",
        s.fast
    );
}
