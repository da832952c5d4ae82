//! The deterministic world shared by the agent-core simulations: two
//! agents, a virtual clock, a modelled network (datagrams between host
//! addresses, 1 ms) and a modelled signaling service (sealed messages
//! delivered in 20 ms).
#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ice_agent::agent::{Agent, AgentOptions, Output, PeerKey, PeerRoute};
use ice_agent::PathKind;
use signaling::seal::PeerMessage;

pub const KA: PeerKey = signaling::PublicKey([0xAA; 32]);
pub const KB: PeerKey = signaling::PublicKey([0xBB; 32]);

pub fn opts(key: PeerKey, host: &str, auto: bool, peers: Vec<PeerKey>) -> AgentOptions {
    AgentOptions {
        public_key: key,
        wg_port: Some(51820),
        port: 51821,
        host: vec![host.parse().expect("net")],
        relays: Vec::new(),
        auto_peers: auto,
        peers: peers.into_iter().map(|k| (k, Vec::new())).collect(),
        vanish_after: Duration::from_secs(60),
        session_epoch: 1_700_000_000_000,
        ..AgentOptions::default()
    }
}

#[derive(Default)]
pub struct Seen {
    pub routes: Vec<(PeerKey, PeerRoute)>,
    pub added: Vec<PeerKey>,
    pub removed: Vec<PeerKey>,
    pub allowed: Vec<(PeerKey, Vec<ipnet::IpNet>)>,
    pub offers: usize,
    /// Every datagram sent: (to, bytes).
    pub sent: Vec<(SocketAddr, Vec<u8>)>,
}

pub struct World {
    pub now: Instant,
    pub agents: [Agent; 2],
    pub ips: [IpAddr; 2],
    pub keys: [PeerKey; 2],
    /// (deliver at, to agent, from address, bytes)
    pub net: VecDeque<(Instant, usize, SocketAddr, Vec<u8>)>,
    /// (deliver at, to agent, from key, message)
    pub sig: VecDeque<(Instant, usize, PeerKey, PeerMessage)>,
    pub seen: [Seen; 2],
    /// Drop every datagram (a dead network).
    pub cut: bool,
    /// Hold signaling messages and deliver them in reverse order once.
    pub reverse_next_batch: bool,
    /// Lose this many of the next signaling messages.
    pub lose_signals: usize,
}

impl World {
    pub fn new(a: AgentOptions, b: AgentOptions) -> World {
        let now = Instant::now();
        let ips = [a.host[0].addr(), b.host[0].addr()];
        let keys = [a.public_key, b.public_key];
        World {
            agents: [Agent::new(a, now), Agent::new(b, now)],
            now,
            ips,
            keys,
            net: VecDeque::new(),
            sig: VecDeque::new(),
            seen: [Seen::default(), Seen::default()],
            cut: false,
            reverse_next_batch: false,
            lose_signals: 0,
        }
    }

    pub fn drain(&mut self) {
        for i in 0..2 {
            while let Some(o) = self.agents[i].poll_output() {
                match o {
                    Output::Send { to, data } => {
                        self.seen[i].sent.push((to, data.clone()));
                        let j = if to.ip() == self.ips[0] { 0 } else { 1 };
                        if !self.cut && to.ip() == self.ips[j] {
                            let from = SocketAddr::new(self.ips[i], 51821);
                            self.net.push_back((
                                self.now + Duration::from_millis(1),
                                j,
                                from,
                                data,
                            ));
                        }
                    }
                    Output::Signal { to, message } => {
                        if matches!(message, PeerMessage::Offer { .. }) {
                            self.seen[i].offers += 1;
                        }
                        if self.lose_signals > 0 {
                            self.lose_signals -= 1;
                            continue;
                        }
                        // Members outside the world (hostile ones the
                        // test plays by hand) receive nothing.
                        let Some(j) = self.keys.iter().position(|k| *k == to) else {
                            continue;
                        };
                        let at = self.now + Duration::from_millis(20);
                        self.sig.push_back((at, j, self.keys[i], message));
                    }
                    Output::Route { peer, route } => self.seen[i].routes.push((peer, route)),
                    Output::PeerAdded { peer, .. } => self.seen[i].added.push(peer),
                    Output::PeerRemoved { peer } => self.seen[i].removed.push(peer),
                    Output::AllowedIps { peer, allowed_ips } => {
                        self.seen[i].allowed.push((peer, allowed_ips))
                    }
                    // No relay in this world (so nobody measures a NAT).
                    Output::RelayConnect { .. }
                    | Output::RelayClose { .. }
                    | Output::MeasureMapping { .. }
                    | Output::BirthdayOpen { .. }
                    | Output::BirthdayClose { .. }
                    | Output::BirthdayRelease { .. }
                    | Output::SendFrom { .. } => {}
                }
            }
        }
    }

    pub fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.drain();
            if self.reverse_next_batch && self.sig.len() >= 2 {
                self.reverse_next_batch = false;
                let v: Vec<_> = self.sig.drain(..).collect();
                let at = self.now + Duration::from_millis(20);
                for (_, j, from, m) in v.into_iter().rev() {
                    self.sig.push_back((at, j, from, m));
                }
            }
            while self.net.front().is_some_and(|p| p.0 <= self.now) {
                let (_, j, from, data) = self.net.pop_front().expect("front");
                let local = Some(self.ips[j]);
                let _ = self.agents[j].handle_datagram(self.now, from, local, &data);
            }
            while self.sig.front().is_some_and(|m| m.0 <= self.now) {
                let (_, j, from, m) = self.sig.pop_front().expect("front");
                self.agents[j].handle_message(self.now, from, m);
            }
            if self
                .agents
                .iter_mut()
                .any(|a| a.poll_timeout().is_some_and(|t| t <= self.now))
            {
                for a in &mut self.agents {
                    a.handle_timeout(self.now);
                }
            }
            self.drain();
            self.now += Duration::from_millis(5);
        }
    }

    pub fn path(&self, i: usize) -> (PathKind, String) {
        let st = self.agents[i].status(self.now);
        st.first()
            .map(|(_, r, _)| (r.path, r.reason.clone()))
            .unwrap_or((PathKind::Connecting, "no peer".into()))
    }

    pub fn last_route(&self, i: usize) -> Option<PeerRoute> {
        self.seen[i].routes.last().map(|r| r.1)
    }

    pub fn online(&mut self) {
        let (a, b) = (self.keys[0], self.keys[1]);
        self.agents[0].handle_member(self.now, b, &["10.8.0.2/32".into()]);
        self.agents[1].handle_member(self.now, a, &["10.8.0.1/32".into()]);
    }
}
