//! The cluster's side of a room's [`ClusterPort`]: whether this edge is
//! the room's origin or relays it from another edge, and what that means on
//! the bus at each step. The room sees only the port (`room/place.rs`).
//!
//! - **Origin**: the room runs as on a single edge (filters, policy,
//!   sequencer, ring) and also takes what other edges forward
//!   (`cluster::links`), counts their viewers online, and publishes each
//!   tick's encoded frames once on the room's subject while any other edge
//!   has viewers. A room whose origin moved here numbers on after the
//!   highest number it has seen (the room's sequencer takes it over).
//! - **Relay**: the room subscribes to its subject while it lives (it
//!   lives while it has viewers, and lingers as rooms do), writes the
//!   origin's frames unchanged to its viewers, keeps its ring from them
//!   for joiners, forwards its senders' messages to the origin, and tells
//!   the origin how many viewers it has here.
//!
//! Group rooms run the same way; their origin also writes the room's log
//! (JetStream) and says in each batch how far it is stored (`room/group.rs`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use throng_wire::{Batch, Counters, EdgeFrame, FrameDecoder};
use tokio::sync::watch;
use tokio::time::Instant;

use futures::future::BoxFuture;

use super::bus::{self, RoomBatch};
use super::links::Links;
use super::{BusKind, LiveSet};
use crate::room::{
    Cluster, ClusterPort, Delivery, GAP_FROM_LOG, Heard, Inbound, Peer, PortSetup, Publish, RoomKey, encode_batch,
};

/// Who runs the room.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    Origin,
    Relay { origin: String },
}

/// A room's link to the rest of its cluster.
#[derive(Debug)]
pub(crate) struct RoomLink {
    links: Arc<Links>,
    subject: String,
    role: Role,
    /// Whether this link counts in the cluster's rooms originated here.
    counted: bool,
    live: watch::Receiver<Arc<LiveSet>>,
    sub: Option<async_nats::Subscriber>,
    /// Origin: this origin's bus batches of the room so far.
    batch_no: u64,
    /// Origin: the highest number its relays have been told of.
    told_seq: u64,
    /// Origin: how far the room's log is stored, as its relays were told.
    told_committed: u64,
    /// Relay (group rooms): how far the origin says the log is stored.
    origin_committed: u64,
    /// Origin: edges that told of their first viewers, and when: they get
    /// batches before their region's count includes them.
    hellos: HashMap<String, Instant>,
    /// Origin: each region's viewers, and when its aggregator last said so.
    regions: HashMap<String, (u64, Instant)>,
    /// Relay: the last bus batch seen (origin, epoch, batch number).
    last_batch: Option<(String, u64, u64)>,
    /// The highest sequence number seen from any origin of the room.
    seen_seq: u64,
    /// Relay: the highest number of a message written to its viewers.
    delivered_seq: u64,
    /// The highest number this edge handed out as the livecast room's
    /// origin, told to each new origin (see `RoomInterest::numbered_to`).
    numbered_here: u64,
    /// Relay: the last tick and online count the origin sent.
    last_tick: u64,
    last_online: u64,
    key: RoomKey,
    max_frame: u32,
    decoder: FrameDecoder,
    peer_ttl: Duration,
    /// Group rooms: the log, where a relay fills a gap on the bus (its
    /// origin publishes only what is stored there).
    log: Option<crate::group_store::GroupStore>,
    /// Relay: the numbering of the last frame written to its viewers.
    frame_epoch: Option<u64>,
}

/// Where the edge's rooms get their ports: the cluster's links.
#[derive(Debug)]
pub struct RoomPorts(pub Arc<Links>);

impl Cluster for RoomPorts {
    fn open<'a>(&'a self, key: &'a RoomKey, setup: PortSetup) -> BoxFuture<'a, Box<dyn ClusterPort>> {
        Box::pin(async move {
            let link = RoomLink::new(Arc::clone(&self.0), key, setup).await;
            Box::new(link) as Box<dyn ClusterPort>
        })
    }
}

/// Regions an origin keeps counts of per room; more than any real cluster
/// has.
const MAX_REGIONS: usize = 256;

