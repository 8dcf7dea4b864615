//! Length framing: a 4-byte big-endian length, then a postcard payload.

use bytes::{Buf, Bytes, BytesMut};
use serde::{Serialize, de::DeserializeOwned};

use crate::{DecodeError, EncodeError, HARD_MAX_FRAME, Message};

/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// Encodes `frame` with its length prefix, refusing payloads over `max`.
///
/// The result is `Bytes` so one encoding can be written to many streams.
pub fn encode<T: Serialize>(frame: &T, max: u32) -> Result<Bytes, EncodeError> {
    let mut out = vec![0u8; LENGTH_PREFIX];
    let mut out =
        postcard::to_extend(frame, std::mem::take(&mut out)).map_err(|e| EncodeError::Postcard(e.to_string()))?;
    let len = out.len() - LENGTH_PREFIX;
    if len > max.min(HARD_MAX_FRAME) as usize {
        return Err(EncodeError::TooLarge { len, max });
    }
    // The check above bounds len by HARD_MAX_FRAME, which fits in u32.
    out[..LENGTH_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(Bytes::from(out))
}

/// Splits `messages` into runs, in order, that each fit one batch frame of
/// `max_frame` bytes; the first run leaves `reserved` bytes for what else
/// its frame carries (a tick's counters). There is always one run, empty
/// for no messages.
///
/// Sizes are estimates with margin, so nothing is encoded twice: a message
/// counts its body and sender plus 32 bytes, and 1 KiB of every frame is
/// kept for the rest of the batch. A message larger than that budget gets a
/// run of its own (body limits keep every message well inside a frame).
pub fn split_to_fit(messages: Vec<Message>, max_frame: u32, reserved: usize) -> Vec<Vec<Message>> {
    let budget = (max_frame as usize).saturating_sub(1024);
    let mut runs: Vec<Vec<Message>> = vec![Vec::new()];
    let mut size = reserved;
    for m in messages {
        let m_size = m.body.len() + m.sender.len() + 32;
        if runs.last().is_some_and(|r| !r.is_empty()) && size + m_size > budget {
            runs.push(Vec::new());
            size = 0;
        }
        size += m_size;
        if let Some(r) = runs.last_mut() {
            r.push(m);
        }
    }
    runs
}

/// Splits a byte stream into frames, checking each length before buffering it.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max: u32,
}

impl FrameDecoder {
    /// A decoder refusing payloads over `max` bytes (capped at [`HARD_MAX_FRAME`]).
    pub fn new(max: u32) -> Self {
        Self {
            max: max.min(HARD_MAX_FRAME),
        }
    }

    /// The payload limit in force.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Looks at the start of `buf`: `Ok(Some(n))` when a whole frame of `n`
    /// bytes (prefix included) is there, `Ok(None)` when more bytes are
    /// needed, an error as soon as the prefix announces an invalid length.
    pub fn check(&self, buf: &[u8]) -> Result<Option<usize>, DecodeError> {
        let Some(prefix) = buf.first_chunk::<LENGTH_PREFIX>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix);
        if len == 0 {
            return Err(DecodeError::Empty);
        }
        if len > self.max {
            return Err(DecodeError::TooLarge { len, max: self.max });
        }
        let total = LENGTH_PREFIX + len as usize;
        Ok((buf.len() >= total).then_some(total))
    }

    /// How many more bytes the reader should fetch before `decode` can make
    /// progress; never more than one frame, so a reader sizes reads by it.
    pub fn wanted(&self, buf: &[u8]) -> Result<usize, DecodeError> {
        match buf.first_chunk::<LENGTH_PREFIX>() {
            None => Ok(LENGTH_PREFIX - buf.len()),
            Some(_) => match self.check(buf)? {
                Some(_) => Ok(0),
                None => {
                    let len = u32::from_be_bytes(*buf.first_chunk::<LENGTH_PREFIX>().unwrap_or(&[0; 4]));
                    Ok(LENGTH_PREFIX + len as usize - buf.len())
                }
            },
        }
    }

    /// Takes one frame off the front of `buf`, if a whole one is there.
    pub fn decode<T: DeserializeOwned>(&self, buf: &mut BytesMut) -> Result<Option<T>, DecodeError> {
        let Some(total) = self.check(buf)? else {
            return Ok(None);
        };
        let mut frame = buf.split_to(total);
        frame.advance(LENGTH_PREFIX);
        decode_payload(&frame).map(Some)
    }
}

/// A receive buffer for one stream: feed it bytes as they arrive, take
/// frames out. Holds at most one partial frame plus the last chunk fed,
/// because [`FrameDecoder::check`] refuses an oversized prefix at once.
#[derive(Debug)]
pub struct FrameBuffer<T> {
    decoder: FrameDecoder,
    buf: BytesMut,
    _frame: std::marker::PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> FrameBuffer<T> {
    pub fn new(max: u32) -> Self {
        Self {
            decoder: FrameDecoder::new(max),
            buf: BytesMut::new(),
            _frame: std::marker::PhantomData,
        }
    }

    /// Appends bytes received from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held now: what `next_frame` has not taken yet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<T>, DecodeError> {
        self.decoder.decode(&mut self.buf)
    }

    /// Checks that the stream did not end inside a frame.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(format!(
                "stream ended {} bytes into a frame",
                self.buf.len()
            )))
        }
    }
}

