//! Interop with software no one here wrote: coturn's tools (Debian `coturn`).
//!
//! - `turnutils_uclient` against our `relay` binary (UDP and TCP, ChannelData
//!   and Send indications, long-term and TURN REST credentials) with
//!   `turnutils_peer` as the echo peer; `turnutils_stunclient` for Binding;
//!   a wrong password is refused and the relay keeps serving.
//! - Our sans-IO client (`relay::client::Client`) against coturn's
//!   `turnserver`: allocate, permission, channel, data both ways, REST
//!   credential rotation under a live allocation.
//!
//! Every process is killed on drop, ports come from binding port 0, and all
//! traffic stays on loopback. A missing coturn tool skips the test with a
//! message, or fails it under `CI=true`.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use relay::auth::{rest_password, rest_username};
use relay::client::{Client, ClientConfig, ClientEvent};
use relay::stun::{self, attr, method, Class, Message, MessageBuilder};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

// ---------------------------------------------------------------- helpers

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Fails when a tool is missing. The tests that need coturn are
/// `#[ignore]`d by default (listed as ignored by a plain `cargo test`);
/// `scripts/test` installs coturn and runs them with `--include-ignored`.
fn require_tools(names: &[&str]) {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| find_tool(n).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "{missing:?} not installed (apt-get install coturn, or run scripts/setup)"
    );
}

/// A child process killed (and reaped) on drop, with its output captured.
struct Proc {
    name: String,
    child: Child,
    out: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let name = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let out = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let s = String::from_utf8_lossy(&buf[..n]);
                            out.lock().unwrap_or_else(|e| e.into_inner()).push_str(&s);
                        }
                    }
                }
            });
        }
        Proc { name, child, out }
    }

    fn output(&self) -> String {
        strip_ansi(&self.out.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for exit; kills the process after `timeout` (status None).
    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(100));
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A port free for both UDP and TCP on 127.0.0.1 (now; others may race for it).
fn free_port() -> u16 {
    for _ in 0..100 {
        let Ok(u) = UdpSocket::bind((LOCALHOST, 0)) else {
            continue;
        };
        let Ok(a) = u.local_addr() else { continue };
        if TcpListener::bind(a).is_ok() {
            return a.port();
        }
    }
    panic!("no free port on 127.0.0.1");
}

/// A 64-port relay range below the Linux ephemeral range (32768+), different
/// for every call in this process and, most likely, from other test processes.
/// Both servers retry another port when one is taken, so a clash costs nothing.
fn relay_range() -> (u16, u16) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let block = (std::process::id().wrapping_mul(7).wrapping_add(n)) % 150;
    let lo = 22000 + block as u16 * 64;
    (lo, lo + 63)
}

fn tmp_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "wgice-coturn-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sends a STUN Binding request to `server` and returns the XOR-MAPPED-ADDRESS.
fn stun_binding(server: SocketAddr, timeout: Duration) -> Option<SocketAddr> {
    let s = UdpSocket::bind((LOCALHOST, 0)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(100))).ok()?;
    let tid: stun::TransactionId = rand::random();
    let mut req = Vec::new();
    MessageBuilder::new(&mut req, method::BINDING, Class::Request, tid).fingerprint();
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let _ = s.send_to(&req, server);
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            if let Ok(m) = Message::parse(&buf[..n]) {
                if m.transaction_id() == tid && m.class() == Class::Success {
                    return m.xor_address(attr::XOR_MAPPED_ADDRESS).and_then(Result::ok);
                }
            }
        }
    }
    None
}

// ---------------------------------------------------------------- our relay

const USER: &str = "u";
const PASS: &str = "p";
const SECRET: &str = "secret";

struct OurRelay {
    proc: Proc,
    udp: SocketAddr,
    tcp: SocketAddr,
    metrics: SocketAddr,
}

/// The first address inside `key=[...]` or `key=Some(...)` of a log line.
fn field_addr(line: &str, key: &str) -> Option<SocketAddr> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = &line[start..];
    let rest = rest.trim_start_matches('[').trim_start_matches("Some(");
    let end = rest.find([']', ')', ',', ' '])?;
    rest[..end].parse().ok()
}

