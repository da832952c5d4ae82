//! Port-mapping protocols on the default gateway: presence only. Pure
//! request builders and bounded parsers; the driver does the sending.
//!
//! - NAT-PMP (RFC 6886) and PCP (RFC 6887) both listen on UDP 5351 of the
//!   gateway. We send a NAT-PMP "external address" request (2 bytes) and a
//!   PCP ANNOUNCE (24 bytes); the first byte of an answer is its version
//!   (0: NAT-PMP, 2: PCP), so one socket tells both apart. Any well-formed
//!   answer, even an error code, means the protocol is spoken there.
//! - UPnP-IGD: an SSDP M-SEARCH to 239.255.255.250:1900 on the default
//!   route's interface only; a `200` answer from the gateway whose ST or USN
//!   names an Internet Gateway Device (or its WAN connection services) means
//!   present. We do not fetch the device description: presence is all
//!   netcheck reports (mapping creation belongs to the port-mapping work).

use std::net::Ipv4Addr;

/// UDP port of NAT-PMP and PCP servers.
pub const PORT_MAPPING_PORT: u16 = 5351;
/// The SSDP multicast group and port.
pub const SSDP_GROUP: (Ipv4Addr, u16) = (Ipv4Addr::new(239, 255, 255, 250), 1900);
/// Longest header value we keep from an SSDP answer.
const MAX_VALUE: usize = 128;

/// The IPv4 default route: gateway and interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultRoute {
    /// Interface name.
    pub interface: String,
    /// Gateway address.
    pub gateway: Ipv4Addr,
}

/// The IPv4 default route with the lowest metric from the text of
/// `/proc/net/route` (hex, host byte order as the kernel prints it, which
/// is little-endian on every platform we build for). Routes without the
/// gateway flag (point-to-point defaults) have no gateway to ask.
pub fn default_route(proc_net_route: &str) -> Option<DefaultRoute> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    let mut best: Option<(u32, DefaultRoute)> = None;
    for line in proc_net_route.lines().skip(1).take(4096) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let (Some(dest), Some(gw), Some(flags), Some(mask)) =
            (hex(f[1]), hex(f[2]), hex(f[3]), hex(f[7]))
        else {
            continue;
        };
        let metric: u32 = f[6].parse().unwrap_or(u32::MAX);
        if dest != 0 || mask != 0 || flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY {
            continue;
        }
        let gateway = Ipv4Addr::from(gw.swap_bytes());
        if best.as_ref().is_none_or(|(m, _)| metric < *m) {
            best = Some((
                metric,
                DefaultRoute {
                    interface: f[0].chars().take(16).collect(),
                    gateway,
                },
            ));
        }
    }
    best.map(|(_, r)| r)
}

/// NAT-PMP: "what is your external address" (version 0, opcode 0).
pub fn natpmp_request() -> [u8; 2] {
    [0, 0]
}

/// PCP ANNOUNCE (version 2, opcode 0, lifetime 0) from `client`.
pub fn pcp_announce(client: Ipv4Addr) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[0] = 2;
    b[8..24].copy_from_slice(&client.to_ipv6_mapped().octets());
    b
}

/// What an answer on port 5351 says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortMappingAnswer {
    /// A NAT-PMP answer: result code, and the external address when the
    /// answer is a successful external-address response.
    NatPmp {
        /// Result code (0: success).
        result: u16,
        /// The gateway's external address.
        external: Option<Ipv4Addr>,
    },
    /// A PCP answer with its result code.
    Pcp {
        /// Result code (0: success; 1: unsupported version; ...).
        result: u8,
    },
}

/// Parses an answer from port 5351; `None` for anything that is neither
/// a NAT-PMP nor a PCP response.
pub fn parse_port_mapping(b: &[u8]) -> Option<PortMappingAnswer> {
    match *b {
        // NAT-PMP response: version 0, opcode >= 128, result code.
        [0, op, r0, r1, ..] if op >= 128 => {
            let result = u16::from_be_bytes([r0, r1]);
            let external = match b {
                [_, 128, 0, 0, _, _, _, _, a, b2, c, d, ..] => Some(Ipv4Addr::new(*a, *b2, *c, *d)),
                _ => None,
            };
            Some(PortMappingAnswer::NatPmp { result, external })
        }
        // PCP response: version 2, R bit, result code in byte 3; at least
        // the 24-byte common header.
        [2, op, _, result, ..] if op & 0x80 != 0 && b.len() >= 24 => {
            Some(PortMappingAnswer::Pcp { result })
        }
        _ => None,
    }
}

/// SSDP search targets we ask for (IGD v1 and v2).
pub const SSDP_TARGETS: [&str; 2] = [
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
];

/// An M-SEARCH for `target` (MX 1: answer within a second).
pub fn ssdp_search(target: &str) -> String {
    format!(
        "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\nST: {target}\r\n\r\n"
    )
}

/// An SSDP answer naming an Internet Gateway Device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SsdpAnswer {
    /// LOCATION (the description URL), printable ASCII, at most 128 bytes.
    pub location: Option<String>,
    /// SERVER, likewise.
    pub server: Option<String>,
}

