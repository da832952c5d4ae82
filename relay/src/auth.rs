//! Long-term credentials, TURN REST ephemeral credentials, stateless nonces and
//! the bounded per-source token buckets that limit unauthenticated answers.

use base64::Engine;
use hmac::{Hmac, Mac};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::stun::long_term_key;

/// How users authenticate.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// Static users: name → password.
    pub users: HashMap<String, String>,
    /// Shared secrets for TURN REST credentials (first one signs, all verify:
    /// lets an operator rotate the secret without breaking live clients).
    pub rest_secrets: Vec<String>,
}

/// Why a username/credential was rejected (logged and counted; the client sees 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No such static user and not a REST username.
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    /// REST username whose expiry has passed.
    #[error("REST credential for {user:?} expired at {expiry} (now {now})")]
    Expired {
        /// The user part.
        user: String,
        /// Expiry (Unix seconds).
        expiry: u64,
        /// Now (Unix seconds).
        now: u64,
    },
    /// MESSAGE-INTEGRITY did not verify with any key for this user.
    #[error("wrong password for {0:?}")]
    BadIntegrity(String),
}

/// The REST password for `username` under `secret`: base64(HMAC-SHA1(secret, username)).
pub fn rest_password(secret: &str, username: &str) -> String {
    let Ok(mut m) = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    m.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes())
}

/// A REST username valid until `expiry` (Unix seconds): `expiry:user`.
pub fn rest_username(expiry: u64, user: &str) -> String {
    format!("{expiry}:{user}")
}

/// The expiry (Unix seconds) of a REST username: the digits before the
/// first `:` (coturn also takes a bare `expiry`). `None` for other names.
pub fn rest_expiry(username: &str) -> Option<u64> {
    let ts = username.split(':').next().unwrap_or("");
    if ts.is_empty() || ts.len() > 20 || !ts.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ts.parse().ok()
}

impl Credentials {
    /// The candidate keys for `username` at Unix time `now_unix`.
    /// Returns up to a few keys (static password, each REST secret).
    pub fn keys(
        &self,
        username: &str,
        realm: &str,
        now_unix: u64,
    ) -> Result<Vec<[u8; 16]>, AuthError> {
        let mut keys = Vec::new();
        if let Some(pw) = self.users.get(username) {
            keys.push(long_term_key(username, realm, pw));
        }
        if !self.rest_secrets.is_empty() {
            // coturn accepts `expiry:user` and also `expiry` alone; the expiry is
            // the part before the first separator.
            if let Some(expiry) = rest_expiry(username) {
                if expiry < now_unix {
                    if keys.is_empty() {
                        return Err(AuthError::Expired {
                            user: username
                                .split_once(':')
                                .map(|x| x.1)
                                .unwrap_or("")
                                .to_owned(),
                            expiry,
                            now: now_unix,
                        });
                    }
                } else {
                    for s in &self.rest_secrets {
                        keys.push(long_term_key(username, realm, &rest_password(s, username)));
                    }
                }
            }
        }
        if keys.is_empty() {
            return Err(AuthError::UnknownUser(username.to_owned()));
        }
        Ok(keys)
    }
}

/// Stateless, time-limited nonces: `base64url(secs_be32 || HMAC-SHA256(secret, secs || ip)[..9])`.
/// Nothing is stored per request; a nonce is valid for `lifetime_secs` after issue,
/// only for the source address it was issued to.
#[derive(Debug, Clone)]
pub struct NonceSigner {
    secret: [u8; 32],
    lifetime_secs: u32,
}

/// Result of checking a nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    /// Ours, for this source, and fresh.
    Valid,
    /// Ours but too old: answer 438 with a fresh nonce.
    Stale,
    /// Not ours (or for another source): answer 401 with a fresh nonce.
    Invalid,
}

