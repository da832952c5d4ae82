//! The netlink side of [`super::NetWatch`]: one thread blocked on an
//! rtnetlink socket subscribed to link, address and route changes (IPv4 and
//! IPv6), each message read with `netlink-packet-route` into a
//! [`Change`] and handed to the main loop.
//!
//! A thread rather than a tokio task: it does nothing but wait, and the
//! blocking socket needs no async wrapper. It ends when the main loop drops
//! the receiver (at the next message) or with the process.

use std::io;

use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload, NLMSG_ALIGNTO};
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkFlags;
use netlink_packet_route::route::{RouteAttribute, RouteMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use tokio::sync::mpsc;

use super::Change;

/// The multicast groups: links, IPv4/IPv6 addresses and routes.
const GROUPS: u32 = (libc::RTMGRP_LINK
    | libc::RTMGRP_IPV4_IFADDR
    | libc::RTMGRP_IPV4_ROUTE
    | libc::RTMGRP_IPV6_IFADDR
    | libc::RTMGRP_IPV6_ROUTE) as u32;

/// Opens the socket and starts the thread. An error (no netlink here) is
/// the caller's to log; it then keeps polling the interfaces.
pub fn spawn(tx: mpsc::Sender<Change>) -> io::Result<()> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind(&SocketAddr::new(0, GROUPS))?;
    // A burst larger than the buffer is an overrun (ENOBUFS): still a change.
    let _ = sock.set_rx_buf_sz(1 << 20);
    std::thread::Builder::new()
        .name("netwatch".into())
        .spawn(move || {
            let mut out = Vec::new();
            loop {
                out.clear();
                match sock.recv_from_full() {
                    Ok((buf, _)) => parse(&buf, &mut out),
                    // Overrun: we lost messages, so something changed.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        out.push(Change::Unreadable)
                    }
                    Err(e) => {
                        tracing::warn!("netlink: {e}; network changes are polled from now on");
                        return;
                    }
                }
                for c in out.drain(..) {
                    if tx.blocking_send(c).is_err() {
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

/// Reads every netlink message in `buf` (one datagram may hold several).
pub fn parse(buf: &[u8], out: &mut Vec<Change>) {
    let mut off = 0;
    while off < buf.len() {
        let rest = &buf[off..];
        let len = match NetlinkBuffer::new_checked(rest) {
            Ok(b) => b.length() as usize,
            Err(_) => {
                out.push(Change::Unreadable);
                return;
            }
        };
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len]) {
            Ok(m) => match m.payload {
                NetlinkPayload::InnerMessage(msg) => out.extend(change(msg)),
                NetlinkPayload::Overrun(_) => out.push(Change::Unreadable),
                _ => {}
            },
            Err(_) => out.push(Change::Unreadable),
        }
        // new_checked guarantees 16 <= len <= rest.len().
        let align = usize::from(NLMSG_ALIGNTO);
        off += len.div_ceil(align) * align;
    }
}

fn change(msg: RouteNetlinkMessage) -> Option<Change> {
    use RouteNetlinkMessage as M;
    Some(match msg {
        M::NewLink(l) => Change::Link {
            index: l.header.index,
            up: l.header.flags.contains(LinkFlags::Up | LinkFlags::Running),
            deleted: false,
        },
        M::DelLink(l) => Change::Link {
            index: l.header.index,
            up: false,
            deleted: true,
        },
        M::NewAddress(a) => address(&a.attributes, a.header.index, true)?,
        M::DelAddress(a) => address(&a.attributes, a.header.index, false)?,
        M::NewRoute(r) => route(&r, true),
        M::DelRoute(r) => route(&r, false),
        _ => return None,
    })
}

fn address(attrs: &[AddressAttribute], index: u32, added: bool) -> Option<Change> {
    // IPv4 puts the interface's own address in IFA_LOCAL (IFA_ADDRESS is
    // the peer's on point-to-point links); IPv6 only has IFA_ADDRESS.
    let local = attrs.iter().find_map(|x| match x {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let any = attrs.iter().find_map(|x| match x {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    Some(Change::Address {
        index,
        addr: local.or(any)?,
        added,
    })
}

fn route(r: &RouteMessage, added: bool) -> Change {
    let table = r
        .attributes
        .iter()
        .find_map(|x| match x {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table));
    let oif = r.attributes.iter().find_map(|x| match x {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    Change::Route {
        table,
        prefix_len: r.header.destination_prefix_length,
        oif,
        added,
    }
}

/// The interface's name, or `if<index>` once it is gone.
pub fn ifname(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` holds IF_NAMESIZE bytes, as if_indextoname requires; on
    // success it wrote a NUL-terminated name into it.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("if{index}");
    }
    // SAFETY: NUL-terminated within `buf` (see above).
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Indexes of the named interfaces that exist now.
pub fn indexes(names: &[String]) -> Vec<u32> {
    names
        .iter()
        .filter_map(|n| std::ffi::CString::new(n.as_str()).ok())
        .map(|c| {
            // SAFETY: a valid NUL-terminated string.
            unsafe { libc::if_nametoindex(c.as_ptr()) }
        })
        .filter(|&i| i != 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::address::AddressMessage;
    use netlink_packet_route::route::RouteMessage;
    use std::net::{IpAddr, Ipv4Addr};

    fn bytes(msg: RouteNetlinkMessage) -> Vec<u8> {
        let mut m = NetlinkMessage::from(msg);
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    #[test]
    fn reads_address_and_route_messages_several_per_datagram() {
        let mut a = AddressMessage::default();
        a.header.index = 3;
        a.attributes
            .push(AddressAttribute::Local(IpAddr::V4(Ipv4Addr::new(
                192, 168, 2, 10,
            ))));
        let mut r = RouteMessage::default();
        r.header.table = 254;
        r.attributes.push(RouteAttribute::Oif(3));
        let mut buf = bytes(RouteNetlinkMessage::NewAddress(a));
        buf.extend(bytes(RouteNetlinkMessage::DelRoute(r)));
        let mut out = Vec::new();
        parse(&buf, &mut out);
        assert_eq!(
            out,
            vec![
                Change::Address {
                    index: 3,
                    addr: IpAddr::V4(Ipv4Addr::new(192, 168, 2, 10)),
                    added: true
                },
                Change::Route {
                    table: 254,
                    prefix_len: 0,
                    oif: Some(3),
                    added: false
                }
            ]
        );
    }

    #[test]
    fn garbage_is_a_change_never_a_panic() {
        let mut out = Vec::new();
        parse(&[0xff; 7], &mut out);
        assert_eq!(out, vec![Change::Unreadable]);
        // A header claiming more than there is, and every truncation of a
        // real message.
        let mut a = AddressMessage::default();
        a.attributes
            .push(AddressAttribute::Address(IpAddr::V4(Ipv4Addr::new(
                10, 0, 0, 1,
            ))));
        let good = bytes(RouteNetlinkMessage::NewAddress(a));
        for cut in 0..good.len() {
            out.clear();
            parse(&good[..cut], &mut out);
            assert!(
                out.iter().all(|c| *c == Change::Unreadable),
                "{cut}: {out:?}"
            );
        }
        let mut bad = good.clone();
        bad[0] = 0xff; // length 255 > what is there
        out.clear();
        parse(&bad, &mut out);
        assert_eq!(out, vec![Change::Unreadable]);
    }
}
