//! External mode's data path: one loopback proxy socket per managed peer.
//!
//! The peer's WireGuard endpoint is its proxy (`127.0.0.1:<port>`); what
//! WireGuard sends there is framed for the peer's current [`Route`] and
//! leaves from the agent socket; WireGuard packets arriving on the agent
//! socket (directly or through the relay) are handed to the interface from
//! that peer's proxy socket, so WireGuard always sees the peer at one
//! stable address. On a same-LAN path the endpoint points straight at the
//! peer's WireGuard port and the agent is out of the way.
//!
//! Both directions move batches: the proxy sockets and the agent socket
//! read with UDP GRO (a run of same-sized datagrams from one sender in one
//! read), and a run leaves in one `sendmsg` with UDP GSO — unchanged on a
//! direct path, each datagram behind its ChannelData header on a relayed
//! one. wireguard-go sends and receives with GSO/GRO itself, so a burst
//! crosses the proxy in two system calls instead of two per packet.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::agent::{Endpoint, PeerKey, PeerRoute, Route};
use crate::turn_stream::driver::Table;

/// A peer's path: how to frame, and which of the agent's sockets to send from.
type Path = (Route, Arc<UdpSocket>);

struct Proxy {
    sock: Arc<UdpSocket>,
    route: watch::Sender<Path>,
    endpoint: Option<SocketAddr>,
    task: tokio::task::JoinHandle<()>,
    /// Datagrams WireGuard sent to the peer through this proxy, all and
    /// large ones (blackhole detection asks whether data is being sent).
    tx: Arc<TxCount>,
}

/// What a proxy sent.
#[derive(Debug, Default)]
struct TxCount {
    all: AtomicU64,
    large: AtomicU64,
}

/// The proxies of every managed peer.
pub struct Proxies {
    /// The agent's sockets: 0 is the main one ([`Proxies::add_socket`]).
    socks: Vec<Arc<UdpSocket>>,
    dual: bool,
    wg_addr: SocketAddr,
    proxies: HashMap<PeerKey, Proxy>,
    /// Relays reached over TCP/TLS: relayed packets to them go there.
    streams: Table,
    /// Datagrams for one peer's WireGuard, delivered together at the end
    /// of a read from the agent socket.
    pending: RefCell<Pending>,
}

/// A run of same-sized datagrams (the last may be shorter) for one peer.
#[derive(Debug, Default)]
struct Pending {
    peer: Option<PeerKey>,
    buf: Vec<u8>,
    stride: usize,
    count: usize,
    short: bool,
}

/// Most bytes and datagrams one GSO send carries.
const GSO_BYTES: usize = 65000;
const GSO_SEGMENTS: usize = 64;

impl std::fmt::Debug for Proxies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxies")
            .field("wg_addr", &self.wg_addr)
            .field("peers", &self.proxies.len())
            .finish()
    }
}

impl Proxies {
    /// Proxies toward the WireGuard port `wg_addr`, sending on `sock`, or
    /// on a relay's stream when `streams` has one.
    pub fn new(sock: Arc<UdpSocket>, dual: bool, wg_addr: SocketAddr, streams: Table) -> Proxies {
        Proxies {
            socks: vec![sock],
            dual,
            wg_addr,
            proxies: HashMap::new(),
            streams,
            pending: RefCell::new(Pending::default()),
        }
    }

    /// Adds one of the agent's sockets; returns the index a route names it by.
    pub fn add_socket(&mut self, sock: Arc<UdpSocket>) -> usize {
        self.socks.push(sock);
        self.socks.len() - 1
    }

    /// Puts `sock` in slot `via` (a freed slot gets the main socket back).
    pub fn set_socket(&mut self, via: usize, sock: Arc<UdpSocket>) {
        if let Some(s) = self.socks.get_mut(via).filter(|_| via > 0) {
            *s = sock;
        }
    }

    /// Sends `data` to `to` from socket `via` (not through a proxy: the
    /// agent's own checks on a birthday socket).
    pub fn send_from(&self, via: usize, to: SocketAddr, data: &[u8]) {
        let sock = self.socks.get(via).unwrap_or(&self.socks[0]);
        if let Err(e) = sock.try_send_to(data, crate::udp::outward(to, self.dual)) {
            tracing::debug!(%to, via, "send: {e}");
        }
    }

