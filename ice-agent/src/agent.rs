//! The agent's core: every peer's [`PeerSession`], the TURN clients, the
//! signaling exchange and the routes WireGuard traffic takes, without a
//! socket or a clock (sans-IO, like the session it is built on).
//!
//! The driver (`daemon.rs`) feeds it datagrams from the agent's one UDP
//! socket ([`Agent::handle_datagram`]), signaling events
//! ([`Agent::handle_member`], [`Agent::handle_offline`],
//! [`Agent::handle_message`]) and time ([`Agent::handle_timeout`]), and
//! carries out what [`Agent::poll_output`] asks: datagrams to send, sealed
//! messages to signal, and per-peer [`PeerRoute`]s (where the WireGuard
//! endpoint points and how the per-peer proxy forwards).
//!
//! Offer/answer: each side names its ICE session with a random id. A peer
//! that comes online gets an offer at once; both sides may offer at the same
//! time, which is harmless (each answers the other with the same
//! credentials). An offer carrying a new id means the peer restarted: the
//! local session is rebuilt and answers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relay::client::{Client as TurnClient, ClientConfig as TurnConfig, ClientEvent};
use relay::stun::{self, attr, method, Class, MessageBuilder};
use signaling::seal::PeerMessage;

use crate::cert::Membership;
use crate::punch::{Msg, Ports};
use crate::session::{
    is_controlling, PathReport, PeerSession, RelayView, SessionConfig, SessionEvent, Transmit, Via,
};
use crate::status::PeerStatus;
use crate::turn_stream::Transport;
use crate::validate::{self, Refusal};
use crate::{Candidate, IceCreds, PathKind};
use relay::demux::{self, Kind};

mod membership;
mod nat;
mod relays;
mod renew;

/// A WireGuard public key: the one key type of the project (signaling's),
/// shown in base64 by its `Display`.
pub type PeerKey = signaling::PublicKey;

/// A relay in status: server, our relayed addresses, our mapped address,
/// why it is unusable, and how it is reached when not over UDP ("TLS 443 —
/// UDP to the relay blocked").
pub type RelayRow = (
    SocketAddr,
    Vec<SocketAddr>,
    Option<SocketAddr>,
    Option<String>,
    Option<String>,
);

/// What an offer or answer carries: session id, ufrag, password,
/// candidates, WireGuard port.
type Description = (u64, String, String, Vec<String>, Option<u16>);

/// One configured relay, resolved.
#[derive(Debug, Clone)]
pub struct RelaySpec {
    /// The relay's name in routes and outputs: its UDP address (for
    /// `turn:` URLs), or its stream address (`?transport=tcp`, `turns:`).
    pub server: SocketAddr,
    /// TURN credentials, or `None` for a STUN-only server.
    pub turn: Option<TurnConfig>,
    /// The ways to reach it, tried in order until one allocates (e.g. UDP,
    /// then TCP at the same port, then TLS on 443). Empty means UDP at
    /// `server`.
    pub paths: Vec<RelayPath>,
    /// The URL asked for a stream (`?transport=tcp`, `turns:`): status
    /// does not blame UDP.
    pub stream_only: bool,
}

impl RelaySpec {
    /// A relay reached over UDP only.
    pub fn udp(server: SocketAddr, turn: Option<TurnConfig>) -> RelaySpec {
        RelaySpec {
            server,
            turn,
            paths: Vec::new(),
            stream_only: false,
        }
    }

    fn path(&self, step: usize) -> RelayPath {
        self.paths.get(step).copied().unwrap_or(RelayPath {
            transport: Transport::Udp,
            addr: self.server,
        })
    }
}

/// One relay in [`Agent::relay_choice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayChoiceRow {
    /// The relay.
    pub server: SocketAddr,
    /// Median RTT of the last five STUN probes.
    pub rtt: Option<Duration>,
    /// Relayed paths use this relay (lowest latency, healthy, sticky).
    pub active: bool,
    /// Declared down: probes unanswered and silent (see `agent/relays.rs`).
    pub down: bool,
}

/// One way to reach a relay: a transport and the address to use it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayPath {
    /// UDP, TCP or TLS.
    pub transport: Transport,
    /// Where.
    pub addr: SocketAddr,
}

/// What the agent starts from.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Our WireGuard public key.
    pub public_key: PeerKey,
    /// Our WireGuard listen port (advertised for same-LAN paths).
    pub wg_port: Option<u16>,
    /// The agent socket's port.
    pub port: u16,
    /// Host addresses to offer (already filtered), with their networks.
    pub host: Vec<IpNet>,
    /// Relays.
    pub relays: Vec<RelaySpec>,
    /// `true`: every mesh member is a peer; `false`: only `peers`.
    pub auto_peers: bool,
    /// Explicit peers and their allowed IPs.
    pub peers: Vec<(PeerKey, Vec<IpNet>)>,
    /// A peer offline in signaling and silent this long is dropped.
    pub vanish_after: Duration,
    /// First ICE session id (the driver passes the Unix time in ms, so a
    /// restarted agent's sessions are newer than its previous ones).
    pub session_epoch: u64,
    /// Most peers managed at once; members beyond it are refused (counted
    /// as `peer_limit`). Explicitly listed peers always count.
    pub max_peers: usize,
    /// Pinned membership CA keys (Ed25519). Empty: the mesh is
    /// unauthenticated and `auto` peers route the single addresses they
    /// advertise, first come first served.
    pub cas: Vec<[u8; 32]>,
    /// Our own membership certificate, sent with every offer and answer.
    pub certificate: Option<String>,
    /// Unix time (seconds) at the `now` given to [`Agent::new`]: certificate
    /// validity is wall-clock time.
    pub unix_time: u64,
    /// Without a CA, a vanished member's addresses are given to no other key
    /// for this long.
    pub address_quarantine: Duration,
    /// Other ports of this node's services (metrics) that no remote
    /// candidate may name (WireGuard's and the agent's are added).
    pub own_ports: Vec<u16>,
    /// Seed of the agent's randomness (ICE session seeds, STUN transaction
    /// ids): the driver passes OS randomness, simulations a fixed value, so
    /// a simulation is reproducible from its seed.
    pub seed: [u8; 32],
    /// Several relays: probe the relay carrying relayed paths fast when it
    /// goes silent, and move those paths to another relay as soon as it is
    /// declared down (`agent/relays.rs`). `false` leaves relayed paths to
    /// their own silence timeout (1.5 s), which the failover benchmark
    /// measures as "before".
    pub fast_relay_failover: bool,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            public_key: signaling::PublicKey([0; 32]),
            wg_port: None,
            port: 0,
            host: Vec::new(),
            relays: Vec::new(),
            fast_relay_failover: true,
            auto_peers: false,
            peers: Vec::new(),
            vanish_after: Duration::from_secs(60),
            session_epoch: 1,
            max_peers: 1024,
            cas: Vec::new(),
            certificate: None,
            unix_time: 0,
            address_quarantine: Duration::from_secs(600),
            own_ports: Vec::new(),
            seed: [1; 32],
        }
    }
}

/// Where the WireGuard endpoint of a peer points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// At the peer's per-peer loopback proxy.
    Proxy,
    /// Straight at the peer's WireGuard port (same LAN).
    Direct(SocketAddr),
}

/// How the proxy forwards WireGuard packets from the local interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// No path yet: hold a few packets (handshakes) until there is one.
    Hold,
    /// From the agent socket to this address.
    Direct(SocketAddr),
    /// Through a TURN allocation with a bound channel.
    Channel {
        /// The relay.
        server: SocketAddr,
        /// Channel number.
        channel: u16,
    },
    /// Through a TURN allocation as Send indications (channel not bound yet).
    Indication {
        /// The relay.
        server: SocketAddr,
        /// The peer's address at the relay.
        peer: SocketAddr,
    },
}

impl Route {
    /// Frames one WireGuard packet for this route into `out` (cleared
    /// first); returns where to send it from the agent socket. `tid` is the
    /// transaction id a Send indication carries (the caller's randomness).
    pub fn frame(
        &self,
        payload: &[u8],
        out: &mut Vec<u8>,
        tid: stun::TransactionId,
    ) -> Option<SocketAddr> {
        out.clear();
        match *self {
            Route::Hold => None,
            Route::Direct(to) => {
                out.extend_from_slice(payload);
                Some(to)
            }
            Route::Channel { server, channel } => {
                stun::channel_data::encode(out, channel, payload, false);
                Some(server)
            }
            Route::Indication { server, peer } => {
                MessageBuilder::new(out, method::SEND, Class::Indication, tid)
                    .xor_address(attr::XOR_PEER_ADDRESS, peer)
                    .attr(attr::DATA, payload);
                Some(server)
            }
        }
    }
}

/// A peer's route as the driver applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRoute {
    /// WireGuard endpoint.
    pub endpoint: Endpoint,
    /// Proxy forwarding.
    pub route: Route,
    /// Which of the agent's sockets a direct route sends from (0: the
    /// main one; others: a socket birthday probing won).
    pub via: usize,
}

/// What the driver must do.
#[derive(Debug, Clone)]
pub enum Output {
    /// Send a datagram from the agent socket; to a relay reached over a
    /// stream ([`Output::RelayConnect`]), put it on that stream instead.
    Send {
        /// Destination.
        to: SocketAddr,
        /// Bytes.
        data: Vec<u8>,
    },
    /// Send a sealed signaling message.
    Signal {
        /// Recipient.
        to: PeerKey,
        /// Message.
        message: PeerMessage,
    },
    /// The agent now manages this peer: make sure the WireGuard peer exists
    /// with these allowed IPs (remember how it was), and give it a proxy.
    PeerAdded {
        /// Peer.
        peer: PeerKey,
        /// Allowed IPs (empty: leave the interface's as they are).
        allowed_ips: Vec<IpNet>,
    },
    /// Point the peer's WireGuard endpoint and proxy here.
    Route {
        /// Peer.
        peer: PeerKey,
        /// Route.
        route: PeerRoute,
    },
    /// An `auto` peer advertises other overlay addresses: replace its
    /// allowed IPs.
    AllowedIps {
        /// Peer.
        peer: PeerKey,
        /// New allowed IPs.
        allowed_ips: Vec<IpNet>,
    },
    /// The peer is no longer managed: restore it, drop its proxy.
    PeerRemoved {
        /// Peer.
        peer: PeerKey,
    },
    /// Open a TCP or TLS connection to the relay `server` at `path` (any
    /// earlier one to it is closed first), then report it with
    /// [`Agent::handle_relay_stream`]. Frames read from it go to
    /// [`Agent::handle_datagram`] with `server` as the source, and sends to
    /// `server` go on it while it is open.
    RelayConnect {
        /// The relay.
        server: SocketAddr,
        /// Where and how.
        path: RelayPath,
    },
    /// Close the stream to `server` (its sends go over UDP again).
    RelayClose {
        /// The relay.
        server: SocketAddr,
    },
    /// Coordinated punch: send a STUN Binding from a fresh UDP socket to
    /// `server` and report the mapped address it got with
    /// [`Agent::handle_mapping`] (`None` when nothing answered in about
    /// a second). A sequential NAT gives that socket its next port.
    MeasureMapping {
        /// The peer whose session asked.
        peer: PeerKey,
        /// The relay to ask (one we reach over UDP).
        server: SocketAddr,
    },
    /// Birthday probing: open `count` fresh UDP sockets for `peer`, send
    /// an opener ([`crate::punch::opener`]) from each to `target` now and
    /// every 10 s, and report how many opened with
    /// [`Agent::birthday_opened`]. The first socket that receives a
    /// datagram from `target` is reported with [`Agent::birthday_hit`]
    /// (register it with the data plane first).
    BirthdayOpen {
        /// The peer.
        peer: PeerKey,
        /// The peer's server-reflexive address.
        target: SocketAddr,
        /// How many sockets.
        count: u16,
    },
    /// Close `peer`'s birthday sockets that were not hit.
    BirthdayClose {
        /// The peer.
        peer: PeerKey,
    },
    /// The socket birthday probing won for `peer` is no longer needed
    /// (the session ended): close it and free its data-plane slot.
    BirthdayRelease {
        /// The peer.
        peer: PeerKey,
        /// The socket's index.
        socket: usize,
    },
    /// Send a datagram from one of the agent's other sockets (a socket
    /// birthday probing won; index as given to [`Agent::birthday_hit`]).
    SendFrom {
        /// The socket.
        socket: usize,
        /// Destination.
        to: SocketAddr,
        /// Bytes.
        data: Vec<u8>,
    },
}

