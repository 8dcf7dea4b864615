//! The admin endpoint: `/stats` and `/metrics` over real HTTP.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use throng_tests::{TestEdge, viewers};
use throng_wire::Kind;

/// GET `path` from the admin endpoint: (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let url = format!("http://{addr}{path}");
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let mut response = agent
            .get(&url)
            .header("Authorization", format!("Bearer {}", throng_tests::OPERATOR_KEY))
            .call()
            .expect("the admin endpoint answers");
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().expect("a text body");
        (status, body)
    })
    .await
    .expect("request task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_metrics_describe_the_running_edge() {
    throng_edge::admin::install_prometheus().expect("the only recorder of this test process");
    let edge = TestEdge::start(|c| c.admin = Some("127.0.0.1:0".parse().expect("addr"))).await;
    let admin = edge.edge.admin_addr().expect("admin endpoint bound");
    let _viewers = viewers(&edge, "acme", "lobby", 3).await;
    let sender = edge.client("acme", "s", "viewer").await;
    let _own = sender.join("lobby").await.expect("join");
    sender.send("lobby", Kind::Chat, "hi").await.expect("ack");

    let (status, body) = get(admin, "/stats").await;
    assert_eq!(status, 200, "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(stats["connections"], 4, "{stats:#}");
    assert_eq!(stats["rooms"], 1, "{stats:#}");
    assert!(stats["process"]["rss_kib"].as_u64().unwrap_or(0) > 0, "{stats:#}");
    // This process made a certificate and did TLS handshakes: not zero.
    assert!(stats["process"]["cpu_s"].as_f64().unwrap_or(0.0) > 0.0, "{stats:#}");
    // The figures are the edge's own counters, not placeholders.
    let wasm = edge.edge.wasm_stats();
    assert_eq!(
        stats["wasm"]["instantiations"].as_u64(),
        Some(wasm.instantiations.load(Ordering::Relaxed)),
        "{stats:#}"
    );
    assert_eq!(stats["group_log"]["queued_messages"].as_u64(), Some(0), "{stats:#}");

    let (status, body) = get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("throng_connections_total") && body.contains("throng_batches_total"),
        "{body}"
    );
    let (status, _) = get(admin, "/nope").await;
    assert_eq!(status, 404);

    drop(sender);
    edge.edge.shutdown().await;
    let gone = tokio::net::TcpStream::connect(admin).await;
    assert!(gone.is_err(), "the admin endpoint stops with the edge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_requests_cannot_hold_the_admin_endpoint() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let edge = TestEdge::start(|c| c.admin = Some("127.0.0.1:0".parse().expect("addr"))).await;
    let admin = edge.edge.admin_addr().expect("admin endpoint bound");
    // 200 clients that start a request and never finish its headers.
    let mut partial = Vec::new();
    for _ in 0..200 {
        let mut s = tokio::net::TcpStream::connect(admin).await.expect("connect");
        s.write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .expect("write");
        partial.push(s);
    }
    // A real request still gets through, soon.
    let answered = tokio::time::timeout(std::time::Duration::from_secs(8), get(admin, "/stats")).await;
    let (status, _) = answered.expect("/stats answers while partial requests wait");
    assert_eq!(status, 200);
    // And every partial request is cut off.
    for mut s in partial {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(std::time::Duration::from_secs(15), s.read(&mut buf)).await;
        assert!(read.is_ok(), "a partial request was held open");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_partial_requests_than_places_cannot_keep_health_checks_or_operators_out() {
    use tokio::io::AsyncWriteExt;
    let edge = TestEdge::start(|c| c.admin = Some("127.0.0.1:0".parse().expect("addr"))).await;
    let admin = edge.edge.admin_addr().expect("admin endpoint bound");
    // More half-sent requests than the endpoint has places (256), opened
    // faster than the header timeout (2 s) cuts them off: once, 32 of
    // them held every place and a health check waited seconds.
    let mut partial = Vec::new();
    for _ in 0..400 {
        let mut s = tokio::net::TcpStream::connect(admin).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .expect("write");
        partial.push(s);
    }
    // While they are all still within their header timeout, a health
    // check and an operator each get in at once.
    let started = std::time::Instant::now();
    let health = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let url = format!("http://{admin}/healthz");
        tokio::task::spawn_blocking(move || ureq::get(&url).call().map(|r| r.status().as_u16()))
            .await
            .expect("task")
    })
    .await;
    assert_eq!(
        health
            .expect("/healthz answers past 400 partial requests")
            .expect("a response"),
        200
    );
    let (status, _) = tokio::time::timeout(std::time::Duration::from_secs(5), get(admin, "/stats"))
        .await
        .expect("/stats answers past 400 partial requests");
    assert_eq!(status, 200);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    drop(partial);
    edge.edge.shutdown().await;
}
