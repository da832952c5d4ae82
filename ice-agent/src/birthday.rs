//! Birthday probing between a NAT that gives each destination a random
//! new port (random endpoint-dependent mapping) and one whose mapping is
//! endpoint-independent but filters by address and port (sans-IO).
//!
//! Neither prediction nor the coordinated punch can find the random
//! side's port. But a port can be *met*: the random side ("sockets" side)
//! opens [`SOCKETS`] fresh sockets and sends from each to the other
//! side's server-reflexive address, so its NAT holds that many mappings,
//! each admitting exactly that address. The other side ("prober") sends
//! openers from its one mapping to random ports of the sockets side's
//! public address; each has a `SOCKETS / 64512` chance to hit a live
//! mapping (the birthday paradox keeps the expected number of probes
//! near `64512 / SOCKETS` ≈ 252). The hit arrives on one of the sockets:
//! that socket becomes a host candidate of the session and ICE checks it
//! against the prober's server-reflexive address, through the filter the
//! prober's probe just opened.
//!
//! Budget (enforced here): one attempt at a time per peer; the sockets
//! side holds at most [`SOCKETS`] sockets for at most [`HOLD`]; the
//! prober sends at most [`MAX_PROBES`] per attempt at [`PROBE_RATE`] a
//! second (under 500, so it never looks like a port scan), only to the
//! peer's own public address, and only while the relayed path carries
//! the session (the caller's condition); a failed attempt waits
//! [`FIRST_BACKOFF`], doubling up to [`MAX_BACKOFF`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::Rng;

/// Sockets the random side opens per attempt.
pub const SOCKETS: u16 = 256;
/// Probes a second (4 every [`PROBE_TICK`]).
pub const PROBE_RATE: u32 = 400;
/// Probes per attempt (10 s at [`PROBE_RATE`]).
pub const MAX_PROBES: u32 = 4000;
/// The prober sends a batch this often.
pub const PROBE_TICK: Duration = Duration::from_millis(10);
/// How long the sockets side keeps its sockets without a hit.
pub const HOLD: Duration = Duration::from_secs(15);
/// Wait after the first failed attempt; doubled per failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(30);
/// Longest wait between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// How long after the probes stop the prober waits for direct before it
/// counts the attempt as failed.
pub const SETTLE: Duration = Duration::from_secs(3);
/// When the daemon had no sockets to spare (other peers' attempts hold
/// them), the next try comes this soon (not a failure: no backoff).
pub const NO_ROOM_RETRY: Duration = Duration::from_secs(2);
/// Lowest port probed (a NAT does not map below).
pub const LOW_PORT: u16 = 1024;

/// A message of the exchange (the `Birthday*` peer messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    /// From the sockets side: this many sockets now hold mappings towards
    /// your server-reflexive address; probe.
    Ready {
        /// Sockets opened.
        sockets: u16,
    },
    /// From the prober: probing is over (`probes` sent; `won`: a pair
    /// went direct).
    Done {
        /// Probes sent in this attempt.
        probes: u32,
        /// Whether the path went direct.
        won: bool,
    },
}

/// What the session must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// Sockets side: open this many sockets towards the peer's
    /// server-reflexive address; report with [`Birthday::opened`].
    Open(u16),
    /// Sockets side: close the sockets (all, or all but the winner).
    Close,
    /// Send this message to the peer.
    Send(Msg),
    /// Prober: send openers now from the agent socket to these ports of the
    /// peer's public address.
    Probe(Vec<u16>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    /// Sockets side: asked for sockets at `since`.
    Opening {
        since: Instant,
    },
    /// Sockets side: sockets open since `since`, waiting for a hit.
    Open {
        since: Instant,
    },
    /// Sockets side: a socket was hit at `since`; the session checks it.
    Won {
        since: Instant,
    },
    /// Prober: probing; `sent` so far, next batch at `next`.
    Probing {
        sent: u32,
        next: Instant,
    },
    /// Prober: budget spent at `at`; waiting for direct.
    Spent {
        at: Instant,
        sent: u32,
    },
}

/// One peer's birthday probing.
#[derive(Debug)]
pub struct Birthday {
    state: State,
    failures: u32,
    next_attempt: Option<Instant>,
    out: VecDeque<Out>,
    attempts: u64,
    probes: u64,
    /// Probes of the last attempt that went direct (for the reason).
    won_after: Option<u32>,
}

