//! TURN over TCP and TLS (RFC 8656 §3.1, framing §12.5): one tokio actor owns
//! a [`Server`] shard for every stream client; connection tasks frame the
//! byte stream into STUN/ChannelData messages and relayed sockets feed peer
//! datagrams back. This is the fallback path for networks that only let TCP
//! 443 out, so it favours simplicity over batching.
//!
//! A connection is a slot someone must earn: it has [`AUTH_TIMEOUT`] after
//! connecting (after the TLS handshake) to complete a request that passes
//! MESSAGE-INTEGRITY (an Allocate, say), whatever else it sends; after that
//! it is closed only when silent for [`IDLE_TIMEOUT`]. So a Binding-only
//! STUN client over TCP gets its answers and is closed after 10 s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::server::{ClientSocket, Event, Metrics, RelayToken, Server, Transmit, Transport};
use crate::stun;

/// Largest STUN or ChannelData frame accepted from a stream client. TURN
/// messages and WireGuard packets fit in an MTU; a larger frame closes the
/// connection, which bounds the memory one client can pin.
const MAX_FRAME: usize = 4096;
/// Frames queued towards one client before further frames are dropped
/// (at most `CLIENT_QUEUE` × 2 KiB per client).
const CLIENT_QUEUE: usize = 128;
/// Concurrent stream clients.
const MAX_CONNECTIONS: usize = 20_000;
/// Concurrent stream clients from one source (an IPv4 address or an IPv6
/// /64, see [`crate::policy::source_key`]; per listener): enough for a
/// CGNAT'd office, too few for one host to take every slot.
const MAX_PER_IP: u32 = 256;

type PerIpCounts = Arc<std::sync::Mutex<HashMap<std::net::IpAddr, u32>>>;

/// One connection's share of its source's quota, given back on drop.
struct PerIpSlot {
    counts: PerIpCounts,
    /// The source key, not the address.
    ip: std::net::IpAddr,
}

