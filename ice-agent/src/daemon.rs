//! The daemon: a thin tokio driver around the sans-IO [`Agent`].
//!
//! It owns the agent's one UDP socket (ICE checks, TURN, and WireGuard
//! packets on direct or relayed paths all share it), the signaling client,
//! the data plane ([`crate::dataplane`]: loopback proxies beside an external
//! WireGuard interface, or the embedded WireGuard device), a thread that
//! talks to the WireGuard interface, the control socket and the metrics
//! listener.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use signaling::client::{
    Client as SigClient, ClientConfig as SigConfig, Event as SigEvent, TransportMode,
};
use signaling::keys::PrivateKey;
use signaling::tls::Trust;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::{TcpListener, UdpSocket, UnixListener};
use tokio::sync::{mpsc, oneshot};

use crate::agent::{Agent, AgentOptions, DropCounters, Output, PeerKey, RelaySpec};
use crate::config::{AgentConfig, Mode, RelayAuth, RelayTransport};
use crate::dataplane::external::Proxies;
use crate::dataplane::DataPlane;
use crate::gather::{self, HostFilter};
use crate::status::{render_table, PeerStatus};
use crate::wg::{Original, PeerUpdate, WgControl, WgError};

/// Why the daemon could not start; each message says what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// WireGuard interface problem.
    #[error(transparent)]
    Wg(#[from] WgError),
    /// The embedded mode's TUN interface.
    #[error(transparent)]
    Tun(#[from] crate::dataplane::tun::TunError),
    /// The embedded interface's UAPI socket.
    #[error(
        "cannot serve the WireGuard UAPI socket in /var/run/wireguard: {0} (is another \
         wireguard-go or agent running with this interface name?)"
    )]
    Uapi(std::io::Error),
    /// Neither the config nor the interface has a private key.
    #[error(
        "interface {0:?} has no private key and the config names none: set \
         wireguard.private_key_file, or `wg set {0} private-key FILE`"
    )]
    NoPrivateKey(String),
    /// The agent's UDP socket.
    #[error("cannot bind the agent socket on port {port}: {source} (wireguard.port: pick a free port, or 0)")]
    AgentSocket {
        /// The configured port.
        port: u16,
        /// Why.
        source: std::io::Error,
    },
    /// `signaling.ca_file` cannot be used.
    #[error("signaling.ca_file: {0}")]
    SignalingCa(signaling::tls::TlsError),
    /// The signaling client cannot start.
    #[error("signaling: {0} (check signaling.url and the TLS settings)")]
    Signaling(#[from] signaling::client::ClientError),
    /// The control socket.
    #[error("control socket {path}: {what}: {source} (agent.control)")]
    Control {
        /// Its path.
        path: std::path::PathBuf,
        /// What failed.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Another agent answers on the control socket.
    #[error("another agent is running on control socket {0} (stop it, or set agent.control)")]
    ControlInUse(std::path::PathBuf),
    /// The metrics listener.
    #[error("cannot listen for metrics on {addr}: {source} (agent.metrics)")]
    Metrics {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The process could not start a thread or runtime part.
    #[error(
        "{what}: {source} (is the process out of threads or file descriptors? see LimitNOFILE)"
    )]
    Resources {
        /// What failed.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// The status the control socket serves.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// WireGuard interface.
    pub interface: String,
    /// `external` or `embedded`.
    #[serde(default)]
    pub mode: String,
    /// Our public key.
    pub public_key: String,
    /// The agent socket's port.
    pub port: u16,
    /// Whether signaling is connected.
    pub signaling: bool,
    /// Relays: server, relayed addresses, mapped address, problem.
    pub relays: Vec<RelayStatus>,
    /// Peers.
    pub peers: Vec<PeerStatus>,
    /// Dropped input, by reason.
    pub dropped: DropCounters,
    /// Most peers the agent manages (`agent.max_peers`).
    #[serde(default)]
    pub max_peers: usize,
    /// Whether membership certificates are required (a CA is pinned).
    #[serde(default)]
    pub certificates: bool,
}

/// One relay in [`Status`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RelayStatus {
    /// Server address.
    pub server: SocketAddr,
    /// Our relayed addresses there.
    pub relayed: Vec<SocketAddr>,
    /// Our address as the relay sees it.
    pub mapped: Option<SocketAddr>,
    /// Why it is not usable, if it is not.
    pub problem: Option<String>,
}

struct Snapshot {
    status: Status,
    failovers: HashMap<String, u64>,
    direct_retries: u64,
}

enum WgCmd {
    Add {
        peer: PeerKey,
        allowed_ips: Vec<IpNet>,
        endpoint: Option<SocketAddr>,
    },
    Endpoint {
        peer: PeerKey,
        endpoint: SocketAddr,
    },
    AllowedIps {
        peer: PeerKey,
        allowed_ips: Vec<IpNet>,
    },
    Restore {
        peer: PeerKey,
    },
    /// Restore every managed peer, then call the closure (the
    /// acknowledgement) and change nothing any more.
    RestoreAll(Box<dyn FnOnce() + Send>),
    Counters(oneshot::Sender<HashMap<PeerKey, (u64, u64, u64)>>),
}

