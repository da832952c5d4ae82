//! The real `relay` binary as the RFC 5780 server of netsim's NAT self-check:
//! started with `--alt-listen` on a public host of a lab, it must classify
//! every NAT preset exactly as the built-in reflector does. This proves the
//! relay's CHANGE-REQUEST / OTHER-ADDRESS / RESPONSE-ORIGIN handling against
//! real nftables NATs.

use std::time::{Duration, Instant};

use netsim::lab::Lab;
use netsim::nat::{NatPreset, RouterConfig};
use netsim::probe;
use netsim::reflector::{BindingTransport, Change};
use netsim::stun_client::StunClient;

fn classify_with_relay(
    relay_bin: &std::path::Path,
    preset: NatPreset,
) -> (probe::Classification, bool) {
    let lab = Lab::new().expect("lab");
    let ips = lab.add_public_host("stun", 2).expect("public host");
    lab.add_router("r", RouterConfig::new(preset))
        .expect("router");
    lab.add_device("d", "r").expect("device");
    let primary = std::net::SocketAddr::from((ips[0], 3478));
    let alternate = std::net::SocketAddr::from((ips[1], 3479));
    let out = lab.work_dir().join("relay-out");
    lab.spawn(
        "relay",
        "stun",
        &[
            relay_bin.display().to_string(),
            "--listen".into(),
            primary.to_string(),
            "--alt-listen".into(),
            alternate.to_string(),
            "--user".into(),
            "probe:probe".into(),
            "--workers".into(),
            "1".into(),
        ],
        &[],
        &out,
    )
    .expect("spawn relay");
    // Wait until the relay answers from inside the lab.
    let deadline = Instant::now() + Duration::from_secs(10);
    let sock = lab.udp_socket("stun", 0).expect("socket");
    while StunClient
        .binding(
            &sock,
            primary,
            Change::default(),
            Duration::from_millis(200),
        )
        .expect("io")
        .is_none()
    {
        assert!(Instant::now() < deadline, "relay did not answer in the lab");
    }
    probe::classify(&lab, "d", &StunClient, primary, alternate).expect("probe")
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn relay_classifies_every_preset_like_the_reflector() {
    wgice_tests::require_root();
    let relay_bin = wgice_tests::workspace_bin("relay");
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = NatPreset::ALL
            .iter()
            .map(|p| {
                let bin = relay_bin.clone();
                (*p, s.spawn(move || classify_with_relay(&bin, *p)))
            })
            .collect();
        hs.into_iter()
            .map(|(p, h)| (p, h.join().expect("thread")))
            .collect()
    });
    let mut bad = Vec::new();
    for (p, (c, seq)) in &results {
        println!("{p:<22} {c} sequential={seq}");
        let ok = match p {
            // Nothing listens on TCP 443 here; UDP must simply be gone.
            NatPreset::UdpBlocked => !c.udp,
            _ => c.matches(*p, *seq),
        };
        if !ok {
            bad.push(format!("{p}: {c}"));
        }
    }
    assert!(
        bad.is_empty(),
        "relay-based classification disagrees: {bad:#?}"
    );
}
