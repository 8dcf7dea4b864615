//! The JavaScript client (`clients/js`) against the Rust codec: the test
//! vectors in `clients/js/test/vectors.json` are made here, from the Rust
//! encoder and decoder, and node's test runner checks the JavaScript
//! decoder and encoder against them (malformed frames included), so the
//! two cannot drift. After a protocol change, `THRONG_BLESS=1` rewrites the
//! vectors; without it a stale file fails this test.

use std::process::Command;

use serde_json::{Value, json};
use throng_tests::tools;
use throng_wire::{
    Batch, ClientFrame, Counters, EdgeFrame, ErrorCode, FrameBuffer, GiftCount, Kind, Limits, Message, Resumed, Role,
    Session, encode,
};

const MAX: u32 = throng_wire::DEFAULT_MAX_FRAME;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn message(m: &Message) -> Value {
    json!({"seq": m.seq, "sender": m.sender, "kind": m.kind.as_str(), "body": m.body})
}

fn role(r: Role) -> &'static str {
    r.as_str()
}

/// The shape the JavaScript decoder gives (bodies as number arrays here).
fn edge_json(f: &EdgeFrame) -> Value {
    match f {
        EdgeFrame::Welcome {
            session,
            limits,
            expires_at,
        } => json!({"type": "Welcome",
            "session": {"tenant": session.tenant, "user": session.user, "role": role(session.role)},
            "limits": {"maxFrameBytes": limits.max_frame_bytes, "maxBodyBytes": limits.max_body_bytes,
                "maxRooms": limits.max_rooms, "sendRatePerSec": limits.send_rate_per_sec,
                "sendBurst": limits.send_burst, "idleTimeoutMs": limits.idle_timeout_ms},
            "expiresAt": expires_at}),
        EdgeFrame::Joined {
            room,
            online,
            recent,
            epoch,
            resumed,
        } => json!({"type": "Joined", "room": room, "online": online,
            "recent": recent.iter().map(message).collect::<Vec<_>>(), "epoch": epoch,
            "resumed": resumed_json(*resumed)}),
        EdgeFrame::Batch(b) => json!({"type": "Batch", "room": b.room, "tick": b.tick,
            "messages": b.messages.iter().map(message).collect::<Vec<_>>(),
            "counters": {"likes": b.counters.likes,
                "gifts": b.counters.gifts.iter().map(|g| json!({"gift": g.gift, "count": g.count})).collect::<Vec<_>>()},
            "pinned": b.pinned, "online": b.online, "missed": b.missed, "epoch": b.epoch}),
        EdgeFrame::Ack {
            client_msg_id,
            seq,
            epoch,
        } => json!({"type": "Ack", "clientMsgId": client_msg_id, "seq": seq, "epoch": epoch}),
        EdgeFrame::Rejected {
            client_msg_id,
            code,
            reason,
        } => json!({"type": "Rejected", "clientMsgId": client_msg_id, "code": code, "reason": reason}),
        EdgeFrame::Error { code, text } => json!({"type": "Error", "code": code, "text": text}),
        EdgeFrame::Pong { nonce } => json!({"type": "Pong", "nonce": nonce}),
        EdgeFrame::JoinRefused { room, code, text } => {
            json!({"type": "JoinRefused", "room": room, "code": code, "text": text})
        }
        EdgeFrame::Presence { query_id, online } => json!({"type": "Presence", "queryId": query_id, "online": online}),
        EdgeFrame::PresenceRefused { query_id, code, text } => {
            json!({"type": "PresenceRefused", "queryId": query_id, "code": code, "text": text})
        }
        EdgeFrame::Refreshed { expires_at } => json!({"type": "Refreshed", "expiresAt": expires_at}),
        EdgeFrame::RefreshRefused { code, text } => json!({"type": "RefreshRefused", "code": code, "text": text}),
    }
}

