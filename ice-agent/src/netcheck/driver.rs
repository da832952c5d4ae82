//! The netcheck driver: resolves the relays, opens the sockets, runs the
//! sans-IO [`Prober`] and, beside it, the TCP/TLS probes and the gateway
//! probes; every step has a timeout and the whole run a hard bound.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay::stun::{self, attr, method, Class, Message, MessageBuilder};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinSet;

use super::gateway::{self, PortMappingAnswer};
use super::probe::{Plan, Prober, Socket, UdpTarget, MAX_RELAYS};
use super::{ms, GatewayReport, NatFacts, PortMapping, RelayReport, Report, Sample, StreamReport};
use crate::config::{AgentConfig, Relay, RelayTransport, RelayTrust};

/// How a run is bounded.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// Ask the default gateway for UPnP-IGD / NAT-PMP / PCP.
    pub gateway: bool,
    /// Probe each relay over TCP and TLS too.
    pub streams: bool,
    /// Run the mapping tests from the agent's own port when it is free.
    pub agent_port: bool,
    /// Name resolution of each relay.
    pub resolve_timeout: Duration,
    /// Each TCP/TLS probe (connect, handshake, Binding).
    pub stream_timeout: Duration,
    /// The gateway probes.
    pub gateway_timeout: Duration,
    /// The whole run, whatever happens.
    pub deadline: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            gateway: true,
            streams: true,
            agent_port: true,
            resolve_timeout: Duration::from_secs(2),
            stream_timeout: Duration::from_millis(2000),
            gateway_timeout: Duration::from_millis(1200),
            deadline: Duration::from_secs(6),
        }
    }
}

/// The agent's own NAT facts: a UDP-only run (no TCP/TLS, no gateway: the
/// port mapper asks the gateway already) from ephemeral ports, started
/// after `delay`, its facts sent on `tx` (nothing when no relay could be
/// probed over UDP). The daemon runs one at start, one after each network
/// change (aborting the previous), and another 30 s after a run that got
/// no UDP answer (the relay may only have been down).
pub(crate) fn spawn_background(
    cfg: AgentConfig,
    delay: Duration,
    tx: tokio::sync::mpsc::Sender<NatFacts>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let opts = Options {
            gateway: false,
            streams: false,
            agent_port: false,
            ..Options::default()
        };
        let report = run(&cfg, &opts).await;
        // No relay to probe over UDP (none configured, none resolved):
        // nothing was measured, and "no UDP" would be a false fact.
        let tested = report
            .relays
            .iter()
            .any(|r| r.udp_addr.is_some() || r.udp6_addr.is_some());
        if tested {
            let _ = tx.send(report.nat).await;
        }
    })
}

/// Longest STUN answer read over a stream.
const MAX_STREAM_ANSWER: usize = 2048;

