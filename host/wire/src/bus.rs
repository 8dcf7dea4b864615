//! What edges say to each other on NATS: subjects and messages, sans-IO
//! like the client protocol (the edge's `cluster/` does the talking).
//!
//! Bus messages are postcard-encoded like the wire protocol, with a version
//! byte first so a newer edge can tell an older one's messages apart.
//!
//! **Every subject ends with the edge that publishes on it**
//! (`throng.<what>[.<to>].<from>`), so NATS permissions can let each edge
//! speak only as itself ([`edge_permissions`]), and an edge takes a
//! message's sender from its subject, never from its body alone: a body
//! that names another sender is dropped. Nothing on the bus is trusted to be
//! friendly: every message is size-checked before it is decoded, one that
//! does not decode is counted and dropped, and what a decoded one may change
//! is bounded by who sent it (a live edge), what it names (a tenant this
//! edge knows, a room this edge is the origin of) and what is possible (a
//! count no edge could have).

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A room's name across edges: its tenant and name, unambiguous (the
/// tenant's length first). Rendezvous hashing and subjects use it.
pub fn room_key(tenant: &str, room: &str) -> String {
    format!("{}:{tenant}/{room}", tenant.len())
}

/// Every subject the edges use starts with this.
pub const PREFIX: &str = "throng";

/// Where `edge` announces itself.
pub fn edges_subject(edge: &str) -> String {
    format!("{PREFIX}.edges.{edge}")
}

/// Every edge's announcements (every edge listens).
pub fn all_edges_subject() -> String {
    format!("{PREFIX}.edges.*")
}

/// The edge that published on `subject`: its last token. Subjects are made
/// by the functions here, so every one a receiver subscribed to has one.
pub fn sender_of(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or_default()
}

/// A subject addressed to edge `to` from edge `from`.
fn addressed(what: &str, to: &str, from: &str) -> String {
    format!("{PREFIX}.{what}.{to}.{from}")
}

/// What `me` subscribes to for messages addressed to it.
fn addressed_to(what: &str, me: &str) -> String {
    format!("{PREFIX}.{what}.{me}.*")
}

/// The group logs' subjects: `throng.grouplog.<tenant hash>.<room hash>`,
/// in one JetStream stream per tenant.
pub const GROUP_LOG: &str = "grouplog";

/// The subjects an edge's NATS user may publish on: only those that name
/// it as the sender, the group logs (any edge may become a room's origin;
/// the log's fencing keeps two from writing at once), and JetStream's API.
/// Answers to requests (who is online, disconnects, resyncs) go to the
/// asker's inbox, which NATS allows with `allow_responses`.
pub fn edge_permissions(edge: &str) -> Vec<String> {
    vec![
        format!("{PREFIX}.*.{edge}"),
        format!("{PREFIX}.*.*.{edge}"),
        format!("{PREFIX}.{GROUP_LOG}.>"),
        "$JS.API.>".to_owned(),
        "$JS.ACK.>".to_owned(),
        "$JS.FC.>".to_owned(),
        "$KV.>".to_owned(),
    ]
}

/// The subjects a user that is not an edge must neither publish nor
/// subscribe on: the bus, the group logs and their members, JetStream.
pub fn reserved_subjects() -> Vec<String> {
    vec![format!("{PREFIX}.>"), "$JS.>".to_owned(), "$KV.>".to_owned()]
}

/// Most viewers one edge can have of one room: far beyond any edge's
/// connection limit, so a count above it is made up and dropped.
pub const MAX_EDGE_VIEWERS: u64 = 10_000_000;

/// Largest bus message an edge decodes; announcements are ~100 bytes.
pub const MAX_ANNOUNCE_BYTES: usize = 4096;

/// The bus format's version; a message of another version is dropped.
const VERSION: u8 = 2;

/// "This edge is alive" (or, with `leaving`, "is going away now").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    pub edge_id: String,
    pub region: String,
    /// The QUIC address clients reach the edge at.
    pub quic: String,
    /// When this run of the edge started (Unix ms): a restarted edge with
    /// the same id replaces its earlier self, and a late message from the
    /// earlier one cannot bring it back.
    pub incarnation: u64,
    /// Counts this incarnation's announcements.
    pub seq: u64,
    pub leaving: bool,
}

