//! One ICE session per WireGuard peer, and the path policy on top of it.
//!
//! [`PeerSession`] wraps an [`is::IceAgent`] and decides which pair carries
//! WireGuard: the relay at once, a direct pair as soon as one works, back to
//! the relay within seconds when the direct pair goes silent, and direct
//! again (retried with bounded backoff) when it answers; and away from a
//! direct pair that answers checks but loses data or big datagrams
//! ([`crate::blackhole`]).
//!
//! # Run loop
//!
//! Like `is`, the session never reads the clock and owns no socket. After
//! any call that mutates it (`add_*`, `handle_stun`, `note_data_rx`,
//! `note_data_tx`, `handle_timeout`), drain [`PeerSession::poll_transmit`] and
//! [`PeerSession::poll_event`] until they return `None`, then sleep until
//! [`PeerSession::poll_timeout`] and call [`PeerSession::handle_timeout`].

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use is::stun::{StunMessage, StunPacket, TransId};
use is::{Candidate, CandidateKind, IceAgent, IceAgentEvent, IceConnectionState, IceCreds};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::blackhole::{self, Blackhole, BlackholeConfig, BlackholeStats, Cause};
use crate::netcheck::{Filtering, Mapping, NatFacts, PortAllocation};
use crate::path::{classify, is_private, PathKind, WgicePreference};

/// Errors the session reports to its caller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// `is` refused the candidate (bad address, or a `candidate:` line that
    /// does not parse).
    #[error("bad ICE candidate: {0}")]
    BadCandidate(#[from] is::IceError),
    /// The local candidate was redundant with a better one already known.
    #[error("local candidate {0} is redundant with a better one already added")]
    RedundantCandidate(SocketAddr),
}

/// Which side of the pair sends USE-CANDIDATE.
///
/// Both peers compute this from the two WireGuard public keys, so they
/// always agree without a round trip: the side with the larger key
/// controls. Equal keys are a configuration error the caller must reject
/// before (a peer is never itself); this returns `false` for them.
pub fn is_controlling(local_public_key: &[u8; 32], remote_public_key: &[u8; 32]) -> bool {
    local_public_key > remote_public_key
}

mod probing;
mod punching;

/// How long a pair that stopped answering is remembered.
const SEEN_HORIZON: Duration = Duration::from_secs(600);

/// RTT margin below which two paths of the same kind count as equal.
const RTT_MARGIN: f64 = 0.10;
/// Ports predicted past the peer's newest known mapping (port prediction):
/// the new mappings its NAT may make between that one and its first check
/// to us (its netcheck, checks to our other candidates, other hosts behind
/// it).
pub(crate) const PREDICT_WINDOW: u16 = 24;
/// A newer mapping of the peer's NAT counts only this far past its
/// server-reflexive port (in the direction of its step).
const FRESH_BASE_MAX: i64 = 4096;

/// How many of the peer NAT's steps `base + k × delta` lies past its
/// server-reflexive port `srflx`.
fn along_steps(base: SocketAddr, srflx: SocketAddr, delta: i32, k: i32) -> i64 {
    let port = i64::from(base.port()) + i64::from(delta) * i64::from(k);
    (port - i64::from(srflx.port())) * i64::from(delta.signum())
}

/// Whether the data path should move from a working path to another one
/// `is` nominated: always to a better kind, never to a worse one, and
/// between paths of the same kind only when the new one is more than 10 %
/// faster (Tailscale ignores < 1 %, iroh needs 5 ms; 10 % keeps jitter on a
/// busy link from flapping the WireGuard endpoint).
pub fn should_switch(
    current: PathKind,
    current_rtt: Option<Duration>,
    candidate: PathKind,
    candidate_rtt: Option<Duration>,
) -> bool {
    if candidate.rank() != current.rank() {
        return candidate.rank() > current.rank();
    }
    match (current_rtt, candidate_rtt) {
        (Some(c), Some(n)) => n.mul_f64(1.0 + RTT_MARGIN) < c,
        _ => false,
    }
}

/// How to send a datagram the session asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    /// From the agent's UDP socket, whose local address is the transmit's
    /// `source`.
    Socket,
    /// Through our TURN allocation whose relayed address is `relayed` (the
    /// transmit's `source`): as ChannelData or a Send indication to the
    /// destination.
    Turn {
        /// Our relayed address (the allocation to use).
        relayed: SocketAddr,
    },
}

/// A datagram the session wants sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Local address it leaves from (a host candidate, or our relayed address).
    pub source: SocketAddr,
    /// Remote address it goes to.
    pub destination: SocketAddr,
    /// How to send it.
    pub via: Via,
    /// The STUN message.
    pub contents: Vec<u8>,
}

/// Where WireGuard traffic to this peer goes now, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathStatus {
    /// The kind of path.
    pub kind: PathKind,
    /// Local address to send from (`None` while connecting).
    pub local: Option<SocketAddr>,
    /// Remote address to send to (`None` while connecting).
    pub remote: Option<SocketAddr>,
    /// How to send on it.
    pub via: Via,
    /// Why the peer is on this path, for humans: "direct (LAN 10.0.1.0/24)",
    /// "relayed while direct checks run", …
    pub reason: String,
    /// When the data path last changed.
    pub since: Instant,
    /// Last measured STUN round-trip time on this pair.
    pub rtt: Option<Duration>,
    /// Set while a direct pair is left because it is a blackhole (boxed:
    /// rare, and events carry this struct).
    pub blackhole: Option<Box<BlackholeInfo>>,
}

/// A direct pair left because it answers checks but loses what matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlackholeInfo {
    /// The pair left, (local, remote).
    pub pair: (SocketAddr, SocketAddr),
    /// What was found.
    pub cause: Cause,
    /// The peer found it and told us.
    pub by_peer: bool,
    /// When direct is tried again.
    pub until: Instant,
}

/// [`BlackholeInfo`] as status output shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BlackholeReport {
    /// `"data"` (answers checks, drops WireGuard data) or `"mtu"` (drops
    /// big datagrams).
    pub kind: String,
    /// MTU: the largest UDP payload the size sweep got through.
    pub largest_ok: Option<u16>,
    /// The pair left, `local→remote`.
    pub pair: String,
    /// The peer found it (and told us).
    pub by_peer: bool,
    /// Seconds until direct is tried again.
    pub retry_in_secs: u64,
}

impl PathStatus {
    /// The serialisable form for `ice-agent status --json` (the daemon adds
    /// the peer's public key and byte counters).
    pub fn report(&self, now: Instant) -> PathReport {
        PathReport {
            path: self.kind,
            reason: self.reason.clone(),
            local: self.local,
            remote: self.remote,
            via_relay: matches!(self.via, Via::Turn { .. }),
            rtt_ms: self.rtt.map(|r| r.as_secs_f64() * 1000.0),
            since_secs: now.saturating_duration_since(self.since).as_secs(),
            blackhole: self.blackhole.as_deref().map(|b| BlackholeReport {
                kind: match b.cause {
                    Cause::Data => "data".into(),
                    Cause::Mtu { .. } => "mtu".into(),
                },
                largest_ok: match b.cause {
                    Cause::Mtu { largest_ok } => largest_ok,
                    Cause::Data => None,
                },
                pair: format!("{}→{}", b.pair.0, b.pair.1),
                by_peer: b.by_peer,
                retry_in_secs: b.until.saturating_duration_since(now).as_secs(),
            }),
        }
    }
}

/// A [`PathStatus`] as status output shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PathReport {
    /// `"connecting"`, `"lan"`, `"direct"` or `"relay"`.
    pub path: PathKind,
    /// Why the peer is on this path.
    pub reason: String,
    /// Local address of the pair.
    pub local: Option<SocketAddr>,
    /// Remote address of the pair.
    pub remote: Option<SocketAddr>,
    /// Whether traffic leaves through our TURN allocation.
    pub via_relay: bool,
    /// Last STUN round-trip time on the pair, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Seconds on this path.
    pub since_secs: u64,
    /// Why a direct pair was left as a blackhole (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blackhole: Option<BlackholeReport>,
}

