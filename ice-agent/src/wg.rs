//! Talking to the WireGuard interface beside the agent (`external` mode).
//!
//! Two back ends, picked per interface:
//! - **UAPI**, the cross-platform text protocol on
//!   `/var/run/wireguard/<interface>.sock` that `wireguard-go` and
//!   `boringtun-cli` serve (`get=1` / `set=1`, keys in hex);
//! - the **`wg` tool** (wireguard-tools) for kernel interfaces, which have no
//!   UAPI socket (`wg show <if> dump`, `wg set`).
//!
//! Only the peers the agent manages are ever written, and [`Original`]
//! remembers what a peer looked like before so it can be put back on exit.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ipnet::IpNet;
use signaling::PublicKey;

/// A WireGuard control error: what failed, on which interface, and what to check.
#[derive(Debug, thiserror::Error)]
#[error("WireGuard interface {interface:?}: {what}")]
pub struct WgError {
    /// Interface.
    pub interface: String,
    /// What went wrong (with the fix when there is one).
    pub what: String,
}

/// A UAPI or `wg show dump` text that does not parse (what, and where).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

impl From<&str> for ParseError {
    fn from(s: &str) -> Self {
        ParseError(s.to_owned())
    }
}

impl From<String> for ParseError {
    fn from(s: String) -> Self {
        ParseError(s)
    }
}

/// One peer as the interface reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WgPeer {
    /// Public key.
    pub public_key: PublicKey,
    /// Preshared key (UAPI only; the `wg` dump hides it as `(none)` or shows it).
    pub preshared_key: Option<[u8; 32]>,
    /// Current endpoint.
    pub endpoint: Option<SocketAddr>,
    /// The endpoint as the interface printed it (kept for restoring even
    /// when it does not parse, e.g. an IPv6 scope id).
    pub endpoint_raw: Option<String>,
    /// Allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds since the epoch of the last handshake (0: never).
    pub last_handshake: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Persistent keepalive interval in seconds (0: off).
    pub keepalive: u16,
}

/// The interface as it reports itself.
#[derive(Debug, Clone, Default)]
pub struct WgDevice {
    /// Private key (if the interface has one).
    pub private_key: Option<[u8; 32]>,
    /// Listen port.
    pub listen_port: u16,
    /// Peers.
    pub peers: Vec<WgPeer>,
}

/// What to write for one peer.
#[derive(Debug, Clone, Default)]
pub struct PeerUpdate {
    /// Public key.
    pub public_key: PublicKey,
    /// New endpoint, if it changes.
    pub endpoint: Option<SocketAddr>,
    /// Replace the allowed IPs with these (when `Some`).
    pub allowed_ips: Option<Vec<IpNet>>,
    /// Persistent keepalive, if it changes.
    pub keepalive: Option<u16>,
    /// Preshared key to restore.
    pub preshared_key: Option<[u8; 32]>,
}

/// How a managed peer looked before the agent touched it.
#[derive(Debug, Clone)]
pub enum Original {
    /// The agent created the peer: remove it on exit.
    Created,
    /// The peer existed: put these fields back on exit.
    Existed(WgPeer),
}

/// A WireGuard interface handle.
#[derive(Debug, Clone)]
pub struct WgControl {
    interface: String,
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Uapi(PathBuf),
    Tool,
}

const UAPI_DIR: &str = "/var/run/wireguard";
const IO_TIMEOUT: Duration = Duration::from_secs(3);

impl WgControl {
    /// Finds the interface: its UAPI socket if there is one, else the `wg` tool.
    pub fn open(interface: &str) -> Result<WgControl, WgError> {
        let sock = Path::new(UAPI_DIR).join(format!("{interface}.sock"));
        let backend = if sock.exists() {
            Backend::Uapi(sock)
        } else {
            Backend::Tool
        };
        let wg = WgControl {
            interface: interface.to_owned(),
            backend,
        };
        wg.device()?;
        Ok(wg)
    }

