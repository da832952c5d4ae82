//! Membership: who may become a peer (`max_peers`), what a member may
//! route (its certificate with a CA pinned, its advertised single addresses
//! without one, never another peer's or a quarantined address), and how
//! refusals are counted and logged. Part of [`Agent`]; see
//! `docs/ice-agent.md` ("Trust").

use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::{Agent, Output, PeerKey, REFUSAL_LOGS};
use crate::cert;
use crate::validate::{OwnAddrs, Refusal};

impl Agent {
    /// Counts a refused input and logs it naming the member (at most
    /// [`REFUSAL_LOGS`] warnings per 10 s; the rest at debug level).
    pub(super) fn refuse(&mut self, now: Instant, from: &PeerKey, r: Refusal) {
        self.drops.count(&r);
        self.log_refusal(now, from, r.reason(), &r);
    }

    pub(super) fn log_refusal(
        &mut self,
        now: Instant,
        from: &PeerKey,
        reason: &str,
        what: &dyn std::fmt::Display,
    ) {
        if now.saturating_duration_since(self.log_budget.0) >= Duration::from_secs(10) {
            self.log_budget = (now, REFUSAL_LOGS);
        }
        let peer = self.label(from);
        if self.log_budget.1 > 0 {
            self.log_budget.1 -= 1;
            tracing::warn!(%peer, reason, "refused input from a member: {what}");
        } else {
            tracing::debug!(%peer, reason, "refused input from a member: {what}");
        }
    }

    /// A peer's name when its certificate gave one, else its key.
    pub fn label(&self, key: &PeerKey) -> String {
        self.peers
            .get(key)
            .and_then(|p| p.membership.as_ref())
            .map(|m| m.name.clone())
            .unwrap_or_else(|| key.to_string())
    }

    /// Whether one more `auto` member may become a peer (`max_peers`).
    pub(super) fn admit(&mut self, now: Instant, key: &PeerKey) -> bool {
        if self.peers.len() < self.opts.max_peers {
            return true;
        }
        self.drops.peer_limit += 1;
        let why = format!(
            "{} peers managed already (agent.max_peers = {})",
            self.peers.len(),
            self.opts.max_peers
        );
        self.log_refusal(now, key, "peer_limit", &why);
        false
    }

    pub(super) fn unix_now(&self, now: Instant) -> u64 {
        self.opts.unix_time + now.saturating_duration_since(self.started).as_secs()
    }

    /// The addresses and ports no remote candidate may name.
    pub(super) fn own_addrs(&self) -> OwnAddrs {
        let mut ports = self.opts.own_ports.clone();
        ports.push(self.opts.port);
        ports.extend(self.opts.wg_port);
        OwnAddrs {
            host: self.opts.host.clone(),
            ports,
            candidates: self
                .local
                .iter()
                .filter(|c| c.kind() != is::CandidateKind::Host)
                .map(|c| c.addr())
                .collect(),
        }
    }

    /// The peer presented `cert` (or none) with its offer or answer.
    pub(super) fn present(&mut self, now: Instant, key: PeerKey, cert: Option<&str>) {
        if self.opts.cas.is_empty() {
            return;
        }
        let unix = self.unix_now(now);
        let result = match cert {
            None => Err("no membership certificate presented: routes nothing".to_owned()),
            Some(text) => cert::verify(text, &self.opts.cas, &key, unix)
                .map_err(|e| format!("membership certificate refused ({e}): routes nothing")),
        };
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        match result {
            Ok(m) => {
                if p.membership.as_ref() != Some(&m) {
                    tracing::info!(peer = %key, name = %m.name, "membership certificate verified");
                }
                p.membership = Some(m);
                p.cert_problem = None;
            }
            Err(why) => {
                let changed = p.cert_problem.as_ref() != Some(&why);
                p.membership = None;
                p.cert_problem = Some(why.clone());
                // Every refused certificate counts; a repeat of the same
                // refusal is not logged again.
                if cert.is_some() {
                    self.drops.bad_certificate += 1;
                    if changed {
                        self.log_refusal(now, &key, "bad_certificate", &why);
                    }
                }
            }
        }
        self.grant(now, key);
    }

