//! `relay`: the wgice STUN/TURN server. See `relay --help`.

use clap::Parser;
use relay::config::Args;
use relay::driver::Relay;

fn init_logs(json: bool, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// Each allocation holds a relayed socket: raise the open-file limit to the
/// hard limit so the relay is bound by its quotas, not by a default of 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let was = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                tracing::debug!(from = was, to = lim.rlim_max, "raised the open-file limit");
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    let cfg = match Args::parse().resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relay: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logs(cfg.log_json, &cfg.log_level);
    raise_fd_limit();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let relay = match Relay::start(&cfg).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("relay: {e:#}");
                return std::process::ExitCode::from(2);
            }
        };
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("relay: cannot watch SIGTERM: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        relay.stop().await;
        tracing::info!("stopped");
        std::process::ExitCode::SUCCESS
    })
}
