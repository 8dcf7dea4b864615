//! A tenant filter written in Python (`modules/filter-python`, built with
//! componentize-py by the test setup), uploaded through the API under the
//! tenant's own token, deployed, and judging real messages.

use std::time::Duration;

use serde_json::json;
use throng_tests::api::Api;
use throng_tests::{TestEdge, collect, tools};
use throng_wire::{ErrorCode, Kind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_filter_is_uploaded_by_its_tenant_and_judges_messages() {
    let bytes = tokio::task::spawn_blocking(tools::python_filter)
        .await
        .expect("build task");
    let edge = TestEdge::start(|c| c.admin = Some("127.0.0.1:0".parse().expect("addr"))).await;
    let acme = Api::new(
        edge.edge.admin_addr().expect("admin"),
        edge.token("acme", "acme-admin", "tenant-admin", "*"),
    );
    // configure's own refusal, through the upload's checks.
    let bad = acme
        .upload(&bytes, "py-filter", "0.9.0", "message-filter", json!({"max_len": "8"}))
        .await;
    assert_eq!((bad.status, bad.code()), (422, "module_refused"), "{:#}", bad.body);
    assert_eq!(bad.body["error"]["field"], "configure");
    assert!(bad.message().contains("blocked"), "{}", bad.message());

    let params = json!({"blocked": "scam, spam", "max_len": "12"});
    let up = acme
        .upload(&bytes, "py-filter", "1.0.0", "message-filter", params.clone())
        .await;
    assert_eq!(up.status, 201, "{:#}", up.body);
    assert_eq!(up.body["module"]["owner"], "tenant:acme");
    let hash = up.body["module"]["sha256"].as_str().expect("hash").to_owned();
    let deployed = acme
        .post(
            "/v1/deployments/filters/acme",
            json!({"filters": [{"module": format!("sha256:{hash}"), "params": params}], "activate": 100}),
        )
        .await;
    assert_eq!(deployed.status, 201, "{:#}", deployed.body);

    let viewer = edge.client("acme", "viewer", "viewer").await;
    let mut room = viewer.join("lobby").await.expect("join");
    let sender = edge.client("acme", "sender", "viewer").await;
    let _s = sender.join("lobby").await.expect("join");
    let err = sender
        .send("lobby", Kind::Chat, "cheap SCAM here")
        .await
        .expect_err("blocked word");
    assert!(
        matches!(&err, throng_client::ClientError::Rejected { code, reason, .. }
            if *code == Some(ErrorCode::Filtered) && reason.contains("python filter: blocked word `scam`")),
        "{err:?}"
    );
    sender.send("lobby", Kind::Chat, "hello").await.expect("accepted");
    sender
        .send("lobby", Kind::Chat, "a rather long message")
        .await
        .expect("rewritten, accepted");
    let (got, _) = collect(&mut room, 2, Duration::from_secs(10)).await;
    let bodies: Vec<&[u8]> = got.iter().map(|m| m.body.as_slice()).collect();
    assert_eq!(bodies, vec![&b"hello"[..], &b"a rather lon"[..]]);
    // Another tenant's rooms are not judged by it.
    let other = edge.client("globex", "g", "viewer").await;
    let _g = other.join("lobby").await.expect("join");
    other
        .send("lobby", Kind::Chat, "scam")
        .await
        .expect("globex has no filter");
    edge.edge.shutdown().await;
}
