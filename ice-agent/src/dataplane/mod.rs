//! The data plane: how WireGuard packets get between the local interface
//! and the agent's socket. Two implementations behind one interface:
//!
//! - [`external::Proxies`] (`mode = "external"`): WireGuard is a kernel or
//!   userspace interface the agent does not own; each managed peer gets a
//!   loopback proxy socket as its endpoint.
//! - [`Embedded`] (`mode = "embedded"`): the agent creates the TUN
//!   interface and runs WireGuard itself ([`embedded::Device`]), on the
//!   agent socket; no loopback hop. Its peers are configured through the
//!   WireGuard UAPI ([`uapi`]), as a wireguard-go interface's are.

pub mod embedded;
pub mod external;
pub mod offload;
pub mod tun;
pub mod uapi;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::agent::{Endpoint, PeerKey, PeerRoute};

/// Which offloads the data plane uses. All by default; the
/// `WGICE_OFFLOADS` environment variable (a comma-separated subset of
/// `tso,coalesce,gso,gro`, or `none`) narrows them, so each lever can be
/// measured on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    /// TUN TSO and checksum offload (`IFF_VNET_HDR`).
    pub tso: bool,
    /// Joining received TCP segments before the TUN (needs `tso`).
    pub coalesce: bool,
    /// UDP GSO on sends (`UDP_SEGMENT`).
    pub gso: bool,
    /// UDP GRO on receives (`UDP_GRO`).
    pub gro: bool,
}

impl Offloads {
    /// From `WGICE_OFFLOADS`, all on when unset.
    pub fn from_env() -> Offloads {
        Self::parse(std::env::var("WGICE_OFFLOADS").ok().as_deref())
    }

    /// From a `WGICE_OFFLOADS` value.
    pub fn parse(v: Option<&str>) -> Offloads {
        match v {
            None => Offloads {
                tso: true,
                coalesce: true,
                gso: true,
                gro: true,
            },
            Some(v) => {
                let has = |k: &str| v.split(',').any(|x| x.trim() == k);
                Offloads {
                    tso: has("tso"),
                    coalesce: has("coalesce"),
                    gso: has("gso"),
                    gro: has("gro"),
                }
            }
        }
    }
}

/// The embedded data plane: the device, its UAPI listener and the thread
/// that reads the TUN.
#[derive(Debug)]
pub struct Embedded {
    /// The device.
    pub dev: Arc<embedded::Device>,
    uapi: Option<uapi::Uapi>,
    outbound: Option<std::thread::JoinHandle<()>>,
}

impl Embedded {
    /// Starts the TUN reader and the UAPI listener for `dev`.
    pub fn start(dev: embedded::Device) -> std::io::Result<Embedded> {
        let dev = Arc::new(dev);
        let uapi = uapi::Uapi::start(dev.clone())?;
        let d = dev.clone();
        let outbound = std::thread::Builder::new()
            .name("wg-outbound".into())
            .spawn(move || d.run_outbound())?;
        Ok(Embedded {
            dev,
            uapi: Some(uapi),
            outbound: Some(outbound),
        })
    }

    /// Stops the threads and removes the UAPI socket; the TUN interface
    /// goes when the last handle on the device is dropped.
    pub fn close(&mut self) {
        self.dev.stop();
        if let Some(t) = self.outbound.take() {
            let _ = t.join();
        }
        self.uapi.take();
    }
}

/// Either data plane.
#[derive(Debug)]
pub enum DataPlane {
    /// Beside an existing WireGuard interface.
    External(external::Proxies),
    /// WireGuard in process.
    Embedded(Embedded),
}

impl DataPlane {
    /// The agent manages a new peer; returns the endpoint WireGuard should
    /// be given (external mode: the peer's proxy).
    pub fn peer_added(&mut self, peer: PeerKey) -> Option<SocketAddr> {
        match self {
            DataPlane::External(p) => p.add(peer),
            DataPlane::Embedded(_) => None,
        }
    }

