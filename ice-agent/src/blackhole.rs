//! Blackhole detection on a direct pair (sans-IO).
//!
//! ICE keeps a pair while its connectivity checks are answered, but a path
//! can answer small STUN checks and still lose what matters:
//!
//! - a **data blackhole** drops WireGuard data (a middlebox that passes
//!   STUN but filters the rest), and
//! - an **MTU blackhole** drops datagrams above some size (a tunnel or a
//!   PPPoE link with ICMP filtered), so full-size WireGuard packets vanish
//!   while 100-byte checks pass.
//!
//! [`Blackhole`] watches the direct pair that carries data and sends its
//! own probes on it, as STUN Binding requests that carry a private,
//! comprehension-optional attribute ([`PROBE_ATTR`]) and are authenticated
//! with the ICE credentials like any check:
//!
//! - every [`BlackholeConfig::data_probe_interval`] a small probe carries
//!   our data counters; the peer answers with its count of WireGuard
//!   packets received from us. When we keep sending data and a probe sent
//!   [`BlackholeConfig::data_stall`] after the first unacknowledged packet
//!   comes back with that count unchanged, the path answers checks but
//!   drops data;
//! - every [`BlackholeConfig::mtu_probe_interval`] a probe padded with
//!   PADDING (RFC 5780) to the full WireGuard datagram size
//!   ([`BlackholeConfig::full_size`]) goes out; [`BlackholeConfig::mtu_lost`]
//!   lost in a row while small probes are answered means the path drops
//!   big datagrams. A sweep of padded probes of decreasing sizes then finds
//!   the largest size that passes, for the status line.
//!
//! A verdict bans the pair for a backoff interval (data: 15 s doubling to
//! 8 min, MTU: 4 s doubling to 60 s); the session leaves it for the relay or
//! another working pair, and tells the peer with a "leave" flag in the next
//! probes so both directions move. When the ban runs out the pair may carry
//! data again and is watched afresh.
//!
//! Probes go only while we send data (nothing to protect otherwise), so an
//! idle tunnel costs nothing. Everything here takes `now`; the module
//! never reads the clock and owns no socket. The wire format lives here
//! too ([`encode_request`], [`encode_response`], [`parse`]); parsing
//! checks every length and never panics.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relay::stun::{self, attr, method, Class, Integrity, Message, MessageBuilder};

/// Datagrams above this many bytes count as large: full-size probes go
/// only while the driver reports some (an MTU blackhole cannot hurt
/// smaller ones). A driver that does not count them gets full-size probes
/// whenever data flows.
pub const LARGE_DATAGRAM: usize = 1000;

/// The private attribute carried by probes and their answers
/// (comprehension-optional range: a STUN agent that does not know it
/// ignores it).
pub const PROBE_ATTR: u16 = 0xC057;

/// Length of the attribute's value, version 1.
const PROBE_VALUE_LEN: usize = 20;
/// Most pairs banned at once (the peer's "leave" flags beyond are ignored).
const MAX_BANS: usize = 64;
/// Wire format version.
const VERSION: u8 = 1;

/// The probe is an answer.
pub const FLAG_RESPONSE: u8 = 0x01;
/// The sender left this pair: it answers checks but drops data.
pub const FLAG_LEAVE_DATA: u8 = 0x02;
/// The sender left this pair: it drops big datagrams.
pub const FLAG_LEAVE_MTU: u8 = 0x04;

/// The contents of a [`PROBE_ATTR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeAttr {
    /// `FLAG_*` bits.
    pub flags: u8,
    /// In a request: its own length on the wire. In an answer: the length
    /// of the request it answers.
    pub size: u16,
    /// WireGuard packets the sender received from the other side.
    pub data_rx: u64,
    /// WireGuard packets (or bytes: it only has to grow) the sender sent.
    pub data_tx: u64,
}

impl ProbeAttr {
    fn to_bytes(self) -> [u8; PROBE_VALUE_LEN] {
        let mut v = [0u8; PROBE_VALUE_LEN];
        v[0] = VERSION;
        v[1] = self.flags;
        v[2..4].copy_from_slice(&self.size.to_be_bytes());
        v[4..12].copy_from_slice(&self.data_rx.to_be_bytes());
        v[12..20].copy_from_slice(&self.data_tx.to_be_bytes());
        v
    }

    /// Decodes an attribute value: version 1 and at least 20 bytes (later
    /// versions may append fields).
    pub fn from_bytes(v: &[u8]) -> Result<ProbeAttr, ProbeError> {
        if v.len() < PROBE_VALUE_LEN {
            return Err(ProbeError::Short(v.len()));
        }
        if v[0] != VERSION {
            return Err(ProbeError::Version(v[0]));
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[i..i + 8]);
            u64::from_be_bytes(b)
        };
        Ok(ProbeAttr {
            flags: v[1],
            size: u16::from_be_bytes([v[2], v[3]]),
            data_rx: u64_at(4),
            data_tx: u64_at(12),
        })
    }
}

