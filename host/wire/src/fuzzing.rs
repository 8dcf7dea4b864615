//! The checks behind `fuzz/fuzz_targets/`, shared with the corpus replay in
//! `tests/fuzz_corpus.rs` so CI runs every saved input through the same
//! properties. Each takes the fuzzer's raw bytes and panics only when a
//! property fails; input it cannot use is simply ignored.

use std::fmt::Debug;

use arbitrary::Unstructured;
use bytes::BytesMut;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::decode_payload;
use crate::{ClientFrame, DEFAULT_MAX_FRAME, DecodeError, EdgeFrame, FrameBuffer, FrameDecoder, LENGTH_PREFIX, encode};

/// Target `frame_stream`: a byte stream fed to a [`FrameBuffer`] whole, in
/// arbitrary chunks (empty ones included), and by a reader that fetches
/// exactly what [`FrameDecoder::wanted`] asks for. All three must decode the
/// same frames and end the same way; no drive may hold more than one partial
/// frame plus the chunk just fed; every decoded frame must re-encode under
/// the same limit and decode back to itself.
pub fn frame_stream(data: &[u8]) {
    let Ok(input) = StreamInput::take(&mut Unstructured::new(data)) else {
        return;
    };
    if input.edge_frames {
        check_stream::<EdgeFrame>(&input);
    } else {
        check_stream::<ClientFrame>(&input);
    }
}

#[derive(Debug)]
struct StreamInput<'a> {
    max: u32,
    edge_frames: bool,
    stream: &'a [u8],
    /// Chunk lengths; their sum is at most `stream.len()`, the rest of the
    /// stream goes in one last chunk.
    chunks: Vec<usize>,
}

impl<'a> StreamInput<'a> {
    fn take(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        // Small limits make "too large" reachable; the real ones must be tried too.
        let max = match u.int_in_range(0..=3u8)? {
            0 => u.int_in_range(0..=64)?,
            1 => u.int_in_range(0..=4096)?,
            2 => DEFAULT_MAX_FRAME,
            _ => u.arbitrary()?,
        };
        let edge_frames = u.arbitrary()?;
        let len = u.arbitrary_len::<u8>()?;
        let stream = u.bytes(len)?;
        let mut chunks = Vec::new();
        let mut left = stream.len();
        // Bounded: each round consumes input bytes or stops, and empty chunks
        // are capped at one per stream byte.
        while !u.is_empty() && chunks.len() <= 2 * stream.len() {
            let n = u.int_in_range(0..=left)?;
            chunks.push(n);
            left -= n;
        }
        Ok(Self {
            max,
            edge_frames,
            stream,
            chunks,
        })
    }

    fn chunks(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        let mut rest = self.stream;
        self.chunks
            .iter()
            .map(move |&n| {
                let (chunk, tail) = rest.split_at(n);
                rest = tail;
                chunk
            })
            .chain(std::iter::once_with(move || {
                let consumed: usize = self.chunks.iter().sum();
                &self.stream[consumed..]
            }))
    }
}

/// The frames a drive decoded, then how the stream ended: the first error,
/// or what [`FrameBuffer::finish`] says.
#[derive(Debug, PartialEq)]
struct Outcome<T> {
    frames: Vec<T>,
    end: Result<(), DecodeError>,
}

fn check_stream<T>(input: &StreamInput<'_>)
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let whole = drive_buffer::<T>(input.max, std::iter::once(input.stream));
    let split = drive_buffer::<T>(input.max, input.chunks());
    assert_eq!(whole, split, "splitting the stream changed the outcome: {input:?}");
    let sized = drive_sized::<T>(input.max, input.stream);
    assert_eq!(whole, sized, "reads sized by `wanted` changed the outcome: {input:?}");
    for frame in &whole.frames {
        let bytes = encode(frame, input.max)
            .unwrap_or_else(|e| panic!("decoded frame does not re-encode under its limit: {e}: {frame:?}"));
        let again: T = decode_payload(&bytes[LENGTH_PREFIX..]).expect("a re-encoded frame decodes");
        assert_eq!(&again, frame, "a frame does not survive a round trip");
    }
}

/// Feeds chunks to a [`FrameBuffer`] and takes frames after each, as the
/// edge's connection task and the client's readers do.
fn drive_buffer<'a, T: DeserializeOwned>(max: u32, chunks: impl Iterator<Item = &'a [u8]>) -> Outcome<T> {
    let bound = LENGTH_PREFIX + FrameDecoder::new(max).max() as usize;
    let mut buf = FrameBuffer::<T>::new(max);
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend(chunk);
        // Bounded: every frame taken consumes at least one prefix of bytes.
        loop {
            match buf.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return Outcome { frames, end: Err(e) },
            }
        }
        assert!(
            buf.buffered() < bound,
            "{} bytes held between chunks; a partial frame is less than {bound}",
            buf.buffered()
        );
    }
    Outcome {
        frames,
        end: buf.finish(),
    }
}

