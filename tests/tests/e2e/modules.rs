//! Where modules come from and what they may do: `sha256:` references
//! checked against their bytes, paths that are not what they claim, fuel
//! budgets, and the WASI sandbox (no files, sockets or environment; stdout
//! and stderr go to the edge's log).

use std::sync::atomic::Ordering;
use std::time::Duration;

use throng_edge::config::{ModuleSource, ModuleUse, PolicyChoice, PolicyRule};
use throng_edge::filter::OnFailure;
use throng_edge::wasm::{Budget, ModuleHash};
use throng_tests::{TestEdge, builtin_policy, captured_logs, collect, log_text, test_module, test_policy};
use throng_wire::{ErrorCode, Kind};

fn policy_rule(key: &str, source: ModuleSource) -> PolicyRule {
    PolicyRule {
        tenant: "*".into(),
        rooms: "*".into(),
        class: None,
        policy: PolicyChoice::Module(ModuleUse {
            key: key.into(),
            source,
            params: vec![("cap_per_sec".into(), "0".into())],
            on_failure: OnFailure::Closed,
        }),
    }
}

/// Writes `bytes` to `<data_dir>/modules/<name>.wasm`.
fn store_module(data_dir: &std::path::Path, name: &str, bytes: &[u8]) {
    let dir = data_dir.join("modules");
    std::fs::create_dir_all(&dir).expect("modules dir");
    std::fs::write(dir.join(format!("{name}.wasm")), bytes).expect("write module");
}

