//! The UDP part of netcheck as a sans-IO state machine: STUN Binding probes
//! from a few local sockets, with retransmits and time passed in.
//!
//! Run-loop invariant (as everywhere in the agent): after
//! [`Prober::handle_datagram`] or [`Prober::handle_timeout`], drain
//! [`Prober::poll_transmit`], then sleep until [`Prober::poll_timeout`];
//! `None` there means the run is over and [`Prober::outcome`] is final.
//!
//! Phases, so that the mappings under test are made in a known order (a
//! sequential NAT numbers new mappings in the order it sees them, across
//! all of the host's sockets):
//!
//! 1. **Mapping.** From [`Socket::Main`], one Binding to every relay's
//!    IPv4 address (config order) and from [`Socket::Main6`] to every
//!    relay's IPv6 address. A relay whose answer carries OTHER-ADDRESS
//!    (RFC 5780) gets three more from `Main`: its other IP with the first
//!    port, its other IP and port, its first IP with the other port.
//! 2. **Filtering and hairpin**, once every `Main` probe is answered or
//!    given up: from the fresh [`Socket::Filter`], three Bindings to the
//!    first RFC 5780 relay (plain, CHANGE-REQUEST port, CHANGE-REQUEST IP
//!    and port); from [`Socket::Hairpin`], a Binding request to `Main`'s
//!    own mapped address, which counts when `Main` receives it.
//!
//! Every attempt carries a fresh random transaction id (so each answer
//! gives an unambiguous round-trip time); an answer counts only on the
//! socket its request left from, with a transaction id of that probe, from
//! the address the probe expects (for CHANGE-REQUEST: a changed one).
//! Memory is bounded: at most [`MAX_RELAYS`] relays, a fixed number of
//! probes each, [`ATTEMPT_GAPS_MS`]`.len() + 1` attempts per probe.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use relay::stun::{attr, method, Class, Message, MessageBuilder, TransactionId};

use super::classify::{self, MappingSample, TestOutcome};
use super::{Filtering, Mapping, PortAllocation};

/// Relays probed at most (the rest of the list is reported, not probed).
pub const MAX_RELAYS: usize = 16;

/// Gaps between attempts of one probe, milliseconds: attempts leave at 0,
/// 100, 250, 450, 700 and 1000 ms.
pub const ATTEMPT_GAPS_MS: [u64; 5] = [100, 150, 200, 250, 300];
/// How long after its last attempt a probe waits for an answer.
pub const LAST_WAIT: Duration = Duration::from_millis(500);
/// Once the plain filtering test is answered (round trip `r`), the other
/// two get `max(FILTER_GRACE, 4 r)` more before they count as silent.
pub const FILTER_GRACE: Duration = Duration::from_millis(300);
/// Hairpin: attempts every 100 ms, given up 500 ms after the first.
const HAIRPIN_ATTEMPTS: usize = 4;
const HAIRPIN_GAP: Duration = Duration::from_millis(100);
/// Between the first requests to a relay's alternate addresses from the
/// main socket: a 40 ms window in which other flows' mappings on a
/// sequential NAT show as skipped ports.
const ALTERNATE_SPACING: Duration = Duration::from_millis(20);

/// PADDING bytes in every request, so that a relay answering no larger than
/// the request (`--strict-amplification`) still fits RESPONSE-ORIGIN and
/// OTHER-ADDRESS.
const PADDING: usize = 96;

/// The local sockets the prober speaks through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Socket {
    /// IPv4, bound to the agent's port when it is free: the mapping tests.
    Main,
    /// IPv4, a fresh port: the filtering tests.
    Filter,
    /// IPv4, a fresh port: sends to `Main`'s mapped address.
    Hairpin,
    /// IPv6: mapping and latency of relays reachable over IPv6.
    Main6,
}

/// One relay to probe over UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpTarget {
    /// Index of the relay in the report.
    pub relay: usize,
    /// Its IPv4 address, if it has one.
    pub v4: Option<SocketAddr>,
    /// Its IPv6 address, if it has one (and we have an IPv6 socket).
    pub v6: Option<SocketAddr>,
}

