//! Port mapping: asking the default gateway to forward a UDP port to the
//! agent's ICE port, with PCP (RFC 6887) MAP, where the gateway does not
//! speak PCP with NAT-PMP (RFC 6886), and where it speaks neither with
//! UPnP-IGD `AddPortMapping` ([`igd`]).
//!
//! [`PortMapper`] is sans-IO: it builds requests, parses answers (every
//! byte from the gateway is hostile: fixed sizes, checked fields, a nonce,
//! never a panic) and keeps the timers (retransmits, renewal before
//! expiry); the caller passes time in and carries datagrams to and from
//! the gateway's port 5351. [`driver`] is the thin tokio side.
//!
//! The mapped address becomes a server-reflexive candidate ranked above
//! the STUN one ([`crate::WgicePreference`]): behind a NAT that maps per
//! destination (symmetric), it is the only address a peer can reach us on.
//!
//! Run loop: after any `handle_*` call, drain [`PortMapper::poll_transmit`]
//! and [`PortMapper::poll_event`]; then wait for a datagram or
//! [`PortMapper::poll_timeout`].
//!
//! UPnP-IGD is a request/response exchange over HTTP: its parsers and
//! decisions are in [`igd`], its calls in the driver.

pub mod driver;
pub mod igd;
mod igd_driver;

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

/// UDP port of NAT-PMP and PCP servers.
pub const GATEWAY_PORT: u16 = 5351;
/// Lifetime we ask for (RFC 6886 recommends 7200 s).
pub const REQUESTED_LIFETIME: u32 = 7200;
/// Longest we go without hearing from the gateway while mapped: the
/// mapping is renewed at least this often, so a gateway that disappeared
/// is noticed within this plus the retransmit time.
pub const MAX_RENEW_INTERVAL: Duration = Duration::from_secs(60);
/// First retransmit timeout (RFC 6886 §3.1: 250 ms, doubling).
const FIRST_RTO: Duration = Duration::from_millis(250);
/// Attempts per request before giving up (250+500+1000+2000 ms).
const ATTEMPTS: u32 = 4;
/// PCP attempts before trying NAT-PMP instead.
const PCP_ATTEMPTS: u32 = 2;
/// Shortest lifetime we accept (a gateway granting less would have us
/// renew in a loop).
const MIN_LIFETIME: u32 = 10;
/// PCP MAP request and response size (24-byte header + 36-byte MAP data).
const PCP_MAP_LEN: usize = 60;
/// Largest PCP message (RFC 6887 §7).
const PCP_MAX_LEN: usize = 1100;

/// Which protocol holds the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Port Control Protocol, RFC 6887.
    Pcp,
    /// NAT-PMP, RFC 6886.
    NatPmp,
    /// UPnP-IGD `AddPortMapping` (WANIPConnection / WANPPPConnection).
    UpnpIgd,
}

impl Protocol {
    /// Its name for status and logs.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pcp => "PCP",
            Protocol::NatPmp => "NAT-PMP",
            Protocol::UpnpIgd => "UPnP-IGD",
        }
    }
}

/// What the mapper tells its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The gateway forwards `external` to our port (new, or changed).
    Mapped {
        /// The public address peers can reach us on.
        external: SocketAddrV4,
        /// The protocol that made it.
        protocol: Protocol,
        /// Granted lifetime.
        lifetime: Duration,
    },
    /// The mapping is gone (no answer to a renewal, the gateway refused
    /// it, or it was released).
    Lost {
        /// Why, for logs and status.
        reason: String,
    },
    /// Neither PCP nor NAT-PMP answered (or the gateway refused): nothing
    /// more happens until the caller makes a new mapper.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// Counters of what the gateway sent us.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams dropped: wrong source, malformed, wrong nonce or port.
    pub refused: u64,
    /// Well-formed answers with an error result code.
    pub errors: u64,
    /// Mappings made or renewed.
    pub renewals: u64,
}

