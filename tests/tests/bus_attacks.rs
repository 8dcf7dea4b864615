//! The bus under attack, as a holder of NATS credentials would make one:
//! an app user (a tenant's backend sharing the server), one edge's nkey
//! used to speak for another, and, on a server without auth, anyone who can
//! reach it. Each case was observed on a090a11 (see issue 21, section 2):
//! a forged leave dropped a live edge for good, forwards from made-up edges
//! grew an edge by 374 MB, made-up counts filled the edge with rooms and
//! inflated online counts, a forged kick closed a user's sessions.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use throng_edge::cluster::bus::{
    self, Announce, Forward, Forwarded, Interest, KickOrder, RegionCounts, RoomCount, RoomInterest,
};
use throng_tests::nats::NatsServer;
use throng_tests::{TestEdge, cluster, wait_for};
use throng_wire::Kind;

/// A room name of tenant `acme` whose origin is `origin` among `edges`.
fn room_of(edges: &[TestEdge], origin: &str) -> String {
    let live = edges[0].edge.cluster().expect("clustered").live();
    (0..10_000)
        .map(|i| format!("room-{i}"))
        .find(|r| live.origin("acme", r) == Some(origin))
        .expect("some room lands on every edge")
}

fn live_ids(edge: &TestEdge) -> Vec<String> {
    let c = edge.edge.cluster().expect("clustered");
    c.live().ids().map(str::to_owned).collect()
}

fn dropped(edge: &TestEdge) -> u64 {
    let s = edge.edge.cluster().expect("clustered").snapshot();
    s.bus.malformed + s.bus.refused
}

fn leave_of(edge: &TestEdge) -> Announce {
    let c = edge.edge.cluster().expect("clustered");
    Announce {
        edge_id: c.edge_id().to_owned(),
        region: c.region().to_owned(),
        quic: edge.addr(),
        incarnation: c.incarnation(),
        seq: u64::MAX,
        leaving: true,
    }
}

/// `n` chat messages sent at `sender`'s edge to `room`, as seen by a viewer
/// on `viewer`'s edge: the bodies it received that start with `prefix`.
async fn relayed(
    sender: &throng_client::Client,
    viewer: &mut throng_client::RoomStream,
    room: &str,
    prefix: &str,
    n: usize,
) -> Vec<String> {
    let mut got = Vec::new();
    let mut own = sender.join(room).await.expect("the sender joins");
    tokio::spawn(async move { while own.next_batch().await.is_some() {} });
    for i in 0..n {
        sender
            .send(room, Kind::Chat, format!("{prefix}{i}"))
            .await
            .expect("acked");
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while got.iter().filter(|b: &&String| b.starts_with(prefix)).count() < n {
            match viewer.next_batch().await {
                Some(Ok(b)) => got.extend(
                    b.messages
                        .into_iter()
                        .map(|m| String::from_utf8_lossy(&m.body).into_owned()),
                ),
                _ => return,
            }
        }
    })
    .await;
    got
}

/// A NATS client whose server errors (permission violations) are kept.
async fn client_with_errors(
    nats: &NatsServer,
    seed: &std::path::Path,
) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&errors);
    let seed = std::fs::read_to_string(seed).expect("seed");
    let client = async_nats::ConnectOptions::new()
        .nkey(seed.trim().to_owned())
        .event_callback(move |event| {
            let kept = Arc::clone(&kept);
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    kept.lock().expect("errors").push(e.to_string());
                }
            }
        })
        .connect(nats.url())
        .await
        .expect("attacker connects");
    (client, errors)
}

