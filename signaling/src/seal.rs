//! End-to-end sealed peer messages.
//!
//! A [`PeerMessage`] (offer, answer, candidate, …) is serialised to JSON and
//! sealed into an [`Envelope`] with XChaCha20-Poly1305 under a key derived
//! from X25519(sender private, recipient public). The key is directional
//! (sender and recipient keys are both in the KDF info, in that order), so a
//! message can't be reflected back to its sender. The associated data binds
//! both keys and the timestamp, so the server can neither read, forge,
//! redirect nor re-date an envelope; it only routes it by `to`.
//!
//! Replay protection lives in the receiver's [`Opener`]: envelopes outside a
//! timestamp window are refused, and nonces seen inside the window are
//! remembered in a bounded cache. When the cache is full the oldest entry is
//! evicted and its timestamp becomes a floor for its sender: nothing from
//! that sender at or below it is accepted again, so eviction never re-opens
//! a replay, and a member flooding the cache only raises its own floor.
//!
//! No I/O and no clock: callers pass the current Unix time in milliseconds.

use std::collections::{HashMap, HashSet, VecDeque};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::keys::{kdf, PrivateKey, PublicKey};

const SEAL_LABEL: &[u8] = b"wgice-signaling seal v1";
const AAD_LABEL: &[u8] = b"wgice-signaling envelope v1";

/// What one agent tells another through signaling. `session` identifies the
/// ICE session (it changes on restart), so late messages of an old session
/// can be told apart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum PeerMessage {
    /// Start of an ICE session: credentials and the candidates known so far.
    Offer {
        /// ICE session id.
        session: u64,
        /// ICE username fragment.
        ufrag: String,
        /// ICE password.
        pwd: String,
        /// Candidates known when the offer was made (SDP `candidate:` form).
        candidates: Vec<String>,
        /// The sender's WireGuard listen port, for a same-LAN path that
        /// bypasses the agents (absent when unknown).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wg_port: Option<u16>,
        /// The sender's membership certificate (`wgice-cert-v1.…`), which
        /// binds its name and overlay addresses to its WireGuard key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cert: Option<String>,
    },
    /// Reply to an offer.
    Answer {
        /// ICE session id of the offer answered.
        session: u64,
        /// ICE username fragment.
        ufrag: String,
        /// ICE password.
        pwd: String,
        /// Candidates known when answering.
        candidates: Vec<String>,
        /// The sender's WireGuard listen port (see `Offer`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wg_port: Option<u16>,
        /// The sender's membership certificate (see `Offer`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cert: Option<String>,
    },
    /// One trickled candidate (RFC 8838).
    Candidate {
        /// ICE session id.
        session: u64,
        /// The candidate (SDP `candidate:` form).
        candidate: String,
    },
    /// No more candidates will follow for this session.
    EndOfCandidates {
        /// ICE session id.
        session: u64,
    },
    /// The sender restarts ICE; expect a new offer.
    Restart {
        /// ICE session id being abandoned.
        session: u64,
    },
    /// The sender goes away; tear the session down.
    Bye {
        /// ICE session id.
        session: u64,
    },
    /// What the sender's `netcheck` measured about its NAT (mapping,
    /// filtering, port allocation, hairpin, port mapping), for the
    /// receiver's reasons and traversal choices. `nat` is a JSON object the
    /// agent validates (at most 512 bytes); it is sent after the offer or
    /// answer and again when the facts change.
    ///
    /// Added after the first release: an agent that predates it refuses the
    /// message (one logged refusal) and keeps the session.
    Facts {
        /// ICE session id.
        session: u64,
        /// The facts (JSON).
        nat: String,
    },
    /// Coordinated hole punch between two NATs that number their mappings
    /// sequentially (both symmetric): "my NAT's next mapping will be
    /// `port`, the ones after it `port + k × delta`". The sender measured
    /// it just now; the receiver measures its own and answers with
    /// [`PeerMessage::PunchAnswer`]. Added after `Facts`: older agents
    /// ignore it ([`PeerMessage::Unknown`]).
    PunchOffer {
        /// The sender's ICE session id.
        session: u64,
        /// The public port the sender's next new mapping will get.
        port: u16,
        /// The sender's NAT's step between mappings.
        delta: i32,
    },
    /// The answer to [`PeerMessage::PunchOffer`]: the answerer's own next
    /// port and step. It sends its openers when
    /// [`PeerMessage::PunchGo`] arrives.
    PunchAnswer {
        /// The sender's ICE session id.
        session: u64,
        /// The public port the sender's next new mapping will get.
        port: u16,
        /// The sender's NAT's step between mappings.
        delta: i32,
    },
    /// Sent by the offerer half a signaling round trip before it sends its
    /// own openers: the receiver sends its openers on arrival, so both
    /// bursts leave at about the same instant (DCUtR's timing).
    PunchGo {
        /// The sender's ICE session id.
        session: u64,
    },
    /// Birthday probing (the sender's NAT maps each destination to a random
    /// port, the receiver's is endpoint-independent): the sender holds
    /// `sockets` fresh mappings towards the receiver's server-reflexive
    /// address; the receiver probes random ports of the sender's public
    /// address. Added after `PunchGo`; older agents ignore it.
    BirthdayReady {
        /// The sender's ICE session id.
        session: u64,
        /// Sockets opened.
        sockets: u16,
    },
    /// The prober's probing is over: `probes` sent, `won` whether the path
    /// went direct (the other side closes its sockets).
    BirthdayDone {
        /// The sender's ICE session id.
        session: u64,
        /// Probes sent in this attempt.
        probes: u32,
        /// Whether a pair went direct.
        won: bool,
    },
    /// A message type this build does not know (sent by a newer agent).
    /// The receiver ignores it: new message types are how the protocol
    /// grows, so an older agent keeps working with a newer one. New fields
    /// on the types above are never added (they would be refused).
    #[serde(other)]
    Unknown,
}

