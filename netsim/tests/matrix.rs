//! The hole-punching matrix matches theory (REFERENCE.md): any pair with a
//! full- or restricted-cone (or unNATed) side goes direct; port-restricted
//! pairs (cgnat included) go direct; port-restricted <-> symmetric and
//! symmetric <-> symmetric do not; udp-blocked never does; two devices behind
//! one router meet on the LAN. All pairs in parallel labs, well under a minute.

mod common;

use std::time::{Duration, Instant};

use netsim::matrix;
use netsim::nat::NatPreset;
use netsim::punch::PathKind;

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn matrix_matches_theory() {
    common::require_root();
    let t0 = Instant::now();
    let pairs = matrix::pairs(true);
    let rows = matrix::run(&pairs, 8, Duration::from_millis(2500)).expect("matrix");
    let took = t0.elapsed();
    print!("{}", matrix::table(&rows));
    println!("{} pairs in {:.1} s", rows.len(), took.as_secs_f64());
    assert_eq!(rows.len(), 44);
    // Spot-check the theory function itself against the brief.
    use NatPreset::*;
    assert_eq!(
        matrix::expected_path(PortRestricted, Symmetric, false),
        PathKind::None
    );
    assert_eq!(
        matrix::expected_path(Symmetric, Symmetric, false),
        PathKind::None
    );
    assert_eq!(
        matrix::expected_path(PortRestricted, PortRestricted, false),
        PathKind::Direct
    );
    assert_eq!(
        matrix::expected_path(FullCone, Symmetric, false),
        PathKind::Direct
    );
    assert_eq!(
        matrix::expected_path(RestrictedCone, Symmetric, false),
        PathKind::Direct
    );
    let bad: Vec<String> = rows
        .iter()
        .filter(|r| r.path != r.expected)
        .map(|r| format!("{} <-> {}: {:?}, theory {:?}", r.a, r.b, r.path, r.expected))
        .collect();
    assert!(bad.is_empty(), "matrix differs from theory: {bad:#?}");
    for r in &rows {
        if r.path != PathKind::None {
            assert!(r.ms_to_connect.is_some(), "{} <-> {}: no time", r.a, r.b);
        }
    }
    assert!(took < Duration::from_secs(60), "matrix took {took:?}");
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn port_prediction_beats_sequential_but_not_random_symmetric_nat() {
    common::require_root();
    use NatPreset::*;
    let pairs = [
        (PortRestricted, SymmetricSequential, false),
        (SymmetricSequential, Cgnat, false),
        (PortRestricted, Symmetric, false),
        (FullCone, PortRestricted, false),
    ];
    let rows = matrix::run_predicting(&pairs, 4, Duration::from_millis(2500), 3).expect("matrix");
    print!("{}", matrix::table(&rows));
    let paths: Vec<PathKind> = rows.iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        [
            PathKind::Direct,
            PathKind::Direct,
            PathKind::None,
            PathKind::Direct
        ],
        "with +1..+3 prediction"
    );
    for r in &rows {
        assert_eq!(r.path, r.expected, "{} <-> {}", r.a, r.b);
    }
}
