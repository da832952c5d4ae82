//! NAT presets and the nftables rulesets that build them.
//!
//! Every preset is a router namespace with a `wan` interface (towards the
//! internet, or towards the carrier NAT for `cgnat`) and a `lan` bridge. The
//! behaviours follow RFC 4787 (mapping §4.1, filtering §5, hairpinning §6):
//!
//! | preset | mapping | filtering | ports |
//! |---|---|---|---|
//! | `none` | no translation | open | — |
//! | `full-cone` | EIM | EIF | preserved |
//! | `restricted-cone` | EIM | ADF | preserved |
//! | `port-restricted` | EIM | APDF | preserved |
//! | `symmetric` | EDM | APDF | random per flow |
//! | `symmetric-sequential` | EDM | APDF | next port per flow |
//! | `cgnat` | EIM (two NAT44 layers) | APDF | preserved |
//! | `udp-blocked` | EIM, only TCP 443 leaves | APDF | preserved |
//!
//! Linux conntrack gives EIM + APDF by itself (`masquerade` keeps the source
//! port when it is free). Endpoint-independent and address-dependent
//! filtering are not native: every outbound UDP flow records its external port
//! in the `@mapping` map (learned after SNAT from the conntrack reply tuple),
//! and new inbound flows are DNATed through that map — unconditionally for
//! EIF, only from an address the mapping has sent to (`@contacted`) for ADF.
//! The same map gives hairpinning for every preset.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Default idle lifetime of a UDP mapping, seconds (RFC 4787 REQ-5 asks for
/// at least 120 s).
pub const DEFAULT_MAPPING_TIMEOUT_S: u32 = 120;

/// Number of ports the sequential symmetric NAT cycles through.
const SEQUENTIAL_PORTS: u16 = 512;
/// First port of the sequential symmetric NAT.
const SEQUENTIAL_BASE: u16 = 30000;

/// A named NAT behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatPreset {
    /// No NAT: devices get routable addresses, no filtering.
    None,
    /// EIM + EIF (RFC 3489 full cone).
    FullCone,
    /// EIM + ADF (RFC 3489 restricted cone).
    RestrictedCone,
    /// EIM + APDF (RFC 3489 port-restricted cone; plain Linux masquerade).
    PortRestricted,
    /// EDM with a random external port per flow, APDF.
    Symmetric,
    /// EDM where each new flow gets the next external port, APDF: the case
    /// port prediction can beat.
    SymmetricSequential,
    /// Carrier-grade NAT: a port-restricted home NAT behind a port-restricted
    /// carrier NAT (two NAT44 layers, shared address space 100.64/10 between).
    Cgnat,
    /// Only TCP to port 443 may leave; all UDP is dropped.
    UdpBlocked,
}

impl NatPreset {
    /// Every preset, in the order tables list them.
    pub const ALL: [NatPreset; 8] = [
        NatPreset::None,
        NatPreset::FullCone,
        NatPreset::RestrictedCone,
        NatPreset::PortRestricted,
        NatPreset::Symmetric,
        NatPreset::SymmetricSequential,
        NatPreset::Cgnat,
        NatPreset::UdpBlocked,
    ];

    /// The preset's name as written in scenario files and on the CLI.
    pub fn name(self) -> &'static str {
        match self {
            NatPreset::None => "none",
            NatPreset::FullCone => "full-cone",
            NatPreset::RestrictedCone => "restricted-cone",
            NatPreset::PortRestricted => "port-restricted",
            NatPreset::Symmetric => "symmetric",
            NatPreset::SymmetricSequential => "symmetric-sequential",
            NatPreset::Cgnat => "cgnat",
            NatPreset::UdpBlocked => "udp-blocked",
        }
    }

    /// True when the preset translates addresses (every preset but `none`).
    pub fn translates(self) -> bool {
        self != NatPreset::None
    }
}

impl fmt::Display for NatPreset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for NatPreset {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NatPreset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                crate::Error::Config(format!(
                    "unknown NAT preset {s:?}; expected one of: {}",
                    NatPreset::ALL.map(|p| p.name()).join(", ")
                ))
            })
    }
}

/// How one router behaves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// NAT behaviour.
    pub nat: NatPreset,
    /// Whether a LAN device reaching the router's public address and a mapped
    /// port is looped back to the device owning that mapping (RFC 4787 §6).
    #[serde(default)]
    pub hairpin: bool,
    /// Idle lifetime of a UDP mapping, seconds.
    #[serde(default = "default_timeout")]
    pub mapping_timeout_s: u32,
    /// Run a UPnP-IGD / NAT-PMP / PCP gateway (miniupnpd) on the router.
    /// miniupnpd refuses reserved WAN addresses, so such a router's WAN
    /// address comes from 11.0.0.0/24 instead of 203.0.113.0/24 (it is still
    /// only reachable inside the lab).
    #[serde(default)]
    pub upnp: bool,
    /// With `upnp`: NAT-PMP and PCP off, so only UPnP-IGD maps ports (a
    /// gateway of the kind that speaks nothing else).
    #[serde(default)]
    pub upnp_only: bool,
}

