//! Authentication of requests (RFC 8489 §9.2 long-term credentials):
//! MESSAGE-INTEGRITY(-SHA256), stateless nonces, realm, and 401/438
//! challenges. The credentials and nonce signer themselves live in
//! [`crate::auth`].

use std::time::Instant;

use super::metrics::inc;
use super::quotas::same_principal;
use super::reply::Reply;
use super::{ClientSocket, Event, Server, Transmit};
use crate::auth::{AuthError, NonceCheck};
use crate::stun::{attr, Class, Integrity, Message, MessageBuilder};

/// Credentials that passed.
#[derive(Debug)]
pub(super) struct Authed {
    pub(super) username: String,
    pub(super) key: [u8; 16],
    pub(super) integrity: Integrity,
}

impl Server {
    /// Authenticates a request: `Some`, or the answer (challenge or error)
    /// has been queued. `existing`: the username of the allocation the
    /// request is about; another user gets 441.
    pub(super) fn authenticate(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
        existing: Option<&str>,
    ) -> Option<Authed> {
        let r = Reply::to(client, msg);
        let Some(kind) = msg.integrity_kind() else {
            self.challenge(now, client, msg, 401, "Unauthorized");
            return None;
        };
        let (Some(user), Some(realm), Some(nonce)) = (
            msg.str_attr(attr::USERNAME),
            msg.str_attr(attr::REALM),
            msg.str_attr(attr::NONCE),
        ) else {
            let reason = "MESSAGE-INTEGRITY without USERNAME, REALM and NONCE";
            self.refuse(&r, 400, reason);
            return None;
        };
        match self
            .cfg
            .nonces
            .check(nonce, self.secs(now), client.remote.ip())
        {
            NonceCheck::Valid => {}
            NonceCheck::Stale | NonceCheck::Invalid => {
                self.challenge(now, client, msg, 438, "Stale Nonce");
                return None;
            }
        }
        if realm != self.cfg.realm {
            inc(&self.metrics.auth_failures, 1);
            tracing::info!(%client.remote, realm, "wrong realm");
            self.challenge(now, client, msg, 401, "Unauthorized");
            return None;
        }
        let key = self.verify_key(now, client, msg, user)?;
        if client.transport.is_stream() {
            self.events.push_back(Event::ClientAuthenticated { client });
        }
        let authed = Authed {
            username: user.to_owned(),
            key,
            integrity: kind,
        };
        if existing.is_some_and(|owner| !same_principal(owner, user)) {
            let reason = "Wrong Credentials: allocation belongs to another user";
            self.refuse(&r.signed(&authed), 441, reason);
            return None;
        }
        Some(authed)
    }

    /// The key of `user` that MESSAGE-INTEGRITY verifies with; otherwise the
    /// failure is counted, logged and challenged.
    fn verify_key(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
        user: &str,
    ) -> Option<[u8; 16]> {
        let keys = match self
            .cfg
            .credentials
            .keys(user, &self.cfg.realm, self.unix(now))
        {
            Ok(k) => k,
            Err(e) => {
                inc(&self.metrics.auth_failures, 1);
                tracing::info!(%client.remote, error = %e, "authentication failed");
                self.challenge(now, client, msg, 401, "Unauthorized");
                return None;
            }
        };
        let Some(key) = keys.into_iter().find(|k| msg.verify_integrity(k).is_some()) else {
            inc(&self.metrics.auth_failures, 1);
            tracing::info!(%client.remote, error = %AuthError::BadIntegrity(user.to_owned()), "authentication failed");
            self.challenge(now, client, msg, 401, "Unauthorized");
            return None;
        };
        Some(key)
    }

    /// 401/438 with REALM and a fresh NONCE: no state kept, rate-limited per
    /// source, and (with strict amplification) never larger than the request.
    fn challenge(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
        code: u16,
        reason: &str,
    ) {
        let now_ms = self.now_ms(now);
        if !self.allow_unauth(client.remote.ip(), now_ms) {
            return;
        }
        let nonce = self.cfg.nonces.issue(self.secs(now), client.remote.ip());
        let mut out = std::mem::take(&mut self.scratch);
        {
            let mut b =
                MessageBuilder::new(&mut out, msg.method(), Class::Error, msg.transaction_id());
            b.error(code, reason)
                .attr(attr::REALM, self.cfg.realm.as_bytes())
                .attr(attr::NONCE, nonce.as_bytes());
            if msg.check_fingerprint().is_some() {
                b.fingerprint();
            }
        }
        if !self.pay_unauth(client.remote.ip(), now_ms, out.len(), msg.raw().len()) {
            inc(&self.metrics.dropped_amplification, 1);
            tracing::debug!(source = %client.remote, code, "challenge dropped: per-source byte budget or --strict-amplification");
            self.scratch = out;
            return;
        }
        self.transmits.push_back(Transmit::ToClient {
            client,
            from: client.local,
            payload: out.clone(),
        });
        self.scratch = out;
    }
}
