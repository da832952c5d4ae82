//! The sans-IO STUN/TURN server core: one shard of the relay.
//!
//! The server owns no sockets and never reads the clock. A driver feeds it
//! datagrams with [`Server::handle_client`] and [`Server::handle_peer`], calls
//! [`Server::handle_timeout`] when [`Server::poll_timeout`] says so, sends what
//! [`Server::poll_transmit`] returns, and acts on [`Server::poll_event`]
//! (binding and releasing relayed sockets). Run-loop invariant: after any
//! `handle_*` call, drain `poll_event` and `poll_transmit` until empty.
//!
//! The two data directions are the fast path and allocate nothing:
//! ChannelData (and Send indications) from a client return a [`PeerForward`]
//! that borrows the payload from the input; data from a peer is framed in
//! place in the caller's buffer ([`Server::handle_peer`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::{AuthError, Credentials, NonceCheck, NonceSigner, SharedBuckets};
use crate::policy::PeerPolicy;
use crate::stun::{self, attr, channel_data, method, Class, Integrity, Message, MessageBuilder};

/// How a client reached the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP.
    Udp,
    /// TCP (RFC 8656 §3.1; framing per §12.5).
    Tcp,
    /// TLS over TCP.
    Tls,
}

impl Transport {
    /// True for stream transports (ChannelData padded to 4 bytes).
    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

/// The client side of an allocation: its 5-tuple as the relay sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientSocket {
    /// How the client connects.
    pub transport: Transport,
    /// The relay's listening address the client talks to.
    pub local: SocketAddr,
    /// The client's address as seen by the relay.
    pub remote: SocketAddr,
}

/// Identifies one relayed socket of one allocation (an epoll token, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayToken(pub u64);

impl RelayToken {
    fn new(slot: usize, gen: u32, v6: bool) -> Self {
        RelayToken(((gen as u64) << 32) | ((slot as u64) << 1) | v6 as u64)
    }
    fn slot(self) -> usize {
        ((self.0 & 0xFFFF_FFFF) >> 1) as usize
    }
    fn gen(self) -> u32 {
        (self.0 >> 32) as u32
    }
    fn is_v6(self) -> bool {
        self.0 & 1 == 1
    }
}

/// A datagram the driver should send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// To a client, from one of the relay's listening addresses (`from` differs
    /// from `client.local` only for an RFC 5780 CHANGE-REQUEST).
    ToClient {
        /// The client.
        client: ClientSocket,
        /// Source address to send from.
        from: SocketAddr,
        /// The message.
        payload: Vec<u8>,
    },
    /// To a peer, from an allocation's relayed socket.
    ToPeer {
        /// Which relayed socket.
        relay: RelayToken,
        /// The peer.
        peer: SocketAddr,
        /// The payload.
        payload: Vec<u8>,
    },
}

/// What the driver must do for the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Bind a UDP socket at `addr` and report with [`Server::relay_bound`].
    BindRelay {
        /// Token the driver uses for that socket from now on.
        token: RelayToken,
        /// Where to bind.
        addr: SocketAddr,
    },
    /// Close the relayed socket.
    ReleaseRelay {
        /// Which one.
        token: RelayToken,
    },
    /// A stream (TCP/TLS) client completed a request that passed
    /// MESSAGE-INTEGRITY: it may keep its connection (drivers close stream
    /// clients that do not authenticate in time). Never emitted for UDP.
    ClientAuthenticated {
        /// The client.
        client: ClientSocket,
    },
}

/// A client's payload to send to a peer (fast path, borrowed from the input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerForward<'a> {
    /// Send from this relayed socket…
    pub relay: RelayToken,
    /// …to this peer…
    pub peer: SocketAddr,
    /// …these bytes.
    pub payload: &'a [u8],
}

/// A peer's payload framed for a client (fast path, framed in the caller's buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientForward {
    /// Send to this client…
    pub client: ClientSocket,
    /// …the first `len` bytes of the buffer passed to `handle_peer`.
    pub len: usize,
}

/// State shared by every shard: allocation quotas, the relayed ports held
/// right now, and the per-source budgets for unauthenticated answers.
#[derive(Debug)]
pub struct Quotas {
    /// Highest number of allocations in total (0 = unlimited).
    pub max_total: usize,
    /// Highest number of allocations per user (0 = unlimited).
    pub max_per_user: u32,
    total: AtomicUsize,
    per_user: Mutex<HashMap<String, u32>>,
    /// Relayed ports bound right now, all shards, one bitset per family: a
    /// peer on the relay's own address must be one of these (relay-to-relay),
    /// never another local socket that happens to sit in the range.
    live_ports_v4: LivePorts,
    live_ports_v6: LivePorts,
    /// Unauthenticated requests answered per source (thousandths of a request).
    unauth_requests: SharedBuckets,
    /// Bytes of unauthenticated answers per source (the amplification budget).
    unauth_bytes: SharedBuckets,
}

/// Slots of each per-source budget table (8 bytes each, shared by all shards).
const SOURCE_SLOTS: usize = 16384;

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            max_total: 0,
            max_per_user: 0,
            total: AtomicUsize::new(0),
            per_user: Mutex::default(),
            live_ports_v4: LivePorts::default(),
            live_ports_v6: LivePorts::default(),
            unauth_requests: SharedBuckets::new(SOURCE_SLOTS),
            unauth_bytes: SharedBuckets::new(SOURCE_SLOTS),
        }
    }
}

/// A shared bitset of the 65,536 port numbers.
#[derive(Debug)]
struct LivePorts(Box<[AtomicU64]>);

impl Default for LivePorts {
    fn default() -> Self {
        LivePorts((0..1024).map(|_| AtomicU64::new(0)).collect())
    }
}

impl LivePorts {
    fn set(&self, port: u16, on: bool) {
        let (w, b) = (port as usize / 64, 1u64 << (port % 64));
        if on {
            self.0[w].fetch_or(b, Ordering::Relaxed);
        } else {
            self.0[w].fetch_and(!b, Ordering::Relaxed);
        }
    }
    fn contains(&self, port: u16) -> bool {
        self.0[port as usize / 64].load(Ordering::Relaxed) & (1u64 << (port % 64)) != 0
    }
}

impl Quotas {
    /// Quotas with these limits (0 = unlimited).
    pub fn new(max_total: usize, max_per_user: u32) -> Self {
        Quotas {
            max_total,
            max_per_user,
            ..Default::default()
        }
    }

    /// Allocations currently held, all shards.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    fn acquire(&self, user: &str) -> Result<(), &'static str> {
        let user = principal(user);
        let mut per = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        if self.max_total > 0 && self.total.load(Ordering::Relaxed) >= self.max_total {
            return Err("relay is at its allocation limit (max-allocations)");
        }
        let n = per.entry(user.to_owned()).or_insert(0);
        if self.max_per_user > 0 && *n >= self.max_per_user {
            return Err("user is at its allocation limit (max-allocations-per-user)");
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn release(&self, user: &str) {
        let user = principal(user);
        let mut per = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                per.remove(user);
            }
        }
        self.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counters of one shard; `/metrics` sums them over shards.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Allocations created.
    pub allocations_created: AtomicU64,
    /// Allocations ended (deleted or expired).
    pub allocations_ended: AtomicU64,
    /// Permissions currently installed.
    pub permissions: AtomicU64,
    /// Channel bindings currently installed.
    pub channels: AtomicU64,
    /// Packets relayed client → peer.
    pub packets_to_peer: AtomicU64,
    /// Payload bytes relayed client → peer.
    pub bytes_to_peer: AtomicU64,
    /// Packets relayed peer → client.
    pub packets_to_client: AtomicU64,
    /// Payload bytes relayed peer → client.
    pub bytes_to_client: AtomicU64,
    /// Requests whose credentials failed (unknown user, wrong key, expired REST).
    pub auth_failures: AtomicU64,
    /// Peers refused by the peer policy (403).
    pub denied_peers: AtomicU64,
    /// Datagrams dropped: malformed, no allocation, no permission.
    pub dropped_invalid: AtomicU64,
    /// Datagrams dropped by the bandwidth cap.
    pub dropped_bandwidth: AtomicU64,
    /// Unauthenticated requests dropped by the per-source rate limit.
    pub dropped_rate_limited: AtomicU64,
    /// Unauthenticated answers dropped by the per-source byte budget or by
    /// `--strict-amplification`.
    pub dropped_amplification: AtomicU64,
    /// Binding answers sent without their optional RFC 5780 attributes
    /// because the full answer did not fit the byte budget.
    pub shrunk_amplification: AtomicU64,
    /// Stream (TCP/TLS) connections refused: relay or per-source limit.
    pub stream_refused: AtomicU64,
    /// Stream connections closed for not authenticating in time, or idle.
    pub stream_timeouts: AtomicU64,
    /// STUN Binding requests answered.
    pub binding_requests: AtomicU64,
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Relates the server's monotonic clock to Unix time (for REST expiry).
#[derive(Debug, Clone, Copy)]
pub struct ClockBase {
    /// A monotonic instant…
    pub instant: Instant,
    /// …and the Unix time (seconds) at that instant.
    pub unix: u64,
}

/// RFC 5780 alternate address configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AltAddress {
    /// The primary listening address (advertised as itself).
    pub primary: SocketAddr,
    /// The alternate address; OTHER-ADDRESS. IP and/or port differ from primary.
    pub other: SocketAddr,
}

