//! SIGHUP as an operator uses it: edit the config file of a running
//! `throng serve`, send SIGHUP, and see the effect (a new tenant can send;
//! a changed limit is named as needing a restart), and that a bad config
//! (a module refusing its params, a misspelt key) changes nothing and says
//! why.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_throng");

fn config(tenants: &str, cap: &str, max_body: u32) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "data"

[limits]
max_body_bytes = {max_body}

# About reload, not time: room for a machine busy elsewhere.
[wasm]
call_budget = "200ms"

[[policy]]
module = "builtin:policy-default"
params = {{ cap_per_sec = {cap} }}

{tenants}
"#
    )
}

const DEV: &str = r#"
[tenants.dev]
hs256_secret = "dev-secret-0123456789"
filters = [{ module = "builtin:filter-keywords", params = { words = ["scam"], mode = "mask" } }]
"#;

const NEWCO: &str = r#"
[tenants.newco]
hs256_secret = "newco-secret-0123456789"
"#;

async fn run(args: &[&str]) -> std::process::Output {
    tokio::time::timeout(Duration::from_secs(30), Command::new(BIN).args(args).output())
        .await
        .expect("finishes in time")
        .expect("runs")
}

async fn token(config: &Path, tenant: &str) -> Result<String, String> {
    let config = config.to_str().expect("utf-8 path");
    let out = run(&["token", "--config", config, "--tenant", tenant, "--user", "op"]).await;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `throng client send`: its exit status and output.
async fn send(addr: &str, cert: &str, token: &str, body: &str) -> (bool, String) {
    let out = run(&[
        "client", "--server", addr, "--cert", cert, "--token", token, "send", "lobby", body,
    ])
    .await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Waits for a log line containing `needle`; returns it and the lines seen.
async fn wait_log(lines: &mut mpsc::UnboundedReceiver<String>, needle: &str) -> (String, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, lines.recv()).await {
            Ok(Some(line)) if line.contains(needle) => return (line, seen),
            Ok(Some(line)) => seen.push(line),
            Ok(None) => panic!("serve exited before logging `{needle}`: {seen:#?}"),
            Err(_) => panic!("no `{needle}` in the log within 30 s: {seen:#?}"),
        }
    }
}

fn hup(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_tenants_names_restart_settings_and_a_bad_config_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, config(DEV, "0", 4096)).expect("write config");
    let mut serve = Command::new(BIN)
        .args(["serve", "--admin", "off", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("serve starts");
    let pid = serve.id().expect("pid");
    let (tx, mut lines) = mpsc::unbounded_channel();
    let stderr = serve.stderr.take().expect("stderr");
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut ready = String::new();
    let out = serve.stdout.as_mut().expect("stdout");
    tokio::time::timeout(Duration::from_secs(60), BufReader::new(out).read_line(&mut ready))
        .await
        .expect("ready in time")
        .expect("read");
    let rest = ready.trim().strip_prefix("throng ready quic=").expect("ready line");
    let (addr, cert) = rest.split_once(" cert=").expect("cert=");
    // The ready line goes on after the path (webtransport=..., cert_sha256=...).
    let cert = cert.split(' ').next().unwrap_or(cert);
    let (addr, cert) = (addr.to_owned(), cert.to_owned());

    let dev = token(&path, "dev").await.expect("dev token");
    assert!(token(&path, "newco").await.is_err(), "newco is not configured yet");
    let (ok, text) = send(&addr, &cert, &dev, "hello").await;
    assert!(ok, "{text}");

    // Edit: a new tenant and a new body limit. SIGHUP.
    std::fs::write(&path, config(&format!("{DEV}{NEWCO}"), "0", 8192)).expect("edit");
    hup(pid);
    let (_, before) = wait_log(&mut lines, "SIGHUP: config reloaded").await;
    assert!(
        before
            .iter()
            .any(|l| l.contains("needs a restart") && l.contains("limits.max_body_bytes (4096 -> 8192)")),
        "the unapplied limit is named: {before:#?}"
    );
    let newco = token(&path, "newco").await.expect("newco token");
    let (ok, text) = send(&addr, &cert, &newco, "hi from newco").await;
    assert!(ok, "the new tenant is live after SIGHUP: {text}");

    // Edit: the policy's params are refused by its module, and dev is
    // gone. SIGHUP: the reload fails as a whole, naming module and reason.
    std::fs::write(&path, config(NEWCO, "\"fast\"", 8192)).expect("edit");
    hup(pid);
    let (line, _) = wait_log(&mut lines, "config reload failed").await;
    assert!(
        line.contains("nothing changed")
            && line.contains("policy[0].module")
            && line.contains("builtin:policy-default")
            && line.contains("cap_per_sec"),
        "{line}"
    );
    // Nothing changed: dev's token still works, and so does newco's.
    let (ok, text) = send(&addr, &cert, &dev, "still here").await;
    assert!(ok, "dev kept working after the failed reload: {text}");
    let (ok, text) = send(&addr, &cert, &newco, "me too").await;
    assert!(ok, "{text}");

    // Edit: a misspelt key (and dev gone again). SIGHUP: the file does not
    // parse as a config, the key is named, and again nothing changes.
    let typo = config(NEWCO, "0", 8192).replace("max_body_bytes", "max_body_byte");
    std::fs::write(&path, typo).expect("edit");
    hup(pid);
    let (line, _) = wait_log(&mut lines, "config reload failed").await;
    assert!(
        line.contains("nothing changed") && line.contains("max_body_byte"),
        "{line}"
    );
    let (ok, text) = send(&addr, &cert, &dev, "still here after a typo").await;
    assert!(ok, "dev kept working after the unparsable reload: {text}");

    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    let status = tokio::time::timeout(Duration::from_secs(20), serve.wait())
        .await
        .expect("serve stops")
        .expect("status");
    assert!(status.success());
}
