//! The lab: named network namespaces joined by veth links.
//!
//! Topology: one `inet` namespace routes between everything public. Each
//! router's `wan` and each public host's `eth0` is a point-to-point veth to
//! `inet` (no bridge on the public side, so every link has its own interface
//! in `inet` where impairment attaches). Behind a router, a `lan` bridge
//! joins its devices. A `cgnat` router is two namespaces: the home NAT and,
//! between it and `inet`, the carrier NAT (`<name>-cgn`).
//!
//! Addresses: the core answers at 203.0.113.1 on every link; router *i* has
//! WAN 203.0.113.(10+i) (11.0.0.(10+i) when it runs a UPnP gateway, which
//! refuses reserved addresses) and LAN 192.168.*i*.0/24 (198.18.*i*.0/24,
//! routed from `inet`, for `none`); a cgnat home NAT sits in
//! 100.64.*i*.0/24; public hosts take 198.51.100.0/24. IPv6 is opt-in per
//! router and public host (`lab/ipv6.rs`, [`Lab::enable_ipv6`]).
//!
//! Namespaces are named `wgns-<pid>-<rand>-<kind>-<name>`; [`sweep`] removes
//! those whose creating process is dead, and only those.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::impair::{DelayElement, Impairment};
use crate::nat::{self, NatBox, NatPreset, RouterConfig};
use crate::sys::{self, ip_batch};
use crate::Error;

mod ipv6;

/// Prefix shared by every namespace netsim creates.
pub const NS_PREFIX: &str = "wgns-";
/// Where `netsim run --keep` records kept labs for `netsim exec`.
pub const STATE_DIR: &str = "/run/wgice-netsim";
/// Address of the internet core on every public link.
pub const CORE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// Address of the internet core on every IPv6 link (see `lab/ipv6.rs`).
pub const CORE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// Prefixes of the labs alive in this process (for Ctrl-C cleanup).
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Prefixes of the labs this process has up right now.
pub fn live_prefixes() -> Vec<String> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A running process started in a lab node.
#[derive(Debug)]
struct Proc {
    node: String,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    out_dir: PathBuf,
    child: Option<Child>,
}

#[derive(Debug, Clone)]
struct Router {
    index: u8,
    cfg: RouterConfig,
    /// Home (device-facing) namespace.
    ns: String,
    /// Carrier NAT namespace for `cgnat`.
    cgn_ns: Option<String>,
    /// Address facing the internet (the carrier NAT's for `cgnat`).
    public_ip: Ipv4Addr,
    /// Address of the home namespace's `wan`.
    wan_ip: Ipv4Addr,
    next_host: u8,
    impairment: Impairment,
    /// IPv6 routed to its LAN ([`Lab::enable_ipv6`]).
    ipv6: bool,
}

impl Router {
    fn lan_net(&self) -> [u8; 3] {
        if self.cfg.nat == NatPreset::None {
            [198, 18, self.index]
        } else {
            [192, 168, self.index]
        }
    }
    fn lan_gw(&self) -> Ipv4Addr {
        let [a, b, c] = self.lan_net();
        Ipv4Addr::new(a, b, c, 1)
    }
    fn lan_cidr(&self) -> String {
        let [a, b, c] = self.lan_net();
        format!("{a}.{b}.{c}.0/24")
    }
}

#[derive(Debug, Clone)]
struct Device {
    ns: String,
    router: String,
    ip: Ipv4Addr,
    /// Its IPv6 address, when the router has IPv6.
    ip6: Option<Ipv6Addr>,
    /// Name of the device's port on the router's bridge.
    port: String,
}

#[derive(Debug, Clone)]
struct Host {
    ns: String,
    ips: Vec<Ipv4Addr>,
    ips6: Vec<Ipv6Addr>,
}

#[derive(Debug, Default)]
struct State {
    routers: BTreeMap<String, Router>,
    devices: BTreeMap<String, Device>,
    hosts: BTreeMap<String, Host>,
    procs: BTreeMap<String, Proc>,
    delays: BTreeMap<String, DelayElement>,
    namespaces: Vec<String>,
    next_router: u8,
    next_host_ip: u8,
    next_port: u32,
}

/// A network lab. Dropping it tears everything down: processes are killed,
/// namespaces (and with them every link and NAT) deleted.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    inet_ns: String,
    state: Mutex<State>,
    stop: Arc<AtomicBool>,
    torn_down: AtomicBool,
}

/// Kinds of node a name can refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// The internet core.
    Inet,
    /// A router (its home namespace).
    Router,
    /// A device behind a router.
    Device,
    /// A host on the public internet.
    Host,
}