/// Something the driver should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// The data path changed: point WireGuard (or the proxy) at it.
    PathChanged(PathStatus),
    /// The session gave up on the current direct pairs and re-formed all
    /// candidate pairs to try direct again (the bounded backoff).
    DirectRetry {
        /// 1 for the first retry since direct last worked.
        attempt: u32,
        /// Delay until the next retry if this one fails too.
        next_in: Duration,
    },
    /// `is`'s connection state changed (informational).
    IceState(IceConnectionState),
    /// An authenticated answer on a host pair reports another address for
    /// us than the previous answer on the same pair: our NAT rebound.
    MappingChanged {
        /// Our end of the pair.
        local: SocketAddr,
        /// Where the peer saw us before.
        old: SocketAddr,
        /// Where it sees us now.
        new: SocketAddr,
    },
    /// Coordinated punch (both NATs sequential symmetric): measure our
    /// NAT's counter now (a Binding from a fresh socket to a relay) and
    /// report it with [`PeerSession::handle_mapping`].
    MeasureMapping,
    /// Coordinated punch: send this to the peer through signaling.
    Punch(crate::punch::Msg),
    /// Birthday probing (our NAT random symmetric): open `count` fresh
    /// sockets, send an opener from each to `target` (the peer's
    /// server-reflexive address) and keep their mappings alive; report
    /// with [`PeerSession::handle_sockets_opened`], and a socket that
    /// receives from `target` with [`PeerSession::handle_birthday_hit`].
    OpenSockets {
        /// Where the sockets send.
        target: SocketAddr,
        /// How many.
        count: u16,
    },
    /// Birthday probing: close the sockets of [`SessionEvent::OpenSockets`]
    /// (except one already reported as hit, which carries the path).
    CloseSockets,
    /// Birthday probing: send this to the peer through signaling.
    Birthday(crate::birthday::Msg),
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Changes of the data path (any field of pair or kind).
    pub path_changes: u64,
    /// Times the data path fell back from direct to relay because the direct
    /// pair went silent.
    pub failovers: u64,
    /// Times candidate pairs were re-formed to retry direct.
    pub direct_retries: u64,
    /// Connectivity checks sent on non-relay pairs.
    pub direct_checks_sent: u64,
    /// STUN packets handed to `handle_stun` that were not for this session.
    pub stun_rejected: u64,
    /// Blackhole probes refused (garbled attribute, bad credentials or
    /// integrity, or an answer to nothing we sent).
    pub probes_rejected: u64,
    /// Blackhole detection's counters.
    pub blackhole: BlackholeStats,
    /// Remote candidates predicted (port prediction; 0: not used).
    pub predicted: u64,
    /// Coordinated punch attempts (as offerer or answerer).
    pub punch_attempts: u64,
    /// Openers sent by coordinated punches.
    pub punch_openers: u64,
    /// The peer's openers that reached us.
    pub openers_received: u64,
    /// Birthday probing attempts (either side).
    pub birthday_attempts: u64,
    /// Birthday probes sent.
    pub birthday_probes: u64,
}

/// Configuration of a [`PeerSession`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionConfig {
    /// Our ICE credentials (`None`: random).
    pub local_credentials: Option<IceCreds>,
    /// Controlling role; see [`is_controlling`].
    pub controlling: bool,
    /// Networks of the node's own interfaces, to recognise same-LAN peers.
    pub local_networks: Vec<IpNet>,
    /// Keepalive check interval on working pairs (`is`'s max STUN RTO).
    pub keepalive_interval: Duration,
    /// First STUN retransmission timeout.
    pub initial_rto: Duration,
    /// Unanswered retransmits before `is` drops a pair.
    pub max_retransmits: usize,
    /// Pacing between two checks (`is`'s Ta).
    pub check_pacing: Duration,
    /// A direct path silent this long is replaced by the relay.
    pub failover_after: Duration,
    /// How long the first direct checks run before the session counts direct
    /// as failed and starts retrying with backoff.
    pub initial_direct_window: Duration,
    /// First retry interval for direct (doubles per retry).
    pub retry_initial: Duration,
    /// Retry interval cap.
    pub retry_max: Duration,
    /// Seed for the retry jitter (tests pass a fixed one).
    pub rng_seed: u64,
    /// Our port-mapped address (ranked above STUN's server-reflexive one).
    pub port_mapped: Option<SocketAddr>,
    /// Blackhole detection on the direct pair that carries data (`None`:
    /// off; probes from the peer are still answered).
    pub blackhole: Option<BlackholeConfig>,
}

impl SessionConfig {
    /// Defaults: 500 ms keepalives, failover after 1.5 s of silence, direct
    /// retried at 2 s doubling to 60 s with up to 15 % jitter.
    pub fn new(controlling: bool, rng_seed: u64) -> Self {
        SessionConfig {
            local_credentials: None,
            controlling,
            local_networks: Vec::new(),
            keepalive_interval: Duration::from_millis(500),
            initial_rto: Duration::from_millis(250),
            max_retransmits: 9,
            check_pacing: Duration::from_millis(20),
            failover_after: Duration::from_millis(1500),
            initial_direct_window: Duration::from_secs(5),
            retry_initial: Duration::from_secs(2),
            retry_max: Duration::from_secs(60),
            rng_seed,
            port_mapped: None,
            blackhole: Some(BlackholeConfig::default()),
        }
    }
}

/// Per-pair bookkeeping keyed by (local base, remote address).
#[derive(Debug, Default, Clone, Copy)]
struct PairSeen {
    /// Last STUN or data received on the pair (keeps a path alive).
    last_rx: Option<Instant>,
    /// Last success response to one of our checks (proves both directions).
    last_response: Option<Instant>,
    rtt: Option<Duration>,
    /// Our address as the peer last saw it on this pair (host pairs).
    mapped: Option<SocketAddr>,
    /// An authenticated STUN message (check or answer) came on the pair.
    authenticated: bool,
}

type PairKey = (SocketAddr, SocketAddr);

/// A relay pair hearing the peer from a new port of the same address
/// replaces the current pair when that one has been silent this much
/// longer ...
const REBIND_SILENT: Duration = Duration::from_millis(250);
/// ... and the new one heard within this.
const REBIND_FRESH: Duration = Duration::from_millis(500);

/// What the agent's relay health says (`agent/relays.rs`), for choosing
/// among relayed pairs when several relays are configured. The default (all
/// empty) leaves the choice to the pairs' own answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayView {
    /// Our relayed addresses on the chosen relay (lowest latency, healthy).
    pub preferred: Vec<SocketAddr>,
    /// IPs of the chosen relay (its server and relayed addresses): a peer's
    /// relayed candidate there makes the shortest relayed path.
    pub preferred_ips: Vec<IpAddr>,
    /// Our relayed addresses on relays that are down.
    pub down: Vec<SocketAddr>,
    /// IPs of the relays that are down: a peer's relayed candidate there is
    /// dead too.
    pub down_ips: Vec<IpAddr>,
}

/// Why the data path is on the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RelayCause {
    /// Direct checks are still running.
    Checking,
    /// The direct pair went silent.
    Failover {
        local: SocketAddr,
        remote: SocketAddr,
    },
    /// Direct checks ran out without an answer.
    NoDirect,
}

/// Bounded exponential backoff with jitter for direct retries.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: StdRng,
}

impl Backoff {
    fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next interval: initial · 2^attempt, capped, times a jitter factor
    /// in [0.85, 1.0] (never above the cap, never a synchronised storm).
    fn next_interval(&mut self) -> Duration {
        let shift = self.attempt.min(16);
        let base = self
            .initial
            .checked_mul(1u32 << shift)
            .unwrap_or(self.max)
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        base.mul_f64(self.rng.random_range(0.85..=1.0))
    }
}

/// ICE session with one WireGuard peer plus the path policy.
#[derive(Debug)]
pub struct PeerSession {
    ice: IceAgent,
    config: SessionConfig,
    /// Local candidates as we added them (kind lookup by address).
    local: Vec<Candidate>,
    /// Remote candidates as the peer signalled them.
    remote: Vec<Candidate>,
    /// The peer's relayed addresses replaced by a newer one on the same
    /// relay host (it re-allocated: roamed, rebound, or the relay
    /// restarted); never chosen again.
    superseded: Vec<SocketAddr>,
    /// Remote candidates this session predicted (port prediction against
    /// the peer's sequential symmetric NAT), with the step each is at.
    predicted: Vec<(SocketAddr, i32)>,
    /// The window started past the peer's server-reflexive port (`false`:
    /// past a newer mapping of its NAT that reached us).
    predicted_from_srflx: bool,
    /// Coordinated punch with a peer whose NAT is sequential symmetric
    /// like ours (`session/punching.rs`).
    punch: crate::punch::Punch,
    /// Remote candidates our openers aimed at: (address, opener index).
    punched: Vec<(SocketAddr, u16)>,
    /// Punch rounds that added candidates.
    punch_rounds: u32,
    /// Birthday probing with a peer whose NAT is random symmetric, or
    /// against ours (`session/probing.rs`).
    birthday: crate::birthday::Birthday,
    /// Our socket a birthday probe hit (a host candidate of this session).
    birthday_socket: Option<SocketAddr>,
    /// The direct pair birthday probing gave, and the probes it took.
    birthday_won: Option<(PairKey, Option<u32>)>,
    /// Sockets birthday probing won in this session.
    birthday_wins: u32,
    /// What `is` nominated last, (source, destination).
    nominated: Option<PairKey>,
    seen: HashMap<PairKey, PairSeen>,
    /// Our outstanding checks: transaction → (pair, sent at).
    checks: HashMap<TransId, (PairKey, Instant)>,
    path: PathStatus,
    relay_cause: RelayCause,
    first_remote_at: Option<Instant>,
    /// Set when direct was declared lost (failover or initial window over).
    direct_lost_at: Option<Instant>,
    next_retry_at: Option<Instant>,
    backoff: Backoff,
    /// Checks on non-relay pairs since direct last worked.
    direct_checks_since_ok: u64,
    /// Non-relay pairs those checks went to.
    direct_pairs_tried: Vec<PairKey>,
    /// Hints about NAT behaviour learned from checks (for reasons).
    local_nat_varies: bool,
    remote_nat_varies: bool,
    /// Both sides' published NAT facts (their netchecks), for reasons.
    local_nat: Option<NatFacts>,
    remote_nat: Option<NatFacts>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<SessionEvent>,
    stats: SessionStats,
    last_now: Instant,
    /// Relay health as the agent last told it.
    relays: RelayView,
    blackhole: Blackhole,
    /// Scratch for encoding probes.
    probe_buf: Vec<u8>,
}

