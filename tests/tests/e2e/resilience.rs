//! Slow viewers, presence, churn and resuming after an edge restart.

use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;
use throng_client::{ClientError, ResumableRoom, ResumePolicy};

use throng_tests::{RawSession, TestEdge, collect, viewers, wait_for};
use throng_wire::{EdgeFrame, ErrorCode, Kind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_that_reads_nothing_slows_no_one_and_is_evicted() {
    let edge = TestEdge::start(|c| {
        c.limits.max_body_bytes = 16 * 1024;
        c.rooms.viewer_queue_batches = 4;
        c.rooms.max_behind = Duration::from_secs(1);
    })
    .await;
    let lazy = edge.client("acme", "lazy", "viewer").await;
    let _never_read = lazy.join("show").await.expect("join");
    let mut readers = viewers(&edge, "acme", "show", 10).await;
    let sender = edge.client("acme", "s", "viewer").await;
    let mut own = sender.join("show").await.expect("join");
    // The sender is a member too: it must read, or it is evicted as well.
    tokio::spawn(async move { while own.next_batch().await.is_some() {} });

    let body = vec![b'x'; 16 * 1024];
    let mut sent = 0usize;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        for _ in 0..4 {
            sender.send("show", Kind::Chat, body.clone()).await.expect("ack");
            sent += 1;
        }
        // Readers keep up; their latency is what the lazy one must not hurt.
        for (v, (_c, room)) in readers.iter_mut().enumerate() {
            let t = Instant::now();
            let (got, batches) = collect(room, 4, Duration::from_secs(2)).await;
            assert_eq!(got.len(), 4, "reader {v} fell behind at message {sent}");
            assert!(batches.iter().all(|b| b.missed == 0), "reader {v} missed batches");
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "reader {v} waited {:?}",
                t.elapsed()
            );
        }
    }
    let why = tokio::time::timeout(Duration::from_secs(10), lazy.closed())
        .await
        .expect("the lazy viewer is evicted");
    assert_eq!(why.code(), Some(ErrorCode::TooSlow), "{why}");
    assert!(sent > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_answers_thousands_of_users_in_one_call_per_tenant() {
    let edge = TestEdge::start(|_| {}).await;
    let online = viewers(&edge, "acme", "lobby", 50).await;
    let asker = edge.client("acme", "asker", "viewer").await;
    let other_tenant = edge.client("globex", "asker", "viewer").await;
    let names: Vec<String> = (0..12_000).map(|i| format!("viewer{}", i * 7 % 12_000)).collect();
    let answer = asker.online(&names).await.expect("presence");
    for (name, is_online) in names.iter().zip(&answer) {
        let n: usize = name.trim_start_matches("viewer").parse().expect("number");
        assert_eq!(*is_online, n < 50, "{name}");
    }
    let theirs = other_tenant.online(&names[..5000]).await.expect("presence");
    assert!(theirs.iter().all(|o| !o), "another tenant's users are not visible");
    drop(online);
    let start = Instant::now();
    loop {
        let now = asker.online(&["viewer0".to_owned()]).await.expect("presence");
        if !now[0] {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "viewer0 still online after it left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_joins_and_leaves_end_with_exact_online_counts() {
    let edge = TestEdge::start(|_| {}).await;
    let churners = viewers(&edge, "acme", "home", 20).await;
    let mut tasks = Vec::new();
    for (i, (c, room)) in churners.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            drop(room);
            for _ in 0..100 {
                let r = c.join("churn").await.expect("join");
                drop(r);
                c.leave("churn").await.expect("leave");
            }
            // The first 7 stay in the room at the end.
            let stay = if i < 7 {
                Some(c.join("churn").await.expect("final join"))
            } else {
                None
            };
            (c, stay)
        }));
    }
    let mut kept = Vec::new();
    for t in tasks {
        let (c, stay) = t.await.expect("churner");
        // `leave` only writes the frame. A ping round trip means the
        // connection task has handled everything before it, and it hands a
        // leave to the room's queue before reading the next frame: every
        // leave is queued ahead of the newcomer's join.
        c.ping().await.expect("churner still connected");
        kept.push((c, stay));
    }
    // 20 × 100 joins and leaves went through; a newcomer counts exactly.
    let newcomer = edge.client("acme", "new", "viewer").await;
    let room = newcomer.join("churn").await.expect("join");
    assert_eq!(room.online, 8, "7 stayers + the newcomer");
    drop(room);
    newcomer.leave("churn").await.expect("leave");
    newcomer.ping().await.expect("ping");

    // Two stayers leave; a second newcomer sees exactly 5 + itself.
    for (c, stay) in kept.iter_mut().take(2) {
        drop(stay.take().expect("a stayer"));
        c.leave("churn").await.expect("leave");
        c.ping().await.expect("ping");
    }
    let second = edge.client("acme", "new2", "viewer").await;
    let room = second.join("churn").await.expect("join");
    assert_eq!(room.online, 6, "5 stayers + the second newcomer");
}

