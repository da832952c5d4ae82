//! The daemon: a thin tokio driver around the sans-IO [`Agent`].
//!
//! [`run`] sets up, runs the main loop, and shuts down. The main loop owns
//! the agent's one UDP socket (ICE checks, TURN, and WireGuard packets on
//! direct or relayed paths all share it) and the signaling client: each
//! datagram goes socket → demux → ICE / TURN / WireGuard, and what the
//! agent wants done goes to the socket, to signaling, to the data plane
//! ([`crate::dataplane`]: loopback proxies beside an external WireGuard
//! interface, or the embedded WireGuard device) and to the `wg-control`
//! thread. Beside the loop run that thread (`wgowner.rs`: which WireGuard
//! peers the agent owns, and how they are given back), the control socket
//! ([`crate::control`]) and the metrics listener (`metrics.rs`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use signaling::client::{
    Client as SigClient, ClientConfig as SigConfig, Event as SigEvent, TransportMode,
};
use signaling::keys::{PrivateKey, PublicKey};
use signaling::tls::Trust;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::agent::{Agent, AgentOptions, Output, PeerKey, RelayPath, RelaySpec};
use crate::config::{AgentConfig, Mode, Relay, RelayAuth, RelayTransport};
use crate::control;
use crate::dataplane::external::Proxies;
use crate::dataplane::DataPlane;
use crate::gather::{self, HostFilter};
use crate::metrics;
use crate::turn_stream::driver::{Delivery, Streams, Table, Tls};
use crate::turn_stream::Transport;
use crate::wg::{WgControl, WgError};
use crate::wgowner::{Command, WgOwner};

/// The control socket's types and client, re-exported where they were
/// before [`crate::control`] had its own module.
pub use crate::control::{
    query_status, render_status, ControlError, ControlReply, RelayStatus, Status,
};

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

