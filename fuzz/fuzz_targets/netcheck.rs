//! `ice-agent netcheck`'s sans-IO prober and its gateway parsers. The
//! fuzzer answers the prober's own outstanding requests (same transaction
//! id, from a fuzzer-chosen source, with fuzzer-chosen attributes, so the
//! mapping, RFC 5780 alternate, filtering and hairpin paths are reached),
//! sends raw datagrams and moves time. The run must end (no timer left)
//! within a bounded virtual time after the last input, send a bounded number
//! of datagrams, and its outcome must be self-consistent. The NAT-PMP/PCP,
//! SSDP and `/proc/net/route` parsers get raw bytes, and so does the port
//! mapper (`portmap::PortMapper`) as its gateway's answers.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use ice_agent::netcheck::gateway;
use ice_agent::netcheck::probe::{Plan, Prober, Socket, Transmit, UdpTarget};
use libfuzzer_sys::fuzz_target;
use relay::stun::{Class, Message, MessageBuilder};
use wgice_fuzz::{Addr, Attr};

#[derive(Arbitrary, Debug)]
enum Step {
    /// Answer the `which`-th datagram sent so far.
    Answer {
        which: u8,
        /// Come from where it went (else `from`).
        same_source: bool,
        from: Addr,
        error: bool,
        attrs: Vec<Attr>,
        on: u8,
    },
    /// Deliver what was sent back to the main socket (hairpin).
    Loop { which: u8 },
    /// Any bytes on any socket.
    Raw { on: u8, from: Addr, bytes: Vec<u8> },
    /// Time passes.
    Wait(u16),
    /// The gateway parsers.
    Gateway(Vec<u8>),
}

