//! A group room's log state: where its log ends, the ticks it sequenced
//! that are not stored yet, and how a returning member's gap splits
//! between the log and memory.
//!
//! **Acked means stored.** A group room's tick is numbered and appended to
//! the log, then *held*: its senders get their acks, and anyone the tick's
//! batch, only once the log's writer says it is stored ([`Commit`]). So a
//! crash loses only what nobody was told of, and numbering on from the
//! log's end after it reuses no number anyone saw.
//!
//! **One writer, fenced.** The room writes under a claim on its log. In a
//! cluster another edge may take the room over while this one still
//! believes it is the origin (a partition, a paused process): its next
//! append is refused, the claim is fenced, and every held tick is refused
//! to its senders (`ServerBusy`: try again) — none was acked or shown.
//! The room then claims the log again and numbers on after its new end.
//!
//! In a cluster the room's origin writes the log (JetStream) and publishes
//! its batches only once stored, so relays hold nothing unstored; a relay
//! still keeps what it delivered above the origin's `committed` mark, for
//! a member resuming on it in that instant.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use throng_wire::{EdgeFrame, ErrorCode, Message};

use super::tick::{Ack, Outgoing};
use super::{Inbound, RoomKey};
use crate::group_store::GroupStore;
use crate::log::Commit;

/// Why a full tenant's messages are refused (`StorageFull`), before they
/// are numbered or after JetStream refused their append.
const TENANT_FULL: &str = "the tenant's group messages fill its storage; retention frees it";

/// A tick numbered and appended, waiting for the log to store it.
#[derive(Debug)]
pub(super) struct Held {
    /// The highest number handed out in the tick.
    pub(super) last: u64,
    pub(super) acks: Vec<Ack>,
    pub(super) out: Outgoing,
}

/// What the room's log said since the room last looked.
#[derive(Debug)]
pub(super) enum Stored {
    /// These held ticks are stored, oldest first: ack and deliver them.
    Ticks(Vec<Held>),
    /// Another edge appended to the log: what was held and stored before
    /// that is given back to be acked and delivered (it is in the log),
    /// everything else held was refused, and the room must claim the log
    /// again before it numbers more.
    Fenced(Vec<Held>),
}

/// A group room's log state.
#[derive(Debug)]
pub(super) struct GroupState {
    log: GroupStore,
    /// Whether this edge writes the room's log: always on a single edge,
    /// only its origin in a cluster.
    writer: bool,
    /// The claim this edge writes under (a relay's is never fenced: it
    /// only mirrors the origin's mark).
    commit: Arc<Commit>,
    /// Highest sequence number stored, as connections see it (a catch-up
    /// waits on it); the same across claims.
    stored: Arc<AtomicU64>,
    /// Relay: delivered by the origin above what it said is stored.
    pending: VecDeque<Message>,
    /// Origin: ticks numbered and appended, not yet stored, oldest first.
    held: VecDeque<Held>,
    /// The highest sequence acked or delivered (what members may say
    /// they saw).
    head: Arc<AtomicU64>,
    /// The log's numbering (see `GroupStore::epoch`).
    epoch: u64,
}

impl GroupState {
    /// Claims the room's log and reads where it ends. A room that cannot
    /// must not start: numbering from 1 would overwrite the log.
    pub(super) async fn open(log: GroupStore, key: &RoomKey) -> Result<Self, String> {
        let (last, commit) = log.claim(&key.tenant, &key.name).await.map_err(|e| e.to_string())?;
        let epoch = log.epoch(&key.tenant).await.map_err(|e| e.to_string())?;
        Ok(Self {
            epoch,
            log,
            writer: true,
            commit,
            stored: Arc::new(AtomicU64::new(last)),
            pending: VecDeque::new(),
            held: VecDeque::new(),
            head: Arc::new(AtomicU64::new(last)),
        })
    }

    /// The log's numbering.
    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The highest sequence number the room has acked or delivered.
    pub(super) fn last_seq(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// The room's head, kept current, so a connection can refuse a `Seen`
    /// beyond it.
    pub(super) fn head(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.head)
    }

    /// The claim the room writes under, to wait on.
    pub(super) fn commit(&self) -> &Arc<Commit> {
        &self.commit
    }

    /// Whether ticks wait for the log.
    pub(super) fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// While the log is behind, refuses the tick's messages rather than
    /// hold ever more in memory. Senders may retry.
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

    /// While the room's tenant stores all it may, refuses the tick's
    /// messages before they are numbered (a tick already queued may pass
    /// the bound by its own size, no more).
    pub(super) fn refuse_if_tenant_full(&self, key: &RoomKey, inbox: &mut Vec<Inbound>) {
        if inbox.is_empty() || !self.log.tenant_full(&key.tenant) {
            return;
        }
        metrics::counter!("throng_group_storage_full_total", "tenant" => key.tenant.to_string())
            .increment(inbox.len() as u64);
        for m in inbox.drain(..) {
            let _ = m.reply.send(EdgeFrame::Rejected {
                client_msg_id: m.client_msg_id,
                code: ErrorCode::StorageFull.code(),
                reason: TENANT_FULL.into(),
            });
        }
    }

    /// Appends a numbered tick to the log and holds it until it is stored.
    pub(super) fn hold(&mut self, key: &RoomKey, tick: Held) {
        self.log.append(
            &key.tenant,
            &key.name,
            tick.out.messages.clone(),
            tick.last,
            &self.commit,
        );
        self.held.push_back(tick);
    }

