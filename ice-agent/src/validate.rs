//! Checks on everything another mesh member controls, applied at the
//! boundary before any of it is used (sans-IO, no allocation on success).
//!
//! A member holds the mesh token, so signaling delivers its offers, but the
//! token proves nothing else: its ICE credentials, candidates, session ids,
//! ports and overlay claims are hostile input. Each refusal has a
//! [`Refusal`] whose [`Refusal::reason`] is the `reason` label of
//! `wgice_dropped_total` and whose `Display` says what was wrong.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// RFC 8445 §5.3: a ufrag has at least 4 ice-chars, a password at least 22.
pub const MIN_UFRAG: usize = 4;
/// See [`MIN_UFRAG`].
pub const MIN_PWD: usize = 22;
/// RFC 8445 allows 256 ice-chars; the STUN encoder of the `is` crate writes
/// at most 128 bytes of USERNAME (`remote-ufrag:local-ufrag`, ours is 16),
/// and panics on more. 64 leaves room and is four times any real ufrag.
pub const MAX_UFRAG: usize = 64;
/// RFC 8445 §5.3 upper bound (the password is only an HMAC key, never
/// encoded).
pub const MAX_PWD: usize = 256;
/// An SDP `candidate:` line: real ones are under 150 bytes.
pub const MAX_CANDIDATE_LINE: usize = 512;

/// Why a member's input was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// ICE ufrag or password outside RFC 8445 §5.3.
    BadCredentials(String),
    /// A candidate line that is too long or does not parse.
    BadCandidate(String),
    /// A candidate address the agent never sends checks to.
    CandidateRefused {
        /// The address.
        addr: SocketAddr,
        /// Which rule refused it.
        rule: &'static str,
    },
    /// A field out of range (session id 0, port 0, …).
    BadField(String),
}

impl Refusal {
    /// The `reason` label of `wgice_dropped_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadCredentials(_) => "bad_credentials",
            Refusal::BadCandidate(_) => "bad_candidate",
            Refusal::CandidateRefused { .. } => "candidate_refused",
            Refusal::BadField(_) => "bad_field",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BadCredentials(s) | Refusal::BadCandidate(s) | Refusal::BadField(s) => {
                f.write_str(s)
            }
            Refusal::CandidateRefused { addr, rule } => {
                write!(f, "candidate {addr} refused: {rule}")
            }
        }
    }
}

