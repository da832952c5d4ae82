//! Message integrity, nonces and the answers to requests.

use std::time::Instant;

use super::metrics::inc;
use super::quotas::same_principal;
use super::{ClientSocket, Event, Server, Transmit};
use crate::auth::{AuthError, NonceCheck};
use crate::stun::{self, attr, Class, Integrity, Message, MessageBuilder};

#[derive(Debug)]
pub(super) struct Authed {
    pub(super) username: String,
    pub(super) key: [u8; 16],
    pub(super) integrity: Integrity,
}

impl Server {
    /// Authenticates a request: Ok, or the error response has been queued.
    pub(super) fn authenticate(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
        existing: Option<&str>,
    ) -> Option<Authed> {
        let tid = msg.transaction_id();
        let fp = msg.check_fingerprint().is_some();
        let m = msg.method();
        let Some(kind) = msg.integrity_kind() else {
            self.challenge(now, client, msg, 401, "Unauthorized");
            return None;
        };
        let (Some(user), Some(realm), Some(nonce)) = (
            msg.str_attr(attr::USERNAME),
            msg.str_attr(attr::REALM),
            msg.str_attr(attr::NONCE),
        ) else {
            self.error_response(
                client,
                m,
                tid,
                400,
                "MESSAGE-INTEGRITY without USERNAME, REALM and NONCE",
                None,
                fp,
                &[],
            );
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
        if client.transport.is_stream() {
            self.events.push_back(Event::ClientAuthenticated { client });
        }
        if let Some(owner) = existing {
            if !same_principal(owner, user) {
                let auth = Some((&key[..], kind));
                self.error_response(
                    client,
                    m,
                    tid,
                    441,
                    "Wrong Credentials: allocation belongs to another user",
                    auth,
                    fp,
                    &[],
                );
                return None;
            }
        }
        Some(Authed {
            username: user.to_owned(),
            key,
            integrity: kind,
        })
    }

    /// 401/438 with REALM and a fresh NONCE: no state kept, rate-limited per
    /// source, and (with strict amplification) never larger than the request.
    pub(super) fn challenge(
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

    #[allow(clippy::too_many_arguments)]
    pub(super) fn error_response(
        &mut self,
        client: ClientSocket,
        m: u16,
        tid: stun::TransactionId,
        code: u16,
        reason: &str,
        auth: Option<(&[u8], Integrity)>,
        fp: bool,
        extra: &[(u16, &[u8])],
    ) {
        let (now_ms, request_len) = self.current;
        if auth.is_none() && !self.allow_unauth(client.remote.ip(), now_ms) {
            return;
        }
        let mut out = Vec::with_capacity(96 + reason.len());
        {
            let mut b = MessageBuilder::new(&mut out, m, Class::Error, tid);
            b.error(code, reason);
            for (t, v) in extra {
                b.attr(*t, v);
            }
            if let Some((key, kind)) = auth {
                b.integrity(kind, key);
            }
            if fp {
                b.fingerprint();
            }
        }
        if auth.is_none() && !self.pay_unauth(client.remote.ip(), now_ms, out.len(), request_len) {
            inc(&self.metrics.dropped_amplification, 1);
            tracing::debug!(source = %client.remote, code, "error answer dropped: per-source byte budget or --strict-amplification");
            return;
        }
        self.transmits.push_back(Transmit::ToClient {
            client,
            from: client.local,
            payload: out,
        });
    }

    pub(super) fn success(
        &mut self,
        client: ClientSocket,
        m: u16,
        tid: stun::TransactionId,
        auth: &Authed,
        fp: bool,
        attrs: &[(u16, &[u8])],
    ) {
        let mut out = Vec::with_capacity(96);
        {
            let mut b = MessageBuilder::new(&mut out, m, Class::Success, tid);
            for (t, v) in attrs {
                b.attr(*t, v);
            }
            b.integrity(auth.integrity, &auth.key);
            if fp {
                b.fingerprint();
            }
        }
        self.transmits.push_back(Transmit::ToClient {
            client,
            from: client.local,
            payload: out,
        });
    }
}