/// An app user (a tenant's backend on the same NATS server) can neither
/// publish nor read anything on the bus: its forged leave, new edge,
/// kick and forward are refused by NATS, and the cluster goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_user_can_neither_publish_nor_read_on_the_bus() {
    let nats = NatsServer::secured(&["a", "b"], &["backend"]);
    let edges = cluster(&nats, &["a", "b"]).await;
    let room = room_of(&edges, "b");
    let user = edges[0].client("acme", "alice", "viewer").await;
    let mut own = user.join("alice-room").await.expect("join");
    let sender = edges[1].client("acme", "host", "host").await;
    let viewer = edges[0].client("acme", "viewer", "viewer").await;
    let mut stream = viewer.join(&room).await.expect("join");

    let (app, errors) = client_with_errors(&nats, &nats.seed_file("backend").expect("seed")).await;
    let mut peek = app.subscribe("throng.>").await.expect("a subscribe is sent");
    let mut forged_new = leave_of(&edges[1]);
    forged_new.edge_id = "zzz".into();
    forged_new.leaving = false;
    let attempts: Vec<(String, Vec<u8>)> = vec![
        (bus::edges_subject("b"), bus::encode(&leave_of(&edges[1]))),
        (bus::edges_subject("zzz"), bus::encode(&forged_new)),
        (
            bus::kick_subject("b"),
            bus::encode(&KickOrder {
                from: "b".into(),
                tenant: "acme".into(),
                user: "alice".into(),
                reason: "forged".into(),
            }),
        ),
        (
            bus::ingress_subject("b", "a"),
            bus::encode(&forward("a", &room, "forged-forward")),
        ),
    ];
    for (subject, bytes) in attempts {
        app.publish(subject, bytes.into()).await.expect("a publish is sent");
    }
    app.flush().await.expect("flushed");
    wait_for(
        "NATS to refuse the subscribe and every publish",
        Duration::from_secs(10),
        || {
            errors
                .lock()
                .expect("errors")
                .iter()
                .filter(|e| e.contains("ermissions"))
                .count()
                >= 5
        },
    )
    .await;

    assert_eq!(live_ids(&edges[0]), ["a", "b"]);
    let got = relayed(&sender, &mut stream, &room, "real-", 5).await;
    assert_eq!(got.iter().filter(|b| b.starts_with("real-")).count(), 5, "{got:?}");
    assert!(!got.iter().any(|b| b.starts_with("forged")), "{got:?}");
    // Alice was not kicked, and the app heard nothing of the bus.
    user.send("alice-room", Kind::Chat, "still here")
        .await
        .expect("alice is connected");
    let _ = &mut own;
    assert!(
        tokio::time::timeout(Duration::from_millis(10), futures::StreamExt::next(&mut peek))
            .await
            .map_or(true, |m| m.is_none()),
        "the app user read the bus"
    );
    assert!(!live_ids(&edges[1]).contains(&"zzz".to_owned()));
}

fn forward(from: &str, room: &str, body: &str) -> Forward {
    Forward {
        from: from.into(),
        items: vec![Forwarded {
            tenant: "acme".into(),
            room: room.into(),
            fwd_id: 1,
            hops: 1,
            sender: "ceo".into(),
            kind: Kind::Host,
            body: body.as_bytes().to_vec(),
            received_ms: 0,
        }],
    }
}

