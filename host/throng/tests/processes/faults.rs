//! Fault injection against real processes: `throng serve` edges and a real
//! nats-server, killed (-9), paused (SIGSTOP) and taken away under
//! traffic, checked by `throng_tests::checker` (every acked message
//! readable exactly once, in order; no number naming two messages; every
//! hole a live reader meets marked as a gap).
//!
//! The quick form runs in the test suite. The long form (20 kill rounds,
//! a 30 s NATS outage) is the same tests with `THRONG_FAULTS=long`:
//!
//! ```sh
//! THRONG_FAULTS=long cargo test --release -p throng --test processes faults:: -- --include-ignored --nocapture
//! ```
//!
//! Each scenario prints one `faults:` line with its figures
//! (BENCHMARKS.md has them). `THRONG_FAULTS_SEED` picks the schedule
//! (when in each round the fault strikes); a failure prints the seed.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{self, OPERATOR_KEY, Serve, quic_of, token};
use throng_client::{ConnectOptions, ResumableRoom, ResumePolicy, RoomEvent};
use throng_tests::checker::{Acked, Counts, Seen, check};
use throng_tests::nats::{NatsServer, free_port};
use throng_wire::Kind;

fn long() -> bool {
    std::env::var("THRONG_FAULTS").is_ok_and(|v| v == "long")
}

fn seed() -> u64 {
    std::env::var("THRONG_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(throng_edge::unix_now_ms)
}

/// A small PRNG for schedules (xorshift): reproducible from the seed.
struct Schedule(u64);

impl Schedule {
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let span = (hi - lo).as_millis().max(1) as u64;
        lo + Duration::from_millis(self.0 % span)
    }
}

/// One edge's config: fixed ports (a restarted edge is where its clients
/// left it), group rooms `group-*`, and a cluster when `nats` is given.
fn edge_config(id: &str, quic: u16, admin: u16, nats: Option<&str>) -> String {
    let cluster = match nats {
        Some(url) => format!(
            "[cluster]\nnats = [\"{url}\"]\nedge_id = \"{id}\"\nregion = \"test\"\nheartbeat = \"250ms\"\ndead_after = \"{}ms\"\n",
            common::DEAD_AFTER.as_millis()
        ),
        None => String::new(),
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:{quic}"
admin = "127.0.0.1:{admin}"
data_dir = "data-{id}"

[rooms]
group_rooms = ["group-*"]
# The checker's reader from the start reads from before it joined.
group_history = "all"

{cluster}
[control]
operators = [{{ name = "ops", key = "{OPERATOR_KEY}" }}]

[tenants.dev]
hs256_secret = "dev-secret-0123456789"
"#
    )
}

/// An edge that can be killed and started again on the same ports and data.
struct Edge {
    dir: std::path::PathBuf,
    config: std::path::PathBuf,
    serve: Option<Serve>,
    ready: String,
}

impl Edge {
    async fn start(dir: &Path, id: &str, nats: Option<&str>) -> Edge {
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(&config, edge_config(id, free_udp_port(), free_port(), nats)).expect("config");
        let mut edge = Edge {
            dir: dir.to_owned(),
            config,
            serve: None,
            ready: String::new(),
        };
        edge.restart().await;
        edge
    }

    async fn restart(&mut self) {
        let mut serve = Serve::start(&self.dir, &["--config", self.config.to_str().expect("utf-8")]).await;
        self.ready = serve.ready.take().expect("ready line");
        self.serve = Some(serve);
    }

    /// Sends `sig` and waits (bounded: a clean shutdown drains for at most
    /// its grace period) for the edge to exit.
    async fn stop(&mut self, sig: &str) {
        if let Some(mut s) = self.serve.take() {
            s.signal(sig);
            if tokio::time::timeout(Duration::from_secs(30), s.child.wait())
                .await
                .is_err()
            {
                s.signal("-KILL");
                let _ = s.child.wait().await;
            }
        }
    }

    fn signal(&self, sig: &str) {
        self.serve.as_ref().expect("running").signal(sig);
    }