    /// The peer's path changed; returns the endpoint WireGuard should be
    /// changed to, if it changes.
    /// `via`: which of the agent's sockets the path uses (0: the main one).
    pub fn route(&mut self, peer: &PeerKey, route: PeerRoute, via: usize) -> Option<SocketAddr> {
        match self {
            DataPlane::External(p) => p.route(peer, route, via),
            DataPlane::Embedded(e) => {
                // On a LAN path the peer's WireGuard port may differ from its
                // agent's (an external-mode peer): send straight to it.
                let r = match route.endpoint {
                    Endpoint::Direct(a) => crate::agent::Route::Direct(a),
                    Endpoint::Proxy => route.route,
                };
                e.dev.set_route(peer, Some(r), via);
                None
            }
        }
    }

    /// Registers another of the agent's sockets (a socket birthday probing
    /// won); returns the index routes name it by. `slot`: reuse that
    /// freed index instead of growing.
    pub fn add_socket(
        &mut self,
        sock: &Arc<tokio::net::UdpSocket>,
        slot: Option<usize>,
    ) -> std::io::Result<usize> {
        match self {
            DataPlane::External(p) => Ok(match slot {
                Some(i) => {
                    p.set_socket(i, sock.clone());
                    i
                }
                None => p.add_socket(sock.clone()),
            }),
            DataPlane::Embedded(e) => {
                let std = dup(sock)?;
                Ok(match slot {
                    Some(i) => {
                        e.dev.set_socket(i, std);
                        i
                    }
                    None => e.dev.add_socket(std),
                })
            }
        }
    }

    /// Slot `via` is free again: it names the main socket `main` until
    /// reused.
    pub fn free_socket(&mut self, via: usize, main: &Arc<tokio::net::UdpSocket>) {
        match self {
            DataPlane::External(p) => p.set_socket(via, main.clone()),
            DataPlane::Embedded(e) => {
                if let Ok(std) = dup(main) {
                    e.dev.set_socket(via, std);
                }
            }
        }
    }

    /// Sends one of the agent's datagrams from socket `via`.
    pub fn send_from(&self, via: usize, to: SocketAddr, data: &[u8]) {
        match self {
            DataPlane::External(p) => p.send_from(via, to, data),
            DataPlane::Embedded(e) => e.dev.send_from(via, to, data),
        }
    }

    /// The agent stopped managing the peer.
    pub fn peer_removed(&mut self, peer: &PeerKey) {
        match self {
            DataPlane::External(p) => p.remove(peer),
            DataPlane::Embedded(e) => e.dev.set_route(peer, None, 0),
        }
    }

    /// A WireGuard packet from `peer` that the agent accepted (relayed, or
    /// on a path it knows), which arrived from `from` (`direct`: on which
    /// of the agent's sockets; `None`: through a relay).
    pub fn deliver(
        &self,
        peer: &PeerKey,
        from: SocketAddr,
        direct: Option<usize>,
        pkt: &[u8],
        scratch: &mut [u8],
    ) {
        match self {
            DataPlane::External(p) => p.deliver(peer, pkt),
            DataPlane::Embedded(e) => {
                e.dev.receive(from, direct, pkt, scratch);
            }
        }
    }

    /// The end of a read from the socket: what was decrypted goes out.
    pub fn flush(&self) {
        match self {
            DataPlane::External(p) => p.flush(),
            DataPlane::Embedded(e) => e.dev.flush_rx(),
        }
    }

    /// WireGuard traffic sent to each peer so far (external: datagrams
    /// through its proxy, and those above
    /// [`crate::blackhole::LARGE_DATAGRAM`] bytes; embedded: bytes
    /// boringtun encrypted for it, sizes not counted). Only growth
    /// matters: blackhole detection probes while it grows.
    pub fn tx_counts(&self) -> Vec<(PeerKey, u64, Option<u64>)> {
        match self {
            DataPlane::External(p) => p.tx_counts(),
            DataPlane::Embedded(e) => e
                .dev
                .tx_counts()
                .into_iter()
                .map(|(k, n)| (k, n, None))
                .collect(),
        }
    }

    /// Stops everything the data plane runs.
    pub fn close(&mut self) {
        match self {
            DataPlane::External(p) => p.close(),
            DataPlane::Embedded(e) => e.close(),
        }
    }
}

/// A std handle on the same socket (the embedded device sends with std).
fn dup(sock: &tokio::net::UdpSocket) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsFd;
    Ok(std::net::UdpSocket::from(
        sock.as_fd().try_clone_to_owned()?,
    ))
}