/// What a relay stream did ([`Agent::handle_relay_stream`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// Connected (TLS: handshake done, certificate accepted).
    Connected,
    /// Could not connect, or the connection ended.
    Closed(String),
}

/// Counters of dropped input, by reason (`wgice_dropped_total{reason}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DropCounters {
    /// STUN no session accepted (wrong credentials, stale, garbage).
    pub stun_unmatched: u64,
    /// WireGuard packets from an address no peer uses.
    pub wg_unknown_source: u64,
    /// Datagrams that are neither STUN, ChannelData nor WireGuard.
    pub malformed: u64,
    /// Signaling messages from unmanaged peers or with bad candidates.
    pub signal_rejected: u64,
    /// Relay data (ChannelData / Data indications) for no known peer.
    pub relay_unmatched: u64,
    /// Offers/answers whose ICE credentials break RFC 8445 §5.3.
    pub bad_credentials: u64,
    /// Candidate lines too long, unparsable or not UDP.
    pub bad_candidate: u64,
    /// Candidates at addresses never checked (loopback, multicast, ours, …).
    pub candidate_refused: u64,
    /// Messages with an out-of-range field (session id 0, port 0).
    pub bad_field: u64,
    /// Embedded mode: WireGuard datagrams refused (unknown receiver index
    /// or sender key, bad MAC, failed authentication, replayed counter).
    pub wg_rejected: u64,
    /// Embedded mode: decrypted packets whose inner source is not an
    /// allowed IP of the peer that sent them.
    pub wg_bad_source: u64,
    /// Members refused because `max_peers` peers are managed.
    pub peer_limit: u64,
    /// Membership certificates that did not verify.
    pub bad_certificate: u64,
    /// Overlay claims withheld (held by another peer, quarantined, or not
    /// in the member's certificate).
    pub address_refused: u64,
}

impl DropCounters {
    /// Every counter with its `reason` label.
    pub fn by_reason(&self) -> [(&'static str, u64); 14] {
        [
            ("stun_unmatched", self.stun_unmatched),
            ("wg_unknown_source", self.wg_unknown_source),
            ("malformed", self.malformed),
            ("signal_rejected", self.signal_rejected),
            ("relay_unmatched", self.relay_unmatched),
            ("bad_credentials", self.bad_credentials),
            ("bad_candidate", self.bad_candidate),
            ("candidate_refused", self.candidate_refused),
            ("bad_field", self.bad_field),
            ("peer_limit", self.peer_limit),
            ("bad_certificate", self.bad_certificate),
            ("address_refused", self.address_refused),
            ("wg_rejected", self.wg_rejected),
            ("wg_bad_source", self.wg_bad_source),
        ]
    }

    fn count(&mut self, r: &Refusal) {
        let c = match r {
            Refusal::BadCredentials(_) => &mut self.bad_credentials,
            Refusal::BadCandidate(_) => &mut self.bad_candidate,
            Refusal::CandidateRefused { .. } => &mut self.candidate_refused,
            _ => &mut self.bad_field,
        };
        *c += 1;
    }
}

#[derive(Debug)]
struct Sess {
    ice: PeerSession,
    local_id: u64,
    remote_id: Option<u64>,
    offered_at: Instant,
    /// Offers sent without an answer (the re-offer delay doubles).
    unanswered: u32,
}

#[derive(Debug)]
struct Peer {
    /// Allowed IPs as last written (`auto` peers: their advertised overlay).
    allowed_ips: Vec<IpNet>,
    /// Candidates that arrived before the offer/answer naming their session
    /// (signaling does not promise order across a cluster).
    pending: Vec<(u64, String)>,
    online: bool,
    offline_since: Option<Instant>,
    session: Option<Sess>,
    remote_wg_port: Option<u16>,
    route: Option<PeerRoute>,
    rx_bytes: u64,
    path_changes_before: u64,
    failovers_before: u64,
    /// Remote candidates added to the current session.
    remote_candidates: usize,
    created: Instant,
    /// `auto` peers: the single addresses the member advertises in
    /// signaling (used when no CA is configured).
    claimed: Vec<IpNet>,
    /// A verified membership certificate.
    membership: Option<Membership>,
    /// Why the peer's certificate is missing or refused (with a CA).
    cert_problem: Option<String>,
    /// Addresses it asked for but did not get, and why.
    withheld: Option<String>,
    /// Listed in the config (its allowed IPs are the operator's).
    listed: bool,
    /// The NAT facts it published (checked), kept across sessions.
    remote_nat: Option<crate::netcheck::NatFacts>,
}

#[derive(Debug)]
struct RelayState {
    spec: RelaySpec,
    turn: Option<TurnClient>,
    /// Which of `spec.paths` is in use (or being tried).
    step: usize,
    /// The path that last allocated: reconnects start there.
    good: Option<usize>,
    /// A stream connection is asked for or open.
    stream: bool,
    /// Over UDP: when to give up waiting for any answer and try the next path.
    udp_deadline: Option<Instant>,
    /// Over TCP with TLS still to try: when to give up on the connection.
    stream_deadline: Option<Instant>,
    /// Anything heard from the relay on the current path.
    answered: bool,
    /// UDP got no answer (the reason a stream is used).
    udp_blocked: bool,
    /// Local address the relay's answers arrived on (base of srflx/relayed).
    base: Option<IpAddr>,
    relayed: Vec<SocketAddr>,
    mapped: Option<SocketAddr>,
    /// Permissions asked for, and which peers' sessions use each.
    permitted: HashMap<IpAddr, HashSet<PeerKey>>,
    /// Channels bound, and whose they are.
    channels: HashMap<SocketAddr, PeerKey>,
    /// When to (re)allocate, or send the next STUN Binding.
    retry_at: Option<Instant>,
    failures: u32,
    binding_tid: Option<stun::TransactionId>,
    /// Why the relay is not usable (for status).
    problem: Option<String>,
    /// When the server last sent us anything (answers, relayed data).
    last_rx: Option<Instant>,
    /// When the username the live allocation is bound to expires (TURN
    /// REST), see `agent/renew.rs`.
    bound_until: Option<Instant>,
    /// A re-allocation with new credentials is planned, at the latest then.
    renew_by: Option<Instant>,
    /// The old allocation is being deleted for a re-allocation.
    renewing: bool,
    /// Peers to restart once the new allocation is up.
    moving: Vec<PeerKey>,
}

/// The agent core. See the module docs.
#[derive(Debug)]
pub struct Agent {
    opts: AgentOptions,
    peers: HashMap<PeerKey, Peer>,
    relays: Vec<RelayState>,
    /// Local candidates currently offered.
    local: Vec<Candidate>,
    /// Which peer a remote address belongs to (signalled candidates and
    /// addresses that passed an authenticated check).
    owner: HashMap<SocketAddr, PeerKey>,
    out: VecDeque<Output>,
    drops: DropCounters,
    next_session_id: u64,
    /// Candidates from members not (yet) peers: (sender, session, line).
    early: VecDeque<(PeerKey, u64, String)>,
    /// Direct retries of sessions already dropped (the total never goes down).
    retired: SessionTotals,
    /// Addresses of vanished members, held back from other keys until then.
    quarantine: HashMap<IpNet, (PeerKey, Instant)>,
    /// When `opts.unix_time` was true.
    started: Instant,
    /// Refusal log lines left in the current 10 s window (a flooding member
    /// must not flood the log too).
    log_budget: (Instant, u32),
    /// All the core's randomness, seeded by `opts.seed`.
    rng: StdRng,
    /// The address the gateway mapped to our port (PCP / NAT-PMP).
    port_mapped: Option<SocketAddr>,
    /// Health, latency and choice of the relays.
    health: relays::Relays,
    /// What the sessions were last told about the relays.
    relay_view: RelayView,
    /// Port mapping, as status shows it (`None`: turned off).
    port_mapping_status: Option<String>,
    /// The last network change the kernel reported, and how many so far.
    network_change: Option<(Instant, String)>,
    network_changes: u64,
    /// When every session was last restarted because our address changed,
    /// and how many sessions that restarted in all.
    last_restart: Option<Instant>,
    restarts: u64,
    /// When a silent relayed peer last made us refresh our allocations.
    last_silence_probe: Option<Instant>,
    /// Our NAT facts (the daemon's netcheck) and when they were measured.
    nat: Option<(crate::netcheck::NatFacts, Instant)>,
    /// Sockets birthday probing won: host address → the driver's index.
    /// Their transmits go out as [`Output::SendFrom`].
    sockets: HashMap<SocketAddr, usize>,
    /// The same, by peer (released when its session ends).
    socket_owner: HashMap<PeerKey, Vec<(SocketAddr, usize)>>,
}

/// Session counters summed over all sessions (see
/// [`Agent::session_totals`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionTotals {
    /// Direct attempts that failed and were retried.
    pub direct_retries: u64,
    /// Direct pairs left as data blackholes (our verdicts).
    pub blackhole_data: u64,
    /// Direct pairs left as MTU blackholes (our verdicts).
    pub blackhole_mtu: u64,
    /// Direct pairs left because the peer found a blackhole.
    pub blackhole_peer: u64,
    /// Sessions that predicted the peer's NAT ports.
    pub predictions: u64,
    /// Coordinated punch attempts (both NATs sequential symmetric).
    pub punch_attempts: u64,
    /// Openers those attempts sent.
    pub punch_openers: u64,
    /// Birthday probing attempts (either side).
    pub birthday_attempts: u64,
    /// Birthday probes sent.
    pub birthday_probes: u64,
}

impl SessionTotals {
    fn add(&mut self, st: &crate::session::SessionStats) {
        self.direct_retries += st.direct_retries;
        self.blackhole_data += st.blackhole.data_verdicts;
        self.blackhole_mtu += st.blackhole.mtu_verdicts;
        self.blackhole_peer += st.blackhole.peer_leaves;
        self.predictions += u64::from(st.predicted > 0);
        self.punch_attempts += st.punch_attempts;
        self.punch_openers += st.punch_openers;
        self.birthday_attempts += st.birthday_attempts;
        self.birthday_probes += st.birthday_probes;
    }
}

const MAX_PENDING_CANDIDATES: usize = 64;
/// Refusals logged at warn level per 10 s (the rest at debug).
const REFUSAL_LOGS: u32 = 20;
/// Candidates held for members that have not offered yet (all together).
const MAX_EARLY_CANDIDATES: usize = 256;
/// Remote candidates per session (all messages together).
const MAX_REMOTE_CANDIDATES: usize = 64;
/// Addresses remembered per peer / in total for WireGuard demultiplexing.
const MAX_OWNED_PER_PEER: usize = 256;
const MAX_OWNED: usize = 64 * 1024;
/// Quarantined addresses remembered at once.
const MAX_QUARANTINE: usize = 16 * 1024;
const REOFFER_AFTER: Duration = Duration::from_secs(5);
/// Sessions restart for a changed public address at most this often.
const RESTART_SPACING: Duration = Duration::from_secs(1);
/// A relayed peer silent this long (its 500 ms keepalives unanswered) makes
/// us check our allocations ...
const SILENT_PROBE_AFTER: Duration = Duration::from_millis(600);
/// ... until this long.
const SILENT_PROBE_UNTIL: Duration = Duration::from_secs(3);
/// A relay silent this long gets a Refresh to prove it still has us.
const RELAY_PROBE_AFTER: Duration = Duration::from_secs(5);
/// UDP to a relay that has not answered at all this long is taken as
/// blocked, and the next path (TCP, then TLS) is tried. The TURN client has
/// sent its Allocate three times by then (0, 0.5, 1.5 s). Not used when UDP
/// is the path that last allocated.
const UDP_FALLBACK_AFTER: Duration = Duration::from_millis(1600);
/// A TCP connection to a relay that has not come up this long is given up
/// for the next path (TLS on 443) when TCP never worked before.
const TCP_CONNECT_BUDGET: Duration = Duration::from_millis(400);
/// A session that heard nothing this long yields to an offer with an older
/// id (the peer restarted with its clock behind).
const STALE_SESSION: Duration = Duration::from_secs(15);
const STUN_REFRESH: Duration = Duration::from_secs(25);

