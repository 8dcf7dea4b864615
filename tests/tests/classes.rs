//! Size classes: a big room moves to a slower tick, and a small room's
//! latency stays low while the big one floods.

use std::time::{Duration, Instant};

use throng_edge::config::{PolicyChoice, PolicyRule, RoomClass};
use throng_tests::{TestEdge, captured_logs, collect, log_text, viewers};
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
            },
            RoomClass {
                name: "large".into(),
                min_members: 100,
                tick: Duration::from_millis(100),
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

    let flood = tokio::spawn(async move {
        let body = vec![b'x'; 100];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_secs(4) {
            for _ in 0..10 {
                let _ = flooder.submit("big", Kind::Chat, body.clone()).await;
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sent
    });

    let small_viewer = edge.client("acme", "sv", "viewer").await;
    let mut small = small_viewer.join("small").await.expect("join");
    let speaker = edge.client("acme", "sp", "viewer").await;
    let _sp = speaker.join("small").await.expect("join");
    tokio::time::sleep(Duration::from_millis(300)).await;
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

async fn futures_sum(tasks: Vec<tokio::task::JoinHandle<usize>>) -> usize {
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("reader");
    }
    total
}
