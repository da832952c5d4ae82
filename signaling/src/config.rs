//! The `signaling` binary's configuration: a TOML file, with command-line
//! flags overriding it. Errors name the key and say how to fix it.
//!
//! ```toml
//! listen = "0.0.0.0:4443"            # QUIC (UDP) and TLS (TCP), same port
//! metrics_listen = "127.0.0.1:9090"  # /metrics and /healthz (optional)
//! nats = "nats://127.0.0.1:4222"     # cluster mode (optional)
//! nats_prefix = "wgice.signaling"
//!
//! [tls]
//! cert = "/etc/wgice/signaling.crt"  # PEM chain…
//! key = "/etc/wgice/signaling.key"   # …and key, or:
//! # self_signed_dir = "/var/lib/wgice-signaling"  (generated once; pin its fingerprint)
//!
//! [auth]
//! token_secret_file = "/etc/wgice/mesh-secret"  # tokens from `signaling token --mesh NAME`
//!
//! [[mesh]]
//! name = "prod"
//! token = "a long random string"
//!
//! [limits]
//! queue_len = 256
//! max_connections = 100000
//! max_pending_per_ip = 64          # unregistered connections per source (IPv4 address or IPv6 /64)
//! rate_per_sec = 50.0
//! rate_burst = 200.0
//! max_mesh_members = 10000
//! register_timeout_secs = 10
//! idle_timeout_secs = 75
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{valid_mesh_name, MeshAuth};
use crate::server::ServerConfig;
use crate::tls::Identity;

/// The file's contents.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct FileConfig {
    /// QUIC + TLS/TCP listen address.
    pub listen: Option<SocketAddr>,
    /// `/metrics` + `/healthz` listen address.
    pub metrics_listen: Option<SocketAddr>,
    /// NATS URL (cluster mode).
    pub nats: Option<String>,
    /// NATS subject prefix.
    pub nats_prefix: Option<String>,
    /// Certificates.
    #[serde(default)]
    pub tls: TlsSection,
    /// Derived mesh tokens.
    #[serde(default)]
    pub auth: AuthSection,
    /// Static mesh tokens.
    #[serde(default)]
    pub mesh: Vec<MeshSection>,
    /// Limits.
    #[serde(default)]
    pub limits: LimitsSection,
}

/// `[tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TlsSection {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
    /// Directory holding a generated self-signed pair.
    pub self_signed_dir: Option<PathBuf>,
}

/// `[auth]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AuthSection {
    /// File holding the secret tokens are derived from.
    pub token_secret_file: Option<PathBuf>,
}

/// `[[mesh]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MeshSection {
    /// Mesh name.
    pub name: String,
    /// Token, inline.
    pub token: Option<String>,
    /// Token, from a file.
    pub token_file: Option<PathBuf>,
}

