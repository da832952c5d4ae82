//! Embedded mode: WireGuard in the agent process, on the agent's one UDP
//! socket, behind a TUN interface the agent creates.
//!
//! The WireGuard protocol is boringtun's sans-IO [`Tunn`] (one per peer; the
//! choice against gotatun is in `docs/architecture.md`). This module is the
//! device around it: the peer table (keys, allowed IPs as cryptokey
//! routing, receiver indices), where each peer's packets go (the path the
//! agent chose: direct, or framed for a TURN relay in place behind a
//! 4-byte headroom), the timers, and the counters `wg show` and
//! `ice-agent status` read. Threads: one reads the TUN and encrypts; the
//! agent's main loop decrypts what arrives on the socket. The peer table is
//! changed through the WireGuard UAPI only ([`super::uapi`]), like a
//! wireguard-go interface, so the agent's WireGuard control thread treats
//! both modes alike.
//!
//! Every datagram handed to [`Device::receive`] is remote input: it is
//! attributed to a peer only by its receiver index or, for a handshake
//! initiation, after boringtun's MAC and rate-limit check and the static
//! key decryption; a decrypted packet is written to the TUN only when its
//! inner source address routes back to the same peer.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey as XPublic, StaticSecret};
use ipnet::IpNet;
use relay::stun::channel_data;

use super::offload::{self, Gro, VnetHdr, VNET_HDR_LEN};
use super::tun::{Routes, Tun};
use crate::agent::{PeerKey, Route};
use crate::wg::{WgDevice, WgPeer};

/// Bytes kept free in front of every WireGuard packet: a ChannelData
/// header is written there in place when the path is a TURN channel.
pub const HEADROOM: usize = 4;
/// Handshake initiations per second before cookies are required (the
/// value wireguard-go and boringtun use).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Packets kept per peer while it has no path yet (the first handshake).
const HOLD: usize = 8;
/// Largest packet the TUN hands over (its MTU is ≤ 65535) plus overhead.
const BUF: usize = 65536 + 64;

/// A peer as the table holds it.
#[derive(Debug)]
struct Peer {
    key: PeerKey,
    index: u32,
    st: Mutex<PeerState>,
}

struct PeerState {
    tunn: Tunn,
    /// The path the agent chose; `None` for peers it does not manage.
    route: Option<Route>,
    /// The UAPI endpoint (or, for unmanaged peers, the last authenticated
    /// direct source: WireGuard roaming).
    endpoint: Option<SocketAddr>,
    allowed: Vec<IpNet>,
    keepalive: u16,
    psk: Option<[u8; 32]>,
    held: VecDeque<Vec<u8>>,
    /// Which of the device's sockets the path uses.
    via: usize,
}

impl PeerState {
    /// Where packets go now: the agent's path, else the UAPI endpoint.
    fn effective_route(&self) -> Route {
        match (self.route, self.endpoint) {
            (Some(r), _) => r,
            (None, Some(e)) => Route::Direct(e),
            (None, None) => Route::Hold,
        }
    }
}

/// Encrypted datagrams to one destination, back to back, sent with one
/// `sendmsg` (UDP GSO: all `stride` bytes but the last). Sent when the
/// destination changes, a datagram is longer than the first, after a
/// shorter one, at 64 datagrams or 64 KiB, and after every TUN burst.
struct Batch {
    buf: Vec<u8>,
    /// Destination and the socket it leaves from.
    to: Option<(SocketAddr, usize)>,
    stride: usize,
    count: usize,
    short: bool,
    gso: bool,
}

/// Most bytes one GSO send carries (the kernel's limit is one IP packet).
const GSO_BYTES: usize = 65000;
const GSO_SEGMENTS: usize = 64;

impl Batch {
    fn new(gso: bool) -> Batch {
        Batch {
            buf: Vec::with_capacity(GSO_BYTES + BUF),
            to: None,
            stride: 0,
            count: 0,
            short: false,
            gso,
        }
    }

    /// Sends what is batched if a datagram of up to `room` bytes to `to`
    /// cannot join it.
    fn make_room(&mut self, dev: &Device, to: (SocketAddr, usize), room: usize) {
        if self.count > 0
            && (self.to != Some(to)
                || self.short
                || !self.gso
                || self.count >= GSO_SEGMENTS
                || self.buf.len() + room > GSO_BYTES)
        {
            self.flush(dev);
        }
    }

    /// A datagram of `len` bytes to `to` was appended.
    fn added(&mut self, dev: &Device, to: (SocketAddr, usize), len: usize) {
        if self.count == 0 {
            self.to = Some(to);
            self.stride = len;
        } else if len > self.stride {
            // Longer than the ones before: send those, keep this one.
            let start = self.buf.len() - len;
            let prev = self.buf[..start].to_vec();
            let (stride, count) = (self.stride, self.count);
            dev.send_batch(&prev, to.0, to.1, stride, count);
            self.buf.drain(..start);
            self.stride = len;
            self.count = 0;
        } else if len < self.stride {
            self.short = true;
        }
        self.count += 1;
    }

    fn flush(&mut self, dev: &Device) {
        if let (Some((to, via)), true) = (self.to, self.count > 0) {
            dev.send_batch(&self.buf, to, via, self.stride, self.count);
        }
        self.buf.clear();
        self.count = 0;
        self.short = false;
        self.to = None;
    }
}

