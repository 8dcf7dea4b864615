//! The frames of protocol `throng/3`.
//!
//! Field order is the encoding (postcard is not self-describing): add new
//! variants at the end of an enum, and never reorder fields.

use serde::{Deserialize, Serialize};

use crate::MAX_ROOM_NAME;

/// What a chat message is. Policies treat kinds differently (host messages
/// are never dropped; likes fold into counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    Chat,
    Like,
    Gift,
    /// From the room's host; only the `host` and `moderator` roles may send it.
    Host,
    /// From the service; only the `host` and `moderator` roles may send it.
    System,
}

impl Kind {
    /// Every kind, in wire order.
    pub const ALL: [Kind; 5] = [Kind::Chat, Kind::Like, Kind::Gift, Kind::Host, Kind::System];

    /// The lowercase name used in config, CLI and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Like => "like",
            Kind::Gift => "gift",
            Kind::Host => "host",
            Kind::System => "system",
        }
    }

    /// Whether only privileged roles may send this kind.
    pub fn is_privileged(self) -> bool {
        matches!(self, Kind::Host | Kind::System)
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown kind `{s}` (expected chat, like, gift, host or system)"))
    }
}

/// A user's role in a tenant, from the token's `role` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Viewer,
    Host,
    Moderator,
}

impl Role {
    /// The lowercase name used in tokens and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Host => "host",
            Role::Moderator => "moderator",
        }
    }

    /// Whether this role may send `kind`.
    pub fn may_send(self, kind: Kind) -> bool {
        !kind.is_privileged() || matches!(self, Role::Host | Role::Moderator)
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "host" => Ok(Role::Host),
            "moderator" => Ok(Role::Moderator),
            _ => Err(format!("unknown role `{s}` (expected viewer, host or moderator)")),
        }
    }
}

/// Client → edge, on the control stream. The first frame must be `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// Authenticates the connection with a JWT.
    Hello { token: String },
    /// Joins a room. With `resume_from`, the edge replays what it still has
    /// after that sequence number of numbering `epoch` (the `epoch` of the
    /// `Joined` or `Batch` the number came from; 0 if the client does not
    /// know it, and the number is then taken as one of the room's current
    /// numbering). `Joined::resumed` says what became of the resume.
    Join {
        room: String,
        resume_from: Option<u64>,
        epoch: u64,
    },
    /// Leaves a room; the edge finishes the room's stream.
    Leave { room: String },
    /// Sends a message to a joined room. `client_msg_id` comes back in the
    /// `Ack` or `Rejected` that answers it.
    Send {
        room: String,
        kind: Kind,
        body: Vec<u8>,
        client_msg_id: u64,
    },
    /// Liveness check; answered by `Pong` with the same nonce.
    Ping { nonce: u64 },
    /// Which of these users (of the client's tenant) are online on this
    /// edge? Answered by one `Presence` frame with the same `query_id`.
    Presence { query_id: u64, users: Vec<String> },
    /// The client has processed everything in `room` up to `seq`. In a
    /// group room the edge keeps this as the member's cursor: a later join
    /// without `resume_from` (another device, a restarted app) resumes
    /// after it. Livecast rooms ignore it.
    Seen { room: String, seq: u64 },
    /// A later token for the same tenant and user, before the current one
    /// expires: the session goes on under the new token's rights and
    /// expiry. Answered by `Refreshed` or `RefreshRefused`. Without it, the
    /// edge closes the connection with `TokenExpired` at the token's `exp`.
    Refresh { token: String },
}

/// Who the edge believes the client is, echoed in `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub tenant: String,
    pub user: String,
    pub role: Role,
}

/// The limits the edge enforces on this connection, announced in `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub max_frame_bytes: u32,
    pub max_body_bytes: u32,
    pub max_rooms: u32,
    /// Sustained messages per second the user may send (across connections).
    pub send_rate_per_sec: u32,
    /// Messages the user may send in a burst above the sustained rate.
    pub send_burst: u32,
    pub idle_timeout_ms: u64,
}

/// One message as delivered to viewers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Per-room sequence number, increasing; gaps are messages a policy did
    /// not deliver.
    pub seq: u64,
    pub sender: String,
    pub kind: Kind,
    pub body: Vec<u8>,
}

/// Aggregates a policy folds out of individual messages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Likes received this tick.
    pub likes: u64,
    /// Gifts received this tick, by gift name.
    pub gifts: Vec<GiftCount>,
}

impl Counters {
    pub fn is_empty(&self) -> bool {
        self.likes == 0 && self.gifts.is_empty()
    }

