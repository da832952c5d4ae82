//! Memory probes for a TURN server on loopback (ours or coturn's).
//!
//! ```text
//! alloc_flood allocations --server 127.0.0.1:3478 --count 10000 [--user u --pass p] [--pid PID]
//! alloc_flood flood       --server 127.0.0.1:3478 --count 1000000 [--pid PID] [--rate PPS]
//! ```
//!
//! `allocations` holds `count` real allocations, one UDP socket each (sources
//! spread over 127.0.1.x … addresses), authenticating with long-term
//! credentials; the nonce learned from a source address is reused for the
//! next sockets of that address, as a client library would.
//!
//! `flood` sends `count` unauthenticated Allocate requests, each from another
//! source address (127.x.y.z, set per datagram with IP_PKTINFO, so they look
//! spoofed) and one of a few dozen source ports, and counts the answers.
//!
//! With `--pid` both read the server's VmRSS from `/proc/PID/status` before,
//! during (peak) and after. The last line is `RESULT key=value …` for scripts.
//! Loopback only: every datagram goes to `--server`, which must be 127.0.0.0/8.

use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay::stun::{self, attr, method, Class, Integrity, Message, MessageBuilder, TransactionId};

fn usage() -> ! {
    eprintln!(
        "usage: alloc_flood allocations --server ADDR --count N [--user U --pass P] [--pid PID]\n       \
         alloc_flood flood --server ADDR --count N [--pid PID] [--rate PPS]"
    );
    std::process::exit(2)
}

struct Opts {
    mode: String,
    server: SocketAddr,
    count: usize,
    user: String,
    pass: String,
    pid: Option<u32>,
    rate: u64,
}

fn parse_args() -> Opts {
    let mut a = std::env::args().skip(1);
    let mode = a.next().unwrap_or_else(|| usage());
    let mut o = Opts {
        mode,
        server: "127.0.0.1:3478".parse().unwrap_or_else(|_| usage()),
        count: 10_000,
        user: "u".into(),
        pass: "p".into(),
        pid: None,
        rate: 300_000,
    };
    while let Some(k) = a.next() {
        let v = a.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--server" => o.server = v.parse().unwrap_or_else(|_| usage()),
            "--count" => o.count = v.parse().unwrap_or_else(|_| usage()),
            "--user" => o.user = v,
            "--pass" => o.pass = v,
            "--pid" => o.pid = Some(v.parse().unwrap_or_else(|_| usage())),
            "--rate" => o.rate = v.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    match o.server.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => {}
        _ => {
            eprintln!("alloc_flood: --server must be a 127.0.0.0/8 address (loopback only)");
            std::process::exit(2)
        }
    }
    o
}

