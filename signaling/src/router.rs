//! The sans-IO routing and presence core of a signaling instance.
//!
//! [`Router`] owns who is online in which mesh, where (this instance or
//! another one of the cluster), per-node rate limits and the cluster's
//! liveness view. It has no sockets, spawns nothing and never reads the clock:
//! every call takes `now`, and what the driver must do comes out of
//! [`Router::poll_output`] (frames to connections, connections to close,
//! cluster messages to publish). Run-loop invariant: after every call, drain
//! `poll_output` until `None`, and re-arm the timer from `poll_timeout`.
//!
//! # Cluster
//! Instances share nothing but a publish/subscribe bus (NATS in the driver).
//! Presence changes are broadcast on [`Subject::Presence`]; envelopes for a
//! node held by another instance go to that instance's own subject
//! ([`Subject::Instance`]). Each instance sends a heartbeat carrying its
//! member count; an instance silent for [`RouterConfig::instance_timeout`] is
//! considered dead and its members go offline. A heartbeat whose count does
//! not match what we hold for that instance triggers a sync request (the bus
//! is at-most-once), which the owner answers with its members.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::keys::PublicKey;
use crate::seal::Envelope;
use crate::wire::{ClientFrame, ErrorCode, Member, ServerFrame, Undeliverable, MEMBERS_PER_FRAME};

/// A connection handled by this instance (driver-assigned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// One signaling process in a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InstanceId(pub u64);

/// Where a cluster message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    /// Every instance.
    Presence,
    /// One instance.
    Instance(InstanceId),
}

/// Messages between instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ClusterMsg {
    /// `member` is online in `mesh` at `instance`.
    Online {
        /// Owner.
        instance: InstanceId,
        /// Mesh.
        mesh: String,
        /// The member.
        member: Member,
    },
    /// `key` left `mesh` at `instance`.
    Offline {
        /// Former owner.
        instance: InstanceId,
        /// Mesh.
        mesh: String,
        /// The member's key.
        key: PublicKey,
    },
    /// `instance` is alive and holds `members` registrations.
    Heartbeat {
        /// Sender.
        instance: InstanceId,
        /// Number of local registrations.
        members: u64,
    },
    /// `instance` asks for the receiver's members (answered with `Online`s).
    SyncRequest {
        /// Who asks.
        instance: InstanceId,
    },
    /// An envelope for a node held by the receiving instance.
    Deliver {
        /// Mesh of sender and recipient.
        mesh: String,
        /// The envelope.
        envelope: Envelope,
    },
}

/// What the driver must do.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// Queue `frame` on connection `conn` (drop and count it if the queue is full).
    Send(ConnId, ServerFrame),
    /// Send `frame` (an error) and close `conn`. The router has forgotten it.
    Close(ConnId, ServerFrame),
    /// Publish on the cluster bus.
    Publish(Subject, ClusterMsg),
}

/// Limits and timings of a [`Router`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RouterConfig {
    /// Frames per second a node may send, sustained.
    pub rate_per_sec: f64,
    /// Burst above the sustained rate.
    pub rate_burst: f64,
    /// Most members a mesh may have.
    pub max_mesh_members: usize,
    /// Cluster heartbeat period.
    pub heartbeat: Duration,
    /// An instance silent this long is dead.
    pub instance_timeout: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            rate_per_sec: 50.0,
            rate_burst: 200.0,
            max_mesh_members: 10_000,
            heartbeat: Duration::from_secs(2),
            instance_timeout: Duration::from_secs(7),
        }
    }
}

/// Counters kept by the router.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct RouterStats {
    /// Envelopes handed to a local connection or to another instance.
    pub routed: u64,
    /// Envelopes whose recipient was not online.
    pub undeliverable: u64,
    /// Frames dropped by the per-node rate limit.
    pub rate_limited: u64,
    /// Presence events generated for local members.
    pub presence_events: u64,
}

#[derive(Debug)]
enum Location {
    Local(ConnId),
    Remote(InstanceId),
}

