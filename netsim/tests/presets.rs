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
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn every_preset_classifies_as_named() {
    common::require_root();
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

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn hairpin_switch_works_for_every_translating_preset() {
    common::require_root();
    // cgnat: the reflexive address belongs to the carrier NAT, and a packet
    // looped back there meets the home NAT's filtering (see docs/netsim.md);
    // udp-blocked has no UDP at all.
    let presets = [
        NatPreset::FullCone,
        NatPreset::RestrictedCone,
        NatPreset::PortRestricted,
        NatPreset::Symmetric,
        NatPreset::SymmetricSequential,
    ];
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = presets
            .iter()
            .map(|p| {
                let mut cfg = RouterConfig::new(*p);
                cfg.hairpin = true;
                (*p, s.spawn(move || classify(cfg)))
            })
            .collect();
        hs.into_iter()
            .map(|(p, h)| (p, h.join().expect("thread")))
            .collect()
    });
    for (p, (c, seq)) in &results {
        println!("{p:<22} hairpin on: {c}");
        assert_eq!(c.hairpin, Some(true), "{p}: hairpin on but no loopback");
        // Hairpin must not change the rest of the behaviour.
        assert!(c.matches(*p, *seq), "{p} with hairpin: {c}");
    }
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn idle_mapping_expires_after_the_configured_timeout() {
    common::require_root();
    let run = |timeout_s: u32| {
        let lab = Lab::new().expect("lab");
        lab.add_public_host("stun", 2).expect("host");
        let mut cfg = RouterConfig::new(NatPreset::PortRestricted);
        cfg.mapping_timeout_s = timeout_s;
        lab.add_router("r", cfg).expect("router");
        lab.add_device("d", "r").expect("device");
        let refl = Reflector::start(&lab, "stun").expect("reflector");
        probe::mapping_lifetime(
            &lab,
            "d",
            &ReflectorClient,
            refl.primary,
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
        .expect("lifetime")
    };
    let (short, default) = std::thread::scope(|s| {
        let a = s.spawn(|| run(3));
        let b = s.spawn(|| run(120));
        (a.join().expect("thread"), b.join().expect("thread"))
    });
    println!(
        "timeout 3 s: answer after 1 s {}, after 5 s {}",
        short.0, short.1
    );
    println!(
        "timeout 120 s: answer after 1 s {}, after 5 s {}",
        default.0, default.1
    );
    assert_eq!(
        short,
        (true, false),
        "3 s mapping should live 1 s but not 5 s"
    );
    assert_eq!(default, (true, true), "120 s mapping should live 5 s");
}
