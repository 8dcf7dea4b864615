//! Browser sessions: the HTTP/3 handshake (settings, then the extended
//! CONNECT, done by web-transport-quinn) in front of the very protocol
//! native clients speak. The path and the page's origin are checked here;
//! the token, as for every client, in the Hello that follows.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use thiserror::Error;

use crate::config::WebTransportConfig;
use crate::tls::WebCert;

/// What the edge serves browsers, and to which pages.
#[derive(Debug)]
pub struct WebTransport {
    pub(crate) config: WebTransportConfig,
    pub(crate) cert: Arc<WebCert>,
    /// `https://<listen><path>`: what pages pass to `new WebTransport`.
    pub(crate) url: String,
    /// The admin endpoint serving the demo page, once bound.
    demo: OnceLock<SocketAddr>,
}

/// Why a WebTransport session was not opened.
#[derive(Debug, Error)]
pub(crate) enum Refused {
    #[error("HTTP/3 handshake failed: {0}")]
    Handshake(String),
    #[error("no WebTransport CONNECT within {0:?}")]
    Timeout(Duration),
    #[error("path `{0}` is not the session path")]
    Path(String),
    #[error("origin `{0}` is not allowed")]
    Origin(String),
}

impl Refused {
    /// For the `reason` label of the refusal counter.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::Handshake(_) => "handshake",
            Self::Timeout(_) => "timeout",
            Self::Path(_) => "path",
            Self::Origin(_) => "origin",
        }
    }
}

impl WebTransport {
    pub(crate) fn new(config: WebTransportConfig, cert: Arc<WebCert>, local: SocketAddr) -> Self {
        // A wildcard listen address is no address a page can dial.
        let host = match local.ip() {
            ip if ip.is_unspecified() => "localhost".to_owned(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let url = format!("https://{host}:{}{}", local.port(), config.path);
        Self {
            config,
            cert,
            url,
            demo: OnceLock::new(),
        }
    }

    /// The demo page is served at `admin`: its origin may open sessions.
    pub(crate) fn set_demo_addr(&self, admin: SocketAddr) {
        let _ = self.demo.set(admin);
    }

    /// Where the demo page is, when it is served.
    pub(crate) fn demo_url(&self) -> Option<String> {
        let admin = self.demo.get()?;
        let host = if admin.ip().is_unspecified() {
            format!("localhost:{}", admin.port())
        } else {
            admin.to_string()
        };
        Some(format!("http://{host}/demo"))
    }

    /// Whether a page of `origin` may open a session. No Origin header: not
    /// a page at all (a native WebTransport client), which the token alone
    /// judges, as it does native QUIC clients.
    pub(crate) fn origin_allowed(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        let origin = origin.trim_end_matches('/');
        if self.config.allowed_origins.iter().any(|o| o == "*" || o == origin) {
            return true;
        }
        let Some(demo) = self.demo.get() else {
            return false;
        };
        let Some(host_port) = origin.strip_prefix("http://") else {
            return false;
        };
        let port = demo.port();
        if demo.ip().is_unspecified() {
            // Served on every interface: whatever name the page was opened by.
            return host_port.rsplit_once(':').is_some_and(|(_, p)| p == port.to_string());
        }
        host_port == demo.to_string() || (demo.ip().is_loopback() && host_port == format!("localhost:{port}"))
    }

    /// Runs the HTTP/3 handshake on a connection that negotiated `h3` and
    /// opens the session if its path and origin are allowed; otherwise
    /// answers 404 or 403 and closes.
    pub(crate) async fn accept(
        &self,
        conn: quinn::Connection,
        within: Duration,
    ) -> Result<web_transport_quinn::Session, Refused> {
        let closer = conn.clone();
        let request = match tokio::time::timeout(within, web_transport_quinn::Request::accept(conn)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                closer.close(H3_NO_ERROR.into(), b"HTTP/3 handshake failed");
                return Err(Refused::Handshake(e.to_string()));
            }
            Err(_) => {
                closer.close(H3_NO_ERROR.into(), b"no CONNECT in time");
                return Err(Refused::Timeout(within));
            }
        };
        let path = request.url.path().to_owned();
        let origin = request
            .headers
            .get("origin")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let refusal = if path != self.config.path {
            Some((
                web_transport_quinn::http::StatusCode::NOT_FOUND,
                Refused::Path(crate::untrusted(&path, 128)),
            ))
        } else if !self.origin_allowed(origin.as_deref()) {
            Some((
                web_transport_quinn::http::StatusCode::FORBIDDEN,
                Refused::Origin(crate::untrusted(origin.as_deref().unwrap_or(""), 128)),
            ))
        } else {
            None
        };
        if let Some((status, why)) = refusal {
            // The answer is written, then the client (which reads it and
            // goes) gets a moment to close first: closing at once would
            // race the answer off the wire. The close follows either way.
            let _ = tokio::time::timeout(within, request.reject(status)).await;
            let _ = tokio::time::timeout(REFUSAL_LINGER.min(within), closer.closed()).await;
            closer.close(H3_NO_ERROR.into(), why.to_string().as_bytes());
            return Err(why);
        }
        match tokio::time::timeout(within, request.ok()).await {
            Ok(Ok(session)) => Ok(session),
            Ok(Err(e)) => Err(Refused::Handshake(e.to_string())),
            Err(_) => Err(Refused::Timeout(within)),
        }
    }
}

/// How long a refused client gets to read the refusal and close.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// HTTP/3's "no error" (RFC 9114): the connection ends as asked.
const H3_NO_ERROR: u32 = 0x100;

#[cfg(test)]
mod tests {
    use super::*;

    fn wt(origins: &[&str]) -> WebTransport {
        let config = WebTransportConfig {
            path: "/throng".into(),
            allowed_origins: origins.iter().map(|s| (*s).to_owned()).collect(),
            demo: true,
            dev_cert_lifetime: Duration::from_secs(3600),
            dev_cert_renew_before: Duration::from_secs(60),
        };
        let dir = std::env::temp_dir().join(format!("throng-wt-unit-{}", std::process::id()));
        let cert = WebCert::dev(&dir, Duration::from_secs(3600), Duration::from_secs(60)).expect("cert");
        WebTransport::new(config, Arc::new(cert), "127.0.0.1:4433".parse().expect("addr"))
    }

    #[test]
    fn origins_are_the_listed_ones_and_the_demo_pages() {
        let w = wt(&["https://app.example.com"]);
        assert_eq!(w.url, "https://127.0.0.1:4433/throng");
        assert!(w.origin_allowed(None), "not a page: the token decides");
        assert!(w.origin_allowed(Some("https://app.example.com")));
        assert!(!w.origin_allowed(Some("https://evil.example.com")));
        assert!(!w.origin_allowed(Some("http://127.0.0.1:9433")), "no demo page yet");
        w.set_demo_addr("127.0.0.1:9433".parse().expect("addr"));
        assert!(w.origin_allowed(Some("http://127.0.0.1:9433")));
        assert!(w.origin_allowed(Some("http://localhost:9433")));
        assert!(!w.origin_allowed(Some("http://localhost:9434")));
        assert!(
            !w.origin_allowed(Some("https://127.0.0.1:9433")),
            "another scheme is another origin"
        );
        assert_eq!(w.demo_url().as_deref(), Some("http://127.0.0.1:9433/demo"));
        assert!(wt(&["*"]).origin_allowed(Some("https://anything.example")));
    }
}
