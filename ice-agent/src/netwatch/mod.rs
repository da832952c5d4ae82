//! Network changes from the kernel: which rtnetlink events matter to the
//! agent, and when to react (sans-IO; the netlink socket is
//! [`driver`]'s).
//!
//! A node that roams to another router, gets a new DHCP lease, or loses
//! its default route has to re-gather at once: its host candidates, its
//! mapping at the NAT (the TURN allocation is bound to the old 5-tuple) and
//! its direct paths all changed. The kernel says so the moment it happens
//! (`RTM_NEWADDR`, `RTM_DELROUTE`, `RTM_NEWLINK`, …); polling the
//! interfaces every few seconds would add seconds of dead path.
//!
//! Changes come in bursts (a link going away deletes its addresses and
//! routes; a new lease adds an address, then the routes). [`NetWatch`]
//! reacts once per burst: [`SETTLE`] after the last relevant change, or
//! [`MAX_DELAY`] after the first, whichever comes first, so the re-gather
//! sees the finished configuration (a Refresh sent between "address added"
//! and "default route added" would go nowhere). Changes on the WireGuard
//! interface itself (the agent adds its routes there in embedded mode), on
//! loopback or on excluded interfaces are ignored, as are routes outside the
//! main table and routes other than the default route (a new address
//! brings its subnet route with it; the address event already counts).

pub mod driver;

use std::net::IpAddr;
use std::time::{Duration, Instant};

/// React this long after the last change of a burst.
pub const SETTLE: Duration = Duration::from_millis(30);
/// ... but never later than this after its first change.
pub const MAX_DELAY: Duration = Duration::from_millis(80);

/// The main routing table's id.
pub const MAIN_TABLE: u32 = 254;

/// One kernel notification, as much of it as the agent needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A link appeared, changed flags, or went away (`up` false).
    Link {
        /// Interface index.
        index: u32,
        /// Administratively up with a carrier (`IFF_UP` and `IFF_RUNNING`).
        up: bool,
        /// Whether the link was deleted.
        deleted: bool,
    },
    /// An address was added or removed.
    Address {
        /// Interface index.
        index: u32,
        /// The address.
        addr: IpAddr,
        /// Added (true) or removed.
        added: bool,
    },
    /// A route was added or removed.
    Route {
        /// Routing table.
        table: u32,
        /// Destination prefix length (0: a default route).
        prefix_len: u8,
        /// Output interface, when the route names one.
        oif: Option<u32>,
        /// Added (true) or removed.
        added: bool,
    },
    /// A message of a subscribed group the parser could not read: counted
    /// as a change (better one re-gather too many than a missed move).
    Unreadable,
}

impl Change {
    /// The interface the change is on, if it names one.
    fn index(&self) -> Option<u32> {
        match self {
            Change::Link { index, .. } | Change::Address { index, .. } => Some(*index),
            Change::Route { oif, .. } => *oif,
            Change::Unreadable => None,
        }
    }

    /// A short description for logs and status.
    pub fn describe(&self, name: &dyn Fn(u32) -> String) -> String {
        match self {
            Change::Link {
                index,
                deleted: true,
                ..
            } => format!("link {} removed", name(*index)),
            Change::Link { index, up, .. } => {
                format!("link {} {}", name(*index), if *up { "up" } else { "down" })
            }
            Change::Address { index, addr, added } => format!(
                "address {addr} {} on {}",
                if *added { "added" } else { "removed" },
                name(*index)
            ),
            Change::Route { oif, added, .. } => format!(
                "default route {}{}",
                if *added { "added" } else { "removed" },
                oif.map(|i| format!(" via {}", name(i))).unwrap_or_default()
            ),
            Change::Unreadable => "an unreadable routing message".into(),
        }
    }
}

/// A burst is over: re-gather.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaction {
    /// The burst's first relevant change, described.
    pub first: String,
    /// Relevant changes in the burst.
    pub changes: u32,
    /// When the first one arrived.
    pub since: Instant,
}

impl Reaction {
    /// "address 10.0.2.5 added on eth1 (+3 more changes)".
    pub fn why(&self) -> String {
        match self.changes {
            0 | 1 => self.first.clone(),
            n => format!("{} (+{} more changes)", self.first, n - 1),
        }
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Notifications seen.
    pub seen: u64,
    /// Of those, ignored (our own interface, loopback, other tables, …).
    pub ignored: u64,
    /// Reactions (re-gathers).
    pub reactions: u64,
}

/// The filter and the burst timer. See the module docs.
#[derive(Debug, Default)]
pub struct NetWatch {
    burst: Option<Burst>,
    counters: Counters,
}

#[derive(Debug)]
struct Burst {
    first: String,
    first_at: Instant,
    last_at: Instant,
    changes: u32,
}

impl NetWatch {
    /// Nothing seen yet.
    pub fn new() -> NetWatch {
        NetWatch::default()
    }

    /// Whether `c` can change the agent's candidates or paths. `ignored`:
    /// interface indexes whose changes never matter (the WireGuard
    /// interface, loopback, excluded interfaces).
    pub fn relevant(c: &Change, ignored: &[u32]) -> bool {
        if c.index().is_some_and(|i| ignored.contains(&i)) {
            return false;
        }
        match c {
            Change::Route {
                table, prefix_len, ..
            } => *table == MAIN_TABLE && *prefix_len == 0,
            Change::Address { addr, .. } => match addr {
                // Not candidates: never on another host's path.
                IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local(),
                IpAddr::V6(a) => !a.is_loopback() && !a.is_unicast_link_local(),
            },
            Change::Link { .. } | Change::Unreadable => true,
        }
    }

