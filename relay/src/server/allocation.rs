//! Allocate, Refresh, relayed ports and the BindRelay handshake with the driver.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::auth::Authed;
use super::metrics::inc;
use super::permissions::{Channel, Permission};
use super::{ClientSocket, Event, RelayToken, Server, Transmit};
use crate::stun::{self, attr, method, Class, Integrity, Message, MessageBuilder};

#[derive(Debug)]
pub(super) struct Relayed {
    pub(super) token: RelayToken,
    /// Port asked of the driver.
    pub(super) port: u16,
    /// Bound local address once the driver confirmed it.
    pub(super) bound: Option<SocketAddr>,
    pub(super) attempts: u8,
}

#[derive(Debug)]
pub(super) struct Bucket {
    pub(super) tokens: f64,
    pub(super) last: Instant,
}

#[derive(Debug)]
pub(super) struct Allocation {
    pub(super) gen: u32,
    pub(super) client: ClientSocket,
    pub(super) username: String,
    pub(super) key: [u8; 16],
    pub(super) integrity: Integrity,
    pub(super) with_fingerprint: bool,
    pub(super) v4: Option<Relayed>,
    pub(super) v6: Option<Relayed>,
    /// 440 for a family the client asked for (ADDITIONAL-ADDRESS-FAMILY) but we lack.
    pub(super) family_error: bool,
    pub(super) expires: Instant,
    pub(super) permissions: Vec<Permission>,
    pub(super) channels: Vec<Channel>,
    pub(super) bucket: Option<Bucket>,
    /// The Allocate transaction, kept for retransmissions (RFC 8656 §7.2).
    pub(super) allocate_tid: stun::TransactionId,
    /// Success response once both sockets are bound; None while pending.
    pub(super) allocate_response: Option<Vec<u8>>,
}

impl Allocation {
    pub(super) fn relay_for(&self, peer: IpAddr) -> Option<&Relayed> {
        if peer.is_ipv4() {
            self.v4.as_ref()
        } else {
            self.v6.as_ref()
        }
    }

    /// The live permission for `ip`, if any.
    pub(super) fn permission(&self, ip: IpAddr, now: Instant) -> Option<&Permission> {
        self.permissions
            .iter()
            .find(|p| p.ip == ip && p.expires > now)
    }

