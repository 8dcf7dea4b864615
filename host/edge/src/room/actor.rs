//! A room's task: its mailbox, its tick, its size class.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use throng_wire::{Batch, Counters, EdgeFrame, ErrorCode, Kind, Message, Resumed};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::clock::RoomClock;
use super::fanout::{Fanout, Viewers};
use super::group::{Held, Stored};
use super::inbox::Inbox;
use super::kind::RoomKind;
use super::place::{Heard, Place, PortSetup, Publish};
use super::registry::Rooms;
use super::ring::Ring;
use super::sequencer::Sequencer;
use super::slot::{Delivery, ViewerSlot};
use super::tick::Outgoing;
use super::{GAP_FROM_LOG, Inbound, JoinInfo, Peer, RoomError, RoomInfo, RoomKey, filters, tick};
use crate::config::RoomClass;
use crate::filter::TenantFilter;
use crate::modules::{ModuleSet, ResolvedPolicy};
use crate::policy::{InboundBatch, NativePolicy, RoomPolicy, WasmPolicy, tick_ms};
use crate::wasm::WasmRuntime;
use crate::wasm::bindings::RoomStats;

/// What a room's mailbox carries.
pub(super) enum Command {
    Join {
        member: u64,
        slot: Arc<ViewerSlot>,
        resume_from: Option<u64>,
        /// The numbering `resume_from` is of (0: unknown, taken as now's).
        epoch: u64,
        reply: oneshot::Sender<Result<JoinInfo, RoomError>>,
    },
    Leave {
        member: u64,
    },
    Send(Inbound),
    /// Another edge, or a region, has this many viewers of the room (this
    /// edge is its origin).
    PeerViewers {
        peer: Peer,
        viewers: u64,
    },
    /// Another edge numbered this livecast room up to `seq` itself, while
    /// it took the room for its own.
    NumberedElsewhere {
        seq: u64,
    },
    /// A relay that missed batches asks for the delivered messages after
    /// `after`, and whether the ring still holds all of them.
    Resync {
        after: u64,
        reply: oneshot::Sender<(Vec<Message>, bool)>,
    },
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Join { member, .. } => write!(f, "Join({member})"),
            Command::Leave { member } => write!(f, "Leave({member})"),
            Command::Send(m) => write!(f, "Send({})", m.client_msg_id),
            Command::PeerViewers { peer, viewers } => write!(f, "PeerViewers({peer:?}: {viewers})"),
            Command::NumberedElsewhere { seq } => write!(f, "NumberedElsewhere({seq})"),
            Command::Resync { after, .. } => write!(f, "Resync(after {after})"),
        }
    }
}

/// A connection's way to one room it has joined.
#[derive(Debug, Clone)]
pub struct RoomHandle {
    tx: mpsc::Sender<Command>,
}

