//! Telling apart STUN, TURN ChannelData and WireGuard on one socket: the one
//! classifier of the project (the agent's socket carries all three; the
//! relay and netsim use the same codec predicates it is built on,
//! [`crate::stun::is_stun`] and [`crate::stun::channel_data::is_channel_data`]).
//!
//! A datagram is classified by its first bytes:
//!
//! | first bytes | kind |
//! |---|---|
//! | `0x00..=0x3F`, magic cookie at 4..8 | STUN (ICE check, STUN/TURN response) |
//! | `0x40..=0x7F` | TURN ChannelData (relayed WireGuard or ICE) |
//! | `1..=4`, then three zero bytes | WireGuard (initiation, response, cookie, data) |
//!
//! WireGuard's types 1–4 fall inside STUN's first-byte range. The magic
//! cookie alone does not decide (bytes 4..8 of a WireGuard message are a
//! random sender index that can equal it once in 2³²): a STUN message must
//! also carry a length field that matches the datagram, which a WireGuard
//! message (zeros at bytes 2..4, at least 32 bytes) never does.

/// WireGuard message types (first byte; the next three are zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgType {
    /// Handshake initiation (148 bytes).
    Initiation,
    /// Handshake response (92 bytes).
    Response,
    /// Cookie reply (64 bytes).
    Cookie,
    /// Transport data (at least 32 bytes).
    Data,
}

/// What a datagram is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A STUN message.
    Stun,
    /// TURN ChannelData.
    ChannelData,
    /// A WireGuard message.
    WireGuard(WgType),
    /// Nothing we speak: drop and count.
    Unknown,
}

use crate::stun::{channel_data, is_stun};

/// Classifies one datagram.
pub fn classify(d: &[u8]) -> Kind {
    let Some(&first) = d.first() else {
        return Kind::Unknown;
    };
    if channel_data::is_channel_data(d) {
        return if d.len() >= 4 {
            Kind::ChannelData
        } else {
            Kind::Unknown
        };
    }
    if is_stun(d) {
        // A STUN length field counts the bytes after the 20-byte header and
        // is a multiple of 4; a WireGuard message whose sender index happens
        // to equal the cookie still has zeros at bytes 1..4, which a STUN
        // header cannot have together with a matching length.
        let len = u16::from_be_bytes([d[2], d[3]]) as usize;
        if len.is_multiple_of(4) && 20 + len == d.len() {
            return Kind::Stun;
        }
    }
    if d.len() >= 4 && d[1..4] == [0, 0, 0] {
        let t = match (first, d.len()) {
            (1, 148) => WgType::Initiation,
            (2, 92) => WgType::Response,
            (3, 64) => WgType::Cookie,
            // Plaintext is padded to 16 bytes but never beyond the
            // interface MTU, so a full-size packet (e.g. 1420 + 32 bytes
            // with wireguard-go's default MTU) is not a multiple of 16.
            (4, n) if n >= 32 => WgType::Data,
            _ => return Kind::Unknown,
        };
        return Kind::WireGuard(t);
    }
    Kind::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC_COOKIE: [u8; 4] = crate::stun::MAGIC_COOKIE.to_be_bytes();

    fn stun(len: usize) -> Vec<u8> {
        let mut v = vec![0u8; 20 + len];
        v[1] = 1;
        v[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        v[4..8].copy_from_slice(&MAGIC_COOKIE);
        v
    }

    #[test]
    fn classifies_each_kind() {
        assert_eq!(classify(&stun(0)), Kind::Stun);
        assert_eq!(classify(&stun(24)), Kind::Stun);
        assert_eq!(
            classify(&[0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4]),
            Kind::ChannelData
        );
        assert_eq!(classify(&[0x7F, 0xFF, 0, 0]), Kind::ChannelData);
        let mut init = vec![0u8; 148];
        init[0] = 1;
        assert_eq!(classify(&init), Kind::WireGuard(WgType::Initiation));
        let mut resp = vec![0u8; 92];
        resp[0] = 2;
        assert_eq!(classify(&resp), Kind::WireGuard(WgType::Response));
        let mut cookie = vec![0u8; 64];
        cookie[0] = 3;
        assert_eq!(classify(&cookie), Kind::WireGuard(WgType::Cookie));
        let mut data = vec![0u8; 32];
        data[0] = 4;
        assert_eq!(classify(&data), Kind::WireGuard(WgType::Data));
        data.extend_from_slice(&[0u8; 16]);
        assert_eq!(classify(&data), Kind::WireGuard(WgType::Data));
        // A full-size packet at MTU 1420: padding stops at the MTU, so the
        // length (1452) is not a multiple of 16.
        let mut full = vec![0u8; 1420 + 32];
        full[0] = 4;
        assert_eq!(classify(&full), Kind::WireGuard(WgType::Data));
    }

    #[test]
    fn wireguard_with_cookie_like_index_is_still_wireguard() {
        // Sender index equal to the STUN magic cookie: length settles it.
        let mut init = vec![0u8; 148];
        init[0] = 1;
        init[4..8].copy_from_slice(&MAGIC_COOKIE);
        assert_eq!(classify(&init), Kind::WireGuard(WgType::Initiation));
        let mut data = vec![0u8; 48];
        data[0] = 4;
        data[4..8].copy_from_slice(&MAGIC_COOKIE);
        assert_eq!(classify(&data), Kind::WireGuard(WgType::Data));
    }

    #[test]
    fn junk_is_unknown() {
        assert_eq!(classify(&[]), Kind::Unknown);
        assert_eq!(classify(&[0x40]), Kind::Unknown);
        assert_eq!(classify(&[0x80, 0, 0, 0]), Kind::Unknown);
        assert_eq!(classify(&[1, 0, 0, 0, 9]), Kind::Unknown);
        assert_eq!(classify(&[4, 0, 0, 0, 9, 9, 9, 9]), Kind::Unknown);
        assert_eq!(classify(&[5, 0, 0, 0]), Kind::Unknown);
        let mut bad_stun = stun(4);
        bad_stun.push(0);
        assert_eq!(classify(&bad_stun), Kind::Unknown);
    }
}