#[derive(Debug)]
struct Entry {
    overlay: Vec<String>,
    at: Location,
}

#[derive(Debug)]
struct Conn {
    mesh: String,
    key: PublicKey,
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
struct Remote {
    last_seen: Instant,
}

/// Routing and presence state of one instance. See the module doc.
#[derive(Debug)]
pub struct Router {
    cfg: RouterConfig,
    instance: InstanceId,
    meshes: HashMap<String, HashMap<PublicKey, Entry>>,
    conns: HashMap<ConnId, Conn>,
    remotes: HashMap<InstanceId, Remote>,
    clustered: bool,
    next_heartbeat: Option<Instant>,
    out: VecDeque<Output>,
    stats: RouterStats,
}

fn error(code: ErrorCode, message: impl Into<String>, fatal: bool) -> ServerFrame {
    ServerFrame::Error {
        code,
        message: message.into(),
        fatal,
    }
}

impl Router {
    /// A router for `instance`, standalone until [`Router::join_cluster`].
    pub fn new(cfg: RouterConfig, instance: InstanceId) -> Self {
        Router {
            cfg,
            instance,
            meshes: HashMap::new(),
            conns: HashMap::new(),
            remotes: HashMap::new(),
            clustered: false,
            next_heartbeat: None,
            out: VecDeque::new(),
            stats: RouterStats::default(),
        }
    }

    /// This instance's id.
    pub fn instance(&self) -> InstanceId {
        self.instance
    }

    /// Counters.
    pub fn stats(&self) -> &RouterStats {
        &self.stats
    }

    /// Nodes registered on this instance.
    pub fn local_members(&self) -> usize {
        self.conns.len()
    }

    /// Members known in `mesh` (all instances).
    pub fn mesh_size(&self, mesh: &str) -> usize {
        self.meshes.get(mesh).map_or(0, |m| m.len())
    }

    /// Starts cluster mode: announces this instance and asks the others for
    /// their members.
    pub fn join_cluster(&mut self, now: Instant) {
        self.clustered = true;
        self.out.push_back(Output::Publish(
            Subject::Presence,
            ClusterMsg::SyncRequest {
                instance: self.instance,
            },
        ));
        self.send_heartbeat(now);
    }

    /// Next output for the driver. Changes after any `handle_*`, `register`,
    /// `unregister` or `join_cluster` call.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Router::handle_timeout`] wants to be called next. Changes after
    /// `join_cluster`, `handle_cluster` and `handle_timeout`.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let expiry = self
            .remotes
            .values()
            .map(|r| r.last_seen + self.cfg.instance_timeout)
            .min();
        match (self.next_heartbeat, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Sends heartbeats and expires silent instances.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_heartbeat.is_some_and(|t| t <= now) {
            self.send_heartbeat(now);
        }
        let dead: Vec<InstanceId> = self
            .remotes
            .iter()
            .filter(|(_, r)| r.last_seen + self.cfg.instance_timeout <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.remotes.remove(&id);
            self.drop_instance(id);
        }
    }

    fn send_heartbeat(&mut self, now: Instant) {
        self.out.push_back(Output::Publish(
            Subject::Presence,
            ClusterMsg::Heartbeat {
                instance: self.instance,
                members: self.conns.len() as u64,
            },
        ));
        self.next_heartbeat = Some(now + self.cfg.heartbeat);
    }

    fn drop_instance(&mut self, id: InstanceId) {
        let mut gone = Vec::new();
        for (mesh, members) in &mut self.meshes {
            members.retain(|key, e| {
                let theirs = matches!(e.at, Location::Remote(i) if i == id);
                if theirs {
                    gone.push((mesh.clone(), *key));
                }
                !theirs
            });
        }
        for (mesh, key) in gone {
            self.notify_mesh(&mesh, Some(&key), ServerFrame::Offline { key });
        }
        self.meshes.retain(|_, m| !m.is_empty());
    }

