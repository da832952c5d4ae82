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
//!
//! Randomness (relayed port picks, Data indication transaction ids) comes
//! from an RNG the shard owns, seeded by the caller ([`Server::new`]); the
//! nonce secret comes in with [`ServerConfig::new`]. Same seeds and inputs
//! give byte-identical outputs.
//!
//! Files: `mod.rs` (this type, its API, dispatch), `allocation.rs`
//! (Allocate, ports, BindRelay, Refresh), `permissions.rs`
//! (CreatePermission, ChannelBind, expiry), `hot_path.rs` (the data paths),
//! `fast_path.rs` (what a kernel fast path may forward on its own),
//! `auth.rs` (integrity, nonces, challenges), `reply.rs` (answers),
//! `binding.rs` (Binding, RFC 5780), `quotas.rs`, `metrics.rs`,
//! `config.rs`, `roles.rs` (newtypes: `PeerAddr`, `AllocationPort`).

mod allocation;
mod auth;
mod binding;
mod config;
mod fast_path;
mod hot_path;
mod metrics;
mod permissions;
mod quotas;
mod reply;
mod roles;

pub use config::{AltAddress, ClockBase, ServerConfig};
pub use fast_path::FastPath;
pub use metrics::Metrics;
pub use quotas::Quotas;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use allocation::Allocation;
use metrics::inc;
use reply::Reply;
use roles::AllocationPort;

use crate::stun::{attr, channel_data, method, Class, Message};

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
    /// Install (or refresh) a channel binding in the kernel fast path, or
    /// remove it. Only with [`ServerConfig::fast_path`].
    FastPath {
        /// The binding, its expiry and its cap.
        entry: FastPath,
        /// True to install or refresh, false to remove.
        install: bool,
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

/// One shard of the STUN/TURN server.
#[derive(Debug)]
pub struct Server {
    cfg: ServerConfig,
    quotas: Arc<Quotas>,
    metrics: Arc<Metrics>,
    /// Allocations by slot; a [`RelayToken`] names a slot and its generation.
    slots: Vec<Option<Allocation>>,
    free: Vec<usize>,
    next_gen: u32,
    by_client: HashMap<ClientSocket, usize>,
    /// Relayed ports this shard holds or is binding, per family.
    ports_v4: HashSet<AllocationPort>,
    ports_v6: HashSet<AllocationPort>,
    /// Port picks and Data indication transaction ids; seeded by the caller
    /// so runs are reproducible.
    rng: StdRng,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    scratch: Vec<u8>,
    next_sweep: Instant,
    /// The request being handled: (milliseconds on the server clock, its
    /// length). Unauthenticated error answers are rate-limited and, with
    /// strict amplification, kept no larger than the request.
    current: (u32, usize),
}

impl Server {
    /// A shard with shared quotas and its own metrics. `seed` seeds the
    /// shard's random number generator (relayed port picks, transaction ids
    /// of Data indications): the driver passes OS randomness, tests a fixed
    /// value so that runs repeat byte for byte. Shards should get different
    /// seeds.
    pub fn new(
        cfg: ServerConfig,
        quotas: Arc<Quotas>,
        metrics: Arc<Metrics>,
        now: Instant,
        seed: u64,
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
            rng: StdRng::seed_from_u64(seed),
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

    /// Seconds on the server clock (nonce timestamps), from 1.
    fn secs(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.cfg.clock.instant)
            .as_secs() as u32
            + 1
    }

    /// Unix time (REST credential expiry).
    fn unix(&self, now: Instant) -> u64 {
        self.cfg.clock.unix
            + now
                .saturating_duration_since(self.cfg.clock.instant)
                .as_secs()
    }

    /// Milliseconds on the server clock (per-source budgets).
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
        self.expire_permissions_and_channels(now);
        self.sweep_fast_path(now);
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

    /// Dispatches a request by method after the 420 check.
    fn handle_request(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let r = Reply::to(client, msg);
        let unknown = msg.unknown_required();
        if !unknown.is_empty() {
            let v: Vec<u8> = unknown.iter().flat_map(|t| t.to_be_bytes()).collect();
            let extra = [(attr::UNKNOWN_ATTRIBUTES, &v[..])];
            return self.error_response(&r, 420, "Unknown Attribute", &extra);
        }
        match msg.method() {
            method::BINDING => self.binding(now, client, msg),
            method::ALLOCATE => self.allocate(now, client, msg),
            method::REFRESH => self.refresh(now, client, msg),
            method::CREATE_PERMISSION => self.create_permission(now, client, msg),
            method::CHANNEL_BIND => self.channel_bind(now, client, msg),
            m => {
                tracing::debug!(method = m, "unsupported STUN method");
                self.refuse(&r, 400, "Unsupported method");
            }
        }
    }

    /// Drops an allocation whose client connection closed (TCP/TLS).
    pub fn client_closed(&mut self, client: ClientSocket) {
        if let Some(&slot) = self.by_client.get(&client) {
            self.remove_allocation(slot);
        }
    }
}