impl RoomHandle {
    pub(super) fn new(tx: mpsc::Sender<Command>) -> Self {
        Self { tx }
    }

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

/// One room's state, owned by its task.
pub(super) struct Room {
    key: RoomKey,
    id: u64,
    kind: RoomKind,
    viewers: Viewers,
    inbox: Inbox,
    fanout: Fanout,
    sequencer: Sequencer,
    /// Recent messages for joiners.
    ring: Ring,
    policy: RoomPolicy,
    filters: Vec<Arc<TenantFilter>>,
    modules: watch::Receiver<Arc<ModuleSet>>,
    runtime: Arc<WasmRuntime>,
    /// Keys the sender hashes policies see (stable for this room's life).
    sender_keys: std::collections::hash_map::RandomState,
    label: Arc<str>,
    tick: u64,
    online_sent: u64,
    presence_sent_at: Instant,
    empty_since: Option<Instant>,
    tick_interval: Duration,
    clock: RoomClock,
    classes: Vec<RoomClass>,
    class: usize,
    /// The pool of the room's class, where it and its viewers' writers run.
    pool: tokio::runtime::Handle,
    presence_interval: Duration,
    linger: Duration,
    /// The cap of the built-in policy an empty room falls back to.
    default_cap: u32,
    max_frame: u32,
    max_body: u32,
    /// Solo, or in a cluster its origin or a relay.
    place: Place,
    /// Figures and what it runs, for the admin API.
    info: Arc<RoomInfo>,
    /// The current policy's failed ticks already counted in `info`.
    policy_failures_seen: u64,
    /// Group rooms: when a fenced room last tried to claim its log again.
    reclaim_at: Option<Instant>,
}

/// What woke a room's task.
enum Event {
    Shutdown,
    Step,
    Linger,
    Tick,
    Command(Command),
    Heard(Heard),
    /// A group room's log stored held ticks (or fenced the room).
    Stored,
}

impl Room {
    /// Makes room `id` ready to run: a group room first reads where its log
    /// ends, and numbering goes on from there. A room that cannot start
    /// refuses whoever is queued and is forgotten, so the next join makes a
    /// fresh room that tries again.
    #[tracing::instrument(name = "room", skip_all, fields(room = %key))]
    pub(super) async fn start(
        key: RoomKey,
        id: u64,
        rooms: &Rooms,
        rx: &mut mpsc::Receiver<Command>,
        info: Arc<RoomInfo>,
    ) -> Option<Self> {
        let group_log = rooms.is_group(&key.name).then_some(&rooms.log);
        let kind = match RoomKind::open(group_log, &key).await {
            Ok(kind) => kind,
            Err(e) => {
                tracing::error!(error = %e, "cannot read where the group log ends; refusing joins");
                metrics::counter!("throng_group_room_start_failed_total", "tenant" => key.tenant.to_string())
                    .increment(1);
                rooms.forget(&key, id);
                refuse_queued(rx);
                metrics::gauge!("throng_rooms").decrement(1.0);
                return None;
            }
        };
        let config = &rooms.config;
        let mut modules = rooms.modules.clone();
        // The first tick picks the room's policy and filters from the set.
        modules.mark_changed();
        let tick = config.classes.first().map_or(config.tick, |c| c.tick);
        let mut ring = Ring::new(config.recent_messages);
        let mut kind = kind;
        let port = match rooms.cluster() {
            Some(cluster) => {
                let setup = PortSetup {
                    max_frame: rooms.max_frame,
                    presence_interval: config.presence_interval,
                    log: matches!(kind, RoomKind::Group(_)).then(|| rooms.log.clone()),
                };
                Some(cluster.open(&key, setup).await)
            }
            None => None,
        };
        let mut place = Place::new(port);
        if place.is_relay() {
            let recent = place.recent_from_origin().await;
            ring.record(&recent);
            if let RoomKind::Group(g) = &mut kind {
                // The room claimed its log as it opened: a relay only
                // gives the claim up (nothing to await or fail).
                let _ = g.set_writer(&key, false).await;
                g.relayed(&recent);
            }
        }
        // A livecast room has no history to number on from, and an origin
        // in a cluster may not know an earlier origin's last numbers: both
        // number above anything handed out before (see `time_base`), so a
        // client that resumes after a restart or a failover still gets
        // what is new. Its epoch says the numbering is another one. A
        // livecast origin also moves its numbering to now whenever the
        // cluster changes (see `on_heard`), so after a partition that had
        // two origins, the one that goes on numbers above what both handed
        // out.
        // A group room on one edge numbers on densely after its log; a new
        // log (or one whose every entry aged out of JetStream) starts above
        // anything an earlier log of the room handed out, too. So within a
        // room numbers only ever go up, across restarts, failovers and
        // lost logs, and a client never takes a new message for a repeat.
        let epoch = match &kind {
            RoomKind::Group(g) => g.epoch(),
            RoomKind::Livecast => rooms.incarnation,
        };
        let sequencer = match (&kind, &place) {
            (RoomKind::Group(_), Place::Solo) if kind.last_seq() > 0 => Sequencer::after(kind.last_seq(), epoch),
            _ => Sequencer::fresh(kind.last_seq(), epoch),
        };
        Some(Self {
            place,
            info,
            policy_failures_seen: 0,
            reclaim_at: None,
            label: Arc::from(key.to_string().as_str()),
            sequencer,
            kind,
            key,
            id,
            viewers: Viewers::default(),
            inbox: Inbox::new(config.inbox_capacity),
            fanout: Fanout::new(config.shard_members, config.pace_chunk),
            ring,
            policy: RoomPolicy::Native(NativePolicy::new(config.viewer_cap_per_sec)),
            filters: Vec::new(),
            modules,
            runtime: Arc::clone(&rooms.runtime),
            sender_keys: std::collections::hash_map::RandomState::new(),
            tick: 0,
            online_sent: 0,
            presence_sent_at: Instant::now(),
            empty_since: Some(Instant::now()),
            tick_interval: tick,
            clock: RoomClock::new(tick),
            classes: config.classes.clone(),
            class: 0,
            pool: rooms.pools.get(0),
            presence_interval: config.presence_interval,
            linger: config.empty_room_linger,
            default_cap: config.viewer_cap_per_sec,
            max_frame: rooms.max_frame,
            max_body: rooms.max_body,
        })
    }

