//! Edges in one process that share nothing but a real nats-server: rooms
//! that span them, one origin per room.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use throng_edge::cluster::{BusKind, BusStats};
use throng_edge::config::ClusterConfig;
use throng_tests::nats::NatsServer;
use throng_tests::{TestEdge, wait_for};
use throng_wire::Kind;

use throng_tests::{cluster, cluster_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_edges_one_room_every_viewer_sees_the_same_messages_with_the_same_numbers() {
    // As the cluster example runs: each edge signs in with its own nkey.
    let nats = NatsServer::secured(&["a", "b", "c"], &[]);
    let edges = cluster(&nats, &["a", "b", "c"]).await;
    let origin = edges[0]
        .edge
        .cluster()
        .expect("clustered")
        .live()
        .origin("acme", "lobby")
        .expect("an origin")
        .to_owned();

    // One viewer that also sends, on every edge.
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    for (i, e) in edges.iter().enumerate() {
        let client = e.client("acme", &format!("user-{i}"), "host").await;
        streams.push(client.join("lobby").await.expect("joins"));
        clients.push(client);
    }
    // The origin counts every edge's viewers and says so to all of them.
    for (i, s) in streams.iter_mut().enumerate() {
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(b)) = s.next_batch().await {
                if b.online == 3 {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(
            seen,
            Ok(true),
            "viewer {i} never saw the 3 viewers online (origin {origin})"
        );
    }

    const EACH: usize = 20;
    let mut senders = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let client = client.clone();
        senders.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for k in 0..EACH {
                let ack = client
                    .send("lobby", Kind::Chat, format!("m-{i}-{k}"))
                    .await
                    .expect("acked");
                seqs.push(ack.seq);
            }
            seqs
        }));
    }
    let mut acked = BTreeSet::new();
    for s in senders {
        acked.extend(s.await.expect("sender"));
    }
    assert_eq!(acked.len(), 3 * EACH, "every send got its own number");

    let mut seen_by = Vec::new();
    for (i, s) in streams.iter_mut().enumerate() {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), async {
            while got.len() < 3 * EACH {
                match s.next_batch().await {
                    Some(Ok(b)) => got.extend(
                        b.messages
                            .into_iter()
                            .filter(|m| m.body.starts_with(b"m-"))
                            .map(|m| (m.seq, String::from_utf8_lossy(&m.body).into_owned())),
                    ),
                    _ => break,
                }
            }
        })
        .await;
        assert_eq!(got.len(), 3 * EACH, "viewer {i} got {} of {}", got.len(), 3 * EACH);
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "viewer {i}: out of order");
        let seqs: BTreeSet<u64> = got.iter().map(|g| g.0).collect();
        assert_eq!(seqs, acked, "viewer {i} saw other numbers than the senders were acked");
        seen_by.push(got);
    }
    assert_eq!(seen_by[0], seen_by[1]);
    assert_eq!(seen_by[1], seen_by[2]);

    // Relay edges forwarded to the origin: bus traffic, not a room of their own.
    for e in &edges {
        let bus = e.edge.cluster().expect("clustered").snapshot().bus;
        assert!(bus.messages_out > 0 && bus.messages_in > 0, "{bus:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_nats_server_is_reconnected_and_the_room_goes_on() {
    let mut nats = NatsServer::start();
    let edges = cluster(&nats, &["a", "b"]).await;
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    for (i, e) in edges.iter().enumerate() {
        let client = e.client("acme", &format!("user-{i}"), "host").await;
        streams.push(client.join("stage").await.expect("joins"));
        clients.push(client);
    }
    for (i, s) in streams.iter_mut().enumerate() {
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(b)) = s.next_batch().await {
                if b.online == 2 {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(seen, Ok(true), "viewer {i} never saw both viewers online");
    }

    nats.restart();
    for e in &edges {
        let c = e.edge.cluster().expect("clustered");
        wait_for(
            "the edge to reconnect to NATS and hear the other",
            Duration::from_secs(20),
            || c.connected() && c.live().edges.len() == 2,
        )
        .await;
    }
    // Sends from both edges: a relay's go through the bus again. One sent
    // while subscriptions are still being restored may be refused; resend.
    let mut acked = BTreeSet::new();
    for (i, client) in clients.iter().enumerate() {
        for k in 0..3 {
            let body = format!("again-{i}-{k}");
            let mut tries = 0;
            let ack = loop {
                tries += 1;
                match client.send("stage", Kind::Chat, body.clone()).await {
                    Ok(ack) => break ack,
                    Err(e) if tries < 5 => {
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => panic!("{body} refused 5 times after the restart: {e}"),
                }
            };
            acked.insert(ack.seq);
        }
    }
    for (i, s) in streams.iter_mut().enumerate() {
        let mut got = BTreeSet::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), async {
            while got.len() < acked.len() {
                match s.next_batch().await {
                    Some(Ok(b)) => got.extend(
                        b.messages
                            .iter()
                            .filter(|m| m.body.starts_with(b"again-"))
                            .map(|m| m.seq),
                    ),
                    _ => break,
                }
            }
        })
        .await;
        assert_eq!(got, acked, "viewer {i} after the NATS restart");
    }
}

/// A clustered edge of `region`, attached to `nats`.
async fn regional_edge(nats: &NatsServer, id: &str, region: &str, presence: Duration, tick: Duration) -> TestEdge {
    let url = nats.url();
    let id = id.to_owned();
    let region = region.to_owned();
    TestEdge::start(move |c| {
        let mut cluster = ClusterConfig::with_nats(vec![url]);
        cluster.edge_id = Some(id);
        cluster.region = region;
        cluster.heartbeat = Duration::from_millis(100);
        cluster.dead_after = Duration::from_millis(1500);
        c.cluster = Some(cluster);
        c.rooms.presence_interval = presence;
        c.rooms.tick = tick;
        c.wasm.max_instances = 256;
    })
    .await
}

/// Messages of each kind an edge sent and received so far.
fn kinds(stats: &BusStats) -> HashMap<&'static str, (u64, u64)> {
    BusKind::ALL.iter().map(|k| (k.name(), stats.of(*k))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_presence_goes_edge_region_origin_and_bus_messages_do_not_grow_with_viewers() {
    const PRESENCE: Duration = Duration::from_millis(250);
    const TICK: Duration = Duration::from_millis(100);
    let servers = NatsServer::supercluster(&["eu", "us"]);
    let mut edges = Vec::new();
    for (server, region) in servers.iter().zip(["eu", "us"]) {
        for n in 1..=2 {
            edges.push(regional_edge(server, &format!("{region}-{n}"), region, PRESENCE, TICK).await);
        }
    }
    for e in &edges {
        let c = e.edge.cluster().expect("clustered");
        wait_for(
            "every edge of both regions to see the others",
            Duration::from_secs(20),
            || c.live().edges.len() == 4,
        )
        .await;
    }
    let live = edges[0].edge.cluster().expect("clustered").live();
    let origin = live.origin("acme", "stage").expect("an origin").to_owned();
    let aggregators: Vec<String> = ["eu", "us"]
        .iter()
        .map(|r| live.aggregator(r).expect("an aggregator").to_owned())
        .collect();
    let id = |e: &TestEdge| e.edge.cluster().expect("clustered").edge_id().to_owned();
    let crowded = edges.iter().position(|e| id(e) != origin).expect("a relay");

    // A viewer on every edge, and four more on one relay: eight in all.
    let mut viewers = Vec::new();
    let mut readers = Vec::new();
    let mut seen_online = Vec::new();
    for (i, e) in edges.iter().enumerate() {
        let n = if i == crowded { 5 } else { 1 };
        for k in 0..n {
            // The crowded edge's first viewer also sends, later.
            let role = if i == crowded && k == 0 { "host" } else { "viewer" };
            let client = e.client("acme", &format!("viewer-{i}-{k}"), role).await;
            let mut stream = client.join("stage").await.expect("joins");
            let online = Arc::new(AtomicU64::new(0));
            seen_online.push(Arc::clone(&online));
            readers.push(tokio::spawn(async move {
                let mut messages = 0u64;
                while let Some(Ok(b)) = stream.next_batch().await {
                    online.store(b.online, Ordering::Relaxed);
                    messages += b.messages.len() as u64;
                }
                messages
            }));
            viewers.push(client);
        }
    }
    let joined = Instant::now();
    for (i, online) in seen_online.iter().enumerate() {
        wait_for(
            &format!("viewer {i} to see the 8 viewers of both regions online"),
            Duration::from_secs(15),
            || online.load(Ordering::Relaxed) == 8,
        )
        .await;
    }
    let converged = joined.elapsed();
    eprintln!("online count converged {converged:?} after the last join (presence interval {PRESENCE:?})");

    // Who is online, asked on one region's edge of users on the other's.
    let asker = edges
        .iter()
        .position(|e| e.config.cluster.as_ref().map(|c| c.region.as_str()) == Some("us"));
    let asker = &viewers[asker.expect("a us edge")];
    let users: Vec<String> = vec!["viewer-0-0".into(), "nobody".into(), format!("viewer-{crowded}-4")];
    assert_eq!(asker.online(&users).await.expect("answered"), vec![true, false, true]);

    // A sender on a relay, ten messages every tick, while the edges count.
    let first_of_crowded: usize = (0..crowded).map(|_| 1).sum();
    let sender = viewers[first_of_crowded].clone();
    let sending = tokio::spawn(async move {
        let mut acked = 0u64;
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            let mut pending = Vec::new();
            for k in 0..10 {
                pending.push(
                    sender
                        .submit("stage", Kind::Chat, format!("m-{k}"))
                        .await
                        .expect("submitted"),
                );
            }
            for p in pending {
                if p.ack().await.is_ok() {
                    acked += 1;
                }
            }
            tokio::time::sleep(TICK).await;
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before: Vec<_> = edges
        .iter()
        .map(|e| kinds(e.edge.cluster().expect("clustered").stats()))
        .collect();
    let window_start = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after: Vec<_> = edges
        .iter()
        .map(|e| kinds(e.edge.cluster().expect("clustered").stats()))
        .collect();
    let window = window_start.elapsed();
    let acked = sending.await.expect("sender");
    let intervals = (window.as_secs_f64() / PRESENCE.as_secs_f64()).round() as u64;
    let ticks = (window.as_secs_f64() / TICK.as_secs_f64()).round() as u64;
    let delta = |i: usize, kind: &str| {
        let (o1, i1) = after[i][kind];
        let (o0, i0) = before[i][kind];
        (o1 - o0, i1 - i0)
    };
    let mut report = String::new();
    for (i, e) in edges.iter().enumerate() {
        report.push_str(&format!(
            "{}: counts {:?} regional {:?} batch {:?} forward {:?}\n",
            id(e),
            delta(i, "counts"),
            delta(i, "regional"),
            delta(i, "batch"),
            delta(i, "forward")
        ));
    }
    eprintln!("{intervals} presence intervals, {ticks} ticks, {acked} sends acked:\n{report}");
    let about = |n: u64, per: u64| n >= per / 2 && n <= per + 2;
    let origin_batches = delta(edges.iter().position(|e| id(e) == origin).expect("origin"), "batch").0;
    for (i, e) in edges.iter().enumerate() {
        let me = id(e);
        let (counts_out, counts_in) = delta(i, "counts");
        let (regional_out, regional_in) = delta(i, "regional");
        let (batch_out, batch_in) = delta(i, "batch");
        if me == origin {
            // The origin relays nothing: it counts its own viewers.
            assert!(counts_out <= 1, "origin sent counts:\n{report}");
            // One message per region per interval, whatever the viewers.
            assert!(about(regional_in, 2 * intervals), "origin heard regions:\n{report}");
            // One batch per tick at most, whatever the viewers and sends.
            assert!(batch_out <= ticks + 2 && batch_out > 0, "origin batches:\n{report}");
        } else {
            // One count message per interval, whatever its viewers (the
            // crowded edge has five).
            assert!(about(counts_out, intervals), "{me} counts:\n{report}");
            assert_eq!(batch_out, 0, "a relay publishes no batches:\n{report}");
            assert!(
                batch_in <= origin_batches + 2,
                "{me} heard more batches than the origin sent:\n{report}"
            );
            assert!(batch_in + 2 >= origin_batches, "{me} missed batches:\n{report}");
        }
        if aggregators.contains(&me) {
            // One message per interval to the one origin.
            assert!(about(regional_out, intervals), "aggregator {me}:\n{report}");
            assert!(counts_in > 0, "aggregator {me} heard no counts:\n{report}");
        } else {
            assert_eq!(regional_out, 0, "{me} is no aggregator:\n{report}");
            assert_eq!(counts_in, 0, "{me} is no aggregator:\n{report}");
        }
    }
    // The sends went to the origin in one message per edge tick, not one each.
    let (forwards, _) = delta(crowded, "forward");
    assert!(forwards <= ticks + 2, "forwards:\n{report}");
    assert!(
        acked > 2 * forwards,
        "{acked} sends in {forwards} forward messages:\n{report}"
    );
    for (i, online) in seen_online.iter().enumerate() {
        assert_eq!(online.load(Ordering::Relaxed), 8, "viewer {i} after the window");
    }
    for v in &viewers {
        v.close();
    }
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }
}

/// A new relay's first joiner gets the room's recent messages. Batches on
/// a room's subject that its origin did not send (another edge claiming to
/// be the origin, or another room's batch) are counted and dropped: the
/// relay's viewers see only what the origin sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_drops_batches_that_are_not_from_the_rooms_origin() {
    use throng_edge::cluster::bus::{self as edge_bus, RoomBatch};
    let nats = NatsServer::start();
    let edges = cluster(&nats, &["a", "b"]).await;
    let id = |e: &TestEdge| e.edge.cluster().expect("clustered").edge_id().to_owned();
    let origin_id = edges[0]
        .edge
        .cluster()
        .expect("clustered")
        .live()
        .origin("acme", "lobby")
        .expect("an origin")
        .to_owned();
    let o = edges.iter().position(|e| id(e) == origin_id).expect("origin");
    let relay = &edges[1 - o];
    let host = edges[o].client("acme", "host", "host").await;
    let _host_room = host.join("lobby").await.expect("joins");
    let mut early = Vec::new();
    for k in 0..3 {
        early.push(
            host.send("lobby", Kind::Chat, format!("early-{k}"))
                .await
                .expect("acked")
                .seq,
        );
    }
    // The relay's first joiner gets the room's recent messages, as it would
    // on the origin: the new relay asked the origin's ring for them.
    let viewer = relay.client("acme", "viewer", "viewer").await;
    let mut stream = viewer.join("lobby").await.expect("joins");
    let recent: Vec<u64> = stream.recent.iter().map(|m| m.seq).collect();
    assert_eq!(recent, early, "recent messages on a new relay");
    // The relay gets the origin's batches once the origin heard of it.
    let mut warmed = false;
    for k in 0..50 {
        host.send("lobby", Kind::Chat, format!("warm-{k}"))
            .await
            .expect("acked");
        let got = tokio::time::timeout(Duration::from_millis(200), stream.next_batch()).await;
        if matches!(got, Ok(Some(Ok(b))) if !b.messages.is_empty()) {
            warmed = true;
            break;
        }
    }
    assert!(warmed, "the relay's viewer never heard the origin");

    let frame = |body: &str| {
        let batch = throng_wire::Batch {
            room: "lobby".into(),
            tick: 1,
            messages: vec![throng_wire::Message {
                seq: u64::MAX / 4,
                sender: "mallory".into(),
                kind: Kind::Chat,
                body: body.as_bytes().to_vec(),
            }],
            counters: Default::default(),
            pinned: Vec::new(),
            online: 1_000_000,
            missed: 0,
            epoch: 1,
        };
        throng_wire::encode(&throng_wire::EdgeFrame::Batch(batch), 1 << 20)
            .expect("encodes")
            .to_vec()
    };
    // (subject's sender, the body's origin, tenant, room, body)
    let forged = [
        ("mallory", "mallory", "acme", "lobby", "forged-origin"),
        (origin_id.as_str(), origin_id.as_str(), "globex", "lobby", "forged-room"),
        ("mallory", origin_id.as_str(), "acme", "lobby", "forged-sender"),
    ];
    let bus = async_nats::connect(nats.url()).await.expect("test client connects");
    let dropped = |s: &throng_edge::cluster::ClusterSnapshot| s.bus.malformed + s.bus.refused;
    let before = dropped(&relay.edge.cluster().expect("clustered").snapshot());
    for (sender, from, tenant, room, body) in forged {
        let batch = RoomBatch {
            tenant: tenant.into(),
            room: room.into(),
            origin: from.into(),
            epoch: 1,
            batch_no: 1,
            last_seq: u64::MAX / 4,
            committed: 0,
            prev_delivered: 0,
            frames: vec![frame(body)],
        };
        bus.publish(
            edge_bus::room_subject("acme", "lobby", sender),
            edge_bus::encode(&batch).into(),
        )
        .await
        .expect("publish");
    }
    bus.flush().await.expect("flush");
    let c = relay.edge.cluster().expect("clustered");
    wait_for("the relay to count the forged batches", Duration::from_secs(10), || {
        dropped(&c.snapshot()) >= before + 3
    })
    .await;
    // The room goes on, and nothing forged reached the viewer.
    let ack = host.send("lobby", Kind::Chat, "after").await.expect("acked");
    assert!(ack.seq < u64::MAX / 4);
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        let mut bodies = Vec::new();
        while let Some(Ok(b)) = stream.next_batch().await {
            assert!(b.online < 1_000_000, "a forged online count got through");
            bodies.extend(
                b.messages
                    .into_iter()
                    .map(|m| String::from_utf8_lossy(&m.body).into_owned()),
            );
            if bodies.iter().any(|b| b == "after") {
                break;
            }
        }
        bodies
    })
    .await
    .expect("the origin's next message arrives");
    assert!(!got.iter().any(|b| b.starts_with("forged")), "{got:?}");
}

