//! Benchmark: our `relay` against coturn's `turnserver` on this machine, in
//! one run, driven by the same load generator.
//!
//! Load: `turnutils_uclient -c -l 1200` (ChannelData, 1200-byte payloads,
//! long-term credentials) with `turnutils_peer` as echo peer, for 1/10/40/100
//! clients (`-m`) at increasing rates (`-z` ms between packets per client).
//! For every run it measures:
//! - server CPU time (utime+stime from `/proc/PID/stat`, before/after) per
//!   relayed packet; relayed packets are our relay's own counters
//!   (`relay_packets_to_peer_total + relay_packets_to_client_total`) and, for
//!   coturn, uclient's sent + received totals;
//! - the relayed packet rate: uclient prints its cumulative totals once a
//!   second; the best one-second window of (sent+received)/s is the rate
//!   (clients start at random times in uclient's first 1–6 s, so the mean
//!   over the whole run understates the plateau);
//! - loss (sent − received once the counts stop moving).
//!
//! Then memory: RSS per allocation with 10,000 allocations, and RSS growth
//! under 1,000,000 unauthenticated Allocates from spoofed-looking loopback
//! sources (both with the `alloc_flood` example).
//!
//! Run it with `bash relay/bench/relay-vs-coturn.sh` (builds in release and
//! runs this). Options: `--quick` (fewer steps), `--no-memory`,
//! `--coturn-flood N` (default 100000: coturn keeps a session per source),
//! `--steps M:Z:N,…` (own load steps), `--only relay|coturn`,
//! `--nice-load N` (run uclient and the peer at niceness N, e.g. -10, so the
//! server rather than a starved generator/peer is what drops first).
//! Everything is on loopback (servers on 127.0.0.1, the echo peer on
//! 127.0.0.2); every process it starts is killed on exit.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

// ------------------------------------------------------------ processes

struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    fn spawn(mut cmd: Command, log: Option<&Path>) -> Proc {
        let what = format!("{:?}", cmd.get_program());
        cmd.stdin(Stdio::null());
        match log.and_then(|p| std::fs::File::create(p).ok()) {
            Some(f) => {
                let f2 = f.try_clone().expect("dup log");
                cmd.stdout(f).stderr(f2);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Proc { child, what }
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    for _ in 0..100 {
        let Ok(u) = UdpSocket::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(a) = u.local_addr() else { continue };
        if TcpListener::bind(a).is_ok() {
            return a.port();
        }
    }
    panic!("no free port");
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// (utime, stime) of a process (all threads), in seconds.
fn cpu_secs(pid: u32) -> (f64, f64) {
    let nan = (f64::NAN, f64::NAN);
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return nan;
    };
    // Fields after the parenthesised comm; utime and stime are fields 14 and 15.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return nan;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    (ut / clk_tck(), st / clk_tck())
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// (busy, total) jiffies of the whole machine.
fn machine_jiffies() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(l) = s.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = l
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// System-wide UDP receive-buffer drops (/proc/net/snmp RcvbufErrors).
fn udp_rcvbuf_errors() -> u64 {
    let s = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = s.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(h), Some(v)) = (udp.next(), udp.next()) else {
        return 0;
    };
    let i = h.split_whitespace().position(|x| x == "RcvbufErrors");
    i.and_then(|i| v.split_whitespace().nth(i))
        .and_then(|x| x.parse().ok())
        .unwrap_or(0)
}

/// Receive-queue drops per local UDP port (IPv4 sockets of this namespace),
/// from the last column of /proc/net/udp. Sockets closed meanwhile vanish,
/// so take the second snapshot before killing the load generator.
fn udp_drops_by_port() -> std::collections::HashMap<u16, u64> {
    let mut m = std::collections::HashMap::new();
    let s = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    for l in s.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (Some(local), Some(drops)) = (f.get(1), f.last()) else {
            continue;
        };
        let Some(port) = local
            .split(':')
            .nth(1)
            .and_then(|p| u16::from_str_radix(p, 16).ok())
        else {
            continue;
        };
        *m.entry(port).or_insert(0) += drops.parse::<u64>().unwrap_or(0);
    }
    m
}

/// Where the drops of a run happened: the server's listening socket, its
/// relayed sockets, the echo peer, the load generator's sockets.
fn drop_places(
    before: &std::collections::HashMap<u16, u64>,
    after: &std::collections::HashMap<u16, u64>,
    server: &Server,
    peer_port: u16,
) -> String {
    let (mut listen, mut relayed, mut peer, mut other) = (0u64, 0u64, 0u64, 0u64);
    for (port, d) in after {
        let d = d.saturating_sub(before.get(port).copied().unwrap_or(0));
        if *port == server.port {
            listen += d;
        } else if *port == peer_port {
            peer += d;
        } else if (server.relay_ports.0..=server.relay_ports.1).contains(port) {
            relayed += d;
        } else {
            other += d;
        }
    }
    let mut parts = Vec::new();
    for (n, v) in [
        ("server-listen", listen),
        ("server-relayed", relayed),
        ("peer", peer),
        ("uclient", other),
    ] {
        if v > 0 {
            parts.push(format!("{n} {v}"));
        }
    }
    parts.join(", ")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ------------------------------------------------------------ servers

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Coturn,
    Ours,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Coturn => "coturn",
            Kind::Ours => "relay",
        }
    }
}

