//! Which WireGuard peers the agent owns, and how it gives them back.
//!
//! The agent writes only the peers it manages. On first touch it remembers
//! how a peer looked ([`Original`]: its fields, or that the agent created
//! it) and puts exactly that back when the peer goes away and on exit. A
//! member's allowed IP that another peer already routes is withheld until
//! it is free.
//!
//! [`Ownership`] is the sans-IO core of those rules: it takes [`Command`]s
//! and asks for reads and writes of the interface ([`Io`]), one at a time,
//! learning the interface's peers from the reads and from the answers to its
//! own writes. It reads no clock (`now` is a parameter) and touches no
//! interface. [`WgOwner::spawn`] starts the `wg-control` thread, the thin
//! driver that carries those reads and writes out through [`WgControl`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::sync::oneshot;

use crate::agent::PeerKey;
use crate::wg::{Original, PeerUpdate, WgControl, WgDevice, WgError, WgPeer};

/// What the agent asks of the WireGuard interface.
#[derive(Debug, Clone)]
pub(crate) enum Command {
    /// Take `peer` over (remember how it looks now, or that it does not
    /// exist) and write its endpoint and allowed IPs. `endpoint` is `None`
    /// in embedded mode, where the device finds its peers itself.
    Add {
        peer: PeerKey,
        allowed_ips: Vec<IpNet>,
        endpoint: Option<SocketAddr>,
    },
    /// Point a managed peer's endpoint at `endpoint`.
    Endpoint { peer: PeerKey, endpoint: SocketAddr },
    /// A managed peer should route these addresses.
    AllowedIps {
        peer: PeerKey,
        allowed_ips: Vec<IpNet>,
    },
    /// Give `peer` back as it was (remove it if the agent created it).
    Restore { peer: PeerKey },
    /// Give every managed peer back; nothing changes the interface after
    /// this.
    RestoreAll,
    /// The interface was deleted and created again (wg-quick or the
    /// userspace WireGuard restarted): the managed peers are gone. Take
    /// them over again as they are now, with their endpoints and wanted
    /// allowed IPs.
    Recreated,
}

/// What [`Ownership::poll`] asks the driver to do.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "handed out one at a time, never stored"
)]
pub(crate) enum Io {
    /// Read the interface ([`WgControl::device`]) and answer with
    /// [`Ownership::handle_read`].
    Read,
    /// Carry out this write and answer with [`Ownership::handle_written`].
    Write(Write),
}

/// A write to the interface.
#[derive(Debug, Clone)]
pub(crate) enum Write {
    /// [`WgControl::set_peer`].
    Set {
        /// What to write.
        update: PeerUpdate,
        /// Why (for the log and for what a success means).
        why: Why,
    },
    /// [`WgControl::restore`]: put the peer back as it was;
    /// [`Original::Created`] removes it.
    Restore { peer: PeerKey, original: Original },
}

/// Why a [`Write::Set`] is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// Taking a peer over.
    Add,
    /// A new endpoint.
    Endpoint,
    /// Allowed IPs that were wanted and are free now.
    AllowedIps,
}

impl Write {
    /// What the write does, for the log line when it fails.
    fn what(&self) -> &'static str {
        match self {
            Write::Set { why: Why::Add, .. } => "adding peer",
            Write::Set {
                why: Why::Endpoint, ..
            } => "setting endpoint",
            Write::Set {
                why: Why::AllowedIps,
                ..
            } => "setting allowed IPs",
            Write::Restore { .. } => "restoring peer",
        }
    }
}

/// How old the interface model may get before it is read again (changes an
/// operator makes by hand are seen within this time).
pub(crate) const MODEL_MAX_AGE: Duration = Duration::from_secs(30);

/// Work left from the commands, in order.
#[derive(Debug)]
enum Task {
    Command(Command),
    /// Write the wanted allowed IPs of this peer (or of every managed peer)
    /// that are free and not written yet.
    FreeIps(Option<PeerKey>),
}

