//! A group room's log state: where its log ends, what it appended that is
//! not on disk yet, and how a returning member's gap splits between the two.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use throng_wire::{EdgeFrame, ErrorCode, Message};

use super::{Inbound, RoomKey};
use crate::log::GroupLog;

/// A group room's log state.
#[derive(Debug)]
pub(super) struct GroupState {
    log: GroupLog,
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
    pub(super) async fn open(log: GroupLog, key: &RoomKey) -> Result<Self, String> {
        let (reader, tenant, name) = (log.clone(), Arc::clone(&key.tenant), Arc::clone(&key.name));
        let last = match tokio::task::spawn_blocking(move || reader.last_seq(&tenant, &name)).await {
            Ok(last) => last.map_err(|e| e.to_string())?,
            Err(e) => return Err(format!("reader task failed: {e}")),
        };
        Ok(Self {
            log,
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

    /// What a member who saw up to `after` missed: the committed range to
    /// read from the log, and the messages after it not yet committed.
    /// Split at this instant, the two make it exactly once.
    pub(super) fn resume(&self, after: u64) -> (Option<(u64, u64)>, Vec<Message>) {
        let committed = self.committed.load(Ordering::Acquire);
        let catch_up = (after < committed).then_some((after + 1, committed));
        let from = after.max(committed);
        let tail = self.pending.iter().filter(|m| m.seq > from).cloned().collect();
        (catch_up, tail)
    }

    /// Whether everything appended is committed: a group room must not
    /// retire before, or its successor would number from a stale end.
    pub(super) fn settled(&mut self) -> bool {
        self.drop_committed();
        self.pending.is_empty()
    }

    fn drop_committed(&mut self) {
        let committed = self.committed.load(Ordering::Acquire);
        while self.pending.front().is_some_and(|m| m.seq <= committed) {
            self.pending.pop_front();
        }
    }
}