impl PeerSession {
    /// A session in the `connecting` state.
    pub fn new(config: SessionConfig, now: Instant) -> Self {
        let creds = config
            .local_credentials
            .clone()
            .unwrap_or_else(IceCreds::new);
        let mut ice = IceAgent::new(creds);
        ice.set_controlling(config.controlling);
        ice.set_local_preference(WgicePreference {
            port_mapped: config.port_mapped,
        });
        ice.set_initial_stun_rto(config.initial_rto);
        ice.set_max_stun_rto(config.keepalive_interval);
        ice.set_max_stun_retransmits(config.max_retransmits);
        ice.set_timing_advance(config.check_pacing);
        ice.handle_timeout(now);
        let backoff = Backoff {
            initial: config.retry_initial,
            max: config.retry_max,
            attempt: 0,
            rng: StdRng::seed_from_u64(config.rng_seed),
        };
        let blackhole = Blackhole::new(
            config.blackhole.clone().unwrap_or_default(),
            config.rng_seed ^ 0xb1ac_4013,
        );
        let mut s = PeerSession {
            blackhole,
            probe_buf: Vec::new(),
            ice,
            local: Vec::new(),
            remote: Vec::new(),
            superseded: Vec::new(),
            predicted: Vec::new(),
            predicted_from_srflx: true,
            punch: crate::punch::Punch::new(),
            punched: Vec::new(),
            punch_rounds: 0,
            birthday: crate::birthday::Birthday::new(),
            birthday_socket: None,
            birthday_won: None,
            birthday_wins: 0,
            nominated: None,
            seen: HashMap::new(),
            checks: HashMap::new(),
            path: PathStatus {
                kind: PathKind::Connecting,
                local: None,
                remote: None,
                via: Via::Socket,
                reason: "connecting: waiting for the peer's candidates".into(),
                since: now,
                rtt: None,
                blackhole: None,
            },
            relay_cause: RelayCause::Checking,
            first_remote_at: None,
            direct_lost_at: None,
            next_retry_at: None,
            backoff,
            direct_checks_since_ok: 0,
            direct_pairs_tried: Vec::new(),
            local_nat_varies: false,
            remote_nat_varies: false,
            local_nat: None,
            remote_nat: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: SessionStats::default(),
            last_now: now,
            relays: RelayView::default(),
            config,
        };
        s.drain_ice(now);
        s
    }

    /// Our ICE credentials, to signal to the peer.
    pub fn local_credentials(&self) -> &IceCreds {
        self.ice.local_credentials()
    }

    /// The peer's ICE credentials (from its offer).
    pub fn set_remote_credentials(&mut self, now: Instant, creds: IceCreds) {
        self.ice.set_remote_credentials(creds);
        self.after_mutation(now);
    }

    /// `true` if this session controls nomination.
    pub fn controlling(&self) -> bool {
        self.ice.controlling()
    }

    /// Adds a local candidate (host, server-reflexive or relayed) and returns
    /// it as it must be trickled to the peer (`to_sdp_string()`).
    ///
    /// A relayed candidate's address is our TURN relayed address; checks
    /// and data from it go through the allocation ([`Via::Turn`]).
    pub fn add_local_candidate(
        &mut self,
        now: Instant,
        candidate: Candidate,
    ) -> Result<Candidate, SessionError> {
        let addr = candidate.addr();
        let added = self
            .ice
            .add_local_candidate(candidate)
            .cloned()
            .ok_or(SessionError::RedundantCandidate(addr))?;
        self.local.push(added.clone());
        self.after_mutation(now);
        Ok(added)
    }

    /// Our port-mapped address changed: candidates added from now on are
    /// ranked with it (add the mapped candidate after this).
    pub fn set_port_mapped(&mut self, mapped: Option<SocketAddr>) {
        self.ice.set_local_preference(WgicePreference {
            port_mapped: mapped,
        });
    }

    /// Withdraws a local candidate (an interface went away, a TURN
    /// allocation was lost). Pairs using it are dropped; if it carried the
    /// data path, the policy picks another one at once.
    pub fn remove_local_candidate(&mut self, now: Instant, candidate: &Candidate) -> bool {
        let removed = self.ice.invalidate_candidate(candidate);
        self.local
            .retain(|c| !(c.addr() == candidate.addr() && c.kind() == candidate.kind()));
        if self.nominated.is_some_and(|(l, _)| l == candidate.addr()) {
            self.nominated = None;
        }
        self.seen.retain(|(l, _), _| *l != candidate.addr());
        self.after_mutation(now);
        removed
    }

    /// Tries direct again right now and restarts the backoff from its
    /// first step: for the driver to call after a network change or a wake
    /// from sleep, when waiting out a 60 s backoff would be wrong.
    pub fn retry_direct_now(&mut self, now: Instant) {
        self.backoff.reset();
        self.retry_direct(now);
    }

    /// Adds a candidate the peer trickled; `false` if it was known already
    /// (a repeated offer), in which case nothing changes.
    pub fn add_remote_candidate(&mut self, now: Instant, candidate: Candidate) -> bool {
        if self.first_remote_at.is_none() {
            self.first_remote_at = Some(now);
        }
        if self
            .remote
            .iter()
            .any(|c| c.addr() == candidate.addr() && c.kind() == candidate.kind())
        {
            return false;
        }
        let direct_kind = candidate.kind() != CandidateKind::Relayed;
        if !direct_kind {
            // An agent holds one allocation per relay: a new relayed address
            // on the same host replaces the old one, whose traffic now goes
            // to where the peer was. Leave it at once instead of after
            // `failover_after` of silence.
            let a = candidate.addr();
            for c in &self.remote {
                if c.kind() == CandidateKind::Relayed
                    && c.addr().ip() == a.ip()
                    && c.addr() != a
                    && !self.superseded.contains(&c.addr())
                {
                    self.superseded.push(c.addr());
                }
            }
        }
        let srflx = candidate.kind() == CandidateKind::ServerReflexive;
        self.remote.push(candidate.clone());
        self.ice.add_remote_candidate(candidate);
        if srflx {
            self.predict(now);
        }
        // A new direct candidate from a peer that was direct before, or
        // whose checks had run out: it moved (roamed, got a new mapping) or
        // gained a network. `is` does not nominate again on its own once
        // it nominated, so the pairs are formed afresh and checked now. At
        // the start of a session the candidates just trickle in.
        let had_direct = self.path.kind.is_direct()
            || matches!(
                self.relay_cause,
                RelayCause::Failover { .. } | RelayCause::NoDirect
            );
        if direct_kind && had_direct {
            self.retry_direct_now(now);
        } else {
            self.after_mutation(now);
        }
        true
    }

    /// Adds a candidate the peer trickled as an SDP `candidate:` line;
    /// returns its address and whether it was new.
    pub fn add_remote_candidate_sdp(
        &mut self,
        now: Instant,
        line: &str,
    ) -> Result<(SocketAddr, bool), SessionError> {
        let c = Candidate::from_sdp_string(line)?;
        let addr = c.addr();
        let new = self.add_remote_candidate(now, c);
        Ok((addr, new))
    }

    /// Handles a STUN datagram received on `destination` (a local host
    /// address, or our relayed address for data the relay passed up) from
    /// `source`. Returns `false` if it is not for this session (wrong
    /// credentials, unknown transaction, not STUN): the caller may offer it
    /// to another session or count and drop it.
    pub fn handle_stun(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        datagram: &[u8],
    ) -> bool {
        match blackhole::parse(datagram) {
            Ok(None) => {}
            Ok(Some(probe)) => return self.handle_probe(now, source, destination, &probe),
            Err(e) => {
                self.stats.probes_rejected += 1;
                tracing::debug!(%source, "blackhole probe refused: {e}");
                return false;
            }
        }
        if crate::punch::is_opener(datagram) {
            return self.handle_opener(source);
        }
        let Ok(message) = StunMessage::parse(datagram) else {
            self.stats.stun_rejected += 1;
            return false;
        };
        if !self.ice.accepts_message(&message) {
            self.stats.stun_rejected += 1;
            return false;
        }
        let key = (destination, source);
        let is_response = message.is_successful_binding_response();
        let mapped = message.mapped_address();
        if is_response {
            if let Some((pair, sent)) = self.checks.remove(&message.trans_id()) {
                self.seen.entry(pair).or_default().rtt = Some(now.saturating_duration_since(sent));
            }
            self.note_mapped(mapped, destination);
        } else if message.is_binding_request() {
            self.note_remote_source(source);
        }
        let packet = StunPacket {
            proto: is::Protocol::Udp,
            source,
            destination,
            message,
        };
        let accepted = self.ice.handle_packet(now, packet);
        if accepted {
            let relayed = self.is_local_relayed(destination);
            let seen = self.seen.entry(key).or_default();
            seen.last_rx = Some(now);
            seen.authenticated = true;
            if is_response {
                seen.last_response = Some(now);
                // The same pair now sees us at another address: our NAT
                // forgot the mapping (rebinding) and made a new one. No
                // kernel event tells; the agent re-checks its allocations.
                if let (Some(new), false) = (mapped, relayed) {
                    if let Some(old) = seen.mapped.replace(new).filter(|old| *old != new) {
                        tracing::debug!(%old, %new, local = %destination, remote = %source, "our mapping on a pair changed");
                        self.events.push_back(SessionEvent::MappingChanged {
                            local: destination,
                            old,
                            new,
                        });
                    }
                }
            }
        }
        if accepted && self.predicted.is_empty() && self.remote_nat.is_some() {
            // The first authenticated packet from the peer's address may be
            // what port prediction waited for.
            self.predict(now);
        }
        self.after_mutation(now);
        accepted
    }