/// Receives from a group room until `want` messages whose body starts with
/// `prefix` arrived (or 20 s passed): (seq, body) in arrival order.
async fn group_messages(room: &mut throng_client::RoomStream, prefix: &str, want: usize) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while got.len() < want {
            match room.next_batch().await {
                Some(Ok(b)) => got.extend(
                    b.messages
                        .iter()
                        .filter(|m| m.body.starts_with(prefix.as_bytes()))
                        .map(|m| (m.seq, String::from_utf8_lossy(&m.body).into_owned())),
                ),
                _ => break,
            }
        }
    })
    .await;
    got
}

/// A sender on each edge, joined to the group room `room` (members must
/// join to send) and reading it in the background, unchecked.
async fn group_senders(edges: &[TestEdge], room: &str) -> Vec<throng_client::Client> {
    let mut senders = Vec::new();
    for (k, e) in edges.iter().enumerate() {
        let sender = e.client("acme", &format!("sender-{k}"), "host").await;
        let mut stream = sender.join(room).await.expect("a sender joins");
        tokio::spawn(async move { while let Some(Ok(_)) = stream.next_batch().await {} });
        senders.push(sender);
    }
    senders
}

/// Every message exactly once, in order: the bodies sent, in the order of
/// the sequence numbers their acks gave.
fn assert_exactly_once(who: &str, got: &[(u64, String)], sent: &std::collections::BTreeMap<u64, String>) {
    let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(seqs, sorted, "{who}: numbers out of order or repeated");
    let want: Vec<(u64, String)> = sent.iter().map(|(s, b)| (*s, b.clone())).collect();
    assert_eq!(got, want.as_slice(), "{who}: not every message exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_room_across_three_edges_200_members_100_offline_each_resumes_from_another_edge_exactly_once() {
    // JetStream, the members bucket and the log under per-edge permissions.
    let nats = NatsServer::secured(&["a", "b", "c"], &[]);
    let edges = cluster(&nats, &["a", "b", "c"]).await;
    const MEMBERS: usize = 200;
    const ROOM: &str = "group-team";
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        let client = edges[i % 3].client("acme", &format!("member-{i}"), "viewer").await;
        let room = client.join(ROOM).await.expect("a member joins");
        members.push((client, room));
    }
    let senders = group_senders(&edges, ROOM).await;
    let send_round = |round: &'static str, per_edge: usize| {
        let senders = &senders;
        async move {
            let mut sent = std::collections::BTreeMap::new();
            for n in 0..per_edge {
                for (k, s) in senders.iter().enumerate() {
                    let body = format!("{round}-{k}-{n}");
                    let ack = s
                        .send(ROOM, Kind::Chat, body.clone())
                        .await
                        .expect("a group send is acked");
                    sent.insert(ack.seq, body);
                }
            }
            sent
        }
    };

    // Everyone is here for the first round.
    let first = send_round("one", 10).await;
    let mut all = first.clone();
    for (i, (client, room)) in members.iter_mut().enumerate() {
        let got = group_messages(room, "one-", first.len()).await;
        assert_exactly_once(&format!("member {i}, round one"), &got, &first);
        if i < MEMBERS / 2 && i % 2 == 1 {
            // These come back by cursor: say what was seen.
            let last = got.last().map(|(s, _)| *s).expect("got round one");
            client.seen(ROOM, last).await.expect("seen");
        }
    }
    // The cursors are stored (in JetStream) before their members go.
    let stored = || {
        edges
            .iter()
            .map(|e| e.edge.log_stats().cursors.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    wait_for("the cursors to be stored", Duration::from_secs(10), || {
        stored() >= (MEMBERS / 4) as u64
    })
    .await;
    let last_of_first = *first.keys().last().expect("round one");
    let mut offline = Vec::new();
    for (i, (client, _)) in members.drain(..MEMBERS / 2).enumerate() {
        assert!(client.close_and_wait(Duration::from_secs(5)).await, "member {i} closes");
        offline.push(i);
    }

    // The second round while half the members are away.
    let second = send_round("two", 20).await;
    all.extend(second.clone());
    for (j, (_, room)) in members.iter_mut().enumerate() {
        let got = group_messages(room, "two-", second.len()).await;
        assert_exactly_once(&format!("online member {}", j + MEMBERS / 2), &got, &second);
    }

    // Each comes back on another edge than it left: odd ones after their
    // cursor, even ones from the last number they got.
    let mut back = Vec::new();
    for i in offline {
        let edge = &edges[(i + 1) % 3];
        let client = edge.client("acme", &format!("member-{i}"), "viewer").await;
        let resume = (i % 2 == 0).then_some(last_of_first);
        let room = client.join_from(ROOM, resume).await.expect("a member comes back");
        back.push((i, client, room));
    }
    for (i, _, room) in &mut back {
        let got = group_messages(room, "two-", second.len()).await;
        assert_exactly_once(&format!("member {i} back on another edge"), &got, &second);
    }

    // And everyone gets what comes next, once.
    let third = send_round("three", 2).await;
    all.extend(third.clone());
    for (i, _, room) in &mut back {
        let got = group_messages(room, "three-", third.len()).await;
        assert_exactly_once(&format!("member {i}, round three"), &got, &third);
    }
    for (j, (_, room)) in members.iter_mut().enumerate() {
        let got = group_messages(room, "three-", third.len()).await;
        assert_exactly_once(&format!("online member {}, round three", j + MEMBERS / 2), &got, &third);
    }
    // A newcomer on any edge reads the whole log from the start.
    let newcomer = edges[2].client("acme", "newcomer", "viewer").await;
    let mut room = newcomer.join_from(ROOM, Some(0)).await.expect("a newcomer joins");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while got.len() < all.len() {
            match room.next_batch().await {
                Some(Ok(b)) => got.extend(
                    b.messages
                        .iter()
                        .map(|m| (m.seq, String::from_utf8_lossy(&m.body).into_owned())),
                ),
                _ => break,
            }
        }
    })
    .await;
    assert_exactly_once("a newcomer reading from 0", &got, &all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_room_loses_no_acked_message_when_nats_restarts_under_traffic() {
    let mut nats = NatsServer::start();
    let edges = cluster(&nats, &["a", "b", "c"]).await;
    const ROOM: &str = "group-ops";
    let senders = group_senders(&edges, ROOM).await;
    // Each edge's sender sends until told to stop; what was acked is kept.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let refused = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let mut tasks = Vec::new();
    for (k, sender) in senders.into_iter().enumerate() {
        let (stop, acked, refused) = (Arc::clone(&stop), Arc::clone(&acked), Arc::clone(&refused));
        tasks.push(tokio::spawn(async move {
            let mut n = 0u32;
            // Bounded: at most 2,000 sends per sender.
            while !stop.load(Ordering::Relaxed) && n < 2000 {
                let body = format!("ops-{k}-{n}");
                n += 1;
                match tokio::time::timeout(Duration::from_secs(6), sender.send(ROOM, Kind::Chat, body.clone())).await {
                    Ok(Ok(ack)) => {
                        acked.lock().unwrap().insert(ack.seq, body);
                    }
                    _ => {
                        // Not acked is not "not delivered": an answer lost
                        // with NATS leaves the message possibly stored.
                        refused.lock().unwrap().insert(body);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sender
        }));
    }
    let count = || acked.lock().unwrap().len();
    wait_for("traffic before the restart", Duration::from_secs(10), || count() >= 60).await;
    nats.kill();
    let during = count();
    // Acked means stored: while JetStream is away nothing more is acked
    // (each sender has at most one send in flight, which JetStream may
    // have stored just before it went). The senders keep trying.
    let tries = || refused.lock().unwrap().len();
    let tried = tries();
    wait_for("sends tried while NATS is away", Duration::from_secs(20), || {
        tries() > tried
    })
    .await;
    assert!(
        count() <= during + 3,
        "{} sends acked while JetStream was away",
        count() - during
    );
    nats.restart();
    for e in &edges {
        let c = e.edge.cluster().expect("clustered");
        wait_for("the edges to reconnect", Duration::from_secs(20), || {
            c.connected() && c.live().edges.len() == 3
        })
        .await;
    }
    let after = count();
    wait_for("traffic after the restart", Duration::from_secs(20), || {
        count() >= after + 60
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("sender task");
    }
    for e in &edges {
        let stats = e.edge.log_stats();
        wait_for("every acked message stored", Duration::from_secs(20), || {
            stats.queued.load(Ordering::Relaxed) == 0
        })
        .await;
    }
    let acked = acked.lock().unwrap().clone();
    // 60 before the outage and 60 after it; nothing while JetStream is away.
    assert!(acked.len() >= 120, "only {} sends acked", acked.len());
    // A newcomer on every edge reads the whole log: every acked message,
    // exactly once, in order.
    for (i, e) in edges.iter().enumerate() {
        let client = e.client("acme", &format!("reader-{i}"), "viewer").await;
        let mut room = client.join_from(ROOM, Some(0)).await.expect("a reader joins");
        let got = group_messages(&mut room, "ops-", acked.len()).await;
        // Sends refused while NATS was away may or may not be in the log;
        // every acked one is, once, in order.
        let refused = refused.lock().unwrap().clone();
        let got: Vec<(u64, String)> = got
            .into_iter()
            .filter(|(seq, body)| acked.contains_key(seq) || !refused.contains(body))
            .collect();
        assert_exactly_once(&format!("reader on edge {i} after the NATS restart"), &got, &acked);
    }
    let log = edges
        .iter()
        .map(|e| e.edge.log_stats())
        .fold((0, 0, 0), |(n, sum, max), s| {
            (
                n + s.appends.load(Ordering::Relaxed),
                sum + s.total_window_us.load(Ordering::Relaxed),
                max.max(s.max_window_us.load(Ordering::Relaxed)),
            )
        });
    eprintln!(
        "acked {}, refused {} (while NATS was away); JetStream window: mean {} us, max {} us over {} ticks",
        acked.len(),
        refused.lock().unwrap().len(),
        log.1 / log.0.max(1),
        log.2,
        log.0
    );
}

/// Hostile clients on a relay edge: a viewer that never reads a busy room
/// slows no one; a flood of presence queries (each asking every edge) is
/// answered or refused with a typed error, never left hanging, and the
/// room's readers keep getting every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_relay_a_viewer_that_never_reads_and_a_presence_flood_slow_no_one() {
    let nats = NatsServer::start();
    // The single edge's resilience test's settings: a short queue, and
    // evicted after a second behind.
    let edges = cluster_with(&nats, &["a", "b"], |c| {
        c.rooms.viewer_queue_batches = 4;
        c.rooms.max_behind = Duration::from_secs(1);
    })
    .await;
    let key = throng_edge::cluster::rendezvous::room_key("acme", "show");
    let origin = throng_edge::cluster::rendezvous::origin(&key, ["a", "b"]).expect("an origin");
    let (o, r) = if origin == "a" { (0, 1) } else { (1, 0) };

    let lazy = edges[r].client("acme", "lazy", "viewer").await;
    let _never_read = lazy.join("show").await.expect("join");
    let mut readers = Vec::new();
    for v in 0..5 {
        let c = edges[r].client("acme", &format!("reader-{v}"), "viewer").await;
        let room = c.join("show").await.expect("join");
        readers.push((c, room));
    }
    let sender = edges[o].client("acme", "sender", "host").await;
    let mut own = sender.join("show").await.expect("join");
    tokio::spawn(async move { while own.next_batch().await.is_some() {} });
    // The relay's readers get the origin's batches once it heard of them.
    wait_for("the relay's viewers to be counted", Duration::from_secs(10), || {
        edges[o].edge.room_count() > 0 && edges[r].edge.room_count() > 0
    })
    .await;
    let warm = sender.send("show", Kind::Chat, "warm").await.expect("ack");
    for (v, (_, room)) in readers.iter_mut().enumerate() {
        let got = group_messages(room, "warm", 1).await;
        assert_eq!(
            got.len(),
            1,
            "reader {v} never got the origin's batches (warm {})",
            warm.seq
        );
    }

    // The presence flood, from one connection on the relay, all at once.
    let flooder = edges[r].client("acme", "flooder", "viewer").await;
    let names: Vec<String> = (0..2000).map(|i| format!("reader-{i}")).collect();
    let mut queries = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (c, names) = (flooder.clone(), names.clone());
        queries.spawn(async move { tokio::time::timeout(Duration::from_secs(5), c.online(&names)).await });
    }

    let body = vec![b'x'; 4000];
    let mut sent = 0usize;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        let mut acks = Vec::new();
        for _ in 0..16 {
            acks.push(
                sender
                    .submit("show", Kind::Chat, body.clone())
                    .await
                    .expect("submitted"),
            );
            sent += 1;
        }
        for a in acks {
            a.ack().await.expect("ack");
        }
        for (v, (_, room)) in readers.iter_mut().enumerate() {
            let got = group_messages(room, "x", 16).await;
            assert_eq!(got.len(), 16, "reader {v} on the relay fell behind at message {sent}");
        }
    }
    let (mut answered, mut refused) = (0, 0);
    while let Some(q) = queries.join_next().await {
        match q.expect("query task") {
            Ok(Ok(answer)) => {
                assert!(answer[..5].iter().all(|&o| o), "the readers are online");
                answered += 1;
            }
            Ok(Err(e)) => {
                assert!(
                    matches!(
                        e.code(),
                        Some(throng_wire::ErrorCode::RateLimited | throng_wire::ErrorCode::ServerBusy)
                    ),
                    "a flooded query failed with {e}"
                );
                refused += 1;
            }
            Err(_) => panic!("a presence query was left hanging for 5 s"),
        }
    }
    assert!(answered >= 1 && refused >= 1, "answered {answered}, refused {refused}");
    eprintln!("{sent} messages; presence queries answered {answered}, refused {refused}");
    // The relay evicts the viewer that never read, as a lone edge does.
    let why = tokio::time::timeout(Duration::from_secs(10), lazy.closed())
        .await
        .expect("the lazy viewer on the relay is evicted");
    assert_eq!(why.code(), Some(throng_wire::ErrorCode::TooSlow), "{why}");
}

/// Sends `per_edge_rate` a second from each of `clients` for `window`;
/// returns (acked, refused for rate). Every send is answered.
async fn send_from_all(clients: &[throng_client::Client], per_edge_rate: u32, window: Duration) -> (u64, u64) {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let c = c.clone();
        tasks.spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_secs(1) / per_edge_rate);
            let start = Instant::now();
            let mut pending = Vec::new();
            let mut k = 0;
            while start.elapsed() < window {
                pace.tick().await;
                pending.push(
                    c.submit("show", Kind::Chat, format!("{i}-{k}"))
                        .await
                        .expect("submitted"),
                );
                k += 1;
            }
            let (mut acked, mut limited) = (0, 0);
            for p in pending {
                match tokio::time::timeout(Duration::from_secs(10), p.ack())
                    .await
                    .expect("answered")
                {
                    Ok(_) => acked += 1,
                    Err(e) => {
                        assert_eq!(e.code(), Some(throng_wire::ErrorCode::RateLimited), "{e}");
                        limited += 1;
                    }
                }
            }
            (acked, limited)
        });
    }
    let (mut acked, mut limited) = (0, 0);
    while let Some(t) = tasks.join_next().await {
        let (a, l) = t.expect("a sender");
        acked += a;
        limited += l;
    }
    (acked, limited)
}

