//! Throng's wire protocol, sans-IO: no sockets, no tokio, no clock reads.
//!
//! # Layout
//!
//! - [`frame`]: what travels. [`ClientFrame`] goes client → edge on the
//!   connection's one bidirectional control stream. [`EdgeFrame`] goes edge →
//!   client: replies on the control stream, and on each room's own
//!   unidirectional stream a [`EdgeFrame::Joined`] followed by
//!   [`EdgeFrame::Batch`] frames.
//! - [`codec`]: length framing. Every frame is a 4-byte big-endian length
//!   followed by a postcard payload. [`FrameDecoder::check`] looks at the
//!   prefix and refuses an oversized frame before a byte of it is buffered or
//!   allocated; "need more bytes" is `Ok(None)`, not an error.
//!   [`split_to_fit`] cuts a batch's messages into runs that each fit a frame.
//! - [`error`]: typed decode/encode errors and the stable numeric
//!   [`ErrorCode`]s that reach clients in `Error` and `Rejected` frames.
//! - [`bus`]: what edges say to each other over NATS (subjects, messages,
//!   their versioned, size-checked encoding).
//! - `fuzzing` (hidden): the checks that `fuzz/` runs on arbitrary bytes and
//!   that `tests/fuzz_corpus.rs` replays on the saved corpus.
//!
//! The protocol version is the ALPN string [`ALPN`]; an incompatible change
//! gets a new ALPN rather than a version field inside frames.

pub mod bus;
pub mod codec;
pub mod error;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;

pub use codec::{FrameBuffer, FrameDecoder, LENGTH_PREFIX, encode, split_to_fit};
pub use error::{DecodeError, EncodeError, ErrorCode};
pub use frame::{
    Batch, ClientFrame, Counters, EdgeFrame, GiftCount, Kind, Limits, Message, Resumed, Role, Session,
    validate_room_name,
};

/// ALPN protocol id of this protocol version, negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"throng/3";

/// Default largest frame, length prefix excluded.
pub const DEFAULT_MAX_FRAME: u32 = 64 * 1024;

/// No configuration may raise the frame limit above this: it bounds what one
/// peer can make the other buffer.
pub const HARD_MAX_FRAME: u32 = 16 * 1024 * 1024;

/// Longest room name, in bytes.
pub const MAX_ROOM_NAME: usize = 128;
