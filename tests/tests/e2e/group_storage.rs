//! Group-room storage in a cluster: each tenant's log is a JetStream stream
//! of its own, bounded by `rooms.group_retention.max_tenant_bytes` across
//! every edge that writes it, and a log in the one-stream layout of
//! earlier versions is moved into it with its numbering.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde::Serialize;
use throng_client::{Client, ClientError};
use throng_edge::cluster::stream_log;
use throng_edge::config::{ClusterConfig, GroupHistory};
use throng_tests::nats::NatsServer;
use throng_tests::{TestEdge, cluster_with, collect, wait_for};
use throng_wire::{ErrorCode, Kind, Message};

/// The bound of these tests: the least the config takes.
const CAP: u64 = 1 << 16;
const BODY: usize = 1000;

fn capped(c: &mut throng_edge::Config) {
    c.rooms.recent_messages = 0;
    c.rooms.group_retention.max_tenant_bytes = CAP;
}

/// A stream's stored bytes and its `max_bytes`, asked of nats-server as
/// edge `a` (the secured server lets only edges use JetStream).
async fn stream_bytes(nats: &NatsServer, tenant: &str) -> (u64, i64) {
    let js = jetstream::new(nats.connect_as(Some("a")).await);
    let mut stream = js
        .get_stream(stream_log::tenant_stream(tenant))
        .await
        .expect("the tenant's stream");
    let info = stream.info().await.expect("stream info");
    (info.state.bytes, info.config.max_bytes)
}

/// Sends `BODY`-byte messages from `senders` in turn (each into its own
/// room) until each has been refused once: the bodies acked, per sender,
/// and every refusal.
async fn fill(senders: &[(&Client, &str)]) -> (Vec<Vec<String>>, Vec<ClientError>) {
    let mut acked = vec![Vec::new(); senders.len()];
    let mut refused: Vec<Option<ClientError>> = (0..senders.len()).map(|_| None).collect();
    let pad = "x".repeat(BODY);
    // Far more than the bound holds: a bound not kept fails here.
    for i in 0..(4 * CAP as usize / BODY) {
        for (k, (client, room)) in senders.iter().enumerate() {
            if refused[k].is_some() {
                continue;
            }
            let tag = format!("{room}-{i}");
            match client.send(room, Kind::Chat, format!("{tag} {pad}")).await {
                Ok(_) => acked[k].push(tag),
                Err(e) => refused[k] = Some(e),
            }
        }
        if refused.iter().all(Option::is_some) {
            break;
        }
    }
    let refused = refused
        .into_iter()
        .map(|r| r.expect("four times the bound was never refused"))
        .collect();
    (acked, refused)
}

fn tags(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .map(|m| {
            let body = String::from_utf8_lossy(&m.body);
            body.split(' ').next().unwrap_or_default().to_owned()
        })
        .collect()
}

