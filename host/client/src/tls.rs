//! Client TLS: trust the given certificates, speak ALPN `throng/1`, TLS 1.3 on ring.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;

use crate::ClientError;

/// Reads every PEM certificate in `path`.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let pem = std::fs::read(path).map_err(|e| ClientError::Tls(format!("cannot read {}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ClientError::Tls(format!("{} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

/// A quinn client config trusting exactly `roots`.
pub fn client_config(
    roots: &[CertificateDer<'static>],
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, ClientError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in roots {
        store
            .add(cert.clone())
            .map_err(|e| ClientError::Tls(format!("bad certificate to trust: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth();
    tls.alpn_protocols = vec![throng_wire::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // The edge opens one stream per joined room; we never open more than the control stream.
    transport
        .max_concurrent_uni_streams(64u32.into())
        .max_concurrent_bidi_streams(0u32.into())
        .keep_alive_interval(Some(keep_alive))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(idle_timeout).map_err(|e| ClientError::Tls(e.to_string()))?,
        ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}
