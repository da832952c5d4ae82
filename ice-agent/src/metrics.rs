//! The agent's Prometheus listener (`agent.metrics`): `GET /metrics` renders
//! a snapshot of the agent (the one the control socket serves, with
//! WireGuard's counters), `GET /healthz` answers `ok`. HTTP is
//! [`relay::http`], shared with the relay and the signaling server.

use std::net::SocketAddr;

use relay::http::{self, Request, Response};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::control::{full_snapshot, Queries, RelayStatus, Snapshot};
use crate::daemon::DaemonError;
use crate::status::PeerStatus;
use crate::wgowner::WgOwner;

/// Listens on `addr` and serves until the task is aborted.
pub(crate) async fn start(
    addr: SocketAddr,
    ctl: Queries,
    wg: WgOwner,
) -> Result<JoinHandle<()>, DaemonError> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Metrics { addr, source })?;
    Ok(tokio::spawn(serve(l, ctl, wg)))
}

async fn serve(l: TcpListener, ctl: Queries, wg: WgOwner) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let ctl = ctl.clone();
        let wg = wg.clone();
        tokio::spawn(http::serve(s, move |req: Request| async move {
            answer(&req, &ctl, &wg).await
        }));
    }
}

/// The routes. Unlike the relay's and signaling's, only `GET` is answered,
/// and a path is matched by its start (`/metrics?x` is `/metrics`).
async fn answer(req: &Request, ctl: &Queries, wg: &WgOwner) -> Response {
    let get = |path: &str| req.method == "GET" && req.path.starts_with(path);
    if get("/metrics") {
        match full_snapshot(ctl, wg).await {
            Some(snap) => Response::ok(render_metrics(&snap)),
            None => Response::unavailable("shutting down\n"),
        }
    } else if get("/healthz") {
        Response::ok("ok\n")
    } else {
        Response::not_found("try /metrics or /healthz\n")
    }
}

/// A peer's labels: `peer` is its certificate name when it has one (names
/// are checked to be label-safe), with the key beside it; else its key.
fn peer_labels(p: &PeerStatus) -> String {
    match &p.name {
        Some(n) => format!("peer=\"{n}\",key=\"{}\"", p.public_key),
        None => format!("peer=\"{}\"", p.public_key),
    }
}