fn start_relay() -> OurRelay {
    start_relay_on("127.0.0.1:0", &[])
}

/// Our relay with its primary UDP address at `listen` and `extra` flags.
fn start_relay_on(listen: &str, extra: &[&str]) -> OurRelay {
    let (lo, hi) = relay_range();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_relay"));
    cmd.env("NO_COLOR", "1").args([
        "--listen",
        listen,
        "--tcp-listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--realm",
        "wgice-test",
        "--user",
        &format!("{USER}:{PASS}"),
        "--auth-secret",
        SECRET,
        "--allow-peer",
        "127.0.0.0/8",
        "--relay-ports",
        &format!("{lo}-{hi}"),
        "--log-level",
        "info",
    ]);
    cmd.args(extra);
    let mut proc = Proc::spawn(cmd);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = proc.output();
        if let Some(line) = out.lines().find(|l| l.contains("relay serving")) {
            let udp =
                field_addr(line, "udp").unwrap_or_else(|| panic!("no udp address in {line:?}"));
            let tcp =
                field_addr(line, "tcp").unwrap_or_else(|| panic!("no tcp address in {line:?}"));
            let metrics = field_addr(line, "metrics")
                .unwrap_or_else(|| panic!("no metrics address in {line:?}"));
            return OurRelay {
                proc,
                udp,
                tcp,
                metrics,
            };
        }
        assert!(proc.running(), "relay exited early:\n{out}");
        assert!(
            Instant::now() < deadline,
            "relay did not start in 10 s:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl OurRelay {
    /// A counter or gauge from `/metrics`.
    fn metric(&self, name: &str) -> u64 {
        let mut s = TcpStream::connect(self.metrics).expect("metrics connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .expect("metrics request");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{body}"))
    }

    fn assert_alive(&mut self) {
        assert!(self.proc.running(), "relay died:\n{}", self.proc.output());
    }
}

// ---------------------------------------------------------------- coturn tools

/// Where `turnutils_peer` listens: loopback, but not the relay's own
/// address (127.0.0.1), which no `--allow-peer` opens.
const PEER_IP: &str = "127.0.0.2";

fn start_peer() -> (Proc, u16) {
    // turnutils_peer cannot bind port 0; pick a free one and check it stays up.
    for _ in 0..5 {
        let port = free_port();
        let mut cmd = Command::new("turnutils_peer");
        cmd.args(["-L", PEER_IP, "-p", &port.to_string()]);
        let mut p = Proc::spawn(cmd);
        std::thread::sleep(Duration::from_millis(300));
        if p.running() {
            return (p, port);
        }
    }
    panic!("turnutils_peer would not start");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    LongTerm,
    Rest,
    WrongPassword,
}

#[derive(Debug)]
struct UclientRun {
    status: Option<ExitStatus>,
    sent: Option<u64>,
    received: Option<u64>,
    lost: Option<u64>,
    output: String,
}

