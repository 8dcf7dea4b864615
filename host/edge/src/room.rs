//! Rooms: one actor task per room, ticking.
//!
//! Connections talk to a room through its [`RoomHandle`] (join, leave, send).
//! Each tick the room asks its [`Policy`] what goes out, acks every sender,
//! builds one [`Batch`], encodes it **once**, and pushes the same bytes into
//! every member's [`ViewerSlot`]. A connection task drains each slot into
//! that room's QUIC stream for that viewer; a viewer that cannot keep up loses
//! its oldest batches (counted as `missed`) instead of stalling the room.
//!
//! Rooms are keyed by tenant and name ([`RoomKey`]), so tenant A's `lobby`
//! is not tenant B's. An empty room lingers (keeping its recent messages for
//! reconnects), then retires; [`Rooms::join`] retries if it raced a retiring
//! room.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use throng_wire::{Batch, Counters, EdgeFrame, ErrorCode, Kind, Message, encode};

pub(crate) fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
use governor::DefaultKeyedRateLimiter;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::config::RoomsConfig;
use crate::filter::{OnFailure, TenantFilter};
use crate::log::GroupLog;
use crate::modules::{ModuleSet, ResolvedPolicy};
use crate::policy::{InboundBatch, NativePolicy, RoomPolicy, WasmPolicy, tick_ms, wit_kind};
use crate::wasm::WasmRuntime;
use crate::wasm::bindings::{self, RoomStats, Verdict};
use crate::workers::Pools;

/// Where a room sends acks and rejections for a sender's connection.
///
/// Bounded: a client that does not read its control stream (grants no flow
/// control credit) while it keeps asking (pings, sends) would otherwise
/// grow the edge's memory without end. When the queue is full the reply is
/// dropped and the connection is flagged as not reading; its task closes it
/// with `TooSlow`.
///
/// Frames travel boxed: a tokio channel allocates room for 32 values at a
/// time, and 32 unboxed frames would be 4 KiB on every connection, most of
/// which never sends anything.
#[derive(Clone)]
pub struct ReplyTx {
    tx: mpsc::Sender<Box<EdgeFrame>>,
    /// Runs once when a reply does not fit: the connection closes the
    /// client with `TooSlow`.
    on_overflow: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for ReplyTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyTx").finish_non_exhaustive()
    }
}

impl ReplyTx {
    /// A queue of `capacity` replies; `on_overflow` runs when one did not fit.
    pub fn channel(
        capacity: usize,
        on_overflow: impl Fn() + Send + Sync + 'static,
    ) -> (Self, mpsc::Receiver<Box<EdgeFrame>>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Self {
                tx,
                on_overflow: Arc::new(on_overflow),
            },
            rx,
        )
    }

    /// Queues `frame` for the control stream; false once the connection's
    /// writer is gone or the client stopped reading.
    pub fn send(&self, frame: EdgeFrame) -> bool {
        match self.tx.try_send(Box::new(frame)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("throng_reply_queue_overflows_total").increment(1);
                (self.on_overflow)();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// A room's identity on this edge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoomKey {
    pub tenant: Arc<str>,
    pub name: Arc<str>,
}

impl std::fmt::Display for RoomKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.tenant, self.name)
    }
}

/// A message waiting for the room's next tick.
#[derive(Debug)]
pub struct Inbound {
    pub sender: Arc<str>,
    pub kind: Kind,
    pub body: Vec<u8>,
    pub client_msg_id: u64,
    pub reply: ReplyTx,
    /// When the edge received it, milliseconds since the Unix epoch.
    pub received_ms: u64,
}

/// Longest filter rejection reason passed on to a sender.
pub(crate) const MAX_REASON: usize = 256;

/// What a joiner learns: who is online, and what was said recently.
#[derive(Debug)]
pub struct JoinInfo {
    pub online: u64,
    /// Goes in the `Joined` frame.
    pub recent: Vec<Message>,
    /// Group rooms: the committed sequence range `(from, to)` the joiner
    /// missed, to read from the log and send before anything live.
    pub catch_up: Option<(u64, u64)>,
    /// Where this viewer's writer should run: the room's class pool (the
    /// slot says when the room moves to another).
    pub writer: tokio::runtime::Handle,
    /// The room's highest sequence number so far.
    pub last_seq: u64,
    /// Group rooms: missed messages not yet committed, sent after the
    /// catch-up and before anything live.
    pub tail: Vec<Message>,
    /// Group rooms: the highest sequence the room has handed out, kept
    /// current, so a `Seen` beyond it can be refused.
    pub head: Option<Arc<AtomicU64>>,
}

/// One encoded batch frame, shared by every member it goes to.
#[derive(Debug)]
pub struct Delivery {
    pub frame: Bytes,
    /// Kept so a lagging viewer's copy can be re-encoded with its `missed` count.
    pub batch: Batch,
}

/// A viewer's bounded outbound queue for one room.
///
/// The room pushes every batch without waiting; a viewer that cannot keep up
/// loses its oldest batches (counted as `missed`, reported in the next batch
/// it gets), so it never stalls the room or holds more than `capacity`
/// batches. A viewer still dropping batches `max_behind` after it started
/// is evicted: `on_evict` runs (the connection closes it with `TooSlow`),
/// from the pushing side, because the writer may be stuck in a write the
/// viewer never reads.
pub struct ViewerSlot {
    state: Mutex<SlotState>,
    notify: Notify,
    capacity: usize,
    max_behind: Duration,
    on_evict: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for ViewerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewerSlot")
            .field("capacity", &self.capacity)
            .field("max_behind", &self.max_behind)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct SlotState {
    queue: VecDeque<Arc<Delivery>>,
    missed: u64,
    closed: bool,
    /// Since when this viewer has been losing batches without catching up.
    behind_since: Option<Instant>,
    /// The room moved to another class's pool; the writer should follow.
    moved_to: Option<tokio::runtime::Handle>,
    /// Behind for longer than `max_behind`: the viewer is to be disconnected.
    evicted: bool,
}

/// What a viewer's writer does next.
#[derive(Debug)]
pub enum Next {
    /// Write these, the first preceded by `missed` lost batches.
    Batches(Vec<Arc<Delivery>>, u64),
    /// Continue on this pool (the room changed size class).
    Move(tokio::runtime::Handle),
    /// Too slow for too long: disconnect the viewer.
    Evicted,
    /// Closed and drained.
    Done,
}

impl ViewerSlot {
    pub fn new(capacity: usize, max_behind: Duration, on_evict: impl Fn() + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(SlotState::default()),
            notify: Notify::new(),
            capacity: capacity.max(1),
            max_behind,
            on_evict: Box::new(on_evict),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A panic while holding this lock leaves only a queue of Arcs behind,
        // which is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a batch; if the queue is full the oldest is dropped and counted.
    pub fn push(&self, delivery: Arc<Delivery>) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        if s.queue.len() >= self.capacity {
            s.queue.pop_front();
            s.missed += 1;
            metrics::counter!("throng_viewer_batches_missed_total").increment(1);
            let since = *s.behind_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.max_behind {
                s.closed = true;
                s.evicted = true;
                s.queue.clear();
                drop(s);
                metrics::counter!("throng_viewers_evicted_total").increment(1);
                self.notify.notify_one();
                (self.on_evict)();
                return;
            }
        }
        s.queue.push_back(delivery);
        drop(s);
        self.notify.notify_one();
    }