impl std::fmt::Debug for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerState")
            .field("route", &self.route)
            .field("endpoint", &self.endpoint)
            .field("allowed", &self.allowed)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Table {
    peers: HashMap<PeerKey, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    /// Single-address allowed IPs (the mesh's usual case): one hash lookup.
    hosts: HashMap<IpAddr, Arc<Peer>>,
    /// Prefixes, longest first.
    nets: Vec<(IpNet, Arc<Peer>)>,
}

impl Table {
    fn lookup(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        self.hosts.get(&dst).or_else(|| {
            self.nets
                .iter()
                .find(|(n, _)| n.contains(&dst))
                .map(|(_, p)| p)
        })
    }

    fn rebuild_routing(&mut self, allowed: &HashMap<PeerKey, Vec<IpNet>>) {
        self.hosts.clear();
        self.nets.clear();
        for (k, list) in allowed {
            let Some(p) = self.peers.get(k) else { continue };
            for n in list {
                if n.prefix_len() == n.max_prefix_len() {
                    self.hosts.insert(n.addr(), p.clone());
                } else {
                    self.nets.push((n.trunc(), p.clone()));
                }
            }
        }
        self.nets
            .sort_by(|a, b| b.0.prefix_len().cmp(&a.0.prefix_len()).then(a.0.cmp(&b.0)));
    }
}

/// Refusals and events of the data plane (monotonic counters).
#[derive(Debug, Default)]
pub struct Counters {
    /// WireGuard datagrams refused: unknown receiver index or sender key,
    /// bad MAC, failed authentication, replayed counter, under load.
    pub wg_rejected: AtomicU64,
    /// Decrypted packets whose inner source is not an allowed IP of the
    /// peer that sent them (cryptokey routing).
    pub wg_bad_source: AtomicU64,
    /// Packets from the TUN with no peer for their destination.
    pub no_peer: AtomicU64,
    /// Sends the socket refused (buffer full, unreachable).
    pub send_errors: AtomicU64,
}

/// The embedded WireGuard device.
pub struct Device {
    tun: Tun,
    /// The agent's sockets: 0 is the main one; more may be added for paths
    /// won on other ports ([`Device::add_socket`]).
    socks: RwLock<Vec<Arc<UdpSocket>>>,
    dual: bool,
    port: u16,
    private: StaticSecret,
    public: XPublic,
    limiter: Arc<RateLimiter>,
    table: RwLock<Table>,
    /// Allowed IPs per peer, as configured (the routing index is built from it).
    allowed: Mutex<HashMap<PeerKey, Vec<IpNet>>>,
    routes: Mutex<Routes>,
    /// Paths the agent chose for peers the UAPI has not created yet.
    pending: Mutex<HashMap<PeerKey, (Route, usize)>>,
    next_index: AtomicU32,
    stop: AtomicBool,
    /// Send batches with UDP GSO (off after the kernel refused once).
    gso: AtomicBool,
    /// Decrypted packets waiting to be joined before the TUN.
    rx: Mutex<Gro>,
    /// Refusal counters.
    pub counters: Counters,
    /// Relays reached over TCP/TLS: what is sent to them goes on the stream.
    streams: crate::turn_stream::driver::Table,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("tun", &self.tun)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Where a framed packet leaves for, and which bytes of the buffer to send.
fn place(route: Route, len: usize) -> Option<(SocketAddr, std::ops::Range<usize>, Option<u16>)> {
    match route {
        Route::Hold | Route::Indication { .. } => None,
        Route::Direct(to) => Some((to, HEADROOM..HEADROOM + len, None)),
        Route::Channel { server, channel } => Some((server, 0..HEADROOM + len, Some(channel))),
    }
}

impl Device {
    /// A device on `tun`, sending from `sock` (a handle on the agent
    /// socket, whose port is `port`), with the node's private key.
    pub fn new(
        tun: Tun,
        sock: UdpSocket,
        dual: bool,
        port: u16,
        private: [u8; 32],
        own: &[IpNet],
        off: super::Offloads,
    ) -> Device {
        let private = StaticSecret::from(private);
        let public = XPublic::from(&private);
        let routes = Routes::new(tun.name(), own);
        let coalesce = tun.offload() && off.coalesce;
        Device {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            tun,
            socks: RwLock::new(vec![Arc::new(sock)]),
            dual,
            port,
            private,
            public,
            table: RwLock::new(Table::default()),
            allowed: Mutex::new(HashMap::new()),
            routes: Mutex::new(routes),
            pending: Mutex::new(HashMap::new()),
            // Receiver indices carry the peer in their top 24 bits; start
            // anywhere so indices do not repeat across restarts.
            next_index: AtomicU32::new(rand::random::<u32>() & 0x7f_ffff),
            stop: AtomicBool::new(false),
            gso: AtomicBool::new(off.gso),
            rx: Mutex::new(Gro::new(coalesce)),
            counters: Counters::default(),
            streams: Default::default(),
        }
    }

    /// Relays reached over TCP/TLS (the daemon's stream table): what the
    /// device sends to them goes on their streams.
    pub fn with_streams(mut self, streams: crate::turn_stream::driver::Table) -> Device {
        self.streams = streams;
        self
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        self.tun.name()
    }

