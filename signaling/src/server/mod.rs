//! The tokio driver of a signaling instance: QUIC and TLS over TCP on the
//! same port number, NATS for a cluster, `/metrics` and `/healthz`.
//!
//! Data flow: transport → [`crate::wire`] frames → registration
//! ([`auth`](crate::auth)) → [`Router`] (sans-IO) → outputs dispatched to
//! per-connection bounded queues or to the NATS publisher. The router lock is
//! held while its outputs are dispatched (non-blocking `try_send`s), so every
//! connection sees events in the order the router produced them.

pub mod metrics;
mod nats;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::auth::{valid_mesh_name, AuthError, MeshAuth, ServerChallenge, EXPORTER_LABEL};
use crate::router::ClusterMsg;
use crate::router::{ConnId, InstanceId, Output, Router, RouterConfig, Subject};
use crate::tls::{Identity, TlsError};
use crate::wire::{
    self, valid_overlay, ClientFrame, ErrorCode, ServerFrame, MAX_CLIENT_FRAME, PROTOCOL_VERSION,
};
use metrics::{Metrics, RouterGauges};

/// Everything a server instance needs. Fields that are `Option` switch a
/// component off when `None`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// UDP (QUIC) and TCP (TLS) listen address; port 0 picks a free port
    /// (the same number for both).
    pub listen: SocketAddr,
    /// Certificate and key.
    pub identity: Identity,
    /// Who may join which mesh.
    pub mesh_auth: MeshAuth,
    /// Routing limits and cluster timings.
    pub router: RouterConfig,
    /// Frames queued per connection before new ones are dropped.
    pub queue_len: usize,
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Most connections from one source (an IPv4 address or an IPv6 /64,
    /// see [`source_key`]) that have not registered yet (one source cannot
    /// hold the server's slots with idle handshakes).
    pub max_pending_per_ip: usize,
    /// Time allowed between connect and registration.
    pub register_timeout: Duration,
    /// A connection that sends nothing for this long is closed (clients ping).
    pub idle_timeout: Duration,
    /// NATS server URL for cluster mode.
    pub nats: Option<String>,
    /// NATS subject prefix (instances sharing it form one cluster).
    pub nats_prefix: String,
    /// HTTP listener for `/metrics` and `/healthz`.
    pub metrics_listen: Option<SocketAddr>,
}

impl ServerConfig {
    /// Defaults around a listen address, identity and mesh admission.
    pub fn new(listen: SocketAddr, identity: Identity, mesh_auth: MeshAuth) -> Self {
        ServerConfig {
            listen,
            identity,
            mesh_auth,
            router: RouterConfig::default(),
            queue_len: 256,
            max_connections: 100_000,
            max_pending_per_ip: 64,
            register_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            nats: None,
            nats_prefix: "wgice.signaling".to_string(),
            metrics_listen: None,
        }
    }
}

/// Starting the server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Binding a socket failed.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Which listener.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// QUIC setup failed.
    #[error("QUIC configuration: {0}")]
    Quic(String),
    /// Connecting to NATS failed.
    #[error("cannot connect to NATS at {url}: {reason} (is nats-server running? check --nats)")]
    Nats {
        /// URL.
        url: String,
        /// Cause.
        reason: String,
    },
}

/// The endpoint's socket with segmentation offload (GSO) hidden from quinn.
/// quinn keeps a per-connection transmit buffer sized for the largest batch
/// it ever sent (up to 10 datagrams); signaling messages are small, and with
/// one datagram per transmit that buffer stays at one MTU. Measured with
/// signaling-bench: about 6 KiB less per connected node.
#[derive(Debug)]
struct NoGso(Arc<dyn quinn::AsyncUdpSocket>);

