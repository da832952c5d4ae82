//! Signaling fan-out benchmark: many simulated nodes on loopback against one
//! `signaling` instance (or two joined by a real `nats-server`), reporting
//! nodes held, offer→delivery latency and server memory per node.
//!
//! Every node is a real client: QUIC or TLS/TCP, proof of key possession,
//! mesh token. A sender seals an `Offer` whose `session` field carries the
//! send time; the receiver opens it (X25519 + XChaCha20-Poly1305 + replay
//! check) and records the latency, so the figure covers seal → route →
//! open. Memory is the growth of the server processes' RSS from before the
//! first node connects to after the last one registered, divided by nodes.
//!
//! ```text
//! signaling-bench --nodes 10000 --transport quic
//! signaling-bench --nodes 10000 --instances 2      # through NATS
//! ```
#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use signaling::auth::MeshAuth;
use signaling::client::{Connector, Session, Transport};
use signaling::seal::{seal, Opener};
use signaling::tls::Trust;
use signaling::wire::{self, ClientFrame, ServerFrame};
use signaling::{PeerMessage, PrivateKey, PublicKey};
use tokio::sync::{mpsc, Semaphore};

#[derive(Parser, Debug)]
#[command(about = "Signaling benchmark: nodes held, offer→delivery latency, memory per node")]
struct Args {
    /// Simulated nodes.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Nodes per mesh (presence fans out within a mesh).
    #[arg(long, default_value_t = 100)]
    mesh_size: usize,
    /// quic or tcp.
    #[arg(long, default_value = "quic")]
    transport: String,
    /// Signaling instances (2 = cluster through nats-server).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Offers to send after everyone is connected.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Offers per second.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Connection attempts in flight.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// QUIC client endpoints (UDP sockets) the nodes share (too few and
    /// their receive buffers overflow under presence bursts).
    #[arg(long, default_value_t = 64)]
    endpoints: usize,
    /// Loopback source addresses the nodes are spread over (127.0.0.1 …
    /// 127.0.0.N; all of 127/8 is loopback on Linux). The server limits
    /// unregistered connections per source address (`max_pending_per_ip`,
    /// 64), which a benchmark from one address would hit.
    #[arg(long, default_value_t = 32)]
    sources: u8,
    /// The `signaling` binary [default: next to this one].
    #[arg(long)]
    server_bin: Option<PathBuf>,
}