    /// The node's public key.
    pub fn public_key(&self) -> PeerKey {
        signaling::PublicKey(self.public.to_bytes())
    }

    /// Adds one of the agent's sockets; returns the index a route names it by.
    pub fn add_socket(&self, sock: UdpSocket) -> usize {
        match self.socks.write() {
            Ok(mut v) => {
                v.push(Arc::new(sock));
                v.len() - 1
            }
            Err(_) => 0,
        }
    }

    /// Puts `sock` in slot `via` (a freed slot gets the main socket back).
    pub fn set_socket(&self, via: usize, sock: UdpSocket) {
        if let Ok(mut v) = self.socks.write() {
            if let Some(s) = v.get_mut(via).filter(|_| via > 0) {
                *s = Arc::new(sock);
            }
        }
    }

    /// Sends `data` to `to` from socket `via` (the agent's own checks on
    /// a birthday socket).
    pub fn send_from(&self, via: usize, to: SocketAddr, data: &[u8]) {
        self.send(data, to, via);
    }

    fn sock(&self, via: usize) -> Option<Arc<UdpSocket>> {
        let v = self.socks.read().ok()?;
        v.get(via).or_else(|| v.first()).cloned()
    }

    fn send(&self, data: &[u8], to: SocketAddr, via: usize) {
        if self.streams.send(to, [data]) {
            return; // a relay reached over TCP/TLS
        }
        let Some(sock) = self.sock(via) else { return };
        let to = crate::udp::outward(to, self.dual);
        if let Err(e) = sock.send_to(data, to) {
            if e.kind() == io::ErrorKind::WouldBlock {
                // Full: wait for room once (backpressure on the TUN reader),
                // then give up on this packet.
                let mut p = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&*sock),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 5) };
                if sock.send_to(data, to).is_ok() {
                    return;
                }
            }
            self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends `count` datagrams of `stride` bytes (the last may be shorter)
    /// from `buf` to `to`: one `sendmsg` with UDP GSO when there are several.
    fn send_batch(&self, buf: &[u8], to: SocketAddr, via: usize, stride: usize, count: usize) {
        // A relay reached over TCP/TLS: the run's ChannelData messages go on
        // its stream, each padded.
        if self.streams.send(to, buf.chunks(stride.max(1))) {
            return;
        }
        if count > 1 && self.gso.load(Ordering::Relaxed) {
            let Some(sock) = self.sock(via) else { return };
            let fd = std::os::fd::AsRawFd::as_raw_fd(&*sock);
            let dst = crate::udp::outward(to, self.dual);
            match crate::udp::send_segments(fd, buf, dst, stride as u16) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut p = libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut p, 1, 5) };
                    if crate::udp::send_segments(fd, buf, dst, stride as u16).is_ok() {
                        return;
                    }
                    self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP)
                    ) =>
                {
                    tracing::warn!("UDP GSO refused ({e}); sending datagrams one by one");
                    self.gso.store(false, Ordering::Relaxed);
                }
                Err(_) => {
                    self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        for d in buf.chunks(stride.max(1)) {
            self.send(d, to, via);
        }
    }

    /// Sends the WireGuard packet in `buf[HEADROOM..HEADROOM + len]` on the
    /// peer's path, framing it in place for a channel.
    fn transmit(&self, st: &mut PeerState, buf: &mut [u8], len: usize) {
        let route = st.effective_route();
        match place(route, len) {
            Some((to, range, channel)) => {
                if let Some(ch) = channel {
                    buf[..HEADROOM].copy_from_slice(&channel_data::header(ch, len));
                }
                self.send(&buf[range], to, st.via);
            }
            None if route == Route::Hold => {
                if st.held.len() == HOLD {
                    st.held.pop_front();
                }
                st.held.push_back(buf[HEADROOM..HEADROOM + len].to_vec());
            }
            None => {
                // A Send indication (before the channel is bound): rare, framed
                // into a fresh buffer.
                let mut out = Vec::with_capacity(len + 64);
                if let Some(to) =
                    route.frame(&buf[HEADROOM..HEADROOM + len], &mut out, rand::random())
                {
                    self.send(&out, to, st.via);
                }
            }
        }
    }

    /// The agent chose a path for `peer` (`None`: stop managing it, fall back
    /// to its UAPI endpoint). Packets held for the first path are sent.
    /// `via` names the socket the path uses (0: the main one).
    pub fn set_route(&self, peer: &PeerKey, route: Option<Route>, via: usize) {
        // The table stays read-locked while the pending map is updated: a
        // peer the UAPI creates meanwhile picks the route up (same lock
        // order as `apply`).
        let Ok(table) = self.table.read() else { return };
        let Some(p) = table.peers.get(peer).cloned() else {
            if let Ok(mut pending) = self.pending.lock() {
                match route {
                    Some(r) => pending.insert(*peer, (r, via)),
                    None => pending.remove(peer),
                };
            }
            return;
        };
        drop(table);
        let Ok(mut st) = p.st.lock() else { return };
        st.route = route;
        st.via = via;
        if matches!(route, Some(r) if r != Route::Hold) && !st.held.is_empty() {
            let held: Vec<Vec<u8>> = st.held.drain(..).collect();
            let mut buf = vec![0u8; BUF];
            for pkt in held {
                buf[HEADROOM..HEADROOM + pkt.len()].copy_from_slice(&pkt);
                self.transmit(&mut st, &mut buf, pkt.len());
            }
        }
    }

    /// Which peer a datagram is for, from its receiver index, or for a
    /// handshake initiation from the sender's static key (after the MAC and
    /// rate-limit check; a cookie reply is sent when under load).
    fn identify(
        &self,
        from: SocketAddr,
        direct: Option<usize>,
        data: &[u8],
        scratch: &mut [u8],
    ) -> Option<Arc<Peer>> {
        let packet = match self.limiter.verify_packet(Some(from.ip()), data, scratch) {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                // Under load: the sender must prove its address first. (A
                // relayed sender's address is the relay's: no cookie.)
                if let Some(via) = direct {
                    let c = cookie.to_vec();
                    self.send(&c, from, via);
                }
                return None;
            }
            Err(_) => return None,
        };
        let table = self.table.read().ok()?;
        let idx = match packet {
            Packet::HandshakeInit(ref init) => {
                let half = parse_handshake_anon(&self.private, &self.public, init).ok()?;
                return table
                    .peers
                    .get(&signaling::PublicKey(half.peer_static_public))
                    .cloned();
            }
            Packet::HandshakeResponse(ref r) => r.receiver_idx,
            Packet::PacketCookieReply(ref c) => c.receiver_idx,
            Packet::PacketData(ref d) => d.receiver_idx,
        };
        table.by_index.get(&(idx >> 8)).cloned()
    }

    /// A WireGuard datagram arrived on the agent socket from `from` (for a
    /// relayed one: the relay's address, `direct = None`; else the index of
    /// the socket it arrived on).
    /// Decrypted packets go to the TUN; replies leave on the peer's path.
    /// Returns the authenticated peer.
    pub fn receive(
        &self,
        from: SocketAddr,
        direct: Option<usize>,
        data: &[u8],
        scratch: &mut [u8],
    ) -> Option<PeerKey> {
        let Some(peer) = self.identify(from, direct, data, scratch) else {
            self.counters.wg_rejected.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let Ok(mut st) = peer.st.lock() else {
            return None;
        };
        let mut ok = false;
        let mut first = true;
        // The decrypted packet (source, where in `scratch`, length): written
        // to the TUN after the peer's lock is released (the routing check
        // takes the table lock, which `apply` takes before peer locks).
        let mut inner: Option<(IpAddr, usize, usize)> = None;
        let base = scratch.as_ptr() as usize;
        loop {
            let input = if first { data } else { &[][..] };
            let r = st
                .tunn
                .decapsulate(Some(from.ip()), input, &mut scratch[HEADROOM..]);
            first = false;
            match r {
                TunnResult::Done => {
                    ok = true;
                    break;
                }
                TunnResult::Err(WireGuardError::DuplicateCounter) if ok => break,
                TunnResult::Err(e) => {
                    if !ok {
                        self.counters.wg_rejected.fetch_add(1, Ordering::Relaxed);
                        tracing::trace!(peer = %peer.key, %from, "WireGuard datagram refused: {e:?}");
                    }
                    break;
                }
                TunnResult::WriteToNetwork(p) => {
                    ok = true;
                    let len = p.len();
                    self.transmit(&mut st, scratch, len);
                }
                TunnResult::WriteToTunnelV4(p, src) => {
                    ok = true;
                    inner = Some((IpAddr::V4(src), p.as_ptr() as usize - base, p.len()));
                    break;
                }
                TunnResult::WriteToTunnelV6(p, src) => {
                    ok = true;
                    inner = Some((IpAddr::V6(src), p.as_ptr() as usize - base, p.len()));
                    break;
                }
            }
        }
        if let (true, Some(via), None) = (ok, direct, st.route) {
            // Unmanaged peer: follow it (WireGuard roaming), on the socket
            // it reached.
            st.endpoint = Some(from);
            st.via = via;
        }
        drop(st);
        if let Some((src, off, len)) = inner {
            if let Some(pkt) = scratch.get(off..off + len) {
                self.to_tun(&peer, src, pkt);
            }
        }
        ok.then_some(peer.key)
    }

    fn to_tun(&self, peer: &Arc<Peer>, src: IpAddr, pkt: &[u8]) {
        if pkt.is_empty() {
            return; // keepalive
        }
        let routed = self
            .table
            .read()
            .ok()
            .and_then(|t| t.lookup(src).map(|p| Arc::ptr_eq(p, peer)))
            .unwrap_or(false);
        if !routed {
            self.counters.wg_bad_source.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %peer.key, %src, "decrypted packet from outside the peer's allowed IPs: dropped");
            return;
        }
        if let Ok(mut rx) = self.rx.lock() {
            rx.push(pkt, &mut |h, p| {
                if let Err(e) = self.tun.write_with(h, p) {
                    tracing::trace!("tun write: {e}");
                }
            });
        }
    }

    /// Writes what [`Device::receive`] has collected to the TUN; the driver
    /// calls it after each read from the socket.
    pub fn flush_rx(&self) {
        if let Ok(mut rx) = self.rx.lock() {
            rx.flush(&mut |h, p| {
                if let Err(e) = self.tun.write_with(h, p) {
                    tracing::trace!("tun write: {e}");
                }
            });
        }
    }

    /// Runs WireGuard's timers (handshake retries, keepalives, rekeys,
    /// expiry); call every 100–250 ms.
    pub fn tick(&self, scratch: &mut [u8]) {
        let peers: Vec<Arc<Peer>> = match self.table.read() {
            Ok(t) => t.peers.values().cloned().collect(),
            Err(_) => return,
        };
        for p in peers {
            let Ok(mut st) = p.st.lock() else { continue };
            match st.tunn.update_timers(&mut scratch[HEADROOM..]) {
                TunnResult::WriteToNetwork(pkt) => {
                    let len = pkt.len();
                    self.transmit(&mut st, scratch, len);
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(e) => tracing::trace!(peer = %p.key, "timers: {e:?}"),
                _ => {}
            }
        }
    }

    /// Allows a new second of handshakes (call once a second).
    pub fn reset_rate_limit(&self) {
        self.limiter.reset_count();
    }

    /// Reads the TUN, encrypts, sends: the outbound half of the data path,
    /// on its own thread until [`Device::stop`]. With TUN offloads one read
    /// is up to 64 KiB of one TCP flow: it is cut into segments, each is
    /// encrypted straight into a send batch, and the batch leaves in one
    /// `sendmsg` with UDP GSO.
    pub fn run_outbound(&self) {
        let mut inb = vec![0u8; BUF];
        let mut seg = Vec::with_capacity(BUF);
        let mut batch = Batch::new(self.gso.load(Ordering::Relaxed));
        while !self.stop.load(Ordering::Relaxed) {
            let mut p = libc::pollfd {
                fd: self.tun.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut p, 1, 200) } <= 0 {
                continue;
            }
            for _ in 0..64 {
                let n = match self.tun.read(&mut inb) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!("tun read: {e}");
                        break;
                    }
                };
                if self.tun.offload() {
                    let Some(h) = VnetHdr::parse(&inb[..n]) else {
                        continue;
                    };
                    let pkt = &mut inb[VNET_HDR_LEN..n];
                    let Some(peer) = self.peer_for(pkt) else {
                        continue;
                    };
                    let Ok(mut st) = peer.st.lock() else { continue };
                    let r = offload::split(&h, pkt, &mut seg, |s| {
                        self.encrypt(&peer, &mut st, s, &mut batch)
                    });
                    if r.is_none() {
                        tracing::trace!(?h, "malformed offload packet from the TUN");
                    }
                } else {
                    let pkt = &inb[..n];
                    let Some(peer) = self.peer_for(pkt) else {
                        continue;
                    };
                    let Ok(mut st) = peer.st.lock() else { continue };
                    self.encrypt(&peer, &mut st, pkt, &mut batch);
                }
            }
            batch.flush(self);
        }
    }

    fn peer_for(&self, pkt: &[u8]) -> Option<Arc<Peer>> {
        let dst = Tunn::dst_address(pkt)?;
        let p = self.table.read().ok().and_then(|t| t.lookup(dst).cloned());
        if p.is_none() {
            self.counters.no_peer.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    /// Encrypts one packet for `peer` into the batch (direct and channel
    /// paths), or sends it the slow way (no path yet, Send indications).
    fn encrypt(&self, peer: &Peer, st: &mut PeerState, pkt: &[u8], b: &mut Batch) {
        let route = st.effective_route();
        let (to, head) = match route {
            Route::Direct(to) => (to, 0),
            Route::Channel { server, .. } => (server, HEADROOM),
            _ => {
                let mut out = vec![0u8; pkt.len() + 64 + 148];
                if let TunnResult::WriteToNetwork(p) =
                    st.tunn.encapsulate(pkt, &mut out[HEADROOM..])
                {
                    let len = p.len();
                    self.transmit(st, &mut out, len);
                }
                return;
            }
        };
        let room = head + (pkt.len() + 32).max(148);
        b.make_room(self, (to, st.via), room);
        let off = b.buf.len();
        b.buf.resize(off + room, 0);
        match st.tunn.encapsulate(pkt, &mut b.buf[off + head..]) {
            TunnResult::WriteToNetwork(p) => {
                let len = p.len();
                if let Route::Channel { channel, .. } = route {
                    b.buf[off..off + HEADROOM].copy_from_slice(&channel_data::header(channel, len));
                }
                b.buf.truncate(off + head + len);
                b.added(self, (to, st.via), head + len);
            }
            TunnResult::Err(e) => {
                b.buf.truncate(off);
                tracing::trace!(peer = %peer.key, "encapsulate: {e:?}");
            }
            _ => b.buf.truncate(off),
        }
    }

    /// Stops [`Device::run_outbound`] (within 200 ms).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    // ---- configuration (through the UAPI) ----

    /// Bytes boringtun sent to each peer so far.
    pub fn tx_counts(&self) -> Vec<(PeerKey, u64)> {
        let Ok(t) = self.table.read() else {
            return Vec::new();
        };
        t.peers
            .values()
            .filter_map(|p| {
                let st = p.st.lock().ok()?;
                let (_, tx, _, _, _) = st.tunn.stats();
                Some((p.key, tx as u64))
            })
            .collect()
    }

    /// The device as `get=1` reports it.
    pub fn get(&self) -> WgDevice {
        let now = SystemTime::now();
        let table = self.table.read().ok();
        let mut peers = Vec::new();
        if let Some(t) = table {
            for p in t.peers.values() {
                let Ok(st) = p.st.lock() else { continue };
                let (since, tx, rx, _, _) = st.tunn.stats();
                peers.push(WgPeer {
                    public_key: p.key,
                    endpoint: match (st.route, st.endpoint) {
                        (Some(Route::Direct(a)), _) => Some(a),
                        (Some(Route::Channel { server, .. }), _)
                        | (Some(Route::Indication { server, .. }), _) => Some(server),
                        (_, e) => e,
                    },
                    endpoint_raw: None,
                    allowed_ips: st.allowed.clone(),
                    keepalive: st.keepalive,
                    preshared_key: st.psk,
                    last_handshake: since
                        .and_then(|d| now.checked_sub(d))
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs()),
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                });
            }
        }
        peers.sort_by_key(|p| p.public_key);
        WgDevice {
            private_key: Some(self.private.to_bytes()),
            listen_port: self.port,
            peers,
        }
    }

    fn new_tunn(&self, key: &PeerKey, psk: Option<[u8; 32]>, keepalive: u16, index: u32) -> Tunn {
        Tunn::new(
            self.private.clone(),
            XPublic::from(key.0),
            psk,
            (keepalive > 0).then_some(keepalive),
            index,
            Some(self.limiter.clone()),
        )
    }

    /// Applies one UAPI `set` transaction.
    pub fn apply(&self, set: &SetRequest) -> Result<(), SetError> {
        if let Some(k) = set.private_key {
            if k != self.private.to_bytes() {
                return Err(SetError::Refused(
                    "the embedded interface keeps the agent's private key (change \
                     wireguard.private_key_file and restart the agent)",
                ));
            }
        }
        if set.listen_port.is_some_and(|p| p != self.port && p != 0) {
            return Err(SetError::Refused(
                "the embedded interface listens on the agent's port (wireguard.port)",
            ));
        }
        let mut table = self.table.write().map_err(|_| SetError::Internal)?;
        let mut allowed = self.allowed.lock().map_err(|_| SetError::Internal)?;
        if set.replace_peers {
            table.peers.clear();
            table.by_index.clear();
            allowed.clear();
        }
        for ps in &set.peers {
            if ps.remove {
                if let Some(p) = table.peers.remove(&ps.key) {
                    table.by_index.remove(&p.index);
                }
                allowed.remove(&ps.key);
                continue;
            }
            let peer = match table.peers.get(&ps.key) {
                Some(p) => p.clone(),
                None if ps.update_only => continue,
                None => {
                    if ps.key.0 == self.public.to_bytes() {
                        return Err(SetError::Refused(
                            "a peer cannot have the interface's own key",
                        ));
                    }
                    let index = self.next_index.fetch_add(1, Ordering::Relaxed) & 0xff_ffff;
                    let pending = self.pending.lock().ok().and_then(|mut m| m.remove(&ps.key));
                    let p = Arc::new(Peer {
                        key: ps.key,
                        index,
                        st: Mutex::new(PeerState {
                            tunn: self.new_tunn(&ps.key, None, 0, index),
                            route: pending.map(|(r, _)| r),
                            via: pending.map_or(0, |(_, v)| v),
                            endpoint: None,
                            allowed: Vec::new(),
                            keepalive: 0,
                            psk: None,
                            held: VecDeque::new(),
                        }),
                    });
                    table.peers.insert(ps.key, p.clone());
                    table.by_index.insert(index, p.clone());
                    p
                }
            };
            let mut st = peer.st.lock().map_err(|_| SetError::Internal)?;
            if let Some(e) = ps.endpoint {
                st.endpoint = Some(e);
            }
            let mut rekey = false;
            if let Some(psk) = ps.preshared_key {
                let psk = (psk != [0; 32]).then_some(psk);
                rekey |= psk != st.psk;
                st.psk = psk;
            }
            if let Some(k) = ps.keepalive {
                rekey |= k != st.keepalive;
                st.keepalive = k;
            }
            if rekey {
                // boringtun takes both at creation: a fresh tunnel (the next
                // packet starts a handshake).
                st.tunn = self.new_tunn(&ps.key, st.psk, st.keepalive, peer.index);
            }
            let list = allowed.entry(ps.key).or_default();
            if ps.replace_allowed_ips {
                list.clear();
            }
            for n in &ps.allowed_ips {
                if !list.contains(n) {
                    list.push(*n);
                }
            }
            st.allowed = list.clone();
        }
        // An allowed IP belongs to one peer: the last one given it.
        for ps in set.peers.iter().filter(|p| !p.remove) {
            for n in &ps.allowed_ips {
                for (k, list) in allowed.iter_mut() {
                    if *k != ps.key {
                        list.retain(|m| m != n);
                    }
                }
            }
        }
        for (k, list) in allowed.iter() {
            if let Some(p) = table.peers.get(k) {
                if let Ok(mut st) = p.st.lock() {
                    st.allowed = list.clone();
                }
            }
        }
        table.rebuild_routing(&allowed);
        let all: Vec<IpNet> = allowed.values().flatten().copied().collect();
        drop(table);
        drop(allowed);
        if let Ok(mut r) = self.routes.lock() {
            r.sync(&all);
        }
        Ok(())
    }
}

