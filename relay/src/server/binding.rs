//! STUN Binding (RFC 8489) with RFC 5780's CHANGE-REQUEST, RESPONSE-ORIGIN
//! and OTHER-ADDRESS when an alternate address is configured. Answers are
//! unauthenticated, so they pass the per-source budgets of [`super::quotas`].

use std::net::SocketAddr;
use std::time::Instant;

use super::metrics::inc;
use super::reply::Reply;
use super::{ClientSocket, Server, Transmit, Transport};
use crate::stun::{self, attr, method, Class, Message, MessageBuilder};

impl Server {
    pub(super) fn binding(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let tid = msg.transaction_id();
        let fp = msg.check_fingerprint().is_some();
        let now_ms = self.now_ms(now);
        if !self.allow_unauth(client.remote.ip(), now_ms) {
            return;
        }
        let Some(from) = self.change_request(client, msg) else {
            return;
        };
        // RFC 5780 clients need RESPONSE-ORIGIN and OTHER-ADDRESS in every
        // answer, padded request or not. What bounds amplification is the
        // per-source byte budget (shared by all shards): an answer that does
        // not fit is sent without the optional attributes, or not at all.
        let request_len = msg.raw().len();
        let mut out = std::mem::take(&mut self.scratch);
        self.binding_answer(&mut out, tid, client, from, fp, true);
        let mut paid = self.pay_unauth(client.remote.ip(), now_ms, out.len(), request_len);
        if !paid && self.cfg.alt.is_some() {
            self.binding_answer(&mut out, tid, client, from, fp, false);
            paid = self.pay_unauth(client.remote.ip(), now_ms, out.len(), request_len);
            if paid {
                inc(&self.metrics.shrunk_amplification, 1);
                tracing::debug!(source = %client.remote, "Binding answer without RFC 5780 attributes: per-source byte budget");
            }
        }
        if !paid {
            inc(&self.metrics.dropped_amplification, 1);
            tracing::debug!(source = %client.remote, "Binding answer dropped: per-source byte budget or --strict-amplification");
            self.scratch = out;
            return;
        }
        inc(&self.metrics.binding_requests, 1);
        self.transmits.push_back(Transmit::ToClient {
            client,
            from,
            payload: out.clone(),
        });
        self.scratch = out;
    }

    /// Where to answer from: the address the request came to, or the one
    /// RFC 5780's CHANGE-REQUEST asks for. `None`: refused with 420 (queued).
    fn change_request(&mut self, client: ClientSocket, msg: &Message<'_>) -> Option<SocketAddr> {
        let mut from = client.local;
        let Some(flags) = msg.u32_attr(attr::CHANGE_REQUEST) else {
            return Some(from);
        };
        let r = Reply::to(client, msg);
        let (change_ip, change_port) = (flags & 4 != 0, flags & 2 != 0);
        let Some(alt) = self.cfg.alt.filter(|_| client.transport == Transport::Udp) else {
            if flags & 6 != 0 {
                let extra = [(
                    attr::UNKNOWN_ATTRIBUTES,
                    &attr::CHANGE_REQUEST.to_be_bytes()[..],
                )];
                self.error_response(&r, 420, "CHANGE-REQUEST needs --alt-listen", &extra);
                return None;
            }
            return Some(from);
        };
        let other = if client.local.ip() == alt.primary.ip() || client.local.ip() != alt.other.ip()
        {
            alt.other.ip()
        } else {
            alt.primary.ip()
        };
        let other_port = if client.local.port() == alt.primary.port() {
            alt.other.port()
        } else {
            alt.primary.port()
        };
        if (change_ip && alt.other.ip() == alt.primary.ip())
            || (change_port && alt.other.port() == alt.primary.port())
        {
            let reason = "CHANGE-REQUEST needs a different alternate IP/port (--alt-listen)";
            self.refuse(&r, 420, reason);
            return None;
        }
        if change_ip {
            from.set_ip(other);
        }
        if change_port {
            from.set_port(other_port);
        }
        Some(from)
    }

    /// A Binding success: XOR-MAPPED-ADDRESS, and with `rfc5780` (and an
    /// alternate address) RESPONSE-ORIGIN and OTHER-ADDRESS; FINGERPRINT when
    /// the request had one.
    pub(super) fn binding_answer(
        &self,
        out: &mut Vec<u8>,
        tid: stun::TransactionId,
        client: ClientSocket,
        from: SocketAddr,
        fp: bool,
        rfc5780: bool,
    ) {
        let mut b = MessageBuilder::new(out, method::BINDING, Class::Success, tid);
        b.xor_address(attr::XOR_MAPPED_ADDRESS, client.remote);
        if let Some(alt) = self.cfg.alt.filter(|_| rfc5780) {
            // OTHER-ADDRESS: differs in IP and port from where the request
            // arrived (RFC 5780 §7.4).
            let local = client.local;
            let other = SocketAddr::new(
                if local.ip() == alt.primary.ip() {
                    alt.other.ip()
                } else {
                    alt.primary.ip()
                },
                if local.port() == alt.primary.port() {
                    alt.other.port()
                } else {
                    alt.primary.port()
                },
            );
            b.address(attr::RESPONSE_ORIGIN, from)
                .address(attr::OTHER_ADDRESS, other);
        }
        if fp {
            b.fingerprint();
        }
    }
}
