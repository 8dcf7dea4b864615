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
//! - **Interest.** A relay tells the origin at once when a room gets its
//!   first viewers here and when it loses its last, so the origin starts
//!   and stops publishing the room's batches without waiting for counts.
//! - **Presence, edge → region → origin.** Every presence interval each
//!   edge sends the viewer counts of every room it relays, in **one**
//!   message, to its region's aggregator (an edge of the region chosen by
//!   rendezvous hashing). The aggregator sums its region and sends **one**
//!   message per origin with the region's totals of that origin's rooms.
//!   The origin adds its regions to its own viewers: that is the online
//!   count its batches carry to every viewer.
//! - **Who is online.** A client's batched "which of these users are
//!   online" asks every other edge at once (one bus message out, one
//!   answer per edge) and merges what answers within [`WHO_DEADLINE`].
//!
//! Whatever arrives is taken from a live edge only (the sender is the
//! subject's last token; see [`bus`]), for a tenant this edge knows, and
//! within what is possible; anything else is refused and counted
//! (`throng_bus_refused_total`), and the state kept per other edge lives
//! only while that edge is live.
use crate::SendLimiter;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use throng_wire::{EdgeFrame, ErrorCode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::bus::{
    self, EdgeCounts, Forward, Forwarded, Interest, KickAnswer, KickOrder, OriginCount, Outcome, RegionCounts, Replies,
    Reply, Resync, Resynced, RoomCount, WhoAnswer, WhoQuery,
};
use super::{BusKind, Cluster, ClusterError, LiveSet};
use crate::presence::Presence;
use crate::room::{Inbound, Peer, ReplyTx, RoomError, RoomKey, Rooms};

/// A forwarded send not answered within this is refused to its sender.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Forwarded sends awaiting an answer at most; beyond, new ones are refused.
const MAX_PENDING: usize = 100_000;

/// A send forwarded this many times is refused: edges that disagree on a
/// room's origin for a moment must not pass it around for ever.
const MAX_HOPS: u8 = 2;

/// Answers queued for one forwarding edge at most.
const REPLY_QUEUE: usize = 65_536;

/// A cluster-wide "who is online" merges what other edges answer within
/// this; an edge that answers later counts its users offline.
pub const WHO_DEADLINE: Duration = Duration::from_millis(500);

/// Cluster-wide "who is online" queries this edge waits on at once; more
/// are refused (each one is a message to every edge).
const MAX_WHO_IN_FLIGHT: usize = 64;

/// A relay waits this long for the origin to fill a gap; a room's batches
/// wait meanwhile, so it is short.
pub const RESYNC_DEADLINE: Duration = Duration::from_millis(500);

/// Resync requests an origin answers at once; more go unanswered (the
/// relay counts its gap as lost).
const MAX_RESYNCS_IN_FLIGHT: usize = 32;

/// How [`Links::start`] runs.
pub struct LinkSetup {
    /// How often sends gathered for other edges' rooms go out.
    pub flush_every: Duration,
    pub presence_every: Duration,
    /// The edge's per-user send limiter: sends forwarded to rooms this
    /// edge is the origin of are counted in it too.
    pub send_limiter: Arc<SendLimiter>,
    /// The edge's sessions by user, for disconnects ordered elsewhere.
    pub kicks: Arc<crate::kick::Kicks>,
    /// The tenants this edge knows (its config's): bus input naming
    /// another makes nothing. [`Links::set_tenants`] changes it on reload.
    pub tenants: Vec<String>,
}

/// An edge's links to the other edges' rooms.
pub struct Links {
    cluster: Arc<Cluster>,
    rooms: Weak<Rooms>,
    presence: Arc<Presence>,
    /// See [`LinkSetup::send_limiter`].
    send_limiter: Arc<SendLimiter>,
    kicks: Arc<crate::kick::Kicks>,
    tenants: std::sync::RwLock<Arc<std::collections::HashSet<String>>>,
    state: Mutex<State>,
    who_in_flight: Arc<tokio::sync::Semaphore>,
    resyncs_in_flight: Arc<tokio::sync::Semaphore>,
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
    /// Whether the last counts sent to the aggregator named any room.
    counted_any: bool,
    /// As its region's aggregator: each edge's latest counts.
    reports: HashMap<String, Report>,
    /// As aggregator: the rooms each origin was last told of, so a room
    /// whose region count fell to nothing is told once with 0.
    told: HashMap<String, Vec<(String, String)>>,
}

#[derive(Debug)]
struct Report {
    heard: Instant,
    at_ms: u64,
    rooms: Vec<OriginCount>,
}

#[derive(Debug)]
struct Pending {
    /// The edge the send went to: only it may answer.
    origin: String,
    reply: ReplyTx,
    client_msg_id: u64,
    since: Instant,
}

impl std::fmt::Debug for LinkSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSetup")
            .field("flush_every", &self.flush_every)
            .field("presence_every", &self.presence_every)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("edge_id", &self.edge_id())
            .finish_non_exhaustive()
    }
}

