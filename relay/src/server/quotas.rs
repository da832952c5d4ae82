//! Quotas: allocations per user and in total, the live relayed ports and the
//! per-source budgets for unauthenticated answers (all shared by the shards,
//! [`Quotas`]), and the per-allocation bandwidth bucket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::metrics::inc;
use super::roles::AllocationPort;
use super::Server;
use crate::auth::SharedBuckets;

/// State shared by every shard: allocation quotas, the relayed ports held
/// right now, and the per-source budgets for unauthenticated answers.
#[derive(Debug)]
pub struct Quotas {
    /// Highest number of allocations in total (0 = unlimited).
    pub max_total: usize,
    /// Highest number of allocations per user (0 = unlimited).
    pub max_per_user: u32,
    pub(super) total: AtomicUsize,
    pub(super) per_user: Mutex<HashMap<String, u32>>,
    /// Relayed ports bound right now, all shards, one bitset per family: a
    /// peer on the relay's own address must be one of these (relay-to-relay),
    /// never another local socket that happens to sit in the range.
    pub(super) live_ports_v4: LivePorts,
    pub(super) live_ports_v6: LivePorts,
    /// Unauthenticated requests answered per source (thousandths of a request).
    pub(super) unauth_requests: SharedBuckets,
    /// Bytes of unauthenticated answers per source (the amplification budget).
    pub(super) unauth_bytes: SharedBuckets,
}

/// Slots of each per-source budget table (8 bytes each, shared by all shards).
pub(super) const SOURCE_SLOTS: usize = 16384;

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            max_total: 0,
            max_per_user: 0,
            total: AtomicUsize::new(0),
            per_user: Mutex::default(),
            live_ports_v4: LivePorts::default(),
            live_ports_v6: LivePorts::default(),
            unauth_requests: SharedBuckets::new(SOURCE_SLOTS),
            unauth_bytes: SharedBuckets::new(SOURCE_SLOTS),
        }
    }
}

/// A shared bitset of the 65,536 port numbers.
#[derive(Debug)]
pub(super) struct LivePorts(Box<[AtomicU64]>);

impl Default for LivePorts {
    fn default() -> Self {
        LivePorts((0..1024).map(|_| AtomicU64::new(0)).collect())
    }
}

impl LivePorts {
    pub(super) fn set(&self, port: AllocationPort, on: bool) {
        let port = port.get();
        let (w, b) = (port as usize / 64, 1u64 << (port % 64));
        if on {
            self.0[w].fetch_or(b, Ordering::Relaxed);
        } else {
            self.0[w].fetch_and(!b, Ordering::Relaxed);
        }
    }
    pub(super) fn contains(&self, port: AllocationPort) -> bool {
        let port = port.get();
        self.0[port as usize / 64].load(Ordering::Relaxed) & (1u64 << (port % 64)) != 0
    }
}

impl Quotas {
    /// Quotas with these limits (0 = unlimited).
    pub fn new(max_total: usize, max_per_user: u32) -> Self {
        Quotas {
            max_total,
            max_per_user,
            ..Default::default()
        }
    }

    /// The live relayed ports of one family.
    pub(super) fn live_ports(&self, v6: bool) -> &LivePorts {
        if v6 {
            &self.live_ports_v6
        } else {
            &self.live_ports_v4
        }
    }

    /// Allocations currently held, all shards.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    pub(super) fn acquire(&self, user: &str) -> Result<(), &'static str> {
        let user = principal(user);
        let mut per = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        if self.max_total > 0 && self.total.load(Ordering::Relaxed) >= self.max_total {
            return Err("relay is at its allocation limit (max-allocations)");
        }
        let n = per.entry(user.to_owned()).or_insert(0);
        if self.max_per_user > 0 && *n >= self.max_per_user {
            return Err("user is at its allocation limit (max-allocations-per-user)");
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn release(&self, user: &str) {
        let user = principal(user);
        let mut per = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                per.remove(user);
            }
        }
        self.total.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Server {
    /// One more unauthenticated answer to `ip`: the per-source request rate
    /// (shared by every shard). Counted and logged when refused.
    pub(super) fn allow_unauth(&self, ip: IpAddr, now_ms: u32) -> bool {
        let (rate, burst) = self.cfg.unauth_rate;
        let ok = self.quotas.unauth_requests.take(
            ip,
            now_ms,
            1000,
            (rate * 1000.0) as u32,
            (burst * 1000.0) as u32,
        );
        if !ok {
            inc(&self.metrics.dropped_rate_limited, 1);
            tracing::debug!(source = %ip, "unauthenticated request over the per-source rate; dropped");
        }
        ok
    }

    /// Pays for an unauthenticated answer of `len` bytes to `ip` from the
    /// per-source byte budget; with strict amplification it must also be no
    /// larger than the request. False: do not send it (the caller counts).
    pub(super) fn pay_unauth(
        &self,
        ip: IpAddr,
        now_ms: u32,
        len: usize,
        request_len: usize,
    ) -> bool {
        if self.cfg.strict_amplification && len > request_len {
            return false;
        }
        let (rate, burst) = self.cfg.unauth_bytes;
        self.quotas
            .unauth_bytes
            .take(ip, now_ms, len.min(u32::MAX as usize) as u32, rate, burst)
    }
}

/// Who a username stands for: the user part of a REST name (`expiry:user`),
/// otherwise the name itself. Quotas count per principal, so a client cannot
/// escape the per-user quota by minting names with other expiries, and
/// credential rotation keeps the count with the same principal.
pub(super) fn principal(name: &str) -> &str {
    match name.split_once(':') {
        Some((expiry, user)) if expiry.parse::<u64>().is_ok() => user,
        _ => name,
    }
}

/// Same user for credential rotation: equal names, or REST names (`expiry:user`)
/// with the same user part.
pub(super) fn same_principal(a: &str, b: &str) -> bool {
    a == b || principal(a) == principal(b) && a.contains(':') && b.contains(':')
}

/// An allocation's bandwidth token bucket (both directions together).
#[derive(Debug)]
pub(super) struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A bucket for `limit` bytes/s holding a quarter second's worth.
    pub(super) fn new(limit: u64, now: Instant) -> Self {
        Bucket {
            tokens: limit as f64 / 4.0,
            last: now,
        }
    }

    /// Takes `bytes` under `limit` bytes/s; false when over the cap.
    pub(super) fn take(&mut self, bytes: usize, now: Instant, limit: u64) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        // Burst: a quarter second of traffic.
        self.tokens = (self.tokens + dt * limit as f64).min(limit as f64 / 4.0 + 65536.0);
        if self.tokens >= bytes as f64 {
            self.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}