/// VmRSS of `pid` in KiB.
fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Kernel slab memory in KiB (system-wide; sockets live there, not in RSS).
fn slab_kb() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Samples the peak RSS of `pid` every 20 ms until dropped.
struct PeakRss {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    fn start(pid: Option<u32>) -> PeakRss {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let thread = pid.map(|pid| {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(r) = rss_kb(pid) {
                        peak.fetch_max(r, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        });
        PeakRss { stop, peak, thread }
    }
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

// ------------------------------------------------------------ allocations

#[derive(Clone, Copy, PartialEq, Eq)]
enum St {
    Idle,
    Waiting {
        tid: TransactionId,
        sent: Instant,
        tries: u8,
    },
    Done,
    Failed,
}

fn allocate_request(
    buf: &mut Vec<u8>,
    tid: TransactionId,
    auth: Option<(&str, &str, &str, &[u8; 16])>,
) {
    let mut b = MessageBuilder::new(buf, method::ALLOCATE, Class::Request, tid);
    b.u32_attr(attr::REQUESTED_TRANSPORT, 17 << 24);
    b.u32_attr(attr::LIFETIME, 3600);
    if let Some((user, realm, nonce, key)) = auth {
        b.attr(attr::USERNAME, user.as_bytes())
            .attr(attr::REALM, realm.as_bytes())
            .attr(attr::NONCE, nonce.as_bytes())
            .integrity(Integrity::Sha1, key);
    }
    b.fingerprint();
}

fn allocations(o: &Opts) -> io::Result<()> {
    const PER_IP: usize = 250;
    const WINDOW: usize = 256;
    let before = o.pid.and_then(rss_kb);
    let fds_before = o.pid.and_then(fd_count);
    let peak = PeakRss::start(o.pid);
    let t0 = Instant::now();
    let mut socks = Vec::with_capacity(o.count);
    for i in 0..o.count {
        let ip = Ipv4Addr::new(
            127,
            0,
            1 + (i / PER_IP / 250) as u8,
            1 + (i / PER_IP % 250) as u8,
        );
        let s = UdpSocket::bind(SocketAddrV4::new(ip, 0))?;
        s.set_nonblocking(true)?;
        socks.push(s);
    }
    // Our own client sockets take slab too: measure after creating them.
    let slab_before = slab_kb();
    let mut state = vec![St::Idle; o.count];
    // Per source IP: the last nonce the server gave (our relay's nonces are
    // per address; coturn's are per session and simply get refreshed).
    let mut nonces: HashMap<IpAddr, String> = HashMap::new();
    let mut realm: Option<String> = None;
    let mut key = [0u8; 16];
    let mut buf = Vec::with_capacity(256);
    let mut rx = [0u8; 1500];
    let (mut next, mut done, mut failed, mut retransmits, mut challenges) =
        (0usize, 0usize, 0usize, 0u64, 0u64);
    let mut active: Vec<usize> = Vec::with_capacity(WINDOW);
    let deadline = Instant::now() + Duration::from_secs(120);
    let send = |i: usize,
                st: &mut St,
                tries: u8,
                buf: &mut Vec<u8>,
                nonces: &HashMap<IpAddr, String>,
                realm: &Option<String>,
                key: &[u8; 16]|
     -> io::Result<()> {
        let s = &socks[i];
        let ip = s.local_addr()?.ip();
        let tid: TransactionId = rand::random();
        let auth = match (realm, nonces.get(&ip)) {
            (Some(r), Some(n)) => Some((o.user.as_str(), r.as_str(), n.as_str(), key)),
            _ => None,
        };
        allocate_request(buf, tid, auth);
        let _ = s.send_to(buf, o.server);
        *st = St::Waiting {
            tid,
            sent: Instant::now(),
            tries,
        };
        Ok(())
    };
    while done + failed < o.count {
        if Instant::now() > deadline {
            eprintln!("alloc_flood: giving up after 120 s");
            break;
        }
        while active.len() < WINDOW && next < o.count {
            send(next, &mut state[next], 0, &mut buf, &nonces, &realm, &key)?;
            active.push(next);
            next += 1;
        }
        let mut progressed = false;
        let mut k = 0;
        while k < active.len() {
            let i = active[k];
            let St::Waiting { tid, sent, tries } = state[i] else {
                active.swap_remove(k);
                continue;
            };
            match socks[i].recv_from(&mut rx) {
                Ok((n, _)) => {
                    progressed = true;
                    let Ok(m) = Message::parse(&rx[..n]) else {
                        continue;
                    };
                    if m.transaction_id() != tid {
                        continue;
                    }
                    match m.class() {
                        Class::Success => {
                            state[i] = St::Done;
                            done += 1;
                        }
                        Class::Error => {
                            let (code, reason) = m.error_code().unwrap_or((0, ""));
                            if (code == 401 || code == 438) && tries < 4 {
                                challenges += 1;
                                if let Some(r) = m.str_attr(attr::REALM) {
                                    if realm.as_deref() != Some(r) {
                                        realm = Some(r.to_owned());
                                        key = stun::long_term_key(&o.user, r, &o.pass);
                                    }
                                }
                                if let Some(nc) = m.str_attr(attr::NONCE) {
                                    nonces.insert(socks[i].local_addr()?.ip(), nc.to_owned());
                                }
                                send(i, &mut state[i], tries + 1, &mut buf, &nonces, &realm, &key)?;
                            } else {
                                if failed < 5 {
                                    eprintln!(
                                        "alloc_flood: allocation {i} refused: {code} {reason}"
                                    );
                                }
                                state[i] = St::Failed;
                                failed += 1;
                            }
                        }
                        _ => {}
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if sent.elapsed() > Duration::from_millis(500) {
                        if tries >= 6 {
                            state[i] = St::Failed;
                            failed += 1;
                        } else {
                            retransmits += 1;
                            send(i, &mut state[i], tries + 1, &mut buf, &nonces, &realm, &key)?;
                        }
                    }
                }
                Err(_) => {
                    state[i] = St::Failed;
                    failed += 1;
                }
            }
            k += 1;
        }
        if !progressed {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    // Let the server settle (its allocator, its timers) before measuring.
    std::thread::sleep(Duration::from_secs(1));
    let peak = peak.finish();
    let after = o.pid.and_then(rss_kb);
    let fds_after = o.pid.and_then(fd_count);
    let slab_per = match (slab_before, slab_kb()) {
        (Some(b), Some(a)) if done > 0 => (a as f64 - b as f64) * 1024.0 / done as f64,
        _ => f64::NAN,
    };
    let per = match (before, after) {
        (Some(b), Some(a)) if done > 0 => (a.saturating_sub(b) * 1024) as f64 / done as f64,
        _ => f64::NAN,
    };
    println!(
        "allocations: {done} ok, {failed} failed in {secs:.1} s ({challenges} challenges, {retransmits} retransmits); \
         server RSS {} -> {} KiB (peak {peak}), {per:.0} B/allocation; server fds {} -> {}; \
         kernel slab (system-wide, noisy) +{slab_per:.0} B/allocation",
        before.unwrap_or(0),
        after.unwrap_or(0),
        fds_before.unwrap_or(0),
        fds_after.unwrap_or(0),
    );
    println!(
        "RESULT mode=allocations ok={done} failed={failed} secs={secs:.2} rss_before_kb={} rss_after_kb={} rss_peak_kb={peak} bytes_per_alloc={per:.0} slab_bytes_per_alloc={slab_per:.0}",
        before.unwrap_or(0),
        after.unwrap_or(0),
    );
    Ok(())
}

// ------------------------------------------------------------ flood

const BATCH: usize = 64;

/// Room for one `struct cmsghdr` + `struct in_pktinfo`, aligned.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Cmsg([u8; 32]);

fn pktinfo_cmsg(buf: &mut Cmsg, src: Ipv4Addr) -> usize {
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
    let space =
        unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) } as usize;
    assert!(space <= buf.0.len());
    buf.0 = [0; 32];
    // SAFETY: buf is large enough (checked) and aligned for cmsghdr.
    unsafe {
        let c = buf.0.as_mut_ptr() as *mut libc::cmsghdr;
        (*c).cmsg_level = libc::IPPROTO_IP;
        (*c).cmsg_type = libc::IP_PKTINFO;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as _;
        let info = libc::CMSG_DATA(c) as *mut libc::in_pktinfo;
        std::ptr::write_unaligned(
            info,
            libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(src.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            },
        );
    }
    space
}

/// The n-th flood source: 127.x.y.z over 127.1.0.1 … (never 127.0.0.0/16).
fn source(n: u64) -> Ipv4Addr {
    let v = n % (254 * 256 * 254);
    let z = (v % 254) as u8 + 1;
    let y = ((v / 254) % 256) as u8;
    let x = (v / 254 / 256) as u8 + 1;
    Ipv4Addr::new(127, x, y, z)
}

fn flood(o: &Opts) -> io::Result<()> {
    const SOCKETS: usize = 32;
    let before = o.pid.and_then(rss_kb);
    let peak = PeakRss::start(o.pid);
    // Wildcard-bound so the answers to every 127.x.y.z source come back to us;
    // we only ever send to the loopback server.
    let socks: Vec<UdpSocket> = (0..SOCKETS)
        .map(|_| {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<io::Result<_>>()?;
    let answers = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let socks: Vec<UdpSocket> = socks
            .iter()
            .map(|s| s.try_clone())
            .collect::<io::Result<_>>()?;
        let (answers, stop) = (answers.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            let mut idle_since: Option<Instant> = None;
            loop {
                let mut got = false;
                for s in &socks {
                    while s.recv_from(&mut buf).is_ok() {
                        answers.fetch_add(1, Ordering::Relaxed);
                        got = true;
                    }
                }
                if got {
                    idle_since = None;
                } else {
                    if stop.load(Ordering::Relaxed) {
                        // Drain for a moment after the last send.
                        let t = *idle_since.get_or_insert_with(Instant::now);
                        if t.elapsed() > Duration::from_millis(500) {
                            return;
                        }
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        })
    };

    let dst = o.server;
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut dst_st: libc::sockaddr_storage = unsafe { MaybeUninit::zeroed().assume_init() };
    let dst_len = {
        let IpAddr::V4(ip) = dst.ip() else {
            unreachable!("checked loopback v4")
        };
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: dst.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(ip.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_storage is large enough for sockaddr_in.
        unsafe { std::ptr::write(&mut dst_st as *mut _ as *mut libc::sockaddr_in, sin) };
        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
    };
    let mut msgs: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(64)).collect();
    let mut cmsgs = vec![Cmsg([0; 32]); BATCH];
    let mut iovs = vec![
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0
        };
        BATCH
    ];
    // SAFETY: all-zero is a valid mmsghdr.
    let mut hdrs: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|_| unsafe { MaybeUninit::zeroed().assume_init() })
        .collect();
    let t0 = Instant::now();
    let (mut sent, mut errors, mut n) = (0u64, 0u64, 0u64);
    let total = o.count as u64;
    while sent + errors < total {
        // Pace to --rate.
        let due = (t0.elapsed().as_secs_f64() * o.rate as f64) as u64;
        if sent + errors >= due {
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        let k = (total - sent - errors).min(BATCH as u64) as usize;
        for j in 0..k {
            let tid: TransactionId = rand::random();
            let mut b = MessageBuilder::new(&mut msgs[j], method::ALLOCATE, Class::Request, tid);
            b.u32_attr(attr::REQUESTED_TRANSPORT, 17 << 24);
            b.fingerprint();
            let clen = pktinfo_cmsg(&mut cmsgs[j], source(n));
            n += 1;
            iovs[j] = libc::iovec {
                iov_base: msgs[j].as_mut_ptr() as *mut libc::c_void,
                iov_len: msgs[j].len(),
            };
            let h = &mut hdrs[j].msg_hdr;
            h.msg_name = &mut dst_st as *mut _ as *mut libc::c_void;
            h.msg_namelen = dst_len;
            h.msg_iov = &mut iovs[j];
            h.msg_iovlen = 1;
            h.msg_control = cmsgs[j].0.as_mut_ptr() as *mut libc::c_void;
            h.msg_controllen = clen as _;
            h.msg_flags = 0;
        }
        let s = &socks[(n as usize / BATCH) % SOCKETS];
        // SAFETY: headers point at buffers alive for the call.
        let r = unsafe { libc::sendmmsg(s.as_raw_fd(), hdrs.as_mut_ptr(), k as u32, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                std::thread::sleep(Duration::from_micros(50));
                n -= k as u64;
                continue;
            }
            if errors == 0 {
                eprintln!("alloc_flood: sendmmsg: {e}");
            }
            errors += k as u64;
        } else {
            sent += r as u64;
            n -= (k - r as usize) as u64;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    std::thread::sleep(Duration::from_millis(500));
    let peak = peak.finish();
    let after = o.pid.and_then(rss_kb);
    let answers = answers.load(Ordering::Relaxed);
    let growth = match (before, after) {
        (Some(b), Some(a)) => a as i64 - b as i64,
        _ => 0,
    };
    println!(
        "flood: {sent} unauthenticated Allocates from {} sources ({errors} send errors) in {secs:.1} s \
         ({:.0}/s), {answers} answered; server RSS {} -> {} KiB (peak {peak}), growth {growth} KiB",
        n.min(254 * 256 * 254),
        sent as f64 / secs,
        before.unwrap_or(0),
        after.unwrap_or(0),
    );
    println!(
        "RESULT mode=flood sent={sent} answered={answers} secs={secs:.2} rss_before_kb={} rss_after_kb={} rss_peak_kb={peak} growth_kb={growth}",
        before.unwrap_or(0),
        after.unwrap_or(0),
    );
    Ok(())
}

fn main() {
    let o = parse_args();
    let r = match o.mode.as_str() {
        "allocations" => allocations(&o),
        "flood" => flood(&o),
        _ => usage(),
    };
    if let Err(e) = r {
        eprintln!("alloc_flood: {e}");
        std::process::exit(1);
    }
}
