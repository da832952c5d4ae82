//! The session's side of the coordinated punch ([`crate::punch`]): when it
//! applies, the openers, the candidates they open and the reason.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use is::{Candidate, CandidateKind};
use rand::Rng;

use super::{PathKind, PeerSession, SessionEvent, Transmit, Via};
use crate::netcheck::{NatFacts, PortAllocation};
use crate::punch::{self, Msg, Out, Ports, Refused, OPENERS};

/// Punch rounds that may add candidates in one session. Each adds at most
/// [`OPENERS`] remote candidates and discards the previous round's, so
/// `is` never holds more than this many rounds' worth; a new session (a
/// restart, a network change) starts again from zero.
pub(crate) const MAX_PUNCH_ROUNDS: u32 = 8;

/// The step of a sequential symmetric NAT, by its published facts.
fn sequential(f: Option<&NatFacts>) -> Option<i32> {
    let f = f?;
    match f.port_allocation {
        Some(PortAllocation::Sequential { delta, .. }) if f.udp && f.symmetric() => Some(delta),
        _ => None,
    }
}

impl PeerSession {
    /// When the coordinated punch applies: both NATs symmetric with
    /// sequential ports (both published netchecks), and the peer's public
    /// IPv4 address proven (an authenticated check or answer came from it,
    /// through the relay typically), so openers go only there. Returns
    /// (our step, the peer's step, its address).
    pub(super) fn punch_setup(&self) -> Option<(i32, i32, IpAddr)> {
        let ours = sequential(self.local_nat.as_ref())?;
        let theirs = sequential(self.remote_nat.as_ref())?;
        let ip = self
            .remote
            .iter()
            .filter(|c| c.kind() == CandidateKind::ServerReflexive && c.addr().is_ipv4())
            .map(|c| c.addr().ip())
            .find(|ip| {
                self.seen
                    .iter()
                    .any(|((_, r), s)| r.ip() == *ip && s.authenticated)
            })?;
        Some((ours, theirs, ip))
    }

    /// A `Punch*` message from the peer (fields already validated).
    pub fn handle_punch(&mut self, now: Instant, msg: Msg) -> Result<(), Refused> {
        let able = self.punch_rounds < MAX_PUNCH_ROUNDS && self.punch_setup().is_some();
        let r = self.punch.handle(now, msg, self.config.controlling, able);
        self.after_mutation(now);
        r
    }

    /// The driver measured our NAT's counter after
    /// [`SessionEvent::MeasureMapping`]: the public address a fresh
    /// socket's Binding to a relay got (`None`: no answer). The next
    /// mapping is one step past it.
    pub fn handle_mapping(&mut self, now: Instant, mapped: Option<SocketAddr>) {
        let public = self
            .local
            .iter()
            .find(|c| c.kind() == CandidateKind::ServerReflexive && c.addr().is_ipv4())
            .map(|c| c.addr().ip());
        let delta = self.punch_setup().map(|s| s.0);
        let ours = match (mapped, delta) {
            (Some(m), Some(delta)) if Some(m.ip()) == public => {
                u16::try_from(i64::from(m.port()) + i64::from(delta))
                    .ok()
                    .filter(|p| *p >= 1024)
                    .map(|port| Ports { port, delta })
            }
            _ => None,
        };
        if ours.is_none() {
            tracing::debug!(
                ?mapped,
                ?public,
                "punch: no usable measurement of our NAT's next port"
            );
        }
        self.punch.measured(now, ours);
        self.after_mutation(now);
    }

    /// Starts an attempt when we offer (controlling side), the path is
    /// relayed and the punch applies; acts on the punch's outputs.
    pub(super) fn drive_punch(&mut self, now: Instant) {
        if self.config.controlling
            && self.path.kind == PathKind::Relay
            && !self.punch.busy()
            && self.punch_rounds < MAX_PUNCH_ROUNDS
            && self.punch.next_attempt().is_none_or(|t| now >= t)
            && self.punch_setup().is_some()
        {
            self.punch.start(now);
        }
        self.punch.handle_timeout(now);
        let mut outs = Vec::new();
        while let Some(o) = self.punch.poll_out() {
            outs.push(o);
        }
        for o in outs {
            match o {
                Out::Measure => self.events.push_back(SessionEvent::MeasureMapping),
                Out::Send(m) => self.events.push_back(SessionEvent::Punch(m)),
                Out::Burst { ports, stride } => self.burst(now, &ports, stride),
            }
        }
    }

