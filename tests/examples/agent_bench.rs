//! ice-agent benchmark (needs root: netsim namespaces, wireguard-go).
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p wgice-tests --example agent_bench [-- --rounds N]
//! ```
//!
//! Measures, on netsim links without added delay:
//! - time from both agents started to the first ping answered through the
//!   overlay (which needs a completed WireGuard handshake), relayed
//!   (two random symmetric NATs) and direct (port-restricted ↔
//!   port-restricted), plus the time until the status says `direct`;
//! - failover: direct path cut at the NAT → status `relay`, and the gap in
//!   ping answers (20 ms interval);
//! - external-mode proxy overhead: iperf3 over plain WireGuard (endpoints
//!   set by hand) vs. through the agents, same lab, same link.

use std::process::Command;
use std::time::{Duration, Instant};

use netsim::nat::NatPreset;
use wgice_tests::mesh::{s, Bins, MeshLab};
use wgice_tests::ping_trace::{reply_times, unix_now};

fn start_ping(m: &MeshLab, from: usize, to: usize, name: &str, count: u32) {
    m.lab
        .spawn(
            name,
            &m.nodes[from].name,
            &[
                s("ping"),
                s("-D"),
                s("-n"),
                s("-i"),
                s("0.02"),
                s("-W"),
                s("1"),
                s("-c"),
                s(count),
                s(m.nodes[to].overlay),
            ],
            &[],
            &m.dir,
        )
        .expect("spawn ping");
}

fn ping_log(m: &MeshLab, name: &str) -> String {
    std::fs::read_to_string(m.dir.join(format!("{name}.stdout"))).unwrap_or_default()
}

struct Connect {
    first_reply: f64,
    direct_at: Option<f64>,
}

