//! The durability window of group-room acks: how long after a room hands a
//! tick's messages to the group log they are stored (on disk, fsync'd, for
//! the embedded log; acked by JetStream in a cluster).
//!
//! `cargo run --release -p throng-edge --example group_window -- [rooms] [seconds] [commit_ms] [nats_url]`
//!
//! `rooms` rooms each append one tick of 20 messages (200-byte bodies) every
//! 50 ms, for `seconds`, to a log in a temporary directory, or, given a
//! NATS URL (a nats-server with `-js`), to JetStream as a clustered edge's
//! origin rooms do.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use throng_edge::cluster::stream_log::StreamLog;
use throng_edge::group_store::GroupStore;
use throng_edge::log::{Commit, GroupLog, Retention};
use throng_wire::{Kind, Message};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let rooms: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let secs: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let commit_ms: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let nats = args.next();
    let dir = tempfile::tempdir().expect("tempdir");
    let interval = Duration::from_millis(commit_ms);
    let (log, store) = match &nats {
        None => (
            GroupStore::Local(GroupLog::open(&dir.path().join("log.redb"), interval, u64::MAX).expect("open")),
            "redb",
        ),
        Some(url) => {
            let client = async_nats::connect(url.as_str()).await.expect("connect to NATS");
            (
                GroupStore::Stream(StreamLog::open(client, interval, u64::MAX, Retention::default()).await),
                "jetstream",
            )
        }
    };
    // Fresh room names per run: JetStream keeps what earlier runs stored.
    let run = std::process::id();
    let tenant: Arc<str> = Arc::from("bench");
    let names: Vec<Arc<str>> = (0..rooms)
        .map(|i| Arc::from(format!("group-{run}-{i}").as_str()))
        .collect();
    // Fresh rooms: each claim expects no entry before its first.
    let committed: Vec<Arc<Commit>> = (0..rooms).map(|_| Commit::new(0, 0)).collect();
    let mut seq = vec![0u64; rooms];
    let start = Instant::now();
    let mut tick = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        for r in 0..rooms {
            let messages: Vec<Message> = (0..20)
                .map(|_| {
                    seq[r] += 1;
                    Message {
                        seq: seq[r],
                        sender: "u".into(),
                        kind: Kind::Chat,
                        body: vec![b'x'; 200],
                    }
                })
                .collect();
            log.append(&tenant, &names[r], messages, seq[r], &committed[r]);
        }
        tick += 1;
        tokio::time::sleep_until((start + Duration::from_millis(50 * tick)).into()).await;
    }
    // Let the last commit land.
    let wait = Instant::now();
    while committed.iter().zip(&seq).any(|(c, s)| c.stored() < *s) && wait.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let s = log.stats();
    let appends = s.appends.load(Ordering::Relaxed).max(1);
    println!(
        "store={store} rooms={rooms} seconds={secs} commit_interval_ms={commit_ms} messages={} commits={} appends={} \
         window_mean_ms={:.2} window_max_ms={:.2}",
        s.messages.load(Ordering::Relaxed),
        s.commits.load(Ordering::Relaxed),
        appends,
        s.total_window_us.load(Ordering::Relaxed) as f64 / appends as f64 / 1000.0,
        s.max_window_us.load(Ordering::Relaxed) as f64 / 1000.0
    );
}
