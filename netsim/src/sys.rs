//! Thin helpers around the system: running `ip`/`nft`/`sysctl`, entering a
//! named network namespace from a thread, and checking for root.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use crate::Error;

/// Directory where `ip netns add` bind-mounts named namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// Runs a program to completion; a non-zero exit becomes [`Error::Command`]
/// carrying its stderr.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    run_stdin(program, args, None)
}

/// Like [`run`], feeding `stdin` to the program.
pub(crate) fn run_stdin(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, Error> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| Error::Command {
        cmd: format!("{program} {}", args.join(" ")),
        stderr: e.to_string(),
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip -n NS -batch -` with the given lines (one `ip` command each,
/// without the leading `ip`).
pub(crate) fn ip_batch(ns: Option<&str>, lines: &[String]) -> Result<(), Error> {
    if lines.is_empty() {
        return Ok(());
    }
    let script = lines.join("\n") + "\n";
    match ns {
        Some(ns) => run_stdin("ip", &["-n", ns, "-batch", "-"], Some(&script)),
        None => run_stdin("ip", &["-batch", "-"], Some(&script)),
    }
    .map(drop)
}

/// Loads an nftables ruleset inside namespace `ns`.
pub(crate) fn nft(ns: &str, ruleset: &str) -> Result<(), Error> {
    run_stdin(
        "ip",
        &["netns", "exec", ns, "nft", "-f", "-"],
        Some(ruleset),
    )
    .map(drop)
}

/// Runs `f` on a fresh thread that has joined network namespace `ns`.
/// Sockets opened inside `f` stay in that namespace for their whole life,
/// wherever they are used afterwards.
pub(crate) fn in_netns<T, F>(ns: &str, f: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("{NETNS_DIR}/{ns}");
    let file = std::fs::File::open(&path).map_err(|e| Error::Netns {
        ns: ns.to_string(),
        reason: format!("open {path}: {e}"),
    })?;
    let ns_name = ns.to_string();
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd only changes this thread's
        // network namespace; the thread ends when `f` returns.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(Error::Netns {
                ns: ns_name,
                reason: format!("setns: {}", std::io::Error::last_os_error()),
            });
        }
        Ok(f())
    })
    .join()
    .map_err(|_| Error::Netns {
        ns: ns.to_string(),
        reason: "thread panicked".into(),
    })?
}

/// Writes a sysctl inside `ns` (e.g. `net/ipv4/ip_forward`); missing keys
/// (a module not loaded) are ignored when `optional`.
pub(crate) fn sysctl(ns: &str, key: &str, value: &str, optional: bool) -> Result<(), Error> {
    let path = format!("/proc/sys/{key}");
    let value = value.to_string();
    let res = in_netns(ns, move || std::fs::write(&path, value))?;
    match res {
        Ok(()) => Ok(()),
        Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Netns {
            ns: ns.to_string(),
            reason: format!("sysctl {key}: {e}"),
        }),
    }
}

/// True when this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True when a process with this PID exists.
pub(crate) fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Sends `sig` to a process group (negative PID), ignoring errors.
pub(crate) fn kill_group(pgid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(-(pgid as i32), sig);
    }
}

/// Sends `sig` to one process, ignoring errors.
pub(crate) fn kill_pid(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}
