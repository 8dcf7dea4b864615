//! A number means one message: epochs across restarts, and group messages
//! acked and shown only once they are stored, on one edge.
//! (Crashes, NATS outages and fencing run against real processes in
//! `host/throng/tests/processes/faults.rs`.)

use std::sync::atomic::Ordering;
use std::time::Duration;

use throng_client::{GapKind, ResumableRoom, ResumePolicy, RoomEvent};
use throng_tests::{RawSession, TestEdge};
use throng_wire::{EdgeFrame, Kind, Message, Resumed};

fn bodies(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

/// Reads `room` until `done` says so; every message and every gap, in order.
async fn read_until(
    room: &mut ResumableRoom,
    limit: Duration,
    mut done: impl FnMut(&[Message]) -> bool,
) -> (Vec<Message>, Vec<(GapKind, usize)>) {
    let (mut got, mut gaps) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + limit;
    while !done(&got) {
        let event = tokio::time::timeout_at(deadline, room.next_event())
            .await
            .unwrap_or_else(|_| panic!("in time; so far {:?}, gaps {gaps:?}", bodies(&got)))
            .expect("the room goes on");
        match event {
            RoomEvent::Batch(b) => got.extend(b.messages),
            RoomEvent::Gap(g) => gaps.push((g.kind, got.len())),
        }
    }
    (got, gaps)
}

/// The README's demo flow: a livecast room (`lobby`), a viewer that resumes
/// across an edge restart. The restarted room numbers above everything its
/// last life handed out, and the viewer is told its numbering changed; on
/// a090a11 the room numbered from 1 again and the viewer silently dropped
/// `after-1..5` as repeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_livecast_room_restarted_numbers_above_its_last_life_and_says_its_epoch_changed() {
    let edge = TestEdge::start(|_| {}).await;
    let opts = edge.options(edge.token("acme", "viewer", "viewer", "*"));
    let mut room = ResumableRoom::join(opts, "lobby", None, ResumePolicy::default())
        .await
        .expect("join");
    let host = edge.client("acme", "host", "host").await;
    let _h = host.join("lobby").await.expect("join");
    for i in 1..=5 {
        host.send("lobby", Kind::Host, format!("before-{i}"))
            .await
            .expect("ack");
    }
    let (before, gaps) = read_until(&mut room, Duration::from_secs(10), |m| m.len() >= 5).await;
    assert_eq!(
        bodies(&before),
        (1..=5).map(|i| format!("before-{i}")).collect::<Vec<_>>()
    );
    assert!(gaps.is_empty(), "a fresh join is no gap");
    let epoch_before = room.epoch();
    assert_ne!(epoch_before, 0);

    drop(host);
    let edge = edge.restart().await;
    let host = edge.client("acme", "host", "host").await;
    let _h = host.join("lobby").await.expect("join");
    let mut acked = Vec::new();
    for i in 1..=5 {
        acked.push(
            host.send("lobby", Kind::Host, format!("after-{i}"))
                .await
                .expect("ack")
                .seq,
        );
    }
    let (after, gaps) = read_until(&mut room, Duration::from_secs(20), |m| {
        m.last().is_some_and(|m| m.body == b"after-5")
    })
    .await;
    assert_eq!(
        bodies(&after),
        (1..=5).map(|i| format!("after-{i}")).collect::<Vec<_>>(),
        "every message of the new life, none dropped as a repeat"
    );
    assert_eq!(
        gaps,
        vec![(GapKind::NewEpoch, 0)],
        "told once, before the new numbering's messages"
    );
    assert_ne!(room.epoch(), epoch_before);
    let last_before = before.last().map(|m| m.seq).expect("a message");
    assert!(
        acked.iter().all(|&s| s > last_before),
        "the new life numbers above the old: {acked:?} after {last_before}"
    );

    // At the wire: resuming with the old epoch says so; with the new one it
    // continues.
    let mut raw = RawSession::hello(&edge, edge.token("acme", "raw", "viewer", "*")).await;
    raw.send(&throng_wire::ClientFrame::Join {
        room: "lobby".into(),
        resume_from: Some(last_before),
        epoch: epoch_before,
    })
    .await;
    let recv = tokio::time::timeout(Duration::from_secs(10), raw.conn.accept_uni())
        .await
        .expect("in time")
        .expect("room stream");
    let mut stream = throng_tests::FrameReader::new(recv);
    match stream.next(Duration::from_secs(10)).await {
        Some(EdgeFrame::Joined {
            epoch, resumed, recent, ..
        }) => {
            assert_eq!(epoch, room.epoch());
            assert_eq!(resumed, Resumed::NewEpoch { previous: epoch_before });
            assert_eq!(
                bodies(&recent),
                (1..=5).map(|i| format!("after-{i}")).collect::<Vec<_>>()
            );
        }
        other => panic!("expected Joined, got {other:?}"),
    }
}

