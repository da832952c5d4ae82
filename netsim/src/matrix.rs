//! The NAT matrix: for every pair of presets, a lab with two routers (one per
//! preset), a device behind each and a reflector on the internet, and the
//! built-in punching probe between the devices. Pairs run in parallel labs.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::lab::Lab;
use crate::nat::{NatPreset, RouterConfig};
use crate::punch::{self, PathKind};
use crate::reflector::{Reflector, ReflectorClient};
use crate::Error;

/// One row of the matrix.
#[derive(Clone, Debug, Serialize)]
pub struct MatrixRow {
    /// Preset of the first router.
    pub a: NatPreset,
    /// Preset of the second router.
    pub b: NatPreset,
    /// Whether both devices sat behind one router (then `a == b`).
    pub same_router: bool,
    /// Path the probe reached.
    pub path: PathKind,
    /// Milliseconds until both sides had connectivity.
    pub ms_to_connect: Option<u64>,
    /// What theory predicts for simultaneous punching without prediction.
    pub expected: PathKind,
    /// Reflexive addresses the two devices learned (`None`: no answer).
    pub reflexive: [Option<std::net::SocketAddr>; 2],
    /// Milliseconds to build the pair's lab.
    pub setup_ms: u64,
    /// Milliseconds to tear it down.
    pub teardown_ms: u64,
}

/// What simultaneous punching without port prediction should give
/// (REFERENCE: any full/restricted-cone or public side works; port-restricted
/// pairs work; port-restricted ↔ symmetric and symmetric ↔ symmetric fail).
pub fn expected_path(a: NatPreset, b: NatPreset, same_router: bool) -> PathKind {
    use NatPreset::*;
    if same_router {
        return PathKind::Lan;
    }
    if a == UdpBlocked || b == UdpBlocked {
        return PathKind::None;
    }
    let open = |p| matches!(p, None | FullCone | RestrictedCone);
    let sym = |p| matches!(p, Symmetric | SymmetricSequential);
    if open(a) || open(b) {
        PathKind::Direct
    } else if sym(a) || sym(b) {
        PathKind::None
    } else {
        PathKind::Direct
    }
}

/// What punching with port prediction should give: as without, except that
/// a sequential symmetric NAT facing an endpoint-independent port-restricted
/// one (or cgnat) becomes direct (REFERENCE.md).
pub fn expected_path_predicting(a: NatPreset, b: NatPreset, same_router: bool) -> PathKind {
    use NatPreset::*;
    let seq_vs_eim = |x, y| x == SymmetricSequential && matches!(y, PortRestricted | Cgnat);
    if !same_router && (seq_vs_eim(a, b) || seq_vs_eim(b, a)) {
        PathKind::Direct
    } else {
        expected_path(a, b, same_router)
    }
}

/// Every unordered pair of presets (including a preset with itself), plus
/// with `lan_rows` one same-router row per preset.
pub fn pairs(lan_rows: bool) -> Vec<(NatPreset, NatPreset, bool)> {
    let all = NatPreset::ALL;
    let mut v = Vec::new();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i..] {
            v.push((*a, *b, false));
        }
    }
    if lan_rows {
        v.extend(all.iter().map(|p| (*p, *p, true)));
    }
    v
}

/// Runs one pair in its own lab; `predict` > 0 adds that many predicted
/// ports after each reflexive candidate.
pub fn run_pair(
    a: NatPreset,
    b: NatPreset,
    same_router: bool,
    budget: Duration,
    predict: u16,
) -> Result<MatrixRow, Error> {
    let t0 = Instant::now();
    let lab = Lab::new()?;
    lab.add_public_host("stun", 2)?;
    lab.add_router("ra", RouterConfig::new(a))?;
    if same_router {
        lab.add_device("da", "ra")?;
        lab.add_device("db", "ra")?;
    } else {
        lab.add_router("rb", RouterConfig::new(b))?;
        lab.add_device("da", "ra")?;
        lab.add_device("db", "rb")?;
    }
    let refl = Reflector::start(&lab, "stun")?;
    let setup_ms = t0.elapsed().as_millis() as u64;
    let res = punch::punch_predicting(
        &lab,
        "da",
        "db",
        &ReflectorClient,
        refl.primary,
        budget,
        predict,
    )?;
    drop(refl);
    let t1 = Instant::now();
    drop(lab);
    let teardown_ms = t1.elapsed().as_millis() as u64;
    Ok(MatrixRow {
        a,
        b,
        same_router,
        path: res.path,
        ms_to_connect: res.ms_to_connect,
        expected: if predict > 0 {
            expected_path_predicting(a, b, same_router)
        } else {
            expected_path(a, b, same_router)
        },
        reflexive: res.reflexive,
        setup_ms,
        teardown_ms,
    })
}

/// Runs the given pairs with `parallel` labs at a time; rows come back in
/// the order of `pairs`.
pub fn run(
    pairs: &[(NatPreset, NatPreset, bool)],
    parallel: usize,
    budget: Duration,
) -> Result<Vec<MatrixRow>, Error> {
    run_predicting(pairs, parallel, budget, 0)
}

/// Like [`run`], with `predict` predicted ports per reflexive candidate.
pub fn run_predicting(
    pairs: &[(NatPreset, NatPreset, bool)],
    parallel: usize,
    budget: Duration,
    predict: u16,
) -> Result<Vec<MatrixRow>, Error> {
    let next = Mutex::new(0usize);
    let out: Mutex<Vec<Option<Result<MatrixRow, Error>>>> =
        Mutex::new((0..pairs.len()).map(|_| None).collect());
    std::thread::scope(|sc| {
        for _ in 0..parallel.max(1) {
            sc.spawn(|| loop {
                let i = {
                    let mut n = next.lock().unwrap_or_else(|p| p.into_inner());
                    let i = *n;
                    *n += 1;
                    i
                };
                let Some(&(a, b, same)) = pairs.get(i) else {
                    break;
                };
                let r = run_pair(a, b, same, budget, predict);
                out.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
            });
        }
    });
    out.into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::Probe("pair not run".into()))))
        .collect()
}

/// Renders rows as a fixed-width table.
pub fn table(rows: &[MatrixRow]) -> String {
    let mut s = format!(
        "{:<22} {:<36} {:<7} {:>6}  {:<7} {}\n",
        "a", "b", "path", "ms", "theory", ""
    );
    for r in rows {
        let b = if r.same_router {
            format!("{} (same router)", r.b)
        } else {
            r.b.to_string()
        };
        s.push_str(&format!(
            "{:<22} {:<36} {:<7} {:>6}  {:<7} {}\n",
            r.a.to_string(),
            b,
            r.path.name(),
            r.ms_to_connect
                .map(|m| m.to_string())
                .unwrap_or_else(|| "-".into()),
            r.expected.name(),
            if r.path == r.expected {
                "ok"
            } else {
                "MISMATCH"
            },
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn theory_is_symmetric_and_covers_every_pair() {
        let p = pairs(true);
        assert_eq!(p.len(), 36 + 8);
        for a in NatPreset::ALL {
            for b in NatPreset::ALL {
                assert_eq!(expected_path(a, b, false), expected_path(b, a, false));
            }
            assert_eq!(expected_path(a, a, true), PathKind::Lan);
        }
    }
}
