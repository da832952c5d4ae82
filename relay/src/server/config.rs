//! Server configuration, shared by every shard.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::auth::{Credentials, NonceSigner};
use crate::policy::PeerPolicy;

#[derive(Debug, Clone, Copy)]
pub struct ClockBase {
    /// A monotonic instant…
    pub instant: Instant,
    /// …and the Unix time (seconds) at that instant.
    pub unix: u64,
}

/// RFC 5780 alternate address configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AltAddress {
    /// The primary listening address (advertised as itself).
    pub primary: SocketAddr,
    /// The alternate address; OTHER-ADDRESS. IP and/or port differ from primary.
    pub other: SocketAddr,
}

/// Server configuration (shared by all shards; cheap to clone).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// REALM.
    pub realm: String,
    /// SOFTWARE, sent where the amplification budget allows.
    pub software: String,
    /// Users and REST secrets.
    pub credentials: Credentials,
    /// Peer deny/allow policy.
    pub policy: PeerPolicy,
    /// Local IPv4 address relayed sockets bind to (None: no IPv4 relaying).
    pub relay_ipv4: Option<IpAddr>,
    /// Local IPv6 address relayed sockets bind to.
    pub relay_ipv6: Option<IpAddr>,
    /// Advertised IPv4 relayed address when behind a 1:1 NAT (`--external-ip`).
    pub external_ipv4: Option<IpAddr>,
    /// Advertised IPv6 relayed address.
    pub external_ipv6: Option<IpAddr>,
    /// Inclusive relay port range of this shard.
    pub port_range: (u16, u16),
    /// The relay's whole port range (all shards). A peer on the relay's own
    /// address is allowed only on these ports: that is another allocation
    /// (relay-to-relay, needed when both peers sit behind symmetric NATs),
    /// never the relay's own services.
    pub relay_ports: (u16, u16),
    /// Allocation lifetime when the client asks for less or none (600 s).
    pub default_lifetime: Duration,
    /// Highest allocation lifetime (3600 s).
    pub max_lifetime: Duration,
    /// Permission lifetime (300 s).
    pub permission_lifetime: Duration,
    /// Channel binding lifetime (600 s).
    pub channel_lifetime: Duration,
    /// Nonce lifetime.
    pub nonce_lifetime: Duration,
    /// Optional per-allocation bandwidth cap in bytes/s (both directions together).
    pub bandwidth_limit: Option<u64>,
    /// Highest permissions per allocation.
    pub max_permissions: usize,
    /// Highest channel bindings per allocation.
    pub max_channels: usize,
    /// Unauthenticated requests answered per second per source, and burst.
    pub unauth_rate: (f32, f32),
    /// Bytes of unauthenticated answers per second per source, and burst:
    /// the amplification budget (Binding answers, 401/438 challenges, errors).
    /// Binding answers that do not fit are sent without their optional
    /// attributes, or not at all.
    pub unauth_bytes: (u32, u32),
    /// RFC 5780 alternate address, when configured.
    pub alt: Option<AltAddress>,
    /// No unauthenticated answer larger than its request: Binding answers
    /// lose their optional attributes, then are dropped; challenges and
    /// errors are dropped. Clients must pad (as `relay::client` does).
    pub strict_amplification: bool,
    /// Shared nonce signer.
    pub nonces: NonceSigner,
    /// Clock relation for REST expiry.
    pub clock: ClockBase,
    /// Emit [`super::Event::FastPath`] for channel bindings a kernel fast
    /// path may forward on its own (the driver's XDP program loaded).
    pub fast_path: bool,
}

impl ServerConfig {
    /// Defaults: RFC lifetimes, IPv4 relaying on `relay_ip`, no users.
    /// `nonce_secret` keys the stateless nonces (600 s); the driver passes
    /// OS randomness, tests a fixed value. Every shard shares it.
    pub fn new(
        realm: &str,
        relay_ip: IpAddr,
        now: Instant,
        unix_now: u64,
        nonce_secret: [u8; 32],
    ) -> Self {
        let (v4, v6) = if relay_ip.is_ipv4() {
            (Some(relay_ip), None)
        } else {
            (None, Some(relay_ip))
        };
        ServerConfig {
            realm: realm.to_owned(),
            software: concat!("wgice-relay ", env!("CARGO_PKG_VERSION")).to_owned(),
            credentials: Credentials::default(),
            policy: PeerPolicy::new(vec![], vec![relay_ip]),
            relay_ipv4: v4,
            relay_ipv6: v6,
            external_ipv4: None,
            external_ipv6: None,
            port_range: (49152, 65535),
            relay_ports: (49152, 65535),
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            permission_lifetime: Duration::from_secs(300),
            channel_lifetime: Duration::from_secs(600),
            nonce_lifetime: Duration::from_secs(600),
            bandwidth_limit: None,
            max_permissions: 128,
            max_channels: 256,
            unauth_rate: (20.0, 40.0),
            unauth_bytes: (4096, 8192),
            alt: None,
            strict_amplification: false,
            nonces: NonceSigner::with_secret(nonce_secret, 600),
            clock: ClockBase {
                instant: now,
                unix: unix_now,
            },
            fast_path: false,
        }
    }
}
