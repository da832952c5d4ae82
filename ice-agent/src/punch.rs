//! Coordinated hole punching between two NATs that both give each
//! destination a new, sequentially numbered mapping (sans-IO).
//!
//! Port prediction alone (`PeerSession::predict`) needs one side whose
//! mapping is the same for every destination. When both NATs are
//! symmetric, a pair works only if each side sends *from* the very port
//! the other side sends *to*: side X's k-th new destination leaves from
//! `x + k`, side Y's from `y + k`, and neither knows the other's counter
//! unless it is told, just before, by the other side. So:
//!
//! 1. The controlling side (the offerer) measures its NAT's current
//!    counter (`Out::Measure`: a Binding from a fresh socket to a relay;
//!    the mapping after it is the next one) and sends
//!    [`Msg::Offer`] `{ port, delta }` through signaling.
//! 2. The answerer measures its own and answers [`Msg::Answer`].
//! 3. The offerer has the signaling round trip now: it sends [`Msg::Go`]
//!    and waits half of it; the answerer sends on arrival of `Go`. Both
//!    bursts ([`OPENERS`] datagrams each, back to back, only to the peer's
//!    own public address) leave at about the same instant (libp2p DCUtR's
//!    timing), so an opener reaches the other NAT after that NAT's own
//!    opener to it went out.
//!
//! Each side's counter may move between its measurement and its burst
//! (its own checks, other hosts behind the NAT): the offerer is ε_X
//! mappings late, the answerer ε_Y. With both sides aiming at the peer's
//! ports at the same stride, a pair meets only when ε_X + ε_Y = 0. So the
//! offerer aims its k-th opener at `y + k·Δy` and the answerer its k-th at
//! `x + 2k·Δx`: the offerer's opener `i = ε_X + 2ε_Y` and the answerer's
//! `j = ε_X + ε_Y` form a pair (`x + ε_X + i` ↔ `y + ε_Y + j`) for every
//! lateness with `ε_X + 2ε_Y < OPENERS` (measured in steps). Afterwards
//! the ports aimed at become remote candidates and ICE checks them over
//! the 5-tuples the openers opened.
//!
//! Budget: one attempt at a time, [`OPENERS`] datagrams per side per
//! attempt, all to the peer's proven public address; after a failed
//! attempt the next waits [`FIRST_BACKOFF`], doubling up to
//! [`MAX_BACKOFF`]; an answerer handles at most one offer per
//! [`MIN_OFFER_GAP`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Openers each side sends per attempt.
pub const OPENERS: u16 = 24;
/// Longest wait for a measurement or the peer's next message.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after its burst an attempt may take to end direct.
pub const SETTLE: Duration = Duration::from_secs(5);
/// Wait after the first failed attempt; doubled per failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(5);
/// Longest wait between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// An answerer handles at most one offer per this interval.
pub const MIN_OFFER_GAP: Duration = Duration::from_secs(1);
/// Longest the offerer waits after `Go` (half a round trip, capped).
pub const MAX_GO_WAIT: Duration = Duration::from_millis(500);

/// A NAT's next mapping and step, as measured by its own side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// The public port the next new mapping will get.
    pub port: u16,
    /// Step between consecutive mappings (non-zero).
    pub delta: i32,
}

/// A message of the exchange (the `Punch*` peer messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    /// From the offerer: its next port.
    Offer(Ports),
    /// From the answerer: its next port.
    Answer(Ports),
    /// From the offerer: send your openers now.
    Go,
}

/// What the session must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// Measure our NAT's counter now and call [`Punch::measured`].
    Measure,
    /// Send this message to the peer.
    Send(Msg),
    /// Send openers now, back to back, from the agent's socket to these
    /// ports of the peer's public address, in this order.
    Burst {
        /// The peer's ports.
        ports: Vec<u16>,
        /// 1 for the offerer, 2 for the answerer.
        stride: u16,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    /// Offerer: measuring before the offer.
    Measuring {
        since: Instant,
    },
    /// Answerer: measuring before the answer to `peer`.
    MeasuringFor {
        since: Instant,
        peer: Ports,
    },
    /// Offerer: offer sent at `at`.
    Offered {
        at: Instant,
    },
    /// Answerer: answer sent, waiting for `Go`.
    Answered {
        at: Instant,
        peer: Ports,
    },
    /// Offerer: bursts at `at`.
    Going {
        at: Instant,
        peer: Ports,
    },
    /// Openers sent at `at`: direct should follow.
    Sent {
        at: Instant,
    },
}

