//! Several relays: per-relay health and latency, and which relay relayed
//! paths should use (sans-IO: time comes in as `now`, transaction ids from
//! the caller's RNG, no sockets).
//!
//! Every relay with a TURN allocation gets STUN Binding probes: every 1 s
//! for the first [`STARTUP_PROBES`], then every 5 s. Its RTT is the median
//! of the last [`RTT_SAMPLES`] answers. The relay that carries a relayed
//! path and has been silent for [`SILENT_BEFORE_FAST`] is probed every
//! [`FAST_INTERVAL`]; any relay whose last probe went unanswered is probed
//! again after [`SUSPECT_INTERVAL`]; a relay with [`MISSED_FOR_DOWN`]
//! probes unanswered and silent for [`DOWN_AFTER`] is down until it
//! answers again.
//!
//! "Silent" counts every datagram from the server (relayed data, TURN
//! answers, probe answers). Probe answers are *not* relay data: they prove
//! the server runs, not that it still holds our allocation, so the agent
//! keeps them out of its own "last heard" that schedules allocation checks.
//!
//! The chosen relay is the lowest-latency healthy one, sticky: another
//! healthy relay takes over only when it is faster by more than
//! [`SWITCH_MIN_GAIN`] *and* by more than a third of the current RTT, or
//! when the chosen one goes down.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use relay::stun::TransactionId;

/// Probes at start, one per [`STARTUP_INTERVAL`].
pub(crate) const STARTUP_PROBES: u32 = 5;
/// Probe interval at start.
pub(crate) const STARTUP_INTERVAL: Duration = Duration::from_secs(1);
/// Probe interval afterwards.
pub(crate) const STEADY_INTERVAL: Duration = Duration::from_secs(5);
/// RTT samples kept; the RTT is their median.
pub(crate) const RTT_SAMPLES: usize = 5;
/// A relay carrying a path and silent this long is probed fast.
pub(crate) const SILENT_BEFORE_FAST: Duration = Duration::from_millis(250);
/// Fast probe interval.
pub(crate) const FAST_INTERVAL: Duration = Duration::from_millis(100);
/// A relay whose last probe went unanswered is probed again this soon
/// (rather than after [`STEADY_INTERVAL`]), so an idle relay that died is
/// known within a few seconds.
pub(crate) const SUSPECT_INTERVAL: Duration = Duration::from_secs(1);
/// Unanswered probes (in a row, with nothing else heard) before down.
pub(crate) const MISSED_FOR_DOWN: u32 = 3;
/// Silence before down (together with [`MISSED_FOR_DOWN`]).
pub(crate) const DOWN_AFTER: Duration = Duration::from_millis(600);
/// A faster relay must win by more than this (and by more than a third).
pub(crate) const SWITCH_MIN_GAIN: Duration = Duration::from_millis(10);
/// Outstanding probes remembered per relay (older ones count as missed).
const MAX_OUTSTANDING: usize = 8;

/// Health and latency of one relay.
#[derive(Debug)]
struct Health {
    server: SocketAddr,
    /// Whether it has an allocation we could relay through (set by the
    /// agent; a relay without one is never chosen and never probed).
    usable: bool,
    rtts: VecDeque<Duration>,
    probes_sent: u32,
    next_probe: Option<Instant>,
    outstanding: VecDeque<(TransactionId, Instant)>,
    /// Anything from the server (data, TURN, probe answers).
    last_heard: Option<Instant>,
    /// Probes sent since the server was last heard.
    missed: u32,
    down: bool,
}

impl Health {
    fn rtt(&self) -> Option<Duration> {
        if self.rtts.is_empty() {
            return None;
        }
        let mut v: Vec<Duration> = self.rtts.iter().copied().collect();
        v.sort();
        Some(v[v.len() / 2])
    }

    fn silent_for(&self, now: Instant) -> Duration {
        self.last_heard
            .map_or(Duration::MAX, |t| now.saturating_duration_since(t))
    }

    fn healthy(&self) -> bool {
        self.usable && !self.down
    }
}

