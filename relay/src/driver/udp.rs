//! UDP workers: one thread per core, each with its own `SO_REUSEPORT`
//! listening sockets, its own [`Server`] shard and its own relayed sockets,
//! driven by a level-triggered epoll loop with `recvmmsg`/`sendmmsg`.
//!
//! The kernel hashes a client's 4-tuple to one worker's listening socket, so
//! an allocation, its relayed socket and both directions of its traffic stay
//! on one thread: the hot path takes no lock and allocates nothing.

use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::server::{ClientSocket, Event, RelayToken, Server, Transmit, Transport};

const BATCH: usize = 64;
const BUF: usize = 2048;
/// ChannelData header room in front of peer payloads.
const HEADROOM: usize = 4;

/// Binds a UDP socket with `SO_REUSEPORT` (so every worker can bind the same address).
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_port(true)?;
    s.set_reuse_address(true)?;
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

struct Epoll(RawFd);

impl Epoll {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned by the returned value.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll(fd))
    }
    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: ev is a valid epoll_event for the duration of the call.
        if unsafe { libc::epoll_ctl(self.0, op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> usize {
        // SAFETY: events is a valid, writable buffer of the given length.
        let n = unsafe {
            libc::epoll_wait(self.0, events.as_mut_ptr(), events.len() as i32, timeout_ms)
        };
        n.max(0) as usize
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

fn to_sockaddr(addr: SocketAddr, storage: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            unsafe { std::ptr::write(storage as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write(storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

fn from_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Reusable buffers and headers for one `recvmmsg`/`sendmmsg` batch.
struct Batch {
    bufs: Vec<[u8; BUF]>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    lens: Vec<usize>,
}

impl Batch {
    fn new() -> Self {
        // SAFETY: all-zero is a valid sockaddr_storage / mmsghdr / iovec.
        let zero_addr: libc::sockaddr_storage = unsafe { MaybeUninit::zeroed().assume_init() };
        Batch {
            bufs: vec![[0u8; BUF]; BATCH],
            addrs: vec![zero_addr; BATCH],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                BATCH
            ],
            // SAFETY: as above.
            hdrs: (0..BATCH)
                .map(|_| unsafe { MaybeUninit::zeroed().assume_init() })
                .collect(),
            lens: vec![0; BATCH],
        }
    }

    /// Receives up to `BATCH - start` datagrams into slots `start..`, payload at `offset`.
    fn recv(&mut self, fd: RawFd, start: usize, offset: usize) -> usize {
        let n = BATCH - start;
        for i in start..BATCH {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i][offset..].as_mut_ptr() as *mut libc::c_void,
                iov_len: BUF - offset - 4,
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = &mut self.addrs[i] as *mut _ as *mut libc::c_void;
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: headers point at buffers owned by self that outlive the call.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs[start..].as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r <= 0 {
            return 0;
        }
        for i in start..start + r as usize {
            // A datagram larger than the buffer (jumbo, not an MTU-sized
            // WireGuard packet) was cut: never relay a truncated packet.
            let truncated = self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.lens[i] = if truncated {
                0
            } else {
                self.hdrs[i].msg_len as usize
            };
        }
        r as usize
    }
}

/// Outgoing datagrams from one socket, sent with `sendmmsg`. Consecutive
/// datagrams to the same destination of the same size (the last may be
/// shorter) are copied back to back into one message with a UDP GSO
/// segment size: the kernel carries the run as one packet as far as it can,
/// and a receiver reading with UDP GRO gets it in one read.
struct SendQueue {
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    cmsgs: Vec<[u64; 4]>,
    /// Staged datagrams; never grows past its capacity (pointers into it
    /// stay valid until `flush`).
    arena: Vec<u8>,
    /// The open run: destination, segment size, datagrams, ended by a
    /// shorter one.
    run: Option<(SocketAddr, usize, usize, bool)>,
    /// GSO allowed (off after the kernel refused once).
    gso: bool,
    n: usize,
}

/// Most bytes and datagrams in one GSO message.
const GSO_BYTES: usize = 65000;
const GSO_SEGMENTS: usize = 64;

impl SendQueue {
    fn new() -> Self {
        SendQueue {
            // SAFETY: all-zero is valid for these C structs.
            addrs: vec![unsafe { MaybeUninit::zeroed().assume_init() }; BATCH],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                BATCH
            ],
            // SAFETY: as above.
            hdrs: (0..BATCH)
                .map(|_| unsafe { MaybeUninit::zeroed().assume_init() })
                .collect(),
            cmsgs: vec![[0u64; 4]; BATCH],
            arena: Vec::with_capacity(BATCH * BUF),
            run: None,
            gso: true,
            n: 0,
        }
    }

    /// Queues a datagram. The data must stay valid until `flush`.
    fn push(&mut self, to: SocketAddr, data: *const u8, len: usize) {
        // SAFETY: the caller passes a live buffer of `len` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(data, len) };
        let room = self.arena.len() + len <= self.arena.capacity();
        if let (true, true, Some((rto, stride, count, short))) = (self.gso, room, self.run) {
            let i = self.n - 1;
            if rto == to
                && !short
                && len <= stride
                && count < GSO_SEGMENTS
                && self.iovs[i].iov_len + len <= GSO_BYTES
            {
                self.arena.extend_from_slice(bytes);
                self.iovs[i].iov_len += len;
                self.run = Some((to, stride, count + 1, len < stride));
                let h = &mut self.hdrs[i].msg_hdr;
                h.msg_control = self.cmsgs[i].as_mut_ptr() as *mut libc::c_void;
                // SAFETY: CMSG_SPACE/CMSG_LEN are pure; the control buffer
                // (32 bytes) holds one u16 cmsg.
                unsafe {
                    h.msg_controllen = libc::CMSG_SPACE(2) as _;
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, stride as u16);
                }
                return;
            }
        }
        let i = self.n;
        let base = if self.gso && room {
            // Staged so the next datagram can join it.
            let start = self.arena.len();
            self.arena.extend_from_slice(bytes);
            self.run = Some((to, len, 1, false));
            self.arena[start..].as_ptr()
        } else {
            self.run = None;
            data
        };
        let alen = to_sockaddr(to, &mut self.addrs[i]);
        self.iovs[i] = libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        };
        let h = &mut self.hdrs[i].msg_hdr;
        h.msg_name = &mut self.addrs[i] as *mut _ as *mut libc::c_void;
        h.msg_namelen = alen;
        h.msg_iov = &mut self.iovs[i];
        h.msg_iovlen = 1;
        h.msg_control = std::ptr::null_mut();
        h.msg_controllen = 0;
        self.n += 1;
    }

    fn flush(&mut self, fd: RawFd) {
        let mut off = 0;
        while off < self.n {
            // SAFETY: headers reference buffers the caller (or the arena)
            // keeps alive until flush returns.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs[off..self.n].as_mut_ptr(),
                    (self.n - off) as libc::c_uint,
                    0,
                )
            };
            if r <= 0 {
                let err = io::Error::last_os_error();
                let h = &self.hdrs[off].msg_hdr;
                if !h.msg_control.is_null()
                    && matches!(
                        err.raw_os_error(),
                        Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP)
                    )
                {
                    // The kernel refuses GSO here: send this run one by one,
                    // and stage no more runs.
                    self.gso = false;
                    // SAFETY: the iovec points into the arena, alive here.
                    let run = unsafe {
                        std::slice::from_raw_parts(
                            self.iovs[off].iov_base as *const u8,
                            self.iovs[off].iov_len,
                        )
                    };
                    if let Some(to) = from_sockaddr(&self.addrs[off]) {
                        // SAFETY: reading the u16 segment size we wrote.
                        let seg = unsafe {
                            std::ptr::read_unaligned(
                                libc::CMSG_DATA(libc::CMSG_FIRSTHDR(h)) as *const u16
                            )
                        };
                        for d in run.chunks(usize::from(seg).max(1)) {
                            send_to(fd, to, d);
                        }
                    }
                }
                // Full socket buffer or an unreachable destination: skip one and go on.
                off += 1;
            } else {
                off += r as usize;
            }
        }
        self.n = 0;
        self.arena.clear();
        self.run = None;
    }
}

