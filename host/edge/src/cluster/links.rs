//! What an edge's rooms say to other edges' rooms over NATS.
//!
//! One [`Links`] per clustered edge, beside its rooms:
//!
//! - **Forwarding.** A room this edge relays (its origin is elsewhere)
//!   hands its tick's sends to [`Links::forward`]; every `flush_every` the
//!   edge sends what it gathered for each origin in **one** bus message on
//!   that origin's ingress subject, whatever the number of rooms and sends.
//!   Each send gets a forwarding id; the origin answers every id, in one
//!   bus message per origin tick, and the answer goes to the sender as the
//!   `Ack` or `Rejected` it would have had on one edge. A send the origin
//!   never answers (it died) is refused with `ServerBusy` after
//!   [`FORWARD_TIMEOUT`], so no sender waits for ever.
//! - **Ingress at the origin.** What other edges forward becomes the
//!   room's `Inbound`s with a reply queue per forwarding edge, whose
//!   answers are gathered and sent back the same way.
//! - **Interest.** Every presence interval the edge tells each origin how
//!   many viewers each of its rooms has here (at once when a room gets its
//!   first viewer), so the origin keeps publishing, counts them online, and
//!   retires the room only when nobody anywhere watches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use throng_wire::{EdgeFrame, ErrorCode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::bus::{self, Forward, Forwarded, Interest, Outcome, Replies, Reply, RoomCount};
use super::{Cluster, ClusterError, LiveSet};
use crate::room::{Inbound, ReplyTx, RoomError, RoomKey, Rooms};

/// A forwarded send not answered within this is refused to its sender.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Forwarded sends awaiting an answer at most; beyond, new ones are refused.
const MAX_PENDING: usize = 100_000;

/// A send forwarded this many times is refused: edges that disagree on a
/// room's origin for a moment must not pass it around for ever.
const MAX_HOPS: u8 = 2;

/// Answers queued for one forwarding edge at most.
const REPLY_QUEUE: usize = 65_536;

/// An edge's links to the other edges' rooms.
#[derive(Debug)]
pub struct Links {
    cluster: Arc<Cluster>,
    rooms: Weak<Rooms>,
    state: Mutex<State>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    pending: HashMap<u64, Pending>,
    /// Sends gathered for each origin since the last flush.
    outbox: HashMap<String, Vec<Forwarded>>,
    /// Answer queues, one per forwarding edge.
    repliers: HashMap<String, ReplyTx>,
    /// Viewers here of rooms relayed from elsewhere: room → (origin, count).
    relayed: HashMap<RoomKey, (String, u64)>,
}

#[derive(Debug)]
struct Pending {
    reply: ReplyTx,
    client_msg_id: u64,
    since: Instant,
}

