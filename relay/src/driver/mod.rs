//! The I/O around the sans-IO server: UDP worker threads, the TCP/TLS shard,
//! and the metrics endpoint. [`Relay::start`] wires them from a [`RelayConfig`].

pub mod metrics;
pub mod stream;
pub mod udp;
pub mod xdp;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::auth::Credentials;
use crate::config::RelayConfig;
use crate::policy::PeerPolicy;
use crate::server::{AltAddress, Metrics, Quotas, Server, ServerConfig};

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    /// Bound UDP addresses (primary first).
    pub udp: Vec<SocketAddr>,
    /// Bound TCP addresses.
    pub tcp: Vec<SocketAddr>,
    /// Bound TLS addresses.
    pub tls: Vec<SocketAddr>,
    /// Bound metrics address.
    pub metrics: Option<SocketAddr>,
    /// Shard metrics (UDP workers, then the stream shard).
    pub shard_metrics: Vec<Arc<Metrics>>,
    /// Shared quotas.
    pub quotas: Arc<Quotas>,
    /// The XDP fast path, when loaded.
    pub xdp: Option<Arc<xdp::Xdp>>,
    stop: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    workers: Vec<std::thread::JoinHandle<()>>,
    stream: Option<stream::StreamShard>,
}

/// The relay's own addresses: every address it listens on or advertises,
/// and every address of this host's interfaces (`interfaces`), whether the
/// relay listens on a wildcard or not — a relayed socket bound to one of
/// them, or to `0.0.0.0`, reaches the host's services on all of them.
fn own_addresses(cfg: &RelayConfig, interfaces: &[IpAddr]) -> Vec<IpAddr> {
    let mut own: Vec<IpAddr> = cfg
        .listen
        .iter()
        .chain(&cfg.tcp_listen)
        .chain(&cfg.tls_listen)
        .chain(cfg.alt_listen.iter())
        .map(|a| a.ip())
        .chain(cfg.external_ip.iter().copied())
        .chain(cfg.relay_ip.iter().copied())
        .chain(interfaces.iter().copied())
        .filter(|ip| !ip.is_unspecified())
        .map(crate::policy::normalize)
        .collect();
    own.sort();
    own.dedup();
    own
}

