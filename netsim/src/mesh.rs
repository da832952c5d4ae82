//! A netsim lab running the whole suite for real: the `relay` and
//! `signaling` binaries on a public host, and per node a `wireguard-go`
//! interface with an `ice-agent` beside it (external mode). Used by
//! `netsim demo`, the end-to-end tests and the agent benchmark.
//!
//! Names are unique per lab (the UAPI socket directory
//! `/var/run/wireguard` is shared by every namespace), and everything a lab
//! started is stopped when it is dropped.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::lab::Lab;
use crate::nat::{NatPreset, RouterConfig};
use crate::reflector::{BindingTransport, Change};
use crate::stun_client::StunClient;

/// Binaries the lab runs.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `relay`.
    pub relay: PathBuf,
    /// `signaling`.
    pub signaling: PathBuf,
    /// `ice-agent`.
    pub agent: PathBuf,
}

impl Bins {
    /// The workspace binaries in `dir` (e.g. `target/release`); the error
    /// names what is missing and how to build it.
    pub fn in_dir(dir: &Path) -> Result<Bins, String> {
        let find = |name: &str| {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(format!(
                    "{} is missing: build the workspace binaries first \
                     (cargo build --release --workspace --bins)",
                    p.display()
                ))
            }
        };
        Ok(Bins {
            relay: find("relay")?,
            signaling: find("signaling")?,
            agent: find("ice-agent")?,
        })
    }
}

/// One node: a device with a WireGuard interface and (when started) an agent.
#[derive(Debug, Clone)]
pub struct Node {
    /// Device name in the lab.
    pub name: String,
    /// WireGuard interface (unique across labs).
    pub ifname: String,
    /// WireGuard public key (base64).
    pub public_key: String,
    /// Overlay address.
    pub overlay: Ipv4Addr,
    /// LAN address.
    pub lan_ip: Ipv4Addr,
    /// The agent's control socket.
    pub control: PathBuf,
    /// The agent's config file.
    pub config: PathBuf,
    /// Embedded mode: the agent creates the interface and runs WireGuard
    /// itself (no wireguard-go).
    pub embedded: bool,
}

/// The lab. See the module docs.
#[allow(missing_debug_implementations)]
pub struct MeshLab {
    /// The netsim lab.
    pub lab: Lab,
    /// Files of this lab (configs, logs, keys).
    pub dir: PathBuf,
    bins: Bins,
    tag: String,
    pin: String,
    /// Where signaling listens (QUIC and TLS over TCP).
    signaling: SocketAddr,
    /// The relay serves TURN over TLS on `public_ip:443` with signaling's
    /// certificate, pinned in the agents' configs.
    relay_tls: bool,
    /// Nodes in the order they were added.
    pub nodes: Vec<Node>,
    /// Relays in the order agents list them: (public host, process name,
    /// TURN address). The first is `relay` on `pub`.
    pub relays: Vec<LabRelay>,
    /// The public host's IPv6 address in a dual-stack lab.
    pub pub_ip6: Option<Ipv6Addr>,
}

/// One relay of a [`MeshLab`].
#[derive(Debug, Clone)]
pub struct LabRelay {
    /// The public host it runs on (impair it with `lab.set_impairment`).
    pub host: String,
    /// Its process name in the lab.
    pub process: String,
    /// Where it serves STUN/TURN over UDP.
    pub addr: SocketAddr,
}

/// The longest silence in an overlay ping stream ([`MeshLab::ping_stream`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PingGaps {
    /// Echo requests sent.
    pub sent: u32,
    /// Replies received.
    pub replies: u32,
    /// Longest time between two consecutive replies (from the start and to
    /// the end of the stream too).
    pub max_gap: Duration,
    /// When that gap began, counted from the start of the stream.
    pub gap_started: Duration,
}

/// A running `ping -D` through the overlay; [`PingStream::finish`] waits for
/// it and measures the gaps.
#[derive(Debug)]
pub struct PingStream {
    child: std::process::Child,
    started: std::time::SystemTime,
    duration: Duration,
}

impl PingStream {
    /// Waits until the stream ends and returns its gaps (`None` if ping's
    /// output could not be read).
    pub fn finish(self) -> Option<PingGaps> {
        let out = self.child.wait_with_output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let start = self
            .started
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs_f64();
        Some(ping_gaps(&text, start, self.duration.as_secs_f64()))
    }
}

/// Gaps between the replies in `ping -D` output (`[unix.us] 64 bytes from
/// …: icmp_seq=N …`), over a stream from `start` (Unix seconds) lasting
/// `duration` seconds.
pub fn ping_gaps(text: &str, start: f64, duration: f64) -> PingGaps {
    let mut sent = 0u32;
    let mut times = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix('[') {
            let Some((ts, tail)) = rest.split_once(']') else {
                continue;
            };
            if tail.contains("bytes from") && tail.contains("icmp_seq=") {
                if let Ok(t) = ts.parse::<f64>() {
                    times.push(t);
                }
            }
        }
        if let Some(p) = line.find(" packets transmitted") {
            sent = line[..p].trim().parse().unwrap_or(0);
        }
    }
    times.sort_by(f64::total_cmp);
    let mut edges = vec![start];
    edges.extend(times.iter().copied());
    edges.push(start + duration);
    let (mut max_gap, mut at) = (0.0f64, 0.0f64);
    for w in edges.windows(2) {
        if w[1] - w[0] > max_gap {
            max_gap = w[1] - w[0];
            at = w[0] - start;
        }
    }
    PingGaps {
        sent,
        replies: times.len() as u32,
        max_gap: Duration::from_secs_f64(max_gap.max(0.0)),
        gap_started: Duration::from_secs_f64(at.max(0.0)),
    }
}

/// The lab mesh's token (mesh `lab`): any holder may join, which is what
/// hostile-member tests play.
pub const TOKEN: &str = "mesh-token-for-the-netsim-lab-0123456789";
const WG_PORT: u16 = 51820;
const AGENT_PORT: u16 = 51821;

