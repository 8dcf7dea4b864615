//! Client TLS: trust the given certificates (or, over WebTransport, the
//! certificate hashes a page would pin), speak ALPN `throng/3` (or `h3`),
//! TLS 1.3 on ring.

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

/// A quinn client config trusting exactly `roots`; with `webtransport`,
/// speaking HTTP/3 and, if hashes are given, accepting exactly the
/// certificates with those SHA-256 hashes instead.
pub fn client_config(
    roots: &[CertificateDer<'static>],
    webtransport: Option<&[[u8; 32]]>,
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
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut tls = match webtransport {
        Some(hashes) if !hashes.is_empty() => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedHashes {
                hashes: hashes.to_vec(),
                provider,
            }))
            .with_no_client_auth(),
        _ => builder.with_root_certificates(store).with_no_client_auth(),
    };
    tls.alpn_protocols = match webtransport {
        Some(_) => vec![web_transport_quinn::ALPN.as_bytes().to_vec()],
        None => vec![throng_wire::ALPN.to_vec()],
    };
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    let (keep_alive, quiet) = silence_allowed(keep_alive, idle_timeout);
    // The edge opens one stream per joined room; we never open more than the control stream.
    transport
        .max_concurrent_uni_streams(64u32.into())
        .max_concurrent_bidi_streams(0u32.into())
        .keep_alive_interval(Some(keep_alive))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(quiet).map_err(|e| ClientError::Tls(e.to_string()))?,
        ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The keep-alive interval and QUIC's idle timeout that notice a silent
/// edge within `idle_timeout` of the last packet it sent. QUIC restarts
/// its idle timer when the first ping after that packet goes out, up to
/// a keep-alive later, so the timer gets `idle_timeout` less one
/// keep-alive (which stays below the half that leaves the pings' answers
/// time to come back).
fn silence_allowed(keep_alive: Duration, idle_timeout: Duration) -> (Duration, Duration) {
    let keep_alive = keep_alive.min(idle_timeout / 3);
    (keep_alive, idle_timeout.saturating_sub(keep_alive))
}

/// Accepts a server certificate by its SHA-256 hash, as browsers do with
/// `serverCertificateHashes` (no CA, no name check; the handshake's
/// signature is still verified against the certificate's key).
#[derive(Debug)]
struct PinnedHashes {
    hashes: Vec<[u8; 32]>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedHashes {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        let hash: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if self.hashes.contains(&hash) {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_edge_is_given_the_idle_timeout_from_its_last_packet_and_no_more() {
        for (keep_alive, idle) in [(3_000, 10_000), (5_000, 10_000), (300, 2_000), (100, 100), (0, 1_000)] {
            let (keep_alive, idle) = (Duration::from_millis(keep_alive), Duration::from_millis(idle));
            let (k, quiet) = silence_allowed(keep_alive, idle);
            // The worst case: the timer restarts at the ping a keep-alive
            // after the edge's last packet.
            assert!(k + quiet <= idle, "{keep_alive:?} {idle:?}: {k:?} + {quiet:?}");
            assert!(k <= keep_alive, "pings never less often than asked");
            // A live edge's answer to a ping always has time to arrive.
            assert!(quiet >= 2 * k, "{keep_alive:?} {idle:?}: {k:?} {quiet:?}");
        }
        let (k, quiet) = silence_allowed(Duration::from_secs(3), Duration::from_secs(10));
        assert_eq!((k, quiet), (Duration::from_secs(3), Duration::from_secs(7)));
    }
}