/// Runs the agent until `shutdown` resolves; restores the WireGuard peers it
/// changed before returning.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    let socket_err = |source| DaemonError::AgentSocket {
        port: cfg.port,
        source,
    };
    let bound = crate::udp::bind(cfg.port).map_err(socket_err)?;
    let dual = bound.dual;
    let std_sock = bound.socket;
    let gro =
        crate::dataplane::Offloads::from_env().gro && crate::udp::enable_gro(std_sock.as_raw_fd());
    let port = std_sock.local_addr().map_err(socket_err)?.port();
    // Embedded mode: the interface is ours, created before anything reads it.
    let embedded = match cfg.mode {
        Mode::External => None,
        Mode::Embedded => Some(start_embedded(&cfg, &std_sock, dual, port)?),
    };
    let wg = WgControl::open(&cfg.interface)?;
    let dev = wg.device()?;
    let private = match (cfg.private_key.clone(), dev.private_key) {
        (Some(k), _) => k,
        (None, Some(k)) => PrivateKey::from_bytes(k),
        (None, None) => return Err(DaemonError::NoPrivateKey(cfg.interface.clone())),
    };
    if let (Some(k), Some(d)) = (cfg.private_key.as_ref(), dev.private_key) {
        if k.public_key() != PrivateKey::from_bytes(d).public_key() {
            tracing::warn!(
                "the configured private key differs from {:?}'s: peers will reach the \
                 interface's key, not the one the agent signals",
                cfg.interface
            );
        }
    }
    let public = private.public_key();
    let wg_port = (dev.listen_port != 0).then_some(dev.listen_port);
    let wg_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), dev.listen_port);
    if wg_port.is_none() {
        tracing::warn!(
            "{:?} has no listen port: packets to it cannot be delivered",
            cfg.interface
        );
    }
    let sock = Arc::new(UdpSocket::from_std(std_sock).map_err(socket_err)?);
    let mut plane = match embedded {
        Some(e) => DataPlane::Embedded(e),
        None => DataPlane::External(Proxies::new(sock.clone(), dual, wg_addr)),
    };

    let overlay_nets: Vec<IpNet> = cfg
        .address
        .iter()
        .filter_map(|a| {
            a.parse::<IpNet>()
                .ok()
                .or_else(|| a.parse::<IpAddr>().ok().map(IpNet::from))
        })
        .collect();
    let mut filter = HostFilter {
        exclude: vec![cfg.interface.clone()],
        exclude_nets: overlay_nets,
    };
    filter
        .exclude
        .extend(cfg.exclude_interfaces.iter().cloned());
    let host = host_nets(&filter, dual);
    tracing::info!(interface = %cfg.interface, mode = ?cfg.mode, backend = wg.backend_name(), port, gro, ?host, "starting");

    let mut relays = Vec::new();
    let mut rest_relays: Vec<(SocketAddr, String, String)> = Vec::new();
    // Relays whose name does not resolve yet (booted before DNS): a task
    // keeps trying and hands them to the main loop when they do.
    let (late_tx, mut late_rx) = mpsc::channel::<(RelaySpec, Option<(String, String)>)>(16);
    let mut unresolved = Vec::new();
    for r in &cfg.relays {
        if matches!(r.transport, RelayTransport::Tcp | RelayTransport::Tls) {
            tracing::warn!(relay = %r.host, "TURN over TCP/TLS is not used by the agent yet; skipping");
            continue;
        }
        match resolve(&r.host, r.port).await {
            Some(server) => {
                let (spec, rest) = relay_spec(server, &r.auth);
                if let Some((user, secret)) = rest {
                    rest_relays.push((server, user, secret));
                }
                relays.push(spec);
            }
            None => {
                tracing::warn!(relay = %r.host, "cannot resolve an IPv4 address for the relay yet; retrying every 30 s");
                unresolved.push(r.clone());
            }
        }
    }
    let resolver_task = (!unresolved.is_empty()).then(|| {
        tokio::spawn(async move {
            while !unresolved.is_empty() {
                tokio::time::sleep(Duration::from_secs(30)).await;
                let mut left = Vec::new();
                for r in unresolved {
                    match resolve(&r.host, r.port).await {
                        Some(server) => {
                            tracing::info!(relay = %r.host, %server, "relay resolved");
                            if late_tx.send(relay_spec(server, &r.auth)).await.is_err() {
                                return;
                            }
                        }
                        None => left.push(r),
                    }
                }
                unresolved = left;
            }
        })
    });
    let (auto_peers, peers) = match &cfg.peers {
        crate::config::Peers::Auto => (true, Vec::new()),
        crate::config::Peers::List(l) => (
            false,
            l.iter()
                .map(|p| (p.public_key, p.allowed_ips.clone()))
                .collect(),
        ),
    };
    let opts = AgentOptions {
        public_key: public,
        wg_port,
        port,
        host,
        relays,
        auto_peers,
        peers,
        vanish_after: Duration::from_secs(60),
        session_epoch: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1),
        max_peers: cfg.max_peers.unwrap_or_else(default_max_peers),
        cas: cfg.membership_ca.clone(),
        certificate: cfg.certificate.clone(),
        unix_time: unix_now(),
        address_quarantine: cfg.address_quarantine,
        own_ports: cfg.metrics.map(|m| m.port()).into_iter().collect(),
        seed: rand::random(),
    };
    if let Some(text) = &cfg.certificate {
        if !cfg.membership_ca.is_empty() {
            if let Err(e) = crate::cert::verify(text, &cfg.membership_ca, &public, unix_now()) {
                tracing::warn!("this node's own certificate does not verify against membership.ca: {e}; peers will route nothing to it");
            }
        }
    }
    let mut agent = Agent::new(opts, Instant::now());

    // Signaling.
    let (scheme, rest) = cfg
        .signaling_url
        .split_once("://")
        .unwrap_or(("quic", &cfg.signaling_url));
    let trust = match (cfg.signaling_pin, &cfg.signaling_ca) {
        (Some(pin), _) => Trust::Fingerprint(pin),
        (None, Some(ca)) => Trust::ca_file(ca).map_err(DaemonError::SignalingCa)?,
        (None, None) => unreachable!("config requires pin_sha256 or ca_file"),
    };
    let mut sc = SigConfig::new(
        rest,
        trust,
        cfg.mesh.clone(),
        cfg.mesh_token.clone(),
        private.clone(),
    );
    sc.server_name = rest
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
        .unwrap_or_default();
    sc.overlay = cfg.address.clone();
    sc.transport = if scheme == "tls" {
        TransportMode::TcpOnly
    } else {
        TransportMode::Auto
    };
    let mut sig = SigClient::start(sc)?;

    // WireGuard control thread.
    let (wg_tx, wg_rx) = std::sync::mpsc::channel::<WgCmd>();
    let wg_thread = {
        let wg = wg.clone();
        std::thread::Builder::new()
            .name("wg-control".into())
            .spawn(move || wg_worker(wg, wg_rx))
            .map_err(|source| DaemonError::Resources {
                what: "starting the WireGuard control thread",
                source,
            })?
    };

    restore_on_panic(wg_tx.clone());

    // Control socket and metrics.
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<oneshot::Sender<Snapshot>>(16);
    let control = bind_control(&cfg.control)?;
    let ctl_task = tokio::spawn(control_loop(control, ctl_tx.clone(), wg_counters(&wg_tx)));
    let metrics_task = match cfg.metrics {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?;
            Some(tokio::spawn(metrics_loop(
                l,
                ctl_tx.clone(),
                wg_counters(&wg_tx),
            )))
        }
        None => None,
    };

    let mut rx = crate::udp::RecvBatch::new(16, 65536);
    // Embedded mode: decrypted packets and replies are built here.
    let mut scratch = vec![0u8; 65536 + 64];
    let mut wg_timer = tokio::time::interval(Duration::from_millis(100));
    wg_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut wg_ticks = 0u32;
    let mut iface_tick = tokio::time::interval(Duration::from_secs(5));
    iface_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut signaling_up = false;
    // TURN REST credentials last 24 h: re-mint them every 6 h.
    let mut rest_tick =
        tokio::time::interval_at(tokio::time::Instant::now() + REST_REMINT, REST_REMINT);
    tokio::pin!(shutdown);
    let far = Duration::from_secs(3600);

    loop {
        while let Some(o) = agent.poll_output() {
            apply(o, &sock, dual, &sig, &wg_tx, &mut plane);
        }
        let deadline = agent
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + far);
        tokio::select! {
            r = sock.async_io(Interest::READABLE, || rx.recv(sock.as_raw_fd())) => {
                let mut next = r;
                for _ in 0..8 {
                    match next {
                        Ok(_) => {
                            // One recvmmsg; with GRO each message may hold a run.
                            for (r, data) in rx.messages() {
                                for d in r.datagrams(data) {
                                    datagram(&mut agent, &plane, r.from, r.local, d, &mut scratch);
                                }
                            }
                            plane.flush();
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::debug!("agent socket: {e}");
                            break;
                        }
                    }
                    next = sock.try_io(Interest::READABLE, || rx.recv(sock.as_raw_fd()));
                }
            }
            ev = sig.recv() => {
                let now = Instant::now();
                match ev {
                    None => {
                        tracing::error!("signaling client stopped");
                        break;
                    }
                    Some(SigEvent::Connected { transport }) => {
                        tracing::info!(?transport, "signaling connected");
                        signaling_up = true;
                        agent.handle_signaling_connected(now);
                    }
                    Some(SigEvent::Disconnected { reason }) => {
                        tracing::warn!("signaling disconnected ({reason}); reconnecting, tunnels stay up");
                        signaling_up = false;
                    }
                    Some(SigEvent::Members(list)) => {
                        let list: Vec<(PeerKey, Vec<String>)> =
                            list.into_iter().map(|m| (m.key, m.overlay)).collect();
                        agent.handle_members(now, &list);
                    }
                    Some(SigEvent::Online(m)) => agent.handle_member(now, m.key, &m.overlay),
                    Some(SigEvent::Offline(k)) => agent.handle_offline(now, k),
                    Some(SigEvent::Message { from, message }) => agent.handle_message(now, from, message),
                    Some(SigEvent::Undeliverable { to, reason }) => {
                        tracing::debug!(peer = %to, ?reason, "signaling message undeliverable");
                    }
                    Some(SigEvent::ServerError { code, message }) => {
                        tracing::warn!(?code, "signaling server: {message}");
                    }
                    Some(_) => {}
                }
            }
            _ = tokio::time::sleep_until(deadline) => agent.handle_timeout(Instant::now()),
            Some(reply) = ctl_rx.recv() => {
                let mut snap = snapshot(&agent, &cfg.interface, port, signaling_up);
                if let DataPlane::Embedded(e) = &plane {
                    let c = &e.dev.counters;
                    snap.status.mode = "embedded".into();
                    snap.status.dropped.wg_rejected = c.wg_rejected.load(std::sync::atomic::Ordering::Relaxed);
                    snap.status.dropped.wg_bad_source = c.wg_bad_source.load(std::sync::atomic::Ordering::Relaxed);
                }
                let _ = reply.send(snap);
            }
            _ = wg_timer.tick(), if matches!(plane, DataPlane::Embedded(_)) => {
                if let DataPlane::Embedded(e) = &plane {
                    e.dev.tick(&mut scratch);
                    wg_ticks = wg_ticks.wrapping_add(1);
                    if wg_ticks.is_multiple_of(10) {
                        e.dev.reset_rate_limit();
                    }
                }
            }
            _ = iface_tick.tick() => {
                let h = host_nets(&filter, dual);
                agent.set_host_addrs(Instant::now(), h);
            }
            Some((spec, rest)) = late_rx.recv() => {
                if let Some((user, secret)) = rest {
                    rest_relays.push((spec.server, user, secret));
                }
                agent.add_relay(Instant::now(), spec);
            }
            _ = rest_tick.tick() => {
                for (server, user, secret) in &rest_relays {
                    let (u, p) = mint_rest(user, secret);
                    agent.set_relay_credentials(Instant::now(), *server, &u, &p);
                }
            }
            _ = &mut shutdown => break,
        }
    }

    // No more status answers: queued and later queries fail at once instead
    // of holding the wg thread's channel open.
    drop(ctl_rx);
    tracing::info!(
        "shutting down: telling peers, releasing allocations, restoring WireGuard peers"
    );
    agent.shutdown(Instant::now());
    while let Some(o) = agent.poll_output() {
        apply(o, &sock, dual, &sig, &wg_tx, &mut plane);
    }
    // Let the signaling client flush the goodbyes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (tx, rx) = oneshot::channel();
    let ack = Box::new(move || {
        let _ = tx.send(());
    });
    if wg_tx.send(WgCmd::RestoreAll(ack)).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
    }
    // The normal exit restored WireGuard: the panic hook's job is over.
    drop(std::panic::take_hook());
    // The control and metrics tasks hold senders to the wg thread: stop them
    // first, or the thread never sees its channel close.
    if let Some(t) = resolver_task {
        t.abort();
    }
    ctl_task.abort();
    let _ = ctl_task.await;
    if let Some(t) = metrics_task {
        t.abort();
        let _ = t.await;
    }
    drop(wg_tx);
    let _ = tokio::task::spawn_blocking(move || wg_thread.join()).await;
    // Embedded: the UAPI socket goes, and the interface with its routes
    // when the device is dropped here.
    plane.close();
    drop(plane);
    let _ = std::fs::remove_file(&cfg.control);
    Ok(())
}