/// One edge's nkey in the wrong hands (`mallory` is a configured edge that
/// runs nowhere) speaks for no other edge: what it publishes in another's
/// name NATS refuses, and what it says in its own name about another (a
/// leave, a batch, a forward, a kick) the edges refuse, as they take
/// nothing from an edge that is not live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_edges_credentials_speak_for_no_other_edge() {
    let nats = NatsServer::secured(&["a", "b", "mallory"], &[]);
    let edges = cluster(&nats, &["a", "b"]).await;
    let room = room_of(&edges, "b");
    let user = edges[0].client("acme", "alice", "viewer").await;
    let _own = user.join("alice-room").await.expect("join");
    let sender = edges[1].client("acme", "host", "host").await;
    let viewer = edges[0].client("acme", "viewer", "viewer").await;
    let mut stream = viewer.join(&room).await.expect("join");
    let before = dropped(&edges[0]) + dropped(&edges[1]);

    let (mallory, errors) = client_with_errors(&nats, &nats.seed_file("mallory").expect("seed")).await;
    let batch = |origin: &str| bus::RoomBatch {
        tenant: "acme".into(),
        room: room.clone(),
        origin: origin.into(),
        epoch: 1,
        batch_no: 1,
        last_seq: u64::MAX / 4,
        committed: 0,
        prev_delivered: 0,
        frames: Vec::new(),
    };
    let kick = KickOrder {
        from: "mallory".into(),
        tenant: "acme".into(),
        user: "alice".into(),
        reason: "forged".into(),
    };
    // In another edge's name: NATS refuses these four.
    let denied: Vec<(String, Vec<u8>)> = vec![
        (bus::edges_subject("b"), bus::encode(&leave_of(&edges[1]))),
        (bus::room_subject("acme", &room, "b"), bus::encode(&batch("b"))),
        (
            bus::ingress_subject("b", "a"),
            bus::encode(&forward("a", &room, "forged-forward")),
        ),
        (bus::kick_subject("a"), bus::encode(&kick)),
    ];
    // In its own name, about others: the edges refuse these five.
    let refused: Vec<(String, Vec<u8>)> = vec![
        (bus::edges_subject("mallory"), bus::encode(&leave_of(&edges[1]))),
        (bus::room_subject("acme", &room, "mallory"), bus::encode(&batch("b"))),
        (
            bus::ingress_subject("b", "mallory"),
            bus::encode(&forward("mallory", &room, "forged-forward")),
        ),
        (bus::kick_subject("mallory"), bus::encode(&kick)),
        (
            bus::interest_subject("b", "mallory"),
            bus::encode(&Interest {
                from: "mallory".into(),
                rooms: vec![RoomInterest {
                    tenant: "acme".into(),
                    room: room.clone(),
                    viewers: 2_000_000_000_001,
                    numbered_to: 0,
                }],
            }),
        ),
    ];
    for (subject, bytes) in denied.into_iter().chain(refused) {
        mallory.publish(subject, bytes.into()).await.expect("a publish is sent");
    }
    mallory.flush().await.expect("flushed");
    wait_for(
        "NATS to refuse what names another edge",
        Duration::from_secs(10),
        || {
            errors
                .lock()
                .expect("errors")
                .iter()
                .filter(|e| e.contains("ermissions"))
                .count()
                >= 4
        },
    )
    .await;
    wait_for("the edges to refuse the rest", Duration::from_secs(10), || {
        dropped(&edges[0]) + dropped(&edges[1]) >= before + 5
    })
    .await;

    assert_eq!(live_ids(&edges[0]), ["a", "b"]);
    let got = relayed(&sender, &mut stream, &room, "real-", 5).await;
    assert_eq!(got.iter().filter(|b| b.starts_with("real-")).count(), 5, "{got:?}");
    assert!(!got.iter().any(|b| b.starts_with("forged")), "{got:?}");
    user.send("alice-room", Kind::Chat, "still here")
        .await
        .expect("alice is connected");
}