    /// Opens the peer's proxy; returns the endpoint WireGuard should use.
    pub fn add(&mut self, peer: PeerKey) -> Option<SocketAddr> {
        // Connected to the WireGuard port: the kernel drops datagrams from
        // anyone else, and sends need no per-packet address.
        let psock = match std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|s| s.connect(self.wg_addr).map(|_| s))
            .and_then(|s| s.set_nonblocking(true).map(|_| s))
            .inspect(|s| {
                crate::udp::enable_gro(s.as_raw_fd());
            })
            .and_then(UdpSocket::from_std)
        {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::error!(peer = %peer, "cannot open a proxy socket: {e}");
                return None;
            }
        };
        let paddr = psock.local_addr().ok()?;
        let (route_tx, route_rx) = watch::channel((Route::Hold, self.socks[0].clone()));
        let tx = Arc::new(TxCount::default());
        let task = tokio::spawn(proxy_loop(
            tx.clone(),
            psock.clone(),
            self.dual,
            route_rx,
            self.wg_addr,
            self.streams.clone(),
        ));
        self.proxies.insert(
            peer,
            Proxy {
                sock: psock,
                route: route_tx,
                endpoint: Some(paddr),
                task,
                tx,
            },
        );
        Some(paddr)
    }

    /// A new path; returns the endpoint WireGuard should change to, if any.
    /// `via` names the socket the path uses.
    pub fn route(&mut self, peer: &PeerKey, route: PeerRoute, via: usize) -> Option<SocketAddr> {
        let sock = self.socks.get(via).unwrap_or(&self.socks[0]).clone();
        let p = self.proxies.get_mut(peer)?;
        p.route.send_replace((route.route, sock));
        let want = match route.endpoint {
            Endpoint::Proxy => p.sock.local_addr().ok(),
            Endpoint::Direct(a) => Some(a),
        }?;
        (p.endpoint != Some(want)).then(|| {
            p.endpoint = Some(want);
            want
        })
    }

    /// A WireGuard packet for the local interface, from `peer`: joins the
    /// pending run, sent by [`Proxies::flush`].
    pub fn deliver(&self, peer: &PeerKey, pkt: &[u8]) {
        let mut p = self.pending.borrow_mut();
        let joins = p.peer == Some(*peer)
            && !p.short
            && pkt.len() <= p.stride
            && p.count < GSO_SEGMENTS
            && p.buf.len() + pkt.len() <= GSO_BYTES;
        if !joins {
            drop(p);
            self.flush();
            p = self.pending.borrow_mut();
            p.peer = Some(*peer);
            p.stride = pkt.len();
        }
        p.short |= pkt.len() < p.stride;
        p.buf.extend_from_slice(pkt);
        p.count += 1;
    }

    /// Hands the pending run to the peer's WireGuard (one `sendmsg`).
    pub fn flush(&self) {
        let mut p = self.pending.borrow_mut();
        if let (Some(peer), true) = (p.peer, p.count > 0) {
            if let Some(x) = self.proxies.get(&peer) {
                if p.count == 1 {
                    let _ = x.sock.try_send(&p.buf);
                } else {
                    send_run(&x.sock, &p.buf, self.wg_addr, p.stride);
                }
            }
        }
        p.buf.clear();
        p.count = 0;
        p.short = false;
        p.peer = None;
    }

    /// Datagrams WireGuard sent to each peer so far, and those above
    /// [`crate::blackhole::LARGE_DATAGRAM`] bytes.
    pub fn tx_counts(&self) -> Vec<(PeerKey, u64, Option<u64>)> {
        self.proxies
            .iter()
            .map(|(k, p)| {
                (
                    *k,
                    p.tx.all.load(Ordering::Relaxed),
                    Some(p.tx.large.load(Ordering::Relaxed)),
                )
            })
            .collect()
    }

    /// Closes the peer's proxy.
    pub fn remove(&mut self, peer: &PeerKey) {
        if let Some(p) = self.proxies.remove(peer) {
            p.task.abort();
        }
    }

    /// Closes every proxy.
    pub fn close(&mut self) {
        for (_, p) in self.proxies.drain() {
            p.task.abort();
        }
    }
}

/// Sends a run of `stride`-byte datagrams in one call (GSO), or one by one
/// when the kernel refuses.
fn send_run(sock: &UdpSocket, buf: &[u8], to: SocketAddr, stride: usize) {
    let r = sock.try_io(tokio::io::Interest::WRITABLE, || {
        crate::udp::send_segments(sock.as_raw_fd(), buf, to, stride as u16)
    });
    if let Err(e) = r {
        if e.kind() != io::ErrorKind::WouldBlock {
            for d in buf.chunks(stride.max(1)) {
                let _ = sock.try_send_to(d, to);
            }
        }
    }
}

/// Datagrams to one destination collected into GSO runs (each behind a
/// ChannelData header when `channel` is set).
#[derive(Debug, Default)]
struct Run {
    buf: Vec<u8>,
    stride: usize,
    count: usize,
    short: bool,
}

impl Run {
    fn push(&mut self, sock: &UdpSocket, to: SocketAddr, d: &[u8], channel: Option<u16>) {
        let len = d.len() + if channel.is_some() { 4 } else { 0 };
        if self.count > 0
            && (self.short
                || len > self.stride
                || self.count >= GSO_SEGMENTS
                || self.buf.len() + len > GSO_BYTES)
        {
            self.flush(sock, to);
        }
        match channel {
            Some(ch) => relay::stun::channel_data::encode(&mut self.buf, ch, d, false),
            None => self.buf.extend_from_slice(d),
        }
        if self.count == 0 {
            self.stride = len;
        }
        self.short |= len < self.stride;
        self.count += 1;
    }