fn send_to(fd: RawFd, to: SocketAddr, data: &[u8]) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut st: libc::sockaddr_storage = unsafe { MaybeUninit::zeroed().assume_init() };
    let len = to_sockaddr(to, &mut st);
    // SAFETY: data and st are valid for the call.
    unsafe {
        libc::sendto(
            fd,
            data.as_ptr() as *const libc::c_void,
            data.len(),
            libc::MSG_DONTWAIT,
            &st as *const _ as *const libc::sockaddr,
            len,
        )
    };
}

/// One UDP worker.
pub struct Worker {
    server: Server,
    listeners: Vec<(SocketAddr, UdpSocket)>,
    relays: HashMap<u64, UdpSocket>,
    epoll: Epoll,
    xdp: Option<Arc<super::xdp::Xdp>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("listeners", &self.listeners.len())
            .finish()
    }
}

impl Worker {
    /// A worker serving `listeners` (already bound, non-blocking) with `server`.
    pub fn new(
        server: Server,
        listeners: Vec<UdpSocket>,
        xdp: Option<Arc<super::xdp::Xdp>>,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let mut ls = Vec::new();
        for (i, s) in listeners.into_iter().enumerate() {
            epoll.ctl(libc::EPOLL_CTL_ADD, s.as_raw_fd(), i as u64)?;
            ls.push((s.local_addr()?, s));
        }
        Ok(Worker {
            server,
            listeners: ls,
            relays: HashMap::new(),
            epoll,
            xdp,
        })
    }

