//! [`BindingTransport`] over real STUN (RFC 8489 Binding with RFC 5780
//! CHANGE-REQUEST), for classifying NATs against the project's `relay` started
//! with `--alt-listen` instead of the built-in reflector.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use relay::stun::{attr, method, Class, Message, MessageBuilder};

use crate::reflector::{BindingResponse, BindingTransport, Change};

/// STUN client for the RFC 5780 probe.
#[derive(Clone, Copy, Debug, Default)]
pub struct StunClient;

/// Bytes of PADDING added to each request, so the relay's amplification budget
/// (it answers no larger than the request) leaves room for RESPONSE-ORIGIN and
/// OTHER-ADDRESS.
const PADDING: usize = 96;

impl BindingTransport for StunClient {
    fn binding(
        &self,
        sock: &UdpSocket,
        server: SocketAddr,
        change: Change,
        timeout: Duration,
    ) -> std::io::Result<Option<BindingResponse>> {
        let tid: [u8; 12] = rand::random();
        let mut req = Vec::with_capacity(160);
        {
            let mut b = MessageBuilder::new(&mut req, method::BINDING, Class::Request, tid);
            if change.ip || change.port {
                let flags = (change.ip as u32) << 2 | (change.port as u32) << 1;
                b.u32_attr(attr::CHANGE_REQUEST, flags);
            }
            b.attr(attr::PADDING, &[0u8; PADDING]).fingerprint();
        }
        let deadline = Instant::now() + timeout;
        let mut next_send = Instant::now();
        let mut buf = [0u8; 1500];
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            if now >= next_send {
                let _ = sock.send_to(&req, server);
                next_send = now + Duration::from_millis(100);
            }
            let wait = next_send
                .min(deadline)
                .saturating_duration_since(Instant::now());
            sock.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let Ok(m) = Message::parse(&buf[..n]) else {
                        continue;
                    };
                    if m.transaction_id() != tid || m.class() != Class::Success {
                        continue;
                    }
                    if let Some(Ok(mapped)) = m.xor_address(attr::XOR_MAPPED_ADDRESS) {
                        return Ok(Some(BindingResponse { mapped, from }));
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                            | std::io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn delayed_binding(
        &self,
        _sock: &UdpSocket,
        _server: SocketAddr,
        _delay: Duration,
    ) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "STUN has no delayed answers; probe mapping lifetimes with the built-in reflector",
        ))
    }
}