    fn flush(&mut self, sock: &UdpSocket, to: SocketAddr) {
        match self.count {
            0 => {}
            1 => {
                let _ = sock.try_send_to(&self.buf, to);
            }
            _ => send_run(sock, &self.buf, to, self.stride),
        }
        self.buf.clear();
        self.count = 0;
        self.short = false;
    }
}

/// Packets WireGuard sends to a peer's proxy leave on the peer's route;
/// while there is none, the last few (handshake initiations) are held so
/// the first handshake does not wait for WireGuard's 5 s retry.
async fn proxy_loop(
    tx: Arc<TxCount>,
    psock: Arc<UdpSocket>,
    dual: bool,
    mut route: watch::Receiver<Path>,
    wg_addr: SocketAddr,
    streams: Table,
) {
    const HOLD: usize = 8;
    // Pages are only touched by what arrives: idle peers cost little.
    let mut rx = crate::udp::RecvBatch::new(8, 65536);
    let mut run = Run::default();
    let mut one = Vec::with_capacity(2048);
    let mut held: VecDeque<Vec<u8>> = VecDeque::new();
    loop {
        tokio::select! {
            r = psock.readable() => {
                if let Err(e) = r {
                    tracing::debug!("proxy socket: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                // Drain what is queued (one wake-up for a burst).
                for _ in 0..8 {
                    let got = psock.try_io(tokio::io::Interest::READABLE, || rx.recv(psock.as_raw_fd()));
                    match got {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            // Not "nothing queued": do not spin on it.
                            tracing::debug!("proxy socket: {e}");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            break;
                        }
                    }
                    // Only the local WireGuard interface speaks here.
                    let (mut sent, mut large) = (0u64, 0u64);
                    for (r, data) in rx.messages().filter(|(r, _)| r.from == wg_addr) {
                        for d in r.datagrams(data) {
                            sent += 1;
                            large += u64::from(d.len() > crate::blackhole::LARGE_DATAGRAM);
                        }
                    }
                    tx.all.fetch_add(sent, Ordering::Relaxed);
                    tx.large.fetch_add(large, Ordering::Relaxed);
                    let from_wg = rx.messages().filter(|(r, _)| r.from == wg_addr);
                    let (rt, sock) = route.borrow().clone();
                    // A relay reached over TCP/TLS: every packet as a frame on its stream.
                    if let Some(server) = stream_relay(&rt, &streams) {
                        let mut out = Vec::new();
                        for (r, data) in from_wg {
                            for d in r.datagrams(data) {
                                if rt.frame(d, &mut one, rand::random()).is_some() {
                                    crate::turn_stream::frame_for_stream(&mut out, &one);
                                }
                            }
                        }
                        streams.send_stream(server, out);
                        continue;
                    }
                    match rt {
                        Route::Hold => {
                            for (r, data) in from_wg {
                                for d in r.datagrams(data) {
                                    if held.len() == HOLD {
                                        held.pop_front();
                                    }
                                    held.push_back(d.to_vec());
                                }
                            }
                        }
                        Route::Direct(to) | Route::Channel { server: to, .. } => {
                            let channel = match rt {
                                Route::Channel { channel, .. } => Some(channel),
                                _ => None,
                            };
                            let to = crate::udp::outward(to, dual);
                            for (r, data) in from_wg {
                                for d in r.datagrams(data) {
                                    run.push(&sock, to, d, channel);
                                }
                            }
                            run.flush(&sock, to);
                        }
                        Route::Indication { .. } => {
                            for (r, data) in from_wg {
                                for d in r.datagrams(data) {
                                    if let Some(to) = rt.frame(d, &mut one, rand::random()) {
                                        let _ = sock.try_send_to(&one, crate::udp::outward(to, dual));
                                    }
                                }
                            }
                        }
                    }
                }
            }
            c = route.changed() => {
                if c.is_err() {
                    return;
                }
                let (rt, sock) = route.borrow_and_update().clone();
                if rt != Route::Hold {
                    let stream = stream_relay(&rt, &streams);
                    for pkt in held.drain(..) {
                        if let Some(to) = rt.frame(&pkt, &mut one, rand::random()) {
                            match stream {
                                Some(server) => {
                                    streams.send(server, [&one[..]]);
                                }
                                None => {
                                    let _ = sock.try_send_to(&one, crate::udp::outward(to, dual));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The relay a relayed route goes through, when it is reached over a stream.
fn stream_relay(rt: &Route, streams: &Table) -> Option<SocketAddr> {
    match *rt {
        Route::Channel { server, .. } | Route::Indication { server, .. } if streams.has(server) => {
            Some(server)
        }
        _ => None,
    }
}
