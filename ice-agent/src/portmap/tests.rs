use super::*;

const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
const ME: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const NONCE: [u8; 12] = [7; 12];

fn gw() -> SocketAddr {
    SocketAddr::from((GW, GATEWAY_PORT))
}

fn mapper(now: Instant) -> PortMapper {
    PortMapper::new(GW, ME, 51821, NONCE, now)
}

/// What a PCP server would answer to `req`.
fn pcp_reply(req: &[u8], result: u8, lifetime: u32, ext: SocketAddrV4) -> Vec<u8> {
    let mut b = req.to_vec();
    b[1] = 0x81;
    b[3] = result;
    b[4..8].copy_from_slice(&lifetime.to_be_bytes());
    b[8..12].copy_from_slice(&1234u32.to_be_bytes()); // epoch
    b[12..24].fill(0);
    b[42..44].copy_from_slice(&ext.port().to_be_bytes());
    b[44..60].copy_from_slice(&ext.ip().to_ipv6_mapped().octets());
    b
}

fn natpmp_external(ip: Ipv4Addr) -> Vec<u8> {
    let mut b = vec![0, 128, 0, 0, 0, 0, 0, 9];
    b.extend_from_slice(&ip.octets());
    b
}

fn natpmp_map(internal: u16, external: u16, lifetime: u32) -> Vec<u8> {
    let mut b = vec![0, 129, 0, 0, 0, 0, 0, 9];
    b.extend_from_slice(&internal.to_be_bytes());
    b.extend_from_slice(&external.to_be_bytes());
    b.extend_from_slice(&lifetime.to_be_bytes());
    b
}

#[test]
fn pcp_maps_renews_before_expiry_and_releases() {
    let t0 = Instant::now();
    let mut m = mapper(t0);
    let req = m.poll_transmit().expect("PCP MAP");
    assert_eq!(req.len(), 60);
    assert_eq!(&req[..2], &[2, 1]);
    assert_eq!(&req[20..24], &ME.octets());
    let ext = SocketAddrV4::new(Ipv4Addr::new(11, 0, 0, 3), 40000);
    m.handle_datagram(t0, gw(), &pcp_reply(&req, 0, 120, ext));
    assert_eq!(
        m.poll_event(),
        Some(Event::Mapped {
            external: ext,
            protocol: Protocol::Pcp,
            lifetime: Duration::from_secs(120)
        })
    );
    // Renewal at min(lifetime / 2, 60 s), well before expiry.
    assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    let t1 = t0 + Duration::from_secs(60);
    m.handle_timeout(t1);
    let renew = m.poll_transmit().expect("renewal");
    assert_eq!(renew, req);
    m.handle_datagram(t1, gw(), &pcp_reply(&renew, 0, 120, ext));
    assert_eq!(m.poll_event(), None, "same address: no event");
    assert_eq!(m.counters().renewals, 2);
    assert_eq!(
        m.mapping().map(|x| x.expires),
        Some(t1 + Duration::from_secs(120))
    );
    m.release();
    let del = m.poll_transmit().expect("delete");
    assert_eq!(&del[4..8], &[0, 0, 0, 0], "lifetime 0 deletes");
    assert!(matches!(m.poll_event(), Some(Event::Lost { .. })));
    assert_eq!(m.poll_timeout(), None);
}

#[test]
fn falls_back_to_natpmp() {
    let t0 = Instant::now();
    let mut m = mapper(t0);
    let _ = m.poll_transmit();
    // A NAT-PMP-only gateway: "unsupported version" in NAT-PMP's format.
    m.handle_datagram(t0, gw(), &[0, 128, 0, 1, 0, 0, 0, 0]);
    assert_eq!(m.poll_transmit(), Some(vec![0, 0]));
    m.handle_datagram(t0, gw(), &natpmp_external(Ipv4Addr::new(11, 0, 0, 3)));
    let req = m.poll_transmit().expect("map request");
    assert_eq!(req, natpmp_map_request(51821, 51821, REQUESTED_LIFETIME));
    // Wrong internal port: refused, still waiting.
    m.handle_datagram(t0, gw(), &natpmp_map(1, 40001, 7200));
    assert_eq!(m.poll_event(), None);
    m.handle_datagram(t0, gw(), &natpmp_map(51821, 40001, 7200));
    assert!(matches!(
        m.poll_event(),
        Some(Event::Mapped { protocol: Protocol::NatPmp, external, .. })
            if external == SocketAddrV4::new(Ipv4Addr::new(11, 0, 0, 3), 40001)
    ));
    m.release();
    assert_eq!(
        m.poll_transmit(),
        Some(natpmp_map_request(51821, 0, 0).to_vec())
    );
}