/// Why a datagram with a [`PROBE_ATTR`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// The attribute value is shorter than version 1's 20 bytes.
    #[error("probe attribute of {0} bytes (want 20)")]
    Short(usize),
    /// An unknown version.
    #[error("probe attribute version {0}")]
    Version(u8),
    /// Neither a Binding request nor a Binding success response.
    #[error("probe in a STUN message that is not a Binding request or success")]
    NotBinding,
    /// A request without USERNAME.
    #[error("probe request without USERNAME")]
    NoUsername,
    /// No MESSAGE-INTEGRITY, or the wrong one.
    #[error("probe with missing or wrong MESSAGE-INTEGRITY")]
    Integrity,
}

/// A datagram recognised as a probe (integrity not yet verified: the
/// caller knows the password, see [`ParsedProbe::verify`]).
#[derive(Debug, Clone, Copy)]
pub struct ParsedProbe<'a> {
    msg: Message<'a>,
    /// Whether it is an answer.
    pub response: bool,
    /// Transaction ID.
    pub tid: [u8; 12],
    /// USERNAME of a request.
    pub username: Option<&'a str>,
    /// The attribute.
    pub attr: ProbeAttr,
    /// Length on the wire.
    pub len: usize,
}

impl ParsedProbe<'_> {
    /// Checks MESSAGE-INTEGRITY (HMAC-SHA1) with `password`.
    pub fn verify(&self, password: &[u8]) -> bool {
        self.msg.verify_integrity(password) == Some(Integrity::Sha1)
    }
}

/// Recognises a probe. `Ok(None)`: not a probe (no [`PROBE_ATTR`], or not
/// STUN at all); the caller goes on with it. `Err`: it carries the
/// attribute but is malformed; the caller counts and drops it.
pub fn parse(datagram: &[u8]) -> Result<Option<ParsedProbe<'_>>, ProbeError> {
    let Ok(msg) = Message::parse(datagram) else {
        return Ok(None);
    };
    let Some(v) = msg.get(PROBE_ATTR) else {
        return Ok(None);
    };
    let attr = ProbeAttr::from_bytes(v)?;
    if msg.method() != method::BINDING {
        return Err(ProbeError::NotBinding);
    }
    let response = match msg.class() {
        Class::Request => false,
        Class::Success => true,
        _ => return Err(ProbeError::NotBinding),
    };
    let username = msg.str_attr(attr::USERNAME);
    if !response && username.is_none() {
        return Err(ProbeError::NoUsername);
    }
    if msg.get(attr::MESSAGE_INTEGRITY).is_none() {
        return Err(ProbeError::Integrity);
    }
    Ok(Some(ParsedProbe {
        msg,
        response,
        tid: msg.transaction_id(),
        username,
        attr,
        len: datagram.len(),
    }))
}

/// Writes a probe request into `buf`: USERNAME, the attribute, PADDING up
/// to `target_len` bytes (when that is more than the probe without it),
/// MESSAGE-INTEGRITY with the peer's password `key`, FINGERPRINT. The
/// attribute's `size` is set to the length on the wire.
pub fn encode_request(
    buf: &mut Vec<u8>,
    tid: [u8; 12],
    username: &str,
    key: &[u8],
    mut probe: ProbeAttr,
    target_len: usize,
) {
    let padded = |n: usize| (n + 3) & !3;
    // Header, USERNAME, probe, MESSAGE-INTEGRITY, FINGERPRINT.
    let base = stun::HEADER_LEN + 4 + padded(username.len()) + 4 + PROBE_VALUE_LEN + 24 + 8;
    let pad = target_len.saturating_sub(base + 4) & !3;
    let total = if target_len >= base + 4 {
        base + 4 + pad
    } else {
        base
    };
    probe.size = u16::try_from(total).unwrap_or(u16::MAX);
    let mut b = MessageBuilder::new(buf, method::BINDING, Class::Request, tid);
    b.attr(attr::USERNAME, username.as_bytes());
    b.attr(PROBE_ATTR, &probe.to_bytes());
    if total > base {
        b.attr(attr::PADDING, &vec![0u8; pad]);
    }
    b.integrity(Integrity::Sha1, key);
    b.fingerprint();
}

/// Writes the answer to a probe: XOR-MAPPED-ADDRESS (where the request
/// came from), the attribute, MESSAGE-INTEGRITY with our password `key`,
/// FINGERPRINT.
pub fn encode_response(
    buf: &mut Vec<u8>,
    tid: [u8; 12],
    mapped: SocketAddr,
    key: &[u8],
    probe: ProbeAttr,
) {
    let mut b = MessageBuilder::new(buf, method::BINDING, Class::Success, tid);
    b.xor_address(attr::XOR_MAPPED_ADDRESS, mapped);
    b.attr(PROBE_ATTR, &probe.to_bytes());
    b.integrity(Integrity::Sha1, key);
    b.fingerprint();
}

