//! The sans-IO TURN client (`relay::client::Client`) after `allocate`: the
//! fuzzer answers the client's own outstanding requests (same transaction
//! id) with responses built by the real codec, with REALM/NONCE challenges
//! and valid MESSAGE-INTEGRITY under the key the client derived, so the
//! success paths (allocated, permissions, channels, refresh, 437/441
//! recovery) are reached; plus raw datagrams, API calls and time.
//! Everything the client sends must parse as STUN or ChannelData.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use relay::client::{Client, ClientConfig};
use relay::stun::{channel_data, long_term_key, Class, Integrity, Message, TransactionId};
use wgice_fuzz::{encode, Addr, Attr, Integ};

const USER: &str = "alice";
const PW: &str = "wonderland";

#[derive(Arbitrary, Debug)]
struct Input {
    reliable: bool,
    dual_stack: bool,
    sha256: bool,
    pad: bool,
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug)]
enum Reply {
    /// Success (integrity with the client's key when `signed`).
    Success {
        attrs: Vec<Attr>,
        signed: bool,
        integrity: Integ,
    },
    /// An error; 401/438 carry REALM and NONCE.
    Error {
        code: u16,
        reason: String,
        realm: u8,
        nonce: String,
        attrs: Vec<Attr>,
        signed: bool,
    },
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// Answer the n-th request the client sent (by its transaction id).
    Reply {
        request: u8,
        reply: Reply,
        fingerprint: bool,
    },
    /// Raw bytes from the server.
    Raw(Vec<u8>),
    /// A Data indication or ChannelData from the server.
    Data {
        peer: Addr,
        channel: Option<u8>,
        payload: Vec<u8>,
    },
    Allocate,
    Refresh,
    Deallocate,
    Permission(Addr),
    ReleasePermission(Addr),
    Bind(Addr),
    Release(Addr),
    Credentials(bool),
    EncodeTo(Addr, Vec<u8>),
    Advance(u16, u8),
}

const REALMS: &[&str] = &["wgice.test", "other.realm", ""];

fuzz_target!(|input: Input| {
    let t0 = Instant::now();
    let mut now = t0;
    let mut cfg = ClientConfig::new(USER, PW);
    cfg.reliable = input.reliable;
    cfg.dual_stack = input.dual_stack;
    cfg.pad_unauthenticated = input.pad;
    if input.sha256 {
        cfg.integrity = Integrity::Sha256;
    }
    let mut client = Client::new(cfg, 1);
    client.allocate(now);
    // Requests the client sent (transaction ids, most recent last) and the
    // realm it was last told, so signed answers use the key it derived.
    let mut sent: Vec<TransactionId> = Vec::new();
    let mut realm: Option<&str> = None;
    let mut password = PW;
    for step in input.steps.into_iter().take(64) {
        match step {
            Step::Reply {
                request,
                reply,
                fingerprint,
            } => {
                let Some(tid) = sent
                    .iter()
                    .rev()
                    .nth(request as usize % sent.len().max(1))
                    .copied()
                else {
                    continue;
                };
                let key = long_term_key(USER, realm.unwrap_or(REALMS[0]), password);
                // The method does not matter to the client: it matches by id.
                let msg = match reply {
                    Reply::Success {
                        attrs,
                        signed,
                        integrity,
                    } => encode(
                        relay::stun::method::ALLOCATE,
                        Class::Success,
                        tid,
                        &attrs,
                        None,
                        signed.then_some((integrity.into(), &key[..])),
                        fingerprint,
                    ),
                    Reply::Error {
                        code,
                        reason,
                        realm: r,
                        nonce,
                        mut attrs,
                        signed,
                    } => {
                        let code = match code % 8 {
                            0 => 401,
                            1 => 438,
                            2 => 437,
                            3 => 441,
                            4 => 403,
                            5 => 508,
                            _ => code % 700,
                        };
                        attrs.insert(0, Attr::Error(code, reason));
                        if code == 401 || code == 438 {
                            let r = REALMS[r as usize % REALMS.len()];
                            realm = Some(r);
                            attrs.push(Attr::Raw(relay::stun::attr::REALM, r.as_bytes().to_vec()));
                            attrs.push(Attr::Raw(relay::stun::attr::NONCE, nonce.into_bytes()));
                        }
                        let key = long_term_key(USER, realm.unwrap_or(REALMS[0]), password);
                        encode(
                            relay::stun::method::ALLOCATE,
                            Class::Error,
                            tid,
                            &attrs,
                            None,
                            signed.then_some((Integrity::Sha1, &key[..])),
                            fingerprint,
                        )
                    }
                };
                let _ = client.handle_input(now, &msg);
            }
            Step::Raw(d) => {
                let _ = client.handle_input(now, &d);
            }
            Step::Data {
                peer,
                channel,
                payload,
            } => {
                let mut out = Vec::new();
                match channel {
                    Some(c) => channel_data::encode(
                        &mut out,
                        channel_data::MIN_CHANNEL + u16::from(c % 8),
                        &payload,
                        false,
                    ),
                    None => {
                        out = encode(
                            relay::stun::method::DATA,
                            Class::Indication,
                            [9; 12],
                            &[Attr::XorPeer(peer), Attr::Data(payload.clone())],
                            None,
                            None,
                            false,
                        );
                    }
                }
                if let Some((_, p)) = client.handle_input(now, &out) {
                    assert!(p.len() <= payload.len().min(1500));
                }
            }
            Step::Allocate => client.allocate(now),
            Step::Refresh => client.refresh_now(now),
            Step::Deallocate => client.deallocate(now),
            Step::Permission(a) => client.create_permission(now, a.get().ip()),
            Step::ReleasePermission(a) => client.release_permission(a.get().ip()),
            Step::Bind(a) => {
                let _ = client.bind_channel(now, a.get());
            }
            Step::Release(a) => client.release_channel(now, a.get()),
            Step::Credentials(other) => {
                password = if other { "rotated" } else { PW };
                client.set_credentials(now, USER, password);
            }
            Step::EncodeTo(a, payload) => {
                let mut out = Vec::new();
                client.encode_to(a.get(), &payload, &mut out);
            }
            Step::Advance(ms, s) => {
                now += Duration::from_millis(u64::from(ms)) + Duration::from_secs(u64::from(s) * 4);
                if client.poll_timeout().is_some_and(|t| t <= now) {
                    client.handle_timeout(now);
                }
            }
        }
        while let Some(d) = client.poll_transmit() {
            if channel_data::is_channel_data(&d) {
                assert!(channel_data::decode(&d).is_some());
                continue;
            }
            let m = Message::parse(&d).expect("client sent bad STUN");
            if m.class() == Class::Request {
                sent.retain(|t| *t != m.transaction_id());
                sent.push(m.transaction_id());
                if sent.len() > 32 {
                    sent.remove(0);
                }
            }
        }
        while client.poll_event().is_some() {}
        let _ = (client.relayed(), client.mapped(), client.is_allocated());
    }
});