    /// When the punch needs [`PeerSession::handle_timeout`].
    pub(super) fn punch_timeout(&self) -> Option<Instant> {
        let next = self
            .punch
            .next_attempt()
            .filter(|_| self.config.controlling && self.path.kind == PathKind::Relay);
        self.punch.poll_timeout().into_iter().chain(next).min()
    }

    /// Sends the openers (back to back, from our host socket, only to the
    /// peer's proven address) and makes the ports they aimed at remote
    /// candidates, so ICE checks them over the 5-tuples just opened.
    fn burst(&mut self, now: Instant, ports: &[u16], stride: u16) {
        let Some((_, _, ip)) = self.punch_setup() else {
            return;
        };
        let ports = &ports[..ports.len().min(usize::from(OPENERS))];
        self.send_openers(ip, ports);
        // The previous round's ports are spent (their mappings never met).
        for (addr, ..) in std::mem::take(&mut self.punched) {
            if let Some(i) = self.remote.iter().position(|c| c.addr() == addr) {
                let c = self.remote.remove(i);
                self.ice.invalidate_candidate(&c);
            }
        }
        self.punch_rounds += 1;
        let round = self.punch_rounds;
        for (k, port) in ports.iter().enumerate() {
            let addr = SocketAddr::new(ip, *port);
            if self.remote.iter().any(|c| c.addr() == addr) {
                continue;
            }
            // Below the peer's own srflx, above any relayed candidate, the
            // first openers first (the likeliest to meet).
            let k16 = k as u16;
            let prio = (100u32 << 24) | ((0xfff0 - u32::from(k16)) << 8) | 255;
            let c = Candidate::from_parts(
                format!("punch{round}x{k}"),
                1,
                is::Protocol::Udp,
                prio,
                addr,
                CandidateKind::ServerReflexive,
                Some(SocketAddr::new(ip, ports[0])),
                None,
                None,
            );
            self.punched.push((addr, k16));
            self.remote.push(c.clone());
            self.ice.add_remote_candidate(c);
        }
        tracing::info!(
            peer = %ip,
            first = ports.first().copied().unwrap_or_default(),
            last = ports.last().copied().unwrap_or_default(),
            openers = ports.len(),
            stride,
            round,
            "punching together with the peer (both NATs sequential symmetric)"
        );
        self.retry_direct_now(now);
    }

    /// Openers from our host socket to `ports` of the peer's address `ip`
    /// (the punch's burst, birthday probing's probes).
    pub(super) fn send_openers(&mut self, ip: IpAddr, ports: &[u16]) {
        let Some(source) = self
            .local
            .iter()
            .find(|c| c.kind() == CandidateKind::Host && c.addr().is_ipv4())
            .map(|c| c.addr())
        else {
            return;
        };
        let mut buf = Vec::with_capacity(punch::OPENER_LEN);
        for port in ports {
            let tid: [u8; 12] = self.backoff.rng.random();
            punch::opener(&mut buf, tid);
            self.transmits.push_back(Transmit {
                source,
                destination: SocketAddr::new(ip, *port),
                via: Via::Socket,
                contents: buf.clone(),
            });
        }
    }

    /// An opener from the peer's burst reached us: nothing to answer, it
    /// only shows our NAT let it in. Taken (not a stray) while we punch
    /// and it comes from the peer's address.
    pub(super) fn handle_opener(&mut self, source: SocketAddr) -> bool {
        let ours = (self.punch.busy() || self.birthday.busy())
            && self.remote.iter().any(|c| c.addr().ip() == source.ip());
        if ours {
            self.stats.openers_received += 1;
        }
        ours
    }

    /// "direct … via port prediction on both sides …".
    pub(super) fn punched_reason(&self, l: SocketAddr, r: SocketAddr) -> String {
        let Some(&(_, k)) = self.punched.iter().find(|p| p.0 == r) else {
            return format!("direct {l} ↔ {r}");
        };
        let ours = sequential(self.local_nat.as_ref()).unwrap_or_default();
        let theirs = sequential(self.remote_nat.as_ref()).unwrap_or_default();
        format!(
            "direct {l} ↔ {r} via port prediction on both sides, delta {ours:+} / {theirs:+} \
             (both NATs sequential symmetric; openers timed together through signaling, \
             opener {} of {OPENERS} met)",
            k + 1
        )
    }
}
