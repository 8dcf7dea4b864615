//! The pure part of a tick: numbering and acks, merging stored ticks, and
//! encoding the batch. Nothing here waits, calls a module or touches the
//! network, so each step is tested alone below; the room's task
//! (`actor.rs`) runs them in order, between its filters, its policy and its
//! fanout.

use std::sync::Arc;

use throng_wire::{Batch, Counters, EdgeFrame, ErrorCode, Message, encode, split_to_fit};

use super::Inbound;
use super::group::Held;
use super::sequencer::Sequencer;
use super::slot::{Delivery, ReplyTx};

/// A sender's answer: sent once the tick may be shown (at once for a
/// livecast room, once stored for a group room).
#[derive(Debug)]
pub(super) struct Ack {
    pub(super) reply: ReplyTx,
    pub(super) client_msg_id: u64,
    pub(super) seq: u64,
    pub(super) epoch: u64,
}

impl Ack {
    pub(super) fn send(self) {
        let _ = self.reply.send(EdgeFrame::Ack {
            client_msg_id: self.client_msg_id,
            seq: self.seq,
            epoch: self.epoch,
        });
    }

    /// The message was numbered but will be neither stored nor shown
    /// (`ServerBusy`: the sender may send it again; `StorageFull`: once
    /// retention frees room).
    pub(super) fn refuse(self, code: ErrorCode, reason: &str) {
        let _ = self.reply.send(EdgeFrame::Rejected {
            client_msg_id: self.client_msg_id,
            code: code.code(),
            reason: reason.to_owned(),
        });
    }
}

/// What one tick shows its viewers, once it may.
#[derive(Debug, Default)]
pub(super) struct Outgoing {
    pub(super) messages: Vec<Message>,
    pub(super) counters: Counters,
    pub(super) pinned: Vec<u64>,
    pub(super) tick: u64,
    pub(super) online: u64,
    pub(super) presence_due: bool,
    /// Numbers before these messages the viewers will never get.
    pub(super) missed: u64,
}

impl Outgoing {
    /// Whether viewers have anything to be shown.
    pub(super) fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.counters.is_empty() && !self.presence_due && self.missed == 0
    }
}

/// A tick's accepted messages, numbered.
#[derive(Debug, Default)]
pub(super) struct Numbered {
    /// One per accepted message, in inbox order.
    pub(super) acks: Vec<Ack>,
    /// The ones the policy delivers, in the policy's order.
    pub(super) messages: Vec<Message>,
    /// Numbers of the delivered messages to pin.
    pub(super) pinned: Vec<u64>,
}

/// Refuses the tick's messages while the room may not number (its group
/// log is claimed by another edge, or no claim succeeded yet): senders may
/// send again, and nothing is numbered that another writer might number.
pub(super) fn refuse_if_fenced(sequencer: &Sequencer, inbox: &mut Vec<Inbound>) {
    if !sequencer.is_fenced() {
        return;
    }
    for m in inbox.drain(..) {
        let _ = m.reply.send(EdgeFrame::Rejected {
            client_msg_id: m.client_msg_id,
            code: ErrorCode::ServerBusy.code(),
            reason: FENCED.into(),
        });
    }
}

const FENCED: &str = "the room's log is being claimed on this edge; send again";

/// Numbers every accepted message, delivered or not, and gives each an
/// ack; `deliver` and `pinned` are the policy's plan, as indices into
/// `inbox`. An index out of range or repeated is skipped (plans are
/// validated, so this is a guard, not a path). A message the sequencer
/// will not number (fenced) is refused.
pub(super) fn number(inbox: Vec<Inbound>, deliver: &[u32], pinned: &[u32], sequencer: &mut Sequencer) -> Numbered {
    let mut acks = Vec::with_capacity(inbox.len());
    let mut accepted: Vec<Option<Message>> = Vec::with_capacity(inbox.len());
    for m in inbox {
        let Some(seq) = sequencer.next() else {
            let _ = m.reply.send(EdgeFrame::Rejected {
                client_msg_id: m.client_msg_id,
                code: ErrorCode::ServerBusy.code(),
                reason: FENCED.into(),
            });
            accepted.push(None);
            continue;
        };
        acks.push(Ack {
            reply: m.reply,
            client_msg_id: m.client_msg_id,
            seq,
            epoch: sequencer.epoch(),
        });
        accepted.push(Some(Message {
            seq,
            sender: m.sender.to_string(),
            kind: m.kind,
            body: m.body,
        }));
    }
    let pinned = pinned
        .iter()
        .filter_map(|&i| accepted.get(i as usize).and_then(|s| s.as_ref()).map(|m| m.seq))
        .collect();
    let mut messages = Vec::with_capacity(deliver.len());
    for &i in deliver {
        if let Some(m) = accepted.get_mut(i as usize).and_then(Option::take) {
            messages.push(m);
        }
    }
    Numbered { acks, messages, pinned }
}

