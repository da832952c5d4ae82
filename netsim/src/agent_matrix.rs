//! `netsim matrix --agents`: the NAT matrix with the suite users run. Per
//! pair of router kinds a [`MeshLab`] (the real `relay` with TURN over UDP,
//! TCP and TLS on 443, `signaling`, and per node `wireguard-go` with an
//! `ice-agent` beside it), both agents started at once, then:
//!
//! - **time to first ping**: a `ping -i 0.05` through the WireGuard
//!   overlay, started with the agents, until its first answer;
//! - **final path** and **time to it**: both agents' `status` every 50 ms;
//!   the pair is final when both report `direct` or `lan` (nothing better
//!   exists), or after [`SETTLE`] on the same path; the time is when the
//!   path they end on began.
//!
//! Theory ([`expected`]): a same-router pair ends `lan`; a UDP-blocked side
//! relays (over TCP/TLS); a UPnP gateway's mapping opens its side like a
//! full cone; otherwise the punching theory of [`crate::matrix`] with port
//! prediction (the agents predict a sequential symmetric NAT's ports when
//! the other side's mapping is endpoint-independent, and punch together,
//! timed through signaling, when both sides are sequential symmetric). A
//! row passes when the overlay answered and the final path is the one
//! theory allows.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::matrix::expected_path_predicting;
use crate::mesh::{s, Bins, MeshLab};
use crate::nat::{NatPreset, RouterConfig};
use crate::punch::PathKind;

/// A relayed pair is final after its path stayed the same this long since
/// the agents started (direct checks give up well before).
pub const SETTLE: Duration = Duration::from_secs(10);
/// A pair that never answers a ping fails after this long.
pub const FIRST_PING_LIMIT: Duration = Duration::from_secs(30);

/// What sits in front of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum Side {
    /// A NAT preset.
    Nat(NatPreset),
    /// A symmetric NAT whose router also runs a UPnP-IGD / NAT-PMP / PCP
    /// gateway (miniupnpd).
    UpnpSymmetric,
}

impl Side {
    /// Every side, in table order.
    pub fn all() -> Vec<Side> {
        let mut v: Vec<Side> = NatPreset::ALL.iter().map(|p| Side::Nat(*p)).collect();
        v.push(Side::UpnpSymmetric);
        v
    }

    /// The router this side puts in front of its node.
    pub fn router(self, hairpin: bool) -> RouterConfig {
        let mut cfg = match self {
            Side::Nat(p) => RouterConfig::new(p),
            Side::UpnpSymmetric => {
                let mut c = RouterConfig::new(NatPreset::Symmetric);
                c.upnp = true;
                c
            }
        };
        cfg.hairpin = hairpin;
        cfg
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Side::Nat(p) => write!(f, "{p}"),
            Side::UpnpSymmetric => f.write_str("upnp-symmetric"),
        }
    }
}

impl From<Side> for String {
    fn from(s: Side) -> String {
        s.to_string()
    }
}

impl FromStr for Side {
    type Err = String;
    fn from_str(s: &str) -> Result<Side, String> {
        if s == "upnp-symmetric" {
            return Ok(Side::UpnpSymmetric);
        }
        s.parse::<NatPreset>()
            .map(Side::Nat)
            .map_err(|_| format!("unknown side {s:?}: a NAT preset or upnp-symmetric"))
    }
}

/// One pair to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Case {
    /// In front of node `a`.
    pub a: Side,
    /// In front of node `b` (equal to `a` when they share a router).
    pub b: Side,
    /// Both nodes behind one router.
    pub same_router: bool,
    /// The router(s) loop a LAN device's traffic to the public address back.
    pub hairpin: bool,
}

impl Case {
    /// Parses `a:b` (two routers), `a:a:lan` or `a:a:hairpin` (one router,
    /// hairpin off or on).
    pub fn parse(s: &str) -> Result<Case, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let (a, b, same, hairpin) = match parts.as_slice() {
            [a, b] => (a, b, false, false),
            [a, b, "lan"] => (a, b, true, false),
            [a, b, "hairpin"] => (a, b, true, true),
            _ => return Err(format!("pair {s:?}: want a:b, a:a:lan or a:a:hairpin")),
        };
        let (a, b): (Side, Side) = (a.parse()?, b.parse()?);
        if same && a != b {
            return Err(format!("pair {s:?}: one router has one kind"));
        }
        Ok(Case {
            a,
            b,
            same_router: same,
            hairpin,
        })
    }

    /// The row's label (`a ↔ b`, `a (same router, hairpin)`).
    pub fn label(&self) -> String {
        if self.same_router {
            let h = if self.hairpin {
                "hairpin"
            } else {
                "no hairpin"
            };
            format!("{} ↔ {} (same router, {h})", self.a, self.b)
        } else {
            format!("{} ↔ {}", self.a, self.b)
        }
    }
}

