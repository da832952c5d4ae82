//! What kind of path a candidate pair is, and how `is` should rank our
//! local candidates.
//!
//! The classification is what `ice-agent status` shows and what the path
//! policy in [`crate::session`] compares: a same-LAN pair beats any other
//! direct pair, and any direct pair beats the relay.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use is::{Candidate, CandidateKind};
use serde::{Deserialize, Serialize};

/// The kind of path WireGuard traffic to a peer takes.
///
/// Serialised in lowercase (`"connecting"`, `"lan"`, `"direct"`, `"relay"`),
/// the strings `ice-agent status --json` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// No usable path yet.
    Connecting,
    /// Direct, between host candidates on a network one of our interfaces is on.
    Lan,
    /// Direct across the internet (host, server- or peer-reflexive on both ends).
    Direct,
    /// Through a TURN relay (a relayed candidate on at least one end).
    Relay,
}

impl PathKind {
    /// How good the path is: higher is better (`Lan` > `Direct` > `Relay` > `Connecting`).
    pub fn rank(self) -> u8 {
        match self {
            PathKind::Connecting => 0,
            PathKind::Relay => 1,
            PathKind::Direct => 2,
            PathKind::Lan => 3,
        }
    }

    /// `true` for `Lan` and `Direct`.
    pub fn is_direct(self) -> bool {
        matches!(self, PathKind::Lan | PathKind::Direct)
    }

    /// The lowercase name used in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Connecting => "connecting",
            PathKind::Lan => "lan",
            PathKind::Direct => "direct",
            PathKind::Relay => "relay",
        }
    }
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of classifying a pair: its kind, and for `Lan` the network
/// that made it one (for the status reason, "direct (LAN 10.0.1.0/24)").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification {
    /// The path kind.
    pub kind: PathKind,
    /// The local interface network that contains the remote host candidate
    /// (only for [`PathKind::Lan`]).
    pub lan: Option<IpNet>,
}

/// Classifies a (local candidate, remote candidate) pair.
///
/// - a relayed candidate on either side → [`PathKind::Relay`];
/// - a remote host (or peer-reflexive) address inside one of
///   `local_networks` → [`PathKind::Lan`];
/// - otherwise → [`PathKind::Direct`].
///
/// `local_networks` are the networks of the node's own interfaces (not the
/// WireGuard or overlay ones), e.g. `10.0.1.0/24`.
pub fn classify(
    local_kind: CandidateKind,
    remote_kind: CandidateKind,
    remote_addr: SocketAddr,
    local_networks: &[IpNet],
) -> Classification {
    if local_kind == CandidateKind::Relayed || remote_kind == CandidateKind::Relayed {
        return Classification {
            kind: PathKind::Relay,
            lan: None,
        };
    }
    if matches!(
        remote_kind,
        CandidateKind::Host | CandidateKind::PeerReflexive
    ) {
        let ip = normalise(remote_addr.ip());
        if let Some(net) = local_networks.iter().find(|n| n.contains(&ip)) {
            return Classification {
                kind: PathKind::Lan,
                lan: Some(net.trunc()),
            };
        }
    }
    Classification {
        kind: PathKind::Direct,
        lan: None,
    }
}

/// IPv4-mapped IPv6 addresses compare as IPv4.
pub(crate) fn normalise(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// `true` for addresses that only make sense on a local network: RFC 1918,
/// CGNAT 100.64/10, IPv6 ULA fc00::/7.
pub(crate) fn is_private(ip: IpAddr) -> bool {
    match normalise(ip) {
        IpAddr::V4(v4) => {
            v4.is_private() || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xC0) == 64)
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xFE00) == 0xFC00,
    }
}

/// Local preference for `is` candidates, after Tailscale's path
/// preferences (loopback +50, link-local +30, private +20, IPv6 +10).
///
/// ICE's type preference already orders host > peer-reflexive >
/// server-reflexive > relayed; the local preference orders candidates of the
/// same type. Each type gets its own band of 16 384 values (as `is`'s
/// default does), and inside a band:
///
/// - a host address on a private network (where a same-LAN peer will be
///   found) ranks above a public host address;
/// - IPv6 ranks slightly above IPv4 of the same sort;
/// - every candidate stays unique (`same_kind` steps of 2, as RFC 8445
///   §5.1.2.1 requires);
/// - a server-reflexive address the gateway mapped for us (PCP / NAT-PMP,
///   [`crate::portmap`]) ranks above one learnt by STUN: it takes any
///   sender, where a STUN-learnt one behind a symmetric NAT takes none.
#[derive(Debug, Clone, Copy, Default)]
pub struct WgicePreference {
    /// The port-mapped address, if any.
    pub port_mapped: Option<SocketAddr>,
}

impl WgicePreference {
    /// The preference of candidate `c`, the `same_kind`-th of its type and IP
    /// version added so far (no port mapping known).
    pub fn preference(c: &Candidate, same_kind: usize) -> u32 {
        WgicePreference::default().of(c, same_kind)
    }

