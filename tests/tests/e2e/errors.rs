//! Bad input over real QUIC: every bad token is refused with its code; bad
//! frames get a typed error and a close while other clients keep receiving;
//! per-connection and per-user limits answer with typed refusals.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use throng_client::{Client, ClientError};
use throng_edge::auth::unix_now;
use throng_tests::{TestEdge, collect, drain, frame, raw};
use throng_wire::{ClientFrame, EdgeFrame, ErrorCode, Kind};

async fn refused_with(edge: &TestEdge, token: String) -> ClientError {
    Client::connect(edge.options(token))
        .await
        .expect_err("token must be refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_bad_token_is_refused_with_its_code() {
    let edge = TestEdge::start(|_| {}).await;
    let expired = edge.token_exp("acme", "u", "viewer", "*", unix_now() - 600);
    let good = edge.token("acme", "u", "viewer", "*");
    // Signed with globex's key but claiming tenant acme.
    let wrong_key = {
        let g = edge.token("globex", "u", "viewer", "*");
        let parts: Vec<&str> = g.split('.').collect();
        let a: Vec<&str> = good.split('.').collect();
        format!("{}.{}.{}", a[0], a[1], parts[2])
    };
    let alg_none = {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = good.split('.').nth(1).unwrap_or_default().to_owned();
        format!("{header}.{payload}.")
    };
    let cases = [
        ("expired", expired, ErrorCode::TokenExpired),
        ("wrong key", wrong_key, ErrorCode::TokenInvalid),
        ("alg none", alg_none, ErrorCode::AlgorithmNotAllowed),
        ("malformed", "eyJhbGciOi.garbage".to_owned(), ErrorCode::TokenMalformed),
        ("missing", String::new(), ErrorCode::Unauthenticated),
    ];
    for (what, token, code) in cases {
        let err = refused_with(&edge, token).await;
        assert_eq!(err.code(), Some(code), "{what}: {err}");
    }
    // And a good token still works afterwards.
    Client::connect(edge.options(good)).await.expect("good token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_a_typed_error_and_a_close_while_others_keep_receiving() {
    let edge = TestEdge::start(|_| {}).await;
    let viewer = edge.client("acme", "v", "viewer").await;
    let mut room = viewer.join("lobby").await.expect("join");
    let sender = edge.client("acme", "s", "viewer").await;
    let _r = sender.join("lobby").await.expect("join");

    let hello = frame(&ClientFrame::Hello {
        token: edge.token("acme", "bad", "viewer", "*"),
    });
    let cases: Vec<(&str, Vec<Bytes>, ErrorCode)> = vec![
        (
            "garbage payload",
            vec![
                hello.clone(),
                Bytes::from_static(&[0, 0, 0, 5, 0xff, 0xfe, 0xfd, 0xfc, 0xfb]),
            ],
            ErrorCode::Malformed,
        ),
        (
            "oversized length prefix",
            vec![hello.clone(), Bytes::from_static(&[0x7f, 0xff, 0xff, 0xff, 1, 2, 3])],
            ErrorCode::FrameTooLarge,
        ),
        (
            "second hello",
            vec![hello.clone(), hello.clone()],
            ErrorCode::UnexpectedFrame,
        ),
        (
            "join before hello",
            vec![frame(&ClientFrame::Join {
                room: "lobby".into(),
                resume_from: None,
                epoch: 0,
            })],
            ErrorCode::UnexpectedFrame,
        ),
        (
            "garbage before hello",
            vec![Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n")],
            ErrorCode::FrameTooLarge,
        ),
    ];
    for (i, (what, bytes, code)) in cases.into_iter().enumerate() {
        let (conn, mut send, mut recv) = raw(&edge).await;
        for b in bytes {
            send.write_all(&b).await.expect("write");
        }
        let frames = drain(&mut recv).await;
        let last = frames.last().cloned();
        match last {
            Some(EdgeFrame::Error { code: got, text }) => {
                assert_eq!(ErrorCode::from_code(got), Some(code), "{what}: {text}");
            }
            other => panic!("{what}: expected an Error frame, got {other:?} (all: {frames:?})"),
        }
        let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .expect("edge closes");
        match reason {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code.into_inner(), u64::from(code.code()), "{what}: close code");
            }
            other => panic!("{what}: closed with {other}"),
        }
        // The good viewer is unaffected.
        sender
            .send("lobby", Kind::Chat, format!("after {i}"))
            .await
            .expect("ack");
        let (got, _) = collect(&mut room, 1, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 1, "{what}: the good viewer stopped receiving");
        assert_eq!(got[0].body, format!("after {i}").into_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_with_typed_refusals() {
    let edge = TestEdge::start(|c| {
        c.limits.send_rate_per_sec = 5;
        c.limits.send_burst = 5;
        c.limits.max_body_bytes = 100;
        c.limits.max_rooms_per_connection = 2;
    })
    .await;
    let restricted = Client::connect(edge.options(edge.token("acme", "r", "viewer", "show-*")))
        .await
        .expect("connect");
    let err = restricted.join("lobby").await.expect_err("pattern forbids lobby");
    assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{err}");
    let _a = restricted.join("show-1").await.expect("pattern allows show-1");
    let _b = restricted.join("show-2").await.expect("second room");
    let err = restricted
        .join("show-3")
        .await
        .expect_err("third room is over the limit");
    assert_eq!(err.code(), Some(ErrorCode::TooManyRooms), "{err}");
    let err = restricted.join("bad name!").await.expect_err("bad name");
    assert_eq!(err.code(), Some(ErrorCode::BadRoomName), "{err}");

    let err = restricted
        .send("show-9", Kind::Chat, "x")
        .await
        .expect_err("not joined");
    assert_eq!(err.code(), Some(ErrorCode::NotJoined), "{err}");
    let err = restricted
        .send("show-1", Kind::Host, "x")
        .await
        .expect_err("viewer may not send host");
    assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{err}");
    let err = restricted
        .send("show-1", Kind::Chat, vec![b'x'; 101])
        .await
        .expect_err("too big");
    assert_eq!(err.code(), Some(ErrorCode::BodyTooLarge), "{err}");

    // The burst is 5 and two sends above already spent their tokens? No:
    // refusals before the rate check do not spend tokens. Spend the burst now.
    let mut limited = 0;
    for _ in 0..10 {
        match restricted.send("show-1", Kind::Chat, "hi").await {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::RateLimited), "{e}");
                limited += 1;
            }
        }
    }
    assert!(limited >= 4, "a burst of 5 then refusals; {limited} refused");
    // The limit is per user, across connections.
    let again = Client::connect(edge.options(edge.token("acme", "r", "viewer", "show-*")))
        .await
        .expect("connect");
    let _c = again.join("show-1").await.expect("join");
    let err = again
        .send("show-1", Kind::Chat, "hi")
        .await
        .expect_err("same user, same bucket");
    assert_eq!(err.code(), Some(ErrorCode::RateLimited), "{err}");
    // The connection is still usable after refusals.
    restricted.ping().await.expect("ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_as_busy() {
    let edge = TestEdge::start(|c| c.limits.max_connections = 2).await;
    let _a = edge.client("acme", "a", "viewer").await;
    let _b = edge.client("acme", "b", "viewer").await;
    let err = Client::connect(edge.options(edge.token("acme", "c", "viewer", "*")))
        .await
        .expect_err("third connection");
    assert_eq!(err.code(), Some(ErrorCode::ServerBusy), "{err}");
}