/// Runs netcheck against `cfg`'s relays (and the default gateway).
pub async fn run(cfg: &AgentConfig, opts: &Options) -> Report {
    let t0 = Instant::now();
    let hard = t0 + opts.deadline;

    // Relay addresses (IP literals need no DNS).
    let mut relays: Vec<RelayReport> = cfg
        .relays
        .iter()
        .map(|r| RelayReport {
            url: relay_url(r),
            udp_addr: None,
            udp_rtt_ms: None,
            udp6_addr: None,
            udp6_rtt_ms: None,
            alternate: None,
            tcp: None,
            tls: None,
            error: None,
        })
        .collect();
    let mut resolved: Vec<(Option<IpAddr>, Option<IpAddr>)> = vec![(None, None); cfg.relays.len()];
    let mut dns = JoinSet::new();
    for (i, r) in cfg.relays.iter().enumerate() {
        if i >= MAX_RELAYS {
            relays[i].error = Some(format!("only the first {MAX_RELAYS} relays are probed"));
            continue;
        }
        if let Ok(ip) = r.host.parse::<IpAddr>() {
            resolved[i] = split(&[ip]);
            continue;
        }
        let (host, port, limit) = (r.host.clone(), r.port, opts.resolve_timeout);
        dns.spawn(async move {
            let found =
                tokio::time::timeout(limit, tokio::net::lookup_host((host.as_str(), port))).await;
            let ips: Result<Vec<IpAddr>, String> = match found {
                Ok(Ok(it)) => Ok(it.take(16).map(|a| a.ip()).collect()),
                Ok(Err(e)) => Err(format!("{host} does not resolve: {e}")),
                Err(_) => Err(format!("{host} did not resolve within {limit:?}")),
            };
            (i, ips)
        });
    }
    while let Some(j) = dns.join_next().await {
        match j {
            Ok((i, Ok(ips))) => resolved[i] = split(&ips),
            Ok((i, Err(e))) => relays[i].error = Some(e),
            Err(_) => {}
        }
    }

    // Sockets. The mapping tests use the agent's own port when it is free.
    let first = if opts.agent_port { cfg.port } else { 0 };
    let (main, agent_port_busy) = match bind_v4(first) {
        Ok(s) => (Some(s), false),
        Err(_) => (bind_v4(0).ok(), first != 0),
    };
    let filter = bind_v4(0).ok();
    let hairpin = bind_v4(0).ok();
    let any_v6 = resolved.iter().any(|(_, v6)| v6.is_some());
    let main6 = if any_v6 { bind_v6().ok() } else { None };
    let local_port = main
        .as_ref()
        .and_then(|s| s.local_addr().ok())
        .map_or(0, |a| a.port());

    // TCP/TLS and the gateway run beside the UDP probes.
    let mut streams = JoinSet::new();
    for (i, r) in cfg.relays.iter().enumerate().filter(|_| opts.streams) {
        let Some(ip) = resolved[i].0.or(resolved[i].1) else {
            continue;
        };
        let (tcp_port, tls_port) = stream_ports(r);
        let limit = opts.stream_timeout;
        if let Some(p) = tcp_port {
            let addr = SocketAddr::new(ip, p);
            streams.spawn(async move { (i, false, stream_probe(addr, None, limit).await) });
        }
        if let Some(p) = tls_port {
            let addr = SocketAddr::new(ip, p);
            let setup = tls_setup(r);
            streams.spawn(async move {
                let report = match setup {
                    Ok(s) => stream_probe(addr, Some(s), limit).await,
                    Err(e) => failed(addr, e),
                };
                (i, true, report)
            });
        }
    }
    let gw_task = opts.gateway.then(|| {
        let limit = opts.gateway_timeout;
        tokio::spawn(async move { probe_gateway(limit).await })
    });

    // UDP: the sans-IO prober.
    let targets: Vec<UdpTarget> = resolved
        .iter()
        .enumerate()
        .take(MAX_RELAYS)
        .map(|(i, (v4, v6))| UdpTarget {
            relay: i,
            v4: v4
                .filter(|_| main.is_some())
                .map(|ip| SocketAddr::new(ip, cfg.relays[i].port)),
            v6: v6
                .filter(|_| main6.is_some())
                .map(|ip| SocketAddr::new(ip, cfg.relays[i].port)),
        })
        .filter(|t| udp_transport(&cfg.relays[t.relay]))
        .collect();
    let plan = Plan {
        targets,
        main_port: local_port,
        local_ips: super::local_ips(),
        seed: rand::random(),
    };
    let mut prober = Prober::new(plan, Instant::now());
    let mut bufs = [[0u8; 2048]; 4];
    loop {
        while let Some(t) = prober.poll_transmit() {
            let s = match t.socket {
                Socket::Main => main.as_ref(),
                Socket::Filter => filter.as_ref(),
                Socket::Hairpin => hairpin.as_ref(),
                Socket::Main6 => main6.as_ref(),
            };
            if let Some(s) = s {
                // A send error (no route) is an unanswered probe.
                let _ = s.send_to(&t.contents, t.to).await;
            }
        }
        let Some(wake) = prober.poll_timeout() else {
            break;
        };
        if Instant::now() >= hard {
            break;
        }
        let wake = tokio::time::Instant::from_std(wake.min(hard));
        let [b0, b1, b2, b3] = &mut bufs;
        tokio::select! {
            r = recv(main.as_ref(), b0) => if let Ok((n, from)) = r {
                prober.handle_datagram(Instant::now(), Socket::Main, from, &b0[..n]);
            },
            r = recv(filter.as_ref(), b1) => if let Ok((n, from)) = r {
                prober.handle_datagram(Instant::now(), Socket::Filter, from, &b1[..n]);
            },
            r = recv(hairpin.as_ref(), b2) => if let Ok((n, from)) = r {
                prober.handle_datagram(Instant::now(), Socket::Hairpin, from, &b2[..n]);
            },
            r = recv(main6.as_ref(), b3) => if let Ok((n, from)) = r {
                prober.handle_datagram(Instant::now(), Socket::Main6, from, &b3[..n]);
            },
            _ = tokio::time::sleep_until(wake) => prober.handle_timeout(Instant::now()),
        }
    }
    let udp = prober.outcome();

    // Collect the rest, within the hard bound.
    let left = |now: Instant| hard.saturating_duration_since(now);
    while let Ok(Some(j)) = tokio::time::timeout(left(Instant::now()), streams.join_next()).await {
        if let Ok((i, tls, report)) = j {
            if tls {
                relays[i].tls = Some(report);
            } else {
                relays[i].tcp = Some(report);
            }
        }
    }
    streams.abort_all();
    let gateway = match gw_task {
        Some(h) => match tokio::time::timeout(left(Instant::now()), h).await {
            Ok(Ok(g)) => g,
            _ => None,
        },
        None => None,
    };

    for r in &udp.relays {
        let Some(rep) = relays.get_mut(r.relay) else {
            continue;
        };
        let (v4, v6) = resolved[r.relay];
        let port = cfg.relays[r.relay].port;
        rep.udp_addr = v4
            .filter(|_| main.is_some())
            .map(|ip| SocketAddr::new(ip, port));
        rep.udp6_addr = v6
            .filter(|_| main6.is_some())
            .map(|ip| SocketAddr::new(ip, port));
        rep.udp_rtt_ms = r.rtt_v4.map(ms);
        rep.udp6_rtt_ms = r.rtt_v6.map(ms);
        rep.alternate = r.other;
    }
    let preferred_relay = relays
        .iter()
        .filter_map(|r| {
            let best = match (r.udp_rtt_ms, r.udp6_rtt_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            best.map(|t| (t, r.url.clone()))
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, u)| u);
    Report {
        nat: NatFacts {
            udp: udp.udp,
            public_ipv4: udp.public_ipv4,
            public_ipv6: udp.public_ipv6,
            mapping: udp.mapping,
            port_allocation: udp.port_allocation,
            filtering: udp.filtering,
            port_preserved: udp.port_preserved,
            hairpin: udp.hairpin,
            port_mapping: gateway.as_ref().map(|g| PortMapping {
                upnp: g.upnp,
                nat_pmp: g.nat_pmp,
                pcp: g.pcp,
            }),
        },
        local_port,
        agent_port_busy,
        samples: udp
            .samples
            .iter()
            .map(|s| Sample {
                server: s.server,
                mapped: s.mapped,
            })
            .collect(),
        gateway,
        preferred_relay,
        relays,
        duration_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
    }
}

/// `scheme:host:port` without credentials.
/// Attempts of [`measure_mapping`] leave at 0, 200 and 500 ms; it gives up
/// at 1 s.
const MEASURE_GAPS_MS: [u64; 3] = [200, 300, 500];

/// A Binding from a fresh UDP socket to `server`: the public address the
/// NAT gave that socket (on a sequential symmetric NAT, its next port;
/// the coordinated punch adds one step for the agent socket's next
/// mapping). An answer counts only from `server`, with our transaction id,
/// read by the relay crate's bounded STUN parser. `None`: no answer.
pub(crate) async fn measure_mapping(server: SocketAddr) -> Option<SocketAddr> {
    let bind = if server.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    };
    let sock = UdpSocket::bind(bind).await.ok()?;
    let tid: stun::TransactionId = rand::random();
    let mut req = Vec::with_capacity(28);
    MessageBuilder::new(&mut req, method::BINDING, Class::Request, tid).fingerprint();
    let mut buf = vec![0u8; 1500];
    for gap in MEASURE_GAPS_MS {
        if let Err(e) = sock.send_to(&req, server).await {
            tracing::debug!(%server, "measuring our mapping: {e}");
        }
        let until = tokio::time::Instant::now() + Duration::from_millis(gap);
        while let Ok(Ok((n, from))) = tokio::time::timeout_at(until, sock.recv_from(&mut buf)).await
        {
            if from != server {
                continue;
            }
            let Ok(m) = Message::parse(&buf[..n]) else {
                continue;
            };
            if m.transaction_id() == tid && m.class() == Class::Success {
                if let Some(Ok(a)) = m.xor_address(attr::XOR_MAPPED_ADDRESS) {
                    return Some(a);
                }
            }
        }
    }
    None
}