fn default_timeout() -> u32 {
    DEFAULT_MAPPING_TIMEOUT_S
}

impl RouterConfig {
    /// A router with `nat`, hairpin off and the default mapping timeout.
    pub fn new(nat: NatPreset) -> Self {
        RouterConfig {
            nat,
            hairpin: false,
            mapping_timeout_s: DEFAULT_MAPPING_TIMEOUT_S,
            upnp: false,
            upnp_only: false,
        }
    }
}

/// What the ruleset generator needs to know about one NAT box.
#[derive(Clone, Debug)]
pub(crate) struct NatBox {
    /// Translation behaviour of this layer (for `cgnat`: `PortRestricted`
    /// on each of its two layers).
    pub(crate) nat: NatPreset,
    pub(crate) hairpin: bool,
    pub(crate) timeout_s: u32,
    /// Address of `wan`.
    pub(crate) wan_ip: Ipv4Addr,
    /// LAN prefix, e.g. `192.168.3.0/24`.
    pub(crate) lan_cidr: String,
    /// A port-mapping gateway runs here: its UDP mappings (map `upnp`,
    /// kept in step with miniupnpd's lease file by the router's watcher)
    /// also translate outbound flows from the mapped internal port, ahead
    /// of the preset's own SNAT — as a gateway that maps a port must, or a
    /// symmetric NAT would still give each destination another port.
    pub(crate) upnp: bool,
}

