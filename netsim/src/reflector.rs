//! A small address reflector with two addresses and two ports, and the
//! client side behind the [`BindingTransport`] trait.
//!
//! This stands in for an RFC 5780 STUN server until the project's `relay`
//! lands: a request asks for the source address the server saw, optionally
//! answered from the other IP and/or other port (STUN's CHANGE-REQUEST), and
//! optionally after a delay (to test whether an idle mapping has expired).
//! Wire format, one datagram each way, ASCII:
//!
//! ```text
//! request:  WGREFL1 <txid> <flags> <delay_ms>     flags: "-", "i", "p" or "ip"
//! response: WGREFL1 <txid> <seen ip:port>
//! ```
//!
//! The server also accepts TCP on port 443 of its first address and writes
//! `WGREFL1 tcp <seen ip:port>\n`, to tell "UDP blocked" from "unreachable".

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::lab::Lab;
use crate::Error;

/// First port the reflector listens on.
pub const PORT_A: u16 = 3478;
/// Second port the reflector listens on.
pub const PORT_B: u16 = 3479;
const MAGIC: &str = "WGREFL1";

/// What a binding request asks the server to do with its answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Answer from the server's other IP address.
    pub ip: bool,
    /// Answer from the server's other port.
    pub port: bool,
}

/// A binding answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindingResponse {
    /// The source address the server saw (server-reflexive address).
    pub mapped: SocketAddr,
    /// The address the answer came from.
    pub from: SocketAddr,
}

/// A server that tells a client its reflexive address and can answer from a
/// second IP and port (RFC 5780 behaviour discovery). The built-in
/// [`ReflectorClient`] implements it; a STUN client against the project's
/// `relay` can replace it.
pub trait BindingTransport: Sync {
    /// Sends a binding request from `sock` to `server` and waits up to
    /// `timeout` (retransmitting) for the answer; `Ok(None)` on timeout.
    fn binding(
        &self,
        sock: &UdpSocket,
        server: SocketAddr,
        change: Change,
        timeout: Duration,
    ) -> std::io::Result<Option<BindingResponse>>;

    /// Asks `server` to answer once, `delay` from now, to the address it sees;
    /// does not wait for the answer (used to probe mapping lifetime).
    fn delayed_binding(
        &self,
        sock: &UdpSocket,
        server: SocketAddr,
        delay: Duration,
    ) -> std::io::Result<()>;
}

/// Client for the built-in reflector.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReflectorClient;

fn flags(c: Change) -> &'static str {
    match (c.ip, c.port) {
        (false, false) => "-",
        (true, false) => "i",
        (false, true) => "p",
        (true, true) => "ip",
    }
}

/// Parses a reflector answer; `None` when it is not one.
pub fn parse_response(buf: &[u8]) -> Option<(u64, SocketAddr)> {
    let s = std::str::from_utf8(buf).ok()?;
    let mut it = s.split_whitespace();
    if it.next()? != MAGIC {
        return None;
    }
    let tx = it.next()?.parse().ok()?;
    let seen = it.next()?.parse().ok()?;
    Some((tx, seen))
}

