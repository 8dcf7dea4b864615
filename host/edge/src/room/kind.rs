//! The two kinds of room.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::RoomKey;
use super::group::GroupState;
use crate::group_store::GroupStore;

/// What a room promises its members.
#[derive(Debug)]
pub(super) enum RoomKind {
    /// Throttled to what a screen can show by the room's policy; a joiner
    /// gets the room's recent messages.
    Livecast,
    /// Every message, kept in a durable log; a member coming back gets
    /// everything it missed (rooms named by `rooms.group_rooms`).
    Group(GroupState),
}

impl RoomKind {
    /// A group room reads where its log ends before it starts.
    pub(super) async fn open(group_log: Option<&GroupStore>, key: &RoomKey) -> Result<Self, String> {
        match group_log {
            None => Ok(Self::Livecast),
            Some(log) => Ok(Self::Group(GroupState::open(log.clone(), key).await?)),
        }
    }

    /// The last sequence number the room's history holds: numbering goes on
    /// after it. A livecast room's history (its ring) starts empty.
    pub(super) fn last_seq(&self) -> u64 {
        match self {
            Self::Livecast => 0,
            Self::Group(g) => g.last_seq(),
        }
    }

    /// Group rooms: the highest sequence handed out, kept current.
    pub(super) fn head(&self) -> Option<Arc<AtomicU64>> {
        match self {
            Self::Livecast => None,
            Self::Group(g) => Some(g.head()),
        }
    }

    /// Group rooms: how far the log is stored, kept current.
    pub(super) fn stored(&self) -> Option<Arc<AtomicU64>> {
        match self {
            Self::Livecast => None,
            Self::Group(g) => Some(g.stored()),
        }
    }

    /// How far the log is stored (0 for a livecast room).
    pub(super) fn committed(&self) -> u64 {
        match self {
            Self::Livecast => 0,
            Self::Group(g) => g.committed(),
        }
    }

    /// Whether the room may retire: a group room's appends are all on disk.
    pub(super) fn settled(&mut self) -> bool {
        match self {
            Self::Livecast => true,
            Self::Group(g) => g.settled(),
        }
    }
}