impl quinn::AsyncUdpSocket for NoGso {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit<'_>) -> std::io::Result<()> {
        self.0.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context<'_>,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

struct ConnHandle {
    tx: mpsc::Sender<Arc<[u8]>>,
    close: watch::Sender<Option<Arc<[u8]>>>,
}

pub(crate) struct Shared {
    router: Mutex<Router>,
    conns: Mutex<HashMap<ConnId, ConnHandle>>,
    pub(crate) metrics: Metrics,
    nats_tx: Option<mpsc::Sender<(Subject, ClusterMsg)>>,
    timer_kick: Notify,
    next_conn: AtomicU64,
    live: AtomicUsize,
    live_zero: Notify,
    /// Connections not registered yet, per source.
    pending: PendingCounts,
    shutting_down: AtomicBool,
    cfg: ServerConfig,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Runs `f` on the router and dispatches its outputs, under the lock.
    pub(crate) fn with_router<R>(&self, f: impl FnOnce(&mut Router) -> R) -> R {
        let mut router = lock(&self.router);
        let before = router.poll_timeout();
        let r = f(&mut router);
        let after = router.poll_timeout();
        let mut conns = None;
        // Presence fans one frame out to many connections: encode it once.
        let mut last: Option<(ServerFrame, Arc<[u8]>)> = None;
        while let Some(out) = router.poll_output() {
            match out {
                Output::Send(c, frame) => {
                    let conns = conns.get_or_insert_with(|| lock(&self.conns));
                    if let Some(h) = conns.get(&c) {
                        if h.tx.capacity() == 0 {
                            // Full queue: drop before paying for the encoding.
                            Metrics::inc(&self.metrics.dropped_queue_full);
                            continue;
                        }
                        let bytes = match &last {
                            Some((f, b)) if *f == frame => b.clone(),
                            _ => {
                                let b: Arc<[u8]> = wire::encode(&frame).into();
                                last = Some((frame, b.clone()));
                                b
                            }
                        };
                        if h.tx.try_send(bytes).is_err() {
                            Metrics::inc(&self.metrics.dropped_queue_full);
                        }
                    }
                }
                Output::Close(c, frame) => {
                    if let ServerFrame::Error {
                        code: ErrorCode::Protocol | ErrorCode::Malformed,
                        ..
                    } = frame
                    {
                        Metrics::inc(&self.metrics.protocol_errors);
                    }
                    let conns = conns.get_or_insert_with(|| lock(&self.conns));
                    if let Some(h) = conns.remove(&c) {
                        h.close.send_replace(Some(wire::encode(&frame).into()));
                    }
                }
                Output::Publish(subject, msg) => {
                    if let Some(tx) = &self.nats_tx {
                        if tx.try_send((subject, msg)).is_err() {
                            Metrics::inc(&self.metrics.cluster_dropped);
                        }
                    }
                }
            }
        }
        drop(conns);
        if after.is_some() && (before.is_none() || after < before) {
            self.timer_kick.notify_one();
        }
        r
    }

    fn render_metrics(&self) -> String {
        let g = {
            let r = lock(&self.router);
            let s = r.stats();
            RouterGauges {
                registered: r.local_members() as u64,
                routed: s.routed,
                undeliverable: s.undeliverable,
                rate_limited: s.rate_limited,
                presence_events: s.presence_events,
            }
        };
        self.metrics.render(&g)
    }
}

/// A bound, not yet running, signaling instance.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    tcp: TcpListener,
    http: Option<TcpListener>,
    nats: Option<nats::Nats>,
    addr: SocketAddr,
}