    /// No more batches: the writer drains what is queued and finishes.
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }

    /// Asks the writer to continue on `pool`, the room's new class pool.
    fn rehome(&self, pool: tokio::runtime::Handle) {
        self.lock().moved_to = Some(pool);
        self.notify.notify_one();
    }

    pub fn is_evicted(&self) -> bool {
        self.lock().evicted
    }

    /// Waits for queued batches, a move, or the end.
    pub async fn next(&self) -> Next {
        loop {
            {
                let mut s = self.lock();
                if s.evicted {
                    return Next::Evicted;
                }
                if let Some(pool) = s.moved_to.take() {
                    return Next::Move(pool);
                }
                if !s.queue.is_empty() {
                    let missed = std::mem::take(&mut s.missed);
                    if missed == 0 {
                        // Nothing lost since the last drain: caught up.
                        s.behind_since = None;
                    }
                    return Next::Batches(s.queue.drain(..).collect(), missed);
                }
                if s.closed {
                    return Next::Done;
                }
            }
            self.notify.notified().await;
        }
    }
}

/// Why a room operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("the room's inbox is full")]
    Overloaded,
    /// Creating the room would pass a limit; the text says which.
    #[error("{0}")]
    Limit(&'static str),
    #[error("the edge is shutting down")]
    ShuttingDown,
    /// A group room could not read where its log ends; the next join
    /// tries again.
    #[error("the room's log cannot be read now; try again")]
    Unavailable,
}

enum Command {
    Join {
        member: u64,
        slot: Arc<ViewerSlot>,
        resume_from: Option<u64>,
        reply: oneshot::Sender<Result<JoinInfo, RoomError>>,
    },
    Leave {
        member: u64,
    },
    Send(Inbound),
}

/// A connection's way to one room it has joined.
#[derive(Debug, Clone)]
pub struct RoomHandle {
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Join { member, .. } => write!(f, "Join({member})"),
            Command::Leave { member } => write!(f, "Leave({member})"),
            Command::Send(m) => write!(f, "Send({})", m.client_msg_id),
        }
    }
}

impl RoomHandle {
    /// Queues a message for the next tick without waiting.
    pub fn send(&self, inbound: Inbound) -> Result<(), (Inbound, RoomError)> {
        self.tx.try_send(Command::Send(inbound)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(Command::Send(m)) => (m, RoomError::Overloaded),
            mpsc::error::TrySendError::Closed(Command::Send(m)) => (m, RoomError::ShuttingDown),
            // try_send hands back the command it was given, which was a Send.
            _ => unreachable!("try_send returned a different command"),
        })
    }

    /// Leaves the room; waits for inbox space so a leave is never lost.
    pub async fn leave(&self, member: u64) {
        let _ = self.tx.send(Command::Leave { member }).await;
    }
}

/// Every room on this edge.
#[derive(Debug)]
pub struct Rooms {
    map: Mutex<RoomMap>,
    /// New rooms per user (tenant and user id).
    creations: DefaultKeyedRateLimiter<String>,
    /// Rooms alive on this edge at most: what the Wasm instance pool holds
    /// besides the tenants' filters.
    max_rooms: usize,
    max_rooms_per_tenant: usize,
    next_id: AtomicU64,
    config: RoomsConfig,
    max_frame: u32,
    max_body: u32,
    runtime: Arc<WasmRuntime>,
    modules: watch::Receiver<Arc<ModuleSet>>,
    log: GroupLog,
    group_rooms: Vec<wildmatch::WildMatch>,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
    pools: Pools,
}

/// The live rooms, and how many each tenant has.
#[derive(Debug, Default)]
struct RoomMap {
    rooms: HashMap<RoomKey, (u64, mpsc::Sender<Command>)>,
    per_tenant: HashMap<Arc<str>, usize>,
}

impl RoomMap {
    /// Removes room `id` under `key` (not a newer room of the same name).
    fn remove(&mut self, key: &RoomKey, id: u64) {
        if self.rooms.get(key).is_some_and(|(i, _)| *i == id) {
            self.rooms.remove(key);
            if let Some(n) = self.per_tenant.get_mut(&key.tenant) {
                *n -= 1;
                if *n == 0 {
                    self.per_tenant.remove(&key.tenant);
                }
            }
        }
    }
}

/// Who asks for a room that may not exist yet, and what they may create.
#[derive(Debug, Clone, Copy)]
pub struct Creator<'a> {
    /// The user's rate key (tenant and user id).
    pub user: &'a str,
    /// Whether the connection may create another room (its own limit).
    pub connection_may_create: bool,
}

/// What every room on an edge shares.
#[derive(Debug)]
pub struct RoomsSetup {
    pub config: RoomsConfig,
    pub max_frame: u32,
    pub max_body: u32,
    pub runtime: Arc<WasmRuntime>,
    pub modules: watch::Receiver<Arc<ModuleSet>>,
    pub log: GroupLog,
    pub shutdown: CancellationToken,
    /// Each size class's threads.
    pub pools: Pools,
    /// Rooms alive at most (see [`Rooms`]).
    pub max_rooms: usize,
    pub max_rooms_per_tenant: usize,
    /// New rooms per user: sustained per second, and burst.
    pub room_create_rate_per_sec: u32,
    pub room_create_burst: u32,
}

