//! Every example scenario in `netsim/scenarios/` parses, runs and passes.

mod common;

use std::path::PathBuf;

use netsim::scenario::{self, Scenario};

fn examples() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("scenarios dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

#[test]
fn examples_parse() {
    let files = examples();
    assert!(files.len() >= 4, "example scenarios present: {files:?}");
    for f in files {
        let sc = Scenario::load(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(
            !sc.checks.is_empty(),
            "{}: a scenario without checks proves nothing",
            f.display()
        );
    }
}

#[test]
fn unknown_fields_and_presets_are_rejected() {
    let err = Scenario::parse("name = \"x\"\n[[router]]\nname = \"r\"\nnat = \"cone\"\n")
        .expect_err("bad preset");
    assert!(err.to_string().contains("nat"), "{err}");
    let err = Scenario::parse("name = \"x\"\nroters = 1\n").expect_err("typo");
    assert!(err.to_string().contains("roters"), "{err}");
}

#[test]
#[ignore = "needs root and network namespaces: run by bash scripts/test (cargo test -- --include-ignored)"]
fn examples_run_and_pass() {
    common::require_root();
    let out_root = std::env::temp_dir().join(format!("netsim-scenarios-{}", std::process::id()));
    let reports: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = examples()
            .into_iter()
            .map(|f| {
                let out = out_root.join(f.file_stem().expect("stem"));
                s.spawn(move || {
                    let sc = Scenario::load(&f).expect("load");
                    let run = scenario::build(&sc, &out).expect("build");
                    scenario::execute(&sc, &run).expect("execute")
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    for r in &reports {
        print!("{}", r.render());
        assert!(r.out_dir.join("report.json").exists());
    }
    let failed: Vec<_> = reports
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.render())
        .collect();
    assert!(
        failed.is_empty(),
        "failing scenarios:\n{}",
        failed.join("\n")
    );
    let _ = std::fs::remove_dir_all(&out_root);
}