    fn quic(&self) -> String {
        quic_of(&self.ready).0
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
}

/// Options that reach any of `edges` (the first first) and notice a dead
/// one within about a second.
fn options(edges: &[&Edge], user: &str, role: &str) -> ConnectOptions {
    let mut roots = Vec::new();
    for e in edges {
        let (_, cert) = quic_of(&e.ready);
        roots.extend(throng_client::tls::load_certs(&cert).expect("an edge's certificate"));
    }
    let addrs: Vec<String> = edges.iter().map(|e| e.quic()).collect();
    let mut opts = ConnectOptions::new("", roots, token(user, role)).with_edges(addrs);
    opts.keep_alive = Duration::from_millis(200);
    opts.idle_timeout = Duration::from_secs(1);
    opts
}

/// What the senders were told, shared with their tasks.
type History = Arc<Mutex<Vec<Acked>>>;

/// Sends `{tag}-{n}` into `room` every `every`, as long as `run` holds,
/// reconnecting whenever the edge goes; records every ack with the epoch
/// the ack names (its numbering). Sends are pipelined (each ack awaited apart),
/// as a busy client sends.
fn sender(
    opts: ConnectOptions,
    room: &'static str,
    kind: Kind,
    tag: String,
    every: Duration,
    run: Arc<std::sync::atomic::AtomicBool>,
    acked: History,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut n = 0u64;
        let deadline = Instant::now() + Duration::from_secs(600);
        while run.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            let Ok(Ok(client)) =
                tokio::time::timeout(Duration::from_secs(3), throng_client::Client::connect(opts.clone())).await
            else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(Ok(_joined)) = tokio::time::timeout(Duration::from_secs(3), client.join(room)).await else {
                continue;
            };
            let mut ticker = tokio::time::interval(every);
            while run.load(std::sync::atomic::Ordering::Relaxed) {
                ticker.tick().await;
                let body = format!("{tag}-{n}");
                n += 1;
                let Ok(pending) = client.submit(room, kind, body.clone()).await else {
                    break;
                };
                let acked = Arc::clone(&acked);
                tokio::spawn(async move {
                    if let Ok(Ok(ack)) = tokio::time::timeout(Duration::from_secs(20), pending.ack()).await {
                        acked.lock().expect("history").push(Acked {
                            body,
                            epoch: ack.epoch,
                            seq: ack.seq,
                        });
                    }
                });
            }
        }
        n
    })
}

/// A member that stays in `room` across everything, and what it saw;
/// joined when this returns, so it is there before the first send.
async fn reader(
    opts: ConnectOptions,
    room: &'static str,
    run: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Seen>> {
    let policy = ResumePolicy {
        give_up_after: Duration::from_secs(120),
        ..ResumePolicy::default()
    };
    let mut room = ResumableRoom::join(opts, room, None, policy)
        .await
        .expect("the reader joins");
    tokio::spawn(async move {
        let mut seen = Vec::new();
        // The last number seen in each epoch: where a batch's `missed` hole begins.
        let mut last_of: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(600);
        while run.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(200), room.next_event()).await {
                Ok(Ok(RoomEvent::Batch(b))) => {
                    if b.missed > 0 {
                        seen.push(Seen::Missed {
                            epoch: b.epoch,
                            after_seq: last_of.get(&b.epoch).copied(),
                        });
                    }
                    if let Some(m) = b.messages.last() {
                        last_of.insert(b.epoch, m.seq);
                    }
                    seen.extend(b.messages.into_iter().map(|m| Seen::Message {
                        epoch: b.epoch,
                        seq: m.seq,
                        body: String::from_utf8_lossy(&m.body).into_owned(),
                    }))
                }
                Ok(Ok(RoomEvent::Gap(g))) => seen.push(Seen::Gap {
                    from_epoch: g.from_epoch,
                    to_epoch: g.to_epoch,
                    after_seq: g.after_seq,
                }),
                Ok(Err(e)) => panic!("the reader gave up: {e}"),
                Err(_) => {}
            }
        }
        seen
    })
}

/// A newcomer's read of a group room from its first message, through
/// `edge`, until it has every body in `want` or 30 s passed.
/// The checker's verdict on a group room after a scenario, read on `edge`
/// two ways: by a new member joining from the first number (beside what
/// the live readers saw), and through the server API's history. Each
/// prints its figures as `faults: scenario=<scenario>[, history API]`.
async fn audit_group(edge: &Edge, room: &str, acked: &[Acked], live: &[Vec<Seen>], scenario: &str, seed: u64) {
    static AUDITORS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = AUDITORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let complete = read_all(options(&[edge], &format!("auditor-{n}"), "viewer"), room, acked).await;
    assert_kept(scenario, seed, &check(acked, live, Some(&complete)));
    let h = history(edge, room, acked).await;
    assert_kept(&format!("{scenario}, history API"), seed, &check(acked, &[], Some(&h)));
}

