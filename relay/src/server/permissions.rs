//! Permissions and channels: CreatePermission, ChannelBind, the peer checks
//! both make (family, peer policy, relay-to-relay), the per-allocation
//! tables and their expiry.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::metrics::inc;
use super::reply::Reply;
use super::roles::{AllocationPort, PeerAddr};
use super::{ClientSocket, Server};
use crate::stun::channel_data::ChannelNumber;
use crate::stun::{attr, Message};

/// A channel binding of an allocation.
#[derive(Debug)]
pub(super) struct Channel {
    pub(super) number: ChannelNumber,
    pub(super) peer: PeerAddr,
    pub(super) expires: Instant,
    /// The peer is the relay's own address (relay-to-relay): its port must
    /// still be a live relayed port on every packet.
    pub(super) own: bool,
}

/// A permission of an allocation (per peer IP, RFC 8656 §9).
#[derive(Debug)]
pub(super) struct Permission {
    pub(super) ip: IpAddr,
    pub(super) expires: Instant,
    /// The relay's own address: data only from live relayed ports.
    pub(super) own: bool,
}

/// A refusal whose reason may name the peer: error code and reason.
type Refusal = (u16, String);

impl Server {
    /// A relayed port of a live allocation on this relay, in `peer`'s family.
    pub(super) fn is_relay_port(&self, peer: PeerAddr) -> bool {
        let (lo, hi) = self.cfg.relay_ports;
        let live = self.quotas.live_ports(!peer.ip().is_ipv4());
        (lo..=hi).contains(&peer.port()) && live.contains(AllocationPort(peer.port()))
    }

    /// Checks a peer for an allocation: family and policy. `port_matters` is
    /// false for CreatePermission (permissions are per IP; the port is then
    /// checked per packet).
    fn check_peer(&self, slot: usize, peer: PeerAddr, port_matters: bool) -> Result<(), Refusal> {
        let Some(a) = self.slots[slot].as_ref() else {
            return Err((437, "Allocation Mismatch".into()));
        };
        if a.relay_for(peer.ip()).is_none() {
            let family = if peer.ip().is_ipv4() { "IPv4" } else { "IPv6" };
            return Err((
                443,
                format!("Peer Address Family Mismatch: allocation has no {family} relayed address for {peer}"),
            ));
        }
        match self.cfg.policy.check(peer.ip()) {
            Ok(()) => Ok(()),
            // Relay-to-relay: another allocation on this relay.
            Err(d) if d.own && (!port_matters || self.is_relay_port(peer)) => Ok(()),
            Err(d) if d.own => {
                inc(&self.metrics.denied_peers, 1);
                tracing::info!(client = %a.client.remote, %peer, "peer denied: the relay's own address, not a live relayed port");
                let (lo, hi) = self.cfg.relay_ports;
                Err((
                    403,
                    format!(
                        "Forbidden: peer {peer} is this relay but not one of its live relayed ports ({lo}-{hi})"
                    ),
                ))
            }
            Err(d) => {
                inc(&self.metrics.denied_peers, 1);
                tracing::info!(client = %a.client.remote, %peer, rule = %d.rule, "peer denied");
                Err((403, format!("Forbidden: {d}")))
            }
        }
    }

    /// Installs or refreshes the permission for `ip`; false when the
    /// allocation is gone or has no room.
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

    pub(super) fn create_permission(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
    ) {
        let Some((slot, owner)) = self.existing(client) else {
            return self.mismatch(now, client, msg);
        };
        let Some(auth) = self.authenticate(now, client, msg, Some(&owner)) else {
            return;
        };
        let r = Reply::to(client, msg).signed(&auth);
        let peers = match self.permission_peers(slot, msg) {
            Ok(peers) => peers,
            Err((code, reason)) => return self.refuse(&r, code, &reason),
        };
        let until = now + self.cfg.permission_lifetime;
        for ip in peers {
            if !self.add_permission(slot, ip, until) {
                let reason = "Insufficient Capacity: too many permissions on this allocation";
                return self.refuse(&r, 508, reason);
            }
        }
        self.update_credentials(slot, &auth);
        self.sync_fast_path(slot, now);
        self.success(&r, &[]);
    }