/// Every unordered pair of [`Side::all`], then both nodes behind one
/// port-restricted, symmetric and cgnat router, each with hairpin off and
/// on.
pub fn cases() -> Vec<Case> {
    let all = Side::all();
    let mut v = Vec::new();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i..] {
            v.push(Case {
                a: *a,
                b: *b,
                same_router: false,
                hairpin: false,
            });
        }
    }
    for p in [
        NatPreset::PortRestricted,
        NatPreset::Symmetric,
        NatPreset::Cgnat,
    ] {
        for hairpin in [false, true] {
            v.push(Case {
                a: Side::Nat(p),
                b: Side::Nat(p),
                same_router: true,
                hairpin,
            });
        }
    }
    v
}

/// The path theory allows with port prediction: `lan`, `direct` or
/// `relay` (the agents' status names).
pub fn expected(c: &Case) -> &'static str {
    use NatPreset::UdpBlocked;
    if c.same_router {
        return "lan";
    }
    if c.a == Side::Nat(UdpBlocked) || c.b == Side::Nat(UdpBlocked) {
        return "relay";
    }
    // A mapped port forwards everything: that side is open.
    let open = |s: Side| match s {
        Side::UpnpSymmetric => NatPreset::FullCone,
        Side::Nat(p) => p,
    };
    // The agents also punch together when both NATs number their
    // mappings sequentially (coordinated through signaling).
    if open(c.a) == NatPreset::SymmetricSequential && open(c.b) == NatPreset::SymmetricSequential {
        return "direct";
    }
    // And probe a random symmetric NAT's ports from an endpoint-independent
    // side (birthday probing).
    let eim = |p: NatPreset| matches!(p, NatPreset::PortRestricted | NatPreset::Cgnat);
    let random = |p: NatPreset| p == NatPreset::Symmetric;
    if (random(open(c.a)) && eim(open(c.b))) || (eim(open(c.a)) && random(open(c.b))) {
        return "direct";
    }
    match expected_path_predicting(open(c.a), open(c.b), false) {
        PathKind::Direct | PathKind::Lan => "direct",
        PathKind::Relay | PathKind::None => "relay",
    }
}

/// One run of one pair.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Agents started → first overlay ping answered (ms); `None`: no answer
    /// within [`FIRST_PING_LIMIT`].
    pub first_ping_ms: Option<u64>,
    /// The path both agents ended on (`"mixed"` when they disagree).
    pub path: String,
    /// Agents started → the final path began (ms).
    pub final_path_ms: Option<u64>,
    /// Node a's reason for node b at the end.
    pub reason: String,
    /// What went wrong building or running the lab, if anything.
    pub error: Option<String>,
}

/// One row: a pair over its runs.
#[derive(Clone, Debug, Serialize)]
pub struct AgentRow {
    /// The pair.
    pub case: Case,
    /// What theory allows.
    pub expected: &'static str,
    /// The final path (of the last run; `"varies"` when runs disagree).
    pub path: String,
    /// Median over runs of the time to the first ping (runs that got one).
    pub first_ping_ms: Option<u64>,
    /// Median over runs of the time to the final path.
    pub final_path_ms: Option<u64>,
    /// Every run connected and ended on the expected path.
    pub ok: bool,
    /// Each run.
    pub samples: Vec<Sample>,
}

fn median(mut v: Vec<u64>) -> Option<u64> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

