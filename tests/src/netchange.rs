//! Network-change drills (issue 12, item 5): a node roams to another router,
//! or its NAT forgets every mapping (conntrack flushed: what a NAT reboot or
//! a rebinding looks like), while pings cross the overlay. Shared by
//! `tests/tests/netchange_e2e.rs` and `examples/netchange_bench.rs`.

use std::time::{Duration, Instant};

use netsim::mesh::{Bins, MeshLab};
use netsim::nat::NatPreset;

use crate::ping_trace::{ping_trace, unix_now};

/// What breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drill {
    /// Node a, direct to b (both port-restricted), moves to a third
    /// port-restricted router: new LAN address, new public address.
    Roam,
    /// Node a relayed (symmetric NAT) moves to another symmetric router.
    RoamRelayed,
    /// a's port-restricted NAT forgets its mappings while a and b are direct.
    Rebind,
    /// a's symmetric NAT forgets its mappings while a is relayed.
    RebindRelayed,
}

impl Drill {
    /// Every drill.
    pub const ALL: [Drill; 4] = [
        Drill::Roam,
        Drill::RoamRelayed,
        Drill::Rebind,
        Drill::RebindRelayed,
    ];

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Drill::Roam => "roam (direct)",
            Drill::RoamRelayed => "roam (relayed)",
            Drill::Rebind => "NAT rebinding (direct)",
            Drill::RebindRelayed => "NAT rebinding (relayed)",
        }
    }

    /// The path before and after.
    pub fn path(self) -> &'static str {
        match self {
            Drill::Roam | Drill::Rebind => "direct",
            Drill::RoamRelayed | Drill::RebindRelayed => "relay",
        }
    }

    fn preset(self) -> NatPreset {
        match self {
            Drill::Roam | Drill::Rebind => NatPreset::PortRestricted,
            Drill::RoamRelayed | Drill::RebindRelayed => NatPreset::Symmetric,
        }
    }
}

/// What a drill measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Seconds from the break to the first overlay ping answered after it.
    pub first_ping_s: Option<f64>,
    /// The longest silence in the overlay pings after the break.
    pub longest_gap_s: f64,
    /// Seconds from the break until a's status is back on the drill's path
    /// (for a roam: with a's new LAN address as the local end) for good,
    /// and pings flow.
    pub path_again_s: Option<f64>,
    /// a's status row for b at the end.
    pub row: serde_json::Value,
    /// a's Prometheus metrics at the end.
    pub metrics: String,
}

/// Runs `drill` once in a fresh lab.
pub fn run(bins: &Bins, drill: Drill) -> Outcome {
    let mut m = MeshLab::new(bins);
    let p = drill.preset();
    m.add_router("ra", p);
    // The relayed drills: two random symmetric NATs (no technique meets
    // them); the direct ones: two port-restricted cones.
    m.add_router("rb", p);
    m.add_router("rc", p);
    let a = m.add_node("a", "ra");
    let b = m.add_node("b", "rb");
    m.start_and_wait(&[a, b], drill.path());
    // Let the first burst of checks settle.
    std::thread::sleep(Duration::from_millis(500));
    let watch = Duration::from_secs(7);
    let (trace, t_break, samples, new_ip) = std::thread::scope(|sc| {
        let pinger = sc.spawn(|| ping_trace(&m, a, b, 10));
        std::thread::sleep(Duration::from_secs(2));
        let t_break = unix_now();
        let t0 = Instant::now();
        let new_ip = match drill {
            Drill::Roam | Drill::RoamRelayed => Some(m.lab.move_device("a", "rc").expect("move")),
            Drill::Rebind | Drill::RebindRelayed => {
                m.lab.flush_nat("ra").expect("flush");
                None
            }
        };
        let mut samples = Vec::new();
        while t0.elapsed() < watch {
            if let Some(row) = m.peer_status(a, b) {
                samples.push((t0.elapsed().as_secs_f64(), row));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (pinger.join().expect("ping"), t_break, samples, new_ip)
    });
    let on_path = |row: &serde_json::Value| {
        row["path"] == drill.path()
            && match (new_ip, drill) {
                (Some(ip), Drill::Roam) => row["local"]
                    .as_str()
                    .is_some_and(|l| l.starts_with(&format!("{ip}:"))),
                _ => true,
            }
    };
    // The first sample from which every later one is on the path.
    let mut path_at = None;
    for (t, row) in samples.iter().rev() {
        if on_path(row) {
            path_at = Some(*t);
        } else {
            break;
        }
    }
    let first_ping_s = trace.first_after(t_break);
    let path_again_s = match (path_at, first_ping_s) {
        (Some(p), Some(f)) => Some(p.max(f)),
        _ => None,
    };
    if std::env::var_os("WGICE_E2E_LOGS").is_some() {
        println!("{}", m.logs());
    }
    if std::env::var_os("WGICE_E2E_KEEP_LOGS").is_some() {
        m.keep_logs();
        println!("break at unix {t_break:.3}");
    }
    Outcome {
        first_ping_s,
        longest_gap_s: trace.longest_gap_after(t_break),
        path_again_s,
        row: samples.last().map(|(_, r)| r.clone()).unwrap_or_default(),
        metrics: m.metrics(a),
    }
}