/// One peer's coordinated punch.
#[derive(Debug)]
pub struct Punch {
    state: State,
    failures: u32,
    next_attempt: Option<Instant>,
    last_offer: Option<Instant>,
    out: VecDeque<Out>,
    attempts: u64,
    openers: u64,
}

/// Why an offer was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Another offer came less than [`MIN_OFFER_GAP`] ago.
    TooSoon,
    /// We are the offerer in this pair (the peer should not offer).
    WrongRole,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::TooSoon => write!(
                f,
                "punch offer less than {} s after the previous one",
                MIN_OFFER_GAP.as_secs()
            ),
            Refused::WrongRole => f.write_str("punch offer from the controlled side"),
        }
    }
}

impl Default for Punch {
    fn default() -> Self {
        Punch::new()
    }
}

impl Punch {
    /// Idle, first attempt allowed at once.
    pub fn new() -> Punch {
        Punch {
            state: State::Idle,
            failures: 0,
            next_attempt: None,
            last_offer: None,
            out: VecDeque::new(),
            attempts: 0,
            openers: 0,
        }
    }

    /// Offerer: starts an attempt if none runs and the backoff allows.
    pub fn start(&mut self, now: Instant) {
        if self.state == State::Idle && self.next_attempt.is_none_or(|t| now >= t) {
            self.attempts += 1;
            self.state = State::Measuring { since: now };
            self.out.push_back(Out::Measure);
        }
    }

    /// Our NAT's next mapping as just measured (`None`: the measurement
    /// failed).
    pub fn measured(&mut self, now: Instant, ours: Option<Ports>) {
        match (self.state, ours) {
            (State::Measuring { .. }, Some(p)) => {
                self.out.push_back(Out::Send(Msg::Offer(p)));
                self.state = State::Offered { at: now };
            }
            (State::MeasuringFor { peer, .. }, Some(p)) => {
                self.out.push_back(Out::Send(Msg::Answer(p)));
                self.state = State::Answered { at: now, peer };
            }
            (State::Measuring { .. }, None) => self.fail(now),
            // The offerer times out and tries again later.
            (State::MeasuringFor { .. }, None) => self.state = State::Idle,
            _ => {}
        }
    }

    /// A message from the peer. `offerer` says whether we are the side
    /// that offers (the controlling one). An offer is taken only when
    /// `able` (our own facts say both NATs are sequential).
    pub fn handle(
        &mut self,
        now: Instant,
        msg: Msg,
        offerer: bool,
        able: bool,
    ) -> Result<(), Refused> {
        match msg {
            Msg::Offer(peer) => {
                if offerer {
                    return Err(Refused::WrongRole);
                }
                if self
                    .last_offer
                    .is_some_and(|t| now.saturating_duration_since(t) < MIN_OFFER_GAP)
                {
                    return Err(Refused::TooSoon);
                }
                self.last_offer = Some(now);
                if able {
                    self.attempts += 1;
                    self.state = State::MeasuringFor { since: now, peer };
                    self.out.push_back(Out::Measure);
                }
            }
            Msg::Answer(peer) => {
                if let State::Offered { at } = self.state {
                    let wait = (now.saturating_duration_since(at) / 2).min(MAX_GO_WAIT);
                    self.out.push_back(Out::Send(Msg::Go));
                    self.state = State::Going {
                        at: now + wait,
                        peer,
                    };
                    self.handle_timeout(now);
                }
            }
            Msg::Go => {
                if let State::Answered { peer, .. } = self.state {
                    self.burst(now, peer, 2);
                }
            }
        }
        Ok(())
    }

    /// The path went direct over a punched pair: the attempt succeeded.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.next_attempt = None;
        self.state = State::Idle;
    }

    /// Advances timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Going { at, peer } if now >= at => self.burst(now, peer, 1),
            State::Measuring { since } | State::Offered { at: since }
                if now >= since + STEP_TIMEOUT =>
            {
                self.fail(now)
            }
            State::MeasuringFor { since, .. } | State::Answered { at: since, .. }
                if now >= since + STEP_TIMEOUT =>
            {
                self.state = State::Idle
            }
            State::Sent { at } if now >= at + SETTLE => self.fail(now),
            _ => {}
        }
    }

    /// When [`Punch::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Idle => None,
            State::Going { at, .. } => Some(at),
            State::Measuring { since }
            | State::MeasuringFor { since, .. }
            | State::Offered { at: since }
            | State::Answered { at: since, .. } => Some(since + STEP_TIMEOUT),
            State::Sent { at } => Some(at + SETTLE),
        }
    }

    /// When the offerer may start its next attempt (`None`: at once).
    pub fn next_attempt(&self) -> Option<Instant> {
        self.next_attempt
    }

    /// The next thing to do.
    pub fn poll_out(&mut self) -> Option<Out> {
        self.out.pop_front()
    }

    /// Attempts so far (as offerer or answerer) and openers sent.
    pub fn counts(&self) -> (u64, u64) {
        (self.attempts, self.openers)
    }

    /// Whether an attempt is under way (measuring, exchanging, or waiting
    /// for its openers to pay off).
    pub fn busy(&self) -> bool {
        self.state != State::Idle
    }

    fn burst(&mut self, now: Instant, peer: Ports, stride: u16) {
        let ports = aim(peer, stride);
        self.openers += ports.len() as u64;
        self.out.push_back(Out::Burst { ports, stride });
        self.state = State::Sent { at: now };
    }

    fn fail(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        self.next_attempt = Some(now + backoff(FIRST_BACKOFF, MAX_BACKOFF, self.failures));
        self.state = State::Idle;
    }
}