/// A sealed message as it travels through the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Sender's public key (the server checks it is the sender's registered key).
    pub from: PublicKey,
    /// Recipient's public key (the server routes on it).
    pub to: PublicKey,
    /// Sender's Unix time in milliseconds when sealing.
    pub ts: u64,
    /// 24-byte XChaCha20 nonce.
    #[serde(with = "crate::keys::b64")]
    pub nonce: Vec<u8>,
    /// Ciphertext with its 16-byte Poly1305 tag.
    #[serde(with = "crate::keys::b64")]
    pub ct: Vec<u8>,
}

/// Why an envelope was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpenError {
    /// The envelope is addressed to another key.
    #[error("envelope is addressed to {0}, not to us")]
    WrongRecipient(PublicKey),
    /// Timestamp outside the accepted window (or below the replay floor).
    #[error("envelope timestamp {ts} is outside the replay window (now {now})")]
    Stale {
        /// Envelope time, Unix ms.
        ts: u64,
        /// Receiver time, Unix ms.
        now: u64,
    },
    /// This nonce was already accepted.
    #[error("replayed envelope")]
    Replay,
    /// Authentication failed: tampered, forged, or sealed for another key.
    #[error("envelope failed authentication (tampered or forged)")]
    Forged,
    /// Decrypted, but the content is not a peer message.
    #[error("sealed content is not a peer message: {0}")]
    BadContent(String),
}

/// Why sealing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The recipient key is a low-order point.
    #[error("recipient key {0} is not a usable X25519 key")]
    BadRecipient(PublicKey),
}

fn cipher(shared: &[u8; 32], from: &PublicKey, to: &PublicKey) -> XChaCha20Poly1305 {
    let key = kdf(shared, SEAL_LABEL, &[&from.0, &to.0]);
    XChaCha20Poly1305::new((&key).into())
}

fn aad(from: &PublicKey, to: &PublicKey, ts: u64) -> Vec<u8> {
    let mut a = Vec::with_capacity(AAD_LABEL.len() + 72);
    a.extend_from_slice(AAD_LABEL);
    a.extend_from_slice(&from.0);
    a.extend_from_slice(&to.0);
    a.extend_from_slice(&ts.to_be_bytes());
    a
}

/// Seals `msg` from `sender` to `to` at Unix time `now_ms`.
pub fn seal(
    sender: &PrivateKey,
    to: &PublicKey,
    now_ms: u64,
    msg: &PeerMessage,
) -> Result<Envelope, SealError> {
    let plain = serde_json::to_vec(msg).expect("peer messages always serialise");
    seal_plaintext(sender, to, now_ms, &plain)
}