impl BindingTransport for ReflectorClient {
    fn binding(
        &self,
        sock: &UdpSocket,
        server: SocketAddr,
        change: Change,
        timeout: Duration,
    ) -> std::io::Result<Option<BindingResponse>> {
        let tx: u64 = rand::random();
        let req = format!("{MAGIC} {tx} {} 0", flags(change));
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 1500];
        let mut next_send = Instant::now();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            if now >= next_send {
                let _ = sock.send_to(req.as_bytes(), server);
                next_send = now + Duration::from_millis(100);
            }
            let wait = next_send
                .min(deadline)
                .saturating_duration_since(Instant::now());
            sock.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Some((t, mapped)) = parse_response(&buf[..n]) {
                        if t == tx {
                            return Ok(Some(BindingResponse { mapped, from }));
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                // ICMP errors (e.g. from a LAN-side reject) surface here.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn delayed_binding(
        &self,
        sock: &UdpSocket,
        server: SocketAddr,
        delay: Duration,
    ) -> std::io::Result<()> {
        let tx: u64 = rand::random();
        let req = format!("{MAGIC} {tx} - {}", delay.as_millis());
        sock.send_to(req.as_bytes(), server).map(drop)
    }
}

/// A running reflector; stops on drop.
#[derive(Debug)]
pub struct Reflector {
    /// First address (with [`PORT_A`]): where clients send.
    pub primary: SocketAddr,
    /// Second address (with [`PORT_B`]): the RFC 5780 OTHER-ADDRESS.
    pub alternate: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Reflector {
    /// Starts a reflector on a public host of `lab` that has two addresses.
    pub fn start(lab: &Lab, host: &str) -> Result<Reflector, Error> {
        let ips = lab.host_ips(host)?;
        if ips.len() < 2 {
            return Err(Error::Config(format!(
                "reflector host {host} needs two addresses, has {}",
                ips.len()
            )));
        }
        let (ip1, ip2) = (ips[0], ips[1]);
        let addrs = [
            SocketAddrV4::new(ip1, PORT_A),
            SocketAddrV4::new(ip1, PORT_B),
            SocketAddrV4::new(ip2, PORT_A),
            SocketAddrV4::new(ip2, PORT_B),
        ];
        let mut socks = Vec::new();
        for a in addrs {
            let s = lab.udp_socket_on(host, a)?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            socks.push(s);
        }
        let tcp = lab.in_node(host, move || TcpListener::bind(SocketAddrV4::new(ip1, 443)))??;
        tcp.set_nonblocking(true)?;
        let socks = Arc::new(socks);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..4 {
            let socks = socks.clone();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || serve_udp(i, &socks, &stop)));
        }
        {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || serve_tcp(tcp, &stop)));
        }
        Ok(Reflector {
            primary: SocketAddr::V4(addrs[0]),
            alternate: SocketAddr::V4(addrs[3]),
            stop,
            threads,
        })
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Socket index layout: bit 1 = second IP, bit 0 = second port.
fn serve_udp(i: usize, socks: &Arc<Vec<UdpSocket>>, stop: &Arc<AtomicBool>) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = socks[i].recv_from(&mut buf) else {
            continue;
        };
        let Ok(s) = std::str::from_utf8(&buf[..n]) else {
            continue;
        };
        let mut it = s.split_whitespace();
        if it.next() != Some(MAGIC) {
            continue;
        }
        let (Some(tx), Some(fl), delay) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let mut j = i;
        if fl.contains('i') {
            j ^= 2;
        }
        if fl.contains('p') {
            j ^= 1;
        }
        let resp = format!("{MAGIC} {tx} {from}");
        let delay: u64 = delay.and_then(|d| d.parse().ok()).unwrap_or(0);
        if delay == 0 {
            let _ = socks[j].send_to(resp.as_bytes(), from);
        } else {
            let socks = socks.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_millis(delay.min(600_000));
                while Instant::now() < until {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = socks[j].send_to(resp.as_bytes(), from);
            });
        }
    }
}

fn serve_tcp(l: TcpListener, stop: &Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((mut s, from)) => {
                let _ = s.write_all(format!("{MAGIC} tcp {from}\n").as_bytes());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Connects over TCP to the reflector's port 443 from inside `node` and
/// returns the address it saw, or `None` when the connection fails.
pub fn tcp443_probe(lab: &Lab, node: &str, server: Ipv4Addr) -> Result<Option<SocketAddr>, Error> {
    lab.in_node(node, move || {
        let addr = SocketAddr::V4(SocketAddrV4::new(server, 443));
        // Two tries: a lost SYN costs a 1 s retransmission on a busy machine.
        (0..2).find_map(|_| {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(1500)).ok()?;
            s.set_read_timeout(Some(Duration::from_millis(1500))).ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            out.split_whitespace().nth(2)?.parse().ok()
        })
    })
}
