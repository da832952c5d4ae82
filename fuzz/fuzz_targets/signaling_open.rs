//! Opening sealed envelopes (`signaling::seal::Opener`) for a fixed
//! recipient key. Three kinds of input:
//! - forged envelopes: arbitrary sender (including ours and low-order
//!   points), recipient, timestamp, nonce and ciphertext;
//! - the JSON of an envelope, as it arrives from the server;
//! - authentic envelopes: the fuzzer picks the PLAINTEXT bytes, the target
//!   seals them with a fixed sender key (`seal_plaintext`), so the JSON
//!   parsing of peer messages behind the crypto is reached. What opens must
//!   seal and open to the same message.
//!
//! Each input is a sequence, opened by one `Opener` with a small cache, so
//! replay and floor logic run too.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use signaling::seal::{seal, seal_plaintext, Envelope, Opener};
use signaling::{PrivateKey, PublicKey};

const NOW: u64 = 1_800_000_000_000;

#[derive(Arbitrary, Debug)]
enum Key {
    Sender,
    Recipient,
    Other,
    /// A low-order point (all zeros) or anything else.
    Raw([u8; 32]),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Forged {
        from: Key,
        to: Key,
        ts_delta: i32,
        nonce: Vec<u8>,
        ct: Vec<u8>,
    },
    Json(Vec<u8>),
    Authentic {
        plaintext: Vec<u8>,
        ts_delta: i32,
        /// Open it twice (the second must be refused as a replay).
        twice: bool,
    },
    Advance(u32),
}

fn keys() -> (PrivateKey, PrivateKey, PrivateKey) {
    (
        PrivateKey::from_bytes([1; 32]),
        PrivateKey::from_bytes([2; 32]),
        PrivateKey::from_bytes([3; 32]),
    )
}

fn public(k: &Key, s: &PrivateKey, r: &PrivateKey, o: &PrivateKey) -> PublicKey {
    match k {
        Key::Sender => s.public_key(),
        Key::Recipient => r.public_key(),
        Key::Other => o.public_key(),
        Key::Raw(b) => PublicKey(*b),
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let (sender, recipient, other) = keys();
    let mut opener = Opener::with_limits(recipient.clone(), 60_000, 4);
    let mut now = NOW;
    for op in ops.into_iter().take(32) {
        match op {
            Op::Forged {
                from,
                to,
                ts_delta,
                nonce,
                ct,
            } => {
                let env = Envelope {
                    from: public(&from, &sender, &recipient, &other),
                    to: public(&to, &sender, &recipient, &other),
                    ts: now.wrapping_add_signed(i64::from(ts_delta)),
                    nonce,
                    ct,
                };
                // Without the sender's key nothing can authenticate.
                assert!(opener.open(now, &env).is_err());
            }
            Op::Json(bytes) => {
                if let Ok(env) = serde_json::from_slice::<Envelope>(&bytes) {
                    let _ = opener.open(now, &env);
                }
            }
            Op::Authentic {
                plaintext,
                ts_delta,
                twice,
            } => {
                let ts = now.wrapping_add_signed(i64::from(ts_delta));
                let env = seal_plaintext(&sender, &recipient.public_key(), ts, &plaintext)
                    .expect("a good recipient key");
                let first = opener.open(now, &env);
                if let Ok(msg) = &first {
                    let again = seal(&sender, &recipient.public_key(), now, msg).expect("seal");
                    let mut fresh = Opener::new(recipient.clone());
                    assert_eq!(fresh.open(now, &again).as_ref(), Ok(msg));
                }
                if twice && first.is_ok() {
                    assert!(opener.open(now, &env).is_err(), "replay accepted");
                }
            }
            Op::Advance(ms) => now += u64::from(ms),
        }
    }
    assert!(opener.remembered() <= 4);
});
