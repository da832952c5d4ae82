//! `ice-agent netcheck`: what the network lets this node do, measured
//! against the configured relays (as `tailscale netcheck` answers it).
//!
//! - [`classify`]: observations → RFC 4787 / RFC 5780 names (pure).
//! - [`probe::Prober`]: the UDP STUN probes, sans-IO (time passed in).
//! - [`gateway`]: NAT-PMP / PCP / SSDP requests and bounded parsers (pure).
//! - [`run`] (in `driver.rs`): the tokio driver: sockets, TCP/TLS, the
//!   gateway, all bounded in time.
//!
//! [`NatFacts`] is the part another node can use (mapping, filtering, port
//! allocation, hairpin, port-mapping protocols): small, serde, every field
//! optional, meant to travel sealed with the candidates and to feed each
//! peer's `reason`. [`Report`] adds what only matters here (relay
//! latencies, TCP/TLS reachability, the gateway).

pub mod classify;
pub(crate) mod driver;
pub mod gateway;
pub mod probe;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

pub use driver::{run, Options};

/// Mapping behaviour (RFC 4787 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// No translation: the relays see our own address and port.
    None,
    /// Endpoint-independent: one mapping for every destination.
    EndpointIndependent,
    /// Endpoint-dependent: a new mapping per destination address.
    AddressDependent,
    /// Endpoint-dependent: a new mapping per destination address and port.
    AddressAndPortDependent,
    /// Endpoint-dependent, but whether the port matters was not measured
    /// (no relay with an RFC 5780 alternate port).
    EndpointDependent,
}

impl Mapping {
    /// True for the kinds where each destination gets its own mapping.
    pub fn endpoint_dependent(self) -> bool {
        matches!(
            self,
            Mapping::AddressDependent
                | Mapping::AddressAndPortDependent
                | Mapping::EndpointDependent
        )
    }

    fn describe(self) -> &'static str {
        match self {
            Mapping::None => "none (no NAT: relays see our own address)",
            Mapping::EndpointIndependent => "endpoint-independent",
            Mapping::AddressDependent => "endpoint-dependent (per destination address)",
            Mapping::AddressAndPortDependent => {
                "endpoint-dependent (per destination address and port)"
            }
            Mapping::EndpointDependent => "endpoint-dependent",
        }
    }
}

/// Filtering behaviour (RFC 4787 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// Anyone may send to a mapping.
    EndpointIndependent,
    /// Only addresses we have sent to.
    AddressDependent,
    /// Only address and port pairs we have sent to.
    AddressAndPortDependent,
}

/// How an endpoint-dependent NAT numbers new mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PortAllocation {
    /// Each new mapping is `delta` ports from the previous one (predictable).
    Sequential {
        /// Step between consecutive mappings (e.g. +1).
        delta: i32,
        /// Mappings other flows through the NAT took per minute while we
        /// measured (`None`: none seen). Older agents ignore it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        others_per_min: Option<u32>,
    },
    /// No pattern.
    Random,
}

/// What the gateway offers for port mapping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PortMapping {
    /// UPnP-IGD answered SSDP.
    pub upnp: bool,
    /// NAT-PMP answered on UDP 5351.
    pub nat_pmp: bool,
    /// PCP answered on UDP 5351.
    pub pcp: bool,
}

/// The facts about this node's NAT that other code (and other nodes) use:
/// serialisable into the agent's messages as they are. Every field is
/// optional on the wire (`#[serde(default)]`): `None` means "not measured".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NatFacts {
    /// Any STUN answer over UDP at all.
    pub udp: bool,
    /// Our IPv4 address and port as the first relay saw them.
    pub public_ipv4: Option<SocketAddr>,
    /// Our IPv6 address and port, when a relay is reachable over IPv6.
    pub public_ipv6: Option<SocketAddr>,
    /// Mapping behaviour.
    pub mapping: Option<Mapping>,
    /// For endpoint-dependent mappings: sequential (with its step) or random.
    pub port_allocation: Option<PortAllocation>,
    /// Filtering behaviour (needs a relay with an RFC 5780 alternate address).
    pub filtering: Option<Filtering>,
    /// The mapped port equals the local port.
    pub port_preserved: Option<bool>,
    /// A datagram to our own public address comes back to us.
    pub hairpin: Option<bool>,
    /// Port-mapping protocols on the default gateway (`None`: no gateway).
    pub port_mapping: Option<PortMapping>,
}

