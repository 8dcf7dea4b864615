//! Replays the saved fuzz corpus and every crash input through the checks the
//! fuzz targets run (`throng_wire::fuzzing`), so CI covers what fuzzing found
//! without cargo-fuzz.

use std::path::{Path, PathBuf};

/// Every file of `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/`.
fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
            continue;
        };
        files.extend(entries.map(|e| e.expect("readable corpus entry").path()));
    }
    files.sort();
    files
}

#[test]
fn frame_stream_corpus() {
    let files = inputs("frame_stream");
    // An empty or moved corpus would make this test pass vacuously.
    assert!(files.len() >= 10, "fuzz/corpus/frame_stream has {} inputs", files.len());
    for file in files {
        let data = std::fs::read(&file).expect("readable corpus file");
        throng_wire::fuzzing::frame_stream(&data);
    }
}

/// Every saved `bus_messages` input, and every cut and every one-byte
/// change of well-formed bus messages of several kinds: none may panic an
/// edge or change on its way through (see `fuzzing::bus_messages`).
#[test]
fn bus_messages_corpus_cuts_and_flips() {
    use throng_wire::bus::*;
    for file in inputs("bus_messages") {
        let data = std::fs::read(&file).expect("readable corpus file");
        throng_wire::fuzzing::bus_messages(&data);
    }
    // Each seed is a well-formed message of its kind (else its cuts and
    // flips would prove little).
    fn seed<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
        which: u8,
        message: T,
    ) -> (u8, Vec<u8>) {
        let bytes = encode(&message);
        assert_eq!(
            decode::<T>(&bytes, MAX_ROOM_BUS_BYTES).expect("a seed decodes"),
            message
        );
        (which, bytes)
    }
    let seeds: Vec<(u8, Vec<u8>)> = vec![
        seed(
            2,
            Forward {
                from: "edge-a".into(),
                items: vec![Forwarded {
                    tenant: "acme".into(),
                    room: "lobby".into(),
                    fwd_id: 7,
                    hops: 1,
                    sender: "alice".into(),
                    kind: throng_wire::Kind::Chat,
                    body: b"hello".to_vec(),
                    received_ms: 1_700_000_000_000,
                }],
            },
        ),
        seed(
            3,
            Replies {
                items: vec![
                    Reply {
                        fwd_id: 7,
                        outcome: Outcome::Ack { seq: 41, epoch: 7 },
                    },
                    Reply {
                        fwd_id: 8,
                        outcome: Outcome::Rejected {
                            code: 30,
                            reason: "slow down".into(),
                        },
                    },
                ],
            },
        ),
        seed(
            9,
            WhoQuery {
                from: "edge-b".into(),
                tenant: "acme".into(),
                users: vec!["alice".into(), "bob".into()],
            },
        ),
        seed(
            11,
            KickOrder {
                from: "edge-b".into(),
                tenant: "acme".into(),
                user: "mallory".into(),
                reason: "spam".into(),
            },
        ),
        seed(
            13,
            Resync {
                tenant: "acme".into(),
                room: "lobby".into(),
                after_seq: 99,
            },
        ),
    ];
    for (which, bytes) in &seeds {
        let whole = [&[*which][..], bytes].concat();
        throng_wire::fuzzing::bus_messages(&whole);
        for cut in 1..whole.len() {
            throng_wire::fuzzing::bus_messages(&whole[..cut]);
        }
        for at in 1..whole.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut changed = whole.clone();
                changed[at] ^= flip;
                throng_wire::fuzzing::bus_messages(&changed);
            }
        }
        // Read as every other kind, too.
        for other in 0..17u8 {
            throng_wire::fuzzing::bus_messages(&[&[other][..], bytes].concat());
        }
    }
}
