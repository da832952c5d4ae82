//! The agent's configuration file (`agent.toml`), checked into [`AgentConfig`].
//! Every error names the key and how to fix it.
//!
//! ```toml
//! peers = "auto"             # every mesh member; or [[peers]] entries (below)
//!
//! [wireguard]
//! interface = "wg0"          # the WireGuard interface beside which the agent runs
//! mode = "external"          # "external" (existing wg) or "embedded" (the agent creates the interface)
//! private_key_file = "/etc/wgice/private.key"   # or private_key = "<base64>"; external mode: omit to read it from the interface
//! mtu = 1420                 # embedded mode: the interface's MTU
//! port = 51821               # the agent's ICE/relay UDP port (0: any)
//! address = ["10.8.0.1/32"]  # overlay address(es) advertised to the mesh
//!
//! [signaling]
//! url = "quic://signal.example.org:4433"     # or tls://HOST:PORT (TLS over TCP only)
//! pin_sha256 = "<hex SHA-256 of the server certificate>"   # or ca_file = PATH for a CA-signed one
//! mesh = "default"
//! mesh_token = "<secret shared by the mesh>"
//!
//! [agent]                    # all optional
//! control = "/run/wgice/wg0.sock"            # default /run/wgice/<interface>.sock
//! metrics = "127.0.0.1:9586"                 # Prometheus /metrics
//! exclude_interfaces = ["docker0"]           # never used for host candidates
//! max_peers = 1000                           # default: from the open-file limit
//!
//! [ice]                      # all optional
//! port_mapping = true        # ask the gateway (PCP / NAT-PMP) to forward our port
//!
//! [membership]               # optional: an operator CA binds names and addresses to keys
//! ca = ["<base64 CA public key>"]            # pinned CA keys (several while rotating)
//! certificate_file = "/etc/wgice/node.cert"  # this node's certificate (`ice-agent ca sign`)
//! address_quarantine_secs = 600              # without a CA: a vanished node's addresses wait this long
//!
//! [[relays]]
//! url = "turn:relay.example.org:3478"   # stun:, turn: (UDP), turn:…?transport=tcp, turns: (TLS)
//! username = "alice"
//! password = "…"                        # or secret = "…" for TURN REST credentials
//! # credential_lifetime_secs = 86400     # with secret: how long each minted username is valid
//! # pin_sha256 = "<hex>"                # turns:/TLS: the relay certificate's SHA-256 (or ca_file = PATH)
//!
//! # [[peers]]
//! # public_key = "<base64>"
//! # allowed_ips = ["10.8.0.2/32"]
//! ```

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

/// A configuration mistake: the key, what is wrong, how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{file}: `{key}`: {problem} ({fix})")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// The key, dotted (e.g. `relays[0].url`).
    pub key: String,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

pub use signaling::keys::{PrivateKey, PublicKey};

/// Parses a 32-byte base64 key (`wg genkey` / `wg pubkey` output).
fn key32(s: &str) -> Result<[u8; 32], String> {
    signaling::keys::decode32(s.trim()).map_err(|e| e.to_string())
}

/// How the agent relates to WireGuard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// An existing WireGuard interface (kernel, wireguard-go, boringtun) is configured beside the agent.
    External,
    /// The agent runs WireGuard itself on its own socket.
    Embedded,
}

/// Transport to a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayTransport {
    /// STUN only (no relaying).
    StunOnly,
    /// TURN over UDP.
    Udp,
    /// TURN over TCP.
    Tcp,
    /// TURN over TLS.
    Tls,
}

/// Credentials for a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayAuth {
    /// No credentials (STUN only).
    None,
    /// A static user.
    Static {
        /// Username.
        username: String,
        /// Password.
        password: String,
    },
    /// TURN REST: the agent mints `expiry:user` with this shared secret.
    Rest {
        /// User part.
        user: String,
        /// Shared secret.
        secret: String,
        /// How long each minted username is valid (re-minted every quarter
        /// of it).
        lifetime: std::time::Duration,
    },
}

/// One relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    /// Host (name or IP literal).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Transport.
    pub transport: RelayTransport,
    /// Credentials.
    pub auth: RelayAuth,
    /// How to check the relay's TLS certificate (`pin_sha256` or
    /// `ca_file`); `None`: not configured (netcheck then reports a TLS
    /// handshake as unverified).
    pub tls_trust: Option<RelayTrust>,
}

