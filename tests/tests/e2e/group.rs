//! Group rooms under pressure, over real QUIC: an exact member cap under
//! concurrent joins, cursors that neither jump past the room's end nor move
//! back, new members that read only what came after they joined, retention
//! (by count and by age, with compaction) that tells a returning member what
//! it lost, and a room whose log cannot be read that refuses joins rather
//! than numbering from 1.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redb::ReadableTable;
use throng_edge::config::GroupHistory;
use throng_edge::{Config, Edge};
use throng_tests::{TEST_CONFIG, TestEdge, collect, log_text};
use throng_wire::{ErrorCode, Kind, Message};

fn bodies(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

fn names(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

/// Polls `done` every 10 ms until it holds or 10 s pass.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_cap_of_concurrent_new_members_gets_in() {
    const CAP: u64 = 10;
    const JOINERS: usize = 40;
    let edge = TestEdge::start(|c| {
        c.rooms.group_rooms = vec!["group-*".into()];
        c.rooms.group_max_members = CAP;
    })
    .await;
    // Connect first, then join all at once: the joins race for the cap.
    let mut clients = Vec::new();
    for i in 0..JOINERS {
        clients.push(edge.client("acme", &format!("joiner{i}"), "viewer").await);
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(JOINERS));
    let mut joins = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let (c, start) = (c.clone(), std::sync::Arc::clone(&start));
        joins.push(tokio::spawn(async move {
            start.wait().await;
            (i, c.join("group-cap").await)
        }));
    }
    let (mut admitted, mut full, mut rooms) = (Vec::new(), 0, Vec::new());
    for j in joins {
        match j.await.expect("join task") {
            (i, Ok(room)) => {
                admitted.push(i);
                rooms.push(room);
            }
            (_, Err(e)) if e.code() == Some(ErrorCode::RoomFull) => full += 1,
            (_, Err(e)) => panic!("unexpected refusal: {e}"),
        }
    }
    assert_eq!((admitted.len() as u64, full), (CAP, JOINERS as u64 - CAP));

    // A member comes back on another connection: still a member. A
    // newcomer is still refused.
    let again = edge.client("acme", &format!("joiner{}", admitted[0]), "viewer").await;
    again.join("group-cap").await.expect("a member rejoins a full room");
    let late = edge.client("acme", "late", "viewer").await;
    let refused = late.join("group-cap").await.expect_err("full");
    assert_eq!(refused.code(), Some(ErrorCode::RoomFull), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seen_beyond_the_end_is_refused_and_a_cursor_never_moves_back() {
    let _logs = throng_tests::captured_logs();
    let edge = TestEdge::start(|c| {
        c.rooms.group_rooms = vec!["group-*".into()];
        c.rooms.recent_messages = 0;
    })
    .await;
    let lead = edge.client("acme", "lead", "viewer").await;
    let _lead_room = lead.join("group-seen").await.expect("join");
    let ann = edge.client("acme", "ann", "viewer").await;
    let mut room = ann.join("group-seen").await.expect("join");
    for i in 0..6 {
        lead.send("group-seen", Kind::Chat, format!("m{i}")).await.expect("ack");
    }
    let (got, _) = collect(&mut room, 6, Duration::from_secs(5)).await;
    assert_eq!(bodies(&got), names(0..6));

    ann.seen("group-seen", got[3].seq).await.expect("seen");
    // Backwards: ignored. Beyond the end: refused, and the cursor stays.
    ann.seen("group-seen", got[1].seq).await.expect("seen");
    ann.seen("group-seen", u64::MAX).await.expect("seen");
    ann.seen("group-seen", got[5].seq + 1).await.expect("seen");
    ann.ping().await.expect("the edge read every Seen");
    let refusals = log_text()
        .lines()
        .filter(|l| l.contains("SeqOutOfRange (29)") && l.contains("group-seen"))
        .count();
    assert_eq!(refusals, 2, "{}", log_text());
    ann.close();
    drop(room);

    // Back without a sequence of its own: after the cursor, m3.
    for i in 6..8 {
        lead.send("group-seen", Kind::Chat, format!("m{i}")).await.expect("ack");
    }
    let ann = edge.client("acme", "ann", "viewer").await;
    let mut room = ann.join("group-seen").await.expect("rejoin");
    let (got, _) = collect(&mut room, 4, Duration::from_secs(5)).await;
    assert_eq!(bodies(&got), names(4..8));

    // A new member asking to start past the end starts at the end.
    let eve = edge.client("acme", "eve", "viewer").await;
    drop(eve.join_from("group-seen", Some(u64::MAX)).await.expect("join"));
    eve.close();
    lead.send("group-seen", Kind::Chat, "m8").await.expect("ack");
    let eve = edge.client("acme", "eve", "viewer").await;
    let mut room = eve.join("group-seen").await.expect("rejoin");
    let (got, _) = collect(&mut room, 1, Duration::from_secs(5)).await;
    assert_eq!(bodies(&got), ["m8"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_reads_only_what_came_after_it_joined_unless_the_room_allows_all() {
    for history in [GroupHistory::SinceJoin, GroupHistory::All] {
        let edge = TestEdge::start(|c| {
            c.rooms.group_rooms = vec!["group-*".into()];
            c.rooms.recent_messages = 0;
            c.rooms.group_history = history;
        })
        .await;
        let lead = edge.client("acme", "lead", "viewer").await;
        let _lead_room = lead.join("group-past").await.expect("join");
        for i in 0..5 {
            lead.send("group-past", Kind::Chat, format!("m{i}")).await.expect("ack");
        }
        // Every message is committed before the newcomer asks for all.
        until("the log commits", || {
            edge.edge.log_stats().messages.load(Ordering::Relaxed) >= 5
        })
        .await;
        let newcomer = edge.client("acme", "newcomer", "viewer").await;
        let mut room = newcomer
            .join_from("group-past", Some(0))
            .await
            .expect("join from the start");
        lead.send("group-past", Kind::Chat, "m5").await.expect("ack");
        let want = match history {
            GroupHistory::SinceJoin => names(5..6),
            GroupHistory::All => names(0..6),
        };
        let (got, _) = collect(&mut room, want.len(), Duration::from_secs(5)).await;
        assert_eq!(bodies(&got), want, "{history:?}");
        // Nothing else comes: a ping round trip and one more live message.
        lead.send("group-past", Kind::Chat, "m6").await.expect("ack");
        let (next, _) = collect(&mut room, 1, Duration::from_secs(5)).await;
        assert_eq!(bodies(&next), ["m6"], "{history:?}");
        newcomer.close();
        lead.close();
        edge.edge.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_and_tells_a_returning_member_what_it_lost() {
    let edge = TestEdge::start(|c| {
        c.rooms.group_rooms = vec!["group-*".into()];
        c.rooms.recent_messages = 0;
        c.rooms.group_retention.max_messages = Some(10);
        c.storage.compact_interval = Duration::ZERO;
    })
    .await;
    let bob = edge.client("acme", "bob", "viewer").await;
    drop(bob.join("group-keep").await.expect("bob becomes a member"));
    bob.close();
    let lead = edge.client("acme", "lead", "viewer").await;
    let _lead_room = lead.join("group-keep").await.expect("join");
    // One message per tick (each send waits for its ack): 50 ticks.
    for i in 0..50 {
        lead.send("group-keep", Kind::Chat, format!("m{i}")).await.expect("ack");
    }
    // Seqs 1..=50; the newest 10 stay, so ticks 1..=40 go.
    let stats = edge.edge.log_stats();
    until("retention removes 40 ticks", || {
        stats.pruned_ticks.load(Ordering::Relaxed) == 40
    })
    .await;
    until("a compaction", || stats.compactions.load(Ordering::Relaxed) >= 1).await;

    let bob = edge.client("acme", "bob", "viewer").await;
    let mut room = bob.join("group-keep").await.expect("bob comes back");
    let (got, batches) = collect(&mut room, 10, Duration::from_secs(5)).await;
    assert_eq!(bodies(&got), names(40..50));
    assert_eq!(batches[0].missed, 40, "the first catch-up batch says what was lost");
    assert!(batches[1..].iter().all(|b| b.missed == 0));
    // Exactly 40 ticks went: no later pass removed more.
    assert_eq!(stats.pruned_ticks.load(Ordering::Relaxed), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_age_out_and_numbering_continues_after_a_restart() {
    let edge = TestEdge::start(|c| {
        c.rooms.group_rooms = vec!["group-*".into()];
        c.rooms.recent_messages = 0;
        c.rooms.group_retention.max_age = Some(Duration::from_secs(1));
    })
    .await;
    let lead = edge.client("acme", "lead", "viewer").await;
    let _room = lead.join("group-age").await.expect("join");
    // A new log numbers from the time base (above anything an earlier log
    // of the room handed out); the figures count from its first number.
    let mut first = 0;
    for i in 0..5 {
        let ack = lead.send("group-age", Kind::Chat, format!("m{i}")).await.expect("ack");
        if i == 0 {
            first = ack.seq;
        }
    }
    let stats = std::sync::Arc::clone(edge.edge.log_stats());
    until("every tick ages out", || {
        stats.pruned_ticks.load(Ordering::Relaxed) == 5
    })
    .await;
    lead.close();

    // The room's every tick is gone; its numbering is not.
    let edge = edge.restart().await;
    let lead = edge.client("acme", "lead", "viewer").await;
    let mut room = lead.join("group-age").await.expect("join");
    let ack = lead.send("group-age", Kind::Chat, "m5").await.expect("ack");
    assert_eq!(ack.seq, first + 5, "numbering goes on after the aged-out ticks");
    let (got, batches) = collect(&mut room, 1, Duration::from_secs(5)).await;
    assert_eq!(bodies(&got), ["m5"]);
    let _ = batches;
}

/// Opens the log once the stopped edge's writer has let go of it.
async fn open_log(path: &std::path::Path) -> redb::Database {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match redb::Database::open(path) {
            Ok(db) => return db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("open the log: {e}"),
        }
    }
}

const TICKS: redb::TableDefinition<(&str, &str, u64), &[u8]> = redb::TableDefinition::new("ticks");

/// A tick entry that does not decode makes reading the room's last
/// sequence fail, for real, on every start of the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_log_end_cannot_be_read_refuses_joins_and_never_renumbers() {
    let _logs = throng_tests::captured_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::parse(TEST_CONFIG, "TEST_CONFIG", dir.path()).expect("config");
    config.data_dir = dir.path().to_owned();
    config.rooms.group_rooms = vec!["group-*".into()];
    config.rooms.recent_messages = 0;
    let restart = |config: Config| async move {
        let start = Instant::now();
        loop {
            match Edge::start(config.clone()).await {
                Ok(edge) => return edge,
                Err(e) if start.elapsed() < Duration::from_secs(5) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("edge starts: {e}"),
            }
        }
    };
    let acme = config.tenants.get("acme").expect("acme").clone();
    let client = |edge: &Edge, user: &str| {
        let t = &acme;
        let claims = throng_edge::auth::Claims {
            tenant: "acme".into(),
            sub: user.into(),
            role: "viewer".into(),
            rooms: "*".into(),
            exp: throng_edge::auth::unix_now() + 3600,
            nbf: None,
        };
        let token = throng_edge::auth::sign(&claims, t, None).expect("sign");
        let roots = throng_client::tls::load_certs(edge.cert_path()).expect("cert");
        throng_client::Client::connect(throng_client::ConnectOptions::new(
            edge.local_addr().to_string(),
            roots,
            token,
        ))
    };

    let edge = restart(config.clone()).await;
    config.listen = edge.local_addr();
    let lead = client(&edge, "lead").await.expect("connect");
    let _room = lead.join("group-broken").await.expect("join");
    let mut first = 0;
    for i in 0..3 {
        let ack = lead
            .send("group-broken", Kind::Chat, format!("m{i}"))
            .await
            .expect("ack");
        if i == 0 {
            first = ack.seq;
        }
    }
    lead.close();
    edge.shutdown().await;

    // A corrupt entry after the room's real ones.
    let path = config.group_log_path();
    {
        let db = open_log(&path).await;
        let w = db.begin_write().expect("write");
        w.open_table(TICKS)
            .expect("ticks")
            .insert(("acme", "group-broken", u64::MAX - 1), &[0xff, 0xff, 0xff][..])
            .expect("insert");
        w.commit().expect("commit");
    }

    let edge = restart(config.clone()).await;
    let lead = client(&edge, "lead").await.expect("connect");
    for attempt in 1..=2 {
        let refused = lead.join("group-broken").await.expect_err("refused");
        assert_eq!(
            refused.code(),
            Some(ErrorCode::ServerBusy),
            "attempt {attempt}: {refused}"
        );
    }
    // Each join made a fresh room that read the log again.
    let reads = log_text()
        .lines()
        .filter(|l| l.contains("cannot read where the group log ends") && l.contains("group-broken"))
        .count();
    assert_eq!(reads, 2, "{}", log_text());
    // Other rooms are untouched.
    let _other = lead.join("group-fine").await.expect("another group room");
    assert!(lead.send("group-fine", Kind::Chat, "x").await.expect("ack").seq > 0);
    lead.close();
    edge.shutdown().await;

    // Nothing was overwritten; with the bad entry gone, numbering goes on.
    {
        let db = open_log(&path).await;
        let w = db.begin_write().expect("write");
        {
            let mut t = w.open_table(TICKS).expect("ticks");
            assert!(t.get(("acme", "group-broken", first)).expect("get").is_some());
            t.remove(("acme", "group-broken", u64::MAX - 1)).expect("remove");
        }
        w.commit().expect("commit");
    }
    let edge = restart(config.clone()).await;
    let lead = client(&edge, "lead").await.expect("connect");
    let mut room = lead.join("group-broken").await.expect("join after repair");
    assert_eq!(
        lead.send("group-broken", Kind::Chat, "m3").await.expect("ack").seq,
        first + 3
    );
    // The lead never said what it saw: it gets the room from its join on,
    // the log's messages intact.
    let (got, _) = collect(&mut room, 4, Duration::from_secs(5)).await;
    assert_eq!(bodies(&got), names(0..4));
    lead.close();
    edge.shutdown().await;
}

/// What retention buys on disk: the same appends (10 rooms, 2,000 messages
/// of 200 bytes each) to a log that keeps everything and to one that keeps
/// each room's newest 100 and compacts. Prints both file sizes.
#[test]
fn retention_and_compaction_bound_the_file() {
    use std::sync::Arc;
    use throng_edge::log::{Commit, GroupLog, Retention};

    const ROOMS: usize = 10;
    const TICKS_PER_ROOM: u64 = 100;
    const PER_TICK: u64 = 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let fill = |name: &str, retention: Retention| -> (GroupLog, std::path::PathBuf) {
        let path = dir.path().join(name);
        let log = GroupLog::open_with(&path, Duration::from_millis(5), u64::MAX, retention).expect("open");
        let tenant: Arc<str> = Arc::from("bench");
        let committed: Vec<Arc<Commit>> = (0..ROOMS).map(|_| Commit::new(0, 0)).collect();
        for t in 0..TICKS_PER_ROOM {
            for (r, c) in committed.iter().enumerate() {
                let room: Arc<str> = Arc::from(format!("group-{r}").as_str());
                let messages = (1..=PER_TICK)
                    .map(|i| Message {
                        seq: t * PER_TICK + i,
                        sender: "u".into(),
                        kind: Kind::Chat,
                        body: vec![b'x'; 200],
                    })
                    .collect();
                log.append(&tenant, &room, messages, (t + 1) * PER_TICK, c);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while committed.iter().any(|c| c.stored() < TICKS_PER_ROOM * PER_TICK) {
            assert!(Instant::now() < deadline, "every append commits");
            std::thread::sleep(Duration::from_millis(5));
        }
        (log, path)
    };
    let size = |p: &std::path::Path| std::fs::metadata(p).expect("log file").len();

    let (_all, all_path) = fill("all.redb", Retention::default());
    let everything = size(&all_path);
    let (kept, kept_path) = fill(
        "kept.redb",
        Retention {
            max_messages: Some(100),
            compact_interval: Duration::ZERO,
            ..Retention::default()
        },
    );
    // Each room keeps its last 5 ticks (seq 1901..=2000): 95 of 100 go.
    let stats = kept.stats();
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.pruned_ticks.load(Ordering::Relaxed) < 95 * ROOMS as u64 || size(&kept_path) * 4 > everything {
        assert!(
            Instant::now() < deadline,
            "retention and compaction shrink the file: {} bytes kept of {everything}, {} ticks removed",
            size(&kept_path),
            stats.pruned_ticks.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(stats.pruned_ticks.load(Ordering::Relaxed), 95 * ROOMS as u64);
    assert_eq!(kept.last_seq("bench", "group-3").expect("read"), 2000);
    assert_eq!(kept.pruned_through("bench", "group-3").expect("read"), 1900);
    let left = kept.read("bench", "group-3", 1, 2000, 1000).expect("read");
    assert_eq!(left.first().map(|m| m.seq), Some(1901));
    assert_eq!(left.len(), 100);
    println!(
        "group log file: {everything} bytes keeping all {} messages, {} bytes keeping {} (max_messages = 100, compacted {} times)",
        ROOMS as u64 * TICKS_PER_ROOM * PER_TICK,
        size(&kept_path),
        ROOMS * 100,
        stats.compactions.load(Ordering::Relaxed)
    );
}

/// On a090a11 group-room disk had no per-tenant bound: one tenant's
/// members could fill the edge's disk. Now past
/// `rooms.group_retention.max_tenant_bytes` the tenant's group rooms refuse
/// new messages with `StorageFull` (counted again after a restart), every
/// message acked before stays readable, and other tenants send on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_group_messages_cannot_fill_the_edges_disk() {
    const CAP: u64 = 20_000;
    let edge = TestEdge::start(|c| {
        c.rooms.group_rooms = vec!["group-*".into()];
        c.rooms.recent_messages = 0;
        c.rooms.group_history = GroupHistory::All;
        c.rooms.group_retention.max_tenant_bytes = CAP;
    })
    .await;
    let lead = edge.client("acme", "lead", "viewer").await;
    let _room = lead.join("group-fill").await.expect("join");
    let body = "x".repeat(1000);
    let mut acked = Vec::new();
    let mut refusal = None;
    for i in 0..100 {
        match lead.send("group-fill", Kind::Chat, format!("m{i} {body}")).await {
            Ok(_) => acked.push(format!("m{i}")),
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let refusal = refusal.expect("100 KB of group messages were never refused");
    assert_eq!(refusal.code(), Some(ErrorCode::StorageFull), "{refusal}");
    let stored = edge.edge.group_log_tenant_bytes("acme").expect("an embedded log");
    // Nothing over the bound but the one message that reached it, and
    // nothing refused well under it.
    assert!((CAP..CAP + 1_100).contains(&stored), "acme stores {stored} bytes");
    assert!(acked.len() >= 15, "refused after {} messages", acked.len());

    // Every acked message is readable.
    let reader = edge.client("acme", "reader", "viewer").await;
    let mut room = reader.join_from("group-fill", Some(0)).await.expect("join");
    let (got, _) = collect(&mut room, acked.len(), Duration::from_secs(5)).await;
    let got: Vec<String> = bodies(&got)
        .iter()
        .map(|b| b.split(' ').next().unwrap_or("").to_owned())
        .collect();
    assert_eq!(got, acked);

    // Another tenant's group room takes messages as before.
    let other = edge.client("globex", "g", "viewer").await;
    let _g = other.join("group-other").await.expect("join");
    other
        .send("group-other", Kind::Chat, body.clone())
        .await
        .expect("globex is not acme");

    // A restart counts what acme stores again: still refused.
    drop((lead, reader, other, room));
    let edge = edge.restart().await;
    assert_eq!(edge.edge.group_log_tenant_bytes("acme"), Some(stored));
    let lead = edge.client("acme", "lead", "viewer").await;
    let _room = lead.join("group-fill").await.expect("join");
    let e = lead
        .send("group-fill", Kind::Chat, "again")
        .await
        .expect_err("still full");
    assert!(e.to_string().contains("storage"), "{e}");
}