/// The peers the agent manages: how they looked before, what they should
/// route, what was written, and the interface as last read.
///
/// The run loop: [`handle`](Self::handle) a command, then
/// [`poll`](Self::poll) until it returns `None`, answering every
/// [`Io::Read`] with [`handle_read`](Self::handle_read) and every
/// [`Io::Write`] with [`handle_written`](Self::handle_written) before
/// polling again (a write may depend on the answer to the one before).
#[derive(Debug, Default)]
pub(crate) struct Ownership {
    originals: HashMap<PeerKey, Original>,
    /// Allowed IPs each managed peer should have, and what was written (a
    /// member's address another peer holds is withheld until it is free).
    wanted: HashMap<PeerKey, Vec<IpNet>>,
    written: HashMap<PeerKey, Vec<IpNet>>,
    /// The endpoint last written per peer (none in embedded mode).
    endpoints: HashMap<PeerKey, Option<SocketAddr>>,
    /// The interface as last read, kept up to date with our own writes:
    /// adding or removing a peer costs one write, not a read of every peer
    /// (read again after [`MODEL_MAX_AGE`], and when the interface changes).
    model: HashMap<PeerKey, WgPeer>,
    model_read: Option<Instant>,
    /// The last read was made for the task at the head of `todo`.
    read_for_head: bool,
    todo: VecDeque<Task>,
    writes: VecDeque<Write>,
    /// After [`Command::RestoreAll`]: nothing more is written.
    finished: bool,
}

impl Ownership {
    /// Queues a command; [`poll`](Self::poll) says what it needs done.
    /// Ignored after [`Command::RestoreAll`].
    pub(crate) fn handle(&mut self, cmd: Command) {
        if !self.finished {
            self.todo.push_back(Task::Command(cmd));
        }
    }

    /// The next read or write the driver must carry out, or `None` when the
    /// commands so far are done. Changes after [`handle`](Self::handle),
    /// [`handle_read`](Self::handle_read) and
    /// [`handle_written`](Self::handle_written).
    #[must_use]
    pub(crate) fn poll(&mut self, now: Instant) -> Option<Io> {
        loop {
            if let Some(w) = self.writes.pop_front() {
                return Some(Io::Write(w));
            }
            let head = self.todo.front()?;
            if self.needs_read(head, now) {
                return Some(Io::Read);
            }
            let task = self.todo.pop_front()?;
            self.read_for_head = false;
            self.run(task);
        }
    }

    /// The interface as read at `now` (or why it could not be read) for
    /// the [`Io::Read`] that [`poll`](Self::poll) asked for. A failed read
    /// drops the command that needed it: without knowing how a peer looks,
    /// the agent would not know how to restore it.
    pub(crate) fn handle_read(&mut self, now: Instant, read: Result<WgDevice, WgError>) {
        match read {
            Ok(dev) => {
                self.model = dev.peers.into_iter().map(|p| (p.public_key, p)).collect();
                self.model_read = Some(now);
                self.read_for_head = true;
            }
            Err(e) => match self.todo.pop_front() {
                Some(Task::Command(Command::Add { .. })) => {
                    tracing::warn!("reading the interface, peer left alone: {e}")
                }
                _ => tracing::warn!("reading the interface: {e}"),
            },
        }
    }

    /// How the `write` that [`poll`](Self::poll) handed out went.
    pub(crate) fn handle_written(&mut self, write: &Write, result: Result<(), WgError>) {
        match (write, &result) {
            (Write::Set { update, why }, Ok(())) => {
                let p = self
                    .model
                    .entry(update.public_key)
                    .or_insert_with(|| WgPeer {
                        public_key: update.public_key,
                        ..Default::default()
                    });
                if let Some(e) = update.endpoint {
                    p.endpoint = Some(e);
                }
                if let Some(ips) = &update.allowed_ips {
                    p.allowed_ips = ips.clone();
                    if *why == Why::AllowedIps {
                        self.written.insert(update.public_key, ips.clone());
                    }
                }
            }
            (Write::Restore { peer, original }, Ok(())) => match original {
                Original::Created => {
                    self.model.remove(peer);
                }
                Original::Existed(p) => {
                    self.model.insert(*peer, p.clone());
                }
            },
            // The model no longer matches the interface: read it again.
            (Write::Restore { .. }, Err(_)) => self.model_read = None,
            (Write::Set { .. }, Err(_)) => {}
        }
        if let Err(e) = result {
            tracing::warn!("{}: {e}", write.what());
        }
    }

