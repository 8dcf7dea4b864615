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

/// A QUIC server crypto config speaking ALPN `throng/3` (and `h3` for
/// WebTransport when `web` is given), rustls on ring.
pub fn server_crypto(
    identity: &Identity,
    web: Option<&Arc<WebCert>>,
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
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
        .with_cert_resolver(Arc::new(ByAlpn {
            native: certified(identity.chain.clone(), &identity.key)?,
            web: web.cloned(),
        }));
    tls.ignore_client_order = true;
    tls.alpn_protocols = vec![throng_wire::ALPN.to_vec()];
    if web.is_some() {
        tls.alpn_protocols.push(web_transport_quinn::ALPN.as_bytes().to_vec());
    }
    // 0-RTT data could be replayed; Throng's Hello is not idempotent-safe.
    tls.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// The certificate browsers get over WebTransport (ALPN `h3`): the
/// configured one, or a self-signed dev certificate that browsers accept
/// by its hash, replaced before it expires.
#[derive(Debug)]
pub struct WebCert {
    state: std::sync::RwLock<Arc<WebCertState>>,
}

/// One WebTransport certificate and what a page needs to pin it.
#[derive(Debug)]
pub struct WebCertState {
    pub key: Arc<CertifiedKey>,
    /// Base64 SHA-256 of the DER certificate, for `serverCertificateHashes`;
    /// none for a configured certificate (browsers check that one by its CA).
    pub sha256: Option<String>,
    /// When the dev certificate expires (Unix seconds).
    pub not_after: Option<u64>,
}

use rustls::sign::CertifiedKey;

impl WebCert {
    /// The certificate in use now.
    pub fn current(&self) -> Arc<WebCertState> {
        Arc::clone(&self.state.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn replace(&self, next: WebCertState) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
    }

    /// The configured certificate, for browsers as for native clients.
    pub fn configured(identity: &Identity) -> Result<Self, TlsError> {
        Ok(Self {
            state: std::sync::RwLock::new(Arc::new(WebCertState {
                key: certified(identity.chain.clone(), &identity.key)?,
                sha256: None,
                not_after: None,
            })),
        })
    }

    /// The dev certificate in `data_dir`, made anew if it is missing, was
    /// made for a longer lifetime than `lifetime`, or has less than
    /// `renew_before` left.
    pub fn dev(data_dir: &Path, lifetime: Duration, renew_before: Duration) -> Result<Self, TlsError> {
        let state = match load_dev_web(data_dir, lifetime, renew_before) {
            Some(s) => s,
            None => make_dev_web(data_dir, lifetime)?,
        };
        Ok(Self {
            state: std::sync::RwLock::new(Arc::new(state)),
        })
    }

    /// Replaces the dev certificate `renew_before` ahead of its expiry, for
    /// as long as the edge runs. Pages fetch the new hash when they
    /// reconnect; sessions already open keep theirs.
    pub async fn keep_fresh(
        self: Arc<Self>,
        data_dir: PathBuf,
        lifetime: Duration,
        renew_before: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let Some(not_after) = self.current().not_after else {
                return; // a configured certificate: its owner renews it
            };
            let due = not_after.saturating_sub(renew_before.as_secs());
            let wait = due.saturating_sub(unix_now());
            // Wake at least hourly: the wall clock may jump (a suspended
            // host), and a sleep measures monotonic time.
            let nap = Duration::from_secs(wait.min(3600));
            if wait > 0 {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(nap) => continue,
                }
            }
            match make_dev_web(&data_dir, lifetime) {
                Ok(next) => {
                    tracing::info!(
                        cert_sha256 = next.sha256.as_deref().unwrap_or(""),
                        not_after = next.not_after.unwrap_or(0),
                        "replaced the WebTransport dev certificate before it expires"
                    );
                    metrics::counter!("throng_webtransport_cert_rotations_total").increment(1);
                    self.replace(next);
                    // Config validation keeps a new certificate from being
                    // due at once; this keeps a wrong clock from spinning.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot replace the WebTransport dev certificate; retrying in a minute");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                    }
                }
            }
        }
    }
}

