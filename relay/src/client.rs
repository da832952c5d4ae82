//! The sans-IO TURN client (RFC 8656) the agent embeds.
//!
//! Feed it what the server sends ([`Client::handle_input`]), send what
//! [`Client::poll_transmit`] returns to the server, call
//! [`Client::handle_timeout`] at [`Client::poll_timeout`], and read
//! [`Client::poll_event`]. It answers 401 and 438 by itself, retransmits over
//! UDP, refreshes the allocation, permissions and channel bindings before they
//! expire, and takes new credentials under a live allocation
//! ([`Client::set_credentials`]) without losing it.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::stun::channel_data::{self, ChannelNumber};
use crate::stun::{self, attr, method, Class, Integrity, Message, MessageBuilder, TransactionId};

/// Client settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// TURN username (static, or REST `expiry:user`).
    pub username: String,
    /// Password.
    pub password: String,
    /// Requested allocation lifetime.
    pub lifetime: Duration,
    /// Stream transport (TCP/TLS): no retransmissions, ChannelData padded.
    pub reliable: bool,
    /// Ask for an IPv6 relayed address too (ADDITIONAL-ADDRESS-FAMILY).
    pub dual_stack: bool,
    /// Which integrity attribute to use.
    pub integrity: Integrity,
    /// Pad unauthenticated requests so the server's challenge is never larger
    /// (for relays running with strict amplification limits).
    pub pad_unauthenticated: bool,
}

impl ClientConfig {
    /// Defaults: 600 s lifetime, UDP, IPv4, MESSAGE-INTEGRITY (SHA-1), no padding.
    pub fn new(username: &str, password: &str) -> Self {
        ClientConfig {
            username: username.to_owned(),
            password: password.to_owned(),
            lifetime: Duration::from_secs(600),
            reliable: false,
            dual_stack: false,
            integrity: Integrity::Sha1,
            pad_unauthenticated: false,
        }
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The allocation exists.
    Allocated {
        /// Relayed addresses (one per family).
        relayed: Vec<SocketAddr>,
        /// Our address as the server sees it (server-reflexive).
        mapped: Option<SocketAddr>,
        /// Granted lifetime.
        lifetime: Duration,
    },
    /// A permission is installed (or refreshed).
    PermissionCreated(IpAddr),
    /// A channel is bound (or refreshed).
    ChannelBound {
        /// The peer.
        peer: SocketAddr,
        /// The channel number.
        channel: u16,
    },
    /// The allocation was refreshed.
    Refreshed {
        /// Granted lifetime.
        lifetime: Duration,
    },
    /// A request failed with an error the client cannot fix by itself.
    Failed {
        /// Which request (`"Allocate"`, `"Refresh"`, …).
        request: &'static str,
        /// STUN error code, or 0 for a timeout.
        code: u16,
        /// The server's reason or ours.
        reason: String,
    },
    /// The allocation is gone (expired, mismatch, or refresh failed).
    Lost {
        /// Why.
        reason: String,
        /// The server answered (it no longer knows the allocation, e.g. it
        /// restarted); `false` when it stopped answering.
        answered: bool,
    },
    /// The allocation was deleted on request.
    Deallocated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Allocate,
    Refresh,
    Deallocate,
    Permission(IpAddr),
    Channel(SocketAddr, ChannelNumber),
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Allocate => "Allocate",
            Kind::Refresh | Kind::Deallocate => "Refresh",
            Kind::Permission(_) => "CreatePermission",
            Kind::Channel(..) => "ChannelBind",
        }
    }
}

#[derive(Debug)]
struct Transaction {
    kind: Kind,
    request: Vec<u8>,
    next: Instant,
    rto: Duration,
    sent: u8,
    /// Times this request was re-issued after 401/438.
    auth_retries: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Allocating,
    Allocated,
}