/// The wait after the `failures`-th failure in a row (1 and up): `first`,
/// doubled per failure, at most `max`.
pub(crate) fn backoff(first: Duration, max: Duration, failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    first.saturating_mul(1u32 << shift).min(max)
}

/// The peer's ports our openers aim at: `port + k × stride × delta` for
/// `k` in `0..OPENERS`, those that are valid (1024 and up).
pub fn aim(peer: Ports, stride: u16) -> Vec<u16> {
    (0..i64::from(OPENERS))
        .filter_map(|k| {
            let p = i64::from(peer.port) + k * i64::from(stride) * i64::from(peer.delta);
            u16::try_from(p).ok().filter(|p| *p >= 1024)
        })
        .collect()
}

/// Length of an opener: a STUN Binding indication (RFC 8489; ICE's
/// keepalive form, RFC 8445 §11) with only a FINGERPRINT.
pub const OPENER_LEN: usize = 28;

/// Writes an opener into `out` (cleared first). Its only job is to leave
/// through our NAT towards the peer's port and so open that 5-tuple; a
/// receiver that gets it ignores it (it proves nothing).
pub fn opener(out: &mut Vec<u8>, tid: [u8; 12]) {
    use relay::stun::{method, Class, MessageBuilder};
    out.clear();
    MessageBuilder::new(out, method::BINDING, Class::Indication, tid).fingerprint();
}

