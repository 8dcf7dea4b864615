//! WebTransport on the edge's QUIC port: browsers' sessions (ALPN `h3`,
//! an HTTP/3 CONNECT to the session path) carry the native protocol, so
//! they see the same rooms, the same sequence, the same limits and the
//! same typed errors. Driven here by the Rust client in its WebTransport
//! mode (as a page does: the certificate pinned by hash); the Chromium
//! test in `host/throng/tests/webtransport.rs` drives a real browser.

use std::time::Duration;

use throng_client::{Client, ClientError, WebTransportOptions};
use throng_tests::{TestEdge, collect, wait_for};
use throng_wire::{ClientFrame, ErrorCode, Kind, encode};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_and_webtransport_viewers_in_one_room_see_the_same_sequence() {
    let edge = TestEdge::start(|_| {}).await;
    let native = edge.client("acme", "native-viewer", "viewer").await;
    let web = edge.web_client("acme", "web-viewer", "viewer").await;
    assert_eq!(web.session().user, "web-viewer");
    let mut native_room = native.join("stage").await.expect("native joins");
    let mut web_room = web.join("stage").await.expect("web joins");
    let host = edge.client("acme", "host", "host").await;
    let _host_room = host.join("stage").await.expect("host joins");
    for i in 0..40 {
        let kind = if i % 10 == 0 { Kind::Host } else { Kind::Chat };
        host.send("stage", kind, format!("m{i}")).await.expect("ack");
    }
    let (from_native, _) = collect(&mut native_room, 40, WAIT).await;
    let (from_web, _) = collect(&mut web_room, 40, WAIT).await;
    let seqs = |ms: &[throng_wire::Message]| ms.iter().map(|m| (m.seq, m.body.clone())).collect::<Vec<_>>();
    assert_eq!(from_native.len(), 40);
    assert_eq!(seqs(&from_native), seqs(&from_web), "one room, one sequence");

    // And the other way: a browser's message reaches native viewers.
    let ack = web
        .send("stage", Kind::Chat, "from the browser side")
        .await
        .expect("ack");
    let (got, _) = collect(&mut native_room, 1, WAIT).await;
    assert_eq!(got[0].seq, ack.seq);
    assert_eq!(got[0].sender, "web-viewer");
    assert_eq!(got[0].body, b"from the browser side");
    let (echo, _) = collect(&mut web_room, 1, WAIT).await;
    assert_eq!(echo[0].seq, ack.seq, "the sender's own viewers see it too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_refused_on_another_path_or_a_foreign_origin() {
    let edge = TestEdge::start(|c| {
        if let Some(w) = c.webtransport.as_mut() {
            w.allowed_origins = vec!["https://app.example.com".into()];
        }
    })
    .await;
    let token = edge.token("acme", "u", "viewer", "*");
    let with = |path: &str, origin: Option<&str>| {
        edge.options(token.clone()).with_webtransport(WebTransportOptions {
            path: path.into(),
            cert_hashes: vec![edge.web_cert_hash()],
            origin: origin.map(str::to_owned),
        })
    };
    let err = Client::connect(with("/elsewhere", None)).await.expect_err("wrong path");
    assert!(err.to_string().contains("404"), "{err}");
    let err = Client::connect(with("/throng", Some("https://evil.example")))
        .await
        .expect_err("foreign origin");
    assert!(err.to_string().contains("403"), "{err}");
    let ok = Client::connect(with("/throng", Some("https://app.example.com")))
        .await
        .expect("a listed origin");
    ok.join("lobby").await.expect("joins");
    // A certificate hash that is not the edge's: no session at all.
    let mut wrong = with("/throng", None);
    if let Some(w) = wrong.webtransport.as_mut() {
        w.cert_hashes = vec![[7; 32]];
    }
    assert!(matches!(
        Client::connect(wrong).await,
        Err(ClientError::Connect(_) | ClientError::Connection(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_webtransport_the_limits_and_typed_errors_are_the_native_ones() {
    let edge = TestEdge::start(|c| {
        c.limits.send_rate_per_sec = 5;
        c.limits.send_burst = 5;
        c.limits.max_body_bytes = 1000;
    })
    .await;
    // An expired token: the typed error, not a bare close.
    let expired = edge.token_exp("acme", "late", "viewer", "*", 1_000_000);
    match Client::connect(edge.web_options(expired)).await {
        Err(ClientError::Edge { code, .. }) => assert_eq!(code, Some(ErrorCode::TokenExpired)),
        other => panic!("expected TokenExpired, got {other:?}"),
    }
    let web = edge.web_client("acme", "busy", "viewer").await;
    // Rooms: as many as a native connection may hold, and no more.
    let max = web.limits().max_rooms;
    let mut rooms = Vec::new();
    for i in 0..max {
        rooms.push(web.join(&format!("r{i}")).await.expect("within the limit"));
    }
    match web.join("one-too-many").await {
        Err(ClientError::JoinRefused { code, .. }) => assert_eq!(code, Some(ErrorCode::TooManyRooms)),
        other => panic!("expected TooManyRooms, got {other:?}"),
    }
    // Bodies: the limit announced in Welcome.
    match web.send("r0", Kind::Chat, vec![b'x'; 1001]).await {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::BodyTooLarge), "{e}"),
        Ok(a) => panic!("an oversized body was accepted: {a:?}"),
    }
    // Rate: a burst beyond the user's allowance is refused, not queued.
    let mut pending = Vec::new();
    for i in 0..20 {
        pending.push(web.submit("r0", Kind::Chat, format!("{i}")).await.expect("queued"));
    }
    let (mut acked, mut limited) = (0, 0);
    for p in pending {
        match p.ack().await {
            Ok(_) => acked += 1,
            Err(e) if e.code() == Some(ErrorCode::RateLimited) => limited += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(acked <= 5 + 2, "{acked} acked within a burst of 5");
    assert!(limited >= 12, "{limited} refused");
}

/// Below the client library, as a hostile page would: a frame announced
/// beyond the limit closes the session with FrameTooLarge, read from the
/// length prefix before any of it is buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_on_a_webtransport_session_closes_it_with_frame_too_large() {
    let edge = TestEdge::start(|_| {}).await;
    let client = web_transport_quinn::ClientBuilder::new()
        .with_server_certificate_hashes(vec![edge.web_cert_hash().to_vec()])
        .expect("client");
    let url: web_transport_quinn::proto::ConnectRequest = web_transport_quinn::proto::ConnectRequest::new(
        format!("https://{}/throng", edge.addr())
            .parse::<url::Url>()
            .expect("url"),
    );
    let session = client.connect(url).await.expect("session");
    let (mut send, _recv) = session.open_bi().await.expect("control stream");
    let hello = encode(
        &ClientFrame::Hello {
            token: edge.token("acme", "hostile", "viewer", "*"),
        },
        1 << 20,
    )
    .expect("hello");
    send.write_all(&hello).await.expect("hello sent");
    let announced = edge.config.limits.max_frame_bytes + 1;
    send.write_all(&announced.to_be_bytes()).await.expect("prefix sent");
    send.write_all(&[0; 64]).await.expect("some bytes");
    let closed = tokio::time::timeout(WAIT, session.closed())
        .await
        .expect("closed in time");
    match closed {
        web_transport_quinn::SessionError::WebTransportError(web_transport_quinn::WebTransportError::Closed(
            code,
            _,
        )) => {
            assert_eq!(code, u32::from(ErrorCode::FrameTooLarge.code()));
        }
        other => panic!("expected a close with FrameTooLarge, got {other:?}"),
    }
}

/// The dev certificate browsers pin: ECDSA P-256, valid at most 14 days,
/// replaced `renew_before` ahead of its expiry while the edge runs. A
/// session opened before keeps going; new ones need the new hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_certificate_for_browsers_is_ecdsa_short_lived_and_replaced_before_it_expires() {
    let edge = TestEdge::start(|c| {
        if let Some(w) = c.webtransport.as_mut() {
            w.dev_cert_lifetime = Duration::from_secs(75);
            w.dev_cert_renew_before = Duration::from_secs(12);
        }
    })
    .await;
    let der = throng_client::tls::load_certs(&edge.config.data_dir.join("webtransport-cert.pem"))
        .expect("cert file")
        .remove(0);
    let der = der.as_ref();
    // id-ecPublicKey and the P-256 curve in the key info.
    let ec = [0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    let p256 = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    assert!(der.windows(ec.len()).any(|w| w == ec), "an ECDSA key");
    assert!(der.windows(p256.len()).any(|w| w == p256), "on P-256");
    let (from, until) = validity(der);
    assert!(until - from <= 14 * 24 * 3600, "valid {} s", until - from);
    assert_eq!(until - from, 75);

    let before = edge.web_cert_hash();
    let early = edge.web_client("acme", "early", "viewer").await;
    let _room = early.join("lobby").await.expect("joins");
    // Due 75 - 60 (backdated) - 12 = 3 s after start.
    wait_for("the certificate to be replaced", Duration::from_secs(30), || {
        edge.web_cert_hash() != before
    })
    .await;
    let after = edge.web_cert_hash();
    assert_ne!(before, after);
    early
        .send("lobby", Kind::Chat, "still here")
        .await
        .expect("the old session goes on");
    let fresh = edge.web_client("acme", "fresh", "viewer").await;
    fresh.join("lobby").await.expect("the new hash works");
    let mut stale = edge.web_options(edge.token("acme", "stale", "viewer", "*"));
    if let Some(w) = stale.webtransport.as_mut() {
        w.cert_hashes = vec![before];
    }
    assert!(Client::connect(stale).await.is_err(), "the old hash no longer matches");
    // Native clients keep their own certificate throughout.
    edge.client("acme", "native", "viewer").await;
}

/// notBefore and notAfter (Unix seconds) of a certificate rcgen made:
/// the two UTCTime values of its validity.
fn validity(der: &[u8]) -> (i64, i64) {
    let times: Vec<i64> = der
        .windows(15)
        .filter(|w| w[0] == 0x17 && w[1] == 13 && w[14] == b'Z')
        .map(|w| {
            let d = |i: usize| i64::from(w[i] - b'0') * 10 + i64::from(w[i + 1] - b'0');
            let (y, mo, day, h, mi, s) = (2000 + d(2), d(4), d(6), d(8), d(10), d(12));
            days_from_civil(y, mo, day) * 86_400 + h * 3600 + mi * 60 + s
        })
        .collect();
    assert_eq!(times.len(), 2, "two UTCTime values");
    (times[0], times[1])
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_its_client_and_where_to_connect_are_served_on_the_admin_endpoint() {
    let edge = TestEdge::start(|c| {
        c.admin = Some("127.0.0.1:0".parse().expect("addr"));
        if let Some(w) = c.webtransport.as_mut() {
            w.demo = true;
        }
    })
    .await;
    let admin = edge.edge.admin_addr().expect("admin");
    let get = |path: &str| {
        let url = format!("http://{admin}{path}");
        tokio::task::spawn_blocking(move || {
            let mut r = ureq::get(&url).call().expect("GET");
            let ctype = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap_or("").to_owned())
                .unwrap_or_default();
            (ctype, r.body_mut().read_to_string().expect("body"))
        })
    };
    let (ctype, page) = get("/demo").await.expect("page");
    assert!(ctype.starts_with("text/html"), "{ctype}");
    assert!(page.contains("/demo/throng.js"), "the page imports the client");
    let (ctype, js) = get("/demo/throng.js").await.expect("client");
    assert!(ctype.starts_with("text/javascript"), "{ctype}");
    assert_eq!(
        js,
        std::fs::read_to_string(throng_tests::tools::repo().join("clients/js/src/throng.js")).expect("source")
    );
    let (_, config) = get("/demo/config.json").await.expect("config");
    let config: serde_json::Value = serde_json::from_str(&config).expect("json");
    assert_eq!(config["url"], format!("https://{}/throng", edge.addr()));
    assert_eq!(
        config["certHashes"][0].as_str(),
        edge.edge.webtransport_cert_sha256().as_deref()
    );
    assert_eq!(
        edge.edge.demo_url().as_deref(),
        Some(format!("http://{admin}/demo").as_str())
    );
    // The page's own origin may open sessions; another port's may not.
    let token = edge.token("acme", "page", "viewer", "*");
    let from = |origin: String| {
        edge.options(token.clone()).with_webtransport(WebTransportOptions {
            path: "/throng".into(),
            cert_hashes: vec![edge.web_cert_hash()],
            origin: Some(origin),
        })
    };
    Client::connect(from(format!("http://{admin}")))
        .await
        .expect("the demo page's origin");
    Client::connect(from(format!("http://localhost:{}", admin.port())))
        .await
        .expect("the same page by name");
    assert!(Client::connect(from("http://127.0.0.1:1".into())).await.is_err());
}

/// A browser-protocol connection that never asks for a session holds its
/// half-open slot only until `hello_timeout`, like a native one that never
/// says Hello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h3_connection_that_never_sends_connect_is_closed_at_the_hello_timeout() {
    let edge = TestEdge::start(|c| c.limits.hello_timeout = Duration::from_millis(500)).await;
    let config = throng_client::tls::client_config(
        &edge.roots(),
        Some(&[edge.web_cert_hash()]),
        Duration::from_secs(5),
        Duration::from_secs(30),
    )
    .expect("config");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    endpoint.set_default_client_config(config);
    let conn = endpoint
        .connect(edge.edge.local_addr(), "localhost")
        .expect("connect")
        .await
        .expect("the QUIC handshake (ALPN h3) completes");
    let started = std::time::Instant::now();
    tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("closed by the edge");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "not before the timeout"
    );
    edge.web_client("acme", "after", "viewer").await;
}

/// With a certificate from config (`[tls]`), browsers get that one too and
/// check it against their CAs: no hash is pinned or printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_configured_certificate_browsers_get_it_and_no_hash_is_pinned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).expect("cert");
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key_pair.serialize_pem()).expect("write key");
    let edge = TestEdge::start(|c| {
        c.tls = Some(throng_edge::config::TlsFiles {
            cert: cert_path.clone(),
            key: key_path.clone(),
        });
    })
    .await;
    assert_eq!(edge.edge.webtransport_cert_sha256(), None);
    let roots = throng_client::tls::load_certs(&cert_path).expect("roots");
    let token = edge.token("acme", "ca-user", "viewer", "*");
    let mut opts =
        throng_client::ConnectOptions::new(edge.addr(), roots, token).with_webtransport(WebTransportOptions {
            path: "/throng".into(),
            cert_hashes: Vec::new(),
            origin: None,
        });
    opts.server_name = Some("localhost".into());
    let web = Client::connect(opts)
        .await
        .expect("a WebTransport session on the configured certificate");
    web.join("lobby").await.expect("joins");
    // And a native client on the very same certificate.
    edge.client("acme", "native", "viewer").await;
}