    /// Registers an authenticated node on `conn` (the driver has checked the
    /// proof and the mesh token). Replaces an older registration of the same
    /// key in the same mesh.
    pub fn register(
        &mut self,
        now: Instant,
        conn: ConnId,
        mesh: &str,
        key: PublicKey,
        overlay: Vec<String>,
    ) {
        let members = self.meshes.entry(mesh.to_string()).or_default();
        if !members.contains_key(&key) && members.len() >= self.cfg.max_mesh_members {
            let msg = format!(
                "mesh {mesh:?} has reached its limit of {} members",
                self.cfg.max_mesh_members
            );
            self.out
                .push_back(Output::Close(conn, error(ErrorCode::MeshFull, msg, true)));
            if members.is_empty() {
                self.meshes.remove(mesh);
            }
            return;
        }
        let previous = members.insert(
            key,
            Entry {
                overlay: overlay.clone(),
                at: Location::Local(conn),
            },
        );
        if let Some(Entry {
            at: Location::Local(old),
            ..
        }) = previous
        {
            if old != conn {
                self.conns.remove(&old);
                self.out.push_back(Output::Close(
                    old,
                    error(
                        ErrorCode::Replaced,
                        "this key registered again on a newer connection",
                        true,
                    ),
                ));
            }
        }
        self.conns.insert(
            conn,
            Conn {
                mesh: mesh.to_string(),
                key,
                tokens: self.cfg.rate_burst,
                last: now,
            },
        );
        self.out.push_back(Output::Send(
            conn,
            ServerFrame::Registered {
                mesh: mesh.to_string(),
                key,
            },
        ));
        self.send_members(conn);
        let member = Member { key, overlay };
        self.notify_mesh(
            mesh,
            Some(&key),
            ServerFrame::Online {
                member: member.clone(),
            },
        );
        if self.clustered {
            self.out.push_back(Output::Publish(
                Subject::Presence,
                ClusterMsg::Online {
                    instance: self.instance,
                    mesh: mesh.to_string(),
                    member,
                },
            ));
        }
    }

    /// Forgets `conn` (closed by the peer or the driver). Members of its mesh
    /// learn it went offline unless the key registered again elsewhere.
    pub fn unregister(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let Some(members) = self.meshes.get_mut(&c.mesh) else {
            return;
        };
        let ours =
            matches!(members.get(&c.key), Some(Entry { at: Location::Local(x), .. }) if *x == conn);
        if !ours {
            return;
        }
        members.remove(&c.key);
        if members.is_empty() {
            self.meshes.remove(&c.mesh);
        }
        self.notify_mesh(&c.mesh, Some(&c.key), ServerFrame::Offline { key: c.key });
        if self.clustered {
            self.out.push_back(Output::Publish(
                Subject::Presence,
                ClusterMsg::Offline {
                    instance: self.instance,
                    mesh: c.mesh,
                    key: c.key,
                },
            ));
        }
    }