fn apply(
    o: Output,
    sock: &Arc<UdpSocket>,
    dual: bool,
    sig: &SigClient,
    wg_tx: &std::sync::mpsc::Sender<WgCmd>,
    plane: &mut DataPlane,
) {
    match o {
        Output::Send { to, data } => {
            if let Err(e) = sock.try_send_to(&data, crate::udp::outward(to, dual)) {
                tracing::debug!(%to, "send: {e}");
            }
        }
        Output::Signal { to, message } => {
            // Never wait on signaling here: this loop also carries packets.
            if let Err(e) = sig.try_send(&to, &message) {
                tracing::debug!(peer = %to, "signal not sent: {e}");
            }
        }
        Output::PeerAdded { peer, allowed_ips } => {
            let endpoint = plane.peer_added(peer);
            if endpoint.is_none() && matches!(plane, DataPlane::External(_)) {
                return; // no proxy (logged): WireGuard is left alone
            }
            let _ = wg_tx.send(WgCmd::Add {
                peer,
                allowed_ips,
                endpoint,
            });
        }
        Output::Route { peer, route } => {
            // Every path is on the main socket today (index 0).
            if let Some(endpoint) = plane.route(&peer, route, 0) {
                let _ = wg_tx.send(WgCmd::Endpoint { peer, endpoint });
            }
        }
        Output::AllowedIps { peer, allowed_ips } => {
            let _ = wg_tx.send(WgCmd::AllowedIps { peer, allowed_ips });
        }
        Output::PeerRemoved { peer } => {
            plane.peer_removed(&peer);
            let _ = wg_tx.send(WgCmd::Restore { peer });
        }
    }
}

