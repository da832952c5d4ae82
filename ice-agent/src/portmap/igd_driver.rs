//! UPnP-IGD calls for [`super::driver`]: SSDP discovery (shared with
//! netcheck), the device description, `GetExternalIPAddress`,
//! `AddPortMapping` (renewed), and `DeletePortMapping` on release. Each
//! call is one HTTP/1.1 exchange on a fresh TCP connection to the gateway,
//! bounded in time and size; the decisions are [`super::igd`]'s.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::driver::{Outcome, Update, ROUTE_CHECK};
use super::igd::{self, Action, AddOutcome, Response, Service};
use super::{Protocol, MAX_RENEW_INTERVAL};
use crate::netcheck::gateway::{DefaultRoute, SsdpAnswer};

/// Longest a call may take (connect, send, read to the end).
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Maps UDP `port` of `client` on the IGD that answered SSDP (`ssdp`),
/// keeps it renewed and deletes it on release. `no_pcp` says why PCP and
/// NAT-PMP did not do it (for the reason when UPnP fails too).
pub(super) async fn run(
    port: u16,
    route: &DefaultRoute,
    client: Ipv4Addr,
    ssdp: Option<SsdpAnswer>,
    tx: &mpsc::Sender<Update>,
    release_rx: &mut oneshot::Receiver<()>,
    no_pcp: &str,
) -> Outcome {
    let gateway = route.gateway;
    let stop = |why: String| Outcome::Stopped(format!("gateway {gateway}: {no_pcp}; {why}"));
    let Some(location) = ssdp.and_then(|a| a.location) else {
        return stop("no UPnP-IGD answered SSDP".into());
    };
    let (service, external_ip) = match describe(&location, gateway).await {
        Ok(v) => v,
        Err(e) => return stop(format!("UPnP-IGD: {e}")),
    };
    let (mut external, mut lease) = (port, igd::LEASE_SECONDS);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let add = Action::Add {
            external,
            internal: port,
            client,
            lease,
        };
        let r = match call(&service, &add).await {
            Ok(r) => r,
            Err(e) => return stop(format!("UPnP-IGD AddPortMapping: {e}")),
        };
        match igd::after_add(&r, attempt, rand::random_range(1024..=65535), lease) {
            AddOutcome::Mapped => break,
            AddOutcome::OtherPort(p) => external = p,
            AddOutcome::Permanent => lease = 0,
            AddOutcome::GiveUp(why) => return stop(format!("UPnP-IGD: {why}")),
        }
    }
    let lifetime = Duration::from_secs(u64::from(lease));
    let mut mapped = SocketAddrV4::new(external_ip, external);
    tracing::info!(external = %mapped, protocol = "UPnP-IGD", %gateway, control = %service.control, ?lifetime, "port mapped");
    let update = |external| Update::Mapped {
        external,
        protocol: Protocol::UpnpIgd,
        gateway,
        lifetime,
    };
    let _ = tx.send(update(mapped)).await;
    let renew = if lease == 0 {
        MAX_RENEW_INTERVAL
    } else {
        (lifetime / 2).min(MAX_RENEW_INTERVAL)
    };
    let mut renew_tick = tokio::time::interval(renew);
    renew_tick.tick().await;
    let mut route_tick = tokio::time::interval(ROUTE_CHECK);
    route_tick.tick().await;
    loop {
        tokio::select! {
            biased;
            _ = &mut *release_rx => {
                let done = call(&service, &Action::Delete { external }).await;
                tracing::info!(%gateway, confirmed = matches!(done, Ok(Response { status: 200, .. })), "port mapping deleted (UPnP-IGD)");
                return Outcome::Released;
            }
            _ = renew_tick.tick() => {
                // The same AddPortMapping again (the gateway refreshes its
                // lease), and the external address again (it may move).
                let add = Action::Add { external, internal: port, client, lease };
                let renewed = match call(&service, &add).await {
                    Ok(r) if r.status == 200 => call(&service, &Action::GetExternalIp)
                        .await
                        .and_then(|r| igd::external_ip(&r)),
                    Ok(r) => Err(igd::fault("AddPortMapping", &r)),
                    Err(e) => Err(e),
                };
                match renewed {
                    Ok(ip) if ip != *mapped.ip() => {
                        mapped = SocketAddrV4::new(ip, external);
                        let _ = tx.send(update(mapped)).await;
                    }
                    Ok(_) => {}
                    Err(e) => return Outcome::Stopped(format!("gateway {gateway}: UPnP-IGD renewal failed: {e}")),
                }
            }
            _ = route_tick.tick() => {
                if super::driver::route().map(|n| n.gateway) != Some(gateway) {
                    return Outcome::Stopped(format!("default gateway {gateway} went away"));
                }
            }
        }
    }
}

/// The WAN connection service named by the description at `location`,
/// and the gateway's external address.
async fn describe(location: &str, gateway: Ipv4Addr) -> Result<(Service, Ipv4Addr), String> {
    let url = igd::parse_url(location, gateway)?;
    let desc = exchange(url.addr(), &igd::http_get(&url)).await?;
    if desc.status != 200 {
        return Err(format!("description {url}: HTTP {}", desc.status));
    }
    let service = igd::find_service(&desc.body, &url)?;
    let ip = igd::external_ip(&call(&service, &Action::GetExternalIp).await?)?;
    Ok((service, ip))
}

async fn call(service: &Service, action: &Action) -> Result<Response, String> {
    exchange(service.control.addr(), &igd::soap_request(service, action)).await
}

/// One request, and the response read until the gateway closes (at most
/// [`igd::MAX_RESPONSE`] bytes, within [`CALL_TIMEOUT`]).
async fn exchange(to: SocketAddrV4, request: &[u8]) -> Result<Response, String> {
    let io = async {
        let mut s = TcpStream::connect(to).await?;
        s.write_all(request).await?;
        let mut raw = Vec::with_capacity(4096);
        let mut limited = (&mut s).take(igd::MAX_RESPONSE as u64 + 1);
        limited.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = match tokio::time::timeout(CALL_TIMEOUT, io).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => return Err(format!("{to}: {e}")),
        Err(_) => return Err(format!("{to}: no complete answer within {CALL_TIMEOUT:?}")),
    };
    if raw.len() > igd::MAX_RESPONSE {
        return Err(format!(
            "{to}: answer larger than {} KiB",
            igd::MAX_RESPONSE / 1024
        ));
    }
    igd::parse_response(&raw).map_err(|e| format!("{to}: {e}"))
}
