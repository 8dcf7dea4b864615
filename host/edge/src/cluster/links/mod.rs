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
//! One conversation per file: `forward.rs` (forwarding and ingress),
//! `interest.rs`, `presence.rs`, `who.rs`, `kick.rs` (disconnects) and
//! `resync.rs`; this file holds what they share: the state, the
//! subscriptions started together, and reading the bus.
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
    Reply, Resync, Resynced, RoomCount, RoomInterest, WhoAnswer, WhoQuery,
};
use super::{BusKind, Cluster, ClusterError, LiveSet};
use crate::presence::Presence;
use crate::room::{Inbound, Peer, ReplyTx, RoomError, RoomKey, Rooms};

mod forward;
mod interest;
mod kick;
mod presence;
mod resync;
mod who;

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

    /// Asks every other live edge one question on `subject` and hands
    /// each live edge's first answer to `take`, until `others` answered or
    /// [`WHO_DEADLINE`] passed. Anyone may answer an inbox: an answer
    /// counts once per live edge, by `from`. Returns how many edges
    /// answered; an error when the question could not be asked.
    async fn ask_every_edge<A: serde::de::DeserializeOwned>(
        &self,
        (subject, kind): (String, BusKind),
        question: Vec<u8>,
        others: usize,
        from: impl Fn(&A) -> &str,
        mut take: impl FnMut(A),
    ) -> Result<usize, ClusterError> {
        let inbox = self.cluster.inbox();
        let mut answers = self.cluster.subscribe(inbox.clone()).await?;
        self.cluster.request(subject, inbox, kind, question).await?;
        let deadline = tokio::time::Instant::now() + WHO_DEADLINE;
        let mut heard = std::collections::HashSet::new();
        while heard.len() < others {
            let answer = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                a = self.next::<A>(&mut answers, kind) => match a { Some(a) => a, None => break },
            };
            let edge = from(&answer);
            if self.cluster.live().contains(edge) && !heard.contains(edge) {
                heard.insert(edge.to_owned());
                take(answer);
            }
        }
        Ok(heard.len())
    }

    /// The next message on `sub` from a live (or lately live) edge, decoded
    /// as `T`, with its sender (the subject's last token) and reply subject.
    /// What every conversation refuses is counted and skipped here: a body
    /// that does not decode, a sender this edge does not know, a body
    /// naming another sender than its subject, a tenant this edge does not
    /// know; and this edge's own messages where `T` is only for others.
    async fn next_from_edge<T: FromAPeer>(&self, sub: &mut async_nats::Subscriber, kind: BusKind) -> Option<Heard<T>> {
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
            if !T::FROM_ITSELF && from == self.edge_id() {
                continue;
            }
            let body: T = match bus::decode(&message.payload, bus::MAX_ROOM_BUS_BYTES) {
                Ok(body) => body,
                Err(e) => {
                    self.cluster.malformed(kind, &e);
                    continue;
                }
            };
            if body.sender().is_some_and(|named| named != from) {
                self.cluster.refused(kind, "a body naming another sender");
                continue;
            }
            if body.tenant().is_some_and(|t| !self.knows(t)) {
                self.cluster.refused(kind, "a tenant this edge does not know");
                continue;
            }
            return Some(Heard {
                body,
                from: from.to_owned(),
                reply: message.reply.map(|r| r.to_string()),
            });
        }
    }
}

/// A bus message one edge sends others, as [`Links::next_from_edge`]
/// checks it.
trait FromAPeer: serde::de::DeserializeOwned {
    /// Whether this edge takes its own (an aggregator counts itself; a
    /// disconnect it sent was already carried out here).
    const FROM_ITSELF: bool = true;
    /// The sender the body names, which must be the subject's.
    fn sender(&self) -> Option<&str> {
        None
    }
    /// The one tenant the whole body is about, which this edge must know.
    fn tenant(&self) -> Option<&str> {
        None
    }
}

impl FromAPeer for Forward {
    fn sender(&self) -> Option<&str> {
        Some(&self.from)
    }
}
impl FromAPeer for Replies {}
impl FromAPeer for Interest {
    fn sender(&self) -> Option<&str> {
        Some(&self.from)
    }
}
impl FromAPeer for EdgeCounts {
    fn sender(&self) -> Option<&str> {
        Some(&self.from)
    }
}
impl FromAPeer for RegionCounts {
    fn sender(&self) -> Option<&str> {
        Some(&self.from)
    }
}
impl FromAPeer for Resync {}
impl FromAPeer for KickOrder {
    const FROM_ITSELF: bool = false;
    fn sender(&self) -> Option<&str> {
        Some(&self.from)
    }
    fn tenant(&self) -> Option<&str> {
        Some(&self.tenant)
    }
}
impl FromAPeer for WhoQuery {
    const FROM_ITSELF: bool = false;
    fn sender(&self) -> Option<&str> {
        Some(&self.from)
    }
    fn tenant(&self) -> Option<&str> {
        Some(&self.tenant)
    }
}

/// A bus message from another edge.
struct Heard<T> {
    body: T,
    /// The sending edge: the subject's last token.
    from: String,
    reply: Option<String>,
}

fn check_edge(edge: &str) -> Result<(), String> {
    crate::config::check_bus_token(edge).map_err(|e| format!("edge id: {e}"))
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
