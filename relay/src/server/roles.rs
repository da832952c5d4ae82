//! Newtypes for the roles addresses and numbers play inside the server, so a
//! peer's address cannot be passed where a client's is meant, nor a peer's
//! port where a relayed one is. The client side is [`super::ClientSocket`]
//! (its 5-tuple); channel numbers are [`crate::stun::channel_data::ChannelNumber`].
//! The public API keeps plain `SocketAddr`s for what drivers hand over
//! from the kernel; the server converts at the boundary.

use std::net::{IpAddr, SocketAddr};

/// A peer's transport address, as the relay's tables hold it: IPv4-mapped
/// IPv6 normalised to IPv4 (so `::ffff:192.0.2.1` and `192.0.2.1` are one
/// peer, and the peer policy sees the IPv4 address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct PeerAddr(SocketAddr);

impl PeerAddr {
    /// Normalises `addr` (IPv4-mapped IPv6 becomes IPv4).
    pub(super) fn new(addr: SocketAddr) -> Self {
        PeerAddr(SocketAddr::new(
            crate::policy::normalize(addr.ip()),
            addr.port(),
        ))
    }

    /// The address to send to.
    pub(super) fn addr(self) -> SocketAddr {
        self.0
    }

    /// The peer's IP (what permissions are keyed on).
    pub(super) fn ip(self) -> IpAddr {
        self.0.ip()
    }

    /// The peer's port.
    pub(super) fn port(self) -> u16 {
        self.0.port()
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A port of the relay range that holds (or is being bound for) an
/// allocation's relayed socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct AllocationPort(pub(super) u16);

impl AllocationPort {
    /// The port number.
    pub(super) fn get(self) -> u16 {
        self.0
    }
}