/// Runs the agent until `shutdown` resolves; restores the WireGuard peers it
/// changed before returning.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    // Set up: the socket, the data plane, the agent, signaling, the wg
    // thread, the control socket and metrics.
    let socket_err = |source| DaemonError::AgentSocket {
        port: cfg.port,
        source,
    };
    let bound = crate::udp::bind(cfg.port).map_err(socket_err)?;
    let (dual, std_sock) = (bound.dual, bound.socket);
    // Which offloads to use (all unless WGICE_OFFLOADS narrows them).
    let off = crate::dataplane::Offloads::from_env();
    let gro = off.gro && crate::udp::enable_gro(std_sock.as_raw_fd());
    let port = std_sock.local_addr().map_err(socket_err)?.port();
    // Embedded mode: the interface is ours, created before anything reads it.
    // Relays reached over TCP/TLS: the agent's sends and both data planes
    // find their streams here.
    let stream_table = Table::default();
    let embedded = match cfg.mode {
        Mode::External => None,
        Mode::Embedded => Some(start_embedded(
            &cfg,
            &std_sock,
            dual,
            port,
            off,
            stream_table.clone(),
        )?),
    };
    let wg = WgControl::open(&cfg.interface)?;
    let dev = wg.device()?;
    let private = private_key(&cfg, dev.private_key)?;
    let wg_port = (dev.listen_port != 0).then_some(dev.listen_port);
    if wg_port.is_none() {
        tracing::warn!(
            "{:?} has no listen port: packets to it cannot be delivered",
            cfg.interface
        );
    }
    let sock = Arc::new(UdpSocket::from_std(std_sock).map_err(socket_err)?);
    let mut plane = match embedded {
        Some(e) => DataPlane::Embedded(e),
        None => {
            let wg_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), dev.listen_port);
            DataPlane::External(Proxies::new(
                sock.clone(),
                dual,
                wg_addr,
                stream_table.clone(),
            ))
        }
    };
    let filter = host_filter(&cfg);
    let host = host_nets(&filter, dual);
    tracing::info!(interface = %cfg.interface, mode = ?cfg.mode, backend = wg.backend_name(), port, gro, ?host, "starting");
    let mut streams = Streams::new(stream_table);
    // Relays are reached over IPv4 where this host has IPv4 (or no
    // address yet), else over IPv6.
    let families = Families {
        v4: host.is_empty() || host.iter().any(|n| n.addr().is_ipv4()),
        v6: dual,
    };
    let (relay_specs, mut relays) = Relays::resolve(&cfg.relays, &mut streams, families).await;
    let public = private.public_key();
    let opts = agent_options(&cfg, public, wg_port, port, host, relay_specs);
    let mut agent = Agent::new(opts, Instant::now());
    let mut sig = SigClient::start(signaling_config(&cfg, &private)?)?;
    let (owner, wg_thread) =
        WgOwner::spawn(wg.clone()).map_err(|source| DaemonError::Resources {
            what: "starting the WireGuard control thread",
            source,
        })?;
    owner.restore_on_panic();
    let (ctl_tx, mut ctl_rx) = mpsc::channel(16);
    let ctl_task = control::start(&cfg.control, ctl_tx.clone(), owner.clone())?;
    let metrics_task = match cfg.metrics {
        Some(addr) => Some(metrics::start(addr, ctl_tx.clone(), owner.clone()).await?),
        None => None,
    };

    // Port mapping at the gateway (PCP / NAT-PMP) for the agent's port.
    let (pm_tx, mut pm_rx) = mpsc::channel(8);
    let portmap = cfg.port_mapping.then(|| {
        agent.set_port_mapping(Instant::now(), None, "asking the gateway".into());
        crate::portmap::driver::spawn(port, pm_tx)
    });

    // Our NAT facts for peers: a UDP-only netcheck in the background, at
    // start (after the first offers are out) and after network changes.
    let (nat_tx, mut nat_rx) = mpsc::channel(1);
    let mut nat_probe =
        crate::netcheck::driver::spawn_background(cfg.clone(), NAT_PROBE_DELAY, nat_tx.clone());

    // Coordinated punches ask for our NAT's counter (a fresh socket each).
    let (mm_tx, mut mm_rx) = mpsc::channel::<(PeerKey, Option<SocketAddr>)>(16);
    // Birthday probing: our sockets, their hits, the winners' datagrams.
    let (mut birthdays, mut hit_rx, mut extra_rx) = crate::sockets::Birthdays::new(dual);

    let mut rx = crate::udp::RecvBatch::new(16, 65536);
    // Embedded mode: decrypted packets and replies are built here.
    let mut scratch = vec![0u8; 65536 + 64];
    let mut wg_timer = interval(Duration::from_millis(100));
    let mut wg_ticks = 0u32;
    // Blackhole detection asks what each peer was sent.
    let mut tx_tick = interval(Duration::from_millis(100));
    // Network changes from the kernel (rtnetlink); the interface poll stays
    // as a slow safety net (every 5 s where netlink is unavailable).
    let (nw_tx, mut nw_rx) = mpsc::channel(256);
    let poll_every = match crate::netwatch::driver::spawn(nw_tx) {
        Ok(()) => Duration::from_secs(30),
        Err(e) => {
            tracing::warn!("no netlink socket ({e}): polling the interfaces every 5 s");
            Duration::from_secs(5)
        }
    };
    let mut netwatch = crate::netwatch::NetWatch::new();
    let mut ignored_ifs = filter.exclude.clone();
    ignored_ifs.push("lo".into());
    let mut iface_tick = interval(poll_every);
    let mut signaling_up = false;
    // TURN REST credentials (24 h by default): re-minted every quarter of
    // the shortest lifetime (a relay that keeps the old username under a
    // live allocation gets a planned re-allocation, `agent/renew.rs`).
    let remint = cfg
        .relays
        .iter()
        .filter_map(|r| match r.auth {
            RelayAuth::Rest { lifetime, .. } => Some(lifetime / 4),
            _ => None,
        })
        .min()
        .unwrap_or(Duration::from_secs(6 * 3600));
    let mut rest_tick = tokio::time::interval_at(tokio::time::Instant::now() + remint, remint);
    tokio::pin!(shutdown);
    let far = Duration::from_secs(3600);

    // The main loop: drain the agent's outputs, then wait for a datagram,
    // signaling, a timer, or a status query.
    loop {
        while let Some(o) = agent.poll_output() {
            match o {
                Output::MeasureMapping { peer, server } => {
                    let tx = mm_tx.clone();
                    tokio::spawn(async move {
                        let mapped = crate::netcheck::driver::measure_mapping(server).await;
                        let _ = tx.send((peer, mapped)).await;
                    });
                }
                Output::BirthdayOpen {
                    peer,
                    target,
                    count,
                } => {
                    let n = birthdays.open(peer, target, count);
                    agent.birthday_opened(Instant::now(), peer, n);
                }
                Output::BirthdayClose { peer } => birthdays.close(peer),
                Output::BirthdayRelease { socket, .. } => {
                    birthdays.release(&mut plane, &sock, socket)
                }
                Output::SendFrom { socket, to, data } => plane.send_from(socket, to, &data),
                o => apply(o, &sock, dual, &sig, &owner, &mut plane, &mut streams),
            }
        }
        let deadline = agent
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + far);
        tokio::select! {
            r = sock.async_io(Interest::READABLE, || rx.recv(sock.as_raw_fd())) => {
                // socket → demux → ICE / TURN / WireGuard, up to 8 batches at a time.
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
            ev = sig.recv() => match ev {
                Some(ev) => signaling_event(&mut agent, ev, &mut signaling_up),
                None => {
                    tracing::error!("signaling client stopped");
                    break;
                }
            },
            _ = tokio::time::sleep_until(deadline) => agent.handle_timeout(Instant::now()),
            Some(reply) = ctl_rx.recv() => {
                let _ = reply.send(control::snapshot(&agent, &plane, &cfg.interface, port, signaling_up));
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
            _ = tx_tick.tick() => {
                let now = Instant::now();
                for (peer, total, large) in plane.tx_counts() {
                    agent.note_data_tx(now, &peer, total, large);
                }
            }
            _ = iface_tick.tick() => agent.set_host_addrs(Instant::now(), host_nets(&filter, dual)),
            Some(change) = nw_rx.recv() => {
                let ignored = crate::netwatch::driver::indexes(&ignored_ifs);
                netwatch.handle(Instant::now(), &change, &ignored, &crate::netwatch::driver::ifname);
            }
            _ = sleep_until_opt(netwatch.poll_timeout()) => {
                if let Some(r) = netwatch.poll(Instant::now()) {
                    agent.network_changed(Instant::now(), host_nets(&filter, dual), r.why());
                    nat_probe.abort();
                    nat_probe = crate::netcheck::driver::spawn_background(cfg.clone(), NAT_PROBE_DELAY, nat_tx.clone());
                }
            }
            Some(input) = streams.rx.recv() => match streams.accept(input) {
                // relay stream → TURN → ICE / WireGuard, like a datagram from the relay.
                Some(Delivery::Frames(server, frames)) => {
                    for f in &frames {
                        stream_frame(&mut agent, &plane, server, f, &mut scratch);
                    }
                    plane.flush();
                }
                Some(Delivery::Event(server, ev)) => {
                    agent.handle_relay_stream(Instant::now(), server, ev);
                }
                None => {}
            },
            Some(late) = relays.late.recv() => relays.add_late(&mut agent, &mut streams, late),
            _ = rest_tick.tick() => relays.remint(&mut agent),
            Some(u) = pm_rx.recv() => {
                let mapped = match &u {
                    crate::portmap::driver::Update::Mapped { external, .. } => Some(SocketAddr::V4(*external)),
                    crate::portmap::driver::Update::Unmapped { .. } => None,
                };
                agent.set_port_mapping(Instant::now(), mapped, crate::portmap::driver::describe(&u));
            }
            Some((peer, mapped)) = mm_rx.recv() => agent.handle_mapping(Instant::now(), peer, mapped),
            Some((peer, port, s)) = hit_rx.recv() => match birthdays.adopt(&mut plane, s, port) {
                Ok(slot) => {
                    if !agent.birthday_hit(Instant::now(), peer, port, slot) {
                        birthdays.release(&mut plane, &sock, slot);
                    }
                }
                Err(e) => tracing::warn!(peer = %peer, "birthday socket not usable: {e}"),
            },
            Some((slot, port, from, data)) = extra_rx.recv() => {
                // A birthday socket's datagram: through the agent (STUN, or
                // WireGuard of a peer it knows at that address).
                if let Some((peer, pkt)) = agent.handle_datagram_at(Instant::now(), from, port, &data) {
                    plane.deliver(&peer, from, Some(slot), pkt, &mut scratch);
                    plane.flush();
                }
            }
            Some(facts) = nat_rx.recv() => {
                if !facts.udp {
                    nat_probe = crate::netcheck::driver::spawn_background(cfg.clone(), NAT_RECHECK, nat_tx.clone());
                }
                agent.set_nat_facts(Instant::now(), facts);
            }
            _ = &mut shutdown => break,
        }
    }

    // Shut down. No more status answers: queued and later queries fail at
    // once instead of holding the wg thread's channel open.
    drop(ctl_rx);
    nat_probe.abort();
    birthdays.close_all();
    tracing::info!(
        "shutting down: telling peers, releasing allocations, restoring WireGuard peers"
    );
    agent.shutdown(Instant::now());
    while let Some(o) = agent.poll_output() {
        apply(o, &sock, dual, &sig, &owner, &mut plane, &mut streams);
    }
    // The gateway forgets our port.
    if let Some(pm) = portmap {
        pm.release(Duration::from_millis(500)).await;
    }
    // Let the signaling client flush the goodbyes (and relay streams their
    // deallocations).
    tokio::time::sleep(Duration::from_millis(100)).await;
    streams.close_all();
    owner.restore_all(Duration::from_secs(10)).await;
    // The normal exit restored WireGuard: the panic hook's job (and its
    // handle on the wg thread) is over.
    drop(std::panic::take_hook());
    // The control and metrics tasks hold handles on the wg thread: stop them
    // first, or the thread never sees its channel close.
    if let Some(t) = relays.resolver {
        t.abort();
    }
    ctl_task.abort();
    let _ = ctl_task.await;
    if let Some(t) = metrics_task {
        t.abort();
        let _ = t.await;
    }
    drop(owner);
    let _ = tokio::task::spawn_blocking(move || wg_thread.join()).await;
    // Embedded: the UAPI socket goes, and the interface with its routes
    // when the device is dropped here.
    plane.close();
    drop(plane);
    let _ = std::fs::remove_file(&cfg.control);
    Ok(())
}