/// Ticks a group room's log stored together (after a slow commit, or
/// JetStream back from an outage), as one batch and their acks: pushed
/// apart they would overflow viewers' slots. Counters add up; the last
/// tick's number and online count stand.
pub(super) fn merge(ticks: Vec<Held>) -> (Vec<Ack>, Outgoing) {
    let mut acks = Vec::new();
    let mut out = Outgoing::default();
    for t in ticks {
        acks.extend(t.acks);
        let o = t.out;
        out.messages.extend(o.messages);
        out.counters.likes += o.counters.likes;
        for g in o.counters.gifts {
            match out.counters.gifts.iter_mut().find(|x| x.gift == g.gift) {
                Some(x) => x.count += g.count,
                None => out.counters.gifts.push(g),
            }
        }
        out.pinned.extend(o.pinned);
        out.tick = o.tick;
        out.online = o.online;
        out.presence_due |= o.presence_due;
        out.missed += o.missed;
    }
    (acks, out)
}

/// Encodes a tick's batch once: one frame, or several when it is larger
/// than a frame may be (the counters in the first, each pin beside its
/// message). Every viewer gets these same bytes.
pub(crate) fn encode_batch(batch: Batch, max_frame: u32) -> Vec<Arc<Delivery>> {
    let Batch {
        room,
        tick,
        messages,
        counters,
        pinned,
        online,
        missed,
        epoch,
    } = batch;
    // A tick's gift names can be many: count them against the first frame.
    let counted = counters.gifts.iter().map(|g| g.gift.len() + 16).sum();
    let mut counters = Some(counters);
    let mut deliveries = Vec::new();
    for messages in split_to_fit(messages, max_frame, counted) {
        let batch = Batch {
            room: room.clone(),
            tick,
            pinned: pinned
                .iter()
                .copied()
                .filter(|s| messages.iter().any(|m| m.seq == *s))
                .collect(),
            messages,
            counters: counters.take().unwrap_or_default(),
            online,
            missed,
            epoch,
        };
        let framed = EdgeFrame::Batch(batch);
        let encoded = encode(&framed, max_frame);
        let EdgeFrame::Batch(batch) = framed else {
            continue;
        };
        match encoded {
            Ok(frame) => deliveries.push(Arc::new(Delivery { frame, batch })),
            Err(e) => {
                // Body limits keep a message well under a frame, so this
                // is a bug, not bad input; drop the batch and say so.
                tracing::error!(error = %e, code = %ErrorCode::Internal, "batch does not fit a frame");
            }
        }
    }
    deliveries
}

#[cfg(test)]
mod tests {
    use throng_wire::{GiftCount, Kind};
    use tokio::sync::mpsc;

    use super::*;

    fn inbox(n: u64) -> (Vec<Inbound>, mpsc::Receiver<Box<EdgeFrame>>) {
        let (reply, rx) = ReplyTx::channel(64, || {});
        let inbox = (0..n)
            .map(|i| Inbound {
                sender: Arc::from("ann"),
                kind: Kind::Chat,
                body: format!("m{i}").into_bytes(),
                client_msg_id: 100 + i,
                reply: reply.clone(),
                received_ms: 0,
                hops: 0,
            })
            .collect();
        (inbox, rx)
    }

    fn replies(rx: &mut mpsc::Receiver<Box<EdgeFrame>>) -> Vec<EdgeFrame> {
        std::iter::from_fn(|| rx.try_recv().ok().map(|b| *b)).collect()
    }

