//! NAT facts. Ours are measured by the daemon's background netcheck and go
//! to every peer in a `Facts` message after each offer or answer, and again
//! when they change. A peer's are checked at the boundary
//! ([`NatFacts::from_wire`]), kept per peer (they describe the node, not a
//! session), shown in status and used in the sessions' reasons. Part of
//! [`Agent`]; see `docs/ice-agent.md` ("NAT facts").

use std::net::SocketAddr;
use std::time::Instant;

use signaling::seal::PeerMessage;

use super::{Agent, Output, PeerKey};
use crate::netcheck::NatFacts;
use crate::punch::Msg;
use crate::session::PeerSession;
use crate::validate::Refusal;

impl Agent {
    /// Our NAT facts as the daemon's netcheck measured them (at start and
    /// after network changes). Peers hear of them when they change.
    pub fn set_nat_facts(&mut self, now: Instant, facts: NatFacts) {
        let news = self.nat.as_ref().map(|(f, _)| f.for_peers()) != Some(facts.for_peers());
        tracing::info!(nat = %facts.summary(), changed = news, "NAT facts measured");
        self.nat = Some((facts, now));
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for k in keys {
            self.tell_session_nat(now, k);
            if news {
                self.send_facts(k);
            }
        }
    }

    /// Our NAT facts and when they were measured (`None`: not yet).
    pub fn nat_facts(&self) -> Option<(&NatFacts, Instant)> {
        self.nat.as_ref().map(|(f, t)| (f, *t))
    }

    /// Sends our facts to `key` in its current session (after an offer or
    /// answer, or when they change).
    pub(super) fn send_facts(&mut self, key: PeerKey) {
        let Some((facts, _)) = &self.nat else { return };
        let nat = facts.to_wire();
        self.signal_session(key, |session| PeerMessage::Facts { session, nat });
    }

    /// Sends `key` the message `make` builds for our current session id
    /// with it (nothing without a session).
    fn signal_session(&mut self, key: PeerKey, make: impl FnOnce(u64) -> PeerMessage) {
        let Some(session) = self
            .peers
            .get(&key)
            .and_then(|p| p.session.as_ref())
            .map(|s| s.local_id)
        else {
            return;
        };
        self.out.push_back(Output::Signal {
            to: key,
            message: make(session),
        });
    }

    /// `from`'s current session, if `session` (its id) names it; a message
    /// for another session counts as a signaling refusal.
    fn named_session(&mut self, from: &PeerKey, session: u64) -> Option<&mut PeerSession> {
        let s = self.peers.get(from).and_then(|p| p.session.as_ref())?;
        if s.remote_id != Some(session) {
            self.drops.signal_rejected += 1;
            return None;
        }
        self.peers
            .get_mut(from)
            .and_then(|p| p.session.as_mut())
            .map(|s| &mut s.ice)
    }

    /// A peer's `Facts` message (the peer is managed).
    pub(super) fn handle_facts(&mut self, now: Instant, from: PeerKey, nat: &str) {
        match NatFacts::from_wire(nat) {
            Ok(f) => {
                let Some(p) = self.peers.get_mut(&from) else {
                    return;
                };
                if p.remote_nat.as_ref() != Some(&f) {
                    tracing::debug!(peer = %from, nat = %f.summary(), "peer's NAT facts");
                }
                p.remote_nat = Some(f);
                self.tell_session_nat(now, from);
            }
            Err(e) => self.refuse(now, &from, Refusal::BadField(e)),
        }
    }

    /// Gives `key`'s session both sides' facts (for its reasons).
    pub(super) fn tell_session_nat(&mut self, now: Instant, key: PeerKey) {
        let local = self.nat.as_ref().map(|(f, _)| f.clone());
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        let remote = p.remote_nat.clone();
        if let Some(s) = p.session.as_mut() {
            s.ice.set_nat_facts(now, local, remote);
        }
    }

    /// A session's coordinated punch asks for its NAT's counter: a fresh
    /// socket's Binding to a relay we reach over UDP whose answer gave us
    /// an IPv4 server-reflexive address.
    pub(super) fn measure_mapping(&mut self, now: Instant, key: PeerKey) {
        let server = self
            .relays
            .iter()
            .find(|r| !r.stream && r.mapped.is_some_and(|m| m.is_ipv4()))
            .map(|r| r.spec.server);
        match server {
            Some(server) => self
                .out
                .push_back(Output::MeasureMapping { peer: key, server }),
            None => self.handle_mapping(now, key, None),
        }
    }

    /// What [`Output::MeasureMapping`] found for `key`'s session.
    pub fn handle_mapping(&mut self, now: Instant, key: PeerKey, mapped: Option<SocketAddr>) {
        if let Some(s) = self.peers.get_mut(&key).and_then(|p| p.session.as_mut()) {
            s.ice.handle_mapping(now, mapped);
            self.drain_session(now, &key);
        }
    }

