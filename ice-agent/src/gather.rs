//! Host candidates: the node's own interface addresses.
//!
//! Every up, non-loopback interface contributes its addresses, except
//! WireGuard and overlay interfaces (the overlay must never carry its own
//! underlay: a candidate on `wg0` would route WireGuard through itself) and
//! link-local IPv6. The interface networks also tell the path policy which
//! remote host candidates share a LAN segment with us.

use std::net::IpAddr;

use ipnet::IpNet;

/// One address of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    /// Interface name.
    pub name: String,
    /// The address and its prefix (the LAN segment).
    pub net: IpNet,
    /// Interface flags said up.
    pub up: bool,
    /// Interface flags said loopback.
    pub loopback: bool,
}

/// Interface names never used for candidates: WireGuard and common overlay
/// and container bridge devices, plus whatever the config names.
const DEFAULT_EXCLUDED_PREFIXES: &[&str] = &[
    "wg",
    "tailscale",
    "nb-",
    "wt",
    "utun",
    "zt",
    "cilium_wg",
    "flannel-wg",
    "kilo",
];

/// Which interface addresses become host candidates.
#[derive(Debug, Clone, Default)]
pub struct HostFilter {
    /// Extra interface names (exact) to exclude, e.g. the managed WireGuard interface.
    pub exclude: Vec<String>,
    /// Networks never used (e.g. the overlay's own range).
    pub exclude_nets: Vec<IpNet>,
}

impl HostFilter {
    /// Why an address is not a candidate, or `None` when it is one.
    pub fn rejects(&self, a: &IfAddr) -> Option<&'static str> {
        if !a.up {
            return Some("interface down");
        }
        if a.loopback || a.net.addr().is_loopback() {
            return Some("loopback");
        }
        if self.exclude.contains(&a.name) {
            return Some("excluded by config");
        }
        if DEFAULT_EXCLUDED_PREFIXES
            .iter()
            .any(|p| a.name.starts_with(p))
        {
            return Some("WireGuard/overlay interface");
        }
        if let IpAddr::V6(v6) = a.net.addr() {
            if v6.segments()[0] & 0xffc0 == 0xfe80 {
                return Some("IPv6 link-local");
            }
        }
        if a.net.addr().is_unspecified() || a.net.addr().is_multicast() {
            return Some("not unicast");
        }
        if self.exclude_nets.iter().any(|n| n.contains(&a.net.addr())) {
            return Some("inside an excluded network (overlay range)");
        }
        None
    }

    /// The addresses that become host candidates.
    pub fn candidates<'a>(&self, all: &'a [IfAddr]) -> Vec<&'a IfAddr> {
        all.iter().filter(|a| self.rejects(a).is_none()).collect()
    }
}

/// Lists this network namespace's interface addresses (getifaddrs).
pub fn interfaces() -> std::io::Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated C string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr / ifa_netmask point at sockaddrs of the family given.
        let (addr, mask) = unsafe { (sockaddr_ip(ifa.ifa_addr), sockaddr_ip(ifa.ifa_netmask)) };
        let Some(addr) = addr else { continue };
        let prefix = match mask {
            Some(IpAddr::V4(m)) => u32::from(m).count_ones() as u8,
            Some(IpAddr::V6(m)) => u128::from(m).count_ones() as u8,
            None => {
                if addr.is_ipv4() {
                    32
                } else {
                    128
                }
            }
        };
        let Ok(net) = IpNet::new(addr, prefix) else {
            continue;
        };
        let flags = ifa.ifa_flags;
        out.push(IfAddr {
            name,
            net,
            up: flags & libc::IFF_UP as u32 != 0,
            loopback: flags & libc::IFF_LOOPBACK as u32 != 0,
        });
    }
    // SAFETY: frees the list returned by getifaddrs exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// # Safety
/// `sa` must be null or point at a valid sockaddr of the family it names.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: the caller guarantees `sa` is valid; the family selects the type.
    unsafe {
        match (*sa).sa_family as i32 {
            libc::AF_INET => {
                let sin = &*(sa as *const libc::sockaddr_in);
                Some(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
            }
            libc::AF_INET6 => {
                let sin6 = &*(sa as *const libc::sockaddr_in6);
                Some(IpAddr::from(sin6.sin6_addr.s6_addr))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(name: &str, net: &str) -> IfAddr {
        IfAddr {
            name: name.into(),
            net: net.parse().expect("net"),
            up: true,
            loopback: false,
        }
    }

    #[test]
    fn filter_keeps_lan_drops_overlay_loopback_linklocal() {
        let f = HostFilter {
            exclude: vec!["mesh0".into()],
            exclude_nets: vec!["100.96.0.0/12".parse().expect("net")],
        };
        let all = vec![
            a("eth0", "10.0.1.5/24"),
            a("eth0", "2001:db8::5/64"),
            a("eth0", "fe80::1/64"),
            a("wg0", "10.8.0.1/24"),
            a("tailscale0", "100.100.1.1/32"),
            a("mesh0", "192.168.9.1/24"),
            a("eth1", "100.97.0.2/16"),
            IfAddr {
                loopback: true,
                ..a("lo", "127.0.0.1/8")
            },
            IfAddr {
                up: false,
                ..a("eth2", "172.16.0.2/16")
            },
        ];
        let kept: Vec<String> = f
            .candidates(&all)
            .iter()
            .map(|a| a.net.to_string())
            .collect();
        assert_eq!(kept, vec!["10.0.1.5/24", "2001:db8::5/64"]);
        assert_eq!(f.rejects(&all[3]), Some("WireGuard/overlay interface"));
        assert_eq!(
            f.rejects(&all[6]),
            Some("inside an excluded network (overlay range)")
        );
    }

    #[test]
    fn lists_this_namespace() {
        let all = interfaces().expect("getifaddrs");
        // The test host's namespace has `lo` up with 127.0.0.1/8, and the
        // filter never offers it as a candidate.
        let lo = all
            .iter()
            .find(|a| a.net.addr() == IpAddr::from([127, 0, 0, 1]))
            .unwrap_or_else(|| panic!("no 127.0.0.1 among {all:?}"));
        assert!(lo.loopback && lo.up, "{lo:?}");
        assert_eq!(lo.net.prefix_len(), 8);
        assert_eq!(lo.name, "lo");
        assert_eq!(HostFilter::default().rejects(lo), Some("loopback"));
        assert!(HostFilter::default()
            .candidates(&all)
            .iter()
            .all(|a| !a.net.addr().is_loopback()));
    }
}