/// A reader that fetches exactly what the decoder says it wants next.
fn drive_sized<T: DeserializeOwned>(max: u32, mut stream: &[u8]) -> Outcome<T> {
    let decoder = FrameDecoder::new(max);
    let bound = LENGTH_PREFIX + decoder.max() as usize;
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    // Bounded: each round reads at least one byte or takes a frame.
    loop {
        let wanted = match decoder.wanted(&buf) {
            Ok(n) => n,
            Err(e) => return Outcome { frames, end: Err(e) },
        };
        assert!(
            buf.len() + wanted <= bound.max(LENGTH_PREFIX),
            "wanted {wanted} more bytes with {} held; a frame is at most {bound}",
            buf.len()
        );
        if wanted == 0 {
            match decoder.decode::<T>(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => panic!("`wanted` said 0 but no whole frame is there"),
                Err(e) => return Outcome { frames, end: Err(e) },
            }
            continue;
        }
        if stream.is_empty() {
            let mut rest = FrameBuffer::<T>::new(max);
            rest.extend(&buf);
            return Outcome {
                frames,
                end: rest.finish(),
            };
        }
        let (read, rest) = stream.split_at(wanted.min(stream.len()));
        buf.extend_from_slice(read);
        stream = rest;
    }
}

/// Target `bus_messages`: bytes an edge read off NATS, decoded as one kind
/// of bus message (chosen by the first byte) under the limit edges decode
/// it with. Decoding never panics, refuses what is over the limit without
/// decoding it, and what decodes re-encodes to a message that decodes to
/// the same value (a relay passes on what it got, nothing else).
pub fn bus_messages(data: &[u8]) {
    use crate::bus::*;
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let room = MAX_ROOM_BUS_BYTES;
    match which % 17 {
        0 => bus_round_trip::<Announce>(bytes, MAX_ANNOUNCE_BYTES),
        1 => bus_round_trip::<RoomBatch>(bytes, room),
        2 => bus_round_trip::<Forward>(bytes, room),
        3 => bus_round_trip::<Replies>(bytes, room),
        4 => bus_round_trip::<Interest>(bytes, room),
        5 => bus_round_trip::<RoomCount>(bytes, room),
        6 => bus_round_trip::<EdgeCounts>(bytes, room),
        7 => bus_round_trip::<OriginCount>(bytes, room),
        8 => bus_round_trip::<RegionCounts>(bytes, room),
        9 => bus_round_trip::<WhoQuery>(bytes, room),
        10 => bus_round_trip::<WhoAnswer>(bytes, room),
        11 => bus_round_trip::<KickOrder>(bytes, room),
        12 => bus_round_trip::<KickAnswer>(bytes, room),
        13 => bus_round_trip::<Resync>(bytes, room),
        14 => bus_round_trip::<Resynced>(bytes, room),
        // The announcement limit is the tightest: a room message's bytes
        // read as one must be refused before any decoding.
        15 => bus_round_trip::<Announce>(bytes, 64),
        _ => bus_round_trip::<Forwarded>(bytes, room),
    }
}

fn bus_round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(bytes: &[u8], max: usize) {
    use crate::bus::{BusError, decode, encode};
    match decode::<T>(bytes, max) {
        Err(BusError::TooLarge(len, limit)) => {
            assert!(len > limit && len == bytes.len() && limit == max, "{len} over {limit}?");
        }
        Err(_) => assert!(bytes.len() <= max),
        Ok(message) => {
            assert!(bytes.len() <= max, "decoded {} bytes over the limit {max}", bytes.len());
            let again = encode(&message);
            let back: T = decode(&again, usize::MAX).expect("a re-encoded bus message decodes");
            assert_eq!(back, message, "a bus message changed on its way through");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(max: u32, stream: &[u8], chunks: Vec<usize>) -> StreamInput<'_> {
        StreamInput {
            max,
            edge_frames: false,
            stream,
            chunks,
        }
    }

    #[test]
    fn real_frames_then_garbage_pass_in_any_split() {
        let mut stream = encode(&ClientFrame::Ping { nonce: 7 }, 1024).unwrap().to_vec();
        stream.extend_from_slice(&[0, 0, 0, 1, 200]);
        for cut in 0..=stream.len() {
            check_stream::<ClientFrame>(&input(1024, &stream, vec![cut, 0]));
        }
        let whole = drive_buffer::<ClientFrame>(1024, std::iter::once(&stream[..]));
        assert_eq!(whole.frames, vec![ClientFrame::Ping { nonce: 7 }]);
        assert!(matches!(whole.end, Err(DecodeError::Malformed(_))), "{whole:?}");
    }

    #[test]
    fn an_oversized_prefix_ends_every_drive_alike() {
        check_stream::<EdgeFrame>(&input(16, &[0, 0, 1, 0, 9, 9], vec![1, 1]));
        let sized = drive_sized::<EdgeFrame>(16, &[0, 0, 1, 0, 9, 9]);
        assert_eq!(sized.end, Err(DecodeError::TooLarge { len: 256, max: 16 }));
    }
}
