//! Reloads tell the truth: a module that refuses its params fails the whole
//! reload and nothing changes; tenants, keys and filters are reloaded; the
//! settings that need a restart are named. (The same through SIGHUP to a
//! real `throng serve`: host/throng/tests/processes/reload.rs.)

use std::time::Duration;

use throng_client::Client;
use throng_edge::config::{PolicyChoice, TenantConfig};
use throng_tests::{TestEdge, builtin, builtin_policy, collect};
use throng_wire::{ErrorCode, Kind};

fn masking(words: &str) -> throng_edge::config::ModuleUse {
    builtin("filter-keywords", &[("words", words), ("mode", "mask")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_configure_fails_the_whole_reload_and_changes_nothing() {
    let edge = TestEdge::start(|c| {
        // About configure, not time: room for a machine busy elsewhere.
        c.wasm.budget = throng_edge::wasm::Budget::Epoch(Duration::from_millis(200));
        c.policies
            .push(builtin_policy("*", "policy-default", &[("cap_per_sec", "0")]));
        c.filters.insert("acme".into(), vec![masking("scam")]);
    })
    .await;
    let viewer = edge.client("acme", "v", "viewer").await;
    let mut room = viewer.join("lobby").await.expect("join");
    let sender = edge.client("acme", "s", "viewer").await;
    let _own = sender.join("lobby").await.expect("join");

    // A policy whose params its module refuses, beside a good filter change
    // and a new tenant: none of it may apply.
    let mut bad = edge.config.clone();
    if let PolicyChoice::Module(m) = &mut bad.policies[0].policy {
        m.params = vec![("cap_per_sec".into(), "fast".into())];
    }
    bad.filters.insert("acme".into(), vec![masking("hello")]);
    bad.tenants.insert(
        "initech".into(),
        TenantConfig::Hs256 {
            secret: b"initech-secret-0123456789".to_vec(),
        },
    );
    let err = edge.edge.reload(&bad).await.expect_err("refused").to_string();
    assert!(
        err.contains("test.policy-default") && err.contains("cap_per_sec") && err.contains("configure refused"),
        "the error names the module and the reason: {err}"
    );

    // Same for a filter that refuses its params (no `words`).
    let mut bad_filter = edge.config.clone();
    bad_filter
        .filters
        .insert("acme".into(), vec![builtin("filter-keywords", &[("mode", "mask")])]);
    let err = edge.edge.reload(&bad_filter).await.expect_err("refused").to_string();
    assert!(err.contains("test.filter-keywords") && err.contains("words"), "{err}");

    // Nothing changed: the old filter masks, "hello" passes, the new tenant
    // is unknown, and the next good reload is generation 2.
    sender.send("lobby", Kind::Chat, "hello scam").await.expect("ack");
    let (got, _) = collect(&mut room, 1, Duration::from_secs(5)).await;
    assert_eq!(got[0].body, b"hello ****");
    let mut other = edge.config.clone();
    other.tenants.insert(
        "initech".into(),
        TenantConfig::Hs256 {
            secret: b"initech-secret-0123456789".to_vec(),
        },
    );
    let token = {
        let claims = throng_edge::auth::Claims {
            tenant: "initech".into(),
            sub: "peter".into(),
            role: "viewer".into(),
            rooms: "*".into(),
            exp: throng_edge::auth::unix_now() + 600,
            nbf: None,
        };
        throng_edge::auth::sign(&claims, &other.tenants["initech"], None).expect("sign")
    };
    let refused = Client::connect(edge.options(token.clone()))
        .await
        .expect_err("unknown tenant");
    assert_eq!(refused.code(), Some(ErrorCode::UnknownTenant), "{refused}");

    // A good reload: the new tenant and its filter apply, and a changed
    // limit is named as needing a restart, not silently ignored.
    other.filters.insert("initech".into(), vec![masking("tps")]);
    other.limits.max_body_bytes = 8192;
    let r = edge.edge.reload(&other).await.expect("reloads");
    assert_eq!(r.generation, 2);
    assert_eq!(r.needs_restart.len(), 1, "{:?}", r.needs_restart);
    assert!(
        r.needs_restart[0].starts_with("limits.max_body_bytes (4096 -> 8192)"),
        "{:?}",
        r.needs_restart
    );
    let peter = Client::connect(edge.options(token))
        .await
        .expect("the new tenant connects");
    let mut own = peter.join("office").await.expect("join");
    peter.send("office", Kind::Chat, "my tps report").await.expect("ack");
    let (got, _) = collect(&mut own, 1, Duration::from_secs(5)).await;
    assert_eq!(got[0].body, b"my *** report", "the new tenant's filter runs");
    edge.edge.shutdown().await;
}