impl Agent {
    /// A new agent; call [`Agent::handle_timeout`] to start gathering.
    pub fn new(opts: AgentOptions, now: Instant) -> Agent {
        let specs = opts.relays.clone();
        let mut a = Agent {
            peers: HashMap::new(),
            relays: Vec::new(),
            local: Vec::new(),
            owner: HashMap::new(),
            out: VecDeque::new(),
            drops: DropCounters::default(),
            next_session_id: opts.session_epoch.max(1) << 12,
            early: VecDeque::new(),
            retired: SessionTotals::default(),
            quarantine: HashMap::new(),
            started: now,
            log_budget: (now, REFUSAL_LOGS),
            rng: StdRng::from_seed(opts.seed),
            port_mapped: None,
            port_mapping_status: None,
            network_change: None,
            network_changes: 0,
            last_restart: None,
            restarts: 0,
            last_silence_probe: None,
            nat: None,
            sockets: HashMap::new(),
            socket_owner: HashMap::new(),
            health: relays::Relays::default(),
            relay_view: RelayView::default(),
            opts,
        };
        for spec in specs {
            a.add_relay(now, spec);
        }
        let hosts: Vec<IpNet> = a.opts.host.clone();
        for net in hosts {
            let addr = SocketAddr::new(net.addr(), a.opts.port);
            if let Ok(c) = Candidate::host(addr, "udp") {
                a.add_local(now, c);
            }
        }
        for (key, ips) in a.opts.peers.clone() {
            a.manage(now, key, ips);
            if let Some(p) = a.peers.get_mut(&key) {
                p.listed = true;
            }
        }
        a
    }

    /// Our public key.
    pub fn public_key(&self) -> &PeerKey {
        &self.opts.public_key
    }

    /// Next thing to do. Any `handle_*` call may queue more; drain it
    /// until `None` after each.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Dropped-input counters.
    pub fn drops(&self) -> DropCounters {
        self.drops
    }

    /// Most peers managed at once.
    pub fn max_peers(&self) -> usize {
        self.opts.max_peers
    }

    /// Whether members need a verified certificate to route anything.
    pub fn certificates_required(&self) -> bool {
        !self.opts.cas.is_empty()
    }

    /// Relay states for status: (server, relayed, mapped, problem).
    pub fn relay_status(&self) -> Vec<RelayRow> {
        self.relays
            .iter()
            .map(|r| {
                (
                    r.spec.server,
                    r.relayed.clone(),
                    r.mapped,
                    r.problem.clone(),
                    transport_note(r),
                )
            })
            .collect()
    }

    /// Per relay with TURN: server, median probe RTT, whether relayed paths
    /// use it (the chosen one), whether it is declared down; and the last
    /// move between relays ("moved from relay A to B: A silent 0.6 s").
    pub fn relay_choice(&self) -> (Vec<RelayChoiceRow>, Option<String>) {
        let rows = self
            .health
            .rows()
            .into_iter()
            .map(|(server, rtt, active, down)| RelayChoiceRow {
                server,
                rtt,
                active,
                down,
            })
            .collect();
        (rows, self.health.note().map(str::to_owned))
    }