/// Builds the nftables ruleset for one NAT box (a full replacement: it deletes
/// and recreates table `ip wgnat`).
pub(crate) fn ruleset(b: &NatBox) -> String {
    let t = b.timeout_s.max(1);
    let wan = b.wan_ip;
    let lan = &b.lan_cidr;
    let mut s = String::new();
    // `add` then `delete` makes the delete succeed whether or not it existed.
    s.push_str("add table ip wgnat\ndelete table ip wgnat\n");
    s.push_str("table ip wgnat {\n");
    if b.nat == NatPreset::None {
        s.push_str("}\n");
        return s;
    }
    s.push_str(&format!(
        "  map mapping {{ type inet_service : ipv4_addr . inet_service; flags dynamic,timeout; timeout {t}s; }}\n\
         \x20 set contacted {{ type inet_service . ipv4_addr; flags dynamic,timeout; timeout {t}s; }}\n"
    ));

    // Prerouting: inbound DNAT for EIF/ADF, hairpin from the LAN side.
    s.push_str("  chain nat_pre {\n    type nat hook prerouting priority dstnat; policy accept;\n");
    match b.nat {
        NatPreset::FullCone => {
            s.push_str("    iif \"wan\" meta l4proto udp dnat ip to udp dport map @mapping\n")
        }
        NatPreset::RestrictedCone => s.push_str(
            "    iif \"wan\" udp dport . ip saddr @contacted dnat ip to udp dport map @mapping\n",
        ),
        _ => {}
    }
    if b.hairpin {
        s.push_str(&format!(
            "    iif \"lan\" ip daddr {wan} meta l4proto udp dnat ip to udp dport map @mapping\n"
        ));
    }
    s.push_str("  }\n");

    if b.upnp {
        s.push_str("  map upnp { type ipv4_addr . inet_service : ipv4_addr . inet_service; }\n");
    }
    // Postrouting NAT: the mapping behaviour.
    s.push_str(
        "  chain nat_post {\n    type nat hook postrouting priority srcnat; policy accept;\n",
    );
    if b.upnp {
        s.push_str(
            "    oif \"wan\" meta l4proto udp ip saddr . udp sport @upnp snat ip to ip saddr . udp sport map @upnp\n",
        );
    }
    if b.hairpin {
        s.push_str(&format!(
            "    ip saddr {lan} ip daddr {lan} ct status dnat snat ip to {wan}\n"
        ));
    }
    match b.nat {
        NatPreset::Symmetric => s.push_str("    oif \"wan\" masquerade fully-random\n"),
        NatPreset::SymmetricSequential => {
            // numgen straight into a port is byte-swapped: go through a map.
            let elems: Vec<String> = (0..SEQUENTIAL_PORTS)
                .map(|i| format!("{i} : {}", SEQUENTIAL_BASE + i))
                .collect();
            s.push_str(&format!(
                "    oif \"wan\" meta l4proto udp snat ip to {wan} : numgen inc mod {SEQUENTIAL_PORTS} map {{ {} }}\n",
                elems.join(", ")
            ));
            s.push_str("    oif \"wan\" masquerade fully-random\n");
        }
        _ => s.push_str("    oif \"wan\" masquerade\n"),
    }
    s.push_str("  }\n");

    // Learn mappings after SNAT (external port from the conntrack reply
    // tuple), refreshed by outbound traffic only.
    s.push_str(
        "  chain learn_map {\n    type filter hook postrouting priority srcnat + 10; policy accept;\n\
         \x20   oif \"wan\" meta l4proto udp ct direction original update @mapping { ct reply proto-dst : ct original ip saddr . ct original proto-src }\n\
         \x20   oif \"wan\" meta l4proto udp ct direction reply update @mapping { ct original proto-dst : ct reply ip saddr . ct reply proto-src }\n",
    );
    if b.nat == NatPreset::RestrictedCone {
        s.push_str(
            "    oif \"wan\" meta l4proto udp ct direction original update @contacted { ct reply proto-dst . ip daddr }\n\
             \x20   oif \"wan\" meta l4proto udp ct direction reply update @contacted { ct original proto-dst . ip daddr }\n",
        );
    }
    s.push_str("  }\n");

    // Forward filter: unsolicited WAN traffic is dropped silently.
    s.push_str(
        "  chain filter_forward {\n    type filter hook forward priority filter; policy accept;\n",
    );
    if b.nat == NatPreset::UdpBlocked {
        s.push_str(
            "    iif \"lan\" oif \"wan\" ct state established,related accept\n\
             \x20   iif \"lan\" oif \"wan\" tcp dport 443 accept\n\
             \x20   iif \"lan\" oif \"wan\" drop\n",
        );
    }
    s.push_str(
        "    iif \"wan\" ct state established,related accept\n\
         \x20   iif \"wan\" ct status dnat accept\n\
         \x20   iif \"wan\" drop\n  }\n",
    );
    s.push_str(
        "  chain filter_input {\n    type filter hook input priority filter; policy accept;\n",
    );
    s.push_str("    iif \"wan\" ct state established,related accept\n    iif \"wan\" drop\n");
    if !b.hairpin {
        s.push_str(&format!(
            "    iif \"lan\" ip daddr {wan} meta l4proto udp drop\n"
        ));
    }
    s.push_str("  }\n}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(nat: NatPreset, hairpin: bool) -> String {
        ruleset(&NatBox {
            nat,
            hairpin,
            timeout_s: 30,
            wan_ip: Ipv4Addr::new(203, 0, 113, 11),
            lan_cidr: "192.168.1.0/24".into(),
            upnp: false,
        })
    }

    #[test]
    fn preset_names_round_trip() {
        for p in NatPreset::ALL {
            assert_eq!(p.name().parse::<NatPreset>().ok(), Some(p));
        }
        assert!("cone".parse::<NatPreset>().is_err());
    }

    #[test]
    fn rulesets_carry_each_behaviour() {
        assert!(rules(NatPreset::FullCone, false).contains("iif \"wan\" meta l4proto udp dnat"));
        assert!(rules(NatPreset::RestrictedCone, false).contains("@contacted dnat"));
        let pr = rules(NatPreset::PortRestricted, false);
        assert!(
            !pr.contains("iif \"wan\" meta l4proto udp dnat") && !pr.contains("@contacted dnat")
        );
        assert!(rules(NatPreset::Symmetric, false).contains("masquerade fully-random"));
        assert!(rules(NatPreset::SymmetricSequential, false).contains("numgen inc mod 512 map"));
        assert!(rules(NatPreset::UdpBlocked, false).contains("tcp dport 443 accept"));
        assert!(rules(NatPreset::PortRestricted, true).contains("snat ip to 203.0.113.11"));
        assert!(!rules(NatPreset::PortRestricted, false).contains("snat ip to"));
        assert!(rules(NatPreset::FullCone, false).contains("timeout 30s"));
        let gw = ruleset(&NatBox {
            nat: NatPreset::Symmetric,
            hairpin: false,
            timeout_s: 30,
            wan_ip: Ipv4Addr::new(11, 0, 0, 3),
            lan_cidr: "192.168.1.0/24".into(),
            upnp: true,
        });
        let (pinned, masq) = (
            gw.find("map @upnp")
                .expect("port mappings translate outbound"),
            gw.find("masquerade fully-random").expect("symmetric"),
        );
        assert!(pinned < masq, "mappings come first:\n{gw}");
        // Unsolicited WAN traffic is dropped, never rejected.
        for p in NatPreset::ALL.into_iter().filter(|p| p.translates()) {
            let r = rules(p, false);
            assert!(
                r.contains("iif \"wan\" drop") && !r.contains("reject"),
                "{p}"
            );
        }
    }
}