impl Server {
    /// Binds QUIC and TCP on the same port, the metrics listener, and
    /// connects to NATS when configured.
    pub async fn bind(cfg: ServerConfig) -> Result<Server, ServerError> {
        crate::tls::install_provider();
        let rustls_cfg = cfg.identity.server_config()?;
        let quic_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(rustls_cfg.clone())
            .map_err(|e| ServerError::Quic(e.to_string()))?;
        let mut qcfg = quinn::ServerConfig::with_crypto(Arc::new(quic_crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(0u8.into())
            .max_concurrent_uni_streams(0u8.into())
            // Signaling frames are small: modest windows, no datagrams, no
            // MTU probing, to keep per-connection state small.
            .stream_receive_window((64u32 * 1024).into())
            .receive_window((128u32 * 1024).into())
            .send_window(128 * 1024)
            .datagram_receive_buffer_size(None)
            .mtu_discovery_config(None)
            .max_idle_timeout(Some(
                Duration::from_secs(45)
                    .try_into()
                    .map_err(|_| ServerError::Quic("idle timeout".into()))?,
            ));
        qcfg.transport_config(Arc::new(transport));

        // QUIC and TCP on the same port number; with port 0 retry until the
        // kernel's pick is free for both.
        let mut attempt = 0;
        let (endpoint, tcp, addr) = loop {
            attempt += 1;
            let udp =
                std::net::UdpSocket::bind(cfg.listen).map_err(|source| ServerError::Bind {
                    addr: cfg.listen,
                    what: "QUIC (UDP)",
                    source,
                })?;
            let addr = udp.local_addr().map_err(|source| ServerError::Bind {
                addr: cfg.listen,
                what: "QUIC (UDP)",
                source,
            })?;
            // Room for bursts of handshakes (capped by net.core.rmem_max).
            let sock = socket2::SockRef::from(&udp);
            let _ = sock.set_recv_buffer_size(4 << 20);
            let _ = sock.set_send_buffer_size(4 << 20);
            match TcpListener::bind(addr).await {
                Ok(tcp) => {
                    let runtime = Arc::new(quinn::TokioRuntime);
                    let endpoint = quinn::Runtime::wrap_udp_socket(&*runtime, udp)
                        .and_then(|sock| {
                            quinn::Endpoint::new_with_abstract_socket(
                                quinn::EndpointConfig::default(),
                                Some(qcfg.clone()),
                                Arc::new(NoGso(sock)),
                                runtime,
                            )
                        })
                        .map_err(|source| ServerError::Bind {
                            addr,
                            what: "QUIC (UDP)",
                            source,
                        })?;
                    break (endpoint, tcp, addr);
                }
                Err(_) if cfg.listen.port() == 0 && attempt < 20 => continue,
                Err(source) => {
                    return Err(ServerError::Bind {
                        addr,
                        what: "TLS (TCP)",
                        source,
                    })
                }
            }
        };
        let http = match cfg.metrics_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|source| ServerError::Bind {
                        addr: a,
                        what: "metrics (HTTP)",
                        source,
                    })?,
            ),
            None => None,
        };
        let instance = InstanceId(rand::random());
        let (nats, nats_tx) = match &cfg.nats {
            Some(url) => {
                let (n, tx) = nats::Nats::connect(url, &cfg.nats_prefix, instance).await?;
                (Some(n), Some(tx))
            }
            None => (None, None),
        };
        let shared = Arc::new(Shared {
            router: Mutex::new(Router::new(cfg.router.clone(), instance)),
            conns: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            nats_tx,
            timer_kick: Notify::new(),
            next_conn: AtomicU64::new(1),
            live: AtomicUsize::new(0),
            live_zero: Notify::new(),
            pending: PendingCounts::default(),
            shutting_down: AtomicBool::new(false),
            cfg,
        });
        Ok(Server {
            shared,
            endpoint,
            tcp,
            http,
            nats,
            addr,
        })
    }

    /// The QUIC/TCP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The metrics listener's address.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// SHA-256 fingerprint of the certificate, for clients to pin.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.shared.cfg.identity.fingerprint()
    }

    /// Serves until `shutdown` completes, then closes every connection with
    /// a `shutting_down` error, tells the cluster its nodes left, and returns.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let Server {
            shared,
            endpoint,
            tcp,
            http,
            nats,
            addr,
        } = self;
        info!(%addr, fingerprint = %crate::tls::fingerprint_hex(&shared.cfg.identity.fingerprint()),
              metrics = %metrics::describe(http.as_ref().and_then(|l| l.local_addr().ok())),
              cluster = shared.cfg.nats.is_some(), "signaling listening (QUIC + TLS/TCP)");
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(http) = http {
            let s = shared.clone();
            tasks.spawn(metrics::serve_http(
                http,
                Arc::new(move || s.render_metrics()),
            ));
        }
        let nats_client = nats.as_ref().map(|n| n.client());
        if let Some(n) = nats {
            tasks.spawn(n.run(shared.clone()));
        }
        tasks.spawn(timer(shared.clone()));
        let mut accept = tokio::task::JoinSet::new();
        accept.spawn(accept_quic(shared.clone(), endpoint.clone()));
        accept.spawn(accept_tcp(shared.clone(), tcp));
        shutdown.await;
        info!("shutting down: closing connections");
        // Stop accepting first (this closes the TCP listener), and refuse
        // registrations still in their handshake.
        shared.shutting_down.store(true, Relaxed);
        endpoint.set_server_config(None);
        accept.shutdown().await;
        // Tell the cluster our nodes are gone, then close every connection.
        let ids: Vec<ConnId> = lock(&shared.conns).keys().copied().collect();
        shared.with_router(|r| {
            for c in &ids {
                r.unregister(*c);
            }
        });
        let bye: Arc<[u8]> = wire::encode(&ServerFrame::Error {
            code: ErrorCode::ShuttingDown,
            message: "server shutting down; reconnect".into(),
            fatal: true,
        })
        .into();
        for (_, h) in lock(&shared.conns).drain() {
            h.close.send_replace(Some(bye.clone()));
        }
        // Let the connections deliver their last frame, briefly.
        let drained = async {
            while shared.live.load(Relaxed) > 0 {
                shared.live_zero.notified().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), drained).await;
        // Give the NATS publisher a moment to flush the Offline messages.
        if let Some(tx) = &shared.nats_tx {
            let flushed = async {
                while tx.capacity() < tx.max_capacity() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), flushed).await;
        }
        if let Some(c) = &nats_client {
            let _ = tokio::time::timeout(Duration::from_secs(2), c.flush()).await;
        }
        endpoint.close(0u32.into(), b"shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        tasks.shutdown().await;
        info!("signaling stopped");
    }
}

