//! A token's `exp` holds for the whole session: the edge closes it with
//! `TokenExpired` unless the client refreshed it with a later token.

use std::time::Duration;

use throng_client::{Client, TokenSource};
use throng_edge::auth::{LEEWAY_SECS, unix_now};
use throng_tests::TestEdge;
use throng_wire::{ErrorCode, Kind};

/// A token that the edge still accepts (inside its leeway) but that runs
/// out within two seconds.
fn nearly_expired(edge: &TestEdge, user: &str) -> String {
    edge.token_exp("acme", user, "host", "*", unix_now() + 2 - LEEWAY_SECS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_with_its_token() {
    let edge = TestEdge::start(|_| {}).await;
    let client = Client::connect(edge.options(nearly_expired(&edge, "brief")))
        .await
        .expect("accepted while valid");
    let _room = client.join("lobby").await.expect("join");
    client.send("lobby", Kind::Chat, "while valid").await.expect("ack");
    let ended = tokio::time::timeout(Duration::from_secs(10), client.closed())
        .await
        .expect("the edge ends the session at expiry");
    assert_eq!(ended.code(), Some(ErrorCode::TokenExpired), "{ended}");
    let after = client.send("lobby", Kind::Chat, "too late").await;
    assert!(after.is_err(), "nothing is sent after expiry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_session_goes_on_past_the_first_tokens_expiry() {
    let edge = TestEdge::start(|_| {}).await;
    let later = edge.token("acme", "kept", "host", "*");
    let client = Client::connect(edge.options(nearly_expired(&edge, "kept")))
        .await
        .expect("connect");
    let first = client.expires_at();
    let new_exp = client.refresh(later).await.expect("refreshed");
    assert!(new_exp > first + 3000, "{new_exp} vs {first}");
    assert_eq!(client.expires_at(), new_exp);
    // Past the first token's expiry (and its leeway) the session still works.
    let mut room = client.join("lobby").await.expect("join");
    let wait_until = tokio::time::Instant::now() + Duration::from_secs(LEEWAY_SECS + 3);
    while tokio::time::Instant::now() < wait_until {
        client.ping().await.expect("still connected");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    client
        .send("lobby", Kind::Chat, "after")
        .await
        .expect("ack after the first expiry");
    let (got, _) = throng_tests::collect(&mut room, 1, Duration::from_secs(5)).await;
    assert_eq!(got.first().map(|m| m.body.as_slice()), Some(&b"after"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_library_refreshes_by_itself_through_its_callback() {
    let edge = TestEdge::start(|_| {}).await;
    let fresh = edge.token("acme", "auto", "viewer", "*");
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = std::sync::Arc::clone(&calls);
    let source = TokenSource::new(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = fresh.clone();
        async move { Ok(t) }
    });
    let client = Client::connect(edge.options(nearly_expired(&edge, "auto")).with_refresh(source))
        .await
        .expect("connect");
    let wait_until = tokio::time::Instant::now() + Duration::from_secs(LEEWAY_SECS + 3);
    while tokio::time::Instant::now() < wait_until {
        client.ping().await.expect("the callback kept the session alive");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "one refresh; the next is due an hour later"
    );
    assert!(client.expires_at() > unix_now() + 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_for_another_user_or_a_bad_token_changes_nothing() {
    let edge = TestEdge::start(|_| {}).await;
    let client = edge.client("acme", "mallory", "viewer").await;
    let before = client.expires_at();
    let other = edge.token("acme", "alice", "host", "*");
    let err = client.refresh(other).await.expect_err("another user's token");
    assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{err}");
    let err = client.refresh("not.a.token").await.expect_err("garbage");
    assert_eq!(err.code(), Some(ErrorCode::TokenMalformed), "{err}");
    let expired = edge.token_exp("acme", "mallory", "viewer", "*", unix_now() - 600);
    let err = client.refresh(expired).await.expect_err("an expired token");
    assert_eq!(err.code(), Some(ErrorCode::TokenExpired), "{err}");
    assert_eq!(client.expires_at(), before);
    client.ping().await.expect("the session goes on");
}

/// On a090a11 a `Refresh` whose token narrowed `rooms` left the session in
/// rooms the new token no longer allowed, and its sends there were acked.
/// Now the session leaves them, is told, and keeps the rooms still allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_narrows_rooms_leaves_the_rooms_no_longer_allowed() {
    let edge = TestEdge::start(|_| {}).await;
    let client = edge.client("acme", "narrowed", "host").await;
    let mut kept = client.join("show-1").await.expect("join show-1");
    let mut dropped = client.join("backstage").await.expect("join backstage");
    client.send("backstage", Kind::Chat, "before").await.expect("ack");
    let narrower = edge.token("acme", "narrowed", "host", "show-*");
    client.refresh(narrower).await.expect("refreshed");
    // The dropped room's stream ends; its sends are refused.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match dropped.next_batch().await {
                Some(Ok(_)) => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the room the new token does not allow went on");
    let refused = client.send("backstage", Kind::Chat, "after").await;
    assert!(
        refused.is_err(),
        "a send to a room the token no longer allows was acked"
    );
    // The room still allowed goes on.
    client.send("show-1", Kind::Chat, "still").await.expect("ack in show-1");
    let (got, _) = throng_tests::collect(&mut kept, 1, Duration::from_secs(5)).await;
    assert_eq!(got.first().map(|m| m.body.as_slice()), Some(&b"still"[..]));
}