impl Rooms {
    pub fn new(setup: RoomsSetup) -> Arc<Self> {
        let quota = governor::Quota::per_second(crate::nonzero(setup.room_create_rate_per_sec))
            .allow_burst(crate::nonzero(setup.room_create_burst));
        Arc::new(Self {
            map: Mutex::new(RoomMap::default()),
            creations: governor::RateLimiter::keyed(quota),
            max_rooms: setup.max_rooms.max(1),
            max_rooms_per_tenant: setup.max_rooms_per_tenant.max(1),
            next_id: AtomicU64::new(1),
            config: setup.config.clone(),
            max_frame: setup.max_frame,
            max_body: setup.max_body,
            runtime: setup.runtime,
            modules: setup.modules,
            group_rooms: setup
                .config
                .group_rooms
                .iter()
                .map(|p| wildmatch::WildMatch::new(p))
                .collect(),
            log: setup.log,
            shutdown: setup.shutdown,
            tasks: tokio_util::task::TaskTracker::new(),
            pools: setup.pools,
        })
    }

    fn map(&self) -> MutexGuard<'_, RoomMap> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The group log, for catch-up reads.
    pub fn log(&self) -> &GroupLog {
        &self.log
    }

    /// Whether `room` is a group room (by `rooms.group_rooms`).
    pub fn is_group(&self, room: &str) -> bool {
        self.group_rooms.iter().any(|p| p.matches(room))
    }

    /// Rooms currently alive on this edge.
    pub fn len(&self) -> usize {
        self.map().rooms.len()
    }

