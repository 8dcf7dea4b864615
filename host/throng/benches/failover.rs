//! How long a livecast room is dark when its origin dies (kill -9), and how
//! long the viewers of the dead edge wait until they are served elsewhere.
//!
//! Three `throng serve` edges on a real nats-server. Each round takes a new
//! room, a viewer on a surviving edge, a sender on the other surviving edge
//! (50 messages a second, forwarded to the origin), and a viewer on the
//! origin's edge that knows every edge (`ResumableRoom`). The origin is
//! killed; the round measures, from the kill:
//!
//! - `noticed`: until both survivors' `/stats` no longer list it;
//! - `moved`: until the surviving viewer gets a message sent after the kill
//!   (the room runs on its next edge, and relays follow it);
//! - `resumed`: until the dead edge's viewer, reconnected to another edge,
//!   gets a message sent after the kill.
//!
//! Every round also checks that neither viewer got a sequence number twice
//! or out of order. The killed edge is started again before the next round.
//!
//! ```sh
//! cargo bench -p throng --bench failover            # 20 kills per preset
//! cargo bench -p throng --bench failover -- --kills 5
//! ```
#![cfg(unix)]

#[path = "../tests/processes/common.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Serve, client, cluster_options, config};
use throng_client::{ResumableRoom, ResumePolicy};
use throng_tests::nats::NatsServer;
use throng_wire::{Batch, Kind};

/// One configuration of heartbeat and `dead_after`, measured `kills` times.
struct Preset {
    name: &'static str,
    heartbeat: Duration,
    dead_after: Duration,
}

const PRESETS: [Preset; 2] = [
    Preset {
        name: "defaults",
        heartbeat: Duration::from_secs(1),
        dead_after: Duration::from_secs(3),
    },
    Preset {
        name: "fast",
        heartbeat: Duration::from_millis(250),
        dead_after: Duration::from_secs(1),
    },
];

/// The sender's pace: the resolution of `moved` and `resumed`.
const SEND_EVERY: Duration = Duration::from_millis(20);
/// A round that has not recovered by then is a failure, not a sample.
const ROUND_LIMIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Samples {
    noticed: Vec<Duration>,
    moved: Vec<Duration>,
    resumed: Vec<Duration>,
}

/// What a viewer received: when, the sender's index, the sequence number.
type Arrivals = Vec<(Instant, u64, u64)>;

fn arrivals(batch: &Batch, at: Instant, out: &mut Arrivals) {
    for m in &batch.messages {
        let index = std::str::from_utf8(&m.body)
            .ok()
            .and_then(|b| b.strip_prefix("f-"))
            .and_then(|i| i.parse().ok());
        if let Some(index) = index {
            out.push((at, index, m.seq));
        }
    }
}

/// When the first message with index `from` or later arrived, after `start`.
fn first_after(got: &Arrivals, from: u64, start: Instant) -> Option<Duration> {
    got.iter().find(|a| a.1 >= from).map(|a| a.0.duration_since(start))
}

