//! A room's place in its cluster, and the port it reaches the cluster by.
//!
//! A room is [`Place::Solo`] on an edge without a cluster. In a cluster it
//! is its room's [`Place::Origin`] (it numbers, filters and decides; other
//! edges relay it) or a [`Place::Relay`] (it writes its origin's frames to
//! its viewers and forwards its senders' messages). Which one is the
//! cluster's to say (the live set names each room's origin): the room asks
//! its [`ClusterPort`] and moves between the two when told.
//!
//! The port is all the room knows of the cluster: `room/` imports nothing
//! of `cluster/`, which implements the port over NATS
//! (`cluster::room_link`). What the room decides stays here: numbering and
//! fencing in the sequencer, holding a group tick until stored, and the
//! tick itself, which does not change between the three places.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use throng_wire::Message;

use super::slot::Delivery;
use super::{Inbound, Peer, RoomKey};
use crate::group_store::GroupStore;

/// What the room's task hears from the cluster.
#[derive(Debug)]
pub enum Heard {
    /// A relay's frames to write to its viewers, as the origin encoded them.
    Frames(Vec<Arc<Delivery>>),
    /// Who runs the room may have changed.
    Live,
    /// Nothing for the room (a batch of another's, a malformed message).
    Nothing,
}

/// What an origin tells its relays after a tick.
#[derive(Debug)]
pub struct Publish<'a> {
    /// The tick's frames, encoded once; relays write these very bytes.
    pub deliveries: &'a [Arc<Delivery>],
    /// The highest number handed out.
    pub last_seq: u64,
    /// Group rooms: how far the log is stored.
    pub committed: u64,
    /// The highest number delivered before these frames.
    pub prev_delivered: u64,
    /// How long the bus may take: the room's tick.
    pub within: Duration,
}

/// What a room asks of the cluster it is in.
pub trait ClusterPort: Send + Sync + std::fmt::Debug {
    /// Whether this edge is the room's origin now.
    fn is_origin(&self) -> bool;
    /// Waits for what the cluster has for the room.
    fn next(&mut self) -> BoxFuture<'_, Heard>;
    /// Rereads who runs the room, with this edge's `viewers`, the
    /// highest number of a group room's log its viewers were given
    /// (`delivered`; 0 for a livecast room, whose origins number apart),
    /// and the highest number this edge handed out itself as a livecast
    /// room's origin (`numbered_here`; 0 otherwise), which a new origin
    /// must number above.
    fn reconsider(&mut self, viewers: u64, delivered: u64, numbered_here: u64) -> BoxFuture<'_, ()>;
    /// A relay's recent messages, from its origin's ring (empty on an
    /// origin).
    fn recent_from_origin(&mut self) -> BoxFuture<'_, Vec<Message>>;
    /// Relay: the numbering of the room's origin, when known.
    fn origin_epoch(&self) -> Option<u64>;
    /// The highest number seen from any origin of the room.
    fn seen_seq(&self) -> u64;
    /// Relay (group rooms): how far the origin says the log is stored.
    fn origin_committed(&self) -> u64;
    /// An edge's first (or no more) viewers, or a region's total.
    fn peer_viewers(&mut self, peer: Peer, viewers: u64);
    /// Origin: viewers on other edges now, as their regions count them.
    fn peer_count(&mut self) -> u64;
    /// Origin: whether any other edge wants the room's batches.
    fn interested(&mut self) -> bool;
    /// Origin: tells the relays of a tick.
    fn publish<'a>(&'a mut self, tick: Publish<'a>) -> BoxFuture<'a, ()>;
    /// Relay: sends a message on to the room's origin.
    fn forward(&self, message: Inbound);
    /// Relay: tells the origin this edge's viewer count.
    fn viewers_changed(&self, viewers: u64);
    /// The room retires here.
    fn retire(&mut self);
}

/// What a room's port is made with.
#[derive(Debug)]
pub struct PortSetup {
    pub max_frame: u32,
    pub presence_interval: Duration,
    /// Group rooms: the log, where a relay fills a gap on the bus.
    pub log: Option<GroupStore>,
}

/// Where rooms get their ports: the edge's cluster.
pub trait Cluster: Send + Sync + std::fmt::Debug {
    /// A port for room `key`, with its place already decided.
    fn open<'a>(&'a self, key: &'a RoomKey, setup: PortSetup) -> BoxFuture<'a, Box<dyn ClusterPort>>;
}

/// A room's place in its cluster.
#[derive(Debug)]
pub(super) enum Place {
    /// No cluster: this edge is the room's only one.
    Solo,
    /// This edge runs the room; other edges relay it.
    Origin(Box<dyn ClusterPort>),
    /// Another edge runs the room; this one relays it.
    Relay(Box<dyn ClusterPort>),
}