/// One datagram from the agent socket: socket → demux → ICE / TURN /
/// WireGuard. In embedded mode a WireGuard datagram that did not come
/// through a relay goes straight to the device, which knows its sender by
/// its keys; everything else goes through the agent first.
fn datagram(
    agent: &mut Agent,
    plane: &DataPlane,
    from: SocketAddr,
    local: Option<IpAddr>,
    data: &[u8],
    scratch: &mut [u8],
) {
    let now = Instant::now();
    let relayed = agent.is_relay(from);
    if let DataPlane::Embedded(e) = plane {
        if !relayed
            && matches!(
                crate::demux::classify(data),
                crate::demux::Kind::WireGuard(_)
            )
        {
            if let Some(peer) = e.dev.receive(from, Some(0), data, scratch) {
                agent.note_wireguard(now, peer, from, local, data.len());
            }
            return;
        }
    }
    if let Some((peer, pkt)) = agent.handle_datagram(now, from, local, data) {
        plane.deliver(&peer, from, (!relayed).then_some(0), pkt, scratch);
    }
}

/// Creates the embedded mode's interface and device on the agent socket.
fn start_embedded(
    cfg: &AgentConfig,
    sock: &std::net::UdpSocket,
    dual: bool,
    port: u16,
) -> Result<crate::dataplane::Embedded, DaemonError> {
    let key = cfg
        .private_key
        .as_ref()
        .ok_or_else(|| DaemonError::NoPrivateKey(cfg.interface.clone()))?;
    let own: Vec<IpNet> = cfg
        .address
        .iter()
        .filter_map(|a| {
            a.parse::<IpNet>()
                .ok()
                .or_else(|| a.parse::<IpAddr>().ok().map(IpNet::from))
        })
        .collect();
    let off = crate::dataplane::Offloads::from_env();
    let tun = crate::dataplane::tun::Tun::create(&cfg.interface, cfg.mtu, &own, off.tso)?;
    let handle = sock.try_clone().map_err(|source| DaemonError::Resources {
        what: "sharing the agent socket with the data plane",
        source,
    })?;
    let dev = crate::dataplane::embedded::Device::new(
        tun,
        handle,
        dual,
        port,
        key.secret_bytes(),
        &own,
        off,
    );
    tracing::info!(interface = %cfg.interface, mtu = cfg.mtu, ?own, ?off, "embedded WireGuard interface created");
    crate::dataplane::Embedded::start(dev).map_err(DaemonError::Uapi)
}

/// Defence in depth: a panic anywhere in the agent (a bug reached by input
/// the validation missed, inside a dependency) restores the WireGuard peers
/// the agent changed before the process ends, instead of leaving them
/// pointed at proxies that died with it. (The wg thread catches its own
/// panics and restores from its state directly.)
fn restore_on_panic(wg_tx: std::sync::mpsc::Sender<WgCmd>) {
    let wg_tx = std::sync::Mutex::new(wg_tx);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        if std::thread::current().name() == Some("wg-control") {
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let ack = Box::new(move || {
            let _ = tx.try_send(());
        });
        if let Ok(s) = wg_tx.lock() {
            let _ = s.send(WgCmd::RestoreAll(ack));
        }
        let restored = rx.recv_timeout(Duration::from_secs(5)).is_ok();
        eprintln!(
            "ice-agent: internal error (panic); WireGuard peers {}; exiting",
            if restored {
                "restored"
            } else {
                "could not be restored"
            }
        );
        std::process::exit(70);
    }));
}

