//! The embedded data plane's input from the network and from peers, and
//! its local control input:
//!
//! - raw datagrams into what `Device::receive` runs on them — boringtun's
//!   MAC and rate-limit check (`RateLimiter::verify_packet`), the anonymous
//!   handshake parse that finds the sender's key, and `Tunn::decapsulate`
//!   on a tunnel with a known peer (a dependency we call with remote bytes:
//!   it must not panic either);
//! - decrypted packets (what an authenticated peer chooses to send) into
//!   the receive-side TCP coalescer (`offload::Gro`), then flushed;
//! - packets with a `virtio_net_hdr` into the segmenter (`offload::split`);
//! - UAPI `set` bodies into `embedded::parse_set`.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use arbitrary::Arbitrary;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn};
use boringtun::x25519::{PublicKey, StaticSecret};
use ice_agent::dataplane::embedded::parse_set;
use ice_agent::dataplane::offload::{split, Gro, VnetHdr};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Datagram(Vec<u8>),
    Decrypted(Vec<u8>),
    Flush,
    Offload([u8; 10], Vec<u8>),
    Uapi(String),
}

fuzz_target!(|ops: Vec<Op>| {
    let me = StaticSecret::from([1u8; 32]);
    let me_pub = PublicKey::from(&me);
    let peer = PublicKey::from(&StaticSecret::from([2u8; 32]));
    let limiter = Arc::new(RateLimiter::new(&me_pub, 100));
    let mut tunn = Tunn::new(me.clone(), peer, None, Some(25), 7, Some(limiter.clone()));
    let mut gro = Gro::new(true);
    let mut scratch = vec![0u8; 65536 + 64];
    let mut seg = Vec::new();
    let src = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
    for op in ops.into_iter().take(64) {
        match op {
            Op::Datagram(d) => {
                if let Ok(Packet::HandshakeInit(init)) = limiter.verify_packet(src, &d, &mut scratch) {
                    let _ = parse_handshake_anon(&me, &me_pub, &init);
                }
                let mut first = true;
                for _ in 0..8 {
                    let input: &[u8] = if first { &d } else { &[] };
                    first = false;
                    match tunn.decapsulate(src, input, &mut scratch[4..]) {
                        boringtun::noise::TunnResult::WriteToNetwork(_) => continue,
                        _ => break,
                    }
                }
            }
            Op::Decrypted(p) => gro.push(&p, &mut |h, b| {
                assert!(b.len() <= 65535 && h.len() == 10);
            }),
            Op::Flush => gro.flush(&mut |_, _| {}),
            Op::Offload(h, mut p) => {
                if let Some(h) = VnetHdr::parse(&h) {
                    let _ = split(&h, &mut p, &mut seg, |s| assert!(s.len() <= 65535 + 64));
                }
            }
            Op::Uapi(s) => {
                let _ = parse_set(s.lines());
            }
        }
    }
    gro.flush(&mut |_, _| {});
});