impl Default for Birthday {
    fn default() -> Self {
        Birthday::new()
    }
}

impl Birthday {
    /// Idle; the first attempt may start at once.
    pub fn new() -> Birthday {
        Birthday {
            state: State::Idle,
            failures: 0,
            next_attempt: None,
            out: VecDeque::new(),
            attempts: 0,
            probes: 0,
            won_after: None,
        }
    }

    /// Sockets side: starts an attempt if none runs and the backoff allows.
    pub fn start(&mut self, now: Instant) {
        if self.state == State::Idle && self.due(now) {
            self.attempts += 1;
            self.state = State::Opening { since: now };
            self.out.push_back(Out::Open(SOCKETS));
        }
    }

    /// Whether the backoff allows an attempt now.
    pub fn due(&self, now: Instant) -> bool {
        self.next_attempt.is_none_or(|t| now >= t)
    }

    /// Sockets side: the driver opened `n` sockets (0: none to spare now;
    /// tried again after [`NO_ROOM_RETRY`], without backoff).
    pub fn opened(&mut self, now: Instant, n: u16) {
        if let State::Opening { .. } = self.state {
            if n == 0 {
                self.state = State::Idle;
                self.next_attempt = Some(now + NO_ROOM_RETRY);
            } else {
                self.state = State::Open { since: now };
                self.out.push_back(Out::Send(Msg::Ready { sockets: n }));
            }
        }
    }

    /// Sockets side: an opener from the peer's address reached one of
    /// the sockets. Returns whether it counts (an attempt was open).
    pub fn hit(&mut self, now: Instant) -> bool {
        if let State::Open { .. } = self.state {
            self.state = State::Won { since: now };
            self.out.push_back(Out::Close);
            return true;
        }
        false
    }

    /// A message from the peer; `able`: our facts agree that we are the
    /// prober of this pair and its relayed path is up. After `Ready` the
    /// first batch is due at once ([`Birthday::poll_timeout`]).
    pub fn handle(&mut self, now: Instant, msg: Msg, able: bool) {
        match msg {
            Msg::Ready { .. } => {
                // The backoff binds the prober too: a peer that asks again
                // right after a failed attempt waits like we would.
                if able && matches!(self.state, State::Idle) && self.due(now) {
                    self.attempts += 1;
                    self.state = State::Probing { sent: 0, next: now };
                }
            }
            Msg::Done { probes, won } => {
                if won {
                    self.won_after = Some(probes);
                }
                match self.state {
                    State::Open { .. } | State::Opening { .. } => {
                        self.out.push_back(Out::Close);
                        if won {
                            self.state = State::Idle;
                        } else {
                            self.fail(now);
                        }
                    }
                    State::Won { .. } if !won => {
                        // The hit did not turn into a path.
                        self.out.push_back(Out::Close);
                        self.fail(now);
                    }
                    _ => {}
                }
            }
        }
    }

    /// The path went direct: the attempt succeeded. The prober tells the
    /// sockets side (which keeps its winner).
    pub fn succeeded(&mut self) {
        if let State::Probing { sent, .. } | State::Spent { sent, .. } = self.state {
            self.won_after = Some(sent);
            self.out.push_back(Out::Send(Msg::Done {
                probes: sent,
                won: true,
            }));
        }
        if matches!(
            self.state,
            State::Won { .. } | State::Probing { .. } | State::Spent { .. }
        ) {
            self.state = State::Idle;
            self.failures = 0;
            self.next_attempt = None;
        }
    }

    /// The relayed path no longer applies (direct by other means, the
    /// session ends): stop, closing sockets or telling the peer.
    pub fn abandon(&mut self, now: Instant) {
        match self.state {
            State::Opening { .. } | State::Open { .. } => {
                self.out.push_back(Out::Close);
                self.fail(now);
            }
            State::Probing { sent, .. } | State::Spent { sent, .. } => {
                self.out.push_back(Out::Send(Msg::Done {
                    probes: sent,
                    won: false,
                }));
                self.fail(now);
            }
            _ => {}
        }
    }