impl Place {
    pub(super) fn new(port: Option<Box<dyn ClusterPort>>) -> Self {
        match port {
            None => Self::Solo,
            Some(p) if p.is_origin() => Self::Origin(p),
            Some(p) => Self::Relay(p),
        }
    }

    pub(super) fn port(&self) -> Option<&dyn ClusterPort> {
        match self {
            Self::Solo => None,
            Self::Origin(p) | Self::Relay(p) => Some(p.as_ref()),
        }
    }

    fn port_mut(&mut self) -> Option<&mut Box<dyn ClusterPort>> {
        match self {
            Self::Solo => None,
            Self::Origin(p) | Self::Relay(p) => Some(p),
        }
    }

    /// Whether this edge numbers the room (alone, or as its origin).
    pub(super) fn numbers(&self) -> bool {
        !matches!(self, Self::Relay(_))
    }

    pub(super) fn is_relay(&self) -> bool {
        matches!(self, Self::Relay(_))
    }

    /// Waits for what the cluster has for the room; never, when solo.
    pub(super) async fn next(&mut self) -> Heard {
        match self.port_mut() {
            Some(p) => p.next().await,
            None => std::future::pending().await,
        }
    }

    /// A relay's recent messages from its origin.
    pub(super) async fn recent_from_origin(&mut self) -> Vec<Message> {
        match self {
            Self::Relay(p) => p.recent_from_origin().await,
            _ => Vec::new(),
        }
    }

    /// Rereads who runs the room and takes the place the cluster gives:
    /// true when the room's origin moved here.
    pub(super) async fn reconsider(&mut self, viewers: u64, delivered: u64, numbered_here: u64) -> bool {
        let Some(port) = self.port_mut() else { return false };
        port.reconsider(viewers, delivered, numbered_here).await;
        let was_relay = self.is_relay();
        let place = std::mem::replace(self, Self::Solo);
        *self = match place {
            Self::Origin(p) | Self::Relay(p) => Self::new(Some(p)),
            Self::Solo => Self::Solo,
        };
        was_relay && !self.is_relay()
    }

    /// Origin: viewers on other edges.
    pub(super) fn peer_count(&mut self) -> u64 {
        match self {
            Self::Origin(p) => p.peer_count(),
            _ => 0,
        }
    }

    /// Origin: whether other edges want the room's batches (an edge with
    /// new viewers does before its region counts them).
    pub(super) fn peers_interested(&mut self) -> bool {
        match self {
            Self::Origin(p) => p.interested(),
            _ => false,
        }
    }

    /// Tells the cluster of another edge's or region's viewers; true when
    /// the room now has viewers elsewhere it runs for. Kept even by a
    /// relay: the edges of a cluster see an origin die a moment apart, and
    /// the new origin may hear of another edge's viewers before it knows
    /// the room is now its own.
    pub(super) fn peer_viewers(&mut self, peer: Peer, viewers: u64) -> bool {
        let origin = matches!(self, Self::Origin(_));
        match self.port_mut() {
            Some(p) => {
                p.peer_viewers(peer, viewers);
                viewers > 0 && origin
            }
            None => false,
        }
    }

    /// Relay: tells the origin this edge's viewer count.
    pub(super) fn viewers_changed(&self, viewers: u64) {
        if let Self::Relay(p) = self {
            p.viewers_changed(viewers);
        }
    }

    /// Origin: tells the relays of a tick.
    pub(super) async fn publish(&mut self, tick: Publish<'_>) {
        if let Self::Origin(p) = self {
            p.publish(tick).await;
        }
    }

    /// The room retires here.
    pub(super) fn retire(&mut self) {
        if let Some(p) = self.port_mut() {
            p.retire();
        }
    }
}