/// The relay's command line on `addr` (the lab's user, one worker, the
/// lab's public ranges allowed as peers).
fn relay_argv(bins: &Bins, addr: SocketAddr) -> Vec<String> {
    vec![
        s(bins.relay.display()),
        s("--listen"),
        s(addr),
        s("--user"),
        s("agent:agent-pass"),
        s("--workers"),
        s("1"),
        // The lab's "public" addresses are documentation ranges,
        // which the relay refuses as peers by default.
        s("--allow-peer"),
        s("203.0.113.0/24"),
        s("--allow-peer"),
        s("198.51.100.0/24"),
    ]
}

/// A `[[relays]]` entry of an agent config for the lab relay at `addr`.
fn relay_toml(addr: SocketAddr, pin: &str) -> String {
    format!(
        "[[relays]]\nurl = \"turn:{addr}\"\nusername = \"agent\"\npassword = \"agent-pass\"\n{pin}\n"
    )
}

/// Waits (at most 15 s) until `addr` answers a STUN Binding from `host`.
fn wait_stun(lab: &Lab, host: &str, addr: SocketAddr, what: &str) {
    let sock = lab.udp_socket(host, 0).expect("socket");
    let deadline = Instant::now() + Duration::from_secs(15);
    while StunClient
        .binding(&sock, addr, Change::default(), Duration::from_millis(200))
        .expect("io")
        .is_none()
    {
        assert!(Instant::now() < deadline, "{what} did not start");
    }
}

/// A `[[relays]]` entry for coturn at `addr` with TURN REST credentials.
fn coturn_toml(addr: SocketAddr, secret: &str, lifetime_secs: u64) -> String {
    format!(
        "[[relays]]\nurl = \"turn:{addr}\"\nusername = \"agent\"\nsecret = \"{secret}\"\n\
         credential_lifetime_secs = {lifetime_secs}\n\n"
    )
}

/// One argv element (`s("ip")`, `s(addr)`).
pub fn s(x: impl ToString) -> String {
    x.to_string()
}

impl MeshLab {
    /// A lab with a public host running the relay and signaling.
    pub fn new(bins: &Bins) -> MeshLab {
        MeshLab::build(bins, false, false)
    }

    /// A lab whose public host also has IPv6 (`lab/ipv6.rs`): the relay
    /// listens and relays on both families, signaling listens on `[::]`.
    /// Routers get IPv6 with `lab.enable_ipv6(router)`, devices can lose
    /// IPv4 with [`MeshLab::use_ipv6_only`].
    pub fn new_dual_stack(bins: &Bins) -> MeshLab {
        MeshLab::build(bins, false, true)
    }

    /// A lab for UDP-blocked networks (which let only TCP 443 out): the
    /// relay also serves TURN over TLS on its address's port 443 (with a
    /// self-signed certificate the agents pin), and signaling listens on
    /// port 443 of a second address of the public host.
    pub fn new_with_relay_tls(bins: &Bins) -> MeshLab {
        MeshLab::build(bins, true, false)
    }

