//! Edges in one process that share nothing but a real nats-server: rooms
//! that span them, one origin per room.

use std::collections::BTreeSet;
use std::time::Duration;

use throng_edge::config::ClusterConfig;
use throng_tests::nats::NatsServer;
use throng_tests::{TestEdge, wait_for};
use throng_wire::Kind;

async fn cluster(nats: &NatsServer, ids: &[&str]) -> Vec<TestEdge> {
    let mut edges = Vec::new();
    for id in ids {
        let url = nats.url();
        let id = (*id).to_owned();
        edges.push(
            TestEdge::start(move |c| {
                let mut cluster = ClusterConfig::with_nats(vec![url]);
                cluster.edge_id = Some(id);
                cluster.heartbeat = Duration::from_millis(100);
                cluster.dead_after = Duration::from_millis(600);
                c.cluster = Some(cluster);
                c.rooms.presence_interval = Duration::from_millis(100);
                // Several edges in one process: each sizes its Wasm pool to
                // the whole of vm.max_map_count, as if it were alone.
                c.wasm.max_instances = 256;
            })
            .await,
        );
    }
    for e in &edges {
        let c = e.edge.cluster().expect("clustered");
        wait_for("every edge to see the others", Duration::from_secs(10), || {
            c.live().edges.len() == ids.len()
        })
        .await;
    }
    edges
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_edges_one_room_every_viewer_sees_the_same_messages_with_the_same_numbers() {
    let nats = NatsServer::start();
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