/// The TURN client state machine.
#[derive(Debug)]
pub struct Client {
    cfg: ClientConfig,
    state: State,
    realm: Option<String>,
    nonce: Option<String>,
    key: Option<[u8; 16]>,
    transactions: HashMap<TransactionId, Transaction>,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<ClientEvent>,
    relayed: Vec<SocketAddr>,
    mapped: Option<SocketAddr>,
    refresh_at: Option<Instant>,
    permissions: HashMap<IpAddr, Instant>,
    /// Peer → (number, last bound or asked, confirmed by the server).
    channels: HashMap<SocketAddr, (ChannelNumber, Instant, bool)>,
    by_channel: HashMap<ChannelNumber, SocketAddr>,
    next_channel: u16,
    /// Channel numbers given up recently: the server may hold them for up
    /// to 10 minutes, so they are not reused before that.
    released: HashMap<ChannelNumber, (SocketAddr, Instant)>,
    /// Credentials the live allocation was using before `set_credentials`,
    /// kept until the server accepts the new ones.
    previous: Option<(String, String)>,
    /// New credentials a server refused under the live allocation (441, as
    /// RFC 8656 servers such as coturn do for a new username): used from
    /// the next Allocate on.
    deferred: Option<(String, String)>,
    /// Transaction ids; seeded by the caller so runs are reproducible.
    rng: StdRng,
}

const RTO: Duration = Duration::from_millis(500);
const MAX_SENDS: u8 = 7;
const PERMISSION_REFRESH: Duration = Duration::from_secs(240);
const CHANNEL_REFRESH: Duration = Duration::from_secs(480);
/// A released channel number waits this long (the server's 10-minute
/// binding lifetime plus margin) before it is used for another peer.
const CHANNEL_QUARANTINE: Duration = Duration::from_secs(660);

