//! TURN over TCP and TLS (RFC 8656 §3.1, framing as in §11.5/§12): what the
//! agent uses when UDP to a relay gets no answer, or at once for
//! `turn:…?transport=tcp` and `turns:` relays.
//!
//! On a stream, STUN messages and ChannelData follow each other back to
//! back; ChannelData is padded to a multiple of 4 bytes (STUN always is).
//! [`Framer`] is the sans-IO part: bytes in, whole frames out, in a buffer
//! of bounded size, so a hostile relay or middlebox can neither make it
//! allocate without bound nor panic it (`fuzz/turn_stream`). The frames are
//! then exactly what a UDP datagram from the relay would be, and go through
//! the same TURN client. [`driver`] is the thin tokio part: connect (TCP,
//! or TLS with the relay's `pin_sha256` / `ca_file` / the system roots),
//! read into the framer, write what the agent and the data plane queue.

pub mod driver;

use relay::stun::{self, channel_data};

/// Largest frame a stream can carry: a STUN message (20-byte header plus a
/// 16-bit length) or a padded ChannelData message (4 + 65535 + 1), both
/// fixed by the 16-bit length fields.
pub const MAX_FRAME: usize = stun::HEADER_LEN + 0xFFFF;

/// Most bytes one [`Framer::push`] takes. The driver reads at most this
/// much at a time.
pub const MAX_PUSH: usize = 64 * 1024;

/// Why a stream is no longer TURN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The bytes at a frame boundary are neither STUN nor ChannelData.
    #[error("the relay sent bytes that are neither STUN nor ChannelData")]
    NotTurn,
    /// More than [`MAX_PUSH`] bytes pushed at once, or pushed while a whole
    /// frame was still waiting to be taken (a driver bug, not the peer's).
    #[error(
        "stream framer overrun (more than {MAX_PUSH} bytes pushed at once, or frames not taken)"
    )]
    Overrun,
}

/// Cuts a TURN byte stream into frames. Memory is bounded: the buffer never
/// holds more than one incomplete frame plus one push (≤ [`MAX_FRAME`] +
/// [`MAX_PUSH`] bytes).
///
/// Use: [`Framer::push`] what was read, then call [`Framer::next_frame`]
/// until it returns `Ok(None)`; then push again. After an error the stream
/// is unusable (the caller closes it); the framer keeps answering the same
/// error.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// Start of the unread part of `buf`.
    start: usize,
    failed: Option<FrameError>,
}

impl Framer {
    /// An empty framer.
    pub fn new() -> Framer {
        Framer::default()
    }

    /// Bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        // Frames already taken are dropped here, so `buf` holds at most the
        // one incomplete frame `next_frame` stopped at.
        self.buf.drain(..self.start);
        self.start = 0;
        if bytes.len() > MAX_PUSH || self.buf.len() > MAX_FRAME {
            self.failed = Some(FrameError::Overrun);
            return Err(FrameError::Overrun);
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// The next whole frame (STUN message, or ChannelData with its padding
    /// removed), `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let rest = &self.buf[self.start..];
        match stun::stream_frame_len(rest) {
            Ok(Some(len)) => {
                let frame = &self.buf[self.start..self.start + len];
                self.start += len;
                // ChannelData: hand over the message without its padding,
                // as it would arrive in a datagram.
                if channel_data::is_channel_data(frame) {
                    let n = u16::from_be_bytes([frame[2], frame[3]]) as usize;
                    return Ok(Some(&frame[..channel_data::HEADER_LEN + n]));
                }
                Ok(Some(frame))
            }
            Ok(None) => Ok(None),
            Err(_) => {
                self.failed = Some(FrameError::NotTurn);
                Err(FrameError::NotTurn)
            }
        }
    }

    /// Bytes held (taken frames not yet dropped included).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Appends `frame` to `out` for a stream: ChannelData (header and payload,
/// unpadded as on UDP) gets zero padding to 4 bytes; STUN is copied as is.
/// Anything else — a ChannelData frame shorter than its length field, or
/// bytes that are not exactly one STUN message — is dropped, never put on
/// the stream, where it would desynchronise the relay's framing.
pub fn frame_for_stream(out: &mut Vec<u8>, frame: &[u8]) {
    if channel_data::is_channel_data(frame) {
        let Some((ch, payload)) = channel_data::decode(frame) else {
            return;
        };
        channel_data::encode(out, ch, payload, true);
    } else if stun::stream_frame_len(frame) == Ok(Some(frame.len())) {
        // Exactly one STUN message, as its header announces.
        out.extend_from_slice(frame);
    }
}

/// How the agent reaches a relay, for status: "TLS 443", "TCP 3478", "UDP".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TURN over UDP.
    Udp,
    /// TURN over TCP.
    Tcp,
    /// TURN over TLS.
    Tls,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay::stun::{method, Class, MessageBuilder};

