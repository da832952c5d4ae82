//! The agent's side: connect (QUIC, falling back to TLS over TCP), prove the
//! key, join the mesh, send sealed messages, receive events, and keep doing
//! so across disconnects.
//!
//! ```no_run
//! # async fn demo() -> Result<(), signaling::client::ClientError> {
//! use signaling::client::{Client, ClientConfig, Event};
//! use signaling::tls::Trust;
//! use signaling::{PeerMessage, PrivateKey};
//!
//! let key: PrivateKey = "…wg private key…".parse().expect("key");
//! let fingerprint = signaling::tls::parse_fingerprint("…64 hex digits…").expect("fp");
//! let cfg = ClientConfig::new("signal.example.net:4443", Trust::Fingerprint(fingerprint),
//!                             "prod", "mesh-token", key);
//! let mut client = Client::start(cfg)?;
//! while let Some(event) = client.recv().await {
//!     match event {
//!         Event::Online(member) => {
//!             let offer = PeerMessage::Offer { session: 1, ufrag: "u".into(),
//!                                              pwd: "p".into(), candidates: vec![], wg_port: None, cert: None };
//!             client.send(&member.key, &offer).await?;
//!         }
//!         Event::Message { from, message } => { /* feed ICE */ let _ = (from, message); }
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! [`Client`] owns a background task that reconnects with exponential
//! backoff and jitter and registers again; after every (re)connection it
//! emits [`Event::Connected`] and the full member list ([`Event::Members`]),
//! so the agent can re-offer to everyone online. Incoming envelopes are
//! opened and replay-checked before they become [`Event::Message`]s; ones
//! that fail are dropped and logged. [`Session`] is the lower layer (one
//! registered connection, no reconnection) for tools and benchmarks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::auth::{prove, EXPORTER_LABEL};
use crate::keys::{PrivateKey, PublicKey};
use crate::seal::{seal, Opener, PeerMessage};
use crate::tls::{install_provider, TlsError, Trust};
use crate::wire::{
    self, ClientFrame, ErrorCode, Member, ServerFrame, Undeliverable, MAX_SERVER_FRAME,
    PROTOCOL_VERSION,
};

/// Which transport a connection used or may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transport {
    /// QUIC over UDP.
    Quic,
    /// TLS over TCP.
    Tcp,
}

/// Which transports the client tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportMode {
    /// QUIC first, TLS over TCP when QUIC fails (default).
    Auto,
    /// QUIC only.
    QuicOnly,
    /// TLS over TCP only.
    TcpOnly,
}

/// Client settings. Build with [`ClientConfig::new`] and adjust fields.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientConfig {
    /// `host:port` of the signaling server.
    pub server: String,
    /// TLS server name (SNI; checked against the certificate with [`Trust::Roots`]).
    pub server_name: String,
    /// How to trust the server.
    pub trust: Trust,
    /// Mesh to join.
    pub mesh: String,
    /// Mesh token.
    pub token: String,
    /// The node's WireGuard private key.
    pub private_key: PrivateKey,
    /// Overlay addresses advertised to the mesh.
    pub overlay: Vec<String>,
    /// Transports to try.
    pub transport: TransportMode,
    /// Time allowed for one connection attempt (handshake + registration).
    pub connect_timeout: Duration,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Keep-alive ping period (the server closes silent connections).
    pub ping_interval: Duration,
    /// Events buffered for the application before the client stops reading.
    pub event_queue: usize,
}

impl ClientConfig {
    /// Defaults around the essentials.
    pub fn new(
        server: impl Into<String>,
        trust: Trust,
        mesh: impl Into<String>,
        token: impl Into<String>,
        private_key: PrivateKey,
    ) -> Self {
        ClientConfig {
            server: server.into(),
            server_name: "wgice-signaling".into(),
            trust,
            mesh: mesh.into(),
            token: token.into(),
            private_key,
            overlay: Vec::new(),
            transport: TransportMode::Auto,
            connect_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            ping_interval: Duration::from_secs(30),
            event_queue: 1024,
        }
    }
}

