//! What the README promises about the protocol, each checked where a
//! client sees it: the hello timeout, presence queries over the limit
//! (`QueryTooLarge`), `ShuttingDown` on a graceful stop, ES256 tenants, and
//! gifts and pins from the policy to the viewer.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use throng_client::Client;
use throng_edge::auth::{Claims, sign, unix_now};
use throng_edge::config::TenantConfig;
use throng_tests::{RawSession, TestEdge, builtin_policy, close_code, raw, raw_connection};
use throng_wire::{Batch, ClientFrame, EdgeFrame, ErrorCode, Kind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_says_hello_is_closed_at_the_hello_timeout() {
    const HELLO: Duration = Duration::from_millis(500);
    let edge = TestEdge::start(|c| c.limits.hello_timeout = HELLO).await;
    let started = Instant::now();
    // One never opens its control stream; one starts a frame and stops.
    let silent = raw_connection(&edge).await;
    let (partial, mut send, _recv) = raw(&edge).await;
    send.write_all(&[0, 0]).await.expect("half a length prefix");
    let viewer = edge.client("acme", "v", "viewer").await;

    let (a, b) = tokio::join!(
        close_code(&silent, Duration::from_secs(10)),
        close_code(&partial, Duration::from_secs(10))
    );
    let waited = started.elapsed();
    assert_eq!(a, Some(ErrorCode::Unauthenticated), "no control stream");
    assert_eq!(b, Some(ErrorCode::Unauthenticated), "no whole Hello");
    assert!(waited >= HELLO, "closed after {waited:?}, before the timeout");
    // A session that said Hello is not affected by the timeout.
    viewer.ping().await.expect("an authenticated session outlives it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_query_over_the_limit_is_refused_typed_and_the_session_goes_on() {
    use throng_edge::presence::MAX_QUERY_USERS;
    let edge = TestEdge::start(|_| {}).await;
    let _online = edge.client("acme", "u", "viewer").await;
    let mut s = RawSession::hello(&edge, edge.token("acme", "asker", "viewer", "*")).await;
    s.send(&ClientFrame::Presence {
        query_id: 7,
        users: vec![String::new(); MAX_QUERY_USERS + 1],
    })
    .await;
    match s.next_control(Duration::from_secs(10)).await {
        Some(EdgeFrame::PresenceRefused { query_id, code, text }) => {
            assert_eq!(query_id, 7);
            assert_eq!(ErrorCode::from_code(code), Some(ErrorCode::QueryTooLarge), "{text}");
        }
        other => panic!("expected PresenceRefused, got {other:?}"),
    }
    // At the limit the query is answered, on the same connection.
    let mut users = vec![String::new(); MAX_QUERY_USERS];
    users[MAX_QUERY_USERS - 1] = "u".into();
    s.send(&ClientFrame::Presence { query_id: 8, users }).await;
    match s.next_control(Duration::from_secs(10)).await {
        Some(EdgeFrame::Presence { query_id, online }) => {
            assert_eq!(query_id, 8);
            assert_eq!(online.len(), MAX_QUERY_USERS);
            assert_eq!(online.iter().filter(|o| **o).count(), 1, "only `u` is online");
            assert!(online[MAX_QUERY_USERS - 1]);
        }
        other => panic!("expected Presence, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_closes_every_session_with_shutting_down() {
    let edge = TestEdge::start(|_| {}).await;
    let client = edge.client("acme", "c", "viewer").await;
    let _room = client.join("lobby").await.expect("join");
    let raw = RawSession::hello(&edge, edge.token("acme", "r", "viewer", "*")).await;
    let (_, why, code) = tokio::join!(
        edge.edge.shutdown(),
        tokio::time::timeout(Duration::from_secs(10), client.closed()),
        close_code(&raw.conn, Duration::from_secs(10))
    );
    let why = why.expect("the client sees the stop");
    assert_eq!(why.code(), Some(ErrorCode::ShuttingDown), "{why}");
    assert_eq!(code, Some(ErrorCode::ShuttingDown), "at the wire");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_es256_tenant_signs_with_its_private_key_and_nothing_else_gets_in() {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    // The tenant as an operator configures it: a public key file beside
    // the config, named relative to it.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("initech.pem"), pair.public_key_pem()).expect("write key");
    let text = format!(
        "{}\n[tenants.initech]\nes256_public_key = \"initech.pem\"\n",
        throng_tests::TEST_CONFIG
    );
    let parsed = throng_edge::Config::parse(&text, "es256.toml", dir.path()).expect("config with an ES256 tenant");
    let tenant = parsed.tenants.get("initech").expect("initech").clone();
    assert!(matches!(tenant, TenantConfig::Es256 { .. }), "{tenant:?}");
    let edge = TestEdge::start(|c| {
        c.tenants.insert("initech".into(), tenant.clone());
    })
    .await;

    let claims = |user: &str| Claims {
        tenant: "initech".into(),
        sub: user.into(),
        role: "host".into(),
        rooms: "*".into(),
        exp: unix_now() + 600,
        nbf: None,
    };
    let token = sign(&claims("ann"), &tenant, Some(pair.serialize_pem().as_bytes())).expect("sign");
    let client = Client::connect(edge.options(token))
        .await
        .expect("ES256 token accepted");
    assert_eq!(client.session().tenant, "initech");
    assert_eq!(client.session().user, "ann");
    let mut room = client.join("lobby").await.expect("join");
    client.send("lobby", Kind::Chat, "signed").await.expect("ack");
    let (got, _) = throng_tests::collect(&mut room, 1, Duration::from_secs(5)).await;
    assert_eq!(got.first().map(|m| m.body.as_slice()), Some(&b"signed"[..]));

    // Another key pair's signature does not verify.
    let forged = sign(&claims("eve"), &tenant, Some(other.serialize_pem().as_bytes())).expect("sign");
    let err = Client::connect(edge.options(forged)).await.expect_err("wrong key");
    assert_eq!(err.code(), Some(ErrorCode::TokenInvalid), "{err}");
    // Nor does an HS256 token for the ES256 tenant (no algorithm confusion).
    let hs = TenantConfig::Hs256 {
        secret: pair.public_key_pem().into_bytes(),
    };
    let confused = sign(&claims("eve"), &hs, None).expect("sign");
    let err = Client::connect(edge.options(confused))
        .await
        .expect_err("HS256 for an ES256 tenant");
    assert_eq!(err.code(), Some(ErrorCode::AlgorithmNotAllowed), "{err}");
}

/// Sends gifts of two names, a host message and a chat into `show`, and
/// checks what one viewer receives: gifts as messages and counted by name,
/// the host message pinned.
async fn gifts_and_pins(edge: &TestEdge) {
    let viewer = edge.client("acme", "v", "viewer").await;
    let mut room = viewer.join("show").await.expect("join");
    let host = edge.client("acme", "h", "host").await;
    let _own = host.join("show").await.expect("join");
    let mut host_seq = 0;
    for (kind, body) in [
        (Kind::Gift, "rose"),
        (Kind::Gift, "lily"),
        (Kind::Gift, "rose"),
        (Kind::Host, "welcome"),
        (Kind::Gift, "rose"),
        (Kind::Chat, "hi"),
        (Kind::Gift, "lily"),
    ] {
        let ack = host.send("show", kind, body).await.expect("ack");
        if kind == Kind::Host {
            host_seq = ack.seq;
        }
    }
    // Batches until all seven arrived (a batch per tick, so several).
    let mut batches: Vec<Batch> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while batches.iter().map(|b| b.messages.len()).sum::<usize>() < 7 {
        match tokio::time::timeout_at(deadline, room.next_batch()).await {
            Ok(Some(Ok(b))) => batches.push(b),
            other => panic!("expected 7 messages, got {batches:?} then {other:?}"),
        }
    }
    let mut counted: BTreeMap<String, u64> = BTreeMap::new();
    for g in batches.iter().flat_map(|b| &b.counters.gifts) {
        *counted.entry(g.gift.clone()).or_default() += g.count;
    }
    assert_eq!(
        counted,
        BTreeMap::from([("lily".to_owned(), 2), ("rose".to_owned(), 3)]),
        "gifts counted by name: {batches:?}"
    );
    let gift_messages = batches
        .iter()
        .flat_map(|b| &b.messages)
        .filter(|m| m.kind == Kind::Gift)
        .count();
    assert_eq!(gift_messages, 5, "below the cap every gift is shown too");
    let pinned: Vec<u64> = batches.iter().flat_map(|b| b.pinned.iter().copied()).collect();
    assert_eq!(pinned, [host_seq], "the host message is pinned: {batches:?}");
    let with_pin = batches.iter().find(|b| !b.pinned.is_empty()).expect("a pinning batch");
    assert!(
        with_pin
            .messages
            .iter()
            .any(|m| m.seq == host_seq && m.body == b"welcome"),
        "a pin names a message of its own batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gifts_are_counted_by_name_and_host_messages_pinned_by_either_policy() {
    // The native policy (no [[policy]] rule)...
    let edge = TestEdge::start(|_| {}).await;
    gifts_and_pins(&edge).await;
    assert_eq!(
        edge.edge
            .wasm_stats()
            .instantiations
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    edge.edge.shutdown().await;
    // ...and policy-default as a Wasm component.
    let edge = TestEdge::start(|c| {
        c.policies
            .push(builtin_policy("*", "policy-default", &[("cap_per_sec", "20")]));
    })
    .await;
    gifts_and_pins(&edge).await;
    let stats = edge.edge.wasm_stats();
    // The trial `configure` at load, then the room's instance.
    assert_eq!(stats.instantiations.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(stats.fallback_ticks.load(std::sync::atomic::Ordering::Relaxed), 0);
}
