//! The live dashboard in headless Chromium (Debian's, driven by
//! `tests/browser/dashboard.mjs`) against a running edge with traffic, a
//! module and a rollout: what the page shows must be what the API says.
//! The screenshot is kept in `<target>/test-artifacts/dashboard.png`.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use throng_tests::api::Api;
use throng_tests::{OPERATOR_KEY, TestEdge, tools};
use throng_wire::Kind;

fn drive(admin: std::net::SocketAddr, key: &str, shot: &std::path::Path, extra: &[&str]) -> Value {
    let dir = tools::browser_driver();
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("dashboard.mjs"))
        .args(["--url", &format!("http://{admin}"), "--key", key, "--screenshot"])
        .arg(shot)
        .args(["--timeout-ms", "60000"])
        .args(extra);
    let out = tools::run("the dashboard in Chromium", &mut cmd);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("driver output is not JSON ({e}): {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_in_chromium_what_the_api_says() {
    let edge = TestEdge::start(|c| {
        c.admin = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let admin = edge.edge.admin_addr().expect("admin");
    let ops = Api::new(admin, OPERATOR_KEY);
    // A module, a rollout of it, and two busy rooms.
    let up = ops
        .upload(
            throng_guest_artifacts::FILTER_KEYWORDS,
            "keywords",
            "1.0.0",
            "message-filter",
            json!({"words": "scam"}),
        )
        .await;
    assert_eq!(up.status, 201, "{:#}", up.body);
    let hash = up.body["module"]["sha256"].as_str().expect("hash").to_owned();
    let chain =
        json!({"filters": [{"module": format!("sha256:{hash}"), "params": {"words": "scam"}}], "activate": 100});
    assert_eq!(ops.post("/v1/deployments/filters/acme", chain).await.status, 201);
    let mut keep = Vec::new();
    for room in ["stage", "backstage"] {
        for i in 0..3 {
            let c = edge.client("acme", &format!("{room}-v{i}"), "viewer").await;
            let s = c.join(room).await.expect("join");
            keep.push((c, s));
        }
    }
    let sender = edge.client("acme", "sender", "viewer").await;
    let _s = sender.join("stage").await.expect("join");
    let traffic = tokio::spawn(async move {
        for i in 0..400u32 {
            let _ = sender.send("stage", Kind::Chat, format!("m{i}")).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // Rates need a second or two of traffic.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let shot = tools::artifacts().join("dashboard.png");
    let page = {
        let shot = shot.clone();
        tokio::task::spawn_blocking(move || drive(admin, OPERATOR_KEY, &shot, &["--updates", "3"]))
            .await
            .expect("driver task")
    };
    let api = ops.get("/v1/overview").await.body;
    assert_eq!(page["status"], "live", "{page:#}");
    assert_eq!(page["console_errors"], json!([]), "{page:#}");
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000),
        "a screenshot at {}",
        shot.display()
    );

    // Rooms: the same rooms, viewers, policy and filter chain as the API.
    let by_room = |v: &Value, key: &str| -> Vec<(String, Value, Value)> {
        let mut rows: Vec<(String, Value, Value)> = v
            .as_array()
            .expect("rooms")
            .iter()
            .map(|r| {
                let name = match r.get("room").and_then(Value::as_str) {
                    Some(n) if n.contains('/') => n.to_owned(),
                    Some(n) => format!("{}/{n}", r["tenant"].as_str().unwrap_or("")),
                    None => String::new(),
                };
                let policy = if key == "page" {
                    r["policy"].clone()
                } else {
                    r["running"]["policy"].clone()
                };
                (name, r["viewers"].clone(), policy)
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    };
    assert_eq!(
        by_room(&page["rooms"], "page"),
        by_room(&api["rooms"], "api"),
        "{page:#}\n{api:#}"
    );
    let stage = page["rooms"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["room"] == "acme/stage"))
        .expect("the busy room");
    assert!(
        stage["in_per_s"].as_f64().is_some_and(|r| r > 1.0),
        "live rates: {stage:#}"
    );
    assert_eq!(stage["filters"], 1, "{stage:#}");
    // Modules and deployments.
    let page_modules: Vec<&str> = page["modules"]
        .as_array()
        .expect("modules")
        .iter()
        .filter_map(|m| m["sha256"].as_str())
        .collect();
    assert_eq!(page_modules, vec![hash.as_str()]);
    assert_eq!(page["modules"][0]["name"], "keywords");
    assert_eq!(page["modules"][0]["rooms"], 2, "both rooms run it: {page:#}");
    let deployment = page["deployments"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["scope"] == "filters/acme"))
        .expect("the filter deployment shown");
    assert_eq!(
        deployment["version"], api["deployments"][0]["active"]["version"],
        "{page:#}"
    );

    // A wrong key: the page says why, and shows nothing else.
    let bad = tokio::task::spawn_blocking(move || {
        drive(
            admin,
            "wrong-key-0123456789abcdefgh",
            &tools::artifacts().join("dashboard-refused.png"),
            &["--expect-error"],
        )
    })
    .await
    .expect("driver task");
    assert!(
        bad["status"].as_str().is_some_and(|s| s.starts_with("error:")),
        "{bad:#}"
    );
    assert_eq!(bad["rooms"], json!([]), "{bad:#}");
    traffic.abort();
    drop(keep);
    edge.edge.shutdown().await;
}