    /// Sends a session's punch message in its current session.
    pub(super) fn send_punch(&mut self, key: PeerKey, m: Msg) {
        self.signal_session(key, |session| match m {
            Msg::Offer(p) => PeerMessage::PunchOffer {
                session,
                port: p.port,
                delta: p.delta,
            },
            Msg::Answer(p) => PeerMessage::PunchAnswer {
                session,
                port: p.port,
                delta: p.delta,
            },
            Msg::Go => PeerMessage::PunchGo { session },
        });
    }

    /// A peer's punch message (fields validated): only for the session it
    /// names; an offer too soon after the last, or from the side that
    /// should answer, is refused.
    pub(super) fn handle_punch(&mut self, now: Instant, from: PeerKey, session: u64, m: Msg) {
        let Some(s) = self.named_session(&from, session) else {
            return;
        };
        if let Err(e) = s.handle_punch(now, m) {
            self.refuse(now, &from, Refusal::BadField(e.to_string()));
        }
        self.drain_session(now, &from);
    }

    /// Sends a session's birthday message in its current session.
    pub(super) fn send_birthday(&mut self, key: PeerKey, m: crate::birthday::Msg) {
        self.signal_session(key, |session| match m {
            crate::birthday::Msg::Ready { sockets } => {
                PeerMessage::BirthdayReady { session, sockets }
            }
            crate::birthday::Msg::Done { probes, won } => PeerMessage::BirthdayDone {
                session,
                probes,
                won,
            },
        });
    }

    /// A peer's birthday message (fields validated), for the session it
    /// names.
    pub(super) fn handle_birthday(
        &mut self,
        now: Instant,
        from: PeerKey,
        session: u64,
        m: crate::birthday::Msg,
    ) {
        let Some(s) = self.named_session(&from, session) else {
            return;
        };
        s.handle_birthday(now, m);
        self.drain_session(now, &from);
    }

    /// The driver opened `n` birthday sockets for `key`'s session.
    pub fn birthday_opened(&mut self, now: Instant, key: PeerKey, n: u16) {
        if let Some(s) = self.peers.get_mut(&key).and_then(|p| p.session.as_mut()) {
            s.ice.handle_sockets_opened(now, n);
            self.drain_session(now, &key);
        }
    }

    /// A birthday socket of `key` (local `port`, registered by the driver
    /// as `socket`) received from the peer: it carries the session's new
    /// host candidate. Returns `false` when nobody takes it (the driver
    /// then closes it and frees `socket`).
    pub fn birthday_hit(&mut self, now: Instant, key: PeerKey, port: u16, socket: usize) -> bool {
        let Some(ip) = self
            .opts
            .host
            .iter()
            .map(|n| n.addr())
            .find(|a| a.is_ipv4())
        else {
            return false;
        };
        let local = SocketAddr::new(ip, port);
        let Some(s) = self.peers.get_mut(&key).and_then(|p| p.session.as_mut()) else {
            return false;
        };
        if !s.ice.handle_birthday_hit(now, local) {
            return false;
        }
        self.sockets.insert(local, socket);
        self.socket_owner
            .entry(key)
            .or_default()
            .push((local, socket));
        self.drain_session(now, &key);
        true
    }

    /// A datagram that arrived on one of the agent's other sockets (a
    /// birthday socket) at `local`: as [`Agent::handle_datagram`], but
    /// never from a relay, and only for the peer the socket was won for
    /// (another peer behind the same public address could otherwise meet
    /// it and take a socket whose NAT mapping is not its own).
    pub fn handle_datagram_at<'a>(
        &mut self,
        now: Instant,
        source: SocketAddr,
        local_port: u16,
        data: &'a [u8],
    ) -> Option<(PeerKey, &'a [u8])> {
        let (peer, local) = self.socket_owner.iter().find_map(|(k, v)| {
            v.iter()
                .find(|(a, _)| a.port() == local_port)
                .map(|(a, _)| (*k, *a))
        })?;
        self.handle_peer_datagram(now, source, local, data, Some(peer))
    }

    /// `key`'s session ends: its birthday sockets go (unhit ones and
    /// winners).
    pub(super) fn release_sockets(&mut self, key: PeerKey) {
        let had_session = self.peers.get(&key).is_some_and(|p| p.session.is_some());
        if had_session {
            self.out.push_back(Output::BirthdayClose { peer: key });
        }
        for (local, socket) in self.socket_owner.remove(&key).unwrap_or_default() {
            self.sockets.remove(&local);
            self.out
                .push_back(Output::BirthdayRelease { peer: key, socket });
        }
    }
}