fn number_after(line: &str, key: &str) -> Option<u64> {
    let i = line.find(key)? + key.len();
    let digits: String = line[i..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Parses uclient's summary: `start_mclient: tot_send_msgs=N, tot_recv_msgs=M`
/// and `Total lost packets L (…%)`.
fn parse_uclient(output: String, status: Option<ExitStatus>) -> UclientRun {
    let total = output
        .lines()
        .rev()
        .find(|l| l.contains("tot_send_msgs=") && !l.contains("msz="));
    let lost = output
        .lines()
        .rev()
        .find(|l| l.contains("Total lost packets"));
    UclientRun {
        status,
        sent: total.and_then(|l| number_after(l, "tot_send_msgs=")),
        received: total.and_then(|l| number_after(l, "tot_recv_msgs=")),
        lost: lost.and_then(|l| number_after(l, "Total lost packets")),
        output,
    }
}

struct UclientOpts {
    server: SocketAddr,
    peer_port: u16,
    tcp: bool,
    send_indications: bool,
    auth: Auth,
    clients: u32,
    messages: u32,
}

fn run_uclient(o: &UclientOpts) -> UclientRun {
    let mut cmd = Command::new("turnutils_uclient");
    // -c: no RTCP allocation pair (that would need EVEN-PORT/RESERVATION-TOKEN,
    // which the relay refuses by design).
    cmd.args(["-c", "-l", "200", "-z", "10"]);
    cmd.args(["-n", &o.messages.to_string(), "-m", &o.clients.to_string()]);
    cmd.args([
        "-e",
        PEER_IP,
        "-r",
        &o.peer_port.to_string(),
        "-p",
        &o.server.port().to_string(),
    ]);
    if o.tcp {
        cmd.arg("-t");
    }
    if o.send_indications {
        cmd.arg("-s");
    }
    match o.auth {
        Auth::LongTerm => cmd.args(["-u", USER, "-w", PASS]),
        Auth::WrongPassword => cmd.args(["-u", USER, "-w", "not-the-password"]),
        Auth::Rest => cmd.args(["-u", "alice", "-W", SECRET]),
    };
    cmd.arg("127.0.0.1");
    let mut p = Proc::spawn(cmd);
    let status = p.wait_timeout(Duration::from_secs(60));
    parse_uclient(p.output(), status)
}

fn assert_clean_run(r: &UclientRun, expected: u64) {
    let ctx = format!("uclient output:\n{}", r.output);
    assert!(
        r.status.is_some_and(|s| s.success()),
        "uclient failed ({:?}); {ctx}",
        r.status
    );
    let sent = r.sent.unwrap_or_else(|| panic!("no tot_send_msgs; {ctx}"));
    let received = r
        .received
        .unwrap_or_else(|| panic!("no tot_recv_msgs; {ctx}"));
    let lost = r
        .lost
        .unwrap_or_else(|| panic!("no 'Total lost packets'; {ctx}"));
    assert!(sent > 0 && received > 0, "nothing relayed; {ctx}");
    assert_eq!(sent, expected, "{ctx}");
    assert_eq!(received, sent, "{ctx}");
    assert_eq!(lost, 0, "{ctx}");
}

fn uclient_case(tcp: bool, send_indications: bool, auth: Auth) {
    require_tools(&["turnutils_uclient", "turnutils_peer"]);
    let mut relay = start_relay();
    let (_peer, peer_port) = start_peer();
    let (clients, messages) = (3, 20);
    let server = if tcp { relay.tcp } else { relay.udp };
    let r = run_uclient(&UclientOpts {
        server,
        peer_port,
        tcp,
        send_indications,
        auth,
        clients,
        messages,
    });
    assert_clean_run(&r, (clients * messages) as u64);
    relay.assert_alive();
    // The relay counted the traffic as relayed both ways (uclient also sends
    // a few warm-up packets, hence >=).
    let to_peer = relay.metric("relay_packets_to_peer_total");
    let to_client = relay.metric("relay_packets_to_client_total");
    assert!(
        to_peer >= (clients * messages) as u64,
        "relay_packets_to_peer_total {to_peer}"
    );
    assert!(
        to_client >= (clients * messages) as u64,
        "relay_packets_to_client_total {to_client}"
    );
    assert_eq!(relay.metric("relay_auth_failures_total"), 0);
}

#[test]
#[ignore = "needs coturn's tools (scripts/setup): run by bash scripts/test (cargo test -- --include-ignored)"]
fn uclient_udp_long_term_channel_data() {
    uclient_case(false, false, Auth::LongTerm);
}

#[test]
#[ignore = "needs coturn's tools (scripts/setup): run by bash scripts/test (cargo test -- --include-ignored)"]
fn uclient_udp_long_term_send_indications() {
    uclient_case(false, true, Auth::LongTerm);
}

#[test]
#[ignore = "needs coturn's tools (scripts/setup): run by bash scripts/test (cargo test -- --include-ignored)"]
fn uclient_udp_rest_channel_data() {
    uclient_case(false, false, Auth::Rest);
}

#[test]
#[ignore = "needs coturn's tools (scripts/setup): run by bash scripts/test (cargo test -- --include-ignored)"]
fn uclient_udp_rest_send_indications() {
    uclient_case(false, true, Auth::Rest);
}

#[test]
#[ignore = "needs coturn's tools (scripts/setup): run by bash scripts/test (cargo test -- --include-ignored)"]
fn uclient_tcp_long_term_channel_data() {
    uclient_case(true, false, Auth::LongTerm);
}

#[test]
#[ignore = "needs coturn's tools (scripts/setup): run by bash scripts/test (cargo test -- --include-ignored)"]
fn uclient_tcp_long_term_send_indications() {
    uclient_case(true, true, Auth::LongTerm);
}

#[test]
#[ignore = "needs coturn's tools (scripts/setup): run by bash scripts/test (cargo test -- --include-ignored)"]
fn uclient_tcp_rest_channel_data() {
    uclient_case(true, false, Auth::Rest);
}

#[test]
#[ignore = "needs coturn's tools (scripts/setup): run by bash scripts/test (cargo test -- --include-ignored)"]
fn uclient_wrong_password_is_refused_and_relay_keeps_serving() {
    require_tools(&["turnutils_uclient", "turnutils_peer"]);
    let mut relay = start_relay();
    let (_peer, peer_port) = start_peer();
    for tcp in [false, true] {
        let server = if tcp { relay.tcp } else { relay.udp };
        let bad = run_uclient(&UclientOpts {
            server,
            peer_port,
            tcp,
            send_indications: false,
            auth: Auth::WrongPassword,
            clients: 1,
            messages: 5,
        });
        let refused = bad.status.is_some_and(|s| !s.success()) || bad.output.contains("ERROR");
        assert!(
            refused,
            "wrong password accepted (tcp={tcp}):\n{}",
            bad.output
        );
        assert!(
            bad.received.unwrap_or(0) == 0,
            "data relayed with a wrong password:\n{}",
            bad.output
        );
        relay.assert_alive();
    }
    assert!(relay.metric("relay_auth_failures_total") >= 2);
    assert_eq!(relay.metric("relay_allocations_created_total"), 0);
    // Still serving, both transports.
    for tcp in [false, true] {
        let server = if tcp { relay.tcp } else { relay.udp };
        let good = run_uclient(&UclientOpts {
            server,
            peer_port,
            tcp,
            send_indications: false,
            auth: Auth::LongTerm,
            clients: 1,
            messages: 10,
        });
        assert_clean_run(&good, 10);
    }
    relay.assert_alive();
}

#[test]
#[ignore = "needs coturn's tools (scripts/setup): run by bash scripts/test (cargo test -- --include-ignored)"]
fn stunclient_gets_mapped_address() {
    require_tools(&["turnutils_stunclient"]);
    let mut relay = start_relay();
    let mut cmd = Command::new("turnutils_stunclient");
    cmd.args(["-p", &relay.udp.port().to_string(), "127.0.0.1"]);
    let mut p = Proc::spawn(cmd);
    let status = p.wait_timeout(Duration::from_secs(20));
    let out = p.output();
    assert!(
        status.is_some_and(|s| s.success()),
        "stunclient failed ({status:?}):\n{out}"
    );
    let mapped = out
        .lines()
        .find_map(|l| l.split("reflexive addr:").nth(1))
        .and_then(|a| a.trim().parse::<SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no reflexive address in:\n{out}"));
    assert_eq!(mapped.ip(), LOCALHOST, "{out}");
    assert_ne!(mapped.port(), 0, "{out}");
    assert!(relay.metric("relay_binding_requests_total") >= 1);
    relay.assert_alive();
}

/// Runs `turnutils_natdiscovery -m -f` against `server` (UDP) and returns
/// its output after checking it exited cleanly.
fn natdiscovery(server: SocketAddr) -> String {
    let mut cmd = Command::new("turnutils_natdiscovery");
    cmd.args(["-m", "-f", "-p", &server.port().to_string()])
        .arg(server.ip().to_string());
    let mut p = Proc::spawn(cmd);
    let status = p.wait_timeout(Duration::from_secs(60));
    let out = p.output();
    assert!(
        status.is_some_and(|s| s.success()),
        "natdiscovery failed ({status:?}):\n{out}"
    );
    out
}

/// The behaviour lines natdiscovery concludes with (`NAT with ... Mapping!`,
/// `NAT with ... Filtering!`).
fn verdicts(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.starts_with("NAT with") || l.contains("Behavior Discovery"))
        .map(|l| l.trim().to_owned())
        .collect()
}

#[test]
fn natdiscovery_classifies_mapping_and_filtering_through_our_relay() {
    // RFC 5780 with a standard client that does not pad its requests: it
    // needs OTHER-ADDRESS and RESPONSE-ORIGIN in every answer, and answers
    // from the alternate IP and port for the filtering tests.
    require_tools(&["turnutils_natdiscovery", "turnserver"]);
    let (port, alt_port) = (free_port(), free_port());
    let primary = format!("127.0.0.1:{port}");
    let alt = format!("127.0.0.2:{alt_port}");
    let mut relay = start_relay_on(&primary, &["--alt-listen", &alt]);
    let out = natdiscovery(relay.udp);
    let ours = verdicts(&out);
    assert!(
        ours.iter()
            .any(|l| l == "NAT with Endpoint Independent Mapping!"),
        "no mapping behaviour in:\n{out}"
    );
    assert!(
        ours.iter()
            .any(|l| l == "NAT with Endpoint Independent Filtering!"),
        "no filtering behaviour in:\n{out}"
    );
    assert!(
        out.contains(&format!("Other addr: : {alt}")),
        "OTHER-ADDRESS is the alternate address:\n{out}"
    );
    relay.assert_alive();

    // coturn's own server, same client, same loopback: same conclusions.
    let dir = tmp_dir("natdiscovery");
    let ts_port = free_port();
    let mut cmd = Command::new("turnserver");
    cmd.args([
        "--no-cli",
        "-n",
        "--no-auth",
        "--listening-ip",
        "127.0.0.1",
        "--listening-ip",
        "127.0.0.2",
        "--listening-port",
        &ts_port.to_string(),
        "--alt-listening-port",
        &(ts_port + 1).to_string(),
        "--no-tls",
        "--no-dtls",
        "--no-tcp",
        "--log-file",
        "stdout",
        "--simple-log",
    ]);
    cmd.arg("--pidfile").arg(dir.join("turnserver.pid"));
    let mut ts = Proc::spawn(cmd);
    let ts_addr = SocketAddr::new(LOCALHOST, ts_port);
    assert!(
        stun_binding(ts_addr, Duration::from_secs(5)).is_some() && ts.running(),
        "turnserver did not start:\n{}",
        ts.output()
    );
    let theirs = verdicts(&natdiscovery(ts_addr));
    assert_eq!(ours, theirs, "our relay and coturn disagree");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- coturn's turnserver vs our client

struct Turnserver {
    _proc: Proc,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Turnserver {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts coturn's `turnserver` on loopback with `auth` arguments.
fn start_turnserver(auth: &[&str]) -> Turnserver {
    let dir = tmp_dir("turnserver");
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_port();
        let (lo, hi) = relay_range();
        let mut cmd = Command::new("turnserver");
        cmd.args([
            "--no-cli",
            "--realm",
            "r",
            "--listening-ip",
            "127.0.0.1",
            "--listening-port",
            &port.to_string(),
            "--relay-ip",
            "127.0.0.1",
            "--min-port",
            &lo.to_string(),
            "--max-port",
            &hi.to_string(),
            "--allow-loopback-peers",
            "--no-tls",
            "--no-dtls",
            "--no-tcp",
            "--log-file",
            "stdout",
            "--simple-log",
        ]);
        cmd.arg("--db").arg(dir.join("turndb"));
        cmd.arg("--pidfile").arg(dir.join("turnserver.pid"));
        cmd.args(auth);
        let mut proc = Proc::spawn(cmd);
        let addr = SocketAddr::new(LOCALHOST, port);
        if stun_binding(addr, Duration::from_secs(5)).is_some() && proc.running() {
            return Turnserver {
                _proc: proc,
                addr,
                dir,
            };
        }
        last = proc.output();
    }
    panic!("turnserver would not start:\n{last}");
}

/// Our client over one UDP socket, driven synchronously.
struct Driver {
    sock: UdpSocket,
    client: Client,
    events: Vec<ClientEvent>,
    /// Application data received: (peer, payload, came as ChannelData).
    data: Vec<(SocketAddr, Vec<u8>, bool)>,
}

impl Driver {
    fn new(server: SocketAddr, cfg: ClientConfig) -> Driver {
        let sock = UdpSocket::bind((LOCALHOST, 0)).expect("bind");
        sock.connect(server).expect("connect");
        Driver {
            sock,
            client: Client::new(cfg, rand::random()),
            events: Vec::new(),
            data: Vec::new(),
        }
    }

    fn flush(&mut self) {
        while let Some(t) = self.client.poll_transmit() {
            self.sock.send(&t).expect("send to server");
        }
    }

    /// One round: send what is queued, wait up to `max` for input, run timers.
    fn step(&mut self, max: Duration) {
        self.flush();
        let now = Instant::now();
        let wait = self
            .client
            .poll_timeout()
            .map_or(max, |t| t.saturating_duration_since(now).min(max))
            .max(Duration::from_millis(1));
        self.sock.set_read_timeout(Some(wait)).expect("timeout");
        let mut buf = [0u8; 2048];
        if let Ok(n) = self.sock.recv(&mut buf) {
            let is_cd = stun::channel_data::is_channel_data(&buf[..n]);
            if let Some((peer, payload)) = self.client.handle_input(Instant::now(), &buf[..n]) {
                self.data.push((peer, payload.to_vec(), is_cd));
            }
        }
        let now = Instant::now();
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
        }
        while let Some(e) = self.client.poll_event() {
            self.events.push(e);
        }
        self.flush();
    }

    /// Runs until an event matches `want`; panics on failures or timeout.
    fn wait_event(&mut self, what: &str, want: impl Fn(&ClientEvent) -> bool) -> ClientEvent {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(i) = self.events.iter().position(&want) {
                return self.events.remove(i);
            }
            if let Some(bad) = self
                .events
                .iter()
                .find(|e| matches!(e, ClientEvent::Failed { .. } | ClientEvent::Lost { .. }))
            {
                panic!("waiting for {what}: {bad:?}");
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; events {:?}",
                self.events
            );
            self.step(Duration::from_millis(50));
        }
    }

    fn send_to_peer(&mut self, peer: SocketAddr, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        self.client.encode_to(peer, payload, &mut frame);
        self.sock.send(&frame).expect("send");
        frame
    }

    /// Runs until `count` payloads from `peer` arrived; returns them.
    fn wait_data(&mut self, peer: SocketAddr, count: usize) -> Vec<(Vec<u8>, bool)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got: Vec<(Vec<u8>, bool)> = self
                .data
                .iter()
                .filter(|d| d.0 == peer)
                .map(|d| (d.1.clone(), d.2))
                .collect();
            if got.len() >= count {
                self.data.retain(|d| d.0 != peer);
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "got {} of {count} payloads from {peer}",
                got.len()
            );
            self.step(Duration::from_millis(50));
        }
    }
}

