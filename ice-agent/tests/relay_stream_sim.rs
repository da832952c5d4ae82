//! The agent core's relay path ladder, on a virtual clock: UDP to the relay
//! gets no answer → TCP → TLS on 443; the allocation over the stream gives
//! a relayed (UDP) candidate and no server-reflexive one; status says how
//! the relay is reached and why; a stream that breaks is reconnected the
//! same way at once, then with backoff.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ice_agent::agent::{Agent, AgentOptions, Output, RelayPath, RelaySpec, StreamEvent};
use ice_agent::turn_stream::Transport;
use relay::client::ClientConfig;
use relay::stun::{self, attr, method, Class, Integrity, Message, MessageBuilder};

const SERVER: &str = "198.51.100.2:3478";

fn agent(now: Instant, stream_only: bool) -> (Agent, SocketAddr) {
    let server: SocketAddr = SERVER.parse().expect("addr");
    let at = |transport, port| RelayPath {
        transport,
        addr: SocketAddr::new(server.ip(), port),
    };
    let mut spec = RelaySpec::udp(server, Some(ClientConfig::new("agent", "agent-pass")));
    spec.paths = if stream_only {
        vec![at(Transport::Tls, 443)]
    } else {
        vec![
            at(Transport::Udp, 3478),
            at(Transport::Tcp, 3478),
            at(Transport::Tls, 443),
        ]
    };
    spec.stream_only = stream_only;
    let opts = AgentOptions {
        port: 51821,
        host: vec!["192.168.1.10/24".parse().expect("net")],
        relays: vec![spec],
        ..AgentOptions::default()
    };
    (Agent::new(opts, now), server)
}

/// Everything the agent asks for now.
fn outputs(a: &mut Agent) -> Vec<Output> {
    std::iter::from_fn(|| a.poll_output()).collect()
}

fn connects(out: &[Output]) -> Vec<RelayPath> {
    out.iter()
        .filter_map(|o| match o {
            Output::RelayConnect { path, .. } => Some(*path),
            _ => None,
        })
        .collect()
}

fn sends_to(out: &[Output], server: SocketAddr) -> Vec<Vec<u8>> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { to, data } if *to == server => Some(data.clone()),
            _ => None,
        })
        .collect()
}

/// Plays the relay for one Allocate exchange (401, then success) over
/// whatever carries `requests`; returns what the agent sent meanwhile.
fn allocate(a: &mut Agent, now: Instant, server: SocketAddr, first: Vec<u8>) -> Vec<Output> {
    allocate_on(a, now, server, first, true)
}

fn allocate_on(
    a: &mut Agent,
    now: Instant,
    server: SocketAddr,
    first: Vec<u8>,
    stream: bool,
) -> Vec<Output> {
    let feed = |a: &mut Agent, m: &[u8]| {
        if stream {
            assert!(a.handle_stream_frame(now, server, m).is_none());
        } else {
            let local = Some("192.168.1.10".parse().expect("ip"));
            assert!(a.handle_datagram(now, server, local, m).is_none());
        }
    };
    let req = Message::parse(&first).expect("stun");
    assert_eq!(req.method(), method::ALLOCATE);
    let mut challenge = Vec::new();
    MessageBuilder::new(
        &mut challenge,
        method::ALLOCATE,
        Class::Error,
        req.transaction_id(),
    )
    .error(401, "Unauthorized")
    .attr(attr::REALM, b"wgice.test")
    .attr(attr::NONCE, b"nonce-123");
    feed(a, &challenge);
    let out = outputs(a);
    let again = sends_to(&out, server);
    assert_eq!(again.len(), 1, "{out:?}");
    let req = Message::parse(&again[0]).expect("stun");
    let key = stun::long_term_key("agent", "wgice.test", "agent-pass");
    let mut ok = Vec::new();
    MessageBuilder::new(
        &mut ok,
        method::ALLOCATE,
        Class::Success,
        req.transaction_id(),
    )
    .xor_address(
        attr::XOR_RELAYED_ADDRESS,
        "198.51.100.2:50000".parse().expect("addr"),
    )
    .xor_address(
        attr::XOR_MAPPED_ADDRESS,
        "203.0.113.7:40000".parse().expect("addr"),
    )
    .u32_attr(attr::LIFETIME, 600)
    .integrity(Integrity::Sha1, &key);
    feed(a, &ok);
    outputs(a)
}