/// What the wg thread knows about the peers it manages.
#[derive(Default)]
struct WgState {
    originals: HashMap<PeerKey, Original>,
    // Allowed IPs each managed peer should have, and what was written (a
    // member's address another peer holds is withheld until it is free).
    wanted: HashMap<PeerKey, Vec<IpNet>>,
    written: HashMap<PeerKey, Vec<IpNet>>,
    /// The endpoint last written per peer (none in embedded mode).
    endpoints: HashMap<PeerKey, Option<SocketAddr>>,
    /// The interface as last read, kept up to date with our own writes:
    /// adding or removing a peer costs one write, not a read of every peer
    /// (re-read every [`MODEL_MAX_AGE`], and when the interface changes).
    model: HashMap<PeerKey, crate::wg::WgPeer>,
    model_read: Option<Instant>,
}

/// How old the interface model may get before it is read again (changes an
/// operator makes by hand are seen within this time).
const MODEL_MAX_AGE: Duration = Duration::from_secs(30);

impl WgState {
    /// The interface's peers, read again when the model is too old.
    fn model(&mut self, wg: &WgControl) -> Result<&HashMap<PeerKey, crate::wg::WgPeer>, WgError> {
        if self.model_read.is_none_or(|t| t.elapsed() >= MODEL_MAX_AGE) {
            let dev = wg.device()?;
            self.model = dev.peers.into_iter().map(|p| (p.public_key, p)).collect();
            self.model_read = Some(Instant::now());
        }
        Ok(&self.model)
    }

    /// Records a write the agent made.
    fn wrote(
        &mut self,
        peer: PeerKey,
        endpoint: Option<SocketAddr>,
        allowed_ips: Option<&[IpNet]>,
    ) {
        let p = self.model.entry(peer).or_insert_with(|| crate::wg::WgPeer {
            public_key: peer,
            ..Default::default()
        });
        if let Some(e) = endpoint {
            p.endpoint = Some(e);
        }
        if let Some(ips) = allowed_ips {
            p.allowed_ips = ips.to_vec();
        }
    }
}

fn wg_log(what: &str, r: Result<(), WgError>) {
    if let Err(e) = r {
        tracing::warn!("{what}: {e}");
    }
}

/// Takes a peer over: remembers how it looked (or that it did not exist),
/// then writes endpoint and allowed IPs.
fn take_over(
    wg: &WgControl,
    st: &mut WgState,
    peer: PeerKey,
    allowed_ips: Vec<IpNet>,
    endpoint: Option<SocketAddr>,
) {
    // Without knowing how the peer looked, the agent would not know how to
    // restore it: leave the interface alone.
    let model = match st.model(wg) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("reading the interface, peer left alone: {e}");
            return;
        }
    };
    let existing = model.get(&peer).cloned();
    let allowed_ips_free = unclaimed(model, &peer, allowed_ips.clone());
    if !allowed_ips.is_empty() {
        st.wanted.insert(peer, allowed_ips);
    }
    let allowed_ips = allowed_ips_free;
    if !allowed_ips.is_empty() {
        st.written.insert(peer, allowed_ips.clone());
    }
    let keep_ips = allowed_ips.is_empty() && existing.is_some();
    st.originals
        .entry(peer)
        .or_insert_with(|| existing.map_or(Original::Created, Original::Existed));
    st.endpoints.insert(peer, endpoint);
    let ips = (!keep_ips).then_some(allowed_ips);
    let r = wg.set_peer(&PeerUpdate {
        public_key: peer,
        endpoint,
        allowed_ips: ips.clone(),
        ..PeerUpdate::default()
    });
    if r.is_ok() {
        st.wrote(peer, endpoint, ips.as_deref());
    }
    wg_log("adding peer", r);
}

fn ifindex(name: &str) -> u32 {
    match std::ffi::CString::new(name) {
        // SAFETY: a valid NUL-terminated name; returns 0 when unknown.
        Ok(c) => unsafe { libc::if_nametoindex(c.as_ptr()) },
        Err(_) => 0,
    }
}

/// The wg thread: carries out [`WgCmd`]s. A panic while handling one
/// restores every peer the agent changed and ends the process (defence in
/// depth: a bug must not leave WireGuard pointing at dead proxies).
fn wg_worker(wg: WgControl, rx: std::sync::mpsc::Receiver<WgCmd>) {
    let st = std::sync::Mutex::new(WgState::default());
    let run = std::panic::AssertUnwindSafe(|| wg_loop(&wg, &rx, &st));
    if std::panic::catch_unwind(run).is_err() {
        let mut st = st.lock().unwrap_or_else(|p| p.into_inner());
        for (peer, o) in st.originals.drain() {
            wg_log("restoring peer", wg.restore(&peer, &o));
        }
        eprintln!(
            "ice-agent: internal error in the WireGuard control thread; peers restored, exiting"
        );
        std::process::exit(70);
    }
}

