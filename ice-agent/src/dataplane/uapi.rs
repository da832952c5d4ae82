//! The embedded interface's WireGuard UAPI (cross-platform userspace
//! interface, as wireguard-go serves it) on
//! `/var/run/wireguard/<interface>.sock`: `wg show` and `wg set` work on
//! it, and the agent's own WireGuard control thread manages its peers
//! through it exactly as it does a wireguard-go interface.
//!
//! The socket is root-only (mode 0600), and requests are still bounded: a
//! line is at most 512 bytes, a transaction at most 16 MiB, and a client
//! that stalls for 5 s is dropped.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::embedded::{format_get, parse_set, Device, SetError};

/// The UAPI directory wireguard-go and `wg` use.
pub const DIR: &str = "/var/run/wireguard";
const MAX_LINE: usize = 512;
const MAX_REQUEST: usize = 16 << 20;

/// A running UAPI listener; dropping it stops the thread and removes the
/// socket.
#[derive(Debug)]
pub struct Uapi {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Uapi {
    /// Listens for `dev` on the interface's UAPI socket.
    pub fn start(dev: Arc<Device>) -> io::Result<Uapi> {
        Self::start_at(Path::new(DIR), dev)
    }

    /// Listens in `dir` (tests use their own directory).
    pub fn start_at(dir: &Path, dev: Arc<Device>) -> io::Result<Uapi> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.sock", dev.name()));
        if UnixStream::connect(&path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another process", path.display()),
            ));
        }
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("wg-uapi".into())
            .spawn(move || serve(l, &dev, &s))?;
        Ok(Uapi {
            path,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Uapi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(l: UnixListener, dev: &Device, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((s, _)) => {
                if let Err(e) = client(s, dev) {
                    tracing::debug!("uapi client: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut p = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&l),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 200) };
            }
            Err(e) => {
                tracing::warn!("uapi accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one line (without the newline); `None` at end of stream.
fn line(r: &mut impl BufRead, total: &mut usize) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r.take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    *total += n;
    if buf.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("line longer than {MAX_LINE} bytes, or unterminated"),
        ));
    }
    if *total > MAX_REQUEST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "request too large",
        ));
    }
    buf.pop();
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

fn client(s: UnixStream, dev: &Device) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    loop {
        let mut total = 0;
        let Some(op) = line(&mut r, &mut total)? else {
            return Ok(());
        };
        match op.as_str() {
            "get=1" => {
                // Read to the blank line that ends the request.
                while line(&mut r, &mut total)?.is_some_and(|l| !l.is_empty()) {}
                let body = format_get(&dev.get());
                w.write_all(format!("{body}errno=0\n\n").as_bytes())?;
            }
            "set=1" => {
                let mut lines = Vec::new();
                loop {
                    match line(&mut r, &mut total)? {
                        Some(l) if l.is_empty() => break,
                        Some(l) => lines.push(l),
                        None => break,
                    }
                }
                let res =
                    parse_set(lines.iter().map(String::as_str)).and_then(|req| dev.apply(&req));
                let errno = match res {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::warn!(interface = dev.name(), "UAPI set refused: {e}");
                        match e {
                            SetError::Internal => libc::EIO,
                            _ => libc::EINVAL,
                        }
                    }
                };
                w.write_all(format!("errno={errno}\n\n").as_bytes())?;
            }
            "" => {}
            other => {
                tracing::debug!(interface = dev.name(), "UAPI: unknown operation {other:?}");
                w.write_all(format!("errno={}\n\n", libc::EINVAL).as_bytes())?;
                return Ok(());
            }
        }
    }
}
