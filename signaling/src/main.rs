//! `signaling`: the wgice rendezvous server. See `signaling --help`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use signaling::config::{FileConfig, MeshSection};
use signaling::server::Server;

#[derive(Parser, Debug)]
#[command(
    name = "signaling",
    version,
    about = "wgice signaling: authenticated rendezvous with sealed envelopes, presence, and a NATS-backed cluster"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once
enum Command {
    /// Run the server (the default).
    Serve(ServeArgs),
    /// Print the mesh token derived from a token secret.
    Token {
        /// Mesh name.
        #[arg(long)]
        mesh: String,
        /// File holding the secret (as `auth.token_secret_file`).
        #[arg(long)]
        secret_file: PathBuf,
    },
    /// Print the SHA-256 fingerprint agents pin (generating a self-signed
    /// certificate in the directory if none is there yet).
    Fingerprint {
        /// PEM certificate.
        #[arg(long, conflicts_with = "self_signed_dir")]
        cert: Option<PathBuf>,
        /// Self-signed certificate directory.
        #[arg(long)]
        self_signed_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug, Default)]
struct ServeArgs {
    /// TOML configuration file; flags override it.
    #[arg(long, short, env = "WGICE_SIGNALING_CONFIG")]
    config: Option<PathBuf>,
    /// QUIC (UDP) and TLS (TCP) listen address [default: 0.0.0.0:4443].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// /metrics and /healthz listen address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// NATS URL: run as one instance of a cluster.
    #[arg(long)]
    nats: Option<String>,
    /// NATS subject prefix shared by the cluster.
    #[arg(long)]
    nats_prefix: Option<String>,
    /// PEM certificate chain.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Directory for a generated self-signed certificate.
    #[arg(long, conflicts_with = "cert")]
    self_signed_dir: Option<PathBuf>,
    /// A mesh and its token, NAME=TOKEN (repeatable; adds to the file's).
    #[arg(long = "mesh", value_name = "NAME=TOKEN")]
    meshes: Vec<String>,
    /// File with the secret mesh tokens are derived from.
    #[arg(long)]
    token_secret_file: Option<PathBuf>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("signaling: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Token { mesh, secret_file }) => {
            let secret = std::fs::read(&secret_file)
                .with_context(|| format!("reading {}", secret_file.display()))?;
            println!(
                "{}",
                signaling::auth::MeshAuth::derive_token(&secret, &mesh)
            );
            Ok(())
        }
        Some(Command::Fingerprint {
            cert,
            self_signed_dir,
        }) => {
            signaling::tls::install_provider();
            let fp = match (cert, self_signed_dir) {
                (Some(c), _) => {
                    let pem =
                        std::fs::read(&c).with_context(|| format!("reading {}", c.display()))?;
                    let der = rustls_pemfile::certs(&mut &pem[..])
                        .next()
                        .context("no certificate in file")??;
                    signaling::tls::fingerprint(&der)
                }
                (None, Some(d)) => signaling::tls::Identity::self_signed_persistent(
                    &d,
                    &["wgice-signaling".into(), "localhost".into()],
                )?
                .fingerprint(),
                (None, None) => anyhow::bail!("give --cert FILE or --self-signed-dir DIR"),
            };
            println!("{}", signaling::tls::fingerprint_hex(&fp));
            Ok(())
        }
        Some(Command::Serve(args)) => serve(args),
        None => serve(cli.serve),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .with_context(|| format!("--log {:?} is not a valid filter", args.log))?;
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let mut file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    // Flags override the file.
    file.listen = args.listen.or(file.listen);
    file.metrics_listen = args.metrics_listen.or(file.metrics_listen);
    file.nats = args.nats.or(file.nats);
    file.nats_prefix = args.nats_prefix.or(file.nats_prefix);
    if args.cert.is_some() || args.self_signed_dir.is_some() {
        file.tls.cert = args.cert;
        file.tls.key = args.key;
        file.tls.self_signed_dir = args.self_signed_dir;
    }
    if args.token_secret_file.is_some() {
        file.auth.token_secret_file = args.token_secret_file;
    }
    for m in &args.meshes {
        let (name, token) = m
            .split_once('=')
            .with_context(|| format!("--mesh {m:?}: expected NAME=TOKEN"))?;
        file.mesh.push(MeshSection::new(name, token));
    }
    let cfg = file.into_server_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        signaling::server::raise_fd_limit();
        let server = Server::bind(cfg).await?;
        // One machine-readable line for scripts and the benchmark.
        println!(
            "listening {} metrics {} fingerprint {}",
            server.local_addr(),
            server
                .metrics_addr()
                .map_or_else(|| "off".to_string(), |a| a.to_string()),
            signaling::tls::fingerprint_hex(&server.fingerprint())
        );
        server.run(shutdown_signal()).await;
        Ok(())
    })
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
