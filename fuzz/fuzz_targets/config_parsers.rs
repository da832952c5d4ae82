//! The three TOML configuration parsers on arbitrary UTF-8: the relay's
//! (`relay::config::Args` from TOML, then `resolve`), signaling's
//! (`FileConfig::parse`) and the agent's (`AgentConfig::parse`).
//!
//! Only parsing and checking: nothing that touches files. The agent reads
//! `private_key_file` when given, and the relay's and signaling's later
//! steps read certificates, so texts naming a file are skipped (a path like
//! /dev/zero would only measure the machine).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(args) = toml::from_str::<relay::config::Args>(text) {
        // `config` is never read from TOML, so `resolve` does not read files.
        let _ = args.resolve();
    }
    let _ = signaling::config::FileConfig::parse(text, "fuzz.toml");
    // Quoted TOML keys may spell `private_key_file` with escapes.
    if !text.contains("file") && !text.contains('\\') {
        let _ = ice_agent::config::AgentConfig::parse(text, "fuzz.toml", None);
    }
});