/// Server configuration (shared by all shards; cheap to clone).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// REALM.
    pub realm: String,
    /// SOFTWARE, sent where the amplification budget allows.
    pub software: String,
    /// Users and REST secrets.
    pub credentials: Credentials,
    /// Peer deny/allow policy.
    pub policy: PeerPolicy,
    /// Local IPv4 address relayed sockets bind to (None: no IPv4 relaying).
    pub relay_ipv4: Option<IpAddr>,
    /// Local IPv6 address relayed sockets bind to.
    pub relay_ipv6: Option<IpAddr>,
    /// Advertised IPv4 relayed address when behind a 1:1 NAT (`--external-ip`).
    pub external_ipv4: Option<IpAddr>,
    /// Advertised IPv6 relayed address.
    pub external_ipv6: Option<IpAddr>,
    /// Inclusive relay port range of this shard.
    pub port_range: (u16, u16),
    /// The relay's whole port range (all shards). A peer on the relay's own
    /// address is allowed only on these ports: that is another allocation
    /// (relay-to-relay, needed when both peers sit behind symmetric NATs),
    /// never the relay's own services.
    pub relay_ports: (u16, u16),
    /// Allocation lifetime when the client asks for less or none (600 s).
    pub default_lifetime: Duration,
    /// Highest allocation lifetime (3600 s).
    pub max_lifetime: Duration,
    /// Permission lifetime (300 s).
    pub permission_lifetime: Duration,
    /// Channel binding lifetime (600 s).
    pub channel_lifetime: Duration,
    /// Nonce lifetime.
    pub nonce_lifetime: Duration,
    /// Optional per-allocation bandwidth cap in bytes/s (both directions together).
    pub bandwidth_limit: Option<u64>,
    /// Highest permissions per allocation.
    pub max_permissions: usize,
    /// Highest channel bindings per allocation.
    pub max_channels: usize,
    /// Unauthenticated requests answered per second per source, and burst.
    pub unauth_rate: (f32, f32),
    /// Bytes of unauthenticated answers per second per source, and burst:
    /// the amplification budget (Binding answers, 401/438 challenges, errors).
    /// Binding answers that do not fit are sent without their optional
    /// attributes, or not at all.
    pub unauth_bytes: (u32, u32),
    /// RFC 5780 alternate address, when configured.
    pub alt: Option<AltAddress>,
    /// No unauthenticated answer larger than its request: Binding answers
    /// lose their optional attributes, then are dropped; challenges and
    /// errors are dropped. Clients must pad (as `relay::client` does).
    pub strict_amplification: bool,
    /// Shared nonce signer.
    pub nonces: NonceSigner,
    /// Clock relation for REST expiry.
    pub clock: ClockBase,
}

impl ServerConfig {
    /// Defaults: RFC lifetimes, IPv4 relaying on `relay_ip`, no users.
    pub fn new(realm: &str, relay_ip: IpAddr, now: Instant, unix_now: u64) -> Self {
        let (v4, v6) = if relay_ip.is_ipv4() {
            (Some(relay_ip), None)
        } else {
            (None, Some(relay_ip))
        };
        ServerConfig {
            realm: realm.to_owned(),
            software: concat!("wgice-relay ", env!("CARGO_PKG_VERSION")).to_owned(),
            credentials: Credentials::default(),
            policy: PeerPolicy::new(vec![], vec![relay_ip]),
            relay_ipv4: v4,
            relay_ipv6: v6,
            external_ipv4: None,
            external_ipv6: None,
            port_range: (49152, 65535),
            relay_ports: (49152, 65535),
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            permission_lifetime: Duration::from_secs(300),
            channel_lifetime: Duration::from_secs(600),
            nonce_lifetime: Duration::from_secs(600),
            bandwidth_limit: None,
            max_permissions: 128,
            max_channels: 256,
            unauth_rate: (20.0, 40.0),
            unauth_bytes: (4096, 8192),
            alt: None,
            strict_amplification: false,
            nonces: NonceSigner::new(600),
            clock: ClockBase {
                instant: now,
                unix: unix_now,
            },
        }
    }
}

#[derive(Debug)]
struct Relayed {
    token: RelayToken,
    /// Port asked of the driver.
    port: u16,
    /// Bound local address once the driver confirmed it.
    bound: Option<SocketAddr>,
    attempts: u8,
}

#[derive(Debug)]
struct Channel {
    number: u16,
    peer: SocketAddr,
    expires: Instant,
    /// The peer is the relay's own address (relay-to-relay): its port must
    /// still be a live relayed port on every packet.
    own: bool,
}

#[derive(Debug)]
struct Permission {
    ip: IpAddr,
    expires: Instant,
    /// The relay's own address: data only from live relayed ports.
    own: bool,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
struct Allocation {
    gen: u32,
    client: ClientSocket,
    username: String,
    key: [u8; 16],
    integrity: Integrity,
    with_fingerprint: bool,
    v4: Option<Relayed>,
    v6: Option<Relayed>,
    /// 440 for a family the client asked for (ADDITIONAL-ADDRESS-FAMILY) but we lack.
    family_error: bool,
    expires: Instant,
    permissions: Vec<Permission>,
    channels: Vec<Channel>,
    bucket: Option<Bucket>,
    /// The Allocate transaction, kept for retransmissions (RFC 8656 §7.2).
    allocate_tid: stun::TransactionId,
    /// Success response once both sockets are bound; None while pending.
    allocate_response: Option<Vec<u8>>,
}

impl Allocation {
    fn relay_for(&self, peer: IpAddr) -> Option<&Relayed> {
        if peer.is_ipv4() {
            self.v4.as_ref()
        } else {
            self.v6.as_ref()
        }
    }

    /// The live permission for `ip`, if any.
    fn permission(&self, ip: IpAddr, now: Instant) -> Option<&Permission> {
        self.permissions
            .iter()
            .find(|p| p.ip == ip && p.expires > now)
    }