    /// Every restore at once, without reads and without the queue: for a
    /// driver that is giving up (a panic), when the queue may be half done.
    pub(crate) fn abandon(&mut self) -> Vec<Write> {
        self.finished = true;
        self.todo.clear();
        self.writes.clear();
        self.originals
            .drain()
            .map(|(peer, original)| Write::Restore { peer, original })
            .collect()
    }

    fn stale(&self, now: Instant) -> bool {
        self.model_read
            .is_none_or(|t| now.saturating_duration_since(t) >= MODEL_MAX_AGE)
    }

    fn needs_read(&self, task: &Task, now: Instant) -> bool {
        match task {
            Task::Command(Command::Add { .. }) | Task::FreeIps(_) => self.stale(now),
            // Never re-create a peer removed behind the agent's back
            // (`update_only` is not understood by every implementation).
            // An endpoint changes with the path, not per peer added: one
            // read here is fine, and refreshes the model for free.
            Task::Command(Command::Endpoint { peer, .. }) => {
                self.originals.contains_key(peer) && !self.read_for_head
            }
            Task::Command(_) => false,
        }
    }

    fn run(&mut self, task: Task) {
        match task {
            Task::Command(Command::Add {
                peer,
                allowed_ips,
                endpoint,
            }) => self.take_over(peer, allowed_ips, endpoint),
            // Only peers the agent took over (and knows how to restore).
            Task::Command(Command::Endpoint { peer, endpoint })
                if self.originals.contains_key(&peer) =>
            {
                if !self.model.contains_key(&peer) {
                    tracing::warn!(
                        peer = %peer,
                        "peer was removed from the interface; not re-creating it"
                    );
                    return;
                }
                tracing::info!(peer = %peer, %endpoint, "WireGuard endpoint");
                self.endpoints.insert(peer, Some(endpoint));
                self.writes.push_back(Write::Set {
                    update: PeerUpdate {
                        public_key: peer,
                        endpoint: Some(endpoint),
                        ..PeerUpdate::default()
                    },
                    why: Why::Endpoint,
                });
            }
            Task::Command(Command::AllowedIps { peer, allowed_ips })
                if self.originals.contains_key(&peer) =>
            {
                self.wanted.insert(peer, allowed_ips);
                self.todo.push_front(Task::FreeIps(Some(peer)));
            }
            Task::Command(Command::Endpoint { .. } | Command::AllowedIps { .. }) => {}
            Task::Command(Command::Restore { peer }) => {
                if let Some(original) = self.originals.remove(&peer) {
                    self.writes.push_back(Write::Restore { peer, original });
                }
                self.wanted.remove(&peer);
                self.written.remove(&peer);
                self.endpoints.remove(&peer);
                // Addresses that peer held may now be free for another
                // (the model, not a read: removing a peer stays O(1) reads).
                self.todo.push_front(Task::FreeIps(None));
            }
            Task::Command(Command::RestoreAll) => {
                let all = self.abandon();
                self.writes.extend(all);
            }
            Task::Command(Command::Recreated) => {
                self.originals.clear();
                self.written.clear();
                self.model_read = None;
                let again: Vec<Task> = self
                    .endpoints
                    .iter()
                    .map(|(&peer, &endpoint)| {
                        Task::Command(Command::Add {
                            peer,
                            allowed_ips: self.wanted.get(&peer).cloned().unwrap_or_default(),
                            endpoint,
                        })
                    })
                    .collect();
                for t in again.into_iter().rev() {
                    self.todo.push_front(t);
                }
            }
            Task::FreeIps(only) => self.free_ips(only),
        }
    }

