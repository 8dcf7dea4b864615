//! Property tests: every frame round-trips, and no byte string panics the decoder.

use bytes::BytesMut;
use proptest::prelude::*;
use throng_wire::{
    Batch, ClientFrame, Counters, EdgeFrame, FrameDecoder, GiftCount, Kind, Limits, Message, Resumed, Role, Session,
    encode,
};

const MAX: u32 = 1 << 20;

fn kind() -> impl Strategy<Value = Kind> {
    prop::sample::select(Kind::ALL.to_vec())
}

fn role() -> impl Strategy<Value = Role> {
    prop::sample::select(vec![Role::Viewer, Role::Host, Role::Moderator])
}

fn message() -> impl Strategy<Value = Message> {
    (
        any::<u64>(),
        ".{0,16}",
        kind(),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(seq, sender, kind, body)| Message {
            seq,
            sender,
            kind,
            body,
        })
}

fn resumed() -> impl Strategy<Value = Resumed> {
    prop_oneof![
        Just(Resumed::Fresh),
        Just(Resumed::Continued),
        Just(Resumed::Truncated),
        any::<u64>().prop_map(|previous| Resumed::NewEpoch { previous }),
    ]
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        ".{0,64}".prop_map(|token| ClientFrame::Hello { token }),
        (".{0,32}", any::<Option<u64>>(), any::<u64>()).prop_map(|(room, resume_from, epoch)| ClientFrame::Join {
            room,
            resume_from,
            epoch
        }),
        ".{0,32}".prop_map(|room| ClientFrame::Leave { room }),
        (
            ".{0,32}",
            kind(),
            prop::collection::vec(any::<u8>(), 0..256),
            any::<u64>()
        )
            .prop_map(|(room, kind, body, client_msg_id)| ClientFrame::Send {
                room,
                kind,
                body,
                client_msg_id
            }),
        any::<u64>().prop_map(|nonce| ClientFrame::Ping { nonce }),
        (any::<u64>(), prop::collection::vec(".{0,12}", 0..16))
            .prop_map(|(query_id, users)| ClientFrame::Presence { query_id, users }),
        (".{0,16}", any::<u64>()).prop_map(|(room, seq)| ClientFrame::Seen { room, seq }),
        ".{0,64}".prop_map(|token| ClientFrame::Refresh { token }),
    ]
}

fn edge_frame() -> impl Strategy<Value = EdgeFrame> {
    prop_oneof![
        (".{0,16}", ".{0,16}", role(), any::<[u32; 5]>(), any::<[u64; 2]>()).prop_map(|(tenant, user, role, l, t)| {
            let [idle, expires_at] = t;
            EdgeFrame::Welcome {
                expires_at,
                session: Session { tenant, user, role },
                limits: Limits {
                    max_frame_bytes: l[0],
                    max_body_bytes: l[1],
                    max_rooms: l[2],
                    send_rate_per_sec: l[3],
                    send_burst: l[4],
                    idle_timeout_ms: idle,
                },
            }
        }),
        (
            ".{0,16}",
            any::<[u64; 2]>(),
            prop::collection::vec(message(), 0..8),
            resumed()
        )
            .prop_map(|(room, [online, epoch], recent, resumed)| EdgeFrame::Joined {
                room,
                online,
                recent,
                epoch,
                resumed
            }),
        (
            ".{0,16}",
            any::<[u64; 5]>(),
            prop::collection::vec(message(), 0..8),
            prop::collection::vec((".{0,8}", any::<u64>()), 0..4),
            prop::collection::vec(any::<u64>(), 0..4),
        )
            .prop_map(|(room, n, messages, gifts, pinned)| {
                EdgeFrame::Batch(Batch {
                    room,
                    tick: n[0],
                    messages,
                    counters: Counters {
                        likes: n[1],
                        gifts: gifts
                            .into_iter()
                            .map(|(gift, count)| GiftCount { gift, count })
                            .collect(),
                    },
                    pinned,
                    online: n[2],
                    missed: n[3],
                    epoch: n[4],
                })
            }),
        any::<(u64, u64, u64)>().prop_map(|(client_msg_id, seq, epoch)| EdgeFrame::Ack {
            client_msg_id,
            seq,
            epoch
        }),
        (any::<u64>(), any::<u16>(), ".{0,32}").prop_map(|(client_msg_id, code, reason)| {
            EdgeFrame::Rejected {
                client_msg_id,
                code,
                reason,
            }
        }),
        (any::<u16>(), ".{0,32}").prop_map(|(code, text)| EdgeFrame::Error { code, text }),
        any::<u64>().prop_map(|nonce| EdgeFrame::Pong { nonce }),
        (".{0,16}", any::<u16>(), ".{0,32}").prop_map(|(room, code, text)| EdgeFrame::JoinRefused { room, code, text }),
        (any::<u64>(), prop::collection::vec(any::<bool>(), 0..64))
            .prop_map(|(query_id, online)| EdgeFrame::Presence { query_id, online }),
        any::<u64>().prop_map(|expires_at| EdgeFrame::Refreshed { expires_at }),
        (any::<u16>(), ".{0,32}").prop_map(|(code, text)| EdgeFrame::RefreshRefused { code, text }),
    ]
}

proptest! {
    #[test]
    fn client_frames_round_trip(frames in prop::collection::vec(client_frame(), 1..8)) {
        let d = FrameDecoder::new(MAX);
        let mut buf = BytesMut::new();
        for f in &frames {
            buf.extend_from_slice(&encode(f, MAX).unwrap());
        }
        let mut got = Vec::new();
        while let Some(f) = d.decode::<ClientFrame>(&mut buf).unwrap() {
            got.push(f);
        }
        prop_assert_eq!(got, frames);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn edge_frames_round_trip(frame in edge_frame()) {
        let d = FrameDecoder::new(MAX);
        let mut buf = BytesMut::from(&encode(&frame, MAX).unwrap()[..]);
        prop_assert_eq!(d.decode::<EdgeFrame>(&mut buf).unwrap(), Some(frame));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), max in 0u32..1024) {
        let d = FrameDecoder::new(max);
        let mut a = BytesMut::from(&bytes[..]);
        let mut b = a.clone();
        // Either decoder keeps making progress or stops with Ok(None) / an error.
        while let Ok(Some(_)) = d.decode::<ClientFrame>(&mut a) {}
        while let Ok(Some(_)) = d.decode::<EdgeFrame>(&mut b) {}
        let _ = d.wanted(&bytes);
    }

    #[test]
    fn arbitrary_payloads_behind_a_valid_prefix_never_panic(payload in prop::collection::vec(any::<u8>(), 1..512)) {
        let d = FrameDecoder::new(MAX);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(&payload);
        let _ = d.decode::<ClientFrame>(&mut buf.clone());
        let _ = d.decode::<EdgeFrame>(&mut buf);
    }
}
