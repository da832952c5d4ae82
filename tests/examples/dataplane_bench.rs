//! Data-plane benchmark (needs root: netsim namespaces, wireguard-go,
//! iperf3). Issue 11's numbers, all from one lab in one run:
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p wgice-tests --example dataplane_bench [-- --rounds N --secs S]
//! ```
//!
//! Four nodes on two routers without NAT (routable LAN addresses): a and b
//! run wireguard-go beside their agents (external mode), c and d run their
//! agents in embedded mode; a, c sit behind one router, b, d behind the
//! other. Per round, alternating so all see the same machine load:
//!
//! - plain wireguard-go a → b (agents stopped, endpoints set by hand);
//! - external mode a → b; embedded mode c → d (direct paths);
//! - the same two relayed (UDP between the routers dropped);
//!
//! each iperf3 TCP with 1 and 4 streams. Printed beside them: the physical
//! references of this run (iperf3 between the LAN addresses, no WireGuard;
//! ChaCha20-Poly1305 sealing per core with ring), the data-plane processes'
//! CPU seconds per GB, the ratios the issue sets targets for, and the time
//! to the first ping answer in embedded mode vs. external mode.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netsim::nat::NatPreset;
use wgice_tests::mesh::{s, Bins, MeshLab};

fn arg(name: &str, default: u32) -> u32 {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// ChaCha20-Poly1305 seal throughput on one core (bytes/s), `len`-byte
/// messages, through ring (the AEAD boringtun uses for data).
fn chacha_per_core(len: usize) -> f64 {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).expect("key"));
    let mut buf = vec![0u8; len];
    let start = Instant::now();
    let mut n = 0u64;
    let mut bytes = 0u64;
    while start.elapsed() < Duration::from_millis(700) {
        for _ in 0..64 {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&n.to_le_bytes());
            n += 1;
            let _ = key.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut buf,
            );
            bytes += len as u64;
        }
    }
    bytes as f64 / start.elapsed().as_secs_f64()
}

/// CPU seconds (user + system) of every process whose command line
/// contains one of `needles`.
fn cpu_of(needles: &[String]) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return f64::NAN;
    };
    for e in dir.flatten() {
        let p = e.path();
        let Ok(cmd) = std::fs::read(p.join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !needles.iter().any(|n| cmd.contains(n.as_str())) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(p.join("stat")) else {
            continue;
        };
        // Fields after the ")" that closes the command name.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let (ut, st) = (
            f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0),
            f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0),
        );
        total += (ut + st) / tick;
    }
    total
}

/// One iperf3 run: Mbit/s and the data plane's CPU seconds per GB.
fn measure(
    m: &MeshLab,
    from: usize,
    to: usize,
    secs: u32,
    streams: u32,
    procs: &[String],
) -> (f64, f64) {
    let c0 = cpu_of(procs);
    let mbit = m.iperf(from, to, secs, streams).unwrap_or(f64::NAN);
    let c1 = cpu_of(procs);
    let gb = mbit * 1e6 * f64::from(secs) / 8.0 / 1e9;
    (mbit, (c1 - c0) / gb)
}

/// The underlay: iperf3 between the LAN addresses (no WireGuard).
fn underlay(m: &MeshLab, from: usize, to: usize, secs: u32) -> f64 {
    let (ok, out) = m
        .lab
        .exec(
            &m.nodes[from].name,
            &[
                s("iperf3"),
                s("-c"),
                s(m.nodes[to].lan_ip),
                s("-t"),
                s(secs),
                s("-J"),
            ],
        )
        .expect("iperf3");
    if !ok {
        return f64::NAN;
    }
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v["end"]["sum_received"]["bits_per_second"].as_f64())
        .map_or(f64::NAN, |b| b / 1e6)
}

fn set_plain(m: &MeshLab, x: usize, y: usize, on: bool) {
    let mut args = vec![
        s("set"),
        m.nodes[x].ifname.clone(),
        s("peer"),
        m.nodes[y].public_key.clone(),
    ];
    if on {
        args.extend([
            s("endpoint"),
            format!("{}:51820", m.nodes[y].lan_ip),
            s("allowed-ips"),
            format!("{}/32", m.nodes[y].overlay),
        ]);
    } else {
        args.push(s("remove"));
    }
    m.wg(x, &args);
}

#[derive(Default)]
struct Series {
    mbit: Vec<f64>,
    cpu: Vec<f64>,
}