/// What the prober needs to know.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Relays, in config order (at most [`MAX_RELAYS`] are used).
    pub targets: Vec<UdpTarget>,
    /// Port of [`Socket::Main`].
    pub main_port: u16,
    /// This host's interface addresses (to recognise "no NAT").
    pub local_ips: Vec<IpAddr>,
    /// Seed of the transaction-id generator.
    pub seed: u64,
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// From which socket.
    pub socket: Socket,
    /// To where.
    pub to: SocketAddr,
    /// The bytes.
    pub contents: Vec<u8>,
}

/// CHANGE-REQUEST flags of a filtering test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    None,
    Port,
    IpAndPort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// To a relay's address (v4 from Main, v6 from Main6).
    Relay { relay: usize },
    /// To one of a relay's RFC 5780 alternate addresses, from Main.
    Alternate,
    /// A filtering test from Filter.
    Filter(Change),
    /// From Hairpin to Main's mapped address.
    Hairpin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Answered {
        mapped: SocketAddr,
        rtt: Duration,
        other: Option<SocketAddr>,
    },
    Refused,
    Silent,
}

#[derive(Debug)]
struct Probe {
    kind: Kind,
    socket: Socket,
    to: SocketAddr,
    attempts: Vec<(TransactionId, Instant)>,
    next_at: Instant,
    give_up_at: Option<Instant>,
    state: State,
}

impl Probe {
    fn new(kind: Kind, socket: Socket, to: SocketAddr, now: Instant) -> Probe {
        Probe {
            kind,
            socket,
            to,
            attempts: Vec::new(),
            next_at: now,
            give_up_at: None,
            state: State::Pending,
        }
    }

    fn max_attempts(&self) -> usize {
        if self.kind == Kind::Hairpin {
            HAIRPIN_ATTEMPTS
        } else {
            ATTEMPT_GAPS_MS.len() + 1
        }
    }

    fn gap(&self, sent: usize) -> Duration {
        if self.kind == Kind::Hairpin {
            return HAIRPIN_GAP;
        }
        ATTEMPT_GAPS_MS
            .get(sent.saturating_sub(1))
            .map(|ms| Duration::from_millis(*ms))
            .unwrap_or(LAST_WAIT)
    }

    /// Whether an answer from `from` fits what this probe asked for.
    fn source_ok(&self, from: SocketAddr) -> bool {
        match self.kind {
            Kind::Filter(Change::IpAndPort) => {
                from.ip() != self.to.ip() && from.port() != self.to.port()
            }
            Kind::Filter(Change::Port) => {
                from.ip() == self.to.ip() && from.port() != self.to.port()
            }
            _ => from == self.to,
        }
    }

    fn outcome(&self) -> TestOutcome {
        match self.state {
            State::Answered { .. } => TestOutcome::Answered,
            State::Refused => TestOutcome::Refused,
            State::Silent => TestOutcome::Silent,
            State::Pending => TestOutcome::NotRun,
        }
    }
}

/// Whether a relay's OTHER-ADDRESS may be sent to: same family, another
/// address than the relay's, a port, and no address the relay could use to
/// aim our probes at this host or a group (unspecified, broadcast,
/// multicast, loopback unless the relay itself is on loopback).
fn usable_other(relay: SocketAddr, other: SocketAddr) -> bool {
    let ip = other.ip();
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    other.is_ipv4() == relay.is_ipv4()
        && other != relay
        && other.port() != 0
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && !broadcast
        && (!ip.is_loopback() || relay.ip().is_loopback())
}

/// What the UDP probes found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Any STUN answer at all over IPv4 or IPv6.
    pub udp: bool,
    /// `Main`'s mapped address as the first relay to answer saw it.
    pub public_ipv4: Option<SocketAddr>,
    /// `Main6`'s mapped address.
    pub public_ipv6: Option<SocketAddr>,
    /// Mapping behaviour.
    pub mapping: Option<Mapping>,
    /// How new mappings get their ports (endpoint-dependent mappings).
    pub port_allocation: Option<PortAllocation>,
    /// Filtering behaviour.
    pub filtering: Option<Filtering>,
    /// Mapped port == local port.
    pub port_preserved: Option<bool>,
    /// A datagram to our own mapped address came back to us.
    pub hairpin: Option<bool>,
    /// `Main`'s samples, in the order their mappings were made.
    pub samples: Vec<MappingSample>,
    /// Per relay (index in the plan's targets order): IPv4 and IPv6 round
    /// trip of the best answered attempt, and OTHER-ADDRESS.
    pub relays: Vec<RelayUdp>,
    /// Datagrams that were not an answer to one of our requests.
    pub ignored: u32,
}