impl Client {
    /// A client that has not allocated yet. `seed` seeds its random number
    /// generator (transaction ids): pass OS randomness (`rand::random()`) in
    /// production, a fixed value in tests so runs repeat byte for byte. Every
    /// client (and every restart of one) needs a fresh seed: a server takes a
    /// repeated Allocate transaction id for a retransmission.
    pub fn new(cfg: ClientConfig, seed: u64) -> Self {
        Client {
            cfg,
            state: State::Idle,
            realm: None,
            nonce: None,
            key: None,
            transactions: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            relayed: Vec::new(),
            mapped: None,
            refresh_at: None,
            permissions: HashMap::new(),
            channels: HashMap::new(),
            by_channel: HashMap::new(),
            next_channel: channel_data::MIN_CHANNEL,
            released: HashMap::new(),
            previous: None,
            deferred: None,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Relayed addresses once allocated.
    pub fn relayed(&self) -> &[SocketAddr] {
        &self.relayed
    }

    /// Server-reflexive address learned from the Allocate response.
    pub fn mapped(&self) -> Option<SocketAddr> {
        self.mapped
    }

    /// The username of the next request (under a live allocation after a
    /// 441: the one the allocation was made with).
    pub fn username(&self) -> &str {
        &self.cfg.username
    }

    /// True when the allocation is live.
    pub fn is_allocated(&self) -> bool {
        self.state == State::Allocated
    }

    /// The channel bound (confirmed) for a peer.
    pub fn channel_for(&self, peer: SocketAddr) -> Option<u16> {
        self.channels.get(&peer).filter(|c| c.2).map(|c| c.0.get())
    }

    /// Starts (or restarts) an allocation.
    pub fn allocate(&mut self, now: Instant) {
        if self.state != State::Idle {
            return;
        }
        if let Some((u, p)) = self.deferred.take() {
            self.use_credentials(&u, &p);
        }
        self.previous = None;
        self.state = State::Allocating;
        self.start(now, Kind::Allocate, 0);
    }

    /// Refreshes the allocation now (unless a refresh is already out): a
    /// liveness probe. A server that lost the allocation (it restarted)
    /// answers 437 and a `Lost` event follows; one that is gone times out.
    pub fn refresh_now(&mut self, now: Instant) {
        let pending = self
            .transactions
            .values()
            .any(|t| matches!(t.kind, Kind::Refresh | Kind::Allocate));
        if self.state == State::Allocated && !pending {
            self.start(now, Kind::Refresh, 0);
        }
    }

    /// Deletes the allocation (Refresh with LIFETIME 0).
    pub fn deallocate(&mut self, now: Instant) {
        if self.state == State::Allocated {
            self.start(now, Kind::Deallocate, 0);
        }
    }

    /// New credentials for the next requests; the allocation is kept and the
    /// next Refresh is sent at once so a rejection shows up early.
    ///
    /// A server may refuse a *new username* under a live allocation (441
    /// Wrong Credentials, as RFC 8656 says and coturn does; wgice's relay
    /// accepts a new REST expiry for the same user). Then the client goes
    /// back to the credentials the allocation was using, keeps it alive with
    /// them, reports a `Failed { code: 441 }`, and uses the new credentials
    /// from the next Allocate on.
    pub fn set_credentials(&mut self, now: Instant, username: &str, password: &str) {
        if self.state == State::Allocated && self.previous.is_none() {
            self.previous = Some((self.cfg.username.clone(), self.cfg.password.clone()));
        }
        self.use_credentials(username, password);
        if self.state == State::Allocated {
            self.start(now, Kind::Refresh, 0);
        } else {
            self.deferred = None;
        }
    }

    fn use_credentials(&mut self, username: &str, password: &str) {
        self.cfg.username = username.to_owned();
        self.cfg.password = password.to_owned();
        self.key = self
            .realm
            .as_ref()
            .map(|r| stun::long_term_key(username, r, password));
    }

    /// Installs a permission for `ip` (kept fresh until the client is dropped).
    pub fn create_permission(&mut self, now: Instant, ip: IpAddr) {
        self.permissions.entry(ip).or_insert(now);
        if self.state == State::Allocated {
            self.start(now, Kind::Permission(ip), 0);
        }
    }

    /// Binds a channel to `peer` (and its permission); returns the channel
    /// number, or `None` when all 4096 numbers are bound or recently
    /// released (use Send indications for that peer meanwhile).
    pub fn bind_channel(&mut self, now: Instant, peer: SocketAddr) -> Option<u16> {
        if let Some((n, _, _)) = self.channels.get(&peer) {
            return Some(n.get());
        }
        // The ChannelBind installs the permission for 300 s, but the channel
        // is refreshed only after 480 s: the permission needs its own
        // refreshes in between, or both directions stop at 300 s.
        self.permissions.entry(peer.ip()).or_insert(now);
        self.released
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < CHANNEL_QUARANTINE);
        // The server may still hold this peer's old binding: only that
        // number is accepted for it (a different one is a 400).
        let old = self
            .released
            .iter()
            .find(|(_, (p, _))| *p == peer)
            .map(|(n, _)| *n);
        if let Some(n) = old {
            self.released.remove(&n);
            self.channels.insert(peer, (n, now, false));
            self.by_channel.insert(n, peer);
            if self.state == State::Allocated {
                self.start(now, Kind::Channel(peer, n), 0);
            }
            return Some(n.get());
        }
        let min = channel_data::MIN_CHANNEL;
        let span = channel_data::MAX_CHANNEL_RFC8656 - min + 1;
        let start = self.next_channel.saturating_sub(min) % span;
        let n = (0..span)
            .filter_map(|i| ChannelNumber::new(min + (start + i) % span))
            .find(|n| !self.by_channel.contains_key(n) && !self.released.contains_key(n))?;
        self.next_channel = min + (n.get() - min + 1) % span;
        self.channels.insert(peer, (n, now, false));
        self.by_channel.insert(n, peer);
        if self.state == State::Allocated {
            self.start(now, Kind::Channel(peer, n), 0);
        }
        Some(n.get())
    }

    /// Stops keeping `peer`'s channel alive (the server lets it expire);
    /// its number is reused only after the server has forgotten it.
    pub fn release_channel(&mut self, now: Instant, peer: SocketAddr) {
        if let Some((n, _, _)) = self.channels.remove(&peer) {
            self.by_channel.remove(&n);
            self.released.insert(n, (peer, now));
        }
    }

    /// Stops refreshing the permission for `ip` (it expires at the server
    /// within 5 minutes). Channels to that IP keep their own permission.
    pub fn release_permission(&mut self, ip: IpAddr) {
        self.permissions.remove(&ip);
    }

    /// Frames `payload` for `peer`: ChannelData when a channel is confirmed,
    /// otherwise a Send indication (needs a permission). Appends to `out`.
    pub fn encode_to(&mut self, peer: SocketAddr, payload: &[u8], out: &mut Vec<u8>) {
        if let Some(ch) = self.channel_for(peer) {
            channel_data::encode(out, ch, payload, self.cfg.reliable);
            return;
        }
        let tid: TransactionId = self.rng.random();
        let mut v = Vec::with_capacity(payload.len() + 40);
        MessageBuilder::new(&mut v, method::SEND, Class::Indication, tid)
            .xor_address(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, payload);
        out.extend_from_slice(&v);
    }

    /// Next datagram for the server.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// Next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// When to call [`Client::handle_timeout`].
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = self.transactions.values().map(|t| t.next).min();
        let mut best = match (t, self.refresh_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if self.state == State::Allocated {
            for at in self.permissions.values() {
                let due = *at + PERMISSION_REFRESH;
                best = Some(best.map_or(due, |b| b.min(due)));
            }
            for (_, at, ok) in self.channels.values() {
                if *ok {
                    let due = *at + CHANNEL_REFRESH;
                    best = Some(best.map_or(due, |b| b.min(due)));
                }
            }
        }
        best
    }

    /// Retransmits and refreshes that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut failed = Vec::new();
        for (tid, t) in self.transactions.iter_mut() {
            if t.next > now {
                continue;
            }
            if self.cfg.reliable || t.sent >= MAX_SENDS {
                failed.push(*tid);
                continue;
            }
            t.sent += 1;
            t.rto = (t.rto * 2).min(Duration::from_secs(8));
            t.next = now + if t.sent == MAX_SENDS { RTO * 16 } else { t.rto };
            self.transmits.push_back(t.request.clone());
        }
        for tid in failed {
            if let Some(t) = self.transactions.remove(&tid) {
                self.fail(t.kind, 0, "no response from the TURN server".into());
            }
        }
        if self.state != State::Allocated {
            return;
        }
        if self.refresh_at.is_some_and(|r| r <= now) {
            self.refresh_at = None;
            self.start(now, Kind::Refresh, 0);
        }
        let perms: Vec<IpAddr> = self
            .permissions
            .iter()
            .filter(|(_, at)| **at + PERMISSION_REFRESH <= now)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in perms {
            self.permissions.insert(ip, now);
            self.start(now, Kind::Permission(ip), 0);
        }
        let chans: Vec<(SocketAddr, ChannelNumber)> = self
            .channels
            .iter()
            .filter(|(_, (_, at, ok))| *ok && *at + CHANNEL_REFRESH <= now)
            .map(|(p, (n, _, _))| (*p, *n))
            .collect();
        for (peer, n) in chans {
            if let Some(c) = self.channels.get_mut(&peer) {
                c.1 = now;
            }
            self.start(now, Kind::Channel(peer, n), 0);
        }
    }