/// What the client tells the agent.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// Registered (again) over `transport`. A `Members` event follows.
    Connected {
        /// Transport in use.
        transport: Transport,
    },
    /// The connection is gone; the client is reconnecting.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// The full list of other online members (after connecting or on request).
    Members(Vec<Member>),
    /// A member came online or changed its overlay addresses.
    Online(Member),
    /// A member went away.
    Offline(PublicKey),
    /// An authentic, fresh message from a peer.
    Message {
        /// Sender (authenticated by the seal).
        from: PublicKey,
        /// Content.
        message: PeerMessage,
    },
    /// A message we sent did not reach its recipient.
    Undeliverable {
        /// Recipient.
        to: PublicKey,
        /// Why.
        reason: Undeliverable,
    },
    /// The server reported a non-fatal error (e.g. rate limiting).
    ServerError {
        /// Code.
        code: ErrorCode,
        /// Explanation.
        message: String,
    },
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Not connected right now; retry after the next `Connected` event.
    #[error("not connected to the signaling server")]
    NotConnected,
    /// The client task has stopped.
    #[error("signaling client stopped")]
    Stopped,
    /// The outgoing queue is full (the connection is not draining).
    #[error("signaling send queue is full")]
    QueueFull,
    /// TLS configuration problem.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Sealing failed (bad recipient key).
    #[error(transparent)]
    Seal(#[from] crate::seal::SealError),
    /// Could not resolve or reach the server.
    #[error("cannot reach {server}: {reason}")]
    Connect {
        /// Server.
        server: String,
        /// Cause.
        reason: String,
    },
    /// The server refused us.
    #[error("server refused registration ({code:?}): {message}")]
    Refused {
        /// Code.
        code: ErrorCode,
        /// Explanation.
        message: String,
    },
    /// The server broke the protocol or the connection broke.
    #[error("protocol: {0}")]
    Protocol(String),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// One registered connection (no reconnection). Most agents want [`Client`].
pub struct Session {
    rd: wire::FrameReader<Reader>,
    wr: Writer,
    quic: Option<quinn::Connection>,
    /// Transport used.
    pub transport: Transport,
    /// Members online when we registered.
    pub members: Vec<Member>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

/// Prepared TLS/QUIC configuration for [`Session::connect`].
#[derive(Clone, Debug)]
pub struct Connector {
    tls: Arc<rustls::ClientConfig>,
    quic: quinn::ClientConfig,
    tcp_source: Option<std::net::IpAddr>,
}

impl Connector {
    /// Builds client TLS and QUIC configurations for `trust`.
    pub fn new(trust: &Trust) -> Result<Self, ClientError> {
        install_provider();
        let tls = trust.client_config()?;
        let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls.clone())
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut quic = quinn::ClientConfig::new(Arc::new(qc));
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(Duration::from_secs(15)))
            .max_idle_timeout(Duration::from_secs(45).try_into().ok())
            .max_concurrent_bidi_streams(1u8.into())
            .max_concurrent_uni_streams(0u8.into())
            .stream_receive_window((1024u32 * 1024).into())
            .datagram_receive_buffer_size(None);
        quic.transport_config(Arc::new(t));
        Ok(Connector {
            tls: Arc::new(tls),
            quic,
            tcp_source: None,
        })
    }

    /// TLS/TCP connections leave from `source` (any port) instead of the
    /// address the route picks. Benchmarks use it to spread their nodes over
    /// several loopback addresses, since the server limits pending
    /// connections per source address.
    #[must_use]
    pub fn with_tcp_source(mut self, source: std::net::IpAddr) -> Self {
        self.tcp_source = Some(source);
        self
    }

    /// A QUIC client endpoint suited to `server` (one can serve many sessions).
    pub fn endpoint_for(server: SocketAddr) -> Result<quinn::Endpoint, ClientError> {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        Self::endpoint_on(bind)
    }

    /// A QUIC client endpoint whose UDP socket is bound to `local`.
    pub fn endpoint_on(local: SocketAddr) -> Result<quinn::Endpoint, ClientError> {
        let bind = local;
        let err = |e: std::io::Error| ClientError::Connect {
            server: local.to_string(),
            reason: format!("QUIC endpoint on {local}: {e}"),
        };
        let udp = std::net::UdpSocket::bind(bind).map_err(err)?;
        let _ = socket2::SockRef::from(&udp).set_recv_buffer_size(1 << 20);
        let runtime = quinn::default_runtime()
            .ok_or_else(|| err(std::io::Error::other("no async runtime")))?;
        quinn::Endpoint::new(quinn::EndpointConfig::default(), None, udp, runtime).map_err(err)
    }
}

