//! `netsim`: build network-namespace labs with real NATs.
//!
//! `netsim matrix` punches between every pair of NAT presets, `netsim run`
//! runs a scenario file, `netsim demo` runs the built-in demo scenario and
//! then the whole wgice suite across the same NATs ([`netsim::mesh::demo`]),
//! `netsim classify` checks that each preset behaves as named,
//! `netsim exec` runs a command in a node of a lab kept up with `--keep`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use netsim::lab::{self, Lab, STATE_DIR};
use netsim::matrix;
use netsim::nat::{NatPreset, RouterConfig};
use netsim::probe;
use netsim::reflector::{Reflector, ReflectorClient};
use netsim::scenario::{self, Scenario};

const DEMO: &str = include_str!("../scenarios/demo.toml");

#[derive(Parser, Debug)]
#[command(
    name = "netsim",
    about = "wgice network lab: namespaces, real NATs, the NAT matrix"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Hole-punch between every pair of NAT presets, each pair in its own lab.
    Matrix {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Labs run at the same time.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
        /// Punching budget per pair, milliseconds.
        #[arg(long, default_value_t = 2500)]
        budget_ms: u64,
        /// Add one same-router (LAN) row per preset.
        #[arg(long)]
        lan: bool,
        /// Only these pairs (`a:b`, repeatable).
        #[arg(long)]
        pair: Vec<String>,
        /// Also punch to this many ports after each reflexive port
        /// (port prediction); theory then expects sequential symmetric <->
        /// port-restricted to go direct.
        #[arg(long, default_value_t = 0)]
        predict: u16,
        /// Run the real suite per pair instead of the punching probe
        /// (relay, signaling, wireguard-go and ice-agent on both nodes):
        /// path, time to first ping, time to the final path. `--pair`
        /// also takes `a:a:lan` / `a:a:hairpin` (one router) and the side
        /// `upnp-symmetric`. Needs the workspace binaries built.
        #[arg(long)]
        agents: bool,
        /// With --agents: runs per pair (the times are medians).
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// With --agents: write the Markdown table here (e.g.
        /// docs/matrix.md) and the JSON beside it (.json).
        #[arg(long)]
        markdown: Option<PathBuf>,
    },
    /// Classify every preset (or the given ones) with the RFC 5780 probe.
    Classify {
        /// Presets to check (default: all).
        presets: Vec<String>,
        /// Turn hairpinning on in the routers.
        #[arg(long)]
        hairpin: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a scenario file: build, run events and checks, report, tear down.
    Run {
        /// The scenario (TOML).
        file: PathBuf,
        /// Leave the lab up after the checks until Ctrl-C (use `netsim exec`).
        #[arg(long)]
        keep: bool,
        /// Output folder (default: out/netsim/<name>-<unix time>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run the built-in demo: NATed devices punching through, then the whole
    /// wgice suite (relay, signaling, wireguard-go + ice-agent per device)
    /// across the same NATs. Needs the workspace binaries built.
    Demo {
        /// Leave the lab up after the checks until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Run a command inside a node of a lab kept up by `run --keep`.
    Exec {
        /// Lab prefix (default: the newest kept lab).
        #[arg(long)]
        lab: Option<String>,
        /// Node name.
        node: String,
        /// Command and arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Remove namespaces left by killed netsim runs (only netsim's own, only
    /// those whose creating process is gone).
    Sweep,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Exec { .. }) {
        install_signal_cleanup();
    }
    match cli.cmd {
        Cmd::Matrix {
            json,
            parallel,
            budget_ms,
            lan,
            pair,
            predict,
            agents,
            runs,
            markdown,
        } => {
            if agents {
                return agent_matrix(&pair, runs, parallel, json, markdown);
            }
            let t0 = Instant::now();
            let pairs = if pair.is_empty() {
                matrix::pairs(lan)
            } else {
                pair.iter()
                    .map(|p| {
                        let (a, b) = p.split_once(':').context("--pair wants a:b")?;
                        Ok((a.parse()?, b.parse()?, false))
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            let rows = matrix::run_predicting(
                &pairs,
                parallel,
                Duration::from_millis(budget_ms),
                predict,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", matrix::table(&rows));
                let setup: Vec<u64> = rows.iter().map(|r| r.setup_ms).collect();
                let down: Vec<u64> = rows.iter().map(|r| r.teardown_ms).collect();
                println!(
                    "{} pairs in {:.1} s ({} labs in parallel); lab setup median {} ms, teardown median {} ms",
                    rows.len(),
                    t0.elapsed().as_secs_f64(),
                    parallel,
                    median(setup),
                    median(down)
                );
            }
            if rows.iter().any(|r| r.path != r.expected) {
                std::process::exit(1);
            }
        }
        Cmd::Classify {
            presets,
            hairpin,
            json,
        } => {
            let presets: Vec<NatPreset> = if presets.is_empty() {
                NatPreset::ALL.to_vec()
            } else {
                presets
                    .iter()
                    .map(|p| p.parse())
                    .collect::<Result<_, _>>()?
            };
            // One lab per preset, all at once.
            let results = std::thread::scope(|s| {
                let hs: Vec<_> = presets
                    .iter()
                    .map(|p| {
                        s.spawn(move || -> Result<_> {
                            let mut cfg = RouterConfig::new(*p);
                            cfg.hairpin = hairpin;
                            let lab = Lab::new()?;
                            lab.add_public_host("stun", 2)?;
                            lab.add_router("r", cfg)?;
                            lab.add_device("d", "r")?;
                            let refl = Reflector::start(&lab, "stun")?;
                            Ok(probe::classify(
                                &lab,
                                "d",
                                &ReflectorClient,
                                refl.primary,
                                refl.alternate,
                            )?)
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| bail!("probe thread panicked")))
                    .collect::<Vec<_>>()
            });
            let mut bad = 0;
            let mut rows = Vec::new();
            for (p, r) in presets.iter().zip(results) {
                let (c, seq) = r?;
                let ok = c.matches(*p, seq);
                bad += usize::from(!ok);
                if json {
                    rows.push(serde_json::json!({
                        "preset": p, "ok": ok, "sequential_ports": seq, "classification": c,
                    }));
                } else {
                    println!(
                        "{:<22} {}{}  {}",
                        p.to_string(),
                        c,
                        if seq { ", sequential ports" } else { "" },
                        if ok { "ok" } else { "MISMATCH" }
                    );
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            }
            if bad > 0 {
                std::process::exit(1);
            }
        }
        Cmd::Run { file, keep, out } => {
            let sc = Scenario::load(&file)?;
            run_scenario(&sc, keep, out)?;
        }
        Cmd::Demo { keep } => {
            let sc = Scenario::parse(DEMO)?;
            println!("{}\n", sc.description.trim());
            run_scenario(&sc, keep, None)?;
            // Then the product itself, with the binaries built beside netsim.
            let dir = bin_dir()?;
            println!("\n== wgice across the same NATs ==");
            match netsim::mesh::Bins::in_dir(&dir) {
                Ok(bins) => {
                    if !netsim::mesh::demo(&bins) {
                        bail!(
                            "the wgice demo failed a check (agent logs are in the lab's work dir)"
                        );
                    }
                }
                Err(e) => bail!("{e}"),
            }
        }
        Cmd::Exec { lab, node, cmd } => exec(lab, &node, &cmd)?,
        Cmd::Sweep => {
            if !netsim::is_root() {
                bail!("netsim sweep needs root");
            }
            println!("removed {} leftover namespaces", lab::sweep());
        }
    }
    Ok(())
}

/// `netsim matrix --agents`.
fn agent_matrix(
    pair: &[String],
    runs: usize,
    parallel: usize,
    json: bool,
    markdown: Option<PathBuf>,
) -> Result<()> {
    use netsim::agent_matrix as am;
    if !netsim::is_root() {
        bail!("netsim matrix --agents needs root (network namespaces)");
    }
    let cases = if pair.is_empty() {
        am::cases()
    } else {
        pair.iter()
            .map(|p| am::Case::parse(p).map_err(anyhow::Error::msg))
            .collect::<Result<Vec<_>>>()?
    };
    let bins = netsim::mesh::Bins::in_dir(&bin_dir()?).map_err(anyhow::Error::msg)?;
    let t0 = Instant::now();
    let total = cases.len() * runs.max(1);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let rows = am::run(&bins, &cases, runs, parallel, &|c, smp| {
        let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        eprintln!(
            "[{n}/{total} {:.0} s] {}: {} (first ping {:?} ms){}",
            t0.elapsed().as_secs_f64(),
            c.label(),
            smp.path,
            smp.first_ping_ms,
            smp.error
                .as_deref()
                .map(|e| format!(" error: {e}"))
                .unwrap_or_default()
        );
    });
    let secs = t0.elapsed().as_secs_f64();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", am::table(&rows));
    }
    let failed = rows.iter().filter(|r| !r.ok).count();
    eprintln!(
        "{} pairs × {} run(s) in {secs:.0} s ({parallel} labs in parallel); {failed} failed",
        rows.len(),
        runs.max(1)
    );
    if let Some(md) = markdown {
        let doc = format!(
            "{}\n\n{}\n{}",
            MATRIX_HEAD.trim_end(),
            am::markdown(&rows),
            format_args!(
                "\n{} pairs, {} run(s) each (times are medians), {secs:.0} s with {parallel} labs \
                 in parallel; {failed} failed. Written by `netsim matrix --agents --runs {} \
                 --markdown {}`.\n",
                rows.len(),
                runs.max(1),
                runs.max(1),
                md.display()
            )
        );
        std::fs::write(&md, doc).with_context(|| format!("writing {}", md.display()))?;
        let js = md.with_extension("json");
        std::fs::write(&js, serde_json::to_string_pretty(&rows)? + "\n")
            .with_context(|| format!("writing {}", js.display()))?;
        eprintln!("wrote {} and {}", md.display(), js.display());
    }
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// The head of `docs/matrix.md` (the table and a summary follow).
const MATRIX_HEAD: &str = include_str!("matrix_head.md");

/// Where the workspace binaries are: beside this one.
fn bin_dir() -> Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default())
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn run_scenario(sc: &Scenario, keep: bool, out: Option<PathBuf>) -> Result<()> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let out = out.unwrap_or_else(|| PathBuf::from(format!("out/netsim/{}-{secs}", sc.name)));
    let running = scenario::build(sc, &out)?;
    let report = scenario::execute(sc, &running)?;
    print!("{}", report.render());
    if keep {
        let state = write_state(&running.lab)?;
        println!(
            "lab {} kept up; `netsim exec NODE -- CMD` to look inside; Ctrl-C tears it down",
            running.lab.prefix()
        );
        loop {
            std::thread::sleep(Duration::from_secs(3600));
            let _ = &state;
        }
    }
    drop(running);
    if !report.ok() {
        std::process::exit(1);
    }
    Ok(())
}

/// Records a kept lab's nodes for `netsim exec`.
fn write_state(lab: &Lab) -> Result<PathBuf> {
    std::fs::create_dir_all(STATE_DIR)?;
    let path = Path::new(STATE_DIR).join(format!("{}json", lab.prefix()));
    let nodes: serde_json::Map<String, serde_json::Value> = lab
        .nodes()
        .into_iter()
        .map(|(n, ns)| (n, serde_json::Value::String(ns)))
        .collect();
    let v =
        serde_json::json!({ "prefix": lab.prefix(), "pid": std::process::id(), "nodes": nodes });
    std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
    Ok(path)
}

fn exec(lab: Option<String>, node: &str, cmd: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let mut best: Option<(std::time::SystemTime, serde_json::Value)> = None;
    for e in std::fs::read_dir(STATE_DIR).with_context(|| {
        format!("no kept lab ({STATE_DIR} missing); start one with `netsim run --keep`")
    })? {
        let e = e?;
        let v: serde_json::Value = match std::fs::read_to_string(e.path())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
        {
            Some(v) => v,
            None => continue,
        };
        let pid = v["pid"].as_u64().unwrap_or(0);
        if pid == 0 || !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
            continue;
        }
        if let Some(want) = &lab {
            if !v["prefix"]
                .as_str()
                .unwrap_or("")
                .starts_with(want.as_str())
            {
                continue;
            }
        }
        let mtime = e.metadata()?.modified()?;
        if best.as_ref().is_none_or(|(t, _)| mtime > *t) {
            best = Some((mtime, v));
        }
    }
    let Some((_, v)) = best else {
        bail!("no kept lab is running; start one with `netsim run FILE --keep`");
    };
    let Some(ns) = v["nodes"][node].as_str() else {
        bail!(
            "lab {} has no node {node:?}; nodes: {}",
            v["prefix"],
            v["nodes"]
                .as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        );
    };
    let err = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .exec();
    bail!("exec ip netns exec: {err}")
}

/// Tears down every live lab on SIGINT/SIGTERM/SIGHUP, then exits.
fn install_signal_cleanup() {
    // SAFETY: sigset manipulation on a local, zero-initialised set; the mask
    // is set before any other thread exists, so every thread inherits it and
    // only the waiter below receives these signals. Children get the default
    // mask back from std::process::Command.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut sig: libc::c_int = 0;
            libc::sigwait(&set, &mut sig);
            eprintln!("netsim: signal {sig}, tearing down");
            for p in lab::live_prefixes() {
                lab::remove_prefix(&p);
                let _ = std::fs::remove_file(Path::new(STATE_DIR).join(format!("{p}json")));
            }
            std::process::exit(128 + sig);
        });
    }
}