#[test]
fn udp_blocked_falls_back_to_tcp_then_tls_443_and_says_so() {
    let t0 = Instant::now();
    let (mut a, server) = agent(t0, false);
    a.handle_timeout(t0);
    let out = outputs(&mut a);
    assert_eq!(sends_to(&out, server).len(), 1, "UDP Allocate first");
    assert!(connects(&out).is_empty());
    // UDP: no answer. Retransmits, then at 1.6 s the next path.
    let mut now = t0;
    let mut tcp = None;
    while now < t0 + Duration::from_secs(3) {
        now = a.poll_timeout().expect("timer").max(now);
        a.handle_timeout(now);
        let out = outputs(&mut a);
        if let Some(p) = connects(&out).first() {
            tcp = Some((now, *p));
            break;
        }
    }
    let (at, path) = tcp.expect("no fallback to TCP");
    assert_eq!(path.transport, Transport::Tcp);
    assert_eq!(path.addr, server);
    assert_eq!(at - t0, Duration::from_millis(1600));
    // TCP 3478 is dropped by the firewall: the driver gives up → TLS 443.
    a.handle_relay_stream(now, server, StreamEvent::Closed("no connection".into()));
    let out = outputs(&mut a);
    let tls = connects(&out);
    assert_eq!(tls.len(), 1, "{out:?}");
    assert_eq!(tls[0].transport, Transport::Tls);
    assert_eq!(tls[0].addr, "198.51.100.2:443".parse().expect("addr"));
    // UDP datagrams from the relay are ignored while a stream is used.
    assert!(a.handle_datagram(now, server, None, &[0u8; 20]).is_none());
    // Connected: the TURN client allocates over the stream.
    a.handle_relay_stream(now, server, StreamEvent::Connected);
    let out = outputs(&mut a);
    let reqs = sends_to(&out, server);
    assert_eq!(reqs.len(), 1, "{out:?}");
    let out = allocate(&mut a, now, server, reqs[0].clone());
    assert!(out.iter().all(|o| !matches!(o, Output::RelayClose { .. })));
    let rows = a.relay_status();
    assert_eq!(
        rows[0].1,
        vec!["198.51.100.2:50000".parse::<SocketAddr>().expect("addr")]
    );
    assert_eq!(rows[0].3, None, "no problem");
    assert_eq!(
        rows[0].4.as_deref(),
        Some("TLS 443 — UDP to the relay blocked")
    );
    // The TCP mapping is not a UDP server-reflexive address.
    assert_eq!(rows[0].2, None);

    // The relay restarts: the stream closes. Reconnect over TLS at once
    // (the path that worked), not from UDP.
    a.handle_relay_stream(now, server, StreamEvent::Closed("reset".into()));
    assert!(
        a.relay_status()[0].1.is_empty(),
        "relayed address withdrawn"
    );
    assert!(a.poll_timeout().is_some_and(|t| t <= now));
    a.handle_timeout(now);
    let out = outputs(&mut a);
    let again = connects(&out);
    assert_eq!(again.len(), 1, "{out:?}");
    assert_eq!(again[0].transport, Transport::Tls);
    // Still down: refused. Backoff (4 s), then TLS again.
    a.handle_relay_stream(now, server, StreamEvent::Closed("refused".into()));
    let out = outputs(&mut a);
    assert!(connects(&out).is_empty());
    let next = a.poll_timeout().expect("retry");
    assert_eq!(next - now, Duration::from_secs(4));
    now = next;
    a.handle_timeout(now);
    let out = outputs(&mut a);
    assert_eq!(connects(&out)[0].transport, Transport::Tls);
    a.handle_relay_stream(now, server, StreamEvent::Connected);
    let reqs = sends_to(&outputs(&mut a), server);
    allocate(&mut a, now, server, reqs[0].clone());
    assert_eq!(a.relay_status()[0].1.len(), 1, "allocated again");
}

