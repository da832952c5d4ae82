//! `ice-agent`: ICE beside WireGuard.
//!
//! ```text
//! ice-agent up --config /etc/wgice/agent.toml     # run (foreground; SIGTERM stops it cleanly)
//! ice-agent status [--json] [--interface wg0]     # ask the running agent
//! ice-agent check --config agent.toml             # validate a config and exit
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Check { config } => match AgentConfig::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ice-agent: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Status {
            json,
            control,
            interface,
        } => {
            let path = control.unwrap_or_else(|| ice_agent::config::default_control(&interface));
            match daemon::query_status(&path, json) {
                Ok(s) => {
                    print!("{s}");
                    if s.starts_with("error:") {
                        ExitCode::FAILURE
                    } else {
                        ExitCode::SUCCESS
                    }
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