impl Links {
    /// Subscribes this edge's ingress, replies and interest subjects and
    /// starts the flusher; everything runs on `tasks` until `shutdown`.
    pub async fn start(
        cluster: Arc<Cluster>,
        rooms: &Arc<Rooms>,
        flush_every: Duration,
        presence_every: Duration,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Arc<Links>, ClusterError> {
        let me = cluster.edge_id().to_owned();
        let ingress = cluster.subscribe(bus::ingress_subject(&me)).await?;
        let replies = cluster.subscribe(bus::replies_subject(&me)).await?;
        let interest = cluster.subscribe(bus::interest_subject(&me)).await?;
        let links = Arc::new(Links {
            cluster,
            rooms: Arc::downgrade(rooms),
            state: Mutex::new(State::default()),
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
        });
        tasks.spawn(Arc::clone(&links).hear_ingress(ingress));
        tasks.spawn(Arc::clone(&links).hear_replies(replies));
        tasks.spawn(Arc::clone(&links).hear_interest(interest));
        tasks.spawn(Arc::clone(&links).flush(flush_every));
        tasks.spawn(Arc::clone(&links).tell_interest(presence_every));
        Ok(links)
    }

    pub fn edge_id(&self) -> &str {
        self.cluster.edge_id()
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    pub fn live(&self) -> tokio::sync::watch::Receiver<Arc<LiveSet>> {
        self.cluster.watch_live()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a send for `origin`, to go out at the next flush.
    pub fn forward(&self, origin: &str, key: &RoomKey, m: Inbound, hops: u8) {
        if hops >= MAX_HOPS {
            refuse(
                &m.reply,
                m.client_msg_id,
                ErrorCode::ServerBusy,
                "the room's origin is moving; send again",
            );
            return;
        }
        let mut state = self.state();
        if state.pending.len() >= MAX_PENDING {
            drop(state);
            metrics::counter!("throng_forward_refused_total").increment(1);
            refuse(
                &m.reply,
                m.client_msg_id,
                ErrorCode::ServerBusy,
                "too many sends in flight to other edges",
            );
            return;
        }
        state.next_id += 1;
        let fwd_id = state.next_id;
        state.pending.insert(
            fwd_id,
            Pending {
                reply: m.reply,
                client_msg_id: m.client_msg_id,
                since: Instant::now(),
            },
        );
        state.outbox.entry(origin.to_owned()).or_default().push(Forwarded {
            tenant: key.tenant.to_string(),
            room: key.name.to_string(),
            fwd_id,
            hops: hops + 1,
            sender: m.sender.to_string(),
            kind: m.kind,
            body: m.body,
            received_ms: m.received_ms,
        });
    }

    /// This edge has `viewers` viewers of `key`, a room `origin` runs; 0
    /// forgets the room. A room's first viewers are told at once.
    pub fn relayed(&self, key: &RoomKey, origin: &str, viewers: u64) {
        let tell_now = {
            let mut state = self.state();
            if viewers == 0 {
                state.relayed.remove(key);
                false
            } else {
                let before = state
                    .relayed
                    .insert(key.clone(), (origin.to_owned(), viewers))
                    .filter(|(o, _)| o == origin);
                before.is_none()
            }
        };
        if tell_now {
            let interest = Interest {
                from: self.edge_id().to_owned(),
                rooms: vec![RoomCount {
                    tenant: key.tenant.to_string(),
                    room: key.name.to_string(),
                    viewers,
                }],
            };
            let links = self.cluster.clone();
            let subject = bus::interest_subject(origin);
            self.tasks.spawn(async move {
                let _ = links.publish(subject, "interest", bus::encode(&interest)).await;
            });
        }
    }

    /// Publishes a room's batch for its relays, bounded in time: a tick
    /// never waits long for the bus.
    pub async fn publish_batch(&self, subject: String, batch: &bus::RoomBatch, within: Duration) {
        let bytes = bus::encode(batch);
        match tokio::time::timeout(within, self.cluster.publish(subject, "batch", bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "room batch not published"),
            Err(_) => {
                metrics::counter!("throng_bus_publish_timeouts_total", "kind" => "batch").increment(1);
            }
        }
    }

    pub async fn subscribe(&self, subject: String) -> Result<async_nats::Subscriber, ClusterError> {
        self.cluster.subscribe(subject).await
    }

    /// Every `every`: one bus message per origin with what was gathered,
    /// and refusals for sends nobody answered.
    async fn flush(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (outbox, expired) = {
                let mut state = self.state();
                let outbox = std::mem::take(&mut state.outbox);
                let now = Instant::now();
                let expired: Vec<Pending> = if state.pending.values().any(|p| now - p.since >= FORWARD_TIMEOUT) {
                    let ids: Vec<u64> = state
                        .pending
                        .iter()
                        .filter(|(_, p)| now - p.since >= FORWARD_TIMEOUT)
                        .map(|(id, _)| *id)
                        .collect();
                    ids.iter().filter_map(|id| state.pending.remove(id)).collect()
                } else {
                    Vec::new()
                };
                (outbox, expired)
            };
            for p in expired {
                metrics::counter!("throng_forward_timeouts_total").increment(1);
                refuse(
                    &p.reply,
                    p.client_msg_id,
                    ErrorCode::ServerBusy,
                    "the room's origin did not answer; send again",
                );
            }
            for (origin, items) in outbox {
                for items in split(items) {
                    let forward = Forward {
                        from: self.edge_id().to_owned(),
                        items,
                    };
                    let subject = bus::ingress_subject(&origin);
                    if let Err(e) = self.cluster.publish(subject, "forward", bus::encode(&forward)).await {
                        tracing::debug!(error = %e, %origin, "forward not published; its sends time out");
                    }
                }
            }
        }
    }

    /// The next message on `sub`, decoded as `T`; one that does not
    /// decode is counted and skipped. None once the edge stops or the
    /// subscription ends.
    async fn next<T: serde::de::DeserializeOwned>(
        &self,
        sub: &mut async_nats::Subscriber,
        kind: &'static str,
    ) -> Option<T> {
        loop {
            let message = tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                m = sub.next() => m?,
            };
            self.cluster.received(kind, message.payload.len());
            match bus::decode(&message.payload, bus::MAX_ROOM_BUS_BYTES) {
                Ok(t) => return Some(t),
                Err(e) => self.cluster.malformed(kind, &e),
            }
        }
    }

    /// Sends other edges forwarded to rooms this edge is the origin of.
    async fn hear_ingress(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(forward) = self.next::<Forward>(&mut sub, "forward").await {
            if crate::config::check_bus_token(&forward.from).is_err() {
                self.cluster.malformed("forward", &"bad edge id");
                continue;
            }
            let Some(rooms) = self.rooms.upgrade() else {
                return;
            };
            let reply = self.replier(&forward.from);
            for item in forward.items {
                if let Err(why) = check_room(&item.tenant, &item.room) {
                    self.cluster.malformed("forward", &why);
                    refuse(&reply, item.fwd_id, ErrorCode::Malformed, &why);
                    continue;
                }
                let key = RoomKey {
                    tenant: Arc::from(item.tenant.as_str()),
                    name: Arc::from(item.room.as_str()),
                };
                let inbound = Inbound {
                    sender: Arc::from(item.sender.as_str()),
                    kind: item.kind,
                    body: item.body,
                    client_msg_id: item.fwd_id,
                    reply: reply.clone(),
                    received_ms: item.received_ms,
                    hops: item.hops,
                };
                if let Err((m, e)) = rooms.peer_send(&key, inbound) {
                    let code = match e {
                        RoomError::Overloaded => ErrorCode::RateLimited,
                        _ => ErrorCode::ServerBusy,
                    };
                    refuse(&m.reply, m.client_msg_id, code, &e.to_string());
                }
            }
        }
    }

    /// The answer queue for sends forwarded by `edge`: one task gathers
    /// what rooms answer and sends it back in as few bus messages as it can.
    fn replier(&self, edge: &str) -> ReplyTx {
        let mut state = self.state();
        if let Some(r) = state.repliers.get(edge) {
            return r.clone();
        }
        let (tx, rx) = ReplyTx::channel(REPLY_QUEUE, || {
            metrics::counter!("throng_forward_replies_dropped_total").increment(1);
        });
        state.repliers.insert(edge.to_owned(), tx.clone());
        let links = Arc::clone(&self.cluster);
        let subject = bus::replies_subject(edge);
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(send_replies(links, subject, rx, shutdown));
        tx
    }

    /// Answers to sends this edge forwarded.
    async fn hear_replies(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(replies) = self.next::<Replies>(&mut sub, "replies").await {
            let answered: Vec<(Pending, Outcome)> = {
                let mut state = self.state();
                replies
                    .items
                    .into_iter()
                    .filter_map(|r| state.pending.remove(&r.fwd_id).map(|p| (p, r.outcome)))
                    .collect()
            };
            for (p, outcome) in answered {
                let frame = match outcome {
                    Outcome::Ack { seq } => EdgeFrame::Ack {
                        client_msg_id: p.client_msg_id,
                        seq,
                    },
                    Outcome::Rejected { code, reason } => EdgeFrame::Rejected {
                        client_msg_id: p.client_msg_id,
                        code,
                        reason: crate::untrusted(&reason, crate::room::MAX_REASON),
                    },
                };
                let _ = p.reply.send(frame);
            }
        }
    }

    /// Other edges' viewer counts of rooms this edge is the origin of.
    async fn hear_interest(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(interest) = self.next::<Interest>(&mut sub, "interest").await {
            if crate::config::check_bus_token(&interest.from).is_err() {
                self.cluster.malformed("interest", &"bad edge id");
                continue;
            }
            let Some(rooms) = self.rooms.upgrade() else {
                return;
            };
            for r in interest.rooms {
                if let Err(why) = check_room(&r.tenant, &r.room) {
                    self.cluster.malformed("interest", &why);
                    continue;
                }
                let key = RoomKey {
                    tenant: Arc::from(r.tenant.as_str()),
                    name: Arc::from(r.room.as_str()),
                };
                rooms.peer_viewers(&key, &interest.from, r.viewers);
            }
        }
    }

    /// Every presence interval, each origin hears in one message how many
    /// viewers each of its rooms has here.
    async fn tell_interest(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut by_origin: HashMap<String, Vec<RoomCount>> = HashMap::new();
            for (key, (origin, viewers)) in &self.state().relayed {
                by_origin.entry(origin.clone()).or_default().push(RoomCount {
                    tenant: key.tenant.to_string(),
                    room: key.name.to_string(),
                    viewers: *viewers,
                });
            }
            for (origin, rooms) in by_origin {
                let interest = Interest {
                    from: self.edge_id().to_owned(),
                    rooms,
                };
                let _ = self
                    .cluster
                    .publish(bus::interest_subject(&origin), "interest", bus::encode(&interest))
                    .await;
            }
        }
    }
}