#[test]
fn a_turns_url_goes_to_tls_at_once_and_blames_no_one() {
    let t0 = Instant::now();
    let (mut a, server) = agent(t0, true);
    a.handle_timeout(t0);
    let out = outputs(&mut a);
    assert!(sends_to(&out, server).is_empty(), "no UDP at all");
    assert_eq!(connects(&out)[0].transport, Transport::Tls);
    assert_eq!(a.relay_status()[0].4.as_deref(), Some("TLS 443"));
}

#[test]
fn a_udp_relay_that_goes_silent_is_not_taken_for_blocked_udp() {
    let t0 = Instant::now();
    let (mut a, server) = agent(t0, false);
    a.handle_timeout(t0);
    let reqs = sends_to(&outputs(&mut a), server);
    let out = allocate_on(&mut a, t0, server, reqs[0].clone(), false);
    assert_eq!(
        a.relay_status()[0].1.len(),
        1,
        "allocated over UDP: {:?} {out:?}",
        a.relay_status()
    );
    assert_eq!(a.relay_status()[0].4, None, "UDP: no transport note");
    // The relay goes silent (restarting, or gone): the liveness Refresh
    // gets no answer, the allocation is lost, the agent allocates again
    // over UDP — and keeps at it for the TURN client's full timeout before
    // trying a stream.
    let mut now = t0;
    let mut first_connect = None;
    while now < t0 + Duration::from_secs(120) && first_connect.is_none() {
        now = a.poll_timeout().expect("timer").max(now);
        a.handle_timeout(now);
        if !connects(&outputs(&mut a)).is_empty() {
            first_connect = Some(now - t0);
        }
    }
    let at = first_connect.expect("a stream is tried in the end");
    assert!(at >= Duration::from_secs(30), "stream tried after {at:?}");
}

#[test]
fn probe_answers_give_an_rtt_but_never_stand_in_for_the_allocation_check() {
    let t0 = Instant::now();
    let (mut a, server) = agent(t0, false);
    a.handle_timeout(t0);
    let reqs = sends_to(&outputs(&mut a), server);
    allocate_on(&mut a, t0, server, reqs[0].clone(), false);
    let local = Some("192.168.1.10".parse().expect("ip"));
    let rtt = Duration::from_millis(3);
    let (mut now, mut probes, mut refreshes) = (t0, 0, 0);
    for _ in 0..10_000 {
        if now >= t0 + Duration::from_secs(12) {
            break;
        }
        now = a.poll_timeout().expect("timer").max(now);
        a.handle_timeout(now);
        for d in sends_to(&outputs(&mut a), server) {
            let m = Message::parse(&d).expect("stun");
            if m.method() == method::BINDING {
                // The relay answers every probe after `rtt`.
                probes += 1;
                let mut ok = Vec::new();
                MessageBuilder::new(&mut ok, method::BINDING, Class::Success, m.transaction_id())
                    .xor_address(
                        attr::XOR_MAPPED_ADDRESS,
                        "203.0.113.7:40000".parse().expect("addr"),
                    );
                now += rtt;
                assert!(a.handle_datagram(now, server, local, &ok).is_none());
            } else if m.method() == method::REFRESH {
                refreshes += 1;
            }
        }
    }
    assert!(
        now >= t0 + Duration::from_secs(12),
        "the timer loop stalled"
    );
    // 1 s apart at start: probes at 0..4 s, then 9 s.
    assert!(probes >= 6, "{probes} probes");
    // Nothing but probe answers for 12 s: the allocation is still checked
    // (a Refresh after 5 s of quiet), since a Binding answer does not
    // prove the relay still holds it.
    assert!(
        refreshes >= 1,
        "probe answers stood in for the allocation check"
    );
    let (rows, note) = a.relay_choice();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].rtt, Some(rtt));
    assert!(rows[0].active && !rows[0].down, "{rows:?}");
    assert_eq!(note, None, "one relay: never moved");
}
