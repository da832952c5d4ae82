//! The relay's XDP fast path in namespaces (XDP does not run on loopback):
//! a netsim lab with the real `relay` on a public host (`--xdp eth0`), a
//! client host driving the project's sans-IO TURN client over a real UDP
//! socket, and an echo peer host. Counters from the relay's `/metrics`
//! show which path carried each packet: `relay_xdp_packets_total` (the
//! program) or `relay_packets_*_total` (user space).
//!
//! Lab set-up the fast path needs, as on a real host: forwarding on the
//! relay's interface (the kernel resolves routes for XDP only there), and,
//! because veth stands in for a NIC, senders that compute their UDP
//! checksums (`tx off`: a NIC's wire carries complete ones) and NAPI on the
//! veth ends the program transmits into (`gro on`).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use netsim::lab::Lab;
use relay::client::{Client, ClientConfig, ClientEvent};

const METRICS: &str = "127.0.0.1:9464";

struct XdpLab {
    lab: Lab,
    relay_ip: Ipv4Addr,
    peer_ip: Ipv4Addr,
    out: PathBuf,
}

fn sh(lab: &Lab, node: &str, cmd: &str) -> String {
    let argv: Vec<String> = ["sh", "-c", cmd].iter().map(|s| s.to_string()).collect();
    let (ok, text) = lab.exec(node, &argv).expect("exec");
    assert!(ok, "{node}: `{cmd}` failed: {text}");
    text
}