    /// Handles a frame from a registered connection.
    pub fn handle_client(&mut self, now: Instant, conn: ConnId, frame: ClientFrame) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        // Token bucket per node.
        let elapsed = now.saturating_duration_since(c.last).as_secs_f64();
        c.last = now;
        c.tokens = (c.tokens + elapsed * self.cfg.rate_per_sec).min(self.cfg.rate_burst);
        if c.tokens < 1.0 {
            self.stats.rate_limited += 1;
            let msg = format!(
                "rate limit of {} frames/s exceeded; frame dropped",
                self.cfg.rate_per_sec
            );
            self.out.push_back(Output::Send(
                conn,
                error(ErrorCode::RateLimited, msg, false),
            ));
            return;
        }
        c.tokens -= 1.0;
        // A member list costs one token per frame it takes (a node asking
        // for 10,000 members over and over must not get 40 frames for 1).
        if matches!(frame, ClientFrame::ListMembers) {
            let n = self.meshes.get(&c.mesh).map_or(0, |m| m.len());
            let extra = (n.saturating_sub(1) / MEMBERS_PER_FRAME) as f64;
            if c.tokens < extra {
                self.stats.rate_limited += 1;
                self.out.push_back(Output::Send(
                    conn,
                    error(
                        ErrorCode::RateLimited,
                        format!(
                            "member list of {n} needs {} frames of the {} frames/s rate; ask less often",
                            extra + 1.0,
                            self.cfg.rate_per_sec
                        ),
                        false,
                    ),
                ));
                return;
            }
            c.tokens -= extra;
        }
        let (mesh, key) = (c.mesh.clone(), c.key);
        match frame {
            ClientFrame::Send { envelope } => self.route(conn, &mesh, key, envelope),
            ClientFrame::ListMembers => self.send_members(conn),
            ClientFrame::Ping { id } => self
                .out
                .push_back(Output::Send(conn, ServerFrame::Pong { id })),
            ClientFrame::Register { .. } => {
                self.unregister(conn);
                self.out.push_back(Output::Close(
                    conn,
                    error(
                        ErrorCode::Protocol,
                        "already registered on this connection",
                        true,
                    ),
                ));
            }
        }
    }

    fn route(&mut self, conn: ConnId, mesh: &str, from: PublicKey, envelope: Envelope) {
        if envelope.from != from {
            self.unregister(conn);
            let msg = format!(
                "envelope.from {} is not the key registered on this connection ({from})",
                envelope.from
            );
            self.out
                .push_back(Output::Close(conn, error(ErrorCode::Protocol, msg, true)));
            return;
        }
        let to = envelope.to;
        match self
            .meshes
            .get(mesh)
            .and_then(|m| m.get(&to))
            .map(|e| &e.at)
        {
            Some(Location::Local(dst)) => {
                self.stats.routed += 1;
                self.out
                    .push_back(Output::Send(*dst, ServerFrame::Message { envelope }));
            }
            Some(Location::Remote(inst)) => {
                self.stats.routed += 1;
                self.out.push_back(Output::Publish(
                    Subject::Instance(*inst),
                    ClusterMsg::Deliver {
                        mesh: mesh.to_string(),
                        envelope,
                    },
                ));
            }
            None => {
                self.stats.undeliverable += 1;
                self.out.push_back(Output::Send(
                    conn,
                    ServerFrame::Undeliverable {
                        to,
                        reason: Undeliverable::Offline,
                    },
                ));
            }
        }
    }