/// How the relay's TLS certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayTrust {
    /// The leaf certificate's SHA-256 (a self-signed relay).
    Pin([u8; 32]),
    /// Roots from a PEM file (the chain and the host name are verified).
    CaFile(PathBuf),
}

/// Which peers the agent manages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peers {
    /// Every member of the mesh (from signaling's member list).
    Auto,
    /// These peers only.
    List(Vec<Peer>),
}

/// One explicitly configured peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's WireGuard public key.
    pub public_key: PublicKey,
    /// Overlay addresses routed to it.
    pub allowed_ips: Vec<IpNet>,
}

/// The checked configuration.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AgentConfig {
    /// WireGuard interface name.
    pub interface: String,
    /// Mode.
    pub mode: Mode,
    /// Private key, or `None` to read it from the interface.
    pub private_key: Option<PrivateKey>,
    /// The agent's UDP port (0: any).
    pub port: u16,
    /// Embedded mode: the TUN interface's MTU.
    pub mtu: u16,
    /// Signaling URL.
    pub signaling_url: String,
    /// Pinned certificate fingerprint (SHA-256), if any.
    pub signaling_pin: Option<[u8; 32]>,
    /// Mesh token.
    pub mesh_token: String,
    /// Relays, in preference order.
    pub relays: Vec<Relay>,
    /// Peers.
    pub peers: Peers,
    /// Mesh name at the signaling server.
    pub mesh: String,
    /// Overlay addresses this node advertises to the mesh (`peers = "auto"`
    /// peers route them to us).
    pub address: Vec<String>,
    /// Unix control socket (`ice-agent status` talks to it).
    pub control: PathBuf,
    /// Prometheus listener, if any.
    pub metrics: Option<std::net::SocketAddr>,
    /// Interfaces never used for host candidates (besides WireGuard/overlay ones).
    pub exclude_interfaces: Vec<String>,
    /// CA file for a signaling server without a pinned certificate.
    pub signaling_ca: Option<PathBuf>,
    /// Most peers managed at once (`None`: derived from the fd limit).
    pub max_peers: Option<usize>,
    /// Pinned membership CA keys (Ed25519 public keys).
    pub membership_ca: Vec<[u8; 32]>,
    /// This node's membership certificate (its text).
    pub certificate: Option<String>,
    /// Without a CA: how long a vanished member's addresses wait.
    pub address_quarantine: std::time::Duration,
    /// Ask the default gateway for a port mapping (`[ice] port_mapping`).
    pub port_mapping: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    wireguard: WgSection,
    signaling: SignalingSection,
    #[serde(default)]
    relays: Vec<RelaySection>,
    peers: Option<PeersSection>,
    #[serde(default)]
    agent: AgentSection,
    #[serde(default)]
    membership: MembershipSection,
    #[serde(default)]
    ice: IceSection,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IceSection {
    #[serde(default = "yes")]
    port_mapping: bool,
}