    /// Certificates that expired since the last look stop routing.
    pub(super) fn expire_memberships(&mut self, now: Instant) {
        let unix = self.unix_now(now);
        let expired: Vec<PeerKey> = self
            .peers
            .iter()
            .filter(|(_, p)| p.membership.as_ref().is_some_and(|m| m.not_after <= unix))
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            if let Some(p) = self.peers.get_mut(&k) {
                let at = p.membership.take().map_or(0, |m| m.not_after);
                p.cert_problem = Some(format!(
                    "membership certificate expired at {at} (Unix time): routes nothing"
                ));
                tracing::warn!(peer = %k, "membership certificate expired: routing nothing to it");
            }
            self.grant(now, k);
        }
        let before = self.quarantine.len();
        self.quarantine.retain(|_, (_, until)| *until > now);
        if self.quarantine.len() != before {
            self.regrant_all(now);
        }
    }

    /// Works out what an `auto` peer may route and tells the driver when it
    /// changes. With a CA: what its verified certificate lists, nothing
    /// without one. Without a CA: the single addresses it advertises. Either
    /// way never an address another peer holds (first come), nor one
    /// quarantined for another key.
    pub(super) fn grant(&mut self, now: Instant, key: PeerKey) {
        let Some(p) = self.peers.get(&key) else {
            return;
        };
        if p.listed {
            return;
        }
        let want: Vec<IpNet> = if self.opts.cas.is_empty() {
            p.claimed.clone()
        } else {
            p.membership
                .as_ref()
                .map(|m| m.allowed_ips())
                .unwrap_or_default()
        };
        let (granted, note) = self.compute_grant(now, &key, want);
        let refused_now = note.is_some();
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        let new_note = note != p.withheld;
        p.withheld = note;
        if p.allowed_ips != granted {
            p.allowed_ips = granted.clone();
            self.out.push_back(Output::AllowedIps {
                peer: key,
                allowed_ips: granted,
            });
        }
        if refused_now && new_note {
            self.drops.address_refused += 1;
            let why = self
                .peers
                .get(&key)
                .and_then(|p| p.withheld.clone())
                .unwrap_or_default();
            self.log_refusal(now, &key, "address_refused", &why);
        }
    }

    /// What `key` may route of `want`, and a note on what it may not.
    pub(super) fn compute_grant(
        &self,
        now: Instant,
        key: &PeerKey,
        want: Vec<IpNet>,
    ) -> (Vec<IpNet>, Option<String>) {
        let mut granted = Vec::new();
        let mut withheld = Vec::new();
        for n in want {
            let held = self
                .peers
                .iter()
                .find(|(k, q)| *k != key && q.allowed_ips.iter().any(|o| cert::overlaps(o, &n)));
            let quarantined = self
                .quarantine
                .iter()
                .any(|(q, (owner, until))| owner != key && *until > now && cert::overlaps(q, &n));
            match held {
                Some((k, _)) => withheld.push(format!("{n} (routed to {})", self.label(k))),
                None if quarantined => {
                    withheld.push(format!("{n} (quarantined: the node that had it vanished)"))
                }
                None => granted.push(n),
            }
        }
        let note = (!withheld.is_empty()).then(|| format!("withheld {}", withheld.join(", ")));
        (granted, note)
    }

    /// Grants again every peer that is waiting for an address.
    pub(super) fn regrant_all(&mut self, now: Instant) {
        let waiting: Vec<PeerKey> = self
            .peers
            .iter()
            .filter(|(_, p)| p.withheld.is_some())
            .map(|(k, _)| *k)
            .collect();
        for k in waiting {
            self.grant(now, k);
        }
    }
}
