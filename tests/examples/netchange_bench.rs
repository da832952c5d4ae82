//! Network-change recovery benchmark (needs root: netsim namespaces,
//! wireguard-go; issue 12, item 5).
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p wgice-tests --example netchange_bench [-- --rounds N]
//! ```
//!
//! Per drill (`wgice_tests::netchange`): a node roams to another router
//! (direct pair, relayed pair), or its NAT forgets every mapping (direct,
//! relayed), while pings cross the overlay every 50 ms. Prints, median and
//! worst of N rounds (5 by default): seconds from the change to the first
//! ping answered, the longest silence, and seconds until the status is back
//! on the drill's path for good — against the issue's bounds (reachable
//! again within 1 s, on the final path within 3 s).

use wgice_tests::netchange::{run, Drill};

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() - 1])
}

fn main() {
    wgice_tests::require_root();
    let rounds: usize = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let bins = wgice_tests::bins();
    println!(
        "{:<26} {:>18} {:>18} {:>18}",
        "drill", "first ping s", "longest gap s", "final path s"
    );
    println!(
        "{:<26} {:>18} {:>18} {:>18}",
        "", "median / worst", "median / worst", "median / worst"
    );
    let mut missed = Vec::new();
    for d in Drill::ALL {
        let (mut first, mut gap, mut path) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let o = run(&bins, d);
            // A round that never recovered counts as the watch window.
            first.push(o.first_ping_s.unwrap_or(f64::INFINITY));
            gap.push(o.longest_gap_s);
            path.push(o.path_again_s.unwrap_or(f64::INFINITY));
        }
        let (f, g, p) = (stats(first), stats(gap), stats(path));
        println!(
            "{:<26} {:>8.2} / {:<8.2} {:>8.2} / {:<8.2} {:>8.2} / {:<8.2}",
            d.name(),
            f.0,
            f.1,
            g.0,
            g.1,
            p.0,
            p.1
        );
        if g.1 > 1.0 {
            missed.push(format!("{}: longest gap {:.2} s > 1 s", d.name(), g.1));
        }
        if p.1 > 3.0 {
            missed.push(format!("{}: final path after {:.2} s > 3 s", d.name(), p.1));
        }
    }
    println!("bounds: reachable again ≤ 1 s (longest gap), final path ≤ 3 s");
    if missed.is_empty() {
        println!("all within the bounds ({rounds} rounds each)");
    } else {
        for m in missed {
            println!("MISSED {m}");
        }
    }
}
