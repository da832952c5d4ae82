//! Blackhole recovery benchmark (needs root: netsim namespaces,
//! wireguard-go).
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p wgice-tests --example blackhole_bench [-- --rounds N]
//! ```
//!
//! Each round builds a fresh lab (two port-restricted NATs, agents in
//! external mode, direct path), pings through the overlay every 50 ms and
//! puts a blackhole on the direct path at one router: WireGuard data
//! dropped (STUN passes), or datagrams above 1300 bytes dropped with
//! full-size (1392-byte ICMP) pings. Recovery is the time from the
//! blackhole to the first ping answered again; the target is 3 s.
//!
//! Probe overhead: bytes of non-data UDP (STUN: ICE checks and blackhole
//! probes) crossing the direct path, counted by an nftables rule, over
//! 10 s idle, 10 s of small pings and 10 s of full-size pings (blackhole
//! probes go only while data flows, full-size ones only while large
//! datagrams do; ICE keepalives go always).

use std::time::Duration;

use netsim::impair::Blackhole;
use netsim::nat::NatPreset;
use wgice_tests::mesh::{s, Bins, MeshLab};

fn lab(bins: &Bins) -> (MeshLab, usize, usize) {
    let mut m = MeshLab::new(bins);
    let (a, b) = m.pair(NatPreset::PortRestricted, NatPreset::PortRestricted);
    m.start_and_wait(&[a, b], "direct");
    (m, a, b)
}

fn round(bins: &Bins, bh: Blackhole, size: u32) -> Option<f64> {
    let (m, a, b) = lab(bins);
    let d = m.blackhole_drill(a, b, bh, size);
    let kind = d.row_a.as_ref().map(|r| r["blackhole"]["kind"].clone());
    println!(
        "  {bh:?}: recovered {:?}, status relay {:?}, {} drops, kind {kind:?}",
        d.recovered, d.status_relay, d.drops
    );
    d.recovered.map(|r| r.as_secs_f64())
}

/// Bytes of non-data UDP between router `ra` and `wan_b`, both directions.
fn stun_bytes(m: &MeshLab) -> u64 {
    let (_, out) = m
        .lab
        .exec(
            "ra",
            &[s("nft"), s("list"), s("table"), s("inet"), s("wgicemeter")],
        )
        .expect("nft list");
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "bytes")
        .filter_map(|w| w[1].parse::<u64>().ok())
        .sum()
}

fn overhead(bins: &Bins) -> (f64, f64, f64) {
    let (m, a, b) = lab(bins);
    let wan_b = m.lab.router_wan_ip("rb").expect("wan");
    let rules = format!(
        "table inet wgicemeter {{\n chain m {{\n  type filter hook forward priority -10; policy accept;\n  \
         ip daddr {wan_b} meta l4proto udp @th,64,8 != 0x04 counter\n  \
         ip saddr {wan_b} meta l4proto udp @th,64,8 != 0x04 counter\n }}\n}}\n"
    );
    let file = m.path("meter.nft");
    std::fs::write(&file, rules).expect("write");
    let (ok, out) = m
        .lab
        .exec("ra", &[s("nft"), s("-f"), s(file.display())])
        .expect("nft");
    assert!(ok, "{out}");
    let secs = 10.0;
    std::thread::sleep(Duration::from_secs(3));
    let b0 = stun_bytes(&m);
    std::thread::sleep(Duration::from_secs_f64(secs));
    let idle = (stun_bytes(&m) - b0) as f64 * 8.0 / secs / 1000.0;
    let ping = |size: u32| {
        // Pings every 50 ms for the same time (ping -c 200 -i 0.05).
        let before = stun_bytes(&m);
        let (ok, _) = m
            .lab
            .exec(
                &m.nodes[a].name,
                &[
                    s("ping"),
                    s("-q"),
                    s("-i"),
                    s("0.05"),
                    s("-s"),
                    s(size),
                    s("-c"),
                    s(200),
                    s(m.nodes[b].overlay),
                ],
            )
            .expect("ping");
        assert!(ok, "pings failed\n{}", m.logs());
        (stun_bytes(&m) - before) as f64 * 8.0 / secs / 1000.0
    };
    let small = ping(56);
    let full = ping(1392);
    (idle, small, full)
}

fn stats(v: &[f64]) -> (f64, f64) {
    let mut v: Vec<f64> = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let median = if v.is_empty() {
        f64::NAN
    } else if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (median, v.last().copied().unwrap_or(f64::NAN))
}

fn main() {
    wgice_tests::require_root();
    let bins = wgice_tests::bins();
    let rounds: usize = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut rows = Vec::new();
    for (label, bh, size) in [
        (
            "data blackhole (WireGuard data dropped)",
            Blackhole::WireguardData,
            56,
        ),
        (
            "MTU blackhole (> 1300 B dropped, 1452 B packets)",
            Blackhole::Above(1300),
            1392,
        ),
    ] {
        println!("{label}: {rounds} rounds");
        let mut v = Vec::new();
        let mut failed = 0;
        for _ in 0..rounds {
            match round(&bins, bh, size) {
                Some(t) => v.push(t),
                None => failed += 1,
            }
        }
        let (median, worst) = stats(&v);
        rows.push((label, median, worst, failed));
    }
    println!("overhead: 10 s idle, then 10 s of pings every 50 ms, small and full-size");
    let (idle, small, full) = overhead(&bins);
    println!();
    println!("| measure | median | worst | target |");
    println!("|---|---|---|---|");
    for (label, median, worst, failed) in rows {
        let fail = if failed > 0 {
            format!(" ({failed} rounds never recovered)")
        } else {
            String::new()
        };
        println!(
            "| {label}: blackhole → pings answered again, {rounds} rounds{fail} | {median:.2} s | {worst:.2} s | ≤ 3 s |"
        );
    }
    println!(
        "| STUN on the direct path, both directions: idle (ICE keepalives) | {idle:.1} kbit/s | | |\n\
         | … 56-byte pings every 50 ms (small blackhole probes) | {small:.1} kbit/s (+{:.1}) | | |\n\
         | … 1392-byte pings every 50 ms (small and full-size probes) | {full:.1} kbit/s (+{:.1}) | | |",
        small - idle,
        full - idle
    );
}
