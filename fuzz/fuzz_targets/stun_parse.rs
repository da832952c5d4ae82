//! `relay::stun`: message parsing, every attribute accessor, MESSAGE-INTEGRITY
//! and FINGERPRINT checks, stream framing; and the builder's round trip.
//! Also the agent's blackhole probes (`ice_agent::blackhole::parse`): any
//! datagram is recognised, refused or ignored without a panic, and a probe
//! re-encoded keeps its attribute and verifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::stun::{self, attr, long_term_key, Integrity, Message, MessageBuilder};

const KEY: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";

fuzz_target!(|data: &[u8]| {
    blackhole_probe(data);
    let _ = stun::stream_frame_len(data);
    let is_stun = stun::is_stun(data);
    let Ok(m) = Message::parse(data) else {
        return;
    };
    assert!(is_stun, "parsed a message that is_stun() refuses");
    let _ = (m.method(), m.class(), m.transaction_id(), m.raw());
    let mut count = 0;
    for a in m.attributes() {
        count += 1;
        assert!(a.offset + 4 + a.value.len() <= data.len());
        // Every accessor on every type present, known or not.
        let _ = m.get(a.typ);
        let _ = m.get_attr(a.typ);
        let _ = m.address(a.typ);
        let _ = m.xor_address(a.typ);
        let _ = m.u32_attr(a.typ);
        let _ = m.str_attr(a.typ);
        let _ = m.xor_addresses(a.typ).count();
    }
    for typ in [
        attr::XOR_MAPPED_ADDRESS,
        attr::XOR_PEER_ADDRESS,
        attr::XOR_RELAYED_ADDRESS,
        attr::MAPPED_ADDRESS,
        attr::OTHER_ADDRESS,
        attr::RESPONSE_ORIGIN,
        attr::ALTERNATE_SERVER,
    ] {
        let _ = m.xor_address(typ);
        let _ = m.address(typ);
        let _ = m.xor_addresses(typ).count();
    }
    for typ in [attr::USERNAME, attr::REALM, attr::NONCE, attr::SOFTWARE] {
        let _ = m.str_attr(typ);
    }
    for typ in [
        attr::LIFETIME,
        attr::CHANGE_REQUEST,
        attr::PRIORITY,
        attr::REQUESTED_TRANSPORT,
        attr::CHANNEL_NUMBER,
    ] {
        let _ = m.u32_attr(typ);
    }
    if let Some((code, reason)) = m.error_code() {
        assert!(code < 800, "ERROR-CODE {code}");
        let _ = reason.len();
    }
    let _ = m.unknown_required();
    let _ = m.integrity_kind();
    let _ = m.check_fingerprint();
    let _ = m.verify_integrity(KEY);
    if let (Some(u), Some(r)) = (m.str_attr(attr::USERNAME), m.str_attr(attr::REALM)) {
        let _ = m.verify_integrity(&long_term_key(u, r, "TheMatrIX"));
    }

    // Rebuilding the attributes with the builder gives the same attributes,
    // and integrity + fingerprint added by the builder verify.
    // (The rebuilt attributes take as many bytes as the original's.)
    if data.len() - stun::HEADER_LEN + 36 + 8 <= usize::from(u16::MAX) {
        let mut buf = Vec::new();
        let mut b = MessageBuilder::new(&mut buf, m.method(), m.class(), m.transaction_id());
        for a in m.attributes() {
            b.attr(a.typ, a.value);
        }
        let kind = if data.len() % 2 == 0 {
            Integrity::Sha1
        } else {
            Integrity::Sha256
        };
        b.integrity(kind, KEY).fingerprint();
        let again = Message::parse(&buf).expect("builder output parses");
        // Ours decide only when the original carries no integrity or
        // fingerprint attribute of its own: the first one found counts, and
        // attributes after MESSAGE-INTEGRITY (but FINGERPRINT) and after
        // FINGERPRINT are ignored by every accessor (RFC 8489 §14.5), ours
        // included.
        let own = m.attributes().any(|a| {
            [
                attr::MESSAGE_INTEGRITY,
                attr::MESSAGE_INTEGRITY_SHA256,
                attr::FINGERPRINT,
            ]
            .contains(&a.typ)
        });
        let visible = again.attributes().count();
        if own {
            assert!(visible >= count && visible <= count + 1, "{visible} vs {count}");
        } else {
            assert_eq!(visible, count + 2);
        }
        for (x, y) in m.attributes().zip(again.attributes()) {
            assert_eq!((x.typ, x.value), (y.typ, y.value));
        }
        if !own {
            assert_eq!(again.check_fingerprint(), Some(true));
            assert_eq!(again.verify_integrity(KEY), Some(kind));
        }
    }
});

fn blackhole_probe(data: &[u8]) {
    use ice_agent::blackhole::{self, ProbeAttr};
    let Ok(Some(p)) = blackhole::parse(data) else {
        return;
    };
    let _ = p.verify(KEY);
    let again = ProbeAttr::from_bytes(&{
        let mut v = Vec::new();
        blackhole::encode_response(&mut v, p.tid, "192.0.2.1:1".parse().expect("addr"), KEY, p.attr);
        v
    }[20 + 12 + 4..20 + 12 + 4 + 20]);
    assert_eq!(again, Ok(p.attr));
    if p.response {
        return;
    }
    let mut buf = Vec::new();
    let user = p.username.unwrap_or("u:v");
    if user.len() > 1000 {
        return;
    }
    blackhole::encode_request(&mut buf, p.tid, user, KEY, p.attr, data.len().min(1500));
    let q = blackhole::parse(&buf)
        .expect("our request parses")
        .expect("our request is a probe");
    assert!(q.verify(KEY));
    assert_eq!((q.attr.flags, q.attr.data_rx, q.attr.data_tx), (p.attr.flags, p.attr.data_rx, p.attr.data_tx));
    assert_eq!(usize::from(q.attr.size), buf.len());
    assert_eq!(q.username, Some(user));
}