/// Without auth anyone can say "b is leaving" on b's subject. Edge a takes
/// it, and takes b back once b goes on announcing for `dead_after`: a
/// forged leave costs b's rooms at most that (on a090a11, b stayed gone
/// for good while it ran, and relay viewers got nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_leave_costs_a_live_edge_at_most_dead_after() {
    let nats = NatsServer::start();
    let edges = cluster(&nats, &["a", "b"]).await;
    let room = room_of(&edges, "b");
    let sender = edges[1].client("acme", "host", "host").await;
    let viewer = edges[0].client("acme", "viewer", "viewer").await;
    let mut stream = viewer.join(&room).await.expect("join");

    let anyone = nats.connect_as(None).await;
    anyone
        .publish(bus::edges_subject("b"), bus::encode(&leave_of(&edges[1])).into())
        .await
        .expect("published");
    anyone.flush().await.expect("flushed");
    wait_for("a to take the leave", Duration::from_secs(10), || {
        live_ids(&edges[0]) == ["a"]
    })
    .await;
    let gone = Instant::now();
    // dead_after is 600 ms here; a heartbeat is 100 ms.
    wait_for("a to take b back", Duration::from_secs(10), || {
        live_ids(&edges[0]) == ["a", "b"]
    })
    .await;
    assert!(
        gone.elapsed() < Duration::from_secs(5),
        "b came back after {:?}",
        gone.elapsed()
    );
    let got = relayed(&sender, &mut stream, &room, "after-", 5).await;
    assert_eq!(got.iter().filter(|b| b.starts_with("after-")).count(), 5, "{got:?}");
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Without auth, 200,000 forwards from 200,000 made-up edges: an edge keeps
/// nothing for an edge that is not live (on a090a11 each got a reply task
/// and queue, 51 -> 425 MB, never released), and answers its real users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_from_made_up_edges_are_refused_and_cost_no_memory() {
    const FORGED: u64 = 200_000;
    let nats = NatsServer::start();
    let edges = cluster(&nats, &["a"]).await;
    let anyone = nats.connect_as(None).await;
    let before = dropped(&edges[0]);
    let rss_before = rss_bytes();
    for i in 0..FORGED {
        let from = format!("made-up-{i}");
        let bytes = bus::encode(&forward(&from, "lobby", "forged"));
        anyone
            .publish(bus::ingress_subject("a", &from), bytes.into())
            .await
            .expect("published");
    }
    anyone.flush().await.expect("flushed");
    // The edge may drop some as a slow consumer; all it read it refused.
    let c = edges[0].edge.cluster().expect("clustered");
    wait_for("the edge to read the forwards", Duration::from_secs(60), || {
        c.stats().of(throng_edge::cluster::BusKind::Forward).1 >= FORGED * 9 / 10
    })
    .await;
    let read = c.stats().of(throng_edge::cluster::BusKind::Forward).1;
    wait_for("the edge to refuse all it read", Duration::from_secs(30), || {
        dropped(&edges[0]) >= before + read
    })
    .await;
    let grown = rss_bytes().saturating_sub(rss_before);
    eprintln!(
        "{FORGED} forged forwards: {read} read, {} refused or malformed, RSS +{} MB",
        dropped(&edges[0]) - before,
        grown >> 20
    );
    assert!(grown < 96 << 20, "the process grew by {} MB", grown >> 20);
    let user = edges[0].client("acme", "alice", "host").await;
    let _room = user.join("lobby").await.expect("join");
    user.send("lobby", Kind::Chat, "hello").await.expect("acked");
}

/// Without auth a forger can put a live edge's id on its subjects. What it
/// says then still makes nothing beyond what is possible: rooms of
/// tenants the edge does not know, rooms it is not the origin of, counts
/// no edge could have (on a090a11: 9,490 rooms made and a real user's
/// refused, and an online count of 2,000,000,000,001).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_for_unknown_tenants_or_beyond_the_possible_make_nothing() {
    let nats = NatsServer::start();
    let edges = cluster(&nats, &["a", "b"]).await;
    let live = edges[0].edge.cluster().expect("clustered").live();
    let aggregator = live.aggregator("default").expect("an aggregator").to_owned();
    let (target, spoofed) = if aggregator == "a" { (1, "a") } else { (0, "b") };
    let target_id = if target == 0 { "a" } else { "b" };
    let room = room_of(&edges, target_id);
    let rooms_before = edges[target].edge.room_count();
    let before = dropped(&edges[target]);

    let anyone = nats.connect_as(None).await;
    for tenant in ["t1", "t2", "t3"] {
        let rooms: Vec<RoomCount> = (0..5000)
            .map(|i| RoomCount {
                tenant: tenant.into(),
                room: format!("r{i}"),
                viewers: 1,
            })
            .collect();
        let regional = RegionCounts {
            region: "default".into(),
            from: spoofed.into(),
            at_ms: 0,
            rooms: rooms.clone(),
        };
        anyone
            .publish(bus::regional_subject(target_id, spoofed), bus::encode(&regional).into())
            .await
            .expect("published");
        let interest = Interest {
            from: spoofed.into(),
            rooms: rooms
                .into_iter()
                .map(|r| RoomInterest {
                    tenant: r.tenant,
                    room: r.room,
                    viewers: r.viewers,
                    numbered_to: 0,
                })
                .collect(),
        };
        anyone
            .publish(bus::interest_subject(target_id, spoofed), bus::encode(&interest).into())
            .await
            .expect("published");
    }
    let inflated = Interest {
        from: spoofed.into(),
        rooms: vec![RoomInterest {
            tenant: "acme".into(),
            room: room.clone(),
            viewers: 2_000_000_000_001,
            numbered_to: 0,
        }],
    };
    anyone
        .publish(bus::interest_subject(target_id, spoofed), bus::encode(&inflated).into())
        .await
        .expect("published");
    anyone.flush().await.expect("flushed");
    const INFLATED: u64 = 1;
    // One refusal per message for the regionals (all of one), one per room
    // for the interests, one for the inflated count.
    wait_for("the edge to refuse every claim", Duration::from_secs(20), || {
        dropped(&edges[target]) >= before + 3 + 3 * 5000 + INFLATED
    })
    .await;
    assert_eq!(edges[target].edge.room_count(), rooms_before, "bus input made rooms");

    // A real user's new room is made, and its count is its own.
    let host = edges[target].client("acme", "host", "host").await;
    let mut stream = host.join(&room).await.expect("a real room is made");
    host.send(&room, Kind::Chat, "hello").await.expect("acked");
    let b = tokio::time::timeout(Duration::from_secs(5), stream.next_batch())
        .await
        .expect("a batch")
        .expect("open")
        .expect("batch");
    assert!(b.online < 1_000, "online {}", b.online);
}

