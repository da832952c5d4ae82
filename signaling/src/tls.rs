//! TLS configuration shared by QUIC and TLS over TCP: certificates from PEM
//! files or self-signed, and clients that pin the certificate's SHA-256
//! fingerprint or trust a CA file. rustls with the ring provider only.

use std::path::Path;
use std::sync::{Arc, Once};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::wire::ALPN;

/// A TLS setup problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Reading a PEM file failed.
    #[error("{path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// File holds no usable certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// File.
        path: String,
        /// What is missing.
        what: &'static str,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// Generating a self-signed certificate failed.
    #[error("self-signed certificate: {0}")]
    Generate(String),
    /// Fingerprint text is not 64 hex digits.
    #[error("certificate fingerprint must be 64 hex digits (SHA-256 of the DER certificate), optionally with ':' separators")]
    BadFingerprint,
}

/// Installs rustls's ring provider as the process default, once. Mixing
/// providers panics at run time, so every entry point calls this.
pub fn install_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    /// Chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Private key of the leaf.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Loads a PEM chain and a PEM private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        let chain: Vec<_> = rustls_pemfile::certs(&mut &cert_pem[..])
            .collect::<Result<_, _>>()
            .map_err(|source| TlsError::Read {
                path: cert.display().to_string(),
                source,
            })?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                path: cert.display().to_string(),
                what: "no CERTIFICATE block found",
            });
        }
        let key_der = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|source| TlsError::Read {
                path: key.display().to_string(),
                source,
            })?
            .ok_or(TlsError::Pem {
                path: key.display().to_string(),
                what: "no PRIVATE KEY block found",
            })?;
        Ok(Identity {
            chain,
            key: key_der,
        })
    }

    /// A fresh self-signed certificate for `names` (ECDSA P-256).
    #[cfg(feature = "server")]
    pub fn self_signed(names: &[String]) -> Result<Self, TlsError> {
        let ck = rcgen::generate_simple_self_signed(names.to_vec())
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        Ok(Identity {
            chain: vec![ck.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into()),
        })
    }

    /// Loads `dir/cert.pem` + `dir/key.pem`, creating a self-signed pair
    /// there first if absent, so the fingerprint survives restarts.
    #[cfg(feature = "server")]
    pub fn self_signed_persistent(dir: &Path, names: &[String]) -> Result<Self, TlsError> {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        if !cert.exists() || !key.exists() {
            let ck = rcgen::generate_simple_self_signed(names.to_vec())
                .map_err(|e| TlsError::Generate(e.to_string()))?;
            let write = |p: &Path, s: String| {
                std::fs::create_dir_all(dir)
                    .and_then(|_| std::fs::write(p, s))
                    .map_err(|source| TlsError::Read {
                        path: p.display().to_string(),
                        source,
                    })
            };
            write(&cert, ck.cert.pem())?;
            write(&key, ck.key_pair.serialize_pem())?;
        }
        Self::from_pem_files(&cert, &key)
    }

    /// SHA-256 of the leaf certificate, the value clients pin.
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.chain[0])
    }

    /// Server configuration (TLS 1.3, our ALPN) for QUIC and TCP alike.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

/// SHA-256 of a DER certificate.
pub fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(cert.as_ref()).into()
}

/// Fingerprint as lowercase hex.
pub fn fingerprint_hex(fp: &[u8; 32]) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 64 hex digits, `:` separators allowed.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], TlsError> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 {
        return Err(TlsError::BadFingerprint);
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b =
            u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| TlsError::BadFingerprint)?;
    }
    Ok(out)
}

/// How a client decides to trust the server.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Trust {
    /// The leaf certificate's SHA-256 must equal this (self-signed servers).
    Fingerprint([u8; 32]),
    /// Verify the chain against these roots and the server name (PKI).
    Roots(Vec<CertificateDer<'static>>),
}

impl Trust {
    /// Roots from a PEM file.
    pub fn ca_file(path: &Path) -> Result<Self, TlsError> {
        let pem = std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let roots: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<_, _>>()
            .map_err(|source| TlsError::Read {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Trust::Roots(roots))
    }

    /// Client configuration (TLS 1.3, our ALPN).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let mut cfg = match self {
            Trust::Fingerprint(fp) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCert {
                    fingerprint: *fp,
                    provider: provider(),
                }))
                .with_no_client_auth(),
            Trust::Roots(roots) => {
                let mut store = rustls::RootCertStore::empty();
                for r in roots {
                    store.add(r.clone())?;
                }
                builder.with_root_certificates(store).with_no_client_auth()
            }
        };
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

/// Accepts exactly one leaf certificate (by SHA-256) and still checks the
/// handshake signature against it, so the peer must hold its private key.
#[derive(Debug)]
struct PinnedCert {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate fingerprint {} does not match the pinned {}",
                fingerprint_hex(&fingerprint(end_entity)),
                fingerprint_hex(&self.fingerprint)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_text() {
        let id = Identity::self_signed(&["x".into()]).unwrap();
        let fp = id.fingerprint();
        assert_eq!(parse_fingerprint(&fingerprint_hex(&fp)).unwrap(), fp);
        assert!(parse_fingerprint("abc").is_err());
        id.server_config().unwrap();
        Trust::Fingerprint(fp).client_config().unwrap();
    }
}