/// Largest `nat` JSON a peer may send in a `Facts` message.
pub const MAX_PEER_FACTS: usize = 512;
/// Largest port step believed to be a sequential pattern; a peer claiming
/// more is refused (nobody can predict across such steps).
pub const MAX_DELTA: i32 = 1024;

impl NatFacts {
    /// What peers are told: everything but our public addresses (those
    /// travel as candidates, and a `Facts` message should not repeat them).
    pub fn for_peers(&self) -> NatFacts {
        NatFacts {
            public_ipv4: None,
            public_ipv6: None,
            ..self.clone()
        }
    }

    /// The `nat` field of a `Facts` message.
    pub fn to_wire(&self) -> String {
        serde_json::to_string(&self.for_peers()).expect("NAT facts always serialise")
    }

    /// A peer's `nat` field, checked: at most [`MAX_PEER_FACTS`] bytes of
    /// JSON, known values only, a sequential step within ±[`MAX_DELTA`]
    /// and not 0. Fields this build does not know are ignored (facts may
    /// grow); public addresses are dropped (they come as candidates).
    pub fn from_wire(s: &str) -> Result<NatFacts, String> {
        if s.len() > MAX_PEER_FACTS {
            return Err(format!(
                "NAT facts of {} bytes (at most {MAX_PEER_FACTS})",
                s.len()
            ));
        }
        // serde would also take a JSON array for the struct.
        if !s.trim_start().starts_with('{') {
            return Err("NAT facts are not a JSON object".into());
        }
        let f: NatFacts = serde_json::from_str(s).map_err(|e| format!("NAT facts: {e}"))?;
        if let Some(PortAllocation::Sequential {
            delta,
            others_per_min,
        }) = f.port_allocation
        {
            if delta == 0 || delta.unsigned_abs() > MAX_DELTA.unsigned_abs() {
                return Err(format!(
                    "NAT facts: sequential port step {delta} (needs 1..={MAX_DELTA} either way)"
                ));
            }
            if others_per_min.is_some_and(|r| r > classify::MAX_OTHERS_PER_MIN) {
                return Err(format!(
                    "NAT facts: {} mappings a minute by other flows (at most {})",
                    others_per_min.unwrap_or_default(),
                    classify::MAX_OTHERS_PER_MIN
                ));
            }
        }
        Ok(f.for_peers())
    }

    /// The NAT gives each destination its own mapping (symmetric).
    pub fn symmetric(&self) -> bool {
        self.mapping.is_some_and(Mapping::endpoint_dependent)
    }

    /// One line for status and reasons, e.g. "endpoint-dependent mapping
    /// (sequential ports +1), address-and-port-dependent filtering".
    pub fn summary(&self) -> String {
        if !self.udp {
            return "no UDP".into();
        }
        let mut s = match self.mapping {
            Some(Mapping::None) => "no NAT".to_string(),
            Some(m) => format!("{} mapping", m.describe()),
            None => "mapping unknown".to_string(),
        };
        match self.port_allocation {
            Some(PortAllocation::Sequential {
                delta,
                others_per_min,
            }) if self.symmetric() => {
                let _ = write!(
                    s,
                    ", sequential ports ({delta:+}{})",
                    others(others_per_min)
                );
            }
            Some(PortAllocation::Random) if self.symmetric() => s.push_str(", random ports"),
            _ => {}
        }
        if self.mapping != Some(Mapping::None) {
            match self.filtering {
                Some(Filtering::EndpointIndependent) => {
                    s.push_str(", endpoint-independent filtering")
                }
                Some(Filtering::AddressDependent) => s.push_str(", address-dependent filtering"),
                Some(Filtering::AddressAndPortDependent) => {
                    s.push_str(", address-and-port-dependent filtering")
                }
                None => {}
            }
        }
        if self.hairpin == Some(true) {
            s.push_str(", hairpins");
        }
        s
    }
}