impl AgentRow {
    fn new(case: Case, samples: Vec<Sample>) -> AgentRow {
        let expected = expected(&case);
        let first = samples.first().map(|s| s.path.clone()).unwrap_or_default();
        let path = if samples.iter().all(|s| s.path == first) {
            first
        } else {
            "varies".into()
        };
        let ok = !samples.is_empty()
            && samples
                .iter()
                .all(|s| s.error.is_none() && s.first_ping_ms.is_some() && s.path == expected);
        AgentRow {
            case,
            expected,
            path,
            first_ping_ms: median(samples.iter().filter_map(|s| s.first_ping_ms).collect()),
            final_path_ms: median(samples.iter().filter_map(|s| s.final_path_ms).collect()),
            ok,
            samples,
        }
    }
}

/// The peer's path as node `i` sees node `j` (`"none"` without a row).
fn path_of(m: &MeshLab, i: usize, j: usize) -> (String, String) {
    match m.peer_status(i, j) {
        Some(row) => (
            row["path"].as_str().unwrap_or("none").to_owned(),
            row["reason"].as_str().unwrap_or_default().to_owned(),
        ),
        None => ("none".into(), String::new()),
    }
}

/// Runs one pair once in a fresh lab.
pub fn run_case(bins: &Bins, c: &Case) -> Sample {
    match std::panic::catch_unwind(|| run_case_inner(bins, c)) {
        Ok(s) => s,
        Err(p) => Sample {
            first_ping_ms: None,
            path: "none".into(),
            final_path_ms: None,
            reason: String::new(),
            error: Some(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into()),
            ),
        },
    }
}

