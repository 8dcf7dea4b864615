//! The `throng` binary as a newcomer uses it: serve, token, client listen and
//! send over real QUIC, the dev defaults (certificate, server), what a wrong
//! server looks like, logs fit for a pipe, and a bad config refused with the
//! key named.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

async fn output_in(dir: &Path, args: &[&str]) -> std::process::Output {
    tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(BIN).current_dir(dir).args(args).output(),
    )
    .await
    .expect("command finishes in time")
    .expect("runs")
}

async fn token(user: &str, role: &str) -> String {
    let out = output(&["token", "--tenant", "dev", "--user", user, "--role", role]).await;
    assert!(out.status.success(), "token: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf8").trim().to_owned()
}

/// A running `throng serve` and the stderr lines it has written so far
/// (read all along, so a full pipe never blocks it).
struct Serve {
    child: Child,
    /// The `throng ready ...` line.
    ready: String,
    addr: String,
    cert: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Serve {
    async fn start(cwd: &Path, args: &[&str]) -> Serve {
        let mut child = Command::new(BIN)
            .current_dir(cwd)
            .arg("serve")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("serve starts");
        let ready = line_of(&mut child, true).await;
        let rest = ready
            .strip_prefix("throng ready quic=")
            .unwrap_or_else(|| panic!("ready line: {ready}"));
        let (addr, cert) = rest.split_once(" cert=").expect("ready line has cert=");
        // The ready line goes on after the path (webtransport=..., cert_sha256=...).
        let cert = cert.split(' ').next().unwrap_or(cert);
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let sink = Arc::clone(&stderr);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().expect("lock").push(line);
            }
        });
        Serve {
            child,
            ready: ready.trim().to_owned(),
            addr: addr.to_owned(),
            cert: cert.to_owned(),
            stderr,
        }
    }

    /// Waits (bounded) until the edge has logged at least `n` lines.
    async fn log_lines(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let lines = self.stderr.lock().expect("lock").clone();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Asks the edge whether `user` is online until the answer is `want`, for
/// at most 3 s: far below the 30 s idle timeout a connection that was not
/// closed would linger for.
async fn until_online_is(serve: &Serve, asker: &str, user: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let out = output(&[
            "client",
            "--server",
            &serve.addr,
            "--cert",
            &serve.cert,
            "--token",
            asker,
            "online",
            user,
        ])
        .await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if text == format!("{user}\t{want}") || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_receives_what_send_sends_with_acks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf8 path");
    let serve = Serve::start(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--data-dir", data],
    )
    .await;
    let (addr, cert) = (serve.addr.as_str(), serve.cert.as_str());
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "real port: {addr}"
    );
    assert!(std::path::Path::new(cert).exists(), "cert file {cert}");

    let viewer = token("alice", "viewer").await;
    let host = token("bob", "host").await;
    let client = |token: &str, rest: &[&str]| {
        let mut args = vec!["client", "--server", addr, "--cert", cert, "--token"];
        args.push(token);
        args.extend_from_slice(rest);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };

    let mut listen = Command::new(BIN)
        .args(client(&viewer, &["listen", "lobby", "--count", "4", "--json"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("listen starts");
    let joined = line_of(&mut listen, false).await;
    assert!(joined.starts_with("joined lobby"), "{joined}");

    let send = |token: &str, rest: &[&str]| {
        let args = client(token, rest);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            output(&args).await
        }
    };
    let sent = send(
        &host,
        &["send", "lobby", "hello from bob", "--repeat", "3", "--rate", "50"],
    )
    .await;
    let stdout = String::from_utf8_lossy(&sent.stdout);
    assert!(
        sent.status.success(),
        "send: {stdout} {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let acks: Vec<&str> = stdout.lines().filter(|l| l.starts_with("ack id=")).collect();
    assert_eq!(acks.len(), 3, "{stdout}");
    // A like is folded into the counters: the listener sees a batch with no
    // message of its own, only likes.
    let liked = send(&viewer, &["send", "lobby", "<3", "--kind", "like"]).await;
    assert!(liked.status.success(), "{}", String::from_utf8_lossy(&liked.stderr));
    let last = send(&host, &["send", "lobby", "after the like"]).await;
    assert!(last.status.success(), "{}", String::from_utf8_lossy(&last.stderr));

    let done = tokio::time::timeout(Duration::from_secs(20), listen.wait_with_output())
        .await
        .expect("listen exits after 4 messages")
        .expect("listen output");
    assert!(done.status.success());
    let lines = json_lines(&done.stdout);
    let messages: Vec<&serde_json::Value> = lines.iter().filter(|v| v["type"] == "message").collect();
    assert_eq!(messages.len(), 4, "{lines:?}");
    // A livecast room numbers above anything an earlier life of it handed
    // out (see docs/architecture.md, "Numbers and epochs"): consecutive
    // from there.
    let first = messages[0]["seq"].as_u64().expect("a seq");
    for (i, v) in messages.iter().take(3).enumerate() {
        assert_eq!(v["room"], "lobby");
        assert_eq!(v["sender"], "bob");
        assert_eq!(v["kind"], "chat");
        assert_eq!(v["body"], "hello from bob");
        assert_eq!(v["recent"], false);
        assert_eq!(v["online"], 2, "listener and sender");
        assert_eq!(v["seq"], first + i as u64);
        assert!(v["epoch"].as_u64().is_some_and(|e| e > 0), "{v}");
    }
    assert_eq!(messages[3]["body"], "after the like");
    let likes: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["type"] == "batch" && v["likes"].as_u64() > Some(0))
        .collect();
    assert_eq!(likes.len(), 1, "one batch carries the like: {lines:?}");
    assert_eq!(likes[0]["likes"], 1);
    assert_eq!(likes[0]["room"], "lobby");

    // A late joiner sees what the join brings, marked recent.
    let late = send(&viewer, &["listen", "lobby", "--count", "2", "--json"]).await;
    assert!(late.status.success(), "{}", String::from_utf8_lossy(&late.stderr));
    let recent = json_lines(&late.stdout);
    assert_eq!(recent.len(), 2, "{recent:?}");
    let oldest = recent[0]["seq"].as_u64().expect("a seq");
    for (i, v) in recent.iter().enumerate() {
        assert_eq!(v["type"], "message");
        assert_eq!(v["recent"], true);
        assert_eq!(v["sender"], "bob");
        assert_eq!(v["seq"], oldest + i as u64, "oldest first: {recent:?}");
    }

    // A viewer may not send host messages: the rejection is printed, exit code 2.
    let rejected = send(&viewer, &["send", "lobby", "hi", "--kind", "host"]).await;
    assert_eq!(rejected.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&rejected.stdout).contains("rejected id=1 code=20"));

    // Presence: the asking connection is alice's own, so alice is online;
    // bob's send closed its connection on exit, so he is gone at once.
    let online = send(&viewer, &["online", "alice", "bob", "nobody"]).await;
    assert!(online.status.success(), "{}", String::from_utf8_lossy(&online.stderr));
    let text = String::from_utf8_lossy(&online.stdout);
    assert!(text.contains("alice\tonline"), "{text}");
    assert!(text.contains("nobody\toffline"), "{text}");
    assert_eq!(until_online_is(&serve, &viewer, "bob", "offline").await, "bob\toffline");
    // `online` closes its connection on exit too.
    let carol = token("carol", "viewer").await;
    let asked = send(&carol, &["online", "carol"]).await;
    assert_eq!(String::from_utf8_lossy(&asked.stdout).trim(), "carol\tonline");
    assert_eq!(
        until_online_is(&serve, &viewer, "carol", "offline").await,
        "carol\toffline"
    );

    // Logs into a pipe carry no colour codes.
    let logs = serve.log_lines(1).await;
    assert!(logs.iter().any(|l| l.contains("INFO")), "{logs:?}");
    assert!(logs.iter().all(|l| !l.contains('\x1b')), "{logs:?}");

    // The dev certificate is reused on the next start.
    let cert_before = std::fs::read(cert).expect("cert");
    let Serve { mut child, .. } = serve;
    child.kill().await.expect("kill serve");
    let _again = Serve::start(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--data-dir", data],
    )
    .await;
    assert_eq!(std::fs::read(cert).expect("cert"), cert_before);
}

/// `throng serve` and `throng client` on their defaults, from the same
/// directory, find each other: the client trusts the dev certificate in
/// `.throng/` unasked. Needs 127.0.0.1:4433 (the dev default): in a
/// network namespace of its own where it can have one, so a running dev
/// edge does not fail it.
#[test]
fn dev_defaults_json_logs_and_a_wrong_server() {
    crate::common::in_own_netns(
        "cli::dev_defaults_json_logs_and_a_wrong_server",
        dev_defaults_json_logs_and_a_wrong_server_here,
    );
}

async fn dev_defaults_json_logs_and_a_wrong_server_here() {
    let dir = tempfile::tempdir().expect("tempdir");
    let serve = Serve::start(dir.path(), &["--admin", "127.0.0.1:0", "--log-format", "json"]).await;
    assert_eq!(serve.addr, "127.0.0.1:4433", "the dev default");
    // The ready line names where the admin endpoint and the dashboard are.
    let admin = serve
        .ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("admin=http://"))
        .unwrap_or_else(|| panic!("no admin= in {}", serve.ready));
    assert!(
        serve.ready.contains(&format!("dashboard=http://{admin}/dashboard")),
        "{}",
        serve.ready
    );
    let dave = token("dave", "viewer").await;
    let out = output_in(dir.path(), &["client", "--token", &dave, "online", "dave"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "dave\tonline");

    // --log-format json: every line is one JSON object with a level.
    let logs = serve.log_lines(2).await;
    assert!(logs.len() >= 2, "{logs:?}");
    for line in &logs {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
    }

    // Elsewhere the dev certificate is not assumed.
    let other = tempfile::tempdir().expect("tempdir");
    let out = output_in(other.path(), &["client", "--token", &dave, "online", "dave"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dev-cert.pem") && err.contains("--cert"), "{err}");

    // A server that never answers: a clear error within 2 s, not a hang.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let silent = silent.local_addr().expect("addr").to_string();
    let out = output_in(
        other.path(),
        &["client", "--server", &silent, "--token", &dave, "online", "x"],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--cert is needed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let started = Instant::now();
    let out = output_in(
        other.path(),
        &[
            "client",
            "--server",
            &silent,
            "--cert",
            &serve.cert,
            "--token",
            &dave,
            "online",
            "x",
        ],
    )
    .await;
    let took = started.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("no answer from {silent}")), "{err}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
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

/// A listener whose token runs out mid-session is told why, with the code
/// and the reason, every time: on a090a11 it sometimes got only "the edge
/// ended room `lobby` after 0 messages" (the room's end raced the error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_says_why_the_edge_ended_the_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf8 path");
    let serve = Serve::start(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--admin", "off", "--data-dir", data],
    )
    .await;
    let out = output(&["token", "--tenant", "dev", "--user", "brief", "--ttl", "1s"]).await;
    assert!(out.status.success(), "token: {}", String::from_utf8_lossy(&out.stderr));
    let brief = String::from_utf8(out.stdout).expect("utf8").trim().to_owned();
    // The token's 1 s and the edge's 5 s of leeway.
    let listened = tokio::time::timeout(
        Duration::from_secs(30),
        output(&[
            "client",
            "--server",
            &serve.addr,
            "--cert",
            &serve.cert,
            "--token",
            &brief,
            "listen",
            "lobby",
        ]),
    )
    .await
    .expect("the edge ends the session within its token's life and leeway");
    let stderr = String::from_utf8_lossy(&listened.stderr);
    assert!(!listened.status.success());
    assert!(stderr.contains("TokenExpired") && stderr.contains("11"), "{stderr}");
    assert!(stderr.contains("token expired"), "{stderr}");
}