/// The addresses of this host's network interfaces (`getifaddrs`), read once
/// at start. Addresses added later are not known to the relay.
pub fn interface_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr whose family says its size.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int;
            match family {
                libc::AF_INET => {
                    // SAFETY: the family says this is a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.push(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
                }
                libc::AF_INET6 => {
                    // SAFETY: the family says this is a sockaddr_in6.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Why [`Relay::start`] failed; each message names the config key to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A listener could not be bound.
    #[error("config: `{key}`: cannot bind {addr}: {source} (is another process on that port? pick another address or port)")]
    Bind {
        /// The config key (`listen`, `alt-listen`, `tcp-listen`, `tls-listen`, `metrics`).
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS certificate or key file.
    #[error("config: `{key}`: {path}: {what}")]
    Tls {
        /// `cert` or `key`.
        key: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// No `relay-ip` and nothing to derive one from.
    #[error(
        "config: `relay-ip`: no relay address (give --relay-ip, or listen on a specific address)"
    )]
    NoRelayAddress,
    /// The host's interface addresses could not be listed.
    #[error("cannot list this host's interface addresses (getifaddrs): {0}")]
    Interfaces(std::io::Error),
    /// A socket, thread or runtime resource.
    #[error("{what}: {source} (out of file descriptors or threads? raise LimitNOFILE)")]
    Resources {
        /// What failed.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, StartError> {
    let tls = |k: &'static str, p: &std::path::Path, what: String| StartError::Tls {
        key: k,
        path: p.to_owned(),
        what,
    };
    let open = |k, p: &std::path::Path| {
        std::fs::File::open(p)
            .map(std::io::BufReader::new)
            .map_err(|e| tls(k, p, format!("cannot open: {e}")))
    };
    let certs = rustls_pemfile::certs(&mut open("cert", cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls("cert", cert, format!("not a PEM certificate chain: {e}")))?;
    let key_der = rustls_pemfile::private_key(&mut open("key", key)?)
        .map_err(|e| tls("key", key, format!("cannot read: {e}")))?
        .ok_or_else(|| tls("key", key, "no private key in it".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls("cert", cert, format!("TLS protocol versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| tls("key", key, format!("certificate and key do not match: {e}")))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Loads the XDP fast path when `--xdp` asks for it; `None` (with one log
/// line saying why) when it cannot run, and the relay serves in user space.
fn start_xdp(cfg: &RelayConfig) -> Option<Arc<xdp::Xdp>> {
    if cfg.xdp.is_empty() {
        return None;
    }
    let off = |why: String| {
        tracing::warn!("XDP fast path off: {why}; relaying in user space");
        None
    };
    let addrs: Vec<IpAddr> = cfg
        .listen
        .iter()
        .map(|a| a.ip())
        .chain(cfg.relay_ip.iter().copied())
        .collect();
    if addrs.iter().all(|ip| ip.is_unspecified()) {
        return off("it needs a specific --listen or --relay-ip address (the kernel writes the source address itself), not a wildcard".into());
    }
    let ifaces = if cfg.xdp.iter().any(|i| i == "auto") {
        match xdp::interfaces_of(&addrs) {
            Ok(v) if !v.is_empty() => v,
            Ok(_) => return off(format!("no interface holds {addrs:?} (--xdp auto)")),
            Err(e) => return off(format!("cannot list interfaces: {e}")),
        }
    } else {
        cfg.xdp.clone()
    };
    // The kernel resolves routes for XDP only on interfaces that forward.
    let forwarding = |family: &str, i: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/{family}/conf/{i}/forwarding"))
            .map(|v| v.trim() != "0")
            .unwrap_or(false)
    };
    if let Some(i) = ifaces.iter().find(|i| !forwarding("ipv4", i)) {
        return off(format!("forwarding is off on {i}, and the kernel resolves routes for XDP only where it is on (sysctl -w net.ipv4.conf.{i}.forwarding=1; the firewall's forward policy still decides what else the host routes)"));
    }
    if cfg.relay_ip.iter().any(|ip| ip.is_ipv6()) {
        for i in ifaces.iter().filter(|i| !forwarding("ipv6", i)) {
            tracing::warn!(interface = %i, "IPv6 forwarding is off there: IPv6 channel bindings stay in user space (net.ipv6.conf.{i}.forwarding=1 turns it on, and also stops accepting router advertisements unless accept_ra=2)");
        }
    }
    match xdp::Xdp::load(&ifaces) {
        Ok(x) => {
            tracing::info!(attached = ?x.attached, "XDP fast path on: ChannelData of UDP clients is forwarded in the kernel");
            Some(Arc::new(x))
        }
        Err(e) => off(e.to_string()),
    }
}

impl Relay {
    /// Binds everything and starts serving. Must be called inside a tokio runtime.
    pub async fn start(cfg: &RelayConfig) -> Result<Relay, StartError> {
        let res = |what| move |source| StartError::Resources { what, source };
        let now = Instant::now();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let v4 = cfg.relay_ip.iter().copied().find(|i| i.is_ipv4());
        let v6 = cfg.relay_ip.iter().copied().find(|i| i.is_ipv6());
        // OS randomness enters the cores only here: the nonce secret shared
        // by the shards and each shard's seed (port picks, transaction ids).
        let mut base = ServerConfig::new(
            &cfg.realm,
            v4.or(v6).ok_or(StartError::NoRelayAddress)?,
            now,
            unix,
            rand::random(),
        );
        base.relay_ipv4 = v4;
        base.relay_ipv6 = v6;
        base.external_ipv4 = cfg.external_ip.iter().copied().find(|i| i.is_ipv4());
        base.external_ipv6 = cfg.external_ip.iter().copied().find(|i| i.is_ipv6());
        base.credentials = Credentials {
            users: cfg.users.iter().cloned().collect(),
            rest_secrets: cfg.auth_secrets.clone(),
        };
        let interfaces = interface_addresses().map_err(StartError::Interfaces)?;
        let own = own_addresses(cfg, &interfaces);
        tracing::info!(
            ?own,
            "own addresses: never peers, except live relayed ports"
        );
        base.policy = PeerPolicy::new(cfg.allow_peer.clone(), own);
        base.bandwidth_limit = cfg.bandwidth_limit;
        base.unauth_rate = (cfg.unauth_rate, cfg.unauth_rate * 2.0);
        base.unauth_bytes = (cfg.unauth_bytes, cfg.unauth_bytes.saturating_mul(2));
        base.strict_amplification = cfg.strict_amplification;
        base.relay_ports = cfg.relay_ports;
        base.max_lifetime = std::time::Duration::from_secs(cfg.max_lifetime);
        base.channel_lifetime = std::time::Duration::from_secs(cfg.channel_lifetime);
        base.permission_lifetime = std::time::Duration::from_secs(cfg.permission_lifetime);
        let xdp = start_xdp(cfg);
        base.fast_path = xdp.is_some();
        let quotas = Arc::new(Quotas::new(
            cfg.max_allocations,
            cfg.max_allocations_per_user,
        ));
        let has_stream = !cfg.tcp_listen.is_empty() || !cfg.tls_listen.is_empty();
        let shards = cfg.workers + has_stream as usize;
        let ranges = udp::split_ports(cfg.relay_ports, shards);

        // UDP: bind the primary first (resolving port 0), then the same
        // addresses in every worker with SO_REUSEPORT.
        let mut udp_addrs = Vec::new();
        let mut first_sockets = Vec::new();
        for l in &cfg.listen {
            let s = udp::bind_reuseport(*l).map_err(|source| StartError::Bind {
                key: "listen",
                addr: *l,
                source,
            })?;
            udp_addrs.push(s.local_addr().map_err(res("UDP listener"))?);
            first_sockets.push(s);
        }
        if let Some(alt) = cfg.alt_listen {
            let p = udp_addrs[0];
            let mut extra = vec![alt];
            if alt.ip() != p.ip() && alt.port() != p.port() {
                extra.push(SocketAddr::new(p.ip(), alt.port()));
                extra.push(SocketAddr::new(alt.ip(), p.port()));
            }
            for a in extra {
                let s = udp::bind_reuseport(a).map_err(|source| StartError::Bind {
                    key: "alt-listen",
                    addr: a,
                    source,
                })?;
                udp_addrs.push(s.local_addr().map_err(res("UDP listener"))?);
                first_sockets.push(s);
            }
            base.alt = Some(AltAddress {
                primary: p,
                other: alt,
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut shard_metrics = Vec::new();
        let mut workers = Vec::new();
        let mut first = Some(first_sockets);
        for (w, range) in ranges.iter().take(cfg.workers).enumerate() {
            let sockets = match first.take() {
                Some(s) => s,
                None => udp_addrs
                    .iter()
                    .map(|a| udp::bind_reuseport(*a))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(res("binding worker sockets"))?,
            };
            let mut sc = base.clone();
            sc.port_range = *range;
            let m = Arc::new(Metrics::default());
            shard_metrics.push(m.clone());
            let server = Server::new(sc, quotas.clone(), m, now, rand::random());
            let worker =
                udp::Worker::new(server, sockets, xdp.clone()).map_err(res("UDP worker"))?;
            let stop = stop.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("relay-udp-{w}"))
                    .spawn(move || worker.run(stop))
                    .map_err(res("starting a UDP worker thread"))?,
            );
        }

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tcp_addrs = Vec::new();
        let mut tls_addrs = Vec::new();
        let mut stream = None;
        if has_stream {
            let mut tcp = Vec::new();
            for l in &cfg.tcp_listen {
                let s =
                    tokio::net::TcpListener::bind(l)
                        .await
                        .map_err(|source| StartError::Bind {
                            key: "tcp-listen",
                            addr: *l,
                            source,
                        })?;
                tcp_addrs.push(s.local_addr().map_err(res("TCP listener"))?);
                tcp.push(s);
            }
            let mut tls = Vec::new();
            for l in &cfg.tls_listen {
                let s =
                    tokio::net::TcpListener::bind(l)
                        .await
                        .map_err(|source| StartError::Bind {
                            key: "tls-listen",
                            addr: *l,
                            source,
                        })?;
                tls_addrs.push(s.local_addr().map_err(res("TLS listener"))?);
                tls.push(s);
            }
            let acceptor = match &cfg.tls_files {
                Some((c, k)) => Some(load_tls(c, k)?),
                None => None,
            };
            let mut sc = base.clone();
            sc.port_range = ranges[shards - 1];
            let m = Arc::new(Metrics::default());
            shard_metrics.push(m.clone());
            let server = Server::new(sc, quotas.clone(), m, now, rand::random());
            stream = Some(stream::start(
                server,
                tcp,
                tls,
                acceptor,
                shutdown_rx.clone(),
            ));
        }
        let metrics_addr = match cfg.metrics {
            Some(a) => Some(
                metrics::serve(
                    a,
                    shard_metrics.clone(),
                    quotas.clone(),
                    xdp.clone(),
                    shutdown_rx,
                )
                .await
                .map_err(|source| StartError::Bind {
                    key: "metrics",
                    addr: a,
                    source,
                })?,
            ),
            None => None,
        };
        tracing::info!(udp = ?udp_addrs, tcp = ?tcp_addrs, tls = ?tls_addrs, metrics = ?metrics_addr, workers = cfg.workers, "relay serving");
        Ok(Relay {
            udp: udp_addrs,
            tcp: tcp_addrs,
            tls: tls_addrs,
            metrics: metrics_addr,
            shard_metrics,
            quotas,
            xdp,
            stop,
            shutdown,
            workers,
            stream,
        })
    }

    /// Stops every worker and task and waits for them.
    pub async fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        if let Some(s) = self.stream.take() {
            s.join().await;
        }
        let workers = std::mem::take(&mut self.workers);
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn interface_addresses_include_loopback() {
        let ifs = interface_addresses().expect("getifaddrs");
        assert!(ifs.contains(&IpAddr::from([127, 0, 0, 1])), "{ifs:?}");
    }

    #[test]
    fn a_wildcard_relay_owns_every_interface_address() {
        let cfg = crate::config::Args::parse_from([
            "relay",
            "--listen",
            "0.0.0.0:3478",
            "--relay-ip",
            "0.0.0.0",
            "--user",
            "a:b",
        ])
        .resolve()
        .expect("config");
        let ifs: Vec<IpAddr> = ["192.0.2.2", "2001:db8::2", "::ffff:198.51.100.1"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        let own = own_addresses(&cfg, &ifs);
        assert_eq!(
            own,
            ["192.0.2.2", "198.51.100.1", "2001:db8::2"]
                .iter()
                .map(|s| s.parse::<IpAddr>().expect("ip"))
                .collect::<Vec<_>>()
        );
        let p = PeerPolicy::new(vec!["0.0.0.0/0".parse().expect("net")], own);
        assert!(p.check("192.0.2.2".parse().expect("ip")).is_err());
        assert!(p.check("192.0.2.3".parse().expect("ip")).is_ok());
    }
}