/// A bus message that could not be read.
#[derive(Debug, Error)]
pub enum BusError {
    #[error("bus message of {0} bytes is over the limit of {1}")]
    TooLarge(usize, usize),
    #[error("bus message is empty")]
    Empty,
    #[error("bus message of version {0}; this edge speaks version {VERSION}")]
    Version(u8),
    #[error("bus message does not decode: {0}")]
    Decode(#[from] postcard::Error),
}

pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut out = vec![VERSION];
    // Serialising our own plain structs into a Vec cannot fail.
    out.extend(postcard::to_allocvec(message).unwrap_or_default());
    out
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], max: usize) -> Result<T, BusError> {
    if bytes.len() > max {
        return Err(BusError::TooLarge(bytes.len(), max));
    }
    match bytes.split_first() {
        None => Err(BusError::Empty),
        Some((&VERSION, rest)) => Ok(postcard::from_bytes(rest)?),
        Some((&v, _)) => Err(BusError::Version(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announce() -> Announce {
        Announce {
            edge_id: "edge-a".into(),
            region: "eu".into(),
            quic: "127.0.0.1:4433".into(),
            incarnation: 1_700_000_000_000,
            seq: 7,
            leaving: false,
        }
    }

    #[test]
    fn an_announcement_round_trips() {
        let bytes = encode(&announce());
        assert!(bytes.len() < 64, "{} bytes", bytes.len());
        assert_eq!(decode::<Announce>(&bytes, MAX_ANNOUNCE_BYTES).unwrap(), announce());
    }

    #[test]
    fn garbage_is_a_typed_error() {
        assert!(matches!(decode::<Announce>(&[], 10), Err(BusError::Empty)));
        assert!(matches!(decode::<Announce>(&[9, 1, 2], 10), Err(BusError::Version(9))));
        assert!(matches!(
            decode::<Announce>(&[VERSION, 200], 10),
            Err(BusError::Decode(_))
        ));
        assert!(matches!(decode::<Announce>(&[1, 0], 10), Err(BusError::Version(1))));
        assert!(matches!(
            decode::<Announce>(&[1; 11], 10),
            Err(BusError::TooLarge(11, 10))
        ));
        let mut bytes = encode(&announce());
        bytes.truncate(bytes.len() - 3);
        assert!(decode::<Announce>(&bytes, MAX_ANNOUNCE_BYTES).is_err());
    }
}

/// Largest room bus message an edge decodes: NATS's default payload limit.
pub const MAX_ROOM_BUS_BYTES: usize = 1024 * 1024;

/// A forward message is cut before it grows past this, leaving NATS room.
pub const FORWARD_SPLIT_BYTES: usize = 512 * 1024;

/// A room's batches, from its origin to every edge with viewers of it. The
/// subject names the room by a hash of its tenant-qualified name: room
/// names may hold characters NATS subjects may not.
pub fn room_subject(tenant: &str, room: &str, origin: &str) -> String {
    format!("{PREFIX}.room.{}.{origin}", room_token(tenant, room))
}

/// A room's batches from whichever edge publishes them (relays check the
/// sender is the origin).
pub fn room_subject_any(tenant: &str, room: &str) -> String {
    format!("{PREFIX}.room.{}.*", room_token(tenant, room))
}

/// A room in one subject token (or KV key part): the hash of its
/// tenant-qualified name, as room names may hold characters subjects may
/// not.
pub fn room_token(tenant: &str, room: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(room_key(tenant, room).as_bytes());
    hex::encode(&digest[..16])
}

/// Sends `from` forwards to the rooms `to` is the origin of.
pub fn ingress_subject(to: &str, from: &str) -> String {
    addressed("ingress", to, from)
}

/// Acks and rejections from `from` for sends `to` forwarded.
pub fn replies_subject(to: &str, from: &str) -> String {
    addressed("replies", to, from)
}

/// `from`'s viewers of the rooms `to` is the origin of.
pub fn interest_subject(to: &str, from: &str) -> String {
    addressed("interest", to, from)
}

/// What `me` hears of `what` ("ingress", "replies", "interest", "counts",
/// "regional", "resync"): messages addressed to it, from any edge.
pub fn inbox_of(what: &str, me: &str) -> String {
    addressed_to(what, me)
}

/// One tick's batch of a room, as its origin encoded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomBatch {
    pub tenant: String,
    pub room: String,
    /// The origin edge, and its incarnation: numbering restarts from
    /// neither, but a relay tells two origins' batch counts apart.
    pub origin: String,
    pub epoch: u64,
    /// Counts this origin's bus batches of the room, from 1, so a relay
    /// sees one that the bus lost.
    pub batch_no: u64,
    /// The highest sequence number the origin has handed out (acked),
    /// delivered or not: whoever takes the room over numbers after it.
    pub last_seq: u64,
    /// Group rooms: the highest sequence number stored in the room's log
    /// (JetStream); relays keep what they delivered beyond it. 0 for
    /// livecast rooms.
    pub committed: u64,
    /// The number of the last message the origin delivered before this
    /// batch's: a relay that wrote less to its viewers missed some (the
    /// bus lost batches, or the origin published none while it thought
    /// nobody listened) and asks the origin's ring for them.
    pub prev_delivered: u64,
    /// Encoded `EdgeFrame::Batch` frames, length prefix included: written
    /// to viewers as they are. None when only `last_seq` moved.
    pub frames: Vec<Vec<u8>>,
}

/// What one edge's clients sent, in one tick, to rooms of one origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    pub from: String,
    pub items: Vec<Forwarded>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forwarded {
    pub tenant: String,
    pub room: String,
    /// The forwarding edge's id for this send; the reply names it.
    pub fwd_id: u64,
    /// Edges it went through: one that disagrees with another on the
    /// room's origin passes it on at most once more.
    pub hops: u8,
    pub sender: String,
    pub kind: crate::Kind,
    pub body: Vec<u8>,
    pub received_ms: u64,
}

impl Forwarded {
    /// About what it takes on the bus.
    pub fn size(&self) -> usize {
        self.tenant.len() + self.room.len() + self.sender.len() + self.body.len() + 32
    }
}

/// An origin's answers to one edge's forwarded sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replies {
    pub items: Vec<Reply>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub fwd_id: u64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Ack { seq: u64, epoch: u64 },
    Rejected { code: u16, reason: String },
}

/// One edge's viewers of the rooms of one origin: their first viewers here,
/// their last leaving, or the room moving to another origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interest {
    pub from: String,
    pub rooms: Vec<RoomInterest>,
}

