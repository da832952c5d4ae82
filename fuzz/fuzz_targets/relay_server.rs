//! The sans-IO TURN server (`relay::server::Server`) driven by a sequence of
//! fuzzer-chosen steps on a virtual clock: raw datagrams, and requests built
//! with the real codec that carry a valid NONCE and MESSAGE-INTEGRITY for a
//! static user (so allocations, permissions, channels and relaying are
//! reached; CreatePermission and ChannelBind also come as one-step
//! shortcuts, which the fuzzer otherwise rarely assembles), peer datagrams on bound relayed sockets, time, closes. The
//! target plays the driver: it answers BindRelay (or fails it when told).
//! Every datagram the server sends to a client must parse as STUN (with a
//! good FINGERPRINT when it has one) or as ChannelData.
#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use relay::auth::{rest_password, rest_username, NonceSigner};
use relay::server::{
    AltAddress, ClientSocket, Event, Metrics, Quotas, RelayToken, Server, ServerConfig, Transmit,
    Transport,
};
use relay::stun::{channel_data, long_term_key, Message, TransactionId};
use wgice_fuzz::{encode, Addr, Attr, Cls, Integ, Method};

const REALM: &str = "wgice.test";
const RELAY_IP: &str = "198.51.100.1";
const UNIX0: u64 = 1_800_000_000;
const SECRET: [u8; 32] = [7; 32];
const USERS: &[(&str, &str)] = &[("alice", "wonderland"), ("bob", "builder")];

#[derive(Arbitrary, Debug)]
struct Setup {
    strict_amplification: bool,
    bandwidth_limit: Option<u16>,
    alt: bool,
    max_total: u8,
    max_per_user: u8,
    /// Relay port range of 1 + n ports (exhaustion is reachable).
    ports: u8,
    dual_stack: bool,
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug)]
enum Auth {
    None,
    /// USERNAME/REALM/NONCE and integrity that verify.
    Valid(u8),
    /// A REST username (expiry:user) with its derived password.
    Rest(u32),
    /// Right user, wrong password.
    WrongKey(u8),
    /// Valid but with a nonce issued this many seconds ago.
    OldNonce(u8, u16),
    /// Fuzzer's own strings.
    Junk(String, String, String),
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// Raw bytes from a client.
    Raw { client: u8, data: Vec<u8> },
    /// A message built with the codec.
    Msg {
        client: u8,
        method: Method,
        class: Cls,
        tid: u8,
        attrs: Vec<Attr>,
        auth: Auth,
        integrity: Integ,
        fingerprint: bool,
    },
    /// A valid authenticated CreatePermission (shortcut to the data paths).
    Permit {
        client: u8,
        user: u8,
        peers: Vec<Addr>,
    },
    /// A valid authenticated ChannelBind for channel 0x4000 + n.
    Bind {
        client: u8,
        user: u8,
        channel: u8,
        peer: Addr,
    },
    /// ChannelData from a client on channel 0x4000 + n.
    ChannelData {
        client: u8,
        channel: u8,
        payload: Vec<u8>,
    },
    /// A peer sends to a bound relayed socket.
    Peer {
        relay: u8,
        peer: Addr,
        payload: Vec<u8>,
    },
    /// The next BindRelay fails (port in use).
    FailNextBind,
    /// Time passes; timers run.
    Advance { ms: u16, secs: u8 },
    /// A stream client's connection closed.
    Close { client: u8 },
}

fn client_socket(i: u8, alt: Option<AltAddress>) -> ClientSocket {
    let transport = match i % 3 {
        0 => Transport::Udp,
        1 => Transport::Tcp,
        _ => Transport::Tls,
    };
    let remotes = [
        "192.0.2.10:40000",
        "192.0.2.11:40001",
        "[2001:db8::10]:40000",
        "[::ffff:192.0.2.12]:5",
    ];
    let remote: SocketAddr = remotes[(i as usize / 3) % remotes.len()]
        .parse()
        .expect("sa");
    let local = match alt {
        Some(a) if i & 0x80 != 0 => a.other,
        _ => "198.51.100.1:3478".parse().expect("sa"),
    };
    ClientSocket {
        transport,
        local,
        remote,
    }
}