fn resumed_json(r: Resumed) -> Value {
    match r {
        Resumed::Fresh => json!({"kind": "Fresh"}),
        Resumed::Continued => json!({"kind": "Continued"}),
        Resumed::Truncated => json!({"kind": "Truncated"}),
        Resumed::NewEpoch { previous } => json!({"kind": "NewEpoch", "previous": previous}),
    }
}

fn client_json(f: &ClientFrame) -> Value {
    match f {
        ClientFrame::Hello { token } => json!({"type": "Hello", "token": token}),
        ClientFrame::Join {
            room,
            resume_from,
            epoch,
        } => json!({"type": "Join", "room": room, "resumeFrom": resume_from, "epoch": epoch}),
        ClientFrame::Leave { room } => json!({"type": "Leave", "room": room}),
        ClientFrame::Send {
            room,
            kind,
            body,
            client_msg_id,
        } => json!({"type": "Send", "room": room, "kind": kind.as_str(), "body": body, "clientMsgId": client_msg_id}),
        ClientFrame::Ping { nonce } => json!({"type": "Ping", "nonce": nonce}),
        ClientFrame::Presence { query_id, users } => json!({"type": "Presence", "queryId": query_id, "users": users}),
        ClientFrame::Seen { room, seq } => json!({"type": "Seen", "room": room, "seq": seq}),
        ClientFrame::Refresh { token } => json!({"type": "Refresh", "token": token}),
    }
}

fn msg(seq: u64, sender: &str, kind: Kind, body: &[u8]) -> Message {
    Message {
        seq,
        sender: sender.into(),
        kind,
        body: body.to_vec(),
    }
}

fn edge_frames() -> Vec<(&'static str, EdgeFrame)> {
    vec![
        (
            "welcome",
            EdgeFrame::Welcome {
                session: Session {
                    tenant: "dev".into(),
                    user: "alice".into(),
                    role: Role::Moderator,
                },
                limits: Limits {
                    max_frame_bytes: 65_536,
                    max_body_bytes: 4096,
                    max_rooms: 16,
                    send_rate_per_sec: 5,
                    send_burst: 10,
                    idle_timeout_ms: 30_000,
                },
                expires_at: 1_800_000_000,
            },
        ),
        (
            "joined with recent messages of every kind",
            EdgeFrame::Joined {
                room: "lobby".into(),
                online: 1_234_567,
                recent: Kind::ALL
                    .iter()
                    .enumerate()
                    .map(|(i, k)| msg(i as u64 + 1, "ünïcødé 👋", *k, format!("m{i}").as_bytes()))
                    .collect(),
                epoch: 1_796_000_000_123,
                resumed: Resumed::Continued,
            },
        ),
        (
            "joined into a new epoch",
            EdgeFrame::Joined {
                room: "lobby".into(),
                online: 3,
                recent: vec![msg(1 << 40, "bob", Kind::Chat, b"after")],
                epoch: 1_796_000_000_999,
                resumed: Resumed::NewEpoch {
                    previous: 1_796_000_000_123,
                },
            },
        ),
        (
            "joined, ring moved on",
            EdgeFrame::Joined {
                room: "lobby".into(),
                online: 3,
                recent: Vec::new(),
                epoch: 7,
                resumed: Resumed::Truncated,
            },
        ),
        (
            "joined, empty room",
            EdgeFrame::Joined {
                room: "a".into(),
                online: 0,
                recent: Vec::new(),
                epoch: 0,
                resumed: Resumed::Fresh,
            },
        ),
        (
            "batch with counters, pins and a binary body",
            EdgeFrame::Batch(Batch {
                room: "show-42".into(),
                tick: 300,
                messages: vec![
                    msg(127, "host", Kind::Host, b"welcome"),
                    msg(128, "bob", Kind::Chat, &[0, 0xff, 0x80, 10]),
                    msg(16_384, "carol", Kind::Gift, b"rose"),
                ],
                counters: Counters {
                    likes: 99,
                    gifts: vec![
                        GiftCount {
                            gift: "rose".into(),
                            count: 3,
                        },
                        GiftCount {
                            gift: "rocket".into(),
                            count: 1,
                        },
                    ],
                },
                pinned: vec![127],
                online: 10_000_000,
                missed: 2,
                epoch: 1_796_000_000_123,
            }),
        ),
        (
            "batch at the largest safe integers",
            EdgeFrame::Batch(Batch {
                room: "r".into(),
                tick: (1 << 53) - 1,
                messages: vec![msg((1 << 53) - 1, "", Kind::System, b"")],
                counters: Counters::default(),
                pinned: Vec::new(),
                online: u64::from(u32::MAX) + 1,
                missed: 0,
                epoch: (1 << 53) - 1,
            }),
        ),
        (
            "ack",
            EdgeFrame::Ack {
                client_msg_id: 7,
                seq: 300,
                epoch: 1_767_225_600_000,
            },
        ),
        (
            "rejected",
            EdgeFrame::Rejected {
                client_msg_id: 8,
                code: ErrorCode::RateLimited.code(),
                reason: "send rate exceeded; slow down".into(),
            },
        ),
        (
            "fatal error",
            EdgeFrame::Error {
                code: ErrorCode::TokenExpired.code(),
                text: "the token expired".into(),
            },
        ),
        (
            "error with an unknown code",
            EdgeFrame::Error {
                code: 65_535,
                text: String::new(),
            },
        ),
        ("pong", EdgeFrame::Pong { nonce: 1 << 40 }),
        (
            "join refused",
            EdgeFrame::JoinRefused {
                room: "vip".into(),
                code: ErrorCode::Forbidden.code(),
                text: "token does not allow room `vip`".into(),
            },
        ),
        (
            "presence",
            EdgeFrame::Presence {
                query_id: 3,
                online: vec![true, false, true],
            },
        ),
        (
            "presence refused",
            EdgeFrame::PresenceRefused {
                query_id: 4,
                code: ErrorCode::QueryTooLarge.code(),
                text: "too many".into(),
            },
        ),
        (
            "refreshed",
            EdgeFrame::Refreshed {
                expires_at: 1_900_000_000,
            },
        ),
        (
            "refresh refused",
            EdgeFrame::RefreshRefused {
                code: ErrorCode::TokenInvalid.code(),
                text: "bad signature".into(),
            },
        ),
    ]
}