    /// The pool of the room's class.
    pub(super) fn pool(&self) -> &tokio::runtime::Handle {
        &self.pool
    }

    /// Runs the room until it retires or the edge stops; or, when it changes
    /// class, hands itself back to be run on its new class's pool.
    #[tracing::instrument(name = "room", skip_all, fields(room = %self.key))]
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        rooms: &Rooms,
    ) -> Option<(Self, mpsc::Receiver<Command>)> {
        let mut ticker = tick_timer(self.tick_interval);
        loop {
            let step_due = self.fanout.step_due();
            // An empty room with nothing left to do stops ticking: it only
            // waits for a joiner or the end of its linger.
            let idle = self.viewers.is_empty()
                && !self.peers_interested()
                && self.inbox.is_empty()
                && step_due.is_none()
                && self.kind.settled();
            let retire_at = self.empty_since.map(|t| t + self.linger);
            let inbox_open = self.inbox.has_room();
            let commit = match &self.kind {
                RoomKind::Group(g) if g.is_holding() => Some(Arc::clone(g.commit())),
                _ => None,
            };
            let place = &mut self.place;
            let event = tokio::select! {
                biased;
                _ = rooms.shutdown.cancelled() => Event::Shutdown,
                _ = tokio::time::sleep_until(step_due.unwrap_or_else(Instant::now)), if step_due.is_some() => Event::Step,
                _ = tokio::time::sleep_until(retire_at.unwrap_or_else(Instant::now)), if idle && retire_at.is_some() => Event::Linger,
                _ = ticker.tick(), if !idle => Event::Tick,
                _ = async { match &commit { Some(c) => c.changed().await, None => std::future::pending().await } } => Event::Stored,
                heard = place.next() => Event::Heard(heard),
                Some(cmd) = rx.recv(), if inbox_open => Event::Command(cmd),
            };
            match event {
                Event::Shutdown => break,
                Event::Step => self.fanout.step(),
                Event::Linger => {
                    if rooms.retire(&self.key, self.id, &rx) {
                        break;
                    }
                }
                Event::Tick => {
                    // A tick's batches go out before the next tick's.
                    self.fanout.finish();
                    self.run_tick().await;
                    if self.reclassify() {
                        let pool = rooms.pools.get(self.class);
                        if pool.id() != self.pool.id() {
                            self.fanout.finish();
                            for slot in self.viewers.slots() {
                                slot.rehome(pool.clone());
                            }
                            self.pool = pool;
                            return Some((self, rx));
                        }
                        ticker = tick_timer(self.tick_interval);
                        ticker.reset();
                    }
                    if self.empty_since.is_some_and(|t| t.elapsed() >= self.linger)
                        && self.inbox.is_empty()
                        && self.kind.settled()
                        && rooms.retire(&self.key, self.id, &rx)
                    {
                        break;
                    }
                }
                Event::Heard(heard) => self.on_heard(heard).await,
                Event::Command(cmd) => self.handle(cmd),
                Event::Stored => self.release_stored().await,
            }
        }
        self.fanout.finish();
        rx.close();
        // Whatever slipped in before close: joiners retry elsewhere (their
        // reply is dropped), leaves are moot.
        while rx.try_recv().is_ok() {}
        for slot in self.viewers.slots() {
            slot.close();
        }
        self.place.retire();
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
                epoch,
                reply,
            } => {
                let now = self.epoch();
                // A number of another numbering means nothing here: the
                // joiner is told, and gets what this numbering holds.
                let resumed = match resume_from {
                    None => Resumed::Fresh,
                    Some(_) if epoch != 0 && epoch != now => Resumed::NewEpoch { previous: epoch },
                    Some(after) => match &self.kind {
                        RoomKind::Livecast if !self.ring.holds_all_after(after) => Resumed::Truncated,
                        _ => Resumed::Continued,
                    },
                };
                // Numbers only go up across epochs (see `start`), so the ring
                // after the client's number is still what it has not seen. A
                // group member's number of another log was replaced by its
                // cursor in this one where it joined (`connection`).
                let (recent, catch_up, tail) = match (&self.kind, resume_from) {
                    // A group member coming back gets everything after its
                    // sequence: committed messages from the log, the rest
                    // from memory, then live.
                    (RoomKind::Group(g), Some(after)) => {
                        let (catch_up, tail) = g.resume(after);
                        (Vec::new(), catch_up, tail)
                    }
                    _ => (self.ring.since(resume_from.unwrap_or(0)), None, Vec::new()),
                };
                if let Some(old) = self.viewers.insert(member, slot) {
                    old.close();
                }
                self.empty_since = None;
                let last_seq = match &self.place {
                    Place::Relay(port) => port.seen_seq(),
                    Place::Solo | Place::Origin(_) => self.sequencer.last(),
                };
                self.place.viewers_changed(self.viewers.len() as u64);
                self.info
                    .viewers
                    .store(self.viewers.len() as u64, std::sync::atomic::Ordering::Relaxed);
                let online = (self.viewers.len() as u64).saturating_add(self.peer_count());
                let _ = reply.send(Ok(JoinInfo {
                    writer: self.pool.clone(),
                    last_seq,
                    online,
                    recent,
                    catch_up,
                    tail,
                    head: self.kind.head(),
                    stored: self.kind.stored(),
                    epoch: now,
                    resumed,
                }));
            }
            Command::Leave { member } => {
                if let Some(slot) = self.viewers.remove(member) {
                    slot.close();
                }
                self.place.viewers_changed(self.viewers.len() as u64);
                self.info
                    .viewers
                    .store(self.viewers.len() as u64, std::sync::atomic::Ordering::Relaxed);
                if self.viewers.is_empty() && !self.peers_interested() && self.empty_since.is_none() {
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
            Command::Resync { after, reply } => {
                let _ = reply.send((self.ring.since(after), self.ring.holds_all_after(after)));
            }
            Command::PeerViewers { peer, viewers } => {
                if self.place.peer_viewers(peer, viewers) {
                    self.empty_since = None;
                }
            }
            Command::NumberedElsewhere { seq } => {
                // That edge's viewers saw its numbers: this origin's next
                // ones must be above them, or they are taken for repeats.
                if let (RoomKind::Livecast, Place::Origin(_)) = (&self.kind, &self.place) {
                    self.sequencer.take_over(seq, self.sequencer.epoch());
                }
            }
        }
    }