    /// Advances timers; the prober's batches draw their ports from `rng`.
    pub fn handle_timeout(&mut self, now: Instant, rng: &mut impl Rng) {
        match self.state {
            State::Opening { since } | State::Open { since } if now >= since + HOLD => {
                self.out.push_back(Out::Close);
                self.fail(now);
            }
            // A hit that never became a path (and no word from the prober).
            State::Won { since } if now >= since + HOLD => self.fail(now),
            State::Probing { mut sent, mut next } if now >= next => {
                // A late wake-up sends one batch, never a catch-up burst.
                let per_tick = PROBE_RATE / (1000 / PROBE_TICK.as_millis() as u32);
                let n = per_tick.min(MAX_PROBES - sent);
                let ports: Vec<u16> = (0..n)
                    .map(|_| rng.random_range(LOW_PORT..=u16::MAX))
                    .collect();
                sent += n;
                self.probes += u64::from(n);
                next = now + PROBE_TICK;
                self.out.push_back(Out::Probe(ports));
                self.state = if sent >= MAX_PROBES {
                    State::Spent { at: now, sent }
                } else {
                    State::Probing { sent, next }
                };
            }
            State::Spent { at, sent } if now >= at + SETTLE => {
                self.out.push_back(Out::Send(Msg::Done {
                    probes: sent,
                    won: false,
                }));
                self.fail(now);
            }
            _ => {}
        }
    }

