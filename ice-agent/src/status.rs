//! What `ice-agent status` shows: one row per peer, as a table or as JSON
//! (`--json`: an array of objects with `public_key`, `path`, `reason`,
//! `local`, `remote`, `rtt_ms`, `rx_bytes`, `tx_bytes`, …).

use std::fmt::Write as _;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{PathKind, PathReport};

/// One peer's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's WireGuard public key (base64).
    pub public_key: String,
    /// `connecting`, `lan`, `direct` or `relay`.
    pub path: PathKind,
    /// Why the peer is on this path.
    pub reason: String,
    /// Our side of the pair.
    pub local: Option<SocketAddr>,
    /// The peer's side of the pair.
    pub remote: Option<SocketAddr>,
    /// Round-trip time on the pair, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// WireGuard bytes received from the peer.
    pub rx_bytes: u64,
    /// WireGuard bytes sent to the peer.
    pub tx_bytes: u64,
    /// Seconds on the current path.
    pub since_secs: u64,
    /// Path changes since the agent started.
    pub path_changes: u64,
    /// Addresses routed to the peer (its overlay).
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    /// The peer's name, from its verified membership certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Why the peer routes less than it asks for (no or a refused
    /// certificate, addresses held by another peer or quarantined).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership: Option<String>,
    /// Why a direct pair was left as a blackhole (`kind`: `data` or
    /// `mtu`, `largest_ok`, `pair`, `by_peer`, `retry_in_secs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blackhole: Option<crate::BlackholeReport>,
    /// The peer's NAT as its netcheck measured it and published it
    /// ("endpoint-dependent … mapping, random ports, …").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<String>,
}

impl PeerStatus {
    /// A row from a session's path report and the byte counters.
    pub fn new(
        public_key: String,
        report: PathReport,
        rx_bytes: u64,
        tx_bytes: u64,
        path_changes: u64,
    ) -> Self {
        PeerStatus {
            public_key,
            path: report.path,
            reason: report.reason,
            local: report.local,
            remote: report.remote,
            rtt_ms: report.rtt_ms,
            rx_bytes,
            tx_bytes,
            since_secs: report.since_secs,
            path_changes,
            allowed_ips: Vec::new(),
            name: None,
            membership: None,
            blackhole: report.blackhole,
            nat: None,
        }
    }
}

fn path_name(p: PathKind) -> &'static str {
    match p {
        PathKind::Connecting => "connecting",
        PathKind::Lan => "lan",
        PathKind::Direct => "direct",
        PathKind::Relay => "relay",
    }
}

fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Renders the human table: one line per peer, the reason on its own line
/// beneath (reasons are sentences; a column would truncate them).
pub fn render_table(peers: &[PeerStatus]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<10} {:<23} {:<23} {:>8} {:>10} {:>10}",
        "PEER", "PATH", "LOCAL", "REMOTE", "RTT", "RX", "TX"
    );
    let addr = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    for p in peers {
        let key: String = match &p.name {
            Some(n) if n.chars().count() <= 11 => n.clone(),
            Some(n) => n.chars().take(10).collect::<String>() + "…",
            None => p.public_key.chars().take(10).collect::<String>() + "…",
        };
        let rtt = p
            .rtt_ms
            .map(|r| format!("{r:.1}ms"))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<12} {:<10} {:<23} {:<23} {:>8} {:>10} {:>10}",
            key,
            path_name(p.path),
            addr(p.local),
            addr(p.remote),
            rtt,
            bytes(p.rx_bytes),
            bytes(p.tx_bytes)
        );
        let ips = if p.allowed_ips.is_empty() {
            String::new()
        } else {
            format!("{} · ", p.allowed_ips.join(", "))
        };
        let _ = writeln!(
            out,
            "             └ {ips}{} (for {} s)",
            p.reason, p.since_secs
        );
        if let Some(m) = &p.membership {
            let _ = writeln!(out, "             └ {m}");
        }
        if let Some(n) = &p.nat {
            let _ = writeln!(out, "             └ peer's NAT: {n}");
        }
    }
    if peers.is_empty() {
        out.push_str("(no peers yet)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(path: PathKind, reason: &str) -> PeerStatus {
        PeerStatus {
            public_key: "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=".into(),
            path,
            reason: reason.into(),
            local: Some("10.0.1.5:51821".parse().expect("addr")),
            remote: Some("10.0.1.7:51821".parse().expect("addr")),
            rtt_ms: Some(0.42),
            rx_bytes: 123_456,
            tx_bytes: 42,
            since_secs: 17,
            path_changes: 2,
            allowed_ips: vec!["10.8.0.2/32".into()],
            name: None,
            membership: None,
            blackhole: None,
            nat: None,
        }
    }

    #[test]
    fn json_has_the_documented_fields() {
        let v = serde_json::to_value(vec![row(PathKind::Lan, "direct (LAN 10.0.1.0/24)")])
            .expect("json");
        let o = &v[0];
        for k in [
            "public_key",
            "path",
            "reason",
            "local",
            "remote",
            "rtt_ms",
            "rx_bytes",
            "tx_bytes",
        ] {
            assert!(o.get(k).is_some(), "missing {k}: {o}");
        }
        assert_eq!(o["path"], "lan");
        assert_eq!(o["local"], "10.0.1.5:51821");
        let back: Vec<PeerStatus> = serde_json::from_value(v).expect("round trip");
        assert_eq!(back[0].path, PathKind::Lan);
    }

    #[test]
    fn table_shows_path_and_reason() {
        let t = render_table(&[row(PathKind::Relay, "relayed: no direct pair answered")]);
        assert!(
            t.contains("relay")
                && t.contains("└ 10.8.0.2/32 · relayed: no direct pair answered (for 17 s)"),
            "{t}"
        );
        assert!(t.contains("120.6 KiB"), "{t}");
        assert!(render_table(&[]).contains("no peers yet"));
    }
}