/// What the server API's history (`GET /v1/rooms/dev/<room>/history`)
/// gives for `room` from its first number on, page by page, as a trace the
/// checker reads like a complete reader's. History carries no epoch: a
/// group room's log has one numbering, the one its acks came in.
async fn history(edge: &Edge, room: &str, acked: &[Acked]) -> Vec<Seen> {
    const PAGE: usize = 1000;
    let epochs: std::collections::BTreeSet<u64> = acked.iter().map(|a| a.epoch).collect();
    assert!(
        epochs.len() <= 1,
        "a group room's acks came in one numbering: {epochs:?}"
    );
    let epoch = epochs.first().copied().unwrap_or(0);
    let admin = edge.serve.as_ref().expect("running").admin.clone();
    let room = room.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let mut from = 0u64;
        // Bounded: far more pages than any scenario writes.
        for _ in 0..1000 {
            let url = format!("http://{admin}/v1/rooms/dev/{room}/history?from={from}&limit={PAGE}");
            let body = ureq::get(&url)
                .header("Authorization", format!("Bearer {OPERATOR_KEY}"))
                .call()
                .expect("history answers")
                .body_mut()
                .read_to_string()
                .expect("history body");
            let page: Vec<serde_json::Value> = serde_json::from_str(&body).expect("history is JSON");
            for m in &page {
                seen.push(Seen::Message {
                    epoch,
                    seq: m["seq"].as_u64().expect("seq"),
                    body: m["body"].as_str().expect("body").to_owned(),
                });
            }
            match page.last().and_then(|m| m["seq"].as_u64()) {
                Some(last) if page.len() == PAGE => from = last + 1,
                _ => break,
            }
        }
        seen
    })
    .await
    .expect("the history reader")
}

async fn read_all(opts: ConnectOptions, room: &str, want: &[Acked]) -> Vec<Seen> {
    let client = throng_client::Client::connect(opts)
        .await
        .expect("the final reader connects");
    let mut stream = client.join_from(room, Some(0)).await.expect("the final reader joins");
    let wanted: std::collections::HashSet<&str> = want.iter().map(|a| a.body.as_str()).collect();
    let mut found = std::collections::HashSet::new();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while found.len() < wanted.len() && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), stream.next_batch()).await {
            Ok(Some(Ok(b))) => {
                for m in b.messages {
                    let body = String::from_utf8_lossy(&m.body).into_owned();
                    if wanted.contains(body.as_str()) {
                        found.insert(body.clone());
                    }
                    seen.push(Seen::Message {
                        epoch: b.epoch,
                        seq: m.seq,
                        body,
                    });
                }
            }
            Ok(Some(Err(e))) => panic!("the final read failed: {e}"),
            Ok(None) => break,
            Err(_) => {}
        }
    }
    seen
}

/// One run's traffic: its senders' and readers' flags and what the
/// senders were told.
struct Traffic {
    sending: Arc<std::sync::atomic::AtomicBool>,
    reading: Arc<std::sync::atomic::AtomicBool>,
    acked: History,
}

impl Traffic {
    fn new() -> Self {
        Self {
            sending: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            reading: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            acked: Arc::default(),
        }
    }

    fn sender(
        &self,
        opts: ConnectOptions,
        room: &'static str,
        kind: Kind,
        tag: &str,
        every: Duration,
    ) -> tokio::task::JoinHandle<u64> {
        sender(
            opts,
            room,
            kind,
            tag.to_owned(),
            every,
            Arc::clone(&self.sending),
            Arc::clone(&self.acked),
        )
    }

    fn acked_so_far(&self) -> usize {
        self.acked.lock().expect("history").len()
    }

    /// Stops the senders, waits (bounded) for their last acks, then stops
    /// the readers; what was acked and what each reader saw.
    async fn finish(
        self,
        senders: Vec<tokio::task::JoinHandle<u64>>,
        readers: Vec<tokio::task::JoinHandle<Vec<Seen>>>,
    ) -> (Vec<Acked>, Vec<Vec<Seen>>) {
        self.sending.store(false, std::sync::atomic::Ordering::Relaxed);
        for s in senders {
            let _ = s.await;
        }
        // The last sends' acks come within a commit (or an outage's end).
        let mut last = 0;
        let deadline = Instant::now() + Duration::from_secs(25);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = self.acked_so_far();
            if now == last || Instant::now() > deadline {
                break;
            }
            last = now;
        }
        // What was acked last was delivered with its ack; a moment for it
        // to cross the loopback, then the readers stop.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        self.reading.store(false, std::sync::atomic::Ordering::Relaxed);
        let mut live = Vec::new();
        for r in readers {
            live.push(r.await.expect("reader"));
        }
        let acked = self.acked.lock().expect("history").clone();
        (acked, live)
    }
}

fn report(scenario: &str, seed: u64, c: &Counts) {
    println!("faults: scenario={scenario} seed={seed} {c}");
}