impl Lab {
    /// Creates an empty lab: sweeps leftovers of dead runs, then creates the
    /// internet core namespace.
    pub fn new() -> Result<Lab, Error> {
        if !sys::is_root() {
            return Err(Error::NotRoot);
        }
        sweep();
        let rand: u32 = rand::random();
        let prefix = format!("{NS_PREFIX}{}-{:08x}-", std::process::id(), rand);
        let inet_ns = format!("{prefix}inet");
        LIVE.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(prefix.clone());
        let lab = Lab {
            prefix,
            inet_ns: inet_ns.clone(),
            state: Mutex::new(State {
                next_router: 1,
                next_host_ip: 2,
                ..State::default()
            }),
            stop: Arc::new(AtomicBool::new(false)),
            torn_down: AtomicBool::new(false),
        };
        lab.create_ns(&inet_ns)?;
        sys::sysctl(&inet_ns, "net/ipv4/conf/all/rp_filter", "0", false)?;
        sys::sysctl(&inet_ns, "net/ipv4/conf/default/rp_filter", "0", false)?;
        Ok(lab)
    }

    /// The unique namespace prefix of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn create_ns(&self, ns: &str) -> Result<(), Error> {
        sys::run("ip", &["netns", "add", ns])?;
        self.lock().namespaces.push(ns.to_string());
        ip_batch(Some(ns), &["link set lo up".into()])?;
        sys::sysctl(ns, "net/ipv4/ip_forward", "1", false)?;
        // Bridged LAN frames must not traverse the NAT rules.
        sys::sysctl(ns, "net/bridge/bridge-nf-call-iptables", "0", true)?;
        Ok(())
    }

    fn ns_name(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}-{name}", self.prefix)
    }

    fn next_port_name(&self) -> String {
        let mut st = self.lock();
        st.next_port += 1;
        format!("p{}", st.next_port)
    }

    fn check_new_name(&self, name: &str) -> Result<(), Error> {
        let st = self.lock();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::Config(format!(
                "node name {name:?} must be non-empty ASCII letters, digits, '-' or '_'"
            )));
        }
        if name == "inet"
            || st.routers.contains_key(name)
            || st.devices.contains_key(name)
            || st.hosts.contains_key(name)
        {
            return Err(Error::Config(format!(
                "node name {name:?} is already taken"
            )));
        }
        Ok(())
    }

    /// Adds a router with the given NAT behaviour, connected to the internet.
    pub fn add_router(&self, name: &str, cfg: RouterConfig) -> Result<(), Error> {
        self.check_new_name(name)?;
        let index = {
            let mut st = self.lock();
            let i = st.next_router;
            if i > 240 {
                return Err(Error::Config("at most 240 routers per lab".into()));
            }
            st.next_router += 1;
            i
        };
        let ns = self.ns_name("r", name);
        if cfg.upnp && matches!(cfg.nat, NatPreset::None | NatPreset::Cgnat) {
            return Err(Error::Config(format!(
                "router {name}: a UPnP/NAT-PMP/PCP gateway needs a NAT with a public WAN \
                 address; {} has none",
                cfg.nat
            )));
        }
        let public_ip = if cfg.upnp {
            Ipv4Addr::new(11, 0, 0, 10 + index)
        } else {
            Ipv4Addr::new(203, 0, 113, 10 + index)
        };
        let cgn_ns = (cfg.nat == NatPreset::Cgnat).then(|| self.ns_name("c", name));
        let wan_ip = if cgn_ns.is_some() {
            Ipv4Addr::new(100, 64, index, 2)
        } else {
            public_ip
        };
        let router = Router {
            index,
            cfg: cfg.clone(),
            ns: ns.clone(),
            cgn_ns: cgn_ns.clone(),
            public_ip,
            wan_ip,
            next_host: 10,
            impairment: Impairment::default(),
            ipv6: false,
        };
        self.create_ns(&ns)?;
        let inet_if = format!("r{index}");
        // The namespace directly on the internet: the carrier NAT for cgnat.
        let edge_ns = cgn_ns.clone().unwrap_or_else(|| ns.clone());
        if let Some(cgn) = &cgn_ns {
            self.create_ns(cgn)?;
        }
        sys::run(
            "ip",
            &[
                "link",
                "add",
                "wan",
                "netns",
                &edge_ns,
                "type",
                "veth",
                "peer",
                "name",
                &inet_if,
                "netns",
                &self.inet_ns,
            ],
        )?;
        let mut inet_cmds = vec![
            format!("link set {inet_if} up"),
            format!("addr add {CORE_IP}/32 dev {inet_if}"),
            format!("route add {public_ip}/32 dev {inet_if}"),
        ];
        if cfg.nat == NatPreset::None {
            inet_cmds.push(format!("route add {} via {public_ip}", router.lan_cidr()));
        }
        ip_batch(Some(&self.inet_ns), &inet_cmds)?;
        ip_batch(
            Some(&edge_ns),
            &[
                "link set wan up".into(),
                format!("addr add {public_ip}/32 dev wan"),
                format!("route add {CORE_IP}/32 dev wan"),
                format!("route add default via {CORE_IP} dev wan"),
            ],
        )?;
        if let Some(cgn) = &cgn_ns {
            // Home NAT's wan <-> carrier NAT's lan, in 100.64.i.0/24.
            sys::run(
                "ip",
                &[
                    "link", "add", "wan", "netns", &ns, "type", "veth", "peer", "name", "lan",
                    "netns", cgn,
                ],
            )?;
            ip_batch(
                Some(cgn),
                &[
                    "link set lan up".into(),
                    format!("addr add 100.64.{index}.1/24 dev lan"),
                ],
            )?;
            ip_batch(
                Some(&ns),
                &[
                    "link set wan up".into(),
                    format!("addr add {wan_ip}/24 dev wan"),
                    format!("route add default via 100.64.{index}.1 dev wan"),
                ],
            )?;
        }
        ip_batch(
            Some(&ns),
            &[
                "link add lan type bridge".into(),
                "link set lan up".into(),
                format!("addr add {}/24 dev lan", router.lan_gw()),
            ],
        )?;
        self.lock().routers.insert(name.to_string(), router.clone());
        self.apply_nat(&router)?;
        if cfg.upnp {
            self.start_gateway(name, &router)?;
        }
        Ok(())
    }

    /// Folder for this lab's own files (gateway configs and logs).
    pub fn work_dir(&self) -> PathBuf {
        std::env::temp_dir().join(self.prefix.trim_end_matches('-'))
    }

    /// Starts miniupnpd (UPnP-IGD, NAT-PMP, PCP) in a router, with the
    /// nftables skeleton its nftables backend expects, and waits until it
    /// listens on the NAT-PMP/PCP port.
    fn start_gateway(&self, name: &str, r: &Router) -> Result<(), Error> {
        let dir = self.work_dir();
        std::fs::create_dir_all(&dir)?;
        // miniupnpd's backend adds rules to these chains (see Debian's
        // /etc/miniupnpd/nft_init.sh); forward stays `accept` so our own
        // table keeps deciding what is dropped.
        sys::nft(
            &r.ns,
            "table inet filter {\n\
             \x20 chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }\n\
             \x20 chain miniupnpd { }\n\
             \x20 chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }\n\
             \x20 chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }\n\
             \x20 chain prerouting_miniupnpd { }\n\
             \x20 chain postrouting_miniupnpd { }\n\
             }\n",
        )?;
        let conf = dir.join(format!("miniupnpd-{name}.conf"));
        let [a, b, c] = r.lan_net();
        std::fs::write(
            &conf,
            format!(
                "ext_ifname=wan\nlistening_ip=lan\nhttp_port=0\nenable_natpmp={}\nenable_upnp=yes\n\
                 secure_mode=yes\nsystem_uptime=yes\nlease_file={}\n\
                 uuid=3ded2a8e-0a53-4c0a-8f1b-{:012x}\n\
                 allow 1024-65535 {a}.{b}.{c}.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n",
                if r.cfg.upnp_only { "no" } else { "yes" },
                dir.join(format!("miniupnpd-{name}.leases")).display(),
                r.index
            ),
        )?;
        let pid = dir.join(format!("miniupnpd-{name}.pid"));
        let argv: Vec<String> = vec![
            "miniupnpd".into(),
            "-d".into(),
            "-f".into(),
            conf.display().to_string(),
            "-P".into(),
            pid.display().to_string(),
        ];
        self.spawn(&format!("gateway-{name}"), name, &argv, &[], &dir)?;
        // Its UDP mappings also apply to outbound flows (see `NatBox::upnp`):
        // a watcher copies the lease file into the `upnp` map (within 20 ms
        // and an `nft` run, before the agent has its peers' candidates).
        let leases = dir.join(format!("miniupnpd-{name}.leases"));
        let watch = format!(
            "last=; while :; do cur=$(cat '{leases}' 2>/dev/null); \
             if [ \"$cur\" != \"$last\" ]; then \
             els=$(printf '%s\\n' \"$cur\" | awk -F: '$1==\"UDP\" {{ printf \"%s%s . %s : {wan} . %s\", sep, $3, $4, $2; sep=\", \" }}'); \
             {{ echo 'flush map ip wgnat upnp'; [ -n \"$els\" ] && echo \"add element ip wgnat upnp {{ $els }}\"; }} | nft -f - && last=$cur; \
             fi; sleep 0.02; done",
            leases = leases.display(),
            wan = r.wan_ip,
        );
        self.spawn(
            &format!("gateway-map-{name}"),
            name,
            &["sh".into(), "-c".into(), watch],
            &[],
            &dir,
        )?;
        // Ready when UDP 5351 (NAT-PMP/PCP), or for a UPnP-only gateway
        // UDP 1900 (SSDP), is bound in the router's namespace.
        let (port, what) = if r.cfg.upnp_only {
            (":076C ", "UDP 1900 (SSDP)")
        } else {
            (":14E7 ", "UDP 5351")
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let bound = sys::in_netns(&r.ns, move || {
                std::fs::read_to_string("/proc/thread-self/net/udp")
                    .map(|t| t.contains(port))
                    .unwrap_or(false)
            })?;
            if bound {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join(format!("gateway-{name}.stderr")))
                    .unwrap_or_default();
                return Err(Error::Config(format!(
                    "router {name}: miniupnpd did not start listening on {what}: {}",
                    log.trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn apply_nat(&self, r: &Router) -> Result<(), Error> {
        let layer = |nat: NatPreset, wan_ip, lan_cidr: String| NatBox {
            nat,
            hairpin: r.cfg.hairpin,
            timeout_s: r.cfg.mapping_timeout_s,
            wan_ip,
            lan_cidr,
            upnp: false,
        };
        let home_nat = if r.cfg.nat == NatPreset::Cgnat {
            NatPreset::PortRestricted
        } else {
            r.cfg.nat
        };
        let mut home = layer(home_nat, r.wan_ip, r.lan_cidr());
        home.upnp = r.cfg.upnp;
        let mut layers = vec![(r.ns.clone(), home)];
        if let Some(cgn) = &r.cgn_ns {
            let outer = layer(
                NatPreset::PortRestricted,
                r.public_ip,
                format!("100.64.{}.0/24", r.index),
            );
            layers.push((cgn.clone(), outer));
        }
        for (ns, b) in layers {
            sys::nft(&ns, &nat::ruleset(&b))?;
            let t = r.cfg.mapping_timeout_s.max(1).to_string();
            sys::sysctl(&ns, "net/netfilter/nf_conntrack_udp_timeout", &t, true)?;
            sys::sysctl(
                &ns,
                "net/netfilter/nf_conntrack_udp_timeout_stream",
                &t,
                true,
            )?;
        }
        Ok(())
    }

    /// Adds a device behind `router`; returns its address.
    pub fn add_device(&self, name: &str, router: &str) -> Result<Ipv4Addr, Error> {
        self.check_new_name(name)?;
        let ns = self.ns_name("d", name);
        self.create_ns(&ns)?;
        let dev = self.attach(name, &ns, router)?;
        let ip = dev.ip;
        self.lock().devices.insert(name.to_string(), dev);
        if self.router(router)?.ipv6 {
            self.device_ipv6(name)?;
        }
        Ok(ip)
    }

    /// Connects device namespace `ns` to `router`'s LAN bridge.
    fn attach(&self, name: &str, ns: &str, router: &str) -> Result<Device, Error> {
        let port = self.next_port_name();
        let (rns, ip, gw) = {
            let mut st = self.lock();
            let r = st
                .routers
                .get_mut(router)
                .ok_or_else(|| Error::Config(format!("device {name}: no router {router:?}")))?;
            if r.next_host == 250 {
                return Err(Error::Config(format!("router {router}: LAN is full")));
            }
            let [a, b, c] = r.lan_net();
            let ip = Ipv4Addr::new(a, b, c, r.next_host);
            r.next_host += 1;
            (r.ns.clone(), ip, r.lan_gw())
        };
        sys::run(
            "ip",
            &[
                "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port, "netns",
                &rns,
            ],
        )?;
        ip_batch(
            Some(&rns),
            &[
                format!("link set {port} master lan"),
                format!("link set {port} up"),
            ],
        )?;
        ip_batch(
            Some(ns),
            &[
                "link set eth0 up".into(),
                format!("addr add {ip}/24 dev eth0"),
                format!("route add default via {gw} dev eth0"),
            ],
        )?;
        Ok(Device {
            ns: ns.to_string(),
            router: router.to_string(),
            ip,
            ip6: None,
            port,
        })
    }

    /// Adds a host on the public internet with `n_ips` addresses (at least
    /// one); returns them.
    pub fn add_public_host(&self, name: &str, n_ips: usize) -> Result<Vec<Ipv4Addr>, Error> {
        self.check_new_name(name)?;
        let ns = self.ns_name("h", name);
        let (ips, inet_if) = {
            let mut st = self.lock();
            let mut ips = Vec::new();
            for _ in 0..n_ips.max(1) {
                if st.next_host_ip >= 250 {
                    return Err(Error::Config("public address space is full".into()));
                }
                ips.push(Ipv4Addr::new(198, 51, 100, st.next_host_ip));
                st.next_host_ip += 1;
            }
            st.next_port += 1;
            (ips, format!("h{}", st.next_port))
        };
        self.create_ns(&ns)?;
        sys::run(
            "ip",
            &[
                "link",
                "add",
                "eth0",
                "netns",
                &ns,
                "type",
                "veth",
                "peer",
                "name",
                &inet_if,
                "netns",
                &self.inet_ns,
            ],
        )?;
        let mut inet_cmds = vec![
            format!("link set {inet_if} up"),
            format!("addr add {CORE_IP}/32 dev {inet_if}"),
        ];
        let mut host_cmds = vec!["link set eth0 up".to_string()];
        for ip in &ips {
            inet_cmds.push(format!("route add {ip}/32 dev {inet_if}"));
            host_cmds.push(format!("addr add {ip}/32 dev eth0"));
        }
        host_cmds.push(format!("route add {CORE_IP}/32 dev eth0"));
        host_cmds.push(format!(
            "route add default via {CORE_IP} dev eth0 src {}",
            ips[0]
        ));
        ip_batch(Some(&self.inet_ns), &inet_cmds)?;
        ip_batch(Some(&ns), &host_cmds)?;
        self.lock().hosts.insert(
            name.to_string(),
            Host {
                ns,
                ips: ips.clone(),
                ips6: Vec::new(),
            },
        );
        Ok(ips)
    }

    /// Namespace of a node (`inet`, a router, a device or a host).
    pub fn ns(&self, node: &str) -> Result<String, Error> {
        if node == "inet" {
            return Ok(self.inet_ns.clone());
        }
        let st = self.lock();
        if let Some(r) = st.routers.get(node) {
            return Ok(r.ns.clone());
        }
        if let Some(d) = st.devices.get(node) {
            return Ok(d.ns.clone());
        }
        if let Some(h) = st.hosts.get(node) {
            return Ok(h.ns.clone());
        }
        Err(Error::Config(format!("no node named {node:?}")))
    }

    /// Kind of a node, if it exists.
    pub fn node_kind(&self, node: &str) -> Option<NodeKind> {
        let st = self.lock();
        if node == "inet" {
            Some(NodeKind::Inet)
        } else if st.routers.contains_key(node) {
            Some(NodeKind::Router)
        } else if st.devices.contains_key(node) {
            Some(NodeKind::Device)
        } else if st.hosts.contains_key(node) {
            Some(NodeKind::Host)
        } else {
            None
        }
    }

    /// Every node name with its namespace.
    pub fn nodes(&self) -> Vec<(String, String)> {
        let st = self.lock();
        let mut v = vec![("inet".to_string(), self.inet_ns.clone())];
        v.extend(st.routers.iter().map(|(n, r)| (n.clone(), r.ns.clone())));
        v.extend(st.devices.iter().map(|(n, d)| (n.clone(), d.ns.clone())));
        v.extend(st.hosts.iter().map(|(n, h)| (n.clone(), h.ns.clone())));
        v
    }

    /// Main address of a node: a device's LAN address, a host's first
    /// address, a router's public address.
    pub fn ip(&self, node: &str) -> Result<Ipv4Addr, Error> {
        let st = self.lock();
        if let Some(d) = st.devices.get(node) {
            return Ok(d.ip);
        }
        if let Some(h) = st.hosts.get(node) {
            return Ok(h.ips[0]);
        }
        if let Some(r) = st.routers.get(node) {
            return Ok(r.public_ip);
        }
        if node == "inet" {
            return Ok(CORE_IP);
        }
        Err(Error::Config(format!("no node named {node:?}")))
    }

    /// Every address of a public host.
    pub fn host_ips(&self, host: &str) -> Result<Vec<Ipv4Addr>, Error> {
        self.lock()
            .hosts
            .get(host)
            .map(|h| h.ips.clone())
            .ok_or_else(|| Error::Config(format!("no public host {host:?}")))
    }

    /// The router a device sits behind.
    pub fn router_of(&self, device: &str) -> Result<String, Error> {
        self.lock()
            .devices
            .get(device)
            .map(|d| d.router.clone())
            .ok_or_else(|| Error::Config(format!("no device {device:?}")))
    }

    /// The NAT configuration of a router.
    pub fn router_config(&self, router: &str) -> Result<RouterConfig, Error> {
        self.lock()
            .routers
            .get(router)
            .map(|r| r.cfg.clone())
            .ok_or_else(|| Error::Config(format!("no router {router:?}")))
    }

    /// Address of the home NAT's `wan` (differs from the public address only
    /// for `cgnat`).
    pub fn router_wan_ip(&self, router: &str) -> Result<Ipv4Addr, Error> {
        self.lock()
            .routers
            .get(router)
            .map(|r| r.wan_ip)
            .ok_or_else(|| Error::Config(format!("no router {router:?}")))
    }

    /// Opens a UDP socket inside a node, bound to `0.0.0.0:port` (0: any).
    pub fn udp_socket(&self, node: &str, port: u16) -> Result<UdpSocket, Error> {
        self.udp_socket_on(node, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
    }

    /// Opens a UDP socket inside a node, bound to `addr`.
    pub fn udp_socket_on(&self, node: &str, addr: SocketAddrV4) -> Result<UdpSocket, Error> {
        let ns = self.ns(node)?;
        Ok(sys::in_netns(&ns, move || UdpSocket::bind(addr))??)
    }

    /// Runs `f` on a thread inside a node's namespace (to open sockets of
    /// other kinds).
    pub fn in_node<T, F>(&self, node: &str, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        sys::in_netns(&self.ns(node)?, f)
    }

    /// Runs a command to completion inside a node; returns whether it
    /// succeeded, with its combined output.
    pub fn exec(&self, node: &str, argv: &[String]) -> Result<(bool, String), Error> {
        let ns = self.ns(node)?;
        if argv.is_empty() {
            return Err(Error::Config("empty command".into()));
        }
        let out = Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(argv)
            .stdin(Stdio::null())
            .output()?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status.success(), text))
    }

    /// Starts a long-running process `name` inside `node`; its stdout and
    /// stderr go to `out_dir/<name>.stdout` / `.stderr`.
    pub fn spawn(
        &self,
        name: &str,
        node: &str,
        argv: &[String],
        env: &[(String, String)],
        out_dir: &Path,
    ) -> Result<(), Error> {
        if self.lock().procs.contains_key(name) {
            return Err(Error::Config(format!("process {name:?} already exists")));
        }
        let mut p = Proc {
            node: node.to_string(),
            argv: argv.to_vec(),
            env: env.to_vec(),
            out_dir: out_dir.to_path_buf(),
            child: None,
        };
        self.start_proc(name, &mut p)?;
        self.lock().procs.insert(name.to_string(), p);
        Ok(())
    }

    fn start_proc(&self, name: &str, p: &mut Proc) -> Result<(), Error> {
        use std::os::unix::process::CommandExt;
        let ns = self.ns(&p.node)?;
        if p.argv.is_empty() {
            return Err(Error::Config(format!("process {name}: empty command")));
        }
        std::fs::create_dir_all(&p.out_dir)?;
        let open = |ext: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p.out_dir.join(format!("{name}.{ext}")))
        };
        let child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(&p.argv)
            .envs(p.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(open("stdout")?)
            .stderr(open("stderr")?)
            .process_group(0)
            .spawn()?;
        p.child = Some(child);
        Ok(())
    }

    /// Kills process `name` (its whole process group).
    pub fn kill_process(&self, name: &str) -> Result<(), Error> {
        if let Some(mut c) = self.take_child(name)? {
            stop_child(&mut c);
        }
        Ok(())
    }

    /// Takes process `name`'s running child out of the lab's table (it is
    /// then the caller's to stop); `None` if it is not running.
    fn take_child(&self, name: &str) -> Result<Option<std::process::Child>, Error> {
        let mut st = self.lock();
        let p = st
            .procs
            .get_mut(name)
            .ok_or_else(|| Error::Config(format!("no process {name:?}")))?;
        Ok(p.child.take())
    }

    /// Kills process `name` (its whole group) with SIGKILL at once: no
    /// SIGTERM first, so it cannot say goodbye to anyone (a crashed relay,
    /// a power cut). [`Lab::restart_process`] starts it again.
    pub fn kill_process_hard(&self, name: &str) -> Result<(), Error> {
        if let Some(mut c) = self.take_child(name)? {
            sys::kill_group(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
        Ok(())
    }

    /// Sends SIGTERM to process `name` (its group) and waits up to
    /// `timeout` for it to exit by itself. Returns its exit code, or `None`
    /// if it had to be killed (SIGKILL) after the timeout.
    pub fn terminate_process(&self, name: &str, timeout: Duration) -> Result<Option<i32>, Error> {
        let mut st = self.lock();
        let p = st
            .procs
            .get_mut(name)
            .ok_or_else(|| Error::Config(format!("no process {name:?}")))?;
        let Some(mut c) = p.child.take() else {
            return Ok(None);
        };
        sys::kill_group(c.id(), libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                sys::kill_group(c.id(), libc::SIGKILL);
                return Ok(status.code());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        sys::kill_group(c.id(), libc::SIGKILL);
        let _ = c.wait();
        Ok(None)
    }

    /// Kills (if running) and starts process `name` again with the same
    /// command.
    pub fn restart_process(&self, name: &str) -> Result<(), Error> {
        self.restart_process_env(name, None)
    }

    /// Like [`Lab::restart_process`], with its environment replaced by
    /// `env` when given.
    pub fn restart_process_env(
        &self,
        name: &str,
        env: Option<&[(String, String)]>,
    ) -> Result<(), Error> {
        self.kill_process(name)?;
        let mut p = self
            .lock()
            .procs
            .remove(name)
            .ok_or_else(|| Error::Config(format!("no process {name:?}")))?;
        if let Some(env) = env {
            p.env = env.to_vec();
        }
        let res = self.start_proc(name, &mut p);
        self.lock().procs.insert(name.to_string(), p);
        res
    }

    /// Exit status of a process: `None` while it runs (or was killed by us).
    pub fn process_exited(&self, name: &str) -> Result<Option<i32>, Error> {
        let mut st = self.lock();
        let p = st
            .procs
            .get_mut(name)
            .ok_or_else(|| Error::Config(format!("no process {name:?}")))?;
        Ok(match p.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => Some(status.code().unwrap_or(-1)),
            _ => None,
        })
    }

    /// Takes a device's link down (the router-side port; the device keeps its
    /// address and routes but sees no carrier).
    pub fn link_down(&self, device: &str) -> Result<(), Error> {
        self.set_link(device, "down")
    }

    /// Brings a device's link back up.
    pub fn link_up(&self, device: &str) -> Result<(), Error> {
        self.set_link(device, "up")
    }

    fn set_link(&self, device: &str, state: &str) -> Result<(), Error> {
        let (rns, port) = {
            let st = self.lock();
            let d = st
                .devices
                .get(device)
                .ok_or_else(|| Error::Config(format!("no device {device:?}")))?;
            (st.routers[&d.router].ns.clone(), d.port.clone())
        };
        ip_batch(Some(&rns), &[format!("link set {port} {state}")])
    }

    /// Moves a device to another router (roaming): its old link is deleted,
    /// it gets an address on the new LAN. Sockets bound to 0.0.0.0 survive.
    pub fn move_device(&self, device: &str, new_router: &str) -> Result<Ipv4Addr, Error> {
        let old = self
            .lock()
            .devices
            .get(device)
            .cloned()
            .ok_or_else(|| Error::Config(format!("no device {device:?}")))?;
        if !self.lock().routers.contains_key(new_router) {
            return Err(Error::Config(format!("no router {new_router:?}")));
        }
        ip_batch(Some(&old.ns), &["link del eth0".into()])?;
        let dev = self.attach(device, &old.ns, new_router)?;
        let ip = dev.ip;
        self.lock().devices.insert(device.to_string(), dev);
        if self.router(new_router)?.ipv6 {
            self.device_ipv6(device)?;
        }
        Ok(ip)
    }

    /// Forgets every NAT mapping of a router (conntrack and learned maps):
    /// what a NAT reboot or rebinding looks like to the devices.
    pub fn flush_nat(&self, router: &str) -> Result<(), Error> {
        let r = self.router(router)?;
        for ns in std::iter::once(&r.ns).chain(r.cgn_ns.iter()) {
            sys::run_stdin(
                "ip",
                &["netns", "exec", ns, "nft", "-f", "-"],
                Some("flush map ip wgnat mapping\nflush set ip wgnat contacted\n"),
            )
            .ok();
            // conntrack exits 1 when there was nothing to delete.
            let _ = sys::run("ip", &["netns", "exec", ns, "conntrack", "-F"]);
        }
        Ok(())
    }

    fn router(&self, router: &str) -> Result<Router, Error> {
        self.lock()
            .routers
            .get(router)
            .cloned()
            .ok_or_else(|| Error::Config(format!("no router {router:?}")))
    }

    /// Changes a router's NAT behaviour, hairpin and timeout in place
    /// (existing conntrack entries are flushed). Changing to or from `none`
    /// or `cgnat` changes the topology and is refused.
    pub fn set_router_config(&self, router: &str, cfg: RouterConfig) -> Result<(), Error> {
        let mut r = self.router(router)?;
        let topo = |p: NatPreset| matches!(p, NatPreset::None | NatPreset::Cgnat);
        if (topo(r.cfg.nat) || topo(cfg.nat)) && r.cfg.nat != cfg.nat {
            return Err(Error::Config(format!(
                "router {router}: cannot change NAT from {} to {} at run time (topology differs); \
                 declare the router with the final preset",
                r.cfg.nat, cfg.nat
            )));
        }
        if cfg.upnp != r.cfg.upnp || cfg.upnp_only != r.cfg.upnp_only {
            return Err(Error::Config(format!(
                "router {router}: the UPnP gateway cannot be switched at run time"
            )));
        }
        r.cfg = cfg;
        self.apply_nat(&r)?;
        self.lock().routers.insert(router.to_string(), r);
        self.flush_nat(router)
    }

    /// Sets loss and one-way delay on the link between a router (or public
    /// host) and the internet core, in both directions.
    pub fn set_impairment(&self, node: &str, imp: Impairment) -> Result<(), Error> {
        let (link_if, prefixes) = self.inet_link(node)?;
        crate::impair::apply_loss(&self.inet_ns, &link_if, imp.loss)?;
        let old = self.lock().delays.remove(node);
        drop(old);
        if imp.delay_ms > 0 {
            let tun = format!("dl{}", link_if);
            let el = DelayElement::start(
                &self.inet_ns,
                &tun,
                &link_if,
                &prefixes,
                Duration::from_millis(imp.delay_ms),
                self.stop.clone(),
            )?;
            self.lock().delays.insert(node.to_string(), el);
        }
        if let Some(r) = self.lock().routers.get_mut(node) {
            r.impairment = imp;
        }
        Ok(())
    }

    /// Makes router `router` drop what `bh` names on UDP to and from
    /// `peer` (say, the other router's WAN address: the direct path only,
    /// not the relay); `None` removes it. Replaces any earlier one.
    pub fn set_blackhole(
        &self,
        router: &str,
        peer: Ipv4Addr,
        bh: Option<crate::impair::Blackhole>,
    ) -> Result<(), Error> {
        let ns = self.ns(router)?;
        sys::nft(&ns, &crate::impair::blackhole_ruleset(peer, bh))
    }

    /// Datagrams router `router`'s blackhole dropped so far (0 without one).
    pub fn blackhole_drops(&self, router: &str) -> Result<u64, Error> {
        let ns = self.ns(router)?;
        let out = sys::run(
            "ip",
            &[
                "netns", "exec", &ns, "nft", "list", "table", "inet", "wgicebh",
            ],
        )
        .unwrap_or_default();
        // `counter packets N bytes M` once per rule.
        let mut total = 0u64;
        let words: Vec<&str> = out.split_whitespace().collect();
        for w in words.windows(2) {
            if w[0] == "packets" {
                total += w[1].parse::<u64>().unwrap_or(0);
            }
        }
        Ok(total)
    }

    /// The core-side interface and routed prefixes of a node's uplink.
    fn inet_link(&self, node: &str) -> Result<(String, Vec<String>), Error> {
        let st = self.lock();
        if let Some(r) = st.routers.get(node) {
            let mut p = vec![format!("{}/32", r.public_ip)];
            if r.cfg.nat == NatPreset::None {
                p.push(r.lan_cidr());
            }
            return Ok((format!("r{}", r.index), p));
        }
        if st.hosts.contains_key(node) {
            drop(st);
            let out = sys::run("ip", &["-n", &self.inet_ns, "-o", "route", "show"])?;
            let ips = self.host_ips(node)?;
            for line in out.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() >= 3 && f[1] == "dev" && ips.iter().any(|ip| f[0] == format!("{ip}")) {
                    return Ok((
                        f[2].to_string(),
                        ips.iter().map(|ip| format!("{ip}/32")).collect(),
                    ));
                }
            }
            return Err(Error::Config(format!("host {node}: uplink not found")));
        }
        Err(Error::Config(format!(
            "impairment applies to routers and public hosts; {node:?} is neither"
        )))
    }

    /// Tears the lab down now (also done on drop).
    pub fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        self.stop.store(true, Ordering::SeqCst);
        let (procs, delays, namespaces) = {
            let mut st = self.lock();
            (
                std::mem::take(&mut st.procs),
                std::mem::take(&mut st.delays),
                std::mem::take(&mut st.namespaces),
            )
        };
        for (_, mut p) in procs {
            if let Some(mut c) = p.child.take() {
                stop_child(&mut c);
            }
        }
        drop(delays);
        remove_namespaces(&namespaces);
        let _ = std::fs::remove_dir_all(self.work_dir());
        LIVE.lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p| *p != self.prefix);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn stop_child(c: &mut Child) {
    sys::kill_group(c.id(), libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            sys::kill_group(c.id(), libc::SIGKILL);
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    sys::kill_group(c.id(), libc::SIGKILL);
    let _ = c.wait();
}

/// Kills every process inside the namespaces, then deletes them.
fn remove_namespaces(namespaces: &[String]) {
    for ns in namespaces {
        if let Ok(pids) = sys::run("ip", &["netns", "pids", ns]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                sys::kill_pid(pid, libc::SIGKILL);
            }
        }
    }
    let lines: Vec<String> = namespaces
        .iter()
        .map(|ns| format!("netns del {ns}"))
        .collect();
    if !lines.is_empty() {
        let script = lines.join("\n") + "\n";
        let _ = sys::run_stdin("ip", &["-force", "-batch", "-"], Some(&script));
    }
}

/// Names of the namespaces netsim created that still exist, with the PID of
/// the process that created them.
pub fn list_namespaces() -> Vec<(String, Option<u32>)> {
    let Ok(dir) = std::fs::read_dir(sys::NETNS_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(NS_PREFIX))
        .map(|n| {
            let pid = n[NS_PREFIX.len()..]
                .split('-')
                .next()
                .and_then(|p| p.parse().ok());
            (n, pid)
        })
        .collect()
}

/// Removes namespaces left by netsim runs whose process is gone (killed
/// runs). Never touches a namespace without netsim's prefix or one whose
/// creator still runs. Returns how many were removed.
pub fn sweep() -> usize {
    let dead: Vec<String> = list_namespaces()
        .into_iter()
        .filter(|(_, pid)| pid.is_some_and(|p| !sys::pid_alive(p)))
        .map(|(n, _)| n)
        .collect();
    remove_namespaces(&dead);
    // State files of kept labs whose process is gone.
    if let Ok(dir) = std::fs::read_dir(STATE_DIR) {
        for e in dir.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix(NS_PREFIX)
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !sys::pid_alive(p)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    // Work folders (gateway configs) of dead runs.
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for e in dir.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix(NS_PREFIX)
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !sys::pid_alive(p)) && e.path().is_dir() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    dead.len()
}

/// Removes every namespace of one lab prefix (used on Ctrl-C).
pub fn remove_prefix(prefix: &str) {
    if !prefix.starts_with(NS_PREFIX) {
        return;
    }
    let mine: Vec<String> = list_namespaces()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with(prefix))
        .collect();
    remove_namespaces(&mine);
}

/// Sends one UDP datagram and waits for any answer: a quick reachability
/// helper for tests and checks.
pub fn udp_roundtrip(sock: &UdpSocket, to: SocketAddr, timeout: Duration) -> bool {
    let _ = sock.set_read_timeout(Some(timeout));
    let mut buf = [0u8; 1500];
    sock.send_to(b"ping", to).is_ok() && sock.recv_from(&mut buf).is_ok()
}
