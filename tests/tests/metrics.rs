//! `/metrics` explains itself (HELP on every family), labels what it
//! counts with tenant, module and class, and times policy and filter calls
//! in histograms; `/v1/filters` shows a tenant its own filters' calls.

use std::time::Duration;

use throng_tests::api::Api;
use throng_tests::{OPERATOR_KEY, TestEdge, builtin, builtin_policy, collect};
use throng_wire::Kind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_help_labels_and_call_latency_histograms() {
    throng_edge::admin::install_prometheus().expect("the only recorder of this test process");
    let edge = TestEdge::start(|c| {
        c.admin = Some("127.0.0.1:0".parse().expect("addr"));
        c.policies
            .push(builtin_policy("*", "policy-default", &[("cap_per_sec", "100")]));
        c.filters
            .insert("acme".into(), vec![builtin("filter-keywords", &[("words", "scam")])]);
    })
    .await;
    let viewer = edge.client("acme", "v", "viewer").await;
    let mut room = viewer.join("lobby").await.expect("join");
    let sender = edge.client("acme", "s", "viewer").await;
    let _s = sender.join("lobby").await.expect("join");
    sender.send("lobby", Kind::Chat, "hello").await.expect("ack");
    sender.send("lobby", Kind::Chat, "a scam").await.expect_err("filtered");
    let _ = collect(&mut room, 1, Duration::from_secs(5)).await;

    let admin = edge.edge.admin_addr().expect("admin");
    // Every tenant's series are for an operator's key.
    let metrics = Api::new(admin, OPERATOR_KEY).get("/metrics").await;
    let text = metrics.body.as_str().expect("text").to_owned();
    let module = throng_edge::wasm::ModuleHash::of(throng_guest_artifacts::FILTER_KEYWORDS).short();
    let policy = throng_edge::wasm::ModuleHash::of(throng_guest_artifacts::POLICY_DEFAULT).short();
    for want in [
        "# HELP throng_filter_call_seconds".to_owned(),
        "# HELP throng_policy_call_seconds".to_owned(),
        "# HELP throng_room_messages_total".to_owned(),
        "# HELP throng_connections_total".to_owned(),
        format!("throng_filter_call_seconds_bucket{{tenant=\"acme\",module=\"{module}\",le=\"0.005\"}}"),
        format!("throng_policy_call_seconds_bucket{{tenant=\"acme\",module=\"{policy}\",le=\"0.005\"}}"),
        format!("throng_messages_filtered_total{{tenant=\"acme\",module=\"{module}\"}} 1"),
        "throng_room_messages_total{tenant=\"acme\",class=\"".to_owned(),
        "outcome=\"delivered\"}".to_owned(),
    ] {
        assert!(text.contains(&want), "`{want}` missing from:\n{text}");
    }
    // Every family has its HELP line.
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap_or("");
        assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name}");
    }

    // Without a key: the edge's series, none labelled with a tenant; a
    // key that does not hold is refused rather than taken for none.
    let open = Api::anonymous(admin).get("/metrics").await;
    let open = open.body.as_str().expect("text");
    assert!(open.contains("# HELP throng_room_messages_total") && open.contains("throng_connections_total"));
    assert!(!open.contains("tenant="), "{open}");
    assert_eq!(Api::new(admin, "not-a-key").get("/metrics").await.status, 401);

    // The tenant sees its filter's calls; another tenant sees none.
    let acme = Api::new(admin, edge.token("acme", "a", "tenant-admin", "*"));
    let filters = acme.get("/v1/filters").await.body;
    let f = &filters[0];
    assert_eq!(f["tenant"], "acme", "{filters:#}");
    assert!(f["calls"].as_u64().is_some_and(|c| c >= 2), "{filters:#}");
    assert_eq!(f["rejected"], 1, "{filters:#}");
    assert!(f["max_call_us"].as_u64().is_some_and(|us| us > 0), "{filters:#}");
    let globex = Api::new(admin, edge.token("globex", "g", "tenant-admin", "*"));
    assert_eq!(globex.get("/v1/filters").await.body, serde_json::json!([]));
    assert_eq!(
        Api::new(admin, OPERATOR_KEY)
            .get("/v1/filters")
            .await
            .body
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    edge.edge.shutdown().await;
}
