//! Planned re-allocation. A relay may tie a live allocation to the username
//! that created it (RFC 8656 §5, coturn): new TURN REST credentials (a new
//! `expiry:user`) under it get 441, the TURN client keeps the allocation on
//! the old username, and that username's expiry would end it (refreshes
//! fail once it passes). So the agent replaces the allocation with the new
//! credentials itself, at the first moment no peer's traffic goes through
//! it, and at the latest a margin before the old username expires. Peers
//! whose route went through it move to another allocated relay at once when
//! there is one, or restart ICE (relay first) when the new allocation is
//! up. Part of [`Agent`]; see `docs/ice-agent.md` ("TURN REST credentials").

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{Agent, PeerKey, Route};

/// The latest re-allocation happens this long before the old username
/// expires (or a quarter of the time left at the refusal, if shorter).
const RENEW_MARGIN: Duration = Duration::from_secs(600);
/// coturn deletes an allocation refreshed with lifetime 0 at its next
/// timer tick, and until then answers an Allocate from the same 5-tuple
/// with 437.
const REALLOCATE_AFTER: Duration = Duration::from_millis(1500);
/// A username without a known expiry (not a REST one) is replaced at the
/// latest this long after the refusal.
const RENEW_UNKNOWN: Duration = Duration::from_secs(600);

impl Agent {
    /// When the username relay `i`'s allocation uses expires, if it is a
    /// TURN REST one.
    pub(super) fn allocation_expiry(&self, i: usize) -> Option<Instant> {
        let name = self.relays[i].turn.as_ref()?.username();
        let unix = relay::auth::rest_expiry(name)?;
        let secs = unix.saturating_sub(self.opts.unix_time);
        self.started.checked_add(Duration::from_secs(secs))
    }

    /// The relay refused new credentials under the live allocation (441):
    /// plan its replacement.
    pub(super) fn plan_renewal(&mut self, now: Instant, i: usize) {
        let r = &mut self.relays[i];
        if r.renewing || r.renew_by.is_some() {
            return;
        }
        let by = match r.bound_until {
            Some(until) => {
                let left = until.saturating_duration_since(now);
                now + left - (left / 4).min(RENEW_MARGIN)
            }
            None => now + RENEW_UNKNOWN,
        };
        r.renew_by = Some(by);
        tracing::info!(
            server = %r.spec.server,
            latest_in = ?by.saturating_duration_since(now),
            "the relay keeps the allocation's old username: re-allocating with the new credentials once no peer's traffic goes through it"
        );
        self.renew_if_due(now, i);
    }

    /// Replaces relay `i`'s allocation if a replacement is planned and
    /// either due or free to happen (no peer routed through it).
    pub(super) fn renew_if_due(&mut self, now: Instant, i: usize) {
        let r = &self.relays[i];
        let Some(by) = r.renew_by else { return };
        if r.renewing {
            return;
        }
        let users = self.routed_via(r.spec.server);
        if now < by && !users.is_empty() {
            return;
        }
        self.renew(now, i, users);
    }

    /// When relay `i`'s planned replacement is due.
    pub(super) fn renew_at(&self, i: usize) -> Option<Instant> {
        let r = &self.relays[i];
        r.renew_by.filter(|_| !r.renewing)
    }

    /// Peers whose route goes through our allocation on `server`.
    fn routed_via(&self, server: SocketAddr) -> Vec<PeerKey> {
        self.peers
            .iter()
            .filter(|(_, p)| {
                matches!(
                    p.route.map(|r| r.route),
                    Some(Route::Channel { server: s, .. } | Route::Indication { server: s, .. })
                        if s == server
                )
            })
            .map(|(k, _)| *k)
            .collect()
    }

    /// Deletes the allocation (Refresh with lifetime 0: a server accepts
    /// one allocation per 5-tuple); [`Agent::renew_deallocated`] allocates
    /// again once the server answers.
    fn renew(&mut self, now: Instant, i: usize, mut users: Vec<PeerKey>) {
        let r = &mut self.relays[i];
        r.renew_by = None;
        let server = r.spec.server;
        let Some(t) = r.turn.as_mut().filter(|t| t.is_allocated()) else {
            // Nothing live: the next allocation takes the new credentials.
            return;
        };
        r.renewing = true;
        t.deallocate(now);
        r.problem = Some(
            "re-allocating with new TURN credentials (the relay keeps a live allocation's username)"
                .into(),
        );
        let relayed = std::mem::take(&mut r.relayed);
        tracing::info!(%server, peers = users.len(), "re-allocating on the relay with the new credentials");
        self.health.set_usable(now, server, false);
        self.push_relay_view(now);
        self.withdraw_relayed(now, &relayed);
        // Another allocated relay carries the moving peers meanwhile
        // (make before break); otherwise they restart once ours is back.
        let other = self
            .relays
            .iter()
            .enumerate()
            .any(|(j, o)| j != i && !o.relayed.is_empty());
        if other {
            for k in users.drain(..) {
                self.restart_peer(now, k);
            }
        }
        self.relays[i].moving = users;
        self.drain_relay(now, i);
    }

    /// The old allocation is gone (or would not go): allocate with the new
    /// credentials (over a stream, on a new connection).
    pub(super) fn renew_deallocated(&mut self, now: Instant, i: usize) {
        let r = &mut self.relays[i];
        r.renewing = false;
        r.turn = None;
        r.retry_at = Some(now + REALLOCATE_AFTER);
        tracing::debug!(server = %r.spec.server, "old allocation deleted; allocating again in {REALLOCATE_AFTER:?}");
        self.close_stream(i);
    }

    /// The new allocation is up: the peers still routed through the old
    /// one restart ICE, relay first (the others found another pair, e.g.
    /// through the peer's own allocation, and get the new relayed candidate
    /// trickled).
    pub(super) fn move_peers(&mut self, now: Instant, i: usize) {
        let moving = std::mem::take(&mut self.relays[i].moving);
        if moving.is_empty() {
            return;
        }
        let still = self.routed_via(self.relays[i].spec.server);
        for k in moving.into_iter().filter(|k| still.contains(k)) {
            self.restart_peer(now, k);
        }
    }

    fn restart_peer(&mut self, now: Instant, k: PeerKey) {
        if self.peers.get(&k).is_some_and(|p| p.session.is_some()) {
            self.restarts += 1;
            self.new_session(now, k);
            self.send_offer(now, k);
        }
    }
}
