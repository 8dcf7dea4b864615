//! Group rooms (durable log, resume of everything missed) and livecast
//! rooms (a ring for late joiners) over real QUIC.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use throng_tests::{RawSession, TestEdge, collect, viewers, wait_for};
use throng_wire::{EdgeFrame, Kind, Message};

/// Receives until `n` messages (recent ones included) or `limit`.
async fn take(room: &mut throng_client::RoomStream, n: usize, limit: Duration) -> Vec<Message> {
    let mut got = std::mem::take(&mut room.recent);
    if got.len() < n {
        let (more, _) = collect(room, n - got.len(), limit).await;
        got.extend(more);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_group_members_resume_every_message_in_order_exactly_once() {
    let edge = TestEdge::start(|c| {
        c.rooms.group_rooms = vec!["group-*".into()];
        c.rooms.recent_messages = 10;
    })
    .await;
    let mut members = viewers(&edge, "acme", "group-team", 200).await;
    let sender = edge.client("acme", "lead", "viewer").await;
    let _s = sender.join("group-team").await.expect("join");

    // Some history everyone sees live.
    for i in 0..50 {
        sender
            .send("group-team", Kind::Chat, format!("m{i}"))
            .await
            .expect("ack");
    }
    let mut last_seen = Vec::new();
    for (c, room) in &mut members {
        let got = take(room, 50, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 50);
        last_seen.push(got.last().map(|m| m.seq).unwrap_or(0));
        let _ = c;
    }
    let base = last_seen[0];
    assert!(last_seen.iter().all(|s| *s == base));

    // Half go offline; 200 messages are sent while they are away.
    let offline: Vec<_> = members.drain(100..).collect();
    for (c, _) in &offline {
        c.close();
    }
    drop(offline);
    for i in 50..250 {
        sender
            .send("group-team", Kind::Chat, format!("m{i}"))
            .await
            .expect("ack");
    }
    // They come back while 100 more are being sent.
    let more = {
        let sender = sender.clone();
        tokio::spawn(async move {
            for i in 250..350 {
                sender
                    .send("group-team", Kind::Chat, format!("m{i}"))
                    .await
                    .expect("ack");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut returning = Vec::new();
    for i in 100..200 {
        let opts = edge.options(edge.token("acme", &format!("viewer{i}"), "viewer", "*"));
        returning.push(tokio::spawn(async move {
            let c = throng_client::Client::connect(opts).await.expect("reconnect");
            let mut room = c.join_from("group-team", Some(base)).await.expect("resume");
            let got = take(&mut room, 300, Duration::from_secs(20)).await;
            drop(c);
            got
        }));
    }
    more.await.expect("sender");
    for (i, r) in returning.into_iter().enumerate() {
        let got = r.await.expect("member task");
        let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
        let expected: Vec<u64> = (base + 1..=base + 300).collect();
        assert_eq!(
            seqs, expected,
            "returning member {i}: every missed message, in order, once"
        );
        assert_eq!(got[0].body, b"m50");
        assert_eq!(got[299].body, b"m349");
    }
    // Those who stayed got everything live.
    for (v, (_c, room)) in members.iter_mut().enumerate() {
        let got = take(room, 300, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 300, "online member {v}");
    }
    // Every message is committed to the log once.
    let stats = edge.edge.log_stats();
    wait_for("350 messages committed", Duration::from_secs(10), || {
        stats.messages.load(Ordering::Relaxed) >= 350
    })
    .await;
    assert_eq!(stats.messages.load(Ordering::Relaxed), 350);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_livecast_late_joiner_gets_the_ring_then_live_with_no_gap_or_duplicate() {
    let edge = TestEdge::start(|c| c.rooms.recent_messages = 50).await;
    let sender = edge.client("acme", "host", "host").await;
    let _s = sender.join("show").await.expect("join");
    let acked = Arc::new(AtomicU64::new(0));
    // Livecast rooms number above their earlier lives (a time base): the
    // figures below are counted from the number before the first message.
    let base = Arc::new(AtomicU64::new(0));
    let streaming = {
        let sender = sender.clone();
        let (acked, base) = (Arc::clone(&acked), Arc::clone(&base));
        tokio::spawn(async move {
            for i in 0..300 {
                let ack = sender.send("show", Kind::Chat, format!("m{i}")).await.expect("ack");
                if i == 0 {
                    base.store(ack.seq - 1, Ordering::Relaxed);
                }
                acked.store(i + 1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // Joiners arrive 20 acked messages apart, the first after 60: each finds
    // a full ring of 50.
    let mut late = Vec::new();
    for i in 0..5u64 {
        let at = 60 + 20 * i;
        wait_for("the sender to get ahead", Duration::from_secs(20), || {
            acked.load(Ordering::Relaxed) >= at
        })
        .await;
        let c = edge.client("acme", &format!("late{i}"), "viewer").await;
        let room = c.join("show").await.expect("join");
        late.push((c, room));
    }
    streaming.await.expect("sender");
    let base = base.load(Ordering::Relaxed);
    for (i, (_c, room)) in late.iter_mut().enumerate() {
        assert_eq!(room.recent.len(), 50, "late joiner {i}: a full ring");
        let first = room.recent[0].seq;
        let expected_total = (base + 300 - first + 1) as usize;
        let got = take(room, expected_total, Duration::from_secs(10)).await;
        let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
        let expected: Vec<u64> = (first..=base + 300).collect();
        assert_eq!(seqs, expected, "late joiner {i}: ring then live, seamless");
    }
}

/// A livecast viewer that drops off and rejoins with its last sequence
/// number gets the rest of the ring, then live: read at the wire, so an
/// edge duplicate or gap at the seam fails here (a client library could
/// hide a duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_livecast_rejoin_from_its_last_seq_is_seamless_at_the_wire() {
    let edge = TestEdge::start(|c| c.rooms.recent_messages = 50).await;
    let sender = edge.client("acme", "host", "host").await;
    let _s = sender.join("show").await.expect("join");
    let acked = Arc::new(AtomicU64::new(0));
    // Livecast rooms number above their earlier lives (a time base): the
    // figures below are counted from the number before the first message.
    let base = Arc::new(AtomicU64::new(0));
    let streaming = {
        let sender = sender.clone();
        let (acked, base) = (Arc::clone(&acked), Arc::clone(&base));
        tokio::spawn(async move {
            for i in 0..200 {
                let ack = sender.send("show", Kind::Chat, format!("m{i}")).await.expect("ack");
                if i == 0 {
                    base.store(ack.seq - 1, Ordering::Relaxed);
                }
                acked.store(i + 1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let token = edge.token("acme", "viewer", "viewer", "*");
    let mut first = RawSession::hello(&edge, token.clone()).await;
    let mut stream = first.join("show", None).await;
    wait_for("the first ack", Duration::from_secs(10), || {
        acked.load(Ordering::Relaxed) > 0
    })
    .await;
    let base = base.load(Ordering::Relaxed);
    let mut last = None;
    while last.is_none_or(|s| s < base + 40) {
        match stream.next(Duration::from_secs(10)).await {
            Some(EdgeFrame::Joined { recent, .. }) => last = recent.last().map(|m| m.seq).or(last),
            Some(EdgeFrame::Batch(b)) => last = b.messages.last().map(|m| m.seq).or(last),
            other => panic!("expected Joined or batches, got {other:?}"),
        }
    }
    let last = last.expect("a message");
    first.conn.close(0u32.into(), b"gone");
    drop(stream);
    // Twenty messages go by while it is away: fewer than the ring holds.
    wait_for("messages to go by", Duration::from_secs(20), || {
        acked.load(Ordering::Relaxed) >= last - base + 20
    })
    .await;

    let mut again = RawSession::hello(&edge, token).await;
    let mut stream = again.join("show", Some(last)).await;
    let mut wire = Vec::new();
    match stream.next(Duration::from_secs(10)).await {
        Some(EdgeFrame::Joined { recent, .. }) => wire.extend(recent),
        other => panic!("expected Joined, got {other:?}"),
    }
    assert!(wire.len() >= 20, "the ring gave {} of the missed messages", wire.len());
    while wire.last().is_none_or(|m| m.seq < base + 200) {
        match stream.next(Duration::from_secs(10)).await {
            Some(EdgeFrame::Batch(b)) => wire.extend(b.messages),
            other => panic!("expected batches up to seq 200, got {other:?}"),
        }
    }
    streaming.await.expect("sender");
    let seqs: Vec<u64> = wire.iter().map(|m| m.seq).collect();
    let expected: Vec<u64> = (last + 1..=base + 200).collect();
    assert_eq!(seqs, expected, "ring then live: no duplicate, no gap at the seam");
    let bodies: Vec<Vec<u8>> = wire.iter().map(|m| m.body.clone()).collect();
    let want: Vec<Vec<u8>> = (last - base..200).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(bodies, want);
}

/// A disk that falls behind makes group rooms refuse new messages with
/// `ServerBusy` instead of holding ever more acked, uncommitted messages in
/// memory; once the log catches up they are accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_room_refuses_messages_while_its_log_is_behind() {
    let edge = TestEdge::start(|c| {
        c.rooms.group_rooms = vec!["group-*".into()];
        // A slow disk: commits every 8 s (long enough for the first six
        // sends on a loaded machine), and at most 5 messages waiting.
        c.storage.commit_interval = Duration::from_secs(8);
        c.storage.max_queued = 5;
    })
    .await;
    let member = edge.client("acme", "member", "viewer").await;
    let mut room = member.join("group-busy").await.expect("join");
    let sender = edge.client("acme", "lead", "viewer").await;
    let _own = sender.join("group-busy").await.expect("join");
    // Acked means stored: the five are answered only once they are
    // committed, so they are sent without waiting for their acks.
    let mut pending = Vec::new();
    for i in 0..5 {
        pending.push(
            sender
                .submit("group-busy", Kind::Chat, format!("m{i}"))
                .await
                .expect("sent"),
        );
    }
    let stats = edge.edge.log_stats();
    let start = std::time::Instant::now();
    while stats.queued_messages.load(std::sync::atomic::Ordering::Relaxed) < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the five never reached the log"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = sender
        .send("group-busy", Kind::Chat, "refused")
        .await
        .expect_err("the log is 5 messages behind");
    assert_eq!(refused.code(), Some(throng_wire::ErrorCode::ServerBusy), "{refused}");
    assert_eq!(stats.refused.load(std::sync::atomic::Ordering::Relaxed), 1);
    for p in pending {
        p.ack().await.expect("acked once the log commits");
    }

    // The commit lands; messages are taken again.
    let start = std::time::Instant::now();
    while stats.queued_messages.load(std::sync::atomic::Ordering::Relaxed) > 0 {
        assert!(start.elapsed() < Duration::from_secs(20), "the log never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sender
        .send("group-busy", Kind::Chat, "m5")
        .await
        .expect("ack once the log caught up");
    let got: Vec<String> = take(&mut room, 6, Duration::from_secs(5))
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4", "m5"]);
}

fn bodies(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

fn names(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

/// Group membership persists, with each member's cursor (what it reported
/// with `Seen`): a member coming back without a sequence of its own (another
/// device, a restarted app), even across an edge restart, gets exactly what
/// came after its cursor; a member that never reported gets everything since
/// it first joined; a full group refuses new members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_resume_from_their_reported_cursor_across_restarts() {
    let edge = TestEdge::start(|c| {
        c.rooms.group_rooms = vec!["group-*".into()];
        // Joined then carries no recent messages: all that arrives is resume.
        c.rooms.recent_messages = 0;
        c.rooms.group_max_members = 3;
    })
    .await;
    let lead = edge.client("acme", "lead", "viewer").await;
    let _lead_room = lead.join("group-crew").await.expect("join");
    let ann = edge.client("acme", "ann", "viewer").await;
    let mut ann_room = ann.join("group-crew").await.expect("join");
    let bob = edge.client("acme", "bob", "viewer").await;
    let bob_room = bob.join("group-crew").await.expect("join");
    // A join answered is a member recorded (and counted).
    let eve = edge.client("acme", "eve", "viewer").await;
    let full = eve.join("group-crew").await.expect_err("a fourth member");
    assert_eq!(full.code(), Some(throng_wire::ErrorCode::RoomFull), "{full}");

    for i in 0..10 {
        lead.send("group-crew", Kind::Chat, format!("m{i}")).await.expect("ack");
    }
    let got = take(&mut ann_room, 10, Duration::from_secs(5)).await;
    assert_eq!(bodies(&got), names(0..10));
    // Ann processed five of them, says so, and goes away; so does Bob,
    // without ever saying anything.
    ann.seen("group-crew", got[4].seq).await.expect("seen");
    ann.ping().await.expect("the edge read Seen");
    ann.close();
    bob.close();
    drop((ann_room, bob_room));
    for i in 10..15 {
        lead.send("group-crew", Kind::Chat, format!("m{i}")).await.expect("ack");
    }
    lead.close();

    // Members and cursors are on disk: they survive a restart.
    let edge = edge.restart().await;
    let ann = edge.client("acme", "ann", "viewer").await;
    let mut ann_room = ann.join("group-crew").await.expect("a member rejoins");
    let got = take(&mut ann_room, 10, Duration::from_secs(5)).await;
    assert_eq!(bodies(&got), names(5..15), "ann resumes after her cursor");
    let bob = edge.client("acme", "bob", "viewer").await;
    let mut bob_room = bob.join("group-crew").await.expect("a member rejoins");
    let got = take(&mut bob_room, 15, Duration::from_secs(5)).await;
    assert_eq!(bodies(&got), names(0..15), "bob gets all since he joined");
    // Then live, once each.
    let lead = edge.client("acme", "lead", "viewer").await;
    let _lead_room = lead.join("group-crew").await.expect("join");
    lead.send("group-crew", Kind::Chat, "m15").await.expect("ack");
    for room in [&mut ann_room, &mut bob_room] {
        let (live, _) = collect(room, 1, Duration::from_secs(5)).await;
        assert_eq!(bodies(&live), ["m15"]);
    }
}