impl Session {
    /// Connects over `transport` to `server`, proves the key and registers.
    /// QUIC uses `endpoint` (see [`Connector::endpoint_for`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        connector: &Connector,
        endpoint: Option<&quinn::Endpoint>,
        transport: Transport,
        server: SocketAddr,
        server_name: &str,
        key: &PrivateKey,
        mesh: &str,
        token: &str,
        overlay: &[String],
    ) -> Result<Session, ClientError> {
        let connect_err = |reason: String| ClientError::Connect {
            server: server.to_string(),
            reason,
        };
        let (rd, wr, quic, binding): (Reader, Writer, _, [u8; 32]) = match transport {
            Transport::Quic => {
                let ep = endpoint.ok_or_else(|| connect_err("no QUIC endpoint".into()))?;
                let conn = ep
                    .connect_with(connector.quic.clone(), server, server_name)
                    .map_err(|e| connect_err(e.to_string()))?
                    .await
                    .map_err(|e| connect_err(format!("QUIC: {e}")))?;
                // The server opens the stream (it speaks first).
                let (send, recv) = conn
                    .accept_bi()
                    .await
                    .map_err(|e| connect_err(format!("QUIC: {e}")))?;
                let mut binding = [0u8; 32];
                conn.export_keying_material(&mut binding, EXPORTER_LABEL, b"")
                    .map_err(|_| connect_err("QUIC exporter unavailable".into()))?;
                (Box::new(recv), Box::new(send), Some(conn), binding)
            }
            Transport::Tcp => {
                let sock = match connector.tcp_source {
                    None => tokio::net::TcpStream::connect(server).await,
                    Some(source) => {
                        let s = if source.is_ipv4() {
                            tokio::net::TcpSocket::new_v4()
                        } else {
                            tokio::net::TcpSocket::new_v6()
                        };
                        match s.and_then(|s| s.bind(SocketAddr::new(source, 0)).map(|()| s)) {
                            Ok(s) => s.connect(server).await,
                            Err(e) => Err(e),
                        }
                    }
                }
                .map_err(|e| connect_err(format!("TCP: {e}")))?;
                let _ = sock.set_nodelay(true);
                let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
                    .map_err(|e| connect_err(format!("server name: {e}")))?;
                let tls = tokio_rustls::TlsConnector::from(connector.tls.clone())
                    .connect(name, sock)
                    .await
                    .map_err(|e| connect_err(format!("TLS: {e}")))?;
                let binding = tls
                    .get_ref()
                    .1
                    .export_keying_material([0u8; 32], EXPORTER_LABEL, Some(b""))
                    .map_err(|e| connect_err(format!("TLS exporter: {e}")))?;
                let (rd, wr) = tokio::io::split(tls);
                (Box::new(rd), Box::new(wr), None, binding)
            }
        };
        let mut s = Session {
            rd: wire::FrameReader::new(rd, MAX_SERVER_FRAME),
            wr,
            quic,
            transport,
            members: Vec::new(),
        };
        let (server_key, nonce) = match s.recv().await? {
            Some(ServerFrame::Challenge {
                version,
                server_key,
                nonce,
            }) if version == PROTOCOL_VERSION => (server_key, nonce),
            Some(ServerFrame::Challenge { version, .. }) => {
                return Err(ClientError::Protocol(format!(
                    "server speaks protocol {version}, we speak {PROTOCOL_VERSION}"
                )))
            }
            other => return Err(unexpected(other)),
        };
        let proof = prove(key, &server_key, &nonce, &binding, mesh)
            .ok_or_else(|| ClientError::Protocol("server sent an unusable key".into()))?;
        s.send(&ClientFrame::Register {
            version: PROTOCOL_VERSION,
            mesh: mesh.to_string(),
            token: token.to_string(),
            key: key.public_key(),
            overlay: overlay.to_vec(),
            proof: proof.to_vec(),
        })
        .await?;
        match s.recv().await? {
            Some(ServerFrame::Registered { .. }) => {}
            other => return Err(unexpected(other)),
        }
        loop {
            match s.recv().await? {
                Some(ServerFrame::Members { members, done }) => {
                    s.members.extend(members);
                    if done {
                        break;
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
        Ok(s)
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        self.send_raw(&wire::encode(frame)).await
    }

    /// Sends pre-encoded frame bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.wr
            .write_all(bytes)
            .await
            .map_err(|e| ClientError::Protocol(format!("write: {e}")))?;
        self.wr
            .flush()
            .await
            .map_err(|e| ClientError::Protocol(format!("write: {e}")))
    }

    /// Receives one frame; `None` when the server closed the stream.
    /// Cancel-safe.
    pub async fn recv(&mut self) -> Result<Option<ServerFrame>, ClientError> {
        match self.rd.next().await {
            Ok(Some(b)) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| ClientError::Protocol(format!("bad frame from server: {e}"))),
            Ok(None) => Ok(None),
            Err(e) => Err(ClientError::Protocol(e.to_string())),
        }
    }

    /// Closes the connection.
    pub async fn close(mut self) {
        let _ = self.wr.shutdown().await;
        if let Some(q) = self.quic.take() {
            q.close(0u32.into(), b"bye");
        }
    }
}

fn unexpected(frame: Option<ServerFrame>) -> ClientError {
    match frame {
        Some(ServerFrame::Error { code, message, .. }) => ClientError::Refused { code, message },
        Some(f) => ClientError::Protocol(format!("unexpected frame {f:?}")),
        None => ClientError::Protocol("server closed the connection".into()),
    }
}

/// Aborts the task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A self-healing signaling connection for one node. See the module doc.
#[derive(Debug)]
pub struct Client {
    key: PrivateKey,
    frames: mpsc::Sender<Vec<u8>>,
    events: mpsc::Receiver<Event>,
    connected: Arc<AtomicBool>,
    _task: AbortOnDrop,
}

impl Client {
    /// Validates `cfg` and starts connecting in the background. Must be
    /// called inside a tokio runtime.
    pub fn start(cfg: ClientConfig) -> Result<Client, ClientError> {
        wire::valid_overlay(&cfg.overlay).map_err(ClientError::Protocol)?;
        let connector = Connector::new(&cfg.trust)?;
        let (frames_tx, frames_rx) = mpsc::channel(256);
        let (events_tx, events_rx) = mpsc::channel(cfg.event_queue.max(16));
        let connected = Arc::new(AtomicBool::new(false));
        let key = cfg.private_key.clone();
        let task = tokio::spawn(run(cfg, connector, frames_rx, events_tx, connected.clone()));
        Ok(Client {
            key,
            frames: frames_tx,
            events: events_rx,
            connected,
            _task: AbortOnDrop(task),
        })
    }

    /// Our public key.
    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// Whether a registered connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Relaxed)
    }

    /// Seals `message` for `to` and queues it. Fails with
    /// [`ClientError::NotConnected`] while reconnecting (re-offer on the next
    /// `Connected`/`Online` event instead of queueing stale candidates).
    pub async fn send(&self, to: &PublicKey, message: &PeerMessage) -> Result<(), ClientError> {
        if !self.is_connected() {
            return Err(ClientError::NotConnected);
        }
        let envelope = seal(&self.key, to, now_ms(), message)?;
        self.frames
            .send(wire::encode(&ClientFrame::Send { envelope }))
            .await
            .map_err(|_| ClientError::Stopped)
    }

    /// Like [`Client::send`] but never waits: fails with
    /// [`ClientError::QueueFull`] when the connection is not draining (a
    /// caller with a data path to serve must not block on signaling).
    pub fn try_send(&self, to: &PublicKey, message: &PeerMessage) -> Result<(), ClientError> {
        if !self.is_connected() {
            return Err(ClientError::NotConnected);
        }
        let envelope = seal(&self.key, to, now_ms(), message)?;
        self.frames
            .try_send(wire::encode(&ClientFrame::Send { envelope }))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => ClientError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => ClientError::Stopped,
            })
    }

    /// Asks for the member list again (answered by [`Event::Members`]).
    pub async fn request_members(&self) -> Result<(), ClientError> {
        if !self.is_connected() {
            return Err(ClientError::NotConnected);
        }
        self.frames
            .send(wire::encode(&ClientFrame::ListMembers))
            .await
            .map_err(|_| ClientError::Stopped)
    }

    /// Next event; `None` only if the background task died.
    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

