//! Builds the XDP fast path (`xdp/relay_xdp.c`) with clang for the relay
//! server (feature `server`). Without clang the relay still builds: the
//! object is empty and `--xdp` reports that it was not compiled in.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=xdp/relay_xdp.c");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let obj = out.join("relay_xdp.o");
    let _ = std::fs::write(&obj, b"");
    println!("cargo:rustc-env=RELAY_XDP_OBJ={}", obj.display());
    let linux = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    if std::env::var_os("CARGO_FEATURE_SERVER").is_none() || !linux {
        return;
    }
    // The kernel's UAPI headers include <asm/types.h>, which Debian keeps
    // under the target's multiarch directory.
    let multiarch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86_64-linux-gnu",
        Ok("aarch64") => "aarch64-linux-gnu",
        Ok("riscv64") => "riscv64-linux-gnu",
        Ok("powerpc64") => "powerpc64le-linux-gnu",
        Ok("s390x") => "s390x-linux-gnu",
        _ => "",
    };
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let res = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .args(["-c", "xdp/relay_xdp.c", "-o"])
        .arg(&obj)
        .output();
    match res {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            let _ = std::fs::write(&obj, b"");
            let err = String::from_utf8_lossy(&o.stderr);
            for line in err.lines().take(20) {
                println!("cargo:warning=relay XDP program: {line}");
            }
            println!("cargo:warning=relay: the XDP fast path is not compiled in ({clang} failed; scripts/setup installs clang and libbpf-dev)");
        }
        Err(e) => println!(
            "cargo:warning=relay: the XDP fast path is not compiled in ({clang}: {e}; scripts/setup installs clang and libbpf-dev)"
        ),
    }
}
