//! The agent's one UDP socket: dual-stack when the host has IPv6 (IPv4
//! peers appear as themselves, not as `::ffff:a.b.c.d`), and every datagram
//! comes with the local address it arrived on (`IP_PKTINFO` /
//! `IPV6_PKTINFO`), which ICE needs to know which host candidate a check
//! reached.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The bound socket and whether it is dual-stack (IPv6 with IPv4-mapped).
#[derive(Debug)]
pub struct Bound {
    /// The socket (non-blocking).
    pub socket: std::net::UdpSocket,
    /// `true`: AF_INET6 accepting IPv4 too; IPv4 destinations must be mapped
    /// with [`outward`].
    pub dual: bool,
}

fn setopt(fd: i32, level: i32, name: i32, v: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt with a valid fd and an int-sized option value.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &v as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds `[::]:port` dual-stack, or `0.0.0.0:port` when the host has no
/// IPv6; both with packet-info on and non-blocking.
pub fn bind(port: u16) -> io::Result<Bound> {
    match bind6(port) {
        Ok(s) => Ok(Bound {
            socket: s,
            dual: true,
        }),
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
            setopt(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
            s.set_nonblocking(true)?;
            Ok(Bound {
                socket: s,
                dual: false,
            })
        }
        Err(e) => Err(e),
    }
}

fn bind6(port: u16) -> io::Result<std::net::UdpSocket> {
    // SAFETY: plain socket(2); the fd is owned right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET6,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    setopt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    setopt(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
    setopt(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
    // SAFETY: a zeroed sockaddr_in6 is valid; we set family and port.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_port = port.to_be();
    // SAFETY: bind with a correctly sized sockaddr_in6.
    let r = unsafe {
        libc::bind(
            fd,
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(std::net::UdpSocket::from(owned))
}

/// The address to pass to `send_to` on this socket.
pub fn outward(to: SocketAddr, dual: bool) -> SocketAddr {
    match to {
        SocketAddr::V4(v4) if dual => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        other => other,
    }
}

/// An IPv4-mapped address as the IPv4 address it is.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// Asks the kernel to coalesce runs of same-sized datagrams from one
/// source into one read (UDP GRO, Linux ≥ 5.0); whether it is on.
pub fn enable_gro(fd: i32) -> bool {
    setopt(fd, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok()
}

/// What [`recv`] read: `len` bytes from `from`, arrived on `local`. With
/// GRO they are several datagrams of `segment` bytes each (the last may be
/// shorter); otherwise `segment == len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes in the buffer.
    pub len: usize,
    /// Source.
    pub from: SocketAddr,
    /// The local address it arrived on.
    pub local: Option<IpAddr>,
    /// Size of each datagram in the buffer.
    pub segment: usize,
}

impl Received {
    /// The datagrams in `buf` (what this read filled).
    pub fn datagrams<'a>(&self, buf: &'a [u8]) -> std::slice::Chunks<'a, u8> {
        buf[..self.len].chunks(self.segment.max(1))
    }
}

/// Sends the datagrams in `buf`, each `segment` bytes (the last may be
/// shorter), to `to` in one system call (UDP GSO, Linux ≥ 4.18).
pub fn send_segments(fd: i32, buf: &[u8], to: SocketAddr, segment: u16) -> io::Result<()> {
    let (mut storage, len) = sockaddr(to);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 4];
    // SAFETY: a zeroed msghdr is a valid initial value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = &mut storage as *mut _ as *mut libc::c_void;
    msg.msg_namelen = len;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    // SAFETY: CMSG_SPACE is a pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
    // SAFETY: the control buffer is large enough for one u16 cmsg.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, segment);
    }
    // SAFETY: msghdr points at live, correctly sized buffers for the call.
    let n = unsafe { libc::sendmsg(fd, &msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: a zeroed sockaddr_storage is valid.
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut st as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut st as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            sin6.sin6_scope_id = v6.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (st, len as libc::socklen_t)
}

/// One read: a datagram (or, with GRO, several) with its source and the
/// local address it arrived on. `Ok(None)`: truncated (larger than `buf`),
/// dropped.
pub fn recv(fd: i32, buf: &mut [u8]) -> io::Result<Option<Received>> {
    // SAFETY: zeroed sockaddr_storage / msghdr are valid initial values.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 16];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = &mut addr as *mut _ as *mut libc::c_void;
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: msghdr points at live, correctly sized buffers for the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(parse(&msg, &addr, n as usize))
}

/// What the kernel wrote for one message: source, local address, GRO
/// segment size. `None` when truncated or of an unknown family.
fn parse(msg: &libc::msghdr, addr: &libc::sockaddr_storage, n: usize) -> Option<Received> {
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return None;
    }
    let from = match addr.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (family says so).
            let a = unsafe { *(addr as *const _ as *const libc::sockaddr_in) };
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))),
                u16::from_be(a.sin_port),
            )
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 (family says so).
            let a = unsafe { *(addr as *const _ as *const libc::sockaddr_in6) };
            canonical(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)),
                u16::from_be(a.sin6_port),
            ))
        }
        _ => return None,
    };
    let mut local = None;
    let mut segment = n;
    // SAFETY: walking the control messages the kernel wrote (the msghdr's
    // control pointer and length describe them).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            let (level, typ) = ((*c).cmsg_level, (*c).cmsg_type);
            if level == libc::IPPROTO_IP && typ == libc::IP_PKTINFO {
                let info = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::in_pktinfo);
                local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    info.ipi_addr.s_addr,
                ))));
            } else if level == libc::IPPROTO_IPV6 && typ == libc::IPV6_PKTINFO {
                let info = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::in6_pktinfo);
                let ip = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                local = Some(match ip.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(ip),
                });
            } else if level == libc::SOL_UDP && typ == libc::UDP_GRO {
                let s = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                if s > 0 {
                    segment = s as usize;
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    Some(Received {
        len: n,
        from,
        local,
        segment,
    })
}

/// Buffers for reading up to `count` messages in one `recvmmsg`.
pub struct RecvBatch {
    /// `count` slots of `size` bytes in one allocation: large enough to be
    /// mapped lazily, so slots never written cost no memory (a proxy per
    /// peer holds one of these).
    buf: Vec<u8>,
    size: usize,
    addrs: Vec<libc::sockaddr_storage>,
    cmsgs: Vec<[u64; 16]>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    got: Vec<Option<Received>>,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("count", &self.addrs.len())
            .finish()
    }
}