/// What the mapper is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// PCP MAP sent.
    PcpMap,
    /// NAT-PMP external-address request sent.
    NatPmpExternal,
    /// NAT-PMP UDP mapping request sent.
    NatPmpMap,
    /// Mapped; renewal due at `renew_at`.
    Mapped,
    /// Gave up, or released.
    Done,
}

/// The current mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The public address.
    pub external: SocketAddrV4,
    /// Protocol that made it.
    pub protocol: Protocol,
    /// When it expires unless renewed.
    pub expires: Instant,
}

/// The sans-IO port-mapping client for one internal port on one gateway.
#[derive(Debug)]
pub struct PortMapper {
    gateway: Ipv4Addr,
    client: Ipv4Addr,
    internal_port: u16,
    nonce: [u8; 12],
    step: Step,
    attempt: u32,
    /// When to retransmit, or renew.
    deadline: Option<Instant>,
    /// The external address NAT-PMP reported (its MAP answer has none).
    natpmp_external: Option<Ipv4Addr>,
    mapping: Option<Mapping>,
    /// Which protocol answered last (renewals stay on it).
    protocol: Option<Protocol>,
    out: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    counters: Counters,
}

impl PortMapper {
    /// A mapper asking `gateway` to forward a UDP port to
    /// `client:internal_port`; `nonce` must be random (PCP matches answers
    /// by it). The first request is queued at once.
    pub fn new(
        gateway: Ipv4Addr,
        client: Ipv4Addr,
        internal_port: u16,
        nonce: [u8; 12],
        now: Instant,
    ) -> Self {
        let mut m = PortMapper {
            gateway,
            client,
            internal_port,
            nonce,
            step: Step::PcpMap,
            attempt: 0,
            deadline: None,
            natpmp_external: None,
            mapping: None,
            protocol: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
        };
        m.send_step(now, Step::PcpMap);
        m
    }

    /// The gateway's address (requests go to its port 5351).
    pub fn gateway(&self) -> SocketAddr {
        SocketAddr::from((self.gateway, GATEWAY_PORT))
    }

    /// The current mapping, if any.
    pub fn mapping(&self) -> Option<Mapping> {
        self.mapping
    }