async fn timer(shared: Arc<Shared>) {
    loop {
        let next = lock(&shared.router).poll_timeout();
        let sleep_to = next
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = tokio::time::sleep_until(sleep_to) => {}
            _ = shared.timer_kick.notified() => continue,
        }
        shared.with_router(|r| r.handle_timeout(Instant::now()));
    }
}

/// The key one source's connections are counted under: an IPv4 address,
/// or the /64 of an IPv6 address (one host or home gets a whole /64, so
/// counting its addresses one by one would count nothing). IPv4-mapped IPv6
/// is the IPv4 address. Same rule as the relay's `policy::source_key`.
pub fn source_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::IpAddr;
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
        v4 => v4,
    }
}

/// Unregistered connections per source key.
#[derive(Debug, Default)]
struct PendingCounts(Mutex<HashMap<std::net::IpAddr, usize>>);

impl PendingCounts {
    /// Counts one more connection from `ip`'s source; false at `max`.
    fn take(&self, ip: std::net::IpAddr, max: usize) -> bool {
        let mut m = lock(&self.0);
        let n = m.entry(source_key(ip)).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives back what [`PendingCounts::take`] counted for `ip`.
    fn give_back(&self, ip: std::net::IpAddr) {
        let key = source_key(ip);
        let mut m = lock(&self.0);
        if let Some(n) = m.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&key);
            }
        }
    }
}

/// A connection that has not registered yet, counted against its source.
struct PendingGuard(Arc<Shared>, std::net::IpAddr);

impl PendingGuard {
    fn new(shared: &Arc<Shared>, ip: std::net::IpAddr) -> Option<Self> {
        if !shared.pending.take(ip, shared.cfg.max_pending_per_ip) {
            debug!(source = %ip, "too many unregistered connections from this source; refused");
            return None;
        }
        Some(PendingGuard(shared.clone(), ip))
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending.give_back(self.1);
    }
}

struct LiveGuard(Arc<Shared>);

impl LiveGuard {
    fn new(shared: &Arc<Shared>) -> Option<Self> {
        let n = shared.live.fetch_add(1, Relaxed);
        if n >= shared.cfg.max_connections {
            shared.live.fetch_sub(1, Relaxed);
            return None;
        }
        shared.metrics.connections.fetch_add(1, Relaxed);
        Some(LiveGuard(shared.clone()))
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.metrics.connections.fetch_sub(1, Relaxed);
        if self.0.live.fetch_sub(1, Relaxed) == 1 {
            self.0.live_zero.notify_waiters();
        }
    }
}