fn relay_url(r: &Relay) -> String {
    let (scheme, query) = match r.transport {
        RelayTransport::StunOnly => ("stun", ""),
        RelayTransport::Udp => ("turn", ""),
        RelayTransport::Tcp => ("turn", "?transport=tcp"),
        RelayTransport::Tls => ("turns", ""),
    };
    let host = if r.host.contains(':') {
        format!("[{}]", r.host)
    } else {
        r.host.clone()
    };
    format!("{scheme}:{host}:{}{query}", r.port)
}

/// Whether the relay's port speaks UDP (stream-only relays get no UDP probe).
fn udp_transport(r: &Relay) -> bool {
    matches!(r.transport, RelayTransport::StunOnly | RelayTransport::Udp)
}

/// Where to try TCP and TLS: TCP at the relay's port (STUN/TURN serve TCP
/// beside UDP on 3478), TLS at a `turns:` relay's port, else at 443 (where
/// a relay for UDP-blocked networks listens, and what the agent's TLS
/// fallback uses). A `stun:` server gets no TLS probe; a `turns:` one no
/// plain TCP probe.
pub(crate) fn stream_ports(r: &Relay) -> (Option<u16>, Option<u16>) {
    match r.transport {
        RelayTransport::StunOnly => (Some(r.port), None),
        RelayTransport::Udp | RelayTransport::Tcp => (Some(r.port), Some(443)),
        RelayTransport::Tls => (None, Some(r.port)),
    }
}

