//! `throng serve` edges in a cluster over a real nats-server, as an
//! operator runs them: they find each other, agree on the live set, see a
//! killed edge go within `dead_after` and a stopped one at once, and an edge
//! that cannot reach NATS says so and does not start.

use std::time::{Duration, Instant};

use crate::common::*;
use throng_tests::nats::NatsServer;
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_edges_agree_on_the_live_set_a_killed_one_goes_within_dead_after_a_stopped_one_at_once() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut edges = Vec::new();
    for id in ["a", "b", "c"] {
        let path = dir.path().join(format!("{id}.toml"));
        std::fs::write(&path, config(&nats.url(), id)).expect("config");
        edges.push(Serve::start(dir.path(), &["--config", path.to_str().expect("utf-8")]).await);
    }
    for e in &edges {
        e.wait_live(&["a", "b", "c"], Duration::from_secs(10)).await;
        let stats = e.stats();
        assert_eq!(stats["cluster"]["region"], "test");
        assert_eq!(stats["cluster"]["nats_connected"], true);
        assert!(stats["cluster"]["bus"]["messages_out"].as_u64().expect("count") >= 1);
        assert!(stats["cluster"]["bus"]["messages_in"].as_u64().expect("count") >= 3);
    }

    // kill -9: no goodbye; the others notice within dead_after (and the
    // sweep's half heartbeat), plus room for a machine busy elsewhere.
    let mut c = edges.pop().expect("c");
    c.signal("-KILL");
    let _ = c.child.wait().await;
    let killed = Instant::now();
    for e in &edges {
        e.wait_live(&["a", "b"], DEAD_AFTER + Duration::from_secs(2)).await;
    }
    let took = killed.elapsed();
    assert!(
        took >= DEAD_AFTER / 2,
        "a killed edge cannot be noticed before its heartbeats stop counting: {took:?}"
    );

    // A clean stop says goodbye: the other sees it go well before dead_after.
    let mut b = edges.pop().expect("b");
    b.signal("-TERM");
    b.line("left the cluster").await;
    let left = Instant::now();
    let took = edges[0].wait_live(&["a"], DEAD_AFTER).await;
    assert!(
        left.elapsed() < DEAD_AFTER,
        "a stopped edge went only after {took:?}, as if it had not said goodbye"
    );
    let status = tokio::time::timeout(Duration::from_secs(15), b.child.wait())
        .await
        .expect("stops in time")
        .expect("status");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_flag_alone_is_enough_and_a_garbage_announcement_changes_nothing() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let args = [
        "--cluster",
        &nats.url(),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().expect("utf-8"),
    ];
    let mut edge = Serve::start(dir.path(), &args).await;
    let line = edge.line("throng cluster").await;
    assert!(line.contains("edge_id=edge-"), "{line}");
    assert!(line.contains("region=default"), "{line}");
    let me = line
        .split("edge_id=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("edge id")
        .to_owned();
    edge.wait_live(&[me.as_str()], Duration::from_secs(10)).await;

    // Another client on the bus says nonsense, and an id no edge may have.
    let bus = async_nats::connect(nats.url()).await.expect("test client connects");
    for junk in [&b"\x01\xff\xff"[..], b"", b"\x07hello", &[1u8; 5000][..]] {
        bus.publish(format!("throng.edges.{me}"), junk.to_vec().into())
            .await
            .expect("publish");
    }
    // A forward naming a room no client could name makes no room.
    use throng_edge::cluster::bus::{self as edge_bus, Forward, Forwarded};
    let forward = Forward {
        from: "other".into(),
        items: vec![Forwarded {
            tenant: "dev".into(),
            room: String::new(),
            fwd_id: 1,
            hops: 1,
            sender: "u".into(),
            kind: throng_wire::Kind::Chat,
            body: b"x".to_vec(),
            received_ms: 0,
        }],
    };
    bus.publish(
        edge_bus::ingress_subject(&me, "other"),
        edge_bus::encode(&forward).into(),
    )
    .await
    .expect("publish");
    // Garbage on every other subject an edge listens to.
    for subject in [
        edge_bus::counts_subject(&me, "other"),
        edge_bus::regional_subject(&me, "other"),
        edge_bus::who_subject("other"),
        edge_bus::resync_subject(&me, "other"),
    ] {
        for junk in [&b"\x01\xff\xff"[..], b""] {
            bus.publish_with_reply(subject.clone(), "junk.reply", junk.to_vec().into())
                .await
                .expect("publish");
        }
    }
    // A well-formed question with nowhere to send the answer.
    let who = edge_bus::WhoQuery {
        from: "other".into(),
        tenant: "dev".into(),
        users: vec!["u".into()],
    };
    bus.publish(edge_bus::who_subject("other"), edge_bus::encode(&who).into())
        .await
        .expect("publish");
    // A resync for a room this edge does not have makes no room.
    let resync = edge_bus::Resync {
        tenant: "dev".into(),
        room: "nowhere".into(),
        after_seq: 0,
    };
    bus.publish_with_reply(
        edge_bus::resync_subject(&me, "other"),
        "junk.reply",
        edge_bus::encode(&resync).into(),
    )
    .await
    .expect("publish");
    bus.flush().await.expect("flush");
    let deadline = Instant::now() + Duration::from_secs(10);
    // 4 that do not decode; 11 from an edge that is not live.
    let dropped = |s: &serde_json::Value| {
        s["cluster"]["bus"]["malformed"].as_u64().unwrap_or(0) + s["cluster"]["bus"]["refused"].as_u64().unwrap_or(0)
    };
    while dropped(&edge.stats()) < 15 {
        assert!(Instant::now() < deadline, "{}", edge.stats()["cluster"]);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(edge.live(), [me]);
    assert_eq!(edge.stats()["rooms"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_cannot_reach_nats_says_so_and_does_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = throng_tests::nats::free_port();
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(BIN)
            .args(["serve", "--admin", "off", "--listen", "127.0.0.1:0", "--cluster"])
            .arg(format!("nats://127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(dir.path())
            .env("NO_COLOR", "1")
            .output(),
    )
    .await
    .expect("gives up in time")
    .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("cannot reach NATS at nats://127.0.0.1:{port}")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );

    let out = Command::new(BIN)
        .args(["serve", "--edge-id", "x", "--admin", "off"])
        .output()
        .await
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--edge-id, --region and --nats-nkey need a cluster"),
        "{err}"
    );
    let out = Command::new(BIN)
        .args(["serve", "--cluster", "nats://nohost"])
        .output()
        .await
        .expect("runs");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a NATS URL"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_rooms_origin_moves_the_room_and_its_numbers_go_on() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = ["a", "b", "c"];
    let (edges, ready) = start_edges(&nats, dir.path(), &ids, |c| c).await;
    let o = origin_index(&ids, "lobby");
    let origin = ids[o];
    let survivors: Vec<usize> = (0..3).filter(|&i| i != o).collect();

    // A viewer on each surviving edge; the sender on the first of them.
    let mut viewers = Vec::new();
    for &i in &survivors {
        let c = client(&ready[i], &format!("viewer-{i}"), "viewer").await;
        let room = c.join("lobby").await.expect("joins");
        viewers.push((c, room));
    }
    let sender = client(&ready[survivors[0]], "host", "host").await;
    let _sender_room = sender.join("lobby").await.expect("sender joins");
    // A viewer of the origin's edge that knows the other edges: it moves to
    // one of them when its edge dies, and resumes by sequence.
    let mover = throng_client::ResumableRoom::join(
        cluster_options(&ready, o, "mover", "viewer"),
        "lobby",
        None,
        throng_client::ResumePolicy::default(),
    )
    .await
    .expect("joins on the origin's edge");
    assert_eq!(mover.edge(), quic_of(&ready[o]).0);
    let (moved_tx, moved_rx) = tokio::sync::oneshot::channel();
    let moving = tokio::spawn(async move {
        let mut mover = mover;
        let mut got: Vec<(u64, String)> = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while !got.iter().any(|(_, b)| b == "after-4") {
                match mover.next_batch().await {
                    Ok(b) => got.extend(
                        b.messages
                            .into_iter()
                            .map(|m| (m.seq, String::from_utf8_lossy(&m.body).into_owned())),
                    ),
                    Err(e) => panic!("the mover gave up: {e}"),
                }
            }
        })
        .await;
        let _ = moved_tx.send((mover.edge().to_owned(), mover.reconnects()));
        got
    });
    // The origin hears of the relays' viewers within a presence interval;
    // until then what it publishes has nobody to go to.
    let mut before = Vec::new();
    for k in 0..5 {
        before.push(
            sender
                .send("lobby", throng_wire::Kind::Chat, format!("before-{k}"))
                .await
                .expect("acked")
                .seq,
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for (v, (_, room)) in viewers.iter_mut().enumerate() {
        let got = receive(room, "before-", 1).await;
        assert!(!got.is_empty(), "viewer {v} got nothing from the origin");
    }

    edges[o].signal("-KILL");
    let killed = Instant::now();
    let want: Vec<&str> = ids.iter().copied().filter(|&i| i != origin).collect();
    for &i in &survivors {
        edges[i].wait_live(&want, DEAD_AFTER + Duration::from_secs(3)).await;
    }
    let noticed = killed.elapsed();

    // The room runs on its next edge: sends are acked within a second.
    let mut after = Vec::new();
    for k in 0..5 {
        let sent = Instant::now();
        let ack = sender
            .send("lobby", throng_wire::Kind::Chat, format!("after-{k}"))
            .await
            .unwrap_or_else(|e| panic!("after-{k} refused {:?} after the origin died: {e}", killed.elapsed()));
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "after-{k} took {:?}",
            sent.elapsed()
        );
        after.push(ack.seq);
    }
    let last_before = before.iter().max().copied().unwrap_or(0);
    assert!(
        after.iter().all(|&s| s > last_before),
        "numbers went backwards across the move: before {before:?}, after {after:?}"
    );
    assert!(after.windows(2).all(|w| w[0] < w[1]), "{after:?}");
    for (v, (_, room)) in viewers.iter_mut().enumerate() {
        let got = receive(room, "after-", after.len()).await;
        let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
        assert_eq!(seqs, after, "viewer {v} after the move (noticed in {noticed:?})");
    }
    // The origin's own viewer moved to a surviving edge and got everything
    // sent after the move, each once, in order, without asking twice.
    let got = moving.await.expect("mover");
    let (edge, reconnects) = moved_rx.await.expect("mover's edge");
    assert_ne!(edge, quic_of(&ready[o]).0, "the mover stayed on the dead edge");
    assert!(reconnects >= 1);
    let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "the mover got {got:?}");
    let after_got: Vec<u64> = got.iter().filter(|g| g.1.starts_with("after-")).map(|g| g.0).collect();
    assert_eq!(after_got, after, "the mover after its edge died");
}

