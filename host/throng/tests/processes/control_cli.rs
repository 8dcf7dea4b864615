//! `throng module` and `throng admin` against a running `throng serve`:
//! an operator's and a tenant's commands, each answer checked, and errors
//! that say what went wrong with a non-zero exit.

use std::time::Duration;

use crate::common::{BIN, OPERATOR_KEY, Serve};
use serde_json::Value;
use tokio::process::Command;

struct Cli {
    admin: String,
    key: String,
}

impl Cli {
    async fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            Command::new(BIN)
                .args(args)
                .args(["--admin", &format!("http://{}", self.admin)])
                .env("THRONG_ADMIN_KEY", &self.key)
                .output(),
        )
        .await
        .expect("in time")
        .expect("runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let (ok, out, err) = self.run(&all).await;
        assert!(ok, "{args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
    }
}

/// `throng serve` on free ports in `dir`, and an operator's CLI for it.
async fn serve_with_operator(dir: &std::path::Path) -> (Serve, Cli) {
    let data = dir.join("data");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().expect("utf-8"),
    ];
    let edge = Serve::start(dir, &args).await;
    let ops = Cli {
        admin: edge.admin.clone(),
        key: OPERATOR_KEY.into(),
    };
    (edge, ops)
}

/// A module file to upload: the built-in keyword filter's bytes.
fn keyword_filter_file(dir: &std::path::Path) -> String {
    let wasm = dir.join("kw.wasm");
    std::fs::write(&wasm, throng_guest_artifacts::FILTER_KEYWORDS).expect("write");
    wasm.to_str().expect("utf-8").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_and_a_tenant_drive_the_control_plane_from_the_shell() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (edge, ops) = serve_with_operator(dir.path()).await;
    let wasm = keyword_filter_file(dir.path());
    let wasm = wasm.as_str();

    let (ok, out, err) = ops
        .run(&[
            "module",
            "upload",
            wasm,
            "--name",
            "kw",
            "--version",
            "1.0.0",
            "--world",
            "message-filter",
            "--param",
            "words=scam",
        ])
        .await;
    assert!(ok && out.starts_with("stored: sha256:"), "{out}{err}");
    let hash = out.split_whitespace().nth(1).expect("hash").to_owned();
    let list = ops.json(&["module", "list"]).await;
    assert_eq!(list[0]["name"], "kw");
    let show = ops.json(&["module", "show", &hash]).await;
    assert_eq!(show[0]["world"], "message-filter");

    // A refused upload says which step and why, and exits 1.
    let policy = dir.path().join("policy.wasm");
    std::fs::write(&policy, throng_guest_artifacts::POLICY_DEFAULT).expect("write");
    let (ok, _, err) = ops
        .run(&[
            "module",
            "upload",
            policy.to_str().expect("utf-8"),
            "--name",
            "p",
            "--version",
            "1",
            "--world",
            "message-filter",
        ])
        .await;
    assert!(
        !ok && err.contains("module_refused") && err.contains("[world]"),
        "{err}"
    );

    // Deploy to the dev tenant's filters, then another version on half the rooms, then roll back.
    let d = ops
        .json(&[
            "module",
            "deploy",
            &hash,
            "--tenant",
            "dev",
            "--param",
            "words=scam",
            "--note",
            "first",
            // The dev chain's keyword mask goes: said, not silent.
            "--replace",
        ])
        .await;
    // (The dev config's own filter chain seeded v1.)
    let v1 = d["active"]["version"].as_u64().expect("active");
    assert_eq!(d["deployment"]["version"].as_u64(), Some(v1), "{d:#}");
    let d2 = ops
        .json(&[
            "module",
            "deploy",
            &hash,
            "--tenant",
            "dev",
            "--param",
            "words=spam",
            "--percent",
            "0",
        ])
        .await;
    let v2 = d2["deployment"]["version"].as_u64().expect("version");
    assert_eq!(v2, v1 + 1);
    assert!(d2.get("active").is_none(), "0% activates nothing: {d2:#}");
    let r = ops
        .json(&[
            "module",
            "rollout",
            "filters/dev",
            "--version",
            &v2.to_string(),
            "--percent",
            "50",
        ])
        .await;
    assert_eq!(
        (r["percent"].as_u64(), r["base"].as_u64()),
        (Some(50), Some(v1)),
        "{r:#}"
    );
    let (ok, out, _) = ops.run(&["module", "status", "filters/dev"]).await;
    assert!(
        ok && out.contains(&format!("v{v2} on 50% of rooms (v{v1} on the rest)")) && out.contains("first"),
        "{out}"
    );
    let (ok, out, _) = ops.run(&["module", "edges"]).await;
    assert!(
        ok && out.contains(&format!("filters/dev v{v2} on 50% of rooms (v{v1} on the rest)"))
            && out.contains("in step"),
        "{out}"
    );
    let (ok, out, _) = ops.run(&["module", "rollback", "filters/dev"]).await;
    assert!(ok && out.contains(&format!("back to v{v1}")), "{out}");
    let status = ops.json(&["module", "status"]).await;
    assert!(
        status.as_array().is_some_and(|s| s
            .iter()
            .any(|s| s["scope"] == "filters/dev" && s["active"]["version"] == v1)),
        "{status:#}"
    );

    // A tenant's administrator, with a token from `throng token`.
    let token = Command::new(BIN)
        .args([
            "token",
            "--tenant",
            "dev",
            "--user",
            "ops-bot",
            "--role",
            "tenant-admin",
        ])
        .output()
        .await
        .expect("token");
    let tenant = Cli {
        admin: edge.admin.clone(),
        key: String::from_utf8_lossy(&token.stdout).trim().to_owned(),
    };
    assert_eq!(
        tenant.json(&["module", "list"]).await,
        serde_json::json!([]),
        "operators' modules are not the tenant's"
    );
    let (ok, _, err) = tenant.run(&["module", "deploy", "native", "--policies"]).await;
    assert!(!ok && err.contains("403 forbidden"), "{err}");
    let (ok, out, err) = tenant
        .run(&[
            "admin",
            "publish",
            "dev",
            "lobby",
            "hello from the backend",
            "--kind",
            "host",
        ])
        .await;
    assert!(ok && out.starts_with("published as seq "), "{out}{err}");
    let rooms = tenant.json(&["admin", "rooms"]).await;
    assert_eq!(rooms[0]["room"], "lobby", "{rooms:#}");
    let (ok, out, _) = tenant.run(&["admin", "tenants"]).await;
    assert!(ok && out.starts_with("dev "), "{out}");
    let (ok, out, _) = tenant.run(&["admin", "disconnect", "dev", "nobody"]).await;
    assert!(ok && out.contains("0 connections closed"), "{out}");
    let audit = ops.json(&["admin", "audit"]).await;
    let actions: Vec<&str> = audit
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    for want in [
        "module.upload",
        "deployment.create",
        "deployment.activate",
        "deployment.rollback",
        "user.disconnect",
    ] {
        assert!(actions.contains(&want), "{want} in {actions:?}");
    }

    // Wrong key: a clear error and exit 1.
    let wrong = Cli {
        admin: edge.admin.clone(),
        key: "not-a-key-0123456789abcdef".into(),
    };
    let (ok, _, err) = wrong.run(&["admin", "rooms"]).await;
    assert!(!ok && err.contains("401 unauthenticated"), "{err}");
    let (ok, _, err) = ops
        .run(&["module", "rollout", "elsewhere", "--version", "1", "--percent", "5"])
        .await;
    assert!(
        !ok && err.contains("a scope is `policies` or `filters/<tenant>`"),
        "{err}"
    );
    drop(edge);
}