    /// Forgets rate-limit state of users whose bucket is full again.
    pub fn forget_quiet_creators(&self) {
        self.creations.retain_recent();
        self.creations.shrink_to_fit();
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The room's inbox, making the room if it is not alive and `creator`
    /// may make it. Room limits are checked here, under the map lock, so
    /// concurrent joins cannot pass them together.
    fn handle(
        self: &Arc<Self>,
        key: &RoomKey,
        creator: Creator<'_>,
    ) -> Result<(mpsc::Sender<Command>, bool), RoomError> {
        if self.shutdown.is_cancelled() {
            return Err(RoomError::ShuttingDown);
        }
        let mut map = self.map();
        if let Some((_, tx)) = map.rooms.get(key) {
            return Ok((tx.clone(), false));
        }
        let refusal = if map.rooms.len() >= self.max_rooms {
            Some(("the edge has no room for another room", "edge"))
        } else if map.per_tenant.get(&key.tenant).copied().unwrap_or(0) >= self.max_rooms_per_tenant {
            Some(("the tenant has as many rooms on this edge as it may", "tenant"))
        } else if !creator.connection_may_create {
            Some(("this connection has created as many rooms as it may", "connection"))
        } else if self.creations.check_key(&creator.user.to_owned()).is_err() {
            Some(("creating new rooms too fast; try again shortly", "user"))
        } else {
            None
        };
        if let Some((why, limit)) = refusal {
            metrics::counter!("throng_room_creations_refused_total", "limit" => limit).increment(1);
            return Err(RoomError::Limit(why));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.config.inbox_capacity);
        map.rooms.insert(key.clone(), (id, tx.clone()));
        *map.per_tenant.entry(Arc::clone(&key.tenant)).or_default() += 1;
        drop(map);
        let room = Room::new(key.clone(), id, self);
        self.spawn(room, rx);
        metrics::gauge!("throng_rooms").increment(1.0);
        Ok((tx, true))
    }

    /// Runs `room` on its class's pool; again on another pool when it
    /// changes class.
    fn spawn(self: &Arc<Self>, room: Room, rx: mpsc::Receiver<Command>) {
        let rooms = Arc::clone(self);
        let pool = room.worker.clone();
        let run = async move {
            if let Some((room, rx)) = room.run(rx, &rooms).await {
                rooms.spawn(room, rx);
            }
        };
        pool.spawn(self.tasks.track_future(run));
    }

    /// Joins `member` to the room, creating the room if needed and
    /// `creator` may. The flag says whether this join created it.
    pub async fn join(
        self: &Arc<Self>,
        key: &RoomKey,
        member: u64,
        slot: Arc<ViewerSlot>,
        resume_from: Option<u64>,
        creator: Creator<'_>,
    ) -> Result<(RoomHandle, JoinInfo, bool), RoomError> {
        // A room retiring between our lookup and our command drops the reply;
        // the next lookup then makes a fresh room. Bounded, because a retiring
        // room leaves the map before it stops reading.
        for _ in 0..16 {
            let (tx, created) = self.handle(key, creator)?;
            let (reply, answer) = oneshot::channel();
            let cmd = Command::Join {
                member,
                slot: Arc::clone(&slot),
                resume_from,
                reply,
            };
            if tx.send(cmd).await.is_err() {
                continue;
            }
            match answer.await {
                Ok(Ok(info)) => return Ok((RoomHandle { tx }, info, created)),
                Ok(Err(e)) => return Err(e),
                Err(_) => {}
            }
        }
        Err(RoomError::ShuttingDown)
    }

    /// Waits for every room task to stop after shutdown was signalled.
    pub async fn drained(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Removes a room that could not start, whatever is queued for it: the
    /// next join makes a fresh one, which tries again.
    fn forget(&self, key: &RoomKey, id: u64) {
        self.map().remove(key, id);
    }

    /// Removes a retiring room if nothing is queued for it, under the map
    /// lock, so no joiner can find it afterwards.
    fn retire(&self, key: &RoomKey, id: u64, rx: &mpsc::Receiver<Command>) -> bool {
        let mut map = self.map();
        if !rx.is_empty() {
            return false;
        }
        map.remove(key, id);
        true
    }
}

/// A tick's batches on their way to a snapshot of the members, a step at a
/// time. Members who join meanwhile got these messages in their join
/// (`recent` / catch-up); members who leave have closed slots.
struct PacedPush {
    deliveries: Vec<Arc<Delivery>>,
    slots: Vec<Arc<ViewerSlot>>,
    /// Viewers per step.
    chunk: usize,
    gap: Duration,
    next: usize,
    /// When the next step is due.
    due: Instant,
}

impl PacedPush {
    /// Steps of about `chunk` viewers, evenly over `spread`, at least 1 ms
    /// apart (the timer's grain): bigger steps when there would be more of
    /// them than milliseconds in the spread.
    fn new(deliveries: Vec<Arc<Delivery>>, slots: Vec<Arc<ViewerSlot>>, chunk: usize, spread: Duration) -> Self {
        let steps = slots
            .len()
            .div_ceil(chunk.max(1))
            .clamp(1, spread.as_millis().max(1) as usize);
        Self {
            chunk: slots.len().div_ceil(steps).max(1),
            gap: spread / steps as u32,
            deliveries,
            slots,
            next: 0,
            due: Instant::now(),
        }
    }

    /// Pushes one step; true when every viewer has the batches.
    fn step(&mut self) -> bool {
        let end = (self.next + self.chunk).min(self.slots.len());
        for slot in &self.slots[self.next..end] {
            for delivery in &self.deliveries {
                slot.push(Arc::clone(delivery));
            }
        }
        self.next = end;
        self.due += self.gap;
        self.next >= self.slots.len()
    }

    /// Pushes the rest at once.
    fn finish(mut self) {
        self.chunk = self.slots.len();
        self.step();
    }
}

/// Room time: whole ticks since the room started, counted from the wall
/// clock, so that ticks a busy machine ran late still count, and whole, so
/// that a second of room time is exactly a second's worth of tick numbers
/// (jitter in when a tick's plan runs must not push a message out of, or
/// into, a policy's one-second window). Batches carry this tick number, so
/// a viewer can check the cap by tick numbers too.
#[derive(Debug)]
struct RoomClock {
    origin: Instant,
    tick: Duration,
    /// The tick number at `origin`.
    base: u64,
    /// The tick number last reported to the policy.
    told: u64,
}

impl RoomClock {
    fn new(tick: Duration) -> Self {
        Self {
            origin: Instant::now(),
            tick: tick.max(Duration::from_millis(1)),
            base: 0,
            told: 0,
        }
    }

    /// The current tick number (rounded to the nearest tick).
    fn now(&self) -> u64 {
        let tick = self.tick.as_micros();
        let ticks = (self.origin.elapsed().as_micros() + tick / 2) / tick;
        self.base + u64::try_from(ticks).unwrap_or(u64::MAX / 2)
    }

    /// Room time up to tick `now` since the previous call, in milliseconds.
    fn elapsed_ms(&mut self, now: u64) -> u32 {
        let ticks = now.saturating_sub(self.told);
        self.told = self.told.max(now);
        u32::try_from(u128::from(ticks) * self.tick.as_millis()).unwrap_or(u32::MAX)
    }

    /// The room's tick changed (it moved to another size class): count on
    /// from here in the new tick.
    fn retick(&mut self, tick: Duration) {
        self.base = self.now();
        self.told = self.told.min(self.base);
        self.origin = Instant::now();
        self.tick = tick.max(Duration::from_millis(1));
    }
}

/// A group room's log state.
struct GroupState {
    log: GroupLog,
    /// Highest sequence number on disk (raised by the log writer).
    committed: Arc<AtomicU64>,
    /// Appended, not yet known to be committed, oldest first.
    pending: VecDeque<Message>,
    /// The highest sequence handed out (what members may say they saw).
    head: Arc<AtomicU64>,
}

struct Room {
    key: RoomKey,
    id: u64,
    members: HashMap<u64, Arc<ViewerSlot>>,
    inbox: Vec<Inbound>,
    policy: RoomPolicy,
    filters: Vec<Arc<TenantFilter>>,
    modules: watch::Receiver<Arc<ModuleSet>>,
    runtime: Arc<WasmRuntime>,
    /// Keys the sender hashes policies see (stable for this room's life).
    sender_keys: std::collections::hash_map::RandomState,
    label: Arc<str>,
    /// A group room keeps a durable log and delivers everything.
    group: Option<GroupState>,
    next_seq: u64,
    tick: u64,
    recent: VecDeque<Message>,
    recent_cap: usize,
    online_sent: u64,
    presence_sent_at: Instant,
    empty_since: Option<Instant>,
    tick_interval: Duration,
    clock: RoomClock,
    classes: Vec<crate::config::RoomClass>,
    class: usize,
    /// The pool of the room's class, where it and its viewers' writers run.
    worker: tokio::runtime::Handle,
    /// Set once the room has read where its group log ends.
    started: bool,
    /// Rooms with at least this many members push batches from parallel shards.
    shard_members: usize,
    /// Viewers per step of a paced push.
    pace_chunk: usize,
    /// A tick's batches still being pushed, step by step.
    paced: Option<PacedPush>,
    presence_interval: Duration,
    linger: Duration,
    inbox_capacity: usize,
    /// The cap of the built-in policy an empty room falls back to.
    default_cap: u32,
    max_frame: u32,
    max_body: u32,
}

impl Room {
    fn new(key: RoomKey, id: u64, rooms: &Rooms) -> Self {
        let config = &rooms.config;
        let mut modules = rooms.modules.clone();
        // The first tick picks the room's policy and filters from the set.
        modules.mark_changed();
        let group = rooms.is_group(&key.name).then(|| GroupState {
            log: rooms.log.clone(),
            committed: Arc::new(AtomicU64::new(0)),
            pending: VecDeque::new(),
            head: Arc::new(AtomicU64::new(0)),
        });
        Self {
            label: Arc::from(key.to_string().as_str()),
            group,
            key,
            id,
            members: HashMap::new(),
            inbox: Vec::new(),
            policy: RoomPolicy::Native(NativePolicy::new(config.viewer_cap_per_sec)),
            filters: Vec::new(),
            modules,
            runtime: Arc::clone(&rooms.runtime),
            sender_keys: std::collections::hash_map::RandomState::new(),
            next_seq: 1,
            tick: 0,
            recent: VecDeque::new(),
            recent_cap: config.recent_messages,
            online_sent: 0,
            presence_sent_at: Instant::now(),
            empty_since: Some(Instant::now()),
            tick_interval: config.classes.first().map_or(config.tick, |c| c.tick),
            clock: RoomClock::new(config.classes.first().map_or(config.tick, |c| c.tick)),
            classes: config.classes.clone(),
            class: 0,
            worker: rooms.pools.get(0),
            started: false,
            shard_members: config.shard_members,
            pace_chunk: config.pace_chunk.max(1),
            paced: None,
            presence_interval: config.presence_interval,
            linger: config.empty_room_linger,
            inbox_capacity: config.inbox_capacity,
            default_cap: config.viewer_cap_per_sec,
            max_frame: rooms.max_frame,
            max_body: rooms.max_body,
        }
    }

    /// Runs the room until it retires or the edge stops; or, when it changes
    /// class, hands itself back to be run on its new class's pool.
    #[tracing::instrument(name = "room", skip_all, fields(room = %self.key))]
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, rooms: &Rooms) -> Option<(Self, mpsc::Receiver<Command>)> {
        if let Some(g) = self.group.as_ref().filter(|_| !self.started) {
            // Sequence numbers continue where the log ends (joins wait).
            let (log, tenant, name) = (g.log.clone(), Arc::clone(&self.key.tenant), Arc::clone(&self.key.name));
            let last = match tokio::task::spawn_blocking(move || log.last_seq(&tenant, &name)).await {
                Ok(last) => last.map_err(|e| e.to_string()),
                Err(e) => Err(format!("reader task failed: {e}")),
            };
            match last {
                Ok(last) => {
                    self.next_seq = last + 1;
                    g.committed.store(last, Ordering::Release);
                    g.head.store(last, Ordering::Release);
                }
                Err(e) => {
                    // Numbering from 1 would overwrite the log. This room
                    // never starts: whoever is queued is refused, and the
                    // next join makes a fresh room that reads again.
                    tracing::error!(error = %e, "cannot read where the group log ends; refusing joins");
                    metrics::counter!("throng_group_room_start_failed_total", "tenant" => self.key.tenant.to_string())
                        .increment(1);
                    rooms.forget(&self.key, self.id);
                    rx.close();
                    while let Ok(cmd) = rx.try_recv() {
                        match cmd {
                            Command::Join { reply, .. } => {
                                let _ = reply.send(Err(RoomError::Unavailable));
                            }
                            Command::Send(m) => {
                                let _ = m.reply.send(EdgeFrame::Rejected {
                                    client_msg_id: m.client_msg_id,
                                    code: ErrorCode::ServerBusy.code(),
                                    reason: RoomError::Unavailable.to_string(),
                                });
                            }
                            Command::Leave { .. } => {}
                        }
                    }
                    metrics::gauge!("throng_rooms").decrement(1.0);
                    return None;
                }
            }
        }
        self.started = true;
        let mut ticker = tokio::time::interval(self.tick_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let step_due = self.paced.as_ref().map(|p| p.due);
            // An empty room with nothing left to do stops ticking: it only
            // waits for a joiner or the end of its linger.
            let idle = self.members.is_empty() && self.inbox.is_empty() && step_due.is_none() && self.log_settled();
            let retire_at = self.empty_since.map(|t| t + self.linger);
            // A full inbox stops taking commands until the next tick drains
            // it: senders then find the channel full (`Overloaded`), and a
            // flood can neither grow memory nor starve the ticks.
            let inbox_open = self.inbox.len() < self.inbox_capacity;
            tokio::select! {
                biased;
                _ = rooms.shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(step_due.unwrap_or_else(Instant::now)), if step_due.is_some() => {
                    self.pace_step();
                }
                _ = tokio::time::sleep_until(retire_at.unwrap_or_else(Instant::now)), if idle && retire_at.is_some() => {
                    if rooms.retire(&self.key, self.id, &rx) {
                        break;
                    }
                }
                _ = ticker.tick(), if !idle => {
                    // A tick's batches go out before the next tick's.
                    self.finish_paced();
                    self.run_tick().await;
                    if self.reclassify() {
                        let pool = rooms.pools.get(self.class);
                        if pool.id() != self.worker.id() {
                            self.finish_paced();
                            for slot in self.members.values() {
                                slot.rehome(pool.clone());
                            }
                            self.worker = pool;
                            return Some((self, rx));
                        }
                        ticker = tokio::time::interval(self.tick_interval);
                        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
                        ticker.reset();
                    }
                    if self.empty_since.is_some_and(|t| t.elapsed() >= self.linger)
                        && self.inbox.is_empty()
                        && self.log_settled()
                        && rooms.retire(&self.key, self.id, &rx)
                    {
                        break;
                    }
                }
                Some(cmd) = rx.recv(), if inbox_open => self.handle(cmd),
            }
        }
        self.finish_paced();
        rx.close();
        // Whatever slipped in before close: joiners retry elsewhere (their
        // reply is dropped), leaves are moot.
        while rx.try_recv().is_ok() {}
        for slot in self.members.values() {
            slot.close();
        }
        metrics::gauge!("throng_rooms").decrement(1.0);
        tracing::debug!("room retired");
        None
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Join {
                member,
                slot,
                resume_from,
                reply,
            } => {
                let after = resume_from.unwrap_or(0);
                let (recent, catch_up, tail) = match (&self.group, resume_from) {
                    // A group member coming back gets everything after its
                    // sequence: committed messages from the log, the rest
                    // from memory, then live; the split at this instant
                    // makes it exactly once.
                    (Some(g), Some(after)) => {
                        let committed = g.committed.load(Ordering::Acquire);
                        let catch_up = (after < committed).then_some((after + 1, committed));
                        let from = after.max(committed);
                        let tail = g.pending.iter().filter(|m| m.seq > from).cloned().collect();
                        (Vec::new(), catch_up, tail)
                    }
                    _ => (
                        self.recent.iter().filter(|m| m.seq > after).cloned().collect(),
                        None,
                        Vec::new(),
                    ),
                };
                if let Some(old) = self.members.insert(member, slot) {
                    old.close();
                }
                self.empty_since = None;
                let _ = reply.send(Ok(JoinInfo {
                    writer: self.worker.clone(),
                    last_seq: self.next_seq - 1,
                    online: self.members.len() as u64,
                    recent,
                    catch_up,
                    tail,
                    head: self.group.as_ref().map(|g| Arc::clone(&g.head)),
                }));
            }
            Command::Leave { member } => {
                if let Some(slot) = self.members.remove(&member) {
                    slot.close();
                }
                if self.members.is_empty() && self.empty_since.is_none() {
                    self.empty_since = Some(Instant::now());
                    if matches!(self.policy, RoomPolicy::Wasm(_)) {
                        // Nobody to show anything to: give the instance back
                        // to the pool; a joiner's first tick makes a new one.
                        self.policy = RoomPolicy::Native(NativePolicy::new(self.default_cap));
                        self.modules.mark_changed();
                    }
                }
            }
            Command::Send(inbound) => self.inbox.push(inbound),
        }
    }

