//! External mode's data path: one loopback proxy socket per managed peer.
//!
//! The peer's WireGuard endpoint is its proxy (`127.0.0.1:<port>`); what
//! WireGuard sends there is framed for the peer's current [`Route`] and
//! leaves from the agent socket; WireGuard packets arriving on the agent
//! socket (directly or through the relay) are handed to the interface from
//! that peer's proxy socket, so WireGuard always sees the peer at one
//! stable address. On a same-LAN path the endpoint points straight at the
//! peer's WireGuard port and the agent is out of the way.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::agent::{Endpoint, PeerKey, PeerRoute, Route};

struct Proxy {
    sock: Arc<UdpSocket>,
    route: watch::Sender<Route>,
    endpoint: Option<SocketAddr>,
    task: tokio::task::JoinHandle<()>,
}

/// The proxies of every managed peer.
pub struct Proxies {
    sock: Arc<UdpSocket>,
    dual: bool,
    wg_addr: SocketAddr,
    proxies: HashMap<PeerKey, Proxy>,
}

impl std::fmt::Debug for Proxies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxies")
            .field("wg_addr", &self.wg_addr)
            .field("peers", &self.proxies.len())
            .finish()
    }
}

impl Proxies {
    /// Proxies toward the WireGuard port `wg_addr`, sending on `sock`.
    pub fn new(sock: Arc<UdpSocket>, dual: bool, wg_addr: SocketAddr) -> Proxies {
        Proxies {
            sock,
            dual,
            wg_addr,
            proxies: HashMap::new(),
        }
    }

    /// Opens the peer's proxy; returns the endpoint WireGuard should use.
    pub fn add(&mut self, peer: PeerKey) -> Option<SocketAddr> {
        // Connected to the WireGuard port: the kernel drops datagrams from
        // anyone else, and sends need no per-packet address.
        let psock = match std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|s| s.connect(self.wg_addr).map(|_| s))
            .and_then(|s| s.set_nonblocking(true).map(|_| s))
            .and_then(UdpSocket::from_std)
        {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::error!(peer = %peer, "cannot open a proxy socket: {e}");
                return None;
            }
        };
        let paddr = psock.local_addr().ok()?;
        let (route_tx, route_rx) = watch::channel(Route::Hold);
        let task = tokio::spawn(proxy_loop(
            psock.clone(),
            self.sock.clone(),
            self.dual,
            route_rx,
            self.wg_addr,
        ));
        self.proxies.insert(
            peer,
            Proxy {
                sock: psock,
                route: route_tx,
                endpoint: Some(paddr),
                task,
            },
        );
        Some(paddr)
    }

    /// A new path; returns the endpoint WireGuard should change to, if any.
    pub fn route(&mut self, peer: &PeerKey, route: PeerRoute) -> Option<SocketAddr> {
        let p = self.proxies.get_mut(peer)?;
        p.route.send_replace(route.route);
        let want = match route.endpoint {
            Endpoint::Proxy => p.sock.local_addr().ok(),
            Endpoint::Direct(a) => Some(a),
        }?;
        (p.endpoint != Some(want)).then(|| {
            p.endpoint = Some(want);
            want
        })
    }

    /// A WireGuard packet for the local interface, from `peer`.
    pub fn deliver(&self, peer: &PeerKey, pkt: &[u8]) {
        if let Some(p) = self.proxies.get(peer) {
            let _ = p.sock.try_send(pkt);
        }
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

/// Packets WireGuard sends to a peer's proxy leave on the peer's route;
/// while there is none, the last few (handshake initiations) are held so
/// the first handshake does not wait for WireGuard's 5 s retry.
async fn proxy_loop(
    psock: Arc<UdpSocket>,
    sock: Arc<UdpSocket>,
    dual: bool,
    mut route: watch::Receiver<Route>,
    wg_addr: SocketAddr,
) {
    const HOLD: usize = 8;
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::with_capacity(2048);
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
                for _ in 0..64 {
                    let (n, from) = match psock.try_recv_from(&mut buf) {
                        Ok(x) => x,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            // Not "nothing queued": do not spin on it.
                            tracing::debug!("proxy socket: {e}");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            break;
                        }
                    };
                    // Only the local WireGuard interface speaks here.
                    if from != wg_addr {
                        continue;
                    }
                    let rt = *route.borrow();
                    if rt == Route::Hold {
                        if held.len() == HOLD {
                            held.pop_front();
                        }
                        held.push_back(buf[..n].to_vec());
                    } else if let Route::Direct(to) = rt {
                        // Plain forwarding: no framing, no copy.
                        send(&sock, &buf[..n], crate::udp::outward(to, dual)).await;
                    } else if let Some(to) = rt.frame(&buf[..n], &mut out, rand::random()) {
                        send(&sock, &out, crate::udp::outward(to, dual)).await;
                    }
                }
            }
            c = route.changed() => {
                if c.is_err() {
                    return;
                }
                let rt = *route.borrow_and_update();
                if rt != Route::Hold {
                    for pkt in held.drain(..) {
                        if let Some(to) = rt.frame(&pkt, &mut out, rand::random()) {
                            send(&sock, &out, crate::udp::outward(to, dual)).await;
                        }
                    }
                }
            }
        }
    }
}

/// Sends without a trip through the scheduler unless the socket is full.
async fn send(sock: &UdpSocket, data: &[u8], to: SocketAddr) {
    match sock.try_send_to(data, to) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            let _ = sock.send_to(data, to).await;
        }
        _ => {}
    }
}