    fn fail(&mut self, kind: Kind, code: u16, reason: String) {
        match kind {
            Kind::Allocate => {
                self.state = State::Idle;
                self.events.push_back(ClientEvent::Failed {
                    request: kind.name(),
                    code,
                    reason,
                });
            }
            Kind::Refresh if code == 437 || code == 0 => self.lost(reason, code != 0),
            _ if code == 437 => self.lost(reason, true),
            _ => self.events.push_back(ClientEvent::Failed {
                request: kind.name(),
                code,
                reason,
            }),
        }
    }

    fn lost(&mut self, reason: String, answered: bool) {
        if self.state == State::Idle {
            return;
        }
        self.state = State::Idle;
        self.relayed.clear();
        self.refresh_at = None;
        self.transactions.clear();
        for c in self.channels.values_mut() {
            c.2 = false;
        }
        self.events
            .push_back(ClientEvent::Lost { reason, answered });
    }

    fn start(&mut self, now: Instant, kind: Kind, auth_retries: u8) {
        let tid: TransactionId = self.rng.random();
        let m = match kind {
            Kind::Allocate => method::ALLOCATE,
            Kind::Refresh | Kind::Deallocate => method::REFRESH,
            Kind::Permission(_) => method::CREATE_PERMISSION,
            Kind::Channel(..) => method::CHANNEL_BIND,
        };
        let mut out = Vec::with_capacity(160);
        {
            let mut b = MessageBuilder::new(&mut out, m, Class::Request, tid);
            match kind {
                Kind::Allocate => {
                    b.u32_attr(attr::REQUESTED_TRANSPORT, 17 << 24);
                    b.u32_attr(attr::LIFETIME, self.cfg.lifetime.as_secs() as u32);
                    if self.cfg.dual_stack {
                        b.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
                    }
                }
                Kind::Refresh => {
                    b.u32_attr(attr::LIFETIME, self.cfg.lifetime.as_secs() as u32);
                }
                Kind::Deallocate => {
                    b.u32_attr(attr::LIFETIME, 0);
                }
                Kind::Permission(ip) => {
                    b.xor_address(attr::XOR_PEER_ADDRESS, SocketAddr::new(ip, 0));
                }
                Kind::Channel(peer, n) => {
                    let [hi, lo] = n.get().to_be_bytes();
                    b.attr(attr::CHANNEL_NUMBER, &[hi, lo, 0, 0]);
                    b.xor_address(attr::XOR_PEER_ADDRESS, peer);
                }
            }
            match (&self.realm, &self.nonce, &self.key) {
                (Some(realm), Some(nonce), Some(key)) => {
                    b.attr(attr::USERNAME, self.cfg.username.as_bytes())
                        .attr(attr::REALM, realm.as_bytes())
                        .attr(attr::NONCE, nonce.as_bytes())
                        .integrity(self.cfg.integrity, key);
                }
                _ if self.cfg.pad_unauthenticated => {
                    let pad = 160usize.saturating_sub(b.len() + 4 + 8);
                    b.attr(attr::PADDING, &vec![0u8; pad]);
                }
                _ => {}
            }
            b.fingerprint();
        }
        self.transmits.push_back(out.clone());
        self.transactions.insert(
            tid,
            Transaction {
                kind,
                request: out,
                // Over TCP/TLS there are no retransmissions: wait Ti = 39.5 s
                // (RFC 8489 §6.2.2) before giving up.
                next: now
                    + if self.cfg.reliable {
                        Duration::from_millis(39_500)
                    } else {
                        RTO
                    },
                rto: RTO,
                sent: 1,
                auth_retries,
            },
        );
    }