/// First IPv4 and first IPv6 address.
fn split(ips: &[IpAddr]) -> (Option<IpAddr>, Option<IpAddr>) {
    let v4 = ips.iter().copied().find(|i| i.is_ipv4());
    let v6 = ips
        .iter()
        .copied()
        .find(|i| i.is_ipv6() && !i.to_canonical().is_ipv4());
    (v4, v6)
}

fn bind_v4(port: u16) -> io::Result<UdpSocket> {
    let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

fn bind_v6() -> io::Result<UdpSocket> {
    let s = std::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0))?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

/// Receives on `s`, or waits forever when there is no such socket.
async fn recv(s: Option<&UdpSocket>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    match s {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// TLS client setup for one relay.
struct TlsSetup {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    verified: bool,
}

fn tls_setup(r: &Relay) -> Result<TlsSetup, String> {
    signaling::tls::install_provider();
    let name = ServerName::try_from(r.host.clone())
        .map_err(|e| format!("{:?} is not a TLS server name: {e}", r.host))?;
    let (mut config, verified) = match &r.tls_trust {
        Some(RelayTrust::Pin(fp)) => (
            signaling::tls::Trust::Fingerprint(*fp)
                .client_config()
                .map_err(|e| e.to_string())?,
            true,
        ),
        Some(RelayTrust::CaFile(p)) => (
            signaling::tls::Trust::ca_file(p)
                .and_then(|t| t.client_config())
                .map_err(|e| format!("ca_file: {e}"))?,
            true,
        ),
        None => {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified { provider }))
                .with_no_client_auth();
            (cfg, false)
        }
    };
    // RFC 7443: STUN/TURN over TLS.
    config.alpn_protocols = vec![b"stun.turn".to_vec()];
    Ok(TlsSetup {
        config: Arc::new(config),
        name,
        verified,
    })
}

