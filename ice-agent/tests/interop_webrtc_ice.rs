//! Interop: our `PeerSession` against the webrtc-rs ICE agent
//! (`webrtc-ice` 0.17, an implementation no one here wrote) on loopback,
//! in both roles, with real UDP sockets and the real clock.
//!
//! Passing means: the two agents agree on credentials and candidate syntax,
//! each answers the other's checks (MESSAGE-INTEGRITY, FINGERPRINT,
//! ICE-CONTROLLING/ICE-CONTROLLED, USE-CANDIDATE), nomination completes on
//! both sides, and non-STUN datagrams (WireGuard-like) flow both ways on the
//! nominated pair.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ice_agent::{Candidate, IceCreds, PathKind, PeerSession, SessionConfig, Via};
use tokio::sync::mpsc;
use webrtc_ice::agent::agent_config::AgentConfig;
use webrtc_ice::agent::Agent;
use webrtc_ice::candidate::candidate_base::unmarshal_candidate;
use webrtc_ice::candidate::CandidateType;
use webrtc_ice::mdns::MulticastDnsMode;
use webrtc_ice::network_type::NetworkType;
use webrtc_util::Conn;

const WG_DATA: &[u8] = b"\x04\0\0\0wireguard-data-from-wgice";
const THEIR_DATA: &[u8] = b"\x04\0\0\0wireguard-data-from-webrtc";

async fn webrtc_agent(controlling: bool) -> (Arc<Agent>, Vec<String>) {
    let agent = Agent::new(AgentConfig {
        network_types: vec![NetworkType::Udp4],
        candidate_types: vec![CandidateType::Host],
        multicast_dns_mode: MulticastDnsMode::Disabled,
        include_loopback: true,
        ip_filter: Arc::new(Some(Box::new(|ip: IpAddr| ip.is_loopback()))),
        is_controlling: controlling,
        ..Default::default()
    })
    .await
    .unwrap();
    let agent = Arc::new(agent);
    let (tx, mut rx) = mpsc::unbounded_channel::<Option<String>>();
    agent.on_candidate(Box::new(move |c| {
        let tx = tx.clone();
        Box::pin(async move {
            let _ = tx.send(c.map(|c| c.marshal()));
        })
    }));
    agent.gather_candidates().unwrap();
    let mut candidates = Vec::new();
    while let Some(Some(c)) = rx.recv().await {
        candidates.push(c);
    }
    assert!(
        !candidates.is_empty(),
        "webrtc-ice gathered no loopback candidate"
    );
    (agent, candidates)
}

/// Drives our session on a real socket until its path is direct and it has
/// received `THEIR_DATA`; sends `WG_DATA` on the path every 50 ms once
/// there is one. Returns the path kind reached and whether data arrived.
fn drive_ours(
    mut session: PeerSession,
    socket: UdpSocket,
    deadline: Duration,
) -> (PeerSession, bool) {
    let local = socket.local_addr().unwrap();
    let start = Instant::now();
    let mut buf = vec![0u8; 2048];
    let mut got_data = false;
    let mut next_data = start;
    while start.elapsed() < deadline {
        let now = Instant::now();
        while let Some(t) = session.poll_transmit() {
            assert_eq!(t.via, Via::Socket);
            socket.send_to(&t.contents, t.destination).unwrap();
        }
        while session.poll_event().is_some() {}
        let path = session.path().clone();
        if path.kind.is_direct() && now >= next_data {
            socket.send_to(WG_DATA, path.remote.unwrap()).unwrap();
            next_data = now + Duration::from_millis(50);
        }
        if got_data && path.kind.is_direct() {
            break;
        }
        let wake = session
            .poll_timeout()
            .unwrap_or(now + Duration::from_millis(50))
            .min(next_data.max(now + Duration::from_millis(1)));
        let wait = wake
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        socket.set_read_timeout(Some(wait)).unwrap();
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let now = Instant::now();
                if buf[..n] == *THEIR_DATA {
                    got_data = true;
                    session.note_data_rx(now, from, local);
                } else {
                    session.handle_stun(now, from, local, &buf[..n]);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("recv: {e}"),
        }
        let now = Instant::now();
        if session.poll_timeout().is_some_and(|t| t <= now) {
            session.handle_timeout(now);
        }
    }
    (session, got_data)
}