struct Proc {
    child: Child,
    addr: SocketAddr,
    fingerprint: [u8; 32],
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) a process has used, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime, stime are 14, 15.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f[11].parse::<f64>().ok()? + f[12].parse::<f64>().ok()?) / ticks)
        })
        .unwrap_or(0.0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_server(
    bin: &PathBuf,
    dir: &std::path::Path,
    nats: Option<&str>,
    prefix: &str,
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(bin);
    cmd.args(["--listen", "127.0.0.1:0", "--log", "warn"])
        .arg("--cert")
        .arg(dir.join("cert.pem"))
        .arg("--key")
        .arg(dir.join("key.pem"))
        .arg("--token-secret-file")
        .arg(dir.join("secret"))
        .args(["--nats-prefix", prefix]);
    if let Some(url) = nats {
        cmd.args(["--nats", url]);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    // "listening ADDR metrics M fingerprint F"
    let words: Vec<&str> = line.split_whitespace().collect();
    if words.len() != 6 {
        bail!("unexpected server output {line:?}");
    }
    Ok(Proc {
        addr: words[1].parse()?,
        fingerprint: signaling::tls::parse_fingerprint(words[5])?,
        child,
    })
}

struct Node {
    key: PrivateKey,
    cmd: mpsc::Sender<Vec<u8>>,
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    signaling::tls::install_provider();
    signaling::server::raise_fd_limit();
    let transport = match args.transport.as_str() {
        "quic" => Transport::Quic,
        "tcp" => Transport::Tcp,
        t => bail!("--transport {t}: use quic or tcp"),
    };
    let bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("signaling"),
    };
    let dir = std::env::temp_dir().join(format!("wgice-sig-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ck = rcgen::generate_simple_self_signed(vec!["wgice-signaling".to_string()])?;
    std::fs::write(dir.join("cert.pem"), ck.cert.pem())?;
    std::fs::write(dir.join("key.pem"), ck.key_pair.serialize_pem())?;
    let secret: [u8; 32] = rand::random();
    std::fs::write(dir.join("secret"), secret)?;

    let mut nats_child = None;
    let nats_url = if args.instances > 1 {
        let port = free_port();
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server (scripts/setup installs it)")?;
        nats_child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(format!("nats://127.0.0.1:{port}"))
    } else {
        None
    };
    let prefix = format!("bench.{}", std::process::id());
    let mut servers = Vec::new();
    for _ in 0..args.instances.max(1) {
        servers.push(start_server(&bin, &dir, nats_url.as_deref(), &prefix)?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before: Vec<u64> = servers.iter().map(|s| rss_kib(s.child.id())).collect();

    let sources: Vec<std::net::IpAddr> = (1..=args.sources.max(1))
        .map(|k| std::net::Ipv4Addr::new(127, 0, 0, k).into())
        .collect();
    let base = Connector::new(&Trust::Fingerprint(servers[0].fingerprint))?;
    // Node i leaves from sources[i % sources]: its TLS/TCP connector binds
    // there, and its QUIC endpoint is one of those bound there.
    let connectors: Vec<Connector> = sources
        .iter()
        .map(|ip| base.clone().with_tcp_source(*ip))
        .collect();
    let per_source = args.endpoints.max(1).div_ceil(sources.len());
    let endpoints: Vec<Vec<quinn::Endpoint>> = sources
        .iter()
        .map(|ip| {
            (0..per_source)
                .map(|_| Connector::endpoint_on(SocketAddr::new(*ip, 0)))
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<_, _>>()?;
    let epoch = Instant::now();
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<u64>::with_capacity(
        args.messages,
    )));
    let received = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let undeliverable = Arc::new(AtomicU64::new(0));

    // Connect every node.
    println!(
        "connecting {} nodes ({:?}, {} instance(s), meshes of {}, from {} loopback addresses)…",
        args.nodes,
        transport,
        servers.len(),
        args.mesh_size,
        sources.len()
    );
    let sem = Arc::new(Semaphore::new(args.concurrency));
    let mut joins = Vec::with_capacity(args.nodes);
    let t0 = Instant::now();
    for i in 0..args.nodes {
        let permit = sem.clone().acquire_owned().await?;
        let key = PrivateKey::generate();
        let server = servers[i % servers.len()].addr;
        let src = i % sources.len();
        let connector = connectors[src].clone();
        let ep = endpoints[src][(i / sources.len()) % per_source].clone();
        let mesh = format!("bench{}", i / args.mesh_size.max(1));
        let token = MeshAuth::derive_token(&secret, &mesh);
        let (latencies, received, failures, undeliverable) = (
            latencies.clone(),
            received.clone(),
            failures.clone(),
            undeliverable.clone(),
        );
        joins.push(tokio::spawn(async move {
            let mut session = None;
            for _ in 0..5 {
                let r = Session::connect(
                    &connector,
                    Some(&ep),
                    transport,
                    server,
                    "wgice-signaling",
                    &key,
                    &mesh,
                    &token,
                    &[],
                )
                .await;
                match r {
                    Ok(s) => {
                        session = Some(s);
                        break;
                    }
                    Err(e) => {
                        eprintln!("node {i}: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            drop(permit);
            let Some(s) = session else {
                failures.fetch_add(1, Relaxed);
                return None;
            };
            let (tx, rx) = mpsc::channel(64);
            let counters = Counters {
                latencies,
                received,
                undeliverable,
            };
            tokio::spawn(node_loop(s, key.clone(), rx, epoch, counters));
            Some(Node { key, cmd: tx })
        }));
    }
    // Indexed by node number, so partners (i, i^1) stay in one mesh even
    // when a node failed to connect (its offers are then not sent at all).
    let mut nodes: Vec<Option<Node>> = Vec::with_capacity(args.nodes);
    for j in joins {
        nodes.push(j.await?);
    }
    let connected = nodes.iter().filter(|n| n.is_some()).count();
    let connect_time = t0.elapsed();
    // Let the presence fan-out settle before measuring memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after: Vec<u64> = servers.iter().map(|s| rss_kib(s.child.id())).collect();
    let grown: u64 = rss_after
        .iter()
        .zip(&rss_before)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    println!(
        "connected {} / {} nodes in {:.1} s ({} failed); server RSS {:?} KiB -> {:?} KiB: {:.1} KiB per node",
        connected,
        args.nodes,
        connect_time.as_secs_f64(),
        failures.load(Relaxed),
        rss_before,
        rss_after,
        grown as f64 / connected.max(1) as f64
    );

    // Offers between partners (i, i^1): on different instances when there are two.
    let keys: Vec<Option<PublicKey>> = nodes
        .iter()
        .map(|n| n.as_ref().map(|n| n.key.public_key()))
        .collect();
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let mut next = tokio::time::Instant::now();
    let cpu_before: f64 = servers.iter().map(|s| cpu_secs(s.child.id())).sum();
    let t1 = Instant::now();
    let mut sent = 0u64;
    let mut skipped = 0u64;
    let mut not_queued = 0u64;
    for m in 0..args.messages {
        let i = (m * 7919) % nodes.len();
        let j = i ^ 1;
        let (Some(sender), Some(Some(to))) = (&nodes[i], keys.get(j)) else {
            skipped += 1;
            continue;
        };
        let at = epoch.elapsed().as_micros() as u64;
        let offer = PeerMessage::Offer {
            session: at,
            ufrag: "benchufrag".into(),
            pwd: "benchpasswordbenchpassword".into(),
            candidates: vec![
                "candidate:1 1 udp 2130706431 192.0.2.10 51820 typ host".into(),
                "candidate:2 1 udp 1694498815 198.51.100.7 40000 typ srflx raddr 0.0.0.0 rport 0"
                    .into(),
            ],
            wg_port: None,
            cert: None,
        };
        let env = seal(&sender.key, to, now_ms(), &offer)?;
        let frame = wire::encode(&ClientFrame::Send { envelope: env });
        if sender.cmd.try_send(frame).is_ok() {
            sent += 1;
        } else {
            not_queued += 1;
        }
        next += interval;
        tokio::time::sleep_until(next).await;
    }
    let send_time = t1.elapsed();
    let cpu_used: f64 = servers.iter().map(|s| cpu_secs(s.child.id())).sum::<f64>() - cpu_before;
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_unstable();
    println!(
        "offers: sent {sent} at {:.0}/s, delivered {} ({} lost, {} reported undeliverable); not sent: {skipped} (a partner not connected), {not_queued} (the node's queue full)",
        sent as f64 / send_time.as_secs_f64(),
        lat.len(),
        sent.saturating_sub(lat.len() as u64),
        undeliverable.load(Relaxed)
    );
    println!(
        "offer→delivery latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        pct(&lat, 0.50),
        pct(&lat, 0.90),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
    println!(
        "server CPU while offering: {:.2} s for {sent} offers ({:.0} µs per offer, keep-alives of all nodes included)",
        cpu_used,
        cpu_used * 1e6 / sent.max(1) as f64
    );
    println!(
        "RESULT nodes={} transport={:?} instances={} connect_s={:.1} kib_per_node={:.1} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} delivered={}/{}",
        connected,
        transport,
        servers.len(),
        connect_time.as_secs_f64(),
        grown as f64 / connected.max(1) as f64,
        pct(&lat, 0.5),
        pct(&lat, 0.9),
        pct(&lat, 0.99),
        lat.len(),
        sent
    );
    drop(nodes);
    drop(servers);
    if let Some(mut c) = nats_child {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the receiving side of a node records.
struct Counters {
    latencies: Arc<std::sync::Mutex<Vec<u64>>>,
    received: Arc<AtomicU64>,
    undeliverable: Arc<AtomicU64>,
}

async fn node_loop(
    s: Session,
    key: PrivateKey,
    mut cmd: mpsc::Receiver<Vec<u8>>,
    epoch: Instant,
    counters: Counters,
) {
    let Counters {
        latencies,
        received,
        undeliverable,
    } = counters;
    let mut s = s;
    let mut opener = Opener::new(key);
    let mut ping = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            f = s.recv() => match f {
                Ok(Some(ServerFrame::Message { envelope })) => {
                    if let Ok(PeerMessage::Offer { session, .. }) = opener.open(now_ms(), &envelope) {
                        let lat = (epoch.elapsed().as_micros() as u64).saturating_sub(session);
                        latencies.lock().unwrap().push(lat);
                        received.fetch_add(1, Relaxed);
                    }
                }
                Ok(Some(ServerFrame::Undeliverable { .. })) => {
                    undeliverable.fetch_add(1, Relaxed);
                }
                Ok(Some(_)) => {}
                _ => return,
            },
            c = cmd.recv() => match c {
                Some(frame) => { if s.send_raw(&frame).await.is_err() { return; } }
                None => { s.close().await; return; }
            },
            _ = ping.tick() => {
                if s.send(&ClientFrame::Ping { id: 0 }).await.is_err() { return; }
            }
        }
    }
}