    /// The earliest time [`Agent::handle_timeout`] must run (changes after
    /// any `handle_*` call).
    #[must_use]
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let mut best: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                best = Some(best.map_or(t, |b| b.min(t)));
            }
        };
        for p in self.peers.values_mut() {
            if let Some(s) = p.session.as_mut() {
                consider(s.ice.poll_timeout());
                if p.online && s.remote_id.is_none() {
                    consider(Some(reoffer_at(s)));
                }
            }
        }
        consider(self.health.poll_timeout(&self.carrying()));
        for r in &self.relays {
            consider(r.retry_at);
            consider(r.udp_deadline);
            consider(r.stream_deadline);
            consider(r.turn.as_ref().and_then(|t| t.poll_timeout()));
            consider(relay_probe_at(r));
        }
        for i in 0..self.relays.len() {
            consider(self.renew_at(i));
        }
        for (_, until) in self.quarantine.values() {
            consider(Some(*until));
        }
        let started = self.started;
        let unix0 = self.opts.unix_time;
        for p in self.peers.values() {
            if let Some(m) = &p.membership {
                let secs = m.not_after.saturating_sub(unix0);
                consider(Some(started + Duration::from_secs(secs)));
            }
        }
        best
    }

    /// The data plane's cumulative count of WireGuard traffic sent to
    /// `peer` (datagrams or bytes: only growth matters), for blackhole
    /// detection on its direct pair. The daemon calls it every 100 ms.
    /// `large`: datagrams above `blackhole::LARGE_DATAGRAM` bytes among
    /// them, when the data plane counts them.
    ///
    /// Not while WireGuard goes straight to the peer's WireGuard port (the
    /// LAN shortcut to a peer beside `wireguard-go`): the peer's agent
    /// never sees that data, so its counts would read as a blackhole.
    pub fn note_data_tx(&mut self, now: Instant, peer: &PeerKey, total: u64, large: Option<u64>) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        // (An embedded peer's WireGuard port is its agent's: that data is
        // seen and counted.)
        if p.route.is_some_and(
            |r| matches!(r.endpoint, Endpoint::Direct(a) if r.route != Route::Direct(a)),
        ) {
            return;
        }
        if let Some(s) = p.session.as_mut() {
            s.ice.note_data_tx(now, total, large);
        }
    }

    /// Advances every timer to `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire_memberships(now);
        self.probe_relays_if_silent(now);
        for i in 0..self.relays.len() {
            if self.relays[i].retry_at.is_some_and(|t| t <= now) {
                self.relays[i].retry_at = None;
                self.start_relay(now, i);
            }
            if self.relays[i].udp_deadline.is_some_and(|t| t <= now) {
                self.relays[i].udp_deadline = None;
                if !self.relays[i].answered {
                    // Not a word back over UDP: take the next path.
                    self.relays[i].udp_blocked = true;
                    self.relays[i].turn = None;
                    self.next_path(now, i, "no answer over UDP".into());
                }
            }
            if self.relays[i].stream_deadline.is_some_and(|t| t <= now) {
                self.relays[i].stream_deadline = None;
                if self.relays[i].stream && self.relays[i].turn.is_none() {
                    self.next_path(
                        now,
                        i,
                        format!("no TCP connection within {TCP_CONNECT_BUDGET:?}"),
                    );
                }
            }
            if relay_probe_at(&self.relays[i]).is_some_and(|t| t <= now) {
                // Silent for a while: make sure the allocation still exists
                // (a restarted relay forgot it; without this the loss shows
                // only at the next permission refresh, minutes later).
                self.relays[i].last_rx = Some(now);
                if let Some(t) = self.relays[i].turn.as_mut() {
                    t.refresh_now(now);
                }
            }
            self.renew_if_due(now, i);
            if let Some(t) = self.relays[i].turn.as_mut() {
                if t.poll_timeout().is_some_and(|d| d <= now) {
                    t.handle_timeout(now);
                }
            }
            self.drain_relay(now, i);
        }
        self.probe_relays(now);
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for k in keys {
            if let Some(s) = self.peers.get_mut(&k).and_then(|p| p.session.as_mut()) {
                if s.ice.poll_timeout().is_some_and(|d| d <= now) {
                    s.ice.handle_timeout(now);
                }
            }
            let reoffer = self.peers.get(&k).is_some_and(|p| {
                p.online
                    && p.session
                        .as_ref()
                        .is_some_and(|s| s.remote_id.is_none() && reoffer_at(s) <= now)
            });
            if reoffer {
                // Lost in signaling (or the peer was not ready): again, with
                // a doubling delay.
                self.send_offer(now, k);
            }
            self.drain_session(now, &k);
            self.check_vanished(now, &k);
        }
    }

    /// A datagram arrived on the agent socket from `source`, on local address
    /// `local` (when known). Returns the WireGuard packet to hand to the
    /// local interface for that peer, if it was one.
    pub fn handle_datagram<'a>(
        &mut self,
        now: Instant,
        source: SocketAddr,
        local: Option<IpAddr>,
        data: &'a [u8],
    ) -> Option<(PeerKey, &'a [u8])> {
        if let Some(i) = self.relays.iter().position(|r| r.spec.server == source) {
            return self.handle_from_relay(now, i, local, false, data);
        }
        let local_ip = local
            .or_else(|| self.opts.host.first().map(|n| n.addr()))
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let dst = SocketAddr::new(local_ip, self.opts.port);
        self.handle_peer_datagram(now, source, dst, data, None)
    }

    fn handle_from_relay<'a>(
        &mut self,
        now: Instant,
        i: usize,
        local: Option<IpAddr>,
        stream: bool,
        data: &'a [u8],
    ) -> Option<(PeerKey, &'a [u8])> {
        if stream != self.relays[i].stream {
            // A datagram while we talk over a stream (or a frame while we
            // talk over UDP) is left over from the other path.
            return None;
        }
        if local.is_some() && !stream {
            self.relays[i].base = local;
        }
        let server = self.relays[i].spec.server;
        let answer = data.len() >= 20
            && data[0] == 0x01
            && data[1] == 0x01
            && data[8..20]
                .try_into()
                .is_ok_and(|tid| self.health.answer(now, server, &tid));
        let was_down = self.health.is_down(server);
        if self.health.heard(now, server) == relays::Change::Choice {
            self.push_relay_view(now);
        }
        if was_down {
            // Back after a silence: it may have restarted and forgotten our
            // allocation; find out now, not at the next quiet-time check.
            if let Some(t) = self.relays[i].turn.as_mut() {
                t.refresh_now(now);
            }
            self.drain_relay(now, i);
        }
        if answer {
            // A probe answer proves the server runs, not that it still
            // holds our allocation: not "heard" for the allocation check.
            return None;
        }
        self.relays[i].last_rx = Some(now);
        self.relays[i].answered = true;
        let Some(turn) = self.relays[i].turn.as_mut() else {
            if self.relays[i].spec.turn.is_none() {
                self.handle_binding_response(now, i, data);
            }
            return None;
        };
        let relayed = turn.relayed().first().copied();
        let up = turn.handle_input(now, data);
        match (up, relayed) {
            (Some((peer, payload)), Some(relayed)) => {
                self.handle_peer_datagram(now, peer, relayed, payload, None)
            }
            (Some(_), None) => {
                self.drops.relay_unmatched += 1;
                None
            }
            (None, _) => {
                self.drain_relay(now, i);
                None
            }
        }
    }

    /// `only`: the datagram arrived on a socket that belongs to this peer
    /// (one birthday probing won for it): no other peer's session may take
    /// it.
    fn handle_peer_datagram<'a>(
        &mut self,
        now: Instant,
        source: SocketAddr,
        dst: SocketAddr,
        data: &'a [u8],
        only: Option<PeerKey>,
    ) -> Option<(PeerKey, &'a [u8])> {
        match demux::classify(data) {
            Kind::Stun => {
                // Try the owner of the address first, then everyone (a
                // peer-reflexive address is unknown until a check passes).
                let first = only.or_else(|| self.owner.get(&source).copied());
                let take = |p: &mut Peer| {
                    p.session
                        .as_mut()
                        .is_some_and(|s| s.ice.handle_stun(now, source, dst, data))
                };
                let owner_took = first.filter(|k| self.peers.get_mut(k).is_some_and(take));
                let taker = owner_took.or_else(|| {
                    self.peers
                        .iter_mut()
                        .filter(|(k, _)| only.is_none() && Some(**k) != first)
                        .find_map(|(k, p)| take(p).then_some(*k))
                });
                // Only a success response to a check we sent proves the
                // address is the peer's: a request (even authenticated) can
                // come from a spoofed source.
                let proven = data.len() >= 2 && data[0] == 0x01 && data[1] == 0x01;
                match taker {
                    Some(k) => {
                        self.note_owner(source, k, proven);
                        self.drain_session(now, &k);
                    }
                    None => self.drops.stun_unmatched += 1,
                }
                None
            }
            Kind::WireGuard(_) => {
                let Some(k) = self
                    .owner
                    .get(&source)
                    .copied()
                    .filter(|k| only.is_none_or(|o| o == *k))
                else {
                    self.drops.wg_unknown_source += 1;
                    return None;
                };
                let p = self.peers.get_mut(&k)?;
                p.rx_bytes += data.len() as u64;
                if let Some(s) = p.session.as_mut() {
                    s.ice.note_data_rx(now, source, dst);
                    self.drain_session(now, &k);
                }
                Some((k, data))
            }
            _ => {
                self.drops.malformed += 1;
                None
            }
        }
    }

    /// A whole frame (STUN or ChannelData, padding removed) read from the
    /// stream to the relay `server`; like [`Agent::handle_datagram`]
    /// otherwise.
    pub fn handle_stream_frame<'a>(
        &mut self,
        now: Instant,
        server: SocketAddr,
        data: &'a [u8],
    ) -> Option<(PeerKey, &'a [u8])> {
        let i = self.relays.iter().position(|r| r.spec.server == server)?;
        self.handle_from_relay(now, i, None, true, data)
    }

    /// The stream [`Output::RelayConnect`] asked for to `server` connected
    /// or closed (or never connected).
    pub fn handle_relay_stream(&mut self, now: Instant, server: SocketAddr, ev: StreamEvent) {
        let Some(i) = self.relays.iter().position(|r| r.spec.server == server) else {
            return;
        };
        if !self.relays[i].stream {
            return;
        }
        match ev {
            StreamEvent::Connected => {
                self.relays[i].stream_deadline = None;
                let Some(mut cfg) = self.relays[i].spec.turn.clone() else {
                    return;
                };
                let path = self.relays[i].spec.path(self.relays[i].step);
                tracing::info!(%server, transport = %path.transport, addr = %path.addr, "relay stream connected; allocating over it");
                cfg.reliable = true;
                let seed = self.rng.random();
                let mut t = TurnClient::new(cfg, seed);
                t.allocate(now);
                let r = &mut self.relays[i];
                r.turn = Some(t);
                r.permitted.clear();
                r.channels.clear();
                self.drain_relay(now, i);
            }
            StreamEvent::Closed(why) => {
                let path = self.relays[i].spec.path(self.relays[i].step);
                let allocated = self.relays[i]
                    .turn
                    .as_ref()
                    .is_some_and(|t| t.is_allocated());
                self.relays[i].stream = false;
                self.relays[i].turn = None;
                let why = format!("{} {}: {why}", path.transport, path.addr);
                if allocated {
                    // It worked on this path: the relay went away (restart)
                    // or the connection broke. Reconnect the same way, at
                    // once the first time.
                    self.relay_down(now, i, why, true);
                } else {
                    self.next_path(now, i, why);
                }
            }
        }
    }

    /// Whether `addr` is one of the relays (datagrams from it are TURN).
    pub fn is_relay(&self, addr: SocketAddr) -> bool {
        self.relays.iter().any(|r| r.spec.server == addr)
    }

    /// Embedded mode: the data plane authenticated a WireGuard datagram of
    /// `len` bytes from `peer` arriving directly from `source` (it decides
    /// by the packet's keys, not its address, so this is bookkeeping: bytes
    /// received, and data on an ICE pair keeps that pair alive).
    pub fn note_wireguard(
        &mut self,
        now: Instant,
        peer: PeerKey,
        source: SocketAddr,
        local: Option<IpAddr>,
        len: usize,
    ) {
        let local_ip = local
            .or_else(|| self.opts.host.first().map(|n| n.addr()))
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let dst = SocketAddr::new(local_ip, self.opts.port);
        let owned = self.owner.get(&source) == Some(&peer);
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.rx_bytes += len as u64;
        if owned {
            if let Some(s) = p.session.as_mut() {
                s.ice.note_data_rx(now, source, dst);
                self.drain_session(now, &peer);
            }
        }
    }

    /// A mesh member is online (or changed its overlay addresses).
    pub fn handle_member(&mut self, now: Instant, key: PeerKey, overlay: &[String]) {
        if key == self.opts.public_key {
            return;
        }
        // A member may claim single addresses only (`10.8.0.2/24` routes
        // just 10.8.0.2 to it): a member advertising 0.0.0.0/0 must not pull
        // the whole internet, or other peers' ranges, into its tunnel.
        let mut ips: Vec<IpNet> = overlay
            .iter()
            .filter_map(|s| {
                s.parse::<IpNet>()
                    .map(|n| n.addr())
                    .or_else(|_| s.parse::<IpAddr>())
                    .ok()
            })
            .filter(|a| !a.is_unspecified() && !a.is_loopback() && !a.is_multicast())
            .map(IpNet::from)
            .collect();
        ips.sort();
        ips.dedup();
        ips.truncate(16);
        if !self.peers.contains_key(&key) {
            if !self.opts.auto_peers || !self.admit(now, &key) {
                return;
            }
            let want = if self.opts.cas.is_empty() {
                ips.clone()
            } else {
                Vec::new()
            };
            let (granted, withheld) = self.compute_grant(now, &key, want);
            self.manage(now, key, granted);
            if let Some(why) = &withheld {
                self.drops.address_refused += 1;
                self.log_refusal(now, &key, "address_refused", why);
            }
            if let Some(p) = self.peers.get_mut(&key) {
                p.claimed = ips;
                p.withheld = withheld;
            }
        } else if self.peers.get(&key).is_some_and(|p| !p.listed) && !ips.is_empty() {
            if let Some(p) = self.peers.get_mut(&key) {
                p.claimed = ips;
            }
            self.grant(now, key);
        }
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        p.online = true;
        p.offline_since = None;
        let stale_offer = p
            .session
            .as_ref()
            .is_some_and(|s| s.remote_id.is_none() && now >= s.offered_at + REOFFER_AFTER);
        if p.session.is_none() {
            self.new_session(now, key);
            self.send_offer(now, key);
        } else if stale_offer {
            self.send_offer(now, key);
        }
    }

    /// A member went offline in signaling. Its tunnel may still work (only its
    /// signaling connection may be gone): it is dropped only once it is also
    /// silent for `vanish_after`.
    pub fn handle_offline(&mut self, now: Instant, key: PeerKey) {
        if let Some(p) = self.peers.get_mut(&key) {
            p.online = false;
            p.offline_since.get_or_insert(now);
        }
    }

    /// Our signaling connection is back: messages sent meanwhile were
    /// dropped, so every session offers again.
    pub fn handle_signaling_connected(&mut self, now: Instant) {
        // Every session, answered or not: an offer with the same session id
        // is idempotent for the peer and carries our current candidates,
        // including any trickled while signaling was down.
        let with_session: Vec<PeerKey> = self
            .peers
            .iter()
            .filter(|(_, p)| p.session.is_some())
            .map(|(k, _)| *k)
            .collect();
        for k in with_session {
            self.send_offer(now, k);
        }
    }

    /// A sealed message from `from` (already authenticated by signaling).
    ///
    /// Session ids grow (the driver seeds them with the Unix time in ms), so
    /// a late or duplicated message of an older session is ignored instead
    /// of tearing down the current one; a higher id means the peer started a
    /// new session (it restarted): ours is rebuilt to match.
    pub fn handle_message(&mut self, now: Instant, from: PeerKey, message: PeerMessage) {
        // Every member-controlled field is checked before anything is
        // created for it or handed to the ICE agent.
        let checked = match &message {
            PeerMessage::Offer {
                session,
                ufrag,
                pwd,
                wg_port,
                ..
            }
            | PeerMessage::Answer {
                session,
                ufrag,
                pwd,
                wg_port,
                ..
            } => validate::session_fields(*session, *wg_port)
                .and_then(|_| validate::ice_credentials(ufrag, pwd)),
            PeerMessage::Candidate { session, candidate } => {
                validate::session_fields(*session, None)
                    .and_then(|_| validate::candidate_line(candidate))
            }
            PeerMessage::PunchOffer {
                session,
                port,
                delta,
            }
            | PeerMessage::PunchAnswer {
                session,
                port,
                delta,
            } => validate::punch_ports(*session, *port, *delta),
            PeerMessage::PunchGo { session } => validate::session_fields(*session, None),
            PeerMessage::BirthdayReady { session, sockets } => {
                validate::birthday_fields(*session, *sockets, 0)
            }
            PeerMessage::BirthdayDone {
                session, probes, ..
            } => validate::birthday_fields(*session, 1, *probes),
            _ => Ok(()),
        };
        if let Err(r) = checked {
            self.refuse(now, &from, r);
            return;
        }
        if !self.peers.contains_key(&from) {
            // Only an offer makes an `auto` peer: a late candidate or goodbye
            // from a peer already dropped must not bring it back. A
            // candidate that overtook its offer waits in a small shared
            // buffer (oldest evicted first).
            if !self.opts.auto_peers || from == self.opts.public_key {
                self.drops.signal_rejected += 1;
                return;
            }
            match message {
                PeerMessage::Offer { .. } => {
                    if !self.admit(now, &from) {
                        return;
                    }
                    self.manage(now, from, Vec::new())
                }
                PeerMessage::Candidate { session, candidate } => {
                    if self.early.len() == MAX_EARLY_CANDIDATES {
                        self.early.pop_front();
                        self.drops.signal_rejected += 1;
                    }
                    self.early.push_back((from, session, candidate));
                    return;
                }
                _ => {
                    self.drops.signal_rejected += 1;
                    return;
                }
            }
        }
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        let known = p.session.as_ref().map(|s| s.remote_id);
        match message {
            PeerMessage::Offer {
                session,
                ufrag,
                pwd,
                candidates,
                wg_port,
                cert,
            } => {
                // An older id is a late copy, unless our session with them
                // has gone quiet: then it is a restart with a clock that
                // went backwards (no RTC before NTP), and refusing it would
                // lock the peer out.
                let quiet = p.session.as_ref().is_none_or(|s| {
                    s.ice
                        .last_heard()
                        .is_none_or(|t| now.saturating_duration_since(t) > STALE_SESSION)
                });
                match known {
                    // Our offer crossed theirs, or this is a repeat: take it.
                    Some(None) => {}
                    Some(Some(id)) if id == session => {}
                    Some(Some(id)) if session < id && !quiet => {
                        self.drops.signal_rejected += 1;
                        return;
                    }
                    // A new session on their side (restart), or none on ours.
                    _ => self.new_session(now, from),
                }
                let Some(p) = self.peers.get_mut(&from) else {
                    return;
                };
                p.online = true;
                p.offline_since = None;
                p.remote_wg_port = wg_port;
                self.present(now, from, cert.as_deref());
                self.accept_remote(now, from, session, ufrag, pwd, candidates);
                self.send_answer(from);
            }
            PeerMessage::Answer {
                session,
                ufrag,
                pwd,
                candidates,
                wg_port,
                cert,
            } => {
                if known == Some(None) || known == Some(Some(session)) {
                    p.remote_wg_port = wg_port;
                    self.present(now, from, cert.as_deref());
                }
                match known {
                    Some(None) => self.accept_remote(now, from, session, ufrag, pwd, candidates),
                    Some(Some(id)) if id == session => {
                        self.accept_remote(now, from, session, ufrag, pwd, candidates)
                    }
                    // The peer moved to a newer session than the one our
                    // session knows: start over with it.
                    Some(Some(id)) if session > id => {
                        self.new_session(now, from);
                        self.send_offer(now, from);
                    }
                    _ => self.drops.signal_rejected += 1,
                }
            }
            PeerMessage::Candidate { session, candidate } => {
                match known.flatten() {
                    Some(id) if id == session => self.add_remote(now, from, &candidate),
                    Some(id) if session < id => self.drops.signal_rejected += 1,
                    // Their offer for this session is still on its way (or
                    // signaling reordered it): keep it, bounded, until an
                    // offer or answer names this session.
                    _ if p.pending.len() < MAX_PENDING_CANDIDATES => {
                        p.pending.push((session, candidate))
                    }
                    _ => self.drops.signal_rejected += 1,
                }
            }
            PeerMessage::Restart { session } if known.flatten().is_some_and(|id| session >= id) => {
                self.new_session(now, from);
                self.send_offer(now, from);
            }
            PeerMessage::Bye { session } if known.flatten() == Some(session) => {
                self.drop_session(now, from);
                if self.opts.auto_peers {
                    self.unmanage(now, from);
                }
            }
            // About the node, not the session: any session id will do.
            PeerMessage::Facts { nat, .. } => self.handle_facts(now, from, &nat),
            PeerMessage::PunchOffer {
                session,
                port,
                delta,
            } => self.handle_punch(now, from, session, Msg::Offer(Ports { port, delta })),
            PeerMessage::PunchAnswer {
                session,
                port,
                delta,
            } => self.handle_punch(now, from, session, Msg::Answer(Ports { port, delta })),
            PeerMessage::PunchGo { session } => self.handle_punch(now, from, session, Msg::Go),
            PeerMessage::BirthdayReady { session, sockets } => {
                self.handle_birthday(now, from, session, crate::birthday::Msg::Ready { sockets })
            }
            PeerMessage::BirthdayDone {
                session,
                probes,
                won,
            } => self.handle_birthday(
                now,
                from,
                session,
                crate::birthday::Msg::Done { probes, won },
            ),
            PeerMessage::Unknown => {
                tracing::debug!(peer = %from, "ignored a message type this agent does not know (a newer agent?)");
            }
            _ => {}
        }
    }

    /// The full list of online members (after connecting): peers missing
    /// from it went offline while we were not connected.
    pub fn handle_members(&mut self, now: Instant, members: &[(PeerKey, Vec<String>)]) {
        for (k, overlay) in members {
            self.handle_member(now, *k, overlay);
        }
        for (k, p) in self.peers.iter_mut() {
            if !members.iter().any(|(m, _)| m == k) {
                p.online = false;
                p.offline_since.get_or_insert(now);
            }
        }
    }

    /// The host addresses changed (interfaces up/down, roaming): offer the
    /// new ones, withdraw the gone ones and retry direct at once.
    pub fn set_host_addrs(&mut self, now: Instant, host: Vec<IpNet>) {
        if self.update_host(now, host) {
            self.retry_all_direct(now);
        }
    }

    /// The kernel reported a network change (an address, link or default
    /// route came or went; `why` says which): re-gather everything at once.
    /// Host candidates follow `host`; each relay gets a Refresh (a node that
    /// moved behind another NAT is a new 5-tuple to the relay, which answers
    /// 437 and the allocation is made again at once; unmoved, the Refresh
    /// just succeeds), a STUN-only server a new Binding, a relay waiting to
    /// retry is tried now; every peer's direct pairs are checked again.
    pub fn network_changed(&mut self, now: Instant, host: Vec<IpNet>, why: String) {
        tracing::info!(
            "network changed ({why}): re-gathering, re-checking relays and direct paths"
        );
        self.network_change = Some((now, why));
        self.network_changes += 1;
        self.update_host(now, host);
        for i in 0..self.relays.len() {
            let r = &mut self.relays[i];
            if r.stream {
                // A stream whose route went away ends by itself and is
                // reconnected on the new one.
                continue;
            }
            match (r.spec.turn.is_some(), r.turn.as_mut()) {
                (true, Some(t)) => t.refresh_now(now),
                (true, None) | (false, _) => {
                    if r.retry_at.is_some() {
                        r.retry_at = Some(now);
                    }
                }
            }
        }
        self.handle_timeout(now);
        self.retry_all_direct(now);
    }

    /// The last network change the kernel reported: how long ago, and what.
    pub fn network_change(&self, now: Instant) -> Option<(Duration, &str)> {
        self.network_change
            .as_ref()
            .map(|(t, why)| (now.saturating_duration_since(*t), why.as_str()))
    }

    /// Network changes reported so far.
    pub fn network_changes(&self) -> u64 {
        self.network_changes
    }

    /// Sessions restarted because our public address changed, so far.
    pub fn address_restarts(&self) -> u64 {
        self.restarts
    }

    fn retry_all_direct(&mut self, now: Instant) {
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for k in keys {
            if let Some(s) = self.peers.get_mut(&k).and_then(|p| p.session.as_mut()) {
                s.ice.retry_direct_now(now);
            }
            self.drain_session(now, &k);
        }
    }

    /// Takes `host` as our host addresses; true when they changed.
    fn update_host(&mut self, now: Instant, host: Vec<IpNet>) -> bool {
        if host == self.opts.host {
            return false;
        }
        let gone: Vec<Candidate> = self
            .local
            .iter()
            .filter(|c| {
                c.kind() == crate::CandidateKind::Host
                    && !host.iter().any(|n| n.addr() == c.addr().ip())
            })
            .cloned()
            .collect();
        let new: Vec<IpNet> = host
            .iter()
            .filter(|n| !self.opts.host.iter().any(|o| o.addr() == n.addr()))
            .copied()
            .collect();
        self.opts.host = host;
        for c in gone {
            self.remove_local(now, &c);
        }
        for n in new {
            if let Ok(c) = Candidate::host(SocketAddr::new(n.addr(), self.opts.port), "udp") {
                self.add_local(now, c);
            }
        }
        true
    }

    /// The gateway mapped `mapped` to our port (PCP / NAT-PMP), or the
    /// mapping is gone (`None`): offer it as a server-reflexive candidate
    /// ranked above the STUN one, or withdraw it. `status` is what
    /// `ice-agent status` shows.
    pub fn set_port_mapping(&mut self, now: Instant, mapped: Option<SocketAddr>, status: String) {
        self.port_mapping_status = Some(status);
        if mapped == self.port_mapped {
            return;
        }
        let srflx = |local: &[Candidate], a: SocketAddr| {
            local
                .iter()
                .find(|c| c.addr() == a && c.kind() == crate::CandidateKind::ServerReflexive)
                .cloned()
        };
        if let Some(old) = self.port_mapped.take() {
            if let Some(c) = srflx(&self.local, old) {
                self.remove_local(now, &c);
            }
        }
        self.port_mapped = mapped;
        for p in self.peers.values_mut() {
            if let Some(s) = p.session.as_mut() {
                s.ice.set_port_mapped(mapped);
            }
        }
        let Some(m) = mapped else { return };
        // STUN may already offer the same address (a NAT that preserves
        // ports): offer it again with the port-mapped rank.
        if let Some(c) = srflx(&self.local, m) {
            self.remove_local(now, &c);
        }
        let base = self
            .opts
            .host
            .iter()
            .map(|n| n.addr())
            .find(|a| a.is_ipv4() == m.is_ipv4());
        if let Some(ip) = base {
            if let Ok(c) =
                Candidate::server_reflexive(m, SocketAddr::new(ip, self.opts.port), "udp")
            {
                self.add_local(now, c);
            }
        }
    }

    /// Port mapping as status shows it (`None`: turned off).
    pub fn port_mapping(&self) -> Option<&str> {
        self.port_mapping_status.as_deref()
    }

    /// A relay that became usable later (its name resolved): allocate now.
    pub fn add_relay(&mut self, now: Instant, spec: RelaySpec) {
        if self.relays.iter().any(|r| r.spec.server == spec.server) {
            return;
        }
        if spec.turn.is_some() {
            self.health.add(spec.server);
        }
        self.relays.push(RelayState {
            spec,
            turn: None,
            step: 0,
            good: None,
            stream: false,
            udp_deadline: None,
            stream_deadline: None,
            answered: false,
            udp_blocked: false,
            base: None,
            relayed: Vec::new(),
            mapped: None,
            permitted: HashMap::new(),
            channels: HashMap::new(),
            retry_at: Some(now),
            failures: 0,
            binding_tid: None,
            problem: None,
            last_rx: None,
            bound_until: None,
            renew_by: None,
            renewing: false,
            moving: Vec::new(),
        });
    }

    /// New credentials for the relay at `server` (TURN REST credentials
    /// expire: the driver re-mints them well before). Used for the current
    /// allocation's refreshes and for every later allocation.
    pub fn set_relay_credentials(
        &mut self,
        now: Instant,
        server: SocketAddr,
        username: &str,
        password: &str,
    ) {
        for r in self.relays.iter_mut().filter(|r| r.spec.server == server) {
            if let Some(cfg) = r.spec.turn.as_mut() {
                cfg.username = username.to_owned();
                cfg.password = password.to_owned();
            }
            // (While re-allocating, the next allocation takes them.)
            if let Some(t) = r.turn.as_mut() {
                if !r.renewing {
                    t.set_credentials(now, username, password);
                }
            }
        }
    }

    /// Tells every peer we are going away, and releases the allocations.
    pub fn shutdown(&mut self, now: Instant) {
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for k in keys {
            if let Some(s) = self.peers.get(&k).and_then(|p| p.session.as_ref()) {
                let session = s.local_id;
                self.out.push_back(Output::Signal {
                    to: k,
                    message: PeerMessage::Bye { session },
                });
            }
        }
        for i in 0..self.relays.len() {
            if let Some(t) = self.relays[i].turn.as_mut() {
                if t.is_allocated() {
                    t.deallocate(now);
                }
            }
            let server = self.relays[i].spec.server;
            while let Some(d) = self.relays[i].turn.as_mut().and_then(|t| t.poll_transmit()) {
                self.out.push_back(Output::Send {
                    to: server,
                    data: d,
                });
            }
        }
    }

    /// Remote candidates the current session with `peer` has taken.
    pub fn remote_candidate_count(&self, peer: &PeerKey) -> usize {
        self.peers.get(peer).map_or(0, |p| p.remote_candidates)
    }

    /// The ICE session ids with `peer`: (ours, theirs once known).
    pub fn session_ids(&self, peer: &PeerKey) -> Option<(u64, Option<u64>)> {
        let s = self.peers.get(peer)?.session.as_ref()?;
        Some((s.local_id, s.remote_id))
    }

    /// One status row per managed peer, sorted by key (byte counters are
    /// what the agent forwarded; the driver may replace them with the
    /// interface's).
    pub fn status(&self, now: Instant) -> Vec<(PeerKey, PeerStatus, u64)> {
        let mut rows: Vec<(PeerKey, PeerStatus, u64)> = self
            .peers
            .iter()
            .map(|(k, p)| {
                let (report, changes, failovers) = match &p.session {
                    Some(s) => {
                        let mut r = s.ice.path().report(now);
                        if s.remote_id.is_none() && r.path == PathKind::Connecting {
                            r.reason = if p.online {
                                "connecting: offer sent, waiting for the peer's answer".into()
                            } else {
                                "connecting: peer is not online in signaling".into()
                            };
                        }
                        if let (true, Some(local)) = (r.via_relay, r.local) {
                            // Say how the relay itself is reached when it
                            // is not over UDP.
                            if let Some(note) = self
                                .relays
                                .iter()
                                .find(|x| x.relayed.contains(&local))
                                .and_then(transport_note)
                            {
                                r.reason = format!("{} (relayed over {note})", r.reason);
                            }
                        }
                        (r, s.ice.stats().path_changes, s.ice.stats().failovers)
                    }
                    None => (
                        PathReport {
                            path: PathKind::Connecting,
                            reason: if p.online {
                                "connecting: starting a session".into()
                            } else {
                                "waiting: peer is not online in signaling".into()
                            },
                            local: None,
                            remote: None,
                            via_relay: false,
                            rtt_ms: None,
                            since_secs: now.saturating_duration_since(p.created).as_secs(),
                            blackhole: None,
                        },
                        0,
                        0,
                    ),
                };
                let mut row = PeerStatus::new(
                    k.to_string(),
                    report,
                    p.rx_bytes,
                    0,
                    p.path_changes_before + changes,
                );
                row.allowed_ips = p.allowed_ips.iter().map(|n| n.to_string()).collect();
                row.name = p.membership.as_ref().map(|m| m.name.clone());
                row.membership = p.cert_problem.clone().or_else(|| p.withheld.clone());
                row.nat = p.remote_nat.as_ref().map(|f| f.summary());
                (*k, row, p.failovers_before + failovers)
            })
            .collect();
        rows.sort_by_key(|r| r.0);
        rows
    }

    /// Direct attempts that failed and were retried, over all sessions
    /// (dropped ones included, so the count never goes down).
    pub fn direct_retries(&self) -> u64 {
        self.session_totals().direct_retries
    }

    /// Counters summed over every session so far (dropped ones included,
    /// so they never go down).
    pub fn session_totals(&self) -> SessionTotals {
        let mut t = self.retired;
        for s in self.peers.values().filter_map(|p| p.session.as_ref()) {
            t.add(&s.ice.stats());
        }
        t
    }

    // ---- peers and sessions -------------------------------------------------

    fn manage(&mut self, now: Instant, key: PeerKey, allowed_ips: Vec<IpNet>) {
        // Candidates this member sent before it was a peer.
        let early: Vec<(u64, String)> = self
            .early
            .iter()
            .filter(|e| e.0 == key)
            .map(|e| (e.1, e.2.clone()))
            .collect();
        self.early.retain(|e| e.0 != key);
        self.peers.insert(
            key,
            Peer {
                allowed_ips: allowed_ips.clone(),
                pending: early,
                online: false,
                // Until signaling says it is online (callers that know set it).
                offline_since: Some(now),
                session: None,
                remote_wg_port: None,
                route: None,
                rx_bytes: 0,
                path_changes_before: 0,
                failovers_before: 0,
                remote_candidates: 0,
                created: now,
                claimed: Vec::new(),
                membership: None,
                cert_problem: (!self.opts.cas.is_empty())
                    .then(|| "no membership certificate presented yet: routes nothing".into()),
                withheld: None,
                listed: false,
                remote_nat: None,
            },
        );
        self.out.push_back(Output::PeerAdded {
            peer: key,
            allowed_ips,
        });
        self.set_route(
            key,
            PeerRoute {
                endpoint: Endpoint::Proxy,
                route: Route::Hold,
                via: 0,
            },
        );
    }

    fn unmanage(&mut self, now: Instant, key: PeerKey) {
        if let Some(p) = self.peers.remove(&key) {
            self.owner.retain(|_, k| *k != key);
            self.out.push_back(Output::PeerRemoved { peer: key });
            // Without a CA nothing binds an address to a key: a vanished
            // member's addresses go to no other key for a while, so a
            // member cannot take over a node that merely rebooted.
            if self.opts.cas.is_empty() && !p.listed {
                let until = now + self.opts.address_quarantine;
                for n in p.allowed_ips {
                    if self.quarantine.len() < MAX_QUARANTINE {
                        self.quarantine.insert(n, (key, until));
                    }
                }
            }
            // Addresses it held may now be free for a waiting member.
            self.regrant_all(now);
        }
    }

    fn new_session(&mut self, now: Instant, key: PeerKey) {
        self.drop_session(now, key);
        let mut cfg = SessionConfig::new(
            is_controlling(&self.opts.public_key.0, &key.0),
            self.rng.random(),
        );
        // Our ICE credentials come from the agent's RNG too (RFC 8445 §5.3:
        // ≥ 24 bits of ufrag, ≥ 128 bits of password; 96 and 144 here).
        cfg.local_credentials = Some(IceCreds {
            ufrag: ice_chars(&mut self.rng, 16),
            pass: ice_chars(&mut self.rng, 24),
        });
        cfg.local_networks = self.opts.host.iter().map(|n| n.trunc()).collect();
        cfg.port_mapped = self.port_mapped;
        let mut ice = PeerSession::new(cfg, now);
        for c in &self.local {
            let _ = ice.add_local_candidate(now, c.clone());
        }
        ice.set_relays(now, self.relay_view.clone());
        self.next_session_id += 1;
        let p = self.peers.get_mut(&key).expect("managed");
        p.remote_candidates = 0;
        p.session = Some(Sess {
            ice,
            local_id: self.next_session_id,
            remote_id: None,
            offered_at: now,
            unanswered: 0,
        });
        self.tell_session_nat(now, key);
        self.drain_session(now, &key);
    }

    /// A relayed peer fell silent (its keepalive answers stopped): our NAT
    /// may have rebound, which no kernel event tells. A Refresh to each
    /// relay finds out: from a new 5-tuple it is answered 437, the
    /// allocation is made again, and the new mapping restarts the sessions
    /// ([`Agent::restart_all`]). Only for a fresh silence (between
    /// [`SILENT_PROBE_AFTER`] and [`SILENT_PROBE_UNTIL`]; a peer gone for
    /// longer is the vanish logic's), at most once per second.
    fn probe_relays_if_silent(&mut self, now: Instant) {
        if self.refreshed_recently(now) {
            return;
        }
        let silent = self.peers.values().any(|p| {
            p.session.as_ref().is_some_and(|s| {
                s.ice.path().kind == PathKind::Relay
                    && s.ice.last_heard().is_some_and(|t| {
                        let quiet = now.saturating_duration_since(t);
                        (SILENT_PROBE_AFTER..SILENT_PROBE_UNTIL).contains(&quiet)
                    })
            })
        });
        if silent {
            tracing::debug!("a relayed peer fell silent: refreshing our allocations");
            self.refresh_allocations(now);
        }
    }

    /// Sends every relay a Refresh now (a 437 answer means our 5-tuple
    /// changed: the allocation is made again). At most once per second,
    /// whichever cause asks ([`Agent::probe_relays_if_silent`],
    /// [`Agent::mapping_changed`]).
    fn refresh_allocations(&mut self, now: Instant) {
        self.last_silence_probe = Some(now);
        for r in &mut self.relays {
            if let Some(t) = r.turn.as_mut() {
                t.refresh_now(now);
            }
        }
    }

    /// Whether [`Agent::refresh_allocations`] ran within the last second.
    fn refreshed_recently(&self, now: Instant) -> bool {
        self.last_silence_probe
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
    }

    /// A peer's answers on a host pair see us at a new address: our NAT
    /// rebound (its mappings were flushed), which no kernel event tells.
    /// Our relay allocations hang on the old mapping too, so every relay
    /// gets a Refresh now: from the new 5-tuple it is answered 437, the
    /// allocation is made again, and the new mapping restarts the sessions
    /// ([`Agent::restart_all`]). At most once per second (shared with
    /// [`Agent::probe_relays_if_silent`]).
    fn mapping_changed(
        &mut self,
        now: Instant,
        peer: PeerKey,
        local: SocketAddr,
        old: SocketAddr,
        new: SocketAddr,
    ) {
        if self.refreshed_recently(now) {
            return;
        }
        tracing::info!(%peer, %local, %old, %new, "our NAT mapping changed: checking our relay allocations");
        self.refresh_allocations(now);
    }

    /// Our public address changed from `old` to `new` (a relay allocated
    /// again and reports another mapping): restart ICE with every peer, as
    /// WebRTC does after a network change. The peer rebuilds its session
    /// on the new offer, so both start over from the relay (first path in
    /// one signaling round trip) and check direct pairs afresh, instead of
    /// each waiting out `failover_after` on paths that end at `old`. At
    /// most once per [`RESTART_SPACING`].
    fn restart_all(&mut self, now: Instant, old: SocketAddr, new: SocketAddr) {
        if self
            .last_restart
            .is_some_and(|t| now.saturating_duration_since(t) < RESTART_SPACING)
        {
            return;
        }
        self.last_restart = Some(now);
        let keys: Vec<PeerKey> = self
            .peers
            .iter()
            .filter(|(_, p)| p.session.is_some())
            .map(|(k, _)| *k)
            .collect();
        tracing::info!(%old, %new, peers = keys.len(), "our public address changed: restarting ICE with every peer");
        self.restarts += keys.len() as u64;
        for k in keys {
            self.new_session(now, k);
            self.send_offer(now, k);
        }
    }

    fn drop_session(&mut self, now: Instant, key: PeerKey) {
        self.release_sockets(key);
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        if let Some(s) = p.session.take() {
            // Stop keeping this session's relay state alive (permissions
            // other peers still use stay).
            for r in self.relays.iter_mut() {
                let Some(t) = r.turn.as_mut() else { continue };
                r.permitted.retain(|ip, users| {
                    users.remove(&key);
                    if users.is_empty() {
                        t.release_permission(*ip);
                    }
                    !users.is_empty()
                });
                r.channels.retain(|peer, owner| {
                    if *owner == key {
                        t.release_channel(now, *peer);
                    }
                    *owner != key
                });
            }
            let st = s.ice.stats();
            p.path_changes_before += st.path_changes;
            p.failovers_before += st.failovers;
            self.retired.add(&st);
            self.owner.retain(|_, k| *k != key);
            self.set_route(
                key,
                PeerRoute {
                    endpoint: Endpoint::Proxy,
                    route: Route::Hold,
                    via: 0,
                },
            );
        }
    }

    fn check_vanished(&mut self, now: Instant, key: &PeerKey) {
        let Some(p) = self.peers.get(key) else {
            return;
        };
        let Some(since) = p.offline_since else {
            return;
        };
        let heard = p
            .session
            .as_ref()
            .and_then(|s| s.ice.last_heard())
            .unwrap_or(since);
        let quiet_since = heard.max(since);
        if now.saturating_duration_since(quiet_since) >= self.opts.vanish_after {
            tracing::info!(peer = %key, "peer offline and silent: dropping its session");
            self.drop_session(now, *key);
            let p = self.peers.get_mut(key).expect("checked");
            p.offline_since = None;
            if self.opts.auto_peers {
                self.unmanage(now, *key);
            }
        }
    }

    fn send_offer(&mut self, now: Instant, key: PeerKey) {
        let Some(s) = self.peers.get_mut(&key).and_then(|p| p.session.as_mut()) else {
            return;
        };
        s.offered_at = now;
        s.unanswered = s.unanswered.saturating_add(1);
        if let Some((session, ufrag, pwd, candidates, wg_port)) = self.description(&key) {
            let message = PeerMessage::Offer {
                session,
                ufrag,
                pwd,
                candidates,
                wg_port,
                cert: self.opts.certificate.clone(),
            };
            self.out.push_back(Output::Signal { to: key, message });
            self.send_facts(key);
        }
    }

    fn send_answer(&mut self, key: PeerKey) {
        if let Some((session, ufrag, pwd, candidates, wg_port)) = self.description(&key) {
            let message = PeerMessage::Answer {
                session,
                ufrag,
                pwd,
                candidates,
                wg_port,
                cert: self.opts.certificate.clone(),
            };
            self.out.push_back(Output::Signal { to: key, message });
            self.send_facts(key);
        }
    }

    /// What an offer or answer to `key` carries: session id, ICE
    /// credentials, our candidates, our WireGuard port.
    fn description(&self, key: &PeerKey) -> Option<Description> {
        let s = self.peers.get(key)?.session.as_ref()?;
        let creds = s.ice.local_credentials().clone();
        Some((
            s.local_id,
            creds.ufrag,
            creds.pass,
            self.local.iter().map(|c| c.to_sdp_string()).collect(),
            self.opts.wg_port,
        ))
    }

    fn accept_remote(
        &mut self,
        now: Instant,
        key: PeerKey,
        session: u64,
        ufrag: String,
        pass: String,
        candidates: Vec<String>,
    ) {
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        let Some(s) = p.session.as_mut() else {
            return;
        };
        let mut pending = Vec::new();
        if s.remote_id.is_none() {
            s.remote_id = Some(session);
            s.ice.set_remote_credentials(now, IceCreds { ufrag, pass });
            pending = std::mem::take(&mut p.pending);
        }
        for c in &candidates {
            self.add_remote(now, key, c);
        }
        for (id, c) in pending {
            if id == session {
                self.add_remote(now, key, &c);
            } else if id > session {
                // For a session newer than this one: keep waiting.
                if let Some(p) = self.peers.get_mut(&key) {
                    p.pending.push((id, c));
                }
            }
        }
        self.drain_session(now, &key);
    }

    fn add_remote(&mut self, now: Instant, key: PeerKey, sdp: &str) {
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        // A session has a handful of candidates; a peer sending more is
        // buggy or hostile, and each one costs checks.
        if p.remote_candidates >= MAX_REMOTE_CANDIDATES {
            self.drops.signal_rejected += 1;
            return;
        }
        if p.session.is_none() {
            return;
        }
        let c = match validate::candidate_line(sdp).and_then(|_| {
            Candidate::from_sdp_string(sdp)
                .map_err(|e| Refusal::BadCandidate(format!("candidate does not parse: {e}")))
        }) {
            Ok(c) if c.proto() != is::Protocol::Udp => {
                let r = Refusal::BadCandidate(format!("candidate {} is not UDP", c.addr()));
                return self.refuse(now, &key, r);
            }
            Ok(c) => c,
            Err(r) => return self.refuse(now, &key, r),
        };
        let addr = c.addr();
        if let Err(r) = validate::candidate_addr(addr, &self.own_addrs()) {
            return self.refuse(now, &key, r);
        }
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        let Some(s) = p.session.as_mut() else {
            return;
        };
        // Repeats (re-offers after a reconnect) cost nothing.
        if s.ice.add_remote_candidate(now, c) {
            p.remote_candidates += 1;
        }
        self.note_owner(addr, key, false);
        self.drain_session(now, &key);
    }

    /// Remembers that `addr` belongs to `key` (for WireGuard packets, which
    /// carry no credentials). Bounded per peer and in total. `proven`: the
    /// address answered an authenticated check for this peer's session, so
    /// it may take the address over; a candidate a peer merely *signalled*
    /// never displaces another peer's address (a member naming a victim's
    /// address must not capture its packets).
    fn note_owner(&mut self, addr: SocketAddr, key: PeerKey, proven: bool) {
        match self.owner.get(&addr) {
            Some(k) if *k == key => return,
            Some(_) if !proven => return,
            _ => {}
        }
        let mine = self.owner.values().filter(|k| **k == key).count();
        if mine < MAX_OWNED_PER_PEER && self.owner.len() < MAX_OWNED {
            self.owner.insert(addr, key);
        }
    }

    // ---- local candidates ---------------------------------------------------

    fn add_local(&mut self, now: Instant, c: Candidate) {
        if self
            .local
            .iter()
            .any(|l| l.addr() == c.addr() && l.kind() == c.kind())
        {
            return;
        }
        self.local.push(c.clone());
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for k in keys {
            let Some(s) = self.peers.get_mut(&k).and_then(|p| p.session.as_mut()) else {
                continue;
            };
            if let Ok(added) = s.ice.add_local_candidate(now, c.clone()) {
                let message = PeerMessage::Candidate {
                    session: s.local_id,
                    candidate: added.to_sdp_string(),
                };
                self.out.push_back(Output::Signal { to: k, message });
            }
            self.drain_session(now, &k);
        }
    }

    fn remove_local(&mut self, now: Instant, c: &Candidate) {
        self.local
            .retain(|l| !(l.addr() == c.addr() && l.kind() == c.kind()));
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for k in keys {
            if let Some(s) = self.peers.get_mut(&k).and_then(|p| p.session.as_mut()) {
                s.ice.remove_local_candidate(now, c);
            }
            self.drain_session(now, &k);
        }
    }

    // ---- relays -------------------------------------------------------------

    fn start_relay(&mut self, now: Instant, i: usize) {
        // A fresh seed per client: a repeated Allocate transaction id would
        // read as a retransmission to the server.
        let seed = self.rng.random();
        let r = &mut self.relays[i];
        r.answered = false;
        r.udp_deadline = None;
        r.stream_deadline = None;
        match &r.spec.turn {
            Some(cfg) => {
                r.permitted.clear();
                r.channels.clear();
                let path = r.spec.path(r.step);
                if path.transport != Transport::Udp {
                    // The TURN client starts once the stream is up.
                    r.turn = None;
                    r.stream = true;
                    // A firewall that drops UDP usually drops TCP to 3478
                    // too (silently: the SYN gets no answer). Where TLS on
                    // 443 is still to try, TCP gets a short budget instead
                    // of the whole connect timeout.
                    r.stream_deadline = (path.transport == Transport::Tcp
                        && r.step + 1 < r.spec.paths.len()
                        && r.good != Some(r.step))
                    .then(|| now + TCP_CONNECT_BUDGET);
                    let server = r.spec.server;
                    tracing::info!(%server, transport = %path.transport, addr = %path.addr, "connecting to the relay over a stream");
                    self.out.push_back(Output::RelayConnect { server, path });
                    return;
                }
                let mut t = TurnClient::new(cfg.clone(), seed);
                t.allocate(now);
                r.turn = Some(t);
                // Quick fallback only where UDP has not worked yet: a relay
                // that allocated over UDP and is silent now is more likely
                // restarting than blocked (the TURN client's own timeout,
                // ~40 s, still moves on to the next path).
                if r.step + 1 < r.spec.paths.len() && r.good != Some(r.step) {
                    r.udp_deadline = Some(now + UDP_FALLBACK_AFTER);
                }
            }
            None => {
                let tid: stun::TransactionId = self.rng.random();
                let mut buf = Vec::new();
                MessageBuilder::new(&mut buf, method::BINDING, Class::Request, tid).fingerprint();
                r.binding_tid = Some(tid);
                // Retry quickly until answered, then refresh the mapping.
                r.retry_at = Some(now + Duration::from_secs(1 << r.failures.min(5)));
                r.failures += 1;
                let stale = r.failures > 3;
                if stale {
                    r.problem = Some(format!(
                        "no answer to {} STUN Binding requests",
                        r.failures - 1
                    ));
                }
                let to = r.spec.server;
                self.out.push_back(Output::Send { to, data: buf });
                if stale {
                    self.set_mapped(now, i, None);
                }
            }
        }
    }

    fn handle_binding_response(&mut self, now: Instant, i: usize, data: &[u8]) {
        let Ok(msg) = stun::Message::parse(data) else {
            self.drops.malformed += 1;
            return;
        };
        let r = &mut self.relays[i];
        if msg.class() != Class::Success || Some(msg.transaction_id()) != r.binding_tid {
            return;
        }
        r.binding_tid = None;
        r.failures = 0;
        r.problem = None;
        r.retry_at = Some(now + STUN_REFRESH);
        let Some(Ok(mapped)) = msg.xor_address(attr::XOR_MAPPED_ADDRESS) else {
            return;
        };
        self.set_mapped(now, i, Some(mapped));
    }

    fn set_mapped(&mut self, now: Instant, i: usize, mapped: Option<SocketAddr>) {
        let old = self.relays[i].mapped;
        if old == mapped {
            return;
        }
        self.relays[i].mapped = mapped;
        if let Some(old) = old {
            let still =
                self.relays.iter().any(|r| r.mapped == Some(old)) || self.port_mapped == Some(old);
            if !still {
                if let Some(c) = self
                    .local
                    .iter()
                    .find(|c| c.addr() == old && c.kind() == crate::CandidateKind::ServerReflexive)
                    .cloned()
                {
                    self.remove_local(now, &c);
                }
            }
        }
        if let Some(m) = mapped {
            if let Some(base) = self.base_for(i, m.ip()) {
                if base.ip() != m.ip() {
                    if let Ok(c) = Candidate::server_reflexive(m, base, "udp") {
                        self.add_local(now, c);
                    }
                }
            }
        }
    }

    fn base_for(&self, i: usize, family_of: IpAddr) -> Option<SocketAddr> {
        let ip = self.relays[i]
            .base
            .filter(|b| !b.is_unspecified())
            .or_else(|| {
                self.opts
                    .host
                    .iter()
                    .map(|n| n.addr())
                    .find(|a| a.is_ipv4() == family_of.is_ipv4())
            })?;
        Some(SocketAddr::new(ip, self.opts.port))
    }

    fn drain_relay(&mut self, now: Instant, i: usize) {
        let server = self.relays[i].spec.server;
        loop {
            let Some(t) = self.relays[i].turn.as_mut() else {
                return;
            };
            if let Some(d) = t.poll_transmit() {
                self.out.push_back(Output::Send {
                    to: server,
                    data: d,
                });
                continue;
            }
            let Some(ev) = t.poll_event() else { break };
            if self.relays[i].renewing
                && matches!(
                    ev,
                    ClientEvent::Deallocated
                        | ClientEvent::Lost { .. }
                        | ClientEvent::Failed {
                            request: "Refresh",
                            ..
                        }
                )
            {
                self.renew_deallocated(now, i);
                continue;
            }
            match ev {
                ClientEvent::Allocated {
                    relayed, mapped, ..
                } => {
                    let r = &mut self.relays[i];
                    let path = r.spec.path(r.step);
                    tracing::info!(%server, ?relayed, ?mapped, transport = %path.transport, "TURN allocation ready");
                    r.failures = 0;
                    r.problem = None;
                    r.good = Some(r.step);
                    r.udp_deadline = None;
                    if path.transport == Transport::Udp {
                        r.udp_blocked = false;
                    }
                    r.relayed = relayed.clone();
                    // Over a stream the mapped address is our TCP mapping,
                    // which says nothing about UDP: no server-reflexive
                    // candidate from it. (Relayed candidates are UDP either
                    // way: the relay relays UDP to peers.)
                    // The relay sees us at another address than before: we
                    // roamed or our NAT rebound. Every path the peers know
                    // ends at the old one.
                    let moved = match (r.mapped, mapped) {
                        (Some(old), Some(new))
                            if path.transport == Transport::Udp && old != new =>
                        {
                            Some((old, new))
                        }
                        _ => None,
                    };
                    if path.transport == Transport::Udp {
                        self.set_mapped(now, i, mapped);
                    }
                    for a in relayed {
                        if let Some(base) = self.base_for(i, a.ip()) {
                            if let Ok(c) = Candidate::relayed(a, base, "udp") {
                                self.add_local(now, c);
                            }
                        }
                    }
                    self.relays[i].bound_until = self.allocation_expiry(i);
                    self.health.set_usable(now, server, true);
                    self.push_relay_view(now);
                    if let Some((old, new)) = moved {
                        self.restart_all(now, old, new);
                    }
                    self.move_peers(now, i);
                }
                ClientEvent::Refreshed { .. } => {
                    // (A relay that took new credentials in place.)
                    self.relays[i].bound_until = self.allocation_expiry(i);
                }
                ClientEvent::ChannelBound { peer, channel } => {
                    self.channel_ready(server, peer, channel);
                }
                ClientEvent::Failed {
                    request: "Allocate",
                    code: 0,
                    reason,
                } => {
                    // No answer on this path: the next one, if any.
                    self.next_path(now, i, format!("Allocate failed: {reason}"));
                }
                ClientEvent::Failed {
                    request: "Allocate",
                    code,
                    reason,
                } => {
                    self.relay_down(now, i, format!("Allocate failed: {code} {reason}"), false);
                }
                ClientEvent::Failed {
                    request: "Refresh",
                    code: 441,
                    reason,
                } => {
                    tracing::info!(%server, "TURN Refresh with new credentials refused: {reason}");
                    self.plan_renewal(now, i);
                }
                ClientEvent::Failed {
                    request,
                    code,
                    reason,
                } => {
                    tracing::debug!(%server, "TURN {request} failed: {code} {reason}");
                }
                ClientEvent::Lost { reason, answered } => {
                    // A live server that forgot us (restart): retry at once.
                    self.relay_down(now, i, format!("allocation lost: {reason}"), answered);
                }
                _ => {}
            }
        }
    }

    /// The current path to relay `i` got nowhere: try the next one at once,
    /// or, after the last, back off and start again where it last worked.
    fn next_path(&mut self, now: Instant, i: usize, why: String) {
        let r = &mut self.relays[i];
        if r.step + 1 < r.spec.paths.len() {
            let from = r.spec.path(r.step);
            if from.transport == Transport::Udp {
                r.udp_blocked = true;
            }
            r.step += 1;
            let to = r.spec.path(r.step);
            tracing::info!(server = %r.spec.server, "relay: {why} on {} {}; trying {} {}", from.transport, from.addr.port(), to.transport, to.addr.port());
            self.close_stream(i);
            self.start_relay(now, i);
        } else {
            self.relay_down(now, i, why, false);
        }
    }

    fn close_stream(&mut self, i: usize) {
        let r = &mut self.relays[i];
        if std::mem::take(&mut r.stream) {
            self.out.push_back(Output::RelayClose {
                server: r.spec.server,
            });
        }
    }

    /// `alive`: the server answered (it lost our allocation, e.g. it
    /// restarted), so the first retry goes out at once.
    fn relay_down(&mut self, now: Instant, i: usize, why: String, alive: bool) {
        self.close_stream(i);
        let r = &mut self.relays[i];
        r.udp_deadline = None;
        r.stream_deadline = None;
        r.failures += 1;
        // Start again on the path that last worked (a UDP-blocked network
        // stays blocked), unless it keeps failing: then from the top, so a
        // network that lets UDP through again gets UDP back.
        if r.failures >= 3 {
            r.good = None;
        }
        r.step = r.good.unwrap_or(0);
        let wait = if alive && r.failures == 1 {
            Duration::ZERO
        } else {
            Duration::from_secs(2u64 << r.failures.min(5).saturating_sub(1))
                .min(Duration::from_secs(60))
        };
        tracing::warn!(server = %r.spec.server, "relay unusable ({why}); retrying in {wait:?}");
        r.problem = Some(why);
        r.turn = None;
        r.retry_at = Some(now + wait);
        // The next allocation takes the newest credentials anyway.
        r.renew_by = None;
        r.renewing = false;
        r.moving.clear();
        let server = r.spec.server;
        let relayed = std::mem::take(&mut r.relayed);
        self.health.set_usable(now, server, false);
        self.push_relay_view(now);
        self.withdraw_relayed(now, &relayed);
        // The server-reflexive candidate stays: it describes our NAT, not
        // the relay, and direct paths may stand on it. A new allocation
        // replaces it if the mapping changed.
    }

    /// Takes our relayed candidates at `relayed` out of every session.
    fn withdraw_relayed(&mut self, now: Instant, relayed: &[SocketAddr]) {
        let gone: Vec<Candidate> = self
            .local
            .iter()
            .filter(|c| relayed.contains(&c.addr()) && c.kind() == crate::CandidateKind::Relayed)
            .cloned()
            .collect();
        for c in gone {
            self.remove_local(now, &c);
        }
    }

    /// Servers of the relays that carry a relayed path now: ours (the
    /// route goes to it) and the peer's (the path ends at its relayed
    /// address there), since either dying cuts the path.
    fn carrying(&self) -> Vec<SocketAddr> {
        if !self.opts.fast_relay_failover {
            return Vec::new();
        }
        let mut v: Vec<SocketAddr> = Vec::new();
        let mut add = |server: SocketAddr| {
            if !v.contains(&server) {
                v.push(server);
            }
        };
        for p in self.peers.values() {
            if let Some(Route::Channel { server, .. } | Route::Indication { server, .. }) =
                p.route.map(|r| r.route)
            {
                add(server);
            }
            let Some(s) = p.session.as_ref() else {
                continue;
            };
            let path = s.ice.path();
            if path.kind != PathKind::Relay {
                continue;
            }
            if let Some(remote) = path.remote {
                for r in &self.relays {
                    if r.spec.turn.is_some()
                        && (r.spec.server.ip() == remote.ip()
                            || r.relayed.iter().any(|a| a.ip() == remote.ip()))
                    {
                        add(r.spec.server);
                    }
                }
            }
        }
        v
    }

    /// Sends the relay probes that are due, declares silent relays down,
    /// and tells the sessions when the choice changed.
    fn probe_relays(&mut self, now: Instant) {
        for server in self.health.due(now, &self.carrying()) {
            let tid: stun::TransactionId = self.rng.random();
            let mut data = Vec::with_capacity(28);
            MessageBuilder::new(&mut data, method::BINDING, Class::Request, tid).fingerprint();
            self.health.probe_sent(now, server, tid);
            self.out.push_back(Output::Send { to: server, data });
        }
        if self.health.handle_timeout(now) == relays::Change::Choice {
            self.push_relay_view(now);
        }
    }

    /// Tells every session which relay is chosen and which are down (as
    /// relayed addresses and relay IPs), if that changed.
    fn push_relay_view(&mut self, now: Instant) {
        if !self.opts.fast_relay_failover {
            return;
        }
        let chosen = self.health.chosen();
        let down = self.health.down();
        let mut view = RelayView::default();
        for r in &self.relays {
            let (addrs, ips) = if Some(r.spec.server) == chosen {
                (&mut view.preferred, &mut view.preferred_ips)
            } else if down.contains(&r.spec.server) {
                (&mut view.down, &mut view.down_ips)
            } else {
                continue;
            };
            addrs.extend(r.relayed.iter().copied());
            for ip in std::iter::once(r.spec.server.ip()).chain(r.relayed.iter().map(|a| a.ip())) {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        if view == self.relay_view {
            return;
        }
        tracing::debug!(?view, "relay view");
        self.relay_view = view;
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for k in keys {
            if let Some(s) = self.peers.get_mut(&k).and_then(|p| p.session.as_mut()) {
                s.ice.set_relays(now, self.relay_view.clone());
            }
            self.drain_session(now, &k);
        }
    }

    fn channel_ready(&mut self, server: SocketAddr, peer: SocketAddr, channel: u16) {
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for k in keys {
            let r = self.peers[&k].route;
            if let Some(PeerRoute {
                endpoint,
                route: Route::Indication { server: s, peer: p },
                ..
            }) = r
            {
                if s == server && p == peer {
                    self.set_route(
                        k,
                        PeerRoute {
                            endpoint,
                            route: Route::Channel { server, channel },
                            via: 0,
                        },
                    );
                }
            }
        }
    }

    // ---- session output -----------------------------------------------------

    fn drain_session(&mut self, now: Instant, key: &PeerKey) {
        loop {
            let Some(s) = self.peers.get_mut(key).and_then(|p| p.session.as_mut()) else {
                return;
            };
            if let Some(t) = s.ice.poll_transmit() {
                self.transmit(now, *key, t);
                continue;
            }
            match s.ice.poll_event() {
                Some(SessionEvent::PathChanged(ps)) => {
                    tracing::info!(
                        peer = %key,
                        path = ?ps.kind,
                        local = ?ps.local,
                        remote = ?ps.remote,
                        "{}",
                        ps.reason
                    );
                    self.apply_path(now, *key);
                }
                Some(SessionEvent::DirectRetry { attempt, next_in }) => {
                    tracing::debug!(peer = %key, attempt, ?next_in, "retrying direct");
                }
                Some(SessionEvent::IceState(_)) => {}
                Some(SessionEvent::MappingChanged { local, old, new }) => {
                    self.mapping_changed(now, *key, local, old, new);
                }
                Some(SessionEvent::MeasureMapping) => self.measure_mapping(now, *key),
                Some(SessionEvent::Punch(m)) => self.send_punch(*key, m),
                Some(SessionEvent::OpenSockets { target, count }) => {
                    self.out.push_back(Output::BirthdayOpen {
                        peer: *key,
                        target,
                        count,
                    })
                }
                Some(SessionEvent::CloseSockets) => {
                    self.out.push_back(Output::BirthdayClose { peer: *key })
                }
                Some(SessionEvent::Birthday(m)) => self.send_birthday(*key, m),
                None => return,
            }
        }
    }

    fn apply_path(&mut self, now: Instant, key: PeerKey) {
        let p = &self.peers[&key];
        let Some(s) = p.session.as_ref() else { return };
        let ps = s.ice.path().clone();
        let route = match (ps.kind, ps.remote, ps.via) {
            (PathKind::Connecting, _, _) | (_, None, _) => PeerRoute {
                endpoint: Endpoint::Proxy,
                route: Route::Hold,
                via: 0,
            },
            (kind, Some(remote), Via::Socket) => {
                let endpoint = match (kind, p.remote_wg_port) {
                    (PathKind::Lan, Some(port)) => {
                        Endpoint::Direct(SocketAddr::new(remote.ip(), port))
                    }
                    _ => Endpoint::Proxy,
                };
                PeerRoute {
                    endpoint,
                    route: Route::Direct(remote),
                    via: ps
                        .local
                        .and_then(|l| self.sockets.get(&l).copied())
                        .unwrap_or(0),
                }
            }
            (_, Some(remote), Via::Turn { relayed }) => {
                let Some(i) = self
                    .relays
                    .iter()
                    .position(|r| r.relayed.contains(&relayed))
                else {
                    return;
                };
                let server = self.relays[i].spec.server;
                let r = &mut self.relays[i];
                let Some(t) = r.turn.as_mut() else {
                    return;
                };
                let users = r.permitted.entry(remote.ip()).or_default();
                if users.is_empty() {
                    t.create_permission(now, remote.ip());
                }
                users.insert(key);
                if t.bind_channel(now, remote).is_some() {
                    r.channels.insert(remote, key);
                }
                let route = match t.channel_for(remote) {
                    Some(channel) => Route::Channel { server, channel },
                    None => Route::Indication {
                        server,
                        peer: remote,
                    },
                };
                self.drain_relay(now, i);
                PeerRoute {
                    endpoint: Endpoint::Proxy,
                    route,
                    via: 0,
                }
            }
        };
        self.set_route(key, route);
    }

    fn set_route(&mut self, key: PeerKey, route: PeerRoute) {
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        if p.route != Some(route) {
            p.route = Some(route);
            self.out.push_back(Output::Route { peer: key, route });
        }
    }

    fn transmit(&mut self, now: Instant, key: PeerKey, t: Transmit) {
        match t.via {
            Via::Socket => match self.sockets.get(&t.source) {
                Some(&socket) => self.out.push_back(Output::SendFrom {
                    socket,
                    to: t.destination,
                    data: t.contents,
                }),
                None => self.out.push_back(Output::Send {
                    to: t.destination,
                    data: t.contents,
                }),
            },
            Via::Turn { relayed } => {
                let Some(i) = self
                    .relays
                    .iter()
                    .position(|r| r.relayed.contains(&relayed))
                else {
                    return;
                };
                let server = self.relays[i].spec.server;
                let r = &mut self.relays[i];
                let Some(turn) = r.turn.as_mut() else { return };
                let ip = t.destination.ip();
                if r.permitted.len() < 4096 || r.permitted.contains_key(&ip) {
                    let users = r.permitted.entry(ip).or_default();
                    if users.is_empty() {
                        turn.create_permission(now, ip);
                    }
                    users.insert(key);
                }
                let mut data = Vec::with_capacity(t.contents.len() + 40);
                turn.encode_to(t.destination, &t.contents, &mut data);
                self.out.push_back(Output::Send { to: server, data });
                self.drain_relay(now, i);
            }
        }
    }
}

/// When to check that a silent relay still holds our allocation.
/// How a relay is reached when not over UDP, for status: "TLS 443 — UDP to
/// the relay blocked".
fn transport_note(r: &RelayState) -> Option<String> {
    r.spec.turn.as_ref()?;
    let path = r.spec.path(r.step);
    if path.transport == Transport::Udp {
        return None;
    }
    let mut note = format!("{} {}", path.transport, path.addr.port());
    if r.udp_blocked && !r.spec.stream_only {
        note.push_str(" — UDP to the relay blocked");
    }
    Some(note)
}

fn relay_probe_at(r: &RelayState) -> Option<Instant> {
    let t = r.turn.as_ref()?;
    if !t.is_allocated() {
        return None;
    }
    Some(r.last_rx? + RELAY_PROBE_AFTER)
}

/// `n` random ice-chars (RFC 8445: `A-Z a-z 0-9 + /`).
fn ice_chars(rng: &mut StdRng, n: usize) -> String {
    const ICE_CHARS: &[u8; 64] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..n)
        .map(|_| char::from(ICE_CHARS[rng.random_range(0..64)]))
        .collect()
}

/// When an unanswered offer is sent again: 5 s, 10 s, … at most 60 s.
fn reoffer_at(s: &Sess) -> Instant {
    let n = s.unanswered.saturating_sub(1).min(4);
    s.offered_at + (REOFFER_AFTER * (1u32 << n)).min(Duration::from_secs(60))
}
