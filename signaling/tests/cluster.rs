//! Two instances sharing a real `nats-server`: routing and presence span
//! instances.
#![allow(clippy::unwrap_used)]

mod common;

use common::{connected, loopback, wait_for, Nats, TestServer};
use signaling::client::{Event, TransportMode};
use signaling::tls::Identity;
use signaling::{PeerMessage, PrivateKey};

#[tokio::test]
#[ignore = "needs nats-server (scripts/setup): run by bash scripts/test (cargo test -- --include-ignored)"]
async fn two_instances_route_and_share_presence_through_nats() {
    let nats = Nats::start().await;
    let id = Identity::self_signed(&["wgice-signaling".into()]).unwrap();
    // Both instances must use the same prefix to form one cluster.
    let mut cfg1 =
        signaling::server::ServerConfig::new(loopback(), id.clone(), common::mesh_auth());
    cfg1.nats = Some(nats.url.clone());
    cfg1.nats_prefix = format!("wgice.test.{}", rand::random::<u32>());
    cfg1.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let mut cfg2 = cfg1.clone();
    cfg2.listen = loopback();
    let s1 = TestServer::with_config(cfg1).await;
    let s2 = TestServer::with_config(cfg2.clone()).await;

    let (ka, kb, kc) = (
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    );
    let mut a = s1.client("red", "red-token", ka.clone(), TransportMode::QuicOnly);
    connected(&mut a).await;
    let mut b = s2.client("red", "red-token", kb.clone(), TransportMode::TcpOnly);
    connected(&mut b).await;
    // Presence across instances.
    wait_for(
        &mut a,
        "B online via NATS",
        |e| matches!(e, Event::Online(m) if m.key == kb.public_key()),
    )
    .await;
    // A node joining instance 2 later sees A (held by instance 1) in its list.
    let mut c = s2.client("red", "red-token", kc.clone(), TransportMode::QuicOnly);
    match wait_for(&mut c, "Members", |e| matches!(e, Event::Members(_))).await {
        Event::Members(m) => {
            let keys: Vec<_> = m.iter().map(|m| m.key).collect();
            assert!(
                keys.contains(&ka.public_key()) && keys.contains(&kb.public_key()),
                "{m:?}"
            );
        }
        _ => unreachable!(),
    }
    // Routing across instances, both directions.
    let offer = PeerMessage::Offer {
        session: 4,
        ufrag: "u".into(),
        pwd: "p".into(),
        candidates: vec![],
        wg_port: None,
        cert: None,
    };
    a.send(&kb.public_key(), &offer).await.unwrap();
    match wait_for(&mut b, "offer via NATS", |e| {
        matches!(e, Event::Message { .. })
    })
    .await
    {
        Event::Message { from, message } => {
            assert_eq!(from, ka.public_key());
            assert_eq!(message, offer);
        }
        _ => unreachable!(),
    }
    let bye = PeerMessage::Bye { session: 4 };
    c.send(&ka.public_key(), &bye).await.unwrap();
    wait_for(&mut a, "bye via NATS", |e| matches!(e, Event::Message { from, message } if *from == kc.public_key() && *message == bye)).await;

    // Instance 2 stops: A learns B and C went away.
    s2.stop().await;
    // Both go offline, in either order.
    let mut gone = std::collections::HashSet::new();
    while gone.len() < 2 {
        if let Event::Offline(k) = wait_for(&mut a, "B and C offline", |e| {
            matches!(e, Event::Offline(_))
        })
        .await
        {
            gone.insert(k);
        }
    }
    assert!(gone.contains(&kb.public_key()) && gone.contains(&kc.public_key()));
    let m = s1.metrics_text().await;
    assert!(m.contains("wgice_signaling_cluster_published_total"), "{m}");
    drop(b);
    drop(c);
    s1.stop().await;
}

#[tokio::test]
#[ignore = "needs nats-server (scripts/setup): run by bash scripts/test (cargo test -- --include-ignored)"]
async fn a_crashed_instance_expires_and_nodes_move_over() {
    let nats = Nats::start().await;
    let id = Identity::self_signed(&["wgice-signaling".into()]).unwrap();
    let mut cfg1 =
        signaling::server::ServerConfig::new(loopback(), id.clone(), common::mesh_auth());
    cfg1.nats = Some(nats.url.clone());
    cfg1.nats_prefix = format!("wgice.test.{}", rand::random::<u32>());
    cfg1.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let mut cfg2 = cfg1.clone();
    cfg2.listen = loopback();
    let s1 = TestServer::with_config(cfg1).await;
    let s2 = TestServer::with_config(cfg2).await;
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let mut a = s1.client("red", "red-token", ka.clone(), TransportMode::QuicOnly);
    connected(&mut a).await;
    let mut b = s2.client("red", "red-token", kb.clone(), TransportMode::QuicOnly);
    connected(&mut b).await;
    wait_for(
        &mut a,
        "B online",
        |e| matches!(e, Event::Online(m) if m.key == kb.public_key()),
    )
    .await;
    // Instance 2 vanishes without a word (its task is aborted: no Offline
    // messages); the heartbeat timeout tells instance 1.
    drop(s2);
    drop(b);
    let t = std::time::Instant::now();
    wait_for(
        &mut a,
        "B expired",
        |e| matches!(e, Event::Offline(k) if *k == kb.public_key()),
    )
    .await;
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    // B reconnects to instance 1 and is reachable again.
    let mut b = s1.client("red", "red-token", kb.clone(), TransportMode::QuicOnly);
    connected(&mut b).await;
    let m = PeerMessage::Restart { session: 1 };
    a.send(&kb.public_key(), &m).await.unwrap();
    wait_for(
        &mut b,
        "restart",
        |e| matches!(e, Event::Message { message, .. } if *message == m),
    )
    .await;
    s1.stop().await;
}