impl Links {
    /// Subscribes this edge's ingress, replies and interest subjects and
    /// starts the flusher; everything runs on `tasks` until `shutdown`.
    pub async fn start(
        cluster: Arc<Cluster>,
        rooms: &Arc<Rooms>,
        presence: Arc<Presence>,
        setup: LinkSetup,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Arc<Links>, ClusterError> {
        let LinkSetup {
            flush_every,
            presence_every,
            send_limiter,
            kicks,
            tenants,
        } = setup;
        let me = cluster.edge_id().to_owned();
        let ingress = cluster.subscribe(bus::inbox_of("ingress", &me)).await?;
        let replies = cluster.subscribe(bus::inbox_of("replies", &me)).await?;
        let interest = cluster.subscribe(bus::inbox_of("interest", &me)).await?;
        let counts = cluster.subscribe(bus::inbox_of("counts", &me)).await?;
        let regional = cluster.subscribe(bus::inbox_of("regional", &me)).await?;
        let who = cluster.subscribe(bus::from_any("who")).await?;
        let resync = cluster.subscribe(bus::inbox_of("resync", &me)).await?;
        let kick = cluster.subscribe(bus::from_any("kick")).await?;
        let links = Arc::new(Links {
            cluster,
            rooms: Arc::downgrade(rooms),
            presence,
            send_limiter,
            kicks,
            tenants: std::sync::RwLock::new(Arc::new(tenants.into_iter().collect())),
            state: Mutex::new(State::default()),
            who_in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_WHO_IN_FLIGHT)),
            resyncs_in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_RESYNCS_IN_FLIGHT)),
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
        });
        tasks.spawn(Arc::clone(&links).hear_ingress(ingress));
        tasks.spawn(Arc::clone(&links).hear_replies(replies));
        tasks.spawn(Arc::clone(&links).hear_interest(interest));
        tasks.spawn(Arc::clone(&links).hear_counts(counts));
        tasks.spawn(Arc::clone(&links).hear_regional(regional));
        tasks.spawn(Arc::clone(&links).hear_who(who));
        tasks.spawn(Arc::clone(&links).hear_resync(resync));
        tasks.spawn(Arc::clone(&links).hear_kick(kick));
        tasks.spawn(Arc::clone(&links).flush(flush_every));
        tasks.spawn(Arc::clone(&links).count(presence_every));
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

    /// The tenants this edge knows, after a reload.
    pub fn set_tenants(&self, tenants: impl IntoIterator<Item = String>) {
        *self.tenants.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tenants.into_iter().collect());
    }

    fn knows(&self, tenant: &str) -> bool {
        self.tenants.read().unwrap_or_else(|e| e.into_inner()).contains(tenant)
    }

    /// Whether bus input about `tenant`'s `room` may touch this edge's
    /// rooms: a valid name of a known tenant's room.
    fn check_room(&self, tenant: &str, room: &str) -> Result<(), String> {
        check_room(tenant, room)?;
        if self.knows(tenant) {
            Ok(())
        } else {
            Err("a tenant this edge does not know".to_owned())
        }
    }

    /// Whether this edge is the origin of `tenant`'s `room` in `live`.
    fn originates(&self, live: &LiveSet, tenant: &str, room: &str) -> bool {
        live.origin(tenant, room) == Some(self.edge_id())
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
                origin: origin.to_owned(),
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
    /// forgets the room. The origin hears at once of a room's first
    /// viewers here and of its last leaving (or of the room moving to
    /// another origin); counts in between go the presence way.
    pub fn relayed(&self, key: &RoomKey, origin: &str, viewers: u64) {
        let tell: Vec<(String, u64)> = {
            let mut state = self.state();
            let before = if viewers == 0 {
                state.relayed.remove(key)
            } else {
                state.relayed.insert(key.clone(), (origin.to_owned(), viewers))
            };
            match before {
                Some((was, _)) if was == origin => Vec::new(),
                Some((was, _)) if viewers == 0 || was.is_empty() => vec![(was, 0)],
                Some((was, _)) => vec![(was, 0), (origin.to_owned(), viewers)],
                None if viewers > 0 => vec![(origin.to_owned(), viewers)],
                None => Vec::new(),
            }
        };
        for (origin, viewers) in tell {
            if origin.is_empty() {
                continue;
            }
            let interest = Interest {
                from: self.edge_id().to_owned(),
                rooms: vec![RoomCount {
                    tenant: key.tenant.to_string(),
                    room: key.name.to_string(),
                    viewers,
                }],
            };
            let links = self.cluster.clone();
            let subject = bus::interest_subject(&origin, self.edge_id());
            self.tasks.spawn(async move {
                let _ = links.publish(subject, BusKind::Interest, bus::encode(&interest)).await;
            });
        }
    }

    /// Publishes a room's batch for its relays, bounded in time: a tick
    /// never waits long for the bus.
    pub async fn publish_batch(&self, subject: String, batch: &bus::RoomBatch, within: Duration) {
        let bytes = bus::encode(batch);
        match tokio::time::timeout(within, self.cluster.publish(subject, BusKind::Batch, bytes)).await {
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
            let live = self.cluster.live();
            let (outbox, expired) = {
                let mut state = self.state();
                // Answer queues of edges gone from the live set go too
                // (their task ends once the rooms' clones are dropped).
                state.repliers.retain(|edge, _| live.contains(edge));
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
                    "the room's origin did not answer; it may have the message (group rooms: check before sending again)",
                );
            }
            for (origin, items) in outbox {
                for items in split(items) {
                    let forward = Forward {
                        from: self.edge_id().to_owned(),
                        items,
                    };
                    let subject = bus::ingress_subject(&origin, self.edge_id());
                    if let Err(e) = self
                        .cluster
                        .publish(subject, BusKind::Forward, bus::encode(&forward))
                        .await
                    {
                        tracing::debug!(error = %e, %origin, "forward not published; its sends time out");
                    }
                }
            }
        }
    }

    /// The next answer on an inbox `sub`, decoded as `T`; one that does
    /// not decode is counted and skipped. None once the edge stops or the
    /// subscription ends.
    async fn next<T: serde::de::DeserializeOwned>(&self, sub: &mut async_nats::Subscriber, kind: BusKind) -> Option<T> {
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

    /// The next message on `sub` from a live (or lately live) edge, decoded
    /// as `T`, with its sender (the subject's last token) and reply subject.
    /// One that does not decode, or comes from an edge this one does not
    /// know, is counted and skipped.
    async fn next_from_edge<T: serde::de::DeserializeOwned>(
        &self,
        sub: &mut async_nats::Subscriber,
        kind: BusKind,
    ) -> Option<Heard<T>> {
        loop {
            let message = tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                m = sub.next() => m?,
            };
            self.cluster.received(kind, message.payload.len());
            // This edge is live too: an aggregator sends counts to itself.
            // An edge lately live is known too: its first messages after a
            // partition race its announcement back into the live set.
            let from = bus::sender_of(&message.subject);
            if !self.cluster.knows(from) {
                self.cluster.refused(kind, "from an edge that is not live");
                continue;
            }
            match bus::decode(&message.payload, bus::MAX_ROOM_BUS_BYTES) {
                Ok(body) => {
                    return Some(Heard {
                        body,
                        from: from.to_owned(),
                        reply: message.reply.map(|r| r.to_string()),
                    });
                }
                Err(e) => self.cluster.malformed(kind, &e),
            }
        }
    }

    /// Whether a message's body names the edge that sent it; counted as
    /// refused when it names another.
    fn same_sender(&self, kind: BusKind, from: &str, named: &str) -> bool {
        if from == named {
            true
        } else {
            self.cluster.refused(kind, "a body naming another sender");
            false
        }
    }

    /// Sends other edges forwarded to rooms this edge is the origin of.
    async fn hear_ingress(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard {
            body: forward, from, ..
        }) = self.next_from_edge::<Forward>(&mut sub, BusKind::Forward).await
        {
            if !self.same_sender(BusKind::Forward, &from, &forward.from) {
                continue;
            }
            let Some(rooms) = self.rooms.upgrade() else {
                return;
            };
            let reply = self.replier(&from);
            for item in forward.items {
                if let Err(why) = self.check_room(&item.tenant, &item.room) {
                    self.cluster.refused(BusKind::Forward, "a room this edge may not have");
                    refuse(&reply, item.fwd_id, ErrorCode::Malformed, &why);
                    continue;
                }
                // Counted again here, in one bucket with the user's sends
                // on this edge and from every other edge: so the user's
                // rate holds across the cluster for rooms of one origin.
                if self
                    .send_limiter
                    .check_key(&crate::rate_key(&item.tenant, &item.sender))
                    .is_err()
                {
                    metrics::counter!("throng_rate_limited_total", "where" => "origin").increment(1);
                    refuse(
                        &reply,
                        item.fwd_id,
                        ErrorCode::RateLimited,
                        "send rate exceeded across the cluster; slow down",
                    );
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
        let subject = bus::replies_subject(edge, self.edge_id());
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(send_replies(links, subject, rx, shutdown));
        tx
    }

    /// Answers to sends this edge forwarded.
    async fn hear_replies(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard {
            body: replies, from, ..
        }) = self.next_from_edge::<Replies>(&mut sub, BusKind::Replies).await
        {
            let answered: Vec<(Pending, Outcome)> = {
                let mut state = self.state();
                let mut answered = Vec::new();
                for r in replies.items {
                    // Only the edge a send went to answers it.
                    if state.pending.get(&r.fwd_id).is_some_and(|p| p.origin == from)
                        && let Some(p) = state.pending.remove(&r.fwd_id)
                    {
                        answered.push((p, r.outcome));
                    }
                }
                answered
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

    /// Other edges' first (or no more) viewers of rooms this edge is the
    /// origin of.
    async fn hear_interest(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard {
            body: interest, from, ..
        }) = self.next_from_edge::<Interest>(&mut sub, BusKind::Interest).await
        {
            if !self.same_sender(BusKind::Interest, &from, &interest.from) {
                continue;
            }
            let Some(rooms) = self.rooms.upgrade() else {
                return;
            };
            let live = self.cluster.live();
            for r in interest.rooms {
                if let Err(why) = self.check_room(&r.tenant, &r.room) {
                    self.cluster.refused(BusKind::Interest, &why);
                    continue;
                }
                if !self.originates(&live, &r.tenant, &r.room) {
                    // A room is made here only where this edge is its origin.
                    self.cluster
                        .refused(BusKind::Interest, "a room this edge is not the origin of");
                    continue;
                }
                if r.viewers > bus::MAX_EDGE_VIEWERS {
                    self.cluster
                        .refused(BusKind::Interest, "more viewers than an edge can have");
                    continue;
                }
                let key = RoomKey {
                    tenant: Arc::from(r.tenant.as_str()),
                    name: Arc::from(r.room.as_str()),
                };
                rooms.peer_viewers(&key, Peer::Edge(from.clone()), r.viewers);
            }
        }
    }

    /// Every presence interval: as its region's aggregator, sums the
    /// region's counts and tells each origin; then sends this edge's own
    /// counts to the aggregator.
    async fn count(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let live = self.cluster.live();
            let region = self.cluster.region().to_owned();
            let Some(aggregator) = live.aggregator(&region).map(str::to_owned) else {
                continue;
            };
            if aggregator == self.edge_id() {
                // A report three intervals old is from an edge that stopped.
                let by_origin = aggregate(&mut self.state(), &live, every * 3);
                for (origin, rooms) in by_origin {
                    let (at_ms, rooms) = rooms;
                    let counts = RegionCounts {
                        region: region.clone(),
                        from: self.edge_id().to_owned(),
                        at_ms,
                        rooms,
                    };
                    let subject = bus::regional_subject(&origin, self.edge_id());
                    let _ = self
                        .cluster
                        .publish(subject, BusKind::Regional, bus::encode(&counts))
                        .await;
                }
            } else {
                let mut state = self.state();
                state.reports.clear();
                state.told.clear();
            }
            let counts = {
                let mut state = self.state();
                let rooms: Vec<OriginCount> = state
                    .relayed
                    .iter()
                    .map(|(key, (origin, viewers))| OriginCount {
                        origin: origin.clone(),
                        tenant: key.tenant.to_string(),
                        room: key.name.to_string(),
                        viewers: *viewers,
                    })
                    .collect();
                // Once empty, say so once; then stay quiet while nothing is relayed.
                if rooms.is_empty() && !state.counted_any {
                    continue;
                }
                state.counted_any = !rooms.is_empty();
                EdgeCounts {
                    from: self.edge_id().to_owned(),
                    region: region.clone(),
                    at_ms: crate::unix_now_ms(),
                    rooms,
                }
            };
            for counts in split_counts(counts) {
                let subject = bus::counts_subject(&aggregator, self.edge_id());
                let _ = self
                    .cluster
                    .publish(subject, BusKind::Counts, bus::encode(&counts))
                    .await;
            }
        }
    }

    /// Counts of this region's edges, kept while this edge aggregates.
    async fn hear_counts(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard { body: counts, from, .. }) =
            self.next_from_edge::<EdgeCounts>(&mut sub, BusKind::Counts).await
        {
            if !self.same_sender(BusKind::Counts, &from, &counts.from) {
                continue;
            }
            if let Err(why) = counts.rooms.iter().try_for_each(|r| {
                self.check_room(&r.tenant, &r.room)
                    .and_then(|()| check_edge(&r.origin))
                    .and_then(|()| {
                        if r.viewers > bus::MAX_EDGE_VIEWERS {
                            Err("more viewers than an edge can have".to_owned())
                        } else {
                            Ok(())
                        }
                    })
            }) {
                self.cluster.refused(BusKind::Counts, &why);
                continue;
            }
            let live = self.cluster.live();
            let region = live.edges.iter().find(|e| e.edge_id == from).map(|e| e.region.as_str());
            if counts.region != self.cluster.region() || region != Some(self.cluster.region()) {
                self.cluster.refused(BusKind::Counts, "counts from another region");
                continue;
            }
            let mut state = self.state();
            let report = state.reports.entry(counts.from).or_insert_with(|| Report {
                heard: Instant::now(),
                at_ms: counts.at_ms,
                rooms: Vec::new(),
            });
            // A big edge's counts come in several messages of one moment.
            if report.at_ms != counts.at_ms {
                report.rooms.clear();
            }
            report.heard = Instant::now();
            report.at_ms = counts.at_ms;
            report.rooms.extend(counts.rooms);
        }
    }

    /// Regions' totals of rooms this edge is the origin of.
    async fn hear_regional(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard { body: counts, from, .. }) =
            self.next_from_edge::<RegionCounts>(&mut sub, BusKind::Regional).await
        {
            if !self.same_sender(BusKind::Regional, &from, &counts.from) {
                continue;
            }
            // A region's totals come from its aggregator, which all agree
            // on: so there are as many regions as regions with live edges,
            // and no total above what their edges could hold.
            let live = self.cluster.live();
            if live.aggregator(&counts.region) != Some(from.as_str()) {
                self.cluster
                    .refused(BusKind::Regional, "counts from an edge that does not sum that region");
                continue;
            }
            let edges_in_region = live.edges.iter().filter(|e| e.region == counts.region).count() as u64;
            let most = bus::MAX_EDGE_VIEWERS.saturating_mul(edges_in_region);
            if let Err(why) = counts.rooms.iter().try_for_each(|r| {
                self.check_room(&r.tenant, &r.room).and_then(|()| {
                    if r.viewers > most {
                        Err("more viewers than the region's edges can have".to_owned())
                    } else {
                        Ok(())
                    }
                })
            }) {
                self.cluster.refused(BusKind::Regional, &why);
                continue;
            }
            let lag = crate::unix_now_ms().saturating_sub(counts.at_ms);
            self.cluster
                .stats()
                .presence_lag_ms
                .store(lag, std::sync::atomic::Ordering::Relaxed);
            metrics::gauge!("throng_presence_lag_seconds").set(lag as f64 / 1000.0);
            let Some(rooms) = self.rooms.upgrade() else {
                return;
            };
            for r in counts.rooms {
                if !self.originates(&live, &r.tenant, &r.room) {
                    self.cluster
                        .refused(BusKind::Regional, "a room this edge is not the origin of");
                    continue;
                }
                let key = RoomKey {
                    tenant: Arc::from(r.tenant.as_str()),
                    name: Arc::from(r.room.as_str()),
                };
                rooms.peer_viewers(&key, Peer::Region(counts.region.clone()), r.viewers);
            }
        }
    }

    /// For each of `users` of `tenant`: online on any live edge. `here` is
    /// this edge's own answer; other edges are asked at once and whatever
    /// answers within [`WHO_DEADLINE`] is merged in. None when too many
    /// such queries are under way on this edge.
    pub async fn who_is_online(&self, tenant: &str, users: Vec<String>, mut here: Vec<bool>) -> Option<Vec<bool>> {
        let others = self.cluster.live().edges.len().saturating_sub(1);
        if others == 0 || here.iter().all(|b| *b) {
            return Some(here);
        }
        let _permit = Arc::clone(&self.who_in_flight).try_acquire_owned().ok()?;
        let inbox = self.cluster.inbox();
        let mut answers = match self.cluster.subscribe(inbox.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "presence query: cannot hear answers; answering for this edge alone");
                return Some(here);
            }
        };
        let query = WhoQuery {
            from: self.edge_id().to_owned(),
            tenant: tenant.to_owned(),
            users,
        };
        if let Err(e) = self
            .cluster
            .request(
                bus::who_subject(self.edge_id()),
                inbox,
                BusKind::Who,
                bus::encode(&query),
            )
            .await
        {
            tracing::debug!(error = %e, "presence query not sent; answering for this edge alone");
            return Some(here);
        }
        let deadline = tokio::time::Instant::now() + WHO_DEADLINE;
        let mut heard = std::collections::HashSet::new();
        while heard.len() < others {
            let answer = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                a = self.next::<WhoAnswer>(&mut answers, BusKind::Who) => match a { Some(a) => a, None => break },
            };
            // An answer counts once per live edge: anyone may answer an
            // inbox.
            if !self.cluster.live().contains(&answer.from) || !heard.insert(answer.from) {
                continue;
            }
            for (i, online) in here.iter_mut().enumerate() {
                *online |= bus::bit(&answer.online, i);
            }
        }
        if heard.len() < others {
            metrics::counter!("throng_presence_query_partial_total").increment(1);
        }
        Some(here)
    }

    /// Closes `user`'s sessions on every other live edge. Returns the
    /// sessions they closed and how many edges did not answer within
    /// [`WHO_DEADLINE`] (the order reached them all the same, unless the
    /// bus lost it). None when too many cluster-wide queries are under way.
    pub async fn disconnect(&self, tenant: &str, user: &str, reason: &str) -> Option<(usize, usize)> {
        let others = self.cluster.live().edges.len().saturating_sub(1);
        if others == 0 {
            return Some((0, 0));
        }
        let _permit = Arc::clone(&self.who_in_flight).try_acquire_owned().ok()?;
        let inbox = self.cluster.inbox();
        let Ok(mut answers) = self.cluster.subscribe(inbox.clone()).await else {
            return Some((0, others));
        };
        let order = KickOrder {
            from: self.edge_id().to_owned(),
            tenant: tenant.to_owned(),
            user: user.to_owned(),
            reason: reason.to_owned(),
        };
        if let Err(e) = self
            .cluster
            .request(
                bus::kick_subject(self.edge_id()),
                inbox,
                BusKind::Kick,
                bus::encode(&order),
            )
            .await
        {
            tracing::warn!(error = %e, "disconnect not sent to the other edges");
            return Some((0, others));
        }
        let deadline = tokio::time::Instant::now() + WHO_DEADLINE;
        let mut heard = std::collections::HashSet::new();
        let mut closed = 0usize;
        while heard.len() < others {
            let answer = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                a = self.next::<KickAnswer>(&mut answers, BusKind::Kick) => match a { Some(a) => a, None => break },
            };
            if self.cluster.live().contains(&answer.from) && heard.insert(answer.from) {
                closed += answer.connections as usize;
            }
        }
        Some((closed, others - heard.len()))
    }

    /// Other edges' disconnects: this edge's sessions of that user close.
    async fn hear_kick(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard {
            body: order,
            from,
            reply,
        }) = self.next_from_edge::<KickOrder>(&mut sub, BusKind::Kick).await
        {
            if from == self.edge_id() {
                continue;
            }
            if !self.same_sender(BusKind::Kick, &from, &order.from) {
                continue;
            }
            if !self.knows(&order.tenant) {
                self.cluster.refused(BusKind::Kick, "a tenant this edge does not know");
                continue;
            }
            let reason = crate::untrusted(&order.reason, 200);
            let n = self.kicks.kick(&crate::rate_key(&order.tenant, &order.user), &reason);
            if n > 0 {
                tracing::info!(tenant = %crate::untrusted(&order.tenant, 64), from = %crate::untrusted(&order.from, 64),
                    connections = n, "sessions closed by a disconnect from another edge");
            }
            if let Some(reply) = reply {
                let answer = KickAnswer {
                    from: self.edge_id().to_owned(),
                    connections: n.min(u32::MAX as usize) as u32,
                };
                let _ = self.cluster.publish(reply, BusKind::Kick, bus::encode(&answer)).await;
            }
        }
    }

    /// Asks `origin` for the messages of `key` it delivered after `after`
    /// (a relay that missed bus batches). None if it does not answer in
    /// time or answers nonsense.
    pub async fn resync(&self, origin: &str, key: &RoomKey, after: u64) -> Option<Resynced> {
        let ask = Resync {
            tenant: key.tenant.to_string(),
            room: key.name.to_string(),
            after_seq: after,
        };
        let subject = bus::resync_subject(origin, self.edge_id());
        match self
            .cluster
            .ask(subject, BusKind::Resync, bus::encode(&ask), RESYNC_DEADLINE)
            .await
        {
            Ok(bytes) => match bus::decode::<Resynced>(&bytes, bus::MAX_ROOM_BUS_BYTES) {
                Ok(r) if r.origin == origin => Some(r),
                Ok(_) => {
                    self.cluster.malformed(BusKind::Resync, &"an answer from another edge");
                    None
                }
                Err(e) => {
                    self.cluster.malformed(BusKind::Resync, &e);
                    None
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, room = %key, "resync unanswered");
                None
            }
        }
    }

    /// Relays' requests for what the bus lost, answered from the room's
    /// ring, one task each (a room answers between its ticks).
    async fn hear_resync(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard { body: ask, reply, .. }) = self.next_from_edge::<Resync>(&mut sub, BusKind::Resync).await
        {
            let Some(reply) = reply else {
                self.cluster
                    .malformed(BusKind::Resync, &"a request without a reply subject");
                continue;
            };
            if let Err(why) = self.check_room(&ask.tenant, &ask.room) {
                self.cluster.refused(BusKind::Resync, &why);
                continue;
            }
            let Ok(permit) = Arc::clone(&self.resyncs_in_flight).try_acquire_owned() else {
                metrics::counter!("throng_resync_refused_total").increment(1);
                continue;
            };
            let Some(rooms) = self.rooms.upgrade() else {
                return;
            };
            let links = Arc::clone(&self);
            self.tasks.spawn(async move {
                let key = RoomKey {
                    tenant: Arc::from(ask.tenant.as_str()),
                    name: Arc::from(ask.room.as_str()),
                };
                let Some((mut messages, mut complete)) = rooms.ring_since(&key, ask.after_seq, RESYNC_DEADLINE).await
                else {
                    return;
                };
                // The oldest go first when they would not fit one bus message.
                let mut size: usize = messages.iter().map(|m| m.body.len() + m.sender.len() + 16).sum();
                while size > bus::FORWARD_SPLIT_BYTES && !messages.is_empty() {
                    let m = messages.remove(0);
                    size -= m.body.len() + m.sender.len() + 16;
                    complete = false;
                }
                let answer = Resynced {
                    origin: links.edge_id().to_owned(),
                    messages,
                    complete,
                };
                let _ = links
                    .cluster
                    .publish(reply, BusKind::Resync, bus::encode(&answer))
                    .await;
                drop(permit);
            });
        }
    }

    /// Other edges' "who is online": answered from this edge's users.
    async fn hear_who(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard {
            body: query,
            from,
            reply,
        }) = self.next_from_edge::<WhoQuery>(&mut sub, BusKind::Who).await
        {
            if from == self.edge_id() {
                continue;
            }
            if !self.same_sender(BusKind::Who, &from, &query.from) {
                continue;
            }
            if !self.knows(&query.tenant) {
                self.cluster.refused(BusKind::Who, "a tenant this edge does not know");
                continue;
            }
            let Some(reply) = reply else {
                self.cluster.malformed(BusKind::Who, &"a query without a reply subject");
                continue;
            };
            if query.users.len() > crate::presence::MAX_QUERY_USERS {
                self.cluster.malformed(BusKind::Who, &"a query of too many users");
                continue;
            }
            let online = self.presence.query(&query.tenant, &query.users);
            let answer = WhoAnswer {
                from: self.edge_id().to_owned(),
                online: bus::pack_bits(&online),
            };
            let _ = self.cluster.publish(reply, BusKind::Who, bus::encode(&answer)).await;
        }
    }
}

