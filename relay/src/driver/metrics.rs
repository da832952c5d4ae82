//! Prometheus `/metrics` and `/healthz` over a minimal HTTP/1.1 listener.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::{self, Response};
use crate::server::{Metrics, Quotas};

/// Renders the Prometheus text exposition of all shards.
pub fn render(shards: &[Arc<Metrics>], quotas: &Quotas) -> String {
    let sum = |f: fn(&Metrics) -> &std::sync::atomic::AtomicU64| -> u64 {
        shards.iter().map(|m| f(m).load(Ordering::Relaxed)).sum()
    };
    let mut out = String::with_capacity(2048);
    let mut metric = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    metric(
        "relay_allocations",
        "gauge",
        "TURN allocations currently held.",
        quotas.total() as u64,
    );
    metric(
        "relay_allocations_max",
        "gauge",
        "Configured max-allocations (0: unlimited; the relayed port range still bounds allocations).",
        quotas.max_total as u64,
    );
    metric(
        "relay_allocations_created_total",
        "counter",
        "TURN allocations created.",
        sum(|m| &m.allocations_created),
    );
    metric(
        "relay_allocations_ended_total",
        "counter",
        "TURN allocations deleted or expired.",
        sum(|m| &m.allocations_ended),
    );
    metric(
        "relay_permissions",
        "gauge",
        "Permissions currently installed.",
        sum(|m| &m.permissions),
    );
    metric(
        "relay_channels",
        "gauge",
        "Channel bindings currently installed.",
        sum(|m| &m.channels),
    );
    metric(
        "relay_packets_to_peer_total",
        "counter",
        "Packets relayed from clients to peers.",
        sum(|m| &m.packets_to_peer),
    );
    metric(
        "relay_bytes_to_peer_total",
        "counter",
        "Payload bytes relayed from clients to peers.",
        sum(|m| &m.bytes_to_peer),
    );
    metric(
        "relay_packets_to_client_total",
        "counter",
        "Packets relayed from peers to clients.",
        sum(|m| &m.packets_to_client),
    );
    metric(
        "relay_bytes_to_client_total",
        "counter",
        "Payload bytes relayed from peers to clients.",
        sum(|m| &m.bytes_to_client),
    );
    metric(
        "relay_auth_failures_total",
        "counter",
        "Requests whose credentials failed.",
        sum(|m| &m.auth_failures),
    );
    metric(
        "relay_denied_peers_total",
        "counter",
        "Peer addresses refused by the peer policy.",
        sum(|m| &m.denied_peers),
    );
    metric(
        "relay_dropped_invalid_total",
        "counter",
        "Datagrams dropped as malformed, unallocated or unpermitted.",
        sum(|m| &m.dropped_invalid),
    );
    metric(
        "relay_dropped_bandwidth_total",
        "counter",
        "Datagrams dropped by the per-allocation bandwidth cap.",
        sum(|m| &m.dropped_bandwidth),
    );
    metric(
        "relay_dropped_rate_limited_total",
        "counter",
        "Unauthenticated requests dropped by the per-source rate limit.",
        sum(|m| &m.dropped_rate_limited),
    );
    metric(
        "relay_dropped_amplification_total",
        "counter",
        "Unauthenticated answers dropped by the per-source byte budget or --strict-amplification.",
        sum(|m| &m.dropped_amplification),
    );
    metric(
        "relay_shrunk_amplification_total",
        "counter",
        "Binding answers sent without RFC 5780 attributes to stay within the per-source byte budget.",
        sum(|m| &m.shrunk_amplification),
    );
    metric(
        "relay_stream_refused_total",
        "counter",
        "TCP/TLS connections refused by the relay-wide or per-source connection limit.",
        sum(|m| &m.stream_refused),
    );
    metric(
        "relay_stream_timeouts_total",
        "counter",
        "TCP/TLS connections closed for not authenticating within 10 s, or for idling.",
        sum(|m| &m.stream_timeouts),
    );
    metric(
        "relay_binding_requests_total",
        "counter",
        "STUN Binding requests answered.",
        sum(|m| &m.binding_requests),
    );
    out
}

/// The `# HELP` and `# TYPE` lines of one metric.
fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Appends the XDP fast path's figures: what the kernel relayed (from the
/// program's per-allocation counters) and what it did with each packet.
pub fn render_xdp(out: &mut String, t: &super::xdp::XdpTotals) {
    head(
        out,
        "relay_xdp_packets_total",
        "counter",
        "Packets relayed by the XDP fast path (not in relay_packets_*).",
    );
    let _ = writeln!(
        out,
        "relay_xdp_packets_total{{direction=\"to_peer\"}} {}\nrelay_xdp_packets_total{{direction=\"to_client\"}} {}",
        t.packets_to_peer, t.packets_to_client
    );
    head(
        out,
        "relay_xdp_bytes_total",
        "counter",
        "Payload bytes relayed by the XDP fast path.",
    );
    let _ = writeln!(
        out,
        "relay_xdp_bytes_total{{direction=\"to_peer\"}} {}\nrelay_xdp_bytes_total{{direction=\"to_client\"}} {}",
        t.bytes_to_peer, t.bytes_to_client
    );
    head(
        out,
        "relay_xdp_bindings",
        "gauge",
        "Channel bindings installed in the XDP fast path.",
    );
    let _ = writeln!(out, "relay_xdp_bindings {}", t.bindings);
    head(
        out,
        "relay_xdp_map_errors_total",
        "counter",
        "Bindings the kernel maps refused (relayed in user space instead).",
    );
    let _ = writeln!(out, "relay_xdp_map_errors_total {}", t.map_errors);
    head(
        out,
        "relay_xdp_outcomes_total",
        "counter",
        "What the XDP program did with packets of installed bindings (pass_*: left to the kernel stack and user space).",
    );
    for (name, v) in super::xdp::OUTCOMES.iter().zip(t.outcomes) {
        let _ = writeln!(out, "relay_xdp_outcomes_total{{outcome=\"{name}\"}} {v}");
    }
}

/// Serves `/metrics` and `/healthz` on `addr` until shutdown; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    shards: Vec<Arc<Metrics>>,
    quotas: Arc<Quotas>,
    xdp: Option<Arc<super::xdp::Xdp>>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(addr).await?;
    let bound = l.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (s, _) = tokio::select! {
                r = l.accept() => match r { Ok(x) => x, Err(_) => continue },
                _ = shutdown.changed() => return,
            };
            let shards = shards.clone();
            let quotas = quotas.clone();
            let xdp = xdp.clone();
            tokio::spawn(http::serve(s, move |req: http::Request| async move {
                match req.path.as_str() {
                    "/metrics" => {
                        let mut text = render(&shards, &quotas);
                        if let Some(x) = &xdp {
                            render_xdp(&mut text, &x.totals());
                        }
                        Response::ok(text)
                    }
                    "/healthz" => Response::ok("ok\n"),
                    _ => Response::not_found("try /metrics or /healthz\n"),
                }
            }));
        }
    });
    Ok(bound)
}