async fn interop(we_control: bool) {
    let (agent, their_candidates) = webrtc_agent(!we_control).await;
    let (their_ufrag, their_pwd) = agent.get_local_user_credentials().await;

    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = socket.local_addr().unwrap();
    let now = Instant::now();
    let mut cfg = SessionConfig::new(we_control, 42);
    cfg.local_networks = vec!["127.0.0.0/8".parse().unwrap()];
    let mut session = PeerSession::new(cfg, now);
    let ours = session
        .add_local_candidate(now, Candidate::host(local, "udp").unwrap())
        .unwrap();
    session.set_remote_credentials(
        now,
        IceCreds {
            ufrag: their_ufrag,
            pass: their_pwd,
        },
    );
    for c in &their_candidates {
        session
            .add_remote_candidate_sdp(now, &format!("candidate:{c}"))
            .unwrap();
    }

    // Our candidate in webrtc-ice's syntax: no "candidate:" prefix, no ufrag.
    let sdp = ours.to_sdp_string();
    let sdp = sdp.strip_prefix("candidate:").unwrap();
    let sdp = sdp.split(" ufrag ").next().unwrap();
    let theirs: Arc<dyn webrtc_ice::candidate::Candidate + Send + Sync> =
        Arc::new(unmarshal_candidate(sdp).unwrap());
    agent.add_remote_candidate(&theirs).unwrap();

    let our_creds = session.local_credentials().clone();
    let (_cancel_tx, cancel_rx) = mpsc::channel(1);
    let agent2 = Arc::clone(&agent);
    let their_side = tokio::spawn(async move {
        let conn = if we_control {
            agent2
                .accept(cancel_rx, our_creds.ufrag, our_creds.pass)
                .await
                .map(|c| c as Arc<dyn Conn + Send + Sync>)
        } else {
            agent2
                .dial(cancel_rx, our_creds.ufrag, our_creds.pass)
                .await
                .map(|c| c as Arc<dyn Conn + Send + Sync>)
        }
        .unwrap();
        // Send our data until told to stop, and check we get theirs.
        let mut got = false;
        let mut buf = vec![0u8; 2048];
        for _ in 0..100 {
            conn.send(THEIR_DATA).await.unwrap();
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(50), conn.recv(&mut buf)).await
            {
                if buf[..n] == *WG_DATA {
                    got = true;
                    break;
                }
            }
        }
        got
    });

    let (session, we_got_data) =
        tokio::task::spawn_blocking(move || drive_ours(session, socket, Duration::from_secs(10)))
            .await
            .unwrap();
    let they_got_data = tokio::time::timeout(Duration::from_secs(10), their_side)
        .await
        .expect("webrtc-ice side finished")
        .unwrap();

    let path = session.path();
    println!(
        "we control: {we_control}; our path {} ({}), rtt {:?}; webrtc-ice selected {:?}",
        path.kind,
        path.reason,
        path.rtt,
        agent.get_selected_candidate_pair().map(|p| p.to_string())
    );
    assert_eq!(path.kind, PathKind::Lan, "{}", path.reason);
    assert_eq!(path.local, Some(local));
    assert!(their_candidates
        .iter()
        .any(|c| c.contains(&format!(" {} ", path.remote.unwrap().port()))));
    assert!(we_got_data, "no data from webrtc-ice on the nominated pair");
    assert!(they_got_data, "webrtc-ice got no data from us");
    assert!(agent.get_selected_candidate_pair().is_some());
    agent.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_controlling_session_against_webrtc_ice_controlled() {
    interop(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_controlled_session_against_webrtc_ice_controlling() {
    interop(false).await;
}
