//! One server on loopback, real QUIC and TLS/TCP clients.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{connected, loopback, wait_for, TestServer};
use signaling::auth::{prove, MeshAuth, EXPORTER_LABEL};
use signaling::client::{Event, Transport, TransportMode};
use signaling::tls::{Identity, Trust};
use signaling::wire::{self, ClientFrame, ErrorCode, ServerFrame, Undeliverable, PROTOCOL_VERSION};
use signaling::{PeerMessage, PrivateKey, PublicKey};
use tokio::io::AsyncWriteExt;

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn raw_tls(server: &TestServer) -> (Tls, [u8; 32]) {
    signaling::tls::install_provider();
    let cfg = Trust::Fingerprint(server.fingerprint)
        .client_config()
        .unwrap();
    let sock = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("wgice-signaling".try_into().unwrap(), sock)
        .await
        .unwrap();
    let binding = tls
        .get_ref()
        .1
        .export_keying_material([0u8; 32], EXPORTER_LABEL, Some(b""))
        .unwrap();
    (tls, binding)
}

async fn read(tls: &mut Tls) -> Option<ServerFrame> {
    let b = tokio::time::timeout(Duration::from_secs(5), wire::read_frame(tls, 1 << 20))
        .await
        .expect("server answers")
        .ok()??;
    Some(serde_json::from_slice(&b).unwrap())
}

async fn challenge(tls: &mut Tls) -> (PublicKey, Vec<u8>) {
    match read(tls).await {
        Some(ServerFrame::Challenge {
            server_key, nonce, ..
        }) => (server_key, nonce),
        other => panic!("expected challenge, got {other:?}"),
    }
}

/// Registers over raw TLS as `key` in mesh red.
async fn raw_register(server: &TestServer, key: &PrivateKey) -> Tls {
    let (mut tls, binding) = raw_tls(server).await;
    let (sk, nonce) = challenge(&mut tls).await;
    let proof = prove(key, &sk, &nonce, &binding, "red").unwrap();
    let reg = ClientFrame::Register {
        version: PROTOCOL_VERSION,
        mesh: "red".into(),
        token: "red-token".into(),
        key: key.public_key(),
        overlay: vec![],
        proof: proof.to_vec(),
    };
    tls.write_all(&wire::encode(&reg)).await.unwrap();
    assert!(matches!(
        read(&mut tls).await,
        Some(ServerFrame::Registered { .. })
    ));
    assert!(matches!(
        read(&mut tls).await,
        Some(ServerFrame::Members { done: true, .. })
    ));
    tls
}

fn expect_fatal(frame: Option<ServerFrame>, want: ErrorCode) {
    match frame {
        Some(ServerFrame::Error {
            code, fatal: true, ..
        }) if code == want => {}
        other => panic!("expected fatal {want:?}, got {other:?}"),
    }
}

fn offer(session: u64) -> PeerMessage {
    PeerMessage::Offer {
        session,
        ufrag: "ufrag".into(),
        pwd: "pwd-pwd-pwd".into(),
        candidates: vec!["candidate:1 1 udp 2130706431 192.0.2.7 51820 typ host".into()],
        wg_port: None,
        cert: None,
    }
}

