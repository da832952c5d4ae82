//! Benchmark: coturn, `relay` in user space and `relay --xdp`, back to back
//! in one run, in network namespaces (XDP does not run on loopback):
//!
//! ```text
//!   gen (turnutils_uclient) --veth-- relay ns (server) --veth-- peer (turnutils_peer)
//!   10.91.1.2                  10.91.1.1 | 10.91.2.1              10.91.2.2
//! ```
//!
//! The same ChannelData load drives all three: `turnutils_uclient -c -l 1200`
//! (1200-byte payloads, channels, long-term credentials), each message
//! echoed by `turnutils_peer`, so every message is relayed twice.
//!
//! Per server it reports
//! - **CPU per relayed packet, system-wide**: the CPU time of every thread
//!   on the machine (scheduler clock, softirq included: it runs in the
//!   thread it interrupts or in ksoftirqd) over the packets relayed, at a
//!   fixed load. System-wide because XDP work is not billed to the relay's
//!   process; it includes the load generator and the echo peer, the same
//!   work in every run. Threads at niceness > 0 are left out, so a niced
//!   build or fuzzer beside the benchmark does not count; the load itself
//!   runs at niceness 0.
//! - the **highest loss-free rate**: relayed packets per second in the best
//!   one-second window of the highest load step with at most 0.1 % loss.
//!
//! Lab settings the kernel path needs, as on a real host: forwarding on the
//! relay's interfaces (route lookups from XDP), and, because veth stands in
//! for NICs, senders that complete their UDP checksums (`tx off`) and NAPI on
//! the veth ends the program transmits into (`gro on`). All three servers
//! run with the same settings.
//!
//! Run as root: `bash relay/bench/xdp-vs-coturn.sh [--quick]`. Namespaces are
//! named `wgxb<pid>-*` and removed on exit; stale ones of dead runs are
//! removed at start.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Ns {
    prefix: String,
}

impl Ns {
    fn name(&self, n: &str) -> String {
        format!("{}-{n}", self.prefix)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        for n in ["gen", "relay", "peer"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name(n)])
                .status();
        }
    }
}

fn ip(args: &str) {
    let ok = Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "ip {args} failed");
}

fn exec(ns: &str, cmd: &str) {
    let ok = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{ns}: {cmd} failed");
}

/// Removes namespaces of earlier runs whose process is gone.
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("wgxb") else {
            continue;
        };
        let pid: u32 = rest
            .split('-')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if pid != 0 && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn setup() -> Ns {
    sweep_stale();
    let ns = Ns {
        prefix: format!("wgxb{}", std::process::id()),
    };
    let (g, r, p) = (ns.name("gen"), ns.name("relay"), ns.name("peer"));
    for n in [&g, &r, &p] {
        ip(&format!("netns add {n}"));
        ip(&format!("-n {n} link set lo up"));
    }
    ip(&format!(
        "link add g0 netns {g} type veth peer name r1 netns {r}"
    ));
    ip(&format!(
        "link add p0 netns {p} type veth peer name r2 netns {r}"
    ));
    exec(&g, "ip addr add 10.91.1.2/24 dev g0 && ip link set g0 up && ip route add default via 10.91.1.1");
    exec(&r, "ip addr add 10.91.1.1/24 dev r1 && ip link set r1 up && ip addr add 10.91.2.1/24 dev r2 && ip link set r2 up");
    exec(&p, "ip addr add 10.91.2.2/24 dev p0 && ip link set p0 up && ip route add default via 10.91.2.1");
    exec(
        &r,
        "sysctl -qw net.ipv4.conf.r1.forwarding=1 net.ipv4.conf.r2.forwarding=1",
    );
    exec(&g, "ethtool -K g0 tx off gro on >/dev/null");
    exec(&p, "ethtool -K p0 tx off gro on >/dev/null");
    ns
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_in(ns: &str, argv: &[String], log: &Path) -> Proc {
    let f = std::fs::File::create(log).expect("log file");
    let f2 = f.try_clone().expect("dup");
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .spawn()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    Proc(child)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Coturn,
    Relay,
    RelayXdp,
    RelayXdpGeneric,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Coturn => "coturn",
            Kind::Relay => "relay",
            Kind::RelayXdp => "relay --xdp",
            Kind::RelayXdpGeneric => "relay --xdp (generic)",
        }
    }
}

