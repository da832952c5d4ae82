//! Configuration of the `relay` binary: a clap CLI over a TOML file with the
//! same keys (the command line overrides the file), resolved and checked into
//! a [`RelayConfig`]. Every error names the key and how to fix it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;
use ipnet::IpNet;
use serde::Deserialize;

/// STUN/TURN relay for wgice: forwards encrypted WireGuard packets between
/// peers that cannot reach each other directly, and tells agents their
/// public address (STUN, RFC 5780 behaviour discovery with --alt-listen).
#[derive(Debug, Default, Clone, Parser, Deserialize)]
#[command(name = "relay", version)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Args {
    /// TOML file with the same keys as these flags (e.g. `listen = ["0.0.0.0:3478"]`);
    /// flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// UDP address to serve STUN/TURN on (repeatable; default 0.0.0.0:3478).
    #[arg(long, value_name = "ADDR:PORT")]
    #[serde(default)]
    pub listen: Vec<SocketAddr>,

    /// TCP address to serve TURN over TCP on (repeatable).
    #[arg(long, value_name = "ADDR:PORT")]
    #[serde(default)]
    pub tcp_listen: Vec<SocketAddr>,

    /// TLS address to serve TURN over TLS on (repeatable; needs --cert and --key).
    /// Use port 443 for networks that only let HTTPS out.
    #[arg(long, value_name = "ADDR:PORT")]
    #[serde(default)]
    pub tls_listen: Vec<SocketAddr>,

    /// PEM certificate chain for --tls-listen.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// PEM private key for --tls-listen.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// Second UDP address for RFC 5780 NAT behaviour discovery (OTHER-ADDRESS,
    /// CHANGE-REQUEST). Use a second IP and/or port of this host.
    #[arg(long, value_name = "ADDR:PORT")]
    pub alt_listen: Option<SocketAddr>,

    /// Authentication realm.
    #[arg(long, value_name = "REALM")]
    pub realm: Option<String>,

    /// Static user as NAME:PASSWORD (repeatable).
    #[arg(long, value_name = "NAME:PASS")]
    #[serde(default)]
    pub user: Vec<String>,

    /// Shared secret for TURN REST ephemeral credentials (username `expiry:user`,
    /// password base64(HMAC-SHA1(secret, username)); coturn's use-auth-secret).
    /// Repeat to accept several secrets while rotating.
    #[arg(long, value_name = "SECRET", env = "RELAY_AUTH_SECRET")]
    #[serde(default)]
    pub auth_secret: Vec<String>,

    /// Allow relaying to a range the default policy denies (repeatable),
    /// e.g. 10.0.0.0/8 for a private cluster.
    #[arg(long, value_name = "CIDR")]
    #[serde(default)]
    pub allow_peer: Vec<IpNet>,

    /// Public address to advertise as the relayed address when the host sits
    /// behind a 1:1 NAT (cloud). One per family (repeatable).
    #[arg(long, value_name = "IP")]
    #[serde(default)]
    pub external_ip: Vec<IpAddr>,

    /// Local address relayed sockets bind to, one per family (repeatable).
    /// Default: the first --listen address's IP when it is not a wildcard.
    #[arg(long, value_name = "IP")]
    #[serde(default)]
    pub relay_ip: Vec<IpAddr>,

    /// Relayed port range, LOW-HIGH.
    #[arg(long, value_name = "LOW-HIGH")]
    pub relay_ports: Option<String>,

    /// Highest number of allocations in total (0: unlimited).
    #[arg(long, value_name = "N")]
    pub max_allocations: Option<usize>,

    /// Highest number of allocations per user (0: unlimited).
    #[arg(long, value_name = "N")]
    pub max_allocations_per_user: Option<u32>,

    /// Bandwidth cap per allocation in bytes per second, both directions (0: none).
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub bandwidth_limit: Option<u64>,

    /// Unauthenticated requests per second answered for one source (an IPv4
    /// address or an IPv6 /64), all workers together; burst twice that.
    #[arg(long, value_name = "N")]
    pub unauth_rate: Option<f32>,

    /// Bytes per second of unauthenticated answers (Binding, 401/438, errors)
    /// sent to one source, all workers together; burst twice that (default
    /// 4096). This bounds reflection towards a spoofed victim; a Binding answer
    /// over the budget loses its RFC 5780 attributes, then is dropped.
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub unauth_bytes: Option<u32>,

    /// No unauthenticated answer larger than its request: Binding answers lose
    /// their optional attributes or are dropped, 401/438 and errors are
    /// dropped (no amplification at all; clients must pad their requests, as
    /// `relay::client` does with `pad_unauthenticated`; unpadded RFC 5780
    /// clients get no answer).
    #[arg(long)]
    #[serde(default)]
    pub strict_amplification: bool,

    /// Highest allocation lifetime in seconds (default 3600).
    #[arg(long, value_name = "SECS")]
    pub max_lifetime: Option<u64>,

    /// Channel binding lifetime in seconds (default 600, as RFC 8656 says;
    /// like coturn's flag of that name, only for tests and drills).
    #[arg(long, value_name = "SECS", hide = true)]
    pub channel_lifetime: Option<u64>,

    /// Permission lifetime in seconds (default 300, as RFC 8656 says; only
    /// for tests and drills).
    #[arg(long, value_name = "SECS", hide = true)]
    pub permission_lifetime: Option<u64>,

    /// Forward ChannelData of UDP clients in the kernel with XDP on this
    /// interface (repeatable; `auto`: the interfaces holding the listening
    /// and relayed addresses). Needs specific --listen and relay addresses,
    /// root (or CAP_BPF + CAP_NET_ADMIN); where the program cannot load the
    /// relay says why and relays in user space.
    #[arg(long, value_name = "IFACE")]
    #[serde(default)]
    pub xdp: Vec<String>,

    /// Prometheus /metrics and /healthz on this TCP address.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,

    /// UDP worker threads (default: one per core).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,

    /// Log filter (tracing EnvFilter syntax), e.g. info or relay=debug.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// A configuration mistake: the key, what is wrong, how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("config: `{key}`: {problem} ({fix})")]