// SAFETY: the raw pointers in `iovs`/`hdrs` only ever point into the
// batch's own buffers, and are rewritten before every call.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// `count` messages of up to `size` bytes each (65536 with GRO).
    pub fn new(count: usize, size: usize) -> RecvBatch {
        RecvBatch {
            buf: vec![0u8; count * size],
            size,
            // SAFETY: zeroed sockaddr_storage / mmsghdr are valid values.
            addrs: vec![unsafe { std::mem::zeroed() }; count],
            cmsgs: vec![[0u64; 16]; count],
            iovs: Vec::with_capacity(count),
            hdrs: Vec::with_capacity(count),
            got: Vec::with_capacity(count),
        }
    }

    /// Reads what is queued (at most `count` messages) without blocking;
    /// `WouldBlock` when nothing is.
    pub fn recv(&mut self, fd: i32) -> io::Result<usize> {
        let count = self.addrs.len();
        self.iovs.clear();
        for b in self.buf.chunks_mut(self.size) {
            self.iovs.push(libc::iovec {
                iov_base: b.as_mut_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            });
        }
        self.hdrs.clear();
        for i in 0..count {
            // SAFETY: a zeroed mmsghdr is valid; the pointers set below
            // point into this batch's buffers, alive for the call.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = &mut self.addrs[i] as *mut _ as *mut libc::c_void;
            h.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.cmsgs[i].as_mut_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_controllen = std::mem::size_of::<[u64; 16]>() as _;
            self.hdrs.push(h);
        }
        // SAFETY: `count` valid mmsghdrs describing live buffers.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.got.clear();
        for i in 0..n as usize {
            let h = &self.hdrs[i];
            self.got
                .push(parse(&h.msg_hdr, &self.addrs[i], h.msg_len as usize));
        }
        Ok(n as usize)
    }

    /// The messages the last [`RecvBatch::recv`] read (truncated ones left out).
    pub fn messages(&self) -> impl Iterator<Item = (Received, &[u8])> {
        self.got
            .iter()
            .zip(self.buf.chunks(self.size))
            .filter_map(|(r, b)| r.map(|r| (r, &b[..r.len])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv_wait(fd: i32, buf: &mut [u8]) -> (usize, SocketAddr, Option<IpAddr>) {
        for _ in 0..200 {
            if let Ok(Some(r)) = recv(fd, buf) {
                return (r.len, r.from, r.local);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("nothing received");
    }

    #[test]
    fn dual_stack_socket_reports_families_and_local_addresses() {
        let b = bind(0).expect("bind");
        let port = b.socket.local_addr().expect("addr").port();
        let fd = b.socket.as_raw_fd();
        let mut buf = [0u8; 64];
        let v4 = std::net::UdpSocket::bind("127.0.0.1:0").expect("v4");
        v4.send_to(b"four", ("127.0.0.1", port)).expect("send");
        let (n, from, local) = recv_wait(fd, &mut buf);
        assert_eq!(&buf[..n], b"four");
        assert_eq!(from, v4.local_addr().expect("addr"), "IPv4 peers stay IPv4");
        assert_eq!(local, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        // Answering an IPv4 peer works through the mapping.
        b.socket
            .send_to(b"back", outward(from, b.dual))
            .expect("send back");
        v4.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut r = [0u8; 8];
        let (m, src) = v4.recv_from(&mut r).expect("reply");
        assert_eq!(&r[..m], b"back");
        assert_eq!(src.port(), port);
        if b.dual {
            if let Ok(v6) = std::net::UdpSocket::bind("[::1]:0") {
                v6.send_to(b"six", ("::1", port)).expect("send");
                let (n, from, local) = recv_wait(fd, &mut buf);
                assert_eq!(&buf[..n], b"six");
                assert_eq!(from, v6.local_addr().expect("addr"));
                assert_eq!(local, Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
            }
        }
        // Too large for the buffer: dropped, not cut.
        v4.send_to(&[7u8; 100], ("127.0.0.1", port)).expect("send");
        std::thread::sleep(Duration::from_millis(20));
        assert!(matches!(recv(fd, &mut buf), Ok(None)));
    }

    #[test]
    fn a_batch_reads_several_datagrams_and_runs_split_into_them() {
        let b = bind(0).expect("bind");
        let port = b.socket.local_addr().expect("addr").port();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("tx");
        for m in [&b"one"[..], b"two", b"three"] {
            tx.send_to(m, ("127.0.0.1", port)).expect("send");
        }
        // A GSO run of three 4-byte datagrams in one send.
        let to = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        send_segments(tx.as_raw_fd(), b"aaaabbbbcc", to, 4).expect("gso send");
        std::thread::sleep(Duration::from_millis(50));
        let mut rx = RecvBatch::new(8, 65536);
        let n = rx.recv(b.socket.as_raw_fd()).expect("recv");
        assert!(n >= 4, "{n} messages");
        let mut got = Vec::new();
        for (r, data) in rx.messages() {
            assert_eq!(r.from, tx.local_addr().expect("addr"));
            for d in r.datagrams(data) {
                got.push(d.to_vec());
            }
        }
        let want: Vec<Vec<u8>> = ["one", "two", "three", "aaaa", "bbbb", "cc"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        assert_eq!(got, want);
    }
}