async fn accept_quic(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        // Stateless address validation (QUIC Retry): a spoofed Initial costs
        // one small packet and no connection slot.
        if !incoming.remote_address_validated() {
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
            continue;
        }
        let remote = incoming.remote_address();
        let Some(pending) = PendingGuard::new(&shared, remote.ip()) else {
            Metrics::inc(&shared.metrics.refused_pending);
            incoming.refuse();
            continue;
        };
        let Some(guard) = LiveGuard::new(&shared) else {
            incoming.refuse();
            continue;
        };
        Metrics::inc(&shared.metrics.accepted_quic);
        let shared = shared.clone();
        tokio::spawn(
            async move {
                let _guard = guard;
                let setup = async {
                    let conn = incoming.await?;
                    // We speak first, so we open the stream.
                    let (send, recv) = conn.open_bi().await?;
                    Ok::<_, quinn::ConnectionError>((conn, send, recv))
                };
                let (conn, send, recv) =
                    match tokio::time::timeout(shared.cfg.register_timeout, setup).await {
                        Ok(Ok(x)) => x,
                        Ok(Err(e)) => {
                            debug!("QUIC handshake failed: {e}");
                            return;
                        }
                        Err(_) => return,
                    };
                let mut binding = [0u8; 32];
                if conn
                    .export_keying_material(&mut binding, EXPORTER_LABEL, b"")
                    .is_err()
                {
                    return;
                }
                serve_conn(&shared, recv, send, binding, pending).await;
                // Let the peer read our last frame and close first.
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                conn.close(0u32.into(), b"bye");
            }
            .instrument(info_span!("quic", %remote)),
        );
    }
}

async fn accept_tcp(shared: Arc<Shared>, listener: TcpListener) {
    let acceptor = match shared.cfg.identity.server_config() {
        Ok(c) => tokio_rustls::TlsAcceptor::from(Arc::new(c)),
        Err(e) => {
            warn!("TLS/TCP disabled: {e}");
            return;
        }
    };
    loop {
        let (sock, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("TCP accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(pending) = PendingGuard::new(&shared, remote.ip()) else {
            Metrics::inc(&shared.metrics.refused_pending);
            continue;
        };
        let Some(guard) = LiveGuard::new(&shared) else {
            continue;
        };
        Metrics::inc(&shared.metrics.accepted_tcp);
        let _ = sock.set_nodelay(true);
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(
            async move {
                let _guard = guard;
                serve_tcp(&shared, acceptor, sock, pending).await;
            }
            .instrument(info_span!("tcp", %remote)),
        );
    }
}

async fn serve_tcp(
    shared: &Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    sock: TcpStream,
    pending: PendingGuard,
) {
    let tls = match tokio::time::timeout(shared.cfg.register_timeout, acceptor.accept(sock)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            debug!("TLS handshake failed: {e}");
            return;
        }
        Err(_) => return,
    };
    let binding = match tls
        .get_ref()
        .1
        .export_keying_material([0u8; 32], EXPORTER_LABEL, Some(b""))
    {
        Ok(b) => b,
        Err(_) => return,
    };
    let (rd, wr) = tokio::io::split(tls);
    serve_conn(shared, rd, wr, binding, pending).await;
}

fn fatal(code: ErrorCode, message: impl Into<String>) -> Arc<[u8]> {
    wire::encode(&ServerFrame::Error {
        code,
        message: message.into(),
        fatal: true,
    })
    .into()
}

/// Writes queued frames; on close writes the final frame and shuts down.
async fn writer<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Arc<[u8]>>,
    mut close: watch::Receiver<Option<Arc<[u8]>>>,
    // Dropped when the writer stops, which ends the reader too.
    _alive: tokio::sync::oneshot::Sender<()>,
) {
    const WRITE_TIMEOUT: Duration = Duration::from_secs(20);
    loop {
        tokio::select! {
            biased;
            _ = close.changed() => {
                let last = close.borrow_and_update().clone();
                if let Some(last) = last {
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        wr.write_all(&last).await?;
                        wr.shutdown().await
                    }).await;
                }
                return;
            }
            frame = rx.recv() => {
                let Some(frame) = frame else {
                    let _ = wr.shutdown().await;
                    return;
                };
                let write = async {
                    wr.write_all(&frame).await?;
                    while let Ok(more) = rx.try_recv() {
                        wr.write_all(&more).await?;
                    }
                    wr.flush().await
                };
                match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                    Ok(Ok(())) => {}
                    _ => {
                        debug!("peer not reading for {WRITE_TIMEOUT:?}: closing");
                        return;
                    }
                }
            }
        }
    }
}