    /// A notification arrived at `now`; `name` names interfaces for the
    /// description.
    pub fn handle(
        &mut self,
        now: Instant,
        c: &Change,
        ignored: &[u32],
        name: &dyn Fn(u32) -> String,
    ) {
        self.counters.seen += 1;
        if !Self::relevant(c, ignored) {
            self.counters.ignored += 1;
            return;
        }
        match &mut self.burst {
            Some(b) => {
                b.last_at = now;
                b.changes += 1;
            }
            None => {
                self.burst = Some(Burst {
                    first: c.describe(name),
                    first_at: now,
                    last_at: now,
                    changes: 1,
                })
            }
        }
    }

    /// When [`NetWatch::poll`] has something (changes after `handle`).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.burst
            .as_ref()
            .map(|b| (b.last_at + SETTLE).min(b.first_at + MAX_DELAY))
    }

    /// The burst's reaction, once it is due at `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Reaction> {
        if self.poll_timeout()? > now {
            return None;
        }
        let b = self.burst.take()?;
        self.counters.reactions += 1;
        Some(Reaction {
            first: b.first,
            changes: b.changes,
            since: b.first_at,
        })
    }

    /// Counters so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn name(i: u32) -> String {
        format!("if{i}")
    }

    fn addr(index: u32, a: [u8; 4], added: bool) -> Change {
        Change::Address {
            index,
            addr: IpAddr::V4(Ipv4Addr::from(a)),
            added,
        }
    }

    #[test]
    fn a_roaming_burst_gives_one_reaction_after_it_settles() {
        let t0 = Instant::now();
        let mut w = NetWatch::new();
        let ms = |n| t0 + Duration::from_millis(n);
        // Old link removed (its address and route with it), new one added.
        w.handle(
            ms(0),
            &Change::Link {
                index: 2,
                up: false,
                deleted: true,
            },
            &[],
            &name,
        );
        w.handle(ms(1), &addr(2, [192, 168, 1, 2], false), &[], &name);
        assert!(w.poll(ms(20)).is_none(), "still in the burst");
        w.handle(
            ms(12),
            &Change::Link {
                index: 3,
                up: true,
                deleted: false,
            },
            &[],
            &name,
        );
        w.handle(ms(14), &addr(3, [192, 168, 2, 2], true), &[], &name);
        let route = Change::Route {
            table: MAIN_TABLE,
            prefix_len: 0,
            oif: Some(3),
            added: true,
        };
        w.handle(ms(15), &route, &[], &name);
        assert_eq!(w.poll_timeout(), Some(ms(45)));
        assert!(w.poll(ms(44)).is_none());
        let r = w.poll(ms(45)).expect("reaction");
        assert_eq!(r.changes, 5);
        assert_eq!(r.since, ms(0));
        assert_eq!(r.why(), "link if2 removed (+4 more changes)");
        assert!(w.poll(ms(500)).is_none(), "one reaction per burst");
        assert_eq!(w.poll_timeout(), None);
    }

    #[test]
    fn a_steady_trickle_still_gets_a_reaction_within_the_bound() {
        let t0 = Instant::now();
        let mut w = NetWatch::new();
        for n in 0..20u64 {
            w.handle(
                t0 + Duration::from_millis(n * 10),
                &addr(2, [10, 0, 0, 1], true),
                &[],
                &name,
            );
            if let Some(r) = w.poll(t0 + Duration::from_millis(n * 10)) {
                assert_eq!(r.since, t0);
                assert!(n * 10 >= MAX_DELAY.as_millis() as u64);
                assert!(n * 10 <= MAX_DELAY.as_millis() as u64 + 10);
                return;
            }
        }
        panic!("no reaction within {MAX_DELAY:?} of the first change");
    }

    #[test]
    fn our_own_interface_loopback_and_other_routes_are_ignored() {
        let t0 = Instant::now();
        let mut w = NetWatch::new();
        let wg = 7;
        let ignored = [1, wg];
        // The agent's own routes on the WireGuard interface (embedded mode).
        w.handle(
            t0,
            &Change::Route {
                table: MAIN_TABLE,
                prefix_len: 0,
                oif: Some(wg),
                added: true,
            },
            &ignored,
            &name,
        );
        w.handle(t0, &addr(wg, [10, 77, 0, 1], true), &ignored, &name);
        // A subnet route, a local-table route, a link-local address.
        w.handle(
            t0,
            &Change::Route {
                table: MAIN_TABLE,
                prefix_len: 24,
                oif: Some(2),
                added: true,
            },
            &ignored,
            &name,
        );
        w.handle(
            t0,
            &Change::Route {
                table: 255,
                prefix_len: 0,
                oif: Some(2),
                added: true,
            },
            &ignored,
            &name,
        );
        w.handle(t0, &addr(2, [169, 254, 3, 4], true), &ignored, &name);
        w.handle(t0, &addr(1, [127, 0, 0, 1], true), &ignored, &name);
        assert_eq!(w.poll_timeout(), None);
        let c = w.counters();
        assert_eq!((c.seen, c.ignored, c.reactions), (6, 6, 0));
        // An unreadable message counts.
        w.handle(t0, &Change::Unreadable, &ignored, &name);
        assert!(w.poll(t0 + MAX_DELAY).is_some());
    }
}