    #[test]
    fn every_accepted_message_is_numbered_delivered_or_not() {
        let (inbox, mut rx) = inbox(4);
        let mut seq = Sequencer::after(9, 1);
        // The policy delivers the last and the second, and pins the last.
        let n = number(inbox, &[3, 1], &[3], &mut seq);
        assert_eq!(n.acks.iter().map(|a| a.seq).collect::<Vec<_>>(), [10, 11, 12, 13]);
        assert_eq!(n.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [13, 11]);
        assert_eq!(n.messages[0].body, b"m3");
        assert_eq!(n.pinned, [13]);
        assert_eq!(seq.last(), 13);
        for a in n.acks {
            a.send();
        }
        let acked: Vec<_> = replies(&mut rx)
            .into_iter()
            .map(|f| match f {
                EdgeFrame::Ack {
                    client_msg_id,
                    seq,
                    epoch: 1,
                } => (client_msg_id, seq),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(acked, [(100, 10), (101, 11), (102, 12), (103, 13)]);
    }

    #[test]
    fn a_bad_plan_index_is_skipped_not_delivered_twice() {
        let (inbox, _rx) = inbox(2);
        let mut seq = Sequencer::after(0, 1);
        let n = number(inbox, &[1, 1, 7, 0], &[9], &mut seq);
        assert_eq!(n.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [2, 1]);
        assert!(n.pinned.is_empty());
        assert_eq!(n.acks.len(), 2);
    }

    #[test]
    fn a_fenced_room_refuses_and_numbers_nothing() {
        let (mut messages, mut rx) = inbox(3);
        let mut seq = Sequencer::after(5, 1);
        seq.fence();
        refuse_if_fenced(&seq, &mut messages);
        assert!(messages.is_empty());
        // And should any reach numbering, it refuses them too.
        let (more, mut rx2) = inbox(2);
        let n = number(more, &[0, 1], &[], &mut seq);
        assert!(n.acks.is_empty() && n.messages.is_empty());
        assert_eq!(seq.last(), 5);
        for f in replies(&mut rx).into_iter().chain(replies(&mut rx2)) {
            assert!(
                matches!(f, EdgeFrame::Rejected { code, .. } if code == ErrorCode::ServerBusy.code()),
                "{f:?}"
            );
        }
    }

    #[test]
    fn ticks_stored_together_go_out_as_one_batch() {
        let (inbox, _rx) = inbox(3);
        let mut seq = Sequencer::after(0, 1);
        let n = number(inbox, &[0, 1, 2], &[2], &mut seq);
        let mut messages = n.messages.into_iter();
        let mut acks = n.acks.into_iter();
        let gift = |g: &str, count| GiftCount { gift: g.into(), count };
        let first = Held {
            last: 2,
            acks: acks.by_ref().take(2).collect(),
            out: Outgoing {
                messages: messages.by_ref().take(2).collect(),
                counters: Counters {
                    likes: 3,
                    gifts: vec![gift("rose", 1)],
                },
                tick: 7,
                online: 10,
                presence_due: true,
                ..Outgoing::default()
            },
        };
        let second = Held {
            last: 3,
            acks: acks.collect(),
            out: Outgoing {
                messages: messages.collect(),
                counters: Counters {
                    likes: 2,
                    gifts: vec![gift("star", 4), gift("rose", 2)],
                },
                pinned: vec![3],
                tick: 8,
                online: 12,
                ..Outgoing::default()
            },
        };
        let (acks, out) = merge(vec![first, second]);
        assert_eq!(acks.iter().map(|a| a.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(out.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(out.counters.likes, 5);
        assert_eq!(out.counters.gifts, [gift("rose", 3), gift("star", 4)]);
        assert_eq!(
            (out.pinned, out.tick, out.online, out.presence_due),
            (vec![3], 8, 12, true)
        );
    }

    #[test]
    fn a_batch_larger_than_a_frame_splits_with_counters_first_and_pins_beside_their_message() {
        let messages: Vec<Message> = (1..=40)
            .map(|seq| Message {
                seq,
                sender: "ann".into(),
                kind: Kind::Chat,
                body: vec![b'x'; 200],
            })
            .collect();
        let batch = Batch {
            room: "lobby".into(),
            tick: 3,
            messages,
            counters: Counters {
                likes: 9,
                gifts: Vec::new(),
            },
            pinned: vec![2, 39],
            online: 5,
            missed: 0,
            epoch: 4,
        };
        let max_frame = 2_048;
        let out = encode_batch(batch, max_frame);
        assert!(out.len() > 1, "40 messages of 200 B do not fit 2 KiB");
        let seqs: Vec<u64> = out
            .iter()
            .flat_map(|d| d.batch.messages.iter().map(|m| m.seq))
            .collect();
        assert_eq!(seqs, (1..=40).collect::<Vec<_>>(), "every message once, in order");
        assert_eq!(out[0].batch.counters.likes, 9);
        assert!(out[1..].iter().all(|d| d.batch.counters.is_empty()));
        for d in &out {
            assert!(d.frame.len() <= max_frame as usize);
            assert_eq!((d.batch.epoch, d.batch.tick, d.batch.online), (4, 3, 5));
            for p in &d.batch.pinned {
                assert!(
                    d.batch.messages.iter().any(|m| m.seq == *p),
                    "pin {p} beside its message"
                );
            }
        }
        assert_eq!(out.iter().map(|d| d.batch.pinned.len()).sum::<usize>(), 2);
    }
}