/// Backoff before attempt `n` (1-based): exponential, capped, with "equal
/// jitter" (uniform in the upper half) so a fleet doesn't reconnect in step.
pub fn backoff(n: u32, min: Duration, max: Duration) -> Duration {
    let exp = min.saturating_mul(1u32 << n.saturating_sub(1).min(16));
    let d = exp.min(max);
    let half = d / 2;
    half + half.mul_f64(rand::random::<f64>())
}

async fn resolve(server: &str) -> Result<SocketAddr, ClientError> {
    tokio::net::lookup_host(server)
        .await
        .map_err(|e| ClientError::Connect {
            server: server.to_string(),
            reason: e.to_string(),
        })?
        .next()
        .ok_or_else(|| ClientError::Connect {
            server: server.to_string(),
            reason: "no address".into(),
        })
}

async fn establish(
    cfg: &ClientConfig,
    connector: &Connector,
    endpoint: &mut Option<quinn::Endpoint>,
    prefer_tcp_until: &mut Option<Instant>,
) -> Result<Session, ClientError> {
    let addr = resolve(&cfg.server).await?;
    let attempt = |transport: Transport, ep: Option<quinn::Endpoint>, limit: Duration| {
        let fut = async move {
            Session::connect(
                connector,
                ep.as_ref(),
                transport,
                addr,
                &cfg.server_name,
                &cfg.private_key,
                &cfg.mesh,
                &cfg.token,
                &cfg.overlay,
            )
            .await
        };
        async move {
            tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
                Err(ClientError::Connect {
                    server: cfg.server.clone(),
                    reason: format!("{transport:?} attempt timed out"),
                })
            })
        }
    };
    let full = cfg.connect_timeout;
    // With TLS over TCP to fall back on, QUIC gets less: a handshake that
    // has not finished after one lost first flight (quinn's first PTO is
    // about 1 s) is more likely blocked than slow, and a node behind a
    // UDP-blocking firewall should not wait the whole timeout first.
    let quic_limit = match cfg.transport {
        TransportMode::Auto => full.min(QUIC_AUTO_TIMEOUT),
        _ => full,
    };
    let quic_attempt = async |endpoint: &mut Option<quinn::Endpoint>| {
        if endpoint.is_none() {
            *endpoint = Some(Connector::endpoint_for(addr)?);
        }
        attempt(Transport::Quic, endpoint.clone(), quic_limit).await
    };
    match cfg.transport {
        TransportMode::QuicOnly => quic_attempt(endpoint).await,
        TransportMode::TcpOnly => attempt(Transport::Tcp, None, full).await,
        // QUIC failed recently but TCP worked: UDP is probably blocked, so
        // don't spend a QUIC timeout on every reconnect for a while.
        TransportMode::Auto if prefer_tcp_until.is_some_and(|t| Instant::now() < t) => {
            match attempt(Transport::Tcp, None, full).await {
                Ok(s) => Ok(s),
                Err(e @ ClientError::Refused { .. }) => Err(e),
                Err(_) => quic_attempt(endpoint).await,
            }
        }
        TransportMode::Auto => match quic_attempt(endpoint).await {
            Ok(s) => Ok(s),
            // A refusal is the server's answer, not a transport problem.
            Err(e @ ClientError::Refused { .. }) => Err(e),
            Err(e) => {
                debug!("QUIC failed ({e}); trying TLS over TCP");
                let s = attempt(Transport::Tcp, None, full).await?;
                *prefer_tcp_until = Some(Instant::now() + PREFER_TCP_FOR);
                Ok(s)
            }
        },
    }
}

