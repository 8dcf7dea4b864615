//! Wasm room modules end to end: real QUIC, real components from modules/.
//!
//! Used here: policy-default (cap test, hot swap), filter-keywords (tenant
//! filter) and the four hostile policies. The failing and slow filters
//! (filter-trap, filter-slow, filter-slow-start) are in filters.rs.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use throng_edge::config::PolicyChoice;
use throng_edge::wasm::{Budget, ModuleHash};
use throng_tests::{TestEdge, builtin, builtin_policy, captured_logs, collect, log_text, test_policy, viewers};
use throng_wire::{Batch, ErrorCode, Kind};

/// Receives batches until the room is quiet for `quiet`.
async fn drain(room: &mut throng_client::RoomStream, quiet: Duration) -> Vec<Batch> {
    let mut out = Vec::new();
    while let Ok(Some(Ok(b))) = tokio::time::timeout(quiet, room.next_batch()).await {
        out.push(b);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_holds_for_300_viewers_under_1000_messages_a_second() {
    const CAP: usize = 20;
    let edge = TestEdge::start(|c| {
        throng_tests::set_tick(c, Duration::from_millis(50));
        c.policies
            .push(builtin_policy("*", "policy-default", &[("cap_per_sec", "20")]));
    })
    .await;
    let mut audience = viewers(&edge, "acme", "show", 300).await;
    let sender = edge.client("acme", "host", "host").await;
    let _own = sender.join("show").await.expect("join");

    let mut pending = Vec::new();
    let (mut hosts, mut likes) = (0u64, 0u64);
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    for step in 0..500u64 {
        ticker.tick().await;
        for i in 0..10 {
            pending.push(
                sender
                    .submit("show", Kind::Chat, format!("c{step}-{i}"))
                    .await
                    .expect("chat"),
            );
        }
        pending.push(sender.submit("show", Kind::Like, "").await.expect("like"));
        likes += 1;
        if step % 25 == 0 {
            pending.push(
                sender
                    .submit("show", Kind::Host, format!("host {hosts}"))
                    .await
                    .expect("host"),
            );
            hosts += 1;
        }
    }
    let sending = start.elapsed();
    for p in pending {
        p.ack().await.expect("every message is acked");
    }

    let tasks: Vec<_> = audience
        .drain(..)
        .map(|(c, mut r)| {
            tokio::spawn(async move {
                let batches = drain(&mut r, Duration::from_secs(2)).await;
                drop(c);
                batches
            })
        })
        .collect();
    for (v, t) in tasks.into_iter().enumerate() {
        let batches = t.await.expect("viewer task");
        assert!(batches.iter().all(|b| b.missed == 0), "viewer {v} missed batches");
        // Ticks are 50 ms: 20 consecutive ticks are one second.
        // (messages, host messages) per tick.
        let mut per_tick: HashMap<u64, (usize, usize)> = HashMap::new();
        for b in &batches {
            let e = per_tick.entry(b.tick).or_default();
            e.0 += b.messages.len();
            e.1 += b.messages.iter().filter(|m| m.kind == Kind::Host).count();
        }
        let last = per_tick.keys().max().copied().unwrap_or(0);
        for first in 0..=last {
            let (n, hosts_in) = (first..first + 20)
                .map(|t| per_tick.get(&t).copied().unwrap_or((0, 0)))
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            // Host messages are never dropped; the policy keeps as many
            // places as the last second had host messages, plus one. So the
            // cap holds while the host rate grows by at most one a second;
            // this sender's four a second bunch up on a loaded machine, and
            // each host message beyond that growth may take the second over
            // by one (README, the cap).
            let hosts_before: usize = (first.saturating_sub(20)..first)
                .map(|t| per_tick.get(&t).map_or(0, |e| e.1))
                .sum();
            let allowed = CAP + hosts_in.saturating_sub(hosts_before + 1);
            assert!(
                n <= allowed,
                "viewer {v}: {n} messages ({hosts_in} from the host, {hosts_before} the second before) in the second from tick {first}"
            );
        }
        let host_seen = batches
            .iter()
            .flat_map(|b| &b.messages)
            .filter(|m| m.kind == Kind::Host)
            .count();
        assert_eq!(host_seen as u64, hosts, "viewer {v}: every host message arrives");
        let like_total: u64 = batches.iter().map(|b| b.counters.likes).sum();
        assert_eq!(like_total, likes, "viewer {v}: likes arrive as counters");
        let chats = batches
            .iter()
            .flat_map(|b| &b.messages)
            .filter(|m| m.kind == Kind::Chat)
            .count();
        assert!(chats > 0, "viewer {v}: some chat gets through");
    }
    assert!(
        sending < Duration::from_secs(8),
        "the sender kept its rate: {sending:?} for 5 s of traffic"
    );
    // The Wasm policy made every plan: a fallback to the native one would
    // pass the checks above too.
    let stats = edge.edge.wasm_stats();
    assert_eq!(stats.fallback_ticks.load(Ordering::Relaxed), 0, "no tick fell back");
    assert_eq!(stats.policy_failures.load(Ordering::Relaxed), 0);
    assert_eq!(
        stats.instantiations.load(Ordering::Relaxed),
        2,
        "the trial `configure` at load, then the room's one instance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_keyword_filter_rejects_with_its_reason_and_spares_other_tenants() {
    let edge = TestEdge::start(|c| {
        c.filters.insert(
            "acme".into(),
            vec![
                builtin("filter-keywords", &[("words", "banned,forbidden"), ("mode", "reject")]),
                builtin("filter-keywords", &[("words", "darn"), ("mode", "mask")]),
            ],
        );
    })
    .await;
    let acme_viewer = edge.client("acme", "v", "viewer").await;
    let mut acme_room = acme_viewer.join("lobby").await.expect("join");
    let acme = edge.client("acme", "s", "viewer").await;
    let _a = acme.join("lobby").await.expect("join");

    let err = acme
        .send("lobby", Kind::Chat, "this is Banned talk")
        .await
        .expect_err("filtered");
    assert_eq!(err.code(), Some(ErrorCode::Filtered), "{err}");
    assert!(
        err.to_string().contains("banned"),
        "the reason reaches the sender: {err}"
    );
    acme.send("lobby", Kind::Chat, "darn it")
        .await
        .expect("masked, not rejected");
    acme.send("lobby", Kind::Chat, "all fine").await.expect("clean message");
    let (got, _) = collect(&mut acme_room, 2, Duration::from_secs(5)).await;
    let bodies: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    assert_eq!(bodies, vec!["**** it", "all fine"]);

    let globex_viewer = edge.client("globex", "v", "viewer").await;
    let mut globex_room = globex_viewer.join("lobby").await.expect("join");
    let globex = edge.client("globex", "s", "viewer").await;
    let _g = globex.join("lobby").await.expect("join");
    globex
        .send("lobby", Kind::Chat, "banned darn words")
        .await
        .expect("globex has no filter");
    let (got, _) = collect(&mut globex_room, 1, Duration::from_secs(5)).await;
    assert_eq!(got[0].body, b"banned darn words");
}

/// One hostile policy in room `bad` beside policy-default in room `good`;
/// `budget` and `memory` are the per-call limits, `expect` a word of the
/// failure reason.
async fn hostile_case(module: &'static str, bytes: &'static [u8], budget: Duration, memory: usize, expect: &str) {
    let edge = TestEdge::start(|c| {
        c.wasm.budget = Budget::Epoch(budget);
        c.wasm.policy_memory_bytes = memory;
        c.policies.push(test_policy("bad", module, &[]));
        c.policies
            .push(builtin_policy("*", "policy-default", &[("cap_per_sec", "0")]));
    })
    .await;
    let bad_viewer = edge.client("acme", "bv", "viewer").await;
    let mut bad = bad_viewer.join("bad").await.expect("join bad");
    let good_viewer = edge.client("acme", "gv", "viewer").await;
    let mut good = good_viewer.join("good").await.expect("join good");
    let sender = edge.client("acme", "s", "host").await;
    let _b = sender.join("bad").await.expect("join");
    let _g = sender.join("good").await.expect("join");

    const N: usize = 40;
    let mut worst = [Duration::ZERO; 2];
    for i in 0..N {
        for (r, (name, room)) in [("bad", &mut bad), ("good", &mut good)].into_iter().enumerate() {
            let sent = Instant::now();
            sender.send(name, Kind::Chat, format!("{name}{i}")).await.expect("ack");
            let (got, _) = collect(room, 1, Duration::from_secs(5)).await;
            assert_eq!(got.len(), 1, "{module}: room {name} stopped delivering at message {i}");
            assert_eq!(got[0].body, format!("{name}{i}").into_bytes(), "{module}: room {name}");
            worst[r] = worst[r].max(sent.elapsed());
        }
    }
    // Generous bounds for a shared CI machine; the tick is 10 ms.
    assert!(
        worst[0] < Duration::from_secs(1),
        "{module}: bad room's worst latency {:?}",
        worst[0]
    );
    assert!(
        worst[1] < Duration::from_secs(1),
        "{module}: good room's worst latency {:?}",
        worst[1]
    );

    let stats = edge.edge.wasm_stats();
    let hash = ModuleHash::of(bytes);
    let failures: Vec<_> = stats
        .recent_failures()
        .into_iter()
        .filter(|f| f.module == hash)
        .collect();
    assert!(!failures.is_empty(), "{module}: no failure recorded");
    assert!(
        failures.iter().all(|f| f.label == "acme/bad"),
        "{module}: only the bad room fails"
    );
    assert!(
        stats.quarantines.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "{module}: quarantined after repeated failures"
    );
    assert!(
        stats.fallback_ticks.load(std::sync::atomic::Ordering::Relaxed) >= N as u64,
        "{module}: every tick fell back"
    );
    for f in &failures {
        assert!(
            f.reason.contains(expect),
            "{module}: expected `{expect}` in: {}",
            f.reason
        );
        if module == "hostile-loop" {
            assert!(
                f.elapsed <= budget + Duration::from_millis(10),
                "{module}: stopped {:?} after start; budget {budget:?}",
                f.elapsed
            );
        }
    }
    let logs = log_text();
    assert!(
        logs.lines()
            .any(|l| l.contains("policy module failed") && l.contains("acme/bad") && l.contains(&hash.short())),
        "{module}: the failure is logged with room and module hash"
    );
    edge.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_policies_fall_back_without_hurting_anyone() {
    captured_logs();
    // One after another, so each case has the machine to itself.
    use throng_test_modules as g;
    let ms = Duration::from_millis;
    hostile_case("hostile-loop", g::HOSTILE_LOOP, ms(5), 16 << 20, "budget").await;
    // A small memory limit and a long budget: the bomb must hit the limit.
    hostile_case("hostile-memory", g::HOSTILE_MEMORY, ms(500), 4 << 20, "trap").await;
    hostile_case("hostile-trap", g::HOSTILE_TRAP, ms(5), 16 << 20, "unreachable").await;
    // Room to build its absurd plan, so the host's checks are what stop it.
    hostile_case("hostile-plan", g::HOSTILE_PLAN, ms(2000), 64 << 20, "invalid plan").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_hot_swap_under_traffic_drops_no_viewer_and_no_host_message() {
    let edge = TestEdge::start(|c| {
        throng_tests::set_tick(c, Duration::from_millis(20));
        c.policies
            .push(builtin_policy("*", "policy-default", &[("cap_per_sec", "0")]));
    })
    .await;
    let mut audience = viewers(&edge, "acme", "show", 50).await;
    let sender = edge.client("acme", "host", "host").await;
    let _own = sender.join("show").await.expect("join");

    let swaps = {
        let mut second = edge.config.clone();
        if let PolicyChoice::Module(m) = &mut second.policies[0].policy {
            m.params = vec![("cap_per_sec".into(), "5".into())];
        }
        let mut third = edge.config.clone();
        third.policies.clear(); // back to the built-in native policy
        [second, third]
    };
    let mut hosts = 0u64;
    let mut pending = Vec::new();
    // A pace for the sender, not a barrier: 150 steps over about 1.5 s.
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    for step in 0..150u64 {
        pace.tick().await;
        pending.push(
            sender
                .submit("show", Kind::Host, format!("h{step}"))
                .await
                .expect("host"),
        );
        pending.push(
            sender
                .submit("show", Kind::Chat, format!("c{step}"))
                .await
                .expect("chat"),
        );
        hosts += 1;
        if step == 50 || step == 100 {
            // Every message so far is acked, so it was planned by the
            // policy before the swap.
            for p in pending.drain(..) {
                p.ack().await.expect("acked");
            }
            let generation = edge
                .edge
                .reload(&swaps[(step / 50 - 1) as usize])
                .await
                .expect("reload")
                .generation;
            assert_eq!(generation, step / 50 + 1);
        }
    }
    for p in pending {
        p.ack().await.expect("acked");
    }
    let tasks: Vec<_> = audience
        .drain(..)
        .map(|(c, mut r)| {
            tokio::spawn(async move {
                let batches = drain(&mut r, Duration::from_secs(2)).await;
                // Still connected after both swaps.
                let rtt = c.ping().await;
                (batches, rtt)
            })
        })
        .collect();
    for (v, t) in tasks.into_iter().enumerate() {
        let (batches, rtt) = t.await.expect("viewer task");
        rtt.unwrap_or_else(|e| panic!("viewer {v} lost its connection: {e}"));
        let bodies = |kind: Kind| -> Vec<String> {
            batches
                .iter()
                .flat_map(|b| &b.messages)
                .filter(|m| m.kind == kind)
                .map(|m| String::from_utf8_lossy(&m.body).into_owned())
                .collect()
        };
        let expected: Vec<String> = (0..hosts).map(|i| format!("h{i}")).collect();
        assert_eq!(
            bodies(Kind::Host),
            expected,
            "viewer {v}: every host message, in order, across both swaps"
        );
        // Each policy's params took effect: uncapped, then 5 a second (a
        // host message a step already spends it), then the native policy,
        // uncapped in the test config. The swap messages (c50, c100) may
        // fall either side.
        let chats = bodies(Kind::Chat);
        let shown = |range: std::ops::Range<u64>| range.filter(|i| chats.contains(&format!("c{i}"))).count();
        assert_eq!(shown(0..50), 50, "viewer {v}: cap 0 shows every chat: {chats:?}");
        let capped = shown(51..100);
        assert!(capped <= 10, "viewer {v}: cap 5 showed {capped} of 49 chats: {chats:?}");
        assert_eq!(shown(101..150), 49, "viewer {v}: the native policy shows every chat");
    }
    let stats = edge.edge.wasm_stats();
    assert_eq!(
        stats.instantiations.load(Ordering::Relaxed),
        4,
        "a trial `configure` at load and at the first swap, and the room's instance before and after it; failures: {:?}",
        stats.recent_failures()
    );
    assert_eq!(stats.fallback_ticks.load(Ordering::Relaxed), 0, "no tick fell back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_a_thousand_rooms_each_get_their_own_instance() {
    use std::sync::Arc;
    use throng_edge::wasm::{WasmRuntime, WasmSettings};
    // Each live store keeps its async fiber stack; the pool must have one per
    // instance, not a fixed 1,024.
    let runtime = WasmRuntime::new(WasmSettings {
        max_instances: 1200,
        // This is about the pool's capacity, not time: a loaded machine
        // must not fail `configure` on the default 5 ms wall-clock budget.
        budget: throng_edge::wasm::Budget::Epoch(std::time::Duration::from_secs(1)),
        ..WasmSettings::default()
    })
    .expect("runtime");
    let module = runtime
        .load_policy(throng_guest_artifacts::POLICY_DEFAULT)
        .expect("load");
    let mut rooms = Vec::new();
    for i in 0..1100 {
        let label: Arc<str> = Arc::from(format!("t/room{i}").as_str());
        let room = runtime
            .instantiate_policy(&module, label, vec![("cap_per_sec".into(), "20".into())])
            .await
            .unwrap_or_else(|f| panic!("room {i}: {}", f.reason));
        rooms.push(room);
    }
    assert_eq!(runtime.stats().instantiations.load(Ordering::Relaxed), 1100);
    // All of them live at once, each answering with its own plan: a host
    // message delivered and pinned, a chat delivered, a like counted.
    let mut inbound = throng_edge::policy::InboundBatch::with_capacity(3);
    inbound.push(1, Kind::Host, 4, 1_700_000_000_000, None);
    inbound.push(2, Kind::Chat, 4, 1_700_000_000_000, None);
    inbound.push(3, Kind::Like, 0, 1_700_000_000_000, None);
    for (i, room) in rooms.iter_mut().enumerate() {
        let stats = throng_edge::wasm::bindings::RoomStats {
            tick: 1,
            tick_ms: 50,
            elapsed_ms: 50,
            online: 10,
        };
        let plan = runtime
            .plan_tick(room, stats, &inbound)
            .await
            .unwrap_or_else(|f| panic!("room {i}: {}", f.reason));
        assert_eq!((plan.deliver, plan.pinned), (vec![0, 1], vec![0]), "room {i}");
        assert_eq!(plan.counters.likes, 1, "room {i}");
    }
}
