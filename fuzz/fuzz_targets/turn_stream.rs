//! `ice_agent::turn_stream::Framer`: the bytes a relay (or a middlebox)
//! sends on a TURN TCP/TLS stream, cut into pushes of fuzzer-chosen sizes.
//! Never a panic; the buffer stays within one frame plus one push; every
//! frame handed out is one STUN message or one ChannelData message (its
//! padding removed); the frames and the error point do not depend on how
//! the bytes were cut; and what `frame_for_stream` writes frames back to
//! the same messages.
#![no_main]

use ice_agent::turn_stream::{frame_for_stream, Framer, MAX_FRAME, MAX_PUSH};
use libfuzzer_sys::fuzz_target;
use relay::stun::{self, channel_data};

/// Frames (and whether the stream failed) when `data` arrives in pieces
/// whose sizes come from `cuts`.
fn run(data: &[u8], cuts: &[u8]) -> (Vec<Vec<u8>>, bool) {
    let mut f = Framer::new();
    let mut frames = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = match cuts.get(i) {
            Some(c) => (*c as usize * 37 + 1).min(rest.len()),
            None => rest.len(),
        }
        .min(MAX_PUSH);
        i += 1;
        if f.push(&rest[..n]).is_err() {
            return (frames, true);
        }
        rest = &rest[n..];
        assert!(f.buffered() <= MAX_FRAME + MAX_PUSH, "{}", f.buffered());
        loop {
            match f.next_frame() {
                Ok(Some(fr)) => {
                    if channel_data::is_channel_data(fr) {
                        let (_, payload) = channel_data::decode(fr).expect("whole ChannelData");
                        assert_eq!(payload.len() + channel_data::HEADER_LEN, fr.len());
                    } else {
                        assert_eq!(stun::stream_frame_len(fr), Ok(Some(fr.len())));
                    }
                    frames.push(fr.to_vec());
                }
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
    }
    (frames, false)
}

fuzz_target!(|input: (Vec<u8>, Vec<u8>)| {
    let (data, cuts) = input;
    let whole = run(&data, &[]);
    let pieces = run(&data, &cuts);
    assert_eq!(whole, pieces, "framing depends on how the bytes were cut");
    // What the agent writes for those frames reads back as the same frames.
    let mut out = Vec::new();
    for f in &whole.0 {
        frame_for_stream(&mut out, f);
    }
    assert_eq!(out.len() % 4, 0);
    let again = run(&out, &cuts);
    assert_eq!(again, (whole.0.clone(), false));
    // Arbitrary bytes as one frame to send: either dropped or readable.
    let mut one = Vec::new();
    frame_for_stream(&mut one, &data);
    let (frames, failed) = run(&one, &[]);
    assert!(frames.len() <= 1 && (!failed || frames.is_empty()));
});
