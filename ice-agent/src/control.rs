//! The control socket behind `ice-agent status`: the [`Status`] a running
//! agent reports, the listener that serves it (owner-only Unix socket, one
//! `status` line in, one JSON [`ControlReply`] out), and the client side
//! ([`query_status`], [`render_status`]).
//!
//! The daemon's main loop answers each query with a snapshot of the agent;
//! the listener adds WireGuard's byte counters from the wg thread. The
//! metrics listener (`/metrics`) renders the same snapshot.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::agent::{Agent, DropCounters, PeerKey};
use crate::daemon::DaemonError;
use crate::dataplane::DataPlane;
use crate::status::{render_table, PeerStatus};
use crate::wgowner::WgOwner;

/// The status the control socket serves.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// WireGuard interface.
    pub interface: String,
    /// `external` or `embedded`.
    #[serde(default)]
    pub mode: String,
    /// Our public key.
    pub public_key: String,
    /// The agent socket's port.
    pub port: u16,
    /// Whether signaling is connected.
    pub signaling: bool,
    /// Relays: server, relayed addresses, mapped address, problem, RTT,
    /// which one relayed paths use.
    pub relays: Vec<RelayStatus>,
    /// The last move of relayed paths between relays ("moved from relay A
    /// to B: A silent 0.6 s").
    #[serde(default)]
    pub relay_note: Option<String>,
    /// Peers.
    pub peers: Vec<PeerStatus>,
    /// Dropped input, by reason.
    pub dropped: DropCounters,
    /// Most peers the agent manages (`agent.max_peers`).
    #[serde(default)]
    pub max_peers: usize,
    /// Whether membership certificates are required (a CA is pinned).
    #[serde(default)]
    pub certificates: bool,
    /// Port mapping at the gateway (PCP / NAT-PMP): the mapped address or
    /// why there is none; `None` when turned off.
    #[serde(default)]
    pub port_mapping: Option<String>,
    /// The last network change the kernel reported ("2.1 s ago: address
    /// 192.168.2.2 added on eth0 (+2 more changes)"); `None` before the first.
    #[serde(default)]
    pub network: Option<String>,
    /// Our NAT as the background netcheck measured it (what peers are
    /// told, plus our public addresses); `None` until the first run ends.
    #[serde(default)]
    pub nat: Option<crate::netcheck::NatFacts>,
    /// Seconds since `nat` was measured.
    #[serde(default)]
    pub nat_age_secs: Option<u64>,
}

/// One relay in [`Status`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RelayStatus {
    /// Server address.
    pub server: SocketAddr,
    /// Our relayed addresses there.
    pub relayed: Vec<SocketAddr>,
    /// Our address as the relay sees it.
    pub mapped: Option<SocketAddr>,
    /// Why it is not usable, if it is not.
    pub problem: Option<String>,
    /// How it is reached when not over UDP: "TLS 443 — UDP to the relay
    /// blocked", "TCP 3478".
    #[serde(default)]
    pub transport: Option<String>,
    /// Median RTT of the last five STUN probes, milliseconds.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// Relayed paths use this relay (lowest latency, healthy, sticky).
    #[serde(default)]
    pub active: bool,
    /// Declared down (probes unanswered, silent).
    #[serde(default)]
    pub down: bool,
}

/// What the main loop answers a query with: the status, and the counters
/// only `/metrics` shows.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) status: Status,
    /// Failovers per peer (base64 key).
    pub(crate) failovers: HashMap<String, u64>,
    /// Session counters over all sessions so far.
    pub(crate) totals: crate::agent::SessionTotals,
    /// Network changes the kernel reported.
    pub(crate) network_changes: u64,
    /// Sessions restarted because our public address changed.
    pub(crate) ice_restarts: u64,
}

/// The channel on which the listeners ask the main loop for a [`Snapshot`].
pub(crate) type Queries = mpsc::Sender<oneshot::Sender<Snapshot>>;