use std::time::Duration;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn certified(chain: Vec<CertificateDer<'static>>, key: &PrivateKeyDer<'static>) -> Result<Arc<CertifiedKey>, TlsError> {
    let signer = rustls::crypto::ring::sign::any_supported_type(key)?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match()?;
    Ok(Arc::new(certified))
}

const WEB_CERT: &str = "webtransport-cert.pem";
const WEB_KEY: &str = "webtransport-key.pem";
/// When the dev certificate was made for and expires, written last: a
/// certificate without it is made again.
const WEB_VALIDITY: &str = "webtransport-cert.validity";

/// The WebTransport dev certificate's file (`cert` of the ready line's
/// sibling; tests and tools read it).
pub fn dev_web_cert_path(data_dir: &Path) -> PathBuf {
    data_dir.join(WEB_CERT)
}

fn load_dev_web(data_dir: &Path, lifetime: Duration, renew_before: Duration) -> Option<WebCertState> {
    let validity = std::fs::read_to_string(data_dir.join(WEB_VALIDITY)).ok()?;
    let (from, until) = validity.trim().split_once(' ')?;
    let (from, until): (u64, u64) = (from.parse().ok()?, until.parse().ok()?);
    if until.saturating_sub(from) > lifetime.as_secs() || until.saturating_sub(unix_now()) <= renew_before.as_secs() {
        return None;
    }
    let identity = load(&data_dir.join(WEB_CERT), &data_dir.join(WEB_KEY)).ok()?;
    web_state(identity.chain, &identity.key, until).ok()
}

fn web_state(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'static>,
    not_after: u64,
) -> Result<WebCertState, TlsError> {
    use base64::Engine;
    use sha2::Digest;
    let sha256 = chain
        .first()
        .map(|c| base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(c.as_ref())));
    Ok(WebCertState {
        key: certified(chain, key)?,
        sha256,
        not_after: Some(not_after),
    })
}

/// An ECDSA P-256 certificate for localhost valid `lifetime` from a minute
/// ago (browsers count the whole span, so the backdating is inside it).
fn make_dev_web(data_dir: &Path, lifetime: Duration) -> Result<WebCertState, TlsError> {
    std::fs::create_dir_all(data_dir).map_err(io("create", data_dir))?;
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let mut params = rcgen::CertificateParams::new(names)?;
    let from = unix_now().saturating_sub(crate::config::DEV_CERT_BACKDATE.as_secs());
    let until = from + lifetime.as_secs();
    let at = |secs: u64| {
        time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
            .map_err(|e| TlsError::Quic(format!("certificate validity: {e}")))
    };
    params.not_before = at(from)?;
    params.not_after = at(until)?;
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key_pair)?;
    let (cert_path, key_path, validity) = (
        data_dir.join(WEB_CERT),
        data_dir.join(WEB_KEY),
        data_dir.join(WEB_VALIDITY),
    );
    // The validity file goes last: a crash midway leaves a set that
    // `load_dev_web` refuses, and the next start makes it again.
    let _ = std::fs::remove_file(&validity);
    write_private(&key_path, key_pair.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem()).map_err(io("write", &cert_path))?;
    std::fs::write(&validity, format!("{from} {until}\n")).map_err(io("write", &validity))?;
    let key = PrivateKeyDer::Pkcs8(key_pair.serialize_der().into());
    web_state(vec![cert.der().clone()], &key, until)
}

/// Native clients (`throng/3`) get the edge's certificate; browsers
/// (`h3`) get the WebTransport one.
#[derive(Debug)]
struct ByAlpn {
    native: Arc<CertifiedKey>,
    web: Option<Arc<WebCert>>,
}

impl rustls::server::ResolvesServerCert for ByAlpn {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let h3 = hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == web_transport_quinn::ALPN.as_bytes()));
        match &self.web {
            Some(web) if h3 => Some(Arc::clone(&web.current().key)),
            _ => Some(Arc::clone(&self.native)),
        }
    }
}
