//! Allocations: Allocate (RFC 8656 §7.2) in steps — retransmission or
//! mismatch, authentication, the request's checks, quota, port picks — then
//! the BindRelay handshake with the driver ([`Server::relay_bound`]), Refresh
//! and deletion.
//!
//! The core cannot open sockets: it picks a port from its range, emits
//! [`Event::BindRelay`], and answers the client only when every relayed
//! socket is bound (or with 508 when [`PORT_ATTEMPTS`] binds failed).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;

use super::auth::Authed;
use super::metrics::inc;
use super::permissions::{Channel, Permission};
use super::quotas::Bucket;
use super::reply::Reply;
use super::roles::AllocationPort;
use super::{ClientSocket, Event, RelayToken, Server, Transmit};
use crate::stun::{self, attr, method, Class, Integrity, Message, MessageBuilder};

/// Binds tried per relayed socket before the Allocate gets 508.
const PORT_ATTEMPTS: u8 = 16;

/// One relayed socket of an allocation.
#[derive(Debug)]
pub(super) struct Relayed {
    pub(super) token: RelayToken,
    /// Port asked of the driver.
    pub(super) port: AllocationPort,
    /// Bound local address once the driver confirmed it.
    pub(super) bound: Option<SocketAddr>,
    pub(super) attempts: u8,
}

/// One client's allocation: its relayed sockets, credentials, permissions
/// and channels.
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
    /// Channel bindings installed in the kernel fast path.
    pub(super) fast: Vec<super::FastPath>,
}

impl Allocation {
    /// The relayed socket of `peer`'s family.
    pub(super) fn relay_for(&self, peer: IpAddr) -> Option<&Relayed> {
        if peer.is_ipv4() {
            self.v4.as_ref()
        } else {
            self.v6.as_ref()
        }
    }

    fn relayed_mut(&mut self, v6: bool) -> Option<&mut Relayed> {
        if v6 {
            self.v6.as_mut()
        } else {
            self.v4.as_mut()
        }
    }

    /// The live permission for `ip`, if any.
    pub(super) fn permission(&self, ip: IpAddr, now: Instant) -> Option<&Permission> {
        self.permissions
            .iter()
            .find(|p| p.ip == ip && p.expires > now)
    }

    /// Pays `bytes` from the bandwidth bucket; always true without a cap.
    pub(super) fn take_bandwidth(
        &mut self,
        bytes: usize,
        now: Instant,
        limit: Option<u64>,
    ) -> bool {
        match (limit, self.bucket.as_mut()) {
            (Some(limit), Some(b)) => b.take(bytes, now, limit),
            _ => true,
        }
    }
}

/// What a checked Allocate asks for.
#[derive(Debug)]
struct AllocateRequest {
    /// Local IPv4 address to relay on, when IPv4 is wanted and configured.
    v4: Option<IpAddr>,
    /// Local IPv6 address, likewise.
    v6: Option<IpAddr>,
    /// Both families asked for, IPv6 not configured: IPv4 with ADDRESS-ERROR-CODE 440.
    family_error: bool,
    /// EVEN-PORT (without reservation).
    even: bool,
    lifetime: Duration,
}