impl RoomLink {
    /// Room `key`'s link, in the place the live set gives it now.
    pub(crate) async fn new(links: Arc<Links>, key: &RoomKey, setup: PortSetup) -> Self {
        let PortSetup {
            max_frame,
            presence_interval: presence,
            log,
        } = setup;
        let live = links.live();
        let role = role_of(&live.borrow(), links.edge_id(), key);
        let mut link = Self {
            subject: bus::room_subject_any(&key.tenant, &key.name),
            links,
            role: Role::Origin,
            counted: false,
            live,
            sub: None,
            batch_no: 0,
            told_seq: 0,
            told_committed: 0,
            origin_committed: 0,
            hellos: HashMap::new(),
            regions: HashMap::new(),
            last_batch: None,
            seen_seq: 0,
            delivered_seq: 0,
            numbered_here: 0,
            last_tick: 0,
            last_online: 0,
            key: key.clone(),
            max_frame,
            decoder: FrameDecoder::new(max_frame),
            peer_ttl: presence * 3 + Duration::from_secs(1),
            log,
            frame_epoch: None,
        };
        link.become_(role, key, 0).await;
        link
    }

    /// A new relay's recent messages, from its origin's ring, so its first
    /// joiners get what they would on the origin (and a viewer that moved
    /// here from a dead edge resumes by sequence). Asked after subscribing:
    /// what crosses both arrives once (see `on_batch`).
    async fn recent_from_origin(&mut self) -> Vec<throng_wire::Message> {
        let Role::Relay { origin } = &self.role else {
            return Vec::new();
        };
        let origin = origin.clone();
        match self.links.resync(&origin, &self.key, 0).await {
            Some(r) => {
                if let Some(m) = r.messages.last() {
                    self.delivered_seq = self.delivered_seq.max(m.seq);
                    self.seen_seq = self.seen_seq.max(m.seq);
                }
                r.messages
            }
            None => Vec::new(),
        }
    }