    /// Takes a peer over: remembers how it looked (or that it did not
    /// exist), then writes endpoint and allowed IPs. The model is fresh.
    fn take_over(&mut self, peer: PeerKey, allowed_ips: Vec<IpNet>, endpoint: Option<SocketAddr>) {
        let existing = self.model.get(&peer).cloned();
        let free = unclaimed(&self.model, &peer, allowed_ips.clone());
        if !allowed_ips.is_empty() {
            self.wanted.insert(peer, allowed_ips);
        }
        if !free.is_empty() {
            self.written.insert(peer, free.clone());
        }
        // Nothing to route (yet) on a peer that exists: keep what it has.
        let keep_ips = free.is_empty() && existing.is_some();
        self.originals
            .entry(peer)
            .or_insert_with(|| existing.map_or(Original::Created, Original::Existed));
        self.endpoints.insert(peer, endpoint);
        self.writes.push_back(Write::Set {
            update: PeerUpdate {
                public_key: peer,
                endpoint,
                allowed_ips: (!keep_ips).then_some(free),
                ..PeerUpdate::default()
            },
            why: Why::Add,
        });
    }

    /// Queues the allowed IPs of `only` (or of every managed peer) that are
    /// wanted, free, and not yet written. The model is fresh.
    fn free_ips(&mut self, only: Option<PeerKey>) {
        let peers: Vec<PeerKey> = match only {
            Some(p) => vec![p],
            None => self.wanted.keys().copied().collect(),
        };
        for peer in peers {
            let Some(want) = self.wanted.get(&peer) else {
                continue;
            };
            if !self.model.contains_key(&peer) {
                continue;
            }
            let ips = unclaimed(&self.model, &peer, want.clone());
            if self.written.get(&peer) != Some(&ips) {
                tracing::info!(peer = %peer, allowed_ips = ?ips, "WireGuard allowed IPs");
                self.writes.push_back(Write::Set {
                    update: PeerUpdate {
                        public_key: peer,
                        allowed_ips: Some(ips),
                        ..PeerUpdate::default()
                    },
                    why: Why::AllowedIps,
                });
            }
        }
    }
}

/// The requested allowed IPs minus any that overlap another peer's: a
/// member cannot take over addresses routed to someone else.
fn unclaimed(model: &HashMap<PeerKey, WgPeer>, peer: &PeerKey, want: Vec<IpNet>) -> Vec<IpNet> {
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

/// WireGuard's counters per peer: received bytes, sent bytes, last
/// handshake (seconds since the epoch).
pub(crate) type Counters = HashMap<PeerKey, (u64, u64, u64)>;

enum WgCmd {
    Own(Command),
    /// Restore every managed peer, then call the closure (the
    /// acknowledgement) and change nothing any more.
    RestoreAll(Box<dyn FnOnce() + Send>),
    Counters(oneshot::Sender<Counters>),
}

/// The `wg-control` thread, which alone writes the WireGuard interface.
/// Cheap to clone; the thread ends when every handle is gone, or after
/// [`restore_all`](Self::restore_all).
#[derive(Clone)]
pub(crate) struct WgOwner {
    tx: mpsc::Sender<WgCmd>,
}

impl std::fmt::Debug for WgOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WgOwner")
    }
}

impl WgOwner {
    /// Starts the thread.
    pub(crate) fn spawn(wg: WgControl) -> std::io::Result<(WgOwner, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel::<WgCmd>();
        let thread = std::thread::Builder::new()
            .name("wg-control".into())
            .spawn(move || wg_worker(wg, rx))?;
        Ok((WgOwner { tx }, thread))
    }

    /// Hands a command to the thread (dropped if the thread has ended).
    pub(crate) fn send(&self, cmd: Command) {
        let _ = self.tx.send(WgCmd::Own(cmd));
    }