    /// The numbering of the room's sequence numbers now: this edge's, or
    /// on a relay, its origin's.
    fn epoch(&self) -> u64 {
        match (&self.kind, &self.place) {
            (RoomKind::Livecast, Place::Relay(port)) => port.origin_epoch().unwrap_or(self.sequencer.epoch()),
            _ => self.sequencer.epoch(),
        }
    }

    /// Viewers of the room on other edges, when this edge is its origin.
    fn peer_count(&mut self) -> u64 {
        self.place.peer_count()
    }

    /// Whether other edges want the room's batches, when this edge is its
    /// origin.
    fn peers_interested(&mut self) -> bool {
        self.place.peers_interested()
    }

    /// What the cluster brought the room.
    async fn on_heard(&mut self, heard: Heard) {
        match heard {
            Heard::Nothing => {
                if let (RoomKind::Group(g), Place::Relay(port)) = (&mut self.kind, &self.place) {
                    g.origin_committed(port.origin_committed());
                }
            }
            Heard::Live => {
                // What this edge's viewers hold of a group room's one
                // numbering: the ring, and whatever a joiner's catch-up gave
                // them from the log. A livecast room's numbering is its
                // origin's own: another origin's numbers may be lower (a
                // new epoch), and none of them was delivered here.
                let delivered = match &self.kind {
                    RoomKind::Group(g) => self.ring.last().max(g.committed()),
                    RoomKind::Livecast => 0,
                };
                let numbered_here = match (&self.kind, &self.place) {
                    (RoomKind::Livecast, Place::Origin(_)) => self.sequencer.last(),
                    _ => 0,
                };
                let became_origin = self
                    .place
                    .reconsider(self.viewers.len() as u64, delivered, numbered_here)
                    .await;
                if became_origin {
                    // The room's origin moved here: number on after anything
                    // the one before handed out, and pick a policy. A
                    // livecast room's numbering is this edge's now.
                    let seen = self.place.port().map_or(0, |p| p.seen_seq());
                    let epoch = match &self.kind {
                        RoomKind::Group(g) => g.epoch(),
                        RoomKind::Livecast => self.sequencer.epoch(),
                    };
                    self.sequencer.take_over(seen, epoch);
                    self.modules.mark_changed();
                    if self.place.peers_interested() {
                        self.empty_since = None;
                    }
                } else if let (RoomKind::Livecast, Place::Origin(port)) = (&self.kind, &self.place) {
                    // The cluster changed under a livecast origin: another
                    // edge may have numbered this room meanwhile (a
                    // partition), from its takeover on. Numbering on from
                    // now puts this origin above it, so that edge's viewers
                    // do not take what follows for repeats.
                    let seen = port.seen_seq();
                    self.sequencer.take_over(seen, self.sequencer.epoch());
                }
                let writer = self.place.numbers();
                if let RoomKind::Group(g) = &mut self.kind {
                    match g.set_writer(&self.key, writer).await {
                        Ok(Some(end)) => {
                            self.sequencer.continue_after(end, g.epoch());
                            self.deliver_stored_elsewhere(delivered, end).await;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            // Numbering on without the log's end could reuse
                            // numbers: the room refuses sends until a claim
                            // succeeds (tried again each tick).
                            self.sequencer.fence();
                            tracing::error!(error = %e, "cannot claim the group room's log; refusing sends until it can");
                        }
                    }
                }
            }
            Heard::Frames(deliveries) => {
                let Place::Relay(port) = &self.place else { return };
                for d in &deliveries {
                    self.ring.record(&d.batch.messages);
                }
                if let RoomKind::Group(g) = &mut self.kind {
                    for d in &deliveries {
                        g.relayed(&d.batch.messages);
                    }
                    g.origin_committed(port.origin_committed());
                }
                self.fanout.finish();
                let spread = self.classes.get(self.class).map_or(Duration::ZERO, |c| c.spread);
                metrics::counter!("throng_frames_queued_total")
                    .increment((deliveries.len() * self.viewers.len()) as u64);
                self.fanout
                    .push(&mut self.viewers, deliveries, spread, &self.pool)
                    .await;
            }
        }
    }

