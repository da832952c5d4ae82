//! The tokio side of TURN over TCP/TLS: one task per relay stream that
//! connects, reads into a [`Framer`] and writes what is queued.
//!
//! [`Streams`] is held by the main loop: it opens and closes connections
//! when the agent asks ([`crate::agent::Output::RelayConnect`] /
//! `RelayClose`) and turns what the tasks report into
//! [`StreamEvent`]s and frames for the agent. [`Table`] is the one place
//! where the agent's sends and both data planes find a relay's stream:
//! anything sent "to" a relay that is reached over a stream goes on it,
//! padded for the stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{frame_for_stream, Framer, Transport, MAX_PUSH};
use crate::agent::{RelayPath, StreamEvent};
use crate::config::{Relay, RelayTrust};

/// TCP connect (and TLS handshake) must finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Writes queued per stream (each a batch of frames); beyond it, sends are
/// dropped as a full UDP socket would drop them.
const QUEUE: usize = 512;
/// Where Debian-like systems keep the system's trusted roots (used for a
/// `turns:` relay with neither `pin_sha256` nor `ca_file`).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The open streams by relay, shared with the data plane.
#[derive(Debug, Clone, Default)]
pub struct Table(Arc<TableInner>);

#[derive(Debug, Default)]
struct TableInner {
    /// Streams open: while 0 (UDP everywhere), the per-packet check is one
    /// relaxed load, no lock.
    open: AtomicUsize,
    map: RwLock<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
}

impl Table {
    /// Whether `server` is reached over a stream now.
    pub fn has(&self, server: SocketAddr) -> bool {
        self.0.open.load(Ordering::Relaxed) > 0
            && self.0.map.read().is_ok_and(|t| t.contains_key(&server))
    }

    /// Queues frames as a relay datagram would carry them (STUN, or
    /// ChannelData without padding) on `server`'s stream. `false`: there is
    /// no stream to `server` (send over UDP).
    pub fn send<'a>(&self, server: SocketAddr, frames: impl IntoIterator<Item = &'a [u8]>) -> bool {
        if self.0.open.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let Ok(t) = self.0.map.read() else {
            return false;
        };
        let Some(tx) = t.get(&server) else {
            return false;
        };
        let mut out = Vec::new();
        for f in frames {
            frame_for_stream(&mut out, f);
        }
        if !out.is_empty() {
            // Full: dropped, like a datagram on a full socket.
            let _ = tx.try_send(out);
        }
        true
    }

    /// Queues bytes already framed for a stream ([`frame_for_stream`]).
    /// `false`: there is no stream to `server`.
    pub fn send_stream(&self, server: SocketAddr, bytes: Vec<u8>) -> bool {
        let Ok(t) = self.0.map.read() else {
            return false;
        };
        let Some(tx) = t.get(&server) else {
            return false;
        };
        if !bytes.is_empty() {
            let _ = tx.try_send(bytes);
        }
        true
    }

    fn set(&self, server: SocketAddr, tx: Option<mpsc::Sender<Vec<u8>>>) {
        if let Ok(mut t) = self.0.map.write() {
            match tx {
                Some(tx) => t.insert(server, tx),
                None => t.remove(&server),
            };
            self.0.open.store(t.len(), Ordering::Relaxed);
        }
    }
}

/// TLS settings for one relay: client config and server name (SNI, from
/// the URL's host).
#[derive(Debug, Clone)]
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl Tls {
    /// From the relay's config: its `pin_sha256`, else its `ca_file`, else
    /// the system's roots. rustls 0.23 with ring, ALPN `stun.turn` (RFC 7443).
    pub fn for_relay(r: &Relay) -> Result<Tls, String> {
        signaling::tls::install_provider();
        let name = ServerName::try_from(r.host.clone())
            .map_err(|e| format!("{:?} is not a TLS server name: {e}", r.host))?;
        let trust = match &r.tls_trust {
            Some(RelayTrust::Pin(fp)) => signaling::tls::Trust::Fingerprint(*fp),
            Some(RelayTrust::CaFile(p)) => {
                signaling::tls::Trust::ca_file(p).map_err(|e| format!("ca_file: {e}"))?
            }
            None => {
                signaling::tls::Trust::ca_file(std::path::Path::new(SYSTEM_ROOTS)).map_err(|e| {
                    format!("no pin_sha256 or ca_file, and the system roots cannot be read: {e}")
                })?
            }
        };
        let mut config = trust.client_config().map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"stun.turn".to_vec()];
        Ok(Tls {
            config: Arc::new(config),
            name,
        })
    }
}

