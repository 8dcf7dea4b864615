//! Where a room's messages come from (its ingress) and where its batches
//! go (its egress).
//!
//! A room picks both when it starts. On one edge, messages come from the
//! room's mailbox on this edge and batches go to the viewers' slots on this
//! edge. In a cluster the room's origin also takes in what other edges
//! forward over NATS (one message per edge per tick) and publishes each
//! encoded batch once on the room's subject; those are second variants
//! here, beside the local ones, and the room's tick does not change.

use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::Instant;

use super::Inbound;
use super::fanout::{Fanout, Viewers};
use super::slot::Delivery;

/// Where a room's messages come from.
#[derive(Debug)]
pub(super) enum Ingress {
    /// Sends from connections on this edge, through the room's mailbox.
    Local(Inbox),
}

/// Messages waiting for the room's next tick.
#[derive(Debug)]
pub(super) struct Inbox {
    messages: Vec<Inbound>,
    capacity: usize,
}

impl Ingress {
    pub(super) fn local(capacity: usize) -> Self {
        Self::Local(Inbox {
            messages: Vec::new(),
            capacity,
        })
    }

    /// Whether the inbox takes more. A full one stops the room reading its
    /// mailbox until the next tick drains it: senders then find the mailbox
    /// full (`Overloaded`), and a flood can neither grow memory nor starve
    /// the ticks.
    pub(super) fn has_room(&self) -> bool {
        match self {
            Self::Local(inbox) => inbox.messages.len() < inbox.capacity,
        }
    }

    pub(super) fn push(&mut self, message: Inbound) {
        match self {
            Self::Local(inbox) => inbox.messages.push(message),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        match self {
            Self::Local(inbox) => inbox.messages.is_empty(),
        }
    }

    /// The tick's messages, in the order they arrived.
    pub(super) fn take(&mut self) -> Vec<Inbound> {
        match self {
            Self::Local(inbox) => std::mem::take(&mut inbox.messages),
        }
    }
}

/// Where a room's batches go.
#[derive(Debug)]
pub(super) enum Egress {
    /// Into the slots of the room's viewers on this edge.
    Local(Fanout),
}

impl Egress {
    pub(super) fn local(shard_members: usize, pace_chunk: usize) -> Self {
        Self::Local(Fanout::new(shard_members, pace_chunk))
    }

    /// Sends a tick's encoded batches on; `spread` and `pool` are the room's
    /// class's.
    pub(super) async fn send(
        &mut self,
        viewers: &mut Viewers,
        deliveries: Vec<Arc<Delivery>>,
        spread: Duration,
        pool: &Handle,
    ) {
        match self {
            Self::Local(fanout) => fanout.push(viewers, deliveries, spread, pool).await,
        }
    }

    /// When the egress has more of a tick's batches to send on.
    pub(super) fn step_due(&self) -> Option<Instant> {
        match self {
            Self::Local(fanout) => fanout.step_due(),
        }
    }

    pub(super) fn step(&mut self) {
        match self {
            Self::Local(fanout) => fanout.step(),
        }
    }

    /// Sends the rest of the last tick's batches on, now.
    pub(super) fn finish(&mut self) {
        match self {
            Self::Local(fanout) => fanout.finish(),
        }
    }
}