fn assert_kept(scenario: &str, seed: u64, c: &Counts) {
    report(scenario, seed, c);
    assert!(c.acked > 0, "{scenario} (seed {seed}): nothing was acked");
    assert_eq!(
        (c.lost, c.duplicated, c.reordered, c.reused, c.silently_missed),
        (0, 0, 0, 0, 0),
        "{scenario} (seed {seed}): {c}"
    );
}

/// What a lone-edge kill -9 run leaves: the edge (alive again), what was
/// acked, and what its one live reader saw.
struct KillRun {
    seed: u64,
    rounds: usize,
    edge: Edge,
    _dir: tempfile::TempDir,
    acked: Vec<Acked>,
    live: Vec<Seen>,
}

/// One lone edge, a reader and a sender of `kind` every `every` in `room`,
/// and the edge killed (-9) and started again at random moments (3 times,
/// 20 in the long form).
async fn lone_edge_kill_9(room: &'static str, kind: Kind, every: Duration) -> KillRun {
    lone_edge_restarts(room, kind, every, "-KILL").await
}

/// [`lone_edge_kill_9`], the edge stopped with `sig` each round.
async fn lone_edge_restarts(room: &'static str, kind: Kind, every: Duration, sig: &str) -> KillRun {
    let seed = seed();
    let mut schedule = Schedule(seed | 1);
    let rounds = if long() { 20 } else { 3 };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut edge = Edge::start(dir.path(), "solo", None).await;
    let traffic = Traffic::new();
    let live = reader(
        options(&[&edge], "member", "viewer"),
        room,
        Arc::clone(&traffic.reading),
    )
    .await;
    let role = if kind == Kind::Host { "host" } else { "viewer" };
    let senders = vec![traffic.sender(options(&[&edge], "sender", role), room, kind, "m", every)];
    for _ in 0..rounds {
        tokio::time::sleep(schedule.between(Duration::from_millis(300), Duration::from_millis(1200))).await;
        edge.stop(sig).await;
        edge.restart().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (acked, mut live) = traffic.finish(senders, vec![live]).await;
    KillRun {
        seed,
        rounds,
        edge,
        _dir: dir,
        acked,
        live: live.pop().expect("one reader"),
    }
}

/// kill -9 of a lone edge under 200 group messages a second, again and
/// again: every acked message is in the log once, in order, and no number
/// names two messages (on a090a11, 2-4 numbers were reused in 4 of 6
/// kills: acked before stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_room_kill_9_loses_and_reuses_nothing() {
    let r = lone_edge_kill_9("group-faults", Kind::Chat, Duration::from_millis(5)).await;
    let scenario = format!("group kill -9 x{}", r.rounds);
    let live = std::slice::from_ref(&r.live);
    audit_group(&r.edge, "group-faults", &r.acked, live, &scenario, r.seed).await;
}

/// kill -9 of a lone edge under host messages in a livecast room: each
/// restart is a new epoch numbered above the last, so a resuming viewer
/// drops nothing as a repeat, and what it could not get is marked as a
/// gap (on a090a11 the room numbered from 1 again: silently dropped).
/// Host messages: the policy never drops them, so the viewer must see
/// every one or be told it may not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livecast_room_kill_9_marks_every_hole_and_reuses_no_number() {
    let r = lone_edge_kill_9("lobby", Kind::Host, Duration::from_millis(50)).await;
    let c = check(&r.acked, std::slice::from_ref(&r.live), None);
    report(&format!("livecast kill -9 x{}", r.rounds), r.seed, &c);
    assert!(c.acked > 0);
    assert_eq!(
        (c.duplicated, c.reordered, c.reused, c.silently_missed),
        (0, 0, 0, 0),
        "seed {}: {c}",
        r.seed
    );
    assert!(c.gaps >= 1, "each restart is a new epoch, and the viewer is told: {c}");
}

/// SIGTERM restarts of a lone edge under group traffic: a clean stop
/// drains what it acked into the log first, so the restarted edge numbers
/// on after it and nothing acked is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_room_sigterm_restarts_lose_and_reuse_nothing() {
    let r = lone_edge_restarts("group-term", Kind::Chat, Duration::from_millis(5), "-TERM").await;
    let scenario = format!("group SIGTERM x{}", r.rounds);
    let live = std::slice::from_ref(&r.live);
    audit_group(&r.edge, "group-term", &r.acked, live, &scenario, r.seed).await;
}