impl MeshSection {
    /// A mesh with an inline token.
    pub fn new(name: &str, token: &str) -> Self {
        MeshSection {
            name: name.to_string(),
            token: Some(token.to_string()),
            token_file: None,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LimitsSection {
    /// Frames queued per connection.
    pub queue_len: Option<usize>,
    /// Simultaneous connections.
    pub max_connections: Option<usize>,
    /// Unregistered connections per source address.
    pub max_pending_per_ip: Option<usize>,
    /// Sustained frames/s per node.
    pub rate_per_sec: Option<f64>,
    /// Burst frames per node.
    pub rate_burst: Option<f64>,
    /// Members per mesh.
    pub max_mesh_members: Option<usize>,
    /// Seconds to register after connecting.
    pub register_timeout_secs: Option<u64>,
    /// Seconds of silence before a connection is closed.
    pub idle_timeout_secs: Option<u64>,
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("config {key}: {message}")]
pub struct ConfigError {
    /// The key (`tls.cert`, `mesh[0].token`, …).
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

impl FileConfig {
    /// Parses TOML text (`origin` names the file in errors).
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            err(
                origin,
                format!("{e}(see the example at the top of signaling/src/config.rs)"),
            )
        })
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(path.display().to_string(), format!("cannot read: {e}")))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Turns the (already CLI-overridden) file into a server configuration.
    pub fn into_server_config(self) -> Result<ServerConfig, ConfigError> {
        let listen = self
            .listen
            .unwrap_or_else(|| "0.0.0.0:4443".parse().expect("literal"));
        let identity = match (&self.tls.cert, &self.tls.key, &self.tls.self_signed_dir) {
            (Some(c), Some(k), None) => Identity::from_pem_files(c, k)
                .map_err(|e| err("tls.cert/tls.key", e.to_string()))?,
            (None, None, Some(dir)) => Identity::self_signed_persistent(
                dir,
                &["wgice-signaling".to_string(), "localhost".to_string()],
            )
            .map_err(|e| err("tls.self_signed_dir", e.to_string()))?,
            (Some(_), None, _) | (None, Some(_), _) => {
                return Err(err(
                    "tls",
                    "`cert` and `key` go together: set both (--cert/--key) or neither",
                ))
            }
            (Some(_), Some(_), Some(_)) => {
                return Err(err(
                    "tls",
                    "set either `cert` + `key` or `self_signed_dir`, not both",
                ))
            }
            (None, None, None) => {
                return Err(err(
                    "tls",
                    "no certificate: set `tls.cert` + `tls.key` (--cert/--key), or \
                     `tls.self_signed_dir` (--self-signed-dir) to generate one whose \
                     fingerprint agents pin",
                ))
            }
        };
        let mut auth = MeshAuth::new();
        for (i, m) in self.mesh.iter().enumerate() {
            let key = format!("mesh[{i}]");
            if !valid_mesh_name(&m.name) {
                return Err(err(
                    format!("{key}.name"),
                    format!(
                        "{:?} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -",
                        m.name
                    ),
                ));
            }
            let token = match (&m.token, &m.token_file) {
                (Some(t), None) => t.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|e| err(format!("{key}.token_file"), format!("{}: {e}", f.display())))?
                    .trim()
                    .to_string(),
                _ => {
                    return Err(err(
                        key,
                        "set exactly one of `token` or `token_file` (--mesh NAME=TOKEN on the command line)",
                    ))
                }
            };
            if token.len() < 16 {
                return Err(err(
                    format!("{key}.token"),
                    "too short: use at least 16 characters (e.g. `openssl rand -base64 24`)",
                ));
            }
            auth = auth.with_mesh(&m.name, &token);
        }
        let mut have_secret = false;
        if let Some(f) = &self.auth.token_secret_file {
            let secret = std::fs::read(f)
                .map_err(|e| err("auth.token_secret_file", format!("{}: {e}", f.display())))?;
            if secret.len() < 16 {
                return Err(err(
                    "auth.token_secret_file",
                    "secret shorter than 16 bytes; generate one with `head -c 32 /dev/urandom > FILE`",
                ));
            }
            auth = auth.with_secret(&secret);
            have_secret = true;
        }
        if self.mesh.is_empty() && !have_secret {
            return Err(err(
                "mesh",
                "nobody could join: add a [[mesh]] with `name` and `token` (or --mesh NAME=TOKEN), \
                 or `auth.token_secret_file` (--token-secret-file)",
            ));
        }
        let mut cfg = ServerConfig::new(listen, identity, auth);
        cfg.metrics_listen = self.metrics_listen;
        cfg.nats = self.nats;
        if let Some(p) = self.nats_prefix {
            if p.is_empty() || p.contains(['*', '>', ' ']) {
                return Err(err(
                    "nats_prefix",
                    "must be a plain NATS subject (no spaces, `*` or `>`)",
                ));
            }
            cfg.nats_prefix = p;
        }
        let l = self.limits;
        let positive = |k: &str, v: usize| {
            if v == 0 {
                Err(err(format!("limits.{k}"), "must be at least 1"))
            } else {
                Ok(v)
            }
        };
        if let Some(v) = l.queue_len {
            cfg.queue_len = positive("queue_len", v)?;
        }
        if let Some(v) = l.max_connections {
            cfg.max_connections = positive("max_connections", v)?;
        }
        if let Some(v) = l.max_pending_per_ip {
            cfg.max_pending_per_ip = positive("max_pending_per_ip", v)?;
        }
        if let Some(v) = l.max_mesh_members {
            cfg.router.max_mesh_members = positive("max_mesh_members", v)?;
        }
        if let Some(v) = l.rate_per_sec {
            if !(v > 0.0 && v.is_finite()) {
                return Err(err("limits.rate_per_sec", "must be a positive number"));
            }
            cfg.router.rate_per_sec = v;
        }
        if let Some(v) = l.rate_burst {
            if !(v >= 1.0 && v.is_finite()) {
                return Err(err("limits.rate_burst", "must be at least 1"));
            }
            cfg.router.rate_burst = v;
        }
        if let Some(v) = l.register_timeout_secs {
            cfg.register_timeout =
                Duration::from_secs(positive("register_timeout_secs", v as usize)? as u64);
        }
        if let Some(v) = l.idle_timeout_secs {
            if v < 60 {
                return Err(err(
                    "limits.idle_timeout_secs",
                    "must be at least 60 (clients ping every 30 s)",
                ));
            }
            cfg.idle_timeout = Duration::from_secs(v);
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key() {
        let e = FileConfig::parse("listen = 5", "f.toml").unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
        let e = FileConfig::parse("[limits]\nqueue = 1", "f.toml").unwrap_err();
        assert!(e.to_string().contains("queue"), "{e}");
        let dir = std::env::temp_dir().join(format!("wgice-sig-cfg-{}", rand::random::<u32>()));
        let text = format!(
            "[tls]\nself_signed_dir = {:?}\n[[mesh]]\nname = \"prod\"\ntoken = \"short\"\n",
            dir.display().to_string()
        );
        let e = FileConfig::parse(&text, "f.toml")
            .unwrap()
            .into_server_config()
            .unwrap_err();
        assert_eq!(e.key, "mesh[0].token");
        let e = FileConfig::parse(
            "[[mesh]]\nname = \"prod\"\ntoken = \"0123456789abcdef\"\n",
            "f.toml",
        )
        .unwrap()
        .into_server_config()
        .unwrap_err();
        assert_eq!(e.key, "tls");
        let text = format!(
            "listen = \"127.0.0.1:0\"\n[tls]\nself_signed_dir = {:?}\n[[mesh]]\nname = \"prod\"\ntoken = \"0123456789abcdef\"\n[limits]\nrate_per_sec = 5.0\n",
            dir.display().to_string()
        );
        let cfg = FileConfig::parse(&text, "f.toml")
            .unwrap()
            .into_server_config()
            .unwrap();
        assert_eq!(cfg.router.rate_per_sec, 5.0);
        // The generated certificate persists: same fingerprint next time.
        let again = FileConfig::parse(&text, "f.toml")
            .unwrap()
            .into_server_config()
            .unwrap();
        assert_eq!(cfg.identity.fingerprint(), again.identity.fingerprint());
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[cfg(test)]
mod deploy_example {
    use super::*;

    #[test]
    fn shipped_example_parses() {
        let f = FileConfig::parse(
            include_str!("../../deploy/signaling.toml"),
            "deploy/signaling.toml",
        )
        .expect("deploy/signaling.toml is valid");
        assert_eq!(f.listen, Some("0.0.0.0:4443".parse().expect("addr")));
        assert_eq!(f.mesh.len(), 1);
    }
}