/// One peer section of a UAPI `set`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSet {
    /// `public_key`.
    pub key: PeerKey,
    /// `remove=true`.
    pub remove: bool,
    /// `update_only=true`.
    pub update_only: bool,
    /// `endpoint`.
    pub endpoint: Option<SocketAddr>,
    /// `preshared_key` (all zeros: none).
    pub preshared_key: Option<[u8; 32]>,
    /// `persistent_keepalive_interval`.
    pub keepalive: Option<u16>,
    /// `replace_allowed_ips=true`.
    pub replace_allowed_ips: bool,
    /// `allowed_ip` lines.
    pub allowed_ips: Vec<IpNet>,
}

/// A parsed UAPI `set` transaction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SetRequest {
    /// `private_key`.
    pub private_key: Option<[u8; 32]>,
    /// `listen_port`.
    pub listen_port: Option<u16>,
    /// `replace_peers=true`.
    pub replace_peers: bool,
    /// Peer sections in order.
    pub peers: Vec<PeerSet>,
}

/// Why a `set` failed (the UAPI answers `errno=22` with the message logged).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SetError {
    /// Malformed request.
    #[error("line {line}: {what}")]
    Parse {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// Well-formed, but not something this interface does.
    #[error("{0}")]
    Refused(&'static str),
    /// A lock was poisoned (a panic elsewhere).
    #[error("internal error")]
    Internal,
}

/// Upper bounds for one `set` (it comes from a local root-only socket, but
/// costs stay bounded all the same).
pub const MAX_SET_PEERS: usize = 65536;
/// Allowed IPs per peer in one `set`.
pub const MAX_ALLOWED_IPS: usize = 4096;

/// Parses the body of a UAPI `set=1` transaction (the lines after `set=1`,
/// without the blank line that ends it).
pub fn parse_set<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<SetRequest, SetError> {
    let mut req = SetRequest::default();
    for (i, line) in lines.into_iter().enumerate() {
        let line_no = i + 2;
        let bad = |what: String| SetError::Parse {
            line: line_no,
            what,
        };
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| bad(format!("{line:?} is not key=value")))?;
        let flag = |v: &str| match v {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(bad(format!("{k}={v:?}: expected true or false"))),
        };
        let peer = req.peers.last_mut();
        match (k, peer) {
            ("public_key", _) => {
                if req.peers.len() >= MAX_SET_PEERS {
                    return Err(bad(format!("more than {MAX_SET_PEERS} peers")));
                }
                let key = crate::wg::unhex(v)
                    .ok_or_else(|| bad("public_key: expected 64 hex digits".into()))?;
                req.peers.push(PeerSet {
                    key: signaling::PublicKey(key),
                    remove: false,
                    update_only: false,
                    endpoint: None,
                    preshared_key: None,
                    keepalive: None,
                    replace_allowed_ips: false,
                    allowed_ips: Vec::new(),
                });
            }
            ("private_key", None) => {
                req.private_key = Some(
                    crate::wg::unhex(v)
                        .ok_or_else(|| bad("private_key: expected 64 hex digits".into()))?,
                )
            }
            ("listen_port", None) => {
                req.listen_port = Some(v.parse().map_err(|_| bad(format!("listen_port={v:?}")))?)
            }
            ("fwmark", None) => {
                let m: u32 = v.parse().map_err(|_| bad(format!("fwmark={v:?}")))?;
                if m != 0 {
                    return Err(SetError::Refused(
                        "fwmark is not supported by the embedded interface",
                    ));
                }
            }
            ("replace_peers", None) => req.replace_peers = flag(v)?,
            ("remove", Some(p)) => p.remove = flag(v)?,
            ("update_only", Some(p)) => p.update_only = flag(v)?,
            ("endpoint", Some(p)) => {
                let a: SocketAddr = v
                    .parse()
                    .map_err(|_| bad(format!("endpoint={v:?}: expected IP:port or [IPv6]:port")))?;
                p.endpoint = Some(crate::udp::canonical(a));
            }
            ("preshared_key", Some(p)) => {
                p.preshared_key = Some(
                    crate::wg::unhex(v)
                        .ok_or_else(|| bad("preshared_key: expected 64 hex digits".into()))?,
                )
            }
            ("persistent_keepalive_interval", Some(p)) => {
                p.keepalive = Some(
                    v.parse()
                        .map_err(|_| bad(format!("persistent_keepalive_interval={v:?}")))?,
                )
            }
            ("replace_allowed_ips", Some(p)) => p.replace_allowed_ips = flag(v)?,
            ("allowed_ip", Some(p)) => {
                if p.allowed_ips.len() >= MAX_ALLOWED_IPS {
                    return Err(bad(format!(
                        "more than {MAX_ALLOWED_IPS} allowed IPs for one peer"
                    )));
                }
                let n: IpNet = v
                    .parse()
                    .map_err(|_| bad(format!("allowed_ip={v:?}: expected IP/prefix")))?;
                p.allowed_ips.push(n.trunc());
            }
            ("protocol_version", Some(_)) => {
                if v != "1" {
                    return Err(bad(format!("protocol_version={v:?}: only 1 exists")));
                }
            }
            (k, None) => return Err(bad(format!("unknown interface key {k:?}"))),
            (k, Some(_)) => return Err(bad(format!("unknown peer key {k:?}"))),
        }
    }
    Ok(req)
}

