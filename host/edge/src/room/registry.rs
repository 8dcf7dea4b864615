//! Every room on this edge, by tenant and name.
//!
//! A join finds the room or makes it, within the edge's, the tenant's, the
//! connection's and the user's limits, checked under one lock so that
//! concurrent joins cannot pass them together. A room leaves the map when it
//! retires; a join that raced a retiring room tries again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use governor::DefaultKeyedRateLimiter;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::actor::{Command, Room, RoomHandle};
use super::slot::ViewerSlot;
use super::{Cluster, Inbound, JoinInfo, Peer, RoomError, RoomInfo, RoomKey};
use crate::config::RoomsConfig;
use crate::group_store::GroupStore;
use crate::modules::ModuleSet;
use crate::wasm::WasmRuntime;
use crate::workers::Pools;

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
    /// Tenants the config names: with more than one, none may take more
    /// than [`TENANT_SHARE`] of `max_rooms`.
    tenants: AtomicUsize,
    next_id: AtomicU64,
    pub(super) config: RoomsConfig,
    pub(super) max_frame: u32,
    pub(super) max_body: u32,
    pub(super) runtime: Arc<WasmRuntime>,
    pub(super) modules: watch::Receiver<Arc<ModuleSet>>,
    pub(super) log: GroupStore,
    group_rooms: Vec<wildmatch::WildMatch>,
    pub(super) shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
    pub(super) pools: Pools,
    /// In a cluster: where rooms get their ports to it.
    cluster: std::sync::OnceLock<Arc<dyn Cluster>>,
    /// This edge's run (Unix ms at start): the epoch of the livecast rooms
    /// it numbers.
    pub(super) incarnation: u64,
}

/// The live rooms, and how many each tenant has.
#[derive(Debug, Default)]
struct RoomMap {
    rooms: HashMap<RoomKey, (u64, mpsc::Sender<Command>, Arc<RoomInfo>)>,
    per_tenant: HashMap<Arc<str>, usize>,
}