fn start(kind: Kind, ns: &Ns, relay_bin: &Path, dir: &Path) -> Proc {
    let argv: Vec<String> = match kind {
        Kind::Coturn => {
            let mut v: Vec<String> = [
                "turnserver",
                "--no-cli",
                "--lt-cred-mech",
                "--user",
                "u:p",
                "--realm",
                "r",
                "--listening-ip",
                "10.91.1.1",
                "--listening-port",
                "3478",
                "--relay-ip",
                "10.91.2.1",
                "--min-port",
                "40000",
                "--max-port",
                "59999",
                "--no-tls",
                "--no-dtls",
                "--simple-log",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            for (flag, file) in [
                ("--log-file", "turnserver.log"),
                ("--db", "turndb"),
                ("--pidfile", "turnserver.pid"),
            ] {
                v.push(flag.into());
                v.push(dir.join(file).display().to_string());
            }
            v
        }
        Kind::Relay | Kind::RelayXdp | Kind::RelayXdpGeneric => {
            let mut v = vec![];
            if kind == Kind::RelayXdpGeneric {
                v.extend(["env".into(), "WGICE_XDP_GENERIC=1".into()]);
            }
            v.extend([
                relay_bin.display().to_string(),
                "--listen".into(),
                "10.91.1.1:3478".into(),
                "--relay-ip".into(),
                "10.91.2.1".into(),
                "--user".into(),
                "u:p".into(),
                "--realm".into(),
                "r".into(),
                "--allow-peer".into(),
                "10.91.2.0/24".into(),
                "--log-level".into(),
                "info".into(),
                "--metrics".into(),
                "127.0.0.1:9464".into(),
            ]);
            if kind != Kind::Relay {
                v.extend(["--xdp".into(), "auto".into()]);
            }
            v
        }
    };
    let log = dir.join(format!("{:?}.log", kind));
    let p = spawn_in(&ns.name("relay"), &argv, &log);
    std::thread::sleep(Duration::from_millis(800));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if matches!(kind, Kind::RelayXdp | Kind::RelayXdpGeneric) {
        assert!(
            text.contains("XDP fast path on"),
            "relay --xdp did not load its program:\n{text}"
        );
    }
    p
}

/// CPU time (ns) of every thread on the machine at niceness ≤ 0, from the
/// scheduler's own clock (`/proc/*/task/*/schedstat`). Not `/proc/stat`:
/// its busy columns are sampled by the tick, which a tickless kernel
/// misses for the short bursts of a packet path (they read as idle here).
/// Softirq work (the XDP program included) is run by the thread it
/// interrupts or by ksoftirqd, and counted with that thread.
fn busy_ns() -> u64 {
    let mut total = 0u64;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for p in procs.flatten() {
        total += process_ns(&p.path(), true);
    }
    total
}

/// CPU time (ns) of the threads of one process (`/proc/PID`), optionally
/// only those at niceness ≤ 0.
fn process_ns(p: &Path, unniced_only: bool) -> u64 {
    let mut total = 0u64;
    if let Ok(tasks) = std::fs::read_dir(p.join("task")) {
        for t in tasks.flatten() {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // Fields after the command's closing parenthesis; nice is field 19.
            let nice: i64 = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(16)?.parse().ok())
                .unwrap_or(0);
            if unniced_only && nice > 0 {
                continue;
            }
            let sched = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            total += sched
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
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

#[derive(Debug, Clone)]
struct Run {
    m: u32,
    server_us_per_pkt: f64,
    sent: u64,
    recv: u64,
    lost: u64,
    peak_pps: f64,
    cpu_us_per_pkt: f64,
}

/// One uclient run: `m` clients, a message every `z` ms each, `n` each.
fn load(ns: &Ns, server: &Proc, m: u32, z: u32, n: u32) -> Run {
    let server_dir = PathBuf::from(format!("/proc/{}", server.0.id()));
    let s0 = process_ns(&server_dir, false);
    let argv: Vec<String> = [
        "turnutils_uclient",
        "-c",
        "-l",
        "1200",
        "-u",
        "u",
        "-w",
        "p",
        "-m",
        &m.to_string(),
        "-z",
        &z.to_string(),
        "-n",
        &n.to_string(),
        "-e",
        "10.91.2.2",
        "-r",
        "3480",
        "-p",
        "3478",
        "10.91.1.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let j0 = busy_ns();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name("gen")])
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("turnutils_uclient");
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let total = m as u64 * n as u64;
    let (mut sent, mut recv, mut lost) = (0u64, 0u64, None);
    let mut samples: Vec<(Instant, u64, u64)> = Vec::new();
    let started = Instant::now();
    let mut last_change = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if let (Some(s), Some(r)) = (
                    parse_num(&line, "tot_send_msgs="),
                    parse_num(&line, "tot_recv_msgs="),
                ) {
                    if s != sent || r != recv {
                        last_change = Instant::now();
                    }
                    sent = s;
                    recv = r;
                    samples.push((Instant::now(), s, r));
                }
                if line.contains("Total lost packets") {
                    lost = parse_num(&line, "Total lost packets");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if sent >= total && last_change.elapsed() > Duration::from_millis(1500) {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    // Before uclient exits, so its threads still count.
    let j1 = busy_ns();
    let s1 = process_ns(&server_dir, false);
    let _ = child.kill();
    let _ = child.wait();
    let mut peak: f64 = 0.0;
    for w in samples.windows(2) {
        let dt = w[1].0.duration_since(w[0].0).as_secs_f64();
        if dt >= 0.5 {
            peak = peak.max(((w[1].1 + w[1].2) - (w[0].1 + w[0].2)) as f64 / dt);
        }
    }
    let relayed = sent + recv;
    Run {
        m,
        sent,
        recv,
        lost: lost.unwrap_or(sent.saturating_sub(recv)),
        peak_pps: peak,
        cpu_us_per_pkt: j1.saturating_sub(j0) as f64 / 1e3 / relayed.max(1) as f64,
        server_us_per_pkt: s1.saturating_sub(s0) as f64 / 1e3 / relayed.max(1) as f64,
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    assert!(
        netsim_is_root(),
        "run as root (namespaces, XDP): bash relay/bench/xdp-vs-coturn.sh"
    );
    let relay_bin = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.join("relay")))
        .filter(|p| p.is_file())
        .expect("target/release/relay: build it first (the script does)");
    let dir: PathBuf = std::env::temp_dir().join(format!("wgxb{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("work dir");
    let ns = setup();
    let _peer = spawn_in(
        &ns.name("peer"),
        &[
            "turnutils_peer".into(),
            "-L".into(),
            "10.91.2.2".into(),
            "-p".into(),
            "3480".into(),
        ],
        &dir.join("peer.log"),
    );
    let (fixed_m, fixed_n) = if quick { (10, 3000) } else { (20, 10000) };
    let steps: &[u32] = if quick {
        &[20, 60]
    } else {
        &[25, 50, 75, 100, 150]
    };
    println!(
        "xdp_vs_coturn: ChannelData, 1200-byte payloads, echoed; {} cores; fixed load {fixed_m} clients x 1 msg/ms",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let mut results = Vec::new();
    for kind in [
        Kind::Coturn,
        Kind::Relay,
        Kind::RelayXdp,
        Kind::RelayXdpGeneric,
    ] {
        let server = start(kind, &ns, &relay_bin, &dir);
        let k0 = kernel_relayed(&ns);
        let fixed = load(&ns, &server, fixed_m, 1, fixed_n);
        let by_kernel = kernel_relayed(&ns).saturating_sub(k0);
        println!(
            "  {:<12} fixed: {} relayed ({} by the XDP program), lost {}, {:.2} µs CPU (system-wide) per relayed packet, {:.2} µs in the server process, peak {:.0} pkt/s",
            kind.name(),
            fixed.sent + fixed.recv,
            by_kernel,
            fixed.lost,
            fixed.cpu_us_per_pkt,
            fixed.server_us_per_pkt,
            fixed.peak_pps
        );
        let mut best: Option<Run> = None;
        for &m in steps {
            let r = load(&ns, &server, m, 1, if quick { 2000 } else { 4000 });
            let ok = r.sent > 0 && (r.lost as f64) <= 0.001 * r.sent as f64;
            println!(
                "  {:<12} {:>3} clients: peak {:>7.0} pkt/s, lost {} of {} ({:.3} %), {:.2} µs/pkt{}",
                kind.name(),
                r.m,
                r.peak_pps,
                r.lost,
                r.sent,
                100.0 * r.lost as f64 / r.sent.max(1) as f64,
                r.cpu_us_per_pkt,
                if ok { "" } else { "  (lossy)" }
            );
            if ok && best.as_ref().is_none_or(|b| r.peak_pps > b.peak_pps) {
                best = Some(r);
            }
        }
        drop(server);
        std::thread::sleep(Duration::from_millis(300));
        results.push((kind, fixed, best));
    }
    let cot = &results[0];
    println!("\n| server | CPU µs per relayed packet (system-wide) | × coturn | in the server process | loss-free pkt/s | × coturn |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (kind, fixed, best) in &results {
        let rate = best.as_ref().map(|b| b.peak_pps).unwrap_or(0.0);
        let cot_rate = cot.2.as_ref().map(|b| b.peak_pps).unwrap_or(0.0);
        let vs = if cot_rate > 0.0 {
            format!("{:.2}", rate / cot_rate)
        } else {
            "— (coturn lossy at every step)".into()
        };
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.0} | {vs} |",
            kind.name(),
            fixed.cpu_us_per_pkt,
            fixed.cpu_us_per_pkt / cot.1.cpu_us_per_pkt.max(1e-9),
            fixed.server_us_per_pkt,
            rate,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Packets the XDP program relayed so far (0 without it), from `/metrics`.
fn kernel_relayed(ns: &Ns) -> u64 {
    let Ok(out) = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name("relay"),
            "curl",
            "-s",
            "http://127.0.0.1:9464/metrics",
        ])
        .output()
    else {
        return 0;
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("relay_xdp_packets_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn netsim_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
