//! Scenario files (TOML): a topology, processes to run in it, fault drills
//! on a timeline, and checks with deadlines. See `netsim/scenarios/*.toml`.
//!
//! Strings in `cmd`, `env` and check commands may use placeholders:
//! `{ip:NODE}` (a node's main address), `{out}` (the run's output folder)
//! and `{reflector}` (the first reflector's primary `ip:port`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::impair::Impairment;
use crate::lab::Lab;
use crate::nat::{NatPreset, RouterConfig, DEFAULT_MAPPING_TIMEOUT_S};
use crate::punch::{self, PathKind};
use crate::reflector::{Reflector, ReflectorClient};
use crate::Error;

/// A whole scenario file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name (used for the output folder).
    pub name: String,
    /// What the scenario shows.
    #[serde(default)]
    pub description: String,
    /// Routers (each one connected to the internet core).
    #[serde(default, rename = "router")]
    pub routers: Vec<RouterSpec>,
    /// Hosts with public addresses.
    #[serde(default, rename = "host")]
    pub hosts: Vec<HostSpec>,
    /// Devices behind routers.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceSpec>,
    /// Long-running processes.
    #[serde(default, rename = "process")]
    pub processes: Vec<ProcessSpec>,
    /// Fault drills on the timeline.
    #[serde(default, rename = "event")]
    pub events: Vec<EventSpec>,
    /// Checks, run in order.
    #[serde(default, rename = "check")]
    pub checks: Vec<CheckSpec>,
}

/// A router.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSpec {
    /// Node name.
    pub name: String,
    /// NAT preset.
    pub nat: NatPreset,
    /// Hairpinning on.
    #[serde(default)]
    pub hairpin: bool,
    /// UDP mapping idle timeout, seconds.
    #[serde(default)]
    pub mapping_timeout_s: Option<u32>,
    /// Run a UPnP-IGD / NAT-PMP / PCP gateway (miniupnpd).
    #[serde(default)]
    pub upnp: bool,
    /// With `upnp`: UPnP-IGD only (NAT-PMP and PCP off).
    #[serde(default)]
    pub upnp_only: bool,
    /// Loss probability on its uplink, each direction.
    #[serde(default)]
    pub loss: f64,
    /// One-way delay on its uplink, each direction, ms.
    #[serde(default)]
    pub delay_ms: u64,
}

/// A public host.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// Node name.
    pub name: String,
    /// How many public addresses (2 for a reflector).
    #[serde(default = "one")]
    pub ips: usize,
    /// Run the built-in reflector here (needs `ips >= 2`).
    #[serde(default)]
    pub reflector: bool,
}

fn one() -> usize {
    1
}

/// A device.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// Node name.
    pub name: String,
    /// Router it sits behind.
    pub router: String,
}

/// A process.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// Process name (output files are `<name>.stdout` / `.stderr`).
    pub name: String,
    /// Node to run in.
    pub node: String,
    /// Command and arguments.
    pub cmd: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// A fault drill at a point in time.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSpec {
    /// When, ms after processes started.
    pub at_ms: u64,
    /// What to do.
    pub action: Action,
    /// Device, router or process the action applies to.
    pub target: String,
    /// New router (`move`).
    #[serde(default)]
    pub to: Option<String>,
    /// New preset (`set-nat`).
    #[serde(default)]
    pub nat: Option<NatPreset>,
    /// Loss (`impair`).
    #[serde(default)]
    pub loss: Option<f64>,
    /// Delay (`impair`).
    #[serde(default)]
    pub delay_ms: Option<u64>,
}

/// Runtime changes a scenario can make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Kill a process.
    Kill,
    /// Kill and start a process again.
    Restart,
    /// Take a device's link down.
    LinkDown,
    /// Bring it back up.
    LinkUp,
    /// Move a device to router `to`.
    Move,
    /// Forget a router's NAT mappings.
    FlushNat,
    /// Change a router's NAT preset to `nat`.
    SetNat,
    /// Set loss/delay on a router's or host's uplink.
    Impair,
}

/// A check.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// Name in the report.
    pub name: String,
    /// Node where `cmd` runs.
    #[serde(default)]
    pub node: Option<String>,
    /// A command that must exit 0 (retried until the deadline).
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// Two devices to run the built-in punching probe between.
    #[serde(default)]
    pub punch: Option<[String; 2]>,
    /// Path the punch must reach (default `direct`).
    #[serde(default)]
    pub expect: Option<PathKind>,
    /// Start no earlier than this, ms after processes started.
    #[serde(default)]
    pub after_ms: u64,
    /// Give up after this many seconds.
    #[serde(default = "five")]
    pub deadline_s: f64,
}