/// What changed after an input (the agent tells the sessions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// Nothing the sessions need to hear about.
    None,
    /// The chosen relay or the set of down relays changed.
    Choice,
}

/// Health, latency and the choice over every relay.
#[derive(Debug, Default)]
pub(crate) struct Relays {
    relays: Vec<Health>,
    chosen: Option<usize>,
    /// "moved from relay A to B: A silent 0.6 s".
    note: Option<String>,
}

impl Relays {
    /// Starts tracking `server` (not usable until it allocates).
    pub(crate) fn add(&mut self, server: SocketAddr) {
        if self.relays.iter().any(|h| h.server == server) {
            return;
        }
        self.relays.push(Health {
            server,
            usable: false,
            rtts: VecDeque::new(),
            probes_sent: 0,
            next_probe: None,
            outstanding: VecDeque::new(),
            last_heard: None,
            missed: 0,
            down: false,
        });
    }

    fn find(&self, server: SocketAddr) -> Option<usize> {
        self.relays.iter().position(|h| h.server == server)
    }

    /// The relay has (`true`) or lost (`false`) its allocation.
    pub(crate) fn set_usable(&mut self, now: Instant, server: SocketAddr, usable: bool) -> Change {
        let Some(i) = self.find(server) else {
            return Change::None;
        };
        let h = &mut self.relays[i];
        if h.usable == usable {
            return Change::None;
        }
        h.usable = usable;
        if usable {
            h.last_heard = Some(now);
            h.missed = 0;
            h.down = false;
            h.next_probe = Some(now);
        } else {
            h.next_probe = None;
            h.outstanding.clear();
        }
        self.choose(now)
    }

    /// Anything arrived from `server`.
    pub(crate) fn heard(&mut self, now: Instant, server: SocketAddr) -> Change {
        let Some(i) = self.find(server) else {
            return Change::None;
        };
        let h = &mut self.relays[i];
        h.last_heard = Some(now);
        h.missed = 0;
        if h.down {
            h.down = false;
            tracing::info!(%server, "relay answers again");
            return self.choose(now);
        }
        Change::None
    }

    /// Whether `server` is declared down.
    pub(crate) fn is_down(&self, server: SocketAddr) -> bool {
        self.find(server).is_some_and(|i| self.relays[i].down)
    }

    /// Whether `tid` is one of our probes to `server`; if so its RTT is
    /// recorded (call [`Relays::heard`] as for any datagram).
    pub(crate) fn answer(&mut self, now: Instant, server: SocketAddr, tid: &TransactionId) -> bool {
        let Some(i) = self.find(server) else {
            return false;
        };
        let h = &mut self.relays[i];
        let Some(pos) = h.outstanding.iter().position(|(t, _)| t == tid) else {
            return false;
        };
        let (_, sent) = h.outstanding.remove(pos).unwrap_or((*tid, now));
        // Earlier probes lost on the way count for nothing now.
        h.outstanding.retain(|(_, s)| *s > sent);
        if h.rtts.len() == RTT_SAMPLES {
            h.rtts.pop_front();
        }
        h.rtts.push_back(now.saturating_duration_since(sent));
        true
    }

    /// Probes due at `now`, each with the index to pass to
    /// [`Relays::probe_sent`]. `carrying`: servers that carry a relayed
    /// path now (they are probed fast when silent).
    pub(crate) fn due(&self, now: Instant, carrying: &[SocketAddr]) -> Vec<SocketAddr> {
        self.relays
            .iter()
            .filter(|h| self.next_probe_of(h, carrying).is_some_and(|t| t <= now))
            .map(|h| h.server)
            .collect()
    }

    /// A probe with `tid` went to `server`.
    pub(crate) fn probe_sent(&mut self, now: Instant, server: SocketAddr, tid: TransactionId) {
        let Some(i) = self.find(server) else { return };
        let h = &mut self.relays[i];
        if h.outstanding.len() == MAX_OUTSTANDING {
            h.outstanding.pop_front();
        }
        h.outstanding.push_back((tid, now));
        h.probes_sent = h.probes_sent.saturating_add(1);
        h.missed = h.missed.saturating_add(1);
        let every = if h.probes_sent < STARTUP_PROBES {
            STARTUP_INTERVAL
        } else {
            STEADY_INTERVAL
        };
        h.next_probe = Some(now + every);
    }