    /// What the gateway sent that we refused or that reported errors.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Next datagram for the gateway. Changes after `new`, `handle_*` and
    /// [`PortMapper::release`].
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// Next event. Changes after `handle_*` and [`PortMapper::release`].
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`PortMapper::handle_timeout`] wants to be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// Time passed: retransmit, fall back to NAT-PMP, renew, or give up.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(d) = self.deadline else { return };
        if now < d {
            return;
        }
        match self.step {
            Step::Done => self.deadline = None,
            Step::Mapped => {
                // Renewal due: the same request again, on the protocol
                // that answered.
                let step = match self.protocol {
                    Some(Protocol::NatPmp) => Step::NatPmpMap,
                    _ => Step::PcpMap,
                };
                self.send_step(now, step);
            }
            step => {
                let limit = if step == Step::PcpMap && self.protocol.is_none() {
                    PCP_ATTEMPTS
                } else {
                    ATTEMPTS
                };
                if self.attempt + 1 < limit {
                    self.attempt += 1;
                    self.transmit(now);
                } else if step == Step::PcpMap && self.protocol.is_none() {
                    // No PCP answer yet: maybe the gateway speaks NAT-PMP only.
                    self.send_step(now, Step::NatPmpExternal);
                } else {
                    let what = match (step, self.mapping.is_some()) {
                        (_, true) => "the renewal",
                        (Step::NatPmpMap, false) => "the NAT-PMP mapping request",
                        _ => "PCP or NAT-PMP (no port-mapping gateway?)",
                    };
                    self.give_up(format!("no answer to {what}"));
                }
            }
        }
    }

    /// A datagram arrived on the socket that talks to the gateway.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        if from != self.gateway() || data.len() > PCP_MAX_LEN {
            self.counters.refused += 1;
            return;
        }
        match (self.step, data.first()) {
            (Step::PcpMap | Step::Mapped, Some(2)) => self.pcp_answer(now, data),
            // A NAT-PMP-only gateway answers a PCP request with version 0,
            // result 1 ("unsupported version").
            (Step::PcpMap, Some(0)) => match parse_natpmp(data) {
                Some(NatPmpAnswer { result: 1, .. }) if self.protocol.is_none() => {
                    self.send_step(now, Step::NatPmpExternal)
                }
                _ => self.counters.refused += 1,
            },
            (Step::NatPmpExternal | Step::NatPmpMap | Step::Mapped, Some(0)) => {
                self.natpmp_answer(now, data)
            }
            _ => self.counters.refused += 1,
        }
    }

    /// Asks the gateway to delete the mapping (lifetime 0), once; the
    /// mapper is done afterwards. Emits [`Event::Lost`] if it was mapped.
    pub fn release(&mut self) {
        if let Some(m) = self.mapping.take() {
            let req = match m.protocol {
                Protocol::Pcp => pcp_map_request(self.client, self.internal_port, 0, &self.nonce),
                Protocol::NatPmp => natpmp_map_request(self.internal_port, 0, 0).to_vec(),
                // Never made here (the driver's UPnP-IGD calls own it).
                Protocol::UpnpIgd => Vec::new(),
            };
            if !req.is_empty() {
                self.out.push_back(req);
            }
            self.events.push_back(Event::Lost {
                reason: "released".into(),
            });
        }
        self.step = Step::Done;
        self.deadline = None;
    }

    fn pcp_answer(&mut self, now: Instant, data: &[u8]) {
        let Some(a) = parse_pcp_map(data) else {
            self.counters.refused += 1;
            return;
        };
        if a.nonce != self.nonce || a.internal_port != self.internal_port || a.protocol != 17 {
            self.counters.refused += 1;
            return;
        }
        if self.step == Step::Mapped && self.protocol != Some(Protocol::Pcp) {
            self.counters.refused += 1;
            return;
        }
        match a.result {
            0 => {}
            // UNSUPP_VERSION: try NAT-PMP.
            1 if self.protocol.is_none() => {
                self.counters.errors += 1;
                self.send_step(now, Step::NatPmpExternal);
                return;
            }
            r => {
                self.counters.errors += 1;
                self.give_up(format!("PCP MAP refused: {}", pcp_result(r)));
                return;
            }
        }
        let (Some(ip), true) = (a.external_ip, a.external_port != 0) else {
            self.counters.refused += 1;
            return;
        };
        if a.lifetime < MIN_LIFETIME || !usable_external(ip) {
            self.counters.refused += 1;
            return;
        }
        self.mapped(
            now,
            SocketAddrV4::new(ip, a.external_port),
            Protocol::Pcp,
            a.lifetime,
        );
    }

    fn natpmp_answer(&mut self, now: Instant, data: &[u8]) {
        let Some(a) = parse_natpmp(data) else {
            self.counters.refused += 1;
            return;
        };
        let expected = match self.step {
            Step::NatPmpExternal => 128,
            _ => 129,
        };
        if a.opcode != expected {
            self.counters.refused += 1;
            return;
        }
        if a.result != 0 {
            self.counters.errors += 1;
            self.give_up(format!("NAT-PMP refused: {}", natpmp_result(a.result)));
            return;
        }
        match a.body {
            NatPmpBody::External(ip) => {
                if !usable_external(ip) {
                    self.counters.refused += 1;
                    self.give_up(format!("NAT-PMP external address {ip} is not usable"));
                    return;
                }
                self.natpmp_external = Some(ip);
                self.send_step(now, Step::NatPmpMap);
            }
            NatPmpBody::Map {
                internal_port,
                external_port,
                lifetime,
            } => {
                if internal_port != self.internal_port
                    || external_port == 0
                    || lifetime < MIN_LIFETIME
                {
                    self.counters.refused += 1;
                    return;
                }
                let Some(ip) = self.natpmp_external else {
                    self.counters.refused += 1;
                    return;
                };
                self.mapped(
                    now,
                    SocketAddrV4::new(ip, external_port),
                    Protocol::NatPmp,
                    lifetime,
                );
            }
        }
    }

    fn mapped(&mut self, now: Instant, external: SocketAddrV4, protocol: Protocol, lifetime: u32) {
        let lifetime = Duration::from_secs(u64::from(lifetime));
        let changed = self.mapping.map(|m| m.external) != Some(external);
        self.mapping = Some(Mapping {
            external,
            protocol,
            expires: now + lifetime,
        });
        self.protocol = Some(protocol);
        self.counters.renewals += 1;
        self.step = Step::Mapped;
        self.attempt = 0;
        self.deadline = Some(now + (lifetime / 2).min(MAX_RENEW_INTERVAL));
        if changed {
            self.events.push_back(Event::Mapped {
                external,
                protocol,
                lifetime,
            });
        }
    }

    fn give_up(&mut self, reason: String) {
        self.step = Step::Done;
        self.deadline = None;
        if self.mapping.take().is_some() {
            self.events.push_back(Event::Lost { reason });
        } else {
            self.events.push_back(Event::Unavailable { reason });
        }
    }

    fn send_step(&mut self, now: Instant, step: Step) {
        self.step = step;
        self.attempt = 0;
        self.transmit(now);
    }

    fn transmit(&mut self, now: Instant) {
        let req = match self.step {
            Step::PcpMap => pcp_map_request(
                self.client,
                self.internal_port,
                REQUESTED_LIFETIME,
                &self.nonce,
            ),
            Step::NatPmpExternal => vec![0, 0],
            Step::NatPmpMap => {
                let suggested = self
                    .mapping
                    .map(|m| m.external.port())
                    .unwrap_or(self.internal_port);
                natpmp_map_request(self.internal_port, suggested, REQUESTED_LIFETIME).to_vec()
            }
            Step::Mapped | Step::Done => return,
        };
        self.out.push_back(req);
        self.deadline = Some(now + FIRST_RTO * (1 << self.attempt.min(6)));
    }
}