/// The UDP facts about one relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayUdp {
    /// Index of the relay in the report.
    pub relay: usize,
    /// Round trip over IPv4.
    pub rtt_v4: Option<Duration>,
    /// Round trip over IPv6.
    pub rtt_v6: Option<Duration>,
    /// Its RFC 5780 alternate address (OTHER-ADDRESS).
    pub other: Option<SocketAddr>,
}

/// The sans-IO prober.
#[derive(Debug)]
pub struct Prober {
    plan: Plan,
    probes: Vec<Probe>,
    /// Relays whose alternate addresses were added already.
    alternates_for: Vec<usize>,
    /// The relay the filtering tests use (first with OTHER-ADDRESS).
    filter_relay: Option<(SocketAddr, SocketAddr)>,
    phase2: bool,
    transmits: VecDeque<Transmit>,
    rng: rand::rngs::StdRng,
    ignored: u32,
    done: bool,
}

impl Prober {
    /// Starts a run at `now`.
    pub fn new(mut plan: Plan, now: Instant) -> Prober {
        plan.targets.truncate(MAX_RELAYS);
        let mut probes = Vec::new();
        for t in &plan.targets {
            if let Some(a) = t.v4 {
                probes.push(Probe::new(
                    Kind::Relay { relay: t.relay },
                    Socket::Main,
                    a,
                    now,
                ));
            }
        }
        for t in &plan.targets {
            if let Some(a) = t.v6 {
                probes.push(Probe::new(
                    Kind::Relay { relay: t.relay },
                    Socket::Main6,
                    a,
                    now,
                ));
            }
        }
        let rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
        let mut p = Prober {
            plan,
            probes,
            alternates_for: Vec::new(),
            filter_relay: None,
            phase2: false,
            transmits: VecDeque::new(),
            rng,
            ignored: 0,
            done: false,
        };
        p.handle_timeout(now);
        p
    }

    /// A datagram arrived on `socket` from `from`.
    pub fn handle_datagram(&mut self, now: Instant, socket: Socket, from: SocketAddr, data: &[u8]) {
        let from = crate::udp::canonical(from);
        let Ok(msg) = Message::parse(data) else {
            self.ignored = self.ignored.saturating_add(1);
            return;
        };
        let tid = msg.transaction_id();
        if msg.method() != method::BINDING {
            self.ignored = self.ignored.saturating_add(1);
            return;
        }
        let found = self.probes.iter().position(|p| {
            p.state == State::Pending
                && p.attempts.iter().any(|(t, _)| *t == tid)
                && match p.kind {
                    // The hairpin request arrives on Main, not where it left.
                    Kind::Hairpin => socket == Socket::Main && msg.class() == Class::Request,
                    _ => p.socket == socket && msg.class() != Class::Request,
                }
        });
        let Some(i) = found else {
            self.ignored = self.ignored.saturating_add(1);
            return;
        };
        let sent = self.probes[i]
            .attempts
            .iter()
            .find(|(t, _)| *t == tid)
            .map(|(_, at)| *at)
            .unwrap_or(now);
        let rtt = now.saturating_duration_since(sent);
        let probe = &mut self.probes[i];
        if probe.kind == Kind::Hairpin {
            probe.state = State::Answered {
                mapped: from,
                rtt,
                other: None,
            };
            self.advance(now);
            return;
        }
        if !probe.source_ok(from) {
            self.ignored = self.ignored.saturating_add(1);
            return;
        }
        match msg.class() {
            Class::Success => {
                let mapped = msg
                    .xor_address(attr::XOR_MAPPED_ADDRESS)
                    .or_else(|| msg.address(attr::MAPPED_ADDRESS))
                    .and_then(Result::ok)
                    .map(crate::udp::canonical);
                let Some(mapped) = mapped.filter(|m| m.is_ipv4() == probe.to.is_ipv4()) else {
                    self.ignored = self.ignored.saturating_add(1);
                    return;
                };
                let other = msg
                    .address(attr::OTHER_ADDRESS)
                    .and_then(Result::ok)
                    .map(crate::udp::canonical)
                    .filter(|o| usable_other(probe.to, *o));
                probe.state = State::Answered { mapped, rtt, other };
                if let Kind::Filter(Change::None) = probe.kind {
                    let grace = FILTER_GRACE.max(rtt * 4);
                    for q in &mut self.probes {
                        if matches!(q.kind, Kind::Filter(_)) && q.state == State::Pending {
                            let until = now + grace;
                            q.give_up_at = Some(q.give_up_at.map_or(until, |g| g.min(until)));
                        }
                    }
                }
            }
            Class::Error => probe.state = State::Refused,
            _ => {}
        }
        self.advance(now);
    }