/// Starts an edge on the test config with `rule`; its error text if it
/// refuses.
async fn start_error(rule: impl FnOnce(&std::path::Path) -> PolicyRule) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = throng_tests::test_config(dir.path());
    config.policies.push(rule(dir.path()));
    match throng_edge::Edge::start(config).await {
        Ok(edge) => {
            edge.shutdown().await;
            panic!("the edge started");
        }
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sha256_module_runs_only_if_its_bytes_have_that_hash() {
    let bytes = throng_guest_artifacts::POLICY_DEFAULT;
    let hex = ModuleHash::of(bytes).hex();

    // The right bytes under their hash: the room runs that module.
    let edge = TestEdge::start(|c| {
        store_module(&c.data_dir, &hex, bytes);
        c.policies
            .push(policy_rule("policy[0].module", ModuleSource::Hash(hex.clone())));
    })
    .await;
    let viewer = edge.client("acme", "v", "viewer").await;
    let mut room = viewer.join("show").await.expect("join");
    let sender = edge.client("acme", "s", "viewer").await;
    let _own = sender.join("show").await.expect("join");
    sender.send("show", Kind::Chat, "by hash").await.expect("ack");
    let (got, _) = collect(&mut room, 1, Duration::from_secs(5)).await;
    assert_eq!(got.first().map(|m| m.body.as_slice()), Some(&b"by hash"[..]));
    let stats = edge.edge.wasm_stats();
    assert_eq!(
        stats.instantiations.load(Ordering::Relaxed),
        2,
        "the module ran: its trial `configure` at load, then the room's instance"
    );
    assert_eq!(stats.fallback_ticks.load(Ordering::Relaxed), 0);
    edge.edge.shutdown().await;

    // Other bytes under that name: the edge refuses to start, naming the
    // key, the file and both hashes.
    let other = throng_guest_artifacts::FILTER_KEYWORDS;
    let err = start_error(|dir| {
        store_module(dir, &hex, other);
        policy_rule("policy[0].module", ModuleSource::Hash(hex.clone()))
    })
    .await;
    assert!(
        err.contains("policy[0].module")
            && err.contains(&format!("{hex}.wasm"))
            && err.contains("has hash")
            && err.contains(&ModuleHash::of(other).hex()[..12]),
        "{err}"
    );
    // No file under that hash at all.
    let err = start_error(|_| policy_rule("policy[0].module", ModuleSource::Hash(hex.clone()))).await;
    assert!(err.contains("policy[0].module") && err.contains("cannot read"), "{err}");

    // A reload to a wrong-hash module fails and changes nothing.
    let edge = TestEdge::start(|c| {
        c.policies
            .push(builtin_policy("*", "policy-default", &[("cap_per_sec", "0")]));
    })
    .await;
    let mut bad = edge.config.clone();
    store_module(&bad.data_dir, &hex, other);
    bad.policies = vec![policy_rule("policy[0].module", ModuleSource::Hash(hex.clone()))];
    let err = edge.edge.reload(&bad).await.expect_err("wrong hash").to_string();
    assert!(err.contains("has hash"), "{err}");
    let viewer = edge.client("acme", "v", "viewer").await;
    let mut room = viewer.join("show").await.expect("join");
    viewer.send("show", Kind::Chat, "still served").await.expect("ack");
    let (got, _) = collect(&mut room, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(edge.edge.wasm_stats().fallback_ticks.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_path_that_is_not_a_component_of_the_right_world_stops_the_start() {
    // Not Wasm at all.
    let err = start_error(|dir| {
        let path = dir.join("policy.wasm");
        std::fs::write(&path, b"#!/bin/sh\necho not wasm\n").expect("write");
        policy_rule("policy[0].module", ModuleSource::Path(path))
    })
    .await;
    assert!(err.contains("policy[0].module"), "{err}");
    // A real component, but a filter where a policy is wanted.
    let err = start_error(|_| {
        policy_rule(
            "policy[0].module",
            ModuleSource::Path(throng_guest_artifacts::FILTER_KEYWORDS_PATH.into()),
        )
    })
    .await;
    assert!(err.contains("policy[0].module"), "{err}");
    // A file that is gone.
    let err = start_error(|dir| policy_rule("policy[0].module", ModuleSource::Path(dir.join("gone.wasm")))).await;
    assert!(err.contains("policy[0].module") && err.contains("cannot read"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuel_budgets_stop_a_looping_policy_and_let_a_healthy_one_run() {
    let edge = TestEdge::start(|c| {
        c.wasm.budget = Budget::Fuel(5_000_000);
        c.policies.push(test_policy("bad", "hostile-loop", &[]));
        c.policies
            .push(builtin_policy("*", "policy-default", &[("cap_per_sec", "0")]));
    })
    .await;
    let viewer = edge.client("acme", "v", "viewer").await;
    let mut bad = viewer.join("bad").await.expect("join");
    let mut good = viewer.join("good").await.expect("join");
    let sender = edge.client("acme", "s", "host").await;
    let _b = sender.join("bad").await.expect("join");
    let _g = sender.join("good").await.expect("join");
    for i in 0..5 {
        for (name, room) in [("bad", &mut bad), ("good", &mut good)] {
            sender.send(name, Kind::Chat, format!("{name}{i}")).await.expect("ack");
            let (got, _) = collect(room, 1, Duration::from_secs(5)).await;
            assert_eq!(got.len(), 1, "room {name} delivers message {i}");
        }
    }
    let stats = edge.edge.wasm_stats();
    let loop_hash = ModuleHash::of(throng_test_modules::HOSTILE_LOOP);
    let failures: Vec<_> = stats
        .recent_failures()
        .into_iter()
        .filter(|f| f.module == loop_hash)
        .collect();
    assert!(!failures.is_empty(), "the loop was stopped");
    for f in &failures {
        assert_eq!(f.label, "acme/bad");
        assert!(f.reason.contains("fuel"), "out of fuel, not time: {}", f.reason);
    }
    // The healthy module's room never fell back: every fallback tick is
    // one of the loop's failures.
    assert_eq!(
        stats
            .recent_failures()
            .iter()
            .filter(|f| f.label == "acme/good")
            .count(),
        0
    );
}

/// 40 messages of 30,000 bytes (in a tick or two) through filter-keywords
/// with a fixed fuel budget of 100,000 and `per_message` more per message:
/// (accepted, refused with FilterUnavailable, filter failures).
async fn fueled_filter(per_message: u64) -> (usize, usize, u64) {
    let edge = TestEdge::start(|c| {
        throng_tests::set_tick(c, Duration::from_millis(200));
        c.limits.max_body_bytes = 32 * 1024;
        c.wasm.budget = Budget::Fuel(100_000);
        c.wasm.fuel_per_message = per_message;
        c.filters.insert(
            "acme".into(),
            vec![throng_tests::builtin(
                "filter-keywords",
                &[("words", "scam"), ("mode", "mask")],
            )],
        );
    })
    .await;
    let sender = edge.client("acme", "s", "viewer").await;
    let _own = sender.join("room").await.expect("join");
    let body = "word ".repeat(6000);
    let mut pending = Vec::new();
    for _ in 0..40 {
        pending.push(sender.submit("room", Kind::Chat, body.clone()).await.expect("submit"));
    }
    let (mut accepted, mut refused) = (0, 0);
    for p in pending {
        match p.ack().await {
            Ok(_) => accepted += 1,
            Err(e) if e.code() == Some(ErrorCode::FilterUnavailable) => refused += 1,
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    let failures = edge.edge.wasm_stats().filter_failures.load(Ordering::Relaxed);
    edge.edge.shutdown().await;
    (accepted, refused, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filters_fuel_grows_with_its_batch() {
    // Fuel counts instructions, not time: the outcome is the same on a busy
    // machine. Scanning 30,000 characters costs more than the fixed 100,000
    // even alone, so however the ticks cut the burst no batch is judged...
    let (accepted, refused, failures) = fueled_filter(0).await;
    assert_eq!((accepted, refused), (0, 40), "the fixed fuel alone judges nothing");
    assert!(failures >= 1);
    // ...and far less than 50,000,000 each: with that per message, all are.
    assert_eq!(fueled_filter(50_000_000).await, (40, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_gets_no_files_sockets_or_environment_and_its_stdout_reaches_the_log() {
    captured_logs();
    // What an open sandbox would reach: a readable file and a listening
    // socket on the host.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("secret.txt");
    std::fs::write(&file, "host secret").expect("write");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let connect = listener.local_addr().expect("addr").to_string();
    let file_param = file.to_str().expect("utf-8 path").to_owned();
    let edge = TestEdge::start(|c| {
        c.wasm.budget = Budget::Epoch(Duration::from_secs(2));
        c.filters.insert(
            "acme".into(),
            vec![test_module(
                "wasi-probe",
                &[("file", &file_param), ("connect", &connect)],
            )],
        );
    })
    .await;
    let viewer = edge.client("acme", "v", "viewer").await;
    let mut room = viewer.join("probe").await.expect("join");
    viewer.send("probe", Kind::Chat, "what can you do?").await.expect("ack");
    let (got, _) = collect(&mut room, 1, Duration::from_secs(5)).await;
    let report = String::from_utf8_lossy(&got.first().expect("the probe's rewrite").body).into_owned();
    assert_eq!(
        report, "read_file=no list_dir=no write_file=no tcp_listen=no tcp_connect=no udp=no dns=no env=0 args=0",
        "the guest reached outside its sandbox"
    );
    assert!(
        std::env::vars_os().count() > 0,
        "the host process has an environment to leak"
    );
    let hash = ModuleHash::of(throng_test_modules::WASI_PROBE).short();
    let logs = log_text();
    for stream in ["stdout", "stderr"] {
        assert!(
            logs.lines()
                .any(|l| l.contains(&format!("wasi-probe says hello on {stream}"))
                    && l.contains(stream)
                    && l.contains("acme")
                    && l.contains(&hash)),
            "the guest's {stream} is in the log with its tenant and module:\n{logs}"
        );
    }
    // Nothing was written beside the edge either, and nobody connected.
    assert!(!std::path::Path::new("wasi-probe.txt").exists());
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(listener.accept().is_err(), "the guest connected to the host");
}