    fn take_bandwidth(&mut self, bytes: usize, now: Instant, limit: Option<u64>) -> bool {
        let (Some(limit), Some(b)) = (limit, self.bucket.as_mut()) else {
            return true;
        };
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.last = now;
        // Burst: a quarter second of traffic.
        b.tokens = (b.tokens + dt * limit as f64).min(limit as f64 / 4.0 + 65536.0);
        if b.tokens >= bytes as f64 {
            b.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

/// Credentials that passed.
#[derive(Debug)]
struct Authed {
    username: String,
    key: [u8; 16],
    integrity: Integrity,
}

/// One shard of the STUN/TURN server.
#[derive(Debug)]
pub struct Server {
    cfg: ServerConfig,
    quotas: Arc<Quotas>,
    metrics: Arc<Metrics>,
    slots: Vec<Option<Allocation>>,
    free: Vec<usize>,
    next_gen: u32,
    by_client: HashMap<ClientSocket, usize>,
    ports_v4: HashSet<u16>,
    ports_v6: HashSet<u16>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    scratch: Vec<u8>,
    next_sweep: Instant,
    /// The request being handled: (milliseconds on the server clock, its
    /// length). Unauthenticated error answers are rate-limited and, with
    /// strict amplification, kept no larger than the request.
    current: (u32, usize),
}

const PORT_ATTEMPTS: u8 = 16;

impl Server {
    /// A shard with shared quotas and its own metrics.
    pub fn new(
        cfg: ServerConfig,
        quotas: Arc<Quotas>,
        metrics: Arc<Metrics>,
        now: Instant,
    ) -> Self {
        Server {
            cfg,
            quotas,
            metrics,
            slots: Vec::new(),
            free: Vec::new(),
            next_gen: 1,
            by_client: HashMap::new(),
            ports_v4: HashSet::new(),
            ports_v6: HashSet::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            scratch: Vec::with_capacity(256),
            next_sweep: now + Duration::from_secs(1),
            current: (0, 0),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// The shard's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Allocations held by this shard.
    pub fn allocation_count(&self) -> usize {
        self.by_client.len()
    }

    /// The next datagram to send. Changes after any `handle_*` call.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next thing the driver must do. Changes after any `handle_*` call.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call [`Server::handle_timeout`] next.
    #[must_use]
    pub fn poll_timeout(&self) -> Instant {
        self.next_sweep
    }

    fn secs(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.cfg.clock.instant)
            .as_secs() as u32
            + 1
    }

    fn unix(&self, now: Instant) -> u64 {
        self.cfg.clock.unix
            + now
                .saturating_duration_since(self.cfg.clock.instant)
                .as_secs()
    }

    fn now_ms(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.cfg.clock.instant)
            .as_millis() as u32
    }

    /// Expires allocations, permissions and channels.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + Duration::from_secs(1);
        let expired: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.as_ref().filter(|a| a.expires <= now).map(|_| i))
            .collect();
        for i in expired {
            tracing::debug!(slot = i, "allocation expired");
            self.remove_allocation(i);
        }
        let mut gone_perms = 0u64;
        let mut gone_chans = 0u64;
        for a in self.slots.iter_mut().flatten() {
            let p = a.permissions.len();
            a.permissions.retain(|p| p.expires > now);
            gone_perms += (p - a.permissions.len()) as u64;
            let c = a.channels.len();
            a.channels.retain(|ch| ch.expires > now);
            gone_chans += (c - a.channels.len()) as u64;
        }
        self.metrics
            .permissions
            .fetch_sub(gone_perms, Ordering::Relaxed);
        self.metrics
            .channels
            .fetch_sub(gone_chans, Ordering::Relaxed);
    }

    fn remove_allocation(&mut self, slot: usize) {
        let Some(a) = self.slots.get_mut(slot).and_then(|s| s.take()) else {
            return;
        };
        self.by_client.remove(&a.client);
        for (r, ports, live) in [
            (&a.v4, &mut self.ports_v4, &self.quotas.live_ports_v4),
            (&a.v6, &mut self.ports_v6, &self.quotas.live_ports_v6),
        ] {
            if let Some(r) = r {
                if let Some(b) = r.bound {
                    ports.remove(&b.port());
                    live.set(b.port(), false);
                }
                self.events
                    .push_back(Event::ReleaseRelay { token: r.token });
            }
        }
        self.metrics
            .permissions
            .fetch_sub(a.permissions.len() as u64, Ordering::Relaxed);
        self.metrics
            .channels
            .fetch_sub(a.channels.len() as u64, Ordering::Relaxed);
        inc(&self.metrics.allocations_ended, 1);
        self.quotas.release(&a.username);
        self.free.push(slot);
    }

    fn alloc_mut(&mut self, token: RelayToken) -> Option<&mut Allocation> {
        self.slots
            .get_mut(token.slot())
            .and_then(|s| s.as_mut())
            .filter(|a| a.gen == token.gen())
    }

    /// A datagram (or one framed TCP message) from a client. Returns a payload
    /// to forward to a peer for ChannelData and Send indications; answers to
    /// requests are queued for [`Server::poll_transmit`].
    pub fn handle_client<'a>(
        &mut self,
        now: Instant,
        client: ClientSocket,
        data: &'a [u8],
    ) -> Option<PeerForward<'a>> {
        if channel_data::is_channel_data(data) {
            return self.channel_data_from_client(now, client, data);
        }
        self.current = (self.now_ms(now), data.len());
        let msg = match Message::parse(data) {
            Ok(m) => m,
            Err(e) => {
                tracing::trace!(%client.remote, error = %e, "dropping malformed datagram");
                inc(&self.metrics.dropped_invalid, 1);
                return None;
            }
        };
        if msg.check_fingerprint() == Some(false) {
            inc(&self.metrics.dropped_invalid, 1);
            return None;
        }
        match msg.class() {
            Class::Request => {
                self.handle_request(now, client, &msg);
                None
            }
            Class::Indication if msg.method() == method::SEND => {
                self.send_indication(now, client, &msg)
            }
            _ => {
                inc(&self.metrics.dropped_invalid, 1);
                None
            }
        }
    }

