//! `relay::stun::channel_data`: decode, and encode(decode(x)) round trips;
//! stream framing agrees with the datagram decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::stun::{self, channel_data};

fuzz_target!(|data: &[u8]| {
    let is_cd = channel_data::is_channel_data(data);
    let framed = stun::stream_frame_len(data);
    let Some((channel, payload)) = channel_data::decode(data) else {
        return;
    };
    assert!(is_cd, "decoded ChannelData whose first byte says otherwise");
    assert!((channel_data::MIN_CHANNEL..=channel_data::MAX_CHANNEL).contains(&channel));
    assert!(payload.len() + channel_data::HEADER_LEN <= data.len());
    // A complete padded frame in a stream is at least the datagram's frame.
    if let Ok(Some(n)) = framed {
        assert!(n >= channel_data::HEADER_LEN + payload.len());
    }
    for pad in [false, true] {
        let mut out = Vec::new();
        channel_data::encode(&mut out, channel, payload, pad);
        assert_eq!(channel_data::decode(&out), Some((channel, payload)));
        if pad {
            assert_eq!(out.len() % 4, 0);
            assert_eq!(stun::stream_frame_len(&out), Ok(Some(out.len())));
        }
    }
});
