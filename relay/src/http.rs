//! The one small HTTP/1.1 responder behind `/metrics` and `/healthz` of the
//! relay, the signaling server and the agent (feature `http`).
//!
//! Per connection it reads one request head, at most [`MAX_HEAD`] bytes and
//! within [`READ_TIMEOUT`], hands its method and path to the caller, writes
//! one `text/plain` answer with its length, and closes. That is all
//! Prometheus and health probes need, and a client cannot hold a
//! connection open or make the server buffer more than one head.
//!
//! [`Request::parse`] and [`Response::to_bytes`] do no I/O; [`serve`] is the
//! tokio part around them.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The most of a request head that is read; the rest is ignored.
pub const MAX_HEAD: usize = 4096;

/// How long a client may take to send its request head; a slower one gets
/// no answer.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The request line of a request: `GET /metrics HTTP/1.1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `HEAD`, … (empty when the head was empty).
    pub method: String,
    /// The request target as sent, query included (empty when missing).
    pub path: String,
}

impl Request {
    /// Parses the request line at the start of `head`. Nothing is rejected:
    /// a missing method or path is empty, which no route matches.
    pub fn parse(head: &[u8]) -> Request {
        let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut words = line.split_whitespace();
        Request {
            method: words.next().unwrap_or_default().to_owned(),
            path: words.next().unwrap_or_default().to_owned(),
        }
    }
}

/// An answer: status line and `text/plain` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code and reason, e.g. `200 OK`.
    pub status: &'static str,
    /// The body.
    pub body: String,
}

impl Response {
    /// `200 OK` with `body`.
    pub fn ok(body: impl Into<String>) -> Response {
        Response {
            status: "200 OK",
            body: body.into(),
        }
    }

    /// `404 Not Found` with `body` (say which paths exist).
    pub fn not_found(body: impl Into<String>) -> Response {
        Response {
            status: "404 Not Found",
            body: body.into(),
        }
    }

    /// `503 Service Unavailable` with `body` (say why).
    pub fn unavailable(body: impl Into<String>) -> Response {
        Response {
            status: "503 Service Unavailable",
            body: body.into(),
        }
    }

    /// The answer as sent: status line, headers (the Prometheus text
    /// format's content type, the length, `Connection: close`), body.
    pub fn to_bytes(&self) -> Vec<u8> {
        format!(
            "HTTP/1.1 {}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            self.status,
            self.body.len(),
            self.body
        )
        .into_bytes()
    }
}

/// Reads a request head from `stream`: up to the blank line that ends it,
/// the end of the stream, a read error or [`MAX_HEAD`] bytes, whichever
/// comes first. `None` if [`READ_TIMEOUT`] passes before.
pub async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Option<Request> {
    read_request_within(stream, READ_TIMEOUT).await
}

async fn read_request_within<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Option<Request> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut n = 0;
    let read_head = async {
        while n < buf.len() {
            match stream.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    };
    tokio::time::timeout(timeout, read_head).await.ok()?;
    Some(Request::parse(&buf[..n]))
}

/// Serves one connection: reads the request head, asks `handle` for the
/// answer, writes it and closes the connection. A client that sends no head
/// within [`READ_TIMEOUT`] is dropped unanswered.
pub async fn serve<S, F, Fut>(mut stream: S, handle: F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let Some(req) = read_request(&mut stream).await else {
        return;
    };
    let resp = handle(req).await;
    let _ = stream.write_all(&resp.to_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_request_line() {
        let r = Request::parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/metrics");
        let r = Request::parse(b"");
        assert_eq!((r.method.as_str(), r.path.as_str()), ("", ""));
        let r = Request::parse(b"GET\r\n\r\n");
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", ""));
        // Not UTF-8: replaced, never a panic.
        let r = Request::parse(b"G\xffT /\xfe HTTP/1.1\r\n");
        assert_eq!(r.method, "G\u{fffd}T");
    }

    #[test]
    fn writes_length_and_close() {
        let b = Response::not_found("try /metrics or /healthz\n").to_bytes();
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; version=0.0.4\r\n\
             Content-Length: 25\r\nConnection: close\r\n\r\ntry /metrics or /healthz\n"
        );
    }

    #[tokio::test]
    async fn serves_a_head_sent_in_pieces() {
        let (mut client, server) = tokio::io::duplex(8192);
        let task = tokio::spawn(serve(server, |req: Request| async move {
            Response::ok(format!("{} {}\n", req.method, req.path))
        }));
        client.write_all(b"GET /hea").await.unwrap();
        tokio::task::yield_now().await;
        client.write_all(b"lthz HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        task.await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nGET /healthz\n"), "{out}");
    }

    #[tokio::test]
    async fn bounds_the_head() {
        // A head without its blank line stops at MAX_HEAD bytes.
        let (mut client, server) = tokio::io::duplex(2 * MAX_HEAD);
        let task = tokio::spawn(serve(server, |req: Request| async move {
            Response::ok(req.path.len().to_string())
        }));
        let mut long = b"GET /".to_vec();
        long.resize(2 * MAX_HEAD - 1, b'a');
        client.write_all(&long).await.unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        task.await.unwrap();
        assert!(out.ends_with(&format!("\r\n\r\n{}", MAX_HEAD - 4)), "{out}");
    }

    #[tokio::test]
    async fn a_silent_client_gets_no_request() {
        let (_client, mut server) = tokio::io::duplex(64);
        let got = read_request_within(&mut server, Duration::from_millis(20)).await;
        assert_eq!(got, None);
    }
}