impl Default for IceSection {
    fn default() -> Self {
        IceSection { port_mapping: true }
    }
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MembershipSection {
    #[serde(default)]
    ca: Vec<String>,
    certificate_file: Option<PathBuf>,
    address_quarantine_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AgentSection {
    control: Option<PathBuf>,
    metrics: Option<String>,
    #[serde(default)]
    exclude_interfaces: Vec<String>,
    max_peers: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WgSection {
    interface: String,
    #[serde(default = "default_mode")]
    mode: Mode,
    private_key: Option<String>,
    private_key_file: Option<PathBuf>,
    #[serde(default)]
    port: u16,
    mtu: Option<u16>,
    #[serde(default)]
    address: Vec<String>,
}

fn default_mode() -> Mode {
    Mode::External
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalingSection {
    url: String,
    pin_sha256: Option<String>,
    ca_file: Option<PathBuf>,
    #[serde(default = "default_mesh")]
    mesh: String,
    mesh_token: String,
}

fn default_mesh() -> String {
    "default".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RelaySection {
    url: String,
    username: Option<String>,
    password: Option<String>,
    secret: Option<String>,
    credential_lifetime_secs: Option<u64>,
    pin_sha256: Option<String>,
    ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PeersSection {
    Word(String),
    List(Vec<PeerSection>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerSection {
    public_key: String,
    #[serde(default)]
    allowed_ips: Vec<IpNet>,
}

impl AgentConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            key: "-".into(),
            problem: format!("cannot read: {e}"),
            fix: "check the path given to --config".into(),
        })?;
        Self::parse(&text, &path.display().to_string(), path.parent())
    }

    /// Parses and checks config text; `file` names it in errors and `dir`
    /// resolves relative `private_key_file` paths.
    pub fn parse(text: &str, file: &str, dir: Option<&Path>) -> Result<AgentConfig, ConfigError> {
        let err = |key: &str, problem: String, fix: &str| ConfigError {
            file: file.to_owned(),
            key: key.to_owned(),
            problem,
            fix: fix.to_owned(),
        };
        let f: File = toml::from_str(text).map_err(|e| {
            let fix = if e.message().contains("unknown field `peers`") {
                "`peers = ...` is a top-level key: put it before the first [section]"
            } else {
                "see the commented example deploy/agent.toml and docs/ice-agent.md"
            };
            err(
                &key_path(text, e.span(), e.message()),
                e.message().to_owned() + &span_hint(text, e.span()),
                fix,
            )
        })?;
        if f.wireguard.interface.is_empty() || f.wireguard.interface.len() > 15 {
            return Err(err(
                "wireguard.interface",
                format!("{:?} is not an interface name", f.wireguard.interface),
                "use 1 to 15 characters, e.g. \"wg0\"",
            ));
        }
        let private_key = match (&f.wireguard.private_key, &f.wireguard.private_key_file) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "wireguard.private_key",
                    "both private_key and private_key_file are set".into(),
                    "keep one of them",
                ))
            }
            (Some(k), None) => Some(key32(k).map(PrivateKey::from_bytes).map_err(|p| {
                err(
                    "wireguard.private_key",
                    p,
                    "paste the output of `wg genkey`",
                )
            })?),
            (None, Some(p)) => {
                let p = if p.is_relative() {
                    dir.map(|d| d.join(p)).unwrap_or_else(|| p.clone())
                } else {
                    p.clone()
                };
                let k = std::fs::read_to_string(&p).map_err(|e| {
                    err(
                        "wireguard.private_key_file",
                        format!("cannot read {}: {e}", p.display()),
                        "create it with `wg genkey > FILE` (mode 0600)",
                    )
                })?;
                Some(key32(&k).map(PrivateKey::from_bytes).map_err(|pr| {
                    err(
                        "wireguard.private_key_file",
                        format!("{}: {pr}", p.display()),
                        "the file must hold one key as `wg genkey` prints it",
                    )
                })?)
            }
            (None, None) if f.wireguard.mode == Mode::Embedded => {
                return Err(err(
                    "wireguard.private_key_file",
                    "embedded mode needs the node's private key (there is no interface to read it from)".into(),
                    "create one with `wg genkey > FILE` (mode 0600) and set private_key_file",
                ))
            }
            (None, None) => None,
        };
        let mtu = f.wireguard.mtu.unwrap_or(1420);
        if !(1280..=65535 - 80).contains(&mtu) {
            return Err(err(
                "wireguard.mtu",
                format!("{mtu} is out of range"),
                "use 1280 (the IPv6 minimum) to 65455; 1420 fits a 1500-byte path",
            ));
        }
        let url = &f.signaling.url;
        if !(url.starts_with("quic://") || url.starts_with("tls://"))
            || url.split("://").nth(1).is_none_or(|r| !r.contains(':'))
        {
            return Err(err(
                "signaling.url",
                format!("{url:?} is not quic://HOST:PORT or tls://HOST:PORT"),
                "e.g. url = \"quic://signal.example.org:4433\"",
            ));
        }
        let signaling_pin = match &f.signaling.pin_sha256 {
            None => None,
            Some(h) => Some(parse_hex32(h).ok_or_else(|| {
                err(
                    "signaling.pin_sha256",
                    format!("{h:?} is not 64 hex digits"),
                    "copy the fingerprint `signaling` prints at start (colons allowed)",
                )
            })?),
        };
        if f.signaling.mesh_token.len() < 16 {
            return Err(err(
                "signaling.mesh_token",
                "shorter than 16 characters".into(),
                "use the long random token of your mesh",
            ));
        }
        let mut relays = Vec::new();
        for (i, r) in f.relays.iter().enumerate() {
            let key = format!("relays[{i}]");
            let (transport, rest) = if let Some(x) = r.url.strip_prefix("stun:") {
                (RelayTransport::StunOnly, x)
            } else if let Some(x) = r.url.strip_prefix("turns:") {
                (RelayTransport::Tls, x)
            } else if let Some(x) = r.url.strip_prefix("turn:") {
                (RelayTransport::Udp, x)
            } else {
                return Err(err(
                    &format!("{key}.url"),
                    format!("{:?} has no stun:/turn:/turns: scheme", r.url),
                    "e.g. \"turn:relay.example.org:3478\"",
                ));
            };
            let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
            let transport = match (transport, query) {
                (t, "") => t,
                (RelayTransport::Udp, "transport=udp") => RelayTransport::Udp,
                (RelayTransport::Udp, "transport=tcp") => RelayTransport::Tcp,
                (_, q) => {
                    return Err(err(
                        &format!("{key}.url"),
                        format!("unsupported query {q:?}"),
                        "use ?transport=udp or ?transport=tcp with turn:",
                    ))
                }
            };
            let (host, port) = match hostport.rsplit_once(':') {
                Some((h, p)) => (
                    h.trim_start_matches('[').trim_end_matches(']').to_owned(),
                    p.parse::<u16>().map_err(|_| {
                        err(
                            &format!("{key}.url"),
                            format!("bad port in {:?}", r.url),
                            "HOST:PORT, e.g. relay.example.org:3478",
                        )
                    })?,
                ),
                None => (
                    hostport.to_owned(),
                    if transport == RelayTransport::Tls {
                        5349
                    } else {
                        3478
                    },
                ),
            };
            if host.is_empty() {
                return Err(err(
                    &format!("{key}.url"),
                    "no host".into(),
                    "e.g. \"turn:relay.example.org:3478\"",
                ));
            }
            let auth = match (&r.username, &r.password, &r.secret) {
                (None, None, None) if transport == RelayTransport::StunOnly => RelayAuth::None,
                (None, None, None) => {
                    return Err(err(
                        &key,
                        "a TURN relay needs credentials".into(),
                        "add username + password, or username + secret (TURN REST)",
                    ))
                }
                (Some(u), Some(p), None) => RelayAuth::Static {
                    username: u.clone(),
                    password: p.clone(),
                },
                (Some(u), None, Some(s)) => RelayAuth::Rest {
                    user: u.clone(),
                    secret: s.clone(),
                    lifetime: std::time::Duration::from_secs(
                        r.credential_lifetime_secs.unwrap_or(86_400),
                    ),
                },
                _ => {
                    return Err(err(
                        &key,
                        "credentials are incomplete or mixed".into(),
                        "give username + password, or username + secret",
                    ))
                }
            };
            match (r.credential_lifetime_secs, &auth) {
                (Some(s), RelayAuth::Rest { .. }) if !(20..=2_592_000).contains(&s) => {
                    return Err(err(
                        &format!("{key}.credential_lifetime_secs"),
                        format!("{s} s is out of range"),
                        "give 20 to 2592000 (30 days); the default is 86400 (24 h)",
                    ))
                }
                (Some(_), RelayAuth::Static { .. } | RelayAuth::None) => {
                    return Err(err(
                        &format!("{key}.credential_lifetime_secs"),
                        "set without a secret".into(),
                        "it applies to TURN REST credentials (username + secret); remove it",
                    ))
                }
                _ => {}
            }
            let tls_trust = match (&r.pin_sha256, &r.ca_file) {
                (Some(_), Some(_)) => {
                    return Err(err(
                        &format!("{key}.pin_sha256"),
                        "both pin_sha256 and ca_file are set".into(),
                        "keep one of them",
                    ))
                }
                (Some(h), None) => Some(RelayTrust::Pin(parse_hex32(h).ok_or_else(|| {
                    err(
                        &format!("{key}.pin_sha256"),
                        format!("{h:?} is not 64 hex digits"),
                        "the SHA-256 of the relay's DER certificate (colons allowed)",
                    )
                })?)),
                (None, Some(p)) => Some(RelayTrust::CaFile(if p.is_relative() {
                    dir.map(|d| d.join(p)).unwrap_or_else(|| p.clone())
                } else {
                    p.clone()
                })),
                (None, None) => None,
            };
            relays.push(Relay {
                host,
                port,
                transport,
                auth,
                tls_trust,
            });
        }
        if relays.is_empty() {
            return Err(err(
                "relays",
                "no relay configured: peers behind symmetric NATs could never connect".into(),
                "add at least one [[relays]] with a turn: URL",
            ));
        }
        let peers = match f.peers {
            None => {
                return Err(err(
                    "peers",
                    "missing".into(),
                    "peers = \"auto\" for every mesh member, or [[peers]] entries",
                ))
            }
            Some(PeersSection::Word(w)) if w == "auto" => Peers::Auto,
            Some(PeersSection::Word(w)) => {
                return Err(err(
                    "peers",
                    format!("{w:?} is neither \"auto\" nor a list"),
                    "peers = \"auto\" or [[peers]] entries",
                ))
            }
            Some(PeersSection::List(list)) => {
                let mut out = Vec::new();
                for (i, p) in list.iter().enumerate() {
                    let public_key = key32(&p.public_key).map(PublicKey).map_err(|pr| {
                        err(
                            &format!("peers[{i}].public_key"),
                            pr,
                            "the peer's `wg pubkey` output",
                        )
                    })?;
                    if out.iter().any(|q: &Peer| q.public_key == public_key) {
                        return Err(err(
                            &format!("peers[{i}].public_key"),
                            "listed twice".into(),
                            "merge the entries",
                        ));
                    }
                    out.push(Peer {
                        public_key,
                        allowed_ips: p.allowed_ips.clone(),
                    });
                }
                Peers::List(out)
            }
        };
        let metrics = match &f.agent.metrics {
            None => None,
            Some(m) => Some(m.parse().map_err(|_| {
                err(
                    "agent.metrics",
                    format!("{m:?} is not IP:PORT"),
                    "e.g. metrics = \"127.0.0.1:9586\"",
                )
            })?),
        };
        for (i, a) in f.wireguard.address.iter().enumerate() {
            if a.parse::<IpNet>().is_err() && a.parse::<std::net::IpAddr>().is_err() {
                return Err(err(
                    &format!("wireguard.address[{i}]"),
                    format!("{a:?} is not an IP address or IP/prefix"),
                    "the node's overlay address, e.g. \"10.8.0.1/32\"",
                ));
            }
        }
        if f.signaling.pin_sha256.is_none() && f.signaling.ca_file.is_none() {
            return Err(err(
                "signaling.pin_sha256",
                "neither pin_sha256 nor ca_file is set".into(),
                "copy the fingerprint `signaling` prints at start, or give ca_file = PATH",
            ));
        }
        if f.agent.max_peers == Some(0) {
            return Err(err(
                "agent.max_peers",
                "0 would refuse every peer".into(),
                "omit it (derived from the open-file limit) or give a positive number",
            ));
        }
        let mut membership_ca = Vec::new();
        for (i, k) in f.membership.ca.iter().enumerate() {
            let k = key32(k).map_err(|p| {
                err(
                    &format!("membership.ca[{i}]"),
                    p,
                    "paste the public key `ice-agent ca init` printed",
                )
            })?;
            membership_ca.push(k);
        }
        let certificate = match &f.membership.certificate_file {
            None => None,
            Some(p) => {
                let p = if p.is_relative() {
                    dir.map(|d| d.join(p)).unwrap_or_else(|| p.clone())
                } else {
                    p.clone()
                };
                let text = std::fs::read_to_string(&p).map_err(|e| {
                    err(
                        "membership.certificate_file",
                        format!("cannot read {}: {e}", p.display()),
                        "create it with `ice-agent ca sign … > FILE`",
                    )
                })?;
                let text = text.trim().to_owned();
                if text.len() > crate::cert::MAX_CERT_LEN || !text.starts_with("wgice-cert-v1.") {
                    return Err(err(
                        "membership.certificate_file",
                        format!("{} does not hold a wgice certificate", p.display()),
                        "the file must hold the one line `ice-agent ca sign` prints",
                    ));
                }
                Some(text)
            }
        };
        let control = f
            .agent
            .control
            .clone()
            .unwrap_or_else(|| default_control(&f.wireguard.interface));
        Ok(AgentConfig {
            mesh: f.signaling.mesh,
            address: f.wireguard.address,
            control,
            metrics,
            exclude_interfaces: f.agent.exclude_interfaces,
            signaling_ca: f.signaling.ca_file,
            max_peers: f.agent.max_peers,
            membership_ca,
            certificate,
            port_mapping: f.ice.port_mapping,
            address_quarantine: std::time::Duration::from_secs(
                f.membership.address_quarantine_secs.unwrap_or(600),
            ),
            interface: f.wireguard.interface,
            mode: f.wireguard.mode,
            private_key,
            port: f.wireguard.port,
            mtu,
            signaling_url: f.signaling.url,
            signaling_pin,
            mesh_token: f.signaling.mesh_token,
            relays,
            peers,
        })
    }
}