struct Server {
    kind: Kind,
    proc: Proc,
    port: u16,
    relay_ports: (u16, u16),
    metrics: Option<SocketAddr>,
}

impl Server {
    fn relayed_counter(&self) -> Option<u64> {
        let m = self.metrics?;
        let mut s = TcpStream::connect(m).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        let get = |name: &str| -> Option<u64> {
            body.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
                .and_then(|v| v.trim().parse().ok())
        };
        Some(get("relay_packets_to_peer_total")? + get("relay_packets_to_client_total")?)
    }
}

fn wait_stun(port: u16) -> bool {
    use relay::stun::{attr, method, Class, Message, MessageBuilder};
    let Ok(s) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let tid: [u8; 12] = rand::random();
    let mut req = Vec::new();
    MessageBuilder::new(&mut req, method::BINDING, Class::Request, tid).fingerprint();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let _ = s.send_to(&req, ("127.0.0.1", port));
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            if Message::parse(&buf[..n]).is_ok_and(|m| {
                m.transaction_id() == tid && m.get(attr::XOR_MAPPED_ADDRESS).is_some()
            }) {
                return true;
            }
        }
    }
    false
}

fn start_coturn(dir: &Path) -> Server {
    let port = free_port();
    let mut cmd = Command::new("turnserver");
    cmd.args([
        "--no-cli",
        "--lt-cred-mech",
        "--user",
        "u:p",
        "--realm",
        "r",
    ]);
    cmd.args([
        "--listening-ip",
        "127.0.0.1",
        "--listening-port",
        &port.to_string(),
    ]);
    cmd.args([
        "--relay-ip",
        "127.0.0.1",
        "--min-port",
        "40000",
        "--max-port",
        "59999",
    ]);
    cmd.args([
        "--allow-loopback-peers",
        "--no-tls",
        "--no-dtls",
        "--simple-log",
    ]);
    cmd.arg("--log-file").arg(dir.join("turnserver.log"));
    cmd.arg("--db").arg(dir.join("turndb"));
    cmd.arg("--pidfile").arg(dir.join("turnserver.pid"));
    let proc = Proc::spawn(cmd, Some(&dir.join("turnserver.out")));
    assert!(
        wait_stun(port),
        "turnserver did not answer on 127.0.0.1:{port}; see {}",
        dir.display()
    );
    Server {
        kind: Kind::Coturn,
        proc,
        port,
        relay_ports: (40000, 59999),
        metrics: None,
    }
}

fn start_ours(bin: &Path, dir: &Path) -> Server {
    let port = free_port();
    let mport = free_port();
    let mut cmd = Command::new(bin);
    cmd.args([
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--user",
        "u:p",
        "--realm",
        "r",
    ]);
    cmd.args([
        "--allow-peer",
        "127.0.0.0/8",
        "--relay-ports",
        "20000-31999",
    ]);
    cmd.args([
        "--metrics",
        &format!("127.0.0.1:{mport}"),
        "--log-level",
        "warn",
    ]);
    let proc = Proc::spawn(cmd, Some(&dir.join("relay.log")));
    assert!(
        wait_stun(port),
        "relay did not answer on 127.0.0.1:{port}; see {}",
        dir.display()
    );
    Server {
        kind: Kind::Ours,
        proc,
        port,
        relay_ports: (20000, 31999),
        metrics: Some(SocketAddr::from(([127, 0, 0, 1], mport))),
    }
}

