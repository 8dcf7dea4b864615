//! The durability window of group-room acks: how long after a room hands a
//! tick's messages to the group log they are committed (on disk, fsync'd).
//!
//! `cargo run --release -p throng-edge --example group_window -- [rooms] [seconds] [commit_ms]`
//!
//! `rooms` rooms each append one tick of 20 messages (200-byte bodies) every
//! 50 ms, for `seconds`, to a log in a temporary directory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use throng_edge::log::GroupLog;
use throng_wire::{Kind, Message};

fn main() {
    let mut args = std::env::args().skip(1);
    let rooms: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let secs: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let commit_ms: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let dir = tempfile::tempdir().expect("tempdir");
    let log = GroupLog::open(&dir.path().join("log.redb"), Duration::from_millis(commit_ms), u64::MAX).expect("open");
    let tenant: Arc<str> = Arc::from("bench");
    let names: Vec<Arc<str>> = (0..rooms).map(|i| Arc::from(format!("group-{i}").as_str())).collect();
    let committed: Vec<Arc<AtomicU64>> = (0..rooms).map(|_| Arc::new(AtomicU64::new(0))).collect();
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
            log.append(&tenant, &names[r], messages, &committed[r]);
        }
        tick += 1;
        let next = start + Duration::from_millis(50 * tick);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    // Let the last commit land.
    let wait = Instant::now();
    while committed.iter().zip(&seq).any(|(c, s)| c.load(Ordering::Acquire) < *s)
        && wait.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let s = log.stats();
    let appends = s.appends.load(Ordering::Relaxed).max(1);
    println!(
        "rooms={rooms} seconds={secs} commit_interval_ms={commit_ms} messages={} commits={} appends={} \
         window_mean_ms={:.2} window_max_ms={:.2}",
        s.messages.load(Ordering::Relaxed),
        s.commits.load(Ordering::Relaxed),
        appends,
        s.total_window_us.load(Ordering::Relaxed) as f64 / appends as f64 / 1000.0,
        s.max_window_us.load(Ordering::Relaxed) as f64 / 1000.0
    );
}