#[tokio::test]
async fn quic_and_tcp_clients_exchange_sealed_messages_and_presence() {
    let server = TestServer::start(
        loopback(),
        Identity::self_signed(&["wgice-signaling".into()]).unwrap(),
        None,
    )
    .await;
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let mut a = server.client("red", "red-token", ka.clone(), TransportMode::QuicOnly);
    match wait_for(&mut a, "Connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await
    {
        Event::Connected { transport } => assert_eq!(transport, Transport::Quic),
        _ => unreachable!(),
    }
    let mut b = server.client("red", "red-token", kb.clone(), TransportMode::TcpOnly);
    match wait_for(&mut b, "Connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await
    {
        Event::Connected { transport } => assert_eq!(transport, Transport::Tcp),
        _ => unreachable!(),
    }
    // B's member list has A; A hears B come online.
    match wait_for(&mut b, "Members", |e| matches!(e, Event::Members(_))).await {
        Event::Members(m) => assert_eq!(
            m.iter().map(|m| m.key).collect::<Vec<_>>(),
            vec![ka.public_key()]
        ),
        _ => unreachable!(),
    }
    wait_for(
        &mut a,
        "B online",
        |e| matches!(e, Event::Online(m) if m.key == kb.public_key()),
    )
    .await;

    a.send(&kb.public_key(), &offer(1)).await.unwrap();
    match wait_for(&mut b, "offer", |e| matches!(e, Event::Message { .. })).await {
        Event::Message { from, message } => {
            assert_eq!(from, ka.public_key());
            assert_eq!(message, offer(1));
        }
        _ => unreachable!(),
    }
    let answer = PeerMessage::Answer {
        session: 1,
        ufrag: "u2".into(),
        pwd: "p2".into(),
        candidates: vec![],
        wg_port: None,
        cert: None,
    };
    b.send(&ka.public_key(), &answer).await.unwrap();
    match wait_for(&mut a, "answer", |e| matches!(e, Event::Message { .. })).await {
        Event::Message { from, message } => {
            assert_eq!(from, kb.public_key());
            assert_eq!(message, answer);
        }
        _ => unreachable!(),
    }
    // Auto mode picks QUIC when it works.
    let mut c = server.client(
        "red",
        "red-token",
        PrivateKey::generate(),
        TransportMode::Auto,
    );
    match wait_for(&mut c, "Connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await
    {
        Event::Connected { transport } => assert_eq!(transport, Transport::Quic),
        _ => unreachable!(),
    }
    drop(b);
    wait_for(
        &mut a,
        "B offline",
        |e| matches!(e, Event::Offline(k) if *k == kb.public_key()),
    )
    .await;
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("wgice_signaling_connected_nodes 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wgice_signaling_messages_routed_total 2"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn nobody_registers_a_key_they_do_not_hold() {
    let server = TestServer::start(
        loopback(),
        Identity::self_signed(&["x".into()]).unwrap(),
        None,
    )
    .await;
    let victim = PrivateKey::generate();
    let mallory = PrivateKey::generate();
    let (mut tls, binding) = raw_tls(&server).await;
    let (sk, nonce) = challenge(&mut tls).await;
    let proof = prove(&mallory, &sk, &nonce, &binding, "red").unwrap();
    let reg = ClientFrame::Register {
        version: PROTOCOL_VERSION,
        mesh: "red".into(),
        token: "red-token".into(),
        key: victim.public_key(),
        overlay: vec![],
        proof: proof.to_vec(),
    };
    tls.write_all(&wire::encode(&reg)).await.unwrap();
    expect_fatal(read(&mut tls).await, ErrorCode::AuthFailed);
    assert!(
        read(&mut tls).await.is_none(),
        "connection closed after the error"
    );

    // A proof replayed from another connection (other channel binding) fails too.
    let (mut tls2, _binding2) = raw_tls(&server).await;
    let (sk2, nonce2) = challenge(&mut tls2).await;
    let proof = prove(&victim, &sk2, &nonce2, &binding, "red").unwrap();
    let reg = ClientFrame::Register {
        version: PROTOCOL_VERSION,
        mesh: "red".into(),
        token: "red-token".into(),
        key: victim.public_key(),
        overlay: vec![],
        proof: proof.to_vec(),
    };
    tls2.write_all(&wire::encode(&reg)).await.unwrap();
    expect_fatal(read(&mut tls2).await, ErrorCode::AuthFailed);

    // Nobody got registered as the victim: a message to it is undeliverable.
    let mut a = server.client(
        "red",
        "red-token",
        PrivateKey::generate(),
        TransportMode::TcpOnly,
    );
    connected(&mut a).await;
    a.send(&victim.public_key(), &offer(1)).await.unwrap();
    wait_for(&mut a, "undeliverable", |e| {
        matches!(
            e,
            Event::Undeliverable {
                reason: Undeliverable::Offline,
                ..
            }
        )
    })
    .await;
    assert!(server
        .metrics_text()
        .await
        .contains("wgice_signaling_auth_failures_total 2"));
    server.stop().await;
}

#[tokio::test]
async fn tokens_decide_membership_and_meshes_are_isolated() {
    let server = TestServer::start(
        loopback(),
        Identity::self_signed(&["x".into()]).unwrap(),
        None,
    )
    .await;
    // Wrong token: refused, and the client keeps retrying (never Connected).
    let mut bad = server.client(
        "red",
        "blue-token",
        PrivateKey::generate(),
        TransportMode::TcpOnly,
    );
    match wait_for(&mut bad, "Disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await
    {
        Event::Disconnected { reason } => assert!(reason.contains("Forbidden"), "{reason}"),
        _ => unreachable!(),
    }
    drop(bad);
    let (kr, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let mut red = server.client("red", "red-token", kr.clone(), TransportMode::QuicOnly);
    connected(&mut red).await;
    // A derived token for a mesh not in the config works.
    let derived = MeshAuth::derive_token(common::SECRET, "blue");
    let mut blue = server.client("blue", &derived, kb.clone(), TransportMode::QuicOnly);
    connected(&mut blue).await;
    match wait_for(&mut blue, "Members", |e| matches!(e, Event::Members(_))).await {
        Event::Members(m) => assert!(m.is_empty(), "blue sees red: {m:?}"),
        _ => unreachable!(),
    }
    red.send(&kb.public_key(), &offer(1)).await.unwrap();
    wait_for(
        &mut red,
        "undeliverable",
        |e| matches!(e, Event::Undeliverable { to, .. } if *to == kb.public_key()),
    )
    .await;
    // Red heard no presence from blue in the meantime.
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), red.recv()).await {
        assert!(
            !matches!(e, Event::Online(_) | Event::Message { .. }),
            "leak across meshes: {e:?}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn garbage_gets_an_error_and_a_close_while_others_are_served() {
    let server = TestServer::start(
        loopback(),
        Identity::self_signed(&["x".into()]).unwrap(),
        None,
    )
    .await;
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let mut a = server.client("red", "red-token", ka.clone(), TransportMode::QuicOnly);
    connected(&mut a).await;

    // 1. Not even a frame: text whose first four bytes read as a huge length.
    let (mut tls, _) = raw_tls(&server).await;
    challenge(&mut tls).await;
    tls.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    expect_fatal(read(&mut tls).await, ErrorCode::Malformed);
    assert!(read(&mut tls).await.is_none());

    // 2. A frame of JSON nonsense after registering.
    let mut tls = raw_register(&server, &kb).await;
    let junk = b"{\"type\":\"launch_missiles\"}";
    let mut frame = (junk.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(junk);
    tls.write_all(&frame).await.unwrap();
    let mut got = None;
    while let Some(f) = read(&mut tls).await {
        if let ServerFrame::Error { .. } = f {
            got = Some(f);
            break;
        }
    }
    expect_fatal(got, ErrorCode::Malformed);
    assert!(read(&mut tls).await.is_none());
    wait_for(
        &mut a,
        "B offline",
        |e| matches!(e, Event::Offline(k) if *k == kb.public_key()),
    )
    .await;

    // 3. A sender claiming another key in the envelope is cut off.
    let mut tls = raw_register(&server, &kb).await;
    let forged =
        signaling::seal::seal(&PrivateKey::generate(), &ka.public_key(), 1, &offer(1)).unwrap();
    tls.write_all(&wire::encode(&ClientFrame::Send { envelope: forged }))
        .await
        .unwrap();
    let mut got = None;
    while let Some(f) = read(&mut tls).await {
        if let ServerFrame::Error { .. } = f {
            got = Some(f);
            break;
        }
    }
    expect_fatal(got, ErrorCode::Protocol);
    wait_for(
        &mut a,
        "B offline after spoofing",
        |e| matches!(e, Event::Offline(k) if *k == kb.public_key()),
    )
    .await;

    // 4. Killed mid-frame: half a frame, then the socket is dropped.
    let mut tls = raw_register(&server, &kb).await;
    wait_for(
        &mut a,
        "B online again",
        |e| matches!(e, Event::Online(m) if m.key == kb.public_key()),
    )
    .await;
    let env = signaling::seal::seal(&kb, &ka.public_key(), 1, &offer(2)).unwrap();
    let whole = wire::encode(&ClientFrame::Send { envelope: env });
    tls.write_all(&whole[..whole.len() / 2]).await.unwrap();
    tls.flush().await.unwrap();
    drop(tls);
    wait_for(
        &mut a,
        "B offline after kill",
        |e| matches!(e, Event::Offline(k) if *k == kb.public_key()),
    )
    .await;

    // The well-behaved client is still served.
    let mut b = server.client("red", "red-token", kb.clone(), TransportMode::TcpOnly);
    connected(&mut b).await;
    a.send(&kb.public_key(), &offer(3)).await.unwrap();
    wait_for(
        &mut b,
        "offer",
        |e| matches!(e, Event::Message { message, .. } if *message == offer(3)),
    )
    .await;
    let m = server.metrics_text().await;
    assert!(m.contains("wgice_signaling_protocol_errors_total 3"), "{m}");
    server.stop().await;
}

#[tokio::test]
async fn client_reconnects_after_restart_and_resumes_registration() {
    let identity = Identity::self_signed(&["x".into()]).unwrap();
    let server = TestServer::start(loopback(), identity.clone(), None).await;
    let addr = server.addr;
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let mut a = server.client("red", "red-token", ka.clone(), TransportMode::Auto);
    let mut b = server.client("red", "red-token", kb.clone(), TransportMode::TcpOnly);
    connected(&mut a).await;
    connected(&mut b).await;
    // Graceful stop: clients are told why.
    server.stop().await;
    match wait_for(&mut a, "Disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await
    {
        Event::Disconnected { reason } => assert!(reason.contains("ShuttingDown"), "{reason}"),
        _ => unreachable!(),
    }
    assert!(a.send(&kb.public_key(), &offer(1)).await.is_err());
    // Same address, same certificate: both come back by themselves.
    let server = TestServer::start(addr, identity, None).await;
    connected(&mut a).await;
    connected(&mut b).await;
    // Registration resumed: the two see each other and can talk again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        a.send(&kb.public_key(), &offer(9)).await.unwrap();
        let got = tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                if let Some(Event::Message { message, .. }) = b.recv().await {
                    return message;
                }
            }
        })
        .await;
        if let Ok(m) = got {
            assert_eq!(m, offer(9));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery after reconnect"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_blocks_nobody() {
    let mut cfg = signaling::server::ServerConfig::new(
        loopback(),
        Identity::self_signed(&["x".into()]).unwrap(),
        common::mesh_auth(),
    );
    cfg.queue_len = 8;
    cfg.router.rate_per_sec = 1e6;
    cfg.router.rate_burst = 1e6;
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = TestServer::with_config(cfg).await;
    let (ka, kb, kc) = (
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    );
    // B registers over raw TLS and never reads again.
    let _stuck = raw_register(&server, &kb).await;
    let mut a = server.client("red", "red-token", ka.clone(), TransportMode::TcpOnly);
    connected(&mut a).await;
    let mut c = server.client("red", "red-token", kc.clone(), TransportMode::QuicOnly);
    connected(&mut c).await;
    // A floods B with far more than B's queue and socket buffers hold.
    let big = PeerMessage::Offer {
        session: 1,
        ufrag: "u".into(),
        pwd: "p".into(),
        candidates: vec!["candidate:1 1 udp 1 192.0.2.1 1 typ host".repeat(20); 10],
        wg_port: None,
        cert: None,
    };
    for _ in 0..3000 {
        a.send(&kb.public_key(), &big).await.unwrap();
    }
    // Meanwhile A and C still talk promptly.
    let t = std::time::Instant::now();
    a.send(&kc.public_key(), &offer(5)).await.unwrap();
    wait_for(
        &mut c,
        "offer to C",
        |e| matches!(e, Event::Message { message, .. } if *message == offer(5)),
    )
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "delivery to C took {:?}",
        t.elapsed()
    );
    let m = server.metrics_text().await;
    let drops: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("wgice_signaling_drops_queue_full_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(drops > 0, "B's queue never overflowed: {m}");
    server.stop().await;
}

/// Forwards TCP from a fresh port to `to`; nothing listens on that port's
/// UDP side, as behind a firewall that blocks UDP.
async fn tcp_only_front(
    to: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn auto_mode_falls_back_to_tls_over_tcp_when_udp_is_blocked() {
    let server = TestServer::start(
        loopback(),
        Identity::self_signed(&["x".into()]).unwrap(),
        None,
    )
    .await;
    let (front, front_task) = tcp_only_front(server.addr).await;
    let key = PrivateKey::generate();
    let mut cfg = signaling::client::ClientConfig::new(
        front.to_string(),
        Trust::Fingerprint(server.fingerprint),
        "red",
        "red-token",
        key.clone(),
    );
    cfg.connect_timeout = Duration::from_secs(1);
    let mut c = signaling::client::Client::start(cfg).unwrap();
    match wait_for(&mut c, "Connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await
    {
        Event::Connected { transport } => assert_eq!(transport, Transport::Tcp),
        _ => unreachable!(),
    }
    // And it works: a QUIC peer reaches it.
    let mut q = server.client(
        "red",
        "red-token",
        PrivateKey::generate(),
        TransportMode::QuicOnly,
    );
    connected(&mut q).await;
    q.send(&key.public_key(), &offer(8)).await.unwrap();
    wait_for(
        &mut c,
        "offer",
        |e| matches!(e, Event::Message { message, .. } if *message == offer(8)),
    )
    .await;
    front_task.abort();
    server.stop().await;
}

#[tokio::test]
async fn one_address_cannot_hold_the_server_with_unregistered_connections() {
    use tokio::io::AsyncReadExt;
    let mut cfg = signaling::server::ServerConfig::new(
        loopback(),
        Identity::self_signed(&["x".into()]).unwrap(),
        common::mesh_auth(),
    );
    cfg.max_pending_per_ip = 4;
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = TestServer::with_config(cfg).await;
    // Four connections that never speak hold this address's pending slots.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A fifth from the same address is closed at once, not after the
    // 10 s registration timeout.
    let mut fifth = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(3), fifth.read(&mut b))
        .await
        .expect("the fifth connection was not closed promptly");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let m = server.metrics_text().await;
    assert!(m.contains("wgice_signaling_refused_pending_total 1"), "{m}");
    // Once they are gone, a node from that address registers as usual.
    drop(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut a = server.client(
        "red",
        "red-token",
        PrivateKey::generate(),
        TransportMode::TcpOnly,
    );
    connected(&mut a).await;
    server.stop().await;
}