    fn channel_data_from_client<'a>(
        &mut self,
        now: Instant,
        client: ClientSocket,
        data: &'a [u8],
    ) -> Option<PeerForward<'a>> {
        let Some((number, payload)) = channel_data::decode(data) else {
            inc(&self.metrics.dropped_invalid, 1);
            return None;
        };
        let Some(&slot) = self.by_client.get(&client) else {
            inc(&self.metrics.dropped_invalid, 1);
            return None;
        };
        let a = self.slots[slot].as_mut()?;
        let Some(ch) = a
            .channels
            .iter()
            .find(|c| c.number == number && c.expires > now)
        else {
            inc(&self.metrics.dropped_invalid, 1);
            return None;
        };
        let (peer, own) = (ch.peer, ch.own);
        // Relay-to-relay: the other allocation may have ended since the bind,
        // and its port may now belong to anyone.
        if own && !self.is_relay_port(peer) {
            inc(&self.metrics.denied_peers, 1);
            tracing::debug!(client = %client.remote, %peer, "ChannelData to the relay's own address on a port no allocation holds; dropped");
            return None;
        }
        self.forward_to_peer(now, slot, peer, payload)
    }

    /// The common tail of ChannelData and Send: the allocation needs a relayed
    /// socket of the peer's family and a live permission, and the bandwidth
    /// cap must allow the payload.
    fn forward_to_peer<'a>(
        &mut self,
        now: Instant,
        slot: usize,
        peer: SocketAddr,
        payload: &'a [u8],
    ) -> Option<PeerForward<'a>> {
        let limit = self.cfg.bandwidth_limit;
        let a = self.slots[slot].as_mut()?;
        let (Some(r), true) = (
            a.relay_for(peer.ip()),
            a.permission(peer.ip(), now).is_some(),
        ) else {
            inc(&self.metrics.dropped_invalid, 1);
            return None;
        };
        let relay = r.token;
        if !a.take_bandwidth(payload.len(), now, limit) {
            inc(&self.metrics.dropped_bandwidth, 1);
            return None;
        }
        inc(&self.metrics.packets_to_peer, 1);
        inc(&self.metrics.bytes_to_peer, payload.len() as u64);
        Some(PeerForward {
            relay,
            peer,
            payload,
        })
    }

    fn send_indication<'a>(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'a>,
    ) -> Option<PeerForward<'a>> {
        let slot = *self.by_client.get(&client)?;
        let peer = match msg.xor_address(attr::XOR_PEER_ADDRESS) {
            Some(Ok(p)) => p,
            _ => {
                inc(&self.metrics.dropped_invalid, 1);
                return None;
            }
        };
        let peer = SocketAddr::new(crate::policy::normalize(peer.ip()), peer.port());
        let Some(payload) = msg.get(attr::DATA) else {
            inc(&self.metrics.dropped_invalid, 1);
            return None;
        };
        if self.cfg.policy.is_own(peer.ip()) && !self.is_relay_port(peer) {
            inc(&self.metrics.denied_peers, 1);
            tracing::debug!(client = %client.remote, %peer, "Send to the relay's own address on a port no allocation holds; dropped");
            return None;
        }
        self.forward_to_peer(now, slot, peer, payload)
    }

    /// A datagram from `peer` on a relayed socket. The payload must sit at
    /// `buf[4..4 + len]`; for a bound channel the server writes the
    /// ChannelData header into `buf[0..4]` (and zero padding after the payload
    /// for stream clients, so `buf` needs 3 spare bytes) and returns the frame.
    /// Without a channel, a Data indication is queued for `poll_transmit`.
    pub fn handle_peer(
        &mut self,
        now: Instant,
        relay: RelayToken,
        peer: SocketAddr,
        buf: &mut [u8],
        len: usize,
    ) -> Option<ClientForward> {
        let limit = self.cfg.bandwidth_limit;
        let peer = SocketAddr::new(crate::policy::normalize(peer.ip()), peer.port());
        let live = self.is_relay_port(peer);
        let Some(a) = self.alloc_mut(relay) else {
            inc(&self.metrics.dropped_invalid, 1);
            return None;
        };
        match a.permission(peer.ip(), now) {
            None => {
                inc(&self.metrics.dropped_invalid, 1);
                return None;
            }
            // From the relay's own address: only another live allocation.
            Some(p) if p.own && !live => {
                inc(&self.metrics.denied_peers, 1);
                tracing::debug!(%peer, "data from the relay's own address on a port no allocation holds; dropped");
                return None;
            }
            Some(_) => {}
        }
        if !a.take_bandwidth(len, now, limit) {
            inc(&self.metrics.dropped_bandwidth, 1);
            return None;
        }
        let client = a.client;
        let channel = a
            .channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
            .map(|c| c.number);
        inc(&self.metrics.packets_to_client, 1);
        inc(&self.metrics.bytes_to_client, len as u64);
        if let Some(number) = channel {
            if buf.len() < channel_data::HEADER_LEN + len {
                return None;
            }
            buf[..4].copy_from_slice(&channel_data::header(number, len));
            let mut total = 4 + len;
            if client.transport.is_stream() {
                let pad = (4 - len % 4) % 4;
                if buf.len() < total + pad {
                    return None;
                }
                buf[total..total + pad].fill(0);
                total += pad;
            }
            return Some(ClientForward { client, len: total });
        }
        let payload = buf.get(4..4 + len)?;
        let tid: stun::TransactionId = rand::random();
        let mut out = Vec::with_capacity(len + 36);
        MessageBuilder::new(&mut out, method::DATA, Class::Indication, tid)
            .xor_address(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, payload);
        self.transmits.push_back(Transmit::ToClient {
            client,
            from: client.local,
            payload: out,
        });
        None
    }

    /// The driver's answer to [`Event::BindRelay`].
    pub fn relay_bound(
        &mut self,
        now: Instant,
        token: RelayToken,
        result: Result<SocketAddr, std::io::Error>,
    ) {
        let Some(slot) = self
            .slots
            .get(token.slot())
            .and_then(|s| s.as_ref())
            .filter(|a| a.gen == token.gen())
            .map(|_| token.slot())
        else {
            // Allocation gone meanwhile: release what was bound.
            if result.is_ok() {
                self.events.push_back(Event::ReleaseRelay { token });
            }
            return;
        };
        match result {
            Ok(addr) => {
                let live = if token.is_v6() {
                    &self.quotas.live_ports_v6
                } else {
                    &self.quotas.live_ports_v4
                };
                live.set(addr.port(), true);
                let Some(a) = self.slots[slot].as_mut() else {
                    return;
                };
                let r = if token.is_v6() {
                    a.v6.as_mut()
                } else {
                    a.v4.as_mut()
                };
                if let Some(r) = r {
                    r.bound = Some(addr);
                }
                self.finish_allocate(now, slot);
            }
            Err(e) => {
                tracing::debug!(error = %e, "relay port bind failed; trying another");
                let v6 = token.is_v6();
                let (ports, ip) = if v6 {
                    (&mut self.ports_v6, self.cfg.relay_ipv6)
                } else {
                    (&mut self.ports_v4, self.cfg.relay_ipv4)
                };
                let Some(a) = self.slots[slot].as_mut() else {
                    return;
                };
                let Some(r) = (if v6 { a.v6.as_mut() } else { a.v4.as_mut() }) else {
                    return;
                };
                r.attempts += 1;
                let attempts = r.attempts;
                // The failed port is someone else's; forget it so the set stays small.
                ports.remove(&r.port);
                let next = if attempts < PORT_ATTEMPTS {
                    ip.and_then(|ip| {
                        pick_port(ports, self.cfg.port_range).map(|p| SocketAddr::new(ip, p))
                    })
                } else {
                    None
                };
                if let (Some(addr), Some(a)) = (next, self.slots[slot].as_mut()) {
                    if let Some(r) = if v6 { a.v6.as_mut() } else { a.v4.as_mut() } {
                        r.port = addr.port();
                    }
                }
                match next {
                    Some(addr) => {
                        // Same token (same allocation); only the port changes.
                        self.events.push_back(Event::BindRelay { token, addr });
                    }
                    None => {
                        let a = self.slots[slot].as_ref().map(|a| {
                            (
                                a.client,
                                a.allocate_tid,
                                a.key,
                                a.integrity,
                                a.with_fingerprint,
                            )
                        });
                        self.remove_allocation(slot);
                        if let Some((client, tid, key, integ, fp)) = a {
                            let auth = Some((&key[..], integ));
                            self.error_response(
                                client,
                                method::ALLOCATE,
                                tid,
                                508,
                                "no free relay port (widen --relay-ports)",
                                auth,
                                fp,
                                &[],
                            );
                        }
                    }
                }
            }
        }
    }

    fn finish_allocate(&mut self, now: Instant, slot: usize) {
        let cfg = &self.cfg;
        let Some(a) = self.slots[slot].as_mut() else {
            return;
        };
        let pending = |r: &Option<Relayed>| r.as_ref().is_some_and(|r| r.bound.is_none());
        if pending(&a.v4) || pending(&a.v6) || a.allocate_response.is_some() {
            return;
        }
        let lifetime = a.expires.saturating_duration_since(now).as_secs() as u32;
        let mut out = Vec::with_capacity(128);
        {
            let mut b =
                MessageBuilder::new(&mut out, method::ALLOCATE, Class::Success, a.allocate_tid);
            for (r, ext) in [(&a.v4, cfg.external_ipv4), (&a.v6, cfg.external_ipv6)] {
                if let Some(bound) = r.as_ref().and_then(|r| r.bound) {
                    let adv = SocketAddr::new(ext.unwrap_or(bound.ip()), bound.port());
                    b.xor_address(attr::XOR_RELAYED_ADDRESS, adv);
                }
            }
            if a.family_error {
                let mut v = vec![0x02, 0, 0, 0, 4, 40];
                v.extend_from_slice(b"Address Family not Supported");
                b.attr(attr::ADDRESS_ERROR_CODE, &v);
            }
            b.u32_attr(attr::LIFETIME, lifetime)
                .xor_address(attr::XOR_MAPPED_ADDRESS, a.client.remote)
                .attr(attr::SOFTWARE, cfg.software.as_bytes())
                .integrity(a.integrity, &a.key);
            if a.with_fingerprint {
                b.fingerprint();
            }
        }
        tracing::info!(client = %a.client.remote, user = %a.username, relayed = ?a.v4.as_ref().and_then(|r| r.bound), "allocation created");
        inc(&self.metrics.allocations_created, 1);
        a.allocate_response = Some(out.clone());
        self.transmits.push_back(Transmit::ToClient {
            client: a.client,
            from: a.client.local,
            payload: out,
        });
    }

    fn handle_request(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let tid = msg.transaction_id();
        let fp = msg.check_fingerprint().is_some();
        let unknown = msg.unknown_required();
        if !unknown.is_empty() {
            let v: Vec<u8> = unknown.iter().flat_map(|t| t.to_be_bytes()).collect();
            self.error_response(
                client,
                msg.method(),
                tid,
                420,
                "Unknown Attribute",
                None,
                fp,
                &[(attr::UNKNOWN_ATTRIBUTES, &v)],
            );
            return;
        }
        match msg.method() {
            method::BINDING => self.binding(now, client, msg),
            method::ALLOCATE => self.allocate(now, client, msg),
            method::REFRESH => self.refresh(now, client, msg),
            method::CREATE_PERMISSION => self.create_permission(now, client, msg),
            method::CHANNEL_BIND => self.channel_bind(now, client, msg),
            m => {
                tracing::debug!(method = m, "unsupported STUN method");
                self.error_response(client, m, tid, 400, "Unsupported method", None, fp, &[]);
            }
        }
    }

    fn binding(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let tid = msg.transaction_id();
        let fp = msg.check_fingerprint().is_some();
        let now_ms = self.now_ms(now);
        if !self.allow_unauth(client.remote.ip(), now_ms) {
            return;
        }
        let mut from = client.local;
        if let Some(flags) = msg.u32_attr(attr::CHANGE_REQUEST) {
            let (change_ip, change_port) = (flags & 4 != 0, flags & 2 != 0);
            match self.cfg.alt.filter(|_| client.transport == Transport::Udp) {
                Some(alt) => {
                    let other = if client.local.ip() == alt.primary.ip()
                        || client.local.ip() != alt.other.ip()
                    {
                        alt.other.ip()
                    } else {
                        alt.primary.ip()
                    };
                    let other_port = if client.local.port() == alt.primary.port() {
                        alt.other.port()
                    } else {
                        alt.primary.port()
                    };
                    if (change_ip && alt.other.ip() == alt.primary.ip())
                        || (change_port && alt.other.port() == alt.primary.port())
                    {
                        self.error_response(
                            client,
                            method::BINDING,
                            tid,
                            420,
                            "CHANGE-REQUEST needs a different alternate IP/port (--alt-listen)",
                            None,
                            fp,
                            &[],
                        );
                        return;
                    }
                    if change_ip {
                        from.set_ip(other);
                    }
                    if change_port {
                        from.set_port(other_port);
                    }
                }
                None if flags & 6 != 0 => {
                    self.error_response(
                        client,
                        method::BINDING,
                        tid,
                        420,
                        "CHANGE-REQUEST needs --alt-listen",
                        None,
                        fp,
                        &[(
                            attr::UNKNOWN_ATTRIBUTES,
                            &attr::CHANGE_REQUEST.to_be_bytes(),
                        )],
                    );
                    return;
                }
                None => {}
            }
        }
        // RFC 5780 clients need RESPONSE-ORIGIN and OTHER-ADDRESS in every
        // answer, padded request or not. What bounds amplification is the
        // per-source byte budget (shared by all shards): an answer that does
        // not fit is sent without the optional attributes, or not at all.
        let request_len = msg.raw().len();
        let mut out = std::mem::take(&mut self.scratch);
        self.binding_answer(&mut out, tid, client, from, fp, true);
        let mut paid = self.pay_unauth(client.remote.ip(), now_ms, out.len(), request_len);
        if !paid && self.cfg.alt.is_some() {
            self.binding_answer(&mut out, tid, client, from, fp, false);
            paid = self.pay_unauth(client.remote.ip(), now_ms, out.len(), request_len);
            if paid {
                inc(&self.metrics.shrunk_amplification, 1);
                tracing::debug!(source = %client.remote, "Binding answer without RFC 5780 attributes: per-source byte budget");
            }
        }
        if !paid {
            inc(&self.metrics.dropped_amplification, 1);
            tracing::debug!(source = %client.remote, "Binding answer dropped: per-source byte budget or --strict-amplification");
            self.scratch = out;
            return;
        }
        inc(&self.metrics.binding_requests, 1);
        self.transmits.push_back(Transmit::ToClient {
            client,
            from,
            payload: out.clone(),
        });
        self.scratch = out;
    }

    /// A Binding success: XOR-MAPPED-ADDRESS, and with `rfc5780` (and an
    /// alternate address) RESPONSE-ORIGIN and OTHER-ADDRESS; FINGERPRINT when
    /// the request had one.
    fn binding_answer(
        &self,
        out: &mut Vec<u8>,
        tid: stun::TransactionId,
        client: ClientSocket,
        from: SocketAddr,
        fp: bool,
        rfc5780: bool,
    ) {
        let mut b = MessageBuilder::new(out, method::BINDING, Class::Success, tid);
        b.xor_address(attr::XOR_MAPPED_ADDRESS, client.remote);
        if let Some(alt) = self.cfg.alt.filter(|_| rfc5780) {
            // OTHER-ADDRESS: differs in IP and port from where the request
            // arrived (RFC 5780 §7.4).
            let local = client.local;
            let other = SocketAddr::new(
                if local.ip() == alt.primary.ip() {
                    alt.other.ip()
                } else {
                    alt.primary.ip()
                },
                if local.port() == alt.primary.port() {
                    alt.other.port()
                } else {
                    alt.primary.port()
                },
            );
            b.address(attr::RESPONSE_ORIGIN, from)
                .address(attr::OTHER_ADDRESS, other);
        }
        if fp {
            b.fingerprint();
        }
    }

    /// One more unauthenticated answer to `ip`: the per-source request rate
    /// (shared by every shard). Counted and logged when refused.
    fn allow_unauth(&self, ip: IpAddr, now_ms: u32) -> bool {
        let (rate, burst) = self.cfg.unauth_rate;
        let ok = self.quotas.unauth_requests.take(
            ip,
            now_ms,
            1000,
            (rate * 1000.0) as u32,
            (burst * 1000.0) as u32,
        );
        if !ok {
            inc(&self.metrics.dropped_rate_limited, 1);
            tracing::debug!(source = %ip, "unauthenticated request over the per-source rate; dropped");
        }
        ok
    }

    /// Pays for an unauthenticated answer of `len` bytes to `ip` from the
    /// per-source byte budget; with strict amplification it must also be no
    /// larger than the request. False: do not send it (the caller counts).
    fn pay_unauth(&self, ip: IpAddr, now_ms: u32, len: usize, request_len: usize) -> bool {
        if self.cfg.strict_amplification && len > request_len {
            return false;
        }
        let (rate, burst) = self.cfg.unauth_bytes;
        self.quotas
            .unauth_bytes
            .take(ip, now_ms, len.min(u32::MAX as usize) as u32, rate, burst)
    }

    /// Authenticates a request: Ok, or the error response has been queued.
    fn authenticate(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
        existing: Option<&str>,
    ) -> Option<Authed> {
        let tid = msg.transaction_id();
        let fp = msg.check_fingerprint().is_some();
        let m = msg.method();
        let Some(kind) = msg.integrity_kind() else {
            self.challenge(now, client, msg, 401, "Unauthorized");
            return None;
        };
        let (Some(user), Some(realm), Some(nonce)) = (
            msg.str_attr(attr::USERNAME),
            msg.str_attr(attr::REALM),
            msg.str_attr(attr::NONCE),
        ) else {
            self.error_response(
                client,
                m,
                tid,
                400,
                "MESSAGE-INTEGRITY without USERNAME, REALM and NONCE",
                None,
                fp,
                &[],
            );
            return None;
        };
        match self
            .cfg
            .nonces
            .check(nonce, self.secs(now), client.remote.ip())
        {
            NonceCheck::Valid => {}
            NonceCheck::Stale | NonceCheck::Invalid => {
                self.challenge(now, client, msg, 438, "Stale Nonce");
                return None;
            }
        }
        if realm != self.cfg.realm {
            inc(&self.metrics.auth_failures, 1);
            tracing::info!(%client.remote, realm, "wrong realm");
            self.challenge(now, client, msg, 401, "Unauthorized");
            return None;
        }
        let keys = match self
            .cfg
            .credentials
            .keys(user, &self.cfg.realm, self.unix(now))
        {
            Ok(k) => k,
            Err(e) => {
                inc(&self.metrics.auth_failures, 1);
                tracing::info!(%client.remote, error = %e, "authentication failed");
                self.challenge(now, client, msg, 401, "Unauthorized");
                return None;
            }
        };
        let Some(key) = keys.into_iter().find(|k| msg.verify_integrity(k).is_some()) else {
            inc(&self.metrics.auth_failures, 1);
            tracing::info!(%client.remote, error = %AuthError::BadIntegrity(user.to_owned()), "authentication failed");
            self.challenge(now, client, msg, 401, "Unauthorized");
            return None;
        };
        if client.transport.is_stream() {
            self.events.push_back(Event::ClientAuthenticated { client });
        }
        if let Some(owner) = existing {
            if !same_principal(owner, user) {
                let auth = Some((&key[..], kind));
                self.error_response(
                    client,
                    m,
                    tid,
                    441,
                    "Wrong Credentials: allocation belongs to another user",
                    auth,
                    fp,
                    &[],
                );
                return None;
            }
        }
        Some(Authed {
            username: user.to_owned(),
            key,
            integrity: kind,
        })
    }

    /// 401/438 with REALM and a fresh NONCE: no state kept, rate-limited per
    /// source, and (with strict amplification) never larger than the request.
    fn challenge(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
        code: u16,
        reason: &str,
    ) {
        let now_ms = self.now_ms(now);
        if !self.allow_unauth(client.remote.ip(), now_ms) {
            return;
        }
        let nonce = self.cfg.nonces.issue(self.secs(now), client.remote.ip());
        let mut out = std::mem::take(&mut self.scratch);
        {
            let mut b =
                MessageBuilder::new(&mut out, msg.method(), Class::Error, msg.transaction_id());
            b.error(code, reason)
                .attr(attr::REALM, self.cfg.realm.as_bytes())
                .attr(attr::NONCE, nonce.as_bytes());
            if msg.check_fingerprint().is_some() {
                b.fingerprint();
            }
        }
        if !self.pay_unauth(client.remote.ip(), now_ms, out.len(), msg.raw().len()) {
            inc(&self.metrics.dropped_amplification, 1);
            tracing::debug!(source = %client.remote, code, "challenge dropped: per-source byte budget or --strict-amplification");
            self.scratch = out;
            return;
        }
        self.transmits.push_back(Transmit::ToClient {
            client,
            from: client.local,
            payload: out.clone(),
        });
        self.scratch = out;
    }

    #[allow(clippy::too_many_arguments)]
    fn error_response(
        &mut self,
        client: ClientSocket,
        m: u16,
        tid: stun::TransactionId,
        code: u16,
        reason: &str,
        auth: Option<(&[u8], Integrity)>,
        fp: bool,
        extra: &[(u16, &[u8])],
    ) {
        let (now_ms, request_len) = self.current;
        if auth.is_none() && !self.allow_unauth(client.remote.ip(), now_ms) {
            return;
        }
        let mut out = Vec::with_capacity(96 + reason.len());
        {
            let mut b = MessageBuilder::new(&mut out, m, Class::Error, tid);
            b.error(code, reason);
            for (t, v) in extra {
                b.attr(*t, v);
            }
            if let Some((key, kind)) = auth {
                b.integrity(kind, key);
            }
            if fp {
                b.fingerprint();
            }
        }
        if auth.is_none() && !self.pay_unauth(client.remote.ip(), now_ms, out.len(), request_len) {
            inc(&self.metrics.dropped_amplification, 1);
            tracing::debug!(source = %client.remote, code, "error answer dropped: per-source byte budget or --strict-amplification");
            return;
        }
        self.transmits.push_back(Transmit::ToClient {
            client,
            from: client.local,
            payload: out,
        });
    }

    fn success(
        &mut self,
        client: ClientSocket,
        m: u16,
        tid: stun::TransactionId,
        auth: &Authed,
        fp: bool,
        attrs: &[(u16, &[u8])],
    ) {
        let mut out = Vec::with_capacity(96);
        {
            let mut b = MessageBuilder::new(&mut out, m, Class::Success, tid);
            for (t, v) in attrs {
                b.attr(*t, v);
            }
            b.integrity(auth.integrity, &auth.key);
            if fp {
                b.fingerprint();
            }
        }
        self.transmits.push_back(Transmit::ToClient {
            client,
            from: client.local,
            payload: out,
        });
    }

    fn allocate(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let tid = msg.transaction_id();
        let fp = msg.check_fingerprint().is_some();
        if let Some(&slot) = self.by_client.get(&client) {
            let Some(a) = self.slots[slot].as_ref() else {
                return;
            };
            if a.allocate_tid == tid {
                // Retransmission: answer again (or keep waiting for the bind).
                if let Some(resp) = a.allocate_response.clone() {
                    self.transmits.push_back(Transmit::ToClient {
                        client,
                        from: client.local,
                        payload: resp,
                    });
                }
                return;
            }
            let owner = a.username.clone();
            if let Some(auth) = self.authenticate(now, client, msg, Some(&owner)) {
                self.error_response(
                    client,
                    method::ALLOCATE,
                    tid,
                    437,
                    "Allocation Mismatch: this 5-tuple already has an allocation",
                    Some((&auth.key, auth.integrity)),
                    fp,
                    &[],
                );
            }
            return;
        }
        let Some(auth) = self.authenticate(now, client, msg, None) else {
            return;
        };
        let a_auth = Some((&auth.key[..], auth.integrity));
        // RFC 8656 §7.2 checks, in order.
        match msg
            .u32_attr(attr::REQUESTED_TRANSPORT)
            .map(|v| (v >> 24) as u8)
        {
            None => {
                return self.error_response(
                    client,
                    method::ALLOCATE,
                    tid,
                    400,
                    "REQUESTED-TRANSPORT missing",
                    a_auth,
                    fp,
                    &[],
                )
            }
            Some(17) => {}
            Some(p) => {
                let reason = if p == 6 {
                    "Unsupported Transport Protocol: TCP allocations (RFC 6062) are not offered; use UDP"
                } else {
                    "Unsupported Transport Protocol: only UDP (17) is relayed"
                };
                return self.error_response(
                    client,
                    method::ALLOCATE,
                    tid,
                    442,
                    reason,
                    a_auth,
                    fp,
                    &[],
                );
            }
        }
        if msg.get(attr::RESERVATION_TOKEN).is_some() {
            return self.error_response(
                client,
                method::ALLOCATE,
                tid,
                508,
                "Insufficient Capacity: RESERVATION-TOKEN is not supported (no reserved ports)",
                a_auth,
                fp,
                &[],
            );
        }
        if let Some(v) = msg.get(attr::EVEN_PORT) {
            if v.first().is_some_and(|b| b & 0x80 != 0) {
                return self.error_response(
                    client,
                    method::ALLOCATE,
                    tid,
                    508,
                    "Insufficient Capacity: EVEN-PORT with reservation (R bit) is not supported",
                    a_auth,
                    fp,
                    &[],
                );
            }
        }
        let requested = msg
            .get(attr::REQUESTED_ADDRESS_FAMILY)
            .map(|v| v.first().copied().unwrap_or(0));
        let additional = msg
            .get(attr::ADDITIONAL_ADDRESS_FAMILY)
            .map(|v| v.first().copied().unwrap_or(0));
        if requested.is_some() && additional.is_some() {
            return self.error_response(
                client,
                method::ALLOCATE,
                tid,
                400,
                "REQUESTED-ADDRESS-FAMILY and ADDITIONAL-ADDRESS-FAMILY together",
                a_auth,
                fp,
                &[],
            );
        }
        if additional.is_some_and(|f| f != 2) {
            return self.error_response(
                client,
                method::ALLOCATE,
                tid,
                400,
                "ADDITIONAL-ADDRESS-FAMILY must be IPv6 (0x02)",
                a_auth,
                fp,
                &[],
            );
        }
        let (want_v4, want_v6) = match (requested, additional) {
            (Some(1), _) => (true, false),
            // RFC 8656 says IPv4 by default; an IPv6-only relay serves IPv6
            // rather than refusing clients that did not ask.
            (None, None) => (self.cfg.relay_ipv4.is_some(), self.cfg.relay_ipv4.is_none()),
            (Some(2), _) => (false, true),
            (None, Some(_)) => (true, true),
            (Some(_), _) => {
                return self.error_response(
                    client,
                    method::ALLOCATE,
                    tid,
                    440,
                    "Address Family not Supported: REQUESTED-ADDRESS-FAMILY must be 1 or 2",
                    a_auth,
                    fp,
                    &[],
                );
            }
        };
        let v4_ip = self.cfg.relay_ipv4.filter(|_| want_v4);
        let v6_ip = self.cfg.relay_ipv6.filter(|_| want_v6);
        if (want_v4 && v4_ip.is_none() && !want_v6)
            || (want_v6 && !want_v4 && v6_ip.is_none())
            || (v4_ip.is_none() && v6_ip.is_none())
        {
            return self.error_response(client, method::ALLOCATE, tid, 440, "Address Family not Supported by this relay (configure a relay address of that family)", a_auth, fp, &[]);
        }
        if let Err(why) = self.quotas.acquire(&auth.username) {
            tracing::info!(user = %auth.username, why, "allocation refused");
            return self.error_response(
                client,
                method::ALLOCATE,
                tid,
                486,
                &format!("Allocation Quota Reached: {why}"),
                a_auth,
                fp,
                &[],
            );
        }
        let even = msg.get(attr::EVEN_PORT).is_some();
        let lifetime = msg
            .u32_attr(attr::LIFETIME)
            .map(|s| Duration::from_secs(s as u64))
            .unwrap_or(self.cfg.default_lifetime)
            .clamp(self.cfg.default_lifetime, self.cfg.max_lifetime);
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let mut binds = Vec::new();
        let mut relayed = |ip: Option<IpAddr>, ports: &mut HashSet<u16>, v6: bool| {
            let ip = ip?;
            let port = if even {
                pick_even_port(ports, self.cfg.port_range)
            } else {
                pick_port(ports, self.cfg.port_range)
            }?;
            let token = RelayToken::new(slot, gen, v6);
            binds.push(Event::BindRelay {
                token,
                addr: SocketAddr::new(ip, port),
            });
            Some(Relayed {
                token,
                port,
                bound: None,
                attempts: 0,
            })
        };
        let v4 = relayed(v4_ip, &mut self.ports_v4, false);
        let v6 = relayed(v6_ip, &mut self.ports_v6, true);
        if v4.is_none() && v6.is_none() {
            self.quotas.release(&auth.username);
            self.free.push(slot);
            return self.error_response(
                client,
                method::ALLOCATE,
                tid,
                508,
                "Insufficient Capacity: no free relay port (widen --relay-ports)",
                a_auth,
                fp,
                &[],
            );
        }
        let bucket = self.cfg.bandwidth_limit.map(|l| Bucket {
            tokens: l as f64 / 4.0,
            last: now,
        });
        self.slots[slot] = Some(Allocation {
            gen,
            client,
            username: auth.username,
            key: auth.key,
            integrity: auth.integrity,
            with_fingerprint: fp,
            family_error: want_v6 && want_v4 && v6_ip.is_none(),
            v4,
            v6,
            expires: now + lifetime,
            permissions: Vec::new(),
            channels: Vec::new(),
            bucket,
            allocate_tid: tid,
            allocate_response: None,
        });
        self.by_client.insert(client, slot);
        self.events.extend(binds);
    }

    fn existing(&self, client: ClientSocket) -> Option<(usize, String)> {
        let slot = *self.by_client.get(&client)?;
        self.slots[slot]
            .as_ref()
            .map(|a| (slot, a.username.clone()))
    }

    fn mismatch(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let tid = msg.transaction_id();
        let fp = msg.check_fingerprint().is_some();
        if let Some(auth) = self.authenticate(now, client, msg, None) {
            self.error_response(
                client,
                msg.method(),
                tid,
                437,
                "Allocation Mismatch: no allocation for this 5-tuple",
                Some((&auth.key, auth.integrity)),
                fp,
                &[],
            );
        }
    }

    /// Keeps the allocation's credentials current (rotation under a live allocation).
    fn update_credentials(&mut self, slot: usize, auth: &Authed) {
        if let Some(a) = self.slots[slot].as_mut() {
            if a.username != auth.username {
                tracing::info!(old = %a.username, new = %auth.username, "credentials rotated under a live allocation");
                a.username.clone_from(&auth.username);
            }
            a.key = auth.key;
            a.integrity = auth.integrity;
        }
    }

    fn refresh(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let tid = msg.transaction_id();
        let fp = msg.check_fingerprint().is_some();
        let Some((slot, owner)) = self.existing(client) else {
            return self.mismatch(now, client, msg);
        };
        let Some(auth) = self.authenticate(now, client, msg, Some(&owner)) else {
            return;
        };
        let requested = msg
            .u32_attr(attr::LIFETIME)
            .map(|s| Duration::from_secs(s as u64));
        if requested == Some(Duration::ZERO) {
            self.remove_allocation(slot);
            tracing::info!(client = %client.remote, "allocation deleted by client");
            return self.success(
                client,
                method::REFRESH,
                tid,
                &auth,
                fp,
                &[(attr::LIFETIME, &0u32.to_be_bytes())],
            );
        }
        let lifetime = requested
            .unwrap_or(self.cfg.default_lifetime)
            .clamp(self.cfg.default_lifetime, self.cfg.max_lifetime);
        self.update_credentials(slot, &auth);
        if let Some(a) = self.slots[slot].as_mut() {
            a.expires = now + lifetime;
        }
        self.success(
            client,
            method::REFRESH,
            tid,
            &auth,
            fp,
            &[(attr::LIFETIME, &(lifetime.as_secs() as u32).to_be_bytes())],
        );
    }

    /// A relayed port of a live allocation on this relay, in `peer`'s family.
    fn is_relay_port(&self, peer: SocketAddr) -> bool {
        let live = if peer.is_ipv4() {
            &self.quotas.live_ports_v4
        } else {
            &self.quotas.live_ports_v6
        };
        (self.cfg.relay_ports.0..=self.cfg.relay_ports.1).contains(&peer.port())
            && live.contains(peer.port())
    }

    /// Checks a peer for an allocation: family and policy. `port_matters` is
    /// false for CreatePermission (permissions are per IP; the port is then
    /// checked per packet). Err = (code, reason).
    fn check_peer(
        &self,
        slot: usize,
        peer: SocketAddr,
        port_matters: bool,
    ) -> Result<SocketAddr, (u16, String)> {
        let peer = SocketAddr::new(crate::policy::normalize(peer.ip()), peer.port());
        let Some(a) = self.slots[slot].as_ref() else {
            return Err((437, "Allocation Mismatch".into()));
        };
        if a.relay_for(peer.ip()).is_none() {
            return Err((
                443,
                format!(
                    "Peer Address Family Mismatch: allocation has no {} relayed address for {peer}",
                    if peer.is_ipv4() { "IPv4" } else { "IPv6" }
                ),
            ));
        }
        match self.cfg.policy.check(peer.ip()) {
            Ok(()) => {}
            // Relay-to-relay: another allocation on this relay.
            Err(d) if d.own && (!port_matters || self.is_relay_port(peer)) => {}
            Err(d) if d.own => {
                inc(&self.metrics.denied_peers, 1);
                tracing::info!(client = %a.client.remote, %peer, "peer denied: the relay's own address, not a live relayed port");
                let (lo, hi) = self.cfg.relay_ports;
                return Err((
                    403,
                    format!(
                        "Forbidden: peer {peer} is this relay but not one of its live relayed ports ({lo}-{hi})"
                    ),
                ));
            }
            Err(d) => {
                inc(&self.metrics.denied_peers, 1);
                tracing::info!(client = %a.client.remote, %peer, rule = %d.rule, "peer denied");
                return Err((403, format!("Forbidden: {d}")));
            }
        }
        Ok(peer)
    }

    fn add_permission(&mut self, slot: usize, ip: IpAddr, until: Instant) -> bool {
        let max = self.cfg.max_permissions;
        let own = self.cfg.policy.is_own(ip);
        let Some(a) = self.slots[slot].as_mut() else {
            return false;
        };
        if let Some(p) = a.permissions.iter_mut().find(|p| p.ip == ip) {
            p.expires = until;
            return true;
        }
        if a.permissions.len() >= max {
            return false;
        }
        a.permissions.push(Permission {
            ip,
            expires: until,
            own,
        });
        inc(&self.metrics.permissions, 1);
        true
    }

    fn create_permission(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let tid = msg.transaction_id();
        let fp = msg.check_fingerprint().is_some();
        let Some((slot, owner)) = self.existing(client) else {
            return self.mismatch(now, client, msg);
        };
        let Some(auth) = self.authenticate(now, client, msg, Some(&owner)) else {
            return;
        };
        let a_auth = Some((&auth.key[..], auth.integrity));
        let mut peers = Vec::new();
        for p in msg.xor_addresses(attr::XOR_PEER_ADDRESS) {
            match p {
                Ok(p) => match self.check_peer(slot, p, false) {
                    Ok(p) => peers.push(p.ip()),
                    Err((code, reason)) => {
                        return self.error_response(
                            client,
                            method::CREATE_PERMISSION,
                            tid,
                            code,
                            &reason,
                            a_auth,
                            fp,
                            &[],
                        )
                    }
                },
                Err(e) => {
                    return self.error_response(
                        client,
                        method::CREATE_PERMISSION,
                        tid,
                        400,
                        &format!("bad XOR-PEER-ADDRESS: {e}"),
                        a_auth,
                        fp,
                        &[],
                    )
                }
            }
        }
        if peers.is_empty() {
            return self.error_response(
                client,
                method::CREATE_PERMISSION,
                tid,
                400,
                "XOR-PEER-ADDRESS missing",
                a_auth,
                fp,
                &[],
            );
        }
        let until = now + self.cfg.permission_lifetime;
        for ip in peers {
            if !self.add_permission(slot, ip, until) {
                return self.error_response(
                    client,
                    method::CREATE_PERMISSION,
                    tid,
                    508,
                    "Insufficient Capacity: too many permissions on this allocation",
                    a_auth,
                    fp,
                    &[],
                );
            }
        }
        self.update_credentials(slot, &auth);
        self.success(client, method::CREATE_PERMISSION, tid, &auth, fp, &[]);
    }

    fn channel_bind(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let tid = msg.transaction_id();
        let fp = msg.check_fingerprint().is_some();
        let Some((slot, owner)) = self.existing(client) else {
            return self.mismatch(now, client, msg);
        };
        let Some(auth) = self.authenticate(now, client, msg, Some(&owner)) else {
            return;
        };
        let a_auth = Some((&auth.key[..], auth.integrity));
        let number = match msg.get(attr::CHANNEL_NUMBER) {
            Some(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => {
                return self.error_response(
                    client,
                    method::CHANNEL_BIND,
                    tid,
                    400,
                    "CHANNEL-NUMBER missing",
                    a_auth,
                    fp,
                    &[],
                )
            }
        };
        if !(channel_data::MIN_CHANNEL..=channel_data::MAX_CHANNEL).contains(&number) {
            return self.error_response(
                client,
                method::CHANNEL_BIND,
                tid,
                400,
                "CHANNEL-NUMBER outside 0x4000-0x7FFF",
                a_auth,
                fp,
                &[],
            );
        }
        let peer = match msg.xor_address(attr::XOR_PEER_ADDRESS) {
            Some(Ok(p)) => p,
            _ => {
                return self.error_response(
                    client,
                    method::CHANNEL_BIND,
                    tid,
                    400,
                    "XOR-PEER-ADDRESS missing or malformed",
                    a_auth,
                    fp,
                    &[],
                )
            }
        };
        let peer = match self.check_peer(slot, peer, true) {
            Ok(p) => p,
            Err((code, reason)) => {
                return self.error_response(
                    client,
                    method::CHANNEL_BIND,
                    tid,
                    code,
                    &reason,
                    a_auth,
                    fp,
                    &[],
                )
            }
        };
        let until = now + self.cfg.channel_lifetime;
        let max = self.cfg.max_channels;
        let own = self.cfg.policy.is_own(peer.ip());
        let Some(a) = self.slots[slot].as_mut() else {
            return;
        };
        let by_number = a.channels.iter().position(|c| c.number == number);
        let by_peer = a.channels.iter().position(|c| c.peer == peer);
        match (by_number, by_peer) {
            (Some(i), Some(j)) if i == j => a.channels[i].expires = until,
            (None, None) if a.channels.len() < max => {
                a.channels.push(Channel {
                    number,
                    peer,
                    expires: until,
                    own,
                });
                inc(&self.metrics.channels, 1);
            }
            (None, None) => {
                return self.error_response(
                    client,
                    method::CHANNEL_BIND,
                    tid,
                    508,
                    "Insufficient Capacity: too many channels on this allocation",
                    a_auth,
                    fp,
                    &[],
                )
            }
            _ => {
                return self.error_response(
                    client,
                    method::CHANNEL_BIND,
                    tid,
                    400,
                    "channel or peer already bound to another peer or channel",
                    a_auth,
                    fp,
                    &[],
                )
            }
        }
        // A channel needs the permission too (RFC 8656 §12.2); without room
        // for it the channel would silently carry nothing.
        if !self.add_permission(slot, peer.ip(), now + self.cfg.permission_lifetime) {
            if let Some(a) = self.slots[slot].as_mut() {
                if let Some(i) = a
                    .channels
                    .iter()
                    .position(|c| c.number == number && c.peer == peer)
                {
                    a.channels.remove(i);
                    self.metrics.channels.fetch_sub(1, Ordering::Relaxed);
                }
            }
            return self.error_response(
                client,
                method::CHANNEL_BIND,
                tid,
                508,
                "Insufficient Capacity: too many permissions on this allocation",
                a_auth,
                fp,
                &[],
            );
        }
        self.update_credentials(slot, &auth);
        self.success(client, method::CHANNEL_BIND, tid, &auth, fp, &[]);
    }

    /// Drops an allocation whose client connection closed (TCP/TLS).
    pub fn client_closed(&mut self, client: ClientSocket) {
        if let Some(&slot) = self.by_client.get(&client) {
            self.remove_allocation(slot);
        }
    }
}