/// On a090a11 only the embedded log had a per-tenant bound: in a cluster
/// one tenant's members could fill JetStream's disk. Now the tenant's
/// stream holds at most `max_tenant_bytes`, whichever edges write its
/// rooms; past it they refuse with `StorageFull`, every message acked
/// before is readable from any edge, and another tenant sends on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_group_messages_cannot_fill_jetstream_from_any_edge() {
    let nats = NatsServer::secured(&["a", "b"], &[]);
    let edges = cluster_with(&nats, &["a", "b"], capped).await;
    // Two rooms, one sender on each edge: whichever edges originate them,
    // both write the one tenant's stream.
    let rooms = ["group-fill-1", "group-fill-2"];
    let one = edges[0].client("acme", "one", "viewer").await;
    let two = edges[1].client("acme", "two", "viewer").await;
    let _r1 = one.join(rooms[0]).await.expect("join");
    let _r2 = two.join(rooms[1]).await.expect("join");
    let (acked, refusals) = fill(&[(&one, rooms[0]), (&two, rooms[1])]).await;
    for e in &refusals {
        assert_eq!(e.code(), Some(ErrorCode::StorageFull), "{e}");
    }
    let (bytes, max) = stream_bytes(&nats, "acme").await;
    assert_eq!(max, CAP as i64, "the stream takes the edges' bound");
    assert!(bytes <= CAP, "acme's stream holds {bytes} bytes, over {CAP}");
    // Nothing refused under the bound: what is stored is within two
    // entries (a message and its subject, id and framing) of it.
    let total: usize = acked.iter().map(Vec::len).sum();
    assert!(
        bytes + 2 * (BODY as u64 + 500) >= CAP,
        "refused after {total} messages with {bytes} bytes stored"
    );
    // Refused now on either edge, into a room of either origin.
    for (client, room) in [(&one, rooms[1]), (&two, rooms[0])] {
        let _joined = client.join(room).await.expect("join");
        let e = client.send(room, Kind::Chat, "again").await.expect_err("still full");
        assert_eq!(e.code(), Some(ErrorCode::StorageFull), "{e}");
    }

    // Every acked message is readable, from the edge that did not take it.
    for (k, room) in rooms.iter().enumerate() {
        let reader = edges[1 - k].client("acme", &format!("reader-{k}"), "viewer").await;
        let mut stream = reader.join_from(room, Some(0)).await.expect("join");
        let (got, _) = collect(&mut stream, acked[k].len(), Duration::from_secs(10)).await;
        assert_eq!(tags(&got), acked[k], "{room}");
    }

    // Another tenant's group rooms send as before, on both edges.
    for (i, edge) in edges.iter().enumerate() {
        let other = edge.client("globex", &format!("g{i}"), "viewer").await;
        let room = format!("group-other-{i}");
        let _g = other.join(&room).await.expect("join");
        other
            .send(&room, Kind::Chat, "x".repeat(BODY))
            .await
            .expect("globex is not acme");
    }
}