fn client_frames() -> Vec<(&'static str, ClientFrame)> {
    let mut frames = vec![
        (
            "hello",
            ClientFrame::Hello {
                token: "eyJhbGciOiJIUzI1NiJ9.e30.sig".into(),
            },
        ),
        (
            "join",
            ClientFrame::Join {
                room: "lobby".into(),
                resume_from: None,
                epoch: 0,
            },
        ),
        (
            "join with resume",
            ClientFrame::Join {
                room: "group-demo".into(),
                resume_from: Some(300),
                epoch: 1_796_000_000_123,
            },
        ),
        ("leave", ClientFrame::Leave { room: "lobby".into() }),
        ("ping", ClientFrame::Ping { nonce: 129 }),
        (
            "presence",
            ClientFrame::Presence {
                query_id: 2,
                users: vec!["alice".into(), "bob".into()],
            },
        ),
        (
            "seen",
            ClientFrame::Seen {
                room: "group-demo".into(),
                seq: 16_384,
            },
        ),
        ("refresh", ClientFrame::Refresh { token: "t2".into() }),
    ];
    for (i, kind) in Kind::ALL.into_iter().enumerate() {
        let name: &'static str = ["send chat", "send like", "send gift", "send host", "send system"][i];
        frames.push((
            name,
            ClientFrame::Send {
                room: "lobby".into(),
                kind,
                body: format!("héllo {i}").into_bytes(),
                client_msg_id: 1 + i as u64 * 1000,
            },
        ));
    }
    frames
}