/// Tuning of [`Blackhole`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BlackholeConfig {
    /// UDP payload of a full-size WireGuard packet: MTU 1420 + 32 bytes of
    /// WireGuard overhead.
    pub full_size: u16,
    /// Small probes (with counters) while data flows.
    pub data_probe_interval: Duration,
    /// Full-size probes while data flows.
    pub mtu_probe_interval: Duration,
    /// Full-size probes lost in a row for an MTU verdict.
    pub mtu_lost: u32,
    /// A probe unanswered this long (or 3 RTTs, if longer) is lost.
    pub probe_timeout: Duration,
    /// Data sent and not acknowledged by the peer's counter this long,
    /// while probes are answered: data verdict.
    pub data_stall: Duration,
    /// Probing continues this long after we last sent data.
    pub active_after_tx: Duration,
    /// Ban after a data verdict: first interval and cap.
    pub data_backoff: (Duration, Duration),
    /// Ban after an MTU verdict: first interval and cap.
    pub mtu_backoff: (Duration, Duration),
    /// A pair that carried data this long without a verdict resets the
    /// backoff.
    pub clean_after: Duration,
    /// Sizes the MTU sweep tries (largest first).
    pub sweep_sizes: Vec<u16>,
}

impl Default for BlackholeConfig {
    fn default() -> Self {
        let mut sweep_sizes: Vec<u16> = (0..16).map(|i| 1452 - 16 * i).collect();
        sweep_sizes.extend([1180, 1100, 1000, 900, 800, 700, 576, 400]);
        BlackholeConfig {
            full_size: 1452,
            data_probe_interval: Duration::from_millis(250),
            mtu_probe_interval: Duration::from_millis(400),
            mtu_lost: 4,
            probe_timeout: Duration::from_millis(300),
            data_stall: Duration::from_millis(1500),
            active_after_tx: Duration::from_secs(2),
            data_backoff: (Duration::from_secs(15), Duration::from_secs(480)),
            mtu_backoff: (Duration::from_secs(4), Duration::from_secs(60)),
            clean_after: Duration::from_secs(60),
            sweep_sizes,
        }
    }
}

/// What a verdict found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The pair answers checks but drops WireGuard data.
    Data,
    /// The pair drops datagrams above some size.
    Mtu {
        /// Largest probe (UDP payload bytes) the sweep got through, once known.
        largest_ok: Option<u16>,
    },
}

/// A pair left after a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ban {
    /// What was found.
    pub cause: Cause,
    /// When.
    pub since: Instant,
    /// When the pair may carry data again.
    pub until: Instant,
    /// The peer's verdict (its "leave" flag), not ours.
    pub by_peer: bool,
}

type PairKey = (SocketAddr, SocketAddr);

/// A probe the caller should encode and send on `pair`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeOut {
    /// (local, remote).
    pub pair: PairKey,
    /// Transaction ID.
    pub tid: [u8; 12],
    /// Length to pad to (0: unpadded).
    pub target_len: u16,
    /// The attribute (its `size` is filled in by [`encode_request`]).
    pub attr: ProbeAttr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeKind {
    Small,
    Full,
    Sweep(u16),
}

#[derive(Debug, Clone, Copy)]
struct Outstanding {
    pair: PairKey,
    sent: Instant,
    kind: ProbeKind,
}

/// The watch on the pair that carries data.
#[derive(Debug, Clone)]
struct Watch {
    pair: PairKey,
    since: Instant,
    next_small: Instant,
    next_full: Instant,
    full_lost: u32,
    first_lost_sent: Option<Instant>,
    last_small_ok: Option<Instant>,
    peer_rx: Option<u64>,
    /// First data sent that the peer's counter has not acknowledged.
    unacked_since: Option<Instant>,
    rtt: Option<Duration>,
}

/// Counters for status and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlackholeStats {
    /// Probes sent (all kinds).
    pub probes_sent: u64,
    /// Bytes of probes sent (UDP payload; unpadded ones counted as 100).
    pub probe_bytes: u64,
    /// Answers to our probes accepted.
    pub answers: u64,
    /// Full-size probes counted lost.
    pub full_lost: u64,
    /// Data verdicts of ours.
    pub data_verdicts: u64,
    /// MTU verdicts of ours.
    pub mtu_verdicts: u64,
    /// Pairs left because the peer said so.
    pub peer_leaves: u64,
}

/// Blackhole detection for one peer session. See the module docs.
#[derive(Debug)]
pub struct Blackhole {
    cfg: BlackholeConfig,
    rng: StdRng,
    bans: HashMap<PairKey, Ban>,
    outstanding: HashMap<[u8; 12], Outstanding>,
    watch: Option<Watch>,
    /// Our data counters: sent (as the driver reports it), received.
    tx_total: u64,
    tx_changed_at: Option<Instant>,
    /// Datagrams above [`LARGE_DATAGRAM`] sent, when the driver counts them.
    large_total: Option<u64>,
    large_changed_at: Option<Instant>,
    rx_total: u64,
    data_attempt: u32,
    mtu_attempt: u32,
    /// Pending "leave" notices: (pair, flags, when).
    leaves: Vec<(PairKey, u8, Instant)>,
    /// Pending sweeps: (pair, when).
    sweeps: Vec<(PairKey, Instant)>,
    out: Vec<ProbeOut>,
    verdicts: Vec<(PairKey, Cause)>,
    stats: BlackholeStats,
}

