//! Which peer addresses a relayed allocation may reach.
//!
//! Default-deny for every address that is not globally routable unicast, and
//! for the relay's own addresses, so that a TURN allocation cannot be used to
//! reach the relay host, its cloud metadata service or a private network
//! behind it (coturn CVE-2020-26262 reached loopback through `0.0.0.0`).
//! IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is normalised before any check.
//!
//! Also here: [`source_key`], what per-source limits count under.

use ipnet::IpNet;
use std::net::IpAddr;

/// A default-deny rule: the range and why it is denied.
#[derive(Debug, Clone)]
pub struct DenyRule {
    /// The denied range.
    pub net: IpNet,
    /// Human name of the range, used in the 403 reason.
    pub name: &'static str,
}

const DEFAULT_DENY: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this-network"),
    ("127.0.0.0/8", "loopback"),
    ("10.0.0.0/8", "private"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("100.64.0.0/10", "shared CGNAT"),
    ("169.254.0.0/16", "link-local/cloud metadata"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved/broadcast"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
    ("64:ff9b::/96", "NAT64"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("2002::/16", "6to4 (embeds IPv4)"),
    ("2001::/32", "Teredo (embeds IPv4)"),
    ("::/96", "IPv4-compatible IPv6"),
    ("fec0::/10", "site-local"),
    ("100::/64", "discard-only"),
];

/// Normalises `::ffff:a.b.c.d` to `a.b.c.d`.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// The key per-source limits count under: an IPv4 address, or the /64 of an
/// IPv6 address (a host or home gets a whole /64, so limiting its addresses
/// one by one would limit nothing). IPv4-mapped IPv6 is the IPv4 address.
/// `signaling` counts its pending connections by the same rule.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match normalize(ip) {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

/// The peer policy of one relay.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    deny: Vec<DenyRule>,
    allow: Vec<IpNet>,
    own: Vec<IpAddr>,
}

/// Why a peer was denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The normalised peer address.
    pub ip: IpAddr,
    /// The rule, e.g. "loopback 127.0.0.0/8".
    pub rule: String,
    /// Denied because it is the relay's own address: the server still lets
    /// through the ports of live allocations (relay-to-relay).
    pub own: bool,
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "peer {} denied: {} (allow with --allow-peer {})",
            self.ip,
            self.rule,
            self.rule.rsplit(' ').next().unwrap_or("CIDR")
        )
    }
}

impl PeerPolicy {
    /// The default deny-list plus the relay's own addresses, opened by `allow`.
    pub fn new(allow: Vec<IpNet>, own: Vec<IpAddr>) -> Self {
        let deny = DEFAULT_DENY
            .iter()
            .filter_map(|(net, name)| net.parse().ok().map(|net| DenyRule { net, name }))
            .collect();
        PeerPolicy {
            deny,
            allow,
            own: own.into_iter().map(normalize).collect(),
        }
    }

    /// True for the relay's own addresses (after normalisation), whatever
    /// `--allow-peer` says.
    pub fn is_own(&self, ip: IpAddr) -> bool {
        self.own.contains(&normalize(ip))
    }

    /// The relay's own addresses this policy knows.
    pub fn own_addresses(&self) -> &[IpAddr] {
        &self.own
    }

    /// Checks one peer address. The relay's own addresses are refused even
    /// inside an `--allow-peer` range (reported with `own: true`, so the
    /// server can still allow the ports of live allocations); otherwise an
    /// explicit `--allow-peer` range wins, then the default deny-list (which
    /// also wins over the own-address rule: a relay on loopback cannot be
    /// reached through itself unless loopback is allowed).
    pub fn check(&self, ip: IpAddr) -> Result<(), Denied> {
        let ip = normalize(ip);
        let allowed = self.allow.iter().any(|n| n.contains(&ip));
        let deny = self.deny.iter().find(|r| r.net.contains(&ip));
        if self.own.contains(&ip) && (allowed || deny.is_none()) {
            let host = if ip.is_ipv4() { "32" } else { "128" };
            return Err(Denied {
                ip,
                rule: format!("the relay's own address {ip}/{host}"),
                own: true,
            });
        }
        if allowed {
            return Ok(());
        }
        if let Some(r) = deny {
            return Err(Denied {
                ip,
                rule: format!("{} {}", r.name, r.net),
                own: false,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_deny_the_dangerous_ones() {
        let p = PeerPolicy::new(vec![], vec!["203.0.113.9".parse().expect("ip")]);
        for bad in [
            "127.0.0.1",
            "0.0.0.0",
            "::",
            "::ffff:127.0.0.1",
            "169.254.169.254",
            "10.1.2.3",
            "::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "203.0.113.9",
            "224.0.0.1",
            "100.64.0.1",
        ] {
            let ip: IpAddr = bad.parse().expect("ip");
            assert!(p.check(ip).is_err(), "{bad} should be denied");
        }
        for good in ["8.8.8.8", "2001:4860::8888", "::ffff:1.1.1.1"] {
            assert!(p.check(good.parse().expect("ip")).is_ok(), "{good}");
        }
        let e = p
            .check("::ffff:127.0.0.1".parse().expect("ip"))
            .expect_err("denied");
        assert_eq!(e.ip, "127.0.0.1".parse::<IpAddr>().expect("ip"));
        assert!(e.to_string().contains("--allow-peer 127.0.0.0/8"), "{e}");
    }

    #[test]
    fn allow_never_opens_the_relays_own_addresses() {
        let own: IpAddr = "10.0.0.5".parse().expect("ip");
        let p = PeerPolicy::new(vec!["10.0.0.0/8".parse().expect("net")], vec![own]);
        assert!(p.check("10.0.0.6".parse().expect("ip")).is_ok());
        let e = p.check(own).expect_err("own");
        assert!(e.own, "{e:?}");
        assert!(p.is_own("::ffff:10.0.0.5".parse().expect("ip")));
        // Without the allow, the deny-list reason wins (not even relay-to-relay).
        let p = PeerPolicy::new(vec![], vec![own]);
        assert!(!p.check(own).expect_err("private").own);
    }

    #[test]
    fn source_keys() {
        let k = |s: &str| source_key(s.parse().expect("ip"));
        assert_eq!(k("2001:db8:1:2:3:4:5:6"), k("2001:db8:1:2::"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("::ffff:203.0.113.9"), k("203.0.113.9"));
        assert_ne!(k("203.0.113.9"), k("203.0.113.10"));
    }

    #[test]
    fn allow_opens_a_range() {
        let p = PeerPolicy::new(vec!["10.0.0.0/8".parse().expect("net")], vec![]);
        assert!(p.check("10.1.2.3".parse().expect("ip")).is_ok());
        assert!(p.check("192.168.1.1".parse().expect("ip")).is_err());
    }
}
