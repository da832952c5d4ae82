//! The data paths, which allocate nothing: ChannelData and Send indications
//! from clients come back as a [`PeerForward`] borrowing the input; data from
//! peers is framed as ChannelData in place, in the caller's buffer (a Data
//! indication, queued, when no channel is bound).

use std::net::SocketAddr;
use std::time::Instant;

use rand::Rng;

use super::allocation::Allocation;
use super::metrics::inc;
use super::roles::PeerAddr;
use super::{ClientForward, ClientSocket, PeerForward, RelayToken, Server, Transmit};
use crate::stun::channel_data::{self, ChannelNumber};
use crate::stun::{self, attr, method, Class, Message, MessageBuilder};

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
            .find(|c| c.number.get() == number && c.expires > now)
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
    fn forward_to_peer<'a>(
        &mut self,
        now: Instant,
        slot: usize,
        peer: PeerAddr,
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
            peer: peer.addr(),
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
        let Some(Ok(peer)) = msg.xor_address(attr::XOR_PEER_ADDRESS) else {
            inc(&self.metrics.dropped_invalid, 1);
            return None;
        };
        let peer = PeerAddr::new(peer);
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
        let peer = PeerAddr::new(peer);
        let (client, channel) = self.accept_from_peer(now, relay, peer, len)?;
        inc(&self.metrics.packets_to_client, 1);
        inc(&self.metrics.bytes_to_client, len as u64);
        if let Some(number) = channel {
            let stream = client.transport.is_stream();
            let len = frame_channel_data(buf, len, number, stream)?;
            return Some(ClientForward { client, len });
        }
        let payload = buf.get(4..4 + len)?;
        self.data_indication(client, peer, payload);
        None
    }

    /// Whether `len` bytes from `peer` may reach the allocation behind
    /// `relay` (permission, relay-to-relay liveness, bandwidth): its client
    /// and the channel bound to `peer`, if any.
    fn accept_from_peer(
        &mut self,
        now: Instant,
        relay: RelayToken,
        peer: PeerAddr,
        len: usize,
    ) -> Option<(ClientSocket, Option<ChannelNumber>)> {
        let limit = self.cfg.bandwidth_limit;
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
        let channel = a
            .channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
            .map(|c| c.number);
        Some((a.client, channel))
    }

    /// Queues a Data indication carrying `payload` from `peer` (no channel).
    fn data_indication(&mut self, client: ClientSocket, peer: PeerAddr, payload: &[u8]) {
        let tid: stun::TransactionId = self.rng.random();
        let mut out = Vec::with_capacity(payload.len() + 36);
        MessageBuilder::new(&mut out, method::DATA, Class::Indication, tid)
            .xor_address(attr::XOR_PEER_ADDRESS, peer.addr())
            .attr(attr::DATA, payload);
        self.transmits.push_back(Transmit::ToClient {
            client,
            from: client.local,
            payload: out,
        });
    }

    /// The allocation a relayed socket belongs to (same slot and generation).
    fn alloc_mut(&mut self, token: RelayToken) -> Option<&mut Allocation> {
        self.slots
            .get_mut(token.slot())
            .and_then(|s| s.as_mut())
            .filter(|a| a.gen == token.gen())
    }
}

/// Writes the ChannelData header for the `len` payload bytes at `buf[4..]`
/// into `buf[..4]`, plus zero padding to 4 bytes for stream clients; the
/// frame's length, or `None` when `buf` is too short.
fn frame_channel_data(
    buf: &mut [u8],
    len: usize,
    number: ChannelNumber,
    stream: bool,
) -> Option<usize> {
    if buf.len() < channel_data::HEADER_LEN + len {
        return None;
    }
    buf[..4].copy_from_slice(&channel_data::header(number.get(), len));
    let mut total = 4 + len;
    if stream {
        let pad = (4 - len % 4) % 4;
        if buf.len() < total + pad {
            return None;
        }
        buf[total..total + pad].fill(0);
        total += pad;
    }
    Some(total)
}
