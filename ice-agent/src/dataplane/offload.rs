//! TUN offloads, sans-IO: the `virtio_net_hdr` the kernel puts in front of
//! every packet on an `IFF_VNET_HDR` TUN, TCP segmentation of the large
//! (TSO) packets and UDP (USO) runs it hands over, and checksum completion.
//!
//! With `TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_CSUM` the kernel stops cutting a
//! TCP stream into MTU-sized packets before the TUN: one read returns up to
//! 64 KiB of one flow and a header saying how to cut it (`gso_size`). Cutting
//! it here, right before encryption, saves the kernel's per-packet work and
//! a system call per packet. The TCP checksum arrives partial (the
//! pseudo-header sum only, `NEEDS_CSUM`); it is completed per segment.
//!
//! The packet is local (our own kernel's), but it is still parsed with every
//! length checked: a malformed header yields `None`, never a panic.

/// Size of `struct virtio_net_hdr` (without `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

/// A parsed `virtio_net_hdr` (little-endian on the TUN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into every segment.
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS).
    pub gso_size: u16,
    /// Where checksumming starts (the L4 header).
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum goes.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads the header at the start of `b`.
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let h = b.get(..VNET_HDR_LEN)?;
        let u = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        Some(VnetHdr {
            flags: h[0],
            gso_type: h[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }
}

/// Ones'-complement sum of `data` added to `sum` (not folded).
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum of `data` starting from `initial`.
pub fn checksum(initial: u32, data: &[u8]) -> u16 {
    !fold(sum16(initial, data))
}

/// Completes a partial checksum in place: the field at `start + offset`
/// holds the pseudo-header sum; the result covers `pkt[start..]`.
pub fn complete_csum(pkt: &mut [u8], start: usize, offset: usize) -> Option<()> {
    let at = start.checked_add(offset)?;
    if at + 2 > pkt.len() || start > pkt.len() {
        return None;
    }
    let c = checksum(0, &pkt[start..]);
    // 0 is sent as 0xffff for UDP; for TCP either form is valid.
    pkt[at..at + 2].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    Some(())
}

/// Pseudo-header sum for an L4 packet of `l4_len` bytes with protocol
/// `proto` in the IP packet `ip` (IPv4 or IPv6).
fn pseudo(ip: &[u8], proto: u8, l4_len: usize) -> Option<u32> {
    match ip.first()? >> 4 {
        4 => {
            let s = sum16(0, ip.get(12..20)?);
            Some(s + u32::from(proto) + l4_len as u32)
        }
        6 => {
            let s = sum16(0, ip.get(8..40)?);
            Some(s + u32::from(proto) + (l4_len as u32 & 0xffff) + ((l4_len as u32) >> 16))
        }
        _ => None,
    }
}

/// Cuts the packet read from an offloading TUN (header stripped: `pkt`,
/// its header `h`) into the packets it stands for, each complete with its
/// checksums, calling `emit` for each (built in `seg`, a reusable buffer).
/// A packet that needs neither segmentation nor a checksum is passed
/// through as is. `None`: malformed, dropped.
pub fn split(
    h: &VnetHdr,
    pkt: &mut [u8],
    seg: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Option<()> {
    let gso = h.gso_type & !GSO_ECN;
    if gso == GSO_NONE {
        if h.flags & F_NEEDS_CSUM != 0 {
            complete_csum(pkt, usize::from(h.csum_start), usize::from(h.csum_offset))?;
        }
        emit(pkt);
        return Some(());
    }
    if gso == GSO_UDP_L4 {
        return split_udp(h, pkt, seg, emit);
    }
    if gso != GSO_TCPV4 && gso != GSO_TCPV6 {
        return None;
    }
    let v4 = gso == GSO_TCPV4;
    let l4 = usize::from(h.csum_start);
    // The TCP header length from the packet itself (hdr_len is a hint).
    let tcp_len = usize::from(pkt.get(l4 + 12)? >> 4) * 4;
    let hdr = l4 + tcp_len;
    if tcp_len < 20 || hdr > pkt.len() || (v4 && l4 < 20) || (!v4 && l4 < 40) {
        return None;
    }
    let mss = usize::from(h.gso_size);
    if mss == 0 {
        return None;
    }
    let payload = pkt.len() - hdr;
    let seq0 = u32::from_be_bytes(pkt[l4 + 4..l4 + 8].try_into().ok()?);
    let flags0 = pkt[l4 + 13];
    let id0 = if v4 {
        u16::from_be_bytes([pkt[4], pkt[5]])
    } else {
        0
    };
    let mut off = 0;
    let mut i = 0u16;
    while off < payload || (payload == 0 && i == 0) {
        let n = mss.min(payload - off);
        let last = off + n >= payload;
        seg.clear();
        seg.extend_from_slice(&pkt[..hdr]);
        seg.extend_from_slice(&pkt[hdr + off..hdr + off + n]);
        let total = seg.len();
        if v4 {
            seg[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            seg[4..6].copy_from_slice(&id0.wrapping_add(i).to_be_bytes());
            seg[10..12].copy_from_slice(&[0, 0]);
            let ihl = usize::from(seg[0] & 0x0f) * 4;
            let c = checksum(0, seg.get(..ihl)?);
            seg[10..12].copy_from_slice(&c.to_be_bytes());
        } else {
            seg[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        }
        seg[l4 + 4..l4 + 8].copy_from_slice(&seq0.wrapping_add(off as u32).to_be_bytes());
        // FIN and PSH only on the last segment, CWR only on the first.
        let mut f = flags0;
        if !last {
            f &= !(0x01 | 0x08);
        }
        if i > 0 {
            f &= !0x80;
        }
        seg[l4 + 13] = f;
        seg[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
        let ps = pseudo(seg, 6, total - l4)?;
        let c = checksum(ps, &seg[l4..]);
        seg[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        emit(seg);
        off += n;
        i = i.wrapping_add(1);
        if payload == 0 {
            break;
        }
    }
    Some(())
}

/// USO: one UDP packet with `gso_size`-byte pieces of payload becomes one
/// datagram per piece, each with its IP and UDP lengths and checksums.
fn split_udp(
    h: &VnetHdr,
    pkt: &[u8],
    seg: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Option<()> {
    let l4 = usize::from(h.csum_start);
    let v4 = pkt.first()? >> 4 == 4;
    let hdr = l4 + 8;
    let ip_ok = if v4 {
        l4 >= 20 && pkt.len() >= 20 && usize::from(pkt[0] & 0x0f) * 4 == l4 && pkt[9] == 17
    } else {
        l4 == 40 && pkt.len() >= 40 && pkt[6] == 17
    };
    let mss = usize::from(h.gso_size);
    if !ip_ok || hdr > pkt.len() || mss == 0 {
        return None;
    }
    let id0 = if v4 {
        u16::from_be_bytes([pkt[4], pkt[5]])
    } else {
        0
    };
    for (i, chunk) in pkt[hdr..].chunks(mss).enumerate() {
        seg.clear();
        seg.extend_from_slice(&pkt[..hdr]);
        seg.extend_from_slice(chunk);
        let total = seg.len();
        if v4 {
            seg[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            seg[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            seg[10..12].copy_from_slice(&[0, 0]);
            let c = checksum(0, &seg[..l4]);
            seg[10..12].copy_from_slice(&c.to_be_bytes());
        } else {
            seg[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        }
        let ulen = (total - l4) as u16;
        seg[l4 + 4..l4 + 6].copy_from_slice(&ulen.to_be_bytes());
        seg[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
        let c = checksum(pseudo(seg, 17, total - l4)?, &seg[l4..]);
        seg[l4 + 6..l4 + 8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
        emit(seg);
    }
    Some(())
}

/// Receive-side coalescing for the TUN (what the kernel's GRO does for a
/// NIC): consecutive decrypted TCP segments of one flow become one large
/// packet written with a `virtio_net_hdr` saying how the kernel may cut it
/// again, so the stack above sees one packet instead of up to 64. Only
/// in-order segments with valid checksums, plain ACK/PSH flags, no IP
/// options or fragments and identical headers are joined; everything else
/// is written as it came.
#[derive(Debug)]
pub struct Gro {
    /// The group being built (a whole IP packet).
    buf: Vec<u8>,
    /// Its state, when one is open.
    open: Option<Group>,
    /// Whether the TUN takes `virtio_net_hdr`s (without, packets pass through).
    enabled: bool,
}

#[derive(Debug, Clone, Copy)]
struct Group {
    v4: bool,
    ip_len: usize,
    tcp_len: usize,
    mss: usize,
    next_seq: u32,
    segments: usize,
    closed: bool,
}

/// Largest coalesced packet.
const GRO_MAX: usize = 65535 - 64;

impl Gro {
    /// A coalescer; `enabled`: the TUN carries `virtio_net_hdr`s.
    pub fn new(enabled: bool) -> Gro {
        Gro {
            buf: Vec::with_capacity(65536),
            open: None,
            enabled,
        }
    }

    /// Takes one decrypted packet; `write(header, packet)` is called for
    /// what is ready to go to the TUN.
    pub fn push(&mut self, pkt: &[u8], write: &mut impl FnMut(&[u8; VNET_HDR_LEN], &[u8])) {
        const ZERO: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];
        if !self.enabled {
            write(&ZERO, pkt);
            return;
        }
        let Some(seg) = tcp_segment(pkt) else {
            self.flush(write);
            write(&ZERO, pkt);
            return;
        };
        if let Some(mut g) = self.open {
            if self.joins(&g, pkt, &seg) {
                self.buf.extend_from_slice(&pkt[seg.hdr..]);
                let n = pkt.len() - seg.hdr;
                g.next_seq = seg.seq.wrapping_add(n as u32);
                g.segments += 1;
                // A short segment or PSH ends the group.
                if n < g.mss || seg.psh {
                    g.closed = true;
                    let l4 = g.ip_len;
                    self.buf[l4 + 13] |= 0x08 & pkt[l4 + 13];
                }
                self.open = Some(g);
                return;
            }
            self.flush(write);
        }
        self.buf.clear();
        self.buf.extend_from_slice(pkt);
        self.open = Some(Group {
            v4: seg.v4,
            ip_len: seg.ip_len,
            tcp_len: seg.hdr - seg.ip_len,
            mss: pkt.len() - seg.hdr,
            next_seq: seg.seq.wrapping_add((pkt.len() - seg.hdr) as u32),
            segments: 1,
            closed: seg.psh,
        });
    }

    fn joins(&self, g: &Group, pkt: &[u8], seg: &Segment) -> bool {
        let n = pkt.len() - seg.hdr;
        let b = &self.buf;
        !g.closed
            && seg.v4 == g.v4
            && seg.ip_len == g.ip_len
            && seg.hdr - seg.ip_len == g.tcp_len
            && seg.seq == g.next_seq
            && n <= g.mss
            && g.segments < 64
            && b.len() + n <= GRO_MAX
            // Same addresses, ports, TOS/TTL (v4) or class/hop limit (v6).
            && (if g.v4 {
                b[1] == pkt[1] && b[8] == pkt[8] && b[12..20] == pkt[12..20]
            } else {
                b[0..4] == pkt[0..4] && b[7] == pkt[7] && b[8..40] == pkt[8..40]
            })
            // Ports, ack, window, options; flags but PSH.
            && b[g.ip_len..g.ip_len + 4] == pkt[g.ip_len..g.ip_len + 4]
            && b[g.ip_len + 8..g.ip_len + 13] == pkt[g.ip_len + 8..g.ip_len + 13]
            && (b[g.ip_len + 13] & !0x08) == (pkt[g.ip_len + 13] & !0x08)
            && b[g.ip_len + 14..g.ip_len + 16] == pkt[g.ip_len + 14..g.ip_len + 16]
            && b[g.ip_len + 20..g.ip_len + g.tcp_len] == pkt[g.ip_len + 20..g.ip_len + g.tcp_len]
    }

    /// Writes the open group, if any.
    pub fn flush(&mut self, write: &mut impl FnMut(&[u8; VNET_HDR_LEN], &[u8])) {
        let Some(g) = self.open.take() else { return };
        if g.segments == 1 {
            write(&[0; VNET_HDR_LEN], &self.buf);
            return;
        }
        let total = self.buf.len();
        let l4 = g.ip_len;
        if g.v4 {
            self.buf[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            self.buf[10..12].copy_from_slice(&[0, 0]);
            let c = checksum(0, &self.buf[..l4]);
            self.buf[10..12].copy_from_slice(&c.to_be_bytes());
        } else {
            self.buf[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        }
        // Partial checksum: the pseudo-header sum, for the kernel to finish.
        let ps = pseudo(&self.buf, 6, total - l4).unwrap_or(0);
        self.buf[l4 + 16..l4 + 18].copy_from_slice(&fold(ps).to_be_bytes());
        let mut h = [0u8; VNET_HDR_LEN];
        h[0] = F_NEEDS_CSUM;
        h[1] = if g.v4 { GSO_TCPV4 } else { GSO_TCPV6 };
        h[2..4].copy_from_slice(&((l4 + g.tcp_len) as u16).to_le_bytes());
        h[4..6].copy_from_slice(&(g.mss as u16).to_le_bytes());
        h[6..8].copy_from_slice(&(l4 as u16).to_le_bytes());
        h[8..10].copy_from_slice(&16u16.to_le_bytes());
        write(&h, &self.buf);
    }
}

struct Segment {
    v4: bool,
    ip_len: usize,
    hdr: usize,
    seq: u32,
    psh: bool,
}

/// The TCP segment in `pkt` if it may be coalesced: IPv4 without options
/// or fragments, or IPv6 with TCP as the next header; ACK with optional
/// PSH only; a payload; lengths consistent; checksums valid.
fn tcp_segment(pkt: &[u8]) -> Option<Segment> {
    let (v4, ip_len) = match pkt.first()? >> 4 {
        4 => {
            let ok = pkt[0] == 0x45
                && pkt.len() >= 40
                && usize::from(u16::from_be_bytes([pkt[2], pkt[3]])) == pkt.len()
                && (u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff) == 0
                && pkt[9] == 6
                && checksum(0, &pkt[..20]) == 0;
            (ok.then_some(true)?, 20)
        }
        6 => {
            let ok = pkt.len() >= 60
                && usize::from(u16::from_be_bytes([pkt[4], pkt[5]])) + 40 == pkt.len()
                && pkt[6] == 6;
            (!ok.then_some(true)?, 40)
        }
        _ => return None,
    };
    let tcp_len = usize::from(pkt.get(ip_len + 12)? >> 4) * 4;
    let hdr = ip_len + tcp_len;
    let flags = *pkt.get(ip_len + 13)?;
    if tcp_len < 20 || hdr >= pkt.len() || flags & !0x08 != 0x10 {
        return None;
    }
    let ps = pseudo(pkt, 6, pkt.len() - ip_len)?;
    if checksum(ps, &pkt[ip_len..]) != 0 {
        return None;
    }
    Some(Segment {
        v4,
        ip_len,
        hdr,
        seq: u32::from_be_bytes(pkt[ip_len + 4..ip_len + 8].try_into().ok()?),
        psh: flags & 0x08 != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4/TCP packet with `payload` bytes, TCP checksum left partial
    /// (pseudo-header sum) the way the kernel hands it over.
    fn tcp4(payload: usize, flags: u8) -> Vec<u8> {
        let total = 20 + 20 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 77, 0, 1]);
        p[16..20].copy_from_slice(&[10, 77, 0, 2]);
        p[20..22].copy_from_slice(&5201u16.to_be_bytes());
        p[22..24].copy_from_slice(&40000u16.to_be_bytes());
        p[24..28].copy_from_slice(&1000u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = flags;
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let ps = fold(pseudo(&p, 6, 20 + payload).expect("pseudo"));
        p[36..38].copy_from_slice(&ps.to_be_bytes());
        p
    }

    fn valid_tcp4(seg: &[u8]) -> bool {
        let ihl = usize::from(seg[0] & 0x0f) * 4;
        let ip_ok = checksum(0, &seg[..ihl]) == 0;
        let ps = pseudo(seg, 6, seg.len() - ihl).expect("pseudo");
        ip_ok && checksum(ps, &seg[ihl..]) == 0
    }

    #[test]
    fn a_tso_packet_becomes_mss_sized_segments_with_valid_checksums() {
        let mut p = tcp4(3000, 0x18 | 0x01 | 0x80); // PSH ACK FIN CWR
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 40,
            gso_size: 1200,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut segs = Vec::new();
        let mut buf = Vec::new();
        split(&h, &mut p, &mut buf, |s| segs.push(s.to_vec())).expect("split");
        assert_eq!(
            segs.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![1240, 1240, 640]
        );
        let mut expect = 0u8;
        for (i, s) in segs.iter().enumerate() {
            assert!(valid_tcp4(s), "segment {i} checksums");
            let seq = u32::from_be_bytes(s[24..28].try_into().expect("4"));
            assert_eq!(seq, 1000 + 1200 * i as u32);
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16);
            let last = i == segs.len() - 1;
            assert_eq!(s[33] & 0x09 != 0, last, "FIN/PSH only last");
            assert_eq!(s[33] & 0x80 != 0, i == 0, "CWR only first");
            // The payload bytes, in order.
            for b in &s[40..] {
                assert_eq!(*b, expect);
                expect = expect.wrapping_add(1);
            }
        }
    }

    #[test]
    fn a_partial_checksum_alone_is_completed() {
        let mut p = tcp4(100, 0x18);
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        // The IP header checksum is the kernel's job on this path: set it.
        let c = checksum(0, &p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let mut out = Vec::new();
        split(&h, &mut p, &mut Vec::new(), |s| out = s.to_vec()).expect("split");
        assert!(valid_tcp4(&out));
    }

    #[test]
    fn malformed_headers_are_refused_not_panicked_on() {
        let mut p = tcp4(100, 0x10);
        for h in [
            VnetHdr {
                gso_type: GSO_TCPV4,
                gso_size: 0,
                csum_start: 20,
                ..VnetHdr::default()
            },
            VnetHdr {
                gso_type: GSO_TCPV4,
                gso_size: 100,
                csum_start: 200,
                ..VnetHdr::default()
            },
            VnetHdr {
                gso_type: GSO_TCPV4,
                gso_size: 100,
                csum_start: 4,
                ..VnetHdr::default()
            },
            VnetHdr {
                gso_type: 3,
                gso_size: 100,
                csum_start: 20,
                ..VnetHdr::default()
            },
            VnetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: 500,
                csum_offset: 16,
                ..VnetHdr::default()
            },
            VnetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: 20,
                csum_offset: u16::MAX,
                ..VnetHdr::default()
            },
        ] {
            assert!(
                split(&h, &mut p, &mut Vec::new(), |_| {}).is_none(),
                "{h:?}"
            );
        }
        assert!(split(&VnetHdr::default(), &mut [], &mut Vec::new(), |_| {}).is_some());
        assert!(VnetHdr::parse(&[0; 9]).is_none());
    }

    /// Valid, complete segments of one flow (what the peer's data plane sent).
    fn flow(n: usize, payload: usize) -> Vec<Vec<u8>> {
        let mut big = tcp4(n * payload, 0x18);
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 40,
            gso_size: payload as u16,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut v = Vec::new();
        split(&h, &mut big, &mut Vec::new(), |s| v.push(s.to_vec())).expect("split");
        v
    }

    #[test]
    fn consecutive_segments_are_joined_and_cut_back_the_same() {
        let segs = flow(5, 1000);
        let mut g = Gro::new(true);
        let mut out: Vec<([u8; VNET_HDR_LEN], Vec<u8>)> = Vec::new();
        let mut w = |h: &[u8; VNET_HDR_LEN], p: &[u8]| out.push((*h, p.to_vec()));
        for s in &segs {
            g.push(s, &mut w);
        }
        g.flush(&mut w);
        assert_eq!(out.len(), 1, "one packet for the whole run");
        let (h, mut p) = out.pop().expect("one");
        let h = VnetHdr::parse(&h).expect("hdr");
        assert_eq!(
            (h.gso_type, h.gso_size, h.csum_start, h.csum_offset),
            (GSO_TCPV4, 1000, 20, 16)
        );
        assert_eq!(p.len(), 40 + 5000);
        // What the kernel would do with it: the same five segments.
        let mut again = Vec::new();
        split(&h, &mut p, &mut Vec::new(), |s| again.push(s.to_vec())).expect("split");
        assert_eq!(again, segs);
    }

    #[test]
    fn gaps_bad_checksums_and_other_packets_are_not_joined() {
        let segs = flow(4, 1000);
        let mut g = Gro::new(true);
        let mut out: Vec<([u8; VNET_HDR_LEN], Vec<u8>)> = Vec::new();
        let mut w = |h: &[u8; VNET_HDR_LEN], p: &[u8]| out.push((*h, p.to_vec()));
        g.push(&segs[0], &mut w);
        g.push(&segs[2], &mut w); // a gap: segs[1] lost
        let mut bad = segs[3].clone();
        bad[100] ^= 1; // checksum no longer matches
        g.push(&bad, &mut w);
        g.push(&[0x60, 0, 0, 0], &mut w); // not even IP
        g.flush(&mut w);
        assert_eq!(out.len(), 4);
        assert!(
            out.iter().all(|(h, _)| h == &[0; VNET_HDR_LEN]),
            "all passed through whole"
        );
        assert_eq!(out[0].1, segs[0]);
        assert_eq!(out[1].1, segs[2]);
        assert_eq!(out[2].1, bad);
        // Disabled: everything passes as is.
        let mut g = Gro::new(false);
        let mut n = 0;
        for s in &segs {
            g.push(s, &mut |_, _| n += 1);
        }
        assert_eq!(n, 4);
    }

    #[test]
    fn a_uso_packet_becomes_datagrams_with_valid_checksums() {
        let payload = 2500;
        let total = 20 + 8 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 77, 0, 1]);
        p[16..20].copy_from_slice(&[10, 77, 0, 2]);
        p[20..22].copy_from_slice(&4433u16.to_be_bytes());
        p[22..24].copy_from_slice(&443u16.to_be_bytes());
        for (i, b) in p[28..].iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: 28,
            gso_size: 1200,
            csum_start: 20,
            csum_offset: 6,
        };
        let mut out = Vec::new();
        split(&h, &mut p, &mut Vec::new(), |s| out.push(s.to_vec())).expect("split");
        assert_eq!(
            out.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![1228, 1228, 128]
        );
        let mut joined = Vec::new();
        for s in &out {
            assert_eq!(checksum(0, &s[..20]), 0, "IP checksum");
            let ps = pseudo(s, 17, s.len() - 20).expect("pseudo");
            assert_eq!(checksum(ps, &s[20..]), 0, "UDP checksum");
            assert_eq!(
                usize::from(u16::from_be_bytes([s[24], s[25]])),
                s.len() - 20
            );
            joined.extend_from_slice(&s[28..]);
        }
        assert_eq!(joined, p[28..].to_vec());
        // A UDP header past the end is refused.
        let bad = VnetHdr {
            csum_start: 2600,
            ..h
        };
        assert!(split(&bad, &mut p, &mut Vec::new(), |_| {}).is_none());
    }
}