impl RoomMap {
    /// Removes room `id` under `key` (not a newer room of the same name).
    fn remove(&mut self, key: &RoomKey, id: u64) {
        if self.rooms.get(key).is_some_and(|(i, _, _)| *i == id) {
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
    /// Another edge of the cluster, for a room this edge is the origin of:
    /// the edge's and tenant's room limits hold, the user's and
    /// connection's were checked where the user is.
    pub peer: bool,
}

impl Creator<'static> {
    fn peer() -> Self {
        Creator {
            user: "",
            connection_may_create: true,
            peer: true,
        }
    }
}

/// What every room on an edge shares.
#[derive(Debug)]
pub struct RoomsSetup {
    pub config: RoomsConfig,
    pub max_frame: u32,
    pub max_body: u32,
    pub runtime: Arc<WasmRuntime>,
    pub modules: watch::Receiver<Arc<ModuleSet>>,
    pub log: GroupStore,
    pub shutdown: CancellationToken,
    /// Each size class's threads.
    pub pools: Pools,
    /// Rooms alive at most (see [`Rooms`]).
    pub max_rooms: usize,
    pub max_rooms_per_tenant: usize,
    /// Tenants the config names (see [`Rooms::set_tenants`]).
    pub tenants: usize,
    /// New rooms per user: sustained per second, and burst.
    pub room_create_rate_per_sec: u32,
    pub room_create_burst: u32,
    /// This edge's run (its start, Unix ms; the cluster's incarnation in a
    /// cluster): the epoch of the livecast rooms it numbers.
    pub incarnation: u64,
}

/// The most of an edge's room places one of several tenants may hold:
/// three quarters, so the others always have a quarter between them.
pub const TENANT_SHARE: (usize, usize) = (3, 4);

/// See [`Rooms::tenant_cap`].
pub fn tenant_cap(max_rooms: usize, per_tenant: usize, tenants: usize) -> usize {
    if tenants <= 1 {
        return per_tenant.max(1);
    }
    let share = max_rooms * TENANT_SHARE.0 / TENANT_SHARE.1;
    per_tenant.min(share).max(1)
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
            tenants: AtomicUsize::new(setup.tenants),
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
            cluster: std::sync::OnceLock::new(),
            incarnation: setup.incarnation,
        })
    }

    fn map(&self) -> MutexGuard<'_, RoomMap> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The group log, for catch-up reads.
    pub fn log(&self) -> &GroupStore {
        &self.log
    }

    /// Whether `room` is a group room (by `rooms.group_rooms`).
    pub fn is_group(&self, room: &str) -> bool {
        self.group_rooms.iter().any(|p| p.matches(room))
    }

    /// Every live room's figures, `tenant`'s only if given.
    pub fn infos(&self, tenant: Option<&str>) -> Vec<Arc<RoomInfo>> {
        self.map()
            .rooms
            .values()
            .filter(|(_, _, i)| tenant.is_none_or(|t| &*i.key.tenant == t))
            .map(|(_, _, i)| Arc::clone(i))
            .collect()
    }

    /// One live room's figures.
    pub fn info(&self, key: &RoomKey) -> Option<Arc<RoomInfo>> {
        self.map().rooms.get(key).map(|(_, _, i)| Arc::clone(i))
    }

    /// Group rooms' log.
    pub fn group_log(&self) -> &GroupStore {
        &self.log
    }

    /// Rooms currently alive on this edge.
    pub fn len(&self) -> usize {
        self.map().rooms.len()
    }

    /// Rooms of `tenant` alive on this edge.
    pub fn tenant_len(&self, tenant: &str) -> usize {
        self.map().per_tenant.get(tenant).copied().unwrap_or(0)
    }

    /// Forgets rate-limit state of users whose bucket is full again.
    pub fn forget_quiet_creators(&self) {
        self.creations.retain_recent();
        self.creations.shrink_to_fit();
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rooms one tenant may have alive here: `limits.max_rooms_per_tenant`,
    /// and, where the config names other tenants too, at most
    /// [`TENANT_SHARE`] of the edge's room places, so that no one tenant
    /// can take them all (the default 5,000 is more than a small pool).
    pub fn tenant_cap(&self) -> usize {
        tenant_cap(
            self.max_rooms,
            self.max_rooms_per_tenant,
            self.tenants.load(Ordering::Relaxed),
        )
    }

    /// A reload changed the config's tenants.
    pub fn set_tenants(&self, tenants: usize) {
        self.tenants.store(tenants, Ordering::Relaxed);
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
        if let Some((_, tx, _)) = map.rooms.get(key) {
            return Ok((tx.clone(), false));
        }
        let refusal = if map.rooms.len() >= self.max_rooms {
            Some(("the edge has no room for another room", "edge"))
        } else if map.per_tenant.get(&key.tenant).copied().unwrap_or(0) >= self.tenant_cap() {
            Some(("the tenant has as many rooms on this edge as it may", "tenant"))
        } else if creator.peer {
            None
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
        let info = Arc::new(RoomInfo::new(key.clone(), self.is_group(&key.name)));
        map.rooms.insert(key.clone(), (id, tx.clone(), Arc::clone(&info)));
        *map.per_tenant.entry(Arc::clone(&key.tenant)).or_default() += 1;
        drop(map);
        self.start(key.clone(), id, rx, info);
        metrics::gauge!("throng_rooms").increment(1.0);
        Ok((tx, true))
    }

    /// Starts room `id` on the first class's pool, where every room starts.
    fn start(self: &Arc<Self>, key: RoomKey, id: u64, mut rx: mpsc::Receiver<Command>, info: Arc<RoomInfo>) {
        let rooms = Arc::clone(self);
        let start = async move {
            let Some(room) = Room::start(key, id, &rooms, &mut rx, info).await else {
                return;
            };
            if let Some((room, rx)) = room.run(rx, &rooms).await {
                rooms.spawn(room, rx);
            }
        };
        self.pools.get(0).spawn(self.tasks.track_future(start));
    }

    /// Runs `room` on its class's pool; again on another pool when it
    /// changes class.
    fn spawn(self: &Arc<Self>, room: Room, rx: mpsc::Receiver<Command>) {
        let rooms = Arc::clone(self);
        let pool = room.pool().clone();
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
        epoch: u64,
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
                epoch,
                reply,
            };
            if tx.send(cmd).await.is_err() {
                continue;
            }
            match answer.await {
                Ok(Ok(info)) => return Ok((RoomHandle::new(tx), info, created)),
                Ok(Err(e)) => return Err(e),
                Err(_) => {}
            }
        }
        Err(RoomError::ShuttingDown)
    }

    /// Joins this edge's rooms to its cluster; once, at start.
    pub fn set_cluster(&self, cluster: Arc<dyn Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// Where this edge's rooms get their ports to the cluster, if in one.
    pub(super) fn cluster(&self) -> Option<&Arc<dyn Cluster>> {
        self.cluster.get()
    }

    /// A send another edge forwarded to a room this edge is the origin of
    /// (making the room if need be).
    pub fn peer_send(self: &Arc<Self>, key: &RoomKey, inbound: Inbound) -> Result<(), (Inbound, RoomError)> {
        let tx = match self.handle(key, Creator::peer()) {
            Ok((tx, _)) => tx,
            Err(e) => return Err((inbound, e)),
        };
        RoomHandle::new(tx).send(inbound)
    }

    /// Viewers of a room this edge is the origin of, on another edge or in
    /// a region. A count for a room not alive here makes it, unless it is 0.
    pub fn peer_viewers(self: &Arc<Self>, key: &RoomKey, peer: Peer, viewers: u64) {
        let tx = if viewers == 0 {
            match self.map().rooms.get(key) {
                Some((_, tx, _)) => tx.clone(),
                None => return,
            }
        } else {
            match self.handle(key, Creator::peer()) {
                Ok((tx, _)) => tx,
                Err(e) => {
                    tracing::warn!(room = %key, error = %e, "cannot make a room another edge has viewers of");
                    return;
                }
            }
        };
        let _ = tx.try_send(Command::PeerViewers { peer, viewers });
    }

    /// Another edge numbered livecast room `key` up to `seq` itself (it
    /// took the room for its own while it could not hear this one): the
    /// room, if alive here, numbers above that from now on.
    pub fn numbered_elsewhere(&self, key: &RoomKey, seq: u64) {
        if let Some((_, tx, _)) = self.map().rooms.get(key) {
            let _ = tx.try_send(Command::NumberedElsewhere { seq });
        }
    }

    /// The delivered messages after `after` that a room here still holds,
    /// and whether that is all of them (nothing, all of it, for a room not
    /// alive here); None if the room does not answer within `within`.
    pub async fn ring_since(
        &self,
        key: &RoomKey,
        after: u64,
        within: std::time::Duration,
    ) -> Option<(Vec<throng_wire::Message>, bool)> {
        // A room not alive here has delivered nothing since it was last.
        let Some(tx) = self.map().rooms.get(key).map(|(_, tx, _)| tx.clone()) else {
            return Some((Vec::new(), true));
        };
        let (reply, answer) = oneshot::channel();
        tx.try_send(Command::Resync { after, reply }).ok()?;
        tokio::time::timeout(within, answer).await.ok()?.ok()
    }

    /// Waits for every room task to stop after shutdown was signalled.
    pub async fn drained(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Removes a room that could not start, whatever is queued for it: the
    /// next join makes a fresh one, which tries again.
    pub(super) fn forget(&self, key: &RoomKey, id: u64) {
        self.map().remove(key, id);
    }

    /// Removes a retiring room if nothing is queued for it, under the map
    /// lock, so no joiner can find it afterwards.
    pub(super) fn retire(&self, key: &RoomKey, id: u64, rx: &mpsc::Receiver<Command>) -> bool {
        let mut map = self.map();
        if !rx.is_empty() {
            return false;
        }
        map.remove(key, id);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::tenant_cap;

    #[test]
    fn one_of_several_tenants_may_take_three_quarters_of_the_places_a_lone_one_all() {
        // The default 5,000 against a pool of 4,000 places.
        assert_eq!(tenant_cap(4_000, 5_000, 2), 3_000);
        assert_eq!(tenant_cap(4_000, 5_000, 1), 5_000);
        // A configured cap below the share stands.
        assert_eq!(tenant_cap(4_000, 100, 3), 100);
        // A pool too small to share still lets a tenant have a room.
        assert_eq!(tenant_cap(1, 5_000, 2), 1);
        assert_eq!(tenant_cap(8, 5_000, 2), 6);
    }
}