/// A bus message from another edge.
struct Heard<T> {
    body: T,
    /// The sending edge: the subject's last token.
    from: String,
    reply: Option<String>,
}

/// A region's viewers per (tenant, room).
type RoomSums = HashMap<(String, String), u64>;

/// The aggregator's sums: per origin, the oldest count summed in and the
/// region's total of each of its rooms (with a 0 for a room told before
/// and not counted now). Forgets reports of edges not live or older than
/// `stale`.
fn aggregate(state: &mut State, live: &LiveSet, stale: Duration) -> HashMap<String, (u64, Vec<RoomCount>)> {
    state
        .reports
        .retain(|edge, r| live.contains(edge) && r.heard.elapsed() < stale);
    let mut sums: HashMap<String, (u64, RoomSums)> = HashMap::new();
    for report in state.reports.values() {
        for r in &report.rooms {
            let (at_ms, rooms) = sums.entry(r.origin.clone()).or_insert((u64::MAX, HashMap::new()));
            *at_ms = (*at_ms).min(report.at_ms);
            let n = rooms.entry((r.tenant.clone(), r.room.clone())).or_insert(0);
            *n = n.saturating_add(r.viewers);
        }
    }
    let now = crate::unix_now_ms();
    for (origin, told) in std::mem::take(&mut state.told) {
        if !live.contains(&origin) {
            continue;
        }
        let (_, rooms) = sums.entry(origin).or_insert((now, HashMap::new()));
        for room in told {
            rooms.entry(room).or_insert(0);
        }
    }
    let mut out = HashMap::new();
    for (origin, (at_ms, rooms)) in sums {
        let told: Vec<(String, String)> = rooms.iter().filter(|(_, n)| **n > 0).map(|(k, _)| k.clone()).collect();
        if !told.is_empty() {
            state.told.insert(origin.clone(), told);
        }
        let rooms = rooms
            .into_iter()
            .map(|((tenant, room), viewers)| RoomCount { tenant, room, viewers })
            .collect();
        out.insert(origin, (at_ms, rooms));
    }
    out
}

