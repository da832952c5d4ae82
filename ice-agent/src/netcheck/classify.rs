//! From observations to names: pure functions, no I/O, no clock.
//!
//! The prober ([`super::probe`]) records what came back; these functions
//! turn it into the RFC 4787 / RFC 5780 vocabulary. Each one says "not
//! measured" (`None`) rather than guess when the observations do not
//! decide.

use std::net::{IpAddr, SocketAddr};

use super::{Filtering, Mapping, PortAllocation};

/// One mapping observation: the server a Binding request went to (in the
/// order the first request to each server left the socket), the mapped
/// address it reported (`None` when it never answered), and when its first
/// request left, in milliseconds after the first sample's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappingSample {
    /// Where the request went.
    pub server: SocketAddr,
    /// XOR-MAPPED-ADDRESS of the answer.
    pub mapped: Option<SocketAddr>,
    /// When the mapping was made, ms after the first sample's.
    pub at_ms: u64,
}

/// Mapping behaviour (RFC 4787 §4.1) from the samples of one local socket
/// bound to `local_port`, whose host addresses are `local_ips`.
///
/// - no answer: `None`;
/// - the mapped address is one of ours with our port: [`Mapping::None`];
/// - fewer than two servers answered: `None` (one server cannot tell);
/// - every answer the same: [`Mapping::EndpointIndependent`];
/// - otherwise endpoint-dependent: address-dependent when every pair of
///   servers on the same IP (different ports) saw the same mapping, and
///   address-and-port-dependent when one such pair did not; with no two
///   servers on one IP, [`Mapping::EndpointDependent`].
pub fn mapping(
    local_port: u16,
    local_ips: &[IpAddr],
    samples: &[MappingSample],
) -> Option<Mapping> {
    let answered: Vec<(SocketAddr, SocketAddr)> = samples
        .iter()
        .filter_map(|s| s.mapped.map(|m| (s.server, m)))
        .collect();
    let (_, first) = *answered.first()?;
    if first.port() == local_port && local_ips.contains(&first.ip()) {
        return Some(Mapping::None);
    }
    if answered.len() < 2 {
        return None;
    }
    if answered.iter().all(|(_, m)| *m == first) {
        return Some(Mapping::EndpointIndependent);
    }
    let mut same_ip_pairs = 0;
    for (i, (sa, ma)) in answered.iter().enumerate() {
        for (sb, mb) in &answered[i + 1..] {
            if sa.ip() == sb.ip() && sa.port() != sb.port() {
                same_ip_pairs += 1;
                if ma != mb {
                    return Some(Mapping::AddressAndPortDependent);
                }
            }
        }
    }
    Some(if same_ip_pairs > 0 {
        Mapping::AddressDependent
    } else {
        Mapping::EndpointDependent
    })
}

/// Largest step between consecutive new mappings still called sequential.
pub const MAX_SEQUENTIAL_DELTA: i32 = 16;

/// Most mappings other flows may take between two of ours (per step) for
/// the NAT to still count as sequential.
pub const MAX_SKIPPED_PER_STEP: i32 = 16;

/// How an endpoint-dependent NAT picks the port of each new mapping, from
/// the samples in the order their mappings were created. Needs at least
/// three answers (two steps); unanswered samples still count as a mapping
/// the NAT made, so the step is checked against the position in the order.
///
/// Sequential with step `delta` (non-zero, at most [`MAX_SEQUENTIAL_DELTA`]
/// either way) when every answer lies `delta` × (positions apart + skipped)
/// from the previous one, where `skipped` (at most
/// [`MAX_SKIPPED_PER_STEP`]) counts mappings other flows through the NAT
/// took in between: a sequential NAT shared with other traffic is still
/// sequential. Of the steps that fit, the one that needs the fewest skipped
/// mappings wins; the skipped ones over the time the samples span give
/// `others_per_min`. Else random. `None` for endpoint-independent mappings
/// (nothing to predict) and when there are too few answers.
pub fn port_allocation(
    mapping: Option<Mapping>,
    samples: &[MappingSample],
) -> Option<PortAllocation> {
    if !mapping.is_some_and(Mapping::endpoint_dependent) {
        return None;
    }
    let ports: Vec<(i32, i32, u64)> = samples
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.mapped.map(|m| (i as i32, i32::from(m.port()), s.at_ms)))
        .collect();
    if ports.len() < 3 {
        return None;
    }
    // Ports skipped with step `d`, if every step fits.
    let skipped = |d: i32| -> Option<i32> {
        let mut total = 0;
        for w in ports.windows(2) {
            let ((i0, p0, _), (i1, p1, _)) = (w[0], w[1]);
            let (span, diff) = (i1 - i0, p1 - p0);
            if diff % d != 0 {
                return None;
            }
            let extra = diff / d - span;
            if !(0..=MAX_SKIPPED_PER_STEP).contains(&extra) {
                return None;
            }
            total += extra;
        }
        Some(total)
    };
    let best = (1..=MAX_SEQUENTIAL_DELTA)
        .flat_map(|d| [d, -d])
        .filter_map(|d| skipped(d).map(|n| (n, d)))
        .min_by_key(|&(n, d)| (n, -d.abs()));
    let Some((skipped, delta)) = best else {
        return Some(PortAllocation::Random);
    };
    let first = ports.first().map_or(0, |p| p.2);
    let last = ports.last().map_or(0, |p| p.2);
    let span_ms = last.saturating_sub(first);
    let others_per_min = (skipped > 0 && span_ms > 0)
        .then(|| (skipped as u64 * 60_000 / span_ms).min(u64::from(MAX_OTHERS_PER_MIN)) as u32);
    Some(PortAllocation::Sequential {
        delta,
        others_per_min,
    })
}