/// An echo peer on loopback that prefixes replies with "echo:".
struct EchoPeer {
    sock: UdpSocket,
}

impl EchoPeer {
    fn new() -> EchoPeer {
        let sock = UdpSocket::bind((LOCALHOST, 0)).expect("peer bind");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        EchoPeer { sock }
    }
    fn addr(&self) -> SocketAddr {
        self.sock.local_addr().expect("peer addr")
    }
    /// Receives `count` datagrams, checks they come from `relayed`, echoes them.
    fn echo(&self, relayed: SocketAddr, count: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while got.len() < count {
            let (n, from) = self
                .sock
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("peer got {} of {count}: {e}", got.len()));
            assert_eq!(from, relayed, "data must come from the relayed address");
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            self.sock.send_to(&reply, from).expect("peer send");
            got.push(buf[..n].to_vec());
        }
        got
    }
}

/// Exchanges `n` payloads each way and checks them and their framing.
fn exchange(
    d: &mut Driver,
    peer: &EchoPeer,
    relayed: SocketAddr,
    tag: &str,
    n: usize,
    channel: bool,
) {
    let mut sent = Vec::new();
    for i in 0..n {
        let p = format!("{tag}-{i}").into_bytes();
        let frame = d.send_to_peer(peer.addr(), &p);
        assert_eq!(
            stun::channel_data::is_channel_data(&frame),
            channel,
            "framing of {tag}"
        );
        sent.push(p);
    }
    let at_peer = peer.echo(relayed, n);
    assert_eq!(at_peer, sent, "peer received what the client sent ({tag})");
    let back = d.wait_data(peer.addr(), n);
    for (i, (payload, as_cd)) in back.iter().enumerate() {
        assert_eq!(
            *payload,
            [b"echo:".as_slice(), &sent[i]].concat(),
            "{tag} reply {i}"
        );
        assert_eq!(
            *as_cd, channel,
            "{tag} reply {i} framing (ChannelData={channel})"
        );
    }
}