/// Who a username stands for: the user part of a REST name (`expiry:user`),
/// otherwise the name itself. Quotas count per principal, so a client cannot
/// escape the per-user quota by minting names with other expiries, and
/// credential rotation keeps the count with the same principal.
fn principal(name: &str) -> &str {
    match name.split_once(':') {
        Some((expiry, user)) if expiry.parse::<u64>().is_ok() => user,
        _ => name,
    }
}

/// Same user for credential rotation: equal names, or REST names (`expiry:user`)
/// with the same user part.
fn same_principal(a: &str, b: &str) -> bool {
    a == b || principal(a) == principal(b) && a.contains(':') && b.contains(':')
}

fn pick_port(used: &mut HashSet<u16>, (lo, hi): (u16, u16)) -> Option<u16> {
    let span = (hi as u32).saturating_sub(lo as u32) + 1;
    if used.len() as u32 >= span {
        return None;
    }
    let start: u32 = rand::random::<u32>() % span;
    for i in 0..span {
        let p = (lo as u32 + (start + i) % span) as u16;
        if used.insert(p) {
            return Some(p);
        }
    }
    None
}

fn pick_even_port(used: &mut HashSet<u16>, (lo, hi): (u16, u16)) -> Option<u16> {
    let span = (hi as u32).saturating_sub(lo as u32) + 1;
    let start: u32 = rand::random::<u32>() % span;
    for i in 0..span {
        let p = (lo as u32 + (start + i) % span) as u16;
        if p.is_multiple_of(2) && used.insert(p) {
            return Some(p);
        }
    }
    None
}