fn wg_loop(wg: &WgControl, rx: &std::sync::mpsc::Receiver<WgCmd>, st: &std::sync::Mutex<WgState>) {
    let wg = wg.clone();
    let log = wg_log;
    let mut index = ifindex(wg.interface());
    let mut checked = Instant::now();
    loop {
        let next = rx.recv_timeout(Duration::from_secs(2));
        let mut guard = st.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *guard;
        if checked.elapsed() >= Duration::from_secs(2) {
            checked = Instant::now();
            // The interface was deleted and created again (wg-quick or the
            // userspace WireGuard restarted): the peers the agent managed
            // are gone. Take them over again, as they are now.
            let now = ifindex(wg.interface());
            if now != 0 && index != 0 && now != index {
                tracing::warn!(
                    interface = wg.interface(),
                    "the interface was re-created; re-adding the peers the agent manages"
                );
                let peers: Vec<(PeerKey, Option<SocketAddr>)> =
                    st.endpoints.iter().map(|(k, e)| (*k, *e)).collect();
                st.originals.clear();
                st.written.clear();
                st.model_read = None;
                for (peer, endpoint) in peers {
                    let ips = st.wanted.get(&peer).cloned().unwrap_or_default();
                    take_over(&wg, st, peer, ips, endpoint);
                }
            }
            if now != 0 {
                index = now;
            }
        }
        let cmd = match next {
            Ok(c) => c,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
        };
        match cmd {
            WgCmd::Add {
                peer,
                allowed_ips,
                endpoint,
            } => take_over(&wg, st, peer, allowed_ips, endpoint),
            // Only peers the agent took over (and knows how to restore);
            // never re-create one that was removed behind its back.
            WgCmd::Endpoint { peer, endpoint } if st.originals.contains_key(&peer) => {
                // Never re-create a peer removed behind the agent's back
                // (`update_only` is not understood by every implementation).
                // An endpoint changes with the path, not per peer added: one
                // read here is fine, and refreshes the model for free.
                match wg.device() {
                    Ok(d) if d.peers.iter().any(|p| p.public_key == peer) => {
                        st.model = d.peers.into_iter().map(|p| (p.public_key, p)).collect();
                        st.model_read = Some(Instant::now());
                    }
                    Ok(_) => {
                        tracing::warn!(
                            peer = %peer,
                            "peer was removed from the interface; not re-creating it"
                        );
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("reading the interface: {e}");
                        continue;
                    }
                }
                tracing::info!(peer = %peer, %endpoint, "WireGuard endpoint");
                st.endpoints.insert(peer, Some(endpoint));
                let r = wg.set_peer(&PeerUpdate {
                    public_key: peer,
                    endpoint: Some(endpoint),
                    ..PeerUpdate::default()
                });
                if r.is_ok() {
                    st.wrote(peer, Some(endpoint), None);
                }
                log("setting endpoint", r);
            }
            WgCmd::AllowedIps { peer, allowed_ips } if st.originals.contains_key(&peer) => {
                st.wanted.insert(peer, allowed_ips);
                apply_wanted(&wg, st, Some(peer));
            }
            WgCmd::Endpoint { .. } | WgCmd::AllowedIps { .. } => {}
            WgCmd::Restore { peer } => {
                if let Some(o) = st.originals.remove(&peer) {
                    let r = wg.restore(&peer, &o);
                    match (&r, o) {
                        (Ok(()), Original::Created) => {
                            st.model.remove(&peer);
                        }
                        (Ok(()), Original::Existed(p)) => {
                            st.model.insert(peer, p);
                        }
                        (Err(_), _) => st.model_read = None,
                    }
                    log("restoring peer", r);
                }
                st.wanted.remove(&peer);
                st.written.remove(&peer);
                st.endpoints.remove(&peer);
                // Addresses that peer held may now be free for another
                // (the model, not a read: removing a peer stays O(1) reads).
                apply_wanted(&wg, st, None);
            }
            WgCmd::RestoreAll(done) => {
                for (peer, o) in st.originals.drain() {
                    log("restoring peer", wg.restore(&peer, &o));
                }
                done();
                // Nothing may change the interface after the restore.
                return;
            }
            WgCmd::Counters(reply) => {
                let m = wg
                    .device()
                    .map(|d| {
                        d.peers
                            .into_iter()
                            .map(|p| (p.public_key, (p.rx_bytes, p.tx_bytes, p.last_handshake)))
                            .collect()
                    })
                    .unwrap_or_default();
                let _ = reply.send(m);
            }
        }
    }
}

/// Writes the allowed IPs of `only` (or of every managed peer) that are
/// wanted, free, and not yet written.
fn apply_wanted(wg: &WgControl, st: &mut WgState, only: Option<PeerKey>) {
    if let Err(e) = st.model(wg) {
        tracing::warn!("reading the interface: {e}");
        return;
    }
    let mut writes = Vec::new();
    let peers: Vec<PeerKey> = match only {
        Some(p) => vec![p],
        None => st.wanted.keys().copied().collect(),
    };
    for peer in &peers {
        let Some(want) = st.wanted.get(peer) else {
            continue;
        };
        if !st.model.contains_key(peer) {
            continue;
        }
        let ips = unclaimed(&st.model, peer, want.clone());
        if st.written.get(peer) != Some(&ips) {
            writes.push((*peer, ips));
        }
    }
    for (peer, ips) in writes {
        let peer = &peer;
        tracing::info!(peer = %peer, allowed_ips = ?ips, "WireGuard allowed IPs");
        let r = wg.set_peer(&PeerUpdate {
            public_key: *peer,
            allowed_ips: Some(ips.clone()),
            ..PeerUpdate::default()
        });
        match r {
            Ok(()) => {
                st.wrote(*peer, None, Some(&ips));
                st.written.insert(*peer, ips);
            }
            Err(e) => tracing::warn!("setting allowed IPs: {e}"),
        }
    }
}

/// The requested allowed IPs minus any that overlap another peer's: a
/// member cannot take over addresses routed to someone else.
fn unclaimed(
    model: &HashMap<PeerKey, crate::wg::WgPeer>,
    peer: &PeerKey,
    want: Vec<IpNet>,
) -> Vec<IpNet> {
    want.into_iter()
        .filter(|n| {
            let taken = model.values().filter(|p| p.public_key != *peer).find(|p| {
                p.allowed_ips
                    .iter()
                    .any(|o| o.contains(&n.network()) || n.contains(&o.network()))
            });
            if let Some(p) = taken {
                tracing::warn!(
                    peer = %peer,
                    "not routing {n} to it: already routed to {}",
                    p.public_key
                );
            }
            taken.is_none()
        })
        .collect()
}

type CountersFn =
    Arc<dyn Fn() -> Option<oneshot::Receiver<HashMap<PeerKey, (u64, u64, u64)>>> + Send + Sync>;

fn wg_counters(wg_tx: &std::sync::mpsc::Sender<WgCmd>) -> CountersFn {
    let tx = std::sync::Mutex::new(wg_tx.clone());
    Arc::new(move || {
        let (r, rx) = oneshot::channel();
        tx.lock().ok()?.send(WgCmd::Counters(r)).ok()?;
        Some(rx)
    })
}

