//! What numbers a room's messages.
//!
//! Every accepted message gets the room's next sequence number, delivered
//! or not; acks, batches, the ring, the group log and members' cursors all
//! speak in these numbers, so they never repeat and never go backwards.
//! A room picks its sequencer when it starts. On one edge, the room numbers
//! its own messages ([`LocalSequencer`]). In a cluster only a room's origin
//! numbers them, continuing after what its history holds, with the
//! origin's epoch beside the number: that is a second variant here, and the
//! room's tick does not change.

/// What numbers a room's messages.
#[derive(Debug)]
pub(super) enum Sequencer {
    Local(LocalSequencer),
}

impl Sequencer {
    /// Numbers this room's messages on this edge, after `last`, the last
    /// number its history holds, in numbering `epoch` (see
    /// `throng_wire::EdgeFrame::Joined`).
    pub(super) fn local(last: u64, epoch: u64) -> Self {
        Self::Local(LocalSequencer { last, epoch })
    }

    /// The numbering these numbers belong to.
    pub(super) fn epoch(&self) -> u64 {
        match self {
            Self::Local(s) => s.epoch,
        }
    }

    /// The next message's number.
    pub(super) fn next(&mut self) -> u64 {
        match self {
            Self::Local(s) => {
                s.last += 1;
                s.last
            }
        }
    }

    /// The highest number handed out so far (0 for none).
    pub(super) fn last(&self) -> u64 {
        match self {
            Self::Local(s) => s.last,
        }
    }
}

/// Numbers from the room's own count on this edge.
#[derive(Debug)]
pub(super) struct LocalSequencer {
    last: u64,
    epoch: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_go_on_after_the_history() {
        let mut s = Sequencer::local(41, 7);
        assert_eq!(s.last(), 41);
        assert_eq!((s.next(), s.next()), (42, 43));
        assert_eq!(s.last(), 43);
        assert_eq!(s.epoch(), 7);
        assert_eq!(Sequencer::local(0, 1).next(), 1);
    }
}