/// Formats `get=1`'s answer (without the final `errno=0` and blank line).
pub fn format_get(d: &WgDevice) -> String {
    use std::fmt::Write;
    let hex = crate::wg::hex;
    let mut s = String::new();
    if let Some(k) = &d.private_key {
        let _ = writeln!(s, "private_key={}", hex(k));
    }
    let _ = writeln!(s, "listen_port={}", d.listen_port);
    for p in &d.peers {
        let _ = writeln!(s, "public_key={}", hex(&p.public_key.0));
        if let Some(psk) = &p.preshared_key {
            let _ = writeln!(s, "preshared_key={}", hex(psk));
        }
        if let Some(e) = p.endpoint {
            let _ = writeln!(s, "endpoint={e}");
        }
        let _ = writeln!(
            s,
            "last_handshake_time_sec={}\nlast_handshake_time_nsec=0",
            p.last_handshake
        );
        let _ = writeln!(s, "tx_bytes={}\nrx_bytes={}", p.tx_bytes, p.rx_bytes);
        let _ = writeln!(s, "persistent_keepalive_interval={}", p.keepalive);
        for n in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={n}");
        }
        let _ = writeln!(s, "protocol_version=1");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "0101010101010101010101010101010101010101010101010101010101010101";

    #[test]
    fn uapi_set_bodies_parse_with_their_bounds() {
        let req = parse_set([
            "listen_port=51821",
            "replace_peers=true",
            &format!("public_key={K1}"),
            "endpoint=[2001:db8::1]:51820",
            "persistent_keepalive_interval=25",
            "replace_allowed_ips=true",
            "allowed_ip=10.8.0.2/32",
            "allowed_ip=10.88.1.7/24",
            "protocol_version=1",
        ])
        .expect("valid");
        assert_eq!(req.listen_port, Some(51821));
        assert!(req.replace_peers);
        let p = &req.peers[0];
        assert_eq!(p.key, signaling::PublicKey([1; 32]));
        assert_eq!(
            p.endpoint,
            Some("[2001:db8::1]:51820".parse().expect("addr"))
        );
        assert_eq!(p.keepalive, Some(25));
        // Host bits are cleared, as the kernel does.
        assert_eq!(
            p.allowed_ips,
            vec![
                "10.8.0.2/32".parse::<IpNet>().expect("net"),
                "10.88.1.0/24".parse().expect("net")
            ]
        );
        for (bad, line) in [
            (vec!["public_key=zz"], 2),
            (vec!["endpoint=1.2.3.4:5"], 2), // a peer key before it
            (
                vec![
                    &format!("public_key={K1}") as &str,
                    "allowed_ip=10.0.0.0/33",
                ],
                3,
            ),
            (vec![&format!("public_key={K1}") as &str, "remove=maybe"], 3),
            (vec!["no equals sign"], 2),
            (
                vec![&format!("public_key={K1}") as &str, "protocol_version=2"],
                3,
            ),
        ] {
            match parse_set(bad.iter().copied()) {
                Err(SetError::Parse { line: l, .. }) => assert_eq!(l, line, "{bad:?}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(matches!(parse_set(["fwmark=7"]), Err(SetError::Refused(_))));
        // Bounded: one peer cannot carry more than MAX_ALLOWED_IPS.
        let key = format!("public_key={K1}");
        let many: Vec<String> = (0..=MAX_ALLOWED_IPS)
            .map(|i| format!("allowed_ip=10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        let lines = std::iter::once(key.as_str()).chain(many.iter().map(String::as_str));
        assert!(matches!(parse_set(lines), Err(SetError::Parse { .. })));
    }

    #[test]
    fn get_answers_parse_back_as_the_agent_reads_them() {
        let dev = WgDevice {
            private_key: Some([9; 32]),
            listen_port: 51821,
            peers: vec![WgPeer {
                public_key: signaling::PublicKey([1; 32]),
                preshared_key: Some([2; 32]),
                endpoint: Some("192.0.2.7:3478".parse().expect("addr")),
                endpoint_raw: None,
                allowed_ips: vec!["10.8.0.2/32".parse().expect("net")],
                last_handshake: 1_700_000_000,
                rx_bytes: 10,
                tx_bytes: 20,
                keepalive: 25,
            }],
        };
        let back =
            crate::wg::parse_uapi(&format!("{}errno=0\n\n", format_get(&dev))).expect("parse");
        assert_eq!(back.private_key, dev.private_key);
        assert_eq!(back.listen_port, 51821);
        let mut want = dev.peers[0].clone();
        want.endpoint_raw = Some("192.0.2.7:3478".into());
        assert_eq!(back.peers, vec![want]);
    }
}