fuzz_target!(|setup: Setup| {
    let t0 = Instant::now();
    let mut now = t0;
    let mut cfg = ServerConfig::new(REALM, RELAY_IP.parse().expect("ip"), t0, UNIX0, SECRET);
    for (u, p) in USERS {
        cfg.credentials.users.insert((*u).into(), (*p).into());
    }
    cfg.credentials.rest_secrets.push("s3cret".into());
    cfg.nonces = NonceSigner::with_secret(SECRET, 600);
    let lo = 50000u16;
    cfg.port_range = (lo, lo + u16::from(setup.ports % 8));
    cfg.relay_ports = (lo, lo + 99);
    cfg.strict_amplification = setup.strict_amplification;
    cfg.bandwidth_limit = setup.bandwidth_limit.map(|b| u64::from(b) * 16);
    if setup.dual_stack {
        cfg.relay_ipv6 = Some("2001:db8::1".parse().expect("ip"));
    }
    let alt = setup.alt.then(|| AltAddress {
        primary: "198.51.100.1:3478".parse().expect("sa"),
        other: "198.51.100.2:3479".parse().expect("sa"),
    });
    cfg.alt = alt;
    let signer = cfg.nonces.clone();
    let quotas = Arc::new(Quotas::new(
        usize::from(setup.max_total % 8),
        u32::from(setup.max_per_user % 4),
    ));
    let mut server = Server::new(cfg, quotas, Arc::new(Metrics::default()), t0, 1);
    let mut bound: Vec<(RelayToken, SocketAddr)> = Vec::new();
    let mut fail_next = false;

    for step in setup.steps.into_iter().take(64) {
        let step = match step {
            Step::Permit {
                client,
                user,
                peers,
            } => Step::Msg {
                client,
                method: Method::CreatePermission,
                class: Cls::Request,
                tid: 0xC0,
                attrs: peers.into_iter().take(4).map(Attr::XorPeer).collect(),
                auth: Auth::Valid(user),
                integrity: Integ::Sha1,
                fingerprint: false,
            },
            Step::Bind {
                client,
                user,
                channel,
                peer,
            } => Step::Msg {
                client,
                method: Method::ChannelBind,
                class: Cls::Request,
                tid: 0xCB,
                attrs: vec![
                    Attr::ChannelNumber(u16::from(channel % 16)),
                    Attr::XorPeer(peer),
                ],
                auth: Auth::Valid(user),
                integrity: Integ::Sha1,
                fingerprint: false,
            },
            s => s,
        };
        match step {
            Step::Raw { client, data } => {
                let _ = server.handle_client(now, client_socket(client, alt), &data);
            }
            Step::Msg {
                client,
                method,
                class,
                tid,
                attrs,
                auth,
                integrity,
                fingerprint,
            } => {
                let cs = client_socket(client, alt);
                let secs = now.saturating_duration_since(t0).as_secs() as u32 + 1;
                let nonce = signer.issue(secs, cs.remote.ip());
                let rest_user;
                let rest_pw;
                let (user, pw, realm, nonce): (&str, &str, &str, String) = match &auth {
                    Auth::None => ("", "", "", String::new()),
                    Auth::Valid(u) => {
                        let (u, p) = USERS[*u as usize % USERS.len()];
                        (u, p, REALM, nonce)
                    }
                    Auth::Rest(dt) => {
                        rest_user = rest_username(UNIX0 + u64::from(*dt) - 1000, "carol");
                        rest_pw = rest_password("s3cret", &rest_user);
                        (&rest_user, &rest_pw, REALM, nonce)
                    }
                    Auth::WrongKey(u) => (USERS[*u as usize % USERS.len()].0, "nope", REALM, nonce),
                    Auth::OldNonce(u, ago) => {
                        let (u, p) = USERS[*u as usize % USERS.len()];
                        let old =
                            signer.issue(secs.saturating_sub(u32::from(*ago)), cs.remote.ip());
                        (u, p, REALM, old)
                    }
                    Auth::Junk(u, r, n) => (u.as_str(), "x", r.as_str(), n.clone()),
                };
                let key = long_term_key(user, realm, pw);
                let with_auth = !matches!(auth, Auth::None);
                let mut t: TransactionId = [0; 12];
                t[0] = tid;
                let msg = encode(
                    method.number(),
                    class.into(),
                    t,
                    &attrs,
                    with_auth.then_some((user, realm, nonce.as_str())),
                    with_auth.then_some((integrity.into(), &key[..])),
                    fingerprint,
                );
                let _ = server.handle_client(now, cs, &msg);
            }
            Step::ChannelData {
                client,
                channel,
                payload,
            } => {
                let mut out = Vec::new();
                let cs = client_socket(client, alt);
                channel_data::encode(
                    &mut out,
                    channel_data::MIN_CHANNEL + u16::from(channel % 16),
                    &payload,
                    cs.transport.is_stream(),
                );
                let _ = server.handle_client(now, cs, &out);
            }
            Step::Peer {
                relay,
                peer,
                payload,
            } => {
                let token = match bound.get(relay as usize % bound.len().max(1)) {
                    Some((t, _)) => *t,
                    None => RelayToken(u64::from(relay)),
                };
                let len = payload.len();
                let mut buf = vec![0u8; 4 + len + 3];
                buf[4..4 + len].copy_from_slice(&payload);
                if let Some(f) = server.handle_peer(now, token, peer.get(), &mut buf, len) {
                    assert!(f.len <= buf.len());
                    let (ch, p) = channel_data::decode(&buf[..f.len]).expect("framed ChannelData");
                    assert!(ch >= channel_data::MIN_CHANNEL);
                    assert_eq!(p, &payload[..]);
                }
            }
            Step::FailNextBind => fail_next = true,
            Step::Advance { ms, secs } => {
                now +=
                    Duration::from_millis(u64::from(ms)) + Duration::from_secs(u64::from(secs) * 8);
                if server.poll_timeout() <= now {
                    server.handle_timeout(now);
                }
            }
            Step::Close { client } => server.client_closed(client_socket(client, alt)),
            Step::Permit { .. } | Step::Bind { .. } => unreachable!("mapped to Msg above"),
        }
        // Drain, playing the driver, until nothing is left.
        for _ in 0..64 {
            let mut moved = false;
            while let Some(e) = server.poll_event() {
                moved = true;
                match e {
                    Event::BindRelay { token, addr } => {
                        if std::mem::take(&mut fail_next) {
                            server.relay_bound(
                                now,
                                token,
                                Err(std::io::ErrorKind::AddrInUse.into()),
                            );
                        } else {
                            bound.retain(|(t, _)| *t != token);
                            bound.push((token, addr));
                            server.relay_bound(now, token, Ok(addr));
                        }
                    }
                    Event::ReleaseRelay { token } => bound.retain(|(t, _)| *t != token),
                    // A stream driver's concern (the client keeps its slot).
                    Event::ClientAuthenticated { .. } => {}
                    Event::FastPath { .. } => {}
                }
            }
            while let Some(t) = server.poll_transmit() {
                moved = true;
                match t {
                    Transmit::ToClient { payload, .. } => {
                        if channel_data::is_channel_data(&payload) {
                            assert!(channel_data::decode(&payload).is_some());
                        } else {
                            let m = Message::parse(&payload).expect("server sent bad STUN");
                            assert_ne!(m.check_fingerprint(), Some(false));
                        }
                    }
                    Transmit::ToPeer { .. } => {}
                }
            }
            if !moved {
                break;
            }
        }
        let _ = server.allocation_count();
    }
});