fn five() -> f64 {
    5.0
}

/// Result of one check.
#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    /// Check name.
    pub name: String,
    /// Passed.
    pub ok: bool,
    /// Time spent, ms.
    pub ms: u64,
    /// What happened (path reached, command output tail, error).
    pub detail: String,
}

/// Result of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Output folder.
    pub out_dir: PathBuf,
    /// Lab setup time, ms.
    pub setup_ms: u64,
    /// Checks.
    pub checks: Vec<CheckResult>,
    /// Events executed (`at_ms action target: result`).
    pub events: Vec<String>,
}

impl Report {
    /// True when every check passed.
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// Human-readable report.
    pub fn render(&self) -> String {
        let mut s = format!(
            "scenario {}: {} (setup {} ms, output in {})\n",
            self.scenario,
            if self.ok() { "PASS" } else { "FAIL" },
            self.setup_ms,
            self.out_dir.display()
        );
        for e in &self.events {
            s.push_str(&format!("  event {e}\n"));
        }
        for c in &self.checks {
            s.push_str(&format!(
                "  [{}] {} ({} ms): {}\n",
                if c.ok { "ok" } else { "FAIL" },
                c.name,
                c.ms,
                c.detail
            ));
        }
        s
    }
}

impl Scenario {
    /// Parses a scenario from TOML text.
    pub fn parse(text: &str) -> Result<Scenario, Error> {
        toml::from_str(text).map_err(|e| Error::Config(format!("scenario: {e}")))
    }

    /// Reads a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Scenario::parse(&text)
    }
}

/// A scenario's lab, built and with its processes running.
#[derive(Debug)]
pub struct Running {
    /// The lab.
    pub lab: Lab,
    reflectors: Vec<Reflector>,
    out_dir: PathBuf,
    setup_ms: u64,
}

impl Running {
    /// The first reflector's primary address.
    pub fn reflector(&self) -> Option<std::net::SocketAddr> {
        self.reflectors.first().map(|r| r.primary)
    }

    fn subst(&self, s: &str) -> Result<String, Error> {
        let mut out = s.replace("{out}", &self.out_dir.display().to_string());
        if let Some(r) = self.reflector() {
            out = out.replace("{reflector}", &r.to_string());
        }
        while let Some(i) = out.find("{ip:") {
            let j = out[i..]
                .find('}')
                .ok_or_else(|| Error::Config(format!("unclosed placeholder in {s:?}")))?;
            let node = &out[i + 4..i + j];
            let ip = self.lab.ip(node)?.to_string();
            out.replace_range(i..i + j + 1, &ip);
        }
        Ok(out)
    }
}