impl Blackhole {
    /// A detector; `seed` seeds transaction IDs.
    pub fn new(cfg: BlackholeConfig, seed: u64) -> Self {
        Blackhole {
            cfg,
            rng: StdRng::seed_from_u64(seed),
            bans: HashMap::new(),
            outstanding: HashMap::new(),
            watch: None,
            tx_total: 0,
            tx_changed_at: None,
            large_total: None,
            large_changed_at: None,
            rx_total: 0,
            data_attempt: 0,
            mtu_attempt: 0,
            leaves: Vec::new(),
            sweeps: Vec::new(),
            out: Vec::new(),
            verdicts: Vec::new(),
            stats: BlackholeStats::default(),
        }
    }

    /// The driver's cumulative count of WireGuard packets (or bytes) sent
    /// to the peer, and of those larger than [`LARGE_DATAGRAM`] when it
    /// knows (`None`: full-size probes go whenever data flows). O(1).
    pub fn note_tx(&mut self, now: Instant, total: u64, large: Option<u64>) {
        match large {
            Some(n) => {
                if self.large_total.unwrap_or(0) != n {
                    self.large_changed_at = Some(now);
                }
                self.large_total = Some(n);
            }
            None => self.large_total = None,
        }
        if total != self.tx_total {
            self.tx_total = total;
            self.tx_changed_at = Some(now);
            if let Some(w) = self.watch.as_mut() {
                if w.unacked_since.is_none() {
                    w.unacked_since = Some(now);
                }
            }
        }
    }

    /// One WireGuard packet arrived from the peer. O(1).
    pub fn note_rx(&mut self) {
        self.rx_total = self.rx_total.wrapping_add(1);
    }

    /// The ban on `pair`, if it is still in force at `now`.
    pub fn ban(&self, pair: PairKey, now: Instant) -> Option<&Ban> {
        self.bans.get(&pair).filter(|b| now < b.until)
    }

    /// The ban most recently imposed that is still in force.
    pub fn latest_ban(&self, now: Instant) -> Option<(PairKey, &Ban)> {
        self.bans
            .iter()
            .filter(|(_, b)| now < b.until)
            .max_by_key(|(_, b)| b.since)
            .map(|(k, b)| (*k, b))
    }

    /// Counters.
    pub fn stats(&self) -> BlackholeStats {
        self.stats
    }

    /// Advances to `now` with `path` the direct pair that carries data
    /// (`None` when data goes elsewhere). Queues probes and may reach a
    /// verdict; drain [`Blackhole::poll_probe`] and
    /// [`Blackhole::poll_verdict`] after.
    pub fn tick(&mut self, now: Instant, path: Option<PairKey>) {
        // Bans that ran out: the pair is watched afresh when data uses it.
        self.bans.retain(|_, b| now < b.until);
        let path = path.filter(|p| self.ban(*p, now).is_none());
        if self.watch.as_ref().map(|w| w.pair) != path {
            self.watch = path.map(|pair| Watch {
                pair,
                since: now,
                next_small: now,
                next_full: now,
                full_lost: 0,
                first_lost_sent: None,
                last_small_ok: None,
                peer_rx: None,
                unacked_since: None,
                rtt: None,
            });
        }
        self.expire(now);
        let (active, large) = self.activity(now);
        if let Some(w) = self.watch.clone() {
            if now.saturating_duration_since(w.since) >= self.cfg.clean_after
                && (self.data_attempt > 0 || self.mtu_attempt > 0)
            {
                tracing::debug!(local = %w.pair.0, remote = %w.pair.1, "pair clean: blackhole backoff reset");
                self.data_attempt = 0;
                self.mtu_attempt = 0;
                if let Some(w) = self.watch.as_mut() {
                    w.since = now;
                }
            }
            if active {
                if now >= w.next_small {
                    self.send(now, w.pair, ProbeKind::Small, 0);
                    if let Some(w) = self.watch.as_mut() {
                        w.next_small = now + self.cfg.data_probe_interval;
                    }
                }
                if large && now >= w.next_full {
                    self.send(now, w.pair, ProbeKind::Full, 0);
                    if let Some(w) = self.watch.as_mut() {
                        w.next_full = now + self.cfg.mtu_probe_interval;
                    }
                }
            } else if let Some(w) = self.watch.as_mut() {
                // Idle: start on time when data resumes; nothing unacknowledged.
                w.next_small = w.next_small.max(now);
                w.unacked_since = None;
            }
            if !large {
                if let Some(w) = self.watch.as_mut() {
                    w.next_full = w.next_full.max(now);
                }
            }
        }
        // Leave notices and sweeps due.
        let due: Vec<(PairKey, u8)> = self
            .leaves
            .iter()
            .filter(|(_, _, at)| *at <= now)
            .map(|(p, f, _)| (*p, *f))
            .collect();
        self.leaves.retain(|(_, _, at)| *at > now);
        for (pair, flags) in due {
            self.send(now, pair, ProbeKind::Small, flags);
        }
        let sweeps: Vec<PairKey> = self
            .sweeps
            .iter()
            .filter(|(_, at)| *at <= now)
            .map(|(p, _)| *p)
            .collect();
        self.sweeps.retain(|(_, at)| *at > now);
        for pair in sweeps {
            if self.ban(pair, now).is_some() {
                for size in self.cfg.sweep_sizes.clone() {
                    self.send(now, pair, ProbeKind::Sweep(size), 0);
                }
            }
        }
    }