    /// Every gift of every name.
    pub fn total_gifts(&self) -> u64 {
        self.gifts.iter().map(|g| g.count).sum()
    }
}

/// How many of one gift arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GiftCount {
    pub gift: String,
    pub count: u64,
}

/// What one room delivered in one tick: encoded once, written to every member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub room: String,
    pub tick: u64,
    pub messages: Vec<Message>,
    pub counters: Counters,
    /// Sequence numbers (of `messages`) to pin above the stream.
    pub pinned: Vec<u64>,
    /// Members online in the room at this tick.
    pub online: u64,
    /// Batches this viewer did not receive because it fell behind.
    pub missed: u64,
    /// The numbering `messages` belong to (see [`EdgeFrame::Joined`]). A
    /// batch whose epoch differs from the one before it on the same stream
    /// follows a change of the room's numbering writer: what was said
    /// between the two is not known to have reached this viewer.
    pub epoch: u64,
}

/// What became of a `Join`'s `resume_from`, said in `Joined`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resumed {
    /// The join asked for no resume.
    Fresh,
    /// Same numbering: everything the room delivered after the client's
    /// number follows (`recent`, then catch-up and live batches). A group
    /// member back from before what retention keeps is told how many
    /// numbers it lost in its first batch's `missed`.
    Continued,
    /// Same numbering, but the room no longer holds everything it
    /// delivered after the client's number (a livecast room's recent
    /// messages moved on): an unknown number of messages is lost.
    Truncated,
    /// The client's number is of another numbering (`previous`): the room
    /// restarted, another edge took it over, or (a group room) its log was
    /// made anew. What was said between is unknown to the edge. A room's
    /// numbers still only go up across epochs, so `recent` and what
    /// follows are what came after the client's number.
    NewEpoch { previous: u64 },
}

/// Edge → client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EdgeFrame {
    /// Answers `Hello`: who the edge believes the client is, the limits,
    /// and when the token expires (seconds since the Unix epoch): the
    /// session ends then unless the client sends `Refresh` first.
    Welcome {
        session: Session,
        limits: Limits,
        expires_at: u64,
    },
    /// First frame of a room's stream: the room, who is online and what was
    /// said recently. `epoch` names the room's numbering: sequence numbers
    /// are only comparable within one epoch. A livecast room's epoch is
    /// its origin's incarnation (a restart or a failover starts another);
    /// a group room's is its log's, so it changes only when the log was
    /// lost. `resumed` says what became of the join's `resume_from`.
    Joined {
        room: String,
        online: u64,
        recent: Vec<Message>,
        epoch: u64,
        resumed: Resumed,
    },
    /// A room's delivery for one tick, on the room's stream.
    Batch(Batch),
    /// The message was accepted and got sequence number `seq` of numbering
    /// `epoch` (the `epoch` of `Joined` and `Batch`: in a livecast room
    /// split by a partition, each side acks in its own).
    Ack { client_msg_id: u64, seq: u64, epoch: u64 },
    /// The message was refused; `code` is an [`crate::ErrorCode`].
    Rejected {
        client_msg_id: u64,
        code: u16,
        reason: String,
    },
    /// An error; `code` is an [`crate::ErrorCode`]. Fatal codes end the connection.
    Error { code: u16, text: String },
    /// Answers `Ping`.
    Pong { nonce: u64 },
    /// A `Join` was refused; the connection stays open.
    JoinRefused { room: String, code: u16, text: String },
    /// Answers a presence query: `online[i]` is whether `users[i]` is online.
    Presence { query_id: u64, online: Vec<bool> },
    /// A presence query was refused (e.g. too many users at once).
    PresenceRefused { query_id: u64, code: u16, text: String },
    /// A `Refresh` was accepted: the session now expires at `expires_at`.
    Refreshed { expires_at: u64 },
    /// A `Refresh` was refused; the session still ends at the old expiry.
    RefreshRefused { code: u16, text: String },
}

/// Checks a room name: 1 to [`MAX_ROOM_NAME`] bytes of `[A-Za-z0-9._:-]`.
pub fn validate_room_name(room: &str) -> Result<(), String> {
    if room.is_empty() {
        return Err("room name is empty".into());
    }
    if room.len() > MAX_ROOM_NAME {
        return Err(format!(
            "room name is {} bytes; the limit is {MAX_ROOM_NAME}",
            room.len()
        ));
    }
    if let Some(c) = room
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(format!(
            "room name has the character {c:?}; allowed are A-Z a-z 0-9 . _ : -"
        ));
    }
    Ok(())
}
