//! A built-in simultaneous UDP hole-punching probe: two devices learn their
//! reflexive addresses from the reflector, swap candidates (host and
//! server-reflexive) in process, then both send pings to every candidate
//! of the other and answer each ping to the address it came from (which
//! discovers peer-reflexive addresses, as ICE does). The path is up when both
//! sides have received a pong.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::lab::Lab;
use crate::reflector::{BindingTransport, Change};
use crate::Error;

/// The kind of path two devices ended up with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// Straight over the shared LAN (host candidates).
    Lan,
    /// Directly across the NATs (reflexive candidates).
    Direct,
    /// Through a relay (not produced by the built-in probe, which has none).
    Relay,
    /// No path.
    None,
}

impl PathKind {
    /// Name as printed in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Lan => "lan",
            PathKind::Direct => "direct",
            PathKind::Relay => "relay",
            PathKind::None => "none",
        }
    }
}

impl std::str::FromStr for PathKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "lan" => PathKind::Lan,
            "direct" => PathKind::Direct,
            "relay" => PathKind::Relay,
            "none" => PathKind::None,
            _ => return Err(Error::Config(format!("unknown path kind {s:?}"))),
        })
    }
}

/// Outcome of one punch.
#[derive(Clone, Debug, Serialize)]
pub struct PunchResult {
    /// Path reached.
    pub path: PathKind,
    /// Milliseconds from the start of punching until both sides had a pong
    /// (`None` when no path).
    pub ms_to_connect: Option<u64>,
    /// Reflexive addresses learned by each side (`None` without UDP).
    pub reflexive: [Option<SocketAddr>; 2],
}

struct Side {
    sock: UdpSocket,
    host: SocketAddr,
    srflx: Option<SocketAddr>,
}

/// Punches between devices `a` and `b` for at most `budget`.
pub fn punch(
    lab: &Lab,
    a: &str,
    b: &str,
    transport: &dyn BindingTransport,
    reflector: SocketAddr,
    budget: Duration,
) -> Result<PunchResult, Error> {
    punch_predicting(lab, a, b, transport, reflector, budget, 0)
}

/// Like [`punch`], also sending to the `predict` ports after each side's
/// reflexive port (port prediction against sequential symmetric NATs).
pub fn punch_predicting(
    lab: &Lab,
    a: &str,
    b: &str,
    transport: &dyn BindingTransport,
    reflector: SocketAddr,
    budget: Duration,
    predict: u16,
) -> Result<PunchResult, Error> {
    let mk = |dev: &str| -> Result<Side, Error> {
        let sock = lab.udp_socket(dev, 0)?;
        let host = SocketAddr::new(lab.ip(dev)?.into(), sock.local_addr()?.port());
        let srflx = transport
            .binding(
                &sock,
                reflector,
                Change::default(),
                Duration::from_millis(1500),
            )?
            .map(|r| r.mapped);
        Ok(Side { sock, host, srflx })
    };
    let (sa, sb) = (mk(a)?, mk(b)?);
    let reflexive = [sa.srflx, sb.srflx];
    let cand = |s: &Side| -> Vec<SocketAddr> {
        let mut v = vec![s.host];
        if let Some(r) = s.srflx.filter(|r| *r != s.host) {
            v.push(r);
            v.extend(
                (1..=predict)
                    .filter_map(|i| r.port().checked_add(i))
                    .map(|p| SocketAddr::new(r.ip(), p)),
            );
        }
        v
    };
    let (ca, cb) = (cand(&sa), cand(&sb));
    let tag: u64 = rand::random();
    let done = [
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    ];
    let start = Instant::now();
    let deadline = start + budget;
    let results = std::thread::scope(|sc| {
        let ha = sc.spawn(|| run_side(&sa.sock, &cb, tag, 0, &done, deadline));
        let hb = sc.spawn(|| run_side(&sb.sock, &ca, tag, 1, &done, deadline));
        (ha.join().ok().flatten(), hb.join().ok().flatten())
    });
    let (Some((ta, via_a)), Some((tb, _))) = results else {
        return Ok(PunchResult {
            path: PathKind::None,
            ms_to_connect: None,
            reflexive,
        });
    };
    let same_lan = lab.router_of(a)? == lab.router_of(b)?;
    let path = if same_lan && via_a == sb.host {
        PathKind::Lan
    } else {
        PathKind::Direct
    };
    let ms = ta.max(tb).duration_since(start).as_millis() as u64;
    Ok(PunchResult {
        path,
        ms_to_connect: Some(ms),
        reflexive,
    })
}

/// One side: ping every candidate every 20 ms, answer pings, stop when both
/// sides are done or at the deadline. Returns when and from where the first
/// pong came.
fn run_side(
    sock: &UdpSocket,
    remote: &[SocketAddr],
    tag: u64,
    me: usize,
    done: &[Arc<AtomicBool>; 2],
    deadline: Instant,
) -> Option<(Instant, SocketAddr)> {
    let ping = format!("WGPUNCH {tag} ping {me}");
    let pong = format!("WGPUNCH {tag} pong {me}");
    let other_ping = format!("WGPUNCH {tag} ping {}", 1 - me);
    let other_pong = format!("WGPUNCH {tag} pong {}", 1 - me);
    let mut targets: Vec<SocketAddr> = remote.to_vec();
    let mut got: Option<(Instant, SocketAddr)> = None;
    let mut buf = [0u8; 1500];
    let mut next_send = Instant::now();
    let _ = sock.set_read_timeout(Some(Duration::from_millis(5)));
    while Instant::now() < deadline {
        if done[0].load(Ordering::SeqCst) && done[1].load(Ordering::SeqCst) {
            break;
        }
        if Instant::now() >= next_send {
            for t in &targets {
                let _ = sock.send_to(ping.as_bytes(), t);
            }
            next_send = Instant::now() + Duration::from_millis(20);
        }
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let msg = &buf[..n];
            if msg == other_ping.as_bytes() {
                let _ = sock.send_to(pong.as_bytes(), from);
                if !targets.contains(&from) {
                    targets.push(from);
                }
            } else if msg == other_pong.as_bytes() && got.is_none() {
                got = Some((Instant::now(), from));
                done[me].store(true, Ordering::SeqCst);
            }
        }
    }
    got
}