/// The largest rate of other flows' mappings reported (a million a minute).
pub const MAX_OTHERS_PER_MIN: u32 = 1_000_000;

/// What one filtering test saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestOutcome {
    /// Not run (no relay with an alternate address, or no UDP).
    NotRun,
    /// A success answer arrived (from the address the test asked for).
    Answered,
    /// The server answered with an error (e.g. 420: no CHANGE-REQUEST).
    Refused,
    /// Nothing came back before the test gave up.
    Silent,
}

/// Filtering behaviour (RFC 5780 §4.4) from three Binding requests sent
/// from one fresh socket to the same server: without CHANGE-REQUEST
/// (`plain`), asking for an answer from the other port (`change_port`), and
/// from the other IP and port (`change_both`).
pub fn filtering(
    plain: TestOutcome,
    change_port: TestOutcome,
    change_both: TestOutcome,
) -> Option<Filtering> {
    use TestOutcome::*;
    if plain != Answered {
        return None;
    }
    match (change_both, change_port) {
        (Answered, _) => Some(Filtering::EndpointIndependent),
        (Silent, Answered) => Some(Filtering::AddressDependent),
        (Silent, Silent) => Some(Filtering::AddressAndPortDependent),
        _ => None,
    }
}

/// Port preservation: the first answer's mapped port equals the local port.
pub fn port_preserved(local_port: u16, samples: &[MappingSample]) -> Option<bool> {
    samples
        .iter()
        .find_map(|s| s.mapped)
        .map(|m| m.port() == local_port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn samples(pairs: &[(&str, Option<&str>)]) -> Vec<MappingSample> {
        pairs
            .iter()
            .enumerate()
            .map(|(i, (s, m))| MappingSample {
                server: sa(s),
                mapped: m.map(sa),
                at_ms: 10 * i as u64,
            })
            .collect()
    }

    const LOCAL: [IpAddr; 1] = [IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 1, 10))];

    #[test]
    fn no_answer_is_unknown() {
        let s = samples(&[("198.51.100.2:3478", None), ("198.51.100.3:3478", None)]);
        assert_eq!(mapping(5000, &LOCAL, &s), None);
        assert_eq!(port_preserved(5000, &s), None);
    }

    #[test]
    fn own_address_is_no_nat() {
        let s = samples(&[("198.51.100.2:3478", Some("192.168.1.10:5000"))]);
        assert_eq!(mapping(5000, &LOCAL, &s), Some(Mapping::None));
        assert_eq!(port_preserved(5000, &s), Some(true));
    }

    #[test]
    fn one_server_cannot_tell() {
        let s = samples(&[("198.51.100.2:3478", Some("203.0.113.5:5000"))]);
        assert_eq!(mapping(5000, &LOCAL, &s), None);
    }

    #[test]
    fn same_mapping_everywhere_is_endpoint_independent() {
        let s = samples(&[
            ("198.51.100.2:3478", Some("203.0.113.5:5000")),
            ("198.51.100.3:3478", Some("203.0.113.5:5000")),
            ("198.51.100.3:3479", Some("203.0.113.5:5000")),
            ("198.51.100.9:3478", None),
        ]);
        let m = mapping(5000, &LOCAL, &s);
        assert_eq!(m, Some(Mapping::EndpointIndependent));
        assert_eq!(port_allocation(m, &s), None);
        assert_eq!(port_preserved(5000, &s), Some(true));
        assert_eq!(port_preserved(5001, &s), Some(false));
    }

    #[test]
    fn per_address_mapping_is_address_dependent() {
        let s = samples(&[
            ("198.51.100.2:3478", Some("203.0.113.5:40000")),
            ("198.51.100.3:3478", Some("203.0.113.5:40001")),
            ("198.51.100.3:3479", Some("203.0.113.5:40001")),
        ]);
        assert_eq!(mapping(5000, &LOCAL, &s), Some(Mapping::AddressDependent));
    }

    #[test]
    fn per_port_mapping_is_address_and_port_dependent() {
        let s = samples(&[
            ("198.51.100.2:3478", Some("203.0.113.5:40000")),
            ("198.51.100.3:3478", Some("203.0.113.5:40001")),
            ("198.51.100.3:3479", Some("203.0.113.5:40002")),
            ("198.51.100.2:3479", Some("203.0.113.5:40003")),
        ]);
        let m = mapping(5000, &LOCAL, &s);
        assert_eq!(m, Some(Mapping::AddressAndPortDependent));
        assert_eq!(
            port_allocation(m, &s),
            Some(PortAllocation::Sequential {
                delta: 1,
                others_per_min: None
            })
        );
    }

    #[test]
    fn distinct_ips_only_is_endpoint_dependent() {
        let s = samples(&[
            ("198.51.100.2:3478", Some("203.0.113.5:40000")),
            ("198.51.100.3:3478", Some("203.0.113.5:40001")),
        ]);
        assert_eq!(mapping(5000, &LOCAL, &s), Some(Mapping::EndpointDependent));
    }

    #[test]
    fn sequential_with_gaps_and_negative_steps() {
        // The second server never answered, but its mapping was made.
        let s = samples(&[
            ("198.51.100.2:3478", Some("203.0.113.5:40010")),
            ("198.51.100.3:3478", None),
            ("198.51.100.3:3479", Some("203.0.113.5:40006")),
            ("198.51.100.2:3479", Some("203.0.113.5:40004")),
        ]);
        let m = Some(Mapping::AddressAndPortDependent);
        assert_eq!(
            port_allocation(m, &s),
            Some(PortAllocation::Sequential {
                delta: -2,
                others_per_min: None
            })
        );
    }

    #[test]
    fn random_ports_and_too_few_answers() {
        let s = samples(&[
            ("198.51.100.2:3478", Some("203.0.113.5:51234")),
            ("198.51.100.3:3478", Some("203.0.113.5:18003")),
            ("198.51.100.3:3479", Some("203.0.113.5:33333")),
        ]);
        let m = Some(Mapping::AddressAndPortDependent);
        assert_eq!(port_allocation(m, &s), Some(PortAllocation::Random));
        // Two steps that fit no common step are random; one step alone
        // says nothing.
        let s2 = samples(&[
            ("198.51.100.2:3478", Some("203.0.113.5:40000")),
            ("198.51.100.3:3478", Some("203.0.113.5:40002")),
            ("198.51.100.3:3479", Some("203.0.113.5:40005")),
        ]);
        assert_eq!(
            port_allocation(m, &s2),
            Some(PortAllocation::Sequential {
                delta: 1,
                others_per_min: Some(3 * 60_000 / 20)
            })
        );
        let s2r = samples(&[
            ("198.51.100.2:3478", Some("203.0.113.5:40000")),
            ("198.51.100.3:3478", Some("203.0.113.5:40030")),
            ("198.51.100.3:3479", Some("203.0.113.5:40001")),
        ]);
        assert_eq!(port_allocation(m, &s2r), Some(PortAllocation::Random));
        assert_eq!(port_allocation(m, &s2[..2]), None);
        // A big constant step is not something to predict on.
        let s3 = samples(&[
            ("198.51.100.2:3478", Some("203.0.113.5:1000")),
            ("198.51.100.3:3478", Some("203.0.113.5:2000")),
            ("198.51.100.3:3479", Some("203.0.113.5:3000")),
        ]);
        assert_eq!(port_allocation(m, &s3), Some(PortAllocation::Random));
        // Uneven spans: 3 positions apart by 2 ports is not an integer step.
        let s4 = samples(&[
            ("198.51.100.2:3478", Some("203.0.113.5:40000")),
            ("198.51.100.3:3478", None),
            ("198.51.100.3:3479", None),
            ("198.51.100.2:3479", Some("203.0.113.5:40002")),
            ("198.51.100.4:3479", Some("203.0.113.5:40004")),
        ]);
        assert_eq!(port_allocation(m, &s4), Some(PortAllocation::Random));
    }

    #[test]
    fn filtering_follows_rfc5780() {
        use TestOutcome::*;
        assert_eq!(
            filtering(Answered, Answered, Answered),
            Some(Filtering::EndpointIndependent)
        );
        assert_eq!(
            filtering(Answered, Silent, Answered),
            Some(Filtering::EndpointIndependent)
        );
        assert_eq!(
            filtering(Answered, Answered, Silent),
            Some(Filtering::AddressDependent)
        );
        assert_eq!(
            filtering(Answered, Silent, Silent),
            Some(Filtering::AddressAndPortDependent)
        );
        // No baseline, or a relay that refuses CHANGE-REQUEST: unknown.
        assert_eq!(filtering(Silent, Silent, Silent), None);
        assert_eq!(filtering(NotRun, NotRun, NotRun), None);
        assert_eq!(filtering(Answered, Refused, Refused), None);
        assert_eq!(filtering(Answered, Silent, Refused), None);
    }
}