fn allocate(d: &mut Driver) -> SocketAddr {
    d.client.allocate(Instant::now());
    match d.wait_event("Allocated", |e| matches!(e, ClientEvent::Allocated { .. })) {
        ClientEvent::Allocated {
            relayed,
            mapped,
            lifetime,
        } => {
            assert_eq!(
                mapped,
                Some(d.sock.local_addr().expect("local")),
                "server-reflexive address"
            );
            assert!(lifetime >= Duration::from_secs(60), "lifetime {lifetime:?}");
            let r = *relayed.first().expect("a relayed address");
            assert_eq!(r.ip(), LOCALHOST);
            r
        }
        _ => unreachable!(),
    }
}

fn permission_channel_data(d: &mut Driver, relayed: SocketAddr) {
    let peer = EchoPeer::new();
    d.client.create_permission(Instant::now(), peer.addr().ip());
    d.wait_event("PermissionCreated", |e| {
        matches!(e, ClientEvent::PermissionCreated(_))
    });
    // Send/Data indications first, then ChannelData once bound.
    exchange(d, &peer, relayed, "indication", 10, false);
    let ch = d
        .client
        .bind_channel(Instant::now(), peer.addr())
        .expect("a free channel");
    let bound = d.wait_event("ChannelBound", |e| {
        matches!(e, ClientEvent::ChannelBound { .. })
    });
    assert_eq!(
        bound,
        ClientEvent::ChannelBound {
            peer: peer.addr(),
            channel: ch
        }
    );
    assert_eq!(d.client.channel_for(peer.addr()), Some(ch));
    exchange(d, &peer, relayed, "channel", 50, true);
}