    pub(super) fn take_bandwidth(
        &mut self,
        bytes: usize,
        now: Instant,
        limit: Option<u64>,
    ) -> bool {
        let (Some(limit), Some(b)) = (limit, self.bucket.as_mut()) else {
            return true;
        };
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.last = now;
        // Burst: a quarter second of traffic.
        b.tokens = (b.tokens + dt * limit as f64).min(limit as f64 / 4.0 + 65536.0);
        if b.tokens >= bytes as f64 {
            b.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

pub(super) const PORT_ATTEMPTS: u8 = 16;

impl Server {
    pub(super) fn remove_allocation(&mut self, slot: usize) {
        let Some(a) = self.slots.get_mut(slot).and_then(|s| s.take()) else {
            return;
        };
        self.by_client.remove(&a.client);
        for (r, ports, live) in [
            (&a.v4, &mut self.ports_v4, &self.quotas.live_ports_v4),
            (&a.v6, &mut self.ports_v6, &self.quotas.live_ports_v6),
        ] {
            if let Some(r) = r {
                if let Some(b) = r.bound {
                    ports.remove(&b.port());
                    live.set(b.port(), false);
                }
                self.events
                    .push_back(Event::ReleaseRelay { token: r.token });
            }
        }
        self.metrics
            .permissions
            .fetch_sub(a.permissions.len() as u64, Ordering::Relaxed);
        self.metrics
            .channels
            .fetch_sub(a.channels.len() as u64, Ordering::Relaxed);
        inc(&self.metrics.allocations_ended, 1);
        self.quotas.release(&a.username);
        self.free.push(slot);
    }

    pub(super) fn alloc_mut(&mut self, token: RelayToken) -> Option<&mut Allocation> {
        self.slots
            .get_mut(token.slot())
            .and_then(|s| s.as_mut())
            .filter(|a| a.gen == token.gen())
    }

    /// The driver's answer to [`Event::BindRelay`].
    pub fn relay_bound(
        &mut self,
        now: Instant,
        token: RelayToken,
        result: Result<SocketAddr, std::io::Error>,
    ) {
        let Some(slot) = self
            .slots
            .get(token.slot())
            .and_then(|s| s.as_ref())
            .filter(|a| a.gen == token.gen())
            .map(|_| token.slot())
        else {
            // Allocation gone meanwhile: release what was bound.
            if result.is_ok() {
                self.events.push_back(Event::ReleaseRelay { token });
            }
            return;
        };
        match result {
            Ok(addr) => {
                let live = if token.is_v6() {
                    &self.quotas.live_ports_v6
                } else {
                    &self.quotas.live_ports_v4
                };
                live.set(addr.port(), true);
                let Some(a) = self.slots[slot].as_mut() else {
                    return;
                };
                let r = if token.is_v6() {
                    a.v6.as_mut()
                } else {
                    a.v4.as_mut()
                };
                if let Some(r) = r {
                    r.bound = Some(addr);
                }
                self.finish_allocate(now, slot);
            }
            Err(e) => {
                tracing::debug!(error = %e, "relay port bind failed; trying another");
                let v6 = token.is_v6();
                let (ports, ip) = if v6 {
                    (&mut self.ports_v6, self.cfg.relay_ipv6)
                } else {
                    (&mut self.ports_v4, self.cfg.relay_ipv4)
                };
                let Some(a) = self.slots[slot].as_mut() else {
                    return;
                };
                let Some(r) = (if v6 { a.v6.as_mut() } else { a.v4.as_mut() }) else {
                    return;
                };
                r.attempts += 1;
                let attempts = r.attempts;
                // The failed port is someone else's; forget it so the set stays small.
                ports.remove(&r.port);
                let next = if attempts < PORT_ATTEMPTS {
                    ip.and_then(|ip| {
                        pick_port(ports, self.cfg.port_range).map(|p| SocketAddr::new(ip, p))
                    })
                } else {
                    None
                };
                if let (Some(addr), Some(a)) = (next, self.slots[slot].as_mut()) {
                    if let Some(r) = if v6 { a.v6.as_mut() } else { a.v4.as_mut() } {
                        r.port = addr.port();
                    }
                }
                match next {
                    Some(addr) => {
                        // Same token (same allocation); only the port changes.
                        self.events.push_back(Event::BindRelay { token, addr });
                    }
                    None => {
                        let a = self.slots[slot].as_ref().map(|a| {
                            (
                                a.client,
                                a.allocate_tid,
                                a.key,
                                a.integrity,
                                a.with_fingerprint,
                            )
                        });
                        self.remove_allocation(slot);
                        if let Some((client, tid, key, integ, fp)) = a {
                            let auth = Some((&key[..], integ));
                            self.error_response(
                                client,
                                method::ALLOCATE,
                                tid,
                                508,
                                "no free relay port (widen --relay-ports)",
                                auth,
                                fp,
                                &[],
                            );
                        }
                    }
                }
            }
        }
    }

    pub(super) fn finish_allocate(&mut self, now: Instant, slot: usize) {
        let cfg = &self.cfg;
        let Some(a) = self.slots[slot].as_mut() else {
            return;
        };
        let pending = |r: &Option<Relayed>| r.as_ref().is_some_and(|r| r.bound.is_none());
        if pending(&a.v4) || pending(&a.v6) || a.allocate_response.is_some() {
            return;
        }
        let lifetime = a.expires.saturating_duration_since(now).as_secs() as u32;
        let mut out = Vec::with_capacity(128);
        {
            let mut b =
                MessageBuilder::new(&mut out, method::ALLOCATE, Class::Success, a.allocate_tid);
            for (r, ext) in [(&a.v4, cfg.external_ipv4), (&a.v6, cfg.external_ipv6)] {
                if let Some(bound) = r.as_ref().and_then(|r| r.bound) {
                    let adv = SocketAddr::new(ext.unwrap_or(bound.ip()), bound.port());
                    b.xor_address(attr::XOR_RELAYED_ADDRESS, adv);
                }
            }
            if a.family_error {
                let mut v = vec![0x02, 0, 0, 0, 4, 40];
                v.extend_from_slice(b"Address Family not Supported");
                b.attr(attr::ADDRESS_ERROR_CODE, &v);
            }
            b.u32_attr(attr::LIFETIME, lifetime)
                .xor_address(attr::XOR_MAPPED_ADDRESS, a.client.remote)
                .attr(attr::SOFTWARE, cfg.software.as_bytes())
                .integrity(a.integrity, &a.key);
            if a.with_fingerprint {
                b.fingerprint();
            }
        }
        tracing::info!(client = %a.client.remote, user = %a.username, relayed = ?a.v4.as_ref().and_then(|r| r.bound), "allocation created");
        inc(&self.metrics.allocations_created, 1);
        a.allocate_response = Some(out.clone());
        self.transmits.push_back(Transmit::ToClient {
            client: a.client,
            from: a.client.local,
            payload: out,
        });
    }

    pub(super) fn allocate(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let tid = msg.transaction_id();
        let fp = msg.check_fingerprint().is_some();
        if let Some(&slot) = self.by_client.get(&client) {
            let Some(a) = self.slots[slot].as_ref() else {
                return;
            };
            if a.allocate_tid == tid {
                // Retransmission: answer again (or keep waiting for the bind).
                if let Some(resp) = a.allocate_response.clone() {
                    self.transmits.push_back(Transmit::ToClient {
                        client,
                        from: client.local,
                        payload: resp,
                    });
                }
                return;
            }
            let owner = a.username.clone();
            if let Some(auth) = self.authenticate(now, client, msg, Some(&owner)) {
                self.error_response(
                    client,
                    method::ALLOCATE,
                    tid,
                    437,
                    "Allocation Mismatch: this 5-tuple already has an allocation",
                    Some((&auth.key, auth.integrity)),
                    fp,
                    &[],
                );
            }
            return;
        }
        let Some(auth) = self.authenticate(now, client, msg, None) else {
            return;
        };
        let a_auth = Some((&auth.key[..], auth.integrity));
        // RFC 8656 §7.2 checks, in order.
        match msg
            .u32_attr(attr::REQUESTED_TRANSPORT)
            .map(|v| (v >> 24) as u8)
        {
            None => {
                return self.error_response(
                    client,
                    method::ALLOCATE,
                    tid,
                    400,
                    "REQUESTED-TRANSPORT missing",
                    a_auth,
                    fp,
                    &[],
                )
            }
            Some(17) => {}
            Some(p) => {
                let reason = if p == 6 {
                    "Unsupported Transport Protocol: TCP allocations (RFC 6062) are not offered; use UDP"
                } else {
                    "Unsupported Transport Protocol: only UDP (17) is relayed"
                };
                return self.error_response(
                    client,
                    method::ALLOCATE,
                    tid,
                    442,
                    reason,
                    a_auth,
                    fp,
                    &[],
                );
            }
        }
        if msg.get(attr::RESERVATION_TOKEN).is_some() {
            return self.error_response(
                client,
                method::ALLOCATE,
                tid,
                508,
                "Insufficient Capacity: RESERVATION-TOKEN is not supported (no reserved ports)",
                a_auth,
                fp,
                &[],
            );
        }
        if let Some(v) = msg.get(attr::EVEN_PORT) {
            if v.first().is_some_and(|b| b & 0x80 != 0) {
                return self.error_response(
                    client,
                    method::ALLOCATE,
                    tid,
                    508,
                    "Insufficient Capacity: EVEN-PORT with reservation (R bit) is not supported",
                    a_auth,
                    fp,
                    &[],
                );
            }
        }
        let requested = msg
            .get(attr::REQUESTED_ADDRESS_FAMILY)
            .map(|v| v.first().copied().unwrap_or(0));
        let additional = msg
            .get(attr::ADDITIONAL_ADDRESS_FAMILY)
            .map(|v| v.first().copied().unwrap_or(0));
        if requested.is_some() && additional.is_some() {
            return self.error_response(
                client,
                method::ALLOCATE,
                tid,
                400,
                "REQUESTED-ADDRESS-FAMILY and ADDITIONAL-ADDRESS-FAMILY together",
                a_auth,
                fp,
                &[],
            );
        }
        if additional.is_some_and(|f| f != 2) {
            return self.error_response(
                client,
                method::ALLOCATE,
                tid,
                400,
                "ADDITIONAL-ADDRESS-FAMILY must be IPv6 (0x02)",
                a_auth,
                fp,
                &[],
            );
        }
        let (want_v4, want_v6) = match (requested, additional) {
            (Some(1), _) => (true, false),
            // RFC 8656 says IPv4 by default; an IPv6-only relay serves IPv6
            // rather than refusing clients that did not ask.
            (None, None) => (self.cfg.relay_ipv4.is_some(), self.cfg.relay_ipv4.is_none()),
            (Some(2), _) => (false, true),
            (None, Some(_)) => (true, true),
            (Some(_), _) => {
                return self.error_response(
                    client,
                    method::ALLOCATE,
                    tid,
                    440,
                    "Address Family not Supported: REQUESTED-ADDRESS-FAMILY must be 1 or 2",
                    a_auth,
                    fp,
                    &[],
                );
            }
        };
        let v4_ip = self.cfg.relay_ipv4.filter(|_| want_v4);
        let v6_ip = self.cfg.relay_ipv6.filter(|_| want_v6);
        if (want_v4 && v4_ip.is_none() && !want_v6)
            || (want_v6 && !want_v4 && v6_ip.is_none())
            || (v4_ip.is_none() && v6_ip.is_none())
        {
            return self.error_response(client, method::ALLOCATE, tid, 440, "Address Family not Supported by this relay (configure a relay address of that family)", a_auth, fp, &[]);
        }
        if let Err(why) = self.quotas.acquire(&auth.username) {
            tracing::info!(user = %auth.username, why, "allocation refused");
            return self.error_response(
                client,
                method::ALLOCATE,
                tid,
                486,
                &format!("Allocation Quota Reached: {why}"),
                a_auth,
                fp,
                &[],
            );
        }
        let even = msg.get(attr::EVEN_PORT).is_some();
        let lifetime = msg
            .u32_attr(attr::LIFETIME)
            .map(|s| Duration::from_secs(s as u64))
            .unwrap_or(self.cfg.default_lifetime)
            .clamp(self.cfg.default_lifetime, self.cfg.max_lifetime);
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let mut binds = Vec::new();
        let mut relayed = |ip: Option<IpAddr>, ports: &mut HashSet<u16>, v6: bool| {
            let ip = ip?;
            let port = if even {
                pick_even_port(ports, self.cfg.port_range)
            } else {
                pick_port(ports, self.cfg.port_range)
            }?;
            let token = RelayToken::new(slot, gen, v6);
            binds.push(Event::BindRelay {
                token,
                addr: SocketAddr::new(ip, port),
            });
            Some(Relayed {
                token,
                port,
                bound: None,
                attempts: 0,
            })
        };
        let v4 = relayed(v4_ip, &mut self.ports_v4, false);
        let v6 = relayed(v6_ip, &mut self.ports_v6, true);
        if v4.is_none() && v6.is_none() {
            self.quotas.release(&auth.username);
            self.free.push(slot);
            return self.error_response(
                client,
                method::ALLOCATE,
                tid,
                508,
                "Insufficient Capacity: no free relay port (widen --relay-ports)",
                a_auth,
                fp,
                &[],
            );
        }
        let bucket = self.cfg.bandwidth_limit.map(|l| Bucket {
            tokens: l as f64 / 4.0,
            last: now,
        });
        self.slots[slot] = Some(Allocation {
            gen,
            client,
            username: auth.username,
            key: auth.key,
            integrity: auth.integrity,
            with_fingerprint: fp,
            family_error: want_v6 && want_v4 && v6_ip.is_none(),
            v4,
            v6,
            expires: now + lifetime,
            permissions: Vec::new(),
            channels: Vec::new(),
            bucket,
            allocate_tid: tid,
            allocate_response: None,
        });
        self.by_client.insert(client, slot);
        self.events.extend(binds);
    }

    pub(super) fn existing(&self, client: ClientSocket) -> Option<(usize, String)> {
        let slot = *self.by_client.get(&client)?;
        self.slots[slot]
            .as_ref()
            .map(|a| (slot, a.username.clone()))
    }

    pub(super) fn mismatch(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let tid = msg.transaction_id();
        let fp = msg.check_fingerprint().is_some();
        if let Some(auth) = self.authenticate(now, client, msg, None) {
            self.error_response(
                client,
                msg.method(),
                tid,
                437,
                "Allocation Mismatch: no allocation for this 5-tuple",
                Some((&auth.key, auth.integrity)),
                fp,
                &[],
            );
        }
    }

    /// Keeps the allocation's credentials current (rotation under a live allocation).
    pub(super) fn update_credentials(&mut self, slot: usize, auth: &Authed) {
        if let Some(a) = self.slots[slot].as_mut() {
            if a.username != auth.username {
                tracing::info!(old = %a.username, new = %auth.username, "credentials rotated under a live allocation");
                a.username.clone_from(&auth.username);
            }
            a.key = auth.key;
            a.integrity = auth.integrity;
        }
    }

    pub(super) fn refresh(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let tid = msg.transaction_id();
        let fp = msg.check_fingerprint().is_some();
        let Some((slot, owner)) = self.existing(client) else {
            return self.mismatch(now, client, msg);
        };
        let Some(auth) = self.authenticate(now, client, msg, Some(&owner)) else {
            return;
        };
        let requested = msg
            .u32_attr(attr::LIFETIME)
            .map(|s| Duration::from_secs(s as u64));
        if requested == Some(Duration::ZERO) {
            self.remove_allocation(slot);
            tracing::info!(client = %client.remote, "allocation deleted by client");
            return self.success(
                client,
                method::REFRESH,
                tid,
                &auth,
                fp,
                &[(attr::LIFETIME, &0u32.to_be_bytes())],
            );
        }
        let lifetime = requested
            .unwrap_or(self.cfg.default_lifetime)
            .clamp(self.cfg.default_lifetime, self.cfg.max_lifetime);
        self.update_credentials(slot, &auth);
        if let Some(a) = self.slots[slot].as_mut() {
            a.expires = now + lifetime;
        }
        self.success(
            client,
            method::REFRESH,
            tid,
            &auth,
            fp,
            &[(attr::LIFETIME, &(lifetime.as_secs() as u32).to_be_bytes())],
        );
    }
}

pub(super) fn pick_port(used: &mut HashSet<u16>, (lo, hi): (u16, u16)) -> Option<u16> {
    let span = (hi as u32).saturating_sub(lo as u32) + 1;
    if used.len() as u32 >= span {
        return None;
    }
    let start: u32 = rand::random::<u32>() % span;
    for i in 0..span {
        let p = (lo as u32 + (start + i) % span) as u16;
        if used.insert(p) {
            return Some(p);
        }
    }
    None
}

pub(super) fn pick_even_port(used: &mut HashSet<u16>, (lo, hi): (u16, u16)) -> Option<u16> {
    let span = (hi as u32).saturating_sub(lo as u32) + 1;
    let start: u32 = rand::random::<u32>() % span;
    for i in 0..span {
        let p = (lo as u32 + (start + i) % span) as u16;
        if p.is_multiple_of(2) && used.insert(p) {
            return Some(p);
        }
    }
    None
}
