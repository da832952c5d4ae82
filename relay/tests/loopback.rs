//! Driver tests on loopback: the real relay (UDP workers, TCP and TLS shard,
//! metrics) against our sans-IO client over real sockets, and against the
//! `turn` crate's client, an implementation no one here wrote.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use relay::client::{Client, ClientConfig, ClientEvent};
use relay::config::Args;
use relay::driver::Relay;
use relay::stun;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

struct Tls {
    cert_pem: String,
    dir: std::path::PathBuf,
}

fn make_cert(tag: &str) -> Tls {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let dir = std::env::temp_dir().join(format!("wgice-relay-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).expect("write");
    std::fs::write(dir.join("key.pem"), ck.key_pair.serialize_pem()).expect("write");
    Tls {
        cert_pem: ck.cert.pem(),
        dir,
    }
}

async fn start_relay(extra: &[&str], tls: Option<&Tls>) -> Relay {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = vec![
        "relay",
        "--listen",
        "127.0.0.1:0",
        "--tcp-listen",
        "127.0.0.1:0",
        "--user",
        "alice:wonderland",
        "--auth-secret",
        "s3cret",
        "--allow-peer",
        "127.0.0.0/8",
        "--metrics",
        "127.0.0.1:0",
        "--workers",
        "2",
    ];
    args.extend_from_slice(extra);
    let (c, k);
    if let Some(t) = tls {
        c = t.dir.join("cert.pem").to_string_lossy().into_owned();
        k = t.dir.join("key.pem").to_string_lossy().into_owned();
        args.extend_from_slice(&["--tls-listen", "127.0.0.1:0", "--cert", &c, "--key", &k]);
    }
    let cfg = Args::parse_from(args).resolve().expect("config");
    Relay::start(&cfg).await.expect("relay starts")
}

/// A UDP echo peer on loopback; returns its address. It sits on 127.0.0.2:
/// the relay's own address (127.0.0.1) is never a peer, whatever
/// `--allow-peer` says, except for its live relayed ports.
async fn echo_peer() -> SocketAddr {
    echo_peer_at("127.0.0.2:0").await
}

async fn echo_peer_at(bind: &str) -> SocketAddr {
    let s = UdpSocket::bind(bind).await.expect("bind");
    let a = s.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    a
}

enum Conn {
    Udp(UdpSocket, SocketAddr),
    Stream(Box<dyn Stream>, Vec<u8>),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl Conn {
    async fn send(&mut self, d: &[u8]) {
        match self {
            Conn::Udp(s, to) => {
                s.send_to(d, *to).await.expect("send");
            }
            Conn::Stream(s, _) => s.write_all(d).await.expect("write"),
        }
    }
    async fn recv(&mut self) -> Option<Vec<u8>> {
        match self {
            Conn::Udp(s, _) => {
                let mut b = vec![0u8; 2048];
                let n = s.recv(&mut b).await.ok()?;
                b.truncate(n);
                Some(b)
            }
            Conn::Stream(s, buf) => loop {
                if let Ok(Some(n)) = stun::stream_frame_len(buf) {
                    return Some(buf.drain(..n).collect());
                }
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            },
        }
    }
}

/// Runs the client until `done` says stop or the deadline passes; returns received peer data.
async fn drive(
    client: &mut Client,
    conn: &mut Conn,
    events: &mut Vec<ClientEvent>,
    data: &mut Vec<(SocketAddr, Vec<u8>)>,
    mut done: impl FnMut(&[ClientEvent], &[(SocketAddr, Vec<u8>)]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        while let Some(t) = client.poll_transmit() {
            conn.send(&t).await;
        }
        while let Some(e) = client.poll_event() {
            events.push(e);
        }
        if done(events, data) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out; events {events:?}");
        let wake = client
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_millis(200))
            .min(Instant::now() + Duration::from_millis(200));
        tokio::select! {
            r = conn.recv() => {
                let Some(d) = r else { panic!("connection closed; events {events:?}") };
                if let Some((p, payload)) = client.handle_input(Instant::now(), &d) {
                    data.push((p, payload.to_vec()));
                }
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => client.handle_timeout(Instant::now()),
        }
    }
}

async fn relay_round_trip(conn: Conn, reliable: bool, user: &str, pass: &str) {
    let peer = echo_peer().await;
    relay_round_trip_via(conn, reliable, user, pass, peer).await;
}

async fn relay_round_trip_via(
    mut conn: Conn,
    reliable: bool,
    user: &str,
    pass: &str,
    peer: SocketAddr,
) {
    let mut cc = ClientConfig::new(user, pass);
    cc.reliable = reliable;
    let mut client = Client::new(cc, rand::random());
    let (mut ev, mut data) = (Vec::new(), Vec::new());
    client.allocate(Instant::now());
    drive(&mut client, &mut conn, &mut ev, &mut data, |e, _| {
        e.iter().any(|e| matches!(e, ClientEvent::Allocated { .. }))
    })
    .await;
    assert_eq!(
        client.relayed()[0].is_ipv4(),
        peer.is_ipv4(),
        "relayed address in the peer's family"
    );
    // Send indication first (permission only), then ChannelData.
    client.create_permission(Instant::now(), peer.ip());
    drive(&mut client, &mut conn, &mut ev, &mut data, |e, _| {
        e.iter()
            .any(|e| matches!(e, ClientEvent::PermissionCreated(_)))
    })
    .await;
    let mut out = Vec::new();
    client.encode_to(peer, b"send-indication", &mut out);
    conn.send(&out).await;
    drive(&mut client, &mut conn, &mut ev, &mut data, |_, d| {
        !d.is_empty()
    })
    .await;
    assert_eq!(data.pop(), Some((peer, b"send-indication".to_vec())));
    client.bind_channel(Instant::now(), peer);
    drive(&mut client, &mut conn, &mut ev, &mut data, |e, _| {
        e.iter()
            .any(|e| matches!(e, ClientEvent::ChannelBound { .. }))
    })
    .await;
    for i in 0..50u32 {
        let payload = format!("wireguard packet {i} {}", "x".repeat(i as usize));
        out.clear();
        client.encode_to(peer, payload.as_bytes(), &mut out);
        assert!(stun::channel_data::is_channel_data(&out));
        conn.send(&out).await;
        drive(&mut client, &mut conn, &mut ev, &mut data, |_, d| {
            !d.is_empty()
        })
        .await;
        assert_eq!(data.pop(), Some((peer, payload.into_bytes())));
    }
    if !reliable {
        // An oversized datagram (jumbo, 3000 bytes) is dropped whole, never
        // relayed truncated; the next packet still goes through.
        out.clear();
        client.encode_to(peer, &[7u8; 3000], &mut out);
        conn.send(&out).await;
        out.clear();
        client.encode_to(peer, b"after jumbo", &mut out);
        conn.send(&out).await;
        drive(&mut client, &mut conn, &mut ev, &mut data, |_, d| {
            !d.is_empty()
        })
        .await;
        assert_eq!(data.pop(), Some((peer, b"after jumbo".to_vec())));
        assert!(data.is_empty(), "nothing else came back: {data:?}");
    }
    client.deallocate(Instant::now());
    drive(&mut client, &mut conn, &mut ev, &mut data, |e, _| {
        e.contains(&ClientEvent::Deallocated)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_tcp_and_tls_clients_relay_both_ways() {
    let tls = make_cert("rt");
    let relay = start_relay(&["--relay-ports", "41000-41999"], Some(&tls)).await;

    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    relay_round_trip(Conn::Udp(s, relay.udp[0]), false, "alice", "wonderland").await;

    let t = TcpStream::connect(relay.tcp[0]).await.expect("tcp");
    relay_round_trip(
        Conn::Stream(Box::new(t), Vec::new()),
        true,
        "alice",
        "wonderland",
    )
    .await;

    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut tls.cert_pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let t = TcpStream::connect(relay.tls[0]).await.expect("tcp");
    let t = conn
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").expect("name"),
            t,
        )
        .await
        .expect("tls handshake");
    // REST credentials over TLS.
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs();
    let user = relay::auth::rest_username(unix + 600, "tls-user");
    let pass = relay::auth::rest_password("s3cret", &user);
    relay_round_trip(Conn::Stream(Box::new(t), Vec::new()), true, &user, &pass).await;

    // Metrics saw it all.
    let mut m = TcpStream::connect(relay.metrics.expect("metrics"))
        .await
        .expect("metrics");
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    m.read_to_string(&mut body).await.expect("read");
    let value = |name: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in {body}"))
    };
    assert_eq!(value("relay_allocations_created_total"), 3);
    assert!(value("relay_packets_to_peer_total") >= 153);
    assert!(value("relay_packets_to_client_total") >= 153);
    assert_eq!(value("relay_allocations"), 0);
    let _ = std::fs::remove_dir_all(&tls.dir);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_denied_peers_do_not_disturb_the_relay() {
    let relay = start_relay(&["--relay-ports", "42000-42999"], None).await;
    let junk = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut x = 0x1234_5678u32;
    for i in 0..5000u32 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let len = (x % 200) as usize;
        let mut d: Vec<u8> = (0..len).map(|k| (x >> (k % 24)) as u8).collect();
        if i % 3 == 0 && d.len() >= 20 {
            d[0] = 0;
            d[1] = 3;
            d[4..8].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        }
        if i % 5 == 0 && !d.is_empty() {
            d[0] = 0x40;
        }
        let _ = junk.send_to(&d, relay.udp[0]).await;
    }
    // Garbage over TCP closes that connection only.
    let mut t = TcpStream::connect(relay.tcp[0]).await.expect("tcp");
    t.write_all(&[0xff; 64]).await.expect("write");
    let mut b = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), t.read(&mut b))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)));

    // Still serving: a normal client works, and denied peers get 403.
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    relay_round_trip(Conn::Udp(s, relay.udp[0]), false, "alice", "wonderland").await;
    relay.stop().await;

    // A relay with the default peer policy (no --allow-peer).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = Args::parse_from([
        "relay",
        "--listen",
        "127.0.0.1:0",
        "--user",
        "alice:wonderland",
        "--relay-ports",
        "44000-44999",
    ])
    .resolve()
    .expect("config");
    let relay = Relay::start(&cfg).await.expect("start");
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut conn = Conn::Udp(s, relay.udp[0]);
    let mut client = Client::new(ClientConfig::new("alice", "wonderland"), rand::random());
    let (mut ev, mut data) = (Vec::new(), Vec::new());
    client.allocate(Instant::now());
    drive(&mut client, &mut conn, &mut ev, &mut data, |e, _| {
        e.iter().any(|e| matches!(e, ClientEvent::Allocated { .. }))
    })
    .await;
    for bad in [
        "127.0.0.1",
        "0.0.0.0",
        "::ffff:127.0.0.1",
        "169.254.169.254",
        "10.1.2.3",
    ] {
        ev.clear();
        client.create_permission(Instant::now(), bad.parse().expect("ip"));
        drive(&mut client, &mut conn, &mut ev, &mut data, |e, _| {
            !e.is_empty()
        })
        .await;
        assert!(
            matches!(&ev[0], ClientEvent::Failed { code: 403, reason, .. } if reason.contains("--allow-peer")),
            "{bad}: {ev:?}"
        );
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_crate_client_allocates_and_relays() {
    use webrtc_util::Conn as _;
    let relay = start_relay(
        &["--relay-ports", "45000-45999", "--realm", "wgice.test"],
        None,
    )
    .await;
    let peer = echo_peer().await;
    for (user, pass) in [("alice".to_owned(), "wonderland".to_owned()), {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("t")
            .as_secs();
        let u = relay::auth::rest_username(unix + 600, "webrtc");
        let p = relay::auth::rest_password("s3cret", &u);
        (u, p)
    }] {
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let cfg = turn::client::ClientConfig {
            stun_serv_addr: relay.udp[0].to_string(),
            turn_serv_addr: relay.udp[0].to_string(),
            username: user,
            password: pass,
            realm: "wgice.test".to_owned(),
            software: String::new(),
            rto_in_ms: 0,
            conn: sock,
            vnet: None,
        };
        let client = turn::client::Client::new(cfg).await.expect("client");
        client.listen().await.expect("listen");
        let mapped = client.send_binding_request().await.expect("binding");
        assert_eq!(mapped.ip().to_string(), "127.0.0.1");
        let rc = client.allocate().await.expect("allocate");
        let relayed = rc.local_addr().expect("relayed addr");
        assert_eq!(relayed.ip().to_string(), "127.0.0.1");
        for i in 0..20 {
            let msg = format!("hello {i}");
            rc.send_to(msg.as_bytes(), peer).await.expect("send");
            let mut buf = [0u8; 1500];
            let (n, from) = tokio::time::timeout(Duration::from_secs(5), rc.recv_from(&mut buf))
                .await
                .expect("echo in time")
                .expect("recv");
            assert_eq!(from, peer);
            assert_eq!(&buf[..n], msg.as_bytes());
        }
        rc.close().await.expect("close relay conn");
        client.close().await.expect("close");
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_clients_relay_to_relay() {
    assert!(
        std::net::UdpSocket::bind("[::1]:0").is_ok(),
        "this host has no IPv6 loopback (::1): the IPv6 relay test cannot run"
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    // ::1 is the relay's own address, so the only IPv6 peers loopback offers
    // are the relay's own relayed ports: two allocations talking through each
    // other (relay-to-relay, as between two symmetric NATs).
    let cfg = Args::parse_from([
        "relay",
        "--listen",
        "[::1]:0",
        "--user",
        "alice:wonderland",
        "--allow-peer",
        "::1/128",
        "--relay-ports",
        "46000-46999",
    ])
    .resolve()
    .expect("config");
    let relay = Relay::start(&cfg).await.expect("start");
    let mut ends = Vec::new();
    for _ in 0..2 {
        let s = UdpSocket::bind("[::1]:0").await.expect("bind");
        let mut conn = Conn::Udp(s, relay.udp[0]);
        let mut client = Client::new(ClientConfig::new("alice", "wonderland"), rand::random());
        let (mut ev, mut data) = (Vec::new(), Vec::new());
        client.allocate(Instant::now());
        drive(&mut client, &mut conn, &mut ev, &mut data, |e, _| {
            e.iter().any(|e| matches!(e, ClientEvent::Allocated { .. }))
        })
        .await;
        assert!(client.relayed()[0].is_ipv6());
        ends.push((client, conn, ev, data));
    }
    let relayed: Vec<SocketAddr> = ends.iter().map(|e| e.0.relayed()[0]).collect();
    for (i, (client, conn, ev, data)) in ends.iter_mut().enumerate() {
        client.bind_channel(Instant::now(), relayed[1 - i]);
        drive(client, conn, ev, data, |e, _| {
            e.iter()
                .any(|e| matches!(e, ClientEvent::ChannelBound { .. }))
        })
        .await;
    }
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        let mut out = Vec::new();
        ends[from]
            .0
            .encode_to(relayed[to], b"over two IPv6 allocations", &mut out);
        ends[from].1.send(&out).await;
        let (client, conn, ev, data) = &mut ends[to];
        drive(client, conn, ev, data, |_, d| !d.is_empty()).await;
        assert_eq!(
            data.pop(),
            Some((relayed[from], b"over two IPv6 allocations".to_vec()))
        );
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_stream_slot() {
    let relay = start_relay(&["--relay-ports", "47000-47999"], None).await;
    let mut held = Vec::new();
    for _ in 0..256 {
        held.push(TcpStream::connect(relay.tcp[0]).await.expect("connect"));
    }
    // The 257th from the same address is closed at once.
    let mut extra = TcpStream::connect(relay.tcp[0]).await.expect("connect");
    let mut b = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut b))
        .await
        .expect("closed in time");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    // Closing some gives the address room again.
    held.truncate(200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = TcpStream::connect(relay.tcp[0]).await.expect("connect");
    let r = tokio::time::timeout(Duration::from_millis(500), again.read(&mut b)).await;
    assert!(
        r.is_err(),
        "a connection within the quota stays open (read timed out): {r:?}"
    );
    drop(held);
    relay.stop().await;
}

/// The first non-loopback IPv4 address of this host's interfaces (`ip -o -4 addr`).
fn non_loopback_ipv4() -> Option<std::net::Ipv4Addr> {
    let out = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .filter_map(|cidr| cidr.split('/').next()?.parse::<std::net::Ipv4Addr>().ok())
        .find(|ip| !ip.is_loopback())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_peer_cannot_open_the_hosts_other_addresses() {
    // The relay listens on loopback only, yet this host's other interface
    // addresses are its own too: an --allow-peer range that covers one must
    // not make the host's services reachable through an allocation.
    // (Nothing is sent there: the test only asks for a channel.)
    let host_ip = non_loopback_ipv4()
        .expect("this host has no non-loopback IPv4 address: the own-address test cannot run");
    let allow = format!("{host_ip}/32");
    let relay = start_relay(
        &["--relay-ports", "48000-48999", "--allow-peer", &allow],
        None,
    )
    .await;
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut conn = Conn::Udp(s, relay.udp[0]);
    let mut client = Client::new(ClientConfig::new("alice", "wonderland"), rand::random());
    let (mut ev, mut data) = (Vec::new(), Vec::new());
    client.allocate(Instant::now());
    drive(&mut client, &mut conn, &mut ev, &mut data, |e, _| {
        e.iter().any(|e| matches!(e, ClientEvent::Allocated { .. }))
    })
    .await;
    ev.clear();
    client.bind_channel(Instant::now(), SocketAddr::from((host_ip, 22)));
    drive(&mut client, &mut conn, &mut ev, &mut data, |e, _| {
        !e.is_empty()
    })
    .await;
    assert!(
        matches!(&ev[0], ClientEvent::Failed { code: 403, reason, .. } if reason.contains("live relayed ports")),
        "{host_ip}:22 is this host: {ev:?}"
    );
    relay.stop().await;
}

/// Reads one STUN/ChannelData frame; None when the stream closed.
async fn read_frame(t: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Ok(Some(n)) = stun::stream_frame_len(buf) {
            return Some(buf.drain(..n).collect());
        }
        let mut chunk = [0u8; 2048];
        match t.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_clients_must_authenticate_to_keep_their_slot() {
    let relay = start_relay(&["--relay-ports", "49000-49099"], None).await;
    // One client authenticates (allocates) over TCP…
    let t = TcpStream::connect(relay.tcp[0]).await.expect("tcp");
    let mut authed = Conn::Stream(Box::new(t), Vec::new());
    let mut cc = ClientConfig::new("alice", "wonderland");
    cc.reliable = true;
    let mut client = Client::new(cc, rand::random());
    let (mut ev, mut data) = (Vec::new(), Vec::new());
    client.allocate(Instant::now());
    drive(&mut client, &mut authed, &mut ev, &mut data, |e, _| {
        e.iter().any(|e| matches!(e, ClientEvent::Allocated { .. }))
    })
    .await;
    // …another only talks: a Binding request every second, each answered.
    let start = Instant::now();
    let mut talker = TcpStream::connect(relay.tcp[0]).await.expect("tcp");
    let mut buf = Vec::new();
    let closed_after = loop {
        let mut req = Vec::new();
        stun::MessageBuilder::new(
            &mut req,
            stun::method::BINDING,
            stun::Class::Request,
            rand::random(),
        );
        if talker.write_all(&req).await.is_err() {
            break start.elapsed();
        }
        match tokio::time::timeout(Duration::from_secs(2), read_frame(&mut talker, &mut buf)).await
        {
            Ok(None) => break start.elapsed(),
            Ok(Some(_)) => {}
            Err(_) => panic!("no Binding answer within 2 s"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "an unauthenticated stream client that keeps talking was kept past 15 s"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(
        closed_after >= Duration::from_secs(9),
        "closed too early: {closed_after:?}"
    );
    // The authenticated client is still served on its connection.
    ev.clear();
    client.refresh_now(Instant::now());
    drive(&mut client, &mut authed, &mut ev, &mut data, |e, _| {
        e.iter().any(|e| matches!(e, ClientEvent::Refreshed { .. }))
    })
    .await;
    relay.stop().await;
}
