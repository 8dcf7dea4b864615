//! Rooms: one actor task per room, ticking.
//!
//! Connections talk to a room through its [`RoomHandle`] (join, leave,
//! send). Each tick the room runs its tenant's filters over what arrived,
//! asks its policy what goes out, numbers and acks every accepted message,
//! builds one [`Batch`](throng_wire::Batch), encodes it **once**, and pushes
//! the same bytes into every viewer's [`ViewerSlot`]. A connection task
//! drains each slot into that room's QUIC stream for that viewer; a viewer
//! that cannot keep up loses its oldest batches (counted as `missed`)
//! instead of stalling the room.
//!
//! Rooms are keyed by tenant and name ([`RoomKey`]), so tenant A's `lobby`
//! is not tenant B's. An empty room lingers (keeping its recent messages for
//! reconnects), then retires; [`Rooms::join`] retries if it raced a retiring
//! room.
//!
//! # Layout
//!
//! - `registry`: [`Rooms`], every room on this edge; makes a room on its
//!   first join, within the edge's, tenant's, connection's and user's
//!   limits.
//! - `actor`: a room's task: its mailbox ([`RoomHandle`]), its tick, its
//!   size class.
//! - `tick`: the pure part of a tick: numbering and acks, merging stored
//!   ticks, encoding the batch (unit-tested alone).
//! - `filters`: the tenant's filters over a tick's inbox.
//! - `kind`: livecast or group; `group`: a group room's log state (where
//!   the log ends, what is not on disk yet, a returning member's catch-up).
//! - `ring`: the recent messages a joiner gets.
//! - `sequencer`: what numbers a room's messages: the numbering's epoch,
//!   the fence, and numbers that never go back.
//! - `inbox`: the messages waiting for the room's next tick, from this edge
//!   and, at an origin, from other edges.
//! - `fanout`: the room's viewers, and pushing a batch to all of them: at
//!   once, paced over the class's `spread`, or in shards on the class's
//!   pool.
//! - `slot`: the bounded queues to a connection: a viewer's batches for one
//!   room ([`ViewerSlot`], which evicts a viewer that stays behind) and
//!   replies to a sender's control stream ([`ReplyTx`]).
//! - `place`: a room's place in its cluster (solo, origin, relay) and the
//!   [`ClusterPort`] it reaches the cluster by; `room/` imports nothing of
//!   `cluster/`, which implements the port.
//! - `clock`: room time in whole ticks.
//! - `info`: a room's figures and what it runs, for the admin API.

mod actor;
mod clock;
mod fanout;
mod filters;
mod group;
mod inbox;
mod info;
mod kind;
mod place;
mod registry;
mod ring;
mod sequencer;
mod slot;
mod tick;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use throng_wire::{Kind, Message};

pub use actor::RoomHandle;
pub use info::{RoomInfo, Running};
pub use place::{Cluster, ClusterPort, Heard, PortSetup, Publish};
pub use registry::{Creator, Rooms, RoomsSetup, TENANT_SHARE, tenant_cap};
pub use sequencer::time_base;
pub use slot::{Delivery, Next, ReplyTx, ViewerSlot};
pub(crate) use tick::encode_batch;

/// Most messages read from a group room's log to fill one gap (a relay's
/// on the bus, or what another writer stored meanwhile); a longer gap is
/// told as `missed`.
pub const GAP_FROM_LOG: usize = 10_000;

/// A room's identity on this edge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoomKey {
    pub tenant: Arc<str>,
    pub name: Arc<str>,
}

impl RoomKey {
    pub fn new(tenant: &str, name: &str) -> Self {
        RoomKey {
            tenant: Arc::from(tenant),
            name: Arc::from(name),
        }
    }
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
    /// Edges it was forwarded through on its way to the room's origin.
    pub hops: u8,
}

/// Who tells an origin of viewers on other edges.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// An edge whose first viewers of the room just came (or whose last
    /// just left): the origin publishes to it before its region's count
    /// includes it.
    Edge(String),
    /// A region's total, from its aggregator, every presence interval.
    Region(String),
}

/// Longest filter rejection reason passed on to a sender.
pub const MAX_REASON: usize = 256;

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
    /// Group rooms: how far the log is stored, kept current; a catch-up
    /// waits (briefly) for the log to reach its range's end.
    pub stored: Option<Arc<AtomicU64>>,
    /// The numbering the room's sequence numbers belong to now.
    pub epoch: u64,
    /// What became of the join's resume.
    pub resumed: throng_wire::Resumed,
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