    /// Restores every managed peer and waits (at most `timeout`) until it
    /// is done; nothing changes the interface afterwards.
    pub(crate) async fn restore_all(&self, timeout: Duration) {
        let (tx, rx) = oneshot::channel();
        let ack = Box::new(move || {
            let _ = tx.send(());
        });
        if self.tx.send(WgCmd::RestoreAll(ack)).is_ok() {
            let _ = tokio::time::timeout(timeout, rx).await;
        }
    }

    /// Asks for WireGuard's counters; `None` if the thread has ended.
    pub(crate) fn counters(&self) -> Option<oneshot::Receiver<Counters>> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(WgCmd::Counters(tx)).ok()?;
        Some(rx)
    }

    /// Defence in depth: a panic anywhere in the agent (a bug reached by
    /// input the validation missed, inside a dependency) restores the
    /// WireGuard peers the agent changed before the process ends, instead
    /// of leaving them pointed at proxies that died with it. (The wg thread
    /// catches its own panics and restores from its state directly.) The
    /// hook holds a handle until it is taken down.
    pub(crate) fn restore_on_panic(&self) {
        let wg_tx = self.tx.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            if std::thread::current().name() == Some("wg-control") {
                return;
            }
            let (tx, rx) = mpsc::sync_channel::<()>(1);
            let ack = Box::new(move || {
                let _ = tx.try_send(());
            });
            let _ = wg_tx.send(WgCmd::RestoreAll(ack));
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
}

/// The wg thread: carries out [`WgCmd`]s. A panic while handling one
/// restores every peer the agent changed and ends the process (defence in
/// depth: a bug must not leave WireGuard pointing at dead proxies).
fn wg_worker(wg: WgControl, rx: mpsc::Receiver<WgCmd>) {
    let own = std::sync::Mutex::new(Ownership::default());
    let run = std::panic::AssertUnwindSafe(|| wg_loop(&wg, &rx, &own));
    if std::panic::catch_unwind(run).is_err() {
        let mut own = own.lock().unwrap_or_else(|p| p.into_inner());
        for w in own.abandon() {
            if let Err(e) = write(&wg, &w) {
                tracing::warn!("{}: {e}", w.what());
            }
        }
        eprintln!(
            "ice-agent: internal error in the WireGuard control thread; peers restored, exiting"
        );
        std::process::exit(70);
    }
}

