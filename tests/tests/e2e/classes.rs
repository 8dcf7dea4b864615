//! Size classes: a big room moves to a slower tick, and a small room's
//! latency stays low while the big one floods.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use throng_edge::config::{PolicyChoice, PolicyRule, RoomClass};
use throng_tests::{TestEdge, captured_logs, collect, log_text, viewers, wait_for};
use throng_wire::Kind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_room_stays_fast_while_a_large_room_floods() {
    captured_logs();
    let edge = TestEdge::start(|c| {
        c.rooms.classes = vec![
            RoomClass {
                name: "small".into(),
                min_members: 0,
                tick: Duration::from_millis(5),
                workers: 1,
                spread: Duration::ZERO,
            },
            RoomClass {
                name: "large".into(),
                min_members: 100,
                tick: Duration::from_millis(100),
                workers: 1,
                spread: Duration::ZERO,
            },
        ];
        // Large rooms run the native policy, everything else the Wasm one.
        c.policies = vec![
            PolicyRule {
                tenant: "*".into(),
                rooms: "*".into(),
                class: Some("large".into()),
                policy: PolicyChoice::Native { cap_per_sec: 0 },
            },
            throng_tests::builtin_policy("*", "policy-default", &[("cap_per_sec", "0")]),
        ];
    })
    .await;
    let mut big = viewers(&edge, "acme", "big", 300).await;
    let flooder = edge.client("acme", "f", "viewer").await;
    let mut own = flooder.join("big").await.expect("join");
    tokio::spawn(async move { while own.next_batch().await.is_some() {} });
    // Readers of the big room drain in the background.
    let readers: Vec<_> = big
        .drain(..)
        .map(|(c, mut r)| {
            tokio::spawn(async move {
                let mut n = 0usize;
                while let Ok(Some(Ok(b))) = tokio::time::timeout(Duration::from_secs(3), r.next_batch()).await {
                    n += b.messages.len();
                }
                drop(c);
                n
            })
        })
        .collect();

    let flooded = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&flooded);
    let flood = tokio::spawn(async move {
        let body = vec![b'x'; 100];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_secs(4) {
            for _ in 0..10 {
                let _ = flooder.submit("big", Kind::Chat, body.clone()).await;
                sent += 1;
            }
            counted.store(sent, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sent
    });

    let small_viewer = edge.client("acme", "sv", "viewer").await;
    let mut small = small_viewer.join("small").await.expect("join");
    let speaker = edge.client("acme", "sp", "viewer").await;
    let _sp = speaker.join("small").await.expect("join");
    // Measure once the big room is large and the flood is under way.
    wait_for(
        "the big room to move to the large class",
        Duration::from_secs(10),
        || class_moves("acme/big").iter().any(|l| l.contains("large")),
    )
    .await;
    wait_for("the flood to start", Duration::from_secs(10), || {
        flooded.load(Ordering::Relaxed) >= 100
    })
    .await;
    let mut latencies = Vec::new();
    for i in 0..100 {
        let t = Instant::now();
        speaker
            .submit("small", Kind::Chat, format!("s{i}"))
            .await
            .expect("submit");
        let (got, _) = collect(&mut small, 1, Duration::from_secs(2)).await;
        assert_eq!(got.len(), 1, "small room message {i} lost during the flood");
        latencies.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = flood.await.expect("flood");
    latencies.sort();
    let p99 = latencies[98];
    // The small room ticks every 5 ms; the bound is generous for shared CI.
    assert!(
        p99 < Duration::from_millis(150),
        "small room p99 {p99:?} during the flood"
    );
    let delivered: usize = futures_sum(readers).await;
    assert!(sent > 1000 && delivered > 0, "the flood was real: {sent} sent");
    let logs = log_text();
    assert!(
        logs.lines()
            .any(|l| l.contains("room changed size class") && l.contains("acme/big") && l.contains("large")),
        "the big room moved to the large class"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("room policy set") && l.contains("acme/big") && l.contains("Native")),
        "a class rule picked the big room's policy once it was large"
    );
}

/// A room that grows into the next class and shrinks back moves between the
/// classes' thread pools, and its viewers' writers move with it; in the
/// large class its pushes are paced while viewers join and leave. Viewers
/// that stay throughout get every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_follow_their_room_between_class_pools() {
    captured_logs();
    let edge = TestEdge::start(|c| {
        c.rooms.viewer_cap_per_sec = 0;
        // The large class paces its pushes, 4 viewers a step.
        c.rooms.pace_chunk = 4;
        c.rooms.classes = vec![
            RoomClass {
                name: "small".into(),
                min_members: 0,
                tick: Duration::from_millis(10),
                workers: 1,
                spread: Duration::ZERO,
            },
            RoomClass {
                name: "large".into(),
                min_members: 20,
                tick: Duration::from_millis(30),
                workers: 2,
                spread: Duration::from_millis(20),
            },
        ];
    })
    .await;
    const SENT: usize = 150;
    let stayers = viewers(&edge, "acme", "grow", 5).await;
    let readers: Vec<_> = stayers
        .into_iter()
        .map(|(c, mut r)| {
            tokio::spawn(async move {
                let (got, batches) = collect(&mut r, SENT, Duration::from_secs(20)).await;
                drop(c);
                (got, batches.iter().map(|b| b.missed).sum::<u64>())
            })
        })
        .collect();
    let speaker = edge.client("acme", "speaker", "viewer").await;
    let _own = speaker.join("grow").await.expect("join");
    let said = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&said);
    let send = tokio::spawn(async move {
        for i in 0..SENT {
            speaker
                .submit("grow", Kind::Chat, format!("m{i}"))
                .await
                .expect("submit");
            counted.store(i as u64 + 1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        speaker
    });
    // Grow past 20 members (up to the large pool), then shrink below 16
    // (back to the small one) while the speaker talks.
    wait_for("the speaker to start", Duration::from_secs(10), || {
        said.load(Ordering::Relaxed) >= 20
    })
    .await;
    let crowd = viewers(&edge, "acme", "grow", 30).await;
    wait_for("the room to move up", Duration::from_secs(10), || {
        class_moves("acme/grow").iter().any(|l| l.contains("large"))
    })
    .await;
    drop(crowd);
    wait_for("the room to move back down", Duration::from_secs(10), || {
        class_moves("acme/grow").iter().any(|l| l.contains("small"))
    })
    .await;
    let _speaker = send.await.expect("sender");
    for reader in readers {
        let (got, missed) = reader.await.expect("reader");
        let bodies: Vec<String> = got
            .iter()
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .collect();
        let want: Vec<String> = (0..SENT).map(|i| format!("m{i}")).collect();
        assert_eq!(missed, 0, "a stayer missed batches");
        assert_eq!(bodies, want, "a stayer lost, repeated or reordered messages");
        assert!(
            got.windows(2).all(|w| w[1].seq == w[0].seq + 1),
            "gap in sequence numbers"
        );
    }
    let moves = class_moves("acme/grow");
    assert_eq!(moves.len(), 2, "the room moved up and back down, once each: {moves:?}");
}

/// The captured log's size-class moves of `room` (`tenant/name`).
fn class_moves(room: &str) -> Vec<String> {
    log_text()
        .lines()
        .filter(|l| l.contains("room changed size class") && l.contains(room))
        .map(str::to_owned)
        .collect()
}

async fn futures_sum(tasks: Vec<tokio::task::JoinHandle<usize>>) -> usize {
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("reader");
    }
    total
}