    /// The next probe to send.
    #[must_use]
    pub fn poll_probe(&mut self) -> Option<ProbeOut> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.remove(0))
        }
    }

    /// The next verdict of ours or the peer's (the pair is banned already).
    #[must_use]
    pub fn poll_verdict(&mut self) -> Option<(PairKey, Cause)> {
        if self.verdicts.is_empty() {
            None
        } else {
            Some(self.verdicts.remove(0))
        }
    }

    /// When [`Blackhole::tick`] has work next.
    #[must_use]
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let (active, large) = self.activity(now);
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        if let Some(w) = &self.watch {
            if active {
                consider(w.next_small);
            }
            if large {
                consider(w.next_full);
            }
            let timeout = self.timeout(w.rtt);
            for o in self.outstanding.values() {
                consider(o.sent + timeout);
            }
        }
        for b in self.bans.values() {
            consider(b.until);
        }
        for (_, _, at) in &self.leaves {
            consider(*at);
        }
        for (_, at) in &self.sweeps {
            consider(*at);
        }
        next
    }

    /// An answer to one of our probes arrived on `pair` (integrity
    /// checked by the caller). `false` if it answers nothing we sent there.
    pub fn handle_response(
        &mut self,
        now: Instant,
        pair: PairKey,
        tid: [u8; 12],
        a: ProbeAttr,
    ) -> bool {
        let Some(o) = self.outstanding.get(&tid).copied() else {
            return false;
        };
        if o.pair != pair {
            return false;
        }
        self.outstanding.remove(&tid);
        self.stats.answers += 1;
        if let ProbeKind::Sweep(size) = o.kind {
            if let Some(b) = self.bans.get_mut(&pair) {
                if let Cause::Mtu { largest_ok } = &mut b.cause {
                    if largest_ok.is_none_or(|l| size > l) {
                        *largest_ok = Some(size);
                    }
                }
            }
            return true;
        }
        let data_stall = self.cfg.data_stall;
        let Some(w) = self.watch.as_mut().filter(|w| w.pair == pair) else {
            return true;
        };
        w.rtt = Some(now.saturating_duration_since(o.sent));
        match o.kind {
            ProbeKind::Full => {
                w.full_lost = 0;
                w.first_lost_sent = None;
            }
            ProbeKind::Small => w.last_small_ok = Some(now),
            ProbeKind::Sweep(_) => {}
        }
        if w.peer_rx != Some(a.data_rx) {
            w.peer_rx = Some(a.data_rx);
            w.unacked_since = None;
        } else if w
            .unacked_since
            .is_some_and(|t| o.sent.saturating_duration_since(t) >= data_stall)
            // Full-size probes are being lost too: the data is lost for its
            // size, and the MTU verdict (with the size) is on its way.
            && w.full_lost == 0
        {
            tracing::info!(
                local = %pair.0, remote = %pair.1,
                "direct path answers checks but drops data: the peer's received count stood still for {:?} while we sent",
                now.saturating_duration_since(w.unacked_since.unwrap_or(now))
            );
            self.stats.data_verdicts += 1;
            self.verdict(now, pair, Cause::Data, false);
        }
        true
    }

    /// A probe request arrived on `pair` (integrity checked by the caller);
    /// returns the attribute for the answer. A "leave" flag bans the pair
    /// here too.
    pub fn handle_request(
        &mut self,
        now: Instant,
        pair: PairKey,
        a: ProbeAttr,
        len: usize,
    ) -> ProbeAttr {
        let leave = if a.flags & FLAG_LEAVE_DATA != 0 {
            Some(Cause::Data)
        } else if a.flags & FLAG_LEAVE_MTU != 0 {
            Some(Cause::Mtu { largest_ok: None })
        } else {
            None
        };
        if let Some(cause) = leave {
            // Bounded: a peer cannot make us hold more than MAX_BANS.
            if self.ban(pair, now).is_none() && self.bans.len() < MAX_BANS {
                tracing::info!(local = %pair.0, remote = %pair.1, ?cause, "the peer left this direct pair (blackhole); leaving it too");
                self.stats.peer_leaves += 1;
                self.verdict(now, pair, cause, true);
            }
        }
        ProbeAttr {
            flags: FLAG_RESPONSE,
            size: u16::try_from(len).unwrap_or(u16::MAX),
            data_rx: self.rx_total,
            data_tx: self.tx_total,
        }
    }

    /// Whether data flows (small probes), and whether large datagrams do
    /// (full-size probes; always with data when the driver does not count
    /// them).
    fn activity(&self, now: Instant) -> (bool, bool) {
        let recent = |t: Option<Instant>| {
            t.is_some_and(|t| now.saturating_duration_since(t) < self.cfg.active_after_tx)
        };
        let active = recent(self.tx_changed_at);
        let large = match self.large_total {
            None => active,
            Some(_) => recent(self.large_changed_at),
        };
        (active, large)
    }

    fn timeout(&self, rtt: Option<Duration>) -> Duration {
        self.cfg
            .probe_timeout
            .max(rtt.map_or(Duration::ZERO, |r| r * 3))
    }

    /// Counts unanswered probes as lost; may reach an MTU verdict.
    fn expire(&mut self, now: Instant) {
        let rtt = self.watch.as_ref().and_then(|w| w.rtt);
        let timeout = self.timeout(rtt);
        let mut lost_full: Vec<Instant> = Vec::new();
        let watched = self.watch.as_ref().map(|w| w.pair);
        self.outstanding.retain(|_, o| {
            let age = now.saturating_duration_since(o.sent);
            match o.kind {
                // Sweep answers may come late: keep them a while.
                ProbeKind::Sweep(_) => age < Duration::from_secs(5),
                ProbeKind::Small | ProbeKind::Full => {
                    if age < timeout {
                        return true;
                    }
                    if o.kind == ProbeKind::Full && Some(o.pair) == watched {
                        lost_full.push(o.sent);
                    }
                    false
                }
            }
        });
        lost_full.sort();
        let Some(w) = self.watch.as_mut() else { return };
        for sent in lost_full {
            w.full_lost += 1;
            self.stats.full_lost += 1;
            if w.first_lost_sent.is_none() {
                w.first_lost_sent = Some(sent);
            }
        }
        let small_ok_since_loss = match (w.last_small_ok, w.first_lost_sent) {
            (Some(ok), Some(lost)) => ok >= lost,
            _ => false,
        };
        if w.full_lost >= self.cfg.mtu_lost && small_ok_since_loss {
            let pair = w.pair;
            tracing::info!(
                local = %pair.0, remote = %pair.1, lost = w.full_lost,
                size = self.cfg.full_size,
                "direct path drops full-size datagrams while small probes are answered"
            );
            self.stats.mtu_verdicts += 1;
            self.verdict(now, pair, Cause::Mtu { largest_ok: None }, false);
        }
    }

    fn verdict(&mut self, now: Instant, pair: PairKey, cause: Cause, by_peer: bool) {
        let ((first, cap), attempt) = match cause {
            Cause::Data => (self.cfg.data_backoff, &mut self.data_attempt),
            Cause::Mtu { .. } => (self.cfg.mtu_backoff, &mut self.mtu_attempt),
        };
        let interval = first
            .checked_mul(1u32 << (*attempt).min(16))
            .unwrap_or(cap)
            .min(cap);
        *attempt = attempt.saturating_add(1);
        self.bans.insert(
            pair,
            Ban {
                cause,
                since: now,
                until: now + interval,
                by_peer,
            },
        );
        if self.watch.as_ref().is_some_and(|w| w.pair == pair) {
            self.watch = None;
        }
        self.outstanding
            .retain(|_, o| o.pair != pair || matches!(o.kind, ProbeKind::Sweep(_)));
        if !by_peer {
            let flag = match cause {
                Cause::Data => FLAG_LEAVE_DATA,
                Cause::Mtu { .. } => FLAG_LEAVE_MTU,
            };
            // Twice, in case one is lost.
            self.leaves.push((pair, flag, now));
            self.leaves
                .push((pair, flag, now + self.cfg.data_probe_interval));
        }
        if matches!(cause, Cause::Mtu { .. }) {
            self.sweeps.push((pair, now));
            self.sweeps.push((pair, now + Duration::from_secs(1)));
        }
        self.verdicts.push((pair, cause));
    }

    fn send(&mut self, now: Instant, pair: PairKey, kind: ProbeKind, flags: u8) {
        let tid: [u8; 12] = self.rng.random();
        let target_len = match kind {
            ProbeKind::Small => 0,
            ProbeKind::Full => self.cfg.full_size,
            ProbeKind::Sweep(s) => s,
        };
        // Leave notices are not answers we wait for.
        if flags == 0 {
            self.outstanding.insert(
                tid,
                Outstanding {
                    pair,
                    sent: now,
                    kind,
                },
            );
        }
        self.stats.probes_sent += 1;
        self.stats.probe_bytes += u64::from(target_len.max(100));
        self.out.push(ProbeOut {
            pair,
            tid,
            target_len,
            attr: ProbeAttr {
                flags,
                size: 0,
                data_rx: self.rx_total,
                data_tx: self.tx_total,
            },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    const PAIR: PairKey = (
        SocketAddr::V4(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::new(192, 0, 2, 1),
            1000,
        )),
        SocketAddr::V4(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::new(192, 0, 2, 2),
            2000,
        )),
    );

    #[test]
    fn request_and_response_round_trip_with_padding_and_integrity() {
        let mut buf = Vec::new();
        let a = ProbeAttr {
            flags: FLAG_LEAVE_MTU,
            size: 0,
            data_rx: 7,
            data_tx: u64::MAX,
        };
        encode_request(&mut buf, [9; 12], "peer:me", b"password", a, 1452);
        assert_eq!(buf.len(), 1452);
        let p = parse(&buf).expect("ok").expect("probe");
        assert!(!p.response);
        assert_eq!(p.username, Some("peer:me"));
        assert_eq!(p.attr.size, 1452);
        assert_eq!(
            (p.attr.flags, p.attr.data_rx, p.attr.data_tx),
            (FLAG_LEAVE_MTU, 7, u64::MAX)
        );
        assert!(p.verify(b"password"));
        assert!(!p.verify(b"passwore"));
        // Unpadded: as small as it gets.
        encode_request(&mut buf, [9; 12], "peer:me", b"password", a, 0);
        assert!(buf.len() < 100, "{}", buf.len());
        encode_response(&mut buf, [3; 12], sa("198.51.100.1:4000"), b"pw", a);
        let p = parse(&buf).expect("ok").expect("probe");
        assert!(p.response && p.verify(b"pw"));
        assert_eq!(p.tid, [3; 12]);
    }

    #[test]
    fn every_corruption_and_truncation_is_refused_or_ignored_without_panic() {
        let mut buf = Vec::new();
        let a = ProbeAttr {
            flags: 0,
            size: 0,
            data_rx: 1,
            data_tx: 2,
        };
        encode_request(&mut buf, [1; 12], "u:v", b"k", a, 200);
        for i in 0..buf.len() {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut m = buf.clone();
                m[i] ^= flip;
                // Either not a probe, refused, or failing integrity — except
                // in FINGERPRINT (not covered by the MAC, and not checked
                // here because MESSAGE-INTEGRITY authenticates).
                if let Ok(Some(p)) = parse(&m) {
                    assert!(
                        i >= buf.len() - 8 || !p.verify(b"k"),
                        "byte {i} ^ {flip:#x}"
                    );
                }
            }
        }
        for n in 0..buf.len() {
            let _ = parse(&buf[..n]);
        }
        assert_eq!(ProbeAttr::from_bytes(&[1; 19]), Err(ProbeError::Short(19)));
        assert_eq!(ProbeAttr::from_bytes(&[2; 20]), Err(ProbeError::Version(2)));
    }

    /// One side's detector against a modelled peer that answers (or not).
    struct Drill {
        bh: Blackhole,
        now: Instant,
        peer_rx: u64,
        tx: u64,
    }

    impl Drill {
        fn new() -> Drill {
            Drill {
                bh: Blackhole::new(BlackholeConfig::default(), 1),
                now: Instant::now(),
                peer_rx: 0,
                tx: 0,
            }
        }

        /// Runs for `d` in 10 ms steps: data every 10 ms; the peer gets
        /// the data when `data_ok`, answers probes up to `max_size`.
        fn run(&mut self, d: Duration, data_ok: bool, max_size: u16) -> Option<(Instant, Cause)> {
            let end = self.now + d;
            while self.now < end {
                self.now += Duration::from_millis(10);
                self.tx += 1;
                if data_ok {
                    self.peer_rx += 1;
                }
                self.bh.note_tx(self.now, self.tx, None);
                let path = (self.bh.ban(PAIR, self.now).is_none()).then_some(PAIR);
                self.bh.tick(self.now, path);
                while let Some(p) = self.bh.poll_probe() {
                    let size = p.target_len.max(80);
                    if size <= max_size && p.attr.flags == 0 {
                        let a = ProbeAttr {
                            flags: FLAG_RESPONSE,
                            size,
                            data_rx: self.peer_rx,
                            data_tx: 0,
                        };
                        // Answered 2 ms later: handled at the next step.
                        let at = self.now;
                        self.bh.handle_response(at, p.pair, p.tid, a);
                    }
                }
                if let Some((_, c)) = self.bh.poll_verdict() {
                    return Some((self.now, c));
                }
            }
            None
        }
    }

    #[test]
    fn a_healthy_path_gets_no_verdict() {
        let mut d = Drill::new();
        assert_eq!(d.run(Duration::from_secs(30), true, 1452), None);
        let s = d.bh.stats();
        assert!(s.probes_sent > 150, "{s:?}");
        assert_eq!(s.full_lost, 0);
    }

    #[test]
    fn data_blackhole_is_found_within_2_5_s_and_backs_off() {
        let mut d = Drill::new();
        assert_eq!(d.run(Duration::from_secs(3), true, 1452), None);
        let start = d.now;
        let (at, cause) = d.run(Duration::from_secs(5), false, 1452).expect("verdict");
        assert_eq!(cause, Cause::Data);
        let took = at - start;
        assert!(took <= Duration::from_millis(2500), "{took:?}");
        let ban = *d.bh.ban(PAIR, d.now).expect("banned");
        assert_eq!(ban.until - ban.since, Duration::from_secs(15));
        assert!(!ban.by_peer);
        // Leave notices go out to the peer.
        let mut leaves = 0;
        for _ in 0..40 {
            d.now += Duration::from_millis(10);
            d.bh.tick(d.now, None);
            while let Some(p) = d.bh.poll_probe() {
                assert_eq!(p.pair, PAIR);
                leaves += usize::from(p.attr.flags == FLAG_LEAVE_DATA);
            }
        }
        assert_eq!(leaves, 2);
        // Still broken when the ban runs out: found again, banned twice as long.
        d.now = ban.until;
        let (_, cause) = d.run(Duration::from_secs(5), false, 1452).expect("again");
        assert_eq!(cause, Cause::Data);
        let ban2 = *d.bh.ban(PAIR, d.now).expect("banned");
        assert_eq!(ban2.until - ban2.since, Duration::from_secs(30));
    }

    #[test]
    fn mtu_blackhole_is_found_within_2_5_s_and_the_sweep_finds_the_limit() {
        let mut d = Drill::new();
        assert_eq!(d.run(Duration::from_secs(3), true, 1452), None);
        let start = d.now;
        let (at, cause) = d.run(Duration::from_secs(5), true, 1300).expect("verdict");
        assert_eq!(cause, Cause::Mtu { largest_ok: None });
        assert!(
            at - start <= Duration::from_millis(2500),
            "{:?}",
            at - start
        );
        // The sweep runs at once; its answers name the largest size through.
        d.run(Duration::from_millis(50), true, 1300);
        let ban = *d.bh.ban(PAIR, d.now).expect("banned");
        assert_eq!(
            ban.cause,
            Cause::Mtu {
                largest_ok: Some(1292)
            }
        );
        assert_eq!(ban.until - ban.since, Duration::from_secs(4));
    }

    #[test]
    fn full_size_data_lost_to_an_mtu_blackhole_is_named_by_size() {
        // Data is lost too (it is full-size), but so are full-size probes:
        // the verdict is MTU, not "drops data", though the data stall alone
        // would come first.
        let mut d = Drill::new();
        // Slow full-size probes, so that the data stall is due first.
        d.bh.cfg.mtu_probe_interval = Duration::from_millis(700);
        assert_eq!(d.run(Duration::from_secs(3), true, 1452), None);
        let (_, cause) = d.run(Duration::from_secs(5), false, 1300).expect("verdict");
        assert_eq!(cause, Cause::Mtu { largest_ok: None });
    }

    #[test]
    fn small_packets_only_get_no_full_size_probes() {
        let mut bh = Blackhole::new(BlackholeConfig::default(), 1);
        let mut now = Instant::now();
        let mut sizes = Vec::new();
        for i in 0..500u64 {
            now += Duration::from_millis(10);
            // Data flows, none of it large.
            bh.note_tx(now, i, Some(0));
            bh.tick(now, Some(PAIR));
            while let Some(p) = bh.poll_probe() {
                sizes.push(p.target_len);
            }
        }
        assert!(sizes.len() >= 19, "{}", sizes.len());
        assert!(sizes.iter().all(|s| *s == 0), "{sizes:?}");
        // Large datagrams start: full-size probes too.
        bh.note_tx(now, 1000, Some(1));
        bh.tick(now, Some(PAIR));
        let mut full = 0;
        while let Some(p) = bh.poll_probe() {
            full += usize::from(p.target_len == 1452);
        }
        assert_eq!(full, 1);
    }

    #[test]
    fn idle_tunnel_sends_no_probes_and_gets_no_verdict() {
        let mut bh = Blackhole::new(BlackholeConfig::default(), 1);
        let mut now = Instant::now();
        for _ in 0..1000 {
            now += Duration::from_millis(10);
            bh.tick(now, Some(PAIR));
        }
        assert!(bh.poll_probe().is_none());
        assert!(bh.poll_verdict().is_none());
    }

    #[test]
    fn the_peers_leave_flag_bans_the_pair_here() {
        let mut bh = Blackhole::new(BlackholeConfig::default(), 1);
        let now = Instant::now();
        let a = ProbeAttr {
            flags: FLAG_LEAVE_DATA,
            size: 90,
            data_rx: 0,
            data_tx: 0,
        };
        let r = bh.handle_request(now, PAIR, a, 90);
        assert_eq!((r.flags, r.size), (FLAG_RESPONSE, 90));
        let b = bh.ban(PAIR, now).expect("banned");
        assert!(b.by_peer);
        assert_eq!(bh.poll_verdict(), Some((PAIR, Cause::Data)));
        assert_eq!(bh.stats().peer_leaves, 1);
    }
}