/// In `auto` mode a QUIC connection attempt is given up after this (then
/// TLS over TCP is tried), unless `connect_timeout` is shorter.
pub const QUIC_AUTO_TIMEOUT: Duration = Duration::from_secs(2);

/// After QUIC failed and TLS/TCP worked, reconnects try TCP first this long.
const PREFER_TCP_FOR: Duration = Duration::from_secs(300);

async fn run(
    cfg: ClientConfig,
    connector: Connector,
    mut frames: mpsc::Receiver<Vec<u8>>,
    events: mpsc::Sender<Event>,
    connected: Arc<AtomicBool>,
) {
    let mut opener = Opener::new(cfg.private_key.clone());
    let mut endpoint = None;
    let mut prefer_tcp_until = None;
    let mut failures: u32 = 0;
    loop {
        let reason = match establish(&cfg, &connector, &mut endpoint, &mut prefer_tcp_until).await {
            Ok(mut s) => {
                failures = 0;
                info!(transport = ?s.transport, members = s.members.len(), "signaling connected");
                connected.store(true, Relaxed);
                let members = std::mem::take(&mut s.members);
                if events
                    .send(Event::Connected {
                        transport: s.transport,
                    })
                    .await
                    .is_err()
                    || events.send(Event::Members(members)).await.is_err()
                {
                    return;
                }
                let reason = serve(&cfg, s, &mut frames, &events, &mut opener).await;
                connected.store(false, Relaxed);
                match reason {
                    Some(r) => r,
                    None => return, // application gone
                }
            }
            Err(e) => e.to_string(),
        };
        warn!("signaling disconnected: {reason}");
        if events.send(Event::Disconnected { reason }).await.is_err() {
            return;
        }
        failures += 1;
        tokio::time::sleep(backoff(failures, cfg.backoff_min, cfg.backoff_max)).await;
    }
}