/// What a stream task reports.
#[derive(Debug)]
enum Report {
    Connected(mpsc::Sender<Vec<u8>>),
    Frames(Vec<Vec<u8>>),
    Closed(String),
}

/// One report, tagged with its connection.
#[derive(Debug)]
pub struct Input {
    server: SocketAddr,
    id: u64,
    report: Report,
}

/// What the main loop hands the agent for one [`Input`].
#[derive(Debug)]
pub enum Delivery {
    /// A stream event.
    Event(SocketAddr, StreamEvent),
    /// Whole frames from the relay.
    Frames(SocketAddr, Vec<Vec<u8>>),
}

/// The main loop's streams: open connections by relay, and their reports.
#[derive(Debug)]
pub struct Streams {
    /// Shared with the data plane.
    pub table: Table,
    /// TLS settings by relay.
    tls: HashMap<SocketAddr, Result<Tls, String>>,
    conns: HashMap<SocketAddr, (u64, JoinHandle<()>)>,
    next_id: u64,
    tx: mpsc::Sender<Input>,
    /// Reports from the tasks; give each to [`Streams::accept`].
    pub rx: mpsc::Receiver<Input>,
}

impl Streams {
    /// No streams yet.
    pub fn new(table: Table) -> Streams {
        let (tx, rx) = mpsc::channel(1024);
        Streams {
            table,
            tls: HashMap::new(),
            conns: HashMap::new(),
            next_id: 1,
            tx,
            rx,
        }
    }

    /// The TLS settings to use for `server` (or why there are none).
    pub fn set_tls(&mut self, server: SocketAddr, tls: Result<Tls, String>) {
        self.tls.insert(server, tls);
    }

    /// Opens a stream to `server` at `path`, closing any earlier one.
    pub fn connect(&mut self, server: SocketAddr, path: RelayPath) {
        self.close(server);
        let id = self.next_id;
        self.next_id += 1;
        let tls = match path.transport {
            Transport::Tls => Some(
                self.tls
                    .get(&server)
                    .cloned()
                    .unwrap_or_else(|| Err("no TLS settings for this relay".to_owned())),
            ),
            _ => None,
        };
        let tx = self.tx.clone();
        let task = tokio::spawn(run(server, id, path.addr, tls, tx));
        self.conns.insert(server, (id, task));
    }

    /// Closes the stream to `server`, if any.
    pub fn close(&mut self, server: SocketAddr) {
        if let Some((_, task)) = self.conns.remove(&server) {
            task.abort();
        }
        self.table.set(server, None);
    }

    /// A report from a task: what to hand the agent (`None` for reports of
    /// connections closed since).
    pub fn accept(&mut self, input: Input) -> Option<Delivery> {
        let current = self.conns.get(&input.server).map(|c| c.0);
        if current != Some(input.id) {
            return None;
        }
        let server = input.server;
        Some(match input.report {
            Report::Connected(tx) => {
                self.table.set(server, Some(tx));
                Delivery::Event(server, StreamEvent::Connected)
            }
            Report::Frames(f) => Delivery::Frames(server, f),
            Report::Closed(why) => {
                self.conns.remove(&server);
                self.table.set(server, None);
                Delivery::Event(server, StreamEvent::Closed(why))
            }
        })
    }

    /// Closes every stream.
    pub fn close_all(&mut self) {
        let servers: Vec<SocketAddr> = self.conns.keys().copied().collect();
        for s in servers {
            self.close(s);
        }
    }
}

/// One connection: connect, then pump both ways until either side ends.
async fn run(
    server: SocketAddr,
    id: u64,
    addr: SocketAddr,
    tls: Option<Result<Tls, String>>,
    tx: mpsc::Sender<Input>,
) {
    let report = |report| Input { server, id, report };
    let connect = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        Ok::<_, String>(tcp)
    };
    let why = match tls {
        None => match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(tcp)) => pump(tcp, &tx, &report).await,
            Ok(Err(e)) => e,
            Err(_) => format!("no connection within {CONNECT_TIMEOUT:?}"),
        },
        Some(Err(e)) => format!("TLS: {e}"),
        Some(Ok(t)) => {
            let handshake = async {
                let tcp = connect.await?;
                tokio_rustls::TlsConnector::from(t.config)
                    .connect(t.name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
                Ok(Ok(s)) => pump(s, &tx, &report).await,
                Ok(Err(e)) => e,
                Err(_) => format!("no TLS connection within {CONNECT_TIMEOUT:?}"),
            }
        }
    };
    let _ = tx.send(report(Report::Closed(why))).await;
}

