//! A group room's log state: where its log ends, what it appended that is
//! not on disk yet, and how a returning member's gap splits between the two.
//!
//! In a cluster the room's origin writes the log (JetStream) and tells its
//! relays how far it is stored (`committed`, in each bus batch); a relay
//! keeps what it delivered beyond that in memory, as the origin does, so a
//! member resuming on it splits its gap the same way. A relay that becomes
//! the origin writes what it holds beyond `committed` first: what the dead
//! origin acked and delivered but had not stored yet survives (the log
//! skips what it already has).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use throng_wire::{EdgeFrame, ErrorCode, Message};

use super::{Inbound, RoomKey};
use crate::group_store::GroupStore;

/// A group room's log state.
#[derive(Debug)]
pub(super) struct GroupState {
    log: GroupStore,
    /// Whether this edge writes the room's log: always on a single edge,
    /// only its origin in a cluster.
    writer: bool,
    /// Highest sequence number on disk (raised by the log writer).
    committed: Arc<AtomicU64>,
    /// Appended, not yet known to be committed, oldest first.
    pending: VecDeque<Message>,
    /// The highest sequence handed out (what members may say they saw).
    head: Arc<AtomicU64>,
}

impl GroupState {
    /// Reads where the room's log ends. A room that cannot must not start:
    /// numbering from 1 would overwrite the log.
    pub(super) async fn open(log: GroupStore, key: &RoomKey) -> Result<Self, String> {
        let last = log.last_seq(&key.tenant, &key.name).await.map_err(|e| e.to_string())?;
        Ok(Self {
            log,
            writer: true,
            committed: Arc::new(AtomicU64::new(last)),
            pending: VecDeque::new(),
            head: Arc::new(AtomicU64::new(last)),
        })
    }

    /// The highest sequence number the room has handed out.
    pub(super) fn last_seq(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// The room's head, kept current, so a connection can refuse a `Seen`
    /// beyond it.
    pub(super) fn head(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.head)
    }

    /// While the disk is behind, refuses the tick's messages rather than
    /// hold ever more acked, uncommitted ones in memory. Senders may retry.
    pub(super) fn refuse_if_behind(&self, inbox: &mut Vec<Inbound>) {
        if inbox.is_empty() || !self.log.is_behind() {
            return;
        }
        self.log.refused(inbox.len() as u64);
        for m in inbox.drain(..) {
            let _ = m.reply.send(EdgeFrame::Rejected {
                client_msg_id: m.client_msg_id,
                code: ErrorCode::ServerBusy.code(),
                reason: "the group log is behind; try again shortly".into(),
            });
        }
    }

    /// Appends a tick's delivered messages to the log (written in the
    /// background) and keeps them until they are committed; `head` is the
    /// highest sequence handed out this tick.
    pub(super) fn record(&mut self, key: &RoomKey, delivered: &[Message], head: u64) {
        self.drop_committed();
        if !delivered.is_empty() {
            self.log
                .append(&key.tenant, &key.name, delivered.to_vec(), &self.committed);
            self.pending.extend(delivered.iter().cloned());
        }
        self.head.store(head, Ordering::Release);
    }

    /// Relay: messages the origin delivered, kept until it says they are
    /// stored.
    pub(super) fn relayed(&mut self, delivered: &[Message]) {
        self.drop_committed();
        let head = self.head.load(Ordering::Acquire);
        self.pending.extend(delivered.iter().filter(|m| m.seq > head).cloned());
        if let Some(last) = delivered.last() {
            self.head.fetch_max(last.seq, Ordering::AcqRel);
        }
    }

    /// Relay: how far the origin says the log is stored.
    pub(super) fn origin_committed(&mut self, committed: u64) {
        self.committed.fetch_max(committed, Ordering::AcqRel);
        self.drop_committed();
    }

    /// How far the log is stored, as this edge knows.
    pub(super) fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// The same, kept current.
    pub(super) fn stored(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.committed)
    }

    /// Sets whether this edge writes the room's log. Taking it over, it
    /// first writes what it holds beyond what is stored.
    pub(super) fn set_writer(&mut self, key: &RoomKey, writer: bool) {
        if writer && !self.writer {
            self.drop_committed();
            let unstored: Vec<Message> = self.pending.iter().cloned().collect();
            if !unstored.is_empty() {
                tracing::info!(
                    messages = unstored.len(),
                    "taking the room's log over: storing what the last origin had not"
                );
                self.log.append(&key.tenant, &key.name, unstored, &self.committed);
            }
        }
        self.writer = writer;
    }

    /// What a member who saw up to `after` missed: the committed range to
    /// read from the log, and the messages after it not yet committed.
    /// Split at this instant, the two make it exactly once.
    pub(super) fn resume(&self, after: u64) -> (Option<(u64, u64)>, Vec<Message>) {
        // What is stored, and on a relay also what it never held in
        // memory (from before it started): the log has it, or will within
        // the origin's window (the catch-up waits for it a moment).
        let stored = match self.pending.front() {
            Some(m) => self.committed.load(Ordering::Acquire).max(m.seq - 1),
            None => self
                .committed
                .load(Ordering::Acquire)
                .max(self.head.load(Ordering::Acquire)),
        };
        let catch_up = (after < stored).then_some((after + 1, stored));
        let from = after.max(stored);
        let tail = self.pending.iter().filter(|m| m.seq > from).cloned().collect();
        (catch_up, tail)
    }

    /// Whether everything appended is committed: a group room must not
    /// retire before, or its successor would number from a stale end.
    pub(super) fn settled(&mut self) -> bool {
        self.drop_committed();
        !self.writer || self.pending.is_empty()
    }

    fn drop_committed(&mut self) {
        let committed = self.committed.load(Ordering::Acquire);
        while self.pending.front().is_some_and(|m| m.seq <= committed) {
            self.pending.pop_front();
        }
    }
}