/// Runs a session; `Some(reason)` when it ends, `None` if the app is gone.
async fn serve(
    cfg: &ClientConfig,
    s: Session,
    frames: &mut mpsc::Receiver<Vec<u8>>,
    events: &mpsc::Sender<Event>,
    opener: &mut Opener,
) -> Option<String> {
    let mut ping = tokio::time::interval(cfg.ping_interval);
    ping.tick().await;
    let mut ping_id = 0u64;
    let Session {
        mut rd,
        mut wr,
        quic,
        ..
    } = s;
    let reason = loop {
        tokio::select! {
            frame = rd.next() => {
                let frame = match frame {
                    Ok(Some(b)) => match serde_json::from_slice::<ServerFrame>(&b) {
                        Ok(f) => f,
                        Err(e) => break format!("bad frame from server: {e}"),
                    },
                    Ok(None) => break "server closed the connection".to_string(),
                    Err(e) => break e.to_string(),
                };
                let event = match frame {
                    ServerFrame::Message { envelope } => match opener.open(now_ms(), &envelope) {
                        Ok(message) => Event::Message { from: envelope.from, message },
                        Err(e) => {
                            warn!(from = %envelope.from, "dropped envelope: {e}");
                            continue;
                        }
                    },
                    ServerFrame::Online { member } => Event::Online(member),
                    ServerFrame::Offline { key } => Event::Offline(key),
                    ServerFrame::Members { members, .. } => Event::Members(members),
                    ServerFrame::Undeliverable { to, reason } => Event::Undeliverable { to, reason },
                    ServerFrame::Pong { .. } => continue,
                    ServerFrame::Error { code, message, fatal: true } => {
                        break format!("server closed the connection ({code:?}): {message}")
                    }
                    ServerFrame::Error { code, message, .. } => Event::ServerError { code, message },
                    other => break format!("unexpected frame {other:?}"),
                };
                if events.send(event).await.is_err() {
                    return None;
                }
            }
            out = frames.recv() => {
                let bytes = out?;
                if let Err(e) = async { wr.write_all(&bytes).await?; wr.flush().await }.await {
                    break format!("write: {e}");
                }
            }
            _ = ping.tick() => {
                ping_id += 1;
                let bytes = wire::encode(&ClientFrame::Ping { id: ping_id });
                if let Err(e) = async { wr.write_all(&bytes).await?; wr.flush().await }.await {
                    break format!("write: {e}");
                }
            }
        }
    };
    let _ = wr.shutdown().await;
    if let Some(q) = quic {
        q.close(0u32.into(), b"bye");
    }
    Some(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for n in 1..40 {
            let d = backoff(n, min, max);
            let cap = min.saturating_mul(1 << (n - 1).min(16)).min(max);
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {n}: {d:?} vs cap {cap:?}"
            );
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(5, min, max)).collect();
        assert!(samples.len() > 1, "no jitter");
    }
}