/// One user on three edges sends into one room: the room's origin counts
/// what every edge forwards in one bucket with its own, so the user's rate
/// holds across the cluster (and nothing under it is refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_send_rate_holds_across_the_edges_it_is_connected_to() {
    const RATE: u32 = 20;
    let nats = NatsServer::start();
    let edges = cluster_with(&nats, &["a", "b", "c"], |c| {
        c.limits.send_rate_per_sec = RATE;
        c.limits.send_burst = RATE;
    })
    .await;
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    for e in &edges {
        let c = e.client("acme", "chatty", "viewer").await;
        let mut s = c.join("show").await.expect("join");
        // A member reads its room, or it is evicted.
        streams.push(tokio::spawn(async move { while s.next_batch().await.is_some() {} }));
        clients.push(c);
    }

    // Over: 40 a second from each edge, six times the rate in all.
    let window = Duration::from_secs(2);
    let start = Instant::now();
    let (acked, limited) = send_from_all(&clients, 2 * RATE, window).await;
    let most = u64::from(RATE) + (start.elapsed().as_secs_f64() * f64::from(RATE)) as u64 + 5;
    eprintln!("over the rate: {acked} acked, {limited} refused (at most {most})");
    assert!(acked <= most, "{acked} acked from three edges; the rate allows {most}");
    assert!(acked >= u64::from(RATE), "only {acked} acked");

    // The bucket refills; then under: 4 a second from each, 12 in all.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, limited) = send_from_all(&clients, RATE / 5, window).await;
    assert_eq!(limited, 0, "{limited} refused under the rate ({acked} acked)");
}