/// The agent's state now, as the main loop sees it (WireGuard's byte
/// counters are added by [`full_snapshot`], off the main loop).
pub(crate) fn snapshot(
    agent: &Agent,
    plane: &DataPlane,
    interface: &str,
    port: u16,
    signaling: bool,
) -> Snapshot {
    let now = Instant::now();
    let rows = agent.status(now);
    let mut dropped = agent.drops();
    let mut mode = "external";
    if let DataPlane::Embedded(e) = plane {
        let c = &e.dev.counters;
        mode = "embedded";
        dropped.wg_rejected = c.wg_rejected.load(Ordering::Relaxed);
        dropped.wg_bad_source = c.wg_bad_source.load(Ordering::Relaxed);
    }
    let (choice, relay_note) = agent.relay_choice();
    let failovers = rows
        .iter()
        .map(|(_, r, f)| (r.public_key.clone(), *f))
        .collect();
    Snapshot {
        status: Status {
            interface: interface.to_owned(),
            mode: mode.into(),
            public_key: agent.public_key().to_string(),
            port,
            signaling,
            relays: agent
                .relay_status()
                .into_iter()
                .map(|(server, relayed, mapped, problem, transport)| {
                    let c = choice.iter().find(|c| c.server == server);
                    RelayStatus {
                        server,
                        relayed,
                        mapped,
                        problem,
                        transport,
                        rtt_ms: c.and_then(|c| c.rtt).map(|d| d.as_secs_f64() * 1e3),
                        active: c.is_some_and(|c| c.active),
                        down: c.is_some_and(|c| c.down),
                    }
                })
                .collect(),
            relay_note,
            peers: rows.into_iter().map(|(_, r, _)| r).collect(),
            dropped,
            max_peers: agent.max_peers(),
            port_mapping: agent.port_mapping().map(str::to_owned),
            network: agent
                .network_change(now)
                .map(|(ago, why)| format!("{:.1} s ago: {why}", ago.as_secs_f64())),
            certificates: agent.certificates_required(),
            nat: agent.nat_facts().map(|(f, _)| f.clone()),
            nat_age_secs: agent
                .nat_facts()
                .map(|(_, at)| now.saturating_duration_since(at).as_secs()),
        },
        failovers,
        totals: agent.session_totals(),
        network_changes: agent.network_changes(),
        ice_restarts: agent.address_restarts(),
    }
}

/// Asks the main loop for a snapshot and adds WireGuard's byte counters
/// (waiting at most 3 s for them). `None` once the agent is shutting down.
pub(crate) async fn full_snapshot(ctl: &Queries, wg: &WgOwner) -> Option<Snapshot> {
    let (tx, rx) = oneshot::channel();
    ctl.send(tx).await.ok()?;
    let mut snap = rx.await.ok()?;
    if let Some(rx) = wg.counters() {
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(3), rx).await {
            for p in &mut snap.status.peers {
                let key = p.public_key.parse::<PeerKey>().ok();
                if let Some((rx_b, tx_b, _)) = key.and_then(|k| c.get(&k)) {
                    p.rx_bytes = *rx_b;
                    p.tx_bytes = *tx_b;
                }
            }
        }
    }
    Some(snap)
}

/// Binds the control socket at `path` (owner-only) and serves it until the
/// task is aborted.
pub(crate) fn start(path: &Path, ctl: Queries, wg: WgOwner) -> Result<JoinHandle<()>, DaemonError> {
    let l = bind(path)?;
    Ok(tokio::spawn(serve(l, ctl, wg)))
}

fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| DaemonError::Control {
            path: path.to_owned(),
            what: "cannot create its directory",
            source,
        })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::ControlInUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    // Created owner-only from the start (no window with looser rights).
    // SAFETY: umask has no preconditions; restored right after the bind.
    let old = unsafe { libc::umask(0o077) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = bound.map_err(|source| DaemonError::Control {
        path: path.to_owned(),
        what: "cannot bind",
        source,
    })?;
    // Status names peers and addresses: owner only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        DaemonError::Control {
            path: path.to_owned(),
            what: "cannot make it owner-only",
            source,
        }
    })?;
    Ok(l)
}

async fn serve(l: UnixListener, ctl: Queries, wg: WgOwner) {
    loop {
        let Ok((stream, _)) = l.accept().await else {
            continue;
        };
        let ctl = ctl.clone();
        let wg = wg.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut r = BufReader::new(r.take(256));
            if tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
                .await
                .is_err()
            {
                return;
            }
            let reply = match line.trim() {
                "status" => match full_snapshot(&ctl, &wg).await {
                    Some(s) => ControlReply::Status(Box::new(s.status)),
                    None => ControlReply::Error("the agent is shutting down".into()),
                },
                other => ControlReply::Error(format!(
                    "unknown command {:?} (the control socket answers \"status\")",
                    other.chars().take(64).collect::<String>()
                )),
            };
            let text = serde_json::to_string(&reply).unwrap_or_default() + "\n";
            let _ = w.write_all(text.as_bytes()).await;
        });
    }
}

