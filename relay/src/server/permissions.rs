//! CreatePermission, ChannelBind and the peer checks.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::metrics::inc;
use super::{ClientSocket, Server};
use crate::stun::{attr, channel_data, method, Message};

#[derive(Debug)]
pub(super) struct Channel {
    pub(super) number: u16,
    pub(super) peer: SocketAddr,
    pub(super) expires: Instant,
    /// The peer is the relay's own address (relay-to-relay): its port must
    /// still be a live relayed port on every packet.
    pub(super) own: bool,
}

#[derive(Debug)]
pub(super) struct Permission {
    pub(super) ip: IpAddr,
    pub(super) expires: Instant,
    /// The relay's own address: data only from live relayed ports.
    pub(super) own: bool,
}

impl Server {
    /// A relayed port of a live allocation on this relay, in `peer`'s family.
    pub(super) fn is_relay_port(&self, peer: SocketAddr) -> bool {
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
    pub(super) fn check_peer(
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

    pub(super) fn add_permission(&mut self, slot: usize, ip: IpAddr, until: Instant) -> bool {
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

    pub(super) fn channel_bind(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
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
}