    /// Records that a WireGuard packet from `source` arrived on `destination`
    /// (a local host address, or our relayed address): traffic keeps a path
    /// alive just as STUN does. O(1) while the pair is alive, so it can be
    /// called for every packet.
    pub fn note_data_rx(&mut self, now: Instant, source: SocketAddr, destination: SocketAddr) {
        // The count the peer's blackhole probes ask for: every packet the
        // driver attributes to this peer.
        self.blackhole.note_rx();
        let key = (destination, source);
        // Only pairs we know of: data from anywhere else is not evidence.
        let known = self.seen.contains_key(&key)
            || self.path.local == Some(destination) && self.path.remote == Some(source);
        if known {
            let was_alive = self.alive(key, now);
            self.seen.entry(key).or_default().last_rx = Some(now);
            // Hot path (every WireGuard packet): a pair that was already
            // alive stays alive, which changes no decision.
            if !was_alive {
                self.evaluate(now);
            }
        }
    }

    /// Both sides' NAT facts as published (ours from the daemon's
    /// netcheck, the peer's from its `Facts` message); reasons use them.
    pub fn set_nat_facts(
        &mut self,
        now: Instant,
        local: Option<NatFacts>,
        remote: Option<NatFacts>,
    ) {
        if self.local_nat == local && self.remote_nat == remote {
            return;
        }
        self.local_nat = local;
        self.remote_nat = remote;
        self.predict(now);
        self.after_mutation(now);
    }

    /// Port prediction (the peer's NAT is symmetric with sequential ports,
    /// ours endpoint-independent, both by the published netchecks): the
    /// peer's NAT will give its checks to our server-reflexive address the
    /// next ports after its own server-reflexive one, so
    /// [`PREDICT_WINDOW`] candidates at those ports are added (once per
    /// session). Our checks to them open our NAT's filter for the port the
    /// peer's mapping gets, and its checks (or our retransmits) meet. Only
    /// ever sent to the peer's own public address, at the session's check
    /// pacing; the pairs are dropped like any other when they fail.
    fn predict(&mut self, now: Instant) {
        if !self.predicted.is_empty() {
            return;
        }
        let Some(delta) = self
            .remote_nat
            .as_ref()
            .and_then(|f| match f.port_allocation {
                Some(PortAllocation::Sequential { delta, .. }) if f.symmetric() => Some(delta),
                _ => None,
            })
        else {
            return;
        };
        // Our own mapping must be the same for every destination (checks
        // to a window of ports would each open a new one otherwise), and
        // our NAT must filter by port (without a NAT, or with a cone that
        // lets the peer's address in, its checks reach us anyway).
        let ours = self.local_nat.as_ref().is_some_and(|f| {
            f.udp
                && f.mapping == Some(Mapping::EndpointIndependent)
                && matches!(f.filtering, None | Some(Filtering::AddressAndPortDependent))
        });
        if !ours {
            return;
        }
        // Only around an address the peer has proven to be its own (an
        // authenticated check or answer came from it; plain data could be
        // spoofed), so a member cannot point 24 ports' worth of checks at
        // somebody else's address.
        let proven = |ip: IpAddr| {
            self.seen
                .iter()
                .any(|((_, r), s)| r.ip() == ip && s.authenticated)
        };
        let Some(srflx) = self
            .remote
            .iter()
            .find(|c| c.kind() == CandidateKind::ServerReflexive && proven(c.addr().ip()))
            .cloned()
        else {
            return;
        };
        // The newest mapping of the peer's NAT we have seen: its server-
        // reflexive port is as old as its relay allocation (hours, in a
        // long-running mesh, during which other flows moved the counter);
        // its checks to our relayed address came from mappings made just
        // now, and they are authenticated.
        let along =
            |p: u16| (i64::from(p) - i64::from(srflx.addr().port())) * i64::from(delta.signum());
        let base = self
            .seen
            .iter()
            .filter(|(_, s)| s.authenticated)
            .map(|((_, r), _)| *r)
            .filter(|r| r.ip() == srflx.addr().ip())
            .filter(|r| (0..=FRESH_BASE_MAX).contains(&along(r.port())))
            .max_by_key(|r| along(r.port()))
            .unwrap_or(srflx.addr());
        self.predicted_from_srflx = base == srflx.addr();
        // Past the server-reflexive port: the next ones. Around a newer
        // mapping: its checks to our server-reflexive address (the one to
        // meet) usually left before its checks to our relayed address, so
        // half the window lies before it (never back past the srflx port).
        let half = i32::from(PREDICT_WINDOW / 2);
        let steps: Vec<i32> = if self.predicted_from_srflx {
            (1..=i32::from(PREDICT_WINDOW)).collect()
        } else {
            (-half..=half)
                .filter(|&k| k != 0)
                .filter(|&k| along_steps(base, srflx.addr(), delta, k) > 0)
                .take(usize::from(PREDICT_WINDOW))
                .collect()
        };
        for k in steps {
            let port = i64::from(base.port()) + i64::from(delta) * i64::from(k);
            let Ok(port) = u16::try_from(port) else {
                continue;
            };
            if port < 1024 {
                continue;
            }
            let addr = SocketAddr::new(base.ip(), port);
            if self.remote.iter().any(|c| c.addr() == addr) {
                continue;
            }
            // Below the peer's own srflx (checked after it), above any
            // relayed candidate (so a pair that works is nominated); the
            // nearest steps first.
            let rank = k.unsigned_abs().min(0xff) * 2 + u32::from(k < 0);
            let prio = (100u32 << 24) | ((0xfff0 - rank) << 8) | 255;
            let c = Candidate::from_parts(
                if k < 0 {
                    format!("predm{}", -k)
                } else {
                    format!("pred{k}")
                },
                1,
                is::Protocol::Udp,
                prio,
                addr,
                CandidateKind::ServerReflexive,
                Some(base),
                None,
                None,
            );
            self.predicted.push((addr, k));
            self.remote.push(c.clone());
            self.ice.add_remote_candidate(c);
        }
        tracing::info!(peer_srflx = %srflx.addr(), %base, delta, window = PREDICT_WINDOW, "predicting the peer's NAT ports");
        if self.nominated.is_some() || self.path.kind == PathKind::Relay {
            // `is` nominates once: re-form the pairs so the new ones can win.
            self.retry_direct_now(now);
        }
    }

    /// Tells the session which relay the agent chose and which relays are
    /// down: relayed pairs over a down relay are left at once (without
    /// waiting for `failover_after` of silence), and a live pair over the
    /// chosen relay is preferred to pairs over the others.
    pub fn set_relays(&mut self, now: Instant, view: RelayView) {
        if self.relays != view {
            self.relays = view;
            self.last_now = self.last_now.max(now);
            self.evaluate(now);
        }
    }

    /// Whether a relayed pair runs over a relay the agent declared down.
    fn over_down_relay(&self, (local, remote): PairKey) -> bool {
        self.relays.down.contains(&local) || self.relays.down_ips.contains(&remote.ip())
    }

    /// Whether a pair starts on the chosen relay.
    fn on_preferred(&self, (local, _): PairKey) -> bool {
        self.relays.preferred.contains(&local)
    }

    /// The driver's cumulative count of WireGuard packets (or bytes) sent
    /// to this peer, and of datagrams above
    /// [`blackhole::LARGE_DATAGRAM`] bytes among them if it counts them;
    /// call it every 100 ms or so. Blackhole probes go out only while
    /// `total` grows, full-size ones only while `large` does (or, with
    /// `None`, while `total` does). O(1); changes
    /// [`PeerSession::poll_timeout`].
    pub fn note_data_tx(&mut self, now: Instant, total: u64, large: Option<u64>) {
        self.blackhole.note_tx(now, total, large);
    }

