//! Signaling wire frames (`signaling::wire`): the JSON of client and server
//! frames, envelopes and peer messages; what decodes must encode and decode
//! to the same value. The bytes are also read as a length-prefixed stream
//! with `FrameReader` (a `&[u8]` reader is always ready, so a no-op waker
//! drives it without a runtime).
#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use signaling::seal::{Envelope, PeerMessage};
use signaling::wire::{self, ClientFrame, FrameReader, ServerFrame};

fn round_trip<T>(data: &[u8]) -> Option<T>
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let v: T = serde_json::from_slice(data).ok()?;
    let framed = wire::encode(&v);
    assert_eq!(
        u32::from_be_bytes([framed[0], framed[1], framed[2], framed[3]]) as usize,
        framed.len() - 4
    );
    let again: T = serde_json::from_slice(&framed[4..]).expect("re-decodes");
    assert_eq!(v, again);
    Some(v)
}

fuzz_target!(|data: &[u8]| {
    if let Some(ClientFrame::Register { overlay, .. }) = round_trip::<ClientFrame>(data) {
        let _ = wire::valid_overlay(&overlay);
    }
    if let Some(f) = round_trip::<ServerFrame>(data) {
        if let ServerFrame::Members { members, .. } = f {
            for m in members {
                let _ = wire::valid_overlay(&m.overlay);
            }
        }
    }
    let _ = round_trip::<Envelope>(data);
    let _ = round_trip::<PeerMessage>(data);

    // Stream framing: the first byte picks the frame size limit.
    let Some((&limit, stream)) = data.split_first() else {
        return;
    };
    let max = usize::from(limit) * 4;
    let mut reader = FrameReader::new(stream, max);
    let mut cx = Context::from_waker(Waker::noop());
    let mut total = 0;
    for _ in 0..64 {
        let fut = pin!(reader.next());
        match fut.poll(&mut cx) {
            Poll::Ready(Ok(Some(frame))) => {
                assert!(frame.len() <= max);
                total += 4 + frame.len();
                assert!(total <= stream.len());
                let _ = serde_json::from_slice::<ClientFrame>(&frame);
            }
            Poll::Ready(Ok(None)) | Poll::Ready(Err(_)) => break,
            Poll::Pending => panic!("a slice reader is never pending"),
        }
    }
});