fn socket(n: u8) -> Socket {
    match n % 4 {
        0 => Socket::Main,
        1 => Socket::Filter,
        2 => Socket::Hairpin,
        _ => Socket::Main6,
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let t0 = Instant::now();
    let a = |s: &str| s.parse::<SocketAddr>().ok();
    let plan = Plan {
        targets: vec![
            UdpTarget {
                relay: 0,
                v4: a("198.51.100.2:3478"),
                v6: a("[2001:db8::2]:3478"),
            },
            UdpTarget {
                relay: 1,
                v4: a("198.51.100.9:3478"),
                v6: None,
            },
        ],
        main_port: 51821,
        local_ips: vec!["192.168.1.10".parse().expect("ip")],
        seed: 1,
    };
    let mut p = Prober::new(plan, t0);
    let mut pm = ice_agent::portmap::PortMapper::new(
        "192.168.1.1".parse().expect("gateway"),
        "192.168.1.10".parse().expect("client"),
        51821,
        [7; 12],
        t0,
    );
    let mut now = t0;
    let mut sent: Vec<Transmit> = Vec::new();
    let mut total = 0usize;
    let drain = |p: &mut Prober, sent: &mut Vec<Transmit>, total: &mut usize| {
        while let Some(t) = p.poll_transmit() {
            assert!(Message::parse(&t.contents).is_ok(), "sent non-STUN");
            *total += 1;
            if sent.len() < 256 {
                sent.push(t);
            }
        }
    };
    drain(&mut p, &mut sent, &mut total);
    for step in steps.into_iter().take(256) {
        match step {
            Step::Answer {
                which,
                same_source,
                from,
                error,
                attrs,
                on,
            } => {
                let Some(t) = sent.get(usize::from(which) % sent.len().max(1)) else {
                    continue;
                };
                let Ok(req) = Message::parse(&t.contents) else {
                    continue;
                };
                let class = if error { Class::Error } else { Class::Success };
                let mut out = Vec::new();
                {
                    let mut b =
                        MessageBuilder::new(&mut out, req.method(), class, req.transaction_id());
                    for at in attrs.iter().take(8) {
                        at.put(&mut b);
                    }
                }
                let src = if same_source { t.to } else { from.get() };
                let sock = if on % 3 == 0 { t.socket } else { socket(on) };
                p.handle_datagram(now, sock, src, &out);
            }
            Step::Loop { which } => {
                if let Some(t) = sent.get(usize::from(which) % sent.len().max(1)) {
                    let c = t.contents.clone();
                    p.handle_datagram(now, Socket::Main, t.to, &c);
                }
            }
            Step::Raw { on, from, bytes } => {
                p.handle_datagram(now, socket(on), from.get(), &bytes[..bytes.len().min(2048)]);
            }
            Step::Wait(ms) => {
                now += Duration::from_millis(u64::from(ms % 2000));
                p.handle_timeout(now);
                pm.handle_timeout(now);
            }
            Step::Gateway(bytes) => {
                // The same bytes as the gateway's answer to the port mapper.
                pm.handle_datagram(now, pm.gateway(), &bytes);
                let _ = ice_agent::portmap::parse_pcp_map(&bytes);
                let _ = ice_agent::portmap::parse_natpmp(&bytes);
                let _ = gateway::parse_port_mapping(&bytes);
                let _ = gateway::parse_ssdp(&bytes);
                let _ = gateway::default_route(&String::from_utf8_lossy(&bytes));
                // The same bytes as a UPnP-IGD gateway's HTTP answers.
                igd_answer(&bytes);
            }
        }
        drain(&mut p, &mut sent, &mut total);
        // The port mapper sends only its fixed-size requests, and only
        // reports mappings with a usable address and a renewal timer.
        while let Some(d) = pm.poll_transmit() {
            assert!(matches!(d.len(), 2 | 12 | 60), "{}", d.len());
        }
        while let Some(e) = pm.poll_event() {
            if let ice_agent::portmap::Event::Mapped { external, .. } = e {
                assert!(!external.ip().is_unspecified() && external.port() != 0);
                assert!(pm.poll_timeout().is_some_and(|t| t > now));
            }
        }
    }
    // With no more input the run ends, and soon.
    let last = now;
    let mut rounds = 0;
    while let Some(at) = p.poll_timeout() {
        assert!(at >= t0, "timer in the past");
        now = now.max(at);
        p.handle_timeout(now);
        drain(&mut p, &mut sent, &mut total);
        rounds += 1;
        assert!(rounds < 1000, "the run does not end");
    }
    assert!(p.is_done());
    assert!(now - last <= Duration::from_secs(5), "ran {:?} past the last input", now - last);
    // 2 relays v4 (+3 alternates each), 1 v6, 3 filter tests: 6 attempts each;
    // hairpin 4.
    assert!(total <= 12 * 6 + 4, "{total} datagrams");
    let o = p.outcome();
    if o.filtering.is_some() || o.mapping.is_some() || o.hairpin.is_some() {
        assert!(o.udp, "{o:?}");
    }
    if o.port_allocation.is_some() {
        assert!(o.mapping.is_some_and(|m| m.endpoint_dependent()), "{o:?}");
    }
});

/// Feeds `bytes` to every UPnP-IGD parser, as a description document and
/// as a SOAP answer (the gateway's HTTP server is as hostile as its UDP).
fn igd_answer(bytes: &[u8]) {
    use ice_agent::portmap::igd;
    let gw = std::net::Ipv4Addr::new(192, 168, 1, 1);
    let text = String::from_utf8_lossy(bytes);
    let _ = igd::parse_url(&text, gw);
    let _ = igd::element(&text, "URLBase");
    if let Ok(location) = igd::parse_url("http://192.168.1.1:5000/rootDesc.xml", gw) {
        let _ = igd::resolve(&location, &text);
        let _ = igd::find_service(&text, &location);
    }
    if let Ok(r) = igd::parse_response(bytes) {
        let _ = igd::external_ip(&r);
        let _ = igd::after_add(&r, 1, 40000, 3600);
        let _ = igd::fault("AddPortMapping", &r);
        let _ = igd::upnp_error(&r.body);
    }
}