/// One connection, from challenge to close.
async fn serve_conn<R, W>(
    shared: &Arc<Shared>,
    rd: R,
    wr: W,
    binding: [u8; 32],
    pending: PendingGuard,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut rd = wire::FrameReader::new(rd, MAX_CLIENT_FRAME);
    let (tx, rx) = mpsc::channel::<Arc<[u8]>>(shared.cfg.queue_len.max(8));
    let (close_tx, close_rx) = watch::channel::<Option<Arc<[u8]>>>(None);
    let mut close_seen = close_rx.clone();
    let (alive_tx, mut writer_gone) = tokio::sync::oneshot::channel::<()>();
    let writer_task = tokio::spawn(writer(wr, rx, close_rx, alive_tx));
    let challenge = ServerChallenge::new();
    let _ = tx.try_send(
        wire::encode(&ServerFrame::Challenge {
            version: PROTOCOL_VERSION,
            server_key: challenge.server_key,
            nonce: challenge.nonce.to_vec(),
        })
        .into(),
    );

    // Registration.
    let first = tokio::time::timeout(shared.cfg.register_timeout, rd.next()).await;
    let registered = match first {
        Err(_) => Err(fatal(ErrorCode::Timeout, "no registration in time")),
        Ok(Ok(None)) | Ok(Err(wire::FrameError::Io(_))) => Err(Arc::from(&[][..])),
        Ok(Err(e)) => {
            Metrics::inc(&shared.metrics.protocol_errors);
            Err(fatal(ErrorCode::Malformed, e.to_string()))
        }
        Ok(Ok(Some(_))) if shared.shutting_down.load(Relaxed) => Err(fatal(
            ErrorCode::ShuttingDown,
            "server shutting down; reconnect",
        )),
        Ok(Ok(Some(bytes))) => check_register(shared, &challenge, &binding, &bytes),
    };
    // Registered or refused: no longer a pending connection of its address.
    drop(pending);
    let (mesh, key, overlay) = match registered {
        Ok(x) => x,
        Err(last) => {
            if !last.is_empty() {
                close_tx.send_replace(Some(last));
            } else {
                drop(close_tx);
            }
            drop(tx);
            let _ = writer_task.await;
            return;
        }
    };
    let conn = ConnId(shared.next_conn.fetch_add(1, Relaxed));
    lock(&shared.conns).insert(
        conn,
        ConnHandle {
            tx: tx.clone(),
            close: close_tx,
        },
    );
    drop(tx);
    debug!(%key, %mesh, ?conn, "registered");
    shared.with_router(|r| r.register(Instant::now(), conn, &mesh, key, overlay));

    // Frames until the peer leaves, misbehaves, or the router closes us.
    loop {
        let read = tokio::select! {
            biased;
            _ = close_seen.changed() => break,
            // A peer that stopped reading (write timeout) is dropped.
            _ = &mut writer_gone => break,
            r = tokio::time::timeout(shared.cfg.idle_timeout, rd.next()) => r,
        };
        let bytes = match read {
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) | Ok(Err(wire::FrameError::Io(_))) => break,
            Ok(Err(e)) => {
                Metrics::inc(&shared.metrics.protocol_errors);
                close_conn(shared, conn, fatal(ErrorCode::Malformed, e.to_string()));
                break;
            }
            Err(_) => {
                close_conn(
                    shared,
                    conn,
                    fatal(
                        ErrorCode::Timeout,
                        "idle: no frame within the idle timeout (send pings)",
                    ),
                );
                break;
            }
        };
        match serde_json::from_slice::<ClientFrame>(&bytes) {
            Ok(frame) => shared.with_router(|r| r.handle_client(Instant::now(), conn, frame)),
            Err(e) => {
                Metrics::inc(&shared.metrics.protocol_errors);
                close_conn(
                    shared,
                    conn,
                    fatal(ErrorCode::Malformed, format!("malformed frame: {e}")),
                );
                break;
            }
        }
    }
    shared.with_router(|r| r.unregister(conn));
    // Dropping our handle (if still present) lets the writer drain and stop.
    lock(&shared.conns).remove(&conn);
    let _ = writer_task.await;
    debug!(%key, "connection closed");
}