fn snapshot(agent: &Agent, interface: &str, port: u16, signaling: bool) -> Snapshot {
    let now = Instant::now();
    let rows = agent.status(now);
    let d = agent.drops();
    let failovers = rows
        .iter()
        .map(|(_, r, f)| (r.public_key.clone(), *f))
        .collect();
    Snapshot {
        status: Status {
            interface: interface.to_owned(),
            mode: "external".into(),
            public_key: agent.public_key().to_string(),
            port,
            signaling,
            relays: agent
                .relay_status()
                .into_iter()
                .map(|(server, relayed, mapped, problem)| RelayStatus {
                    server,
                    relayed,
                    mapped,
                    problem,
                })
                .collect(),
            peers: rows.into_iter().map(|(_, r, _)| r).collect(),
            dropped: d,
            max_peers: agent.max_peers(),
            certificates: agent.certificates_required(),
        },
        failovers,
        direct_retries: agent.direct_retries(),
    }
}

async fn full_snapshot(
    ctl: &mpsc::Sender<oneshot::Sender<Snapshot>>,
    counters: &CountersFn,
) -> Option<Snapshot> {
    let (tx, rx) = oneshot::channel();
    ctl.send(tx).await.ok()?;
    let mut snap = rx.await.ok()?;
    if let Some(rx) = counters() {
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(3), rx).await {
            for p in &mut snap.status.peers {
                let key = p.public_key.parse::<PeerKey>().ok();
                if let Some((rx_b, tx_b, _)) = key.and_then(|k| c.get(&k)) {
                    p.rx_bytes = *rx_b;
                    p.tx_bytes = *tx_b;
                }
            }
        }
    }
    Some(snap)
}

/// The lines above the peer table: who we are, signaling, relays.
fn summary(s: &Status) -> String {
    let mut out = format!(
        "interface {}  public key {}  agent port {}\nsignaling: {}\n",
        s.interface,
        s.public_key,
        s.port,
        if s.signaling {
            "connected"
        } else {
            "not connected (reconnecting; tunnels stay up)"
        }
    );
    out += &format!(
        "membership: {}; {} peers (at most {}){}\n",
        if s.certificates {
            "certificates required (CA pinned)"
        } else {
            "unauthenticated (no CA pinned: first come, first served)"
        },
        s.peers.len(),
        s.max_peers,
        match s.dropped.peer_limit {
            0 => String::new(),
            n => format!(", {n} members refused at the limit"),
        }
    );
    for r in &s.relays {
        let state = match (&r.problem, r.relayed.is_empty()) {
            (Some(p), _) => format!("unusable: {p}"),
            (None, false) => format!(
                "relayed {}",
                r.relayed
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            (None, true) => "allocating".to_owned(),
        };
        let mapped = r
            .mapped
            .map(|m| format!(", we appear as {m}"))
            .unwrap_or_default();
        out += &format!("relay {}: {state}{mapped}\n", r.server);
    }
    out.push('\n');
    out
}

fn bind_control(path: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| DaemonError::Control {
            path: path.to_owned(),
            what: "cannot create its directory",
            source,
        })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::ControlInUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    // Created owner-only from the start (no window with looser rights).
    // SAFETY: umask has no preconditions; restored right after the bind.
    let old = unsafe { libc::umask(0o077) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = bound.map_err(|source| DaemonError::Control {
        path: path.to_owned(),
        what: "cannot bind",
        source,
    })?;
    // Status names peers and addresses: owner only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        DaemonError::Control {
            path: path.to_owned(),
            what: "cannot make it owner-only",
            source,
        }
    })?;
    Ok(l)
}

async fn control_loop(
    l: UnixListener,
    ctl: mpsc::Sender<oneshot::Sender<Snapshot>>,
    counters: CountersFn,
) {
    loop {
        let Ok((stream, _)) = l.accept().await else {
            continue;
        };
        let ctl = ctl.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut r = BufReader::new(r.take(256));
            if tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
                .await
                .is_err()
            {
                return;
            }
            let reply = match line.trim() {
                "status" => match full_snapshot(&ctl, &counters).await {
                    Some(s) => ControlReply::Status(Box::new(s.status)),
                    None => ControlReply::Error("the agent is shutting down".into()),
                },
                other => ControlReply::Error(format!(
                    "unknown command {:?} (the control socket answers \"status\")",
                    other.chars().take(64).collect::<String>()
                )),
            };
            let text = serde_json::to_string(&reply).unwrap_or_default() + "\n";
            let _ = w.write_all(text.as_bytes()).await;
        });
    }
}

async fn metrics_loop(
    l: TcpListener,
    ctl: mpsc::Sender<oneshot::Sender<Snapshot>>,
    counters: CountersFn,
) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let ctl = ctl.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut req = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(5), s.read(&mut req)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let head = String::from_utf8_lossy(&req[..n]);
            let (code, body) = if head.starts_with("GET /metrics") {
                match full_snapshot(&ctl, &counters).await {
                    Some(snap) => ("200 OK", render_metrics(&snap)),
                    None => ("503 Service Unavailable", "shutting down\n".into()),
                }
            } else if head.starts_with("GET /healthz") {
                ("200 OK", "ok\n".into())
            } else {
                ("404 Not Found", "try /metrics or /healthz\n".into())
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}

/// A peer's labels: `peer` is its certificate name when it has one (names
/// are checked to be label-safe), with the key beside it; else its key.
fn peer_labels(p: &PeerStatus) -> String {
    match &p.name {
        Some(n) => format!("peer=\"{n}\",key=\"{}\"", p.public_key),
        None => format!("peer=\"{}\"", p.public_key),
    }
}