fn connect_time(bins: &Bins, pa: NatPreset, pb: NatPreset, want: &str) -> Connect {
    let mut m = MeshLab::new(bins);
    let (a, b) = m.pair(pa, pb);
    let t0 = unix_now();
    let start = Instant::now();
    m.start_agent(a);
    m.start_agent(b);
    start_ping(&m, a, b, "ping", 500);
    let mut direct_at = None;
    if want == "direct" {
        if let Ok((_, _)) = m.wait_path(a, b, "direct", Duration::from_secs(10)) {
            direct_at = Some(start.elapsed().as_secs_f64());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        if let Some(t) = reply_times(&ping_log(&m, "ping")).first() {
            break *t - t0;
        }
        if Instant::now() > deadline {
            break f64::NAN;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Connect {
        first_reply: first,
        direct_at,
    }
}

struct Failover {
    status: f64,
    gap: f64,
}

fn failover(bins: &Bins) -> Failover {
    let mut m = MeshLab::new(bins);
    let (a, b) = m.pair(NatPreset::PortRestricted, NatPreset::PortRestricted);
    m.start_agent(a);
    m.start_agent(b);
    m.wait_path(a, b, "direct", Duration::from_secs(15))
        .expect("direct");
    m.wait_path(b, a, "direct", Duration::from_secs(15))
        .expect("direct");
    start_ping(&m, a, b, "ping", 400);
    std::thread::sleep(Duration::from_secs(1));
    let cut_at = unix_now();
    let start = Instant::now();
    m.cut_direct("ra", "rb");
    let mut status = f64::NAN;
    while start.elapsed() < Duration::from_secs(10) {
        if m.peer_status(a, b).is_some_and(|r| r["path"] == "relay") {
            status = start.elapsed().as_secs_f64();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(3));
    let times = reply_times(&ping_log(&m, "ping"));
    let gap = times
        .iter()
        .find(|t| **t > cut_at + 0.05)
        .map(|t| t - cut_at)
        .unwrap_or(f64::NAN);
    Failover { status, gap }
}

fn iperf(m: &MeshLab, from: usize, to: usize, secs: u32) -> f64 {
    let (ok, out) = m
        .lab
        .exec(
            &m.nodes[from].name,
            &[
                s("iperf3"),
                s("-c"),
                s(m.nodes[to].overlay),
                s("-t"),
                s(secs),
                s("-J"),
            ],
        )
        .expect("iperf3");
    if !ok {
        eprintln!("iperf3 failed: {out}");
        return f64::NAN;
    }
    let v: serde_json::Value = match serde_json::from_str(&out) {
        Ok(v) => v,
        Err(_) => return f64::NAN,
    };
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(f64::NAN)
        / 1e6
}

/// iperf3 over plain WireGuard and through the agents, alternating in one
/// lab (`rounds` pairs), so both see the same link and the same load.
fn overhead(bins: &Bins, secs: u32, rounds: usize) -> (Vec<f64>, Vec<f64>) {
    let mut m = MeshLab::new(bins);
    let (a, b) = m.pair(NatPreset::None, NatPreset::None);
    m.lab
        .spawn(
            "iperf-server",
            &m.nodes[b].name,
            &[s("iperf3"), s("-s")],
            &[],
            &m.dir,
        )
        .expect("iperf3 -s");
    let (mut plain, mut agent) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Plain WireGuard: endpoints and allowed IPs by hand.
        for (x, y) in [(a, b), (b, a)] {
            m.wg(
                x,
                &[
                    s("set"),
                    m.nodes[x].ifname.clone(),
                    s("peer"),
                    m.nodes[y].public_key.clone(),
                    s("endpoint"),
                    format!("{}:51820", m.nodes[y].lan_ip),
                    s("allowed-ips"),
                    format!("{}/32", m.nodes[y].overlay),
                ],
            );
        }
        assert!(m.ping(a, b, 3), "plain WireGuard does not work");
        plain.push(iperf(&m, a, b, secs));
        for (x, y) in [(a, b), (b, a)] {
            m.wg(
                x,
                &[
                    s("set"),
                    m.nodes[x].ifname.clone(),
                    s("peer"),
                    m.nodes[y].public_key.clone(),
                    s("remove"),
                ],
            );
        }
        // Through the agents (they create the peers and remove them on exit).
        if round == 0 {
            m.start_agent(a);
            m.start_agent(b);
        } else {
            m.restart_agent(a);
            m.restart_agent(b);
        }
        m.wait_path(a, b, "direct", Duration::from_secs(15))
            .expect("direct");
        m.wait_path(b, a, "direct", Duration::from_secs(15))
            .expect("direct");
        assert!(m.ping(a, b, 3), "overlay through the agents does not work");
        agent.push(iperf(&m, a, b, secs));
        assert_eq!(m.stop_agent(a), Some(0));
        assert_eq!(m.stop_agent(b), Some(0));
        println!(
            "iperf round {round}: plain {:.0} Mbit/s, through the agents {:.0} Mbit/s",
            plain[round], agent[round]
        );
    }
    (plain, agent)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(5);
    let only_iperf = std::env::args().any(|a| a == "--iperf-only");
    wgice_tests::require_root();
    let bins = wgice_tests::bins();
    let cores = Command::new("nproc")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!("ice-agent benchmark, {rounds} rounds, {cores} cores");

    if only_iperf {
        let (plain, agent) = overhead(&wgice_tests::bins(), 5, rounds);
        let (p, a) = (median(plain), median(agent));
        println!(
            "median plain {p:.0} Mbit/s, agents {a:.0} Mbit/s, ratio {:.2}",
            a / p
        );
        return;
    }
    let mut relayed = Vec::new();
    let mut direct_first = Vec::new();
    let mut direct_path = Vec::new();
    for r in 0..rounds {
        let c = connect_time(&bins, NatPreset::Symmetric, NatPreset::Symmetric, "relay");
        println!(
            "round {r}: relayed  first ping answer {:.3} s",
            c.first_reply
        );
        relayed.push(c.first_reply);
        let c = connect_time(
            &bins,
            NatPreset::PortRestricted,
            NatPreset::PortRestricted,
            "direct",
        );
        println!(
            "round {r}: direct   first ping answer {:.3} s, status direct at {:.3} s",
            c.first_reply,
            c.direct_at.unwrap_or(f64::NAN)
        );
        direct_first.push(c.first_reply);
        direct_path.push(c.direct_at.unwrap_or(f64::NAN));
    }
    let mut fo_status = Vec::new();
    let mut fo_gap = Vec::new();
    for r in 0..rounds {
        let f = failover(&bins);
        println!(
            "round {r}: failover status relay after {:.3} s, ping answers again after {:.3} s",
            f.status, f.gap
        );
        fo_status.push(f.status);
        fo_gap.push(f.gap);
    }
    let (plain_v, agent_v) = overhead(&bins, 5, 3);
    let ratios: Vec<f64> = plain_v.iter().zip(&agent_v).map(|(p, a)| a / p).collect();
    let (plain, agent) = (median(plain_v), median(agent_v));
    let max = |v: &[f64]| {
        v.iter()
            .copied()
            .filter(|x| x.is_finite())
            .fold(f64::NAN, f64::max)
    };
    println!();
    println!("| measure | median | worst | target |");
    println!("|---|---|---|---|");
    let row = |what: &str, v: &[f64], target: &str| {
        println!(
            "| {what} | {:.3} s | {:.3} s | {target} |",
            median(v.to_vec()),
            max(v)
        );
    };
    row(
        "agents started → first ping answered, relayed",
        &relayed,
        "≤ 1 s",
    );
    row(
        "agents started → first ping answered, direct NATs",
        &direct_first,
        "≤ 1.5 s",
    );
    row("agents started → status `direct`", &direct_path, "≤ 1.5 s");
    row("direct cut → status `relay`", &fo_status, "≤ 3 s");
    row("direct cut → ping answered again", &fo_gap, "≤ 3 s");
    let rmin = ratios.iter().copied().fold(f64::NAN, f64::min);
    let rmax = ratios.iter().copied().fold(f64::NAN, f64::max);
    println!(
        "| iperf3 plain WireGuard (wireguard-go), median of 3 | {plain:.0} Mbit/s | | |\n\
         | iperf3 through the agents (external mode, proxy), median of 3 | {agent:.0} Mbit/s | | |\n\
         | ratio agent / plain per round | {:.2} (median) | {rmin:.2}–{rmax:.2} | |",
        median(ratios.clone())
    );
}
