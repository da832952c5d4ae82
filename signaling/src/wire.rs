//! Client ↔ server frames and their framing.
//!
//! Every frame is a 4-byte big-endian length followed by that many bytes of
//! JSON, the same on a QUIC stream and on TLS over TCP. A connection goes:
//!
//! 1. server → [`ServerFrame::Challenge`]
//! 2. client → [`ClientFrame::Register`] (mesh, token, key, proof, overlay addresses)
//! 3. server → [`ServerFrame::Registered`], then [`ServerFrame::Members`]
//!    frames (`done: true` on the last)
//! 4. then any order: client `Send` / `ListMembers` / `Ping`; server
//!    `Message` / `Online` / `Offline` / `Members` / `Undeliverable` /
//!    `Pong` / `Error`. An `Error` with `fatal: true` is the last frame
//!    before the server closes the connection.

use serde::{Deserialize, Serialize};

use crate::keys::PublicKey;
use crate::seal::Envelope;

/// Protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u32 = 1;
/// ALPN identifier for both QUIC and TLS over TCP.
pub const ALPN: &[u8] = b"wgice-signaling/1";
/// Largest frame a client may send (bytes of JSON).
pub const MAX_CLIENT_FRAME: usize = 64 * 1024;
/// Largest frame the server sends (member lists are split below this).
pub const MAX_SERVER_FRAME: usize = 1024 * 1024;
/// At most this many members per `Members` frame.
pub const MEMBERS_PER_FRAME: usize = 256;
/// At most this many overlay addresses per node.
pub const MAX_OVERLAY_ADDRS: usize = 16;

/// A mesh member as others see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// WireGuard public key.
    pub key: PublicKey,
    /// Overlay addresses the node advertises (`IP` or `IP/prefix`).
    pub overlay: Vec<String>,
}

/// Frames a client sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum ClientFrame {
    /// Answer to the challenge: join `mesh` as `key`.
    Register {
        /// Protocol version ([`PROTOCOL_VERSION`]).
        version: u32,
        /// Mesh name.
        mesh: String,
        /// Mesh admission token.
        token: String,
        /// The node's WireGuard public key.
        key: PublicKey,
        /// Overlay addresses advertised to the mesh.
        overlay: Vec<String>,
        /// Proof of possession (see [`crate::auth`]).
        #[serde(with = "crate::keys::b64")]
        proof: Vec<u8>,
    },
    /// Route a sealed envelope to `envelope.to`.
    Send {
        /// The sealed message.
        envelope: Envelope,
    },
    /// Ask for the full member list again.
    ListMembers,
    /// Liveness check; answered by `Pong` with the same id.
    Ping {
        /// Echoed id.
        id: u64,
    },
}

/// Why a message could not be delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Undeliverable {
    /// The recipient is not online in this mesh.
    Offline,
    /// The recipient's queue is full (it is slow or gone).
    QueueFull,
}

/// Error codes sent to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// Frame was not valid JSON of a known frame type, or too large.
    Malformed,
    /// Frame not allowed at this point of the protocol.
    Protocol,
    /// Proof of key possession failed.
    AuthFailed,
    /// Mesh token refused.
    Forbidden,
    /// Sending too fast; the frame was dropped.
    RateLimited,
    /// The mesh has reached its member limit.
    MeshFull,
    /// The same key registered again elsewhere; this connection is replaced.
    Replaced,
    /// Unsupported protocol version.
    Version,
    /// Server shutting down; reconnect (to another instance).
    ShuttingDown,
    /// No registration in time.
    Timeout,
}

/// Frames the server sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum ServerFrame {
    /// First frame on every connection.
    Challenge {
        /// Server's protocol version.
        version: u32,
        /// Per-connection ephemeral X25519 public key.
        server_key: PublicKey,
        /// Random challenge.
        #[serde(with = "crate::keys::b64")]
        nonce: Vec<u8>,
    },
    /// Registration accepted.
    Registered {
        /// Mesh joined.
        mesh: String,
        /// Key registered.
        key: PublicKey,
    },
    /// Part of the member list (other online members of the mesh).
    Members {
        /// Members in this part.
        members: Vec<Member>,
        /// Last part.
        done: bool,
    },
    /// A member came online (or changed its overlay addresses).
    Online {
        /// The member.
        member: Member,
    },
    /// A member went away.
    Offline {
        /// Its key.
        key: PublicKey,
    },
    /// A sealed message for this node.
    Message {
        /// The envelope; `from` was checked by the server.
        envelope: Envelope,
    },
    /// A message this node sent could not be delivered.
    Undeliverable {
        /// Intended recipient.
        to: PublicKey,
        /// Why.
        reason: Undeliverable,
    },
    /// Answer to `Ping`.
    Pong {
        /// The ping's id.
        id: u64,
    },
    /// Something went wrong; if `fatal`, the connection closes next.
    Error {
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
        /// The server closes the connection after this frame.
        fatal: bool,
    },
}