/// The default gateway and what it speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayReport {
    /// Its address.
    pub address: Ipv4Addr,
    /// The interface of the default route.
    pub interface: String,
    /// UPnP-IGD answered SSDP (from the gateway).
    pub upnp: bool,
    /// SERVER of the SSDP answer (printable, at most 128 bytes).
    pub upnp_server: Option<String>,
    /// NAT-PMP answered.
    pub nat_pmp: bool,
    /// The external address NAT-PMP reported.
    pub nat_pmp_external: Option<Ipv4Addr>,
    /// PCP answered.
    pub pcp: bool,
}

/// A TCP or TLS probe of one relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamReport {
    /// Where it went.
    pub addr: SocketAddr,
    /// Connected (and, for TLS, finished the handshake) and got a STUN
    /// Binding answer over the stream.
    pub ok: bool,
    /// Time to connect (TLS: to finish the handshake), milliseconds.
    pub connect_ms: Option<f64>,
    /// Binding round trip over the stream, milliseconds.
    pub rtt_ms: Option<f64>,
    /// TLS only: the certificate was checked against `pin_sha256` or
    /// `ca_file` (`false`: the relay has neither, the handshake was not
    /// authenticated).
    pub verified: Option<bool>,
    /// Why not, when `ok` is false.
    pub error: Option<String>,
}

/// One configured relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayReport {
    /// The relay as configured (scheme, host, port; no credentials).
    pub url: String,
    /// The IPv4 address probed over UDP.
    pub udp_addr: Option<SocketAddr>,
    /// UDP round trip over IPv4, milliseconds.
    pub udp_rtt_ms: Option<f64>,
    /// The IPv6 address probed over UDP.
    pub udp6_addr: Option<SocketAddr>,
    /// UDP round trip over IPv6, milliseconds.
    pub udp6_rtt_ms: Option<f64>,
    /// Its RFC 5780 alternate address (OTHER-ADDRESS), if it has one.
    pub alternate: Option<SocketAddr>,
    /// TCP at the relay's port.
    pub tcp: Option<StreamReport>,
    /// TLS (at the `turns:` port, else 443).
    pub tls: Option<StreamReport>,
    /// Why it could not be probed (e.g. its name did not resolve).
    pub error: Option<String>,
}

/// One mapping sample: where a Binding went and what it reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// The server.
    pub server: SocketAddr,
    /// Our mapped address as it saw it (`None`: no answer).
    pub mapped: Option<SocketAddr>,
}

/// Everything `ice-agent netcheck` found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The NAT facts (what peers may be told).
    pub nat: NatFacts,
    /// The local port the mapping tests used.
    pub local_port: u16,
    /// The agent's configured port was taken (the agent is running), so an
    /// ephemeral port was used.
    pub agent_port_busy: bool,
    /// The mapping samples, in the order their mappings were made.
    pub samples: Vec<Sample>,
    /// The default gateway (`None`: no IPv4 default route via a gateway).
    pub gateway: Option<GatewayReport>,
    /// The lowest-latency relay over UDP (its URL).
    pub preferred_relay: Option<String>,
    /// Every configured relay.
    pub relays: Vec<RelayReport>,
    /// Wall time of the run, milliseconds.
    pub duration_ms: u64,
}