    /// A datagram (or framed stream message) from the server. Returns the
    /// peer and payload for ChannelData and Data indications.
    pub fn handle_input<'a>(
        &mut self,
        now: Instant,
        data: &'a [u8],
    ) -> Option<(SocketAddr, &'a [u8])> {
        if channel_data::is_channel_data(data) {
            let (n, payload) = channel_data::decode(data)?;
            let peer = *self.by_channel.get(&ChannelNumber::new(n)?)?;
            return Some((peer, payload));
        }
        let msg = Message::parse(data).ok()?;
        if msg.class() == Class::Indication {
            if msg.method() != method::DATA {
                return None;
            }
            let peer = msg.xor_address(attr::XOR_PEER_ADDRESS)?.ok()?;
            return Some((peer, msg.get(attr::DATA)?));
        }
        let t = self.transactions.remove(&msg.transaction_id())?;
        match msg.class() {
            Class::Success => {
                if let Some(key) = self.key {
                    if msg.verify_integrity(&key).is_none() {
                        // Not from the server we authenticated with: ignore, keep waiting.
                        self.transactions.insert(msg.transaction_id(), t);
                        return None;
                    }
                }
                self.on_success(now, t.kind, &msg);
            }
            Class::Error => {
                let (code, reason) = msg.error_code().unwrap_or((0, ""));
                let reason = reason.to_owned();
                if (code == 401 || code == 438) && t.auth_retries < 2 {
                    let had_key = self.key.is_some() && self.nonce.is_some();
                    if let Some(realm) = msg.str_attr(attr::REALM) {
                        self.realm = Some(realm.to_owned());
                        self.key = Some(stun::long_term_key(
                            &self.cfg.username,
                            realm,
                            &self.cfg.password,
                        ));
                    }
                    if let Some(nonce) = msg.str_attr(attr::NONCE) {
                        self.nonce = Some(nonce.to_owned());
                    }
                    // A 401 after we sent credentials means they are wrong.
                    if code == 401 && had_key && t.auth_retries > 0 {
                        self.fail(
                            t.kind,
                            code,
                            format!("credentials rejected for {:?}: {reason}", self.cfg.username),
                        );
                        return None;
                    }
                    self.start(now, t.kind, t.auth_retries + 1);
                } else if code == 441 && t.kind != Kind::Allocate && self.previous.is_some() {
                    // New username refused under the live allocation: keep it
                    // alive with the old credentials, defer the new ones.
                    if let Some((u, p)) = self.previous.take() {
                        self.deferred =
                            Some((self.cfg.username.clone(), self.cfg.password.clone()));
                        self.use_credentials(&u, &p);
                    }
                    self.events.push_back(ClientEvent::Failed {
                        request: t.kind.name(),
                        code,
                        reason: format!("{reason}; the relay keeps a live allocation's username, so the old credentials stay in use and the new ones apply from the next allocation"),
                    });
                    self.start(now, t.kind, t.auth_retries);
                } else if code == 440 && t.kind == Kind::Allocate && self.cfg.dual_stack {
                    // A server that will not do the additional IPv6 family
                    // at all (instead of answering with ADDRESS-ERROR-CODE):
                    // ask for the default family alone.
                    self.cfg.dual_stack = false;
                    self.start(now, t.kind, t.auth_retries);
                } else if code == 437 && t.kind == Kind::Allocate && t.auth_retries < 3 {
                    // The server still holds an allocation for our 5-tuple
                    // (we restarted): delete it, then allocate again.
                    self.state = State::Allocated;
                    self.start(now, Kind::Deallocate, 0);
                    self.state = State::Allocating;
                } else {
                    if let Kind::Channel(peer, n) = t.kind {
                        // Only if the failed request was for the binding
                        // still held (not one released and re-made since).
                        if code != 437 && self.channels.get(&peer).is_some_and(|c| c.0 == n) {
                            self.channels.remove(&peer);
                            self.by_channel.remove(&n);
                        }
                    }
                    self.fail(t.kind, code, reason);
                }
            }
            _ => {}
        }
        None
    }

    fn on_success(&mut self, now: Instant, kind: Kind, msg: &Message<'_>) {
        // The server took the current credentials.
        self.previous = None;
        let lifetime = Duration::from_secs(msg.u32_attr(attr::LIFETIME).unwrap_or(600) as u64);
        match kind {
            Kind::Allocate => {
                self.relayed = msg
                    .xor_addresses(attr::XOR_RELAYED_ADDRESS)
                    .filter_map(Result::ok)
                    .collect();
                self.mapped = msg
                    .xor_address(attr::XOR_MAPPED_ADDRESS)
                    .and_then(Result::ok);
                self.state = State::Allocated;
                self.refresh_at = Some(now + refresh_margin(lifetime));
                self.events.push_back(ClientEvent::Allocated {
                    relayed: self.relayed.clone(),
                    mapped: self.mapped,
                    lifetime,
                });
                // Install what was asked for before the allocation existed.
                let perms: Vec<IpAddr> = self.permissions.keys().copied().collect();
                for ip in perms {
                    self.permissions.insert(ip, now);
                    self.start(now, Kind::Permission(ip), 0);
                }
                let chans: Vec<(SocketAddr, ChannelNumber)> =
                    self.channels.iter().map(|(p, c)| (*p, c.0)).collect();
                for (p, n) in chans {
                    self.start(now, Kind::Channel(p, n), 0);
                }
            }
            Kind::Refresh => {
                self.refresh_at = Some(now + refresh_margin(lifetime));
                self.events.push_back(ClientEvent::Refreshed { lifetime });
            }
            Kind::Deallocate => {
                if self.state == State::Allocating {
                    // Part of the 437 recovery: allocate afresh.
                    self.start(now, Kind::Allocate, 3);
                    return;
                }
                self.state = State::Idle;
                self.relayed.clear();
                self.refresh_at = None;
                self.events.push_back(ClientEvent::Deallocated);
            }
            Kind::Permission(ip) => {
                // (Unless it was released while the request was out.)
                if let Some(at) = self.permissions.get_mut(&ip) {
                    *at = now;
                }
                self.events.push_back(ClientEvent::PermissionCreated(ip));
            }
            Kind::Channel(peer, n) => {
                match self.channels.get_mut(&peer) {
                    Some(c) if c.0 == n => {
                        c.1 = now;
                        c.2 = true;
                    }
                    // Released while the request was out.
                    _ => return,
                }
                self.events.push_back(ClientEvent::ChannelBound {
                    peer,
                    channel: n.get(),
                });
            }
        }
    }
}