/// Decodes one payload (no prefix), requiring every byte to be used.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) = postcard::take_from_bytes(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClientFrame, EdgeFrame, Kind};

    fn send(body: &[u8]) -> ClientFrame {
        ClientFrame::Send {
            room: "lobby".into(),
            kind: Kind::Chat,
            body: body.to_vec(),
            client_msg_id: 7,
        }
    }

    #[test]
    fn round_trip_through_a_split_stream() {
        let d = FrameDecoder::new(1024);
        let a = encode(&send(b"hello"), 1024).unwrap();
        let b = encode(&ClientFrame::Ping { nonce: 9 }, 1024).unwrap();
        let all: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in all {
            buf.extend_from_slice(&[byte]);
            while let Some(f) = d.decode::<ClientFrame>(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![send(b"hello"), ClientFrame::Ping { nonce: 9 }]);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_prefix_is_refused_before_the_payload_arrives() {
        let d = FrameDecoder::new(100);
        let prefix = 101u32.to_be_bytes();
        assert_eq!(d.check(&prefix), Err(DecodeError::TooLarge { len: 101, max: 100 }));
        assert_eq!(
            d.check(&u32::MAX.to_be_bytes()).unwrap_err().code(),
            crate::ErrorCode::FrameTooLarge
        );
    }

    #[test]
    fn need_more_bytes_is_not_an_error() {
        let d = FrameDecoder::new(100);
        assert_eq!(d.check(&[0, 0]), Ok(None));
        assert_eq!(d.check(&[0, 0, 0, 5, 1]), Ok(None));
        assert_eq!(d.wanted(&[0, 0]), Ok(2));
        assert_eq!(d.wanted(&[0, 0, 0, 5, 1]), Ok(4));
    }

    #[test]
    fn zero_length_and_trailing_bytes_are_malformed() {
        let d = FrameDecoder::new(100);
        assert_eq!(d.check(&[0, 0, 0, 0]), Err(DecodeError::Empty));
        // Ping { nonce: 1 } is [4, 1]; one extra byte must not be ignored.
        let mut buf = BytesMut::from(&[0u8, 0, 0, 3, 4, 1, 0][..]);
        assert_eq!(d.decode::<ClientFrame>(&mut buf), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn unknown_variant_is_malformed() {
        let d = FrameDecoder::new(100);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 1, 200][..]);
        let err = d.decode::<ClientFrame>(&mut buf).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)), "{err:?}");
    }

    #[test]
    fn encode_refuses_frames_over_the_limit() {
        let err = encode(&send(&[0; 200]), 100).unwrap_err();
        assert!(matches!(err, EncodeError::TooLarge { max: 100, .. }));
    }

    #[test]
    fn edge_frames_round_trip() {
        let d = FrameDecoder::new(4096);
        let f = EdgeFrame::Rejected {
            client_msg_id: 3,
            code: crate::ErrorCode::RateLimited.code(),
            reason: "slow down".into(),
        };
        let mut buf = BytesMut::from(&encode(&f, 4096).unwrap()[..]);
        assert_eq!(d.decode::<EdgeFrame>(&mut buf).unwrap(), Some(f));
    }

    fn message(seq: u64, body: usize) -> Message {
        Message {
            seq,
            sender: "someone".into(),
            kind: Kind::Chat,
            body: vec![b'x'; body],
        }
    }

    #[test]
    fn split_runs_fit_a_frame_keep_order_and_leave_room_for_counters() {
        let messages: Vec<Message> = (1..=100).map(|seq| message(seq, 500)).collect();
        let runs = split_to_fit(messages.clone(), 8192, 0);
        assert!(runs.len() > 1);
        for run in &runs {
            assert!(!run.is_empty());
            let batch = EdgeFrame::Batch(crate::Batch {
                room: "lobby".into(),
                tick: 1,
                messages: run.clone(),
                counters: crate::Counters::default(),
                pinned: Vec::new(),
                online: 1,
                missed: 0,
                epoch: 1,
            });
            encode(&batch, 8192).expect("a run fits its frame");
        }
        assert_eq!(runs.concat(), messages);
        let reserved = split_to_fit(messages.clone(), 8192, 4000);
        assert!(
            reserved[0].len() < runs[0].len(),
            "the reserved bytes take the first run's room"
        );
        assert_eq!(reserved.concat(), messages);
    }

    #[test]
    fn split_gives_one_run_for_nothing_and_one_per_oversized_message() {
        assert_eq!(split_to_fit(Vec::new(), 8192, 0), vec![Vec::<Message>::new()]);
        let big = vec![message(1, 9000), message(2, 9000)];
        assert_eq!(
            split_to_fit(big.clone(), 8192, 0),
            vec![vec![big[0].clone()], vec![big[1].clone()]]
        );
    }

    #[test]
    fn error_codes_are_stable_and_distinct() {
        use crate::ErrorCode as C;
        assert_eq!(C::Malformed.code(), 1);
        assert_eq!(C::FrameTooLarge.code(), 2);
        assert_eq!(C::TokenExpired.code(), 11);
        assert_eq!(C::RateLimited.code(), 30);
        assert_eq!(C::Internal.code(), 99);
        let mut codes: Vec<u16> = C::ALL.iter().map(|c| c.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), C::ALL.len());
        for c in C::ALL {
            assert_eq!(C::from_code(c.code()), Some(c));
        }
    }

    #[test]
    fn room_names() {
        assert!(crate::validate_room_name("show-42:main_room.v2").is_ok());
        assert!(crate::validate_room_name("").is_err());
        assert!(crate::validate_room_name("a b").is_err());
        assert!(crate::validate_room_name(&"x".repeat(129)).is_err());
    }
}
