//! `throng load` end to end: the real binary spawns a real edge (or the
//! bare-quinn baseline) on loopback, loads it briefly, and its JSON report
//! must add up.

use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_throng");

/// One load run at a time: each spawns a server and ~50 connections, and
/// two at once on a 2-core machine would skew each other's windows.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn load(args: &[&str]) -> std::process::Output {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = Command::new(BIN).arg("load").args(args).kill_on_drop(true).output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("throng load finishes within 60 s")
        .expect("throng load runs")
}

async fn report(args: &[&str]) -> Value {
    let out = load(args).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "throng load {args:?} failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).expect("utf-8 stdout");
    assert_eq!(stdout.lines().count(), 1, "one JSON line on stdout: {stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn u(v: &Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{path} is not a whole number in {v:#}"))
}

fn f(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} is not a number in {v:#}"))
}

const EDGE_RUN: [&str; 15] = [
    "--spawn-edge",
    "--viewers",
    "50",
    "--rooms",
    "2",
    "--senders",
    "1",
    "--rate",
    "200",
    "--duration",
    "2s",
    "--warmup",
    "1s",
    "--json",
    "--quiet",
];

/// Counts that must hold in any edge run of EDGE_RUN's shape.
fn check_edge_run(r: &Value) {
    assert_eq!(r["mode"], "edge");
    assert_eq!(u(r, "/connections/viewers_connected"), 50, "{r:#}");
    assert_eq!(u(r, "/connections/failed"), 0, "{r:#}");
    assert!(u(r, "/connections/opened") >= 51, "viewers and the sender: {r:#}");
    assert!(f(r, "/connections/handshakes_per_sec") > 0.0);
    // The spawned edge's pid is known: its setup CPU is measured.
    assert!(f(r, "/connections/server_cpu_s") > 0.0, "{r:#}");
    assert!(f(r, "/connections/handshakes_per_server_cpu_s") > 0.0, "{r:#}");

    let window = f(r, "/window_s");
    assert!((1.9..4.0).contains(&window), "window {window}");
    let frames = u(r, "/delivery/frames");
    let messages = u(r, "/delivery/messages");
    assert!(frames > 0 && messages > 0, "{r:#}");
    // Every delivered message of this run carries a stamp, so each is a sample.
    assert_eq!(u(r, "/latency_us/samples"), messages, "{r:#}");
    assert_eq!(u(r, "/delivery/unstamped"), 0);
    let p50 = u(r, "/latency_us/p50");
    let p99 = u(r, "/latency_us/p99");
    assert!(p50 > 0 && p50 <= p99 && p99 <= u(r, "/latency_us/p999"), "{r:#}");
    // A message waits at most one 50 ms tick plus delivery; 2 s means it is broken.
    assert!(p99 < 2_000_000, "p99 {p99} µs");
    // Each viewer sees its room's share of the non-like messages (cap off):
    // about 200 * 0.92 / 2 = 92 a second.
    let max_per_viewer = f(r, "/delivery/per_viewer_per_sec/max");
    assert!(
        (30.0..200.0).contains(&max_per_viewer),
        "per-viewer rate {max_per_viewer}"
    );
    assert!(
        f(r, "/delivery/per_viewer_per_sec/min") > 0.0,
        "every viewer got messages"
    );

    let sent = u(r, "/sends/sent");
    assert!(sent > 100, "sent {sent}");
    assert_eq!(u(r, "/sends/rejected"), 0, "the load config has no limits: {r:#}");
    assert!(u(r, "/sends/acked") + 5 >= sent, "{r:#}");

    let cpu = f(r, "/server/cpu_s");
    assert!(cpu > 0.0, "edge CPU {cpu}");
    assert!(u(r, "/server/peak_rss_kib") > 0);
    assert!(u(r, "/server/rss_end_kib") > 0);
    let per_frame = f(r, "/server/us_cpu_per_frame");
    assert!((per_frame - cpu * 1e6 / frames as f64).abs() < 1e-6 * per_frame.max(1.0));
    assert!(
        f(r, "/delivery/avg_frame_bytes") > 200.0,
        "a frame holds at least one 200 B body"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_run_reports_consistent_counts() {
    let r = report(&EDGE_RUN).await;
    check_edge_run(&r);
    assert!(r["churn"].is_null(), "no churn asked for");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_joins_and_leaves_are_counted() {
    let mut args = EDGE_RUN.to_vec();
    args.extend(["--churn", "100"]);
    let r = report(&args).await;
    check_edge_run(&r);
    let joins = u(&r, "/churn/joins");
    let leaves = u(&r, "/churn/leaves");
    assert!(joins > 0 && leaves > 0, "{r:#}");
    // Each join is followed by its leave before the next join.
    assert!(joins.abs_diff(leaves) <= u(&r, "/params/churn_connections"), "{r:#}");
    let rate = f(&r, "/churn/joins_plus_leaves_per_sec");
    assert!(rate > 0.0 && rate < 2.0 * 100.0 * 1.5, "joins+leaves/s {rate}");
    assert_eq!(u(&r, "/churn/errors"), 0, "{r:#}");
    assert_eq!(u(&r, "/churn/join_latency_us/samples"), joins);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_quinn_baseline_reports_frames_and_cpu() {
    let r = report(&[
        "--mode",
        "bare-quinn",
        "--viewers",
        "50",
        "--frame-bytes",
        "1000",
        "--duration",
        "3s",
        "--warmup",
        "1s",
        "--json",
        "--quiet",
    ])
    .await;
    assert_eq!(r["mode"], "bare-quinn");
    assert_eq!(u(&r, "/connections/viewers_connected"), 50, "{r:#}");
    let frames = u(&r, "/delivery/frames");
    // 50 viewers at one frame per 50 ms tick for ~3 s is ~3,000.
    assert!((1_500..4_500).contains(&frames), "frames {frames}: {r:#}");
    assert_eq!(
        u(&r, "/delivery/bytes"),
        frames * 1000,
        "whole frames of the asked size"
    );
    assert_eq!(u(&r, "/delivery/messages"), 0);
    assert!(r["latency_us"].is_null());
    assert!(f(&r, "/server/cpu_s") > 0.0, "{r:#}");
    assert!(u(&r, "/server/peak_rss_kib") > 0);
    assert_eq!(r["params"]["frame_bytes_source"], "given");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_remote_server_and_bad_input() {
    for (args, expect) in [
        (
            &["--server", "192.0.2.1:4433", "--cert", "/nonexistent.pem"][..],
            "not a loopback address",
        ),
        (&["--spawn-edge", "--mix", "chat=0"][..], "at least one kind"),
        (&["--spawn-edge", "--viewers", "0"][..], "--viewers"),
        (&["--spawn-edge", "--body-bytes", "8"][..], "--body-bytes"),
        (&["--viewers", "5"][..], "--spawn-edge"),
        (&["--spawn-edge", "--rate", "nan"][..], "--rate"),
    ] {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            Command::new(BIN).arg("load").args(args).kill_on_drop(true).output(),
        )
        .await
        .expect("refused quickly")
        .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            stderr.contains(expect),
            "{args:?}: stderr does not say `{expect}`: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: no report on failure");
    }
}

/// An edge measured over its admin endpoint (`--edge-stats`), as for an
/// edge on another machine: CPU and RSS come from `/stats`, not /proc.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_is_measured_through_its_stats_endpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("load.toml");
    let out = Command::new(BIN)
        .args(["load", "--write-config"])
        .arg(&config)
        .output()
        .await
        .expect("write-config runs");
    assert!(out.status.success());
    // A free port for the admin endpoint (released just before the edge binds it).
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text.replacen(
        "[server]\n",
        &format!("[server]\nadmin = \"127.0.0.1:{admin_port}\"\n"),
        1,
    );
    std::fs::write(&config, text).expect("write config");

    let _one = ONE_AT_A_TIME.lock().await;
    let mut serve = Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("serve starts");
    let mut lines = tokio::io::BufReader::new(serve.stdout.take().expect("stdout"));
    let mut ready = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut ready),
    )
    .await
    .expect("ready in time")
    .expect("ready line");
    let rest = ready.trim().strip_prefix("throng ready quic=").expect("ready line");
    let (addr, cert) = rest.split_once(" cert=").expect("cert");
    // The ready line goes on after the path (webtransport=..., cert_sha256=...).
    let cert = cert.split(' ').next().unwrap_or(cert);

    let stats = format!("http://127.0.0.1:{admin_port}");
    let config_str = config.to_str().expect("utf-8 path");
    let all = [
        "--server",
        addr,
        "--cert",
        cert,
        "--config",
        config_str,
        "--edge-stats",
        &stats,
        "--viewers",
        "20",
        "--senders",
        "1",
        "--rate",
        "100",
        "--duration",
        "1s",
        "--warmup",
        "0s",
        "--json",
        "--quiet",
    ];
    let run = Command::new(BIN).arg("load").args(all).kill_on_drop(true).output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("load finishes")
        .expect("load runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        r.pointer("/server/stats_url").and_then(Value::as_str),
        Some(stats.as_str())
    );
    assert!(f(&r, "/server/cpu_s") > 0.0, "{r:#}");
    assert!(u(&r, "/server/rss_end_kib") > 0, "{r:#}");
    assert!(f(&r, "/server/rss_per_connection_bytes").is_finite(), "{r:#}");
    assert!(f(&r, "/connections/server_cpu_s") > 0.0, "{r:#}");
    let _ = serve.kill().await;
}