impl XdpLab {
    /// Hosts `relay`, `client`, `peer`; the relay started with `args`.
    fn new(args: &[&str]) -> XdpLab {
        wgice_tests::require_root();
        let lab = Lab::new().expect("lab");
        let relay_ip = lab.add_public_host("relay", 1).expect("relay host")[0];
        lab.add_public_host("client", 1).expect("client host");
        let peer_ip = lab.add_public_host("peer", 1).expect("peer host")[0];
        sh(&lab, "relay", "sysctl -qw net.ipv4.conf.eth0.forwarding=1");
        sh(&lab, "client", "ethtool -K eth0 tx off >/dev/null");
        sh(&lab, "peer", "ethtool -K eth0 tx off >/dev/null");
        sh(
            &lab,
            "inet",
            "for i in $(ls /sys/class/net); do [ $i = lo ] || ethtool -K $i gro on >/dev/null; done",
        );
        let out = lab.work_dir().join("relay-out");
        let mut argv: Vec<String> = vec![
            wgice_tests::workspace_bin("relay").display().to_string(),
            "--listen".into(),
            format!("{relay_ip}:3478"),
            "--user".into(),
            "u:p".into(),
            "--workers".into(),
            "1".into(),
            "--metrics".into(),
            METRICS.into(),
        ];
        argv.extend(args.iter().map(|s| s.to_string()));
        lab.spawn("relay", "relay", &argv, &[], &out)
            .expect("relay");
        let x = XdpLab {
            lab,
            relay_ip,
            peer_ip,
            out,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while x.try_metrics().is_none() {
            assert!(
                Instant::now() < deadline,
                "relay did not start: {}",
                x.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        x
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.out.join("relay.stdout")).unwrap_or_default()
            + &std::fs::read_to_string(self.out.join("relay.stderr")).unwrap_or_default()
    }

    fn try_metrics(&self) -> Option<String> {
        self.lab
            .in_node("relay", || {
                let mut s = std::net::TcpStream::connect(METRICS).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .ok()?;
                let mut text = String::new();
                s.read_to_string(&mut text).ok()?;
                Some(text)
            })
            .ok()
            .flatten()
    }

    /// A metric's value (`name` with its labels, as printed).
    fn metric(&self, name: &str) -> u64 {
        let text = self.try_metrics().expect("metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }

    fn xdp(&self, dir: &str) -> u64 {
        self.metric(&format!("relay_xdp_packets_total{{direction=\"{dir}\"}}"))
    }

    fn user(&self, dir: &str) -> u64 {
        self.metric(&format!("relay_packets_{dir}_total"))
    }

    /// A TURN client on the client host, allocated on the relay.
    fn turn_client(&self, server: SocketAddr, dual_stack: bool) -> Turn {
        let sock = self.lab.udp_socket("client", 0).expect("client socket");
        let mut cfg = ClientConfig::new("u", "p");
        cfg.dual_stack = dual_stack;
        let mut t = Turn {
            sock,
            server,
            client: Client::new(cfg, 7),
        };
        t.client.allocate(Instant::now());
        t.until(|e| matches!(e, ClientEvent::Allocated { .. }));
        t
    }
}

struct Turn {
    sock: UdpSocket,
    server: SocketAddr,
    client: Client,
}

impl Turn {
    fn flush(&mut self) {
        while let Some(d) = self.client.poll_transmit() {
            self.sock.send_to(&d, self.server).expect("send to relay");
        }
    }

    /// Drives the client until an event matches (failures panic).
    fn until(&mut self, want: impl Fn(&ClientEvent) -> bool) -> ClientEvent {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 2048];
        loop {
            self.flush();
            while let Some(e) = self.client.poll_event() {
                if want(&e) {
                    return e;
                }
                if let ClientEvent::Failed { .. } | ClientEvent::Lost { .. } = e {
                    panic!("TURN client: {e:?}");
                }
            }
            assert!(Instant::now() < deadline, "no answer from the relay");
            self.sock
                .set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                let now = Instant::now();
                let _ = self.client.handle_input(now, &buf[..n]);
            }
            self.client.handle_timeout(Instant::now());
        }
    }

    fn bind(&mut self, peer: SocketAddr) -> u16 {
        let ch = self
            .client
            .bind_channel(Instant::now(), peer)
            .expect("channel");
        self.until(|e| matches!(e, ClientEvent::ChannelBound { peer: p, .. } if *p == peer));
        ch
    }

    /// Sends `payload` to `peer` as ChannelData (a bound channel).
    fn send(&mut self, peer: SocketAddr, payload: &[u8]) {
        let mut out = Vec::new();
        self.client.encode_to(peer, payload, &mut out);
        assert!(out[0] & 0xc0 == 0x40, "not ChannelData");
        self.sock.send_to(&out, self.server).expect("send");
    }

    /// The next payload from a peer, if one comes within `wait`.
    fn recv(&mut self, wait: Duration) -> Option<(SocketAddr, Vec<u8>)> {
        let mut buf = vec![0u8; 2048];
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            self.sock
                .set_read_timeout(Some(deadline - Instant::now() + Duration::from_millis(1)))
                .expect("timeout");
            let (n, _) = self.sock.recv_from(&mut buf).ok()?;
            if let Some((p, d)) = self.client.handle_input(Instant::now(), &buf[..n]) {
                return Some((p, d.to_vec()));
            }
        }
        None
    }
}

fn recv_on(sock: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 2048];
    sock.set_read_timeout(Some(wait)).expect("timeout");
    let (n, from) = sock.recv_from(&mut buf).ok()?;
    Some((buf[..n].to_vec(), from))
}