/// The bound refuses only while the tenant is at it: once retention
/// (`max_age`) removes old messages, the same rooms take new ones again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_tenant_sends_again_once_retention_frees_its_stream() {
    let nats = NatsServer::secured(&["a"], &[]);
    let edges = cluster_with(&nats, &["a"], |c| {
        capped(c);
        c.rooms.group_retention.max_age = Some(Duration::from_secs(2));
    })
    .await;
    let lead = edges[0].client("acme", "lead", "viewer").await;
    let _room = lead.join("group-aging").await.expect("join");
    let (_, refusals) = fill(&[(&lead, "group-aging")]).await;
    assert_eq!(refusals[0].code(), Some(ErrorCode::StorageFull), "{}", refusals[0]);
    let refused_at = Instant::now();
    let mut accepted = None;
    for _ in 0..200 {
        match lead.send("group-aging", Kind::Chat, "after").await {
            Ok(ack) => {
                accepted = Some(ack);
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::StorageFull), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let ack = accepted.expect("still refused 20 s after the messages aged out");
    assert!(ack.seq > 0);
    // Not before retention could have freed anything.
    assert!(
        refused_at.elapsed() >= Duration::from_millis(500),
        "{:?}",
        refused_at.elapsed()
    );
}

/// One edge of a cluster on `nats`, started without waiting for others.
async fn clustered(nats: &NatsServer, id: &str) -> TestEdge {
    let url = nats.url();
    let id = id.to_owned();
    TestEdge::start(move |c| {
        let mut cluster = ClusterConfig::with_nats(vec![url]);
        cluster.edge_id = Some(id);
        c.cluster = Some(cluster);
        c.rooms.group_rooms = vec!["group-*".into()];
        c.rooms.group_history = GroupHistory::All;
        c.rooms.recent_messages = 0;
        c.wasm.max_instances = 256;
    })
    .await
}

/// An entry as the one-stream layout stored it (`THRONG_GROUPS`, subject
/// `throng.group.<room hash>`).
#[derive(Serialize)]
struct LegacyEntry {
    tenant: String,
    room: String,
    messages: Vec<Message>,
    head: u64,
}

/// A cluster whose group logs are in the one-stream layout of earlier
/// versions: the first edge of this version moves every entry, in order
/// and once, into the tenants' streams and deletes the old stream; rooms
/// keep their numbers and their epoch, so a member resuming with the old
/// epoch gets exactly what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_stream_group_log_is_moved_to_per_tenant_streams_with_its_numbering() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.connect_as(None).await);
    let mut legacy = js
        .create_stream(jetstream::stream::Config {
            name: stream_log::LEGACY_STREAM.to_owned(),
            subjects: vec!["throng.group.>".into()],
            ..Default::default()
        })
        .await
        .expect("the old stream");
    let old_epoch = (legacy.info().await.expect("info").created.unix_timestamp_nanos() / 1_000_000) as u64;
    // Two tenants' rooms, interleaved; a tick of two messages; one entry
    // stored twice (a retry the old readers skipped).
    let rooms = [("acme", "group-old"), ("globex", "group-old"), ("acme", "group-other")];
    let mut sent: Vec<Vec<(u64, String)>> = vec![Vec::new(); rooms.len()];
    let mut next = [1u64; 3];
    for round in 0..5 {
        for (k, (tenant, room)) in rooms.iter().enumerate() {
            let n = if round == 2 { 2 } else { 1 };
            let messages: Vec<Message> = (0..n)
                .map(|j| {
                    let seq = next[k] + j;
                    Message {
                        seq,
                        sender: "old".into(),
                        kind: Kind::Chat,
                        body: format!("{tenant}/{room}/{seq}").into_bytes(),
                    }
                })
                .collect();
            next[k] += n;
            sent[k].extend(
                messages
                    .iter()
                    .map(|m| (m.seq, String::from_utf8_lossy(&m.body).into_owned())),
            );
            let head = messages.last().map_or(0, |m| m.seq);
            let entry = LegacyEntry {
                tenant: (*tenant).into(),
                room: (*room).into(),
                messages,
                head,
            };
            let payload = bytes::Bytes::from(throng_wire::bus::encode(&entry));
            let subject = format!("throng.group.{}", throng_wire::bus::room_token(tenant, room));
            let copies = if round == 3 && k == 0 { 2 } else { 1 };
            for _ in 0..copies {
                js.publish(subject.clone(), payload.clone())
                    .await
                    .expect("publish")
                    .await
                    .expect("stored");
            }
        }
    }

    // Two edges start at once on it.
    let edges: Vec<TestEdge> = futures::future::join_all(["a", "b"].map(|id| clustered(&nats, id))).await;
    for e in &edges {
        let c = e.edge.cluster().expect("clustered");
        wait_for("both edges to see each other", Duration::from_secs(10), || {
            c.live().edges.len() == 2
        })
        .await;
    }

    for (k, (tenant, room)) in rooms.iter().enumerate() {
        // A member that saw the first message resumes with the old epoch:
        // nothing foreign, exactly the rest.
        let member = edges[k % 2].client(tenant, "member", "viewer").await;
        let mut stream = member.resume(room, Some(1), old_epoch).await.expect("join");
        assert_eq!(stream.epoch, old_epoch, "{tenant}/{room} keeps its numbering's epoch");
        let want: Vec<(u64, String)> = sent[k][1..].to_vec();
        let (got, _) = collect(&mut stream, want.len(), Duration::from_secs(10)).await;
        let got: Vec<(u64, String)> = got
            .iter()
            .map(|m| (m.seq, String::from_utf8_lossy(&m.body).into_owned()))
            .collect();
        assert_eq!(got, want, "{tenant}/{room}");
        // Numbering goes on above the moved log's end (a room whose origin
        // is chosen anew numbers from a fresh base, above it too).
        let ack = member.send(room, Kind::Chat, "new").await.expect("send");
        assert!(ack.seq >= next[k], "{tenant}/{room}: {} reuses a moved number", ack.seq);
    }
    assert!(
        js.get_stream(stream_log::LEGACY_STREAM).await.is_err(),
        "the old stream is deleted once moved"
    );
    let mut acme = js
        .get_stream(stream_log::tenant_stream("acme"))
        .await
        .expect("acme's stream");
    // Each entry once (the stored-twice one too), plus the two new ones.
    assert_eq!(acme.info().await.expect("info").state.messages, 5 + 5 + 2);
}