fn interval(period: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval(period);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

/// Carries out one of the agent's outputs.
fn apply(
    o: Output,
    sock: &Arc<UdpSocket>,
    dual: bool,
    sig: &SigClient,
    owner: &WgOwner,
    plane: &mut DataPlane,
    streams: &mut Streams,
) {
    match o {
        Output::Send { to, data } => {
            // A relay reached over TCP/TLS gets it on its stream.
            if streams.table.send(to, [&data[..]]) {
                return;
            }
            if let Err(e) = sock.try_send_to(&data, crate::udp::outward(to, dual)) {
                tracing::debug!(%to, "send: {e}");
            }
        }
        Output::RelayConnect { server, path } => streams.connect(server, path),
        Output::RelayClose { server } => streams.close(server),
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
            owner.send(Command::Add {
                peer,
                allowed_ips,
                endpoint,
            });
        }
        Output::Route { peer, route } => {
            if let Some(endpoint) = plane.route(&peer, route, route.via) {
                owner.send(Command::Endpoint { peer, endpoint });
            }
        }
        Output::AllowedIps { peer, allowed_ips } => {
            owner.send(Command::AllowedIps { peer, allowed_ips });
        }
        Output::PeerRemoved { peer } => {
            plane.peer_removed(&peer);
            owner.send(Command::Restore { peer });
        }
        // The main loop carries these out (shutting down: not needed).
        Output::MeasureMapping { .. }
        | Output::BirthdayOpen { .. }
        | Output::BirthdayClose { .. }
        | Output::BirthdayRelease { .. }
        | Output::SendFrom { .. } => {}
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

/// One frame from a relay's TCP/TLS stream: TURN → ICE / WireGuard, as a
/// datagram from the relay would go.
fn stream_frame(
    agent: &mut Agent,
    plane: &DataPlane,
    server: SocketAddr,
    data: &[u8],
    scratch: &mut [u8],
) {
    if let Some((peer, pkt)) = agent.handle_stream_frame(Instant::now(), server, data) {
        plane.deliver(&peer, server, None, pkt, scratch);
    }
}

/// One event from the signaling client.
fn signaling_event(agent: &mut Agent, ev: SigEvent, signaling_up: &mut bool) {
    let now = Instant::now();
    match ev {
        SigEvent::Connected { transport } => {
            tracing::info!(?transport, "signaling connected");
            *signaling_up = true;
            agent.handle_signaling_connected(now);
        }
        SigEvent::Disconnected { reason } => {
            tracing::warn!("signaling disconnected ({reason}); reconnecting, tunnels stay up");
            *signaling_up = false;
        }
        SigEvent::Members(list) => {
            let list: Vec<(PeerKey, Vec<String>)> =
                list.into_iter().map(|m| (m.key, m.overlay)).collect();
            agent.handle_members(now, &list);
        }
        SigEvent::Online(m) => agent.handle_member(now, m.key, &m.overlay),
        SigEvent::Offline(k) => agent.handle_offline(now, k),
        SigEvent::Message { from, message } => agent.handle_message(now, from, message),
        SigEvent::Undeliverable { to, reason } => {
            tracing::debug!(peer = %to, ?reason, "signaling message undeliverable");
        }
        SigEvent::ServerError { code, message } => {
            tracing::warn!(?code, "signaling server: {message}");
        }
        _ => {}
    }
}

/// Creates the embedded mode's interface and device on the agent socket.
fn start_embedded(
    cfg: &AgentConfig,
    sock: &std::net::UdpSocket,
    dual: bool,
    port: u16,
    off: crate::dataplane::Offloads,
    streams: Table,
) -> Result<crate::dataplane::Embedded, DaemonError> {
    let key = cfg
        .private_key
        .as_ref()
        .ok_or_else(|| DaemonError::NoPrivateKey(cfg.interface.clone()))?;
    let own = overlay_nets(cfg);
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
    )
    .with_streams(streams);
    tracing::info!(interface = %cfg.interface, mtu = cfg.mtu, ?own, ?off, "embedded WireGuard interface created");
    crate::dataplane::Embedded::start(dev).map_err(DaemonError::Uapi)
}

/// The private key: the config's, else the interface's.
fn private_key(cfg: &AgentConfig, iface: Option<[u8; 32]>) -> Result<PrivateKey, DaemonError> {
    let private = match (cfg.private_key.clone(), iface) {
        (Some(k), _) => k,
        (None, Some(k)) => PrivateKey::from_bytes(k),
        (None, None) => return Err(DaemonError::NoPrivateKey(cfg.interface.clone())),
    };
    if let (Some(k), Some(d)) = (cfg.private_key.as_ref(), iface) {
        if k.public_key() != PrivateKey::from_bytes(d).public_key() {
            tracing::warn!(
                "the configured private key differs from {:?}'s: peers will reach the \
                 interface's key, not the one the agent signals",
                cfg.interface
            );
        }
    }
    Ok(private)
}

/// The configured overlay addresses (`wireguard.address`) as networks.
fn overlay_nets(cfg: &AgentConfig) -> Vec<IpNet> {
    cfg.address
        .iter()
        .filter_map(|a| {
            a.parse::<IpNet>()
                .ok()
                .or_else(|| a.parse::<IpAddr>().ok().map(IpNet::from))
        })
        .collect()
}

/// Which interface addresses are host candidates: not the WireGuard
/// interface's, not the overlay's, not the excluded interfaces'.
/// Sleeps until `at`, or forever without one (a `select!` branch that is
/// off while there is nothing to wait for).
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

fn host_filter(cfg: &AgentConfig) -> HostFilter {
    let mut filter = HostFilter {
        exclude: vec![cfg.interface.clone()],
        exclude_nets: overlay_nets(cfg),
    };
    filter
        .exclude
        .extend(cfg.exclude_interfaces.iter().cloned());
    filter
}

/// The sans-IO agent's options (and a warning if this node's own
/// certificate does not verify).
fn agent_options(
    cfg: &AgentConfig,
    public: PublicKey,
    wg_port: Option<u16>,
    port: u16,
    host: Vec<IpNet>,
    relays: Vec<RelaySpec>,
) -> AgentOptions {
    let (auto_peers, peers) = match &cfg.peers {
        crate::config::Peers::Auto => (true, Vec::new()),
        crate::config::Peers::List(l) => (
            false,
            l.iter()
                .map(|p| (p.public_key, p.allowed_ips.clone()))
                .collect(),
        ),
    };
    if let Some(text) = &cfg.certificate {
        if !cfg.membership_ca.is_empty() {
            if let Err(e) = crate::cert::verify(text, &cfg.membership_ca, &public, unix_now()) {
                tracing::warn!("this node's own certificate does not verify against membership.ca: {e}; peers will route nothing to it");
            }
        }
    }
    AgentOptions {
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
        // `WGICE_RELAY_FAILOVER=slow` turns fast relay failover off (only
        // for measuring what it gains: the failover benchmark's "before").
        fast_relay_failover: std::env::var("WGICE_RELAY_FAILOVER").as_deref() != Ok("slow"),
    }
}

/// The signaling client's configuration: `signaling.url` (`quic://` or
/// `tls://` host:port), its trust anchor, mesh, token, our key and overlay.
fn signaling_config(cfg: &AgentConfig, private: &PrivateKey) -> Result<SigConfig, DaemonError> {
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
    Ok(sc)
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

/// A relay that resolved late, its REST user and secret if it has them,
/// and its TLS settings if it may be reached over TLS.
type LateRelay = (RelaySpec, Option<RestCreds>, Option<Result<Tls, String>>);

/// The configured relays after start: those whose name did not resolve yet
/// (booted before DNS) are retried every 30 s by a task and handed to the
/// main loop when they do; TURN REST credentials are re-minted.
struct Relays {
    /// Relays with TURN REST credentials: server and its credentials.
    rest: Vec<(SocketAddr, RestCreds)>,
    late: mpsc::Receiver<LateRelay>,
    resolver: Option<JoinHandle<()>>,
}

impl Relays {
    /// Resolves the relays; returns those that resolved, for the agent
    /// (and gives `streams` the TLS settings of those reachable over TLS).
    async fn resolve(
        configured: &[Relay],
        streams: &mut Streams,
        families: Families,
    ) -> (Vec<RelaySpec>, Relays) {
        let mut specs = Vec::new();
        let mut rest = Vec::new();
        let (late_tx, late) = mpsc::channel::<LateRelay>(16);
        let mut unresolved = Vec::new();
        for r in configured {
            match resolve(&r.host, r.port, families).await {
                Some(server) => {
                    let (spec, creds, tls) = relay_spec(server, r);
                    if let Some(creds) = creds {
                        rest.push((server, creds));
                    }
                    if let Some(tls) = tls {
                        streams.set_tls(server, tls);
                    }
                    specs.push(spec);
                }
                None => {
                    tracing::warn!(relay = %r.host, "no address of the relay in a family this host can reach (IPv4, or IPv6 on a host without IPv4) yet; retrying every 30 s");
                    unresolved.push(r.clone());
                }
            }
        }
        let resolver = (!unresolved.is_empty()).then(|| {
            tokio::spawn(async move {
                while !unresolved.is_empty() {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    let mut left = Vec::new();
                    for r in unresolved {
                        match resolve(&r.host, r.port, families).await {
                            Some(server) => {
                                tracing::info!(relay = %r.host, %server, "relay resolved");
                                if late_tx.send(relay_spec(server, &r)).await.is_err() {
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
        let relays = Relays {
            rest,
            late,
            resolver,
        };
        (specs, relays)
    }

    /// A relay that resolved late joins the agent.
    fn add_late(
        &mut self,
        agent: &mut Agent,
        streams: &mut Streams,
        (spec, creds, tls): LateRelay,
    ) {
        if let Some(creds) = creds {
            self.rest.push((spec.server, creds));
        }
        if let Some(tls) = tls {
            streams.set_tls(spec.server, tls);
        }
        agent.add_relay(Instant::now(), spec);
    }

    /// Fresh TURN REST credentials for every relay that uses them.
    fn remint(&self, agent: &mut Agent) {
        for (server, creds) in &self.rest {
            let (u, p) = creds.mint();
            agent.set_relay_credentials(Instant::now(), *server, &u, &p);
        }
    }
}

/// Which address families relays are reached over: IPv4 first where the
/// host has it, IPv6 where the agent socket is dual-stack.
#[derive(Debug, Clone, Copy)]
struct Families {
    v4: bool,
    v6: bool,
}

impl Families {
    /// The address to use among `addrs` (IPv4 first when usable).
    fn pick(self, addrs: &[SocketAddr]) -> Option<SocketAddr> {
        let first = |v4: bool| addrs.iter().copied().find(|a| a.is_ipv4() == v4);
        match (self.v4, self.v6) {
            (true, true) => first(true).or_else(|| first(false)),
            (true, false) => first(true),
            (false, true) => first(false).or_else(|| first(true)),
            (false, false) => None,
        }
    }
}

async fn resolve(host: &str, port: u16, families: Families) -> Option<SocketAddr> {
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
        // A literal is what the operator wants, if this socket can reach it.
        return (ip.is_ipv4() || families.v6).then_some(SocketAddr::new(ip, port));
    }
    for attempt in 0..2u32 {
        if let Ok(it) = tokio::net::lookup_host((host, port)).await {
            let addrs: Vec<SocketAddr> = it.collect();
            if let Some(a) = families.pick(&addrs) {
                return Some(a);
            }
        }
        tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
    }
    None
}

/// A relay's spec at `server` (with the paths to try: a `turn:` relay over
/// UDP, then TCP at its port, then TLS on 443; `?transport=tcp` over TCP,
/// then TLS on 443; `turns:` over TLS), its REST user and secret if it has
/// them, and its TLS settings if a path is TLS.
fn relay_spec(server: SocketAddr, r: &Relay) -> LateRelay {
    let (mut turn, creds) = match &r.auth {
        RelayAuth::None => (None, None),
        RelayAuth::Static { username, password } => (
            Some(relay::client::ClientConfig::new(username, password)),
            None,
        ),
        RelayAuth::Rest {
            user,
            secret,
            lifetime,
        } => {
            let creds = RestCreds {
                user: user.clone(),
                secret: secret.clone(),
                lifetime: *lifetime,
            };
            let (username, password) = creds.mint();
            (
                Some(relay::client::ClientConfig::new(&username, &password)),
                Some(creds),
            )
        }
    };
    // An IPv6 relayed address too (ADDITIONAL-ADDRESS-FAMILY), for peers
    // that have only IPv6; a relay without IPv6 says so and serves IPv4.
    if let Some(t) = turn.as_mut() {
        t.dual_stack = true;
    }
    let at = |transport, port| RelayPath {
        transport,
        addr: SocketAddr::new(server.ip(), port),
    };
    let tls443 = at(Transport::Tls, 443);
    let (paths, stream_only) = match r.transport {
        RelayTransport::StunOnly => (Vec::new(), false),
        RelayTransport::Udp => (
            vec![
                at(Transport::Udp, server.port()),
                at(Transport::Tcp, server.port()),
                tls443,
            ],
            false,
        ),
        RelayTransport::Tcp => (vec![at(Transport::Tcp, server.port()), tls443], true),
        RelayTransport::Tls => (vec![at(Transport::Tls, server.port())], true),
    };
    let tls = paths
        .iter()
        .any(|p| p.transport == Transport::Tls)
        .then(|| Tls::for_relay(r));
    if let Some(Err(e)) = &tls {
        tracing::warn!(relay = %r.host, "TURN over TLS unavailable: {e}");
    }
    let mut spec = RelaySpec::udp(server, turn);
    spec.paths = paths;
    spec.stream_only = stream_only;
    (spec, creds, tls)
}

/// A relay's TURN REST user, shared secret and credential lifetime.
#[derive(Debug, Clone)]
struct RestCreds {
    user: String,
    secret: String,
    lifetime: Duration,
}

impl RestCreds {
    /// A fresh `expiry:user` and its password.
    fn mint(&self) -> (String, String) {
        let username = relay::auth::rest_username(unix_now() + self.lifetime.as_secs(), &self.user);
        let password = relay::auth::rest_password(&self.secret, &username);
        (username, password)
    }
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
/// The background netcheck starts this long after the agent (or a network
/// change), so its probes do not share the first round trips with the
/// relay allocation and the first offers.
const NAT_PROBE_DELAY: Duration = Duration::from_millis(500);
/// A background netcheck that got no UDP answer runs again after this.
const NAT_RECHECK: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relays_are_reached_over_ipv4_where_the_host_has_it_else_over_ipv6() {
        let v4: SocketAddr = "198.51.100.2:3478".parse().expect("v4");
        let v6: SocketAddr = "[2001:db8::2]:3478".parse().expect("v6");
        let both = [v6, v4];
        let fam = |v4, v6| Families { v4, v6 };
        assert_eq!(fam(true, true).pick(&both), Some(v4));
        assert_eq!(fam(false, true).pick(&both), Some(v6));
        assert_eq!(fam(true, false).pick(&[v6]), None);
        // IPv6-only host, IPv4-only name: try it (NAT64/CLAT may carry it).
        assert_eq!(fam(false, true).pick(&[v4]), Some(v4));
        assert_eq!(fam(false, false).pick(&both), None);
    }
}