    /// Takes on `role`: a relay listens on the room's subject and tells its
    /// origin of its viewers; an origin stops listening.
    async fn become_(&mut self, role: Role, key: &RoomKey, viewers: u64) {
        match &role {
            Role::Origin => {
                self.sub = None;
                self.links.relayed(key, "", 0, 0);
            }
            Role::Relay { origin } => {
                if self.sub.is_none() {
                    match self.links.subscribe(self.subject.clone()).await {
                        Ok(sub) => self.sub = Some(sub),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot listen to the room's origin; viewers here get nothing until the bus is back")
                        }
                    }
                }
                self.links.relayed(key, origin, viewers, self.numbered_here);
            }
        }
        if role != self.role {
            tracing::info!(room = %key, role = ?role, "room's role in the cluster");
        }
        self.role = role;
        self.count_origin(self.is_origin());
    }

    /// Waits for what the link has for the room.
    async fn next(&mut self) -> Heard {
        let got = {
            let live = &mut self.live;
            let sub = self.sub.as_mut();
            tokio::select! {
                changed = live.changed() => Got::Live(changed.is_ok()),
                message = async move {
                    match sub {
                        Some(sub) => futures::StreamExt::next(sub).await,
                        None => std::future::pending().await,
                    }
                } => Got::Message(message),
            }
        };
        match got {
            Got::Live(true) => Heard::Live,
            // The cluster is gone (shutdown): nothing more to hear.
            Got::Live(false) => std::future::pending().await,
            Got::Message(Some(m)) => self.on_batch(bus::sender_of(&m.subject), &m.payload).await,
            Got::Message(None) => {
                self.sub = None;
                Heard::Nothing
            }
        }
    }

    /// Rereads the live set (see [`ClusterPort::reconsider`]).
    async fn reconsider(&mut self, viewers: u64, delivered: u64, numbered_here: u64) {
        self.numbered_here = self.numbered_here.max(numbered_here);
        let key = self.key.clone();
        let role = role_of(&self.live.borrow_and_update(), self.links.edge_id(), &key);
        let was_origin = self.is_origin();
        self.become_(role, &key, viewers).await;
        if was_origin && !self.is_origin() {
            // What this edge delivered as the origin is not a gap to fill
            // from the new origin (the viewers would get it twice).
            self.delivered_seq = self.delivered_seq.max(delivered);
            self.seen_seq = self.seen_seq.max(delivered);
        }
    }

    /// Relay: the numbering of the room's origin, from its last batch or,
    /// before one came, from the live set.
    fn relay_epoch(&self) -> Option<u64> {
        let Role::Relay { origin } = &self.role else {
            return None;
        };
        if let Some((from, epoch, _)) = &self.last_batch
            && from == origin
        {
            return Some(*epoch);
        }
        self.live.borrow().incarnation(origin)
    }

    async fn on_batch(&mut self, sender: &str, payload: &[u8]) -> Heard {
        self.links.cluster().received(BusKind::Batch, payload.len());
        if sender == self.links.edge_id() {
            return Heard::Nothing; // our own, from when we were the origin
        }
        let batch: RoomBatch = match bus::decode(payload, bus::MAX_ROOM_BUS_BYTES) {
            Ok(b) => b,
            Err(e) => {
                self.links.cluster().malformed(BusKind::Batch, &e);
                return Heard::Nothing;
            }
        };
        if batch.origin != sender {
            self.links
                .cluster()
                .refused(BusKind::Batch, "a batch naming another origin than its sender");
            return Heard::Nothing;
        }
        if self.is_origin() {
            // Another edge's batch while this one takes itself for the
            // origin (the live sets disagree for a moment): its numbers
            // are kept out of reuse, but nothing counts as written to the
            // viewers here, so the gap is filled once this edge relays again.
            if batch.tenant == *self.key.tenant && batch.room == *self.key.name {
                self.seen_seq = self.seen_seq.max(batch.last_seq);
            }
            return Heard::Nothing;
        }
        if let Role::Relay { origin } = &self.role
            && *origin != batch.origin
        {
            // Not from the edge this one takes for the room's origin: a
            // forged or confused batch, or a new origin heard of a moment
            // before the live set says so (its next batches are taken, and
            // the gap is filled from its ring).
            self.links
                .cluster()
                .malformed(BusKind::Batch, &"a batch from an edge that is not the room's origin");
            return Heard::Nothing;
        }
        if batch.tenant != *self.key.tenant || batch.room != *self.key.name {
            self.links
                .cluster()
                .malformed(BusKind::Batch, &"a batch of another room on this room's subject");
            return Heard::Nothing;
        }
        // Batches this relay should have had before this one: counted from
        // the same origin run, or from 1 for an origin heard of first now
        // (it published to this relay's subject from its first batch on).
        let mut lost = match &self.last_batch {
            Some((origin, epoch, no)) if *origin == batch.origin && *epoch == batch.epoch => {
                batch.batch_no.saturating_sub(no + 1)
            }
            Some(_) => batch.batch_no.saturating_sub(1),
            None => 0,
        };
        if lost == 0 && batch.prev_delivered > self.delivered_seq {
            // No batch missing by count, yet messages are: the origin
            // delivered some while it published nothing (this relay's
            // interest lapsed while it was stalled), or while this relay
            // had not subscribed yet.
            lost = 1;
        }
        self.last_batch = Some((batch.origin.clone(), batch.epoch, batch.batch_no));
        self.seen_seq = self.seen_seq.max(batch.last_seq);
        self.origin_committed = self.origin_committed.max(batch.committed);
        let mut fresh = Vec::with_capacity(batch.frames.len());
        for frame in batch.frames {
            let mut buf = BytesMut::from(&frame[..]);
            match self.decoder.decode::<EdgeFrame>(&mut buf) {
                Ok(Some(EdgeFrame::Batch(b))) if buf.is_empty() => {
                    fresh.push(Arc::new(Delivery {
                        frame: Bytes::from(frame),
                        batch: b,
                    }));
                }
                _ => {
                    self.links
                        .cluster()
                        .malformed(BusKind::Batch, &"a frame that is not one batch");
                }
            }
        }
        let mut deliveries = if lost > 0 {
            let epoch = self.frame_epoch.or(self.relay_epoch()).unwrap_or(batch.epoch);
            self.fill_gap(&batch.origin, lost, &fresh, (epoch, batch.last_seq))
                .await
        } else {
            Vec::new()
        };
        // What a resync already gave the viewers is not written twice: a
        // frame of only such messages is skipped, one that mixes them with
        // new ones is encoded again without them (rare: only just after a
        // resync).
        for d in fresh {
            let after = deliveries
                .iter()
                .filter_map(|d: &Arc<Delivery>| d.batch.messages.last())
                .map(|m| m.seq)
                .max()
                .unwrap_or(0)
                .max(self.delivered_seq);
            match d.batch.messages.first() {
                Some(m) if m.seq <= after => {
                    let mut batch = d.batch.clone();
                    batch.messages.retain(|m| m.seq > after);
                    if !batch.messages.is_empty() {
                        deliveries.extend(encode_batch(batch, self.max_frame));
                    }
                }
                _ => deliveries.push(d),
            }
        }
        for d in &deliveries {
            self.frame_epoch = Some(d.batch.epoch);
            if let Some(m) = d.batch.messages.last() {
                self.seen_seq = self.seen_seq.max(m.seq);
                self.delivered_seq = self.delivered_seq.max(m.seq);
            }
            self.last_tick = self.last_tick.max(d.batch.tick);
            self.last_online = d.batch.online;
        }
        if deliveries.is_empty() {
            Heard::Nothing
        } else {
            Heard::Frames(deliveries)
        }
    }

    /// The bus lost `lost` of `origin`'s batches before `fresh`: asks the
    /// origin for the messages it delivered meanwhile (from its ring), and
    /// makes them one batch for this edge's viewers, before `fresh`. What
    /// the origin no longer holds, or cannot say in time, shows as
    /// `missed` in that batch: a viewer learns of a hole, never silently.
    async fn fill_gap(
        &mut self,
        origin: &str,
        lost: u64,
        fresh: &[Arc<Delivery>],
        (batch_epoch, last_seq): (u64, u64),
    ) -> Vec<Arc<Delivery>> {
        metrics::counter!("throng_bus_batches_lost_total").increment(lost);
        tracing::warn!(lost, origin = %crate::untrusted(origin, 64), room = %self.key, "the bus lost batches of this room; asking the origin");
        let before = fresh
            .iter()
            .filter_map(|d| d.batch.messages.first())
            .map(|m| m.seq)
            .min()
            .unwrap_or(u64::MAX);
        let from_log = match &self.log {
            // What a group room's origin published is stored: the log has
            // the whole gap, however long, where its ring may not.
            Some(log) => {
                let to = before.saturating_sub(1).min(last_seq);
                log.read(
                    &self.key.tenant,
                    &self.key.name,
                    self.delivered_seq + 1,
                    to,
                    GAP_FROM_LOG,
                )
                .await
                .ok()
                .filter(|m| m.len() < GAP_FROM_LOG)
            }
            None => None,
        };
        let resynced = match from_log {
            Some(messages) => Some((messages, true)),
            None => self
                .links
                .resync(origin, &self.key, self.delivered_seq)
                .await
                .map(|r| (r.messages, r.complete)),
        };
        let (messages, complete) = match resynced {
            Some((messages, complete)) => {
                let after = self.delivered_seq;
                let messages: Vec<_> = messages
                    .into_iter()
                    .filter(|m| m.seq > after && m.seq < before)
                    .collect();
                (messages, complete)
            }
            None => (Vec::new(), false),
        };
        let outcome = if complete { "filled" } else { "partial" };
        metrics::counter!("throng_bus_resyncs_total", "outcome" => outcome).increment(1);
        if messages.is_empty() && complete {
            return Vec::new();
        }
        let batch = Batch {
            room: self.key.name.to_string(),
            tick: fresh.first().map_or(self.last_tick, |d| d.batch.tick),
            messages,
            counters: Counters::default(),
            pinned: Vec::new(),
            online: fresh.first().map_or(self.last_online, |d| d.batch.online),
            missed: if complete { 0 } else { lost },
            epoch: fresh.first().map_or(batch_epoch, |d| d.batch.epoch),
        };
        encode_batch(batch, self.max_frame)
    }

    /// An edge's first (or no more) viewers, or a region's total (counted
    /// while this edge is the room's origin).
    fn count_peer(&mut self, peer: Peer, viewers: u64) {
        match peer {
            Peer::Edge(edge) if viewers == 0 => {
                self.hellos.remove(&edge);
            }
            Peer::Edge(edge) => {
                self.hellos.insert(edge, Instant::now());
            }
            Peer::Region(region) if viewers == 0 => {
                self.regions.remove(&region);
            }
            // Bus messages are not trusted: a flood of made-up region names
            // must not grow the room without end.
            Peer::Region(region) if self.regions.len() >= MAX_REGIONS && !self.regions.contains_key(&region) => {
                metrics::counter!("throng_regions_over_cap_total").increment(1);
                tracing::debug!(%region, "a room heard from more regions than it keeps; ignored");
            }
            Peer::Region(region) => {
                self.regions.insert(region, (viewers, Instant::now()));
            }
        }
    }

    /// Forgets regions and edges that stopped saying so.
    fn expire_peers(&mut self) {
        let ttl = self.peer_ttl;
        self.regions.retain(|_, (_, at)| at.elapsed() < ttl);
        self.hellos.retain(|_, at| at.elapsed() < ttl);
    }

    /// Origin: viewers on other edges now, as their regions count them.
    fn peers(&mut self) -> u64 {
        self.expire_peers();
        // Saturating: a bogus count must not wrap the total.
        self.regions.values().fold(0, |sum, (n, _)| sum.saturating_add(*n))
    }

    /// Origin: whether any other edge wants the room's batches.
    fn wanted(&mut self) -> bool {
        self.expire_peers();
        !self.regions.is_empty() || !self.hellos.is_empty()
    }

    /// Origin: publishes the tick's frames for the relays, if any edge has
    /// viewers, or only the new last number if that is all that changed.
    async fn tell_relays(&mut self, tick: Publish<'_>) {
        let Publish {
            deliveries,
            last_seq,
            committed,
            prev_delivered,
            within,
        } = tick;
        if !self.wanted() || (deliveries.is_empty() && last_seq == self.told_seq && committed == self.told_committed) {
            return;
        }
        self.batch_no += 1;
        self.told_seq = last_seq;
        self.told_committed = committed;
        let batch = RoomBatch {
            tenant: self.key.tenant.to_string(),
            room: self.key.name.to_string(),
            origin: self.links.edge_id().to_owned(),
            epoch: self.links.cluster().incarnation(),
            batch_no: self.batch_no,
            last_seq,
            committed,
            prev_delivered,
            frames: deliveries.iter().map(|d| d.frame.to_vec()).collect(),
        };
        let subject = bus::room_subject(&self.key.tenant, &self.key.name, self.links.edge_id());
        self.links.publish_batch(subject, &batch, within).await;
    }

    fn is_origin(&self) -> bool {
        self.role == Role::Origin
    }

    fn count_origin(&mut self, origin: bool) {
        if origin != self.counted {
            self.counted = origin;
            self.links.cluster().originates(origin);
        }
    }
}