/// What the control socket answers (one JSON document per connection).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ControlReply {
    /// The agent's status.
    Status(Box<Status>),
    /// The agent could not answer, and why.
    Error(String),
}

/// Why `ice-agent status` got no status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Nothing listens on the control socket.
    #[error("cannot reach the agent at {path}: {source} (is `ice-agent up` running? pass --control or --interface)")]
    Unreachable {
        /// The control socket.
        path: std::path::PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The connection failed midway.
    #[error("talking to the agent: {0}")]
    Io(#[from] io::Error),
    /// The agent answered with an error.
    #[error("the agent says: {0}")]
    Agent(String),
    /// The answer is not a control reply (another program on the socket, or
    /// an agent of another version).
    #[error("not an ice-agent control reply: {0}")]
    BadReply(String),
}

/// Asks a running agent for its status over the control socket.
pub fn query_status(control: &Path) -> Result<Status, ControlError> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(control).map_err(|source| {
        ControlError::Unreachable {
            path: control.to_owned(),
            source,
        }
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"status\n")?;
    let mut out = String::new();
    s.take(16 << 20).read_to_string(&mut out)?;
    match serde_json::from_str(&out) {
        Ok(ControlReply::Status(st)) => Ok(*st),
        Ok(ControlReply::Error(e)) => Err(ControlError::Agent(e)),
        Err(e) => Err(ControlError::BadReply(e.to_string())),
    }
}

/// The status as `ice-agent status` prints it: the summary lines, then one
/// row per peer.
pub fn render_status(s: &Status) -> String {
    summary(s) + &render_table(&s.peers)
}

/// The lines above the peer table: who we are, signaling, relays.
fn summary(s: &Status) -> String {
    let mode = match s.mode.as_str() {
        "embedded" => "  (embedded WireGuard)",
        _ => "",
    };
    let mut out = format!(
        "interface {}{mode}  public key {}  agent port {}\nsignaling: {}\n",
        s.interface,
        s.public_key,
        s.port,
        if s.signaling {
            "connected"
        } else {
            "not connected (reconnecting; tunnels stay up)"
        }
    );
    out += &format!(
        "membership: {}; {} peers (at most {}){}\n",
        if s.certificates {
            "certificates required (CA pinned)"
        } else {
            "unauthenticated (no CA pinned: first come, first served)"
        },
        s.peers.len(),
        s.max_peers,
        match s.dropped.peer_limit {
            0 => String::new(),
            n => format!(", {n} members refused at the limit"),
        }
    );
    match &s.port_mapping {
        Some(p) => out += &format!("port mapping: {p}\n"),
        None => out += "port mapping: off ([ice] port_mapping = false)\n",
    }
    if let Some(n) = &s.network {
        out += &format!("network changed {n}\n");
    }
    match (&s.nat, s.nat_age_secs) {
        (Some(n), Some(age)) => out += &format!("NAT: {} (measured {age} s ago)\n", n.summary()),
        _ => {
            out += "NAT: not measured yet (a background netcheck runs 0.5 s after start; it needs a relay reachable over UDP)\n"
        }
    }
    for r in &s.relays {
        let state = match (&r.problem, r.relayed.is_empty()) {
            (Some(p), _) => format!("unusable: {p}"),
            (None, false) => format!(
                "relayed {}",
                r.relayed
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            (None, true) => "allocating".to_owned(),
        };
        let mapped = r
            .mapped
            .map(|m| format!(", we appear as {m}"))
            .unwrap_or_default();
        let over = r
            .transport
            .as_ref()
            .map(|t| format!(" over {t}"))
            .unwrap_or_default();
        let mut health = String::new();
        if let Some(rtt) = r.rtt_ms {
            health += &format!(", rtt {rtt:.1} ms");
        }
        if r.down {
            health += ", down (not answering)";
        }
        if r.active {
            health += ", active";
        }
        out += &format!("relay {}: {state}{over}{mapped}{health}\n", r.server);
    }
    if let Some(note) = &s.relay_note {
        out += &format!("relays: {note}\n");
    }
    out.push('\n');
    out
}
