//! Hostile clients over real QUIC: each costs a bounded amount, gets a typed
//! refusal or close, and never hurts anyone else.

use std::sync::Arc;
use std::time::Duration;

use throng_client::{Client, ClientError};
use throng_tests::{TestEdge, close_code, drain, frame, raw, raw_connection};
use throng_wire::{ClientFrame, EdgeFrame, ErrorCode, Kind};

/// Says Hello on a raw connection whose client grants the edge almost no
/// flow-control credit on the control stream: replies pile up at the edge.
async fn non_reading_client(edge: &TestEdge) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let mut config =
        throng_client::tls::client_config(&edge.roots(), None, Duration::from_secs(5), Duration::from_secs(30))
            .expect("client config");
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(1024u32.into())
        .receive_window(4096u32.into());
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    endpoint.set_default_client_config(config);
    let conn = endpoint
        .connect(edge.edge.local_addr(), "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, recv) = conn.open_bi().await.expect("control stream");
    let token = edge.token("acme", "mute", "viewer", "*");
    send.write_all(&frame(&ClientFrame::Hello { token }))
        .await
        .expect("hello");
    (conn, send, recv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_is_closed_with_too_slow() {
    let edge = TestEdge::start(|c| {
        c.limits.reply_queue = 64;
        c.limits.control_rate_per_sec = 1_000_000;
        c.limits.control_burst = 1_000_000;
    })
    .await;
    let (conn, mut send, _recv) = non_reading_client(&edge).await;
    // Pings without end (bounded here): each asks for a Pong nobody reads.
    let flood = async {
        for nonce in 0..200_000u64 {
            if send.write_all(&frame(&ClientFrame::Ping { nonce })).await.is_err() {
                return nonce;
            }
        }
        200_000
    };
    let (sent, code) = tokio::join!(flood, close_code(&conn, Duration::from_secs(20)));
    assert_eq!(code, Some(ErrorCode::TooSlow), "closed after {sent} pings");
    // Others are served meanwhile and after.
    let other = edge.client("acme", "ok", "viewer").await;
    other.ping().await.expect("another client is served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_frames_beyond_the_rate_are_refused_then_the_connection_closes() {
    let edge = TestEdge::start(|c| {
        c.limits.control_rate_per_sec = 10;
        c.limits.control_burst = 20;
    })
    .await;
    let (conn, mut send, mut recv) = raw(&edge).await;
    let token = edge.token("acme", "pinger", "viewer", "*");
    send.write_all(&frame(&ClientFrame::Hello { token }))
        .await
        .expect("hello");
    for nonce in 0..500u64 {
        if send.write_all(&frame(&ClientFrame::Ping { nonce })).await.is_err() {
            break;
        }
    }
    let frames = drain(&mut recv).await;
    let pongs = frames.iter().filter(|f| matches!(f, EdgeFrame::Pong { .. })).count();
    assert!(
        (1..=40).contains(&pongs),
        "{pongs} pongs for 500 pings at 10/s, burst 20"
    );
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, EdgeFrame::Error { code, .. } if *code == ErrorCode::RateLimited.code())),
        "the client is told it is too fast: {frames:?}"
    );
    assert_eq!(
        close_code(&conn, Duration::from_secs(5)).await,
        Some(ErrorCode::RateLimited)
    );
}

/// A paced flood (ten times the rate, spread evenly) lets one frame through
/// every 1/rate seconds; it must still be closed, not refused for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_control_flood_is_closed_even_though_some_frames_pass() {
    let edge = TestEdge::start(|c| {
        c.limits.control_rate_per_sec = 10;
        c.limits.control_burst = 20;
    })
    .await;
    let (conn, mut send, _recv) = raw(&edge).await;
    let token = edge.token("acme", "pacer", "viewer", "*");
    send.write_all(&frame(&ClientFrame::Hello { token }))
        .await
        .expect("hello");
    // 100 pings/s for at most 6 s: 90 refused in every second.
    let mut nonce = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    while tokio::time::Instant::now() < deadline && conn.close_reason().is_none() {
        pace.tick().await;
        for _ in 0..2 {
            nonce += 1;
            let _ = send.write_all(&frame(&ClientFrame::Ping { nonce })).await;
        }
    }
    assert_eq!(
        close_code(&conn, Duration::from_secs(2)).await,
        Some(ErrorCode::RateLimited),
        "after {nonce} pings at ten times the rate"
    );
}