impl ClusterPort for RoomLink {
    fn is_origin(&self) -> bool {
        RoomLink::is_origin(self)
    }

    fn next(&mut self) -> BoxFuture<'_, Heard> {
        Box::pin(RoomLink::next(self))
    }

    fn reconsider(&mut self, viewers: u64, delivered: u64, numbered_here: u64) -> BoxFuture<'_, ()> {
        Box::pin(RoomLink::reconsider(self, viewers, delivered, numbered_here))
    }

    fn recent_from_origin(&mut self) -> BoxFuture<'_, Vec<throng_wire::Message>> {
        Box::pin(RoomLink::recent_from_origin(self))
    }

    fn origin_epoch(&self) -> Option<u64> {
        self.relay_epoch()
    }

    fn seen_seq(&self) -> u64 {
        self.seen_seq
    }

    fn origin_committed(&self) -> u64 {
        self.origin_committed
    }

    fn peer_viewers(&mut self, peer: Peer, viewers: u64) {
        self.count_peer(peer, viewers);
    }

    fn peer_count(&mut self) -> u64 {
        self.peers()
    }

    fn interested(&mut self) -> bool {
        self.wanted()
    }

    fn publish<'a>(&'a mut self, tick: Publish<'a>) -> BoxFuture<'a, ()> {
        Box::pin(self.tell_relays(tick))
    }

    fn forward(&self, message: Inbound) {
        // Relayed: the origin runs the room; its senders' messages go
        // there, and their answers come back from there.
        if let Role::Relay { origin } = &self.role {
            let hops = message.hops;
            self.links.forward(origin, &self.key, message, hops);
        }
    }

    fn viewers_changed(&self, viewers: u64) {
        if let Role::Relay { origin } = &self.role {
            self.links.relayed(&self.key, origin, viewers, self.numbered_here);
        }
    }

    /// Its origin hears it has no viewers here.
    fn retire(&mut self) {
        self.links.relayed(&self.key, "", 0, 0);
        self.count_origin(false);
    }
}

enum Got {
    Live(bool),
    Message(Option<async_nats::Message>),
}

fn role_of(live: &LiveSet, me: &str, key: &RoomKey) -> Role {
    match live.origin(&key.tenant, &key.name) {
        Some(origin) if origin != me => Role::Relay {
            origin: origin.to_owned(),
        },
        _ => Role::Origin,
    }
}
