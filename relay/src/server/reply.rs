//! Answers to requests: errors (rate-limited and budgeted when
//! unauthenticated) and successes. [`Reply`] carries what every answer to one
//! request needs, so a refusal is one line.

use super::auth::Authed;
use super::metrics::inc;
use super::{ClientSocket, Server, Transmit};
use crate::stun::{attr, Class, Integrity, Message, MessageBuilder, TransactionId};

/// How to answer one request: who asked, the method and transaction,
/// whether to add FINGERPRINT (the request had one), and, once the request
/// passed MESSAGE-INTEGRITY, the key and kind to sign with.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reply<'k> {
    pub(super) client: ClientSocket,
    pub(super) method: u16,
    pub(super) tid: TransactionId,
    pub(super) fp: bool,
    pub(super) auth: Option<(&'k [u8], Integrity)>,
}

impl<'k> Reply<'k> {
    /// An unsigned answer to `msg` from `client`.
    pub(super) fn to(client: ClientSocket, msg: &Message<'_>) -> Self {
        Reply {
            client,
            method: msg.method(),
            tid: msg.transaction_id(),
            fp: msg.check_fingerprint().is_some(),
            auth: None,
        }
    }

    /// The same answer, signed with the credentials the request passed.
    pub(super) fn signed(self, auth: &'k Authed) -> Self {
        Reply {
            auth: Some((&auth.key, auth.integrity)),
            ..self
        }
    }
}

impl Server {
    /// An error answer without extra attributes.
    pub(super) fn refuse(&mut self, r: &Reply<'_>, code: u16, reason: &str) {
        self.error_response(r, code, reason, &[]);
    }

    /// An error answer. Unsigned ones (the request did not authenticate)
    /// pass the per-source rate and byte budgets like every unauthenticated
    /// answer, and are dropped when they do not fit.
    pub(super) fn error_response(
        &mut self,
        r: &Reply<'_>,
        code: u16,
        reason: &str,
        extra: &[(u16, &[u8])],
    ) {
        let client = r.client;
        let (now_ms, request_len) = self.current;
        if r.auth.is_none() && !self.allow_unauth(client.remote.ip(), now_ms) {
            return;
        }
        let mut out = Vec::with_capacity(96 + reason.len());
        {
            let mut b = MessageBuilder::new(&mut out, r.method, Class::Error, r.tid);
            b.error(code, reason);
            for (t, v) in extra {
                b.attr(*t, v);
            }
            if let Some((key, kind)) = r.auth {
                b.integrity(kind, key);
            }
            if r.fp {
                b.fingerprint();
            }
        }
        if r.auth.is_none() && !self.pay_unauth(client.remote.ip(), now_ms, out.len(), request_len)
        {
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

    /// A success answer with `attrs`, signed (successes follow authentication).
    pub(super) fn success(&mut self, r: &Reply<'_>, attrs: &[(u16, &[u8])]) {
        let mut out = Vec::with_capacity(96);
        {
            let mut b = MessageBuilder::new(&mut out, r.method, Class::Success, r.tid);
            for (t, v) in attrs {
                b.attr(*t, v);
            }
            if let Some((key, kind)) = r.auth {
                b.integrity(kind, key);
            }
            if r.fp {
                b.fingerprint();
            }
        }
        self.transmits.push_back(Transmit::ToClient {
            client: r.client,
            from: r.client.local,
            payload: out,
        });
    }

    /// A success carrying LIFETIME (Refresh).
    pub(super) fn success_lifetime(&mut self, r: &Reply<'_>, secs: u32) {
        self.success(r, &[(attr::LIFETIME, &secs.to_be_bytes())]);
    }
}