#[test]
#[ignore = "needs coturn's tools (scripts/setup): run by bash scripts/test (cargo test -- --include-ignored)"]
fn our_client_against_turnserver_long_term() {
    require_tools(&["turnserver"]);
    let ts = start_turnserver(&["--lt-cred-mech", "--user", "u:p"]);
    let mut d = Driver::new(ts.addr, ClientConfig::new("u", "p"));
    let relayed = allocate(&mut d);
    permission_channel_data(&mut d, relayed);
    // A second peer on another port of the same IP: the permission covers it.
    let peer2 = EchoPeer::new();
    exchange(&mut d, &peer2, relayed, "second-peer", 5, false);
    d.client.deallocate(Instant::now());
    d.wait_event("Deallocated", |e| *e == ClientEvent::Deallocated);
}

#[test]
#[ignore = "needs coturn's tools (scripts/setup): run by bash scripts/test (cargo test -- --include-ignored)"]
fn our_client_against_turnserver_wrong_password() {
    require_tools(&["turnserver"]);
    let ts = start_turnserver(&["--lt-cred-mech", "--user", "u:p"]);
    let mut d = Driver::new(ts.addr, ClientConfig::new("u", "wrong"));
    d.client.allocate(Instant::now());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(e) = d
            .events
            .iter()
            .find(|e| matches!(e, ClientEvent::Failed { .. }))
        {
            assert!(
                matches!(
                    e,
                    ClientEvent::Failed {
                        request: "Allocate",
                        code: 401,
                        ..
                    }
                ),
                "{e:?}"
            );
            break;
        }
        assert!(
            !d.events
                .iter()
                .any(|e| matches!(e, ClientEvent::Allocated { .. })),
            "allocated with a wrong password"
        );
        assert!(
            Instant::now() < deadline,
            "no failure reported: {:?}",
            d.events
        );
        d.step(Duration::from_millis(50));
    }
    assert!(!d.client.is_allocated());
}

