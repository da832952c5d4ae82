//! Counters of one shard.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    /// Allocations created.
    pub allocations_created: AtomicU64,
    /// Allocations ended (deleted or expired).
    pub allocations_ended: AtomicU64,
    /// Permissions currently installed.
    pub permissions: AtomicU64,
    /// Channel bindings currently installed.
    pub channels: AtomicU64,
    /// Packets relayed client → peer.
    pub packets_to_peer: AtomicU64,
    /// Payload bytes relayed client → peer.
    pub bytes_to_peer: AtomicU64,
    /// Packets relayed peer → client.
    pub packets_to_client: AtomicU64,
    /// Payload bytes relayed peer → client.
    pub bytes_to_client: AtomicU64,
    /// Requests whose credentials failed (unknown user, wrong key, expired REST).
    pub auth_failures: AtomicU64,
    /// Peers refused by the peer policy (403).
    pub denied_peers: AtomicU64,
    /// Datagrams dropped: malformed, no allocation, no permission.
    pub dropped_invalid: AtomicU64,
    /// Datagrams dropped by the bandwidth cap.
    pub dropped_bandwidth: AtomicU64,
    /// Unauthenticated requests dropped by the per-source rate limit.
    pub dropped_rate_limited: AtomicU64,
    /// Unauthenticated answers dropped by the per-source byte budget or by
    /// `--strict-amplification`.
    pub dropped_amplification: AtomicU64,
    /// Binding answers sent without their optional RFC 5780 attributes
    /// because the full answer did not fit the byte budget.
    pub shrunk_amplification: AtomicU64,
    /// Stream (TCP/TLS) connections refused: relay or per-source limit.
    pub stream_refused: AtomicU64,
    /// Stream connections closed for not authenticating in time, or idle.
    pub stream_timeouts: AtomicU64,
    /// STUN Binding requests answered.
    pub binding_requests: AtomicU64,
}

pub(super) fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