    /// When [`Birthday::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Opening { since } | State::Open { since } => Some(since + HOLD),
            State::Probing { next, .. } => Some(next),
            State::Spent { at, .. } => Some(at + SETTLE),
            State::Won { since } => Some(since + HOLD),
            State::Idle => None,
        }
    }

    /// When the next attempt may start (`None`: at once).
    pub fn next_attempt(&self) -> Option<Instant> {
        self.next_attempt
    }

    /// The next thing to do.
    pub fn poll_out(&mut self) -> Option<Out> {
        self.out.pop_front()
    }

    /// Whether an attempt runs.
    pub fn busy(&self) -> bool {
        self.state != State::Idle
    }

    /// Whether we are probing (or waiting after the last probe).
    pub fn probing(&self) -> bool {
        matches!(self.state, State::Probing { .. } | State::Spent { .. })
    }

    /// Attempts so far and probes sent.
    pub fn counts(&self) -> (u64, u64) {
        (self.attempts, self.probes)
    }

    /// Probes sent in the running attempt (prober).
    pub fn sent(&self) -> Option<u32> {
        match self.state {
            State::Probing { sent, .. } | State::Spent { sent, .. } => Some(sent),
            _ => None,
        }
    }

    /// Probes of the attempt that last went direct.
    pub fn won_after(&self) -> Option<u32> {
        self.won_after
    }

    fn fail(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let wait = crate::punch::backoff(FIRST_BACKOFF, MAX_BACKOFF, self.failures);
        self.next_attempt = Some(now + wait);
        self.state = State::Idle;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn drain(b: &mut Birthday) -> Vec<Out> {
        std::iter::from_fn(|| b.poll_out()).collect()
    }

    #[test]
    fn the_prober_keeps_its_rate_and_total_budget() {
        let t0 = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut p = Birthday::new();
        p.handle(t0, Msg::Ready { sockets: SOCKETS }, true);
        let mut now = t0;
        let mut per_second = std::collections::BTreeMap::<u64, u32>::new();
        let mut total = 0u32;
        // Wake far more often than needed, and sometimes late.
        for i in 0..20_000u64 {
            now += Duration::from_millis(if i % 97 == 0 { 35 } else { 1 });
            p.handle_timeout(now, &mut rng);
            for o in drain(&mut p) {
                if let Out::Probe(ports) = o {
                    assert!(ports.iter().all(|p| *p >= LOW_PORT));
                    total += ports.len() as u32;
                    *per_second.entry((now - t0).as_secs()).or_default() += ports.len() as u32;
                }
            }
        }
        assert_eq!(total, MAX_PROBES);
        let worst = per_second.values().max().copied().unwrap_or(0);
        assert!(worst <= PROBE_RATE, "{per_second:?}");
        assert!(worst < 500);
        // Spent, then no direct: Done(won: false) and the backoff.
        assert!(!p.busy());
        assert_eq!(p.counts(), (1, u64::from(MAX_PROBES)));
        let next = p.next_attempt().expect("backoff");
        // Asked again at once: nothing until the backoff is over.
        p.handle(now, Msg::Ready { sockets: SOCKETS }, true);
        assert!(!p.busy());
        p.handle(next, Msg::Ready { sockets: SOCKETS }, true);
        assert!(p.probing());
    }

    #[test]
    fn a_prober_that_is_not_able_does_nothing() {
        let t0 = Instant::now();
        let mut p = Birthday::new();
        p.handle(t0, Msg::Ready { sockets: 9 }, false);
        assert!(!p.busy());
        assert_eq!(p.poll_out(), None);
    }

    #[test]
    fn the_sockets_side_holds_its_sockets_for_a_bounded_time_and_backs_off() {
        let t0 = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut s = Birthday::new();
        s.start(t0);
        assert_eq!(drain(&mut s), vec![Out::Open(SOCKETS)]);
        s.opened(t0, 200);
        assert_eq!(drain(&mut s), vec![Out::Send(Msg::Ready { sockets: 200 })]);
        s.handle_timeout(t0 + HOLD, &mut rng);
        assert_eq!(drain(&mut s), vec![Out::Close]);
        assert_eq!(s.next_attempt(), Some(t0 + HOLD + FIRST_BACKOFF));
        s.start(t0 + HOLD + FIRST_BACKOFF);
        assert_eq!(drain(&mut s), vec![Out::Open(SOCKETS)]);
        s.opened(t0, 200);
        drain(&mut s);
        // A hit closes the others; the prober's Done(won) ends it.
        assert!(s.hit(t0));
        assert!(!s.hit(t0));
        assert_eq!(drain(&mut s), vec![Out::Close]);
        s.handle(
            t0,
            Msg::Done {
                probes: 300,
                won: true,
            },
            false,
        );
        s.succeeded();
        assert!(!s.busy());
        assert_eq!(s.won_after(), Some(300));
    }

    #[test]
    fn a_hit_that_never_becomes_a_path_ends_the_attempt() {
        let t0 = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut s = Birthday::new();
        s.start(t0);
        s.opened(t0, 256);
        assert!(s.hit(t0));
        drain(&mut s);
        assert_eq!(s.poll_timeout(), Some(t0 + HOLD));
        s.handle_timeout(t0 + HOLD, &mut rng);
        assert!(!s.busy());
        assert_eq!(s.next_attempt(), Some(t0 + HOLD + FIRST_BACKOFF));
    }

    #[test]
    fn no_sockets_to_spare_is_retried_soon_without_backoff() {
        let t0 = Instant::now();
        let mut s = Birthday::new();
        s.start(t0);
        drain(&mut s);
        s.opened(t0, 0);
        assert!(!s.busy());
        assert_eq!(s.next_attempt(), Some(t0 + NO_ROOM_RETRY));
        s.start(t0 + NO_ROOM_RETRY);
        assert_eq!(drain(&mut s), vec![Out::Open(SOCKETS)]);
        // A real failure afterwards starts the backoff at its first step.
        s.opened(t0, 100);
        drain(&mut s);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        s.handle_timeout(t0 + HOLD, &mut rng);
        assert_eq!(s.next_attempt(), Some(t0 + HOLD + FIRST_BACKOFF));
    }

    #[test]
    fn probes_meet_a_socket_as_the_birthday_bound_says() {
        // 256 random mappings among 64512 ports: the median number of
        // probes to the first hit is near 64512 / 256 × ln 2 ≈ 175.
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut firsts = Vec::new();
        for _ in 0..200 {
            let mapped: std::collections::HashSet<u16> = (0..SOCKETS)
                .map(|_| rng.random_range(LOW_PORT..=u16::MAX))
                .collect();
            let first =
                (1..=MAX_PROBES).find(|_| mapped.contains(&rng.random_range(LOW_PORT..=u16::MAX)));
            firsts.push(first);
        }
        let hits = firsts.iter().filter(|f| f.is_some()).count();
        assert!(hits >= 199, "{hits}");
        let mut f: Vec<u32> = firsts.into_iter().flatten().collect();
        f.sort();
        let median = f[f.len() / 2];
        assert!((100..300).contains(&median), "{median}");
    }
}
