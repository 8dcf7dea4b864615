//! The control plane end to end, over real HTTP and real QUIC: uploads
//! checked step by step, deployments, gradual rollout, rollback under
//! traffic, tenants kept apart, quotas, the audit log, and a restart.

use std::time::Duration;

use serde_json::{Value, json};
use throng_edge::config::TenantQuota;
use throng_edge::control::spec::share_point;
use throng_tests::api::{Answer, Api};
use throng_tests::{OPERATOR_KEY, TestEdge, collect};
use throng_wire::Kind;

fn with_admin(c: &mut throng_edge::Config) {
    c.admin = Some("127.0.0.1:0".parse().expect("addr"));
}

fn operator(edge: &TestEdge) -> Api {
    Api::new(edge.edge.admin_addr().expect("admin"), OPERATOR_KEY)
}

fn tenant_admin(edge: &TestEdge, tenant: &str) -> Api {
    Api::new(
        edge.edge.admin_addr().expect("admin"),
        edge.token(tenant, &format!("{tenant}-admin"), "tenant-admin", "*"),
    )
}

fn sha(a: &Answer) -> String {
    a.body["module"]["sha256"].as_str().expect("sha256").to_owned()
}

#[track_caller]
fn refused(a: &Answer, status: u16, code: &str) {
    assert_eq!((a.status, a.code()), (status, code), "{:#}", a.body);
    assert!(!a.message().is_empty(), "{:#}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_keys_and_tenant_admin_tokens_open_the_api_and_metrics_stay_open() {
    let edge = TestEdge::start(with_admin).await;
    let admin = edge.edge.admin_addr().expect("admin");
    for path in ["/v1/modules", "/v1/deployments", "/v1/audit", "/v1/rooms", "/stats"] {
        refused(&Api::anonymous(admin).get(path).await, 401, "unauthenticated");
        refused(
            &Api::new(admin, "not-the-key-0123456789abcdef").get(path).await,
            401,
            "unauthenticated",
        );
        // A viewer's token is no admin's token.
        let viewer = Api::new(admin, edge.token("acme", "u", "viewer", "*"));
        refused(&viewer.get(path).await, 401, "token_malformed");
        let expired = Api::new(admin, edge.token_exp("acme", "a", "tenant-admin", "*", 1_000));
        refused(&expired.get(path).await, 401, "token_expired");
    }
    assert_eq!(Api::anonymous(admin).get("/healthz").await.status, 200);
    assert_eq!(operator(&edge).get("/stats").await.status, 200);
    assert_eq!(tenant_admin(&edge, "acme").get("/v1/modules").await.status, 200);
    edge.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_checked_step_by_step_and_kept_by_hash() {
    let edge = TestEdge::start(|c| {
        with_admin(c);
        // An operator's upload is tried under the edge's call budget: the
        // default 5 ms, which the slow filter (50 ms a message) overruns.
        c.wasm.budget = throng_edge::wasm::Budget::Epoch(Duration::from_millis(5));
        // globex's filters get too little memory to start.
        let mut q = c.control.quota.clone();
        q.filter_memory_bytes = 64 << 10;
        c.control.tenant_quotas.insert("globex".into(), q);
    })
    .await;
    let ops = operator(&edge);
    let policy = throng_guest_artifacts::POLICY_DEFAULT;
    let filter = throng_guest_artifacts::FILTER_KEYWORDS;

    let first = ops
        .upload(policy, "default", "1.0.0", "room-policy", json!({"cap_per_sec": "5"}))
        .await;
    assert_eq!(first.status, 201, "{:#}", first.body);
    let hash = sha(&first);
    assert_eq!(first.body["module"]["world"], "room-policy");
    assert_eq!(first.body["module"]["size"], policy.len());
    assert_eq!(first.body["module"]["uploader"], "operator:ops");
    // The same bytes again: the first record, nothing new.
    let again = ops.upload(policy, "default", "1.0.0", "room-policy", json!({})).await;
    assert_eq!((again.status, &again.body["created"]), (200, &json!(false)));
    assert_eq!(sha(&again), hash);
    // A version names one module for ever.
    refused(
        &ops.upload(filter, "default", "1.0.0", "message-filter", json!({"words": "x"}))
            .await,
        409,
        "conflict",
    );
    let shown = ops.get(&format!("/v1/modules/sha256:{hash}")).await;
    assert_eq!(shown.status, 200);
    assert_eq!(shown.body[0]["name"], "default");
    assert_eq!(ops.get("/v1/modules").await.body.as_array().map(Vec::len), Some(1));

    // Each step refuses what it should, and says which step.
    let step = |a: &Answer| a.body["error"]["field"].as_str().unwrap_or("").to_owned();
    let garbage = ops
        .upload(b"\0asm not really", "junk", "1", "room-policy", json!({}))
        .await;
    refused(&garbage, 422, "module_refused");
    assert_eq!(step(&garbage), "compile");
    let world = ops.upload(filter, "kw", "1", "room-policy", json!({})).await;
    refused(&world, 422, "module_refused");
    assert_eq!(step(&world), "world");
    let configure = ops.upload(filter, "kw", "2", "message-filter", json!({})).await;
    refused(&configure, 422, "module_refused");
    assert_eq!(step(&configure), "configure");
    assert!(configure.message().contains("words"), "{}", configure.message());
    let trap = ops
        .upload(throng_test_modules::HOSTILE_TRAP, "trap", "1", "room-policy", json!({}))
        .await;
    assert_eq!(step(&trap), "self_test", "{:#}", trap.body);
    assert!(trap.message().contains("trap"), "{}", trap.message());
    let plan = ops
        .upload(throng_test_modules::HOSTILE_PLAN, "plan", "1", "room-policy", json!({}))
        .await;
    assert_eq!(step(&plan), "self_test", "{:#}", plan.body);
    let slow = ops
        .upload(
            throng_test_modules::FILTER_SLOW,
            "slow",
            "1",
            "message-filter",
            json!({"per_message_us": "50000"}),
        )
        .await;
    assert_eq!(step(&slow), "self_test", "{:#}", slow.body);
    assert!(slow.message().contains("budget"), "{}", slow.message());
    let starved = tenant_admin(&edge, "globex")
        .upload(filter, "kw", "1", "message-filter", json!({"words": "x"}))
        .await;
    assert_eq!(step(&starved), "instantiate", "{:#}", starved.body);
    let params = ops.get("/v1/modules").await;
    assert_eq!(
        params.body.as_array().map(Vec::len),
        Some(1),
        "refused modules are not kept"
    );

    // Tenants upload filters, never policies.
    refused(
        &tenant_admin(&edge, "acme")
            .upload(policy, "mine", "1", "room-policy", json!({}))
            .await,
        403,
        "forbidden",
    );
    let query = ops.post_bytes("/v1/modules?name=x&version=1&world=weird", filter).await;
    refused(&query, 400, "invalid_request");
    assert_eq!(query.body["error"]["field"], "world");

    // The store survives a restart.
    let edge = edge.restart().await;
    let shown = operator(&edge).get(&format!("/v1/modules/{hash}")).await;
    assert_eq!(shown.status, 200, "{:#}", shown.body);
    edge.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_cannot_see_replace_or_deploy_each_others_modules_or_touch_their_rooms() {
    let edge = TestEdge::start(with_admin).await;
    let acme = tenant_admin(&edge, "acme");
    let globex = tenant_admin(&edge, "globex");
    let filter = throng_guest_artifacts::FILTER_KEYWORDS;
    let up = acme
        .upload(filter, "kw", "1", "message-filter", json!({"words": "x"}))
        .await;
    assert_eq!(up.status, 201, "{:#}", up.body);
    let hash = sha(&up);
    assert_eq!(up.body["module"]["owner"], "tenant:acme");

    // Read: not found for globex, listed for acme only.
    refused(&globex.get(&format!("/v1/modules/{hash}")).await, 404, "not_found");
    assert_eq!(globex.get("/v1/modules").await.body, json!([]));
    // Replace: globex's upload of the same bytes is globex's own record;
    // acme's record is unchanged.
    let theirs = globex
        .upload(filter, "kw", "9", "message-filter", json!({"words": "y"}))
        .await;
    assert_eq!(theirs.body["module"]["owner"], "tenant:globex");
    let mine = acme.get(&format!("/v1/modules/{hash}")).await;
    assert_eq!(mine.body.as_array().map(Vec::len), Some(1), "{:#}", mine.body);
    assert_eq!(mine.body[0]["version"], "1");
    // Deploy: not into acme's scope, and acme's module not into globex's.
    let chain = json!({"filters": [{"module": format!("sha256:{hash}"), "params": {"words": "x"}}]});
    refused(
        &globex.post("/v1/deployments/filters/acme", chain.clone()).await,
        403,
        "forbidden",
    );
    refused(
        &globex.post("/v1/deployments/filters/acme/rollback", json!({})).await,
        403,
        "forbidden",
    );
    refused(
        &globex
            .post("/v1/deployments/filters/acme/activate", json!({"version": 1}))
            .await,
        403,
        "forbidden",
    );
    refused(&globex.get("/v1/deployments/filters/acme").await, 403, "forbidden");
    // Policies are the operators' (their params may hold secrets).
    refused(&globex.get("/v1/deployments/policies").await, 403, "forbidden");
    refused(&globex.get("/v1/deployments/policies/1").await, 403, "forbidden");
    // acme's module is not there for globex to use; globex's own upload of
    // the same bytes is, under its own record.
    let stolen = globex.post("/v1/deployments/filters/globex", chain.clone()).await;
    assert_eq!(stolen.status, 201, "same bytes, globex's own record: {:#}", stolen.body);
    refused(
        &globex.post("/v1/deployments/policies", json!({"policies": []})).await,
        403,
        "forbidden",
    );
    // Rooms: globex neither lists nor reads acme's.
    let viewer = edge.client("acme", "v", "viewer").await;
    let _room = viewer.join("lobby").await.expect("join");
    refused(&globex.get("/v1/rooms/acme/lobby").await, 403, "forbidden");
    refused(&globex.get("/v1/rooms?tenant=acme").await, 403, "forbidden");
    assert_eq!(globex.get("/v1/rooms").await.body, json!([]));
    assert_eq!(acme.get("/v1/rooms/acme/lobby").await.status, 200);
    // The audit log: each tenant sees its own entries only.
    let log = globex.get("/v1/audit").await;
    let entries = log.body.as_array().expect("entries").clone();
    assert!(!entries.is_empty());
    assert!(entries.iter().all(|e| e["tenant"] == "globex"), "{entries:#?}");
    edge.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_quotas_hold() {
    let edge = TestEdge::start(|c| {
        with_admin(c);
        c.control.tenant_quotas.insert(
            "acme".into(),
            TenantQuota {
                max_module_bytes: throng_guest_artifacts::FILTER_KEYWORDS.len(),
                max_modules: 1,
                max_instances: 2,
                ..c.control.quota.clone()
            },
        );
    })
    .await;
    let acme = tenant_admin(&edge, "acme");
    let filter = throng_guest_artifacts::FILTER_KEYWORDS;
    let mut bigger = filter.to_vec();
    bigger.push(0);
    let big = acme
        .upload(&bigger, "kw", "0", "message-filter", json!({"words": "x"}))
        .await;
    refused(&big, 422, "module_refused");
    assert_eq!(big.body["error"]["field"], "size");
    let up = acme
        .upload(filter, "kw", "1", "message-filter", json!({"words": "x"}))
        .await;
    assert_eq!(up.status, 201, "at the limit: {:#}", up.body);
    let second = acme
        .upload(
            throng_test_modules::FILTER_TRAP,
            "trap",
            "1",
            "message-filter",
            json!({}),
        )
        .await;
    refused(&second, 403, "quota_exceeded");
    assert_eq!(second.body["error"]["field"], "max_modules");
    // One filter (two instances) fits; two do not.
    let one = json!({"filters": [{"module": "builtin:filter-keywords", "params": {"words": "a"}}]});
    assert_eq!(acme.post("/v1/deployments/filters/acme", one).await.status, 201);
    let two = json!({"filters": [
        {"module": "builtin:filter-keywords", "params": {"words": "a"}},
        {"module": "builtin:filter-keywords", "params": {"words": "b"}},
    ]});
    let over = acme.post("/v1/deployments/filters/acme", two.clone()).await;
    refused(&over, 403, "quota_exceeded");
    assert_eq!(over.body["error"]["field"], "max_instances");
    // Quotas are the tenant's: an operator may deploy what the tenant may not.
    assert_eq!(
        operator(&edge).post("/v1/deployments/filters/acme", two).await.status,
        201
    );
    edge.edge.shutdown().await;
}

/// Makes `n` rooms of acme with one viewer each; returns the clients and streams.
async fn rooms(edge: &TestEdge, prefix: &str, n: usize) -> Vec<(throng_client::Client, throng_client::RoomStream)> {
    let mut out = Vec::new();
    for i in 0..n {
        let c = edge.client("acme", &format!("{prefix}-v{i}"), "viewer").await;
        let s = c.join(&format!("{prefix}-{i}")).await.expect("join");
        out.push((c, s));
    }
    out
}

fn policy_versions(rooms: &Value, prefix: &str) -> Vec<(String, Option<u64>)> {
    rooms
        .as_array()
        .expect("rooms")
        .iter()
        .filter(|r| r["room"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .map(|r| {
            (
                r["room"].as_str().unwrap_or("").to_owned(),
                r["running"]["policy_version"].as_u64(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gradual_rollout_gives_its_share_of_rooms_the_new_version_and_widens() {
    let edge = TestEdge::start(|c| {
        with_admin(c);
        c.limits.room_create_rate_per_sec = 10_000;
        c.limits.room_create_burst = 10_000;
    })
    .await;
    let ops = operator(&edge);
    let v1 = json!({"policies": [{"module": "native", "params": {"cap_per_sec": "0"}}], "activate": 100});
    let made = ops.post("/v1/deployments/policies", v1).await;
    assert_eq!(made.status, 201, "{:#}", made.body);
    let v1 = made.body["deployment"]["version"].as_u64().expect("version");
    let up = ops
        .upload(
            throng_guest_artifacts::POLICY_DEFAULT,
            "default",
            "2",
            "room-policy",
            json!({"cap_per_sec": "5"}),
        )
        .await;
    let v2 = ops
        .post(
            "/v1/deployments/policies",
            json!({"policies": [{"module": format!("sha256:{}", sha(&up)), "params": {"cap_per_sec": "5"}}], "note": "cap 5"}),
        )
        .await;
    assert_eq!(v2.status, 201, "{:#}", v2.body);
    let v2 = v2.body["deployment"]["version"].as_u64().expect("version");
    let n = 60;
    let _rooms = rooms(&edge, "show", n).await;

    for percent in [30u64, 70] {
        let a = ops
            .post(
                "/v1/deployments/policies/activate",
                json!({"version": v2, "percent": percent}),
            )
            .await;
        assert_eq!(a.status, 200, "{:#}", a.body);
        assert_eq!(a.body["base"], v1);
        // Each room runs the version its share point picks: exactly that.
        let want = |room: &str| {
            if u64::from(share_point("acme", room)) < percent * 100 {
                v2
            } else {
                v1
            }
        };
        let mut last = Vec::new();
        for _ in 0..200 {
            last = policy_versions(&ops.get("/v1/rooms?tenant=acme").await.body, "show-");
            if last.len() == n && last.iter().all(|(r, v)| *v == Some(want(r))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            last.len() == n && last.iter().all(|(r, v)| *v == Some(want(r))),
            "{percent}%: {last:?}"
        );
        let on_new = last.iter().filter(|(_, v)| *v == Some(v2)).count() as u64;
        // The share matches, within what 60 rooms allow.
        assert!(
            on_new.abs_diff(n as u64 * percent / 100) <= 12,
            "{percent}%: {on_new} of {n}"
        );
    }
    // At 100 the base is gone.
    let full = ops
        .post("/v1/deployments/policies/activate", json!({"version": v2}))
        .await;
    assert_eq!(
        (full.body["percent"].as_u64(), full.body.get("base")),
        (Some(100), None)
    );
    let status = ops.get("/v1/deployments/policies").await;
    assert_eq!(status.body["active"]["version"], v2);
    assert!(status.body["versions"].as_array().is_some_and(|v| v.len() >= 2));
    edge.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_under_traffic_drops_no_viewer_and_brings_the_old_behaviour_back() {
    let edge = TestEdge::start(with_admin).await;
    let acme = tenant_admin(&edge, "acme");
    // v1 masks the word, v2 rejects it.
    let mask = json!({"filters": [{"module": "builtin:filter-keywords", "params": {"words": "spoiler", "mode": "mask"}}], "activate": 100});
    let reject = json!({"filters": [{"module": "builtin:filter-keywords", "params": {"words": "spoiler", "mode": "reject"}}], "activate": 100});
    assert_eq!(acme.post("/v1/deployments/filters/acme", mask).await.status, 201);
    let viewer = edge.client("acme", "viewer", "viewer").await;
    let mut stream = viewer.join("lobby").await.expect("join");
    let sender = edge.client("acme", "sender", "viewer").await;
    let _s = sender.join("lobby").await.expect("join");

    sender
        .send("lobby", Kind::Chat, "a spoiler here")
        .await
        .expect("masked, accepted");
    let v2 = acme.post("/v1/deployments/filters/acme", reject).await;
    assert_eq!(v2.status, 201, "{:#}", v2.body);
    // Traffic goes on through the change; the reject version answers at
    // its first tick.
    let mut rejected = false;
    for _ in 0..100 {
        if sender.send("lobby", Kind::Chat, "another spoiler").await.is_err() {
            rejected = true;
            break;
        }
    }
    assert!(rejected, "v2 rejects");
    let back = acme.post("/v1/deployments/filters/acme/rollback", json!({})).await;
    assert_eq!(back.status, 200, "{:#}", back.body);
    assert_eq!(back.body["version"], 1);
    // The old behaviour at the next tick: masked, accepted.
    sender
        .send("lobby", Kind::Chat, "spoiler once more")
        .await
        .expect("v1 again accepts");
    sender.send("lobby", Kind::Chat, "last").await.expect("ack");
    let (got, _) = collect(&mut stream, 100, Duration::from_secs(5)).await;
    let bodies: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    assert!(bodies.contains(&"******* once more".to_owned()), "{bodies:?}");
    assert_eq!(
        bodies.last().map(String::as_str),
        Some("last"),
        "the viewer stayed: {bodies:?}"
    );
    assert!(bodies.iter().all(|b| !b.contains("spoiler")), "{bodies:?}");
    // The viewer was never dropped: the same stream, numbers in order.
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // The audit log tells who did what, from which version to which.
    let log = operator(&edge).get("/v1/audit").await;
    let entries = log.body.as_array().expect("entries");
    let rollback = entries
        .iter()
        .find(|e| e["action"] == "deployment.rollback")
        .expect("a rollback entry");
    assert_eq!(rollback["who"], "tenant:acme/acme-admin");
    assert_eq!(rollback["target"], "filters/acme");
    assert_eq!(rollback["from"], "v2");
    assert_eq!(rollback["to"], "v1");
    assert!(rollback["at_ms"].as_u64().is_some_and(|t| t > 0));
    edge.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_active_deployment_and_config_seeds_the_first() {
    let edge = TestEdge::start(|c| {
        with_admin(c);
        c.policies.push(throng_tests::builtin_policy(
            "*",
            "policy-default",
            &[("cap_per_sec", "3")],
        ));
    })
    .await;
    let ops = operator(&edge);
    let seeded = ops.get("/v1/deployments/policies").await;
    assert_eq!(seeded.body["active"]["version"], 1, "{:#}", seeded.body);
    assert_eq!(seeded.body["versions"][0]["created_by"], "edge-config");
    let v2 = ops
        .post(
            "/v1/deployments/policies",
            json!({"policies": [{"module": "builtin:policy-default", "params": {"cap_per_sec": "7"}, "on_failure": "closed"}], "activate": 100}),
        )
        .await;
    assert_eq!(v2.status, 201, "{:#}", v2.body);
    let edge = edge.restart().await;
    let ops = operator(&edge);
    let after = ops.get("/v1/deployments/policies").await;
    assert_eq!(after.body["active"]["version"], 2, "{:#}", after.body);
    // Rooms run it: the room shows the module, its params and failure mode.
    let viewer = edge.client("acme", "v", "viewer").await;
    let _s = viewer.join("lobby").await.expect("join");
    let mut room = Value::Null;
    for _ in 0..100 {
        room = ops.get("/v1/rooms/acme/lobby").await.body;
        if room["running"]["policy_version"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(room["running"]["policy_version"], 2, "{room:#}");
    assert_eq!(room["running"]["policy_params"]["cap_per_sec"], "7", "{room:#}");
    assert_eq!(room["running"]["policy_on_failure"], "closed", "{room:#}");
    assert!(
        room["running"]["policy"]
            .as_str()
            .is_some_and(|p| p.starts_with("sha256:"))
    );
    // Rollback reaches the seeded version.
    let back = ops.post("/v1/deployments/policies/rollback", json!({"to": 1})).await;
    assert_eq!(back.status, 200, "{:#}", back.body);
    let nowhere = ops.post("/v1/deployments/policies/rollback", json!({"to": 9})).await;
    refused(&nowhere, 400, "invalid_request");
    assert_eq!(nowhere.body["error"]["field"], "to");
    edge.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deployments_are_refused_naming_the_field() {
    let edge = TestEdge::start(with_admin).await;
    let ops = operator(&edge);
    let cases = [
        (json!({"policies": [{"module": "sha256:00"}]}), "policies[0].module"),
        (
            json!({"policies": [{"module": "native", "params": {"cap_per_sec": "lots"}}]}),
            "policies[0].params",
        ),
        (
            json!({"policies": [{"module": "builtin:policy-default", "class": "nope"}]}),
            "policies[0].class",
        ),
        (
            json!({"policies": [{"module": "builtin:filter-keywords"}]}),
            "policies[0].module",
        ),
        (json!({"policies": [{"module": "native", "bogus": 1}]}), "policies[0]"),
        (json!({"filters": []}), "policies"),
    ];
    for (body, field) in cases {
        let a = ops.post("/v1/deployments/policies", body.clone()).await;
        assert!((400..500).contains(&a.status), "{body}: {:#}", a.body);
        let got = a.body["error"]["field"].as_str().unwrap_or("");
        assert!(
            got.starts_with(field),
            "{body}: field `{got}`, want `{field}`: {:#}",
            a.body
        );
    }
    let a = ops
        .post(
            "/v1/deployments/filters/acme",
            json!({"filters": [{"module": "builtin:filter-keywords"}]}),
        )
        .await;
    refused(&a, 422, "deployment_refused");
    assert!(a.message().contains("configure"), "{}", a.message());
    refused(
        &ops.post("/v1/deployments/filters/nobody", json!({"filters": []})).await,
        404,
        "not_found",
    );
    refused(
        &ops.post("/v1/deployments/policies/activate", json!({"version": 42}))
            .await,
        404,
        "not_found",
    );
    // Nothing was activated by any of it.
    assert_eq!(ops.get("/v1/deployments").await.body, json!([]));
    edge.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_policy_fails_open_or_closed_as_its_rule_says() {
    use throng_edge::config::PolicyChoice;
    use throng_edge::filter::OnFailure;
    for (on_failure, chat_delivered) in [(OnFailure::Open, true), (OnFailure::Closed, false)] {
        let edge = TestEdge::start(|c| {
            // Traps on every plan-tick.
            let mut rule = throng_tests::test_policy("*", "hostile-trap", &[]);
            if let PolicyChoice::Module(m) = &mut rule.policy {
                m.on_failure = on_failure;
            }
            c.policies.push(rule);
        })
        .await;
        let viewer = edge.client("acme", "v", "viewer").await;
        let mut room = viewer.join("lobby").await.expect("join");
        let host = edge.client("acme", "h", "host").await;
        let _h = host.join("lobby").await.expect("join");
        host.send("lobby", Kind::Chat, "chat")
            .await
            .expect("accepted either way");
        host.send("lobby", Kind::Host, "host").await.expect("accepted");
        let want = if chat_delivered { 2 } else { 1 };
        let (got, _) = collect(&mut room, want, Duration::from_secs(5)).await;
        let bodies: Vec<&[u8]> = got.iter().map(|m| m.body.as_slice()).collect();
        let expected: Vec<&[u8]> = if chat_delivered {
            vec![b"chat", b"host"]
        } else {
            vec![b"host"]
        };
        assert_eq!(bodies, expected, "{on_failure:?}");
        edge.edge.shutdown().await;
    }
}

// ---- in a cluster ----

async fn clustered(nats: &throng_tests::nats::NatsServer, id: &str) -> TestEdge {
    let url = nats.url();
    let id = id.to_owned();
    TestEdge::start(move |c| {
        with_admin(c);
        let mut cluster = throng_edge::config::ClusterConfig::with_nats(vec![url]);
        cluster.edge_id = Some(id);
        cluster.heartbeat = Duration::from_millis(100);
        cluster.dead_after = Duration::from_millis(600);
        c.cluster = Some(cluster);
        // Several edges in one process: each sizes its Wasm pool as if alone.
        c.wasm.max_instances = 256;
    })
    .await
}

async fn all_live(edges: &[&TestEdge]) {
    for e in edges {
        let c = e.edge.cluster().expect("clustered");
        throng_tests::wait_for("every edge to see the others", Duration::from_secs(10), || {
            c.live().edges.len() == edges.len()
        })
        .await;
    }
}

/// A room of acme's whose origin is `edge` (where its filters run).
fn room_on(edge: &TestEdge, prefix: &str) -> String {
    let c = edge.edge.cluster().expect("clustered");
    let live = c.live();
    (0..10_000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|r| live.origin("acme", r) == Some(c.edge_id()))
        .expect("a room of this edge's")
}

/// What acme's filters do to "a spoiler here" in `room` on `edge`:
/// `rejected`, or the body a viewer receives.
async fn verdict(edge: &TestEdge, room: &str) -> String {
    let viewer = edge.client("acme", "verdict-viewer", "viewer").await;
    let mut stream = viewer.join(room).await.expect("join");
    let sender = edge.client("acme", "verdict-sender", "viewer").await;
    let _s = sender.join(room).await.expect("join");
    if sender.send(room, Kind::Chat, "a spoiler here").await.is_err() {
        return "rejected".into();
    }
    let (got, _) = collect(&mut stream, 1, Duration::from_secs(5)).await;
    got.first()
        .map_or("nothing".into(), |m| String::from_utf8_lossy(&m.body).into_owned())
}

/// Polls `path` on `api` until `done` holds of the answer (at most 15 s).
async fn until(api: &Api, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let a = api.get(path).await;
        if a.status == 200 && done(&a.body) {
            return a.body;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {:#}", a.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn running(view: &Value, edge: &str, scope: &str) -> Option<u64> {
    view["edges"].as_array()?.iter().find(|e| e["edge_id"] == edge)?["running"][scope]["version"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_modules_and_deployments_reach_every_edge_and_late_or_restarted_edges_converge() {
    // `/metrics` shows the counts below only with a recorder installed.
    throng_edge::admin::install_prometheus().expect("the only recorder of this test process");
    let nats = throng_tests::nats::NatsServer::start();
    let a = clustered(&nats, "edge-a").await;
    // A tenant's module and deployment, made on A before B exists.
    let up = tenant_admin(&a, "acme")
        .upload(
            throng_guest_artifacts::FILTER_KEYWORDS,
            "words",
            "1.0.0",
            "message-filter",
            json!({"words": "x"}),
        )
        .await;
    assert_eq!(up.status, 201, "{:#}", up.body);
    let module = format!("sha256:{}", sha(&up));
    let chain = |mode: &str| json!({"filters": [{"module": module, "params": {"words": "spoiler", "mode": mode}}], "activate": 100});
    let v1 = tenant_admin(&a, "acme")
        .post("/v1/deployments/filters/acme", chain("mask"))
        .await;
    assert_eq!(
        (v1.status, &v1.body["deployment"]["version"]),
        (201, &json!(1)),
        "{:#}",
        v1.body
    );

    // B joins late and runs v1 with the module's bytes, told nothing.
    let b = clustered(&nats, "edge-b").await;
    all_live(&[&a, &b]).await;
    let shown = operator(&b).get(&format!("/v1/modules/{module}")).await;
    assert_eq!(shown.status, 200, "{:#}", shown.body);
    assert_eq!(shown.body[0]["uploader"], "tenant:acme/acme-admin");
    let st = operator(&b).get("/v1/deployments/filters/acme").await;
    assert_eq!(st.body["active"]["version"], 1, "{:#}", st.body);
    let room_b = room_on(&b, "on-b");
    assert_eq!(verdict(&b, &room_b).await, "a ******* here");

    // A change made on B reaches A, whose rooms run it.
    let v2 = tenant_admin(&b, "acme")
        .post("/v1/deployments/filters/acme", chain("reject"))
        .await;
    assert_eq!(
        (v2.status, &v2.body["deployment"]["version"]),
        (201, &json!(2)),
        "{:#}",
        v2.body
    );
    let view = until(&operator(&a), "/v1/deployments/edges", "both edges on v2", |v| {
        running(v, "edge-a", "filters/acme") == Some(2) && running(v, "edge-b", "filters/acme") == Some(2)
    })
    .await;
    for e in view["edges"].as_array().expect("edges") {
        assert_eq!((&e["in_step"], &e["live"]), (&json!(true), &json!(true)), "{view:#}");
    }
    assert_eq!(view["desired"]["filters/acme"]["version"], 2, "{view:#}");
    let room_a = room_on(&a, "on-a");
    assert_eq!(verdict(&a, &room_a).await, "rejected");
    // A tenant sees its own scope only.
    let mine = tenant_admin(&a, "globex").get("/v1/deployments/edges").await;
    assert_eq!(mine.status, 200, "{:#}", mine.body);
    assert!(
        mine.body["desired"].as_object().is_some_and(|d| d.is_empty()),
        "{:#}",
        mine.body
    );

    // Two edges numbering a version at once get two numbers.
    let (ops_a, ops_b) = (operator(&a), operator(&b));
    let (x, y) = tokio::join!(
        ops_a.post("/v1/deployments/filters/acme", json!({"filters": []})),
        ops_b.post("/v1/deployments/filters/acme", json!({"filters": []})),
    );
    assert_eq!((x.status, y.status), (201, 201), "{:#} {:#}", x.body, y.body);
    let mut numbers = [&x, &y].map(|a| a.body["deployment"]["version"].as_u64().expect("version"));
    numbers.sort_unstable();
    assert_eq!(numbers, [3, 4]);

    // A disconnect asked of A closes the user's sessions on B too.
    let on_a = throng_tests::RawSession::hello(&a, a.token("acme", "mallory", "viewer", "*")).await;
    let on_b = throng_tests::RawSession::hello(&b, b.token("acme", "mallory", "viewer", "*")).await;
    let bystander = throng_tests::RawSession::hello(&b, b.token("acme", "alice", "viewer", "*")).await;
    let kicked = operator(&a)
        .post("/v1/tenants/acme/users/mallory/disconnect", json!({"reason": "banned"}))
        .await;
    assert_eq!(kicked.status, 200, "{:#}", kicked.body);
    assert_eq!(
        (&kicked.body["connections"], &kicked.body["unanswered_edges"]),
        (&json!(2), &json!(0)),
        "{:#}",
        kicked.body
    );
    for s in [&on_a, &on_b] {
        assert_eq!(
            throng_tests::close_code(&s.conn, Duration::from_secs(5)).await,
            Some(throng_wire::ErrorCode::Disconnected)
        );
    }
    assert!(bystander.conn.close_reason().is_none());

    // B is down while A rolls back; B comes back and follows.
    let (b, back) = b
        .restart_after(async {
            tenant_admin(&a, "acme")
                .post("/v1/deployments/filters/acme/rollback", json!({"to": 1}))
                .await
        })
        .await;
    assert_eq!(back.status, 200, "{:#}", back.body);
    all_live(&[&a, &b]).await;
    until(&operator(&b), "/v1/deployments/edges", "B back on v1", |v| {
        running(v, "edge-b", "filters/acme") == Some(1)
            && v["edges"]
                .as_array()
                .is_some_and(|es| es.iter().all(|e| e["in_step"] == true))
    })
    .await;
    assert_eq!(verdict(&b, &room_on(&b, "on-b")).await, "a ******* here");
    // B's audit log tells what it took from the cluster, and who did it.
    let log = operator(&b).get("/v1/audit").await;
    let took = log
        .body
        .as_array()
        .expect("entries")
        .iter()
        .rev()
        .find(|e| e["action"] == "deployment.activate" && e["to"] == "v1")
        .cloned()
        .unwrap_or_default();
    assert_eq!(took["who"], "tenant:acme/acme-admin", "{:#}", log.body);
    assert_eq!(took["from"], "v2", "{took:#}");
    assert!(
        took["detail"].as_str().is_some_and(|d| d.contains("cluster")),
        "{took:#}"
    );

    // Made-up values in the bucket are skipped and counted; nothing moves.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
    let kv = js.get_key_value("throng_control").await.expect("bucket");
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    for (key, value) in [
        (format!("a.{}", hex("filters/acme")), "not json".to_owned()),
        (
            format!("a.{}", hex("policies")),
            json!({"version": 1, "percent": 250, "by": "x", "at_ms": 0}).to_string(),
        ),
        (
            format!("d.{}.9", hex("filters/acme")),
            json!({"scope": "policies", "version": 9}).to_string(),
        ),
        (format!("m.{}.{}", hex("operator"), "ab".repeat(32)), "{}".to_owned()),
        ("zz.nothing".to_owned(), "x".to_owned()),
    ] {
        kv.put(key, value.into()).await.expect("put");
    }
    let anonymous = Api::anonymous(b.edge.admin_addr().expect("admin"));
    until(&anonymous, "/metrics", "five made-up values counted", |m| {
        m.as_str()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("throng_control_sync_malformed_total "))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .is_some_and(|n| n >= 5.0)
    })
    .await;
    let st = operator(&b).get("/v1/deployments/filters/acme").await;
    assert_eq!(st.body["active"]["version"], 1, "{:#}", st.body);
    assert_eq!(verdict(&b, &room_on(&b, "on-b")).await, "a ******* here");
    a.edge.shutdown().await;
    b.edge.shutdown().await;
}

/// Listings come in pages: `?limit=` entries, the next page `?after=` the
/// `x-next-after` header, every entry once and in order across the pages,
/// and no header on the last page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_modules_deployments_and_the_audit_are_listed_in_pages() {
    let edge = TestEdge::start(with_admin).await;
    let ops = operator(&edge);
    // A connection joins at most 4 rooms: two viewers make five.
    let viewers = [
        edge.client("acme", "v", "viewer").await,
        edge.client("acme", "w", "viewer").await,
    ];
    let mut rooms = Vec::new();
    for i in 0..5 {
        let viewer = &viewers[i % 2];
        rooms.push(viewer.join(&format!("page-{i}")).await.expect("join"));
    }
    let all = ops.get("/v1/rooms").await;
    assert_eq!(all.body.as_array().map(Vec::len), Some(5), "{:#}", all.body);
    assert_eq!(all.next, None, "one page holds five");
    let mut seen = Vec::new();
    let mut path = "/v1/rooms?limit=2".to_owned();
    for _ in 0..10 {
        let page = ops.get(&path).await;
        assert_eq!(page.status, 200, "{:#}", page.body);
        let entries = page.body.as_array().expect("an array").clone();
        assert!(entries.len() <= 2, "{entries:?}");
        seen.extend(entries.iter().map(|r| r["room"].as_str().unwrap_or("").to_owned()));
        match page.next {
            Some(next) => path = format!("/v1/rooms?limit=2&after={}", throng_tests::api::encode(&next)),
            None => break,
        }
    }
    let want: Vec<String> = (0..5).map(|i| format!("page-{i}")).collect();
    assert_eq!(seen, want);
    refused(&ops.get("/v1/rooms?after=nothing").await, 400, "invalid_request");

    for i in 0..3 {
        let up = ops
            .upload(
                &[throng_guest_artifacts::FILTER_KEYWORDS, &[0, 3, 2, b'v', b'0' + i]].concat(),
                "kw",
                &format!("{i}"),
                "message-filter",
                json!({"words": "x"}),
            )
            .await;
        assert_eq!(up.status, 201, "{:#}", up.body);
    }
    let first = ops.get("/v1/modules?limit=2").await;
    assert_eq!(first.body.as_array().map(Vec::len), Some(2));
    let next = first.next.expect("a third module follows");
    let rest = ops
        .get(&format!(
            "/v1/modules?limit=2&after={}",
            throng_tests::api::encode(&next)
        ))
        .await;
    assert_eq!(rest.body.as_array().map(Vec::len), Some(1), "{:#}", rest.body);
    assert_eq!(rest.next, None);
    let mut hashes: Vec<String> = first
        .body
        .as_array()
        .into_iter()
        .chain(rest.body.as_array())
        .flatten()
        .map(|m| m["sha256"].as_str().unwrap_or("").to_owned())
        .collect();
    let sorted = {
        let mut h = hashes.clone();
        h.sort();
        h
    };
    assert_eq!(hashes, sorted);
    hashes.dedup();
    assert_eq!(hashes.len(), 3);

    // Deployments by scope: three active scopes in pages of two.
    let mask = json!({"filters": [{"module": "builtin:filter-keywords", "params": {"words": "x"}}], "activate": 100});
    for scope in ["filters/acme", "filters/globex"] {
        let made = ops.post(&format!("/v1/deployments/{scope}"), mask.clone()).await;
        assert_eq!(made.status, 201, "{:#}", made.body);
    }
    let native = json!({"policies": [{"module": "native", "params": {}}], "activate": 100});
    assert_eq!(ops.post("/v1/deployments/policies", native).await.status, 201);
    let first = ops.get("/v1/deployments?limit=2").await;
    let scopes = |a: &Answer| -> Vec<String> {
        a.body
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| d["scope"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(scopes(&first), ["filters/acme", "filters/globex"], "{:#}", first.body);
    assert_eq!(
        first.body[0]["versions"].as_array().map(Vec::len),
        Some(1),
        "{:#}",
        first.body
    );
    let next = first.next.clone().expect("a third scope follows");
    let rest = ops
        .get(&format!(
            "/v1/deployments?limit=2&after={}",
            throng_tests::api::encode(&next)
        ))
        .await;
    assert_eq!(scopes(&rest), ["policies"], "{:#}", rest.body);
    assert_eq!(rest.next, None);
    // A tenant's pages hold its own scope only.
    let acme = tenant_admin(&edge, "acme").get("/v1/deployments?limit=1").await;
    assert_eq!(scopes(&acme), ["filters/acme"]);
    assert_eq!(acme.next, None, "nothing else is acme's");

    // The audit log by seq: every entry once and in order, the last page
    // without a cursor.
    let whole = ops.get("/v1/audit").await;
    let seqs = |a: &Answer| -> Vec<u64> {
        a.body
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["seq"].as_u64())
            .collect()
    };
    let want = seqs(&whole);
    assert!(
        want.len() >= 6,
        "3 uploads and 3 deployments at least: {:#}",
        whole.body
    );
    assert_eq!(whole.next, None);
    let mut seen = Vec::new();
    let mut path = "/v1/audit?limit=4".to_owned();
    for _ in 0..want.len() {
        let page = ops.get(&path).await;
        assert_eq!(page.status, 200, "{:#}", page.body);
        assert!(seqs(&page).len() <= 4);
        seen.extend(seqs(&page));
        match page.next {
            Some(next) => path = format!("/v1/audit?limit=4&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, want);
    drop(rooms);
    edge.edge.shutdown().await;
}

/// A module is named by `name@version` or by a unique prefix of its hash
/// as well as by its whole hash (a README reader copied `sha256:d38cc4e5…`
/// and was refused); the deployment stores the whole hash, and a name
/// that could mean two modules is refused with both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_are_named_by_name_at_version_or_a_unique_hash_prefix() {
    let edge = TestEdge::start(with_admin).await;
    let acme = tenant_admin(&edge, "acme");
    let up = acme
        .upload(
            throng_guest_artifacts::FILTER_KEYWORDS,
            "kw",
            "1",
            "message-filter",
            json!({"words": "x"}),
        )
        .await;
    assert_eq!(up.status, 201, "{:#}", up.body);
    let hash = sha(&up);
    // The stored chain's modules.
    let stored = |a: &Answer| -> Vec<Value> {
        let chain = a.body["deployment"]["filters"].as_array().cloned().unwrap_or_default();
        chain.iter().map(|f| f["module"].clone()).collect()
    };
    let whole = vec![json!(format!("sha256:{hash}"))];

    // name@version, then a prefix: both stored as the whole hash.
    let by_name = acme
        .post(
            "/v1/deployments/filters/acme",
            json!({"filters": [{"module": "kw@1", "params": {"words": "x"}}]}),
        )
        .await;
    assert_eq!(by_name.status, 201, "{:#}", by_name.body);
    assert_eq!(stored(&by_name), whole);
    let by_prefix = acme
        .post(
            "/v1/deployments/filters/acme",
            json!({"add": {"module": format!("sha256:{}", &hash[..10]), "params": {"words": "x"}}}),
        )
        .await;
    assert_eq!(by_prefix.status, 201, "{:#}", by_prefix.body);
    assert_eq!(stored(&by_prefix), whole, "the add replaced the same filter");
    let shown = acme.get("/v1/modules/kw@1").await;
    assert_eq!(shown.body[0]["sha256"], hash.as_str(), "{:#}", shown.body);
    assert_eq!(acme.get(&format!("/v1/modules/{}", &hash[..12])).await.status, 200);

    // What names nothing, or too little of a hash, is refused.
    for (module, says) in [
        ("kw@2", "no stored module"),
        ("sha256:0123", "at least 8"),
        ("kw", "expected sha256"),
    ] {
        let a = acme
            .post(
                "/v1/deployments/filters/acme",
                json!({"filters": [{"module": module, "params": {"words": "x"}}]}),
            )
            .await;
        refused(&a, 422, "deployment_refused");
        assert!(a.message().contains(says), "{module}: {}", a.message());
    }
    // Another tenant's name is not a name for globex.
    let globex = tenant_admin(&edge, "globex");
    let a = globex
        .post(
            "/v1/deployments/filters/globex",
            json!({"filters": [{"module": "kw@1", "params": {"words": "x"}}]}),
        )
        .await;
    refused(&a, 422, "deployment_refused");
    refused(&globex.get("/v1/modules/kw@1").await, 404, "not_found");

    // An operator's other module of the same name and version: in acme's
    // scope `kw@1` could be either, and is refused naming both.
    let ops = operator(&edge);
    let other = ops
        .upload(
            throng_test_modules::FILTER_SLOW,
            "kw",
            "1",
            "message-filter",
            json!({"per_message_us": "1"}),
        )
        .await;
    assert_eq!(other.status, 201, "{:#}", other.body);
    let a = acme
        .post(
            "/v1/deployments/filters/acme",
            json!({"filters": [{"module": "kw@1", "params": {"words": "x"}}]}),
        )
        .await;
    refused(&a, 422, "deployment_refused");
    assert!(a.message().contains("names 2 modules"), "{}", a.message());
    assert!(
        a.message().contains(&hash[..16]) && a.message().contains(&sha(&other)[..16]),
        "{}",
        a.message()
    );
    edge.edge.shutdown().await;
}
