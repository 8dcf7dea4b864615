//! Rooms over real QUIC: fanout, ordering, online counts, tenant isolation,
//! and a quiet room that a flooding room on the same connection cannot block.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use throng_tests::{TestEdge, collect, wait_for};
use throng_wire::Kind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_viewers_receive_a_hundred_messages_in_order() {
    let edge = TestEdge::start(|_| {}).await;
    let mut viewers = Vec::new();
    for i in 0..50 {
        let c = edge.client("acme", &format!("viewer{i}"), "viewer").await;
        let room = c.join("lobby").await.expect("join");
        viewers.push((c, room));
    }
    let sender = edge.client("acme", "host", "host").await;
    let _own = sender.join("lobby").await.expect("sender joins");
    let mut acks = Vec::new();
    for i in 0..100 {
        acks.push(
            sender
                .submit("lobby", Kind::Chat, format!("m{i}"))
                .await
                .expect("submit"),
        );
    }
    let mut seqs = Vec::new();
    for a in acks {
        seqs.push(a.ack().await.expect("ack").seq);
    }
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "acks in increasing order: {seqs:?}"
    );

    let mut tasks = Vec::new();
    for (c, mut room) in viewers {
        tasks.push(tokio::spawn(async move {
            let got = collect(&mut room, 100, Duration::from_secs(20)).await;
            drop(c);
            got
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (messages, batches) = t.await.expect("viewer task");
        let bodies: Vec<String> = messages
            .iter()
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .collect();
        let expected: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
        assert_eq!(bodies, expected, "viewer {i} got every message in order");
        let got_seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
        assert_eq!(got_seqs, seqs, "viewer {i} sees the acked sequence numbers");
        assert!(messages.iter().all(|m| m.sender == "host" && m.kind == Kind::Chat));
        // 50 viewers and the sender were online before the first message.
        assert!(
            batches.iter().all(|b| b.online == 51),
            "viewer {i} online counts: {:?}",
            batches.iter().map(|b| b.online).collect::<Vec<_>>()
        );
        assert!(batches.iter().all(|b| b.missed == 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_fanning_out_from_parallel_shards_delivers_everything_in_order() {
    // A low threshold so 40 viewers take the path huge rooms take.
    let edge = TestEdge::start(|c| c.rooms.shard_members = 8).await;
    let mut audience = throng_tests::viewers(&edge, "acme", "huge", 40).await;
    let sender = edge.client("acme", "s", "viewer").await;
    let _s = sender.join("huge").await.expect("join");
    for i in 0..50 {
        sender.send("huge", Kind::Chat, format!("m{i}")).await.expect("ack");
    }
    for (v, (_c, room)) in audience.iter_mut().enumerate() {
        let (got, _) = collect(room, 50, Duration::from_secs(10)).await;
        let bodies: Vec<String> = got
            .iter()
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .collect();
        let expected: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
        assert_eq!(bodies, expected, "viewer {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_with_the_same_room_name_are_isolated() {
    let edge = TestEdge::start(|_| {}).await;
    let acme_viewer = edge.client("acme", "a", "viewer").await;
    let globex_viewer = edge.client("globex", "g", "viewer").await;
    let mut acme_room = acme_viewer.join("lobby").await.expect("join");
    let mut globex_room = globex_viewer.join("lobby").await.expect("join");
    assert_eq!(acme_room.online, 1);
    assert_eq!(globex_room.online, 1, "globex's lobby does not count acme's viewer");

    let acme_sender = edge.client("acme", "s", "viewer").await;
    let _r = acme_sender.join("lobby").await.expect("join");
    acme_sender
        .send("lobby", Kind::Chat, "for acme only")
        .await
        .expect("ack");

    let (got, _) = collect(&mut acme_room, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, b"for acme only");
    let leaked = tokio::time::timeout(Duration::from_millis(500), globex_room.next_batch()).await;
    match leaked {
        Err(_) => {}
        Ok(Some(Ok(b))) => assert!(b.messages.is_empty(), "globex saw acme's message: {b:?}"),
        Ok(other) => panic!("globex room ended: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_room_keeps_flowing_while_another_floods_the_same_connection() {
    let edge = TestEdge::start(|c| {
        c.limits.max_body_bytes = 16 * 1024;
        c.rooms.viewer_queue_batches = 4;
    })
    .await;
    let viewer = edge.client("acme", "v", "viewer").await;
    // The viewer never reads the busy room: its stream backs up to flow control.
    let _busy = viewer.join("busy").await.expect("join busy");
    let mut quiet = viewer.join("quiet").await.expect("join quiet");

    let flooder = edge.client("acme", "f", "viewer").await;
    let _fr = flooder.join("busy").await.expect("join");
    let flooded = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&flooded);
    let flood = tokio::spawn(async move {
        let body = vec![b'x'; 16 * 1024];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_secs(4) {
            for _ in 0..20 {
                if flooder.submit("busy", Kind::Chat, body.clone()).await.is_ok() {
                    sent += 1;
                }
            }
            counted.store(sent, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sent
    });

    let speaker = edge.client("acme", "q", "viewer").await;
    let _qr = speaker.join("quiet").await.expect("join");
    // 100 × 16 KiB is far past the busy stream's flow-control window.
    wait_for("the flood to build up", Duration::from_secs(10), || {
        flooded.load(Ordering::Relaxed) >= 100
    })
    .await;
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let sent_at = Instant::now();
        speaker.send("quiet", Kind::Chat, format!("q{i}")).await.expect("ack");
        let (got, _) = collect(&mut quiet, 1, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 1, "quiet message {i} did not arrive during the flood");
        assert_eq!(got[0].body, format!("q{i}").into_bytes());
        worst = worst.max(sent_at.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = flood.await.expect("flood task");
    // 16 KiB × hundreds of messages is far more than the busy stream's window.
    assert!(sent > 200, "the flood was real: {sent} messages");
    assert!(
        worst < Duration::from_secs(2),
        "quiet room latency under flood: {worst:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn likes_become_counters_and_the_cap_bounds_chat() {
    let edge = TestEdge::start(|c| {
        c.rooms.viewer_cap_per_sec = 20;
        throng_tests::set_tick(c, Duration::from_millis(50));
    })
    .await;
    let viewer = edge.client("acme", "v", "viewer").await;
    let mut room = viewer.join("show").await.expect("join");
    let sender = edge.client("acme", "s", "host").await;
    let _r = sender.join("show").await.expect("join");
    // 60 chats over ~600 ms: at 20/s about 12 fit, the rest are sampled away.
    let mut pending = Vec::new();
    for i in 0..30 {
        pending.push(sender.submit("show", Kind::Like, "").await.expect("like"));
        pending.push(sender.submit("show", Kind::Chat, format!("c{i}a")).await.expect("chat"));
        pending.push(sender.submit("show", Kind::Chat, format!("c{i}b")).await.expect("chat"));
        if i == 15 {
            pending.push(sender.submit("show", Kind::Host, "welcome").await.expect("host"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for p in pending {
        p.ack().await.expect("every message is acked");
    }
    let mut likes = 0;
    let mut chats = 0;
    let mut host = 0;
    let _ = tokio::time::timeout(Duration::from_millis(300), async {
        while let Some(Ok(b)) = room.next_batch().await {
            likes += b.counters.likes;
            for m in &b.messages {
                match m.kind {
                    Kind::Chat => chats += 1,
                    Kind::Host => host += 1,
                    k => panic!("unexpected {k:?}"),
                }
            }
        }
    })
    .await;
    assert_eq!(likes, 30, "every like is counted");
    assert_eq!(host, 1, "the host message is never dropped");
    // About 0.7 s at 20/s, with the host message spending one slot.
    assert!(chats <= 20, "cap exceeded: {chats} chats");
    assert!(chats < 60, "the cap did nothing: {chats} chats");
    assert!(chats >= 5, "the cap should let some chat through: {chats}");
}