    /// Handles a message from the cluster bus.
    pub fn handle_cluster(&mut self, now: Instant, msg: ClusterMsg) {
        match msg {
            ClusterMsg::Online {
                instance,
                mesh,
                member,
            } if instance != self.instance => {
                self.touch(now, instance);
                let members = self.meshes.entry(mesh.clone()).or_default();
                let previous = members.insert(
                    member.key,
                    Entry {
                        overlay: member.overlay.clone(),
                        at: Location::Remote(instance),
                    },
                );
                if let Some(Entry {
                    at: Location::Local(old),
                    ..
                }) = previous
                {
                    // The node moved to another instance: close the stale
                    // connection here without announcing it offline.
                    self.conns.remove(&old);
                    self.out.push_back(Output::Close(
                        old,
                        error(
                            ErrorCode::Replaced,
                            "this key registered again on another instance",
                            true,
                        ),
                    ));
                }
                let unchanged = matches!(&previous, Some(Entry { overlay, at: Location::Remote(i) }) if *i == instance && *overlay == member.overlay);
                if !unchanged {
                    let key = member.key;
                    self.notify_mesh(&mesh, Some(&key), ServerFrame::Online { member });
                }
            }
            ClusterMsg::Offline {
                instance,
                mesh,
                key,
            } if instance != self.instance => {
                self.touch(now, instance);
                if let Some(members) = self.meshes.get_mut(&mesh) {
                    if matches!(members.get(&key), Some(Entry { at: Location::Remote(i), .. }) if *i == instance)
                    {
                        members.remove(&key);
                        if members.is_empty() {
                            self.meshes.remove(&mesh);
                        }
                        self.notify_mesh(&mesh, Some(&key), ServerFrame::Offline { key });
                    }
                }
            }
            ClusterMsg::Heartbeat { instance, members } if instance != self.instance => {
                let new = !self.remotes.contains_key(&instance);
                self.touch(now, instance);
                let held = self
                    .meshes
                    .values()
                    .flat_map(|m| m.values())
                    .filter(|e| matches!(e.at, Location::Remote(i) if i == instance))
                    .count() as u64;
                if held != members || (new && members > 0) {
                    if held > members {
                        // We hold members it no longer has: forget them all
                        // and let the sync re-add the live ones.
                        self.drop_instance(instance);
                    }
                    self.out.push_back(Output::Publish(
                        Subject::Instance(instance),
                        ClusterMsg::SyncRequest {
                            instance: self.instance,
                        },
                    ));
                }
            }
            ClusterMsg::SyncRequest { instance } if instance != self.instance => {
                self.touch(now, instance);
                let mut msgs = Vec::new();
                for (mesh, members) in &self.meshes {
                    for (key, e) in members {
                        if matches!(e.at, Location::Local(_)) {
                            msgs.push(ClusterMsg::Online {
                                instance: self.instance,
                                mesh: mesh.clone(),
                                member: Member {
                                    key: *key,
                                    overlay: e.overlay.clone(),
                                },
                            });
                        }
                    }
                }
                for m in msgs {
                    self.out
                        .push_back(Output::Publish(Subject::Instance(instance), m));
                }
            }
            ClusterMsg::Deliver { mesh, envelope } => {
                match self.meshes.get(&mesh).and_then(|m| m.get(&envelope.to)) {
                    Some(Entry {
                        at: Location::Local(dst),
                        ..
                    }) => {
                        self.stats.routed += 1;
                        self.out
                            .push_back(Output::Send(*dst, ServerFrame::Message { envelope }));
                    }
                    _ => self.stats.undeliverable += 1,
                }
            }
            _ => {} // our own broadcasts
        }
    }

    fn touch(&mut self, now: Instant, instance: InstanceId) {
        if self.clustered {
            self.remotes
                .entry(instance)
                .or_insert(Remote { last_seen: now })
                .last_seen = now;
        }
    }