/// Milliseconds with 0.01 ms resolution, for reports.
pub(crate) fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 100_000.0).round() / 100.0
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The report as text, one fact per line.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let n = &r.nat;
    let _ = writeln!(s, "Report:");
    let udp_tested = r
        .relays
        .iter()
        .any(|x| x.udp_addr.is_some() || x.udp6_addr.is_some());
    if n.udp || udp_tested {
        let _ = writeln!(s, "\t* UDP: {}", yes_no(n.udp));
    } else {
        let _ = writeln!(
            s,
            "\t* UDP: not tested (no stun:/turn: relay over UDP with an address)"
        );
    }
    match n.public_ipv4 {
        Some(a) => {
            let _ = writeln!(s, "\t* IPv4: yes, {a}");
        }
        None => {
            let _ = writeln!(s, "\t* IPv4: no");
        }
    }
    match n.public_ipv6 {
        Some(a) => {
            let _ = writeln!(s, "\t* IPv6: yes, {a}");
        }
        None => {
            let _ = writeln!(s, "\t* IPv6: no (no relay answered over IPv6)");
        }
    }
    let unknown = |why: &str| format!("unknown ({why})");
    let mapping = match n.mapping {
        Some(m) => {
            let mut t = m.describe().to_owned();
            match n.port_allocation {
                Some(PortAllocation::Sequential {
                    delta,
                    others_per_min,
                }) => {
                    let _ = write!(
                        t,
                        ", sequential ports ({delta:+}{})",
                        others(others_per_min)
                    );
                }
                Some(PortAllocation::Random) => t.push_str(", random ports"),
                None if m.endpoint_dependent() => t.push_str(", port pattern not measured"),
                None => {}
            }
            t
        }
        None if !n.udp => unknown("no UDP"),
        None => unknown("needs two relays or one with an RFC 5780 alternate address"),
    };
    let _ = writeln!(s, "\t* Mapping: {mapping}");
    let filtering = match n.filtering {
        Some(Filtering::EndpointIndependent) => "endpoint-independent".to_owned(),
        Some(Filtering::AddressDependent) => "address-dependent".to_owned(),
        Some(Filtering::AddressAndPortDependent) => "address-and-port-dependent".to_owned(),
        None if !n.udp => unknown("no UDP"),
        None => unknown("needs a relay with an RFC 5780 alternate address (relay --alt-listen)"),
    };
    let _ = writeln!(s, "\t* Filtering: {filtering}");
    let busy = if r.agent_port_busy {
        " (the agent's port is in use: probed from an ephemeral port)"
    } else {
        ""
    };
    match (n.port_preserved, n.public_ipv4) {
        (Some(p), Some(m)) => {
            let _ = writeln!(
                s,
                "\t* Port preserved: {} (local {}, mapped {}){busy}",
                yes_no(p),
                r.local_port,
                m.port()
            );
        }
        _ => {
            let _ = writeln!(s, "\t* Port preserved: unknown");
        }
    }
    let _ = writeln!(
        s,
        "\t* Hairpinning: {}",
        n.hairpin.map_or("unknown", yes_no)
    );
    match &r.gateway {
        Some(g) => {
            let _ = writeln!(s, "\t* Gateway: {} on {}", g.address, g.interface);
            let upnp = match (&g.upnp, &g.upnp_server) {
                (true, Some(sv)) => format!("yes ({sv})"),
                (b, _) => yes_no(*b).to_owned(),
            };
            let _ = writeln!(s, "\t* UPnP-IGD: {upnp}");
            let pmp = match g.nat_pmp_external {
                Some(ext) if g.nat_pmp => format!("yes (external {ext})"),
                _ => yes_no(g.nat_pmp).to_owned(),
            };
            let _ = writeln!(s, "\t* NAT-PMP: {pmp}");
            let _ = writeln!(s, "\t* PCP: {}", yes_no(g.pcp));
        }
        None => {
            let _ = writeln!(s, "\t* Gateway: none (no IPv4 default route via a gateway)");
        }
    }
    if let Some(p) = &r.preferred_relay {
        let _ = writeln!(s, "\t* Nearest relay: {p}");
    }
    let _ = writeln!(s, "\t* Relays:");
    for relay in &r.relays {
        let _ = writeln!(s, "\t\t- {}", relay.url);
        if let Some(e) = &relay.error {
            let _ = writeln!(s, "\t\t\tnot probed: {e}");
            continue;
        }
        let udp = |addr: Option<SocketAddr>, rtt: Option<f64>, fam: &str| match (addr, rtt) {
            (Some(a), Some(t)) => format!("udp{fam} {a}: {t:.1}ms"),
            (Some(a), None) => format!("udp{fam} {a}: no answer"),
            (None, _) => format!("udp{fam}: no address"),
        };
        let _ = writeln!(s, "\t\t\t{}", udp(relay.udp_addr, relay.udp_rtt_ms, ""));
        if relay.udp6_addr.is_some() {
            let _ = writeln!(s, "\t\t\t{}", udp(relay.udp6_addr, relay.udp6_rtt_ms, "6"));
        }
        if let Some(a) = relay.alternate {
            let _ = writeln!(s, "\t\t\tRFC 5780 alternate address {a}");
        }
        for (name, st) in [("tcp", &relay.tcp), ("tls", &relay.tls)] {
            let Some(st) = st else { continue };
            let line = if st.ok {
                let verified = match st.verified {
                    Some(true) => ", certificate verified",
                    Some(false) => ", certificate NOT verified (no pin_sha256/ca_file)",
                    None => "",
                };
                format!(
                    "{name} {}: {:.1}ms{verified}",
                    st.addr,
                    st.rtt_ms.unwrap_or_default()
                )
            } else {
                format!(
                    "{name} {}: unreachable ({})",
                    st.addr,
                    st.error.as_deref().unwrap_or("no answer")
                )
            };
            let _ = writeln!(s, "\t\t\t{line}");
        }
    }
    let _ = writeln!(s, "\t* Took {} ms", r.duration_ms);
    s
}