    fn next_probe_of(&self, h: &Health, carrying: &[SocketAddr]) -> Option<Instant> {
        if !h.usable {
            return None;
        }
        let mut next = h.next_probe?;
        // (A relay already down keeps the steady interval.)
        if h.missed > 0 && h.healthy() {
            if let Some((_, p)) = h.outstanding.back() {
                next = next.min(*p + SUSPECT_INTERVAL);
            }
        }
        if carrying.contains(&h.server) {
            // Fast probing once silent: no sooner than SILENT_BEFORE_FAST
            // after the last datagram, then every FAST_INTERVAL.
            let heard = h.last_heard.unwrap_or(next);
            let last_probe = h.outstanding.back().map(|(_, t)| *t);
            let fast = match last_probe.filter(|t| *t > heard) {
                Some(p) => p + FAST_INTERVAL,
                None => heard + SILENT_BEFORE_FAST,
            };
            next = next.min(fast);
        }
        Some(next)
    }

    /// When [`Relays::handle_timeout`] (or a probe) is due next.
    pub(crate) fn poll_timeout(&self, carrying: &[SocketAddr]) -> Option<Instant> {
        let mut best: Option<Instant> = None;
        for h in &self.relays {
            let mut consider = |t: Option<Instant>| {
                if let Some(t) = t {
                    best = Some(best.map_or(t, |b: Instant| b.min(t)));
                }
            };
            consider(self.next_probe_of(h, carrying));
            // Only once enough probes went unanswered: before that the
            // next probe is the wake-up (a deadline already passed would
            // have the caller spin).
            if h.healthy() && h.missed >= MISSED_FOR_DOWN {
                consider(h.last_heard.map(|t| t + DOWN_AFTER));
            }
        }
        best
    }

    /// Declares relays down that missed enough probes and stayed silent.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> Change {
        let mut changed = false;
        for h in &mut self.relays {
            if h.healthy() && h.missed >= MISSED_FOR_DOWN && h.silent_for(now) >= DOWN_AFTER {
                h.down = true;
                // Its latency is measured afresh when it is back.
                h.rtts.clear();
                changed = true;
                tracing::warn!(server = %h.server, missed = h.missed, silent = ?h.silent_for(now), "relay down");
            }
        }
        if changed {
            return match self.choose(now) {
                Change::None => Change::Choice,
                c => c,
            };
        }
        self.choose(now)
    }

    /// Re-evaluates the choice (sticky; see the module docs).
    fn choose(&mut self, now: Instant) -> Change {
        let best = (0..self.relays.len())
            .filter(|i| self.relays[*i].healthy())
            .min_by_key(|i| (self.relays[*i].rtt().unwrap_or(Duration::MAX), *i));
        let cur = self.chosen.filter(|i| self.relays[*i].healthy());
        let next = match (cur, best) {
            (Some(c), Some(b)) if c != b => {
                let (cr, br) = (self.relays[c].rtt(), self.relays[b].rtt());
                match (cr, br) {
                    (Some(cr), Some(br)) if clearly_better(cr, br) => Some(b),
                    _ => Some(c),
                }
            }
            (Some(c), _) => Some(c),
            (None, b) => b,
        };
        if next == self.chosen {
            return Change::None;
        }
        if let (Some(old), Some(new)) = (self.chosen, next) {
            let (o, n) = (&self.relays[old], &self.relays[new]);
            let why = if o.down {
                format!("{} silent {:.1} s", o.server, secs(o.silent_for(now)))
            } else if !o.usable {
                format!("{} lost our allocation", o.server)
            } else {
                format!(
                    "{} faster ({} ms against {} ms)",
                    n.server,
                    ms(n.rtt()),
                    ms(o.rtt())
                )
            };
            let note = format!("moved from relay {} to {}: {why}", o.server, n.server);
            tracing::info!("{note}");
            self.note = Some(note);
        }
        self.chosen = next;
        Change::Choice
    }

    /// The chosen relay's server.
    pub(crate) fn chosen(&self) -> Option<SocketAddr> {
        self.chosen.map(|i| self.relays[i].server)
    }

    /// Servers declared down.
    pub(crate) fn down(&self) -> Vec<SocketAddr> {
        self.relays
            .iter()
            .filter(|h| h.down)
            .map(|h| h.server)
            .collect()
    }

    /// Per relay: server, median RTT, whether it is the chosen one.
    pub(crate) fn rows(&self) -> Vec<(SocketAddr, Option<Duration>, bool, bool)> {
        self.relays
            .iter()
            .enumerate()
            .map(|(i, h)| (h.server, h.rtt(), self.chosen == Some(i), h.down))
            .collect()
    }

    /// The last move between relays, for status.
    pub(crate) fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }
}

