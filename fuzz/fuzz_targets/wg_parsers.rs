//! The WireGuard status parsers in `ice_agent::wg`: the UAPI `get` answer
//! and `wg show <if> dump` output, on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = ice_agent::wg::parse_uapi(text) {
        // Every peer comes from a `public_key=` line.
        assert!(d.peers.len() <= text.matches("public_key=").count());
    }
    if let Ok(d) = ice_agent::wg::parse_dump(text) {
        assert!(d.peers.len() < text.lines().count().max(1));
    }
});
