//! The UPnP-IGD / NAT-PMP gateway (miniupnpd, nftables backend) works with
//! clients no one here wrote (`natpmpc`, `upnpc`) and with a minimal PCP
//! client written from RFC 6887: each maps a port, and an
//! unsolicited datagram from the internet then reaches the device through a
//! port-restricted NAT that would otherwise drop it.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use netsim::lab::Lab;
use netsim::nat::{NatPreset, RouterConfig};

fn arrives(lab: &Lab, port: u16) -> bool {
    let dev = lab.udp_socket("d", port).expect("device socket");
    dev.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let peer = lab.udp_socket("peer", 0).expect("peer socket");
    let to = SocketAddr::new(lab.ip("gw").expect("ip").into(), port);
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        peer.send_to(b"unsolicited", to).expect("send");
        if let Ok((n, _)) = dev.recv_from(&mut buf) {
            if &buf[..n] == b"unsolicited" {
                return true;
            }
        }
    }
    false
}

/// Fails the (ignored-by-default) test when the gateway tools are missing.
fn require_tools() {
    let ok = ["miniupnpd", "natpmpc", "upnpc"].iter().all(|t| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {t} || test -x /usr/sbin/{t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    assert!(ok, "miniupnpd, natpmpc, upnpc missing (run scripts/setup)");
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn natpmp_and_upnp_open_ports_through_the_nat() {
    common::require_root();
    require_tools();
    let lab = Lab::new().expect("lab");
    lab.add_public_host("peer", 1).expect("host");
    let mut cfg = RouterConfig::new(NatPreset::PortRestricted);
    cfg.upnp = true;
    lab.add_router("gw", cfg).expect("gateway router");
    let dev_ip = lab.add_device("d", "gw").expect("device");
    let gw_lan = {
        let o = dev_ip.octets();
        format!("{}.{}.{}.1", o[0], o[1], o[2])
    };

    // Control: without a mapping the NAT drops unsolicited traffic.
    assert!(
        !arrives(&lab, 40000),
        "port-restricted NAT let unsolicited UDP in"
    );

    let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (ok, out) = lab
        .exec(
            "d",
            &argv(&[
                "natpmpc", "-g", &gw_lan, "-a", "40000", "40000", "udp", "60",
            ]),
        )
        .expect("natpmpc");
    println!("natpmpc: {out}");
    assert!(
        ok && out.contains("Mapped public port 40000"),
        "natpmpc failed: {out}"
    );
    assert!(arrives(&lab, 40000), "NAT-PMP mapping does not forward");

    let (ok, out) = lab
        .exec(
            "d",
            &argv(&[
                "upnpc",
                "-e",
                "netsim",
                "-a",
                &dev_ip.to_string(),
                "40001",
                "40001",
                "UDP",
            ]),
        )
        .expect("upnpc");
    println!("upnpc: {out}");
    assert!(
        ok && out.contains("is redirected to internal"),
        "upnpc failed: {out}"
    );
    assert!(arrives(&lab, 40001), "UPnP mapping does not forward");

    // PCP (RFC 6887) MAP, with a minimal client written from the RFC.
    let ext_port = pcp_map(&lab, &gw_lan, dev_ip, 40002);
    assert_eq!(ext_port, Some(40002), "PCP MAP refused");
    assert!(arrives(&lab, 40002), "PCP mapping does not forward");
}

/// Sends a PCP MAP request for UDP `port` (suggesting the same external
/// port) and returns the assigned external port on success.
fn pcp_map(lab: &Lab, gw: &str, client: std::net::Ipv4Addr, port: u16) -> Option<u16> {
    let sock = lab.udp_socket("d", 0).expect("socket");
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut req = vec![2u8, 1, 0, 0]; // version 2, request, opcode MAP
    req.extend_from_slice(&600u32.to_be_bytes()); // lifetime
    req.extend_from_slice(&client.to_ipv6_mapped().octets());
    let nonce: [u8; 12] = rand::random();
    req.extend_from_slice(&nonce);
    req.extend_from_slice(&[17, 0, 0, 0]); // UDP
    req.extend_from_slice(&port.to_be_bytes()); // internal port
    req.extend_from_slice(&port.to_be_bytes()); // suggested external port
    req.extend_from_slice(&std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().octets());
    assert_eq!(req.len(), 60);
    let to: SocketAddr = format!("{gw}:5351").parse().expect("addr");
    let mut buf = [0u8; 1100];
    for _ in 0..3 {
        sock.send_to(&req, to).expect("send");
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        // Response: opcode with the R bit, result code at byte 3, nonce
        // echoed at 24..36, assigned external port at 42..44.
        if n >= 60 && buf[1] == 0x81 && buf[24..36] == nonce {
            println!("pcp: result code {}", buf[3]);
            return (buf[3] == 0).then(|| u16::from_be_bytes([buf[42], buf[43]]));
        }
    }
    None
}