/// Seals arbitrary plaintext bytes exactly as [`seal`] seals a message's
/// JSON. Only for the fuzz targets, which need authentic envelopes around
/// content that is not a valid [`PeerMessage`]; use [`seal`].
#[doc(hidden)]
pub fn seal_plaintext(
    sender: &PrivateKey,
    to: &PublicKey,
    now_ms: u64,
    plain: &[u8],
) -> Result<Envelope, SealError> {
    let from = sender.public_key();
    let shared = sender
        .diffie_hellman(to)
        .ok_or(SealError::BadRecipient(*to))?;
    let nonce: [u8; 24] = rand::random();
    let ct = cipher(&shared, &from, to)
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plain,
                aad: &aad(&from, to, now_ms),
            },
        )
        .expect("XChaCha20-Poly1305 encryption does not fail for small messages");
    Ok(Envelope {
        from,
        to: *to,
        ts: now_ms,
        nonce: nonce.to_vec(),
        ct,
    })
}

/// The receiving side: opens envelopes for one private key and refuses
/// replays. Memory is bounded by `capacity` nonces.
#[derive(Debug)]
pub struct Opener {
    key: PrivateKey,
    public: PublicKey,
    window_ms: u64,
    capacity: usize,
    seen: HashSet<[u8; 24]>,
    order: VecDeque<([u8; 24], u64, PublicKey)>,
    /// Per sender: nothing at or below this timestamp is accepted any more
    /// (set when one of the sender's nonces is evicted inside the window).
    /// Per sender, so one member flooding the cache can only raise its own
    /// floor, never block everyone else's messages.
    floors: HashMap<PublicKey, u64>,
}

/// Most senders with a floor remembered; past it the oldest floors go
/// (their entries left the window long ago in any realistic flood).
const MAX_FLOORS: usize = 65_536;

impl Opener {
    /// Default accepted clock difference between sender and receiver.
    pub const DEFAULT_WINDOW_MS: u64 = 120_000;
    /// Default number of remembered nonces.
    pub const DEFAULT_CAPACITY: usize = 16_384;

    /// An opener for `key` with the default window and capacity.
    pub fn new(key: PrivateKey) -> Self {
        Self::with_limits(key, Self::DEFAULT_WINDOW_MS, Self::DEFAULT_CAPACITY)
    }

    /// An opener with an explicit window (ms, each side of now) and capacity.
    pub fn with_limits(key: PrivateKey, window_ms: u64, capacity: usize) -> Self {
        let public = key.public_key();
        Opener {
            key,
            public,
            window_ms,
            capacity: capacity.max(1),
            seen: HashSet::new(),
            order: VecDeque::new(),
            floors: HashMap::new(),
        }
    }