pub struct ConfigError {
    /// The key (flag name without dashes / TOML key).
    pub key: &'static str,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

fn err(key: &'static str, problem: impl Into<String>, fix: impl Into<String>) -> ConfigError {
    ConfigError {
        key,
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// The resolved configuration.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// UDP listening addresses (first is primary).
    pub listen: Vec<SocketAddr>,
    /// TCP listening addresses.
    pub tcp_listen: Vec<SocketAddr>,
    /// TLS listening addresses.
    pub tls_listen: Vec<SocketAddr>,
    /// Certificate and key files for TLS.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// RFC 5780 alternate address.
    pub alt_listen: Option<SocketAddr>,
    /// Realm.
    pub realm: String,
    /// Static users.
    pub users: Vec<(String, String)>,
    /// REST secrets.
    pub auth_secrets: Vec<String>,
    /// Allowed peer ranges.
    pub allow_peer: Vec<IpNet>,
    /// External (advertised) addresses.
    pub external_ip: Vec<IpAddr>,
    /// Relay bind addresses.
    pub relay_ip: Vec<IpAddr>,
    /// Relay port range.
    pub relay_ports: (u16, u16),
    /// Total allocation quota.
    pub max_allocations: usize,
    /// Per-user allocation quota.
    pub max_allocations_per_user: u32,
    /// Bandwidth cap per allocation.
    pub bandwidth_limit: Option<u64>,
    /// Unauthenticated requests per second per source.
    pub unauth_rate: f32,
    /// Unauthenticated answer bytes per second per source.
    pub unauth_bytes: u32,
    /// Strict amplification mode.
    pub strict_amplification: bool,
    /// Highest allocation lifetime (s).
    pub max_lifetime: u64,
    /// XDP fast path interfaces (`auto` resolved at start).
    pub xdp: Vec<String>,
    /// Channel binding lifetime (s).
    pub channel_lifetime: u64,
    /// Permission lifetime (s).
    pub permission_lifetime: u64,
    /// Metrics address.
    pub metrics: Option<SocketAddr>,
    /// UDP workers.
    pub workers: usize,
    /// JSON logs.
    pub log_json: bool,
    /// Log filter.
    pub log_level: String,
}

impl Args {
    /// Reads `--config` (if any) and overlays the command-line values.
    pub fn merged(self) -> Result<Args, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).map_err(|e| {
            err(
                "config",
                format!("cannot read {}: {e}", path.display()),
                "check the path and permissions",
            )
        })?;
        let file: Args = toml::from_str(&text).map_err(|e| {
            err("config", format!("{}: {e}", path.display()), "keys are the long flag names, e.g. listen = [\"0.0.0.0:3478\"], realm = \"example.org\"")
        })?;
        fn vec<T>(cli: Vec<T>, file: Vec<T>) -> Vec<T> {
            if cli.is_empty() {
                file
            } else {
                cli
            }
        }
        Ok(Args {
            config: self.config,
            listen: vec(self.listen, file.listen),
            tcp_listen: vec(self.tcp_listen, file.tcp_listen),
            tls_listen: vec(self.tls_listen, file.tls_listen),
            cert: self.cert.or(file.cert),
            key: self.key.or(file.key),
            alt_listen: self.alt_listen.or(file.alt_listen),
            realm: self.realm.or(file.realm),
            user: vec(self.user, file.user),
            auth_secret: vec(self.auth_secret, file.auth_secret),
            allow_peer: vec(self.allow_peer, file.allow_peer),
            external_ip: vec(self.external_ip, file.external_ip),
            relay_ip: vec(self.relay_ip, file.relay_ip),
            relay_ports: self.relay_ports.or(file.relay_ports),
            max_allocations: self.max_allocations.or(file.max_allocations),
            max_allocations_per_user: self
                .max_allocations_per_user
                .or(file.max_allocations_per_user),
            bandwidth_limit: self.bandwidth_limit.or(file.bandwidth_limit),
            unauth_rate: self.unauth_rate.or(file.unauth_rate),
            unauth_bytes: self.unauth_bytes.or(file.unauth_bytes),
            strict_amplification: self.strict_amplification || file.strict_amplification,
            max_lifetime: self.max_lifetime.or(file.max_lifetime),
            xdp: vec(self.xdp, file.xdp),
            channel_lifetime: self.channel_lifetime.or(file.channel_lifetime),
            permission_lifetime: self.permission_lifetime.or(file.permission_lifetime),
            metrics: self.metrics.or(file.metrics),
            workers: self.workers.or(file.workers),
            log_format: self.log_format.or(file.log_format),
            log_level: self.log_level.or(file.log_level),
        })
    }