/// On a090a11, `deploy --policies --rooms 'show-*'` replaced the whole rule
/// set: every other room lost its `*` rule and ran `native`. Now such a
/// deploy is refused with both resulting sets shown, `--add` changes one
/// rule and keeps the rest, `--remove` takes one out, and `--dry-run`
/// names the live rooms a change would move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_one_policy_rule_keeps_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (edge, ops) = serve_with_operator(dir.path()).await;
    let rules = |status: &Value| -> Vec<(String, String)> {
        let v = status["active"]["version"].as_u64().expect("active");
        let d = status["versions"]
            .as_array()
            .and_then(|vs| vs.iter().find(|d| d["version"] == v))
            .expect("the active version");
        d["policies"]
            .as_array()
            .expect("rules")
            .iter()
            .map(|r| {
                (
                    r["rooms"].as_str().unwrap_or("").to_owned(),
                    r["params"]["cap_per_sec"].to_string(),
                )
            })
            .collect()
    };
    // Two live rooms: one the new rule names, one it does not.
    for room in ["show-1", "lobby"] {
        let (ok, _, err) = ops
            .run(&["admin", "publish", "dev", room, "hi", "--kind", "host"])
            .await;
        assert!(ok, "{err}");
    }
    let before = ops.json(&["module", "status", "policies"]).await;
    assert_eq!(rules(&before), [("*".to_owned(), "\"20\"".to_owned())], "{before:#}");

    let show = [
        "module",
        "deploy",
        "builtin:policy-default",
        "--policies",
        "--rooms",
        "show-*",
        "--param",
        "cap_per_sec=5",
    ];
    let (ok, _, err) = ops.run(&show).await;
    assert!(!ok, "a deploy that drops the `*` rule went through");
    assert!(
        err.contains("would drop") && err.contains("--add") && err.contains("--replace") && err.contains("rooms *"),
        "{err}"
    );
    assert_eq!(
        rules(&ops.json(&["module", "status", "policies"]).await),
        rules(&before)
    );

    let mut dry = show.to_vec();
    dry.extend(["--add", "--dry-run"]);
    let plan = ops.json(&dry).await;
    assert_eq!(plan["rooms_changing"], serde_json::json!(["dev/show-1"]), "{plan:#}");
    assert_eq!(plan["set"]["policies"].as_array().map(Vec::len), Some(2), "{plan:#}");
    let (ok, out, _) = ops.run(&dry).await;
    assert!(
        ok && out.contains("rooms show-*") && out.contains("rooms *") && out.contains("dev/show-1"),
        "{out}"
    );
    assert_eq!(
        rules(&ops.json(&["module", "status", "policies"]).await),
        rules(&before),
        "a dry run deployed"
    );

    let mut add = show.to_vec();
    add.push("--add");
    let (ok, out, err) = ops.run(&add).await;
    assert!(ok, "{out}{err}");
    let after = ops.json(&["module", "status", "policies"]).await;
    assert_eq!(
        rules(&after),
        [
            ("show-*".to_owned(), "\"5\"".to_owned()),
            ("*".to_owned(), "\"20\"".to_owned())
        ],
        "{after:#}"
    );
    // The same rooms again: that rule changes in place, nothing else.
    let (ok, _, err) = ops
        .run(&[
            "module",
            "deploy",
            "builtin:policy-default",
            "--policies",
            "--rooms",
            "show-*",
            "--param",
            "cap_per_sec=9",
            "--add",
        ])
        .await;
    assert!(ok, "{err}");
    assert_eq!(
        rules(&ops.json(&["module", "status", "policies"]).await),
        [
            ("show-*".to_owned(), "\"9\"".to_owned()),
            ("*".to_owned(), "\"20\"".to_owned())
        ]
    );
    let (ok, _, err) = ops
        .run(&["module", "deploy", "--policies", "--rooms", "show-*", "--remove"])
        .await;
    assert!(ok, "{err}");
    assert_eq!(
        rules(&ops.json(&["module", "status", "policies"]).await),
        rules(&before)
    );
    let (ok, _, err) = ops
        .run(&["module", "deploy", "--policies", "--rooms", "nowhere-*", "--remove"])
        .await;
    assert!(
        !ok && err.contains("no rule for tenant `*`, rooms `nowhere-*`"),
        "{err}"
    );
    drop(edge);
}