#[test]
fn silent_gateway_falls_back_then_gives_up_and_a_lost_gateway_is_noticed() {
    let t0 = Instant::now();
    let mut m = mapper(t0);
    let mut now = t0;
    let mut sent = Vec::new();
    while let Some(d) = m.poll_timeout() {
        while let Some(p) = m.poll_transmit() {
            sent.push(p);
        }
        now = d;
        m.handle_timeout(now);
    }
    assert_eq!(
        sent.iter().filter(|p| p.len() == 60).count(),
        2,
        "PCP twice"
    );
    assert_eq!(sent.iter().filter(|p| p.len() == 2).count(), 4, "NAT-PMP");
    assert!(matches!(m.poll_event(), Some(Event::Unavailable { .. })));
    assert!(now - t0 < Duration::from_secs(5), "{:?}", now - t0);

    // Mapped, then the gateway stops answering: Lost within a renewal
    // interval plus the retransmits.
    let mut m = mapper(t0);
    let req = m.poll_transmit().expect("req");
    let ext = SocketAddrV4::new(Ipv4Addr::new(11, 0, 0, 3), 40000);
    m.handle_datagram(t0, gw(), &pcp_reply(&req, 0, 7200, ext));
    let _ = m.poll_event();
    let mut now = t0;
    while let Some(d) = m.poll_timeout() {
        now = d;
        m.handle_timeout(now);
        while m.poll_transmit().is_some() {}
    }
    assert!(matches!(m.poll_event(), Some(Event::Lost { .. })));
    assert!(now - t0 < MAX_RENEW_INTERVAL + Duration::from_secs(5));
    assert_eq!(m.mapping(), None);
}

#[test]
fn hostile_answers_are_refused_and_counted() {
    let t0 = Instant::now();
    let mut m = mapper(t0);
    let req = m.poll_transmit().expect("req");
    let ext = SocketAddrV4::new(Ipv4Addr::new(11, 0, 0, 3), 40000);
    let good = pcp_reply(&req, 0, 7200, ext);
    let stranger: SocketAddr = "192.168.1.66:5351".parse().expect("addr");
    m.handle_datagram(t0, stranger, &good);
    let mut wrong_nonce = good.clone();
    wrong_nonce[24] ^= 1;
    m.handle_datagram(t0, gw(), &wrong_nonce);
    m.handle_datagram(t0, gw(), &good[..59]);
    m.handle_datagram(t0, gw(), &vec![2u8; 5000]);
    m.handle_datagram(t0, gw(), &[]);
    m.handle_datagram(
        t0,
        gw(),
        &pcp_reply(&req, 0, 7200, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1)),
    );
    m.handle_datagram(t0, gw(), &pcp_reply(&req, 0, 1, ext));
    let mut zero_port = good.clone();
    zero_port[42..44].fill(0);
    m.handle_datagram(t0, gw(), &zero_port);
    assert_eq!(m.poll_event(), None);
    assert_eq!(m.counters().refused, 8);
    // A refusal with a result code gives up and says why.
    m.handle_datagram(t0, gw(), &pcp_reply(&req, 2, 0, ext));
    match m.poll_event() {
        Some(Event::Unavailable { reason }) => {
            assert!(reason.contains("NOT_AUTHORIZED"), "{reason}")
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(m.counters().errors, 1);
}

#[test]
fn parsers_never_panic_on_any_short_input() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for len in 0..200 {
        for _ in 0..50 {
            let b: Vec<u8> = (0..len)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect();
            let _ = parse_pcp_map(&b);
            let _ = parse_natpmp(&b);
            let mut m = mapper(Instant::now());
            m.handle_datagram(Instant::now(), gw(), &b);
        }
    }
}