    /// Checks and resolves the configuration.
    pub fn resolve(self) -> Result<RelayConfig, ConfigError> {
        let a = self.merged()?;
        let listen = if a.listen.is_empty() && a.tcp_listen.is_empty() && a.tls_listen.is_empty() {
            vec!["0.0.0.0:3478"
                .parse()
                .map_err(|_| err("listen", "default", "none"))?]
        } else {
            a.listen
        };
        let mut users = Vec::new();
        for u in &a.user {
            match u.split_once(':') {
                Some((n, p)) if !n.is_empty() && !p.is_empty() => {
                    users.push((n.to_owned(), p.to_owned()))
                }
                _ => {
                    return Err(err(
                        "user",
                        format!("{u:?} is not NAME:PASSWORD"),
                        "write it as --user alice:secret",
                    ))
                }
            }
        }
        if users.is_empty() && a.auth_secret.is_empty() {
            return Err(err(
                "user",
                "no credentials configured; every TURN request would be refused",
                "add --user NAME:PASS or --auth-secret SECRET",
            ));
        }
        if a.auth_secret.iter().any(|s| s.is_empty()) {
            return Err(err(
                "auth-secret",
                "empty secret",
                "use a long random string",
            ));
        }
        let tls_files = match (&a.tls_listen.is_empty(), a.cert, a.key) {
            (true, _, _) => None,
            (false, Some(c), Some(k)) => Some((c, k)),
            (false, _, _) => {
                return Err(err(
                    "tls-listen",
                    "TLS needs a certificate and a key",
                    "add --cert FILE --key FILE (PEM)",
                ))
            }
        };
        let relay_ports = match a.relay_ports.as_deref() {
            None => (49152, 65535),
            Some(s) => {
                let parsed = s.split_once('-').and_then(|(l, h)| {
                    Some((l.trim().parse::<u16>().ok()?, h.trim().parse::<u16>().ok()?))
                });
                match parsed {
                    Some((l, h)) if l > 0 && l <= h => (l, h),
                    _ => {
                        return Err(err(
                            "relay-ports",
                            format!("{s:?} is not LOW-HIGH"),
                            "e.g. --relay-ports 49152-65535",
                        ))
                    }
                }
            }
        };
        let mut relay_ip = a.relay_ip;
        if relay_ip.is_empty() {
            for l in listen.iter().chain(&a.tcp_listen).chain(&a.tls_listen) {
                if !l.ip().is_unspecified()
                    && !relay_ip
                        .iter()
                        .any(|r: &IpAddr| r.is_ipv4() == l.ip().is_ipv4())
                {
                    relay_ip.push(l.ip());
                }
            }
        }
        if relay_ip.is_empty() {
            if a.external_ip.is_empty() {
                return Err(err(
                    "relay-ip",
                    "listening on a wildcard address leaves no address to advertise for relayed sockets",
                    "set --relay-ip (a local address of this host) or --external-ip (the public one behind 1:1 NAT)",
                ));
            }
            for e in &a.external_ip {
                relay_ip.push(crate::driver::udp::unspecified(*e));
            }
        }
        if let Some(alt) = a.alt_listen {
            let p = listen[0];
            if alt == p {
                return Err(err(
                    "alt-listen",
                    "same as the primary --listen address",
                    "use a second IP and/or port",
                ));
            }
            if alt.is_ipv4() != p.is_ipv4() {
                return Err(err(
                    "alt-listen",
                    "family differs from the first --listen",
                    "use an address of the same family",
                ));
            }
        }
        let log_json = match a.log_format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(o) => {
                return Err(err(
                    "log-format",
                    format!("{o:?} is not a log format"),
                    "use text or json",
                ))
            }
        };
        let workers = a.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        if workers == 0 || workers > 256 {
            return Err(err("workers", format!("{workers} workers"), "use 1 to 256"));
        }
        let unauth_bytes = a.unauth_bytes.unwrap_or(4096);
        if unauth_bytes < 256 {
            return Err(err(
                "unauth-bytes",
                format!("{unauth_bytes} bytes per second cannot carry one challenge"),
                "use 256 or more (default 4096)",
            ));
        }
        let max_lifetime = a.max_lifetime.unwrap_or(3600);
        if max_lifetime < 600 {
            return Err(err(
                "max-lifetime",
                "below the 600 s default lifetime",
                "use 600 or more",
            ));
        }
        let xdp = a.xdp;
        let channel_lifetime = a.channel_lifetime.unwrap_or(600);
        let permission_lifetime = a.permission_lifetime.unwrap_or(300);
        for (key, v) in [
            ("channel-lifetime", channel_lifetime),
            ("permission-lifetime", permission_lifetime),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(err(
                    key,
                    format!("{v} s"),
                    "use 1 to 3600 (RFC 8656: 600 for channels, 300 for permissions)",
                ));
            }
        }
        if let Some(bad) = xdp.iter().find(|i| {
            i.is_empty()
                || i.len() > 15
                || i.contains(['/', ' ', '\0'])
                || i.as_str() == "."
                || i.as_str() == ".."
        }) {
            return Err(err(
                "xdp",
                format!("{bad:?} is not an interface name"),
                "give an interface such as eth0 (see `ip link`), or auto",
            ));
        }
        Ok(RelayConfig {
            listen,
            tcp_listen: a.tcp_listen,
            tls_listen: a.tls_listen,
            tls_files,
            alt_listen: a.alt_listen,
            realm: a.realm.unwrap_or_else(|| "wgice".to_owned()),
            users,
            auth_secrets: a.auth_secret,
            allow_peer: a.allow_peer,
            external_ip: a.external_ip,
            relay_ip,
            relay_ports,
            max_allocations: a.max_allocations.unwrap_or(0),
            max_allocations_per_user: a.max_allocations_per_user.unwrap_or(0),
            bandwidth_limit: a.bandwidth_limit.filter(|b| *b > 0),
            unauth_rate: a.unauth_rate.unwrap_or(50.0),
            unauth_bytes,
            strict_amplification: a.strict_amplification,
            max_lifetime,
            xdp,
            channel_lifetime,
            permission_lifetime,
            metrics: a.metrics,
            workers,
            log_json,
            log_level: a.log_level.unwrap_or_else(|| "info".to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_and_lifetime_flags_are_checked() {
        let ok = Args::parse_from([
            "relay",
            "--listen",
            "192.0.2.1:3478",
            "--user",
            "a:b",
            "--xdp",
            "eth0",
            "--xdp",
            "auto",
            "--channel-lifetime",
            "5",
        ])
        .resolve()
        .expect("config");
        assert_eq!(ok.xdp, ["eth0", "auto"]);
        assert_eq!((ok.channel_lifetime, ok.permission_lifetime), (5, 300));
        for (flag, v) in [
            ("--xdp", "../eth0"),
            ("--xdp", "an-interface-name-too-long"),
            ("--channel-lifetime", "0"),
            ("--permission-lifetime", "7200"),
        ] {
            let e = Args::parse_from([
                "relay",
                "--listen",
                "192.0.2.1:3478",
                "--user",
                "a:b",
                flag,
                v,
            ])
            .resolve()
            .expect_err(v);
            assert_eq!(e.key, flag.trim_start_matches("--"), "{e}");
        }
    }

    #[test]
    fn errors_name_the_key_and_fix() {
        let a = Args::parse_from(["relay", "--listen", "127.0.0.1:3478"]);
        let e = a.resolve().expect_err("no users");
        assert_eq!(e.key, "user");
        let a = Args::parse_from(["relay", "--listen", "127.0.0.1:3478", "--user", "bob"]);
        let e = a.resolve().expect_err("bad user");
        assert!(e.to_string().contains("NAME:PASSWORD"), "{e}");
        let a = Args::parse_from(["relay", "--listen", "0.0.0.0:3478", "--user", "a:b"]);
        assert_eq!(a.resolve().expect_err("wildcard").key, "relay-ip");
        let a = Args::parse_from([
            "relay",
            "--listen",
            "127.0.0.1:3478",
            "--user",
            "a:b",
            "--relay-ports",
            "9-2",
        ]);
        assert_eq!(a.resolve().expect_err("ports").key, "relay-ports");
    }

    #[test]
    fn file_then_cli_override() {
        let dir = std::env::temp_dir().join(format!("relay-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("relay.toml");
        std::fs::write(
            &f,
            "listen = [\"127.0.0.1:3478\"]\nrealm = \"file\"\nuser = [\"a:b\"]\nrelay-ports = \"50000-50100\"\n",
        )
        .expect("write");
        let a = Args::parse_from([
            "relay",
            "--config",
            f.to_str().expect("utf8"),
            "--realm",
            "cli",
        ]);
        let c = a.resolve().expect("ok");
        assert_eq!(c.realm, "cli");
        assert_eq!(c.relay_ports, (50000, 50100));
        assert_eq!(c.users, vec![("a".to_owned(), "b".to_owned())]);
        std::fs::write(&f, "listen = [\"127.0.0.1:3478\"]\nrelam = \"typo\"\n").expect("write");
        let a = Args::parse_from(["relay", "--config", f.to_str().expect("utf8")]);
        let e = a.resolve().expect_err("typo");
        assert!(e.to_string().contains("relam"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn shipped_example_config_resolves() {
        let f = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/relay.toml");
        let a = Args::parse_from(["relay", "--config", f, "--user", "a:b"]);
        let c = a.resolve().expect("deploy/relay.toml is valid");
        assert_eq!(c.realm, "wgice.example.org");
        assert_eq!(c.tls_listen.len(), 1);
        assert!(c.log_json);
    }
}
