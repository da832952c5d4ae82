//! NAT behaviour discovery (RFC 5780 §4.3 mapping, §4.4 filtering), plus
//! port preservation, hairpinning (§4.5) and UDP reachability, run from a
//! device against a reflector with two addresses and two ports.

use std::fmt;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use serde::Serialize;

use crate::lab::Lab;
use crate::nat::NatPreset;
use crate::reflector::{self, BindingTransport, Change};
use crate::Error;

/// Mapping behaviour (RFC 4787 §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// The reflexive address is the local address: no translation.
    NoNat,
    /// Endpoint-independent mapping.
    Eim,
    /// Address-dependent mapping.
    Adm,
    /// Address-and-port-dependent mapping.
    Apdm,
}

/// Filtering behaviour (RFC 4787 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// Endpoint-independent filtering.
    Eif,
    /// Address-dependent filtering.
    Adf,
    /// Address-and-port-dependent filtering.
    Apdf,
}

/// What the probe found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Classification {
    /// Whether any UDP answer came back from the reflector.
    pub udp: bool,
    /// Whether TCP to port 443 of the reflector works.
    pub tcp443: bool,
    /// Mapping behaviour (`None` without UDP).
    pub mapping: Option<Mapping>,
    /// Filtering behaviour (`None` without UDP).
    pub filtering: Option<Filtering>,
    /// Whether the external port equals the local port.
    pub port_preserving: Option<bool>,
    /// Whether a packet to one's own reflexive address comes back.
    pub hairpin: Option<bool>,
    /// The first reflexive address seen.
    pub mapped: Option<SocketAddr>,
}

impl Classification {
    /// True for the EDM kinds.
    pub fn endpoint_dependent(&self) -> bool {
        matches!(self.mapping, Some(Mapping::Adm | Mapping::Apdm))
    }

    /// The preset this behaviour corresponds to, if any (cgnat reads as
    /// port-restricted from the outside; `symmetric` vs `-sequential` is told
    /// by `sequential`).
    pub fn matches(&self, preset: NatPreset, sequential: bool) -> bool {
        use Filtering::*;
        let m = self.mapping;
        let f = self.filtering;
        let pp = self.port_preserving;
        match preset {
            NatPreset::None => self.udp && m == Some(Mapping::NoNat) && f == Some(Eif),
            NatPreset::FullCone => m == Some(Mapping::Eim) && f == Some(Eif) && pp == Some(true),
            NatPreset::RestrictedCone => {
                m == Some(Mapping::Eim) && f == Some(Adf) && pp == Some(true)
            }
            NatPreset::PortRestricted | NatPreset::Cgnat => {
                m == Some(Mapping::Eim) && f == Some(Apdf) && pp == Some(true)
            }
            NatPreset::Symmetric => {
                self.endpoint_dependent() && f == Some(Apdf) && pp == Some(false) && !sequential
            }
            NatPreset::SymmetricSequential => {
                self.endpoint_dependent() && f == Some(Apdf) && pp == Some(false) && sequential
            }
            NatPreset::UdpBlocked => !self.udp && self.tcp443,
        }
    }
}

impl fmt::Display for Classification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.udp {
            return write!(
                f,
                "udp blocked (tcp443 {})",
                if self.tcp443 { "ok" } else { "blocked" }
            );
        }
        let opt = |b: Option<bool>| match b {
            Some(true) => "yes",
            Some(false) => "no",
            None => "?",
        };
        let mapping = match self.mapping {
            Some(Mapping::NoNat) => "none (no NAT)",
            Some(Mapping::Eim) => "EIM",
            Some(Mapping::Adm) => "ADM (EDM)",
            Some(Mapping::Apdm) => "APDM (EDM)",
            None => "?",
        };
        let filtering = match self.filtering {
            Some(Filtering::Eif) => "EIF",
            Some(Filtering::Adf) => "ADF",
            Some(Filtering::Apdf) => "APDF",
            None => "?",
        };
        write!(
            f,
            "mapping {mapping}, filtering {filtering}, port-preserving {}, hairpin {}",
            opt(self.port_preserving),
            opt(self.hairpin),
        )
    }
}

const T: Duration = Duration::from_millis(400);