/// Gathers a forwarding edge's answers: whatever the rooms answered by the
/// time the first is read goes in one bus message.
async fn send_replies(
    cluster: Arc<Cluster>,
    subject: String,
    mut rx: mpsc::Receiver<Box<EdgeFrame>>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            f = rx.recv() => match f { Some(f) => f, None => return },
        };
        // A room answers a whole tick at once; let the rest of it land.
        tokio::task::yield_now().await;
        let mut items = Vec::new();
        let mut size = 0;
        let mut next = Some(first);
        while let Some(frame) = next {
            let item = match *frame {
                EdgeFrame::Ack { client_msg_id, seq } => Some(Reply {
                    fwd_id: client_msg_id,
                    outcome: Outcome::Ack { seq },
                }),
                EdgeFrame::Rejected {
                    client_msg_id,
                    code,
                    reason,
                } => Some(Reply {
                    fwd_id: client_msg_id,
                    outcome: Outcome::Rejected { code, reason },
                }),
                _ => None,
            };
            if let Some(item) = item {
                size += 24
                    + match &item.outcome {
                        Outcome::Rejected { reason, .. } => reason.len(),
                        Outcome::Ack { .. } => 0,
                    };
                items.push(item);
            }
            if size >= bus::FORWARD_SPLIT_BYTES {
                break;
            }
            next = rx.try_recv().ok();
        }
        if items.is_empty() {
            continue;
        }
        if let Err(e) = cluster
            .publish(subject.clone(), "replies", bus::encode(&Replies { items }))
            .await
        {
            tracing::debug!(error = %e, "replies not published; the senders' edge times them out");
        }
    }
}

/// Cuts one origin's gathered sends into bus messages that fit.
fn split(items: Vec<Forwarded>) -> Vec<Vec<Forwarded>> {
    let mut out: Vec<Vec<Forwarded>> = vec![Vec::new()];
    let mut size = 0;
    for item in items {
        let s = item.size();
        if size + s > bus::FORWARD_SPLIT_BYTES && out.last().is_some_and(|l| !l.is_empty()) {
            out.push(Vec::new());
            size = 0;
        }
        size += s;
        if let Some(last) = out.last_mut() {
            last.push(item);
        }
    }
    out.retain(|l| !l.is_empty());
    out
}

/// A room named on the bus must be one a client could have named: another
/// edge is ours but may be buggy, and a room costs a slot here.
fn check_room(tenant: &str, room: &str) -> Result<(), String> {
    throng_wire::validate_room_name(tenant).map_err(|e| format!("tenant: {e}"))?;
    throng_wire::validate_room_name(room)
}

fn refuse(reply: &ReplyTx, client_msg_id: u64, code: ErrorCode, reason: &str) {
    let _ = reply.send(EdgeFrame::Rejected {
        client_msg_id,
        code: code.code(),
        reason: reason.to_owned(),
    });
}