/// Where the control socket lives unless `agent.control` says otherwise.
pub fn default_control(interface: &str) -> PathBuf {
    PathBuf::from(format!("/run/wgice/{interface}.sock"))
}

/// The dotted key a TOML error is about (`wireguard.mode`,
/// `relays[1].url`, `signaling.mesh_token`), from the section the error's
/// span lies in and the key on its line or the field the message names.
fn key_path(text: &str, span: Option<std::ops::Range<usize>>, message: &str) -> String {
    let at = span.map_or(text.len(), |r| r.start.min(text.len()));
    let mut section = String::new();
    let mut arrays: std::collections::HashMap<String, usize> = Default::default();
    // Up to the end of the span's line: a missing field's span is the
    // section header itself.
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    for line in text[..line_end].split_inclusive('\n') {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split_once("]]")) {
            let name = name.0.trim().to_owned();
            let n = arrays.entry(name.clone()).or_insert(0);
            section = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split_once(']')) {
            section = name.0.trim().to_owned();
        }
    }
    let join = |k: &str| {
        if section.is_empty() {
            k.to_owned()
        } else {
            format!("{section}.{k}")
        }
    };
    // "missing field `x`", "unknown field `x`, expected …"
    if let Some(field) = message
        .split_once("field `")
        .and_then(|(_, r)| r.split_once('`'))
        .map(|(f, _)| f)
    {
        return join(field);
    }
    // Otherwise the key on the line the span starts on, if it is one.
    let line_begin = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_begin..].lines().next().unwrap_or_default();
    match line.split_once('=') {
        Some((k, _)) if !k.trim().is_empty() && !k.trim().starts_with('[') => {
            join(k.trim().trim_matches('"'))
        }
        _ if !section.is_empty() => section,
        _ => "(top level)".to_owned(),
    }
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PIN: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn agent_section_and_trust_are_checked() {
        let text = base("peers = \"auto\"\n");
        let c = AgentConfig::parse(&text, "a.toml", None).expect("valid");
        assert_eq!(c.mesh, "default");
        assert_eq!(c.control, default_control("wg0"));
        assert_eq!(c.metrics, None);
        let c = AgentConfig::parse(
            &format!("{text}\n[agent]\nmetrics = \"127.0.0.1:9586\"\ncontrol = \"/tmp/x.sock\"\n"),
            "a.toml",
            None,
        )
        .expect("valid");
        assert_eq!(c.metrics, Some("127.0.0.1:9586".parse().expect("addr")));
        assert_eq!(c.control, std::path::PathBuf::from("/tmp/x.sock"));
        let e = AgentConfig::parse(
            &format!("{text}\n[agent]\nmetrics = \"9586\"\n"),
            "a.toml",
            None,
        )
        .expect_err("bad metrics");
        assert_eq!(e.key, "agent.metrics");
        let e = AgentConfig::parse(
            &text.replace(&format!("pin_sha256 = \"{PIN}\"\n"), ""),
            "a.toml",
            None,
        )
        .expect_err("no trust");
        assert_eq!(e.key, "signaling.pin_sha256");
        assert!(e.fix.contains("ca_file"), "{e}");
        let e = AgentConfig::parse(
            &text.replace(
                "interface = \"wg0\"\n",
                "interface = \"wg0\"\naddress = [\"10.8.0.300\"]\n",
            ),
            "a.toml",
            None,
        )
        .expect_err("bad address");
        assert_eq!(e.key, "wireguard.address[0]");
    }

    #[test]
    fn port_mapping_is_on_unless_turned_off() {
        let text = base("peers = \"auto\"\n");
        let on = AgentConfig::parse(&text, "a.toml", None).expect("default");
        assert!(on.port_mapping);
        let off = AgentConfig::parse(
            &format!("{text}\n[ice]\nport_mapping = false\n"),
            "a.toml",
            None,
        )
        .expect("off");
        assert!(!off.port_mapping);
        assert!(AgentConfig::parse(
            &format!("{text}\n[ice]\nportmapping = false\n"),
            "a.toml",
            None
        )
        .is_err());
    }

    #[test]
    fn membership_and_max_peers_are_checked() {
        let text = base("peers = \"auto\"\n");
        let dir = std::env::temp_dir().join(format!("wgice-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("n.cert"), "wgice-cert-v1.e30.AAAA\n").expect("cert");
        let ca = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
        let c = AgentConfig::parse(
            &format!(
                "{text}\n[agent]\nmax_peers = 50\n\n[membership]\nca = [\"{ca}\"]\n\
                 certificate_file = \"n.cert\"\naddress_quarantine_secs = 30\n"
            ),
            "a.toml",
            Some(&dir),
        )
        .expect("valid");
        assert_eq!(c.max_peers, Some(50));
        assert_eq!(c.membership_ca.len(), 1);
        assert_eq!(c.certificate.as_deref(), Some("wgice-cert-v1.e30.AAAA"));
        assert_eq!(c.address_quarantine, std::time::Duration::from_secs(30));
        for (extra, key) in [
            ("[agent]\nmax_peers = 0\n", "agent.max_peers"),
            ("[membership]\nca = [\"nope\"]\n", "membership.ca[0]"),
            (
                "[membership]\ncertificate_file = \"missing.cert\"\n",
                "membership.certificate_file",
            ),
        ] {
            let e = AgentConfig::parse(&format!("{text}\n{extra}"), "a.toml", Some(&dir))
                .expect_err(extra);
            assert_eq!(e.key, key, "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn relay_tls_trust_is_checked() {
        let text = base("peers = \"auto\"\n");
        let c = AgentConfig::parse(&text, "a.toml", None).expect("valid");
        assert_eq!(c.relays[0].tls_trust, None);
        let pinned = format!("{text}pin_sha256 = \"{}\"\n", "ab:".repeat(31) + "ab");
        let c = AgentConfig::parse(&pinned, "a.toml", None).expect("pinned");
        assert_eq!(c.relays[0].tls_trust, Some(RelayTrust::Pin([0xab; 32])));
        let ca = format!("{text}ca_file = \"relay-ca.pem\"\n");
        let c = AgentConfig::parse(&ca, "a.toml", Some(Path::new("/etc/wgice"))).expect("ca");
        assert_eq!(
            c.relays[0].tls_trust,
            Some(RelayTrust::CaFile(PathBuf::from("/etc/wgice/relay-ca.pem")))
        );
        for extra in [
            "pin_sha256 = \"abc\"\n".to_owned(),
            format!(
                "pin_sha256 = \"{}\"\nca_file = \"x.pem\"\n",
                "00".repeat(32)
            ),
        ] {
            let e =
                AgentConfig::parse(&format!("{text}{extra}"), "a.toml", None).expect_err(&extra);
            assert_eq!(e.key, "relays[0].pin_sha256", "{e}");
        }
    }

    fn base(top: &str) -> String {
        format!(
            "{top}[wireguard]\ninterface = \"wg0\"\nprivate_key = \"{KEY}\"\n\n[signaling]\nurl = \"quic://127.0.0.1:4433\"\npin_sha256 = \"{PIN}\"\nmesh_token = \"0123456789abcdef0123\"\n\n[[relays]]\nurl = \"turn:127.0.0.1:3478\"\nusername = \"u\"\npassword = \"p\"\n"
        )
    }

    #[test]
    fn a_good_file_parses() {
        let c = AgentConfig::parse(&base("peers = \"auto\"\n"), "agent.toml", None).expect("valid");
        assert_eq!(c.interface, "wg0");
        assert_eq!(c.mode, Mode::External);
        let want: PrivateKey = KEY.parse().expect("key");
        assert_eq!(
            c.private_key.map(|k| k.public_key()),
            Some(want.public_key())
        );
        assert_eq!(c.relays[0].transport, RelayTransport::Udp);
        assert_eq!(c.relays[0].port, 3478);
        assert_eq!(c.peers, Peers::Auto);
        let list = base("")
            + &format!("[[peers]]\npublic_key = \"{KEY}\"\nallowed_ips = [\"10.8.0.2/32\"]\n");
        let c = AgentConfig::parse(&list, "agent.toml", None).expect("valid");
        assert!(
            matches!(c.peers, Peers::List(ref l) if l.len() == 1 && l[0].allowed_ips.len() == 1)
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (base("peers = \"all\"\n"), "peers"),
            (
                base("peers = \"auto\"\n").replace(KEY, "short"),
                "wireguard.private_key",
            ),
            (
                base("peers = \"auto\"\n").replace("quic://127.0.0.1:4433", "http://x"),
                "signaling.url",
            ),
            (
                base("peers = \"auto\"\n").replace("turn:127.0.0.1:3478", "turn:127.0.0.1:x"),
                "relays[0].url",
            ),
            (
                base("peers = \"auto\"\n").replace("password = \"p\"", ""),
                "relays[0]",
            ),
            (base(""), "peers"),
            (
                base("peers = \"auto\"\n").replace(
                    "password = \"p\"",
                    "secret = \"s\"\ncredential_lifetime_secs = 5",
                ),
                "relays[0].credential_lifetime_secs",
            ),
            (
                base("peers = \"auto\"\n") + "credential_lifetime_secs = 600\n",
                "relays[0].credential_lifetime_secs",
            ),
            (
                base("peers = \"auto\"\n").replace("0123456789abcdef0123", "short"),
                "signaling.mesh_token",
            ),
        ];
        for (text, key) in cases {
            let e = AgentConfig::parse(&text, "agent.toml", None).expect_err(key);
            assert_eq!(e.key, key, "{e}");
            assert!(e.to_string().starts_with("agent.toml: "), "{e}");
        }
        let typo = base("peers = \"auto\"\n").replace("interface", "interfase");
        let e = AgentConfig::parse(&typo, "agent.toml", None).expect_err("typo");
        assert!(
            e.to_string().contains("interfase") && e.to_string().contains("line 3"),
            "{e}"
        );
        let late = base("") + "peers = \"auto\"\n";
        let e = AgentConfig::parse(&late, "agent.toml", None).expect_err("late peers");
        assert!(e.to_string().contains("before the first [section]"), "{e}");
        // Errors serde reports name the exact key and point at the example,
        // not at a source file.
        let auto = base("peers = \"auto\"\n");
        for (text, key) in [
            (
                auto.replace(
                    "interface = \"wg0\"\n",
                    "interface = \"wg0\"\nmode = \"inline\"\n",
                ),
                "wireguard.mode",
            ),
            (
                auto.replace("mesh_token = \"0123456789abcdef0123\"\n", ""),
                "signaling.mesh_token",
            ),
            (
                auto.replace("interface", "interfase"),
                "wireguard.interfase",
            ),
            (
                auto.replace(
                    "turn:127.0.0.1:3478\"",
                    "turn:127.0.0.1:3478\"\nusrname = \"x\"",
                ),
                "relays[0].usrname",
            ),
            (
                auto.replace(
                    "interface = \"wg0\"\n",
                    "interface = \"wg0\"\nport = \"x\"\n",
                ),
                "wireguard.port",
            ),
        ] {
            let e = AgentConfig::parse(&text, "agent.toml", None).expect_err(key);
            assert_eq!(e.key, key, "{e}");
            assert!(e.fix.contains("deploy/agent.toml"), "{e}");
            assert!(!e.to_string().contains(".rs"), "{e}");
        }
    }

    #[test]
    fn relay_urls() {
        for (url, t, port) in [
            ("stun:example.org", RelayTransport::StunOnly, 3478),
            ("turns:example.org", RelayTransport::Tls, 5349),
            (
                "turn:example.org:443?transport=tcp",
                RelayTransport::Tcp,
                443,
            ),
            ("turn:[2001:db8::1]:3478", RelayTransport::Udp, 3478),
        ] {
            let text = base("peers = \"auto\"\n").replace("turn:127.0.0.1:3478", url);
            let text = if t == RelayTransport::StunOnly {
                text.replace("username = \"u\"\npassword = \"p\"\n", "")
            } else {
                text
            };
            let c = AgentConfig::parse(&text, "a", None).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(
                (c.relays[0].transport, c.relays[0].port),
                (t, port),
                "{url}"
            );
        }
    }

    #[test]
    fn key_debug_hides_material() {
        let k: PrivateKey = KEY.parse().expect("key");
        assert!(!format!("{k:?}").contains(KEY));
    }
}

#[cfg(test)]
mod deploy_example {
    use super::*;

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../deploy/agent.toml").replace(
            "private_key_file = \"/etc/wgice/private.key\"",
            "private_key = \"yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\"",
        );
        let c = AgentConfig::parse(&text, "deploy/agent.toml", None).expect("example is valid");
        assert_eq!(c.relays.len(), 1);
        assert_eq!(c.relays[0].transport, RelayTransport::Udp);
        assert_eq!(c.relays[0].port, 3478);
        assert!(matches!(
            c.relays[0].auth,
            RelayAuth::Rest { lifetime, .. } if lifetime == std::time::Duration::from_secs(86_400)
        ));
    }
}