/// One room in an [`Interest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInterest {
    pub tenant: String,
    pub room: String,
    pub viewers: u64,
    /// The highest sequence number this edge handed out itself, in a
    /// livecast room it originated until now (0 for none): the origin
    /// numbers above it, or this edge's viewers, who saw those numbers,
    /// would take its next messages for repeats. A partition that only
    /// this edge noticed leaves the origin no other way to know.
    pub numbered_to: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomCount {
    pub tenant: String,
    pub room: String,
    pub viewers: u64,
}

/// `from`'s counts, to its region's aggregator `to`.
pub fn counts_subject(to: &str, from: &str) -> String {
    addressed("counts", to, from)
}

/// A region's viewer totals from its aggregator `from`, to origin `to`.
pub fn regional_subject(to: &str, from: &str) -> String {
    addressed("regional", to, from)
}

/// Where `from` asks every edge "which of these users are online here".
pub fn who_subject(from: &str) -> String {
    format!("{PREFIX}.who.{from}")
}

/// Where `from` tells the others to close a user's sessions.
pub fn kick_subject(from: &str) -> String {
    format!("{PREFIX}.kick.{from}")
}

/// Every edge's question of `what` ("who", "kick").
pub fn from_any(what: &str) -> String {
    format!("{PREFIX}.{what}.*")
}

/// Where relay `from` asks room origin `to` for what the bus lost.
pub fn resync_subject(to: &str, from: &str) -> String {
    addressed("resync", to, from)
}

/// One edge's viewers of every room it relays, per presence interval, to
/// its region's aggregator. Whole counts, not changes: a lost message costs
/// one interval of staleness, never a count that is wrong for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeCounts {
    pub from: String,
    pub region: String,
    /// When the edge counted (Unix ms): the origin measures presence lag.
    pub at_ms: u64,
    pub rooms: Vec<OriginCount>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginCount {
    /// The room's origin as the counting edge sees it.
    pub origin: String,
    pub tenant: String,
    pub room: String,
    pub viewers: u64,
}

/// A region's viewers of the rooms of one origin, per presence interval,
/// from the region's aggregator. A room that had viewers in the region's
/// last message and has none now is sent once with 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionCounts {
    pub region: String,
    pub from: String,
    /// The oldest edge count summed in (Unix ms).
    pub at_ms: u64,
    pub rooms: Vec<RoomCount>,
}

/// "Which of these users of `tenant` are online on your edge?"
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoQuery {
    pub from: String,
    pub tenant: String,
    pub users: Vec<String>,
}

/// Close `user`'s sessions on every edge (the server API's disconnect).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KickOrder {
    pub from: String,
    pub tenant: String,
    pub user: String,
    pub reason: String,
}

/// How many sessions an edge closed for a [`KickOrder`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KickAnswer {
    pub from: String,
    pub connections: u32,
}

/// One edge's answer: a bit per asked user, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAnswer {
    pub from: String,
    pub online: Vec<u8>,
}

/// A relay that missed bus batches of a room asks its origin for the
/// room's messages after `after_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resync {
    pub tenant: String,
    pub room: String,
    pub after_seq: u64,
}

/// The origin's answer: its ring's messages after the asked number. It
/// keeps only its most recent ones: `complete` says whether it still had
/// everything after that number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resynced {
    pub origin: String,
    pub messages: Vec<crate::Message>,
    pub complete: bool,
}

/// Packs one bit per user, first user in the lowest bit of the first byte.
pub fn pack_bits(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, b) in bits.iter().enumerate() {
        if *b {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    out
}

/// The `i`th bit of `packed` (false beyond its end).
pub fn bit(packed: &[u8], i: usize) -> bool {
    packed.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

#[cfg(test)]
mod bit_tests {
    use super::*;

    #[test]
    fn bits_round_trip_and_a_short_answer_reads_as_offline() {
        let bits = [true, false, false, true, true, false, false, false, true];
        let packed = pack_bits(&bits);
        assert_eq!(packed.len(), 2);
        for (i, b) in bits.iter().enumerate() {
            assert_eq!(bit(&packed, i), *b, "bit {i}");
        }
        assert!(!bit(&packed, 100));
        assert!(!bit(&[], 0));
    }
}