/// A room driven through a port of the test's own: what the room does in
/// each place, with no NATS (the cluster's own tests run it over NATS).
#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use throng_wire::{EdgeFrame, Kind};
    use tokio::sync::{Notify, mpsc, watch};
    use tokio::time::timeout;

    use super::*;
    use crate::room::{Creator, ReplyTx, Rooms, RoomsSetup, ViewerSlot};

    /// What the test's cluster says and what it was told.
    #[derive(Debug, Default)]
    struct Told {
        origin: bool,
        seen_seq: u64,
        forwarded: Vec<(u64, Vec<u8>)>,
        /// Each publish's last number and delivered sequence numbers.
        published: Vec<(u64, Vec<u64>)>,
        relay_viewers: Vec<u64>,
        /// What each reconsider said this edge numbered itself.
        numbered_here: Vec<u64>,
    }

    #[derive(Debug)]
    struct TestCluster {
        told: Arc<Mutex<Told>>,
        changed: Arc<Notify>,
        heard: Mutex<Option<mpsc::Receiver<Heard>>>,
    }

    #[derive(Debug)]
    struct TestPort {
        told: Arc<Mutex<Told>>,
        changed: Arc<Notify>,
        heard: mpsc::Receiver<Heard>,
        origin: bool,
    }

    impl Cluster for TestCluster {
        fn open<'a>(&'a self, _key: &'a RoomKey, _setup: PortSetup) -> BoxFuture<'a, Box<dyn ClusterPort>> {
            let heard = self.heard.lock().unwrap().take().expect("one room");
            let origin = self.told.lock().unwrap().origin;
            Box::pin(async move {
                Box::new(TestPort {
                    told: Arc::clone(&self.told),
                    changed: Arc::clone(&self.changed),
                    heard,
                    origin,
                }) as Box<dyn ClusterPort>
            })
        }
    }

    impl TestPort {
        fn tell(&self, f: impl FnOnce(&mut Told)) {
            f(&mut self.told.lock().unwrap());
            self.changed.notify_waiters();
        }
    }

    impl ClusterPort for TestPort {
        fn is_origin(&self) -> bool {
            self.origin
        }
        fn next(&mut self) -> BoxFuture<'_, Heard> {
            Box::pin(async move {
                match self.heard.recv().await {
                    Some(h) => h,
                    None => std::future::pending().await,
                }
            })
        }
        fn reconsider(&mut self, _viewers: u64, _delivered: u64, numbered_here: u64) -> BoxFuture<'_, ()> {
            self.origin = self.told.lock().unwrap().origin;
            self.tell(|t| t.numbered_here.push(numbered_here));
            Box::pin(async {})
        }
        fn recent_from_origin(&mut self) -> BoxFuture<'_, Vec<Message>> {
            Box::pin(async { Vec::new() })
        }
        fn origin_epoch(&self) -> Option<u64> {
            Some(77)
        }
        fn seen_seq(&self) -> u64 {
            self.told.lock().unwrap().seen_seq
        }
        fn origin_committed(&self) -> u64 {
            0
        }
        fn peer_viewers(&mut self, _peer: Peer, _viewers: u64) {}
        fn peer_count(&mut self) -> u64 {
            0
        }
        fn interested(&mut self) -> bool {
            false
        }
        fn publish<'a>(&'a mut self, tick: Publish<'a>) -> BoxFuture<'a, ()> {
            let seqs = tick
                .deliveries
                .iter()
                .flat_map(|d| d.batch.messages.iter().map(|m| m.seq))
                .collect();
            self.tell(|t| t.published.push((tick.last_seq, seqs)));
            Box::pin(async {})
        }
        fn forward(&self, message: Inbound) {
            self.tell(|t| t.forwarded.push((message.client_msg_id, message.body)));
        }
        fn viewers_changed(&self, viewers: u64) {
            self.tell(|t| t.relay_viewers.push(viewers));
        }
        fn retire(&mut self) {}
    }

    /// Waits (bounded) until what the port was told passes `check`.
    async fn until(told: &Arc<Mutex<Told>>, changed: &Notify, check: impl Fn(&Told) -> bool) {
        let waited = timeout(Duration::from_secs(10), async {
            loop {
                let notified = changed.notified();
                if check(&told.lock().unwrap()) {
                    return;
                }
                notified.await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "the port was not told in time: {:?}",
            told.lock().unwrap()
        );
    }

    fn send(room: &crate::room::RoomHandle, reply: &ReplyTx, id: u64) {
        room.send(Inbound {
            sender: Arc::from("ann"),
            kind: Kind::Chat,
            body: format!("m{id}").into_bytes(),
            client_msg_id: id,
            reply: reply.clone(),
            received_ms: 0,
            hops: 0,
        })
        .map_err(|(_, e)| e)
        .expect("the room takes the send");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_relay_forwards_and_numbers_nothing_as_origin_numbers_above_what_it_saw_then_tells_how_far() {
        let config = crate::Config::dev().expect("the embedded config");
        let dir = tempfile::tempdir().expect("a temp dir");
        let log = crate::log::GroupLog::open(&dir.path().join("group.redb"), Duration::from_millis(5), 1_000)
            .expect("a group log");
        let wasm = crate::wasm::WasmSettings {
            max_instances: 16,
            ..Default::default()
        };
        let runtime = crate::wasm::WasmRuntime::new(wasm).expect("a Wasm runtime");
        let (_modules_tx, modules) = watch::channel(Arc::new(crate::modules::ModuleSet::empty(20)));
        let workers = crate::workers::ClassWorkers::start(&config.rooms.classes).expect("class workers");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let rooms = Rooms::new(RoomsSetup {
            config: config.rooms.clone(),
            max_frame: config.limits.max_frame_bytes,
            max_body: config.limits.max_body_bytes,
            runtime,
            modules,
            log: crate::group_store::GroupStore::Local(log),
            shutdown: shutdown.clone(),
            pools: workers.handles(),
            max_rooms: 10,
            max_rooms_per_tenant: 10,
            tenants: 1,
            room_create_rate_per_sec: 10,
            room_create_burst: 10,
            incarnation: 5,
        });
        let told = Arc::new(Mutex::new(Told {
            origin: false,
            seen_seq: 500,
            ..Told::default()
        }));
        let changed = Arc::new(Notify::new());
        let (heard_tx, heard_rx) = mpsc::channel(8);
        rooms.set_cluster(Arc::new(TestCluster {
            told: Arc::clone(&told),
            changed: Arc::clone(&changed),
            heard: Mutex::new(Some(heard_rx)),
        }));

        let key = RoomKey::new("acme", "show");
        let slot = ViewerSlot::new(64, Duration::from_secs(5), || {});
        let creator = Creator {
            user: "acme\0ann",
            connection_may_create: true,
            peer: false,
        };
        let (room, joined, _) = rooms
            .join(&key, 1, Arc::clone(&slot), None, 0, creator)
            .await
            .expect("the join");
        // A relay's joiner hears of the origin's numbers and numbering.
        assert_eq!((joined.last_seq, joined.epoch), (500, 77));
        until(&told, &changed, |t| t.relay_viewers.last() == Some(&1)).await;

        let (reply, mut replies) = ReplyTx::channel(16, || {});
        send(&room, &reply, 1);
        until(&told, &changed, |t| t.forwarded.len() == 1).await;
        assert_eq!(told.lock().unwrap().forwarded[0], (1, b"m1".to_vec()));
        assert!(replies.try_recv().is_err(), "a relay acks nothing: its origin does");
        assert!(told.lock().unwrap().published.is_empty(), "a relay publishes nothing");

        // The origin's frames reach the viewers here as the origin encoded
        // them.
        let batch = throng_wire::Batch {
            room: "show".into(),
            tick: 9,
            messages: vec![Message {
                seq: 501,
                sender: "bob".into(),
                kind: Kind::Chat,
                body: b"from the origin".to_vec(),
            }],
            counters: Default::default(),
            pinned: Vec::new(),
            online: 3,
            missed: 0,
            epoch: 77,
        };
        let frames = crate::room::encode_batch(batch, 64 << 10);
        let bytes = frames[0].frame.clone();
        heard_tx.send(Heard::Frames(frames)).await.expect("the room listens");
        let written = timeout(Duration::from_secs(10), slot.next())
            .await
            .expect("frames in time");
        let crate::room::Next::Batches(written, 0) = written else {
            panic!("not the origin's frames: {written:?}");
        };
        assert_eq!(written[0].frame, bytes, "the very bytes the origin encoded");

        // The origin moves here: the room numbers on above anything it saw
        // and any earlier numbering, and tells its relays.
        let base = super::super::sequencer::time_base();
        told.lock().unwrap().origin = true;
        heard_tx.send(Heard::Live).await.expect("the room listens");
        send(&room, &reply, 2);
        let ack = timeout(Duration::from_secs(10), replies.recv())
            .await
            .expect("an answer in time")
            .expect("an answer");
        let EdgeFrame::Ack {
            client_msg_id: 2,
            seq,
            epoch,
        } = *ack
        else {
            panic!("not the ack of message 2: {ack:?}");
        };
        assert!(seq > base.max(500), "seq {seq} is above the time base {base}");
        assert_eq!(epoch, 5, "acked in this edge's numbering, no longer the origin's 77");
        until(&told, &changed, |t| {
            t.published.iter().any(|(_, seqs)| seqs.contains(&seq))
        })
        .await;
        assert_eq!(told.lock().unwrap().forwarded.len(), 1, "the origin forwards nothing");

        // The origin moves away again: the cluster hears how far this edge
        // numbered the room itself, for the next origin to number above.
        told.lock().unwrap().origin = false;
        heard_tx.send(Heard::Live).await.expect("the room listens");
        until(&told, &changed, |t| t.numbered_here.last() == Some(&seq)).await;
        assert_eq!(
            told.lock().unwrap().numbered_here.first(),
            Some(&0),
            "as a relay it numbered nothing"
        );
        shutdown.cancel();
    }
}