impl NonceSigner {
    /// A signer keyed by `secret`: random per process (the driver draws it
    /// from the OS), fixed in tests, or shared by processes sharing nonces.
    pub fn with_secret(secret: [u8; 32], lifetime_secs: u32) -> Self {
        NonceSigner {
            secret,
            lifetime_secs,
        }
    }

    fn mac(&self, secs: u32, ip: IpAddr) -> [u8; 9] {
        let mut m = Hmac::<sha2::Sha256>::new_from_slice(&self.secret).expect("any key length");
        m.update(&secs.to_be_bytes());
        match crate::policy::normalize(ip) {
            IpAddr::V4(v4) => m.update(&v4.octets()),
            IpAddr::V6(v6) => m.update(&v6.octets()),
        }
        let out = m.finalize().into_bytes();
        let mut t = [0u8; 9];
        t.copy_from_slice(&out[..9]);
        t
    }

    /// A nonce for `ip` issued at `secs` (seconds on the server's clock).
    pub fn issue(&self, secs: u32, ip: IpAddr) -> String {
        let mut raw = [0u8; 13];
        raw[..4].copy_from_slice(&secs.to_be_bytes());
        raw[4..].copy_from_slice(&self.mac(secs, ip));
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    /// Checks a nonce presented by `ip` at `now_secs`.
    pub fn check(&self, nonce: &str, now_secs: u32, ip: IpAddr) -> NonceCheck {
        let mut raw = [0u8; 13];
        match base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode_slice(nonce.as_bytes(), &mut raw)
        {
            Ok(13) => {}
            _ => return NonceCheck::Invalid,
        }
        let secs = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let mac = self.mac(secs, ip);
        if mac.iter().zip(&raw[4..]).fold(0u8, |a, (x, y)| a | (x ^ y)) != 0 {
            return NonceCheck::Invalid;
        }
        if secs > now_secs || now_secs - secs >= self.lifetime_secs {
            return NonceCheck::Stale;
        }
        NonceCheck::Valid
    }
}

/// Per-source token buckets in a fixed-size table of atomics, shared by every
/// shard (UDP workers and the stream shard): memory is constant however many
/// (spoofed) sources send, and a source meets one budget whichever worker the
/// kernel hashes it to. Sources count by [`crate::policy::source_key`] (an
/// IPv6 /64 is one source); sources that hash to the same slot share a
/// bucket, which can only make the limit stricter for them.
///
/// Units are whatever the caller counts (requests in thousandths, bytes);
/// rate and burst are passed per call so the table itself is configuration
/// free. Time is the caller's milliseconds (the server clock), never read here.
pub struct SharedBuckets {
    /// Per slot: the last refill (ms, high 32 bits) and the units spent
    /// (low 32 bits; zero is a full bucket, so a fresh table needs no setup).
    slots: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for SharedBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBuckets")
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl SharedBuckets {
    /// A table of `slots` buckets (8 bytes each), all full.
    pub fn new(slots: usize) -> Self {
        SharedBuckets {
            slots: (0..slots.max(1)).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn slot(&self, ip: IpAddr) -> &AtomicU64 {
        let h = self.hasher.hash_one(crate::policy::source_key(ip));
        &self.slots[(h % self.slots.len() as u64) as usize]
    }

    /// Takes `cost` units from `ip`'s bucket at `now_ms`; the bucket refills
    /// at `rate_per_sec` units per second up to `burst`. False (and nothing
    /// taken) when the bucket holds less than `cost`.
    pub fn take(&self, ip: IpAddr, now_ms: u32, cost: u32, rate_per_sec: u32, burst: u32) -> bool {
        let slot = self.slot(ip);
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let (last, spent) = ((cur >> 32) as u32, cur as u32);
            // Shards read their clocks independently: a `now` a little behind
            // the stored one refills nothing; far behind means the u32
            // millisecond clock wrapped (49 days) and the bucket is full.
            let elapsed = match now_ms.wrapping_sub(last) as i32 {
                d if d >= 0 => d as u64,
                d if d > -60_000 => 0,
                _ => u64::from(u32::MAX),
            };
            let refill = (elapsed * u64::from(rate_per_sec) / 1000).min(u64::from(u32::MAX)) as u32;
            let spent = spent.saturating_sub(refill);
            let Some(after) = spent.checked_add(cost).filter(|a| *a <= burst) else {
                return false;
            };
            // Keep the old time while nothing was refilled, so slow rates
            // still accumulate between frequent calls.
            let stamp = if refill == 0 { last } else { now_ms };
            let next = (u64::from(stamp) << 32) | u64::from(after);
            match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(v) => cur = v,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_password_matches_coturn_formula() {
        // echo -n "1700000000:alice" | openssl dgst -sha1 -hmac "s3cret" -binary | base64
        // Reference value computed independently with openssl (command above).
        let pw = rest_password("s3cret", "1700000000:alice");
        assert_eq!(pw, "TtElzSjT0GdnTQ9xdcRNxx96yQs=");
        assert_ne!(pw, rest_password("other", "1700000000:alice"));
    }

    #[test]
    fn rest_usernames_expire() {
        assert_eq!(rest_expiry("2000:bob"), Some(2000));
        assert_eq!(rest_expiry("2000"), Some(2000));
        assert_eq!(rest_expiry("bob"), None);
        assert_eq!(rest_expiry(":bob"), None);
        assert_eq!(rest_expiry("99999999999999999999999:bob"), None);
        let c = Credentials {
            users: HashMap::new(),
            rest_secrets: vec!["s".into()],
        };
        assert!(c.keys("2000:bob", "r", 1000).is_ok());
        assert!(matches!(
            c.keys("500:bob", "r", 1000),
            Err(AuthError::Expired { .. })
        ));
        assert!(matches!(
            c.keys("bob", "r", 1000),
            Err(AuthError::UnknownUser(_))
        ));
    }

    #[test]
    fn nonce_lifecycle() {
        let s = NonceSigner::with_secret([1; 32], 600);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let n = s.issue(100, ip);
        assert_eq!(s.check(&n, 100, ip), NonceCheck::Valid);
        assert_eq!(s.check(&n, 699, ip), NonceCheck::Valid);
        assert_eq!(s.check(&n, 700, ip), NonceCheck::Stale);
        assert_eq!(
            s.check(&n, 100, "192.0.2.2".parse().expect("ip")),
            NonceCheck::Invalid
        );
        assert_eq!(s.check("garbage", 100, ip), NonceCheck::Invalid);
        let other = NonceSigner::with_secret([2; 32], 600);
        assert_eq!(other.check(&n, 100, ip), NonceCheck::Invalid);
    }

    #[test]
    fn shared_buckets_are_bounded_and_refill() {
        let r = SharedBuckets::new(1024);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        // 10 per second, burst 5, in whole units.
        let n = (0..20).filter(|_| r.take(ip, 0, 1, 10, 5)).count();
        assert_eq!(n, 5);
        assert!(!r.take(ip, 50, 1, 10, 5), "half a token after 50 ms");
        assert!(r.take(ip, 100, 1, 10, 5), "one token after 100 ms");
        assert_eq!((0..20).filter(|_| r.take(ip, 100_000, 1, 10, 5)).count(), 5);
        // A shard whose clock is a little behind refills nothing.
        assert!(!r.take(ip, 99_990, 1, 10, 5));
        // A cost above the burst never passes.
        assert!(!r.take("192.0.2.2".parse().expect("ip"), 0, 6, 10, 5));
        // Threads share the budget.
        let r = std::sync::Arc::new(SharedBuckets::new(64));
        let taken: usize = (0..4)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || (0..1000).filter(|_| r.take(ip, 7, 1, 1, 100)).count())
            })
            .map(|h| h.join().expect("thread"))
            .sum();
        assert_eq!(taken, 100);
    }
}