    /// Interface name.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// `"uapi"` or `"wg"`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Uapi(_) => "uapi",
            Backend::Tool => "wg",
        }
    }

    fn err(&self, what: impl Into<String>) -> WgError {
        WgError {
            interface: self.interface.clone(),
            what: what.into(),
        }
    }

    /// Reads the interface and its peers.
    pub fn device(&self) -> Result<WgDevice, WgError> {
        match &self.backend {
            Backend::Uapi(p) => {
                let text = self.uapi(p, "get=1\n\n")?;
                parse_uapi(&text).map_err(|e| self.err(e.0))
            }
            Backend::Tool => {
                let out = Command::new("wg")
                    .args(["show", &self.interface, "dump"])
                    .output()
                    .map_err(|e| {
                        self.err(format!(
                            "cannot run `wg` ({e}): install wireguard-tools, or start the \
                             userspace implementation so {UAPI_DIR}/{}.sock exists",
                            self.interface
                        ))
                    })?;
                if !out.status.success() {
                    return Err(self.err(format!(
                        "`wg show {} dump` failed: {}; create the interface first \
                         (e.g. `ip link add {} type wireguard` or `wireguard-go {}`)",
                        self.interface,
                        String::from_utf8_lossy(&out.stderr).trim(),
                        self.interface,
                        self.interface
                    )));
                }
                parse_dump(&String::from_utf8_lossy(&out.stdout)).map_err(|e| self.err(e.0))
            }
        }
    }

    /// Writes one peer (creating it if needed).
    pub fn set_peer(&self, u: &PeerUpdate) -> Result<(), WgError> {
        match &self.backend {
            Backend::Uapi(p) => {
                let mut req = format!("set=1\npublic_key={}\n", hex(&u.public_key.0));
                if let Some(e) = u.endpoint {
                    req += &format!("endpoint={e}\n");
                }
                if let Some(k) = u.keepalive {
                    req += &format!("persistent_keepalive_interval={k}\n");
                }
                if let Some(psk) = u.preshared_key {
                    req += &format!("preshared_key={}\n", hex(&psk));
                }
                if let Some(ips) = &u.allowed_ips {
                    req += "replace_allowed_ips=true\n";
                    for ip in ips {
                        req += &format!("allowed_ip={ip}\n");
                    }
                }
                req += "\n";
                let text = self.uapi(p, &req)?;
                check_errno(&text).map_err(|e| self.err(e))
            }
            Backend::Tool => {
                let mut args = vec![
                    "set".to_owned(),
                    self.interface.clone(),
                    "peer".into(),
                    u.public_key.to_string(),
                ];
                if let Some(e) = u.endpoint {
                    args.extend(["endpoint".into(), e.to_string()]);
                }
                if let Some(k) = u.keepalive {
                    args.extend(["persistent-keepalive".into(), k.to_string()]);
                }
                if let Some(ips) = &u.allowed_ips {
                    let list: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
                    args.extend(["allowed-ips".into(), list.join(",")]);
                }
                self.tool(&args)
            }
        }
    }

    /// Removes a peer.
    pub fn remove_peer(&self, public_key: &PublicKey) -> Result<(), WgError> {
        match &self.backend {
            Backend::Uapi(p) => {
                let req = format!("set=1\npublic_key={}\nremove=true\n\n", hex(&public_key.0));
                let text = self.uapi(p, &req)?;
                check_errno(&text).map_err(|e| self.err(e))
            }
            Backend::Tool => self.tool(&[
                "set".into(),
                self.interface.clone(),
                "peer".into(),
                public_key.to_string(),
                "remove".into(),
            ]),
        }
    }

    /// Puts a peer back as it was before the agent managed it: endpoint,
    /// allowed IPs, keepalive and preshared key. A peer that had no endpoint
    /// is removed and re-created (no protocol can unset an endpoint); that
    /// takes two transactions, since boringtun keeps `remove` set for the
    /// rest of a transaction.
    pub fn restore(&self, public_key: &PublicKey, original: &Original) -> Result<(), WgError> {
        let p = match original {
            Original::Created => return self.remove_peer(public_key),
            Original::Existed(p) => p,
        };
        let endpoint = p
            .endpoint_raw
            .clone()
            .or_else(|| p.endpoint.map(|e| e.to_string()));
        match &self.backend {
            Backend::Uapi(path) => {
                let key = hex(&public_key.0);
                if endpoint.is_none() {
                    self.remove_peer(public_key)?;
                }
                let mut req = format!("set=1\npublic_key={key}\n");
                if let Some(e) = &endpoint {
                    req += &format!("endpoint={e}\n");
                }
                req += &format!(
                    "persistent_keepalive_interval={}\npreshared_key={}\nreplace_allowed_ips=true\n",
                    p.keepalive,
                    hex(&p.preshared_key.unwrap_or([0; 32]))
                );
                for ip in &p.allowed_ips {
                    req += &format!("allowed_ip={ip}\n");
                }
                req += "\n";
                let text = self.uapi(path, &req)?;
                check_errno(&text).map_err(|e| self.err(e))
            }
            Backend::Tool => {
                if endpoint.is_none() {
                    self.remove_peer(public_key)?;
                }
                let psk = PskFile::new(p.preshared_key)
                    .map_err(|e| self.err(format!("preshared key file: {e}")))?;
                let ips: Vec<String> = p.allowed_ips.iter().map(|i| i.to_string()).collect();
                let mut args = vec![
                    "set".to_owned(),
                    self.interface.clone(),
                    "peer".into(),
                    public_key.to_string(),
                    "allowed-ips".into(),
                    ips.join(","),
                    "persistent-keepalive".into(),
                    p.keepalive.to_string(),
                    "preshared-key".into(),
                    psk.path().display().to_string(),
                ];
                if let Some(e) = endpoint {
                    args.extend(["endpoint".into(), e]);
                }
                self.tool(&args)
            }
        }
    }

    fn uapi(&self, path: &Path, request: &str) -> Result<String, WgError> {
        let io = |e: std::io::Error| {
            self.err(format!(
                "UAPI {}: {e} (is the userspace WireGuard still running?)",
                path.display()
            ))
        };
        let mut s = UnixStream::connect(path).map_err(io)?;
        s.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        s.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        s.write_all(request.as_bytes()).map_err(io)?;
        let mut text = String::new();
        let mut r = BufReader::new(s);
        loop {
            let mut line = String::new();
            let n = r.read_line(&mut line).map_err(io)?;
            if n == 0 || line == "\n" {
                break;
            }
            text.push_str(&line);
            if text.len() > 1 << 22 {
                return Err(self.err("UAPI answer larger than 4 MiB"));
            }
        }
        Ok(text)
    }

    fn tool(&self, args: &[String]) -> Result<(), WgError> {
        let out = Command::new("wg")
            .args(args)
            .output()
            .map_err(|e| self.err(format!("cannot run `wg` ({e}): install wireguard-tools")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(self.err(format!(
                "`wg {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}

/// A preshared key in a 0600 file for `wg set … preshared-key FILE`
/// (`/dev/null` clears it), removed when dropped.
struct PskFile(Option<PathBuf>);

impl PskFile {
    fn new(key: Option<[u8; 32]>) -> std::io::Result<PskFile> {
        let Some(k) = key else {
            return Ok(PskFile(None));
        };
        use std::os::unix::fs::OpenOptionsExt;
        let path = std::env::temp_dir().join(format!(
            "wgice-psk-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(b64(&k).as_bytes())?;
        Ok(PskFile(Some(path)))
    }

    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new("/dev/null"))
    }
}

impl Drop for PskFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Lowercase hex, as the UAPI writes keys.
pub(crate) fn hex(k: &[u8; 32]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

fn b64(k: &[u8; 32]) -> String {
    signaling::keys::encode32(k)
}

/// A UAPI hex key.
pub(crate) fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

fn unb64(s: &str) -> Option<[u8; 32]> {
    signaling::keys::decode32(s).ok()
}

fn check_errno(text: &str) -> Result<(), String> {
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("errno=") {
            return if v == "0" {
                Ok(())
            } else {
                Err(format!("UAPI set failed with errno {v}"))
            };
        }
    }
    Err("UAPI answer without errno".into())
}

/// Parses a UAPI `get` answer.
pub fn parse_uapi(text: &str) -> Result<WgDevice, ParseError> {
    let mut dev = WgDevice::default();
    let mut peer: Option<WgPeer> = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let bad = || format!("UAPI: bad value in {line:?}");
        match k {
            "private_key" => dev.private_key = Some(unhex(v).ok_or_else(bad)?),
            "listen_port" => dev.listen_port = v.parse().map_err(|_| bad())?,
            "public_key" => {
                dev.peers.extend(peer.take());
                peer = Some(WgPeer {
                    public_key: PublicKey(unhex(v).ok_or_else(bad)?),
                    ..WgPeer::default()
                });
            }
            "errno" if v != "0" => return Err(format!("UAPI get failed with errno {v}").into()),
            _ => {
                let Some(p) = peer.as_mut() else { continue };
                match k {
                    "preshared_key" => {
                        p.preshared_key = unhex(v).filter(|k| k != &[0; 32]);
                    }
                    "endpoint" => {
                        p.endpoint = v.parse().ok();
                        p.endpoint_raw = Some(v.to_owned());
                    }
                    "allowed_ip" => p.allowed_ips.push(v.parse().map_err(|_| bad())?),
                    "last_handshake_time_sec" => p.last_handshake = v.parse().unwrap_or(0),
                    "rx_bytes" => p.rx_bytes = v.parse().unwrap_or(0),
                    "tx_bytes" => p.tx_bytes = v.parse().unwrap_or(0),
                    "persistent_keepalive_interval" => p.keepalive = v.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    dev.peers.extend(peer);
    Ok(dev)
}

/// Parses `wg show <if> dump`.
pub fn parse_dump(text: &str) -> Result<WgDevice, ParseError> {
    let mut lines = text.lines();
    let first: Vec<&str> = lines
        .next()
        .ok_or_else(|| ParseError("`wg show dump` printed nothing".into()))?
        .split('\t')
        .collect();
    if first.len() < 3 {
        return Err(format!("unexpected `wg show dump` header {first:?}").into());
    }
    let mut dev = WgDevice {
        private_key: unb64(first[0]),
        listen_port: first[2].parse().unwrap_or(0),
        peers: Vec::new(),
    };
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 8 {
            continue;
        }
        let Some(public_key) = unb64(f[0]).map(PublicKey) else {
            continue;
        };
        dev.peers.push(WgPeer {
            public_key,
            preshared_key: unb64(f[1]),
            endpoint: f[2].parse().ok(),
            endpoint_raw: (f[2] != "(none)").then(|| f[2].to_owned()),
            allowed_ips: f[3].split(',').filter_map(|s| s.parse().ok()).collect(),
            last_handshake: f[4].parse().unwrap_or(0),
            rx_bytes: f[5].parse().unwrap_or(0),
            tx_bytes: f[6].parse().unwrap_or(0),
            keepalive: f[7].parse().unwrap_or(0),
        });
    }
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uapi_get_parses_peers_and_counters() {
        let a = "11".repeat(32);
        let b = "22".repeat(32);
        let text = format!(
            "private_key={a}\nlisten_port=51820\npublic_key={b}\npreshared_key={}\n\
             endpoint=127.0.0.1:4000\nlast_handshake_time_sec=17\nrx_bytes=9\ntx_bytes=10\n\
             persistent_keepalive_interval=25\nallowed_ip=10.8.0.2/32\nallowed_ip=fd00::2/128\n\
             public_key={a}\nerrno=0\n",
            "00".repeat(32)
        );
        let d = parse_uapi(&text).unwrap();
        assert_eq!(d.listen_port, 51820);
        assert_eq!(d.private_key, Some([0x11; 32]));
        assert_eq!(d.peers.len(), 2);
        let p = &d.peers[0];
        assert_eq!(p.public_key, PublicKey([0x22; 32]));
        assert_eq!(p.preshared_key, None);
        assert_eq!(p.endpoint, Some("127.0.0.1:4000".parse().unwrap()));
        assert_eq!(p.allowed_ips.len(), 2);
        assert_eq!(
            (p.last_handshake, p.rx_bytes, p.tx_bytes, p.keepalive),
            (17, 9, 10, 25)
        );
        assert_eq!(d.peers[1].endpoint, None);
        assert!(parse_uapi("errno=22\n").is_err());
        assert!(parse_uapi("listen_port=x\n").is_err());
        assert!(check_errno("errno=0\n").is_ok());
        assert!(check_errno("errno=1\n").is_err());
    }

    #[test]
    fn wg_dump_parses() {
        let k = b64(&[7; 32]);
        let p = b64(&[8; 32]);
        let text = format!(
            "{k}\t{p}\t51820\toff\n{p}\t(none)\t10.0.0.1:51820\t10.8.0.2/32,fd00::2/128\t5\t6\t7\toff\n"
        );
        let d = parse_dump(&text).unwrap();
        assert_eq!(d.listen_port, 51820);
        assert_eq!(d.peers[0].public_key, PublicKey([8; 32]));
        assert_eq!(d.peers[0].preshared_key, None);
        assert_eq!(d.peers[0].allowed_ips.len(), 2);
        assert_eq!(d.peers[0].keepalive, 0);
        assert_eq!(
            (
                d.peers[0].last_handshake,
                d.peers[0].rx_bytes,
                d.peers[0].tx_bytes
            ),
            (5, 6, 7)
        );
        assert!(parse_dump("").is_err());
    }
}
