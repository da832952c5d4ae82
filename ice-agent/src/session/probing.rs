//! The session's side of birthday probing ([`crate::birthday`]): which
//! side we are, the probes, the socket that was hit, the reason.

use std::net::SocketAddr;
use std::time::Instant;

use is::{Candidate, CandidateKind};

use super::{PathKind, PeerSession, SessionEvent};
use crate::birthday::{Msg, Out, SOCKETS};
use crate::netcheck::{Filtering, Mapping, NatFacts, PortAllocation};

/// Sockets one session may win (each stays open, carrying the path, until
/// the session ends); after that the session stops probing.
pub(crate) const MAX_WINS: u32 = 4;

/// Our part in birthday probing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Our NAT is random symmetric: we open the sockets.
    Sockets,
    /// Our NAT is endpoint-independent and filters by port: we probe.
    Prober,
}

/// Symmetric with random ports, by the published facts.
fn random_edm(f: Option<&NatFacts>) -> bool {
    f.is_some_and(|f| f.udp && f.symmetric() && f.port_allocation == Some(PortAllocation::Random))
}

/// One mapping for every destination, filtered by address and port (a
/// port-restricted cone or a carrier-grade NAT): plain punching against a
/// symmetric NAT fails there, probing can succeed.
fn eim_port_filtering(f: Option<&NatFacts>) -> bool {
    f.is_some_and(|f| {
        f.udp
            && f.mapping == Some(Mapping::EndpointIndependent)
            && matches!(f.filtering, None | Some(Filtering::AddressAndPortDependent))
    })
}

impl PeerSession {
    /// When birthday probing applies: one NAT random symmetric, the other
    /// endpoint-independent with port filtering (both published
    /// netchecks), and the peer's server-reflexive IPv4 address proven (an
    /// authenticated check or answer came from its IP). Returns our role
    /// and that address (the sockets' target; the prober probes its IP).
    fn birthday_role(&self) -> Option<(Role, SocketAddr)> {
        let (l, r) = (self.local_nat.as_ref(), self.remote_nat.as_ref());
        let role = if random_edm(l) && eim_port_filtering(r) {
            Role::Sockets
        } else if eim_port_filtering(l) && random_edm(r) {
            Role::Prober
        } else {
            return None;
        };
        let srflx = self
            .remote
            .iter()
            .filter(|c| c.kind() == CandidateKind::ServerReflexive && c.addr().is_ipv4())
            .filter(|c| !self.punched.iter().any(|p| p.0 == c.addr()))
            .filter(|c| !self.predicted.iter().any(|p| p.0 == c.addr()))
            .map(|c| c.addr())
            .find(|a| {
                self.seen
                    .iter()
                    .any(|((_, r), s)| r.ip() == a.ip() && s.authenticated)
            })?;
        Some((role, srflx))
    }

    /// A `Birthday*` message from the peer (fields already validated).
    pub fn handle_birthday(&mut self, now: Instant, msg: Msg) {
        let able = self.path.kind == PathKind::Relay
            && matches!(self.birthday_role(), Some((Role::Prober, _)));
        self.birthday.handle(now, msg, able);
        self.after_mutation(now);
    }

    /// The driver opened `n` of the sockets [`SessionEvent::OpenSockets`]
    /// asked for.
    pub fn handle_sockets_opened(&mut self, now: Instant, n: u16) {
        self.birthday.opened(now, n);
        self.after_mutation(now);
    }

    /// A probe from the peer's server-reflexive address reached our socket
    /// `local` (its host address): that socket becomes a host candidate of
    /// this session and ICE checks it against the peer. Returns whether
    /// it was taken (an attempt was open); the driver closes the socket
    /// otherwise.
    pub fn handle_birthday_hit(&mut self, now: Instant, local: SocketAddr) -> bool {
        if !self.birthday.hit(now) {
            return false;
        }
        let Ok(c) = Candidate::host(local, "udp") else {
            return false;
        };
        match self.ice.add_local_candidate(c).cloned() {
            Some(added) => self.local.push(added),
            None => return false,
        }
        self.birthday_socket = Some(local);
        self.birthday_wins += 1;
        tracing::info!(%local, "birthday probing: the peer's probe reached one of our sockets");
        self.retry_direct_now(now);
        true
    }

    /// Starts an attempt (we open the sockets, so we start) while the path
    /// is relayed, ends one when the path went direct, acts on the
    /// outputs.
    pub(super) fn drive_birthday(&mut self, now: Instant) {
        let role = self.birthday_role();
        if self.path.kind == PathKind::Relay
            && !self.birthday.busy()
            && self.birthday.due(now)
            && self.birthday_wins < MAX_WINS
            && matches!(role, Some((Role::Sockets, _)))
        {
            self.birthday.start(now);
        }
        if self.birthday.busy() && self.path.kind.is_direct() {
            let (l, r) = (self.path.local, self.path.remote);
            let ours = match role {
                Some((Role::Sockets, _)) => l.is_some() && l == self.birthday_socket,
                _ => self.birthday.probing(),
            };
            if let (true, Some(l), Some(r)) = (ours, l, r) {
                let probes = self.birthday.sent();
                self.birthday.succeeded();
                self.birthday_won = Some(((l, r), probes.or(self.birthday.won_after())));
            } else if !ours {
                // Direct by other means.
                self.birthday.abandon(now);
            }
        }
        self.birthday.handle_timeout(now, &mut self.backoff.rng);
        let mut outs = Vec::new();
        while let Some(o) = self.birthday.poll_out() {
            outs.push(o);
        }
        for o in outs {
            match o {
                Out::Open(count) => match role {
                    Some((_, target)) => self
                        .events
                        .push_back(SessionEvent::OpenSockets { target, count }),
                    None => self.birthday.opened(now, 0),
                },
                Out::Close => self.events.push_back(SessionEvent::CloseSockets),
                Out::Send(m) => self.events.push_back(SessionEvent::Birthday(m)),
                Out::Probe(ports) => {
                    if let Some((_, srflx)) = role {
                        self.send_openers(srflx.ip(), &ports);
                    }
                }
            }
        }
    }

    /// When birthday probing needs [`PeerSession::handle_timeout`].
    pub(super) fn birthday_timeout(&self) -> Option<Instant> {
        let next = self
            .birthday
            .next_attempt()
            .filter(|_| self.path.kind == PathKind::Relay);
        self.birthday.poll_timeout().into_iter().chain(next).min()
    }

    /// Whether the pair is the one birthday probing gave.
    pub(super) fn birthday_pair(&self, l: SocketAddr, r: SocketAddr) -> bool {
        // While we probe, a new direct pair can only be the probes' doing
        // (plain checks and prediction had their turn before).
        self.birthday_won.is_some_and(|(k, _)| k == (l, r))
            || self.birthday_socket == Some(l)
            || self.birthday.probing()
    }

    /// "direct … via birthday probing after 412 probes".
    pub(super) fn birthday_reason(&self, l: SocketAddr, r: SocketAddr) -> String {
        let probes = self
            .birthday_won
            .filter(|(k, _)| *k == (l, r))
            .and_then(|(_, p)| p)
            .or(self.birthday.sent())
            .or(self.birthday.won_after());
        let how = match probes {
            Some(n) => format!("after {n} probes"),
            None => format!("(one of our {SOCKETS} sockets met the peer's probes)"),
        };
        let mine = if self.birthday_socket == Some(l) {
            "ours random symmetric, the peer's endpoint-independent"
        } else {
            "the peer's random symmetric, ours endpoint-independent"
        };
        format!("direct {l} ↔ {r} via birthday probing {how} ({mine})")
    }
}