fn wg_loop(wg: &WgControl, rx: &mpsc::Receiver<WgCmd>, own: &std::sync::Mutex<Ownership>) {
    let mut index = ifindex(wg.interface());
    let mut checked = Instant::now();
    loop {
        let next = rx.recv_timeout(Duration::from_secs(2));
        let mut own = own.lock().unwrap_or_else(|p| p.into_inner());
        if checked.elapsed() >= Duration::from_secs(2) {
            checked = Instant::now();
            let now = ifindex(wg.interface());
            if now != 0 && index != 0 && now != index {
                tracing::warn!(
                    interface = wg.interface(),
                    "the interface was re-created; re-adding the peers the agent manages"
                );
                own.handle(Command::Recreated);
                drive(wg, &mut own);
            }
            if now != 0 {
                index = now;
            }
        }
        match next {
            Ok(WgCmd::Own(cmd)) => {
                own.handle(cmd);
                drive(wg, &mut own);
            }
            Ok(WgCmd::RestoreAll(done)) => {
                own.handle(Command::RestoreAll);
                drive(wg, &mut own);
                done();
                // Nothing may change the interface after the restore.
                return;
            }
            Ok(WgCmd::Counters(reply)) => {
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
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

/// Carries out what the core asks until it asks nothing more.
fn drive(wg: &WgControl, own: &mut Ownership) {
    while let Some(io) = own.poll(Instant::now()) {
        match io {
            Io::Read => own.handle_read(Instant::now(), wg.device()),
            Io::Write(w) => {
                let r = write(wg, &w);
                own.handle_written(&w, r);
            }
        }
    }
}

fn write(wg: &WgControl, w: &Write) -> Result<(), WgError> {
    match w {
        Write::Set { update, .. } => wg.set_peer(update),
        Write::Restore { peer, original } => wg.restore(peer, original),
    }
}

fn ifindex(name: &str) -> u32 {
    match std::ffi::CString::new(name) {
        // SAFETY: a valid NUL-terminated name; returns 0 when unknown.
        Ok(c) => unsafe { libc::if_nametoindex(c.as_ptr()) },
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PeerKey {
        signaling::PublicKey([n; 32])
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A WireGuard interface in memory, written the way `WgControl` writes
    /// a real one.
    #[derive(Default)]
    struct Iface {
        peers: HashMap<PeerKey, WgPeer>,
        reads: usize,
        log: Vec<Write>,
    }

    impl Iface {
        fn with(peers: impl IntoIterator<Item = WgPeer>) -> Iface {
            Iface {
                peers: peers.into_iter().map(|p| (p.public_key, p)).collect(),
                ..Iface::default()
            }
        }

        fn apply(&mut self, w: &Write) {
            self.log.push(w.clone());
            match w {
                Write::Set { update, .. } => {
                    let p = self
                        .peers
                        .entry(update.public_key)
                        .or_insert_with(|| WgPeer {
                            public_key: update.public_key,
                            ..WgPeer::default()
                        });
                    if let Some(e) = update.endpoint {
                        p.endpoint = Some(e);
                    }
                    if let Some(ips) = &update.allowed_ips {
                        p.allowed_ips = ips.clone();
                    }
                }
                Write::Restore {
                    peer,
                    original: Original::Created,
                } => {
                    self.peers.remove(peer);
                }
                Write::Restore {
                    peer,
                    original: Original::Existed(p),
                } => {
                    self.peers.insert(*peer, p.clone());
                }
            }
        }

        /// Runs `cmd` through `own` at `now`, reading and writing this
        /// interface; returns the writes it made.
        fn run(&mut self, own: &mut Ownership, now: Instant, cmd: Command) -> Vec<Write> {
            let before = self.log.len();
            own.handle(cmd);
            while let Some(io) = own.poll(now) {
                match io {
                    Io::Read => {
                        self.reads += 1;
                        let dev = WgDevice {
                            peers: self.peers.values().cloned().collect(),
                            ..WgDevice::default()
                        };
                        own.handle_read(now, Ok(dev));
                    }
                    Io::Write(w) => {
                        self.apply(&w);
                        own.handle_written(&w, Ok(()));
                    }
                }
            }
            self.log[before..].to_vec()
        }

        fn peer(&self, k: PeerKey) -> Option<&WgPeer> {
            self.peers.get(&k)
        }
    }

    fn existing(k: PeerKey, endpoint: &str, ips: &[&str]) -> WgPeer {
        WgPeer {
            public_key: k,
            endpoint: Some(addr(endpoint)),
            endpoint_raw: Some(endpoint.to_owned()),
            allowed_ips: ips.iter().map(|s| net(s)).collect(),
            keepalive: 25,
            ..WgPeer::default()
        }
    }

    fn add(peer: PeerKey, ips: &[&str], endpoint: Option<&str>) -> Command {
        Command::Add {
            peer,
            allowed_ips: ips.iter().map(|s| net(s)).collect(),
            endpoint: endpoint.map(addr),
        }
    }

    #[test]
    fn an_existing_peer_is_remembered_and_restored() {
        let a = key(1);
        let before = existing(a, "192.0.2.1:51820", &["10.0.0.1/32"]);
        let mut iface = Iface::with([before.clone()]);
        let mut own = Ownership::default();
        let now = Instant::now();

        let w = iface.run(
            &mut own,
            now,
            add(a, &["10.0.0.1/32"], Some("127.0.0.1:40001")),
        );
        assert_eq!(w.len(), 1);
        assert_eq!(iface.reads, 1);
        let p = iface.peer(a).unwrap();
        assert_eq!(p.endpoint, Some(addr("127.0.0.1:40001")));
        assert_eq!(p.allowed_ips, vec![net("10.0.0.1/32")]);

        let w = iface.run(
            &mut own,
            now,
            Command::Endpoint {
                peer: a,
                endpoint: addr("198.51.100.7:51820"),
            },
        );
        assert_eq!(w.len(), 1);
        assert_eq!(
            iface.peer(a).unwrap().endpoint,
            Some(addr("198.51.100.7:51820"))
        );

        let w = iface.run(&mut own, now, Command::Restore { peer: a });
        assert!(
            matches!(&w[..], [Write::Restore { peer, original: Original::Existed(p) }]
                if *peer == a && *p == before),
            "{w:?}"
        );
        assert_eq!(iface.peer(a), Some(&before));
        // Not managed any more: later commands for it change nothing.
        let w = iface.run(
            &mut own,
            now,
            Command::Endpoint {
                peer: a,
                endpoint: addr("127.0.0.1:40002"),
            },
        );
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn a_created_peer_is_removed_on_restore() {
        let a = key(1);
        let mut iface = Iface::default();
        let mut own = Ownership::default();
        let now = Instant::now();
        iface.run(
            &mut own,
            now,
            add(a, &["10.0.0.1/32"], Some("127.0.0.1:40001")),
        );
        assert!(iface.peer(a).is_some());
        let w = iface.run(&mut own, now, Command::Restore { peer: a });
        assert!(
            matches!(
                &w[..],
                [Write::Restore {
                    original: Original::Created,
                    ..
                }]
            ),
            "{w:?}"
        );
        assert!(iface.peers.is_empty());
    }

    #[test]
    fn an_address_another_peer_routes_waits_until_it_is_free() {
        let (a, other) = (key(1), key(2));
        // `other` is not the agent's: the operator routes 10.0.0.1 to it.
        let mut iface = Iface::with([existing(other, "192.0.2.2:51820", &["10.0.0.0/24"])]);
        let mut own = Ownership::default();
        let t0 = Instant::now();
        iface.run(&mut own, t0, add(a, &["10.0.0.1/32", "10.1.0.1/32"], None));
        assert_eq!(iface.peer(a).unwrap().allowed_ips, vec![net("10.1.0.1/32")]);
        assert_eq!(
            iface.peer(other).unwrap().allowed_ips,
            vec![net("10.0.0.0/24")]
        );

        // The operator removes `other`. Within MODEL_MAX_AGE the agent
        // works from its model and still withholds the address.
        iface.peers.remove(&other);
        let want = || Command::AllowedIps {
            peer: a,
            allowed_ips: vec![net("10.0.0.1/32"), net("10.1.0.1/32")],
        };
        let w = iface.run(&mut own, t0 + Duration::from_secs(1), want());
        assert!(w.is_empty(), "{w:?}");
        // Once the model is read again, it is written.
        let w = iface.run(&mut own, t0 + MODEL_MAX_AGE, want());
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(
            iface.peer(a).unwrap().allowed_ips,
            vec![net("10.0.0.1/32"), net("10.1.0.1/32")]
        );
        assert_eq!(iface.reads, 2);
    }

    #[test]
    fn an_address_a_restored_peer_held_goes_to_the_one_waiting() {
        let (a, b) = (key(1), key(2));
        let mut iface = Iface::default();
        let mut own = Ownership::default();
        let now = Instant::now();
        iface.run(&mut own, now, add(a, &["10.0.0.1/32"], None));
        // b wants the same address: withheld while a holds it.
        iface.run(&mut own, now, add(b, &["10.0.0.1/32"], None));
        assert!(iface.peer(b).unwrap().allowed_ips.is_empty());
        // a goes away: b gets the address at once, from the model.
        let w = iface.run(&mut own, now, Command::Restore { peer: a });
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!(iface.peer(b).unwrap().allowed_ips, vec![net("10.0.0.1/32")]);
        assert_eq!(iface.reads, 1);
    }

    #[test]
    fn restore_all_restores_every_peer_and_then_writes_nothing() {
        let (a, b, c) = (key(1), key(2), key(3));
        let b_before = existing(b, "192.0.2.2:51820", &["10.0.0.2/32"]);
        let unmanaged = existing(c, "192.0.2.3:51820", &["10.0.0.3/32"]);
        let mut iface = Iface::with([b_before.clone(), unmanaged.clone()]);
        let mut own = Ownership::default();
        let now = Instant::now();
        iface.run(&mut own, now, add(a, &["10.0.0.1/32"], Some("127.0.0.1:1")));
        iface.run(&mut own, now, add(b, &["10.0.0.2/32"], Some("127.0.0.1:2")));
        let w = iface.run(&mut own, now, Command::RestoreAll);
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!(iface.peers.len(), 2);
        assert_eq!(iface.peer(b), Some(&b_before));
        assert_eq!(iface.peer(c), Some(&unmanaged));
        // Nothing may change the interface after the restore.
        let w = iface.run(&mut own, now, add(a, &["10.0.0.1/32"], Some("127.0.0.1:1")));
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn embedded_mode_writes_no_endpoint() {
        let a = key(1);
        let mut iface = Iface::default();
        let mut own = Ownership::default();
        let w = iface.run(&mut own, Instant::now(), add(a, &["10.0.0.1/32"], None));
        assert!(
            matches!(&w[..], [Write::Set { update, why: Why::Add }]
                if update.endpoint.is_none()
                    && update.allowed_ips == Some(vec![net("10.0.0.1/32")])),
            "{w:?}"
        );
        assert_eq!(iface.peer(a).unwrap().endpoint, None);
    }

    #[test]
    fn a_peer_removed_behind_the_agents_back_is_not_recreated() {
        let a = key(1);
        let mut iface = Iface::default();
        let mut own = Ownership::default();
        let now = Instant::now();
        iface.run(&mut own, now, add(a, &[], Some("127.0.0.1:40001")));
        iface.peers.clear();
        let w = iface.run(
            &mut own,
            now,
            Command::Endpoint {
                peer: a,
                endpoint: addr("127.0.0.1:40002"),
            },
        );
        assert!(w.is_empty(), "{w:?}");
        assert!(iface.peers.is_empty());
        // The endpoint check always reads, however fresh the model.
        assert_eq!(iface.reads, 2);
    }

    #[test]
    fn a_recreated_interface_gets_its_peers_again() {
        let a = key(1);
        let mut iface = Iface::default();
        let mut own = Ownership::default();
        let now = Instant::now();
        iface.run(
            &mut own,
            now,
            add(a, &["10.0.0.1/32"], Some("127.0.0.1:40001")),
        );
        iface.run(
            &mut own,
            now,
            Command::Endpoint {
                peer: a,
                endpoint: addr("127.0.0.1:40002"),
            },
        );
        // wg-quick down/up: the interface comes back empty.
        iface.peers.clear();
        let w = iface.run(&mut own, now, Command::Recreated);
        assert_eq!(w.len(), 1, "{w:?}");
        let p = iface.peer(a).unwrap();
        assert_eq!(p.endpoint, Some(addr("127.0.0.1:40002")));
        assert_eq!(p.allowed_ips, vec![net("10.0.0.1/32")]);
        // It was created anew, so a restore removes it.
        iface.run(&mut own, now, Command::Restore { peer: a });
        assert!(iface.peers.is_empty());
    }

    #[test]
    fn a_failed_read_leaves_the_peer_alone() {
        let a = key(1);
        let mut own = Ownership::default();
        let now = Instant::now();
        own.handle(add(a, &["10.0.0.1/32"], Some("127.0.0.1:1")));
        assert!(matches!(own.poll(now), Some(Io::Read)));
        own.handle_read(
            now,
            Err(WgError {
                interface: "wg0".into(),
                what: "no such device".into(),
            }),
        );
        assert!(own.poll(now).is_none());
        // Not taken over: nothing to restore.
        assert!(own.abandon().is_empty());
    }
}
