//! `kill -9` the edge after group-room acks, restart it on the same data
//! dir: every ack older than the durability window is still in the log.

use std::process::Stdio;
use std::time::Duration;

use throng_client::{Client, ConnectOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_throng");

/// The documented window is one commit interval plus one commit; this test
/// waits well past it before the kill.
const COMMIT_INTERVAL_MS: u64 = 10;

async fn start(config: &std::path::Path) -> (Child, String, std::path::PathBuf) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("serve starts");
    let mut line = String::new();
    let out = child.stdout.as_mut().expect("stdout");
    tokio::time::timeout(Duration::from_secs(20), BufReader::new(out).read_line(&mut line))
        .await
        .expect("ready in time")
        .expect("read");
    let rest = line
        .trim()
        .strip_prefix("throng ready quic=")
        .expect("ready line")
        .to_owned();
    let (addr, cert) = rest.split_once(" cert=").expect("cert");
    // The ready line goes on after the path (webtransport=..., cert_sha256=...).
    let cert = cert.split(' ').next().unwrap_or(cert);
    (child, addr.to_owned(), cert.into())
}

async fn client(addr: &str, cert: &std::path::Path, user: &str) -> Client {
    let out = Command::new(BIN)
        .args(["token", "--tenant", "dev", "--user", user])
        .output()
        .await
        .expect("token");
    let token = String::from_utf8(out.stdout).expect("utf8").trim().to_owned();
    let roots = throng_client::tls::load_certs(cert).expect("cert");
    Client::connect(ConnectOptions::new(addr, roots, token))
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_older_than_the_window_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = \"data\"\n[limits]\nsend_rate_per_sec = 100000\nsend_burst = 100000\n\
             [rooms]\ntick = \"5ms\"\ngroup_rooms = [\"group-*\"]\n\
             group_history = \"all\"\n\
             [storage]\ncommit_interval = \"{COMMIT_INTERVAL_MS}ms\"\n\
             [tenants.dev]\nhs256_secret = \"throng-dev-secret-change-me\"\n"
        ),
    )
    .expect("config");

    let (mut edge, addr, cert) = start(&config).await;
    let c = client(&addr, &cert, "writer").await;
    let _room = c.join("group-log").await.expect("join");
    let mut acked = Vec::new();
    for i in 0..200 {
        let ack = c
            .send("group-log", throng_wire::Kind::Chat, format!("m{i}"))
            .await
            .expect("ack");
        acked.push(ack.seq);
    }
    // Past the window: one interval and a commit (fsync), with a wide margin.
    tokio::time::sleep(Duration::from_millis(COMMIT_INTERVAL_MS * 20)).await;
    edge.kill().await.expect("kill -9");
    let _ = edge.wait().await;

    let (_edge, addr, cert) = start(&config).await;
    // A new member reading the whole log: group_history = "all" above.
    let c = client(&addr, &cert, "reader").await;
    let mut room = c.join_from("group-log", Some(0)).await.expect("resume from the start");
    let mut got = std::mem::take(&mut room.recent);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while got.len() < acked.len() {
            match room.next_batch().await {
                Some(Ok(b)) => got.extend(b.messages),
                _ => break,
            }
        }
    })
    .await;
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, acked, "every acked message survived, in order");
    assert_eq!(got[199].body, b"m199");
    // Numbering continues after the log's end.
    let next = c
        .send("group-log", throng_wire::Kind::Chat, "after restart")
        .await
        .expect("ack");
    assert_eq!(next.seq, acked[199] + 1);
}