    /// Time passed: retransmit, give up, move to the next phase.
    pub fn handle_timeout(&mut self, now: Instant) {
        for i in 0..self.probes.len() {
            let p = &self.probes[i];
            if p.state != State::Pending {
                continue;
            }
            if p.give_up_at.is_some_and(|g| now >= g) {
                self.probes[i].state = State::Silent;
                continue;
            }
            if now < p.next_at {
                continue;
            }
            if p.attempts.len() >= p.max_attempts() {
                // The last wait is over.
                self.probes[i].state = State::Silent;
                continue;
            }
            self.send(i, now);
        }
        self.advance(now);
    }

    /// Adds alternate-address probes and starts phase 2 when their time has
    /// come; marks the run done.
    fn advance(&mut self, now: Instant) {
        // Alternate addresses of relays that sent OTHER-ADDRESS.
        let mut new = Vec::new();
        for p in &self.probes {
            if let (
                Kind::Relay { relay },
                Socket::Main,
                State::Answered {
                    other: Some(other), ..
                },
            ) = (p.kind, p.socket, p.state)
            {
                if !self.alternates_for.contains(&relay) {
                    new.push((relay, p.to, other));
                }
            }
        }
        for (relay, primary, other) in new {
            self.alternates_for.push(relay);
            if self.filter_relay.is_none() {
                self.filter_relay = Some((primary, other));
            }
            let mut extra = vec![
                SocketAddr::new(other.ip(), primary.port()),
                other,
                SocketAddr::new(primary.ip(), other.port()),
            ];
            extra.dedup();
            let mut k = 0;
            for to in extra {
                if to != primary
                    && !self
                        .probes
                        .iter()
                        .any(|q| q.socket == Socket::Main && q.to == to)
                {
                    // Spaced, so other flows' mappings in between show
                    // (`classify::port_allocation`'s `others_per_min`).
                    let at = now + ALTERNATE_SPACING * k;
                    k += 1;
                    self.probes
                        .push(Probe::new(Kind::Alternate, Socket::Main, to, at));
                }
            }
            // The first now, before anything else is made (the filtering
            // tests wait until the main socket's probes are answered).
            self.handle_timeout_sends(now);
        }
        let main_busy = self
            .probes
            .iter()
            .any(|p| p.socket == Socket::Main && p.state == State::Pending);
        if !self.phase2 && !main_busy {
            self.phase2 = true;
            if let Some((primary, _)) = self.filter_relay {
                for c in [Change::None, Change::Port, Change::IpAndPort] {
                    self.probes
                        .push(Probe::new(Kind::Filter(c), Socket::Filter, primary, now));
                }
            }
            if let Some(mapped) = self.main_samples().iter().find_map(|s| s.mapped) {
                let mut h = Probe::new(Kind::Hairpin, Socket::Hairpin, mapped, now);
                h.give_up_at = Some(now + HAIRPIN_GAP * (HAIRPIN_ATTEMPTS as u32 + 1));
                self.probes.push(h);
            }
            self.handle_timeout_sends(now);
        }
        self.done = self.phase2 && self.probes.iter().all(|p| p.state != State::Pending);
    }

    /// Sends the first attempt of probes created just now (no recursion
    /// into `advance`).
    fn handle_timeout_sends(&mut self, now: Instant) {
        for i in 0..self.probes.len() {
            let p = &self.probes[i];
            if p.state == State::Pending && p.attempts.is_empty() && now >= p.next_at {
                self.send(i, now);
            }
        }
    }

