//! What "acked means stored" costs: send → ack and send → deliver latency
//! (p50, p99) of a group room, which acks and delivers a message only once
//! the group log committed it, against a livecast room on the same edge in
//! the same run, which acks at the tick: the path group rooms took before
//! (ack before commit), minus the commit wait.
//!
//! ```sh
//! cargo bench -p throng --bench ack_latency            # 1, 1,000 and 40,000 msgs/s, 5 s each
//! cargo bench -p throng --bench ack_latency -- 1000 10  # one rate, seconds
//! ```
//!
//! One in-process edge on loopback (the test config: 10 ms commit
//! interval, fsync per commit), 40 senders sharing the rate (a user's send
//! rate is per user) and one member reading; host messages in the
//! livecast room, so its policy delivers every one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use throng_tests::TestEdge;
use throng_wire::Kind;

const SENDERS: usize = 40;

struct Run {
    ack: Histogram<u64>,
    deliver: Histogram<u64>,
    acked: u64,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// Sends `rate` messages a second into `room` for `secs`, from SENDERS
/// users, and times each one's ack and its arrival at one member.
async fn run(edge: &TestEdge, room: &'static str, kind: Kind, rate: u64, secs: u64) -> Run {
    let member = edge.client("acme", "member", "viewer").await;
    let mut stream = member.join(room).await.expect("the member joins");
    let start = Instant::now();
    let deliver = Arc::new(Mutex::new(hist()));
    let reading = {
        let deliver = Arc::clone(&deliver);
        tokio::spawn(async move {
            while let Some(Ok(b)) = stream.next_batch().await {
                let now = start.elapsed().as_micros() as u64;
                for m in b.messages {
                    let sent: u64 = String::from_utf8_lossy(&m.body).parse().unwrap_or(now);
                    let _ = deliver
                        .lock()
                        .expect("histogram")
                        .record(now.saturating_sub(sent).max(1));
                }
            }
        })
    };
    let ack = Arc::new(Mutex::new(hist()));
    let mut tasks = Vec::new();
    let per_sender = (rate as f64 / SENDERS as f64).max(1.0 / SENDERS as f64);
    for i in 0..SENDERS.min(rate as usize).max(1) {
        let client = edge
            .client(
                "acme",
                &format!("sender-{i}"),
                if kind == Kind::Host { "host" } else { "viewer" },
            )
            .await;
        let _joined = client.join(room).await.expect("a sender joins");
        let ack = Arc::clone(&ack);
        let senders = SENDERS.min(rate as usize).max(1);
        let every = Duration::from_secs_f64(1.0 / (rate as f64 / senders as f64).max(per_sender));
        tasks.push(tokio::spawn(async move {
            let _joined = _joined;
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut waits = Vec::new();
            while start.elapsed() < Duration::from_secs(secs) {
                ticker.tick().await;
                let sent = start.elapsed().as_micros() as u64;
                let Ok(pending) = client.submit(room, kind, sent.to_string()).await else {
                    break;
                };
                let ack = Arc::clone(&ack);
                waits.push(tokio::spawn(async move {
                    if pending.ack().await.is_ok() {
                        let now = start.elapsed().as_micros() as u64;
                        let _ = ack.lock().expect("histogram").record(now.saturating_sub(sent).max(1));
                        1u64
                    } else {
                        0
                    }
                }));
            }
            let mut n = 0;
            for w in waits {
                n += w.await.unwrap_or(0);
            }
            n
        }));
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await.unwrap_or(0);
    }
    // The last messages' deliveries follow their acks within a tick.
    tokio::time::sleep(Duration::from_millis(300)).await;
    reading.abort();
    let ack = ack.lock().expect("histogram").clone();
    let deliver = deliver.lock().expect("histogram").clone();
    Run { ack, deliver, acked }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let rates: Vec<u64> = match args.first().and_then(|a| a.parse().ok()) {
        Some(r) => vec![r],
        None => vec![1, 1_000, 40_000],
    };
    let secs: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let edge = TestEdge::start(|c| {
        c.rooms.group_rooms = vec!["group-*".into()];
        c.rooms.inbox_capacity = c.rooms.inbox_capacity.max(20_000);
    })
    .await;
    println!("| rate (msgs/s) | room | acked | send→ack p50 | p99 | send→deliver p50 | p99 |");
    println!("|---|---|---|---|---|---|---|");
    for rate in rates {
        for (room, kind, what) in [
            (
                "live-bench",
                Kind::Host,
                "livecast (acks at the tick: the old group path)",
            ),
            ("group-bench", Kind::Chat, "group (acks once stored)"),
        ] {
            let r = run(&edge, room, kind, rate, secs).await;
            println!(
                "| {rate} | {what} | {} | {} | {} | {} | {} |",
                r.acked,
                ms(r.ack.value_at_quantile(0.5)),
                ms(r.ack.value_at_quantile(0.99)),
                ms(r.deliver.value_at_quantile(0.5)),
                ms(r.deliver.value_at_quantile(0.99)),
            );
        }
    }
}
