//! Link impairment without `netem`.
//!
//! * Loss: an nftables rule in the internet core, `numgen random mod 1000000
//!   < N drop`, on packets entering and leaving the link.
//! * Delay: a userspace delay element. A TUN device in the core namespace
//!   takes every packet to or from the link (policy routing: `iif <link>` and
//!   `to <prefixes>` look up a table whose default route is the TUN; packets
//!   coming back out of the TUN use the main table). A thread reads each
//!   packet, holds it for the delay and writes it back, where the kernel
//!   routes it on. The delay is one-way, applied in each direction.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::sys;
use crate::Error;

/// Impairment of one link, applied in both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Impairment {
    /// Probability that a packet is dropped, 0.0..=1.0, per direction.
    #[serde(default)]
    pub loss: f64,
    /// One-way delay added in each direction, milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
}

/// A blackhole on a direct path: what it drops while letting the rest
/// (STUN checks among it) through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Blackhole {
    /// WireGuard data messages (type 4: first UDP payload byte 0x04, as
    /// in `04 00 00 00`); STUN (first byte 0x00/0x01), handshakes and the
    /// rest pass.
    WireguardData,
    /// UDP datagrams whose payload is larger than this many bytes (an MTU
    /// blackhole: a small link MTU with the ICMP errors filtered).
    Above(u16),
}

/// The nftables ruleset (table `inet wgicebh`) that makes a router drop
/// `bh` on UDP to and from `peer` only, counting what it drops; with
/// `None`, just removes the table.
pub(crate) fn blackhole_ruleset(peer: std::net::Ipv4Addr, bh: Option<Blackhole>) -> String {
    let mut s = String::from(
        "add table inet wgicebh
delete table inet wgicebh
",
    );
    if let Some(bh) = bh {
        let m = match bh {
            // The 8 bits after the 8-byte UDP header.
            Blackhole::WireguardData => "@th,64,8 0x04".to_string(),
            // UDP length counts its 8-byte header.
            Blackhole::Above(n) => format!("udp length > {}", u32::from(n) + 8),
        };
        s.push_str(&format!(
            "table inet wgicebh {{
 chain bh {{
  type filter hook forward priority -5; policy accept;
               ip daddr {peer} meta l4proto udp {m} counter drop
               ip saddr {peer} meta l4proto udp {m} counter drop
 }}
}}
"
        ));
    }
    s
}

/// Installs (or with `loss == 0`, removes) the loss rule for one core-side
/// link interface.
pub(crate) fn apply_loss(inet_ns: &str, link_if: &str, loss: f64) -> Result<(), Error> {
    if !(0.0..=1.0).contains(&loss) {
        return Err(Error::Config(format!("loss {loss} is not within 0..=1")));
    }
    let table = format!("wgimp_{link_if}");
    let mut s = format!("add table ip {table}\ndelete table ip {table}\n");
    if loss > 0.0 {
        let n = (loss * 1_000_000.0).round() as u64;
        s.push_str(&format!(
            "table ip {table} {{\n  chain loss {{\n    type filter hook forward priority -5; policy accept;\n\
             \x20   iif \"{link_if}\" numgen random mod 1000000 < {n} drop\n\
             \x20   oif \"{link_if}\" numgen random mod 1000000 < {n} drop\n  }}\n}}\n"
        ));
    }
    sys::nft(inet_ns, &s)
}

/// A running delay element; stops and removes its routing on drop.
#[derive(Debug)]
pub(crate) struct DelayElement {
    inet_ns: String,
    tun: String,
    table: u32,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn open_tun(name: &str) -> std::io::Result<File> {
    let fd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    let n = name.len().min(libc::IFNAMSIZ - 1);
    req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which IfReq lays
    // out (16-byte name, flags, padding to 40 bytes).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: plain fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    Ok(fd)
}

impl DelayElement {
    /// Starts delaying every packet crossing core-side interface `link_if`
    /// (whose far side owns `prefixes`) by `delay`, through TUN device `tun`.
    pub(crate) fn start(
        inet_ns: &str,
        tun: &str,
        link_if: &str,
        prefixes: &[String],
        delay: Duration,
        lab_stop: Arc<AtomicBool>,
    ) -> Result<DelayElement, Error> {
        let name = tun.to_string();
        let file = sys::in_netns(inet_ns, move || open_tun(&name))??;
        let table = 1000
            + link_if
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .parse::<u32>()
                .unwrap_or(0);
        let mut cmds = vec![
            format!("link set {tun} up"),
            format!("route replace default dev {tun} table {table}"),
            format!("rule add pref 100 iif {tun} lookup main"),
            format!("rule add pref 200 iif {link_if} lookup {table}"),
        ];
        for p in prefixes {
            cmds.push(format!("rule add pref 200 to {p} lookup {table}"));
        }
        sys::sysctl(
            inet_ns,
            &format!("net/ipv4/conf/{tun}/rp_filter"),
            "0",
            true,
        )?;
        sys::ip_batch(Some(inet_ns), &cmds)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("delay-{tun}"))
            .spawn(move || delay_loop(file, delay, s2, lab_stop))?;
        Ok(DelayElement {
            inet_ns: inet_ns.to_string(),
            tun: tun.to_string(),
            table,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DelayElement {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Remove our rules (the TUN and its routes vanish with its fd).
        let out = sys::run("ip", &["-n", &self.inet_ns, "rule", "show"]).unwrap_or_default();
        let mut cmds = Vec::new();
        for line in out.lines() {
            if line.contains(&format!("lookup {}", self.table))
                || line.contains(&format!("iif {} lookup main", self.tun))
            {
                let rule = line.split_once(':').map(|(_, r)| r.trim()).unwrap_or("");
                let pref = line.split(':').next().unwrap_or("").trim();
                cmds.push(format!("rule del pref {pref} {rule}"));
            }
        }
        let _ = sys::ip_batch(Some(&self.inet_ns), &cmds);
    }
}

fn delay_loop(mut tun: File, delay: Duration, stop: Arc<AtomicBool>, lab_stop: Arc<AtomicBool>) {
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) && !lab_stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while let Some((due, _)) = queue.front() {
            if *due > now {
                break;
            }
            if let Some((_, pkt)) = queue.pop_front() {
                let _ = tun.write(&pkt);
            }
        }
        let wait = queue
            .front()
            .map(|(due, _)| due.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(50))
            .min(Duration::from_millis(50));
        let mut pfd = libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: wait.as_nanos() as libc::c_long,
        };
        // SAFETY: one valid pollfd, valid timespec, no signal mask.
        unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        loop {
            match tun.read(&mut buf) {
                Ok(n) if n > 0 => queue.push_back((Instant::now() + delay, buf[..n].to_vec())),
                _ => break,
            }
        }
    }
}