    /// Number of nonces currently remembered.
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }

    /// Authenticates and decrypts `env` at Unix time `now_ms`.
    pub fn open(&mut self, now_ms: u64, env: &Envelope) -> Result<PeerMessage, OpenError> {
        if env.to != self.public {
            return Err(OpenError::WrongRecipient(env.to));
        }
        let stale = OpenError::Stale {
            ts: env.ts,
            now: now_ms,
        };
        if env.ts.abs_diff(now_ms) > self.window_ms
            || self.floors.get(&env.from).is_some_and(|f| env.ts <= *f)
        {
            return Err(stale);
        }
        let nonce: [u8; 24] = env
            .nonce
            .as_slice()
            .try_into()
            .map_err(|_| OpenError::Forged)?;
        if self.seen.contains(&nonce) {
            return Err(OpenError::Replay);
        }
        let shared = self
            .key
            .diffie_hellman(&env.from)
            .ok_or(OpenError::Forged)?;
        let plain = cipher(&shared, &env.from, &self.public)
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &env.ct,
                    aad: &aad(&env.from, &self.public, env.ts),
                },
            )
            .map_err(|_| OpenError::Forged)?;
        // Remember only authentic nonces, so forgeries cannot flush the cache.
        self.remember(now_ms, nonce, env.ts, env.from);
        serde_json::from_slice(&plain).map_err(|e| OpenError::BadContent(e.to_string()))
    }

    fn remember(&mut self, now_ms: u64, nonce: [u8; 24], ts: u64, from: PublicKey) {
        while let Some(&(n, t, sender)) = self.order.front() {
            let expired = t.saturating_add(self.window_ms) < now_ms;
            if !expired && self.order.len() < self.capacity {
                break;
            }
            if !expired {
                // Evicted while still inside the window: raise that sender's floor.
                if self.floors.len() >= MAX_FLOORS && !self.floors.contains_key(&sender) {
                    let cutoff = now_ms.saturating_sub(self.window_ms);
                    self.floors.retain(|_, f| *f >= cutoff);
                }
                let f = self.floors.entry(sender).or_insert(t);
                *f = (*f).max(t);
            }
            self.order.pop_front();
            self.seen.remove(&n);
        }
        self.seen.insert(nonce);
        self.order.push_back((nonce, ts, from));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> PeerMessage {
        PeerMessage::Offer {
            session: 7,
            ufrag: "uf".into(),
            pwd: "secretpassword".into(),
            candidates: vec!["candidate:1 1 udp 2130706431 192.0.2.1 51820 typ host".into()],
            wg_port: None,
            cert: None,
        }
    }

    #[test]
    fn round_trip_and_json() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        let env = seal(&a, &b.public_key(), 1_000_000, &offer()).unwrap();
        let wire = serde_json::to_string(&env).unwrap();
        assert!(!wire.contains("secretpassword"), "plaintext leaked: {wire}");
        let env: Envelope = serde_json::from_str(&wire).unwrap();
        let mut opener = Opener::new(b);
        assert_eq!(opener.open(1_000_500, &env).unwrap(), offer());
    }

    #[test]
    fn tampering_is_detected() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        let env = seal(&a, &b.public_key(), 1_000_000, &offer()).unwrap();
        let mut opener = Opener::new(b.clone());
        let mut t = env.clone();
        t.ct[3] ^= 1;
        assert_eq!(opener.open(1_000_000, &t), Err(OpenError::Forged));
        let mut t = env.clone();
        t.ts += 1; // re-dated by the server
        assert_eq!(opener.open(1_000_000, &t), Err(OpenError::Forged));
        let mut t = env.clone();
        t.from = PrivateKey::generate().public_key(); // claimed other sender
        assert_eq!(opener.open(1_000_000, &t), Err(OpenError::Forged));
        let mut t = env.clone();
        t.nonce[0] ^= 1;
        assert_eq!(opener.open(1_000_000, &t), Err(OpenError::Forged));
        // The forgeries did not burn the genuine envelope's nonce.
        assert!(opener.open(1_000_000, &env).is_ok());
    }

    #[test]
    fn server_cannot_forge_or_redirect() {
        // The server knows both public keys, but a third private key cannot
        // produce anything B accepts as coming from A.
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        let mallory = PrivateKey::generate();
        let mut forged = seal(&mallory, &b.public_key(), 5, &offer()).unwrap();
        forged.from = a.public_key();
        let mut opener = Opener::new(b.clone());
        assert_eq!(opener.open(5, &forged), Err(OpenError::Forged));
        // Redirected to C: C can't open it, and it's not addressed to C.
        let env = seal(&a, &b.public_key(), 5, &offer()).unwrap();
        let c = PrivateKey::generate();
        let mut c_opener = Opener::new(c.clone());
        let mut redirected = env.clone();
        assert!(matches!(
            c_opener.open(5, &redirected),
            Err(OpenError::WrongRecipient(_))
        ));
        redirected.to = c.public_key();
        assert_eq!(c_opener.open(5, &redirected), Err(OpenError::Forged));
    }

    #[test]
    fn reflection_is_refused() {
        // A message A sealed for B, bounced back to A as if B had sent it.
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        let env = seal(&a, &b.public_key(), 5, &offer()).unwrap();
        let reflected = Envelope {
            from: b.public_key(),
            to: a.public_key(),
            ..env
        };
        assert_eq!(Opener::new(a).open(5, &reflected), Err(OpenError::Forged));
    }

    #[test]
    fn replay_and_stale_are_refused() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        let mut opener = Opener::with_limits(b.clone(), 1_000, 100);
        let env = seal(&a, &b.public_key(), 10_000, &offer()).unwrap();
        assert!(opener.open(10_000, &env).is_ok());
        assert_eq!(opener.open(10_001, &env), Err(OpenError::Replay));
        let old = seal(&a, &b.public_key(), 8_000, &offer()).unwrap();
        assert!(matches!(
            opener.open(10_000, &old),
            Err(OpenError::Stale { .. })
        ));
        let future = seal(&a, &b.public_key(), 12_000, &offer()).unwrap();
        assert!(matches!(
            opener.open(10_000, &future),
            Err(OpenError::Stale { .. })
        ));
        // Once outside the window, the envelope stays refused (as stale).
        assert!(matches!(
            opener.open(20_000, &env),
            Err(OpenError::Stale { .. })
        ));
    }

    #[test]
    fn nonce_cache_is_bounded_and_eviction_keeps_replays_out() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        let mut opener = Opener::with_limits(b.clone(), 60_000, 8);
        let envs: Vec<_> = (0..20)
            .map(|i| seal(&a, &b.public_key(), 100_000 + i, &offer()).unwrap())
            .collect();
        for e in &envs {
            opener.open(100_050, e).unwrap();
        }
        assert!(opener.remembered() <= 8);
        // Every one of them is still refused, evicted or not.
        for e in &envs {
            assert!(opener.open(100_060, e).is_err());
        }
        // Fresh messages still pass.
        let fresh = seal(&a, &b.public_key(), 100_070, &offer()).unwrap();
        assert!(opener.open(100_070, &fresh).is_ok());
    }

    #[test]
    fn a_member_flooding_future_dated_envelopes_blocks_only_itself() {
        let mallory = PrivateKey::generate();
        let alice = PrivateKey::generate();
        let b = PrivateKey::generate();
        let mut opener = Opener::with_limits(b.clone(), 60_000, 8);
        let now = 1_000_000;
        // Fill and overflow the cache with envelopes dated at the window's edge.
        for i in 0..32 {
            let e = seal(&mallory, &b.public_key(), now + 59_000 + i, &offer()).unwrap();
            opener.open(now, &e).unwrap();
        }
        // Alice's ordinary messages still pass.
        let fresh = seal(&alice, &b.public_key(), now + 10, &offer()).unwrap();
        assert!(opener.open(now + 10, &fresh).is_ok());
        // Mallory's own older-dated messages are the ones refused.
        let old = seal(&mallory, &b.public_key(), now + 20, &offer()).unwrap();
        assert!(opener.open(now + 20, &old).is_err());
    }

    #[test]
    fn all_message_kinds_round_trip() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        let mut opener = Opener::new(b.clone());
        let msgs = [
            offer(),
            PeerMessage::Answer {
                session: 1,
                ufrag: "a".into(),
                pwd: "b".into(),
                candidates: vec![],
                wg_port: None,
                cert: None,
            },
            PeerMessage::Candidate {
                session: 1,
                candidate: "candidate:2 1 udp 1 198.51.100.2 3478 typ relay".into(),
            },
            PeerMessage::EndOfCandidates { session: 1 },
            PeerMessage::Restart { session: 1 },
            PeerMessage::Bye { session: 1 },
            PeerMessage::Facts {
                session: 1,
                nat: r#"{"udp":true}"#.into(),
            },
            PeerMessage::PunchOffer {
                session: 1,
                port: 30007,
                delta: 1,
            },
            PeerMessage::PunchAnswer {
                session: 1,
                port: 30120,
                delta: -2,
            },
            PeerMessage::PunchGo { session: 1 },
            PeerMessage::BirthdayReady {
                session: 1,
                sockets: 256,
            },
            PeerMessage::BirthdayDone {
                session: 1,
                probes: 412,
                won: true,
            },
        ];
        for m in msgs {
            let env = seal(&a, &b.public_key(), 50, &m).unwrap();
            assert_eq!(opener.open(50, &env).unwrap(), m);
        }
    }

    #[test]
    fn a_newer_message_type_is_ignored_but_new_fields_are_refused() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        let mut opener = Opener::new(b.clone());
        // A type from a newer agent, with fields of its own: `Unknown`.
        let newer = br#"{"type":"predict","session":7,"ports":[1,2,3],"at":{"ms":5}}"#;
        let env = seal_plaintext(&a, &b.public_key(), 60, newer).unwrap();
        assert_eq!(opener.open(60, &env).unwrap(), PeerMessage::Unknown);
        // A known type with an extra field stays refused.
        let extra = br#"{"type":"bye","session":7,"why":"x"}"#;
        let env = seal_plaintext(&a, &b.public_key(), 61, extra).unwrap();
        assert!(matches!(
            opener.open(61, &env),
            Err(OpenError::BadContent(_))
        ));
        // Not an object, or no type at all: refused.
        for bad in [&b"[1]"[..], br#"{"session":1}"#, br#"{"type":5}"#] {
            let env = seal_plaintext(&a, &b.public_key(), 62, bad).unwrap();
            assert!(matches!(
                opener.open(62, &env),
                Err(OpenError::BadContent(_))
            ));
        }
    }
}