fn run_case_inner(bins: &Bins, c: &Case) -> Sample {
    // TLS on 443 for every pair: a UDP-blocked node needs it, the others
    // never get that far.
    let mut m = MeshLab::new_with_relay_tls(bins);
    m.lab
        .add_router("ra", c.a.router(c.hairpin))
        .expect("router ra");
    let (a, b) = if c.same_router {
        (m.add_node("a", "ra"), m.add_node("b", "ra"))
    } else {
        m.lab
            .add_router("rb", c.b.router(c.hairpin))
            .expect("router rb");
        (m.add_node("a", "ra"), m.add_node("b", "rb"))
    };
    let t0 = Instant::now();
    m.start_agent(a);
    m.start_agent(b);
    let first_ping = Mutex::new(None::<Duration>);
    let ping_done = Mutex::new(false);
    // (elapsed, combined path) whenever the combined path changes.
    let mut changes: Vec<(Duration, String)> = Vec::new();
    let mut reason = String::new();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let (ok, _) = m
                .lab
                .exec(
                    &m.nodes[a].name,
                    &[
                        s("ping"),
                        s("-c"),
                        s(1),
                        s("-i"),
                        s("0.05"),
                        s("-w"),
                        s(FIRST_PING_LIMIT.as_secs()),
                        s(m.nodes[b].overlay),
                    ],
                )
                .unwrap_or((false, String::new()));
            if ok {
                *first_ping.lock().unwrap_or_else(|p| p.into_inner()) = Some(t0.elapsed());
            }
            *ping_done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        });
        loop {
            let (pa, ra) = path_of(&m, a, b);
            let (pb, _) = path_of(&m, b, a);
            reason = ra;
            let now = t0.elapsed();
            let combined = if pa == pb { pa } else { "mixed".into() };
            if changes.last().map(|(_, p)| p) != Some(&combined) {
                changes.push((now, combined.clone()));
            }
            let pinged = *ping_done.lock().unwrap_or_else(|p| p.into_inner());
            let best = combined == "direct" || combined == "lan";
            let since = changes.last().map_or(now, |(t, _)| now - *t);
            if pinged && (best || (now >= SETTLE && since >= Duration::from_secs(2))) {
                break;
            }
            if pinged && now >= SETTLE + FIRST_PING_LIMIT {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let (final_at, path) = changes.last().cloned().unwrap_or_default();
    let first_ping_ms = first_ping
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .map(|d| d.as_millis() as u64);
    Sample {
        first_ping_ms,
        final_path_ms: Some(final_at.as_millis() as u64),
        path,
        reason,
        error: None,
    }
}

/// Runs every case `runs` times with `parallel` labs at a time; rows come
/// back in the order of `cases`. `progress` sees each finished sample.
pub fn run(
    bins: &Bins,
    cases: &[Case],
    runs: usize,
    parallel: usize,
    progress: &(dyn Fn(&Case, &Sample) + Sync),
) -> Vec<AgentRow> {
    let jobs: Vec<(usize, Case)> = (0..runs.max(1))
        .flat_map(|_| cases.iter().copied().enumerate())
        .collect();
    let next = Mutex::new(0usize);
    let out: Mutex<Vec<Vec<Sample>>> = Mutex::new(vec![Vec::new(); cases.len()]);
    std::thread::scope(|sc| {
        for _ in 0..parallel.max(1) {
            sc.spawn(|| loop {
                let k = {
                    let mut n = next.lock().unwrap_or_else(|p| p.into_inner());
                    let k = *n;
                    *n += 1;
                    k
                };
                let Some(&(i, c)) = jobs.get(k) else { break };
                let sample = run_case(bins, &c);
                progress(&c, &sample);
                out.lock().unwrap_or_else(|p| p.into_inner())[i].push(sample);
            });
        }
    });
    let samples = out.into_inner().unwrap_or_else(|p| p.into_inner());
    cases
        .iter()
        .zip(samples)
        .map(|(c, s)| AgentRow::new(*c, s))
        .collect()
}

fn ms(v: Option<u64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{:.2}", v as f64 / 1000.0))
}

/// A reason shortened for a table cell (the transport of a relay, or why).
fn short_reason(r: &AgentRow) -> String {
    let reason = r
        .samples
        .last()
        .map(|s| s.error.clone().unwrap_or_else(|| s.reason.clone()))
        .unwrap_or_default();
    let one_line = reason.lines().next().unwrap_or_default();
    let mut out: String = one_line.chars().take(90).collect();
    if one_line.chars().count() > 90 {
        out.push('…');
    }
    out.replace('|', "/")
}

/// Renders rows as a fixed-width table.
pub fn table(rows: &[AgentRow]) -> String {
    let mut s = format!(
        "{:<58} {:<7} {:<7} {:>8} {:>8}  {}\n",
        "pair", "path", "theory", "ping s", "final s", ""
    );
    for r in rows {
        s.push_str(&format!(
            "{:<58} {:<7} {:<7} {:>8} {:>8}  {}\n",
            r.case.label(),
            r.path,
            r.expected,
            ms(r.first_ping_ms),
            ms(r.final_path_ms),
            if r.ok { "ok" } else { "FAIL" }
        ));
    }
    s
}

/// Renders rows as the Markdown table of `docs/matrix.md`.
pub fn markdown(rows: &[AgentRow]) -> String {
    let mut s = String::from(
        "| pair | path | theory | first ping (s) | final path (s) | | a's reason for b |\n\
         |---|---|---|---:|---:|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.case.label(),
            r.path,
            r.expected,
            ms(r.first_ping_ms),
            ms(r.final_path_ms),
            if r.ok { "ok" } else { "**FAIL**" },
            short_reason(r)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pair_once_and_theory_as_documented() {
        let c = cases();
        // 9 sides: 45 unordered pairs, plus 6 same-router rows.
        assert_eq!(c.len(), 45 + 6);
        let get = |s: &str| Case::parse(s).expect("parse");
        // Birthday probing: a random symmetric NAT against an
        // endpoint-independent one.
        assert_eq!(expected(&get("port-restricted:symmetric")), "direct");
        assert_eq!(expected(&get("symmetric:cgnat")), "direct");
        // Port prediction: a sequential symmetric NAT facing an
        // endpoint-independent one, not another symmetric one.
        assert_eq!(
            expected(&get("port-restricted:symmetric-sequential")),
            "direct"
        );
        assert_eq!(expected(&get("symmetric-sequential:cgnat")), "direct");
        // Both sequential: the coordinated punch.
        assert_eq!(
            expected(&get("symmetric-sequential:symmetric-sequential")),
            "direct"
        );
        assert_eq!(expected(&get("symmetric-sequential:symmetric")), "relay");
        assert_eq!(expected(&get("upnp-symmetric:symmetric")), "direct");
        assert_eq!(expected(&get("upnp-symmetric:udp-blocked")), "relay");
        assert_eq!(expected(&get("cgnat:full-cone")), "direct");
        assert_eq!(expected(&get("symmetric:symmetric:lan")), "lan");
        assert_eq!(expected(&get("cgnat:cgnat:hairpin")), "lan");
        assert!(Case::parse("cgnat:none:lan").is_err());
        assert!(Case::parse("cgnat").is_err());
        assert!(Case::parse("cgnat:bogus").is_err());
    }
}