/// Upload and deploy in one step, and a module named by `name@version`
/// afterwards: what an operator of a serverless platform expects, and
/// the deployment still records the whole hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_is_uploaded_and_deployed_in_one_step_then_named_by_name_and_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_edge, ops) = serve_with_operator(dir.path()).await;
    let wasm = keyword_filter_file(dir.path());
    let wasm = wasm.as_str();
    let upload = |extra: &'static [&'static str]| {
        let mut args = vec![
            "module",
            "upload",
            wasm,
            "--name",
            "kw",
            "--version",
            "2.0.0",
            "--world",
            "message-filter",
            "--param",
            "words=scam",
        ];
        args.extend_from_slice(extra);
        args
    };
    // Where without --deploy is a mistake, said before anything is stored.
    let (ok, _, err) = ops.run(&upload(&["--tenant", "dev"])).await;
    assert!(!ok && err.contains("--deploy"), "{err}");
    assert_eq!(ops.json(&["module", "list"]).await, serde_json::json!([]));

    let (ok, out, err) = ops
        .run(&upload(&["--deploy", "--tenant", "dev", "--add", "--note", "one step"]))
        .await;
    assert!(ok, "{out}{err}");
    let mut lines = out.lines();
    let stored = lines.next().unwrap_or_default();
    assert!(stored.starts_with("stored: sha256:"), "{out}");
    let hash = stored.split_whitespace().nth(1).expect("hash").to_owned();
    let created = lines.next().unwrap_or_default();
    assert!(
        created.starts_with("filters/dev v") && created.contains("created"),
        "{out}"
    );
    let version: u64 = created
        .trim_start_matches("filters/dev v")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a version");
    let status = ops.json(&["module", "status", "filters/dev"]).await;
    assert_eq!(status["active"]["version"].as_u64(), Some(version), "{status:#}");
    let deployed = status["versions"]
        .as_array()
        .and_then(|v| v.iter().find(|d| d["version"].as_u64() == Some(version)))
        .expect("the new version")
        .clone();
    let chain: Vec<&str> = deployed["filters"]
        .as_array()
        .expect("filters")
        .iter()
        .filter_map(|f| f["module"].as_str())
        .collect();
    assert!(chain.contains(&hash.as_str()), "{deployed:#}");

    // By name and version from now on, and by a prefix of the hash.
    let show = ops.json(&["module", "show", "kw@2.0.0"]).await;
    assert_eq!(
        show[0]["sha256"].as_str().map(|h| format!("sha256:{h}")),
        Some(hash.clone())
    );
    let (ok, out, err) = ops
        .run(&[
            "module",
            "deploy",
            "kw@2.0.0",
            "--tenant",
            "dev",
            "--remove",
            "--dry-run",
        ])
        .await;
    assert!(ok && out.starts_with("filters/dev would be"), "{out}{err}");
    assert!(!out.contains(&hash[7..]), "the dry run still lists it: {out}");
    let prefix = &hash[..15];
    let (ok, out, err) = ops
        .run(&["module", "deploy", prefix, "--tenant", "dev", "--remove"])
        .await;
    assert!(ok && out.contains("created"), "{out}{err}");
}

