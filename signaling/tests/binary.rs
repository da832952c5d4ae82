//! The real `signaling` binary: config from flags, the machine-readable
//! start line, `/healthz`, and a graceful SIGTERM.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{connected, wait_for};
use signaling::client::{Client, ClientConfig, Event, TransportMode};
use signaling::tls::Trust;
use signaling::PrivateKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn binary_serves_and_stops_gracefully_on_sigterm() {
    common::init_logs();
    let dir = std::env::temp_dir().join(format!("wgice-sig-bin-{}", rand::random::<u32>()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_signaling"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log",
            "warn",
        ])
        .arg("--self-signed-dir")
        .arg(&dir)
        .args(["--mesh", "red=red-token-0123456789"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kills the child on an early return, unless it was already reaped
    // (std then sends no signal, so a recycled pid is never hit).
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Ok(None) = self.0.try_wait() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut child = Reap(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let w: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        (w[0], w[2], w[4]),
        ("listening", "metrics", "fingerprint"),
        "{line}"
    );
    // The fingerprint printed matches the persisted certificate.
    let out = Command::new(env!("CARGO_BIN_EXE_signaling"))
        .arg("fingerprint")
        .arg("--self-signed-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), w[5]);

    let mut s = tokio::net::TcpStream::connect(w[3]).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.ends_with("ok\n"),
        "{resp}"
    );

    let fp = signaling::tls::parse_fingerprint(w[5]).unwrap();
    let mut cfg = ClientConfig::new(
        w[1],
        Trust::Fingerprint(fp),
        "red",
        "red-token-0123456789",
        PrivateKey::generate(),
    );
    cfg.transport = TransportMode::QuicOnly;
    let mut c = Client::start(cfg).unwrap();
    connected(&mut c).await;

    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    match wait_for(&mut c, "Disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await
    {
        Event::Disconnected { reason } => assert!(reason.contains("ShuttingDown"), "{reason}"),
        _ => unreachable!(),
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(dir);
}