/// An external address a peer could reach: unicast, not ours to invent.
fn usable_external(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_link_local())
}

/// A PCP MAP request (RFC 6887 §11.1) for UDP `internal_port` of `client`,
/// any external address, suggesting the same external port.
pub fn pcp_map_request(
    client: Ipv4Addr,
    internal_port: u16,
    lifetime: u32,
    nonce: &[u8; 12],
) -> Vec<u8> {
    let mut b = vec![0u8; PCP_MAP_LEN];
    b[0] = 2; // version
    b[1] = 1; // request, opcode MAP
    b[4..8].copy_from_slice(&lifetime.to_be_bytes());
    b[8..24].copy_from_slice(&client.to_ipv6_mapped().octets());
    b[24..36].copy_from_slice(nonce);
    b[36] = 17; // UDP
    b[40..42].copy_from_slice(&internal_port.to_be_bytes());
    b[42..44].copy_from_slice(&internal_port.to_be_bytes());
    // Suggested external address: ::ffff:0.0.0.0 ("any IPv4").
    b[44..60].copy_from_slice(&Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().octets());
    b
}

/// A PCP MAP response's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcpMapAnswer {
    /// Result code (0: success).
    pub result: u8,
    /// Granted lifetime, seconds.
    pub lifetime: u32,
    /// The request's nonce, echoed.
    pub nonce: [u8; 12],
    /// IP protocol number.
    pub protocol: u8,
    /// Internal port, echoed.
    pub internal_port: u16,
    /// Assigned external port.
    pub external_port: u16,
    /// Assigned external IPv4 address (`None` if not IPv4-mapped).
    pub external_ip: Option<Ipv4Addr>,
}

/// Parses a PCP MAP response: version 2, R bit and opcode MAP, at least 60
/// bytes, at most 1100, a multiple of 4 (options are ignored).
pub fn parse_pcp_map(b: &[u8]) -> Option<PcpMapAnswer> {
    if b.len() < PCP_MAP_LEN || b.len() > PCP_MAX_LEN || !b.len().is_multiple_of(4) {
        return None;
    }
    if b[0] != 2 || b[1] != 0x81 {
        return None;
    }
    let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&b[24..36]);
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&b[44..60]);
    Some(PcpMapAnswer {
        result: b[3],
        lifetime: u32_at(4),
        nonce,
        protocol: b[36],
        internal_port: u16_at(40),
        external_port: u16_at(42),
        external_ip: std::net::Ipv6Addr::from(ip).to_ipv4_mapped(),
    })
}

