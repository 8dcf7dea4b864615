//! Tenant filters end to end over real QUIC with real components: warm at
//! load, `on_failure` closed and open, budgets that scale with the batch,
//! quarantine that ends, the instance pool kept for filters, and the disk
//! cache of compiled modules.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use throng_client::{Client, ClientError, RoomStream};
use throng_edge::filter::OnFailure;
use throng_edge::wasm::{Budget, ModuleHash};
use throng_tests::{TestEdge, builtin, builtin_policy, collect, test_module};
use throng_wire::{ErrorCode, Kind};

/// A viewer and a sender of `acme` in `room`.
async fn pair(edge: &TestEdge, room: &str) -> (Client, RoomStream, Client, RoomStream) {
    let viewer = edge.client("acme", "v", "viewer").await;
    let stream = viewer.join(room).await.expect("viewer joins");
    let sender = edge.client("acme", "s", "viewer").await;
    let own = sender.join(room).await.expect("sender joins");
    (viewer, stream, sender, own)
}

fn code(e: &ClientError) -> Option<ErrorCode> {
    e.code()
}

/// Bodies a viewer got within `quiet` of silence.
async fn bodies(room: &mut RoomStream, quiet: Duration) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(Some(Ok(b))) = tokio::time::timeout(quiet, room.next_batch()).await {
        out.extend(b.messages.iter().map(|m| String::from_utf8_lossy(&m.body).into_owned()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_slow_to_start_is_warmed_at_load_and_judges_the_first_batch() {
    // 100 ms of start-up against a 50 ms call budget: on the tick path
    // this would fail every first batch.
    let filter = test_module("filter-slow-start", &[("startup_ms", "100")]);
    let edge = TestEdge::start(|c| {
        c.wasm.budget = Budget::Epoch(Duration::from_millis(50));
        c.filters.insert("acme".into(), vec![filter.clone()]);
    })
    .await;
    let stats = edge.edge.wasm_stats();
    // The instance and its spare exist before any room does.
    assert_eq!(stats.instantiations.load(Ordering::Relaxed), 2);
    let (_v, mut room, sender, _o) = pair(&edge, "lobby").await;
    sender
        .send("lobby", Kind::Chat, "first")
        .await
        .expect("judged and accepted");
    let err = sender.send("lobby", Kind::Chat, "a bad one").await.expect_err("judged");
    assert_eq!(code(&err), Some(ErrorCode::Filtered), "{err}");
    let (got, _) = collect(&mut room, 1, Duration::from_secs(5)).await;
    assert_eq!(got[0].body, b"first");
    assert_eq!(stats.filter_failures.load(Ordering::Relaxed), 0);
    assert_eq!(stats.filter_unjudged.load(Ordering::Relaxed), 0);
    edge.edge.shutdown().await;

    // The instantiation budget is real: below the start-up time, the edge
    // refuses to start and names the filter.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = throng_edge::Config::parse(throng_tests::TEST_CONFIG, "TEST_CONFIG", dir.path()).expect("config");
    config.data_dir = dir.path().to_owned();
    config.wasm.instantiate_budget = Duration::from_millis(10);
    config.filters.insert("acme".into(), vec![filter]);
    let err = throng_edge::Edge::start(config).await.expect_err("too slow to start");
    let text = err.to_string();
    assert!(
        text.contains("test.filter-slow-start") && text.contains("budget"),
        "{text}"
    );
}

/// A burst of `n` messages into one room (ticking every 200 ms, so a batch
/// holds many) through `filter-slow` (500 µs per message), with a fixed
/// budget of 20 ms and `per_message` allowance; returns (accepted,
/// unavailable, delivered bodies, filter failures).
async fn burst(per_message: Duration, n: usize) -> (usize, usize, Vec<String>, u64) {
    let edge = TestEdge::start(|c| {
        throng_tests::set_tick(c, Duration::from_millis(200));
        c.wasm.budget = Budget::Epoch(Duration::from_millis(20));
        c.wasm.budget_per_message = per_message;
        c.filters.insert(
            "acme".into(),
            vec![test_module("filter-slow", &[("per_message_us", "500")])],
        );
    })
    .await;
    let (_v, mut room, sender, _o) = pair(&edge, "busy").await;
    let mut pending = Vec::new();
    for i in 0..n {
        pending.push(
            sender
                .submit("busy", Kind::Chat, format!("m{i}"))
                .await
                .expect("submit"),
        );
    }
    let (mut accepted, mut unavailable) = (0, 0);
    for p in pending {
        match p.ack().await {
            Ok(_) => accepted += 1,
            Err(e) if code(&e) == Some(ErrorCode::FilterUnavailable) => unavailable += 1,
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    let delivered = bodies(&mut room, Duration::from_millis(500)).await;
    let failures = edge.edge.wasm_stats().filter_failures.load(Ordering::Relaxed);
    edge.edge.shutdown().await;
    (accepted, unavailable, delivered, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_slow_filter_is_not_tripped_by_a_busy_room_and_closed_never_leaks() {
    const N: usize = 200;
    // 500 µs of work per message; 2 ms allowed per message besides the
    // fixed 20 ms, so any batch fits even with both cores busy elsewhere.
    let (accepted, unavailable, delivered, failures) = burst(Duration::from_millis(2), N).await;
    assert_eq!((accepted, unavailable, failures), (N, 0, 0));
    let expected: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(delivered, expected, "every message judged and delivered, in order");

    // The control: the fixed 20 ms alone cannot judge a batch of dozens at
    // 500 µs each. Closed: every message of a failed batch is refused with
    // the typed code and none reaches the viewer unjudged.
    let (accepted, unavailable, delivered, failures) = burst(Duration::ZERO, N).await;
    assert!(failures >= 1, "the filter overran the fixed budget");
    assert!(unavailable >= 1, "failed batches are refused");
    assert_eq!(accepted + unavailable, N);
    assert_eq!(delivered.len(), accepted, "only judged messages are delivered");
}

async fn trap_edge(on_failure: OnFailure, tweak: impl FnOnce(&mut throng_edge::Config)) -> TestEdge {
    let mut filter = test_module("filter-trap", &[]);
    filter.on_failure = on_failure;
    TestEdge::start(|c| {
        // Generous: these tests are about traps, not time, and must pass
        // with both cores busy elsewhere.
        c.wasm.budget = Budget::Epoch(Duration::from_millis(200));
        c.filters.insert("acme".into(), vec![filter]);
        tweak(c);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_rejects_an_unjudged_batch_with_a_typed_code_and_the_spare_takes_over() {
    let edge = trap_edge(OnFailure::Closed, |_| {}).await;
    let (_v, mut room, sender, _o) = pair(&edge, "lobby").await;
    sender.send("lobby", Kind::Chat, "fine").await.expect("ack");
    let err = sender.send("lobby", Kind::Chat, "boom").await.expect_err("unjudged");
    assert_eq!(code(&err), Some(ErrorCode::FilterUnavailable), "{err}");
    assert!(!ErrorCode::FilterUnavailable.is_fatal());
    // The very next batch is judged by the spare instance.
    sender
        .send("lobby", Kind::Chat, "after")
        .await
        .expect("judged by the spare");
    sender.ping().await.expect("the sender's connection is fine");
    assert_eq!(bodies(&mut room, Duration::from_millis(500)).await, ["fine", "after"]);
    let stats = edge.edge.wasm_stats();
    assert_eq!(stats.filter_failures.load(Ordering::Relaxed), 1);
    assert_eq!(stats.filter_unjudged.load(Ordering::Relaxed), 1);
    let hash = ModuleHash::of(throng_test_modules::FILTER_TRAP);
    assert!(
        stats
            .recent_failures()
            .iter()
            .any(|f| f.module == hash && f.label == "acme")
    );
    edge.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_passes_an_unjudged_batch_on_and_counts_it() {
    let edge = trap_edge(OnFailure::Open, |_| {}).await;
    let (_v, mut room, sender, _o) = pair(&edge, "lobby").await;
    sender.send("lobby", Kind::Chat, "fine").await.expect("ack");
    sender
        .send("lobby", Kind::Chat, "boom")
        .await
        .expect("open lets it through");
    sender.send("lobby", Kind::Chat, "after").await.expect("ack");
    assert_eq!(
        bodies(&mut room, Duration::from_millis(500)).await,
        ["fine", "boom", "after"]
    );
    let stats = edge.edge.wasm_stats();
    assert_eq!(stats.filter_failures.load(Ordering::Relaxed), 1);
    assert_eq!(stats.filter_unjudged.load(Ordering::Relaxed), 1);
    edge.edge.shutdown().await;
}

/// Sends `body` until the edge accepts it (or `limit` passes); returns when.
async fn accepted_again(sender: &Client, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    let mut i = 0u32;
    loop {
        i += 1;
        match sender.send("lobby", Kind::Chat, format!("hello{i}")).await {
            Ok(_) => return Instant::now(),
            Err(e) => {
                assert_eq!(code(&e), Some(ErrorCode::FilterUnavailable), "{e}");
                assert!(Instant::now() < deadline, "still refused after {limit:?}");
            }
        }
        // Spaced out so the log stays readable; not a barrier.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_ends_after_a_cool_down_that_doubles_and_shows_in_stats() {
    throng_edge::admin::install_prometheus().expect("the only recorder of this test process");
    let cooldown = Duration::from_millis(800);
    let edge = trap_edge(OnFailure::Closed, |c| {
        c.admin = Some("127.0.0.1:0".parse().expect("addr"));
        c.wasm.quarantine_after = 2;
        c.wasm.quarantine_cooldown = cooldown;
        c.wasm.quarantine_cooldown_max = Duration::from_secs(60);
    })
    .await;
    let (_v, _room, sender, _o) = pair(&edge, "lobby").await;
    let stats = edge.edge.wasm_stats();
    let hash = ModuleHash::of(throng_test_modules::FILTER_TRAP);

    for round in 1..=2u32 {
        for _ in 0..2 {
            let e = sender.send("lobby", Kind::Chat, "boom").await.expect_err("trap");
            assert_eq!(code(&e), Some(ErrorCode::FilterUnavailable));
        }
        let quarantined_at = Instant::now();
        let q = stats.quarantined();
        assert_eq!(q.len(), 1, "{q:?}");
        assert_eq!((q[0].kind, q[0].tenant.as_str(), q[0].module), ("filter", "acme", hash));
        assert_eq!(q[0].level, round);
        let e = sender
            .send("lobby", Kind::Chat, "clean")
            .await
            .expect_err("quarantined");
        assert!(e.to_string().contains("quarantined"), "{e}");

        // /stats shows it, per tenant and module.
        let admin = edge.edge.admin_addr().expect("admin");
        let get = |path: &'static str| {
            tokio::task::spawn_blocking(move || {
                ureq::get(&format!("http://{admin}{path}"))
                    .header("Authorization", format!("Bearer {}", throng_tests::OPERATOR_KEY))
                    .call()
                    .expect("admin answers")
                    .body_mut()
                    .read_to_string()
                    .expect("body")
            })
        };
        let json: serde_json::Value = serde_json::from_str(&get("/stats").await.expect("task")).expect("JSON");
        let shown = &json["wasm"]["quarantined"][0];
        assert_eq!(shown["tenant"], "acme", "{json:#}");
        assert_eq!(shown["module"], hash.hex(), "{json:#}");
        assert_eq!(shown["kind"], "filter", "{json:#}");
        // And in metrics, labelled with tenant and module.
        let metrics = get("/metrics").await.expect("task");
        let labels = format!("{{kind=\"filter\",tenant=\"acme\",module=\"{}\"}}", hash.short());
        assert!(
            metrics.contains(&format!("throng_wasm_quarantined{labels} 1"))
                && metrics.contains(&format!("throng_wasm_quarantines_total{labels} {round}")),
            "{metrics}"
        );

        // A tenant's administrator sees its own quarantine, and another
        // tenant's sees nothing of it, in /stats and in /metrics; without
        // a key, /metrics carries no tenant's series at all.
        if round == 1 {
            let as_caller = |path: &'static str, bearer: Option<String>| {
                tokio::task::spawn_blocking(move || {
                    let mut req = ureq::get(&format!("http://{admin}{path}"));
                    if let Some(b) = bearer {
                        req = req.header("Authorization", format!("Bearer {b}"));
                    }
                    req.call()
                        .expect("admin answers")
                        .body_mut()
                        .read_to_string()
                        .expect("body")
                })
            };
            let acme = edge.token("acme", "a", "tenant-admin", "*");
            let globex = edge.token("globex", "g", "tenant-admin", "*");
            let own: serde_json::Value =
                serde_json::from_str(&as_caller("/stats", Some(acme.clone())).await.expect("task")).expect("JSON");
            assert_eq!(own["quarantined"][0]["module"], hash.hex(), "{own:#}");
            assert_eq!(own["tenant"], "acme", "{own:#}");
            assert!(own.get("process").is_none() && own.get("cluster").is_none(), "{own:#}");
            let other: serde_json::Value =
                serde_json::from_str(&as_caller("/stats", Some(globex.clone())).await.expect("task")).expect("JSON");
            assert_eq!(other["quarantined"], serde_json::json!([]), "{other:#}");
            assert_eq!(other["rooms"], 0, "{other:#}");
            let mine = as_caller("/metrics", Some(acme)).await.expect("task");
            assert!(mine.contains(&format!("throng_wasm_quarantined{labels} 1")), "{mine}");
            for text in [
                as_caller("/metrics", Some(globex)).await.expect("task"),
                as_caller("/metrics", None).await.expect("task"),
            ] {
                assert!(!text.contains("tenant=\"acme\""), "{text}");
                assert!(text.contains("throng_connections_total"), "{text}");
            }
        }

        // The cool-down doubles: 0.8 s, then 1.6 s.
        let expected = cooldown * (1 << (round - 1));
        let back = accepted_again(&sender, expected + Duration::from_secs(10)).await;
        let waited = back.duration_since(quarantined_at);
        assert!(
            waited + Duration::from_millis(50) >= expected,
            "round {round}: back after {waited:?}, cool-down {expected:?}"
        );
        assert!(stats.quarantined().is_empty());
        let metrics = get("/metrics").await.expect("task");
        assert!(
            metrics.contains(&format!("throng_wasm_quarantined{labels} 0")),
            "{metrics}"
        );
    }
    assert_eq!(stats.quarantines.load(Ordering::Relaxed), 2);
    edge.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_exhausting_the_pool_cannot_take_a_filters_place() {
    // The pool keeps 64 places for filters besides the configured ones'
    // two each (instance and spare): 80 leaves 14 for rooms.
    let edge = TestEdge::start(|c| {
        c.wasm.max_instances = 80;
        c.wasm.budget = Budget::Epoch(Duration::from_millis(200));
        c.limits.room_create_burst = 1_000;
        // acme alone: a lone tenant may take every room place.
        c.tenants.remove("globex");
        c.policies
            .push(builtin_policy("*", "policy-default", &[("cap_per_sec", "0")]));
        c.filters.insert(
            "acme".into(),
            vec![builtin("filter-keywords", &[("words", "scam"), ("mode", "mask")])],
        );
    })
    .await;
    // Four rooms per connection: 20 rooms asked for on 5 connections, more
    // than the pool has places for policies.
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    let (mut joined, mut refused) = (Vec::new(), 0);
    for c in 0..5 {
        let client = edge.client("acme", &format!("u{c}"), "viewer").await;
        for r in 0..4 {
            let name = format!("room{c}-{r}");
            match client.join(&name).await {
                Ok(s) => {
                    streams.push(s);
                    joined.push((c, name));
                }
                Err(e) => {
                    assert_eq!(e.code(), Some(throng_wire::ErrorCode::RoomLimit), "{e}");
                    refused += 1;
                }
            }
        }
        clients.push(client);
    }
    assert_eq!((joined.len(), refused), (14, 6), "the newcomers are refused, typed");
    // Every room that got in runs its module; the filter kept its places.
    for (c, name) in &joined {
        clients[*c].send(name, Kind::Chat, "no scam here").await.expect("ack");
    }
    let (c, name) = &joined[13];
    let viewer = edge.client("acme", "v", "viewer").await;
    let mut room = viewer.join(name).await.expect("join a live room");
    clients[*c].send(name, Kind::Chat, "no scam here").await.expect("ack");
    let (got, _) = collect(&mut room, 1, Duration::from_secs(5)).await;
    assert_eq!(got[0].body, b"no **** here", "the filter kept its instance");
    let stats = edge.edge.wasm_stats();
    assert_eq!(stats.filter_failures.load(Ordering::Relaxed), 0);
    assert_eq!(
        stats.fallback_ticks.load(Ordering::Relaxed),
        0,
        "no room lacked its policy"
    );
    drop(streams);
    edge.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_takes_compiled_modules_from_the_disk_cache() {
    let edge = TestEdge::start(|c| {
        c.wasm.budget = Budget::Epoch(Duration::from_millis(200));
        c.policies
            .push(builtin_policy("*", "policy-default", &[("cap_per_sec", "0")]));
        c.filters.insert(
            "acme".into(),
            vec![builtin("filter-keywords", &[("words", "scam"), ("mode", "mask")])],
        );
    })
    .await;
    let load = |e: &TestEdge| {
        let s = e.edge.wasm_stats();
        (
            s.compilations.load(Ordering::Relaxed),
            s.cache_hits.load(Ordering::Relaxed),
        )
    };
    assert_eq!(load(&edge), (2, 0), "a fresh data dir compiles both modules");
    let edge = edge.restart().await;
    assert_eq!(load(&edge), (0, 2), "a restart compiles nothing");

    // A damaged entry is refused, recompiled and rewritten, never used.
    let cache = edge.config.data_dir.join("cache");
    let entry = std::fs::read_dir(&cache)
        .expect("cache dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .expect("a cache entry");
    let mut bytes = std::fs::read(&entry).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&entry, bytes).expect("write");
    let edge = edge.restart().await;
    assert_eq!(load(&edge), (1, 1));

    // And the modules work.
    let (_v, mut room, sender, _o) = pair(&edge, "lobby").await;
    sender.send("lobby", Kind::Chat, "a scam").await.expect("ack");
    let (got, _) = collect(&mut room, 1, Duration::from_secs(5)).await;
    assert_eq!(got[0].body, b"a ****");
    edge.edge.shutdown().await;
}