fn check_order(who: &str, got: &Arrivals) {
    if let Some(w) = got.windows(2).find(|w| w[0].2 >= w[1].2) {
        panic!("{who} got seq {} then {}: a duplicate or out of order", w[0].2, w[1].2);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest rank: with 20 samples p99 is the largest.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn kills_from_args() -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--kills")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse().expect("--kills takes a number"))
        .unwrap_or(20)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo test --benches` runs this with `--test`: nothing to measure then.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let kills = kills_from_args();
    let mut report = Vec::new();
    for preset in &PRESETS {
        let samples = measure(preset, kills).await;
        report.push((preset, samples));
    }
    println!("\nfailover over {kills} kills of a room's origin (3 edges, one nats-server)");
    println!(
        "{:<9} {:>10} {:>10} | {:>9} {:>9} {:>9} {:>9}",
        "preset", "heartbeat", "dead_after", "", "p50", "p90", "p99/max"
    );
    for (preset, samples) in report {
        for (what, mut v) in [
            ("noticed", samples.noticed),
            ("moved", samples.moved),
            ("resumed", samples.resumed),
        ] {
            v.sort();
            println!(
                "{:<9} {:>10} {:>10} | {:>9} {:>9} {:>9} {:>9}",
                preset.name,
                ms(preset.heartbeat),
                ms(preset.dead_after),
                what,
                ms(percentile(&v, 50.0)),
                ms(percentile(&v, 90.0)),
                ms(percentile(&v, 99.0)),
            );
        }
    }
}

async fn measure(preset: &Preset, kills: usize) -> Samples {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = ["a", "b", "c"];
    let mut paths = Vec::new();
    let mut edges = Vec::new();
    let mut ready = Vec::new();
    for id in ids {
        let path = dir.path().join(format!("{id}.toml"));
        let text = config(&nats.url(), id)
            .replace(
                "heartbeat = \"250ms\"",
                &format!("heartbeat = \"{}ms\"", preset.heartbeat.as_millis()),
            )
            .replace(
                &format!("dead_after = \"{}ms\"", common::DEAD_AFTER.as_millis()),
                &format!("dead_after = \"{}ms\"", preset.dead_after.as_millis()),
            )
            // Every message reaches every viewer: what arrives is what was sent.
            .replace(
                "[tenants.dev]",
                "[limits]\nsend_rate_per_sec = 100000\nsend_burst = 100000\n\n\
                 [rooms]\nviewer_cap_per_sec = 0\n\n[tenants.dev]",
            );
        std::fs::write(&path, text).expect("config");
        let mut serve = start(dir.path(), &path).await;
        ready.push(serve.ready.take().expect("ready line"));
        edges.push(serve);
        paths.push(path);
    }
    for e in &edges {
        e.wait_live(&ids, Duration::from_secs(20)).await;
    }

    let mut samples = Samples::default();
    for round in 0..kills {
        let room = room_of(round);
        let o = common::origin_index(&ids, &room);
        let origin = ids[o];
        let survivors: Vec<usize> = (0..3).filter(|&i| i != o).collect();

        let viewer = client(&ready[survivors[1]], "viewer", "viewer").await;
        let mut stream = viewer.join(&room).await.expect("viewer joins");
        let mut mover = ResumableRoom::join(
            cluster_options(&ready, o, "mover", "viewer"),
            &room,
            None,
            ResumePolicy::default(),
        )
        .await
        .expect("mover joins on the origin's edge");
        let sender = client(&ready[survivors[0]], "host", "host").await;
        let _sender_room = sender.join(&room).await.expect("sender joins");

        let next = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let sending = {
            let (next, stop, room) = (Arc::clone(&next), Arc::clone(&stop), room.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SEND_EVERY);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    // Refusals while the room has no origin are expected.
                    if let Ok(pending) = sender.submit(&room, Kind::Chat, format!("f-{i}")).await {
                        tokio::spawn(async move { drop(pending.ack().await) });
                    }
                }
            })
        };

        // Each viewer is read by a task of its own, which stamps arrivals
        // as they come, whatever the other viewer and the kill are doing.
        let (tx, mut viewer_rx) = tokio::sync::mpsc::unbounded_channel();
        let viewing = tokio::spawn(async move {
            while let Some(b) = stream.next_batch().await {
                let b = b.map_err(|e| e.to_string());
                if tx.send(b.map(|b| (Instant::now(), b))).is_err() {
                    break;
                }
            }
        });
        let (tx, mut mover_rx) = tokio::sync::mpsc::unbounded_channel();
        let mover_state = Arc::new(std::sync::Mutex::new((String::new(), 0u64)));
        let moving = {
            let state = Arc::clone(&mover_state);
            tokio::spawn(async move {
                loop {
                    let b = mover.next_batch().await;
                    *state.lock().expect("mover state") = (mover.edge().to_owned(), mover.reconnects());
                    let failed = b.is_err();
                    if tx
                        .send(b.map(|b| (Instant::now(), b)).map_err(|e| e.to_string()))
                        .is_err()
                        || failed
                    {
                        break;
                    }
                }
            })
        };

        // Both viewers get the room's messages before the kill.
        let (mut seen, mut moved_seen) = (Arrivals::new(), Arrivals::new());
        let warm = tokio::time::timeout(ROUND_LIMIT, async {
            while seen.len() < 5 || moved_seen.len() < 5 {
                tokio::select! {
                    Some(Ok((at, b))) = viewer_rx.recv() => arrivals(&b, at, &mut seen),
                    Some(Ok((at, b))) = mover_rx.recv() => arrivals(&b, at, &mut moved_seen),
                    else => break,
                }
            }
        })
        .await;
        assert!(
            warm.is_ok() && seen.len() >= 5 && moved_seen.len() >= 5,
            "round {round}: no traffic before the kill"
        );

        edges[o].signal("-KILL");
        let killed = Instant::now();
        let from = next.load(Ordering::Relaxed);
        let want: Vec<&str> = ids.iter().copied().filter(|&i| i != origin).collect();

        let noticing = async {
            for &i in &survivors {
                edges[i].wait_live(&want, ROUND_LIMIT).await;
            }
            killed.elapsed()
        };
        let watching = async {
            let deadline = tokio::time::sleep(ROUND_LIMIT);
            tokio::pin!(deadline);
            loop {
                if first_after(&seen, from, killed).is_some() && first_after(&moved_seen, from, killed).is_some() {
                    return;
                }
                tokio::select! {
                    b = viewer_rx.recv() => match b {
                        Some(Ok((at, b))) => arrivals(&b, at, &mut seen),
                        other => panic!("round {round}: the surviving viewer's stream ended: {other:?}"),
                    },
                    b = mover_rx.recv() => match b {
                        Some(Ok((at, b))) => arrivals(&b, at, &mut moved_seen),
                        other => panic!("round {round}: the mover gave up: {other:?}"),
                    },
                    () = &mut deadline => panic!(
                        "round {round}: no recovery within {ROUND_LIMIT:?}: sent up to {}, after the kill from {from}; \
                         the viewer's last {:?}, the mover's last {:?} (on, reconnects: {:?})",
                        next.load(Ordering::Relaxed),
                        seen.last().map(|a| (a.1, a.2)),
                        moved_seen.last().map(|a| (a.1, a.2)),
                        mover_state.lock().expect("mover state"),
                    ),
                }
            }
        };
        let (noticed, ()) = tokio::join!(noticing, watching);
        stop.store(true, Ordering::Relaxed);
        let _ = sending.await;

        let moved = first_after(&seen, from, killed).expect("moved");
        let resumed = first_after(&moved_seen, from, killed).expect("resumed");
        check_order("the surviving viewer", &seen);
        check_order("the mover", &moved_seen);
        let reconnects = mover_state.lock().expect("mover state").1;
        assert!(reconnects >= 1, "round {round}: the mover never left the dead edge");
        eprintln!(
            "{} round {round}: killed {origin}; noticed {}, moved {}, resumed {} ({reconnects} reconnects)",
            preset.name,
            ms(noticed),
            ms(moved),
            ms(resumed),
        );
        samples.noticed.push(noticed);
        samples.moved.push(moved);
        samples.resumed.push(resumed);
        viewing.abort();
        moving.abort();
        drop(viewer);

        // The killed edge comes back for the next round.
        let mut serve = start(dir.path(), &paths[o]).await;
        ready[o] = serve.ready.take().expect("ready line");
        edges[o] = serve;
        for e in &edges {
            e.wait_live(&ids, Duration::from_secs(20)).await;
        }
    }
    samples
}

fn room_of(round: usize) -> String {
    format!("failover-{round}")
}

async fn start(dir: &std::path::Path, config: &std::path::Path) -> Serve {
    Serve::start(dir, &["--config", config.to_str().expect("utf-8")]).await
}
