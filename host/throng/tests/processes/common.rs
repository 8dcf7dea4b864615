//! What the process tests and the failover benchmark share: `throng serve`
//! edges in a cluster over a real nats-server, and clients of them.
// Each test binary (and the benchmark) uses a part of this.
#![allow(dead_code)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use throng_tests::nats::NatsServer;

pub const BIN: &str = env!("CARGO_BIN_EXE_throng");

/// Set in the copy of the test binary that runs inside a network
/// namespace of its own.
pub const IN_NETNS: &str = "THRONG_TEST_IN_NETNS";

/// Runs test `name` of this binary again inside a network namespace of
/// its own (`unshare -rn`, loopback up), where the dev ports are free
/// whatever runs on this machine (a `throng serve` left running from the
/// README's first command). None where unprivileged namespaces are not
/// allowed: the test then runs here and needs those ports free.
pub fn rerun_in_own_netns(name: &str) -> Option<std::process::ExitStatus> {
    if std::env::var_os(IN_NETNS).is_some() {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    let works = std::process::Command::new("unshare")
        .args(["-rn", "ip", "link", "set", "lo", "up"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        eprintln!("no network namespace here: {name} needs the dev ports free");
        return None;
    }
    std::process::Command::new("unshare")
        .args(["-rn", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(IN_NETNS, "1")
        .status()
        .ok()
}

/// Runs test `name` (this very test) in a network namespace of its own
/// where one can be made ([`rerun_in_own_netns`]), else here: `test` is
/// its body.
pub fn in_own_netns<F: std::future::Future<Output = ()>>(name: &str, test: impl FnOnce() -> F) {
    if let Some(status) = rerun_in_own_netns(name) {
        assert!(status.success(), "{name} in its own network namespace: {status}");
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(test());
}

/// The operator key of [`config`]: the embedded dev config's, so the
/// tests that run on it read /stats alike.
pub const OPERATOR_KEY: &str = "throng-dev-operator-key-change-me";

pub const DEAD_AFTER: Duration = Duration::from_secs(2);

pub fn config(nats: &str, edge_id: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
data_dir = "data-{edge_id}"

[cluster]
nats = ["{nats}"]
edge_id = "{edge_id}"
region = "test"
heartbeat = "250ms"
dead_after = "{}ms"

[control]
operators = [{{ name = "ops", key = "{OPERATOR_KEY}" }}]

[tenants.dev]
hs256_secret = "dev-secret-0123456789"
"#,
        DEAD_AFTER.as_millis()
    )
}

/// A `throng serve` process and its admin address.
pub struct Serve {
    pub child: Child,
    pub admin: String,
    pub lines: mpsc::UnboundedReceiver<String>,
    /// The `throng ready ...` line.
    pub ready: Option<String>,
    /// Lines read while waiting for others.
    pub earlier: Vec<String>,
}

impl Serve {
    pub async fn start(dir: &Path, args: &[&str]) -> Serve {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("serve starts");
        let (tx, mut lines) = mpsc::unbounded_channel();
        let err = BufReader::new(child.stderr.take().expect("stderr"));
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        for mut reader in [
            Box::new(err) as Box<dyn tokio::io::AsyncBufRead + Unpin + Send>,
            Box::new(out),
        ] {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut line = String::new();
                while reader.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                    let _ = tx.send(std::mem::take(&mut line));
                }
            });
        }
        // stdout and stderr are read apart: take the two lines in either order.
        let (mut admin, mut ready) = (None, None);
        let mut earlier = Vec::new();
        while admin.is_none() || ready.is_none() {
            let (line, skipped) = wait_line(&mut lines, "ready").await;
            earlier.extend(skipped);
            if let Some(rest) = line.split("admin=http://").nth(1) {
                admin = rest.split_whitespace().next().map(str::to_owned);
            }
            if line.starts_with("throng ready") {
                ready = Some(line);
            }
        }
        let admin = admin.expect("admin address");
        Serve {
            child,
            admin,
            lines,
            ready,
            earlier,
        }
    }

    /// The first line with `needle`, read already or still to come.
    pub async fn line(&mut self, needle: &str) -> String {
        if let Some(i) = self.earlier.iter().position(|l| l.contains(needle)) {
            return self.earlier.remove(i);
        }
        wait_line(&mut self.lines, needle).await.0
    }

    pub fn stats(&self) -> serde_json::Value {
        let body = ureq::get(&format!("http://{}/stats", self.admin))
            .header("Authorization", format!("Bearer {OPERATOR_KEY}"))
            .call()
            .expect("stats answers")
            .body_mut()
            .read_to_string()
            .expect("stats body");
        serde_json::from_str(&body).expect("stats is JSON")
    }

    /// The live edges' ids this edge's /stats lists.
    pub fn live(&self) -> Vec<String> {
        let stats = self.stats();
        let mut ids: Vec<String> = stats["cluster"]["live_edges"]
            .as_array()
            .expect("cluster.live_edges")
            .iter()
            .map(|e| e["edge_id"].as_str().expect("edge_id").to_owned())
            .collect();
        ids.sort();
        ids
    }

    pub async fn wait_live<S: AsRef<str>>(&self, want: &[S], within: Duration) -> Duration {
        let want: Vec<&str> = want.iter().map(AsRef::as_ref).collect();
        let start = Instant::now();
        loop {
            let live = self.live();
            if live == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "edge at {} sees {live:?}, not {want:?}, after {within:?}",
                self.admin
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running");
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok);
    }
}

pub async fn wait_line(lines: &mut mpsc::UnboundedReceiver<String>, needle: &str) -> (String, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, lines.recv()).await {
            Ok(Some(line)) if line.contains(needle) => return (line, seen),
            Ok(Some(line)) => seen.push(line),
            Ok(None) => panic!("serve exited before printing `{needle}`: {seen:#?}"),
            Err(_) => panic!("no `{needle}` within 60 s: {seen:#?}"),
        }
    }
}