fn failed(addr: SocketAddr, error: String) -> StreamReport {
    StreamReport {
        addr,
        ok: false,
        connect_ms: None,
        rtt_ms: None,
        verified: None,
        error: Some(error),
    }
}

/// Connects (TLS: and handshakes), sends a STUN Binding, reads one answer.
async fn stream_probe(addr: SocketAddr, tls: Option<TlsSetup>, limit: Duration) -> StreamReport {
    let verified = tls.as_ref().map(|t| t.verified);
    let t0 = Instant::now();
    let work = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match tls {
            None => {
                let connected = t0.elapsed();
                let rtt = binding_over_stream(tcp).await?;
                Ok((connected, rtt))
            }
            Some(t) => {
                let s = tokio_rustls::TlsConnector::from(t.config)
                    .connect(t.name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                let connected = t0.elapsed();
                let rtt = binding_over_stream(s).await?;
                Ok((connected, rtt))
            }
        }
    };
    match tokio::time::timeout(limit, work).await {
        Ok(Ok((connected, rtt))) => StreamReport {
            addr,
            ok: true,
            connect_ms: Some(ms(connected)),
            rtt_ms: Some(ms(rtt)),
            verified,
            error: None,
        },
        Ok(Err(e)) => failed(addr, e),
        Err(_) => failed(addr, format!("no answer within {limit:?}")),
    }
}

/// One Binding over a stream (RFC 8489 §6.2.2 framing: messages back to
/// back); the answer must be a success with our transaction id.
async fn binding_over_stream<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
) -> Result<Duration, String> {
    let tid: stun::TransactionId = rand::random();
    let mut req = Vec::with_capacity(64);
    MessageBuilder::new(&mut req, method::BINDING, Class::Request, tid).fingerprint();
    let sent = Instant::now();
    s.write_all(&req).await.map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; MAX_STREAM_ANSWER];
    let mut len = 0;
    loop {
        match stun::stream_frame_len(&buf[..len]) {
            Ok(Some(n)) => {
                let m = Message::parse(&buf[..n]).map_err(|e| format!("answer: {e}"))?;
                if m.transaction_id() != tid || m.method() != method::BINDING {
                    return Err("answer to another request".into());
                }
                if m.class() != Class::Success || m.xor_address(attr::XOR_MAPPED_ADDRESS).is_none()
                {
                    return Err("Binding refused".into());
                }
                return Ok(sent.elapsed());
            }
            Ok(None) if len < buf.len() => {}
            Ok(None) => return Err("answer too long".into()),
            Err(e) => return Err(format!("not STUN: {e}")),
        }
        let n = s
            .read(&mut buf[len..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before answering".into());
        }
        len += n;
    }
}