/// Two edges started at once on a fresh cluster (a new stream, a new
/// members bucket, each edge first alone, then meeting the other), with
/// group traffic sent to both from the first moment: every acked message
/// is read once, in order, from either edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_started_at_once_on_a_fresh_cluster_lose_nothing_acked() {
    let seed = seed();
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    const ROOM: &str = "group-fresh";
    let url = nats.url();
    let (a, b) = tokio::join!(
        Edge::start(dir.path(), "a", Some(&url)),
        Edge::start(dir.path(), "b", Some(&url))
    );
    let traffic = Traffic::new();
    let every = Duration::from_millis(10);
    let senders = vec![
        traffic.sender(options(&[&a], "on-a", "viewer"), ROOM, Kind::Chat, "a", every),
        traffic.sender(options(&[&b], "on-b", "viewer"), ROOM, Kind::Chat, "b", every),
    ];
    let live = reader(options(&[&b], "member", "viewer"), ROOM, Arc::clone(&traffic.reading)).await;
    both_live(&a, &b, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, live) = traffic.finish(senders, vec![live]).await;
    for (name, e) in [("a", &a), ("b", &b)] {
        let scenario = format!("two edges started at once, read on {name}");
        audit_group(e, ROOM, &acked, &live, &scenario, seed).await;
    }
}

/// NATS away for `away` under group traffic on two edges: nothing is
/// acked while JetStream cannot store it, and every acked message is read
/// once, in order, from either edge afterwards (on a090a11, an outage
/// past `dead_after` split the room and left 44% of acked messages
/// unreadable).
async fn nats_away(away: Duration) {
    group_apart(Apart::nats_away().await, away).await;
}

