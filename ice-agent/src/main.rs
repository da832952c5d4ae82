//! `ice-agent`: ICE beside WireGuard.
//!
//! ```text
//! ice-agent up --config /etc/wgice/agent.toml     # run (foreground; SIGTERM stops it cleanly)
//! ice-agent status [--json] [--interface wg0]     # ask the running agent
//! ice-agent check --config agent.toml             # validate a config and exit
//! ice-agent netcheck [--config agent.toml] [--json]  # what the network lets this node do
//! ice-agent ca init --dir /etc/wgice/ca           # operator CA (Ed25519)
//! ice-agent ca sign --ca-key /etc/wgice/ca/ca.key --key PUB --name db-1 \
//!     --address 10.8.0.5/32 [--route 10.244.3.0/24] --expires 90d > db-1.cert
//! ice-agent ca show db-1.cert                     # what a certificate says
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ice_agent::config::AgentConfig;
use ice_agent::daemon;

#[derive(Parser)]
#[command(
    name = "ice-agent",
    version,
    about = "wgice: ICE per WireGuard peer, beside wg"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent in the foreground.
    Up {
        /// agent.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// Override wireguard.interface.
        #[arg(long)]
        interface: Option<String>,
        /// Override wireguard.port (the agent's UDP port; 0: any).
        #[arg(long)]
        port: Option<u16>,
        /// Override agent.control.
        #[arg(long)]
        control: Option<PathBuf>,
        /// Override agent.metrics (IP:PORT).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// Override signaling.url.
        #[arg(long)]
        signaling: Option<String>,
        /// Log filter (tracing env-filter syntax).
        #[arg(long, env = "WGICE_LOG", default_value = "info")]
        log: String,
        /// Logs as JSON lines.
        #[arg(long)]
        log_json: bool,
    },
    /// Show each peer's path and why.
    Status {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Control socket (default /run/wgice/<interface>.sock).
        #[arg(long)]
        control: Option<PathBuf>,
        /// Interface whose agent to ask.
        #[arg(long, default_value = "wg0")]
        interface: String,
    },
    /// Check a config file and exit.
    Check {
        /// agent.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Measure what the network lets this node do: UDP, public addresses,
    /// NAT mapping and filtering, hairpin, UPnP/NAT-PMP/PCP on the gateway,
    /// latency and TCP/TLS reachability of every configured relay.
    Netcheck {
        /// agent.toml (its [[relays]] and wireguard.port are used).
        #[arg(long, short, default_value = "/etc/wgice/agent.toml")]
        config: PathBuf,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Do not ask the default gateway for UPnP-IGD / NAT-PMP / PCP.
        #[arg(long)]
        no_gateway: bool,
    },
    /// Membership certificates: an operator CA binds each node's name,
    /// overlay addresses and routed ranges to its WireGuard key.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a CA key (DIR/ca.key, mode 0600) and print its public key
    /// (pin it in every agent's `membership.ca`).
    Init {
        /// Directory for ca.key and ca.pub.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Sign a node's certificate and print it (one line).
    Sign {
        /// The CA key (`ca init` wrote it).
        #[arg(long)]
        ca_key: PathBuf,
        /// The node's WireGuard public key (`wg pubkey`).
        #[arg(long)]
        key: String,
        /// The node's name (status, logs, metrics labels).
        #[arg(long)]
        name: String,
        /// An overlay address of the node (/32 or /128); repeatable.
        #[arg(long = "address")]
        addresses: Vec<ipnet::IpNet>,
        /// A range routed through the node (a site, a pod CIDR); repeatable.
        #[arg(long = "route")]
        routes: Vec<ipnet::IpNet>,
        /// Lifetime: e.g. 90d, 12h, 3600s.
        #[arg(long, default_value = "90d")]
        expires: String,
    },
    /// Print what a certificate says (and check it against a CA key).
    Show {
        /// The certificate file.
        cert: PathBuf,
        /// A CA public key to check the signature against.
        #[arg(long)]
        ca: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Ca { cmd } => match ca(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ice-agent ca: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Check { config } => match AgentConfig::load(&config) {
            Ok(c) => {
                if c.membership_ca.is_empty() && c.peers == ice_agent::config::Peers::Auto {
                    eprintln!(
                        "warning: {}: the mesh is unauthenticated: any holder of the mesh token \
                         can join and claim free overlay addresses (pin an operator CA in \
                         membership.ca; see `ice-agent ca init` and docs/ice-agent.md)",
                        config.display()
                    );
                }
                // TURN over TLS (turns:, and the fallback of turn: relays
                // when UDP is blocked) must be able to check the certificate.
                for (i, r) in c.relays.iter().enumerate() {
                    use ice_agent::config::RelayTransport;
                    if r.transport == RelayTransport::StunOnly {
                        continue;
                    }
                    let what = if r.transport == RelayTransport::Tls {
                        "TURN over TLS"
                    } else {
                        "TURN over TLS (used when UDP to the relay is blocked)"
                    };
                    match ice_agent::turn_stream::driver::Tls::for_relay(r) {
                        Err(e) => eprintln!(
                            "warning: {}: relays[{i}]: {what} is unavailable: {e}",
                            config.display()
                        ),
                        Ok(_) if r.tls_trust.is_none() => eprintln!(
                            "note: {}: relays[{i}]: {what} checks the relay's certificate \
                             against the system roots; a self-signed relay needs pin_sha256",
                            config.display()
                        ),
                        Ok(_) => {}
                    }
                }
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ice-agent: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Netcheck {
            config,
            json,
            no_gateway,
        } => netcheck(&config, json, no_gateway),
        Cmd::Status {
            json,
            control,
            interface,
        } => {
            let path = control.unwrap_or_else(|| ice_agent::config::default_control(&interface));
            match daemon::query_status(&path) {
                Ok(s) if json => match serde_json::to_string_pretty(&s) {
                    Ok(text) => {
                        println!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("ice-agent: {e}");
                        ExitCode::FAILURE
                    }
                },
                Ok(s) => {
                    print!("{}", daemon::render_status(&s));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ice-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Up {
            config,
            interface,
            port,
            control,
            metrics,
            signaling,
            log,
            log_json,
        } => {
            let mut cfg = match AgentConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ice-agent: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(i) = interface {
                cfg.control = control
                    .clone()
                    .unwrap_or_else(|| ice_agent::config::default_control(&i));
                cfg.interface = i;
            }
            if let Some(p) = port {
                cfg.port = p;
            }
            if let Some(c) = control {
                cfg.control = c;
            }
            if metrics.is_some() {
                cfg.metrics = metrics;
            }
            if let Some(s) = signaling {
                cfg.signaling_url = s;
            }
            init_logs(log_json, &log);
            let _ = rustls::crypto::ring::default_provider().install_default();
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ice-agent: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = rt.block_on(daemon::run(cfg, async {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(s) => s,
                        Err(_) => {
                            let _ = tokio::signal::ctrl_c().await;
                            return;
                        }
                    };
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
                }
            }));
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ice-agent: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn netcheck(config: &std::path::Path, json: bool, no_gateway: bool) -> ExitCode {
    let cfg = match AgentConfig::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ice-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ice-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut opts = ice_agent::netcheck::Options::default();
    opts.gateway = !no_gateway;
    let report = rt.block_on(ice_agent::netcheck::run(&cfg, &opts));
    // A name lookup still stuck in the resolver must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(t) => println!("{t}"),
            Err(e) => {
                eprintln!("ice-agent: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", ice_agent::netcheck::render(&report));
    }
    ExitCode::SUCCESS
}

fn init_logs(json: bool, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn ca(cmd: CaCmd) -> Result<(), String> {
    use base64::Engine;
    use ice_agent::cert::{self, Ca, CertBody};
    let std_b64 = base64::engine::general_purpose::STANDARD;
    match cmd {
        CaCmd::Init { dir } => {
            let key_path = dir.join("ca.key");
            if key_path.exists() {
                return Err(format!(
                    "{} exists: refusing to replace a CA key (move it away first)",
                    key_path.display()
                ));
            }
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let (ca, doc) = Ca::generate().map_err(|e| e.to_string())?;
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key_path)
                .map_err(|e| format!("{}: {e}", key_path.display()))?;
            writeln!(f, "{}", std_b64.encode(&doc)).map_err(|e| e.to_string())?;
            let public = signaling::keys::encode32(&ca.public_key());
            std::fs::write(dir.join("ca.pub"), format!("{public}\n"))
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            println!("{public}");
            eprintln!(
                "CA key in {} (keep it offline); pin the public key above in every agent's \
                 membership.ca",
                key_path.display()
            );
            Ok(())
        }
        CaCmd::Sign {
            ca_key,
            key,
            name,
            addresses,
            routes,
            expires,
        } => {
            let text = std::fs::read_to_string(&ca_key)
                .map_err(|e| format!("{}: {e}", ca_key.display()))?;
            let doc = std_b64
                .decode(text.trim())
                .map_err(|e| format!("{}: not a CA key ({e})", ca_key.display()))?;
            let ca = Ca::from_pkcs8(&doc).map_err(|e| format!("{}: {e}", ca_key.display()))?;
            let k: ice_agent::config::PublicKey =
                key.trim().parse().map_err(|e| format!("--key: {e}"))?;
            let secs = parse_duration(&expires)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|e| e.to_string())?
                .as_secs();
            let body = CertBody {
                key: k.to_string(),
                name,
                addresses,
                routes,
                // A little slack for clocks behind the signer's.
                not_before: now.saturating_sub(300),
                not_after: now.saturating_add(secs),
            };
            println!("{}", ca.sign(&body).map_err(|e| e.to_string())?);
            Ok(())
        }
        CaCmd::Show { cert: path, ca } => {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let text = text.trim();
            let body_b64 = text
                .strip_prefix("wgice-cert-v1.")
                .and_then(|r| r.split_once('.'))
                .map(|(b, _)| b)
                .ok_or("not a wgice certificate")?;
            let body = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(body_b64)
                .map_err(|e| format!("not a wgice certificate: {e}"))?;
            let b: CertBody = serde_json::from_slice(&body)
                .map_err(|e| format!("not a wgice certificate: {e}"))?;
            println!(
                "name {}\nkey {}\naddresses {:?}\nroutes {:?}\nvalid {} .. {} (Unix time)",
                b.name, b.key, b.addresses, b.routes, b.not_before, b.not_after
            );
            if let Some(ca) = ca {
                let ca = signaling::keys::decode32(ca.trim()).map_err(|e| format!("--ca: {e}"))?;
                let k: ice_agent::config::PublicKey = b.key.parse().map_err(|e| format!("{e}"))?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_err(|e| e.to_string())?
                    .as_secs();
                cert::verify(text, &[ca], &k, now).map_err(|e| e.to_string())?;
                println!("signature: valid, signed by this CA, not expired");
            }
            Ok(())
        }
    }
}

fn parse_duration(s: &str) -> Result<u64, String> {
    let (n, unit) = s.split_at(s.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len());
    let n: u64 = n
        .parse()
        .map_err(|_| format!("--expires {s:?}: a number with d, h, m or s (e.g. 90d)"))?;
    let mul = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" | "" => 1,
        _ => return Err(format!("--expires {s:?}: unit d, h, m or s")),
    };
    n.checked_mul(mul)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("--expires {s:?}: out of range"))
}
