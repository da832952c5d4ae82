//! Cluster bus over NATS. Subjects (under a configurable prefix `P`):
//! `P.presence` for broadcasts to every instance, `P.instance.<id>` for one
//! instance (envelopes for its nodes, sync answers). Payloads are JSON
//! [`ClusterMsg`]s. NATS delivers at most once; the router's heartbeat
//! counts repair lost presence.

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Metrics, ServerError, Shared};
use crate::router::{ClusterMsg, InstanceId, Subject};

/// Queue between the router and the NATS publisher.
const PUBLISH_QUEUE: usize = 65_536;

#[derive(Debug)]
pub(super) struct Nats {
    client: async_nats::Client,
    presence: async_nats::Subscriber,
    own: async_nats::Subscriber,
    prefix: String,
    rx: mpsc::Receiver<(Subject, ClusterMsg)>,
}

impl Nats {
    pub(super) async fn connect(
        url: &str,
        prefix: &str,
        instance: InstanceId,
    ) -> Result<(Nats, mpsc::Sender<(Subject, ClusterMsg)>), ServerError> {
        let err = |reason: String| ServerError::Nats {
            url: url.to_string(),
            reason,
        };
        let client = async_nats::ConnectOptions::new()
            .name("wgice-signaling")
            .retry_on_initial_connect()
            .connection_timeout(std::time::Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| err(e.to_string()))?;
        let presence = client
            .subscribe(format!("{prefix}.presence"))
            .await
            .map_err(|e| err(e.to_string()))?;
        let own = client
            .subscribe(format!("{prefix}.instance.{:016x}", instance.0))
            .await
            .map_err(|e| err(e.to_string()))?;
        client.flush().await.map_err(|e| err(e.to_string()))?;
        let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
        Ok((
            Nats {
                client,
                presence,
                own,
                prefix: prefix.to_string(),
                rx,
            },
            tx,
        ))
    }

    /// A handle for a final flush at shutdown.
    pub(super) fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    pub(super) async fn run(self, shared: Arc<Shared>) {
        let Nats {
            client,
            mut presence,
            mut own,
            prefix,
            mut rx,
        } = self;
        shared.with_router(|r| r.join_cluster(Instant::now()));
        let publisher = {
            let client = client.clone();
            let shared = shared.clone();
            async move {
                while let Some((subject, msg)) = rx.recv().await {
                    let subject = match subject {
                        Subject::Presence => format!("{prefix}.presence"),
                        Subject::Instance(id) => format!("{prefix}.instance.{:016x}", id.0),
                    };
                    let payload = serde_json::to_vec(&msg).expect("cluster messages serialise");
                    match client.publish(subject, payload.into()).await {
                        Ok(()) => Metrics::inc(&shared.metrics.cluster_published),
                        Err(e) => {
                            Metrics::inc(&shared.metrics.cluster_dropped);
                            warn!("NATS publish failed: {e}");
                        }
                    }
                    // No explicit flush: async-nats writes as soon as its
                    // queue drains; `flush()` would wait a PING/PONG round
                    // trip per batch and add that to every delivery.
                }
            }
        };
        let subscriber = async move {
            loop {
                let msg = tokio::select! {
                    m = presence.next() => m,
                    m = own.next() => m,
                };
                let Some(msg) = msg else {
                    warn!("NATS subscription ended");
                    return;
                };
                match serde_json::from_slice::<ClusterMsg>(&msg.payload) {
                    Ok(m) => shared.with_router(|r| r.handle_cluster(Instant::now(), m)),
                    Err(e) => {
                        Metrics::inc(&shared.metrics.cluster_dropped);
                        debug!("undecodable cluster message on {}: {e}", msg.subject);
                    }
                }
            }
        };
        tokio::join!(publisher, subscriber);
    }
}
