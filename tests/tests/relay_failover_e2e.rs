//! Several relays, for real: two relays on public hosts of their own, two
//! nodes behind symmetric NATs (so every path is relayed), `wireguard-go`
//! and an `ice-agent` each. The relay carrying the path is killed with
//! SIGKILL while pings run through the overlay: they must go on over the
//! other relay within 2 s, and status must say so. A relay that becomes
//! clearly slower gives way to the faster one.

use std::time::Duration;

use netsim::impair::Impairment;
use netsim::nat::NatPreset;
use wgice_tests::mesh::{Bins, MeshLab};

fn setup() -> Bins {
    wgice_tests::require_root();
    wgice_tests::bins()
}

const CONNECT: Duration = Duration::from_secs(20);

/// Two relays, a and b behind symmetric NATs, relayed and pinging.
fn two_relays(bins: &Bins) -> (MeshLab, usize, usize) {
    two_relays_mode(bins, false)
}

/// [`two_relays`], with both agents in embedded mode when `embedded`.
fn two_relays_mode(bins: &Bins, embedded: bool) -> (MeshLab, usize, usize) {
    let mut m = MeshLab::new(bins);
    m.add_relay();
    let (a, b) = if embedded {
        m.add_router("ra", NatPreset::Symmetric);
        m.add_router("rb", NatPreset::Symmetric);
        (
            m.add_embedded_node("a", "ra"),
            m.add_embedded_node("b", "rb"),
        )
    } else {
        m.pair(NatPreset::Symmetric, NatPreset::Symmetric)
    };
    m.start_and_wait(&[a, b], "relay");
    for i in [a, b] {
        if let Err(e) = m.wait_relays_ready(i, CONNECT) {
            panic!("{e}\n{}", m.logs());
        }
    }
    assert!(
        m.ping_within(a, b, Duration::from_secs(10)),
        "no ping over the relay\n{}",
        m.logs()
    );
    (m, a, b)
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn killing_the_active_relay_moves_pings_to_the_other_within_2s() {
    let bins = setup();
    let (m, a, b) = two_relays(&bins);
    let k = m
        .relay_in_use(a, b)
        .unwrap_or_else(|| panic!("a's path uses no lab relay\n{}", m.logs()));
    let other = 1 - k;
    let stream = m.ping_stream(a, b, Duration::from_millis(50), Duration::from_secs(8));
    std::thread::sleep(Duration::from_secs(2));
    m.kill_relay(k);
    let gaps = stream.finish().expect("ping output");
    println!(
        "relay {} killed: longest gap {:?} (from {:?}), {} of {} answered",
        m.relays[k].addr, gaps.max_gap, gaps.gap_started, gaps.replies, gaps.sent
    );
    assert!(
        gaps.replies > gaps.sent / 2,
        "pings did not go on: {gaps:?}\n{}",
        m.logs()
    );
    assert!(
        gaps.max_gap <= Duration::from_secs(2),
        "pings stopped for {:?} (bound 2 s)\n{}",
        gaps.max_gap,
        m.logs()
    );
    // Both ends now relay over the other relay, and a says why it moved.
    for (i, j) in [(a, b), (b, a)] {
        assert_eq!(m.relay_in_use(i, j), Some(other), "{:#?}", m.status(i));
    }
    let st = m.status(a).expect("status");
    let rows = st["relays"].as_array().cloned().unwrap_or_default();
    let row = |idx: usize| {
        rows.iter()
            .find(|r| r["server"] == m.relays[idx].addr.to_string())
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(row(other)["active"], true, "{st:#}");
    assert_eq!(row(k)["active"], false, "{st:#}");
    assert_eq!(row(k)["down"], true, "{st:#}");
    let note = st["relay_note"].as_str().unwrap_or_default();
    let want = format!(
        "moved from relay {} to {}: {} silent",
        m.relays[k].addr, m.relays[other].addr, m.relays[k].addr
    );
    assert!(note.starts_with(&want), "note {note:?}, want {want:?}");
    let table = m.status_table(a);
    assert!(
        table.contains("relays: moved from relay") && table.contains(", active"),
        "{table}"
    );
    // The killed relay comes back: it is healthy again, the path stays
    // where it is (sticky), pings still cross.
    m.restart_relay(k);
    let t0 = std::time::Instant::now();
    loop {
        let st = m.status(a).expect("status");
        let back = st["relays"].as_array().is_some_and(|rows| {
            rows.iter().any(|r| {
                r["server"] == m.relays[k].addr.to_string()
                    && r["down"] == false
                    && r["relayed"].as_array().is_some_and(|x| !x.is_empty())
            })
        });
        if back {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the restarted relay never came back: {st:#}\n{}",
            m.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(m.relay_in_use(a, b), Some(other));
    assert!(m.ping(a, b, 3), "no ping after the restart\n{}", m.logs());
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn a_clearly_slower_relay_gives_way_to_the_faster_one() {
    let bins = setup();
    let (m, a, b) = two_relays(&bins);
    let k = m
        .relay_in_use(a, b)
        .unwrap_or_else(|| panic!("a's path uses no lab relay\n{}", m.logs()));
    let other = 1 - k;
    // 40 ms each way on the active relay's link: +80 ms RTT, far more than
    // 10 ms and a third.
    m.lab
        .set_impairment(
            &m.relays[k].host,
            Impairment {
                loss: 0.0,
                delay_ms: 40,
            },
        )
        .expect("impairment");
    // RTT is the median of five probes, 5 s apart once started: three slow
    // answers (≈ 15 s) flip the median.
    let t0 = std::time::Instant::now();
    while m.relay_in_use(a, b) != Some(other) {
        assert!(
            t0.elapsed() < Duration::from_secs(45),
            "a never moved off the slow relay: {:#?}\n{}",
            m.status(a),
            m.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("moved to the faster relay after {:?}", t0.elapsed());
    let st = m.status(a).expect("status");
    let note = st["relay_note"].as_str().unwrap_or_default();
    assert!(
        note.contains(&format!("{} faster", m.relays[other].addr)),
        "note {note:?}"
    );
    let rows = st["relays"].as_array().cloned().unwrap_or_default();
    let rtt = |idx: usize| {
        rows.iter()
            .find(|r| r["server"] == m.relays[idx].addr.to_string())
            .and_then(|r| r["rtt_ms"].as_f64())
            .unwrap_or(f64::NAN)
    };
    assert!(
        rtt(k) > rtt(other) + 40.0,
        "rtts {} vs {}",
        rtt(k),
        rtt(other)
    );
    assert!(m.ping(a, b, 3), "no ping after the move\n{}", m.logs());
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn embedded_agents_move_to_the_other_relay_within_2s() {
    let bins = setup();
    let (m, a, b) = two_relays_mode(&bins, true);
    let k = m
        .relay_in_use(a, b)
        .unwrap_or_else(|| panic!("a's path uses no lab relay\n{}", m.logs()));
    let stream = m.ping_stream(a, b, Duration::from_millis(50), Duration::from_secs(8));
    std::thread::sleep(Duration::from_secs(2));
    m.kill_relay(k);
    let gaps = stream.finish().expect("ping output");
    println!(
        "embedded: relay {} killed: longest gap {:?}, {} of {} answered",
        m.relays[k].addr, gaps.max_gap, gaps.replies, gaps.sent
    );
    assert!(
        gaps.replies > gaps.sent / 2 && gaps.max_gap <= Duration::from_secs(2),
        "{gaps:?}\n{}",
        m.logs()
    );
    assert_eq!(m.relay_in_use(a, b), Some(1 - k), "{:#?}", m.status(a));
}