/// Runs the full probe from `device` against a reflector at `primary`
/// (first IP, first port) and `alternate` (second IP, second port).
pub fn classify(
    lab: &Lab,
    device: &str,
    transport: &dyn BindingTransport,
    primary: SocketAddr,
    alternate: SocketAddr,
) -> Result<(Classification, bool), Error> {
    let other_port = |a: SocketAddr, b: SocketAddr| SocketAddr::new(a.ip(), b.port());
    let local_ip = lab.ip(device)?;
    let sock = lab.udp_socket(device, 0)?;
    let local_port = sock.local_addr()?.port();
    let tcp443 = match primary.ip() {
        std::net::IpAddr::V4(v4) => reflector::tcp443_probe(lab, device, v4)?.is_some(),
        _ => false,
    };
    let mut c = Classification {
        udp: false,
        tcp443,
        mapping: None,
        filtering: None,
        port_preserving: None,
        hairpin: None,
        mapped: None,
    };
    // Test I: reflexive address towards the primary.
    let Some(r1) = transport.binding(&sock, primary, Change::default(), T)? else {
        return Ok((c, false));
    };
    c.udp = true;
    c.mapped = Some(r1.mapped);
    c.port_preserving = Some(r1.mapped.port() == local_port);
    let mut sequential = false;
    if r1.mapped == SocketAddr::new(local_ip.into(), local_port) {
        c.mapping = Some(Mapping::NoNat);
    } else {
        // Test II: other IP, same port.
        let r2 = transport.binding(&sock, other_port(alternate, primary), Change::default(), T)?;
        // Test III: other IP, other port.
        let r3 = transport.binding(&sock, alternate, Change::default(), T)?;
        c.mapping = match (r2, r3) {
            (Some(r2), _) if r2.mapped == r1.mapped => Some(Mapping::Eim),
            (Some(r2), Some(r3)) if r3.mapped == r2.mapped => Some(Mapping::Adm),
            (Some(r2), Some(r3)) => {
                let p = [r1.mapped.port(), r2.mapped.port(), r3.mapped.port()];
                sequential = p[1].wrapping_sub(p[0]) == 1 && p[2].wrapping_sub(p[1]) == 1;
                Some(Mapping::Apdm)
            }
            _ => None,
        };
    }
    // Filtering on a fresh socket, so tests II/III opened nothing for it.
    let fsock = lab.udp_socket(device, 0)?;
    let both = Change {
        ip: true,
        port: true,
    };
    let port_only = Change {
        ip: false,
        port: true,
    };
    c.filtering = if transport.binding(&fsock, primary, both, T)?.is_some() {
        Some(Filtering::Eif)
    } else if transport.binding(&fsock, primary, port_only, T)?.is_some() {
        Some(Filtering::Adf)
    } else if transport
        .binding(&fsock, primary, Change::default(), T)?
        .is_some()
    {
        Some(Filtering::Apdf)
    } else {
        None
    };
    // Hairpin: a second socket sends to the first one's reflexive address.
    c.hairpin = Some(hairpin(lab, device, &sock, r1.mapped)?);
    Ok((c, sequential))
}

fn hairpin(lab: &Lab, device: &str, target: &UdpSocket, mapped: SocketAddr) -> Result<bool, Error> {
    let s2 = lab.udp_socket(device, 0)?;
    let token: u64 = rand::random();
    let msg = format!("hairpin {token}");
    target.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut buf = [0u8; 1500];
    for _ in 0..4 {
        let _ = s2.send_to(msg.as_bytes(), mapped);
        let deadline = std::time::Instant::now() + Duration::from_millis(100);
        while std::time::Instant::now() < deadline {
            if let Ok((n, _)) = target.recv_from(&mut buf) {
                if &buf[..n] == msg.as_bytes() {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// Checks that an idle mapping lives about as long as configured: asks the
/// reflector to answer after `short` (must arrive) and, on a second mapping,
/// after `long` (must not, when `long` exceeds the timeout). Returns whether
/// each answer arrived.
pub fn mapping_lifetime(
    lab: &Lab,
    device: &str,
    transport: &dyn BindingTransport,
    primary: SocketAddr,
    short: Duration,
    long: Duration,
) -> Result<(bool, bool), Error> {
    let wait = |delay: Duration| -> Result<bool, Error> {
        let s = lab.udp_socket(device, 0)?;
        // Open the mapping, then go idle and ask for a late answer. The
        // opening exchange is set-up, not what is measured: give it time on
        // a loaded machine (retries every 100 ms until an answer).
        transport
            .binding(&s, primary, Change::default(), Duration::from_secs(3))?
            .ok_or_else(|| Error::Probe("no answer from the reflector".into()))?;
        transport.delayed_binding(&s, primary, delay)?;
        s.set_read_timeout(Some(delay + Duration::from_millis(1500)))?;
        let mut buf = [0u8; 1500];
        Ok(s.recv_from(&mut buf).is_ok())
    };
    let (a, b) = std::thread::scope(|sc| {
        let h1 = sc.spawn(|| wait(short));
        let h2 = sc.spawn(|| wait(long));
        (h1.join(), h2.join())
    });
    let a = a.map_err(|_| Error::Probe("thread panicked".into()))??;
    let b = b.map_err(|_| Error::Probe("thread panicked".into()))??;
    Ok((a, b))
}