/// An edge with group rooms, a `ResumableRoom` member of `group-x` on
/// it, and a sender joined to the room (with its stream).
async fn group_x_with_a_resumable_member() -> (
    TestEdge,
    ResumableRoom,
    throng_client::Client,
    throng_client::RoomStream,
) {
    let edge = TestEdge::start(|c| c.rooms.group_rooms = vec!["group-*".into()]).await;
    let opts = edge.options(edge.token("acme", "member", "viewer", "*"));
    let room = ResumableRoom::join(opts, "group-x", None, ResumePolicy::default())
        .await
        .expect("join");
    let sender = edge.client("acme", "s", "viewer").await;
    let joined = sender.join("group-x").await.expect("join");
    (edge, room, sender, joined)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_resumes_by_itself_after_the_edge_restarts() {
    let (edge, mut room, sender, _s) = group_x_with_a_resumable_member().await;
    for i in 0..10 {
        sender.send("group-x", Kind::Chat, format!("m{i}")).await.expect("ack");
    }
    let mut got = Vec::new();
    while got.len() < 10 {
        let b = tokio::time::timeout(Duration::from_secs(5), room.next_batch())
            .await
            .expect("in time")
            .expect("batch");
        got.extend(b.messages);
    }
    // Committed to the log, then the edge goes away and comes back.
    let log = edge.edge.log_stats();
    wait_for("the first ten messages to commit", Duration::from_secs(10), || {
        log.messages.load(Ordering::Relaxed) >= 10
    })
    .await;
    let before_restart = room.last_seq().expect("a message was handed out");
    drop(sender);
    let edge = edge.restart().await;
    let sender = edge.client("acme", "s", "viewer").await;
    let _s = sender.join("group-x").await.expect("join");
    for i in 10..20 {
        sender.send("group-x", Kind::Chat, format!("m{i}")).await.expect("ack");
    }
    while got.len() < 20 {
        let b = tokio::time::timeout(Duration::from_secs(15), room.next_batch())
            .await
            .expect("resumed in time")
            .unwrap_or_else(|e: ClientError| panic!("resume failed: {e}"));
        got.extend(b.messages);
    }
    let bodies: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, expected, "every message once, across the restart");
    assert_eq!(room.reconnects(), 1, "one restart, one reconnection");

    // `ResumableRoom` drops anything at or below its last sequence, so the
    // edge's own answer to the same rejoin is read at the wire: the member
    // resuming from before the restart gets m10..m19 once each, then live.
    let mut raw = RawSession::hello(&edge, edge.token("acme", "member", "viewer", "*")).await;
    let mut stream = raw.join("group-x", Some(before_restart)).await;
    let mut wire = Vec::new();
    match stream.next(Duration::from_secs(10)).await {
        Some(EdgeFrame::Joined { recent, .. }) => wire.extend(recent),
        other => panic!("expected Joined, got {other:?}"),
    }
    sender.send("group-x", Kind::Chat, "m20").await.expect("ack");
    while wire.last().is_none_or(|m| m.body != b"m20") {
        match stream.next(Duration::from_secs(10)).await {
            Some(EdgeFrame::Batch(b)) => wire.extend(b.messages),
            other => panic!("expected batches up to m20, got {other:?} after {wire:?}"),
        }
    }
    let bodies: Vec<String> = wire
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    let expected: Vec<String> = (10..=20).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, expected, "at the wire: no duplicate, no gap");
    let seqs: Vec<u64> = wire.iter().map(|m| m.seq).collect();
    let want: Vec<u64> = (before_restart + 1..=before_restart + 11).collect();
    assert_eq!(seqs, want);
}

/// An app reads its room in a `select!` loop beside a 2 ms timer (a UI
/// frame, say), so most calls to `next_batch` are dropped unfinished, also
/// while the client reconnects after an edge restart. The reconnect goes
/// on across the drops, and every message arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumable_room_read_in_a_select_loop_reconnects_all_the_same() {
    let (edge, mut room, sender, _s) = group_x_with_a_resumable_member().await;
    sender.send("group-x", Kind::Chat, "m0").await.expect("ack");
    let log = edge.edge.log_stats();
    wait_for("m0 to commit", Duration::from_secs(10), || {
        log.messages.load(Ordering::Relaxed) >= 1
    })
    .await;
    drop(sender);
    let edge = edge.restart().await;
    let sender = edge.client("acme", "s", "viewer").await;
    let _s = sender.join("group-x").await.expect("join");
    sender.send("group-x", Kind::Chat, "m1").await.expect("ack");

    let mut frame = tokio::time::interval(Duration::from_millis(2));
    let (mut got, mut frames) = (Vec::new(), 0u64);
    let start = Instant::now();
    while got.len() < 2 && start.elapsed() < Duration::from_secs(15) {
        tokio::select! {
            b = room.next_batch() => got.extend(b.expect("a batch").messages),
            _ = frame.tick() => frames += 1,
        }
    }
    let bodies: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    assert_eq!(
        bodies,
        ["m0", "m1"],
        "after {frames} frames and {} reconnects",
        room.reconnects()
    );
    assert_eq!(room.reconnects(), 1);
    assert!(frames > 10, "the timer ran beside the reads ({frames} frames)");
}
