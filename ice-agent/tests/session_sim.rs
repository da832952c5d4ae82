//! Two `PeerSession`s over a modelled network with a virtual clock.
//!
//! The model: each node sits on a LAN behind a NAT (none, port-restricted
//! = endpoint-independent mapping + address-and-port-dependent filtering,
//! or symmetric = endpoint-dependent mapping), one TURN relay on a public
//! address gives each node a relayed address, and signaling carries
//! candidates with a fixed delay. Every node also sends a WireGuard-like
//! data packet every 20 ms along its current path, so a path counts only
//! when data really arrives over it. A switch drops all traffic that does
//! not go through the relay (the "direct cut").
//!
//! Latencies (one way): same LAN 1 ms; node ↔ internet 10 ms per side
//! (so direct across the internet is 20 ms); node ↔ relay 15 ms per leg.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ice_agent::{
    Candidate, IceCreds, PathKind, PathStatus, PeerSession, SessionConfig, SessionEvent, Transmit,
    Via,
};
use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MS: Duration = Duration::from_millis(1);
const LAN_HOP: Duration = Duration::from_millis(1);
const ACCESS_HOP: Duration = Duration::from_millis(10);
const RELAY_LEG: Duration = Duration::from_millis(15);
const SIGNALING: Duration = Duration::from_millis(50);
const DATA_EVERY: Duration = Duration::from_millis(20);

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NatKind {
    None,
    /// EIM + APDF.
    PortRestricted,
    /// EDM (a new port per destination) + APDF.
    Symmetric,
}

#[derive(Debug)]
struct Nat {
    kind: NatKind,
    external: IpAddr,
    map: HashMap<(SocketAddr, Option<SocketAddr>), u16>,
    internal_of: HashMap<u16, SocketAddr>,
    allowed: HashSet<(u16, SocketAddr)>,
    next_port: u16,
}

impl Nat {
    fn new(kind: NatKind, external: IpAddr) -> Self {
        Nat {
            kind,
            external,
            map: HashMap::new(),
            internal_of: HashMap::new(),
            allowed: HashSet::new(),
            next_port: 40_000,
        }
    }

    fn outbound(&mut self, src: SocketAddr, dst: SocketAddr) -> SocketAddr {
        let key = match self.kind {
            NatKind::Symmetric => (src, Some(dst)),
            _ => (src, None),
        };
        let port = match self.map.get(&key) {
            Some(p) => *p,
            None => {
                let p = self.next_port;
                self.next_port += 7;
                self.map.insert(key, p);
                p
            }
        };
        self.internal_of.insert(port, src);
        self.allowed.insert((port, dst));
        SocketAddr::new(self.external, port)
    }

    /// Forgets every mapping (conntrack flushed): the next packets get
    /// new ports.
    fn flush(&mut self) {
        self.map.clear();
        self.internal_of.clear();
        self.allowed.clear();
    }

    fn inbound(&self, src: SocketAddr, dst: SocketAddr) -> Option<SocketAddr> {
        if dst.ip() != self.external || !self.allowed.contains(&(dst.port(), src)) {
            return None;
        }
        self.internal_of.get(&dst.port()).copied()
    }
}

#[derive(Debug)]
struct Lan {
    net: IpNet,
    nat: Option<Nat>,
}

#[derive(Debug)]
struct Node {
    session: PeerSession,
    lan: usize,
    host: SocketAddr,
    relayed: SocketAddr,
    /// (time, path) at every PathChanged.
    paths: Vec<(Instant, PathStatus)>,
    /// (time, attempt, next_in) at every DirectRetry.
    retries: Vec<(Instant, u32, Duration)>,
    /// (arrival time, source, receiver's destination address) of data packets.
    data_rx: Vec<(Instant, SocketAddr, SocketAddr)>,
    next_data: Instant,
    /// WireGuard-like packets sent (what the daemon reports as tx).
    data_tx: u64,
    /// (time, old, new) at every MappingChanged.
    mapping_changes: Vec<(Instant, SocketAddr, SocketAddr)>,
}

#[derive(Debug)]
struct Packet {
    at: Instant,
    seq: u64,
    to: usize,
    source: SocketAddr,
    destination: SocketAddr,
    data: Vec<u8>,
}

#[derive(Debug)]
enum Action {
    AddLocal(Candidate),
    AddRemote(Candidate),
    Creds(IceCreds),
    /// The daemon's fresh-socket Binding to the relay (coordinated punch).
    Measure,
    /// A punch message through signaling.
    Punch(ice_agent::punch::Msg),
}