fn render_metrics(snap: &Snapshot) -> String {
    use std::fmt::Write as _;
    let s = &snap.status;
    let mut o = String::new();
    let head = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    // One labelled sample per peer (skipping peers without a value).
    let per_peer = |o: &mut String,
                    name: &str,
                    kind: &str,
                    help: &str,
                    value: &dyn Fn(&PeerStatus) -> Option<f64>| {
        head(o, name, kind, help);
        for p in &s.peers {
            if let Some(v) = value(p) {
                let _ = writeln!(o, "{name}{{{}}} {v}", peer_labels(p));
            }
        }
    };
    head(
        &mut o,
        "wgice_peer_path",
        "gauge",
        "1 for the path each peer is on (connecting, lan, direct, relay).",
    );
    for p in &s.peers {
        for kind in ["connecting", "lan", "direct", "relay"] {
            let on = serde_json::to_value(p.path)
                .ok()
                .and_then(|v| v.as_str().map(|x| x == kind))
                .unwrap_or(false);
            let _ = writeln!(
                o,
                "wgice_peer_path{{{},path=\"{kind}\"}} {}",
                peer_labels(p),
                u8::from(on)
            );
        }
    }
    per_peer(
        &mut o,
        "wgice_peer_rtt_seconds",
        "gauge",
        "Last STUN round trip on the peer's path.",
        &|p| p.rtt_ms.map(|r| r / 1000.0),
    );
    per_peer(
        &mut o,
        "wgice_peer_rx_bytes_total",
        "counter",
        "Bytes received from the peer (WireGuard's counter).",
        &|p| Some(p.rx_bytes as f64),
    );
    per_peer(
        &mut o,
        "wgice_peer_tx_bytes_total",
        "counter",
        "Bytes sent to the peer (WireGuard's counter).",
        &|p| Some(p.tx_bytes as f64),
    );
    per_peer(
        &mut o,
        "wgice_peer_path_changes_total",
        "counter",
        "Path changes of the peer.",
        &|p| Some(p.path_changes as f64),
    );
    per_peer(
        &mut o,
        "wgice_peer_failovers_total",
        "counter",
        "Direct paths that stopped answering (fell back to the relay).",
        &|p| Some(snap.failovers.get(&p.public_key).copied().unwrap_or(0) as f64),
    );
    let retries = snap.totals.direct_retries;
    head(
        &mut o,
        "wgice_direct_retries_total",
        "counter",
        "Times direct checks failed and were retried (ICE failures).",
    );
    let _ = writeln!(o, "wgice_direct_retries_total {retries}");
    head(
        &mut o,
        "wgice_network_changes_total",
        "counter",
        "Network changes the kernel reported (one per burst of link, address or default-route events).",
    );
    let _ = writeln!(o, "wgice_network_changes_total {}", snap.network_changes);
    head(
        &mut o,
        "wgice_ice_restarts_total",
        "counter",
        "Peer sessions restarted because a relay saw us at a new public address (roamed or rebound).",
    );
    let _ = writeln!(o, "wgice_ice_restarts_total {}", snap.ice_restarts);
    let t = &snap.totals;
    head(
        &mut o,
        "wgice_blackhole_verdicts_total",
        "counter",
        "Direct pairs left as blackholes, by kind (data: checks answered but data dropped; mtu: large datagrams dropped; peer: the peer's verdict).",
    );
    for (kind, n) in [
        ("data", t.blackhole_data),
        ("mtu", t.blackhole_mtu),
        ("peer", t.blackhole_peer),
    ] {
        let _ = writeln!(o, "wgice_blackhole_verdicts_total{{kind=\"{kind}\"}} {n}");
    }
    head(
        &mut o,
        "wgice_port_predictions_total",
        "counter",
        "Peer sessions that predicted a sequential symmetric NAT's ports.",
    );
    let _ = writeln!(o, "wgice_port_predictions_total {}", t.predictions);
    head(
        &mut o,
        "wgice_punch_attempts_total",
        "counter",
        "Coordinated punch attempts with peers whose NAT is sequential symmetric like ours.",
    );
    let _ = writeln!(o, "wgice_punch_attempts_total {}", t.punch_attempts);
    head(
        &mut o,
        "wgice_punch_openers_total",
        "counter",
        "Openers those attempts sent (at most 24 per attempt, to the peer's own address).",
    );
    let _ = writeln!(o, "wgice_punch_openers_total {}", t.punch_openers);
    head(
        &mut o,
        "wgice_birthday_attempts_total",
        "counter",
        "Birthday probing attempts (a random symmetric NAT against an endpoint-independent one), either side.",
    );
    let _ = writeln!(o, "wgice_birthday_attempts_total {}", t.birthday_attempts);
    head(
        &mut o,
        "wgice_birthday_probes_total",
        "counter",
        "Birthday probes sent (at most 4000 per attempt at 400 a second, to the peer's own address).",
    );
    let _ = writeln!(o, "wgice_birthday_probes_total {}", t.birthday_probes);
    // One labelled sample per relay (skipping relays without a value).
    let per_relay = |o: &mut String,
                     name: &str,
                     kind: &str,
                     help: &str,
                     value: &dyn Fn(&RelayStatus) -> Option<f64>| {
        head(o, name, kind, help);
        for r in &s.relays {
            if let Some(v) = value(r) {
                let _ = writeln!(o, "{name}{{relay=\"{}\"}} {v}", r.server);
            }
        }
    };
    per_relay(
        &mut o,
        "wgice_relay_rtt_seconds",
        "gauge",
        "Median round trip of the last STUN probes to each relay.",
        &|r| r.rtt_ms.map(|ms| ms / 1000.0),
    );
    per_relay(
        &mut o,
        "wgice_relay_active",
        "gauge",
        "1 for the relay relayed paths use, 0 for the others.",
        &|r| Some(f64::from(u8::from(r.active))),
    );
    per_relay(
        &mut o,
        "wgice_relay_down",
        "gauge",
        "1 while a relay is declared down (probes unanswered).",
        &|r| Some(f64::from(u8::from(r.down))),
    );
    head(
        &mut o,
        "wgice_signaling_connected",
        "gauge",
        "1 while the signaling connection is up.",
    );
    let _ = writeln!(o, "wgice_signaling_connected {}", u8::from(s.signaling));
    head(
        &mut o,
        "wgice_dropped_total",
        "counter",
        "Input dropped, by reason.",
    );
    for (why, v) in s.dropped.by_reason() {
        let _ = writeln!(o, "wgice_dropped_total{{reason=\"{why}\"}} {v}");
    }
    o
}
