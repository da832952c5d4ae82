//! Relay failover benchmark (needs root: netsim namespaces, wireguard-go).
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p wgice-tests --example relay_failover_bench [-- --rounds N] [--no-before]
//! ```
//!
//! Two relays on public hosts of their own, two nodes behind symmetric NATs
//! (every path relayed). Each round pings through the overlay every 50 ms,
//! kills the relay carrying a's path with SIGKILL, and takes the longest
//! gap between ping answers; then restarts that relay and waits until both
//! agents hold a fresh allocation on it again. Prints median and worst over
//! the rounds with fast relay failover (the default), then "before": the
//! same rounds with `WGICE_RELAY_FAILOVER=slow`, where relayed paths wait
//! for their own 1.5 s silence timeout; and the ratios to the 2 s bound.

use std::time::{Duration, Instant};

use netsim::nat::NatPreset;
use wgice_tests::mesh::{s, MeshLab};

fn main() {
    wgice_tests::require_root();
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let before = !args.iter().any(|a| a == "--no-before");
    let bins = wgice_tests::bins();
    let mut m = MeshLab::new(&bins);
    m.add_relay();
    let (a, b) = m.pair(NatPreset::Symmetric, NatPreset::Symmetric);
    m.start_and_wait(&[a, b], "relay");

    let fast = measure(&m, a, b, rounds, "fast failover");
    if let Ok(dir) = std::env::var("RELAY_BENCH_LOGS") {
        // The agents' logs of the fast rounds, before the restart below.
        for n in &m.nodes {
            let p = m.dir.join(format!("agent-{}.stderr", n.name));
            let _ = std::fs::copy(&p, format!("{dir}/agent-{}.log", n.name));
        }
    }
    let slow = before.then(|| {
        for i in [a, b] {
            m.restart_agent_env(i, &[(s("WGICE_RELAY_FAILOVER"), s("slow"))]);
        }
        for (i, j) in [(a, b), (b, a)] {
            if let Err(e) = m.wait_path(i, j, "relay", Duration::from_secs(30)) {
                panic!("{e}");
            }
        }
        measure(&m, a, b, rounds, "before (WGICE_RELAY_FAILOVER=slow)")
    });

    println!();
    println!("relay failover: longest gap in overlay pings (50 ms interval), {rounds} rounds");
    let (fm, fw) = stats(&fast);
    println!(
        "  fast failover : median {:.0} ms, worst {:.0} ms — {:.2}× / {:.2}× the 2 s bound",
        fm * 1e3,
        fw * 1e3,
        fm / 2.0,
        fw / 2.0
    );
    if let Some(slow) = slow {
        let (sm, sw) = stats(&slow);
        println!(
            "  before        : median {:.0} ms, worst {:.0} ms — {:.2}× / {:.2}× the 2 s bound",
            sm * 1e3,
            sw * 1e3,
            sm / 2.0,
            sw / 2.0
        );
        println!(
            "  fast / before : {:.2} (median), {:.2} (worst)",
            fm / sm,
            fw / sw
        );
    }
}

/// Rounds of: ping stream, kill the relay in use, longest gap; restart it
/// and wait until both agents allocated on it again.
fn measure(m: &MeshLab, a: usize, b: usize, rounds: usize, label: &str) -> Vec<f64> {
    let mut gaps = Vec::new();
    for round in 0..rounds {
        for i in [a, b] {
            if let Err(e) = m.wait_relays_ready(i, Duration::from_secs(60)) {
                panic!("{e}\n{}", m.logs());
            }
        }
        assert!(
            m.ping_within(a, b, Duration::from_secs(15)),
            "no ping before round {round}\n{}",
            m.logs()
        );
        let k = m
            .relay_in_use(a, b)
            .unwrap_or_else(|| panic!("a's path uses no lab relay\n{}", m.logs()));
        let relayed_before: Vec<serde_json::Value> =
            [a, b].iter().map(|&i| relayed_on(m, i, k)).collect();
        let stream = m.ping_stream(a, b, Duration::from_millis(50), Duration::from_secs(6));
        std::thread::sleep(Duration::from_millis(1500));
        m.kill_relay(k);
        let g = stream.finish().expect("ping output");
        println!(
            "{label} round {}: killed relay {} → longest gap {:.0} ms, {} of {} answered",
            round + 1,
            m.relays[k].addr,
            g.max_gap.as_secs_f64() * 1e3,
            g.replies,
            g.sent
        );
        gaps.push(g.max_gap.as_secs_f64());
        m.restart_relay(k);
        // Both agents hold a new allocation on the restarted relay.
        let t0 = Instant::now();
        for (n, &i) in [a, b].iter().enumerate() {
            loop {
                let now = relayed_on(m, i, k);
                if now != relayed_before[n] && now.as_array().is_some_and(|x| !x.is_empty()) {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "relay {k} never allocated again\n{}",
                    m.logs()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    gaps
}

/// Node `i`'s relayed addresses on relay `k`, as status shows them.
fn relayed_on(m: &MeshLab, i: usize, k: usize) -> serde_json::Value {
    let want = m.relays[k].addr.to_string();
    m.status(i)
        .and_then(|st| {
            st["relays"]
                .as_array()?
                .iter()
                .find(|r| r["server"] == want.as_str())
                .map(|r| r["relayed"].clone())
        })
        .unwrap_or_default()
}

/// Median and worst.
fn stats(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let median = if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    };
    (median, s.last().copied().unwrap_or(f64::NAN))
}