    fn listener_fd(&self, from: SocketAddr) -> Option<RawFd> {
        self.listeners
            .iter()
            .find(|(a, _)| *a == from)
            .or_else(|| self.listeners.first())
            .map(|(_, s)| s.as_raw_fd())
    }

    fn drain(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            while let Some(ev) = self.server.poll_event() {
                progressed = true;
                match ev {
                    Event::BindRelay { token, addr } => {
                        let res = UdpSocket::bind(addr).and_then(|s| {
                            s.set_nonblocking(true)?;
                            self.epoll
                                .ctl(libc::EPOLL_CTL_ADD, s.as_raw_fd(), token.0)?;
                            let local = s.local_addr()?;
                            self.relays.insert(token.0, s);
                            Ok(local)
                        });
                        self.server.relay_bound(now, token, res);
                    }
                    Event::ReleaseRelay { token } => {
                        if let Some(s) = self.relays.remove(&token.0) {
                            let _ = self.epoll.ctl(libc::EPOLL_CTL_DEL, s.as_raw_fd(), 0);
                        }
                    }
                    // UDP has no connection to keep.
                    Event::ClientAuthenticated { .. } => {}
                    Event::FastPath { entry, install } => {
                        if let Some(x) = &self.xdp {
                            x.apply(&entry, install);
                        }
                    }
                }
            }
            while let Some(t) = self.server.poll_transmit() {
                progressed = true;
                match t {
                    Transmit::ToClient {
                        client,
                        from,
                        payload,
                    } => {
                        if let Some(fd) = self.listener_fd(from) {
                            send_to(fd, client.remote, &payload);
                        }
                    }
                    Transmit::ToPeer {
                        relay,
                        peer,
                        payload,
                    } => {
                        if let Some(s) = self.relays.get(&relay.0) {
                            send_to(s.as_raw_fd(), peer, &payload);
                        }
                    }
                }
            }
            if !progressed {
                break;
            }
        }
    }

    /// Runs until `stop` is set.
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut rx = Batch::new();
        let mut peer_rx = Batch::new();
        let mut out = SendQueue::new();
        let mut fwd_out = SendQueue::new();
        let n_listeners = self.listeners.len() as u64;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let wait = self
                .server
                .poll_timeout()
                .saturating_duration_since(now)
                .min(Duration::from_millis(100));
            let n = self.epoll.wait(&mut events, wait.as_millis() as i32);
            let now = Instant::now();
            self.server.handle_timeout(now);
            let mut peer_used = 0usize;
            let mut out_fd: Option<RawFd> = None;
            for ev in &events[..n] {
                let token = ev.u64;
                if token < n_listeners {
                    let (local, ref sock) = self.listeners[token as usize];
                    let fd = sock.as_raw_fd();
                    let got = rx.recv(fd, 0, 0);
                    // Forwards to peers leave in `sendmmsg` runs per relayed
                    // socket (the payloads stay in `rx` until the flush).
                    let mut fwd_fd: Option<RawFd> = None;
                    for i in 0..got {
                        let Some(remote) = from_sockaddr(&rx.addrs[i]) else {
                            continue;
                        };
                        let client = ClientSocket {
                            transport: Transport::Udp,
                            local,
                            remote,
                        };
                        let data = &rx.bufs[i][..rx.lens[i]];
                        if let Some(fwd) = self.server.handle_client(now, client, data) {
                            if let Some(s) = self.relays.get(&fwd.relay.0) {
                                let rfd = s.as_raw_fd();
                                if let Some(prev) = fwd_fd.filter(|f| *f != rfd) {
                                    fwd_out.flush(prev);
                                }
                                fwd_fd = Some(rfd);
                                fwd_out.push(fwd.peer, fwd.payload.as_ptr(), fwd.payload.len());
                            }
                        }
                    }
                    if let Some(f) = fwd_fd {
                        fwd_out.flush(f);
                    }
                    self.drain(now);
                } else {
                    let Some(fd) = self.relays.get(&token).map(|s| s.as_raw_fd()) else {
                        continue;
                    };
                    if peer_used == BATCH {
                        if let Some(ofd) = out_fd {
                            out.flush(ofd);
                        }
                        peer_used = 0;
                    }
                    let got = peer_rx.recv(fd, peer_used, HEADROOM);
                    for i in peer_used..peer_used + got {
                        let Some(peer) = from_sockaddr(&peer_rx.addrs[i]) else {
                            continue;
                        };
                        let len = peer_rx.lens[i];
                        if len == 0 {
                            continue;
                        }
                        let buf = &mut peer_rx.bufs[i];
                        if let Some(fwd) =
                            self.server
                                .handle_peer(now, RelayToken(token), peer, buf, len)
                        {
                            let Some(lfd) = self.listener_fd(fwd.client.local) else {
                                continue;
                            };
                            if out_fd.is_some_and(|o| o != lfd) {
                                if let Some(ofd) = out_fd {
                                    out.flush(ofd);
                                }
                            }
                            out_fd = Some(lfd);
                            out.push(fwd.client.remote, peer_rx.bufs[i].as_ptr(), fwd.len);
                        }
                    }
                    peer_used += got;
                }
            }
            if let Some(ofd) = out_fd {
                out.flush(ofd);
            }
            self.drain(now);
        }
    }
}

/// Splits `range` into `n` disjoint sub-ranges (one per shard).
pub fn split_ports((lo, hi): (u16, u16), n: usize) -> Vec<(u16, u16)> {
    let n = n.max(1) as u32;
    let span = (hi as u32).saturating_sub(lo as u32) + 1;
    let per = (span / n).max(1);
    (0..n)
        .map(|i| {
            let a = lo as u32 + i * per;
            let b = if i == n - 1 { hi as u32 } else { a + per - 1 };
            (a.min(hi as u32) as u16, b.min(hi as u32) as u16)
        })
        .collect()
}

/// The wildcard address of the family of `ip`.
pub fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}
