//! TLS material: the configured certificate, or a self-signed dev
//! certificate made once in the data dir and reused.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

use crate::config::Config;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no {what}")]
    Empty { path: PathBuf, what: &'static str },
    #[error("cannot make a dev certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS config is not usable for QUIC: {0}")]
    Quic(String),
}

/// The certificate chain and key the edge serves, and the file clients trust.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The certificate file clients should trust (`--cert`).
    pub cert_path: PathBuf,
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    let path = path.to_owned();
    move |source| TlsError::Io { action, path, source }
}

/// Loads the configured certificate, or makes/reuses the dev one.
pub fn identity(config: &Config) -> Result<Identity, TlsError> {
    match &config.tls {
        Some(files) => load(&files.cert, &files.key),
        None => dev_identity(&config.data_dir),
    }
}

fn load(cert_path: &Path, key_path: &Path) -> Result<Identity, TlsError> {
    let cert_pem = std::fs::read(cert_path).map_err(io("read", cert_path))?;
    let chain = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(io("parse", cert_path))?;
    if chain.is_empty() {
        return Err(TlsError::Empty {
            path: cert_path.to_owned(),
            what: "PEM certificate",
        });
    }
    let key_pem = std::fs::read(key_path).map_err(io("read", key_path))?;
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(io("parse", key_path))?
        .ok_or_else(|| TlsError::Empty {
            path: key_path.to_owned(),
            what: "PEM private key",
        })?;
    Ok(Identity {
        chain,
        key,
        cert_path: cert_path.to_owned(),
    })
}

/// Where the dev certificate of an edge with this `data_dir` lives (clients
/// default to trusting it).
pub fn dev_cert_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("dev-cert.pem")
}

fn dev_identity(data_dir: &Path) -> Result<Identity, TlsError> {
    let cert_path = dev_cert_path(data_dir);
    let key_path = data_dir.join("dev-key.pem");
    if cert_path.exists() && key_path.exists() {
        return load(&cert_path, &key_path);
    }
    std::fs::create_dir_all(data_dir).map_err(io("create", data_dir))?;
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let rcgen::CertifiedKey { cert, key_pair } = rcgen::generate_simple_self_signed(names)?;
    // Write the key first and the certificate last, so a crash in between
    // leaves no certificate without its key.
    write_private(&key_path, key_pair.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem()).map_err(io("write", &cert_path))?;
    tracing::info!(cert = %cert_path.display(), "made a self-signed dev certificate");
    load(&cert_path, &key_path)
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io("write", path))?;
    f.write_all(bytes).map_err(io("write", path))
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    std::fs::write(path, bytes).map_err(io("write", path))
}

/// A QUIC server crypto config speaking ALPN `throng/1`, rustls on ring.
pub fn server_crypto(identity: &Identity) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM/SHA-256 first, whatever the client prefers: its hashing
    // runs on the CPU's SHA extensions, SHA-384's does not (it was 5% of the
    // edge's CPU per handshake).
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    tls.ignore_client_order = true;
    tls.alpn_protocols = vec![throng_wire::ALPN.to_vec()];
    // 0-RTT data could be replayed; Throng's Hello is not idempotent-safe.
    tls.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(Arc::new(quic))
}