/// A NAT-PMP UDP mapping request (RFC 6886 §3.3); lifetime 0 deletes.
pub fn natpmp_map_request(internal_port: u16, suggested: u16, lifetime: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[1] = 1; // map UDP
    b[4..6].copy_from_slice(&internal_port.to_be_bytes());
    b[6..8].copy_from_slice(&suggested.to_be_bytes());
    b[8..12].copy_from_slice(&lifetime.to_be_bytes());
    b
}

/// A NAT-PMP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatPmpAnswer {
    /// Opcode (128: external address, 129: UDP map).
    pub opcode: u8,
    /// Result code.
    pub result: u16,
    /// What it says (only meaningful with result 0).
    pub body: NatPmpBody,
}

/// A NAT-PMP response's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatPmpBody {
    /// The gateway's external address.
    External(Ipv4Addr),
    /// A UDP mapping.
    Map {
        /// Echoed internal port.
        internal_port: u16,
        /// Mapped external port.
        external_port: u16,
        /// Granted lifetime, seconds.
        lifetime: u32,
    },
}

/// Parses a NAT-PMP response of exactly the size its opcode has (12 or 16
/// bytes); an error answer may be just the 8-byte header (some gateways
/// send that), whose body is then zero.
pub fn parse_natpmp(b: &[u8]) -> Option<NatPmpAnswer> {
    if b.len() < 8 || b.len() > 16 || b[0] != 0 {
        return None;
    }
    let opcode = b[1];
    let result = u16::from_be_bytes([b[2], b[3]]);
    let mut full = [0u8; 16];
    full[..b.len()].copy_from_slice(b);
    let body = match opcode {
        128 if b.len() == 12 || (result != 0 && b.len() == 8) => {
            NatPmpBody::External(Ipv4Addr::new(full[8], full[9], full[10], full[11]))
        }
        // Opcode 0 with result 1: "unsupported version" to a PCP request.
        0 | 128..=130 if result != 0 && b.len() <= 16 => NatPmpBody::Map {
            internal_port: 0,
            external_port: 0,
            lifetime: 0,
        },
        129 if b.len() == 16 => NatPmpBody::Map {
            internal_port: u16::from_be_bytes([full[8], full[9]]),
            external_port: u16::from_be_bytes([full[10], full[11]]),
            lifetime: u32::from_be_bytes([full[12], full[13], full[14], full[15]]),
        },
        _ => return None,
    };
    Some(NatPmpAnswer {
        opcode,
        result,
        body,
    })
}

fn pcp_result(r: u8) -> String {
    let name = match r {
        1 => "UNSUPP_VERSION",
        2 => "NOT_AUTHORIZED",
        3 => "MALFORMED_REQUEST",
        4 => "UNSUPP_OPCODE",
        5 => "UNSUPP_OPTION",
        6 => "MALFORMED_OPTION",
        7 => "NETWORK_FAILURE",
        8 => "NO_RESOURCES",
        9 => "UNSUPP_PROTOCOL",
        10 => "USER_EX_QUOTA",
        11 => "CANNOT_PROVIDE_EXTERNAL",
        12 => "ADDRESS_MISMATCH",
        13 => "EXCESSIVE_REMOTE_PEERS",
        _ => "unknown",
    };
    format!("result {r} ({name})")
}

fn natpmp_result(r: u16) -> String {
    let name = match r {
        1 => "unsupported version",
        2 => "not authorized / refused",
        3 => "network failure",
        4 => "out of resources",
        5 => "unsupported opcode",
        _ => "unknown",
    };
    format!("result {r} ({name})")
}

#[cfg(test)]
mod tests;
