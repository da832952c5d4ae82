//! Loss (nftables numgen) and one-way delay (userspace TUN delay element)
//! measured against what was asked, within 20 %.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use netsim::impair::Impairment;
use netsim::lab::Lab;
use netsim::nat::{NatPreset, RouterConfig};

fn lab() -> Lab {
    let lab = Lab::new().expect("lab");
    lab.add_public_host("sink", 1).expect("host");
    lab.add_router("r", RouterConfig::new(NatPreset::PortRestricted))
        .expect("router");
    lab.add_device("d", "r").expect("device");
    lab
}

/// Sends `n` numbered datagrams from `tx` to `to`, returns per-packet send
/// instants and what `rx` received (sequence number, receive instant).
fn blast(
    tx: &UdpSocket,
    rx: UdpSocket,
    to: SocketAddr,
    n: u32,
    gap: Duration,
) -> (Vec<Instant>, Vec<(u32, Instant)>) {
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let receiver = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok((len, _)) = rx.recv_from(&mut buf) {
            if let Some(seq) = std::str::from_utf8(&buf[..len])
                .ok()
                .and_then(|s| s.parse().ok())
            {
                got.push((seq, Instant::now()));
            }
        }
        got
    });
    let mut sent = Vec::new();
    for i in 0..n {
        sent.push(Instant::now());
        tx.send_to(i.to_string().as_bytes(), to).expect("send");
        std::thread::sleep(gap);
    }
    (sent, receiver.join().expect("receiver"))
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn loss_is_within_20_percent_of_asked() {
    common::require_root();
    let lab = lab();
    let sink_ip = lab.ip("sink").expect("ip");
    let tx = lab.udp_socket("d", 0).expect("tx");
    let n = 3000;
    // Baseline: without impairment nothing is lost.
    let rx = lab.udp_socket("sink", 9000).expect("rx");
    let (_, got) = blast(
        &tx,
        rx,
        SocketAddr::new(sink_ip.into(), 9000),
        n,
        Duration::from_micros(300),
    );
    assert!(
        got.len() as u32 >= n * 995 / 1000,
        "baseline lost packets: {} of {n}",
        got.len()
    );
    let asked = 0.2;
    lab.set_impairment(
        "r",
        Impairment {
            loss: asked,
            delay_ms: 0,
        },
    )
    .expect("impair");
    let rx = lab.udp_socket("sink", 9000).expect("rx");
    let (_, got) = blast(
        &tx,
        rx,
        SocketAddr::new(sink_ip.into(), 9000),
        n,
        Duration::from_micros(300),
    );
    let measured = 1.0 - got.len() as f64 / f64::from(n);
    println!(
        "loss asked {asked}, measured {measured:.3} ({} of {n} arrived)",
        got.len()
    );
    assert!(
        (measured - asked).abs() <= 0.2 * asked,
        "loss {measured:.3} not within 20 % of {asked}"
    );
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn one_way_delay_is_within_20_percent_of_asked() {
    common::require_root();
    let lab = lab();
    let asked_ms = 40u64;
    lab.set_impairment(
        "r",
        Impairment {
            loss: 0.0,
            delay_ms: asked_ms,
        },
    )
    .expect("impair");
    let sink_ip = lab.ip("sink").expect("ip");
    // Uplink: device -> sink (through the NAT).
    let rx = lab.udp_socket("sink", 9001).expect("rx");
    let tx = lab.udp_socket("d", 0).expect("tx");
    let (sent, got) = blast(
        &tx,
        rx,
        SocketAddr::new(sink_ip.into(), 9001),
        100,
        Duration::from_millis(5),
    );
    assert!(got.len() >= 95, "only {} of 100 arrived", got.len());
    let mut up: Vec<f64> = got
        .iter()
        .map(|(seq, at)| at.duration_since(sent[*seq as usize]).as_secs_f64() * 1e3)
        .collect();
    up.sort_by(|a, b| a.total_cmp(b));
    let up_median = up[up.len() / 2];
    // Downlink: sink -> device, through the mapping the uplink opened.
    let back = lab.udp_socket("sink", 9002).expect("probe");
    tx.send_to(b"hello", SocketAddr::new(sink_ip.into(), 9002))
        .expect("send");
    back.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    let mapped = back.recv_from(&mut buf).expect("mapping").1;
    let (sent2, got2) = blast(&back, tx, mapped, 100, Duration::from_millis(5));
    let mut down: Vec<f64> = got2
        .iter()
        .map(|(seq, at)| at.duration_since(sent2[*seq as usize]).as_secs_f64() * 1e3)
        .collect();
    down.sort_by(|a, b| a.total_cmp(b));
    assert!(down.len() >= 95, "only {} of 100 came back", down.len());
    let down_median = down[down.len() / 2];
    println!("delay asked {asked_ms} ms one-way; measured median up {up_median:.1} ms, down {down_median:.1} ms");
    for m in [up_median, down_median] {
        assert!(
            (m - asked_ms as f64).abs() <= 0.2 * asked_ms as f64,
            "one-way delay {m:.1} ms not within 20 % of {asked_ms} ms"
        );
    }
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn delay_on_a_public_host_link_and_removal() {
    common::require_root();
    let lab = lab();
    let sink_ip = lab.ip("sink").expect("ip");
    let echo = lab.udp_socket("sink", 9003).expect("echo");
    echo.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        }
    });
    let sock = lab.udp_socket("d", 0).expect("sock");
    sock.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let rtt_ms = |n: usize| {
        let mut v: Vec<f64> = (0..n)
            .filter_map(|_| {
                let t = Instant::now();
                sock.send_to(b"x", SocketAddr::new(sink_ip.into(), 9003))
                    .ok()?;
                let mut buf = [0u8; 8];
                sock.recv_from(&mut buf).ok()?;
                Some(t.elapsed().as_secs_f64() * 1e3)
            })
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let base = rtt_ms(20);
    lab.set_impairment(
        "sink",
        Impairment {
            loss: 0.0,
            delay_ms: 25,
        },
    )
    .expect("impair host");
    let delayed = rtt_ms(20);
    lab.set_impairment("sink", Impairment::default())
        .expect("clear");
    let cleared = rtt_ms(20);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().expect("server");
    println!(
        "rtt: base {base:.2} ms, with 25 ms each way {delayed:.2} ms, cleared {cleared:.2} ms"
    );
    assert!(
        (delayed - 50.0).abs() <= 10.0,
        "rtt {delayed:.1} ms, want 50 ± 20 %"
    );
    assert!(cleared < 10.0, "delay removed: rtt {cleared:.1} ms");
}