    fn stun_msg(pad_attr: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(&mut out, method::BINDING, Class::Request, [7; 12]);
        if pad_attr > 0 {
            b.attr(stun::attr::PADDING, &vec![0u8; pad_attr]);
        }
        b.fingerprint();
        out
    }

    fn cd(ch: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        channel_data::encode(&mut out, ch, payload, true);
        out
    }

    fn all(f: &mut Framer) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut v = Vec::new();
        while let Some(x) = f.next_frame()? {
            v.push(x.to_vec());
        }
        Ok(v)
    }

    #[test]
    fn back_to_back_frames_byte_by_byte_and_at_once() {
        let a = stun_msg(0);
        let b = cd(0x4001, b"hello"); // 5 bytes: 3 of padding
        let c = stun_msg(33);
        let d = cd(0x4002, &[9u8; 1400]);
        let stream: Vec<u8> = [&a[..], &b, &c, &d].concat();
        let want = vec![a.clone(), b[..9].to_vec(), c.clone(), d.clone()];
        // At once.
        let mut f = Framer::new();
        f.push(&stream).unwrap();
        assert_eq!(all(&mut f).unwrap(), want);
        // Byte by byte.
        let mut f = Framer::new();
        let mut got = Vec::new();
        for byte in &stream {
            f.push(std::slice::from_ref(byte)).unwrap();
            got.extend(all(&mut f).unwrap());
        }
        assert_eq!(got, want);
        // Every split point.
        for cut in 0..stream.len() {
            let mut f = Framer::new();
            f.push(&stream[..cut]).unwrap();
            let mut got = all(&mut f).unwrap();
            f.push(&stream[cut..]).unwrap();
            got.extend(all(&mut f).unwrap());
            assert_eq!(got, want, "cut at {cut}");
        }
    }

    #[test]
    fn garbage_ends_the_stream_and_stays_an_error() {
        // First byte 0x80–0xFF: neither STUN (0x00–0x3F) nor ChannelData
        // (0x40–0x7F). (Text such as "HTTP/1.1" starts like ChannelData and
        // is cut as such: its announced length bounds what is buffered.)
        let mut f = Framer::new();
        f.push(&[0x80, 0, 0, 0, 1, 2, 3, 4]).unwrap();
        assert_eq!(f.next_frame(), Err(FrameError::NotTurn));
        assert_eq!(f.push(b"x"), Err(FrameError::NotTurn));
        assert_eq!(f.next_frame(), Err(FrameError::NotTurn));
        // STUN with a bad cookie.
        let mut m = stun_msg(0);
        m[4] ^= 1;
        let mut f = Framer::new();
        f.push(&m).unwrap();
        assert_eq!(f.next_frame(), Err(FrameError::NotTurn));
    }

    #[test]
    fn memory_is_bounded_whatever_the_peer_announces() {
        // A frame announcing the largest length, fed slowly: the buffer
        // never exceeds one frame plus one push.
        let mut f = Framer::new();
        let mut head = vec![0x40, 0x00, 0xFF, 0xFF];
        head.extend_from_slice(&[0u8; 100]);
        f.push(&head).unwrap();
        let chunk = vec![0u8; 8192];
        let mut pushes = 0;
        loop {
            f.push(&chunk).unwrap();
            pushes += 1;
            assert!(f.buffered() <= MAX_FRAME + MAX_PUSH);
            if let Some(frame) = f.next_frame().unwrap() {
                assert_eq!(frame.len(), 4 + 0xFFFF);
                break;
            }
            assert!(pushes < 10, "the frame never completed");
        }
        // What follows (zeros: STUN with a bad cookie) ends the stream.
        assert_eq!(f.next_frame(), Err(FrameError::NotTurn));
        // One push larger than allowed is refused.
        let mut f = Framer::new();
        assert_eq!(f.push(&vec![0u8; MAX_PUSH + 1]), Err(FrameError::Overrun));
    }

    #[test]
    fn frames_for_the_stream_are_padded_and_checked() {
        let mut out = Vec::new();
        let mut one = Vec::new();
        channel_data::encode(&mut one, 0x4000, b"abcde", false);
        frame_for_stream(&mut out, &one);
        assert_eq!(out.len(), 12);
        frame_for_stream(&mut out, &stun_msg(0));
        // A lying length field is never put on the stream.
        let mut bad = one.clone();
        bad[3] = 200;
        frame_for_stream(&mut out, &bad);
        let mut f = Framer::new();
        f.push(&out).unwrap();
        assert_eq!(all(&mut f).unwrap(), vec![one, stun_msg(0)]);
    }
}
