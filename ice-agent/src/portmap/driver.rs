//! The tokio side of [`super::PortMapper`]: finds the default gateway,
//! owns one UDP socket connected to its port 5351, maps the agent's port
//! (PCP, then NAT-PMP; UPnP-IGD through `super::igd_driver` when neither
//! answers, with the SSDP search started at once beside them), and reports
//! to the main loop. Re-reads the default route every 10 s (a
//! new gateway means a new mapping) and retries every 30 s when no gateway
//! maps. [`Handle::release`] deletes the mapping on exit.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Event, PortMapper, Protocol, GATEWAY_PORT};
use crate::netcheck::gateway::{default_route, DefaultRoute};

/// Wait between attempts when no gateway maps.
const RETRY: Duration = Duration::from_secs(30);
/// How often the default route is re-read.
pub(super) const ROUTE_CHECK: Duration = Duration::from_secs(10);

/// What the main loop hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// Mapped (or the address changed).
    Mapped {
        /// The public address.
        external: SocketAddrV4,
        /// Protocol.
        protocol: Protocol,
        /// The gateway.
        gateway: std::net::Ipv4Addr,
        /// Granted lifetime.
        lifetime: Duration,
    },
    /// No mapping (any more): why.
    Unmapped {
        /// Why, for status.
        reason: String,
    },
}

/// The running driver.
#[derive(Debug)]
pub struct Handle {
    release: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Handle {
    /// Deletes the mapping at the gateway (one request, up to `wait` for
    /// the answer) and stops the driver.
    pub async fn release(mut self, wait: Duration) {
        if let Some(tx) = self.release.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(wait, &mut self.task).await.is_err() {
            self.task.abort();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts mapping UDP `port` of this host; updates go to `tx`.
pub fn spawn(port: u16, tx: mpsc::Sender<Update>) -> Handle {
    let (release, mut release_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut last_reason = String::new();
        loop {
            let reason = match run_once(port, &tx, &mut release_rx).await {
                Outcome::Released => return,
                Outcome::Stopped(reason) => reason,
            };
            if reason != last_reason {
                tracing::info!(
                    "port mapping: {reason}; retrying every {}s",
                    RETRY.as_secs()
                );
                last_reason = reason.clone();
            }
            if tx.send(Update::Unmapped { reason }).await.is_err() {
                return;
            }
            tokio::select! {
                _ = &mut release_rx => return,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    });
    Handle {
        release: Some(release),
        task,
    }
}

pub(super) enum Outcome {
    Released,
    Stopped(String),
}

pub(super) fn route() -> Option<DefaultRoute> {
    default_route(&std::fs::read_to_string("/proc/net/route").ok()?)
}

/// One mapper on the current gateway until it gives up, loses the
/// mapping, the gateway changes, or we are told to release.
async fn run_once(
    port: u16,
    tx: &mpsc::Sender<Update>,
    release_rx: &mut oneshot::Receiver<()>,
) -> Outcome {
    let Some(r) = route() else {
        return Outcome::Stopped("no IPv4 default route".into());
    };
    let gateway = SocketAddr::from((r.gateway, GATEWAY_PORT));
    let sock = match UdpSocket::bind("0.0.0.0:0").await {
        Ok(s) => s,
        Err(e) => return Outcome::Stopped(format!("socket: {e}")),
    };
    if let Err(e) = sock.connect(gateway).await {
        return Outcome::Stopped(format!("cannot reach gateway {gateway}: {e}"));
    }
    let client = match sock.local_addr() {
        Ok(SocketAddr::V4(a)) => *a.ip(),
        _ => return Outcome::Stopped("no IPv4 address towards the gateway".into()),
    };
    // UPnP-IGD is searched for at once, so a gateway that speaks only UPnP
    // is not kept waiting for the PCP and NAT-PMP timeouts.
    let ssdp = tokio::spawn(crate::netcheck::driver::ssdp_discover(
        r.gateway,
        client,
        Duration::from_millis(1200),
    ));
    let mut ssdp = AbortOnDrop(ssdp);
    let mut m = PortMapper::new(r.gateway, client, port, rand::random(), Instant::now());
    let mut route_tick = tokio::time::interval(ROUTE_CHECK);
    route_tick.tick().await;
    let mut buf = vec![0u8; 1500];
    let mut refused = 0;
    loop {
        while let Some(d) = m.poll_transmit() {
            if let Err(e) = sock.send(&d).await {
                tracing::debug!(%gateway, "port mapping: send: {e}");
            }
        }
        if m.counters().refused > refused {
            refused = m.counters().refused;
            tracing::debug!(%gateway, refused, "port mapping: refused a datagram from the gateway");
        }
        while let Some(ev) = m.poll_event() {
            match ev {
                Event::Mapped {
                    external,
                    protocol,
                    lifetime,
                } => {
                    tracing::info!(%external, protocol = protocol.name(), gateway = %r.gateway, ?lifetime, "port mapped");
                    let _ = tx
                        .send(Update::Mapped {
                            external,
                            protocol,
                            gateway: r.gateway,
                            lifetime,
                        })
                        .await;
                }
                Event::Lost { reason } => {
                    return Outcome::Stopped(format!("gateway {}: {reason}", r.gateway));
                }
                Event::Unavailable { reason } => {
                    let found = (&mut ssdp.0).await.ok().flatten();
                    return super::igd_driver::run(
                        port, &r, client, found, tx, release_rx, &reason,
                    )
                    .await;
                }
            }
        }
        let deadline = m
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + RETRY);
        tokio::select! {
            biased;
            _ = &mut *release_rx => {
                let had = m.mapping().is_some();
                m.release();
                while let Some(d) = m.poll_transmit() {
                    let _ = sock.send(&d).await;
                }
                if had {
                    // Wait briefly for the gateway's confirmation (logged only).
                    let got = tokio::time::timeout(Duration::from_millis(300), sock.recv(&mut buf)).await;
                    tracing::info!(gateway = %r.gateway, confirmed = matches!(got, Ok(Ok(_))), "port mapping deleted");
                }
                return Outcome::Released;
            }
            got = sock.recv(&mut buf) => match got {
                Ok(n) => m.handle_datagram(Instant::now(), gateway, &buf[..n]),
                // ICMP port unreachable on a connected socket: nothing
                // listens on 5351 (before any mapping: no PCP, no NAT-PMP,
                // so on to UPnP-IGD at once); otherwise the timers decide.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && m.mapping().is_none() => {
                    let found = (&mut ssdp.0).await.ok().flatten();
                    return super::igd_driver::run(port, &r, client, found, tx, release_rx, "nothing listens on UDP 5351 (no PCP or NAT-PMP)")
                        .await;
                }
                Err(e) => tracing::trace!("port mapping: recv: {e}"),
            },
            _ = tokio::time::sleep_until(deadline) => m.handle_timeout(Instant::now()),
            _ = route_tick.tick() => {
                if route().map(|n| n.gateway) != Some(r.gateway) {
                    return Outcome::Stopped(format!("default gateway {} went away", r.gateway));
                }
            }
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The status line for an update.
pub fn describe(u: &Update) -> String {
    match u {
        Update::Mapped {
            external,
            protocol,
            gateway,
            lifetime,
        } => format!(
            "{external} via {} on gateway {gateway} (lifetime {}s, renewed every {}s at most)",
            protocol.name(),
            lifetime.as_secs(),
            super::MAX_RENEW_INTERVAL
                .as_secs()
                .min(lifetime.as_secs() / 2)
        ),
        Update::Unmapped { reason } => format!("none ({reason})"),
    }
}