/// Sends far beyond the user's rate are refused one by one, and a
/// connection that keeps on is closed: each costs a decode and a reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_flood_is_closed() {
    let edge = TestEdge::start(|c| {
        c.limits.send_rate_per_sec = 5;
        c.limits.send_burst = 10;
        c.limits.control_burst = 50;
    })
    .await;
    let (conn, mut send, _recv) = raw(&edge).await;
    let token = edge.token("acme", "flooder", "viewer", "*");
    send.write_all(&frame(&ClientFrame::Hello { token }))
        .await
        .expect("hello");
    for client_msg_id in 0..500u64 {
        let f = frame(&ClientFrame::Send {
            room: "never-joined".into(),
            kind: Kind::Chat,
            body: b"x".to_vec(),
            client_msg_id,
        });
        if send.write_all(&f).await.is_err() {
            break;
        }
    }
    assert_eq!(
        close_code(&conn, Duration::from_secs(5)).await,
        Some(ErrorCode::RateLimited)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_to_rooms_not_joined_count_against_the_senders_rate() {
    let edge = TestEdge::start(|c| {
        c.limits.send_rate_per_sec = 5;
        c.limits.send_burst = 10;
    })
    .await;
    let client = edge.client("acme", "stray", "viewer").await;
    let mut pending = Vec::new();
    for i in 0..100 {
        pending.push(
            client
                .submit("never-joined", Kind::Chat, format!("{i}"))
                .await
                .expect("submit"),
        );
    }
    let (mut not_joined, mut limited) = (0, 0);
    for p in pending {
        match p.ack().await.expect_err("nothing is accepted").code() {
            Some(ErrorCode::NotJoined) => not_joined += 1,
            Some(ErrorCode::RateLimited) => limited += 1,
            other => panic!("unexpected refusal {other:?}"),
        }
    }
    assert!(not_joined <= 15, "{not_joined} got past the rate limit");
    assert!(limited >= 85, "{limited} rate-limited");
}

async fn join_code(client: &Client, room: &str) -> Option<ErrorCode> {
    match client.join(room).await {
        Ok(_) => None,
        Err(e @ ClientError::JoinRefused { .. }) => e.code(),
        Err(e) => panic!("join {room}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_creation_is_limited_per_connection_user_and_tenant() {
    let edge = TestEdge::start(|c| {
        c.limits.max_room_creations_per_connection = 3;
        c.limits.room_create_rate_per_sec = 1;
        c.limits.room_create_burst = 1_000;
        c.limits.max_rooms_per_tenant = 5;
    })
    .await;
    // Per connection: a fourth new room is refused, an existing one is not.
    let a = edge.client("acme", "cycler", "viewer").await;
    for i in 0..3 {
        let room = format!("c{i}");
        assert_eq!(join_code(&a, &room).await, None);
        a.leave(&room).await.expect("leave");
    }
    assert_eq!(join_code(&a, "c3").await, Some(ErrorCode::RoomLimit));
    let b = edge.client("acme", "other", "viewer").await;
    let _c0 = b.join("c0").await.expect("a live room");
    assert_eq!(join_code(&a, "c0").await, None, "joining a live room creates nothing");

    // Per tenant: acme has c0, c1, c2 (lingering) plus two more, then no more.
    assert_eq!(join_code(&b, "t1").await, None);
    assert_eq!(join_code(&b, "t2").await, None);
    assert_eq!(join_code(&b, "t3").await, Some(ErrorCode::RoomLimit));
    let g = edge.client("globex", "g", "viewer").await;
    assert_eq!(join_code(&g, "t3").await, None, "another tenant is unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_creation_is_rate_limited_per_user() {
    let edge = TestEdge::start(|c| {
        c.limits.room_create_rate_per_sec = 1;
        c.limits.room_create_burst = 2;
        c.limits.max_rooms_per_connection = 8;
    })
    .await;
    // Two connections of one user share the user's rate.
    let a = edge.client("acme", "hasty", "viewer").await;
    let b = edge.client("acme", "hasty", "viewer").await;
    assert_eq!(join_code(&a, "r1").await, None);
    assert_eq!(join_code(&b, "r2").await, None);
    assert_eq!(join_code(&b, "r3").await, Some(ErrorCode::RoomLimit));
    let other = edge.client("acme", "calm", "viewer").await;
    assert_eq!(join_code(&other, "r3").await, None, "another user is unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_instance_pool_refuses_new_rooms_and_spares_live_ones() {
    let edge = TestEdge::start(|c| {
        // 64 instances are kept for tenant filters: three for rooms.
        c.wasm.max_instances = 67;
        c.policies.push(throng_tests::builtin_policy(
            "*",
            "policy-default",
            &[("cap_per_sec", "0")],
        ));
        c.limits.room_create_burst = 1_000;
    })
    .await;
    let mut streams = Vec::new();
    let mut clients = Vec::new();
    for i in 0..3 {
        // Two tenants: one alone may take only three quarters of the pool.
        let tenant = if i < 2 { "acme" } else { "globex" };
        let c = edge.client(tenant, &format!("u{i}"), "host").await;
        streams.push(c.join(&format!("p{i}")).await.expect("room within the pool"));
        clients.push(c);
    }
    let late = edge.client("globex", "late", "viewer").await;
    assert_eq!(join_code(&late, "p3").await, Some(ErrorCode::RoomLimit));
    // The live rooms still run their module and deliver.
    clients[0].send("p0", Kind::Chat, "still here").await.expect("ack");
    let (got, _) = throng_tests::collect(&mut streams[0], 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        edge.edge
            .wasm_stats()
            .fallback_ticks
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_never_lock_out_viewers() {
    let edge = TestEdge::start(|c| {
        c.limits.max_connections = 3;
        c.limits.max_unauthenticated = 40;
        c.limits.max_unauthenticated_per_ip = 40;
        c.limits.hello_timeout = Duration::from_secs(30);
    })
    .await;
    // Twenty connections that finish the handshake and never say Hello.
    let mut half_open = Vec::new();
    for _ in 0..20 {
        half_open.push(raw_connection(&edge).await);
    }
    // Viewers up to max_connections still get in.
    let mut viewers = Vec::new();
    for i in 0..3 {
        viewers.push(edge.client("acme", &format!("v{i}"), "viewer").await);
    }
    let err = Client::connect(edge.options(edge.token("acme", "v4", "viewer", "*")))
        .await
        .expect_err("a fourth authenticated connection");
    assert_eq!(err.code(), Some(ErrorCode::ServerBusy), "{err}");
    drop(half_open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_half_open_connections_from_one_address_are_refused() {
    let edge = TestEdge::start(|c| {
        c.limits.max_unauthenticated_per_ip = 5;
        c.limits.hello_timeout = Duration::from_secs(30);
    })
    .await;
    let mut half_open = Vec::new();
    for _ in 0..5 {
        half_open.push(raw_connection(&edge).await);
    }
    let err = Client::connect(edge.options(edge.token("acme", "v", "viewer", "*")))
        .await
        .expect_err("a sixth unauthenticated connection from 127.0.0.1");
    assert!(
        matches!(err.code(), Some(ErrorCode::ServerBusy))
            || matches!(err, ClientError::Connect(_) | ClientError::Connection(_)),
        "{err}"
    );
    // Once they go, the address is welcome again.
    for c in &half_open {
        c.close(0u32.into(), b"bye");
    }
    drop(half_open);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect(edge.options(edge.token("acme", "v", "viewer", "*"))).await {
            Ok(c) => {
                c.ping().await.expect("ping");
                break;
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                // A poll interval: the edge frees the slots as it notices
                // the closes.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("still refused after the half-open ones left: {e}"),
        }
    }
}

/// A connection that keeps asking for rooms it may not make gets an
/// answer to every join (its room limit, then the control-frame rate
/// limit), until the edge closes it for the flood; it never waits for
/// ever. Another connection of the same user joins as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_refused_without_end_are_each_answered_until_the_edge_closes_the_flood() {
    let edge = TestEdge::start(|c| {
        c.limits.max_room_creations_per_connection = 4;
        c.limits.control_rate_per_sec = 50;
        c.limits.control_burst = 100;
    })
    .await;
    let other = edge.client("acme", "other", "viewer").await;
    let _lobby = other.join("lobby").await.expect("joins");
    let c = edge.client("acme", "greedy", "viewer").await;
    let mut answers = std::collections::BTreeMap::new();
    let mut closed = None;
    for k in 0..1000 {
        let name = format!("new-{k}");
        let answer = tokio::time::timeout(Duration::from_secs(5), c.join(&name))
            .await
            .unwrap_or_else(|_| panic!("join {k} unanswered after {answers:?}"));
        match answer {
            Ok(_stream) => {
                *answers.entry("joined").or_insert(0) += 1;
                c.leave(&name).await.expect("leaves");
            }
            Err(ClientError::JoinRefused {
                code: Some(ErrorCode::RoomLimit),
                ..
            }) => *answers.entry("room limit").or_insert(0) += 1,
            Err(ClientError::JoinRefused {
                code: Some(ErrorCode::RateLimited),
                ..
            }) => *answers.entry("rate limited").or_insert(0) += 1,
            Err(e) => {
                closed = Some(e);
                break;
            }
        }
    }
    let closed = closed.unwrap_or_else(|| panic!("the flood was never closed: {answers:?}"));
    assert_eq!(
        c.closed().await.code(),
        Some(ErrorCode::RateLimited),
        "{closed}; {answers:?}"
    );
    assert_eq!(answers.get("joined"), Some(&4), "{answers:?}");
    assert!(answers.get("room limit").is_some_and(|&n| n > 50), "{answers:?}");
    assert!(answers.get("rate limited").is_some_and(|&n| n > 50), "{answers:?}");
    let again = edge.client("acme", "greedy", "viewer").await;
    let lobby = tokio::time::timeout(Duration::from_secs(5), again.join("lobby"))
        .await
        .expect("the lobby join is answered");
    lobby.expect("the same user joins a room that exists on a new connection");
}

/// One tenant cannot take every room place on an edge (the default
/// `max_rooms_per_tenant`, 5,000, is above a small pool's places): with
/// other tenants configured it gets three quarters of them, every one of
/// those, and another tenant still makes its rooms in the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_takes_three_quarters_of_the_room_places_and_the_others_the_rest() {
    let edge = TestEdge::start(|c| {
        // 64 instances are kept for tenant filters: eight for rooms.
        c.wasm.max_instances = 72;
        c.limits.room_create_burst = 1_000;
        c.limits.max_room_creations_per_connection = 1_000;
    })
    .await;
    let mut held = Vec::new();
    let mut made = 0;
    let greedy = edge.client("acme", "greedy", "host").await;
    let more = edge.client("acme", "greedy-too", "host").await;
    for i in 0..8 {
        let client = if i < 4 { &greedy } else { &more };
        match client.join(&format!("mine-{i}")).await {
            Ok(stream) => {
                made += 1;
                held.push(stream);
            }
            Err(e @ ClientError::JoinRefused { .. }) => {
                assert_eq!(e.code(), Some(ErrorCode::RoomLimit), "{e}");
                break;
            }
            Err(e) => panic!("join mine-{i}: {e}"),
        }
    }
    assert_eq!(made, 6, "acme gets exactly its share of the 8 places");
    let other = edge.client("globex", "fair", "host").await;
    let mut theirs = Vec::new();
    for i in 0..2 {
        theirs.push(
            other
                .join(&format!("theirs-{i}"))
                .await
                .expect("globex's rooms fit in the rest"),
        );
    }
    // And the edge is full now, for everyone.
    let late = edge.client("globex", "late", "viewer").await;
    assert_eq!(join_code(&late, "one-too-many").await, Some(ErrorCode::RoomLimit));
    drop((held, theirs));
}
