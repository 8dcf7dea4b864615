//! Messages waiting for the room's next tick.
//!
//! The room's mailbox fills it from this edge's connections; in a cluster
//! the origin's `Links` puts what other edges forward in the same mailbox
//! (one message per edge per tick), so the tick does not know where a
//! message came from. Where batches go is the fanout's (`fanout.rs`) and,
//! for relays, the room's place in the cluster (`place.rs`).

use super::Inbound;

/// A room's messages for its next tick, in the order they arrived.
#[derive(Debug)]
pub(super) struct Inbox {
    messages: Vec<Inbound>,
    capacity: usize,
}

impl Inbox {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            messages: Vec::new(),
            capacity,
        }
    }

    /// Whether the inbox takes more. A full one stops the room reading its
    /// mailbox until the next tick drains it: senders then find the mailbox
    /// full (`Overloaded`), and a flood can neither grow memory nor starve
    /// the ticks.
    pub(super) fn has_room(&self) -> bool {
        self.messages.len() < self.capacity
    }

    pub(super) fn push(&mut self, message: Inbound) {
        self.messages.push(message);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The tick's messages, in the order they arrived.
    pub(super) fn take(&mut self) -> Vec<Inbound> {
        std::mem::take(&mut self.messages)
    }
}
