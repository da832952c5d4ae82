//! Long-term credentials, TURN REST ephemeral credentials, stateless nonces and
//! a bounded per-source rate limiter for unauthenticated requests.

use base64::Engine;
use hmac::{Hmac, Mac};
use std::collections::HashMap;
use std::net::IpAddr;

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
            let ts = username.split(':').next().unwrap_or("");
            if let Ok(expiry) = ts.parse::<u64>() {
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
    /// A signer with a random per-process secret.
    pub fn new(lifetime_secs: u32) -> Self {
        let mut secret = [0u8; 32];
        rand::fill(&mut secret);
        NonceSigner {
            secret,
            lifetime_secs,
        }
    }

    /// A signer with a fixed secret (tests, or several processes sharing nonces).
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

/// Per-source token buckets in a fixed-size table: memory is constant however
/// many (spoofed) sources send. Sources that hash to the same slot share a
/// bucket, which can only make the limit stricter for them.
#[derive(Debug)]
pub struct SourceRateLimiter {
    slots: Box<[(u32, f32)]>, // (last refill ms, tokens)
    rate_per_sec: f32,
    burst: f32,
    seed: u64,
}

impl SourceRateLimiter {
    /// `slots` buckets, each refilling at `rate_per_sec` up to `burst`.
    pub fn new(slots: usize, rate_per_sec: f32, burst: f32) -> Self {
        SourceRateLimiter {
            slots: vec![(0u32, burst); slots.max(1)].into_boxed_slice(),
            rate_per_sec,
            burst,
            seed: rand::random(),
        }
    }

    fn slot(&self, ip: IpAddr) -> usize {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.seed.hash(&mut h);
        crate::policy::normalize(ip).hash(&mut h);
        (h.finish() % self.slots.len() as u64) as usize
    }

    /// Takes one token for `ip` at `now_ms`; false when over the limit.
    pub fn allow(&mut self, ip: IpAddr, now_ms: u32) -> bool {
        let i = self.slot(ip);
        let (last, tokens) = &mut self.slots[i];
        let elapsed = now_ms.wrapping_sub(*last) as f32 / 1000.0;
        *tokens = (*tokens + elapsed * self.rate_per_sec).min(self.burst);
        *last = now_ms;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
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
    fn rest_expiry() {
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
    fn rate_limiter_is_bounded_and_refills() {
        let mut r = SourceRateLimiter::new(1024, 10.0, 5.0);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let n = (0..20).filter(|_| r.allow(ip, 0)).count();
        assert_eq!(n, 5);
        assert!(r.allow(ip, 1000));
    }
}