/// Two edges kept apart for `away` (see [`Apart`]) under group traffic
/// on both: nothing is acked that was not stored, and every acked message
/// is read once, in order, from either edge afterwards.
async fn group_apart(mut apart: Apart, away: Duration) {
    let seed = seed();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut a, mut b) = apart.two_live_edges(dir.path()).await;
    let traffic = Traffic::new();
    let mut readers = Vec::new();
    for (name, edges) in [("member-a", [&a, &b]), ("member-b", [&b, &a])] {
        readers.push(
            reader(
                options(&edges, name, "viewer"),
                "group-outage",
                Arc::clone(&traffic.reading),
            )
            .await,
        );
    }
    let senders: Vec<_> = [&a, &b]
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let opts = options(&[e], &format!("sender-{i}"), "viewer");
            traffic.sender(
                opts,
                "group-outage",
                Kind::Chat,
                &format!("s{i}"),
                Duration::from_millis(10),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = traffic.acked_so_far();
    apart.begin();
    tokio::time::sleep(away).await;
    let during = traffic.acked_so_far();
    apart.end();
    both_live(&a, &b, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, live) = traffic.finish(senders, readers).await;
    let scenario = apart.name(away);
    eprintln!("faults: scenario={scenario} acked_while_apart={}", during - before);
    // A send in flight when NATS went may be stored (and acked) just
    // before; nothing else is acked while it is away.
    if apart.stores_nothing() {
        assert!(
            during <= before + 4,
            "{scenario}: {} acked while JetStream was away",
            during - before
        );
    }
    if std::env::var("THRONG_FAULTS_DEBUG").is_ok() {
        for (i, t) in live.iter().enumerate() {
            let got: std::collections::HashSet<&str> = t
                .iter()
                .filter_map(|s| match s {
                    Seen::Message { body, .. } => Some(body.as_str()),
                    Seen::Gap { .. } | Seen::Missed { .. } => None,
                })
                .collect();
            let missing: Vec<(u64, &str)> = acked
                .iter()
                .filter(|a| !got.contains(a.body.as_str()))
                .map(|a| (a.seq, a.body.as_str()))
                .collect();
            let seqs: Vec<u64> = t
                .iter()
                .filter_map(|s| match s {
                    Seen::Message { seq, .. } => Some(*seq),
                    Seen::Gap { .. } | Seen::Missed { .. } => None,
                })
                .collect();
            eprintln!(
                "reader {i}: read {} missing {missing:?} first {:?} last {:?}",
                seqs.len(),
                seqs.first(),
                seqs.last()
            );
        }
    }
    if std::env::var("THRONG_FAULTS_DEBUG").is_ok() {
        for (name, e) in [("a", &mut a), ("b", &mut b)] {
            let serve = e.serve.as_mut().expect("running");
            while let Ok(line) = serve.lines.try_recv() {
                if !line.contains(" INFO throng_edge::admin") {
                    eprint!("{name}: {line}");
                }
            }
        }
    }
    for (name, e) in [("a", &a), ("b", &b)] {
        let scenario = format!("{scenario}, read on {name}");
        audit_group(e, "group-outage", &acked, &live, &scenario, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_away_1s_loses_nothing_acked() {
    nats_away(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_away_5s_past_dead_after_loses_nothing_acked() {
    nats_away(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the long form: THRONG_FAULTS=long ... -- --include-ignored"]
async fn nats_away_30s_loses_nothing_acked() {
    nats_away(Duration::from_secs(30)).await;
}

/// A TCP relay between one edge and nats-server that can stall: while
/// stalled it moves no byte either way and holds what it has read, so the
/// edge's connection stays open but says and hears nothing (a partition
/// of that edge alone: the others keep NATS), and when the stall ends
/// everything held goes through late, stale writes included.
struct StallableLink {
    url: String,
    stalled: tokio::sync::watch::Sender<bool>,
    /// Severed: every connection through the link closed, new ones closed
    /// at once, so what NATS sends meanwhile never reaches the edge.
    severed: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallableLink {
    async fn to(nats: &NatsServer) -> StallableLink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("nats://{}", listener.local_addr().expect("addr"));
        let upstream = format!("127.0.0.1:{}", nats.port());
        let (stalled, watch) = tokio::sync::watch::channel(false);
        let (severed, mut cut) = tokio::sync::watch::channel(false);
        let cut_now = cut.clone();
        let task = tokio::spawn(async move {
            let mut pipes = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((edge, _)) = accepted else { return };
                        if *cut_now.borrow() {
                            continue;
                        }
                        let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                            continue;
                        };
                        let (edge_r, edge_w) = edge.into_split();
                        let (server_r, server_w) = server.into_split();
                        pipes.spawn(Self::pipe(edge_r, server_w, watch.clone()));
                        pipes.spawn(Self::pipe(server_r, edge_w, watch.clone()));
                    }
                    changed = cut.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        if *cut.borrow_and_update() {
                            pipes.abort_all();
                        }
                    }
                }
            }
        });
        StallableLink {
            url,
            stalled,
            severed,
            task,
        }
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut stalled: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if stalled.wait_for(|s| !s).await.is_err() {
                return;
            }
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if stalled.wait_for(|s| !s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    fn stall(&self, on: bool) {
        let _ = self.stalled.send(on);
    }

    fn sever(&self, on: bool) {
        let _ = self.severed.send(on);
    }
}

impl Drop for StallableLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A host (whose messages the policy never drops) sending into `room`
/// every `every` from each of `edges`, as `host-<i>` with bodies `h<i>-...`.
fn host_senders(
    traffic: &Traffic,
    edges: [&Edge; 2],
    room: &'static str,
    every: Duration,
) -> Vec<tokio::task::JoinHandle<u64>> {
    edges
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let opts = options(&[e], &format!("host-{i}"), "host");
            traffic.sender(opts, room, Kind::Host, &format!("h{i}"), every)
        })
        .collect()
}

/// Waits (at most `within` each) until edges `a` and `b` both see both live.
async fn both_live(a: &Edge, b: &Edge, within: Duration) {
    for e in [a, b] {
        e.serve.as_ref().expect("running").wait_live(&["a", "b"], within).await;
    }
}

/// How a scenario keeps edges `a` and `b` apart for a while.
enum Apart {
    /// nats-server killed, then restarted on its store.
    NatsAway(NatsServer),
    /// Only `b`'s connection to NATS stalled; `a` keeps it.
    OneEdgeStalled(NatsServer, StallableLink),
}

impl Apart {
    async fn nats_away() -> Apart {
        Apart::NatsAway(NatsServer::start())
    }

    async fn one_edge_stalled() -> Apart {
        let nats = NatsServer::start();
        let link = StallableLink::to(&nats).await;
        Apart::OneEdgeStalled(nats, link)
    }

    /// Edges `a` and `b`, each started and seeing both live.
    async fn two_live_edges(&self, dir: &Path) -> (Edge, Edge) {
        let (nats, b_url) = match self {
            Apart::NatsAway(nats) => (nats, nats.url()),
            Apart::OneEdgeStalled(nats, link) => (nats, link.url.clone()),
        };
        let a = Edge::start(dir, "a", Some(&nats.url())).await;
        let b = Edge::start(dir, "b", Some(&b_url)).await;
        both_live(&a, &b, Duration::from_secs(10)).await;
        (a, b)
    }

    fn begin(&mut self) {
        match self {
            Apart::NatsAway(nats) => nats.kill(),
            Apart::OneEdgeStalled(_, link) => link.stall(true),
        }
    }

    fn end(&mut self) {
        match self {
            Apart::NatsAway(nats) => nats.restart(),
            Apart::OneEdgeStalled(_, link) => link.stall(false),
        }
    }

    /// Whether no edge can store while apart.
    fn stores_nothing(&self) -> bool {
        matches!(self, Apart::NatsAway(_))
    }

    fn name(&self, away: Duration) -> String {
        match self {
            Apart::NatsAway(_) if away.is_zero() => "nats restarted at once on its store".to_owned(),
            Apart::NatsAway(_) => format!("nats away {}s", away.as_secs()),
            Apart::OneEdgeStalled(..) => format!("edge b's NATS link stalled {}s", away.as_secs()),
        }
    }
}

/// One edge of two cut off from NATS (its connection stalled, not
/// closed) past `dead_after`, under group traffic on both: the other
/// keeps NATS and takes the rooms over; the cut-off one cannot store, so
/// it acks nothing, and what it wrote before the stall reaches NATS late,
/// when the stall ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_edge_cut_off_from_nats_5s_loses_nothing_acked() {
    group_apart(Apart::one_edge_stalled().await, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_edge_cut_off_from_nats_1s_loses_nothing_acked() {
    group_apart(Apart::one_edge_stalled().await, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the long form: THRONG_FAULTS=long ... -- --include-ignored"]
async fn one_edge_cut_off_from_nats_30s_loses_nothing_acked() {
    group_apart(Apart::one_edge_stalled().await, Duration::from_secs(30)).await;
}

/// The stale origin: a group room's origin paused (SIGSTOP) past
/// `dead_after` while its senders' messages wait in it; the other edge
/// takes the room over and writes on. Resumed, the stale origin's appends
/// are refused by JetStream (fenced): what it held is refused to its
/// senders, never acked, and the log stays one numbering, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_origin_is_fenced_when_it_wakes_and_nothing_acked_is_lost() {
    let seed = seed();
    let nats = Apart::nats_away().await;
    let dir = tempfile::tempdir().expect("tempdir");
    const ROOM: &str = "group-stale";
    let ids = ["a", "b"];
    let o = common::origin_index(&ids, ROOM);
    let (a, b) = nats.two_live_edges(dir.path()).await;
    let edges = [&a, &b];
    let (origin, other) = (edges[o], edges[1 - o]);
    let traffic = Traffic::new();
    let live = reader(
        options(&[other], "member", "viewer"),
        ROOM,
        Arc::clone(&traffic.reading),
    )
    .await;
    let every = Duration::from_millis(10);
    let senders = vec![
        traffic.sender(options(&[origin], "on-origin", "viewer"), ROOM, Kind::Chat, "o", every),
        traffic.sender(options(&[other], "on-other", "viewer"), ROOM, Kind::Chat, "x", every),
    ];
    tokio::time::sleep(Duration::from_secs(1)).await;
    origin.signal("-STOP");
    // Past dead_after: the other edge takes the room and writes on.
    let other_id = ids[1 - o];
    other
        .serve
        .as_ref()
        .expect("running")
        .wait_live(&[other_id], common::DEAD_AFTER * 3)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    origin.signal("-CONT");
    both_live(&a, &b, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, live) = traffic.finish(senders, vec![live]).await;
    for (name, e) in [("origin", origin), ("other", other)] {
        let scenario = format!("origin paused past dead_after, read on {name}");
        audit_group(e, ROOM, &acked, &live, &scenario, seed).await;
    }
}

/// nats-server killed (-9) and started again at once on the same store,
/// under group traffic on two edges: what JetStream acked survives its
/// restart, and nothing is acked twice or out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_at_once_on_its_store_loses_nothing_acked() {
    nats_away(Duration::ZERO).await;
}

/// A livecast room on two edges across a NATS outage past `dead_after`:
/// each side numbers on its own while they are apart (its own epoch), and
/// when the cluster heals one numbering wins. Viewers on both edges are
/// told of every hole (a gap), and none goes silent: each sees every host
/// message sent once the cluster is whole again (on a090a11 the viewers on
/// the edge whose numbering lost got nothing more, told nothing, while
/// senders kept getting acks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_livecast_room_across_a_nats_outage_marks_every_hole_and_goes_on() {
    livecast_apart(Apart::nats_away().await).await;
}

/// The same with only one edge cut off from NATS (stalled): the one that
/// keeps NATS goes on as origin, the other numbers on its own while cut
/// off, and its viewers are told of the holes when the cluster heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_livecast_room_with_one_edge_cut_off_from_nats_marks_every_hole_and_goes_on() {
    livecast_apart(Apart::one_edge_stalled().await).await;
}

async fn livecast_apart(mut apart: Apart) {
    let seed = seed();
    let dir = tempfile::tempdir().expect("tempdir");
    const ROOM: &str = "lobby-outage";
    let (a, b) = apart.two_live_edges(dir.path()).await;
    let traffic = Traffic::new();
    let mut readers = Vec::new();
    for (name, e) in [("viewer-a", &a), ("viewer-b", &b)] {
        readers.push(reader(options(&[e], name, "viewer"), ROOM, Arc::clone(&traffic.reading)).await);
    }
    // Host messages: the policy never drops them, so a viewer must see
    // every one or be told it may not have.
    let senders = host_senders(&traffic, [&a, &b], ROOM, Duration::from_millis(50));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let away = Duration::from_secs(5);
    apart.begin();
    tokio::time::sleep(away).await;
    apart.end();
    both_live(&a, &b, Duration::from_secs(30)).await;
    // The relays find their origin again within a presence interval or
    // two; what is acked after that reaches every viewer.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let healed = traffic.acked_so_far();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (acked, live) = traffic.finish(senders, readers).await;
    let scenario = format!("livecast room, 2 edges, {}", apart.name(away));
    let c = check(&acked, &live, None);
    report(&scenario, seed, &c);
    assert!(c.acked > 0, "{scenario}: nothing was acked");
    assert_eq!(
        (c.duplicated, c.reordered, c.reused, c.silently_missed),
        (0, 0, 0, 0),
        "{scenario} (seed {seed}): {c}"
    );
    // Acks are recorded as they come, a few ticks apart from their sends:
    // the first ones after the mark may still be of the healing.
    let after = acked.get(healed + 10..).unwrap_or_default();
    assert!(
        after.len() >= 20,
        "{scenario}: only {} acked after the heal",
        after.len()
    );
    for (i, t) in live.iter().enumerate() {
        let got: std::collections::HashSet<&str> = t
            .iter()
            .filter_map(|s| match s {
                Seen::Message { body, .. } => Some(body.as_str()),
                Seen::Gap { .. } | Seen::Missed { .. } => None,
            })
            .collect();
        let missing: Vec<&str> = after
            .iter()
            .map(|a| a.body.as_str())
            .filter(|b| !got.contains(b))
            .collect();
        assert!(
            missing.is_empty(),
            "{scenario} (seed {seed}): viewer {i} did not get {} of the {} host messages acked after the heal: {missing:?}",
            missing.len(),
            after.len()
        );
    }
}

/// A fault in the middle of a relay's gap-fill: edge b, a relay of a
/// livecast room whose origin is a, loses its NATS connection for less
/// than `dead_after` (so it stays a relay, and a's batches meanwhile never
/// reach it), and a is killed (-9) the moment b asks it for what it
/// missed. b then takes the room over. Every viewer, the one that was on a
/// included (it moves to b), is told of every hole: nothing a acked is
/// missed without a gap, and nothing is seen twice or out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_killed_during_a_relays_gap_fill_leaves_no_silent_hole() {
    let seed = seed();
    let apart = Apart::one_edge_stalled().await;
    let Apart::OneEdgeStalled(_, link) = &apart else {
        unreachable!("made stalled")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    const ROOMS: [&str; 8] = [
        "lobby-fill-0",
        "lobby-fill-1",
        "lobby-fill-2",
        "lobby-fill-3",
        "lobby-fill-4",
        "lobby-fill-5",
        "lobby-fill-6",
        "lobby-fill-7",
    ];
    let room = ROOMS
        .into_iter()
        .find(|r| common::origin_index(&["a", "b"], r) == 0)
        .expect("one of eight rooms has its origin on a");
    let (mut a, mut b) = apart.two_live_edges(dir.path()).await;
    let traffic = Traffic::new();
    let mut readers = Vec::new();
    for (name, edges) in [("viewer-a", [&a, &b]), ("viewer-b", [&b, &a])] {
        readers.push(reader(options(&edges, name, "viewer"), room, Arc::clone(&traffic.reading)).await);
    }
    // Host messages from both edges: the one on a stops when a dies, the
    // one on b goes on through the takeover.
    let senders = host_senders(&traffic, [&a, &b], room, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lines = &mut b.serve.as_mut().expect("running").lines;
    while lines.try_recv().is_ok() {}
    link.sever(true);
    tokio::time::sleep(common::DEAD_AFTER / 2).await;
    link.sever(false);
    // b reconnects, hears a batch past the ones it lost, and asks a for
    // them: a dies then.
    let (asked, _) = common::wait_line(lines, "asking the origin").await;
    a.stop("-KILL").await;
    eprintln!("faults: killed the origin as the relay asked: {}", asked.trim());
    b.serve
        .as_ref()
        .expect("running")
        .wait_live(&["b"], common::DEAD_AFTER * 5)
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (acked, live) = traffic.finish(senders, readers).await;
    let scenario = "livecast room, origin killed during a relay's gap-fill";
    let c = check(&acked, &live, None);
    report(scenario, seed, &c);
    assert!(c.acked > 0, "{scenario}: nothing was acked");
    assert_eq!(
        (c.duplicated, c.reordered, c.reused, c.silently_missed),
        (0, 0, 0, 0),
        "{scenario} (seed {seed}): {c}"
    );
}