    fn build(bins: &Bins, relay_tls: bool, ipv6: bool) -> MeshLab {
        let lab = Lab::new().expect("lab");
        let dir = lab.work_dir().join("mesh");
        std::fs::create_dir_all(&dir).expect("mkdir");
        // Interface names must be unique across labs (shared UAPI directory)
        // and at most 15 characters.
        let tag = format!("{:06x}", fxhash(lab.prefix()) & 0xff_ffff);
        let ips = lab.add_public_host("pub", 2).expect("public host");
        let public_ip = ips[0];
        let pub_ip6 = ipv6.then(|| lab.enable_ipv6("pub").expect("IPv6 on pub")[0]);
        let signaling = if relay_tls {
            SocketAddr::from((ips[1], 443))
        } else {
            SocketAddr::from((public_ip, 4443))
        };
        let certs = dir.join("sig-cert");
        let out = Command::new(&bins.signaling)
            .args(["fingerprint", "--self-signed-dir"])
            .arg(&certs)
            .output()
            .expect("signaling fingerprint");
        let pin = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_owned();
        assert_eq!(pin.len(), 64, "fingerprint: {out:?}");
        let relay_addr = SocketAddr::from((public_ip, 3478));
        let mut relay_args = relay_argv(bins, relay_addr);
        // RFC 5780 on the second address, so the agents' background
        // netcheck can name their NATs' mapping and filtering.
        relay_args.extend([s("--alt-listen"), s(SocketAddr::from((ips[1], 3479)))]);
        if let Some(v6) = pub_ip6 {
            relay_args.extend([s("--listen"), s(SocketAddr::from((v6, 3478)))]);
        }
        if relay_tls {
            // TCP on 3478 beside UDP, TLS on 443 with signaling's
            // self-signed certificate (so one pin serves both).
            relay_args.extend([
                s("--tcp-listen"),
                s(relay_addr),
                s("--tls-listen"),
                s(SocketAddr::from((public_ip, 443))),
                s("--cert"),
                s(certs.join("cert.pem").display()),
                s("--key"),
                s(certs.join("key.pem").display()),
            ]);
        }
        lab.spawn("relay", "pub", &relay_args, &[], &dir)
            .expect("spawn relay");
        lab.spawn(
            "signaling",
            "pub",
            &[
                s(bins.signaling.display()),
                s("serve"),
                s("--listen"),
                // Both families on one dual-stack socket in a dual-stack lab.
                s(if ipv6 {
                    SocketAddr::from((Ipv6Addr::UNSPECIFIED, signaling.port()))
                } else {
                    signaling
                }),
                s("--self-signed-dir"),
                s(certs.display()),
                s("--mesh"),
                format!("lab={TOKEN}"),
            ],
            &[],
            &dir,
        )
        .expect("spawn signaling");
        // Both answer from inside the lab before anything else starts.
        let deadline = Instant::now() + Duration::from_secs(15);
        let sock = lab.udp_socket("pub", 0).expect("socket");
        while StunClient
            .binding(
                &sock,
                relay_addr,
                Change::default(),
                Duration::from_millis(200),
            )
            .expect("io")
            .is_none()
        {
            assert!(Instant::now() < deadline, "relay did not start");
        }
        let sig = signaling;
        let tls = SocketAddr::from((public_ip, 443));
        loop {
            let up = lab
                .in_node("pub", move || {
                    TcpStream::connect_timeout(&sig, Duration::from_millis(200)).is_ok()
                        && (!relay_tls
                            || TcpStream::connect_timeout(&tls, Duration::from_millis(200)).is_ok())
                })
                .expect("in_node");
            if up {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "signaling (or the relay's TLS listener) did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        MeshLab {
            lab,
            dir,
            bins: bins.clone(),
            tag,
            pin,
            signaling,
            relay_tls,
            nodes: Vec::new(),
            relays: vec![LabRelay {
                host: "pub".into(),
                process: "relay".into(),
                addr: relay_addr,
            }],
            pub_ip6,
        }
    }

    /// Takes node `i`'s IPv4 away (its router must have IPv6) and points
    /// its agent at signaling and the first relay by their IPv6 addresses.
    /// Call before starting the agent.
    pub fn use_ipv6_only(&self, i: usize) {
        let v6 = self
            .pub_ip6
            .expect("a dual-stack lab (MeshLab::new_dual_stack)");
        let n = &self.nodes[i];
        self.lab.make_ipv6_only(&n.name).expect("IPv6 only");
        let relay = self.relays[0].addr;
        let text = std::fs::read_to_string(&n.config)
            .expect("read config")
            .replace(
                &format!("quic://{}", self.signaling),
                &format!("quic://[{v6}]:{}", self.signaling.port()),
            )
            .replace(
                &format!("turn:{relay}"),
                &format!("turn:[{v6}]:{}", relay.port()),
            );
        std::fs::write(&n.config, text).expect("write config");
    }

    /// Two nodes `a` and `b`, each behind its own router (`ra`, `rb`) with
    /// these presets; agents not started. Returns their indices.
    pub fn pair(&mut self, pa: NatPreset, pb: NatPreset) -> (usize, usize) {
        self.add_router("ra", pa);
        self.add_router("rb", pb);
        (self.add_node("a", "ra"), self.add_node("b", "rb"))
    }

    /// Starts the agents of `nodes` and waits until each reports every other
    /// one on `path`.
    pub fn start_and_wait(&self, nodes: &[usize], path: &str) {
        for &i in nodes {
            self.start_agent(i);
        }
        for &i in nodes {
            for &j in nodes {
                if i != j {
                    if let Err(e) = self.wait_path(i, j, path, Duration::from_secs(15)) {
                        panic!("{e}");
                    }
                }
            }
        }
    }

    /// Runs `argv` in node `i` and returns its output; panics with the
    /// output if it fails.
    pub fn exec(&self, i: usize, argv: &[String]) -> String {
        let (ok, out) = self.lab.exec(&self.nodes[i].name, argv).expect("exec");
        assert!(ok, "{argv:?}: {out}");
        out
    }

    /// Adds a NAT router.
    pub fn add_router(&self, name: &str, preset: NatPreset) {
        self.lab
            .add_router(name, RouterConfig::new(preset))
            .expect("router");
    }

    /// Adds a device behind `router` with a wireguard-go interface (key,
    /// port 51820, overlay `10.77.0.<n>/24`) and writes its agent config
    /// (external mode). The agent is not started.
    pub fn add_node(&mut self, name: &str, router: &str) -> usize {
        self.add_node_mode(name, router, false)
    }

    /// Adds a device behind `router` whose agent runs in embedded mode: it
    /// creates the interface (overlay `10.77.0.<n>/24`) and runs WireGuard
    /// on its own socket; no wireguard-go. The agent is not started.
    pub fn add_embedded_node(&mut self, name: &str, router: &str) -> usize {
        self.add_node_mode(name, router, true)
    }

    fn add_node_mode(&mut self, name: &str, router: &str, embedded: bool) -> usize {
        let lan_ip = self.lab.add_device(name, router).expect("device");
        let idx = self.nodes.len();
        let ifname = format!("wg{}{}", self.tag, idx);
        let overlay = Ipv4Addr::new(10, 77, 0, 1 + idx as u8);
        let key_file = self.dir.join(format!("{name}.key"));
        let key = run("wg", &["genkey"]);
        std::fs::write(&key_file, &key).expect("write key");
        let public_key = pipe("wg", &["pubkey"], &key);
        let uapi = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        let _ = std::fs::remove_file(&uapi);
        if !embedded {
            self.lab
                .spawn(
                    &format!("wg-{name}"),
                    name,
                    &[s("wireguard-go"), s("-f"), ifname.clone()],
                    &[("LOG_LEVEL".into(), "error".into())],
                    &self.dir,
                )
                .expect("spawn wireguard-go");
            let deadline = Instant::now() + Duration::from_secs(10);
            while !uapi.exists() {
                assert!(
                    Instant::now() < deadline,
                    "wireguard-go did not create {uapi:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let wg_lines = if embedded {
            format!(
                "mode = \"embedded\"\nprivate_key_file = \"{}\"\naddress = [\"{overlay}/24\"]\n",
                key_file.display()
            )
        } else {
            format!("address = [\"{overlay}/32\"]\n")
        };
        let control = self.dir.join(format!("{name}.ctl"));
        let config = self.dir.join(format!("{name}.toml"));
        let relay_pin = if self.relay_tls {
            format!("pin_sha256 = \"{}\"\n", self.pin)
        } else {
            String::new()
        };
        let relay_lines: String = self
            .relays
            .iter()
            .enumerate()
            .map(|(k, r)| {
                let pin = if k == 0 { relay_pin.as_str() } else { "" };
                relay_toml(r.addr, pin)
            })
            .collect();
        std::fs::write(
            &config,
            format!(
                "peers = \"auto\"\n\n[wireguard]\ninterface = \"{ifname}\"\nport = {AGENT_PORT}\n\
                 {wg_lines}\n[signaling]\nurl = \"quic://{sig}\"\n\
                 pin_sha256 = \"{pin}\"\nmesh = \"lab\"\nmesh_token = \"{TOKEN}\"\n\n\
                 {relay_lines}\
                 [agent]\ncontrol = \"{control}\"\nmetrics = \"127.0.0.1:9586\"\n",
                sig = self.signaling,
                pin = self.pin,
                control = control.display()
            ),
        )
        .expect("write config");
        self.nodes.push(Node {
            name: name.into(),
            ifname,
            public_key,
            overlay,
            lan_ip,
            control,
            config,
            embedded,
        });
        if !embedded {
            self.configure_wg(idx);
        }
        idx
    }

    /// Rewrites node `i`'s config to list the other nodes as `[[peers]]`
    /// (public key, overlay /32, and a site range `10.88.<j>.0/24` behind each,
    /// which `auto` could never give) instead of `peers = "auto"`.
    pub fn use_explicit_peers(&self, i: usize) {
        let n = &self.nodes[i];
        let text = std::fs::read_to_string(&n.config).expect("config");
        let mut peers = String::new();
        for (j, o) in self.nodes.iter().enumerate() {
            if j != i {
                peers += &format!(
                    "\n[[peers]]\npublic_key = \"{}\"\nallowed_ips = [\"{}/32\", \"10.88.{j}.0/24\"]\n",
                    o.public_key, o.overlay
                );
            }
        }
        let text = text.replacen("peers = \"auto\"\n", "", 1) + &peers;
        std::fs::write(&n.config, text).expect("write config");
    }

    /// The signaling server's address and certificate pin (for a test that
    /// joins the mesh with a client of its own).
    pub fn signaling_endpoint(&self) -> (SocketAddr, String) {
        (self.signaling, self.pin.clone())
    }

    /// Creates an operator CA in `dir` with `ice-agent ca init`; returns its
    /// public key.
    pub fn ca_init(&self, dir: &Path) -> String {
        let out = Command::new(&self.bins.agent)
            .args(["ca", "init", "--dir"])
            .arg(dir)
            .output()
            .expect("ice-agent ca init");
        assert!(out.status.success(), "ca init: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Signs a certificate with `ice-agent ca sign` (the CA in `ca_dir`).
    pub fn ca_sign(&self, ca_dir: &Path, key: &str, name: &str, address: &str) -> String {
        let out = Command::new(&self.bins.agent)
            .args(["ca", "sign", "--ca-key"])
            .arg(ca_dir.join("ca.key"))
            .args(["--key", key, "--name", name, "--address", address])
            .args(["--expires", "1d"])
            .output()
            .expect("ice-agent ca sign");
        assert!(out.status.success(), "ca sign: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Gives node `i` a certificate from the CA in `ca_dir` (its name and
    /// overlay /32) and makes its agent require certificates from peers.
    pub fn use_membership(&self, i: usize, ca_dir: &Path, ca_public: &str) {
        let n = &self.nodes[i];
        let cert = self.ca_sign(ca_dir, &n.public_key, &n.name, &format!("{}/32", n.overlay));
        let cert_file = self.dir.join(format!("{}.cert", n.name));
        std::fs::write(&cert_file, cert + "\n").expect("write cert");
        let text = std::fs::read_to_string(&n.config).expect("config");
        let text = text
            + &format!(
                "\n[membership]\nca = [\"{ca_public}\"]\ncertificate_file = \"{}\"\n",
                cert_file.display()
            );
        std::fs::write(&n.config, text).expect("write config");
    }

    /// Starts another relay on a public host of its own (`pub2`, `pub3`,
    /// …, so it can be impaired alone) and lists it after the others in
    /// every node's config (nodes added later get it too). Call before
    /// starting the agents. Returns its index in [`MeshLab::relays`].
    pub fn add_relay(&mut self) -> usize {
        let k = self.relays.len() + 1;
        let host = format!("pub{k}");
        let ip = self.lab.add_public_host(&host, 1).expect("public host")[0];
        let addr = SocketAddr::from((ip, 3478));
        let process = format!("relay{k}");
        self.lab
            .spawn(
                &process,
                &host,
                &relay_argv(&self.bins, addr),
                &[],
                &self.dir,
            )
            .expect("spawn relay");
        wait_stun(&self.lab, &host, addr, &process);
        self.edit_configs(|text| text + &relay_toml(addr, ""));
        self.relays.push(LabRelay {
            host,
            process,
            addr,
        });
        self.relays.len() - 1
    }

    /// Puts coturn (`turnserver`, TURN REST with `secret`) on a public host
    /// of its own in place of every relay in the nodes' configs: the agents
    /// mint `expiry:agent` usernames valid for `lifetime_secs`. Call before
    /// starting the agents; it becomes the only entry of
    /// [`MeshLab::relays`] (process `coturn`, its log `coturn.stdout`).
    pub fn use_coturn(&mut self, secret: &str, lifetime_secs: u64) {
        let addr = self.spawn_coturn(secret);
        let entry = coturn_toml(addr, secret, lifetime_secs);
        self.edit_configs(|text| {
            let (Some(from), Some(to)) = (text.find("[[relays]]"), text.find("[agent]")) else {
                panic!("no [[relays]] before [agent] in a lab config");
            };
            format!("{}{entry}{}", &text[..from], &text[to..])
        });
        self.relays = vec![LabRelay {
            host: "pubc".into(),
            process: "coturn".into(),
            addr,
        }];
    }

    /// Like [`MeshLab::use_coturn`], but lists coturn after the lab's other
    /// relays instead of replacing them. Returns its index in
    /// [`MeshLab::relays`].
    pub fn add_coturn(&mut self, secret: &str, lifetime_secs: u64) -> usize {
        let addr = self.spawn_coturn(secret);
        self.edit_configs(|text| text + &coturn_toml(addr, secret, lifetime_secs));
        self.relays.push(LabRelay {
            host: "pubc".into(),
            process: "coturn".into(),
            addr,
        });
        self.relays.len() - 1
    }

    /// Starts coturn on public host `pubc`; returns its STUN/TURN address.
    fn spawn_coturn(&mut self, secret: &str) -> SocketAddr {
        let host = "pubc";
        let ip = self.lab.add_public_host(host, 1).expect("public host")[0];
        let addr = SocketAddr::from((ip, 3478));
        let argv = [
            "turnserver",
            "-n",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--no-tcp",
            "--simple-log",
            "--verbose",
            "--log-file",
            "stdout",
            "--realm",
            "wgice-lab",
            "--use-auth-secret",
        ];
        let mut argv: Vec<String> = argv.iter().map(s).collect();
        argv.extend([
            s("--static-auth-secret"),
            s(secret),
            s("--listening-ip"),
            s(ip),
            s("--relay-ip"),
            s(ip),
            s("--listening-port"),
            s(3478),
            s("--min-port"),
            s(40000),
            s("--max-port"),
            s(40999),
            s("--pidfile"),
            s(self.dir.join("coturn.pid").display()),
            s("--db"),
            s(self.dir.join("coturn.db").display()),
        ]);
        self.lab
            .spawn("coturn", host, &argv, &[], &self.dir)
            .expect("spawn coturn");
        wait_stun(&self.lab, host, addr, "coturn");
        addr
    }

    /// Rewrites every node's agent config with `f`.
    fn edit_configs(&self, f: impl Fn(String) -> String) {
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.config).expect("read config");
            std::fs::write(&n.config, f(text)).expect("write config");
        }
    }

    /// Kills relay `k` with SIGKILL (no goodbye: its allocations vanish
    /// and it stops answering at once).
    pub fn kill_relay(&self, k: usize) {
        self.lab
            .kill_process_hard(&self.relays[k].process)
            .expect("kill relay");
    }

    /// Starts relay `k` again (a fresh process: it has forgotten every
    /// allocation).
    pub fn restart_relay(&self, k: usize) {
        self.lab
            .restart_process(&self.relays[k].process)
            .expect("restart relay");
    }

    /// Starts `ping -D -i interval` from node `i` to node `j`'s overlay
    /// address for `duration`; [`PingStream::finish`] waits for it and
    /// returns the longest gap between replies.
    pub fn ping_stream(
        &self,
        i: usize,
        j: usize,
        interval: Duration,
        duration: Duration,
    ) -> PingStream {
        let ns = self.lab.ns(&self.nodes[i].name).expect("ns");
        let started = std::time::SystemTime::now();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "ping", "-D", "-n", "-W", "1"])
            .arg("-i")
            .arg(format!("{:.3}", interval.as_secs_f64()))
            .arg("-w")
            .arg(duration.as_secs().max(1).to_string())
            .arg(self.nodes[j].overlay.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn ping");
        PingStream {
            child,
            started,
            duration: Duration::from_secs(duration.as_secs().max(1)),
        }
    }

    /// The relay (index in [`MeshLab::relays`]) whose relayed address node
    /// `i`'s path to node `j` starts from, if that path is relayed.
    pub fn relay_in_use(&self, i: usize, j: usize) -> Option<usize> {
        let row = self.peer_status(i, j)?;
        if row["path"] != "relay" {
            return None;
        }
        // Our relayed address, or (from a host address) the peer's.
        let ends: Vec<SocketAddr> = ["local", "remote"]
            .iter()
            .filter_map(|f| row[*f].as_str()?.parse().ok())
            .collect();
        ends.iter()
            .find_map(|e| self.relays.iter().position(|r| r.addr.ip() == e.ip()))
    }

    /// Waits until node `i` has an allocation and an RTT on every relay,
    /// none down, and one active; returns the active one's index.
    pub fn wait_relays_ready(&self, i: usize, timeout: Duration) -> Result<usize, String> {
        let t0 = Instant::now();
        let mut last = None;
        while t0.elapsed() < timeout {
            if let Some(st) = self.status(i) {
                let rows = st["relays"].as_array().cloned().unwrap_or_default();
                let ready = rows.len() == self.relays.len()
                    && rows.iter().all(|r| {
                        r["rtt_ms"].is_number()
                            && r["down"] != true
                            && r["relayed"].as_array().is_some_and(|a| !a.is_empty())
                    });
                let active = rows.iter().position(|r| r["active"] == true);
                if let (true, Some(k)) = (ready, active) {
                    let server: Option<SocketAddr> =
                        rows[k]["server"].as_str().and_then(|s| s.parse().ok());
                    if let Some(idx) = self.relays.iter().position(|r| Some(r.addr) == server) {
                        return Ok(idx);
                    }
                }
                last = Some(st["relays"].clone());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "{}: relays never all ready within {timeout:?}; last: {last:#?}",
            self.nodes[i].name
        ))
    }

    /// Starts node `i`'s agent.
    pub fn start_agent(&self, i: usize) {
        let n = &self.nodes[i];
        self.lab
            .spawn(
                &format!("agent-{}", n.name),
                &n.name,
                &[
                    s(self.bins.agent.display()),
                    s("up"),
                    s("--config"),
                    s(n.config.display()),
                    s("--log"),
                    s("info,ice_agent=debug"),
                ],
                &[],
                &self.dir,
            )
            .expect("spawn agent");
    }

    /// Gives node `i`'s interface its key, listen port 51820, overlay
    /// address, and brings it up (what wg-quick would do).
    fn configure_wg(&self, i: usize) {
        let n = &self.nodes[i];
        let key_file = self.dir.join(format!("{}.key", n.name));
        let (name, ifname, overlay) = (n.name.clone(), n.ifname.clone(), n.overlay);
        for argv in [
            vec![
                s("wg"),
                s("set"),
                ifname.clone(),
                s("private-key"),
                s(key_file.display()),
                s("listen-port"),
                s(WG_PORT),
            ],
            vec![
                s("ip"),
                s("addr"),
                s("add"),
                format!("{overlay}/24"),
                s("dev"),
                ifname.clone(),
            ],
            vec![s("ip"), s("link"), s("set"), ifname.clone(), s("up")],
        ] {
            let (ok, out) = self.lab.exec(&name, &argv).expect("exec");
            assert!(ok, "{argv:?}: {out}");
        }
    }

    /// Starts an iperf3 server on node `i` (a second call finds it running).
    pub fn iperf_server(&self, i: usize) {
        let r = self.lab.spawn(
            &format!("iperf-{}", self.nodes[i].name),
            &self.nodes[i].name,
            &[s("iperf3"), s("-s")],
            &[],
            &self.dir,
        );
        match r {
            Ok(_) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) if e.to_string().contains("already exists") => {}
            Err(e) => panic!("iperf3 -s: {e}"),
        }
    }

    /// TCP throughput in Mbit/s from node `from` to node `to`'s overlay
    /// address (iperf3, `streams` parallel streams, `secs` seconds; the
    /// server must run, see [`MeshLab::iperf_server`]). `None` when iperf3
    /// fails.
    pub fn iperf(&self, from: usize, to: usize, secs: u32, streams: u32) -> Option<f64> {
        let (ok, out) = self
            .lab
            .exec(
                &self.nodes[from].name,
                &[
                    s("iperf3"),
                    s("-c"),
                    s(self.nodes[to].overlay),
                    s("-t"),
                    s(secs),
                    s("-P"),
                    s(streams),
                    s("-J"),
                ],
            )
            .ok()?;
        if !ok {
            eprintln!("iperf3 failed: {out}");
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e6)
    }

    /// Restarts node `i`'s wireguard-go (the interface is deleted and
    /// created again, empty) and configures it as at the start, as a restart
    /// of wg-quick would.
    pub fn restart_wireguard(&self, i: usize) {
        let n = &self.nodes[i];
        let uapi = PathBuf::from(format!("/var/run/wireguard/{}.sock", n.ifname));
        self.lab
            .kill_process(&format!("wg-{}", n.name))
            .expect("stop wireguard-go");
        let _ = std::fs::remove_file(&uapi);
        self.lab
            .restart_process(&format!("wg-{}", n.name))
            .expect("start wireguard-go");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !uapi.exists() {
            assert!(Instant::now() < deadline, "wireguard-go did not come back");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.configure_wg(i);
    }

    /// Starts node `i`'s agent again after [`MeshLab::stop_agent`].
    pub fn restart_agent(&self, i: usize) {
        self.lab
            .restart_process(&format!("agent-{}", self.nodes[i].name))
            .expect("restart agent");
    }

    /// Restarts node `i`'s agent with `env` as its extra environment (e.g.
    /// `WGICE_OFFLOADS` in the data-plane benchmark).
    pub fn restart_agent_env(&self, i: usize, env: &[(String, String)]) {
        self.lab
            .restart_process_env(&format!("agent-{}", self.nodes[i].name), Some(env))
            .expect("restart agent");
    }

    /// Stops node `i`'s agent with SIGTERM; returns its exit code, or
    /// `None` if it did not exit by itself within 10 s (then it is killed).
    pub fn stop_agent(&self, i: usize) -> Option<i32> {
        self.lab
            .terminate_process(
                &format!("agent-{}", self.nodes[i].name),
                Duration::from_secs(10),
            )
            .expect("stop agent")
    }

    /// `ice-agent status --json` of node `i`, if the agent answers.
    pub fn status(&self, i: usize) -> Option<serde_json::Value> {
        let out = Command::new(&self.bins.agent)
            .args(["status", "--json", "--control"])
            .arg(&self.nodes[i].control)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `ice-agent status` (the table) of node `i`.
    pub fn status_table(&self, i: usize) -> String {
        Command::new(&self.bins.agent)
            .args(["status", "--control"])
            .arg(&self.nodes[i].control)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Node `i`'s Prometheus metrics (from inside its namespace).
    pub fn metrics(&self, i: usize) -> String {
        self.lab
            .in_node(&self.nodes[i].name, || {
                use std::io::{Read, Write};
                let mut out = String::new();
                if let Ok(mut c) = TcpStream::connect("127.0.0.1:9586") {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
                    let _ = c.read_to_string(&mut out);
                }
                out
            })
            .expect("in_node")
    }

    /// Node `i`'s status row for node `j`.
    pub fn peer_status(&self, i: usize, j: usize) -> Option<serde_json::Value> {
        let st = self.status(i)?;
        st["peers"]
            .as_array()?
            .iter()
            .find(|p| p["public_key"] == self.nodes[j].public_key.as_str())
            .cloned()
    }

    /// Waits until node `i` reports node `j` on `path`; returns the row and
    /// how long it took, or the last row seen on timeout.
    pub fn wait_path(
        &self,
        i: usize,
        j: usize,
        path: &str,
        timeout: Duration,
    ) -> Result<(serde_json::Value, Duration), String> {
        let t0 = Instant::now();
        let mut last = None;
        while t0.elapsed() < timeout {
            if let Some(row) = self.peer_status(i, j) {
                if row["path"] == path {
                    return Ok((row, t0.elapsed()));
                }
                last = Some(row);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "{} never reported {} on {path:?} within {timeout:?}; last: {last:#?}\n{}",
            self.nodes[i].name,
            self.nodes[j].name,
            self.logs()
        ))
    }

    /// Pings node `j`'s overlay address from node `i` (`count` echoes, 1 s
    /// wait each); true if any answer came back.
    pub fn ping(&self, i: usize, j: usize, count: u32) -> bool {
        self.ping_sized(i, j, count, 56)
    }

    /// [`MeshLab::ping`] with `size` bytes of ICMP payload (1392 fills
    /// wireguard-go's 1420-byte MTU exactly).
    pub fn ping_sized(&self, i: usize, j: usize, count: u32, size: u32) -> bool {
        let (ok, _) = self
            .lab
            .exec(
                &self.nodes[i].name,
                &[
                    s("ping"),
                    s("-c"),
                    s(count),
                    s("-i"),
                    s("0.2"),
                    s("-W"),
                    s("1"),
                    s("-s"),
                    s(size),
                    s(self.nodes[j].overlay),
                ],
            )
            .expect("exec ping");
        ok
    }

    /// Pings until an answer comes or `within` passes (a peer that just
    /// restarted may need WireGuard's 5 s handshake retry first).
    pub fn ping_within(&self, i: usize, j: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.ping(i, j, 3) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// Node `i`'s WireGuard peers as `wg show dump` prints them, one row
    /// each: [public key, preshared key, endpoint, allowed ips, handshake,
    /// rx, tx, keepalive].
    pub fn wg_dump(&self, i: usize) -> Vec<Vec<String>> {
        let n = &self.nodes[i];
        let (_, out) = self
            .lab
            .exec(&n.name, &[s("wg"), s("show"), n.ifname.clone(), s("dump")])
            .expect("exec wg");
        out.lines()
            .skip(1)
            .map(|l| l.split('\t').map(str::to_owned).collect::<Vec<_>>())
            .filter(|f| f.len() >= 8)
            .collect()
    }

    /// Node `i`'s WireGuard peers: (public key, endpoint, latest handshake).
    pub fn wg_peers(&self, i: usize) -> Vec<(String, String, u64)> {
        self.wg_dump(i)
            .into_iter()
            .map(|f| (f[0].clone(), f[2].clone(), f[4].parse().unwrap_or(0)))
            .collect()
    }

    /// Node `i`'s row (see [`MeshLab::wg_dump`]) for peer `public_key`.
    pub fn wg_peer_fields(&self, i: usize, public_key: &str) -> Option<Vec<String>> {
        self.wg_dump(i).into_iter().find(|f| f[0] == public_key)
    }

    /// Runs `wg` with `args` in node `i` (e.g. to set up peers by hand).
    pub fn wg(&self, i: usize, args: &[String]) {
        let mut argv = vec![s("wg")];
        argv.extend_from_slice(args);
        self.exec(i, &argv);
    }

    /// Drops UDP between router `a`'s WAN and router `b`'s WAN at `a`
    /// (both directions): the direct path dies, the relay path stays.
    pub fn cut_direct(&self, a: &str, b: &str) {
        let wan_b = self.lab.router_wan_ip(b).expect("wan");
        self.cut_at(a, wan_b);
    }

    /// Drops everything between router `a` and address `wan_b` at `a` (for a
    /// carrier-grade NAT, the outer address a peer is seen from).
    pub fn cut_at(&self, a: &str, wan_b: Ipv4Addr) {
        let script = format!(
            "table inet wgicecut {{\n chain cut {{\n  type filter hook forward priority -5;\n  \
             ip daddr {wan_b} drop\n  ip saddr {wan_b} drop\n }}\n}}\n"
        );
        let file = self.dir.join(format!("cut-{a}.nft"));
        std::fs::write(&file, script).expect("write nft");
        let (ok, out) = self
            .lab
            .exec(a, &[s("nft"), s("-f"), s(file.display())])
            .expect("exec nft");
        assert!(ok, "nft: {out}");
    }

    /// Undoes [`MeshLab::cut_direct`].
    pub fn restore_direct(&self, a: &str) {
        let (ok, out) = self
            .lab
            .exec(
                a,
                &[s("nft"), s("delete"), s("table"), s("inet"), s("wgicecut")],
            )
            .expect("exec nft");
        assert!(ok, "nft: {out}");
    }

    /// A blackhole at router `a` on the direct path to router `b`'s WAN
    /// address (both directions; the relay path is untouched).
    pub fn blackhole_direct(&self, a: &str, b: &str, bh: crate::impair::Blackhole) {
        let wan_b = self.lab.router_wan_ip(b).expect("wan");
        self.lab
            .set_blackhole(a, wan_b, Some(bh))
            .expect("set blackhole");
    }

    /// Removes router `a`'s blackhole; returns how many datagrams it dropped.
    pub fn heal_blackhole(&self, a: &str) -> u64 {
        let drops = self.lab.blackhole_drops(a).expect("drops");
        let wan = self.lab.router_wan_ip(a).expect("wan");
        self.lab
            .set_blackhole(a, wan, None)
            .expect("heal blackhole");
        drops
    }

    /// A blackhole drill: overlay pings of `ping_size` bytes from node `a`
    /// to node `b` every 50 ms; after 1.5 s of answers, a blackhole `bh`
    /// goes in at `a`'s router on the direct path to `b`'s router (the
    /// relay path untouched), and the drill measures how long until pings
    /// are answered again and until `a`'s status says `relay`. The
    /// blackhole stays (see [`MeshLab::heal_blackhole`]).
    pub fn blackhole_drill(
        &self,
        a: usize,
        b: usize,
        bh: crate::impair::Blackhole,
        ping_size: u32,
    ) -> BlackholeDrill {
        let ra = self.lab.router_of(&self.nodes[a].name).expect("router a");
        let rb = self.lab.router_of(&self.nodes[b].name).expect("router b");
        let name = format!(
            "bhping-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        self.lab
            .spawn(
                &name,
                &self.nodes[a].name,
                &[
                    s("ping"),
                    s("-D"),
                    s("-n"),
                    s("-i"),
                    s("0.05"),
                    s("-W"),
                    s("1"),
                    s("-s"),
                    s(ping_size),
                    s("-c"),
                    s(400),
                    s(self.nodes[b].overlay),
                ],
                &[],
                &self.dir,
            )
            .expect("spawn ping");
        let log =
            || std::fs::read_to_string(self.dir.join(format!("{name}.stdout"))).unwrap_or_default();
        std::thread::sleep(Duration::from_millis(1500));
        let answered_before = reply_times(&log()).len();
        let t0 = unix_now();
        let start = Instant::now();
        self.blackhole_direct(&ra, &rb, bh);
        let mut status_relay = None;
        let mut recovered = None;
        while start.elapsed() < Duration::from_secs(12)
            && (status_relay.is_none() || recovered.is_none())
        {
            if status_relay.is_none()
                && self.peer_status(a, b).is_some_and(|r| r["path"] == "relay")
            {
                status_relay = Some(start.elapsed());
            }
            if recovered.is_none() {
                if let Some(t) = reply_times(&log()).into_iter().find(|t| *t > t0 + 0.05) {
                    recovered = Some(Duration::from_secs_f64(t - t0));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.lab.kill_process(&name);
        // Let the peer's side settle (its size sweep answers) before the
        // status rows are read.
        std::thread::sleep(Duration::from_millis(500));
        let text = log();
        let sent = text.lines().filter(|l| l.contains("icmp_seq=")).count();
        BlackholeDrill {
            recovered,
            status_relay,
            answered_before,
            answered: sent,
            drops: self.lab.blackhole_drops(&ra).unwrap_or(0),
            row_a: self.peer_status(a, b),
            row_b: self.peer_status(b, a),
        }
    }

    /// The agents' logs (for failure messages).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let p = self.dir.join(format!("agent-{}.stderr", n.name));
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out += &format!("--- {} (last 40 lines) ---\n", p.display());
            for l in tail.into_iter().rev() {
                out += l;
                out.push('\n');
            }
        }
        out
    }

    /// Copies the lab's process logs (`*.stderr`, `*.stdout`) to the
    /// directory `WGICE_E2E_KEEP_LOGS` names, if it is set (the lab's own
    /// directory goes away with it).
    pub fn keep_logs(&self) {
        let Some(to) = std::env::var_os("WGICE_E2E_KEEP_LOGS").map(PathBuf::from) else {
            return;
        };
        let _ = std::fs::create_dir_all(&to);
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.extension()
                .is_some_and(|x| x == "stderr" || x == "stdout")
            {
                if let Some(name) = p.file_name() {
                    let _ = std::fs::copy(&p, to.join(name));
                }
            }
        }
    }

    /// Where a file of this lab goes.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for MeshLab {
    fn drop(&mut self) {
        // Agents first (they restore their interfaces), then everything else.
        for n in &self.nodes {
            let _ = self.lab.kill_process(&format!("agent-{}", n.name));
        }
        self.lab.teardown();
        for n in &self.nodes {
            let _ =
                std::fs::remove_file(Path::new(&format!("/var/run/wireguard/{}.sock", n.ifname)));
        }
    }
}

/// Runs `cmd` on the host and returns its trimmed stdout; panics if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("run");
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Like [`run`], with `input` on stdin (`wg pubkey`).
pub fn pipe(cmd: &str, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut c = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = c.wait_with_output().expect("wait");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// What [`MeshLab::blackhole_drill`] measured.
#[derive(Debug, Clone)]
pub struct BlackholeDrill {
    /// Blackhole in → the first overlay ping answered again.
    pub recovered: Option<Duration>,
    /// Blackhole in → node a's status says `relay`.
    pub status_relay: Option<Duration>,
    /// Pings answered before the blackhole went in.
    pub answered_before: usize,
    /// Pings answered in all.
    pub answered: usize,
    /// Datagrams the blackhole dropped.
    pub drops: u64,
    /// a's status row for b at the end.
    pub row_a: Option<serde_json::Value>,
    /// b's status row for a at the end.
    pub row_b: Option<serde_json::Value>,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Timestamps (`ping -D`) of the answers in a ping log.
fn reply_times(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect()
}

fn fxhash(x: &str) -> u64 {
    x.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// The whole suite in one lab, as `netsim demo` shows it: alice and dave on
/// one home LAN (port-restricted NAT), bob behind a carrier-grade NAT, carol
/// behind a symmetric NAT; relay and signaling on the internet. Prints each
/// step and returns whether every check held.
pub fn demo(bins: &Bins) -> bool {
    let t0 = Instant::now();
    let mut m = MeshLab::new(bins);
    m.add_router("home", NatPreset::PortRestricted);
    m.add_router("carrier", NatPreset::Cgnat);
    m.add_router("mobile", NatPreset::Symmetric);
    let alice = m.add_embedded_node("alice", "home");
    let bob = m.add_embedded_node("bob", "carrier");
    let carol = m.add_embedded_node("carol", "mobile");
    let dave = m.add_node("dave", "home");
    println!(
        "lab ready in {:.1} s: relay + signaling on the internet; per device an ice-agent \
         (peers = \"auto\") running WireGuard itself, and dave's beside wireguard-go",
        t0.elapsed().as_secs_f64()
    );
    for (n, r) in [
        (alice, "home, port-restricted NAT"),
        (dave, "home, same LAN as alice"),
        (bob, "carrier-grade NAT (two layers)"),
        (carol, "symmetric NAT"),
    ] {
        let n = &m.nodes[n];
        let mode = if n.embedded {
            "embedded"
        } else {
            "external (wireguard-go)"
        };
        println!(
            "  {:<6} {:<32} overlay {:<10} {mode}",
            n.name,
            r,
            n.overlay.to_string()
        );
    }
    let started = Instant::now();
    for i in 0..m.nodes.len() {
        m.start_agent(i);
    }
    let mut ok = true;
    let mut check = |ok_now: bool, what: String| {
        println!("  {} {what}", if ok_now { "✓" } else { "✗" });
        ok &= ok_now;
    };
    println!("\nagents started; alice's peers:");
    // carol's symmetric NAT picks a random port per destination: relayed
    // first, then direct by birthday probing (alice's NAT keeps one mapping).
    for (peer, want) in [(dave, "lan"), (bob, "direct"), (carol, "direct")] {
        let name = m.nodes[peer].name.clone();
        match m.wait_path(alice, peer, want, Duration::from_secs(15)) {
            Ok((row, _)) => {
                let ping = m.ping(alice, peer, 3);
                check(
                    ping,
                    format!(
                        "alice ↔ {name}: {want} after {:.2} s, ping {} — {}",
                        started.elapsed().as_secs_f64(),
                        if ping { "ok" } else { "FAILED" },
                        row["reason"].as_str().unwrap_or_default()
                    ),
                );
            }
            Err(e) => check(false, format!("alice ↔ {name}: not {want}: {e}")),
        }
    }
    // Let the first direct windows (5 s) end, so every reason is final.
    std::thread::sleep(Duration::from_millis(6500).saturating_sub(started.elapsed()));
    println!(
        "\n$ ice-agent status   (on alice)\n{}",
        m.status_table(alice)
    );
    println!("drill: the path between home and the carrier dies (nftables drop at home)");
    let bob_seen_at = m
        .peer_status(alice, bob)
        .and_then(|r| {
            r["remote"]
                .as_str()
                .and_then(|a| a.parse::<SocketAddr>().ok())
        })
        .and_then(|a| match a.ip() {
            std::net::IpAddr::V4(v4) => Some(v4),
            std::net::IpAddr::V6(_) => None,
        });
    let Some(bob_seen_at) = bob_seen_at else {
        check(false, "alice has no direct address for bob to cut".into());
        return false;
    };
    m.cut_at("home", bob_seen_at);
    match m.wait_path(alice, bob, "relay", Duration::from_secs(10)) {
        Ok((_, took)) => {
            let ping = m.ping(alice, bob, 3);
            check(
                took <= Duration::from_secs(3) && ping,
                format!(
                    "alice ↔ bob fell back to the relay in {:.2} s (≤ 3 s), ping {}",
                    took.as_secs_f64(),
                    if ping { "ok" } else { "FAILED" }
                ),
            );
        }
        Err(e) => check(false, format!("no failover: {e}")),
    }
    m.restore_direct("home");
    match m.wait_path(alice, bob, "direct", Duration::from_secs(40)) {
        Ok((_, took)) => check(
            true,
            format!(
                "path restored: alice ↔ bob direct again {:.2} s later (retries back off 2 s → 60 s)",
                took.as_secs_f64()
            ),
        ),
        Err(e) => check(false, format!("not direct again: {e}")),
    }
    ok
}