/// A file that is not Wasm is refused in one line that says so (not a
/// pretty-printed list of bytes), the error names the call without its
/// query string, and the audit log reads with times and filters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_read_in_one_line_and_the_audit_filters_and_shows_times() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_edge, ops) = serve_with_operator(dir.path()).await;
    let text = dir.path().join("notes.wasm");
    std::fs::write(&text, "hello, not wasm").expect("write");
    let (ok, _, err) = ops
        .run(&[
            "module",
            "upload",
            text.to_str().expect("utf-8"),
            "--name",
            "n",
            "--version",
            "1",
            "--world",
            "message-filter",
            "--param",
            "secret=hunter2",
        ])
        .await;
    assert!(!ok, "{err}");
    let err = err.trim_end();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("not a WebAssembly file: it starts with 68 65 6c 6c"),
        "{err}"
    );
    assert!(
        err.contains("POST /v1/modules: 422") && !err.contains("hunter2"),
        "{err}"
    );

    // The edge-config seeds are audited as `edge-config`, at start.
    let before = ops.json(&["admin", "audit"]).await;
    let all = before.as_array().expect("entries").len();
    assert!(all >= 2, "{before:#}");
    let (ok, out, err) = ops
        .run(&["admin", "audit", "--action", "deployment", "--since", "10m"])
        .await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(!lines.is_empty(), "{out}");
    for line in &lines {
        // #<seq> <RFC 3339 time> <who> deployment.<what> ...
        let mut words = line.split_whitespace();
        let (_, at, _, action) = (words.next(), words.next(), words.next(), words.next());
        let at = at.unwrap_or_default();
        assert!(at.len() == 20 && at.ends_with('Z') && at.contains('T'), "{line}");
        assert!(action.is_some_and(|a| a.starts_with("deployment.")), "{line}");
    }
    let none = ops.json(&["admin", "audit", "--who", "operator:nobody"]).await;
    assert_eq!(none, serde_json::json!([]));
    let later = ops.json(&["admin", "audit", "--since", "2999-01-01T00:00:00Z"]).await;
    assert_eq!(later, serde_json::json!([]));
    let scoped = ops.json(&["admin", "audit", "--target", "policies"]).await;
    let scoped = scoped.as_array().expect("entries");
    assert!(!scoped.is_empty() && scoped.len() < all, "{scoped:#?}");
    assert!(scoped.iter().all(|e| e["target"] == "policies"), "{scoped:#?}");
    let (ok, _, err) = ops.run(&["admin", "audit", "--since", "yesterday-ish"]).await;
    assert!(!ok && err.contains("RFC 3339"), "{err}");
}
