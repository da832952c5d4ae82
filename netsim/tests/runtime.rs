//! Fault drills at run time: link down/up, roaming to another router, NAT
//! flush (rebinding), changing a NAT preset, killing and restarting a process.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use netsim::lab::Lab;
use netsim::nat::{NatPreset, RouterConfig};
use netsim::probe::{self, Mapping};
use netsim::reflector::{BindingTransport, Change, Reflector, ReflectorClient};

fn binding(sock: &UdpSocket, to: SocketAddr) -> Option<SocketAddr> {
    ReflectorClient
        .binding(sock, to, Change::default(), Duration::from_millis(600))
        .expect("binding")
        .map(|r| r.mapped)
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn link_down_up_and_roaming() {
    common::require_root();
    let lab = Lab::new().expect("lab");
    lab.add_public_host("stun", 2).expect("host");
    lab.add_router("home", RouterConfig::new(NatPreset::PortRestricted))
        .expect("router");
    lab.add_router("cafe", RouterConfig::new(NatPreset::Symmetric))
        .expect("router");
    lab.add_device("laptop", "home").expect("device");
    let refl = Reflector::start(&lab, "stun").expect("reflector");
    let sock = lab.udp_socket("laptop", 0).expect("socket");

    let before = binding(&sock, refl.primary).expect("reachable at start");
    assert_eq!(before.ip(), lab.ip("home").expect("ip"));

    lab.link_down("laptop").expect("down");
    assert_eq!(
        binding(&sock, refl.primary),
        None,
        "link down but reachable"
    );
    lab.link_up("laptop").expect("up");
    let again = binding(&sock, refl.primary).expect("reachable after link up");
    assert_eq!(again, before, "same mapping after a short outage");

    // Roam: same socket, new router, new public address.
    let new_ip = lab.move_device("laptop", "cafe").expect("move");
    assert_eq!(lab.router_of("laptop").expect("router"), "cafe");
    assert!(
        new_ip.octets()[..3] != [192, 168, 1],
        "new LAN address {new_ip}"
    );
    let t = std::time::Instant::now();
    let roamed = ReflectorClient
        .binding(
            &sock,
            refl.primary,
            Change::default(),
            Duration::from_secs(3),
        )
        .expect("binding")
        .map(|r| r.mapped)
        .expect("reachable after roaming");
    println!("reachable {:?} after roaming", t.elapsed());
    assert_eq!(roamed.ip(), lab.ip("cafe").expect("ip"));
    assert_ne!(roamed, before);
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn flush_nat_forgets_mappings() {
    common::require_root();
    let lab = Lab::new().expect("lab");
    lab.add_public_host("stun", 2).expect("host");
    lab.add_router("r", RouterConfig::new(NatPreset::PortRestricted))
        .expect("router");
    lab.add_device("d", "r").expect("device");
    let refl = Reflector::start(&lab, "stun").expect("reflector");
    let late_answer_arrives = |flush: bool| {
        let s = lab.udp_socket("d", 0).expect("socket");
        binding(&s, refl.primary).expect("mapping");
        ReflectorClient
            .delayed_binding(&s, refl.primary, Duration::from_millis(800))
            .expect("send");
        if flush {
            std::thread::sleep(Duration::from_millis(200));
            lab.flush_nat("r").expect("flush");
        }
        s.set_read_timeout(Some(Duration::from_millis(1800)))
            .expect("timeout");
        let mut buf = [0u8; 1500];
        s.recv_from(&mut buf).is_ok()
    };
    assert!(
        late_answer_arrives(false),
        "control: mapping kept, answer arrives"
    );
    assert!(
        !late_answer_arrives(true),
        "mapping flushed, answer must be dropped"
    );
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn nat_preset_changes_at_run_time() {
    common::require_root();
    let lab = Lab::new().expect("lab");
    lab.add_public_host("stun", 2).expect("host");
    lab.add_router("r", RouterConfig::new(NatPreset::PortRestricted))
        .expect("router");
    lab.add_device("d", "r").expect("device");
    let refl = Reflector::start(&lab, "stun").expect("reflector");
    let (c, _) =
        probe::classify(&lab, "d", &ReflectorClient, refl.primary, refl.alternate).expect("probe");
    assert_eq!(c.mapping, Some(Mapping::Eim));
    lab.set_router_config("r", RouterConfig::new(NatPreset::Symmetric))
        .expect("set");
    let (c, seq) =
        probe::classify(&lab, "d", &ReflectorClient, refl.primary, refl.alternate).expect("probe");
    assert!(c.matches(NatPreset::Symmetric, seq), "after change: {c}");
    // Topology-changing presets are refused with a reason.
    let err = lab
        .set_router_config("r", RouterConfig::new(NatPreset::Cgnat))
        .expect_err("cgnat needs a second namespace");
    assert!(err.to_string().contains("topology"), "{err}");
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn kill_and_restart_a_process() {
    common::require_root();
    let lab = Lab::new().expect("lab");
    lab.add_public_host("server", 1).expect("host");
    let out = std::env::temp_dir().join(format!("netsim-test-{}", std::process::id()));
    let argv: Vec<String> = ["sh", "-c", "echo started $GREETING; exec sleep 1000"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    lab.spawn(
        "sleeper",
        "server",
        &argv,
        &[("GREETING".into(), "hello".into())],
        &out,
    )
    .expect("spawn");
    let ns = lab.ns("server").expect("ns");
    let pids = || {
        let o = std::process::Command::new("ip")
            .args(["netns", "pids", &ns])
            .output()
            .expect("ip");
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .count()
    };
    let wait_for = |want: usize| {
        for _ in 0..50 {
            if pids() == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    let starts = || {
        std::fs::read_to_string(out.join("sleeper.stdout"))
            .unwrap_or_default()
            .matches("started hello")
            .count()
    };
    let wait_starts = |want: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while starts() < want && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        starts()
    };
    assert!(wait_for(1), "process runs in the node");
    assert_eq!(wait_starts(1), 1, "first start logged to the output folder");
    lab.kill_process("sleeper").expect("kill");
    assert!(wait_for(0), "killed process is gone");
    lab.restart_process("sleeper").expect("restart");
    assert!(wait_for(1), "restarted process runs");
    assert_eq!(
        wait_starts(2),
        2,
        "second start logged to the output folder"
    );
    drop(lab);
    let _ = std::fs::remove_dir_all(&out);
}
