//! Prometheus counters of a signaling instance and the tiny HTTP listener
//! serving `/metrics` and `/healthz`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use relay::http::{self, Response};
use tokio::net::TcpListener;

/// Counters kept by the driver (the router keeps its own, merged on render).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open transport connections (registered or not).
    pub connections: AtomicU64,
    /// Connections accepted over QUIC, total.
    pub accepted_quic: AtomicU64,
    /// Connections accepted over TLS/TCP, total.
    pub accepted_tcp: AtomicU64,
    /// Connections refused: their address already had too many unregistered ones.
    pub refused_pending: AtomicU64,
    /// Registrations refused: bad proof of key possession.
    pub auth_failures: AtomicU64,
    /// Registrations refused: bad mesh token or name.
    pub token_failures: AtomicU64,
    /// Connections closed for malformed or oversized frames or protocol errors.
    pub protocol_errors: AtomicU64,
    /// Frames dropped because a connection's queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Cluster messages dropped (publisher queue full or undecodable input).
    pub cluster_dropped: AtomicU64,
    /// Cluster messages published.
    pub cluster_published: AtomicU64,
}

/// Values read from the router under its lock.
#[derive(Debug, Default)]
pub(crate) struct RouterGauges {
    pub(crate) registered: u64,
    pub(crate) routed: u64,
    pub(crate) undeliverable: u64,
    pub(crate) rate_limited: u64,
    pub(crate) presence_events: u64,
}

impl Metrics {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    pub(crate) fn render(&self, r: &RouterGauges) -> String {
        let mut s = String::new();
        let mut m = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                s,
                "# HELP wgice_signaling_{name} {help}\n# TYPE wgice_signaling_{name} {kind}\nwgice_signaling_{name} {v}"
            );
        };
        m(
            "connected_nodes",
            "gauge",
            "Nodes registered on this instance.",
            r.registered,
        );
        m(
            "connections",
            "gauge",
            "Open transport connections.",
            self.connections.load(Relaxed),
        );
        m(
            "accepted_quic_total",
            "counter",
            "Connections accepted over QUIC.",
            self.accepted_quic.load(Relaxed),
        );
        m(
            "accepted_tcp_total",
            "counter",
            "Connections accepted over TLS/TCP.",
            self.accepted_tcp.load(Relaxed),
        );
        m(
            "refused_pending_total",
            "counter",
            "Connections refused: too many unregistered ones from that address.",
            self.refused_pending.load(Relaxed),
        );
        m(
            "messages_routed_total",
            "counter",
            "Envelopes routed to a node or another instance.",
            r.routed,
        );
        m(
            "messages_undeliverable_total",
            "counter",
            "Envelopes for nodes not online.",
            r.undeliverable,
        );
        m(
            "drops_queue_full_total",
            "counter",
            "Frames dropped on a full per-connection queue.",
            self.dropped_queue_full.load(Relaxed),
        );
        m(
            "drops_rate_limited_total",
            "counter",
            "Frames dropped by the per-node rate limit.",
            r.rate_limited,
        );
        m(
            "presence_events_total",
            "counter",
            "Presence events sent to nodes.",
            r.presence_events,
        );
        m(
            "auth_failures_total",
            "counter",
            "Registrations refused for a bad proof of key possession.",
            self.auth_failures.load(Relaxed),
        );
        m(
            "token_failures_total",
            "counter",
            "Registrations refused for a bad mesh token.",
            self.token_failures.load(Relaxed),
        );
        m(
            "protocol_errors_total",
            "counter",
            "Connections closed for malformed input.",
            self.protocol_errors.load(Relaxed),
        );
        m(
            "cluster_published_total",
            "counter",
            "Messages published to the cluster bus.",
            self.cluster_published.load(Relaxed),
        );
        m(
            "cluster_dropped_total",
            "counter",
            "Cluster messages dropped.",
            self.cluster_dropped.load(Relaxed),
        );
        s
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until the task is dropped.
pub(crate) async fn serve_http(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let render = render.clone();
        tokio::spawn(http::serve(sock, move |req: http::Request| async move {
            match req.path.as_str() {
                "/metrics" => Response::ok(render()),
                "/healthz" => Response::ok("ok\n"),
                _ => Response::not_found("try /metrics or /healthz\n"),
            }
        }));
    }
}

/// Address printed for logs.
pub(crate) fn describe(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "off".to_string(), |a| a.to_string())
}