    /// Moves the room between size classes (with hysteresis); true when it
    /// moved.
    fn reclassify(&mut self) -> bool {
        let members = self.viewers.len() as u64;
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

    fn class_name(&self) -> &str {
        self.classes.get(self.class).map_or("", |c| c.name.as_str())
    }

    /// Picks up a changed module set at this tick boundary.
    async fn apply_modules(&mut self) {
        if !self.modules.has_changed().unwrap_or(false) {
            return;
        }
        let set = Arc::clone(&self.modules.borrow_and_update());
        let (filters, filter_version) = set.filters_for(&self.key.tenant, &self.key.name);
        self.filters = filters.to_vec();
        let class = self.class_name().to_owned();
        self.info.set_running(|r| {
            r.class = class;
            r.filter_version = filter_version;
            r.filters = filters
                .iter()
                .map(|f| format!("sha256:{}", f.module().hash().hex()))
                .collect();
        });
        if let RoomKind::Group(_) = self.kind {
            // Group rooms deliver every message; policies are for livecast.
            self.policy = RoomPolicy::Native(NativePolicy::new(0));
            return;
        }
        let pick = set.policy_for(&self.key.tenant, &self.key.name, self.class_name());
        self.info.set_running(|r| {
            r.policy_version = pick.version;
            match pick.policy {
                ResolvedPolicy::Native { cap_per_sec } => {
                    r.policy = "native".into();
                    r.policy_params = [("cap_per_sec".to_owned(), cap_per_sec.to_string())].into();
                    r.policy_on_failure = None;
                }
                ResolvedPolicy::Wasm {
                    module,
                    params,
                    on_failure,
                } => {
                    r.policy = format!("sha256:{}", module.hash().hex());
                    r.policy_params = crate::control::redacted(&params.iter().cloned().collect());
                    r.policy_on_failure = Some(on_failure.as_str());
                }
            }
        });
        let wanted = pick.policy;
        let same = match (wanted, &self.policy) {
            (ResolvedPolicy::Native { cap_per_sec }, RoomPolicy::Native(p)) => p.cap_per_sec() == *cap_per_sec,
            (
                ResolvedPolicy::Wasm {
                    module,
                    params,
                    on_failure,
                },
                RoomPolicy::Wasm(w),
            ) => w.module().hash() == module.hash() && w.params() == params.as_slice() && w.on_failure() == *on_failure,
            _ => false,
        };
        if same {
            return;
        }
        self.policy = match wanted {
            ResolvedPolicy::Native { cap_per_sec } => RoomPolicy::Native(NativePolicy::new(*cap_per_sec)),
            ResolvedPolicy::Wasm {
                module,
                params,
                on_failure,
            } => {
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
                    *on_failure,
                )
                .await;
                RoomPolicy::Wasm(Box::new(policy))
            }
        };
        tracing::info!(generation = set.generation, policy = ?self.policy, "room policy set");
    }