/// Our host addresses, for recognising "no NAT".
pub(crate) fn local_ips() -> Vec<IpAddr> {
    crate::gather::interfaces()
        .map(|v| v.into_iter().map(|a| a.net.addr()).collect())
        .unwrap_or_default()
}

/// "; other traffic takes ~N ports/s" for a sequential NAT shared with
/// other flows (empty when none were seen).
fn others(per_min: Option<u32>) -> String {
    match per_min {
        Some(n) if n >= 60 => format!("; other traffic takes ~{} ports/s", n / 60),
        Some(n) if n > 0 => format!("; other traffic takes ~{n} ports/min"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_field_names_are_stable() {
        let facts = NatFacts {
            udp: true,
            public_ipv4: Some("203.0.113.5:40000".parse().expect("addr")),
            mapping: Some(Mapping::AddressAndPortDependent),
            port_allocation: Some(PortAllocation::Sequential {
                delta: 1,
                others_per_min: None,
            }),
            filtering: Some(Filtering::AddressAndPortDependent),
            port_preserved: Some(false),
            hairpin: Some(false),
            port_mapping: Some(PortMapping {
                upnp: true,
                nat_pmp: true,
                pcp: false,
            }),
            ..NatFacts::default()
        };
        let j = serde_json::to_value(&facts).expect("json");
        assert_eq!(j["mapping"], "address-and-port-dependent");
        assert_eq!(j["filtering"], "address-and-port-dependent");
        assert_eq!(j["port_allocation"]["kind"], "sequential");
        assert_eq!(j["port_allocation"]["delta"], 1);
        assert_eq!(j["public_ipv4"], "203.0.113.5:40000");
        assert_eq!(j["port_mapping"]["nat_pmp"], true);
        // Round trip, and a peer's older/newer message with fields missing.
        let back: NatFacts = serde_json::from_value(j).expect("back");
        assert_eq!(back, facts);
        let sparse: NatFacts = serde_json::from_str(r#"{"udp":true}"#).expect("sparse");
        assert_eq!(sparse.mapping, None);
        assert_eq!(
            serde_json::to_value(PortAllocation::Random).expect("json")["kind"],
            "random"
        );
    }

    #[test]
    fn peers_get_facts_without_addresses_and_hostile_ones_are_refused() {
        let ours = NatFacts {
            udp: true,
            public_ipv4: Some("203.0.113.5:40000".parse().expect("addr")),
            mapping: Some(Mapping::AddressAndPortDependent),
            port_allocation: Some(PortAllocation::Sequential {
                delta: 2,
                others_per_min: None,
            }),
            filtering: Some(Filtering::AddressAndPortDependent),
            ..NatFacts::default()
        };
        let wire = ours.to_wire();
        assert!(!wire.contains("203.0.113.5"), "{wire}");
        let back = NatFacts::from_wire(&wire).expect("ours parse");
        assert_eq!(back, ours.for_peers());
        assert!(back.symmetric());
        assert_eq!(
            back.summary(),
            "endpoint-dependent (per destination address and port) mapping, \
             sequential ports (+2), address-and-port-dependent filtering"
        );
        // Addresses a peer sends anyway are dropped; unknown fields ignored.
        let f = NatFacts::from_wire(
            r#"{"udp":true,"public_ipv4":"198.51.100.9:1","future":{"x":[1]},"hairpin":true}"#,
        )
        .expect("lenient");
        assert_eq!((f.public_ipv4, f.hairpin), (None, Some(true)));
        // Refused: too long, not JSON, unknown values, absurd steps.
        let long = format!(r#"{{"udp":true,"pad":"{}"}}"#, "x".repeat(MAX_PEER_FACTS));
        for bad in [
            long.as_str(),
            "[]",
            "[true]",
            "{",
            r#"{"mapping":"teleporting"}"#,
            r#"{"port_allocation":{"kind":"sequential","delta":0}}"#,
            r#"{"port_allocation":{"kind":"sequential","delta":-5000}}"#,
            r#"{"port_allocation":{"kind":"sequential","delta":99999999999}}"#,
            r#"{"port_allocation":{"kind":"sequential","delta":1,"others_per_min":1000001}}"#,
            r#"{"port_allocation":{"kind":"sequential","delta":1,"others_per_min":-1}}"#,
            r#"{"udp":"yes"}"#,
        ] {
            assert!(NatFacts::from_wire(bad).is_err(), "{bad}");
        }
        // A shared sequential NAT: the rate travels and is shown; facts
        // without it (older agents) still parse.
        let shared = NatFacts::from_wire(
            r#"{"udp":true,"mapping":"address-and-port-dependent","port_allocation":{"kind":"sequential","delta":1,"others_per_min":600}}"#,
        )
        .expect("shared");
        assert!(
            shared
                .summary()
                .contains("sequential ports (+1; other traffic takes ~10 ports/s)"),
            "{}",
            shared.summary()
        );
        let old = NatFacts::from_wire(
            r#"{"udp":true,"port_allocation":{"kind":"sequential","delta":1}}"#,
        )
        .expect("old");
        assert_eq!(
            old.port_allocation,
            Some(PortAllocation::Sequential {
                delta: 1,
                others_per_min: None
            })
        );
        let none = NatFacts {
            udp: false,
            ..NatFacts::default()
        };
        assert_eq!(none.summary(), "no UDP");
    }

    #[test]
    fn render_says_one_fact_per_line() {
        let r = Report {
            nat: NatFacts {
                udp: true,
                public_ipv4: Some("203.0.113.5:30001".parse().expect("addr")),
                mapping: Some(Mapping::AddressAndPortDependent),
                port_allocation: Some(PortAllocation::Sequential {
                    delta: 1,
                    others_per_min: None,
                }),
                filtering: Some(Filtering::AddressAndPortDependent),
                port_preserved: Some(false),
                hairpin: Some(false),
                ..NatFacts::default()
            },
            local_port: 51821,
            agent_port_busy: false,
            samples: vec![],
            gateway: None,
            preferred_relay: Some("turn:198.51.100.2:3478".into()),
            relays: vec![RelayReport {
                url: "turn:198.51.100.2:3478".into(),
                udp_addr: Some("198.51.100.2:3478".parse().expect("addr")),
                udp_rtt_ms: Some(0.42),
                udp6_addr: None,
                udp6_rtt_ms: None,
                alternate: Some("198.51.100.3:3479".parse().expect("addr")),
                tcp: Some(StreamReport {
                    addr: "198.51.100.2:3478".parse().expect("addr"),
                    ok: false,
                    connect_ms: None,
                    rtt_ms: None,
                    verified: None,
                    error: Some("timed out".into()),
                }),
                tls: None,
                error: None,
            }],
            duration_ms: 412,
        };
        let t = render(&r);
        assert!(t.contains("* UDP: yes\n"), "{t}");
        assert!(
            t.contains("* Mapping: endpoint-dependent (per destination address and port), sequential ports (+1)\n"),
            "{t}"
        );
        assert!(
            t.contains("* Port preserved: no (local 51821, mapped 30001)\n"),
            "{t}"
        );
        assert!(t.contains("udp 198.51.100.2:3478: 0.4ms\n"), "{t}");
        assert!(
            t.contains("tcp 198.51.100.2:3478: unreachable (timed out)\n"),
            "{t}"
        );
    }
}