    fn send_members(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let all: Vec<Member> = self
            .meshes
            .get(&c.mesh)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|(k, _)| **k != c.key)
            .map(|(k, e)| Member {
                key: *k,
                overlay: e.overlay.clone(),
            })
            .collect();
        let mut chunks = all.chunks(MEMBERS_PER_FRAME).peekable();
        if chunks.peek().is_none() {
            self.out.push_back(Output::Send(
                conn,
                ServerFrame::Members {
                    members: vec![],
                    done: true,
                },
            ));
        }
        while let Some(chunk) = chunks.next() {
            let done = chunks.peek().is_none();
            self.out.push_back(Output::Send(
                conn,
                ServerFrame::Members {
                    members: chunk.to_vec(),
                    done,
                },
            ));
        }
    }

    /// Sends `frame` to every local member of `mesh` except `except`.
    fn notify_mesh(&mut self, mesh: &str, except: Option<&PublicKey>, frame: ServerFrame) {
        let Some(members) = self.meshes.get(mesh) else {
            return;
        };
        for (key, e) in members {
            if Some(key) == except {
                continue;
            }
            if let Location::Local(c) = e.at {
                self.stats.presence_events += 1;
                self.out.push_back(Output::Send(c, frame.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use crate::seal::{seal, PeerMessage};

    fn drain(r: &mut Router) -> Vec<Output> {
        std::iter::from_fn(|| r.poll_output()).collect()
    }

    fn key() -> (PrivateKey, PublicKey) {
        let k = PrivateKey::generate();
        let p = k.public_key();
        (k, p)
    }

    fn env(from: &PrivateKey, to: &PublicKey) -> Envelope {
        seal(from, to, 1, &PeerMessage::Bye { session: 1 }).unwrap()
    }

    #[test]
    fn presence_members_and_routing() {
        let now = Instant::now();
        let mut r = Router::new(RouterConfig::default(), InstanceId(1));
        let (ka, a) = key();
        let (_, b) = key();
        r.register(now, ConnId(1), "m", a, vec!["10.0.0.1/32".into()]);
        let out = drain(&mut r);
        assert!(out.contains(&Output::Send(
            ConnId(1),
            ServerFrame::Members {
                members: vec![],
                done: true
            }
        )));
        r.register(now, ConnId(2), "m", b, vec!["10.0.0.2/32".into()]);
        let out = drain(&mut r);
        // A hears B come online; B gets A in its member list.
        assert!(out.contains(&Output::Send(
            ConnId(1),
            ServerFrame::Online {
                member: Member {
                    key: b,
                    overlay: vec!["10.0.0.2/32".into()]
                }
            }
        )));
        assert!(out.contains(&Output::Send(
            ConnId(2),
            ServerFrame::Members {
                members: vec![Member {
                    key: a,
                    overlay: vec!["10.0.0.1/32".into()]
                }],
                done: true
            }
        )));
        let e = env(&ka, &b);
        r.handle_client(
            now,
            ConnId(1),
            ClientFrame::Send {
                envelope: e.clone(),
            },
        );
        assert_eq!(
            drain(&mut r),
            vec![Output::Send(
                ConnId(2),
                ServerFrame::Message { envelope: e }
            )]
        );
        r.unregister(ConnId(2));
        assert_eq!(
            drain(&mut r),
            vec![Output::Send(ConnId(1), ServerFrame::Offline { key: b })]
        );
        // Now offline: undeliverable, reported to the sender.
        r.handle_client(
            now,
            ConnId(1),
            ClientFrame::Send {
                envelope: env(&ka, &b),
            },
        );
        assert_eq!(
            drain(&mut r),
            vec![Output::Send(
                ConnId(1),
                ServerFrame::Undeliverable {
                    to: b,
                    reason: Undeliverable::Offline
                }
            )]
        );
    }

    #[test]
    fn meshes_are_isolated() {
        let now = Instant::now();
        let mut r = Router::new(RouterConfig::default(), InstanceId(1));
        let (ka, a) = key();
        let (_, b) = key();
        r.register(now, ConnId(1), "red", a, vec![]);
        r.register(now, ConnId(2), "blue", b, vec![]);
        let out = drain(&mut r);
        assert!(!out
            .iter()
            .any(|o| matches!(o, Output::Send(_, ServerFrame::Online { .. }))));
        r.handle_client(
            now,
            ConnId(1),
            ClientFrame::Send {
                envelope: env(&ka, &b),
            },
        );
        assert_eq!(
            drain(&mut r),
            vec![Output::Send(
                ConnId(1),
                ServerFrame::Undeliverable {
                    to: b,
                    reason: Undeliverable::Offline
                }
            )]
        );
        r.handle_client(now, ConnId(1), ClientFrame::ListMembers);
        assert_eq!(
            drain(&mut r),
            vec![Output::Send(
                ConnId(1),
                ServerFrame::Members {
                    members: vec![],
                    done: true
                }
            )]
        );
    }

    #[test]
    fn member_lists_cost_a_token_per_frame() {
        let now = Instant::now();
        let cfg = RouterConfig {
            rate_per_sec: 1.0,
            rate_burst: 5.0,
            ..RouterConfig::default()
        };
        let mut r = Router::new(cfg, InstanceId(1));
        // 1,000 members: a list is 4 frames.
        for i in 0..1000u64 {
            let (_, k) = key();
            r.register(now, ConnId(i + 1), "m", k, vec![]);
        }
        drain(&mut r);
        r.handle_client(now, ConnId(1), ClientFrame::ListMembers);
        let out = drain(&mut r);
        assert_eq!(out.len(), 4, "{:?}", out.len());
        // 5 - 4 = 1 token left: the next list is refused, not sent.
        r.handle_client(now, ConnId(1), ClientFrame::ListMembers);
        let out = drain(&mut r);
        assert_eq!(out.len(), 1);
        assert!(
            matches!(
                &out[0],
                Output::Send(
                    _,
                    ServerFrame::Error {
                        code: ErrorCode::RateLimited,
                        ..
                    }
                )
            ),
            "{:?}",
            out[0]
        );
    }

    #[test]
    fn spoofed_sender_is_closed() {
        let now = Instant::now();
        let mut r = Router::new(RouterConfig::default(), InstanceId(1));
        let (_, a) = key();
        let (kb, b) = key();
        let (_, c) = key();
        r.register(now, ConnId(1), "m", a, vec![]);
        r.register(now, ConnId(2), "m", c, vec![]);
        drain(&mut r);
        // A sends an envelope claiming to come from B.
        r.handle_client(
            now,
            ConnId(1),
            ClientFrame::Send {
                envelope: env(&kb, &c),
            },
        );
        let out = drain(&mut r);
        assert!(matches!(
            out.last(),
            Some(Output::Close(
                ConnId(1),
                ServerFrame::Error {
                    code: ErrorCode::Protocol,
                    ..
                }
            ))
        ));
        assert!(!out
            .iter()
            .any(|o| matches!(o, Output::Send(ConnId(2), ServerFrame::Message { .. }))));
        let _ = b;
    }

    #[test]
    fn rate_limit_and_recovery() {
        let now = Instant::now();
        let cfg = RouterConfig {
            rate_per_sec: 10.0,
            rate_burst: 5.0,
            ..Default::default()
        };
        let mut r = Router::new(cfg, InstanceId(1));
        let (_, a) = key();
        r.register(now, ConnId(1), "m", a, vec![]);
        drain(&mut r);
        for i in 0..5 {
            r.handle_client(now, ConnId(1), ClientFrame::Ping { id: i });
        }
        assert_eq!(drain(&mut r).len(), 5);
        r.handle_client(now, ConnId(1), ClientFrame::Ping { id: 9 });
        assert!(matches!(
            drain(&mut r)[..],
            [Output::Send(
                _,
                ServerFrame::Error {
                    code: ErrorCode::RateLimited,
                    fatal: false,
                    ..
                }
            )]
        ));
        r.handle_client(
            now + Duration::from_millis(200),
            ConnId(1),
            ClientFrame::Ping { id: 10 },
        );
        assert_eq!(
            drain(&mut r),
            vec![Output::Send(ConnId(1), ServerFrame::Pong { id: 10 })]
        );
        assert_eq!(r.stats().rate_limited, 1);
    }

    #[test]
    fn reregistration_replaces_old_connection() {
        let now = Instant::now();
        let mut r = Router::new(RouterConfig::default(), InstanceId(1));
        let (_, a) = key();
        let (_, b) = key();
        r.register(now, ConnId(1), "m", a, vec![]);
        r.register(now, ConnId(2), "m", b, vec![]);
        drain(&mut r);
        r.register(now, ConnId(3), "m", a, vec![]);
        let out = drain(&mut r);
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Close(
                ConnId(1),
                ServerFrame::Error {
                    code: ErrorCode::Replaced,
                    ..
                }
            )
        )));
        // Closing the old one later announces nothing.
        r.unregister(ConnId(1));
        assert!(drain(&mut r).is_empty());
        assert_eq!(r.mesh_size("m"), 2);
    }

    #[test]
    fn mesh_limit() {
        let now = Instant::now();
        let cfg = RouterConfig {
            max_mesh_members: 1,
            ..Default::default()
        };
        let mut r = Router::new(cfg, InstanceId(1));
        r.register(now, ConnId(1), "m", key().1, vec![]);
        drain(&mut r);
        r.register(now, ConnId(2), "m", key().1, vec![]);
        assert!(matches!(
            drain(&mut r)[..],
            [Output::Close(
                ConnId(2),
                ServerFrame::Error {
                    code: ErrorCode::MeshFull,
                    ..
                }
            )]
        ));
    }

    /// Two routers joined by a perfect in-memory bus.
    fn pump(rs: &mut [&mut Router], now: Instant) -> Vec<(usize, Output)> {
        let mut local = Vec::new();
        loop {
            let mut bus = Vec::new();
            for (i, r) in rs.iter_mut().enumerate() {
                while let Some(o) = r.poll_output() {
                    match o {
                        Output::Publish(s, m) => bus.push((i, s, m)),
                        o => local.push((i, o)),
                    }
                }
            }
            if bus.is_empty() {
                return local;
            }
            for (from, s, m) in bus {
                for (i, r) in rs.iter_mut().enumerate() {
                    let to_me = match s {
                        Subject::Presence => i != from,
                        Subject::Instance(id) => r.instance() == id,
                    };
                    if to_me {
                        r.handle_cluster(now, m.clone());
                    }
                }
            }
        }
    }

    #[test]
    fn cluster_presence_routing_and_expiry() {
        let mut now = Instant::now();
        let mut r1 = Router::new(RouterConfig::default(), InstanceId(1));
        let mut r2 = Router::new(RouterConfig::default(), InstanceId(2));
        r1.join_cluster(now);
        let (ka, a) = key();
        let (_, b) = key();
        r1.register(now, ConnId(1), "m", a, vec![]);
        pump(&mut [&mut r1, &mut r2], now);
        // r2 joins late and syncs A.
        r2.join_cluster(now);
        pump(&mut [&mut r1, &mut r2], now);
        assert_eq!(r2.mesh_size("m"), 1);
        r2.register(now, ConnId(7), "m", b, vec![]);
        let out = pump(&mut [&mut r1, &mut r2], now);
        assert!(out.contains(&(
            0,
            Output::Send(
                ConnId(1),
                ServerFrame::Online {
                    member: Member {
                        key: b,
                        overlay: vec![]
                    }
                }
            )
        )));
        assert!(out.contains(&(
            1,
            Output::Send(
                ConnId(7),
                ServerFrame::Members {
                    members: vec![Member {
                        key: a,
                        overlay: vec![]
                    }],
                    done: true
                }
            )
        )));
        let e = env(&ka, &b);
        r1.handle_client(
            now,
            ConnId(1),
            ClientFrame::Send {
                envelope: e.clone(),
            },
        );
        let out = pump(&mut [&mut r1, &mut r2], now);
        assert_eq!(
            out,
            vec![(
                1,
                Output::Send(ConnId(7), ServerFrame::Message { envelope: e })
            )]
        );
        // r2 dies silently: after the timeout A sees B offline.
        let mut events = Vec::new();
        for _ in 0..5 {
            now += Duration::from_secs(2);
            r1.handle_timeout(now);
            events.extend(pump(&mut [&mut r1], now));
        }
        assert!(events.contains(&(0, Output::Send(ConnId(1), ServerFrame::Offline { key: b }))));
        assert_eq!(r1.mesh_size("m"), 1);
    }

    #[test]
    fn lost_presence_is_repaired_by_heartbeat_sync() {
        let now = Instant::now();
        let mut r1 = Router::new(RouterConfig::default(), InstanceId(1));
        let mut r2 = Router::new(RouterConfig::default(), InstanceId(2));
        r1.join_cluster(now);
        r2.join_cluster(now);
        pump(&mut [&mut r1, &mut r2], now);
        r1.register(now, ConnId(1), "m", key().1, vec![]);
        drain(&mut r1); // the bus lost r1's Online
        assert_eq!(r2.mesh_size("m"), 0);
        r1.handle_timeout(now + Duration::from_secs(3));
        pump(&mut [&mut r1, &mut r2], now);
        assert_eq!(r2.mesh_size("m"), 1);
    }
}