/// A livecast viewer back from before what the ring still holds is told
/// its resume is truncated (the number lost is unknown); one within it is
/// told it continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_before_the_ring_is_marked_truncated_and_one_within_it_continued() {
    let edge = TestEdge::start(|c| c.rooms.recent_messages = 5).await;
    let host = edge.client("acme", "host", "host").await;
    let _h = host.join("show").await.expect("join");
    let mut seqs = Vec::new();
    for i in 0..20 {
        seqs.push(host.send("show", Kind::Host, format!("m{i}")).await.expect("ack").seq);
    }
    let viewer = edge.client("acme", "v", "viewer").await;
    let first = viewer.resume("show", Some(seqs[2]), 0).await.expect("join");
    assert_eq!(first.resumed, Resumed::Truncated, "the ring holds only the last 5");
    assert_eq!(
        bodies(&first.recent),
        (15..20).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    let epoch = first.epoch;
    drop(first);
    let other = edge.client("acme", "w", "viewer").await;
    let second = other.resume("show", Some(seqs[16]), epoch).await.expect("join");
    assert_eq!(second.resumed, Resumed::Continued);
    assert_eq!(
        bodies(&second.recent),
        (17..20).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    let third = edge.client("acme", "x", "viewer").await;
    assert_eq!(third.join("show").await.expect("join").resumed, Resumed::Fresh);
}

/// Acked means stored: with a slow disk (a 300 ms commit interval), no
/// sender hears of its message, and no member sees it, before the log has
/// committed it. On a090a11 acks and batches went out at the tick, a
/// commit interval before the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_message_is_acked_and_shown_only_once_it_is_on_disk() {
    let edge = TestEdge::start(|c| {
        c.rooms.group_rooms = vec!["group-*".into()];
        c.storage.commit_interval = Duration::from_millis(300);
    })
    .await;
    let stats = std::sync::Arc::clone(edge.edge.log_stats());
    let member = edge.client("acme", "member", "viewer").await;
    let mut stream = member.join("group-x").await.expect("join");
    let sender = edge.client("acme", "sender", "viewer").await;
    let _s = sender.join("group-x").await.expect("join");
    let mut pending = Vec::new();
    for i in 0..10 {
        pending.push(
            sender
                .submit("group-x", Kind::Chat, format!("m{i}"))
                .await
                .expect("sent"),
        );
    }
    for (k, p) in pending.into_iter().enumerate() {
        p.ack().await.expect("acked");
        let stored = stats.messages.load(Ordering::Acquire);
        assert!(stored > k as u64, "ack {k} came with only {stored} messages stored");
    }
    let mut seen = 0u64;
    while seen < 10 {
        let b = tokio::time::timeout(Duration::from_secs(10), stream.next_batch())
            .await
            .expect("in time")
            .expect("open")
            .expect("a batch");
        seen += b.messages.len() as u64;
        let stored = stats.messages.load(Ordering::Acquire);
        assert!(stored >= seen, "{seen} messages shown with {stored} stored");
    }
}

/// A group member's number from another log (a data dir made anew) is not
/// taken for one of this log's: the member is told, and resumes after its
/// cursor here. With this log's epoch it continues exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_resume_names_its_log_and_another_logs_number_is_not_taken() {
    let edge = TestEdge::start(|c| {
        c.rooms.group_rooms = vec!["group-*".into()];
        c.rooms.group_history = throng_edge::config::GroupHistory::All;
    })
    .await;
    let sender = edge.client("acme", "sender", "viewer").await;
    let joined = sender.join("group-x").await.expect("join");
    let epoch = joined.epoch;
    assert_ne!(epoch, 0);
    let mut seqs = Vec::new();
    for i in 0..6 {
        seqs.push(
            sender
                .send("group-x", Kind::Chat, format!("m{i}"))
                .await
                .expect("ack")
                .seq,
        );
    }
    let member = edge.client("acme", "member", "viewer").await;
    let mut same = member.resume("group-x", Some(seqs[2]), epoch).await.expect("join");
    assert_eq!(same.resumed, Resumed::Continued);
    let (got, _) = throng_tests::collect(&mut same, 3, Duration::from_secs(10)).await;
    assert_eq!(bodies(&got), vec!["m3", "m4", "m5"]);
    drop(same);
    drop(member);
    let other = edge.client("acme", "other", "viewer").await;
    let foreign = other.resume("group-x", Some(seqs[2]), epoch + 1).await.expect("join");
    assert_eq!(foreign.resumed, Resumed::NewEpoch { previous: epoch + 1 });
    assert_eq!(foreign.epoch, epoch);
}