/// Whether `data` is an opener (a 28-byte Binding indication).
pub fn is_opener(data: &[u8]) -> bool {
    data.len() == OPENER_LEN
        && data[..4] == [0x00, 0x11, 0x00, 0x08]
        && data[4..8] == [0x21, 0x12, 0xa4, 0x42]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two sequential NATs, each `late` mappings past what its side
    /// measured when its burst starts: which (offerer port, answerer
    /// port) pairs both sides opened towards each other.
    fn meet(x: Ports, late_x: u16, y: Ports, late_y: u16) -> Vec<(u16, u16)> {
        let from = |p: Ports, late: u16, k: usize| {
            (i64::from(p.port) + (i64::from(late) + k as i64) * i64::from(p.delta)) as u16
        };
        let xs: Vec<(u16, u16)> = aim(y, 1)
            .into_iter()
            .enumerate()
            .map(|(k, to)| (from(x, late_x, k), to))
            .collect();
        let ys: Vec<(u16, u16)> = aim(x, 2)
            .into_iter()
            .enumerate()
            .map(|(k, to)| (from(y, late_y, k), to))
            .collect();
        xs.into_iter()
            .filter(|(xp, yp)| ys.contains(&(*yp, *xp)))
            .collect()
    }

    #[test]
    fn openers_meet_for_any_lateness_inside_the_window() {
        for (dx, dy) in [(1, 1), (2, 1), (-1, 3)] {
            let x = Ports {
                port: 30000,
                delta: dx,
            };
            let y = Ports {
                port: 40000,
                delta: dy,
            };
            for late_x in 0..OPENERS {
                for late_y in 0..OPENERS {
                    let m = meet(x, late_x, y, late_y);
                    if late_x + 2 * late_y < OPENERS {
                        assert_eq!(m.len(), 1, "{dx} {dy} late {late_x} {late_y}: {m:?}");
                    }
                }
            }
        }
        // With no lateness at all the offerer's first opener meets the
        // answerer's first.
        let x = Ports {
            port: 30000,
            delta: 1,
        };
        let y = Ports {
            port: 30100,
            delta: 1,
        };
        assert_eq!(meet(x, 0, y, 0), vec![(30000, 30100)]);
    }

    #[test]
    fn openers_are_recognised_and_nothing_else_is() {
        let mut b = Vec::new();
        opener(&mut b, [7; 12]);
        assert_eq!(b.len(), OPENER_LEN);
        assert!(is_opener(&b));
        assert!(relay::stun::Message::parse(&b).is_ok());
        let mut req = b.clone();
        req[1] = 0x01;
        assert!(!is_opener(&req));
        assert!(!is_opener(&b[..20]));
        assert!(!is_opener(&[0u8; OPENER_LEN]));
    }

    #[test]
    fn aim_stays_within_the_budget_and_valid_ports() {
        let p = Ports {
            port: 65530,
            delta: 1,
        };
        assert_eq!(aim(p, 1), (65530..=65535).collect::<Vec<_>>());
        let p = Ports {
            port: 1030,
            delta: -1,
        };
        assert_eq!(aim(p, 2), vec![1030, 1028, 1026, 1024]);
        let p = Ports {
            port: 40000,
            delta: 3,
        };
        let a = aim(p, 2);
        assert_eq!(a.len(), usize::from(OPENERS));
        assert_eq!(a[1], 40006);
    }

    #[test]
    fn offerer_and_answerer_exchange_then_burst_together() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let (mut x, mut y) = (Punch::new(), Punch::new());
        x.start(t0);
        assert_eq!(x.poll_out(), Some(Out::Measure));
        let px = Ports {
            port: 30010,
            delta: 1,
        };
        x.measured(ms(5), Some(px));
        assert_eq!(x.poll_out(), Some(Out::Send(Msg::Offer(px))));
        y.handle(ms(25), Msg::Offer(px), false, true).unwrap();
        assert_eq!(y.poll_out(), Some(Out::Measure));
        let py = Ports {
            port: 30200,
            delta: 1,
        };
        y.measured(ms(30), Some(py));
        assert_eq!(y.poll_out(), Some(Out::Send(Msg::Answer(py))));
        // Round trip 40 ms: the offerer bursts 20 ms after `Go`.
        x.handle(ms(45), Msg::Answer(py), true, true).unwrap();
        assert_eq!(x.poll_out(), Some(Out::Send(Msg::Go)));
        assert_eq!(x.poll_out(), None);
        assert_eq!(x.poll_timeout(), Some(ms(65)));
        y.handle(ms(65), Msg::Go, false, true).unwrap();
        assert_eq!(
            y.poll_out(),
            Some(Out::Burst {
                ports: aim(px, 2),
                stride: 2
            })
        );
        x.handle_timeout(ms(65));
        assert_eq!(
            x.poll_out(),
            Some(Out::Burst {
                ports: aim(py, 1),
                stride: 1
            })
        );
        assert_eq!(x.counts(), (1, 24));
        x.succeeded();
        assert!(!x.busy());
    }

    #[test]
    fn failures_back_off_and_offers_are_rate_limited() {
        let t0 = Instant::now();
        let mut x = Punch::new();
        let mut at = t0;
        let mut waits = Vec::new();
        for _ in 0..9 {
            x.start(at);
            assert_eq!(x.poll_out(), Some(Out::Measure));
            // Nobody answers.
            x.measured(at, None);
            let next = x.next_attempt().unwrap();
            waits.push((next - at).as_secs());
            // Not before the backoff.
            x.start(next - Duration::from_millis(1));
            assert_eq!(x.poll_out(), None);
            at = next;
        }
        assert_eq!(waits, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);

        let mut y = Punch::new();
        let p = Ports {
            port: 30000,
            delta: 1,
        };
        y.handle(t0, Msg::Offer(p), false, true).unwrap();
        assert_eq!(
            y.handle(t0 + Duration::from_millis(300), Msg::Offer(p), false, true),
            Err(Refused::TooSoon)
        );
        assert_eq!(
            y.handle(t0, Msg::Offer(p), true, true),
            Err(Refused::WrongRole)
        );
        // Answered, but no Go: back to idle after the step timeout.
        y.measured(t0, Some(p));
        y.handle_timeout(t0 + STEP_TIMEOUT);
        assert!(!y.busy());
        // A stray Go or answer does nothing.
        y.handle(t0, Msg::Go, false, true).unwrap();
        y.handle(t0, Msg::Answer(p), false, true).unwrap();
        assert_eq!(y.poll_out(), Some(Out::Measure));
        assert_eq!(y.poll_out(), Some(Out::Send(Msg::Answer(p))));
        assert_eq!(y.poll_out(), None);
    }
}