/// Parses an SSDP answer (HTTP-like, one datagram); `Some` only for a
/// `200` whose ST or USN names an IGD or its WAN connection services.
pub fn parse_ssdp(b: &[u8]) -> Option<SsdpAnswer> {
    let text = String::from_utf8_lossy(&b[..b.len().min(2048)]);
    let mut lines = text.split("\r\n").take(32);
    let status = lines.next()?;
    let mut parts = status.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") || parts.next()? != "200" {
        return None;
    }
    let mut igd = false;
    let mut out = SsdpAnswer {
        location: None,
        server: None,
    };
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.trim().to_ascii_lowercase().as_str() {
            "st" | "usn" => {
                igd |= v.contains("device:InternetGatewayDevice:")
                    || v.contains("service:WANIPConnection:")
                    || v.contains("service:WANPPPConnection:")
            }
            "location" => out.location = Some(printable(v)),
            "server" => out.server = Some(printable(v)),
            _ => {}
        }
    }
    igd.then_some(out)
}

/// Printable ASCII only, at most [`MAX_VALUE`] bytes (for logs and terminals).
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(MAX_VALUE)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
        wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
        eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
        tun0\t00000000\t00000000\t0001\t0\t0\t50\t00000000\t0\t0\t0\n\
        garbage line\n";

    #[test]
    fn default_route_with_lowest_metric_and_a_gateway() {
        assert_eq!(
            default_route(ROUTES),
            Some(DefaultRoute {
                interface: "eth0".into(),
                gateway: Ipv4Addr::new(192, 168, 0, 1),
            })
        );
        assert_eq!(default_route(""), None);
        assert_eq!(default_route("header\nx 0 0 zz 0 0 0 0\n"), None);
    }

    #[test]
    fn natpmp_and_pcp_answers() {
        let natpmp = [0, 128, 0, 0, 0, 0, 1, 0, 11, 0, 0, 10];
        assert_eq!(
            parse_port_mapping(&natpmp),
            Some(PortMappingAnswer::NatPmp {
                result: 0,
                external: Some(Ipv4Addr::new(11, 0, 0, 10))
            })
        );
        // NAT-PMP server refusing PCP's version: still NAT-PMP.
        assert_eq!(
            parse_port_mapping(&[0, 128, 0, 1, 0, 0, 0, 0]),
            Some(PortMappingAnswer::NatPmp {
                result: 1,
                external: None
            })
        );
        let mut pcp = [0u8; 24];
        pcp[0] = 2;
        pcp[1] = 0x80;
        pcp[3] = 0;
        assert_eq!(
            parse_port_mapping(&pcp),
            Some(PortMappingAnswer::Pcp { result: 0 })
        );
        // Requests, short or odd datagrams are nothing.
        assert_eq!(parse_port_mapping(&natpmp_request()), None);
        assert_eq!(
            parse_port_mapping(&pcp_announce(Ipv4Addr::new(192, 168, 0, 10))),
            None
        );
        assert_eq!(parse_port_mapping(&pcp[..12]), None);
        assert_eq!(parse_port_mapping(&[]), None);
        assert_eq!(parse_port_mapping(&[7, 200, 0, 0]), None);
        let a = pcp_announce(Ipv4Addr::new(192, 168, 0, 10));
        assert_eq!(&a[20..24], &[192, 168, 0, 10]);
        assert_eq!(&a[18..20], &[0xff, 0xff]);
    }

    #[test]
    fn ssdp_answers() {
        let ok = "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n\
                  ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\
                  USN: uuid:3ded2a8e::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\
                  EXT:\r\nSERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1\r\n\
                  LOCATION: http://192.168.1.1:40000/rootDesc.xml\r\n\r\n";
        let a = parse_ssdp(ok.as_bytes()).expect("IGD");
        assert_eq!(
            a.location.as_deref(),
            Some("http://192.168.1.1:40000/rootDesc.xml")
        );
        assert_eq!(
            a.server.as_deref(),
            Some("Debian/12 UPnP/1.1 MiniUPnPd/2.3.1")
        );
        // Not an IGD, not a 200, not text, escape sequences stripped.
        assert_eq!(
            parse_ssdp(b"HTTP/1.1 200 OK\r\nST: urn:schemas-upnp-org:device:MediaServer:1\r\n\r\n"),
            None
        );
        assert_eq!(parse_ssdp(ok.replace("200 OK", "404 Not").as_bytes()), None);
        assert_eq!(parse_ssdp(&[0xff, 0xfe, 0x00]), None);
        assert_eq!(parse_ssdp(b""), None);
        let evil = ok.replace("SERVER: Debian", "SERVER: \x1b[2JDebian");
        let a = parse_ssdp(evil.as_bytes()).expect("IGD");
        assert!(a.server.expect("server").starts_with("[2JDebian"));
        let long = ok.replace("SERVER: Debian", &format!("SERVER: {}", "x".repeat(5000)));
        assert_eq!(
            parse_ssdp(long.as_bytes())
                .expect("IGD")
                .server
                .expect("s")
                .len(),
            128
        );
        assert!(ssdp_search(SSDP_TARGETS[0]).ends_with("\r\n\r\n"));
    }
}