    /// The checked peer IPs of a CreatePermission (one or more
    /// XOR-PEER-ADDRESS; the first bad one refuses the whole request).
    fn permission_peers(&self, slot: usize, msg: &Message<'_>) -> Result<Vec<IpAddr>, Refusal> {
        let mut peers = Vec::new();
        for p in msg.xor_addresses(attr::XOR_PEER_ADDRESS) {
            let p = p.map_err(|e| (400, format!("bad XOR-PEER-ADDRESS: {e}")))?;
            let peer = PeerAddr::new(p);
            self.check_peer(slot, peer, false)?;
            peers.push(peer.ip());
        }
        if peers.is_empty() {
            return Err((400, "XOR-PEER-ADDRESS missing".into()));
        }
        Ok(peers)
    }

    pub(super) fn channel_bind(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let Some((slot, owner)) = self.existing(client) else {
            return self.mismatch(now, client, msg);
        };
        let Some(auth) = self.authenticate(now, client, msg, Some(&owner)) else {
            return;
        };
        let r = Reply::to(client, msg).signed(&auth);
        let bound = self
            .channel_bind_request(slot, msg)
            .and_then(|(number, peer)| self.bind_channel(now, slot, number, peer));
        match bound {
            Ok(true) => {
                self.update_credentials(slot, &auth);
                self.sync_fast_path(slot, now);
                self.success(&r, &[]);
            }
            Ok(false) => {}
            Err((code, reason)) => self.refuse(&r, code, &reason),
        }
    }

    /// The checked channel number and peer of a ChannelBind.
    fn channel_bind_request(
        &self,
        slot: usize,
        msg: &Message<'_>,
    ) -> Result<(ChannelNumber, PeerAddr), Refusal> {
        let number = match msg.get(attr::CHANNEL_NUMBER) {
            Some(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => return Err((400, "CHANNEL-NUMBER missing".into())),
        };
        let Some(number) = ChannelNumber::new(number) else {
            return Err((400, "CHANNEL-NUMBER outside 0x4000-0x7FFF".into()));
        };
        let Some(Ok(peer)) = msg.xor_address(attr::XOR_PEER_ADDRESS) else {
            return Err((400, "XOR-PEER-ADDRESS missing or malformed".into()));
        };
        let peer = PeerAddr::new(peer);
        self.check_peer(slot, peer, true)?;
        Ok((number, peer))
    }

    /// Binds (or refreshes) `number` to `peer` with its permission (RFC 8656
    /// §12.2). `Ok(false)`: the allocation is gone (no answer, as before).
    fn bind_channel(
        &mut self,
        now: Instant,
        slot: usize,
        number: ChannelNumber,
        peer: PeerAddr,
    ) -> Result<bool, Refusal> {
        let until = now + self.cfg.channel_lifetime;
        let max = self.cfg.max_channels;
        let own = self.cfg.policy.is_own(peer.ip());
        let Some(a) = self.slots[slot].as_mut() else {
            return Ok(false);
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
                let reason = "Insufficient Capacity: too many channels on this allocation";
                return Err((508, reason.into()));
            }
            _ => {
                let reason = "channel or peer already bound to another peer or channel";
                return Err((400, reason.into()));
            }
        }
        // A channel needs the permission too; without room for it the
        // channel would silently carry nothing.
        if !self.add_permission(slot, peer.ip(), now + self.cfg.permission_lifetime) {
            self.unbind_channel(slot, number, peer);
            let reason = "Insufficient Capacity: too many permissions on this allocation";
            return Err((508, reason.into()));
        }
        Ok(true)
    }

    fn unbind_channel(&mut self, slot: usize, number: ChannelNumber, peer: PeerAddr) {
        let Some(a) = self.slots[slot].as_mut() else {
            return;
        };
        if let Some(i) = a
            .channels
            .iter()
            .position(|c| c.number == number && c.peer == peer)
        {
            a.channels.remove(i);
            self.metrics.channels.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Drops expired permissions and channels of every allocation.
    pub(super) fn expire_permissions_and_channels(&mut self, now: Instant) {
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
}