struct Sim {
    start: Instant,
    now: Instant,
    lans: Vec<Lan>,
    nodes: Vec<Node>,
    queue: Vec<Packet>,
    actions: Vec<(Instant, usize, Action)>,
    seq: u64,
    cut_direct: bool,
    /// A blackhole on direct traffic (not to or from the relay).
    blackhole: Option<SimBlackhole>,
    /// Probability that any datagram is lost.
    loss: f64,
    rng: StdRng,
    /// Whether nodes send WireGuard-like data on their path.
    send_wireguard: bool,
    relay_stun: SocketAddr,
    /// When the last candidate reached its peer.
    candidates_exchanged: Option<Instant>,
    /// Datagrams the blackhole ate.
    blackhole_drops: u64,
    /// Data packets are full-size (an MTU blackhole then eats them too).
    full_size_data: bool,
    /// Every datagram a node sent from its socket: (node, destination).
    sent: Vec<(usize, SocketAddr)>,
    /// Last local port of a measurement socket.
    fresh_port: u16,
    /// Openers a node sent: (node, destination).
    openers: Vec<(usize, SocketAddr)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SimBlackhole {
    /// Drops WireGuard data (first byte 4), passes STUN.
    WireguardData,
    /// Drops UDP payloads above this many bytes.
    Above(usize),
}

/// A data packet as big as a full WireGuard datagram (1452 bytes).
const FULL_DATA: usize = 1452;

struct NodeSpec {
    lan: usize,
    host: &'static str,
}

impl Sim {
    /// Two nodes; `lans` lists (network, NAT kind, external IP).
    fn new(lans: &[(&str, NatKind, &str)], specs: [NodeSpec; 2]) -> Sim {
        let start = Instant::now();
        let lans: Vec<Lan> = lans
            .iter()
            .map(|(net, kind, ext)| Lan {
                net: net.parse().unwrap(),
                nat: (*kind != NatKind::None).then(|| Nat::new(*kind, ext.parse().unwrap())),
            })
            .collect();
        let nodes = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let mut cfg = SessionConfig::new(i == 0, 0x5eed + i as u64);
                cfg.local_networks = vec![lans[spec.lan].net];
                Node {
                    session: PeerSession::new(cfg, start),
                    lan: spec.lan,
                    host: sa(spec.host),
                    relayed: SocketAddr::new("203.0.113.1".parse().unwrap(), 50_001 + i as u16),
                    paths: Vec::new(),
                    retries: Vec::new(),
                    data_rx: Vec::new(),
                    next_data: start,
                    data_tx: 0,
                    mapping_changes: Vec::new(),
                }
            })
            .collect();
        let mut sim = Sim {
            start,
            now: start,
            lans,
            nodes,
            queue: Vec::new(),
            actions: Vec::new(),
            seq: 0,
            cut_direct: false,
            blackhole: None,
            loss: 0.0,
            rng: StdRng::seed_from_u64(0x105e),
            send_wireguard: true,
            relay_stun: sa("203.0.113.1:3478"),
            candidates_exchanged: None,
            blackhole_drops: 0,
            full_size_data: false,
            sent: Vec::new(),
            fresh_port: 60_000,
            openers: Vec::new(),
        };
        sim.gather();
        sim
    }

    /// Gathering as the daemon will do it: host at once, server-reflexive
    /// after one STUN round trip, relayed after two (401 + Allocate); the
    /// credentials and every candidate reach the peer over signaling.
    fn gather(&mut self) {
        let t0 = self.start;
        for i in 0..2 {
            let creds = self.nodes[i].session.local_credentials().clone();
            self.actions
                .push((t0 + SIGNALING, 1 - i, Action::Creds(creds)));
            let host = self.nodes[i].host;
            self.actions.push((
                t0,
                i,
                Action::AddLocal(Candidate::host(host, "udp").unwrap()),
            ));
            let relay_stun = self.relay_stun;
            if let Some(nat) = self.lans[self.nodes[i].lan].nat.as_mut() {
                let srflx = nat.outbound(host, relay_stun);
                self.actions.push((
                    t0 + 2 * RELAY_LEG,
                    i,
                    Action::AddLocal(Candidate::server_reflexive(srflx, host, "udp").unwrap()),
                ));
            }
            let relayed = self.nodes[i].relayed;
            self.actions.push((
                t0 + 4 * RELAY_LEG,
                i,
                Action::AddLocal(Candidate::relayed(relayed, host, "udp").unwrap()),
            ));
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    fn ms(&self, t: Instant) -> u64 {
        t.duration_since(self.start).as_millis() as u64
    }

    fn push(
        &mut self,
        at: Instant,
        to: usize,
        source: SocketAddr,
        destination: SocketAddr,
        data: Vec<u8>,
    ) {
        if self.loss > 0.0 && self.rng.random_bool(self.loss) {
            return;
        }
        self.seq += 1;
        self.queue.push(Packet {
            at,
            seq: self.seq,
            to,
            source,
            destination,
            data,
        });
    }

    /// A datagram from node `from`.
    fn send(&mut self, from: usize, t: Transmit) {
        match t.via {
            Via::Turn { relayed } => {
                assert_eq!(relayed, self.nodes[from].relayed, "only our own allocation");
                assert_eq!(t.source, relayed);
                let at = self.now + RELAY_LEG;
                self.route_public(relayed, t.destination, t.contents, at);
            }
            Via::Socket => {
                assert_eq!(
                    t.source, self.nodes[from].host,
                    "sent from a socket we don't own"
                );
                self.sent.push((from, t.destination));
                if ice_agent::punch::is_opener(&t.contents) {
                    self.openers.push((from, t.destination));
                }
                let dropped = match self.blackhole {
                    _ if self.is_relayed(t.destination) => false,
                    Some(SimBlackhole::WireguardData) => t.contents.first() == Some(&4),
                    Some(SimBlackhole::Above(n)) => t.contents.len() > n,
                    None => false,
                };
                if dropped {
                    self.blackhole_drops += 1;
                    return;
                }
                let lan = self.nodes[from].lan;
                let to = 1 - from;
                if self.nodes[to].lan == lan && t.destination == self.nodes[to].host {
                    if !self.cut_direct {
                        let at = self.now + LAN_HOP;
                        self.push(at, to, t.source, t.destination, t.contents);
                    }
                    return;
                }
                if self.lans[lan].net.contains(&t.destination.ip()) {
                    return; // nobody there
                }
                let public_src = match self.lans[lan].nat.as_mut() {
                    Some(nat) => nat.outbound(t.source, t.destination),
                    None => t.source,
                };
                let at = self.now + ACCESS_HOP;
                self.route_public(public_src, t.destination, t.contents, at);
            }
        }
    }

    fn is_relayed(&self, a: SocketAddr) -> bool {
        self.nodes.iter().any(|n| n.relayed == a)
    }

    fn route_public(&mut self, src: SocketAddr, dst: SocketAddr, data: Vec<u8>, at: Instant) {
        if let Some(k) = self.nodes.iter().position(|n| n.relayed == dst) {
            // The relay passes it up the owner's allocation.
            self.push(at + RELAY_LEG, k, src, dst, data);
            return;
        }
        if self.cut_direct && !self.is_relayed(src) {
            return;
        }
        for k in 0..self.nodes.len() {
            let lan = &self.lans[self.nodes[k].lan];
            let delivered = match &lan.nat {
                Some(nat) => nat.inbound(src, dst).filter(|i| *i == self.nodes[k].host),
                None => (dst == self.nodes[k].host).then_some(dst),
            };
            if let Some(internal) = delivered {
                self.push(at + ACCESS_HOP, k, src, internal, data);
                return;
            }
        }
        // Unsolicited or unknown: dropped silently, as real NATs do.
    }

    fn drain(&mut self, i: usize) {
        loop {
            let mut progressed = false;
            while let Some(t) = self.nodes[i].session.poll_transmit() {
                progressed = true;
                self.send(i, t);
            }
            while let Some(e) = self.nodes[i].session.poll_event() {
                progressed = true;
                let now = self.now;
                match e {
                    SessionEvent::PathChanged(p) => self.nodes[i].paths.push((now, p)),
                    SessionEvent::DirectRetry { attempt, next_in } => {
                        self.nodes[i].retries.push((now, attempt, next_in))
                    }
                    SessionEvent::MappingChanged { old, new, .. } => {
                        self.nodes[i].mapping_changes.push((now, old, new))
                    }
                    SessionEvent::MeasureMapping => {
                        self.actions
                            .push((now + 2 * ACCESS_HOP, i, Action::Measure))
                    }
                    SessionEvent::Punch(m) => {
                        self.actions
                            .push((now + SIGNALING, 1 - i, Action::Punch(m)))
                    }
                    _ => {}
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn send_data(&mut self, i: usize) {
        let p = self.nodes[i].session.path().clone();
        if let (Some(local), Some(remote)) = (p.local, p.remote) {
            self.nodes[i].data_tx += 1;
            let (now, tx) = (self.now, self.nodes[i].data_tx);
            self.nodes[i].session.note_data_tx(now, tx, None);
            let mut data = vec![4u8, 0, 0, 0];
            data.resize(if self.full_size_data { FULL_DATA } else { 32 }, 0);
            self.send(
                i,
                Transmit {
                    source: local,
                    destination: remote,
                    via: p.via,
                    contents: data,
                },
            );
        }
    }

    fn run_until(&mut self, end: Instant) {
        loop {
            for i in 0..2 {
                self.drain(i);
            }
            let mut next = end;
            if let Some(p) = self.queue.iter().map(|p| p.at).min() {
                next = next.min(p);
            }
            if let Some(a) = self.actions.iter().map(|a| a.0).min() {
                next = next.min(a);
            }
            for i in 0..2 {
                if let Some(t) = self.nodes[i].session.poll_timeout() {
                    next = next.min(t);
                }
                next = next.min(self.nodes[i].next_data);
            }
            let next = next.max(self.now);
            if next >= end && next > self.now {
                self.now = end;
                break;
            }
            self.now = next;
            let now = self.now;

            // Signaling actions.
            let mut due: Vec<(Instant, usize, Action)> = Vec::new();
            let mut rest = Vec::new();
            for a in self.actions.drain(..) {
                if a.0 <= now {
                    due.push(a);
                } else {
                    rest.push(a);
                }
            }
            self.actions = rest;
            for (_, i, action) in due {
                match action {
                    Action::AddLocal(c) => {
                        let c = self.nodes[i].session.add_local_candidate(now, c).unwrap();
                        self.actions
                            .push((now + SIGNALING, 1 - i, Action::AddRemote(c)));
                    }
                    Action::AddRemote(c) => {
                        self.nodes[i].session.add_remote_candidate(now, c);
                        if !self
                            .actions
                            .iter()
                            .any(|a| matches!(a.2, Action::AddRemote(_) | Action::AddLocal(_)))
                        {
                            self.candidates_exchanged = Some(now);
                        }
                    }
                    Action::Creds(c) => self.nodes[i].session.set_remote_credentials(now, c),
                    Action::Measure => {
                        // A fresh socket: a new internal port, so a new
                        // mapping even on the way to the same relay.
                        self.fresh_port += 1;
                        let fresh = SocketAddr::new(self.nodes[i].host.ip(), self.fresh_port);
                        let relay_stun = self.relay_stun;
                        let mapped = match self.lans[self.nodes[i].lan].nat.as_mut() {
                            Some(nat) => nat.outbound(fresh, relay_stun),
                            None => fresh,
                        };
                        self.nodes[i].session.handle_mapping(now, Some(mapped));
                    }
                    Action::Punch(m) => {
                        if let Err(e) = self.nodes[i].session.handle_punch(now, m) {
                            panic!("node {i} refused {m:?}: {e}");
                        }
                    }
                }
            }

            // Datagrams due.
            self.queue.sort_by_key(|p| (p.at, p.seq));
            while self.queue.first().is_some_and(|p| p.at <= now) {
                let p = self.queue.remove(0);
                let node = &mut self.nodes[p.to];
                if p.data.first() == Some(&4) {
                    node.data_rx.push((now, p.source, p.destination));
                    node.session.note_data_rx(now, p.source, p.destination);
                } else {
                    node.session
                        .handle_stun(now, p.source, p.destination, &p.data);
                }
            }

            for i in 0..2 {
                if self.nodes[i]
                    .session
                    .poll_timeout()
                    .is_some_and(|t| t <= now)
                {
                    self.nodes[i].session.handle_timeout(now);
                }
                if self.nodes[i].next_data <= now {
                    self.nodes[i].next_data = now + DATA_EVERY;
                    if self.send_wireguard {
                        self.drain(i);
                        self.send_data(i);
                    }
                }
            }
        }
    }

    fn kind(&self, i: usize) -> PathKind {
        self.nodes[i].session.path().kind
    }

    /// First time after `after` at which node `i`'s path became `kind`.
    fn first_path(&self, i: usize, kind: PathKind, after: Instant) -> Option<Instant> {
        self.nodes[i]
            .paths
            .iter()
            .find(|(t, p)| *t >= after && p.kind == kind)
            .map(|(t, _)| *t)
    }

    /// First data packet node `i` received after `after` that came through
    /// the relay (from a relayed address or to ours) or not.
    fn first_data(&self, i: usize, relayed: bool, after: Instant) -> Option<Instant> {
        self.nodes[i]
            .data_rx
            .iter()
            .find(|(t, src, dst)| {
                *t >= after && (self.is_relayed(*src) || self.is_relayed(*dst)) == relayed
            })
            .map(|(t, _, _)| *t)
    }

    /// When both nodes were on `kind` and had each received data over it
    /// (relayed or not).
    fn both_on(&self, kind: PathKind, after: Instant) -> Option<Instant> {
        let relayed = kind == PathKind::Relay;
        let mut latest = after;
        for i in 0..2 {
            let p = self.first_path(i, kind, after)?;
            // Data *from* the other node, which sends once it is on the path.
            let d = self
                .first_data(i, relayed, p.max(after))
                .or_else(|| self.first_data(i, relayed, after))?;
            latest = latest.max(p).max(d);
        }
        Some(latest)
    }

    fn path_changes_since(&self, i: usize, after: Instant) -> usize {
        self.nodes[i]
            .paths
            .iter()
            .filter(|(t, _)| *t > after)
            .count()
    }
}

/// Node 0 behind a NAT of kind `a`, node 1 behind one of kind `b`, each on
/// its own LAN.
fn two_nats(a: NatKind, b: NatKind) -> Sim {
    Sim::new(
        &[
            ("10.0.1.0/24", a, "198.51.100.1"),
            ("10.0.2.0/24", b, "198.51.100.2"),
        ],
        [
            NodeSpec {
                lan: 0,
                host: "10.0.1.10:51820",
            },
            NodeSpec {
                lan: 1,
                host: "10.0.2.20:51820",
            },
        ],
    )
}

/// Node 0 behind the model's symmetric NAT (a new port per destination,
/// +7 each time), node 1 behind a port-restricted one.
fn symmetric_to_port_restricted() -> Sim {
    two_nats(NatKind::Symmetric, NatKind::PortRestricted)
}

fn port_restricted_pair() -> Sim {
    two_nats(NatKind::PortRestricted, NatKind::PortRestricted)
}

#[test]
fn relay_first_then_upgrade_to_direct_without_flapping() {
    let mut sim = port_restricted_pair();
    sim.run_until(sim.at(1_000));
    let exchanged = sim.candidates_exchanged.expect("candidates exchanged");
    let relay_at = sim
        .both_on(PathKind::Relay, sim.start)
        .expect("both sides relayed first");
    let relay_ms = relay_at.saturating_duration_since(exchanged).as_millis();
    println!(
        "candidates exchanged at {} ms; relay carrying data both ways at {} ms (+{relay_ms} ms)",
        sim.ms(exchanged),
        sim.ms(relay_at)
    );
    assert!(relay_ms <= 100, "relay-first took {relay_ms} ms");
    for i in 0..2 {
        let first_relay = sim.nodes[i]
            .paths
            .iter()
            .find(|(_, p)| p.kind == PathKind::Relay)
            .unwrap();
        assert_eq!(first_relay.1.reason, "relayed while direct checks run");
    }

    sim.run_until(sim.at(5_000));
    let direct_at = sim
        .both_on(PathKind::Direct, sim.start)
        .expect("port-restricted ↔ port-restricted upgrades to direct");
    let up_ms = direct_at.saturating_duration_since(exchanged).as_millis();
    println!(
        "direct carrying data both ways at {} ms (+{up_ms} ms)",
        sim.ms(direct_at)
    );
    assert!(up_ms <= 1_500, "upgrade took {up_ms} ms");
    for i in 0..2 {
        let p = sim.nodes[i].session.path();
        assert_eq!(p.kind, PathKind::Direct);
        assert_eq!(p.via, Via::Socket);
        assert!(p.reason.starts_with("direct 10.0."), "{}", p.reason);
        assert!(p.reason.contains(" ↔ 198.51.100."), "{}", p.reason);
        assert!(p.rtt.is_some_and(|r| r >= 40 * MS), "rtt {:?}", p.rtt);
        println!("node {i}: {} (rtt {:?})", p.reason, p.rtt);
    }

    // Settled: a minute of keepalives changes nothing.
    let settled = sim.now;
    sim.run_until(sim.at(65_000));
    for i in 0..2 {
        assert_eq!(sim.kind(i), PathKind::Direct);
        assert_eq!(sim.path_changes_since(i, settled), 0, "node {i} flapped");
        assert_eq!(sim.nodes[i].session.stats().failovers, 0);
        assert!(
            sim.nodes[i].retries.is_empty(),
            "no retries while direct works"
        );
    }
}

#[test]
fn same_lan_goes_lan_with_the_network_in_the_reason() {
    let mut sim = Sim::new(
        &[("10.0.1.0/24", NatKind::PortRestricted, "198.51.100.1")],
        [
            NodeSpec {
                lan: 0,
                host: "10.0.1.10:51820",
            },
            NodeSpec {
                lan: 0,
                host: "10.0.1.20:51820",
            },
        ],
    );
    sim.run_until(sim.at(3_000));
    let lan_at = sim.both_on(PathKind::Lan, sim.start).expect("lan path");
    println!("lan carrying data both ways at {} ms", sim.ms(lan_at));
    for i in 0..2 {
        let p = sim.nodes[i].session.path();
        assert_eq!(p.kind, PathKind::Lan);
        assert_eq!(p.reason, "direct (LAN 10.0.1.0/24)");
        assert_eq!(p.local, Some(sim.nodes[i].host));
        assert_eq!(p.remote, Some(sim.nodes[1 - i].host));
        assert!(p.rtt.is_some_and(|r| r < 10 * MS), "rtt {:?}", p.rtt);
    }
}

#[test]
fn public_host_to_port_restricted_goes_direct() {
    let mut sim = Sim::new(
        &[
            ("192.0.2.0/24", NatKind::None, "192.0.2.1"),
            ("10.0.2.0/24", NatKind::PortRestricted, "198.51.100.2"),
        ],
        [
            NodeSpec {
                lan: 0,
                host: "192.0.2.10:51820",
            },
            NodeSpec {
                lan: 1,
                host: "10.0.2.20:51820",
            },
        ],
    );
    sim.run_until(sim.at(3_000));
    sim.both_on(PathKind::Direct, sim.start).expect("direct");
    assert_eq!(sim.kind(0), PathKind::Direct);
    assert_eq!(sim.kind(1), PathKind::Direct);
}

#[test]
fn nat_rebinding_is_seen_in_the_next_check_answer() {
    let mut sim = Sim::new(
        &[
            ("192.0.2.0/24", NatKind::None, "192.0.2.1"),
            ("10.0.2.0/24", NatKind::PortRestricted, "198.51.100.2"),
        ],
        [
            NodeSpec {
                lan: 0,
                host: "192.0.2.10:51820",
            },
            NodeSpec {
                lan: 1,
                host: "10.0.2.20:51820",
            },
        ],
    );
    sim.run_until(sim.at(3_000));
    assert_eq!(sim.kind(1), PathKind::Direct);
    // A steady direct pair reports the same mapping every time.
    assert!(sim.nodes[1].mapping_changes.is_empty());
    let flushed = sim.now;
    sim.lans[1].nat.as_mut().unwrap().flush();
    sim.run_until(sim.at(4_000));
    let changes = &sim.nodes[1].mapping_changes;
    println!(
        "{:?}",
        changes
            .iter()
            .map(|(t, o, n)| (sim.ms(*t), *o, *n))
            .collect::<Vec<_>>()
    );
    let (at, old, new) = *changes.first().expect("no MappingChanged after the flush");
    assert_eq!(old.ip(), new.ip());
    assert_ne!(old.port(), new.port());
    // Keepalives go every 500 ms: the first answer after the flush tells.
    assert!(
        at - flushed <= Duration::from_millis(600),
        "{:?}",
        at - flushed
    );
    // The public node never saw its address change.
    assert!(sim.nodes[0].mapping_changes.is_empty());
}

/// Backoff intervals between DirectRetry events: they grow, are capped at
/// 60 s, and stay above 85 % of the 2 s · 2^n schedule.
fn check_backoff(retries: &[(Instant, u32, Duration)]) -> Vec<Duration> {
    let gaps: Vec<Duration> = retries.windows(2).map(|w| w[1].0 - w[0].0).collect();
    for (n, g) in gaps.iter().enumerate() {
        let base = Duration::from_secs(2u64 << (n + 1).min(5)).min(Duration::from_secs(60));
        assert!(*g <= base + 100 * MS, "gap {n} {g:?} above {base:?}");
        assert!(
            *g >= base.mul_f64(0.85),
            "gap {n} {g:?} below 85 % of {base:?}"
        );
    }
    gaps
}

#[test]
fn symmetric_to_port_restricted_stays_relayed_with_a_reason_and_bounded_retries() {
    let mut sim = symmetric_to_port_restricted();
    sim.run_until(sim.at(300_000));
    for i in 0..2 {
        let n = &sim.nodes[i];
        println!(
            "node {i}: path {:?}; last data rx {:?}; path log {:?}",
            n.session.path(),
            n.data_rx.last().map(|d| (sim.ms(d.0), d.1, d.2)),
            n.paths
                .iter()
                .map(|(t, p)| (sim.ms(*t), p.kind, p.local, p.remote))
                .collect::<Vec<_>>()
        );
    }
    for i in 0..2 {
        let s = &sim.nodes[i].session;
        let p = s.path();
        println!("node {i}: {} — {}", p.kind, p.reason);
        assert_eq!(p.kind, PathKind::Relay);
        assert!(
            p.reason
                .starts_with("relayed: no direct pair answered after "),
            "{}",
            p.reason
        );
        assert!(p.reason.contains("symmetric"), "{}", p.reason);
        assert!(s.stats().direct_checks_sent > 0);
        // Data kept flowing over the relay the whole time.
        let late = sim.first_data(i, true, sim.at(299_000));
        assert!(late.is_some(), "node {i} got no data in the last second");
        assert!(sim.first_path(i, PathKind::Direct, sim.start).is_none());
        assert!(sim.first_path(i, PathKind::Lan, sim.start).is_none());
    }
    // Relay first here too, relay to relay (no NAT hole needed), and it
    // never flaps: at most the first guess and the relay↔relay pair.
    let exchanged = sim.candidates_exchanged.unwrap();
    let relay_at = sim.both_on(PathKind::Relay, sim.start).unwrap();
    println!(
        "relay carrying data both ways {} ms after the exchange",
        (relay_at - exchanged).as_millis()
    );
    assert!(relay_at - exchanged <= 100 * MS);
    for i in 0..2 {
        assert!(
            sim.nodes[i].paths.len() <= 2,
            "node {i} flapped: {:?}",
            sim.nodes[i].paths.len()
        );
        assert_eq!(
            sim.nodes[i].session.path().remote,
            Some(sim.nodes[1 - i].relayed)
        );
    }
    // The symmetric side learns it from the mapped addresses it sees.
    assert!(sim.nodes[0].session.path().reason.contains("local NAT"));
    for i in 0..2 {
        let r = &sim.nodes[i].retries;
        let gaps = check_backoff(r);
        println!(
            "node {i}: {} retries, first at {} ms, gaps {:?}",
            r.len(),
            sim.ms(r[0].0),
            gaps
        );
        // 5 s initial window + ~2+4+8+16+32+60+60+60+60 s: 8..=10 in 300 s,
        // i.e. neither a storm nor hourly.
        assert!((7..=10).contains(&r.len()), "{} retries", r.len());
    }
}

#[test]
fn direct_cut_fails_over_within_3s_and_returns_after_backoff() {
    let mut sim = port_restricted_pair();
    sim.run_until(sim.at(5_000));
    assert_eq!(sim.kind(0), PathKind::Direct);
    assert_eq!(sim.kind(1), PathKind::Direct);
    let direct_pair = sim.nodes[0].session.path().clone();

    // Cut.
    let cut = sim.now;
    sim.cut_direct = true;
    sim.run_until(sim.at(10_000));
    let relay_at = sim
        .both_on(PathKind::Relay, cut)
        .expect("failover to relay");
    let failover = relay_at - cut;
    println!(
        "failover: relay carrying data both ways {} ms after the cut",
        failover.as_millis()
    );
    assert!(
        failover <= Duration::from_secs(3),
        "failover took {failover:?}"
    );
    for i in 0..2 {
        assert_eq!(sim.nodes[i].session.stats().failovers, 1);
        let (_, p) = sim.nodes[i].paths.iter().find(|(t, _)| *t >= cut).unwrap();
        assert!(
            p.reason.starts_with("direct path ")
                && p.reason
                    .ends_with("stopped answering; relayed while retrying"),
            "{}",
            p.reason
        );
    }
    assert!(sim.nodes[0].paths.iter().any(|(t, p)| *t >= cut
        && p.reason.contains(&format!(
            "{}→{}",
            direct_pair.local.unwrap(),
            direct_pair.remote.unwrap()
        ))));

    // Stay cut for a while: retries back off.
    sim.run_until(sim.at(60_000));
    for i in 0..2 {
        assert_eq!(sim.kind(i), PathKind::Relay);
        let gaps = check_backoff(&sim.nodes[i].retries);
        println!(
            "node {i} while cut: retries at {:?} ms, gaps {:?}",
            sim.nodes[i]
                .retries
                .iter()
                .map(|r| sim.ms(r.0))
                .collect::<Vec<_>>(),
            gaps
        );
        assert!(sim.nodes[i].retries.len() >= 4, "retries while cut");
        let first = sim.nodes[i].retries[0].0 - cut;
        assert!(
            first <= Duration::from_secs(4),
            "first retry {first:?} after the cut"
        );
    }

    // Restore: back to direct by the next retry at the latest.
    let restore = sim.now;
    sim.cut_direct = false;
    let pending = (0..2)
        .filter_map(|i| sim.nodes[i].retries.last().map(|(t, _, n)| *t + *n))
        .max()
        .unwrap();
    sim.run_until(pending + Duration::from_secs(3));
    let back = sim
        .both_on(PathKind::Direct, restore)
        .expect("back to direct");
    println!(
        "restored at {} ms, direct again at {} ms (+{} ms; next scheduled retry was at {} ms)",
        sim.ms(restore),
        sim.ms(back),
        (back - restore).as_millis(),
        sim.ms(pending)
    );
    assert!(back <= pending + Duration::from_secs(2));
    // And the backoff starts from 2 s again next time.
    let retries_before = sim.nodes[0].retries.len();
    let cut2 = sim.now + Duration::from_secs(5);
    sim.run_until(cut2);
    sim.cut_direct = true;
    sim.run_until(cut2 + Duration::from_secs(8));
    let new: Vec<_> = sim.nodes[0].retries[retries_before..].to_vec();
    assert!(new.len() >= 2, "retrying after the second cut: {new:?}");
    assert_eq!(new[0].1, 1, "backoff reset after direct worked again");
    let lost_to_first = new[0].0 - cut2;
    assert!(
        lost_to_first <= Duration::from_secs(4),
        "first retry {lost_to_first:?} after the second cut"
    );
}

#[test]
fn retry_direct_now_skips_the_backoff_after_a_network_change() {
    let mut sim = port_restricted_pair();
    sim.run_until(sim.at(5_000));
    assert_eq!(sim.kind(0), PathKind::Direct);
    sim.cut_direct = true;
    sim.run_until(sim.at(45_000));
    assert_eq!(sim.kind(0), PathKind::Relay);
    // The next scheduled retries are far off by now.
    let pending = (0..2)
        .map(|i| {
            sim.nodes[i]
                .retries
                .last()
                .map(|(t, _, n)| *t + *n)
                .unwrap()
        })
        .min()
        .unwrap();
    assert!(
        pending > sim.at(55_000),
        "next retry at {} ms",
        sim.ms(pending)
    );

    // The network is back and the driver knows it (link up, wake from sleep).
    sim.cut_direct = false;
    let kick = sim.now;
    sim.nodes[0].session.retry_direct_now(kick);
    sim.run_until(kick + Duration::from_secs(3));
    let back = sim.both_on(PathKind::Direct, kick).expect("direct again");
    println!(
        "retry_direct_now: direct again after {} ms",
        (back - kick).as_millis()
    );
    assert!(back - kick <= Duration::from_secs(1));
    assert!(back < pending);
}

#[test]
fn idle_direct_path_survives_10_percent_loss_without_flapping() {
    // No WireGuard traffic: only STUN keeps the path alive, the hardest case
    // for a 1.5 s failover. Both sides' checks count (each is evidence).
    let mut sim = port_restricted_pair();
    sim.send_wireguard = false;
    sim.run_until(sim.at(5_000));
    assert_eq!(sim.kind(0), PathKind::Direct);
    assert_eq!(sim.kind(1), PathKind::Direct);
    sim.loss = 0.10;
    let settled = sim.now;
    sim.run_until(sim.at(305_000));
    for i in 0..2 {
        let st = sim.nodes[i].session.stats();
        println!(
            "node {i} after 300 s at 10 % loss: {} failovers, {} path changes, path {}",
            st.failovers,
            sim.path_changes_since(i, settled),
            sim.kind(i)
        );
        assert_eq!(st.failovers, 0, "node {i} failed over on loss alone");
        assert_eq!(sim.path_changes_since(i, settled), 0);
    }
}

#[test]
fn the_no_flap_check_is_not_vacuous_at_60_percent_loss() {
    // The control case of the test above: the same idle path, but 60 %
    // of every datagram lost. Checks go unanswered long enough that the
    // path does fail over, so "0 failovers at 10 %" measures the policy,
    // not a failover that can never happen.
    let mut sim = port_restricted_pair();
    sim.send_wireguard = false;
    sim.run_until(sim.at(5_000));
    assert_eq!(sim.kind(0), PathKind::Direct);
    sim.loss = 0.60;
    sim.run_until(sim.at(305_000));
    let failovers: u64 = (0..2).map(|i| sim.nodes[i].session.stats().failovers).sum();
    println!("after 300 s at 60 % loss: {failovers} failovers");
    assert!(
        failovers > 0,
        "60 % loss never failed over: the 10 % test would be vacuous"
    );
}

#[test]
fn symmetric_to_symmetric_meets_relay_to_relay() {
    let mut sim = Sim::new(
        &[
            ("10.0.1.0/24", NatKind::Symmetric, "198.51.100.1"),
            ("10.0.2.0/24", NatKind::Symmetric, "198.51.100.2"),
        ],
        [
            NodeSpec {
                lan: 0,
                host: "10.0.1.10:51820",
            },
            NodeSpec {
                lan: 1,
                host: "10.0.2.20:51820",
            },
        ],
    );
    sim.run_until(sim.at(20_000));
    let exchanged = sim.candidates_exchanged.unwrap();
    let relay_at = sim.both_on(PathKind::Relay, sim.start).unwrap();
    assert!(relay_at - exchanged <= 100 * MS);
    for i in 0..2 {
        let p = sim.nodes[i].session.path();
        println!("node {i}: {} — {}", p.kind, p.reason);
        assert_eq!(p.kind, PathKind::Relay);
        assert_eq!(p.local, Some(sim.nodes[i].relayed));
        assert_eq!(p.remote, Some(sim.nodes[1 - i].relayed));
        assert!(
            p.reason.starts_with("relayed: no direct pair answered"),
            "{}",
            p.reason
        );
        assert!(sim.first_data(i, true, sim.at(19_900)).is_some());
    }
}

/// A blackhole on the direct path: both nodes leave it for the relay within
/// 3 s (data moving again both ways), the status names the cause, and the
/// pair is retried after the backoff.
fn blackhole_drill(bh: SimBlackhole, full_size_data: bool) -> (Duration, Vec<String>) {
    let mut sim = port_restricted_pair();
    sim.full_size_data = full_size_data;
    sim.run_until(sim.at(5_000));
    assert_eq!(sim.kind(0), PathKind::Direct);
    assert_eq!(sim.kind(1), PathKind::Direct);
    let start = sim.now;
    sim.blackhole = Some(bh);
    // Shorter than the first ban (MTU: 4 s), so both must still be relayed.
    sim.run_until(start + Duration::from_millis(3_500));
    let relay_at = sim
        .both_on(PathKind::Relay, start)
        .expect("left for the relay");
    let took = relay_at - start;
    println!(
        "{bh:?}: relay carrying data both ways {} ms after the blackhole",
        took.as_millis()
    );
    assert!(took <= Duration::from_secs(3), "{bh:?}: took {took:?}");
    assert!(sim.blackhole_drops > 0);
    let mut reasons = Vec::new();
    for i in 0..2 {
        assert_eq!(sim.kind(i), PathKind::Relay, "node {i} stays relayed");
        let p = sim.nodes[i].session.path();
        assert!(p.blackhole.is_some(), "node {i}: {p:?}");
        // Not counted as a silent-path failover: it never went silent.
        assert_eq!(sim.nodes[i].session.stats().failovers, 0);
        reasons.push(p.reason.clone());
    }
    (took, reasons)
}

#[test]
fn data_blackhole_goes_relayed_within_3s_and_says_why() {
    let (_, reasons) = blackhole_drill(SimBlackhole::WireguardData, false);
    for r in &reasons {
        assert!(
            r.starts_with("direct path answers checks but drops data: relayed"),
            "{r}"
        );
    }
}

#[test]
fn mtu_blackhole_goes_relayed_within_3s_and_names_the_limit() {
    // Small data passes the MTU blackhole; full-size data is lost with the
    // probes, and still the verdict names the size, not "drops data".
    for full in [false, true] {
        let (_, reasons) = blackhole_drill(SimBlackhole::Above(1300), full);
        for r in &reasons {
            assert!(
                r.starts_with("direct path drops datagrams above 1292 bytes: relayed"),
                "full-size data {full}: {r}"
            );
        }
    }
}

#[test]
fn blackholed_pair_is_retried_after_the_ban_and_kept_once_healed() {
    let mut sim = port_restricted_pair();
    sim.run_until(sim.at(5_000));
    sim.blackhole = Some(SimBlackhole::Above(1300));
    sim.run_until(sim.at(9_000));
    assert_eq!(sim.kind(0), PathKind::Relay);
    // Healed: the 4 s MTU ban runs out and direct carries data again.
    sim.blackhole = None;
    let healed = sim.now;
    sim.run_until(sim.at(20_000));
    let back = sim
        .both_on(PathKind::Direct, healed)
        .expect("back to direct");
    assert!(
        back - healed <= Duration::from_secs(6),
        "{:?}",
        back - healed
    );
    assert_eq!(sim.kind(0), PathKind::Direct);
    assert_eq!(sim.kind(1), PathKind::Direct);
    assert!(sim.nodes[0].session.path().blackhole.is_none());
}

#[test]
fn healthy_direct_path_with_loss_gets_no_blackhole_verdict() {
    let mut sim = port_restricted_pair();
    sim.loss = 0.05;
    sim.run_until(sim.at(60_000));
    for i in 0..2 {
        let s = sim.nodes[i].session.stats().blackhole;
        assert!(s.probes_sent > 200, "probing while data flows: {s:?}");
        assert_eq!(
            (s.data_verdicts, s.mtu_verdicts, s.peer_leaves),
            (0, 0, 0),
            "node {i}: {s:?}"
        );
    }
}

#[test]
fn port_prediction_goes_direct_against_a_sequential_symmetric_nat_within_its_budget() {
    use ice_agent::netcheck::{Filtering, Mapping, NatFacts};
    // The model's symmetric NAT gives each new destination the port 7 past
    // the previous one: sequential, delta +7.
    let mut sim = symmetric_to_port_restricted();
    let sequential = sequential_plus_7();
    let eim = NatFacts {
        udp: true,
        mapping: Some(Mapping::EndpointIndependent),
        filtering: Some(Filtering::AddressAndPortDependent),
        ..NatFacts::default()
    };
    // The facts arrive after the first checks have run out (as the
    // daemon's netcheck finishes about 1.5 s in, or later).
    sim.run_until(sim.at(6_000));
    assert_eq!(
        sim.kind(1),
        PathKind::Relay,
        "{:?}",
        sim.nodes[1].session.path()
    );
    let now = sim.now;
    sim.nodes[0]
        .session
        .set_nat_facts(now, Some(sequential.clone()), Some(eim.clone()));
    sim.nodes[1]
        .session
        .set_nat_facts(now, Some(eim.clone()), Some(sequential.clone()));
    let before = sim.sent.len();
    sim.run_until(sim.at(12_000));
    for i in 0..2 {
        let p = sim.nodes[i].session.path();
        println!("node {i}: {} — {}", p.kind, p.reason);
        assert_eq!(p.kind, PathKind::Direct, "node {i}: {}", p.reason);
    }
    let reason = &sim.nodes[1].session.path().reason;
    assert!(reason.contains("via port prediction, delta +7"), "{reason}");
    // Data flows both ways on it.
    for i in 0..2 {
        assert!(
            sim.first_data(i, false, sim.at(11_000)).is_some(),
            "node {i}"
        );
    }
    // The budget: after the facts, node 1 sent to node 0's public address
    // on at most the window plus the signalled server-reflexive port, and
    // to no other public address but the relay's.
    let peer_ip: IpAddr = "198.51.100.1".parse().unwrap();
    let ports: HashSet<u16> = sim.sent[before..]
        .iter()
        .filter(|(n, d)| *n == 1 && d.ip() == peer_ip)
        .map(|(_, d)| d.port())
        .collect();
    println!("node 1 probed {} ports of its peer", ports.len());
    assert!(ports.len() > 1 && ports.len() <= 24 + 1, "{ports:?}");
    let srflx = 40_000u16;
    assert!(
        ports
            .iter()
            .all(|p| *p >= srflx && (*p - srflx).is_multiple_of(7) && (*p - srflx) / 7 <= 24),
        "{ports:?}"
    );
    let relay_ip: IpAddr = "203.0.113.1".parse().unwrap();
    let others: Vec<&SocketAddr> = sim.sent[before..]
        .iter()
        .filter(|(n, d)| *n == 1 && d.ip() != peer_ip && d.ip() != relay_ip)
        .map(|(_, d)| d)
        .filter(|d| **d != sa("10.0.1.10:51820"))
        .collect();
    assert!(others.is_empty(), "{others:?}");
    // Without the facts (or with a random symmetric NAT) nobody predicts:
    // see `symmetric_to_port_restricted_stays_relayed_with_a_reason_and_bounded_retries`.
}

/// Both nodes behind the model's symmetric NAT (+7 per new mapping): with
/// both netchecks saying "sequential", they measure their counters, swap
/// them through signaling and send their openers together; the pair their
/// openers opened carries data both ways. The budget: one attempt each,
/// at most `OPENERS` ports of the peer's own address, nothing to any other
/// address but the relay's.
#[test]
fn two_sequential_symmetric_nats_punch_together_within_the_budget() {
    use ice_agent::punch::OPENERS;
    let mut sim = two_nats(NatKind::Symmetric, NatKind::Symmetric);
    let sequential = sequential_plus_7();
    sim.run_until(sim.at(6_000));
    for i in 0..2 {
        assert_eq!(sim.kind(i), PathKind::Relay, "node {i}");
    }
    let now = sim.now;
    for i in 0..2 {
        sim.nodes[i]
            .session
            .set_nat_facts(now, Some(sequential.clone()), Some(sequential.clone()));
    }
    let before = sim.sent.len();
    let direct = sim.at(6_000);
    sim.run_until(sim.at(12_000));
    for i in 0..2 {
        let p = sim.nodes[i].session.path();
        println!("node {i}: {} — {}", p.kind, p.reason);
        assert_eq!(p.kind, PathKind::Direct, "node {i}: {}", p.reason);
        assert!(
            p.reason
                .contains("via port prediction on both sides, delta +7 / +7"),
            "{}",
            p.reason
        );
        assert!(
            sim.first_data(i, false, sim.at(11_000)).is_some(),
            "node {i}"
        );
        let at = sim.first_path(i, PathKind::Direct, direct).unwrap();
        println!("node {i} direct {} ms after the facts", sim.ms(at) - 6_000);
        assert!(sim.ms(at) - 6_000 < 1_000);
        let st = sim.nodes[i].session.stats();
        assert_eq!(st.punch_attempts, 1, "node {i}");
        assert_eq!(st.punch_openers, u64::from(OPENERS), "node {i}");
    }
    let relay_ip: IpAddr = "203.0.113.1".parse().unwrap();
    for i in 0..2 {
        let peer_ip: IpAddr = ["198.51.100.1", "198.51.100.2"][1 - i].parse().unwrap();
        let ports: HashSet<u16> = sim.sent[before..]
            .iter()
            .filter(|(n, d)| *n == i && d.ip() == peer_ip)
            .map(|(_, d)| d.port())
            .collect();
        // Openers: one burst, at most OPENERS, all to distinct ports of
        // the peer's own address; ICE then checks those and the peer's
        // signalled and peer-reflexive ports, nothing else.
        let openers: Vec<SocketAddr> = sim
            .openers
            .iter()
            .filter(|(n, _)| *n == i)
            .map(|(_, d)| *d)
            .collect();
        let distinct: HashSet<&SocketAddr> = openers.iter().collect();
        println!(
            "node {i}: {} openers, {} ports of its peer in all",
            openers.len(),
            ports.len()
        );
        assert!(openers.len() <= usize::from(OPENERS), "{openers:?}");
        assert_eq!(distinct.len(), openers.len());
        assert!(openers.iter().all(|d| d.ip() == peer_ip), "{openers:?}");
        assert!(ports.len() <= usize::from(OPENERS) + 3, "{ports:?}");
        let host = sim.nodes[1 - i].host;
        let others: Vec<&SocketAddr> = sim.sent[before..]
            .iter()
            .filter(|(n, d)| *n == i && d.ip() != peer_ip && d.ip() != relay_ip && *d != host)
            .map(|(_, d)| d)
            .collect();
        assert!(others.is_empty(), "{others:?}");
    }
}

/// The netcheck of the model's symmetric NAT: a new port per destination,
/// 7 past the previous one, filtered by address and port.
fn sequential_plus_7() -> ice_agent::netcheck::NatFacts {
    use ice_agent::netcheck::{Filtering, Mapping, NatFacts, PortAllocation};
    NatFacts {
        udp: true,
        mapping: Some(Mapping::AddressAndPortDependent),
        port_allocation: Some(PortAllocation::Sequential {
            delta: 7,
            others_per_min: None,
        }),
        filtering: Some(Filtering::AddressAndPortDependent),
        ..NatFacts::default()
    }
}
