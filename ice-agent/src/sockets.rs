//! The daemon's birthday sockets ([`crate::birthday`]): opening them,
//! keeping their mappings alive, noticing the one the peer's probe hits,
//! and reading the winner, which then carries the peer's path (registered
//! with the data plane, which sends from it).
//!
//! Bounded: at most [`MAX_OPEN`] sockets open at once across all peers
//! (another peer's attempt gets what is left, or, with fewer than
//! [`MIN_OPEN`] left, none and tries again 2 s later);
//! each unhit socket sends one opener every [`KEEP_OPEN`] and reads until
//! it is closed; a winner is read by one task until its session ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::agent::PeerKey;
use crate::dataplane::DataPlane;

/// Birthday sockets open at once, all peers together.
pub(crate) const MAX_OPEN: usize = 512;
/// An attempt with fewer sockets to spare than this waits for room (the
/// session retries in 2 s): with 64 the 4000 probes still meet one with
/// 98 % probability, with fewer the attempt would mostly be wasted.
pub(crate) const MIN_OPEN: usize = 64;
/// An unhit socket re-sends its opener this often (conntrack forgets an
/// unanswered UDP flow after 30 s).
pub(crate) const KEEP_OPEN: Duration = Duration::from_secs(10);

/// A socket that received from its target: (peer, local port, socket).
pub(crate) type Hit = (PeerKey, u16, Arc<UdpSocket>);
/// A datagram on a winner: (slot, local port, source, bytes).
pub(crate) type Rx = (usize, u16, SocketAddr, Vec<u8>);

/// The birthday sockets of every peer.
pub(crate) struct Birthdays {
    open: HashMap<PeerKey, Vec<JoinHandle<()>>>,
    winners: HashMap<usize, JoinHandle<()>>,
    free: Vec<usize>,
    hit_tx: mpsc::Sender<Hit>,
    rx_tx: mpsc::Sender<Rx>,
    /// The agent socket is dual-stack (IPv4 as mapped addresses).
    dual: bool,
}

impl Birthdays {
    /// No sockets yet; hits and winners' datagrams come out of the two
    /// receivers.
    pub(crate) fn new(dual: bool) -> (Birthdays, mpsc::Receiver<Hit>, mpsc::Receiver<Rx>) {
        let (hit_tx, hit_rx) = mpsc::channel(16);
        let (rx_tx, rx_rx) = mpsc::channel(1024);
        (
            Birthdays {
                open: HashMap::new(),
                winners: HashMap::new(),
                free: Vec::new(),
                hit_tx,
                rx_tx,
                dual,
            },
            hit_rx,
            rx_rx,
        )
    }

    /// Opens up to `count` sockets for `peer`, each sending an opener to
    /// `target` now and every [`KEEP_OPEN`]; returns how many opened.
    pub(crate) fn open(&mut self, peer: PeerKey, target: SocketAddr, count: u16) -> u16 {
        self.close(peer);
        let in_use: usize = self.open.values().map(Vec::len).sum();
        let room = MAX_OPEN.saturating_sub(in_use).min(usize::from(count));
        if room < MIN_OPEN.min(usize::from(count)) {
            return 0;
        }
        let mut tasks = Vec::with_capacity(room);
        for _ in 0..room {
            // Bound like the agent socket (dual-stack where it is), so the
            // data plane addresses it the same way.
            let sock = match bind() {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::warn!(%target, opened = tasks.len(), "birthday sockets: {e}");
                    break;
                }
            };
            let port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
            let hit = self.hit_tx.clone();
            let dual = self.dual;
            tasks.push(tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let mut opener = Vec::new();
                let mut tick = tokio::time::interval(KEEP_OPEN);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            crate::punch::opener(&mut opener, rand::random());
                            let _ = sock.send_to(&opener, crate::udp::outward(target, dual)).await;
                        }
                        r = sock.recv_from(&mut buf) => {
                            if matches!(r, Ok((_, from)) if crate::udp::canonical(from) == target) {
                                let _ = hit.send((peer, port, sock.clone())).await;
                                return;
                            }
                        }
                    }
                }
            }));
        }
        let n = tasks.len();
        self.open.insert(peer, tasks);
        u16::try_from(n).unwrap_or(u16::MAX)
    }

    /// Closes `peer`'s unhit sockets.
    pub(crate) fn close(&mut self, peer: PeerKey) {
        for t in self.open.remove(&peer).unwrap_or_default() {
            t.abort();
        }
    }

    /// A hit socket becomes one of the data plane's: returns its slot,
    /// after starting the task that reads it.
    pub(crate) fn adopt(
        &mut self,
        plane: &mut DataPlane,
        sock: Arc<UdpSocket>,
        port: u16,
    ) -> std::io::Result<usize> {
        let slot = plane.add_socket(&sock, self.free.pop())?;
        let tx = self.rx_tx.clone();
        self.winners.insert(
            slot,
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    match sock.recv_from(&mut buf).await {
                        Ok((n, from)) => {
                            let from = crate::udp::canonical(from);
                            if tx
                                .send((slot, port, from, buf[..n].to_vec()))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::debug!(port, "birthday socket: {e}");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }),
        );
        Ok(slot)
    }

    /// A winner's session ended: its socket closes, its slot names the
    /// main socket until reused.
    pub(crate) fn release(&mut self, plane: &mut DataPlane, main: &Arc<UdpSocket>, slot: usize) {
        if let Some(t) = self.winners.remove(&slot) {
            t.abort();
            plane.free_socket(slot, main);
            self.free.push(slot);
        }
    }

    /// Closes everything (shutdown).
    pub(crate) fn close_all(&mut self) {
        for (_, ts) in self.open.drain() {
            ts.iter().for_each(JoinHandle::abort);
        }
        for (_, t) in self.winners.drain() {
            t.abort();
        }
    }
}

fn bind() -> std::io::Result<UdpSocket> {
    UdpSocket::from_std(crate::udp::bind(0)?.socket)
}