    /// The preference of candidate `c`, the `same_kind`-th of its type and IP
    /// version added so far.
    pub fn of(&self, c: &Candidate, same_kind: usize) -> u32 {
        let band_top: u32 = match c.kind() {
            CandidateKind::Host => 65_535,
            CandidateKind::PeerReflexive => 49_151,
            CandidateKind::ServerReflexive => 32_767,
            CandidateKind::Relayed => 16_383,
        };
        let ip = c.addr().ip();
        // Inside a band: 0..=4095 for the kind of address, then the counter.
        let mut penalty: u32 = 0;
        if c.kind() == CandidateKind::Host && !is_private(ip) {
            penalty += 4096; // private (LAN) host addresses first
        }
        if c.kind() == CandidateKind::ServerReflexive && self.port_mapped != Some(c.addr()) {
            penalty += 4096; // port-mapped first
        }
        if !normalise(ip).is_ipv6() {
            penalty += 2048; // IPv6 slightly ahead of IPv4
        }
        if c.kind() == CandidateKind::Relayed && c.local().is_ipv4() != ip.is_ipv4() {
            penalty += 1024; // relaying across IP versions: last resort
        }
        let counter = (same_kind as u32).saturating_mul(2).min(1022);
        band_top - penalty - counter
    }
}

impl is::LocalPreference for WgicePreference {
    fn calculate(&self, c: &Candidate, same_kind: usize) -> u32 {
        self.of(c, same_kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }
    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().expect("test net")).collect()
    }

    #[test]
    fn relayed_on_either_side_is_relay() {
        let n = nets(&["10.0.1.0/24"]);
        for (l, r) in [
            (CandidateKind::Relayed, CandidateKind::Host),
            (CandidateKind::Host, CandidateKind::Relayed),
            (CandidateKind::Relayed, CandidateKind::Relayed),
        ] {
            assert_eq!(
                classify(l, r, sa("10.0.1.7:51820"), &n).kind,
                PathKind::Relay
            );
        }
    }

    #[test]
    fn remote_host_in_our_network_is_lan_with_the_network() {
        let n = nets(&["192.0.2.0/24", "10.0.1.5/24"]);
        let c = classify(
            CandidateKind::Host,
            CandidateKind::Host,
            sa("10.0.1.7:51820"),
            &n,
        );
        assert_eq!(c.kind, PathKind::Lan);
        assert_eq!(c.lan, Some("10.0.1.0/24".parse().expect("net")));
    }

    #[test]
    fn remote_srflx_or_foreign_host_is_direct() {
        let n = nets(&["10.0.1.0/24"]);
        let srflx_in_net = classify(
            CandidateKind::Host,
            CandidateKind::ServerReflexive,
            sa("10.0.1.7:51820"),
            &n,
        );
        assert_eq!(srflx_in_net.kind, PathKind::Direct);
        let other = classify(
            CandidateKind::Host,
            CandidateKind::Host,
            sa("198.51.100.7:4000"),
            &n,
        );
        assert_eq!(other.kind, PathKind::Direct);
    }

    #[test]
    fn ipv4_mapped_remote_matches_ipv4_network() {
        let n = nets(&["10.0.1.0/24"]);
        let c = classify(
            CandidateKind::Host,
            CandidateKind::Host,
            sa("[::ffff:10.0.1.9]:1"),
            &n,
        );
        assert_eq!(c.kind, PathKind::Lan);
    }

    #[test]
    fn preference_orders_private_host_ipv6_and_types() {
        let host = |s| Candidate::host(sa(s), "udp").expect("host");
        let p_priv4 = WgicePreference::preference(&host("10.0.1.5:1"), 0);
        let p_pub4 = WgicePreference::preference(&host("198.51.100.5:1"), 0);
        let p_ula6 = WgicePreference::preference(&host("[fd00::5]:1"), 0);
        let p_pub6 = WgicePreference::preference(&host("[2001:db8::5]:1"), 0);
        assert!(p_ula6 > p_priv4, "IPv6 slightly ahead");
        assert!(p_priv4 > p_pub6, "private (LAN) host ahead of public host");
        assert!(p_pub6 > p_pub4);
        let srflx = Candidate::server_reflexive(sa("198.51.100.9:2"), sa("10.0.1.5:1"), "udp")
            .expect("srflx");
        let relay =
            Candidate::relayed(sa("203.0.113.1:50000"), sa("10.0.1.5:1"), "udp").expect("relay");
        let p_srflx = WgicePreference::preference(&srflx, 0);
        let p_relay = WgicePreference::preference(&relay, 0);
        assert!(p_pub4 > p_srflx && p_srflx > p_relay);
        // The port-mapped server-reflexive address ranks above the STUN one
        // (even when added later), still below host and above relayed.
        let mapped = Candidate::server_reflexive(sa("198.51.100.9:7"), sa("10.0.1.5:1"), "udp")
            .expect("mapped");
        let pref = WgicePreference {
            port_mapped: Some(sa("198.51.100.9:7")),
        };
        let p_mapped = pref.of(&mapped, 1);
        assert!(p_pub4 > p_mapped && p_mapped > pref.of(&srflx, 0) && p_mapped > p_relay);
        assert_eq!(pref.of(&srflx, 0), p_srflx);
        // Unique per candidate of the same kind.
        assert_ne!(
            WgicePreference::preference(&host("10.0.1.5:1"), 0),
            WgicePreference::preference(&host("10.0.2.5:1"), 1)
        );
    }
}