/// Someone on the bus claims a room has 2^62 viewers in each of 2,000
/// made-up regions, from 2,000 made-up edges. None of it is an edge the
/// origin knows to be live, let alone its region's aggregator: the origin
/// counts every claim refused, keeps delivering, and the room's count stays
/// its real one. (On a090a11 every claim was summed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_regional_counts_from_edges_not_live_change_nothing() {
    use throng_edge::cluster::bus;
    let nats = NatsServer::start();
    let edges = cluster(&nats, &["a"]).await;
    let viewer = edges[0].client("acme", "viewer", "viewer").await;
    let mut room = viewer.join("show").await.expect("join");
    let sender = edges[0].client("acme", "sender", "host").await;
    let mut own = sender.join("show").await.expect("join");
    tokio::spawn(async move { while own.next_batch().await.is_some() {} });

    let bus_client = async_nats::connect(nats.url()).await.expect("test client connects");
    for i in 0..2000 {
        let claim = bus::RegionCounts {
            region: format!("r{i}"),
            from: format!("fake{i}"),
            at_ms: 0,
            rooms: vec![bus::RoomCount {
                tenant: "acme".into(),
                room: "show".into(),
                viewers: 1 << 62,
            }],
        };
        bus_client
            .publish(
                bus::regional_subject("a", &format!("fake{i}")),
                bus::encode(&claim).into(),
            )
            .await
            .expect("published");
    }
    bus_client.flush().await.expect("flushed");
    let c = edges[0].edge.cluster().expect("clustered");
    wait_for("the origin to refuse every claim", Duration::from_secs(20), || {
        c.snapshot().bus.refused >= 2000
    })
    .await;
    // The room goes on, and its count is its own two viewers throughout.
    for k in 0..10 {
        sender.send("show", Kind::Chat, format!("m{k}")).await.expect("ack");
        let b = tokio::time::timeout(Duration::from_secs(5), room.next_batch())
            .await
            .expect("a batch in time")
            .expect("open")
            .expect("batch");
        assert!(b.online <= 2, "a made-up count got through: {}", b.online);
    }
}