impl Series {
    fn push(&mut self, (mbit, cpu): (f64, f64)) {
        self.mbit.push(mbit);
        self.cpu.push(cpu);
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Seconds from starting both agents to the first ping answer, and to the
/// status saying `want`.
fn first_ping(bins: &Bins, embedded: bool, pa: NatPreset, pb: NatPreset, want: &str) -> (f64, f64) {
    let mut m = MeshLab::new(bins);
    m.add_router("ra", pa);
    m.add_router("rb", pb);
    let (a, b) = if embedded {
        (
            m.add_embedded_node("a", "ra"),
            m.add_embedded_node("b", "rb"),
        )
    } else {
        (m.add_node("a", "ra"), m.add_node("b", "rb"))
    };
    let t0 = unix_now();
    let start = Instant::now();
    m.start_agent(a);
    m.start_agent(b);
    m.lab
        .spawn(
            "ping",
            &m.nodes[a].name,
            &[
                s("ping"),
                s("-D"),
                s("-n"),
                s("-i"),
                s("0.02"),
                s("-W"),
                s("1"),
                s("-c"),
                s(500),
                s(m.nodes[b].overlay),
            ],
            &[],
            &m.dir,
        )
        .expect("ping");
    let path_at = m
        .wait_path(a, b, want, Duration::from_secs(10))
        .map_or(f64::NAN, |_| start.elapsed().as_secs_f64());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(m.dir.join("ping.stdout")).unwrap_or_default();
        let first = log
            .lines()
            .filter(|l| l.contains("bytes from"))
            .find_map(|l| l.strip_prefix('[')?.split(']').next()?.parse::<f64>().ok());
        if let Some(t) = first {
            return (t - t0, path_at);
        }
        if Instant::now() > deadline {
            return (f64::NAN, path_at);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let rounds = arg("--rounds", 3) as usize;
    let secs = arg("--secs", 4);
    wgice_tests::require_root();
    let bins = wgice_tests::bins();
    println!(
        "data-plane benchmark: {rounds} rounds, iperf3 {secs} s, 2 cores shared by every node"
    );

    let chacha_mtu = chacha_per_core(1420);
    let chacha_64k = chacha_per_core(65536);

    let mut m = MeshLab::new(&bins);
    m.add_router("ra", NatPreset::None);
    m.add_router("rb", NatPreset::None);
    let a = m.add_node("a", "ra");
    let b = m.add_node("b", "rb");
    let c = m.add_embedded_node("c", "ra");
    let d = m.add_embedded_node("d", "rb");
    m.iperf_server(b);
    m.iperf_server(d);
    let ext_procs: Vec<String> = [a, b]
        .iter()
        .flat_map(|&i| {
            [
                format!("wireguard-go -f {}", m.nodes[i].ifname),
                m.nodes[i].config.display().to_string(),
            ]
        })
        .collect();
    let wg_procs: Vec<String> = ext_procs
        .iter()
        .filter(|p| p.starts_with("wireguard-go"))
        .cloned()
        .collect();
    let emb_procs: Vec<String> = [c, d]
        .iter()
        .map(|&i| m.nodes[i].config.display().to_string())
        .collect();

    let mut veth = Vec::new();
    let (mut plain1, mut plain4) = (Series::default(), Series::default());
    let (mut ext1, mut ext4, mut emb1, mut emb4) = (
        Series::default(),
        Series::default(),
        Series::default(),
        Series::default(),
    );
    m.start_agent(c);
    m.start_agent(d);
    m.wait_path(c, d, "direct", Duration::from_secs(15))
        .expect("embedded direct");
    for r in 0..rounds {
        veth.push(underlay(&m, a, b, secs));
        set_plain(&m, a, b, true);
        set_plain(&m, b, a, true);
        assert!(m.ping(a, b, 2), "plain WireGuard does not work");
        plain1.push(measure(&m, a, b, secs, 1, &wg_procs));
        plain4.push(measure(&m, a, b, secs, 4, &wg_procs));
        set_plain(&m, a, b, false);
        set_plain(&m, b, a, false);
        if r == 0 {
            m.start_agent(a);
            m.start_agent(b);
        } else {
            m.restart_agent(a);
            m.restart_agent(b);
        }
        m.wait_path(a, b, "direct", Duration::from_secs(15))
            .expect("external direct");
        m.wait_path(b, a, "direct", Duration::from_secs(15))
            .expect("external direct");
        assert!(m.ping(a, b, 2), "external mode does not work");
        ext1.push(measure(&m, a, b, secs, 1, &ext_procs));
        emb1.push(measure(&m, c, d, secs, 1, &emb_procs));
        ext4.push(measure(&m, a, b, secs, 4, &ext_procs));
        emb4.push(measure(&m, c, d, secs, 4, &emb_procs));
        // The agents remove their peers on exit: plain WireGuard next round.
        assert_eq!(m.stop_agent(a), Some(0));
        assert_eq!(m.stop_agent(b), Some(0));
        println!(
            "round {r}: veth {:.0} | plain {:.0}/{:.0} | external {:.0}/{:.0} | embedded {:.0}/{:.0} Mbit/s (1/4 streams)",
            veth[r], plain1.mbit[r], plain4.mbit[r], ext1.mbit[r], ext4.mbit[r], emb1.mbit[r], emb4.mbit[r]
        );
    }
    // Lever by lever: the embedded pair restarted with each offload set.
    let mut levers = Vec::new();
    for set in [
        "none",
        "tso",
        "tso,coalesce",
        "tso,coalesce,gso",
        "tso,coalesce,gso,gro",
    ] {
        let env = [(s("WGICE_OFFLOADS"), s(set))];
        m.restart_agent_env(c, &env);
        m.restart_agent_env(d, &env);
        m.wait_path(c, d, "direct", Duration::from_secs(15))
            .expect("embedded direct");
        m.wait_path(d, c, "direct", Duration::from_secs(15))
            .expect("embedded direct");
        if !m.ping_within(c, d, Duration::from_secs(8)) {
            println!(
                "offloads {set}: no ping answer (logs in {})",
                m.dir.display()
            );
            continue;
        }
        let one = measure(&m, c, d, secs, 1, &emb_procs);
        let four = measure(&m, c, d, secs, 4, &emb_procs);
        println!(
            "offloads {set:<22}: {:.0}/{:.0} Mbit/s (1/4 streams), {:.1}/{:.1} CPU s/GB",
            one.0, four.0, one.1, four.1
        );
        levers.push((set, one, four));
    }
    drop(m);

    // Relayed: routers with NAT (the relay refuses to relay to the
    // benchmarking range the routers above hand out), the direct path cut
    // between them, both pairs on the relay.
    let mut m = MeshLab::new(&bins);
    m.add_router("ra", NatPreset::PortRestricted);
    m.add_router("rb", NatPreset::PortRestricted);
    let a = m.add_node("a", "ra");
    let b = m.add_node("b", "rb");
    let c = m.add_embedded_node("c", "ra");
    let d = m.add_embedded_node("d", "rb");
    m.iperf_server(b);
    m.iperf_server(d);
    let procs = |nodes: &[usize], wg: bool| {
        let mut v: Vec<String> = nodes
            .iter()
            .map(|&i| m.nodes[i].config.display().to_string())
            .collect();
        if wg {
            v.extend(
                nodes
                    .iter()
                    .map(|&i| format!("wireguard-go -f {}", m.nodes[i].ifname)),
            );
        }
        v.push(s(bins.relay.display()));
        v
    };
    let (ext_relay, emb_relay) = (procs(&[a, b], true), procs(&[c, d], false));
    for i in [a, b, c, d] {
        m.start_agent(i);
    }
    m.wait_path(a, b, "direct", Duration::from_secs(15))
        .expect("external direct");
    m.wait_path(c, d, "direct", Duration::from_secs(15))
        .expect("embedded direct");
    m.cut_direct("ra", "rb");
    for (x, y) in [(a, b), (b, a), (c, d), (d, c)] {
        m.wait_path(x, y, "relay", Duration::from_secs(15))
            .expect("relay");
    }
    let (mut ext_r1, mut ext_r4, mut emb_r1, mut emb_r4) = (
        Series::default(),
        Series::default(),
        Series::default(),
        Series::default(),
    );
    let relay_only = [s(bins.relay.display())];
    let mut relay_share = Vec::new();
    for r in 0..rounds {
        let r0 = cpu_of(&relay_only);
        let e0 = cpu_of(&emb_relay);
        emb_r4.push(measure(&m, c, d, secs, 4, &emb_relay));
        relay_share.push((cpu_of(&relay_only) - r0) / (cpu_of(&emb_relay) - e0));
        ext_r1.push(measure(&m, a, b, secs, 1, &ext_relay));
        emb_r1.push(measure(&m, c, d, secs, 1, &emb_relay));
        ext_r4.push(measure(&m, a, b, secs, 4, &ext_relay));
        println!(
            "round {r} relayed: external {:.0}/{:.0} | embedded {:.0}/{:.0} Mbit/s (1/4 streams)",
            ext_r1.mbit[r], ext_r4.mbit[r], emb_r1.mbit[r], emb_r4.mbit[r]
        );
    }

    let mut first = Vec::new();
    for (embedded, pa, pb, want) in [
        (false, NatPreset::Symmetric, NatPreset::Symmetric, "relay"),
        (true, NatPreset::Symmetric, NatPreset::Symmetric, "relay"),
        (
            false,
            NatPreset::PortRestricted,
            NatPreset::PortRestricted,
            "direct",
        ),
        (
            true,
            NatPreset::PortRestricted,
            NatPreset::PortRestricted,
            "direct",
        ),
    ] {
        let (p, path) = first_ping(&bins, embedded, pa, pb, want);
        first.push((embedded, want, p, path));
    }

    let md = |s: &Series| median(s.mbit.clone());
    let cpu = |s: &Series| median(s.cpu.clone());
    println!("\nphysical references (this run):");
    println!(
        "  veth + routers, TCP, no WireGuard: {:.0} Mbit/s",
        median(veth.clone())
    );
    println!(
        "  ChaCha20-Poly1305 (ring) per core: {:.2} GB/s at 1420 B, {:.2} GB/s at 64 KiB",
        chacha_mtu / 1e9,
        chacha_64k / 1e9
    );
    println!("\n| path | streams | plain wireguard-go | external | embedded | CPU s/GB plain / ext / emb |");
    println!("|---|---|---|---|---|---|");
    for (name, n, p, e, b) in [
        ("direct", 1, Some(&plain1), &ext1, &emb1),
        ("direct", 4, Some(&plain4), &ext4, &emb4),
        ("relayed", 1, None, &ext_r1, &emb_r1),
        ("relayed", 4, None, &ext_r4, &emb_r4),
    ] {
        println!(
            "| {name} | {n} | {} | {:.0} Mbit/s | {:.0} Mbit/s | {} / {:.1} / {:.1} |",
            p.map_or("-".into(), |p| format!("{:.0} Mbit/s", md(p))),
            md(e),
            md(b),
            p.map_or("-".into(), |p| format!("{:.1}", cpu(p))),
            cpu(e),
            cpu(b)
        );
    }
    println!("\nratios (medians; targets from issue 11):");
    let ratio = |x: f64, y: f64| x / y;
    for (what, v, target) in [
        (
            "embedded direct / plain wireguard-go, 1 stream",
            ratio(md(&emb1), md(&plain1)),
            "≥ 3.5",
        ),
        (
            "embedded direct / plain wireguard-go, 4 streams",
            ratio(md(&emb4), md(&plain4)),
            "≥ 3.5",
        ),
        (
            "external / plain wireguard-go, 1 stream",
            ratio(md(&ext1), md(&plain1)),
            "≥ 0.9",
        ),
        (
            "external / plain wireguard-go, 4 streams",
            ratio(md(&ext4), md(&plain4)),
            "≥ 0.9",
        ),
        (
            "embedded relayed / embedded direct, 1 stream",
            ratio(md(&emb_r1), md(&emb1)),
            "≥ 0.6",
        ),
        (
            "embedded relayed / embedded direct, 4 streams",
            ratio(md(&emb_r4), md(&emb4)),
            "≥ 0.6",
        ),
        (
            "embedded direct / veth (no WireGuard), 1 stream",
            ratio(md(&emb1), median(veth.clone())),
            "(physical)",
        ),
    ] {
        println!("  {what}: {v:.2} (target {target})");
    }
    println!(
        "  (relayed, embedded, 4 streams: the relay process used {:.0} % of the data-plane CPU)",
        100.0 * median(relay_share.clone())
    );
    println!("\nembedded direct, lever by lever (WGICE_OFFLOADS), ratio to plain wireguard-go:");
    for (set, one, four) in &levers {
        println!(
            "  {set:<22} {:>5.0} Mbit/s ({:.2}x)  {:>5.0} Mbit/s ({:.2}x)  {:.1} / {:.1} CPU s/GB",
            one.0,
            one.0 / md(&plain1),
            four.0,
            four.0 / md(&plain4),
            one.1,
            four.1
        );
    }
    println!("\ntime to first ping answer (from both agents started):");
    for (embedded, want, p, path) in first {
        println!(
            "  {:<8} {want:<6}: first ping {p:.3} s, status {want} at {path:.3} s",
            if embedded { "embedded" } else { "external" }
        );
    }
}