// ------------------------------------------------------------ load

#[derive(Debug, Clone)]
struct Run {
    server: Kind,
    m: u32,
    z: u32,
    n: u32,
    sent: u64,
    recv: u64,
    lost: u64,
    peak_pps: f64,
    mean_pps: f64,
    cpu_s: f64,
    relayed: u64,
    us_per_pkt: f64,
    usr_us_per_pkt: f64,
    busy_pct: f64,
    rcvbuf_drops: u64,
    note: &'static str,
    drop_places: String,
}

fn parse_num(line: &str, key: &str) -> Option<u64> {
    let i = line.find(key)? + key.len();
    line[i..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .ok()
}

/// Niceness for the load generator and the echo peer (`--nice-load N`): a
/// negative value lets them preempt the server under test, so that drops
/// show the server's limit rather than a starved generator or peer.
static LOAD_NICE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

fn load_command(tool: &str) -> Command {
    let nice = LOAD_NICE.load(std::sync::atomic::Ordering::Relaxed);
    if nice == 0 {
        return Command::new(tool);
    }
    let mut c = Command::new("nice");
    c.args(["-n", &nice.to_string(), tool]);
    c
}

fn uclient(server: &mut Server, peer_port: u16, m: u32, z: u32, n: u32) -> Run {
    let mut cmd = load_command("turnutils_uclient");
    cmd.args(["-c", "-l", "1200", "-u", "u", "-w", "p"]);
    cmd.args([
        "-m",
        &m.to_string(),
        "-z",
        &z.to_string(),
        "-n",
        &n.to_string(),
    ]);
    cmd.args([
        "-e",
        "127.0.0.2",
        "-r",
        &peer_port.to_string(),
        "-p",
        &server.port.to_string(),
        "127.0.0.1",
    ]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let cpu0 = cpu_secs(server.proc.pid());
    let ctr0 = server.relayed_counter();
    let mach0 = machine_jiffies();
    let drops0 = udp_rcvbuf_errors();
    let by_port0 = udp_drops_by_port();
    let mut child = cmd.spawn().expect("turnutils_uclient");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    let total = m as u64 * n as u64;
    let started = Instant::now();
    let mut samples: Vec<(Instant, u64, u64)> = Vec::new();
    let (mut sent, mut recv) = (0u64, 0u64);
    let mut final_lost: Option<u64> = None;
    let mut last_change = Instant::now();
    let mut note = "";
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((t, line)) => {
                if line.contains("tot_send_msgs=") {
                    let s = parse_num(&line, "tot_send_msgs=").unwrap_or(sent);
                    let r = parse_num(&line, "tot_recv_msgs=").unwrap_or(recv);
                    if (s, r) != (sent, recv) {
                        last_change = t;
                    }
                    (sent, recv) = (s, r);
                    if line.contains("msz=") {
                        samples.push((t, s, r));
                    }
                }
                if line.contains("Total lost packets") {
                    final_lost = parse_num(&line, "Total lost packets");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        // Everything sent and the counts stopped moving: the rest is lost;
        // do not sit through uclient's 10-second stopping time.
        if sent >= total && last_change.elapsed() > Duration::from_millis(1500) {
            note = "stalled";
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            note = "timeout";
            break;
        }
        if !server.proc.alive() {
            note = "SERVER DIED";
            break;
        }
    }
    let by_port1 = udp_drops_by_port();
    let _ = child.kill();
    let _ = child.wait();
    if !server.proc.alive() {
        note = "SERVER DIED";
    }
    if samples.last().is_some_and(|l| l.1 < sent || l.2 < recv) {
        samples.push((last_change, sent, recv));
    }
    let cpu1 = cpu_secs(server.proc.pid());
    let ctr1 = server.relayed_counter();
    let mach1 = machine_jiffies();
    let drops1 = udp_rcvbuf_errors();
    // Best one-second window and mean over the active period.
    let mut peak: f64 = 0.0;
    for w in samples.windows(2) {
        let dt = w[1].0.duration_since(w[0].0).as_secs_f64();
        if dt >= 0.5 {
            peak = peak.max(((w[1].1 + w[1].2) - (w[0].1 + w[0].2)) as f64 / dt);
        }
    }
    let first = samples.iter().rposition(|s| s.1 == 0).map(|i| samples[i].0);
    let mean = match first {
        Some(t0) => (sent + recv) as f64 / last_change.duration_since(t0).as_secs_f64().max(1e-3),
        None => 0.0,
    };
    let relayed = match (server.kind, ctr0, ctr1) {
        (Kind::Ours, Some(a), Some(b)) => b - a,
        _ => sent + recv,
    };
    let cpu = (cpu1.0 + cpu1.1) - (cpu0.0 + cpu0.1);
    let usr = cpu1.0 - cpu0.0;
    let (b0, t0) = mach0;
    let (b1, t1) = mach1;
    Run {
        server: server.kind,
        m,
        z,
        n,
        sent,
        recv,
        lost: final_lost.unwrap_or(sent.saturating_sub(recv)),
        peak_pps: peak,
        mean_pps: mean,
        cpu_s: cpu,
        relayed,
        us_per_pkt: cpu * 1e6 / relayed.max(1) as f64,
        usr_us_per_pkt: usr * 1e6 / relayed.max(1) as f64,
        busy_pct: 100.0 * (b1 - b0) as f64 / (t1 - t0).max(1) as f64,
        rcvbuf_drops: drops1 - drops0,
        drop_places: drop_places(&by_port0, &by_port1, server, peer_port),
        note,
    }
}

fn print_header() {
    println!(
        "{:<7} {:>4} {:>3} {:>6} {:>8} {:>8} {:>6} {:>9} {:>9} {:>7} {:>9} {:>7} {:>7} {:>6} {:>6}  note / where drops happened",
        "server",
        "-m",
        "-z",
        "-n",
        "sent",
        "recv",
        "lost",
        "peak/s",
        "mean/s",
        "cpu s",
        "relayed",
        "µs/pkt",
        "usr µs",
        "busy%",
        "drops"
    );
}

fn print_run(r: &Run) {
    println!(
        "{:<7} {:>4} {:>3} {:>6} {:>8} {:>8} {:>6} {:>9.0} {:>9.0} {:>7.2} {:>9} {:>7.2} {:>7.2} {:>6.0} {:>6}  {}",
        r.server.name(),
        r.m,
        r.z,
        r.n,
        r.sent,
        r.recv,
        r.lost,
        r.peak_pps,
        r.mean_pps,
        r.cpu_s,
        r.relayed,
        r.us_per_pkt,
        r.usr_us_per_pkt,
        r.busy_pct,
        r.rcvbuf_drops,
        [r.note, &r.drop_places].iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>().join(": ")
    );
}

// ------------------------------------------------------------ memory

fn alloc_flood(tool: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new(tool)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for l in text.lines().filter(|l| !l.starts_with("RESULT")) {
        println!("  {l}");
    }
    text.lines()
        .find(|l| l.starts_with("RESULT"))
        .map(str::to_owned)
}

fn result_num(result: &str, key: &str) -> f64 {
    result
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

// ------------------------------------------------------------ main

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let memory = !args.iter().any(|a| a == "--no-memory");
    let coturn_flood: u64 = args
        .iter()
        .position(|a| a == "--coturn-flood")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    if let Some(n) = args
        .iter()
        .position(|a| a == "--nice-load")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<i32>().ok())
    {
        LOAD_NICE.store(n, std::sync::atomic::Ordering::Relaxed);
        println!("# load generator and echo peer run at nice {n}");
    }
    for t in ["turnserver", "turnutils_uclient", "turnutils_peer"] {
        if !have(t) {
            eprintln!("relay_vs_coturn: {t} not found (apt-get install coturn)");
            std::process::exit(2);
        }
    }
    let exe = std::env::current_exe().expect("current exe");
    let examples = exe.parent().expect("examples dir").to_path_buf();
    let bin: PathBuf = std::env::var_os("RELAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| examples.parent().expect("target dir").join("relay"));
    let flood_tool = examples.join("alloc_flood");
    assert!(
        bin.is_file(),
        "relay binary not found at {} (set RELAY_BIN)",
        bin.display()
    );
    let dir = std::env::temp_dir().join(format!("relay-vs-coturn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let version = Command::new("turnserver")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let t_start = Instant::now();
    println!(
        "# relay vs coturn {version} — {} CPUs, load {} at start",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    println!("# logs in {}", dir.display());

    let peer_port = free_port();
    let mut pc = load_command("turnutils_peer");
    // Not 127.0.0.1: that is our relay's own address, which no --allow-peer opens.
    pc.args(["-L", "127.0.0.2", "-p", &peer_port.to_string()]);
    let _peer = Proc::spawn(pc, None);
    let mut coturn = start_coturn(&dir);
    let mut ours = start_ours(&bin, &dir);
    std::thread::sleep(Duration::from_millis(300));

    // (clients, interval ms, packets per client): each client sends for
    // about n·z ms; uclient starts clients at random within 1–6 s.
    let custom: Option<Vec<(u32, u32, u32)>> = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.split(',')
                .filter_map(|st| {
                    let p: Vec<u32> = st.split(':').filter_map(|x| x.parse().ok()).collect();
                    (p.len() == 3).then(|| (p[0], p[1], p[2]))
                })
                .collect()
        });
    let only: Option<String> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let steps: Vec<(u32, u32, u32)> = if let Some(c) = custom {
        c
    } else if quick {
        vec![(1, 1, 2000), (40, 1, 5000), (100, 2, 2500), (100, 1, 5000)]
    } else {
        vec![
            (1, 1, 3000),
            (10, 1, 5000),
            (40, 2, 2500),
            (40, 1, 5000),
            (100, 4, 1250),
            (100, 2, 2500),
            (70, 1, 5000),
            (100, 1, 5000),
        ]
    };
    // Warm-up (first allocations, page faults).
    let _ = uclient(&mut coturn, peer_port, 2, 5, 50);
    let _ = uclient(&mut ours, peer_port, 2, 5, 50);
    println!();
    print_header();
    let mut runs = Vec::new();
    for (i, &(m, z, n)) in steps.iter().enumerate() {
        // Alternate who goes first so slow drift in machine load hits both.
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for o in order {
            let s = if o == 0 { &mut coturn } else { &mut ours };
            if only.as_deref().is_some_and(|k| k != s.kind.name()) {
                continue;
            }
            let mut r = uclient(s, peer_port, m, z, n);
            if r.note == "SERVER DIED" {
                // Something outside killed it (e.g. a `pkill -x turnserver` in
                // another session's setup script): report, restart, run again.
                print_run(&r);
                println!(
                    "# {} died during this run; restarting it and repeating the run",
                    s.kind.name()
                );
                *s = match s.kind {
                    Kind::Coturn => start_coturn(&dir),
                    Kind::Ours => start_ours(&bin, &dir),
                };
                r = uclient(s, peer_port, m, z, n);
            }
            print_run(&r);
            runs.push(r);
        }
    }

    println!();
    println!("## summary (load {} now)", loadavg());
    // Best rate among runs whose loss is at most `tolerance` (fraction of sent).
    let best = |k: Kind, tolerance: f64| -> Option<&Run> {
        runs.iter()
            .filter(|r| {
                r.server == k && r.sent > 0 && r.note != "SERVER DIED" && r.note != "timeout"
            })
            .filter(|r| r.lost as f64 <= tolerance * r.sent as f64)
            .max_by(|a, b| a.peak_pps.total_cmp(&b.peak_pps))
    };
    let lossfree = |k: Kind| best(k, 0.0);
    let cpu_all = |k: Kind| -> f64 {
        let (c, p) = runs
            .iter()
            .filter(|r| r.server == k)
            .fold((0.0, 0u64), |(c, p), r| (c + r.cpu_s, p + r.relayed));
        c * 1e6 / p.max(1) as f64
    };
    let at = |k: Kind, m: u32, z: u32| {
        runs.iter()
            .find(|r| r.server == k && r.m == m && r.z == z)
            .map(|r| r.us_per_pkt)
    };
    let (c_ref, o_ref) = (at(Kind::Coturn, 40, 1), at(Kind::Ours, 40, 1));
    if let (Some(c), Some(o)) = (c_ref, o_ref) {
        println!("CPU per relayed packet at -m 40 -z 1: coturn {c:.2} µs, relay {o:.2} µs, ours/coturn = {:.2} (target <= 0.50)", o / c);
    }
    let usr_all = |k: Kind| -> f64 {
        let (c, p) = runs
            .iter()
            .filter(|r| r.server == k)
            .fold((0.0, 0u64), |(c, p), r| {
                (c + r.usr_us_per_pkt * r.relayed as f64, p + r.relayed)
            });
        c / p.max(1) as f64
    };
    let (c_all, o_all) = (cpu_all(Kind::Coturn), cpu_all(Kind::Ours));
    let (cu, ou) = (usr_all(Kind::Coturn), usr_all(Kind::Ours));
    println!("  of which user space, all runs:       coturn {cu:.2} µs, relay {ou:.2} µs (the rest is the kernel's UDP path, the same work for both)");
    println!("CPU per relayed packet, all runs:      coturn {c_all:.2} µs, relay {o_all:.2} µs, ours/coturn = {:.2}", o_all / c_all);
    for (label, tol, target) in [
        (
            "highest loss-free relayed packets/s:  ",
            0.0,
            " (target >= 1.5)",
        ),
        ("highest with loss <= 0.1%:            ", 0.001, ""),
    ] {
        match (best(Kind::Coturn, tol), best(Kind::Ours, tol)) {
            (Some(c), Some(o)) => println!(
                "{label} coturn {:.0} (-m {} -z {}), relay {:.0} (-m {} -z {}), ours/coturn = {:.2}{target}",
                c.peak_pps,
                c.m,
                c.z,
                o.peak_pps,
                o.m,
                o.z,
                o.peak_pps / c.peak_pps
            ),
            (c, o) => println!("{label} coturn {:?}, relay {:?}", c.map(|r| r.peak_pps), o.map(|r| r.peak_pps)),
        }
    }
    let top = steps.iter().map(|s| s.0 * 1000 / s.1).max().unwrap_or(0);
    if lossfree(Kind::Ours).is_some_and(|o| o.m * 1000 / o.z >= top) {
        println!("note: relay was loss-free at the highest offered load; its ceiling here is the load generator/box, not the relay");
    }

    for s in [&mut coturn, &mut ours] {
        if !s.proc.alive() {
            println!(
                "# {} is not running any more; restarting it for the memory tests",
                s.kind.name()
            );
            *s = match s.kind {
                Kind::Coturn => start_coturn(&dir),
                Kind::Ours => start_ours(&bin, &dir),
            };
        }
    }
    if memory {
        println!();
        println!("## memory");
        for (s, flood_n) in [(&ours, 1_000_000u64), (&coturn, coturn_flood)] {
            let name = s.kind.name();
            let server = format!("127.0.0.1:{}", s.port);
            let pid = s.proc.pid().to_string();
            println!("{name}: 10,000 allocations");
            let a = alloc_flood(
                &flood_tool,
                &[
                    "allocations",
                    "--server",
                    &server,
                    "--count",
                    "10000",
                    "--pid",
                    &pid,
                ],
            );
            if flood_n > 0 {
                println!("{name}: {flood_n} unauthenticated Allocates from spoofed-looking loopback sources");
                let f = alloc_flood(
                    &flood_tool,
                    &[
                        "flood",
                        "--server",
                        &server,
                        "--count",
                        &flood_n.to_string(),
                        "--pid",
                        &pid,
                    ],
                );
                if let (Some(a), Some(f)) = (a, f) {
                    println!(
                        "{name}: {:.0} B RSS (+ ~{:.0} B kernel slab) per allocation; flood of {flood_n}: RSS growth {:.1} MB (peak +{:.1} MB), {:.0} answered",
                        result_num(&a, "bytes_per_alloc"),
                        result_num(&a, "slab_bytes_per_alloc"),
                        result_num(&f, "growth_kb") / 1024.0,
                        (result_num(&f, "rss_peak_kb") - result_num(&f, "rss_before_kb")) / 1024.0,
                        result_num(&f, "answered"),
                    );
                }
            }
            println!("{name}: RSS now {} KiB", rss_kb(s.proc.pid()));
        }
    }
    for s in [&mut coturn, &mut ours] {
        if !s.proc.alive() {
            println!(
                "WARNING: {} is no longer running (crash?) — see {}",
                s.proc.what,
                dir.display()
            );
        }
    }
    println!();
    println!(
        "# done in {:.0} s, load {}",
        t_start.elapsed().as_secs_f64(),
        loadavg()
    );
}
