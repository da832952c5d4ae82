//! The `relay` binary as an operator meets it: config errors, health, SIGTERM.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").port()
}

fn free_tcp_port() -> u16 {
    let t = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    t.local_addr().expect("addr").port()
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn config_errors_name_the_key_and_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(["--listen", "127.0.0.1:0", "--user", "nocolon"])
        .output()
        .expect("run relay");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`user`") && err.contains("NAME:PASSWORD"),
        "{err}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_relay"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--user",
            "a:b",
            "--tls-listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run relay");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cert FILE --key FILE"));
}

#[test]
fn serves_health_and_metrics_then_stops_cleanly_on_sigterm() {
    let port = free_udp_port();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port())
        .parse()
        .expect("addr");
    let child = Command::new(env!("CARGO_BIN_EXE_relay"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--user",
            "a:b",
            "--metrics",
            &metrics.to_string(),
            "--log-format",
            "json",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn relay");
    let mut child = Kill(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        if let Some(h) = http_get(metrics, "/healthz") {
            break h;
        }
        if let Ok(Some(st)) = child.0.try_wait() {
            let mut e = String::new();
            let _ = child.0.stderr.take().map(|mut s| s.read_to_string(&mut e));
            panic!("relay exited early ({st}): {e}");
        }
        assert!(Instant::now() < deadline, "relay did not come up");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"),
        "{health}"
    );

    // A STUN Binding over UDP answers with our address.
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut req = Vec::new();
    relay::stun::MessageBuilder::new(
        &mut req,
        relay::stun::method::BINDING,
        relay::stun::Class::Request,
        [3; 12],
    );
    s.send_to(&req, ("127.0.0.1", port)).expect("send");
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf).expect("binding response");
    let m = relay::stun::Message::parse(&buf[..n]).expect("stun");
    assert_eq!(
        m.xor_address(relay::stun::attr::XOR_MAPPED_ADDRESS)
            .and_then(Result::ok),
        s.local_addr().ok()
    );
    let body = http_get(metrics, "/metrics").expect("metrics");
    assert!(body.contains("relay_binding_requests_total 1"), "{body}");

    // SIGTERM: exits 0, promptly, with JSON logs on stderr.
    let t = Instant::now();
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(st) = child.0.try_wait().expect("wait") {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "relay ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let mut logs = String::new();
    child
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut logs)
        .expect("logs");
    assert!(
        logs.lines()
            .any(|l| l.starts_with('{') && l.contains("SIGTERM")),
        "{logs}"
    );
}