    /// Sends the next attempt of probe `i` with a fresh transaction id.
    fn send(&mut self, i: usize, now: Instant) {
        let tid: TransactionId = self.rng.random();
        let Some(p) = self.probes.get_mut(i) else {
            return;
        };
        let mut contents = Vec::with_capacity(160);
        {
            let mut b = MessageBuilder::new(&mut contents, method::BINDING, Class::Request, tid);
            match p.kind {
                Kind::Filter(Change::Port) => {
                    b.u32_attr(attr::CHANGE_REQUEST, 2);
                }
                Kind::Filter(Change::IpAndPort) => {
                    b.u32_attr(attr::CHANGE_REQUEST, 6);
                }
                _ => {}
            }
            b.attr(attr::PADDING, &[0u8; PADDING]).fingerprint();
        }
        p.attempts.push((tid, now));
        p.next_at = now + p.gap(p.attempts.len());
        self.transmits.push_back(Transmit {
            socket: p.socket,
            to: p.to,
            contents,
        });
    }

    /// The next datagram to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When to call [`Prober::handle_timeout`]; `None`: the run is over.
    /// Changes after every `handle_*` call.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.done {
            return None;
        }
        self.probes
            .iter()
            .filter(|p| p.state == State::Pending)
            .map(|p| match p.give_up_at {
                Some(g) => g.min(p.next_at),
                None => p.next_at,
            })
            .min()
    }

    /// Whether every probe is answered or given up.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn main_samples(&self) -> Vec<MappingSample> {
        let main = || {
            self.probes
                .iter()
                .filter(|p| p.socket == Socket::Main && !p.attempts.is_empty())
        };
        let first = main().filter_map(|p| p.attempts.first().map(|a| a.1)).min();
        let mut samples: Vec<MappingSample> = main()
            .map(|p| MappingSample {
                server: p.to,
                mapped: match p.state {
                    State::Answered { mapped, .. } => Some(mapped),
                    _ => None,
                },
                at_ms: match (p.attempts.first(), first) {
                    (Some(a), Some(f)) => a.1.saturating_duration_since(f).as_millis() as u64,
                    _ => 0,
                },
            })
            .collect();
        // In the order the mappings were made (stable: one instant keeps
        // the order of sending).
        samples.sort_by_key(|s| s.at_ms);
        samples
    }

    /// What was found so far (final once [`Prober::is_done`]).
    pub fn outcome(&self) -> Outcome {
        let samples = self.main_samples();
        let answered = |p: &Probe| matches!(p.state, State::Answered { .. });
        let udp = self
            .probes
            .iter()
            .any(|p| matches!(p.kind, Kind::Relay { .. } | Kind::Alternate) && answered(p));
        let public_ipv6 = self.probes.iter().find_map(|p| match (p.socket, p.state) {
            (Socket::Main6, State::Answered { mapped, .. }) => Some(mapped),
            _ => None,
        });
        let mapping = classify::mapping(self.plan.main_port, &self.plan.local_ips, &samples);
        let filter = |c: Change| {
            self.probes
                .iter()
                .find(|p| p.kind == Kind::Filter(c))
                .map_or(TestOutcome::NotRun, Probe::outcome)
        };
        let filtering = classify::filtering(
            filter(Change::None),
            filter(Change::Port),
            filter(Change::IpAndPort),
        );
        let hairpin = self
            .probes
            .iter()
            .find(|p| p.kind == Kind::Hairpin)
            .and_then(|p| match p.state {
                State::Answered { .. } => Some(true),
                State::Silent => Some(false),
                _ => None,
            });
        let relays = self
            .plan
            .targets
            .iter()
            .map(|t| {
                let mut r = RelayUdp {
                    relay: t.relay,
                    ..RelayUdp::default()
                };
                for p in &self.probes {
                    if p.kind != (Kind::Relay { relay: t.relay }) {
                        continue;
                    }
                    if let State::Answered { rtt, other, .. } = p.state {
                        if p.socket == Socket::Main6 {
                            r.rtt_v6 = Some(rtt);
                        } else {
                            r.rtt_v4 = Some(rtt);
                            r.other = other;
                        }
                    }
                }
                r
            })
            .collect();
        Outcome {
            udp,
            public_ipv4: samples.iter().find_map(|s| s.mapped),
            public_ipv6,
            port_allocation: classify::port_allocation(mapping, &samples),
            port_preserved: classify::port_preserved(self.plan.main_port, &samples),
            mapping,
            filtering,
            hairpin,
            samples,
            relays,
            ignored: self.ignored,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A modelled network: a relay with two IPs and two ports, a NAT in
    /// front of our sockets with a chosen behaviour, a fixed one-way delay.
    struct Net {
        nat_mapping: &'static str, // "none", "eim", "apdm-seq", "apdm-rand"
        nat_filtering: Filtering,
        hairpin: bool,
        primary: SocketAddr,
        other: SocketAddr,
        /// (socket, destination) → external port
        mappings: HashMap<(u8, SocketAddr), u16>,
        next_port: u16,
        /// destinations each socket has sent to
        contacted: HashMap<u8, Vec<SocketAddr>>,
        udp_blocked: bool,
    }

    const PUBLIC: &str = "203.0.113.10";
    const LOCAL_IP: &str = "192.168.1.10";

    fn sock_id(s: Socket) -> u8 {
        s as u8
    }

    fn local_port(s: Socket) -> u16 {
        match s {
            Socket::Main => 51821,
            Socket::Filter => 40001,
            Socket::Hairpin => 40002,
            Socket::Main6 => 40003,
        }
    }

    impl Net {
        fn new(mapping: &'static str, filtering: Filtering) -> Net {
            Net {
                nat_mapping: mapping,
                nat_filtering: filtering,
                hairpin: false,
                primary: "198.51.100.2:3478".parse().expect("addr"),
                other: "198.51.100.3:3479".parse().expect("addr"),
                mappings: HashMap::new(),
                next_port: 30000,
                contacted: HashMap::new(),
                udp_blocked: false,
            }
        }

        fn external(&mut self, s: Socket, to: SocketAddr) -> SocketAddr {
            let ip: IpAddr = if self.nat_mapping == "none" {
                LOCAL_IP.parse().expect("ip")
            } else {
                PUBLIC.parse().expect("ip")
            };
            let key = match self.nat_mapping {
                "none" | "eim" => (sock_id(s), "0.0.0.0:0".parse().expect("addr")),
                _ => (sock_id(s), to),
            };
            let port = match self.nat_mapping {
                "none" | "eim" => local_port(s),
                "apdm-seq" => *self.mappings.entry(key).or_insert_with(|| {
                    self.next_port += 1;
                    self.next_port
                }),
                _ => *self.mappings.entry(key).or_insert_with(|| {
                    self.next_port = self.next_port.wrapping_mul(7919).wrapping_add(1237) | 1024;
                    self.next_port
                }),
            };
            SocketAddr::new(ip, port)
        }

        fn admits(&self, s: Socket, from: SocketAddr) -> bool {
            let sent = self.contacted.get(&sock_id(s)).cloned().unwrap_or_default();
            match self.nat_filtering {
                Filtering::EndpointIndependent => true,
                Filtering::AddressDependent => sent.iter().any(|d| d.ip() == from.ip()),
                Filtering::AddressAndPortDependent => sent.contains(&from),
            }
        }

        /// Runs the prober to the end; returns the outcome and virtual time taken.
        fn run(&mut self) -> (Outcome, Duration) {
            let t0 = Instant::now();
            let plan = Plan {
                targets: vec![UdpTarget {
                    relay: 0,
                    v4: Some(self.primary),
                    v6: None,
                }],
                main_port: local_port(Socket::Main),
                local_ips: vec![LOCAL_IP.parse().expect("ip")],
                seed: 7,
            };
            let mut p = Prober::new(plan, t0);
            let mut now = t0;
            let delay = Duration::from_millis(5);
            let mut in_flight: Vec<(Instant, Socket, SocketAddr, Vec<u8>)> = Vec::new();
            for _ in 0..10_000 {
                while let Some(t) = p.poll_transmit() {
                    self.contacted
                        .entry(sock_id(t.socket))
                        .or_default()
                        .push(t.to);
                    let ext = self.external(t.socket, t.to);
                    if self.udp_blocked {
                        continue;
                    }
                    if t.to.ip() == PUBLIC.parse::<IpAddr>().expect("ip") {
                        // Hairpin: to our own mapped address.
                        if self.hairpin {
                            in_flight.push((now + delay, Socket::Main, ext, t.contents));
                        }
                        continue;
                    }
                    let Some(answer) = self.relay_answer(&t.contents, ext, t.to) else {
                        continue;
                    };
                    in_flight.push((now + 2 * delay, t.socket, answer.0, answer.1));
                }
                let next_rx = in_flight.iter().map(|f| f.0).min();
                let Some(deadline) = p.poll_timeout() else {
                    break;
                };
                match next_rx {
                    Some(at) if at <= deadline => {
                        now = at;
                        let i = in_flight.iter().position(|f| f.0 == at).expect("due");
                        let (_, s, from, bytes) = in_flight.swap_remove(i);
                        if self.admits(s, from) || from.ip().to_string() == PUBLIC {
                            p.handle_datagram(now, s, from, &bytes);
                        }
                    }
                    _ => {
                        now = deadline;
                        p.handle_timeout(now);
                    }
                }
            }
            assert!(p.is_done());
            (p.outcome(), now - t0)
        }

        /// The relay's RFC 5780 answer: (source, bytes).
        fn relay_answer(
            &self,
            req: &[u8],
            client: SocketAddr,
            to: SocketAddr,
        ) -> Option<(SocketAddr, Vec<u8>)> {
            let m = Message::parse(req).ok()?;
            let flags = m.u32_attr(attr::CHANGE_REQUEST).unwrap_or(0);
            let mut from = to;
            let other_ip = if to.ip() == self.primary.ip() {
                self.other.ip()
            } else {
                self.primary.ip()
            };
            let other_port = if to.port() == self.primary.port() {
                self.other.port()
            } else {
                self.primary.port()
            };
            if flags & 4 != 0 {
                from.set_ip(other_ip);
            }
            if flags & 2 != 0 {
                from.set_port(other_port);
            }
            let mut out = Vec::new();
            let mut b = MessageBuilder::new(
                &mut out,
                method::BINDING,
                Class::Success,
                m.transaction_id(),
            );
            b.xor_address(attr::XOR_MAPPED_ADDRESS, client)
                .address(attr::RESPONSE_ORIGIN, from)
                .address(attr::OTHER_ADDRESS, SocketAddr::new(other_ip, other_port));
            Some((from, out))
        }
    }

    #[test]
    fn classifies_modelled_nats() {
        use Filtering::*;
        type Case = (
            &'static str,
            Filtering,
            Option<Mapping>,
            Option<PortAllocation>,
            bool,
        );
        let cases: [Case; 5] = [
            ("none", EndpointIndependent, Some(Mapping::None), None, true),
            (
                "eim",
                EndpointIndependent,
                Some(Mapping::EndpointIndependent),
                None,
                true,
            ),
            (
                "eim",
                AddressDependent,
                Some(Mapping::EndpointIndependent),
                None,
                true,
            ),
            (
                "apdm-seq",
                AddressAndPortDependent,
                Some(Mapping::AddressAndPortDependent),
                Some(PortAllocation::Sequential {
                    delta: 1,
                    others_per_min: None,
                }),
                false,
            ),
            (
                "apdm-rand",
                AddressAndPortDependent,
                Some(Mapping::AddressAndPortDependent),
                Some(PortAllocation::Random),
                false,
            ),
        ];
        for (m, f, want_m, want_alloc, preserved) in cases {
            let mut net = Net::new(m, f);
            let (o, took) = net.run();
            assert!(o.udp, "{m}/{f:?}");
            assert_eq!(o.mapping, want_m, "{m}/{f:?}: {o:?}");
            assert_eq!(o.filtering, Some(f), "{m}/{f:?}: {o:?}");
            assert_eq!(o.port_allocation, want_alloc, "{m}/{f:?}");
            assert_eq!(o.port_preserved, Some(preserved), "{m}/{f:?}");
            assert_eq!(o.samples.len(), 4, "primary + three alternates");
            assert_eq!(o.relays[0].other, Some(net.other));
            assert_eq!(o.relays[0].rtt_v4, Some(Duration::from_millis(10)));
            assert!(took < Duration::from_secs(2), "{m}: {took:?}");
        }
    }

    #[test]
    fn hairpin_is_seen_on_the_main_socket() {
        let mut net = Net::new("eim", Filtering::AddressAndPortDependent);
        assert_eq!(net.run().0.hairpin, Some(false));
        let mut net = Net::new("eim", Filtering::AddressAndPortDependent);
        net.hairpin = true;
        assert_eq!(net.run().0.hairpin, Some(true));
    }

    #[test]
    fn udp_blocked_ends_within_the_bound() {
        let mut net = Net::new("eim", Filtering::AddressAndPortDependent);
        net.udp_blocked = true;
        let (o, took) = net.run();
        assert!(!o.udp);
        assert_eq!(o.mapping, None);
        assert_eq!(o.filtering, None);
        assert_eq!(o.hairpin, None);
        assert_eq!(o.relays[0].rtt_v4, None);
        // Six attempts (0..1000 ms), then the last wait.
        assert_eq!(took, Duration::from_millis(1500));
    }

    #[test]
    fn hostile_datagrams_change_nothing() {
        let t0 = Instant::now();
        let relay: SocketAddr = "198.51.100.2:3478".parse().expect("addr");
        let plan = Plan {
            targets: vec![UdpTarget {
                relay: 0,
                v4: Some(relay),
                v6: None,
            }],
            main_port: 5000,
            local_ips: vec![],
            seed: 1,
        };
        let mut p = Prober::new(plan, t0);
        let req = p.poll_transmit().expect("first request");
        let tid = Message::parse(&req.contents)
            .expect("stun")
            .transaction_id();
        let answer = |tid: TransactionId, mapped: SocketAddr| {
            let mut out = Vec::new();
            MessageBuilder::new(&mut out, method::BINDING, Class::Success, tid)
                .xor_address(attr::XOR_MAPPED_ADDRESS, mapped);
            out
        };
        let now = t0 + Duration::from_millis(3);
        let mapped: SocketAddr = "203.0.113.9:5000".parse().expect("addr");
        // Garbage, truncations, a wrong transaction id, the right one from
        // the wrong source or on the wrong socket, an IPv6 mapping.
        p.handle_datagram(now, Socket::Main, relay, b"garbage");
        let good = answer(tid, mapped);
        for n in 0..good.len() {
            p.handle_datagram(now, Socket::Main, relay, &good[..n]);
        }
        p.handle_datagram(now, Socket::Main, relay, &answer([9; 12], mapped));
        p.handle_datagram(
            now,
            Socket::Main,
            "198.51.100.66:3478".parse().expect("addr"),
            &good,
        );
        p.handle_datagram(now, Socket::Filter, relay, &good);
        p.handle_datagram(
            now,
            Socket::Main,
            relay,
            &answer(tid, "[2001:db8::1]:5".parse().expect("addr")),
        );
        assert_eq!(p.outcome().public_ipv4, None);
        assert!(p.outcome().ignored >= 5);
        p.handle_datagram(now, Socket::Main, relay, &good);
        assert_eq!(p.outcome().public_ipv4, Some(mapped));
        assert_eq!(p.outcome().relays[0].rtt_v4, Some(Duration::from_millis(3)));
    }

    #[test]
    fn other_address_cannot_aim_probes_anywhere() {
        let relay: SocketAddr = "198.51.100.2:3478".parse().expect("addr");
        let ok = |s: &str| usable_other(relay, s.parse().expect("addr"));
        assert!(ok("198.51.100.3:3479"));
        for bad in [
            "198.51.100.2:3478",
            "198.51.100.3:0",
            "0.0.0.0:3479",
            "255.255.255.255:3479",
            "239.255.255.250:1900",
            "127.0.0.1:3479",
            "[2001:db8::3]:3479",
        ] {
            assert!(!ok(bad), "{bad}");
        }
        let lo: SocketAddr = "127.0.0.1:3478".parse().expect("addr");
        assert!(usable_other(lo, "127.0.0.2:3479".parse().expect("addr")));
    }
}
