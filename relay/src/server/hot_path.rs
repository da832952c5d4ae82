//! The data paths: ChannelData and Send from clients, data from peers.

use std::net::SocketAddr;
use std::time::Instant;

use super::metrics::inc;
use super::{ClientForward, ClientSocket, PeerForward, RelayToken, Server, Transmit};
use crate::stun::{self, attr, channel_data, method, Class, Message, MessageBuilder};

impl Server {
    pub(super) fn channel_data_from_client<'a>(
        &mut self,
        now: Instant,
        client: ClientSocket,
        data: &'a [u8],
    ) -> Option<PeerForward<'a>> {
        let Some((number, payload)) = channel_data::decode(data) else {
            inc(&self.metrics.dropped_invalid, 1);
            return None;
        };
        let Some(&slot) = self.by_client.get(&client) else {
            inc(&self.metrics.dropped_invalid, 1);
            return None;
        };
        let a = self.slots[slot].as_mut()?;
        let Some(ch) = a
            .channels
            .iter()
            .find(|c| c.number == number && c.expires > now)
        else {
            inc(&self.metrics.dropped_invalid, 1);
            return None;
        };
        let (peer, own) = (ch.peer, ch.own);
        // Relay-to-relay: the other allocation may have ended since the bind,
        // and its port may now belong to anyone.
        if own && !self.is_relay_port(peer) {
            inc(&self.metrics.denied_peers, 1);
            tracing::debug!(client = %client.remote, %peer, "ChannelData to the relay's own address on a port no allocation holds; dropped");
            return None;
        }
        self.forward_to_peer(now, slot, peer, payload)
    }

    /// The common tail of ChannelData and Send: the allocation needs a relayed
    /// socket of the peer's family and a live permission, and the bandwidth
    /// cap must allow the payload.
    pub(super) fn forward_to_peer<'a>(
        &mut self,
        now: Instant,
        slot: usize,
        peer: SocketAddr,
        payload: &'a [u8],
    ) -> Option<PeerForward<'a>> {
        let limit = self.cfg.bandwidth_limit;
        let a = self.slots[slot].as_mut()?;
        let (Some(r), true) = (
            a.relay_for(peer.ip()),
            a.permission(peer.ip(), now).is_some(),
        ) else {
            inc(&self.metrics.dropped_invalid, 1);
            return None;
        };
        let relay = r.token;
        if !a.take_bandwidth(payload.len(), now, limit) {
            inc(&self.metrics.dropped_bandwidth, 1);
            return None;
        }
        inc(&self.metrics.packets_to_peer, 1);
        inc(&self.metrics.bytes_to_peer, payload.len() as u64);
        Some(PeerForward {
            relay,
            peer,
            payload,
        })
    }

    pub(super) fn send_indication<'a>(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'a>,
    ) -> Option<PeerForward<'a>> {
        let slot = *self.by_client.get(&client)?;
        let peer = match msg.xor_address(attr::XOR_PEER_ADDRESS) {
            Some(Ok(p)) => p,
            _ => {
                inc(&self.metrics.dropped_invalid, 1);
                return None;
            }
        };
        let peer = SocketAddr::new(crate::policy::normalize(peer.ip()), peer.port());
        let Some(payload) = msg.get(attr::DATA) else {
            inc(&self.metrics.dropped_invalid, 1);
            return None;
        };
        if self.cfg.policy.is_own(peer.ip()) && !self.is_relay_port(peer) {
            inc(&self.metrics.denied_peers, 1);
            tracing::debug!(client = %client.remote, %peer, "Send to the relay's own address on a port no allocation holds; dropped");
            return None;
        }
        self.forward_to_peer(now, slot, peer, payload)
    }

    /// A datagram from `peer` on a relayed socket. The payload must sit at
    /// `buf[4..4 + len]`; for a bound channel the server writes the
    /// ChannelData header into `buf[0..4]` (and zero padding after the payload
    /// for stream clients, so `buf` needs 3 spare bytes) and returns the frame.
    /// Without a channel, a Data indication is queued for `poll_transmit`.
    pub fn handle_peer(
        &mut self,
        now: Instant,
        relay: RelayToken,
        peer: SocketAddr,
        buf: &mut [u8],
        len: usize,
    ) -> Option<ClientForward> {
        let limit = self.cfg.bandwidth_limit;
        let peer = SocketAddr::new(crate::policy::normalize(peer.ip()), peer.port());
        let live = self.is_relay_port(peer);
        let Some(a) = self.alloc_mut(relay) else {
            inc(&self.metrics.dropped_invalid, 1);
            return None;
        };
        match a.permission(peer.ip(), now) {
            None => {
                inc(&self.metrics.dropped_invalid, 1);
                return None;
            }
            // From the relay's own address: only another live allocation.
            Some(p) if p.own && !live => {
                inc(&self.metrics.denied_peers, 1);
                tracing::debug!(%peer, "data from the relay's own address on a port no allocation holds; dropped");
                return None;
            }
            Some(_) => {}
        }
        if !a.take_bandwidth(len, now, limit) {
            inc(&self.metrics.dropped_bandwidth, 1);
            return None;
        }
        let client = a.client;
        let channel = a
            .channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
            .map(|c| c.number);
        inc(&self.metrics.packets_to_client, 1);
        inc(&self.metrics.bytes_to_client, len as u64);
        if let Some(number) = channel {
            if buf.len() < channel_data::HEADER_LEN + len {
                return None;
            }
            buf[..4].copy_from_slice(&channel_data::header(number, len));
            let mut total = 4 + len;
            if client.transport.is_stream() {
                let pad = (4 - len % 4) % 4;
                if buf.len() < total + pad {
                    return None;
                }
                buf[total..total + pad].fill(0);
                total += pad;
            }
            return Some(ClientForward { client, len: total });
        }
        let payload = buf.get(4..4 + len)?;
        let tid: stun::TransactionId = rand::random();
        let mut out = Vec::with_capacity(len + 36);
        MessageBuilder::new(&mut out, method::DATA, Class::Indication, tid)
            .xor_address(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, payload);
        self.transmits.push_back(Transmit::ToClient {
            client,
            from: client.local,
            payload: out,
        });
        None
    }
}