/// coturn with two REST secrets: the operator rotates from the first to the second.
fn rest_turnserver() -> Turnserver {
    start_turnserver(&[
        "--use-auth-secret",
        "--static-auth-secret",
        "first-secret",
        "--static-auth-secret",
        "second-secret",
    ])
}

#[test]
#[ignore = "needs coturn's tools (scripts/setup): run by bash scripts/test (cargo test -- --include-ignored)"]
fn our_client_against_turnserver_rest_secret_rotation() {
    require_tools(&["turnserver"]);
    let ts = rest_turnserver();
    let user = rest_username(unix_now() + 3600, "alice");
    let mut d = Driver::new(
        ts.addr,
        ClientConfig::new(&user, &rest_password("first-secret", &user)),
    );
    let relayed = allocate(&mut d);
    permission_channel_data(&mut d, relayed);

    // The same username signed with the next secret, under the live
    // allocation: the client refreshes at once and keeps its relayed address.
    d.client.set_credentials(
        Instant::now(),
        &user,
        &rest_password("second-secret", &user),
    );
    d.wait_event("Refreshed", |e| matches!(e, ClientEvent::Refreshed { .. }));
    assert!(d.client.is_allocated());
    assert_eq!(d.client.relayed(), [relayed]);
    // New requests (permission, channel) and data work after the rotation.
    permission_channel_data(&mut d, relayed);
    d.client.deallocate(Instant::now());
    d.wait_event("Deallocated", |e| *e == ClientEvent::Deallocated);
}