    /// Counts a tick's messages by outcome, labelled with tenant and class.
    fn count_messages(&self, accepted: usize, delivered: usize, filtered: usize) {
        let (tenant, class) = (self.key.tenant.to_string(), self.class_name().to_owned());
        for (outcome, n) in [("accepted", accepted), ("delivered", delivered), ("filtered", filtered)] {
            if n > 0 {
                metrics::counter!(
                    "throng_room_messages_total",
                    "tenant" => tenant.clone(),
                    "class" => class.clone(),
                    "outcome" => outcome,
                )
                .increment(n as u64);
            }
        }
    }

    /// Shows the policy module's failures and quarantine in the room's info.
    fn note_policy_health(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let (failed, quarantined) = match &self.policy {
            RoomPolicy::Wasm(w) => (w.failed_ticks(), w.is_quarantined()),
            RoomPolicy::Native(_) => (0, false),
        };
        if failed > self.policy_failures_seen {
            self.info
                .policy_failures
                .fetch_add(failed - self.policy_failures_seen, Relaxed);
        }
        self.policy_failures_seen = failed;
        self.info.policy_quarantined.store(quarantined, Relaxed);
    }

    /// One tick: filters, policy, sequence numbers and acks, history, one
    /// encode, and the batch on its way to every viewer.
    async fn run_tick(&mut self) {
        // Tick numbers follow room time: a tick the machine ran late skips a
        // number rather than stretching the room's second.
        self.tick = self.clock.now().max(self.tick + 1);
        self.info
            .viewers
            .store(self.viewers.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if let Place::Relay(port) = &self.place {
            // Relayed: the origin runs the room; its senders' messages go
            // there, and their answers come back from there.
            for m in self.inbox.take() {
                port.forward(m);
            }
            return;
        }
        let peers = self.peer_count();
        let interested = self.peers_interested();
        if self.viewers.is_empty() && !interested && self.empty_since.is_none() {
            self.empty_since = Some(Instant::now());
        }
        if !self.viewers.is_empty() || interested {
            // An empty room keeps the built-in policy (see Leave) until
            // someone joins: no Wasm instance for nobody.
            self.apply_modules().await;
        }
        let online = (self.viewers.len() as u64).saturating_add(peers);
        self.info.online.store(online, std::sync::atomic::Ordering::Relaxed);
        self.info.sample();
        let presence_due = online != self.online_sent && self.presence_sent_at.elapsed() >= self.presence_interval;
        if self.inbox.is_empty() && !presence_due {
            // A group room's relays learn how far its log is stored even
            // when nothing is said: they keep messages until then.
            let committed = self.kind.committed();
            if committed > 0 {
                let tick = self.told(&[], self.ring.last());
                self.place.publish(tick).await;
            }
            return;
        }
        let mut inbox = self.inbox.take();
        RoomInfo::add(&self.info.msgs_in, inbox.len());
        if self.sequencer.is_fenced() {
            // A claim that failed, or a fence: try to claim the log again
            // before refusing the tick's messages.
            self.reclaim().await;
        }
        tick::refuse_if_fenced(&self.sequencer, &mut inbox);
        if let RoomKind::Group(g) = &self.kind {
            g.refuse_if_behind(&mut inbox);
            g.refuse_if_tenant_full(&self.key, &mut inbox);
        }
        let before_filters = inbox.len();
        let inbox = filters::run(&self.filters, inbox, &self.runtime, &self.key.tenant, self.max_body).await;
        let accepted_n = inbox.len();
        RoomInfo::add(&self.info.filtered, before_filters - accepted_n);
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
        self.note_policy_health();
        let left_out = metas
            .kinds
            .iter()
            .filter(|&&k| k != throng_policy_core::Kind::Like.code())
            .count()
            .saturating_sub(plan.deliver.len());
        if left_out > 0 {
            // Dropped messages were accepted (and are acked below): count
            // them, so operators see what the cap costs.
            metrics::counter!(
                "throng_policy_dropped_total",
                "tenant" => self.key.tenant.to_string(),
                "class" => self.class_name().to_owned(),
            )
            .increment(left_out as u64);
            RoomInfo::add(&self.info.dropped_by_policy, left_out);
        }

        // Every accepted message gets a sequence number and an ack, delivered
        // or not; delivered ones carry the same number to viewers.
        let numbered = tick::number(inbox, &plan.deliver, &plan.pinned, &mut self.sequencer);
        RoomInfo::add(&self.info.delivered, numbered.messages.len());
        self.count_messages(accepted_n, numbered.messages.len(), before_filters - accepted_n);
        if !numbered.messages.is_empty() || !plan.counters.is_empty() || presence_due {
            // Told now, though a group room's tick shows only once stored:
            // the ticks meanwhile must not each carry the count again.
            self.online_sent = online;
            self.presence_sent_at = Instant::now();
        }
        let out = Outgoing {
            messages: numbered.messages,
            counters: plan.counters,
            pinned: numbered.pinned,
            tick: self.tick,
            online,
            presence_due,
            missed: 0,
        };
        if let RoomKind::Group(g) = &mut self.kind {
            // Acked and shown only once stored (see `room/group.rs`).
            let last = self.sequencer.last();
            g.hold(
                &self.key,
                Held {
                    last,
                    acks: numbered.acks,
                    out,
                },
            );
            self.release_stored().await;
            return;
        }
        for ack in numbered.acks {
            ack.send();
        }
        self.deliver(out).await;
    }

    /// Acks and delivers the held ticks a group room's log has stored; a
    /// fenced room (another edge appended to its log) claims it again.
    async fn release_stored(&mut self) {
        let RoomKind::Group(g) = &mut self.kind else { return };
        match g.take_stored(&self.key) {
            Stored::Ticks(ticks) => self.release(ticks).await,
            Stored::Fenced(stored) => {
                // What was stored before the fence is in the log: acked and
                // shown, so no sender is refused what readers find there.
                // Nothing more is numbered until the log is claimed again.
                self.sequencer.fence();
                self.release(stored).await;
                self.reclaim().await;
            }
        }
    }

    /// Acks held ticks the log stored and delivers them as one batch:
    /// ticks stored together (after a slow commit, or JetStream back from
    /// an outage) pushed apart would overflow viewers' slots.
    async fn release(&mut self, ticks: Vec<Held>) {
        if ticks.is_empty() {
            return;
        }
        let (acks, out) = tick::merge(ticks);
        for ack in acks {
            ack.send();
        }
        self.deliver(out).await;
    }

    /// Claims a fenced group room's log again and numbers on after its new
    /// end, delivering first what the other writer stored.
    async fn reclaim(&mut self) {
        // At most one claim a second: while JetStream is away, each tick's
        // sends are refused rather than retried in a loop.
        if self.reclaim_at.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        self.reclaim_at = Some(Instant::now());
        let RoomKind::Group(g) = &mut self.kind else { return };
        let delivered = self.ring.last().max(g.committed());
        match g.reclaim(&self.key).await {
            Ok(end) => {
                let epoch = g.epoch();
                match self.place.port() {
                    // Another origin may have numbered meanwhile, unseen
                    // here: number as a new origin does.
                    Some(port) => self.sequencer.take_over(port.seen_seq().max(end), epoch),
                    None => self.sequencer.continue_after(end, epoch),
                }
                self.deliver_stored_elsewhere(delivered, end).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot claim the group room's log yet"),
        }
    }

    /// A group room claimed its log and found it ending at `end`, above
    /// what this edge's viewers were given (`delivered`): another edge
    /// wrote it meanwhile (a takeover whose last batches never came here,
    /// a partition both sides took for their own, a fence). What it wrote
    /// is stored, so it is the room's: the viewers here get it, in order,
    /// before anything this edge numbers next, or are told how much they
    /// missed when the log cannot give it all.
    async fn deliver_stored_elsewhere(&mut self, delivered: u64, end: u64) {
        let RoomKind::Group(g) = &self.kind else { return };
        if end <= delivered {
            return;
        }
        let read = g.read_stored(&self.key, delivered + 1, end, GAP_FROM_LOG).await;
        let (messages, missed) = match read {
            Some(m) => (m.into_iter().filter(|m| m.seq > delivered && m.seq <= end).collect(), 0),
            // Numbers, not messages: at most this many.
            None => (Vec::new(), end - delivered),
        };
        tracing::info!(
            messages = messages.len(),
            missed,
            "another edge wrote the group room's log meanwhile: delivering what it stored"
        );
        metrics::counter!("throng_group_log_filled_total").increment(1);
        self.deliver(Outgoing {
            messages,
            counters: Counters::default(),
            pinned: Vec::new(),
            tick: self.tick,
            online: self.online_sent,
            presence_due: false,
            missed,
        })
        .await;
    }

    /// Records a tick's delivered messages and sends its batch to this
    /// edge's viewers and, in a cluster, to the room's relays.
    async fn deliver(&mut self, out: Outgoing) {
        let prev_delivered = self.ring.last();
        self.ring.record(&out.messages);
        if out.is_empty() {
            // Nothing to show, but the numbers moved: relays must know, in
            // case the room's origin moves to one of them.
            let tick = self.told(&[], prev_delivered);
            self.place.publish(tick).await;
            return;
        }
        let batch = Batch {
            room: self.key.name.to_string(),
            tick: out.tick,
            messages: out.messages,
            counters: out.counters,
            pinned: out.pinned,
            online: out.online,
            missed: out.missed,
            epoch: self.sequencer.epoch(),
        };
        let deliveries = tick::encode_batch(batch, self.max_frame);
        metrics::counter!("throng_batches_total").increment(deliveries.len() as u64);
        metrics::counter!("throng_frames_queued_total").increment((deliveries.len() * self.viewers.len()) as u64);
        let spread = self.classes.get(self.class).map_or(Duration::ZERO, |c| c.spread);
        // Encoded once, here: relays write these very bytes.
        let tick = self.told(&deliveries, prev_delivered);
        self.place.publish(tick).await;
        self.fanout
            .push(&mut self.viewers, deliveries, spread, &self.pool)
            .await;
    }

    /// What the room's relays are told of a tick.
    fn told<'a>(&self, deliveries: &'a [Arc<Delivery>], prev_delivered: u64) -> Publish<'a> {
        Publish {
            deliveries,
            last_seq: self.sequencer.last(),
            committed: self.kind.committed(),
            prev_delivered,
            within: self.tick_interval,
        }
    }
}

fn tick_timer(period: Duration) -> Interval {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

/// Refuses everything queued for a room that will not start.
fn refuse_queued(rx: &mut mpsc::Receiver<Command>) {
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
            Command::Leave { .. }
            | Command::PeerViewers { .. }
            | Command::NumberedElsewhere { .. }
            | Command::Resync { .. } => {}
        }
    }
}