/// Encodes `frame` as length + JSON.
pub fn encode<T: Serialize>(frame: &T) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    serde_json::to_writer(&mut out, frame).expect("frames always serialise");
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Checks advertised overlay addresses (`IP` or `IP/prefix`).
pub fn valid_overlay(addrs: &[String]) -> Result<(), String> {
    if addrs.len() > MAX_OVERLAY_ADDRS {
        return Err(format!(
            "at most {MAX_OVERLAY_ADDRS} overlay addresses, got {}",
            addrs.len()
        ));
    }
    for a in addrs {
        let (ip, prefix) = match a.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (a.as_str(), None),
        };
        let ip: std::net::IpAddr = ip
            .parse()
            .map_err(|_| format!("overlay address {a:?} is not an IP address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if let Some(p) = prefix {
            match p.parse::<u8>() {
                Ok(n) if n <= max => {}
                _ => return Err(format!("overlay address {a:?} has a bad prefix length")),
            }
        }
    }
    Ok(())
}

/// Reads one length-prefixed frame of at most `max` bytes. `Ok(None)` on a
/// clean end of stream before a frame starts.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(FrameError::Io(e)),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(FrameError::Io)?;
    Ok(Some(buf))
}

/// A cancel-safe frame reader: partial frames stay in its buffer, so
/// `next()` may be used in `tokio::select!` without losing bytes.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    max: usize,
}

impl<R: tokio::io::AsyncRead + Unpin> FrameReader<R> {
    /// Reads frames of at most `max` bytes from `inner`.
    pub fn new(inner: R, max: usize) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            max,
        }
    }

    /// Next frame; `Ok(None)` on a clean end of stream between frames.
    /// Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        use tokio::io::AsyncReadExt;
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > self.max {
                    return Err(FrameError::TooLarge { len, max: self.max });
                }
                if self.buf.len() >= 4 + len {
                    let frame = self.buf[4..4 + len].to_vec();
                    self.buf.drain(..4 + len);
                    if self.buf.is_empty() {
                        // Don't keep a large buffer around on idle connections.
                        self.buf = Vec::new();
                    }
                    return Ok(Some(frame));
                }
                // Grow with the bytes that actually arrive, not with the
                // announced length: a header alone must not pin 64 KiB.
                self.buf.reserve((4 + len - self.buf.len()).min(4096));
            } else {
                self.buf.reserve(512);
            }
            // `read_buf` is cancel-safe: data is either in `buf` or unread.
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()))
                };
            }
        }
    }
}

/// Reading a frame failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Transport error.
    #[error("transport: {0}")]
    Io(#[from] std::io::Error),
    /// Frame bigger than allowed.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_limits() {
        let f = ClientFrame::Ping { id: 9 };
        let bytes = encode(&f);
        let mut r = &bytes[..];
        let got = read_frame(&mut r, 100).await.unwrap().unwrap();
        assert_eq!(serde_json::from_slice::<ClientFrame>(&got).unwrap(), f);
        let mut r = &bytes[..];
        assert!(matches!(
            read_frame(&mut r, 3).await,
            Err(FrameError::TooLarge { .. })
        ));
        let mut empty: &[u8] = &[];
        assert!(read_frame(&mut empty, 10).await.unwrap().is_none());
        assert!(serde_json::from_slice::<ClientFrame>(b"{\"type\":\"nope\"}").is_err());
    }

    #[tokio::test]
    async fn frame_reader_survives_cancellation_and_split_frames() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(rx, 1000);
        let a = encode(&ClientFrame::Ping { id: 1 });
        let b = encode(&ClientFrame::ListMembers);
        use tokio::io::AsyncWriteExt;
        // Half a frame, then a cancelled read, then the rest.
        tx.write_all(&a[..5]).await.unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_millis(20), reader.next()).await;
        assert!(r.is_err(), "no whole frame yet");
        tx.write_all(&a[5..]).await.unwrap();
        tx.write_all(&b).await.unwrap();
        assert_eq!(reader.next().await.unwrap().unwrap(), a[4..].to_vec());
        assert_eq!(reader.next().await.unwrap().unwrap(), b[4..].to_vec());
        tx.write_all(&[0, 0]).await.unwrap();
        drop(tx);
        assert!(
            reader.next().await.is_err(),
            "EOF inside a frame is an error"
        );
    }

    #[test]
    fn overlay_validation() {
        assert!(valid_overlay(&["10.0.0.1/32".into(), "fd00::1".into()]).is_ok());
        assert!(valid_overlay(&["10.0.0.1/33".into()]).is_err());
        assert!(valid_overlay(&["example.com".into()]).is_err());
    }
}