impl PerIpSlot {
    fn take(counts: &PerIpCounts, ip: std::net::IpAddr) -> Option<PerIpSlot> {
        let ip = crate::policy::source_key(ip);
        let mut m = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_PER_IP {
            return None;
        }
        *n += 1;
        Some(PerIpSlot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for PerIpSlot {
    fn drop(&mut self) {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Time a new stream client has to authenticate (complete a request that
/// passes MESSAGE-INTEGRITY); talking without authenticating does not count.
pub const AUTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest silence from an authenticated stream client before it is closed
/// (a live allocation refreshes well within its 600 s lifetime).
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(610);

enum Input {
    /// A connection, its outgoing queue, and the flag the actor sets once it
    /// authenticated.
    Connected(ClientSocket, mpsc::Sender<Vec<u8>>, Arc<AtomicBool>),
    Frame(ClientSocket, Vec<u8>),
    Closed(ClientSocket),
    Peer(RelayToken, SocketAddr, Vec<u8>),
}

/// Handle to the running stream shard.
#[derive(Debug)]
pub struct StreamShard {
    tasks: Vec<JoinHandle<()>>,
}

impl StreamShard {
    /// Waits for the actor and listeners to finish (after shutdown).
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts the stream shard: TCP listeners and TLS listeners (with `tls`).
pub fn start(
    server: Server,
    tcp: Vec<TcpListener>,
    tls: Vec<TcpListener>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) -> StreamShard {
    let (tx, rx) = mpsc::channel::<Input>(4096);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let metrics = server.metrics().clone();
    let mut tasks = vec![tokio::spawn(actor(
        server,
        rx,
        tx.clone(),
        shutdown.clone(),
    ))];
    for l in tcp {
        tasks.push(tokio::spawn(accept_loop(
            l,
            Transport::Tcp,
            None,
            tx.clone(),
            limit.clone(),
            metrics.clone(),
            shutdown.clone(),
        )));
    }
    if let Some(acc) = acceptor {
        for l in tls {
            tasks.push(tokio::spawn(accept_loop(
                l,
                Transport::Tls,
                Some(acc.clone()),
                tx.clone(),
                limit.clone(),
                metrics.clone(),
                shutdown.clone(),
            )));
        }
    }
    StreamShard { tasks }
}

async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tx: mpsc::Sender<Input>,
    limit: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Ok(local) = listener.local_addr() else {
        return;
    };
    let per_ip_counts: PerIpCounts = Arc::default();
    loop {
        let (sock, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(%local, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            metrics.stream_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%remote, "too many stream clients ({MAX_CONNECTIONS}); closing");
            continue;
        };
        let Some(per_ip) = PerIpSlot::take(&per_ip_counts, remote.ip()) else {
            metrics.stream_refused.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%remote, "too many stream clients from one source (address or IPv6 /64; {MAX_PER_IP}); closing");
            continue;
        };
        let _ = sock.set_nodelay(true);
        let client = ClientSocket {
            transport,
            local,
            remote,
        };
        let tx = tx.clone();
        let tls = tls.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _per_ip = per_ip;
            match tls {
                Some(acc) => {
                    let hs =
                        tokio::time::timeout(std::time::Duration::from_secs(10), acc.accept(sock))
                            .await;
                    match hs {
                        Ok(Ok(s)) => connection(s, client, tx, metrics).await,
                        Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                    }
                }
                None => connection(sock, client, tx, metrics).await,
            }
        });
    }
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    client: ClientSocket,
    tx: mpsc::Sender<Input>,
    metrics: Arc<Metrics>,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(CLIENT_QUEUE);
    let authenticated = Arc::new(AtomicBool::new(false));
    if tx
        .send(Input::Connected(client, out_tx, authenticated.clone()))
        .await
        .is_err()
    {
        return;
    }
    let writer = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if wr.write_all(&frame).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 4096];
    // A client must authenticate within AUTH_TIMEOUT of connecting (talking
    // is not enough), and then speak at least once per IDLE_TIMEOUT: neither
    // idle nor chatty unauthenticated sockets can pin connection slots.
    let auth_deadline = tokio::time::Instant::now() + AUTH_TIMEOUT;
    let mut last_read = tokio::time::Instant::now();
    'read: loop {
        let authed = authenticated.load(Ordering::Relaxed);
        let deadline = if authed {
            last_read + IDLE_TIMEOUT
        } else {
            auth_deadline
        };
        let n = tokio::select! {
            r = rd.read(&mut chunk) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = tokio::time::sleep_until(deadline) => {
                // The flag may have been set while we slept.
                if !authed && authenticated.load(Ordering::Relaxed) {
                    continue;
                }
                metrics.stream_timeouts.fetch_add(1, Ordering::Relaxed);
                if authed {
                    tracing::debug!(remote = %client.remote, "closing stream client: silent for {IDLE_TIMEOUT:?}");
                } else {
                    tracing::info!(remote = %client.remote, "closing stream client: not authenticated within {AUTH_TIMEOUT:?}");
                }
                break;
            }
        };
        last_read = tokio::time::Instant::now();
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match stun::stream_frame_len(&buf) {
                Ok(Some(len)) if len > MAX_FRAME => {
                    tracing::debug!(remote = %client.remote, len, "closing stream: frame larger than {MAX_FRAME} bytes");
                    break 'read;
                }
                Ok(Some(len)) => {
                    let frame: Vec<u8> = buf.drain(..len).collect();
                    if tx.send(Input::Frame(client, frame)).await.is_err() {
                        break 'read;
                    }
                }
                Ok(None) if buf.len() >= 4 && declared_len(&buf) > MAX_FRAME => {
                    tracing::debug!(remote = %client.remote, "closing stream: frame larger than {MAX_FRAME} bytes");
                    break 'read;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(remote = %client.remote, error = %e, "closing stream: not STUN/ChannelData");
                    break 'read;
                }
            }
        }
    }
    let _ = tx.send(Input::Closed(client)).await;
    writer.abort();
}

/// The total length a frame header announces (STUN: 20 + length; ChannelData: 4 + length).
fn declared_len(buf: &[u8]) -> usize {
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    if stun::channel_data::is_channel_data(buf) {
        4 + len
    } else {
        stun::HEADER_LEN + len
    }
}

