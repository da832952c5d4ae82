//! Labs are independent and clean up: eight labs at once, and a run killed
//! with SIGKILL leaves nothing that breaks the next one (the sweeper removes
//! its namespaces and processes, and only those).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netsim::lab::{self, Lab};
use netsim::nat::{NatPreset, RouterConfig};
use netsim::probe;
use netsim::reflector::{Reflector, ReflectorClient};

fn namespaces_with(prefix: &str) -> Vec<String> {
    lab::list_namespaces()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn eight_labs_in_parallel() {
    common::require_root();
    let presets = [
        NatPreset::FullCone,
        NatPreset::RestrictedCone,
        NatPreset::PortRestricted,
        NatPreset::Symmetric,
        NatPreset::SymmetricSequential,
        NatPreset::Cgnat,
        NatPreset::PortRestricted,
        NatPreset::FullCone,
    ];
    let t0 = Instant::now();
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = presets
            .iter()
            .map(|p| {
                s.spawn(move || {
                    let t = Instant::now();
                    let lab = Lab::new().expect("lab");
                    lab.add_public_host("stun", 2).expect("host");
                    lab.add_router("r", RouterConfig::new(*p)).expect("router");
                    lab.add_device("d", "r").expect("device");
                    let setup = t.elapsed();
                    let refl = Reflector::start(&lab, "stun").expect("reflector");
                    let (c, seq) =
                        probe::classify(&lab, "d", &ReflectorClient, refl.primary, refl.alternate)
                            .expect("probe");
                    let prefix = lab.prefix().to_string();
                    drop(refl);
                    let t = Instant::now();
                    drop(lab);
                    (*p, c.matches(*p, seq), prefix, setup, t.elapsed())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    println!("8 labs in {:.2} s", t0.elapsed().as_secs_f64());
    let mut prefixes: Vec<&String> = results.iter().map(|r| &r.2).collect();
    prefixes.sort();
    prefixes.dedup();
    assert_eq!(prefixes.len(), 8, "every lab has its own prefix");
    for (p, ok, prefix, setup, down) in &results {
        println!("{p:<22} setup {setup:?} teardown {down:?}");
        assert!(ok, "{p} misbehaved while 8 labs ran");
        assert!(
            namespaces_with(prefix).is_empty(),
            "{prefix} left namespaces"
        );
    }
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn killed_run_is_swept_and_the_next_run_works() {
    common::require_root();
    let dir = std::env::temp_dir().join(format!("netsim-killed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("killme.toml");
    std::fs::write(
        &file,
        r#"
name = "killme"
[[host]]
name = "server"
[[router]]
name = "r"
nat = "port-restricted"
[[device]]
name = "d"
router = "r"
[[process]]
name = "sleeper"
node = "server"
cmd = ["sleep", "1000"]
"#,
    )
    .expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_netsim"))
        .args(["run", "--keep", "--out"])
        .arg(dir.join("out"))
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("netsim run");
    let stdout = child.stdout.take().expect("stdout");
    let mut prefix = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("line");
        if let Some(rest) = line.strip_prefix("lab ") {
            prefix = rest.split_whitespace().next().map(str::to_string);
            break;
        }
    }
    let prefix = prefix.expect("netsim printed its lab prefix");
    let left = namespaces_with(&prefix);
    assert!(left.len() >= 4, "lab is up: {left:?}");
    let host_ns = left
        .iter()
        .find(|n| n.ends_with("h-server"))
        .expect("host ns")
        .clone();
    // The process may still be on its way into the namespace (`ip netns
    // exec` forks, then enters): wait for it rather than race it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let sleeper: u32 = loop {
        let pids = Command::new("ip")
            .args(["netns", "pids", &host_ns])
            .output()
            .expect("ip");
        if let Some(p) = String::from_utf8_lossy(&pids.stdout)
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
        {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sleeper pid never showed up in {host_ns}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };

    // SIGKILL: no teardown runs.
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert!(
        !namespaces_with(&prefix).is_empty(),
        "bind-mounted namespaces outlive a SIGKILL"
    );

    // A live lab of this process must survive the sweep the next Lab::new runs.
    let live = Lab::new().expect("next lab");
    let live_prefix = live.prefix().to_string();
    assert!(
        namespaces_with(&prefix).is_empty(),
        "sweeper removed the dead run"
    );
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while alive(sleeper) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(sleeper), "the dead run's process was killed");
    assert_eq!(lab::sweep(), 0, "nothing left to sweep");
    assert!(
        !namespaces_with(&live_prefix).is_empty(),
        "live lab untouched"
    );

    // And the next lab works.
    live.add_public_host("stun", 2).expect("host");
    live.add_router("r", RouterConfig::new(NatPreset::PortRestricted))
        .expect("router");
    live.add_device("d", "r").expect("device");
    let refl = Reflector::start(&live, "stun").expect("reflector");
    let (c, seq) =
        probe::classify(&live, "d", &ReflectorClient, refl.primary, refl.alternate).expect("probe");
    assert!(c.matches(NatPreset::PortRestricted, seq), "{c}");
    drop(refl);
    drop(live);
    let _ = std::fs::remove_dir_all(&dir);
}