/// Accepts any certificate (a relay configured without `pin_sha256` or
/// `ca_file`); the handshake signature is still checked against it. The
/// report says the relay was not verified.
#[derive(Debug)]
struct Unverified {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The default gateway and what it answers. Sends only to the gateway of
/// this host's IPv4 default route (UDP 5351) and to the SSDP group on that
/// route's interface.
async fn probe_gateway(limit: Duration) -> Option<GatewayReport> {
    let text = read_bounded("/proc/net/route", 64 * 1024).ok()?;
    let route = gateway::default_route(&text)?;
    let src = crate::gather::interfaces()
        .ok()
        .and_then(|all| {
            all.into_iter().find_map(|a| match a.net.addr() {
                IpAddr::V4(v4) if a.name == route.interface => Some(v4),
                _ => None,
            })
        })
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    let mut g = GatewayReport {
        address: route.gateway,
        interface: route.interface.clone(),
        upnp: false,
        upnp_server: None,
        nat_pmp: false,
        nat_pmp_external: None,
        pcp: false,
    };
    let (pm, ssdp) = tokio::join!(
        port_mapping_probe(route.gateway, src, limit),
        ssdp_discover(route.gateway, src, limit)
    );
    if let Some((nat_pmp, external, pcp)) = pm {
        g.nat_pmp = nat_pmp;
        g.nat_pmp_external = external;
        g.pcp = pcp;
    }
    if let Some(a) = ssdp {
        g.upnp = true;
        g.upnp_server = a.server;
    }
    Some(g)
}

fn read_bounded(path: &str, max: u64) -> io::Result<String> {
    use std::io::Read;
    let mut s = String::new();
    std::fs::File::open(path)?
        .take(max)
        .read_to_string(&mut s)?;
    Ok(s)
}

/// NAT-PMP and PCP on the gateway's UDP 5351: (NAT-PMP answered, its
/// external address, PCP answered).
async fn port_mapping_probe(
    gw: Ipv4Addr,
    src: Ipv4Addr,
    limit: Duration,
) -> Option<(bool, Option<Ipv4Addr>, bool)> {
    let s = UdpSocket::bind((src, 0)).await.ok()?;
    s.connect((gw, gateway::PORT_MAPPING_PORT)).await.ok()?;
    let client = match s.local_addr().ok()?.ip() {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => src,
    };
    let (mut nat_pmp, mut external, mut pcp) = (false, None, false);
    let end = tokio::time::Instant::now() + limit.min(Duration::from_millis(1000));
    let mut next_send = tokio::time::Instant::now();
    let mut gap = Duration::from_millis(250);
    let mut buf = [0u8; 1100];
    while tokio::time::Instant::now() < end && !(nat_pmp && pcp) {
        if tokio::time::Instant::now() >= next_send {
            if !nat_pmp {
                let _ = s.send(&gateway::natpmp_request()).await;
            }
            if !pcp {
                let _ = s.send(&gateway::pcp_announce(client)).await;
            }
            next_send += gap;
            gap *= 2;
        }
        match tokio::time::timeout_at(next_send.min(end), s.recv(&mut buf)).await {
            Ok(Ok(n)) => match gateway::parse_port_mapping(&buf[..n]) {
                Some(PortMappingAnswer::NatPmp { external: e, .. }) => {
                    nat_pmp = true;
                    external = external.or(e);
                }
                Some(PortMappingAnswer::Pcp { .. }) => pcp = true,
                None => {}
            },
            // ICMP port unreachable: nothing listens on 5351.
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => break,
            Ok(Err(_)) | Err(_) => {}
        }
    }
    Some((nat_pmp, external, pcp))
}

/// SSDP M-SEARCH for an IGD on the default route's interface (from
/// `src`); the gateway's answer when it answered as one (answers from any
/// other address are ignored). Also used by the port mapper.
pub(crate) async fn ssdp_discover(
    gw: Ipv4Addr,
    src: Ipv4Addr,
    limit: Duration,
) -> Option<gateway::SsdpAnswer> {
    let std_sock = std::net::UdpSocket::bind((src, 0)).ok()?;
    std_sock.set_multicast_ttl_v4(2).ok()?;
    set_multicast_if(&std_sock, src).ok()?;
    std_sock.set_nonblocking(true).ok()?;
    let s = UdpSocket::from_std(std_sock).ok()?;
    let end = tokio::time::Instant::now() + limit.min(Duration::from_millis(1200));
    let mut buf = [0u8; 2048];
    for round in 0..2 {
        for target in gateway::SSDP_TARGETS {
            let _ = s
                .send_to(gateway::ssdp_search(target).as_bytes(), gateway::SSDP_GROUP)
                .await;
        }
        let round_end = if round == 0 {
            (tokio::time::Instant::now() + Duration::from_millis(400)).min(end)
        } else {
            end
        };
        while let Ok(r) = tokio::time::timeout_at(round_end, s.recv_from(&mut buf)).await {
            let Ok((n, from)) = r else { continue };
            if from.ip() != IpAddr::V4(gw) {
                continue;
            }
            if let Some(a) = gateway::parse_ssdp(&buf[..n]) {
                return Some(a);
            }
        }
    }
    None
}

/// IP_MULTICAST_IF: the SSDP search leaves through the default route's
/// interface only (Linux would also pick it from the bound source).
fn set_multicast_if(s: &std::net::UdpSocket, src: Ipv4Addr) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if src.is_unspecified() {
        return Ok(());
    }
    let addr = libc::in_addr {
        s_addr: u32::from_ne_bytes(src.octets()),
    };
    // SAFETY: a valid socket and a pointer to an in_addr of the given size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MULTICAST_IF,
            (&addr as *const libc::in_addr).cast(),
            std::mem::size_of::<libc::in_addr>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RelayAuth;

