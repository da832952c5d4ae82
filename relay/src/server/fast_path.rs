//! What a kernel fast path (the driver's XDP program) may forward without
//! asking the server: the live channel bindings of UDP clients, each with
//! the instant its permission, channel or allocation ends first and the
//! allocation's bandwidth cap.
//!
//! The server stays the authority. It installs an entry only for a binding
//! it would forward itself (ChannelBind passed the peer policy; the
//! permission is live), refreshes it when a ChannelBind, CreatePermission or
//! Refresh moves its expiry, and removes it when the binding, the
//! permission or the allocation ends. The kernel checks the expiry on every
//! packet, so nothing is forwarded past it even before the sweep removes the
//! entry. Left to user space: stream clients (TCP/TLS), relay-to-relay
//! bindings (each packet needs the live-port check), peers of the other
//! family than the client, and wildcard listening or relayed addresses (the
//! kernel needs the concrete source address to write).

use std::net::SocketAddr;
use std::time::Instant;

use super::allocation::Allocation;
use super::{Event, Server, Transport};

/// One channel binding for the kernel fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastPath {
    /// The allocation (the same for every binding of it): keys its
    /// counters and its share of the bandwidth cap.
    pub allocation: u64,
    /// The client's address.
    pub client: SocketAddr,
    /// The relay's listening address the client talks to.
    pub listen: SocketAddr,
    /// The channel number.
    pub channel: u16,
    /// The allocation's relayed address of the peer's family.
    pub relayed: SocketAddr,
    /// The peer.
    pub peer: SocketAddr,
    /// When the channel, its permission or the allocation ends, whichever first.
    pub expires: Instant,
    /// The allocation's bandwidth cap (bytes/s, both directions together).
    pub bandwidth: Option<u64>,
}

impl FastPath {
    /// Same binding (expiry aside).
    fn same_binding(&self, other: &FastPath) -> bool {
        (
            self.allocation,
            self.client,
            self.listen,
            self.channel,
            self.peer,
        ) == (
            other.allocation,
            other.client,
            other.listen,
            other.channel,
            other.peer,
        ) && self.relayed == other.relayed
    }
}

/// The bindings of `a` the kernel may forward at `now`.
fn eligible(a: &Allocation, now: Instant, bandwidth: Option<u64>) -> Vec<FastPath> {
    let client = a.client;
    if client.transport != Transport::Udp
        || client.local.ip().is_unspecified()
        || client.local.is_ipv4() != client.remote.is_ipv4()
    {
        return Vec::new();
    }
    a.channels
        .iter()
        .filter(|c| !c.own && c.expires > now)
        .filter_map(|c| {
            let peer = c.peer.addr();
            if peer.is_ipv4() != client.remote.is_ipv4() {
                return None;
            }
            let r = a.relay_for(peer.ip())?;
            let relayed = r.bound?;
            if relayed.ip().is_unspecified() {
                return None;
            }
            let perm = a.permission(peer.ip(), now)?;
            Some(FastPath {
                // The token without its family bit names the allocation.
                allocation: r.token.0 & !1,
                client: client.remote,
                listen: client.local,
                channel: c.number.get(),
                relayed,
                peer,
                expires: c.expires.min(perm.expires).min(a.expires),
                bandwidth,
            })
        })
        .collect()
}

impl Server {
    /// Brings the kernel's entries for the allocation in `slot` up to date:
    /// removes what is no longer eligible, installs what is new or moved.
    pub(super) fn sync_fast_path(&mut self, slot: usize, now: Instant) {
        if !self.cfg.fast_path {
            return;
        }
        let bandwidth = self.cfg.bandwidth_limit;
        let Some(a) = self.slots.get_mut(slot).and_then(|s| s.as_mut()) else {
            return;
        };
        let want = eligible(a, now, bandwidth);
        for old in &a.fast {
            if !want.iter().any(|w| w.same_binding(old)) {
                self.events.push_back(Event::FastPath {
                    entry: *old,
                    install: false,
                });
            }
        }
        for w in &want {
            if !a.fast.contains(w) {
                self.events.push_back(Event::FastPath {
                    entry: *w,
                    install: true,
                });
            }
        }
        a.fast = want;
    }

    /// After the expiry sweep: drops entries whose binding ended.
    pub(super) fn sweep_fast_path(&mut self, now: Instant) {
        if !self.cfg.fast_path {
            return;
        }
        let stale: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                a.as_ref()
                    .filter(|a| a.fast.iter().any(|f| f.expires <= now))
                    .map(|_| i)
            })
            .collect();
        for slot in stale {
            self.sync_fast_path(slot, now);
        }
    }
}