fn close_conn(shared: &Shared, conn: ConnId, last: Arc<[u8]>) {
    shared.with_router(|r| r.unregister(conn));
    if let Some(h) = lock(&shared.conns).remove(&conn) {
        h.close.send_replace(Some(last));
    }
}

type Registration = (String, crate::PublicKey, Vec<String>);

fn check_register(
    shared: &Shared,
    challenge: &ServerChallenge,
    binding: &[u8; 32],
    bytes: &[u8],
) -> Result<Registration, Arc<[u8]>> {
    let frame = serde_json::from_slice::<ClientFrame>(bytes).map_err(|e| {
        Metrics::inc(&shared.metrics.protocol_errors);
        fatal(ErrorCode::Malformed, format!("malformed frame: {e}"))
    })?;
    let ClientFrame::Register {
        version,
        mesh,
        token,
        key,
        overlay,
        proof,
    } = frame
    else {
        Metrics::inc(&shared.metrics.protocol_errors);
        return Err(fatal(
            ErrorCode::Protocol,
            "the first frame must be `register`",
        ));
    };
    if version != PROTOCOL_VERSION {
        return Err(fatal(
            ErrorCode::Version,
            format!(
                "protocol version {version} unsupported; this server speaks {PROTOCOL_VERSION}"
            ),
        ));
    }
    if !valid_mesh_name(&mesh) {
        Metrics::inc(&shared.metrics.token_failures);
        return Err(fatal(
            ErrorCode::Forbidden,
            AuthError::BadMeshName(mesh).to_string(),
        ));
    }
    if let Err(e) = valid_overlay(&overlay) {
        Metrics::inc(&shared.metrics.protocol_errors);
        return Err(fatal(ErrorCode::Malformed, e));
    }
    if let Err(e) = challenge.verify(&key, &mesh, binding, &proof) {
        Metrics::inc(&shared.metrics.auth_failures);
        info!(%key, "registration refused: {e}");
        return Err(fatal(ErrorCode::AuthFailed, e.to_string()));
    }
    if let Err(e) = shared.cfg.mesh_auth.check(&mesh, &token) {
        Metrics::inc(&shared.metrics.token_failures);
        info!(%key, "registration refused: {e}");
        return Err(fatal(ErrorCode::Forbidden, e.to_string()));
    }
    Ok((mesh, key, overlay))
}

/// Many nodes need many descriptors: lifts the open-file soft limit to the
/// hard one (used by the `signaling` and `signaling-bench` binaries).
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> std::net::IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn pending_connections_count_an_ipv6_slash64_as_one_source() {
        let p = PendingCounts::default();
        for host in 1..=4 {
            assert!(p.take(ip(&format!("2001:db8:1:2::{host}")), 4));
        }
        assert!(
            !p.take(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), 4),
            "a fifth address of the same /64"
        );
        assert!(p.take(ip("2001:db8:1:3::1"), 4), "another /64");
        for _ in 0..4 {
            assert!(p.take(ip("192.0.2.1"), 4));
        }
        assert!(!p.take(ip("::ffff:192.0.2.1"), 4), "IPv4-mapped is IPv4");
        assert!(p.take(ip("192.0.2.2"), 4), "another IPv4 address");
        for host in 1..=4 {
            p.give_back(ip(&format!("2001:db8:1:2::{host}")));
        }
        assert!(p.take(ip("2001:db8:1:2::99"), 4), "given back");
    }

    #[test]
    fn source_key_masks_ipv6_to_its_slash64() {
        assert_eq!(source_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(source_key(ip("::ffff:203.0.113.9")), ip("203.0.113.9"));
        assert_eq!(source_key(ip("203.0.113.9")), ip("203.0.113.9"));
        assert_eq!(source_key(ip("::1")), ip("::"));
    }
}