/// `n` round trips client → relay → peer → relay → client, payloads checked.
fn echo(t: &mut Turn, peer: &UdpSocket, peer_addr: SocketAddr, n: usize) {
    for i in 0..n {
        let payload: Vec<u8> = (0..1200).map(|j| (i * 7 + j) as u8).collect();
        t.send(peer_addr, &payload);
        let (got, from) = recv_on(peer, Duration::from_secs(2))
            .unwrap_or_else(|| panic!("peer got no packet {i}"));
        assert_eq!(got, payload, "packet {i} arrived changed");
        assert_eq!(
            from,
            t.client.relayed()[if peer_addr.is_ipv4() {
                0
            } else {
                t.client.relayed().len() - 1
            }],
            "packet {i} not from the relayed address"
        );
        peer.send_to(&got, from).expect("echo");
        let (p, back) = t
            .recv(Duration::from_secs(2))
            .unwrap_or_else(|| panic!("client got no echo {i}"));
        assert_eq!((p, back), (peer_addr, payload), "echo {i}");
    }
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn xdp_forwards_channel_data_both_ways_and_stops_with_the_allocation() {
    let x = XdpLab::new(&["--xdp", "eth0"]);
    assert!(x.log().contains("XDP fast path on"), "{}", x.log());
    let peer_addr = SocketAddr::from((x.peer_ip, 4000));
    let peer = x.lab.udp_socket("peer", 4000).expect("peer socket");
    let mut t = x.turn_client(SocketAddr::from((x.relay_ip, 3478)), false);
    t.bind(peer_addr);
    echo(&mut t, &peer, peer_addr, 200);
    let (kp, kc) = (x.xdp("to_peer"), x.xdp("to_client"));
    let (up, uc) = (x.user("to_peer"), x.user("to_client"));
    // The first packets may meet an unresolved neighbour and go through user space.
    assert!(
        kp >= 190 && kc >= 190,
        "kernel carried {kp}/{kc} of 200 each way (user space {up}/{uc})\n{}",
        x.try_metrics().unwrap_or_default()
    );
    assert_eq!(kp + up, 200, "to peer: kernel {kp} + user {up}");
    assert_eq!(kc + uc, 200, "to client: kernel {kc} + user {uc}");
    assert_eq!(x.metric("relay_xdp_bindings"), 1);

    // A denied peer (the relay's own address, no relayed port there) gets
    // no binding, so neither the program nor user space reaches it.
    let victim = x.lab.udp_socket("relay", 5555).expect("victim socket");
    let victim_addr = SocketAddr::from((x.relay_ip, 5555));
    let denied = t
        .client
        .bind_channel(Instant::now(), victim_addr)
        .expect("channel");
    let e = t.until(|e| {
        matches!(e, ClientEvent::Failed { .. })
            || matches!(e, ClientEvent::ChannelBound { peer, .. } if *peer == victim_addr)
    });
    assert!(
        !matches!(e, ClientEvent::ChannelBound { .. }),
        "the relay bound a channel to its own address"
    );
    let mut frame = vec![(denied >> 8) as u8, denied as u8, 0, 8];
    frame.extend_from_slice(b"attacker");
    for _ in 0..20 {
        t.sock.send_to(&frame, t.server).expect("send");
    }
    assert!(
        recv_on(&victim, Duration::from_millis(500)).is_none(),
        "the denied peer was reached"
    );
    assert_eq!(
        x.xdp("to_peer"),
        kp,
        "the program forwarded to a denied peer"
    );

    // Deleting the allocation removes its entries: the same ChannelData
    // from the same 5-tuple is forwarded by nobody.
    let mut stale = Vec::new();
    t.client.encode_to(peer_addr, b"after the end", &mut stale);
    t.client.deallocate(Instant::now());
    t.until(|e| matches!(e, ClientEvent::Deallocated));
    assert_eq!(x.metric("relay_xdp_bindings"), 0);
    for _ in 0..20 {
        t.sock.send_to(&stale, t.server).expect("send");
    }
    assert!(
        recv_on(&peer, Duration::from_millis(500)).is_none(),
        "forwarded after the allocation ended"
    );
    assert_eq!(x.xdp("to_peer"), kp);
    assert_eq!(x.user("to_peer"), up);
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn xdp_stops_forwarding_when_the_channel_expires() {
    let x = XdpLab::new(&[
        "--xdp",
        "eth0",
        "--channel-lifetime",
        "2",
        "--permission-lifetime",
        "2",
    ]);
    let peer_addr = SocketAddr::from((x.peer_ip, 4000));
    let peer = x.lab.udp_socket("peer", 4000).expect("peer socket");
    let mut t = x.turn_client(SocketAddr::from((x.relay_ip, 3478)), false);
    t.bind(peer_addr);
    echo(&mut t, &peer, peer_addr, 20);
    let kp = x.xdp("to_peer");
    assert!(kp >= 10, "kernel carried {kp} of 20");
    // The client is not driven now: nothing refreshes the channel.
    std::thread::sleep(Duration::from_millis(2300));
    for _ in 0..20 {
        t.send(peer_addr, b"expired");
    }
    assert!(
        recv_on(&peer, Duration::from_millis(500)).is_none(),
        "forwarded after the channel expired"
    );
    assert_eq!(
        x.xdp("to_peer"),
        kp,
        "the program forwarded on an expired binding"
    );
    // The sweep (every second) has removed the entries.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(x.metric("relay_xdp_bindings"), 0);
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn xdp_forwards_ipv6() {
    // netsim's public hosts are IPv4; give the three hosts and the core
    // router documentation IPv6 addresses, as the IPv4 plan does.
    let x = XdpLab::new(&[]);
    let v6 = |n: u16| std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, n);
    let core = v6(0xfe);
    let inet_ns = x.lab.ns("inet").expect("inet");
    sh(&x.lab, "inet", "sysctl -qw net.ipv6.conf.all.forwarding=1");
    for (i, host) in ["relay", "client", "peer"].iter().enumerate() {
        let me = v6(i as u16 + 1);
        // The core's end of this host's link: the veth whose peer is eth0.
        let peer_index = sh(&x.lab, host, "cat /sys/class/net/eth0/iflink");
        let inet_if = sh(
            &x.lab,
            "inet",
            &format!(
                "grep -lx {} /sys/class/net/*/ifindex | cut -d/ -f5",
                peer_index.trim()
            ),
        );
        let inet_if = inet_if.trim();
        assert!(!inet_if.is_empty(), "no core link for {host} in {inet_ns}");
        sh(&x.lab, "inet", &format!("ip -6 addr add {core}/128 dev {inet_if} nodad; ip -6 route add {me}/128 dev {inet_if}"));
        sh(&x.lab, host, &format!("ip -6 addr add {me}/128 dev eth0 nodad; ip -6 route add {core}/128 dev eth0; ip -6 route add default via {core} dev eth0"));
    }
    sh(
        &x.lab,
        "relay",
        "sysctl -qw net.ipv6.conf.eth0.forwarding=1 net.ipv6.conf.all.forwarding=1",
    );
    // A second relay on the host's IPv6 address, with IPv6 relayed sockets.
    let out = x.out.clone();
    let argv: Vec<String> = vec![
        wgice_tests::workspace_bin("relay").display().to_string(),
        "--listen".into(),
        format!("[{}]:3478", v6(1)),
        "--relay-ip".into(),
        v6(1).to_string(),
        "--user".into(),
        "u:p".into(),
        "--workers".into(),
        "1".into(),
        "--metrics".into(),
        "127.0.0.1:9465".into(),
        "--xdp".into(),
        "eth0".into(),
    ];
    x.lab
        .spawn("relay6", "relay", &argv, &[], &out)
        .expect("relay6");
    let metrics6 = || -> Option<String> {
        x.lab
            .in_node("relay", || {
                let mut s = std::net::TcpStream::connect("127.0.0.1:9465").ok()?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .ok()?;
                let mut text = String::new();
                s.read_to_string(&mut text).ok()?;
                Some(text)
            })
            .ok()
            .flatten()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics6().is_none() {
        assert!(Instant::now() < deadline, "IPv6 relay did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let peer_addr = SocketAddr::new(IpAddr::V6(v6(3)), 4000);
    let peer = x
        .lab
        .in_node("peer", move || UdpSocket::bind(peer_addr))
        .expect("ns")
        .expect("peer socket");
    let server = SocketAddr::new(IpAddr::V6(v6(1)), 3478);
    let sock = x
        .lab
        .in_node("client", move || {
            UdpSocket::bind(SocketAddr::new(IpAddr::V6(v6(2)), 0))
        })
        .expect("ns")
        .expect("client socket");
    let mut t = Turn {
        sock,
        server,
        client: Client::new(ClientConfig::new("u", "p"), 9),
    };
    t.client.allocate(Instant::now());
    t.until(|e| matches!(e, ClientEvent::Allocated { .. }));
    assert!(
        t.client.relayed().iter().all(|r| r.is_ipv6()),
        "{:?}",
        t.client.relayed()
    );
    t.bind(peer_addr);
    echo(&mut t, &peer, peer_addr, 100);
    let text = metrics6().expect("metrics");
    let get = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    };
    let kp = get("relay_xdp_packets_total{direction=\"to_peer\"}");
    let kc = get("relay_xdp_packets_total{direction=\"to_client\"}");
    assert!(
        kp >= 90 && kc >= 90,
        "kernel carried {kp}/{kc} of 100 IPv6 packets each way\n{text}"
    );
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn xdp_load_failures_fall_back_to_user_space() {
    // No such interface: one line says why; relaying works in user space.
    let x = XdpLab::new(&["--xdp", "nosuchif0"]);
    let log = x.log();
    let line = log
        .lines()
        .find(|l| l.contains("XDP fast path off"))
        .unwrap_or_else(|| panic!("no reason logged:\n{log}"));
    assert!(
        line.contains("nosuchif0") && line.contains("relaying in user space"),
        "{line}"
    );
    assert!(
        !x.try_metrics().expect("metrics").contains("relay_xdp_"),
        "XDP metrics without XDP"
    );
    let peer_addr = SocketAddr::from((x.peer_ip, 4000));
    let peer = x.lab.udp_socket("peer", 4000).expect("peer socket");
    let mut t = x.turn_client(SocketAddr::from((x.relay_ip, 3478)), false);
    t.bind(peer_addr);
    echo(&mut t, &peer, peer_addr, 20);
    assert_eq!((x.user("to_peer"), x.user("to_client")), (20, 20));

    // Forwarding off on the interface: the kernel would resolve no route
    // for the program, so the relay does not load it and says so.
    sh(
        &x.lab,
        "relay",
        "sysctl -qw net.ipv4.conf.eth0.forwarding=0",
    );
    let argv: Vec<String> = vec![
        wgice_tests::workspace_bin("relay").display().to_string(),
        "--listen".into(),
        format!("{}:3479", x.relay_ip),
        "--user".into(),
        "u:p".into(),
        "--xdp".into(),
        "auto".into(),
    ];
    x.lab
        .spawn("relay2", "relay", &argv, &[], &x.out)
        .expect("relay2");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(x.out.join("relay2.stdout")).unwrap_or_default()
            + &std::fs::read_to_string(x.out.join("relay2.stderr")).unwrap_or_default();
        if log.contains("relay serving") {
            assert!(
                log.contains("XDP fast path off: forwarding is off on eth0"),
                "{log}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "relay2 did not start:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn xdp_enforces_the_bandwidth_cap() {
    // 40,000 B/s: a bucket of a quarter second plus 64 KiB (75,536 bytes,
    // 62 payloads of 1200 bytes), refilled at 40 bytes per millisecond.
    let x = XdpLab::new(&["--xdp", "eth0", "--bandwidth-limit", "40000"]);
    let peer_addr = SocketAddr::from((x.peer_ip, 4000));
    let peer = x.lab.udp_socket("peer", 4000).expect("peer socket");
    let mut t = x.turn_client(SocketAddr::from((x.relay_ip, 3478)), false);
    t.bind(peer_addr);
    let start = Instant::now();
    for _ in 0..300 {
        t.send(peer_addr, &[0x55; 1200]);
    }
    let sending = start.elapsed();
    let mut got = 0u64;
    while recv_on(&peer, Duration::from_millis(300)).is_some() {
        got += 1;
    }
    let allowed = (75_536 + 40_000 * (sending.as_millis() as u64 + 400) / 1000) / 1200 + 1;
    let dropped = x.metric("relay_xdp_outcomes_total{outcome=\"drop_bandwidth\"}");
    assert!(
        got <= allowed && got >= 50,
        "the peer got {got} of 300 packets in {sending:?}; the cap allows about {allowed}"
    );
    assert!(
        dropped + got >= 290,
        "kernel dropped {dropped}, peer got {got}"
    );
    assert_eq!(
        x.user("to_peer"),
        0,
        "the cap was applied in user space, not the program"
    );
}