/// A refusal: error code and reason.
type Refusal = (u16, &'static str);

impl Server {
    pub(super) fn allocate(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        if self.by_client.contains_key(&client) {
            return self.allocate_again(now, client, msg);
        }
        let Some(auth) = self.authenticate(now, client, msg, None) else {
            return;
        };
        let r = Reply::to(client, msg).signed(&auth);
        let req = match self.allocate_request(msg) {
            Ok(req) => req,
            Err((code, reason)) => return self.refuse(&r, code, reason),
        };
        if let Err(why) = self.quotas.acquire(&auth.username) {
            tracing::info!(user = %auth.username, why, "allocation refused");
            return self.refuse(&r, 486, &format!("Allocation Quota Reached: {why}"));
        }
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let mut binds = Vec::new();
        let v4 = self.reserve_relayed(
            req.v4,
            RelayToken::new(slot, gen, false),
            req.even,
            &mut binds,
        );
        let v6 = self.reserve_relayed(
            req.v6,
            RelayToken::new(slot, gen, true),
            req.even,
            &mut binds,
        );
        if v4.is_none() && v6.is_none() {
            self.quotas.release(&auth.username);
            self.free.push(slot);
            let reason = "Insufficient Capacity: no free relay port (widen --relay-ports)";
            return self.refuse(&r, 508, reason);
        }
        let (tid, fp) = (r.tid, r.fp);
        self.slots[slot] = Some(Allocation {
            gen,
            client,
            username: auth.username,
            key: auth.key,
            integrity: auth.integrity,
            with_fingerprint: fp,
            family_error: req.family_error,
            v4,
            v6,
            expires: now + req.lifetime,
            permissions: Vec::new(),
            channels: Vec::new(),
            bucket: self.cfg.bandwidth_limit.map(|l| Bucket::new(l, now)),
            allocate_tid: tid,
            allocate_response: None,
            fast: Vec::new(),
        });
        self.by_client.insert(client, slot);
        self.events.extend(binds);
    }

    /// An Allocate on a 5-tuple that has an allocation: a retransmission
    /// gets the same answer (or waits for the bind); anything else 437.
    fn allocate_again(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let Some(a) = self
            .by_client
            .get(&client)
            .and_then(|&slot| self.slots[slot].as_ref())
        else {
            return;
        };
        if a.allocate_tid == msg.transaction_id() {
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
            let reason = "Allocation Mismatch: this 5-tuple already has an allocation";
            self.refuse(&Reply::to(client, msg).signed(&auth), 437, reason);
        }
    }

    /// The RFC 8656 §7.2 checks of an authenticated Allocate, in order.
    fn allocate_request(&self, msg: &Message<'_>) -> Result<AllocateRequest, Refusal> {
        requested_transport(msg)?;
        if msg.get(attr::RESERVATION_TOKEN).is_some() {
            return Err((
                508,
                "Insufficient Capacity: RESERVATION-TOKEN is not supported (no reserved ports)",
            ));
        }
        let even = msg.get(attr::EVEN_PORT);
        if even.is_some_and(|v| v.first().is_some_and(|b| b & 0x80 != 0)) {
            return Err((
                508,
                "Insufficient Capacity: EVEN-PORT with reservation (R bit) is not supported",
            ));
        }
        let (want_v4, want_v6) = self.requested_families(msg)?;
        let v4 = self.cfg.relay_ipv4.filter(|_| want_v4);
        let v6 = self.cfg.relay_ipv6.filter(|_| want_v6);
        if (want_v4 && v4.is_none() && !want_v6)
            || (want_v6 && !want_v4 && v6.is_none())
            || (v4.is_none() && v6.is_none())
        {
            return Err((440, "Address Family not Supported by this relay (configure a relay address of that family)"));
        }
        let lifetime = msg
            .u32_attr(attr::LIFETIME)
            .map(|s| Duration::from_secs(s as u64))
            .unwrap_or(self.cfg.default_lifetime)
            .clamp(self.cfg.default_lifetime, self.cfg.max_lifetime);
        Ok(AllocateRequest {
            v4,
            v6,
            family_error: want_v6 && want_v4 && v6.is_none(),
            even: even.is_some(),
            lifetime,
        })
    }

    /// Which families an Allocate wants: REQUESTED-ADDRESS-FAMILY or
    /// ADDITIONAL-ADDRESS-FAMILY (IPv6 besides IPv4), never both.
    fn requested_families(&self, msg: &Message<'_>) -> Result<(bool, bool), Refusal> {
        let family = |t| msg.get(t).map(|v| v.first().copied().unwrap_or(0));
        let requested = family(attr::REQUESTED_ADDRESS_FAMILY);
        let additional = family(attr::ADDITIONAL_ADDRESS_FAMILY);
        if requested.is_some() && additional.is_some() {
            return Err((
                400,
                "REQUESTED-ADDRESS-FAMILY and ADDITIONAL-ADDRESS-FAMILY together",
            ));
        }
        if additional.is_some_and(|f| f != 2) {
            return Err((400, "ADDITIONAL-ADDRESS-FAMILY must be IPv6 (0x02)"));
        }
        match (requested, additional) {
            (Some(1), _) => Ok((true, false)),
            // RFC 8656 says IPv4 by default; an IPv6-only relay serves IPv6
            // rather than refusing clients that did not ask.
            (None, None) => Ok((self.cfg.relay_ipv4.is_some(), self.cfg.relay_ipv4.is_none())),
            (Some(2), _) => Ok((false, true)),
            (None, Some(_)) => Ok((true, true)),
            (Some(_), _) => Err((
                440,
                "Address Family not Supported: REQUESTED-ADDRESS-FAMILY must be 1 or 2",
            )),
        }
    }

    /// Picks a port for one relayed socket (when `ip` is set) and queues the
    /// driver's bind in `binds`.
    fn reserve_relayed(
        &mut self,
        ip: Option<IpAddr>,
        token: RelayToken,
        even: bool,
        binds: &mut Vec<Event>,
    ) -> Option<Relayed> {
        let ip = ip?;
        let ports = if token.is_v6() {
            &mut self.ports_v6
        } else {
            &mut self.ports_v4
        };
        let range = self.cfg.port_range;
        let port = if even {
            pick_even_port(ports, range, &mut self.rng)
        } else {
            pick_port(ports, range, &mut self.rng)
        }?;
        binds.push(Event::BindRelay {
            token,
            addr: SocketAddr::new(ip, port.get()),
        });
        Some(Relayed {
            token,
            port,
            bound: None,
            attempts: 0,
        })
    }

    /// The driver's answer to [`Event::BindRelay`].
    pub fn relay_bound(
        &mut self,
        now: Instant,
        token: RelayToken,
        result: Result<SocketAddr, std::io::Error>,
    ) {
        let alive = self
            .slots
            .get(token.slot())
            .and_then(|s| s.as_ref())
            .is_some_and(|a| a.gen == token.gen());
        if !alive {
            // Allocation gone meanwhile: release what was bound.
            if result.is_ok() {
                self.events.push_back(Event::ReleaseRelay { token });
            }
            return;
        }
        match result {
            Ok(addr) => self.relay_port_bound(now, token, addr),
            Err(e) => {
                tracing::debug!(error = %e, "relay port bind failed; trying another");
                self.relay_port_failed(token);
            }
        }
    }

    fn relay_port_bound(&mut self, now: Instant, token: RelayToken, addr: SocketAddr) {
        let live = self.quotas.live_ports(token.is_v6());
        live.set(AllocationPort(addr.port()), true);
        let Some(a) = self.slots[token.slot()].as_mut() else {
            return;
        };
        if let Some(r) = a.relayed_mut(token.is_v6()) {
            r.bound = Some(addr);
        }
        self.finish_allocate(now, token.slot());
    }

    /// A bind failed: try another port of the range, up to [`PORT_ATTEMPTS`].
    fn relay_port_failed(&mut self, token: RelayToken) {
        let (slot, v6) = (token.slot(), token.is_v6());
        let Some(r) = self.slots[slot].as_mut().and_then(|a| a.relayed_mut(v6)) else {
            return;
        };
        r.attempts += 1;
        let (attempts, failed) = (r.attempts, r.port);
        let (ports, ip) = if v6 {
            (&mut self.ports_v6, self.cfg.relay_ipv6)
        } else {
            (&mut self.ports_v4, self.cfg.relay_ipv4)
        };
        // The failed port is someone else's; forget it so the set stays small.
        ports.remove(&failed);
        let next = match ip {
            Some(ip) if attempts < PORT_ATTEMPTS => {
                pick_port(ports, self.cfg.port_range, &mut self.rng).map(|p| (ip, p))
            }
            _ => None,
        };
        let Some((ip, port)) = next else {
            return self.allocate_failed(slot);
        };
        if let Some(r) = self.slots[slot].as_mut().and_then(|a| a.relayed_mut(v6)) {
            r.port = port;
        }
        // Same token (same allocation); only the port changes.
        let addr = SocketAddr::new(ip, port.get());
        self.events.push_back(Event::BindRelay { token, addr });
    }

    /// No relayed port could be bound: the allocation goes, the client gets 508.
    fn allocate_failed(&mut self, slot: usize) {
        let a = self.slots[slot].as_ref().map(|a| {
            let (key, kind) = (a.key, a.integrity);
            (a.client, a.allocate_tid, key, kind, a.with_fingerprint)
        });
        self.remove_allocation(slot);
        if let Some((client, tid, key, kind, fp)) = a {
            let r = Reply {
                client,
                method: method::ALLOCATE,
                tid,
                fp,
                auth: Some((&key, kind)),
            };
            self.refuse(&r, 508, "no free relay port (widen --relay-ports)");
        }
    }

    /// Answers the Allocate once every relayed socket is bound.
    fn finish_allocate(&mut self, now: Instant, slot: usize) {
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

    /// Ends an allocation: its ports, quota and counters go, and the driver
    /// is told to close its relayed sockets.
    pub(super) fn remove_allocation(&mut self, slot: usize) {
        let Some(a) = self.slots.get_mut(slot).and_then(|s| s.take()) else {
            return;
        };
        self.by_client.remove(&a.client);
        self.events
            .extend(a.fast.iter().map(|&entry| Event::FastPath {
                entry,
                install: false,
            }));
        for (r, ports, live) in [
            (&a.v4, &mut self.ports_v4, self.quotas.live_ports(false)),
            (&a.v6, &mut self.ports_v6, self.quotas.live_ports(true)),
        ] {
            if let Some(r) = r {
                if let Some(b) = r.bound {
                    let port = AllocationPort(b.port());
                    ports.remove(&port);
                    live.set(port, false);
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

    /// The allocation of this 5-tuple: its slot and username.
    pub(super) fn existing(&self, client: ClientSocket) -> Option<(usize, String)> {
        let slot = *self.by_client.get(&client)?;
        self.slots[slot]
            .as_ref()
            .map(|a| (slot, a.username.clone()))
    }

    /// A request for an allocation this 5-tuple does not have: 437 once it
    /// authenticates.
    pub(super) fn mismatch(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        if let Some(auth) = self.authenticate(now, client, msg, None) {
            let reason = "Allocation Mismatch: no allocation for this 5-tuple";
            self.refuse(&Reply::to(client, msg).signed(&auth), 437, reason);
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

    /// Refresh: a new lifetime, or deletion with LIFETIME 0.
    pub(super) fn refresh(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let Some((slot, owner)) = self.existing(client) else {
            return self.mismatch(now, client, msg);
        };
        let Some(auth) = self.authenticate(now, client, msg, Some(&owner)) else {
            return;
        };
        let r = Reply::to(client, msg).signed(&auth);
        let requested = msg
            .u32_attr(attr::LIFETIME)
            .map(|s| Duration::from_secs(s as u64));
        if requested == Some(Duration::ZERO) {
            self.remove_allocation(slot);
            tracing::info!(client = %client.remote, "allocation deleted by client");
            return self.success_lifetime(&r, 0);
        }
        let lifetime = requested
            .unwrap_or(self.cfg.default_lifetime)
            .clamp(self.cfg.default_lifetime, self.cfg.max_lifetime);
        self.update_credentials(slot, &auth);
        if let Some(a) = self.slots[slot].as_mut() {
            a.expires = now + lifetime;
        }
        self.sync_fast_path(slot, now);
        self.success_lifetime(&r, lifetime.as_secs() as u32);
    }
}

/// REQUESTED-TRANSPORT must be present and UDP.
fn requested_transport(msg: &Message<'_>) -> Result<(), Refusal> {
    match msg
        .u32_attr(attr::REQUESTED_TRANSPORT)
        .map(|v| (v >> 24) as u8)
    {
        None => Err((400, "REQUESTED-TRANSPORT missing")),
        Some(17) => Ok(()),
        Some(6) => Err((
            442,
            "Unsupported Transport Protocol: TCP allocations (RFC 6062) are not offered; use UDP",
        )),
        Some(_) => Err((
            442,
            "Unsupported Transport Protocol: only UDP (17) is relayed",
        )),
    }
}

/// A free port of `lo..=hi`, starting at a random point.
fn pick_port(
    used: &mut HashSet<AllocationPort>,
    (lo, hi): (u16, u16),
    rng: &mut StdRng,
) -> Option<AllocationPort> {
    let span = (hi as u32).saturating_sub(lo as u32) + 1;
    if used.len() as u32 >= span {
        return None;
    }
    let start: u32 = rng.random::<u32>() % span;
    (0..span)
        .map(|i| AllocationPort((lo as u32 + (start + i) % span) as u16))
        .find(|&p| used.insert(p))
}

/// A free even port of `lo..=hi` (EVEN-PORT), starting at a random point.
fn pick_even_port(
    used: &mut HashSet<AllocationPort>,
    (lo, hi): (u16, u16),
    rng: &mut StdRng,
) -> Option<AllocationPort> {
    let span = (hi as u32).saturating_sub(lo as u32) + 1;
    let start: u32 = rng.random::<u32>() % span;
    (0..span)
        .map(|i| AllocationPort((lo as u32 + (start + i) % span) as u16))
        .find(|&p| p.get().is_multiple_of(2) && used.insert(p))
}