fn render_metrics(snap: &Snapshot) -> String {
    use std::fmt::Write as _;
    let s = &snap.status;
    let mut o = String::new();
    let head = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    // One labelled sample per peer (skipping peers without a value).
    let per_peer = |o: &mut String,
                    name: &str,
                    kind: &str,
                    help: &str,
                    value: &dyn Fn(&PeerStatus) -> Option<f64>| {
        head(o, name, kind, help);
        for p in &s.peers {
            if let Some(v) = value(p) {
                let _ = writeln!(o, "{name}{{{}}} {v}", peer_labels(p));
            }
        }
    };
    head(
        &mut o,
        "wgice_peer_path",
        "gauge",
        "1 for the path each peer is on (connecting, lan, direct, relay).",
    );
    for p in &s.peers {
        for kind in ["connecting", "lan", "direct", "relay"] {
            let on = serde_json::to_value(p.path)
                .ok()
                .and_then(|v| v.as_str().map(|x| x == kind))
                .unwrap_or(false);
            let _ = writeln!(
                o,
                "wgice_peer_path{{{},path=\"{kind}\"}} {}",
                peer_labels(p),
                u8::from(on)
            );
        }
    }
    per_peer(
        &mut o,
        "wgice_peer_rtt_seconds",
        "gauge",
        "Last STUN round trip on the peer's path.",
        &|p| p.rtt_ms.map(|r| r / 1000.0),
    );
    per_peer(
        &mut o,
        "wgice_peer_rx_bytes_total",
        "counter",
        "Bytes received from the peer (WireGuard's counter).",
        &|p| Some(p.rx_bytes as f64),
    );
    per_peer(
        &mut o,
        "wgice_peer_tx_bytes_total",
        "counter",
        "Bytes sent to the peer (WireGuard's counter).",
        &|p| Some(p.tx_bytes as f64),
    );
    per_peer(
        &mut o,
        "wgice_peer_path_changes_total",
        "counter",
        "Path changes of the peer.",
        &|p| Some(p.path_changes as f64),
    );
    per_peer(
        &mut o,
        "wgice_peer_failovers_total",
        "counter",
        "Direct paths that stopped answering (fell back to the relay).",
        &|p| Some(snap.failovers.get(&p.public_key).copied().unwrap_or(0) as f64),
    );
    let retries = snap.direct_retries;
    head(
        &mut o,
        "wgice_direct_retries_total",
        "counter",
        "Times direct checks failed and were retried (ICE failures).",
    );
    let _ = writeln!(o, "wgice_direct_retries_total {retries}");
    head(
        &mut o,
        "wgice_signaling_connected",
        "gauge",
        "1 while the signaling connection is up.",
    );
    let _ = writeln!(o, "wgice_signaling_connected {}", u8::from(s.signaling));
    head(
        &mut o,
        "wgice_dropped_total",
        "counter",
        "Input dropped, by reason.",
    );
    for (why, v) in s.dropped.by_reason() {
        let _ = writeln!(o, "wgice_dropped_total{{reason=\"{why}\"}} {v}");
    }
    o
}

/// What the control socket answers (one JSON document per connection).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ControlReply {
    /// The agent's status.
    Status(Box<Status>),
    /// The agent could not answer, and why.
    Error(String),
}

/// Why `ice-agent status` got no status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Nothing listens on the control socket.
    #[error("cannot reach the agent at {path}: {source} (is `ice-agent up` running? pass --control or --interface)")]
    Unreachable {
        /// The control socket.
        path: std::path::PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The connection failed midway.
    #[error("talking to the agent: {0}")]
    Io(#[from] io::Error),
    /// The agent answered with an error.
    #[error("the agent says: {0}")]
    Agent(String),
    /// The answer is not a control reply (another program on the socket, or
    /// an agent of another version).
    #[error("not an ice-agent control reply: {0}")]
    BadReply(String),
}

/// Asks a running agent for its status over the control socket.
pub fn query_status(control: &Path) -> Result<Status, ControlError> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(control).map_err(|source| {
        ControlError::Unreachable {
            path: control.to_owned(),
            source,
        }
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"status\n")?;
    let mut out = String::new();
    s.take(16 << 20).read_to_string(&mut out)?;
    match serde_json::from_str(&out) {
        Ok(ControlReply::Status(st)) => Ok(*st),
        Ok(ControlReply::Error(e)) => Err(ControlError::Agent(e)),
        Err(e) => Err(ControlError::BadReply(e.to_string())),
    }
}

/// The status as `ice-agent status` prints it: the summary lines, then one
/// row per peer.
pub fn render_status(s: &Status) -> String {
    summary(s) + &render_table(&s.peers)
}

fn host_nets(filter: &HostFilter, dual: bool) -> Vec<IpNet> {
    match gather::interfaces() {
        Ok(all) => filter
            .candidates(&all)
            .into_iter()
            .map(|a| a.net)
            .filter(|n| dual || n.addr().is_ipv4())
            .collect(),
        Err(e) => {
            tracing::warn!("cannot list interfaces: {e}");
            Vec::new()
        }
    }
}

async fn resolve(host: &str, port: u16) -> Option<SocketAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ip.is_ipv4().then_some(SocketAddr::new(ip, port));
    }
    for attempt in 0..2u32 {
        if let Ok(it) = tokio::net::lookup_host((host, port)).await {
            if let Some(a) = it.into_iter().find(|a| a.is_ipv4()) {
                return Some(a);
            }
        }
        tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
    }
    None
}

/// A relay's spec at `server`, and its REST user and secret if it has them.
fn relay_spec(server: SocketAddr, auth: &RelayAuth) -> (RelaySpec, Option<(String, String)>) {
    match auth {
        RelayAuth::None => (RelaySpec { server, turn: None }, None),
        RelayAuth::Static { username, password } => (
            RelaySpec {
                server,
                turn: Some(relay::client::ClientConfig::new(username, password)),
            },
            None,
        ),
        RelayAuth::Rest { user, secret } => {
            let (username, password) = mint_rest(user, secret);
            (
                RelaySpec {
                    server,
                    turn: Some(relay::client::ClientConfig::new(&username, &password)),
                },
                Some((user.clone(), secret.clone())),
            )
        }
    }
}

const REST_LIFETIME: u64 = 24 * 3600;
const REST_REMINT: Duration = Duration::from_secs(6 * 3600);

fn mint_rest(user: &str, secret: &str) -> (String, String) {
    let username = relay::auth::rest_username(unix_now() + REST_LIFETIME, user);
    let password = relay::auth::rest_password(secret, &username);
    (username, password)
}

/// Peers the agent manages unless `agent.max_peers` says otherwise: each
/// external-mode peer holds one proxy socket, so the open-file limit (less
/// room for the agent's own sockets) bounds it.
pub fn default_max_peers() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        1024
    };
    soft.saturating_sub(128).clamp(16, 4096)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
