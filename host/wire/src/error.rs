//! Errors of the codec and the stable codes that reach clients.

use thiserror::Error;

/// Stable numeric codes carried by `Error` and `Rejected` frames.
///
/// The numbers are part of the protocol: never renumber, only add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The bytes of a frame do not decode.
    Malformed = 1,
    /// The length prefix exceeds the frame limit.
    FrameTooLarge = 2,
    /// A well-formed frame that is not allowed here (e.g. `Join` before `Hello`).
    UnexpectedFrame = 3,
    /// The peer did not say `Hello` in time, or said it without a token.
    Unauthenticated = 10,
    /// The token's `exp` has passed.
    TokenExpired = 11,
    /// The token's signature does not verify with the tenant's key.
    TokenInvalid = 12,
    /// The token is not a well-formed JWT with the claims Throng needs.
    TokenMalformed = 13,
    /// The token names a tenant this edge does not know.
    UnknownTenant = 14,
    /// The token's algorithm is not the one configured for its tenant (`none` included).
    AlgorithmNotAllowed = 15,
    /// The token does not allow this room, or the role may not send this kind.
    Forbidden = 20,
    /// The connection already holds the maximum number of rooms.
    TooManyRooms = 21,
    /// The connection sent to or left a room it has not joined.
    NotJoined = 22,
    /// A room name that is empty, too long or has characters outside `[A-Za-z0-9._:-]`.
    BadRoomName = 23,
    /// A message body over the limit announced in `Welcome`.
    BodyTooLarge = 24,
    /// The viewer read too slowly for too long and was disconnected.
    TooSlow = 25,
    /// A presence query asked about more users than allowed.
    QueryTooLarge = 26,
    /// A group room already has its maximum number of members.
    RoomFull = 27,
    /// A join would create a room beyond a limit (the tenant's rooms on
    /// this edge, the user's or the connection's rate of new rooms, or the
    /// edge's capacity for rooms). Not fatal; try again later.
    RoomLimit = 28,
    /// A `Seen` for a sequence number the room has not reached; the
    /// cursor stays where it was.
    SeqOutOfRange = 29,
    /// The user's send rate is exhausted.
    RateLimited = 30,
    /// A group room's tenant stores as many messages on this edge as it
    /// may; not fatal: sending again after retention has freed some may
    /// succeed.
    StorageFull = 31,
    /// The edge is overloaded: at its maximum number of connections (as an
    /// `Error`, fatal), or a group room's log is behind (as a `Rejected`).
    ServerBusy = 40,
    /// The edge is shutting down.
    ShuttingDown = 41,
    /// An operator or the tenant's backend ended this session (the text
    /// says why). A client should not reconnect by itself.
    Disconnected = 42,
    /// A tenant filter rejected the message.
    Filtered = 50,
    /// A tenant filter configured `on_failure = "closed"` could not judge
    /// the message's batch (it failed, is quarantined, or is starting
    /// again), so the message was not delivered. Not fatal; sending again
    /// later may succeed.
    FilterUnavailable = 51,
    /// Something went wrong on the edge; not the client's fault.
    Internal = 99,
}

impl ErrorCode {
    /// Every code, for tests and documentation.
    pub const ALL: [ErrorCode; 27] = [
        Self::Malformed,
        Self::FrameTooLarge,
        Self::UnexpectedFrame,
        Self::Unauthenticated,
        Self::TokenExpired,
        Self::TokenInvalid,
        Self::TokenMalformed,
        Self::UnknownTenant,
        Self::AlgorithmNotAllowed,
        Self::Forbidden,
        Self::TooManyRooms,
        Self::NotJoined,
        Self::BadRoomName,
        Self::BodyTooLarge,
        Self::TooSlow,
        Self::QueryTooLarge,
        Self::RoomFull,
        Self::RoomLimit,
        Self::SeqOutOfRange,
        Self::RateLimited,
        Self::StorageFull,
        Self::ServerBusy,
        Self::ShuttingDown,
        Self::Disconnected,
        Self::Filtered,
        Self::FilterUnavailable,
        Self::Internal,
    ];

    /// The number sent on the wire.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The code for a number, if this version knows it.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// Whether the edge closes the connection after sending this code as an `Error`.
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            Self::Malformed
                | Self::FrameTooLarge
                | Self::UnexpectedFrame
                | Self::Unauthenticated
                | Self::TokenExpired
                | Self::TokenInvalid
                | Self::TokenMalformed
                | Self::UnknownTenant
                | Self::AlgorithmNotAllowed
                | Self::ServerBusy
                | Self::ShuttingDown
                | Self::Disconnected
                | Self::TooSlow
                | Self::Internal
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?} ({})", self.code())
    }
}

/// Why a buffer does not hold a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The length prefix announces more than the limit; nothing was buffered.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u32, max: u32 },
    /// A zero length prefix: every frame has at least a variant tag.
    #[error("empty frame")]
    Empty,
    /// The payload is not a valid postcard encoding of the expected frame type.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The payload decoded but did not use all its bytes.
    #[error("frame has {0} trailing bytes")]
    TrailingBytes(usize),
}

impl DecodeError {
    /// The code sent to the peer when this error ends its connection.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooLarge { .. } => ErrorCode::FrameTooLarge,
            Self::Empty | Self::Malformed(_) | Self::TrailingBytes(_) => ErrorCode::Malformed,
        }
    }
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The encoded frame would exceed the limit the peer accepts.
    #[error("encoded frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: u32 },
    /// postcard refused the value (not expected for Throng's own types).
    #[error("cannot encode frame: {0}")]
    Postcard(String),
}