    /// Advances timers to `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Forget pairs silent for 10 minutes (old NAT mappings, peer-reflexive
        // addresses of a previous network), but never the path in use.
        let keep = [self.nominated, self.path.local.zip(self.path.remote)];
        self.seen.retain(|k, s| {
            keep.contains(&Some(*k))
                || s.last_rx
                    .is_some_and(|t| now.saturating_duration_since(t) < SEEN_HORIZON)
        });
        self.ice.handle_timeout(now);
        self.after_mutation(now);
        if let Some(at) = self.next_retry_at {
            if now >= at {
                self.retry_direct(now);
            }
        }
    }

    /// When to call [`PeerSession::handle_timeout`] next. Changes after any
    /// mutating call.
    #[must_use]
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let mut next = self.ice.poll_timeout();
        let last_now = self.last_now;
        // Only deadlines still ahead: one already passed has been acted on.
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t.filter(|t| *t > last_now) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        consider(self.next_retry_at);
        consider(self.blackhole.poll_timeout(last_now));
        consider(self.punch_timeout());
        consider(self.birthday_timeout());
        // Wake when the current direct path would count as silent.
        if self.path.kind.is_direct() {
            if let (Some(l), Some(r)) = (self.path.local, self.path.remote) {
                let rx = self.seen.get(&(l, r)).and_then(|s| s.last_rx);
                consider(rx.map(|t| t + self.config.failover_after));
            }
        }
        // Wake when the initial direct window closes.
        if self.direct_lost_at.is_none() {
            consider(
                self.first_remote_at
                    .map(|t| t + self.config.initial_direct_window),
            );
        }
        next.map(|n| n.max(self.last_now))
    }

    /// The next datagram to send. Changes after any mutating call.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event. Changes after any mutating call.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// The current data path.
    pub fn path(&self) -> &PathStatus {
        &self.path
    }

    /// When anything authenticated (STUN from the peer, or WireGuard data on
    /// a known pair) last arrived: `None` if nothing ever did.
    pub fn last_heard(&self) -> Option<Instant> {
        self.seen.values().filter_map(|s| s.last_rx).max()
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        let (punch_attempts, punch_openers) = self.punch.counts();
        let (birthday_attempts, birthday_probes) = self.birthday.counts();
        SessionStats {
            predicted: self.predicted.len() as u64,
            punch_attempts,
            punch_openers,
            birthday_attempts,
            birthday_probes,
            ..self.stats
        }
    }

    /// `is`'s connection state.
    pub fn ice_state(&self) -> IceConnectionState {
        self.ice.state()
    }

    fn after_mutation(&mut self, now: Instant) {
        self.drain_ice(now);
        self.evaluate(now);
        self.drive_blackhole(now);
        self.drive_punch(now);
        self.drive_birthday(now);
    }

    /// Runs blackhole detection on the direct pair carrying data, acts on
    /// verdicts (ours or the peer's) and queues its probes.
    fn drive_blackhole(&mut self, now: Instant) {
        let watched = match (
            self.path.kind.is_direct(),
            self.path.local,
            self.path.remote,
        ) {
            (true, Some(l), Some(r))
                if self.config.blackhole.is_some() && !self.is_local_relayed(l) =>
            {
                Some((l, r))
            }
            _ => None,
        };
        self.blackhole.tick(now, watched);
        let mut verdict = false;
        while let Some(((l, r), cause)) = self.blackhole.poll_verdict() {
            verdict = true;
            tracing::info!(local = %l, remote = %r, ?cause, "leaving a blackholed direct pair");
        }
        if verdict {
            self.evaluate(now);
        }
        self.stats.blackhole = self.blackhole.stats();
        self.send_probes();
    }

    fn send_probes(&mut self) {
        while let Some(p) = self.blackhole.poll_probe() {
            let Some(remote) = self.ice.remote_credentials() else {
                continue;
            };
            let username = format!("{}:{}", remote.ufrag, self.ice.local_credentials().ufrag);
            blackhole::encode_request(
                &mut self.probe_buf,
                p.tid,
                &username,
                remote.pass.as_bytes(),
                p.attr,
                usize::from(p.target_len),
            );
            self.transmits.push_back(Transmit {
                source: p.pair.0,
                destination: p.pair.1,
                via: Via::Socket,
                contents: self.probe_buf.clone(),
            });
        }
    }

    /// A blackhole probe or its answer, recognised by its attribute.
    fn handle_probe(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        probe: &blackhole::ParsedProbe<'_>,
    ) -> bool {
        let key = (destination, source);
        let local = self.ice.local_credentials().clone();
        let Some(remote) = self.ice.remote_credentials().cloned() else {
            self.stats.probes_rejected += 1;
            return false;
        };
        if probe.response {
            if !probe.verify(remote.pass.as_bytes())
                || !self
                    .blackhole
                    .handle_response(now, key, probe.tid, probe.attr)
            {
                self.stats.probes_rejected += 1;
                return false;
            }
        } else {
            let expected = format!("{}:{}", local.ufrag, remote.ufrag);
            if probe.username != Some(expected.as_str()) || !probe.verify(local.pass.as_bytes()) {
                self.stats.probes_rejected += 1;
                return false;
            }
            let answer = self
                .blackhole
                .handle_request(now, key, probe.attr, probe.len);
            blackhole::encode_response(
                &mut self.probe_buf,
                probe.tid,
                source,
                local.pass.as_bytes(),
                answer,
            );
            let via = if self.is_local_relayed(destination) {
                Via::Turn {
                    relayed: destination,
                }
            } else {
                Via::Socket
            };
            self.transmits.push_back(Transmit {
                source: destination,
                destination: source,
                via,
                contents: self.probe_buf.clone(),
            });
        }
        // Authenticated traffic on the pair keeps it alive like a check.
        if self.seen.contains_key(&key) {
            self.seen.entry(key).or_default().last_rx = Some(now);
        }
        self.after_mutation(now);
        true
    }

    /// Alive and not left as a blackhole.
    fn usable(&self, key: PairKey, now: Instant) -> bool {
        self.alive(key, now) && self.blackhole.ban(key, now).is_none()
    }

    fn is_local_relayed(&self, addr: SocketAddr) -> bool {
        self.local
            .iter()
            .any(|c| c.kind() == CandidateKind::Relayed && c.addr() == addr)
    }

    fn remote_kind(&self, addr: SocketAddr) -> CandidateKind {
        self.remote
            .iter()
            .filter(|c| c.addr() == addr)
            .map(|c| c.kind())
            // Relayed wins if the same address was signalled twice.
            .min_by_key(|k| match k {
                CandidateKind::Relayed => 0,
                CandidateKind::Host => 1,
                CandidateKind::ServerReflexive => 2,
                CandidateKind::PeerReflexive => 3,
            })
            // Not signalled: `is` learned it from a check.
            .unwrap_or(CandidateKind::PeerReflexive)
    }

    fn pair_kind(&self, (local, remote): PairKey) -> (PathKind, Option<IpNet>) {
        let lk = if self.is_local_relayed(local) {
            CandidateKind::Relayed
        } else {
            CandidateKind::Host
        };
        let c = classify(
            lk,
            self.remote_kind(remote),
            remote,
            &self.config.local_networks,
        );
        (c.kind, c.lan)
    }

    fn alive(&self, key: PairKey, now: Instant) -> bool {
        self.seen
            .get(&key)
            .and_then(|s| s.last_rx)
            .is_some_and(|t| now.saturating_duration_since(t) < self.config.failover_after)
    }

    fn drain_ice(&mut self, now: Instant) {
        self.last_now = self.last_now.max(now);
        while let Some(t) = self.ice.poll_transmit() {
            let key = (t.source, t.destination);
            let contents: Vec<u8> = t.contents.into();
            if let Ok(msg) = StunMessage::parse(&contents) {
                if msg.is_binding_request() {
                    self.checks.insert(msg.trans_id(), (key, now));
                    if !self.pair_kind(key).0.eq(&PathKind::Relay) {
                        self.stats.direct_checks_sent += 1;
                        self.direct_checks_since_ok += 1;
                        if !self.direct_pairs_tried.contains(&key) {
                            self.direct_pairs_tried.push(key);
                        }
                    }
                }
            }
            let via = if self.is_local_relayed(t.source) {
                Via::Turn { relayed: t.source }
            } else {
                Via::Socket
            };
            self.transmits.push_back(Transmit {
                source: t.source,
                destination: t.destination,
                via,
                contents,
            });
        }
        // Forget checks that can no longer be answered usefully.
        let horizon = Duration::from_secs(10);
        self.checks
            .retain(|_, (_, sent)| now.saturating_duration_since(*sent) < horizon);
        while let Some(e) = self.ice.poll_event() {
            match e {
                IceAgentEvent::NominatedSend {
                    source,
                    destination,
                    ..
                } => {
                    tracing::debug!(%source, %destination, "is nominated pair");
                    self.nominated = Some((source, destination));
                }
                IceAgentEvent::IceConnectionStateChange(s) => {
                    self.events.push_back(SessionEvent::IceState(s));
                }
                IceAgentEvent::IceRestart(_) | IceAgentEvent::DiscoveredRecv { .. } => {}
            }
        }
    }

    /// A success response's XOR-MAPPED-ADDRESS on a host pair: if it has the
    /// IP of our server-reflexive candidate but another port, our NAT maps
    /// each destination to a new port.
    fn note_mapped(&mut self, mapped: Option<SocketAddr>, destination: SocketAddr) {
        let Some(mapped) = mapped else { return };
        if self.is_local_relayed(destination) {
            return;
        }
        let varies = self.local.iter().any(|c| {
            c.kind() == CandidateKind::ServerReflexive
                && c.addr().ip() == mapped.ip()
                && c.addr().port() != mapped.port()
        });
        self.local_nat_varies |= varies;
    }

    /// A check from an address the peer did not signal but with the IP of
    /// its server-reflexive candidate: its NAT maps per destination.
    fn note_remote_source(&mut self, source: SocketAddr) {
        let signalled = self.remote.iter().any(|c| c.addr() == source);
        let varies = !signalled
            && self.remote.iter().any(|c| {
                c.kind() == CandidateKind::ServerReflexive && c.addr().ip() == source.ip()
            });
        self.remote_nat_varies |= varies;
    }

    /// Best relay path.
    ///
    /// Never a pair over a relay the agent declared down. Sticky: the
    /// current relay path stays while it answers (or while it is younger
    /// than `failover_after` and so had no chance to), unless it is not on
    /// the relay the agent chose and a pair on that one answers. Otherwise
    /// an answering relay-kind pair (on the chosen relay first, ending at
    /// that relay too, then what `is` nominated, then one ending on the
    /// peer's relayed address, then the most recent answer), else the
    /// static guess: our relayed address to the peer's relayed candidate,
    /// or its server-reflexive one — never a private address the relay
    /// would refuse to reach.
    fn relay_choice(&self, now: Instant) -> Option<PairKey> {
        let guess = self.static_relay_guess();
        let usable = |k: PairKey| {
            self.alive(k, now) && !self.over_down_relay(k) && !self.superseded.contains(&k.1)
        };
        let alive = self
            .seen
            .iter()
            .filter(|(k, _)| usable(**k) && self.pair_kind(**k).0 == PathKind::Relay)
            .max_by_key(|(k, s)| {
                (
                    self.on_preferred(**k),
                    self.relays.preferred_ips.contains(&k.1.ip()),
                    Some(**k) == self.nominated,
                    self.remote_kind(k.1) == CandidateKind::Relayed,
                    s.last_rx,
                )
            })
            .map(|(k, _)| *k);
        if let (PathKind::Relay, Some(l), Some(r)) =
            (self.path.kind, self.path.local, self.path.remote)
        {
            let cur = (l, r);
            // Every path's local end is one of our candidates (a host
            // address or our relayed address); one that was withdrawn (a
            // lost allocation, a vanished interface) is not kept, nor one
            // over a relay that is down or to a superseded relayed address.
            let still_ours = self.local.iter().any(|c| c.addr() == l)
                && !self.superseded.contains(&r)
                && !self.over_down_relay(cur);
            // The peer's NAT rebound (its mapping was flushed, it got a new
            // port): the same local end now hears it from another port of
            // the same address while the current pair fell silent. Follow
            // it, as WireGuard follows an endpoint, instead of waiting out
            // `failover_after`.
            if still_ours {
                let cur_rx = self.seen.get(&cur).and_then(|s| s.last_rx);
                let rebound = self
                    .seen
                    .iter()
                    .filter(|(k, s)| {
                        k.0 == l
                            && k.1 != r
                            && k.1.ip() == r.ip()
                            && !self.superseded.contains(&k.1)
                            && !self.over_down_relay(**k)
                            && s.last_rx.is_some_and(|t| {
                                now.saturating_duration_since(t) < REBIND_FRESH
                                    && cur_rx.is_none_or(|c| t > c + REBIND_SILENT)
                            })
                    })
                    .max_by_key(|(_, s)| s.last_rx)
                    .map(|(k, _)| *k);
                if rebound.is_some() {
                    return rebound;
                }
            }
            // A live pair on the chosen relay beats a live one elsewhere,
            // and one that stays on it (both relayed ends there) beats one
            // that also needs another relay.
            let ends_on_preferred = |k: PairKey| self.relays.preferred_ips.contains(&k.1.ip());
            let better_relay = alive.is_some_and(|a| {
                (!self.on_preferred(cur) && self.on_preferred(a))
                    || (self.on_preferred(a)
                        && ends_on_preferred(a)
                        && !ends_on_preferred(cur)
                        && self.remote_kind(cur.1) == CandidateKind::Relayed)
            });
            if still_ours && self.alive(cur, now) && !better_relay {
                return Some(cur);
            }
            let young = now.saturating_duration_since(self.path.since) < self.config.failover_after;
            // A young guess that has not answered yet may still give way to
            // a better guess (the peer's relayed candidate arrived).
            let better_guess = guess.is_some_and(|g| {
                g != cur
                    && self.remote_kind(g.1) == CandidateKind::Relayed
                    && self.remote_kind(r) != CandidateKind::Relayed
            });
            if still_ours && young && !better_guess && !better_relay {
                return Some(cur);
            }
        }
        alive.or(guess)
    }

    /// Our relayed address (on the chosen relay, never on a down one) to the
    /// peer's relayed candidate (relay to relay needs no hole in any NAT;
    /// one at the same relay first), else its server-reflexive one, else a
    /// public host address; never a private address the relay would refuse
    /// to reach.
    ///
    /// With relayed addresses in both families (a dual-stack allocation),
    /// the first (preferred relay, then IPv4) for which the peer has a
    /// candidate of the same family.
    fn static_relay_guess(&self) -> Option<PairKey> {
        let mut ours: Vec<SocketAddr> = self
            .local
            .iter()
            .filter(|c| c.kind() == CandidateKind::Relayed && !self.relays.down.contains(&c.addr()))
            .map(|c| c.addr())
            .collect();
        ours.sort_by_key(|a| (!self.relays.preferred.contains(a), a.is_ipv6()));
        let rank = |k: CandidateKind| match k {
            CandidateKind::Relayed => 0,
            CandidateKind::ServerReflexive => 1,
            CandidateKind::PeerReflexive => 2,
            CandidateKind::Host => 3,
        };
        ours.into_iter().find_map(|relayed| {
            self.remote
                .iter()
                .filter(|c| c.addr().is_ipv4() == relayed.is_ipv4())
                .filter(|c| !self.superseded.contains(&c.addr()))
                .filter(|c| c.kind() != CandidateKind::Host || !is_private(c.addr().ip()))
                .filter(|c| !self.relays.down_ips.contains(&c.addr().ip()))
                .min_by_key(|c| {
                    (
                        rank(c.kind()),
                        !self.relays.preferred_ips.contains(&c.addr().ip()),
                    )
                })
                .map(|c| (relayed, c.addr()))
        })
    }

    /// The path policy. Runs after every input.
    fn evaluate(&mut self, now: Instant) {
        // Direct "works" only with answers to our own checks: requests from
        // the peer prove one direction.
        let any_direct_alive = self.seen.iter().any(|(k, s)| {
            self.pair_kind(*k).0.is_direct()
                && self.blackhole.ban(*k, now).is_none()
                && s.last_response
                    .is_some_and(|t| now.saturating_duration_since(t) < self.config.failover_after)
        });

        // 1. What would we like to use?
        let current = match (self.path.local, self.path.remote) {
            (Some(l), Some(r)) => Some((l, r)),
            _ => None,
        };
        let current_kind = self.path.kind;
        let current_banned = current.is_some_and(|k| self.blackhole.ban(k, now).is_some());
        let current_alive = current.is_some_and(|k| self.usable(k, now));

        let nominated = self.nominated.map(|k| (k, self.pair_kind(k)));
        let nominated_alive = self.nominated.is_some_and(|k| self.usable(k, now));

        let mut choice: Option<PairKey> = None;
        if let Some((nk, (nkind, _))) = nominated {
            if nominated_alive && nkind.is_direct() {
                choice = Some(nk);
            }
        }
        // Keep a still-alive direct path when `is` nominated something no
        // better (equal kind within the RTT margin, or worse).
        if let (Some(cur), Some(nk)) = (current, choice) {
            if cur != nk && current_alive && current_kind.is_direct() {
                let (nkind, _) = self.pair_kind(nk);
                if !should_switch(current_kind, self.rtt_of(cur), nkind, self.rtt_of(nk)) {
                    choice = Some(cur);
                }
            }
        }

        // 2. Direct lost? Fail over to the relay.
        if choice.is_none() && current_kind.is_direct() && !current_alive && !current_banned {
            if let Some((l, r)) = current {
                if !matches!(self.relay_cause, RelayCause::Failover { .. }) {
                    self.stats.failovers += 1;
                    tracing::info!(local = %l, remote = %r, "direct path silent, failing over to relay");
                }
                self.relay_cause = RelayCause::Failover {
                    local: l,
                    remote: r,
                };
                self.mark_direct_lost(now);
            }
        }
        if choice.is_none() {
            // Another direct pair that still answers (say `is` has not yet
            // re-nominated)?
            if current_kind.is_direct() && current_alive {
                choice = current;
            }
        }
        // The current pair was left as a blackhole: another direct pair
        // that answers our checks, if there is one.
        if choice.is_none() && current_banned {
            choice = self
                .seen
                .iter()
                .filter(|(k, s)| {
                    self.pair_kind(**k).0.is_direct()
                        && self.usable(**k, now)
                        && s.last_response.is_some_and(|t| {
                            now.saturating_duration_since(t) < self.config.failover_after
                        })
                })
                .max_by_key(|(k, s)| (self.pair_kind(**k).0.rank(), s.last_response))
                .map(|(k, _)| *k);
        }
        if choice.is_none() {
            choice = self.relay_choice(now);
        }
        // Nothing relayed either: stay on a silent direct path rather than
        // on nothing (it may come back), or keep connecting.
        if choice.is_none() {
            choice = current;
        }

        // 3. Direct bookkeeping: backoff reset, lost detection.
        if any_direct_alive {
            if self.direct_lost_at.is_some() || self.backoff.attempt > 0 {
                tracing::info!("direct path answers again; retry backoff reset");
            }
            self.direct_lost_at = None;
            self.next_retry_at = None;
            self.backoff.reset();
            self.direct_checks_since_ok = 0;
            self.direct_pairs_tried.clear();
            self.relay_cause = RelayCause::Checking;
        } else if self.direct_lost_at.is_none() {
            if let Some(first) = self.first_remote_at {
                if now.saturating_duration_since(first) >= self.config.initial_direct_window {
                    if self.relay_cause == RelayCause::Checking {
                        self.relay_cause = RelayCause::NoDirect;
                    }
                    self.mark_direct_lost(now);
                }
            }
        }

        // 4. Apply.
        match choice {
            Some(key) => self.set_path(now, key),
            None => self.set_connecting(now),
        }
    }

    fn rtt_of(&self, key: PairKey) -> Option<Duration> {
        self.seen.get(&key).and_then(|s| s.rtt)
    }

    fn mark_direct_lost(&mut self, now: Instant) {
        if self.direct_lost_at.is_none() {
            self.direct_lost_at = Some(now);
            let has_direct_candidates = self
                .local
                .iter()
                .any(|c| c.kind() != CandidateKind::Relayed);
            if has_direct_candidates && !self.remote.is_empty() {
                let interval = self.backoff.next_interval();
                self.next_retry_at = Some(now + interval);
            }
        }
    }

    /// Re-forms all candidate pairs (pruned ones come back) so direct is
    /// tried again, and schedules the next retry.
    fn retry_direct(&mut self, now: Instant) {
        let attempt = self.backoff.attempt;
        let next_in = self.backoff.next_interval();
        self.next_retry_at = Some(now + next_in);
        self.stats.direct_retries += 1;
        tracing::debug!(
            attempt,
            ?next_in,
            "retrying direct: re-forming candidate pairs"
        );
        self.ice.recreate_candidate_pairs();
        self.events
            .push_back(SessionEvent::DirectRetry { attempt, next_in });
        self.after_mutation(now);
    }

    /// What the published NAT facts say about a missing direct path.
    fn nat_clause(&self) -> Option<String> {
        let ports = |f: &NatFacts| match f.port_allocation {
            Some(PortAllocation::Sequential { delta, .. }) => {
                format!("symmetric, sequential ports {delta:+}")
            }
            Some(PortAllocation::Random) => "symmetric, random ports".into(),
            None => "symmetric".into(),
        };
        let local = self.local_nat.as_ref();
        let remote = self.remote_nat.as_ref();
        if remote.is_some_and(|f| !f.udp) {
            return Some("the peer has no UDP (its netcheck)".into());
        }
        match (
            local.filter(|f| f.symmetric()),
            remote.filter(|f| f.symmetric()),
        ) {
            (Some(l), Some(r)) => {
                let random = |f: &NatFacts| f.port_allocation == Some(PortAllocation::Random);
                let why = if random(l) || random(r) {
                    ": no technique meets a random port from a symmetric NAT"
                } else {
                    ""
                };
                Some(format!(
                    "both NATs map each destination to a new port (ours {}; the peer's {}){why}",
                    ports(l),
                    ports(r)
                ))
            }
            (Some(l), None) => Some(format!(
                "local NAT maps each destination to a new port ({})",
                ports(l)
            )),
            (None, Some(r)) => Some(format!(
                "the peer's NAT maps each destination to a new port ({}, its netcheck)",
                ports(r)
            )),
            (None, None) => None,
        }
    }

    fn reason_for(&self, kind: PathKind, (l, r): PairKey, lan: Option<IpNet>) -> String {
        match kind {
            PathKind::Lan => match lan {
                Some(net) => format!("direct (LAN {net})"),
                None => "direct (LAN)".into(),
            },
            PathKind::Direct if self.punched.iter().any(|p| p.0 == r) => self.punched_reason(l, r),
            PathKind::Direct if self.birthday_pair(l, r) => self.birthday_reason(l, r),
            PathKind::Direct => match self.predicted.iter().find(|(a, _)| *a == r) {
                Some((_, k)) => {
                    let delta = match self.remote_nat.as_ref().and_then(|f| f.port_allocation) {
                        Some(PortAllocation::Sequential { delta, .. }) => delta,
                        _ => 0,
                    };
                    let from = if self.predicted_from_srflx {
                        "the peer's server-reflexive port"
                    } else {
                        "the newest port of the peer's NAT seen"
                    };
                    let n = k.unsigned_abs();
                    let steps = if n == 1 { "step" } else { "steps" };
                    let side = if *k > 0 { "past" } else { "before" };
                    format!(
                        "direct {l} ↔ {r} via port prediction, delta {delta:+} \
                         ({n} {steps} {side} {from})"
                    )
                }
                None => format!("direct {l} ↔ {r}"),
            },
            PathKind::Relay if self.blackhole.latest_ban(self.last_now).is_some() => {
                let Some((_, ban)) = self.blackhole.latest_ban(self.last_now) else {
                    return String::new();
                };
                let mut s = match ban.cause {
                    Cause::Data => "direct path answers checks but drops data: relayed".to_string(),
                    Cause::Mtu {
                        largest_ok: Some(n),
                    } => format!("direct path drops datagrams above {n} bytes: relayed"),
                    Cause::Mtu { largest_ok: None } => {
                        "direct path drops full-size datagrams: relayed".to_string()
                    }
                };
                if ban.by_peer {
                    s.push_str(" (the peer's finding)");
                }
                s
            }
            PathKind::Relay => match &self.relay_cause {
                RelayCause::Checking => "relayed while direct checks run".into(),
                RelayCause::Failover { local, remote } => format!(
                    "direct path {local}→{remote} stopped answering; relayed while retrying"
                ),
                RelayCause::NoDirect => {
                    let mut s = format!(
                        "relayed: no direct pair answered after {} checks on {} pairs",
                        self.direct_checks_since_ok,
                        self.direct_pairs_tried.len()
                    );
                    if let Some(c) = self.nat_clause() {
                        s.push_str(" — ");
                        s.push_str(&c);
                    } else if self.local_nat_varies {
                        s.push_str(" — local NAT maps each destination to a new port (symmetric)");
                    } else if self.remote_nat_varies {
                        s.push_str(
                            " — the peer's NAT maps each destination to a new port (symmetric)",
                        );
                    }
                    if self
                        .local
                        .iter()
                        .all(|c| c.kind() == CandidateKind::Relayed)
                    {
                        s.push_str(" — no local direct candidates");
                    }
                    s
                }
            },
            PathKind::Connecting => "connecting".into(),
        }
    }

    fn set_path(&mut self, now: Instant, key: PairKey) {
        let (kind, lan) = self.pair_kind(key);
        let mut reason = self.reason_for(kind, key, lan);
        if kind.is_direct() && !self.alive(key, now) && self.path.local.is_some() {
            reason.push_str(" — not answering, and no relay to fall back to");
        }
        let via = if self.is_local_relayed(key.0) {
            Via::Turn { relayed: key.0 }
        } else {
            Via::Socket
        };
        let rtt = self.rtt_of(key);
        self.path.blackhole = if kind == PathKind::Relay {
            self.blackhole.latest_ban(now).map(|(pair, b)| {
                Box::new(BlackholeInfo {
                    pair,
                    cause: b.cause,
                    by_peer: b.by_peer,
                    until: b.until,
                })
            })
        } else {
            None
        };
        let changed = self.path.kind != kind
            || self.path.local != Some(key.0)
            || self.path.remote != Some(key.1);
        self.path.rtt = rtt;
        self.path.reason = reason;
        if changed && kind.is_direct() && self.punched.iter().any(|p| p.0 == key.1) {
            self.punch.succeeded();
        }
        if changed {
            tracing::info!(path = %kind, local = %key.0, remote = %key.1, reason = %self.path.reason, "data path changed");
            self.path.kind = kind;
            self.path.local = Some(key.0);
            self.path.remote = Some(key.1);
            self.path.via = via;
            self.path.since = now;
            self.stats.path_changes += 1;
            self.events
                .push_back(SessionEvent::PathChanged(self.path.clone()));
        }
    }

    fn set_connecting(&mut self, now: Instant) {
        let reason = if self.remote.is_empty() && self.seen.is_empty() {
            "connecting: waiting for the peer's candidates".to_string()
        } else if self.ice.remote_credentials().is_none() {
            "connecting: waiting for the peer's credentials".to_string()
        } else if self.local.is_empty() {
            "connecting: no local candidates yet".to_string()
        } else {
            format!(
                "connecting: {} checks sent, no pair answered yet and no relayed candidate",
                self.direct_checks_since_ok
            )
        };
        let changed = self.path.kind != PathKind::Connecting;
        self.path.reason = reason;
        if changed {
            self.path.kind = PathKind::Connecting;
            self.path.local = None;
            self.path.remote = None;
            self.path.via = Via::Socket;
            self.path.since = now;
            self.path.rtt = None;
            self.path.blackhole = None;
            self.stats.path_changes += 1;
            self.events
                .push_back(SessionEvent::PathChanged(self.path.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controlling_is_decided_by_the_larger_key_and_both_sides_agree() {
        let a = [1u8; 32];
        let mut b = [1u8; 32];
        b[31] = 2;
        assert!(is_controlling(&b, &a));
        assert!(!is_controlling(&a, &b));
        assert!(!is_controlling(&a, &a));
    }

    #[test]
    fn backoff_doubles_and_is_capped_with_jitter_below_the_cap() {
        let mut b = Backoff {
            initial: Duration::from_secs(2),
            max: Duration::from_secs(60),
            attempt: 0,
            rng: StdRng::seed_from_u64(7),
        };
        let v: Vec<Duration> = (0..10).map(|_| b.next_interval()).collect();
        let bases = [2u64, 4, 8, 16, 32, 60, 60, 60, 60, 60];
        for (got, base) in v.iter().zip(bases) {
            let base = Duration::from_secs(base);
            assert!(
                *got <= base && *got >= base.mul_f64(0.85),
                "{got:?} vs {base:?}"
            );
        }
        b.reset();
        assert!(b.next_interval() <= Duration::from_secs(2));
    }

    #[test]
    fn switch_only_to_better_kinds_or_clearly_faster_paths() {
        use PathKind::*;
        let ms = |v| Some(Duration::from_millis(v));
        assert!(
            should_switch(Relay, ms(5), Direct, ms(80)),
            "direct beats relay whatever the RTT"
        );
        assert!(should_switch(Direct, ms(5), Lan, ms(9)));
        assert!(!should_switch(Lan, ms(50), Direct, ms(1)));
        assert!(
            !should_switch(Direct, ms(40), Direct, ms(37)),
            "7 % faster: stay"
        );
        assert!(!should_switch(Direct, ms(40), Direct, ms(41)));
        assert!(
            should_switch(Direct, ms(40), Direct, ms(30)),
            "25 % faster: move"
        );
        assert!(
            !should_switch(Direct, None, Direct, ms(30)),
            "unknown RTT: stay"
        );
    }

    #[test]
    fn report_serialises_with_lowercase_path_names() {
        let now = Instant::now();
        let s = PeerSession::new(SessionConfig::new(true, 1), now);
        let r = s.path().report(now + Duration::from_secs(3));
        assert_eq!(r.path, PathKind::Connecting);
        assert_eq!(r.since_secs, 3);
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["path"], "connecting");
        assert_eq!(
            json["reason"],
            "connecting: waiting for the peer's candidates"
        );
        assert!(json["rtt_ms"].is_null());
    }

    #[test]
    fn new_session_is_connecting_and_says_why() {
        let now = Instant::now();
        let s = PeerSession::new(SessionConfig::new(true, 1), now);
        assert_eq!(s.path().kind, PathKind::Connecting);
        assert_eq!(
            s.path().reason,
            "connecting: waiting for the peer's candidates"
        );
    }

    /// Two sessions that know each other, and one check from `a` to `b`.
    #[test]
    fn a_down_relay_is_left_at_once_for_the_chosen_one_ending_there_too() {
        let now = Instant::now();
        let mut a = PeerSession::new(SessionConfig::new(true, 1), now);
        let b = PeerSession::new(SessionConfig::new(false, 2), now);
        let base: SocketAddr = "192.168.1.10:51821".parse().expect("base");
        let r1: SocketAddr = "198.51.100.2:50001".parse().expect("r1");
        let r2: SocketAddr = "198.51.100.3:50002".parse().expect("r2");
        for r in [r1, r2] {
            a.add_local_candidate(now, Candidate::relayed(r, base, "udp").expect("relayed"))
                .expect("add");
        }
        a.set_remote_credentials(now, b.local_credentials().clone());
        let b1: SocketAddr = "198.51.100.2:60001".parse().expect("b1");
        let b2: SocketAddr = "198.51.100.3:60002".parse().expect("b2");
        let b_base: SocketAddr = "192.168.2.10:51821".parse().expect("b base");
        for r in [b1, b2] {
            a.add_remote_candidate(now, Candidate::relayed(r, b_base, "udp").expect("relayed"));
        }
        // Relay first, on the first relay (nothing known about either yet).
        assert_eq!(a.path().kind, PathKind::Relay);
        assert_eq!((a.path().local, a.path().remote), (Some(r1), Some(b1)));
        while a.poll_event().is_some() {}
        // Without a view nothing moves while the young path may still answer.
        let t = now + Duration::from_millis(300);
        a.handle_timeout(t);
        assert_eq!(a.path().local, Some(r1));
        // Relay 1 declared down, relay 2 chosen: moved at once, to the
        // peer's relayed address on relay 2 (one relay on the path).
        let ip = |s: SocketAddr| s.ip();
        a.set_relays(
            t,
            RelayView {
                preferred: vec![r2],
                preferred_ips: vec![ip(r2)],
                down: vec![r1],
                down_ips: vec![ip(r1)],
            },
        );
        assert_eq!((a.path().local, a.path().remote), (Some(r2), Some(b2)));
        assert!(
            std::iter::from_fn(|| a.poll_event())
                .any(|e| matches!(e, SessionEvent::PathChanged(p) if p.local == Some(r2))),
            "no PathChanged event"
        );
        // The same view again changes nothing.
        let changes = a.stats().path_changes;
        a.set_relays(t, a.relays.clone());
        assert_eq!(a.stats().path_changes, changes);
    }

    fn pair_and_check() -> (PeerSession, PeerSession, Transmit, Instant) {
        let now = Instant::now();
        let mut a = PeerSession::new(SessionConfig::new(true, 1), now);
        let mut b = PeerSession::new(SessionConfig::new(false, 2), now);
        let ca = a
            .add_local_candidate(
                now,
                Candidate::host("192.0.2.1:1000".parse().expect("a"), "udp").expect("host"),
            )
            .expect("add a");
        let cb = b
            .add_local_candidate(
                now,
                Candidate::host("192.0.2.2:2000".parse().expect("b"), "udp").expect("host"),
            )
            .expect("add b");
        a.set_remote_credentials(now, b.local_credentials().clone());
        b.set_remote_credentials(now, a.local_credentials().clone());
        a.add_remote_candidate(now, cb);
        b.add_remote_candidate(now, ca);
        let mut t = now;
        loop {
            t += Duration::from_millis(10);
            a.handle_timeout(t);
            if let Some(x) = a.poll_transmit() {
                return (a, b, x, t);
            }
            assert!(t < now + Duration::from_secs(1), "no check sent");
        }
    }

    #[test]
    fn a_valid_check_is_accepted_and_every_corruption_of_it_is_dropped_without_panic() {
        let (_a, mut b, check, now) = pair_and_check();
        let bytes = check.contents.clone();
        // The message ends with FINGERPRINT (8 bytes), which `is` does not
        // verify (MESSAGE-INTEGRITY before it is what authenticates); every
        // byte before it is covered.
        let covered = bytes.len() - 8;
        assert_eq!(
            &bytes[covered..covered + 2],
            &[0x80, 0x28],
            "FINGERPRINT last"
        );
        for i in 0..covered {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut m = bytes.clone();
                m[i] ^= flip;
                assert!(
                    !b.handle_stun(now, check.source, check.destination, &m),
                    "byte {i} ^ {flip:#x} accepted"
                );
            }
        }
        for n in 0..bytes.len() {
            assert!(!b.handle_stun(now, check.source, check.destination, &bytes[..n]));
        }
        let rejected = b.stats().stun_rejected;
        assert_eq!(rejected, 3 * covered as u64 + bytes.len() as u64);
        assert!(b.handle_stun(now, check.source, check.destination, &bytes));
        // The answer goes back to where the check came from.
        let reply = b.poll_transmit().expect("reply");
        assert_eq!(
            (reply.source, reply.destination),
            (check.destination, check.source)
        );
    }

    #[test]
    fn garbage_is_rejected_and_counted() {
        let now = Instant::now();
        let mut s = PeerSession::new(SessionConfig::new(true, 1), now);
        let a: SocketAddr = "192.0.2.1:1".parse().expect("addr");
        assert!(!s.handle_stun(now, a, a, &[0u8; 3]));
        assert!(!s.handle_stun(now, a, a, b"\x04\0\0\0garbage-wireguard-like"));
        assert_eq!(s.stats().stun_rejected, 2);
    }
}