/// coturn (like RFC 8656 §5) ties an allocation to the username that created
/// it: a fresh REST username (new expiry) under a live allocation gets 441.
/// The allocation must survive that (data keeps flowing), and the client
/// goes back to the credentials it was created with by itself, so refreshes
/// keep working (the new ones apply from the next allocation).
/// (Our relay instead accepts any `expiry:user` with the same user part.)
#[test]
#[ignore = "needs coturn's tools (scripts/setup): run by bash scripts/test (cargo test -- --include-ignored)"]
fn our_client_against_turnserver_rest_new_username_gets_441_and_keeps_allocation() {
    require_tools(&["turnserver"]);
    let ts = rest_turnserver();
    let user1 = rest_username(unix_now() + 3600, "alice");
    let pass1 = rest_password("first-secret", &user1);
    let mut d = Driver::new(ts.addr, ClientConfig::new(&user1, &pass1));
    let relayed = allocate(&mut d);
    let peer = EchoPeer::new();
    d.client.create_permission(Instant::now(), peer.addr().ip());
    d.wait_event("PermissionCreated", |e| {
        matches!(e, ClientEvent::PermissionCreated(_))
    });
    d.client.bind_channel(Instant::now(), peer.addr());
    d.wait_event("ChannelBound", |e| {
        matches!(e, ClientEvent::ChannelBound { .. })
    });
    exchange(&mut d, &peer, relayed, "before", 10, true);

    let user2 = rest_username(unix_now() + 7200, "alice");
    d.client.set_credentials(
        Instant::now(),
        &user2,
        &rest_password("second-secret", &user2),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let failed = loop {
        if let Some(i) = d.events.iter().position(|e| {
            matches!(
                e,
                ClientEvent::Failed { .. } | ClientEvent::Refreshed { .. }
            )
        }) {
            break d.events.remove(i);
        }
        assert!(
            Instant::now() < deadline,
            "no answer to the Refresh: {:?}",
            d.events
        );
        d.step(Duration::from_millis(50));
    };
    assert!(
        matches!(
            failed,
            ClientEvent::Failed {
                request: "Refresh",
                code: 441,
                ..
            }
        ),
        "coturn accepted a new username under a live allocation? {failed:?}"
    );
    assert!(
        d.client.is_allocated(),
        "a 441 must not drop the allocation"
    );
    assert!(
        !d.events
            .iter()
            .any(|e| matches!(e, ClientEvent::Lost { .. })),
        "{:?}",
        d.events
    );
    exchange(&mut d, &peer, relayed, "after-441", 10, true);

    // The client went back to the credentials the allocation was created
    // with by itself, and the re-sent Refresh succeeds.
    d.wait_event("Refreshed", |e| matches!(e, ClientEvent::Refreshed { .. }));
    exchange(&mut d, &peer, relayed, "restored", 10, true);
    let _ = &pass1;
}