    /// A huge room's member list, split into shards pushed by parallel
    /// threads: the same bytes, queued for every member, in a fraction of
    /// the time one thread takes. The QUIC writes themselves already run
    /// in parallel in each viewer's writer task.
    fn push_sharded(&self, delivery: &Arc<Delivery>) {
        let slots: Vec<&Arc<ViewerSlot>> = self.members.values().collect();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).max(2);
        let shard = slots.len().div_ceil(threads);
        let push = || {
            std::thread::scope(|scope| {
                for chunk in slots.chunks(shard.max(1)) {
                    scope.spawn(move || {
                        for slot in chunk {
                            slot.push(Arc::clone(delivery));
                        }
                    });
                }
            })
        };
        // The room's task blocks for the push; let the runtime move its
        // other tasks off this worker meanwhile.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(push),
            _ => push(),
        }
        metrics::counter!("throng_sharded_fanouts_total").increment(1);
    }

    /// Queues a tick's batches for every member: all at once, from parallel
    /// shards for a huge room, or paced over the class's `spread`.
    fn push(&mut self, deliveries: Vec<Arc<Delivery>>) {
        if deliveries.is_empty() {
            return;
        }
        let spread = self.classes.get(self.class).map_or(Duration::ZERO, |c| c.spread);
        let members = self.members.len();
        if spread.is_zero() || members <= self.pace_chunk {
            for delivery in &deliveries {
                if members >= self.shard_members {
                    self.push_sharded(delivery);
                } else {
                    for slot in self.members.values() {
                        slot.push(Arc::clone(delivery));
                    }
                }
            }
            return;
        }
        let slots = self.members.values().cloned().collect();
        let mut paced = PacedPush::new(deliveries, slots, self.pace_chunk, spread);
        if !paced.step() {
            self.paced = Some(paced);
        }
        metrics::counter!("throng_paced_fanouts_total").increment(1);
    }

    /// Pushes the next step of a paced push.
    fn pace_step(&mut self) {
        if self.paced.as_mut().is_some_and(PacedPush::step) {
            self.paced = None;
        }
    }

    /// Pushes whatever a paced push has left, now.
    fn finish_paced(&mut self) {
        if let Some(p) = self.paced.take() {
            p.finish();
        }
    }

    /// Moves the room between size classes (with hysteresis); true when it
    /// moved.
    fn reclassify(&mut self) -> bool {
        let members = self.members.len() as u64;
        let before = self.class;
        while self.class + 1 < self.classes.len() && members >= self.classes[self.class + 1].min_members {
            self.class += 1;
        }
        while self.class > 0 && members * 10 < self.classes[self.class].min_members * 8 {
            self.class -= 1;
        }
        if self.class == before {
            return false;
        }
        let class = &self.classes[self.class];
        tracing::info!(class = %class.name, members, tick_ms = class.tick.as_millis() as u64, "room changed size class");
        // Policy rules may depend on the class: pick again at the next tick.
        self.modules.mark_changed();
        metrics::counter!("throng_room_class_changes_total").increment(1);
        self.tick_interval = class.tick;
        self.clock.retick(class.tick);
        true
    }

    /// Whether everything this room appended is committed: a group room must
    /// not retire before, or its successor would number from a stale end.
    fn log_settled(&mut self) -> bool {
        let Some(g) = &mut self.group else { return true };
        let committed = g.committed.load(Ordering::Acquire);
        while g.pending.front().is_some_and(|m| m.seq <= committed) {
            g.pending.pop_front();
        }
        g.pending.is_empty()
    }

    /// Picks up a changed module set at this tick boundary.
    async fn apply_modules(&mut self) {
        if !self.modules.has_changed().unwrap_or(false) {
            return;
        }
        let set = Arc::clone(&self.modules.borrow_and_update());
        self.filters = set.filters_for(&self.key.tenant).to_vec();
        if self.group.is_some() {
            // Group rooms deliver every message; policies are for livecast.
            self.policy = RoomPolicy::Native(NativePolicy::new(0));
            return;
        }
        let class = self.classes.get(self.class).map_or("", |c| c.name.as_str());
        let wanted = set.policy_for(&self.key.tenant, &self.key.name, class);
        let same = match (wanted, &self.policy) {
            (ResolvedPolicy::Native { cap_per_sec }, RoomPolicy::Native(p)) => p.cap_per_sec() == *cap_per_sec,
            (ResolvedPolicy::Wasm { module, params }, RoomPolicy::Wasm(w)) => {
                w.module().hash() == module.hash() && w.params() == params.as_slice()
            }
            _ => false,
        };
        if same {
            return;
        }
        self.policy = match wanted {
            ResolvedPolicy::Native { cap_per_sec } => RoomPolicy::Native(NativePolicy::new(*cap_per_sec)),
            ResolvedPolicy::Wasm { module, params } => {
                // The fallback honours the rule's cap when it names one (a
                // module's params are its own, so only this key is read).
                let cap = params
                    .iter()
                    .find(|(k, _)| k == "cap_per_sec")
                    .and_then(|(_, v)| v.trim().parse().ok())
                    .unwrap_or(set.default_cap());
                let policy = WasmPolicy::new(
                    Arc::clone(&self.runtime),
                    Arc::clone(module),
                    params.clone(),
                    Arc::clone(&self.label),
                    NativePolicy::new(cap),
                )
                .await;
                RoomPolicy::Wasm(Box::new(policy))
            }
        };
        tracing::info!(generation = set.generation, policy = ?self.policy, "room policy set");
    }

    /// Runs the tenant's filters over the inbox, one call per filter for the
    /// whole batch; rejected senders are told why. A batch a filter could
    /// not judge goes its `on_failure` way: closed rejects every message of
    /// it (`FilterUnavailable`), open passes it on; never silently.
    async fn filter(&mut self, mut inbox: Vec<Inbound>) -> Vec<Inbound> {
        for filter in &self.filters {
            if inbox.is_empty() {
                break;
            }
            // Bodies move into the call's batch and back out: no copy here.
            let batch: Vec<bindings::Message> = inbox
                .iter_mut()
                .map(|m| bindings::Message {
                    sender: m.sender.to_string(),
                    kind: wit_kind(m.kind),
                    body: std::mem::take(&mut m.body),
                })
                .collect();
            let verdicts = filter.run(&batch).await;
            for (m, b) in inbox.iter_mut().zip(batch) {
                m.body = b.body;
            }
            let verdicts = match verdicts {
                Ok(v) => v,
                Err(why) => {
                    let on_failure = filter.on_failure();
                    self.runtime
                        .stats()
                        .filter_unjudged
                        .fetch_add(inbox.len() as u64, Ordering::Relaxed);
                    metrics::counter!(
                        "throng_filter_unjudged_total",
                        "tenant" => self.key.tenant.to_string(),
                        "module" => filter.module().hash().short(),
                        "on_failure" => on_failure.as_str(),
                    )
                    .increment(inbox.len() as u64);
                    match on_failure {
                        OnFailure::Open => continue,
                        OnFailure::Closed => {
                            let reason = format!("message filter unavailable: {why}");
                            for m in inbox.drain(..) {
                                let _ = m.reply.send(EdgeFrame::Rejected {
                                    client_msg_id: m.client_msg_id,
                                    code: ErrorCode::FilterUnavailable.code(),
                                    reason: reason.clone(),
                                });
                            }
                            break;
                        }
                    }
                }
            };
            let mut kept = Vec::with_capacity(inbox.len());
            for (mut m, verdict) in inbox.into_iter().zip(verdicts) {
                match verdict {
                    Verdict::Accept => kept.push(m),
                    Verdict::Reject(reason) => {
                        metrics::counter!("throng_messages_filtered_total").increment(1);
                        let _ = m.reply.send(EdgeFrame::Rejected {
                            client_msg_id: m.client_msg_id,
                            code: ErrorCode::Filtered.code(),
                            reason: cut(&reason, MAX_REASON).to_owned(),
                        });
                    }
                    Verdict::Rewrite(body) if body.len() <= self.max_body as usize => {
                        m.body = body;
                        kept.push(m);
                    }
                    Verdict::Rewrite(body) => {
                        // A rewrite may not exceed what a client could send;
                        // the original was judged unfit, so it does not go
                        // out either.
                        metrics::counter!("throng_messages_filtered_total").increment(1);
                        let _ = m.reply.send(EdgeFrame::Rejected {
                            client_msg_id: m.client_msg_id,
                            code: ErrorCode::Filtered.code(),
                            reason: format!(
                                "the filter's rewrite is {} bytes, over the {}-byte body limit",
                                body.len(),
                                self.max_body
                            ),
                        });
                    }
                }
            }
            inbox = kept;
        }
        inbox
    }

    async fn run_tick(&mut self) {
        // Tick numbers follow room time: a tick the machine ran late skips a
        // number rather than stretching the room's second.
        self.tick = self.clock.now().max(self.tick + 1);
        if !self.members.is_empty() {
            // An empty room keeps the built-in policy (see Leave) until
            // someone joins: no Wasm instance for nobody.
            self.apply_modules().await;
        }
        let online = self.members.len() as u64;
        let presence_due = online != self.online_sent && self.presence_sent_at.elapsed() >= self.presence_interval;
        if self.inbox.is_empty() && !presence_due {
            return;
        }
        let mut inbox = std::mem::take(&mut self.inbox);
        if let Some(g) = self.group.as_ref().filter(|g| !inbox.is_empty() && g.log.is_behind()) {
            // The disk is behind: refuse rather than hold ever more acked,
            // uncommitted messages in memory. Senders may retry.
            g.log.refused(inbox.len() as u64);
            for m in inbox.drain(..) {
                let _ = m.reply.send(EdgeFrame::Rejected {
                    client_msg_id: m.client_msg_id,
                    code: ErrorCode::ServerBusy.code(),
                    reason: "the group log is behind; try again shortly".into(),
                });
            }
        }
        let inbox = self.filter(inbox).await;
        let mut metas = InboundBatch::with_capacity(inbox.len());
        for m in &inbox {
            let gift = (m.kind == Kind::Gift)
                .then(|| String::from_utf8_lossy(&m.body[..m.body.len().min(throng_policy_core::MAX_GIFT_NAME)]));
            metas.push(
                self.sender_keys.hash_one(&*m.sender),
                m.kind,
                m.body.len() as u32,
                m.received_ms,
                gift.as_deref(),
            );
        }
        let stats = RoomStats {
            tick: self.tick,
            tick_ms: tick_ms(self.tick_interval),
            elapsed_ms: self.clock.elapsed_ms(self.tick),
            online,
        };
        let plan = self.policy.plan_tick(&stats, &metas).await;
        let left_out = metas
            .kinds
            .iter()
            .filter(|&&k| k != throng_policy_core::Kind::Like.code())
            .count()
            .saturating_sub(plan.deliver.len());
        if left_out > 0 {
            // Dropped messages were accepted (and are acked below): count
            // them, so operators see what the cap costs.
            let class = self.classes.get(self.class).map_or("", |c| c.name.as_str());
            metrics::counter!(
                "throng_policy_dropped_total",
                "tenant" => self.key.tenant.to_string(),
                "class" => class.to_owned(),
            )
            .increment(left_out as u64);
        }

        // Every accepted message gets a sequence number and an ack, delivered
        // or not; delivered ones carry the same number to viewers.
        let mut slots: Vec<Option<Message>> = Vec::with_capacity(inbox.len());
        for m in inbox {
            let seq = self.next_seq;
            self.next_seq += 1;
            let _ = m.reply.send(EdgeFrame::Ack {
                client_msg_id: m.client_msg_id,
                seq,
            });
            slots.push(Some(Message {
                seq,
                sender: m.sender.to_string(),
                kind: m.kind,
                body: m.body,
            }));
        }
        let pinned: Vec<u64> = plan
            .pinned
            .iter()
            .filter_map(|&i| slots.get(i as usize).and_then(|s| s.as_ref()).map(|m| m.seq))
            .collect();
        let mut messages = Vec::with_capacity(plan.deliver.len());
        for i in plan.deliver {
            // Plans are validated (Wasm) or built correctly (native); an index
            // out of range or repeated would still only be skipped here.
            if let Some(m) = slots.get_mut(i as usize).and_then(Option::take) {
                messages.push(m);
            }
        }
        if let Some(g) = &mut self.group {
            let committed = g.committed.load(Ordering::Acquire);
            while g.pending.front().is_some_and(|m| m.seq <= committed) {
                g.pending.pop_front();
            }
            if !messages.is_empty() {
                g.log
                    .append(&self.key.tenant, &self.key.name, messages.clone(), &g.committed);
                g.pending.extend(messages.iter().cloned());
            }
            g.head.store(self.next_seq - 1, Ordering::Release);
        }
        for m in &messages {
            if self.recent_cap > 0 {
                if self.recent.len() == self.recent_cap {
                    self.recent.pop_front();
                }
                self.recent.push_back(m.clone());
            }
        }
        if messages.is_empty() && plan.counters.is_empty() && !presence_due {
            return;
        }
        self.online_sent = online;
        self.presence_sent_at = Instant::now();
        self.fan_out(messages, plan.counters, pinned, online);
    }

    /// Encodes the tick's batch once (split into frames if it is larger than
    /// one frame may be) and queues the same bytes for every member.
    fn fan_out(&mut self, messages: Vec<Message>, counters: Counters, pinned: Vec<u64>, online: u64) {
        let budget = (self.max_frame as usize).saturating_sub(1024);
        let mut chunks: Vec<Vec<Message>> = vec![Vec::new()];
        // The counters go in the first frame: count them against it (a
        // tick's gift names can be many).
        let mut size = counters.gifts.iter().map(|g| g.gift.len() + 16).sum::<usize>();
        for m in messages {
            let m_size = m.body.len() + m.sender.len() + 32;
            let last = chunks.last().map(Vec::len).unwrap_or(0);
            if last > 0 && size + m_size > budget {
                chunks.push(Vec::new());
                size = 0;
            }
            size += m_size;
            if let Some(c) = chunks.last_mut() {
                c.push(m);
            }
        }
        let mut counters = Some(counters);
        let mut deliveries = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let batch = Batch {
                room: self.key.name.to_string(),
                tick: self.tick,
                pinned: pinned
                    .iter()
                    .copied()
                    .filter(|s| chunk.iter().any(|m| m.seq == *s))
                    .collect(),
                messages: chunk,
                counters: counters.take().unwrap_or_default(),
                online,
                missed: 0,
            };
            let framed = EdgeFrame::Batch(batch);
            let encoded = encode(&framed, self.max_frame);
            let EdgeFrame::Batch(batch) = framed else {
                continue;
            };
            let frame = match encoded {
                Ok(f) => f,
                Err(e) => {
                    // Body limits keep a message well under a frame, so this
                    // is a bug, not bad input; drop the batch and say so.
                    tracing::error!(error = %e, code = %ErrorCode::Internal, "batch does not fit a frame");
                    continue;
                }
            };
            deliveries.push(Arc::new(Delivery { frame, batch }));
            metrics::counter!("throng_batches_total").increment(1);
            metrics::counter!("throng_frames_queued_total").increment(self.members.len() as u64);
        }
        self.push(deliveries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(tick: u64) -> Arc<Delivery> {
        let batch = Batch {
            room: "r".into(),
            tick,
            messages: Vec::new(),
            counters: Counters::default(),
            pinned: Vec::new(),
            online: 0,
            missed: 0,
        };
        let frame = encode(&EdgeFrame::Batch(batch.clone()), 1 << 16).expect("encodes");
        Arc::new(Delivery { frame, batch })
    }

    fn queued(slots: &[Arc<ViewerSlot>]) -> Vec<usize> {
        slots.iter().map(|s| s.lock().queue.len()).collect()
    }

    #[test]
    fn a_paced_push_reaches_every_viewer_once_in_even_steps() {
        let slots: Vec<_> = (0..10)
            .map(|_| ViewerSlot::new(8, Duration::from_secs(30), || {}))
            .collect();
        let mut paced = PacedPush::new(
            vec![delivery(1), delivery(2)],
            slots.clone(),
            3,
            Duration::from_millis(8),
        );
        // ceil(10 / 3) = 4 steps of 3, 2 ms apart.
        assert_eq!((paced.chunk, paced.gap), (3, Duration::from_millis(2)));
        let first_due = paced.due;
        assert!(!paced.step());
        assert_eq!(queued(&slots), [2, 2, 2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(paced.due - first_due, Duration::from_millis(2));
        assert!(!paced.step());
        assert!(!paced.step());
        assert!(paced.step());
        assert_eq!(queued(&slots), [2; 10]);
        // Both batches, in order, exactly once each.
        for slot in &slots {
            let ticks: Vec<u64> = slot.lock().queue.iter().map(|d| d.batch.tick).collect();
            assert_eq!(ticks, [1, 2]);
        }
    }

    #[test]
    fn steps_are_never_closer_than_a_millisecond_and_finish_pushes_the_rest() {
        let slots: Vec<_> = (0..1000)
            .map(|_| ViewerSlot::new(8, Duration::from_secs(30), || {}))
            .collect();
        // 1,000 steps of one would be 3 µs apart: 3 steps of 334 instead.
        let mut paced = PacedPush::new(vec![delivery(1)], slots.clone(), 1, Duration::from_millis(3));
        assert_eq!((paced.chunk, paced.gap), (334, Duration::from_millis(1)));
        assert!(!paced.step());
        paced.finish();
        assert_eq!(queued(&slots), vec![1; 1000]);
    }
}