/// Kill -9 of a group room's origin under traffic: the room moves, its
/// numbers go on, and its log keeps every acked message that was stored
/// before the kill or that reached a surviving edge (the new origin stores
/// what its viewers were given and the log did not have yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_group_rooms_origin_keeps_every_acked_message_a_survivor_saw() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = ["a", "b", "c"];
    let group = |c: String| format!("{c}\n[rooms]\ngroup_rooms = [\"team-*\"]\ngroup_history = \"all\"\n");
    let (edges, ready) = start_edges(&nats, dir.path(), &ids, group).await;
    let o = origin_index(&ids, "team-ops");
    let origin = ids[o];
    let survivors: Vec<usize> = (0..3).filter(|&i| i != o).collect();

    let mut members = Vec::new();
    for &i in &survivors {
        let c = client(&ready[i], &format!("member-{i}"), "viewer").await;
        let room = c.join("team-ops").await.expect("joins");
        members.push((c, room));
    }
    let sender = client(&ready[survivors[0]], "host", "host").await;
    let mut sender_room = sender.join("team-ops").await.expect("sender joins");
    tokio::spawn(async move { while let Some(Ok(_)) = sender_room.next_batch().await {} });

    // Sends in flight when the origin dies: submitted back to back, the
    // last ones acked just before the kill.
    let mut acked = std::collections::BTreeMap::new();
    for k in 0..40 {
        let body = format!("before-{k}");
        let ack = sender
            .send("team-ops", throng_wire::Kind::Chat, body.clone())
            .await
            .expect("acked");
        acked.insert(ack.seq, body);
    }
    edges[o].signal("-KILL");
    let want: Vec<&str> = ids.iter().copied().filter(|&i| i != origin).collect();
    for &i in &survivors {
        edges[i].wait_live(&want, DEAD_AFTER + Duration::from_secs(3)).await;
    }
    // What the surviving members were given before the move.
    let mut seen = std::collections::BTreeSet::new();
    for (_, room) in &mut members {
        for (seq, _) in receive_for(room, "before-", acked.len(), Duration::from_secs(3)).await {
            seen.insert(seq);
        }
    }
    let last_before = acked.keys().last().copied().unwrap_or(0);
    let mut after = std::collections::BTreeMap::new();
    for k in 0..5 {
        let body = format!("after-{k}");
        let ack = sender
            .send("team-ops", throng_wire::Kind::Chat, body.clone())
            .await
            .unwrap_or_else(|e| panic!("{body} refused after the origin died: {e}"));
        assert!(
            ack.seq > last_before,
            "numbers went back: {} after {last_before}",
            ack.seq
        );
        after.insert(ack.seq, body);
    }
    // A newcomer reads the whole log from a surviving edge.
    let reader = client(&ready[survivors[1]], "reader", "viewer").await;
    let mut room = reader.join_from("team-ops", Some(0)).await.expect("reader joins");
    let got = receive_for(&mut room, "", acked.len() + after.len(), Duration::from_secs(10)).await;
    let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "out of order or repeated: {seqs:?}"
    );
    let in_log: std::collections::BTreeSet<u64> = seqs.iter().copied().collect();
    let lost_seen: Vec<&u64> = seen.iter().filter(|s| !in_log.contains(s)).collect();
    assert!(
        lost_seen.is_empty(),
        "acked, seen by a survivor, and lost: {lost_seen:?}"
    );
    for (seq, body) in &after {
        assert!(in_log.contains(seq), "{body} ({seq}) is not in the log");
    }
    let lost: Vec<&String> = acked
        .iter()
        .filter(|(s, _)| !in_log.contains(s))
        .map(|(_, b)| b)
        .collect();
    eprintln!(
        "{} acked before the kill, {} of them seen by survivors; lost with the origin: {lost:?}",
        acked.len(),
        seen.len()
    );
}