/// The QUIC address and certificate a `throng serve` printed.
pub fn quic_of(ready: &str) -> (String, std::path::PathBuf) {
    let rest = ready.trim().strip_prefix("throng ready quic=").expect("ready line");
    let (addr, rest) = rest.split_once(" cert=").expect("cert in the ready line");
    let cert = rest.split(' ').next().unwrap_or(rest);
    (addr.to_owned(), std::path::PathBuf::from(cert))
}

pub async fn client(ready: &str, user: &str, role: &str) -> throng_client::Client {
    let (addr, cert) = quic_of(ready);
    let token = token(user, role);
    let roots = throng_client::tls::load_certs(&cert).expect("the edge's certificate");
    throng_client::Client::connect(throng_client::ConnectOptions::new(addr, roots, token))
        .await
        .expect("connects")
}

/// Options for a client that knows every edge (`first` first) and trusts
/// each one's certificate, and notices a dead edge within 2 s.
pub fn cluster_options(ready: &[String], first: usize, user: &str, role: &str) -> throng_client::ConnectOptions {
    let mut edges = vec![quic_of(&ready[first]).0];
    let mut roots = Vec::new();
    for (i, r) in ready.iter().enumerate() {
        let (addr, cert) = quic_of(r);
        roots.extend(throng_client::tls::load_certs(&cert).expect("an edge's certificate"));
        if i != first {
            edges.push(addr);
        }
    }
    let mut opts = throng_client::ConnectOptions::new("", roots, token(user, role)).with_edges(edges);
    opts.keep_alive = Duration::from_millis(300);
    opts.idle_timeout = Duration::from_secs(2);
    opts
}

pub fn token(user: &str, role: &str) -> String {
    let tenant = throng_edge::config::TenantConfig::Hs256 {
        secret: b"dev-secret-0123456789".to_vec(),
    };
    let claims = throng_edge::auth::Claims {
        tenant: "dev".into(),
        sub: user.into(),
        role: role.into(),
        rooms: "*".into(),
        exp: throng_edge::auth::unix_now() + 600,
        nbf: None,
    };
    throng_edge::auth::sign(&claims, &tenant, None).expect("sign")
}

/// Receives until `want` messages whose body starts with `prefix` arrived.
pub async fn receive(room: &mut throng_client::RoomStream, prefix: &str, want: usize) -> Vec<(u64, String)> {
    receive_for(room, prefix, want, Duration::from_secs(20)).await
}

/// What arrives within `limit` whose body starts with `prefix`, up to the
/// batch that makes `want` of them.
pub async fn receive_for(
    room: &mut throng_client::RoomStream,
    prefix: &str,
    want: usize,
    limit: Duration,
) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        while got.len() < want {
            match room.next_batch().await {
                Some(Ok(b)) => got.extend(
                    b.messages
                        .into_iter()
                        .map(|m| (m.seq, String::from_utf8_lossy(&m.body).into_owned()))
                        .filter(|(_, body)| body.starts_with(prefix)),
                ),
                _ => break,
            }
        }
    })
    .await;
    got
}

/// `throng serve` edges `ids` on `nats`, each with `config()` passed
/// through `edit`, started and agreed on the live set; with their ready
/// lines.
pub async fn start_edges(
    nats: &NatsServer,
    dir: &Path,
    ids: &[&str],
    edit: impl Fn(String) -> String,
) -> (Vec<Serve>, Vec<String>) {
    let mut edges = Vec::new();
    let mut ready = Vec::new();
    for id in ids {
        let path = dir.join(format!("{id}.toml"));
        std::fs::write(&path, edit(config(&nats.url(), id))).expect("config");
        let mut serve = Serve::start(dir, &["--config", path.to_str().expect("utf-8")]).await;
        ready.push(serve.ready.take().expect("ready line"));
        edges.push(serve);
    }
    for e in &edges {
        e.wait_live(ids, Duration::from_secs(10)).await;
    }
    (edges, ready)
}

/// The index in `ids` of the edge that is the origin of tenant `dev`'s
/// `room` while all of `ids` are live.
pub fn origin_index(ids: &[&str], room: &str) -> usize {
    let key = throng_edge::cluster::rendezvous::room_key("dev", room);
    let origin = throng_edge::cluster::rendezvous::origin(&key, ids.iter().copied()).expect("an origin");
    ids.iter().position(|&i| i == origin).expect("origin index")
}

/// Sends `warm-k` into `room` until `viewer`, on a relay, gets one: by
/// then the origin has heard of the relay's viewers.
pub async fn warm_relay(sender: &throng_client::Client, room: &str, viewer: &mut throng_client::RoomStream) {
    for k in 0..50 {
        sender
            .send(room, throng_wire::Kind::Chat, format!("warm-{k}"))
            .await
            .expect("acked");
        if !receive_for(viewer, "warm-", 1, Duration::from_millis(200))
            .await
            .is_empty()
        {
            return;
        }
    }
    panic!("the relay's viewer never got `{room}`'s messages");
}