async fn actor(
    mut server: Server,
    mut rx: mpsc::Receiver<Input>,
    tx: mpsc::Sender<Input>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut clients: HashMap<ClientSocket, (mpsc::Sender<Vec<u8>>, Arc<AtomicBool>)> =
        HashMap::new();
    let mut relays: HashMap<u64, (Arc<UdpSocket>, JoinHandle<()>)> = HashMap::new();
    loop {
        let deadline = tokio::time::Instant::from_std(server.poll_timeout());
        let input = tokio::select! {
            i = rx.recv() => match i {
                Some(i) => Some(i),
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => None,
            _ = shutdown.changed() => break,
        };
        let now = Instant::now();
        match input {
            None => server.handle_timeout(now),
            Some(Input::Connected(c, s, authed)) => {
                clients.insert(c, (s, authed));
            }
            Some(Input::Closed(c)) => {
                clients.remove(&c);
                server.client_closed(c);
            }
            Some(Input::Frame(c, data)) => {
                if let Some(fwd) = server.handle_client(now, c, &data) {
                    if let Some((s, _)) = relays.get(&fwd.relay.0) {
                        let _ = s.try_send_to(fwd.payload, fwd.peer);
                    }
                }
            }
            Some(Input::Peer(token, peer, mut data)) => {
                let len = data.len() - 4 - 3;
                if let Some(fwd) = server.handle_peer(now, token, peer, &mut data, len) {
                    data.truncate(fwd.len);
                    if let Some((s, _)) = clients.get(&fwd.client) {
                        let _ = s.try_send(data);
                    }
                }
            }
        }
        loop {
            let mut progressed = false;
            while let Some(ev) = server.poll_event() {
                progressed = true;
                match ev {
                    Event::BindRelay { token, addr } => {
                        let res = match std::net::UdpSocket::bind(addr).and_then(|s| {
                            s.set_nonblocking(true)?;
                            UdpSocket::from_std(s)
                        }) {
                            Ok(s) => {
                                let s = Arc::new(s);
                                let local = s.local_addr();
                                let task = tokio::spawn(relay_reader(s.clone(), token, tx.clone()));
                                relays.insert(token.0, (s, task));
                                local
                            }
                            Err(e) => Err(e),
                        };
                        server.relay_bound(now, token, res);
                    }
                    Event::ReleaseRelay { token } => {
                        if let Some((_, task)) = relays.remove(&token.0) {
                            task.abort();
                        }
                    }
                    Event::ClientAuthenticated { client } => {
                        if let Some((_, authed)) = clients.get(&client) {
                            authed.store(true, Ordering::Relaxed);
                        }
                    }
                    // Stream clients never get kernel entries.
                    Event::FastPath { .. } => {}
                }
            }
            while let Some(t) = server.poll_transmit() {
                progressed = true;
                match t {
                    Transmit::ToClient {
                        client, payload, ..
                    } => {
                        if let Some((s, _)) = clients.get(&client) {
                            let _ = s.try_send(payload);
                        }
                    }
                    Transmit::ToPeer {
                        relay,
                        peer,
                        payload,
                    } => {
                        if let Some((s, _)) = relays.get(&relay.0) {
                            let _ = s.try_send_to(&payload, peer);
                        }
                    }
                }
            }
            if !progressed {
                break;
            }
        }
    }
    for (_, (_, t)) in relays {
        t.abort();
    }
}

async fn relay_reader(sock: Arc<UdpSocket>, token: RelayToken, tx: mpsc::Sender<Input>) {
    let mut buf = vec![0u8; 2048];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf[4..2048 - 3]).await else {
            return;
        };
        if n == 2048 - 3 - 4 {
            // Filled the buffer: possibly truncated; never relay that.
            continue;
        }
        let mut data = Vec::with_capacity(n + 7);
        data.extend_from_slice(&[0; 4]);
        data.extend_from_slice(&buf[4..4 + n]);
        data.extend_from_slice(&[0; 3]);
        if tx.try_send(Input::Peer(token, peer, data)).is_err() {
            // Actor saturated: drop, like a full socket buffer would.
            continue;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_source_slots_count_an_ipv6_slash64_as_one_source() {
        let counts: PerIpCounts = Arc::default();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        let mut held = Vec::new();
        for i in 0..MAX_PER_IP {
            let a = ip(&format!("2001:db8:1:2::{:x}", i + 1));
            held.push(PerIpSlot::take(&counts, a).expect("within the quota"));
        }
        assert!(
            PerIpSlot::take(&counts, ip("2001:db8:1:2:ffff::1")).is_none(),
            "another address of the same /64"
        );
        assert!(PerIpSlot::take(&counts, ip("2001:db8:1:3::1")).is_some());
        // IPv4-mapped IPv6 is the IPv4 address.
        for _ in 0..MAX_PER_IP {
            held.push(PerIpSlot::take(&counts, ip("192.0.2.1")).expect("within the quota"));
        }
        assert!(PerIpSlot::take(&counts, ip("::ffff:192.0.2.1")).is_none());
        drop(held);
        assert!(
            counts.lock().expect("lock").is_empty(),
            "every slot given back"
        );
    }
}
