//! Helpers shared by the loopback and cluster tests.
#![allow(dead_code, clippy::unwrap_used, unreachable_pub)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use signaling::auth::MeshAuth;
use signaling::client::{Client, ClientConfig, Event, TransportMode};
use signaling::server::{Server, ServerConfig};
use signaling::tls::{Identity, Trust};
use signaling::PrivateKey;
use tokio::sync::oneshot;

pub const SECRET: &[u8] = b"test-secret";

pub fn mesh_auth() -> MeshAuth {
    MeshAuth::new()
        .with_mesh("red", "red-token")
        .with_mesh("blue", "blue-token")
        .with_secret(SECRET)
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub fingerprint: [u8; 32],
    pub metrics: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(listen: SocketAddr, identity: Identity, nats: Option<String>) -> Self {
        let mut cfg = ServerConfig::new(listen, identity, mesh_auth());
        cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        cfg.nats = nats;
        cfg.nats_prefix = format!("test.{}", rand::random::<u32>());
        Self::with_config(cfg).await
    }

    pub async fn with_config(cfg: ServerConfig) -> Self {
        let server = Server::bind(cfg).await.unwrap();
        let (tx, rx) = oneshot::channel();
        let addr = server.local_addr();
        let fingerprint = server.fingerprint();
        let metrics = server.metrics_addr().unwrap();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            fingerprint,
            metrics,
            stop: Some(tx),
            task,
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("server stops within 10 s")
            .unwrap();
    }

    pub fn client(&self, mesh: &str, token: &str, key: PrivateKey, mode: TransportMode) -> Client {
        let mut cfg = ClientConfig::new(
            self.addr.to_string(),
            Trust::Fingerprint(self.fingerprint),
            mesh,
            token,
            key,
        );
        cfg.transport = mode;
        cfg.backoff_min = Duration::from_millis(50);
        cfg.backoff_max = Duration::from_millis(500);
        cfg.connect_timeout = Duration::from_secs(3);
        Client::start(cfg).unwrap()
    }

    pub async fn metrics_text(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Logs to the test output when RUST_LOG is set.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn loopback() -> SocketAddr {
    init_logs();
    "127.0.0.1:0".parse().unwrap()
}

/// Waits for the first event matching `pred`, skipping others.
pub async fn wait_for(client: &mut Client, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
    let fut = async {
        loop {
            let e = client.recv().await.expect("client task alive");
            if pred(&e) {
                return e;
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(e) => e,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

pub async fn connected(client: &mut Client) {
    wait_for(client, "Connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await;
}

/// A `nats-server` on a free loopback port, killed on drop.
pub struct Nats {
    child: Child,
    pub url: String,
}

impl Nats {
    pub async fn start() -> Nats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nats-server");
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is installed (scripts/setup)");
        let nats = Nats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
        };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return nats;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nats-server did not start");
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
