//! The server API for tenants' backends, end to end: publish into a room
//! and see it arrive over QUIC, disconnect a user, ask who is online, read
//! a group room's history; each kept to the caller's tenant.

use std::time::Duration;

use serde_json::json;
use throng_tests::api::Api;
use throng_tests::{OPERATOR_KEY, RawSession, TestEdge, close_code, collect};
use throng_wire::{ErrorCode, Kind};

fn start() -> impl FnOnce(&mut throng_edge::Config) {
    |c| {
        c.admin = Some("127.0.0.1:0".parse().expect("addr"));
        c.rooms.group_rooms = vec!["group-*".into()];
    }
}

fn backend(edge: &TestEdge, tenant: &str) -> Api {
    Api::new(
        edge.edge.admin_addr().expect("admin"),
        edge.token(tenant, "backend", "tenant-admin", "*"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_publishes_host_and_system_messages_viewers_receive() {
    let edge = TestEdge::start(start()).await;
    let viewer = edge.client("acme", "v", "viewer").await;
    let mut room = viewer.join("show").await.expect("join");
    let api = backend(&edge, "acme");
    let a = api
        .post(
            "/v1/rooms/acme/show/publish",
            json!({"kind": "host", "body": "welcome", "sender": "studio"}),
        )
        .await;
    assert_eq!(a.status, 200, "{:#}", a.body);
    let seq = a.body["seq"].as_u64().expect("seq");
    let b = api
        .post(
            "/v1/rooms/acme/show/publish",
            json!({"kind": "system", "body": "rules"}),
        )
        .await;
    assert_eq!(b.status, 200, "{:#}", b.body);
    let (got, _) = collect(&mut room, 2, Duration::from_secs(5)).await;
    assert_eq!(got[0].seq, seq);
    assert_eq!(
        (got[0].kind, got[0].sender.as_str(), got[0].body.as_slice()),
        (Kind::Host, "studio", &b"welcome"[..])
    );
    assert_eq!((got[1].kind, got[1].sender.as_str()), (Kind::System, "backend"));

    // Only system and host; only the caller's own tenant; within limits.
    assert_eq!(
        api.post("/v1/rooms/acme/show/publish", json!({"kind": "chat", "body": "x"}))
            .await
            .code(),
        "invalid_request"
    );
    let other = backend(&edge, "globex")
        .post("/v1/rooms/acme/show/publish", json!({"kind": "host", "body": "x"}))
        .await;
    assert_eq!((other.status, other.code()), (403, "forbidden"));
    let big = "x".repeat(edge.config.limits.max_body_bytes as usize + 1);
    assert_eq!(
        api.post("/v1/rooms/acme/show/publish", json!({"kind": "host", "body": big}))
            .await
            .code(),
        "invalid_request"
    );
    let bad = api
        .post(
            "/v1/rooms/acme/no%20spaces/publish",
            json!({"kind": "host", "body": "x"}),
        )
        .await;
    assert_eq!(bad.code(), "invalid_request", "{:#}", bad.body);
    edge.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_every_session_of_the_user_with_a_reason_and_is_audited() {
    let edge = TestEdge::start(start()).await;
    let one = RawSession::hello(&edge, edge.token("acme", "mallory", "viewer", "*")).await;
    let two = RawSession::hello(&edge, edge.token("acme", "mallory", "viewer", "*")).await;
    let bystander = RawSession::hello(&edge, edge.token("acme", "alice", "viewer", "*")).await;
    // Another tenant's user of the same name is not the same user.
    let namesake = RawSession::hello(&edge, edge.token("globex", "mallory", "viewer", "*")).await;
    refused_for_others(&edge).await;
    let a = backend(&edge, "acme")
        .post(
            "/v1/tenants/acme/users/mallory/disconnect",
            json!({"reason": "banned for spam"}),
        )
        .await;
    assert_eq!((a.status, &a.body["connections"]), (200, &json!(2)), "{:#}", a.body);
    for s in [&one, &two] {
        assert_eq!(
            close_code(&s.conn, Duration::from_secs(5)).await,
            Some(ErrorCode::Disconnected)
        );
        let reason = match s.conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => String::from_utf8_lossy(&c.reason).into_owned(),
            other => format!("{other:?}"),
        };
        assert!(reason.contains("banned for spam"), "{reason}");
    }
    assert!(bystander.conn.close_reason().is_none() && namesake.conn.close_reason().is_none());
    let log = Api::new(edge.edge.admin_addr().expect("admin"), OPERATOR_KEY)
        .get("/v1/audit")
        .await;
    let entry = log
        .body
        .as_array()
        .and_then(|l| l.iter().find(|e| e["action"] == "user.disconnect").cloned())
        .expect("audited");
    assert_eq!(entry["target"], "acme/mallory");
    assert_eq!(entry["who"], "tenant:acme/backend");
    // Nobody left to disconnect.
    let again = backend(&edge, "acme")
        .post("/v1/tenants/acme/users/mallory/disconnect", json!({}))
        .await;
    assert_eq!(again.body["connections"], 0, "{:#}", again.body);
    edge.edge.shutdown().await;
}

async fn refused_for_others(edge: &TestEdge) {
    let a = backend(edge, "globex")
        .post("/v1/tenants/acme/users/mallory/disconnect", json!({}))
        .await;
    assert_eq!((a.status, a.code()), (403, "forbidden"));
    let p = backend(edge, "globex")
        .post("/v1/tenants/acme/presence", json!({"users": ["mallory"]}))
        .await;
    assert_eq!((p.status, p.code()), (403, "forbidden"));
    let h = backend(edge, "globex").get("/v1/rooms/acme/group-x/history").await;
    assert_eq!((h.status, h.code()), (403, "forbidden"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_answers_which_users_are_online_in_one_call() {
    let edge = TestEdge::start(start()).await;
    let _a = edge.client("acme", "alice", "viewer").await;
    let _b = edge.client("globex", "bob", "viewer").await;
    let api = backend(&edge, "acme");
    let a = api
        .post("/v1/tenants/acme/presence", json!({"users": ["alice", "bob", "carol"]}))
        .await;
    assert_eq!(a.status, 200, "{:#}", a.body);
    assert_eq!(a.body["online"], json!([true, false, false]));
    assert_eq!(a.body["online_users"], 1);
    let many: Vec<String> = (0..10_001).map(|i| format!("u{i}")).collect();
    let too_many = api.post("/v1/tenants/acme/presence", json!({ "users": many })).await;
    assert_eq!(too_many.body["error"]["field"], "users", "{:#}", too_many.body);
    edge.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_rooms_history_reads_by_sequence_range() {
    let edge = TestEdge::start(start()).await;
    let member = edge.client("acme", "m", "viewer").await;
    let _room = member.join("group-x").await.expect("join");
    let mut seqs = Vec::new();
    for i in 0..5 {
        seqs.push(
            member
                .send("group-x", Kind::Chat, format!("m{i}"))
                .await
                .expect("ack")
                .seq,
        );
    }
    let api = backend(&edge, "acme");
    let mut all = serde_json::Value::Null;
    // The log commits in groups: what was acked is readable soon after.
    for _ in 0..100 {
        all = api.get("/v1/rooms/acme/group-x/history").await.body;
        if all.as_array().is_some_and(|a| a.len() == 5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got: Vec<u64> = all
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["seq"].as_u64())
        .collect();
    assert_eq!(got, seqs, "{all:#}");
    assert_eq!(all[0]["body"], "m0");
    assert_eq!(all[0]["sender"], "m");
    let part = api
        .get(&format!(
            "/v1/rooms/acme/group-x/history?from={}&to={}&limit=2",
            seqs[1], seqs[4]
        ))
        .await;
    let got: Vec<u64> = part
        .body
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["seq"].as_u64())
        .collect();
    assert_eq!(got, seqs[1..3].to_vec());
    let livecast = api.get("/v1/rooms/acme/lobby/history").await;
    assert_eq!(livecast.body["error"]["field"], "room", "{:#}", livecast.body);
    edge.edge.shutdown().await;
}