    fn relay(transport: RelayTransport, port: u16) -> Relay {
        Relay {
            host: "relay.example.org".into(),
            port,
            transport,
            auth: RelayAuth::None,
            tls_trust: None,
        }
    }

    #[test]
    fn stream_targets_per_transport() {
        assert_eq!(
            stream_ports(&relay(RelayTransport::Udp, 3478)),
            (Some(3478), Some(443))
        );
        assert_eq!(
            stream_ports(&relay(RelayTransport::Tcp, 3478)),
            (Some(3478), Some(443))
        );
        assert_eq!(
            stream_ports(&relay(RelayTransport::Tls, 5349)),
            (None, Some(5349))
        );
        assert_eq!(
            stream_ports(&relay(RelayTransport::StunOnly, 3478)),
            (Some(3478), None)
        );
        assert_eq!(
            relay_url(&relay(RelayTransport::Tcp, 3478)),
            "turn:relay.example.org:3478?transport=tcp"
        );
        let mut v6 = relay(RelayTransport::Tls, 443);
        v6.host = "2001:db8::1".into();
        assert_eq!(relay_url(&v6), "turns:[2001:db8::1]:443");
    }

    /// A loopback relay: the real server (sans-IO core) is not linked
    /// here, so this plays one over TCP with the STUN codec.
    #[tokio::test]
    async fn binding_over_tcp_on_loopback() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut c, peer) = l.accept().await.expect("accept");
            let mut buf = [0u8; 512];
            let n = c.read(&mut buf).await.expect("read");
            let m = Message::parse(&buf[..n]).expect("stun");
            let mut out = Vec::new();
            MessageBuilder::new(
                &mut out,
                method::BINDING,
                Class::Success,
                m.transaction_id(),
            )
            .xor_address(attr::XOR_MAPPED_ADDRESS, peer);
            // Dribble it out in two writes.
            c.write_all(&out[..7]).await.expect("write");
            tokio::time::sleep(Duration::from_millis(5)).await;
            c.write_all(&out[7..]).await.expect("write");
        });
        let r = stream_probe(addr, None, Duration::from_secs(2)).await;
        assert!(r.ok, "{r:?}");
        assert!(r.rtt_ms.is_some());

        // Someone else's answer, garbage, silence.
        for reply in [&b"HTTP/1.1 400 Bad\r\n\r\n"[..], &[0u8; 0][..]] {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("listen");
            let addr = l.local_addr().expect("addr");
            let reply = reply.to_vec();
            tokio::spawn(async move {
                let (mut c, _) = l.accept().await.expect("accept");
                let mut buf = [0u8; 512];
                let _ = c.read(&mut buf).await;
                if reply.is_empty() {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                } else {
                    let _ = c.write_all(&reply).await;
                }
            });
            let r = stream_probe(addr, None, Duration::from_millis(300)).await;
            assert!(!r.ok, "{r:?}");
            assert!(r.error.is_some());
        }
    }
}
