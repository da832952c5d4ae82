//! `ice_agent::demux::classify` against the relay's STUN and ChannelData
//! decoders: the classes must agree with what the decoders accept, and a
//! datagram taken for WireGuard must never parse as STUN.
#![no_main]

use ice_agent::demux::{classify, Kind, WgType};
use libfuzzer_sys::fuzz_target;
use relay::stun::{self, channel_data, Message};

fuzz_target!(|data: &[u8]| {
    let kind = classify(data);
    let parsed = Message::parse(data);
    match kind {
        Kind::Stun => {
            assert!(stun::is_stun(data));
            // Same framing test as the codec's header check; attributes may
            // still be truncated.
            assert!(!matches!(
                parsed,
                Err(stun::ParseError::BadLength
                    | stun::ParseError::NotStun
                    | stun::ParseError::TooShort)
            ));
        }
        Kind::ChannelData => {
            assert!(channel_data::is_channel_data(data));
            assert!(parsed.is_err());
        }
        Kind::WireGuard(t) => {
            assert!(parsed.is_err(), "WireGuard {t:?} also parses as STUN");
            assert!(!channel_data::is_channel_data(data));
            let min = match t {
                WgType::Initiation => 148,
                WgType::Response => 92,
                WgType::Cookie => 64,
                WgType::Data => 32,
            };
            assert!(data.len() >= min);
        }
        Kind::Unknown => {
            // Anything the STUN codec accepts is classified as STUN.
            assert!(parsed.is_err(), "codec accepts what demux drops");
        }
    }
});