fn ice_chars(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// Checks a member's ICE credentials (RFC 8445 §5.3 ice-chars and
/// lengths, within what the STUN encoder accepts).
pub fn ice_credentials(ufrag: &str, pwd: &str) -> Result<(), Refusal> {
    if !(MIN_UFRAG..=MAX_UFRAG).contains(&ufrag.len()) || !ice_chars(ufrag) {
        return Err(Refusal::BadCredentials(format!(
            "ICE ufrag of {} bytes: needs {MIN_UFRAG}..={MAX_UFRAG} ice-chars (A-Z a-z 0-9 + /)",
            ufrag.len()
        )));
    }
    if !(MIN_PWD..=MAX_PWD).contains(&pwd.len()) || !ice_chars(pwd) {
        return Err(Refusal::BadCredentials(format!(
            "ICE password of {} bytes: needs {MIN_PWD}..={MAX_PWD} ice-chars (A-Z a-z 0-9 + /)",
            pwd.len()
        )));
    }
    Ok(())
}

/// Checks a session id and an advertised WireGuard port.
pub fn session_fields(session: u64, wg_port: Option<u16>) -> Result<(), Refusal> {
    if session == 0 {
        return Err(Refusal::BadField("session id 0".into()));
    }
    if wg_port == Some(0) {
        return Err(Refusal::BadField("wg_port 0".into()));
    }
    Ok(())
}

/// Checks a `PunchOffer` / `PunchAnswer`: a port a NAT can give (1024 and
/// up) and a step a sequential NAT can have (non-zero, within
/// ±[`crate::netcheck::MAX_DELTA`]).
pub fn punch_ports(session: u64, port: u16, delta: i32) -> Result<(), Refusal> {
    session_fields(session, None)?;
    if port < 1024 {
        return Err(Refusal::BadField(format!(
            "punch port {port} (needs 1024..=65535)"
        )));
    }
    let max = crate::netcheck::MAX_DELTA;
    if delta == 0 || delta.unsigned_abs() > max.unsigned_abs() {
        return Err(Refusal::BadField(format!(
            "punch port step {delta} (needs 1..={max} either way)"
        )));
    }
    Ok(())
}

/// Checks a `BirthdayReady` / `BirthdayDone`: sockets within
/// 1..=[`crate::birthday::SOCKETS`], probes within
/// 0..=[`crate::birthday::MAX_PROBES`] (what an agent of this build
/// sends; the numbers are only shown).
pub fn birthday_fields(session: u64, sockets: u16, probes: u32) -> Result<(), Refusal> {
    session_fields(session, None)?;
    if sockets == 0 || sockets > crate::birthday::SOCKETS {
        return Err(Refusal::BadField(format!(
            "birthday sockets {sockets} (needs 1..={})",
            crate::birthday::SOCKETS
        )));
    }
    if probes > crate::birthday::MAX_PROBES {
        return Err(Refusal::BadField(format!(
            "birthday probes {probes} (at most {})",
            crate::birthday::MAX_PROBES
        )));
    }
    Ok(())
}

/// Checks the size of a candidate line before it is parsed.
pub fn candidate_line(line: &str) -> Result<(), Refusal> {
    if line.len() > MAX_CANDIDATE_LINE {
        return Err(Refusal::BadCandidate(format!(
            "candidate line of {} bytes (at most {MAX_CANDIDATE_LINE})",
            line.len()
        )));
    }
    Ok(())
}

/// The node's own addresses and ports, which no remote candidate may name.
#[derive(Debug, Clone, Default)]
pub struct OwnAddrs {
    /// Host addresses with their networks (their IPs are ours; an IPv4
    /// network's broadcast address is nobody's).
    pub host: Vec<IpNet>,
    /// Ports of this node's services (agent socket, WireGuard, metrics), for
    /// the refusal message (any port of a host address is refused).
    pub ports: Vec<u16>,
    /// Our other local candidates (server-reflexive, relayed): a peer
    /// naming them would make us check ourselves.
    pub candidates: Vec<SocketAddr>,
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) as the IPv4 address it is (the
/// path classifier's rule).
pub fn canonical(ip: IpAddr) -> IpAddr {
    crate::path::normalise(ip)
}

/// Which rule refuses `ip` as a peer's address on any node (never
/// loopback, unspecified, multicast, broadcast, link-local). Private ranges
/// pass: LAN paths need them.
pub fn never_a_peer(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            if v4.is_unspecified() || v4.octets()[0] == 0 {
                Some("unspecified address (0.0.0.0/8)")
            } else if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_multicast() {
                Some("multicast")
            } else if v4 == Ipv4Addr::BROADCAST {
                Some("broadcast")
            } else if v4.is_link_local() {
                Some("IPv4 link-local (169.254.0.0/16, cloud metadata)")
            } else if v4.octets()[0] >= 240 {
                Some("reserved (240.0.0.0/4)")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unspecified() {
                Some("unspecified address (::)")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if v6.segments()[0] & 0xffc0 == 0xfe80 {
                Some("IPv6 link-local (fe80::/10, needs a scope a candidate cannot carry)")
            } else if is_v4_compatible(v6) {
                Some("IPv4-compatible IPv6 (::a.b.c.d, deprecated)")
            } else {
                None
            }
        }
    }
}

fn is_v4_compatible(v6: Ipv6Addr) -> bool {
    let s = v6.segments();
    s[..6].iter().all(|x| *x == 0)
}

/// Checks a remote candidate's address before any check is sent to it.
pub fn candidate_addr(addr: SocketAddr, own: &OwnAddrs) -> Result<(), Refusal> {
    let refuse = |rule| Err(Refusal::CandidateRefused { addr, rule });
    if addr.port() == 0 {
        return refuse("port 0");
    }
    let ip = canonical(addr.ip());
    if let Some(rule) = never_a_peer(ip) {
        return refuse(rule);
    }
    for net in &own.host {
        if let (IpNet::V4(n), IpAddr::V4(v4)) = (net, ip) {
            if n.prefix_len() < 31 && n.broadcast() == v4 {
                return refuse("the broadcast address of one of our networks");
            }
        }
        if canonical(net.addr()) == ip {
            return refuse(if own.ports.contains(&addr.port()) {
                "one of this node's own service ports (WireGuard, agent, metrics)"
            } else {
                "one of this node's own addresses"
            });
        }
    }
    if own
        .candidates
        .iter()
        .any(|c| canonical(c.ip()) == ip && c.port() == addr.port())
    {
        return refuse("one of this node's own candidates");
    }
    Ok(())
}

/// A member's name (from its certificate): 1 to 63 characters of
/// `a-z A-Z 0-9 . _ -`, starting with a letter or digit, so it is safe in a
/// status table, a log line and a Prometheus label.
pub fn member_name(name: &str) -> Result<(), Refusal> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Refusal::BadField(format!(
            "name {:?}: use 1-63 characters of a-z A-Z 0-9 . _ - starting with a letter or digit",
            name.chars().take(70).collect::<String>()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> OwnAddrs {
        OwnAddrs {
            host: vec!["192.168.1.10/24".parse().expect("net")],
            ports: vec![51820, 51821, 9586],
            candidates: vec!["203.0.113.5:40000".parse().expect("addr")],
        }
    }

    #[test]
    fn credentials_follow_rfc_8445_and_the_encoder() {
        let pwd = "a".repeat(22);
        assert!(ice_credentials("abcd", &pwd).is_ok());
        assert!(ice_credentials("ab+/", &"Z9+/".repeat(6)).is_ok());
        assert!(ice_credentials("abc", &pwd).is_err());
        assert!(ice_credentials(&"a".repeat(MAX_UFRAG), &pwd).is_ok());
        // The length that used to panic the `is` encoder.
        assert!(ice_credentials(&"a".repeat(200), &pwd).is_err());
        assert!(ice_credentials("ab:d", &pwd).is_err());
        assert!(ice_credentials("abcd", &"a".repeat(21)).is_err());
        assert!(ice_credentials("abcd", &"a".repeat(257)).is_err());
        assert!(ice_credentials("abcd", &format!("{}\n", "a".repeat(22))).is_err());
        assert!(ice_credentials("äbcd", &pwd).is_err());
    }

    #[test]
    fn candidates_never_aim_at_special_or_own_addresses() {
        let o = own();
        let refused = [
            "127.0.0.1:51820",
            "[::1]:1",
            "0.0.0.0:3478",
            "0.1.2.3:3478",
            "[::]:3478",
            "224.0.0.1:5000",
            "[ff02::1]:5000",
            "255.255.255.255:5000",
            "192.168.1.255:5000",
            "169.254.169.254:80",
            "[fe80::1]:5000",
            "[::ffff:127.0.0.1]:5000",
            "[::ffff:169.254.169.254]:80",
            "[::127.0.0.1]:5000",
            "192.168.1.10:51820",
            "192.168.1.10:9586",
            "[::ffff:192.168.1.10]:51821",
            "203.0.113.5:40000",
            "198.51.100.1:0",
            "240.0.0.1:5000",
            "192.168.1.10:40000",
        ];
        for a in refused {
            let addr: SocketAddr = a.parse().expect("addr");
            assert!(candidate_addr(addr, &o).is_err(), "{a} must be refused");
        }
        let allowed = [
            "192.168.1.11:51820",
            "10.0.0.5:51820",
            "172.16.0.1:5000",
            "100.64.0.1:5000",
            "203.0.113.5:40001",
            "[2001:db8::1]:5000",
            "[fd00::1]:5000",
        ];
        for a in allowed {
            let addr: SocketAddr = a.parse().expect("addr");
            assert!(candidate_addr(addr, &o).is_ok(), "{a} must be allowed");
        }
    }

    #[test]
    fn names_are_safe_labels() {
        assert!(member_name("db-1").is_ok());
        assert!(member_name("node.eu-west_2").is_ok());
        for bad in ["", "-x", "a b", "a\"b", "a\nb", &"x".repeat(64), "ünï"] {
            assert!(member_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fields() {
        assert!(session_fields(0, None).is_err());
        assert!(session_fields(1, Some(0)).is_err());
        assert!(session_fields(1, Some(51820)).is_ok());
        assert!(candidate_line(&"x".repeat(600)).is_err());
    }
}
