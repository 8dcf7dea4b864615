//! The `throng` binary as a newcomer uses it: serve, token, client listen and
//! send over real QUIC, and a bad config refused with the key named.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_throng");

async fn line_of(child: &mut Child, stdout: bool) -> String {
    let mut line = String::new();
    let read = async {
        if stdout {
            let out = child.stdout.as_mut().expect("piped stdout");
            BufReader::new(out).read_line(&mut line).await
        } else {
            let err = child.stderr.as_mut().expect("piped stderr");
            BufReader::new(err).read_line(&mut line).await
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("a line in time")
        .expect("read");
    line.trim_end().to_owned()
}

async fn output(args: &[&str]) -> std::process::Output {
    tokio::time::timeout(Duration::from_secs(30), Command::new(BIN).args(args).output())
        .await
        .expect("command finishes in time")
        .expect("runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_receives_what_send_sends_with_acks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut serve = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("serve starts");
    let ready = line_of(&mut serve, true).await;
    let rest = ready
        .strip_prefix("throng ready quic=")
        .unwrap_or_else(|| panic!("ready line: {ready}"));
    let (addr, cert) = rest.split_once(" cert=").expect("ready line has cert=");
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "real port: {addr}"
    );
    assert!(std::path::Path::new(cert).exists(), "cert file {cert}");

    let token = |user: &str, role: &str| {
        let user = user.to_owned();
        let role = role.to_owned();
        async move {
            let out = output(&["token", "--tenant", "dev", "--user", &user, "--role", &role]).await;
            assert!(out.status.success(), "token: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).expect("utf8").trim().to_owned()
        }
    };
    let viewer = token("alice", "viewer").await;
    let host = token("bob", "host").await;

    let mut listen = Command::new(BIN)
        .args([
            "client", "--server", addr, "--cert", cert, "--token", &viewer, "listen", "lobby", "--count", "3", "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("listen starts");
    let joined = line_of(&mut listen, false).await;
    assert!(joined.starts_with("joined lobby"), "{joined}");

    let send = output(&[
        "client",
        "--server",
        addr,
        "--cert",
        cert,
        "--token",
        &host,
        "send",
        "lobby",
        "hello from bob",
        "--repeat",
        "3",
        "--rate",
        "50",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&send.stdout);
    assert!(
        send.status.success(),
        "send: {stdout} {}",
        String::from_utf8_lossy(&send.stderr)
    );
    let acks: Vec<&str> = stdout.lines().filter(|l| l.starts_with("ack id=")).collect();
    assert_eq!(acks.len(), 3, "{stdout}");

    let done = tokio::time::timeout(Duration::from_secs(20), listen.wait_with_output())
        .await
        .expect("listen exits after 3 messages")
        .expect("listen output");
    assert!(done.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&done.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 3);
    for (i, v) in lines.iter().enumerate() {
        assert_eq!(v["room"], "lobby");
        assert_eq!(v["sender"], "bob");
        assert_eq!(v["kind"], "chat");
        assert_eq!(v["body"], "hello from bob");
        assert_eq!(v["online"], 2, "listener and sender");
        assert!(v["counters"]["likes"].is_u64());
        assert_eq!(v["seq"], i as u64 + 1);
    }

    // A viewer may not send host messages: the rejection is printed, exit code 2.
    let rejected = output(&[
        "client", "--server", addr, "--cert", cert, "--token", &viewer, "send", "lobby", "hi", "--kind", "host",
    ])
    .await;
    assert_eq!(rejected.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&rejected.stdout).contains("rejected id=1 code=20"));

    // Presence: the sender (bob) is gone, alice's listener too; ask in a batch.
    let online = output(&[
        "client", "--server", addr, "--cert", cert, "--token", &viewer, "online", "alice", "bob", "nobody",
    ])
    .await;
    assert!(online.status.success(), "{}", String::from_utf8_lossy(&online.stderr));
    let text = String::from_utf8_lossy(&online.stdout);
    // The asking connection is alice's own, so alice is online.
    assert!(text.contains("alice\tonline"), "{text}");
    assert!(text.contains("nobody\toffline"), "{text}");

    // The dev certificate is reused on the next start.
    let cert_before = std::fs::read(cert).expect("cert");
    serve.kill().await.expect("kill serve");
    let mut again = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("serve restarts");
    let _ = line_of(&mut again, true).await;
    assert_eq!(std::fs::read(cert).expect("cert"), cert_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[limits]\nmax_frame_bytes = 1\n[tenants.dev]\nhs256_secret = \"0123456789abcdef\"\n",
    )
    .expect("write");
    let out = output(&["serve", "--config", bad.to_str().expect("utf8 path")]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("limits.max_frame_bytes") && err.contains("out of range"),
        "{err}"
    );

    std::fs::write(&bad, "[server]\nlisen = \"127.0.0.1:1\"\n").expect("write");
    let out = output(&["serve", "--config", bad.to_str().expect("utf8 path")]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.lisen") && err.contains("unknown field"), "{err}");
}