/// Builds the lab of a scenario and starts its processes.
pub fn build(sc: &Scenario, out_dir: &Path) -> Result<Running, Error> {
    let t0 = Instant::now();
    std::fs::create_dir_all(out_dir)?;
    let lab = Lab::new()?;
    for h in &sc.hosts {
        lab.add_public_host(&h.name, h.ips.max(if h.reflector { 2 } else { 1 }))?;
    }
    for r in &sc.routers {
        let cfg = RouterConfig {
            nat: r.nat,
            hairpin: r.hairpin,
            mapping_timeout_s: r.mapping_timeout_s.unwrap_or(DEFAULT_MAPPING_TIMEOUT_S),
            upnp: r.upnp || r.upnp_only,
            upnp_only: r.upnp_only,
        };
        lab.add_router(&r.name, cfg)?;
        if r.loss > 0.0 || r.delay_ms > 0 {
            lab.set_impairment(
                &r.name,
                Impairment {
                    loss: r.loss,
                    delay_ms: r.delay_ms,
                },
            )?;
        }
    }
    for d in &sc.devices {
        lab.add_device(&d.name, &d.router)?;
    }
    let mut running = Running {
        lab,
        reflectors: Vec::new(),
        out_dir: out_dir.to_path_buf(),
        setup_ms: 0,
    };
    for h in sc.hosts.iter().filter(|h| h.reflector) {
        let r = Reflector::start(&running.lab, &h.name)?;
        running.reflectors.push(r);
    }
    for p in &sc.processes {
        let argv = p
            .cmd
            .iter()
            .map(|a| running.subst(a))
            .collect::<Result<Vec<_>, _>>()?;
        let env = p
            .env
            .iter()
            .map(|(k, v)| Ok((k.clone(), running.subst(v)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        running.lab.spawn(&p.name, &p.node, &argv, &env, out_dir)?;
    }
    running.setup_ms = t0.elapsed().as_millis() as u64;
    Ok(running)
}

fn do_event(run: &Running, e: &EventSpec) -> Result<String, Error> {
    let lab = &run.lab;
    match e.action {
        Action::Kill => lab.kill_process(&e.target).map(|_| "killed".into()),
        Action::Restart => lab.restart_process(&e.target).map(|_| "restarted".into()),
        Action::LinkDown => lab.link_down(&e.target).map(|_| "down".into()),
        Action::LinkUp => lab.link_up(&e.target).map(|_| "up".into()),
        Action::Move => {
            let to =
                e.to.as_deref()
                    .ok_or_else(|| Error::Config("move needs `to`".into()))?;
            lab.move_device(&e.target, to)
                .map(|ip| format!("now {ip} behind {to}"))
        }
        Action::FlushNat => lab.flush_nat(&e.target).map(|_| "mappings flushed".into()),
        Action::SetNat => {
            let nat = e
                .nat
                .ok_or_else(|| Error::Config("set-nat needs `nat`".into()))?;
            let mut cfg = lab.router_config(&e.target)?;
            cfg.nat = nat;
            lab.set_router_config(&e.target, cfg)
                .map(|_| format!("now {nat}"))
        }
        Action::Impair => {
            let imp = Impairment {
                loss: e.loss.unwrap_or(0.0),
                delay_ms: e.delay_ms.unwrap_or(0),
            };
            lab.set_impairment(&e.target, imp)
                .map(|_| format!("loss {} delay {} ms", imp.loss, imp.delay_ms))
        }
    }
}

fn run_check(run: &Running, c: &CheckSpec) -> CheckResult {
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(c.deadline_s.max(0.1));
    let (ok, detail) = match (&c.cmd, &c.punch) {
        (Some(cmd), None) => {
            let node = c.node.clone().unwrap_or_default();
            match cmd
                .iter()
                .map(|a| run.subst(a))
                .collect::<Result<Vec<_>, _>>()
            {
                Err(e) => (false, e.to_string()),
                Ok(argv) => loop {
                    match run.lab.exec(&node, &argv) {
                        Ok((true, out)) => break (true, tail(&out)),
                        Ok((false, out)) if Instant::now() >= deadline => {
                            break (false, format!("still failing at deadline: {}", tail(&out)))
                        }
                        Err(e) => break (false, e.to_string()),
                        Ok(_) => std::thread::sleep(Duration::from_millis(200)),
                    }
                },
            }
        }
        (None, Some([a, b])) => match run.reflector() {
            None => (
                false,
                "punch checks need a host with reflector = true".into(),
            ),
            Some(refl) => {
                let expect = c.expect.unwrap_or(PathKind::Direct);
                let budget = deadline.saturating_duration_since(Instant::now());
                match punch::punch(&run.lab, a, b, &ReflectorClient, refl, budget) {
                    Ok(r) => (
                        r.path == expect,
                        format!(
                            "path {} (expected {}){}",
                            r.path.name(),
                            expect.name(),
                            r.ms_to_connect
                                .map(|m| format!(", connected in {m} ms"))
                                .unwrap_or_default()
                        ),
                    ),
                    Err(e) => (false, e.to_string()),
                }
            }
        },
        _ => (
            false,
            "a check needs exactly one of `cmd` or `punch`".into(),
        ),
    };
    CheckResult {
        name: c.name.clone(),
        ok,
        ms: t0.elapsed().as_millis() as u64,
        detail,
    }
}

fn tail(s: &str) -> String {
    let t: Vec<&str> = s.trim().lines().collect();
    let n = t.len();
    t[n.saturating_sub(2)..].join(" | ")
}

/// Runs events and checks against a built scenario; returns the report
/// (also written to `<out>/report.json`).
pub fn execute(sc: &Scenario, run: &Running) -> Result<Report, Error> {
    let start = Instant::now();
    let mut events: Vec<&EventSpec> = sc.events.iter().collect();
    events.sort_by_key(|e| e.at_ms);
    let (checks, event_log) = std::thread::scope(|s| {
        let ev = s.spawn(|| {
            let mut log = Vec::new();
            for e in events {
                let at = start + Duration::from_millis(e.at_ms);
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                let res = do_event(run, e).unwrap_or_else(|err| format!("FAILED: {err}"));
                log.push(format!("{} ms {:?} {}: {res}", e.at_ms, e.action, e.target));
            }
            log
        });
        let mut results = Vec::new();
        for c in &sc.checks {
            let at = start + Duration::from_millis(c.after_ms);
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            results.push(run_check(run, c));
        }
        (results, ev.join().unwrap_or_default())
    });
    let report = Report {
        scenario: sc.name.clone(),
        out_dir: run.out_dir.clone(),
        setup_ms: run.setup_ms,
        checks,
        events: event_log,
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(run.out_dir.join("report.json"), json)?;
    Ok(report)
}