/// `new` beats `cur` by more than [`SWITCH_MIN_GAIN`] and more than a third.
fn clearly_better(cur: Duration, new: Duration) -> bool {
    let gain = cur.saturating_sub(new);
    gain > SWITCH_MIN_GAIN && gain * 3 > cur
}

fn secs(d: Duration) -> f64 {
    if d == Duration::MAX {
        return f64::INFINITY;
    }
    d.as_secs_f64()
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("?".into(), |d| format!("{:.0}", d.as_secs_f64() * 1e3))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, n], 3478))
    }

    /// Answers every due probe after `rtt` (unless the relay is `dead`),
    /// stepping a virtual clock in 10 ms ticks for `dur`.
    fn run(
        r: &mut Relays,
        now: &mut Instant,
        dur: Duration,
        rtts: &[(SocketAddr, Duration, bool)],
        carrying: &[SocketAddr],
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut inflight: Vec<(Instant, SocketAddr, TransactionId)> = Vec::new();
        let end = *now + dur;
        let mut n: u8 = 0;
        while *now < end {
            *now += Duration::from_millis(10);
            for (at, s, tid) in std::mem::take(&mut inflight) {
                if at <= *now {
                    assert!(r.answer(*now, s, &tid));
                    changes.push(r.heard(*now, s));
                } else {
                    inflight.push((at, s, tid));
                }
            }
            for s in r.due(*now, carrying) {
                n = n.wrapping_add(1);
                let tid = [n; 12];
                r.probe_sent(*now, s, tid);
                if let Some((_, rtt, dead)) = rtts.iter().find(|x| x.0 == s) {
                    if !dead {
                        inflight.push((*now + *rtt, s, tid));
                    }
                }
            }
            changes.push(r.handle_timeout(*now));
        }
        changes
    }

    #[test]
    fn the_lowest_latency_relay_is_chosen_and_kept_unless_clearly_better() {
        let (a, b) = (addr(1), addr(2));
        let mut r = Relays::default();
        let mut now = Instant::now();
        r.add(a);
        r.add(b);
        r.set_usable(now, a, true);
        r.set_usable(now, b, true);
        let ms = Duration::from_millis;
        run(
            &mut r,
            &mut now,
            ms(6000),
            &[(a, ms(60), false), (b, ms(20), false)],
            &[],
        );
        assert_eq!(r.chosen(), Some(b), "{:?}", r.rows());
        assert_eq!(r.rows()[1].1, Some(ms(20)));
        // a gets faster, but only by 5 ms: sticky.
        run(
            &mut r,
            &mut now,
            ms(30_000),
            &[(a, ms(15), false), (b, ms(20), false)],
            &[],
        );
        assert_eq!(r.chosen(), Some(b));
        // by 40 ms of 60 (> 10 ms and > a third): move.
        run(
            &mut r,
            &mut now,
            ms(30_000),
            &[(a, ms(20), false), (b, ms(60), false)],
            &[],
        );
        assert_eq!(r.chosen(), Some(a));
        assert!(
            r.note().unwrap_or_default().contains("faster"),
            "{:?}",
            r.note()
        );
    }

    #[test]
    fn a_silent_active_relay_is_down_within_a_second_and_the_other_takes_over() {
        let (a, b) = (addr(1), addr(2));
        let mut r = Relays::default();
        let mut now = Instant::now();
        r.add(a);
        r.add(b);
        r.set_usable(now, a, true);
        r.set_usable(now, b, true);
        let ms = Duration::from_millis;
        run(
            &mut r,
            &mut now,
            ms(6000),
            &[(a, ms(10), false), (b, ms(30), false)],
            &[a],
        );
        assert_eq!(r.chosen(), Some(a));
        // a dies: its last datagram was "now".
        r.heard(now, a);
        let died = now;
        let mut down_at = None;
        for _ in 0..200 {
            run(
                &mut r,
                &mut now,
                ms(10),
                &[(a, ms(10), true), (b, ms(30), false)],
                &[a],
            );
            if r.chosen() == Some(b) {
                down_at = Some(now - died);
                break;
            }
        }
        let took = down_at.expect("never moved");
        assert!(took >= DOWN_AFTER && took <= ms(800), "{took:?}");
        assert_eq!(r.down(), vec![a]);
        assert!(
            r.note().unwrap_or_default().contains("silent"),
            "{:?}",
            r.note()
        );
        // a answers again: healthy, but b stays (sticky, not clearly better).
        run(
            &mut r,
            &mut now,
            ms(10_000),
            &[(a, ms(25), false), (b, ms(30), false)],
            &[b],
        );
        assert!(r.down().is_empty());
        assert_eq!(r.chosen(), Some(b));
    }

    #[test]
    fn an_idle_relay_that_dies_is_down_within_seven_seconds() {
        let (a, b) = (addr(1), addr(2));
        let mut r = Relays::default();
        let mut now = Instant::now();
        for x in [a, b] {
            r.add(x);
            r.set_usable(now, x, true);
        }
        // Past the start-up probes: steady, every 5 s.
        let rtts = [
            (a, Duration::from_millis(5), false),
            (b, Duration::from_millis(8), false),
        ];
        run(&mut r, &mut now, Duration::from_secs(12), &rtts, &[a]);
        assert_eq!(r.chosen(), Some(a));
        // b (idle: carries nothing) dies.
        let died = now;
        let dead = [
            (a, Duration::from_millis(5), false),
            (b, Duration::from_millis(8), true),
        ];
        let mut down_at = None;
        while down_at.is_none() && now < died + Duration::from_secs(20) {
            run(&mut r, &mut now, Duration::from_millis(100), &dead, &[a]);
            if r.is_down(b) {
                down_at = Some(now);
            }
        }
        let took = down_at.expect("b never declared down") - died;
        // At most one steady interval until the first lost probe, then
        // two more a second apart.
        assert!(
            took <= Duration::from_secs(7) + Duration::from_millis(100),
            "{took:?}"
        );
        assert!(took >= SUSPECT_INTERVAL * 2, "{took:?}");
        assert_eq!(r.chosen(), Some(a));
    }

    #[test]
    fn an_idle_relay_is_not_probed_fast_and_unknown_answers_are_ignored() {
        let a = addr(1);
        let mut r = Relays::default();
        let now = Instant::now();
        r.add(a);
        assert!(r.due(now, &[a]).is_empty(), "no allocation: no probes");
        r.set_usable(now, a, true);
        assert_eq!(r.due(now, &[]), vec![a]);
        r.probe_sent(now, a, [1; 12]);
        assert!(!r.answer(now, a, &[2; 12]));
        assert!(!r.answer(now, addr(9), &[1; 12]));
        // Not carrying: next probe in 1 s, not 250 ms.
        assert!(r.due(now + Duration::from_millis(500), &[]).is_empty());
        assert_eq!(r.due(now + Duration::from_millis(300), &[a]), vec![a]);
    }
}