fn refresh_margin(lifetime: Duration) -> Duration {
    // Refresh a minute early, or at half-life for short lifetimes.
    if lifetime > Duration::from_secs(120) {
        lifetime - Duration::from_secs(60)
    } else {
        lifetime / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_refusing_the_additional_ipv6_family_gets_a_plain_allocate() {
        let mut cfg = ClientConfig::new("u", "p");
        cfg.dual_stack = true;
        let mut c = Client::new(cfg, 1);
        let now = Instant::now();
        c.allocate(now);
        let first = c.poll_transmit().expect("Allocate");
        let m = Message::parse(&first).expect("STUN");
        assert!(m.get(attr::ADDITIONAL_ADDRESS_FAMILY).is_some());
        let mut refusal = Vec::new();
        MessageBuilder::new(
            &mut refusal,
            method::ALLOCATE,
            Class::Error,
            m.transaction_id(),
        )
        .error(440, "Address Family not Supported");
        assert!(c.handle_input(now, &refusal).is_none());
        let again = c.poll_transmit().expect("Allocate again");
        let m = Message::parse(&again).expect("STUN");
        assert_eq!(m.method(), method::ALLOCATE);
        assert!(m.get(attr::ADDITIONAL_ADDRESS_FAMILY).is_none());
        assert_eq!(c.poll_event(), None, "not a failure");
    }

    #[test]
    fn channel_numbers_are_never_shared_and_wait_after_release() {
        let mut c = Client::new(ClientConfig::new("u", "p"), 1);
        let t0 = Instant::now();
        let peer = |i: u32| SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 9));
        let mut seen = std::collections::HashSet::new();
        for i in 0..4096 {
            let n = c.bind_channel(t0, peer(i)).expect("free number");
            assert!((0x4000..=0x4FFF).contains(&n));
            assert!(seen.insert(n), "channel {n:#x} handed out twice");
        }
        // All taken: no number rather than someone else's.
        assert_eq!(c.bind_channel(t0, peer(5000)), None);
        // The same peer keeps its number.
        assert_eq!(
            c.bind_channel(t0, peer(7)),
            c.channel_for(peer(7)).or(Some(0x4007))
        );
        let n = c.bind_channel(t0, peer(3)).expect("bound");
        c.release_channel(t0, peer(3));
        // The server may still hold it for 10 minutes.
        assert_eq!(
            c.bind_channel(t0 + Duration::from_secs(300), peer(5000)),
            None
        );
        // The same peer gets its old number back at once (the server would
        // refuse another one for it while the old binding lives).
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(c.bind_channel(t1, peer(3)), Some(n));
        c.release_channel(t1, peer(3));
        let later = t1 + Duration::from_secs(700);
        assert_eq!(c.bind_channel(later, peer(5000)), Some(n));
    }
}