/// Cuts an edge's counts into bus messages that fit.
fn split_counts(counts: EdgeCounts) -> Vec<EdgeCounts> {
    let mut out = Vec::new();
    let mut part = Vec::new();
    let mut size = 0;
    for r in counts.rooms {
        let s = r.origin.len() + r.tenant.len() + r.room.len() + 16;
        if size + s > bus::FORWARD_SPLIT_BYTES && !part.is_empty() {
            out.push(std::mem::take(&mut part));
            size = 0;
        }
        size += s;
        part.push(r);
    }
    if !part.is_empty() || out.is_empty() {
        out.push(part);
    }
    out.into_iter()
        .map(|rooms| EdgeCounts {
            from: counts.from.clone(),
            region: counts.region.clone(),
            at_ms: counts.at_ms,
            rooms,
        })
        .collect()
}

fn check_edge(edge: &str) -> Result<(), String> {
    crate::config::check_bus_token(edge).map_err(|e| format!("edge id: {e}"))
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
            .publish(subject.clone(), BusKind::Replies, bus::encode(&Replies { items }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::LiveEdge;

    fn live(ids: &[&str]) -> LiveSet {
        LiveSet {
            edges: ids
                .iter()
                .map(|id| LiveEdge {
                    edge_id: (*id).to_owned(),
                    region: "eu".into(),
                    quic: "127.0.0.1:1".into(),
                    incarnation: 1,
                })
                .collect(),
        }
    }

    fn report(state: &mut State, edge: &str, at_ms: u64, rooms: &[(&str, &str, u64)]) {
        state.reports.insert(
            edge.to_owned(),
            Report {
                heard: Instant::now(),
                at_ms,
                rooms: rooms
                    .iter()
                    .map(|(origin, room, viewers)| OriginCount {
                        origin: (*origin).to_owned(),
                        tenant: "acme".into(),
                        room: (*room).to_owned(),
                        viewers: *viewers,
                    })
                    .collect(),
            },
        );
    }

    fn sorted(mut rooms: Vec<RoomCount>) -> Vec<(String, u64)> {
        rooms.sort_by(|a, b| a.room.cmp(&b.room));
        rooms.into_iter().map(|r| (r.room, r.viewers)).collect()
    }

    #[test]
    fn the_aggregator_sums_per_origin_and_says_once_when_a_room_empties() {
        let live = live(&["a", "b", "c", "o1", "o2"]);
        let mut state = State::default();
        report(&mut state, "a", 100, &[("o1", "x", 3), ("o2", "y", 1)]);
        report(&mut state, "b", 90, &[("o1", "x", 4), ("o1", "z", 2)]);
        let mut out = aggregate(&mut state, &live, Duration::from_secs(60));
        assert_eq!(out.len(), 2, "one message per origin");
        let (at, o1) = out.remove("o1").unwrap();
        assert_eq!(at, 90, "the oldest count summed in");
        assert_eq!(sorted(o1), vec![("x".into(), 7), ("z".into(), 2)]);
        assert_eq!(sorted(out.remove("o2").unwrap().1), vec![("y".into(), 1)]);

        // b's viewers of z left, and a stopped relaying anything.
        report(&mut state, "b", 200, &[("o1", "x", 4)]);
        report(&mut state, "a", 200, &[]);
        let mut out = aggregate(&mut state, &live, Duration::from_secs(60));
        assert_eq!(
            sorted(out.remove("o1").unwrap().1),
            vec![("x".into(), 4), ("z".into(), 0)]
        );
        assert_eq!(sorted(out.remove("o2").unwrap().1), vec![("y".into(), 0)]);
        assert!(out.is_empty());

        // Said once: the next round names only what has viewers.
        let mut out = aggregate(&mut state, &live, Duration::from_secs(60));
        assert_eq!(sorted(out.remove("o1").unwrap().1), vec![("x".into(), 4)]);
        assert!(out.is_empty());
    }

    #[test]
    fn counts_of_a_dead_or_silent_edge_are_dropped() {
        let mut state = State::default();
        report(&mut state, "a", 1, &[("o", "x", 3)]);
        report(&mut state, "gone", 1, &[("o", "x", 5)]);
        let mut out = aggregate(&mut state, &live(&["a", "o"]), Duration::from_secs(60));
        assert_eq!(sorted(out.remove("o").unwrap().1), vec![("x".into(), 3)]);
        let out = aggregate(&mut state, &live(&["a", "o"]), Duration::ZERO);
        // a fell silent: its room is told once more, with nobody in it.
        assert_eq!(sorted(out.get("o").unwrap().1.clone()), vec![("x".into(), 0)]);
        assert!(state.reports.is_empty());
    }

    #[test]
    fn big_counts_are_cut_into_messages_that_fit() {
        let rooms: Vec<OriginCount> = (0..40_000)
            .map(|i| OriginCount {
                origin: "origin-edge".into(),
                tenant: "acme".into(),
                room: format!("room-{i:08}"),
                viewers: 1,
            })
            .collect();
        let parts = split_counts(EdgeCounts {
            from: "a".into(),
            region: "eu".into(),
            at_ms: 5,
            rooms,
        });
        assert!(parts.len() > 1);
        assert_eq!(parts.iter().map(|p| p.rooms.len()).sum::<usize>(), 40_000);
        for p in &parts {
            assert!(bus::encode(p).len() <= bus::MAX_ROOM_BUS_BYTES);
            assert_eq!(p.at_ms, 5, "one moment: the aggregator joins the parts");
        }
        let empty = split_counts(EdgeCounts {
            from: "a".into(),
            region: "eu".into(),
            at_ms: 5,
            rooms: Vec::new(),
        });
        assert_eq!(empty.len(), 1, "an empty count is still said once");
    }
}
