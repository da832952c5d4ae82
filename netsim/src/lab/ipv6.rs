//! IPv6 in the lab, opt-in per router and public host ([`Lab::enable_ipv6`]):
//! routed, not translated, as ISPs hand it out. The core answers at
//! [`CORE_IP6`] on every IPv6 link; public host addresses are
//! `2001:db8:ff::<last octet of its IPv4 address>`; router *i* has WAN
//! `2001:db8:fe::i` and routes `2001:db8:i::/64` to its LAN (gateway `::1`,
//! devices `::<last octet of their IPv4 address>`), behind a stateful
//! firewall like a home router's (RFC 6092): replies and related packets
//! come in, new inbound flows are dropped, so two devices behind such
//! routers reach each other only by hole punching. [`Lab::make_ipv6_only`]
//! takes a device's IPv4 away.

use std::net::Ipv6Addr;

use super::{Lab, CORE_IP6};
use crate::nat::NatPreset;
use crate::sys::{self, ip_batch};
use crate::Error;

/// The stateful IPv6 firewall of a router with IPv6.
const FIREWALL6: &str = "add table ip6 wgfw6\ndelete table ip6 wgfw6\n\
table ip6 wgfw6 {\n\
  chain forward {\n\
    type filter hook forward priority 0; policy accept;\n\
    ct state established,related accept\n\
    iifname \"wan\" drop\n\
  }\n\
}\n";

fn host6(v4_last: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, v4_last.into())
}

fn wan6(index: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xfe, 0, 0, 0, 0, index.into())
}

/// Address `host` in router `index`'s LAN prefix (`1` is the gateway).
pub(super) fn lan6(index: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, index.into(), 0, 0, 0, 0, host.into())
}

/// Waits (at most 5 s) until no address in these namespaces is still
/// tentative: a link-local address under duplicate address detection holds
/// up neighbour discovery, and with it the first packets, for about 1.5 s.
fn wait_dad(namespaces: &[&str]) -> Result<(), Error> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    for ns in namespaces {
        while !sys::run("ip", &["-n", ns, "-6", "addr", "show", "tentative"])?
            .trim()
            .is_empty()
        {
            if std::time::Instant::now() > deadline {
                return Err(Error::Config(format!(
                    "{ns}: IPv6 addresses still tentative after 5 s"
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    Ok(())
}

impl Lab {
    /// Gives a public host (an address per IPv4 one) or a router (WAN, a
    /// routed /64 and a stateful firewall; its devices, present and later,
    /// get addresses in it) IPv6. Returns the host's or router's WAN
    /// addresses. A `cgnat` router is refused (its IPv6 would bypass the
    /// carrier NAT namespace; not modelled).
    pub fn enable_ipv6(&self, node: &str) -> Result<Vec<Ipv6Addr>, Error> {
        sys::sysctl(&self.inet_ns, "net/ipv6/conf/all/forwarding", "1", false)?;
        let (inet_if, _) = self.inet_link(node)?;
        // (The guard must not live through the `if let`: `ns` locks too.)
        let host_ips = self.lock().hosts.get(node).map(|h| h.ips.clone());
        if let Some(ips) = host_ips {
            let ns = self.ns(node)?;
            let v6: Vec<Ipv6Addr> = ips.iter().map(|ip| host6(ip.octets()[3])).collect();
            let mut inet = vec![format!("addr add {CORE_IP6}/128 dev {inet_if} nodad")];
            let mut host = Vec::new();
            for a in &v6 {
                inet.push(format!("route add {a}/128 dev {inet_if}"));
                host.push(format!("addr add {a}/128 dev eth0 nodad"));
            }
            host.push(format!("route add {CORE_IP6}/128 dev eth0"));
            host.push(format!(
                "route add default via {CORE_IP6} dev eth0 src {}",
                v6[0]
            ));
            ip_batch(Some(&self.inet_ns), &inet)?;
            ip_batch(Some(&ns), &host)?;
            wait_dad(&[&self.inet_ns, &ns])?;
            if let Some(h) = self.lock().hosts.get_mut(node) {
                h.ips6 = v6.clone();
            }
            return Ok(v6);
        }
        let r = self.router(node)?;
        if r.cfg.nat == NatPreset::Cgnat {
            return Err(Error::Config(format!(
                "router {node}: IPv6 behind a cgnat router is not modelled"
            )));
        }
        let (wan, gw) = (wan6(r.index), lan6(r.index, 1));
        ip_batch(
            Some(&self.inet_ns),
            &[
                format!("addr add {CORE_IP6}/128 dev {inet_if} nodad"),
                format!("route add {wan}/128 dev {inet_if}"),
                format!("route add {}/64 via {wan} dev {inet_if}", lan6(r.index, 0)),
            ],
        )?;
        ip_batch(
            Some(&r.ns),
            &[
                format!("addr add {wan}/128 dev wan nodad"),
                format!("route add {CORE_IP6}/128 dev wan"),
                format!("route add default via {CORE_IP6} dev wan"),
                format!("addr add {gw}/64 dev lan nodad"),
            ],
        )?;
        sys::sysctl(&r.ns, "net/ipv6/conf/all/forwarding", "1", false)?;
        sys::nft(&r.ns, FIREWALL6)?;
        wait_dad(&[&self.inet_ns, &r.ns])?;
        let devices: Vec<String> = {
            let mut st = self.lock();
            if let Some(x) = st.routers.get_mut(node) {
                x.ipv6 = true;
            }
            st.devices
                .iter()
                .filter(|(_, d)| d.router == node)
                .map(|(n, _)| n.clone())
                .collect()
        };
        for d in devices {
            self.device_ipv6(&d)?;
        }
        Ok(vec![wan])
    }

    /// Gives device `name` its address in its router's IPv6 prefix.
    pub(super) fn device_ipv6(&self, name: &str) -> Result<Ipv6Addr, Error> {
        let (ns, router, v4) = {
            let st = self.lock();
            let d = st
                .devices
                .get(name)
                .ok_or_else(|| Error::Config(format!("no device {name:?}")))?;
            (d.ns.clone(), d.router.clone(), d.ip)
        };
        let index = self.router(&router)?.index;
        let a = lan6(index, v4.octets()[3]);
        ip_batch(
            Some(&ns),
            &[
                format!("addr add {a}/64 dev eth0 nodad"),
                format!("route add default via {} dev eth0", lan6(index, 1)),
            ],
        )?;
        wait_dad(&[&ns])?;
        if let Some(d) = self.lock().devices.get_mut(name) {
            d.ip6 = Some(a);
        }
        Ok(a)
    }

    /// Takes device `name`'s IPv4 address (and with it its IPv4 routes)
    /// away: it is left with IPv6 (and loopback).
    pub fn make_ipv6_only(&self, name: &str) -> Result<(), Error> {
        let ns = {
            let st = self.lock();
            let d = st
                .devices
                .get(name)
                .ok_or_else(|| Error::Config(format!("no device {name:?}")))?;
            if d.ip6.is_none() {
                return Err(Error::Config(format!(
                    "device {name}: its router has no IPv6 (enable_ipv6 first)"
                )));
            }
            d.ns.clone()
        };
        sys::run("ip", &["-n", &ns, "-4", "addr", "flush", "dev", "eth0"]).map(drop)
    }

    /// A device's or public host's (first) IPv6 address, if it has one.
    pub fn ip6(&self, node: &str) -> Option<Ipv6Addr> {
        let st = self.lock();
        st.devices
            .get(node)
            .and_then(|d| d.ip6)
            .or_else(|| st.hosts.get(node).and_then(|h| h.ips6.first().copied()))
    }
}