/// A livecast room's origin numbers above what another edge numbered the
/// room itself (it took the room for its own in a partition only it saw,
/// and its viewers saw those numbers), so those viewers do not take the
/// origin's next messages for repeats; a claim beyond any edge's clock is
/// refused and moves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_numbers_above_a_relays_own_numbers_but_not_beyond_any_clock() {
    let nats = NatsServer::start();
    let edges = cluster(&nats, &["a", "b"]).await;
    let room = room_of(&edges, "a");
    let host = edges[0].client("acme", "host", "host").await;
    let mut own = host.join(&room).await.expect("the host joins");
    tokio::spawn(async move { while own.next_batch().await.is_some() {} });
    let first = host.send(&room, Kind::Chat, "first").await.expect("acked").seq;

    let speaks_as_b = nats.connect_as(None).await;
    let tell = |numbered_to: u64| {
        bus::encode(&Interest {
            from: "b".into(),
            rooms: vec![RoomInterest {
                tenant: "acme".into(),
                room: room.clone(),
                viewers: 1,
                numbered_to,
            }],
        })
    };
    // An hour past now: no edge's clock gives that.
    let hour = 3600u64 << 22;
    let refused_before = dropped(&edges[0]);
    speaks_as_b
        .publish(
            bus::interest_subject("a", "b"),
            tell(throng_edge::room::time_base() + hour).into(),
        )
        .await
        .expect("published");
    speaks_as_b.flush().await.expect("flushed");
    wait_for("the origin to refuse the claim", Duration::from_secs(10), || {
        dropped(&edges[0]) > refused_before
    })
    .await;
    let second = host.send(&room, Kind::Chat, "second").await.expect("acked").seq;
    assert!(
        second > first && second < throng_edge::room::time_base() + hour,
        "a refused claim moved the numbering: {first} then {second}"
    );

    // What b numbered the room up to while it took it for its own: a
    // little ahead of the origin's clock, as a peer's may be.
    let numbered_to = throng_edge::room::time_base() + (5 << 22);
    speaks_as_b
        .publish(bus::interest_subject("a", "b"), tell(numbered_to).into())
        .await
        .expect("published");
    speaks_as_b.flush().await.expect("flushed");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = second;
    while last <= numbered_to {
        assert!(
            Instant::now() < deadline,
            "the origin numbers on below b's numbers: {last} <= {numbered_to}"
        );
        last = host.send(&room, Kind::Chat, "after").await.expect("acked").seq;
    }
    // Then densely on: nothing else moved.
    let next = host.send(&room, Kind::Chat, "dense").await.expect("acked").seq;
    assert_eq!(next, last + 1);
}