/// A frame from a raw payload: the length prefix, then the bytes.
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// Bytes the Rust decoder refuses, and the code it refuses them with.
fn malformed() -> Vec<Value> {
    let long_u64 = [0x80u8; 10].iter().copied().chain([0x01]).collect::<Vec<_>>();
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("zero length", vec![0, 0, 0, 0], MAX),
        ("length over the limit", (MAX + 1).to_be_bytes().to_vec(), MAX),
        (
            "length over a small limit, payload not sent",
            17u32.to_be_bytes().to_vec(),
            16,
        ),
        ("truncated payload", vec![0, 0, 0, 10, 6, 1, 2], MAX),
        ("unknown variant", framed(&[12]), MAX),
        ("trailing bytes", framed(&[6, 1, 0]), MAX),
        ("string longer than the frame", framed(&[5, 1, 50, b'h', b'i']), MAX),
        ("invalid utf-8", framed(&[5, 1, 1, 0xff]), MAX),
        ("bool that is neither 0 nor 1", framed(&[8, 1, 1, 2]), MAX),
        ("u16 beyond 65535", framed(&[5, 0x80, 0x80, 0x04, 0]), MAX),
        (
            "overlong u64 varint",
            framed(&[[6u8].as_slice(), &long_u64].concat()),
            MAX,
        ),
        (
            "vec longer than the frame",
            framed(&[2, 1, b'r', 0, 0x80, 0x80, 0x80, 0x01]),
            MAX,
        ),
        ("kind out of range", framed(&[1, 1, b'r', 0, 1, 1, 0, 9, 0]), MAX),
        ("role out of range", framed(&[0, 1, b't', 1, b'u', 3]), MAX),
    ];
    cases
        .into_iter()
        .map(|(name, bytes, max)| {
            let mut buf = FrameBuffer::<EdgeFrame>::new(max);
            buf.extend(&bytes);
            let outcome = loop {
                match buf.next_frame() {
                    Ok(Some(_)) => continue,
                    Ok(None) => break buf.finish(),
                    Err(e) => break Err(e),
                }
            };
            let code = match outcome {
                Err(e) => e.code(),
                Ok(()) => panic!("vector `{name}` decodes in Rust; it is not malformed"),
            };
            json!({"name": name, "hex": hex(&bytes), "maxFrameBytes": max, "code": code.code(),
                "codeName": format!("{code:?}")})
        })
        .collect()
}

fn vectors() -> Value {
    let edge: Vec<Value> = edge_frames()
        .iter()
        .map(|(name, f)| {
            let bytes = encode(f, MAX).expect("encodes");
            // What the vectors claim must be what Rust reads back.
            let mut buf = FrameBuffer::<EdgeFrame>::new(MAX);
            buf.extend(&bytes);
            assert_eq!(buf.next_frame().expect("decodes").as_ref(), Some(f), "{name}");
            json!({"name": name, "hex": hex(&bytes), "frame": edge_json(f)})
        })
        .collect();
    let client: Vec<Value> = client_frames()
        .iter()
        .map(|(name, f)| {
            let bytes = encode(f, MAX).expect("encodes");
            json!({"name": name, "hex": hex(&bytes), "frame": client_json(f)})
        })
        .collect();
    let codes: Vec<Value> = ErrorCode::ALL
        .iter()
        .map(|c| json!({"name": format!("{c:?}"), "code": c.code(), "fatal": c.is_fatal()}))
        .collect();
    json!({"maxFrameBytes": MAX, "edge": edge, "client": client, "malformed": malformed(), "errorCodes": codes})
}

#[test]
fn the_javascript_client_decodes_and_encodes_what_the_rust_codec_does() {
    let path = tools::repo().join("clients/js/test/vectors.json");
    let fresh = serde_json::to_string_pretty(&vectors()).expect("json") + "\n";
    if std::env::var_os("THRONG_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write the vectors");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "{} is not what the Rust codec makes now: run `THRONG_BLESS=1 cargo test --release -p throng-tests --test e2e js_client::` and commit it",
        path.display()
    );
    let out = Command::new("node")
        .args(["--test", "test/"])
        .current_dir(tools::repo().join("clients/js"))
        .output()
        .expect("node (Node.js 20 or later) runs");
    assert!(
        out.status.success(),
        "node --test in clients/js failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