/// A relay that falls behind on the bus (stopped for a moment, its
/// subscription's buffer overflows when the backlog arrives at once, and
/// the NATS client drops what does not fit) notices the gap in the origin's
/// batches and fills it from the origin's ring: its viewer gets every
/// message the origin's viewer got, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_fell_behind_on_the_bus_fills_the_gap_from_the_origins_ring() {
    relay_stopped_for(Duration::from_millis(1200), DEAD_AFTER, 4).await;
}

/// The same, stopped longer than the origin keeps a silent relay's
/// interest (three presence intervals and a second: 1.6 s here): the
/// origin stops publishing the room's batches meanwhile, so no batch is
/// missing by count; the relay still sees, from the number the origin
/// delivered before its next batch, that messages are, and fills them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_interest_lapsed_while_stopped_fills_the_gap_from_the_origins_ring() {
    // A subscription that holds the whole backlog: no batch is lost on
    // the bus, only those the origin never published.
    relay_stopped_for(Duration::from_millis(2500), Duration::from_secs(6), 65536).await;
}

async fn relay_stopped_for(stop: Duration, dead_after: Duration, subscription_capacity: usize) {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = ["a", "b"];
    let (edges, ready) = start_edges(&nats, dir.path(), &ids, |c| {
        c.replace(
            "[tenants.dev]",
            "[limits]\nsend_rate_per_sec = 100000\nsend_burst = 100000\n\n\
             [rooms]\nviewer_cap_per_sec = 0\nrecent_messages = 5000\npresence_interval = \"200ms\"\n\
             viewer_queue_batches = 10000\n\n\
             [tenants.dev]",
        )
        // With four bus messages per subscription a backlog overflows it.
        .replace(
            &format!("dead_after = \"{}ms\"", DEAD_AFTER.as_millis()),
            &format!(
                "subscription_capacity = {subscription_capacity}\ndead_after = \"{}ms\"",
                dead_after.as_millis()
            ),
        )
    })
    .await;
    let o = origin_index(&ids, "lobby");
    let r = 1 - o;

    let here = client(&ready[o], "viewer-origin", "viewer").await;
    let mut here_room = here.join("lobby").await.expect("joins");
    let there = client(&ready[r], "viewer-relay", "viewer").await;
    let mut there_room = there.join("lobby").await.expect("joins");
    let sender = client(&ready[o], "host", "host").await;
    let _sender_room = sender.join("lobby").await.expect("sender joins");
    // The relay's viewer gets the origin's batches once the origin heard of it.
    warm_relay(&sender, "lobby", &mut there_room).await;

    // Sends at the origin while the relay is stopped (for less than
    // dead_after: it stays in the cluster).
    let body = "x".repeat(100);
    let sending = tokio::spawn(async move {
        let mut acked = Vec::new();
        let end = Instant::now() + stop + Duration::from_millis(1800);
        let mut k = 0;
        while Instant::now() < end {
            let mut pending = Vec::new();
            for _ in 0..10 {
                pending.push(
                    sender
                        .submit("lobby", throng_wire::Kind::Chat, format!("m-{k:05}-{body}"))
                        .await
                        .expect("submitted"),
                );
                k += 1;
            }
            for p in pending {
                acked.push(p.ack().await.expect("acked").seq);
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    edges[r].signal("-STOP");
    tokio::time::sleep(stop).await;
    edges[r].signal("-CONT");
    let acked = sending.await.expect("sender");

    let want = acked.len();
    let at_origin = receive(&mut here_room, "m-", want).await;
    let at_relay = receive(&mut there_room, "m-", want).await;
    let seqs = |got: &[(u64, String)]| got.iter().map(|g| g.0).collect::<Vec<u64>>();
    assert_eq!(seqs(&at_origin), acked, "the origin's own viewer");
    let stats = edges[r].stats();
    let resyncs = &stats["cluster"]["bus"]["by_kind"]["resync"];
    assert!(
        resyncs["out"].as_u64().unwrap_or(0) > 0,
        "the relay never asked for a resync: was it cut off at all? relay got {} of {want}; relay bus {}; origin bus {}",
        at_relay.len(),
        stats["cluster"]["bus"],
        edges[o].stats()["cluster"]["bus"]
    );
    eprintln!(
        "relay bus {}; origin bus {}",
        stats["cluster"]["bus"],
        edges[o].stats()["cluster"]["bus"]
    );
    let got = seqs(&at_relay);
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "out of order or twice at the relay"
    );
    assert_eq!(
        got.len(),
        want,
        "the relay's viewer got {} of {want} messages (bus: {})",
        got.len(),
        stats["cluster"]["bus"]
    );
    assert_eq!(got, acked);
}

/// `throng load --server A,B` spreads its viewers over two edges of a
/// cluster: every viewer gets the room's messages, whichever edge it is
/// on, and the edges' CPU is summed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throng_load_spreads_viewers_over_the_edges_of_a_cluster() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = ["a", "b"];
    let (edges, ready) = start_edges(&nats, dir.path(), &ids, |c| {
        c.replace(
            "[tenants.dev]",
            "[limits]\nsend_rate_per_sec = 100000\nsend_burst = 100000\n\n[tenants.dev]",
        )
    })
    .await;
    let pids: Vec<String> = edges
        .iter()
        .map(|e| e.child.id().expect("running").to_string())
        .collect();
    let (addrs, certs): (Vec<String>, Vec<String>) = ready
        .iter()
        .map(|r| {
            let (addr, cert) = quic_of(r);
            (addr, cert.display().to_string())
        })
        .unzip();
    let config_a = dir.path().join("a.toml");
    let args = [
        "load",
        "--server",
        &addrs.join(","),
        "--cert",
        &certs.join(","),
        "--edge-pid",
        &pids.join(","),
        "--config",
        config_a.to_str().expect("utf-8"),
        "--viewers",
        "20",
        "--senders",
        "1",
        "--rate",
        "50",
        "--warmup",
        "1s",
        "--duration",
        "2s",
        "--quiet",
        "--json",
    ];
    let run = Command::new(BIN).args(args).kill_on_drop(true).output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("throng load finishes within 60 s")
        .expect("throng load runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "throng load failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON report");
    assert_eq!(
        report["target"]["addr"].as_str(),
        Some(addrs.join(",").as_str()),
        "{report:#}"
    );
    assert_eq!(
        report["connections"]["viewers_connected"].as_u64(),
        Some(20),
        "{report:#}"
    );
    let slowest = report["delivery"]["per_viewer_per_sec"]["min"].as_f64().unwrap_or(0.0);
    assert!(slowest > 10.0, "a viewer got {slowest} msgs/s: {report:#}");
    assert!(report["server"]["cpu_s"].as_f64().unwrap_or(0.0) > 0.0, "{report:#}");
    // Both edges served viewers: the relay's bus carried the room.
    let relay_batches: u64 = edges
        .iter()
        .map(|e| {
            e.stats()["cluster"]["bus"]["by_kind"]["batch"]["in"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert!(relay_batches > 0, "no edge relayed the room");
}

/// Forty users of a tenant on one edge join new room after new room and
/// leave them. The relay makes each room, and the origin of the ones it is
/// not the origin of makes its own from the relay's interest. Neither edge
/// holds more rooms than the tenant's cap, rooms go once empty so later
/// joins succeed again, memory and CPU stay bounded, and a viewer of a room
/// made before the flood gets every message throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_made_without_end_through_a_relay_stay_under_the_cap_on_both_edges_and_go_away() {
    const CAP: u64 = 100;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = ["a", "b"];
    let (edges, ready) = start_edges(&nats, dir.path(), &ids, |c| {
        c.replace(
            "[tenants.dev]",
            &format!(
                "[limits]\nmax_rooms_per_tenant = {CAP}\n\n\
                 [rooms]\nempty_room_linger = \"1s\"\npresence_interval = \"200ms\"\n\n[tenants.dev]"
            ),
        )
    })
    .await;
    let o = origin_index(&ids, "lobby");
    let r = 1 - o;

    let viewer = client(&ready[r], "viewer", "viewer").await;
    let mut lobby = viewer.join("lobby").await.expect("joins");
    let host = client(&ready[o], "host", "host").await;
    let _host_room = host.join("lobby").await.expect("joins");
    // The relay's viewer gets the origin's batches once the origin heard of it.
    warm_relay(&host, "lobby", &mut lobby).await;
    let before: Vec<serde_json::Value> = edges.iter().map(Serve::stats).collect();

    let flood_for = Duration::from_secs(8);
    let until = Instant::now() + flood_for;
    let mut flood = tokio::task::JoinSet::new();
    for u in 0..40 {
        let ready = ready[r].clone();
        flood.spawn(async move {
            let mut c = client(&ready, &format!("flood-{u}"), "viewer").await;
            let (mut joined, mut refused, mut closed, mut k) = (0u64, 0u64, 0u64, 0u64);
            while Instant::now() < until {
                let mut rooms = Vec::new();
                for _ in 0..4 {
                    let name = format!("junk-{u}-{k}");
                    k += 1;
                    let answer = tokio::time::timeout(Duration::from_secs(5), c.join(&name))
                        .await
                        .unwrap_or_else(|_| panic!("join {name} unanswered for 5 s"));
                    match answer {
                        Ok(stream) => {
                            joined += 1;
                            rooms.push((name, stream));
                        }
                        Err(throng_client::ClientError::JoinRefused {
                            code: Some(throng_wire::ErrorCode::RoomLimit | throng_wire::ErrorCode::RateLimited),
                            ..
                        }) => refused += 1,
                        Err(e) => {
                            // Closed for too many refused frames: a new connection.
                            assert_eq!(e.code(), Some(throng_wire::ErrorCode::RateLimited), "join {name}: {e}");
                            closed += 1;
                            c = client(&ready, &format!("flood-{u}"), "viewer").await;
                            rooms.clear();
                            break;
                        }
                    }
                }
                for (name, _) in &rooms {
                    // A closed connection has left them all.
                    let _ = c.leave(name).await;
                }
            }
            (joined, refused, closed)
        });
    }
    // The lobby's host goes on meanwhile, at half the viewer's cap.
    let sending = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut k = 0;
        while Instant::now() < until {
            let ack = host.send("lobby", throng_wire::Kind::Chat, format!("m-{k}")).await;
            acked.push(ack.expect("the lobby's host is acked during the flood").seq);
            k += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (host, acked)
    });
    let (mut most_rooms, mut most_rss) = ([0u64; 2], [0u64; 2]);
    while Instant::now() < until {
        for (i, e) in edges.iter().enumerate() {
            let stats = e.stats();
            most_rooms[i] = most_rooms[i].max(stats["rooms"].as_u64().expect("rooms"));
            most_rss[i] = most_rss[i].max(stats["process"]["rss_kib"].as_u64().expect("rss"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut joined, mut refused, mut closed) = (0, 0, 0);
    while let Some(done) = flood.join_next().await {
        let (j, f, c) = done.expect("a flooding client");
        joined += j;
        refused += f;
        closed += c;
    }
    let (_host, acked) = sending.await.expect("the lobby's host");
    let got = receive(&mut lobby, "m-", acked.len()).await;
    let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert_eq!(seqs, acked, "the lobby's viewer on the relay during the flood");

    // Rooms went once empty, and more were made than the cap holds.
    assert!(refused > 0, "the flood never reached the cap: {joined} joins");
    assert!(joined > 2 * CAP, "only {joined} joins passed; {refused} refused");
    for (i, rooms) in most_rooms.iter().enumerate() {
        assert!(*rooms <= CAP, "edge {} held {rooms} rooms", ids[i]);
    }
    for e in &edges {
        let mut rooms = 0;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            rooms = e.stats()["rooms"].as_u64().expect("rooms");
            if rooms == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(rooms, 1, "only the lobby is left on {}", e.admin);
    }
    for (i, e) in edges.iter().enumerate() {
        let after = e.stats();
        let cpu =
            after["process"]["cpu_s"].as_f64().expect("cpu") - before[i]["process"]["cpu_s"].as_f64().expect("cpu");
        let rss = before[i]["process"]["rss_kib"].as_u64().expect("rss");
        eprintln!(
            "edge {} ({}): at most {} rooms; rss {} MiB before, {} MiB at most; {cpu:.1} cpu-s over the flood",
            ids[i],
            if i == o { "origin" } else { "relay" },
            most_rooms[i],
            rss / 1024,
            most_rss[i] / 1024,
        );
        assert!(
            most_rss[i] < rss + 128 * 1024,
            "edge {} grew from {rss} KiB to {} KiB",
            ids[i],
            most_rss[i]
        );
    }
    eprintln!("{joined} joins, {refused} refused at a limit, {closed} connections closed for the flood");
}