    /// What the log stored (or refused) since the last look.
    pub(super) fn take_stored(&mut self, key: &RoomKey) -> Stored {
        // The fence first: the writer raises the stored mark before it
        // fences, so a mark read after a fence is final for this claim.
        let fenced = self.commit.is_fenced();
        let stored = self.commit.stored();
        self.stored.fetch_max(stored, Ordering::AcqRel);
        let mut ready = Vec::new();
        while self.held.front().is_some_and(|t| t.last <= stored) {
            ready.extend(self.held.pop_front());
        }
        if let Some(last) = ready.last() {
            self.head.fetch_max(last.last, Ordering::AcqRel);
        }
        if !fenced {
            return Stored::Ticks(ready);
        }
        let full = self.commit.is_full();
        let (code, reason) = if full {
            (ErrorCode::StorageFull, TENANT_FULL)
        } else {
            (
                ErrorCode::ServerBusy,
                "another edge took this group room over; send again",
            )
        };
        let mut refused = 0u64;
        for tick in self.held.drain(..) {
            for ack in tick.acks {
                refused += 1;
                ack.refuse(code, reason);
            }
        }
        if full {
            metrics::counter!("throng_group_storage_full_total", "tenant" => key.tenant.to_string()).increment(refused);
        } else {
            metrics::counter!("throng_group_room_fenced_total").increment(1);
        }
        Stored::Fenced(ready)
    }

    /// Claims the log again after a fence: returns where it ends now.
    pub(super) async fn reclaim(&mut self, key: &RoomKey) -> Result<u64, String> {
        let (last, commit) = self
            .log
            .claim(&key.tenant, &key.name)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(last, "claimed the group room's log again");
        self.commit = commit;
        self.stored.fetch_max(last, Ordering::AcqRel);
        self.head.fetch_max(last, Ordering::AcqRel);
        Ok(last)
    }

    /// What the log stored in `from..=to`, oldest first; none when it
    /// holds more than `limit` there or cannot be read now.
    pub(super) async fn read_stored(&self, key: &RoomKey, from: u64, to: u64, limit: usize) -> Option<Vec<Message>> {
        match self.log.read(&key.tenant, &key.name, from, to, limit).await {
            Ok(messages) if messages.len() < limit => Some(messages),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, from, to, "cannot read what the group room's log stored meanwhile");
                None
            }
        }
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
        self.stored.fetch_max(committed, Ordering::AcqRel);
        self.drop_committed();
    }

    /// How far the log is stored, as this edge knows.
    pub(super) fn committed(&self) -> u64 {
        self.stored.load(Ordering::Acquire)
    }

    /// The same, kept current.
    pub(super) fn stored(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.stored)
    }

    /// Sets whether this edge writes the room's log. Taking it over, it
    /// claims the log (its end is the room's numbering from now on) and
    /// first writes what it holds beyond what is stored. Returns the log's
    /// end when it claimed it.
    pub(super) async fn set_writer(&mut self, key: &RoomKey, writer: bool) -> Result<Option<u64>, String> {
        if !writer || self.writer {
            self.writer = writer;
            return Ok(None);
        }
        self.writer = true;
        let last = match self.reclaim(key).await {
            Ok(last) => last,
            Err(e) => {
                // Unclaimed is as fenced: nothing is stored, sends are
                // refused, and each tick tries to claim again.
                let unclaimed = Commit::new(self.committed(), 0);
                unclaimed.fence();
                self.commit = unclaimed;
                return Err(e);
            }
        };
        self.drop_committed();
        let unstored: Vec<Message> = self.pending.drain(..).filter(|m| m.seq > last).collect();
        let mut end = last;
        if let Some(top) = unstored.last().map(|m| m.seq) {
            tracing::info!(
                messages = unstored.len(),
                "taking the room's log over: storing what the last origin had not"
            );
            end = end.max(top);
            self.log.append(&key.tenant, &key.name, unstored, top, &self.commit);
        }
        Ok(Some(end))
    }

    /// What a member who saw up to `after` missed: the committed range to
    /// read from the log, and the messages after it not yet committed.
    /// Split at this instant, the two make it exactly once.
    pub(super) fn resume(&self, after: u64) -> (Option<(u64, u64)>, Vec<Message>) {
        // What is stored, and on a relay also what it never held in
        // memory (from before it started): the log has it, or will within
        // the origin's window (the catch-up waits for it a moment).
        let stored = match self.pending.front() {
            Some(m) => self.committed().max(m.seq - 1),
            None => self.committed().max(self.head.load(Ordering::Acquire)),
        };
        let catch_up = (after < stored).then_some((after + 1, stored));
        let from = after.max(stored);
        let tail = self.pending.iter().filter(|m| m.seq > from).cloned().collect();
        (catch_up, tail)
    }

    /// Whether everything appended is stored: a group room must not
    /// retire before, or its successor would number from a stale end.
    pub(super) fn settled(&mut self) -> bool {
        self.drop_committed();
        !self.writer || self.held.is_empty()
    }

    fn drop_committed(&mut self) {
        let committed = self.committed();
        while self.pending.front().is_some_and(|m| m.seq <= committed) {
            self.pending.pop_front();
        }
    }
}