/// Reads frames to the main loop and writes what is queued; returns why
/// it stopped.
async fn pump<S: AsyncRead + AsyncWrite + Send + 'static>(
    s: S,
    tx: &mpsc::Sender<Input>,
    report: &impl Fn(Report) -> Input,
) -> String {
    let (mut rd, mut wr) = tokio::io::split(s);
    let (wtx, mut wrx) = mpsc::channel::<Vec<u8>>(QUEUE);
    if tx.send(report(Report::Connected(wtx))).await.is_err() {
        return "agent stopping".into();
    }
    let writer = async {
        while let Some(mut buf) = wrx.recv().await {
            // Join what else is queued into one write (one TLS record run).
            while buf.len() < MAX_PUSH {
                match wrx.try_recv() {
                    Ok(more) => buf.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            if let Err(e) = wr.write_all(&buf).await {
                return format!("write: {e}");
            }
        }
        "closed by the agent".to_owned()
    };
    let reader = async {
        let mut framer = Framer::new();
        let mut chunk = vec![0u8; MAX_PUSH];
        loop {
            let n = match rd.read(&mut chunk).await {
                Ok(0) => return "the relay closed the connection".to_owned(),
                Ok(n) => n,
                Err(e) => return format!("read: {e}"),
            };
            if let Err(e) = framer.push(&chunk[..n]) {
                return e.to_string();
            }
            let mut frames = Vec::new();
            loop {
                match framer.next_frame() {
                    Ok(Some(f)) => frames.push(f.to_vec()),
                    Ok(None) => break,
                    Err(e) => return e.to_string(),
                }
            }
            // Waiting here is back-pressure on the relay (TCP flow control).
            if !frames.is_empty() && tx.send(report(Report::Frames(frames))).await.is_err() {
                return "agent stopping".to_owned();
            }
        }
    };
    tokio::select! {
        why = writer => why,
        why = reader => why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay::stun::channel_data;

    #[tokio::test]
    async fn frames_cross_a_tcp_stream_both_ways_and_closing_is_reported() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let table = Table::default();
        let mut streams = Streams::new(table.clone());
        streams.connect(
            addr,
            RelayPath {
                transport: Transport::Tcp,
                addr,
            },
        );
        let (mut conn, _) = listener.accept().await.unwrap();
        let first = streams.rx.recv().await.unwrap();
        assert!(matches!(
            streams.accept(first),
            Some(Delivery::Event(_, StreamEvent::Connected))
        ));
        assert!(table.has(addr));
        // Agent → relay: padded on the stream.
        let mut one = Vec::new();
        channel_data::encode(&mut one, 0x4000, b"abcde", false);
        assert!(table.send(addr, [&one[..]]));
        let mut got = [0u8; 12];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..9], &one[..]);
        assert_eq!(&got[9..], &[0, 0, 0]);
        // Relay → agent: unpadded frames.
        conn.write_all(&got).await.unwrap();
        let frames = loop {
            let i = streams.rx.recv().await.unwrap();
            if let Some(Delivery::Frames(_, f)) = streams.accept(i) {
                break f;
            }
        };
        assert_eq!(frames, vec![one.clone()]);
        // Garbage ends it.
        conn.write_all(&[0xFF; 8]).await.unwrap();
        let i = streams.rx.recv().await.unwrap();
        match streams.accept(i) {
            Some(Delivery::Event(_, StreamEvent::Closed(why))) => {
                assert!(why.contains("neither STUN"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert!(!table.has(addr));
        assert!(!table.send(addr, [&one[..]]));
    }

    #[tokio::test]
    async fn a_refused_connection_is_reported() {
        // A port nothing listens on.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let mut streams = Streams::new(Table::default());
        streams.connect(
            addr,
            RelayPath {
                transport: Transport::Tcp,
                addr,
            },
        );
        let i = streams.rx.recv().await.unwrap();
        assert!(matches!(
            streams.accept(i),
            Some(Delivery::Event(_, StreamEvent::Closed(_)))
        ));
    }
}
